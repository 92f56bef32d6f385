"""The Anthropic Messages API as a target: neutral requests in, Messages bodies out, answers back.

A target on Anthropic gets the neutral request as a Messages body (or the app's own Messages body, model
swapped, when the app spoke Anthropic), and its answers and SSE streams come back as neutral types. The
other side of the dialect, the `/anthropic` compatible endpoint that reads an SDK's Messages request and
writes whatever answered as a Messages body or stream, is `anthropic_app.py`; it builds on the wire pieces
defined here (`DIALECT`, `is_text_block`, `tool_use_call`).

Only the wire format lives here; the HTTP flow and fault classification are in `base.py`.
"""

from __future__ import annotations

from typing import Any

import orjson

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
    ToolSpec,
    Usage,
)
from ..sse import SseEvent
from .base import Adapter, StreamDecoder, StreamFrame
from .shapes import anthropic_message_problem
from .shared import generation_params, int_or_zero, str_or_empty

DIALECT = "anthropic"
API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
"""Anthropic requires `max_tokens`; used when neither the app nor the target sets it."""
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})

_STOP_IN: dict[str, StopReason] = {
    "end_turn": "end_turn",
    "max_tokens": "max_tokens",
    # The context window ran out mid-answer: to the app that is a truncated answer, like max_tokens.
    "model_context_window_exceeded": "max_tokens",
    "stop_sequence": "stop_sequence",
    "tool_use": "tool_use",
    "refusal": "refusal",
}
_ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
"""The HTTP status each Anthropic error type is documented with (in-band stream errors carry none)."""
_JSON_HEADERS = {"Content-Type": "application/json"}

Json = dict[str, Any]


# ----- small wire helpers ---------------------------------------------------------------------------
def _usage(raw: object) -> Usage:
    """Anthropic counts cached input apart; the neutral input count is the whole prompt (PROVIDERS.md 7)."""
    if not isinstance(raw, dict):
        return Usage()
    inputs = (
        int_or_zero(raw.get("input_tokens"))
        + int_or_zero(raw.get("cache_read_input_tokens"))
        + int_or_zero(raw.get("cache_creation_input_tokens"))
    )
    return Usage(inputs, int_or_zero(raw.get("output_tokens")))


def _stop_in(value: object) -> StopReason:
    return _STOP_IN.get(value, "other") if isinstance(value, str) else "other"


# ----- neutral -> Messages body ---------------------------------------------------------------------
def _encode_part(part: Part) -> Json | None:
    if isinstance(part, Text):
        # Anthropic rejects empty text blocks (OpenAI assistant turns often carry "" next to tool calls).
        return {"type": "text", "text": part.text} if part.text else None
    if isinstance(part, Image):
        if part.data is not None:
            source: Json = {"type": "base64", "media_type": part.media_type, "data": part.data}
        else:
            source = {"type": "url", "url": part.url}
        return {"type": "image", "source": source}
    if isinstance(part, ToolCall):
        return {"type": "tool_use", "id": part.id, "name": part.name, "input": part.arguments}
    block: Json = {"type": "tool_result", "tool_use_id": part.call_id}
    if part.content:
        block["content"] = part.content
    if part.is_error:
        block["is_error"] = True
    return block


def _encode_messages(messages: list[Message]) -> list[Json]:
    """Consecutive turns of one role are merged, and tool results lead their user turn: both are
    Anthropic rules that translated conversations (OpenAI `tool` messages) do not follow by themselves."""
    out: list[Json] = []
    for message in messages:
        blocks = [b for b in (_encode_part(p) for p in message.parts) if b is not None]
        if out and out[-1]["role"] == message.role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": message.role, "content": blocks})
    for turn in out:
        if turn["role"] == "user":
            turn["content"].sort(key=lambda b: b["type"] != "tool_result")  # stable: order kept otherwise
        if not turn["content"]:
            turn["content"] = ""
    return out


def _with_prefill(messages: list[Any], prefill: str) -> list[Any]:
    """`messages` (not mutated) ending with the assistant's already-produced text.

    Anthropic rejects a final assistant message ending in whitespace, so the prefill's trailing
    whitespace is stripped here; the engine knows and re-adds it ahead of the continuation.
    A final assistant turn already there (the app's own prefill) is extended, not followed by a second
    one, so the model continues from exactly the text produced so far.
    """
    last = messages[-1] if messages else None
    if not (isinstance(last, dict) and last.get("role") == "assistant"):
        text = prefill.rstrip()
        return [*messages, {"role": "assistant", "content": text}] if text else messages
    content = last.get("content")
    if isinstance(content, str):
        merged: Any = (content + prefill).rstrip()
    elif isinstance(content, list) and content and is_text_block(content[-1]):
        tail = {**content[-1], "text": (content[-1]["text"] + prefill).rstrip()}
        merged = [*content[:-1], tail]
    else:
        blocks = content if isinstance(content, list) else []
        merged = [*blocks, {"type": "text", "text": prefill.rstrip()}] if prefill.strip() else blocks
    return [*messages[:-1], {**last, "content": merged}]


def is_text_block(block: object) -> bool:
    """A `{"type": "text", "text": "..."}` content block (the kind prefills extend and text readers join)."""
    return isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str)


def _encode_tool(tool: ToolSpec) -> Json:
    schema = tool.parameters or {"type": "object", "properties": {}}
    encoded: Json = {"name": tool.name, "input_schema": schema}
    if tool.description:
        encoded["description"] = tool.description
    return encoded


def _encode_tool_choice(choice: str) -> Json:
    if choice in ("auto", "any", "none"):
        return {"type": choice}
    return {"type": "tool", "name": choice}


# ----- the adapter ----------------------------------------------------------------------------------
class AnthropicAdapter(Adapter):
    """Calls `POST {baseURL}/v1/messages`."""

    dialect = DIALECT
    supports_prefill = True

    def url(self, model: str, stream: bool) -> str:
        return f"{self.base_url}/v1/messages"

    def auth_headers(self, api_key: str | None) -> dict[str, str]:
        headers = {"anthropic-version": API_VERSION}
        if api_key:
            headers["x-api-key"] = api_key
        return headers

    def encode_request(self, request: ChatRequest, model: str, stream: bool) -> dict[str, Any]:
        native = request.native
        if native is not None and native.dialect == DIALECT:
            body = self._encode_native(request, native.body)
        else:
            body = self._encode_neutral(request)
        body["model"] = model
        body["stream"] = stream
        body.update(request.extra)
        return body

    @staticmethod
    def _encode_native(request: ChatRequest, app_body: Json) -> Json:
        """The app's body as sent (a shallow copy: it is reused by every attempt)."""
        body = dict(app_body)
        if request.system_override is not None:
            body["system"] = request.system_override
        # The neutral fields were decoded from this body, then the target's params applied on top:
        # writing them back changes nothing the app set, unless the policy says otherwise.
        body.update(generation_params(request, max_tokens="max_tokens", top_p="top_p", stop="stop_sequences"))
        if request.prefill:
            messages = body.get("messages")
            body["messages"] = _with_prefill(messages if isinstance(messages, list) else [], request.prefill)
        return body

    @staticmethod
    def _encode_neutral(request: ChatRequest) -> Json:
        messages = _encode_messages(request.messages)
        if request.prefill:
            messages = _with_prefill(messages, request.prefill)
        body: Json = {"max_tokens": request.max_tokens or DEFAULT_MAX_TOKENS, "messages": messages}
        system = request.effective_system
        if system:
            body["system"] = system
        body.update(generation_params(request, max_tokens=None, top_p="top_p", stop="stop_sequences"))
        if request.tools:
            body["tools"] = [_encode_tool(tool) for tool in request.tools]
            # Anthropic refuses a tool_choice without tools; without tools it is moot anyway.
            if request.tool_choice:
                body["tool_choice"] = _encode_tool_choice(request.tool_choice)
        return body

    def decode_response(self, body: dict[str, Any]) -> ChatResponse:
        if body.get("type") == "error":
            raise ValueError("an error envelope")
        content = body.get("content")
        if not isinstance(content, list):
            raise ValueError("no content list")
        problem = anthropic_message_problem(body)  # relayed as is to an SDK that trusts its types
        if problem is not None:
            raise ValueError(problem)
        parts: list[Text | ToolCall] = []
        for block in content:
            part = _decode_output_block(block)
            if part is not None:
                parts.append(part)
        return ChatResponse(
            parts=parts,
            stop_reason=_stop_in(body.get("stop_reason")),
            usage=_usage(body.get("usage")),
            model=str_or_empty(body.get("model")),
            native=NativeBody(DIALECT, body),
        )

    def stream_decoder(self) -> StreamDecoder:
        return AnthropicStreamDecoder(self)

    def error_details(self, body: Any) -> tuple[str | None, str | None, int | None]:
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict):
            return None, None, None
        kind = error.get("type")
        message = error.get("message")
        kind = kind if isinstance(kind, str) else None
        # `overloaded_error` is Anthropic's 529 whatever status a proxy in between put on it.
        claimed = 529 if kind == "overloaded_error" else None
        return kind, message if isinstance(message, str) else None, claimed

    def untranslatable(self, request: ChatRequest) -> str | None:
        if request.native is not None and request.native.dialect == DIALECT:
            return None  # the app's own Messages body: nothing is translated
        lost = super().untranslatable(request)
        if lost is not None:
            return lost
        for message in request.messages:
            for part in message.parts:
                if isinstance(part, Image) and part.data is not None and part.media_type not in IMAGE_TYPES:
                    return f"Anthropic accepts jpeg/png/gif/webp images only, not {part.media_type or '?'}"
        return None


# ----- Messages answer and stream -> neutral --------------------------------------------------------
def tool_use_call(block: dict[str, Any]) -> ToolCall:
    """A `tool_use` block as a neutral tool call (in Claude's answer, or in the history an app sends)."""
    arguments = block.get("input")
    return ToolCall(str(block.get("id", "")), str(block.get("name", "")),
                    arguments if isinstance(arguments, dict) else {})


def _decode_output_block(block: object) -> Text | ToolCall | None:
    """Text and tool_use blocks; thinking and server-tool blocks have no neutral form (native keeps them)."""
    if not isinstance(block, dict):
        return None
    kind = block.get("type")
    if kind == "text":
        text = block.get("text")
        return Text(text) if isinstance(text, str) else None
    if kind == "tool_use":
        return tool_use_call(block)
    return None


class AnthropicStreamDecoder(StreamDecoder):
    """Messages stream events -> neutral events.

    Tool calls are numbered among tool_use blocks only (block indices also count text and thinking
    blocks). `message_delta` carries the stop reason and cumulative usage; both are reported with
    `StreamEnd` at `message_stop`, the only clean end.
    """

    __slots__ = (
        "_adapter", "_cache_create", "_cache_read", "_done", "_input", "_output", "_stop", "_stopped", "_tools",
    )

    def __init__(self, adapter: Adapter) -> None:
        self._adapter = adapter
        self._tools: dict[int, int] = {}
        """Block index -> tool-call index."""
        self._stop: StopReason = "other"
        self._stopped = False
        """A `message_delta` carried the stop reason: the answer is complete."""
        self._input = self._cache_read = self._cache_create = self._output = 0
        self._done = False

    def finished(self) -> bool:
        return self._done

    def end_of_body(self) -> StreamFrame | None:
        """`message_delta` brought the stop reason: the message is complete without its `message_stop`."""
        if self._done or not self._stopped:
            return None
        stop = SseEvent("message_stop", '{"type":"message_stop"}')
        return StreamFrame(self.decode(stop), stop)

    def decode(self, event: SseEvent) -> list[StreamEvent]:
        kind: object = event.event
        if kind == "ping" or (kind not in _KNOWN_EVENTS and kind != "message"):
            return []  # unknown events still reach same-dialect apps through the relay
        if kind == "error":
            raise self._error(event.data)
        data = orjson.loads(event.data)
        if not isinstance(data, dict):
            raise TypeError("event data is not a JSON object")
        if kind == "message":  # no `event:` line: the data's type says what it is
            kind = data.get("type")
            if kind == "error":
                raise self._error(event.data)
        handler = _HANDLERS.get(kind) if isinstance(kind, str) else None
        return handler(self, data) if handler is not None else []

    def _error(self, raw: str) -> Exception:
        """An in-band error: classified like an HTTP error of the status Anthropic documents for its type."""
        payload = raw.encode()
        try:
            kind, _, _ = self._adapter.error_details(orjson.loads(payload))
        except ValueError:
            kind = None
        status = _ERROR_STATUS.get(kind or "", 500)
        return self._adapter.classify(status, _JSON_HEADERS, payload, note="upstream error event")

    def _message_start(self, data: Json) -> list[StreamEvent]:
        message = data["message"]
        self._count(message.get("usage"))
        return [StreamStart(str_or_empty(message.get("model")), self._usage())]

    def _block_start(self, data: Json) -> list[StreamEvent]:
        block = data["content_block"]
        kind = block.get("type")
        if kind == "tool_use":
            index = len(self._tools)
            self._tools[data["index"]] = index
            return [ToolCallStart(index, str(block.get("id", "")), str(block.get("name", "")))]
        if kind == "text" and block.get("text"):
            return [TextDelta(block["text"])]
        return []

    def _block_delta(self, data: Json) -> list[StreamEvent]:
        delta = data["delta"]
        kind = delta.get("type")
        if kind == "text_delta":
            return [TextDelta(delta["text"])] if delta["text"] else []
        if kind == "input_json_delta":
            tool = self._tools.get(data["index"])
            fragment = delta["partial_json"]
            return [ToolCallDelta(tool, fragment)] if tool is not None and fragment else []
        return []  # thinking, signature and citation deltas have no neutral form

    def _message_delta(self, data: Json) -> list[StreamEvent]:
        delta = data.get("delta")
        if isinstance(delta, dict) and delta.get("stop_reason") is not None:
            self._stop = _stop_in(delta["stop_reason"])
            self._stopped = True
        self._count(data.get("usage"))
        return []

    def _ignore(self, data: Json) -> list[StreamEvent]:
        return []

    def _message_stop(self, data: Json) -> list[StreamEvent]:
        self._done = True
        return [StreamEnd(self._stop, self._usage())]

    def _count(self, usage: object) -> None:
        """Usage counts are cumulative: present fields overwrite, absent ones keep the earlier value."""
        if not isinstance(usage, dict):
            return
        for key, attr in _USAGE_FIELDS:
            value = usage.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, attr, value)

    def _usage(self) -> Usage:
        return Usage(self._input + self._cache_read + self._cache_create, self._output)


_USAGE_FIELDS = (
    ("input_tokens", "_input"),
    ("cache_read_input_tokens", "_cache_read"),
    ("cache_creation_input_tokens", "_cache_create"),
    ("output_tokens", "_output"),
)
_HANDLERS = {
    "message_start": AnthropicStreamDecoder._message_start,
    "content_block_start": AnthropicStreamDecoder._block_start,
    "content_block_delta": AnthropicStreamDecoder._block_delta,
    "content_block_stop": AnthropicStreamDecoder._ignore,
    "message_delta": AnthropicStreamDecoder._message_delta,
    "message_stop": AnthropicStreamDecoder._message_stop,
}
_KNOWN_EVENTS = frozenset({*_HANDLERS, "error", "ping"})
