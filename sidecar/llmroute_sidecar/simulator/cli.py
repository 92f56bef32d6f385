"""`llmroute demo` and `llmroute simulate`: a scenario replayed through the real sidecar.

    llmroute demo [--quick] [--scenario FILE] [--policy FILE] [--speed X] [--seed N] [--report-dir DIR]
    llmroute simulate [--scenario FILE] [--policy FILE] [--speed X] [--seed N] [--only A,B] [--json FILE]

Why this exists: the demo is a newcomer's first command — in a minute, with no API keys and no cluster,
it shows llmroute riding out an incident; `simulate` replays one incident against several failover
patterns of the same route and turns their trade-offs into numbers a team can decide on.

How a run is wired: the scenario's fake providers and status page listen on loopback ports chosen by the
OS; the real sidecar app (`create_app`, the same app `llmroute sidecar` serves, with its aiohttp runner,
handler cancellation and all) runs **in this process** on another free port, with the policy pointed at
the fakes; the clients call its route API over real HTTP. In-process rather than a subprocess so that one
Ctrl-C tears everything down in order, so that the engine's random jitter can be seeded, and so that time
compression can also scale the status-page poll floor (10 s in production; see `_Sidecar`).

Time compression (`--speed X`): scenario times, latencies and the policy's durations are all divided by X
(see `scenarios.scale_policy`); reported latencies are back on the scenario clock. `--speed 1` replays in
real time and leaves the policy untouched.

Ctrl-C: the first stops the traffic, waits briefly for requests in flight and still writes the summary and
the report of what ran (exit 130); a second one aborts at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import logging
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiohttp import web
from rich.console import Console
from rich.table import Table

from ..policy import LoadedPolicy, PolicyError, load_policy
from ..server import create_app
from ..statuspages import DEFAULT_MIN_INTERVAL
from .live import LiveView
from .report import Summary, summarize, summary_lines, write_report
from .scenarios import Scenario, ScenarioError, World, load_scenario, pick_route, scale_policy
from .traffic import RequestRecord, StatusSample, StatusSampler, TrafficDriver

DEFAULT_SCENARIO = "microspikes-and-outage.yaml"
QUICK_SCENARIO = "quick.yaml"
DEFAULT_POLICY = "demo-policy.yaml"
SIMULATE_MIN_SPEED = 4.0
"""`simulate` replays several runs back to back: by default at least this fast (`--speed 1`: real time)."""
STOP_DRAIN = 2.0
"""Wall seconds a stopped run waits for requests in flight."""


# ----- files ------------------------------------------------------------------------------------------------
def examples_dir() -> Path:
    """`examples/` of the checkout (the working directory's, else the one next to this package's source),
    else a copy shipped inside the package (`llmroute_sidecar/simulator/examples`, when the wheel has one)."""
    here = Path(__file__).resolve()
    for candidate in (Path.cwd() / "examples", here.parents[3] / "examples", here.parent / "examples"):
        if (candidate / "scenarios").is_dir():
            return candidate
    raise FileNotFoundError("examples/scenarios not found; pass --scenario and --policy")


def _scenario_path(value: str | None, quick: bool) -> Path:
    if value:
        path = Path(value)
        if path.exists():
            return path
        with contextlib.suppress(FileNotFoundError):  # a shipped scenario by name: `quick`, `slow-brownout`
            for name in (value, value + ".yaml"):
                shipped = examples_dir() / "scenarios" / name
                if shipped.exists():
                    return shipped
        return path
    return examples_dir() / "scenarios" / (QUICK_SCENARIO if quick else DEFAULT_SCENARIO)


def load_policy_document(path: str | None) -> tuple[dict[str, Any], str]:
    """The policy file as a document (not yet bound to the fakes) and its text."""
    file = Path(path) if path else examples_dir() / DEFAULT_POLICY
    text = file.read_text()
    document = yaml.safe_load(text)
    if not isinstance(document, dict):
        raise PolicyError([f"{file}: expected a mapping"])
    load_policy(document)  # validate now, with the user's field paths
    return document, text


# ----- the sidecar, in process ------------------------------------------------------------------------------
class _Sidecar:
    """The real sidecar app on a free loopback port, in this process.

    The sidecar never polls a status page more often than every DEFAULT_MIN_INTERVAL (10 s: the providers'
    CDNs cache that long); a compressed clock compresses that floor too, or the page would look `speed`
    times slower than it is.
    """

    def __init__(self, policy: LoadedPolicy, speed: float) -> None:
        self.policy = policy
        self.speed = speed
        floor = None if speed == 1 else DEFAULT_MIN_INTERVAL / speed
        self.app = create_app(policy=policy, statuspage_min_interval=floor)
        self.runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                                    shutdown_timeout=2.0)
        self.url = ""

    async def start(self) -> _Sidecar:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        port = int(self.runner.addresses[0][1])
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()


@contextlib.contextmanager
def _sidecar_logs(path: Path | None) -> Iterator[None]:
    """Send the in-process sidecar's logs (one JSON line per request, status-page changes) to a file, or
    nowhere, instead of the terminal the live view draws on; the demo's own HTTP clients stay quiet."""
    handler: logging.Handler
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, mode="w")
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.NullHandler()
    quiet = logging.NullHandler()
    routing = {"llmroute": handler, "llmroute_sidecar": handler, "aiohttp": handler, "httpx": quiet,
               "httpcore": quiet}
    loggers = {name: logging.getLogger(name) for name in routing}
    saved = {name: (lg.handlers[:], lg.propagate, lg.level) for name, lg in loggers.items()}
    for name, lg in loggers.items():
        lg.handlers = [routing[name]]
        lg.propagate = False
        lg.setLevel(logging.INFO if path is not None and routing[name] is handler else logging.WARNING)
    try:
        yield
    finally:
        for name, lg in loggers.items():
            lg.handlers, lg.propagate, level = saved[name]
            lg.setLevel(level)
        handler.close()


# ----- one run ----------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    scenario: Scenario
    world: World
    records: list[RequestRecord]
    samples: list[StatusSample]
    summary: Summary
    policy_document: dict[str, Any]
    route: str
    primary_target: str
    stopped: bool


def _route_of(document: dict[str, Any], route: str) -> dict[str, Any]:
    spec = document.get("spec", document)
    found: dict[str, Any] = next(r for r in spec["routes"] if r["name"] == route)
    return found


async def run_scenario(
    scenario: Scenario,
    policy_document: dict[str, Any],
    *,
    speed: float | None = None,
    seed: int | None = None,
    route: str | None = None,
    label: str = "",
    stop: asyncio.Event | None = None,
    view_factory: Callable[[World, str], LiveView] | None = None,
) -> RunResult:
    """Start the fakes and the sidecar, drive the scenario's traffic through it, and sum it up."""
    world = World(scenario, speed, seed)
    random.seed(world.seed)  # the engine's backoff and probe jitter
    route_name = pick_route(policy_document, route or scenario.traffic.route)
    scaled = scale_policy(policy_document, world.clock.speed)
    async with world:
        policy = load_policy(world.bind(scaled, route_name))
        document = policy.to_document()
        route_spec = _route_of(document, route_name)
        primary_target = route_spec["targets"][0]["name"]
        primary_provider = route_spec["targets"][0]["provider"]
        loaded_route = policy.spec.route(route_name)
        assert loaded_route is not None
        timeout = loaded_route.overall_deadline + loaded_route.first_byte_timeout() + 2.0
        pricing = {model: {"input": price.input, "output": price.output}
                   for model, price in policy.spec.pricing.items()}
        sidecar = await _Sidecar(policy, world.clock.speed).start()
        try:
            view = view_factory(world, primary_target) if view_factory else None
            driver = TrafficDriver(sidecar.url, route_name, scenario.traffic, scenario.duration, world.clock,
                                   seed=world.seed, request_timeout=timeout,
                                   on_done=view.record if view else None)
            sampler = StatusSampler(sidecar.url, route_name, primary_target, primary_provider, world.clock,
                                    interval=min(0.25, 1.0 / world.clock.speed))
            if view is not None:
                view.attach(driver, sampler)
            watcher: asyncio.Task[None] | None = None
            stopped = False
            if stop is not None:
                async def watch() -> None:
                    nonlocal stopped
                    await stop.wait()
                    stopped = True
                    driver.stop()
                watcher = asyncio.create_task(watch())
            world.clock.start()
            sampler.start()
            try:
                with view if view is not None else contextlib.nullcontext():
                    run = asyncio.create_task(driver.run(stop_drain=STOP_DRAIN))
                    while not run.done():
                        await asyncio.wait({run}, timeout=0.25)
                        if view is not None:
                            view.tick()
                    records = run.result()
            finally:
                await sampler.stop()
                if watcher is not None:
                    watcher.cancel()
        finally:
            await sidecar.stop()
        summary = summarize(scenario, world, records, primary_target, pricing, label=label)
    return RunResult(scenario, world, records, sampler.samples, summary, document, route_name, primary_target,
                     stopped)


@contextlib.contextmanager
def _interrupts(stop: asyncio.Event, loop: asyncio.AbstractEventLoop, console: Console) -> Iterator[None]:
    """First Ctrl-C (or SIGTERM): stop gracefully; second: abort."""
    main = asyncio.current_task()
    presses = 0

    def on_signal() -> None:
        nonlocal presses
        presses += 1
        if presses == 1:
            console.print("[yellow]stopping: finishing requests in flight, then writing the report "
                          "(Ctrl-C again to abort)[/yellow]")
            stop.set()
        elif main is not None:
            main.cancel()

    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, on_signal)
            installed.append(signum)
    try:
        yield
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


def _run(coroutine_factory: Callable[[], Any]) -> int:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    try:
        result: int = asyncio.run(coroutine_factory())
        return result
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("aborted", file=sys.stderr)
        return 130


# ----- llmroute demo ----------------------------------------------------------------------------------------
def demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmroute demo", description="Watch llmroute ride out a provider "
                                     "incident: fake providers, a fake status page, the real sidecar.")
    parser.add_argument("--quick", action="store_true", help="the short scenario (about 20 s; for CI)")
    parser.add_argument("--scenario", help=f"scenario file (default: examples/scenarios/{DEFAULT_SCENARIO})")
    parser.add_argument("--policy", help="policy file (default: examples/" + DEFAULT_POLICY + ")")
    parser.add_argument("--route", help="route to drive (default: the policy's defaultRoute)")
    parser.add_argument("--speed", type=float, help="time compression (default: the scenario's `speed`)")
    parser.add_argument("--seed", type=int, help="random seed (default: the scenario's `seed`)")
    parser.add_argument("--report-dir", default="demo-report", type=Path, help="where the report goes")
    parser.add_argument("--plain", action="store_true", help="plain lines instead of the live view")
    parser.add_argument("--strict", action="store_true", help="exit 1 when an `expect` figure is missed")
    return parser


def _console() -> Console:
    """Rich on a terminal; without one, plain output at a width that fits the tables."""
    console = Console()
    return console if console.is_terminal else Console(width=140)


def demo(argv: list[str]) -> int:
    args = demo_parser().parse_args(argv)
    console = _console()
    try:
        scenario = load_scenario(_scenario_path(args.scenario, args.quick))
        document, _text = load_policy_document(args.policy)
    except (ScenarioError, PolicyError) as exc:
        for problem in exc.problems:
            console.print(problem, markup=False)
        return 2
    except (OSError, yaml.YAMLError) as exc:
        console.print(f"cannot read a file: {exc}", markup=False)
        return 2

    async def main() -> int:
        stop = asyncio.Event()
        speed = args.speed or scenario.speed
        console.print(f"[bold]llmroute demo[/bold]: {scenario.name} — {scenario.description}")
        console.print(f"{scenario.duration:g} s of scenario at {speed:g}x: about "
                      f"{scenario.duration / speed:.0f} s. Fake providers and status page on loopback, "
                      "the real sidecar in between. Ctrl-C stops.", highlight=False)

        def view(world: World, primary_target: str) -> LiveView:
            return LiveView(scenario, world, primary_target, console, plain=True if args.plain else None)

        with _interrupts(stop, asyncio.get_running_loop(), console), \
                _sidecar_logs(args.report_dir / "sidecar.log"):
            result = await run_scenario(scenario, document, speed=speed, seed=args.seed, route=args.route,
                                        stop=stop, view_factory=view)
        notes = [
            "The sidecar ran in-process (create_app, the app `llmroute sidecar` serves) on a loopback port; "
            "its request log is sidecar.log.",
            f"Policy durations and the status-page poll floor were divided by the speed ({speed:g}x).",
        ]
        if result.stopped:
            notes.append("The run was stopped early (Ctrl-C): figures cover what ran.")
        policy_view = yaml.safe_dump(result.policy_document, sort_keys=False)
        page, png = write_report(args.report_dir, result.summary, scenario, result.records, result.world,
                                 result.samples, policy_view, notes)
        console.print()
        for line in summary_lines(result.summary):
            style = "green" if line.startswith("PASS") else ("red" if line.startswith("MISS") else None)
            console.print(line, style=style, markup=False, highlight=False, soft_wrap=True)
        console.print(f"\nreport: {page}  (chart: {png})", markup=False, highlight=False)
        if result.stopped:
            return 130
        return 1 if args.strict and not result.summary.passed else 0

    return _run(main)


# ----- llmroute simulate ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    apply: Callable[[dict[str, Any], bool], None]
    """Edits the route in place; the flag says whether the status page stays on."""
    status_page: bool = False
    rate_limits: bool = True
    """False: the providers' `rateLimits.enabled: false` (their rate-limit headers never change routing)."""


def _single_target(route: dict[str, Any], _: bool) -> None:
    route["strategy"] = "retryAndShed"
    route["targets"] = route["targets"][:1]


def _hot_cold(route: dict[str, Any], _: bool) -> None:
    route["strategy"] = "failover"


def _retry_and_shed(budget: str) -> Callable[[dict[str, Any], bool], None]:
    def apply(route: dict[str, Any], _: bool) -> None:
        route["strategy"] = "retryAndShed"
        route["budget"] = budget
        route.pop("deadline", None)

    return apply


def _quorum(route: dict[str, Any], _: bool) -> None:
    _retry_and_shed("8s")(route, _)
    route["quorum"] = {"sample": 0.05, "targets": [t["name"] for t in route["targets"][:2]], "pick": "first"}


VARIANTS: tuple[Variant, ...] = (
    Variant("no-failover", "single target: retries on the primary for the 8 s budget, then an error",
            _single_target),
    Variant("hot-cold", "strategy failover: one primary attempt, then the fallback", _hot_cold),
    Variant("retry-and-shed-4s", "retryAndShed, budget 4 s", _retry_and_shed("4s")),
    Variant("retry-and-shed-8s", "retryAndShed, budget 8 s (llmroute's defaults)", _retry_and_shed("8s")),
    Variant("retry-and-shed-8s+status", "retryAndShed 8 s + status-page shedding", _retry_and_shed("8s"),
            status_page=True),
    Variant("quorum-5%", "retryAndShed 8 s; 5 % of requests call both targets, first valid answer wins",
            _quorum),
    Variant("retry-and-shed-8s-no-rl", "retryAndShed 8 s, rate-limit headers ignored (rateLimits.enabled: false)",
            _retry_and_shed("8s"), rate_limits=False),
)


def variant_policy(document: dict[str, Any], route: str, variant: Variant) -> dict[str, Any]:
    """The base policy with `route` changed as the variant says; status pages off unless it keeps them."""
    doc = copy.deepcopy(document)
    spec = doc.get("spec", doc)
    for provider in spec.get("providers", []):
        if not variant.status_page:
            provider.pop("statusPage", None)
        if not variant.rate_limits:
            provider["rateLimits"] = {**provider.get("rateLimits", {}), "enabled": False}
    variant.apply(_route_of(doc, route), variant.status_page)
    return doc


def simulate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmroute simulate", description="Replay a scenario against "
                                     "several failover strategies of the same route; compare the figures.")
    parser.add_argument("--scenario", help=f"scenario file (default: examples/scenarios/{DEFAULT_SCENARIO})")
    parser.add_argument("--policy", help="base policy (default: examples/" + DEFAULT_POLICY + ")")
    parser.add_argument("--route", help="route to vary (default: the policy's defaultRoute)")
    parser.add_argument("--speed", type=float, help="time compression (default: the scenario's `speed`, at "
                        f"least {SIMULATE_MIN_SPEED:g}; 1 replays in real time)")
    parser.add_argument("--seed", type=int, help="random seed (default: the scenario's `seed`)")
    parser.add_argument("--only", help="comma-separated variants: " + ", ".join(v.name for v in VARIANTS))
    parser.add_argument("--json", type=Path, help="write the full comparison (per-window figures too) as "
                        "JSON to this file ('-': stdout); without it, one line of headline JSON is printed")
    return parser


def comparison_table(summaries: list[tuple[Variant, Summary]]) -> Table:
    table = Table(title="strategies compared (latencies on the scenario clock)")
    for column in ("strategy", "answered / asked", "availability", "degraded", "p50", "p99",
                   "calls / answer", "429s", "cost (USD)"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for variant, s in summaries:
        cpa = s.calls_per_answer
        table.add_row(variant.name, f"{s.answered} / {s.asked}", f"{s.availability:.2%}",
                      f"{s.degraded_share:.1%}", _short(s.p50), _short(s.p99),
                      "-" if cpa is None else f"{cpa:.2f}", str(s.upstream_429), f"{s.cost_usd:.4f}")
    return table


def _headline(variant: Variant, s: Summary) -> dict[str, Any]:
    cpa = s.calls_per_answer
    return {"name": variant.name, "asked": s.asked, "answered": s.answered,
            "availability": round(s.availability, 5), "degradedShare": round(s.degraded_share, 5),
            "p50": s.p50, "p99": s.p99, "callsPerAnswer": None if cpa is None else round(cpa, 4),
            "upstream429": s.upstream_429, "costUsd": round(s.cost_usd, 6)}


def _short(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 0.9995 else f"{value:.2f} s"


def simulate(argv: list[str]) -> int:
    args = simulate_parser().parse_args(argv)
    console = _console()
    try:
        scenario = load_scenario(_scenario_path(args.scenario, False))
        document, _text = load_policy_document(args.policy)
        route = pick_route(document, args.route or scenario.traffic.route)
    except (ScenarioError, PolicyError) as exc:
        for problem in exc.problems:
            console.print(problem, markup=False)
        return 2
    except (OSError, yaml.YAMLError) as exc:
        console.print(f"cannot read a file: {exc}", markup=False)
        return 2
    variants = list(VARIANTS)
    if args.only:
        wanted = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in {v.name for v in VARIANTS}]
        if unknown:
            console.print(f"unknown variants: {', '.join(unknown)}", markup=False)
            return 2
        variants = [v for v in VARIANTS if v.name in wanted]

    async def main() -> int:
        stop = asyncio.Event()
        speed = args.speed or max(scenario.speed, SIMULATE_MIN_SPEED)
        console.print(f"[bold]llmroute simulate[/bold]: {scenario.name} at {speed:g}x, {len(variants)} "
                      f"strategies, about {len(variants) * scenario.duration / speed:.0f} s", highlight=False)
        results: list[tuple[Variant, Summary]] = []
        with _interrupts(stop, asyncio.get_running_loop(), console), _sidecar_logs(None):
            for variant in variants:
                if stop.is_set():
                    break
                started = time.monotonic()
                result = await run_scenario(scenario, variant_policy(document, route, variant), speed=speed,
                                            seed=args.seed, route=route, label=variant.name, stop=stop)
                s = result.summary
                took = time.monotonic() - started
                console.print(f"  {variant.name:<26} answered {s.answered}/{s.asked}  fallback "
                              f"{s.from_fallback}  p50 {_short(s.p50)}  p99 {_short(s.p99)}  ({took:.0f} s)",
                              markup=False, highlight=False)
                results.append((variant, s))
        console.print(comparison_table(results))
        report = {
            "scenario": scenario.name,
            "speed": speed,
            "seed": args.seed if args.seed is not None else scenario.seed,
            "route": route,
            "strategies": [{"name": v.name, "description": v.description, **s.to_json()} for v, s in results],
        }
        if args.json is not None and str(args.json) == "-":
            sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
        elif args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
            console.print(f"JSON (with per-window figures): {args.json}", markup=False, highlight=False)
        else:
            headline = {**report, "strategies": [_headline(v, s) for v, s in results]}
            sys.stdout.write(orjson.dumps(headline).decode() + "\n")
        return 130 if stop.is_set() else 0

    return _run(main)


def main(command: str, argv: list[str]) -> int:
    """Entry point from `llmroute demo ...` / `llmroute simulate ...`."""
    if command == "demo":
        return demo(argv)
    if command == "simulate":
        return simulate(argv)
    print(f"unknown command {command}", file=sys.stderr)
    return 2
