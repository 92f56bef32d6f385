"""The Gemini adapter: its codec against real wire captures, its HTTP flow against a loopback server,
and its request/response shapes against the official google-genai SDK (what the SDK sends for a
conversation is what we send; what the real API answers is what we read)."""

from __future__ import annotations

import base64
import copy
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from google import genai
from google.genai import types
from google.genai.client import AsyncClient
from multidict import CIMultiDict

from llmroute_sidecar.errors import ClientError, FailoverError, RetryableError, UpstreamError
from llmroute_sidecar.messages import (
    ChatRequest,
    Image,
    Message,
    NativeBody,
    StreamEnd,
    StreamEvent,
    StreamStart,
    Text,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallStart,
    ToolResult,
    ToolSpec,
)
from llmroute_sidecar.policy import Provider
from llmroute_sidecar.providers.base import AttemptTimeouts
from llmroute_sidecar.providers.gemini import FOREIGN_SIGNATURE, GeminiAdapter
from llmroute_sidecar.sse import SseEvent, SseParser

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "providers"
if not FIXTURES.exists():  # the captures also ship with the repository's tests
    FIXTURES = Path(__file__).parent / "fixtures" / "providers"

STREAM_FIXTURE = (FIXTURES / "gemini_stream_alt_sse_final_chunk.sse").read_bytes()
FINAL_CHUNK: dict[str, Any] = orjson.loads(STREAM_FIXTURE.split(b"data: ", 1)[1])
TIMEOUTS = AttemptTimeouts(first_byte=5.0, idle=5.0)
WEATHER_SCHEMA = {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def offline_adapter(base_url: str | None = None) -> GeminiAdapter:
    provider = Provider.model_validate({"name": "gem", "type": "gemini", "baseURL": base_url})
    # The codec never touches the session; the HTTP tests below use a real one.
    return GeminiAdapter(provider, None, "test-key")  # type: ignore[arg-type]


def decode_all(adapter: GeminiAdapter, raw: bytes) -> tuple[list[StreamEvent], bool]:
    decoder = adapter.stream_decoder()
    events: list[StreamEvent] = []
    for sse in SseParser().feed(raw):
        events.extend(decoder.decode(sse))
    return events, decoder.finished()


def chunk(obj: dict[str, Any], eol: str = "\n") -> bytes:
    return f"data: {orjson.dumps(obj).decode()}{eol}{eol}".encode()


def text_chunk(text: str, finish: str | None = None, usage: dict[str, int] | None = None) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    body: dict[str, Any] = {"candidates": [candidate], "modelVersion": "gemini-2.5-flash", "responseId": "r1"}
    if usage:
        body["usageMetadata"] = usage
    return body


def weather_conversation() -> list[Message]:
    return [
        Message("user", [Text("Weather in Tokyo?"), Image("image/png", data="iVBORw==")]),
        Message("assistant", [Text("Let me look."), ToolCall("toolu_1", "getWeather", {"location": "Tokyo"})]),
        Message("user", [ToolResult("toolu_1", "sunny")]),
    ]


# ----- requests -----------------------------------------------------------------------------------------
def test_url_names_model_method_and_version() -> None:
    adapter = offline_adapter()
    assert adapter.url("gemini-2.5-flash", stream=False) == (
        "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent"
    )
    assert adapter.url("models/gemini-2.5-flash", stream=True) == (
        "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    )


def test_url_keeps_a_version_the_base_url_already_names() -> None:
    adapter = offline_adapter("https://proxy.example/gemini/v1/")
    assert adapter.url("m", stream=False) == "https://proxy.example/gemini/v1/models/m:generateContent"


def test_api_key_travels_in_x_goog_api_key_only() -> None:
    assert offline_adapter().auth_headers("secret") == {"x-goog-api-key": "secret"}
    assert offline_adapter().auth_headers(None) == {}


def test_neutral_request_becomes_contents_system_instruction_and_generation_config() -> None:
    request = ChatRequest(
        messages=weather_conversation(),
        system="be brief",
        max_tokens=100,
        temperature=0.5,
        top_p=0.9,
        stop=["END"],
        tools=[ToolSpec("getWeather", "Current weather", WEATHER_SCHEMA)],
        tool_choice="getWeather",
    )
    body = offline_adapter().encode_request(request, "gemini-2.5-flash", stream=False)
    assert body == {
        "contents": [
            {
                "role": "user",
                "parts": [
                    {"text": "Weather in Tokyo?"},
                    {"inlineData": {"mimeType": "image/png", "data": "iVBORw=="}},
                ],
            },
            {
                "role": "model",
                "parts": [
                    {"text": "Let me look."},
                    {
                        "functionCall": {"name": "getWeather", "args": {"location": "Tokyo"}},
                        "thoughtSignature": FOREIGN_SIGNATURE,
                    },
                ],
            },
            {
                "role": "user",
                "parts": [{"functionResponse": {"name": "getWeather", "response": {"output": "sunny"}}}],
            },
        ],
        "systemInstruction": {"role": "user", "parts": [{"text": "be brief"}]},
        "tools": [
            {
                "functionDeclarations": [
                    {
                        "name": "getWeather",
                        "description": "Current weather",
                        "parametersJsonSchema": WEATHER_SCHEMA,
                    }
                ]
            }
        ],
        "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["getWeather"]}},
        "generationConfig": {
            "maxOutputTokens": 100,
            "temperature": 0.5,
            "topP": 0.9,
            "stopSequences": ["END"],
        },
    }


def test_fallback_system_prompt_replaces_the_apps() -> None:
    request = ChatRequest([Message("user", [Text("hi")])], system="app prompt", system_override="target prompt")
    body = offline_adapter().encode_request(request, "m", stream=True)
    assert body["systemInstruction"] == {"role": "user", "parts": [{"text": "target prompt"}]}
    assert "generationConfig" not in body and "tools" not in body


def test_parallel_tool_results_from_separate_messages_form_one_turn() -> None:
    messages = [
        Message("user", [Text("Compare Tokyo and Paris")]),
        Message(
            "assistant",
            [
                ToolCall("c1", "getWeather", {"location": "Tokyo"}),
                ToolCall("c2", "getWeather", {"location": "Paris"}),
            ],
        ),
        Message("user", [ToolResult("c1", "sunny")]),
        Message("user", [ToolResult("c2", "boom", is_error=True)]),
    ]
    contents = offline_adapter().encode_request(ChatRequest(messages), "m", stream=False)["contents"]
    assert [content["role"] for content in contents] == ["user", "model", "user"]
    calls = contents[1]["parts"]
    assert calls[0]["thoughtSignature"] == FOREIGN_SIGNATURE  # the first call of the step carries it
    assert "thoughtSignature" not in calls[1]
    assert contents[2]["parts"] == [
        {"functionResponse": {"name": "getWeather", "response": {"output": "sunny"}}},
        {"functionResponse": {"name": "getWeather", "response": {"error": "boom"}}},
    ]


def test_empty_text_parts_and_turns_are_dropped() -> None:
    messages = [
        Message("user", [Text("hi")]),
        Message("assistant", [Text(""), ToolCall("c1", "f", {})]),
        Message("user", [ToolResult("c1", "done")]),
        Message("assistant", [Text("")]),
        Message("user", [Text("and now?")]),
    ]
    contents = offline_adapter().encode_request(ChatRequest(messages), "m", stream=False)["contents"]
    assert [content["role"] for content in contents] == ["user", "model", "user"]
    assert contents[1]["parts"] == [{"functionCall": {"name": "f", "args": {}}, "thoughtSignature": FOREIGN_SIGNATURE}]
    assert contents[2]["parts"][1] == {"text": "and now?"}


def test_tool_choice_modes() -> None:
    def mode(choice: str) -> Any:
        request = ChatRequest([Message("user", [Text("x")])], tools=[ToolSpec("f", None, {})], tool_choice=choice)
        return offline_adapter().encode_request(request, "m", stream=False)["toolConfig"]

    assert mode("auto") == {"functionCallingConfig": {"mode": "AUTO"}}
    assert mode("any") == {"functionCallingConfig": {"mode": "ANY"}}
    assert mode("none") == {"functionCallingConfig": {"mode": "NONE"}}
    without_tools = ChatRequest([Message("user", [Text("x")])], system="", tool_choice="any")
    body = offline_adapter().encode_request(without_tools, "m", stream=False)
    assert "toolConfig" not in body and "systemInstruction" not in body


def test_target_params_merge_into_generation_config_or_the_top_level() -> None:
    request = ChatRequest(
        [Message("user", [Text("x")])],
        max_tokens=10,
        extra={
            "topK": 4,
            "thinkingConfig": {"thinkingBudget": 0},
            "generationConfig": {"seed": 7},
            "safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}],
        },
    )
    body = offline_adapter().encode_request(request, "m", stream=False)
    assert body["generationConfig"] == {
        "maxOutputTokens": 10,
        "topK": 4,
        "thinkingConfig": {"thinkingBudget": 0},
        "seed": 7,
    }
    assert body["safetySettings"][0]["threshold"] == "BLOCK_NONE"


def test_a_gemini_native_body_passes_through_with_target_overrides() -> None:
    native = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "cachedContent": "c/1"}
    request = ChatRequest(
        [Message("user", [Text("hi")])],
        native=NativeBody("gemini", native),
        system_override="target prompt",
        extra={"temperature": 0.1},
    )
    body = offline_adapter().encode_request(request, "m", stream=True)
    assert body["cachedContent"] == "c/1"
    assert body["systemInstruction"]["parts"] == [{"text": "target prompt"}]
    assert body["generationConfig"] == {"temperature": 0.1}
    assert "systemInstruction" not in native  # the app's body is not mutated


def test_data_url_images_are_inlined() -> None:
    image = Image("image/png", url="data:image/jpeg;base64,/9j/4AAQ")
    request = ChatRequest([Message("user", [image])])
    assert offline_adapter().untranslatable(request) is None
    part = offline_adapter().encode_request(request, "m", stream=False)["contents"][0]["parts"][0]
    assert part == {"inlineData": {"mimeType": "image/jpeg", "data": "/9j/4AAQ"}}


@pytest.mark.parametrize(
    ("parts", "prefill", "reason"),
    [
        ([Image("image/png", url="https://example.com/cat.png")], None, "inline base64"),
        ([Text("go on")], "Once upon", "prefill"),
        ([ToolResult("nobody", "42")], None, "no earlier call"),
    ],
)
def test_what_gemini_cannot_do_is_refused_with_a_reason(parts: list[Any], prefill: str | None, reason: str) -> None:
    request = ChatRequest([Message("user", parts)], prefill=prefill)
    assert reason in (offline_adapter().untranslatable(request) or "")
    assert not GeminiAdapter.supports_prefill


def test_what_the_apps_native_body_holds_beyond_neutral_is_refused() -> None:
    native = NativeBody("anthropic", {"model": "claude", "messages": []})
    request = ChatRequest([Message("user", [Text("x")])], native=native, lossy=["a document block"])
    assert "a document block" in (offline_adapter().untranslatable(request) or "")


def test_an_untranslatable_request_that_reaches_the_encoder_fails_over() -> None:
    request = ChatRequest([Message("user", [Image("image/png", url="https://example.com/cat.png")])])
    with pytest.raises(FailoverError):
        offline_adapter().encode_request(request, "m", stream=False)


def test_tool_result_may_name_its_function_itself() -> None:
    request = ChatRequest([Message("user", [ToolResult("x", "42", name="calc")])])
    assert offline_adapter().untranslatable(request) is None
    part = offline_adapter().encode_request(request, "m", stream=False)["contents"][0]["parts"][0]
    assert part["functionResponse"]["name"] == "calc"


# ----- answers ------------------------------------------------------------------------------------------
def test_final_chunk_capture_decodes_as_a_tool_call_answer() -> None:
    response = offline_adapter().decode_response(copy.deepcopy(FINAL_CHUNK))
    assert response.parts == [ToolCall("call_qpc2afWVFJK4vr0Pq6WiyAU_0", "getWeather", {"location": "Tokyo"})]
    assert response.stop_reason == "tool_use"
    # Thinking tokens are output tokens (billed so, and counted so by Anthropic and OpenAI).
    assert (response.usage.input_tokens, response.usage.output_tokens) == (83, 14 + 104)
    assert response.model == "gemini-2.5-flash"
    assert response.native is not None and response.native.dialect == "gemini"


def test_text_parts_join_and_thought_summaries_are_not_the_answer() -> None:
    body = text_chunk("Hello", finish="STOP")
    body["candidates"][0]["content"]["parts"] = [
        {"text": "thinking...", "thought": True},
        {"text": "Hel"},
        {"text": "lo"},
    ]
    response = offline_adapter().decode_response(body)
    assert response.parts == [Text("Hello")] and response.stop_reason == "end_turn"


def test_gemini_provided_call_ids_are_kept() -> None:
    body = copy.deepcopy(FINAL_CHUNK)
    body["candidates"][0]["content"]["parts"][0]["functionCall"]["id"] = "abc"
    assert offline_adapter().decode_response(body).parts[0] == ToolCall("abc", "getWeather", {"location": "Tokyo"})


@pytest.mark.parametrize(
    ("finish", "stop"),
    [
        ("MAX_TOKENS", "max_tokens"),
        ("SAFETY", "refusal"),
        ("RECITATION", "refusal"),
        ("SPII", "refusal"),
        ("PROHIBITED_CONTENT", "refusal"),
        ("BLOCKLIST", "refusal"),
        ("MALFORMED_FUNCTION_CALL", "other"),
    ],
)
def test_finish_reasons_map_to_stop_reasons(finish: str, stop: str) -> None:
    body = {"candidates": [{"finishReason": finish, "index": 0}], "usageMetadata": {"promptTokenCount": 3}}
    response = offline_adapter().decode_response(body)
    assert response.stop_reason == stop and response.parts == []


def test_a_blocked_prompt_is_a_refusal_not_a_failure() -> None:
    body = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 5}}
    response = offline_adapter().decode_response(body)
    assert response.stop_reason == "refusal" and response.usage.input_tokens == 5


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"candidates": []},
        {"candidates": ["x"]},
        {"candidates": [{"content": {"parts": 3}}]},
        {"candidates": {"0": {}}},
        {"candidates": [{"content": "text"}]},
    ],
)
def test_a_body_without_the_minimal_shape_is_refused(body: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        offline_adapter().decode_response(body)


# ----- streams ------------------------------------------------------------------------------------------
def test_final_chunk_capture_streams_a_tool_call_and_ends_the_stream() -> None:
    events, finished = decode_all(offline_adapter(), STREAM_FIXTURE)
    assert events == [
        StreamStart("gemini-2.5-flash", events[0].usage),  # type: ignore[union-attr]
        ToolCallStart(0, "call_qpc2afWVFJK4vr0Pq6WiyAU_0", "getWeather"),
        ToolCallDelta(0, '{"location":"Tokyo"}'),
        events[-1],
    ]
    end = events[-1]
    assert isinstance(end, StreamEnd) and end.stop_reason == "tool_use"
    assert (end.usage.input_tokens, end.usage.output_tokens) == (83, 118)
    assert finished


def test_text_stream_with_crlf_framing_ends_only_at_the_finish_reason() -> None:
    adapter = offline_adapter()
    first = chunk(text_chunk("Hel", usage={"promptTokenCount": 7}), eol="\r\n")
    events, finished = decode_all(adapter, first)
    assert [type(event) for event in events] == [StreamStart, TextDelta] and not finished
    assert events[0] == StreamStart("gemini-2.5-flash", events[0].usage)  # type: ignore[union-attr]
    assert events[0].usage.input_tokens == 7  # type: ignore[union-attr]
    last = chunk(text_chunk("lo", finish="MAX_TOKENS", usage={"promptTokenCount": 7, "candidatesTokenCount": 2}))
    events, finished = decode_all(adapter, first + last)
    assert [event.text for event in events if isinstance(event, TextDelta)] == ["Hel", "lo"]
    assert events[-1] == StreamEnd("max_tokens", events[-1].usage)  # type: ignore[union-attr]
    assert events[-1].usage.output_tokens == 2  # type: ignore[union-attr]
    assert finished


def test_a_blocked_prompt_ends_the_stream_as_a_refusal() -> None:
    events, finished = decode_all(offline_adapter(), chunk({"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}}))
    assert isinstance(events[-1], StreamEnd) and events[-1].stop_reason == "refusal" and finished


def test_an_error_event_in_the_stream_raises_the_routing_decision() -> None:
    decoder = offline_adapter().stream_decoder()
    decoder.decode(SseEvent("message", orjson.dumps(text_chunk("partial")).decode()))
    error = fixture_bytes("gemini_error_503_unavailable.json").decode()
    with pytest.raises(RetryableError) as caught:
        decoder.decode(SseEvent("message", error))
    assert caught.value.condition == 503 and caught.value.dialect == "gemini"
    assert caught.value.body is not None and b"UNAVAILABLE" in caught.value.body


def test_undecodable_chunks_and_unknown_events() -> None:
    decoder = offline_adapter().stream_decoder()
    assert decoder.decode(SseEvent("ping", "whatever")) == []
    with pytest.raises(ValueError):
        decoder.decode(SseEvent("message", "{not json"))


# ----- errors -------------------------------------------------------------------------------------------
def test_error_details_read_code_message_and_status() -> None:
    adapter = offline_adapter()
    body = orjson.loads(fixture_bytes("gemini_error_400_api_key.json"))
    assert adapter.error_details(body) == (
        "INVALID_ARGUMENT",
        "API key not valid. Please pass a valid API key.",
        400,
    )
    assert adapter.error_details([body]) == adapter.error_details(body)  # the array-wrapped variant
    assert adapter.error_details({"detail": "nope"}) == (None, None, None)


def json_headers() -> CIMultiDict[str]:
    return CIMultiDict({"Content-Type": "application/json; charset=UTF-8"})


def test_a_429_wrapped_in_a_500_classifies_as_429_with_the_retry_info_delay() -> None:
    raw = fixture_bytes("gemini_error_429_resource_exhausted.json")
    error = offline_adapter().classify(500, json_headers(), raw)
    assert isinstance(error, RetryableError)
    assert error.condition == 429 and error.error_type == "RESOURCE_EXHAUSTED" and error.retry_after == 58.0
    assert error.status == 500 and error.dialect == "gemini"


def test_a_quota_error_at_http_400_is_a_429_only_when_the_body_says_resource_exhausted() -> None:
    exhausted = b'{"error":{"code":400,"message":"quota","status":"RESOURCE_EXHAUSTED"}}'
    assert offline_adapter().classify(400, json_headers(), exhausted).condition == 429
    billing = b'{"error":{"code":400,"message":"billing not enabled","status":"FAILED_PRECONDITION"}}'
    assert isinstance(offline_adapter().classify(400, json_headers(), billing), ClientError)


def test_a_429_without_any_delay_hint_fails_over() -> None:
    raw = b'{"error":{"code":429,"message":"slow down","status":"RESOURCE_EXHAUSTED"}}'
    assert isinstance(offline_adapter().classify(429, json_headers(), raw), FailoverError)


def test_a_retry_after_header_outranks_the_body() -> None:
    headers = json_headers()
    headers["Retry-After"] = "3"
    error = offline_adapter().classify(429, headers, fixture_bytes("gemini_error_429_resource_exhausted.json"))
    assert error.retry_after == 3.0


# ----- over HTTP ----------------------------------------------------------------------------------------
Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]


class LoopbackGemini:
    """A one-route stand-in for generativelanguage.googleapis.com that records what it receives."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((str(request.rel_url), dict(request.headers), await request.json()))
        return await self.replies.pop(0)(request)


@pytest.fixture
async def gemini_server() -> AsyncIterator[LoopbackGemini]:
    server = LoopbackGemini()
    app = web.Application()
    app.router.add_post("/{tail:.*}", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}"
    yield server
    await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def adapter_at(url: str, session: aiohttp.ClientSession) -> GeminiAdapter:
    return GeminiAdapter(Provider.model_validate({"name": "gem", "type": "gemini", "baseURL": url}), session, "k1")


def json_reply(body: bytes, status: int = 200) -> Reply:
    async def reply(_: web.Request) -> web.StreamResponse:
        return web.Response(body=body, status=status, content_type="application/json")

    return reply


def sse_reply(body: bytes) -> Reply:
    async def reply(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(body)
        return response

    return reply


HELLO = ChatRequest([Message("user", [Text("hello")])], max_tokens=50)


async def test_complete_over_http(gemini_server: LoopbackGemini, session: aiohttp.ClientSession) -> None:
    gemini_server.replies.append(json_reply(orjson.dumps(text_chunk("Hi!", "STOP", {"promptTokenCount": 2}))))
    response = await adapter_at(gemini_server.url, session).complete(HELLO, "gemini-2.5-flash", TIMEOUTS)
    assert response.text == "Hi!" and response.stop_reason == "end_turn" and response.usage.input_tokens == 2
    path, headers, body = gemini_server.requests[0]
    assert path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert headers["x-goog-api-key"] == "k1"
    assert body == {
        "contents": [{"role": "user", "parts": [{"text": "hello"}]}],
        "generationConfig": {"maxOutputTokens": 50},
    }


async def test_stream_over_http(gemini_server: LoopbackGemini, session: aiohttp.ClientSession) -> None:
    body = chunk(text_chunk("Hel"), eol="\r\n") + chunk(text_chunk("lo", "STOP"), eol="\r\n")
    gemini_server.replies.append(sse_reply(body))
    frames = [frame async for frame in adapter_at(gemini_server.url, session).stream(HELLO, "g", TIMEOUTS)]
    events = [event for frame in frames for event in frame.events]
    assert "".join(event.text for event in events if isinstance(event, TextDelta)) == "Hello"
    assert isinstance(events[-1], StreamEnd) and events[-1].stop_reason == "end_turn"
    assert gemini_server.requests[0][0] == "/v1beta/models/g:streamGenerateContent?alt=sse"


async def test_stream_cut_before_a_finish_reason_is_a_break(
    gemini_server: LoopbackGemini, session: aiohttp.ClientSession
) -> None:
    gemini_server.replies.append(sse_reply(chunk(text_chunk("Hel"))))
    with pytest.raises(RetryableError) as caught:
        async for _ in adapter_at(gemini_server.url, session).stream(HELLO, "g", TIMEOUTS):
            pass
    assert caught.value.condition == "connection"


async def test_stream_answered_with_a_json_error(gemini_server: LoopbackGemini, session: aiohttp.ClientSession) -> None:
    gemini_server.replies.append(json_reply(fixture_bytes("gemini_error_503_unavailable.json"), status=503))
    with pytest.raises(RetryableError) as caught:
        async for _ in adapter_at(gemini_server.url, session).stream(HELLO, "g", TIMEOUTS):
            pass
    assert caught.value.condition == 503


@pytest.mark.parametrize(
    ("status", "fixture", "kind", "condition", "error_type"),
    [
        (503, "gemini_error_503_unavailable.json", RetryableError, 503, "UNAVAILABLE"),
        (500, "gemini_error_429_resource_exhausted.json", RetryableError, 429, "RESOURCE_EXHAUSTED"),
        (400, "gemini_error_400_api_key.json", ClientError, 400, "INVALID_ARGUMENT"),
    ],
)
async def test_http_errors_classify_on_the_body(
    gemini_server: LoopbackGemini,
    session: aiohttp.ClientSession,
    status: int,
    fixture: str,
    kind: type[UpstreamError],
    condition: int,
    error_type: str,
) -> None:
    gemini_server.replies.append(json_reply(fixture_bytes(fixture), status=status))
    with pytest.raises(UpstreamError) as caught:
        await adapter_at(gemini_server.url, session).complete(HELLO, "g", TIMEOUTS)
    assert type(caught.value) is kind
    assert (caught.value.status, caught.value.condition, caught.value.error_type) == (
        status,
        condition,
        error_type,
    )
    assert caught.value.body == fixture_bytes(fixture) and caught.value.dialect == "gemini"


async def test_garbage_200_is_a_retryable_bad_gateway(
    gemini_server: LoopbackGemini, session: aiohttp.ClientSession
) -> None:
    gemini_server.replies.append(json_reply(b'{"candidates": null}'))
    with pytest.raises(RetryableError) as caught:
        await adapter_at(gemini_server.url, session).complete(HELLO, "g", TIMEOUTS)
    assert caught.value.status == 502


# ----- against the official SDK -------------------------------------------------------------------------
# The SDK's own aiohttp session subclass trips aiohttp's inheritance warning; not ours to fix.
sdk_warnings = pytest.mark.filterwarnings("ignore:Inheritance class AiohttpClientSession:DeprecationWarning")


@pytest.fixture
async def sdk(gemini_server: LoopbackGemini) -> AsyncIterator[AsyncClient]:
    """The official async client, pointed at the loopback server (paths as the real API's)."""
    options = types.HttpOptions(base_url=gemini_server.url, api_version="v1beta")
    client = genai.Client(api_key="k", http_options=options).aio
    yield client
    await client.aclose()


def camel_structure(body: Any) -> Any:
    """The SDK spells two structural keys in snake_case (the API accepts both spellings); user data
    (arguments, schemas) is left alone."""
    if isinstance(body, list):
        return [camel_structure(item) for item in body]
    if not isinstance(body, dict):
        return body
    renames = {"mime_type": "mimeType", "parameters_json_schema": "parametersJsonSchema"}
    return {
        renames.get(key, key): value if key in ("args", "parameters_json_schema") else camel_structure(value)
        for key, value in body.items()
    }


@sdk_warnings
async def test_our_request_is_what_the_sdk_sends_for_the_same_conversation(
    gemini_server: LoopbackGemini, sdk: AsyncClient
) -> None:
    gemini_server.replies.append(json_reply(orjson.dumps(FINAL_CHUNK)))
    signature = base64.urlsafe_b64decode(FOREIGN_SIGNATURE)
    contents = [
        types.Content(
            role="user",
            parts=[
                types.Part(text="Weather in Tokyo?"),
                types.Part.from_bytes(data=base64.b64decode("iVBORw=="), mime_type="image/png"),
            ],
        ),
        types.Content(
            role="model",
            parts=[
                types.Part(text="Let me look."),
                types.Part(
                    function_call=types.FunctionCall(name="getWeather", args={"location": "Tokyo"}),
                    thought_signature=signature,
                ),
            ],
        ),
        types.Content(
            role="user",
            parts=[types.Part.from_function_response(name="getWeather", response={"output": "sunny"})],
        ),
    ]
    config = types.GenerateContentConfig(
        system_instruction="be brief",
        max_output_tokens=100,
        temperature=0.5,
        top_p=0.9,
        stop_sequences=["END"],
        tools=[
            types.Tool(
                function_declarations=[
                    types.FunctionDeclaration(
                        name="getWeather",
                        description="Current weather",
                        parameters_json_schema=WEATHER_SCHEMA,
                    )
                ]
            )
        ],
        tool_config=types.ToolConfig(
            function_calling_config=types.FunctionCallingConfig(mode="ANY", allowed_function_names=["getWeather"])
        ),
    )
    await sdk.models.generate_content(model="gemini-2.5-flash", contents=contents, config=config)
    sdk_path, sdk_headers, sdk_body = gemini_server.requests[0]

    request = ChatRequest(
        messages=weather_conversation(),
        system="be brief",
        max_tokens=100,
        temperature=0.5,
        top_p=0.9,
        stop=["END"],
        tools=[ToolSpec("getWeather", "Current weather", WEATHER_SCHEMA)],
        tool_choice="getWeather",
    )
    adapter = offline_adapter("http://sdk.invalid")
    assert orjson.loads(orjson.dumps(adapter.encode_request(request, "gemini-2.5-flash", False))) == camel_structure(
        sdk_body
    )
    assert adapter.url("gemini-2.5-flash", stream=False) == f"http://sdk.invalid{sdk_path}"
    assert adapter.auth_headers("k") == {"x-goog-api-key": sdk_headers["x-goog-api-key"]}


@sdk_warnings
async def test_the_sdk_and_our_decoder_read_the_real_answer_alike(
    gemini_server: LoopbackGemini, sdk: AsyncClient
) -> None:
    gemini_server.replies.append(json_reply(orjson.dumps(FINAL_CHUNK)))
    sdk_answer = await sdk.models.generate_content(model="gemini-2.5-flash", contents="hi")
    ours = offline_adapter().decode_response(copy.deepcopy(FINAL_CHUNK))

    assert sdk_answer.function_calls is not None
    assert [(call.name, call.args) for call in sdk_answer.function_calls] == [
        (part.name, part.arguments) for part in ours.parts if isinstance(part, ToolCall)
    ]
    assert sdk_answer.candidates and sdk_answer.candidates[0].finish_reason == types.FinishReason.STOP
    usage = sdk_answer.usage_metadata
    assert usage is not None
    assert ours.usage.input_tokens == usage.prompt_token_count
    assert ours.usage.output_tokens == (usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0)
    assert ours.model == sdk_answer.model_version


@sdk_warnings
async def test_the_sdk_and_our_stream_decoder_read_the_real_stream_alike(
    gemini_server: LoopbackGemini, sdk: AsyncClient
) -> None:
    text_stream = chunk(text_chunk("Hel"), eol="\r\n") + chunk(
        text_chunk("lo", "STOP", {"promptTokenCount": 4, "candidatesTokenCount": 2}), eol="\r\n"
    )
    for body in (STREAM_FIXTURE, text_stream):
        gemini_server.replies.append(sse_reply(body))
        stream = await sdk.models.generate_content_stream(model="g", contents="hi")
        sdk_chunks = [item async for item in stream]
        events, finished = decode_all(offline_adapter(), body)
        assert finished
        assert "".join(item.text or "" for item in sdk_chunks) == "".join(
            event.text for event in events if isinstance(event, TextDelta)
        )
        sdk_calls = [(call.name, call.args) for item in sdk_chunks for call in item.function_calls or []]
        starts = [event for event in events if isinstance(event, ToolCallStart)]
        deltas = [orjson.loads(event.arguments) for event in events if isinstance(event, ToolCallDelta)]
        assert sdk_calls == [(start.name, args) for start, args in zip(starts, deltas, strict=True)]
        last_usage = sdk_chunks[-1].usage_metadata
        end = events[-1]
        assert isinstance(end, StreamEnd) and last_usage is not None
        assert end.usage.input_tokens == last_usage.prompt_token_count
