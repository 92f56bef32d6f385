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
    wait_reconciled,
    wait_webhook_ready,
)

from llmroute_operator import INJECTED_ANNOTATION, POLICY_ANNOTATION
from llmroute_operator.injection import APP_ENV, SIDECAR_NAME, sidecar_container
from llmroute_operator.reconcile import configmap_name, load_cluster_policy
from llmroute_operator.settings import Settings

pytestmark = pytest.mark.e2e
PODS = f"/api/v1/namespaces/{APP_NAMESPACE}/pods"
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


def pod(name: str, policy: str | None) -> dict[str, Any]:
    """A pod asking for the sidecar of `policy` (the annotation, and the opt-in label that a webhook
    selecting by label needs), or a plain one."""
    annotations = {POLICY_ANNOTATION: policy} if policy else {}
    labels = {"app.kubernetes.io/name": name, **({"llmroute.dev/inject": "true"} if policy else {})}
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
    assert 'admission webhook "pods.llmroute.dev" denied the request' in message
    assert "no-such-policy" in message


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
    configured = cluster.api("GET", WEBHOOK_CONFIGURATION)["webhooks"][0]
    assert configured["failurePolicy"] == "Ignore", "the chart's documented default"
    stored = cluster.api("POST", PODS, pod("while-down", "support-bot"))
    _delete_pod(cluster, "while-down")
    assert "initContainers" not in stored["spec"], "Ignore: admitted without the sidecar"

    release.upgrade("--set", "webhook.failurePolicy=Fail")
    wait_for(
        "failurePolicy Fail to be live",
        lambda: cluster.api("GET", WEBHOOK_CONFIGURATION)["webhooks"][0]["failurePolicy"] == "Fail",
        timeout=30,
    )
    with pytest.raises(ApiError) as refused:
        cluster.api("POST", PODS, pod("while-down-fail", "support-bot"))
    assert 'failed calling webhook "pods.llmroute.dev"' in refused.value.body["message"]
