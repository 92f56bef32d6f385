"""4. The webhook as a local process serving the chart's TLS pair, reached by the API server through the
chart's MutatingWebhookConfiguration (webhook.url): what the server stores is what it validated, Pod
Security `restricted` included, and with the webhook down pod creation follows the chart's failurePolicy."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from tests.e2e.cluster import ApiError, Cluster, wait_for
from tests.e2e.conftest import (
    APP_NAMESPACE,
    POLICIES,
    RELEASE,
    ROOT,
    Component,
    Release,
    condition,
    policy_manifest,
    wait_reconciled,
    wait_webhook_ready,
)

from llmroute_operator import INJECTED_ANNOTATION, LAST_GOOD_ANNOTATION, POLICY_ANNOTATION
from llmroute_operator.injection import APP_ENV, SIDECAR_NAME, sidecar_container
from llmroute_operator.reconcile import configmap_name, load_cluster_policy
from llmroute_operator.settings import Settings

pytestmark = pytest.mark.e2e
PODS = f"/api/v1/namespaces/{APP_NAMESPACE}/pods"
EVENTS = f"/api/v1/namespaces/{APP_NAMESPACE}/events"
OPT_IN_LABEL = "llmroute.dev/inject"
BY_POD_LABEL = "objects.pods.llmroute.dev"
"""The chart's webhook (webhook.selection=labels) that a pod labelled `llmroute.dev/inject=true` in a
namespace without the injection label is sent to; `namespaces.pods.llmroute.dev` takes labelled namespaces."""
WEBHOOK_CONFIGURATION = f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{RELEASE}"
RESTRICTED_POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "seccompProfile": {"type": "RuntimeDefault"},
}
RESTRICTED_CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def app_pod_spec() -> dict[str, Any]:
    """A stand-in app that passes Pod Security `restricted` on its own (it is never run: no kubelet)."""
    return {
        "securityContext": RESTRICTED_POD_SECURITY,
        "containers": [
            {
                "name": "app",
                "image": "registry.invalid/my-app:1",
                "command": ["sleep", "86400"],
                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "32Mi"}},
                "securityContext": RESTRICTED_CONTAINER_SECURITY,
            }
        ],
    }


def pod(name: str, policy: str | None, *, opt_in: bool = True) -> dict[str, Any]:
    """A pod asking for the sidecar of `policy` (the annotation, and unless `opt_in` is False the opt-in
    label that the chart's webhooks select by), or a plain one."""
    annotations = {POLICY_ANNOTATION: policy} if policy else {}
    labels = {"app.kubernetes.io/name": name, **({OPT_IN_LABEL: "true"} if policy and opt_in else {})}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": app_pod_spec(),
    }


def differences(sent: Any, stored: Any, path: str = "") -> list[str]:
    """Where what we sent is not stored unchanged (the server may add its defaults around it)."""
    if isinstance(sent, dict) and isinstance(stored, dict):
        return [
            problem
            for key, value in sent.items()
            for problem in (
                differences(value, stored[key], f"{path}.{key}") if key in stored else [f"{path}.{key}: dropped"]
            )
        ]
    if isinstance(sent, list) and isinstance(stored, list) and len(sent) <= len(stored):  # the server may append
        return [
            problem
            for i, pair in enumerate(zip(sent, stored[: len(sent)], strict=True))
            for problem in differences(*pair, f"{path}[{i}]")
        ]
    return [] if sent == stored else [f"{path}: sent {sent!r}, stored {stored!r}"]


@pytest.fixture(scope="module")
def support_bot(release: Release, operator: Component, app_keys: dict[str, str]) -> dict[str, Any]:
    """examples/cluster-policy.yaml, applied as the README says, reconciled by the operator."""
    manifest = yaml.safe_load((ROOT / "examples" / "cluster-policy.yaml").read_text(encoding="utf-8"))
    manifest["metadata"]["namespace"] = APP_NAMESPACE
    release.cluster.apply(manifest)
    return wait_reconciled(release.cluster, "support-bot")


def _delete_pod(cluster: Cluster, name: str) -> None:
    try:
        cluster.api("DELETE", f"{PODS}/{name}?gracePeriodSeconds=0")
    except ApiError as exc:
        if exc.status != 404:
            raise


def test_a_deployments_pod_gets_the_native_sidecar_as_the_server_validated_it(
    release: Release, webhook: Component, support_bot: dict[str, Any]
) -> None:
    cluster = release.cluster
    template = pod("my-app", "support-bot")
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "my-app", "namespace": APP_NAMESPACE},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": template["metadata"]["labels"]},
            "template": {"metadata": template["metadata"], "spec": template["spec"]},
        },
    }
    cluster.apply(deployment)

    def created() -> dict[str, Any] | None:
        pods = cluster.api("GET", f"{PODS}?labelSelector=app.kubernetes.io/name=my-app")["items"]
        return pods[0] if pods else None

    stored = wait_for("the ReplicaSet's pod", created, timeout=90)
    annotations = stored["metadata"]["annotations"]
    assert annotations[INJECTED_ANNOTATION] == f"support-bot@{support_bot['status']['configHash']}"
    sidecar = stored["spec"]["initContainers"][0]
    assert (sidecar["name"], sidecar["restartPolicy"]) == (SIDECAR_NAME, "Always")

    policy = load_cluster_policy(cluster.api("GET", f"{POLICIES}/support-bot"))
    expected = sidecar_container(policy, Settings.from_env(webhook.env))
    assert differences(expected, sidecar) == [], "the server stored a different sidecar than the webhook sent"
    appended = sidecar["volumeMounts"][len(expected["volumeMounts"]) :]
    assert [mount["mountPath"] for mount in appended] == ["/var/run/secrets/kubernetes.io/serviceaccount"], (
        "the ServiceAccount admission plugin mounts the pod's token into every container, the sidecar included"
    )
    assert sidecar["terminationMessagePolicy"] == "File", "and defaulted it as a container of its own"
    health_port = Settings.from_env(webhook.env).sidecar_health_port
    probes = [sidecar[probe]["httpGet"] for probe in ("startupProbe", "readinessProbe", "livenessProbe")]
    assert [(get["path"], get["port"]) for get in probes] == [
        ("/healthz", health_port), ("/readyz", health_port), ("/healthz", health_port),
    ], "httpGet probes on the health port, admitted by Pod Security `restricted` (the namespace enforces it)"  # fmt: skip
    volumes = {volume["name"]: volume for volume in stored["spec"]["volumes"]}
    assert volumes["llmroute-policy"]["configMap"]["name"] == configmap_name("support-bot")
    projected = [source["secret"]["items"][0]["path"] for source in volumes["llmroute-keys"]["projected"]["sources"]]
    assert projected == ["claude", "gpt"]
    app_env = {item["name"]: item.get("value") for item in stored["spec"]["containers"][0]["env"]}
    assert app_env == APP_ENV
    assert not any(
        mount["name"] == "llmroute-keys" for mount in stored["spec"]["containers"][0].get("volumeMounts", [])
    )
    cluster.kubectl("delete", "-n", APP_NAMESPACE, "deployment", "my-app", "--wait=false")


def test_a_pod_without_the_annotation_is_untouched(release: Release, webhook: Component) -> None:
    cluster = release.cluster
    sent = pod("plain", None)
    stored = cluster.api("POST", PODS, sent)
    try:
        assert "initContainers" not in stored["spec"]
        assert INJECTED_ANNOTATION not in (stored["metadata"].get("annotations") or {})
        assert [c.get("env") for c in stored["spec"]["containers"]] == [None]
        assert not any(v["name"].startswith("llmroute") for v in stored["spec"].get("volumes", []))
    finally:
        _delete_pod(cluster, "plain")


def test_a_pod_naming_an_unknown_policy_is_refused_with_the_webhooks_message(
    release: Release, webhook: Component
) -> None:
    with pytest.raises(ApiError) as refused:
        release.cluster.api("POST", PODS, pod("orphan", "no-such-policy"))
    assert refused.value.status == 403, refused.value.body
    message = refused.value.body["message"]
    assert f'admission webhook "{BY_POD_LABEL}" denied the request' in message
    assert "no-such-policy" in message


@pytest.fixture
def injection_enabled_namespace(release: Release) -> Iterator[None]:
    """The app namespace labelled `llmroute.dev/injection=enabled` for one test (then unlabelled)."""
    path = f"/api/v1/namespaces/{APP_NAMESPACE}"
    merge = "application/merge-patch+json"
    label = "llmroute.dev/injection"
    release.cluster.api("PATCH", path, {"metadata": {"labels": {label: "enabled"}}}, content_type=merge)
    try:
        yield
    finally:
        release.cluster.api("PATCH", path, {"metadata": {"labels": {label: None}}}, content_type=merge)


def test_in_a_namespace_that_opted_in_pods_need_no_label_and_can_opt_out(
    release: Release, webhook: Component, support_bot: dict[str, Any], injection_enabled_namespace: None
) -> None:
    cluster = release.cluster

    def refused_by_the_namespace_webhook() -> str | None:  # until the server's namespace cache has the label
        try:
            cluster.api("POST", f"{PODS}?dryRun=All", pod("orphan", "no-such-policy", opt_in=False))
        except ApiError as exc:
            return str(exc.body["message"]) if exc.status == 403 else None
        return None

    message = wait_for("the namespace's label to select its pods", refused_by_the_namespace_webhook, timeout=30)
    assert 'admission webhook "namespaces.pods.llmroute.dev" denied the request' in message

    stored = cluster.api("POST", PODS, pod("by-namespace", "support-bot", opt_in=False))
    try:
        assert stored["spec"]["initContainers"][0]["name"] == SIDECAR_NAME
    finally:
        _delete_pod(cluster, "by-namespace")
    opted_out = pod("opted-out", "support-bot", opt_in=False)
    opted_out["metadata"]["labels"][OPT_IN_LABEL] = "false"
    stored = cluster.api("POST", PODS, opted_out)
    _delete_pod(cluster, "opted-out")
    assert "initContainers" not in stored["spec"], "a pod's inject=false label keeps it out of the webhook"


@pytest.fixture
def webhook_down(release: Release, webhook: Component) -> Iterator[Component]:
    webhook.stop()
    try:
        yield webhook
    finally:
        release.upgrade()  # the chart's values again (failurePolicy: Ignore)
        webhook.start()
        wait_webhook_ready(webhook, release.webhook_port, webhook.ca_pem)


def test_with_the_webhook_down_pod_creation_follows_the_failure_policy(
    release: Release, support_bot: dict[str, Any], webhook_down: Component
) -> None:
    cluster = release.cluster

    def failure_policies() -> dict[str, str]:
        webhooks = cluster.api("GET", WEBHOOK_CONFIGURATION)["webhooks"]
        return {hook["name"]: hook["failurePolicy"] for hook in webhooks}

    assert failure_policies() == {
        "namespaces.pods.llmroute.dev": "Ignore", BY_POD_LABEL: "Ignore",
    }, "the chart's documented default, on both opt-in webhooks"  # fmt: skip
    stored = cluster.api("POST", PODS, pod("while-down", "support-bot"))
    try:
        assert "initContainers" not in stored["spec"], "Ignore: admitted without the sidecar"

        def reported() -> dict[str, Any] | None:  # the operator lists pods and namespaces (its ClusterRole)
            found = condition(cluster.get(f"{POLICIES}/support-bot"), "UninjectedPods")
            return found if found and found["status"] == "True" else None

        assert "while-down" in wait_for("UninjectedPods on support-bot", reported, timeout=30)["message"]
    finally:
        _delete_pod(cluster, "while-down")

    release.upgrade("--set", "webhook.failurePolicy=Fail")
    wait_for(
        "failurePolicy Fail to be live",
        lambda: set(failure_policies().values()) == {"Fail"},
        timeout=30,
    )
    with pytest.raises(ApiError) as refused:
        cluster.api("POST", PODS, pod("while-down-fail", "support-bot"))
    assert f'failed calling webhook "{BY_POD_LABEL}"' in refused.value.body["message"]

    # Opt-in: a pod without the label is never sent to the webhook, so even Fail with the webhook down
    # admits it (the annotation alone no longer selects it, as with webhook.selection=all).
    unlabelled = cluster.api("POST", PODS, pod("not-opted-in", "support-bot", opt_in=False))
    _delete_pod(cluster, "not-opted-in")
    assert "initContainers" not in unlabelled["spec"]
    assert INJECTED_ANNOTATION not in unlabelled["metadata"]["annotations"]


def test_a_policy_whose_spec_became_invalid_still_injects_its_last_good_config(
    release: Release, operator: Component, webhook: Component, app_keys: dict[str, str]
) -> None:
    """An edit the server accepts but the operator refuses (a host off the operator's allowlist) must not
    block pod creation: the webhook injects the config the ConfigMap holds, marks the pod, records an Event."""
    cluster = release.cluster
    cluster.apply(policy_manifest("drifting"))
    good = wait_reconciled(cluster, "drifting")["status"]["configHash"]
    cluster.api(
        "PATCH",
        f"{POLICIES}/drifting",
        [{"op": "add", "path": "/spec/providers/0/baseURL", "value": "https://llm-gateway.invalid"}],
        content_type="application/json-patch+json",
    )

    def serving_last_good() -> dict[str, Any] | None:
        policy = cluster.get(f"{POLICIES}/drifting")
        lag = condition(policy, "ServingLastGood")
        return policy if lag and lag["status"] == "True" else None

    refused = condition(wait_for("ServingLastGood on drifting", serving_last_good, timeout=60), "Ready")
    assert refused is not None and refused["status"] == "False" and "llm-gateway.invalid" in refused["message"]

    def injected_from_last_good() -> dict[str, Any] | None:  # a dry run, until the webhook's cache has the edit
        admitted = cluster.api("POST", f"{PODS}?dryRun=All", pod("drifting-app", "drifting"))
        return admitted if LAST_GOOD_ANNOTATION in admitted["metadata"]["annotations"] else None

    wait_for("the webhook to see the invalid spec", injected_from_last_good, timeout=30)
    stored = cluster.api("POST", PODS, pod("drifting-app", "drifting"))
    try:
        annotations = stored["metadata"]["annotations"]
        assert annotations[INJECTED_ANNOTATION] == f"drifting@{good}"
        assert LAST_GOOD_ANNOTATION in annotations
        assert stored["spec"]["initContainers"][0]["name"] == SIDECAR_NAME
        volumes = {volume["name"]: volume for volume in stored["spec"]["volumes"]}
        assert volumes["llmroute-policy"]["configMap"]["name"] == configmap_name("drifting")

        def lag_event() -> dict[str, Any] | None:
            events = cluster.api("GET", f"{EVENTS}?fieldSelector=involvedObject.name=drifting")["items"]
            return next((e for e in events if e["reason"] == "InjectedLastGoodConfig"), None)

        event = wait_for("the webhook's Event on the policy", lag_event, timeout=30)
        assert good in event["message"]
    finally:
        _delete_pod(cluster, "drifting-app")
        cluster.kubectl("delete", "-n", APP_NAMESPACE, "lrp", "drifting", "--wait=false")
