"""Translating between Anthropic, OpenAI and Gemini loses no text, tool call or tool result.

A fallback target receives the app's conversation in its own provider's format, and its answer goes
back in the app's format. These tests push conversations and answers through every pair of formats
and check that what a user would notice survives: texts and their roles, images, tool definitions,
tool calls (names and arguments), tool results, generation parameters, stop reasons and token usage.

Requests: neutral -> target adapter's `encode_request` -> (JSON) -> that dialect parsed back into neutral
(the app codec for Anthropic/OpenAI; for Gemini, which has no app endpoint, the small wire reader below).
Answers: neutral -> an upstream body of dialect U -> U adapter's `decode_response` -> the app codec of
dialect A `encode_response` -> (JSON, validated by A's official SDK types) -> A adapter's `decode_response`.
Streams go the same way event by event (relayed when U == A, re-encoded otherwise).

Known, documented losses are part of the expectation, not hidden: OpenAI has no tool-error flag; Gemini
has no tool call ids (ids are synthesized, so calls are compared by name and arguments); Anthropic
requires `max_tokens` (4096 when unset); OpenAI and Gemini do not tell a stop sequence from a natural
stop; an OpenAI app that did not ask for stream usage gets none.
"""

from __future__ import annotations

import base64
import copy
import itertools
from dataclasses import dataclass
from typing import Any

import anthropic.types
import openai.types.chat
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmroute_sidecar.messages import (
    ChatRequest,
    ChatResponse,
    Image,
    Message,
    NativeBody,
    Part,
    StopReason,
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
from llmroute_sidecar.providers import app_codec
from llmroute_sidecar.providers.anthropic import DEFAULT_MAX_TOKENS, AnthropicAdapter
from llmroute_sidecar.providers.base import Adapter, StreamFrame
from llmroute_sidecar.providers.gemini import GeminiAdapter
from llmroute_sidecar.providers.openai import OpenAIAdapter
from llmroute_sidecar.sse import SseParser

DIALECTS = ("anthropic", "openai", "gemini")
APP_DIALECTS = ("anthropic", "openai")
MODEL = "target-model"
Json = dict[str, Any]


def adapter(dialect: str) -> Adapter:
    kinds: dict[str, type[Adapter]] = {
        "anthropic": AnthropicAdapter,
        "openai": OpenAIAdapter,
        "gemini": GeminiAdapter,
    }
    provider = Provider.model_validate({"name": dialect, "type": dialect})
    return kinds[dialect](provider, None, "key")  # type: ignore[arg-type]  # codecs never use the session


def wire(body: Json) -> Json:
    """What the other side of an HTTP exchange sees."""
    parsed: Json = orjson.loads(orjson.dumps(body))
    return parsed


# ----- Gemini's wire format, read and written the way the API does (it has no app codec) -------------
def gemini_request(body: Json) -> ChatRequest:
    """A generateContent body -> neutral. Gemini has no call ids: a function response answers the
    first unanswered call of that name in the preceding model turn."""
    messages: list[Message] = []
    pending: list[ToolCall] = []
    for turn, content in enumerate(body["contents"]):
        parts: list[Part] = []
        for part in content["parts"]:
            if "text" in part:
                parts.append(Text(part["text"]))
            elif "inlineData" in part:
                parts.append(Image(part["inlineData"]["mimeType"], data=part["inlineData"]["data"]))
            elif "functionCall" in part:
                call = part["functionCall"]
                parts.append(ToolCall(f"g{turn}_{len(parts)}", call["name"], call.get("args", {})))
            elif "functionResponse" in part:
                answer = part["functionResponse"]
                call = next(c for c in pending if c.name == answer["name"])
                pending.remove(call)
                is_error = "error" in answer["response"]
                text = answer["response"]["error" if is_error else "output"]
                parts.append(ToolResult(call.id, text, is_error=is_error, name=answer["name"]))
        role = "assistant" if content["role"] == "model" else "user"
        if role == "assistant":
            pending = [part for part in parts if isinstance(part, ToolCall)]
        messages.append(Message(role, parts))
    config = body.get("generationConfig", {})
    tools = [
        ToolSpec(d["name"], d.get("description"), d.get("parametersJsonSchema", {}))
        for group in body.get("tools", [])
        for d in group["functionDeclarations"]
    ]
    calling = body.get("toolConfig", {}).get("functionCallingConfig")
    choice = None
    if calling is not None:
        names = calling.get("allowedFunctionNames")
        choice = names[0] if names else calling["mode"].lower()
    system = body.get("systemInstruction")
    return ChatRequest(
        messages=messages,
        system="".join(part["text"] for part in system["parts"]) if system else None,
        max_tokens=config.get("maxOutputTokens"),
        temperature=config.get("temperature"),
        top_p=config.get("topP"),
        stop=config.get("stopSequences", []),
        tools=tools,
        tool_choice=choice,
    )


_GEMINI_FINISH = {
    "end_turn": "STOP",
    "stop_sequence": "STOP",
    "tool_use": "STOP",
    "max_tokens": "MAX_TOKENS",
    "refusal": "SAFETY",
    "other": "OTHER",
}


def gemini_usage(usage: Usage, final: bool) -> Json:
    meta = {"promptTokenCount": usage.input_tokens}
    if final:
        meta |= {
            "candidatesTokenCount": usage.output_tokens,
            "totalTokenCount": usage.input_tokens + usage.output_tokens,
        }
    return meta


def gemini_answer(response: ChatResponse) -> Json:
    """A generateContent answer, shaped like the API's (see the final-chunk capture)."""
    parts: list[Json] = [
        {"text": part.text}
        if isinstance(part, Text)
        else {"functionCall": {"name": part.name, "args": part.arguments}}
        for part in response.parts
    ]
    candidate: Json = {"finishReason": _GEMINI_FINISH[response.stop_reason], "index": 0}
    if parts:
        candidate["content"] = {"parts": parts, "role": "model"}
    return {
        "candidates": [candidate],
        "usageMetadata": gemini_usage(response.usage, final=True),
        "modelVersion": response.model,
        "responseId": "resp42",
    }


def gemini_stream(response: ChatResponse, pieces: int) -> bytes:
    """An `alt=sse` stream of the answer: text in `pieces` chunks, each call whole, then the finish."""
    chunks: list[list[Json]] = []
    for part in response.parts:
        if isinstance(part, Text):
            chunks.extend([{"text": piece}] for piece in split(part.text, pieces))
        else:
            chunks.append([{"functionCall": {"name": part.name, "args": part.arguments}}])
    out = b""
    for index, parts in enumerate(chunks or [[]]):
        candidate: Json = {"content": {"parts": parts, "role": "model"}, "index": 0}
        final = index == max(len(chunks) - 1, 0)
        if final:
            candidate["finishReason"] = _GEMINI_FINISH[response.stop_reason]
        body = {
            "candidates": [candidate],
            "usageMetadata": gemini_usage(response.usage, final),
            "modelVersion": response.model,
            "responseId": "resp42",
        }
        out += b"data: " + orjson.dumps(body) + b"\r\n\r\n"
    return out


def split(text: str, pieces: int) -> list[str]:
    size = max(1, -(-len(text) // pieces))
    return [text[i : i + size] for i in range(0, len(text), size)] or [text]


# ----- an upstream body / stream of each dialect, from a neutral answer ------------------------------
def upstream_answer(dialect: str, response: ChatResponse) -> Json:
    if dialect == "gemini":
        return wire(gemini_answer(response))
    # The app codecs write a dialect's answer from neutral parts: exactly an upstream's body.
    return wire(app_codec(dialect).encode_response(response, response.model))


def neutral_events(response: ChatResponse, pieces: int) -> list[StreamEvent]:
    events: list[StreamEvent] = [StreamStart(response.model, Usage(response.usage.input_tokens, 0))]
    calls = 0
    for part in response.parts:
        if isinstance(part, Text):
            events.extend(TextDelta(piece) for piece in split(part.text, pieces))
        else:
            events.append(ToolCallStart(calls, part.id, part.name))
            arguments = orjson.dumps(part.arguments).decode()
            events.extend(ToolCallDelta(calls, piece) for piece in split(arguments, pieces))
            calls += 1
    events.append(StreamEnd(response.stop_reason, response.usage))
    return events


def upstream_stream(dialect: str, response: ChatResponse, pieces: int) -> bytes:
    if dialect == "gemini":
        return gemini_stream(response, pieces)
    encoder = app_encoder(dialect, include_usage=True)  # upstream OpenAI is always asked for usage
    return b"".join(encoder.encode(event) for event in neutral_events(response, pieces))


def app_encoder(dialect: str, include_usage: bool) -> Any:
    codec = app_codec(dialect)
    if dialect != "openai":
        return codec.stream_encoder(MODEL)
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    asked = ChatRequest([], native=NativeBody("openai", {"model": MODEL, "messages": [], **options}))
    return codec.stream_encoder(MODEL, asked)  # type: ignore[call-arg]


def frames(dialect: str, raw: bytes) -> list[StreamFrame]:
    decoder = adapter(dialect).stream_decoder()
    out = [StreamFrame(decoder.decode(sse), sse) for sse in SseParser().feed(raw)]
    assert decoder.finished(), f"{dialect} stream did not end cleanly"
    return out


# ----- what must survive -----------------------------------------------------------------------------
@dataclass
class Answer:
    """What an app sees of an answer."""

    text: str
    calls: list[tuple[str, Json]]
    stop: StopReason
    usage: tuple[int, int]


def answer_of(response: ChatResponse) -> Answer:
    calls = [(part.name, part.arguments) for part in response.parts if isinstance(part, ToolCall)]
    usage = (response.usage.input_tokens, response.usage.output_tokens)
    return Answer(response.text, calls, response.stop_reason, usage)


def answer_of_stream(events: list[StreamEvent]) -> Answer:
    text = "".join(event.text for event in events if isinstance(event, TextDelta))
    names = {event.index: event.name for event in events if isinstance(event, ToolCallStart)}
    arguments = {index: "" for index in names}
    for event in events:
        if isinstance(event, ToolCallDelta):
            arguments[event.index] += event.arguments
    calls = [(names[i], orjson.loads(arguments[i] or "{}")) for i in sorted(names)]
    ends = [event for event in events if isinstance(event, StreamEnd)]
    assert len(ends) == 1, "exactly one clean end"
    end = ends[0]
    return Answer(text, calls, end.stop_reason, (end.usage.input_tokens, end.usage.output_tokens))


def expected_answer(response: ChatResponse, upstream: str, app: str, stream_usage: bool = True) -> Answer:
    expected = answer_of(response)
    if expected.stop == "stop_sequence" and not upstream == app == "anthropic":
        expected.stop = "end_turn"  # only Anthropic tells a stop sequence from a natural end
    if expected.stop == "other":
        expected.stop = "end_turn"  # neither app dialect has "other"; a plain end is the closest
    if not stream_usage:
        expected.usage = (0, 0)
    return expected


@dataclass
class Turn:
    """A conversation turn as a user would read it: who said what, with call ids made positional."""

    role: str
    items: list[Any]


def conversation_of(request: ChatRequest, target: str) -> dict[str, Any]:
    """The request as comparable data. Call ids become ordinals (Gemini has none); adjacent turns of
    one role are one turn (every format merges them); empty texts are dropped (Anthropic and Gemini
    refuse them)."""
    ordinals: dict[str, int] = {}
    turns: list[Turn] = []
    for message in request.messages:
        items: list[Any] = []
        for part in message.parts:
            if isinstance(part, Text):
                if part.text:
                    items.append(("text", part.text))
            elif isinstance(part, Image):
                items.append(("image", part.media_type, part.data))
            elif isinstance(part, ToolCall):
                ordinals.setdefault(part.id, len(ordinals))
                items.append(("call", ordinals[part.id], part.name, part.arguments))
            else:
                is_error = part.is_error and target != "openai"  # OpenAI has no tool-error flag
                items.append(("result", ordinals.get(part.call_id), part.content, is_error))
        if not items:
            continue
        if turns and turns[-1].role == message.role:
            turns[-1].items.extend(items)
        else:
            turns.append(Turn(message.role, items))
    for turn in turns:
        if turn.role == "assistant":  # OpenAI keeps one text per assistant turn, ahead of its calls
            texts = "".join(item[1] for item in turn.items if item[0] == "text")
            turn.items = ([("text", texts)] if texts else []) + [i for i in turn.items if i[0] != "text"]
    max_tokens = request.max_tokens
    if target == "anthropic" and max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    return {
        "system": request.effective_system or None,
        "turns": [(turn.role, turn.items) for turn in turns],
        "max_tokens": max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "stop": list(request.stop),
        "tools": [(tool.name, tool.description, tool.parameters) for tool in request.tools],
        "tool_choice": request.tool_choice if request.tools else None,
    }


def round_trip_request(request: ChatRequest, target: str) -> ChatRequest:
    body = wire(adapter(target).encode_request(request, MODEL, stream=False))
    if target == "gemini":
        return gemini_request(body)
    return app_codec(target).decode_request(body)


def app_body_is_valid(app: str, body: Json) -> None:
    """The official SDK's own types accept the body (what the SDK would parse)."""
    if app == "anthropic":
        anthropic.types.Message.model_validate(body)
    else:
        openai.types.chat.ChatCompletion.model_validate(body)


def translate_answer(response: ChatResponse, upstream: str, app: str) -> ChatResponse:
    received = adapter(upstream).decode_response(upstream_answer(upstream, response))
    body = wire(app_codec(app).encode_response(received, MODEL))
    app_body_is_valid(app, body)
    return adapter(app).decode_response(body)


def translate_stream(
    response: ChatResponse, upstream: str, app: str, pieces: int, usage: bool
) -> list[StreamEvent]:
    encoder = app_encoder(app, include_usage=usage)
    out = b""
    for frame in frames(upstream, upstream_stream(upstream, response, pieces)):
        if upstream == app:
            out += encoder.relay(frame)
        else:
            out += b"".join(encoder.encode(event) for event in frame.events)
    return [event for frame in frames(app, out) for event in frame.events]


# ----- the table ------------------------------------------------------------------------------------
WEATHER = ToolSpec(
    "get_weather",
    "Current weather for a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
CLOCK = ToolSpec("clock", None, {"type": "object", "properties": {}})
PNG = Image("image/png", data="iVBORw0KGgo=")

REQUESTS: dict[str, ChatRequest] = {
    "plain text": ChatRequest([Message("user", [Text("Hello!")])]),
    "system prompt and parameters": ChatRequest(
        [Message("user", [Text("Summarize: the cat sat.")])],
        system="You summarize.",
        max_tokens=256,
        temperature=0.2,
        top_p=0.9,
        stop=["\n\nHuman:", "END"],
    ),
    "fallback prompt replaces the app's": ChatRequest(
        [Message("user", [Text("hi")])], system="app prompt", system_override="target prompt"
    ),
    "multi-turn with unicode": ChatRequest(
        [
            Message("user", [Text("Grüße 👋 — what's 2+2?\nThanks")]),
            Message("assistant", [Text("4, ✓")]),
            Message("user", [Text("And in 日本語?")]),
        ]
    ),
    "image and text": ChatRequest([Message("user", [Text("What is this?"), PNG])]),
    "tool round trip": ChatRequest(
        [
            Message("user", [Text("Weather in Paris?")]),
            Message("assistant", [Text("Checking."), ToolCall("toolu_01", "get_weather", {"city": "Paris"})]),
            Message("user", [ToolResult("toolu_01", '{"temp": 21, "sky": "clear"}')]),
        ],
        tools=[WEATHER],
        tool_choice="auto",
    ),
    "parallel calls, one failed, text after results": ChatRequest(
        [
            Message("user", [Text("Paris and Oslo, and the time")]),
            Message(
                "assistant",
                [
                    ToolCall("call_a", "get_weather", {"city": "Paris"}),
                    ToolCall("call_b", "get_weather", {"city": "Oslo"}),
                    ToolCall("call_c", "clock", {}),
                ],
            ),
            Message(
                "user",
                [
                    ToolResult("call_a", "sunny"),
                    ToolResult("call_b", "service down", is_error=True),
                    ToolResult("call_c", "12:00"),
                    Text("Be brief."),
                ],
            ),
        ],
        tools=[WEATHER, CLOCK],
        tool_choice="any",
    ),
    "forced tool with nested arguments": ChatRequest(
        [
            Message("user", [Text("plan")]),
            Message(
                "assistant",
                [
                    ToolCall(
                        "c1", "get_weather", {"city": "Rome", "opts": {"units": ["C"], "days": 3, "x": None}}
                    )
                ],
            ),
            Message("user", [ToolResult("c1", "")]),
        ],
        tools=[WEATHER],
        tool_choice="get_weather",
    ),
    "empty assistant text beside a call": ChatRequest(
        [
            Message("user", [Text("time?")]),
            Message("assistant", [Text(""), ToolCall("c9", "clock", {})]),
            Message("user", [ToolResult("c9", "noon")]),
        ],
        tools=[CLOCK],
    ),
}


@pytest.mark.parametrize("target", DIALECTS)
@pytest.mark.parametrize("case", list(REQUESTS))
def test_request_survives_translation(case: str, target: str) -> None:
    request = REQUESTS[case]
    assert adapter(target).untranslatable(request) is None
    assert conversation_of(round_trip_request(request, target), target) == conversation_of(request, target)


ANSWERS: dict[str, ChatResponse] = {
    "text": ChatResponse([Text("Hello there.")], "end_turn", Usage(12, 3), "m-1"),
    "unicode, multi-line text": ChatResponse([Text("Zeile 1\n第二行 🚀")], "end_turn", Usage(5, 9), "m-1"),
    "truncated": ChatResponse([Text("Once upon a")], "max_tokens", Usage(7, 3), "m-1"),
    "stop sequence": ChatResponse([Text("a, b")], "stop_sequence", Usage(7, 3), "m-1"),
    "refusal": ChatResponse([Text("I can't help with that.")], "refusal", Usage(9, 6), "m-1"),
    "other": ChatResponse([Text("hm")], "other", Usage(1, 1), "m-1"),
    "tool call with text": ChatResponse(
        [Text("Let me check."), ToolCall("toolu_9", "get_weather", {"city": "Lima"})],
        "tool_use",
        Usage(30, 12),
        "m-1",
    ),
    "parallel tool calls": ChatResponse(
        [
            ToolCall("call_1", "get_weather", {"city": "Lima", "nested": {"a": [1, 2.5, None, True]}}),
            ToolCall("call_2", "clock", {}),
        ],
        "tool_use",
        Usage(30, 20),
        "m-1",
    ),
}


@pytest.mark.parametrize(("upstream", "app"), list(itertools.product(DIALECTS, APP_DIALECTS)))
@pytest.mark.parametrize("case", list(ANSWERS))
def test_answer_survives_translation(case: str, upstream: str, app: str) -> None:
    response = ANSWERS[case]
    translated = translate_answer(response, upstream, app)
    assert answer_of(translated) == expected_answer(response, upstream, app)


@pytest.mark.parametrize(("upstream", "app"), list(itertools.product(DIALECTS, APP_DIALECTS)))
@pytest.mark.parametrize("case", list(ANSWERS))
def test_streamed_answer_survives_translation(case: str, upstream: str, app: str) -> None:
    response = ANSWERS[case]
    events = translate_stream(response, upstream, app, pieces=3, usage=True)
    assert answer_of_stream(events) == expected_answer(response, upstream, app)


def test_an_openai_app_that_did_not_ask_for_stream_usage_gets_none() -> None:
    events = translate_stream(ANSWERS["text"], "gemini", "openai", pieces=2, usage=False)
    assert answer_of_stream(events) == expected_answer(
        ANSWERS["text"], "gemini", "openai", stream_usage=False
    )


def test_tool_call_ids_survive_between_anthropic_and_openai() -> None:
    response = ANSWERS["parallel tool calls"]
    for upstream, app in (("anthropic", "openai"), ("openai", "anthropic")):
        ids = [
            part.id for part in translate_answer(response, upstream, app).parts if isinstance(part, ToolCall)
        ]
        assert ids == ["call_1", "call_2"]


def test_gemini_answers_get_distinct_call_ids_an_app_can_answer() -> None:
    for app in APP_DIALECTS:
        calls = [
            p
            for p in translate_answer(ANSWERS["parallel tool calls"], "gemini", app).parts
            if isinstance(p, ToolCall)
        ]
        assert len({call.id for call in calls}) == 2 and all(call.id for call in calls)


def test_an_app_answering_gemini_calls_reaches_gemini_intact() -> None:
    """A Gemini fallback asks for tools; the Anthropic app answers with tool_result blocks naming the
    synthesized ids; the next Gemini request names the right functions."""
    answer = translate_answer(ANSWERS["parallel tool calls"], "gemini", "anthropic")
    calls = [part for part in answer.parts if isinstance(part, ToolCall)]
    app_body = {
        "model": "claude",
        "max_tokens": 100,
        "messages": [
            {"role": "user", "content": "go"},
            app_codec("anthropic").encode_response(answer, "claude") | {"role": "assistant"},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": call.id, "content": f"r{i}"}
                    for i, call in enumerate(calls)
                ],
            },
        ],
    }
    request = app_codec("anthropic").decode_request(wire(app_body))
    request.native = None  # a fallback on another provider: translated, not passed through
    assert adapter("gemini").untranslatable(request) is None
    contents = adapter("gemini").encode_request(request, MODEL, stream=False)["contents"]
    responses = [part["functionResponse"] for part in contents[-1]["parts"]]
    assert responses == [
        {"name": "get_weather", "response": {"output": "r0"}},
        {"name": "clock", "response": {"output": "r1"}},
    ]


# ----- properties -----------------------------------------------------------------------------------
texts = st.text(min_size=1, max_size=40)
names = st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True)
json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
)
json_values = st.recursive(
    json_leaves,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(min_size=1, max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
arguments = st.dictionaries(st.text(min_size=1, max_size=8), json_values, max_size=4)
images = st.builds(
    Image,
    media_type=st.sampled_from(["image/png", "image/jpeg"]),
    data=st.binary(min_size=1, max_size=12).map(lambda raw: base64.b64encode(raw).decode()),
)


@st.composite
def conversations(draw: st.DrawFn) -> ChatRequest:
    """Alternating turns as apps send them: user text/images; assistant text and/or tool calls; every
    call answered (in call order, possibly as errors) at the start of the next user turn."""
    counter = itertools.count()
    tools = draw(st.lists(names, min_size=1, max_size=3, unique=True))
    messages = [Message("user", draw(st.lists(texts.map(Text) | images, min_size=1, max_size=3)))]
    for _ in range(draw(st.integers(0, 3))):
        calls = [
            ToolCall(f"call_{next(counter)}", draw(st.sampled_from(tools)), draw(arguments))
            for _ in range(draw(st.integers(0, 2)))
        ]
        said = draw(st.none() | texts)
        assistant: list[Part] = ([Text(said)] if said else []) + calls
        if not assistant:
            assistant = [Text(draw(texts))]
        messages.append(Message("assistant", assistant))
        results: list[Part] = [
            ToolResult(call.id, draw(st.text(max_size=20)), is_error=draw(st.booleans())) for call in calls
        ]
        extra = draw(st.lists(texts.map(Text), min_size=0 if results else 1, max_size=2))
        messages.append(Message("user", results + extra))
    specs = [ToolSpec(name, draw(st.none() | texts), {"type": "object", "properties": {}}) for name in tools]
    return ChatRequest(
        messages=messages,
        system=draw(st.none() | texts),
        max_tokens=draw(st.none() | st.integers(1, 8192)),
        temperature=draw(st.none() | st.floats(0, 2)),
        top_p=draw(st.none() | st.floats(0, 1)),
        stop=draw(st.lists(texts, max_size=2)),
        tools=specs,
        tool_choice=draw(st.none() | st.sampled_from(["auto", "any", "none", tools[0]])),
    )


@st.composite
def answers(draw: st.DrawFn) -> ChatResponse:
    text = draw(st.none() | texts)
    calls = [
        ToolCall(f"call_{i}", draw(names), draw(arguments))
        for i in range(draw(st.integers(0 if text else 1, 3)))
    ]
    stop: StopReason = "tool_use" if calls else draw(st.sampled_from(["end_turn", "max_tokens", "refusal"]))
    parts: list[Text | ToolCall] = ([Text(text)] if text else []) + calls
    usage = Usage(draw(st.integers(0, 10**6)), draw(st.integers(0, 10**6)))
    return ChatResponse(parts, stop, usage, "m-1")


PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(request=conversations(), target=st.sampled_from(DIALECTS))
def test_any_conversation_survives_translation(request: ChatRequest, target: str) -> None:
    assert adapter(target).untranslatable(request) is None
    assert conversation_of(round_trip_request(request, target), target) == conversation_of(request, target)


@PROPERTY
@given(response=answers(), upstream=st.sampled_from(DIALECTS), app=st.sampled_from(APP_DIALECTS))
def test_any_answer_survives_translation(response: ChatResponse, upstream: str, app: str) -> None:
    translated = translate_answer(copy.deepcopy(response), upstream, app)
    assert answer_of(translated) == expected_answer(response, upstream, app)


@PROPERTY
@given(
    response=answers(),
    upstream=st.sampled_from(DIALECTS),
    app=st.sampled_from(APP_DIALECTS),
    pieces=st.integers(1, 4),
)
def test_any_streamed_answer_survives_translation(
    response: ChatResponse, upstream: str, app: str, pieces: int
) -> None:
    events = translate_stream(copy.deepcopy(response), upstream, app, pieces, usage=True)
    assert answer_of_stream(events) == expected_answer(response, upstream, app)
