"""Observability end to end: OpenTelemetry spans, Prometheus `/metrics`, `/status` and the JSON log line.

Spans are captured with the SDK's `InMemorySpanExporter` behind a `SimpleSpanProcessor`, on a
`TracerProvider` handed to the real sidecar; metrics are read back from `/metrics` and compared with
what the fake providers actually received.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from llmroute_sidecar.simulator.fake_statuspage import FakeStatusPage
from llmroute_sidecar.simulator.fakes import CutStream, Fail, FakeProvider, Reply
from llmroute_sidecar.telemetry import Telemetry, tracer_provider_from_env

from .harness import policy_document, running_sidecar

ANTHROPIC_KEY = "sk-ant-api03-TESTKEY-never-in-telemetry-0000"
OPENAI_KEY = "sk-proj-TESTKEY-never-in-telemetry-1111"
SECRET_TEXT = "the customer's password is hunter2"  # a prompt variable: must never reach telemetry
CLAUDE_API = "k8w3r06qmzrp"
PRICING = {"claude-sonnet-4-5": {"input": 3.0, "output": 15.0}, "gpt-4.1-mini": {"input": 0.4, "output": 1.6}}


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeProvider, FakeProvider]]:
    async with (
        FakeProvider("claude", expect_api_key=ANTHROPIC_KEY) as primary,
        FakeProvider("gpt", expect_api_key=OPENAI_KEY) as fallback,
    ):
        yield primary, fallback


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", ANTHROPIC_KEY)
    monkeypatch.setenv("TEST_OPENAI_KEY", OPENAI_KEY)


@pytest.fixture
def exporter() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    yield provider, memory
    provider.shutdown()


def document(primary: FakeProvider, fallback: FakeProvider, **kwargs: Any) -> dict[str, Any]:
    """Keys from the environment, pricing, and a short budget (a shed request takes one budget). The
    circuit opens after 5 s unless a test says otherwise (by default `openAfter` is the budget, so one
    request retrying for its whole budget may open it and shed as `circuit-open`)."""
    kwargs["route"] = {"budget": "300ms", **kwargs.get("route", {})}
    kwargs["spec"] = {"circuitBreaker": {"openAfter": "5s"}, **kwargs.get("spec", {})}
    doc = policy_document(primary.url, fallback.url, **kwargs)
    doc["spec"]["providers"][0]["apiKey"] = {"env": "TEST_ANTHROPIC_KEY"}
    doc["spec"]["providers"][1]["apiKey"] = {"env": "TEST_OPENAI_KEY"}
    doc["spec"]["pricing"] = PRICING
    return doc


async def post(
    session: aiohttp.ClientSession, url: str, text: str = SECRET_TEXT
) -> tuple[int, dict[str, str], dict[str, Any]]:
    async with session.post(f"{url}/v1/routes/summarize", json={"variables": {"text": text}}) as response:
        return response.status, dict(response.headers), await response.json()


async def metrics(session: aiohttp.ClientSession, url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """`/metrics` as {(sample name, sorted labels): value}."""
    async with session.get(f"{url}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """One sample's value (0 when absent: a counter never incremented has no sample)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """Sum over the samples of `name` whose labels include `labels`."""
    return sum(
        v for (n, ls), v in samples.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items())
    )


def attribute_values(span: ReadableSpan) -> Iterator[str]:
    yield span.name
    for value_ in (span.attributes or {}).values():
        if isinstance(value_, (list, tuple)):
            yield from (str(v) for v in value_)
        else:
            yield str(value_)
    for event in span.events:
        yield event.name
        yield from (str(v) for v in (event.attributes or {}).values())
    if span.status.description:
        yield span.status.description


# ----- traces ---------------------------------------------------------------------------------------------


async def test_the_server_span_continues_the_apps_trace(
    fakes: tuple[FakeProvider, FakeProvider], keys: None, exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    primary, fallback = fakes
    provider, memory = exporter
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    async with running_sidecar(document(primary, fallback), tracer_provider=provider) as (url, _):
        async with aiohttp.ClientSession() as session:
            body = {"model": "claude-app", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
            headers = {"traceparent": f"00-{trace_id}-{parent_id}-01"}
            async with session.post(f"{url}/anthropic/v1/messages", json=body, headers=headers) as response:
                assert response.status == 200
            status, _, _ = await post(session, url)  # no trace context: a trace of its own
            assert status == 200
    first, second = [s for s in memory.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert f"{first.context.trace_id:032x}" == trace_id
    assert first.parent is not None and f"{first.parent.span_id:016x}" == parent_id and first.parent.is_remote
    assert second.parent is None and f"{second.context.trace_id:032x}" != trace_id
    [attempt] = [s for s in memory.get_finished_spans() if s.kind == SpanKind.CLIENT][:1]
    assert attempt.context.trace_id == first.context.trace_id


async def test_a_stream_resume_is_an_attempt_with_its_own_span_and_metric(
    fakes: tuple[FakeProvider, FakeProvider], keys: None, exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    primary, fallback = fakes
    provider, memory = exporter
    full = "The quick brown fox jumps over the lazy dog."
    primary.script(CutStream(text=full, after_chunks=2), Reply(text=full))
    async with running_sidecar(document(primary, fallback), tracer_provider=provider) as (url, _):
        async with aiohttp.ClientSession() as session:
            body = {"variables": {"text": "hello"}, "stream": True}
            async with session.post(f"{url}/v1/routes/summarize", json=body) as response:
                raw = (await response.read()).decode()
            assert response.status == 200 and "event: done" in raw and "event: error" not in raw
            samples = await metrics(session, url)
    assert primary.count() == 2 and fallback.count() == 0
    assert value(samples, "llmroute_attempts_total", route="summarize", target="primary", provider="claude",
                 result="ok") == 2
    [server] = [s for s in memory.get_finished_spans() if s.kind == SpanKind.SERVER]
    clients = [s for s in memory.get_finished_spans() if s.kind == SpanKind.CLIENT]
    assert len(clients) == 2, "the first attempt and its resume"
    assert all(c.parent is not None and c.parent.span_id == server.context.span_id for c in clients)
    assert [c.attributes["llmroute.attempt"] for c in clients if c.attributes] == [0, 1]
    assert server.attributes is not None and server.attributes["llmroute.outcome"] == "ok"
    assert server.attributes["gen_ai.usage.output_tokens"] > 0  # a stream's usage lands on the request span


async def test_server_span_per_request_with_a_client_span_per_attempt(
    fakes: tuple[FakeProvider, FakeProvider], keys: None, exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    primary, fallback = fakes
    provider, memory = exporter
    primary.script(Fail(529))  # request 1: one retry, then the primary answers
    async with running_sidecar(document(primary, fallback), tracer_provider=provider) as (url, _):
        async with aiohttp.ClientSession() as session:
            status, _, first = await post(session, url)
            assert status == 200 and first["target"] == "primary"
            primary.default = Fail(529)  # request 2: the primary is down, the budget runs out, backup answers
            status, _, second = await post(session, url)
            assert status == 200 and second["target"] == "backup"
    spans = memory.get_finished_spans()
    servers = [s for s in spans if s.kind == SpanKind.SERVER]
    clients = [s for s in spans if s.kind == SpanKind.CLIENT]
    assert len(servers) == 2, "one server span per request"
    assert len({s.context.trace_id for s in servers}) == 2
    assert len(clients) == primary.count() + fallback.count(), "one client span per upstream attempt"
    for client_span in clients:
        parent = next(s for s in servers if s.context.trace_id == client_span.context.trace_id)
        assert client_span.parent is not None and client_span.parent.span_id == parent.context.span_id

    one, two = sorted(servers, key=lambda s: s.start_time or 0)
    first_attempts = sorted(
        (s for s in clients if s.context.trace_id == one.context.trace_id), key=lambda s: s.start_time or 0
    )
    failed, ok = first_attempts
    assert failed.attributes is not None and ok.attributes is not None
    assert failed.attributes["error.type"] == "529" and failed.status.status_code == StatusCode.ERROR
    assert "error.type" not in ok.attributes and ok.status.status_code != StatusCode.ERROR
    for span, attempt in ((failed, 0), (ok, 1)):
        attrs = span.attributes
        assert attrs is not None
        assert attrs["gen_ai.provider.name"] == "anthropic"
        assert attrs["gen_ai.operation.name"] == "chat"
        assert attrs["gen_ai.request.model"] == "claude-sonnet-4-5"
        assert attrs["llmroute.route"] == "summarize" and attrs["llmroute.target"] == "primary"
        assert attrs["llmroute.attempt"] == attempt and attrs["llmroute.degraded"] is False
        assert attrs["server.address"] == "127.0.0.1" and attrs["server.port"] == primary.port
    assert ok.attributes["gen_ai.usage.input_tokens"] == first["usage"]["input_tokens"]
    assert ok.attributes["gen_ai.usage.output_tokens"] == first["usage"]["output_tokens"]
    assert one.attributes is not None and two.attributes is not None
    assert one.attributes["llmroute.route"] == "summarize" and one.attributes["llmroute.target"] == "primary"
    assert one.attributes["llmroute.degraded"] is False and "llmroute.shed_reason" not in one.attributes

    assert two.attributes["llmroute.target"] == "backup" and two.attributes["llmroute.degraded"] is True
    assert two.attributes["llmroute.shed_reason"] == "budget-exhausted"
    second_attempts = [s for s in clients if s.context.trace_id == two.context.trace_id]
    backup = [s for s in second_attempts if s.attributes and s.attributes["llmroute.target"] == "backup"]
    assert len(backup) == 1 and backup[0].attributes is not None
    assert backup[0].attributes["gen_ai.provider.name"] == "openai"
    assert backup[0].attributes["gen_ai.request.model"] == "gpt-4.1-mini"
    assert backup[0].attributes["llmroute.degraded"] is True
    assert backup[0].attributes["gen_ai.usage.output_tokens"] == second["usage"]["output_tokens"]
    primary_failures = [s for s in second_attempts if s.attributes and s.attributes["llmroute.target"] == "primary"]
    assert primary_failures and all(s.attributes and s.attributes["error.type"] == "529" for s in primary_failures)


async def test_no_prompt_completion_or_api_key_in_any_span(
    fakes: tuple[FakeProvider, FakeProvider], keys: None, exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    primary, fallback = fakes
    provider, memory = exporter
    primary.script(Fail(500, message=f"upstream echoed {SECRET_TEXT}"))
    fallback.reply_text = "COMPLETION-TEXT-never-in-telemetry"
    primary.reply_text = "COMPLETION-TEXT-never-in-telemetry"
    async with running_sidecar(document(primary, fallback), tracer_provider=provider) as (url, _):
        async with aiohttp.ClientSession() as session:
            assert (await post(session, url))[0] == 200
            primary.default = Fail(529)
            assert (await post(session, url))[2]["target"] == "backup"
            async with session.post(  # the Anthropic-compatible endpoint is traced too
                f"{url}/anthropic/v1/messages",
                json={"model": "claude-sonnet-4-5", "max_tokens": 64,
                      "messages": [{"role": "user", "content": SECRET_TEXT}]},
                headers={"x-api-key": "placeholder", "anthropic-version": "2023-06-01"},
            ) as response:
                assert response.status == 200
    spans = memory.get_finished_spans()
    assert sum(1 for s in spans if s.kind == SpanKind.SERVER) == 3
    forbidden = (ANTHROPIC_KEY, OPENAI_KEY, "hunter2", "You summarize support tickets", "COMPLETION-TEXT")
    for span in spans:
        for text in attribute_values(span):
            assert not any(word in text for word in forbidden), (span.name, text)


async def test_a_status_page_shed_is_on_the_server_span_and_costs_no_primary_span(
    fakes: tuple[FakeProvider, FakeProvider], keys: None, exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    primary, fallback = fakes
    provider, memory = exporter
    async with FakeStatusPage.claude() as page:
        page.set_component(CLAUDE_API, "major_outage")
        spec = {"url": page.summary_url, "components": [CLAUDE_API], "confirmAfter": 1, "pollInterval": "30s"}
        doc = document(primary, fallback, primary_status_page=spec)
        async with running_sidecar(doc, tracer_provider=provider) as (url, state):
            await state.upstreams.status.poll_now()
            async with aiohttp.ClientSession() as session:
                _, headers, body = await post(session, url)
    assert body["target"] == "backup" and headers["llmroute-shed-reason"] == "status-page"
    spans = memory.get_finished_spans()
    (server,) = [s for s in spans if s.kind == SpanKind.SERVER]
    clients = [s for s in spans if s.kind == SpanKind.CLIENT]
    assert server.attributes is not None and server.attributes["llmroute.shed_reason"] == "status-page"
    assert [s.attributes["llmroute.target"] for s in clients if s.attributes] == ["backup"]
    assert primary.count() == 0


def test_no_otel_variables_means_no_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert tracer_provider_from_env() is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert tracer_provider_from_env() is None
    telemetry = Telemetry(None)
    with telemetry.request_span("POST /v1/routes/x", "x") as span:
        assert not span.is_recording()  # the no-op tracer: nothing is built or exported


# ----- metrics --------------------------------------------------------------------------------------------


async def test_requests_refused_before_any_upstream_call_are_counted_and_traced(
    fakes: tuple[FakeProvider, FakeProvider], keys: None, exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    primary, fallback = fakes
    provider, memory = exporter
    async with running_sidecar(document(primary, fallback), tracer_provider=provider) as (url, _):
        async with aiohttp.ClientSession() as session:
            for path, body in [
                ("/v1/routes/summarize", b"{not json"),
                ("/v1/routes/summarize", b'{"variables": {}}'),  # the template's `text` is missing
                ("/v1/routes/no-such-route-1", b"{}"),
                ("/v1/routes/no-such-route-2", b"{}"),
                ("/anthropic/v1/messages", b'{"model": "m", "messages": "not a list"}'),
            ]:
                async with session.post(url + path, data=body) as response:
                    assert 400 <= response.status < 500
            samples = await metrics(session, url)
    assert primary.count() == fallback.count() == 0
    refused = {"target": "none", "degraded": "false", "outcome": "request_error"}
    assert value(samples, "llmroute_requests_total", route="summarize", **refused) == 2
    assert value(samples, "llmroute_requests_total", route="none", **refused) == 3  # no label per bad name
    assert total(samples, "llmroute_requests_total", route="no-such-route-1") == 0
    servers = [s for s in memory.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert len(servers) == 5 and all(s.status.status_code == StatusCode.ERROR for s in servers)
    assert all(s.attributes and s.attributes["llmroute.outcome"] == "request_error" for s in servers)


async def test_metrics_match_the_requests_made(fakes: tuple[FakeProvider, FakeProvider], keys: None) -> None:
    primary, fallback = fakes
    async with FakeStatusPage.claude() as page:
        spec = {"url": page.summary_url, "components": [CLAUDE_API], "confirmAfter": 1, "pollInterval": "30s"}
        async with running_sidecar(document(primary, fallback, primary_status_page=spec)) as (url, state):
            board = state.upstreams.status
            async with aiohttp.ClientSession() as session:
                await board.poll_now()
                before = await metrics(session, url)
                assert value(before, "llmroute_statuspage_indicator", provider="claude") == 0

                primary.script(Fail(529))
                answers = [await post(session, url)]  # retried once, then the primary
                answers.append(await post(session, url))  # the primary at once
                primary.default = Fail(529)
                answers.append(await post(session, url))  # budget exhausted: the backup
                primary.default = Reply()
                page.set_component(CLAUDE_API, "major_outage")
                await board.poll_now()
                answers.append(await post(session, url))  # shed on the status page: the backup
                after = await metrics(session, url)

    assert [a[2]["target"] for a in answers] == ["primary", "primary", "backup", "backup"]
    assert [a[1].get("llmroute-shed-reason") for a in answers] == [None, None, "budget-exhausted", "status-page"]
    failures_529 = sum(1 for r in primary.requests if r.status == 529)
    primary_ok = sum(1 for r in primary.requests if r.status == 200)
    assert primary_ok == 2 and fallback.count() == 2

    route = {"route": "summarize"}
    assert value(after, "llmroute_requests_total", **route, target="primary", degraded="false", outcome="ok") == 2
    assert value(after, "llmroute_requests_total", **route, target="backup", degraded="true", outcome="ok") == 2
    assert total(after, "llmroute_requests_total") == 4
    primary_labels = {**route, "target": "primary", "provider": "claude"}
    assert value(after, "llmroute_attempts_total", **primary_labels, result="http_529") == failures_529
    assert value(after, "llmroute_attempts_total", **primary_labels, result="ok") == primary_ok
    assert value(after, "llmroute_attempts_total", **route, target="backup", provider="gpt", result="ok") == 2
    assert total(after, "llmroute_attempts_total") == primary.count() + fallback.count()
    assert value(after, "llmroute_shed_total", **route, reason="budget-exhausted") == 1
    assert value(after, "llmroute_shed_total", **route, reason="status-page") == 1
    assert total(after, "llmroute_shed_total") == 2
    assert value(after, "llmroute_request_duration_seconds_count", **route) == 4
    assert value(after, "llmroute_retry_wait_seconds_count", **route) == 4
    assert value(after, "llmroute_statuspage_indicator", provider="claude") == 3
    assert value(after, "llmroute_circuit_open", target="primary") == 0

    for provider_name, model in (("claude", "claude-sonnet-4-5"), ("gpt", "gpt-4.1-mini")):
        used = [a[2]["usage"] for a in answers if a[2]["provider"] == provider_name]
        tokens_in = sum(u["input_tokens"] for u in used)
        tokens_out = sum(u["output_tokens"] for u in used)
        labels = {"provider": provider_name, "model": model}
        assert value(after, "llmroute_tokens_total", **labels, kind="input") == tokens_in > 0
        assert value(after, "llmroute_tokens_total", **labels, kind="output") == tokens_out > 0
        price = PRICING[model]
        expected = (tokens_in * price["input"] + tokens_out * price["output"]) / 1_000_000
        assert value(after, "llmroute_cost_usd_total", **labels) == pytest.approx(expected)


async def test_retry_budget_exhaustion_and_an_open_circuit_show_in_metrics(
    fakes: tuple[FakeProvider, FakeProvider], keys: None
) -> None:
    primary, fallback = fakes
    primary.default = Fail(529)
    doc = document(
        primary,
        fallback,
        route={"budget": "300ms", "backoff": {"initial": "10ms", "max": "20ms"}},
        spec={
            "retryBudget": {"ratio": 0.0, "minPerSecond": 0, "window": "10s"},  # no retries at all
            "circuitBreaker": {"openAfter": "200ms", "minFailures": 2, "probeInterval": "10s"},
            "pricing": PRICING,
        },
    )
    async with running_sidecar(doc) as (url, state), aiohttp.ClientSession() as session:
        _, headers, body = await post(session, url)
        assert headers["llmroute-shed-reason"] == "retry-budget" and primary.count() == 1
        samples = await metrics(session, url)
        assert value(samples, "llmroute_retry_budget_exhausted_total", provider="claude") == 1
        assert value(samples, "llmroute_shed_total", route="summarize", reason="retry-budget") == 1
        assert (await (await session.get(f"{url}/status")).json())["retryBudgets"]["claude"]["exhausted"] == 1

        started = time.monotonic()
        health = state.upstreams.healths()[("summarize", "primary")]
        while health.state != "open":  # one failing call per request: the streak grows with time
            assert time.monotonic() - started < 3
            await post(session, url)
        samples = await metrics(session, url)
        assert value(samples, "llmroute_circuit_open", target="primary") == 1
        assert value(samples, "llmroute_circuit_open", target="backup") == 0
        _, headers, _ = await post(session, url)
        assert headers["llmroute-shed-reason"] == "circuit-open"
        samples = await metrics(session, url)
        assert value(samples, "llmroute_shed_total", route="summarize", reason="circuit-open") >= 1


# ----- /status and logs -----------------------------------------------------------------------------------


async def test_status_shows_pages_circuits_budgets_and_fallback_rate(
    fakes: tuple[FakeProvider, FakeProvider], keys: None
) -> None:
    primary, fallback = fakes
    async with FakeStatusPage.claude() as page:
        spec = {"url": page.summary_url, "components": [CLAUDE_API], "confirmAfter": 1, "pollInterval": "30s"}
        async with running_sidecar(document(primary, fallback, primary_status_page=spec)) as (url, state):
            await state.upstreams.status.poll_now()
            async with aiohttp.ClientSession() as session:
                await post(session, url)
                primary.default = Fail(529)
                await post(session, url)  # shed to the backup
                async with session.get(f"{url}/status") as response:
                    assert response.status == 200
                    status = await response.json()
            recent = state.telemetry.recent_fallback("summarize")
    assert status["policy"] == "test-policy" and status["ready"] is True
    claude = status["providers"]["claude"]
    assert claude["state"] == "operational" and claude["level"] == 0 and claude["usable"] is True
    assert claude["lastPoll"] and claude["lastGoodPoll"] and claude["shedding"] == 0.0
    assert "gpt" not in status["providers"]  # no status page configured for it
    route = status["routes"]["summarize"]
    assert set(route["targets"]) == {"primary", "backup"}
    assert route["targets"]["primary"]["state"] == "closed"
    assert route["targets"]["primary"]["failures"] >= 1  # the streak of the failing primary
    assert route["answered"] == 2 and route["degradedShare"] == 0.5
    assert set(status["retryBudgets"]) == {"claude", "gpt"}
    assert status["retryBudgets"]["claude"]["requests"] == 2
    assert recent["answered"] == 2 and recent["fallback"] == 1 and recent["rate"] == 0.5
    assert route["recentFallback"]["rate"] == 0.5
    assert route["recentFallback"]["answered"] == 2 and route["recentFallback"]["fallback"] == 1


async def test_one_json_log_line_per_request_without_keys_or_prompts(
    fakes: tuple[FakeProvider, FakeProvider], keys: None, caplog: pytest.LogCaptureFixture
) -> None:
    primary, fallback = fakes
    caplog.set_level(logging.INFO, logger="llmroute.requests")
    primary.script(Fail(529))
    async with running_sidecar(document(primary, fallback)) as (url, _), aiohttp.ClientSession() as session:
        await post(session, url)
        primary.default = Fail(529)
        await post(session, url)
    lines = [r.getMessage() for r in caplog.records if r.name == "llmroute.requests"]
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["event"] == "request" and first["route"] == "summarize" and first["target"] == "primary"
    assert first["outcome"] == "ok" and first["degraded"] is False and first["shedReason"] is None
    assert [a["status"] for a in first["attempts"]] == ["error", "ok"]
    assert second["target"] == "backup" and second["provider"] == "gpt" and second["degraded"] is True
    assert second["shedReason"] == "budget-exhausted"
    for line in lines:
        assert ANTHROPIC_KEY not in line and OPENAI_KEY not in line and "hunter2" not in line
        assert "echo:" not in line and "You summarize" not in line


async def test_record_content_opts_in_to_prompts_and_completions_in_the_log_and_the_span(
    fakes: tuple[FakeProvider, FakeProvider],
    keys: None,
    caplog: pytest.LogCaptureFixture,
    exporter: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    primary, fallback = fakes
    provider, memory = exporter
    caplog.set_level(logging.INFO, logger="llmroute.requests")
    primary.script(Reply(text="a plain answer"), Reply(text="a streamed answer"))
    recording = document(primary, fallback, spec={"telemetry": {"recordContent": True}})
    async with running_sidecar(recording, tracer_provider=provider) as (url, _), aiohttp.ClientSession() as session:
        await post(session, url, text="what the user asked")
        body = {"variables": {"text": "asked again"}, "stream": True}
        async with session.post(f"{url}/v1/routes/summarize", json=body) as response:
            assert response.status == 200 and "event: done" in (await response.read()).decode()
    plain, streamed = (json.loads(r.getMessage()) for r in caplog.records if r.name == "llmroute.requests")
    assert plain["gen_ai.input.messages"][-1] == {"role": "user", "text": "Summarize:\nwhat the user asked"}
    assert plain["gen_ai.output.messages"] == [{"role": "assistant", "text": "a plain answer"}]
    assert streamed["gen_ai.output.messages"] == [{"role": "assistant", "text": "a streamed answer"}]
    servers = [s for s in memory.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert all(s.attributes and "a " in str(s.attributes["gen_ai.output.messages"]) for s in servers)
    assert all(ANTHROPIC_KEY not in json.dumps(dict(s.attributes or {})) for s in servers)
