"""Logging malformed HTTP from clients: one short structured warning each, rate-limited, never the bytes.

aiohttp answers a request it cannot parse (an over-long header line, a bad chunk size, a CR in a value,
garbage instead of a request line) with a 400 before any handler runs, and logs it with
`logger.exception(...)`: a full traceback whose `BadHttpMessage` message quotes up to ~100 bytes of the
request. A client could flood the log that way, or put prompt text or a key it sent into it. The hook is the
logger aiohttp's `RequestHandler` takes (its documented `logger` argument, given through the app's
`handler_args`): every record that carries an `HttpProcessingError` becomes one JSON line with the kind of
error, its status and the peer's address. At most `burst` such lines are written at once and `per_second`
after that; the next line says how many were left out. Every other record passes through unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger("llmroute.http")


class RateLimit:
    """A token bucket: `burst` at once, then `per_second`."""

    __slots__ = ("_clock", "_last", "_tokens", "burst", "per_second")

    def __init__(self, per_second: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second = per_second
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def allow(self) -> bool:
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.per_second)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class ServerLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's per-connection logger (`aiohttp.server`), with malformed requests logged our way."""

    def __init__(self, per_second: float = 1.0, burst: int = 10) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})
        self.limit = RateLimit(per_second, burst)
        self.suppressed = 0

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        error = kwargs.get("exc_info")
        if isinstance(error, HttpProcessingError):
            # aiohttp's call is `("Error handling request from %s", request.remote, exc_info=exc)`.
            peer = args[0] if args and isinstance(args[0], str) else None
            self.malformed(error, peer)
            return
        super().log(level, msg, *args, **kwargs)

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return msg, kwargs  # LoggerAdapter's default would replace `extra` with ours (empty)

    def malformed(self, error: HttpProcessingError, peer: str | None) -> None:
        if not self.limit.allow():
            self.suppressed += 1
            return
        fields: Mapping[str, object] = {
            "event": "malformed_request",
            "kind": type(error).__name__,
            "status": error.code,
            "peer": peer,
        }
        if self.suppressed:
            fields = {**fields, "suppressed": self.suppressed}
            self.suppressed = 0
        log.warning(orjson.dumps(fields).decode())
