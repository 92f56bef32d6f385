"""End to end: a real Prometheus scrapes a running sidecar through the demo's incident, and every
dashboard query and alert expression is answered by it.

The fast demo scenario (examples/scenarios/quick.yaml: a 2 s microspike, a 25 s outage, a status page
that notices late) plays through the real sidecar app with the demo policy, as `llmroute demo --quick`
runs it, at 2.5x. Debian's `prometheus` (on loopback) scrapes the sidecar's metrics-only listener every
500 ms with the labels the chart's PodMonitor adds, and evaluates the chart's own rules (rendered by
helm, with windows and durations shortened to the compressed clock). Then, through Prometheus's HTTP API:

- every dashboard panel query returns data over the run (a panel whose metric the sidecar does not
  export yet, `ANNOUNCED` in test_dashboard_and_chart, is reported and skipped);
- every alert expression evaluates without error;
- the outage alerts (fallback share, circuit open) fire during the outage; no alert fires before it,
  through the microspike; and they are resolved again by the end of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import random
import re
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from tests.monitoring.test_dashboard_and_chart import ANNOUNCED, dashboard, families, panel_queries
from tests.monitoring.tools import ROOT, alerts, require, rule_groups, write_rules

from llmroute_sidecar.metricsport import start_metrics_listener
from llmroute_sidecar.policy import load_policy
from llmroute_sidecar.server import create_app
from llmroute_sidecar.simulator.scenarios import World, load_scenario, pick_route, scale_policy
from llmroute_sidecar.simulator.traffic import TrafficDriver
from llmroute_sidecar.statuspages import DEFAULT_MIN_INTERVAL

SPEED = 2.5
SCRAPE = "500ms"
TARGET_LABELS = {"namespace": "demo", "pod": "demo-0", "container": "llmroute", "app": "demo"}
"""What the chart's PodMonitor puts on a sidecar's series (its relabelings and the operator's defaults)."""
RATE_INTERVAL = "2s"
"""Grafana's `$__rate_interval`: four scrape intervals."""
RULE_VALUES = (
    "monitoring.prometheusRule.rateWindow=2s",
    f"monitoring.prometheusRule.interval={SCRAPE}",
    "monitoring.prometheusRule.fallback.for=1s",
    "monitoring.prometheusRule.circuitOpen.for=1s",
    "monitoring.prometheusRule.statusPageOutage.for=1s",
)
OUTAGE_ALERTS = ("LLMRouteFallbackHigh", "LLMRouteCircuitOpen")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Prometheus:
    url: str
    session: aiohttp.ClientSession

    async def api(self, path: str, **params: str) -> Any:
        async with self.session.get(f"{self.url}/api/v1/{path}", params=params) as response:
            body = await response.json()
        assert body["status"] == "success", body
        return body["data"]

    async def firing(self) -> set[str]:
        data = await self.api("alerts")
        return {a["labels"]["alertname"] for a in data["alerts"] if a["state"] == "firing"}


@contextlib.asynccontextmanager
async def running_prometheus(directory: Path, metrics_port: int, rules: Path) -> AsyncIterator[Prometheus]:
    port = _free_port()
    config = {
        "global": {"scrape_interval": SCRAPE, "scrape_timeout": "400ms", "evaluation_interval": SCRAPE},
        "rule_files": [str(rules)],
        "scrape_configs": [{
            "job_name": "demo/llmroute-sidecars",
            "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"], "labels": TARGET_LABELS}],
        }],
    }
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (directory / "prometheus.log").open("w")
    process = await asyncio.create_subprocess_exec(
        str(require("prometheus")), f"--config.file={directory / 'prometheus.yml'}",
        f"--storage.tsdb.path={directory / 'data'}", f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
        stdout=log, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            prometheus = Prometheus(f"http://127.0.0.1:{port}", session)
            deadline = time.monotonic() + 60
            while True:
                assert process.returncode is None, (directory / "prometheus.log").read_text()
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{prometheus.url}/-/ready") as response:
                        if response.status == 200:
                            break
                assert time.monotonic() < deadline, "Prometheus did not become ready"
                await asyncio.sleep(0.1)
            yield prometheus
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 20)
            except TimeoutError:
                process.kill()
                await process.wait()
        log.close()


def grafana(expr: str) -> str:
    """A panel query as Grafana sends it with every variable at All."""
    for name in ("namespace", "app", "route"):
        expr = expr.replace(f"${name}", ".*")
    return expr.replace("$__rate_interval", RATE_INTERVAL)


@pytest.mark.timeout(240)
async def test_prometheus_answers_every_panel_and_fires_the_outage_alerts_only_in_the_outage(
    tmp_path: Path,
) -> None:
    require("prometheus")
    scenario = load_scenario(ROOT / "examples" / "scenarios" / "quick.yaml")
    [outage] = [p for p in scenario.providers["primary"].phases if p.kind == "outage"]
    document = yaml.safe_load((ROOT / "examples" / "demo-policy.yaml").read_text())
    route_name = pick_route(document, scenario.traffic.route)
    route = next(r for r in document["spec"]["routes"] if r["name"] == route_name)
    route["quorum"] = {"sample": 0.05}  # so the quorum panel has calls to show
    rules = write_rules(tmp_path / "rules.yaml", *RULE_VALUES)
    world = World(scenario, SPEED, scenario.seed)
    random.seed(world.seed)
    timeline: list[tuple[float, set[str]]] = []

    async with world:
        policy = load_policy(world.bind(scale_policy(copy.deepcopy(document), SPEED), route_name))
        app = create_app(policy=policy, statuspage_min_interval=DEFAULT_MIN_INTERVAL / SPEED)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        sidecar_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        metrics_port = _free_port()
        metrics_runner = await start_metrics_listener(app, f"127.0.0.1:{metrics_port}")
        try:
            async with running_prometheus(tmp_path, metrics_port, rules) as prometheus:
                deadline = time.monotonic() + 30
                while not (await prometheus.api("query", query='up{container="llmroute"} == 1'))["result"]:
                    assert time.monotonic() < deadline, "Prometheus never scraped the sidecar"
                    await asyncio.sleep(0.2)
                loaded = policy.spec.route(route_name)
                assert loaded is not None
                driver = TrafficDriver(
                    sidecar_url, route_name, scenario.traffic, scenario.duration, world.clock, seed=world.seed,
                    request_timeout=loaded.overall_deadline + loaded.first_byte_timeout() + 2.0,
                )
                started = time.time()
                world.clock.start()
                run = asyncio.create_task(driver.run(stop_drain=2.0))
                while not run.done():
                    timeline.append((world.clock.now(), await prometheus.firing()))
                    await asyncio.wait({run}, timeout=0.25)
                records = run.result()
                ended = time.time()
                async with aiohttp.ClientSession() as session, session.get(f"{sidecar_url}/metrics") as response:
                    exposition = await response.text()

                exported = {line.split("{")[0].split(" ")[0] for line in exposition.splitlines()
                            if line and not line.startswith("#")}
                empty: list[str] = []
                panels: dict[str, list[tuple[str, list[list[Any]]]]] = {}
                for title, expr, legend in panel_queries(dashboard(), legends=True):
                    data = await prometheus.api(
                        "query_range", query=grafana(expr), start=f"{started:.3f}", end=f"{ended:.3f}", step="1"
                    )
                    has_data = any(series["values"] for series in data["result"])
                    panels.setdefault(title, []).extend(
                        (_legend(legend, series["metric"]), series["values"]) for series in data["result"]
                    )
                    names = families(expr)
                    if not has_data and names & ANNOUNCED and not any(n.startswith(tuple(names)) for n in exported):
                        continue  # announced, not exported by this sidecar yet
                    if not has_data:
                        empty.append(f"{title}: {expr}")
                assert not empty, "panels without data:\n" + "\n".join(empty)

                for name, rule in alerts(rule_groups(*RULE_VALUES)).items():
                    await prometheus.api("query", query=rule["expr"])  # evaluates without error
                    assert name

                level = await prometheus.api(
                    "query", query=f"max_over_time(llmroute_statuspage_indicator[{int(ended - started) + 5}s])"
                )
                page_outage = any(float(r["value"][1]) >= 3 for r in level["result"])
        finally:
            await metrics_runner.cleanup()
            await runner.cleanup()

    if picture := os.environ.get("LLMROUTE_DASHBOARD_PNG"):
        draw_panels(panels, started, Path(picture))  # README's picture: `make dashboard-picture`
    assert len(records) > 100
    before_outage = [(t, alerts_) for t, alerts_ in timeline if t < outage.start]
    assert before_outage and all(not firing for _, firing in before_outage), (
        f"alerts before the outage (microspike included): {[a for a in before_outage if a[1]]}"
    )
    during = set().union(*(firing for t, firing in timeline if outage.start <= t <= outage.end + 10))
    for alert in OUTAGE_ALERTS:
        assert alert in during, f"{alert} never fired during the outage; seen: {during}"
    if page_outage:
        assert "LLMRouteStatusPageOutage" in set().union(*(firing for _, firing in timeline))
    late = [firing for t, firing in timeline if t > scenario.duration - 10]
    assert late and not (late[-1] & set(OUTAGE_ALERTS)), f"still firing at the end: {late[-1]}"


def _legend(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)


def draw_panels(panels: dict[str, list[tuple[str, list[list[Any]]]]], started: float, path: Path) -> None:
    """The dashboard's panels as Prometheus answered them in this run, drawn on one picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = list(panels)
    columns = 3
    rows = -(-len(titles) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(15, 2.6 * rows), squeeze=False)
    for axis, title in zip(axes.flat, titles, strict=False):
        for legend, values in panels[title]:
            xs = [(float(t) - started) * SPEED for t, _ in values]
            ys = [float(v) for _, v in values]
            axis.plot(xs, ys, linewidth=1.2, label=legend)
        axis.set_title(title, fontsize=9)
        axis.tick_params(labelsize=7)
        if panels[title]:
            axis.legend(fontsize=6, loc="upper right")
        else:
            axis.text(0.5, 0.5, "no data (not exported yet)", ha="center", va="center", fontsize=8,
                      transform=axis.transAxes)
    for axis in list(axes.flat)[len(titles):]:
        axis.axis("off")
    figure.suptitle("llmroute dashboard, queried from Prometheus during `quick.yaml` (scenario seconds)",
                    fontsize=11)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
