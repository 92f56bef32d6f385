"""`make bench`: what the llmroute sidecar costs on the hot path, next to a bare pass-through proxy.

Why this exists: a sidecar sits in front of every LLM call of an app; it must add well under a
millisecond and little CPU. This measures, in one run, on this machine:

- added latency (p50 / p99) at a fixed 200 req/s against a 20 ms fake upstream, versus calling the
  upstream directly (and versus the bare proxy);
- max req/s at concurrency 64 (closed loop) with telemetry on, and the same for a bare aiohttp
  pass-through proxy with no logic -> the ratio of CPU per request (the sidecar's CPU seconds from /proc);
  for this phase the upstream answers at once: with a 20 ms upstream, 64 connections cap any proxy at
  64 / 20 ms = 3,200 req/s (Little's law), which would measure the upstream, not the proxy;
- the same throughput with status pages on (the provider's page polled from a local fake);
- streaming time-to-first-token overhead (sidecar and bare proxy versus direct);
- the sidecar's RSS after the run.

Setup: the sidecar (`llmroute sidecar --policy ...`, a subprocess) and the bare proxy (a subprocess) are
pinned to CPU 0, with uvloop; this process (the fake upstream, the status page, the load generator, all
raw asyncio protocols on uvloop) is pinned to CPU 1. "Telemetry on" means: Prometheus metrics (always on),
the OpenTelemetry SDK recording every span through a BatchSpanProcessor whose exporter drops them
(bench/sidecar_traced.py; `--otlp` exports over OTLP/HTTP to a local sink instead), and the sidecar's
one-JSON-line-per-request log at INFO, written to a file (bench-report/sidecar-*.log). The generator's
own ceiling (direct to the upstream, same concurrency) is measured in the same run and must be well
above the proxies' figures.

    .venv/bin/python bench/bench.py [--quick] [--otlp] [--report-dir bench-report]

Bounded: every load loop has a fixed count or duration; a full run takes about two minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench")]

from rawhttp import Upstream, closed_loop, fixed_rate, request_bytes  # noqa: E402

TARGETS = {
    "added_p50_ms": 1.0,
    "added_p99_ms": 5.0,
    "rps_per_core": 3500.0,
    "cpu_ratio": 1.7,
    "ttft_overhead_ms": 1.5,
    "rss_mb": 80.0,
}
BODY = json.dumps({
    "model": "claude-sonnet-4-5", "max_tokens": 256,
    "messages": [{"role": "user", "content": "Summarize: the printer on floor 3 prints blank pages."}],
}).encode()
STREAM_BODY = json.dumps({**json.loads(BODY), "stream": True}).encode()
CLK_TCK = os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads (from /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def policy_yaml(upstream: int, status_page: int | None) -> str:
    page = ""
    if status_page is not None:
        page = f"""
      statusPage:
        url: http://127.0.0.1:{status_page}/api/v2/summary.json
        components: ["k8w3r06qmzrp"]
        pollInterval: 10s"""
    return f"""apiVersion: llmroute.dev/v1alpha1
kind: LLMRoutePolicy
metadata: {{name: bench}}
spec:
  providers:
    - name: claude
      type: anthropic
      baseURL: http://127.0.0.1:{upstream}{page}
    - name: claude-backup
      type: anthropic
      baseURL: http://127.0.0.1:{upstream}
  defaultRoute: chat
  routes:
    - name: chat
      targets:
        - {{name: primary, provider: claude}}
        - {{name: backup, provider: claude-backup, model: claude-haiku-4-5, degraded: true}}
  pricing:
    claude-sonnet-4-5: {{input: 3.0, output: 15.0}}
"""


@dataclass
class Proxy:
    """A proxy subprocess pinned to CPU 0."""

    name: str
    argv: list[str]
    port: int
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def start(self, pin: int | None) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "sidecar"), str(ROOT / "operator"),
                                                            os.environ.get("PYTHONPATH", "")]), **self.env}
        preexec = (lambda: os.sched_setaffinity(0, {pin})) if pin is not None else None
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(self.argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            preexec_fn=preexec)

    async def wait_ready(self, path: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited: see {self.log}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{self.port}{path}") as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready after {timeout} s: see {self.log}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


async def ttft(port: int, path: str, count: int) -> list[float]:
    """Time to the first content delta of `count` streams, one at a time (aiohttp client; the rate is low)."""
    results: list[float] = []
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(count + 5):
            started = time.perf_counter()
            first: float | None = None
            async with session.post(f"http://127.0.0.1:{port}{path}", data=STREAM_BODY,
                                    headers={"content-type": "application/json", "x-api-key": "bench-key",
                                             "anthropic-version": "2023-06-01"}) as response:
                async for line in response.content:
                    if first is None and line.startswith(b"event: content_block_delta"):
                        first = time.perf_counter() - started
            if first is not None:
                results.append(first)
    return results[5:]  # the first few warm connections and code paths up


def _pin_self(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


@dataclass
class Tally:
    """Throughput rounds of one target, summed."""

    requests: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    errors: int = 0

    def add(self, requests: int, seconds: float, cpu: float, errors: int) -> None:
        self.requests += requests
        self.seconds += seconds
        self.cpu += cpu
        self.errors += errors

    def figures(self) -> dict[str, float]:
        rps = self.requests / self.seconds if self.seconds else float("nan")
        per_request = self.cpu / self.requests if self.requests else float("nan")
        return {"rps": rps, "cpu_us_per_request": per_request * 1e6,
                "rps_per_core": 1 / per_request if per_request else float("nan"),
                "cpu_share": self.cpu / self.seconds if self.seconds else float("nan"), "errors": self.errors}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    cpus = sorted(os.sched_getaffinity(0))
    proxy_cpu, client_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)
    _pin_self(client_cpu)
    report_dir: Path = args.report_dir
    scale = 0.5 if args.quick else 1.0
    rounds = 5
    per_round = int(400 * scale)  # 2 s at 200 req/s
    ttft_per_round = int(40 * scale)
    tp_rounds, tp_warmup, tp_duration = 3, 0.5, 2.0 * scale
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "proxy_cpu": proxy_cpu, "client_cpu": client_cpu,
                    "loadavg_before": loadavg()},
        "settings": {"rate": 200, "latency_requests": rounds * per_round, "concurrency": 64,
                     "throughput_seconds": tp_rounds * tp_duration, "upstream_latency_ms": 20,
                     "ttft_streams": rounds * ttft_per_round, "rounds": "interleaved (direct, bare, sidecar)",
                     "tracing": ("OTLP/HTTP to a local sink" if args.otlp
                                 else "SDK, always on, discard exporter"),
                     "request_log": "INFO, to a file"},
    }
    upstream = await Upstream(delay=0.020).start()
    pages = await Upstream(delay=0.0).start()  # status page + OTLP sink
    tmp = Path(tempfile.mkdtemp(prefix="llmroute-bench-"))
    python = sys.executable
    if args.otlp:
        launcher = [python, "-m", "llmroute_sidecar.cli", "sidecar"]
        traced_env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{pages.port}",
                      "OTEL_TRACES_EXPORTER": "otlp"}
    else:
        launcher, traced_env = [python, str(ROOT / "bench" / "sidecar_traced.py")], {}

    def sidecar(name: str, argv: list[str], env: dict[str, str], with_pages: bool) -> Proxy:
        port = free_port()
        policy = tmp / f"{name}.yaml"
        policy.write_text(policy_yaml(upstream.port, pages.port if with_pages else None))
        return Proxy(name, [*argv, "--policy", str(policy), "--listen", f"127.0.0.1:{port}"], port,
                     report_dir / f"{name.replace('+', '-')}.log", {"LLMROUTE_LOG_LEVEL": "INFO", **env})

    bare_port = free_port()
    proxies = {
        "bare": Proxy("bare", [python, str(ROOT / "bench" / "bare_proxy.py"), "--listen",
                               f"127.0.0.1:{bare_port}", "--upstream", f"http://127.0.0.1:{upstream.port}"],
                      bare_port,
                      report_dir / "bare.log"),
        "sidecar": sidecar("sidecar", launcher, traced_env, False),
        "sidecar+statuspages": sidecar("sidecar+statuspages", launcher, traced_env, True),
        "sidecar-untraced": sidecar("sidecar-untraced", [python, "-m", "llmroute_sidecar.cli", "sidecar"], {},
                                    False),
    }
    ready = {"bare": "/healthz"}

    def say(text: str) -> None:
        print(text, flush=True)

    try:
        for proxy in proxies.values():
            proxy.start(proxy_cpu)
        for name, proxy in proxies.items():
            await proxy.wait_ready(ready.get(name, "/readyz"))
        say(f"proxies up on CPU {proxy_cpu}, load generator and fake upstream on CPU {client_cpu}; "
            f"load average {results['machine']['loadavg_before']}")
        targets = {"direct": (upstream.port, "/v1/messages")}
        targets.update({name: (proxy.port, "/anthropic/v1/messages") for name, proxy in proxies.items()})
        data = {name: request_bytes(path, BODY) for name, (_port, path) in targets.items()}
        for name, (port, _path) in targets.items():  # warm connections, code paths, caches
            await fixed_rate("127.0.0.1", port, data[name], 400, 200)

        # 1. latency at a fixed 200 req/s (20 ms upstream), rounds interleaved.
        latency_targets = ("direct", "bare", "sidecar")
        latencies: dict[str, list[float]] = {name: [] for name in latency_targets}
        errors: dict[str, int] = dict.fromkeys(latency_targets, 0)
        for _ in range(rounds):
            for name in latency_targets:
                port, _path = targets[name]
                values, failed = await fixed_rate("127.0.0.1", port, data[name], 200, per_round)
                latencies[name] += values
                errors[name] += failed
        for name in latency_targets:
            entry = results.setdefault(name, {})
            entry.update(p50_ms=percentile(latencies[name], 50) * 1000,
                         p99_ms=percentile(latencies[name], 99) * 1000, latency_errors=errors[name])
        for name in ("bare", "sidecar"):
            results[name]["added_p50_ms"] = results[name]["p50_ms"] - results["direct"]["p50_ms"]
            results[name]["added_p99_ms"] = results[name]["p99_ms"] - results["direct"]["p99_ms"]
            say(f"{name}: p50 {results[name]['p50_ms']:.2f} ms (+{results[name]['added_p50_ms']:.2f}), "
                f"p99 {results[name]['p99_ms']:.2f} ms (+{results[name]['added_p99_ms']:.2f}) at 200 req/s")
        say(f"direct: p50 {results['direct']['p50_ms']:.2f} ms, p99 {results['direct']['p99_ms']:.2f} ms")

        # 2. streaming time to first token, rounds interleaved.
        firsts: dict[str, list[float]] = {name: [] for name in latency_targets}
        for _ in range(rounds):
            for name in latency_targets:
                port, path = targets[name]
                firsts[name] += await ttft(port, path, ttft_per_round)
        for name in latency_targets:
            results[name]["ttft_p50_ms"] = percentile(firsts[name], 50) * 1000
        for name in ("bare", "sidecar"):
            direct_ttft = results["direct"]["ttft_p50_ms"]
            results[name]["ttft_overhead_ms"] = results[name]["ttft_p50_ms"] - direct_ttft
            say(f"{name}: time to first token overhead {results[name]['ttft_overhead_ms']:.2f} ms (p50)")

        # 3. throughput at concurrency 64 against an instant upstream, rounds interleaved.
        upstream.delay = 0.0
        tallies = {name: Tally() for name in targets}
        for _ in range(tp_rounds):
            for name, (port, _path) in targets.items():
                measured = proxies.get(name)
                marks: dict[bool, float] = {}

                def window(opening: bool, measured: Proxy | None = measured,
                           marks: dict[bool, float] = marks) -> None:
                    marks[opening] = cpu_seconds(measured.pid) if measured is not None else 0.0

                result = await closed_loop("127.0.0.1", port, data[name], 64, tp_warmup, tp_duration,
                                           on_window=window)
                tallies[name].add(result.requests, result.seconds, marks[False] - marks[True], result.errors)
        for name, tally in tallies.items():
            figures = tally.figures()
            entry = results.setdefault(name, {})
            if name == "direct":
                results["generator_ceiling_rps"] = round(figures["rps"])
                say(f"generator + upstream ceiling (direct, c=64): {figures['rps']:,.0f} req/s")
                continue
            entry.update(rps=figures["rps"], cpu_us_per_request=figures["cpu_us_per_request"],
                         rps_per_core=figures["rps_per_core"], cpu_share=figures["cpu_share"],
                         throughput_errors=figures["errors"])
            say(f"{name}: {figures['rps']:,.0f} req/s at c=64 using {figures['cpu_share']:.0%} of its core; "
                f"{figures['cpu_us_per_request']:.0f} us CPU per request = "
                f"{figures['rps_per_core']:,.0f} req/s per core-second")
        results["sidecar+statuspages"]["status_polls"] = pages.stats.status_polls
        for name in ("sidecar", "sidecar+statuspages", "sidecar-untraced"):
            results[name]["rss_mb"] = rss_mb(proxies[name].pid)
        say(f"sidecar RSS after the run: {results['sidecar']['rss_mb']:.1f} MB")
    finally:
        for proxy in proxies.values():
            proxy.stop()
        for server in (upstream, pages):
            await server.stop()
    results["machine"]["loadavg_after"] = loadavg()
    results["cpu_ratio"] = results["sidecar"]["cpu_us_per_request"] / results["bare"]["cpu_us_per_request"]
    results["cpu_ratio_untraced"] = (results["sidecar-untraced"]["cpu_us_per_request"]
                                     / results["bare"]["cpu_us_per_request"])
    results["otlp_exports"] = pages.stats.otlp_exports
    results["upstream_requests"] = upstream.stats.requests
    return results


def table(results: dict[str, Any]) -> list[str]:
    bare, side = results["bare"], results["sidecar"]
    pages, untraced = results["sidecar+statuspages"], results["sidecar-untraced"]

    def mark(ok: bool) -> str:
        return "ok" if ok else "MISS"

    rows = [
        ("added latency p50 at 200 req/s (vs direct)", f"{side['added_p50_ms']:.2f} ms",
         f"{bare['added_p50_ms']:.2f} ms", f"< {TARGETS['added_p50_ms']:g} ms",
         mark(side["added_p50_ms"] < TARGETS["added_p50_ms"])),
        ("added latency p99 at 200 req/s (vs direct)", f"{side['added_p99_ms']:.2f} ms",
         f"{bare['added_p99_ms']:.2f} ms", f"< {TARGETS['added_p99_ms']:g} ms",
         mark(side["added_p99_ms"] < TARGETS["added_p99_ms"])),
        ("req/s at c=64, telemetry on (measured)", f"{side['rps']:,.0f}", f"{bare['rps']:,.0f}", "", ""),
        ("  its share of the pinned core", f"{side['cpu_share']:.0%}", f"{bare['cpu_share']:.0%}", "", ""),
        ("req/s per core (1 / CPU per request)", f"{side['rps_per_core']:,.0f}",
         f"{bare['rps_per_core']:,.0f}",
         f">= {TARGETS['rps_per_core']:,.0f}", mark(side["rps_per_core"] >= TARGETS["rps_per_core"])),
        ("CPU per request", f"{side['cpu_us_per_request']:.0f} us", f"{bare['cpu_us_per_request']:.0f} us",
         "", ""),
        ("CPU per request, sidecar / bare", f"{results['cpu_ratio']:.2f}x", "1.00x",
         f"<= {TARGETS['cpu_ratio']:g}x", mark(results["cpu_ratio"] <= TARGETS["cpu_ratio"])),
        ("  same, tracing off (metrics + logs)", f"{results['cpu_ratio_untraced']:.2f}x", "", "", ""),
        ("req/s per core, status pages on", f"{pages['rps_per_core']:,.0f}", "", "", ""),
        ("req/s per core, tracing off", f"{untraced['rps_per_core']:,.0f}", "", "", ""),
        ("streaming TTFT overhead (p50, vs direct)", f"{side['ttft_overhead_ms']:.2f} ms",
         f"{bare['ttft_overhead_ms']:.2f} ms", f"< {TARGETS['ttft_overhead_ms']:g} ms",
         mark(side["ttft_overhead_ms"] < TARGETS["ttft_overhead_ms"])),
        ("sidecar RSS after the run", f"{side['rss_mb']:.1f} MB", "", f"< {TARGETS['rss_mb']:g} MB",
         mark(side["rss_mb"] < TARGETS["rss_mb"])),
    ]
    header = ("figure", "sidecar", "bare proxy", "target", "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    lines = []
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(widths[i]) if i in (0, 4) else cell.rjust(widths[i])
                               for i, cell in enumerate(row)))
        if row is header:
            lines.append("-" * len(lines[-1]))
    direct = results["direct"]
    lines.append(f"direct call: p50 {direct['p50_ms']:.2f} ms, p99 {direct['p99_ms']:.2f} ms "
                 f"(20 ms upstream); generator ceiling {results['generator_ceiling_rps']:,} req/s "
                 "(direct, c=64, on the other core)")
    lines.append(f"load average before/after: {results['machine']['loadavg_before']} / "
                 f"{results['machine']['loadavg_after']} (other work on the machine inflates latency tails "
                 "and the measured req/s; CPU per request is what the ratio uses)")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="half the counts and durations")
    parser.add_argument("--otlp", action="store_true", help="export spans over OTLP/HTTP to a local sink")
    parser.add_argument("--report-dir", type=Path, default=ROOT / "bench-report")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        print("uvloop not installed: figures will be pessimistic", file=sys.stderr)
    started = time.monotonic()
    args.report_dir.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(run(args))
    results["seconds"] = round(time.monotonic() - started, 1)
    print()
    for line in table(results):
        print(line)
    out = args.report_dir / "results.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{out} ({results['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
