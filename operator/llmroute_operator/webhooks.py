"""The admission server: injects the sidecar into pods, and relays status pages to the sidecars.

It runs as its own highly available Deployment (`llmroute webhook`), apart from the single active
reconciler, so pod creation never waits on a leader election. Two listeners in one process:

- `LLMROUTE_WEBHOOK_PORT` (8443, TLS from `LLMROUTE_WEBHOOK_TLS_DIR`): `POST /mutate-pods` takes an
  `admission.k8s.io/v1` AdmissionReview and answers with a base64 JSONPatch built by
  `injection.inject`; `GET /healthz`, `GET /readyz`.
- `LLMROUTE_RELAY_PORT` (8080, plain HTTP, cluster-internal): the sidecar's own status relay app
  (`GET /v1/statuspages`), fed by a `StatusBoard` configured with the providers of every policy.

Decisions made once, here: a pod naming a missing or invalid policy is refused, or admitted without
the sidecar, per `LLMROUTE_UNKNOWN_POLICY`; when the policy cannot be read at all (API down), the
answer is HTTP 500, so the API server applies the webhook's `failurePolicy` from the chart.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import signal
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
from aiohttp import web

from llmroute_sidecar.policy import PolicyError, Provider, load_policy

from .injection import inject, json_patch, requested_policy
from .kubeapi import KubeApi, KubeApiError
from .settings import Settings, SettingsError

if TYPE_CHECKING:
    from llmroute_sidecar.statusboard import StatusBoard

log = logging.getLogger(__name__)

MUTATE_PATH = "/mutate-pods"
ADMISSION_API = "admission.k8s.io/v1"


class PolicySource(Protocol):
    """Where policies are read from (the API in production, kmock in tests)."""

    async def read_policy(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def list_policies(self) -> list[dict[str, Any]]: ...


class PolicyCache:
    """Policies by namespace/name for `ttl` seconds, absent ones included, so a scale-up costs one read."""

    def __init__(self, source: PolicySource, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._source = source
        self._ttl = ttl
        self._clock = clock
        self._entries: dict[tuple[str, str], tuple[float, dict[str, Any] | None]] = {}
        self._lock = asyncio.Lock()

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        key = (namespace, name)
        async with self._lock:
            entry = self._entries.get(key)
            if entry is not None and self._clock() - entry[0] < self._ttl:
                return entry[1]
            found = await self._source.read_policy(namespace, name)
            self._entries[key] = (self._clock(), found)
            if len(self._entries) > 4096:
                self._entries.pop(next(iter(self._entries)))
            return found


SETTINGS_KEY = web.AppKey("llmroute_settings", Settings)
CACHE_KEY = web.AppKey("llmroute_policy_cache", PolicyCache)


@dataclass(frozen=True)
class Verdict:
    """The answer to one admission request."""

    allowed: bool
    patch: list[dict[str, Any]] | None = None
    message: str | None = None
    warnings: tuple[str, ...] = ()


def _bad_policy(settings: Settings, message: str) -> Verdict:
    if settings.unknown_policy == "allow":
        return Verdict(True, warnings=(f"{message}; the pod is admitted without the llmroute sidecar",))
    return Verdict(False, message=message)


async def review_pod(request: Mapping[str, Any], settings: Settings, policies: PolicyCache) -> Verdict:
    """Decide about one AdmissionReview `request`: no patch, a patch, or a refusal."""
    kind = (request.get("kind") or {}).get("kind")
    pod = request.get("object")
    if kind != "Pod" or request.get("operation") != "CREATE" or not isinstance(pod, Mapping):
        return Verdict(True)
    namespace = str(request.get("namespace") or (pod.get("metadata") or {}).get("namespace") or "default")
    name = requested_policy(pod)
    if name is None or namespace in settings.skip_namespaces:
        return Verdict(True)
    body = await policies.get(namespace, name)
    if body is None:
        return _bad_policy(settings, f'llmroute: LLMRoutePolicy "{name}" not found in namespace "{namespace}"')
    try:
        policy = load_policy(body)
    except PolicyError as exc:
        return _bad_policy(
            settings, f'llmroute: LLMRoutePolicy "{namespace}/{name}" is invalid: {"; ".join(exc.problems)}'
        )
    patch = json_patch(pod, inject(pod, policy, settings))
    return Verdict(True, patch=patch or None)


def admission_response(uid: str, verdict: Verdict) -> dict[str, Any]:
    """The AdmissionReview to send back."""
    response: dict[str, Any] = {"uid": uid, "allowed": verdict.allowed}
    if verdict.patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(verdict.patch).encode()).decode()
    if not verdict.allowed:
        response["status"] = {"code": 403, "reason": "Forbidden", "message": verdict.message or "refused"}
    if verdict.warnings:
        response["warnings"] = list(verdict.warnings)
    return {"apiVersion": ADMISSION_API, "kind": "AdmissionReview", "response": response}


async def _mutate_pods(request: web.Request) -> web.Response:
    try:
        review = await request.json()
    except ValueError:
        return web.json_response({"error": "expected an AdmissionReview JSON body"}, status=400)
    admission = review.get("request") if isinstance(review, dict) else None
    if not isinstance(admission, dict) or not isinstance(admission.get("uid"), str):
        return web.json_response({"error": "expected an AdmissionReview with request.uid"}, status=400)
    try:
        verdict = await review_pod(admission, request.app[SETTINGS_KEY], request.app[CACHE_KEY])
    except KubeApiError as exc:
        # The chart's failurePolicy decides (Ignore: admitted uninjected; Fail: refused).
        log.warning("cannot read the policy for pod admission %s: %s", admission["uid"], exc)
        return web.json_response({"error": str(exc)}, status=500)
    return web.json_response(admission_response(admission["uid"], verdict))


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def build_webhook_app(settings: Settings, source: PolicySource) -> web.Application:
    """The admission app: `POST /mutate-pods`, `GET /healthz`, `GET /readyz`."""
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app[SETTINGS_KEY] = settings
    app[CACHE_KEY] = PolicyCache(source, settings.policy_cache_ttl)
    app.router.add_post(MUTATE_PATH, _mutate_pods)
    app.router.add_get("/healthz", _ok)
    app.router.add_get("/readyz", _ok)
    return app


def policy_providers(bodies: Sequence[Mapping[str, Any]]) -> list[Provider]:
    """The providers of every valid policy (invalid ones are skipped: their sidecars keep the last good)."""
    providers: list[Provider] = []
    for body in bodies:
        try:
            providers.extend(load_policy(body).spec.providers)
        except PolicyError:
            continue
    return providers


async def refresh_board(board: StatusBoard, source: PolicySource) -> int:
    """Point the board at the status pages of all policies; returns how many pages it polls."""
    board.configure(policy_providers(await source.list_policies()))
    return len(board.pollers)


async def keep_board_fresh(board: StatusBoard, source: PolicySource, interval: float) -> None:
    """Refresh the board now and every `interval` seconds; API failures keep the pages polled so far."""
    while True:
        try:
            await refresh_board(board, source)
        except KubeApiError as exc:
            log.warning("status relay: cannot list policies: %s", exc)
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def relay_board(settings: Settings, source: PolicySource) -> AsyncIterator[StatusBoard]:
    """A status board kept configured with every policy's pages, for the lifetime of the block."""
    from llmroute_sidecar.statusboard import StatusBoard

    async with aiohttp.ClientSession() as session:
        board = StatusBoard(session)
        refresher = asyncio.create_task(keep_board_fresh(board, source, settings.relay_refresh_interval))
        try:
            yield board
        finally:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
            await board.close()


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server TLS context from `tls.crt`/`tls.key`, or None when the directory has none."""
    directory = Path(settings.webhook_tls_dir)
    cert, key = directory / "tls.crt", directory / "tls.key"
    if not (cert.is_file() and key.is_file()):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


async def serve(settings: Settings, source: PolicySource, stop: asyncio.Event) -> None:
    """Run both listeners until `stop` is set."""
    from llmroute_sidecar.statusrelay import build_relay_app

    context = tls_context(settings)
    if context is None:
        log.warning("no tls.crt/tls.key in %s: admission served over plain HTTP", settings.webhook_tls_dir)
    runners: list[web.AppRunner] = []
    async with relay_board(settings, source) as board:
        try:
            for app, port, ssl_context in (
                (build_webhook_app(settings, source), settings.webhook_port, context),
                (build_relay_app(board), settings.relay_port, None),
            ):
                runner = web.AppRunner(app, access_log=None)
                await runner.setup()
                runners.append(runner)
                await web.TCPSite(runner, "0.0.0.0", port, ssl_context=ssl_context).start()
            log.info("admission on :%d, status relay on :%d", settings.webhook_port, settings.relay_port)
            await stop.wait()
        finally:
            for runner in reversed(runners):
                await runner.cleanup()


async def _main(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    api = await KubeApi.connect()
    try:
        await serve(settings, api, stop)
    finally:
        await api.close()


def run_webhook(argv: list[str]) -> int:
    """`llmroute webhook`: the admission server and status relay; settings from `LLMROUTE_*`."""
    parser = argparse.ArgumentParser(
        prog="llmroute webhook",
        description="Serve sidecar injection (mutating admission) and the status-page relay.",
    )
    parser.add_argument("--webhook-port", type=int, help="overrides LLMROUTE_WEBHOOK_PORT (8443)")
    parser.add_argument("--relay-port", type=int, help="overrides LLMROUTE_RELAY_PORT (8080)")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        parser.error(str(exc))
    overrides = {
        key: value
        for key, value in (("webhook_port", args.webhook_port), ("relay_port", args.relay_port))
        if value is not None
    }
    if overrides:
        settings = replace(settings, **overrides)
    asyncio.run(_main(settings))
    return 0
