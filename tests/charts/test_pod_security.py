"""`helm template` with defaults passes the restricted Pod Security Standard, and so does an app pod after
the webhook injected the sidecar (a namespace enforcing `restricted` would refuse it otherwise)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from tests.charts.pod_security import restricted_violations
from tests.charts.test_chart import VARIANTS, render

from llmroute_operator.injection import inject
from llmroute_operator.settings import Settings
from llmroute_sidecar.policy import load_policy

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod"}


def pod_templates(manifests: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    templates = []
    for manifest in manifests:
        if manifest["kind"] in WORKLOADS:
            template = manifest if manifest["kind"] == "Pod" else manifest["spec"]["template"]
            templates.append((f"{manifest['kind']}/{manifest['metadata']['name']}", template))
    return templates


def test_helm_template_with_defaults_passes_the_restricted_profile() -> None:
    templates = pod_templates(render())
    assert {name for name, _ in templates} == {"Deployment/llmroute-operator", "Deployment/llmroute-webhook"}
    for name, template in templates:
        assert restricted_violations(template) == [], name


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_chart_variant_passes_the_restricted_profile(variant: str) -> None:
    for name, template in pod_templates(render(*VARIANTS[variant])):
        assert restricted_violations(template) == [], name


def restricted_app() -> dict[str, Any]:
    """An app pod that a `restricted` namespace admits."""
    return {
        "metadata": {"annotations": {"llmroute.dev/policy": "support-bot"}, "labels": {"llmroute.dev/inject": "true"}},
        "spec": {
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "app",
                    "image": "app:1",
                    "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                }
            ],
        },
    }


def test_the_injected_sidecar_keeps_a_restricted_pod_restricted() -> None:
    policy = load_policy({
        "metadata": {"name": "support-bot"},
        "spec": {
            "providers": [{"name": "claude", "type": "anthropic", "apiKey": {"secretKeyRef": {"name": "k", "key": "a"}}}],
            "routes": [{"name": "chat", "targets": [{"name": "primary", "provider": "claude"}]}],
        },
    })  # fmt: skip
    app = restricted_app()
    assert restricted_violations(app) == []

    injected = inject(app, policy, Settings())

    assert injected["spec"]["initContainers"][0]["name"] == "llmroute"
    assert restricted_violations(injected) == []
    # also in a pod that sets nothing at pod level: the sidecar's own context is enough for itself
    bare = restricted_app()
    bare["spec"]["securityContext"] = {}
    sidecar_only = inject(bare, policy, Settings())
    assert [v for v in restricted_violations(sidecar_only) if "initContainers" in v] == []


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(pod: dict[str, Any]) -> None:
        node: Any = pod
        *parents, last = path.split(".")
        for part in parents:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        node[last] = value

    return apply


@pytest.mark.parametrize(
    ("change", "control"),
    [
        (_set("spec.hostNetwork", True), "host namespaces"),
        (_set("spec.volumes", [{"name": "h", "hostPath": {"path": "/"}}]), "hostPath volumes"),
        (_set("spec.containers.0.securityContext.privileged", True), "privileged"),
        (_set("spec.containers.0.securityContext.runAsUser", 0), "runAsUser"),
        (_set("spec.securityContext.runAsNonRoot", False), "runAsNonRoot"),
        (_set("spec.containers.0.securityContext.capabilities", {"drop": ["NET_RAW"]}), "capabilities"),
        (_set("spec.containers.0.securityContext.capabilities.add", ["SYS_ADMIN"]), "capabilities"),
        (_set("spec.containers.0.securityContext.allowPrivilegeEscalation", True), "privilege escalation"),
        (_set("spec.securityContext.seccompProfile", {"type": "Unconfined"}), "seccomp"),
        (_set("spec.containers.0.ports", [{"containerPort": 80, "hostPort": 80}]), "host ports"),
        (_set("spec.volumes", [{"name": "n", "nfs": {"server": "x", "path": "/"}}]), "volume types"),
        (_set("spec.securityContext.sysctls", [{"name": "kernel.msgmax", "value": "1"}]), "sysctls"),
    ],
)
def test_the_check_catches_each_control(change: Callable[[dict[str, Any]], None], control: str) -> None:
    pod = copy.deepcopy(restricted_app())
    change(pod)
    assert any(v.startswith(control) for v in restricted_violations(pod)), restricted_violations(pod)
