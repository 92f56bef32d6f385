"""`llmroute`: the one command line for the sidecar, the operator and the tools around them.

    llmroute sidecar --policy FILE      run the sidecar (listen: LLMROUTE_LISTEN, default 127.0.0.1:8787)
    llmroute validate FILE              check a policy; exit 1 with `path: message` lines when broken
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

DEFAULT_LISTEN = "127.0.0.1:8787"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmroute", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sidecar = commands.add_parser("sidecar", help="run the sidecar")
    sidecar.add_argument("--policy", required=True, type=Path, help="policy file (YAML or JSON), watched")
    sidecar.add_argument("--listen", default=os.environ.get("LLMROUTE_LISTEN", DEFAULT_LISTEN))
    sidecar.add_argument("--drain-timeout", type=float, default=25.0, help="seconds to finish in-flight work")
    validate = commands.add_parser("validate", help="validate a policy file")
    validate.add_argument("file", type=Path)
    render = commands.add_parser("render", help="print the sidecar config the operator would write")
    render.add_argument("file", type=Path)
    for name in ("operator", "webhook", "demo", "simulate"):
        commands.add_parser(name, help=f"run `{name}`", add_help=False)
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=os.environ.get("LLMROUTE_LOG_LEVEL", "INFO"), format="%(message)s")

    if args.command == "sidecar":
        return run_sidecar(args.policy, args.listen, args.drain_timeout)
    if args.command in ("validate", "render"):
        return _validate_or_render(args.file, render=args.command == "render")
    if args.command == "operator":
        from llmroute_operator.handlers import run_operator

        return run_operator(rest)
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


def run_sidecar(policy: Path, listen: str, drain_timeout: float) -> int:
    """Serve until SIGTERM/SIGINT, then drain: fail readiness, finish in-flight requests, stop."""
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    # One log line per request: skip what no line of ours prints (logging HOWTO, "Optimization").
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    host, _, port = listen.rpartition(":")
    asyncio.run(serve(policy, host or "127.0.0.1", int(port), drain_timeout))
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


async def serve(policy: Path, host: str, port: int, drain_timeout: float) -> None:
    from aiohttp import web

    from .server import IDLE_TIMEOUT, create_app, env_number, health_app, shut_down
    from .telemetry import tracer_provider_from_env

    app = create_app(
        policy_path=policy,
        status_relay=os.environ.get("LLMROUTE_STATUS_RELAY") or None,
        tracer_provider=tracer_provider_from_env(),
    )
    # keepalive_timeout doubles as the header-read deadline (see server.IDLE_TIMEOUT); aiohttp's default
    # keeps an idle connection for an hour.
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=drain_timeout,
        access_log=None,
        keepalive_timeout=env_number("LLMROUTE_IDLE_TIMEOUT", IDLE_TIMEOUT),
    )
    await runner.setup()
    health: web.AppRunner | None = None
    if health_listen := os.environ.get("LLMROUTE_HEALTH_LISTEN"):  # probes only, e.g. 0.0.0.0:8788 in a pod
        health = web.AppRunner(health_app(app), access_log=None)
        await health.setup()
        health_host, _, health_port = health_listen.rpartition(":")
        await web.TCPSite(health, health_host.strip("[]") or "0.0.0.0", int(health_port)).start()
    site = web.TCPSite(runner, host.strip("[]"), port, backlog=1024)
    await site.start()
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
    if health is not None:
        await health.cleanup()


if __name__ == "__main__":
    sys.exit(main())
