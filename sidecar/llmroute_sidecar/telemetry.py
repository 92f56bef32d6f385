"""Metrics and traces for what matters: fallback rate, errors by class, retry latency, budgets, cost.

Prometheus metrics carry the contract's names (CONTRACT.md §4); each sidecar app has its own registry
(tests run several in one process). Traces use the OpenTelemetry SDK with the GenAI semantic
conventions (`gen_ai.provider.name`, not the deprecated `gen_ai.system`): one server span per request,
one client span per upstream attempt. With no `OTEL_*` exporter configured, the tracer is a no-op and
costs next to nothing on the hot path. Prompts and completions are never recorded.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .messages import ChatResponse, Usage
from .policy import Price

_GENAI_PROVIDER = {"anthropic": "anthropic", "openai": "openai", "gemini": "gcp.gemini"}
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
_WAIT_BUCKETS = (0.0, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16)
RECENT_WINDOW = 60
"""Seconds over which `/status` reports each route's recent fallback rate."""


def tracer_provider_from_env() -> trace.TracerProvider | None:
    """An SDK tracer provider exporting over OTLP when the standard variables ask for it; else None."""
    wanted = os.environ.get("OTEL_TRACES_EXPORTER", "")
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if wanted == "none" or (not endpoint and wanted not in ("otlp", "console")):
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": "llmroute-sidecar"}))
    if wanted == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


class AttemptSpan:
    """The span of one upstream attempt, with the few things the engine reports on it."""

    __slots__ = ("failed", "span")

    def __init__(self, span: Span) -> None:
        self.span = span
        self.failed = False

    def usage(self, usage: Usage) -> None:
        if self.span.is_recording():
            self.span.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens)
            self.span.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens)

    def response(self, response: ChatResponse) -> None:
        """What the provider answered: model, stop reason, usage (never the text)."""
        if self.span.is_recording():
            self.usage(response.usage)
            if response.model:
                self.span.set_attribute("gen_ai.response.model", response.model)
            self.span.set_attribute("gen_ai.response.finish_reasons", [str(response.stop_reason)])

    def fail(self, error_type: str) -> None:
        self.failed = True
        _mark_failed(self.span, error_type)


def _mark_failed(span: Span, error_type: str) -> None:
    if span.is_recording():
        span.set_attribute("error.type", error_type)
        span.set_status(Status(StatusCode.ERROR, error_type))


@contextmanager
def _quiet_span(tracer: trace.Tracer, name: str, kind: SpanKind) -> Iterator[Span]:
    """A current span that records an escaping exception by its type only. The SDK's default would add
    the exception's message and traceback, and an upstream error message can quote the prompt (providers
    echo invalid content back): CONTRACT §4 keeps prompts out of spans."""
    with tracer.start_as_current_span(name, kind=kind, record_exception=False, set_status_on_exception=False) as span:
        yield span


class RecentShare:
    """Answers and fallback answers of one route over the last `RECENT_WINDOW` seconds, in one-second
    buckets (O(1) per request, bounded memory whatever the request rate)."""

    __slots__ = ("_answered", "_clock", "_fallback", "_now")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._answered = [0] * RECENT_WINDOW
        self._fallback = [0] * RECENT_WINDOW
        self._now = int(clock())

    def _advance(self) -> int:
        now = int(self._clock())
        if now != self._now:
            for second in range(max(self._now + 1, now - RECENT_WINDOW + 1), now + 1):
                self._answered[second % RECENT_WINDOW] = 0
                self._fallback[second % RECENT_WINDOW] = 0
            self._now = now
        return now % RECENT_WINDOW

    def add(self, fallback: bool) -> None:
        slot = self._advance()
        self._answered[slot] += 1
        if fallback:
            self._fallback[slot] += 1

    def snapshot(self) -> dict[str, float]:
        self._advance()
        answered, fallback = sum(self._answered), sum(self._fallback)
        return {
            "windowSeconds": float(RECENT_WINDOW),
            "answered": float(answered),
            "fallback": float(fallback),
            "rate": round(fallback / answered, 4) if answered else 0.0,
        }


class Telemetry:
    """Every metric and span of one sidecar."""

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "llmroute_requests", "Requests answered, by outcome.", ["route", "target", "degraded", "outcome"],
            registry=r,
        )
        self.attempts = Counter(
            "llmroute_attempts", "Upstream attempts, by result.", ["route", "target", "provider", "result"],
            registry=r,
        )
        self.sheds = Counter("llmroute_shed", "Requests shed off their primary.", ["route", "reason"], registry=r)
        self.duration = Histogram(
            "llmroute_request_duration_seconds", "Time to answer (streams: to the end).", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.retry_wait = Histogram(
            "llmroute_retry_wait_seconds", "Latency added by backoff between retries.", ["route"],
            buckets=_WAIT_BUCKETS, registry=r,
        )
        self.budget_exhaustions = Counter(
            "llmroute_retry_budget_exhausted", "Retries refused by the retry budget.", ["provider"], registry=r
        )
        self.statuspage = Gauge(
            "llmroute_statuspage_indicator", "Status page state, 0 none .. 3 critical.", ["provider"], registry=r
        )
        self.circuit = Gauge("llmroute_circuit_open", "1 while a target's circuit is open.", ["target"], registry=r)
        self.tokens = Counter(
            "llmroute_tokens", "Tokens used upstream.", ["provider", "model", "kind"], registry=r
        )
        self.cost = Counter("llmroute_cost_usd", "Upstream cost in USD (policy pricing).", ["provider", "model"],
                            registry=r)
        self.quorum_calls = Counter(
            "llmroute_quorum_calls", "Quorum and hedge calls, by result.", ["route", "result"], registry=r
        )
        self.status_fetch_errors = Gauge(
            "llmroute_status_fetch_errors", "Unusable status-page fetches since start, by reason.", ["reason"],
            registry=r,
        )
        self.reload_errors = Counter(
            "llmroute_config_reload_errors", "Policy reloads refused as invalid.", registry=r
        )
        self.load_shed = Counter(
            "llmroute_load_shed", "Requests refused unread: the sidecar was at capacity.", ["reason"], registry=r
        )
        self.tracer = (tracer_provider or trace.NoOpTracerProvider()).get_tracer("llmroute")
        self._state_readers: list[Callable[[], None]] = []
        self._recent: dict[str, RecentShare] = {}
        self.pricing: Mapping[str, Price] = {}
        """The policy's `pricing` (USD per million tokens by model), for costs the engine records itself."""

    # ----- request level (server) ----------------------------------------------------------------------
    @contextmanager
    def request_span(self, name: str, route: str | None) -> Iterator[Span]:
        with _quiet_span(self.tracer, name, SpanKind.SERVER) as span:
            if route is not None and span.is_recording():
                span.set_attribute("llmroute.route", route)
            try:
                yield span
            except Exception as exc:  # the handlers answer every expected failure: this is a bug
                _mark_failed(span, type(exc).__qualname__)
                raise

    def request_done(
        self,
        span: Span,
        route: str,
        target: str,
        degraded: bool,
        outcome: str,
        seconds: float,
        retry_wait: float,
        shed_reason: str | None,
    ) -> None:
        self.requests.labels(route, target, "true" if degraded else "false", outcome).inc()
        if outcome == "ok":  # answered by a fallback: degraded, or shed off its primary for any reason
            self._recent.setdefault(route, RecentShare()).add(degraded or shed_reason is not None)
        self.duration.labels(route).observe(seconds)
        self.retry_wait.labels(route).observe(retry_wait)
        if shed_reason is not None:
            self.sheds.labels(route, shed_reason).inc()
        if span.is_recording():
            span.set_attribute("llmroute.route", route)
            span.set_attribute("llmroute.target", target)
            span.set_attribute("llmroute.degraded", degraded)
            span.set_attribute("llmroute.outcome", outcome)
            if shed_reason is not None:
                span.set_attribute("llmroute.shed_reason", shed_reason)
            if outcome != "ok":
                span.set_status(Status(StatusCode.ERROR, outcome))

    def recent_fallback(self, route: str) -> dict[str, float]:
        """The route's answers and the share of them from a fallback over the last minute (`/status`)."""
        recent = self._recent.get(route)
        return recent.snapshot() if recent is not None else RecentShare().snapshot()

    def price(self, *models: str | None) -> Price | None:
        """The policy price of the first model named in `pricing`: the answer's model, then the target's
        (providers answer with dated names, e.g. `gpt-4.1-mini-2025-04-14` for `gpt-4.1-mini`)."""
        for model in models:
            if model and model in self.pricing:
                return self.pricing[model]
        return None

    def usage(self, provider: str, model: str, usage: Usage, price: Price | None) -> None:
        self.tokens.labels(provider, model, "input").inc(usage.input_tokens)
        self.tokens.labels(provider, model, "output").inc(usage.output_tokens)
        if price is not None:
            cost = (usage.input_tokens * price.input + usage.output_tokens * price.output) / 1_000_000
            self.cost.labels(provider, model).inc(cost)

    # ----- attempt level (engine) ----------------------------------------------------------------------
    @contextmanager
    def attempt_span(self, route: str, target: Any, model: str, step: int, stream: bool) -> Iterator[AttemptSpan]:
        with _quiet_span(self.tracer, f"chat {model}", SpanKind.CLIENT) as span:
            if span.is_recording():
                base = urlsplit(target.provider.effective_base_url)
                attributes: dict[str, Any] = {
                    "gen_ai.operation.name": "chat",
                    "gen_ai.provider.name": _GENAI_PROVIDER.get(target.provider.type, target.provider.type),
                    "gen_ai.request.model": model,
                    "llmroute.route": route,
                    "llmroute.target": target.name,
                    "llmroute.provider": target.provider.name,
                    "llmroute.attempt": step,
                    "llmroute.degraded": bool(target.spec.degraded),
                    "llmroute.stream": stream,
                    "server.address": base.hostname or "",
                }
                with suppress(ValueError):  # a malformed port is the adapter's problem, not the span's
                    if base.port is not None:
                        attributes["server.port"] = base.port
                span.set_attributes(attributes)
            attempt = AttemptSpan(span)
            try:
                yield attempt
            except Exception as exc:
                if not attempt.failed:  # the engine marks upstream failures itself; anything else is a bug
                    attempt.fail(type(exc).__qualname__)
                raise

    def attempt(self, route: str, target: Any, result: str) -> None:
        self.attempts.labels(route, target.name, target.provider.name, result).inc()

    def budget_exhausted(self, provider: str) -> None:
        self.budget_exhaustions.labels(provider).inc()

    def quorum(self, route: str, result: str) -> None:
        self.quorum_calls.labels(route, result).inc()

    # ----- state gauges, refreshed at scrape time -------------------------------------------------------
    def read_state_with(self, reader: Callable[[], None]) -> None:
        self._state_readers.append(reader)

    def exposition(self) -> bytes:
        for reader in self._state_readers:
            reader()
        return generate_latest(self.registry)
