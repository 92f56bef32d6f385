"""`llmroute`: the one command line for the sidecar, the operator and the tools around them.

    llmroute sidecar --policy FILE      run the sidecar (listen: LLMROUTE_LISTEN, default 127.0.0.1:8787)
    llmroute validate FILE              check a policy; exit 1 with a `path: message` line per problem
    llmroute render FILE                the sidecar config the operator would write (policy.json)
    llmroute operator                   the kopf operator (reconciles policies into sidecar config)
    llmroute webhook                    the injection webhook and status relay
    llmroute demo / simulate            fake providers, real sidecar: see failover work

This module is the composition root: it is the only place that reaches into both components, and it
imports each lazily so `llmroute sidecar` never loads kopf.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from pathlib import Path

import orjson

from .environment import (
    DEFAULT_LISTEN,
    EnvironmentProblem,
    SidecarEnvironment,
    listen_address,
    log_level,
    read_environment,
)

COMMANDS = {
    "operator": "run the Kubernetes operator: reconcile LLMRoutePolicies into sidecar ConfigMaps",
    "webhook": "run the sidecar-injection admission webhook and the status-page relay",
    "demo": "watch failover work: fake providers, a fake status page and the real sidecar (about a minute)",
    "simulate": "compare failover strategies on a scenario through the real sidecar",
    "top": "a live terminal view of a running sidecar: routes, targets, circuits, status pages, fallback share",
}
"""Commands whose arguments their own parser reads (`llmroute demo --help`)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llmroute",
        description="llmroute: keep an app's LLM features up when a provider has a bad hour.",
        epilog="`llmroute COMMAND --help` describes a command's options.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sidecar = commands.add_parser(
        "sidecar", help="run the failover sidecar for a policy file (listens on 127.0.0.1:8787)",
        description="Serve the route API and the Anthropic/OpenAI-compatible endpoints for a policy file. "
        "Environment: LLMROUTE_LISTEN, LLMROUTE_LOG_LEVEL, LLMROUTE_STATUS_RELAY, LLMROUTE_MAX_IN_FLIGHT, "
        "LLMROUTE_MAX_BUFFERED_BYTES, LLMROUTE_STREAM_IDLE_TIMEOUT, LLMROUTE_IDLE_TIMEOUT.",
    )  # fmt: skip
    sidecar.add_argument("--policy", required=True, type=Path,
                         help="policy file (YAML or JSON); watched: a valid change applies without a restart")
    sidecar.add_argument("--listen", default=None,
                         help=f"host:port to listen on (default: LLMROUTE_LISTEN, else {DEFAULT_LISTEN})")
    sidecar.add_argument("--drain-timeout", type=float, default=25.0, help="seconds to finish in-flight work")
    validate = commands.add_parser(
        "validate", help="check a policy file and list every problem found, with its field path"
    )
    validate.add_argument("file", type=Path, help="policy file (YAML or JSON)")
    render = commands.add_parser("render", help="print the sidecar config (policy.json) the operator would write")
    render.add_argument("file", type=Path, help="policy file (YAML or JSON)")
    for name, text in COMMANDS.items():
        commands.add_parser(name, help=text, add_help=False)
    args, rest = parser.parse_known_args(argv)
    try:
        level = log_level()
    except EnvironmentProblem as exc:
        print(f"llmroute: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=level, format="%(message)s")

    if args.command == "sidecar":
        try:
            environment = read_environment()
            listen = args.listen if args.listen is not None else os.environ.get("LLMROUTE_LISTEN") or DEFAULT_LISTEN
            host, port = listen_address(listen, "--listen" if args.listen is not None else "LLMROUTE_LISTEN")
        except EnvironmentProblem as exc:
            print(f"llmroute sidecar: {exc}", file=sys.stderr)
            return 2
        return run_sidecar(args.policy, f"{host}:{port}", args.drain_timeout, environment)
    if args.command in ("validate", "render"):
        return _validate_or_render(args.file, render=args.command == "render")
    if args.command == "operator":
        from llmroute_operator.handlers import run_operator

        return run_operator(rest)
    if args.command == "top":
        from .top import main as top

        return top(rest)
    if args.command == "webhook":
        from llmroute_operator.webhooks import run_webhook

        return run_webhook(rest)
    from .simulator import cli as simulator_cli

    return simulator_cli.main(args.command, rest)


def _validate_or_render(path: Path, render: bool) -> int:
    from .policy import PolicyError, parse_policy_text, render_sidecar_config

    try:
        policy = parse_policy_text(path.read_bytes())
    except OSError as exc:
        print(f"{path}: {exc.strerror}", file=sys.stderr)
        return 1
    except PolicyError as exc:
        for problem in exc.problems:
            print(f"{path}: {problem}", file=sys.stderr)
        return 1
    for warning in policy.warnings:
        print(f"{path}: warning: {warning}", file=sys.stderr)
    if render:
        sys.stdout.write(orjson.dumps(render_sidecar_config(policy), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(f"{path}: policy {policy.name} is valid ({len(policy.spec.routes)} routes, hash {policy.config_hash})")
    return 0


def run_sidecar(
    policy: Path, listen: str, drain_timeout: float, environment: SidecarEnvironment | None = None
) -> int:
    """Serve until SIGTERM/SIGINT, then drain: fail readiness, finish in-flight requests, stop."""
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    # One log line per request: skip what no line of ours prints (logging HOWTO, "Optimization").
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    if not policy.exists():
        # Waiting for a mount that appears later is fine; waiting in silence is not.
        logging.getLogger("llmroute").warning(orjson.dumps({
            "event": "policy_missing",
            "policy": str(policy),
            "message": f"policy file {policy} does not exist; serving /healthz and waiting for it "
                       "(/readyz answers 503 until a valid policy loads)",
        }).decode())  # fmt: skip
    host, port = listen_address(listen)
    asyncio.run(serve(policy, host, port, drain_timeout, environment or SidecarEnvironment()))
    return 0


GC_GEN0_THRESHOLD = 5_000
"""Allocations between young-generation collections (CPython's default: 700)."""


def _tune_gc() -> None:
    """Every request allocates a few hundred short-lived objects (spans, headers, dicts) that reference
    counting frees; at CPython's default the cyclic collector runs every few requests and re-scans the
    survivors each time. Freezing what startup built (modules, the policy, pydantic's validators) and
    collecting the young generation less often cut the sidecar's CPU per request by a fifth in `make bench`
    (`bench/bench.py`), for a few hundred kB of garbage held a little longer."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


async def serve(
    policy: Path, host: str, port: int, drain_timeout: float, environment: SidecarEnvironment | None = None
) -> None:
    from aiohttp import web

    from .server import IDLE_TIMEOUT, create_app, health_app, shut_down
    from .telemetry import tracer_provider_from_env

    env = environment or read_environment()
    app = create_app(
        policy_path=policy,
        status_relay=env.status_relay,
        tracer_provider=tracer_provider_from_env(),
        max_in_flight=env.max_in_flight,
        max_buffered_bytes=env.max_buffered_bytes,
        stream_idle_timeout=env.stream_idle_timeout,
    )
    # keepalive_timeout doubles as the header-read deadline (see server.IDLE_TIMEOUT); aiohttp's default
    # keeps an idle connection for an hour.
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=drain_timeout,
        access_log=None,
        keepalive_timeout=env.idle_timeout or IDLE_TIMEOUT,
    )
    await runner.setup()
    health: web.AppRunner | None = None
    if env.health_listen:  # probes only, e.g. 0.0.0.0:8788 in a pod
        health = web.AppRunner(health_app(app), access_log=None)
        await health.setup()
        health_host, health_port = listen_address(env.health_listen, "LLMROUTE_HEALTH_LISTEN")
        await web.TCPSite(health, health_host, health_port).start()
    site = web.TCPSite(runner, host.strip("[]"), port, backlog=1024)
    await site.start()
    metrics_listen = env.metrics_listen
    metrics_runner = None
    if metrics_listen:  # metrics only, off loopback, for Prometheus (see metricsport)
        from .metricsport import start_metrics_listener

        try:
            metrics_runner = await start_metrics_listener(app, metrics_listen)
        except OSError as exc:  # e.g. the app uses that port: serve the app's LLM calls all the same
            logging.getLogger("llmroute").error(orjson.dumps(
                {"event": "metrics_listener_failed", "address": metrics_listen, "error": str(exc)}
            ).decode())
    _tune_gc()
    logging.getLogger("llmroute").info(
        orjson.dumps({"event": "listening", "address": f"{host}:{port}", "policy": str(policy)}).decode()
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    logging.getLogger("llmroute").info(orjson.dumps({"event": "draining"}).decode())
    await shut_down(runner, drain_timeout)  # readiness off, stop accepting, drain, then end what is left
    if metrics_runner is not None:
        await metrics_runner.cleanup()
    if health is not None:
        await health.cleanup()


if __name__ == "__main__":
    sys.exit(main())
