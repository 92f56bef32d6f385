"""The pod mutation, as one pure function: a pod in, the injected pod out.

The admission server calls `inject` and turns the difference into a JSONPatch (`json_patch`);
nothing here talks to the network, so every rule is tested on plain dicts:

- the sidecar is a native sidecar (first `initContainers` entry with `restartPolicy: Always`): it
  starts before the app and stops after it;
- it reads `policy.json` from the policy's ConfigMap, mounted read-only as a whole directory (a
  `subPath` mount would never see updates);
- the provider keys reach the sidecar only, as `secretKeyRef` env vars and as files of a projected
  Secret volume mounted in the sidecar alone (the kubelet updates the files when a Secret rotates, so
  running sidecars pick up a new key without a restart; only the referenced keys are projected). Both
  are optional: a missing key degrades that provider, the policy's MissingSecret condition says why,
  and the pod still starts;
- app containers get the sidecar's URLs and placeholder SDK keys, each only where they do not set
  the variable themselves;
- `llmroute.dev/injected: <policy>@<configHash>` marks the pod, so re-admission changes nothing;
- a pod that already uses one of the sidecar's names (`RESERVED_VOLUMES`, the `llmroute` container)
  is not injected at all (`injection_conflicts`): replacing its volume would hand the API keys to
  whichever app container mounts that name.

The sidecar listens on loopback only (it spends the keys; no other pod may reach it). The kubelet's
`httpGet` probes go to the pod IP, so the sidecar also serves `/healthz` and `/readyz`, and nothing
else, on `settings.sidecar_health_port` of the pod IP (`LLMROUTE_HEALTH_LISTEN`): no interpreter is
started per probe. A host-network pod (injected only when it asks, `HOST_NETWORK_ANNOTATION`) would
open that port on the node, so it keeps exec probes. Resources come from the settings, overridden per
pod by `RESOURCE_ANNOTATIONS`; the security context names no uid (the image's, or the platform's).
Its metrics-only listener (`Settings.sidecar_metrics_port`, container port `llmroute-metric`) also
listens on the pod IP, for the chart's PodMonitor: app containers need no change to be scraped.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from llmroute_sidecar.policy import KEY_MOUNT_DIR, LoadedPolicy, key_env_var

from . import (
    HOST_NETWORK_ANNOTATION,
    INJECT_ANNOTATION,
    INJECTED_ANNOTATION,
    POLICY_ANNOTATION,
    RESOURCE_ANNOTATIONS,
)
from .reconcile import configmap_name
from .settings import POLICY_FILE, POLICY_MOUNT_DIR, SIDECAR_LISTEN, SIDECAR_METRICS_PORT_NAME, SIDECAR_PORT, Settings

SIDECAR_NAME = "llmroute"
POLICY_VOLUME = "llmroute-policy"
TMP_VOLUME = "llmroute-tmp"
KEYS_VOLUME = "llmroute-keys"
RESERVED_VOLUMES = (POLICY_VOLUME, TMP_VOLUME, KEYS_VOLUME)
PLACEHOLDER_KEY = "llmroute-sidecar-holds-the-key"
SIDECAR_URL = f"http://127.0.0.1:{SIDECAR_PORT}"

APP_ENV: dict[str, str] = {
    "LLMROUTE_URL": SIDECAR_URL,
    "ANTHROPIC_BASE_URL": f"{SIDECAR_URL}/anthropic",
    "OPENAI_BASE_URL": f"{SIDECAR_URL}/openai/v1",
    "ANTHROPIC_API_KEY": PLACEHOLDER_KEY,
    "OPENAI_API_KEY": PLACEHOLDER_KEY,
}
"""Set in every app container unless it sets the variable itself."""

_PROBE_SCRIPT = f"import sys, urllib.request; urllib.request.urlopen('{SIDECAR_URL}' + sys.argv[1], timeout=2)"


@dataclass(frozen=True)
class SecretKey:
    """One provider's key: Secret `name`, its `key`, given to the sidecar as that provider's."""

    provider: str
    name: str
    key: str


@dataclass(frozen=True)
class SidecarSource:
    """What the injected sidecar is built from: the policy's name, the configHash its ConfigMap holds, and
    the Secret keys of its providers. Taken from the current spec when the ConfigMap holds it, else from
    the last good config the operator recorded in the policy's status (`last_good_source`)."""

    policy: str
    config_hash: str
    secret_keys: tuple[SecretKey, ...]

    @classmethod
    def of(cls, policy: LoadedPolicy) -> SidecarSource:
        keys = []
        for provider in policy.spec.providers:
            ref = provider.api_key.secret_key_ref if provider.api_key else None
            if ref is not None:
                keys.append(SecretKey(provider.name, ref.name, ref.key))
        return cls(policy.name, policy.config_hash, tuple(keys))


def last_good_source(name: str, status: Mapping[str, Any]) -> SidecarSource | None:
    """The last config the operator wrote into the policy's ConfigMap, from `status.configHash` and
    `status.secretKeyRefs` (written together, only after the ConfigMap); None when there never was one."""
    config_hash = status.get("configHash")
    refs = status.get("secretKeyRefs")
    if not isinstance(config_hash, str) or not config_hash or not isinstance(refs, list):
        return None
    keys = []
    for ref in refs:
        if not isinstance(ref, Mapping) or not all(isinstance(ref.get(f), str) for f in ("provider", "name", "key")):
            return None
        keys.append(SecretKey(str(ref["provider"]), str(ref["name"]), str(ref["key"])))
    return SidecarSource(name, config_hash, tuple(keys))


def requested_policy(pod: Mapping[str, Any]) -> str | None:
    """The policy a pod asks for, or None: no annotation, opted out (label or annotation
    `llmroute.dev/inject: "false"`), or injected already."""
    metadata = pod.get("metadata") or {}
    annotations = metadata.get("annotations") or {}
    labels = metadata.get("labels") or {}
    name = annotations.get(POLICY_ANNOTATION)
    opted_out = any(str(m.get(INJECT_ANNOTATION, "")).strip().lower() == "false" for m in (annotations, labels))
    if not name or opted_out:
        return None
    if is_injected(pod):
        return None
    return str(name)


def is_injected(pod: Mapping[str, Any]) -> bool:
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    init_containers = (pod.get("spec") or {}).get("initContainers") or []
    return INJECTED_ANNOTATION in annotations or any(c.get("name") == SIDECAR_NAME for c in init_containers)


class InjectionConflict(ValueError):
    """The pod already uses a name the sidecar needs; the message lists which."""


def injection_conflicts(pod: Mapping[str, Any], ports: tuple[int, ...] = (SIDECAR_PORT,)) -> list[str]:
    """Why the sidecar cannot be added to this (not yet injected) pod: names or `ports` it already uses.

    A container mount of a reserved volume name counts even when the pod declares no such volume:
    the API server validates after mutation, so our volume would satisfy that mount.
    """
    spec = pod.get("spec") or {}
    problems = [
        f'the pod already has a volume named "{volume.get("name")}"'
        for volume in spec.get("volumes") or []
        if volume.get("name") in RESERVED_VOLUMES
    ]
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for container in spec.get(field) or []:
            if field == "containers" and container.get("name") == SIDECAR_NAME:
                problems.append(f'the pod already has a container named "{SIDECAR_NAME}"')
            for mount in (container.get("volumeMounts") or []) + (container.get("volumeDevices") or []):
                if mount.get("name") in RESERVED_VOLUMES:
                    problems.append(f'container "{container.get("name")}" mounts a volume named "{mount.get("name")}"')
            for port in container.get("ports") or []:
                if port.get("containerPort") in ports:
                    problems.append(f'container "{container.get("name")}" declares port {port.get("containerPort")}')
    return list(dict.fromkeys(problems))


def host_network_skip(pod: Mapping[str, Any]) -> str | None:
    """Why a host-network pod is not injected (None: it is not one, or it asked for the sidecar)."""
    if not (pod.get("spec") or {}).get("hostNetwork"):
        return None
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    if str(annotations.get(HOST_NETWORK_ANNOTATION, "")).strip().lower() == "true":
        return None
    return (
        "the pod uses the host network, where the sidecar would share the node's loopback with every "
        f'host-network pod; annotate it {HOST_NETWORK_ANNOTATION}: "true" to inject it anyway'
    )


_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_SUFFIX = {
    None: Decimal(1), "m": Decimal("0.001"), "k": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9),
    "T": Decimal(10**12), "P": Decimal(10**15), "E": Decimal(10**18), "Ki": Decimal(2**10), "Mi": Decimal(2**20),
    "Gi": Decimal(2**30), "Ti": Decimal(2**40), "Pi": Decimal(2**50), "Ei": Decimal(2**60),
}  # fmt: skip


def parse_quantity(text: str) -> Decimal | None:
    """A Kubernetes quantity (`100m`, `128Mi`, `1.5`) as a number, or None when it is not one we accept."""
    match = _QUANTITY.match(text.strip())
    if match is None:
        return None
    try:
        return Decimal(match.group(1)) * _SUFFIX[match.group(2)]
    except InvalidOperation:
        return None


def sidecar_resources(pod: Mapping[str, Any], settings: Settings) -> tuple[dict[str, dict[str, str]], list[str]]:
    """The sidecar's resources: the settings' with the pod's `RESOURCE_ANNOTATIONS` applied, and what
    was not applied, and why. A limit below its request would make the API server refuse the pod: the
    limit is raised to the request then."""
    resources = copy.deepcopy(settings.sidecar_resources)
    notes: list[str] = []
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    for annotation, (section, resource) in RESOURCE_ANNOTATIONS.items():
        if annotation not in annotations:
            continue
        value = str(annotations[annotation]).strip()
        if parse_quantity(value) is None:
            notes.append(f"{annotation}: {value!r} is not a Kubernetes quantity; the default is kept")
            continue
        resources.setdefault(section, {})[resource] = value
    for resource, request in (resources.get("requests") or {}).items():
        limit = (resources.get("limits") or {}).get(resource)
        wanted, ceiling = parse_quantity(request), parse_quantity(limit) if limit else None
        if wanted is not None and ceiling is not None and ceiling < wanted:
            resources["limits"][resource] = request
            notes.append(f"the sidecar's {resource} limit {limit} is below its request {request}; raised to it")
    return resources, notes


def sidecar_ports(settings: Settings) -> tuple[int, ...]:
    """The pod ports the sidecar listens on: its loopback API, its health port and its metrics port."""
    metrics = (settings.sidecar_metrics_port,) if settings.sidecar_metrics_port else ()
    return (SIDECAR_PORT, settings.sidecar_health_port, *metrics)


def _probe(path: str, *, period: int, failures: int, timeout: int = 3, port: int | None = None) -> dict[str, Any]:
    """An httpGet probe on the sidecar's health port, or (port None) an exec probe over loopback."""
    action: dict[str, Any] = (
        {"httpGet": {"path": path, "port": port}}
        if port is not None
        else {"exec": {"command": ["python", "-c", _PROBE_SCRIPT, path]}}
    )
    return {
        **action,
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": timeout,
    }


def sidecar_container(
    source: SidecarSource | LoadedPolicy, settings: Settings, pod: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The injected container for `pod` (pure: the same source, settings and pod give the same container)."""
    source = source if isinstance(source, SidecarSource) else SidecarSource.of(source)
    pod = pod or {}
    host_network = bool((pod.get("spec") or {}).get("hostNetwork"))
    # A host-network pod would open these on the node: it keeps exec probes and no metrics listener.
    health_port = None if host_network else settings.sidecar_health_port
    metrics_port = None if host_network else settings.sidecar_metrics_port
    env: list[dict[str, Any]] = [
        {"name": "LLMROUTE_LISTEN", "value": SIDECAR_LISTEN},
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
    ]
    if health_port is not None:
        env.append({"name": "LLMROUTE_HEALTH_LISTEN", "value": f"0.0.0.0:{health_port}"})
    if settings.status_relay:
        env.append({"name": "LLMROUTE_STATUS_RELAY", "value": settings.status_relay})
    if metrics_port:
        env.append({"name": "LLMROUTE_METRICS_LISTEN", "value": f"0.0.0.0:{metrics_port}"})
    for secret in source.secret_keys:
        env.append(
            {
                "name": key_env_var(secret.provider),
                "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key, "optional": True}},
            }
        )
    mounts: list[dict[str, Any]] = [
        {"name": POLICY_VOLUME, "mountPath": POLICY_MOUNT_DIR, "readOnly": True},
        {"name": TMP_VOLUME, "mountPath": "/tmp"},
    ]
    if source.secret_keys:
        mounts.append({"name": KEYS_VOLUME, "mountPath": KEY_MOUNT_DIR, "readOnly": True})
    container: dict[str, Any] = {
        "name": SIDECAR_NAME,
        "image": settings.sidecar_image,
        "imagePullPolicy": settings.sidecar_image_pull_policy,
        "restartPolicy": "Always",
        "args": ["sidecar", "--policy", POLICY_FILE],
        "env": env,
        "volumeMounts": mounts,
        "startupProbe": _probe("/healthz", period=1, failures=60, port=health_port),
        "readinessProbe": _probe("/readyz", period=5, failures=2, port=health_port),
        "livenessProbe": _probe("/healthz", period=10, failures=3, timeout=5, port=health_port),
        "resources": sidecar_resources(pod, settings)[0],
        "securityContext": {
            "runAsNonRoot": True,
            **_user(settings.sidecar_user),
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if metrics_port:
        container["ports"] = [{"name": SIDECAR_METRICS_PORT_NAME, "containerPort": metrics_port, "protocol": "TCP"}]
    return container


def _user(uid: int | None) -> dict[str, int]:
    return {} if uid is None else {"runAsUser": uid, "runAsGroup": uid}


def _key_sources(source: SidecarSource) -> list[dict[str, Any]]:
    """The projected volume's sources: each referenced Secret key as a file named after its provider
    (the path the rendered config names, `policy.key_file`)."""
    return [
        {"secret": {"name": s.name, "items": [{"key": s.key, "path": s.provider}], "optional": True}}
        for s in source.secret_keys
    ]


def inject(
    pod: Mapping[str, Any],
    policy: LoadedPolicy | SidecarSource,
    settings: Settings,
    *,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The pod with the sidecar of `policy` injected; an injected or opted-out pod comes back equal.
    `annotations` are added to the pod's own (the webhook's notes, e.g. `LAST_GOOD_ANNOTATION`).

    Raises `InjectionConflict` when the pod uses one of the sidecar's names (`injection_conflicts`).
    """
    source = policy if isinstance(policy, SidecarSource) else SidecarSource.of(policy)
    result = copy.deepcopy(dict(pod))
    if is_injected(pod) or requested_policy(pod) is None:
        return result
    if problems := injection_conflicts(pod, sidecar_ports(settings)):
        raise InjectionConflict("; ".join(problems))
    metadata = result.setdefault("metadata", {})
    metadata["annotations"] = {
        **(metadata.get("annotations") or {}),
        **(annotations or {}),
        INJECTED_ANNOTATION: f"{source.policy}@{source.config_hash}",
    }
    spec = result.setdefault("spec", {})
    spec["initContainers"] = [sidecar_container(source, settings, pod), *(spec.get("initContainers") or [])]
    spec["volumes"] = [
        *(spec.get("volumes") or []),
        {"name": POLICY_VOLUME, "configMap": {"name": configmap_name(source.policy)}},
        {"name": TMP_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
    ]
    key_sources = _key_sources(source)
    if key_sources:
        spec["volumes"].append({"name": KEYS_VOLUME, "projected": {"sources": key_sources}})
    containers = []
    for container in spec.get("containers") or []:
        env = list(container.get("env") or [])
        own = {entry.get("name") for entry in env}
        env += [{"name": name, "value": value} for name, value in APP_ENV.items() if name not in own]
        containers.append({**container, "env": env})
    spec["containers"] = containers
    return result


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def json_patch(old: Any, new: Any, path: str = "") -> list[dict[str, Any]]:
    """RFC 6902 operations turning `old` into `new`: objects are diffed key by key, lists replaced.

    Lists are replaced whole: an admission patch applies to exactly the object it was computed from,
    and a whole list reads better in audit logs than index arithmetic.
    """
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        ops: list[dict[str, Any]] = []
        for key in old:
            if key not in new:
                ops.append({"op": "remove", "path": f"{path}/{_escape(key)}"})
        for key, value in new.items():
            child = f"{path}/{_escape(key)}"
            if key not in old:
                ops.append({"op": "add", "path": child, "value": value})
            elif old[key] != value:
                ops.extend(json_patch(old[key], value, child))
        return ops
    if old == new:
        return []
    return [{"op": "replace", "path": path, "value": new}]
