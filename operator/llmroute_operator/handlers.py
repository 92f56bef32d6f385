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
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import kopf

from llmroute_sidecar.policy import PolicyError
from llmroute_sidecar.statuspolling import RelayUnavailable
from llmroute_sidecar.statusrelay import RelayClient

from . import GROUP, PLURAL, VERSION
from .kubeapi import KubeApi, KubeApiError
from .reconcile import (
    MISSING_SECRET,
    build_configmap,
    build_status,
    condition_is_true,
    configmap_name,
    configmap_patch,
    has_missing_secret,
    is_owned_by,
    load_cluster_policy,
    missing_secrets,
    referenced_secrets,
    shedding_providers,
)
from .settings import Settings, SettingsError

try:
    SETTINGS = Settings.from_env()
    """Read at import: kopf takes a timer's interval when the decorator runs."""
except SettingsError:
    SETTINGS = Settings()  # run_operator reads the environment again and reports the error

registry = kopf.OperatorRegistry()
"""The reconciler's own registry, so nothing else imported into the process adds handlers to it."""

API_RETRY_DELAY = 10.0


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
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # Events for problems, not for every log line
    settings.watching.server_timeout = 300
    # Replicas peering under one name: kopf pauses every replica that sees a peer of the same or a higher
    # priority, so equal priorities would pause them all. A random one per replica lets exactly one serve.
    settings.peering.priority = random.randint(1, 1_000_000)
    memo.kube = await KubeApi.connect(memo.connection)
    if memo.settings.status_relay:
        memo.relay_session = aiohttp.ClientSession()
        relay = RelayClient(memo.relay_session, memo.settings.status_relay)
        memo.refresher = asyncio.create_task(refresh_shedding(memo, relay, logging.getLogger("llmroute.operator")))


@kopf.on.cleanup(registry=registry)
async def stop(*, memo: OperatorMemo, **_: Any) -> None:
    if memo.kube is not None:
        await memo.kube.close()
        memo.kube = None
    if memo.refresher is not None:
        memo.refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await memo.refresher
        memo.refresher = None
    if memo.relay_session is not None:
        await memo.relay_session.close()
        memo.relay_session = None


@kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
@kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
@kopf.on.update(GROUP, VERSION, PLURAL, registry=registry)
async def reconcile_policy(
    *, body: kopf.Body, patch: kopf.Patch, memo: OperatorMemo, logger: kopf.Logger, **_: Any
) -> None:
    """Policy -> ConfigMap + status."""
    await _reconcile(body, patch, memo.api(), logger, memo.settings)


@kopf.timer(
    GROUP, VERSION, PLURAL,
    interval=SETTINGS.secret_recheck_interval, when=has_missing_secret, registry=registry,
)  # fmt: skip
async def recheck_secrets(
    *, body: kopf.Body, patch: kopf.Patch, memo: OperatorMemo, logger: kopf.Logger, **_: Any
) -> None:
    """A policy whose Secret is missing is reconciled again until the Secret shows up."""
    await _reconcile(body, patch, memo.api(), logger, memo.settings)


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
            for body in await memo.api().list_policies():
                await _refresh_policy_shedding(memo, body, pages)
        except (RelayUnavailable, KubeApiError) as exc:
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


async def _reconcile(
    body: kopf.Body, patch: kopf.Patch, kube: KubeApi, logger: kopf.Logger, settings: Settings
) -> None:
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
        patch.status.update(build_status(previous, policy=exc, generation=generation, now=now, configmap=target))
        logger.info("policy %s/%s is invalid: %s", namespace, name, exc)
        kopf.warn(body, reason="InvalidPolicy", message="; ".join(exc.problems))
        return

    kopf.adopt(desired, owner=body)
    conflict: str | None = None
    try:
        existing = await kube.read_configmap(namespace, target)
        if existing is None:
            await kube.create_configmap(namespace, desired)
            kopf.event(body, type="Normal", reason="ConfigMapCreated", message=f"{target}: {policy.config_hash}")
        elif not is_owned_by(existing, metadata.get("uid")) and not _ours(existing, name):
            conflict = f"ConfigMap {target} exists and is not managed by llmroute; rename or delete it"
            kopf.warn(body, reason="ConfigMapConflict", message=conflict)
        elif (changes := configmap_patch(existing, desired)) is not None:
            await kube.patch_configmap(namespace, target, changes)
            kopf.event(body, type="Normal", reason="ConfigMapUpdated", message=f"{target}: {policy.config_hash}")
        references = referenced_secrets(policy) if settings.check_secrets else []
        keys = {secret: await kube.read_secret_keys(namespace, secret) for secret, _ in references}
    except KubeApiError as exc:
        raise kopf.TemporaryError(f"Kubernetes API: {exc}", delay=API_RETRY_DELAY) from exc

    missing = missing_secrets(references, keys) if settings.check_secrets else None
    if missing and not condition_is_true(previous, MISSING_SECRET):
        kopf.warn(body, reason="MissingSecret", message="; ".join(missing))
    patch.status.update(
        build_status(
            previous, policy=policy, generation=generation, now=now, configmap=target,
            missing=missing, configmap_error=conflict,
        )
    )  # fmt: skip


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
    asyncio.run(
        kopf.operator(memo=OperatorMemo(settings=settings), **operator_options(settings, standalone=args.standalone))
    )
    return 0
