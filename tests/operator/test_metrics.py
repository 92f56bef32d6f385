"""The operator's and the webhook's own metrics, read the way Prometheus reads them: over HTTP.

The webhook process (`serve`) answers `GET /metrics` on its relay port with admission counts and the
relay's status-page polls; the reconciler counts reconciles by result. Counters are process-wide, so
each test compares before and after.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from dataclasses import replace
from typing import Any

import aiohttp
from aiohttp import web

from llmroute_operator import metrics
from llmroute_operator.kubeapi import KubeApi
from llmroute_operator.webhooks import Verdict, serve
from llmroute_sidecar.top import parse_metrics, total

from .conftest import POLICY_URL, policy_body
from .kube_emulator import KubeEmulator
from .test_handlers_kmock import apply, condition, running_operator
from .test_webhook_http import SETTINGS, a_pod, admit, api, create_ready_policy, free_port, review, until

__all__ = ["api"]  # the fixture, shared with the webhook tests


def _counts(text: str, name: str) -> dict[str, float]:
    samples = parse_metrics(text)
    return {dict(labels).get("result", ""): value for (sample, labels), value in samples.items() if sample == name}


def test_an_admission_is_counted_by_what_the_pod_got() -> None:
    assert metrics.admission_result(Verdict(True, patch=[{"op": "add", "path": "/x", "value": 1}])) == "injected"
    assert metrics.admission_result(Verdict(True)) == "skipped"
    assert metrics.admission_result(Verdict(True, warnings=("no such policy",))) == "admitted_without_sidecar"
    assert metrics.admission_result(Verdict(False, message="no")) == "refused"
    assert metrics.admission_result(None) == "error"


async def test_the_webhook_process_exports_admissions_and_relay_polls(kube: KubeEmulator, api: KubeApi) -> None:
    async def summary(request: web.Request) -> web.Response:
        return web.json_response({"page": {"id": "p"}, "status": {"indicator": "major"}, "components": []})

    page_app = web.Application()
    page_app.router.add_get("/api/v2/summary.json", summary)
    page_runner = web.AppRunner(page_app)
    await page_runner.setup()
    page_port = free_port()
    await web.TCPSite(page_runner, "127.0.0.1", page_port).start()
    page_url = f"http://127.0.0.1:{page_port}/api/v2/summary.json"
    body = policy_body()
    body["spec"]["providers"][0]["statusPage"] = {"url": page_url}
    await create_ready_policy(kube, body)

    settings = replace(SETTINGS, webhook_port=free_port(), relay_port=free_port(), relay_refresh_interval=0.2)
    webhook_url = f"http://127.0.0.1:{settings.webhook_port}"
    metrics_url = f"http://127.0.0.1:{settings.relay_port}/metrics"
    stop = asyncio.Event()
    server = asyncio.create_task(serve(settings, api, stop))
    try:
        async with aiohttp.ClientSession() as session:

            async def scrape() -> str | None:
                try:
                    async with session.get(metrics_url) as answer:
                        return await answer.text() if answer.status == 200 else None
                except aiohttp.ClientConnectionError:
                    return None

            async def page_polled() -> dict[Any, float] | None:
                text = await scrape()
                samples = parse_metrics(text or "")
                return samples if total(samples, "llmroute_relay_polls_total", url=page_url) >= 1 else None

            before = _counts(await until(scrape, what="/metrics"), "llmroute_webhook_admissions_total")
            assert "patch" in await admit(webhook_url, review(a_pod()))
            assert (await admit(webhook_url, review(a_pod("no-such-policy"))))["allowed"] is False
            assert "patch" not in await admit(webhook_url, review(a_pod(**{"llmroute.dev/inject": "false"})))
            after = _counts(await scrape() or "", "llmroute_webhook_admissions_total")
            assert {k: after[k] - before.get(k, 0) for k in after} == {
                "injected": 1, "refused": 1, "skipped": 1, "admitted_without_sidecar": 0, "error": 0,
            }

            samples = await until(page_polled, what="the relay to poll the page")
            assert total(samples, "llmroute_relay_pages") == 1
            assert total(samples, "llmroute_relay_page_usable", url=page_url) == 1
            assert total(samples, "llmroute_relay_page_level", url=page_url) == 2  # indicator "major"
            assert total(samples, "llmroute_relay_last_good_poll_age_seconds", url=page_url) < 60
    finally:
        stop.set()
        await asyncio.wait_for(server, 10)
        await page_runner.cleanup()


async def test_reconciles_are_counted_by_result(kube: KubeEmulator) -> None:
    def reconciles() -> dict[str, float]:
        return _counts(metrics.relay_exposition(None).decode(), "llmroute_operator_reconciles_total")

    before = reconciles()
    async with running_operator(kube):
        await apply(kube, POLICY_URL, policy_body())
        invalid = policy_body("typo")
        invalid["spec"]["routes"][0]["targets"][1]["provider"] = "gtp"
        await apply(kube, POLICY_URL, invalid)
        await until(_async(lambda: condition(kube, "typo", "Ready")), what="the invalid policy's status")
        await until(_async(lambda: condition(kube, "support-bot", "Ready")), what="the valid policy's status")
    after = reconciles()
    assert after["ok"] - before.get("ok", 0) >= 1
    assert after["invalid"] - before.get("invalid", 0) >= 1
    assert after["api_error"] == before.get("api_error", 0)


def test_the_operator_serves_its_metrics_on_its_own_port() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    metrics.serve_operator_metrics(port)  # a daemon thread, as in `llmroute operator`
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    assert "llmroute_operator_reconciles_total" in text
    assert "llmroute_webhook_admissions_total" in text


def _async(check: Any) -> Any:
    async def run() -> Any:
        return check()

    return run
