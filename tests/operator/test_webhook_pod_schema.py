"""A pod as the webhook patches it passes Kubernetes' own Pod schema (strict: no unknown fields).

The whole admission decision runs (`review_pod`, Ready check included); its JSONPatch is applied the
way the API server applies it, and the stored pod, native sidecar and projected keys volume included,
is validated offline with kubernetes-validate for the Kubernetes version the examples target.
"""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import yaml

from llmroute_operator.settings import Settings
from llmroute_operator.webhooks import PolicyCache, admission_response, review_pod

from .conftest import NAMESPACE, policy_body
from .test_webhook_http import a_pod, ready_status, review

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
KUBERNETES_VERSION = "1.33"  # as tests/crds/test_examples.py
SETTINGS = Settings(sidecar_image="registry.example/llmroute:1.2.3", status_relay="http://relay.llmroute:8080")


class OnePolicy:
    def __init__(self, body: dict[str, Any]) -> None:
        self.body = copy.deepcopy(body)
        self.body["metadata"]["namespace"] = NAMESPACE
        self.body["status"] = ready_status(self.body)

    async def read_policy(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.body if name == self.body["metadata"]["name"] else None

    async def list_policies(self) -> list[dict[str, Any]]:
        return [self.body]


def example(name: str, kind: str) -> dict[str, Any]:
    documents = yaml.safe_load_all((EXAMPLES / name).read_text(encoding="utf-8"))
    [document] = [d for d in documents if isinstance(d, dict) and d.get("kind") == kind]
    return dict(document)


def example_pod() -> dict[str, Any]:
    """A pod of examples/deployment.yaml, as its ReplicaSet creates it."""
    template = example("deployment.yaml", "Deployment")["spec"]["template"]
    metadata = {**template["metadata"], "generateName": "support-bot-5c7d-", "namespace": NAMESPACE}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}


CASES = {
    "test-pod": (policy_body(), a_pod()),
    "examples": (example("cluster-policy.yaml", "LLMRoutePolicy"), example_pod()),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_the_patched_pod_is_a_valid_kubernetes_pod(case: str) -> None:
    body, pod = CASES[case]
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)  # valid before, so the patch is judged

    verdict = await review_pod(review(pod)["request"], SETTINGS, PolicyCache(OnePolicy(body), ttl=5))
    response = admission_response("uid", verdict)["response"]
    patch = json.loads(base64.b64decode(response["patch"]))
    patched: dict[str, Any] = jsonpatch.apply_patch(pod, patch, in_place=False)

    volumes = {volume["name"]: volume for volume in patched["spec"]["volumes"]}
    assert volumes["llmroute-keys"]["projected"]["sources"]  # the keys volume is part of what is validated
    assert patched["spec"]["initContainers"][0]["restartPolicy"] == "Always"
    kubernetes_validate.validate(patched, KUBERNETES_VERSION, strict=True)


async def test_the_validator_would_catch_a_broken_sidecar() -> None:
    """The check above has teeth: an unknown field in the injected container is rejected."""
    body, pod = CASES["test-pod"]
    verdict = await review_pod(review(pod)["request"], SETTINGS, PolicyCache(OnePolicy(body), ttl=5))
    patched: dict[str, Any] = jsonpatch.apply_patch(pod, verdict.patch or [], in_place=False)
    patched["spec"]["initContainers"][0]["restartPolicyy"] = "Always"

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(patched, KUBERNETES_VERSION, strict=True)
