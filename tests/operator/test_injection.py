"""The pod mutation as a pure function: assertions on the patched pod, never on patch text."""

from __future__ import annotations

import copy
from dataclasses import replace
from decimal import Decimal
from typing import Any

import jsonpatch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmroute_operator.injection import (
    KEYS_VOLUME,
    PLACEHOLDER_KEY,
    RESERVED_VOLUMES,
    SIDECAR_NAME,
    InjectionConflict,
    host_network_skip,
    inject,
    injection_conflicts,
    json_patch,
    parse_quantity,
    requested_policy,
    sidecar_resources,
)
from llmroute_operator.settings import Settings
from llmroute_sidecar.policy import LoadedPolicy, load_policy

from .conftest import policy_body

SETTINGS = Settings(sidecar_image="registry.example/llmroute:1.2.3", status_relay="http://relay.llmroute:8080")


def a_pod(**annotations: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "support-bot-7d9f-",
            "labels": {"app": "support-bot"},
            "annotations": {"llmroute.dev/policy": "support-bot", **annotations},
        },
        "spec": {
            "initContainers": [{"name": "migrate", "image": "app:1"}],
            "containers": [
                {"name": "app", "image": "app:1", "env": [{"name": "OPENAI_BASE_URL", "value": "http://mine"}]},
                {"name": "worker", "image": "app:1"},
            ],
            "volumes": [{"name": "data", "emptyDir": {}}],
        },
    }


def policy() -> LoadedPolicy:
    body = policy_body()
    body["metadata"]["generation"] = 2
    return load_policy(body)


def patched(pod: dict[str, Any]) -> dict[str, Any]:
    """What the API server stores: the webhook's patch applied to the pod it was given."""
    patch = json_patch(pod, inject(pod, policy(), SETTINGS))
    result: dict[str, Any] = jsonpatch.apply_patch(pod, patch, in_place=False)
    return result


def env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_the_sidecar_is_a_native_sidecar_started_before_the_other_init_containers() -> None:
    pod = patched(a_pod())

    sidecar, migrate = pod["spec"]["initContainers"]
    assert migrate["name"] == "migrate"
    assert sidecar["name"] == "llmroute"
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == "registry.example/llmroute:1.2.3"
    assert sidecar["args"] == ["sidecar", "--policy", "/etc/llmroute/policy.json"]
    assert pod["metadata"]["annotations"]["llmroute.dev/injected"] == f"support-bot@{policy().config_hash}"


def test_the_policy_configmap_is_mounted_read_only_as_a_whole_directory() -> None:
    pod = patched(a_pod())

    sidecar = pod["spec"]["initContainers"][0]
    [mount] = [m for m in sidecar["volumeMounts"] if m["mountPath"] == "/etc/llmroute"]
    assert mount["readOnly"] is True and "subPath" not in mount
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes[mount["name"]]["configMap"]["name"] == "support-bot-llmroute"
    assert "data" in volumes  # the app's own volumes stay


def test_provider_keys_reach_the_sidecar_only() -> None:
    pod = patched(a_pod())

    sidecar_env = env(pod["spec"]["initContainers"][0])
    assert sidecar_env["LLMROUTE_KEY_CLAUDE"] == {
        "secretKeyRef": {"name": "llm-keys", "key": "anthropic", "optional": True}
    }
    assert sidecar_env["LLMROUTE_KEY_GPT"]["secretKeyRef"]["key"] == "openai"
    assert sidecar_env["LLMROUTE_LISTEN"] == "127.0.0.1:8787"
    assert sidecar_env["LLMROUTE_STATUS_RELAY"] == "http://relay.llmroute:8080"
    for container in pod["spec"]["containers"] + pod["spec"]["initContainers"][1:]:
        assert not any(name.startswith("LLMROUTE_KEY_") for name in env(container))
        assert "secretKeyRef" not in str(container)


def test_provider_keys_are_also_files_of_a_projected_volume_only_the_sidecar_mounts() -> None:
    """Files follow a rotated Secret (the kubelet updates projected volumes); env vars never do."""
    pod = patched(a_pod())

    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    sidecar = pod["spec"]["initContainers"][0]
    [mount] = [m for m in sidecar["volumeMounts"] if m["mountPath"] == "/var/run/llmroute/keys"]
    assert mount["readOnly"] is True and "subPath" not in mount
    sources = volumes[mount["name"]]["projected"]["sources"]
    assert sources == [
        {"secret": {"name": "llm-keys", "items": [{"key": "anthropic", "path": "claude"}], "optional": True}},
        {"secret": {"name": "llm-keys", "items": [{"key": "openai", "path": "gpt"}], "optional": True}},
    ]
    for container in pod["spec"]["containers"] + pod["spec"]["initContainers"][1:]:
        assert all(m["name"] != mount["name"] for m in container.get("volumeMounts", []))
    assert patched(pod) == pod  # re-admission adds no second volume


def test_app_containers_get_the_sidecar_urls_and_placeholder_keys_unless_they_set_their_own() -> None:
    pod = patched(a_pod())

    app, worker = (env(c) for c in pod["spec"]["containers"])
    assert app["OPENAI_BASE_URL"] == "http://mine"  # the app's own setting is kept
    assert worker["OPENAI_BASE_URL"] == "http://127.0.0.1:8787/openai/v1"
    for container_env in (app, worker):
        assert container_env["LLMROUTE_URL"] == "http://127.0.0.1:8787"
        assert container_env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:8787/anthropic"
        assert container_env["ANTHROPIC_API_KEY"] == PLACEHOLDER_KEY
        assert container_env["OPENAI_API_KEY"] == PLACEHOLDER_KEY
    assert "LLMROUTE_URL" not in env(pod["spec"]["initContainers"][1])  # other init containers untouched


def test_the_sidecar_is_probed_hardened_and_bounded() -> None:
    sidecar = patched(a_pod())["spec"]["initContainers"][0]

    # httpGet on the probe-only listener of the pod IP: no interpreter started per probe
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8788}
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/healthz", "port": 8788}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8788}
    assert env(sidecar)["LLMROUTE_HEALTH_LISTEN"] == "0.0.0.0:8788"
    assert env(sidecar)["LLMROUTE_LISTEN"] == "127.0.0.1:8787"  # the API that spends the keys stays on loopback
    security = sidecar["securityContext"]
    assert "runAsUser" not in security and "runAsGroup" not in security  # the image's, or the platform's
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sidecar["resources"] == {"requests": {"cpu": "50m", "memory": "96Mi"}, "limits": {"memory": "384Mi"}}


def test_a_fixed_uid_is_set_only_when_configured() -> None:
    pod = a_pod()
    security = inject(pod, policy(), replace(SETTINGS, sidecar_user=1001))["spec"]["initContainers"][0]["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"]) == (1001, 1001)


def test_pod_annotations_override_the_sidecar_resources() -> None:
    pod = a_pod(**{
        "llmroute.dev/sidecar-memory-request": "200Mi",
        "llmroute.dev/sidecar-cpu-limit": "1",
        "llmroute.dev/sidecar-cpu-request": "lots",
    })  # fmt: skip
    sidecar = inject(pod, policy(), SETTINGS)["spec"]["initContainers"][0]
    assert sidecar["resources"] == {
        "requests": {"cpu": "50m", "memory": "200Mi"},
        "limits": {"memory": "384Mi", "cpu": "1"},
    }
    _, notes = sidecar_resources(pod, SETTINGS)
    assert notes == ["llmroute.dev/sidecar-cpu-request: 'lots' is not a Kubernetes quantity; the default is kept"]


def test_a_request_above_the_limit_raises_the_limit_so_the_pod_stays_valid() -> None:
    pod = a_pod(**{"llmroute.dev/sidecar-memory-request": "0.5Gi"})
    resources, notes = sidecar_resources(pod, SETTINGS)
    assert resources["limits"]["memory"] == "0.5Gi"
    assert notes == ["the sidecar's memory limit 384Mi is below its request 0.5Gi; raised to it"]


@pytest.mark.parametrize(
    ("text", "value"),
    [("100m", "0.1"), ("128Mi", str(128 * 2**20)), ("1.5", "1.5"), ("2k", "2000"), ("1e3", None), ("-1", None), ("", None)],
)
def test_quantities(text: str, value: str | None) -> None:
    parsed = parse_quantity(text)
    assert (None if parsed is None else parsed) == (None if value is None else Decimal(value))


def test_host_network_pods_are_skipped_unless_they_ask() -> None:
    pod = a_pod()
    pod["spec"]["hostNetwork"] = True
    assert host_network_skip(pod) is not None and "llmroute.dev/inject-host-network" in str(host_network_skip(pod))
    pod["metadata"]["annotations"]["llmroute.dev/inject-host-network"] = "true"
    assert host_network_skip(pod) is None
    sidecar = inject(pod, policy(), SETTINGS)["spec"]["initContainers"][0]
    # no listener on the node's own network: exec probes over loopback instead
    assert "exec" in sidecar["readinessProbe"] and "LLMROUTE_HEALTH_LISTEN" not in env(sidecar)


def test_a_pod_already_using_a_sidecar_port_is_not_injected() -> None:
    pod = a_pod()
    pod["spec"]["containers"][0]["ports"] = [{"containerPort": 8788}]
    assert injection_conflicts(pod, (8787, 8788)) == ['container "app" declares port 8788']
    with pytest.raises(InjectionConflict):
        inject(pod, policy(), SETTINGS)


def test_an_injected_pod_is_returned_unchanged() -> None:
    once = patched(a_pod())

    assert inject(once, policy(), SETTINGS) == once
    assert json_patch(once, inject(once, policy(), SETTINGS)) == []
    assert requested_policy(once) is None


def test_opting_out_leaves_the_pod_alone() -> None:
    pod = a_pod(**{"llmroute.dev/inject": "false"})

    assert requested_policy(pod) is None
    assert inject(pod, policy(), SETTINGS) == pod
    assert patched(copy.deepcopy(pod)) == pod


def test_the_opt_out_label_leaves_the_pod_alone() -> None:
    """In a namespace labelled for injection, a pod opts out with the label the webhook selector reads."""
    pod = a_pod()
    pod["metadata"]["labels"]["llmroute.dev/inject"] = "false"

    assert requested_policy(pod) is None
    assert inject(pod, policy(), SETTINGS) == pod


def test_a_pod_without_annotations_asks_for_nothing() -> None:
    assert requested_policy({"metadata": {}, "spec": {"containers": []}}) is None


def test_json_patch_escapes_annotation_keys_and_round_trips() -> None:
    old = {"metadata": {"annotations": {"a/b": "1", "c~d": "2"}}, "spec": {"x": [1, 2]}}
    new = {"metadata": {"annotations": {"a/b": "3", "e/f": "4"}}, "spec": {"x": [1, 2, 3]}}

    patch = json_patch(old, new)

    assert jsonpatch.apply_patch(old, patch, in_place=False) == new
    assert {"op": "remove", "path": "/metadata/annotations/c~0d"} in patch


def test_a_pod_with_a_volume_of_the_sidecars_name_is_not_injected() -> None:
    """Replacing the app's `llmroute-keys` volume with ours would hand the keys to the app container."""
    pod = a_pod()
    pod["spec"]["volumes"].append({"name": "llmroute-keys", "emptyDir": {}})
    pod["spec"]["containers"][1]["volumeMounts"] = [{"name": "llmroute-keys", "mountPath": "/keys"}]

    assert injection_conflicts(pod) == [
        'the pod already has a volume named "llmroute-keys"',
        'container "worker" mounts a volume named "llmroute-keys"',
    ]
    with pytest.raises(InjectionConflict, match="llmroute-keys"):
        inject(pod, policy(), SETTINGS)


def test_a_mount_of_a_sidecar_volume_name_conflicts_even_without_the_volume() -> None:
    """The API server validates after mutation: our volume would satisfy the app's dangling mount."""
    pod = a_pod()
    pod["spec"]["initContainers"][0]["volumeMounts"] = [{"name": "llmroute-policy", "mountPath": "/p"}]

    assert injection_conflicts(pod) == ['container "migrate" mounts a volume named "llmroute-policy"']


def test_an_app_container_named_like_the_sidecar_conflicts() -> None:
    pod = a_pod()
    pod["spec"]["containers"][0]["name"] = "llmroute"

    assert injection_conflicts(pod) == ['the pod already has a container named "llmroute"']


def test_an_injected_pod_has_no_conflicts_with_itself() -> None:
    assert injection_conflicts(a_pod()) == []
    assert patched(patched(a_pod())) == patched(a_pod())


NAMES = st.sampled_from(["data", "cache", *RESERVED_VOLUMES])


@st.composite
def pods(draw: st.DrawFn) -> dict[str, Any]:
    """Annotated pods whose volumes and mounts use any mix of the app's and the sidecar's names."""

    def containers(prefix: str, count: int) -> list[dict[str, Any]]:
        return [
            {
                "name": draw(st.sampled_from([f"{prefix}{index}", SIDECAR_NAME]))
                if prefix == "app"
                else f"{prefix}{index}",
                "image": "app:1",
                "volumeMounts": [
                    {"name": name, "mountPath": f"/m{position}"}
                    for position, name in enumerate(draw(st.lists(NAMES, max_size=3, unique=True)))
                ],
            }
            for index in range(count)
        ]

    pod = a_pod()
    pod["spec"] = {
        "initContainers": containers("init", draw(st.integers(0, 2))),
        "containers": containers("app", draw(st.integers(1, 3))),
        "volumes": [{"name": name, "emptyDir": {}} for name in draw(st.lists(NAMES, max_size=4, unique=True))],
    }
    return pod


@settings(max_examples=300, deadline=None)
@given(pods())
def test_no_app_container_ever_mounts_the_keys_volume(pod: dict[str, Any]) -> None:
    """Whatever names the pod uses: either it is not injected, or only the sidecar mounts our volumes."""
    if injection_conflicts(pod):
        with pytest.raises(InjectionConflict):
            inject(pod, policy(), SETTINGS)
        return
    result = patched(pod)
    sidecar, *others = result["spec"]["initContainers"]
    assert sidecar["name"] == SIDECAR_NAME
    assert KEYS_VOLUME in {m["name"] for m in sidecar["volumeMounts"]}
    for container in others + result["spec"]["containers"]:
        assert not {m["name"] for m in container.get("volumeMounts", [])} & set(RESERVED_VOLUMES)
    [keys] = [v for v in result["spec"]["volumes"] if v["name"] == KEYS_VOLUME]
    assert "projected" in keys
