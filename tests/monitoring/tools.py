"""Real Prometheus tools for the monitoring tests: `promtool` and `prometheus` from Debian's package.

Like tests/helm.py finds helm without a manual step, `prometheus_tool` installs Debian's `prometheus`
package (it carries both binaries) when they are missing and the tests run as root with apt-get, as CI
does on a clean Debian machine; nothing is downloaded outside the distribution's package registry.
Without root and without the binaries the tests skip and say how to install them; under CI
(`CI=true`) a missing binary is an error, never a silent skip.

Also here: the chart rendered by the real helm, and its PrometheusRule as a plain rules file.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.helm import helm_binary

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "llmroute"
DASHBOARD = CHART / "dashboards" / "llmroute.json"
PACKAGE = "prometheus"
INSTALL_TIMEOUT = 900
INSTALL_HINT = f"apt-get install -y --no-install-recommends {PACKAGE}"


class ToolUnavailable(RuntimeError):
    """The binary is missing and cannot be installed here."""


def _apt_install() -> None:
    """`apt-get install prometheus`, once per machine even with several test processes at once."""
    lock_path = Path("/tmp/llmroute-apt-prometheus.lock")
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if shutil.which("promtool") and shutil.which("prometheus"):
            return  # another process installed it while we waited
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", PACKAGE]
        result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=INSTALL_TIMEOUT)
        if result.returncode != 0:  # most often: the package lists were never fetched on this machine
            update = subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env,
                                    timeout=INSTALL_TIMEOUT)
            result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=INSTALL_TIMEOUT)
            if result.returncode != 0:
                raise ToolUnavailable(
                    f"{' '.join(install)} failed:\n{update.stderr[-2000:]}\n{result.stderr[-2000:]}"
                )


@cache
def prometheus_tool(name: str) -> Path:
    """Path of `promtool` or `prometheus`, installing Debian's package first when needed and possible."""
    found = shutil.which(name)
    if found is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise ToolUnavailable(f"{name} not found; as root: {INSTALL_HINT}")
        _apt_install()
        found = shutil.which(name)
        if found is None:
            raise ToolUnavailable(f"{PACKAGE} installed, yet no {name} on PATH")
    return Path(found)


def require(name: str) -> Path:
    """The tool, or a skip with the reason (an error under CI: the suite must not pass by skipping)."""
    try:
        return prometheus_tool(name)
    except ToolUnavailable as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))


@cache
def render(*args: str) -> tuple[dict[str, Any], ...]:
    """The chart's manifests, rendered by the real helm with `--set` arguments (`json:key=value`:
    `--set-json`, for numbers that are not integers: `--set` hands those to the schema as strings)."""
    command = [str(helm_binary()), "template", "llmroute", str(CHART), "--namespace", "llmroute-system"]
    for value in args:
        command += ["--set-json", value.removeprefix("json:")] if value.startswith("json:") else ["--set", value]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def rule_groups(*args: str) -> list[dict[str, Any]]:
    """The rule groups of the chart's PrometheusRule (enabled, plus `args` overrides)."""
    manifests = render("monitoring.prometheusRule.enabled=true", *args)
    [rule] = [m for m in manifests if m["kind"] == "PrometheusRule"]
    groups: list[dict[str, Any]] = rule["spec"]["groups"]
    return groups


def write_rules(path: Path, *args: str) -> Path:
    """The PrometheusRule's groups as a Prometheus rules file (what the Prometheus Operator loads)."""
    path.write_text(yaml.safe_dump({"groups": rule_groups(*args)}, sort_keys=False))
    return path


def alerts(groups: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}
