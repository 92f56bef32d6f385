"""The Anthropic adapter and app codec: wire codecs on real captures, the HTTP exchange against a loopback
server misbehaving the ways Anthropic (and the CDN in front of it) does, and what the `/anthropic` endpoint
writes checked by the official `anthropic` SDK's own parsers."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest
from aiohttp import web

from llmroute_sidecar.errors import ClientError, FailoverError, RequestError, RetryableError
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
from llmroute_sidecar.providers.anthropic import AnthropicAdapter, AnthropicStreamDecoder
from llmroute_sidecar.providers.anthropic_app import AnthropicAppCodec, native_losses
from llmroute_sidecar.providers.base import AttemptTimeouts, StreamFrame
from llmroute_sidecar.sse import SseEvent, SseParser

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "providers"
if not FIXTURES.is_dir():  # a checkout carrying its own copy
    FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "providers"
TIMEOUTS = AttemptTimeouts(first_byte=2.0, idle=2.0)
SSE_HEADERS = {"Content-Type": "text/event-stream"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def offline_adapter() -> AnthropicAdapter:
    """An adapter for codec tests: the session is never used."""
    return AnthropicAdapter(Provider(name="claude", type="anthropic"), None, "sk-test")  # type: ignore[arg-type]


def decode_all(raw: bytes, decoder: AnthropicStreamDecoder | None = None) -> list[StreamEvent]:
    decoder = decoder or AnthropicStreamDecoder(offline_adapter())
    events: list[StreamEvent] = []
    for sse in SseParser().feed(raw):
        events.extend(decoder.decode(sse))
    return events


def sse_bytes(*events: tuple[str, dict[str, Any]]) -> bytes:
    return b"".join(b"event: %s\ndata: %s\n\n" % (name.encode(), orjson.dumps(data)) for name, data in events)


def user(text: str) -> Message:
    return Message("user", [Text(text)])


# ----- the stream decoder on real captures ----------------------------------------------------------
def test_decoder_success_capture() -> None:
    decoder = AnthropicStreamDecoder(offline_adapter())
    events = decode_all(fixture("anthropic_stream_success.sse"), decoder)
    assert events == [
        StreamStart("claude-opus-4-6", Usage(25, 1)),
        TextDelta("Hello"),
        TextDelta("!"),
        StreamEnd("end_turn", Usage(25, 15)),
    ]
    assert decoder.finished()


def test_decoder_midstream_overloaded_capture() -> None:
    decoder = AnthropicStreamDecoder(offline_adapter())
    sses = SseParser().feed(fixture("anthropic_stream_midstream_overloaded.sse"))
    assert [e for sse in sses[:3] for e in decoder.decode(sse)] == [
        StreamStart("claude-opus-4-6", Usage(25, 1)),
        TextDelta("Hello"),
    ]
    with pytest.raises(RetryableError) as caught:
        decoder.decode(sses[3])
    error = caught.value
    assert (error.condition, error.status, error.error_type) == (529, 529, "overloaded_error")
    assert "Overloaded" in error.message
    assert error.dialect == "anthropic"
    assert orjson.loads(error.body or b"") == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }
    assert not decoder.finished()


def test_decoder_error_event_types_map_to_routing_decisions() -> None:
    decoder = AnthropicStreamDecoder(offline_adapter())

    def raised(kind: str) -> Exception:
        data = orjson.dumps({"type": "error", "error": {"type": kind, "message": "m"}}).decode()
        with pytest.raises(Exception) as caught:
            decoder.decode(SseEvent("error", data))
        return caught.value

    assert isinstance(raised("api_error"), RetryableError)
    assert isinstance(raised("rate_limit_error"), FailoverError)  # no retry-after in a stream
    assert isinstance(raised("invalid_request_error"), ClientError)
    with pytest.raises(RetryableError) as garbage:
        decoder.decode(SseEvent("error", "not json"))
    assert garbage.value.status == 500


def test_decoder_tool_use_thinking_and_cached_usage() -> None:
    raw = sse_bytes(
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": "claude-x",
                    "usage": {
                        "input_tokens": 10,
                        "cache_read_input_tokens": 100,
                        "cache_creation_input_tokens": 5,
                        "output_tokens": 1,
                    },
                },
            },
        ),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "thinking", "thinking": ""},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "thinking_delta", "thinking": "hmm"},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "signature_delta", "signature": "sig"},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "text_delta", "text": "Let me look."},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 2,
                "content_block": {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {}},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 2,
                "delta": {"type": "input_json_delta", "partial_json": ""},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 2,
                "delta": {"type": "input_json_delta", "partial_json": '{"city": '},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 2,
                "delta": {"type": "input_json_delta", "partial_json": '"Paris"}'},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 2}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 3,
                "content_block": {"type": "tool_use", "id": "toolu_2", "name": "time", "input": {}},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 3,
                "delta": {"type": "input_json_delta", "partial_json": "{}"},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 3}),
        (
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 40}},
        ),
        ("message_stop", {"type": "message_stop"}),
    )
    assert decode_all(raw) == [
        StreamStart("claude-x", Usage(115, 1)),
        TextDelta("Let me look."),
        ToolCallStart(0, "toolu_1", "weather"),
        ToolCallDelta(0, '{"city": '),
        ToolCallDelta(0, '"Paris"}'),
        ToolCallStart(1, "toolu_2", "time"),
        ToolCallDelta(1, "{}"),
        StreamEnd("tool_use", Usage(115, 40)),
    ]


def test_decoder_tolerates_unknown_and_unnamed_events_and_rejects_bad_json() -> None:
    decoder = AnthropicStreamDecoder(offline_adapter())
    assert decoder.decode(SseEvent("future_event", "{not json at all")) == []
    assert decoder.decode(SseEvent("ping", "")) == []
    # Without an `event:` line the data's own type decides.
    unnamed = '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"x"}}'
    assert decoder.decode(SseEvent("message", unnamed)) == [TextDelta("x")]
    with pytest.raises(ValueError):
        decoder.decode(SseEvent("content_block_delta", '{"type": "content_block_delta", "ind'))
    with pytest.raises(RetryableError):
        decoder.decode(SseEvent("message", '{"type":"error","error":{"type":"overloaded_error"}}'))
    decoder.decode(
        SseEvent(
            "message_delta",
            '{"type":"message_delta","delta":{"stop_reason":"refusal"},"usage":{"output_tokens":3}}',
        )
    )
    assert decoder.decode(SseEvent("message_stop", '{"type":"message_stop"}')) == [
        StreamEnd("refusal", Usage(0, 3))
    ]
    assert decoder.finished()


# ----- error envelopes ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "status", "kind", "cls"),
    [
        ("anthropic_error_api_error_500.json", 500, "api_error", RetryableError),
        ("anthropic_error_invalid_request_400.json", 400, "invalid_request_error", ClientError),
        ("anthropic_error_not_found.json", 404, "not_found_error", ClientError),
        ("anthropic_error_overloaded_529.json", 529, "overloaded_error", RetryableError),
    ],
)
def test_error_envelopes(name: str, status: int, kind: str, cls: type[Exception]) -> None:
    adapter = offline_adapter()
    raw = fixture(name)
    error_type, message, _ = adapter.error_details(orjson.loads(raw))
    assert error_type == kind and message
    error = adapter.classify(status, {"Content-Type": "application/json"}, raw)
    assert type(error) is cls
    assert error.body == raw and error.dialect == "anthropic" and error.error_type == kind


def test_overloaded_behind_a_proxy_still_counts_as_529() -> None:
    adapter = offline_adapter()
    raw = fixture("anthropic_error_overloaded_529.json")
    error = adapter.classify(500, {"Content-Type": "application/json"}, raw)
    assert error.condition == 529 and error.status == 500
    assert adapter.error_details(["not", "an", "object"]) == (None, None, None)


# ----- request encoding -----------------------------------------------------------------------------
APP_BODY: dict[str, Any] = {
    "model": "claude-app",
    "max_tokens": 300,
    "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Hi"},
                {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "doc"}},
            ],
        }
    ],
    "thinking": {"type": "enabled", "budget_tokens": 1024},
    "metadata": {"user_id": "u1"},
}


def test_native_pass_through_swaps_model_system_and_adds_extra() -> None:
    original = json.loads(json.dumps(APP_BODY))
    request = AnthropicAppCodec().decode_request(APP_BODY)
    request.extra = {"temperature": 0.2}
    body = offline_adapter().encode_request(request, "claude-target", stream=True)
    assert body["model"] == "claude-target" and body["stream"] is True and body["temperature"] == 0.2
    assert body["messages"] == APP_BODY["messages"] and body["thinking"] == APP_BODY["thinking"]
    assert body["system"] == APP_BODY["system"]
    request.system_override = "Fallback prompt."
    assert offline_adapter().encode_request(request, "m", stream=False)["system"] == "Fallback prompt."
    assert original == APP_BODY  # the app's body is reused by every attempt: never mutated


def test_prefill_is_appended_without_trailing_whitespace() -> None:
    request = AnthropicAppCodec().decode_request(APP_BODY)
    request.prefill = "The answer is \n"
    body = offline_adapter().encode_request(request, "m", stream=True)
    assert body["messages"][-1] == {"role": "assistant", "content": "The answer is"}
    assert len(body["messages"]) == 2 and len(APP_BODY["messages"]) == 1

    # The app's own prefill is extended, so the model continues exactly where the answer stopped.
    for content, expected in [
        ("Answer: (", "Answer: (B) because"),
        ([{"type": "text", "text": "Answer: ("}], [{"type": "text", "text": "Answer: (B) because"}]),
    ]:
        app = {**APP_BODY, "messages": [*APP_BODY["messages"], {"role": "assistant", "content": content}]}
        request = AnthropicAppCodec().decode_request(app)
        request.prefill = "B) because "
        body = offline_adapter().encode_request(request, "m", stream=True)
        assert body["messages"][-1] == {"role": "assistant", "content": expected}
        assert app["messages"][-1]["content"] == content


def test_neutral_request_encoding() -> None:
    request = ChatRequest(
        messages=[
            user("What's the weather in Paris? Here's a photo."),
            Message(
                "user", [Image("image/png", data="iVBORw0KGgo="), Image("image/jpeg", url="https://x/y.jpg")]
            ),
            Message("assistant", [Text(""), ToolCall("call_1", "weather", {"city": "Paris"})]),
            Message("user", [ToolResult("call_1", "18C", name="weather")]),
            Message("user", [ToolResult("call_2", "boom", is_error=True)]),
        ],
        system="App system",
        system_override="Target system",
        temperature=0.5,
        top_p=0.9,
        stop=["END"],
        tools=[
            ToolSpec("weather", "Weather by city", {"type": "object", "properties": {"city": {}}}),
            ToolSpec("noargs", None, {}),
        ],
        tool_choice="weather",
        prefill="It is  ",
        extra={"top_k": 5},
    )
    body = offline_adapter().encode_request(request, "claude-fallback", stream=False)
    assert body == {
        "model": "claude-fallback",
        "stream": False,
        "max_tokens": 4096,
        "system": "Target system",
        "temperature": 0.5,
        "top_p": 0.9,
        "stop_sequences": ["END"],
        "top_k": 5,
        "tools": [
            {
                "name": "weather",
                "description": "Weather by city",
                "input_schema": {"type": "object", "properties": {"city": {}}},
            },
            {"name": "noargs", "input_schema": {"type": "object", "properties": {}}},
        ],
        "tool_choice": {"type": "tool", "name": "weather"},
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What's the weather in Paris? Here's a photo."},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
                    },
                    {"type": "image", "source": {"type": "url", "url": "https://x/y.jpg"}},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": "boom", "is_error": True},
                ],
            },
            {"role": "assistant", "content": "It is"},
        ],
    }


def test_tool_results_lead_their_user_turn_and_tool_choice_needs_tools() -> None:
    request = ChatRequest(
        messages=[
            Message("user", [ToolResult("c1", "ok")]),
            Message("user", [Text("and now?"), ToolResult("c2", "")]),
        ],
        tool_choice="any",
        max_tokens=10,
    )
    body = offline_adapter().encode_request(request, "m", stream=True)
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "c1", "content": "ok"},
                {"type": "tool_result", "tool_use_id": "c2"},
                {"type": "text", "text": "and now?"},
            ],
        }
    ]
    assert "tool_choice" not in body and body["max_tokens"] == 10


def test_untranslatable() -> None:
    adapter = offline_adapter()
    assert adapter.untranslatable(ChatRequest([user("hi")])) is None
    bmp = ChatRequest([Message("user", [Image("image/bmp", data="Qk0=")])])
    assert "image/bmp" in (adapter.untranslatable(bmp) or "")
    bmp.native = NativeBody("anthropic", {"model": "m", "messages": []})
    assert adapter.untranslatable(bmp) is None
    assert adapter.supports_prefill


# ----- response decoding ----------------------------------------------------------------------------
def test_decode_response() -> None:
    body = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [
            {"type": "thinking", "thinking": "...", "signature": "s"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 3,
            "cache_read_input_tokens": 7,
            "cache_creation_input_tokens": None,
            "output_tokens": 9,
        },
    }
    response = offline_adapter().decode_response(body)
    assert response.parts == [Text("Checking."), ToolCall("toolu_1", "weather", {"city": "Paris"})]
    assert (response.stop_reason, response.usage, response.model) == ("tool_use", Usage(10, 9), "claude-x")
    assert response.native == NativeBody("anthropic", body)
    for wire, neutral in [
        ("refusal", "refusal"),
        ("pause_turn", "other"),
        (None, "other"),
        ("model_context_window_exceeded", "max_tokens"),
        ("stop_sequence", "stop_sequence"),
    ]:
        assert offline_adapter().decode_response({**body, "stop_reason": wire}).stop_reason == neutral


@pytest.mark.parametrize(
    "body", [{}, {"content": "text"}, orjson.loads(fixture("anthropic_error_api_error_500.json"))]
)
def test_decode_response_rejects_bodies_without_the_minimal_shape(body: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        offline_adapter().decode_response(body)


# ----- the app-facing request decoder ---------------------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        {"messages": []},
        {"model": 3, "messages": []},
        {"model": "m", "messages": {}},
        {"model": "m", "messages": [], "stream": "yes"},
    ],
)
def test_decode_request_refuses_only_what_the_sidecar_must_parse(body: dict[str, Any]) -> None:
    with pytest.raises(RequestError) as caught:
        AnthropicAppCodec().decode_request(body)
    assert caught.value.status == 400


def test_decode_request_keeps_what_it_cannot_represent_in_native() -> None:
    body = {
        "model": "claude-app",
        "max_tokens": 100,
        "stream": True,
        "temperature": 1,
        "stop_sequences": ["x", 1],
        "system": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}],
        "tools": [
            {"name": "weather", "description": "d", "input_schema": {"type": "object"}},
            {"type": "web_search_20250305", "name": "web_search"},
        ],
        "tool_choice": {"type": "any"},
        "messages": [
            {"role": "user", "content": "hello"},
            {"role": "system", "content": "ignored"},
            {
                "role": "assistant",
                "content": [
                    {"type": "redacted_thinking", "data": "..."},
                    {"type": "tool_use", "id": "t1", "name": "weather", "input": {"city": "Oslo"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t1",
                        "is_error": True,
                        "content": [{"type": "text", "text": "fail"}, {"type": "image", "source": {}}],
                    },
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "AA=="},
                    },
                    {"type": "image", "source": {"type": "url", "url": "https://h/p.webp?x=1"}},
                    {"type": "image", "source": {"type": "file", "file_id": "f"}},
                ],
            },
        ],
    }
    request = AnthropicAppCodec().decode_request(body)
    assert request.native == NativeBody("anthropic", body)
    assert request.system == "A\nB" and request.max_tokens == 100 and request.temperature == 1.0
    assert request.stop == ["x"] and request.tool_choice == "any"
    assert request.tools == [ToolSpec("weather", "d", {"type": "object"})]
    assert request.messages == [
        user("hello"),
        Message("assistant", [ToolCall("t1", "weather", {"city": "Oslo"})]),
        Message(
            "user",
            [
                ToolResult("t1", "fail", is_error=True),
                Image("image/png", data="AA=="),
                Image("image/webp", url="https://h/p.webp?x=1"),
            ],
        ),
    ]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content: must be a string or a list"),
        ({"messages": ["hi"]}, "messages[0]: must be an object"),
        ({"messages": [{"content": "hi"}]}, "messages[0].role: must be a string"),
        ({"messages": [{"role": "user", "content": [None]}]}, "messages[0].content[0]: must be a content block"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text"),
        ({"system": 5, "messages": []}, "system: must be a string or a list of content blocks"),
    ],
)
def test_decode_request_refuses_content_no_messages_api_can_read(body: dict[str, Any], problem: str) -> None:
    """A translation would drop such an item and answer a different question (HOSTILE D2)."""
    with pytest.raises(RequestError) as caught:
        AnthropicAppCodec().decode_request({"model": "m", "max_tokens": 5, **body})
    assert caught.value.status == 400 and caught.value.message.startswith(problem)


def test_unknown_roles_and_block_types_make_a_request_untranslatable_not_shorter() -> None:
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "future_block"}]},
                         {"role": "narrator", "content": "b"}]}
    assert native_losses(body) == ["Anthropic future_block block", "Anthropic narrator message"]


def test_native_losses_name_what_a_translation_would_drop() -> None:
    assert native_losses(APP_BODY) == ["Anthropic document block"]
    body = {
        "tools": [{"type": "web_search_20250305", "name": "web_search"}, {"name": "custom_one"}],
        "messages": [
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "x", "signature": "s"}]},
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": {"type": "file", "file_id": "f"}},
                    {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image", "source": {}}]},
                    {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": "ok"}]},
                ],
            },
        ],
    }
    assert native_losses(body) == [
        "Anthropic image from the Files API",
        "Anthropic server tool web_search",
        "Anthropic tool result with non-text content",
    ]
    assert native_losses({"model": "m", "messages": [{"role": "user", "content": "hi"}]}) == []


# ----- app-facing encoders, checked by the SDK's own types ------------------------------------------
TRANSLATED = ChatResponse(
    parts=[Text("It is sunny."), Text(""), ToolCall("call_9", "weather", {"city": "Paris"})],
    stop_reason="tool_use",
    usage=Usage(12, 34),
    model="gpt-4.1-mini",
    native=NativeBody("openai", {"choices": []}),
)


def test_encoded_response_is_a_valid_sdk_message() -> None:
    body = AnthropicAppCodec().encode_response(TRANSLATED, "claude-app")
    message = anthropic.types.Message.model_validate(body)
    assert message.model == "gpt-4.1-mini" and message.stop_reason == "tool_use"
    assert [block.type for block in message.content] == ["text", "tool_use"]
    assert message.content[0].text == "It is sunny."  # type: ignore[union-attr]
    assert message.content[1].input == {"city": "Paris"}  # type: ignore[union-attr]
    assert (message.usage.input_tokens, message.usage.output_tokens) == (12, 34)
    refused = ChatResponse([], "other", Usage(), "", None)
    plain = anthropic.types.Message.model_validate(AnthropicAppCodec().encode_response(refused, "claude-app"))
    assert (plain.model, plain.stop_reason, plain.content) == ("claude-app", "end_turn", [])


def test_native_response_is_relayed_untouched() -> None:
    native = {
        "id": "msg_1",
        "type": "message",
        "model": "c",
        "content": [{"type": "thinking", "thinking": "x"}],
    }
    response = ChatResponse([], "end_turn", Usage(), "c", NativeBody("anthropic", native))
    assert AnthropicAppCodec().encode_response(response, "app") is native


def test_error_body_and_error_frame() -> None:
    codec = AnthropicAppCodec()
    assert codec.error_body(529, "overloaded_error", "busy") == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "busy"},
    }
    [sse] = SseParser().feed(codec.stream_encoder("m").error("api_error", "upstream connection lost"))
    assert sse.event == "error"
    assert orjson.loads(sse.data) == {
        "type": "error",
        "error": {"type": "api_error", "message": "upstream connection lost"},
    }


def test_relay_reframes_and_keeps_unknown_events() -> None:
    encoder = AnthropicAppCodec().stream_encoder("m")
    weird = SseEvent("future_event", "line one\nline two")
    assert encoder.relay(StreamFrame([], weird)) == b"event: future_event\ndata: line one\ndata: line two\n\n"
    assert encoder.relay(StreamFrame([], SseEvent("message", "{}"))) == b"data: {}\n\n"
    assert SseParser().feed(encoder.relay(StreamFrame([], weird))) == [weird]


def _encoded_tool_stream() -> bytes:
    encoder = AnthropicAppCodec().stream_encoder("claude-app")
    events: list[StreamEvent] = [
        StreamStart("gpt-4.1-mini", Usage(0, 0)),
        TextDelta("Let me "),
        TextDelta("check."),
        ToolCallStart(0, "call_1", "weather"),
        ToolCallDelta(0, '{"city":'),
        ToolCallDelta(0, ' "Paris"}'),
        ToolCallStart(1, "call_2", "time"),
        ToolCallDelta(1, "{}"),
        StreamEnd("tool_use", Usage(21, 8)),
        TextDelta("after the end: dropped"),
    ]
    return b"".join(encoder.encode(event) for event in events)


def _relayed_then_resumed_stream() -> bytes:
    """Claude's own stream relayed up to a break, then a resumed continuation encoded into it."""
    encoder = AnthropicAppCodec().stream_encoder("claude-app")
    sses = SseParser().feed(fixture("anthropic_stream_success.sse"))[:4]  # up to the "Hello" delta
    relayed = b"".join(encoder.relay(StreamFrame([], sse)) for sse in sses)
    continuation: list[StreamEvent] = [
        StreamStart("claude-opus-4-6", Usage(30, 1)),
        TextDelta(" there"),
        TextDelta(", friend."),
        StreamEnd("end_turn", Usage(30, 7)),
    ]
    return relayed + b"".join(encoder.encode(event) for event in continuation)


@contextlib.asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A loopback server answering POST /v1/messages with `handler`; yields its base URL and the
    requests it received (headers and JSON body)."""
    received: list[dict[str, Any]] = []

    async def record(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        received.append({"headers": dict(request.headers), "body": body, "path": request.path})
        return await handler(request)

    app = web.Application()
    app.router.add_post("/v1/messages", record)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        await runner.cleanup()


def sse_handler(raw: bytes, chunk: int = 37) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        for start in range(0, len(raw), chunk):  # arbitrary splits, like a real network
            await response.write(raw[start : start + chunk])
        await response.write_eof()
        return response

    return handler


async def sdk_final_message(raw: bytes) -> anthropic.types.Message:
    async with serve(sse_handler(raw)) as (url, _):
        client = anthropic.AsyncAnthropic(base_url=url, api_key="sk-app", max_retries=0)
        try:
            async with client.messages.stream(
                model="claude-app", max_tokens=100, messages=[{"role": "user", "content": "weather?"}]
            ) as stream:
                return await stream.get_final_message()
        finally:
            await client.close()


async def test_sdk_reads_an_encoded_stream_with_text_and_tool_calls() -> None:
    message = await sdk_final_message(_encoded_tool_stream())
    assert message.model == "gpt-4.1-mini" and message.stop_reason == "tool_use"
    assert [block.type for block in message.content] == ["text", "tool_use", "tool_use"]
    text, weather, clock = message.content
    assert text.text == "Let me check."  # type: ignore[union-attr]
    assert (weather.id, weather.name, weather.input) == ("call_1", "weather", {"city": "Paris"})  # type: ignore[union-attr]
    assert (clock.name, clock.input) == ("time", {})  # type: ignore[union-attr]
    assert (message.usage.input_tokens, message.usage.output_tokens) == (21, 8)


async def test_sdk_reads_a_relayed_stream_continued_by_a_resume() -> None:
    message = await sdk_final_message(_relayed_then_resumed_stream())
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "Hello there, friend."  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn" and message.model == "claude-opus-4-6"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (30, 7)


async def test_sdk_raises_on_the_encoded_error_frame() -> None:
    encoder = AnthropicAppCodec().stream_encoder("claude-app")
    raw = encoder.encode(StreamStart("m", Usage())) + encoder.encode(TextDelta("Hel"))
    raw += encoder.error("overloaded_error", "Overloaded")
    with pytest.raises(anthropic.APIStatusError, match="Overloaded"):
        await sdk_final_message(raw)


def test_stream_encoder_block_indices() -> None:
    sses = SseParser().feed(_encoded_tool_stream())
    names = [sse.event for sse in sses]
    assert names == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    indices = [orjson.loads(sse.data).get("index") for sse in sses]
    assert indices == [None, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, None, None]
    # The SDK-free round trip: our own decoder reads what our encoder wrote.
    assert decode_all(_encoded_tool_stream())[-1] == StreamEnd("tool_use", Usage(21, 8))


# ----- the HTTP exchange ----------------------------------------------------------------------------
SUCCESS = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-target",
    "content": [{"type": "text", "text": "Hi there"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 5, "output_tokens": 2},
}


def json_handler(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=body, status=status, headers={"Content-Type": "application/json", **(headers or {})}
        )

    return handler


@contextlib.asynccontextmanager
async def adapter_at(url: str) -> AsyncIterator[AnthropicAdapter]:
    async with aiohttp.ClientSession() as session:
        yield AnthropicAdapter(Provider(name="claude", type="anthropic", base_url=url), session, "sk-sidecar")


async def call(handler: Handler, stream: bool = False) -> tuple[Any, list[dict[str, Any]]]:
    request = ChatRequest([user("hello")], max_tokens=50)
    async with serve(handler) as (url, received), adapter_at(url) as adapter:
        if stream:
            return [frame async for frame in adapter.stream(request, "claude-target", TIMEOUTS)], received
        return await adapter.complete(request, "claude-target", TIMEOUTS), received


async def test_http_success() -> None:
    response, received = await call(json_handler(orjson.dumps(SUCCESS)))
    assert response.text == "Hi there" and response.usage == Usage(5, 2)
    assert response.stop_reason == "end_turn"
    [sent] = received
    assert sent["path"] == "/v1/messages"
    assert sent["headers"]["x-api-key"] == "sk-sidecar"
    assert sent["headers"]["anthropic-version"] == "2023-06-01"
    assert sent["body"]["model"] == "claude-target" and sent["body"]["stream"] is False


async def test_http_gzip_body_is_decoded_exactly_once() -> None:
    handler = json_handler(gzip.compress(orjson.dumps(SUCCESS)), headers={"Content-Encoding": "gzip"})
    response, _ = await call(handler)
    assert response.text == "Hi there" and response.native.body == SUCCESS


async def test_http_stream() -> None:
    frames, received = await call(sse_handler(fixture("anthropic_stream_success.sse"), chunk=7), stream=True)
    events = [event for frame in frames for event in frame.events]
    assert events == [
        StreamStart("claude-opus-4-6", Usage(25, 1)),
        TextDelta("Hello"),
        TextDelta("!"),
        StreamEnd("end_turn", Usage(25, 15)),
    ]
    assert [frame.sse.event for frame in frames][2] == "ping"  # every event is there for a relay
    assert received[0]["body"]["stream"] is True


async def test_http_529_with_retry_after() -> None:
    handler = json_handler(fixture("anthropic_error_overloaded_529.json"), 529, {"retry-after": "3"})
    with pytest.raises(RetryableError) as caught:
        await call(handler)
    error = caught.value
    assert (error.status, error.condition, error.retry_after) == (529, 529, 3.0)
    assert error.error_type == "overloaded_error"


async def test_http_400_is_a_client_error_with_the_body_kept() -> None:
    raw = fixture("anthropic_error_invalid_request_400.json")
    with pytest.raises(ClientError) as caught:
        await call(json_handler(raw, 400))
    error = caught.value
    assert error.body == raw and error.dialect == "anthropic" and error.status == 400
    assert error.message == "max_tokens: must be greater than 0"


async def test_http_429_without_retry_after_fails_over() -> None:
    body = b'{"type":"error","error":{"type":"rate_limit_error","message":"spend limit reached"}}'
    with pytest.raises(FailoverError) as caught:
        await call(json_handler(body, 429))
    assert caught.value.condition == 429 and caught.value.retry_after is None


async def test_http_cdn_html_page() -> None:
    page = (
        b"<!DOCTYPE html><html><head><title>api.anthropic.com | "
        b"520: Web server is returning an unknown error</title></head><body>cloudflare</body></html>"
    )

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=page, status=520, content_type="text/html")

    with pytest.raises(RetryableError) as caught:
        await call(handler)
    error = caught.value
    assert "520: Web server is returning an unknown error" in error.message
    assert error.body is None and error.dialect is None and error.status == 520


async def test_http_200_with_an_empty_object() -> None:
    with pytest.raises(RetryableError) as caught:
        await call(json_handler(b"{}"))
    assert caught.value.status == 502 and caught.value.condition == 502


async def test_http_connection_reset_before_headers() -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()

    server = await asyncio.start_server(reset, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with adapter_at(f"http://127.0.0.1:{port}") as adapter:
            with pytest.raises(RetryableError) as caught:
                await adapter.complete(ChatRequest([user("hi")]), "m", TIMEOUTS)
    finally:
        server.close()
        await server.wait_closed()
    assert caught.value.condition == "connection"


async def test_http_hang_before_headers_times_out() -> None:
    async def hang(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(30)
        raise AssertionError("unreachable")

    request = ChatRequest([user("hi")])
    async with serve(hang) as (url, _), adapter_at(url) as adapter:
        with pytest.raises(RetryableError) as caught:
            await adapter.complete(request, "m", AttemptTimeouts(first_byte=0.2, idle=0.2))
    assert caught.value.condition == "timeout"


async def test_http_stream_eof_without_message_stop() -> None:
    truncated = fixture("anthropic_stream_success.sse").split(b"event: message_delta")[0]
    seen: list[StreamFrame] = []
    request = ChatRequest([user("hi")])
    async with serve(sse_handler(truncated)) as (url, _), adapter_at(url) as adapter:
        with pytest.raises(RetryableError) as caught:
            async for frame in adapter.stream(request, "m", TIMEOUTS):
                seen.append(frame)
    assert caught.value.condition == "connection"
    assert [e for f in seen for e in f.events][-1] == TextDelta("!")


async def test_http_stream_midstream_error_event() -> None:
    seen: list[StreamFrame] = []
    request = ChatRequest([user("hi")])
    async with (
        serve(sse_handler(fixture("anthropic_stream_midstream_overloaded.sse"))) as (url, _),
        adapter_at(url) as adapter,
    ):
        with pytest.raises(RetryableError) as caught:
            async for frame in adapter.stream(request, "m", TIMEOUTS):
                seen.append(frame)
    assert caught.value.condition == 529 and caught.value.dialect == "anthropic"
    events = [e for f in seen for e in f.events]
    assert events == [StreamStart("claude-opus-4-6", Usage(25, 1)), TextDelta("Hello")]
