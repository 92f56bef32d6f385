"""Typed settings of the operator and the admission server, read once from the environment.

The chart configures both processes through `LLMROUTE_*` environment variables; this module is the
only place that reads them, so every knob has one name, one type, one default and one docstring.
A malformed value is a `SettingsError` at start-up, never a surprise at the first admission.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from llmroute_sidecar import __version__
from llmroute_sidecar.policy import DEFAULT_BASE_URLS

SIDECAR_PORT = 8787
"""The sidecar listens on loopback only: it holds the provider keys, so no other pod may reach it."""
SIDECAR_LISTEN = f"127.0.0.1:{SIDECAR_PORT}"
SIDECAR_METRICS_PORT = 9787
"""The injected sidecar's metrics-only listener on the pod IP (`llmroute_sidecar.metricsport`)."""
SIDECAR_METRICS_PORT_NAME = "llmroute-metric"
"""Its container port's name: what the chart's PodMonitor selects. The API server refuses a port name
longer than 15 characters (IANA_SVC_NAME), so `llmroute-metrics` would fail every injected pod."""
POLICY_MOUNT_DIR = "/etc/llmroute"
POLICY_FILE = f"{POLICY_MOUNT_DIR}/policy.json"

DEFAULT_PROVIDER_HOSTS: tuple[str, ...] = tuple(
    dict.fromkeys(urlsplit(url).hostname or "" for url in DEFAULT_BASE_URLS.values())
)
"""The vendors' API hosts: the only hosts a cluster policy may send keys to unless the operator's
allowlist (`LLMROUTE_PROVIDER_HOSTS`, the chart's `operator.providerHosts`) adds more."""

SIDECAR_HEALTH_PORT = 8788
"""The sidecar's probe-only listener on the pod IP (`/healthz`, `/readyz`), for the kubelet's httpGet."""

DEFAULT_RESOURCES: dict[str, dict[str, str]] = {
    "requests": {"cpu": "50m", "memory": "96Mi"},
    "limits": {"memory": "384Mi"},
}
"""The request covers the measured RSS (68 MB after `make bench`); the limit leaves room above it for the
sidecar's cap on buffered request bodies (`LLMROUTE_MAX_BUFFERED_BYTES`, 128 MiB) and their parsed copies."""


class SettingsError(ValueError):
    """An environment variable holds a value the operator cannot use."""


@dataclass(frozen=True)
class Settings:
    """Everything the operator and the webhook take from their environment."""

    namespaces: tuple[str, ...] = ()
    """`LLMROUTE_NAMESPACES`, comma-separated: namespaces the reconciler serves (kopf globs allowed);
    empty: all namespaces (cluster-wide)."""

    peering: str | None = None
    """`LLMROUTE_PEERING`: the kopf peering object shared by reconciler replicas (needs kopf's
    peering CRD); unset: standalone, for the single-replica reconciler the chart deploys."""

    health_port: int = 8081
    """`LLMROUTE_HEALTH_PORT`: the reconciler's liveness endpoint, `GET /healthz`."""

    secret_recheck_interval: float = 5.0
    """`LLMROUTE_SECRET_RECHECK_INTERVAL` (seconds): how often a policy whose Secrets are missing is
    checked again, so the MissingSecret condition clears soon after the Secret appears (one list of
    the policies per interval)."""

    report_uninjected_pods: bool = True
    """`LLMROUTE_REPORT_UNINJECTED_PODS` (`true`/`false`): at each ConfigMap resync, list the pods that opted
    in (by label, or in a labelled namespace) and report those without the sidecar on their policy."""

    configmap_resync_interval: float = 30.0
    """`LLMROUTE_CONFIGMAP_RESYNC_INTERVAL` (seconds): how often the operator lists its ConfigMaps and
    restores any that was deleted or edited behind its back."""

    check_secrets: bool = True
    """`LLMROUTE_CHECK_SECRETS` (`true`/`false`): read the Secrets a policy names (get, key names only) to
    report MissingSecret; false when the operator is given no access to Secrets."""

    shedding_refresh_interval: float = 30.0
    """`LLMROUTE_SHEDDING_REFRESH_INTERVAL` (seconds): how often each policy's `status.sheddingProviders`
    is refreshed from the status relay (`LLMROUTE_STATUS_RELAY`)."""

    metrics_port: int = 8082
    """`LLMROUTE_METRICS_PORT`: the reconciler's Prometheus metrics, `GET /metrics` (0: not served). The
    webhook serves its metrics on the relay port."""

    sidecar_metrics_port: int = SIDECAR_METRICS_PORT
    """`LLMROUTE_SIDECAR_METRICS_PORT`: the port of the injected sidecar's metrics-only listener, named
    `llmroute-metric` for the chart's PodMonitor (0: no such listener; `/metrics` stays loopback-only)."""

    webhook_port: int = 8443
    """`LLMROUTE_WEBHOOK_PORT`: the admission server (`POST /mutate-pods`, `/healthz`, `/readyz`)."""

    shutdown_delay: float = 5.0
    """`LLMROUTE_SHUTDOWN_DELAY` (seconds): after SIGTERM the admission server answers `/readyz` with 503
    and keeps serving this long, so the API server stops sending reviews to it before it closes."""

    drain_timeout: float = 20.0
    """`LLMROUTE_DRAIN_TIMEOUT` (seconds): how long reviews in flight when the listener closes may finish."""

    relay_port: int = 8080
    """`LLMROUTE_RELAY_PORT`: the status relay for sidecars (`GET /v1/statuspages`), plain HTTP."""

    webhook_tls_dir: str = "/etc/llmroute/tls"
    """`LLMROUTE_WEBHOOK_TLS_DIR`: holds `tls.crt` and `tls.key`; without them the admission server
    speaks plain HTTP (local runs and tests only: the API server requires TLS)."""

    webhook_tls_secret: str | None = None
    """`LLMROUTE_WEBHOOK_TLS_SECRET`, `namespace/name`: set (the chart's `webhook.tls.mode: operator`),
    the webhook keeps its CA and serving certificate in that Secret itself (`tls_keeper.py`), serves
    them from `webhook_tls_dir`, and sets the CA bundle on `webhook_configuration`."""

    webhook_configuration: str = "llmroute"
    """`LLMROUTE_WEBHOOK_CONFIGURATION`: the MutatingWebhookConfiguration whose caBundle it keeps."""

    webhook_dns_names: tuple[str, ...] = ()
    """`LLMROUTE_WEBHOOK_DNS_NAMES`, comma-separated: the names of its serving certificate (the Service's)."""

    unknown_policy: Literal["refuse", "allow"] = "refuse"
    """`LLMROUTE_UNKNOWN_POLICY`: a pod naming a policy that does not exist (or is invalid) is
    refused with a message saying so (`refuse`), or admitted without the sidecar (`allow`)."""

    policy_cache_ttl: float = 5.0
    """`LLMROUTE_POLICY_CACHE_TTL` (seconds): how long the webhook reuses a policy it read, so a
    Deployment scaling to 100 pods costs one API read, and an edit is picked up within seconds."""

    relay_refresh_interval: float = 30.0
    """`LLMROUTE_RELAY_REFRESH_INTERVAL` (seconds): how often the webhook lists all policies to
    learn which status pages the relay polls."""

    sidecar_image: str = f"ghcr.io/llmroute/llmroute:{__version__}"
    """`LLMROUTE_SIDECAR_IMAGE`: the image of the injected sidecar (the chart passes its own)."""

    sidecar_image_pull_policy: str = "IfNotPresent"
    """`LLMROUTE_SIDECAR_IMAGE_PULL_POLICY`."""

    status_relay: str | None = None
    """`LLMROUTE_STATUS_RELAY`: the relay's URL given to injected sidecars (e.g.
    `http://llmroute-relay.llmroute-system.svc:8080`); unset: sidecars poll status pages directly."""

    sidecar_resources: dict[str, dict[str, str]] = field(default_factory=lambda: dict(DEFAULT_RESOURCES))
    """`LLMROUTE_SIDECAR_RESOURCES`, JSON: the sidecar container's `resources`."""

    sidecar_user: int | None = None
    """`LLMROUTE_SIDECAR_USER`: a numeric uid and gid for the sidecar; unset: the image's own non-root
    user (65532), or whatever the platform assigns (OpenShift's restricted SCC picks one per namespace)."""

    sidecar_health_port: int = SIDECAR_HEALTH_PORT
    """`LLMROUTE_SIDECAR_HEALTH_PORT`: the injected sidecar's probe-only listener on the pod IP."""

    provider_hosts: tuple[str, ...] = DEFAULT_PROVIDER_HOSTS
    """The hosts a policy's `baseURL` may name (`*.example.com` matches its subdomains); any other is
    refused, so editing a policy cannot send a key elsewhere. The vendors' API hosts, plus
    `LLMROUTE_PROVIDER_HOSTS` (comma-separated: the chart's `operator.providerHosts`)."""

    skip_namespaces: tuple[str, ...] = ("kube-system", "kube-public", "kube-node-lease")
    """`LLMROUTE_SKIP_NAMESPACES`, comma-separated: never injected, whatever the chart's selector."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the settings; unset or empty variables keep their defaults."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}

        def get(name: str) -> str | None:
            raw = env.get(name, "").strip()
            return raw or None

        def number(name: str, key: str, kind: type[int] | type[float]) -> None:
            raw = get(name)
            if raw is None:
                return
            try:
                value = kind(raw)
            except ValueError:
                raise SettingsError(f"{name}: expected a number, got {raw!r}") from None
            if value < 0:
                raise SettingsError(f"{name}: must not be negative, got {raw!r}")
            values[key] = value

        def names(name: str, key: str) -> None:
            raw = get(name)
            if raw is not None:
                values[key] = tuple(part.strip() for part in raw.split(",") if part.strip())

        names("LLMROUTE_NAMESPACES", "namespaces")
        names("LLMROUTE_SKIP_NAMESPACES", "skip_namespaces")
        names("LLMROUTE_PROVIDER_HOSTS", "provider_hosts")
        names("LLMROUTE_WEBHOOK_DNS_NAMES", "webhook_dns_names")
        values["provider_hosts"] = tuple(dict.fromkeys((*DEFAULT_PROVIDER_HOSTS, *values.get("provider_hosts", ()))))
        values["peering"] = get("LLMROUTE_PEERING")
        number("LLMROUTE_HEALTH_PORT", "health_port", int)
        number("LLMROUTE_WEBHOOK_PORT", "webhook_port", int)
        number("LLMROUTE_METRICS_PORT", "metrics_port", int)
        number("LLMROUTE_SIDECAR_METRICS_PORT", "sidecar_metrics_port", int)
        number("LLMROUTE_SHUTDOWN_DELAY", "shutdown_delay", float)
        number("LLMROUTE_DRAIN_TIMEOUT", "drain_timeout", float)
        number("LLMROUTE_RELAY_PORT", "relay_port", int)
        number("LLMROUTE_SECRET_RECHECK_INTERVAL", "secret_recheck_interval", float)
        number("LLMROUTE_CONFIGMAP_RESYNC_INTERVAL", "configmap_resync_interval", float)
        number("LLMROUTE_SHEDDING_REFRESH_INTERVAL", "shedding_refresh_interval", float)
        number("LLMROUTE_POLICY_CACHE_TTL", "policy_cache_ttl", float)
        number("LLMROUTE_RELAY_REFRESH_INTERVAL", "relay_refresh_interval", float)
        number("LLMROUTE_SIDECAR_USER", "sidecar_user", int)
        number("LLMROUTE_SIDECAR_HEALTH_PORT", "sidecar_health_port", int)
        for name, key in (
            ("LLMROUTE_WEBHOOK_TLS_DIR", "webhook_tls_dir"),
            ("LLMROUTE_SIDECAR_IMAGE", "sidecar_image"),
            ("LLMROUTE_SIDECAR_IMAGE_PULL_POLICY", "sidecar_image_pull_policy"),
            ("LLMROUTE_STATUS_RELAY", "status_relay"),
            ("LLMROUTE_WEBHOOK_TLS_SECRET", "webhook_tls_secret"),
            ("LLMROUTE_WEBHOOK_CONFIGURATION", "webhook_configuration"),
        ):
            if (raw := get(name)) is not None:
                values[key] = raw
        for name, key in (
            ("LLMROUTE_CHECK_SECRETS", "check_secrets"),
            ("LLMROUTE_REPORT_UNINJECTED_PODS", "report_uninjected_pods"),
        ):
            if (flag := get(name)) is not None:
                if flag.lower() not in ("true", "false"):
                    raise SettingsError(f"{name}: expected true or false, got {flag!r}")
                values[key] = flag.lower() == "true"
        unknown = get("LLMROUTE_UNKNOWN_POLICY")
        if unknown is not None:
            if unknown not in ("refuse", "allow"):
                raise SettingsError(f"LLMROUTE_UNKNOWN_POLICY: expected refuse or allow, got {unknown!r}")
            values["unknown_policy"] = unknown
        secret = values.get("webhook_tls_secret")
        if secret is not None and (secret.count("/") != 1 or not all(secret.split("/"))):
            raise SettingsError(f"LLMROUTE_WEBHOOK_TLS_SECRET: expected namespace/name, got {secret!r}")
        if secret is not None and not values.get("webhook_dns_names"):
            raise SettingsError("LLMROUTE_WEBHOOK_DNS_NAMES: needed with LLMROUTE_WEBHOOK_TLS_SECRET")
        resources = get("LLMROUTE_SIDECAR_RESOURCES")
        if resources is not None:
            values["sidecar_resources"] = _parse_resources(resources)
        return cls(**values)


def _parse_resources(raw: str) -> dict[str, dict[str, str]]:
    try:
        parsed = json.loads(raw)
    except ValueError:
        raise SettingsError("LLMROUTE_SIDECAR_RESOURCES: not valid JSON") from None
    if not isinstance(parsed, dict) or not all(
        key in ("requests", "limits") and isinstance(value, dict) for key, value in parsed.items()
    ):
        raise SettingsError('LLMROUTE_SIDECAR_RESOURCES: expected {"requests": {...}, "limits": {...}}')
    return {key: {str(k): str(v) for k, v in value.items()} for key, value in parsed.items()}
