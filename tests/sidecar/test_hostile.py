"""HOSTILE.md rows proven end to end: hostile clients, hostile upstreams, shutdown and overload.

Every test runs the real sidecar on loopback (aiohttp `TestServer`, or an `AppRunner` for draining)
against `FakeProvider`s, and talks to it over real sockets: raw bytes where the fault is in the HTTP
framing, aiohttp or the official SDKs otherwise. Timeouts are shortened through `create_app` so each
test stays well under 3 s. The matrix of rows to tests is docs/hostile.md.
"""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llmroute_sidecar.policy import load_policy
from llmroute_sidecar.reloading import PolicyWatcher
from llmroute_sidecar.server import STATE, SidecarState, create_app, shut_down
from llmroute_sidecar.simulator.fakes import (
    Fail,
    FakeProvider,
    Garbage,
    Hang,
    Html,
    Reply,
    StallStream,
    StreamError,
)

from .harness import policy_document, running_sidecar

pytestmark = pytest.mark.timeout(30)

APP_KEY = "sk-app-key-never-forwarded"
KEYS = {"anthropic": "sk-ant-sidecar-secret", "openai": "sk-openai-sidecar-secret", "gemini": "gemini-sidecar-secret"}
KEY_ENV = {"anthropic": "HOSTILE_ANTHROPIC_KEY", "openai": "HOSTILE_OPENAI_KEY", "gemini": "HOSTILE_GEMINI_KEY"}
MODEL = {"anthropic": "claude-sonnet-4-5", "openai": "gpt-4.1", "gemini": "gemini-2.5-flash"}
USER: Any = [{"role": "user", "content": "Summarize: the printer is on fire"}]
ANTHROPIC = "/anthropic/v1/messages"
OPENAI = "/openai/v1/chat/completions"
ROUTE = "/v1/routes/summarize"


# ----- harness -------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for kind, name in KEY_ENV.items():
        monkeypatch.setenv(name, KEYS[kind])


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeProvider, FakeProvider]]:
    async with FakeProvider("primary") as primary, FakeProvider("fallback") as fallback:
        yield primary, fallback


def document(
    primary: FakeProvider | str,
    fallback: FakeProvider | str,
    primary_type: str = "anthropic",
    fallback_type: str = "openai",
    route: dict[str, Any] | None = None,
    spec: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Two targets with keys from the environment; the primary passes the app's request through (no
    params), the route API renders `{{ text }}`. Short budgets: tests stay fast."""
    settings: dict[str, Any] = {
        "budget": "300ms",
        "attemptTimeout": "2s",
        "backoff": {"initial": "20ms", "max": "50ms"},
        "targets": [
            {
                "name": "primary",
                "provider": "claude",
                "model": MODEL[primary_type],
                "prompt": {"template": "Summarize:\n{{ text }}"},
            },
            {
                "name": "backup",
                "provider": "gpt",
                "model": MODEL[fallback_type],
                "degraded": True,
                "prompt": {"system": "You are the backup.", "template": "{{ text }}"},
            },
        ],
        **(route or {}),
    }
    doc = policy_document(
        primary if isinstance(primary, str) else primary.url,
        fallback if isinstance(fallback, str) else fallback.url,
        primary_type=primary_type,
        fallback_type=fallback_type,
        route=settings,
        spec=spec,
    )
    providers = doc["spec"]["providers"]
    providers[0]["apiKey"] = {"env": KEY_ENV[primary_type]}
    providers[1]["apiKey"] = {"env": KEY_ENV[fallback_type]}
    return doc


sidecar = running_sidecar


async def post(
    url: str, path: str, body: Any, headers: dict[str, str] | None = None, **session_options: Any
) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession(**session_options) as session:
        async with session.post(url + path, json=body, headers=headers) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, await response.read()


def anthropic_body(**extra: Any) -> dict[str, Any]:
    return {"model": "claude-app", "max_tokens": 50, "messages": USER, **extra}


def openai_body(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-app", "messages": USER, **extra}


def route_body(**extra: Any) -> dict[str, Any]:
    return {"variables": {"text": "printer on fire"}, **extra}


BODIES = {ANTHROPIC: anthropic_body, OPENAI: openai_body, ROUTE: route_body}


def error_type(path: str, body: bytes) -> str:
    """The error type of an error body in the endpoint's own envelope (asserting the envelope)."""
    parsed = json.loads(body)
    if path == ANTHROPIC:
        assert parsed["type"] == "error"
    return str(parsed["error"]["type"])


def sse_events(raw: bytes | str) -> list[tuple[str | None, str]]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    out: list[tuple[str | None, str]] = []
    for block in text.replace("\r\n", "\n").strip().split("\n\n"):
        name: str | None = None
        data: list[str] = []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        if data:
            out.append((name, "\n".join(data)))
    return out


async def exchange(url: str, data: bytes, timeout: float = 3.0) -> tuple[int, dict[str, str], bytes, float]:
    """Send raw bytes and read one response (its Content-Length, or up to the close):
    (status, headers, body, seconds until the response was complete)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    started = time.monotonic()
    writer.write(data)
    await writer.drain()
    raw = b""
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                raw += chunk
                head, sep, body = raw.partition(b"\r\n\r\n")
                length = [line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
                if sep and length and len(body) >= int(length[0].split(b":")[1]):
                    break
    finally:
        writer.close()
    seconds = time.monotonic() - started
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body, seconds


def counter(metrics: str, name: str, **labels: str) -> float:
    for line in metrics.splitlines():
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def get_text(url: str, path: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url + path) as response:
        return await response.text()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ----- 5.1 downstream ------------------------------------------------------------------------------------
async def test_d2_a_wrong_schema_is_forwarded_verbatim_and_the_providers_400_relayed(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    """Only what the sidecar must parse is checked; the provider is the schema authority."""
    primary, fallback = fakes
    primary.script(Fail(400, message="max_tokens: Field required"))
    sent = {
        "model": "claude-app",  # no max_tokens, roles not alternating, a field from the future
        "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        "future_field": {"anything": [1, 2]},
    }
    async with sidecar(document(primary, fallback)) as (url, _):
        status, headers, body = await post(url, ANTHROPIC, sent)
    assert status == 400 and headers["x-should-retry"] == "false"
    assert json.loads(body)["error"]["message"] == "max_tokens: Field required"
    received = primary.last.body
    assert received["messages"] == sent["messages"] and received["future_field"] == sent["future_field"]
    assert "max_tokens" not in received and received["model"] == MODEL["anthropic"]
    assert primary.count() == 1 and fallback.count() == 0


@pytest.mark.parametrize(
    ("template", "variables"),
    [("{{ items | join(', ') }}", {"items": 5}), ("{{ n + 1 }}", {"n": "a"}), ("{{ '%d' % n }}", {"n": "x"})],
)
async def test_d2_route_variables_of_a_type_the_template_cannot_use_are_a_400(
    fakes: tuple[FakeProvider, FakeProvider], template: str, variables: dict[str, Any]
) -> None:
    primary, fallback = fakes
    doc = document(primary, fallback)
    doc["spec"]["routes"][0]["targets"][0]["prompt"] = {"template": template}
    async with sidecar(doc) as (url, _):
        status, headers, body = await post(url, ROUTE, {"variables": variables})
    assert status == 400 and headers["x-should-retry"] == "false"
    assert error_type(ROUTE, body) == "invalid_request_error" and "template failed to render" in body.decode()
    assert primary.count() == 0 and fallback.count() == 0


@pytest.mark.parametrize("path", [ANTHROPIC, OPENAI, ROUTE])
async def test_d1_a_body_aiohttp_cannot_decode_is_a_400_in_the_callers_shape(
    fakes: tuple[FakeProvider, FakeProvider], path: str
) -> None:
    """A `Content-Encoding: gzip` body that is not gzip: aiohttp's payload error, not a 500 page."""
    primary, fallback = fakes
    request = (
        f"POST {path} HTTP/1.1\r\nHost: sidecar\r\nContent-Type: application/json\r\n".encode()
        + b"Content-Encoding: gzip\r\nContent-Length: 10\r\n\r\n0123456789"
    )
    async with sidecar(document(primary, fallback)) as (url, _):
        status, headers, body, _ = await exchange(url, request)
    assert status == 400 and headers["x-should-retry"] == "false"
    assert error_type(path, body) == "invalid_request_error"
    assert primary.count() == 0 and fallback.count() == 0


async def test_d3_a_gzip_bomb_is_cut_at_the_body_limit(fakes: tuple[FakeProvider, FakeProvider]) -> None:
    primary, fallback = fakes
    bomb = gzip.compress(b" " * (40 * 1024 * 1024), compresslevel=1)  # ~40 KB on the wire
    request = (
        f"POST {ANTHROPIC} HTTP/1.1\r\nHost: sidecar\r\nContent-Type: application/json\r\n".encode()
        + f"Content-Encoding: gzip\r\nContent-Length: {len(bomb)}\r\n\r\n".encode()
        + bomb
    )
    async with sidecar(document(primary, fallback)) as (url, _):
        status, headers, body, _ = await exchange(url, request)
    assert status == 413 and headers["x-should-retry"] == "false"
    assert error_type(ANTHROPIC, body) == "request_too_large"
    assert primary.count() == 0


@pytest.mark.parametrize("path", [ANTHROPIC, OPENAI, ROUTE])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_d4_a_stalled_upload_gets_a_408_and_nothing_goes_upstream(
    fakes: tuple[FakeProvider, FakeProvider], path: str, framing: str
) -> None:
    primary, fallback = fakes
    partial = json.dumps(BODIES[path]()).encode()[:20]
    head = f"POST {path} HTTP/1.1\r\nHost: sidecar\r\nContent-Type: application/json\r\n".encode()
    if framing == "content-length":  # declares more than it sends
        request = head + b"Content-Length: 4000\r\n\r\n" + partial
    else:  # a chunked body whose last chunk never comes
        request = head + b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(partial):x}\r\n".encode() + partial + b"\r\n"
    async with sidecar(document(primary, fallback), body_timeout=0.3) as (url, _):
        status, headers, body, seconds = await exchange(url, request)
    assert status == 408 and headers["x-should-retry"] == "false"
    assert error_type(path, body) in ("timeout_error", "invalid_request_error")
    assert headers.get("connection") == "close" and 0.3 <= seconds < 1.5  # the connection is not reused
    assert primary.count() == 0 and fallback.count() == 0


async def test_d8_hop_by_hop_control_and_key_headers_are_never_forwarded(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    """Only an allow-list of protocol headers reaches a same-dialect target; our key replaces the app's."""
    primary, fallback = fakes
    hostile = {
        "Keep-Alive": "timeout=5",
        "Proxy-Connection": "keep-alive",
        "TE": "trailers",
        "Upgrade": "h2c",
        "X-Envoy-Retry-On": "5xx",
        "X-Envoy-Max-Retries": "9",
        "X-Forwarded-For": "10.0.0.1",
        "Cookie": "session=1",
        "x_api_key": APP_KEY,
        "x-api-key": APP_KEY,
        "Authorization": f"Bearer {APP_KEY}",
        "x-goog-api-key": APP_KEY,
        "x-stainless-retry-count": "0",
        "x-stainless-timeout": "600",
        "llmroute-route": "summarize",
        "anthropic-beta": "context-1m-2025-08-07",
    }
    async with sidecar(document(primary, fallback)) as (url, _):
        status, _, _ = await post(url, ANTHROPIC, anthropic_body(), headers=hostile)
        assert status == 200
        received = primary.last.headers
        listed = {"Connection": "keep-alive, anthropic-beta", "anthropic-beta": "hop-by-hop-here"}
        status, _, _ = await post(url, ANTHROPIC, anthropic_body(), headers=listed)
        assert status == 200 and "anthropic-beta" not in primary.last.headers  # listed in Connection
    assert received["anthropic-beta"] == "context-1m-2025-08-07"  # allow-listed protocol header
    assert received["x-api-key"] == KEYS["anthropic"]
    for name in hostile:
        if name.lower() not in ("anthropic-beta", "x-api-key"):
            assert name.lower() not in received, name
    assert "transfer-encoding" not in received  # re-framed with a Content-Length of our own
    assert APP_KEY not in json.dumps(received) and APP_KEY.encode() not in primary.last.raw_body


@pytest.mark.parametrize(
    "headers",
    [
        b"".join(f"X-Many-{i}: {i}\r\n".encode() for i in range(200)),  # > 128 headers
        b"X-Huge: " + b"a" * 20000 + b"\r\n",  # one line > max_field_size
        b"X-Bad: a\rb\r\n",  # a bare CR inside a value
    ],
    ids=["too-many", "too-long", "cr-in-value"],
)
async def test_d8_malformed_header_blocks_are_refused_before_any_upstream_call(
    fakes: tuple[FakeProvider, FakeProvider], headers: bytes
) -> None:
    primary, fallback = fakes
    body = json.dumps(anthropic_body()).encode()
    request = (
        f"POST {ANTHROPIC} HTTP/1.1\r\nHost: sidecar\r\nContent-Type: application/json\r\n".encode()
        + headers
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    async with sidecar(document(primary, fallback)) as (url, _):
        status, _, _, _ = await exchange(url, request)
    assert status in (400, 431)  # aiohttp's own answer (plain text: the parser gives up before any handler)
    assert primary.count() == 0 and fallback.count() == 0


async def test_d7_a_client_gone_mid_stream_is_client_cancelled_not_a_provider_failure(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    primary, fallback = fakes
    primary.script(Reply(text=" ".join(f"w{i}" for i in range(100)), chunk_delay=0.02))
    async with sidecar(document(primary, fallback)) as (url, state):
        async with aiohttp.ClientSession() as session:
            async with session.post(url + ANTHROPIC, json=anthropic_body(stream=True)) as response:
                assert b"w0" in await response.content.readuntil(b"w0")
        await primary.wait_for(lambda: primary.last.finished, timeout=3)
        deadline = time.monotonic() + 2
        while not counter(metrics := await get_text(url, "/metrics"), "llmroute_requests_total"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        primary_health = state.upstreams.healths()[("summarize", "primary")]
    assert primary.last.outcome == "disconnected" and primary.last.chunks_sent < 100
    assert counter(metrics, "llmroute_requests_total", outcome="client_cancelled") == 1
    assert primary_health.failures == 0 and fallback.count() == 0


async def test_d7_a_client_gone_before_the_stream_starts_still_closes_the_upstream(
    fakes: tuple[FakeProvider, FakeProvider], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client vanishes between the engine's answer and the first byte of the response (the write of
    the response headers fails): the committed upstream stream must be closed, not left generating."""
    primary, fallback = fakes
    original = web.StreamResponse.prepare

    async def prepare(self: web.StreamResponse, request: web.BaseRequest) -> Any:
        if "llmroute-route" in self.headers:  # the sidecar's response, not the fake provider's
            raise ConnectionResetError("client gone")
        return await original(self, request)

    monkeypatch.setattr(web.StreamResponse, "prepare", prepare)
    primary.script(Reply(text=" ".join(f"w{i}" for i in range(200)), chunk_delay=0.01))
    async with sidecar(document(primary, fallback)) as (url, _):
        with pytest.raises(aiohttp.ClientError):
            await post(url, ANTHROPIC, anthropic_body(stream=True))
        await primary.wait_for(lambda: primary.last.finished, timeout=3)
        metrics = await get_text(url, "/metrics")
    assert primary.last.outcome == "disconnected" and primary.last.chunks_sent < 200
    assert counter(metrics, "llmroute_requests_total", outcome="client_cancelled") == 1


async def test_d9_keys_never_cross_providers_nor_reach_logs_spans_status_or_errors(
    fakes: tuple[FakeProvider, FakeProvider], caplog: pytest.LogCaptureFixture
) -> None:
    primary, fallback = fakes
    caplog.set_level(logging.DEBUG)
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    primary.default = Fail(529)
    app_keys = {"x-api-key": APP_KEY, "Authorization": f"Bearer {APP_KEY}"}
    doc = document(primary, fallback, fallback_type="gemini")
    async with sidecar(doc, tracer_provider=tracer_provider) as (url, _):
        status, _, answered = await post(url, ANTHROPIC, anthropic_body(), headers=app_keys)
        assert status == 200 and json.loads(answered)["content"][0]["text"]
        status_page = await get_text(url, "/status")
        metrics = await get_text(url, "/metrics")
    # Both targets fail, the fallback at the connection level (a closed port): the error carries no key.
    dead = document(primary, f"http://127.0.0.1:{free_port()}", fallback_type="gemini")
    async with sidecar(dead, tracer_provider=tracer_provider) as (url, _):
        status, error_headers, error_body = await post(url, ANTHROPIC, anthropic_body(), headers=app_keys)
        assert status == 529
    assert fallback.last.headers["x-goog-api-key"] == KEYS["gemini"] and "key" not in fallback.last.query
    assert all(rec.headers["x-api-key"] == KEYS["anthropic"] for rec in primary.requests)
    for rec in [*primary.requests, *fallback.requests]:
        seen = json.dumps(rec.headers) + json.dumps(rec.query) + rec.path + rec.raw_body.decode()
        assert APP_KEY not in seen
        other = KEYS["gemini"] if rec in primary.requests else KEYS["anthropic"]
        assert other not in seen  # provider A's key never goes to provider B
    spans = json.dumps([dict(span.attributes or {}) for span in exporter.get_finished_spans()])
    logs = "\n".join(record.getMessage() for record in caplog.records)
    surfaces = [status_page, metrics, spans, logs, error_body.decode(), json.dumps(error_headers)]
    for secret in (APP_KEY, *KEYS.values()):
        for surface in surfaces:
            assert secret not in surface


async def test_d12_sdk_retries_deposit_nothing_and_get_no_retries_of_ours(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    primary, fallback = fakes
    primary.default = Fail(529)
    async with sidecar(document(primary, fallback, route={"budget": "2s"})) as (url, state):
        budget = state.upstreams.budgets()["claude"]
        storm = await asyncio.gather(
            *(post(url, ANTHROPIC, anthropic_body(), headers={"x-stainless-retry-count": "2"}) for _ in range(12))
        )
        assert all(status == 200 for status, _, _ in storm)  # answered by the fallback
        assert budget.snapshot()["requests"] == 0 and budget.snapshot()["retries"] == 0
        assert primary.count() == 12  # one attempt each: no retries multiplying the SDK's
        primary.default = Reply()
        await post(url, ANTHROPIC, anthropic_body(), headers={"x-stainless-retry-count": "0"})
        assert budget.snapshot()["requests"] == 1  # an original request deposits


# ----- 5.2 upstream --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["connect-refused", "tls-to-plain-http"])
async def test_u1_connection_level_failures_are_retried_then_fail_over(
    fakes: tuple[FakeProvider, FakeProvider], fault: str
) -> None:
    primary, fallback = fakes
    base = f"http://127.0.0.1:{free_port()}" if fault == "connect-refused" else primary.url.replace("http:", "https:")
    async with sidecar(document(base, fallback, route={"budget": "200ms"})) as (url, _):
        status, headers, body = await post(url, ROUTE, route_body())
    assert status == 200 and headers["llmroute-target"] == "backup"
    attempts = json.loads(body)["attempts"]
    assert next(a["error"] for a in attempts if a["target"] == "primary") == "connection"
    assert len([a for a in attempts if a["target"] == "primary"]) >= 2  # retried: nothing was sent


async def test_u3_the_clients_own_timeout_caps_attempts_and_no_doomed_attempt_follows(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    """`x-stainless-timeout` (PROVIDERS.md 3) caps the first-byte deadline; once it has passed no target
    gets an attempt the client will never read (it could only fail and count against the target)."""
    primary, fallback = fakes
    primary.default = Hang()
    async with sidecar(document(primary, fallback)) as (url, state):
        started = time.monotonic()
        status, headers, _ = await post(url, ANTHROPIC, anthropic_body(), headers={"x-stainless-timeout": "1"})
        seconds = time.monotonic() - started
        backup = state.upstreams.healths()[("summarize", "backup")]
        assert backup.failures == 0 and backup.last_failure < 0
    assert status >= 500 and headers["x-should-retry"] == "false"
    assert seconds < 1.5  # the client's 1 s minus the margin, not attemptTimeout (2 s)
    assert fallback.count() == 0


async def test_u4_a_stream_hanging_after_its_headers_is_retried_before_commit(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    primary, fallback = fakes
    primary.script(Hang(after_headers=True))
    primary.reply_text = "after the hang"
    async with sidecar(document(primary, fallback, route={"attemptTimeout": "300ms", "budget": "2s"})) as (url, _):
        status, _, raw = await post(url, ROUTE, route_body(stream=True))
    events = sse_events(raw)
    assert status == 200 and events[0][0] == "meta" and events[-1][0] == "done"
    meta = json.loads(events[0][1])
    assert meta["target"] == "primary" and [a["status"] for a in meta["attempts"]] == ["error", "ok"]
    assert meta["attempts"][0]["error"] == "timeout"
    assert primary.requests[0].outcome == "disconnected" and fallback.count() == 0


async def test_u4_a_plain_answer_whose_body_never_follows_its_headers_is_retried(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    primary, fallback = fakes
    primary.script(Hang(after_headers=True))
    async with sidecar(document(primary, fallback, route={"budget": "2s"}), stream_idle_timeout=0.3) as (url, _):
        started = time.monotonic()
        status, headers, body = await post(url, ROUTE, route_body())
        seconds = time.monotonic() - started
    assert status == 200 and headers["llmroute-target"] == "primary" and seconds < 1.5
    assert [a["status"] for a in json.loads(body)["attempts"]] == ["error", "ok"]


async def test_u5_a_stall_mid_stream_ends_with_an_error_event_after_the_idle_timeout(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    primary, fallback = fakes
    primary.script(StallStream(text="one two three four", after_chunks=2))
    doc = document(primary, fallback, primary_type="openai", fallback_type="anthropic")
    async with sidecar(doc, stream_idle_timeout=0.3) as (url, _):
        started = time.monotonic()
        status, _, raw = await post(url, OPENAI, openai_body(stream=True))
        seconds = time.monotonic() - started
        metrics = await get_text(url, "/metrics")
    events = sse_events(raw)
    assert status == 200 and 0.3 <= seconds < 2.0
    assert "".join(json.loads(d)["choices"][0]["delta"].get("content") or "" for _, d in events[:-1]) == "one two "
    last = json.loads(events[-1][1])
    assert "error" in last and "stalled" in last["error"]["message"]  # the SDK raises on it
    assert all(d != "[DONE]" for _, d in events)  # never a success it did not receive
    assert counter(metrics, "llmroute_requests_total", outcome="stream_stalled") == 1
    await primary.wait_idle()
    assert primary.last.outcome == "disconnected" and fallback.count() == 0


async def test_u5_a_stall_on_claude_resumes_on_the_same_target(fakes: tuple[FakeProvider, FakeProvider]) -> None:
    primary, fallback = fakes
    full = "The quick brown fox jumps over the lazy dog."
    primary.script(StallStream(text=full, after_chunks=3))
    primary.reply_text = full
    async with sidecar(document(primary, fallback), stream_idle_timeout=0.3) as (url, _):
        async with anthropic.AsyncAnthropic(base_url=f"{url}/anthropic", api_key=APP_KEY, max_retries=0) as client:
            async with client.messages.stream(model="m", max_tokens=50, messages=USER) as stream:
                text = "".join([piece async for piece in stream.text_stream])
                final = await stream.get_final_message()
    assert text == full and final.stop_reason == "end_turn"
    assert primary.count() == 2 and primary.last.prefill == "The quick brown"
    assert fallback.count() == 0


async def test_u7_a_resume_spends_the_retry_budget_and_an_empty_budget_ends_the_stream_in_error(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    primary, fallback = fakes
    primary.script(StreamError(text="one two three four", after_chunks=2))
    doc = document(primary, fallback, spec={"retryBudget": {"ratio": 0, "minPerSecond": 0, "window": "10s"}})
    async with sidecar(doc) as (url, state):
        status, _, raw = await post(url, ANTHROPIC, anthropic_body(stream=True))
        assert state.upstreams.budgets()["claude"].snapshot()["exhausted"] >= 1
    events = sse_events(raw)
    assert status == 200 and events[-1][0] == "error"
    assert json.loads(events[-1][1])["error"]["type"] == "overloaded_error"
    assert all(name != "message_stop" for name, _ in events)
    assert primary.count() == 1 and fallback.count() == 0  # no resume the budget could not pay for


def anthropic_sse(text_pieces: list[str]) -> list[tuple[str, dict[str, Any]]]:
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_hostile", "type": "message", "role": "assistant", "content": [], "model": "claude-x",
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 1},
        },
    }
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", start),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ]
    for piece in text_pieces:
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}
        events.append(("content_block_delta", delta))
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"output_tokens": 2}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    return events


def hostile_anthropic_stream() -> bytes:
    """Claude's event sequence written every hostile way WHATWG allows (HOSTILE U8)."""
    events = anthropic_sse(["Hello", " world"])
    out = b"\xef\xbb\xbf: keepalive\r\n\r\n"  # BOM, comment
    name, data = events[0]
    out += f"event: {name}\r\ndata:{json.dumps(data)}\r\n\r\n".encode()  # CRLF, no space after `data:`
    name, data = events[1]
    out += f"event: {name}\rdata: {json.dumps(data)}\r\r".encode()  # CR-only
    out += b'event: ping\nid: 3\nretry: 10\nsome_unknown_field: x\ndata: {"type": "ping"}\n\n'
    out += b'event: future_event\ndata: {"type": "future_event", "x": 1}\n\n'  # unknown: passes through
    name, data = events[2]
    first, second = json.dumps(data)[:30], json.dumps(data)[30:]
    out += f"event: {name}\ndata: {first}\ndata: {second}\n\n".encode()  # multi-line data
    for name, data in events[3:]:
        out += f": tick\nevent: {name}\ndata: {json.dumps(data)}\n\n".encode()
    return out


async def test_u8_hostile_sse_framing_reaches_an_anthropic_app_intact(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    primary, fallback = fakes
    hostile = Garbage(200, hostile_anthropic_stream(), content_type="text/event-stream")
    primary.script(hostile, hostile)
    async with sidecar(document(primary, fallback)) as (url, _):
        status, _, raw = await post(url, ANTHROPIC, anthropic_body(stream=True))
        async with anthropic.AsyncAnthropic(base_url=f"{url}/anthropic", api_key=APP_KEY, max_retries=0) as client:
            async with client.messages.stream(model="m", max_tokens=50, messages=USER) as stream:
                text = "".join([piece async for piece in stream.text_stream])
                final = await stream.get_final_message()
    names = [name for name, _ in sse_events(raw)]
    assert status == 200 and names[0] == "message_start" and names[-1] == "message_stop"
    assert "future_event" in names  # unknown event types pass through
    assert "\ufeff" not in raw.decode() and ": keepalive" not in raw.decode()
    assert text == "Hello world" and final.stop_reason == "end_turn"
    assert primary.count() == 2 and fallback.count() == 0


def openai_chunk(content: str | None = None, finish: str | None = None) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {
        "id": "chatcmpl-hostile", "object": "chat.completion.chunk", "created": 1, "model": "gpt-x",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


async def test_u8_multi_line_data_relayed_to_an_openai_sdk_stays_valid(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    primary, fallback = fakes
    chunks = [openai_chunk("Hello"), openai_chunk(" world"), openai_chunk(finish="stop")]
    stream = b""
    for chunk in chunks:
        text = json.dumps(chunk, indent=1)  # pretty-printed: one `data:` line per JSON line
        stream += b"".join(b"data: " + line.encode() + b"\n" for line in text.split("\n")) + b"\n"
    stream += b"data: [DONE]\n\n"
    primary.script(Garbage(200, stream, content_type="text/event-stream"))
    doc = document(primary, fallback, primary_type="openai", fallback_type="anthropic")
    async with sidecar(doc) as (url, _):
        async with openai.AsyncOpenAI(base_url=f"{url}/openai/v1", api_key=APP_KEY, max_retries=0) as client:
            got = [c async for c in await client.chat.completions.create(model="m", messages=USER, stream=True)]
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == "Hello world"
    assert got[-1].choices[0].finish_reason == "stop"


async def test_u8_an_undecodable_event_after_commit_is_an_error_event_not_a_truncation(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    primary, fallback = fakes
    stream = b"data: " + json.dumps(openai_chunk("Hello")).encode() + b"\n\ndata: {broken json\n\n"
    primary.script(Garbage(200, stream, content_type="text/event-stream"))
    doc = document(primary, fallback, primary_type="openai", fallback_type="anthropic")
    async with sidecar(doc) as (url, _):
        async with openai.AsyncOpenAI(base_url=f"{url}/openai/v1", api_key=APP_KEY, max_retries=0) as client:
            seen: list[str] = []
            with pytest.raises(openai.APIError):
                async for chunk in await client.chat.completions.create(model="m", messages=USER, stream=True):
                    seen += [chunk.choices[0].delta.content or ""] if chunk.choices else []
    assert "".join(seen) == "Hello"
    assert primary.count() == 1 and fallback.count() == 0


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b'{"id": "msg_1", "type": "message", "content": [{"type": "text", "text": "x"}]}', "application/json"),
        (b"<html><title>Just a moment...</title></html>", "text/html"),
        (b"data: x\n\n", "application/octet-stream"),
    ],
    ids=["json", "html", "octet-stream"],
)
async def test_u9_a_stream_request_answered_without_an_event_stream_is_retried(
    fakes: tuple[FakeProvider, FakeProvider], body: bytes, content_type: str
) -> None:
    primary, fallback = fakes
    primary.script(Garbage(200, body, content_type=content_type))
    async with sidecar(document(primary, fallback, route={"budget": "2s"})) as (url, _):
        status, _, raw = await post(url, ANTHROPIC, anthropic_body(stream=True))
    names = [name for name, _ in sse_events(raw)]
    assert status == 200 and names[0] == "message_start" and names[-1] == "message_stop"
    assert b"<html" not in raw and primary.count() == 2 and fallback.count() == 0


@pytest.mark.parametrize("path", [ANTHROPIC, OPENAI])
async def test_u10_cdn_html_pages_never_reach_the_app(fakes: tuple[FakeProvider, FakeProvider], path: str) -> None:
    primary, fallback = fakes
    primary_type = "anthropic" if path == ANTHROPIC else "openai"
    doc = document(primary, fallback, primary_type=primary_type, fallback_type="gemini")
    async with sidecar(doc) as (url, _):
        primary.default = Html(524)  # "A timeout occurred": retryable, then the fallback answers
        status, headers, body = await post(url, path, BODIES[path]())
        assert status == 200 and headers["llmroute-target"] == "backup" and b"<" not in body
        primary.clear()
        primary.default = Reply()
        primary.script(Html(413))  # Cloudflare's 413: the app's request is too large, no fallback
        fallback.clear()
        status, headers, body = await post(url, path, BODIES[path]())
        assert status == 413 and headers["x-should-retry"] == "false" and headers["content-type"].startswith(
            "application/json"
        )
        assert b"<" not in body and "413 Request Entity Too Large" in json.loads(body)["error"]["message"]
        assert error_type(path, body) in ("request_too_large", "invalid_request_error")
        assert fallback.count() == 0
        primary.default = Html(522)
        fallback.default = Html(502)
        status, headers, body = await post(url, path, BODIES[path]())
    assert status == 522 and headers["x-should-retry"] == "false"  # the primary's error (U18)
    assert b"<" not in body and "522" in json.loads(body)["error"]["message"]


async def test_u10_a_proxys_plain_text_error_is_put_in_the_dialects_envelope(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    """An Envoy/nginx text 503 in front of the provider: the app gets JSON it can parse, not text labelled
    as JSON."""
    primary, fallback = fakes
    primary.default = Garbage(503, b"upstream connect error or disconnect/reset before headers", "text/plain")
    fallback.default = Fail(500)
    async with sidecar(document(primary, fallback)) as (url, _):
        status, headers, body = await post(url, ANTHROPIC, anthropic_body())
    assert status == 503 and headers["x-should-retry"] == "false"
    assert error_type(ANTHROPIC, body) == "api_error"


async def test_u12_retry_after_variants(fakes: tuple[FakeProvider, FakeProvider]) -> None:
    primary, fallback = fakes
    async with sidecar(document(primary, fallback, route={"budget": "2s"})) as (url, _):

        async def gap_after(step: Fail) -> float:
            primary.clear()
            primary.script(step)
            status, headers, _ = await post(url, ROUTE, route_body())
            assert status == 200 and headers["llmroute-target"] == "primary"
            return primary.requests[1].received_at - primary.requests[0].received_at

        assert await gap_after(Fail(529, retry_after_ms=300)) >= 0.28
        assert await gap_after(Fail(529, retry_after="0.4")) >= 0.38  # a float
        soon = email.utils.formatdate(time.time() + 1, usegmt=True)  # an HTTP date (1 s resolution)
        assert await gap_after(Fail(529, retry_after=soon)) < 1.5

        for hint in (3600, "-1", None, "inf"):  # too long to wait / negative / absent / nonsense: fail over now
            primary.clear()
            fallback.clear()
            primary.default = Fail(429, retry_after=hint)
            started = time.monotonic()
            status, headers, _ = await post(url, ROUTE, route_body())
            assert status == 200 and headers["llmroute-target"] == "backup", hint
            assert primary.count() == 1 and time.monotonic() - started < 1.0, hint

    fallback.default = Fail(500)
    async with sidecar(document(primary, fallback, route={"budget": "300ms"})) as (url, _):
        for hint, relayed in (("1.2", "2"), (30, "30"), ("inf", None)):  # whole seconds, rounded up
            primary.default = Fail(429, retry_after=hint)
            status, headers, body = await post(url, ANTHROPIC, anthropic_body())
            assert status == 429 and headers["x-should-retry"] == "false", hint
            assert headers.get("retry-after") == relayed, hint
            assert json.loads(body)["error"]["type"] == "rate_limit_error"


async def test_u14_gzip_upstream_bodies_are_re_framed_not_double_encoded(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    primary, fallback = fakes
    primary.script(Reply(text="zipped answer", gzip=True), Fail(400, message="zipped error", gzip=True))
    async with sidecar(document(primary, fallback)) as (url, _):
        status, headers, body = await post(url, ANTHROPIC, anthropic_body(), auto_decompress=False)
        assert status == 200 and "content-encoding" not in {k.lower() for k in headers}
        assert json.loads(body)["content"][0]["text"] == "zipped answer"
        status, headers, body = await post(url, ANTHROPIC, anthropic_body(), auto_decompress=False)
    assert status == 400 and "content-encoding" not in {k.lower() for k in headers}
    assert json.loads(body)["error"]["message"] == "zipped error"
    assert int(headers["content-length"]) == len(body)


async def test_u15_upstream_sessions_have_no_total_timeout(fakes: tuple[FakeProvider, FakeProvider]) -> None:
    primary, fallback = fakes
    async with sidecar(document(primary, fallback)) as (_, state):
        timeout = state.upstreams.session(primary.url).timeout
    assert timeout.total is None and timeout.sock_connect is not None  # streams have idle deadlines instead


@pytest.mark.parametrize(
    ("kind", "reply"),
    [
        ("anthropic", Reply(text="I can't help with that.", stop_reason="refusal")),
        ("openai", Reply(text="", stop_reason="content_filter")),
        ("gemini", Reply(text="", stop_reason="SAFETY")),
    ],
)
async def test_u16_a_refusal_is_an_answer_not_a_failure(
    fakes: tuple[FakeProvider, FakeProvider], kind: str, reply: Reply
) -> None:
    primary, fallback = fakes
    primary.script(reply, reply)
    doc = document(primary, fallback, primary_type=kind, fallback_type="anthropic" if kind != "anthropic" else "openai")
    async with sidecar(doc) as (url, _):
        status, headers, _ = await post(url, ROUTE, route_body())
        assert status == 200 and headers["llmroute-target"] == "primary"
        status, headers, raw = await post(url, ROUTE, route_body(stream=True))
    assert status == 200 and headers["llmroute-target"] == "primary"
    assert sse_events(raw)[-1][0] == "done"
    assert primary.count() == 2 and fallback.count() == 0


async def test_u17_context_overflow_passes_through_without_fallback_when_fallbackon_leaves_it_out(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    """By default a context-window error moves to the next target (`fallbackOn: [context-window]`,
    test_conduct.py); a route whose `fallbackOn` leaves it out relays it, neither retried nor routed."""
    primary, fallback = fakes
    primary.script(Fail(400, message="prompt is too long: 250000 tokens > 200000 maximum"))
    async with sidecar(document(primary, fallback, route={"fallbackOn": []})) as (url, _):
        async with anthropic.AsyncAnthropic(base_url=f"{url}/anthropic", api_key=APP_KEY) as client:
            with pytest.raises(anthropic.BadRequestError, match="prompt is too long"):
                await client.messages.create(model="m", max_tokens=5, messages=USER)
    primary.script(Fail(400, code="context_length_exceeded", message="maximum context length is 128000 tokens"))
    doc = document(primary, fallback, primary_type="openai", fallback_type="anthropic", route={"fallbackOn": []})
    async with sidecar(doc) as (url, _):
        async with openai.AsyncOpenAI(base_url=f"{url}/openai/v1", api_key=APP_KEY) as oclient:
            with pytest.raises(openai.BadRequestError) as caught:
                await oclient.chat.completions.create(model="m", messages=USER)
    assert caught.value.code == "context_length_exceeded"
    assert primary.count() == 2 and fallback.count() == 0  # one each: no retry, no fallback


@pytest.mark.parametrize("body", [b"{}", b'{"id": "msg_', b"", b"[]", b"null", b'{"content": null}'])
async def test_u19_a_200_with_an_unusable_body_is_retried_then_fails_over(
    fakes: tuple[FakeProvider, FakeProvider], body: bytes
) -> None:
    primary, fallback = fakes
    primary.default = Garbage(200, body)
    async with sidecar(document(primary, fallback)) as (url, _):
        status, headers, answer = await post(url, ROUTE, route_body())
    assert status == 200 and headers["llmroute-target"] == "backup"
    errors = [a["error"] for a in json.loads(answer)["attempts"] if a["target"] == "primary"]
    assert len(errors) >= 2 and set(errors) == {"502 api_error"}


# ----- 5.4 environment ----------------------------------------------------------------------------------
async def test_e2_a_policy_that_fails_to_apply_is_refused_never_a_crash(tmp_path: Any) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(document("http://127.0.0.1:1", "http://127.0.0.1:2")))
    refused: list[str] = []

    def apply(_policy: Any) -> None:
        raise RuntimeError("a bug while compiling")

    watcher = PolicyWatcher(path, apply, refused.append)
    assert watcher.load_now() is False
    assert refused == ["policy could not be applied: RuntimeError"]


async def test_e2_an_invalid_policy_at_startup_serves_not_ready_instead_of_crashing(tmp_path: Any) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("spec: {providers: [")
    app = create_app(policy_path=path, watch_interval=0.05)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        url = str(server.make_url("")).rstrip("/")
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/healthz") as live, session.get(url + "/readyz") as ready:
                assert live.status == 200 and ready.status == 503
                assert "not valid YAML/JSON" in await ready.text()
            async with session.post(url + ANTHROPIC, json=anthropic_body()) as refused:
                assert refused.status == 503 and refused.headers["x-should-retry"] == "false"
        assert counter(await get_text(url, "/metrics"), "llmroute_config_reload_errors_total") >= 1
    finally:
        await server.close()


@asynccontextmanager
async def runner_for(doc: dict[str, Any], drain_timeout: float) -> AsyncIterator[tuple[str, web.AppRunner]]:
    """The sidecar as `llmroute sidecar` runs it (AppRunner, handler cancellation, a drain timeout)."""
    app = create_app(policy=load_policy(doc))
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=drain_timeout)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", runner
    finally:
        await runner.cleanup()


async def test_e5_draining_ends_requests_still_running_in_their_dialects_error(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    """SIGTERM with a long stream and a slow plain call in flight: readiness fails at once; near the drain
    deadline the stream ends with an error event (the SDK raises, nothing is silently cut) and the call gets
    a 503 in its own shape; the upstreams are closed, and shutdown finishes within the drain timeout."""
    primary, fallback = fakes
    words = " ".join(f"w{i}" for i in range(200))
    primary.script(Reply(text=words, chunk_delay=0.05), Reply(delay=10))
    async with runner_for(document(primary, fallback), drain_timeout=1.0) as (url, runner):
        state = runner.app[STATE]
        async with anthropic.AsyncAnthropic(base_url=f"{url}/anthropic", api_key=APP_KEY, max_retries=0) as client:
            async with client.messages.stream(model="m", max_tokens=500, messages=USER) as stream:
                pieces = stream.text_stream.__aiter__()
                first = await pieces.__anext__()
                plain = asyncio.create_task(post(url, ANTHROPIC, anthropic_body()))
                await primary.wait_for_requests(2)
                started = time.monotonic()
                draining = asyncio.create_task(shut_down(runner, 1.0))
                await asyncio.sleep(0.05)
                assert state.draining
                with pytest.raises(anthropic.APIStatusError) as caught:
                    async for piece in pieces:
                        first += piece
            status, headers, body = await plain
            await draining
            seconds = time.monotonic() - started
    assert first.startswith("w0") and len(first.split()) < 200
    assert "shutting down" in str(caught.value)
    assert status == 503 and "shutting down" in json.loads(body)["error"]["message"]
    assert 0.5 <= seconds < 1.5
    await primary.wait_idle()
    assert all(rec.outcome == "disconnected" for rec in primary.requests)


async def test_e5_readiness_fails_while_draining(fakes: tuple[FakeProvider, FakeProvider]) -> None:
    primary, fallback = fakes
    async with sidecar(document(primary, fallback)) as (url, state):
        state.draining = True
        async with aiohttp.ClientSession() as session, session.get(url + "/readyz") as response:
            assert response.status == 503 and await response.text() == "draining"


@pytest.mark.parametrize(
    ("path", "status", "kind"),
    [(ANTHROPIC, 529, "overloaded_error"), (OPENAI, 503, "server_error"), (ROUTE, 503, "overloaded")],
)
async def test_e6_requests_beyond_max_in_flight_are_shed_in_the_callers_dialect(
    fakes: tuple[FakeProvider, FakeProvider], path: str, status: int, kind: str
) -> None:
    primary, fallback = fakes
    primary.script(Reply(delay=0.6), Reply(delay=0.6))
    async with sidecar(document(primary, fallback), max_in_flight=2) as (url, state):
        busy = [asyncio.create_task(post(url, ANTHROPIC, anthropic_body())) for _ in range(2)]
        await primary.wait_for_requests(2)
        shed_status, headers, body = await post(url, path, BODIES[path]())
        assert [s for s, _, _ in await asyncio.gather(*busy)] == [200, 200]
        assert state.in_flight == 0
        after, _, _ = await post(url, path, BODIES[path]())  # capacity is back
        metrics = await get_text(url, "/metrics")
    assert shed_status == status and error_type(path, body) == kind
    assert headers["x-should-retry"] == "true" and headers["retry-after"] == "1"  # nothing went upstream
    assert 500 <= int(headers["retry-after-ms"]) <= 1500 and headers["llmroute-shed-reason"] == "overloaded"
    assert after == 200 and primary.count() == 3 and fallback.count() == 0
    assert counter(metrics, "llmroute_load_shed_total", reason="in-flight") == 1


async def trickling_upload(url: str, state: SidecarState, size: int) -> asyncio.StreamWriter:
    """An upload declaring `size` bytes that sends one: it holds `size` bytes of the cap until closed."""
    host, port = url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST {ANTHROPIC} HTTP/1.1\r\nHost: s\r\nContent-Length: {size}\r\n\r\n{{".encode())
    await writer.drain()
    deadline = time.monotonic() + 2
    while state.buffered_bytes < size:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    return writer


async def test_e6_request_bodies_held_at_once_are_capped_but_one_is_always_admitted(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    primary, fallback = fakes
    big = anthropic_body(messages=[{"role": "user", "content": "x" * 5000}])
    async with sidecar(document(primary, fallback), max_buffered_bytes=4000, body_timeout=5) as (url, state):
        status, _, _ = await post(url, ANTHROPIC, big)  # larger than the cap, but alone: admitted
        assert status == 200
        writer = await trickling_upload(url, state, 3000)
        status, headers, body = await post(url, ANTHROPIC, anthropic_body(messages=[{"role": "user", "content": "y" * 1500}]))
        assert status == 529 and error_type(ANTHROPIC, body) == "overloaded_error"
        small, _, _ = await post(url, ANTHROPIC, anthropic_body())  # fits beside it
        assert small == 200
        writer.close()
        deadline = time.monotonic() + 2
        while state.buffered_bytes or state.in_flight:  # the client left: its hold is released
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        status, _, _ = await post(url, ANTHROPIC, anthropic_body(messages=[{"role": "user", "content": "y" * 1500}]))
        metrics = await get_text(url, "/metrics")
    assert status == 200
    assert counter(metrics, "llmroute_load_shed_total", reason="buffered-bytes") == 1


async def post_chunked(url: str, path: str, body: Any) -> tuple[int, dict[str, str], bytes]:
    """A body of undeclared length (Transfer-Encoding: chunked), sent in 500-byte pieces."""
    raw = json.dumps(body).encode()

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(raw), 500):
            yield raw[start : start + 500]

    async with aiohttp.ClientSession() as session, session.post(
        url + path, data=pieces(), headers={"Content-Type": "application/json"}
    ) as response:
        return response.status, {k.lower(): v for k, v in response.headers.items()}, await response.read()


async def test_e6_chunked_bodies_count_against_the_cap_as_they_arrive(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    primary, fallback = fakes
    big = anthropic_body(messages=[{"role": "user", "content": "x" * 5000}])
    async with sidecar(document(primary, fallback), max_buffered_bytes=4000, body_timeout=5) as (url, state):
        assert (await post_chunked(url, ANTHROPIC, big))[0] == 200  # alone: admitted whatever its size
        writer = await trickling_upload(url, state, 3000)
        status, headers, body = await post_chunked(url, ANTHROPIC, big)
        assert status == 529 and error_type(ANTHROPIC, body) == "overloaded_error"
        assert headers["x-should-retry"] == "true" and headers["llmroute-shed-reason"] == "overloaded"
        assert state.buffered_bytes == 3000  # what the refused body had taken is released
        assert (await post_chunked(url, ANTHROPIC, anthropic_body()))[0] == 200  # a small one fits beside it
        writer.close()
        metrics = await get_text(url, "/metrics")
    assert primary.count() == 2  # the refused body never went upstream
    assert counter(metrics, "llmroute_load_shed_total", reason="buffered-bytes") == 1
