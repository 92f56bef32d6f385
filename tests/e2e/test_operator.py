"""3. The real operator (kopf) against the real API server, authenticated as the chart's operator
ServiceAccount with a token the server issued: RBAC, admission (OwnerReferencesPermissionEnforcement
included), resourceVersions, watches and garbage collection are the server's, not an emulator's."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from tests.e2e.cluster import Cluster, wait_for
from tests.e2e.conftest import (
    APP_NAMESPACE,
    POLICIES,
    RELEASE,
    Component,
    Release,
    chart_environment,
    condition,
    policy_manifest,
    wait_reconciled,
)

from llmroute_operator.reconcile import configmap_name

pytestmark = pytest.mark.e2e
CONFIGMAPS = f"/api/v1/namespaces/{APP_NAMESPACE}/configmaps"
KOPF_FINALIZER = "llmroute.dev/finalizer"


def _configmap(cluster: Cluster, policy: str) -> dict[str, Any] | None:
    return cluster.get(f"{CONFIGMAPS}/{configmap_name(policy)}")


def _rendered(cluster: Cluster, policy: str, config_hash: str) -> dict[str, Any]:
    def current() -> dict[str, Any] | None:
        found = _configmap(cluster, policy)
        annotations = (found or {}).get("metadata", {}).get("annotations") or {}
        return found if found and config_hash in annotations.values() else None

    return wait_for(f"ConfigMap of {policy} at {config_hash}", current, timeout=30)


def _gone(cluster: Cluster, path: str, timeout: float = 60.0) -> None:
    wait_for(f"{path} to be deleted", lambda: cluster.get(path) is None, timeout=timeout)


def test_reconcile_update_and_delete_with_the_finalizer(
    release: Release, operator: Component, app_keys: dict[str, str]
) -> None:
    cluster = release.cluster
    cluster.apply(policy_manifest("lifecycle", routes=("chat", "summarize")))
    policy = wait_reconciled(cluster, "lifecycle")
    status = policy["status"]
    assert KOPF_FINALIZER not in (policy["metadata"].get("finalizers") or []), "deletable while the operator is down"
    assert status["routes"] == ["chat", "summarize"]
    assert condition(policy, "MissingSecret")["status"] == "False"  # type: ignore[index]
    configmap = _rendered(cluster, "lifecycle", status["configHash"])
    owner = configmap["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("LLMRoutePolicy", "lifecycle", policy["metadata"]["uid"])
    assert owner.get("blockOwnerDeletion") is True and owner.get("controller") is True
    rendered = json.loads(configmap["data"]["policy.json"])
    assert [route["name"] for route in rendered["spec"]["routes"]] == ["chat", "summarize"]
    assert "secretKeyRef" not in json.dumps(rendered), "the ConfigMap names no Secret"

    cluster.apply(policy_manifest("lifecycle", model="claude-opus-4-1", routes=("chat",)))
    updated = wait_reconciled(cluster, "lifecycle")
    assert updated["status"]["configHash"] != status["configHash"]
    assert updated["status"]["routes"] == ["chat"]
    configmap = _rendered(cluster, "lifecycle", updated["status"]["configHash"])
    assert json.loads(configmap["data"]["policy.json"])["spec"]["routes"][0]["targets"][0]["model"] == "claude-opus-4-1"

    # Foreground deletion: the garbage collector holds the policy (its foregroundDeletion finalizer) until
    # every dependent whose owner reference blocks owner deletion is gone, the ConfigMap first.
    cluster.kubectl("delete", "-n", APP_NAMESPACE, "lrp", "lifecycle", "--cascade=foreground", "--wait=false")
    _gone(cluster, f"{CONFIGMAPS}/{configmap_name('lifecycle')}")
    _gone(cluster, f"{POLICIES}/lifecycle")


def test_what_changed_while_the_operator_was_down_is_reconciled_on_restart(
    release: Release, operator: Component, app_keys: dict[str, str]
) -> None:
    cluster = release.cluster
    cluster.apply(policy_manifest("steady"))
    cluster.apply(policy_manifest("leaving"))
    steady = wait_reconciled(cluster, "steady")
    wait_reconciled(cluster, "leaving")
    operator.stop()
    try:
        cluster.apply(policy_manifest("steady", model="claude-haiku-4-5"))
        cluster.apply(policy_manifest("arriving"))
        cluster.kubectl("delete", "-n", APP_NAMESPACE, "lrp", "leaving", "--wait=false")
        _gone(cluster, f"{POLICIES}/leaving", timeout=30)  # no finalizer of ours waits for the operator
        _gone(cluster, f"{CONFIGMAPS}/{configmap_name('leaving')}")  # the garbage collector needs none
        assert condition(cluster.get(f"{POLICIES}/arriving"), "Ready") is None, "nobody reconciles while it is down"
    finally:
        operator.start()
    changed = wait_reconciled(cluster, "steady")
    assert changed["status"]["configHash"] != steady["status"]["configHash"]
    _rendered(cluster, "steady", changed["status"]["configHash"])
    arrived = wait_reconciled(cluster, "arriving")
    _rendered(cluster, "arriving", arrived["status"]["configHash"])
    for name in ("steady", "arriving"):
        cluster.kubectl("delete", "-n", APP_NAMESPACE, "lrp", name, "--wait=false")


def _without(rules: list[dict[str, Any]], resource: str, verb: str) -> list[dict[str, Any]]:
    """The rules less one verb on one resource (a rule left with no verb goes)."""
    out = []
    for rule in rules:
        if resource in rule["resources"] and verb in rule["verbs"]:
            rule = {**rule, "verbs": [v for v in rule["verbs"] if v != verb]}
        if rule["verbs"]:
            out.append(rule)
    return out


@pytest.mark.parametrize(("resource", "verb"), [("configmaps", "create"), ("llmroutepolicies/status", "patch")])
def test_a_verb_missing_from_the_chart_clusterrole_stops_reconciliation(
    release: Release, operator: Component, app_keys: dict[str, str], resource: str, verb: str
) -> None:
    """The chart's ClusterRole one verb short (edited in place): the server refuses the operator and the
    policy never becomes Ready. `helm upgrade` restores the chart's role and the operator recovers —
    so the happy-path tests above pass only because the chart grants every verb they use."""
    cluster = release.cluster
    role_path = f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{RELEASE}-operator"
    role = cluster.api("GET", role_path)
    chart_rules = release.manifest("ClusterRole", f"{RELEASE}-operator")["rules"]
    assert role["rules"] == chart_rules, "the live role is the chart's"
    name = f"short-{verb}-{resource.split('/')[-1]}"
    logged = len(operator.log())
    cluster.api("PATCH", role_path, {"rules": _without(chart_rules, resource, verb)},
                content_type="application/merge-patch+json")  # fmt: skip
    try:
        cluster.apply(policy_manifest(name))
        wait_for(
            f"the operator to be refused {verb} {resource}",
            lambda: "403" in operator.log()[logged:],
            timeout=60,
        )
        assert cluster_can_i(cluster, operator.env["KUBECONFIG"], verb, resource) == "no"
        policy = cluster.get(f"{POLICIES}/{name}")
        ready = condition(policy, "Ready")
        assert ready is None or ready["status"] != "True"
    finally:
        release.upgrade()
    assert cluster.api("GET", role_path)["rules"] == chart_rules
    wait_reconciled(cluster, name, timeout=90)
    cluster.kubectl("delete", "-n", APP_NAMESPACE, "lrp", name, "--wait=false")


def test_the_operator_cannot_do_what_the_chart_does_not_grant(release: Release, operator: Component) -> None:
    """Least privilege, as the server enforces it for the operator's token: no Secret listing, no pods."""
    token_kubeconfig = operator.env["KUBECONFIG"]
    for verb, resource in (("list", "secrets"), ("create", "pods"), ("delete", "configmaps"), ("get", "secrets")):
        answer = cluster_can_i(release.cluster, token_kubeconfig, verb, resource)
        assert answer == ("yes" if (verb, resource) == ("get", "secrets") else "no"), (verb, resource)


def cluster_can_i(cluster: Cluster, kubeconfig: str, verb: str, resource: str) -> str:
    """`kubectl auth can-i` as the operator (exit status 1 means "no")."""
    resource, _, subresource = resource.partition("/")
    question = [verb, resource, *(["--subresource", subresource] if subresource else [])]
    try:
        return cluster.kubectl("auth", "can-i", *question, "-n", APP_NAMESPACE, kubeconfig=Path(kubeconfig)).strip()
    except subprocess.CalledProcessError as exc:
        return str(exc.stdout).strip()


def test_with_check_secrets_off_the_operator_has_no_secret_access_and_missing_secret_is_unknown(
    release: Release, operator: Component, app_keys: dict[str, str]
) -> None:
    """operator.checkSecrets=false: the chart grants no Secret verb at all, the operator (restarted with the
    re-rendered environment) reads none, and a policy is Ready with MissingSecret Unknown, not a 403 loop."""
    cluster = release.cluster
    kubeconfig = operator.env["KUBECONFIG"]
    release.upgrade("--set", "operator.checkSecrets=false")
    rendered = chart_environment(release.manifest("Deployment", f"{RELEASE}-operator"))
    assert rendered["LLMROUTE_CHECK_SECRETS"] == "false"
    chart_env = operator.env
    operator.stop()
    logged = len(operator.log())
    operator.env = {**chart_env, "LLMROUTE_CHECK_SECRETS": rendered["LLMROUTE_CHECK_SECRETS"]}
    operator.start()
    try:
        wait_for("Secret get to be revoked", lambda: cluster_can_i(cluster, kubeconfig, "get", "secrets") == "no")
        cluster.apply(policy_manifest("unchecked"))
        policy = wait_reconciled(cluster, "unchecked")
        missing = condition(policy, "MissingSecret")
        assert missing is not None and (missing["status"], missing["reason"]) == ("Unknown", "NotChecked")
        assert " 403" not in operator.log()[logged:] and "Forbidden" not in operator.log()[logged:]
    finally:
        operator.stop()
        operator.env = chart_env
        release.upgrade()
        operator.start()
    wait_for("Secret get to be granted again", lambda: cluster_can_i(cluster, kubeconfig, "get", "secrets") == "yes")
    cluster.kubectl("delete", "-n", APP_NAMESPACE, "lrp", "unchecked", "--wait=false")
