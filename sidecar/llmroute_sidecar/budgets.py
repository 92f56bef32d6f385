"""Retry budgets: a fleet of sidecars must not turn a provider's brownout into a retry storm.

Finagle/Linkerd's token budget, per provider: every original request deposits `ratio` of a retry,
every retry withdraws one, and deposits expire after `window`; `minPerSecond` keeps a floor so that
low-traffic sidecars can still retry. Requests that are themselves SDK retries (x-stainless-retry-count
> 0) deposit nothing: they are load the app already multiplied.

Counts live in one-second buckets of a ring, so both operations are O(1) and need no timers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from .policy import RetryBudget as RetryBudgetSpec


class RetryBudget:
    __slots__ = ("_clock", "_now_bucket", "_requests", "_retries", "exhausted_count", "spec")

    def __init__(self, spec: RetryBudgetSpec, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self._clock = clock
        size = max(1, math.ceil(spec.window))
        self._requests = [0] * size
        self._retries = [0] * size
        self._now_bucket = int(clock())
        self.exhausted_count = 0

    def _advance(self) -> int:
        now = int(self._clock())
        size = len(self._requests)
        if now != self._now_bucket:
            for bucket in range(max(self._now_bucket + 1, now - size + 1), now + 1):
                self._requests[bucket % size] = 0
                self._retries[bucket % size] = 0
            self._now_bucket = now
        return now % size

    def deposit(self) -> None:
        """An original request was made."""
        self._requests[self._advance()] += 1

    def allowance(self) -> float:
        """Retries still available in the current window."""
        self._advance()
        window = len(self._requests)
        allowed = self.spec.ratio * sum(self._requests) + self.spec.min_per_second * window
        return allowed - sum(self._retries)

    def can_withdraw(self) -> bool:
        """Would a retry be allowed now? (Checked before backing off; counts a refusal like `try_withdraw`.)"""
        if self.allowance() >= 1:
            return True
        self.exhausted_count += 1
        return False

    def try_withdraw(self) -> bool:
        """Spend one retry if the budget allows it."""
        if self.allowance() >= 1:
            self._retries[self._advance()] += 1
            return True
        self.exhausted_count += 1
        return False

    def snapshot(self) -> dict[str, float]:
        allowance = self.allowance()
        return {
            "requests": float(sum(self._requests)),
            "retries": float(sum(self._retries)),
            "available": round(max(0.0, allowance), 2),
            "exhausted": float(self.exhausted_count),
        }
