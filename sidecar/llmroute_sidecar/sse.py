"""Server-sent events, parsed the way browsers do (WHATWG EventSource), and written back.

Upstreams are not always polite (HOSTILE.md U8): CR-only line ends, a BOM, `data:` without a space,
comment keep-alives, multi-line data, unknown fields. The parser is incremental (bytes arrive in any
split) and forgiving; a final event without its blank line is dropped, as the spec says. It is not
unbounded: an event (or a line) larger than `MAX_EVENT_BYTES` is an upstream fault (RetryableError), not
a reason to buffer until the sidecar runs out of memory (E6).
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from .errors import RetryableError

MAX_EVENT_BYTES = 16 * 1024 * 1024
"""Largest SSE event (or unterminated line) accepted from an upstream; real events are a few KB."""


@dataclass(slots=True)
class SseEvent:
    event: str
    data: str


class SseParser:
    """Feed bytes, get complete events."""

    __slots__ = ("_buffer", "_data", "_event", "_max", "_size", "_started", "_trailing_cr")

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buffer = b""
        self._event = ""
        self._data: list[str] = []
        self._size = 0
        self._max = max_event_bytes
        self._started = False
        self._trailing_cr = False

    def feed(self, chunk: bytes) -> list[SseEvent]:
        if not self._started:
            self._buffer += chunk
            if len(self._buffer) < 3 and b"\xef\xbb\xbf".startswith(self._buffer):
                return []
            self._started = True
            chunk = self._buffer.removeprefix(b"\xef\xbb\xbf")
            self._buffer = b""
        if self._trailing_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF of a CRLF split across chunks
        self._trailing_cr = False
        data = self._buffer + chunk
        if b"\r" in data:
            self._trailing_cr = data.endswith(b"\r")
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *lines, self._buffer = data.split(b"\n")
        if len(self._buffer) > self._max:
            raise RetryableError("upstream sent an oversized event-stream line", status=502)
        events: list[SseEvent] = []
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            if not line:
                if self._data:
                    events.append(SseEvent(self._event or "message", "\n".join(self._data)))
                self._event, self._data, self._size = "", [], 0
                continue
            if line.startswith(":"):
                continue
            self._size += len(raw)
            if self._size > self._max:
                raise RetryableError("upstream sent an oversized event-stream event", status=502)
            name, sep, value = line.partition(":")
            if sep and value.startswith(" "):
                value = value[1:]
            if name == "data":
                self._data.append(value)
            elif name == "event":
                self._event = value
            # `id`, `retry` and unknown fields do not matter to a proxy that re-frames events.
        return events


def frame(event: str | None, data: bytes | str) -> bytes:
    """One SSE frame; `event: None` writes a data-only frame (OpenAI, Gemini style).

    Multi-line data (legal upstream, joined with LF by the parser) goes back out as one `data:` line
    per line: written as one line, its LF would end the field and the rest would read as garbage."""
    payload = data.encode() if isinstance(data, str) else data
    if b"\n" in payload or b"\r" in payload:
        payload = payload.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\ndata: ")
    if event is None:
        return b"data: " + payload + b"\n\n"
    return b"event: " + event.encode() + b"\ndata: " + payload + b"\n\n"


def json_frame(event: str | None, obj: object) -> bytes:
    return frame(event, orjson.dumps(obj))
