"""The drop-in endpoints, proven with the official SDKs (issue 3, CONTRACT.md 3).

Each test points an unmodified `anthropic` or `openai` client (sync in a worker thread, or async) at the
real sidecar by base URL, with fake providers behind it, and checks what the app gets and what the
providers received: faithful pass-through with the app's key replaced, stream resume by prefill, answers
and streams translated between dialects (text, tool calls, usage, stop reasons), no SDK retry multiplying
the sidecar's own, client errors as the SDK's own exception types, routing, refusal of untranslatable
requests, and hostile clients.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import anthropic
import httpx
import openai
import pytest

from llmroute_sidecar import server
from llmroute_sidecar.simulator.fakes import (
    CutStream,
    Fail,
    FakeProvider,
    RecordedRequest,
    Reply,
    StreamError,
    ToolCall,
)

from .harness import policy_document, running_sidecar

pytestmark = pytest.mark.timeout(30)

# anthropic>=2 runs on httpx2 (an httpx fork) and may let its transport errors escape a stream.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (anthropic.APIError, openai.APIError, httpx.HTTPError)
try:
    import httpx2

    TRANSPORT_ERRORS += (httpx2.HTTPError,)
except ImportError:  # pragma: no cover - older SDKs use httpx itself
    pass

MODES = ["sync", "async"]
APP_KEY = "app-key-never-forwarded"
KEYS = {"anthropic": "sk-ant-sidecar-key", "openai": "sk-openai-sidecar-key", "gemini": "gemini-sidecar-key"}
KEY_ENV = {"anthropic": "TEST_ANTHROPIC_KEY", "openai": "TEST_OPENAI_KEY", "gemini": "TEST_GEMINI_KEY"}
PRIMARY_MODEL = {"anthropic": "claude-sonnet-4-5", "openai": "gpt-4.1", "gemini": "gemini-2.5-pro"}
FALLBACK_MODEL = {"anthropic": "claude-haiku-4-5", "openai": "gpt-4.1-mini", "gemini": "gemini-2.5-flash"}
BACKUP_SYSTEM = "You are the backup model. Answer briefly."
FULL = "The quick brown fox jumps over the lazy dog and keeps running far away."
CITY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
ANTHROPIC_TOOLS: Any = [{"name": "get_weather", "description": "Weather in a city", "input_schema": CITY_SCHEMA}]
OPENAI_TOOLS: Any = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city", "parameters": CITY_SCHEMA},
    }
]
USER: Any = [{"role": "user", "content": "Summarize: the printer is on fire"}]


# ----- fixtures and helpers ------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for kind, name in KEY_ENV.items():
        monkeypatch.setenv(name, KEYS[kind])


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeProvider, FakeProvider]]:
    async with FakeProvider("primary") as primary, FakeProvider("fallback") as fallback:
        yield primary, fallback


def document(
    primary: FakeProvider,
    fallback: FakeProvider,
    primary_type: str = "anthropic",
    fallback_type: str = "openai",
    route: dict[str, Any] | None = None,
    spec: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A compat-style policy: the primary passes the app's request through (no prompt, no params),
    the degraded backup has its own model and system prompt. Budgets are short: tests stay fast."""
    targets = [
        {"name": "primary", "provider": "claude", "model": PRIMARY_MODEL[primary_type]},
        {
            "name": "backup",
            "provider": "gpt",
            "model": FALLBACK_MODEL[fallback_type],
            "degraded": True,
            "prompt": {"system": BACKUP_SYSTEM},
        },
    ]
    settings: dict[str, Any] = {
        "budget": "300ms",
        "attemptTimeout": "2s",
        "backoff": {"initial": "20ms", "max": "50ms"},
        "targets": targets,
        **(route or {}),
    }
    doc = policy_document(
        primary.url, fallback.url, primary_type=primary_type, fallback_type=fallback_type, route=settings, spec=spec
    )
    providers = doc["spec"]["providers"]
    providers[0]["apiKey"] = {"env": KEY_ENV[primary_type]}
    providers[1]["apiKey"] = {"env": KEY_ENV[fallback_type]}
    return doc


async def _settle(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


async def with_anthropic(url: str, mode: str, fn: Callable[[Any], Any], **options: Any) -> Any:
    """Run `fn(client)` with an Anthropic client on the sidecar: sync clients in a worker thread (the
    sidecar runs on this loop), async ones here. Awaitable results are awaited."""
    kwargs: dict[str, Any] = {"base_url": f"{url}/anthropic", "api_key": APP_KEY, "timeout": 10.0, **options}
    if mode == "async":
        async with anthropic.AsyncAnthropic(**kwargs) as client:
            return await _settle(fn(client))

    def work() -> Any:
        with anthropic.Anthropic(**kwargs) as client:
            return fn(client)

    return await asyncio.to_thread(work)


async def with_openai(url: str, mode: str, fn: Callable[[Any], Any], **options: Any) -> Any:
    kwargs: dict[str, Any] = {"base_url": f"{url}/openai/v1", "api_key": APP_KEY, "timeout": 10.0, **options}
    if mode == "async":
        async with openai.AsyncOpenAI(**kwargs) as client:
            return await _settle(fn(client))

    def work() -> Any:
        with openai.OpenAI(**kwargs) as client:
            return fn(client)

    return await asyncio.to_thread(work)


async def raw_anthropic(url: str, mode: str, **params: Any) -> tuple[dict[str, str], anthropic.types.Message]:
    """`messages.with_raw_response.create`: the headers, and the Message the SDK parsed."""

    async def run_async(client: anthropic.AsyncAnthropic) -> tuple[dict[str, str], Any]:
        raw = await client.messages.with_raw_response.create(**params)
        return dict(raw.headers), await raw.parse()

    def run_sync(client: anthropic.Anthropic) -> tuple[dict[str, str], Any]:
        raw = client.messages.with_raw_response.create(**params)
        return dict(raw.headers), raw.parse()

    headers, message = await with_anthropic(url, mode, run_async if mode == "async" else run_sync)
    assert isinstance(message, anthropic.types.Message)
    anthropic.types.Message.model_validate(message.model_dump())  # a strict parse, not just construct()
    return headers, message


async def raw_openai(
    url: str, mode: str, **params: Any
) -> tuple[dict[str, str], openai.types.chat.ChatCompletion]:
    async def run_async(client: openai.AsyncOpenAI) -> tuple[dict[str, str], Any]:
        raw = await client.chat.completions.with_raw_response.create(**params)
        return dict(raw.headers), await _settle(raw.parse())

    def run_sync(client: openai.OpenAI) -> tuple[dict[str, str], Any]:
        raw = client.chat.completions.with_raw_response.create(**params)
        return dict(raw.headers), raw.parse()

    headers, completion = await with_openai(url, mode, run_async if mode == "async" else run_sync)
    assert isinstance(completion, openai.types.chat.ChatCompletion)
    openai.types.chat.ChatCompletion.model_validate(completion.model_dump())
    return headers, completion


STREAM_HEADERS: dict[str, str] = {}
"""The response headers of the last `anthropic_stream` (the SDK's stream keeps its HTTP response)."""


async def anthropic_stream(url: str, mode: str, **params: Any) -> tuple[str, anthropic.types.Message]:
    """`messages.stream(...)`: the text as the app saw it arrive, and `get_final_message()`."""

    async def run_async(client: anthropic.AsyncAnthropic) -> tuple[str, Any]:
        async with client.messages.stream(**params) as stream:
            STREAM_HEADERS.clear()
            STREAM_HEADERS.update(stream.response.headers)
            text = "".join([piece async for piece in stream.text_stream])
            return text, await stream.get_final_message()

    def run_sync(client: anthropic.Anthropic) -> tuple[str, Any]:
        with client.messages.stream(**params) as stream:
            STREAM_HEADERS.clear()
            STREAM_HEADERS.update(stream.response.headers)
            text = "".join(stream.text_stream)
            return text, stream.get_final_message()

    text, message = await with_anthropic(url, mode, run_async if mode == "async" else run_sync)
    assert isinstance(message, anthropic.types.Message)
    return text, message


async def openai_chunks(url: str, mode: str, **params: Any) -> list[openai.types.chat.ChatCompletionChunk]:
    """`chat.completions.create(stream=True)`: every chunk the SDK yielded."""

    async def run_async(client: openai.AsyncOpenAI) -> list[Any]:
        stream = await client.chat.completions.create(stream=True, **params)
        return [chunk async for chunk in stream]

    def run_sync(client: openai.OpenAI) -> list[Any]:
        return list(client.chat.completions.create(stream=True, **params))

    chunks: list[openai.types.chat.ChatCompletionChunk] = await with_openai(
        url, mode, run_async if mode == "async" else run_sync
    )
    return chunks


def request_log(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "llmroute.requests"]


def assert_sidecar_key_only(rec: RecordedRequest, kind: str) -> None:
    """The provider saw the policy's key, and nothing of the app's."""
    headers = rec.headers
    if kind == "anthropic":
        assert headers.get("x-api-key") == KEYS["anthropic"]
        assert "authorization" not in headers
    elif kind == "openai":
        assert headers.get("authorization") == f"Bearer {KEYS['openai']}"
        assert "x-api-key" not in headers
    else:
        assert headers.get("x-goog-api-key") == KEYS["gemini"] or rec.query.get("key") == KEYS["gemini"]
    assert not any(APP_KEY in value for value in headers.values())
    assert APP_KEY.encode() not in rec.raw_body


def sse_events(raw: str) -> list[tuple[str | None, str]]:
    """(event name, data) of every SSE event in a body."""
    out: list[tuple[str | None, str]] = []
    for block in raw.replace("\r\n", "\n").strip().split("\n\n"):
        name: str | None = None
        data: list[str] = []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            out.append((name, "\n".join(data)))
    return out


# ----- plain pass-through ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
async def test_anthropic_pass_through_is_faithful(
    fakes: tuple[FakeProvider, FakeProvider], mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    primary, fallback = fakes
    caplog.set_level(logging.INFO, logger="llmroute.requests")
    primary.reply_text = "A short summary."
    params: dict[str, Any] = {
        "model": "claude-the-app-asked-for",
        "max_tokens": 123,
        "system": [{"type": "text", "text": "You are the app's own system prompt."}],
        "messages": [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": [{"type": "text", "text": "Hi! What's up?"}]},
            {"role": "user", "content": [{"type": "text", "text": "Summarize the ticket"}]},
        ],
        "stop_sequences": ["END"],
        "metadata": {"user_id": "user-42"},
        "output_config": {"effort": "low"},
    }
    extra = {"temperature": 0.3, "top_k": 7}  # this SDK has no such arguments; apps pass them this way
    async with running_sidecar(document(primary, fallback)) as (url, _):
        headers, message = await raw_anthropic(url, mode, **params, extra_body=extra)
    assert message.content[0].type == "text" and message.content[0].text == "A short summary."
    assert headers["llmroute-degraded"] == "false" and headers["llmroute-target"] == "primary"
    assert headers["llmroute-route"] == "summarize" and headers["llmroute-attempts"] == "1"
    assert primary.count() == 1 and fallback.count() == 0
    sent = primary.last.body
    assert sent["model"] == PRIMARY_MODEL["anthropic"]
    assert sent.get("stream") in (None, False)
    assert {k: v for k, v in sent.items() if k not in ("model", "stream")} == {
        **{k: v for k, v in params.items() if k != "model"},
        **extra,
    }
    assert_sidecar_key_only(primary.last, "anthropic")
    assert APP_KEY not in caplog.text


@pytest.mark.parametrize("mode", MODES)
async def test_anthropic_stream_pass_through_relays_claude_events(
    fakes: tuple[FakeProvider, FakeProvider], mode: str
) -> None:
    primary, fallback = fakes
    primary.reply_text = FULL
    async with running_sidecar(document(primary, fallback)) as (url, _):
        text, message = await anthropic_stream(
            url, mode, model="claude-app", max_tokens=50, messages=USER, extra_body={"temperature": 0.5}
        )
    assert text == FULL and message.content[0].type == "text" and message.content[0].text == FULL
    assert message.stop_reason == "end_turn" and message.usage.output_tokens > 0
    sent = primary.last.body
    assert sent["stream"] is True and sent["model"] == PRIMARY_MODEL["anthropic"]
    assert sent["messages"] == USER and sent["max_tokens"] == 50 and sent["temperature"] == 0.5
    assert_sidecar_key_only(primary.last, "anthropic")


@pytest.mark.parametrize("mode", MODES)
async def test_openai_pass_through_is_faithful(fakes: tuple[FakeProvider, FakeProvider], mode: str) -> None:
    primary, fallback = fakes
    primary.reply_text = "A short summary."
    params: dict[str, Any] = {
        "model": "gpt-the-app-asked-for",
        "messages": [
            {"role": "developer", "content": "You are the app's own system prompt."},
            {"role": "user", "content": "Summarize the ticket"},
        ],
        "max_completion_tokens": 77,
        "temperature": 0.2,
        "seed": 7,
        "user": "user-42",
        "stop": ["END"],
    }
    async with running_sidecar(document(primary, fallback, primary_type="openai", fallback_type="anthropic")) as (
        url,
        _,
    ):
        headers, completion = await raw_openai(url, mode, **params)
    assert completion.choices[0].message.content == "A short summary."
    assert headers["llmroute-degraded"] == "false" and headers["llmroute-target"] == "primary"
    assert primary.count() == 1 and fallback.count() == 0
    sent = primary.last.body
    assert sent["model"] == PRIMARY_MODEL["openai"]
    assert sent.get("stream") in (None, False) and "stream_options" not in sent
    assert {k: v for k, v in sent.items() if k not in ("model", "stream")} == {
        k: v for k, v in params.items() if k != "model"
    }
    assert_sidecar_key_only(primary.last, "openai")


@pytest.mark.parametrize("mode", MODES)
async def test_openai_stream_pass_through_keeps_the_usage_chunk_the_app_asked_for(
    fakes: tuple[FakeProvider, FakeProvider], mode: str
) -> None:
    primary, fallback = fakes
    primary.reply_text = FULL
    doc = document(primary, fallback, primary_type="openai", fallback_type="anthropic")
    async with running_sidecar(doc) as (url, _):
        with_usage = await openai_chunks(
            url, mode, model="gpt-app", messages=USER, stream_options={"include_usage": True}
        )
        without = await openai_chunks(url, mode, model="gpt-app", messages=USER)
    for chunks in (with_usage, without):
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == FULL
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert with_usage[-1].choices == [] and with_usage[-1].usage is not None
    assert with_usage[-1].usage.completion_tokens > 0
    assert all(c.choices for c in without) and all(c.usage is None for c in without)
    assert_sidecar_key_only(primary.last, "openai")


# ----- a stream cut mid-way -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
async def test_cut_stream_resumes_by_prefill_and_the_text_arrives_once(
    fakes: tuple[FakeProvider, FakeProvider], mode: str
) -> None:
    primary, fallback = fakes
    primary.script(CutStream(text=FULL, after_chunks=2), Reply(text=FULL))
    async with running_sidecar(document(primary, fallback)) as (url, _):
        text, message = await anthropic_stream(url, mode, model="claude-app", max_tokens=100, messages=USER)

        async def final_text_async(client: anthropic.AsyncAnthropic) -> str:
            async with client.messages.stream(model="m", max_tokens=100, messages=USER) as stream:
                return await stream.get_final_text()

        def final_text_sync(client: anthropic.Anthropic) -> str:
            with client.messages.stream(model="m", max_tokens=100, messages=USER) as stream:
                return stream.get_final_text()

        primary.script(CutStream(text=FULL, after_chunks=4), Reply(text=FULL))
        again = await with_anthropic(url, mode, final_text_async if mode == "async" else final_text_sync)
    assert text == FULL
    assert message.content[0].type == "text" and message.content[0].text == FULL
    assert message.stop_reason == "end_turn"
    assert again == FULL
    assert fallback.count() == 0
    first, resumed = primary.requests[0], primary.requests[1]
    assert first.prefill is None and first.outcome == "aborted"
    assert resumed.prefill == "The quick"  # two words streamed, trailing space trimmed for Anthropic
    assert resumed.body["messages"][:-1] == USER
    assert primary.requests[3].prefill == "The quick brown fox"


@pytest.mark.parametrize("mode", MODES)
async def test_cut_stream_with_resume_off_makes_the_sdk_raise(
    fakes: tuple[FakeProvider, FakeProvider], mode: str
) -> None:
    primary, fallback = fakes
    primary.script(CutStream(text=FULL, after_chunks=2))
    async with running_sidecar(document(primary, fallback, route={"resumeStreams": False})) as (url, _):
        with pytest.raises(anthropic.APIError) as caught:
            await anthropic_stream(url, mode, model="claude-app", max_tokens=100, messages=USER)
    assert "upstream stream broke" in str(caught.value)
    assert primary.count() == 1 and fallback.count() == 0  # no other model spliced in


async def test_no_futile_resume_when_extended_thinking_is_on(fakes: tuple[FakeProvider, FakeProvider]) -> None:
    """Anthropic refuses an assistant prefill with thinking enabled: the break is reported at once."""
    primary, fallback = fakes
    primary.script(CutStream(text=FULL, after_chunks=2), Reply(text=FULL))
    thinking: Any = {"type": "enabled", "budget_tokens": 1024}
    async with running_sidecar(document(primary, fallback)) as (url, _):
        with pytest.raises(anthropic.APIError):
            await anthropic_stream(url, "async", model="m", max_tokens=2000, messages=USER, thinking=thinking)
    assert primary.count() == 1 and fallback.count() == 0


@pytest.mark.parametrize("mode", MODES)
async def test_stream_error_before_the_first_token_fails_over_invisibly(
    fakes: tuple[FakeProvider, FakeProvider], mode: str
) -> None:
    """Nothing reached the app yet: the next attempt's stream is the only one the SDK sees."""
    primary, fallback = fakes
    primary.script(StreamError(text=FULL, after_chunks=0), CutStream(text=FULL, after_chunks=0), Reply(text=FULL))
    async with running_sidecar(document(primary, fallback)) as (url, _):
        text, message = await anthropic_stream(url, mode, model="m", max_tokens=100, messages=USER)
        assert STREAM_HEADERS["llmroute-attempts"] == "3" and STREAM_HEADERS["llmroute-degraded"] == "false"
        primary.default = StreamError(text=FULL, after_chunks=0)
        fallback.reply_text = FULL
        translated = await openai_chunks(url, mode, model="m", messages=USER)
    assert text == FULL and message.content[0].type == "text" and message.content[0].text == FULL
    assert "".join(c.choices[0].delta.content or "" for c in translated if c.choices) == FULL
    assert sum(1 for c in translated if c.choices and c.choices[0].delta.role) == 1
    assert all(r.prefill is None for r in primary.requests)


@pytest.mark.parametrize(
    "after_cut",
    [
        pytest.param([Fail(529)], id="resume-refused"),
        pytest.param([CutStream(text=FULL, after_chunks=1)] * 3, id="resume-cut-again-and-again"),
        pytest.param([StreamError(text=FULL, after_chunks=1, error_type="overloaded_error")] * 3, id="error-event"),
    ],
)
async def test_cut_stream_whose_resume_fails_makes_the_sdk_raise(
    fakes: tuple[FakeProvider, FakeProvider], after_cut: list[Any]
) -> None:
    primary, fallback = fakes
    primary.script(CutStream(text=FULL, after_chunks=2), *after_cut)
    seen: list[str] = []

    async def consume(client: anthropic.AsyncAnthropic) -> None:
        async with client.messages.stream(model="m", max_tokens=100, messages=USER) as stream:
            async for piece in stream.text_stream:
                seen.append(piece)

    async with running_sidecar(document(primary, fallback)) as (url, _):
        with pytest.raises(anthropic.APIError):
            await with_anthropic(url, "async", consume)
    assert "".join(seen) != FULL
    assert fallback.count() == 0


@pytest.mark.parametrize("mode", MODES)
async def test_openai_cut_stream_cannot_resume_and_the_sdk_raises(
    fakes: tuple[FakeProvider, FakeProvider], mode: str
) -> None:
    primary, fallback = fakes
    primary.script(CutStream(text=FULL, after_chunks=2))
    doc = document(primary, fallback, primary_type="openai", fallback_type="anthropic")
    async with running_sidecar(doc) as (url, _):
        with pytest.raises(openai.APIError):
            await openai_chunks(url, mode, model="gpt-app", messages=USER)
    assert primary.count() == 1 and fallback.count() == 0


@pytest.mark.parametrize("mode", MODES)
async def test_openai_app_on_a_claude_primary_resumes_a_cut_stream_too(
    fakes: tuple[FakeProvider, FakeProvider], mode: str
) -> None:
    """The resume is the target's business, whatever the app speaks: the OpenAI SDK sees one stream."""
    primary, fallback = fakes
    primary.script(CutStream(text=FULL, after_chunks=3), Reply(text=FULL))
    async with running_sidecar(document(primary, fallback)) as (url, _):
        chunks = await openai_chunks(
            url, mode, model="m", messages=USER, stream_options={"include_usage": True}
        )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == FULL
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert len({c.id for c in chunks}) == 1
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.role) == 1
    assert chunks[-1].usage is not None
    assert primary.requests[1].prefill == "The quick brown" and fallback.count() == 0


# ----- answers from a fallback of another provider ----------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
async def test_anthropic_app_gets_a_valid_message_from_an_openai_fallback(
    fakes: tuple[FakeProvider, FakeProvider], mode: str
) -> None:
    primary, fallback = fakes
    primary.default = Fail(529)
    fallback.reply_text = "Backup summary."
    async with running_sidecar(document(primary, fallback)) as (url, _):
        headers, message = await raw_anthropic(
            url,
            mode,
            model="claude-app",
            max_tokens=99,
            system="The app's system prompt",
            messages=USER,
            stop_sequences=["END"],
            extra_body={"temperature": 0.4},
        )
    assert headers["llmroute-degraded"] == "true" and headers["llmroute-target"] == "backup"
    assert headers["llmroute-provider"] == "gpt" and headers["llmroute-shed-reason"] in ("budget-exhausted", "circuit-open")
    assert message.type == "message" and message.role == "assistant"
    assert [(b.type, getattr(b, "text", None)) for b in message.content] == [("text", "Backup summary.")]
    assert message.stop_reason == "end_turn" and message.model == FALLBACK_MODEL["openai"]
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    assert primary.count() >= 1
    sent = fallback.last.body
    assert sent["model"] == FALLBACK_MODEL["openai"]
    assert sent["messages"] == [
        {"role": "system", "content": BACKUP_SYSTEM},
        {"role": "user", "content": USER[0]["content"]},
    ]
    assert sent["max_tokens"] == 99 and sent["temperature"] == 0.4 and sent["stop"] == ["END"]
    assert_sidecar_key_only(fallback.last, "openai")


@pytest.mark.parametrize("mode", MODES)
async def test_openai_app_gets_a_valid_completion_from_an_anthropic_fallback(
    fakes: tuple[FakeProvider, FakeProvider], mode: str
) -> None:
    primary, fallback = fakes
    primary.default = Fail(503)
    fallback.reply_text = "Backup summary."
    doc = document(primary, fallback, primary_type="openai", fallback_type="anthropic")
    async with running_sidecar(doc) as (url, _):
        headers, completion = await raw_openai(
            url,
            mode,
            model="gpt-app",
            messages=[{"role": "system", "content": "The app's prompt"}, *USER],
            max_tokens=99,
            temperature=0.4,
        )
    assert headers["llmroute-degraded"] == "true" and headers["llmroute-target"] == "backup"
    choice = completion.choices[0]
    assert choice.message.content == "Backup summary." and choice.message.role == "assistant"
    assert choice.finish_reason == "stop" and completion.object == "chat.completion"
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    assert completion.model == FALLBACK_MODEL["anthropic"]
    sent = fallback.last.body
    assert sent["model"] == FALLBACK_MODEL["anthropic"] and sent["system"] == BACKUP_SYSTEM
    assert sent["messages"] == [{"role": "user", "content": [{"type": "text", "text": USER[0]["content"]}]}]
    assert sent["max_tokens"] == 99 and sent["temperature"] == 0.4
    assert_sidecar_key_only(fallback.last, "anthropic")


async def test_same_provider_fallback_gets_its_own_model_and_system_prompt(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    primary, fallback = fakes
    primary.default = Fail(529)
    doc = document(primary, fallback, fallback_type="anthropic")
    async with running_sidecar(doc) as (url, _):
        headers, message = await raw_anthropic(
            url, "async", model="claude-app", max_tokens=10, system="app prompt", messages=USER
        )
    assert headers["llmroute-degraded"] == "true" and message.content
    sent = fallback.last.body
    assert sent["model"] == FALLBACK_MODEL["anthropic"] and sent["system"] == BACKUP_SYSTEM
    assert sent["messages"] == USER and sent["max_tokens"] == 10


async def test_images_and_stop_reasons_are_translated(fakes: tuple[FakeProvider, FakeProvider]) -> None:
    primary, fallback = fakes
    primary.default = Fail(529)
    fallback.script(Reply(text="A red dot", stop_reason="length"), Reply(text="A red", stop_reason="length"))
    pixel = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
    messages: Any = [
        {
            "role": "user",
            "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": pixel}},
                {"type": "text", "text": "What is this?"},
            ],
        }
    ]
    async with running_sidecar(document(primary, fallback)) as (url, _):
        _, message = await raw_anthropic(url, "async", model="m", max_tokens=3, messages=messages)
        _, streamed = await anthropic_stream(url, "async", model="m", max_tokens=3, messages=messages)
    assert message.stop_reason == "max_tokens" and streamed.stop_reason == "max_tokens"
    content = fallback.requests[0].body["messages"][1]["content"]
    assert content == [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{pixel}"}},
        {"type": "text", "text": "What is this?"},
    ]

    primary.clear()
    fallback.clear()
    primary.default = Fail(503)
    fallback.script(Reply(text="Cut", stop_reason="max_tokens"), Reply(text="Cut", stop_reason="max_tokens"))
    doc = document(primary, fallback, primary_type="openai", fallback_type="anthropic")
    async with running_sidecar(doc) as (url, _):
        _, completion = await raw_openai(url, "async", model="m", messages=USER, max_tokens=1)
        chunks = await openai_chunks(url, "async", model="m", messages=USER, max_tokens=1)
    assert completion.choices[0].finish_reason == "length"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


# ----- tool use round trips --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
async def test_tool_round_trip_anthropic_app_openai_fallback(
    fakes: tuple[FakeProvider, FakeProvider], mode: str
) -> None:
    primary, fallback = fakes
    primary.default = Fail(529)
    fallback.script(Reply(tool_call=ToolCall(arguments={"city": "Paris"})), Reply(text="Sunny in Paris."))
    question: Any = [{"role": "user", "content": "Weather in Paris?"}]
    async with running_sidecar(document(primary, fallback)) as (url, _):
        headers, first = await raw_anthropic(
            url, mode, model="claude-app", max_tokens=200, messages=question, tools=ANTHROPIC_TOOLS
        )
        assert first.stop_reason == "tool_use" and headers["llmroute-degraded"] == "true"
        (call,) = [b for b in first.content if b.type == "tool_use"]
        assert call.name == "get_weather" and call.input == {"city": "Paris"}
        turn: Any = [
            *question,
            {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "21C, sun"}]},
        ]
        _, second = await raw_anthropic(
            url, mode, model="claude-app", max_tokens=200, messages=turn, tools=ANTHROPIC_TOOLS
        )
    assert second.content[0].type == "text" and second.content[0].text == "Sunny in Paris."
    declared = fallback.requests[0].body["tools"]
    assert declared == [
        {
            "type": "function",
            "function": {"name": "get_weather", "description": "Weather in a city", "parameters": CITY_SCHEMA},
        }
    ]
    sent = fallback.requests[1].body["messages"]
    assert sent[0] == {"role": "system", "content": BACKUP_SYSTEM}
    assert sent[1] == {"role": "user", "content": "Weather in Paris?"}
    assert sent[2]["role"] == "assistant" and not sent[2].get("content")
    (wire_call,) = sent[2]["tool_calls"]
    assert wire_call["id"] == call.id and wire_call["function"]["name"] == "get_weather"
    assert json.loads(wire_call["function"]["arguments"]) == {"city": "Paris"}
    assert sent[3] == {"role": "tool", "tool_call_id": call.id, "content": "21C, sun"}
    assert len(sent) == 4


@pytest.mark.parametrize("mode", MODES)
async def test_tool_round_trip_openai_app_anthropic_fallback(
    fakes: tuple[FakeProvider, FakeProvider], mode: str
) -> None:
    primary, fallback = fakes
    primary.default = Fail(503)
    fallback.script(Reply(tool_call=ToolCall(arguments={"city": "Paris"})), Reply(text="Sunny in Paris."))
    question: Any = [{"role": "user", "content": "Weather in Paris?"}]
    doc = document(primary, fallback, primary_type="openai", fallback_type="anthropic")
    async with running_sidecar(doc) as (url, _):
        _, first = await raw_openai(url, mode, model="gpt-app", messages=question, tools=OPENAI_TOOLS)
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.tool_calls is not None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        turn: Any = [
            *question,
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "21C, sun"},
        ]
        _, second = await raw_openai(url, mode, model="gpt-app", messages=turn, tools=OPENAI_TOOLS)
    assert second.choices[0].message.content == "Sunny in Paris."
    assert fallback.requests[0].body["tools"] == [
        {"name": "get_weather", "description": "Weather in a city", "input_schema": CITY_SCHEMA}
    ]
    sent = fallback.requests[1].body
    assert sent["system"] == BACKUP_SYSTEM
    assert sent["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": call.id, "name": "get_weather", "input": {"city": "Paris"}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "21C, sun"}]},
    ]


@pytest.mark.parametrize("mode", MODES)
async def test_streamed_tool_call_from_an_openai_fallback(
    fakes: tuple[FakeProvider, FakeProvider], mode: str
) -> None:
    primary, fallback = fakes
    primary.default = Fail(529)
    fallback.script(Reply(tool_call=ToolCall(arguments={"city": "Paris", "days": 3})))
    async with running_sidecar(document(primary, fallback)) as (url, _):
        _, message = await anthropic_stream(
            url, mode, model="claude-app", max_tokens=200, messages=USER, tools=ANTHROPIC_TOOLS
        )
    (call,) = [b for b in message.content if b.type == "tool_use"]
    assert call.name == "get_weather" and call.input == {"city": "Paris", "days": 3}
    assert message.stop_reason == "tool_use"


@pytest.mark.parametrize("mode", MODES)
async def test_streamed_tool_call_from_an_anthropic_fallback(
    fakes: tuple[FakeProvider, FakeProvider], mode: str
) -> None:
    primary, fallback = fakes
    primary.default = Fail(503)
    fallback.script(Reply(tool_call=ToolCall(arguments={"city": "Paris", "days": 3})))
    doc = document(primary, fallback, primary_type="openai", fallback_type="anthropic")
    async with running_sidecar(doc) as (url, _):
        chunks = await openai_chunks(url, mode, model="gpt-app", messages=USER, tools=OPENAI_TOOLS)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].id and calls[0].function is not None and calls[0].function.name == "get_weather"
    arguments = "".join(tc.function.arguments or "" for tc in calls if tc.function is not None)
    assert json.loads(arguments) == {"city": "Paris", "days": 3}
    assert {tc.index for tc in calls} == {0}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


# ----- streams through the SDK helpers, translated ---------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
async def test_anthropic_stream_helper_with_an_openai_fallback(
    fakes: tuple[FakeProvider, FakeProvider], mode: str
) -> None:
    primary, fallback = fakes
    primary.default = Fail(529)
    fallback.reply_text = FULL
    async with running_sidecar(document(primary, fallback)) as (url, _):
        text, message = await anthropic_stream(url, mode, model="claude-app", max_tokens=100, messages=USER)
    assert text == FULL
    assert STREAM_HEADERS["llmroute-degraded"] == "true" and STREAM_HEADERS["llmroute-target"] == "backup"
    assert STREAM_HEADERS["content-type"].startswith("text/event-stream")
    assert [(b.type, getattr(b, "text", None)) for b in message.content] == [("text", FULL)]
    assert message.stop_reason == "end_turn" and message.model == FALLBACK_MODEL["openai"]
    assert message.usage.output_tokens > 0 and message.usage.input_tokens > 0
    anthropic.types.Message.model_validate(message.model_dump())
    assert fallback.last.stream is True


@pytest.mark.parametrize("mode", MODES)
async def test_openai_stream_helper_with_an_anthropic_fallback(
    fakes: tuple[FakeProvider, FakeProvider], mode: str
) -> None:
    primary, fallback = fakes
    primary.default = Fail(503)
    fallback.reply_text = FULL
    doc = document(primary, fallback, primary_type="openai", fallback_type="anthropic")

    async def helper_async(client: openai.AsyncOpenAI) -> tuple[str, Any]:
        async with client.chat.completions.stream(model="gpt-app", messages=USER) as stream:
            text = "".join([e.delta async for e in stream if e.type == "content.delta"])
            return text, await stream.get_final_completion()

    def helper_sync(client: openai.OpenAI) -> tuple[str, Any]:
        with client.chat.completions.stream(model="gpt-app", messages=USER) as stream:
            text = "".join(e.delta for e in stream if e.type == "content.delta")
            return text, stream.get_final_completion()

    async with running_sidecar(doc) as (url, _):
        text, final = await with_openai(url, mode, helper_async if mode == "async" else helper_sync)
        chunks = await openai_chunks(
            url, mode, model="gpt-app", messages=USER, stream_options={"include_usage": True}
        )
    assert text == FULL
    assert final.choices[0].message.content == FULL and final.choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == FULL
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].usage.prompt_tokens > 0
    assert len({c.id for c in chunks}) == 1


# ----- the sidecar gives up: no SDK retries on top -------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
async def test_anthropic_sdk_does_not_retry_what_the_sidecar_gave_up_on(
    fakes: tuple[FakeProvider, FakeProvider], mode: str
) -> None:
    primary, fallback = fakes
    primary.default = Fail(529)
    fallback.default = Fail(500)
    async with running_sidecar(document(primary, fallback)) as (url, _):
        with pytest.raises(anthropic.OverloadedError) as caught:  # default max_retries=2
            await with_anthropic(url, mode, lambda c: c.messages.create(model="m", max_tokens=5, messages=USER))
    error = caught.value
    assert error.status_code == 529
    assert error.response.headers["x-should-retry"] == "false"
    assert isinstance(error.body, dict) and error.body["error"]["type"] == "overloaded_error"
    made = int(error.response.headers["llmroute-attempts"])
    assert primary.count() + fallback.count() == made  # one sidecar call: the SDK did not retry it
    assert primary.count() >= 1 and fallback.count() >= 1


@pytest.mark.parametrize("mode", MODES)
async def test_openai_sdk_does_not_retry_what_the_sidecar_gave_up_on(
    fakes: tuple[FakeProvider, FakeProvider], mode: str
) -> None:
    primary, fallback = fakes
    primary.default = Fail(503)
    fallback.default = Fail(529)
    doc = document(primary, fallback, primary_type="openai", fallback_type="anthropic")
    async with running_sidecar(doc) as (url, _):
        with pytest.raises(openai.InternalServerError) as caught:
            await with_openai(url, mode, lambda c: c.chat.completions.create(model="m", messages=USER))
    error = caught.value
    assert error.status_code == 503  # the primary's error, not the fallback's
    assert error.response.headers["x-should-retry"] == "false"
    assert "overloaded" in error.message
    assert primary.count() + fallback.count() == int(error.response.headers["llmroute-attempts"])


async def test_translated_give_up_carries_the_primarys_error(fakes: tuple[FakeProvider, FakeProvider]) -> None:
    """An OpenAI app whose Anthropic primary is overloaded: 529 in OpenAI's envelope, no SDK retry."""
    primary, fallback = fakes
    primary.default = Fail(529)
    fallback.default = Fail(500)
    doc = document(primary, fallback, primary_type="anthropic", fallback_type="openai")
    async with running_sidecar(doc) as (url, _):
        with pytest.raises(openai.APIStatusError) as caught:
            await with_openai(url, "async", lambda c: c.chat.completions.create(model="m", messages=USER))
    error = caught.value
    assert error.status_code == 529 and error.response.headers["x-should-retry"] == "false"
    assert isinstance(error.body, dict) and "Overloaded" in str(error.body.get("message"))
    assert primary.count() + fallback.count() == int(error.response.headers["llmroute-attempts"])


async def test_a_request_that_is_itself_an_sdk_retry_gets_no_retries_of_ours(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    """PROVIDERS.md 2: `x-stainless-retry-count` > 0 means the SDK already retries; the sidecar makes
    one attempt per target instead of multiplying (here the header is set as the SDK's retry sets it)."""
    primary, fallback = fakes
    primary.default = Fail(529)
    fallback.reply_text = "from the backup"
    async with running_sidecar(document(primary, fallback, route={"budget": "2s"})) as (url, _):
        headers, message = await raw_anthropic(
            url, "async", model="m", max_tokens=5, messages=USER, extra_headers={"x-stainless-retry-count": "1"}
        )
    assert primary.count() == 1 and fallback.count() == 1
    assert headers["llmroute-degraded"] == "true" and message.content[0].type == "text"


# ----- client errors from the primary ---------------------------------------------------------------
CLIENT_ERRORS = [
    (400, anthropic.BadRequestError, openai.BadRequestError),
    (401, anthropic.AuthenticationError, openai.AuthenticationError),
    (403, anthropic.PermissionDeniedError, openai.PermissionDeniedError),
    (404, anthropic.NotFoundError, openai.NotFoundError),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("status", "anthropic_error", "openai_error"), CLIENT_ERRORS)
async def test_client_error_reaches_the_sdk_as_its_own_type(
    fakes: tuple[FakeProvider, FakeProvider],
    mode: str,
    status: int,
    anthropic_error: type[Exception],
    openai_error: type[Exception],
) -> None:
    primary, fallback = fakes
    primary.script(Fail(status, message="the provider's own words"))
    async with running_sidecar(document(primary, fallback)) as (url, _):
        with pytest.raises(anthropic_error) as caught:
            await with_anthropic(url, mode, lambda c: c.messages.create(model="m", max_tokens=5, messages=USER))
    assert isinstance(caught.value, anthropic.APIStatusError) and caught.value.status_code == status
    assert "the provider's own words" in str(caught.value)
    assert primary.count() == 1 and fallback.count() == 0

    primary.clear()
    primary.script(Fail(status, message="the provider's own words"))
    doc = document(primary, fallback, primary_type="openai", fallback_type="anthropic")
    async with running_sidecar(doc) as (url, _):
        with pytest.raises(openai_error) as caught_openai:
            await with_openai(url, mode, lambda c: c.chat.completions.create(model="m", messages=USER))
    assert isinstance(caught_openai.value, openai.APIStatusError) and caught_openai.value.status_code == status
    assert "the provider's own words" in str(caught_openai.value)
    assert primary.count() == 1 and fallback.count() == 0


async def test_client_error_of_another_dialect_is_translated(fakes: tuple[FakeProvider, FakeProvider]) -> None:
    """An OpenAI app whose primary is Claude: Anthropic's 400 becomes openai.BadRequestError."""
    primary, fallback = fakes
    primary.script(Fail(400, message="messages: roles must alternate"))
    async with running_sidecar(document(primary, fallback)) as (url, _):
        with pytest.raises(openai.BadRequestError) as caught:
            await with_openai(url, "async", lambda c: c.chat.completions.create(model="m", messages=USER))
    assert "roles must alternate" in caught.value.message
    assert primary.count() == 1 and fallback.count() == 0


@pytest.mark.parametrize("mode", MODES)
async def test_streaming_requests_get_errors_before_commit_as_plain_sdk_exceptions(
    fakes: tuple[FakeProvider, FakeProvider], mode: str
) -> None:
    """A stream that never committed fails like a plain call: the client error as the SDK's own type,
    and the sidecar's give-up with no SDK retry on top."""
    primary, fallback = fakes
    primary.script(Fail(400, message="bad max_tokens"))
    async with running_sidecar(document(primary, fallback)) as (url, _):
        with pytest.raises(anthropic.BadRequestError):
            await anthropic_stream(url, mode, model="m", max_tokens=5, messages=USER)
        assert primary.count() == 1 and fallback.count() == 0
        primary.default = Fail(529)
        fallback.default = Fail(500)
        with pytest.raises(anthropic.OverloadedError) as caught:
            await anthropic_stream(url, mode, model="m", max_tokens=5, messages=USER)
    made = int(caught.value.response.headers["llmroute-attempts"])
    assert primary.count() + fallback.count() == 1 + made

    primary.clear()
    fallback.clear()
    primary.script(Fail(401))
    doc = document(primary, fallback, primary_type="openai", fallback_type="anthropic")
    async with running_sidecar(doc) as (url, _):
        with pytest.raises(openai.AuthenticationError):
            await openai_chunks(url, mode, model="m", messages=USER)
        assert primary.count() == 1 and fallback.count() == 0
        primary.default = Fail(503)
        fallback.default = Fail(529)
        with pytest.raises(openai.InternalServerError) as caught_openai:
            await openai_chunks(url, mode, model="m", messages=USER)
    made = int(caught_openai.value.response.headers["llmroute-attempts"])
    assert primary.count() + fallback.count() == 1 + made


# ----- routing -----------------------------------------------------------------------------------------
def routed_document(primary: FakeProvider, fallback: FakeProvider, default: str | None) -> dict[str, Any]:
    doc = document(primary, fallback)
    base = doc["spec"]["routes"][0]
    routes = [base]
    for name in ("chat", "claude-fast"):
        route = json.loads(json.dumps(base))
        route["name"] = name
        route["targets"][0]["model"] = f"model-of-{name}"
        routes.append(route)
    doc["spec"]["routes"] = routes
    doc["spec"]["defaultRoute"] = default
    return doc


@pytest.mark.parametrize("mode", MODES)
async def test_routing_by_header_then_model_then_default(
    fakes: tuple[FakeProvider, FakeProvider], mode: str
) -> None:
    primary, fallback = fakes
    async with running_sidecar(routed_document(primary, fallback, "summarize")) as (url, _):
        by_header, _ = await raw_anthropic(
            url, mode, model="claude-fast", max_tokens=5, messages=USER, extra_headers={"llmroute-route": "chat"}
        )
        assert primary.last.model == "model-of-chat"
        by_model, _ = await raw_anthropic(url, mode, model="claude-fast", max_tokens=5, messages=USER)
        assert primary.last.model == "model-of-claude-fast"
        by_default, _ = await raw_anthropic(url, mode, model="claude-unknown", max_tokens=5, messages=USER)
        assert primary.last.model == PRIMARY_MODEL["anthropic"]
        openai_headers, _ = await raw_openai(url, mode, model="claude-fast", messages=USER)
        assert primary.last.model == "model-of-claude-fast"
    assert by_header["llmroute-route"] == "chat"
    assert by_model["llmroute-route"] == "claude-fast" and openai_headers["llmroute-route"] == "claude-fast"
    assert by_default["llmroute-route"] == "summarize"


@pytest.mark.parametrize("mode", MODES)
async def test_unknown_route_is_a_404_in_each_dialect(fakes: tuple[FakeProvider, FakeProvider], mode: str) -> None:
    primary, fallback = fakes
    async with running_sidecar(routed_document(primary, fallback, None)) as (url, _):
        with pytest.raises(anthropic.NotFoundError) as caught:
            await with_anthropic(url, mode, lambda c: c.messages.create(model="nope", max_tokens=5, messages=USER))
        with pytest.raises(openai.NotFoundError) as caught_openai:
            await with_openai(url, mode, lambda c: c.chat.completions.create(model="nope", messages=USER))
        with pytest.raises(anthropic.NotFoundError) as caught_header:
            await with_anthropic(
                url,
                mode,
                lambda c: c.messages.create(
                    model="chat", max_tokens=5, messages=USER, extra_headers={"llmroute-route": "typo"}
                ),
            )
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "error" and body["error"]["type"] == "not_found_error"
    assert "nope" in body["error"]["message"]
    assert caught.value.response.headers["x-should-retry"] == "false"
    openai_body = caught_openai.value.body
    assert isinstance(openai_body, dict) and "nope" in str(openai_body.get("message"))
    assert "typo" in str(caught_header.value)
    assert primary.count() == 0 and fallback.count() == 0


# ----- a Gemini fallback -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
async def test_gemini_fallback_for_an_anthropic_app(fakes: tuple[FakeProvider, FakeProvider], mode: str) -> None:
    primary, fallback = fakes
    primary.default = Fail(529)
    fallback.script(
        Reply(text="Gemini says hi."),
        Reply(tool_call=ToolCall(arguments={"city": "Paris"})),
        Reply(text="Sunny in Paris."),
        Reply(text=FULL),
    )
    question: Any = [{"role": "user", "content": "Weather in Paris?"}]
    async with running_sidecar(document(primary, fallback, fallback_type="gemini")) as (url, _):
        headers, text = await raw_anthropic(url, mode, model="claude-app", max_tokens=50, messages=USER)
        _, first = await raw_anthropic(
            url, mode, model="claude-app", max_tokens=50, messages=question, tools=ANTHROPIC_TOOLS
        )
        (call,) = [b for b in first.content if b.type == "tool_use"]
        turn: Any = [
            *question,
            {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "21C"}]},
        ]
        _, second = await raw_anthropic(
            url, mode, model="claude-app", max_tokens=50, messages=turn, tools=ANTHROPIC_TOOLS
        )
        streamed, final = await anthropic_stream(url, mode, model="claude-app", max_tokens=50, messages=USER)
    assert headers["llmroute-degraded"] == "true" and headers["llmroute-provider"] == "gpt"
    assert text.content[0].type == "text" and text.content[0].text == "Gemini says hi."
    assert first.stop_reason == "tool_use" and call.name == "get_weather" and call.input == {"city": "Paris"}
    assert call.id
    assert second.content[0].type == "text" and second.content[0].text == "Sunny in Paris."
    assert streamed == FULL and final.stop_reason == "end_turn"
    asked = fallback.requests[0]
    assert asked.dialect == "gemini" and asked.model == FALLBACK_MODEL["gemini"]
    assert asked.body["systemInstruction"]["parts"] == [{"text": BACKUP_SYSTEM}]
    assert_sidecar_key_only(asked, "gemini")
    declared = fallback.requests[1].body["tools"][0]["functionDeclarations"][0]
    assert declared["name"] == "get_weather"
    contents = fallback.requests[2].body["contents"]
    assert contents[1]["role"] == "model"
    assert contents[1]["parts"][0]["functionCall"]["name"] == "get_weather"
    assert contents[1]["parts"][0]["functionCall"]["args"] == {"city": "Paris"}
    response = contents[2]["parts"][0]["functionResponse"]
    assert contents[2]["role"] == "user" and response["name"] == "get_weather"
    assert "21C" in json.dumps(response["response"])


# ----- untranslatable ------------------------------------------------------------------------------------
async def test_untranslatable_request_is_refused_for_the_fallback_not_silently_sent(
    fakes: tuple[FakeProvider, FakeProvider], caplog: pytest.LogCaptureFixture
) -> None:
    primary, fallback = fakes
    caplog.set_level(logging.INFO, logger="llmroute.requests")
    primary.default = Fail(529)
    document_block = {
        "type": "document",
        "source": {"type": "text", "media_type": "text/plain", "data": "The contract says 30 days."},
    }
    messages: Any = [
        {"role": "user", "content": [document_block, {"type": "text", "text": "How many days?"}]}
    ]
    async with running_sidecar(document(primary, fallback)) as (url, _):
        with pytest.raises(anthropic.OverloadedError) as caught:
            await with_anthropic(
                url, "async", lambda c: c.messages.create(model="m", max_tokens=5, messages=messages)
            )
    primary.default = Reply(text="30 days.")
    async with running_sidecar(document(primary, fallback)) as (url, _):  # fresh: the circuit is open now
        _, answered = await raw_anthropic(url, "async", model="m", max_tokens=5, messages=messages)
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert fallback.count() == 0  # never sent a request with the document silently dropped
    assert answered.content[0].type == "text" and answered.content[0].text == "30 days."
    assert primary.last.body["messages"] == messages  # Claude itself gets the document as sent
    (failed, _ok) = request_log(caplog)
    refused = [a for a in failed["attempts"] if a["target"] == "backup"]
    assert refused and refused[0]["status"] == "error"
    assert refused[0]["error"].startswith("untranslatable: ")  # not "connection": nothing was sent
    assert "document" in refused[0]["error"]


async def test_structured_output_request_is_not_silently_translated(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    primary, fallback = fakes
    primary.default = Fail(529)
    schema = {"type": "object", "properties": {"days": {"type": "integer"}}, "required": ["days"]}
    output_config: Any = {"format": {"type": "json_schema", "schema": schema}}
    async with running_sidecar(document(primary, fallback)) as (url, _):
        with pytest.raises(anthropic.OverloadedError):
            await with_anthropic(
                url,
                "async",
                lambda c: c.messages.create(model="m", max_tokens=5, messages=USER, output_config=output_config),
            )
    assert fallback.count() == 0


# ----- hostile downstream ----------------------------------------------------------------------------
async def test_malformed_json_and_wrong_shapes_are_400s_in_each_dialect(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    primary, fallback = fakes
    async with running_sidecar(document(primary, fallback)) as (url, _):
        async with aiohttp.ClientSession() as session:
            for path in ("/anthropic/v1/messages", "/openai/v1/chat/completions"):
                for payload in (
                    b"{not json",
                    b"[1, 2]",
                    b'{"model": 5, "messages": []}',
                    b'{"model": "m", "messages": [], "stream": "yes"}',
                    b'{"model": "m", "messages": {}}',
                    b"",
                ):
                    async with session.post(url + path, data=payload) as response:
                        assert response.status == 400, (path, payload)
                        assert response.headers["x-should-retry"] == "false"
                        body = await response.json()
                        if path.startswith("/anthropic"):
                            assert body["type"] == "error"
                            assert body["error"]["type"] == "invalid_request_error"
                        else:
                            assert body["error"]["type"] == "invalid_request_error"
                            assert body["error"]["message"]
    assert primary.count() == 0 and fallback.count() == 0


@pytest.mark.parametrize("dialect", ["anthropic", "openai"])
async def test_accept_json_with_stream_true_still_gets_sse(
    fakes: tuple[FakeProvider, FakeProvider], dialect: str
) -> None:
    primary, fallback = fakes
    primary.reply_text = FULL
    path = "/anthropic/v1/messages" if dialect == "anthropic" else "/openai/v1/chat/completions"
    doc = document(primary, fallback, primary_type=dialect, fallback_type="openai" if dialect == "anthropic" else "anthropic")
    body = {"model": "m", "max_tokens": 50, "messages": USER, "stream": True}
    async with running_sidecar(doc) as (url, _):
        async with aiohttp.ClientSession() as session:
            async with session.post(url + path, json=body, headers={"Accept": "application/json"}) as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/event-stream")
                raw = (await response.read()).decode()
    events = sse_events(raw)
    if dialect == "anthropic":
        assert events[0][0] == "message_start" and events[-1][0] == "message_stop"
    else:
        assert events[-1][1] == "[DONE]"
    assert FULL.split()[3] in raw


async def test_http10_client_gets_a_complete_sse_stream(fakes: tuple[FakeProvider, FakeProvider]) -> None:
    primary, fallback = fakes
    primary.reply_text = FULL
    payload = json.dumps({"model": "m", "max_tokens": 50, "messages": USER, "stream": True}).encode()
    async with running_sidecar(document(primary, fallback)) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /anthropic/v1/messages HTTP/1.0\r\nHost: sidecar\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout=5)  # HTTP/1.0: the body ends at close
        writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    status_line, *header_lines = head.split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    assert status_line.split()[1] == "200"
    assert headers["content-type"].startswith("text/event-stream")
    assert "chunked" not in headers.get("transfer-encoding", "")
    events = sse_events(body)
    assert events[0][0] == "message_start" and events[-1][0] == "message_stop"
    text = "".join(
        json.loads(data)["delta"].get("text", "") for name, data in events if name == "content_block_delta"
    )
    assert text == FULL


@pytest.mark.parametrize("dialect", ["anthropic", "openai"])
async def test_client_disconnect_mid_stream_cancels_the_upstream(
    fakes: tuple[FakeProvider, FakeProvider], dialect: str
) -> None:
    primary, fallback = fakes
    long_text = " ".join(f"word{i}" for i in range(60))
    primary.script(Reply(text=long_text, chunk_delay=0.05))
    doc = document(primary, fallback, primary_type=dialect, fallback_type="openai" if dialect == "anthropic" else "anthropic")

    async def read_a_little_anthropic(client: anthropic.AsyncAnthropic) -> str:
        async with client.messages.stream(model="m", max_tokens=500, messages=USER) as stream:
            async for piece in stream.text_stream:
                return piece
        return ""

    async def read_a_little_openai(client: openai.AsyncOpenAI) -> str:
        stream = await client.chat.completions.create(model="m", messages=USER, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                await stream.close()
                return chunk.choices[0].delta.content
        return ""

    async with running_sidecar(doc) as (url, _):
        if dialect == "anthropic":
            first = await with_anthropic(url, "async", read_a_little_anthropic)
        else:
            first = await with_openai(url, "async", read_a_little_openai)
        assert first.startswith("word0")
        await primary.wait_for(lambda: primary.last.finished, timeout=5)
    assert primary.last.outcome == "disconnected"
    assert primary.last.chunks_sent < 60
    assert fallback.count() == 0


async def test_client_that_stops_reading_is_dropped_and_the_upstream_closed(
    fakes: tuple[FakeProvider, FakeProvider], monkeypatch: pytest.MonkeyPatch
) -> None:
    """HOSTILE D6: a client that keeps its connection open but never reads. The sidecar's writes stall
    once the socket buffers are full; after the write deadline it must let go of the upstream."""
    monkeypatch.setattr(server, "WRITE_TIMEOUT", 0.3)
    primary, fallback = fakes
    primary.script(Reply(text="x" * 12_000_000, chunks=3000))  # far more than any socket buffers hold
    payload = json.dumps({"model": "m", "max_tokens": 50, "messages": USER, "stream": True}).encode()
    async with running_sidecar(document(primary, fallback)) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        _reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(
            b"POST /anthropic/v1/messages HTTP/1.1\r\nHost: sidecar\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        await writer.drain()
        try:
            await primary.wait_for(lambda: primary.count() == 1 and primary.last.finished, timeout=10)
        finally:
            writer.close()
    assert primary.last.outcome == "disconnected"
    assert primary.last.chunks_sent < 3000


async def test_client_gone_before_a_plain_answer_cancels_the_upstream(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    primary, fallback = fakes
    primary.script(Reply(delay=5))
    async with running_sidecar(document(primary, fallback)) as (url, _):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as session:
            with pytest.raises(TimeoutError):
                await session.post(f"{url}/anthropic/v1/messages", json={"model": "m", "max_tokens": 5, "messages": USER})
        await primary.wait_for(lambda: primary.count() == 1 and primary.last.finished, timeout=3)
    assert primary.last.outcome == "disconnected" and fallback.count() == 0


async def test_protocol_headers_reach_a_same_dialect_target_but_never_keys(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    primary, fallback = fakes
    document = policy_document(primary.url, fallback.url)
    async with running_sidecar(document) as (url, _):
        client = anthropic.AsyncAnthropic(base_url=f"{url}/anthropic", api_key="app-key", max_retries=0)
        await client.messages.create(
            model="claude-sonnet-4-5", max_tokens=32, messages=[{"role": "user", "content": "hi"}],
            extra_headers={"anthropic-beta": "context-1m-2025-08-07"},
        )
    received = primary.last.headers
    assert received["anthropic-beta"] == "context-1m-2025-08-07"
    assert "app-key" not in str(received)
