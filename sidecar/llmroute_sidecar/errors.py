"""What can go wrong, and what each failure means for routing — decided once, here.

    LLMRouteError
    ├── RequestError          the app's request is unusable (bad JSON, missing variable, unknown route,
    │                         too large, body never finished). Answered by us; never sent upstream,
    │                         never counted against a provider.
    ├── UpstreamError         one attempt on one target failed. The subclass is the routing decision:
    │   ├── RetryableError    transient (429, 5xx, 529, timeout, connection, garbage 200, an error event
    │   │                     before the first token): retry the same target within budget, then shed.
    │   ├── FailoverError     this target cannot answer this request now (quota gone, failed quality
    │   │   │                 check, untranslatable request, open circuit): no retry, go straight to
    │   │   │                 the next target.
    │   │   └── RateLimited   a 429 with no hint of when to come back: fail over at once, but retried
    │   │                     with backoff on the last target that can take the request.
    │   └── ClientError       the provider refused the request itself (4xx other than 429): it goes back
    │       │                 to the app as the provider sent it; no fallback, no retry. Except the
    │       │                 classes a route's `fallbackOn` names, which move to the next target:
    │       ├── ContextWindowExceeded   the prompt is too long for this model (`context-window`);
    │       └── ContentRefused          a safety system refused the request (`content-policy`).
    └── StreamBroken          the upstream failed after the first byte reached the app (committed): the
                              only honest move is a provider-format error event, never a silent end.

`UpstreamError.condition` is what a route's `retryOn` list speaks: an HTTP status, `timeout` or
`connection`. Messages never contain API keys: adapters build them from status codes and provider error
bodies, not from request headers, and every UpstreamError an adapter raises is scrubbed of the keys the
sidecar holds and of the app's own before anyone reads it (`scrubbing.py`).
"""

from __future__ import annotations

from collections.abc import Mapping


class LLMRouteError(Exception):
    """Base of every error llmroute raises on purpose."""


class RequestError(LLMRouteError):
    """The app's request cannot be served as sent; answered in the caller's own error shape."""

    def __init__(self, status: int, message: str, error_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type


class UpstreamError(LLMRouteError):
    """One failed attempt: who failed, how, and what the provider said."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        condition: int | str | None = None,
        error_type: str = "api_error",
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        content_type: str | None = None,
        dialect: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.condition: int | str = condition if condition is not None else (status or "connection")
        self.error_type = error_type
        self.retry_after = retry_after
        self.headers = dict(headers or {})
        self.body = body
        self.content_type = content_type
        self.dialect = dialect
        """The provider wire format `body` is in (so it can go back verbatim to an app of that dialect)."""

    @property
    def label(self) -> str:
        """Short description for `attempts` and logs (never a key or prompt: built from types)."""
        if self.condition in ("untranslatable", "validation"):
            return f"{self.condition}: {self.message}"
        return str(self.condition) if self.status is None else f"{self.status} {self.error_type}"


class RetryableError(UpstreamError):
    """A transient fault: worth another attempt on the same target."""


class FailoverError(UpstreamError):
    """The target cannot answer this request now: skip to the next target without retrying."""


class RateLimited(FailoverError):
    """A 429 without `retry-after`: the next target may well answer now; with none left, back off."""


class ClientError(UpstreamError):
    """The provider refused the request itself: return it to the app, no fallback."""

    fallback_class: str | None = None
    """The `fallbackOn` class that lets this error move to the next target (None: never)."""


class ContextWindowExceeded(ClientError):
    """The prompt does not fit this model's context window; a larger one may take it as it is."""

    fallback_class = "context-window"


class ContentRefused(ClientError):
    """A content-policy or safety system refused the request; another provider's might not."""

    fallback_class = "content-policy"


class StreamBroken(LLMRouteError):
    """The upstream stream failed after the answer was committed to the app.

    `condition` is the upstream failure's (`timeout` for a stall: HOSTILE U5), `draining` when the
    sidecar itself is shutting down (E5)."""

    def __init__(self, message: str, error_type: str = "api_error", condition: int | str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type
        self.condition = condition
