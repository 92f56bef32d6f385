"""OpenAI Chat Completions: the wire format of OpenAI and of every "OpenAI-compatible" server.

Two sides live here. `OpenAIAdapter` calls an upstream that speaks Chat Completions (OpenAI itself, or
any compatible base URL: Azure-style proxies, vLLM, Gemini's compatibility endpoint). `OpenAIAppCodec`
is what the sidecar's `/openai/v1/chat/completions` endpoint speaks to apps that keep their OpenAI SDK.

Choices that are not obvious from the wire format:
- Same-dialect requests pass through (only model, system prompt, stream flags and target params change),
  so whatever the app sent that we cannot represent neutrally still reaches OpenAI untouched.
- Translated requests send `max_tokens`, not `max_completion_tokens`: every compatible server knows the
  former, OpenAI still accepts it for non-reasoning models, and a target that needs the newer name
  sets it in its `params` (merged last). Pass-through keeps whichever name the app used.
- Streams always ask for `stream_options.include_usage` upstream (usage is needed for metrics, cost and
  translations); the usage-only chunk this produces is dropped on the way back to an app that did not
  ask for it, because apps commonly index `chunk.choices[0]` and would crash on an empty `choices`.
- Answers keep the model that really answered (`resp.model`), as OpenAI itself reports a snapshot name
  rather than the alias asked for; the `llmroute-target` header says which target that was.
- Chat Completions has no assistant prefill, so a resumed stream cannot continue here (`supports_prefill`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from mimetypes import guess_type
from typing import Any
from urllib.parse import urlsplit

import orjson

from ..durations import parse_duration
from ..errors import RequestError, UpstreamError
from ..messages import (
    ChatRequest,
    ChatResponse,
    Image,
    Message,
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
from ..sse import SseEvent, json_frame
from ..sse import frame as sse_frame
from .base import Adapter, AppCodec, AppStreamEncoder, StreamDecoder, StreamFrame

DIALECT = "openai"
Body = dict[str, Any]
"""A JSON object of the OpenAI wire format (request, response, chunk)."""

RAW_ARGUMENTS_KEY = "_raw_arguments"
"""Tool-call arguments that are not a JSON object (models do produce those) are kept under this key,
so the answer still decodes; a same-dialect app gets the native body untouched anyway."""

_DONE = b"data: [DONE]\n\n"
_TOKEN_LIMIT_KEYS = ("max_tokens", "max_completion_tokens")

_FINISH_TO_STOP: dict[str, StopReason] = {
    "stop": "end_turn",  # OpenAI does not tell a natural stop from a stop sequence
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
_STOP_TO_FINISH: dict[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    "other": "stop",
}
# Error types of other dialects (what the engine may hand to `error_body`) in OpenAI's vocabulary.
_ERROR_TYPES = {
    "api_error": "server_error",
    "overloaded_error": "server_error",
    "rate_limit_error": "rate_limit_exceeded",
    "not_found_error": "invalid_request_error",
    "request_too_large": "invalid_request_error",
}
# An error object inside a 200 stream carries no HTTP status; this is the status it stands for.
_STREAM_ERROR_STATUS = {
    "server_error": 500,
    "rate_limit_exceeded": 429,
    "insufficient_quota": 429,
    "invalid_request_error": 400,
    "context_length_exceeded": 400,
}

Classifier = Callable[[int, Mapping[str, str], bytes], UpstreamError]


# ----- the upstream side ---------------------------------------------------------------------------


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
        parts: list[Text | ToolCall] = []
        text = _content_text(message.get("content"))
        refusal = _str(message.get("refusal"))
        refused = bool(refusal)
        if text:
            parts.append(Text(text))
        elif refused:
            parts.append(Text(refusal))
        parts.extend(_decode_tool_calls(message))
        return ChatResponse(
            parts=parts,
            stop_reason="refusal" if refused else _stop_reason(finish),
            usage=_decode_usage(body.get("usage")),
            model=_str(body.get("model")),
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
    _merge_extra(body, _generation_params(request))
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


def _generation_params(request: ChatRequest) -> Body:
    params: Body = {}
    if request.max_tokens is not None:
        params["max_tokens"] = request.max_tokens
    if request.temperature is not None:
        params["temperature"] = request.temperature
    if request.top_p is not None:
        params["top_p"] = request.top_p
    if request.stop:
        params["stop"] = list(request.stop)
    return params


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
    body: Body = {"model": model, "messages": messages, **_generation_params(request)}
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
        message["tool_calls"] = [_encode_tool_call(call) for call in calls]
    return message


def _encode_tool_call(call: ToolCall) -> Body:
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


def _decode_tool_calls(message: Body) -> list[ToolCall]:
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
        id=call_id if isinstance(call_id, str) and call_id else _new_id("call_"),
        name=_str(function.get("name")),
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


def _content_text(content: Any) -> str:
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
    return Usage(_int(raw.get("prompt_tokens")), _int(raw.get("completion_tokens")))


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _new_id(prefix: str) -> str:
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
            events.append(StreamStart(model=_str(chunk.get("model")), usage=Usage()))
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
        call_id = _str(call.get("id"))
        wire_index = call.get("index")
        key: int | str
        if isinstance(wire_index, int):
            key = wire_index
        else:  # some compatible servers omit `index`: a new id is a new call, no id continues the last
            key = call_id or (self._last_key if self._last_key is not None else 0)
        index = self._tools.get(key)
        if index is None:
            index = self._tools[key] = len(self._tools)
            name = _str(function.get("name"))
            events.append(ToolCallStart(index=index, id=call_id or _new_id("call_"), name=name))
        self._last_key = key
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            events.append(ToolCallDelta(index, arguments))

    def _error(self, chunk: Body, data: str) -> UpstreamError:
        """An error object inside the 200 stream, classified like an HTTP error of its kind."""
        error_type, _, claimed = error_details(chunk)
        status = claimed or _STREAM_ERROR_STATUS.get(error_type or "", 500)
        return self._classify(status, {}, data.encode())


# ----- the app side --------------------------------------------------------------------------------


class OpenAIAppCodec(AppCodec):
    """`/openai/v1/chat/completions`: what an app's OpenAI SDK sends and expects back."""

    dialect = DIALECT
    forwarded_headers = ("openai-organization", "openai-project", "openai-beta")

    def decode_request(self, body: Body) -> ChatRequest:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise RequestError(400, "you must provide a model parameter (a string)")
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise RequestError(400, "`stream` must be a boolean")
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise RequestError(400, "`messages` must be a list of messages")
        system, neutral = _decode_messages(messages)
        limit = body.get("max_completion_tokens")
        if limit is None:
            limit = body.get("max_tokens")
        return ChatRequest(
            messages=neutral,
            system=system,
            max_tokens=limit if isinstance(limit, int) and not isinstance(limit, bool) else None,
            temperature=_number(body.get("temperature")),
            top_p=_number(body.get("top_p")),
            stop=_decode_stop(body.get("stop")),
            tools=_decode_tools(body.get("tools")),
            tool_choice=_decode_tool_choice(body.get("tool_choice")),
            native=NativeBody(DIALECT, body),
            lossy=native_losses(body),
        )

    def encode_response(self, response: ChatResponse, model: str) -> Body:
        native = response.native
        if native is not None and native.dialect == DIALECT:
            return native.body
        return _completion_body(response, response.model or model)

    def stream_encoder(self, model: str, request: ChatRequest | None = None) -> AppStreamEncoder:
        return OpenAIStreamEncoder(model, include_usage=wants_usage(request))

    def error_body(self, status: int, error_type: str, message: str) -> Body:
        return _error_envelope(error_type, message)


def wants_usage(request: ChatRequest | None) -> bool:
    """Did the app ask for the final usage chunk (`stream_options.include_usage`)?"""
    native = request.native if request is not None else None
    if native is None or native.dialect != DIALECT:
        return False
    options = native.body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _error_envelope(error_type: str, message: str) -> Body:
    kind = _ERROR_TYPES.get(error_type, error_type)
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


# ----- request decoding (app side) -----------------------------------------------------------------


_NEUTRAL_PARTS = frozenset({"text", "image_url"})


def native_losses(body: Body) -> list[str]:
    """What a translation of this request to another dialect would silently drop or no longer honour
    (audio and file parts, several choices, a response format, logprobs, non-function tools). A target
    of another dialect refuses such a request (`untranslatable`) rather than answer a different one."""
    losses: set[str] = set()
    n = body.get("n")
    if isinstance(n, int) and n > 1:
        losses.add("n > 1 (several choices)")
    if body.get("logprobs") is True:
        losses.add("logprobs")
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type", "text") != "text":
        losses.add(f"response_format {response_format.get('type')}")
    modalities = body.get("modalities")
    if isinstance(modalities, list) and "audio" in modalities:
        losses.add("audio output")
    if body.get("functions"):
        losses.add("legacy functions")
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else []:
        if isinstance(tool, dict) and tool.get("type") != "function":
            losses.add(f"OpenAI {tool.get('type')} tool")
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else []:
        if isinstance(message, dict):
            losses.update(_message_losses(message))
    return sorted(losses)


def _message_losses(message: Body) -> list[str]:
    if message.get("role") == "function":
        return ["legacy function message"]
    if message.get("role") == "assistant" and message.get("audio"):
        return ["assistant audio"]
    content = message.get("content")
    if not isinstance(content, list):
        return []
    kinds = {part.get("type") for part in content if isinstance(part, dict) and part.get("type")}
    if message.get("role") == "assistant":
        kinds.discard("refusal")  # a refusal the assistant gave is text-like history, fine to drop
    return [f"OpenAI {kind} content part" for kind in kinds - _NEUTRAL_PARTS]


def _decode_messages(messages: list[Any]) -> tuple[str | None, list[Message]]:
    """The app's messages -> (system prompt, neutral turns). What has no neutral form (audio, files,
    deprecated `function` messages) stays in the native body only."""
    system: list[str] = []
    out: list[Message] = []
    tool_names: dict[str, str] = {}
    for raw in messages:
        if not isinstance(raw, dict):
            continue
        role = raw.get("role")
        if role in ("system", "developer"):
            text = _content_text(raw.get("content"))
            if text:
                system.append(text)
        elif role == "user":
            _append(out, "user", _decode_user_content(raw.get("content")))
        elif role == "assistant":
            _append(out, "assistant", _decode_assistant(raw, tool_names))
        elif role == "tool":
            call_id = _str(raw.get("tool_call_id"))
            content = _content_text(raw.get("content"))
            _append(out, "user", [ToolResult(call_id, content, name=tool_names.get(call_id))])
    return ("\n\n".join(system) if system else None), out


def _append(out: list[Message], role: str, parts: list[Part]) -> None:
    """Consecutive turns of one role become one (tool results then a user's text: one user turn)."""
    if not parts:
        return
    if out and out[-1].role == role:
        out[-1].parts.extend(parts)
    else:
        out.append(Message("assistant" if role == "assistant" else "user", parts))


def _decode_user_content(content: Any) -> list[Part]:
    if isinstance(content, str):
        return [Text(content)] if content else []
    parts: list[Part] = []
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(Text(part["text"]))
            elif kind == "image_url":
                image = _decode_image(part.get("image_url"))
                if image is not None:
                    parts.append(image)
    return parts


def _decode_image(value: Any) -> Image | None:
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        return None
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        media_type = header[5:].split(";", 1)[0]
        if header.endswith(";base64"):
            return Image(media_type=media_type, data=data)
        return Image(media_type=media_type, url=url)
    return Image(media_type=guess_type(urlsplit(url).path)[0] or "", url=url)


def _decode_assistant(raw: Body, tool_names: dict[str, str]) -> list[Part]:
    parts: list[Part] = []
    text = _content_text(raw.get("content"))
    if text:
        parts.append(Text(text))
    for call in _decode_tool_calls(raw):
        tool_names[call.id] = call.name
        parts.append(call)
    return parts


def _decode_stop(stop: Any) -> list[str]:
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list):
        return [item for item in stop if isinstance(item, str)]
    return []


def _decode_tools(tools: Any) -> list[ToolSpec]:
    out: list[ToolSpec] = []
    if not isinstance(tools, list):
        return out
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            continue  # custom and built-in tools: native only
        parameters = function.get("parameters")
        if not isinstance(parameters, dict):  # OpenAI allows none; others need an (empty) object schema
            parameters = {"type": "object", "properties": {}}
        description = function.get("description")
        out.append(
            ToolSpec(
                name=function["name"],
                description=description if isinstance(description, str) else None,
                parameters=parameters,
            )
        )
    return out


def _decode_tool_choice(choice: Any) -> str | None:
    if choice in ("auto", "none"):
        return str(choice)
    if choice == "required":
        return "any"
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        return name if isinstance(name, str) else None
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


# ----- response encoding (app side) ----------------------------------------------------------------


def _completion_body(response: ChatResponse, model: str) -> Body:
    text = response.text
    calls = [part for part in response.parts if isinstance(part, ToolCall)]
    message: Body = {"role": "assistant", "content": text if text or not calls else None, "refusal": None}
    if calls:
        message["tool_calls"] = [_encode_tool_call(call) for call in calls]
    return {
        "id": _new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": _STOP_TO_FINISH[response.stop_reason],
            }
        ],
        "usage": _usage_body(response.usage),
    }


def _usage_body(usage: Usage) -> Body:
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
    }


class OpenAIStreamEncoder(AppStreamEncoder):
    """Writes `chat.completion.chunk` events for one app stream.

    Relay mode passes upstream OpenAI chunks through (re-framed) and notes the stream's id, model and
    tool-call count; encode mode writes neutral events as chunks of that same stream, so a stream can
    switch from one to the other (a resumed continuation: its StreamStart is swallowed, its tool calls
    are numbered after the ones already sent)."""

    __slots__ = (
        "_created",
        "_done",
        "_id",
        "_include_usage",
        "_model",
        "_started",
        "_tool_count",
        "_tool_offset",
    )

    def __init__(self, model: str, include_usage: bool = False) -> None:
        self._model = model
        self._include_usage = include_usage
        self._id = ""
        self._created = 0
        self._started = False
        self._done = False
        self._tool_count = 0
        self._tool_offset = 0

    # -- relay mode --
    def relay(self, frame: StreamFrame) -> bytes:
        sse = frame.sse
        for event in frame.events:
            self._note(event, sse.data)
        if sse.event != "message":
            return sse_frame(sse.event, sse.data)  # not Chat Completions: pass through as it came
        if sse.data.startswith("[DONE]"):
            return _DONE
        if not frame.events and not self._include_usage and _is_usage_only(sse.data):
            return b""  # we asked upstream for usage; the app did not
        return sse_frame(None, sse.data)

    def _note(self, event: StreamEvent, data: str) -> None:
        if isinstance(event, StreamStart) and not self._started:
            self._started = True
            chunk = orjson.loads(data)  # once per stream: the id and model later chunks repeat
            self._id = _str(chunk.get("id")) or _new_id("chatcmpl-")
            created = chunk.get("created")
            self._created = _int(created) or int(time.time())
            self._model = _str(chunk.get("model")) or self._model
        elif isinstance(event, ToolCallStart):
            self._tool_count = max(self._tool_count, self._tool_offset + event.index + 1)
        elif isinstance(event, StreamEnd):
            self._done = True

    # -- encode mode --
    def encode(self, event: StreamEvent) -> bytes:
        if isinstance(event, StreamStart):
            if self._started:
                self._tool_offset = self._tool_count  # a continuation of the stream already open
                return b""
            return self._start(event.model)
        head = b"" if self._started else self._start("")
        if isinstance(event, TextDelta):
            return head + self._chunk({"content": event.text})
        if isinstance(event, ToolCallStart):
            index = self._tool_offset + event.index
            self._tool_count = max(self._tool_count, index + 1)
            call = {
                "index": index,
                "id": event.id,
                "type": "function",
                "function": {"name": event.name, "arguments": ""},
            }
            return head + self._chunk({"tool_calls": [call]})
        if isinstance(event, ToolCallDelta):
            call = {"index": self._tool_offset + event.index, "function": {"arguments": event.arguments}}
            return head + self._chunk({"tool_calls": [call]})
        return head + self._end(event)

    def _start(self, model: str) -> bytes:
        self._started = True
        self._id = _new_id("chatcmpl-")
        self._created = int(time.time())
        self._model = model or self._model
        return self._chunk({"role": "assistant", "content": ""})

    def _end(self, event: StreamEnd) -> bytes:
        self._done = True
        out = self._chunk({}, _STOP_TO_FINISH[event.stop_reason])
        if self._include_usage:
            out += json_frame(None, self._envelope([], _usage_body(event.usage)))
        return out + _DONE

    def _chunk(self, delta: Body, finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return json_frame(None, self._envelope([choice]))

    def _envelope(self, choices: list[Body], usage: Body | None = None) -> Body:
        chunk: Body = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": choices,
        }
        if usage is not None:
            chunk["usage"] = usage
        return chunk

    def error(self, error_type: str, message: str) -> bytes:
        return json_frame(None, _error_envelope(error_type, message))


def _is_usage_only(data: str) -> bool:
    """The final chunk `include_usage` adds: no choices, only usage."""
    if '"usage"' not in data:
        return False
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return isinstance(chunk, dict) and chunk.get("choices") == [] and isinstance(chunk.get("usage"), dict)
