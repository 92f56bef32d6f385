"""What every provider adapter does the same way: the HTTP exchange and its failure modes.

A concrete adapter (anthropic.py, openai.py, gemini.py) supplies only its wire format: paths, auth
headers, request/response/stream codecs and how its error bodies read. This base turns transport
faults into the classification of `errors.py` (HOSTILE.md U1-U4, U9, U10, U14, U15, U19) so that no
adapter re-learns them:

- one `aiohttp.ClientSession` per upstream, owned by the server, shared by every request;
- no total timeout (it would kill long streams): a deadline for the response headers (first byte) and
  an idle timeout between stream reads instead;
- aiohttp decompresses gzip itself; we never forward upstream `Content-Encoding` (we re-frame);
- an HTML page (CDN error, WAF challenge) never reaches an app: its `<title>` becomes the message;
- redirects are never followed: aiohttp would replay the request, key headers included (it drops only
  `Authorization` across origins, never `x-api-key` or `x-goog-api-key`), to whatever host the
  `Location` names, and serve that host's answer as the provider's. A 3xx is a failed attempt, logged
  with the `Location` host only;
- every failure leaving `complete` and `stream` is scrubbed of the keys the sidecar holds and of the
  app's own key (`scrubbing.py`): an error that quotes the key it received reaches no app, log or span.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import aiohttp
import orjson
from yarl import URL

from ..durations import retry_after
from ..errors import (
    ClientError,
    ContentRefused,
    ContextWindowExceeded,
    FailoverError,
    RateLimited,
    RetryableError,
    UpstreamError,
)
from ..keys import KeySource
from ..messages import ChatRequest, ChatResponse, StreamEvent
from ..policy import Provider
from ..ratelimits import ProviderLimits, RateLimitBook
from ..scrubbing import Keyring, Scrubber, printable, request_secrets
from ..sse import SseEvent, SseParser

MAX_RESPONSE_BYTES = 64 * 1024 * 1024
MAX_ERROR_BYTES = 256 * 1024
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524, 529})
_TITLE = re.compile(rb"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
log = logging.getLogger("llmroute.upstream")


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

    def end_of_body(self) -> StreamFrame | None:
        """The body ended cleanly without the terminal event. When the answer is complete all the same
        (its stop reason arrived: several compatible servers omit OpenAI's `[DONE]`), the terminal frame
        the provider would have sent, so the app gets a proper end and usage is recorded; None when
        the answer is unfinished (a break)."""
        return None


class Adapter:
    """Calls one provider. Subclasses implement the codec hooks; the HTTP flow lives here."""

    dialect: ClassVar[str]
    supports_prefill: ClassVar[bool] = False

    def __init__(
        self,
        provider: Provider,
        session: aiohttp.ClientSession,
        api_key: str | KeySource | None,
        keyring: Keyring | None = None,
    ) -> None:
        """`keyring`: every key the sidecar holds, scrubbed from this provider's errors too (None: its own)."""
        self.provider = provider
        self.session = session
        self.base_url = provider.effective_base_url
        self._keys = api_key if isinstance(api_key, KeySource) else KeySource.fixed(api_key)
        self._keyring = keyring
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
        key = self._keys.current()
        try:
            return await self._complete(request, model, timeouts, key)
        except UpstreamError as exc:
            raise self._scrubbed(exc, key) from None

    async def _complete(
        self, request: ChatRequest, model: str, timeouts: AttemptTimeouts, key: str | None
    ) -> ChatResponse:
        response = await self._post(request, model, stream=False, timeouts=timeouts, key=key)
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
        key = self._keys.current()
        try:
            async with contextlib.aclosing(self._stream(request, model, timeouts, key)) as frames:
                async for frame in frames:
                    yield frame
        except UpstreamError as exc:
            raise self._scrubbed(exc, key) from None

    async def _stream(
        self, request: ChatRequest, model: str, timeouts: AttemptTimeouts, key: str | None
    ) -> AsyncGenerator[StreamFrame, None]:
        response = await self._post(request, model, stream=True, timeouts=timeouts, key=key)
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
                    tail = decoder.end_of_body()
                    if tail is None:
                        raise RetryableError("upstream connection lost mid-stream", condition="connection")
                    yield tail
                    return
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

    def _scrubber(self, key: str | None) -> Scrubber:
        """The key this attempt sent, every key the sidecar holds and the app's own (`scrubbing.py`)."""
        held = self._keyring.values() if self._keyring is not None else []
        return Scrubber(request_secrets(key, *held))

    def _scrubbed(self, error: UpstreamError, key: str | None) -> UpstreamError:
        return self._scrubber(key).error(error)

    async def _post(
        self, request: ChatRequest, model: str, stream: bool, timeouts: AttemptTimeouts, key: str | None
    ) -> aiohttp.ClientResponse:
        body = orjson.dumps(self.encode_request(request, model, stream))
        headers = {"Content-Type": "application/json", **self.auth_headers(key)}
        native = request.native
        if native is not None and native.dialect == self.dialect:
            headers.update(native.headers)  # e.g. anthropic-beta: features the app's body relies on
        try:
            async with asyncio.timeout(timeouts.first_byte):
                response = await self.session.post(
                    self.url(model, stream), data=body, headers=headers, allow_redirects=False
                )
        except TimeoutError:
            raise RetryableError("no response headers before the attempt timeout", condition="timeout") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as exc:
            raise RetryableError(f"connection failed: {type(exc).__name__}", condition="connection") from None
        except aiohttp.ClientError as exc:
            raise RetryableError(f"upstream protocol error: {type(exc).__name__}", status=502) from None
        self.rate_limits.record(response.headers)  # every answer, success or error, plain or streamed
        if response.status < 300:
            return response
        if response.status < 400:
            response.release()
            raise self._redirected(response.status, response.headers.get("Location"), key)
        try:
            raw = await response.content.read(MAX_ERROR_BYTES)
        except (aiohttp.ClientError, OSError):
            raw = b""
        finally:
            response.release()
        raise self.classify(response.status, response.headers, raw)

    def _redirected(self, status: int, location: str | None, key: str | None) -> UpstreamError:
        """A 3xx: never followed. Logged (once per attempt) with the host it pointed to, nothing more: the
        rest of a `Location` can carry anything, a key in a query string included."""
        host = _location_host(location)
        shown = self._scrubber(key).text(printable(host)) if host else "no host"
        log.warning(orjson.dumps({
            "event": "upstream_redirect", "provider": self.provider.name, "status": status, "locationHost": shown,
        }).decode())
        # Not retried (`redirect` is in no `retryOn`: the next answer would redirect too), but a failure of
        # the target: a provider that keeps redirecting opens its circuit like one that keeps failing.
        return RetryableError(
            f"upstream answered {status} redirecting to {shown}; redirects are never followed",
            status=502, condition="redirect", error_type="api_error",
        )

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
        # Quota gone: retrying this target only spins (HOSTILE.md U12), the next target may answer.
        if error_type in ("insufficient_quota", "billing_error"):
            return FailoverError(message, **kwargs)
        # A 429 with no hint of when to come back: the next target may well answer now.
        if effective == 429 and wait is None:
            return RateLimited(message, **kwargs)
        if effective in RETRYABLE_STATUSES or status >= 500:
            return RetryableError(message, **kwargs)
        return client_error_class(status, error_type, message)(message, **kwargs)


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


_CONTEXT_WINDOW_TYPES = frozenset({"context_length_exceeded", "string_above_max_length"})
_CONTEXT_WINDOW_TEXT = re.compile(
    r"prompt is too long"  # Anthropic: "prompt is too long: 208310 tokens > 200000 maximum"
    r"|exceed context limit"  # Anthropic: "input length and `max_tokens` exceed context limit: ..."
    r"|maximum context length"  # OpenAI and compatible servers (vLLM): "This model's maximum context length is"
    r"|context window"  # OpenAI Responses: "Your input exceeds the context window of this model"
    r"|input token count .*exceeds the maximum number of tokens",  # Gemini INVALID_ARGUMENT
    re.IGNORECASE,
)
_CONTENT_POLICY_TYPES = frozenset({"content_policy_violation", "content_filter"})


def client_error_class(status: int, error_type: str | None, message: str) -> type[ClientError]:
    """Which client error this is: the prompt does not fit the model (`context-window`), a safety system
    refused it (`content-policy`), or plainly the app's mistake. The specific code first, the
    provider's wording second; only 400-class answers about the request's content qualify."""
    if status not in (400, 413, 422):
        return ClientError
    if error_type in _CONTEXT_WINDOW_TYPES or _CONTEXT_WINDOW_TEXT.search(message):
        return ContextWindowExceeded
    if error_type in _CONTENT_POLICY_TYPES:
        return ContentRefused
    return ClientError


def _location_host(location: str | None) -> str | None:
    if not location:
        return None
    try:
        return URL(location).host or "the same host"
    except ValueError:
        return "an unparseable location"


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
