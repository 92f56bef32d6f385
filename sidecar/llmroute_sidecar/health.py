"""What each target's recent history says: circuit state, retry coalescing and hot-hot weights.

The circuit separates a microspike from an outage by *time*, never by a bare failure count: a target
opens when it has failed retryably, with no success in between, for longer than `openAfter` and at least
`minFailures` times (a streak also ends when no attempt failed for longer than `openAfter`: without
traffic there is no evidence either way). While open, requests skip it at once, and one request per
(jittered) `probeInterval` still tries it; the first success closes it. Client errors say nothing about
health and are not counted.

Retry coalescing: when another request's attempt on this target failed *after* my own last attempt, my
retry now would almost surely fail too, so it is skipped (no upstream call, no budget spent) and I back
off again. During a microspike this keeps the extra load near one call per backoff step instead of one
per waiting request. Waiters do not sleep through news: a success wakes every one of them to retry at
once, and the circuit opening wakes them to shed at once (`news()`), instead of at the end of a backoff
wait of up to `backoff.max`.

Everything runs on the event loop thread: no locks, monotonic clock.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Literal

CircuitState = Literal["closed", "open"]
_WINDOW = 30.0  # seconds of history kept for hot-hot weights
_LATENCY_FLOOR = 0.05  # seconds: latencies below this count as equal for hot-hot weights


class TargetHealth:
    __slots__ = (
        "_clock",
        "_news",
        "_next_probe",
        "_outcomes",
        "failures",
        "last_failure",
        "last_success",
        "min_failures",
        "open_after",
        "opened_at",
        "probe_interval",
        "streak_start",
    )

    def __init__(
        self,
        open_after: float,
        min_failures: int,
        probe_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.open_after = open_after
        self.min_failures = min_failures
        self.probe_interval = probe_interval
        self._clock = clock
        self.streak_start: float | None = None
        self.failures = 0
        self.opened_at: float | None = None
        self._next_probe = 0.0
        self.last_failure = -1.0
        self.last_success = -1.0
        self._outcomes: deque[tuple[float, bool, float]] = deque()
        self._news: asyncio.Event | None = None

    def news(self) -> asyncio.Event:
        """Set when a retry waiting on this target should look again: a success, or the circuit opening.
        A new event follows each piece of news (wait on the one you got, with your backoff as timeout)."""
        if self._news is None:
            self._news = asyncio.Event()
        return self._news

    def _announce(self) -> None:
        if self._news is not None:
            self._news.set()
            self._news = None

    def configure(self, open_after: float, min_failures: int, probe_interval: float) -> None:
        """A policy reload keeps the history and adopts the new thresholds."""
        self.open_after, self.min_failures, self.probe_interval = open_after, min_failures, probe_interval

    @property
    def state(self) -> CircuitState:
        return "open" if self.opened_at is not None else "closed"

    def allow(self) -> bool:
        """May a request try this target now? While open: only the one probe per interval."""
        if self.opened_at is None:
            return True
        now = self._clock()
        if now >= self._next_probe:
            self._next_probe = now + self.probe_interval * random.uniform(0.8, 1.2)
            return True
        return False

    def record_success(self, latency: float) -> None:
        now = self._clock()
        self.last_success = now
        self.streak_start = None
        self.failures = 0
        self.opened_at = None
        self._remember(now, True, latency)
        self._announce()

    def record_failure(self, latency: float) -> None:
        now = self._clock()
        started = now - latency
        quiet = self.opened_at is None and started - self.last_failure > self.open_after
        if self.streak_start is None or quiet:
            # The failing attempt starts a streak. A closed target that saw no attempt fail for longer
            # than openAfter before this one starts afresh too: two microspikes with no traffic between
            # them are not one long outage.
            self.streak_start = started
            self.failures = 0
        self.last_failure = now
        self.failures += 1
        if (
            self.opened_at is None
            and self.failures >= self.min_failures
            and now - self.streak_start >= self.open_after
        ):
            self.opened_at = now
            self._next_probe = now + self.probe_interval * random.uniform(0.8, 1.2)
            self._announce()
        self._remember(now, False, latency)

    def failed_since(self, moment: float) -> bool:
        """Did an attempt fail after `moment` with no success since? (retry coalescing)"""
        return self.last_failure > moment and self.last_failure > self.last_success

    def _remember(self, now: float, ok: bool, latency: float) -> None:
        self._outcomes.append((now, ok, latency))
        while self._outcomes and self._outcomes[0][0] < now - _WINDOW:
            self._outcomes.popleft()

    def weight(self) -> float:
        """Hot-hot routing weight, higher is healthier: success rate squared over the window, divided by
        the mean latency of the successes (floored, so fast targets are not told apart by noise), halved
        for each retryable failure since the last success. A target failing *now* is avoided at once
        (a 30 s window of past successes must not keep it in rotation), yet still drawn now and then,
        which is how it earns its share back. A target without history is as good as the best: tried."""
        now = self._clock()
        while self._outcomes and self._outcomes[0][0] < now - _WINDOW:
            self._outcomes.popleft()
        if not self._outcomes:
            return 1.0 / _LATENCY_FLOOR
        successes = [latency for _, ok, latency in self._outcomes if ok]
        rate = len(successes) / len(self._outcomes)
        mean_latency = sum(successes) / len(successes) if successes else 1.0
        return (rate**2) / max(mean_latency, _LATENCY_FLOOR) * 0.5 ** min(self.failures, 40)

    def snapshot(self) -> dict[str, object]:
        now = self._clock()
        return {
            "state": self.state,
            "failures": self.failures,
            "failingFor": round(now - self.streak_start, 3) if self.streak_start is not None else 0.0,
            "openFor": round(now - self.opened_at, 3) if self.opened_at is not None else None,
        }
