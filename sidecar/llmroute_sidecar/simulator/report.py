"""The numbers of a scenario run, and the report a team reads afterwards (HTML page + PNG timeline).

Why this exists: a failover pattern is judged on a handful of figures — how many requests were answered,
how many answers were degraded, what the slow tail looked like and how much extra load (and money) the
retries cost upstream — and on *when* things happened relative to the incident. `summarize` turns the
client-side records, the calls counted at the fake providers and the sidecar's `/status` samples into
those figures, overall and per window of the scenario (healthy, microspike, outage, …); `write_report`
draws the timeline: outcomes and latency over time, with the provider's phases, the status page's
published state and what the sidecar made of it (shedding, circuit) drawn on the same axis.

Conventions: latencies are of answered requests, on the scenario clock (wall time x speed); a request
belongs to the window in which it was *sent*; "fallback answers during microspikes" counts answers from a
non-primary target for requests in flight at any moment of a microspike (the strict reading); upstream
calls are what the fakes received, cost is what they billed (tokens of the answers they served, priced
with the policy's `pricing`).
"""

from __future__ import annotations

import html
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .scenarios import Role, Scenario, Served, StatusChange, Window, World
from .traffic import RequestRecord, StatusSample

_KIND_COLOURS = {"healthy": None, "microspike": "#f5a623", "outage": "#d0021b", "brownout": "#9013fe",
                 "recovery": "#7ed321"}
_STATUS_COLOURS = {"operational": "#2e7d32", "under_maintenance": "#1565c0",
                   "degraded_performance": "#fbc02d", "partial_outage": "#ef6c00", "major_outage": "#c62828"}


_PLOT_WIDTH_PX = 1050  # roughly, at the figure size and dpi used: labels go only where they fit


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class WindowStats:
    name: str
    kind: str
    start: float
    end: float
    asked: int = 0
    answered: int = 0
    from_primary: int = 0
    from_fallback: int = 0
    degraded: int = 0
    failed: int = 0
    p50: float | None = None
    p99: float | None = None
    upstream_calls: int = 0
    """Calls the fakes received during the window."""


@dataclass
class Check:
    name: str
    target: str
    measured: str
    ok: bool


@dataclass
class Summary:
    scenario: str
    label: str
    speed: float
    seed: int
    asked: int = 0
    answered: int = 0
    failed: int = 0
    not_sent: int = 0
    from_primary: int = 0
    from_fallback: int = 0
    degraded: int = 0
    retries: int = 0
    sheds: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    max_latency: float | None = None
    calls_primary: int = 0
    calls_fallback: int = 0
    upstream_429: int = 0
    """429 answers the fakes gave (rate limits hit)."""
    cost_usd: float = 0.0
    fallback_in_microspikes: int = 0
    outage_p50: float | None = None
    windows: list[WindowStats] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    @property
    def availability(self) -> float:
        return self.answered / self.asked if self.asked else 0.0

    @property
    def degraded_share(self) -> float:
        return self.degraded / self.answered if self.answered else 0.0

    @property
    def calls_total(self) -> int:
        return self.calls_primary + self.calls_fallback

    @property
    def calls_per_answer(self) -> float | None:
        return self.calls_total / self.answered if self.answered else None

    @property
    def passed(self) -> bool:
        return all(check.ok for check in self.checks)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        cpa = self.calls_per_answer
        data.update(availability=round(self.availability, 5), degraded_share=round(self.degraded_share, 5),
                    calls_total=self.calls_total, calls_per_answer=None if cpa is None else round(cpa, 4),
                    cost_usd=round(self.cost_usd, 6), passed=self.passed)
        return data


def _overlaps(record: RequestRecord, window: Window) -> bool:
    end = record.done if record.done is not None else record.sent
    return record.sent < window.end and end >= window.start


def summarize(
    scenario: Scenario,
    world: World,
    records: Sequence[RequestRecord],
    primary_target: str,
    pricing: Mapping[str, Mapping[str, float]] | None = None,
    label: str = "",
) -> Summary:
    """The run's figures, overall and per window, and the scenario's `expect` checks."""
    clock = world.clock
    summary = Summary(scenario=scenario.name, label=label, speed=clock.speed, seed=world.seed)
    sheds: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    for record in records:
        summary.asked += 1
        if record.error == "not-sent":
            summary.not_sent += 1
        if record.shed_reason:
            sheds[record.shed_reason] += 1
        summary.retries += record.retries
        if record.answered:
            summary.answered += 1
            if record.target == primary_target:
                summary.from_primary += 1
            else:
                summary.from_fallback += 1
            summary.degraded += record.degraded
            if record.latency is not None:
                latencies.append(record.latency)
        else:
            summary.failed += 1
            errors[record.error or f"http_{record.status}"] += 1
    summary.sheds = dict(sheds.most_common())
    summary.errors = dict(errors.most_common())
    summary.p50, summary.p90, summary.p99 = (percentile(latencies, q) for q in (50, 90, 99))
    summary.max_latency = max(latencies) if latencies else None

    calls: dict[Role, list[float]] = {
        role: [clock.at(r.received_at) for r in fake.requests] for role, fake in world.providers.items()
    }
    summary.calls_primary = len(calls.get("primary", []))
    summary.calls_fallback = len(calls.get("fallback", []))
    summary.cost_usd = _cost([s for t in world.timelines.values() for s in t.served], pricing or {})
    summary.upstream_429 = sum(1 for t in world.timelines.values() for s in t.served if s.outcome == "429")

    windows = scenario.windows()
    for window in windows:
        stats = WindowStats(window.name, window.kind, window.start, window.end)
        window_latencies: list[float] = []
        for record in records:
            if not window.contains(record.slot):
                continue
            stats.asked += 1
            if record.answered:
                stats.answered += 1
                if record.target == primary_target:
                    stats.from_primary += 1
                else:
                    stats.from_fallback += 1
                stats.degraded += record.degraded
                if record.latency is not None:
                    window_latencies.append(record.latency)
            else:
                stats.failed += 1
        stats.p50, stats.p99 = percentile(window_latencies, 50), percentile(window_latencies, 99)
        stats.upstream_calls = sum(1 for times in calls.values() for t in times if window.contains(t))
        summary.windows.append(stats)
    spikes = [w for w in windows if w.kind == "microspike"]
    summary.fallback_in_microspikes = sum(
        1 for r in records
        if r.answered and r.target != primary_target and any(_overlaps(r, w) for w in spikes)
    )
    outage = [r.latency for r in records
              if r.answered and r.latency is not None and any(w.kind == "outage" and w.contains(r.slot)
                                                              for w in windows)]
    summary.outage_p50 = percentile(outage, 50)
    summary.checks = _checks(scenario, summary)
    return summary


def _cost(served: Sequence[Served], pricing: Mapping[str, Mapping[str, float]]) -> float:
    total = 0.0
    for item in served:
        price = pricing.get(item.model or "")
        if item.outcome == "ok" and price:
            total += item.input_tokens * price.get("input", 0.0)
            total += item.output_tokens * price.get("output", 0.0)
    return total / 1_000_000


def _checks(scenario: Scenario, summary: Summary) -> list[Check]:
    expect = scenario.expect
    if expect is None:
        return []
    checks: list[Check] = []
    if expect.availability is not None:
        checks.append(Check("answered / asked", f">= {expect.availability:.1%}",
                            f"{summary.availability:.2%} ({summary.answered}/{summary.asked})",
                            summary.availability >= expect.availability - 1e-12))
    if expect.fallback_in_microspikes is not None:
        checks.append(Check("fallback answers during microspikes", f"<= {expect.fallback_in_microspikes}",
                            str(summary.fallback_in_microspikes),
                            summary.fallback_in_microspikes <= expect.fallback_in_microspikes))
    if expect.outage_p50 is not None:
        value = summary.outage_p50
        checks.append(Check("outage p50", f"< {expect.outage_p50:g} s", _seconds(value),
                            value is not None and value < expect.outage_p50))
    if expect.calls_per_answer is not None:
        cpa = summary.calls_per_answer
        checks.append(Check("upstream calls per answer", f"<= {expect.calls_per_answer:g}",
                            "-" if cpa is None else f"{cpa:.3f}",
                            cpa is not None and cpa <= expect.calls_per_answer))
    if expect.degraded_over_outage is not None and summary.asked:
        duration = scenario.duration
        outage = sum(w.end - w.start for w in scenario.windows() if w.kind == "outage") / duration
        excess = (summary.degraded / summary.asked - outage) * duration
        checks.append(Check("degraded beyond the outage", f"<= {expect.degraded_over_outage:g} s",
                            f"{excess:+.1f} s ({summary.degraded / summary.asked:.1%} vs {outage:.1%})",
                            excess <= expect.degraded_over_outage))
    return checks


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 0.9995 else f"{value:.2f} s"


# ----- text -------------------------------------------------------------------------------------------------
def summary_lines(summary: Summary) -> list[str]:
    """The summary as plain lines (the demo prints them at the end, headless or not)."""
    cpa = summary.calls_per_answer
    lines = [
        f"scenario {summary.scenario}  (speed {summary.speed:g}x, seed {summary.seed})",
        f"asked {summary.asked}  answered {summary.answered} ({summary.availability:.2%})  "
        f"failed {summary.failed}",
        f"answers: primary {summary.from_primary}, fallback {summary.from_fallback}  "
        f"degraded {summary.degraded_share:.1%}  retries {summary.retries}",
        "sheds: " + (", ".join(f"{k} {v}" for k, v in summary.sheds.items()) or "none"),
        f"latency p50 {_seconds(summary.p50)}  p90 {_seconds(summary.p90)}  p99 {_seconds(summary.p99)}  "
        f"max {_seconds(summary.max_latency)}",
        f"upstream calls: primary {summary.calls_primary}, fallback {summary.calls_fallback}  "
        f"per answer {'-' if cpa is None else f'{cpa:.3f}'}  429s {summary.upstream_429}  "
        f"cost ${summary.cost_usd:.4f}",
    ]
    if summary.errors:
        lines.append("failures: " + ", ".join(f"{k} {v}" for k, v in summary.errors.items()))
    lines.append("windows:")
    for w in summary.windows:
        lines.append(
            f"  {w.start:5.0f}-{w.end:<4.0f}s {w.name:<28} asked {w.asked:4}  primary {w.from_primary:4}  "
            f"fallback {w.from_fallback:4}  failed {w.failed:3}  p50 {_seconds(w.p50):>8}  "
            f"p99 {_seconds(w.p99):>8}"
        )
    for check in summary.checks:
        verdict = "PASS" if check.ok else "MISS"
        lines.append(f"{verdict}  {check.name}: {check.measured} (target {check.target})")
    return lines


# ----- files ------------------------------------------------------------------------------------------------
def write_report(
    directory: Path,
    summary: Summary,
    scenario: Scenario,
    records: Sequence[RequestRecord],
    world: World,
    samples: Sequence[StatusSample],
    policy_text: str = "",
    notes: Sequence[str] = (),
) -> tuple[Path, Path]:
    """Write `index.html`, `timeline.png` and `run.json` into `directory`; returns (html, png)."""
    directory.mkdir(parents=True, exist_ok=True)
    png = directory / "timeline.png"
    draw_timeline(png, summary, scenario, records, world, samples)
    page = directory / "index.html"
    page.write_text(_html(summary, scenario, policy_text, notes))
    (directory / "run.json").write_bytes(orjson.dumps({
        "summary": summary.to_json(),
        "requests": [r.to_json() for r in records],
        "statusSamples": [asdict(s) for s in samples],
    }, option=orjson.OPT_INDENT_2))
    return page, png


def _bands(changes: Sequence[StatusChange], end: float) -> list[tuple[float, float, str]]:
    bands: list[tuple[float, float, str]] = []
    for index, change in enumerate(changes):
        stop = changes[index + 1].at if index + 1 < len(changes) else end
        if stop > change.at:
            bands.append((change.at, stop, change.status))
    return bands


def _sample_bands(samples: Sequence[StatusSample], key: str, end: float) -> list[tuple[float, float, str]]:
    bands: list[tuple[float, float, str]] = []
    for index, sample in enumerate(samples):
        value = str(getattr(sample, key))
        stop = samples[index + 1].t if index + 1 < len(samples) else end
        if bands and bands[-1][2] == value:
            bands[-1] = (bands[-1][0], stop, value)
        else:
            bands.append((sample.t, stop, value))
    return bands


def draw_timeline(
    path: Path,
    summary: Summary,
    scenario: Scenario,
    records: Sequence[RequestRecord],
    world: World,
    samples: Sequence[StatusSample],
) -> None:
    """The timeline chart: states on top, then answers per second, latency, and upstream calls per second."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    end = max(scenario.duration, max((r.slot for r in records), default=0.0))
    seconds = max(1, math.ceil(end))
    windows = scenario.windows()
    fig, axes = plt.subplots(4, 1, figsize=(13, 10), sharex=True,
                             gridspec_kw={"height_ratios": [1.3, 2.2, 2.2, 1.6]})
    states, outcomes, latency, calls = axes
    for ax in axes[1:]:
        for window in windows:
            colour = _KIND_COLOURS.get(window.kind, "#9e9e9e")
            if colour:
                ax.axvspan(window.start, window.end, color=colour, alpha=0.08, lw=0)

    # 1. states: the primary's phases, the page as published, the sidecar's reading of it, the circuit.
    rows = ["primary", "status page", "sidecar: page", "circuit"]
    for w in windows:
        colour = _KIND_COLOURS.get(w.kind) or "#c8e6c9"
        states.broken_barh([(w.start, w.end - w.start)], (3.1, 0.8), color=colour)
        if w.kind != "healthy" and (w.end - w.start) / end * _PLOT_WIDTH_PX >= 6 * len(w.kind):
            states.text((w.start + w.end) / 2, 3.5, w.kind, ha="center", va="center", fontsize=7)
    for start, stop, status in _bands(scenario.status_changes("primary"), end):
        states.broken_barh([(start, stop - start)], (2.1, 0.8), color=_STATUS_COLOURS.get(status, "#9e9e9e"))
    for start, stop, value in _sample_bands(samples, "page_state", end):
        colour = _STATUS_COLOURS.get(value, "#e0e0e0")
        states.broken_barh([(start, stop - start)], (1.1, 0.8), color=colour)
    for start, stop, value in _sample_bands(samples, "shedding", end):
        if float(value) > 0:
            states.text((start + stop) / 2, 1.5, f"shed {float(value):.0%}", ha="center", va="center",
                        fontsize=7, color="white")
    for start, stop, value in _sample_bands(samples, "overridden", end):
        if value == "True" and stop - start >= 1.5:
            states.text((start + stop) / 2, 1.5, "probes answer: not shed", ha="center", va="center",
                        fontsize=7, color="white")
    for start, stop, value in _sample_bands(samples, "circuit", end):
        colour = "#c62828" if value == "open" else "#c8e6c9"
        states.broken_barh([(start, stop - start)], (0.1, 0.8), color=colour)
        if value == "open" and stop - start >= 1.5:
            states.text((start + stop) / 2, 0.5, "open", ha="center", va="center", fontsize=7, color="white")
    states.set_yticks([3.5, 2.5, 1.5, 0.5], rows, fontsize=8)
    states.set_ylim(0, 4)
    states.set_title(f"{scenario.name}: {scenario.description}", fontsize=10, loc="left")
    states.legend(handles=[Patch(color=c, label=s.replace("_", " ")) for s, c in _STATUS_COLOURS.items()],
                  loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)

    # 2. answers per second, by who answered (by send time).
    bins = list(range(seconds + 1))
    primary = [0] * seconds
    fallback = [0] * seconds
    failed = [0] * seconds
    primary_name = _primary_name(records, summary)
    for r in records:
        index = min(int(r.slot), seconds - 1)
        if not r.answered:
            failed[index] += 1
        elif r.target == primary_name:
            primary[index] += 1
        else:
            fallback[index] += 1
    x = bins[:-1]
    outcomes.bar(x, primary, width=1.0, align="edge", color="#43a047", label="primary")
    outcomes.bar(x, fallback, width=1.0, align="edge", bottom=primary, color="#fb8c00",
                 label="fallback (degraded)")
    stacked = [a + b for a, b in zip(primary, fallback, strict=True)]
    outcomes.bar(x, failed, width=1.0, align="edge", bottom=stacked, color="#e53935", label="failed")
    outcomes.set_ylabel("requests / s\n(by send time)", fontsize=8)
    outcomes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)

    # 3. latency of each request, with the p50 / p99 per 2 s.
    for colour, label, chosen in (
        ("#43a047", "primary", [r for r in records if r.answered and r.target == primary_name]),
        ("#fb8c00", "fallback", [r for r in records if r.answered and r.target != primary_name]),
        ("#e53935", "failed", [r for r in records if not r.answered and r.latency is not None]),
    ):
        latency.scatter([r.slot for r in chosen], [max(r.latency or 0.0, 1e-3) for r in chosen], s=5,
                        color=colour, alpha=0.6, label=label, lw=0)
    step = 2
    centres, p50s, p99s = [], [], []
    for start in range(0, seconds, step):
        values = [r.latency for r in records
                  if r.answered and r.latency is not None and start <= r.slot < start + step]
        if values:
            centres.append(start + step / 2)
            p50s.append(percentile(values, 50))
            p99s.append(percentile(values, 99))
    latency.plot(centres, p50s, color="#1e88e5", lw=1.2, label="p50 (2 s)")
    latency.plot(centres, p99s, color="#6a1b9a", lw=1.0, ls="--", label="p99 (2 s)")
    latency.set_yscale("log")
    latency.set_ylabel("latency (s)", fontsize=8)
    latency.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)

    # 4. what the providers received.
    clock = world.clock
    for role, fake in world.providers.items():
        colour = "#43a047" if role == "primary" else "#fb8c00"
        ok = [0] * seconds
        bad = [0] * seconds
        for rec in fake.requests:
            index = min(max(int(clock.at(rec.received_at)), 0), seconds - 1)
            if rec.status == 200:
                ok[index] += 1
            else:
                bad[index] += 1
        calls.step(x, ok, where="post", color=colour, label=f"{role} ok")
        if any(bad):
            calls.step(x, bad, where="post", color=colour, ls=":", label=f"{role} failed")
    calls.set_ylabel("upstream calls / s", fontsize=8)
    calls.set_xlabel("scenario time (s)")
    calls.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    calls.set_xlim(0, end)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _primary_name(records: Sequence[RequestRecord], summary: Summary) -> str | None:
    counts = Counter(r.target for r in records if r.answered and not r.degraded)
    return counts.most_common(1)[0][0] if counts else None


def _html(summary: Summary, scenario: Scenario, policy_text: str, notes: Sequence[str]) -> str:
    e = html.escape
    cpa = summary.calls_per_answer
    figures = [
        ("asked", str(summary.asked)),
        ("answered", f"{summary.answered} ({summary.availability:.2%})"),
        ("answers from the primary / fallback", f"{summary.from_primary} / {summary.from_fallback}"),
        ("degraded share", f"{summary.degraded_share:.1%}"),
        ("retries", str(summary.retries)),
        ("sheds by reason", ", ".join(f"{k}: {v}" for k, v in summary.sheds.items()) or "none"),
        ("latency p50 / p90 / p99 / max",
         " / ".join(_seconds(v) for v in (summary.p50, summary.p90, summary.p99, summary.max_latency))),
        ("upstream calls (primary / fallback)", f"{summary.calls_primary} / {summary.calls_fallback}"),
        ("upstream calls per answer", "-" if cpa is None else f"{cpa:.3f}"),
        ("cost (policy pricing)", f"${summary.cost_usd:.4f}"),
    ]
    if summary.errors:
        figures.append(("failures", ", ".join(f"{k}: {v}" for k, v in summary.errors.items())))
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in figures)
    window_rows = "".join(
        f"<tr class='{e(w.kind)}'><td>{w.start:.0f}&ndash;{w.end:.0f} s</td><td>{e(w.name)}</td>"
        f"<td>{w.asked}</td>"
        f"<td>{w.from_primary}</td><td>{w.from_fallback}</td><td>{w.failed}</td><td>{_seconds(w.p50)}</td>"
        f"<td>{_seconds(w.p99)}</td><td>{w.upstream_calls}</td></tr>"
        for w in summary.windows
    )
    check_rows = "".join(
        f"<tr><td class='{'ok' if c.ok else 'miss'}'>{'pass' if c.ok else 'miss'}</td><td>{e(c.name)}</td>"
        f"<td>{e(c.measured)}</td><td>{e(c.target)}</td></tr>"
        for c in summary.checks
    )
    checks = ("<h2>Acceptance figures</h2><table><tr><th></th><th>figure</th><th>measured</th>"
              f"<th>target</th></tr>{check_rows}</table>") if summary.checks else ""
    notes_html = "".join(f"<li>{e(n)}</li>" for n in notes)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>llmroute demo: {e(scenario.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; font-size: 0.92em; }}
th {{ background: #f5f5f5; }} td.ok {{ color: #2e7d32; font-weight: bold; }}
td.miss {{ color: #c62828; font-weight: bold; }} tr.outage td {{ background: #fdecea; }}
tr.microspike td {{ background: #fff4e0; }} tr.brownout td {{ background: #f3e5f5; }}
img {{ max-width: 100%; border: 1px solid #eee; }}
pre {{ background: #f7f7f7; padding: 1em; overflow: auto; }}
</style></head><body>
<h1>llmroute demo: {e(scenario.name)}</h1>
<p>{e(scenario.description)} &mdash; {scenario.duration:g} s of scenario at {summary.speed:g}x,
seed {summary.seed}.
Fake providers and a fake status page on loopback; the real llmroute sidecar in between.
Latencies are on the scenario clock.</p>
<img src="timeline.png" alt="timeline of outcomes and latency, with the status page state">
{checks}
<h2>Summary</h2><table>{rows}</table>
<h2>By window</h2>
<table><tr><th>time</th><th>window</th><th>asked</th><th>primary</th><th>fallback</th><th>failed</th>
<th>p50</th><th>p99</th><th>upstream calls</th></tr>{window_rows}</table>
<ul>{notes_html}</ul>
<h2>Policy</h2><pre>{e(policy_text)}</pre>
</body></html>
"""
