"""The `/openai/v1/chat/completions` side of Chat Completions: what an app's OpenAI SDK sends and expects.

`OpenAIAppCodec` reads an SDK's Chat Completions request into the neutral form (keeping the app's own body
for same-dialect targets, and noting what a translation would lose) and writes whatever answered (OpenAI
itself, or a translated fallback) as a `chat.completion` body or a `chat.completion.chunk` stream the
official SDK accepts. The upstream side of the dialect is `openai.py`, whose wire pieces this reuses.

Choices that are not obvious from the wire format:
- Upstream streams always carry usage (`openai.py` asks for it); the usage-only chunk this produces is
  dropped on the way back to an app that did not ask for it, because apps commonly index
  `chunk.choices[0]` and would crash on an empty `choices`.
- Answers keep the model that really answered (`resp.model`), as OpenAI itself reports a snapshot name
  rather than the alias asked for; the `llmroute-target` header says which target that was.
"""

from __future__ import annotations

import time
from mimetypes import guess_type
from typing import Any
from urllib.parse import urlsplit

import orjson

from ..errors import RequestError
from ..messages import (
    ChatRequest,
    ChatResponse,
    Image,
    Message,
    NativeBody,
    Part,
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
from ..sse import frame as sse_frame
from ..sse import json_frame
from .base import AppCodec, AppStreamEncoder, StreamFrame
from .openai import DIALECT, Body, content_text, decode_tool_calls, encode_tool_call, new_id
from .shared import int_or_zero, malformed_item, number_or_none, str_or_empty

_DONE = b"data: [DONE]\n\n"
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


# ----- the codec -----------------------------------------------------------------------------------


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
        problem = malformed(messages)
        if problem is not None:
            raise RequestError(400, problem)
        system, neutral = _decode_messages(messages)
        limit = body.get("max_completion_tokens")
        if limit is None:
            limit = body.get("max_tokens")
        return ChatRequest(
            messages=neutral,
            system=system,
            max_tokens=limit if isinstance(limit, int) and not isinstance(limit, bool) else None,
            temperature=number_or_none(body.get("temperature")),
            top_p=number_or_none(body.get("top_p")),
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


# ----- request decoding ----------------------------------------------------------------------------


_NEUTRAL_PARTS = frozenset({"text", "image_url"})
_TRANSLATED_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
"""Roles a translation carries; any other (`function` is legacy, others from a newer API version) makes the
request untranslatable rather than silently shorter."""


def malformed(messages: list[Any]) -> str | None:
    """The first message no Chat Completions API can read, as `path: problem` (a 400 at once: OpenAI
    refuses it too, and a translation would drop it and answer a different question)."""
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            return f"{where}: must be an object"
        if not isinstance(message.get("role"), str):
            return f"{where}.role: must be a string"
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            return f"{where}.content: must be a string, null or a list of content parts"
        if (problem := malformed_item(content, f"{where}.content", "content part")) is not None:
            return problem
    return None


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
    if message.get("role") not in _TRANSLATED_ROLES:
        return [f"OpenAI {message.get('role')} message"]
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
            text = content_text(raw.get("content"))
            if text:
                system.append(text)
        elif role == "user":
            _append(out, "user", _decode_user_content(raw.get("content")))
        elif role == "assistant":
            _append(out, "assistant", _decode_assistant(raw, tool_names))
        elif role == "tool":
            call_id = str_or_empty(raw.get("tool_call_id"))
            content = content_text(raw.get("content"))
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
    text = content_text(raw.get("content"))
    if text:
        parts.append(Text(text))
    for call in decode_tool_calls(raw):
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


# ----- response and stream encoding ----------------------------------------------------------------


def _completion_body(response: ChatResponse, model: str) -> Body:
    text = response.text
    calls = [part for part in response.parts if isinstance(part, ToolCall)]
    message: Body = {"role": "assistant", "content": text if text or not calls else None, "refusal": None}
    if calls:
        message["tool_calls"] = [encode_tool_call(call) for call in calls]
    return {
        "id": new_id("chatcmpl-"),
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
            self._id = str_or_empty(chunk.get("id")) or new_id("chatcmpl-")
            created = chunk.get("created")
            self._created = int_or_zero(created) or int(time.time())
            self._model = str_or_empty(chunk.get("model")) or self._model
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
        self._id = new_id("chatcmpl-")
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
