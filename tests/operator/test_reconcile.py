"""The pure builders: a policy's ConfigMap and status, without any API server."""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest

from llmroute_operator.reconcile import (
    build_configmap,
    build_status,
    configmap_patch,
    has_missing_secret,
    missing_secrets,
    referenced_secrets,
    uninjected_condition,
    uninjected_pods,
)
from llmroute_sidecar.policy import PolicyError, load_policy, render_sidecar_config

from .conftest import policy_body

T0 = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
T1 = T0 + datetime.timedelta(minutes=5)


def by_type(status: dict) -> dict[str, dict]:
    return {c["type"]: c for c in status["conditions"]}


def test_configmap_holds_the_rendered_sidecar_config_under_its_policy_name() -> None:
    body = policy_body()
    body["metadata"]["generation"] = 3
    configmap = build_configmap(body)

    assert configmap["metadata"]["name"] == "support-bot-llmroute"
    assert configmap["metadata"]["namespace"] == "apps"
    assert configmap["metadata"]["labels"]["llmroute.dev/policy"] == "support-bot"
    assert configmap["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "llmroute-operator"
    loaded = load_policy(body)
    assert configmap["metadata"]["annotations"]["llmroute.dev/config-hash"] == loaded.config_hash
    rendered = json.loads(configmap["data"]["policy.json"])
    assert rendered == render_sidecar_config(loaded)
    assert rendered["spec"]["providers"][0]["apiKey"] == {
        "env": "LLMROUTE_KEY_CLAUDE", "file": "/var/run/llmroute/keys/claude"
    }
    assert "llm-keys" not in configmap["data"]["policy.json"]  # no Secret names, no key material


def test_configmap_of_an_invalid_policy_is_refused_with_the_field_path() -> None:
    body = policy_body()
    body["spec"]["routes"][0]["targets"][0]["provider"] = "nope"
    with pytest.raises(PolicyError) as caught:
        build_configmap(body)
    assert 'spec.routes[0].targets[0].provider: unknown provider "nope"' in caught.value.problems


@pytest.mark.parametrize("api_key", [{"env": "HOME"}, {"file": "/var/run/secrets/kubernetes.io/serviceaccount/token"}])
def test_a_cluster_policy_takes_its_keys_from_secrets_only(api_key: dict[str, str]) -> None:
    """Whoever edits a policy must not be able to send the sidecar's environment or files to a baseURL."""
    body = policy_body()
    body["spec"]["providers"][0]["apiKey"] = api_key
    with pytest.raises(PolicyError) as caught:
        build_configmap(body)
    assert caught.value.problems == [
        "spec.providers[0].apiKey: in a cluster keys come from secretKeyRef (env and file are for standalone sidecars)"
    ]


def test_equal_policies_render_byte_identical_configmaps() -> None:
    assert build_configmap(policy_body()) == build_configmap(policy_body())


def test_configmap_patch_is_none_when_nothing_the_operator_owns_changed() -> None:
    desired = build_configmap(policy_body())
    existing = json.loads(json.dumps(desired))
    existing["metadata"]["labels"]["team"] = "someone-else"  # foreign keys are left alone
    existing["metadata"]["resourceVersion"] = "7"
    assert configmap_patch(existing, desired) is None


def test_configmap_patch_carries_new_data_and_hash_and_keeps_foreign_owners() -> None:
    old = build_configmap(policy_body())
    old["metadata"]["ownerReferences"] = [{"uid": "other", "name": "x"}]
    body = policy_body()
    body["spec"]["routes"][0]["budget"] = "6s"
    new = build_configmap(body)
    new["metadata"]["ownerReferences"] = [{"uid": "mine", "name": "support-bot"}]

    patch = configmap_patch(old, new)

    assert patch is not None
    assert patch["data"] == new["data"]
    assert patch["metadata"]["annotations"] == new["metadata"]["annotations"]
    assert [ref["uid"] for ref in patch["metadata"]["ownerReferences"]] == ["other", "mine"]


def test_ready_status_reports_hash_routes_generation_and_all_conditions() -> None:
    policy = load_policy(policy_body())
    status = build_status(None, policy=policy, generation=4, now=T0, configmap="support-bot-llmroute")

    assert status["observedGeneration"] == 4
    assert status["configHash"] == policy.config_hash
    assert status["configMap"] == "support-bot-llmroute"
    assert status["routes"] == ["chat"]
    conditions = by_type(status)
    assert [c["type"] for c in status["conditions"]] == [
        "Ready", "HotHotRouting", "BudgetOutOfRange", "MissingSecret", "ServingLastGood",
    ]  # fmt: skip
    assert status["secretKeyRefs"] == [
        {"provider": "claude", "name": "llm-keys", "key": "anthropic"},
        {"provider": "gpt", "name": "llm-keys", "key": "openai"},
    ]
    assert conditions["Ready"]["status"] == "True"
    assert all(
        c["observedGeneration"] == 4 and c["lastTransitionTime"] == "2026-01-01T12:00:00Z" for c in conditions.values()
    )
    assert {c["status"] for t, c in conditions.items() if t != "Ready"} == {"False"}


def test_last_transition_time_moves_only_when_a_condition_changes_status() -> None:
    policy = load_policy(policy_body())
    first = build_status(None, policy=policy, generation=1, now=T0, configmap="cm")
    second = build_status(first, policy=policy, generation=2, now=T1, configmap="cm", missing=['Secret "k" not found'])

    conditions = by_type(second)
    assert conditions["Ready"]["lastTransitionTime"] == "2026-01-01T12:00:00Z"  # still True
    assert conditions["Ready"]["observedGeneration"] == 2
    assert conditions["MissingSecret"]["status"] == "True"
    assert conditions["MissingSecret"]["lastTransitionTime"] == "2026-01-01T12:05:00Z"
    assert has_missing_secret(second)


def test_invalid_policy_turns_ready_false_and_keeps_the_last_good_config_fields() -> None:
    good = build_status(None, policy=load_policy(policy_body()), generation=1, now=T0, configmap="cm")
    error = PolicyError(['spec.routes[0].targets[1].provider: unknown provider "gtp"'])

    bad = build_status(good, policy=error, generation=2, now=T1, configmap="cm")

    assert "configHash" not in bad and "routes" not in bad  # the merge keeps the last good ones
    ready = by_type(bad)["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "InvalidPolicy")
    assert "spec.routes[0].targets[1].provider" in ready["message"]
    assert ready["lastTransitionTime"] == "2026-01-01T12:05:00Z"
    assert by_type(bad)["MissingSecret"] == by_type(good)["MissingSecret"]  # not re-evaluated


def test_hot_hot_routes_and_odd_budgets_raise_warning_conditions() -> None:
    body = policy_body()
    route = body["spec"]["routes"][0]
    route.update(strategy="hotHot", acknowledgeOutputVariance=True, budget="30s")
    status = build_status(None, policy=load_policy(body), generation=1, now=T0, configmap="cm")

    conditions = by_type(status)
    assert conditions["HotHotRouting"]["status"] == "True"
    assert "spec.routes[0].strategy" in conditions["HotHotRouting"]["message"]
    assert conditions["BudgetOutOfRange"]["status"] == "True"
    assert "30s" in conditions["BudgetOutOfRange"]["message"]
    assert conditions["Ready"]["status"] == "True"  # warnings, not failures
    assert status["warnings"]


def test_a_configmap_owned_by_someone_else_makes_the_policy_not_ready() -> None:
    status = build_status(
        None, policy=load_policy(policy_body()), generation=1, now=T0, configmap="cm",
        configmap_error="ConfigMap cm exists and is not managed by llmroute",
    )  # fmt: skip
    assert by_type(status)["Ready"]["reason"] == "ConfigMapConflict"
    # someone else's ConfigMap: the webhook must not inject from it (None removes the fields in the merge)
    assert status["configHash"] is None and status["secretKeyRefs"] is None


def test_an_invalid_edit_of_a_rendered_policy_says_pods_get_the_last_good_config() -> None:
    good = build_status(None, policy=load_policy(policy_body()), generation=1, now=T0, configmap="cm")
    error = PolicyError(["spec.providers[0].apiKey: in a cluster keys come from secretKeyRef"])

    status = build_status(good, policy=error, generation=2, now=T0, configmap="cm")

    assert "configHash" not in status and "secretKeyRefs" not in status  # the merge keeps the last good ones
    serving = by_type(status)["ServingLastGood"]
    assert serving["status"] == "True" and serving["reason"] == "InvalidPolicy"
    assert good["configHash"] in serving["message"]
    never = build_status(None, policy=error, generation=1, now=T0, configmap="cm")
    assert "ServingLastGood" not in by_type(never)


def test_missing_secrets_names_absent_secrets_once_and_absent_keys() -> None:
    body = policy_body()
    body["spec"]["providers"].append(
        {"name": "gem", "type": "gemini", "apiKey": {"secretKeyRef": {"name": "other", "key": "g"}}}
    )
    references = referenced_secrets(load_policy(body))
    assert references == [("llm-keys", "anthropic"), ("llm-keys", "openai"), ("other", "g")]

    assert missing_secrets(references, {"llm-keys": None, "other": ["g"]}) == ['Secret "llm-keys" not found']
    assert missing_secrets(references, {"llm-keys": ["anthropic"], "other": []}) == [
        'Secret "llm-keys" has no key "openai"',
        'Secret "other" has no key "g"',
    ]


def test_uninjected_pods_are_the_running_opted_in_ones_without_the_sidecar() -> None:
    def pod(name: str, namespace: str = "apps", phase: str = "Running", host: bool = False, **notes: str) -> Any:
        return {
            "metadata": {"name": name, "namespace": namespace, "annotations": {"llmroute.dev/policy": "bot", **notes}},
            "spec": {"hostNetwork": host},
            "status": {"phase": phase},
        }

    pods = [
        pod("bare"),
        pod("injected", **{"llmroute.dev/injected": "bot@1"}),
        pod("done", phase="Succeeded"),
        pod("opted-out", **{"llmroute.dev/inject": "false"}),
        pod("host", host=True),
        pod("host-asked", host=True, **{"llmroute.dev/inject-host-network": "true"}),
        pod("system", namespace="kube-system"),
        {"metadata": {"name": "no-policy", "namespace": "apps"}},
    ]
    assert uninjected_pods(pods, ["kube-system"]) == {("apps", "bot"): ["bare", "host-asked"]}
    assert uninjected_condition([]).status == "False"
    many = uninjected_condition([f"p{i}" for i in range(7)])
    assert many.status == "True" and "7 running pod(s)" in many.message and "and 2 more" in many.message
