"""The OpenAI adapter and app codec: wire codecs on real captures, the HTTP exchange against a loopback
server misbehaving the ways OpenAI (and what sits in front of it) does, and what the `/openai` endpoint
writes checked by the official `openai` SDK, its stream iterator and its stream helper."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletion, ChatCompletionMessageFunctionToolCall

from llmroute_sidecar.errors import ClientError, FailoverError, RequestError, RetryableError, UpstreamError
from llmroute_sidecar.messages import (
    ChatRequest,
    ChatResponse,
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
    Usage,
)
from llmroute_sidecar.policy import Provider
from llmroute_sidecar.providers.base import AttemptTimeouts, StreamFrame
from llmroute_sidecar.providers.openai import (
    RAW_ARGUMENTS_KEY,
    OpenAIAdapter,
    OpenAIStreamDecoder,
    error_details,
    ratelimit_reset,
)
from llmroute_sidecar.providers.openai_app import OpenAIAppCodec, OpenAIStreamEncoder
from llmroute_sidecar.sse import SseEvent, SseParser

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "providers"
if not FIXTURES.is_dir():  # a checkout carrying its own copy
    FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "providers"
TIMEOUTS = AttemptTimeouts(first_byte=2.0, idle=2.0)
SSE_HEADERS = {"Content-Type": "text/event-stream"}
CODEC = OpenAIAppCodec()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def offline_adapter() -> OpenAIAdapter:
    """An adapter for codec tests: the session is never used."""
    return OpenAIAdapter(Provider(name="gpt", type="openai"), None, "sk-test")  # type: ignore[arg-type]


def decoder() -> OpenAIStreamDecoder:
    return OpenAIStreamDecoder(offline_adapter().classify)


def decode_all(raw: bytes, dec: OpenAIStreamDecoder | None = None) -> list[StreamEvent]:
    dec = dec or decoder()
    return [event for sse in SseParser().feed(raw) for event in dec.decode(sse)]


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    return orjson.dumps(body).decode()


def sse(data: str) -> SseEvent:
    return SseEvent("message", data)


def completion(message: dict[str, Any], finish: str = "stop", **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
        **extra,
    }


def user(text: str) -> Message:
    return Message("user", [Text(text)])


# ----- the stream decoder on real captures ----------------------------------------------------------
def test_decoder_reads_the_include_usage_capture() -> None:
    dec = decoder()
    events = decode_all(fixture("openai_chat_stream_include_usage.sse"), dec)
    assert events == [
        StreamStart("gpt-4o", Usage()),
        TextDelta("Hel"),
        TextDelta("lo"),
        StreamEnd("end_turn", Usage(12, 3)),
    ]
    assert dec.finished()


def test_decoder_is_not_finished_before_done() -> None:
    dec = decoder()
    raw = fixture("openai_chat_stream_include_usage.sse").split(b"data: [DONE]")[0]
    decode_all(raw, dec)
    assert not dec.finished()  # finish_reason and usage seen, but no [DONE]: not a clean end


def test_decoder_streams_tool_calls_by_index() -> None:
    dec = decoder()
    events = [
        e
        for data in (
            chunk({"role": "assistant", "content": None}),
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_a",
                            "type": "function",
                            "function": {"name": "weather", "arguments": ""},
                        }
                    ]
                }
            ),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": 1,
                            "id": "call_b",
                            "type": "function",
                            "function": {"name": "time", "arguments": "{}"},
                        }
                    ]
                }
            ),
            chunk({}, "tool_calls"),
            orjson.dumps(
                {"id": "chatcmpl-1", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7}}
            ).decode(),
            "[DONE]",
        )
        for e in dec.decode(sse(data))
    ]
    assert events == [
        StreamStart("gpt-4o", Usage()),
        ToolCallStart(0, "call_a", "weather"),
        ToolCallDelta(0, '{"city": '),
        ToolCallDelta(0, '"Paris"}'),
        ToolCallStart(1, "call_b", "time"),
        ToolCallDelta(1, "{}"),
        StreamEnd("tool_use", Usage(5, 7)),
    ]


def test_decoder_accepts_tool_calls_without_index_from_compatible_servers() -> None:
    dec = decoder()
    dec.decode(sse(chunk({"role": "assistant"})))
    first = dec.decode(sse(chunk({"tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{"}}]})))
    more = dec.decode(sse(chunk({"tool_calls": [{"function": {"arguments": "}"}}]})))
    second = dec.decode(sse(chunk({"tool_calls": [{"id": "b", "function": {"name": "g", "arguments": "{}"}}]})))
    assert first == [ToolCallStart(0, "a", "f"), ToolCallDelta(0, "{")]
    assert more == [ToolCallDelta(0, "}")]
    assert second == [ToolCallStart(1, "b", "g"), ToolCallDelta(1, "{}")]


@pytest.mark.parametrize(
    ("finish", "delta", "stop"),
    [
        ("length", {"content": "x"}, "max_tokens"),
        ("content_filter", {"content": "x"}, "refusal"),  # a filtered answer is an answer (U16)
        ("stop", {"refusal": "I can't help with that."}, "refusal"),
        ("something_new", {"content": "x"}, "other"),
    ],
)
def test_decoder_maps_finish_reasons(finish: str, delta: dict[str, Any], stop: str) -> None:
    dec = decoder()
    dec.decode(sse(chunk(delta, finish)))
    assert dec.decode(sse("[DONE]")) == [StreamEnd(stop, Usage())]  # type: ignore[arg-type]


def test_decoder_raises_in_band_errors_as_routing_decisions() -> None:
    def raised(error: dict[str, Any]) -> UpstreamError:
        with pytest.raises(UpstreamError) as caught:
            decoder().decode(sse(orjson.dumps({"error": error}).decode()))
        return caught.value

    server = raised({"message": "The server had an error", "type": "server_error", "param": None, "code": None})
    assert isinstance(server, RetryableError)
    assert (server.status, server.dialect) == (500, "openai")
    assert orjson.loads(server.body or b"")["error"]["type"] == "server_error"
    assert isinstance(
        raised({"message": "quota", "type": "insufficient_quota", "code": "insufficient_quota"}),
        FailoverError,
    )
    assert isinstance(
        raised({"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}), FailoverError
    )  # a 429 with no retry-after in a stream: the next target
    assert isinstance(raised({"message": "bad", "type": "invalid_request_error"}), ClientError)
    assert isinstance(raised({"message": "who knows"}), RetryableError)


def test_decoder_tolerates_unknown_events_and_rejects_bad_json() -> None:
    dec = decoder()
    assert dec.decode(SseEvent("future_event", "{not json")) == []
    with pytest.raises(ValueError):
        dec.decode(sse('{"id": "chatcmpl-1", "choi'))
    with pytest.raises(ValueError):
        dec.decode(sse("[1, 2]"))
    assert not dec.finished()


# ----- error envelopes ------------------------------------------------------------------------------
def test_context_length_capture_is_a_client_error_relayed_verbatim() -> None:
    raw = fixture("openai_error_context_length_400.json")
    kind, message, claimed = error_details(orjson.loads(raw))
    assert kind == "context_length_exceeded"
    assert message is not None and message.startswith("This model's maximum context length")
    assert claimed is None
    error = offline_adapter().classify(400, {"Content-Type": "application/json"}, raw)
    assert isinstance(error, ClientError)
    assert (error.status, error.error_type, error.body, error.dialect) == (
        400,
        "context_length_exceeded",
        raw,
        "openai",
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {"error": {"message": "m", "type": "insufficient_quota", "code": "insufficient_quota"}},
            ("insufficient_quota", "m", None),
        ),
        ({"error": {"message": "m", "type": "server_error", "code": None}}, ("server_error", "m", None)),
        # Gemini's OpenAI-compatible endpoint: a list around a Google-style error
        (
            [{"error": {"code": 429, "message": "m", "status": "RESOURCE_EXHAUSTED"}}],
            ("RESOURCE_EXHAUSTED", "m", 429),
        ),
        (
            {"object": "error", "message": "m", "type": "BadRequestError", "code": 400},  # vLLM
            ("BadRequestError", "m", 400),
        ),
        ({"error": "plain text"}, (None, "plain text", None)),
        ({"detail": "nothing we know"}, (None, None, None)),
        ("not even an object", (None, None, None)),
    ],
)
def test_error_details_reads_openai_and_compatible_envelopes(body: Any, expected: tuple[Any, ...]) -> None:
    assert error_details(body) == expected


def test_ratelimit_headers_capture_gives_the_reset_of_the_exhausted_window() -> None:
    headers = orjson.loads(fixture("openai_ratelimit_headers_example.json"))
    assert ratelimit_reset(headers) == pytest.approx(0.012)  # nothing exhausted: the longer reset
    exhausted = {**headers, "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "6m0s"}
    assert ratelimit_reset(exhausted) == pytest.approx(360.0)
    assert ratelimit_reset({"x-ratelimit-reset-requests": "soon"}) is None
    assert ratelimit_reset({}) is None


def test_429_without_retry_after_retries_when_the_reset_headers_say_when() -> None:
    headers = {
        "Content-Type": "application/json",
        **orjson.loads(fixture("openai_ratelimit_headers_example.json")),
    }
    body = orjson.dumps({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}})
    error = offline_adapter().classify(429, headers, body)
    assert isinstance(error, RetryableError)
    assert error.retry_after == pytest.approx(0.012)
    assert error.error_type == "rate_limit_exceeded"
    bare = offline_adapter().classify(429, {"Content-Type": "application/json"}, body)
    assert isinstance(bare, FailoverError)  # no hint at all: don't spin on this target (U12)
    quota = orjson.dumps({"error": {"message": "quota", "type": "insufficient_quota", "code": "insufficient_quota"}})
    assert isinstance(offline_adapter().classify(429, headers, quota), FailoverError)


# ----- request encoding -----------------------------------------------------------------------------
APP_BODY: dict[str, Any] = {
    "model": "gpt-4o",
    "messages": [
        {"role": "developer", "content": "Be terse."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "hi"},
                {"type": "input_audio", "input_audio": {"data": "AAA", "format": "wav"}},
            ],
        },
    ],
    "max_completion_tokens": 50,
    "stream_options": {"include_obfuscation": False},
    "logit_bias": {"50256": -100},
    "n": 2,
}


def test_native_pass_through_keeps_the_app_body_and_changes_only_what_it_must() -> None:
    app = copy.deepcopy(APP_BODY)
    request = CODEC.decode_request(app)
    request.system_override = "Answer in French."
    request.extra = {"max_tokens": 20, "seed": 7}
    body = offline_adapter().encode_request(request, "gpt-4.1-mini", stream=True)
    assert body["model"] == "gpt-4.1-mini"
    assert body["messages"] == [
        {"role": "developer", "content": "Answer in French."},
        APP_BODY["messages"][1],
    ]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    assert body["max_completion_tokens"] == 20 and "max_tokens" not in body  # the name the app used
    assert (body["seed"], body["n"], body["logit_bias"]) == (7, 2, {"50256": -100})
    assert app == APP_BODY  # the app's body is never mutated (it is replayed on retries)


def test_native_pass_through_applies_the_targets_generation_params() -> None:
    request = CODEC.decode_request({**APP_BODY, "temperature": 1, "stop": "END"})
    untouched = offline_adapter().encode_request(request, "gpt-4o", stream=False)
    assert (untouched["max_completion_tokens"], untouched["temperature"]) == (50, 1.0)
    assert "max_tokens" not in untouched
    request.max_tokens, request.temperature, request.stop = 30, 0.2, ["STOP"]  # what apply_params does
    body = offline_adapter().encode_request(request, "gpt-4o", stream=False)
    assert (body["max_completion_tokens"], body["temperature"], body["stop"]) == (30, 0.2, ["STOP"])


def test_what_the_neutral_form_cannot_carry_is_named_and_refused_elsewhere() -> None:
    request = CODEC.decode_request(copy.deepcopy(APP_BODY))
    assert request.lossy == ["OpenAI input_audio content part", "n > 1 (several choices)"]
    other = CODEC.decode_request(
        {
            "model": "m",
            "messages": [{"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
            "tools": [{"type": "custom", "custom": {"name": "grammar"}}],
            "logprobs": True,
        }
    )
    assert other.lossy == ["OpenAI custom tool", "logprobs", "response_format json_schema"]
    plain = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "text"}}
    assert CODEC.decode_request(plain).lossy == []
    # A target of another dialect refuses; this adapter refuses another dialect's losses the same way.
    foreign = ChatRequest([user("hi")], native=NativeBody("anthropic", {}), lossy=["Anthropic document block"])
    assert offline_adapter().untranslatable(foreign) == "cannot translate Anthropic document block"


def test_native_non_stream_drops_stream_options_and_keeps_the_system_prompt() -> None:
    request = CODEC.decode_request({**APP_BODY, "stream": True})
    body = offline_adapter().encode_request(request, "gpt-4o", stream=False)
    assert body["stream"] is False and "stream_options" not in body
    assert body["messages"] == APP_BODY["messages"]
    assert body["messages"] is APP_BODY["messages"]  # untouched: no copy needed


def test_translated_request_speaks_chat_completions() -> None:
    request = ChatRequest(
        messages=[
            Message(
                "user",
                [
                    Text("What's the weather?"),
                    Image("image/png", data="iVBOR"),
                    Image("image/jpeg", url="https://example.com/a.jpg"),
                ],
            ),
            Message("assistant", [Text("Checking."), ToolCall("toolu_1", "weather", {"city": "Paris"})]),
            Message("user", [ToolResult("toolu_1", "sunny", name="weather"), Text("And tomorrow?")]),
        ],
        system="You are a weather bot.",
        system_override="Short answers.",
        max_tokens=100,
        temperature=0.2,
        top_p=0.9,
        stop=["END"],
        tools=[ToolSpec("weather", "Current weather", {"type": "object", "properties": {"city": {}}})],
        tool_choice="any",
        extra={"seed": 1},
    )
    body = offline_adapter().encode_request(request, "gpt-4o", stream=True)
    assert body == {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "Short answers."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What's the weather?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
                ],
            },
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
            {"role": "user", "content": "And tomorrow?"},
        ],
        "max_tokens": 100,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop": ["END"],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "weather",
                    "description": "Current weather",
                    "parameters": {"type": "object", "properties": {"city": {}}},
                },
            }
        ],
        "tool_choice": "required",
        "seed": 1,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


@pytest.mark.parametrize(
    ("neutral", "wire"),
    [
        ("auto", "auto"),
        ("none", "none"),
        ("any", "required"),
        ("weather", {"type": "function", "function": {"name": "weather"}}),
    ],
)
def test_tool_choice_translation(neutral: str, wire: Any) -> None:
    request = ChatRequest([user("hi")], tools=[ToolSpec("weather", None, {"type": "object"})], tool_choice=neutral)
    assert offline_adapter().encode_request(request, "m", stream=False)["tool_choice"] == wire
    request.tools = []  # OpenAI refuses a tool_choice without tools
    assert "tool_choice" not in offline_adapter().encode_request(request, "m", stream=False)


def test_an_assistant_turn_with_only_tool_calls_has_null_content() -> None:
    request = ChatRequest([user("hi"), Message("assistant", [ToolCall("c1", "f", {})])])
    message = offline_adapter().encode_request(request, "m", stream=False)["messages"][1]
    assert message == {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    }


def test_untranslatable_requests_are_refused_with_a_reason() -> None:
    adapter = offline_adapter()
    assert adapter.untranslatable(ChatRequest([user("hi")])) is None
    assert "prefill" in (adapter.untranslatable(ChatRequest([user("hi")], prefill="Once upon")) or "")
    with_image = ChatRequest([user("hi"), Message("assistant", [Image("image/png", data="x")])])
    assert "assistant" in (adapter.untranslatable(with_image) or "")
    # The app's own OpenAI body goes through as sent, whatever it holds.
    assert adapter.untranslatable(CODEC.decode_request(copy.deepcopy(APP_BODY))) is None
    assert adapter.supports_prefill is False


# ----- response decoding ----------------------------------------------------------------------------
def test_decode_response_reads_text_tool_calls_finish_and_usage() -> None:
    body = completion(
        {
            "content": "Let me check.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city":"Oslo"}'},
                },
                {"id": "call_2", "type": "function", "function": {"name": "time", "arguments": ""}},
                {
                    "id": "call_3",
                    "type": "function",
                    "function": {"name": "bad", "arguments": '{"city": "Os'},
                },
            ],
        },
        finish="tool_calls",
    )
    response = offline_adapter().decode_response(body)
    assert response.parts == [
        Text("Let me check."),
        ToolCall("call_1", "weather", {"city": "Oslo"}),
        ToolCall("call_2", "time", {}),
        ToolCall("call_3", "bad", {RAW_ARGUMENTS_KEY: '{"city": "Os'}),
    ]
    assert (response.stop_reason, response.usage, response.model) == (
        "tool_use",
        Usage(9, 4),
        "gpt-4o-2024-08-06",
    )
    assert response.native == NativeBody("openai", body)


@pytest.mark.parametrize(
    ("message", "finish", "stop", "text"),
    [
        ({"content": "done"}, "stop", "end_turn", "done"),
        ({"content": "cut"}, "length", "max_tokens", "cut"),
        ({"content": None}, "content_filter", "refusal", ""),
        (
            {"content": None, "refusal": "I can't help with that."},
            "stop",
            "refusal",
            "I can't help with that.",
        ),
        (
            {"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            "stop",
            "end_turn",
            "ab",
        ),
    ],
)
def test_decode_response_stop_reasons(message: dict[str, Any], finish: str, stop: str, text: str) -> None:
    response = offline_adapter().decode_response(completion(message, finish))
    assert (response.stop_reason, response.text) == (stop, text)


@pytest.mark.parametrize(
    "body", [{}, {"choices": []}, {"choices": [{"index": 0}]}, {"choices": "x"}, {"error": {"message": "m"}}]
)
def test_decode_response_rejects_bodies_without_a_message(body: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        offline_adapter().decode_response(body)


# ----- the app codec: requests ----------------------------------------------------------------------
def test_decode_request_builds_the_neutral_conversation() -> None:
    body = {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "One."},
            {"role": "developer", "content": [{"type": "text", "text": "Two."}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Look"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/webp;base64,UklGR", "detail": "low"},
                    },
                    {"type": "image_url", "image_url": {"url": "https://x.test/cat.png?s=1"}},
                    {"type": "file", "file": {"file_id": "file-1"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "zoom", "arguments": '{"x": 2}'}},
                    {"id": "c2", "type": "function", "function": {"name": "crop", "arguments": "{}"}},
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "zoomed"},
            {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "cropped"}]},
            {"role": "user", "content": "Thanks"},
            {"role": "function", "name": "legacy", "content": "ignored"},
        ],
        "max_tokens": 64,
        "temperature": 1,
        "stop": "END",
        "tools": [
            {
                "type": "function",
                "function": {"name": "zoom", "description": "Zoom in", "parameters": {"type": "object"}},
            },
            {"type": "function", "function": {"name": "crop"}},
            {"type": "custom", "custom": {"name": "grammar"}},
        ],
        "tool_choice": "required",
    }
    request = CODEC.decode_request(body)
    assert request.system == "One.\n\nTwo."
    assert request.messages == [
        Message(
            "user",
            [
                Text("Look"),
                Image("image/webp", data="UklGR"),
                Image("image/png", url="https://x.test/cat.png?s=1"),
            ],
        ),
        Message("assistant", [ToolCall("c1", "zoom", {"x": 2}), ToolCall("c2", "crop", {})]),
        Message(
            "user",
            [
                ToolResult("c1", "zoomed", name="zoom"),
                ToolResult("c2", "cropped", name="crop"),
                Text("Thanks"),
            ],
        ),
    ]
    assert (request.max_tokens, request.temperature, request.stop) == (64, 1.0, ["END"])
    assert request.tools == [
        ToolSpec("zoom", "Zoom in", {"type": "object"}),
        ToolSpec("crop", None, {"type": "object", "properties": {}}),
    ]
    assert request.tool_choice == "any"
    assert request.native == NativeBody("openai", body)


@pytest.mark.parametrize(
    ("choice", "neutral"),
    [
        ("auto", "auto"),
        ("none", "none"),
        ({"type": "function", "function": {"name": "f"}}, "f"),
        ({"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}, None),
        (None, None),
    ],
)
def test_decode_request_tool_choice(choice: Any, neutral: str | None) -> None:
    body = {"model": "m", "messages": [], "tool_choice": choice}
    assert CODEC.decode_request(body).tool_choice == neutral


@pytest.mark.parametrize(
    "body",
    [
        {"messages": []},
        {"model": 4, "messages": []},
        {"model": "m", "messages": [], "stream": "yes"},
        {"model": "m", "messages": {"role": "user"}},
        {"model": "m"},
    ],
)
def test_decode_request_refuses_only_what_the_sidecar_must_parse(body: dict[str, Any]) -> None:
    with pytest.raises(RequestError) as caught:
        CODEC.decode_request(body)
    assert caught.value.status == 400


def test_decode_request_forwards_odd_but_parseable_bodies() -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}, {"role": "alien"}],
        "max_tokens": "lots",
        "temperature": "hot",
        "tools": "all",
        "stop": [1, "x"],
    }
    request = CODEC.decode_request(body)  # the provider is the schema authority (HOSTILE D2)
    assert request.messages == [Message("user", [Text("hi")])]
    assert request.lossy == ["OpenAI alien message"]  # forwarded as sent, never translated without it
    assert (request.max_tokens, request.temperature, request.tools, request.stop) == (None, None, [], ["x"])


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([{"role": "user", "content": 5}], "messages[0].content: must be a string, null or a list of content parts"),
        (["hi"], "messages[0]: must be an object"),
        ([{"content": "hi"}], "messages[0].role: must be a string"),
        ([{"role": "user", "content": [5]}], "messages[0].content[0]: must be a content part"),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages[0].content[0].text: must be a string"),
    ],
)
def test_decode_request_refuses_messages_no_chat_completions_api_can_read(
    messages: list[Any], problem: str
) -> None:
    with pytest.raises(RequestError) as raised:
        CODEC.decode_request({"model": "m", "messages": messages})
    assert raised.value.status == 400 and raised.value.message.startswith(problem)


messages_strategy = st.lists(
    st.tuples(st.sampled_from(["user", "assistant"]), st.text(min_size=1, max_size=40)),
    min_size=1,
    max_size=6,
)


@settings(max_examples=80, deadline=None)
@given(system=st.one_of(st.none(), st.text(min_size=1, max_size=40)), turns=messages_strategy)
def test_translation_round_trip_loses_no_text(system: str | None, turns: list[tuple[str, str]]) -> None:
    body: dict[str, Any] = {
        "model": "m",
        "messages": [{"role": role, "content": text} for role, text in turns],
    }
    if system is not None:
        body["messages"].insert(0, {"role": "system", "content": system})
    request = CODEC.decode_request(body)
    request.native = None  # force the translated path
    wire = offline_adapter().encode_request(request, "m", stream=False)
    again = CODEC.decode_request(wire)
    assert again.system == request.system

    def shape(messages: list[Message]) -> list[tuple[str, str]]:
        return [(m.role, "".join(p.text for p in m.parts if isinstance(p, Text))) for m in messages]

    assert shape(again.messages) == shape(request.messages)
    texts = [text for _, text in turns]
    assert "".join(p.text for m in again.messages for p in m.parts if isinstance(p, Text)) == "".join(texts)


# ----- the app codec: responses ---------------------------------------------------------------------
def neutral_answer(stop: str = "tool_use") -> ChatResponse:
    return ChatResponse(
        parts=[Text("Checking "), Text("now."), ToolCall("toolu_9", "weather", {"city": "Rome"})],
        stop_reason=stop,  # type: ignore[arg-type]
        usage=Usage(20, 8),
        model="claude-sonnet-4-5",
    )


def test_translated_answer_is_a_valid_chat_completion() -> None:
    body = CODEC.encode_response(neutral_answer(), "gpt-4o")
    parsed = ChatCompletion.model_validate(body)
    choice = parsed.choices[0]
    assert choice.message.content == "Checking now."
    assert choice.finish_reason == "tool_calls"
    calls = [c for c in choice.message.tool_calls or [] if isinstance(c, ChatCompletionMessageFunctionToolCall)]
    assert [(c.id, c.function.name, orjson.loads(c.function.arguments)) for c in calls] == [
        ("toolu_9", "weather", {"city": "Rome"})
    ]
    assert parsed.usage is not None
    assert (parsed.usage.prompt_tokens, parsed.usage.completion_tokens, parsed.usage.total_tokens) == (
        20,
        8,
        28,
    )
    assert parsed.model == "claude-sonnet-4-5"  # what really answered


@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("refusal", "content_filter"),
        ("other", "stop"),
    ],
)
def test_translated_finish_reasons(stop: str, finish: str) -> None:
    response = ChatResponse([Text("x")], stop, Usage(), "")  # type: ignore[arg-type]
    parsed = ChatCompletion.model_validate(CODEC.encode_response(response, "gpt-4o"))
    assert (parsed.choices[0].finish_reason, parsed.model) == (finish, "gpt-4o")


def test_same_dialect_answer_is_relayed_as_received() -> None:
    body = completion({"content": "hi"}, system_fingerprint="fp_1", service_tier="default")
    response = offline_adapter().decode_response(body)
    assert CODEC.encode_response(response, "gpt-4o") is body


def test_error_body_is_openai_shaped() -> None:
    assert CODEC.error_body(529, "overloaded_error", "Overloaded") == {
        "error": {"message": "Overloaded", "type": "server_error", "param": None, "code": None}
    }
    assert CODEC.error_body(400, "invalid_request_error", "bad")["error"]["type"] == "invalid_request_error"


# ----- the app codec: stream encoder ----------------------------------------------------------------
TOOL_STREAM: list[StreamEvent] = [
    StreamStart("claude-sonnet-4-5", Usage(20, 1)),
    TextDelta("Checking "),
    TextDelta("now."),
    ToolCallStart(0, "toolu_9", "weather"),
    ToolCallDelta(0, '{"city": '),
    ToolCallDelta(0, '"Rome"}'),
    StreamEnd("tool_use", Usage(20, 8)),
]


def frames_data(raw: bytes) -> list[str]:
    return [event.data for event in SseParser().feed(raw)]


def test_encoder_writes_chunks_then_usage_only_when_asked_then_done() -> None:
    encoder = OpenAIStreamEncoder("gpt-4o")
    plain = b"".join(encoder.encode(e) for e in TOOL_STREAM)
    data = frames_data(plain)
    assert data[-1] == "[DONE]"
    chunks = [orjson.loads(d) for d in data[:-1]]
    assert all(c["choices"] for c in chunks)  # apps index choices[0]: never an empty list unasked
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "tool_calls",
    }
    with_usage = frames_data(b"".join(OpenAIStreamEncoder("gpt-4o", include_usage=True).encode(e) for e in TOOL_STREAM))
    assert orjson.loads(with_usage[-2])["usage"] == {
        "prompt_tokens": 20,
        "completion_tokens": 8,
        "total_tokens": 28,
    }
    assert orjson.loads(with_usage[-2])["choices"] == []


def test_stream_encoder_reads_the_apps_usage_wish_from_its_body() -> None:
    asked = CODEC.decode_request(
        {"model": "m", "messages": [], "stream": True, "stream_options": {"include_usage": True}}
    )
    not_asked = CODEC.decode_request({"model": "m", "messages": [], "stream": True})
    encoded = [
        CODEC.stream_encoder("m", request).encode(StreamEnd("end_turn", Usage(1, 2)))
        for request in (asked, not_asked, None)
    ]
    assert [b'"usage"' in raw for raw in encoded] == [True, False, False]


def relay_capture(encoder: OpenAIStreamEncoder) -> bytes:
    dec = decoder()
    out = b""
    for event in SseParser().feed(fixture("openai_chat_stream_include_usage.sse")):
        out += encoder.relay(StreamFrame(dec.decode(event), event))
    return out


def test_relay_passes_chunks_through_and_drops_the_usage_chunk_the_app_did_not_ask_for() -> None:
    capture = frames_data(fixture("openai_chat_stream_include_usage.sse"))
    assert frames_data(relay_capture(OpenAIStreamEncoder("gpt-4o", include_usage=True))) == capture
    assert frames_data(relay_capture(OpenAIStreamEncoder("gpt-4o"))) == capture[:2] + capture[3:]
    named = OpenAIStreamEncoder("m").relay(StreamFrame([], SseEvent("keepalive", "{}")))
    assert named == b"event: keepalive\ndata: {}\n\n"


def test_relay_then_encode_continues_the_same_stream() -> None:
    encoder = OpenAIStreamEncoder("gpt-4o")
    dec = decoder()
    out = b""
    first = [
        chunk({"role": "assistant", "content": "Hel"}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "f", "arguments": "{}"},
                    }
                ]
            }
        ),
    ]
    for data in first:
        out += encoder.relay(StreamFrame(dec.decode(sse(data)), sse(data)))
    # the upstream broke; a continuation arrives as neutral events
    continuation: list[StreamEvent] = [
        StreamStart("other-model", Usage()),
        TextDelta("lo"),
        ToolCallStart(0, "call_b", "g"),
        ToolCallDelta(0, "{}"),
        StreamEnd("tool_use", Usage(3, 4)),
    ]
    for event in continuation:
        out += encoder.encode(event)
    chunks = [orjson.loads(d) for d in frames_data(out)[:-1]]
    assert {c["id"] for c in chunks} == {"chatcmpl-1"}
    assert {c["model"] for c in chunks} == {"gpt-4o"}
    assert not any(c["choices"][0]["delta"].get("role") for c in chunks[1:])  # no second start
    indices = [call["index"] for c in chunks for call in c["choices"][0]["delta"].get("tool_calls", [])]
    assert indices == [0, 1, 1]


def test_error_frame_is_openai_shaped() -> None:
    raw = OpenAIStreamEncoder("m").error("overloaded_error", "upstream connection lost")
    assert (
        raw == b'data: {"error":{"message":"upstream connection lost","type":"server_error",'
        b'"param":null,"code":null}}\n\n'
    )


# ----- the HTTP exchange against a loopback server --------------------------------------------------
@contextlib.asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A loopback OpenAI-compatible server; yields (base URL, the requests it received)."""
    received: list[dict[str, Any]] = []

    async def record(request: web.Request) -> web.StreamResponse:
        received.append(
            {
                "path": request.path,
                "headers": dict(request.headers),
                "body": orjson.loads(await request.read()),
            }
        )
        return await handler(request)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", record)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/v1", received
    finally:
        await runner.cleanup()


def json_handler(
    body: bytes | dict[str, Any],
    status: int = 200,
    headers: dict[str, str] | None = None,
    content_type: str = "application/json",
) -> Handler:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)

    async def handle(request: web.Request) -> web.StreamResponse:
        return web.Response(body=raw, status=status, headers={"Content-Type": content_type, **(headers or {})})

    return handle


def sse_handler(raw: bytes, chunk_size: int = 0) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        pieces = [raw[i : i + chunk_size] for i in range(0, len(raw), chunk_size)] if chunk_size else [raw]
        for piece in pieces:
            await response.write(piece)
        await response.write_eof()
        return response

    return handle


def adapter_for(url: str, session: aiohttp.ClientSession) -> OpenAIAdapter:
    return OpenAIAdapter(Provider(name="gpt", type="openai", base_url=url), session, "sk-test")


def request_for(stream: bool = False) -> ChatRequest:
    return CODEC.decode_request({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": stream})


async def call(
    handler: Handler, stream: bool = False, timeouts: AttemptTimeouts = TIMEOUTS
) -> tuple[Any, list[dict[str, Any]]]:
    async with serve(handler) as (url, received), aiohttp.ClientSession() as session:
        adapter = adapter_for(url, session)
        if stream:
            frames = [f async for f in adapter.stream(request_for(True), "gpt-4.1-mini", timeouts)]
            return frames, received
        return await adapter.complete(request_for(), "gpt-4.1-mini", timeouts), received


async def test_complete_success_sends_the_app_body_with_our_key_and_model() -> None:
    response, received = await call(json_handler(completion({"content": "Hello!"})))
    assert isinstance(response, ChatResponse)
    assert (response.text, response.stop_reason, response.usage) == ("Hello!", "end_turn", Usage(9, 4))
    (sent,) = received
    assert sent["path"] == "/v1/chat/completions"
    assert sent["headers"]["Authorization"] == "Bearer sk-test"
    assert sent["body"] == {
        "model": "gpt-4.1-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
    }


async def test_stream_success_yields_frames_and_asks_for_usage() -> None:
    frames, received = await call(sse_handler(fixture("openai_chat_stream_include_usage.sse"), 7), stream=True)
    events = [e for f in frames for e in f.events]
    assert events == [
        StreamStart("gpt-4o", Usage()),
        TextDelta("Hel"),
        TextDelta("lo"),
        StreamEnd("end_turn", Usage(12, 3)),
    ]
    assert received[0]["body"]["stream_options"] == {"include_usage": True}


async def test_429_rate_limit_with_retry_after_is_retryable() -> None:
    body = {
        "error": {
            "message": "Rate limit reached for requests",
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    with pytest.raises(RetryableError) as caught:
        await call(json_handler(body, 429, {"retry-after": "2"}))
    error = caught.value
    assert (error.status, error.condition, error.retry_after, error.error_type) == (
        429,
        429,
        2.0,
        "rate_limit_exceeded",
    )


async def test_429_insufficient_quota_fails_over() -> None:
    body = {
        "error": {
            "message": "You exceeded your current quota",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        }
    }
    with pytest.raises(FailoverError) as caught:
        await call(json_handler(body, 429, {"retry-after": "1"}))
    assert caught.value.error_type == "insufficient_quota"


async def test_400_context_length_is_a_client_error_with_the_raw_body() -> None:
    raw = fixture("openai_error_context_length_400.json")
    with pytest.raises(ClientError) as caught:
        await call(json_handler(raw, 400))
    error = caught.value
    assert (error.status, error.body, error.dialect, error.error_type) == (
        400,
        raw,
        "openai",
        "context_length_exceeded",
    )


async def test_500_is_retryable() -> None:
    body = {"error": {"message": "The server had an error", "type": "server_error", "param": None, "code": None}}
    with pytest.raises(RetryableError) as caught:
        await call(json_handler(body, 500))
    assert (caught.value.status, caught.value.error_type) == (500, "server_error")


async def test_cdn_html_524_is_retryable_and_never_relayed() -> None:
    page = b"<!DOCTYPE html><html><head><title>api.openai.com | 524: A timeout occurred</title></head></html>"
    with pytest.raises(RetryableError) as caught:
        await call(json_handler(page, 524, content_type="text/html; charset=UTF-8"))
    assert "524: A timeout occurred" in caught.value.message
    assert caught.value.body is None


async def test_200_without_choices_is_a_retryable_bad_gateway() -> None:
    with pytest.raises(RetryableError) as caught:
        await call(json_handler({"choices": []}))
    assert caught.value.status == 502


async def test_connection_reset_before_headers_is_retryable() -> None:
    async def reset(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        await asyncio.sleep(1)
        return web.Response()

    with pytest.raises(RetryableError) as caught:
        await call(reset)
    assert caught.value.condition == "connection"


async def test_hang_before_headers_times_out() -> None:
    async def hang(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(10)
        return web.Response()

    with pytest.raises(RetryableError) as caught:
        await call(hang, timeouts=AttemptTimeouts(first_byte=0.3, idle=0.3))
    assert caught.value.condition == "timeout"


async def test_stream_eof_after_the_finish_reason_without_done_is_a_complete_answer() -> None:
    """Several compatible servers omit `[DONE]`: the finish reason and usage arrived, the body ended
    cleanly, so the answer is complete; the adapter adds the `[DONE]` frame the app's SDK expects."""
    complete = fixture("openai_chat_stream_include_usage.sse").split(b"data: [DONE]")[0]
    seen: list[StreamFrame] = []
    async with serve(sse_handler(complete)) as (url, _), aiohttp.ClientSession() as session:
        async for item in adapter_for(url, session).stream(request_for(True), "m", TIMEOUTS):
            seen.append(item)
    assert [e for f in seen for e in f.events][1:] == [
        TextDelta("Hel"), TextDelta("lo"), StreamEnd("end_turn", Usage(12, 3))
    ]
    assert seen[-1].sse.data == "[DONE]"


async def test_stream_eof_before_the_finish_reason_is_retryable() -> None:
    truncated = fixture("openai_chat_stream_include_usage.sse").split(b'"finish_reason":"stop"')[0]
    truncated = truncated[: truncated.rindex(b"\n\n") + 2]  # the whole events before the finish reason
    seen: list[StreamFrame] = []
    async with serve(sse_handler(truncated)) as (url, _), aiohttp.ClientSession() as session:
        with pytest.raises(RetryableError) as caught:
            async for item in adapter_for(url, session).stream(request_for(True), "m", TIMEOUTS):
                seen.append(item)
    assert caught.value.condition == "connection"
    assert [e for f in seen for e in f.events][1:] == [TextDelta("Hel")]


async def test_in_band_error_mid_stream_raises_with_the_error_body() -> None:
    error = {
        "error": {
            "message": "The server had an error while processing your request.",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    raw = (
        f"data: {chunk({'role': 'assistant', 'content': 'Hi'})}\n\n".encode()
        + b"data: "
        + orjson.dumps(error)
        + b"\n\n"
    )
    async with serve(sse_handler(raw)) as (url, _), aiohttp.ClientSession() as session:
        with pytest.raises(RetryableError) as caught:
            async for _ in adapter_for(url, session).stream(request_for(True), "m", TIMEOUTS):
                pass
    assert caught.value.dialect == "openai"
    assert orjson.loads(caught.value.body or b"") == error


async def test_stream_request_answered_with_json_is_classified() -> None:
    body = {"error": {"message": "overloaded", "type": "server_error", "code": None}}
    with pytest.raises(RetryableError) as caught:
        await call(json_handler(body, 200), stream=True)
    assert caught.value.status == 502


# ----- the official SDK reads what the app codec writes ---------------------------------------------
def encoded_stream_handler(events: list[StreamEvent], error_at: int | None = None) -> Handler:
    """Plays the sidecar's `/openai` endpoint: encodes neutral events for whatever the SDK asked."""

    async def handle(request: web.Request) -> web.StreamResponse:
        app_request = CODEC.decode_request(await request.json())
        encoder = CODEC.stream_encoder("gpt-4o", app_request)
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        for position, event in enumerate(events):
            if position == error_at:
                await response.write(encoder.error("api_error", "upstream connection lost"))
                break
            await response.write(encoder.encode(event))
        await response.write_eof()
        return response

    return handle


async def sdk_client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url, api_key="sk-app", max_retries=0)


async def test_sdk_iterates_an_encoded_stream_with_usage() -> None:
    async with serve(encoded_stream_handler(TOOL_STREAM)) as (url, received):
        client = await sdk_client(url)
        stream = await client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "weather?"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        await client.close()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    arguments = "".join(
        call.function.arguments or ""
        for c in chunks
        if c.choices
        for call in c.choices[0].delta.tool_calls or []
        if call.function
    )
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert (text, orjson.loads(arguments), finish) == ("Checking now.", {"city": "Rome"}, ["tool_calls"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    assert received[0]["body"]["stream_options"] == {"include_usage": True}


async def test_sdk_stream_without_usage_never_sees_an_empty_choices_list() -> None:
    async with serve(encoded_stream_handler(TOOL_STREAM)) as (url, _):
        client = await sdk_client(url)
        stream = await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "weather?"}], stream=True
        )
        texts = [c.choices[0].delta.content async for c in stream]  # the common app idiom
        await client.close()
    assert "".join(t or "" for t in texts) == "Checking now."


async def test_sdk_stream_helper_builds_the_final_completion() -> None:
    async with serve(encoded_stream_handler(TOOL_STREAM)) as (url, _):
        client = await sdk_client(url)
        async with client.chat.completions.stream(
            model="gpt-4o",
            messages=[{"role": "user", "content": "weather?"}],
            stream_options={"include_usage": True},
        ) as stream:
            async for _ in stream:
                pass
            final = await stream.get_final_completion()
        await client.close()
    choice = final.choices[0]
    assert choice.message.content == "Checking now."
    assert choice.finish_reason == "tool_calls"
    (tool_call,) = choice.message.tool_calls or []
    assert (tool_call.id, tool_call.function.name, orjson.loads(tool_call.function.arguments)) == (
        "toolu_9",
        "weather",
        {"city": "Rome"},
    )
    assert final.usage is not None
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (20, 8)


async def test_sdk_raises_on_the_error_frame_instead_of_truncating() -> None:
    async with serve(encoded_stream_handler(TOOL_STREAM, error_at=2)) as (url, _):
        client = await sdk_client(url)
        stream = await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        seen: list[str] = []
        with pytest.raises(openai.APIError) as caught:
            async for c in stream:
                seen.append(c.choices[0].delta.content or "")
        await client.close()
    assert "".join(seen) == "Checking "
    assert "upstream connection lost" in caught.value.message


async def test_sdk_reads_a_relayed_upstream_stream() -> None:
    async def relay(request: web.Request) -> web.StreamResponse:
        app_request = CODEC.decode_request(await request.json())
        encoder = CODEC.stream_encoder("gpt-4o", app_request)
        assert isinstance(encoder, OpenAIStreamEncoder)
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        await response.write(relay_capture(encoder))
        await response.write_eof()
        return response

    async with serve(relay) as (url, _):
        client = await sdk_client(url)
        stream = await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        texts = [c.choices[0].delta.content or "" async for c in stream]
        await client.close()
    assert "".join(texts) == "Hello"
