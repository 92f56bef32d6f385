"""The injected sidecar's metrics listener: what the chart's PodMonitor scrapes, with no change to the app."""

from __future__ import annotations

import re
from dataclasses import replace

import jsonpatch
import pytest

from llmroute_operator.injection import inject, json_patch
from llmroute_operator.settings import SIDECAR_METRICS_PORT_NAME, Settings, SettingsError

from .test_injection import SETTINGS, a_pod, env, patched, policy


def test_the_sidecar_gets_a_named_metrics_port_on_the_pod_ip_and_the_app_is_untouched() -> None:
    original = a_pod()
    pod = patched(original)

    sidecar = pod["spec"]["initContainers"][0]
    assert sidecar["ports"] == [{"name": SIDECAR_METRICS_PORT_NAME, "containerPort": 9787, "protocol": "TCP"}]
    assert env(sidecar)["LLMROUTE_METRICS_LISTEN"] == "0.0.0.0:9787"
    assert env(sidecar)["LLMROUTE_LISTEN"] == "127.0.0.1:8787"  # the proxy itself stays on loopback
    for before, after in zip(original["spec"]["containers"], pod["spec"]["containers"], strict=True):
        assert after.get("ports") == before.get("ports")  # no port of ours on app containers
        assert "LLMROUTE_METRICS_LISTEN" not in env(after)
    assert pod["metadata"]["labels"] == original["metadata"]["labels"]


def test_every_sidecar_port_name_is_one_the_api_server_accepts() -> None:
    """IANA_SVC_NAME, as the API server validates a container port name (the offline OpenAPI schema has no
    such rule, so only `make e2e` saw `llmroute-metrics` refused): at most 15 characters, lowercase letters,
    digits and single inner hyphens, at least one letter."""
    sidecar = patched(a_pod())["spec"]["initContainers"][0]
    names = [port["name"] for port in sidecar["ports"]]
    assert names == [SIDECAR_METRICS_PORT_NAME]
    for name in names:
        assert len(name) <= 15 and re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", name), name
        assert "--" not in name and re.search(r"[a-z]", name), name


def test_a_zero_metrics_port_injects_no_listener() -> None:
    settings = replace(SETTINGS, sidecar_metrics_port=0)
    pod = a_pod()
    result = jsonpatch.apply_patch(pod, json_patch(pod, inject(pod, policy(), settings)), in_place=False)
    sidecar = result["spec"]["initContainers"][0]
    assert "ports" not in sidecar
    assert "LLMROUTE_METRICS_LISTEN" not in env(sidecar)


def test_the_ports_come_from_the_environment() -> None:
    settings = Settings.from_env({"LLMROUTE_SIDECAR_METRICS_PORT": "9900", "LLMROUTE_METRICS_PORT": "0"})
    assert (settings.sidecar_metrics_port, settings.metrics_port) == (9900, 0)
    assert (Settings().sidecar_metrics_port, Settings().metrics_port) == (9787, 8082)
    with pytest.raises(SettingsError, match="LLMROUTE_SIDECAR_METRICS_PORT"):
        Settings.from_env({"LLMROUTE_SIDECAR_METRICS_PORT": "nine"})
