"""A second listener that serves only `/metrics`, so Prometheus can scrape a sidecar inside a pod.

Why a second listener: the sidecar's own address stays loopback-only (`127.0.0.1:8787`), because
whoever reaches it spends the provider keys. Prometheus scrapes from another pod, at the pod IP. So
`LLMROUTE_METRICS_LISTEN` (the injector sets `0.0.0.0:9787` and names the container port
`llmroute-metric`, which the chart's PodMonitor selects) opens a listener whose app has exactly two
routes: `GET /metrics` (the same exposition as the main listener's) and `GET /healthz`. Nothing else is
routed there, so nothing that calls a provider is reachable off the pod. Unset: no second listener.
A port it cannot bind (the app uses it) is logged as `metrics_listener_failed` and the sidecar serves the
app all the same: metrics must never cost the LLM calls (the scrape failing is what the alerts see).
"""

from __future__ import annotations

from aiohttp import web

from .server import STATE

_MAIN_APP = web.AppKey("llmroute_main_app", web.Application)


async def _metrics(request: web.Request) -> web.Response:
    main = request.app[_MAIN_APP]
    if STATE not in main:  # the main app's resources are not up yet (or already gone)
        return web.Response(status=503, text="starting\n")
    body = main[STATE].telemetry.exposition()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def build_metrics_app(main: web.Application) -> web.Application:
    """The metrics-only app, reading the telemetry of the sidecar app `main`."""
    app = web.Application(client_max_size=1024)  # it takes no bodies
    app[_MAIN_APP] = main
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    return app


def parse_listen(listen: str) -> tuple[str, int]:
    """`host:port` (IPv6 hosts in brackets) -> (host, port); ValueError with the variable's name otherwise."""
    host, _, port = listen.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"LLMROUTE_METRICS_LISTEN: expected host:port, got {listen!r}") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"LLMROUTE_METRICS_LISTEN: port out of range in {listen!r}")
    return host.strip("[]") or "0.0.0.0", number


async def start_metrics_listener(main: web.Application, listen: str) -> web.AppRunner:
    """Serve `build_metrics_app(main)` on `listen`; the caller cleans the runner up after the main app."""
    host, port = parse_listen(listen)
    runner = web.AppRunner(build_metrics_app(main), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
