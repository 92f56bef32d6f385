"""Scenario files: a provider incident written down as a timeline, replayed against the real sidecar.

Why this exists: failover logic is only convincing when it is watched through an incident — a couple of
529 microspikes that must *not* send answers to the fallback, a sustained outage that must, a status page
that admits the outage late. A scenario file (YAML, see ``examples/scenarios/``) writes such an incident
down once, so ``llmroute demo``, ``llmroute simulate``, the tests and the README all replay the same story.

A scenario has, on one clock (seconds from the start):

- ``traffic``: the offered load (requests per second, uniform or Poisson arrivals, share of streams);
- ``providers.primary`` / ``providers.fallback``: a ``baseline`` behaviour and ``phases`` overriding it —
  latency distribution (constant, uniform, lognormal, normal), error rates by code (429, 500, 503, 529, …,
  plus ``hang`` and ``reset``), ``retryAfter``, token counts, and periodic ``bursts`` (microspikes);
- ``statusPages``: component status changes over time (optionally with an incident) for a fake Statuspage;
- ``expect``: optional acceptance figures the summary checks (answered share, fallback answers during
  microspikes, outage p50, upstream calls per answer).

Time compression: the scenario clock runs ``speed`` times faster than the wall clock. Every scenario time
(phases, latencies, retry-after, status changes) is divided by ``speed`` and the offered rate multiplied by
it; :func:`scale_policy` scales the policy's durations the same way (budget, backoff, attempt timeout,
circuit breaker, retry-budget window, status-page poll interval), so the sidecar sees the same incident,
only faster. Measured latencies are reported back on the scenario clock (wall time x speed).

Determinism: each fake draws from its own ``random.Random`` seeded from the scenario seed and its role, so
a given sequence of arrivals gets the same answers; what timing changes (which request lands in which
phase) is the only source of run-to-run variation.
"""

from __future__ import annotations

import bisect
import copy
import itertools
import math
import random
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from aiohttp import web
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from ..durations import format_duration, parse_duration
from ..policy import Duration, load_policy
from .fake_statuspage import CLAUDE_SUMMARY, OPENAI_SUMMARY, ComponentStatus, FakeStatusPage
from .fakes import Fail, FakeProvider, Hang, RecordedRequest, Reply, Reset, Step, ratelimit_headers

Role = Literal["primary", "fallback"]
ROLES: tuple[Role, ...] = ("primary", "fallback")
_Z99 = 2.3263478740408408  # standard normal quantile of 0.99: lognormal sigma = ln(p99 / median) / z99


class ScenarioError(ValueError):
    """A scenario file that cannot be used; `problems` are `path: message` lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


# ----- behaviour -------------------------------------------------------------------------------------------
def _constant_latency(value: Any) -> Any:
    if isinstance(value, str | int | float):
        return {"dist": "constant", "value": value}
    return value


class Latency(_Model):
    """A latency distribution in scenario seconds. A bare duration (`300ms`) means constant."""

    dist: Literal["constant", "uniform", "lognormal", "normal"] = "constant"
    value: Duration | None = None
    """constant"""
    min: Duration | None = None
    """uniform: lower bound; other distributions: floor"""
    max: Duration | None = None
    """uniform: upper bound; other distributions: ceiling"""
    median: Duration | None = None
    """lognormal"""
    p99: Duration | None = None
    """lognormal: the 99th percentile (sets the spread)"""
    mean: Duration | None = None
    """normal"""
    stddev: Duration | None = None
    """normal"""

    @model_validator(mode="after")
    def _complete(self) -> Self:
        need = {"constant": ("value",), "uniform": ("min", "max"), "lognormal": ("median", "p99"),
                "normal": ("mean", "stddev")}[self.dist]
        missing = [name for name in need if getattr(self, name) is None]
        if missing:
            raise ValueError(f"{self.dist} latency needs {', '.join(missing)}")
        if self.dist == "lognormal" and (self.median or 0) > (self.p99 or 0):
            raise ValueError("p99 must not be below the median")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min must not be above max")
        return self

    def sample(self, rng: random.Random) -> float:
        if self.dist == "constant":
            value = self.value or 0.0
        elif self.dist == "uniform":
            value = rng.uniform(self.min or 0.0, self.max or 0.0)
        elif self.dist == "lognormal":
            median = max(self.median or 0.0, 1e-6)
            sigma = math.log(max(self.p99 or median, median) / median) / _Z99
            value = rng.lognormvariate(math.log(median), sigma)
        else:
            value = rng.gauss(self.mean or 0.0, self.stddev or 0.0)
        if self.min is not None:
            value = max(value, self.min)
        if self.max is not None:
            value = min(value, self.max)
        return max(0.0, value)


LatencyField = Annotated[Latency, BeforeValidator(_constant_latency)]
ErrorKey = Annotated[int | Literal["hang", "reset"], Field(union_mode="left_to_right")]


class Tokens(_Model):
    """Token counts a successful answer reports (and the provider bills)."""

    input: int = Field(default=600, ge=0)
    output: int = Field(default=200, ge=0)


class RateLimit(_Model):
    """Rate-limit headers the fake sends with every answer (success or error), named as its dialect names
    them, for a window of one minute of scenario time. A phase's `rateLimit` overrides the baseline's field
    by field."""

    requests: int = Field(default=4000, ge=1)
    """Requests per minute (the `requests` dimension)."""
    input_tokens: int = Field(default=2_000_000, ge=1)
    """Input tokens per minute (Anthropic `input-tokens` and `tokens`, OpenAI `tokens`)."""
    exhausted: bool = False
    """The organisation's requests are spent until the phase ends (another workload used them): every request
    gets a 429 with `retry-after` and headers saying 0 remaining until then."""


class Behaviour(_Model):
    """How a provider answers. Phases override the baseline field by field."""

    latency: LatencyField | None = None
    """Time to the response headers of a successful answer."""
    errors: dict[ErrorKey, Annotated[float, Field(ge=0, le=1)]] | None = None
    """Share of requests failing, by HTTP status (e.g. 429, 500, 503, 529) or `hang` / `reset`."""
    error_latency: LatencyField | None = None
    """Time to an error response."""
    retry_after: Duration | None = None
    """`retry-after` sent with 429, 503 and 529 errors."""
    tokens: Tokens | None = None
    chunk_delay: Duration | None = None
    """Streams: time between deltas."""
    rate_limit: RateLimit | None = None
    """Rate-limit headers on every answer (none when unset)."""

    @model_validator(mode="after")
    def _rates(self) -> Self:
        for key in self.errors or {}:
            if isinstance(key, int) and not 400 <= key <= 599:
                raise ValueError(f"errors: {key} is not an HTTP error status")
        if sum((self.errors or {}).values()) > 1.0 + 1e-9:
            raise ValueError("errors: the rates add up to more than 1")
        return self


def _all_529() -> dict[int | Literal["hang", "reset"], float]:
    return {529: 1.0}


class Burst(_Model):
    """Periodic microspikes inside a phase: `length` of `errors` every `every`, starting at `offset`."""

    every: Duration
    length: Duration
    offset: Duration = 0.0
    errors: dict[ErrorKey, Annotated[float, Field(ge=0, le=1)]] = Field(default_factory=_all_529)
    retry_after: Duration | None = None

    @model_validator(mode="after")
    def _shape(self) -> Self:
        if not 0 < self.length < self.every:
            raise ValueError("bursts need 0 < length < every")
        return self


class Phase(Behaviour):
    """A stretch of the timeline with its own behaviour; `kind` names the window in reports."""

    name: str | None = None
    kind: str = "healthy"
    """healthy | microspike | outage | brownout | recovery (free text; the summary groups by it)."""
    start: Duration = Field(alias="from")
    end: Duration = Field(alias="to")
    bursts: Burst | None = None

    @model_validator(mode="after")
    def _order(self) -> Self:
        if self.end <= self.start:
            raise ValueError("to must be after from")
        return self


class ProviderScenario(_Model):
    baseline: Behaviour = Field(default_factory=Behaviour)
    phases: list[Phase] = Field(default_factory=list)

    @model_validator(mode="after")
    def _no_overlap(self) -> Self:
        ordered = sorted(self.phases, key=lambda p: p.start)
        for before, after in itertools.pairwise(ordered):
            if after.start < before.end:
                raise ValueError(f"phases overlap at {format_duration(after.start)}")
        return self


class StatusChange(_Model):
    at: Duration
    status: ComponentStatus
    incident: str | None = None
    """Open an incident naming the component with this title (resolved when it is operational again)."""


class StatusPageScenario(_Model):
    """A fake Statuspage for a provider: the watched component's status over time."""

    flavor: Literal["statuspage", "incidentio"] = "statuspage"
    component: str | None = None
    """Component id or name (default: the Claude API component, or OpenAI's `API`)."""
    timeline: list[StatusChange] = Field(default_factory=list)


class Traffic(_Model):
    rate: float = Field(default=8.0, gt=0, le=10_000)
    """Requests per second of scenario time (open loop: arrivals do not wait for answers)."""
    arrivals: Literal["uniform", "poisson"] = "uniform"
    max_in_flight: int = Field(default=512, ge=1, le=20_000)
    """Client bound: an arrival beyond it is counted as not sent (never seen in practice)."""
    stream: float = Field(default=0.0, ge=0, le=1)
    """Share of requests asking for a stream."""
    route: str | None = None
    """Route to call (default: the policy's defaultRoute, else its first route)."""
    variables: list[dict[str, Any]] = Field(default_factory=list)
    """Request variables, used in turn (default: a few support tickets as `text`)."""


class Expect(_Model):
    """Acceptance figures the summary checks (each optional)."""

    availability: float | None = Field(default=None, ge=0, le=1)
    """Minimum share of requests answered."""
    fallback_in_microspikes: int | None = Field(default=None, ge=0)
    """Maximum answers from a fallback for requests in flight during a microspike."""
    outage_p50: Duration | None = None
    """Maximum median latency of requests sent during outage windows."""
    calls_per_answer: float | None = Field(default=None, gt=0)
    """Maximum upstream calls (counted at the fakes) per answered request."""
    degraded_over_outage: Duration | None = None
    """Maximum seconds' worth of traffic by which the degraded share exceeds the outage windows' share
    of the timeline (how long answers stay degraded beyond the outage itself)."""


class Scenario(_Model):
    name: str
    description: str = ""
    duration: Duration
    speed: float = Field(default=1.0, gt=0, le=100)
    """Default playback speed (`--speed` overrides)."""
    seed: int = 1
    traffic: Traffic = Field(default_factory=Traffic)
    providers: dict[Role, ProviderScenario] = Field(default_factory=dict)
    status_pages: dict[Role, StatusPageScenario] = Field(default_factory=dict)
    expect: Expect | None = None

    @model_validator(mode="after")
    def _inside(self) -> Self:
        if self.duration <= 0:
            raise ValueError("duration must be positive")
        return self

    def windows(self) -> list[Window]:
        """The primary's timeline as report windows (bursts included, gaps as `healthy`)."""
        return [Window(s.name, s.kind, s.start, s.end) for s in build_segments(self, "primary")]

    def status_changes(self, role: Role = "primary") -> list[StatusChange]:
        page = self.status_pages.get(role)
        return sorted(page.timeline, key=lambda c: c.at) if page else []


@dataclass(frozen=True, slots=True)
class Window:
    name: str
    kind: str
    start: float
    end: float

    def contains(self, t: float) -> bool:
        return self.start <= t < self.end


# ----- loading ----------------------------------------------------------------------------------------------
def load_scenario(path: str | Path) -> Scenario:
    """Parse and validate a scenario file; raise ScenarioError with `path: message` lines."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ScenarioError([f"{file}: {exc.strerror}"]) from None
    return parse_scenario(text, str(file))


def parse_scenario(text: str, source: str = "scenario") -> Scenario:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ScenarioError([f"{source}: not valid YAML: {exc}"]) from None
    if not isinstance(document, Mapping):
        raise ScenarioError([f"{source}: expected a mapping"])
    try:
        return Scenario.model_validate(document)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = ".".join(str(part) for part in error["loc"] if not str(part).startswith(("function-",
                                                                                         "literal[")))
            problems.append(f"{source}: {loc}: {error['msg']}")
        raise ScenarioError(problems) from None


# ----- the timeline -----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Segment:
    """A stretch of a provider's timeline with its behaviour fully resolved (baseline + phase + burst)."""

    start: float
    end: float
    name: str
    kind: str
    latency: Latency
    errors: tuple[tuple[int | str, float], ...]
    error_latency: Latency
    retry_after: float | None
    tokens: Tokens
    chunk_delay: float
    rate_limit: RateLimit | None = None


_DEFAULT_LATENCY = Latency(dist="lognormal", median=0.3, p99=0.9)
_DEFAULT_ERROR_LATENCY = Latency(dist="uniform", min=0.02, max=0.08)


def _resolve(start: float, end: float, name: str, kind: str, *layers: Behaviour | None) -> Segment:
    def pick(field: str) -> Any:
        for layer in reversed(layers):
            if layer is not None and getattr(layer, field) is not None:
                return getattr(layer, field)
        return None

    errors = pick("errors") or {}
    rate_limit: RateLimit | None = None
    for layer in layers:  # field by field: a phase saying `exhausted: true` keeps the baseline's limits
        if layer is not None and layer.rate_limit is not None:
            update = layer.rate_limit.model_dump(exclude_unset=True)
            rate_limit = rate_limit.model_copy(update=update) if rate_limit else layer.rate_limit
    return Segment(
        start=start, end=end, name=name, kind=kind,
        latency=pick("latency") or _DEFAULT_LATENCY,
        errors=tuple((k, v) for k, v in errors.items() if v > 0),
        error_latency=pick("error_latency") or _DEFAULT_ERROR_LATENCY,
        retry_after=pick("retry_after"),
        tokens=pick("tokens") or Tokens(),
        chunk_delay=pick("chunk_delay") or 0.0,
        rate_limit=rate_limit,
    )


def build_segments(scenario: Scenario, role: Role) -> list[Segment]:
    """The provider's timeline over [0, duration) as contiguous segments."""
    spec = scenario.providers.get(role, ProviderScenario())
    base = spec.baseline
    segments: list[Segment] = []
    cursor = 0.0
    for index, phase in enumerate(sorted(spec.phases, key=lambda p: p.start)):
        if phase.start > cursor:
            segments.append(_resolve(cursor, phase.start, "healthy", "healthy", base))
        name = phase.name or f"{phase.kind} {index + 1}"
        burst = phase.bursts
        if burst is None:
            segments.append(_resolve(phase.start, phase.end, name, phase.kind, base, phase))
        else:
            spike = Behaviour(errors=burst.errors, retry_after=burst.retry_after)
            t, number = phase.start, 0
            while True:
                spike_start = phase.start + burst.offset + number * burst.every
                if spike_start >= phase.end:
                    break
                spike_end = min(spike_start + burst.length, phase.end)
                if spike_start > t:
                    segments.append(_resolve(t, spike_start, name, phase.kind, base, phase))
                number += 1
                segments.append(_resolve(spike_start, spike_end, f"{name}: spike {number}", "microspike",
                                         base, phase, spike))
                t = spike_end
            if t < phase.end:
                segments.append(_resolve(t, phase.end, name, phase.kind, base, phase))
        cursor = phase.end
    if cursor < scenario.duration or not segments:
        segments.append(_resolve(cursor, max(scenario.duration, cursor + 1e-3), "healthy", "healthy", base))
    return segments


class ScenarioClock:
    """Scenario seconds since `start()`, running `speed` times faster than the monotonic clock."""

    def __init__(self, speed: float = 1.0) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.speed = speed
        self._t0: float | None = None

    def start(self) -> None:
        self._t0 = time.monotonic()

    @property
    def started(self) -> bool:
        return self._t0 is not None

    def now(self) -> float:
        """Scenario time; 0 before the start (fakes behave as at t=0 while things come up)."""
        return 0.0 if self._t0 is None else (time.monotonic() - self._t0) * self.speed

    def at(self, monotonic: float) -> float:
        """The scenario time of a `time.monotonic()` reading."""
        return 0.0 if self._t0 is None else (monotonic - self._t0) * self.speed

    def real(self, seconds: float) -> float:
        """Wall seconds for a scenario duration."""
        return seconds / self.speed

    def monotonic_of(self, t: float) -> float:
        """The `time.monotonic()` value at which scenario time `t` is reached."""
        if self._t0 is None:
            raise RuntimeError("the clock has not started")
        return self._t0 + t / self.speed


@dataclass(slots=True)
class Served:
    """One decision of a scenario-driven fake: when (scenario s), in which segment, and what it did."""

    t: float
    segment: str
    kind: str
    outcome: str
    """`ok`, an HTTP status as text (`529`), `hang` or `reset`."""
    model: str | None
    input_tokens: int = 0
    output_tokens: int = 0


DRAW_WINDOW = 0.25
"""Seconds of scenario time whose requests share a draw sequence (see `ProviderTimeline._draws`)."""


class ProviderTimeline:
    """The time-driven `decide` hook of a FakeProvider: the step for *now* on the scenario clock."""

    def __init__(self, segments: list[Segment], clock: ScenarioClock, rng: random.Random) -> None:
        self.segments = segments
        self._starts = [s.start for s in segments]
        self.clock = clock
        self._seed = rng.getrandbits(64)
        self._arrivals: dict[int, int] = {}
        self.served: list[Served] = []
        self._used: dict[int, list[int]] = {}
        """Requests and input tokens per minute of scenario time, for the rate-limit headers."""

    def _draws(self, t: float) -> random.Random:
        """The random draws of one request: keyed by its DRAW_WINDOW of scenario time and its rank
        within it, not by everything that arrived before. One request more or less (a retry the real
        clock timed differently) then changes the draws of its own window only, instead of shifting
        every draw after it: seeded runs stay close to each other."""
        window = int(t / DRAW_WINDOW)
        rank = self._arrivals.get(window, 0)
        self._arrivals[window] = rank + 1
        return random.Random(f"{self._seed}:{window}:{rank}")

    def segment_at(self, t: float) -> Segment:
        index = bisect.bisect_right(self._starts, t) - 1
        return self.segments[max(0, min(index, len(self.segments) - 1))]

    def rate_limit_headers(self, segment: Segment, t: float, dialect: str | None) -> dict[str, str] | None:
        """The segment's rate-limit headers for a request at `t` (counting it), resets in wall seconds."""
        limit = segment.rate_limit
        if limit is None or dialect not in ("anthropic", "openai"):
            return None
        minute = int(t // 60)
        used = self._used.setdefault(minute, [0, 0])
        used[0] += 1
        used[1] += segment.tokens.input
        if limit.exhausted:
            requests_left, reset_requests = 0, segment.end - t
        else:
            requests_left, reset_requests = max(0, limit.requests - used[0]), (minute + 1) * 60 - t
        tokens_left = max(0, limit.input_tokens - used[1])
        speed = self.clock.speed
        requests = (limit.requests, requests_left, reset_requests / speed)
        tokens = (limit.input_tokens, tokens_left, ((minute + 1) * 60 - t) / speed)
        dimensions = {"requests": requests, "tokens": tokens}
        if dialect == "anthropic":
            dimensions["input-tokens"] = tokens
        return ratelimit_headers(dialect, dimensions)  # type: ignore[arg-type]

    def step_at(self, t: float, model: str | None = None, dialect: str | None = None) -> Step:
        """The step for a request arriving at scenario time `t` (draws from the seeded RNG)."""
        segment = self.segment_at(t)
        speed = self.clock.speed
        limits = self.rate_limit_headers(segment, t, dialect)
        if segment.rate_limit is not None and segment.rate_limit.exhausted:
            self.served.append(Served(t, segment.name, segment.kind, "429", model))
            return Fail(429, retry_after=round((segment.end - t) / speed, 3), headers=limits,
                        delay=segment.error_latency.sample(self._draws(t)) / speed)
        rng = self._draws(t)
        draw = rng.random()
        cumulative = 0.0
        for key, rate in segment.errors:
            cumulative += rate
            if draw < cumulative:
                delay = segment.error_latency.sample(rng) / speed
                self.served.append(Served(t, segment.name, segment.kind, str(key), model))
                if key == "hang":
                    return Hang(delay=delay)
                if key == "reset":
                    return Reset(delay=delay)
                assert isinstance(key, int)
                retry_after = None
                if segment.retry_after is not None and key in (429, 503, 529):
                    retry_after = round(segment.retry_after / speed, 3)
                return Fail(int(key), retry_after=retry_after, delay=delay, headers=limits)
        delay = segment.latency.sample(rng) / speed
        tokens = segment.tokens
        self.served.append(Served(t, segment.name, segment.kind, "ok", model, tokens.input, tokens.output))
        return Reply(delay=delay, chunk_delay=segment.chunk_delay / speed,
                     input_tokens=tokens.input, output_tokens=tokens.output, headers=limits)

    def decide(self, request: RecordedRequest) -> Step:
        return self.step_at(self.clock.now(), request.model, request.dialect)

    def served_by_segment(self) -> dict[str, Counter[str]]:
        """Outcomes the fake served, per segment name (what the tests count)."""
        result: dict[str, Counter[str]] = {}
        for item in self.served:
            result.setdefault(item.segment, Counter())[item.outcome] += 1
        return result


_INCIDENT_IMPACT = {"operational": "none", "under_maintenance": "maintenance",
                    "degraded_performance": "minor", "partial_outage": "major", "major_outage": "critical"}


class ScenarioStatusPage(FakeStatusPage):
    """A FakeStatusPage whose watched component follows the scenario's timeline.

    The state is brought up to date when a request arrives (no timer), so what a poll reads is exactly the
    timeline's state at the moment of the poll.
    """

    def __init__(self, spec: StatusPageScenario, clock: ScenarioClock) -> None:
        summary = OPENAI_SUMMARY if spec.flavor == "incidentio" else CLAUDE_SUMMARY
        super().__init__(summary, flavor=spec.flavor, cache_max_age=0)
        default_component = "API" if spec.flavor == "incidentio" else "k8w3r06qmzrp"
        self.spec = spec
        self.clock = clock
        self.component_key = spec.component or default_component
        self.component_id = str(self.component(self.component_key)["id"])
        self._changes = sorted(spec.timeline, key=lambda c: c.at)
        self._incident: str | None = None

    def change_at(self, t: float) -> StatusChange | None:
        current = None
        for change in self._changes:
            if change.at <= t:
                current = change
            else:
                break
        return current

    def state_at(self, t: float) -> str:
        change = self.change_at(t)
        return change.status if change is not None else "operational"

    def sync(self) -> None:
        change = self.change_at(self.clock.now())
        status = change.status if change is not None else "operational"
        if self.component(self.component_key).get("status") != status:
            self.set_component(self.component_key, status)
        wants_incident = change is not None and change.incident is not None and status != "operational"
        if wants_incident and self._incident is None:
            assert change is not None and change.incident is not None
            self._incident = self.add_incident(change.incident, impact=_INCIDENT_IMPACT[status],
                                               components=[self.component_key])
        elif self._incident is not None and status == "operational":
            self.resolve_incident(self._incident)
            self._incident = None

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.sync()
        return await super()._serve(request)


# ----- the world: fakes + status pages for one run ----------------------------------------------------------
class World:
    """The fake providers (primary: Anthropic-shaped, fallback: OpenAI-shaped — the dialect is whatever the
    policy's provider type asks for) and status pages of one scenario run, on loopback ports."""

    def __init__(self, scenario: Scenario, speed: float | None = None, seed: int | None = None) -> None:
        self.scenario = scenario
        self.seed = scenario.seed if seed is None else seed
        self.clock = ScenarioClock(speed or scenario.speed)
        self.timelines: dict[Role, ProviderTimeline] = {}
        self.providers: dict[Role, FakeProvider] = {}
        for role in ROLES:
            timeline = ProviderTimeline(build_segments(scenario, role), self.clock,
                                        random.Random(f"{self.seed}:{role}"))
            self.timelines[role] = timeline
            self.providers[role] = FakeProvider(role, decide=timeline.decide)
        self.status_pages: dict[Role, ScenarioStatusPage] = {
            role: ScenarioStatusPage(spec, self.clock) for role, spec in scenario.status_pages.items()
        }
        self.quiet_page = ScenarioStatusPage(StatusPageScenario(), self.clock)
        """Always operational: for policy status pages the scenario says nothing about."""

    async def start(self) -> Self:
        for fake in self.providers.values():
            await fake.start()
        for page in [*self.status_pages.values(), self.quiet_page]:
            await page.start()
        return self

    async def stop(self) -> None:
        for page in [*self.status_pages.values(), self.quiet_page]:
            await page.stop()
        for fake in self.providers.values():
            await fake.stop()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def bind(self, document: Mapping[str, Any], route: str | None = None) -> dict[str, Any]:
        """A copy of a policy document pointed at this world: the route's first target's provider at the
        primary fake, the others at the fallback fake, status pages at the scenario's (or a quiet) page.
        Nothing is left pointing at a real provider or status host."""
        doc = copy.deepcopy(dict(document))
        spec = doc.get("spec", doc)
        routes = spec.get("routes") or []
        chosen = pick_route(doc, route)
        route_spec = next((r for r in routes if r.get("name") == chosen), routes[0] if routes else {})
        targets = route_spec.get("targets") or []
        primary_provider = targets[0].get("provider") if targets else None
        for provider in spec.get("providers") or []:
            role: Role = "primary" if provider.get("name") == primary_provider else "fallback"
            url = self.providers[role].url
            provider["baseURL"] = url + "/v1" if provider.get("type") == "openai" else url
            provider.pop("apiKey", None)
            page_spec = provider.get("statusPage")
            if page_spec is not None:
                page = self.status_pages.get(role, self.quiet_page)
                page_spec["type"] = "statuspage"
                page_spec["url"] = page.summary_url
                page_spec["components"] = [page.component_id]
        return doc


def pick_route(document: Mapping[str, Any], route: str | None) -> str:
    """The route traffic goes to: the one asked for, else the policy's defaultRoute, else its first."""
    spec = document.get("spec", document)
    names = [r.get("name") for r in spec.get("routes") or []]
    if route is not None:
        if route not in names:
            known = ", ".join(map(str, names))
            raise ScenarioError([f'route "{route}" is not in the policy (routes: {known})'])
        return route
    default = spec.get("defaultRoute")
    if default in names:
        return str(default)
    if not names:
        raise ScenarioError(["the policy has no routes"])
    return str(names[0])


# ----- time compression of a policy -------------------------------------------------------------------------
def _scaled(value: Any, speed: float) -> str:
    seconds = parse_duration(value) if isinstance(value, str) else float(value)
    return format_duration(round(seconds / speed, 6))


def scale_policy(document: Mapping[str, Any], speed: float) -> dict[str, Any]:
    """The policy with every duration divided by `speed` (and per-second rates multiplied by it).

    Defaults are filled in first (through the policy model), so a default budget is scaled too. The retry
    budget's `minPerSecond` grows with the speed and its window shrinks, so the retries it allows per
    scenario window stay the same. Warnings about budgets outside 4s..12s are expected at speed != 1.
    """
    document = load_policy(document).to_document()
    if speed == 1:
        return document
    spec = document["spec"]
    for route in spec.get("routes", []):
        for key in ("budget", "deadline", "attemptTimeout", "firstTokenTimeout", "stallTimeout"):
            if key in route:
                route[key] = _scaled(route[key], speed)
        backoff = route.get("backoff") or {}
        for key in ("initial", "max"):
            if key in backoff:
                backoff[key] = _scaled(backoff[key], speed)
        quorum = route.get("quorum")
        if quorum:
            for key in ("grace", "hedgeAfter"):
                if quorum.get(key) is not None:
                    quorum[key] = _scaled(quorum[key], speed)
    breaker = spec.get("circuitBreaker") or {}
    for key in ("openAfter", "probeInterval"):
        if breaker.get(key) is not None:
            breaker[key] = _scaled(breaker[key], speed)
    budget = spec.get("retryBudget") or {}
    if "window" in budget:
        budget["window"] = _scaled(budget["window"], speed)
    if "minPerSecond" in budget:
        budget["minPerSecond"] = float(budget["minPerSecond"]) * speed
    for provider in spec.get("providers", []):
        page = provider.get("statusPage")
        if page and "pollInterval" in page:
            page["pollInterval"] = _scaled(page["pollInterval"], speed)
    return document
