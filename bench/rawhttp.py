"""Minimal HTTP/1.1 on raw asyncio protocols: the benchmark's fake upstream and its load generator.

Why this exists: the benchmark measures a proxy that handles a few thousand requests per second on one
core. The load generator and the fake upstream share the *other* core, so together they must be several
times faster than the proxy, or the benchmark measures them instead. aiohttp's client and server cost
~100-200 us of CPU per request each; these protocol classes (keep-alive, Content-Length bodies, chunked
SSE for streams, nothing else) cost a few tens of microseconds on uvloop. `bench.py` checks the headroom
in every run (the "generator + upstream ceiling" row).

Not a general HTTP implementation: requests and responses must carry Content-Length (or, for the SSE
responses the generator never reads, chunked encoding); no pipelining from the client side.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

# ----- the fake upstream ------------------------------------------------------------------------------------

MESSAGE = json.dumps({
    "id": "msg_bench0000000000000001", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
    "content": [{"type": "text", "text": "The printer needs a new fuser; a technician is on the way."}],
    "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 42, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
              "output_tokens": 14},
}).encode()


def _sse(event: str, data: dict[str, object]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


STREAM_HEAD = _sse("message_start", {"type": "message_start", "message": {
    "id": "msg_bench0000000000000002", "type": "message", "role": "assistant", "content": [],
    "model": "claude-sonnet-4-5", "stop_reason": None, "stop_sequence": None,
    "usage": {"input_tokens": 42, "output_tokens": 1}}}) + _sse(
    "content_block_start", {"type": "content_block_start", "index": 0,
                            "content_block": {"type": "text", "text": ""}})
STREAM_DELTA = _sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                            "delta": {"type": "text_delta", "text": "word "}})
STREAM_TAIL = _sse("content_block_stop", {"type": "content_block_stop", "index": 0}) + _sse(
    "message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                      "usage": {"output_tokens": 5}}) + _sse("message_stop", {"type": "message_stop"})

STATUS_SUMMARY = json.dumps({
    "page": {"id": "tymt9n04zgry", "name": "Claude", "url": "https://status.claude.com",
             "time_zone": "Etc/UTC", "updated_at": "2026-09-04T12:03:36.857Z"},
    "status": {"indicator": "none", "description": "All Systems Operational"},
    "components": [{"id": "k8w3r06qmzrp", "name": "Claude API (api.anthropic.com)", "status": "operational",
                    "position": 3, "group": False, "group_id": None}],
    "incidents": [], "scheduled_maintenances": [],
}).encode()


_SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@dataclass
class UpstreamStats:
    requests: int = 0
    streams: int = 0
    status_polls: int = 0
    otlp_exports: int = 0


class UpstreamProtocol(asyncio.Protocol):
    """Anthropic Messages after `delay` (JSON, or SSE when the body asks for a stream), a static status
    page at `/api/v2/summary.json`, and a sink for OTLP/HTTP exports at `/v1/traces`."""

    def __init__(self, server: Upstream) -> None:
        self.server = server
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end])
            length = _content_length(head)
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            body = bytes(self.buffer[end + 4:total])
            del self.buffer[:total]
            self._handle(head, body)

    def _handle(self, head: bytes, body: bytes) -> None:
        line = head.split(b"\r\n", 1)[0]
        parts = line.split(b" ")
        path = parts[1] if len(parts) > 1 else b"/"
        server = self.server
        loop = asyncio.get_running_loop()
        if path.startswith(b"/v1/messages"):
            server.stats.requests += 1
            if b'"stream":true' in body or b'"stream": true' in body:
                server.stats.streams += 1
                self._write(_SSE_HEAD + _chunk(STREAM_HEAD))
                loop.call_later(server.delay, self._stream, server.stream_deltas)
            elif server.delay > 0:
                loop.call_later(server.delay, self._write, server.message_response)
            else:
                self._write(server.message_response)
        elif path.startswith(b"/api/v2/summary.json"):
            server.stats.status_polls += 1
            self._write(_response(200, STATUS_SUMMARY, b"application/json"))
        elif path.startswith(b"/v1/traces"):
            server.stats.otlp_exports += 1
            self._write(_response(200, b"", b"application/x-protobuf"))
        else:
            self._write(_response(404, b"{}", b"application/json"))

    def _stream(self, remaining: int) -> None:
        if remaining > 0:
            self._write(_chunk(STREAM_DELTA))
            asyncio.get_running_loop().call_later(self.server.delta_gap, self._stream, remaining - 1)
        else:
            self._write(_chunk(STREAM_TAIL) + b"0\r\n\r\n")

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


def _response(status: int, body: bytes, content_type: bytes) -> bytes:
    reason = {200: b"OK", 404: b"Not Found"}.get(status, b"OK")
    return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
            % (status, reason, content_type, len(body)) + body)


def _content_length(head: bytes) -> int:
    lower = head.lower()
    index = lower.find(b"\r\ncontent-length:")
    if index < 0:
        return 0
    end = lower.find(b"\r\n", index + 2)
    return int(lower[index + 17:end if end >= 0 else None].strip())


@dataclass
class Upstream:
    """The fake upstream server; `delay` is the time to the response (streams: to the first delta)."""

    delay: float = 0.020
    stream_deltas: int = 5
    delta_gap: float = 0.002
    stats: UpstreamStats = field(default_factory=UpstreamStats)
    server: asyncio.base_events.Server | None = None
    port: int = 0
    message_response: bytes = field(default_factory=lambda: _response(200, MESSAGE, b"application/json"))

    async def start(self, host: str = "127.0.0.1") -> Upstream:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: UpstreamProtocol(self), host, 0, backlog=4096)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


# ----- the load generator -----------------------------------------------------------------------------------


class ClientProtocol(asyncio.Protocol):
    """One keep-alive connection; `request()` sends prepared bytes and waits for the whole response."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.closed = asyncio.get_event_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection lost"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end])
        total = end + 4 + _content_length(head)
        if len(self.buffer) < total:
            return
        status = int(head[9:12])
        del self.buffer[:total]
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(status)

    async def request(self, data: bytes) -> int:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter


async def connect(host: str, port: int) -> ClientProtocol:
    loop = asyncio.get_running_loop()
    _transport, protocol = await loop.create_connection(ClientProtocol, host, port)
    return protocol


def request_bytes(path: str, body: bytes, extra: dict[str, str] | None = None) -> bytes:
    headers = {"Host": "127.0.0.1", "Content-Type": "application/json", "Content-Length": str(len(body)),
               "x-api-key": "bench-key", "anthropic-version": "2023-06-01", **(extra or {})}
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode() + body


@dataclass
class ClosedLoopResult:
    requests: int
    errors: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


async def closed_loop(host: str, port: int, data: bytes, concurrency: int, warmup: float, duration: float,
                      on_window: Callable[[bool], None] | None = None) -> ClosedLoopResult:
    """`concurrency` connections, each sending the next request when the previous answer is in; counts the
    answers of the `duration` seconds after `warmup`. `on_window(True/False)` marks the measured window."""
    connections = [await connect(host, port) for _ in range(concurrency)]
    counting = False
    stop = False
    count = errors = 0

    async def worker(conn: ClientProtocol) -> None:
        nonlocal count, errors
        while not stop:
            try:
                status = await conn.request(data)
            except ConnectionError:
                errors += 1
                return
            if counting:
                if status == 200:
                    count += 1
                else:
                    errors += 1

    tasks = [asyncio.create_task(worker(c)) for c in connections]
    await asyncio.sleep(warmup)
    counting = True
    if on_window:
        on_window(True)
    started = time.perf_counter()
    await asyncio.sleep(duration)
    counting = False
    elapsed = time.perf_counter() - started
    if on_window:
        on_window(False)
    stop = True
    _done, pending = await asyncio.wait(tasks, timeout=5.0)
    for task in pending:
        task.cancel()
    for conn in connections:
        if conn.transport is not None:
            conn.transport.close()
    return ClosedLoopResult(count, errors, elapsed)


async def fixed_rate(host: str, port: int, data: bytes, rate: float, count: int,
                     connections: int = 32) -> tuple[list[float], int]:
    """Open loop: `count` requests at `rate` per second; latency from each request's *scheduled* time (so a
    stall is not hidden by coordinated omission). Returns (latencies in seconds, errors)."""
    pool: asyncio.Queue[ClientProtocol] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(await connect(host, port))
    latencies: list[float] = []
    errors = 0

    async def one(scheduled: float) -> None:
        nonlocal errors
        conn = await pool.get()
        try:
            status = await conn.request(data)
        except ConnectionError:
            errors += 1
            pool.put_nowait(await connect(host, port))
            return
        latencies.append(time.perf_counter() - scheduled)
        if status != 200:
            errors += 1
        pool.put_nowait(conn)

    tasks = []
    start = time.perf_counter() + 0.05
    for index in range(count):
        scheduled = start + index / rate
        wait = scheduled - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(one(scheduled)))
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=30.0)
    while not pool.empty():
        conn = pool.get_nowait()
        if conn.transport is not None:
            conn.transport.close()
    return latencies, errors
