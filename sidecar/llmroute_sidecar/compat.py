"""Drop-in endpoints: apps keep their Anthropic or OpenAI SDK and point its base URL here.

    ANTHROPIC_BASE_URL=http://127.0.0.1:8787/anthropic   -> POST /anthropic/v1/messages
    OPENAI_BASE_URL=http://127.0.0.1:8787/openai/v1      -> POST /openai/v1/chat/completions

The route is the `llmroute-route` header (a header naming no route is a 404, not a silent default),
else the route named like the request's `model`, else the policy's `defaultRoute`. A target of the
app's own provider gets the body as sent (model swapped, key replaced); a target of another provider
gets the conversation translated, with its own system prompt, and the answer is translated back.
Whatever key the app sent is ignored and never forwarded.

Errors keep the dialect's own envelope. When the sidecar gives up it says `x-should-retry: false`: it
already retried, and the SDK's own retries would multiply the load (PROVIDERS.md 2). A request shed
because the sidecar is at capacity is the exception (nothing went upstream): Anthropic's 529
`overloaded_error` / OpenAI's 503, with `x-should-retry: true` and a short jittered wait.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import orjson
from aiohttp import web
from opentelemetry import trace

from .errors import ClientError, RequestError, StreamBroken, UpstreamError
from .messages import ChatRequest
from .providers import app_codec
from .providers.base import AppCodec, StreamFrame
from .runtime import CompiledRoute, CompiledTarget
from .scrubbing import printable
from .server import (
    Draining,
    SidecarState,
    Ticket,
    answer_headers,
    finish,
    finish_error,
    give_up_status,
    json_response,
    new_call,
    read_json,
    record_usage,
    relay_stream,
    run_drainable,
    serve_admitted,
    shed_headers,
)
from .strategies import Answer, Call, GaveUp


def add_compat_routes(app: web.Application) -> None:
    app.router.add_post("/anthropic/v1/messages", anthropic_messages)
    app.router.add_post("/openai/v1/chat/completions", openai_chat_completions)


async def anthropic_messages(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "anthropic")


async def openai_chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "openai")


_OVERLOAD_STATUS = {"anthropic": 529, "openai": 503}
"""What each provider itself answers when overloaded (the SDKs retry both)."""


async def _serve(request: web.Request, dialect: str) -> web.StreamResponse:
    codec = app_codec(dialect)

    async def serve(state: SidecarState, request: web.Request, ticket: Ticket) -> web.StreamResponse:
        return await _serve_admitted(state, request, codec, ticket)

    return await serve_admitted(request, serve, lambda: _overloaded(codec))


def _overloaded(codec: AppCodec) -> web.Response:
    status = _OVERLOAD_STATUS.get(codec.dialect, 503)
    body = codec.error_body(status, "overloaded_error", "the llmroute sidecar is at capacity; retry shortly")
    return json_response(status, body, shed_headers())


async def _serve_admitted(
    state: SidecarState, request: web.Request, codec: AppCodec, ticket: Ticket
) -> web.StreamResponse:
    runtime = state.runtime
    route: CompiledRoute | None = None
    with state.telemetry.request_span(f"POST {request.path}", None, request.headers) as span:
        try:
            if runtime is None:
                raise RequestError(503, "no valid policy loaded", "api_error")
            body = await read_json(request, ticket)
            app_request = codec.decode_request(body)
            if app_request.native is not None:
                app_request.native.headers = forwarded_headers(request, codec.forwarded_headers)
            model = body["model"]
            named = request.headers.get("llmroute-route")
            if named is not None:
                # Named on purpose: a typo must not quietly land on another route's targets.
                route = runtime.route(named.strip())
                if route is None:
                    shown = printable(named)
                    raise RequestError(404, f'unknown route "{shown}" (llmroute-route header)', "not_found_error")
            else:
                route = runtime.route(model) or runtime.default_route
            if route is None:
                raise RequestError(
                    404, f'no route for model "{printable(model)}" and no defaultRoute', "not_found_error"
                )
            stream = body.get("stream", False) is True
        except RequestError as exc:
            return finish_error(state, span, route, exc, _error(codec, exc.status, exc.error_type, exc.message, {}))

        def build(target: CompiledTarget) -> Any:
            own = dataclasses.replace(app_request)
            prompt = target.spec.prompt
            if target.index > 0 and prompt is not None and prompt.system is not None:
                own.system_override = prompt.system  # the fallback's separately maintained prompt
            return target.apply_params(own)

        call = new_call(route, request, build, stream, span, requested_model=model)
        return await _answer(state, request, span, codec, call, model, app_request)


async def _answer(
    state: SidecarState,
    request: web.Request,
    span: trace.Span,
    codec: AppCodec,
    call: Call,
    model: str,
    app_request: ChatRequest,
) -> web.StreamResponse:
    started = time.monotonic()
    answer: Answer | None = None
    outcome = "client_cancelled"
    try:
        try:
            answer = await run_drainable(state, call)
        except ClientError as exc:
            outcome = "client_error"
            return _upstream_error(codec, exc, exc.status or 400, answer_headers(call, None))
        except Draining:
            outcome = "drained"
            return _error(codec, 503, "api_error", "the llmroute sidecar is shutting down", answer_headers(call, None))
        except GaveUp as exc:
            outcome = "failed"
            headers = answer_headers(call, None)
            if exc.error is None:
                return _error(codec, 503, "api_error", f"all targets failed: {exc}", headers)
            return _upstream_error(codec, exc.error, give_up_status(exc.error), headers)
        headers = answer_headers(call, answer)
        if answer.response is not None:
            outcome = "ok"
            response = answer.response
            record_usage(state, answer, response.model, response.usage)
            native = response.native
            if native is not None and native.dialect == codec.dialect:
                body = native.body
            else:
                body = codec.encode_response(response, model)
            return json_response(200, body, headers)
        streamed, outcome = await _stream(state, request, codec, call, answer, headers, model, app_request)
        return streamed
    finally:
        finish(state, span, call, answer, outcome, started)


async def _stream(
    state: SidecarState,
    request: web.Request,
    codec: AppCodec,
    call: Call,
    answer: Answer,
    headers: dict[str, str],
    model: str,
    app_request: ChatRequest,
) -> tuple[web.StreamResponse, str]:
    encoder = codec.stream_encoder(model, app_request)
    same_dialect = answer.target.provider.type == codec.dialect

    def encode(frame: StreamFrame, resumed: bool) -> bytes:
        if same_dialect and not resumed:
            return encoder.relay(frame)  # the app's own dialect: pass the upstream's events through
        return b"".join(encoder.encode(event) for event in frame.events)

    def broken(exc: StreamBroken) -> bytes:
        return encoder.error(exc.error_type, exc.message)

    return await relay_stream(state, request, call, answer, headers, encode, broken)


def forwarded_headers(request: web.Request, allowed: tuple[str, ...]) -> dict[str, str]:
    """The app's protocol headers a same-dialect target must see too (`anthropic-beta`...): an allow-list,
    so hop-by-hop headers, keys and control headers such as `x-envoy-*` never travel (HOSTILE D8, D9).
    A name the app's `Connection` header lists is hop-by-hop (RFC 9110 7.6.1) even when allowed."""
    headers = request.headers
    present = {name: headers[name] for name in allowed if name in headers}
    if not present:
        return present  # the usual case: nothing to forward
    hop = {token.strip().lower() for value in headers.getall("Connection", ()) for token in value.split(",")}
    for name, value in present.items():
        if not value.isascii() and not _utf8(value):
            # aiohttp hands bytes that are not UTF-8 over as lone surrogates, which cannot be sent on.
            raise RequestError(400, f"{name} header: not valid UTF-8")
    return {name: value for name, value in present.items() if name not in hop}


def _utf8(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _upstream_error(
    codec: AppCodec, error: UpstreamError, status: int, headers: dict[str, str]
) -> web.Response:
    """The provider's own error body when it speaks the app's dialect (and is a JSON object: a proxy's
    plain-text 503 is not); else the same facts, translated into the dialect's envelope."""
    if error.body and error.dialect == codec.dialect and _json_object(error.body):
        return web.Response(
            status=status,
            body=error.body,
            content_type="application/json",
            headers={**headers, "x-should-retry": "false", **_retry_after(error)},
        )
    return _error(codec, status, error.error_type, error.message, {**headers, **_retry_after(error)})


def _error(codec: AppCodec, status: int, error_type: str, message: str, headers: dict[str, str]) -> web.Response:
    return json_response(
        status, codec.error_body(status, error_type, message), {**headers, "x-should-retry": "false"}
    )


def _json_object(body: bytes) -> bool:
    try:
        return isinstance(orjson.loads(body), dict)
    except orjson.JSONDecodeError:
        return False


def _retry_after(error: UpstreamError) -> dict[str, str]:
    """Relayed as whole seconds (what every SDK parses), rounded up: never sooner than asked."""
    wait = error.retry_after
    if wait is None or not math.isfinite(wait):
        return {}
    return {"retry-after": str(max(1, math.ceil(wait)))}
