"""`llmroute top`: a live terminal view of one running sidecar, for a person during an incident.

    llmroute top [--url http://127.0.0.1:8787] [--interval 2] [--once]

It reads the sidecar's `GET /status` (routes, circuits, status pages, retry budgets, the last minute's
fallback share) and `GET /metrics` (counters), and redraws in place every `--interval` seconds; rates are
the counters' difference between two reads, so the first frame shows totals only. `--once` prints one
frame, with rates over one interval, and exits (scripts, screenshots). In a cluster, run
`kubectl port-forward pod/my-app-0 8787` first: the sidecar listens on the pod's loopback.

The view is a pure function of two reads (`build_view`), drawn by rich; rich is imported when drawing,
so the sidecar itself never needs it.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from rich.console import RenderableType

DEFAULT_URL = "http://127.0.0.1:8787"
LEVELS = {0: "operational", 1: "minor", 2: "major", 3: "critical"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
"""Metric samples: (sample name, labels) -> value."""


@dataclass
class Read:
    """One read of the sidecar: its `/status` document and its metric samples, at `at` (monotonic)."""

    status: dict[str, Any]
    samples: Samples
    at: float


def parse_metrics(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def read_sidecar(client: httpx.Client, url: str) -> Read:
    """Both documents, or httpx's error (the caller shows it and keeps trying)."""
    status = client.get(f"{url}/status")
    status.raise_for_status()
    metrics = client.get(f"{url}/metrics")
    metrics.raise_for_status()
    return Read(status.json(), parse_metrics(metrics.text), time.monotonic())


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(value for (sample, have), value in samples.items() if sample == name and wanted <= have)


def by_label(samples: Samples, name: str, label: str, **labels: str) -> dict[str, float]:
    wanted = set(labels.items())
    result: dict[str, float] = defaultdict(float)
    for (sample, have), value in samples.items():
        if sample == name and wanted <= have:
            result[dict(have).get(label, "")] += value
    return dict(result)


@dataclass
class RouteRow:
    name: str
    strategy: str
    answered: float
    per_second: float | None
    recent_fallback: float
    degraded_share: float
    calls_per_answer: float | None
    sheds: dict[str, float]
    """Shed reason -> requests per second since the previous read (totals on the first)."""


@dataclass
class TargetRow:
    route: str
    target: str
    state: str
    failing_for: float
    open_for: float | None


@dataclass
class ProviderRow:
    name: str
    page_state: str
    level: int
    shedding: float
    last_poll: str | None
    retries_available: float | None


@dataclass
class View:
    policy: str
    generation: Any
    ready: bool
    error: str | None
    uptime: float
    interval: float | None
    routes: list[RouteRow] = field(default_factory=list)
    targets: list[TargetRow] = field(default_factory=list)
    providers: list[ProviderRow] = field(default_factory=list)


def _rate(now: float, before: float | None, seconds: float | None) -> float | None:
    if before is None or not seconds:
        return None
    return max(0.0, now - before) / seconds


def build_view(current: Read, previous: Read | None = None) -> View:
    """What the screen shows, from the latest read and the one before it (for rates)."""
    status = current.status
    seconds = current.at - previous.at if previous is not None else None
    before = previous.samples if previous is not None else None
    view = View(
        policy=str(status.get("policy") or "(no policy)"),
        generation=status.get("generation"),
        ready=bool(status.get("ready")),
        error=status.get("error"),
        uptime=float(status.get("uptimeSeconds") or 0.0),
        interval=seconds,
    )
    for name, route in sorted((status.get("routes") or {}).items()):
        answered = total(current.samples, "llmroute_requests_total", route=name, outcome="ok")
        attempts = total(current.samples, "llmroute_attempts_total", route=name)
        sheds_now = by_label(current.samples, "llmroute_shed_total", "reason", route=name)
        if before is not None and seconds:
            answered_before = total(before, "llmroute_requests_total", route=name, outcome="ok")
            attempts_before = total(before, "llmroute_attempts_total", route=name)
            sheds_before = by_label(before, "llmroute_shed_total", "reason", route=name)
            sheds = {r: max(0.0, v - sheds_before.get(r, 0.0)) / seconds for r, v in sheds_now.items()}
            new_answers = answered - answered_before
            calls = (attempts - attempts_before) / new_answers if new_answers > 0 else None
            per_second = _rate(answered, answered_before, seconds)
        else:
            sheds = sheds_now
            calls = attempts / answered if answered else None
            per_second = None
        recent = route.get("recentFallback") or {}
        view.routes.append(RouteRow(
            name=name, strategy=str(route.get("strategy")), answered=answered, per_second=per_second,
            recent_fallback=float(recent.get("rate") or 0.0), degraded_share=float(route.get("degradedShare") or 0.0),
            calls_per_answer=calls, sheds={r: v for r, v in sheds.items() if v > 0},
        ))
        for target, health in (route.get("targets") or {}).items():
            view.targets.append(TargetRow(
                route=name, target=target, state=str(health.get("state")),
                failing_for=float(health.get("failingFor") or 0.0), open_for=health.get("openFor"),
            ))
    budgets: Mapping[str, Any] = status.get("retryBudgets") or {}
    pages: Mapping[str, Any] = status.get("providers") or {}
    for name in sorted(set(budgets) | set(pages)):
        page = pages.get(name) or {}
        budget = budgets.get(name)
        view.providers.append(ProviderRow(
            name=name, page_state=str(page.get("state") or "not watched"), level=int(page.get("level") or 0),
            shedding=float(page.get("shedding") or 0.0), last_poll=page.get("lastPoll"),
            retries_available=float(budget["available"]) if budget else None,
        ))
    return view


def _seconds(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.1f}s"


def _need_rich() -> None:
    try:
        import rich  # noqa: F401
    except ImportError:  # rich comes with the demo's dependencies, not necessarily with the sidecar's
        raise SystemExit("llmroute top draws with rich: pip install rich (or 'llmroute[demo]')") from None


def render(view: View, url: str, problem: str | None = None) -> RenderableType:
    """The frame, as rich renderables."""
    _need_rich()
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    state = Text("ready", style="green") if view.ready else Text("NOT READY", style="bold red")
    header = Text.assemble(
        ("llmroute top ", "bold"), (url, "cyan"), "  policy ", (view.policy, "bold"),
        f" (generation {view.generation})  " if view.generation is not None else "  ", state,
        f"  up {view.uptime:.0f}s",
    )
    parts: list[RenderableType] = [header]
    if view.error:
        parts.append(Text(f"policy refused, serving the last good one: {view.error}", style="yellow"))
    if problem:
        parts.append(Text(f"cannot read the sidecar: {problem}", style="bold red"))

    routes = Table(title="routes", title_justify="left", expand=True)
    for column in ("route", "strategy", "answered", "answers/s", "fallback (60s)", "degraded", "calls/answer",
                   "shed/s by reason"):
        routes.add_column(column, justify="left" if column in ("route", "strategy", "shed/s by reason") else "right")
    for row in view.routes:
        fallback_style = "red" if row.recent_fallback >= 0.5 else "yellow" if row.recent_fallback > 0 else "green"
        sheds = ", ".join(f"{reason} {value:.2f}" if view.interval else f"{reason} {value:.0f}"
                          for reason, value in sorted(row.sheds.items())) or "-"
        routes.add_row(
            row.name, row.strategy, f"{row.answered:.0f}",
            "-" if row.per_second is None else f"{row.per_second:.1f}",
            Text(f"{row.recent_fallback:.0%}", style=fallback_style), f"{row.degraded_share:.1%}",
            "-" if row.calls_per_answer is None else f"{row.calls_per_answer:.2f}", sheds,
        )

    targets = Table(title="targets", title_justify="left", expand=True)
    for column in ("route", "target", "circuit", "failing for", "open for"):
        targets.add_column(column)
    for target in view.targets:
        circuit = Text(target.state, style="bold red" if target.state == "open" else "green")
        targets.add_row(target.route, target.target, circuit, _seconds(target.failing_for or None),
                        _seconds(target.open_for))

    providers = Table(title="providers", title_justify="left", expand=True)
    for column in ("provider", "status page", "level", "shedding", "last poll", "retry budget left"):
        providers.add_column(column)
    for provider in view.providers:
        style = {0: "green", 1: "yellow", 2: "orange3", 3: "bold red"}.get(provider.level, "")
        providers.add_row(
            provider.name, Text(provider.page_state, style=style), LEVELS.get(provider.level, str(provider.level)),
            f"{provider.shedding:.0%}", provider.last_poll or "-",
            "-" if provider.retries_available is None else f"{provider.retries_available:.0f}",
        )
    parts += [routes, targets, providers]
    return Group(*parts)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmroute top", description="A live view of a running sidecar.")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the sidecar (default {DEFAULT_URL})")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    parser.add_argument("--once", action="store_true", help="print one frame (rates over one interval) and exit")
    args = parser.parse_args(argv)
    url = args.url.rstrip("/")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a log line per read would scroll the view away
    _need_rich()
    from rich.console import Console
    from rich.live import Live

    console = Console()
    with httpx.Client(timeout=min(5.0, max(1.0, args.interval))) as client:
        if args.once:
            try:
                first = read_sidecar(client, url)
                time.sleep(args.interval)
                console.print(render(build_view(read_sidecar(client, url), first), url))
            except httpx.HTTPError as exc:
                print(f"llmroute top: cannot read {url}: {exc}", file=sys.stderr)
                return 1
            return 0
        previous: Read | None = None
        with Live(console=console, auto_refresh=False, screen=False) as live:
            try:
                while True:
                    try:
                        current = read_sidecar(client, url)
                        live.update(render(build_view(current, previous), url), refresh=True)
                        previous = current
                    except httpx.HTTPError as exc:
                        stale = build_view(previous) if previous is not None else View("?", None, False, None, 0, None)
                        live.update(render(stale, url, problem=str(exc) or type(exc).__name__), refresh=True)
                    time.sleep(args.interval)
            except KeyboardInterrupt:
                return 0
