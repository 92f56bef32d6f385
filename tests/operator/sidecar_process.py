"""The real sidecar CLI as a subprocess on loopback (`python -m llmroute_sidecar.cli sidecar`)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def get(url: str, method: str = "GET") -> tuple[int, str]:
    """Status and body of one request (no exception for HTTP errors)."""
    request = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def sidecar_environment(package_dir: Path | None, extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without llmroute/OTel settings, plus `extra`; with `package_dir` first
    on PYTHONPATH, so its `llmroute_sidecar` shadows the installed one."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("LLMROUTE_", "OTEL_"))}
    if package_dir is not None:
        environment["PYTHONPATH"] = str(package_dir)
    return {**environment, **extra}


@dataclass(frozen=True)
class Sidecar:
    url: str
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def running_sidecar(
    policy_file: Path, *, package_dir: Path | None = None, env: Mapping[str, str] | None = None, timeout: float = 30
) -> Iterator[Sidecar]:
    """The sidecar serving `policy_file` on a free loopback port, once `/healthz` answers there (the policy
    is loaded before the listener opens, so `/readyz` has decided by then); terminated on exit."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "llmroute_sidecar.cli", "sidecar", "--policy", str(policy_file)],
        env=sidecar_environment(package_dir, {"LLMROUTE_LISTEN": f"127.0.0.1:{port}", **(env or {})}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                stderr = process.stderr.read().decode() if process.stderr else ""
                raise AssertionError(f"the sidecar exited: {stderr}")
            with contextlib.suppress(OSError):
                if get(f"{url}/healthz")[0] == 200:
                    break
            assert time.monotonic() < deadline, f"the sidecar did not start within {timeout:g} s"
            time.sleep(0.05)
        yield Sidecar(url, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
