"""OpenAI Chat Completions as a target: the wire format of OpenAI and of every "OpenAI-compatible" server.

`OpenAIAdapter` calls an upstream that speaks Chat Completions (OpenAI itself, or any compatible base URL:
Azure-style proxies, vLLM, Gemini's compatibility endpoint): neutral requests in, Chat Completions bodies
out, and its answers, SSE chunks and error envelopes back as neutral types. The other side of the dialect,
what the sidecar's `/openai/v1/chat/completions` endpoint speaks to apps that keep their OpenAI SDK, is
`openai_app.py`; it builds on the pieces of the wire format both sides read (tool calls, content, ids).
The HTTP flow and fault classification are in `base.py`.

Choices that are not obvious from the wire format:
- Same-dialect requests pass through (only model, system prompt, stream flags and target params change),
  so whatever the app sent that we cannot represent neutrally still reaches OpenAI untouched.
- Translated requests send `max_tokens`, not `max_completion_tokens`: every compatible server knows the
  former, OpenAI still accepts it for non-reasoning models, and a target that needs the newer name
  sets it in its `params` (merged last). Pass-through keeps whichever name the app used.
- Streams always ask for `stream_options.include_usage` upstream (usage is needed for metrics, cost and
  translations); `openai_app.py` drops the usage-only chunk this produces for apps that did not ask.
- Chat Completions has no assistant prefill, so a resumed stream cannot continue here (`supports_prefill`).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import orjson

from ..durations import parse_duration
from ..errors import UpstreamError
from ..messages import (
    ChatRequest,
    ChatResponse,
    Image,
    NativeBody,
    Part,
    StopReason,
    StreamEnd,
    StreamEvent,
    StreamStart,
    Text,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallStart,
    ToolResult,
    ToolSpec,
    Usage,
)
from ..sse import SseEvent
from .base import Adapter, StreamDecoder, StreamFrame
from .shapes import openai_completion_problem
from .shared import Classifier, generation_params, int_or_zero, str_or_empty

DIALECT = "openai"
Body = dict[str, Any]
"""A JSON object of the OpenAI wire format (request, response, chunk)."""

RAW_ARGUMENTS_KEY = "_raw_arguments"
"""Tool-call arguments that are not a JSON object (models do produce those) are kept under this key,
so the answer still decodes; a same-dialect app gets the native body untouched anyway."""

_TOKEN_LIMIT_KEYS = ("max_tokens", "max_completion_tokens")

_FINISH_TO_STOP: dict[str, StopReason] = {
    "stop": "end_turn",  # OpenAI does not tell a natural stop from a stop sequence
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
# An error object inside a 200 stream carries no HTTP status; this is the status it stands for.
_STREAM_ERROR_STATUS = {
    "server_error": 500,
    "rate_limit_exceeded": 429,
    "insufficient_quota": 429,
    "invalid_request_error": 400,
    "context_length_exceeded": 400,
}


# ----- the adapter ---------------------------------------------------------------------------------


class OpenAIAdapter(Adapter):
    """Calls `POST {baseURL}/chat/completions` with a bearer key."""

    dialect = DIALECT
    supports_prefill = False

    def url(self, model: str, stream: bool) -> str:
        return f"{self.base_url}/chat/completions"

    def auth_headers(self, api_key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def encode_request(self, request: ChatRequest, model: str, stream: bool) -> Body:
        native = request.native
        if native is not None and native.dialect == DIALECT:
            body = _encode_native(request, native.body, model)
        else:
            body = _encode_translated(request, model)
        _merge_extra(body, request.extra)
        _set_stream(body, stream)
        return body

    def decode_response(self, body: Body) -> ChatResponse:
        message, finish = _first_choice(body)
        problem = openai_completion_problem(body)  # relayed as is to an SDK that trusts its types
        if problem is not None:
            raise ValueError(problem)
        parts: list[Text | ToolCall] = []
        text = content_text(message.get("content"))
        refusal = str_or_empty(message.get("refusal"))
        refused = bool(refusal)
        if text:
            parts.append(Text(text))
        elif refused:
            parts.append(Text(refusal))
        parts.extend(decode_tool_calls(message))
        return ChatResponse(
            parts=parts,
            stop_reason="refusal" if refused else _stop_reason(finish),
            usage=_decode_usage(body.get("usage")),
            model=str_or_empty(body.get("model")),
            native=NativeBody(DIALECT, body),
        )

    def stream_decoder(self) -> StreamDecoder:
        return OpenAIStreamDecoder(self.classify)

    def error_details(self, body: Any) -> tuple[str | None, str | None, int | None]:
        return error_details(body)

    def untranslatable(self, request: ChatRequest) -> str | None:
        if request.prefill:
            return "OpenAI Chat Completions cannot continue a partial assistant message (no prefill)"
        if request.native is not None and request.native.dialect == DIALECT:
            return None
        lost = super().untranslatable(request)  # what the app's own body holds beyond the neutral form
        if lost is not None:
            return lost
        for message in request.messages:
            for part in message.parts:
                reason = _unplaceable(message.role, part)
                if reason:
                    return reason
        return None

    def retry_hint(self, status: int, headers: Mapping[str, str], raw: bytes) -> float | None:
        """A 429 without `retry-after` but with OpenAI's `x-ratelimit-reset-*` headers is a rate limit
        with a known end (retry within budget), not a closed door (fail over at once)."""
        return ratelimit_reset(headers) if status == 429 else None


def error_details(body: Any) -> tuple[str | None, str | None, int | None]:
    """(type, message, claimed status) from an OpenAI-style error envelope and its compatible variants.

    The specific `code` (`insufficient_quota`, `rate_limit_exceeded`, `context_length_exceeded`) wins
    over the broad `type`: it is what routing decides on (HOSTILE.md U11)."""
    if isinstance(body, list) and body:
        body = body[0]  # Gemini's OpenAI-compatible endpoint wraps its error envelope in a list
    if not isinstance(body, dict):
        return None, None, None
    error = body.get("error")
    if isinstance(error, str):
        return None, error, None
    if not isinstance(error, dict):
        if "message" not in body:
            return None, None, None
        error = body  # vLLM and friends: a flat {"object": "error", "message", "type", "code"}
    code = error.get("code")
    error_type = next((v for v in (code, error.get("type"), error.get("status")) if isinstance(v, str) and v), None)
    claimed = code if isinstance(code, int) and not isinstance(code, bool) else None
    message = error.get("message")
    return error_type, message if isinstance(message, str) else None, claimed


def ratelimit_reset(headers: Mapping[str, str]) -> float | None:
    """Seconds until OpenAI's exhausted rate-limit window resets (`x-ratelimit-reset-*`: `6m0s`, `12ms`).

    The exhausted dimension (remaining `0`) decides; when none says so, the longer reset."""
    resets: list[float] = []
    for kind in ("requests", "tokens"):
        raw = headers.get(f"x-ratelimit-reset-{kind}")
        if raw is None:
            continue
        try:
            seconds = parse_duration(raw)
        except ValueError:
            continue
        if headers.get(f"x-ratelimit-remaining-{kind}", "").strip() == "0":
            return seconds
        resets.append(seconds)
    return max(resets) if resets else None


# ----- request encoding ----------------------------------------------------------------------------


def _encode_native(request: ChatRequest, native: Body, model: str) -> Body:
    body = dict(native)
    body["model"] = model
    # The neutral generation fields hold the app's own values (a no-op written back) or the target's
    # `params`, which win; a token limit keeps the name the app used.
    _merge_extra(body, generation_params(request, max_tokens="max_tokens", top_p="top_p", stop="stop"))
    messages = body.get("messages")
    if isinstance(messages, list) and (request.system_override is not None or request.prefill):
        if request.system_override is not None:
            messages = _replace_system(messages, request.system_override)
        else:
            messages = list(messages)
        if request.prefill:
            messages.append({"role": "assistant", "content": request.prefill})
        body["messages"] = messages
    return body


def _replace_system(messages: list[Any], system: str) -> list[Any]:
    """Drop the app's system/developer messages and lead with the target's own prompt (same role
    as the app used: reasoning models are given `developer`)."""
    roles = ("system", "developer")
    kept = [m for m in messages if not (isinstance(m, dict) and m.get("role") in roles)]
    role = next((m["role"] for m in messages if isinstance(m, dict) and m.get("role") in roles), "system")
    return [{"role": role, "content": system}, *kept]


def _encode_translated(request: ChatRequest, model: str) -> Body:
    messages: list[Body] = []
    if request.effective_system:
        messages.append({"role": "system", "content": request.effective_system})
    for message in request.messages:
        if message.role == "assistant":
            messages.append(_encode_assistant(message.parts))
        else:
            messages.extend(_encode_user(message.parts))
    if request.prefill:
        messages.append({"role": "assistant", "content": request.prefill})
    body: Body = {
        "model": model,
        "messages": messages,
        **generation_params(request, max_tokens="max_tokens", top_p="top_p", stop="stop"),
    }
    if request.tools:  # OpenAI refuses a tool_choice without tools
        body["tools"] = [_encode_tool(tool) for tool in request.tools]
        if request.tool_choice is not None:
            body["tool_choice"] = _encode_tool_choice(request.tool_choice)
    return body


def _encode_user(parts: list[Part]) -> list[Body]:
    """One neutral user turn -> `tool` messages (they must follow the assistant's tool calls) and then
    the user message with the rest."""
    out: list[Body] = []
    content: list[Body] = []
    for part in parts:
        if isinstance(part, ToolResult):
            out.append({"role": "tool", "tool_call_id": part.call_id, "content": part.content})
        elif isinstance(part, Text):
            content.append({"type": "text", "text": part.text})
        elif isinstance(part, Image):
            content.append({"type": "image_url", "image_url": {"url": _image_url(part)}})
    if len(content) == 1 and content[0]["type"] == "text":
        out.append({"role": "user", "content": content[0]["text"]})  # plain string: widest compatibility
    elif content:
        out.append({"role": "user", "content": content})
    return out


def _encode_assistant(parts: list[Part]) -> Body:
    text = "".join(part.text for part in parts if isinstance(part, Text))
    calls = [part for part in parts if isinstance(part, ToolCall)]
    message: Body = {"role": "assistant", "content": text if text or not calls else None}
    if calls:
        message["tool_calls"] = [encode_tool_call(call) for call in calls]
    return message


def encode_tool_call(call: ToolCall) -> Body:
    """A neutral tool call as a `tool_calls` entry (a request's history, or an answer to an app)."""
    arguments = call.arguments
    raw = arguments.get(RAW_ARGUMENTS_KEY) if len(arguments) == 1 else None
    return {
        "id": call.id,
        "type": "function",
        "function": {
            "name": call.name,
            "arguments": raw if isinstance(raw, str) else orjson.dumps(arguments).decode(),
        },
    }


def _encode_tool(tool: ToolSpec) -> Body:
    function: Body = {"name": tool.name, "parameters": tool.parameters}
    if tool.description is not None:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def _encode_tool_choice(choice: str) -> str | Body:
    if choice in ("auto", "none"):
        return choice
    if choice == "any":
        return "required"
    return {"type": "function", "function": {"name": choice}}


def _image_url(image: Image) -> str:
    if image.data is not None:
        return f"data:{image.media_type};base64,{image.data}"
    return image.url or ""


def _unplaceable(role: str, part: Part) -> str | None:
    if role == "assistant" and isinstance(part, Image | ToolResult):
        return f"OpenAI Chat Completions has no {type(part).__name__} in an assistant message"
    if role == "user" and isinstance(part, ToolCall):
        return "OpenAI Chat Completions has no tool call in a user message"
    return None


def _merge_extra(body: Body, extra: Mapping[str, Any]) -> None:
    """Target params on top; a token limit goes under the name the body already uses, because OpenAI
    refuses `max_tokens` and `max_completion_tokens` together."""
    for key, value in extra.items():
        if key in _TOKEN_LIMIT_KEYS and key not in body:
            other = _TOKEN_LIMIT_KEYS[1 - _TOKEN_LIMIT_KEYS.index(key)]
            if other in body:
                body[other] = value
                continue
        body[key] = value


def _set_stream(body: Body, stream: bool) -> None:
    if stream:
        body["stream"] = True
        options = body.get("stream_options")
        base = options if isinstance(options, dict) else {}
        body["stream_options"] = {**base, "include_usage": True}
    else:
        body.pop("stream_options", None)  # OpenAI refuses stream_options without stream
        if "stream" in body:
            body["stream"] = False


# ----- response decoding ---------------------------------------------------------------------------


def _first_choice(body: Body) -> tuple[Body, Any]:
    """The first choice's message and finish reason; ValueError without them (HOSTILE.md U19)."""
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError("no choices in the answer")
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise ValueError("the first choice has no message")
    return message, choices[0].get("finish_reason")


def decode_tool_calls(message: Body) -> list[ToolCall]:
    """An assistant message's tool calls (an upstream answer, or the history an app sends)."""
    calls = message.get("tool_calls")
    out: list[ToolCall] = []
    if isinstance(calls, list):
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                out.append(_tool_call(call.get("id"), function))
    legacy = message.get("function_call")  # deprecated `functions` API, still spoken by some servers
    if not out and isinstance(legacy, dict):
        out.append(_tool_call(None, legacy))
    return out


def _tool_call(call_id: Any, function: Body) -> ToolCall:
    return ToolCall(
        id=call_id if isinstance(call_id, str) and call_id else new_id("call_"),
        name=str_or_empty(function.get("name")),
        arguments=parse_arguments(function.get("arguments")),
    )


def parse_arguments(raw: Any) -> dict[str, Any]:
    """A tool call's argument text -> object; `""` (a no-argument call) is `{}`."""
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str) or not raw.strip():
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {RAW_ARGUMENTS_KEY: raw}
    return value if isinstance(value, dict) else {RAW_ARGUMENTS_KEY: raw}


def content_text(content: Any) -> str:
    """A message's `content`: a string, or a list of parts of which the text ones count."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        )
    return ""


def _stop_reason(finish: Any) -> StopReason:
    return _FINISH_TO_STOP.get(finish, "other") if isinstance(finish, str) else "other"


def _decode_usage(raw: Any) -> Usage:
    if not isinstance(raw, dict):
        return Usage()
    return Usage(int_or_zero(raw.get("prompt_tokens")), int_or_zero(raw.get("completion_tokens")))


def new_id(prefix: str) -> str:
    """An OpenAI-style id (`chatcmpl-…`, `call_…`) for what the wire did not name."""
    return prefix + uuid.uuid4().hex[:24]


# ----- stream decoding -----------------------------------------------------------------------------


class OpenAIStreamDecoder(StreamDecoder):
    """`chat.completion.chunk` events -> neutral events. Only the first choice is followed (n > 1 is
    served to same-dialect apps by relaying the chunks as they are)."""

    __slots__ = ("_classify", "_done", "_finish", "_last_key", "_refused", "_started", "_tools", "_usage")

    def __init__(self, classify: Classifier) -> None:
        self._classify = classify
        self._started = False
        self._done = False
        self._finish: str | None = None
        self._refused = False
        self._usage = Usage()
        self._tools: dict[int | str, int] = {}
        """Upstream tool-call key (its `index`, else its `id`) -> our tool-call index."""
        self._last_key: int | str | None = None

    def finished(self) -> bool:
        return self._done

    def end_of_body(self) -> StreamFrame | None:
        """A finish reason arrived: the answer is complete without `[DONE]` (vLLM, proxies omit it)."""
        if self._done or self._finish is None:
            return None
        done = SseEvent("message", "[DONE]")
        return StreamFrame(self.decode(done), done)

    def decode(self, event: SseEvent) -> list[StreamEvent]:
        if event.event not in ("message", "error"):
            return []  # not Chat Completions; relayed raw to same-dialect apps
        data = event.data
        if data.startswith("[DONE]"):
            self._done = True
            stop = "refusal" if self._refused else _stop_reason(self._finish)
            return [StreamEnd(stop, self._usage)]
        chunk = orjson.loads(data)
        if not isinstance(chunk, dict):
            raise ValueError("stream chunk is not a JSON object")
        if chunk.get("error") or event.event == "error":
            raise self._error(chunk, data)
        events: list[StreamEvent] = []
        if not self._started:
            self._started = True
            events.append(StreamStart(model=str_or_empty(chunk.get("model")), usage=Usage()))
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = _decode_usage(usage)
        choices = chunk.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict) and choice.get("index", 0) == 0:
                    self._decode_choice(choice, events)
        return events

    def _decode_choice(self, choice: Body, events: list[StreamEvent]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            content = delta.get("content")
            if isinstance(content, str) and content:
                events.append(TextDelta(content))
            refusal = delta.get("refusal")
            if isinstance(refusal, str) and refusal:
                self._refused = True
                events.append(TextDelta(refusal))
            calls = delta.get("tool_calls")
            if isinstance(calls, list):
                for call in calls:
                    if isinstance(call, dict):
                        self._decode_tool_delta(call, events)
        finish = choice.get("finish_reason")
        if isinstance(finish, str) and finish:
            self._finish = finish

    def _decode_tool_delta(self, call: Body, events: list[StreamEvent]) -> None:
        function = call.get("function")
        if not isinstance(function, dict):
            function = {}
        call_id = str_or_empty(call.get("id"))
        wire_index = call.get("index")
        key: int | str
        if isinstance(wire_index, int):
            key = wire_index
        else:  # some compatible servers omit `index`: a new id is a new call, no id continues the last
            key = call_id or (self._last_key if self._last_key is not None else 0)
        index = self._tools.get(key)
        if index is None:
            index = self._tools[key] = len(self._tools)
            name = str_or_empty(function.get("name"))
            events.append(ToolCallStart(index=index, id=call_id or new_id("call_"), name=name))
        self._last_key = key
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            events.append(ToolCallDelta(index, arguments))

    def _error(self, chunk: Body, data: str) -> UpstreamError:
        """An error object inside the 200 stream, classified like an HTTP error of its kind."""
        error_type, _, claimed = error_details(chunk)
        status = claimed or _STREAM_ERROR_STATUS.get(error_type or "", 500)
        return self._classify(status, {}, data.encode())

