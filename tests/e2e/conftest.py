"""Fixtures of `make e2e`: one real control plane per session, the chart installed into it with the real
helm, and the operator and the webhook run as local processes configured as the chart's Deployments
configure them (their environment is read from the rendered manifests), authenticated with tokens the
API server issues for the chart's ServiceAccounts.

Every test module here is marked `e2e`; `make test` deselects them (pyproject's addopts), `make e2e`
selects them. Process logs are kept in the session's temporary directory.
"""

from __future__ import annotations

import base64
import os
import ssl
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.e2e.cluster import ROOT, Cluster, Process, free_port, running_cluster, start_process, versions, wait_for
from tests.e2e.pki import Authority

RELEASE = "llmroute"
RELEASE_NAMESPACE = "llmroute-system"
APP_NAMESPACE = "demo"
CRD = "llmroutepolicies.llmroute.dev"
CHART = ROOT / "charts" / "llmroute"
LLMROUTE = Path(sys.executable).parent / "llmroute"
OPERATOR_ACCOUNT = f"{RELEASE}-operator"
WEBHOOK_ACCOUNT = f"{RELEASE}-webhook"
TLS_SECRET = f"{RELEASE}-webhook-tls"


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("cluster")) as running:
        print(f"\ne2e control plane: {versions(running.binaries)} at {running.server}")
        yield running


@dataclass
class Release:
    """The installed chart and what the out-of-cluster webhook needs to serve it."""

    cluster: Cluster
    webhook_port: int
    values: list[str]

    def manifests(self) -> list[dict[str, Any]]:
        """The release's rendered objects, as helm stored them."""
        text = self.cluster.helm("get", "manifest", RELEASE, "-n", RELEASE_NAMESPACE)
        return [doc for doc in yaml.safe_load_all(text) if doc]

    def manifest(self, kind: str, name: str) -> dict[str, Any]:
        for doc in self.manifests():
            if doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
        raise LookupError(f"{kind} {name} is not in the release")

    def upgrade(self, *extra: str) -> None:
        """`helm upgrade` with the install's values plus `extra`; it takes back fields a test edited
        (helm 4 applies server-side: without --force-conflicts another manager's edit blocks it)."""
        self.cluster.helm(
            "upgrade", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE, "--force-conflicts", *self.values, *extra
        )


def _webhook_tls_secret(authority: Authority, pair_hosts: tuple[str, ...]) -> dict[str, Any]:
    """The chart's TLS Secret, made beforehand for a loopback webhook and marked for Helm to adopt. The
    chart reuses an existing Secret (it looks it up), so caBundle comes from this one's ca.crt."""
    pair = authority.issue(f"{RELEASE}-webhook.{RELEASE_NAMESPACE}.svc", hosts=pair_hosts)

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {
            "name": TLS_SECRET,
            "namespace": RELEASE_NAMESPACE,
            "labels": {"app.kubernetes.io/managed-by": "Helm"},
            "annotations": {"meta.helm.sh/release-name": RELEASE, "meta.helm.sh/release-namespace": RELEASE_NAMESPACE},
        },
        "data": {"ca.crt": b64(authority.cert_pem), "tls.crt": b64(pair.cert_pem), "tls.key": b64(pair.key_pem)},
    }


@pytest.fixture(scope="session")
def release(cluster: Cluster) -> Release:
    """`helm install` of the chart, its webhook pointed at a loopback URL (webhook.url), the CRD Established,
    and the app namespace under Pod Security `restricted`."""
    cluster.api("POST", "/api/v1/namespaces", {"metadata": {"name": RELEASE_NAMESPACE}})
    cluster.api(
        "POST",
        f"/api/v1/namespaces/{RELEASE_NAMESPACE}/secrets",
        _webhook_tls_secret(Authority(f"{RELEASE}-webhook-ca"), ("127.0.0.1",)),
    )
    webhook_port = free_port()
    values = [
        "--set", f"webhook.url=https://127.0.0.1:{webhook_port}/mutate-pods",
        # helm mode: the pair above (its certificate names 127.0.0.1); operator mode names the Service only.
        "--set", "webhook.tls.mode=helm",
        # test_loop's fake providers listen on loopback: an admin adds the host to the operator's allowlist.
        "--set", "operator.providerHosts={127.0.0.1}",
    ]  # fmt: skip
    cluster.helm("install", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE, *values)
    cluster.kubectl("wait", f"crd/{CRD}", "--for=condition=Established", "--timeout=60s")
    cluster.api(
        "POST",
        "/api/v1/namespaces",
        {
            "metadata": {
                "name": APP_NAMESPACE,
                "labels": {
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/enforce-version": "latest",
                },
            }
        },
    )
    default_account = f"/api/v1/namespaces/{APP_NAMESPACE}/serviceaccounts/default"  # pods need it
    wait_for("the controller manager to make the default ServiceAccount", lambda: cluster.get(default_account))
    return Release(cluster, webhook_port, values)


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


def chart_environment(deployment: dict[str, Any], **overrides: str) -> dict[str, str]:
    """The plain `value` env of a Deployment's container as the chart renders it, with `overrides`."""
    env = {item["name"]: str(item["value"]) for item in _container(deployment).get("env", []) if "value" in item}
    env.update(overrides)
    return env


@dataclass
class Component:
    """`llmroute operator` or `llmroute webhook` as a local process, started and stopped by the tests."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_dir: Path
    process: Process | None = None
    starts: list[Process] = field(default_factory=list)
    ca_pem: bytes = b""
    """The CA that vouches for the webhook's serving certificate (the webhook only)."""

    def start(self) -> Process:
        assert self.process is None or self.process.popen.poll() is not None, f"{self.name} is running"
        self.process = start_process(f"{self.name}-{len(self.starts)}", self.argv, self.log_dir, self.env)
        self.starts.append(self.process)
        return self.process

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def log(self) -> str:
        return "\n".join(p.log.read_text(encoding="utf-8", errors="replace") for p in self.starts)


def _base_env(kubeconfig: Path) -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")
    env = {name: os.environ[name] for name in keep if name in os.environ}
    env["KUBECONFIG"] = str(kubeconfig)
    return env


@pytest.fixture(scope="session")
def relay_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def operator(release: Release, relay_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Component]:
    """The reconciler, authenticated as the chart's operator ServiceAccount (a token the server issued)."""
    cluster = release.cluster
    workdir = tmp_path_factory.mktemp("operator")
    token = cluster.service_account_token(RELEASE_NAMESPACE, OPERATOR_ACCOUNT)
    kubeconfig = cluster.token_kubeconfig(workdir / "kubeconfig", token, OPERATOR_ACCOUNT)
    deployment = release.manifest("Deployment", f"{RELEASE}-operator")
    env = _base_env(kubeconfig) | chart_environment(
        deployment,
        LLMROUTE_HEALTH_PORT=str(free_port()),
        LLMROUTE_STATUS_RELAY=f"http://127.0.0.1:{relay_port}",
        LLMROUTE_SHEDDING_REFRESH_INTERVAL="1",
        LLMROUTE_CONFIGMAP_RESYNC_INTERVAL="2",  # the resync also reports uninjected pods; 30 s by default
    )
    component = Component("operator", [str(LLMROUTE), *_container(deployment)["args"]], env, workdir)
    component.start()
    yield component
    component.stop()


def write_as_kubelet(directory: Path, files: dict[str, bytes]) -> None:
    """Files of a Secret or ConfigMap volume laid out as the kubelet's atomic writer does: the data in a
    fresh timestamped folder, `..data` a symlink to it (swapped by a rename), each file a symlink through
    `..data`."""
    directory.mkdir(parents=True, exist_ok=True)
    version = directory / f"..2026_12_01_00_00_00.{len(list(directory.glob('..2*')))}"
    version.mkdir()
    for name, data in files.items():
        (version / name).write_bytes(data)
    link = directory / "..data_tmp"
    link.symlink_to(version.name)
    link.replace(directory / "..data")
    for name in files:
        target = directory / name
        if not target.is_symlink():
            target.symlink_to(f"..data/{name}")


@pytest.fixture(scope="session")
def webhook(release: Release, relay_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Component]:
    """The injector and status relay, serving the TLS pair of the chart's Secret (as its pod mounts it) on
    the port the chart's webhook.url names, authenticated as the chart's webhook ServiceAccount."""
    cluster = release.cluster
    workdir = tmp_path_factory.mktemp("webhook")
    secret = cluster.api("GET", f"/api/v1/namespaces/{RELEASE_NAMESPACE}/secrets/{TLS_SECRET}")
    deployment = release.manifest("Deployment", f"{RELEASE}-webhook")
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    mounted = {item["path"]: base64.b64decode(secret["data"][item["key"]]) for item in volume["secret"]["items"]}
    write_as_kubelet(workdir / "tls", mounted)
    token = cluster.service_account_token(RELEASE_NAMESPACE, WEBHOOK_ACCOUNT)
    kubeconfig = cluster.token_kubeconfig(workdir / "kubeconfig", token, WEBHOOK_ACCOUNT)
    env = _base_env(kubeconfig) | chart_environment(
        deployment,
        LLMROUTE_WEBHOOK_TLS_DIR=str(workdir / "tls"),
        LLMROUTE_WEBHOOK_PORT=str(release.webhook_port),
        LLMROUTE_RELAY_PORT=str(relay_port),
        LLMROUTE_STATUS_RELAY=f"http://127.0.0.1:{relay_port}",
        LLMROUTE_RELAY_REFRESH_INTERVAL="1",
    )
    ca_pem = base64.b64decode(secret["data"]["ca.crt"])
    component = Component("webhook", [str(LLMROUTE), *_container(deployment)["args"]], env, workdir, ca_pem=ca_pem)
    component.start()
    wait_webhook_ready(component, release.webhook_port, ca_pem)
    yield component
    component.stop()


def wait_webhook_ready(component: Component, port: int, ca_pem: bytes) -> None:
    """Until the webhook answers /readyz over TLS with a certificate the chart's CA vouches for."""
    context = ssl.create_default_context(cadata=ca_pem.decode())

    def ready() -> bool:
        assert component.process is not None
        if component.process.popen.poll() is not None:
            raise RuntimeError(f"the webhook exited:\n{component.process.tail()}")
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/readyz", context=context, timeout=2) as answer:
            return bool(answer.status == 200)

    wait_for("the webhook's /readyz", ready, timeout=60)


KEYS_SECRET = "llm-keys"
KEYS = {"anthropic": "sk-ant-e2e-anthropic-key", "openai": "sk-e2e-openai-key"}
POLICIES = f"/apis/llmroute.dev/v1alpha1/namespaces/{APP_NAMESPACE}/llmroutepolicies"


@pytest.fixture(scope="session")
def app_keys(release: Release) -> dict[str, str]:
    """The app namespace's provider keys, in the Secret the example policies reference."""
    release.cluster.api(
        "POST",
        f"/api/v1/namespaces/{APP_NAMESPACE}/secrets",
        {"metadata": {"name": KEYS_SECRET}, "stringData": KEYS},
    )
    return KEYS


def policy_manifest(
    name: str, *, model: str = "claude-sonnet-4-5", routes: tuple[str, ...] = ("chat",)
) -> dict[str, Any]:
    """A small valid cluster policy: keys from the app's Secret, one target per route."""
    return {
        "apiVersion": "llmroute.dev/v1alpha1",
        "kind": "LLMRoutePolicy",
        "metadata": {"name": name, "namespace": APP_NAMESPACE},
        "spec": {
            "providers": [
                {
                    "name": "claude",
                    "type": "anthropic",
                    "apiKey": {"secretKeyRef": {"name": KEYS_SECRET, "key": "anthropic"}},
                }
            ],
            "routes": [
                {"name": route, "targets": [{"name": "primary", "provider": "claude", "model": model}]}
                for route in routes
            ],
        },
    }


def condition(policy: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    for item in ((policy or {}).get("status") or {}).get("conditions") or []:
        if item.get("type") == kind:
            found: dict[str, Any] = item
            return found
    return None


def wait_reconciled(cluster: Cluster, name: str, *, timeout: float = 60.0) -> dict[str, Any]:
    """The policy once Ready=True for its current generation."""

    def reconciled() -> dict[str, Any] | None:
        policy = cluster.get(f"{POLICIES}/{name}")
        ready = condition(policy, "Ready")
        status = (policy or {}).get("status") or {}
        current = policy is not None and status.get("observedGeneration") == policy["metadata"]["generation"]
        return policy if current and ready and ready["status"] == "True" else None

    return wait_for(f"policy {name} to be reconciled", reconciled, timeout=timeout)
