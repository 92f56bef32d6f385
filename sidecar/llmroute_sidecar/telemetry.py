"""Metrics and traces for what matters: fallback rate, errors by class, retry latency, budgets, cost.

Prometheus metrics carry the contract's names (CONTRACT.md §4); each sidecar app has its own registry
(tests run several in one process). Traces use the OpenTelemetry SDK with the GenAI semantic
conventions (`gen_ai.provider.name`, not the deprecated `gen_ai.system`): one server span per request,
one client span per upstream attempt. With no `OTEL_*` exporter configured, the tracer is a no-op and
costs next to nothing on the hot path. Prompts and completions are never recorded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .messages import Usage
from .policy import Price

_GENAI_PROVIDER = {"anthropic": "anthropic", "openai": "openai", "gemini": "gcp.gemini"}
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
_WAIT_BUCKETS = (0.0, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16)


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

    __slots__ = ("span",)

    def __init__(self, span: Span) -> None:
        self.span = span

    def usage(self, usage: Usage) -> None:
        if self.span.is_recording():
            self.span.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens)
            self.span.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens)

    def fail(self, error_type: str) -> None:
        if self.span.is_recording():
            self.span.set_attribute("error.type", error_type)
            self.span.set_status(Status(StatusCode.ERROR, error_type))


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
        self.reload_errors = Counter(
            "llmroute_config_reload_errors", "Policy reloads refused as invalid.", registry=r
        )
        self.tracer = (tracer_provider or trace.NoOpTracerProvider()).get_tracer("llmroute")
        self._state_readers: list[Callable[[], None]] = []

    # ----- request level (server) ----------------------------------------------------------------------
    @contextmanager
    def request_span(self, name: str, route: str | None) -> Iterator[Span]:
        with self.tracer.start_as_current_span(name, kind=SpanKind.SERVER) as span:
            if route is not None and span.is_recording():
                span.set_attribute("llmroute.route", route)
            yield span

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

    def usage(self, provider: str, model: str, usage: Usage, price: Price | None) -> None:
        self.tokens.labels(provider, model, "input").inc(usage.input_tokens)
        self.tokens.labels(provider, model, "output").inc(usage.output_tokens)
        if price is not None:
            cost = (usage.input_tokens * price.input + usage.output_tokens * price.output) / 1_000_000
            self.cost.labels(provider, model).inc(cost)

    # ----- attempt level (engine) ----------------------------------------------------------------------
    @contextmanager
    def attempt_span(self, route: str, target: Any, model: str, step: int, stream: bool) -> Iterator[AttemptSpan]:
        with self.tracer.start_as_current_span(f"chat {model}", kind=SpanKind.CLIENT) as span:
            if span.is_recording():
                span.set_attributes(
                    {
                        "gen_ai.operation.name": "chat",
                        "gen_ai.provider.name": _GENAI_PROVIDER.get(target.provider.type, target.provider.type),
                        "gen_ai.request.model": model,
                        "llmroute.route": route,
                        "llmroute.target": target.name,
                        "llmroute.attempt": step,
                        "llmroute.stream": stream,
                        "server.address": target.provider.effective_base_url,
                    }
                )
            yield AttemptSpan(span)

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
