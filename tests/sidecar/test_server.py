"""The sidecar's HTTP surface: bad input, probes, status, metrics, hot reload and draining."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import yaml

from llmroute_sidecar.simulator.fakes import Fail, Reply

from .harness import policy_document, running_sidecar, until_ready

ROOT = Path(__file__).resolve().parents[2]



async def test_malformed_json_is_a_400_never_forwarded(fakes):
    primary, fallback = fakes
    async with running_sidecar(policy_document(primary.url, fallback.url)) as (url, _):
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/v1/routes/summarize", data=b"{not json") as response:
                assert response.status == 400
                assert response.headers["x-should-retry"] == "false"
                assert "not valid JSON" in (await response.json())["error"]["message"]
            async with session.post(f"{url}/anthropic/v1/messages", data=b"[1,") as response:
                body = await response.json()
                assert response.status == 400
                assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
            async with session.post(f"{url}/v1/routes/nope", json={"variables": {}}) as response:
                assert response.status == 404
    assert primary.count() == 0 and fallback.count() == 0


async def test_oversized_body_is_a_413_in_the_callers_shape(fakes):
    primary, fallback = fakes
    async with running_sidecar(policy_document(primary.url, fallback.url)) as (url, _):
        async with aiohttp.ClientSession() as session:
            big = b'{"x": "' + b"a" * (33 * 1024 * 1024) + b'"}'
            async with session.post(f"{url}/openai/v1/chat/completions", data=big) as response:
                assert response.status == 413
                assert "error" in await response.json()
    assert primary.count() == 0


async def test_probes_status_and_metrics(fakes):
    primary, fallback = fakes
    primary.script(Fail(529))
    async with running_sidecar(policy_document(primary.url, fallback.url)) as (url, _):
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/v1/routes/summarize", json={"variables": {"text": "a"}}) as r:
                assert r.status == 200
            async with session.get(f"{url}/healthz") as r:
                assert r.status == 200
            async with session.get(f"{url}/readyz") as r:
                assert r.status == 200
            async with session.get(f"{url}/status") as r:
                status = await r.json()
            async with session.get(f"{url}/metrics") as r:
                metrics = await r.text()
    assert status["policy"] == "test-policy" and status["generation"] == 1 and status["configHash"]
    assert status["routes"]["summarize"]["targets"]["primary"]["state"] == "closed"
    assert "claude" in status["retryBudgets"]
    assert 'llmroute_requests_total{degraded="false",outcome="ok",route="summarize",target="primary"} 1.0' in metrics
    assert 'llmroute_attempts_total{provider="claude",result="http_529",route="summarize",target="primary"} 1.0' in metrics
    assert 'llmroute_tokens_total{kind="output",model="claude-sonnet-4-5",provider="claude"}' in metrics


async def test_hot_reload_applies_a_valid_policy_and_refuses_a_broken_one(fakes, tmp_path):
    primary, fallback = fakes
    # A ConfigMap volume: the file is a symlink through `..data`, swapped atomically by the kubelet.
    document = policy_document(primary.url, fallback.url)
    first = tmp_path / "..2026_01"
    first.mkdir()
    (first / "policy.json").write_text(json.dumps(document))
    (tmp_path / "..data").symlink_to(first.name)
    (tmp_path / "policy.json").symlink_to("..data/policy.json")

    def swap(name: str, text: str) -> None:
        directory = tmp_path / name
        directory.mkdir()
        (directory / "policy.json").write_text(text)
        (tmp_path / "..data_tmp").symlink_to(name)
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")

    async with running_sidecar(policy_path=tmp_path / "policy.json") as (url, state):
        assert state.runtime is not None
        old_hash = state.runtime.policy.config_hash
        document["spec"]["routes"][0]["name"] = "renamed"
        document["spec"]["defaultRoute"] = "renamed"
        swap("..2026_02", json.dumps(document))
        await _until(lambda: state.runtime is not None and "renamed" in state.runtime.routes)
        assert state.runtime.policy.config_hash != old_hash
        good_hash = state.runtime.policy.config_hash
        swap("..2026_03", '{"spec": {"providers": [], "routes": [')  # half-written
        await _until(lambda: state.last_error is not None)
        assert state.runtime.policy.config_hash == good_hash
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/status") as r:
                status = await r.json()
            async with session.post(f"{url}/v1/routes/renamed", json={"variables": {"text": "a"}}) as r:
                assert r.status == 200
        assert "not valid YAML/JSON" in status["error"] and status["ready"] is True


async def test_a_request_in_flight_keeps_its_policy_snapshot_across_a_reload(fakes, tmp_path):
    primary, fallback = fakes
    primary.script(Reply(delay=0.5))
    path = tmp_path / "policy.yaml"
    document = policy_document(primary.url, fallback.url)
    path.write_text(yaml.safe_dump(document))
    async with running_sidecar(policy_path=path) as (url, state):
        async with aiohttp.ClientSession() as session:
            pending = asyncio.ensure_future(
                session.post(f"{url}/v1/routes/summarize", json={"variables": {"text": "a"}})
            )
            await primary.wait_for_requests(1)
            document["spec"]["routes"][0]["targets"][0]["model"] = "claude-haiku-4-5"
            path.write_text(yaml.safe_dump(document))
            await _until(lambda: state.runtime.routes["summarize"].targets[0].spec.model == "claude-haiku-4-5")
            response = await pending
            assert response.status == 200
            assert (await response.json())["model"] == "claude-sonnet-4-5"


async def test_sigterm_drains_an_in_flight_request(fakes, tmp_path):
    primary, fallback = fakes
    primary.script(Reply(delay=1.0))
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy_document(primary.url, fallback.url)))
    port = _free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmroute_sidecar.cli", "sidecar", "--policy", str(path),
        "--listen", f"127.0.0.1:{port}", "--drain-timeout", "10",
        env={**os.environ, "PYTHONPATH": f"{ROOT / 'sidecar'}:{ROOT / 'operator'}"},
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            await until_ready(url)
            pending = asyncio.ensure_future(
                session.post(f"{url}/v1/routes/summarize", json={"variables": {"text": "a"}})
            )
            await primary.wait_for_requests(1, timeout=5)
            process.send_signal(signal.SIGTERM)
            response = await asyncio.wait_for(pending, 10)
            assert response.status == 200
            assert (await response.json())["target"] == "primary"
        assert await asyncio.wait_for(process.wait(), 15) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_client_dribbling_its_headers_is_cut_off_by_the_idle_timeout(fakes, tmp_path):
    """HOSTILE D5 (slowloris): the real CLI with LLMROUTE_IDLE_TIMEOUT=1; partial headers never reset it."""
    primary, fallback = fakes
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy_document(primary.url, fallback.url)))
    port = _free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmroute_sidecar.cli", "sidecar", "--policy", str(path),
        "--listen", f"127.0.0.1:{port}",
        env={**os.environ, "PYTHONPATH": f"{ROOT / 'sidecar'}:{ROOT / 'operator'}", "LLMROUTE_IDLE_TIMEOUT": "1"},
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            await until_ready(url)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/routes/summarize HTTP/1.1\r\nHost: x\r\n")
        started = asyncio.get_running_loop().time()
        closed = False
        for index in range(100):  # a header byte every 50 ms, for up to 5 s
            writer.write(b"X-Slow-%d: y\r\n" % index)
            try:
                await writer.drain()
                data = await asyncio.wait_for(reader.read(1024), 0.05)
            except TimeoutError:
                continue
            except ConnectionError:
                data = b""
            if data == b"":
                closed = True
                break
        elapsed = asyncio.get_running_loop().time() - started
        writer.close()
        assert closed, "the dribbling connection was never closed"
        assert elapsed < 3.0
        async with aiohttp.ClientSession() as session, session.get(f"{url}/healthz") as response:
            assert response.status == 200  # everyone else is served as usual
    finally:
        process.terminate()
        await process.wait()


async def _until(condition, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)



def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
