"""Shared test harness: fake providers and a real sidecar, both on loopback.

Tests build a policy pointing at `FakeProvider` servers, start the real sidecar app on an ephemeral
port (`aiohttp.test_utils.TestServer`, a real TCP listener), and talk to it over HTTP. `cli_sidecar`
runs the real CLI (`llmroute sidecar --policy FILE`) as a subprocess instead, with its log lines.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry import trace

from llmroute_sidecar.policy import load_policy
from llmroute_sidecar.server import STATE, SidecarState, create_app

ROOT = Path(__file__).resolve().parents[2]


def policy_document(
    primary_url: str,
    fallback_url: str,
    *,
    primary_type: str = "anthropic",
    fallback_type: str = "openai",
    route: dict[str, Any] | None = None,
    spec: dict[str, Any] | None = None,
    primary_status_page: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A two-target policy with short budgets (tests must be fast); `route`/`spec` override fields."""
    primary: dict[str, Any] = {
        "name": "claude",
        "type": primary_type,
        "baseURL": _base(primary_url, primary_type),
    }
    if primary_status_page is not None:
        primary["statusPage"] = primary_status_page
    document: dict[str, Any] = {
        "apiVersion": "llmroute.dev/v1alpha1",
        "kind": "LLMRoutePolicy",
        "metadata": {"name": "test-policy", "generation": 1},
        "spec": {
            "providers": [
                primary,
                {"name": "gpt", "type": fallback_type, "baseURL": _base(fallback_url, fallback_type)},
            ],
            "defaultRoute": "summarize",
            "routes": [
                {
                    "name": "summarize",
                    "budget": "1s",
                    "backoff": {"initial": "20ms", "max": "100ms"},
                    "attemptTimeout": "2s",
                    "targets": [
                        {
                            "name": "primary",
                            "provider": "claude",
                            "model": "claude-sonnet-4-5",
                            "params": {"max_tokens": 256},
                            "prompt": {
                                "system": "You summarize support tickets.",
                                "template": "Summarize:\n{{ text }}",
                            },
                        },
                        {
                            "name": "backup",
                            "provider": "gpt",
                            "model": "gpt-4.1-mini",
                            "degraded": True,
                            "prompt": {
                                "system": "Summarize the ticket in 3 bullet points.",
                                "template": "{{ text }}",
                            },
                        },
                    ],
                    "degradedNotice": "We're temporarily using a backup model.",
                }
            ],
            "retryBudget": {"ratio": 0.2, "minPerSecond": 100, "window": "10s"},
        },
    }
    if route:
        document["spec"]["routes"][0].update(copy.deepcopy(route))
    if spec:
        document["spec"].update(copy.deepcopy(spec))
    return document


def _base(url: str, kind: str) -> str:
    return url + "/v1" if kind == "openai" else url


@asynccontextmanager
async def running_sidecar(
    document: dict[str, Any] | None = None,
    *,
    policy_path: Any = None,
    tracer_provider: trace.TracerProvider | None = None,
    status_relay: str | None = None,
    watch_interval: float = 0.05,
    statuspage_min_interval: float | None = 0.01,
    **options: Any,
) -> AsyncIterator[tuple[str, SidecarState]]:
    """Start the real sidecar on loopback; yields (base URL, its state). `statuspage_min_interval`
    lowers the pollers' 10 s floor (None keeps it); `options` go to `create_app` (short timeouts, caps)."""
    policy = load_policy(document) if document is not None else None
    app: web.Application = create_app(
        policy_path=policy_path,
        policy=policy,
        tracer_provider=tracer_provider,
        status_relay=status_relay,
        watch_interval=watch_interval,
        statuspage_min_interval=statuspage_min_interval,
        **options,
    )
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()  # TestServer already enables handler cancellation
    try:
        yield str(server.make_url("")).rstrip("/"), app[STATE]
    finally:
        await server.close()


class CliSidecar:
    """`llmroute sidecar --policy FILE` running as a subprocess (`cli_sidecar`): its URL, its log lines
    (stderr) and its standard output (where `OTEL_TRACES_EXPORTER=console` prints spans), collected as the
    process writes them."""

    def __init__(self, process: asyncio.subprocess.Process, url: str) -> None:
        self.process = process
        self.url = url
        self.logs: list[str] = []
        self.stdout: list[str] = []
        self._changed = asyncio.Event()

    async def _collect(self, stream: asyncio.StreamReader | None, into: list[str]) -> None:
        assert stream is not None
        while line := await stream.readline():
            into.append(line.decode("utf-8", "replace").rstrip("\n"))
            self._changed.set()

    def events(self, name: str) -> list[dict[str, Any]]:
        """The JSON log lines whose `event` is `name`."""
        found = []
        for line in self.logs:
            if line.startswith("{"):
                record = json.loads(line)
                if record.get("event") == name:
                    found.append(record)
        return found

    async def wait_for_log(self, predicate: Callable[[list[str]], bool], timeout: float = 10.0) -> None:
        """Until `predicate(logs)` holds (TimeoutError after `timeout` seconds)."""
        await self.wait_for(lambda: predicate(self.logs), timeout)

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        """Until `condition()`, checked whenever the process writes (TimeoutError after `timeout` seconds)."""
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()


@asynccontextmanager
async def cli_sidecar(
    policy_path: Path, env: Mapping[str, str] | None = None, *, ready: bool = True
) -> AsyncIterator[CliSidecar]:
    """The real CLI on a free loopback port with `env` added to the environment; waits until it answers
    `/readyz` with 200 (`ready=False`: until it answers at all), and stops it with SIGTERM."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmroute_sidecar.cli", "sidecar", "--policy", str(policy_path),
        "--listen", f"127.0.0.1:{port}", "--drain-timeout", "2",
        env={**os.environ, "PYTHONPATH": f"{ROOT / 'sidecar'}:{ROOT / 'operator'}", **(env or {})},
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    sidecar = CliSidecar(process, f"http://127.0.0.1:{port}")
    collectors = [
        asyncio.create_task(sidecar._collect(process.stderr, sidecar.logs)),
        asyncio.create_task(sidecar._collect(process.stdout, sidecar.stdout)),
    ]
    try:
        async with aiohttp.ClientSession() as session, asyncio.timeout(30):
            while True:
                assert process.returncode is None, "\n".join(sidecar.logs)
                try:
                    async with session.get(f"{sidecar.url}/readyz") as response:
                        if response.status == 200 or not ready:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        yield sidecar
    finally:
        if process.returncode is None:
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()
        await asyncio.gather(*collectors)


async def until_ready(url: str, process: asyncio.subprocess.Process | None = None, timeout: float = 20.0) -> None:
    """Wait (bounded) for a sidecar at `url` to answer `/readyz` with 200; fail at once if `process` exits."""
    deadline = asyncio.get_running_loop().time() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            assert process is None or process.returncode is None, "the sidecar exited"
            try:
                async with session.get(f"{url}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert asyncio.get_running_loop().time() < deadline, "the sidecar did not become ready"
            await asyncio.sleep(0.05)
