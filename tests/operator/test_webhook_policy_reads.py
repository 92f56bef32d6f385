"""A slow policy read delays only the admissions that need that policy, and never past the webhook timeout.

The webhook's own API client (`connect_api`, with its production timeouts) talks to a small fake API
server whose reads of chosen policies hang or lag; admissions go through the real admission app.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import kopf
import pytest_asyncio
from aiohttp import web

from llmroute_operator.kubeapi import KubeApi
from llmroute_operator.webhooks import API_READ_TIMEOUT, build_webhook_app, connect_api

from .conftest import NAMESPACE, policy_body
from .test_webhook_http import SETTINGS, a_pod, admit, ready_status, review

WEBHOOK_TIMEOUT = 5.0
"""The API server's `timeoutSeconds` for the webhook (the chart's default)."""


@dataclass
class FakeApi:
    """Serves GET of LLMRoutePolicies; a name in `hang` never answers, one in `lag` answers late."""

    policies: dict[str, dict[str, Any]] = field(default_factory=dict)
    hang: set[str] = field(default_factory=set)
    lag: dict[str, float] = field(default_factory=dict)
    reads: collections.Counter[str] = field(default_factory=collections.Counter)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    asked: collections.defaultdict[str, asyncio.Event] = field(
        default_factory=lambda: collections.defaultdict(asyncio.Event)
    )

    def add(self, name: str) -> None:
        body = policy_body(name)
        body["status"] = ready_status(body)
        self.policies[name] = body

    async def get(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.reads[name] += 1
        self.asked[name].set()
        if name in self.hang:
            await self.release.wait()
        await asyncio.sleep(self.lag.get(name, 0))
        if name not in self.policies:
            return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)
        return web.json_response(self.policies[name])


@pytest_asyncio.fixture()
async def fake_api() -> AsyncIterator[tuple[FakeApi, KubeApi]]:
    fake = FakeApi()
    app = web.Application()
    app.router.add_get(f"/apis/llmroute.dev/v1alpha1/namespaces/{NAMESPACE}/llmroutepolicies/{{name}}", fake.get)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    client = await connect_api(kopf.ConnectionInfo(server=f"http://127.0.0.1:{port}"))
    try:
        yield fake, client
    finally:
        fake.release.set()  # hung handlers end, so the server stops at once
        await client.close()
        await runner.cleanup()


@pytest_asyncio.fixture()
async def webhook_url(fake_api: tuple[FakeApi, KubeApi]) -> AsyncIterator[str]:
    runner = web.AppRunner(build_webhook_app(replace(SETTINGS, policy_cache_ttl=60), fake_api[1]))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def post(url: str, document: dict[str, Any]) -> int:
    async with aiohttp.ClientSession() as session, session.post(f"{url}/mutate-pods", json=document) as answer:
        return answer.status


async def test_a_hung_read_of_one_policy_does_not_stall_admissions_of_a_cached_one(
    fake_api: tuple[FakeApi, KubeApi], webhook_url: str
) -> None:
    fake, _ = fake_api
    fake.add("fast")
    fake.add("stuck")
    fake.hang.add("stuck")
    assert "patch" in await admit(webhook_url, review(a_pod("fast")))  # cached from now on

    started = time.monotonic()
    stuck = asyncio.create_task(post(webhook_url, review(a_pod("stuck"))))
    await asyncio.wait_for(fake.asked["stuck"].wait(), 5)
    response = await asyncio.wait_for(admit(webhook_url, review(a_pod("fast"))), 0.5)

    assert "patch" in response and not stuck.done()
    # The stuck read gives up inside the API server's webhook timeout: our 500 lets failurePolicy decide.
    assert await asyncio.wait_for(stuck, WEBHOOK_TIMEOUT) == 500
    assert API_READ_TIMEOUT <= time.monotonic() - started < WEBHOOK_TIMEOUT
    assert fake.reads["fast"] == 1

    fake.hang.discard("stuck")  # a failed read is not cached: the next admission reads again
    assert "patch" in await admit(webhook_url, review(a_pod("stuck")))
    assert fake.reads["stuck"] == 2


async def test_a_slow_read_of_one_policy_does_not_delay_a_miss_on_another(
    fake_api: tuple[FakeApi, KubeApi], webhook_url: str
) -> None:
    fake, _ = fake_api
    fake.add("slow")
    fake.add("other")
    fake.lag["slow"] = 1.0

    slow = asyncio.create_task(admit(webhook_url, review(a_pod("slow"))))
    await asyncio.wait_for(fake.asked["slow"].wait(), 5)
    response = await asyncio.wait_for(admit(webhook_url, review(a_pod("other"))), 0.5)

    assert "patch" in response and not slow.done()
    assert "patch" in await slow


async def test_concurrent_misses_for_one_policy_share_one_read(
    fake_api: tuple[FakeApi, KubeApi], webhook_url: str
) -> None:
    """A Deployment scaled to many replicas: one API read, every pod injected."""
    fake, _ = fake_api
    fake.add("support-bot")
    fake.lag["support-bot"] = 0.3

    responses = await asyncio.gather(*(admit(webhook_url, review(a_pod())) for _ in range(8)))

    assert all("patch" in response for response in responses)
    assert fake.reads["support-bot"] == 1
