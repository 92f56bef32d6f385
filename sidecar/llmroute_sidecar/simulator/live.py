"""The demo's live terminal view: what the sidecar is doing to the traffic, while the incident unfolds.

Why this exists: the point of `make demo` is to *watch* failover — a microspike absorbed by retries with
no fallback answer, an outage shed to the fallback once the circuit opens, the status page admitting it
late — so the counters that tell those apart (answers from primary vs fallback, degraded share, retries,
sheds by reason, p50/p99, the status page as published and as the sidecar reads it, the circuit) update
a few times a second, next to a strip of the timeline so far.

With a terminal, rich draws it in place; without one (CI, a pipe) it degrades to a plain line every few
seconds of wall time, so logs stay readable.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from typing import TYPE_CHECKING

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .report import percentile
from .scenarios import Scenario, World
from .traffic import RequestRecord, StatusSampler, TrafficDriver

if TYPE_CHECKING:
    from rich.console import RenderableType

_RECENT = 10.0  # scenario seconds of the "recent" latency figures
_PLAIN_EVERY = 3.0  # wall seconds between plain lines
_STATUS_STYLES = {"operational": "green", "degraded_performance": "yellow", "partial_outage": "dark_orange",
                  "major_outage": "bold red", "under_maintenance": "blue"}


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 0.9995 else f"{value:.2f} s"


class LiveView:
    """Counters fed by the traffic driver's callback, drawn by rich (or as plain lines)."""

    def __init__(self, scenario: Scenario, world: World, primary_target: str, console: Console | None = None,
                 plain: bool | None = None) -> None:
        self.scenario = scenario
        self.world = world
        self.primary_target = primary_target
        self.console = console or Console()
        self.plain = (not self.console.is_terminal) if plain is None else plain
        self.driver: TrafficDriver | None = None
        self.sampler: StatusSampler | None = None
        self.answered = self.failed = self.from_primary = self.from_fallback = 0
        self.degraded = self.retries = 0
        self.sheds: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.recent: deque[tuple[float, float]] = deque()
        seconds = max(1, math.ceil(scenario.duration))
        self.strip: list[Counter[str]] = [Counter() for _ in range(seconds)]
        self._live: Live | None = None
        self._last_plain = 0.0

    # ----- feeding ------------------------------------------------------------------------------------------
    def attach(self, driver: TrafficDriver, sampler: StatusSampler) -> None:
        self.driver = driver
        self.sampler = sampler

    def record(self, record: RequestRecord) -> None:
        """The driver's `on_done` callback: one request finished."""
        if record.shed_reason:
            self.sheds[record.shed_reason] += 1
        self.retries += record.retries
        second = min(max(int(record.slot), 0), len(self.strip) - 1)
        if record.answered:
            self.answered += 1
            if record.target == self.primary_target:
                self.from_primary += 1
                self.strip[second]["primary"] += 1
            else:
                self.from_fallback += 1
                self.strip[second]["fallback"] += 1
            self.degraded += record.degraded
            if record.latency is not None:
                self.latencies.append(record.latency)
                self.recent.append((record.done or 0.0, record.latency))
        else:
            self.failed += 1
            self.strip[second]["failed"] += 1
        self.tick()

    # ----- lifecycle ----------------------------------------------------------------------------------------
    def __enter__(self) -> LiveView:
        if not self.plain:
            self._live = Live(console=self.console, get_renderable=self.render, refresh_per_second=4,
                              transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.__exit__(None, None, None)
            self._live = None
        elif self.plain:
            self.console.print(self.line(), markup=False, highlight=False, soft_wrap=True)

    def tick(self) -> None:
        """Print a plain line when due (headless mode); rich refreshes by itself."""
        if self.plain and time.monotonic() - self._last_plain >= _PLAIN_EVERY:
            self._last_plain = time.monotonic()
            self.console.print(self.line(), markup=False, highlight=False, soft_wrap=True)

    # ----- figures ------------------------------------------------------------------------------------------
    def _now(self) -> float:
        return min(self.world.clock.now(), self.scenario.duration)

    def _recent(self) -> list[float]:
        horizon = self.world.clock.now() - _RECENT
        while self.recent and self.recent[0][0] < horizon:
            self.recent.popleft()
        return [latency for _, latency in self.recent]

    def _states(self) -> tuple[str, str, str, str]:
        now = self.world.clock.now()
        phase = self.world.timelines["primary"].segment_at(now)
        page = self.world.status_pages.get("primary")
        published = page.state_at(now) if page is not None else "-"
        sample = self.sampler.latest if self.sampler else None
        seen = (sample.page_state or "-") if sample else "-"
        if sample and sample.shedding > 0:
            seen += f" (shedding {sample.shedding:.0%})"
        circuit = (sample.circuit or "-") if sample else "-"
        return phase.name, published, seen, circuit

    def line(self) -> str:
        """One plain line of the current figures."""
        sent = len(self.driver.records) if self.driver else 0
        in_flight = self.driver.in_flight if self.driver else 0
        phase, published, seen, circuit = self._states()
        recent = self._recent()
        sheds = ",".join(f"{k}:{v}" for k, v in self.sheds.most_common()) or "none"
        degraded = self.degraded / self.answered if self.answered else 0.0
        return (
            f"t={self._now():5.1f}s [{phase}] sent {sent} in-flight {in_flight} answered {self.answered} "
            f"(primary {self.from_primary}, fallback {self.from_fallback}) failed {self.failed} "
            f"degraded {degraded:.1%} retries {self.retries} sheds {sheds} "
            f"p50 {_ms(percentile(recent, 50))} p99 {_ms(percentile(recent, 99))} (last {_RECENT:g}s) "
            f"page {published} / sidecar {seen} circuit {circuit}"
        )

    def render(self) -> RenderableType:
        sent = len(self.driver.records) if self.driver else 0
        in_flight = self.driver.in_flight if self.driver else 0
        phase, published, seen, circuit = self._states()
        recent = self._recent()
        now = self._now()
        duration = self.scenario.duration

        head = Text()
        head.append(f"{self.scenario.name}", style="bold")
        head.append(f"  t = {now:5.1f} / {duration:g} s  (x{self.world.clock.speed:g})   primary: ")
        style = "bold red" if "outage" in phase else ("yellow" if "spike" in phase else "green")
        head.append(phase, style=style)

        counters = Table.grid(padding=(0, 2))
        counters.add_column(justify="right", style="dim")
        counters.add_column(justify="left")
        counters.add_column(justify="right", style="dim")
        counters.add_column(justify="left")
        degraded = self.degraded / self.answered if self.answered else 0.0
        counters.add_row("sent", str(sent), "in flight", str(in_flight))
        counters.add_row("answered", Text(str(self.answered), style="bold"), "failed",
                         Text(str(self.failed), style="bold red" if self.failed else ""))
        counters.add_row("from primary", Text(str(self.from_primary), style="green"), "from fallback",
                         Text(str(self.from_fallback), style="dark_orange"))
        counters.add_row("degraded share", f"{degraded:.1%}", "retries", str(self.retries))
        counters.add_row("p50 / p99 (last 10 s)",
                         f"{_ms(percentile(recent, 50))} / {_ms(percentile(recent, 99))}", "p50 / p99 (all)",
                         f"{_ms(percentile(self.latencies, 50))} / {_ms(percentile(self.latencies, 99))}")
        sheds = ", ".join(f"{k} {v}" for k, v in self.sheds.most_common()) or "none"
        counters.add_row("sheds", sheds, "", "")
        counters.add_row("status page", Text(published, style=_STATUS_STYLES.get(published, "")),
                         "sidecar reads", Text(seen, style=_STATUS_STYLES.get(seen.split(" ")[0], "")))
        counters.add_row("primary circuit", Text(circuit, style="bold red" if circuit == "open" else "green"),
                         "", "")

        width = max(20, min(len(self.strip), self.console.width - 8))
        per = max(1, math.ceil(len(self.strip) / width))
        strip = Text()
        for start in range(0, len(self.strip), per):
            if start > now:
                strip.append("·", style="dim")
                continue
            bucket: Counter[str] = Counter()
            for c in self.strip[start:start + per]:
                bucket.update(c)
            if bucket["failed"]:
                strip.append("█", style="red")
            elif bucket["fallback"]:
                strip.append("█", style="dark_orange")
            elif bucket["primary"]:
                strip.append("█", style="green")
            else:
                strip.append(" ")
        legend = Text.assemble(("█", "green"), " primary  ", ("█", "dark_orange"), " fallback  ",
                               ("█", "red"), " failed   (by send time, ", f"{per} s per cell)", style="dim")
        return Panel(Group(head, Text(""), counters, Text(""), strip, legend), title="llmroute demo",
                     border_style="cyan")
