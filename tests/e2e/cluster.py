"""A real Kubernetes control plane on loopback for `make e2e`: etcd, kube-apiserver and
kube-controller-manager, built from their Go modules by `tests/e2e/apiserver/build.sh`.

The API server runs as a hardened cluster does: TLS with a CA of our own, client certificates and
service-account tokens (signed by a key of ours, issued through the TokenRequest API), RBAC
authorization, the default admission chain (MutatingAdmissionWebhook, PodSecurity, ServiceAccount...)
plus OwnerReferencesPermissionEnforcement. No kubelet and no scheduler: pods are admitted and stored,
never run. The controller manager runs only the controllers these tests rely on (Deployments make
ReplicaSets make Pods; garbage collection; namespaces; service accounts). Every process is started
with its own log file and stopped by its PID.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from tests.e2e.pki import Authority, signing_key
from tests.helm import helm_binary, kubectl_binary

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "tests" / "e2e" / "apiserver" / "build.sh"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
CONTROLLERS = (
    "deployment-controller",
    "replicaset-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "root-ca-certificate-publisher-controller",
)
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 60.0, interval: float = 0.2) -> T:
    """Poll `check` until it returns something other than None/False; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = check()
            if value is not None and value is not False:
                return value
        except (OSError, ApiError, subprocess.CalledProcessError) as exc:
            last_error = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last error: {last_error}")
        time.sleep(interval)


def build_binaries() -> dict[str, Path]:
    """Build (or find in .cache/e2e) etcd, kube-apiserver and kube-controller-manager."""
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, capture_output=True, text=True)
    return {name: Path(path) for name, _, path in (line.partition("=") for line in result.stdout.split())}


def versions(binaries: dict[str, Path]) -> str:
    """The versions of what runs, as `make e2e` prints them."""
    return ", ".join(
        f"{name} {path.parent.name.removeprefix(name + '-').rpartition('-')[0]}"
        for name, path in sorted(binaries.items())
    )


class CommandFailed(subprocess.CalledProcessError):
    """A helm or kubectl run that failed; its message carries what the tool printed on stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.stderr}"


class ApiError(RuntimeError):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"{status}: {body.get('message', body)}")
        self.status = status
        self.body = body


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`: always by our own PID."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)


def start_process(name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Process:
    log = log_dir / f"{name}.log"
    with log.open("ab") as out:
        popen = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    return Process(name, popen, log)


@dataclass
class Cluster:
    """The running control plane and the ways the tests talk to it."""

    server: str
    workdir: Path
    ca_path: Path
    admin_kubeconfig: Path
    client_cert: Path
    client_key: Path
    binaries: dict[str, Path]
    processes: list[Process] = field(default_factory=list)

    # --- the API, as the admin (client certificate) or with a bearer token ---------------------------

    def _context(self, token: str | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_path))
        if token is None:
            context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context

    def api(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> Any:
        """One API call; the decoded JSON answer, or ApiError with the server's Status."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.server + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", content_type)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, context=self._context(token), timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                status_body = json.loads(raw)
            except ValueError:
                status_body = {"message": raw.decode(errors="replace")}
            raise ApiError(exc.code, status_body) from None
        return json.loads(raw) if raw.strip().startswith((b"{", b"[")) else raw.decode()

    def get(self, path: str) -> dict[str, Any] | None:
        """The object at `path`, or None when the server says 404."""
        try:
            found: dict[str, Any] = self.api("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return found

    def apply(self, manifest: dict[str, Any] | str, *, kubeconfig: Path | None = None) -> str:
        """`kubectl apply --server-side` of one manifest (a dict or YAML text)."""
        text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
        return self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=text, kubeconfig=kubeconfig)

    def kubectl(self, *args: str, input: str | None = None, kubeconfig: Path | None = None, check: bool = True) -> str:
        result = subprocess.run(
            [str(kubectl_binary()), "--kubeconfig", str(kubeconfig or self.admin_kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise CommandFailed(result.returncode, ["kubectl", *args], result.stdout, result.stderr)
        return result.stdout if check else result.stdout + result.stderr

    def helm(self, *args: str) -> str:
        result = subprocess.run(
            [str(helm_binary()), "--kubeconfig", str(self.admin_kubeconfig), *args],
            capture_output=True,
            text=True,
            timeout=300,
            env={
                **os.environ,
                "HELM_CACHE_HOME": str(self.workdir / "helm" / "cache"),
                "HELM_CONFIG_HOME": str(self.workdir / "helm" / "config"),
                "HELM_DATA_HOME": str(self.workdir / "helm" / "data"),
            },
        )
        if result.returncode != 0:
            raise CommandFailed(result.returncode, ["helm", *args], result.stdout, result.stderr)
        return result.stdout

    # --- identities --------------------------------------------------------------------------------

    def service_account_token(self, namespace: str, name: str, seconds: int = 3600) -> str:
        """A token the server issues for a ServiceAccount (TokenRequest), as a projected volume gets."""
        review = self.api(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": seconds}},
        )
        token: str = review["status"]["token"]
        return token

    def token_kubeconfig(self, path: Path, token: str, user: str) -> Path:
        """A kubeconfig that authenticates with `token` only (what a pod's service account gives)."""
        write_kubeconfig(path, self.server, self.ca_path, user, {"token": token})
        return path


def write_kubeconfig(path: Path, server: str, ca_path: Path, user: str, credentials: dict[str, str]) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {"server": server, "certificate-authority": str(ca_path)}}],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": user, "context": {"cluster": "e2e", "user": user}}],
        "current-context": user,
    }
    path.touch(mode=0o600)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")


def _fail_if_exited(process: Process) -> None:
    if process.popen.poll() is not None:
        raise RuntimeError(f"{process.name} exited with {process.popen.returncode}:\n{process.tail()}")


@contextmanager
def running_cluster(workdir: Path) -> Iterator[Cluster]:
    """Start etcd, kube-apiserver and kube-controller-manager; stop all three on the way out."""
    binaries = build_binaries()
    pki_dir, logs = workdir / "pki", workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    authority = Authority()
    ca_path = pki_dir / "ca.crt"
    pki_dir.mkdir(parents=True, exist_ok=True)
    ca_path.write_bytes(authority.cert_pem)
    serving_cert, serving_key = authority.issue(
        "kube-apiserver", hosts=("127.0.0.1", "localhost", "kubernetes", "kubernetes.default.svc")
    ).write(pki_dir, "apiserver")
    client_cert, client_key = authority.issue("e2e-admin", organizations=("system:masters",), client=True).write(
        pki_dir, "admin"
    )
    sa_public, sa_private = signing_key().write(pki_dir, "service-accounts")

    etcd_port, etcd_peer_port, api_port = free_port(), free_port(), free_port()
    server = f"https://127.0.0.1:{api_port}"
    admin_kubeconfig = workdir / "admin.kubeconfig"
    write_kubeconfig(
        admin_kubeconfig,
        server,
        ca_path,
        "e2e-admin",
        {"client-certificate": str(client_cert), "client-key": str(client_key)},
    )
    cluster = Cluster(server, workdir, ca_path, admin_kubeconfig, client_cert, client_key, binaries)
    try:
        etcd = start_process(
            "etcd",
            [
                str(binaries["etcd"]),
                "--name=e2e",
                f"--data-dir={workdir / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{etcd_peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer_port}",
                f"--initial-cluster=e2e=http://127.0.0.1:{etcd_peer_port}",
                "--unsafe-no-fsync",  # a throwaway store: durability costs seconds on a busy disk
                "--log-level=warn",
            ],
            logs,
        )
        cluster.processes.append(etcd)
        apiserver = start_process(
            "kube-apiserver",
            [
                str(binaries["kube-apiserver"]),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--tls-cert-file={serving_cert}",
                f"--tls-private-key-file={serving_key}",
                f"--client-ca-file={ca_path}",
                "--authorization-mode=RBAC",
                "--anonymous-auth=false",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={sa_public}",
                f"--service-account-signing-key-file={sa_private}",
                "--service-cluster-ip-range=10.96.0.0/16",
                # The default chain (NamespaceLifecycle, ServiceAccount, PodSecurity, MutatingAdmissionWebhook,
                # ValidatingAdmissionWebhook, ResourceQuota...) plus what hardened clusters add.
                "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
                "--endpoint-reconciler-type=none",  # 127.0.0.1 is no valid endpoint of the kubernetes Service
                "--profiling=false",
            ],
            logs,
        )
        cluster.processes.append(apiserver)

        def ready() -> bool:
            _fail_if_exited(etcd)
            _fail_if_exited(apiserver)
            return cluster.api("GET", "/readyz", timeout=5) == "ok"

        wait_for("kube-apiserver /readyz", ready, timeout=180, interval=0.5)
        cluster.processes.append(
            start_process(
                "kube-controller-manager",
                [
                    str(binaries["kube-controller-manager"]),
                    f"--kubeconfig={admin_kubeconfig}",
                    "--leader-elect=false",
                    "--secure-port=0",
                    f"--controllers={','.join(CONTROLLERS)}",
                    f"--service-account-private-key-file={sa_private}",
                    f"--root-ca-file={ca_path}",
                ],
                logs,
            )
        )
        yield cluster
    finally:
        for process in reversed(cluster.processes):
            process.stop()
