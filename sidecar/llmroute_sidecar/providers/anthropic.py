"""The Anthropic Messages API, both ways.

Upstream (`AnthropicAdapter`): a target on Anthropic gets the neutral request as a Messages body (or the
app's own Messages body, model swapped, when the app spoke Anthropic), and its answers and SSE streams
come back as neutral types. App-facing (`AnthropicAppCodec`): the `/anthropic` compatible endpoint reads
an SDK's Messages request and writes whatever answered (Claude itself, or a translated fallback) as a
Messages body or stream the official SDK accepts.

Only the wire format lives here; the HTTP flow and fault classification are in `base.py`.
"""

from __future__ import annotations

import mimetypes
import uuid
from typing import Any

import orjson

from ..errors import RequestError
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
from ..sse import SseEvent
from .base import Adapter, AppCodec, AppStreamEncoder, StreamDecoder, StreamFrame

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
_STOP_OUT: dict[StopReason, str] = {
    "end_turn": "end_turn",
    "max_tokens": "max_tokens",
    "stop_sequence": "stop_sequence",
    "tool_use": "tool_use",
    "refusal": "refusal",
    # `pause_turn` would make an SDK loop re-send the turn; a plain end is the honest closest value.
    "other": "end_turn",
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
def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _usage(raw: object) -> Usage:
    """Anthropic counts cached input apart; the neutral input count is the whole prompt (PROVIDERS.md 7)."""
    if not isinstance(raw, dict):
        return Usage()
    inputs = (
        _int(raw.get("input_tokens"))
        + _int(raw.get("cache_read_input_tokens"))
        + _int(raw.get("cache_creation_input_tokens"))
    )
    return Usage(inputs, _int(raw.get("output_tokens")))


def _stop_in(value: object) -> StopReason:
    return _STOP_IN.get(value, "other") if isinstance(value, str) else "other"


def _message_id() -> str:
    return "msg_" + uuid.uuid4().hex


def _frame(event: str | None, data: str | bytes) -> bytes:
    """One SSE frame; multi-line data (legal SSE, joined by the parser) is split back into lines."""
    text = data.decode() if isinstance(data, bytes) else data
    lines = "".join(f"data: {line}\n" for line in text.split("\n"))
    head = f"event: {event}\n" if event is not None else ""
    return (head + lines + "\n").encode()


def _json_frame(event: str, obj: Json) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


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
    elif isinstance(content, list) and content and _is_text_block(content[-1]):
        tail = {**content[-1], "text": (content[-1]["text"] + prefill).rstrip()}
        merged = [*content[:-1], tail]
    else:
        blocks = content if isinstance(content, list) else []
        merged = [*blocks, {"type": "text", "text": prefill.rstrip()}] if prefill.strip() else blocks
    return [*messages[:-1], {**last, "content": merged}]


def _is_text_block(block: object) -> bool:
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


# ----- the upstream adapter -------------------------------------------------------------------------
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
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.stop:
            body["stop_sequences"] = request.stop
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
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.stop:
            body["stop_sequences"] = request.stop
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
        parts: list[Text | ToolCall] = []
        for block in content:
            part = _decode_output_block(block)
            if part is not None:
                parts.append(part)
        model = body.get("model")
        return ChatResponse(
            parts=parts,
            stop_reason=_stop_in(body.get("stop_reason")),
            usage=_usage(body.get("usage")),
            model=model if isinstance(model, str) else "",
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


def _decode_output_block(block: object) -> Text | ToolCall | None:
    """Text and tool_use blocks; thinking and server-tool blocks have no neutral form (native keeps them)."""
    if not isinstance(block, dict):
        return None
    kind = block.get("type")
    if kind == "text":
        text = block.get("text")
        return Text(text) if isinstance(text, str) else None
    if kind == "tool_use":
        arguments = block.get("input")
        return ToolCall(str(block.get("id", "")), str(block.get("name", "")),
                        arguments if isinstance(arguments, dict) else {})
    return None


class AnthropicStreamDecoder(StreamDecoder):
    """Messages stream events -> neutral events.

    Tool calls are numbered among tool_use blocks only (block indices also count text and thinking
    blocks). `message_delta` carries the stop reason and cumulative usage; both are reported with
    `StreamEnd` at `message_stop`, the only clean end.
    """

    __slots__ = ("_adapter", "_cache_create", "_cache_read", "_done", "_input", "_output", "_stop", "_tools")

    def __init__(self, adapter: Adapter) -> None:
        self._adapter = adapter
        self._tools: dict[int, int] = {}
        """Block index -> tool-call index."""
        self._stop: StopReason = "other"
        self._input = self._cache_read = self._cache_create = self._output = 0
        self._done = False

    def finished(self) -> bool:
        return self._done

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
        model = message.get("model")
        return [StreamStart(model if isinstance(model, str) else "", self._usage())]

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


# ----- app-facing: Messages request -> neutral ------------------------------------------------------
def _text_of(content: object) -> str:
    """A string, or the text blocks of a block list (system prompts, tool results)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(b["text"] for b in content if _is_text_block(b))
    return ""


def _decode_image(source: object) -> Image | None:
    if not isinstance(source, dict):
        return None
    if source.get("type") == "base64" and isinstance(source.get("data"), str):
        return Image(str(source.get("media_type", "")), data=source["data"])
    url = source.get("url")
    if source.get("type") == "url" and isinstance(url, str):
        # URL images carry no media type; a guess from the path, "" when unknown.
        return Image(mimetypes.guess_type(url.split("?", 1)[0])[0] or "", url=url)
    return None  # `file` sources (Files API) exist on Anthropic only


def _decode_input_block(block: object) -> Part | None:
    """One request content block; kinds with no neutral form (documents, thinking, server tools,
    search results) return None and live on in `native` only."""
    if not isinstance(block, dict):
        return None
    kind = block.get("type")
    if kind == "text":
        return Text(block["text"]) if isinstance(block.get("text"), str) else None
    if kind == "image":
        return _decode_image(block.get("source"))
    if kind == "tool_use":
        arguments = block.get("input")
        return ToolCall(str(block.get("id", "")), str(block.get("name", "")),
                        arguments if isinstance(arguments, dict) else {})
    if kind == "tool_result":
        return ToolResult(str(block.get("tool_use_id", "")), _text_of(block.get("content")),
                          is_error=block.get("is_error") is True)
    return None


def _decode_message(raw: object) -> Message | None:
    if not isinstance(raw, dict) or raw.get("role") not in ("user", "assistant"):
        return None
    content = raw.get("content")
    if isinstance(content, str):
        parts: list[Part] = [Text(content)]
    elif isinstance(content, list):
        parts = [p for p in (_decode_input_block(b) for b in content) if p is not None]
    else:
        parts = []
    return Message(raw["role"], parts)


def _decode_tools(raw: object) -> list[ToolSpec]:
    """Custom tools only: server tools (web search, code execution) are Anthropic's own."""
    if not isinstance(raw, list):
        return []
    tools = []
    for tool in raw:
        if not isinstance(tool, dict) or tool.get("type", "custom") != "custom":
            continue
        name, description, schema = tool.get("name"), tool.get("description"), tool.get("input_schema")
        if isinstance(name, str):
            tools.append(ToolSpec(name, description if isinstance(description, str) else None,
                                  schema if isinstance(schema, dict) else {}))
    return tools


_LOSSY_BLOCKS = frozenset({
    "document", "search_result", "container_upload", "server_tool_use",
    "web_search_tool_result", "web_fetch_tool_result", "mcp_tool_use", "mcp_tool_result",
})
"""Request blocks whose content or capability the neutral format cannot carry to another provider.
(Thinking blocks are not here: another model needs no record of Claude's reasoning to answer.)"""


def native_losses(body: dict[str, Any]) -> list[str]:
    """What a translation of this Messages request to another dialect would silently drop: documents,
    Files API images, images inside tool results, server tools. A non-Anthropic target should refuse
    such a request (`untranslatable`) rather than answer a different question."""
    losses: set[str] = set()
    output_config = body.get("output_config")
    if isinstance(output_config, dict) and output_config.get("format") is not None:
        losses.add("Anthropic output_config.format (structured output)")
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else []:
        if isinstance(tool, dict) and tool.get("type", "custom") != "custom":
            losses.add(f"Anthropic server tool {tool.get('name') or tool.get('type')}")
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        for block in content if isinstance(content, list) else []:
            losses.update(_block_losses(block))
    return sorted(losses)


def _block_losses(block: object) -> list[str]:
    if not isinstance(block, dict):
        return []
    kind = block.get("type")
    if kind in _LOSSY_BLOCKS:
        return [f"Anthropic {kind} block"]
    if kind == "image" and _decode_image(block.get("source")) is None:
        return ["Anthropic image from the Files API"]
    content = block.get("content") if kind == "tool_result" else None
    if isinstance(content, list) and not all(_is_text_block(inner) for inner in content):
        return ["Anthropic tool result with non-text content"]
    return []


def _decode_tool_choice(raw: object) -> str | None:
    if not isinstance(raw, dict):
        return None
    kind = raw.get("type")
    if kind in ("auto", "any", "none"):
        return str(kind)
    name = raw.get("name")
    return name if kind == "tool" and isinstance(name, str) else None


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


# ----- app-facing: neutral -> Messages answer and stream --------------------------------------------
def _encode_output_part(part: Text | ToolCall) -> Json:
    if isinstance(part, Text):
        return {"type": "text", "text": part.text}
    return {"type": "tool_use", "id": part.id, "name": part.name, "input": part.arguments}


class AnthropicAppCodec(AppCodec):
    """The `/anthropic/v1/messages` side: Messages requests in, Messages answers and streams out.

    The answer's `model` is the model that actually answered (a fallback's own model), not the one the
    app asked for: SDK types accept any model string, and cost attribution and debugging in the app stay
    truthful. Only when the answer names no model is the app's own reported.
    """

    dialect = DIALECT
    forwarded_headers = ("anthropic-beta", "anthropic-version")

    def decode_request(self, body: dict[str, Any]) -> ChatRequest:
        if not isinstance(body.get("model"), str):
            raise RequestError(400, "model: a string is required")
        if not isinstance(body.get("stream", False), bool):
            raise RequestError(400, "stream: must be a boolean")
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise RequestError(400, "messages: a list is required")
        max_tokens = body.get("max_tokens")
        stop = body.get("stop_sequences")
        system = body.get("system")
        return ChatRequest(
            messages=[m for m in (_decode_message(raw) for raw in messages) if m is not None],
            system=_text_of(system) if system is not None else None,
            max_tokens=max_tokens if _int(max_tokens) else None,
            temperature=_number(body.get("temperature")),
            top_p=_number(body.get("top_p")),
            stop=[s for s in stop if isinstance(s, str)] if isinstance(stop, list) else [],
            tools=_decode_tools(body.get("tools")),
            tool_choice=_decode_tool_choice(body.get("tool_choice")),
            native=NativeBody(DIALECT, body),
            lossy=native_losses(body),
        )

    def encode_response(self, response: ChatResponse, model: str) -> dict[str, Any]:
        native = response.native
        if native is not None and native.dialect == DIALECT:
            return native.body  # Claude's own answer: relayed untouched (thinking blocks and all)
        return {
            "id": _message_id(),
            "type": "message",
            "role": "assistant",
            "model": response.model or model,
            "content": [_encode_output_part(p) for p in response.parts if not isinstance(p, Text) or p.text],
            "stop_reason": _STOP_OUT[response.stop_reason],
            "stop_sequence": None,
            "usage": {
                "input_tokens": response.usage.input_tokens,
                "output_tokens": response.usage.output_tokens,
            },
        }

    def stream_encoder(self, model: str, request: ChatRequest | None = None) -> AppStreamEncoder:
        return AnthropicAppStreamEncoder(model)

    def error_body(self, status: int, error_type: str, message: str) -> dict[str, Any]:
        return {"type": "error", "error": {"type": error_type, "message": message}}


class AnthropicAppStreamEncoder(AppStreamEncoder):
    """Writes a Messages stream for one app response.

    It tracks which content block is open and the next block index in both modes, so a stream can
    start as a relay of Claude's own events and continue with encoded events (a resumed continuation):
    the continuation's `StreamStart` is swallowed and its text extends the open text block.
    """

    __slots__ = ("_blocks", "_ended", "_model", "_next", "_open", "_open_kind", "_started")

    def __init__(self, model: str) -> None:
        self._model = model
        self._started = False
        self._ended = False
        self._open: int | None = None
        """Index of the open content block."""
        self._open_kind: str | None = None
        self._next = 0
        """Index the next content block gets."""
        self._blocks: dict[int, int] = {}
        """Neutral tool-call index -> block index, for the encoded part of the stream."""

    # -- relay: Claude's own events, re-framed ------------------------------------------------------
    def relay(self, frame: StreamFrame) -> bytes:
        sse = frame.sse
        name = sse.event
        if name in ("content_block_start", "content_block_stop", "message_start", "message_stop"):
            self._track(name, sse.data)
        # A data-only event stays data-only: naming it "message" would change what the SDK sees.
        return _frame(None if name == "message" else name, sse.data)

    def _track(self, name: str, data: str) -> None:
        if name == "message_start":
            self._started = True
        elif name == "message_stop":
            self._ended = True
        elif name == "content_block_stop":
            self._open = self._open_kind = None
        else:
            try:
                parsed = orjson.loads(data)
                index, kind = int(parsed["index"]), str(parsed["content_block"]["type"])
            except (ValueError, KeyError, TypeError):
                return  # the decoder already refused it; nothing to track
            self._open, self._open_kind = index, kind
            self._next = max(self._next, index + 1)

    # -- encode: neutral events ---------------------------------------------------------------------
    def encode(self, event: StreamEvent) -> bytes:
        if self._ended:
            return b""
        if isinstance(event, StreamStart):
            return b"" if self._started else self._start(event.model, event.usage)
        out = b"" if self._started else self._start("", Usage())
        if isinstance(event, TextDelta):
            return out + self._text(event.text)
        if isinstance(event, ToolCallStart):
            return out + self._tool_start(event)
        if isinstance(event, ToolCallDelta):
            return out + self._tool_delta(event)
        return out + self._end(event)

    def _start(self, model: str, usage: Usage) -> bytes:
        self._started = True
        message: Json = {
            "id": _message_id(),
            "type": "message",
            "role": "assistant",
            "model": model or self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens},
        }
        return _json_frame("message_start", {"type": "message_start", "message": message})

    def _text(self, text: str) -> bytes:
        if not text:
            return b""
        out = b""
        if self._open_kind != "text":
            out = self._open_block({"type": "text", "text": ""})
        delta = {"type": "text_delta", "text": text}
        return out + _json_frame("content_block_delta", {"type": "content_block_delta", "index": self._open,
                                                         "delta": delta})

    def _tool_start(self, event: ToolCallStart) -> bytes:
        out = self._open_block({"type": "tool_use", "id": event.id, "name": event.name, "input": {}})
        if self._open is not None:
            self._blocks[event.index] = self._open
        return out

    def _tool_delta(self, event: ToolCallDelta) -> bytes:
        index = self._blocks.get(event.index)
        if index is None or not event.arguments:
            return b""  # arguments of a call that never started cannot be placed
        delta = {"type": "input_json_delta", "partial_json": event.arguments}
        return _json_frame("content_block_delta", {"type": "content_block_delta", "index": index,
                                                   "delta": delta})

    def _end(self, event: StreamEnd) -> bytes:
        self._ended = True
        usage: Json = {"output_tokens": event.usage.output_tokens}
        if event.usage.input_tokens:
            usage["input_tokens"] = event.usage.input_tokens  # OpenAI reports input only at the end
        delta = {"stop_reason": _STOP_OUT[event.stop_reason], "stop_sequence": None}
        return (
            self._close_block()
            + _json_frame("message_delta", {"type": "message_delta", "delta": delta, "usage": usage})
            + _json_frame("message_stop", {"type": "message_stop"})
        )

    def _open_block(self, block: Json) -> bytes:
        out = self._close_block()
        index = self._next
        self._next += 1
        self._open, self._open_kind = index, block["type"]
        return out + _json_frame("content_block_start", {"type": "content_block_start", "index": index,
                                                         "content_block": block})

    def _close_block(self) -> bytes:
        if self._open is None:
            return b""
        index = self._open
        self._open = self._open_kind = None
        return _json_frame("content_block_stop", {"type": "content_block_stop", "index": index})

    def error(self, error_type: str, message: str) -> bytes:
        self._ended = True
        return _json_frame("error", {"type": "error", "error": {"type": error_type, "message": message}})
