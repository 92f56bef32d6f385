"""`llmroute top`: the terminal view of a running sidecar, read from its real `/status` and `/metrics`."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import httpx
import pytest

from llmroute_sidecar.simulator.fakes import Fail
from llmroute_sidecar.top import Read, build_view, parse_metrics, render

from .harness import policy_document, running_sidecar

ROOT = Path(__file__).resolve().parents[2]


async def _read(client: httpx.AsyncClient, url: str) -> Read:
    status = (await client.get(f"{url}/status")).json()
    metrics = parse_metrics((await client.get(f"{url}/metrics")).text)
    return Read(status, metrics, asyncio.get_running_loop().time())


async def test_the_view_shows_routes_circuits_budgets_and_the_fallback_share_with_rates(fakes):
    primary, fallback = fakes
    document = policy_document(primary.url, fallback.url, route={"strategy": "failover"},
                               spec={"circuitBreaker": {"openAfter": "300ms", "minFailures": 2}})
    async with running_sidecar(document) as (url, state), httpx.AsyncClient() as client:
        for _ in range(2):
            assert (await client.post(f"{url}/v1/routes/summarize", json={"variables": {"text": "a"}})).status_code == 200
        first = await _read(client, url)
        primary.script(*[Fail(500)] * 200)
        deadline = asyncio.get_running_loop().time() + 10
        sent = 0
        while True:  # failing for longer than openAfter (failures less than openAfter apart) opens the circuit
            await asyncio.sleep(0.02)
            response = await client.post(f"{url}/v1/routes/summarize", json={"variables": {"text": "a"}})
            assert response.headers["llmroute-target"] == "backup"
            sent += 1
            second = await _read(client, url)
            if sent >= 4 and second.status["routes"]["summarize"]["targets"]["primary"]["state"] == "open":
                break
            assert asyncio.get_running_loop().time() < deadline, "the circuit never opened"

    view = build_view(first)
    [route] = view.routes
    assert (route.name, route.strategy, route.answered, route.per_second) == ("summarize", "failover", 2, None)
    assert route.recent_fallback == 0 and route.calls_per_answer == 1.0

    view = build_view(second, first)
    [route] = view.routes
    assert route.answered == 2 + sent and route.per_second is not None and route.per_second > 0
    assert route.recent_fallback == pytest.approx(sent / (2 + sent), abs=0.01)
    assert set(route.sheds) <= {"primary-error", "circuit-open"} and sum(route.sheds.values()) > 0
    states = {(t.route, t.target): t.state for t in view.targets}
    assert states == {("summarize", "primary"): "open", ("summarize", "backup"): "closed"}
    assert {p.name for p in view.providers} == {"claude", "gpt"}
    assert all(p.retries_available is not None and p.retries_available > 0 for p in view.providers)
    assert view.ready and view.policy == "test-policy"

    from rich.console import Console

    console = Console(width=140, record=True, color_system=None)
    console.print(render(view, url))
    text = console.export_text()
    share = f"{sent / (2 + sent):.0%}"
    for expected in ("summarize", "failover", "primary", "open", "backup", "closed", "claude", "gpt", share):
        assert expected in text, expected


async def test_llmroute_top_once_prints_a_frame_of_a_running_sidecar(fakes):
    primary, fallback = fakes
    async with running_sidecar(policy_document(primary.url, fallback.url)) as (url, state):
        async with httpx.AsyncClient() as client:
            await client.post(f"{url}/v1/routes/summarize", json={"variables": {"text": "a"}})
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llmroute_sidecar.cli", "top", "--once", "--interval", "0.2", "--url", url,
            env={**os.environ, "PYTHONPATH": f"{ROOT / 'sidecar'}:{ROOT / 'operator'}", "COLUMNS": "140"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    text = out.decode()
    for expected in ("llmroute top", "test-policy", "ready", "summarize", "primary", "backup", "closed", "claude"):
        assert expected in text, expected


async def test_llmroute_top_says_when_it_cannot_reach_the_sidecar():
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmroute_sidecar.cli", "top", "--once", "--url", "http://127.0.0.1:9",
        env={**os.environ, "PYTHONPATH": f"{ROOT / 'sidecar'}:{ROOT / 'operator'}"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1
    assert "cannot read http://127.0.0.1:9" in err.decode()
