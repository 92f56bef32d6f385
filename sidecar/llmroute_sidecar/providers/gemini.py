"""Gemini's `generateContent` API as a target: the wire format only, the HTTP flow is the base's.

Gemini is only ever a *target* here (apps speak Anthropic or OpenAI; there is no Gemini-compatible
endpoint), so this module has no app codec: it turns neutral requests into Gemini bodies and Gemini
answers, streams and errors back into neutral ones. What makes Gemini different, and how it is met:

- No tool call ids on the wire (mostly): answers get ids synthesized from the `responseId` and the call's
  position (`call_<responseId>_<n>`, the same for the stream and the body); on the way in, a tool
  result's function name comes from `ToolResult.name` or from the earlier tool call with its id.
- Gemini 3 rejects (400) a replayed `functionCall` without the thought signature it was issued with. A
  translated conversation never has one, so the first call of each model turn carries the documented
  placeholder signature for history the model did not produce itself.
- No terminal stream sentinel: the chunk carrying a `finishReason` (or a prompt block) ends the stream;
  an end of body before it is a break, never a silent success.
- Errors are `{"error": {"code", "message", "status"}}`, and the HTTP status may lie (a quota 429
  inside a 500/503): the body's code and status decide (HOSTILE.md U11), and its `RetryInfo` delay is
  used as the retry hint when no `retry-after` header came (U13).
- Refusals (`SAFETY`, `RECITATION`, a blocked prompt, ...) are answers, not failures (U16).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from typing import Any

import orjson

from ..durations import parse_duration
from ..errors import FailoverError, UpstreamError
from ..messages import (
    ChatRequest,
    ChatResponse,
    Image,
    Message,
    NativeBody,
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
from .base import Adapter, StreamDecoder
from .shared import Classifier, generation_params

API_VERSION = "v1beta"
"""The version with every feature we translate (systemInstruction, parametersJsonSchema, toolConfig)."""

FOREIGN_SIGNATURE = "skip_thought_signature_validator"
"""Google's documented thought signature for function calls Gemini did not produce (translated history)."""

_VERSIONED_BASE = re.compile(r"/v\d+(?:alpha|beta)?\d*$")
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_DATA_URL = re.compile(r"^data:([^;,]+);base64,(.*)$", re.DOTALL)

# Output withheld by a filter: an answer (HTTP 200), never a reason to retry (HOSTILE.md U16).
_REFUSALS = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
        "MODEL_ARMOR",
    }
)
_TOOL_MODES = {"auto": "AUTO", "any": "ANY", "none": "NONE"}

# Target params that Gemini reads inside `generationConfig`, so a policy can write them flat
# (`params: {topK: 40, thinkingConfig: {...}}`) like the other providers' params.
_GENERATION_FIELDS = frozenset(
    {
        "stopSequences",
        "responseMimeType",
        "responseSchema",
        "responseJsonSchema",
        "responseModalities",
        "candidateCount",
        "maxOutputTokens",
        "temperature",
        "topP",
        "topK",
        "seed",
        "presencePenalty",
        "frequencyPenalty",
        "responseLogprobs",
        "logprobs",
        "enableEnhancedCivicAnswers",
        "speechConfig",
        "thinkingConfig",
        "imageConfig",
        "mediaResolution",
    }
)


class GeminiAdapter(Adapter):
    """Calls `models/{model}:generateContent` / `:streamGenerateContent?alt=sse`."""

    dialect = "gemini"
    supports_prefill = False  # a trailing model turn is not reliably continued

    def url(self, model: str, stream: bool) -> str:
        # A base URL that already names a version (`.../v1`) is used as given.
        base = self.base_url if _VERSIONED_BASE.search(self.base_url) else f"{self.base_url}/{API_VERSION}"
        method = "streamGenerateContent?alt=sse" if stream else "generateContent"
        return f"{base}/models/{model.removeprefix('models/')}:{method}"

    def auth_headers(self, api_key: str | None) -> dict[str, str]:
        return {"x-goog-api-key": api_key} if api_key else {}

    def encode_request(self, request: ChatRequest, model: str, stream: bool) -> dict[str, Any]:
        # Model and streaming live in the URL, not in the body.
        if request.native is not None and request.native.dialect == self.dialect:
            body = dict(request.native.body)
            if request.system_override is not None:
                body["systemInstruction"] = _system(request.system_override)
            if request.prefill:
                body["contents"] = [*body.get("contents", []), _model_text(request.prefill)]
        else:
            body = _encode_neutral(request)
        if request.extra:
            _merge_extra(body, request.extra)
        return body

    def decode_response(self, body: dict[str, Any]) -> ChatResponse:
        candidate = _first_candidate(body)
        if candidate is None:
            if _block_reason(body) is None:
                raise ValueError("no candidates and no promptFeedback.blockReason")
            return ChatResponse([], "refusal", _usage(body), _model(body), NativeBody(self.dialect, body))
        prefix = _call_prefix(body)
        parts: list[Text | ToolCall] = []
        for raw in _candidate_parts(candidate):
            if "functionCall" in raw:
                parts.append(_tool_call(raw["functionCall"], prefix, _count_calls(parts)))
            elif _is_answer_text(raw):
                if parts and isinstance(parts[-1], Text):
                    parts[-1].text += raw["text"]  # Gemini splits text into several parts
                else:
                    parts.append(Text(raw["text"]))
        has_calls = any(isinstance(part, ToolCall) for part in parts)
        stop = _stop_reason(candidate.get("finishReason"), has_calls)
        return ChatResponse(parts, stop, _usage(body), _model(body), NativeBody(self.dialect, body))

    def stream_decoder(self) -> StreamDecoder:
        return GeminiStreamDecoder(self._classify_event)

    def error_details(self, body: Any) -> tuple[str | None, str | None, int | None]:
        error = _error_object(body)
        if error is None:
            return None, None, None
        status = error.get("status")
        code = error.get("code")
        message = error.get("message")
        # The status string outranks the code: RESOURCE_EXHAUSTED is a 429 whatever the HTTP said.
        claimed = 429 if status == "RESOURCE_EXHAUSTED" else code if isinstance(code, int) else None
        return (
            status if isinstance(status, str) else None,
            message if isinstance(message, str) else None,
            claimed,
        )

    def untranslatable(self, request: ChatRequest) -> str | None:
        reason = super().untranslatable(request)  # what the app's native body holds beyond neutral
        if reason is not None:
            return reason
        if request.prefill:
            return "Gemini cannot continue an assistant prefill"
        if request.native is not None and request.native.dialect == self.dialect:
            return None
        names = _call_names(request.messages)
        for message in request.messages:
            for part in message.parts:
                if isinstance(part, Image) and _inline_image(part) is None:
                    return "Gemini takes images as inline base64 data only, not by URL"
                if isinstance(part, ToolResult) and _result_name(part, names) is None:
                    return f"tool result {part.call_id!r} names no function and answers no earlier call"
        return None

    def retry_hint(self, status: int, headers: Mapping[str, str], raw: bytes) -> float | None:
        """Gemini never sends `retry-after`; its error body's `RetryInfo.retryDelay` says how long."""
        return _retry_delay(raw)

    def _classify_event(self, code: int, headers: Mapping[str, str], raw: bytes) -> UpstreamError:
        return self.classify(code, headers, raw, note="error event in the stream")


class GeminiStreamDecoder(StreamDecoder):
    """One `alt=sse` stream: every event is a whole `GenerateContentResponse` chunk."""

    __slots__ = ("_calls", "_classify", "_done", "_prefix", "_started", "_usage")

    def __init__(self, classify: Classifier) -> None:
        self._classify = classify
        self._started = False
        self._done = False
        self._calls = 0
        self._prefix = ""
        self._usage = Usage()

    def finished(self) -> bool:
        return self._done

    def decode(self, event: SseEvent) -> list[StreamEvent]:
        if event.event != "message":
            return []  # Gemini sends data-only events; anything else is not ours to interpret
        body = orjson.loads(event.data)
        if not isinstance(body, dict):
            raise ValueError("stream chunk is not a JSON object")
        error = _error_object(body)
        if error is not None:
            code = error.get("code")
            raise self._classify(code if isinstance(code, int) else 500, {}, event.data.encode())
        if "usageMetadata" in body:
            self._usage = _usage(body)
        events: list[StreamEvent] = []
        if not self._started:
            self._started = True
            self._prefix = _call_prefix(body)
            events.append(StreamStart(_model(body), Usage(input_tokens=self._usage.input_tokens)))
        if _block_reason(body) is not None:
            return self._end(events, "refusal")
        candidate = _first_candidate(body)
        if candidate is None:
            return events  # a usage-only chunk
        for raw in _candidate_parts(candidate):
            if "functionCall" in raw:
                call = _tool_call(raw["functionCall"], self._prefix, self._calls)
                events.append(ToolCallStart(self._calls, call.id, call.name))
                events.append(ToolCallDelta(self._calls, orjson.dumps(call.arguments).decode()))
                self._calls += 1
            elif _is_answer_text(raw) and raw["text"]:
                events.append(TextDelta(raw["text"]))
        finish = candidate.get("finishReason")
        if finish:
            return self._end(events, _stop_reason(finish, self._calls > 0))
        return events

    def _end(self, events: list[StreamEvent], stop: StopReason) -> list[StreamEvent]:
        self._done = True
        events.append(StreamEnd(stop, Usage(self._usage.input_tokens, self._usage.output_tokens)))
        return events


# ----- encoding ---------------------------------------------------------------------------------------
def _encode_neutral(request: ChatRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"contents": _contents(request.messages)}
    if request.prefill:
        body["contents"].append(_model_text(request.prefill))
    system = request.effective_system
    if system:  # Gemini rejects an empty text part
        body["systemInstruction"] = _system(system)
    if request.tools:
        body["tools"] = [{"functionDeclarations": [_declaration(tool) for tool in request.tools]}]
        # A calling config without declarations is refused, and moot anyway.
        if request.tool_choice is not None:
            body["toolConfig"] = {"functionCallingConfig": _calling_config(request.tool_choice)}
    config = generation_params(request, max_tokens="maxOutputTokens", top_p="topP", stop="stopSequences")
    if config:
        body["generationConfig"] = config
    return body


def _contents(messages: list[Message]) -> list[dict[str, Any]]:
    """Gemini turns: `model` for the assistant; adjacent same-role messages become one turn (the
    parallel tool results of an OpenAI conversation arrive as several messages, Gemini wants one).
    Empty text parts are dropped (Gemini rejects them; OpenAI tool-call turns often carry "") and so
    is a turn left with no parts."""
    names = _call_names(messages)
    contents: list[dict[str, Any]] = []
    for message in messages:
        role = "model" if message.role == "assistant" else "user"
        parts = [_part(part, names) for part in message.parts if not (isinstance(part, Text) and not part.text)]
        if not parts:
            continue
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})
    for content in contents:
        if content["role"] == "model":
            _sign_first_call(content["parts"])
    return contents


def _part(part: Text | Image | ToolCall | ToolResult, names: dict[str, str]) -> dict[str, Any]:
    if isinstance(part, Text):
        return {"text": part.text}
    if isinstance(part, ToolCall):
        return {"functionCall": {"name": part.name, "args": part.arguments}}
    if isinstance(part, ToolResult):
        name = _result_name(part, names)
        if name is None:
            raise FailoverError(f"tool result {part.call_id!r} answers no known call", condition="untranslatable")
        # Gemini's documented convention: `output` for a result, `error` for a failure.
        key = "error" if part.is_error else "output"
        return {"functionResponse": {"name": name, "response": {key: part.content}}}
    inline = _inline_image(part)
    if inline is None:
        raise FailoverError("Gemini takes images as inline base64 data only", condition="untranslatable")
    return {"inlineData": inline}


def _sign_first_call(parts: list[dict[str, Any]]) -> None:
    for part in parts:
        if "functionCall" in part:
            part["thoughtSignature"] = FOREIGN_SIGNATURE
            return


def _call_names(messages: list[Message]) -> dict[str, str]:
    return {part.id: part.name for message in messages for part in message.parts if isinstance(part, ToolCall)}


def _result_name(part: ToolResult, names: dict[str, str]) -> str | None:
    return part.name or names.get(part.call_id)


def _inline_image(image: Image) -> dict[str, str] | None:
    if image.data is not None:
        return {"mimeType": image.media_type, "data": image.data}
    match = _DATA_URL.match(image.url or "")
    if match is None:
        return None
    return {"mimeType": match.group(1), "data": match.group(2)}


def _system(text: str) -> dict[str, Any]:
    return {"role": "user", "parts": [{"text": text}]}


def _model_text(text: str) -> dict[str, Any]:
    return {"role": "model", "parts": [{"text": text}]}


def _declaration(tool: ToolSpec) -> dict[str, Any]:
    # `parametersJsonSchema` takes the JSON Schema the other providers use as is; `parameters` would
    # reject common keywords (additionalProperties, $ref, ...).
    declaration: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        declaration["description"] = tool.description
    if tool.parameters:
        declaration["parametersJsonSchema"] = tool.parameters
    return declaration


def _calling_config(choice: str) -> dict[str, Any]:
    mode = _TOOL_MODES.get(choice)
    if mode is not None:
        return {"mode": mode}
    return {"mode": "ANY", "allowedFunctionNames": [choice]}


def _merge_extra(body: dict[str, Any], extra: dict[str, Any]) -> None:
    """Target params on top: generation fields into `generationConfig`, the rest at the top level;
    an object param merges one level deep so `generationConfig: {topK: 4}` keeps `maxOutputTokens`."""
    for key, value in extra.items():
        target = body
        if key in _GENERATION_FIELDS:
            target = body.setdefault("generationConfig", {})
        current = target.get(key)
        if isinstance(current, dict) and isinstance(value, dict):
            target[key] = {**current, **value}
        else:
            target[key] = value


# ----- decoding ---------------------------------------------------------------------------------------
def _first_candidate(body: dict[str, Any]) -> dict[str, Any] | None:
    """The answer (we never ask for more than one candidate); None when there is none."""
    candidates = body.get("candidates")
    if not candidates:
        return None
    if not isinstance(candidates, list) or not isinstance(candidates[0], dict):
        raise ValueError("candidates is not a list of objects")
    candidate: dict[str, Any] = candidates[0]
    return candidate


def _candidate_parts(candidate: dict[str, Any]) -> list[dict[str, Any]]:
    content = candidate.get("content") or {}  # absent when a filter withheld the answer
    if not isinstance(content, dict):
        raise ValueError("candidate content is not an object")
    parts = content.get("parts") or []
    if not isinstance(parts, list):
        raise ValueError("content.parts is not a list")
    return [part for part in parts if isinstance(part, dict)]


def _is_answer_text(part: dict[str, Any]) -> bool:
    # `thought: true` parts are thought summaries (includeThoughts), not the answer.
    return isinstance(part.get("text"), str) and not part.get("thought")


def _tool_call(raw: dict[str, Any], prefix: str, index: int) -> ToolCall:
    name = raw["name"]
    if not isinstance(name, str):
        raise ValueError("functionCall.name is not a string")
    args = raw.get("args") or {}
    if not isinstance(args, dict):
        raise ValueError("functionCall.args is not an object")
    call_id = raw.get("id")
    if not isinstance(call_id, str) or not call_id:
        call_id = f"{prefix}_{index}"
    return ToolCall(call_id, name, args)


def _count_calls(parts: list[Text | ToolCall]) -> int:
    return sum(1 for part in parts if isinstance(part, ToolCall))


def _call_prefix(body: dict[str, Any]) -> str:
    """`call_<responseId>`: unique per answer (Anthropic rejects repeated tool_use ids in one
    conversation) and the same in a stream and a body; random when Gemini sent no responseId."""
    response_id = body.get("responseId")
    token = _ID_UNSAFE.sub("", response_id)[:24] if isinstance(response_id, str) else ""
    return f"call_{token or secrets.token_hex(8)}"


def _stop_reason(finish: object, has_calls: bool) -> StopReason:
    if finish == "STOP":
        return "tool_use" if has_calls else "end_turn"
    if finish == "MAX_TOKENS":
        return "max_tokens"
    if finish in _REFUSALS:
        return "refusal"
    return "other"


def _block_reason(body: dict[str, Any]) -> str | None:
    feedback = body.get("promptFeedback")
    reason = feedback.get("blockReason") if isinstance(feedback, dict) else None
    return reason if isinstance(reason, str) and reason else None


def _usage(body: dict[str, Any]) -> Usage:
    """Input: the prompt plus tool-use prompt tokens. Output: candidates plus thinking tokens, which
    Gemini bills as output, as Anthropic's and OpenAI's output counts already include theirs."""
    meta = body.get("usageMetadata")
    if not isinstance(meta, dict):
        return Usage()
    return Usage(
        input_tokens=_count(meta, "promptTokenCount") + _count(meta, "toolUsePromptTokenCount"),
        output_tokens=_count(meta, "candidatesTokenCount") + _count(meta, "thoughtsTokenCount"),
    )


def _count(meta: dict[str, Any], key: str) -> int:
    value = meta.get(key)
    return value if isinstance(value, int) else 0


def _model(body: dict[str, Any]) -> str:
    model = body.get("modelVersion")
    return model if isinstance(model, str) else ""


# ----- errors -----------------------------------------------------------------------------------------
def _error_object(body: Any) -> dict[str, Any] | None:
    # Some Gemini front ends wrap the envelope in a one-element array.
    if isinstance(body, list) and body:
        body = body[0]
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else None


def _retry_delay(raw: bytes) -> float | None:
    """`RetryInfo.retryDelay` (a protobuf Duration such as "58s") from an error body."""
    try:
        error = _error_object(orjson.loads(raw))
    except ValueError:
        return None
    details = error.get("details") if error is not None else None
    for detail in details if isinstance(details, list) else []:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            delay = detail.get("retryDelay")
            try:
                return parse_duration(delay) if isinstance(delay, str) else None
            except ValueError:
                return None
    return None
