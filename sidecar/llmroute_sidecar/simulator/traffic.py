"""The demo's clients: open-loop load on a route of the sidecar, one record per request.

Why this exists: an app's users do not wait for the previous answer before asking, so the load is open
loop — arrivals follow the scenario's schedule (uniform or Poisson, seeded) whatever the answers do, which
is what makes an outage's slow answers pile up the way they do in production. Everything is bounded: the
number of arrivals (duration x rate), the requests in flight (`maxInFlight`; an arrival beyond it is
recorded as not sent rather than queued), and the time waited for stragglers after the last arrival.

Requests go through the route API (`POST /v1/routes/{route}`, JSON or SSE) with httpx (the contract's
client library for the CLI and the demo), spread over `CLIENT_SHARDS` clients: httpcore's connection pool
scans every connection for every queued request at each request's start and end, a cost that grows with
the square of the requests in flight; one pool for hundreds of them made the load generator, not the
sidecar, the bottleneck whenever an outage piled requests up (its lag then fed back as more in flight).
Times are recorded on the scenario clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from .scenarios import ScenarioClock, Traffic

CLIENT_SHARDS = 8
"""httpx clients the requests are spread over (round robin), each with its share of the connections."""

DEFAULT_VARIABLES: tuple[dict[str, Any], ...] = (
    {"text": "The printer on floor 3 shows error E-42 and prints blank pages since this morning."},
    {"text": "I was charged twice for my March invoice; please refund the duplicate payment."},
    {"text": "The mobile app logs me out every few minutes after the last update (Android 14)."},
    {"text": "Our SSO login fails with 'invalid audience' for new users since the IdP migration."},
    {"text": "Export to CSV truncates rows after 10,000 entries; we need the full report for audit."},
)


@dataclass(slots=True)
class RequestRecord:
    """One client request and what became of it (times in scenario seconds)."""

    index: int
    slot: float
    """The scheduled arrival time: what windows and per-second charts group by."""
    sent: float
    """When the request actually left (latency counts from here)."""
    stream: bool
    done: float | None = None
    status: int | None = None
    """HTTP status; None when no response arrived (see `error`)."""
    target: str | None = None
    provider: str | None = None
    degraded: bool = False
    shed_reason: str | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    """`not-sent` (client bound), `timeout`, `connection`, `stream-error`, or the error type answered."""
    ttft: float | None = None
    """Streams: time to the first delta."""

    @property
    def answered(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def latency(self) -> float | None:
        return None if self.done is None else self.done - self.sent

    @property
    def retries(self) -> int:
        """Attempts beyond the first on the same target (skips are not attempts)."""
        seen: set[str] = set()
        count = 0
        for attempt in self.attempts:
            if attempt.get("status") == "skipped":
                continue
            name = str(attempt.get("target"))
            if name in seen:
                count += 1
            seen.add(name)
        return count

    def to_json(self) -> dict[str, Any]:
        def r(value: float | None) -> float | None:
            return None if value is None else round(value, 4)

        return {
            "index": self.index, "slot": r(self.slot), "sent": r(self.sent), "done": r(self.done),
            "status": self.status, "target": self.target, "provider": self.provider,
            "degraded": self.degraded,
            "shedReason": self.shed_reason, "attempts": self.attempts, "error": self.error,
            "stream": self.stream, "ttft": r(self.ttft),
        }


def arrival_times(traffic: Traffic, duration: float, seed: int) -> list[float]:
    """Scenario times of the arrivals over [0, duration): evenly spaced, or a seeded Poisson process."""
    times: list[float] = []
    if traffic.arrivals == "uniform":
        count = int(duration * traffic.rate)
        times = [i / traffic.rate for i in range(count) if i / traffic.rate < duration]
    else:
        rng = random.Random(f"{seed}:arrivals")
        t = rng.expovariate(traffic.rate)
        while t < duration and len(times) < 10_000_000:
            times.append(t)
            t += rng.expovariate(traffic.rate)
    return times


class TrafficDriver:
    """Sends the scenario's requests to one route and keeps a record of each."""

    def __init__(
        self,
        base_url: str,
        route: str,
        traffic: Traffic,
        duration: float,
        clock: ScenarioClock,
        *,
        seed: int = 1,
        request_timeout: float = 60.0,
        on_done: Callable[[RequestRecord], None] | None = None,
    ) -> None:
        self.url = f"{base_url.rstrip('/')}/v1/routes/{route}"
        self.traffic = traffic
        self.duration = duration
        self.clock = clock
        self.rng = random.Random(f"{seed}:traffic")
        self.schedule = arrival_times(traffic, duration, seed)
        self.request_timeout = request_timeout
        """Wall seconds a client waits for one answer (generous: longer than the route's deadline)."""
        self.on_done = on_done
        self.records: list[RequestRecord] = []
        self.in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._variables = traffic.variables or list(DEFAULT_VARIABLES)
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Stop sending (in-flight requests may still finish; see `run`'s drain)."""
        self._stopping.set()

    async def run(self, drain: float | None = None, stop_drain: float = 2.0) -> list[RequestRecord]:
        """Send every arrival at its time, then wait up to `drain` wall seconds for the stragglers (default:
        the request timeout); after `stop()`, at most `stop_drain`. Whatever is still in flight then is
        cancelled and recorded (`timeout`, or `stopped` after `stop()`)."""
        if not self.clock.started:
            self.clock.start()
        share = -(-self.traffic.max_in_flight // CLIENT_SHARDS)
        limits = httpx.Limits(max_connections=share, max_keepalive_connections=min(share, 64))
        timeout = httpx.Timeout(self.request_timeout, connect=5.0)
        tls = httpx.create_ssl_context()  # loaded once: each client loading the CA store costs 0.1 s of the run
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(httpx.AsyncClient(limits=limits, timeout=timeout, verify=tls))
                for _ in range(CLIENT_SHARDS)
            ]
            try:
                await self._send_all(clients)
                await self._drain(self.request_timeout if drain is None else drain, stop_drain)
            finally:
                tasks = list(self._tasks)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        return self.records

    async def _send_all(self, clients: list[httpx.AsyncClient]) -> None:
        variables = itertools.cycle(self._variables)
        for index, t in enumerate(self.schedule):
            wait = self.clock.monotonic_of(t) - time.monotonic()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), wait)
            if self._stopping.is_set():
                return
            stream = self.traffic.stream > 0 and self.rng.random() < self.traffic.stream
            record = RequestRecord(index=index, slot=t, sent=self.clock.now(), stream=stream)
            self.records.append(record)
            if self.in_flight >= self.traffic.max_in_flight:
                record.error = "not-sent"
                record.done = record.sent
                self._finish(record)
                continue
            self.in_flight += 1
            client = clients[index % len(clients)]
            task = asyncio.create_task(self._one(client, record, next(variables)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _drain(self, timeout: float, stop_drain: float) -> None:
        deadline = time.monotonic() + timeout
        while self._tasks:
            now = time.monotonic()
            if self._stopping.is_set():
                deadline = min(deadline, now + stop_drain)
                stop_drain = float("inf")  # the stop deadline is set once
            if now >= deadline:
                return
            await asyncio.wait(set(self._tasks), timeout=min(0.1, deadline - now))

    async def _one(self, client: httpx.AsyncClient, record: RequestRecord, variables: dict[str, Any]) -> None:
        body = {"variables": variables, "stream": record.stream}
        try:
            if record.stream:
                await self._stream(client, record, body)
            else:
                response = await client.post(self.url, content=orjson.dumps(body),
                                             headers={"content-type": "application/json"})
                record.done = self.clock.now()
                record.status = response.status_code
                self._read_headers(record, response.headers)
                try:
                    data = orjson.loads(response.content)
                except orjson.JSONDecodeError:
                    data = {}
                if isinstance(data, dict):
                    record.attempts = list(data.get("attempts") or [])
                    if response.status_code != 200:
                        error = data.get("error")
                        record.error = str(error.get("type")) if isinstance(error, dict) else "error"
        except asyncio.CancelledError:
            record.done = self.clock.now()
            record.error = record.error or ("stopped" if self._stopping.is_set() else "timeout")
            raise
        except httpx.TimeoutException:
            record.done = self.clock.now()
            record.error = "timeout"
        except httpx.HTTPError:
            record.done = self.clock.now()
            record.error = "connection"
        finally:
            self.in_flight -= 1
            self._finish(record)

    async def _stream(self, client: httpx.AsyncClient, record: RequestRecord, body: dict[str, Any]) -> None:
        async with client.stream("POST", self.url, content=orjson.dumps(body),
                                 headers={"content-type": "application/json"}) as response:
            record.status = response.status_code
            self._read_headers(record, response.headers)
            if response.status_code != 200:
                raw = await response.aread()
                record.done = self.clock.now()
                try:
                    data = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    data = {}
                error = data.get("error") if isinstance(data, dict) else None
                record.error = str(error.get("type")) if isinstance(error, dict) else "error"
                if isinstance(data, dict):
                    record.attempts = list(data.get("attempts") or [])
                return
            event = ""
            finished = False
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    payload = orjson.loads(line[5:].strip() or b"{}")
                    if event == "meta" and isinstance(payload, dict):
                        record.attempts = list(payload.get("attempts") or [])
                    elif event == "delta" and record.ttft is None:
                        record.ttft = self.clock.now() - record.sent
                    elif event == "done":
                        finished = True
                    elif event == "error":
                        record.error = "stream-error"
            record.done = self.clock.now()
            if not finished and record.error is None:
                record.error = "stream-error"

    @staticmethod
    def _read_headers(record: RequestRecord, headers: httpx.Headers) -> None:
        record.target = headers.get("llmroute-target")
        record.provider = headers.get("llmroute-provider")
        record.degraded = headers.get("llmroute-degraded") == "true"
        record.shed_reason = headers.get("llmroute-shed-reason")

    def _finish(self, record: RequestRecord) -> None:
        if self.on_done is not None:
            self.on_done(record)


@dataclass(frozen=True, slots=True)
class StatusSample:
    """What the sidecar's `/status` said at scenario time `t` about the route's primary."""

    t: float
    page_state: str | None
    """The status-page state the sidecar has confirmed (after hysteresis); None: no page or not read yet."""
    shedding: float
    """Share of the primary's traffic shed on the status page's word."""
    circuit: str | None
    """The primary target's circuit: closed | open."""
    overridden: bool = False
    """Probes found the primary answering: its page's shed is over though the page has not recovered."""


class StatusSampler:
    """Reads the sidecar's `/status` every `interval` wall seconds, as an operator's dashboard would."""

    def __init__(self, base_url: str, route: str, target: str, provider: str, clock: ScenarioClock,
                 interval: float = 0.25) -> None:
        self.url = f"{base_url.rstrip('/')}/status"
        self.route = route
        self.target = target
        self.provider = provider
        self.clock = clock
        self.interval = interval
        self.samples: list[StatusSample] = []
        self.latest: StatusSample | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(2.0)) as client:
            while True:
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
                    data = (await client.get(self.url)).json()
                    self._observe(data)
                await asyncio.sleep(self.interval)

    def _observe(self, data: dict[str, Any]) -> None:
        page = (data.get("providers") or {}).get(self.provider) or {}
        route = (data.get("routes") or {}).get(self.route) or {}
        circuit = ((route.get("targets") or {}).get(self.target) or {}).get("state")
        sample = StatusSample(t=self.clock.now(), page_state=page.get("state"),
                              shedding=float(page.get("shedding") or 0.0), circuit=circuit,
                              overridden=page.get("overriddenByProbes") is True)
        self.samples.append(sample)
        self.latest = sample
