"""kopf glue for the reconciler: which events run which reconcile step, and how kopf is run.

Every LLMRoutePolicy, on create, update and operator restart (resume), becomes ConfigMap
`<name>-llmroute` plus a status (`reconcile` builds both; this module only reads and writes them).
The ConfigMap is owned by the policy, so deleting the policy is left to Kubernetes' garbage
collector. A policy waiting for a Secret is re-checked by a timer until the Secret appears; the
operator needs `get` on Secrets only, never `list`/`watch` (it never holds every Secret's values).

Run it with `run_operator(argv)` (the CLI's `llmroute operator`). Both kopf and the operator's own
API client (`kubeapi`) connect through the same `OperatorMemo.connection`: None in a cluster
(service account, else kubeconfig), an explicit `kopf.ConnectionInfo` in tests and local runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import fnmatch
import logging
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast

import aiohttp
import kopf

from llmroute_sidecar.policy import PolicyError
from llmroute_sidecar.statuspolling import RelayUnavailable
from llmroute_sidecar.statusrelay import RelayClient

from . import CONFIG_HASH_ANNOTATION, GROUP, INJECT_ANNOTATION, PLURAL, VERSION, metrics
from .diffbase import DigestDiffBaseStorage
from .kubeapi import KubeApi, KubeApiError
from .reconcile import (
    MANAGED_SELECTOR,
    MISSING_SECRET,
    READY,
    UNINJECTED_PODS,
    build_configmap,
    build_status,
    condition_is_true,
    configmap_name,
    configmap_patch,
    is_owned_by,
    load_cluster_policy,
    merge_conditions,
    missing_secrets,
    policy_event,
    referenced_secrets,
    shedding_providers,
    uninjected_condition,
    uninjected_pods,
)
from .settings import Settings, SettingsError

registry = kopf.OperatorRegistry()
"""The reconciler's own registry, so nothing else imported into the process adds handlers to it."""

API_RETRY_DELAY = 10.0
COMPONENT = "llmroute-operator"


@dataclass
class OperatorMemo:
    """What every handler shares (kopf gives each policy a shallow copy: same client, same settings)."""

    settings: Settings
    connection: kopf.ConnectionInfo | None = None
    """Explicit API server and credentials; None: in-cluster service account, else kubeconfig."""
    kube: KubeApi | None = None
    """The operator's own API client, opened at start-up."""
    relay_session: aiohttp.ClientSession | None = None
    """For reading the status relay (when `LLMROUTE_STATUS_RELAY` is set), for the Shedding column."""
    refresher: asyncio.Task[None] | None = None
    resyncer: asyncio.Task[None] | None = None
    waiting: set[tuple[str, str]] = field(default_factory=set)
    """Policies whose MissingSecret is True, as last reconciled: re-checked every `secret_recheck_interval`
    (one GET each) without listing every policy that often. Shared by kopf's per-policy memo copies."""

    def api(self) -> KubeApi:
        if self.kube is None:
            raise RuntimeError("the Kubernetes API client is not open (start-up has not run)")
        return self.kube


@kopf.on.login(registry=registry)
def login(*, memo: OperatorMemo, logger: kopf.Logger, settings: kopf.OperatorSettings, **_: Any) -> Any:
    """kopf's credentials: the explicit connection, else the official client's own loading."""
    if memo.connection is not None:
        return memo.connection
    return kopf.login_via_client(logger=logger, settings=settings)


@kopf.on.startup(registry=registry)
async def start(*, memo: OperatorMemo, settings: kopf.OperatorSettings, **_: Any) -> None:
    """Keep kopf's bookkeeping under our own names and out of the status, and open the API client."""
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = DigestDiffBaseStorage(prefix=GROUP, key="last-handled-configuration")
    settings.posting.level = logging.WARNING  # Events for problems, not for every log line
    settings.watching.server_timeout = 300
    # Replicas peering under one name: kopf pauses every replica that sees a peer of the same or a higher
    # priority, so equal priorities would pause them all. A random one per replica lets exactly one serve.
    settings.peering.priority = random.randint(1, 1_000_000)
    memo.kube = await KubeApi.connect(memo.connection)
    memo.resyncer = asyncio.create_task(keep_in_sync(memo, logging.getLogger("llmroute.operator")))
    if memo.settings.status_relay:
        memo.relay_session = aiohttp.ClientSession()
        relay = RelayClient(memo.relay_session, memo.settings.status_relay)
        memo.refresher = asyncio.create_task(refresh_shedding(memo, relay, logging.getLogger("llmroute.operator")))


@kopf.on.cleanup(registry=registry)
async def stop(*, memo: OperatorMemo, **_: Any) -> None:
    for task in (memo.refresher, memo.resyncer):
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    memo.refresher = memo.resyncer = None
    if memo.kube is not None:
        await memo.kube.close()
        memo.kube = None
    if memo.relay_session is not None:
        await memo.relay_session.close()
        memo.relay_session = None


@kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
@kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
@kopf.on.update(GROUP, VERSION, PLURAL, registry=registry)
async def reconcile_policy(
    *, body: kopf.Body, patch: kopf.Patch, memo: OperatorMemo, logger: kopf.Logger, retry: int, **_: Any
) -> None:
    """Policy -> ConfigMap + status."""
    await _reconcile(body, patch, memo.api(), logger, memo.settings, retry)
    _track(memo.waiting, body, patch.status)


def _served(body: Mapping[str, Any], settings: Settings) -> bool:
    namespace = str((body.get("metadata") or {}).get("namespace"))
    return not settings.namespaces or any(fnmatch.fnmatchcase(namespace, glob) for glob in settings.namespaces)


def _changed(previous: Mapping[str, Any], status: Mapping[str, Any]) -> bool:
    """Whether merging `status` into `previous` changes anything."""
    return any(previous.get(key) != value for key, value in status.items() if value is not None or key in previous)


def _track(waiting: set[tuple[str, str]], body: Mapping[str, Any], status: Mapping[str, Any]) -> None:
    metadata = body.get("metadata") or {}
    key = (str(metadata.get("namespace")), str(metadata.get("name")))
    if condition_is_true(status, MISSING_SECRET):
        waiting.add(key)
    else:
        waiting.discard(key)


async def resync_once(
    kube: KubeApi, settings: Settings, *, configmaps: bool, waiting: set[tuple[str, str]] | None = None
) -> list[str]:
    """Reconcile again the policies waiting for a Secret (MissingSecret): those in `waiting`, read one by
    one, or, with `configmaps`, every policy (one paginated list), together with those whose ConfigMap was
    deleted or edited behind the operator's back (one list of the operator's ConfigMaps). Returns the
    `namespace/name` of the policies reconciled.

    Only policies whose current spec is rendered (Ready, configHash of this spec) have their ConfigMap
    restored: any other is kopf's to handle on its next change, and an invalid one keeps what is there."""
    owned: dict[tuple[str, str], dict[str, Any]] | None = None
    if configmaps:
        owned = {
            (str(cm["metadata"].get("namespace")), str(cm["metadata"].get("name"))): cm
            for cm in await kube.list_configmaps(MANAGED_SELECTOR)
            if (cm.get("metadata") or {}).get("labels", {}).get("app.kubernetes.io/managed-by") == "llmroute-operator"
        }
    if configmaps or waiting is None:
        policies = await kube.list_policies()
    else:
        policies = [body for key in sorted(waiting) if (body := await kube.read_policy(*key)) is not None]
    touched = []
    for body in policies:
        if not _served(body, settings):
            continue
        metadata, status = body.get("metadata") or {}, body.get("status") or {}
        namespace, name = str(metadata.get("namespace")), str(metadata.get("name"))
        due = condition_is_true(status, MISSING_SECRET)
        if not due and owned is not None and condition_is_true(status, READY):
            try:
                desired = build_configmap(body, settings.provider_hosts)
            except PolicyError:
                continue
            hash_now = desired["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
            existing = owned.get((namespace, configmap_name(name)))
            due = status.get("configHash") == hash_now and (
                existing is None or configmap_patch(existing, desired) is not None
            )
        if not due:
            continue
        outcome = await reconcile_body(body, kube, settings)
        if waiting is not None:
            _track(waiting, body, outcome.status)
        if _changed(status, outcome.status):
            await kube.patch_policy_status(namespace, name, outcome.status)
        now = datetime.datetime.now(datetime.UTC)
        for kind, reason, message in outcome.events:
            event = policy_event(body, kind=kind, reason=reason, message=message, component=COMPONENT, now=now)
            await kube.create_event(namespace, event)
        touched.append(f"{namespace}/{name}")
    if configmaps and settings.report_uninjected_pods:
        await report_uninjected(kube, settings, [b for b in policies if _served(b, settings)])
    return touched


NAMESPACE_OPT_IN = "llmroute.dev/injection=enabled"
POD_OPT_IN = f"{INJECT_ANNOTATION}=true"


async def report_uninjected(kube: KubeApi, settings: Settings, policies: list[dict[str, Any]]) -> None:
    """Set each policy's UninjectedPods condition from the running pods that opted in to it but have no
    sidecar (one list of labelled pods, one per labelled namespace); an Event when that set changes."""
    pods = {
        (pod["metadata"].get("namespace"), pod["metadata"].get("name")): pod
        for pod in await kube.list_pods(label_selector=POD_OPT_IN)
    }
    for namespace in await kube.list_namespace_names(NAMESPACE_OPT_IN):
        for pod in await kube.list_pods(namespace=namespace):
            pods.setdefault((pod["metadata"].get("namespace"), pod["metadata"].get("name")), pod)
    missing = uninjected_pods(pods.values(), settings.skip_namespaces)
    now = datetime.datetime.now(datetime.UTC)
    for body in policies:
        metadata, status = body.get("metadata") or {}, body.get("status") or {}
        namespace, name = str(metadata.get("namespace")), str(metadata.get("name"))
        current = uninjected_condition(missing.get((namespace, name), []))
        before = next((c for c in status.get("conditions") or [] if c.get("type") == UNINJECTED_PODS), None)
        if before is not None and (before.get("status"), before.get("message")) == (current.status, current.message):
            continue
        if before is None and current.status == "False":
            continue  # nothing to report, and nothing reported before
        fresh = await kube.read_policy(namespace, name)  # merged into the latest conditions, not the listed ones
        if fresh is None:
            continue
        latest = (fresh.get("status") or {}).get("conditions") or []
        conditions = merge_conditions(latest, [current], generation=metadata.get("generation"), now=now)
        await kube.patch_policy_status(namespace, name, {"conditions": conditions})
        if current.status == "True":
            event = policy_event(
                body, kind="Warning", reason="PodsWithoutSidecar", message=current.message, component=COMPONENT, now=now
            )
            await kube.create_event(namespace, event)


async def keep_in_sync(memo: OperatorMemo, logger: logging.Logger) -> None:
    """`resync_once` every `secret_recheck_interval` seconds (a GET per policy waiting for a Secret), with
    the full pass (one list of policies, one of ConfigMaps, pods) every `configmap_resync_interval`.

    A plain task rather than a kopf timer: kopf holds a finalizer on every object a timer serves, and a
    policy (and its namespace) must stay deletable while the operator is uninstalled. API failures are
    logged when they change, and retried at the next pass."""
    settings = memo.settings
    last_configmap_check = -math.inf
    reported: str | None = None
    while True:
        await asyncio.sleep(settings.secret_recheck_interval)
        check_configmaps = time.monotonic() - last_configmap_check >= settings.configmap_resync_interval
        try:
            touched = await resync_once(memo.api(), settings, configmaps=check_configmaps, waiting=memo.waiting)
        except KubeApiError as exc:
            if str(exc) != reported:
                logger.warning("resync failed, retried in %gs: %s", settings.secret_recheck_interval, exc)
            reported = str(exc)
            continue
        reported = None
        if check_configmaps:
            last_configmap_check = time.monotonic()
        if touched:
            logger.info("resynced %s", ", ".join(touched))


async def refresh_shedding(memo: OperatorMemo, relay: RelayClient, logger: logging.Logger) -> None:
    """Keep every policy's `status.sheddingProviders` (the Shedding printer column) on what the status
    relay last read: one relay read and one policy list per interval, a status patch only on change.

    A plain task rather than a kopf timer: kopf holds a finalizer on every object a timer serves, and a
    policy must stay deletable while the operator is down."""
    interval = memo.settings.shedding_refresh_interval
    reported: str | None = None
    while True:
        await asyncio.sleep(interval)
        try:
            pages = await relay.fetch(max_age=interval / 2)
            metrics.relay_read(ok=True)
            for body in await memo.api().list_policies():
                await _refresh_policy_shedding(memo, body, pages)
        except (RelayUnavailable, KubeApiError) as exc:
            if isinstance(exc, RelayUnavailable):
                metrics.relay_read(ok=False)
            if str(exc) != reported:
                logger.info("shedding providers not refreshed: %s", exc)
            reported = str(exc)
            continue
        reported = None


async def _refresh_policy_shedding(memo: OperatorMemo, body: Mapping[str, Any], pages: Mapping[str, Any]) -> None:
    metadata = body.get("metadata") or {}
    namespace, name = str(metadata.get("namespace")), str(metadata.get("name"))
    if memo.settings.namespaces and namespace not in memo.settings.namespaces:
        return
    try:
        policy = load_cluster_policy(body, memo.settings.provider_hosts)
    except PolicyError:
        return  # invalid: its status says so already
    shedding = shedding_providers(policy, pages)
    if shedding != list((body.get("status") or {}).get("sheddingProviders") or []):
        # none: the field (and the column) goes away
        await memo.api().patch_policy_status(namespace, name, {"sheddingProviders": shedding or None})


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True, registry=registry)
def forget_policy(*, name: str, namespace: str | None, logger: kopf.Logger, **_: Any) -> None:
    """Nothing to undo: the ConfigMap's owner reference lets the garbage collector remove it."""
    logger.info("policy %s/%s deleted; ConfigMap %s goes with it", namespace, name, configmap_name(name))


@dataclass
class Outcome:
    """What reconciling a policy decided: the status to merge, and Events to post on the policy."""

    status: dict[str, Any]
    events: list[tuple[str, str, str]] = field(default_factory=list)
    """(type, reason, message)."""


async def reconcile_body(body: Mapping[str, Any], kube: KubeApi, settings: Settings) -> Outcome:
    """Write the policy's ConfigMap (create, or patch what drifted) and decide its status.

    Shared by the kopf handlers (status through kopf's patch) and the resync task (status through the
    status subresource). Raises `KubeApiError` when the API fails."""
    metadata: Mapping[str, Any] = body.get("metadata") or {}
    namespace, name = str(metadata["namespace"]), str(metadata["name"])
    previous: Mapping[str, Any] = body.get("status") or {}
    generation = metadata.get("generation")
    target = configmap_name(name)
    now = datetime.datetime.now(datetime.UTC)
    document = {key: body.get(key) for key in ("apiVersion", "kind", "metadata", "spec")}
    try:
        policy = load_cluster_policy(document, settings.provider_hosts)
        desired = build_configmap(document, settings.provider_hosts)
    except PolicyError as exc:
        metrics.reconciled("invalid")
        return Outcome(
            build_status(previous, policy=exc, generation=generation, now=now, configmap=target),
            [("Warning", "InvalidPolicy", "; ".join(exc.problems))],
        )

    kopf.adopt(desired, owner=body if isinstance(body, kopf.Body) else kopf.Body(cast(kopf.RawBody, dict(body))))
    events: list[tuple[str, str, str]] = []
    conflict: str | None = None
    existing = await kube.read_configmap(namespace, target)
    if existing is None:
        await kube.create_configmap(namespace, desired)
        events.append(("Normal", "ConfigMapCreated", f"{target}: {policy.config_hash}"))
    elif not is_owned_by(existing, metadata.get("uid")) and not _ours(existing, name):
        conflict = f"ConfigMap {target} exists and is not managed by llmroute; rename or delete it"
        events.append(("Warning", "ConfigMapConflict", conflict))
    elif (changes := configmap_patch(existing, desired)) is not None:
        await kube.patch_configmap(namespace, target, changes)
        events.append(("Normal", "ConfigMapUpdated", f"{target}: {policy.config_hash}"))
    references = referenced_secrets(policy) if settings.check_secrets else []
    keys = {secret: await kube.read_secret_keys(namespace, secret) for secret, _ in references}

    missing = missing_secrets(references, keys) if settings.check_secrets else None
    if missing and not condition_is_true(previous, MISSING_SECRET):
        events.append(("Warning", "MissingSecret", "; ".join(missing)))
    status = build_status(
        previous, policy=policy, generation=generation, now=now, configmap=target,
        missing=missing, configmap_error=conflict,
    )  # fmt: skip
    metrics.reconciled("conflict" if conflict else "ok")
    return Outcome(status, events)


PERMANENT_API_ERRORS = frozenset({400, 401, 403, 404, 405, 422})
"""Answers that retrying the same call will not change soon (RBAC, a bad request): backed off."""
MAX_RETRY_DELAY = 600.0


def retry_delay(status: int, retry: int) -> float:
    """Seconds before kopf retries a failed reconcile: `API_RETRY_DELAY` for what may pass (timeouts, 409,
    429, 5xx), doubling per retry up to `MAX_RETRY_DELAY` for permanent answers such as a 403."""
    if status not in PERMANENT_API_ERRORS:
        return API_RETRY_DELAY
    return float(min(API_RETRY_DELAY * 2 ** min(retry, 16), MAX_RETRY_DELAY))


async def _reconcile(
    body: kopf.Body, patch: kopf.Patch, kube: KubeApi, logger: kopf.Logger, settings: Settings, retry: int = 0
) -> None:
    try:
        outcome = await reconcile_body(body, kube, settings)
    except KubeApiError as exc:
        metrics.reconciled("api_error")
        raise kopf.TemporaryError(f"Kubernetes API: {exc}", delay=retry_delay(exc.status, retry)) from exc
    patch.status.update(outcome.status)
    for kind, reason, message in outcome.events:
        if kind == "Warning":
            logger.info("policy %s: %s: %s", body.get("metadata", {}).get("name"), reason, message)
            kopf.warn(body, reason=reason, message=message)
        else:
            kopf.event(body, type=kind, reason=reason, message=message)


def _ours(configmap: Mapping[str, Any], policy_name: str) -> bool:
    """Left by an earlier policy of the same name (its owner is gone): taken over, not a conflict."""
    labels = (configmap.get("metadata") or {}).get("labels") or {}
    return bool(
        labels.get("app.kubernetes.io/managed-by") == "llmroute-operator"
        and labels.get(f"{GROUP}/policy") == policy_name
    )


def operator_options(settings: Settings, *, standalone: bool | None = None) -> dict[str, Any]:
    """Keyword arguments for `kopf.operator`/`kopf.run` derived from the settings."""
    peering = None if standalone else settings.peering
    return {
        "registry": registry,
        "standalone": peering is None,
        "peering_name": peering,
        "clusterwide": not settings.namespaces,
        "namespaces": list(settings.namespaces),
        "liveness_endpoint": f"http://0.0.0.0:{settings.health_port}/healthz",
    }


def run_operator(argv: list[str]) -> int:
    """`llmroute operator`: reconcile every LLMRoutePolicy until SIGTERM; settings from `LLMROUTE_*`."""
    parser = argparse.ArgumentParser(
        prog="llmroute operator", description="Reconcile LLMRoutePolicies into sidecar ConfigMaps."
    )
    parser.add_argument(
        "--namespace", "-n", action="append", default=None,
        help="serve only this namespace (repeatable; overrides LLMROUTE_NAMESPACES; default: all)",
    )  # fmt: skip
    parser.add_argument("--standalone", action="store_true", help="no peering, even if LLMROUTE_PEERING is set")
    parser.add_argument("--peering", help="kopf peering name for several replicas (overrides LLMROUTE_PEERING)")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        parser.error(str(exc))
    if args.namespace:
        settings = replace(settings, namespaces=tuple(args.namespace))
    if args.peering:
        settings = replace(settings, peering=args.peering)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    metrics.serve_operator_metrics(settings.metrics_port)
    asyncio.run(
        kopf.operator(memo=OperatorMemo(settings=settings), **operator_options(settings, standalone=args.standalone))
    )
    return 0
