"""The sidecar's HTTP server: the route API, the probes, `/status` and `/metrics`.

The app talks to 127.0.0.1:8787. Every handler takes the current policy snapshot once, at its start,
and keeps it (a reload never changes a request in flight). Resources live in `cleanup_ctx`: the
upstream sessions, status-page pollers and the policy watcher start with the app and stop with it.
The compatible endpoints (`/anthropic`, `/openai`) live in `compat.py` and share the helpers here.

aiohttp defaults that bite a proxy are set on purpose (PROVIDERS.md 8): a 32 MiB body limit like
Anthropic's, handler cancellation on client disconnect (stop paying for tokens nobody reads), a
body-read deadline so a never-ending upload gets a 408 instead of a stuck handler.

Load shedding (HOSTILE E6, D3): at most `max_in_flight` proxied requests run at once and at most
`max_buffered_bytes` of request bodies are held at once (a single body is always admitted up to the
32 MiB limit). Beyond that a request is refused before its body is read, in the caller's dialect
(Anthropic 529 `overloaded_error`, OpenAI 503, route API 503 `overloaded`) with `x-should-retry:
true` and a jittered `retry-after-ms`: nothing was sent upstream, so the SDK's own backoff is the
right retry (it is bounded: 2 retries by default), unlike a give-up where the sidecar already retried.

Draining (E5, `shut_down`): readiness fails, the listener stops accepting, in-flight requests finish;
`DRAIN_MARGIN` before the drain deadline the ones still running end in their dialect's own error
(streams: a terminal error event, never a silent truncation) instead of being cut off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from opentelemetry import trace

from .checks import parse_json_answer
from .errors import ClientError, RequestError, StreamBroken, UpstreamError
from .malformed import ServerLog
from .messages import ChatRequest, StreamEnd, TextDelta
from .policy import LoadedPolicy, PolicyError
from .providers.base import StreamFrame
from .ratelimits import RateLimitCollector
from .reloading import PolicyWatcher
from .runtime import CompiledRoute, CompiledTarget, Runtime, Upstreams
from .scrubbing import hold_client_keys, printable
from .sse import json_frame
from .strategies import STREAM_IDLE_TIMEOUT, Answer, Call, Engine, GaveUp
from .streams import follow
from .telemetry import Telemetry, span_usage

MAX_BODY = 32 * 1024 * 1024
BODY_TIMEOUT = 30.0
"""A request body not fully received by then gets a 408 and nothing goes upstream (HOSTILE D4)."""
WRITE_TIMEOUT = 30.0
"""A client that does not drain its stream for this long is gone: stop the upstream (HOSTILE D6)."""
MAX_IN_FLIGHT = 512
"""Proxied requests served at once (`LLMROUTE_MAX_IN_FLIGHT`); more are shed (HOSTILE E6)."""
MAX_BUFFERED_BYTES = 128 * 1024 * 1024
"""Request-body bytes held at once (`LLMROUTE_MAX_BUFFERED_BYTES`); more are shed (HOSTILE D3, E6)."""
IDLE_TIMEOUT = 15.0
"""Seconds a client connection may go without a complete request (`LLMROUTE_IDLE_TIMEOUT`): an idle
keep-alive connection, or one dribbling its headers (slowloris, HOSTILE D5). aiohttp arms it when the
connection opens and after every response, and partial headers do not reset it. SDK pools drop idle
connections sooner (httpx: 5 s), so they never race it."""
DRAIN_MARGIN = 2.0
"""Seconds before the drain deadline at which requests still running are ended with an error (E5)."""
CLIENT_DEADLINE_MARGIN = 0.5
request_log = logging.getLogger("llmroute.requests")
_HINT_HEADERS = ("x-stainless-timeout", "x-stainless-read-timeout", "x-server-timeout")


@dataclass
class SidecarState:
    """What the handlers share: the current snapshot, the long-lived upstreams and the telemetry."""

    upstreams: Upstreams
    telemetry: Telemetry
    engine: Engine
    policy_path: Path | None = None
    runtime: Runtime | None = None
    last_error: str | None = None
    last_error_at: str | None = None
    loaded_at: str | None = None
    draining: bool = False
    started: float = field(default_factory=time.monotonic)
    in_flight: int = 0
    max_in_flight: int = MAX_IN_FLIGHT
    buffered_bytes: int = 0
    max_buffered_bytes: int = MAX_BUFFERED_BYTES
    body_timeout: float | None = None
    """None: the module's BODY_TIMEOUT."""
    ending: bool = False
    """Set near the drain deadline: every request still running ends with an error now."""
    _scopes: set[asyncio.Timeout] = field(default_factory=set)

    def apply(self, policy: LoadedPolicy) -> None:
        """Swap in a new policy (compiled first: a policy that fails to compile changes nothing)."""
        self.runtime = self.upstreams.compile(policy)
        self.telemetry.pricing = policy.spec.pricing
        self.loaded_at = _now()
        self.last_error = None

    def refuse(self, error: str) -> None:
        self.last_error = error
        self.last_error_at = _now()
        self.telemetry.reload_errors.inc()

    def end_in_flight(self) -> None:
        """The drain deadline is near: end every request still running with its dialect's error."""
        self.ending = True
        now = asyncio.get_running_loop().time()
        for scope in list(self._scopes):
            scope.reschedule(now)

    def drainable(self) -> DrainScope:
        """A scope `end_in_flight` interrupts: the block raises TimeoutError with `scope.expired()`."""
        return DrainScope(self)

    def admit(self, request: web.Request) -> Ticket | None:
        """Let a proxied request in, or None when the sidecar is at capacity (shed it, unread)."""
        declared = request.content_length
        reserve = declared if declared is not None and 0 < declared <= MAX_BODY else 0
        reason: str | None = None
        if self.in_flight >= self.max_in_flight:
            reason = "in-flight"
        elif reserve and self.buffered_bytes and self.buffered_bytes + reserve > self.max_buffered_bytes:
            reason = "buffered-bytes"
        if reason is not None:
            self.telemetry.load_shed.labels(reason).inc()
            return None
        self.in_flight += 1
        self.buffered_bytes += reserve
        return Ticket(self, reserve)


class DrainScope:
    """`SidecarState.drainable()`: an `asyncio.timeout(None)` registered with the state while entered.
    A class rather than a generator-based context manager: it is entered on every request."""

    __slots__ = ("_state", "_timeout")

    def __init__(self, state: SidecarState) -> None:
        self._state = state
        self._timeout = asyncio.timeout(None)

    async def __aenter__(self) -> asyncio.Timeout:
        scope = await self._timeout.__aenter__()
        self._state._scopes.add(scope)
        if self._state.ending:
            scope.reschedule(asyncio.get_running_loop().time())
        return scope

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._state._scopes.discard(self._timeout)
        await self._timeout.__aexit__(exc_type, exc, tb)


@dataclass(slots=True)
class Ticket:
    """An admitted request: what it holds of the sidecar's capacity until `release()`."""

    state: SidecarState
    body_bytes: int = 0
    released: bool = False

    def hold(self, size: int) -> None:
        """The body was read: hold its actual size (a chunked body declared none)."""
        self.state.buffered_bytes += size - self.body_bytes
        self.body_bytes = size

    def take(self, size: int) -> bool:
        """Hold `size` more bytes of a body of undeclared length as it arrives; False when that would
        pass `max_buffered_bytes` while other requests hold some (one request is always admitted)."""
        state = self.state
        others = state.buffered_bytes - self.body_bytes
        if others and state.buffered_bytes + size > state.max_buffered_bytes:
            return False
        state.buffered_bytes += size
        self.body_bytes += size
        return True

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.state.in_flight -= 1
            self.state.buffered_bytes -= self.body_bytes


STATE = web.AppKey("state", SidecarState)


def create_app(
    policy_path: Path | None = None,
    policy: LoadedPolicy | None = None,
    *,
    status_relay: str | None = None,
    tracer_provider: trace.TracerProvider | None = None,
    watch_interval: float = 1.0,
    statuspage_min_interval: float | None = None,
    max_in_flight: int | None = None,
    max_buffered_bytes: int | None = None,
    body_timeout: float | None = None,
    stream_idle_timeout: float | None = None,
) -> web.Application:
    """The sidecar app, for a policy file (watched) or an already loaded policy (tests, simulator).

    `statuspage_min_interval` lowers the status pollers' floor (10 s: Claude's cache time) for tests
    and compressed-time simulations. `max_in_flight` (`LLMROUTE_MAX_IN_FLIGHT`, 512) and
    `max_buffered_bytes` (`LLMROUTE_MAX_BUFFERED_BYTES`, 128 MiB) cap the load admitted at once;
    `body_timeout` (30 s) bounds reading a request body; `stream_idle_timeout`
    (`LLMROUTE_STREAM_IDLE_TIMEOUT`, 90 s) is the longest upstream silence inside a stream."""
    # `logger`: malformed HTTP is one structured, rate-limited warning, never a traceback quoting the
    # request's bytes (malformed.py).
    app = web.Application(client_max_size=MAX_BODY, handler_args={"max_field_size": 16384, "logger": ServerLog()})
    in_flight = max_in_flight if max_in_flight is not None else env_number("LLMROUTE_MAX_IN_FLIGHT", MAX_IN_FLIGHT)
    buffered = (
        max_buffered_bytes
        if max_buffered_bytes is not None
        else env_number("LLMROUTE_MAX_BUFFERED_BYTES", MAX_BUFFERED_BYTES)
    )
    idle = (
        stream_idle_timeout
        if stream_idle_timeout is not None
        else float(env_number("LLMROUTE_STREAM_IDLE_TIMEOUT", STREAM_IDLE_TIMEOUT))
    )

    async def resources(app: web.Application) -> AsyncIterator[None]:
        upstreams = Upstreams(status_relay, statuspage_min_interval)
        telemetry = Telemetry(tracer_provider)
        board = upstreams.status
        engine = Engine(telemetry, board, idle_timeout=idle)
        state = SidecarState(upstreams, telemetry, engine, policy_path)
        state.max_in_flight = max(1, int(in_flight))
        state.max_buffered_bytes = max(1, int(buffered))
        state.body_timeout = body_timeout
        app[STATE] = state
        telemetry.read_state_with(lambda: _refresh_gauges(state))
        telemetry.registry.register(RateLimitCollector(upstreams.rate_limits))
        watcher: PolicyWatcher | None = None
        if policy is not None:
            state.apply(policy)
        if policy_path is not None:
            watcher = PolicyWatcher(policy_path, state.apply, state.refuse, interval=watch_interval)
            watcher.load_now()
            watcher.start()
        yield
        state.draining = True
        if watcher is not None:
            await watcher.stop()
        await upstreams.close()

    async def on_shutdown(app: web.Application) -> None:
        if STATE in app:
            app[STATE].draining = True  # fail readiness first; in-flight requests drain

    app.cleanup_ctx.append(resources)
    app.on_shutdown.append(on_shutdown)
    app.router.add_post("/v1/routes/{route}", route_api)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    from .compat import add_compat_routes

    add_compat_routes(app)
    return app


def env_number(name: str, default: float) -> float:
    """A positive number from the environment (a clear error otherwise), or `default` when unset."""
    value = os.environ.get(name)
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name}: not a number: {value!r}") from None
    if number <= 0:
        raise ValueError(f"{name}: must be positive, got {value!r}")
    return number


async def shut_down(runner: web.AppRunner, drain_timeout: float) -> None:
    """Drain and stop (HOSTILE E5): fail readiness, stop accepting connections, let in-flight requests
    finish; `DRAIN_MARGIN` before `drain_timeout` (at most a quarter of it) end those still running
    with their dialect's error, streams with a terminal error event. aiohttp cancels whatever is left
    at `drain_timeout` (the runner's `shutdown_timeout`)."""
    state = runner.app.get(STATE)
    handle: asyncio.TimerHandle | None = None
    if state is not None:
        state.draining = True
        margin = min(DRAIN_MARGIN, drain_timeout / 4)
        handle = asyncio.get_running_loop().call_later(max(0.0, drain_timeout - margin), state.end_in_flight)
    try:
        await runner.cleanup()
    finally:
        if handle is not None:
            handle.cancel()


# ----- shared by the route API and the compatible endpoints -----------------------------------------------
async def read_json(request: web.Request, ticket: Ticket | None = None) -> dict[str, Any]:
    """The request body as a JSON object, or RequestError (400 bad JSON, 413 too large, 408 stuck).

    The body is read whole before anything goes upstream (it is replayed on retries), within the
    body deadline: a truncated or never-ending upload is a 408, never a partial request upstream."""
    state = request.app[STATE]
    timeout = state.body_timeout if state.body_timeout is not None else BODY_TIMEOUT
    try:
        if ticket is not None and request.content_length is None:
            async with asyncio.timeout(timeout):
                raw = await _read_undeclared(request, ticket)
        elif request.content.is_eof():  # the usual case: the whole body came with the headers
            raw = await request.read()
        else:
            async with asyncio.timeout(timeout):
                raw = await request.read()  # its declared length was reserved at admission
    except TimeoutError:
        raise RequestError(408, "request body not received in time", "timeout_error") from None
    except web.HTTPRequestEntityTooLarge:
        raise RequestError(413, f"request body larger than {MAX_BODY} bytes", "request_too_large") from None
    except RequestPayloadError:  # a body aiohttp cannot decode: broken gzip, chunk framing, cut short
        raise RequestError(400, "request body could not be read (its framing or Content-Encoding is broken)") from None
    if ticket is not None:
        ticket.hold(len(raw))
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    return body


async def _read_undeclared(request: web.Request, ticket: Ticket) -> bytes:
    """A chunked body, counted against the sidecar's memory cap as it arrives (HOSTILE D3, E6)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > MAX_BODY:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=size)
        if not ticket.take(len(chunk)):
            request.app[STATE].telemetry.load_shed.labels("buffered-bytes").inc()
            raise Overloaded
        chunks.append(chunk)
    return b"".join(chunks)


def new_call(
    route: CompiledRoute,
    request: web.Request,
    build: Callable[[CompiledTarget], ChatRequest],
    stream: bool,
    span: trace.Span,
    requested_model: str | None = None,
) -> Call:
    """A call with its deadlines: the route's, capped by the client's own timeout hints."""
    now = time.monotonic()
    spec = route.spec
    hard = float("inf")
    for name in _HINT_HEADERS:
        value = request.headers.get(name)
        if value:
            try:
                hard = min(hard, now + float(value) - CLIENT_DEADLINE_MARGIN)
            except ValueError:
                pass
    deadline = min(now + spec.overall_deadline, hard)
    retry_count = request.headers.get("x-stainless-retry-count", "0")
    return Call(
        route=route,
        build=build,
        requested_model=requested_model,
        stream=stream,
        budget_deadline=min(now + spec.budget, deadline),
        deadline=deadline,
        hard_deadline=hard,
        sdk_retry=retry_count.strip() not in ("", "0"),
        headers=request.headers,
        span=span,
        streamed=[] if stream and route.record_content else None,
    )


def answer_headers(call: Call, answer: Answer | None, attempts: int | None = None) -> dict[str, str]:
    """The contract's `llmroute-*` headers."""
    headers = {
        "llmroute-route": call.route.name,
        "llmroute-attempts": str(attempts if attempts is not None else len(call.attempts)),
        "llmroute-degraded": "true" if answer is not None and answer.degraded else "false",
    }
    if answer is not None:
        headers["llmroute-target"] = answer.target.name
        headers["llmroute-provider"] = answer.target.provider.name
    if call.shed_reason is not None:
        headers["llmroute-shed-reason"] = call.shed_reason
    notice = call.route.spec.degraded_notice
    if answer is not None and answer.degraded and notice and notice.isascii() and notice.isprintable():
        headers["llmroute-notice"] = notice
    return headers


def give_up_status(error: UpstreamError | None) -> int:
    return error.status if error is not None and error.status and error.status >= 400 else 503


def finish(
    state: SidecarState, span: trace.Span, call: Call, answer: Answer | None, outcome: str, started: float
) -> None:
    """Metrics, span attributes and the one log line of a finished call (no keys, prompts or text)."""
    target = answer.target.name if answer is not None else "none"
    degraded = answer.degraded if answer is not None else False
    seconds = time.monotonic() - started
    state.telemetry.request_done(
        span, call.route.name, target, degraded, outcome, seconds, call.retry_wait, call.shed_reason
    )
    content = recorded_content(call, answer) if call.route.record_content else None
    if content is not None and span.is_recording():
        span.set_attributes({name: orjson.dumps(value).decode() for name, value in content.items()})
    if request_log.isEnabledFor(logging.INFO):
        request_log.info(orjson.dumps({
            "event": "request",
            "route": call.route.name,
            "target": target,
            "provider": answer.target.provider.name if answer is not None else None,
            "degraded": degraded,
            "outcome": outcome,
            "ms": round(seconds * 1000, 1),
            "attempts": [a.to_json() for a in call.attempts],
            "shedReason": call.shed_reason,
            "retryWaitMs": round(call.retry_wait * 1000, 1),
            "stream": call.stream,
            **(content or {}),
        }).decode())


def recorded_content(call: Call, answer: Answer | None) -> dict[str, Any]:
    """Prompt and completion of a call, for a policy that opted in (`telemetry.recordContent`); the
    names are the OpenTelemetry GenAI attributes. The prompt is the one the answering target got."""
    target = answer.target if answer is not None else call.route.targets[0]
    content: dict[str, Any] = {"gen_ai.input.messages": call.build(target).transcript()}
    if answer is not None and answer.response is not None:
        content["gen_ai.output.messages"] = [{"role": "assistant", "text": answer.response.text}]
    elif call.streamed is not None:
        content["gen_ai.output.messages"] = [{"role": "assistant", "text": "".join(call.streamed)}]
    return content


def record_usage(state: SidecarState, answer: Answer, model: str, usage: Any) -> None:
    state.telemetry.usage(
        answer.target.provider.name, model, usage, state.telemetry.price(model, answer.target.spec.model),
        route=answer.target.route,
    )


class Overloaded(Exception):
    """A body of undeclared length outgrew what the sidecar may hold: shed it, partly read (E6)."""


async def serve_admitted(
    request: web.Request,
    serve: Callable[[SidecarState, web.Request, Ticket], Awaitable[web.StreamResponse]],
    overloaded: Callable[[], web.Response],
) -> web.StreamResponse:
    """Run `serve` for a request the sidecar has capacity for; shed it (`overloaded()`) otherwise: unread
    at admission, or partly read when a body of undeclared length outgrows the cap (the rest of it is
    still on the connection, which is closed rather than read)."""
    state = request.app[STATE]
    ticket = state.admit(request)
    if ticket is None:
        return overloaded()
    hold_client_keys(request.headers)  # scrubbed from whatever an upstream says back (scrubbing.py)
    try:
        return await serve(state, request, ticket)
    except Overloaded:
        response = overloaded()
        response.force_close()
        return response
    finally:
        ticket.release()


def shed_headers() -> dict[str, str]:
    """Load shedding: nothing was sent upstream, so the SDK may retry, after a jittered wait (both
    official SDKs read `retry-after-ms` first; `retry-after` is for everyone else)."""
    return {
        "x-should-retry": "true",
        "retry-after": "1",
        "retry-after-ms": str(random.randint(500, 1500)),
        "llmroute-shed-reason": "overloaded",
    }


def finish_error(
    state: SidecarState, span: trace.Span, route: CompiledRoute | None, exc: RequestError, response: web.Response
) -> web.Response:
    """A request refused before any upstream call: counted (`outcome="request_error"`, the route only
    when it exists: a client must not mint metric labels) and logged like any other. A 408 leaves the
    rest of the body unread on the connection: close it rather than linger."""
    state.telemetry.request_refused(span, route.name if route is not None else "none", exc.status, exc.error_type)
    if request_log.isEnabledFor(logging.INFO):
        request_log.info(orjson.dumps({
            "event": "request",
            "route": route.name if route is not None else None,
            "outcome": "request_error",
            "status": exc.status,
            "error": exc.error_type,
        }).decode())
    if response.status == 408:
        response.force_close()
    return response


async def write_or_give_up(response: web.StreamResponse, data: bytes) -> None:
    """Write with backpressure; a client that stops reading is treated as gone."""
    if data:
        async with asyncio.timeout(WRITE_TIMEOUT):
            await response.write(data)


def json_response(status: int, body: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


# ----- the route API ----------------------------------------------------------------------------------
async def route_api(request: web.Request) -> web.StreamResponse:
    """`POST /v1/routes/{route}`: the policy's own prompts, rendered with the request's variables."""
    return await serve_admitted(request, _route_api, _route_overloaded)


def _route_overloaded() -> web.Response:
    body = {"error": {"type": "overloaded", "message": "the sidecar is at capacity; retry shortly"}}
    return json_response(503, body, shed_headers())


async def _route_api(state: SidecarState, request: web.Request, ticket: Ticket) -> web.StreamResponse:
    runtime = state.runtime
    name = request.match_info["route"]
    route = runtime.route(name) if runtime is not None else None
    # A name that is no route never reaches a span: a client must not mint span names or attributes.
    known = route.name if route is not None else None
    with state.telemetry.request_span(f"POST /v1/routes/{known or '{route}'}", known, request.headers) as span:
        try:
            if runtime is None:
                raise RequestError(503, "no valid policy loaded", "unavailable")
            if route is None:
                raise RequestError(404, f'unknown route "{printable(name)}"', "not_found_error")
            body = await read_json(request, ticket)
            variables = body.get("variables", {})
            stream = body.get("stream", False)
            if not isinstance(variables, dict):
                raise RequestError(400, '"variables" must be an object')
            if not isinstance(stream, bool):
                raise RequestError(400, '"stream" must be true or false')
            # Every target's prompt renders now, so a missing variable fails before any upstream call.
            prepared = {t.name: t.route_request(variables) for t in route.targets}
        except RequestError as exc:
            return finish_error(state, span, route, exc, _route_error(exc.status, exc.error_type, exc.message))
        call = new_call(route, request, lambda target: prepared[target.name], stream, span)
        return await _serve_route(state, request, span, call)


async def _serve_route(
    state: SidecarState, request: web.Request, span: trace.Span, call: Call
) -> web.StreamResponse:
    started = time.monotonic()
    answer: Answer | None = None
    outcome = "client_cancelled"
    try:
        try:
            answer = await run_drainable(state, call)
        except ClientError as exc:
            outcome = "client_error"
            return _route_error(
                exc.status or 400, exc.error_type, exc.message, call, answer_headers(call, None)
            )
        except Draining:
            outcome = "drained"
            return _route_error(503, "unavailable", "the sidecar is shutting down", call, answer_headers(call, None))
        except GaveUp as exc:
            outcome = "failed"
            return _route_error(
                give_up_status(exc.error), exc.error.error_type if exc.error else "unavailable",
                f"all targets failed: {exc}", call, answer_headers(call, None),
            )
        target = answer.target
        headers = answer_headers(call, answer)
        notice = call.route.spec.degraded_notice if answer.degraded else None
        if answer.response is not None:
            outcome = "ok"
            response = answer.response
            record_usage(state, answer, response.model, response.usage)
            output: dict[str, Any] = {"text": response.text}
            if target.check is not None or response.text.lstrip().startswith(("{", "[")):
                parsed = parse_json_answer(response.text)
                if parsed is not None:
                    output["json"] = parsed
            return json_response(
                200,
                {
                    "route": call.route.name,
                    "target": target.name,
                    "provider": target.provider.name,
                    "model": response.model,
                    "degraded": answer.degraded,
                    "notice": notice,
                    "output": output,
                    "usage": {"input_tokens": response.usage.input_tokens,
                              "output_tokens": response.usage.output_tokens},
                    "attempts": [a.to_json() for a in call.attempts],
                },
                headers,
            )
        streamed, outcome = await _stream_route(state, request, call, answer, headers, notice)
        return streamed
    finally:
        finish(state, span, call, answer, outcome, started)


async def _stream_route(
    state: SidecarState,
    request: web.Request,
    call: Call,
    answer: Answer,
    headers: dict[str, str],
    notice: str | None,
) -> tuple[web.StreamResponse, str]:
    """SSE: `meta`, then `delta`s, then `done` — or `error` if the upstream breaks beyond repair."""
    assert answer.stream is not None
    target = answer.target
    meta = json_frame("meta", {
        "route": call.route.name, "target": target.name, "provider": target.provider.name,
        "model": answer.stream.model, "degraded": answer.degraded, "notice": notice,
        "attempts": [a.to_json() for a in call.attempts],
    })

    def encode(frame: StreamFrame, _resumed: bool) -> bytes:
        out = b""
        for event in frame.events:
            if isinstance(event, TextDelta):
                out += json_frame("delta", {"text": event.text})
            elif isinstance(event, StreamEnd):
                out += json_frame("done", {
                    "usage": {"input_tokens": event.usage.input_tokens, "output_tokens": event.usage.output_tokens},
                    "degraded": answer.degraded, "stop_reason": event.stop_reason,
                })
        return out

    def broken(exc: StreamBroken) -> bytes:
        return json_frame("error", {"type": exc.error_type, "message": exc.message})

    return await relay_stream(state, request, call, answer, headers, encode, broken, prologue=meta)


class Draining(Exception):
    """The sidecar is ending the requests still running (drain deadline near)."""


async def run_drainable(state: SidecarState, call: Call) -> Answer:
    """The engine's answer, unless the drain deadline interrupts it (Draining; upstream closed)."""
    try:
        async with state.drainable() as scope:
            return await state.engine.run(call)
    except TimeoutError:
        if scope.expired():
            raise Draining from None
        raise


async def relay_stream(
    state: SidecarState,
    request: web.Request,
    call: Call,
    answer: Answer,
    headers: dict[str, str],
    encode: Callable[[StreamFrame, bool], bytes],
    broken: Callable[[StreamBroken], bytes],
    prologue: bytes = b"",
) -> tuple[web.StreamResponse, str]:
    """Pump a committed stream to the app in its own framing; returns the response and the outcome.

    The upstream is closed on every way out (`aclosing`, and the final `aclose` for a client gone
    before the first byte was written): a client that stops reading (write deadline, HOSTILE D6) or goes
    away (D7) stops the tokens being generated for nobody. A stall past the idle timeout (U5) or any
    other break ends with the dialect's error event, and so does the drain deadline (E5).
    """
    live = answer.stream
    assert live is not None
    response = web.StreamResponse(headers={**headers, "Cache-Control": "no-cache"})
    response.content_type = "text/event-stream"
    scope: asyncio.Timeout | None = None
    try:
        await response.prepare(request)
        try:
            async with state.drainable() as scope:
                await write_or_give_up(response, prologue)
                stream = follow(answer, call, state.engine)
                async with contextlib.aclosing(stream) as frames:
                    async for frame, resumed in frames:
                        await write_or_give_up(response, encode(frame, resumed))
                        for event in frame.events:
                            if isinstance(event, StreamEnd):
                                record_usage(state, answer, live.model, event.usage)
                                span_usage(call.span, event.usage)
                            elif call.streamed is not None and isinstance(event, TextDelta):
                                call.streamed.append(event.text)
        except StreamBroken as exc:
            await write_or_give_up(response, broken(exc))
            await response.write_eof()
            return response, "stream_stalled" if exc.condition == "timeout" else "stream_broken"
        except TimeoutError:
            if scope is None or not scope.expired():
                raise
            # Draining: end with the dialect's error event (the SDK raises), never a silent cut.
            await write_or_give_up(response, broken(StreamBroken("the sidecar is shutting down", "overloaded_error")))
            await response.write_eof()
            return response, "drained"
        await response.write_eof()
    except (TimeoutError, ConnectionError):
        if request.transport is not None:
            request.transport.abort()
        return response, "client_cancelled"
    finally:
        rest = getattr(live.rest, "aclose", None)
        if rest is not None:  # a no-op when `follow` already closed it
            with contextlib.suppress(Exception):
                await rest()
    return response, "ok"


def _route_error(
    status: int,
    error_type: str,
    message: str,
    call: Call | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body: dict[str, Any] = {"error": {"type": error_type, "message": message}}
    if call is not None:
        body["attempts"] = [a.to_json() for a in call.attempts]
    return json_response(status, body, {**(headers or {}), "x-should-retry": "false"})


# ----- probes, status, metrics -------------------------------------------------------------------------
async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.draining:
        return web.Response(status=503, text="draining")
    if state.runtime is None:
        return web.Response(status=503, text=f"no valid policy: {state.last_error or 'not loaded'}")
    return web.Response(text="ready")


def health_app(main: web.Application) -> web.Application:
    """`/healthz` and `/readyz` of `main` (set up already) and nothing else, for a listener the kubelet
    reaches on the pod IP (`LLMROUTE_HEALTH_LISTEN`): the main listener stays on loopback (it spends the
    keys), and `httpGet` probes cost no process start, unlike exec probes."""
    app = web.Application()
    app[STATE] = main[STATE]
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def status(request: web.Request) -> web.Response:
    state = request.app[STATE]
    runtime = state.runtime
    policy = runtime.policy if runtime else None
    telemetry = state.telemetry
    routes: dict[str, Any] = {}
    if runtime is not None:
        for route in runtime.routes.values():
            answered = _sum_samples(telemetry.requests, {"route": route.name})
            degraded = _sum_samples(telemetry.requests, {"route": route.name, "degraded": "true"})
            routes[route.name] = {
                "strategy": route.spec.strategy,
                "answered": answered,
                "degradedShare": round(degraded / answered, 4) if answered else 0.0,
                "recentFallback": telemetry.recent_fallback(route.name),
                "targets": {t.name: t.health.snapshot() for t in route.targets},
            }
    body = {
        "policy": policy.name if policy else None,
        "namespace": policy.namespace if policy else None,
        "generation": policy.generation if policy else None,
        "configHash": policy.config_hash if policy else None,
        "loadedAt": state.loaded_at,
        "ready": runtime is not None and not state.draining,
        "error": state.last_error,
        "errorAt": state.last_error_at,
        "warnings": runtime.warnings if runtime else [],
        "providers": state.upstreams.status.snapshot(),
        "retryBudgets": {name: b.snapshot() for name, b in state.upstreams.budgets().items()},
        "rateLimits": state.upstreams.rate_limits.snapshot(),
        "routes": routes,
        "load": {
            "inFlight": state.in_flight,
            "maxInFlight": state.max_in_flight,
            "bufferedBytes": state.buffered_bytes,
            "maxBufferedBytes": state.max_buffered_bytes,
            "draining": state.draining,
        },
        "uptimeSeconds": round(time.monotonic() - state.started, 1),
    }
    return json_response(200, body)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[STATE].telemetry.exposition()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def _refresh_gauges(state: SidecarState) -> None:
    for provider, level in state.upstreams.status.levels().items():
        state.telemetry.statuspage.labels(provider).set(level)
    open_targets: dict[str, int] = {}
    for (_route, target), health in state.upstreams.healths().items():
        open_targets[target] = max(open_targets.get(target, 0), 1 if health.state == "open" else 0)
    for target, is_open in open_targets.items():
        state.telemetry.circuit.labels(target).set(is_open)
    for reason, count in state.upstreams.status.error_counts().items():
        state.telemetry.status_fetch_errors.labels(reason).set(count)
    state.telemetry.ready.set(1 if state.runtime is not None and not state.draining else 0)
    state.telemetry.policy_load_failing.set(1 if state.last_error is not None else 0)
    for provider, budget in state.upstreams.budgets().items():
        state.telemetry.retry_budget_available.labels(provider).set(max(0.0, budget.allowance()))


def _sum_samples(counter: Any, labels: dict[str, str]) -> float:
    total = 0.0
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def policy_problem(exc: Exception) -> str:
    if isinstance(exc, PolicyError):
        return "; ".join(exc.problems)
    return str(exc)
