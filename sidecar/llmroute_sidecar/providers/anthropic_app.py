"""The `/anthropic/v1/messages` side of the Messages API: what an app's Anthropic SDK sends and expects.

`AnthropicAppCodec` reads an SDK's Messages request into the neutral form (keeping the app's own body for
Anthropic targets, and noting what a translation to another dialect would lose), and writes whatever
answered (Claude itself, or a translated fallback) as a Messages body or SSE stream the official SDK
accepts. The upstream side of the dialect is `anthropic.py`, whose wire pieces this reuses.
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
from ..sse import json_frame
from .anthropic import DIALECT, Json, is_text_block, tool_use_call
from .base import AppCodec, AppStreamEncoder, StreamFrame
from .shared import int_or_zero, malformed_item, number_or_none

_STOP_OUT: dict[StopReason, str] = {
    "end_turn": "end_turn",
    "max_tokens": "max_tokens",
    "stop_sequence": "stop_sequence",
    "tool_use": "tool_use",
    "refusal": "refusal",
    # `pause_turn` would make an SDK loop re-send the turn; a plain end is the honest closest value.
    "other": "end_turn",
}


# ----- small wire helpers ---------------------------------------------------------------------------
def _message_id() -> str:
    return "msg_" + uuid.uuid4().hex


def _frame(event: str | None, data: str | bytes) -> bytes:
    """One SSE frame; multi-line data (legal SSE, joined by the parser) is split back into lines."""
    text = data.decode() if isinstance(data, bytes) else data
    lines = "".join(f"data: {line}\n" for line in text.split("\n"))
    head = f"event: {event}\n" if event is not None else ""
    return (head + lines + "\n").encode()


# ----- Messages request -> neutral ------------------------------------------------------------------
def _text_of(content: object) -> str:
    """A string, or the text blocks of a block list (system prompts, tool results)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(b["text"] for b in content if is_text_block(b))
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
        return tool_use_call(block)
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
_TRANSLATED_BLOCKS = frozenset({"text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking"})
"""Request blocks a translation carries (thinking ones by dropping them, see above); any other type, one
from a newer API version included, makes the request untranslatable rather than silently shorter."""


def malformed(body: dict[str, Any]) -> str | None:
    """The first part of `system` / `messages` no Messages API can read, as `path: problem` (a 400 at once:
    Anthropic refuses it too, and a translation would drop it and answer a different question)."""
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        problem = _malformed_blocks(system, "system")
        if problem is not None:
            return problem
    for index, message in enumerate(body["messages"]):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            return f"{where}: must be an object"
        if not isinstance(message.get("role"), str):
            return f"{where}.role: must be a string"
        content = message.get("content")
        if not isinstance(content, str):
            problem = _malformed_blocks(content, f"{where}.content")
            if problem is not None:
                return problem
    return None


def _malformed_blocks(content: object, where: str) -> str | None:
    if not isinstance(content, list):
        return f"{where}: must be a string or a list of content blocks"
    return malformed_item(content, where, "content block")


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
        role = message.get("role") if isinstance(message, dict) else None
        if isinstance(role, str) and role not in ("user", "assistant"):
            losses.add(f"Anthropic {role} message")
        content = message.get("content") if isinstance(message, dict) else None
        for block in content if isinstance(content, list) else []:
            losses.update(_block_losses(block))
    return sorted(losses)


def _block_losses(block: object) -> list[str]:
    if not isinstance(block, dict):
        return []
    kind = block.get("type")
    if kind in _LOSSY_BLOCKS or kind not in _TRANSLATED_BLOCKS:
        return [f"Anthropic {kind} block"]
    if kind == "image" and _decode_image(block.get("source")) is None:
        return ["Anthropic image from the Files API"]
    content = block.get("content") if kind == "tool_result" else None
    if isinstance(content, list) and not all(is_text_block(inner) for inner in content):
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


# ----- neutral -> Messages answer and stream --------------------------------------------------------
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
        problem = malformed(body)
        if problem is not None:
            raise RequestError(400, problem)
        max_tokens = body.get("max_tokens")
        stop = body.get("stop_sequences")
        system = body.get("system")
        return ChatRequest(
            messages=[m for m in (_decode_message(raw) for raw in messages) if m is not None],
            system=_text_of(system) if system is not None else None,
            max_tokens=max_tokens if int_or_zero(max_tokens) else None,
            temperature=number_or_none(body.get("temperature")),
            top_p=number_or_none(body.get("top_p")),
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
        return json_frame("message_start", {"type": "message_start", "message": message})

    def _text(self, text: str) -> bytes:
        if not text:
            return b""
        out = b""
        if self._open_kind != "text":
            out = self._open_block({"type": "text", "text": ""})
        delta = {"type": "text_delta", "text": text}
        return out + json_frame("content_block_delta", {"type": "content_block_delta", "index": self._open,
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
        return json_frame("content_block_delta", {"type": "content_block_delta", "index": index,
                                                  "delta": delta})

    def _end(self, event: StreamEnd) -> bytes:
        self._ended = True
        usage: Json = {"output_tokens": event.usage.output_tokens}
        if event.usage.input_tokens:
            usage["input_tokens"] = event.usage.input_tokens  # OpenAI reports input only at the end
        delta = {"stop_reason": _STOP_OUT[event.stop_reason], "stop_sequence": None}
        return (
            self._close_block()
            + json_frame("message_delta", {"type": "message_delta", "delta": delta, "usage": usage})
            + json_frame("message_stop", {"type": "message_stop"})
        )

    def _open_block(self, block: Json) -> bytes:
        out = self._close_block()
        index = self._next
        self._next += 1
        self._open, self._open_kind = index, block["type"]
        return out + json_frame("content_block_start", {"type": "content_block_start", "index": index,
                                                        "content_block": block})

    def _close_block(self) -> bytes:
        if self._open is None:
            return b""
        index = self._open
        self._open = self._open_kind = None
        return json_frame("content_block_stop", {"type": "content_block_stop", "index": index})

    def error(self, error_type: str, message: str) -> bytes:
        self._ended = True
        return json_frame("error", {"type": "error", "error": {"type": error_type, "message": message}})
