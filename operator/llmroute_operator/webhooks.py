"""The admission server: injects the sidecar into pods, and relays status pages to the sidecars.

It runs as its own highly available Deployment (`llmroute webhook`), apart from the single active
reconciler, so pod creation never waits on a leader election. Two listeners in one process:

- `LLMROUTE_WEBHOOK_PORT` (8443, TLS from `LLMROUTE_WEBHOOK_TLS_DIR`): `POST /mutate-pods` takes an
  `admission.k8s.io/v1` AdmissionReview and answers with a base64 JSONPatch built by
  `injection.inject`; `GET /healthz`, `GET /readyz`.
- `LLMROUTE_RELAY_PORT` (8080, plain HTTP, cluster-internal): the sidecar's own status relay app
  (`GET /v1/statuspages`), fed by a `StatusBoard` configured with the providers of every policy.

Decisions made once, here: a pod naming a policy whose current spec is invalid or not yet rendered
into its ConfigMap gets the last good config, the one the ConfigMap holds (`status.configHash` and
`status.secretKeyRefs`), marked on the pod (`LAST_GOOD_ANNOTATION`) and reported as an Event on the
policy: an edit the operator refuses, or any edit while the operator is down, never blocks scale-ups,
evictions or drains. A pod naming a missing policy, one that never had a good config, or using one of
the sidecar's volume names, is refused, or admitted without the sidecar, per
`LLMROUTE_UNKNOWN_POLICY`. Policies are read from memory (`informer.PolicyInformer`, a list and a
watch); while that cache is not filled (or, with a direct source, the API is down or slower than
`API_READ_TIMEOUT`), the answer is HTTP 500, so the API server applies the webhook's `failurePolicy`.

The TLS certificate is re-read when its files change (cert-manager rotates it in the mounted Secret;
with `LLMROUTE_WEBHOOK_TLS_SECRET`, this process's `TlsKeeper` writes them).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import json
import logging
import signal
import ssl
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import aiohttp
import kopf
from aiohttp import web

from llmroute_sidecar.policy import LoadedPolicy, PolicyError, Provider
from llmroute_sidecar.reloading import Fingerprint, file_fingerprint

from . import LAST_GOOD_ANNOTATION, metrics
from .informer import PolicyInformer
from .injection import (
    SidecarSource,
    host_network_skip,
    inject,
    injection_conflicts,
    json_patch,
    last_good_source,
    requested_policy,
    sidecar_ports,
    sidecar_resources,
)
from .kubeapi import KubeApi, KubeApiError
from .reconcile import READY, load_cluster_policy, policy_event
from .settings import DEFAULT_PROVIDER_HOSTS, Settings, SettingsError
from .tls_keeper import TlsApi, TlsKeeper

if TYPE_CHECKING:
    from llmroute_sidecar.statusboard import StatusBoard

log = logging.getLogger(__name__)

MUTATE_PATH = "/mutate-pods"
ADMISSION_API = "admission.k8s.io/v1"
API_READ_TIMEOUT = 2.0
"""Seconds a policy read may take: well inside the API server's webhook timeout (5 s in the chart),
so a stuck read ends in our HTTP 500 (the failurePolicy decides) rather than the API server's timeout."""
API_LIST_TIMEOUT = 30.0
"""Seconds the relay's list of all policies may take (off the admission path, possibly large)."""
TLS_RELOAD_INTERVAL = 5.0
"""Seconds between checks of the TLS files for a rotated certificate."""
RELAY_FIRST_RETRY = 1.0
"""Seconds before the relay retries a failed policy list; doubled per failure up to its interval."""
LAG_EVENT_INTERVAL = 300.0
"""Seconds between two Events about the same policy being injected with the same last good config."""


class PolicySource(Protocol):
    """Where policies are read from (the API in production, kmock in tests)."""

    async def read_policy(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def list_policies(self) -> list[dict[str, Any]]: ...


class PolicyCache:
    """Policies by namespace/name for `ttl` seconds, absent ones included, so a scale-up costs one read.

    No lock is held across a read: a slow read of one policy must not delay admissions for others.
    Concurrent misses for the same policy share one read (an in-flight task per key); a failed read
    is not cached, so the next admission tries again.
    """

    def __init__(self, source: PolicySource, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        """Where policies are read (readiness asks it whether it is `synced`, when it can tell)."""
        self._ttl = ttl
        self._clock = clock
        self._entries: dict[tuple[str, str], tuple[float, dict[str, Any] | None]] = {}
        self._reading: dict[tuple[str, str], asyncio.Task[dict[str, Any] | None]] = {}

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        key = (namespace, name)
        entry = self._entries.get(key)
        if entry is not None and self._clock() - entry[0] < self._ttl:
            return entry[1]
        reading = self._reading.get(key)
        if reading is None or reading.done():  # done here only if cancelled before it ever ran
            reading = asyncio.create_task(self._read(key))
            # Retrieved here so a read whose waiters all went away logs no "exception never retrieved".
            reading.add_done_callback(lambda task: task.cancelled() or task.exception())
            self._reading[key] = reading
        # Shielded: one waiter giving up (its client disconnected) does not cancel the others' read.
        return await asyncio.shield(reading)

    async def _read(self, key: tuple[str, str]) -> dict[str, Any] | None:
        try:
            found = await self.source.read_policy(*key)
        finally:
            self._reading.pop(key, None)
        self._entries.pop(key, None)  # re-inserted last: the oldest entry is the first evicted
        self._entries[key] = (self._clock(), found)
        if len(self._entries) > 4096:
            self._entries.pop(next(iter(self._entries)))
        return found


@runtime_checkable
class EventSink(Protocol):
    """Where the webhook records Events (the API in production)."""

    async def create_event(self, namespace: str, event: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True)
class Lag:
    """A pod was injected with the last good config of a policy whose current spec is not in its ConfigMap."""

    namespace: str
    policy: str
    uid: str | None
    config_hash: str
    reason: str


class LagReporter:
    """Turns `Lag`s into Warning Events on the policy, at most one per policy, config and reason per
    `interval`, written off the admission path (a failed write is logged, never retried)."""

    def __init__(self, sink: EventSink | None, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._sink = sink
        self._interval = interval
        self._clock = clock
        self._sent: dict[tuple[str, str, str, str], float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def report(self, lag: Lag) -> None:
        key = (lag.namespace, lag.policy, lag.config_hash, lag.reason)
        now = self._clock()
        if self._sink is None or now - self._sent.get(key, -self._interval) < self._interval:
            return
        self._sent[key] = now
        if len(self._sent) > 4096:
            self._sent.pop(next(iter(self._sent)))
        task = asyncio.create_task(self._write(self._sink, lag))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, sink: EventSink, lag: Lag) -> None:
        policy = {"metadata": {"name": lag.policy, "namespace": lag.namespace, "uid": lag.uid}}
        event = policy_event(
            policy, kind="Warning", reason="InjectedLastGoodConfig", component="llmroute-webhook",
            message=f"new pods get the last good config (configHash {lag.config_hash}): the policy {lag.reason}",
            now=datetime.datetime.now(datetime.UTC),
        )  # fmt: skip
        try:
            await sink.create_event(lag.namespace, event)
        except Exception as exc:  # an Event is a courtesy: the pod is admitted either way
            log.warning("cannot record the last-good-config Event on %s/%s: %s", lag.namespace, lag.policy, exc)

    async def close(self) -> None:
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task


@dataclass
class Draining:
    """Set at SIGTERM: `/readyz` fails so the API server stops sending reviews; in-flight ones finish."""

    started: bool = False


DRAINING_KEY = web.AppKey("llmroute_draining", Draining)
SETTINGS_KEY = web.AppKey("llmroute_settings", Settings)
CACHE_KEY = web.AppKey("llmroute_policy_cache", PolicyCache)
LAG_KEY = web.AppKey("llmroute_lag_reporter", LagReporter)


@dataclass(frozen=True)
class Verdict:
    """The answer to one admission request."""

    allowed: bool
    patch: list[dict[str, Any]] | None = None
    message: str | None = None
    warnings: tuple[str, ...] = ()
    lag: Lag | None = None
    """Set when the pod got the policy's last good config rather than its current spec."""


def _bad_policy(settings: Settings, message: str) -> Verdict:
    if settings.unknown_policy == "allow":
        return Verdict(True, warnings=(f"{message}; the pod is admitted without the llmroute sidecar",))
    return Verdict(False, message=message)


def not_ready_reason(body: Mapping[str, Any], policy: LoadedPolicy) -> str | None:
    """Why the policy's ConfigMap cannot be trusted to hold `policy` yet, or None when it can.

    The operator sets Ready=True and `status.configHash` only after writing the ConfigMap; a pod
    injected before that would wait on a missing ConfigMap, or run the previous version of the policy.
    """
    status = body.get("status") or {}
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == READY), None)
    if ready is None:
        return "the operator has not reconciled it yet"
    if ready.get("status") != "True":
        return str(ready.get("message") or ready.get("reason") or f"Ready is {ready.get('status')}")
    if status.get("configHash") != policy.config_hash:
        return (
            f"its ConfigMap holds configHash {status.get('configHash')}, the current spec has "
            f"{policy.config_hash} (the operator has not caught up yet)"
        )
    return None


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
    if (skip := host_network_skip(pod)) is not None:
        return Verdict(True, warnings=(f"llmroute: not injected: {skip}",))
    notes = tuple(f"llmroute: {note}" for note in sidecar_resources(pod, settings)[1])
    if conflicts := injection_conflicts(pod, sidecar_ports(settings)):
        return _bad_policy(
            settings,
            f'llmroute: cannot add the sidecar of LLMRoutePolicy "{namespace}/{name}": {"; ".join(conflicts)} '
            "(names reserved for the sidecar)",
        )
    body = await policies.get(namespace, name)
    if body is None:
        return _bad_policy(settings, f'llmroute: LLMRoutePolicy "{name}" not found in namespace "{namespace}"')
    problem: str | None
    try:
        policy = load_cluster_policy(body, settings.provider_hosts)
    except PolicyError as exc:
        problem = f"is invalid: {'; '.join(exc.problems)}"
    else:
        reason = not_ready_reason(body, policy)
        problem = None if reason is None else f"is not Ready: {reason}"
    if problem is None:
        patch = json_patch(pod, inject(pod, SidecarSource.of(policy), settings))
        return Verdict(True, patch=patch or None, warnings=notes)
    last_good = last_good_source(name, body.get("status") or {})
    if last_good is None:  # never rendered: there is no config to give the pod
        return _bad_policy(settings, f'llmroute: LLMRoutePolicy "{namespace}/{name}" {problem}')
    note = f"configHash {last_good.config_hash}, because the policy {problem}"
    lagging = f'llmroute: LLMRoutePolicy "{namespace}/{name}": the sidecar gets its last good config, {note}'
    patch = json_patch(pod, inject(pod, last_good, settings, annotations={LAST_GOOD_ANNOTATION: note[:1024]}))
    uid = (body.get("metadata") or {}).get("uid")
    return Verdict(
        True,
        patch=patch or None,
        warnings=(lagging, *notes),
        lag=Lag(namespace, name, str(uid) if uid else None, last_good.config_hash, problem),
    )


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
        metrics.admitted(None)
        return web.json_response({"error": str(exc)}, status=500)
    metrics.admitted(verdict)
    if verdict.lag is not None:
        request.app[LAG_KEY].report(verdict.lag)
    return web.json_response(admission_response(admission["uid"], verdict))


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _ready(request: web.Request) -> web.Response:
    if request.app[DRAINING_KEY].started:
        return web.Response(status=503, text="draining\n")
    synced = getattr(request.app[CACHE_KEY].source, "synced", None)
    if isinstance(synced, asyncio.Event) and not synced.is_set():
        return web.Response(status=503, text="policy cache not filled yet\n")
    return web.Response(text="ok\n")


def build_webhook_app(
    settings: Settings, source: PolicySource, events: EventSink | None = None
) -> web.Application:
    """The admission app: `POST /mutate-pods`, `GET /healthz`, `GET /readyz`."""
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app[SETTINGS_KEY] = settings
    # An informer is already a cache kept current by a watch: a TTL on top would only delay edits.
    app[CACHE_KEY] = PolicyCache(source, 0 if isinstance(source, PolicyInformer) else settings.policy_cache_ttl)
    app[DRAINING_KEY] = Draining()
    sink = events if events is not None else source if isinstance(source, EventSink) else None
    app[LAG_KEY] = lag = LagReporter(sink, LAG_EVENT_INTERVAL)

    async def close_reporter(_: web.Application) -> None:
        await lag.close()

    app.on_cleanup.append(close_reporter)
    app.router.add_post(MUTATE_PATH, _mutate_pods)
    app.router.add_get("/healthz", _ok)
    app.router.add_get("/readyz", _ready)
    return app


def policy_providers(
    bodies: Sequence[Mapping[str, Any]], provider_hosts: Sequence[str] = DEFAULT_PROVIDER_HOSTS
) -> list[Provider]:
    """The providers of every valid policy (invalid ones are skipped: their sidecars keep the last good)."""
    providers: list[Provider] = []
    for body in bodies:
        try:
            providers.extend(load_cluster_policy(body, provider_hosts).spec.providers)
        except PolicyError:
            continue
    return providers


async def refresh_board(
    board: StatusBoard, source: PolicySource, provider_hosts: Sequence[str] = DEFAULT_PROVIDER_HOSTS
) -> int:
    """Point the board at the status pages of all policies; returns how many pages it polls."""
    board.configure(policy_providers(await source.list_policies(), provider_hosts))
    return len(board.pollers)


async def keep_board_fresh(
    board: StatusBoard,
    source: PolicySource,
    interval: float,
    *,
    first_retry: float = RELAY_FIRST_RETRY,
    provider_hosts: Sequence[str] = DEFAULT_PROVIDER_HOSTS,
) -> None:
    """Refresh the board now and every `interval` seconds, for as long as the relay runs.

    Any failure (API errors, dropped connections, a bug) keeps the pages polled so far and is retried
    after `first_retry` seconds, doubling up to `interval`. A failure is logged when it differs from
    the previous one, not on every retry, and the recovery once.
    """
    last_problem: str | None = None
    delay = first_retry
    while True:
        try:
            await refresh_board(board, source, provider_hosts)
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
            if problem != last_problem:
                # A traceback only for what is not a plain API failure: that would be a bug of ours.
                log.warning(
                    "status relay: cannot refresh the policies: %s", problem, exc_info=not isinstance(exc, KubeApiError)
                )
                last_problem = problem
            await asyncio.sleep(min(delay, interval))
            delay = min(delay * 2, interval)
            continue
        if last_problem is not None:
            log.info("status relay: policies refreshed again")
            last_problem = None
        delay = first_retry
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def _background(work: Coroutine[Any, Any, None] | None) -> AsyncIterator[None]:
    """Run `work` (if any) as a task for the lifetime of the block."""
    task = None if work is None else asyncio.create_task(work)
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@contextlib.asynccontextmanager
async def relay_board(settings: Settings, source: PolicySource) -> AsyncIterator[StatusBoard]:
    """A status board kept configured with every policy's pages, for the lifetime of the block."""
    from llmroute_sidecar.statusboard import StatusBoard

    async with aiohttp.ClientSession() as session:
        board = StatusBoard(session)
        refresher = asyncio.create_task(
            keep_board_fresh(board, source, settings.relay_refresh_interval, provider_hosts=settings.provider_hosts)
        )
        try:
            yield board
        finally:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
            await board.close()


def _server_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class WebhookTls:
    """One server `SSLContext` whose certificate follows `tls.crt`/`tls.key` as they are rotated.

    The listening socket keeps this one context; `load_cert_chain` on it changes what new handshakes
    present. A changed pair is first loaded into a scratch context: loading a certificate that does
    not match the current key into the live context drops that key, so a half-written pair (new
    certificate, old key) would break every handshake until the key arrived. Until it loads, the
    previous certificate is served, and the problem is logged once per state of the files.
    """

    def __init__(self, cert: Path, key: Path, *, wait: bool = False) -> None:
        """`wait`: the files may not exist yet (`TlsKeeper` writes them); until they do, every handshake
        fails, so the replica stays unready and the API server applies the failurePolicy."""
        self.cert, self.key = cert, key
        self.context = _server_context()
        self._reported: object = None
        self._loaded: tuple[Fingerprint, Fingerprint] | None = None
        if wait and not (cert.is_file() and key.is_file()):
            return
        self._loaded = self._identity()  # taken before loading: a change during the load is seen next time
        self.context.load_cert_chain(cert, key)

    def _identity(self) -> tuple[Fingerprint, Fingerprint]:
        return (file_fingerprint(self.cert), file_fingerprint(self.key))

    def reload_if_changed(self) -> bool:
        """Load the files again when they changed; whether the served certificate changed."""
        try:
            identity = self._identity()
        except OSError as exc:  # a file missing, e.g. removed by hand mid-rotation
            self._report(None, exc)
            return False
        if identity == self._loaded:
            return False
        try:
            _server_context().load_cert_chain(self.cert, self.key)
            # The files could still change between these two loads; if the second one fails, the next
            # check retries (`_loaded` is unchanged) and a consistent pair repairs the context.
            self.context.load_cert_chain(self.cert, self.key)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            self._report(identity, exc)
            return False
        self._loaded, self._reported = identity, None
        log.info("webhook TLS: loaded the rotated certificate from %s", self.cert)
        return True

    def _report(self, identity: object, exc: Exception) -> None:
        if (identity, str(exc)) != self._reported:
            if self._loaded is None:  # nothing served yet: the keeper has not written the pair
                log.info("webhook TLS: no certificate to serve yet (unready until there is): %s", exc)
            else:
                log.warning("webhook TLS: keeping the previous certificate, cannot load %s: %s", self.cert, exc)
            self._reported = (identity, str(exc))


def webhook_tls(settings: Settings) -> WebhookTls | None:
    """The server TLS from `tls.crt`/`tls.key`, or None when the directory has none (and no `TlsKeeper`
    will write them: with `webhook_tls_secret`, it waits for them)."""
    directory = Path(settings.webhook_tls_dir)
    cert, key = directory / "tls.crt", directory / "tls.key"
    if settings.webhook_tls_secret:
        return WebhookTls(cert, key, wait=True)
    if not (cert.is_file() and key.is_file()):
        return None
    return WebhookTls(cert, key)


async def keep_tls_fresh(tls: WebhookTls, interval: float) -> None:
    """Check the TLS files every `interval` seconds, for as long as the webhook runs."""
    while True:
        await asyncio.sleep(interval)
        try:
            tls.reload_if_changed()
        except Exception:  # never end the task: a certificate not reloaded expires in production
            log.exception("webhook TLS: unexpected error while checking the certificate files")


async def serve(
    settings: Settings,
    source: PolicySource,
    stop: asyncio.Event,
    *,
    tls_reload_interval: float = TLS_RELOAD_INTERVAL,
    events: EventSink | None = None,
) -> None:
    """Run both listeners until `stop` is set, then drain: `/readyz` fails at once, the listeners keep
    serving for `settings.shutdown_delay` (the API server and kube-proxy see the pod go unready), then
    close, and reviews in flight get `settings.drain_timeout` to finish."""
    from llmroute_sidecar.statusrelay import build_relay_app

    tls = webhook_tls(settings)
    context = None if tls is None else tls.context
    if tls is None:
        log.warning("no tls.crt/tls.key in %s: admission served over plain HTTP", settings.webhook_tls_dir)
    runners: list[web.AppRunner] = []
    async with (
        relay_board(settings, source) as board,
        _background(None if tls is None else keep_tls_fresh(tls, tls_reload_interval)),
    ):
        admission = build_webhook_app(settings, source, events)
        try:
            for app, port, ssl_context in (
                (admission, settings.webhook_port, context),
                (metrics.add_metrics_route(build_relay_app(board), board), settings.relay_port, None),
            ):
                runner = web.AppRunner(app, access_log=None, shutdown_timeout=settings.drain_timeout)
                await runner.setup()
                runners.append(runner)
                await web.TCPSite(runner, "0.0.0.0", port, ssl_context=ssl_context).start()
            log.info("admission on :%d, status relay on :%d", settings.webhook_port, settings.relay_port)
            await stop.wait()
            admission[DRAINING_KEY].started = True
            log.info("draining: unready now, closing in %gs", settings.shutdown_delay)
            await asyncio.sleep(settings.shutdown_delay)
        finally:
            for runner in reversed(runners):
                await runner.cleanup()


async def connect_api(connection: kopf.ConnectionInfo | None = None) -> KubeApi:
    """The webhook's API client: every read bounded (`API_READ_TIMEOUT`, `API_LIST_TIMEOUT`)."""
    return await KubeApi.connect(connection, request_timeout=API_READ_TIMEOUT, list_timeout=API_LIST_TIMEOUT)


def tls_keeper(settings: Settings, api: TlsApi) -> TlsKeeper | None:
    """The keeper of the webhook's own certificates (`webhook.tls.mode: operator`), or None."""
    if not settings.webhook_tls_secret:
        return None
    namespace, name = settings.webhook_tls_secret.split("/")
    return TlsKeeper(
        api, namespace=namespace, secret=name, configuration=settings.webhook_configuration,
        dns_names=settings.webhook_dns_names, directory=Path(settings.webhook_tls_dir),
    )  # fmt: skip


async def _main(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    api = await connect_api()
    informer = PolicyInformer(api)
    keeper = tls_keeper(settings, api)
    try:
        async with _background(informer.run()), _background(None if keeper is None else keeper.run()):
            await serve(settings, informer, stop, events=api)
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
