"""The admission server as a real HTTP server on loopback, fed real AdmissionReview JSON.

Policies are read from the emulated API server through the same client the webhook uses in a
cluster; the returned JSONPatch is applied to the pod and the test looks at the resulting pod.
A policy is injected only once the operator has reconciled it: `create_ready_policy` writes the
status the reconciler would (`reconcile.build_status`), through the status subresource.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import json
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import aiohttp
import jsonpatch
import kopf
import pytest
import pytest_asyncio
from aiohttp import web

from llmroute_operator.kubeapi import KubeApi
from llmroute_operator.reconcile import build_status, configmap_name, load_cluster_policy
from llmroute_operator.settings import Settings
from llmroute_operator.webhooks import build_webhook_app, serve

from .conftest import EVENTS, NAMESPACE, POLICY_URL, eventually, policy_body
from .kube_emulator import KubeEmulator

SETTINGS = Settings(sidecar_image="registry.example/llmroute:1.2.3", webhook_tls_dir="/nonexistent", shutdown_delay=0)


def review(pod: dict[str, Any], *, namespace: str = NAMESPACE, operation: str = "CREATE") -> dict[str, Any]:
    """An AdmissionReview as the API server sends it for a pod created by a ReplicaSet."""
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def a_pod(policy: str = "support-bot", **annotations: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "support-bot-5c7d-",
            "namespace": NAMESPACE,
            "annotations": {"llmroute.dev/policy": policy, **annotations},
        },
        "spec": {"containers": [{"name": "app", "image": "app:1"}]},
    }


@pytest_asyncio.fixture()
async def api(kube: KubeEmulator) -> AsyncIterator[KubeApi]:
    client = await KubeApi.connect(kopf.ConnectionInfo(server=str(kube.url)))
    try:
        yield client
    finally:
        await client.close()


@pytest_asyncio.fixture()
async def webhook(api: KubeApi) -> AsyncIterator[Any]:
    """Start the admission app for given settings; yields a starter returning its base URL."""
    runners: list[web.AppRunner] = []

    async def start(settings: Settings = SETTINGS) -> str:
        runner = web.AppRunner(build_webhook_app(settings, api))
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def admit(base_url: str, document: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.post(f"{base_url}/mutate-pods", json=document) as answer:
        assert answer.status == 200, await answer.text()
        reply: dict[str, Any] = await answer.json()
    assert reply["apiVersion"] == "admission.k8s.io/v1" and reply["kind"] == "AdmissionReview"
    assert reply["response"]["uid"] == document["request"]["uid"]
    return reply["response"]


def applied(pod: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    """The pod as the API server would store it after this admission response."""
    assert response["allowed"] is True
    if "patch" not in response:
        return pod
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    result: dict[str, Any] = jsonpatch.apply_patch(pod, patch, in_place=False)
    return result


async def create_policy(kube: KubeEmulator, body: dict[str, Any]) -> None:
    """Create the policy as a user would: no status (the operator has not seen it yet)."""
    async with kube.post(POLICY_URL, json=body) as response:
        assert response.status in (200, 201), await response.text()


def ready_status(body: dict[str, Any]) -> dict[str, Any]:
    """The status the reconciler writes once the policy's ConfigMap holds it: Ready=True, its configHash."""
    name = body["metadata"]["name"]
    now = datetime.datetime.now(datetime.UTC)
    status = build_status(None, policy=load_cluster_policy(body), generation=1, now=now, configmap=configmap_name(name))
    assert status["configHash"] and status["conditions"][0]["status"] == "True"
    return status


async def set_status(kube: KubeEmulator, name: str, status: dict[str, Any]) -> None:
    headers = {"Content-Type": "application/merge-patch+json"}
    body = json.dumps({"status": status})
    async with kube.patch(f"{POLICY_URL}/{name}/status", data=body, headers=headers) as response:
        assert response.status == 200, await response.text()


async def create_ready_policy(kube: KubeEmulator, body: dict[str, Any]) -> None:
    """Create the policy and give it the status of a reconciled one."""
    await create_policy(kube, body)
    await set_status(kube, body["metadata"]["name"], ready_status(body))


async def test_an_annotated_pod_comes_back_with_the_sidecar(kube: KubeEmulator, webhook: Any) -> None:
    await create_ready_policy(kube, policy_body())
    url = await webhook()
    pod = a_pod()

    result = applied(pod, await admit(url, review(pod)))

    [sidecar] = result["spec"]["initContainers"]
    assert sidecar["name"] == "llmroute" and sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == "registry.example/llmroute:1.2.3"
    assert {v["name"]: v for v in result["spec"]["volumes"]}["llmroute-policy"]["configMap"] == {
        "name": "support-bot-llmroute"
    }
    app_env = {e["name"]: e["value"] for e in result["spec"]["containers"][0]["env"]}
    assert app_env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:8787/anthropic"
    assert result["metadata"]["annotations"]["llmroute.dev/injected"].startswith("support-bot@")


async def test_readmitting_an_injected_pod_changes_nothing(kube: KubeEmulator, webhook: Any) -> None:
    await create_ready_policy(kube, policy_body())
    url = await webhook()
    once = applied(a_pod(), await admit(url, review(a_pod())))

    response = await admit(url, review(once))

    assert response["allowed"] is True and "patch" not in response
    assert applied(once, response) == once


async def test_an_opted_out_pod_is_admitted_untouched(kube: KubeEmulator, webhook: Any) -> None:
    await create_ready_policy(kube, policy_body())
    url = await webhook()
    pod = a_pod(**{"llmroute.dev/inject": "false"})

    response = await admit(url, review(pod))

    assert response["allowed"] is True and "patch" not in response


async def test_a_pod_without_the_annotation_is_not_looked_at(webhook: Any) -> None:
    url = await webhook()
    pod = {"metadata": {"name": "plain"}, "spec": {"containers": [{"name": "app", "image": "app:1"}]}}

    response = await admit(url, review(pod))

    assert response == {"uid": response["uid"], "allowed": True}


async def test_an_unknown_policy_is_refused_with_a_clear_message(webhook: Any) -> None:
    url = await webhook()

    response = await admit(url, review(a_pod("nope")))

    assert response["allowed"] is False
    assert response["status"]["message"] == 'llmroute: LLMRoutePolicy "nope" not found in namespace "apps"'
    assert "patch" not in response


async def test_an_unknown_policy_is_admitted_uninjected_when_the_chart_allows_it(webhook: Any) -> None:
    url = await webhook(replace(SETTINGS, unknown_policy="allow"))

    response = await admit(url, review(a_pod("nope")))

    assert response["allowed"] is True and "patch" not in response
    assert "without the llmroute sidecar" in response["warnings"][0]


async def test_an_invalid_policy_is_refused_with_its_field_path(kube: KubeEmulator, webhook: Any) -> None:
    body = policy_body("broken")
    body["spec"]["routes"][0]["targets"][0]["provider"] = "nope"
    await create_policy(kube, body)
    url = await webhook()

    response = await admit(url, review(a_pod("broken")))

    assert response["allowed"] is False
    assert 'spec.routes[0].targets[0].provider: unknown provider "nope"' in response["status"]["message"]


NO_CACHE = replace(SETTINGS, policy_cache_ttl=0)
"""Every admission reads the policy again, so a status change shows at once."""


async def test_a_policy_the_operator_has_not_reconciled_yet_is_not_injected(kube: KubeEmulator, webhook: Any) -> None:
    """Injected now, the pod would wait on a ConfigMap that does not exist yet."""
    await create_policy(kube, policy_body())
    url = await webhook(NO_CACHE)

    response = await admit(url, review(a_pod()))

    assert response["allowed"] is False and "patch" not in response
    assert response["status"]["message"] == (
        'llmroute: LLMRoutePolicy "apps/support-bot" is not Ready: the operator has not reconciled it yet'
    )
    await set_status(kube, "support-bot", ready_status(policy_body()))
    assert "patch" in await admit(url, review(a_pod()))


async def test_a_policy_that_is_not_ready_is_refused_with_its_ready_message(kube: KubeEmulator, webhook: Any) -> None:
    body = policy_body()
    await create_policy(kube, body)
    conflict = "ConfigMap support-bot-llmroute exists and is not managed by llmroute; rename or delete it"
    now = datetime.datetime.now(datetime.UTC)
    status = build_status(
        None, policy=load_cluster_policy(body), generation=1, now=now, configmap="support-bot-llmroute",
        configmap_error=conflict,
    )  # fmt: skip
    await set_status(kube, "support-bot", status)
    url = await webhook(NO_CACHE)

    response = await admit(url, review(a_pod()))

    assert response["allowed"] is False and "patch" not in response
    assert response["status"]["message"] == f'llmroute: LLMRoutePolicy "apps/support-bot" is not Ready: {conflict}'


async def test_a_not_ready_policy_admits_uninjected_when_the_chart_allows_it(kube: KubeEmulator, webhook: Any) -> None:
    await create_policy(kube, policy_body())
    url = await webhook(replace(NO_CACHE, unknown_policy="allow"))

    response = await admit(url, review(a_pod()))

    assert response["allowed"] is True and "patch" not in response
    assert response["warnings"] == [
        'llmroute: LLMRoutePolicy "apps/support-bot" is not Ready: the operator has not reconciled it yet; '
        "the pod is admitted without the llmroute sidecar"
    ]


async def patch_spec(kube: KubeEmulator, name: str, spec: dict[str, Any]) -> None:
    headers = {"Content-Type": "application/merge-patch+json"}
    async with kube.patch(f"{POLICY_URL}/{name}", data=json.dumps({"spec": spec}), headers=headers) as answer:
        assert answer.status == 200, await answer.text()


def lag_events(kube: KubeEmulator, name: str) -> list[dict[str, Any]]:
    return [
        obj.raw
        for (res, _, _), obj in kube.objects.items()
        if res == EVENTS and not obj.deleted and obj.raw.get("involvedObject", {}).get("name") == name
        and obj.raw.get("reason") == "InjectedLastGoodConfig"
    ]  # fmt: skip


async def test_an_edited_policy_not_yet_rendered_injects_the_last_good_config(kube: KubeEmulator, webhook: Any) -> None:
    """Between the edit and the reconcile (or while the operator is down) the ConfigMap holds the previous
    spec: new pods get that one, say so, and get the edit once the ConfigMap holds it."""
    old = policy_body()
    await create_ready_policy(kube, old)
    edited = policy_body()
    edited["spec"]["routes"][0]["budget"] = "9s"
    edited["spec"]["providers"][1]["apiKey"]["secretKeyRef"] = {"name": "other-keys", "key": "openai"}
    await patch_spec(
        kube, "support-bot", {"routes": edited["spec"]["routes"], "providers": edited["spec"]["providers"]}
    )
    url = await webhook(NO_CACHE)
    old_hash, new_hash = (load_cluster_policy(body).config_hash for body in (old, edited))

    response = await admit(url, review(a_pod()))
    pod = applied(a_pod(), response)

    annotations = pod["metadata"]["annotations"]
    assert annotations["llmroute.dev/injected"] == f"support-bot@{old_hash}"
    assert annotations["llmroute.dev/last-good-config"] == (
        f"configHash {old_hash}, because the policy is not Ready: its ConfigMap holds configHash {old_hash}, "
        f"the current spec has {new_hash} (the operator has not caught up yet)"
    )
    sidecar = pod["spec"]["initContainers"][0]
    keys = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in sidecar["env"] if "valueFrom" in e}
    assert keys == {"LLMROUTE_KEY_CLAUDE": "llm-keys", "LLMROUTE_KEY_GPT": "llm-keys"}  # the old spec's keys
    assert "last good config" in response["warnings"][0]
    found = await eventually(lambda: lag_events(kube, "support-bot"), what="the InjectedLastGoodConfig Event")
    assert found[0]["type"] == "Warning" and old_hash in found[0]["message"]
    assert found[0]["involvedObject"]["kind"] == "LLMRoutePolicy"

    for _ in range(3):  # a scale-up: one Event, not one per pod
        assert "patch" in await admit(url, review(a_pod()))
    await asyncio.sleep(0)
    assert len(lag_events(kube, "support-bot")) == 1

    await set_status(kube, "support-bot", ready_status(edited))
    result = applied(a_pod(), await admit(url, review(a_pod())))
    assert result["metadata"]["annotations"]["llmroute.dev/injected"] == f"support-bot@{new_hash}"
    assert "llmroute.dev/last-good-config" not in result["metadata"]["annotations"]


async def test_an_edit_the_operator_refuses_keeps_injecting_the_last_good_config(
    kube: KubeEmulator, webhook: Any
) -> None:
    """`apiKey.env` passes the CRD but not the operator: scale-ups and drains keep working."""
    old = policy_body()
    await create_ready_policy(kube, old)
    providers = copy.deepcopy(old["spec"]["providers"])
    providers[0]["apiKey"] = {"env": "ANTHROPIC_API_KEY"}
    await patch_spec(kube, "support-bot", {"providers": providers})
    url = await webhook(NO_CACHE)

    pod = applied(a_pod(), await admit(url, review(a_pod())))

    assert (
        pod["metadata"]["annotations"]["llmroute.dev/injected"] == f"support-bot@{load_cluster_policy(old).config_hash}"
    )
    assert "in a cluster keys come from secretKeyRef" in pod["metadata"]["annotations"]["llmroute.dev/last-good-config"]
    assert [v["configMap"]["name"] for v in pod["spec"]["volumes"] if "configMap" in v] == ["support-bot-llmroute"]


async def test_a_policy_that_was_never_good_is_refused_by_default(kube: KubeEmulator, webhook: Any) -> None:
    body = policy_body()
    body["spec"]["providers"][0]["apiKey"] = {"env": "X"}
    await create_policy(kube, body)
    url = await webhook(NO_CACHE)

    response = await admit(url, review(a_pod()))

    assert response["allowed"] is False
    assert response["status"]["message"].startswith('llmroute: LLMRoutePolicy "apps/support-bot" is invalid: ')
    assert lag_events(kube, "support-bot") == []


def a_pod_with_a_keys_volume() -> dict[str, Any]:
    """An app that happens to use the name of the sidecar's keys volume for its own."""
    pod = a_pod()
    pod["spec"]["volumes"] = [{"name": "llmroute-keys", "emptyDir": {}}]
    pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "llmroute-keys", "mountPath": "/keys"}]
    return pod


async def test_a_pod_using_a_sidecar_volume_name_is_refused(kube: KubeEmulator, webhook: Any) -> None:
    """Replacing the app's volume with ours would mount the provider keys into the app container."""
    await create_ready_policy(kube, policy_body())
    url = await webhook()

    response = await admit(url, review(a_pod_with_a_keys_volume()))

    assert response["allowed"] is False and "patch" not in response
    assert response["status"]["message"] == (
        'llmroute: cannot add the sidecar of LLMRoutePolicy "apps/support-bot": the pod already has a volume '
        'named "llmroute-keys"; container "app" mounts a volume named "llmroute-keys" (names reserved for the sidecar)'
    )


async def test_a_pod_using_a_sidecar_volume_name_is_admitted_uninjected_when_the_chart_allows_it(
    kube: KubeEmulator, webhook: Any
) -> None:
    await create_ready_policy(kube, policy_body())
    url = await webhook(replace(SETTINGS, unknown_policy="allow"))
    pod = a_pod_with_a_keys_volume()

    response = await admit(url, review(pod))

    assert applied(pod, response) == pod
    assert "names reserved for the sidecar" in response["warnings"][0]


async def test_other_operations_and_system_namespaces_pass_through(kube: KubeEmulator, webhook: Any) -> None:
    url = await webhook()

    assert (await admit(url, review(a_pod("nope"), operation="UPDATE")))["allowed"] is True
    assert (await admit(url, review(a_pod("nope"), namespace="kube-system")))["allowed"] is True


async def test_a_malformed_review_is_a_client_error(webhook: Any) -> None:
    url = await webhook()
    async with aiohttp.ClientSession() as session, session.post(f"{url}/mutate-pods", data=b"{nope") as answer:
        assert answer.status == 400


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_the_webhook_process_serves_admission_health_and_the_status_relay(
    kube: KubeEmulator, api: KubeApi
) -> None:
    pytest.importorskip("llmroute_sidecar.statusrelay")
    polls = 0

    async def summary(request: web.Request) -> web.Response:
        nonlocal polls
        polls += 1
        return web.json_response({"page": {"id": "p"}, "status": {"indicator": "none"}, "components": []})

    page_app = web.Application()
    page_app.router.add_get("/api/v2/summary.json", summary)
    page_runner = web.AppRunner(page_app)
    await page_runner.setup()
    page_port = free_port()
    await web.TCPSite(page_runner, "127.0.0.1", page_port).start()
    body = policy_body()
    body["spec"]["providers"][0]["statusPage"] = {"url": f"http://127.0.0.1:{page_port}/api/v2/summary.json"}
    await create_ready_policy(kube, body)
    broken = policy_body("broken")
    broken["spec"]["routes"][0]["targets"][0]["provider"] = "nope"
    await create_policy(kube, broken)  # skipped by the relay, not fatal

    settings = replace(SETTINGS, webhook_port=free_port(), relay_port=free_port(), relay_refresh_interval=0.2)
    webhook_url = f"http://127.0.0.1:{settings.webhook_port}"
    relay_url = f"http://127.0.0.1:{settings.relay_port}/v1/statuspages"
    stop = asyncio.Event()
    server = asyncio.create_task(serve(settings, api, stop))
    try:
        async with aiohttp.ClientSession() as session:

            async def get(url: str) -> Any:
                """The JSON (or text) of a 200 answer, None otherwise (not listening yet included)."""
                try:
                    async with session.get(url) as answer:
                        if answer.status != 200:
                            return None
                        return await answer.json() if answer.content_type == "application/json" else True
                except aiohttp.ClientConnectionError:
                    return None

            async def polled_relay() -> Any:
                document = await get(relay_url)
                pages = (document or {}).get("pages") or {}
                return document if pages and all(p["seq"] >= 1 for p in pages.values()) else None

            assert await until(lambda: get(webhook_url + "/healthz"), what="/healthz")
            assert await get(webhook_url + "/readyz")
            document = await until(polled_relay, what="the relay to report the polled page")
            [page] = document["pages"].values()  # one page: the invalid policy was skipped
            assert page["url"].endswith("/api/v2/summary.json") and page["state"] is not None
            assert "patch" in await admit(webhook_url, review(a_pod()))
    finally:
        stop.set()
        await asyncio.wait_for(server, 10)
        await page_runner.cleanup()
    assert polls >= 1


async def until(check: Callable[[], Awaitable[Any]], *, timeout: float = 15.0, what: str = "condition") -> Any:
    """Await `check` every 50 ms until it gives something truthy; fail after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if result := await check():
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


async def test_a_host_network_pod_is_admitted_without_the_sidecar_unless_it_asks(
    kube: KubeEmulator, webhook: Any
) -> None:
    await create_ready_policy(kube, policy_body())
    url = await webhook()
    pod = a_pod()
    pod["spec"]["hostNetwork"] = True

    response = await admit(url, review(pod))

    assert response["allowed"] is True and "patch" not in response
    assert "llmroute.dev/inject-host-network" in response["warnings"][0]
    asked = a_pod(**{"llmroute.dev/inject-host-network": "true"})
    asked["spec"]["hostNetwork"] = True
    assert applied(asked, await admit(url, review(asked)))["spec"]["initContainers"][0]["name"] == "llmroute"


async def test_a_bad_resource_annotation_is_a_warning_not_a_refusal(kube: KubeEmulator, webhook: Any) -> None:
    await create_ready_policy(kube, policy_body())
    url = await webhook()
    pod = a_pod(**{"llmroute.dev/sidecar-memory-limit": "a lot"})

    response = await admit(url, review(pod))

    sidecar = applied(pod, response)["spec"]["initContainers"][0]
    assert sidecar["resources"]["limits"]["memory"] == "384Mi"
    assert response["warnings"] == [
        "llmroute: llmroute.dev/sidecar-memory-limit: 'a lot' is not a Kubernetes quantity; the default is kept"
    ]


class HeldSource:
    """A policy source whose reads wait until released: a review stays in flight as long as the test wants."""

    def __init__(self) -> None:
        self.reading, self.release = asyncio.Event(), asyncio.Event()

    async def read_policy(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.reading.set()
        await self.release.wait()
        body = policy_body(name)
        return {**body, "status": ready_status(body)}

    async def list_policies(self) -> list[dict[str, Any]]:
        return []


async def test_shutdown_turns_unready_first_and_finishes_the_reviews_in_flight() -> None:
    """SIGTERM (here: `stop`) must not drop a review the API server already sent: under failurePolicy
    Ignore that pod would start without its sidecar, reported nowhere."""
    settings = replace(SETTINGS, webhook_port=free_port(), relay_port=free_port(), shutdown_delay=0.5)
    base = f"http://127.0.0.1:{settings.webhook_port}"
    source, stop = HeldSource(), asyncio.Event()
    server = asyncio.create_task(serve(settings, source, stop))

    async def status_of(path: str) -> int | None:
        try:
            async with aiohttp.ClientSession() as session, session.get(base + path) as answer:
                return answer.status
        except aiohttp.ClientConnectionError:
            return None

    try:
        assert await until(lambda: status_of("/readyz"), what="the webhook") == 200
        in_flight = asyncio.create_task(admit(base, review(a_pod())))
        await asyncio.wait_for(source.reading.wait(), 10)

        stop.set()
        assert await until(lambda: _is(503, status_of("/readyz")), what="readiness off")
        assert await status_of("/healthz") == 200  # still serving during the delay
        source.release.set()

        response = await asyncio.wait_for(in_flight, 10)
        assert applied(a_pod(), response)["spec"]["initContainers"][0]["name"] == "llmroute"
        await asyncio.wait_for(server, 10)
        assert await status_of("/healthz") is None  # closed
    finally:
        stop.set()
        source.release.set()
        if not server.done():
            await asyncio.wait_for(server, 10)


async def _is(expected: int, status: Awaitable[int | None]) -> bool:
    return await status == expected
