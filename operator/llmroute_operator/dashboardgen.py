"""Generates the Grafana dashboard the chart ships (`charts/llmroute/dashboards/llmroute.json`).

Built with Grafana's own `grafana-foundation-sdk` (typed builders for the dashboard schema) rather than
hand-written JSON, so a misspelt field is a type error, not a panel that silently shows nothing. The
generated file is checked in (the chart packages it; Helm cannot run Python) and `make check` fails when
it drifts from this module: `python -m llmroute_operator.dashboardgen` rewrites it.

What it answers, for the sidecars of one namespace, app and route (the template variables): which
target answers and the degraded share, why requests are shed (every reason, `context-window` and
`rate-limit` included), upstream calls per answer, the latency retries add, circuits and status pages
over time, retry-budget and rate-limit headroom, cost per provider and per route, and what the sidecar
itself costs in CPU and memory. Every query is evaluated against a real Prometheus in
tests/monitoring/test_prometheus_e2e.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from grafana_foundation_sdk.builders import common as viz
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, statetimeline, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as vizmodel
from grafana_foundation_sdk.models import dashboard as model

OUTPUT = Path(__file__).resolve().parents[2] / "charts" / "llmroute" / "dashboards" / "llmroute.json"
UID = "llmroute-sidecars"

PODS = 'namespace=~"$namespace", app=~"$app"'
"""The sidecars chosen by the namespace and app variables (labels the chart's PodMonitor adds)."""
ROUTES = PODS + ', route=~"$route"'
SIDECAR = 'container="llmroute", ' + PODS
"""The sidecar container's own process metrics (`process_*`), not the app's."""
RATE = "$__rate_interval"
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class PanelSpec:
    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]
    kind: Literal["timeseries", "statetimeline"] = "timeseries"
    mappings: tuple[tuple[int, str, str], ...] = ()
    """(value, text, color) for state panels."""


def _share(numerator: str, denominator: str, by: str) -> str:
    return f"sum by ({by}) ({numerator})\n  / sum by ({by}) ({denominator})"


ROWS: tuple[tuple[str, tuple[PanelSpec, ...]], ...] = (
    ("Answers", (
        PanelSpec(
            "Answers by target", "Answered requests per second, by the target that answered.", "reqps",
            (Query(f'sum by (route, target) (rate(llmroute_requests_total{{outcome="ok", {ROUTES}}}[{RATE}]))',
                   "{{route}} / {{target}}"),),
        ),
        PanelSpec(
            "Degraded share per route",
            "Share of answers that came from a target marked `degraded` (a fallback with its own prompt).",
            "percentunit",
            (Query(_share(f'rate(llmroute_requests_total{{outcome="ok", degraded="true", {ROUTES}}}[{RATE}])',
                          f'rate(llmroute_requests_total{{outcome="ok", {ROUTES}}}[{RATE}])', "route"),
                   "{{route}}"),),
        ),
        PanelSpec(
            "Requests by outcome",
            "ok, failed (every target failed), client_error, request_error, client_cancelled, stream_broken, ...",
            "reqps",
            (Query(f"sum by (route, outcome) (rate(llmroute_requests_total{{{ROUTES}}}[{RATE}]))",
                   "{{route}} {{outcome}}"),),
        ),
        PanelSpec(
            "Upstream attempts by result", "Every call to a provider, by result: errors by class.", "reqps",
            (Query(f"sum by (provider, result) (rate(llmroute_attempts_total{{{ROUTES}}}[{RATE}]))",
                   "{{provider}} {{result}}"),),
        ),
    )),
    ("Failover", (
        PanelSpec(
            "Shed off the primary, by reason",
            "Requests not answered by their primary and why: status-page, budget-exhausted, retry-budget, "
            "circuit-open, context-window, rate-limit, primary-error, quorum, hedge.",
            "reqps",
            (Query(f"sum by (route, reason) (rate(llmroute_shed_total{{{ROUTES}}}[{RATE}]))",
                   "{{route}} {{reason}}"),),
        ),
        PanelSpec(
            "Upstream calls per answer", "Attempts per answered request: 1.0 is no retry at all.", "none",
            (Query(_share(f"rate(llmroute_attempts_total{{{ROUTES}}}[{RATE}])",
                          f'rate(llmroute_requests_total{{outcome="ok", {ROUTES}}}[{RATE}])', "route"),
                   "{{route}}"),),
        ),
        PanelSpec(
            "Latency added by retries", "Backoff waited between retries within one request.", "s",
            tuple(
                Query(f"histogram_quantile({q}, sum by (le, route) "
                      f"(rate(llmroute_retry_wait_seconds_bucket{{{ROUTES}}}[{RATE}])))", f"{{{{route}}}} p{p}")
                for q, p in (("0.5", "50"), ("0.99", "99"))
            ),
        ),
        PanelSpec(
            "Time to answer", "Request duration, streams to their end.", "s",
            tuple(
                Query(f"histogram_quantile({q}, sum by (le, route) "
                      f"(rate(llmroute_request_duration_seconds_bucket{{{ROUTES}}}[{RATE}])))", f"{{{{route}}}} p{p}")
                for q, p in (("0.5", "50"), ("0.99", "99"))
            ),
        ),
        PanelSpec(
            "Quorum and hedge calls per request", "Extra parallel calls the route's quorum or hedging costs.",
            "none",
            (Query(_share(f'rate(llmroute_quorum_calls_total{{result=~"call|hedge", {ROUTES}}}[{RATE}])',
                          f"rate(llmroute_requests_total{{{ROUTES}}}[{RATE}])", "route"),
                   "{{route}}"),),
        ),
    )),
    ("Providers", (
        PanelSpec(
            "Circuit state", "A target's circuit opens when it failed with no success for longer than openAfter.",
            "none", (Query(f"max by (target) (llmroute_circuit_open{{{PODS}}})", "{{target}}"),),
            kind="statetimeline", mappings=((0, "closed", "green"), (1, "open", "red")),
        ),
        PanelSpec(
            "Status page", "The provider's status page as the sidecars read it.", "none",
            (Query(f"max by (provider) (llmroute_statuspage_indicator{{{PODS}}})", "{{provider}}"),),
            kind="statetimeline",
            mappings=((0, "operational", "green"), (1, "minor", "yellow"), (2, "major", "orange"),
                      (3, "critical", "red")),
        ),
        PanelSpec(
            "Retry-budget headroom", "Retries each provider's budget still allows (lowest sidecar).", "none",
            (Query(f"min by (provider) (llmroute_retry_budget_available{{{PODS}}})", "{{provider}}"),),
        ),
        PanelSpec(
            "Rate-limit headroom", "Remaining share of each provider's rate limits, from its headers (lowest).",
            "percentunit",
            (Query(f"min by (provider, dimension) (llmroute_ratelimit_remaining_ratio{{{PODS}}})",
                   "{{provider}} {{dimension}}"),),
        ),
    )),
    ("Cost and footprint", (
        PanelSpec(
            "Cost per provider", "USD per hour at the policy's pricing.", "currencyUSD",
            (Query(f"sum by (provider, model) (rate(llmroute_cost_usd_total{{{PODS}}}[{RATE}])) * 3600",
                   "{{provider}} {{model}}"),),
        ),
        PanelSpec(
            "Cost per route", "USD per hour at the policy's pricing.", "currencyUSD",
            (Query(f"sum by (route, provider) (rate(llmroute_route_cost_usd_total{{{ROUTES}}}[{RATE}])) * 3600",
                   "{{route}} {{provider}}"),),
        ),
        PanelSpec(
            "Sidecar CPU", "CPU cores used by the sidecar process, per pod.", "none",
            (Query(f"sum by (pod) (rate(process_cpu_seconds_total{{{SIDECAR}}}[{RATE}]))", "{{pod}}"),),
        ),
        PanelSpec(
            "Sidecar memory (RSS)", "Resident memory of the sidecar process, per pod.", "bytes",
            (Query(f"max by (pod) (process_resident_memory_bytes{{{SIDECAR}}})", "{{pod}}"),),
        ),
    )),
)


def _panel(spec: PanelSpec, panel_id: int) -> timeseries.Panel | statetimeline.Panel:
    panel = timeseries.Panel() if spec.kind == "timeseries" else statetimeline.Panel()
    panel.id(panel_id).title(spec.title).description(spec.description).unit(spec.unit).datasource(DATASOURCE)
    panel.height(8).span(12)
    panel.legend(
        viz.VizLegendOptions().show_legend(True).display_mode(vizmodel.LegendDisplayMode.LIST)
        .placement(vizmodel.LegendPlacement.BOTTOM)
    )
    panel.tooltip(viz.VizTooltipOptions().mode(vizmodel.TooltipDisplayMode.MULTI).sort(vizmodel.SortOrder.NONE))
    for index, query in enumerate(spec.queries):
        panel.with_target(
            prometheus.Dataquery().expr(query.expr).legend_format(query.legend).ref_id(chr(ord("A") + index))
        )
    if spec.mappings:
        panel.mappings([
            model.ValueMap(options={str(value): model.ValueMappingResult(text=text, color=color, index=i)
                                    for i, (value, text, color) in enumerate(spec.mappings)})
        ])
    if isinstance(panel, timeseries.Panel):
        panel.fill_opacity(10).line_width(1)
    return panel


def _variable(name: str, label: str, query: str) -> dash.QueryVariable:
    return (
        dash.QueryVariable(name).label(label).datasource(DATASOURCE).query(query)
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED).multi(True).include_all(True).all_value(".*")
        .sort(model.VariableSort.ALPHABETICAL_ASC)
    )


def build() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model."""
    builder = (
        dash.Dashboard("llmroute: failover sidecars").uid(UID).tags(["llmroute"])
        .description("Is failover helping? Answers, sheds, retries, circuits, status pages and cost of the "
                     "llmroute sidecars.")
        .time("now-3h", "now").refresh("30s").timezone("browser").tooltip(model.DashboardCursorSync.CROSSHAIR)
        .with_variable(dash.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(_variable("namespace", "Namespace", "label_values(llmroute_requests_total, namespace)"))
        .with_variable(_variable("app", "App", 'label_values(llmroute_requests_total{namespace=~"$namespace"}, app)'))
        .with_variable(_variable(
            "route", "Route", 'label_values(llmroute_requests_total{namespace=~"$namespace", app=~"$app"}, route)'
        ))
    )
    panel_id = 0
    for title, panels in ROWS:
        panel_id += 1
        builder.with_row(dash.Row(title).id(panel_id))
        for spec in panels:
            panel_id += 1
            builder.with_panel(_panel(spec, panel_id))
    document: dict[str, Any] = json.loads(json.dumps(builder.build(), cls=JSONEncoder))
    return document


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmroute_operator.dashboardgen", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--check", action="store_true", help="fail when the checked-in dashboard differs")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.is_file() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: run `make dashboards`", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
