"""Cleaning what the sidecar repeats: secrets out, undisplayable bytes escaped.

Secrets. A provider's error can quote the key it received (a 401 that echoes `x-api-key`), and a hostile
upstream can put it in a header or a stream's error event. Whatever an upstream said reaches the app
(relayed verbatim or translated), the request's log line, its spans and `attempts`. So every upstream
failure is scrubbed once, where it enters the sidecar: when an adapter raises it (`providers/base.py`).
Everything downstream of that point is built from the scrubbed error. What is removed: the key the attempt
sent, every provider key the sidecar holds (`Keyring`: every provider's, and the values it has seen
replaced by a reload or a rotated file) and the key the app itself sent with its request (ignored and never
forwarded, but apps often send their real key; the server records it per request with `hold_client_keys`).
Both the plain and the JSON-escaped spellings are caught: a JSON body is parsed and every string in it
scrubbed. A value shorter than `MIN_SECRET_CHARS` is not treated as a secret: replacing `x` or `test`
everywhere would mangle every message and hide nothing.

Echoes. A client-supplied header or path segment (the `llmroute-route` header, a route name in the URL) and
an upstream's `Location` can hold any bytes, and aiohttp hands undecodable ones over as lone surrogates,
which no JSON encoder accepts. `printable` turns such a value into plain, bounded text before it is put in
a JSON body, a span or a log line.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from .errors import UpstreamError
from .keys import KeySource

REDACTED = "[redacted]"
MIN_SECRET_CHARS = 8
"""Shorter values are not scrubbed (see the module docstring); real provider keys have 30 or more."""
MAX_ECHO_CHARS = 200
"""A client-supplied value quoted back is cut to this many characters."""
_REMEMBERED = 32
"""Key values a Keyring keeps after they were replaced (rotations, reloads), newest first."""
_CLIENT_KEY_HEADERS = ("x-api-key", "api-key", "x-goog-api-key")

_client_keys: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("llmroute_client_keys", default=())
"""The keys the app sent with the request being served (set by the server; tasks inherit it)."""


class Keyring:
    """Every provider key the sidecar holds: the current policy's sources, and values seen before."""

    __slots__ = ("_seen", "_sources")

    def __init__(self) -> None:
        self._sources: tuple[KeySource, ...] = ()
        self._seen: dict[str, None] = {}  # an ordered set, newest last

    def track(self, sources: Iterable[KeySource]) -> None:
        """The key sources of a newly compiled policy; the previous ones' values stay remembered."""
        self.values()
        self._sources = tuple(sources)
        self.values()

    def values(self) -> list[str]:
        for source in self._sources:
            key = source.current()
            if key:
                self._seen.pop(key, None)
                self._seen[key] = None
        while len(self._seen) > _REMEMBERED:
            del self._seen[next(iter(self._seen))]
        return list(self._seen)


def hold_client_keys(headers: Mapping[str, str]) -> None:
    """Remember, for the request being served, the keys its app sent (`x-api-key`, `Authorization`...)."""
    keys = [headers[name] for name in _CLIENT_KEY_HEADERS if name in headers]
    authorization = headers.get("Authorization")
    if authorization:
        keys.append(authorization.removeprefix("Bearer ").removeprefix("bearer ").strip())
    if keys:
        _client_keys.set(tuple(keys))


def request_secrets(*known: str | None) -> list[str]:
    """The secrets to scrub from an upstream failure of the request being served: `known` (the keys the
    adapter holds) and the app's own keys."""
    return [value for value in (*known, *_client_keys.get()) if value]


class Scrubber:
    """Replaces each of a set of secrets with `[redacted]` in text, bytes, JSON bodies and headers."""

    __slots__ = ("_secrets",)

    def __init__(self, secrets: Iterable[str]) -> None:
        unique = {secret for secret in secrets if len(secret) >= MIN_SECRET_CHARS}
        self._secrets = sorted(unique, key=len, reverse=True)  # a key inside a longer one: longest first

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def text(self, value: str) -> str:
        for secret in self._secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value

    def body(self, raw: bytes) -> bytes:
        """A JSON body has every string scrubbed (escaped spellings included) and is re-encoded only when
        something was found; anything else is scrubbed as UTF-8 bytes."""
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return self.text(raw.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")
        cleaned = self._json(parsed)
        return raw if cleaned == parsed else orjson.dumps(cleaned)

    def _json(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self._json(item) for item in value]
        if isinstance(value, dict):
            return {self.text(key): self._json(item) for key, item in value.items()}
        return value

    def error(self, error: UpstreamError) -> UpstreamError:
        """`error` with its message, type, body and headers scrubbed (in place; returned for `raise`)."""
        if self._secrets:
            error.message = self.text(error.message)
            error.args = (error.message,)
            error.error_type = self.text(error.error_type)
            if error.body:
                error.body = self.body(error.body)
            error.headers = {name: self.text(value) for name, value in error.headers.items()}
        return error


def printable(value: str, limit: int = MAX_ECHO_CHARS) -> str:
    """`value` as text safe to echo: a byte that was not UTF-8 (aiohttp's lone surrogate) as `\\xff`, other
    unprintable characters as Python escapes (`\\n`, `\\u200b`), cut to `limit` characters."""
    if value.isprintable() and len(value) <= limit:
        return value  # the usual case
    shown = "".join(_escaped(ch) for ch in value[: limit * 4])
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def _escaped(ch: str) -> str:
    if ch.isprintable():
        return ch
    if "\udc80" <= ch <= "\udcff":  # surrogateescape's spelling of an undecodable byte
        return f"\\x{ord(ch) - 0xDC00:02x}"
    return ch.encode("unicode_escape").decode("ascii")
