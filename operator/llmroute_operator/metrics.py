"""The operator's and the webhook's own Prometheus metrics: reconciles, admissions, status-relay polls.

The sidecars say whether failover helps; these say whether the machinery around them works: policies
that fail to reconcile, pods admitted without the sidecar, a relay whose status pages cannot be read
(then every sidecar polls the pages itself, and the providers' WAFs start blocking them). The chart's
ServiceMonitor scrapes them and its PrometheusRule alerts on them (docs/runbook.md).

Call sites hold one line each (`reconciled("ok")`, `admitted(verdict)`, `relay_read(ok)`); the names
and labels live here. One registry per process: `llmroute operator` serves it on `LLMROUTE_METRICS_PORT`
(`serve_operator_metrics`), `llmroute webhook` on its relay listener's `GET /metrics` next to the relay's
board, which is read at scrape time (`relay_exposition`) rather than counted on the poll path.

    llmroute_operator_reconciles_total{result}   ok | invalid | conflict | api_error
    llmroute_operator_relay_reads_total{result}  ok | error   (the Shedding column's reads of the relay)
    llmroute_webhook_admissions_total{result}    injected | skipped | refused | admitted_without_sidecar | error
    llmroute_relay_pages                         status pages the relay polls
    llmroute_relay_polls_total{url}              completed polls of each page
    llmroute_relay_page_usable{url}              1 when the last poll gave a usable reading
    llmroute_relay_page_level{url}               the page's level, 0 none .. 3 critical
    llmroute_relay_last_good_poll_age_seconds{url}  since the last usable reading
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from llmroute_sidecar.statusboard import StatusBoard

    from .webhooks import Verdict

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
"""The process's operator and webhook metrics (the sidecar keeps its own registry per app)."""
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

ReconcileResult = Literal["ok", "invalid", "conflict", "api_error"]

_reconciles = Counter(
    "llmroute_operator_reconciles", "Policy reconciles, by result.", ["result"], registry=REGISTRY
)
_relay_reads = Counter(
    "llmroute_operator_relay_reads", "Reads of the status relay for the Shedding column, by result.", ["result"],
    registry=REGISTRY,
)
_admissions = Counter(
    "llmroute_webhook_admissions", "Pod admissions reviewed by the webhook, by result.", ["result"],
    registry=REGISTRY,
)
for _result in ("ok", "invalid", "conflict", "api_error"):  # every series exists from the start: rate() sees 0
    _reconciles.labels(_result)
for _result in ("ok", "error"):
    _relay_reads.labels(_result)
for _result in ("injected", "skipped", "refused", "admitted_without_sidecar", "error"):
    _admissions.labels(_result)


def reconciled(result: ReconcileResult) -> None:
    _reconciles.labels(result).inc()


def relay_read(ok: bool) -> None:
    _relay_reads.labels("ok" if ok else "error").inc()


def admitted(verdict: Verdict | None) -> None:
    """One admission answered with `verdict`; None: no answer (the policy could not be read, HTTP 500)."""
    _admissions.labels(admission_result(verdict)).inc()


def admission_result(verdict: Verdict | None) -> str:
    if verdict is None:
        return "error"
    if not verdict.allowed:
        return "refused"
    if verdict.patch:
        return "injected"
    return "admitted_without_sidecar" if verdict.warnings else "skipped"


class RelayCollector(Collector):
    """The relay board's pollers as metrics, read when Prometheus scrapes."""

    def __init__(self, board: StatusBoard) -> None:
        self.board = board

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        pollers = list(self.board.pollers.values())
        pages = GaugeMetricFamily("llmroute_relay_pages", "Status pages the relay polls.", value=len(pollers))
        polls = CounterMetricFamily("llmroute_relay_polls", "Completed polls of each status page.", labels=["url"])
        usable = GaugeMetricFamily(
            "llmroute_relay_page_usable", "1 when the page's last poll gave a usable reading.", labels=["url"]
        )
        level = GaugeMetricFamily(
            "llmroute_relay_page_level", "The page's level, 0 none .. 3 critical.", labels=["url"]
        )
        age = GaugeMetricFamily(
            "llmroute_relay_last_good_poll_age_seconds", "Seconds since the page's last usable reading.",
            labels=["url"],
        )
        for poller in pollers:
            url = poller.page.url
            polls.add_metric([url], poller.seq)
            reading = poller.reading
            if reading is not None:  # before the first poll there is nothing to say yet
                usable.add_metric([url], 1 if reading.usable else 0)
                level.add_metric([url], reading.level)
            if poller.last_good_at is not None:  # the pollers' clock is time.monotonic in a running relay
                age.add_metric([url], max(0.0, time.monotonic() - poller.last_good_at))
        yield from (pages, polls, usable, level, age)


def relay_exposition(board: StatusBoard | None) -> bytes:
    """The process's metrics, plus the relay board's when there is one."""
    text = generate_latest(REGISTRY)
    if board is not None:
        scratch = CollectorRegistry(auto_describe=False)
        scratch.register(RelayCollector(board))
        text += generate_latest(scratch)
    return text


def add_metrics_route(app: web.Application, board: StatusBoard | None) -> web.Application:
    """`GET /metrics` on `app` (the webhook's relay listener)."""

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=relay_exposition(board), headers={"Content-Type": CONTENT_TYPE})

    app.router.add_get("/metrics", metrics)
    return app


def serve_operator_metrics(port: int) -> None:
    """`GET /metrics` for the reconciler on `port` (0: not served), in prometheus-client's own thread:
    kopf owns the event loop and its liveness server; a scrape must not wait on a slow handler."""
    if port:
        start_http_server(port, addr="0.0.0.0", registry=REGISTRY)
        log.info("metrics on :%d/metrics", port)
