"""Status-page readings turned into shed shares the engine asks in O(1): the `StatusBoard`.

Layer 3 of the three in `statuspages.py` (parsing there, polling in `statuspolling.py`). The engine owns one
board: it keeps a poller per distinct page of its providers and, per provider, the hysteresis below over
that page's readings, recomputed on every poll so `shed_share()` is a dict lookup. The operator's status
relay (`statusrelay.py`) runs a board too, configured with the providers of every policy.

Hysteresis (S8), per provider: a reading *sheds* when its state is in `shedOn` (share 1.0) or in
`partialShed` (that share). Shedding starts after `confirmAfter` consecutive usable shedding readings and
stops after `recoverAfter` consecutive usable non-shedding ones; while shedding, the share follows the
latest shedding reading (partial -> major escalates at once). A 304 is a usable reading (the page is
unchanged). Unusable readings are *no information*: they neither count towards nor reset either streak,
but after `FAIL_OPEN_AFTER` consecutive unusable readings any shed is dropped and the streaks reset
(fail open: a dead page must not keep a shed forever).

Evidence beats the page (pages lag real incidents by minutes, both ways): while a provider is shed
entirely, the engine still sends it one probe per `probeInterval` (`probe()`, one per provider across
every request; the first one `probeInterval` after the shed began). `PROBES_TO_RECOVER` consecutive
successful probes end the shedding for that provider before its page recovers (`shed_share()` answers 0
and `/status` shows `overriddenByProbes`); a failed probe resets the count. The override lasts until the
page itself stops shedding; meanwhile the circuit breaker guards the provider as it does any other.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aiohttp

from .policy import Provider, StatusPage
from .statuspages import DEFAULT_MIN_INTERVAL, UNKNOWN, Reading, page_key
from .statuspolling import DEFAULT_TIMEOUT, RelaySource, StatusPagePoller, iso_time

log = logging.getLogger(__name__)

FAIL_OPEN_AFTER = 3
"""Consecutive unusable polls after which a provider stops shedding (fail open)."""
PROBES_TO_RECOVER = 2
"""Consecutive successful probes that end a status-page shed before the page recovers: one could be
luck; two, a probe interval apart, say the provider answers again."""


# ----- hysteresis ---------------------------------------------------------------------------------------


class _Watch:
    """One provider's view of its page: the hysteresis that turns readings into a shed share."""

    def __init__(self, provider: str, page: StatusPage) -> None:
        self.provider = provider
        self.page = page
        self.key = page_key(page)
        self.share = 0.0
        self.state: str | None = None
        """The confirmed state (what `shed_share` reports); None before the first usable reading."""
        self.shedding_streak = 0
        self.clear_streak = 0
        self.unusable_streak = 0
        self.shed_since: float | None = None
        """When the current shed began (monotonic); None while not shedding."""
        self.next_probe = 0.0
        self.probe_successes = 0
        self.overridden = False
        """Probes answered: the shed is over for this provider though the page still says otherwise."""

    def settle(self, now: float) -> None:
        """After a reading: start the shed's probe clock, or forget the probes once the shed is over."""
        if self.share > 0 and self.shed_since is None:
            self.shed_since = now
            self.next_probe = 0.0
        elif self.share == 0 and self.shed_since is not None:
            self.shed_since = None
            self.probe_successes = 0
            self.overridden = False

    def same_rules(self, page: StatusPage) -> bool:
        old = self.page
        return (page_key(page), page.shed_on, page.partial_shed, page.confirm_after, page.recover_after) == (
            self.key,
            old.shed_on,
            old.partial_shed,
            old.confirm_after,
            old.recover_after,
        )

    def target(self, state: str) -> float:
        if state in self.page.shed_on:
            return 1.0
        return self.page.partial_shed.get(state, 0.0)

    def observe(self, reading: Reading) -> None:
        if not reading.usable:
            self.unusable_streak += 1
            if self.unusable_streak >= FAIL_OPEN_AFTER:
                if self.share > 0:
                    log.warning(
                        "provider %s: status page unusable %d times in a row; no longer shedding",
                        self.provider,
                        self.unusable_streak,
                    )
                self.share, self.state = 0.0, UNKNOWN
                self.shedding_streak = self.clear_streak = 0
            return
        self.unusable_streak = 0
        share = self.target(reading.state)
        if share > 0:
            self.shedding_streak += 1
            self.clear_streak = 0
            if self.share > 0 or self.shedding_streak >= self.page.confirm_after:
                if self.share == 0:
                    log.warning(
                        "provider %s: status page says %s; shedding %.0f%% of its traffic",
                        self.provider,
                        reading.state,
                        share * 100,
                    )
                self.share, self.state = share, reading.state
        else:
            self.clear_streak += 1
            self.shedding_streak = 0
            if self.share == 0 or self.clear_streak >= self.page.recover_after:
                if self.share > 0:
                    log.info("provider %s: status page says %s; traffic returns", self.provider, reading.state)
                self.share, self.state = 0.0, reading.state


# ----- the board ----------------------------------------------------------------------------------------


class StatusBoard:
    """What the engine owns: pollers for the distinct pages of its providers, and their shed shares.

    `configure()` on start and on each policy reload; `shed_share()` on each request (a dict lookup, no
    I/O). With `relay_url` (`LLMROUTE_STATUS_RELAY`), pages are read from the operator's relay and polled
    directly only while the relay fails. Pollers start when `configure()` runs inside an event loop
    (`autostart=False` leaves them to `poll_now()`, for tests).
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        relay_url: str | None = None,
        *,
        min_interval: float = DEFAULT_MIN_INTERVAL,
        timeout: float = DEFAULT_TIMEOUT,
        relay_timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        autostart: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        self._session = session
        self.relay_url = relay_url
        self._relay: RelaySource | None = None
        if relay_url:
            from .statusrelay import RelayClient  # statusrelay builds on this module

            self._relay = RelayClient(session, relay_url, timeout=relay_timeout, clock=clock)
        self._min_interval = min_interval
        self._timeout = timeout
        self._clock = clock
        self._wall = wall_clock
        self._autostart = autostart
        self._rng = rng or random.Random(random.getrandbits(64))  # follows a seeded `random` (the simulator)
        self._pollers: dict[str, StatusPagePoller] = {}
        self._watches: dict[str, _Watch] = {}
        self._by_key: dict[str, list[_Watch]] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- configuration
    def configure(self, providers: Sequence[Provider]) -> None:
        """Watch these providers' pages: new pages get a poller, unreferenced ones stop, others keep state.

        A provider whose page and shedding rules are unchanged keeps its hysteresis. Names may repeat
        (the operator passes the providers of every policy): the last one decides shedding for the name,
        every page is polled.
        """
        if self._closed:
            raise RuntimeError("the status board is closed")
        pages: dict[str, StatusPage] = {}
        watches: dict[str, _Watch] = {}
        for provider in providers:
            page = provider.status_page
            if page is None:
                continue
            key = page_key(page)
            if key not in pages or page.poll_interval < pages[key].poll_interval:
                pages[key] = page
            old = self._watches.get(provider.name)
            if old is not None and old.same_rules(page):
                old.page = page
                watches[provider.name] = old
            else:
                watches[provider.name] = _Watch(provider.name, page)
        for key in list(self._pollers):
            if key not in pages:
                task = self._pollers.pop(key).cancel()
                if task is not None:
                    self._stopping.add(task)
                    task.add_done_callback(self._stopping.discard)
        for key, page in pages.items():
            poller = self._pollers.get(key)
            if poller is None:
                self._pollers[key] = StatusPagePoller(
                    page, self._session, listener=self._observe, relay=self._relay,
                    min_interval=self._min_interval, timeout=self._timeout,
                    clock=self._clock, wall_clock=self._wall, rng=self._rng,
                )  # fmt: skip
            else:
                poller.update_page(page)
        self._watches = watches
        self._by_key = {}
        for watch in watches.values():
            self._by_key.setdefault(watch.key, []).append(watch)
        if self._autostart:
            self.start()

    def start(self) -> None:
        """Start the pollers' tasks (idempotent). `configure()` calls it; outside a running event loop it
        does nothing, and the next `configure()`, `start()` or `poll_now()` inside the loop starts them."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        for poller in self._pollers.values():
            poller.start()

    def _observe(self, key: str, reading: Reading) -> None:
        now = self._clock()
        for watch in self._by_key.get(key, ()):
            watch.observe(reading)
            watch.settle(now)

    # -- the request path
    def shed_share(self, provider_name: str) -> tuple[float, str | None]:
        """Share of this provider's traffic to shed now (0.0 .. 1.0) and the confirmed page state."""
        watch = self._watches.get(provider_name)
        if watch is None:
            return 0.0, None
        return (0.0 if watch.overridden else watch.share), watch.state

    def probe(self, provider_name: str, interval: float) -> bool:
        """May this request probe a provider its page sheds? One per `interval` per provider (jittered),
        the first one `interval` after the shed began."""
        watch = self._watches.get(provider_name)
        if watch is None or watch.shed_since is None or watch.overridden:
            return False
        now = self._clock()
        if not watch.next_probe:
            watch.next_probe = watch.shed_since + interval
        if now < watch.next_probe:
            return False
        watch.next_probe = now + interval * self._rng.uniform(0.8, 1.2)
        return True

    def probe_result(self, provider_name: str, ok: bool) -> None:
        """A probe's outcome: `PROBES_TO_RECOVER` successes in a row end the shed; a failure resets."""
        watch = self._watches.get(provider_name)
        if watch is None or watch.shed_since is None or watch.overridden:
            return
        watch.probe_successes = watch.probe_successes + 1 if ok else 0
        if watch.probe_successes >= PROBES_TO_RECOVER:
            watch.overridden = True
            log.warning(
                "provider %s: %d probes answered; traffic returns although its status page still says %s",
                provider_name,
                watch.probe_successes,
                watch.state,
            )

    def levels(self) -> dict[str, int]:
        """Provider -> level (0..3) of its page's latest usable reading; 0 before one arrives."""
        result: dict[str, int] = {}
        for name, watch in self._watches.items():
            poller = self._pollers.get(watch.key)
            result[name] = poller.last_good.level if poller and poller.last_good else 0
        return result

    # -- introspection
    @property
    def pollers(self) -> Mapping[str, StatusPagePoller]:
        """Distinct page key -> its poller (read-only use: the relay and tests)."""
        return self._pollers

    def error_counts(self) -> dict[str, int]:
        """Unusable polls by reason, summed over pages (`status_fetch_errors{reason}`)."""
        total: Counter[str] = Counter()
        for poller in self._pollers.values():
            total.update(poller.errors)
        return dict(total)

    def snapshot(self) -> dict[str, Any]:
        """Per provider, for the sidecar's `/status`."""
        result: dict[str, Any] = {}
        for name, watch in self._watches.items():
            poller = self._pollers.get(watch.key)
            reading = poller.reading if poller else None
            result[name] = {
                "page": watch.page.url,
                "type": watch.page.type,
                "components": list(watch.page.components),
                "state": watch.state,
                "reportedState": reading.state if reading else None,
                "level": poller.last_good.level if poller and poller.last_good else 0,
                "usable": reading.usable if reading else None,
                "shedding": 0.0 if watch.overridden else watch.share,
                "overriddenByProbes": watch.overridden,
                "probeSuccesses": watch.probe_successes,
                "lastPoll": iso_time(poller.last_poll_wall) if poller else None,
                "lastGoodPoll": iso_time(poller.last_good_wall) if poller else None,
                "lastError": poller.last_error if poller else None,
                "lastErrorAt": iso_time(poller.last_error_wall) if poller else None,
                "missingComponents": list(reading.missing_components) if reading else [],
                "incidents": list(reading.incidents) if reading else [],
                "consecutive": {
                    "shedding": watch.shedding_streak,
                    "clear": watch.clear_streak,
                    "unusable": watch.unusable_streak,
                },
                "source": poller.source if poller else ("relay" if self._relay else "direct"),
                "relayError": poller.relay_error if poller else None,
                "polls": poller.seq if poller else 0,
            }
        return result

    # -- tests and shutdown
    async def poll_now(self) -> None:
        """Poll every page once, now, and wait for it (a test hook; concurrent loop polls are serialised)."""
        if self._autostart:
            self.start()
        await asyncio.gather(*(poller.poll_once() for poller in list(self._pollers.values())))

    async def close(self) -> None:
        """Stop every poller and wait for them. The session belongs to the caller and stays open."""
        self._closed = True
        tasks = [task for poller in self._pollers.values() if (task := poller.cancel())]
        tasks.extend(self._stopping)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._stopping.clear()
