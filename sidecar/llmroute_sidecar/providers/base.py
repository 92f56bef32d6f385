"""What every provider adapter does the same way: the HTTP exchange and its failure modes.

A concrete adapter (anthropic.py, openai.py, gemini.py) supplies only its wire format: paths, auth
headers, request/response/stream codecs and how its error bodies read. This base turns transport
faults into the classification of `errors.py` (HOSTILE.md U1-U4, U9, U10, U14, U15, U19) so that no
adapter re-learns them:

- one `aiohttp.ClientSession` per upstream, owned by the server, shared by every request;
- no total timeout (it would kill long streams): a deadline for the response headers (first byte) and
  an idle timeout between stream reads instead;
- aiohttp decompresses gzip itself; we never forward upstream `Content-Encoding` (we re-frame);
- an HTML page (CDN error, WAF challenge) never reaches an app: its `<title>` becomes the message.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import aiohttp
import orjson

from ..durations import retry_after
from ..errors import ClientError, FailoverError, RetryableError, UpstreamError
from ..keys import KeySource
from ..messages import ChatRequest, ChatResponse, StreamEvent
from ..policy import Provider
from ..ratelimits import ProviderLimits, RateLimitBook
from ..sse import SseEvent, SseParser

MAX_RESPONSE_BYTES = 64 * 1024 * 1024
MAX_ERROR_BYTES = 256 * 1024
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524, 529})
_TITLE = re.compile(rb"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


@dataclass(slots=True, frozen=True)
class AttemptTimeouts:
    """Deadlines for one attempt, in seconds."""

    first_byte: float
    """Until the response headers arrive (streams: the engine also waits for the first content)."""
    idle: float = 90.0
    """Longest silence between two reads of a stream (pings normally arrive every few seconds)."""


@dataclass(slots=True)
class StreamFrame:
    """One upstream SSE event: its neutral meaning and the event itself (for same-dialect relays)."""

    events: list[StreamEvent]
    sse: SseEvent


class StreamDecoder:
    """Turns one provider's SSE events into neutral events; raises UpstreamError on an error event."""

    def decode(self, event: SseEvent) -> list[StreamEvent]:
        raise NotImplementedError  # each adapter's decoder overrides this

    def finished(self) -> bool:
        """True once the provider's terminal event was seen (a clean end of stream)."""
        raise NotImplementedError  # each adapter's decoder overrides this


class Adapter:
    """Calls one provider. Subclasses implement the codec hooks; the HTTP flow lives here."""

    dialect: ClassVar[str]
    supports_prefill: ClassVar[bool] = False

    def __init__(
        self, provider: Provider, session: aiohttp.ClientSession, api_key: str | KeySource | None
    ) -> None:
        self.provider = provider
        self.session = session
        self.base_url = provider.effective_base_url
        self._keys = api_key if isinstance(api_key, KeySource) else KeySource.fixed(api_key)
        self.rate_limits = ProviderLimits(RateLimitBook(), provider, self._keys)
        """The provider's rate-limit headers, read from every response (runtime.py shares one book)."""

    # ----- codec hooks: the provider's wire format -------------------------------------------------
    def url(self, model: str, stream: bool) -> str:
        raise NotImplementedError  # provider-specific

    def auth_headers(self, api_key: str | None) -> dict[str, str]:
        raise NotImplementedError  # provider-specific

    def encode_request(self, request: ChatRequest, model: str, stream: bool) -> dict[str, Any]:
        raise NotImplementedError  # provider-specific

    def decode_response(self, body: dict[str, Any]) -> ChatResponse:
        """Raise ValueError when the body lacks the minimal shape (treated as a bad gateway)."""
        raise NotImplementedError  # provider-specific

    def stream_decoder(self) -> StreamDecoder:
        raise NotImplementedError  # provider-specific

    def error_details(self, body: Any) -> tuple[str | None, str | None, int | None]:
        """From a parsed error body: (error type, message, status the body claims, e.g. Gemini's code)."""
        return None, None, None

    def retry_hint(self, status: int, headers: Mapping[str, str], raw: bytes) -> float | None:
        """A wait the provider states other than `retry-after` (Gemini's RetryInfo, OpenAI's reset
        headers); asked only when no `retry-after` header came."""
        return None

    def untranslatable(self, request: ChatRequest) -> str | None:
        """Why this provider cannot faithfully serve `request` (None: it can)."""
        if request.native is not None and request.native.dialect != self.dialect and request.lossy:
            return "cannot translate " + ", ".join(request.lossy)
        return None

    # ----- the HTTP exchange ------------------------------------------------------------------------
    async def complete(
        self, request: ChatRequest, model: str, timeouts: AttemptTimeouts
    ) -> ChatResponse:
        """One non-streaming attempt."""
        response = await self._post(request, model, stream=False, timeouts=timeouts)
        try:
            async with asyncio.timeout(timeouts.idle):
                raw = await response.content.read(MAX_RESPONSE_BYTES + 1)
        except TimeoutError:
            raise RetryableError("upstream stalled while sending the body", condition="timeout") from None
        except aiohttp.ClientError as exc:
            raise RetryableError(f"upstream connection lost: {type(exc).__name__}") from None
        finally:
            response.release()
        if len(raw) > MAX_RESPONSE_BYTES:
            raise RetryableError("upstream response too large", status=502, error_type="api_error")
        try:
            body = orjson.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
            return self.decode_response(body)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise RetryableError(
                f"upstream answered 200 with an unusable body ({exc})", status=502, condition=502
            ) from None

    async def stream(
        self, request: ChatRequest, model: str, timeouts: AttemptTimeouts
    ) -> AsyncGenerator[StreamFrame, None]:
        """One streaming attempt. Errors before the headers raise like `complete`; after them, an
        upstream error event raises UpstreamError and a silent end raises RetryableError (the engine
        decides, knowing whether anything reached the app yet)."""
        response = await self._post(request, model, stream=True, timeouts=timeouts)
        content_type = response.headers.get("Content-Type", "")
        try:
            if "text/event-stream" not in content_type:
                raw = await response.content.read(MAX_ERROR_BYTES)
                raise self.classify(502, response.headers, raw, note="expected an event stream")
            parser = SseParser()
            decoder = self.stream_decoder()
            while True:
                try:
                    async with asyncio.timeout(timeouts.idle):
                        chunk = await response.content.readany()
                except TimeoutError:
                    raise RetryableError("upstream stream stalled", condition="timeout") from None
                except aiohttp.ClientError as exc:
                    raise RetryableError(f"upstream connection lost: {type(exc).__name__}") from None
                if not chunk:
                    if decoder.finished():
                        return
                    raise RetryableError("upstream connection lost mid-stream", condition="connection")
                for sse in parser.feed(chunk):
                    try:
                        events = decoder.decode(sse)
                    except (ValueError, KeyError, TypeError, IndexError) as exc:
                        raise RetryableError(f"undecodable stream event ({exc})", status=502) from None
                    yield StreamFrame(events, sse)
                    if decoder.finished():
                        return
        finally:
            response.close()  # closes the upstream connection when the consumer stops early

    async def _post(
        self, request: ChatRequest, model: str, stream: bool, timeouts: AttemptTimeouts
    ) -> aiohttp.ClientResponse:
        body = orjson.dumps(self.encode_request(request, model, stream))
        headers = {"Content-Type": "application/json", **self.auth_headers(self._keys.current())}
        native = request.native
        if native is not None and native.dialect == self.dialect:
            headers.update(native.headers)  # e.g. anthropic-beta: features the app's body relies on
        try:
            async with asyncio.timeout(timeouts.first_byte):
                response = await self.session.post(self.url(model, stream), data=body, headers=headers)
        except TimeoutError:
            raise RetryableError("no response headers before the attempt timeout", condition="timeout") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as exc:
            raise RetryableError(f"connection failed: {type(exc).__name__}", condition="connection") from None
        except aiohttp.ClientError as exc:
            raise RetryableError(f"upstream protocol error: {type(exc).__name__}", status=502) from None
        self.rate_limits.record(response.headers)  # every answer, success or error, plain or streamed
        if response.status < 400:
            return response
        try:
            raw = await response.content.read(MAX_ERROR_BYTES)
        except (aiohttp.ClientError, OSError):
            raw = b""
        finally:
            response.release()
        raise self.classify(response.status, response.headers, raw)

    def classify(
        self, status: int, headers: Mapping[str, str], raw: bytes, note: str | None = None
    ) -> UpstreamError:
        """Structured body first, HTTP status second, message text last (HOSTILE.md U10, U11)."""
        content_type = headers.get("Content-Type", "")
        wait = retry_after(headers)
        if wait is None:
            wait = self.retry_hint(status, headers, raw)
        error_type: str | None = None
        message: str | None = None
        claimed: int | None = None
        stripped = raw.lstrip()
        if stripped.startswith(b"{") and "html" not in content_type:
            try:
                error_type, message, claimed = self.error_details(orjson.loads(raw))
            except ValueError:
                pass
        elif stripped[:1] == b"<" or "html" in content_type:
            title = _TITLE.search(raw)
            message = "upstream returned an HTML page" + (
                f": {title.group(1).decode('utf-8', 'replace').strip()[:200]}" if title else ""
            )
            raw = b""  # never relay an HTML page to an SDK
        if note:
            message = f"{note}: {message}" if message else note
        message = message or f"upstream answered HTTP {status}"
        effective = claimed if claimed in RETRYABLE_STATUSES else status
        kwargs: dict[str, Any] = {
            "status": status,
            "condition": effective,
            "error_type": error_type or _default_type(status),
            "retry_after": wait,
            "headers": headers,
            "body": raw or None,
            "content_type": content_type or None,
            "dialect": self.dialect if raw else None,
        }
        # Quota gone, or a 429 with no hint of when to come back (Anthropic's spend cap): retrying
        # this target only spins (HOSTILE.md U12), the next target may well answer.
        if error_type in ("insufficient_quota", "billing_error") or (effective == 429 and wait is None):
            return FailoverError(message, **kwargs)
        if effective in RETRYABLE_STATUSES or status >= 500:
            return RetryableError(message, **kwargs)
        return ClientError(message, **kwargs)


class AppStreamEncoder:
    """Writes a stream in the app's dialect, from neutral events or relayed upstream frames."""

    def relay(self, frame: StreamFrame) -> bytes:
        """An upstream frame of the app's own dialect, passed through (unknown event types too)."""
        raise NotImplementedError  # provider-specific

    def encode(self, event: StreamEvent) -> bytes:
        """A neutral event (from another dialect, or a resumed continuation) in the app's dialect."""
        raise NotImplementedError  # provider-specific

    def error(self, error_type: str, message: str) -> bytes:
        """The dialect's terminal in-band error frame, so the SDK raises instead of truncating."""
        raise NotImplementedError  # provider-specific


class AppCodec:
    """The app-facing side of a dialect, for the compatible endpoints (`/anthropic`, `/openai`)."""

    dialect: ClassVar[str]
    forwarded_headers: ClassVar[tuple[str, ...]] = ()
    """Protocol headers of the app's request that a same-dialect target must receive too."""

    def decode_request(self, body: dict[str, Any]) -> ChatRequest:
        """The app's body -> neutral request (keeping `native`); RequestError for what we must parse."""
        raise NotImplementedError  # provider-specific

    def encode_response(self, response: ChatResponse, model: str) -> dict[str, Any]:
        """A neutral answer -> the dialect's response body (`model`: what the app asked for)."""
        raise NotImplementedError  # provider-specific

    def stream_encoder(self, model: str, request: ChatRequest | None = None) -> AppStreamEncoder:
        """`request`: the app's decoded request, for stream options (OpenAI's include_usage)."""
        raise NotImplementedError  # provider-specific

    def error_body(self, status: int, error_type: str, message: str) -> dict[str, Any]:
        """The dialect's error envelope."""
        raise NotImplementedError  # provider-specific


def _default_type(status: int) -> str:
    return {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        529: "overloaded_error",
    }.get(status, "api_error")
