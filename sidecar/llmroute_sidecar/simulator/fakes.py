"""Fault-injecting fake LLM providers that speak the providers' real wire formats.

Why this exists: llmroute's job is to behave correctly while a provider misbehaves (429/529 storms, resets,
hangs, truncated or errored streams, CDN HTML pages, gzip bodies). Real providers cannot be made to fail on
cue, so the sidecar's tests and the ``llmroute demo`` / ``llmroute simulate`` scenarios run against
:class:`FakeProvider` instead: one loopback aiohttp server that answers the Anthropic Messages, OpenAI Chat
Completions and Gemini generateContent APIs (chosen by path), scripted per request by a FIFO queue of
steps, a ``decide`` hook, or a default step, and that records every request it receives.

The shapes follow the payload captures of real providers (error envelopes, SSE event sequences, headers);
tests/sidecar/test_fakes.py drives the fakes with the official SDKs to prove they are faithful.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip as gzip_codec
import itertools
import json
import re
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, NoReturn, Self, TypeAlias

from aiohttp import web

__all__ = [
    "CutStream",
    "Dialect",
    "Fail",
    "FakeProvider",
    "Garbage",
    "Hang",
    "Html",
    "LoopbackServer",
    "NoTerminal",
    "Outcome",
    "PingStream",
    "RecordedRequest",
    "Reply",
    "Reset",
    "ServerStopping",
    "StallStream",
    "Step",
    "StreamError",
    "ToolCall",
    "cdn_error_page",
    "close_transport",
    "error_payload",
    "go_duration",
    "ratelimit_headers",
]

Dialect: TypeAlias = Literal["anthropic", "openai", "gemini"]
Outcome: TypeAlias = Literal["pending", "completed", "disconnected", "aborted"]
Json: TypeAlias = Any

# --------------------------------------------------------------------------------------------------------
# Steps: what the fake does with one request.
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    """A tool call to answer with (only when the request declares tools).

    ``name=None`` calls the first tool the request declares.
    """

    name: str | None = None
    arguments: Mapping[str, Any] = field(default_factory=dict)
    id: str | None = None


@dataclass(frozen=True)
class Reply:
    """A successful answer (HTTP 200), as JSON or as an SSE stream depending on the request.

    ``text=None`` answers the fake's ``reply_text`` or, by default, ``"echo: <last user text>"`` (nothing
    when a tool call is answered). ``delay`` is waited before the response headers, ``chunk_delay`` between
    stream deltas; ``chunks`` splits the text into that many deltas (default: one delta per word).
    ``stop_reason`` overrides the native stop/finish reason (e.g. ``"max_tokens"``, ``"content_filter"``,
    ``"SAFETY"``). ``gzip`` (None: the fake's setting) gzip-encodes JSON bodies like Anthropic does.
    """

    text: str | None = None
    tool_call: ToolCall | None = None
    delay: float = 0.0
    chunk_delay: float = 0.0
    chunks: int | None = None
    stop_reason: str | None = None
    gzip: bool | None = None
    headers: Mapping[str, str] | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None


@dataclass(frozen=True, kw_only=True)
class CutStream(Reply):
    """Send ``after_chunks`` deltas, then end without the terminal event.

    ``clean=False`` drops the TCP connection mid-body; ``clean=True`` ends the HTTP body properly (what a
    proxy that swallows the upstream error does), which SDKs cannot tell from success. A non-streaming
    request gets half its JSON body (``clean=True``: a complete 200 response with truncated JSON).
    """

    after_chunks: int = 1
    clean: bool = False


@dataclass(frozen=True, kw_only=True)
class StreamError(Reply):
    """Send ``after_chunks`` deltas, then an in-band error event (``error_type`` is Anthropic's name; the
    OpenAI and Gemini frames carry the equivalent). A non-streaming request gets the matching HTTP error."""

    after_chunks: int = 1
    error_type: str = "overloaded_error"
    message: str | None = None


@dataclass(frozen=True, kw_only=True)
class StallStream(Reply):
    """Send ``after_chunks`` deltas, then nothing while keeping the connection open (until the client
    leaves or the fake stops). A non-streaming request gets half its JSON body, then silence."""

    after_chunks: int = 1


@dataclass(frozen=True, kw_only=True)
class PingStream(Reply):
    """Send ``after_chunks`` deltas, then only keep-alive pings (Anthropic ``ping`` events, SSE comments
    for the others) every ``ping_interval`` seconds until the client leaves: bytes flow, content does
    not. ``after_chunks=0``: pings from the start, no content at all. A plain request is answered."""

    after_chunks: int = 1
    ping_interval: float = 1.0


@dataclass(frozen=True)
class NoTerminal(Reply):
    """A complete stream (stop reason and usage sent) whose body ends cleanly without the terminal event:
    OpenAI's ``data: [DONE]``, Anthropic's ``message_stop`` (Gemini has none to leave out). Several
    OpenAI-compatible servers end their streams so. A plain request is answered as usual."""


@dataclass(frozen=True)
class Fail:
    """An HTTP error in the provider's own envelope for the dialect (or ``body`` verbatim).

    ``error_type`` overrides Anthropic's ``error.type`` / OpenAI's ``error.type`` / Gemini's ``error.status``;
    ``code`` sets OpenAI's ``error.code``. ``retry_after`` (seconds, or any string such as an HTTP date)
    and ``retry_after_ms`` become headers; for Gemini a numeric ``retry_after`` also adds a RetryInfo detail.
    """

    status: int = 500
    retry_after: float | str | None = None
    retry_after_ms: float | None = None
    body: bytes | str | Mapping[str, Any] | None = None
    headers: Mapping[str, str] | None = None
    delay: float = 0.0
    error_type: str | None = None
    message: str | None = None
    code: str | None = None
    gzip: bool | None = None


@dataclass(frozen=True)
class Hang:
    """Accept the request and never answer until the client goes away (or the fake stops).

    ``after_headers=True`` sends the 200 headers first (a stream that never emits its first event)."""

    after_headers: bool = False
    delay: float = 0.0


@dataclass(frozen=True)
class Reset:
    """Reset the TCP connection (RST) before any response byte."""

    delay: float = 0.0


@dataclass(frozen=True)
class Html:
    """A CDN HTML error page (Cloudflare style, ``text/html``), e.g. 520, 522, 524, 403, 413."""

    status: int = 520
    title: str | None = None
    delay: float = 0.0


@dataclass(frozen=True)
class Garbage:
    """Arbitrary bytes with the given status and content type (e.g. 200 with empty or partial JSON)."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    delay: float = 0.0


Step: TypeAlias = Reply | Fail | Hang | Reset | Html | Garbage
Decider: TypeAlias = Callable[["RecordedRequest"], Step | None]


@dataclass
class RecordedRequest:
    """One request as the fake received it, and what became of it.

    ``headers`` has lower-case names. ``outcome``: ``pending`` while being answered; ``completed`` when
    the fake sent everything its step scripted; ``disconnected`` when the client went away first (a
    cancelled loser, a client timeout); ``aborted`` when the fake itself dropped the connection
    (``Reset``, ``CutStream``, or the fake stopping).
    """

    index: int
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    raw_body: bytes
    body: Json
    received_at: float
    dialect: Dialect | None
    model: str | None
    stream: bool
    step: Step | None = None
    status: int | None = None
    outcome: Outcome = "pending"
    chunks_sent: int = 0
    finished_at: float | None = None

    @property
    def disconnected(self) -> bool:
        return self.outcome == "disconnected"

    @property
    def completed(self) -> bool:
        return self.outcome == "completed"

    @property
    def finished(self) -> bool:
        return self.outcome != "pending"

    @property
    def prefill(self) -> str | None:
        """Text of a trailing Anthropic ``assistant`` message (a prefill), if any."""
        return _anthropic_prefill(self.body) if self.dialect == "anthropic" else None

    @property
    def last_user_text(self) -> str:
        return _last_user_text(self.dialect, self.body)


# --------------------------------------------------------------------------------------------------------
# Reading requests.
# --------------------------------------------------------------------------------------------------------


def _block_text(content: Json) -> str:
    """Text of an Anthropic/OpenAI message ``content`` (a string or a list of typed blocks/parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(b.get("text", "")) for b in content if isinstance(b, dict) and b.get("type") == "text"
        )
    return ""


def _gemini_parts_text(content: Json) -> str:
    if not isinstance(content, dict):
        return ""
    parts = content.get("parts")
    if not isinstance(parts, list):
        return ""
    return "".join(str(p.get("text", "")) for p in parts if isinstance(p, dict))


def _messages(dialect: Dialect | None, body: Json) -> list[tuple[str, str]]:
    """(role, text) of every message, system prompt first, roles normalised to user/assistant/system."""
    if not isinstance(body, dict):
        return []
    out: list[tuple[str, str]] = []
    if dialect == "gemini":
        system = body.get("systemInstruction", body.get("system_instruction"))
        if system is not None:
            out.append(("system", _gemini_parts_text(system)))
        for c in body.get("contents") or []:
            role = "assistant" if isinstance(c, dict) and c.get("role") == "model" else "user"
            out.append((role, _gemini_parts_text(c)))
        return out
    if dialect == "anthropic" and body.get("system") is not None:
        out.append(("system", _block_text(body["system"])))
    for m in body.get("messages") or []:
        if isinstance(m, dict):
            out.append((str(m.get("role", "")), _block_text(m.get("content"))))
    return out


def _last_user_text(dialect: Dialect | None, body: Json) -> str:
    for role, text in reversed(_messages(dialect, body)):
        if role == "user" and text:
            return text
    return ""


def _anthropic_prefill(body: Json) -> str | None:
    if not isinstance(body, dict):
        return None
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        return None
    content = last.get("content")
    if isinstance(content, list) and any(isinstance(b, dict) and b.get("type") != "text" for b in content):
        return None
    return _block_text(content)


def _declared_tools(dialect: Dialect | None, body: Json) -> list[str]:
    if not isinstance(body, dict) or not isinstance(body.get("tools"), list):
        return []
    names: list[str] = []
    for tool in body["tools"]:
        if not isinstance(tool, dict):
            continue
        if dialect == "anthropic":
            names.append(str(tool.get("name", "")))
        elif dialect == "openai":
            names.append(str((tool.get("function") or {}).get("name", "")))
        else:
            decls = tool.get("functionDeclarations", tool.get("function_declarations")) or []
            names.extend(str(d.get("name", "")) for d in decls if isinstance(d, dict))
    return names


def _words(text: str) -> int:
    return len(text.split())


def _split_text(text: str, chunks: int | None) -> list[str]:
    if not text:
        return []
    if chunks is None:
        return re.findall(r"\S+\s*|\s+", text)
    n = max(1, min(chunks, len(text)))
    size, extra = divmod(len(text), n)
    pieces, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        pieces.append(text[start:end])
        start = end
    return pieces


def _split_json(data: str, pieces: int = 3) -> list[str]:
    return _split_text(data, min(pieces, len(data)))


# --------------------------------------------------------------------------------------------------------
# Error envelopes.
# --------------------------------------------------------------------------------------------------------

_ANTHROPIC_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Your credit balance is too low to access the Anthropic API."),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "The requested resource could not be found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit."),
    500: ("api_error", "Internal server error"),
    504: ("timeout_error", "Request timeout"),
    529: ("overloaded_error", "Overloaded"),
}
_STATUS_FOR_ANTHROPIC_TYPE = {etype: status for status, (etype, _) in _ANTHROPIC_ERRORS.items()}

_OPENAI_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory",
          "Country, region, or territory not supported"),
    404: ("invalid_request_error", "model_not_found",
          "The model does not exist or you do not have access to it."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests. Please try again later."),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}

_GEMINI_ERRORS: dict[int, tuple[str, str]] = {
    400: ("INVALID_ARGUMENT", "Request contains an invalid argument."),
    401: ("UNAUTHENTICATED", "Request is missing required authentication credential."),
    403: ("PERMISSION_DENIED", "The caller does not have permission"),
    404: ("NOT_FOUND", "Requested entity was not found."),
    429: ("RESOURCE_EXHAUSTED",
          "You exceeded your current quota, please check your plan and billing details."),
    500: ("INTERNAL", "An internal error has occurred. Please retry or report in "
          "https://developers.generativeai.google/guide/troubleshooting"),
    503: ("UNAVAILABLE", "The model is overloaded. Please try again later."),
    504: ("DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
}


def error_payload(
    dialect: Dialect,
    status: int,
    *,
    error_type: str | None = None,
    message: str | None = None,
    code: str | None = None,
    retry_after: float | None = None,
    request_id: str | None = None,
) -> dict[str, Any]:
    """The provider's JSON error envelope for ``status`` (also used for in-band stream errors)."""
    if dialect == "anthropic":
        default_type, default_msg = _ANTHROPIC_ERRORS.get(
            status, ("api_error", "Internal server error") if status >= 500 else ("invalid_request_error",
                                                                                 "Invalid request.")
        )
        out: dict[str, Any] = {
            "type": "error",
            "error": {"type": error_type or default_type, "message": message or default_msg},
        }
        if request_id:
            out["request_id"] = request_id
        return out
    if dialect == "openai":
        otype, ocode, omsg = _OPENAI_ERRORS.get(
            status, ("server_error", None, "The server had an error processing your request.")
            if status >= 500 else ("invalid_request_error", None, "Invalid request.")
        )
        return {"error": {"message": message or omsg, "type": error_type or otype, "param": None,
                          "code": code if code is not None else ocode}}
    gstatus, gmsg = _GEMINI_ERRORS.get(status, ("INTERNAL" if status >= 500 else "INVALID_ARGUMENT", "Error"))
    err: dict[str, Any] = {"code": status, "message": message or gmsg, "status": error_type or gstatus}
    if retry_after is not None:
        err["details"] = [
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry_after:g}s"}]
    return {"error": err}


def ratelimit_headers(
    dialect: Dialect, limits: Mapping[str, tuple[int, int, float]], wall: float | None = None
) -> dict[str, str]:
    """Rate-limit headers as the provider sends them on every answer, from ``dimension -> (limit, remaining,
    seconds to reset)``. Anthropic: ``anthropic-ratelimit-{dimension}-{limit,remaining,reset}`` with the
    reset as an RFC 3339 time (from ``wall``, default now); OpenAI: ``x-ratelimit-{limit,remaining,reset}-
    {dimension}`` (``requests``, ``tokens``) with the reset as a Go duration. Gemini sends none."""
    headers: dict[str, str] = {}
    now = time.time() if wall is None else wall
    for dimension, (limit, remaining, reset_in) in limits.items():
        if dialect == "anthropic":
            reset = datetime.fromtimestamp(now + reset_in, UTC).isoformat(timespec="milliseconds")
            prefix = f"anthropic-ratelimit-{dimension}"
            headers.update({f"{prefix}-limit": str(limit), f"{prefix}-remaining": str(remaining),
                            f"{prefix}-reset": reset.replace("+00:00", "Z")})
        elif dialect == "openai" and dimension in ("requests", "tokens"):
            headers.update({f"x-ratelimit-limit-{dimension}": str(limit),
                            f"x-ratelimit-remaining-{dimension}": str(remaining),
                            f"x-ratelimit-reset-{dimension}": go_duration(reset_in)})
    return headers


def go_duration(seconds: float) -> str:
    """Go's ``time.Duration`` spelling, as OpenAI's reset headers use it: ``6m0s``, ``1.5s``, ``20ms``."""
    millis = max(0, round(seconds * 1000))
    if millis < 1000:
        return f"{millis}ms"
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


_CDN_TITLES = {
    403: "Attention Required! | Cloudflare",
    413: "413 Request Entity Too Large",
    502: "502: Bad gateway",
    520: "520: Web server is returning an unknown error",
    521: "521: Web server is down",
    522: "522: Connection timed out",
    523: "523: Origin is unreachable",
    524: "524: A timeout occurred",
}
_HOSTS: dict[Dialect | None, str] = {
    "anthropic": "api.anthropic.com",
    "openai": "api.openai.com",
    "gemini": "generativelanguage.googleapis.com",
    None: "api.anthropic.com",
}


def cdn_error_page(status: int, title: str | None, host: str) -> str:
    """A Cloudflare-style HTML error page (what a CDN in front of a provider answers)."""
    title = title or f"{host} | {_CDN_TITLES.get(status, f'{status}: Error')}"
    return (
        "<!DOCTYPE html>\n<!--[if lt IE 7]> <html class=\"no-js ie6 oldie\" lang=\"en-US\"> <![endif]-->\n"
        f"<html lang=\"en-US\">\n<head>\n<title>{title}</title>\n<meta charset=\"UTF-8\" />\n"
        "<meta name=\"robots\" content=\"noindex, nofollow\" />\n</head>\n<body>\n<div id=\"cf-wrapper\">\n"
        f"<div id=\"cf-error-details\"><h1><span class=\"inline-block\">Error</span>\n"
        f"<span class=\"code-label\">Error code {status}</span></h1>\n"
        f"<div class=\"cf-error-source\">{host}</div>\n"
        "<p>Cloudflare Ray ID: <strong class=\"font-semibold\">8f2b1c0d9e8a7b6c</strong></p>\n"
        "</div>\n</div>\n</body>\n</html>\n"
    )


# --------------------------------------------------------------------------------------------------------
# Encoding answers: one JSON encoder and one SSE frame encoder per dialect.
# --------------------------------------------------------------------------------------------------------

FrameKind: TypeAlias = Literal["meta", "delta", "end"]
Frame: TypeAlias = tuple[FrameKind, bytes]


@dataclass(frozen=True)
class _Tool:
    id: str
    name: str
    arguments: Mapping[str, Any]


@dataclass(frozen=True)
class _Answer:
    id: str
    model: str
    text: str
    pieces: list[str]
    tool: _Tool | None
    input_tokens: int
    output_tokens: int
    stop_reason: str | None
    include_usage: bool


def _dumps(obj: Json) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _sse(data: Json, event: str | None = None, eol: str = "\n") -> bytes:
    head = f"event: {event}{eol}" if event else ""
    payload = data if isinstance(data, str) else _dumps(data)
    return f"{head}data: {payload}{eol}{eol}".encode()


def _anthropic_usage(a: _Answer) -> dict[str, int]:
    return {"input_tokens": a.input_tokens, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
            "output_tokens": a.output_tokens}


def _anthropic_stop(a: _Answer) -> str:
    return a.stop_reason or ("tool_use" if a.tool else "end_turn")


def _anthropic_json(a: _Answer) -> Json:
    content: list[Json] = [{"type": "text", "text": a.text}] if a.text else []
    if a.tool:
        content.append(
            {"type": "tool_use", "id": a.tool.id, "name": a.tool.name, "input": dict(a.tool.arguments)})
    return {"id": a.id, "type": "message", "role": "assistant", "model": a.model, "content": content,
            "stop_reason": _anthropic_stop(a), "stop_sequence": None, "usage": _anthropic_usage(a)}


def _anthropic_frames(a: _Answer) -> list[Frame]:
    def ev(kind: FrameKind, name: str, data: Json) -> Frame:
        return kind, _sse({"type": name, **data}, event=name)

    start_usage = {**_anthropic_usage(a), "output_tokens": 1}
    frames = [ev("meta", "message_start", {"message": {
        "id": a.id, "type": "message", "role": "assistant", "content": [], "model": a.model,
        "stop_reason": None, "stop_sequence": None, "usage": start_usage}})]
    index = 0
    if a.pieces or a.tool is None:
        text_block = {"type": "text", "text": ""}
        frames.append(ev("meta", "content_block_start", {"index": 0, "content_block": text_block}))
        frames.append(ev("meta", "ping", {}))
        frames += [
            ev("delta", "content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": p}})
            for p in a.pieces]
        frames.append(ev("meta", "content_block_stop", {"index": 0}))
        index = 1
    if a.tool:
        block = {"type": "tool_use", "id": a.tool.id, "name": a.tool.name, "input": {}}
        frames.append(ev("meta", "content_block_start", {"index": index, "content_block": block}))
        if index == 0:
            frames.append(ev("meta", "ping", {}))
        frames += [ev("delta", "content_block_delta",
                      {"index": index, "delta": {"type": "input_json_delta", "partial_json": p}})
                   for p in _split_json(_dumps(dict(a.tool.arguments)))]
        frames.append(ev("meta", "content_block_stop", {"index": index}))
    frames.append(ev("end", "message_delta", {
        "delta": {"stop_reason": _anthropic_stop(a), "stop_sequence": None},
        "usage": {"output_tokens": a.output_tokens}}))
    frames.append(ev("end", "message_stop", {}))
    return frames


def _openai_usage(a: _Answer) -> dict[str, Any]:
    return {"prompt_tokens": a.input_tokens, "completion_tokens": a.output_tokens,
            "total_tokens": a.input_tokens + a.output_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}


def _openai_tool_call(a: _Tool) -> dict[str, Any]:
    return {"id": a.id, "type": "function",
            "function": {"name": a.name, "arguments": _dumps(dict(a.arguments))}}


def _openai_finish(a: _Answer) -> str:
    return a.stop_reason or ("tool_calls" if a.tool else "stop")


def _openai_json(a: _Answer) -> Json:
    message: dict[str, Any] = {"role": "assistant", "content": a.text if (a.text or not a.tool) else None,
                               "refusal": None, "annotations": []}
    if a.tool:
        message["tool_calls"] = [_openai_tool_call(a.tool)]
    return {"id": a.id, "object": "chat.completion", "created": int(time.time()), "model": a.model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": _openai_finish(a)}],
            "usage": _openai_usage(a), "service_tier": "default", "system_fingerprint": "fp_llmroute_fake"}


def _openai_frames(a: _Answer) -> list[Frame]:
    created = int(time.time())

    def chunk(kind: FrameKind, delta: Json, finish: str | None = None) -> Frame:
        data: dict[str, Any] = {
            "id": a.id, "object": "chat.completion.chunk", "created": created, "model": a.model,
            "service_tier": "default", "system_fingerprint": "fp_llmroute_fake",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if a.include_usage:
            data["usage"] = None
        return kind, _sse(data)

    first: dict[str, Any] = {"role": "assistant", "content": "" if (a.pieces or not a.tool) else None,
                             "refusal": None}
    frames = [chunk("meta", first)]
    frames += [chunk("delta", {"content": p}) for p in a.pieces]
    if a.tool:
        call = _openai_tool_call(a.tool)
        call["function"]["arguments"] = ""
        frames.append(chunk("meta", {"tool_calls": [{"index": 0, **call}]}))
        frames += [chunk("delta", {"tool_calls": [{"index": 0, "function": {"arguments": p}}]})
                   for p in _split_json(_dumps(dict(a.tool.arguments)))]
    frames.append(chunk("end", {}, _openai_finish(a)))
    if a.include_usage:
        frames.append(("end", _sse({
            "id": a.id, "object": "chat.completion.chunk", "created": created, "model": a.model,
            "service_tier": "default", "system_fingerprint": "fp_llmroute_fake", "choices": [],
            "usage": _openai_usage(a)})))
    frames.append(("end", _sse("[DONE]")))
    return frames


# Gemini's alt=sse stream separates events with CRLF pairs (unlike Anthropic/OpenAI); parsers must cope.
_GEMINI_EOL = "\r\n"


def _gemini_usage(a: _Answer, final: bool = True) -> dict[str, Any]:
    usage: dict[str, Any] = {"promptTokenCount": a.input_tokens,
                             "promptTokensDetails": [{"modality": "TEXT", "tokenCount": a.input_tokens}]}
    if final:
        usage["candidatesTokenCount"] = a.output_tokens
    usage["totalTokenCount"] = a.input_tokens + (a.output_tokens if final else 0)
    return usage


def _gemini_response(a: _Answer, parts: list[Json], finish: bool) -> Json:
    candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
    if finish:
        candidate["finishReason"] = a.stop_reason or "STOP"
    return {"candidates": [candidate], "usageMetadata": _gemini_usage(a, final=finish),
            "modelVersion": a.model, "responseId": a.id}


def _gemini_parts(a: _Answer) -> list[Json]:
    parts: list[Json] = [{"text": a.text}] if (a.text or not a.tool) else []
    if a.tool:
        parts.append({"functionCall": {"name": a.tool.name, "args": dict(a.tool.arguments)}})
    return parts


def _gemini_json(a: _Answer) -> Json:
    return _gemini_response(a, _gemini_parts(a), finish=True)


def _gemini_frames(a: _Answer) -> list[Frame]:
    def frame(kind: FrameKind, parts: list[Json], finish: bool = False) -> Frame:
        return kind, _sse(_gemini_response(a, parts, finish), eol=_GEMINI_EOL)

    frames = [frame("delta", [{"text": p}]) for p in a.pieces]
    if a.tool:
        call = {"functionCall": {"name": a.tool.name, "args": dict(a.tool.arguments)}}
        frames.append(frame("delta", [call]))
    frames.append(frame("end", [{"text": ""}], finish=True))
    return frames


_JSON_ENCODERS: dict[Dialect, Callable[[_Answer], Json]] = {
    "anthropic": _anthropic_json, "openai": _openai_json, "gemini": _gemini_json}
_FRAME_ENCODERS: dict[Dialect, Callable[[_Answer], list[Frame]]] = {
    "anthropic": _anthropic_frames, "openai": _openai_frames, "gemini": _gemini_frames}


def _error_frame(dialect: Dialect, payload: Json) -> bytes:
    if dialect == "anthropic":
        return _sse(payload, event="error")
    return _sse(payload, eol=_GEMINI_EOL if dialect == "gemini" else "\n")


# --------------------------------------------------------------------------------------------------------
# The loopback server base shared with the fake status page.
# --------------------------------------------------------------------------------------------------------


class LoopbackServer:
    """An aiohttp app on an ephemeral loopback port, with bounded waits on recorded state.

    Handlers are cancelled when their client disconnects (``handler_cancellation=True``) so a fake can
    tell a client that gave up from one that got its answer.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    def _make_app(self) -> web.Application:
        raise NotImplementedError

    async def start(self) -> Self:
        if self._runner is not None:
            return self
        self._closing = asyncio.Event()
        runner = web.AppRunner(self._make_app(), handler_cancellation=True, access_log=None,
                               shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._port)
        await site.start()
        self._runner = runner
        sockets = [s for s in (runner.addresses or [])]
        if self._port == 0 and sockets:
            self._port = int(sockets[0][1])
        return self

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        self._closing.set()
        if runner is not None:
            await runner.cleanup()
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(RuntimeError("server stopped"))

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._runner is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash)."""
        return f"http://{self.host}:{self.port}"

    def _notify(self) -> None:
        for predicate, fut in list(self._waiters):
            if not fut.done() and predicate():
                fut.set_result(None)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 2.0) -> None:
        """Wait until ``predicate()`` holds (re-checked whenever a request arrives or finishes).

        Raises ``TimeoutError`` after ``timeout`` seconds."""
        if predicate():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (predicate, fut)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            self._waiters.remove(entry)

    async def _park(self) -> NoReturn:
        """Wait until the client leaves (this task is cancelled) or the server stops (ServerStopping)."""
        await self._closing.wait()
        raise ServerStopping

    async def _sleep(self, seconds: float) -> None:
        """Sleep; raise ServerStopping as soon as the server stops (``stop()`` never waits for delays)."""
        if self._closing.is_set():
            raise ServerStopping
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), seconds)
            if self._closing.is_set():
                raise ServerStopping


class ServerStopping(Exception):
    """Raised inside handlers when the fake stops: the handler drops its connection unanswered."""


def close_transport(request: web.Request, rst: bool) -> None:
    transport = request.transport
    if transport is None:
        return
    if rst:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.close()


# --------------------------------------------------------------------------------------------------------
# The fake provider.
# --------------------------------------------------------------------------------------------------------

_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
_GEMINI_PATH = re.compile(r"^(?P<model>.+):(?P<action>[A-Za-z]+)$")


class FakeProvider(LoopbackServer):
    """A scripted fake of the Anthropic, OpenAI (Chat Completions) and Gemini APIs on one loopback port.

    Paths: ``POST /v1/messages`` (Anthropic), ``POST /v1/chat/completions`` (OpenAI),
    ``POST /{v1,v1beta,v1alpha}/models/{model}:generateContent|streamGenerateContent`` (Gemini). Each
    request takes the next scripted step (FIFO, see :meth:`script`), else ``decide(request)`` if set and
    not None, else ``default``. Requests failing ``expect_api_key`` or (Anthropic) ending in a prefill with
    trailing whitespace get the provider's 4xx without consuming a step.
    """

    def __init__(
        self,
        name: str = "fake",
        *,
        reply_text: str | None = None,
        default: Step | None = None,
        decide: Decider | None = None,
        expect_api_key: str | None = None,
        gzip: bool = False,
        strict_prefill: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host, port)
        self.name = name
        self.reply_text = reply_text
        self.default: Step = default if default is not None else Reply()
        self.decide = decide
        self.expect_api_key = expect_api_key
        self.gzip = gzip
        self.strict_prefill = strict_prefill
        self.requests: list[RecordedRequest] = []
        self._queue: deque[Step] = deque()
        self._ids = itertools.count(1)

    # ---- scripting and inspection ------------------------------------------------------------------

    def script(self, *steps: Step, times: int = 1) -> Self:
        """Queue ``steps`` (each request consumes one, FIFO), the whole sequence ``times`` times."""
        for _ in range(times):
            self._queue.extend(steps)
        return self

    @property
    def pending_steps(self) -> int:
        return len(self._queue)

    def clear(self) -> None:
        """Forget recorded requests and queued steps."""
        self.requests.clear()
        self._queue.clear()

    def count(self, path_substring: str | None = None) -> int:
        if path_substring is None:
            return len(self.requests)
        return sum(1 for r in self.requests if path_substring in r.path)

    @property
    def last(self) -> RecordedRequest:
        return self.requests[-1]

    async def wait_for_requests(self, n: int, timeout: float = 2.0) -> list[RecordedRequest]:
        """Wait until at least ``n`` requests arrived; returns the recorded requests."""
        await self.wait_for(lambda: len(self.requests) >= n, timeout)
        return list(self.requests)

    async def wait_idle(self, timeout: float = 2.0) -> None:
        """Wait until every recorded request is finished (answered, disconnected or aborted)."""
        await self.wait_for(lambda: all(r.finished for r in self.requests), timeout)

    @property
    def anthropic_base_url(self) -> str:
        return self.url

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    @property
    def gemini_base_url(self) -> str:
        return self.url

    # ---- server ---------------------------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    def _classify(self, request: web.Request, body: Json) -> tuple[Dialect | None, str | None, bool]:
        path = request.path.rstrip("/")
        model = body.get("model") if isinstance(body, dict) and isinstance(body.get("model"), str) else None
        is_stream = isinstance(body, dict) and body.get("stream") is True
        if request.method != "POST":
            return None, model, False
        if path == "/v1/messages":
            return "anthropic", model, is_stream
        if path == "/v1/chat/completions":
            return "openai", model, is_stream
        for prefix in ("/v1beta/models/", "/v1/models/", "/v1alpha/models/"):
            if path.startswith(prefix):
                m = _GEMINI_PATH.match(path[len(prefix):])
                if m and m["action"] in ("generateContent", "streamGenerateContent"):
                    return "gemini", m["model"], m["action"] == "streamGenerateContent"
        return None, model, False

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body: Json = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        dialect, model, stream = self._classify(request, body)
        headers: dict[str, str] = {}
        for k, v in request.headers.items():
            key = k.lower()
            headers[key] = f"{headers[key]}, {v}" if key in headers else v
        rec = RecordedRequest(
            index=len(self.requests), method=request.method, path=request.path, query=dict(request.query),
            headers=headers, raw_body=raw, body=body, received_at=time.monotonic(), dialect=dialect,
            model=model, stream=stream)
        self.requests.append(rec)
        self._notify()
        try:
            response = await self._serve(request, rec)
        except asyncio.CancelledError:
            if rec.outcome == "pending":
                rec.outcome = "disconnected"
            raise
        except ConnectionError:
            if rec.outcome == "pending":
                rec.outcome = "disconnected"
            return web.Response(status=499)
        except ServerStopping:  # like a provider going down: in-flight requests lose their connection
            if rec.outcome == "pending":
                rec.outcome = "aborted"
            close_transport(request, rst=False)
            return web.Response(status=499)
        else:
            if rec.outcome == "pending":
                rec.outcome = "completed"
            if rec.status is None:
                rec.status = response.status
            return response
        finally:
            rec.finished_at = time.monotonic()
            self._notify()

    def _base_headers(self, dialect: Dialect | None) -> dict[str, str]:
        n = next(self._ids)
        headers = {"x-fake-provider": self.name}
        if dialect in ("anthropic", None):
            headers["request-id"] = f"req_fake{n:020d}"
        elif dialect == "openai":
            headers.update({"x-request-id": f"req_fake{n:024x}", "openai-processing-ms": "5",
                            "openai-version": "2020-10-01"})
        return headers

    def _json_response(
        self, dialect: Dialect | None, status: int, payload: Json, *, use_gzip: bool | None = None,
        extra: Mapping[str, str] | None = None,
    ) -> web.Response:
        headers = self._base_headers(dialect)
        headers.update(extra or {})
        data = payload if isinstance(payload, bytes) else (
            payload.encode() if isinstance(payload, str) else _dumps(payload).encode())
        if self.gzip if use_gzip is None else use_gzip:
            data = gzip_codec.compress(data)
            headers["Content-Encoding"] = "gzip"
        headers.setdefault("Content-Type", "application/json")
        return web.Response(status=status, body=data, headers=headers)

    def _error(self, dialect: Dialect | None, status: int, **kwargs: Any) -> web.Response:
        payload = error_payload(dialect or "anthropic", status, **kwargs)
        return self._json_response(dialect, status, payload)

    def _reject(self, request: web.Request, rec: RecordedRequest) -> web.Response | None:
        """The provider's answer to an unauthenticated or invalid request, or None."""
        d = rec.dialect
        if d is None:
            return self._error(None, 404, error_type="not_found_error", message=f"Not Found: {request.path}")
        if not isinstance(rec.body, dict):
            msg = {"anthropic": "There was an error parsing the body of your request.",
                   "openai": "We could not parse the JSON body of your request.",
                   "gemini": "Invalid JSON payload received."}[d]
            return self._error(d, 400, message=msg)
        if self.expect_api_key is not None:
            key: str | None
            h = rec.headers
            if d == "anthropic":
                key = h.get("x-api-key") or _bearer(h.get("authorization"))
            elif d == "openai":
                key = _bearer(h.get("authorization"))
            else:
                key = h.get("x-goog-api-key") or rec.query.get("key")
            if key != self.expect_api_key:
                return self._auth_error(d, missing=not key)
        if d == "anthropic" and self.strict_prefill:
            prefill = rec.prefill
            if prefill and prefill != prefill.rstrip():
                return self._error(d, 400, message="messages: final assistant content cannot end with "
                                                   "trailing whitespace")
        return None

    def _auth_error(self, d: Dialect, missing: bool) -> web.Response:
        if d == "anthropic":
            msg = "x-api-key header is required" if missing else "invalid x-api-key"
            return self._error(d, 401, message=msg)
        if d == "openai":
            if missing:
                return self._json_response(d, 401, {"error": {
                    "message": "You didn't provide an API key. You need to provide your API key in an "
                               "Authorization header using Bearer auth.",
                    "type": "invalid_request_error", "param": None, "code": None}})
            return self._error(d, 401, message="Incorrect API key provided. You can find your API key at "
                               "https://platform.openai.com/account/api-keys.")
        # Gemini answers a wrong key with 400 API_KEY_INVALID and a missing one with 403.
        if missing:
            return self._error(d, 403, message="Method doesn't allow unregistered callers (callers without "
                               "established identity). Please use API Key or other form of API consumer "
                               "identity to call this API.")
        info = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}}
        payload = {"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.",
                             "status": "INVALID_ARGUMENT", "details": [info]}}
        return self._json_response(d, 400, payload)

    def _next_step(self, rec: RecordedRequest) -> Step:
        if self._queue:
            return self._queue.popleft()
        if self.decide is not None:
            decided = self.decide(rec)
            if decided is not None:
                return decided
        return self.default

    async def _serve(self, request: web.Request, rec: RecordedRequest) -> web.StreamResponse:
        rejected = self._reject(request, rec)
        if rejected is not None:
            return rejected
        d = rec.dialect
        assert d is not None
        step = rec.step = self._next_step(rec)
        await self._sleep(step.delay)

        if isinstance(step, Fail):
            return self._fail(d, step)
        if isinstance(step, Html):
            headers = {**self._base_headers(d), "Server": "cloudflare", "CF-RAY": "8f2b1c0d9e8a7b6c-FRA"}
            return web.Response(status=step.status, text=cdn_error_page(step.status, step.title, _HOSTS[d]),
                                content_type="text/html", charset="UTF-8", headers=headers)
        if isinstance(step, Garbage):
            return web.Response(status=step.status, body=step.body,
                                headers={**self._base_headers(d), "Content-Type": step.content_type})
        if isinstance(step, Reset):
            return await self._drop(request, rec, rst=True)
        if isinstance(step, Hang):
            if step.after_headers:
                ctype = _SSE_HEADERS if rec.stream else {"Content-Type": "application/json"}
                resp = web.StreamResponse(status=200, headers={**self._base_headers(d), **ctype})
                rec.status = 200
                await resp.prepare(request)
            await self._park()
        if isinstance(step, StreamError) and not rec.stream:
            status = _STATUS_FOR_ANTHROPIC_TYPE.get(step.error_type, 500)
            return self._fail(d, Fail(status, error_type=step.error_type if d == "anthropic" else None,
                                      message=step.message))
        answer = self._answer(rec, step)
        if rec.stream:
            return await self._stream(request, rec, step, answer)
        payload = _JSON_ENCODERS[d](answer)
        if isinstance(step, CutStream | StallStream):
            data = _dumps(payload).encode()
            partial = data[: len(data) // 2]
            if isinstance(step, CutStream) and step.clean:
                rec.outcome = "aborted"
                return self._json_response(d, 200, partial, use_gzip=False, extra=step.headers)
            resp = web.StreamResponse(status=200, headers={**self._base_headers(d), **(step.headers or {}),
                                                           "Content-Type": "application/json"})
            resp.content_length = len(data)
            rec.status = 200
            await resp.prepare(request)
            await resp.write(partial)
            if isinstance(step, StallStream):
                await self._park()
            return await self._drop(request, rec, rst=False)
        return self._json_response(d, 200, payload, use_gzip=step.gzip, extra=step.headers)

    def _fail(self, d: Dialect, step: Fail) -> web.Response:
        extra = dict(step.headers or {})
        if step.retry_after is not None:
            ra = step.retry_after
            extra["retry-after"] = ra if isinstance(ra, str) else (
                str(int(ra)) if float(ra).is_integer() else str(ra))
        if step.retry_after_ms is not None:
            extra["retry-after-ms"] = f"{step.retry_after_ms:g}"
        if step.body is not None:
            body = step.body if not isinstance(step.body, Mapping) else dict(step.body)
            return self._json_response(d, step.status, body, use_gzip=step.gzip, extra=extra)
        numeric_ra = step.retry_after if isinstance(step.retry_after, int | float) else None
        payload = error_payload(d, step.status, error_type=step.error_type, message=step.message,
                                code=step.code, retry_after=numeric_ra if d == "gemini" else None,
                                request_id=f"req_fake{next(self._ids):020d}" if d == "anthropic" else None)
        return self._json_response(d, step.status, payload, use_gzip=step.gzip, extra=extra)

    async def _drop(self, request: web.Request, rec: RecordedRequest, *, rst: bool) -> NoReturn:
        """Close the connection on purpose and end the handler (cancelled by the connection loss)."""
        if rec.outcome == "pending":
            rec.outcome = "aborted"
        close_transport(request, rst)
        await self._park()  # ends by cancellation (connection lost) or ServerStopping

    def _answer(self, rec: RecordedRequest, step: Reply) -> _Answer:
        d = rec.dialect
        assert d is not None
        n = next(self._ids)
        tool: _Tool | None = None
        declared = _declared_tools(d, rec.body)
        if step.tool_call is not None and declared:
            tc = step.tool_call
            tool_id = tc.id or {"anthropic": f"toolu_fake{n:016d}", "openai": f"call_fake{n:016d}"}.get(d, "")
            tool = _Tool(id=tool_id, name=tc.name or declared[0], arguments=tc.arguments)
        if step.text is not None:
            full = step.text
        elif tool is not None:
            full = ""
        elif self.reply_text is not None:
            full = self.reply_text
        else:
            full = "echo: " + rec.last_user_text
        text = full
        prefill = rec.prefill
        if prefill and full.startswith(prefill):
            text = full[len(prefill):]
        input_text = " ".join(t for _, t in _messages(d, rec.body))
        out_words = _words(text) + (_words(_dumps(dict(tool.arguments))) if tool else 0)
        ids = {"anthropic": f"msg_fake{n:020d}", "openai": f"chatcmpl-fake{n:020d}",
               "gemini": f"fake{n:020d}"}
        stream_options = rec.body.get("stream_options") if isinstance(rec.body, dict) else None
        return _Answer(
            id=ids[d], model=rec.model or "unknown-model", text=text, pieces=_split_text(text, step.chunks),
            tool=tool,
            input_tokens=step.input_tokens if step.input_tokens is not None else max(1, _words(input_text)),
            output_tokens=step.output_tokens if step.output_tokens is not None else max(1, out_words),
            stop_reason=step.stop_reason,
            include_usage=isinstance(stream_options, dict) and stream_options.get("include_usage") is True)

    async def _stream(
        self, request: web.Request, rec: RecordedRequest, step: Reply, answer: _Answer
    ) -> web.StreamResponse:
        d = rec.dialect
        assert d is not None
        resp = web.StreamResponse(status=200, headers={**self._base_headers(d), **(step.headers or {}),
                                                       **_SSE_HEADERS})
        rec.status = 200
        await resp.prepare(request)
        fault_at = step.after_chunks if isinstance(step, CutStream | StreamError | StallStream | PingStream) else None
        frames = _FRAME_ENCODERS[d](answer)
        if isinstance(step, NoTerminal) and d != "gemini":
            frames = frames[:-1]
        for kind, data in frames:
            if kind != "meta" and fault_at is not None and rec.chunks_sent >= fault_at:
                return await self._stream_fault(request, rec, step, resp)
            if kind == "delta":
                if rec.chunks_sent:
                    await self._sleep(step.chunk_delay)
                rec.chunks_sent += 1
            await resp.write(data)
        await resp.write_eof()
        return resp

    async def _stream_fault(
        self, request: web.Request, rec: RecordedRequest, step: Reply, resp: web.StreamResponse
    ) -> web.StreamResponse:
        d = rec.dialect
        assert d is not None
        if isinstance(step, StreamError):
            status = _STATUS_FOR_ANTHROPIC_TYPE.get(step.error_type, 500)
            payload = error_payload(d, status, error_type=step.error_type if d == "anthropic" else None,
                                    message=step.message)
            await resp.write(_error_frame(d, payload))
            await resp.write_eof()
            return resp
        if isinstance(step, CutStream) and step.clean:
            rec.outcome = "aborted"
            await resp.write_eof()
            return resp
        if isinstance(step, StallStream):
            await self._park()
        if isinstance(step, PingStream):
            ping = _sse({"type": "ping"}, event="ping") if d == "anthropic" else b": ping\n\n"
            while True:
                await resp.write(ping)
                await self._sleep(step.ping_interval)
        return await self._drop(request, rec, rst=False)


def _bearer(value: str | None) -> str | None:
    if value and value.lower().startswith("bearer "):
        return value[7:].strip()
    return None

