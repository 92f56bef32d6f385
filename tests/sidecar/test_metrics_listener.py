"""How Prometheus reaches a sidecar in a pod: the metrics-only listener, and the gauges the alerts read.

The real CLI (`llmroute sidecar`) runs with `LLMROUTE_METRICS_LISTEN`, as the injector sets it: the second
listener serves `/metrics` and nothing that reaches a provider.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml

from llmroute_sidecar.metricsport import parse_listen
from llmroute_sidecar.simulator.fakes import Fail
from llmroute_sidecar.top import parse_metrics, total

from .harness import policy_document, running_sidecar, until_ready

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])



async def test_the_metrics_listener_serves_metrics_and_never_the_proxy(fakes, tmp_path):
    primary, fallback = fakes
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy_document(primary.url, fallback.url)))
    port, metrics_port = _free_port(), _free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmroute_sidecar.cli", "sidecar", "--policy", str(path),
        "--listen", f"127.0.0.1:{port}",
        env={**os.environ, "PYTHONPATH": f"{ROOT / 'sidecar'}:{ROOT / 'operator'}",
             "LLMROUTE_METRICS_LISTEN": f"127.0.0.1:{metrics_port}"},
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        url, metrics_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}"
        async with aiohttp.ClientSession() as session:
            await until_ready(url)
            async with session.post(f"{url}/v1/routes/summarize", json={"variables": {"text": "a"}}) as r:
                assert r.status == 200
            async with session.get(f"{metrics_url}/metrics") as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                samples = parse_metrics(await r.text())
            for path_, method in (("/v1/routes/summarize", "POST"), ("/anthropic/v1/messages", "POST"),
                                  ("/openai/v1/chat/completions", "POST"), ("/status", "GET")):
                async with session.request(method, f"{metrics_url}{path_}", json={}) as r:
                    assert r.status in (404, 405), path_
        assert total(samples, "llmroute_requests_total", route="summarize", outcome="ok") == 1
        assert total(samples, "llmroute_ready") == 1
        assert total(samples, "llmroute_policy_load_failing") == 0
        assert total(samples, "process_resident_memory_bytes") > 10_000_000
        assert total(samples, "llmroute_retry_budget_available", provider="claude") >= 1
        assert len(primary.requests) == 1  # the probes of the metrics port reached no provider
    finally:
        process.terminate()
        await process.wait()


async def test_a_refused_policy_and_its_recovery_show_in_the_gauges(fakes, tmp_path):
    primary, fallback = fakes
    path = tmp_path / "policy.json"
    document = policy_document(primary.url, fallback.url)
    path.write_text(json.dumps(document))
    async with running_sidecar(policy_path=path) as (url, state), aiohttp.ClientSession() as session:

        async def gauges() -> tuple[float, float]:
            async with session.get(f"{url}/metrics") as r:
                samples = parse_metrics(await r.text())
            return total(samples, "llmroute_policy_load_failing"), total(samples, "llmroute_ready")

        assert await gauges() == (0, 1)
        path.write_text('{"spec": {"routes": [')
        await _until(lambda: state.last_error is not None)
        assert await gauges() == (1, 1)  # refused, still serving the last good policy
        path.write_text(json.dumps(document) + "\n")
        await _until(lambda: state.last_error is None)
        assert await gauges() == (0, 1)
        state.draining = True
        assert await gauges() == (0, 0)


async def test_cost_is_counted_per_route_as_well_as_per_provider(fakes):
    primary, fallback = fakes
    primary.script(*[Fail(500)] * 40)
    document = policy_document(primary.url, fallback.url)
    document["spec"]["pricing"] = {"claude-sonnet-4-5": {"input": 3.0, "output": 15.0},
                                   "gpt-4.1-mini": {"input": 0.4, "output": 1.6}}
    document["spec"]["routes"][0]["strategy"] = "failover"
    async with running_sidecar(document) as (url, state), aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/routes/summarize", json={"variables": {"text": "a"}}) as r:
            assert r.status == 200 and r.headers["llmroute-provider"] == "gpt"
        async with session.get(f"{url}/metrics") as r:
            samples = parse_metrics(await r.text())
    by_route = total(samples, "llmroute_route_cost_usd_total", route="summarize", provider="gpt")
    assert by_route > 0
    assert by_route == pytest.approx(total(samples, "llmroute_cost_usd_total", provider="gpt"))


@pytest.mark.parametrize(
    ("listen", "expected"),
    [("0.0.0.0:9787", ("0.0.0.0", 9787)), ("[::]:9787", ("::", 9787)), (":9787", ("0.0.0.0", 9787))],
)
def test_the_metrics_listen_address_is_host_and_port(listen, expected):
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["9787x", "host:", "host:70000"])
def test_a_malformed_metrics_listen_address_names_the_variable(listen):
    with pytest.raises(ValueError, match="LLMROUTE_METRICS_LISTEN"):
        parse_listen(listen)


async def _until(condition, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_taken_metrics_port_is_logged_and_the_sidecar_serves_all_the_same(fakes, tmp_path):
    primary, fallback = fakes
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy_document(primary.url, fallback.url)))
    port = _free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llmroute_sidecar.cli", "sidecar", "--policy", str(path),
            "--listen", f"127.0.0.1:{port}",
            env={**os.environ, "PYTHONPATH": f"{ROOT / 'sidecar'}:{ROOT / 'operator'}",
                 "LLMROUTE_METRICS_LISTEN": f"127.0.0.1:{taken.getsockname()[1]}"},
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession() as session:
                await until_ready(url)
                async with session.post(f"{url}/v1/routes/summarize", json={"variables": {"text": "a"}}) as r:
                    assert r.status == 200
        finally:
            process.terminate()
            _, err = await process.communicate()
    assert '"event":"metrics_listener_failed"' in err.decode()
