"""Every example users copy works: policies pass the CRD (schema + CEL) and the sidecar's loader,
other manifests pass Kubernetes' own schemas."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml
from tests.crds.apiserver import ROOT, admit

from llmroute_sidecar.policy import KIND, load_policy

EXAMPLES = ROOT / "examples"
KUBERNETES_VERSION = "1.33"


def documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for index, document in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            if isinstance(document, dict) and "kind" in document and "apiVersion" in document:
                found.append((f"{path.name}#{index}", document))
    return found


DOCUMENTS = documents()
POLICIES = [(name, doc) for name, doc in DOCUMENTS if doc["kind"] == KIND]
MANIFESTS = [(name, doc) for name, doc in DOCUMENTS if doc["kind"] != KIND]


def test_the_promised_examples_exist() -> None:
    names = {path.name for path in EXAMPLES.glob("*.yaml")}
    assert {"standalone.yaml", "cluster-policy.yaml", "deployment.yaml", "quorum.yaml"} <= names
    assert len(POLICIES) >= 3


@pytest.mark.parametrize(("name", "document"), POLICIES, ids=[n for n, _ in POLICIES])
def test_example_policy_passes_the_crd_and_loads_in_the_sidecar(name: str, document: dict[str, Any]) -> None:
    admission = admit(document)
    assert admission.errors == []
    policy = load_policy(document)
    assert policy.name == document["metadata"]["name"]
    assert load_policy(admission.stored).config_hash == policy.config_hash  # CRD defaults change nothing


@pytest.mark.parametrize(("name", "document"), MANIFESTS, ids=[n for n, _ in MANIFESTS])
def test_example_manifest_is_valid_kubernetes(name: str, document: dict[str, Any]) -> None:
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_standalone_uses_env_keys_and_cluster_policy_uses_secrets() -> None:
    standalone = load_policy(yaml.safe_load((EXAMPLES / "standalone.yaml").read_text(encoding="utf-8"))).spec
    cluster = load_policy(yaml.safe_load((EXAMPLES / "cluster-policy.yaml").read_text(encoding="utf-8"))).spec
    assert all(p.api_key and p.api_key.env for p in standalone.providers)
    assert all(p.api_key and p.api_key.secret_key_ref for p in cluster.providers)
    assert [r.name for r in standalone.routes] == [r.name for r in cluster.routes] == ["chat", "summarize"]
    assert standalone.default_route == "chat"
    chat = standalone.routes[0]
    assert chat.strategy == "retryAndShed" and chat.targets[1].degraded
    assert chat.targets[0].prompt and chat.targets[1].prompt
    assert chat.targets[0].prompt.system != chat.targets[1].prompt.system
    summarize = standalone.route("summarize")
    assert summarize and all("{{ text }}" in (t.prompt.template or "") for t in summarize.targets if t.prompt)


def test_deployment_example_asks_for_an_example_policy() -> None:
    [deployment] = [doc for name, doc in MANIFESTS if name.startswith("deployment.yaml")]
    policy = deployment["spec"]["template"]["metadata"]["annotations"]["llmroute.dev/policy"]
    assert policy == "support-bot"
    assert policy in {doc["metadata"]["name"] for _, doc in POLICIES}


def test_quorum_example_has_a_quorum_block_with_hedging() -> None:
    spec = load_policy(yaml.safe_load((EXAMPLES / "quorum.yaml").read_text(encoding="utf-8"))).spec
    quorums = [route.quorum for route in spec.routes if route.quorum]
    assert quorums and any(q.hedge_after for q in quorums)
