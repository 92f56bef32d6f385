"""The dashboard and the chart's monitoring objects, checked without a cluster.

The dashboard is generated (`make dashboards`) and must not drift; it must load into Grafana's own
schema types; every metric a panel or an alert reads must be one that some llmroute process exports.
The chart's objects must fit together: the PodMonitor selects the port the injector adds, the
ServiceMonitor's Services reach the ports the operator and webhook serve metrics on, and all of it is
off unless asked for.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace
from typing import Any

import pytest
from grafana_foundation_sdk.models.dashboard import Dashboard
from tests.monitoring.tools import DASHBOARD, alerts, render, rule_groups

from llmroute_operator import dashboardgen, metrics
from llmroute_operator.settings import SIDECAR_METRICS_PORT_NAME, Settings
from llmroute_sidecar.telemetry import Telemetry

MONITORING_KINDS = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}
ANNOUNCED = {"llmroute_ratelimit_remaining_ratio"}
"""Metrics the contract names for rate-limit-aware shedding, which exports them; the dashboard shows
them already (a panel without data until then)."""
SCRAPE = {"up"}
"""Series Prometheus itself writes for every target."""
_NAME = re.compile(r"\b(llmroute_[a-z_]+|process_[a-z_]+|up)\b")
_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panel_queries(document: dict[str, Any], legends: bool = False) -> list[Any]:
    """(panel title, PromQL[, legend]) for every query of every panel, rows' nested panels included."""
    queries: list[Any] = []
    for panel in document["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets") or []:
                row = (inner["title"], target["expr"], target.get("legendFormat", ""))
                queries.append(row if legends else row[:2])
    return queries


def families(expr: str) -> set[str]:
    names = set()
    for name in _NAME.findall(expr):
        for suffix in _SUFFIXES:
            if name.endswith(suffix) and name != "up":
                name = name.removesuffix(suffix)
                break
        names.add(name)
    return names


def exported() -> set[str]:
    """Metric families the sidecar, the operator and the webhook's relay export."""
    names = {m.name for m in Telemetry().registry.collect()}
    names |= {m.name for m in metrics.REGISTRY.collect()}
    names |= {m.name for m in metrics.RelayCollector(SimpleNamespace(pollers={})).collect()}  # type: ignore[arg-type]
    return names


def test_the_checked_in_dashboard_is_what_the_generator_builds() -> None:
    assert DASHBOARD.read_text() == dashboardgen.render(), "run `make dashboards`"


def test_the_dashboard_loads_into_grafanas_schema_types_unchanged() -> None:
    document = dashboard()
    assert json.loads(json.dumps(Dashboard.from_json(document).to_json(), default=_encode)) == document
    assert document["uid"] == dashboardgen.UID and document["title"]
    ids = [p["id"] for p in document["panels"]]
    assert len(ids) == len(set(ids))


def _encode(value: Any) -> Any:
    return value.to_json()


def test_every_panel_filters_by_namespace_and_app_and_every_metric_is_exported() -> None:
    document = dashboard()
    variables = {v["name"] for v in document["templating"]["list"]}
    assert {"datasource", "namespace", "app", "route"} <= variables
    known = {name.removesuffix("_total") for name in exported()} | exported() | SCRAPE | ANNOUNCED
    queries = panel_queries(document)
    assert len(queries) >= 18
    for title, expr in queries:
        assert 'namespace=~"$namespace"' in expr and 'app=~"$app"' in expr, title
        unknown = families(expr) - known
        assert not unknown, f"{title}: {unknown} is exported by nothing"
    for name, rule in alerts(rule_groups()).items():
        unknown = families(rule["expr"]) - known
        assert not unknown, f"{name}: {unknown} is exported by nothing"


def test_the_dashboard_covers_what_the_issue_asks_an_operator_to_watch() -> None:
    exprs = " ".join(expr for _, expr in panel_queries(dashboard()))
    for needed in ("llmroute_shed_total", "llmroute_retry_wait_seconds_bucket", "llmroute_circuit_open",
                   "llmroute_statuspage_indicator", "llmroute_retry_budget_available", "llmroute_cost_usd_total",
                   "llmroute_route_cost_usd_total", "process_cpu_seconds_total", "process_resident_memory_bytes",
                   "llmroute_ratelimit_remaining_ratio", 'degraded="true"'):
        assert needed in exprs, needed
    shed = next(p for p in dashboard()["panels"] if p["title"].startswith("Shed off the primary"))
    assert "by (route, reason)" in shed["targets"][0]["expr"]  # every reason, context-window and rate-limit too
    assert "context-window" in shed["description"] and "rate-limit" in shed["description"]


def test_monitoring_is_off_by_default() -> None:
    kinds = {m["kind"] for m in render()}
    assert not kinds & MONITORING_KINDS
    assert not [m for m in render() if m["kind"] == "ConfigMap" and "dashboard" in m["metadata"]["name"]]


def test_the_podmonitor_scrapes_the_port_the_injector_adds() -> None:
    manifests = render("monitoring.podMonitor.enabled=true", "monitoring.podMonitor.labels.release=kps")
    [monitor] = [m for m in manifests if m["kind"] == "PodMonitor"]
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == SIDECAR_METRICS_PORT_NAME
    assert monitor["spec"]["selector"] == {}  # app pods need no label: a pod without the port yields no target
    assert monitor["metadata"]["labels"]["release"] == "kps"
    webhook = next(m for m in manifests if m["kind"] == "Deployment" and m["metadata"]["name"].endswith("-webhook"))
    env = {e["name"]: e.get("value") for e in webhook["spec"]["template"]["spec"]["containers"][0]["env"]}
    port = int(env["LLMROUTE_SIDECAR_METRICS_PORT"])
    assert Settings.from_env({"LLMROUTE_SIDECAR_METRICS_PORT": str(port)}).sidecar_metrics_port == port == 9787


def test_a_podmonitor_without_a_sidecar_metrics_port_is_refused() -> None:
    with pytest.raises(AssertionError, match="sidecarMetricsPort"):
        render("monitoring.podMonitor.enabled=true", "monitoring.sidecarMetricsPort=0")


def test_the_servicemonitor_reaches_the_operator_and_webhook_metrics_ports() -> None:
    manifests = render("monitoring.serviceMonitor.enabled=true")
    [monitor] = [m for m in manifests if m["kind"] == "ServiceMonitor"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [m for m in manifests if m["kind"] == "Service"
                and all(m["metadata"]["labels"].get(k) == v for k, v in selector.items())]
    assert {s["metadata"]["name"] for s in services} == {"llmroute-operator-metrics", "llmroute-webhook-metrics"}
    [endpoint] = monitor["spec"]["endpoints"]
    deployments = {m["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]: m
                   for m in manifests if m["kind"] == "Deployment"}
    for service in services:
        [port] = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
        component = service["spec"]["selector"]["app.kubernetes.io/component"]
        container = deployments[component]["spec"]["template"]["spec"]["containers"][0]
        if component == "operator":
            assert port["targetPort"] == Settings().metrics_port
        else:
            [named] = [p for p in container["ports"] if p["name"] == port["targetPort"]]
            assert named["containerPort"] == Settings().relay_port  # the relay listener serves /metrics


def test_the_dashboard_configmap_carries_the_dashboard_for_the_grafana_sidecar() -> None:
    manifests = render("monitoring.dashboards.enabled=true", "monitoring.dashboards.namespace=grafana",
                       "monitoring.dashboards.annotations.grafana_folder=LLM")
    [configmap] = [m for m in manifests if m["kind"] == "ConfigMap" and "dashboard" in m["metadata"]["name"]]
    assert configmap["metadata"]["namespace"] == "grafana"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    assert json.loads(configmap["data"]["llmroute.json"]) == dashboard()


def test_the_schema_refuses_unknown_monitoring_keys() -> None:
    with pytest.raises(AssertionError, match="additional properties 'podMonitr' not allowed"):
        render("monitoring.podMonitr.enabled=true")
