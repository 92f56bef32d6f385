"""Pure builders for what a policy should produce: its ConfigMap and its status.

The kopf handlers only fetch, call these functions, and write the results back; everything that
decides *what* the objects look like lives here and is tested without a cluster. A policy yields:

- ConfigMap `<name>-llmroute` with `policy.json`: the sidecar config (`render_sidecar_config`), in
  which Secret references are already environment variable names, so it holds no secret material;
- a status with Kubernetes conditions: `Ready`, and the warning conditions `HotHotRouting`,
  `BudgetOutOfRange`, `MissingSecret` (abnormal-true: `True` means the problem is present).
  `lastTransitionTime` moves only when a condition's status changes.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from llmroute_sidecar.policy import (
    API_VERSION,
    KIND,
    SANE_BUDGET,
    LoadedPolicy,
    PolicyError,
    load_policy,
    render_sidecar_config,
)
from llmroute_sidecar.statuspages import page_key
from llmroute_sidecar.statuspolling import RelayEntry

from . import (
    CONFIG_HASH_ANNOTATION,
    HOST_NETWORK_ANNOTATION,
    INJECT_ANNOTATION,
    INJECTED_ANNOTATION,
    POLICY_ANNOTATION,
)
from .settings import DEFAULT_PROVIDER_HOSTS

CONFIG_KEY = "policy.json"
MANAGED_BY_LABELS = {
    "app.kubernetes.io/managed-by": "llmroute-operator",
    "app.kubernetes.io/part-of": "llmroute",
}
MANAGED_SELECTOR = "app.kubernetes.io/managed-by=llmroute-operator"
"""Label selector of the ConfigMaps the operator writes."""

READY = "Ready"
HOT_HOT_ROUTING = "HotHotRouting"
BUDGET_OUT_OF_RANGE = "BudgetOutOfRange"
MISSING_SECRET = "MissingSecret"
SERVING_LAST_GOOD = "ServingLastGood"
"""Abnormal-true: pods get the last good config (the ConfigMap), not the current spec."""
UNINJECTED_PODS = "UninjectedPods"
"""Abnormal-true: pods that opted in to this policy run without the sidecar."""
CONDITION_TYPES = (READY, HOT_HOT_ROUTING, BUDGET_OUT_OF_RANGE, MISSING_SECRET, SERVING_LAST_GOOD, UNINJECTED_PODS)


def configmap_name(policy_name: str) -> str:
    """The ConfigMap a policy is rendered into (the webhook mounts the same name)."""
    return f"{policy_name}-llmroute"


def render_config(policy: LoadedPolicy) -> str:
    """`policy.json` exactly as written: stable key order, so equal policies give equal bytes."""
    return json.dumps(render_sidecar_config(policy), indent=2, sort_keys=True) + "\n"


def host_allowed(host: str, allowed: Sequence[str]) -> bool:
    """`host` is one of `allowed`, or a subdomain of an `*.example.com` entry (not the bare domain)."""
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if host == entry or (entry.startswith("*.") and host.endswith(entry[1:]) and len(host) > len(entry) - 1):
            return True
    return False


def load_cluster_policy(
    policy_body: Mapping[str, Any], provider_hosts: Sequence[str] = DEFAULT_PROVIDER_HOSTS
) -> LoadedPolicy:
    """`load_policy`, plus what only a cluster forbids, because whoever may edit a policy could otherwise
    send the live key (sidecars hot-reload the policy) somewhere of theirs:

    - keys from anywhere but a Secret: `apiKey.env`/`apiKey.file` would hand the sidecar's environment or
      any file it can read (its service-account token) to a `baseURL`;
    - a `baseURL` host not on the operator's allowlist (`provider_hosts`);
    - a plain-http `baseURL` without `allowPlainHTTP`, loopback included (another container of the pod
      could listen there)."""
    policy = load_policy(policy_body)
    problems = [
        f"spec.providers[{index}].apiKey: in a cluster keys come from secretKeyRef (env and file are for "
        "standalone sidecars)"
        for index, provider in enumerate(policy.spec.providers)
        if provider.api_key is not None and provider.api_key.secret_key_ref is None
    ]
    for index, provider in enumerate(policy.spec.providers):
        url = urlsplit(provider.effective_base_url)
        host = url.hostname or ""
        if not host_allowed(host, provider_hosts):
            problems.append(
                f'spec.providers[{index}].baseURL: host "{host}" is not on the operator\'s allowlist of provider '
                f"hosts ({', '.join(provider_hosts)}); a cluster admin can add it (chart value operator.providerHosts)"
            )
        elif url.scheme == "http" and not provider.allow_plain_http:
            problems.append(
                f"spec.providers[{index}].baseURL: plain http needs allowPlainHTTP: true in a cluster (the key "
                "would travel unencrypted)"
            )
    if problems:
        raise PolicyError(problems)
    return policy


def shedding_providers(policy: LoadedPolicy, pages: Mapping[str, RelayEntry]) -> list[str]:
    """The providers whose status page, as the relay last read it, is in a state their policy sheds on
    (the `Shedding` printer column). Raw readings: each sidecar still applies `confirmAfter` itself."""
    shedding = []
    for provider in policy.spec.providers:
        page = provider.status_page
        entry = pages.get(page_key(page)) if page is not None else None
        reading = entry.reading if entry is not None else None
        if page is not None and reading is not None and reading.usable and reading.state in page.shed_on:
            shedding.append(provider.name)
    return shedding


def build_configmap(
    policy_body: Mapping[str, Any], provider_hosts: Sequence[str] = DEFAULT_PROVIDER_HOSTS
) -> dict[str, Any]:
    """The ConfigMap for a policy manifest; raises `PolicyError` when the policy is invalid.

    The owner reference is left to the caller (`kopf.adopt`), which also copies the namespace.
    """
    policy = load_cluster_policy(policy_body, provider_hosts)
    metadata = policy_body.get("metadata") or {}
    name = str(metadata.get("name") or policy.name)
    configmap_metadata: dict[str, Any] = {
        "name": configmap_name(name),
        "labels": {**MANAGED_BY_LABELS, POLICY_ANNOTATION: name},
        "annotations": {CONFIG_HASH_ANNOTATION: policy.config_hash},
    }
    if metadata.get("namespace"):
        configmap_metadata["namespace"] = metadata["namespace"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": configmap_metadata,
        "data": {CONFIG_KEY: render_config(policy)},
    }


def is_owned_by(obj: Mapping[str, Any], owner_uid: str | None) -> bool:
    """Whether `obj` carries an owner reference to the object with this uid."""
    references = (obj.get("metadata") or {}).get("ownerReferences") or []
    return owner_uid is not None and any(ref.get("uid") == owner_uid for ref in references)


def configmap_patch(existing: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any] | None:
    """A merge patch bringing `existing` to `desired`, or None when nothing would change.

    Only what the operator owns is compared: `data`, its labels and annotations (others' keys are
    left alone), and its owner references (others' are kept: a merge patch replaces the list).
    """
    patch: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    old_meta = existing.get("metadata") or {}
    new_meta = desired.get("metadata") or {}
    if (existing.get("data") or {}) != (desired.get("data") or {}):
        patch["data"] = {
            **{key: None for key in existing.get("data") or {} if key not in desired.get("data", {})},
            **desired.get("data", {}),
        }
    for field in ("labels", "annotations"):
        changed = {
            key: value
            for key, value in (new_meta.get(field) or {}).items()
            if (old_meta.get(field) or {}).get(key) != value
        }
        if changed:
            metadata[field] = changed
    old_refs = list(old_meta.get("ownerReferences") or [])
    missing_refs = [
        ref for ref in new_meta.get("ownerReferences") or [] if ref.get("uid") not in {r.get("uid") for r in old_refs}
    ]
    if missing_refs:
        metadata["ownerReferences"] = old_refs + missing_refs
    if metadata:
        patch["metadata"] = metadata
    return patch or None


def secret_key_refs(policy: LoadedPolicy) -> list[dict[str, str]]:
    """`status.secretKeyRefs`: each provider's Secret key, recorded with the configHash it was rendered
    with, so the webhook can inject this version while a later spec is invalid or not yet rendered."""
    return [
        {"provider": provider.name, "name": ref.name, "key": ref.key}
        for provider in policy.spec.providers
        if provider.api_key is not None and (ref := provider.api_key.secret_key_ref) is not None
    ]


def referenced_secrets(policy: LoadedPolicy) -> list[tuple[str, str]]:
    """`(secret name, key)` pairs the policy's providers read their API keys from, deduplicated."""
    seen: dict[tuple[str, str], None] = {}
    for provider in policy.spec.providers:
        ref = provider.api_key.secret_key_ref if provider.api_key else None
        if ref is not None:
            seen[(ref.name, ref.key)] = None
    return list(seen)


def missing_secrets(
    references: Iterable[tuple[str, str]], secret_keys: Mapping[str, Iterable[str] | None]
) -> list[str]:
    """Human lines for references that cannot be resolved.

    `secret_keys` maps each referenced Secret's name to the keys it holds (None: no such Secret).
    """
    problems: list[str] = []
    absent: set[str] = set()
    for name, key in references:
        keys = secret_keys.get(name)
        if keys is None:
            if name not in absent:
                problems.append(f'Secret "{name}" not found')
                absent.add(name)
        elif key not in set(keys):
            problems.append(f'Secret "{name}" has no key "{key}"')
    return problems


@dataclass(frozen=True)
class Condition:
    """What a condition should say now; `build_status` adds the transition time and generation."""

    type: str
    status: str
    reason: str
    message: str


def _warning_lines(policy: LoadedPolicy, field: str) -> list[str]:
    return [line for line in policy.warnings if line.split(": ", 1)[0].endswith(f".{field}")]


def policy_conditions(
    policy: LoadedPolicy, *, missing: Sequence[str] | None, configmap: str, configmap_error: str | None = None
) -> list[Condition]:
    """The conditions of a valid policy (`missing` None: Secrets are not checked, MissingSecret is Unknown)."""
    routes = policy.spec.routes
    hot_hot = [route.name for route in routes if route.strategy == "hotHot"]
    odd_budgets = [route.name for route in routes if not SANE_BUDGET[0] <= route.budget <= SANE_BUDGET[1]]
    known = set(_warning_lines(policy, "strategy")) | set(_warning_lines(policy, "budget"))
    other_warnings = [line for line in policy.warnings if line not in known]
    if configmap_error is not None:
        ready = Condition(READY, "False", "ConfigMapConflict", configmap_error)
    else:
        message = f"ConfigMap {configmap} holds configHash {policy.config_hash}"
        if other_warnings:
            message += "; warnings: " + "; ".join(other_warnings)
        ready = Condition(READY, "True", "Reconciled", message)
    return [
        ready,
        Condition(
            HOT_HOT_ROUTING,
            "True" if hot_hot else "False",
            "HotHotRoutes" if hot_hot else "NoHotHotRoutes",
            "; ".join(_warning_lines(policy, "strategy"))
            if hot_hot
            else "every route sends traffic to its primary first",
        ),
        Condition(
            BUDGET_OUT_OF_RANGE,
            "True" if odd_budgets else "False",
            "BudgetOutOfRange" if odd_budgets else "BudgetsInRange",
            "; ".join(_warning_lines(policy, "budget")) if odd_budgets else "every route's budget is within 4s..12s",
        ),
        Condition(MISSING_SECRET, "Unknown", "NotChecked", "the operator does not read Secrets (checkSecrets: false)")
        if missing is None
        else Condition(
            MISSING_SECRET,
            "True" if missing else "False",
            "SecretNotFound" if missing else "SecretsFound",
            "; ".join(missing) if missing else "every referenced Secret key exists",
        ),
    ]


def invalid_conditions(error: PolicyError, previous: Mapping[str, Any] | None = None) -> list[Condition]:
    """An invalid policy: Ready is False with the field paths; the other conditions keep their state.

    When an earlier version was rendered into the ConfigMap (`previous` status has its configHash),
    ServingLastGood says that new pods still get that version: the webhook injects the last good config."""
    conditions = [Condition(READY, "False", "InvalidPolicy", "; ".join(error.problems))]
    last_hash = (previous or {}).get("configHash")
    if last_hash:
        conditions.append(
            Condition(
                SERVING_LAST_GOOD, "True", "InvalidPolicy",
                f"pods are injected with the last good config (configHash {last_hash}, ConfigMap "
                f"{(previous or {}).get('configMap')}) until the spec is fixed",
            )
        )  # fmt: skip
    return conditions


def timestamp(now: datetime.datetime) -> str:
    """RFC 3339 in UTC, second precision, as Kubernetes writes it."""
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_conditions(
    previous: Sequence[Mapping[str, Any]],
    current: Sequence[Condition],
    *,
    generation: int | None,
    now: datetime.datetime,
) -> list[dict[str, Any]]:
    """Conditions to write: `current` ones replace their type, others are kept as they were.

    `lastTransitionTime` is kept from the previous condition of the same type when its status did
    not change. The result is ordered by the known types first, so the list does not shuffle.
    """
    by_type: dict[str, dict[str, Any]] = {str(c.get("type")): dict(c) for c in previous if c.get("type")}
    for condition in current:
        old = by_type.get(condition.type)
        transition = (
            old["lastTransitionTime"]
            if old is not None and old.get("status") == condition.status and old.get("lastTransitionTime")
            else timestamp(now)
        )
        entry: dict[str, Any] = {
            "type": condition.type,
            "status": condition.status,
            "reason": condition.reason,
            "message": condition.message,
            "lastTransitionTime": transition,
        }
        if generation is not None:
            entry["observedGeneration"] = generation
        by_type[condition.type] = entry
    order = {name: index for index, name in enumerate(CONDITION_TYPES)}
    return sorted(by_type.values(), key=lambda c: (order.get(c["type"], len(order)), c["type"]))


def build_status(
    previous: Mapping[str, Any] | None,
    *,
    policy: LoadedPolicy | PolicyError,
    generation: int | None,
    now: datetime.datetime,
    configmap: str,
    missing: Sequence[str] | None = (),
    configmap_error: str | None = None,
) -> dict[str, Any]:
    """The status to merge into the policy.

    For an invalid policy, `configMap`/`configHash`/`routes` are left out, so the merge keeps those
    of the last good version, which the ConfigMap (and the running sidecars) still hold.
    """
    old_conditions = list((previous or {}).get("conditions") or [])
    status: dict[str, Any] = {}
    if isinstance(policy, PolicyError):
        current = invalid_conditions(policy, previous)
    else:
        current = policy_conditions(policy, missing=missing, configmap=configmap, configmap_error=configmap_error)
        if configmap_error is None:
            status["configMap"] = configmap
            status["configHash"] = policy.config_hash
            status["secretKeyRefs"] = secret_key_refs(policy)
            current.append(
                Condition(SERVING_LAST_GOOD, "False", "CurrentSpec", f"ConfigMap {configmap} holds the current spec")
            )
        else:
            # Someone else's ConfigMap: nothing of ours to inject from (None: the merge patch removes them).
            status["configHash"] = None
            status["secretKeyRefs"] = None
        status["routes"] = [route.name for route in policy.spec.routes]
        status["warnings"] = list(policy.warnings)
    if generation is not None:
        status["observedGeneration"] = generation
    status["conditions"] = merge_conditions(old_conditions, current, generation=generation, now=now)
    return status


def condition_is_true(status: Mapping[str, Any] | None, condition_type: str) -> bool:
    """Whether the status holds `condition_type` with status True."""
    conditions = (status or {}).get("conditions") or []
    return any(c.get("type") == condition_type and c.get("status") == "True" for c in conditions)


def has_missing_secret(status: Mapping[str, Any], **_: Any) -> bool:
    """kopf `when=` filter: the policy waits for a Secret (re-checked until it appears)."""
    return condition_is_true(status, MISSING_SECRET)


def policy_event(
    policy_body: Mapping[str, Any], *, kind: str, reason: str, message: str, component: str, now: datetime.datetime
) -> dict[str, Any]:
    """A core/v1 Event about the policy (`kind`: Normal or Warning), as the API takes it."""
    metadata = policy_body.get("metadata") or {}
    name, namespace = str(metadata.get("name")), str(metadata.get("namespace"))
    involved: dict[str, Any] = {"apiVersion": API_VERSION, "kind": KIND, "name": name, "namespace": namespace}
    if metadata.get("uid"):
        involved["uid"] = metadata["uid"]
    stamp = timestamp(now)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{name}.", "namespace": namespace},
        "involvedObject": involved,
        "type": kind,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": component},
        "reportingComponent": component,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


def uninjected_pods(
    pods: Iterable[Mapping[str, Any]], skip_namespaces: Iterable[str]
) -> dict[tuple[str, str], list[str]]:
    """(namespace, policy) -> names of the running pods that opted in to that policy but have no sidecar
    (admitted while the webhook was unreachable, under failurePolicy Ignore: no keys, no base URLs)."""
    skipped = set(skip_namespaces)
    found: dict[tuple[str, str], list[str]] = {}
    for pod in pods:
        metadata, spec = pod.get("metadata") or {}, pod.get("spec") or {}
        annotations, labels = metadata.get("annotations") or {}, metadata.get("labels") or {}
        policy = annotations.get(POLICY_ANNOTATION)
        namespace = str(metadata.get("namespace"))
        if not policy or namespace in skipped or INJECTED_ANNOTATION in annotations:
            continue
        if any(str(m.get(INJECT_ANNOTATION, "")).lower() == "false" for m in (annotations, labels)):
            continue
        if spec.get("hostNetwork") and str(annotations.get(HOST_NETWORK_ANNOTATION, "")).lower() != "true":
            continue  # skipped by design
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed") or metadata.get("deletionTimestamp"):
            continue
        found.setdefault((namespace, str(policy)), []).append(str(metadata.get("name")))
    return found


def uninjected_condition(names: Sequence[str]) -> Condition:
    """The UninjectedPods condition for the pods of one policy found without the sidecar."""
    if not names:
        return Condition(UNINJECTED_PODS, "False", "AllInjected", "every running pod that opted in has the sidecar")
    shown = ", ".join(sorted(names)[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return Condition(
        UNINJECTED_PODS, "True", "PodsWithoutSidecar",
        f"{len(names)} running pod(s) opted in but have no sidecar (admitted while the webhook was unreachable?): "
        f"{shown}; delete them to have them recreated with it",
    )  # fmt: skip
