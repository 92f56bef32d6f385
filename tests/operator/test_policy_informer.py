"""The webhook's policy cache: one list, then a watch, against the emulated API server.

Admission answers from memory (no API call per pod), the status relay lists from memory, and a webhook
whose cache is not filled yet reports itself unready."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import kopf
import pytest_asyncio
from aiohttp import web

from llmroute_operator.informer import PolicyInformer
from llmroute_operator.kubeapi import KubeApi, KubeApiError
from llmroute_operator.webhooks import build_webhook_app

from .conftest import EVENTS, POLICIES, POLICY_URL, eventually, policy_body
from .kube_emulator import KubeEmulator
from .test_webhook_http import SETTINGS, a_pod, admit, ready_status, review, set_status


@pytest_asyncio.fixture()
async def informer(kube: KubeEmulator) -> AsyncIterator[PolicyInformer]:
    api = await KubeApi.connect(kopf.ConnectionInfo(server=str(kube.url).rstrip("/")))
    cache = PolicyInformer(api, watch_timeout=5, first_retry=0.1)
    task = asyncio.create_task(cache.run())
    try:
        yield cache
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await api.close()


def policy_reads(kube: KubeEmulator) -> int:
    """Reads of single policies the API server answered (kmock keeps every request it served)."""
    return sum(1 for r in kube._requests if r.resource == POLICIES and r.name and str(r.method).upper().endswith("GET"))


async def create(kube: KubeEmulator, body: dict[str, Any]) -> None:
    async with kube.post(POLICY_URL, json=body) as response:
        assert response.status in (200, 201), await response.text()


async def test_the_cache_follows_creates_edits_and_deletes(kube: KubeEmulator, informer: PolicyInformer) -> None:
    await create(kube, policy_body("first"))
    await asyncio.wait_for(informer.synced.wait(), 10)
    await eventually(lambda: informer._policies.get(("apps", "first")), what="the first policy")

    await create(kube, policy_body("second"))
    await eventually(lambda: informer._policies.get(("apps", "second")), what="a policy created after the list")
    headers = {"Content-Type": "application/merge-patch+json"}
    async with kube.patch(f"{POLICY_URL}/second", data=json.dumps({"spec": {"defaultRoute": None}}), headers=headers):
        pass
    await eventually(
        lambda: (
            "defaultRoute" not in (informer._policies.get(("apps", "second")) or {"spec": {"defaultRoute": 1}})["spec"]
        ),
        what="the edit",
    )
    async with kube.delete(f"{POLICY_URL}/first") as response:
        assert response.status == 200
    await eventually(lambda: ("apps", "first") not in informer._policies, what="the delete")
    assert [p["metadata"]["name"] for p in await informer.list_policies()] == ["second"]


async def test_admission_answers_from_the_cache_without_reading_the_api(
    kube: KubeEmulator, informer: PolicyInformer
) -> None:
    body = policy_body()
    await create(kube, body)
    await set_status(kube, "support-bot", ready_status(body))
    runner = web.AppRunner(build_webhook_app(SETTINGS, informer))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        await eventually(
            lambda: (informer._policies.get(("apps", "support-bot")) or {}).get("status"), what="the status"
        )
        reads = policy_reads(kube)
        for _ in range(20):  # a scale-up
            assert "patch" in await admit(url, review(a_pod()))
        assert policy_reads(kube) == reads
        await informer._api.read_policy("apps", "support-bot")  # what the webhook did per pod before
        assert policy_reads(kube) == reads + 1  # (the count does see reads)
        async with aiohttp.ClientSession() as session, session.get(url + "/readyz") as answer:
            assert answer.status == 200
    finally:
        await runner.cleanup()


async def test_an_unfilled_cache_is_unready_and_admission_fails_to_the_failure_policy(kube: KubeEmulator) -> None:
    unreachable = await KubeApi.connect(kopf.ConnectionInfo(server="http://127.0.0.1:9"))  # nothing listens
    cache = PolicyInformer(unreachable, first_retry=0.1)
    task = asyncio.create_task(cache.run())
    runner = web.AppRunner(build_webhook_app(SETTINGS, cache))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/readyz") as answer:
                assert answer.status == 503 and "cache" in await answer.text()
            async with session.post(url + "/mutate-pods", json=review(a_pod())) as answer:
                assert answer.status == 500  # the API server applies the webhook's failurePolicy
        try:
            await cache.read_policy("apps", "x")
        except KubeApiError as exc:
            assert "not been filled" in str(exc)
        else:
            raise AssertionError("an unfilled cache must not answer 'not found'")
    finally:
        await runner.cleanup()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await unreachable.close()


async def test_last_good_events_are_written_through_the_api_when_policies_come_from_the_cache(
    kube: KubeEmulator, informer: PolicyInformer
) -> None:
    """In production the policy source (the cache) cannot write: the Event goes through the API client."""
    body = policy_body()
    await create(kube, body)
    await set_status(kube, "support-bot", ready_status(body))
    headers = {"Content-Type": "application/merge-patch+json"}
    edit = json.dumps({"spec": {"routes": [{**body["spec"]["routes"][0], "budget": "9s"}]}})
    async with kube.patch(f"{POLICY_URL}/support-bot", data=edit, headers=headers) as answer:
        assert answer.status == 200
    runner = web.AppRunner(build_webhook_app(SETTINGS, informer, events=informer._api))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        await eventually(
            lambda: (
                (informer._policies.get(("apps", "support-bot")) or {})
                .get("spec", {})
                .get("routes", [{}])[0]
                .get("budget")
                == "9s"
            ),
            what="the edit in the cache",
        )
        response = await admit(url, review(a_pod()))
        assert "last good config" in response["warnings"][0]
        await eventually(
            lambda: [
                o.raw for (res, _, _), o in kube.objects.items()
                if res == EVENTS and o.raw.get("reason") == "InjectedLastGoodConfig"
            ],
            what="the Event",
        )  # fmt: skip
    finally:
        await runner.cleanup()
