"""Status pages polled in the background: one `StatusPagePoller` per distinct page, off the request path.

Layer 2 of the three in `statuspages.py` (parsing there, deciding in `statusboard.py`). A poller owns one
distinct page (`page_key`) on its own task: jittered interval, conditional GETs (ETag / Last-Modified; a 304
repeats the last good reading), exponential backoff with jitter on failures, last good reading kept. Each
completed poll goes to its listener (the board). In a cluster it reads the operator's relay instead
(`statusrelay.py`, seen here as a `RelaySource`) and falls back to the page itself when the relay fails
twice in a row. Nothing here raises to its callers: a failed poll is an unusable `Reading`, never an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, Protocol

import aiohttp

from . import __version__
from .durations import retry_after
from .policy import StatusPage
from .statuspages import DEFAULT_MIN_INTERVAL, MAX_BODY, Reading, page_key, parse_page, title_hint

log = logging.getLogger(__name__)

RELAY_FALLBACK_AFTER = 2
"""Consecutive failed relay reads after which a sidecar polls the page itself."""
RELAY_READ_INTERVAL = 5.0
"""A sidecar reads the relay every min(this, pollInterval)."""
DEFAULT_TIMEOUT = 5.0
MAX_BACKOFF = 300.0
USER_AGENT = f"llmroute/{__version__} (status-page poller; +https://llmroute.dev)"

Source = Literal["direct", "relay"]


# ----- backoff ------------------------------------------------------------------------------------------


def backoff_cap(interval: float) -> float:
    """The longest wait between polls of a failing page: 16 intervals, at most 5 min, at least 1."""
    return max(interval, min(16 * interval, MAX_BACKOFF))


def backoff_delay(interval: float, failures: int, rng: random.Random, hint: float | None = None) -> float:
    """Wait before the next poll after `failures` consecutive failures (S2).

    Exponential (2, 4, 8 … intervals) with jitter over the upper half, capped by `backoff_cap`; a
    `retry-after` from the status host (429/503) is honoured up to the cap.
    """
    cap = backoff_cap(interval)
    base = min(interval * 2 ** min(failures, 20), cap)
    delay = rng.uniform(base / 2, base)
    if hint is not None:
        delay = max(delay, min(hint, cap))
    return delay


# ----- the relay, as pollers see it ---------------------------------------------------------------------


@dataclass(frozen=True)
class RelayEntry:
    """One page as the relay serves it: the relay poller's latest reading and its poll counter."""

    reading: Reading | None
    """None before the relay's first poll of the page completed."""
    seq: int
    epoch: str
    """The relay poller's identity; a new one (relay restarted, page re-added) restarts `seq`."""
    polled_at: float | None = None
    """Wall time of the relay's poll (display only: node clocks differ)."""
    age: float | None = None
    """Seconds since the relay's poll, by the relay's monotonic clock (skew-free staleness)."""


class RelayUnavailable(Exception):
    """The relay could not be read, or answered something that is not a relay document."""


class RelaySource(Protocol):
    """Where a sidecar's pollers read pages polled by someone else (`statusrelay.RelayClient`)."""

    async def fetch(self, max_age: float) -> Mapping[str, RelayEntry]:
        """Page key -> entry; a result younger than `max_age` may be reused. Raises RelayUnavailable."""
        ...


# ----- polling ------------------------------------------------------------------------------------------


class _FetchError(Exception):
    def __init__(self, reason: str, detail: str, hint: float | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.hint = hint


async def _read_capped(response: aiohttp.ClientResponse, cap: int) -> bytes:
    if response.content_length is not None and response.content_length > cap:
        raise _FetchError("too_large", f"Content-Length {response.content_length} exceeds {cap}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > cap:
            raise _FetchError("too_large", f"body exceeds {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def iso_time(wall: float | None) -> str | None:
    """A wall-clock time for display (UTC, `Z`), None stays None."""
    if wall is None:
        return None
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class StatusPagePoller:
    """Polls one distinct status page on its own task and keeps what it learnt. Never raises to callers.

    `reading` is the outcome of the latest completed poll (for a 304: the reading it confirmed), `seq`
    counts completed polls (the relay publishes it so sidecars count each real poll once), `last_good*`
    describe the latest usable one. Every completed poll is handed to `listener` (the board).
    """

    def __init__(
        self,
        page: StatusPage,
        session: aiohttp.ClientSession,
        *,
        listener: Callable[[str, Reading], None] | None = None,
        relay: RelaySource | None = None,
        min_interval: float = DEFAULT_MIN_INTERVAL,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.page = page
        self.key = page_key(page)
        self.epoch = secrets.token_hex(6)
        """Changes when a poller is re-created: with `seq`, tells relay readers a reading is new."""
        self._session = session
        self._listener = listener
        self._relay = relay
        self._min_interval = min_interval
        self._timeout = timeout
        self._clock = clock
        self._wall = wall_clock
        self._rng = rng or random.Random()
        self.seq = 0
        self.reading: Reading | None = None
        self.last_poll_at: float | None = None
        self.last_poll_wall: float | None = None
        self.last_good: Reading | None = None
        self.last_good_at: float | None = None
        self.last_good_wall: float | None = None
        self.last_error: str | None = None
        self.last_error_wall: float | None = None
        self.failures = 0
        """Consecutive unusable direct polls (drives the backoff)."""
        self.relay_failures = 0
        self.relay_error: str | None = None
        self.source: Source = "relay" if relay is not None else "direct"
        self.requests = 0
        """Requests sent to the status page itself."""
        self.not_modified = 0
        self.errors: Counter[str] = Counter()
        """Unusable polls by reason (`status_fetch_errors{reason}`)."""
        self._etag: str | None = None
        self._last_modified: str | None = None
        self._validated: Reading | None = None
        self._hint: float | None = None
        self._relay_seen: dict[str, int] = {}
        """Relay poller epoch -> the last seq read from it. The relay Service balances over several
        replicas, each with its own poller (epoch): every poll of each counts once, whichever replica
        answers and however often."""
        self._relay_polled_at: float | None = None
        """Wall time of the newest relay reading applied: an older one (another replica's, read later)
        never replaces it."""
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def interval(self) -> float:
        return max(self.page.poll_interval, self._min_interval, 0.01)  # never a busy loop

    @property
    def relay_interval(self) -> float:
        return min(RELAY_READ_INTERVAL, self.interval)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def update_page(self, page: StatusPage) -> None:
        """Same page, new settings (the shortest pollInterval of the providers sharing it).

        A shorter interval wakes a sleeping poller (it polls at once, then keeps the new pace).
        """
        sooner = page.poll_interval < self.page.poll_interval
        self.page = page
        if sooner:
            self._wake.set()

    # -- lifecycle
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"statuspage {self.key}")

    def cancel(self) -> asyncio.Task[None] | None:
        """Stop polling; returns the task to await (if one was running)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        return task

    async def stop(self) -> None:
        task = self.cancel()
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    def age(self) -> float | None:
        """Seconds since the latest completed poll (monotonic), None before the first."""
        return None if self.last_poll_at is None else max(0.0, self._clock() - self.last_poll_at)

    async def _run(self) -> None:
        while True:
            try:
                await self.poll_once()
                delay = self.next_delay()
            except Exception:  # a bug must not end the poller; the page simply stays unread
                log.exception("status page %s: poller error", self.page.url)
                delay = self.interval
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    def next_delay(self) -> float:
        if self._relay is not None and self.source == "relay":
            return self.relay_interval * self._rng.uniform(0.9, 1.1)
        if self.failures:
            return backoff_delay(self.interval, self.failures, self._rng, self._hint)
        return self.interval * self._rng.uniform(0.9, 1.1)

    # -- one cycle
    async def poll_once(self) -> None:
        """One cycle: the relay if there is one (falling back to the page), else the page."""
        async with self._lock:
            if self._relay is not None:
                if await self._read_relay():
                    if self.source != "relay":
                        log.info("status page %s: reading from the relay again", self.page.url)
                    self.relay_failures, self.relay_error, self.source = 0, None, "relay"
                    return
                self.relay_failures += 1
                if self.source == "relay" and self.relay_failures < RELAY_FALLBACK_AFTER:
                    return
                if self.source == "relay":
                    log.warning(
                        "status page %s: relay failed %d times (%s); polling the page directly",
                        self.page.url,
                        self.relay_failures,
                        self.relay_error,
                    )
                self.source = "direct"
            await self._poll_direct()

    async def _read_relay(self) -> bool:
        """Apply the relay's reading if it is new; False when the relay cannot serve this page."""
        assert self._relay is not None
        try:
            pages = await self._relay.fetch(max_age=self.relay_interval / 2)
        except RelayUnavailable as exc:
            self.relay_error = str(exc)
            return False
        entry = pages.get(self.key)
        if entry is None:
            self.relay_error = "the relay does not serve this page"
            return False
        if entry.seq == 0 or entry.reading is None:
            return True  # known to the relay, first poll still running
        limit = 2 * backoff_cap(self.interval) + self._timeout + self.relay_interval
        if entry.age is not None and entry.age > limit:
            self.relay_error = f"the relay's reading is {entry.age:.0f}s old"
            return False
        if entry.seq <= self._relay_seen.get(entry.epoch, 0):
            return True  # this poll was applied already
        if len(self._relay_seen) >= 8 and entry.epoch not in self._relay_seen:
            self._relay_seen.pop(next(iter(self._relay_seen)))  # replicas come and go: keep the recent ones
        self._relay_seen[entry.epoch] = entry.seq
        if entry.polled_at is not None:
            if self._relay_polled_at is not None and entry.polled_at < self._relay_polled_at:
                return True  # older than what we have (another replica polled earlier)
            self._relay_polled_at = entry.polled_at
        self._complete(entry.reading, entry.polled_at)
        return True

    async def _poll_direct(self) -> None:
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if self._validated is not None:
            if self._etag:
                headers["If-None-Match"] = self._etag
            if self._last_modified:
                headers["If-Modified-Since"] = self._last_modified
        self.requests += 1
        self._hint = None
        try:
            async with self._session.get(
                self.page.url,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                max_redirects=3,
            ) as response:
                if response.status == 304 and self._validated is not None:
                    self.not_modified += 1
                    reading = self._validated
                elif response.status != 200:
                    hint = retry_after(response.headers) if response.status in (429, 503) else None
                    raise _FetchError("http", f"HTTP {response.status}{await _title(response)}", hint)
                else:
                    body = await _read_capped(response, MAX_BODY)
                    reading = parse_page(self.page, body, response.headers.get("Content-Type"))
                    etag = response.headers.get("ETag")
                    last_modified = response.headers.get("Last-Modified")
                    if reading.usable:
                        self._validated, self._etag, self._last_modified = reading, etag, last_modified
        except _FetchError as exc:
            reading, self._hint = Reading.failed(exc.reason, exc.detail), exc.hint
        except TimeoutError:
            reading = Reading.failed("timeout", f"no answer within {self._timeout:g}s")
        except aiohttp.ClientError as exc:
            reading = Reading.failed("connection", f"{type(exc).__name__}: {exc}"[:200])
        except ValueError as exc:  # e.g. an unusable URL
            reading = Reading.failed("request", str(exc)[:200])
        except Exception as exc:  # a surprise from the HTTP stack must not escape into poll_now()
            log.exception("status page %s: unexpected error while polling", self.page.url)
            reading = Reading.failed("internal", f"{type(exc).__name__}: {exc}"[:200])
        if reading.usable:
            self.failures, self._hint = 0, None
        else:
            self.failures += 1
        self._complete(reading, None)

    def _complete(self, reading: Reading, polled_wall: float | None) -> None:
        previous = self.reading
        self.seq += 1
        self.reading = reading
        self.last_poll_at = self._clock()
        self.last_poll_wall = polled_wall if polled_wall is not None else self._wall()
        if reading.usable:
            self.last_good = reading
            self.last_good_at, self.last_good_wall = self.last_poll_at, self.last_poll_wall
            if previous is not None and not previous.usable:
                log.info("status page %s: readable again (%s)", self.page.url, reading.state)
        else:
            self.last_error, self.last_error_wall = reading.error, self.last_poll_wall
            self.errors[reading.reason or "unknown"] += 1
            if previous is None or previous.usable:
                log.warning("status page %s unusable (%s); not shedding on it", self.page.url, reading.error)
        if self._listener is not None:
            try:
                self._listener(self.key, reading)
            except Exception:
                log.exception("status page %s: listener failed", self.page.url)


async def _title(response: aiohttp.ClientResponse) -> str:
    """` (title)` of an HTML error page (WAF challenge, CDN error), for the error message."""
    try:
        head = await response.content.read(8192)
    except (aiohttp.ClientError, TimeoutError):
        return ""
    return title_hint(head)
