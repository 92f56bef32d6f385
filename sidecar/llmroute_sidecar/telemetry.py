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
from collections.abc import Callable, Mapping
from contextlib import suppress
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode, set_span_in_context
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

from .messages import ChatResponse, Usage
from .policy import Price, Provider

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
        span_usage(self.span, usage)

    def response(self, response: ChatResponse) -> None:
        """What the provider answered: model, stop reason, usage (never the text)."""
        if self.span.is_recording():
            attributes: dict[str, Any] = {
                "gen_ai.usage.input_tokens": response.usage.input_tokens,
                "gen_ai.usage.output_tokens": response.usage.output_tokens,
                "gen_ai.response.finish_reasons": (str(response.stop_reason),),
            }
            if response.model:
                attributes["gen_ai.response.model"] = response.model
            self.span.set_attributes(attributes)

    def fail(self, error_type: str) -> None:
        self.failed = True
        _mark_failed(self.span, error_type)

    def __enter__(self) -> AttemptSpan:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, Exception) and not self.failed:
            self.fail(type(exc).__qualname__)  # the engine marks upstream failures itself: this is a bug
        self.span.end()


class RequestSpan:
    """The server span of one request. Ends on leaving the block; an exception escaping it (the
    handlers answer every expected failure, so a bug) is recorded by its type only: the SDK's default
    would add its message and traceback, and an upstream error message can quote the prompt (providers
    echo invalid content back), while CONTRACT §4 keeps prompts out of spans."""

    __slots__ = ("span",)

    def __init__(self, span: Span) -> None:
        self.span = span

    def __enter__(self) -> Span:
        return self.span

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, Exception):
            _mark_failed(self.span, type(exc).__qualname__)
        self.span.end()


def span_usage(span: Span, usage: Usage) -> None:
    """Token usage on a span (a stream's usage arrives with its end, after its attempt span closed: the
    request's span carries it then)."""
    if span.is_recording():
        span.set_attributes(
            {"gen_ai.usage.input_tokens": usage.input_tokens, "gen_ai.usage.output_tokens": usage.output_tokens}
        )


def _mark_failed(span: Span, error_type: str) -> None:
    if span.is_recording():
        span.set_attribute("error.type", error_type)
        span.set_status(Status(StatusCode.ERROR, error_type))


def target_span_attributes(route: str, target: str, provider: Provider, degraded: bool) -> dict[str, Any]:
    """The attributes every attempt span of a target carries, computed once per policy load."""
    base = urlsplit(provider.effective_base_url)
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": _GENAI_PROVIDER.get(provider.type, provider.type),
        "llmroute.route": route,
        "llmroute.target": target,
        "llmroute.provider": provider.name,
        "llmroute.degraded": degraded,
        "server.address": base.hostname or "",
    }
    with suppress(ValueError):  # a malformed port is the adapter's problem, not the span's
        if base.port is not None:
            attributes["server.port"] = base.port
    return attributes


_NO_REQUEST_SPAN = RequestSpan(INVALID_SPAN)


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
        self.route_cost = Counter(
            "llmroute_route_cost_usd", "Upstream cost in USD (policy pricing), by route.", ["route", "provider"],
            registry=r,
        )
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
        # Read at scrape time (`read_state_with`), for the chart's alerts and dashboard (docs/runbook.md).
        self.ready = Gauge("llmroute_ready", "1 while the sidecar has a valid policy and is not draining.", registry=r)
        self.policy_load_failing = Gauge(
            "llmroute_policy_load_failing",
            "1 while the newest policy was refused and the last good one keeps serving.", registry=r,
        )
        self.retry_budget_available = Gauge(
            "llmroute_retry_budget_available", "Retries the provider's retry budget still allows in its window.",
            ["provider"], registry=r,
        )
        # CPU seconds and RSS of this process (`process_*`): the sidecar's own cost, beside the app's.
        ProcessCollector(registry=r)
        self.tracer = (tracer_provider or trace.NoOpTracerProvider()).get_tracer("llmroute")
        self.tracing = tracer_provider is not None
        """False: no exporter configured, and spans cost nothing at all on the hot path."""
        self._state_readers: list[Callable[[], None]] = []
        self._recent: dict[str, RecentShare] = {}
        self._children: dict[tuple[object, ...], Any] = {}
        self.pricing: Mapping[str, Price] = {}
        """The policy's `pricing` (USD per million tokens by model), for costs the engine records itself."""

    def _child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """`metric.labels(...)`, remembered: prometheus-client validates and locks on every `labels` call,
        which the hot path would pay several times per request. Bounded like the metric's own children."""
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # ----- request level (server) ----------------------------------------------------------------------
    def request_span(
        self, name: str, route: str | None, headers: Mapping[str, str] | None = None
    ) -> RequestSpan:
        """The server span, a child of the app's own span when its request carries W3C trace context
        (`traceparent`, read by the configured propagators). Spans are started with an explicit parent and
        never made "current": attaching a context per span costs more than the span itself on the hot
        path, and nothing here reads the current span."""
        if not self.tracing:
            return _NO_REQUEST_SPAN
        attributes = {"llmroute.route": route} if route is not None else None
        parent = extract(headers) if headers is not None and "traceparent" in headers else None
        return RequestSpan(
            self.tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
        )

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
        self._child(self.requests, route, target, "true" if degraded else "false", outcome).inc()
        if outcome == "ok":  # answered by a fallback: degraded, or shed off its primary for any reason
            recent = self._recent.get(route)
            if recent is None:  # not setdefault: that would build two 60-slot lists per request
                recent = self._recent[route] = RecentShare()
            recent.add(degraded or shed_reason is not None)
        self._child(self.duration, route).observe(seconds)
        self._child(self.retry_wait, route).observe(retry_wait)
        if shed_reason is not None:
            self.sheds.labels(route, shed_reason).inc()
        if span.is_recording():
            attributes: dict[str, Any] = {
                "llmroute.route": route, "llmroute.target": target, "llmroute.degraded": degraded,
                "llmroute.outcome": outcome,
            }
            if shed_reason is not None:
                attributes["llmroute.shed_reason"] = shed_reason
            span.set_attributes(attributes)
            if outcome != "ok":
                span.set_status(Status(StatusCode.ERROR, outcome))

    def request_refused(self, span: Span, route: str, status: int, error_type: str) -> None:
        """A request answered with an error before any upstream call (bad JSON, unknown route, ...)."""
        self._child(self.requests, route, "none", "false", "request_error").inc()
        if span.is_recording():
            span.set_attributes({"llmroute.route": route, "llmroute.outcome": "request_error",
                                 "http.response.status_code": status})
            _mark_failed(span, error_type)

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

    def usage(self, provider: str, model: str, usage: Usage, price: Price | None, route: str | None = None) -> None:
        self._child(self.tokens, provider, model, "input").inc(usage.input_tokens)
        self._child(self.tokens, provider, model, "output").inc(usage.output_tokens)
        if price is not None:
            cost = (usage.input_tokens * price.input + usage.output_tokens * price.output) / 1_000_000
            self._child(self.cost, provider, model).inc(cost)
            if route is not None:
                self._child(self.route_cost, route, provider).inc(cost)

    # ----- attempt level (engine) ----------------------------------------------------------------------
    def attempt_span(self, parent: Span, target: Any, model: str, step: int, stream: bool) -> AttemptSpan:
        """A client span, child of the request's span; ends on leaving the block."""
        if not self.tracing:
            return AttemptSpan(INVALID_SPAN)
        attributes = {
            **target.span_attributes, "gen_ai.request.model": model, "llmroute.attempt": step, "llmroute.stream": stream
        }
        span = self.tracer.start_span(
            f"chat {model}", context=set_span_in_context(parent), kind=SpanKind.CLIENT, attributes=attributes
        )
        return AttemptSpan(span)

    def attempt(self, route: str, target: Any, result: str) -> None:
        self._child(self.attempts, route, target.name, target.provider.name, result).inc()

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
