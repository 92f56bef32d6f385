"""The scenario simulator: scenario files, the time-driven fakes, and scenarios replayed through the real sidecar.

Why this exists: `llmroute demo` and `llmroute simulate` are only worth something if the fakes do what the
scenario says and the summary's numbers describe what really happened. These tests replay short scenarios on
a compressed clock through the real sidecar (in process, on loopback) and check both.
"""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from pathlib import Path

import pytest
from rich.console import Console

from llmroute_sidecar.durations import parse_duration
from llmroute_sidecar.simulator import cli as simulator_cli
from llmroute_sidecar.simulator.fakes import Fail, Reply
from llmroute_sidecar.simulator.live import LiveView
from llmroute_sidecar.simulator.report import percentile, summary_lines
from llmroute_sidecar.simulator.scenarios import (
    ProviderTimeline,
    ScenarioClock,
    ScenarioError,
    build_segments,
    load_scenario,
    parse_scenario,
    scale_policy,
)

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ROOT / "examples" / "scenarios"
POLICY = ROOT / "examples" / "demo-policy.yaml"

# 40 s of scenario at 4x (10 s of wall time): a 2 s microspike, an 18 s outage, recovery. No status page
# change, so what the sidecar does is down to retries, budget and circuit alone.
SHORT = """
name: short
duration: 40s
speed: 2  # a 2 s microspike is 1 s of real time: a busy machine does not skip it
seed: 5
traffic: {rate: 8}
providers:
  primary:
    baseline: {latency: {dist: uniform, min: 100ms, max: 300ms}, tokens: {input: 100, output: 50}}
    phases:
      - {name: spike, kind: microspike, from: 6s, to: 8s, errors: {529: 1.0}}
      - {name: outage, kind: outage, from: 12s, to: 30s, errors: {529: 1.0}}
  fallback:
    baseline: {latency: {dist: uniform, min: 150ms, max: 350ms}, tokens: {input: 90, output: 40}}
"""


def test_shipped_timeline_is_the_issues_timeline():
    scenario = load_scenario(SCENARIOS / "microspikes-and-outage.yaml")
    windows = [(w.kind, w.start, w.end) for w in scenario.windows()]
    assert windows == [
        ("healthy", 0, 10), ("microspike", 10, 12), ("healthy", 12, 22), ("microspike", 22, 24),
        ("healthy", 24, 34), ("outage", 34, 74), ("healthy", 74, 110),
    ]
    assert scenario.traffic.rate == 8 and scenario.duration == 110
    segments = build_segments(scenario, "primary")
    assert all(dict(s.errors) == {529: 1.0} for s in segments if s.kind in ("microspike", "outage"))
    assert all(not s.errors for s in build_segments(scenario, "fallback"))
    changes = [(c.at, c.status) for c in scenario.status_changes()]
    assert changes == [(0, "operational"), (50, "major_outage"), (80, "operational")]
    for name in ("quick.yaml", "slow-brownout.yaml"):
        assert load_scenario(SCENARIOS / name).duration > 0


def test_quick_scenario_fits_ci():
    scenario = load_scenario(SCENARIOS / "quick.yaml")
    assert scenario.duration / scenario.speed <= 20


def test_bad_scenarios_name_the_field():
    with pytest.raises(ScenarioError) as info:
        parse_scenario("name: x\nduration: 10s\nproviders: {primary: {phases: [{from: 5s, to: 2s}]}}")
    assert any("providers.primary.phases.0" in p for p in info.value.problems)
    with pytest.raises(ScenarioError) as info:
        parse_scenario("name: x\nduration: 10s\nproviders: {primary: {baseline: {errors: {529: 0.8, 500: 0.5}}}}")
    assert any("more than 1" in p for p in info.value.problems)
    with pytest.raises(ScenarioError):
        parse_scenario("name: x\nduration: 10s\nproviders: {primary: {baseline: {latency: {dist: lognormal}}}}")


def test_bursts_become_microspike_segments():
    scenario = parse_scenario("""
name: b
duration: 30s
providers:
  primary:
    phases:
      - {kind: brownout, from: 5s, to: 25s, errors: {500: 0.1}, bursts: {every: 8s, length: 2s, offset: 1s}}
""")
    spikes = [(s.start, s.end) for s in build_segments(scenario, "primary") if s.kind == "microspike"]
    assert spikes == [(6, 8), (14, 16), (22, 24)]


def test_decide_follows_the_clock_and_the_seed():
    scenario = parse_scenario(SHORT)
    segments = build_segments(scenario, "primary")

    def steps(seed: int) -> list[object]:
        timeline = ProviderTimeline(segments, ScenarioClock(4), random.Random(seed))
        return [timeline.step_at(t) for t in (1.0, 6.5, 7.9, 10.0, 20.0)]

    first = steps(1)
    assert first == steps(1) and first != steps(2)
    kinds = [type(step) for step in first]
    assert kinds == [Reply, Fail, Fail, Reply, Fail]
    assert all(step.status == 529 for step in first if isinstance(step, Fail))
    reply = first[0]
    assert isinstance(reply, Reply) and 0.1 / 4 <= reply.delay <= 0.3 / 4  # latency on the compressed clock


def test_scale_policy_divides_durations_and_keeps_rates():
    import yaml

    document = yaml.safe_load(POLICY.read_text())
    scaled = scale_policy(document, 4)["spec"]
    route = scaled["routes"][0]
    assert parse_duration(route["budget"]) == 2 and parse_duration(route["backoff"]["initial"]) == 0.125
    assert parse_duration(route["firstTokenTimeout"]) == 3.75 and parse_duration(route["stallTimeout"]) == 7.5
    assert parse_duration(scaled["retryBudget"]["window"]) == 2.5 and scaled["retryBudget"]["minPerSecond"] == 40
    assert parse_duration(scaled["providers"][0]["statusPage"]["pollInterval"]) == 2.5
    assert scale_policy(document, 1)["spec"]["routes"][0]["budget"] == "8s"


async def test_short_scenario_end_to_end():
    """Through the real sidecar: the fakes obey the scenario, the microspike is absorbed on the primary,
    the outage is answered by the fallback (degraded), and the primary answers again afterwards."""
    import yaml

    scenario = parse_scenario(SHORT)
    document = yaml.safe_load(POLICY.read_text())
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    views: list[LiveView] = []

    def view(world, primary_target):  # type: ignore[no-untyped-def]
        views.append(LiveView(scenario, world, primary_target, console, plain=False))
        return views[0]

    result = await simulator_cli.run_scenario(scenario, document, view_factory=view)
    world, summary, records = result.world, result.summary, result.records

    # The fakes served what the scenario says, segment by segment.
    served = world.timelines["primary"].served_by_segment()
    assert set(served["spike"]) == {"529"} and served["spike"]["529"] >= 3
    assert set(served["outage"]) == {"529"}
    assert set(served["healthy"]) == {"ok"}
    assert set(world.timelines["fallback"].served_by_segment()["healthy"]) == {"ok"}
    statuses = Counter(r.status for r in world.providers["primary"].requests)
    assert statuses[529] == served["spike"]["529"] + served["outage"]["529"]
    assert len(world.providers["primary"].requests) == sum(sum(c.values()) for c in served.values())

    # The summary's numbers.
    assert summary.asked == len(records) == 320
    assert summary.answered == summary.asked, summary_lines(summary)
    assert summary.fallback_in_microspikes == 0
    spike = next(w for w in summary.windows if w.kind == "microspike")
    assert spike.from_fallback == 0 and spike.from_primary == spike.asked
    outage = [r for r in records if 12.5 <= r.slot < 29]  # margins: a probe at the very end may succeed
    assert outage and all(r.target == "backup" and r.degraded for r in outage)
    after = [r for r in records if r.slot >= 33]
    assert after and all(r.target == "primary" and not r.degraded for r in after)
    assert summary.from_fallback == sum(1 for r in records if r.target == "backup")
    assert summary.calls_primary == len(world.providers["primary"].requests)
    assert summary.calls_fallback == summary.from_fallback
    assert summary.cost_usd > 0
    assert summary.sheds.get("circuit-open", 0) > 0  # the outage outlived the budget: the circuit opened
    assert any(s.circuit == "open" for s in result.samples)
    outage_window = next(w for w in summary.windows if w.kind == "outage")
    assert outage_window.p50 is not None and outage_window.p50 < 2.0
    assert summary.p50 == percentile([r.latency for r in records if r.latency is not None], 50)
    # The live view drew with rich all along.
    assert "llmroute demo" in console.file.getvalue()  # type: ignore[attr-defined]


def test_simulate_status_page_shedding_loses_fewer_answers_than_no_failover(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "simulate.json"
    code = simulator_cli.main("simulate", [
        "--scenario", str(SCENARIOS / "quick.yaml"), "--speed", "8",
        "--only", "no-failover,retry-and-shed-8s+status", "--json", str(out),
    ])
    assert code == 0
    report = json.loads(out.read_text())
    by_name = {s["name"]: s for s in report["strategies"]}
    single, shed = by_name["no-failover"], by_name["retry-and-shed-8s+status"]
    assert single["asked"] == shed["asked"] > 0
    assert shed["answered"] > single["answered"]
    assert single["from_fallback"] == 0 and shed["from_fallback"] > 0
    assert {"availability", "degraded_share", "p50", "p99", "calls_per_answer", "cost_usd"} <= set(shed)


def test_seeded_runs_agree(tmp_path, monkeypatch):
    """Same seed, same traffic, faults and jitter: the figures of two runs agree closely. Not to the
    request: the fakes and the circuit follow the real clock, which a busy machine perturbs."""
    monkeypatch.chdir(ROOT)
    reports = []
    for run in range(2):
        out = tmp_path / f"run{run}.json"
        code = simulator_cli.main("simulate", [
            # 4x, not faster: at 8x a 100 ms stall of a busy machine moves the recovery by most of a second.
            "--scenario", str(SCENARIOS / "quick.yaml"), "--speed", "4", "--seed", "11",
            "--only", "retry-and-shed-8s", "--json", str(out),
        ])
        assert code == 0
        reports.append(json.loads(out.read_text())["strategies"][0])
    first, second = reports
    assert first["asked"] == second["asked"] and first["answered"] == second["answered"]
    assert abs(first["from_fallback"] - second["from_fallback"]) <= 0.05 * first["asked"]
    assert abs(first["calls_per_answer"] - second["calls_per_answer"]) <= 0.05


def test_rate_limit_phases_send_the_providers_headers_and_429s_until_the_phase_ends():
    scenario = load_scenario(SCENARIOS / "ratelimit-storm.yaml")
    clock = ScenarioClock(4)
    timeline = ProviderTimeline(build_segments(scenario, "primary"), clock, random.Random(1))
    healthy = timeline.step_at(10.0, dialect="anthropic")
    assert isinstance(healthy, Reply) and healthy.headers is not None
    assert healthy.headers["anthropic-ratelimit-requests-limit"] == "4000"
    assert healthy.headers["anthropic-ratelimit-requests-remaining"] == "3999"
    storm = timeline.step_at(40.0, dialect="anthropic")
    assert isinstance(storm, Fail) and storm.status == 429 and storm.headers is not None
    assert storm.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert storm.retry_after == pytest.approx((50 - 40) / 4)  # until the phase ends, on the compressed clock
    fallback = ProviderTimeline(build_segments(scenario, "fallback"), clock, random.Random(1))
    answer = fallback.step_at(40.0, dialect="openai")
    assert isinstance(answer, Reply) and answer.headers is not None
    assert answer.headers["x-ratelimit-remaining-requests"] == "9999"
    assert parse_duration(answer.headers["x-ratelimit-reset-requests"]) == pytest.approx(20 / 4)


def test_the_rate_limit_storm_costs_far_fewer_429s_and_calls_with_rate_limits_on(tmp_path, monkeypatch):
    """The shipped storm, simulated with the default policy and with `rateLimits.enabled: false`: reading
    the headers spares the primary nearly every call during the storm."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "storm.json"
    code = simulator_cli.main("simulate", [
        "--scenario", "ratelimit-storm", "--speed", "4", "--only", "retry-and-shed-8s,retry-and-shed-8s-no-rl",
        "--json", str(out),
    ])
    assert code == 0
    by_name = {s["name"]: s for s in json.loads(out.read_text())["strategies"]}
    on, off = by_name["retry-and-shed-8s"], by_name["retry-and-shed-8s-no-rl"]
    assert on["asked"] == off["asked"] > 0 and on["answered"] == on["asked"]
    assert on["sheds"].get("rate-limit", 0) > 0 and "rate-limit" not in off["sheds"]
    # Only requests already in flight when the first 429 lands can meet one more; without the headers every
    # request meets one until the circuit opens (ratios vary with how busy the machine is: README has them).
    assert on["upstream_429"] < off["upstream_429"]
    assert on["calls_per_answer"] <= off["calls_per_answer"]
