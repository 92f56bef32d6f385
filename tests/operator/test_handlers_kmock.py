"""The real kopf reconciler, in its own thread and event loop, against the emulated API server.

What a platform team sees after `kubectl apply`: the ConfigMap the sidecars mount, the policy's
status and conditions, Events for problems, and clean deletion. Garbage collection of the ConfigMap
is Kubernetes' job (not emulated): the tests check the owner reference that makes it happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import kopf
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from llmroute_operator import handlers
from llmroute_operator.settings import Settings
from llmroute_sidecar.policy import load_policy, render_sidecar_config
from llmroute_sidecar.statuspages import Reading, page_key

from .conftest import (
    CONFIGMAPS,
    EVENTS,
    NAMESPACE,
    POLICIES,
    POLICY_URL,
    SECRET_URL,
    eventually,
    policy_body,
    secret_body,
)
from .kube_emulator import KubeEmulator


def stored(kube: KubeEmulator, resource: Any, name: str) -> dict[str, Any] | None:
    """The object as the API server holds it now, or None."""
    for (res, namespace, obj_name), obj in kube.objects.items():
        if res == resource and namespace == NAMESPACE and obj_name == name and not obj.deleted:
            return obj.raw
    return None


def condition(kube: KubeEmulator, name: str, kind: str) -> dict[str, Any] | None:
    body = stored(kube, POLICIES, name) or {}
    return next((c for c in (body.get("status") or {}).get("conditions") or [] if c["type"] == kind), None)


def events(kube: KubeEmulator, name: str) -> list[dict[str, Any]]:
    return [
        obj.raw
        for (res, _, _), obj in kube.objects.items()
        if res == EVENTS and not obj.deleted and obj.raw.get("involvedObject", {}).get("name") == name
    ]


FAST = Settings(secret_recheck_interval=0.3, configmap_resync_interval=0.3)
"""Resync passes every 0.3 s, so restored ConfigMaps and found Secrets show up quickly."""


@contextlib.asynccontextmanager
async def running_operator(kube: KubeEmulator, settings: Settings | None = None) -> AsyncIterator[None]:
    """kopf running the reconciler's registry against `kube`, stopped (and awaited) on exit."""
    settings = settings or FAST
    memo = handlers.OperatorMemo(settings=settings, connection=kopf.ConnectionInfo(server=str(kube.url).rstrip("/")))
    options = {**handlers.operator_options(settings), "liveness_endpoint": None}
    stop, ready = threading.Event(), threading.Event()
    coroutine = kopf.operator(memo=memo, stop_flag=stop, ready_flag=ready, **options)
    thread = threading.Thread(target=asyncio.run, args=(coroutine,), name="kopf", daemon=True)
    thread.start()
    await eventually(ready.is_set, what="kopf to start")
    try:
        yield
    finally:
        stop.set()
        await eventually(lambda: not thread.is_alive(), timeout=20, what="kopf to stop")


@pytest_asyncio.fixture()
async def operator(kube: KubeEmulator) -> AsyncIterator[None]:
    async with running_operator(kube):
        yield


async def apply(kube: KubeEmulator, url: str, body: dict[str, Any]) -> None:
    async with kube.post(url, json=body) as response:
        assert response.status in (200, 201), await response.text()


async def merge_patch(kube: KubeEmulator, url: str, patch: dict[str, Any]) -> None:
    headers = {"Content-Type": "application/merge-patch+json"}
    async with kube.patch(url, data=json.dumps(patch), headers=headers) as response:
        assert response.status == 200, await response.text()


async def test_a_new_policy_gets_its_configmap_and_a_ready_status(kube: KubeEmulator, operator: None) -> None:
    await apply(kube, SECRET_URL, secret_body())
    await apply(kube, POLICY_URL, policy_body())

    configmap = await eventually(lambda: stored(kube, CONFIGMAPS, "support-bot-llmroute"), what="the ConfigMap")
    ready = await eventually(
        lambda: (c := condition(kube, "support-bot", "Ready")) and c["status"] == "True" and c, what="Ready"
    )

    policy = stored(kube, POLICIES, "support-bot")
    assert policy is not None
    loaded = load_policy(policy)
    assert json.loads(configmap["data"]["policy.json"]) == render_sidecar_config(loaded)
    assert "llm-keys" not in configmap["data"]["policy.json"]  # env var names, not Secret references
    [owner] = configmap["metadata"]["ownerReferences"]
    assert owner["uid"] == policy["metadata"]["uid"]
    assert owner["kind"] == "LLMRoutePolicy" and owner["controller"] is True
    assert configmap["metadata"]["annotations"]["llmroute.dev/config-hash"] == loaded.config_hash

    status = policy["status"]
    assert status["observedGeneration"] == 1
    assert status["configHash"] == loaded.config_hash
    assert status["configMap"] == "support-bot-llmroute"
    assert status["routes"] == ["chat"]
    assert ready["observedGeneration"] == 1 and ready["reason"] == "Reconciled"
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Ready": "True",
        "HotHotRouting": "False",
        "BudgetOutOfRange": "False",
        "MissingSecret": "False",
        "ServingLastGood": "False",
    }
    assert "kopf" not in status  # kopf's bookkeeping stays in annotations, out of the CRD's status


async def test_an_updated_policy_updates_the_configmap_and_the_status(kube: KubeEmulator, operator: None) -> None:
    await apply(kube, SECRET_URL, secret_body())
    await apply(kube, POLICY_URL, policy_body())
    await eventually(lambda: (c := condition(kube, "support-bot", "Ready")) and c["status"] == "True")
    first_hash = stored(kube, POLICIES, "support-bot")["status"]["configHash"]  # type: ignore[index]
    ready_since = condition(kube, "support-bot", "Ready")["lastTransitionTime"]  # type: ignore[index]

    spec = policy_body()["spec"]
    spec["routes"][0]["budget"] = "20s"
    await merge_patch(kube, f"{POLICY_URL}/support-bot", {"spec": spec})

    await eventually(
        lambda: stored(kube, POLICIES, "support-bot")["status"]["observedGeneration"] == 2,  # type: ignore[index]
        what="generation 2 observed",
    )
    policy = stored(kube, POLICIES, "support-bot")
    assert policy is not None
    loaded = load_policy(policy)
    assert loaded.config_hash != first_hash
    assert policy["status"]["configHash"] == loaded.config_hash
    configmap = await eventually(
        lambda: (
            (cm := stored(kube, CONFIGMAPS, "support-bot-llmroute"))
            and json.loads(cm["data"]["policy.json"])["spec"]["routes"][0]["budget"] == "20s"
            and cm
        ),
        what="the ConfigMap to follow",
    )
    assert json.loads(configmap["data"]["policy.json"]) == render_sidecar_config(loaded)
    budget = condition(kube, "support-bot", "BudgetOutOfRange")
    assert budget is not None and budget["status"] == "True" and "spec.routes[0].budget" in budget["message"]
    ready = condition(kube, "support-bot", "Ready")
    assert ready is not None and ready["status"] == "True" and ready["observedGeneration"] == 2
    assert ready["lastTransitionTime"] == ready_since  # still True: no transition


async def test_an_invalid_policy_is_not_ready_names_the_field_and_posts_an_event(
    kube: KubeEmulator, operator: None
) -> None:
    body = policy_body("typo")
    body["spec"]["routes"][0]["targets"][1]["provider"] = "gtp"
    await apply(kube, POLICY_URL, body)

    ready = await eventually(lambda: condition(kube, "typo", "Ready"), what="a Ready condition")
    assert ready["status"] == "False"
    assert ready["reason"] == "InvalidPolicy"
    assert 'spec.routes[0].targets[1].provider: unknown provider "gtp"' in ready["message"]
    warning = await eventually(
        lambda: [e for e in events(kube, "typo") if e.get("reason") == "InvalidPolicy"], what="an Event"
    )
    assert warning[0]["type"] == "Warning"
    assert "spec.routes[0].targets[1].provider" in warning[0]["message"]
    assert stored(kube, CONFIGMAPS, "typo-llmroute") is None


async def test_a_missing_secret_is_reported_until_the_secret_appears(kube: KubeEmulator, operator: None) -> None:
    await apply(kube, POLICY_URL, policy_body())

    missing = await eventually(
        lambda: (c := condition(kube, "support-bot", "MissingSecret")) and c["status"] == "True" and c,
        what="MissingSecret",
    )
    assert 'Secret "llm-keys" not found' in missing["message"]
    assert condition(kube, "support-bot", "Ready")["status"] == "True"  # type: ignore[index]
    await eventually(lambda: [e for e in events(kube, "support-bot") if e.get("reason") == "MissingSecret"])

    await apply(kube, SECRET_URL, secret_body())

    await eventually(
        lambda: condition(kube, "support-bot", "MissingSecret")["status"] == "False",  # type: ignore[index]
        what="MissingSecret to clear",
    )


async def test_a_policy_is_deletable_while_the_operator_is_uninstalled(kube: KubeEmulator) -> None:
    """No finalizer on a policy, even one waiting for a Secret: deleting it (or its namespace) never waits
    for an operator that is gone. The ConfigMap is then the garbage collector's, by its owner reference."""
    async with running_operator(kube):
        await apply(kube, POLICY_URL, policy_body())
        await eventually(
            lambda: (c := condition(kube, "support-bot", "MissingSecret")) and c["status"] == "True",
            what="MissingSecret",
        )
    assert not stored(kube, POLICIES, "support-bot")["metadata"].get("finalizers")  # type: ignore[index]

    async with kube.delete(f"{POLICY_URL}/support-bot") as response:
        assert response.status == 200

    assert stored(kube, POLICIES, "support-bot") is None
    configmap = stored(kube, CONFIGMAPS, "support-bot-llmroute")
    assert configmap is not None
    [owner] = configmap["metadata"]["ownerReferences"]
    assert owner["blockOwnerDeletion"] is True and owner["name"] == "support-bot"


async def test_a_deleted_or_edited_configmap_is_restored(kube: KubeEmulator, operator: None) -> None:
    await apply(kube, SECRET_URL, secret_body())
    await apply(kube, POLICY_URL, policy_body())
    first = await eventually(lambda: stored(kube, CONFIGMAPS, "support-bot-llmroute"), what="the ConfigMap")
    good = first["data"]["policy.json"]
    url = f"/api/v1/namespaces/{NAMESPACE}/configmaps/support-bot-llmroute"

    async with kube.delete(url) as response:
        assert response.status == 200
    restored = await eventually(lambda: stored(kube, CONFIGMAPS, "support-bot-llmroute"), what="the restored ConfigMap")
    assert restored["data"]["policy.json"] == good
    assert restored["metadata"]["ownerReferences"][0]["name"] == "support-bot"

    await merge_patch(kube, url, {"data": {"policy.json": "{}"}})
    await eventually(
        lambda: (stored(kube, CONFIGMAPS, "support-bot-llmroute") or {}).get("data", {}).get("policy.json") == good,
        what="the edit undone",
    )
    assert condition(kube, "support-bot", "Ready")["status"] == "True"  # type: ignore[index]
    await eventually(lambda: [e for e in events(kube, "support-bot") if e.get("reason") == "ConfigMapCreated"][1:])


async def test_a_huge_prompt_leaves_kopf_a_small_annotation(kube: KubeEmulator, operator: None) -> None:
    """kopf's last-handled state is a digest: a 300 KiB prompt would not fit an annotation (256 KiB)."""
    spec = copy.deepcopy(policy_body()["spec"])
    spec["routes"][0]["targets"][0]["prompt"] = {"system": "Be helpful. " * 25_000}
    await apply(kube, SECRET_URL, secret_body())
    await apply(kube, POLICY_URL, policy_body(spec=spec))
    await eventually(lambda: (c := condition(kube, "support-bot", "Ready")) and c["status"] == "True", what="Ready")

    annotations = stored(kube, POLICIES, "support-bot")["metadata"].get("annotations") or {}  # type: ignore[index]
    assert sum(len(k) + len(v) for k, v in annotations.items()) < 1024, annotations
    assert annotations["llmroute.dev/last-handled-configuration"].startswith("sha256:")

    spec["routes"][0]["budget"] = "9s"  # an edit is still seen as one
    await merge_patch(kube, f"{POLICY_URL}/support-bot", {"spec": {"routes": spec["routes"]}})
    await eventually(
        lambda: (
            '"budget": "9s"'
            in (stored(kube, CONFIGMAPS, "support-bot-llmroute") or {}).get("data", {}).get("policy.json", "")
        ),
        what="the edit rendered",
    )


async def test_a_restarted_operator_leaves_an_unchanged_configmap_alone(kube: KubeEmulator) -> None:
    await apply(kube, SECRET_URL, secret_body())
    async with running_operator(kube):
        await apply(kube, POLICY_URL, policy_body())
        await eventually(lambda: (c := condition(kube, "support-bot", "Ready")) and c["status"] == "True")
    configmap_versions = len(kube.objects[CONFIGMAPS, NAMESPACE, "support-bot-llmroute"].history)
    resumes = len(kube.objects[POLICIES, NAMESPACE, "support-bot"].history)

    async with running_operator(kube):  # resume: every existing policy is reconciled again
        await eventually(
            lambda: len(kube.objects[POLICIES, NAMESPACE, "support-bot"].history) > resumes, what="the resume"
        )

    assert len(kube.objects[CONFIGMAPS, NAMESPACE, "support-bot-llmroute"].history) == configmap_versions
    assert condition(kube, "support-bot", "Ready")["status"] == "True"  # type: ignore[index]


async def test_a_foreign_configmap_of_the_same_name_is_not_overwritten(kube: KubeEmulator, operator: None) -> None:
    foreign = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "support-bot-llmroute"},
        "data": {"a": "b"},
    }
    await apply(kube, f"/api/v1/namespaces/{NAMESPACE}/configmaps", foreign)
    await apply(kube, SECRET_URL, secret_body())
    await apply(kube, POLICY_URL, policy_body())

    ready = await eventually(lambda: condition(kube, "support-bot", "Ready"), what="a Ready condition")

    assert (ready["status"], ready["reason"]) == ("False", "ConfigMapConflict")
    assert stored(kube, CONFIGMAPS, "support-bot-llmroute")["data"] == {"a": "b"}  # type: ignore[index]
    await eventually(lambda: [e for e in events(kube, "support-bot") if e.get("reason") == "ConfigMapConflict"])


async def test_the_shedding_column_follows_the_status_relay(kube: KubeEmulator) -> None:
    """`status.sheddingProviders` (the Shedding printer column) is what the relay last read, per policy."""
    page = {"type": "statuspage", "url": "https://status.claude.com/api/v2/summary.json", "components": ["api"]}
    spec = copy.deepcopy(policy_body()["spec"])
    spec["providers"][0]["statusPage"] = page
    state = {"now": "major_outage"}

    async def relay(request: web.Request) -> web.Response:
        reading = Reading(state=state["now"], level=3 if state["now"] == "major_outage" else 0, usable=True)
        entry = {
            **reading.to_json(),
            "type": page["type"],
            "url": page["url"],
            "watched": page["components"],
            "seq": 1,
            "epoch": "e1",
            "polledAt": None,
            "age": 1.0,
        }
        key = page_key(load_policy(policy_body(spec=spec)).spec.providers[0].status_page)  # type: ignore[arg-type]
        return web.json_response({"relay": {"pages": 1}, "pages": {key: entry}})

    app = web.Application()
    app.router.add_get("/v1/statuspages", relay)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        settings = Settings(status_relay=str(server.make_url("")).rstrip("/"), shedding_refresh_interval=0.2)
        async with running_operator(kube, settings):
            await apply(kube, SECRET_URL, secret_body())
            await apply(kube, POLICY_URL, policy_body(spec=spec))

            def shedding() -> list[str] | None:
                return ((stored(kube, POLICIES, "support-bot") or {}).get("status") or {}).get("sheddingProviders")

            await eventually(lambda: shedding() == ["claude"], what="claude shown as shedding")
            metadata = (stored(kube, POLICIES, "support-bot") or {})["metadata"]
            assert "llmroute.dev/finalizer" not in (metadata.get("finalizers") or [])  # deletable without us
            state["now"] = "operational"
            await eventually(lambda: shedding() is None, what="the column cleared")
    finally:
        await server.close()


async def test_pointing_a_live_policy_at_another_host_never_reaches_the_configmap(
    kube: KubeEmulator, operator: None
) -> None:
    """Whoever may patch a policy cannot send the live key elsewhere: sidecars hot-reload the ConfigMap,
    and the operator never writes a baseURL whose host is off its allowlist into it."""
    await apply(kube, SECRET_URL, secret_body())
    await apply(kube, POLICY_URL, policy_body())
    good = await eventually(lambda: stored(kube, CONFIGMAPS, "support-bot-llmroute"), what="the ConfigMap")
    good_config = good["data"]["policy.json"]
    providers = copy.deepcopy(policy_body()["spec"]["providers"])
    providers[0]["baseURL"] = "https://collector.attacker.example/v1"

    await merge_patch(kube, f"{POLICY_URL}/support-bot", {"spec": {"providers": providers}})

    ready = await eventually(
        lambda: (c := condition(kube, "support-bot", "Ready")) and c["status"] == "False" and c, what="Ready=False"
    )
    assert 'host "collector.attacker.example" is not on the operator\'s allowlist' in ready["message"]
    serving = condition(kube, "support-bot", "ServingLastGood")
    assert serving is not None and serving["status"] == "True"
    configmap = stored(kube, CONFIGMAPS, "support-bot-llmroute")
    assert configmap is not None and configmap["data"]["policy.json"] == good_config
    assert "attacker" not in configmap["data"]["policy.json"]


async def test_an_allowlisted_host_is_rendered(kube: KubeEmulator) -> None:
    settings = replace(Settings(), provider_hosts=(*Settings().provider_hosts, "*.openai.azure.com"))
    spec = copy.deepcopy(policy_body()["spec"])
    spec["providers"][1]["baseURL"] = "https://corp.openai.azure.com/openai/v1"
    async with running_operator(kube, settings):
        await apply(kube, SECRET_URL, secret_body())
        await apply(kube, POLICY_URL, policy_body(spec=spec))
        configmap = await eventually(lambda: stored(kube, CONFIGMAPS, "support-bot-llmroute"), what="the ConfigMap")
    assert "https://corp.openai.azure.com/openai/v1" in configmap["data"]["policy.json"]


def a_pod(name: str, **annotations: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": {"llmroute.dev/inject": "true"},
            "annotations": {"llmroute.dev/policy": "support-bot", **annotations},
        },
        "spec": {"containers": [{"name": "app", "image": "app:1"}]},
        "status": {"phase": "Running"},
    }


async def test_opted_in_pods_running_without_the_sidecar_are_reported(kube: KubeEmulator, operator: None) -> None:
    """Under failurePolicy Ignore a pod admitted while the webhook was down starts without keys or base
    URLs; the policy says so (condition and Event) until the pod is gone."""
    pods_url = f"/api/v1/namespaces/{NAMESPACE}/pods"
    kube.namespace_labels.update({NAMESPACE: {"llmroute.dev/injection": "enabled"}, "other": {}})
    await apply(kube, SECRET_URL, secret_body())
    await apply(kube, POLICY_URL, policy_body())
    await eventually(lambda: (c := condition(kube, "support-bot", "Ready")) and c["status"] == "True", what="Ready")
    await apply(kube, pods_url, a_pod("web-injected", **{"llmroute.dev/injected": "support-bot@abc"}))
    await apply(kube, pods_url, a_pod("web-bare"))
    in_labelled_namespace = a_pod("worker-bare")
    del in_labelled_namespace["metadata"]["labels"]  # opted in by its namespace's label only
    await apply(kube, pods_url, in_labelled_namespace)

    reported = await eventually(  # passes may run between the creations: wait for the one that saw all three
        lambda: (c := condition(kube, "support-bot", "UninjectedPods")) and "2 running" in c["message"] and c,
        what="UninjectedPods",
    )
    assert reported["status"] == "True"
    assert "2 running pod(s)" in reported["message"] and "web-bare, worker-bare" in reported["message"]
    assert "web-injected" not in reported["message"]
    await eventually(
        lambda: [e for e in events(kube, "support-bot") if e.get("reason") == "PodsWithoutSidecar"], what="the Event"
    )
    assert condition(kube, "support-bot", "Ready")["status"] == "True"  # type: ignore[index]

    for name in ("web-bare", "worker-bare"):
        async with kube.delete(f"{pods_url}/{name}") as response:
            assert response.status == 200
    await eventually(
        lambda: condition(kube, "support-bot", "UninjectedPods")["status"] == "False",  # type: ignore[index]
        what="UninjectedPods to clear",
    )


async def test_a_found_secret_clears_missing_secret_between_full_passes(kube: KubeEmulator) -> None:
    """Between the (rare) full passes, only the policies waiting for a Secret are read, one GET each."""
    async with running_operator(kube, Settings(secret_recheck_interval=0.3, configmap_resync_interval=3600)):
        await apply(kube, POLICY_URL, policy_body())
        await eventually(
            lambda: (c := condition(kube, "support-bot", "MissingSecret")) and c["status"] == "True",
            what="MissingSecret",
        )
        await apply(kube, SECRET_URL, secret_body())
        await eventually(
            lambda: condition(kube, "support-bot", "MissingSecret")["status"] == "False",  # type: ignore[index]
            what="MissingSecret to clear",
        )
    lists = [
        r
        for r in kube._requests  # every request kmock served
        if r.resource == POLICIES and not r.name and str(r.method).endswith("GET") and "watch" not in r.params
    ]
    assert len(lists) <= 2, "one full pass at start (kopf's own list aside), not one per recheck"
