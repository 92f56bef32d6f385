"""Resilience end to end: status-page shedding, the circuit breaker, quorum, hedging and hot-hot.

Everything runs on loopback: the real sidecar app, `FakeProvider`s for the primary (Anthropic dialect) and
the fallback (OpenAI dialect), and a `FakeStatusPage` serving Claude's real `summary.json` shape. Time is
scaled down (budgets and `openAfter` of a fraction of a second) and every wait is a bounded condition
wait, so each test stays well under 10 s on a busy 2-core machine.
"""

from __future__ import annotations

import asyncio
import copy
import statistics
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import aiohttp
import pytest

from llmroute_sidecar.health import TargetHealth
from llmroute_sidecar.server import SidecarState
from llmroute_sidecar.simulator.fake_statuspage import FakeStatusPage
from llmroute_sidecar.simulator.fakes import Fail, FakeProvider, RecordedRequest, Reply, Step

from .harness import policy_document, running_sidecar

CLAUDE_API = "k8w3r06qmzrp"  # "Claude API (api.anthropic.com)" on status.claude.com


# ----- helpers -------------------------------------------------------------------------------------------



@pytest.fixture
async def status_page() -> AsyncIterator[FakeStatusPage]:
    async with FakeStatusPage.claude() as page:
        yield page


def sidecar(
    document: dict[str, Any], *, statuspage_min_interval: float | None = None
) -> AbstractAsyncContextManager[tuple[str, SidecarState]]:
    """The real sidecar on loopback; `statuspage_min_interval` lowers the pollers' 10 s floor."""
    return running_sidecar(document, statuspage_min_interval=statuspage_min_interval)


class Client:
    """One HTTP session to the sidecar; `post` returns (status, headers, body, seconds)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.session = aiohttp.ClientSession()

    async def post(
        self, route: str = "summarize", headers: dict[str, str] | None = None, text: str = "printer on fire"
    ) -> tuple[int, dict[str, str], dict[str, Any], float]:
        started = time.monotonic()
        async with self.session.post(
            f"{self.url}/v1/routes/{route}", json={"variables": {"text": text}}, headers=headers
        ) as response:
            body = await response.json()
            return response.status, dict(response.headers), body, time.monotonic() - started

    async def get_json(self, path: str) -> Any:
        async with self.session.get(self.url + path) as response:
            return await response.json()

    async def close(self) -> None:
        await self.session.close()


@asynccontextmanager
async def client(url: str) -> AsyncIterator[Client]:
    c = Client(url)
    try:
        yield c
    finally:
        await c.close()


async def eventually(condition: Callable[[], bool], timeout: float = 3.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        await asyncio.sleep(0.005)


def page_spec(url: str, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "url": url,
        "components": [CLAUDE_API],
        "pollInterval": "30s",  # the background poller polls once at start; tests drive the rest
        "confirmAfter": 2,
        "recoverAfter": 2,
    }
    spec.update(overrides)
    return spec


def health(state: SidecarState, target: str = "primary", route: str = "summarize") -> TargetHealth:
    return state.upstreams.healths()[(route, target)]


class CircuitWatch:
    """Samples a target's circuit state every few ms in the background: did it ever open?"""

    def __init__(self, target: TargetHealth) -> None:
        self.target = target
        self.ever_open = False
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.ever_open = self.ever_open or self.target.state == "open"
            await asyncio.sleep(0.002)

    async def __aenter__(self) -> CircuitWatch:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.ever_open = self.ever_open or self.target.state == "open"


# ----- status-page shedding ------------------------------------------------------------------------------


async def test_confirmed_major_outage_sheds_with_zero_primary_calls_and_recovery_returns_traffic(
    fakes: tuple[FakeProvider, FakeProvider], status_page: FakeStatusPage
) -> None:
    primary, fallback = fakes
    document = policy_document(primary.url, fallback.url, primary_status_page=page_spec(status_page.summary_url))
    async with sidecar(document) as (url, state), client(url) as app:
        board = state.upstreams.status
        await eventually(lambda: board.snapshot()["claude"]["polls"] >= 1, what="first poll")
        status, headers, body, _ = await app.post()
        assert status == 200 and body["target"] == "primary"

        status_page.set_component(CLAUDE_API, "major_outage")
        await board.poll_now()  # 1 of confirmAfter=2: not confirmed yet
        status, headers, body, _ = await app.post()
        assert body["target"] == "primary" and "llmroute-shed-reason" not in headers

        await board.poll_now()  # confirmed
        calls = primary.count()
        status, headers, body, seconds = await app.post()
        assert status == 200 and body["target"] == "backup" and body["degraded"] is True
        assert headers["llmroute-shed-reason"] == "status-page"
        assert primary.count() == calls, "a confirmed outage must not cost a single primary call"
        assert body["attempts"][0] == {"target": "primary", "status": "skipped", "ms": 0, "error": "status-page"}
        provider = (await app.get_json("/status"))["providers"]["claude"]
        assert provider["state"] == "major_outage" and provider["shedding"] == 1.0
        assert provider["lastGoodPoll"] is not None

        status_page.set_component(CLAUDE_API, "operational")
        await board.poll_now()  # 1 of recoverAfter=2: still shedding
        status, headers, body, _ = await app.post()
        assert body["target"] == "backup" and headers["llmroute-shed-reason"] == "status-page"
        assert primary.count() == calls

        await board.poll_now()  # recovered
        status, headers, body, _ = await app.post()
        assert body["target"] == "primary" and "llmroute-shed-reason" not in headers
        assert primary.count() == calls + 1


async def test_background_poller_confirms_and_recovers_within_a_few_intervals(
    fakes: tuple[FakeProvider, FakeProvider], status_page: FakeStatusPage
) -> None:
    primary, fallback = fakes
    spec = page_spec(status_page.summary_url, pollInterval="50ms", confirmAfter=3, recoverAfter=2)
    document = policy_document(primary.url, fallback.url, primary_status_page=spec)
    async with sidecar(document, statuspage_min_interval=0.01) as (url, state), client(url) as app:
        board = state.upstreams.status
        await eventually(lambda: board.snapshot()["claude"]["polls"] >= 2, what="background polls")
        polls_before = status_page.count()
        status_page.set_component(CLAUDE_API, "major_outage")
        await eventually(lambda: board.shed_share("claude")[0] == 1.0, what="outage confirmed")
        # Hysteresis: at least confirmAfter polls saw the outage before anything was shed.
        assert status_page.count() - polls_before >= 3
        calls = primary.count()
        status, headers, body, _ = await app.post()
        assert body["target"] == "backup" and headers["llmroute-shed-reason"] == "status-page"
        assert primary.count() == calls

        status_page.set_component(CLAUDE_API, "operational")
        await eventually(lambda: board.shed_share("claude")[0] == 0.0, what="recovery confirmed")
        status, headers, body, _ = await app.post()
        assert body["target"] == "primary" and "llmroute-shed-reason" not in headers


async def test_only_the_watched_component_sheds_and_the_page_indicator_works_without_components(
    fakes: tuple[FakeProvider, FakeProvider], status_page: FakeStatusPage
) -> None:
    primary, fallback = fakes
    status_page.set_component("claude.ai", "major_outage")  # the page says "critical", the API is fine
    watched = policy_document(
        primary.url, fallback.url, primary_status_page=page_spec(status_page.summary_url, confirmAfter=1)
    )
    async with sidecar(watched) as (url, state), client(url) as app:
        await state.upstreams.status.poll_now()
        assert state.upstreams.status.shed_share("claude") == (0.0, "operational")
        _, headers, body, _ = await app.post()
        assert body["target"] == "primary" and "llmroute-shed-reason" not in headers

    whole_page = page_spec(status_page.summary_url, components=[], confirmAfter=1, shedOn=["critical"])
    document = policy_document(primary.url, fallback.url, primary_status_page=whole_page)
    status_page.set_component("claude.ai", "partial_outage")  # indicator "major": not in shedOn
    async with sidecar(document) as (url, state), client(url) as app:
        board = state.upstreams.status
        await board.poll_now()
        assert board.shed_share("claude") == (0.0, "major")
        _, headers, body, _ = await app.post()
        assert body["target"] == "primary"

        status_page.set_component("claude.ai", "major_outage")  # indicator "critical"
        await board.poll_now()
        calls = primary.count()
        _, headers, body, _ = await app.post()
        assert body["target"] == "backup" and headers["llmroute-shed-reason"] == "status-page"
        assert primary.count() == calls


async def test_partial_outage_sheds_about_the_configured_share(
    fakes: tuple[FakeProvider, FakeProvider], status_page: FakeStatusPage
) -> None:
    primary, fallback = fakes
    spec = page_spec(status_page.summary_url, confirmAfter=1, partialShed={"partial_outage": 0.5})
    document = policy_document(primary.url, fallback.url, primary_status_page=spec)
    status_page.set_component(CLAUDE_API, "partial_outage")
    async with sidecar(document) as (url, state), client(url) as app:
        await state.upstreams.status.poll_now()
        assert state.upstreams.status.shed_share("claude") == (0.5, "partial_outage")
        calls = primary.count()
        results = []
        for _ in range(8):
            results += await asyncio.gather(*(app.post() for _ in range(20)))
    shed = [r for r in results if r[1].get("llmroute-shed-reason") == "status-page"]
    kept = [r for r in results if r[2]["target"] == "primary"]
    assert len(shed) + len(kept) == 160
    # Binomial(160, 0.5): sd 6.3 requests; 0.3..0.7 is more than 5 sd either side.
    assert 0.3 < len(shed) / 160 < 0.7
    assert all(r[2]["target"] == "backup" for r in shed)
    assert primary.count() - calls == len(kept), "a shed request never calls the primary"


@pytest.mark.parametrize("fault", ["html", "error", "garbage", "wrong_shape", "rate_limited", "oversized"])
async def test_unusable_status_page_never_sheds(
    fakes: tuple[FakeProvider, FakeProvider], status_page: FakeStatusPage, fault: str
) -> None:
    primary, fallback = fakes
    status_page.set_component(CLAUDE_API, "major_outage")  # what it would say if it could be read
    status_page.fault = fault  # type: ignore[assignment]
    spec = page_spec(status_page.summary_url, confirmAfter=1)
    document = policy_document(primary.url, fallback.url, primary_status_page=spec)
    async with sidecar(document) as (url, state), client(url) as app:
        board = state.upstreams.status
        for _ in range(3):
            await board.poll_now()
        assert board.shed_share("claude")[0] == 0.0
        status, headers, body, _ = await app.post()
        assert status == 200 and body["target"] == "primary" and "llmroute-shed-reason" not in headers
        provider = (await app.get_json("/status"))["providers"]["claude"]
        assert provider["usable"] is False and provider["lastError"]
        assert provider["shedding"] == 0.0 and provider["lastGoodPoll"] is None
    assert status_page.count() >= 3


async def test_hanging_status_page_never_slows_requests(
    fakes: tuple[FakeProvider, FakeProvider], status_page: FakeStatusPage
) -> None:
    primary, fallback = fakes
    document = policy_document(primary.url, fallback.url, primary_status_page=page_spec(status_page.summary_url))
    async with sidecar(document) as (url, state), client(url) as app:
        board = state.upstreams.status
        await eventually(lambda: board.snapshot()["claude"]["polls"] >= 1, what="first poll")
        baseline = [(await app.post())[3] for _ in range(5)]
        status_page.fault = "hang"
        status_page.set_component(CLAUDE_API, "major_outage")
        seen = status_page.count()
        polling = asyncio.create_task(board.poll_now())
        try:
            await status_page.wait_for(lambda: status_page.count() > seen)  # a poll is now hanging
            during = []
            for _ in range(5):
                status, headers, body, seconds = await app.post()
                assert status == 200 and body["target"] == "primary" and "llmroute-shed-reason" not in headers
                during.append(seconds)
            assert not polling.done(), "the poll should still be hanging"
        finally:
            polling.cancel()
            await asyncio.gather(polling, return_exceptions=True)
    # As fast as without the hanging page (median), and never anywhere near the poll's 5 s timeout.
    assert statistics.median(during) <= statistics.median(baseline) + 0.05, (baseline, during)
    assert max(during) < 0.5, (baseline, during)


async def test_one_poller_per_status_page_however_many_routes_and_providers_use_it(
    fakes: tuple[FakeProvider, FakeProvider], status_page: FakeStatusPage
) -> None:
    primary, fallback = fakes
    spec = page_spec(status_page.summary_url, pollInterval="100ms", confirmAfter=1)
    document = policy_document(primary.url, fallback.url, primary_status_page=spec)
    providers = document["spec"]["providers"]
    providers.append({**copy.deepcopy(providers[0]), "name": "claude-eu"})
    base_route = document["spec"]["routes"][0]
    for name, provider in (("triage", "claude"), ("reply", "claude"), ("translate", "claude-eu")):
        route = copy.deepcopy(base_route)
        route["name"] = name
        route["targets"][0]["provider"] = provider
        document["spec"]["routes"].append(route)
    async with sidecar(document, statuspage_min_interval=0.01) as (url, state), client(url) as app:
        board = state.upstreams.status
        assert len(board.pollers) == 1
        started = time.monotonic()
        await status_page.wait_for(lambda: status_page.count() >= 6, timeout=5)
        elapsed = time.monotonic() - started
        # One poller at 100 ms (jitter 0.9..1.1): about elapsed / 0.1 + 1 requests; four would be 4x.
        assert status_page.count() <= elapsed / 0.09 + 2, (status_page.count(), elapsed)

        status_page.set_component(CLAUDE_API, "major_outage")
        await eventually(lambda: board.shed_share("claude-eu")[0] == 1.0, what="shed")
        assert board.shed_share("claude")[0] == 1.0
        calls = primary.count()
        for route in ("summarize", "triage", "translate"):
            _, headers, body, _ = await app.post(route)
            assert body["target"] == "backup" and headers["llmroute-shed-reason"] == "status-page"
        assert primary.count() == calls


# ----- circuit breaker ------------------------------------------------------------------------------------


def failing_until(moment: Callable[[], float], step: Step) -> Callable[[RecordedRequest], Step | None]:
    """A `decide` hook: `step` while now < moment(), else the fake's default (a reply)."""
    return lambda _request: step if time.monotonic() < moment() else None


async def test_a_burst_shorter_than_open_after_never_opens_the_circuit(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    primary, fallback = fakes
    burst_end = [0.0]
    primary.decide = failing_until(lambda: burst_end[0], Fail(529))
    document = policy_document(
        primary.url,
        fallback.url,
        # Waits this short fit maxAttempts (5) into 0.2 s; the cap is not what this test is about.
        route={"budget": "1500ms", "backoff": {"initial": "20ms", "max": "60ms"}, "maxAttempts": 20},
        spec={"circuitBreaker": {"openAfter": "1s", "minFailures": 3, "probeInterval": "200ms"}},
    )
    async with sidecar(document) as (url, state), client(url) as app:
        async with CircuitWatch(health(state)) as watch:
            burst_end[0] = time.monotonic() + 0.4
            tasks = []
            for _ in range(20):  # ~25 req/s from the start of the burst to well after it
                tasks.append(asyncio.create_task(app.post()))
                await asyncio.sleep(0.04)
            results = await asyncio.gather(*tasks)
    assert all(status == 200 for status, *_ in results)
    assert all(body["target"] == "primary" for _, _, body, _ in results)
    assert fallback.count() == 0
    failures = sum(1 for r in primary.requests if r.status == 529)
    assert failures >= 3, "the burst must fail more often than minFailures (a count alone would open)"
    assert not watch.ever_open


async def test_a_long_streak_opens_the_circuit_which_skips_probes_and_closes(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    primary, fallback = fakes
    primary.default = Fail(529)
    document = policy_document(
        primary.url,
        fallback.url,
        route={"budget": "300ms", "backoff": {"initial": "20ms", "max": "50ms"}},
        spec={"circuitBreaker": {"openAfter": "500ms", "minFailures": 3, "probeInterval": "300ms"}},
    )
    async with sidecar(document) as (url, state), client(url) as app:
        target = health(state)
        started = time.monotonic()
        while target.state != "open":  # sequential requests on a dead primary
            assert time.monotonic() - started < 5, "the circuit never opened"
            status, _, body, _ = await app.post()
            assert status == 200 and body["target"] == "backup"
        first_failure = primary.requests[0].received_at
        assert target.opened_at is not None and target.opened_at - first_failure >= 0.5
        assert (await app.get_json("/status"))["routes"]["summarize"]["targets"]["primary"]["state"] == "open"

        # Open: requests skip the primary at once (no call), except one probe per probeInterval.
        calls = primary.count()
        status, headers, body, seconds = await app.post()
        assert body["target"] == "backup" and headers["llmroute-shed-reason"] == "circuit-open"
        assert body["attempts"][0]["status"] == "skipped" and primary.count() == calls
        window_start = time.monotonic()
        window = []
        while time.monotonic() - window_start < 1.0:
            window.append(await app.post())
            await asyncio.sleep(0.02)
        window_seconds = time.monotonic() - window_start
        probes = primary.count() - calls
        # probeInterval 300 ms with jitter 0.8..1.2: between window/0.36 and window/0.24 (+1) probes.
        assert int(window_seconds / 0.36) - 1 <= probes <= window_seconds / 0.24 + 1, (probes, window_seconds)
        assert all(r[2]["target"] == "backup" for r in window)
        assert all(
            sum(1 for a in r[2]["attempts"] if a["target"] == "primary" and a["status"] == "error") <= 1
            for r in window
        ), "a probe is one attempt, never a retry loop"

        # The primary recovers: the first successful probe closes the circuit.
        primary.default = Reply()
        deadline = time.monotonic() + 2
        while True:
            assert time.monotonic() < deadline, "no probe reached the recovered primary"
            _, headers, body, _ = await app.post()
            if body["target"] == "primary":
                break
            await asyncio.sleep(0.02)
        assert target.state == "closed"
        for _ in range(3):
            _, headers, body, _ = await app.post()
            assert body["target"] == "primary" and "llmroute-shed-reason" not in headers


async def test_client_errors_never_open_the_circuit(fakes: tuple[FakeProvider, FakeProvider]) -> None:
    primary, fallback = fakes
    primary.default = Fail(400, message="max_tokens: too large")
    document = policy_document(
        primary.url,
        fallback.url,
        spec={"circuitBreaker": {"openAfter": "200ms", "minFailures": 2, "probeInterval": "100ms"}},
    )
    async with sidecar(document) as (url, state), client(url) as app:
        started = time.monotonic()
        count = 0
        while time.monotonic() - started < 0.5 or count < 5:
            status, headers, _, _ = await app.post()
            assert status == 400 and headers["x-should-retry"] == "false"
            count += 1
        target = health(state)
        assert target.state == "closed" and target.failures == 0
    assert fallback.count() == 0 and primary.count() == count


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_circuit_rules_on_a_fake_clock() -> None:
    """openAfter is time, minFailures a floor, a quiet gap ends a streak, a success resets it."""
    clock = Clock()
    target = TargetHealth(open_after=8.0, min_failures=3, probe_interval=1.0, clock=clock)
    for _ in range(50):  # a 2 s burst of 529s at 25 failures/s: many failures, too short
        clock.now += 0.04
        target.record_failure(0.01)
    assert target.state == "closed" and target.failures == 50
    target.record_success(0.2)
    assert target.failures == 0 and target.streak_start is None

    target.record_failure(0.01)  # two failures 9 s apart: long enough, but fewer than minFailures
    clock.now += 7.9
    target.record_failure(0.01)
    clock.now += 1.0
    assert target.state == "closed"
    target.record_failure(0.01)  # the third one, 8.9 s into the streak: an outage
    assert target.state == "open"
    assert target.snapshot()["state"] == "open"

    quiet = TargetHealth(open_after=8.0, min_failures=3, probe_interval=1.0, clock=clock)
    for _ in range(4):  # microspikes 20 s apart with no traffic between them: never one long streak
        quiet.record_failure(0.01)
        clock.now += 20.0
    assert quiet.state == "closed" and quiet.failures == 1


def test_open_circuit_grants_one_probe_per_interval_and_closes_on_success() -> None:
    clock = Clock()
    target = TargetHealth(open_after=1.0, min_failures=1, probe_interval=1.0, clock=clock)
    for _ in range(3):
        target.record_failure(0.01)
        clock.now += 0.6
    assert target.state == "open"
    assert not target.allow()  # the first probe waits 0.8..1.2 s
    clock.now += 1.25
    assert target.allow() and not target.allow() and not target.allow()  # one probe, not one per request
    target.record_failure(0.01)  # the probe failed: still open, next probe an interval later
    assert target.state == "open" and not target.allow()
    clock.now += 1.25
    assert target.allow()
    target.record_success(0.1)
    assert target.state == "closed" and target.allow() and target.allow()


# ----- quorum and hedging ---------------------------------------------------------------------------------

QUORUM_HEADER = {"llmroute-priority": "high"}


def quorum_route(**quorum: Any) -> dict[str, Any]:
    return {"quorum": {"whenHeader": QUORUM_HEADER, "targets": ["primary", "backup"], **quorum}}


async def test_quorum_first_answer_wins_and_losers_are_cancelled(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    primary, fallback = fakes
    primary.script(Reply(delay=3.0))
    document = policy_document(primary.url, fallback.url, route=quorum_route(pick="first"))
    async with sidecar(document) as (url, state), client(url) as app:
        status, headers, body, seconds = await app.post(headers=QUORUM_HEADER)
        assert status == 200 and body["target"] == "backup"
        assert headers["llmroute-shed-reason"] == "quorum"
        assert seconds < 1.5
        # The slow primary's upstream connection was closed: the fake saw the client go away.
        await primary.wait_for(lambda: primary.requests[0].finished, timeout=2)
        assert primary.requests[0].outcome == "disconnected"
        assert {a["target"]: a["status"] for a in body["attempts"]} == {"primary": "cancelled", "backup": "ok"}

        fallback.script(Reply(delay=3.0))  # now the backup is the slow one
        status, headers, body, _ = await app.post(headers=QUORUM_HEADER)
        assert body["target"] == "primary" and "llmroute-shed-reason" not in headers
        await fallback.wait_for(lambda: fallback.requests[-1].finished, timeout=2)
        assert fallback.requests[-1].outcome == "disconnected"
        metrics = await (await app.session.get(url + "/metrics")).text()
    assert 'llmroute_quorum_calls_total{result="call",route="summarize"} 4.0' in metrics
    assert 'llmroute_quorum_calls_total{result="fallback-win",route="summarize"} 1.0' in metrics
    assert 'llmroute_quorum_calls_total{result="win",route="summarize"} 1.0' in metrics


async def test_quorum_best_waits_up_to_grace_and_picks_by_target_order(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    primary, fallback = fakes
    document = policy_document(primary.url, fallback.url, route=quorum_route(pick="best", grace="600ms"))
    async with sidecar(document) as (url, state), client(url) as app:
        primary.script(Reply(delay=0.25))  # later than the backup, but within grace: the primary wins
        status, headers, body, seconds = await app.post(headers=QUORUM_HEADER)
        assert status == 200 and body["target"] == "primary" and "llmroute-shed-reason" not in headers
        assert 0.25 <= seconds < 0.6
        assert {a["target"]: a["status"] for a in body["attempts"]} == {"primary": "ok", "backup": "ok"}
        # The backup's answer was discarded, but it was paid for: its tokens are counted.
        metrics = await (await app.session.get(url + "/metrics")).text()
        assert 'llmroute_tokens_total{kind="output",model="gpt-4.1-mini",provider="gpt"}' in metrics

        primary.script(Reply(delay=3.0))  # beyond grace: the backup wins once grace is over
        status, headers, body, seconds = await app.post(headers=QUORUM_HEADER)
        assert body["target"] == "backup" and headers["llmroute-shed-reason"] == "quorum"
        assert 0.6 <= seconds < 1.5
        await primary.wait_for(lambda: primary.requests[-1].finished, timeout=2)
        assert primary.requests[-1].outcome == "disconnected"


@pytest.mark.parametrize("pick", ["first", "best"])
async def test_a_client_error_from_the_primary_wins_over_any_quorum_answer(
    fakes: tuple[FakeProvider, FakeProvider], pick: str
) -> None:
    """CONTRACT §3: a client error from the primary goes back to the app, with no fallback answer.
    `best` waits for the primary anyway (it would win), so its 400 decides even after the backup
    answered; `first` decides on whichever comes first, here the 400."""
    primary, fallback = fakes
    if pick == "best":
        primary.script(Fail(400, delay=0.2))  # the backup has answered by then
    else:
        primary.script(Fail(400))
        fallback.script(Reply(delay=0.3))
    document = policy_document(primary.url, fallback.url, route=quorum_route(pick=pick))
    async with sidecar(document) as (url, state), client(url) as app:
        status, headers, body, _ = await app.post(headers=QUORUM_HEADER)
    assert status == 400, body
    assert headers["x-should-retry"] == "false" and headers["llmroute-degraded"] == "false"
    assert fallback.count() == 1  # it was called (in parallel), but its answer is not what the app gets


async def test_quorum_is_selected_by_header_and_sample_zero_never_selects(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    primary, fallback = fakes
    document = policy_document(primary.url, fallback.url, route=quorum_route(sample=0))
    async with sidecar(document) as (url, state), client(url) as app:
        for _ in range(20):
            _, headers, body, _ = await app.post()
            assert body["target"] == "primary"
        assert fallback.count() == 0 and primary.count() == 20
        _, _, body, _ = await app.post(headers={"llmroute-priority": "low"})
        assert fallback.count() == 0
        _, _, body, _ = await app.post(headers=QUORUM_HEADER)
        assert fallback.count() == 1 and primary.count() == 22

    sampled = policy_document(
        primary.url, fallback.url, route={"quorum": {"sample": 1.0, "targets": ["primary", "backup"]}}
    )
    async with sidecar(sampled) as (url, state), client(url) as app:
        before = fallback.count()
        for _ in range(3):
            await app.post()
        assert fallback.count() - before == 3


async def test_hedge_fires_only_for_a_slow_primary(fakes: tuple[FakeProvider, FakeProvider]) -> None:
    primary, fallback = fakes
    route = {"quorum": {"sample": 1.0, "targets": ["primary", "backup"], "hedgeAfter": "300ms"}}
    document = policy_document(primary.url, fallback.url, route=route)
    async with sidecar(document) as (url, state), client(url) as app:
        for _ in range(3):  # fast primary: one upstream call each, no hedge
            status, headers, body, _ = await app.post()
            assert body["target"] == "primary" and "llmroute-shed-reason" not in headers
        assert primary.count() == 3 and fallback.count() == 0

        primary.script(Reply(delay=3.0))
        status, headers, body, seconds = await app.post()
        assert status == 200 and body["target"] == "backup"
        assert headers["llmroute-shed-reason"] == "hedge"
        assert 0.3 <= seconds < 1.5
        slow, hedge = primary.requests[-1], fallback.requests[-1]
        assert hedge.received_at - slow.received_at >= 0.29  # started only after hedgeAfter
        await primary.wait_for(lambda: slow.finished, timeout=2)
        assert slow.outcome == "disconnected"
        metrics = await (await app.session.get(url + "/metrics")).text()
    assert 'llmroute_quorum_calls_total{result="hedge",route="summarize"} 1.0' in metrics
    assert 'llmroute_quorum_calls_total{result="hedge-win",route="summarize"} 1.0' in metrics


# ----- hot-hot -------------------------------------------------------------------------------------------


async def test_hot_hot_spreads_traffic_and_avoids_a_failing_target(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    primary, fallback = fakes
    route = {"strategy": "hotHot", "acknowledgeOutputVariance": True}
    document = policy_document(primary.url, fallback.url, route=route)
    async with sidecar(document) as (url, state), client(url) as app:
        warm = [await app.post() for _ in range(30)]
        by_target = [r[2]["target"] for r in warm]
        assert by_target.count("primary") >= 5 and by_target.count("backup") >= 5  # spread across both

        primary.default = Fail(500)
        calls = primary.count()
        results = [await app.post() for _ in range(60)]
    assert all(r[0] == 200 and r[2]["target"] == "backup" for r in results)
    tried = primary.count() - calls
    assert tried <= 10, f"the failing target was still tried {tried} times out of 60"


# ----- the issue's timeline, scaled down ---------------------------------------------------------------------


async def test_scaled_timeline_microspikes_never_reach_the_fallback_and_outages_shed_fast(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    """8 req/s, two 2 s microspikes, a 40 s outage, openAfter = budget = 8 s; here time and rate scaled by 10."""
    primary, fallback = fakes
    scale = 0.1
    phases = [("ok", 2.0), ("spike", 2.0), ("ok", 2.0), ("spike", 2.0), ("ok", 2.0), ("outage", 40.0), ("ok", 2.0)]
    start = [0.0]

    def phase_at(moment: float) -> str:
        offset = moment - start[0]
        for name, length in phases:
            if offset < length * scale:
                return name
            offset -= length * scale
        return "ok"

    primary.decide = lambda _r: Fail(529) if phase_at(time.monotonic()) != "ok" else None
    document = policy_document(
        primary.url,
        fallback.url,
        route={"budget": "800ms", "backoff": {"initial": "50ms", "max": "400ms"}},  # the defaults, scaled
        spec={"circuitBreaker": {"minFailures": 3, "probeInterval": "100ms"}},  # openAfter: the budget
    )
    rate = 80.0
    async with sidecar(document) as (url, state), client(url) as app:
        start[0] = time.monotonic()
        total = sum(length for _, length in phases) * scale
        tasks: list[tuple[float, asyncio.Task[tuple[int, dict[str, str], dict[str, Any], float]]]] = []
        n = 0
        while (moment := start[0] + n / rate) < start[0] + total:
            await asyncio.sleep(max(0.0, moment - time.monotonic()))
            tasks.append((time.monotonic(), asyncio.create_task(app.post())))
            n += 1
        results = [(phase_at(sent), sent, await task) for sent, task in tasks]
    assert all(r[0] == 200 for _, _, r in results), "every request answered"
    outage_start = start[0] + 10.0 * scale
    # Every request over by the time the outage starts lived through healthy phases and microspikes only.
    before_outage = [r for _, sent, r in results if sent + r[3] < outage_start]
    assert sum(1 for phase, _, _ in results if phase == "spike") >= 20
    assert all(r[2]["target"] == "primary" for r in before_outage), "no fallback answer in a microspike"
    outage = [r[3] for phase, _, r in results if phase == "outage"]
    upstream_calls = primary.count() + fallback.count()
    per_answer = upstream_calls / len(results)
    p50 = statistics.median(outage)
    print(f"\ntimeline: {len(results)} requests, outage p50 {p50 * 1000:.0f} ms, "
          f"{per_answer:.2f} upstream calls per answer, {fallback.count()} fallback calls")
    assert p50 < 0.1  # the issue's "outage p50 under 1 s", scaled: most of it is behind an open circuit
    assert per_answer < 1.6
