"""Rate-limit-aware shedding: stop calling a provider whose own headers say it has nothing left.

Every answer from Anthropic and OpenAI says how much of the organisation's rate limit is left and when it
resets; without reading that, a sidecar learns a limit is spent only by collecting 429s, spending a call,
backoff and budget on each. Here, the latest reading of each dimension is kept per provider and API key
(limits belong to the key's organisation; the key itself is never stored, only a short fingerprint), and
before an attempt a pure decision says: proceed, wait for a reset that comes within the route's budget
(as a `retry-after` would be honoured), or shed to the next target without calling.

    Anthropic  anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}
               reset: RFC 3339 time ("2026-12-03T18:40:12Z"); read against the response's `Date` when the
               local clock disagrees with it by more than CLOCK_SKEW_TOLERANCE
    OpenAI     x-ratelimit-{limit,remaining,reset}-{requests,tokens}
               reset: a Go-like duration from now ("6m0s", "1s", "20ms")

Only the header family of the provider's own type is read (a proxy in between adds its own
`x-ratelimit-*` or `ratelimit-*` headers, which must not pass for Anthropic's). What cannot be trusted is
ignored, never shed on, and counted (`llmroute_ratelimit_headers_ignored_total{provider,reason}`):

    malformed     a count that is not a non-negative integer, a limit of 0, a reset that does not parse
    inconsistent  more remaining than the limit; the same header twice with different values
    incomplete    a remaining count without a reset (nothing says when it stops applying)
    reset-past    a reset more than CLOCK_SKEW_TOLERANCE in the past
    reset-too-far a reset more than MAX_RESET_AHEAD ahead (no provider window is that long)

A reading stops applying at its reset. A dimension with no headers at all (Gemini, most compatible
servers) is simply unknown: it changes nothing.

The need of a request per dimension: one request; for `tokens` and `input-tokens` the request's estimated
input (`estimate_input_tokens`: about four characters per token, the providers' own rule of thumb for
English, plus a fixed allowance per image); for `output-tokens` one token (the answer's length is unknown
before it is generated). A dimension is exhausted when `remaining - need < minRemaining`.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .durations import parse_duration
from .keys import KeySource
from .messages import ChatRequest, Image, Text, ToolCall, ToolResult
from .policy import Provider, RateLimits

SHED_REASON: Final = "rate-limit"
CLOCK_SKEW_TOLERANCE = 2.0
"""Seconds a reset may lie in the past, or the local clock may differ from the response's `Date`, before
either counts: HTTP dates have a resolution of one second."""
MAX_RESET_AHEAD = 24 * 3600.0
"""The longest window providers use is a day (requests per day); a reset further ahead is not believed."""
CHARS_PER_TOKEN = 4
IMAGE_TOKENS = 1600
"""An image's input tokens: the upper end of what Anthropic bills for one (about width x height / 750)."""
MAX_KEYS_PER_PROVIDER = 8
"""Readings kept per provider: the current key and a few rotated ones (a rotation starts a new entry)."""

TOKEN_DIMENSIONS = frozenset({"tokens", "input-tokens"})
_DIMENSIONS = {
    "anthropic": ("requests", "tokens", "input-tokens", "output-tokens"),
    "openai": ("requests", "tokens"),
}
_COUNT = re.compile(r"^[0-9]{1,15}$")


_CONFLICTING = "\0"
"""`_value` of a header sent several times with different values (NUL cannot occur in a header value)."""


def _anthropic_names(dimension: str) -> tuple[str, str, str]:
    prefix = f"anthropic-ratelimit-{dimension}"
    return f"{prefix}-limit", f"{prefix}-remaining", f"{prefix}-reset"


def _openai_names(dimension: str) -> tuple[str, str, str]:
    return f"x-ratelimit-limit-{dimension}", f"x-ratelimit-remaining-{dimension}", f"x-ratelimit-reset-{dimension}"


# ----- readings ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Reading:
    """One dimension of a provider's rate limit as its latest answer reported it."""

    dimension: str
    """requests | tokens | input-tokens | output-tokens"""
    remaining: int
    limit: int | None
    reset_at: float
    """When the window resets, on the monotonic clock; after it, the reading no longer applies."""


@dataclass(slots=True)
class Parsed:
    """What one response's headers said: the readings to trust, and why others were ignored."""

    readings: list[Reading]
    ignored: list[str]


def parse_headers(dialect: str, headers: Mapping[str, str], now: float, wall: float) -> Parsed:
    """The rate-limit readings of one response in `dialect`'s header names (`now`: monotonic, `wall`: epoch
    seconds, both taken when the response arrived)."""
    parsed = Parsed([], [])
    dimensions = _DIMENSIONS.get(dialect)
    if dimensions is None:
        return parsed
    names = _anthropic_names if dialect == "anthropic" else _openai_names
    server_wall: float | None = None
    for dimension in dimensions:
        limit_name, remaining_name, reset_name = names(dimension)
        raw_limit, raw_remaining, raw_reset = (_value(headers, n) for n in (limit_name, remaining_name, reset_name))
        if raw_remaining is None and raw_reset is None:
            continue  # nothing reported for this dimension: unknown, not hostile
        if _CONFLICTING in (raw_limit, raw_remaining, raw_reset):
            parsed.ignored.append("inconsistent")  # one header, several different values
            continue
        if raw_remaining is None or raw_reset is None:
            parsed.ignored.append("incomplete")
            continue
        remaining = _count(raw_remaining)
        limit = _count(raw_limit) if raw_limit is not None else None
        if remaining is None or (raw_limit is not None and not limit):
            parsed.ignored.append("malformed")
            continue
        if limit is not None and remaining > limit:
            parsed.ignored.append("inconsistent")
            continue
        if dialect == "anthropic":
            if server_wall is None:
                server_wall = _server_clock(headers, wall)
            reset_in = _rfc3339_in(raw_reset, server_wall)
        else:
            reset_in = _duration(raw_reset)
        if reset_in is None:
            parsed.ignored.append("malformed")
        elif reset_in < -CLOCK_SKEW_TOLERANCE:
            parsed.ignored.append("reset-past")
        elif reset_in > MAX_RESET_AHEAD:
            parsed.ignored.append("reset-too-far")
        elif reset_in > 0:
            parsed.readings.append(Reading(dimension, remaining, limit, now + reset_in))
        # a reset at or just before now: the window has already turned over; nothing to keep
    return parsed


def _value(headers: Mapping[str, str], name: str) -> str | None:
    """The header's value; _CONFLICTING when it came several times with different values (a proxy added
    its own)."""
    getall = getattr(headers, "getall", None)
    if getall is not None:
        values = {v.strip() for v in getall(name, ())}
        if len(values) > 1:
            return _CONFLICTING
        return values.pop() if values else None
    value = headers.get(name)
    return None if value is None else value.strip()


def _count(text: str) -> int | None:
    return int(text) if _COUNT.match(text) else None


def _duration(text: str) -> float | None:
    try:
        return parse_duration(text)
    except ValueError:
        return None


def _rfc3339_in(text: str, server_wall: float) -> float | None:
    """Seconds from the server's now to an RFC 3339 time with a zone (None: not one)."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return when.timestamp() - server_wall


def _server_clock(headers: Mapping[str, str], wall: float) -> float:
    """The provider's "now": the local clock, unless the response's `Date` says it is off by more than
    the tolerance (then resets are read against the server's own clock, E1 of HOSTILE.md)."""
    raw = headers.get("date")
    if raw is None:
        return wall
    try:
        date = email.utils.parsedate_to_datetime(raw).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return wall
    return wall if abs(wall - date) <= CLOCK_SKEW_TOLERANCE else date + 0.5


# ----- the decision ------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Proceed:
    """Nothing known stands in the way: call."""


@dataclass(frozen=True, slots=True)
class Wait:
    """Exhausted until a reset within the budget: wait `seconds`, then decide again."""

    seconds: float
    dimension: str


@dataclass(frozen=True, slots=True)
class Shed:
    """Exhausted until after the budget: go to the next target without calling."""

    reset_in: float
    dimension: str
    reason: str = SHED_REASON


Verdict = Proceed | Wait | Shed
PROCEED: Final = Proceed()


def need(dimension: str, estimated_input_tokens: int) -> int:
    """What one request takes of a dimension (see the module docstring)."""
    return max(1, estimated_input_tokens) if dimension in TOKEN_DIMENSIONS else 1


def decide(
    readings: Iterable[Reading], now: float, budget_left: float, estimated_input_tokens: int, min_remaining: int
) -> Verdict:
    """Proceed, wait for the latest reset among the exhausted dimensions when it comes within
    `budget_left`, else shed. A reading whose reset has passed no longer applies; a request estimated
    larger than a dimension's whole limit is left to the provider to judge (the estimate is rough)."""
    blocked: Reading | None = None
    for reading in readings:
        if reading.reset_at <= now:
            continue
        wanted = need(reading.dimension, estimated_input_tokens)
        if reading.limit is not None and wanted > reading.limit:
            continue
        if reading.remaining - wanted >= min_remaining:
            continue
        if blocked is None or reading.reset_at > blocked.reset_at:
            blocked = reading
    if blocked is None:
        return PROCEED
    wait = blocked.reset_at - now
    if wait <= budget_left:
        return Wait(wait, blocked.dimension)
    return Shed(wait, blocked.dimension)


def estimate_input_tokens(request: ChatRequest) -> int:
    """A cheap upper-leaning estimate of a request's input tokens: characters / 4 over the system prompt,
    the messages (text, tool calls and results) and the tool definitions, plus IMAGE_TOKENS per image."""
    chars = len(request.effective_system or "") + len(request.prefill or "")
    images = 0
    for message in request.messages:
        for part in message.parts:
            if isinstance(part, Text):
                chars += len(part.text)
            elif isinstance(part, ToolResult):
                chars += len(part.content)
            elif isinstance(part, ToolCall):
                chars += len(part.name) + len(repr(part.arguments))
            elif isinstance(part, Image):
                images += 1
    for tool in request.tools:
        chars += len(tool.name) + len(tool.description or "") + len(repr(tool.parameters))
    return chars // CHARS_PER_TOKEN + 1 + images * IMAGE_TOKENS


# ----- the book: the latest readings of every provider and key -------------------------------------------------
def fingerprint(key: str | None) -> str:
    """A short, non-reversible name for an API key (a key has far more entropy than 32 bits of hash)."""
    if not key:
        return "none"
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:8]


@dataclass(slots=True)
class _Entry:
    readings: dict[str, Reading]
    observed_at: float


class RateLimitBook:
    """The latest reading of each dimension per provider and key, for the sidecar's life (it survives
    policy reloads, like the circuits); the ignored headers counted per provider and reason."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.wall = wall
        self._entries: dict[str, dict[str, _Entry]] = {}
        """provider -> key fingerprint -> latest readings (insertion order: least recently updated first)"""
        self._latest_key: dict[str, str] = {}
        self.ignored: Counter[tuple[str, str]] = Counter()

    def record(self, provider: str, dialect: str, key_fingerprint: str, headers: Mapping[str, str]) -> None:
        """Keep what one response (any status, plain or streamed) says; a dimension it does not mention
        keeps its previous reading until that one's reset."""
        now = self.clock()
        parsed = parse_headers(dialect, headers, now, self.wall())
        for reason in parsed.ignored:
            self.ignored[(provider, reason)] += 1
        if not parsed.readings:
            return
        keys = self._entries.setdefault(provider, {})
        entry = keys.pop(key_fingerprint, None)
        if entry is None:
            entry = _Entry({}, now)
            while len(keys) >= MAX_KEYS_PER_PROVIDER:
                del keys[next(iter(keys))]
        keys[key_fingerprint] = entry  # most recently updated last
        entry.observed_at = now
        for reading in parsed.readings:
            entry.readings[reading.dimension] = reading
        self._latest_key[provider] = key_fingerprint

    def readings(self, provider: str, key_fingerprint: str) -> list[Reading]:
        """The readings that still apply (reset not passed yet)."""
        entry = self._entries.get(provider, {}).get(key_fingerprint)
        if entry is None:
            return []
        now = self.clock()
        return [r for r in entry.readings.values() if r.reset_at > now]

    def latest(self) -> Iterator[tuple[str, str, _Entry]]:
        """(provider, key fingerprint, entry) of each provider's most recently reporting key."""
        for provider, key in self._latest_key.items():
            entry = self._entries.get(provider, {}).get(key)
            if entry is not None:
                yield provider, key, entry

    def snapshot(self) -> dict[str, object]:
        """`/status`: per provider, the latest reading of its most recently reporting key (never the key)."""
        now = self.clock()
        out: dict[str, object] = {}
        for provider, key, entry in self.latest():
            dimensions: dict[str, object] = {}
            for dimension, r in entry.readings.items():
                live = r.reset_at > now
                dimensions[dimension] = {
                    "limit": r.limit,
                    "remaining": r.remaining if live else r.limit,
                    "resetInSeconds": round(max(0.0, r.reset_at - now), 3),
                    "reset": not live,
                }
            out[provider] = {"key": key, "observedSecondsAgo": round(now - entry.observed_at, 3),
                             "dimensions": dimensions}
        for (provider, reason), count in self.ignored.items():
            item = out.setdefault(provider, {"key": None, "observedSecondsAgo": None, "dimensions": {}})
            assert isinstance(item, dict)
            item.setdefault("ignoredHeaders", {})[reason] = count
        return out


class RateLimitCollector(Collector):
    """The book as Prometheus metrics, read at scrape time. After a reset, a dimension is full again (both
    providers define the reset as the moment the limit is replenished): ratio 1, 0 seconds to reset."""

    def __init__(self, book: RateLimitBook) -> None:
        self.book = book

    def collect(self) -> Iterator[Metric]:
        ratio = GaugeMetricFamily(
            "llmroute_ratelimit_remaining_ratio",
            "Share of the provider's rate limit left (remaining / limit), from its latest answer.",
            labels=["provider", "dimension"],
        )
        reset = GaugeMetricFamily(
            "llmroute_ratelimit_reset_seconds",
            "Seconds until the provider's rate-limit window resets, from its latest answer.",
            labels=["provider", "dimension"],
        )
        ignored = CounterMetricFamily(
            "llmroute_ratelimit_headers_ignored",
            "Rate-limit headers ignored as untrustworthy, by reason.",
            labels=["provider", "reason"],
        )
        now = self.book.clock()
        for provider, _key, entry in self.book.latest():
            for dimension, r in entry.readings.items():
                live = r.reset_at > now
                if r.limit:
                    ratio.add_metric([provider, dimension], r.remaining / r.limit if live else 1.0)
                reset.add_metric([provider, dimension], max(0.0, r.reset_at - now))
        for (provider, reason), count in sorted(self.book.ignored.items()):
            ignored.add_metric([provider, reason], count)
        yield ratio
        yield reset
        yield ignored


# ----- one provider, as an adapter and the engine see it --------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Held:
    """What `ProviderLimits.hold` did: seconds waited for resets, and whether to shed."""

    waited: float = 0.0
    shed: bool = False


class ProviderLimits:
    """One provider's rate limits under the current policy: its adapter records every response's headers,
    the engine asks `hold` before each attempt."""

    __slots__ = ("_fingerprints", "book", "keys", "provider", "settings")

    def __init__(self, book: RateLimitBook, provider: Provider, keys: KeySource) -> None:
        self.book = book
        self.provider = provider
        self.settings: RateLimits = provider.rate_limits
        self.keys = keys
        self._fingerprints: tuple[str | None, str] = (None, fingerprint(None))

    def _fingerprint(self) -> str:
        key = self.keys.current()
        if key != self._fingerprints[0]:  # hashed once per key, not per request
            self._fingerprints = (key, fingerprint(key))
        return self._fingerprints[1]

    def record(self, headers: Mapping[str, str]) -> None:
        self.book.record(self.provider.name, self.provider.type, self._fingerprint(), headers)

    def verdict(self, budget_left: float, estimate: Callable[[], int]) -> Verdict:
        """The decision for one attempt now (`estimate` is only called when a token reading applies)."""
        if not self.settings.enabled:
            return PROCEED
        readings = self.book.readings(self.provider.name, self._fingerprint())
        if not readings:
            return PROCEED
        tokens = estimate() if any(r.dimension in TOKEN_DIMENSIONS for r in readings) else 0
        return decide(readings, self.book.clock(), budget_left, tokens, self.settings.min_remaining)

    async def hold(self, until: float, estimate: Callable[[], int], may_shed: bool) -> Held:
        """Before an attempt: wait out resets that come before `until` (monotonic), then say whether to
        shed. Without another target to go to (`may_shed` False) an exhausted provider is called anyway:
        its answer (a 429, or a limit the headers got wrong) is better than none."""
        waited = 0.0
        while True:
            verdict = self.verdict(until - self.book.clock(), estimate)
            if isinstance(verdict, Wait):
                await asyncio.sleep(verdict.seconds)
                waited += verdict.seconds
                continue
            return Held(waited, shed=isinstance(verdict, Shed) and may_shed)
