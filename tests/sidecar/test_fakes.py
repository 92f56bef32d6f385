"""Tests of the fake providers and the fake status page themselves.

Why this exists: every failover test of the sidecar trusts the fakes to speak the providers' real wire
formats and to fail the way real providers fail. Here the official SDKs (anthropic, openai, google-genai)
talk to the fakes directly, so a fake that drifted from the real protocol breaks these tests first.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import httpx
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from llmroute_sidecar.simulator.fake_statuspage import FakeStatusPage
from llmroute_sidecar.simulator.fakes import (
    CutStream,
    Fail,
    FakeProvider,
    Garbage,
    Hang,
    Html,
    RecordedRequest,
    Reply,
    Reset,
    StallStream,
    StreamError,
    ToolCall,
)

pytestmark = pytest.mark.timeout(10)

# anthropic>=2 runs on httpx2 (an httpx fork) and lets some of its transport errors escape a stream.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (anthropic.APIConnectionError, httpx.HTTPError)
try:
    import httpx2

    TRANSPORT_ERRORS += (httpx2.HTTPError,)
except ImportError:  # pragma: no cover - older SDKs use httpx itself
    pass

USER: Any = [{"role": "user", "content": "Summarize this ticket please"}]
CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}
ANTHROPIC_TOOLS: Any = [{"name": "get_weather", "description": "Weather", "input_schema": CITY_SCHEMA}]
OPENAI_TOOLS: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": CITY_SCHEMA}}]


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    async with FakeProvider("primary") as f:
        yield f


@pytest.fixture
async def claude(fake: FakeProvider) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=fake.anthropic_base_url, api_key="k", max_retries=0) as c:
        yield c


@pytest.fixture
async def gpt(fake: FakeProvider) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=fake.openai_base_url, api_key="k", max_retries=0) as c:
        yield c


@pytest.fixture
async def gemini(fake: FakeProvider) -> AsyncIterator[genai.Client]:
    client = genai.Client(api_key="k", http_options=genai_types.HttpOptions(base_url=fake.gemini_base_url))
    yield client
    await client.aio.aclose()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def sse_events(raw: bytes) -> list[tuple[str | None, str]]:
    """(event, data) pairs of an SSE body (enough for the fakes' well-formed output)."""
    out: list[tuple[str | None, str]] = []
    for block in raw.decode().replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        event = None
        data = []
        for line in block.split("\n"):
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
        out.append((event, "\n".join(data)))
    return out


# ---- success paths through the official SDKs --------------------------------------------------------------


async def test_anthropic_create_echoes_prompt_model_and_records(
    fake: FakeProvider, claude: anthropic.AsyncAnthropic
) -> None:
    msg = await claude.messages.create(model="claude-test-1", max_tokens=64, messages=USER)
    assert msg.content[0].type == "text"
    assert msg.content[0].text == "echo: Summarize this ticket please"
    assert msg.model == "claude-test-1"
    assert msg.stop_reason == "end_turn"
    assert msg.usage.input_tokens == 4 and msg.usage.output_tokens == 5
    [rec] = fake.requests
    assert (rec.path, rec.dialect, rec.model, rec.stream, rec.outcome) == (
        "/v1/messages",
        "anthropic",
        "claude-test-1",
        False,
        "completed",
    )
    # anthropic>=2 sends the key as a bearer token; older SDKs send x-api-key (the fake accepts both).
    assert "k" in (rec.headers.get("x-api-key"), rec.headers.get("authorization", "").removeprefix("Bearer "))
    assert "anthropic-version" in rec.headers
    assert rec.body["max_tokens"] == 64 and rec.status == 200
    assert fake.count("/v1/messages") == 1 and fake.count("chat") == 0


async def test_anthropic_stream_follows_the_real_event_sequence(
    fake: FakeProvider, claude: anthropic.AsyncAnthropic, http: aiohttp.ClientSession
) -> None:
    body = {"model": "claude-x", "max_tokens": 10, "stream": True, "messages": USER}
    async with http.post(fake.url + "/v1/messages", json=body) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(await resp.read())
    names = [e for e, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert all(json.loads(d)["type"] == e for e, d in events)
    assert json.loads(events[-2][1])["delta"]["stop_reason"] == "end_turn"

    fake.script(Reply(text="Hello there, world!", chunks=4))
    async with claude.messages.stream(model="claude-x", max_tokens=10, messages=USER) as stream:
        deltas = [t async for t in stream.text_stream]
        final = await stream.get_final_message()
    assert deltas == ["Hello", " ther", "e, wo", "rld!"]
    assert len(deltas) == 4 and fake.last.chunks_sent == 4
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 3


async def test_anthropic_tool_use_json_and_stream(
    fake: FakeProvider, claude: anthropic.AsyncAnthropic
) -> None:
    fake.script(Reply(tool_call=ToolCall(arguments={"city": "Paris"})), times=2)
    msg = await claude.messages.create(model="m", max_tokens=10, messages=USER, tools=ANTHROPIC_TOOLS)
    assert msg.stop_reason == "tool_use"
    [block] = msg.content
    assert block.type == "tool_use" and block.name == "get_weather" and block.input == {"city": "Paris"}

    async with claude.messages.stream(model="m", max_tokens=10, messages=USER, tools=ANTHROPIC_TOOLS) as s:
        final = await s.get_final_message()
    assert final.stop_reason == "tool_use"
    assert final.content[-1].type == "tool_use" and final.content[-1].input == {"city": "Paris"}
    # Without declared tools a scripted tool call cannot happen: plain text instead.
    fake.script(Reply(tool_call=ToolCall(name="x")))
    msg = await claude.messages.create(model="m", max_tokens=10, messages=USER)
    assert msg.content[0].type == "text" and msg.stop_reason == "end_turn"


async def test_openai_create_stream_usage_and_tools(fake: FakeProvider, gpt: openai.AsyncOpenAI) -> None:
    msgs: Any = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    done = await gpt.chat.completions.create(model="gpt-4.1-mini", messages=msgs)
    assert done.choices[0].message.content == "echo: hello there"
    assert done.model == "gpt-4.1-mini" and done.choices[0].finish_reason == "stop"
    assert done.usage is not None and done.usage.prompt_tokens == 4 and done.usage.completion_tokens == 3
    assert fake.last.headers["authorization"] == "Bearer k"

    stream = await gpt.chat.completions.create(
        model="gpt-4.1-mini", messages=msgs, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: hello there"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 7
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"

    fake.script(Reply(tool_call=ToolCall(arguments={"city": "Oslo"})), times=2)
    done = await gpt.chat.completions.create(model="g", messages=msgs, tools=OPENAI_TOOLS)
    call = done.choices[0].message.tool_calls
    assert done.choices[0].finish_reason == "tool_calls" and call is not None
    assert call[0].type == "function" and call[0].function.name == "get_weather"
    assert json.loads(call[0].function.arguments) == {"city": "Oslo"}
    stream = await gpt.chat.completions.create(model="g", messages=msgs, tools=OPENAI_TOOLS, stream=True)
    args = ""
    async for c in stream:
        for tc in c.choices[0].delta.tool_calls or []:
            args += tc.function.arguments if tc.function and tc.function.arguments else ""
    assert json.loads(args) == {"city": "Oslo"}


async def test_openai_stream_ends_with_done(fake: FakeProvider, http: aiohttp.ClientSession) -> None:
    body = {"model": "g", "stream": True, "messages": USER}
    async with http.post(fake.openai_base_url + "/chat/completions", json=body) as resp:
        raw = await resp.read()
    assert raw.endswith(b"data: [DONE]\n\n") and b'"usage"' not in raw


async def test_gemini_generate_stream_and_function_call(fake: FakeProvider, gemini: genai.Client) -> None:
    r = await gemini.aio.models.generate_content(model="gemini-2.5-flash", contents="howdy partner")
    assert r.text == "echo: howdy partner" and r.model_version == "gemini-2.5-flash"
    assert r.usage_metadata is not None and r.usage_metadata.candidates_token_count == 3
    assert fake.last.path.endswith("/models/gemini-2.5-flash:generateContent")
    assert fake.last.headers["x-goog-api-key"] == "k"

    parts = [
        c.text or ""
        async for c in await gemini.aio.models.generate_content_stream(
            model="gemini-2.5-flash", contents="howdy partner"
        )
    ]
    assert "".join(parts) == "echo: howdy partner" and len(parts) == 4
    assert fake.last.path.endswith(":streamGenerateContent") and fake.last.query == {"alt": "sse"}

    fake.script(Reply(tool_call=ToolCall(arguments={"location": "Tokyo"})))
    tool = genai_types.Tool(function_declarations=[genai_types.FunctionDeclaration(name="getWeather")])
    r = await gemini.aio.models.generate_content(
        model="gemini-2.5-flash", contents="weather?", config=genai_types.GenerateContentConfig(tools=[tool])
    )
    assert r.function_calls is not None
    assert r.function_calls[0].name == "getWeather" and r.function_calls[0].args == {"location": "Tokyo"}


# ---- errors --------------------------------------------------------------------------------------------


async def test_anthropic_529_reaches_sdk_with_retry_after(
    fake: FakeProvider, claude: anthropic.AsyncAnthropic
) -> None:
    fake.script(Fail(529, retry_after=7))
    with pytest.raises(anthropic.InternalServerError) as info:
        await claude.messages.create(model="m", max_tokens=10, messages=USER)
    assert info.value.status_code == 529
    assert info.value.response.headers["retry-after"] == "7"
    assert isinstance(info.value.body, dict) and info.value.body["error"]["type"] == "overloaded_error"
    assert info.value.body["type"] == "error"
    # The queue is consumed: the next request gets the default answer.
    assert (await claude.messages.create(model="m", max_tokens=10, messages=USER)).stop_reason == "end_turn"


async def test_openai_and_gemini_error_envelopes(
    fake: FakeProvider, gpt: openai.AsyncOpenAI, gemini: genai.Client
) -> None:
    quota_exceeded = Fail(429, code="insufficient_quota", error_type="insufficient_quota")
    fake.script(Fail(429, retry_after_ms=250), quota_exceeded)
    with pytest.raises(openai.RateLimitError) as rate:
        await gpt.chat.completions.create(model="g", messages=USER)
    assert rate.value.code == "rate_limit_exceeded" and rate.value.response.headers["retry-after-ms"] == "250"
    with pytest.raises(openai.RateLimitError) as quota:
        await gpt.chat.completions.create(model="g", messages=USER)
    assert quota.value.code == "insufficient_quota" and quota.value.type == "insufficient_quota"

    fake.script(Fail(503), Fail(429, retry_after=58))
    with pytest.raises(genai_errors.ServerError) as unavailable:
        await gemini.aio.models.generate_content(model="gm", contents="x")
    assert unavailable.value.code == 503 and unavailable.value.status == "UNAVAILABLE"
    with pytest.raises(genai_errors.ClientError) as exhausted:
        await gemini.aio.models.generate_content(model="gm", contents="x")
    assert exhausted.value.status == "RESOURCE_EXHAUSTED"
    assert exhausted.value.details["error"]["details"][0]["retryDelay"] == "58s"


async def test_html_cdn_page_and_garbage(
    fake: FakeProvider, claude: anthropic.AsyncAnthropic, http: aiohttp.ClientSession
) -> None:
    fake.script(Html(524), Html(520))
    with pytest.raises(anthropic.InternalServerError) as info:
        await claude.messages.create(model="m", max_tokens=10, messages=USER)
    assert info.value.status_code == 524
    async with http.post(fake.url + "/v1/messages", json={"model": "m", "messages": USER}) as resp:
        assert resp.status == 520 and resp.content_type == "text/html"
        title = "<title>api.anthropic.com | 520: Web server is returning an unknown error</title>"
        assert title in await resp.text()

    fake.script(Garbage(body=b'{"id": "msg_'))
    chat_url = fake.openai_base_url + "/chat/completions"
    async with http.post(chat_url, json={"model": "m", "messages": USER}) as resp:
        assert resp.status == 200 and await resp.read() == b'{"id": "msg_'


async def test_gzip_body_is_really_gzip(
    fake: FakeProvider, claude: anthropic.AsyncAnthropic, http: aiohttp.ClientSession
) -> None:
    fake.gzip = True
    msg = await claude.messages.create(model="m", max_tokens=10, messages=USER)
    assert msg.content[0].type == "text" and msg.content[0].text.startswith("echo: ")
    async with (
        aiohttp.ClientSession(auto_decompress=False) as raw_session,
        raw_session.post(fake.url + "/v1/messages", json={"model": "m", "messages": USER}) as resp,
    ):
        assert resp.headers["Content-Encoding"] == "gzip"
        assert json.loads(gzip.decompress(await resp.read()))["type"] == "message"
    fake.script(Fail(529, gzip=True))
    async with http.post(fake.url + "/v1/messages", json={"model": "m", "messages": USER}) as resp:
        assert resp.status == 529 and (await resp.json())["error"]["type"] == "overloaded_error"


async def test_expect_api_key_gives_each_providers_auth_error(
    fake: FakeProvider, http: aiohttp.ClientSession
) -> None:
    fake.expect_api_key = "right"
    async with anthropic.AsyncAnthropic(base_url=fake.url, api_key="wrong", max_retries=0) as c:
        with pytest.raises(anthropic.AuthenticationError) as a_err:
            await c.messages.create(model="m", max_tokens=10, messages=USER)
    assert isinstance(a_err.value.body, dict) and a_err.value.body["error"]["type"] == "authentication_error"
    async with openai.AsyncOpenAI(base_url=fake.openai_base_url, api_key="wrong", max_retries=0) as o:
        with pytest.raises(openai.AuthenticationError) as o_err:
            await o.chat.completions.create(model="g", messages=USER)
    assert o_err.value.code == "invalid_api_key"
    client = genai.Client(api_key="wrong", http_options=genai_types.HttpOptions(base_url=fake.url))
    with pytest.raises(genai_errors.ClientError) as g_err:
        await client.aio.models.generate_content(model="gm", contents="x")
    await client.aio.aclose()
    assert g_err.value.code == 400 and g_err.value.status == "INVALID_ARGUMENT"  # Gemini's real answer
    gemini_url = fake.url + "/v1beta/models/gm:generateContent?key=right"
    async with http.post(gemini_url, json={"contents": []}) as r:
        assert r.status == 200
    async with anthropic.AsyncAnthropic(base_url=fake.url, api_key="right", max_retries=0) as c:
        assert (await c.messages.create(model="m", max_tokens=10, messages=USER)).content
    assert fake.pending_steps == 0 and [r.status for r in fake.requests] == [401, 401, 400, 200, 200]


async def test_bad_json_and_unknown_path(fake: FakeProvider, http: aiohttp.ClientSession) -> None:
    async with http.post(fake.url + "/v1/messages", data=b"{not json") as resp:
        assert resp.status == 400 and (await resp.json())["error"]["type"] == "invalid_request_error"
    async with http.get(fake.url + "/v1/models") as resp:
        assert resp.status == 404
    assert [r.dialect for r in fake.requests] == ["anthropic", None]
    assert fake.requests[0].body is None and fake.requests[0].raw_body == b"{not json"


# ---- stream faults -------------------------------------------------------------------------------------


async def test_cut_stream_drop_makes_anthropic_raise(
    fake: FakeProvider, claude: anthropic.AsyncAnthropic
) -> None:
    fake.script(CutStream(after_chunks=2, text="one two three four"))
    got: list[str] = []
    with pytest.raises(TRANSPORT_ERRORS):
        async with claude.messages.stream(model="m", max_tokens=10, messages=USER) as stream:
            async for text in stream.text_stream:
                got.append(text)
    assert got == ["one ", "two "]
    await fake.wait_idle()
    assert fake.last.outcome == "aborted" and fake.last.chunks_sent == 2


async def test_clean_cut_stream_is_silent_truncation(
    fake: FakeProvider, claude: anthropic.AsyncAnthropic, gpt: openai.AsyncOpenAI
) -> None:
    fake.script(CutStream(after_chunks=2, text="one two three four", clean=True))
    async with claude.messages.stream(model="m", max_tokens=10, messages=USER) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason is None
    assert final.content[0].type == "text" and final.content[0].text == "one two "

    fake.script(CutStream(after_chunks=1, text="one two", clean=True))
    chunks = [c async for c in await gpt.chat.completions.create(model="g", messages=USER, stream=True)]
    assert all(c.choices[0].finish_reason is None for c in chunks)  # ends without a finish and without [DONE]


async def test_stream_error_makes_every_sdk_raise(
    fake: FakeProvider,
    claude: anthropic.AsyncAnthropic,
    gpt: openai.AsyncOpenAI,
    gemini: genai.Client,
    http: aiohttp.ClientSession,
) -> None:
    fake.script(StreamError(after_chunks=1))
    with pytest.raises(anthropic.APIStatusError) as a_err:
        async with claude.messages.stream(model="m", max_tokens=10, messages=USER) as stream:
            await stream.get_final_message()
    assert isinstance(a_err.value.body, dict) and a_err.value.body["error"]["type"] == "overloaded_error"

    fake.script(StreamError(after_chunks=1))
    body = {"model": "m", "max_tokens": 10, "stream": True, "messages": USER}
    async with http.post(fake.url + "/v1/messages", json=body) as resp:
        events = sse_events(await resp.read())
    # Same tail as the real capture anthropic_stream_midstream_overloaded.sse.
    assert [e for e, _ in events][-2:] == ["content_block_delta", "error"]
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    assert json.loads(events[-1][1]) == overloaded

    fake.script(StreamError(after_chunks=1))
    with pytest.raises(openai.APIError) as o_err:
        async for _ in await gpt.chat.completions.create(model="g", messages=USER, stream=True):
            pass
    assert isinstance(o_err.value.body, dict) and o_err.value.body["type"] == "server_error"

    fake.script(StreamError(after_chunks=1, error_type="api_error"))
    with pytest.raises(genai_errors.APIError) as g_err:
        async for _ in await gemini.aio.models.generate_content_stream(model="gm", contents="x y z"):
            pass
    assert g_err.value.code == 500

    fake.script(StreamError(error_type="overloaded_error"))  # non-streaming request: the HTTP error
    with pytest.raises(anthropic.InternalServerError) as plain:
        await claude.messages.create(model="m", max_tokens=10, messages=USER)
    assert plain.value.status_code == 529


async def test_hang_is_seen_as_client_disconnect(fake: FakeProvider) -> None:
    fake.script(Hang())
    async with anthropic.AsyncAnthropic(base_url=fake.url, api_key="k", max_retries=0, timeout=0.2) as c:
        with pytest.raises(anthropic.APITimeoutError):
            await c.messages.create(model="m", max_tokens=10, messages=USER)
    await fake.wait_idle(timeout=2)
    assert fake.last.disconnected and fake.last.status is None


async def test_hang_after_headers_and_stall_are_disconnects_too(fake: FakeProvider) -> None:
    fake.script(Hang(after_headers=True), StallStream(after_chunks=1))
    async with anthropic.AsyncAnthropic(base_url=fake.url, api_key="k", max_retries=0, timeout=0.2) as c:
        for _ in range(2):
            got: list[str] = []
            with pytest.raises((anthropic.APITimeoutError, *TRANSPORT_ERRORS)):
                async with c.messages.stream(model="m", max_tokens=10, messages=USER) as stream:
                    async for text in stream.text_stream:
                        got.append(text)
    await fake.wait_idle()
    assert [r.outcome for r in fake.requests] == ["disconnected", "disconnected"]
    assert [r.chunks_sent for r in fake.requests] == [0, 1] and got == ["echo: "]


async def test_slow_loser_sees_the_cancel(fake: FakeProvider, http: aiohttp.ClientSession) -> None:
    fake.script(Reply(text="a b c d e f g h", chunk_delay=0.05), Reply(delay=5))
    body = {"model": "m", "max_tokens": 10, "stream": True, "messages": USER}
    async with http.post(fake.url + "/v1/messages", json=body) as resp:
        await resp.content.readuntil(b"content_block_delta")
        resp.close()  # the winner answered elsewhere: drop this one
    task = asyncio.create_task(http.post(fake.url + "/v1/messages", json={**body, "stream": False}))
    await fake.wait_for_requests(2)
    task.cancel()
    await fake.wait_idle()
    assert [r.disconnected for r in fake.requests] == [True, True]
    assert 0 < fake.requests[0].chunks_sent < 8


async def test_reset_and_non_stream_cut(fake: FakeProvider, claude: anthropic.AsyncAnthropic) -> None:
    fake.script(Reset(), CutStream(after_chunks=1), CutStream(clean=True))
    for _ in range(2):
        with pytest.raises(anthropic.APIConnectionError):
            await claude.messages.create(model="m", max_tokens=10, messages=USER)
    with pytest.raises(json.JSONDecodeError):  # 200 with truncated JSON
        await claude.messages.create(model="m", max_tokens=10, messages=USER)
    await fake.wait_idle()
    assert [r.outcome for r in fake.requests] == ["aborted"] * 3
    assert [r.status for r in fake.requests] == [None, 200, 200]


# ---- prefill continuation --------------------------------------------------------------------------------


async def test_prefill_gets_only_the_continuation(
    fake: FakeProvider, claude: anthropic.AsyncAnthropic
) -> None:
    full = "The quick brown fox jumps over the lazy dog."
    fake.reply_text = full
    fake.script(CutStream(after_chunks=3, clean=True))
    async with claude.messages.stream(model="m", max_tokens=50, messages=USER) as stream:
        first = await stream.get_final_message()
    assert first.content[0].type == "text"
    partial = first.content[0].text
    assert partial == "The quick brown " and first.stop_reason is None
    # Resume: Anthropic refuses a prefill ending in whitespace, so the caller strips it.
    with pytest.raises(anthropic.BadRequestError) as ws:
        await claude.messages.create(
            model="m", max_tokens=50, messages=[*USER, {"role": "assistant", "content": partial}]
        )
    assert "trailing whitespace" in str(ws.value)
    prefill = partial.rstrip()
    async with claude.messages.stream(
        model="m", max_tokens=50, messages=[*USER, {"role": "assistant", "content": prefill}]
    ) as stream:
        rest = await stream.get_final_message()
    assert rest.content[0].type == "text" and rest.stop_reason == "end_turn"
    assert prefill + rest.content[0].text == full
    assert fake.last.prefill == prefill and fake.last.last_user_text == USER[0]["content"]


# ---- scripting and waiting -----------------------------------------------------------------------------


async def test_queue_then_decide_then_default(fake: FakeProvider, claude: anthropic.AsyncAnthropic) -> None:
    seen: list[int] = []

    def decide(request: RecordedRequest) -> Fail | None:
        seen.append(request.index)
        return Fail(503) if request.index == 1 else None

    fake.decide = decide
    fake.default = Reply(text="default")
    fake.script(Reply(text="scripted"))
    results: list[str] = []
    for _ in range(3):
        try:
            msg = await claude.messages.create(model="m", max_tokens=10, messages=USER)
            results.append(msg.content[0].text if msg.content[0].type == "text" else "?")
        except anthropic.InternalServerError as e:
            results.append(str(e.status_code))
    assert results == ["scripted", "503", "default"] and seen == [1, 2]
    assert isinstance(fake.requests[1].step, Fail)


async def test_wait_for_requests_is_bounded(fake: FakeProvider) -> None:
    with pytest.raises(TimeoutError):
        await fake.wait_for_requests(1, timeout=0.05)


# ---- status page -------------------------------------------------------------------------------------------


@pytest.fixture
async def status_page() -> AsyncIterator[FakeStatusPage]:
    async with FakeStatusPage.claude() as page:
        yield page


async def test_statuspage_etag_and_component_changes(
    status_page: FakeStatusPage, http: aiohttp.ClientSession
) -> None:
    headers = {"User-Agent": "llmroute-test"}
    async with http.get(status_page.summary_url, headers=headers) as resp:
        assert resp.status == 200 and resp.content_type == "application/json"
        etag = resp.headers["ETag"]
        doc = await resp.json()
    assert doc["status"]["indicator"] == "none"
    assert status_page.component("k8w3r06qmzrp")["status"] == "operational"
    async with http.get(status_page.summary_url, headers={**headers, "If-None-Match": etag}) as resp:
        assert resp.status == 304 and resp.headers["ETag"] == etag
    assert status_page.not_modified == 1 and status_page.requests[1].headers["if-none-match"] == etag

    status_page.set_component("Claude API (api.anthropic.com)", "major_outage")
    async with http.get(status_page.summary_url, headers={"If-None-Match": etag}) as resp:
        assert resp.status == 200 and resp.headers["ETag"] != etag
        doc = await resp.json()
    api = next(c for c in doc["components"] if c["id"] == "k8w3r06qmzrp")
    assert api["status"] == "major_outage" and doc["status"]["indicator"] == "critical"
    status_page.set_indicator("minor")
    async with http.get(status_page.status_url) as resp:
        status = (await resp.json())["status"]
    assert status == {"indicator": "minor", "description": "Partially Degraded Service"}
    assert status_page.count() == 4 and status_page.count("status.json") == 1
    assert status_page.requests[0].headers["user-agent"] == "llmroute-test"


async def test_statuspage_incidents_and_flavors(http: aiohttp.ClientSession) -> None:
    async with FakeStatusPage.claude() as page:
        incident = page.add_incident("Elevated errors on Claude API", components=["k8w3r06qmzrp"])
        async with http.get(page.summary_url) as resp:
            doc = await resp.json()
        [open_incident] = doc["incidents"]
        assert open_incident["components"][0]["id"] == "k8w3r06qmzrp"
        assert doc["status"]["indicator"] == "major"
        assert doc["scheduled_maintenances"] == []
        page.resolve_incident(incident)
        async with http.get(page.summary_url) as resp:
            doc = await resp.json()
        assert doc["incidents"] == [] and doc["status"]["indicator"] == "none"
    async with FakeStatusPage.openai() as page:
        async with http.get(page.summary_url) as resp:
            doc = await resp.json()
        assert "incidents" not in doc and "scheduled_maintenances" not in doc
        page.add_incident("Issues with Custom GPT actions", impact="minor", status="monitoring")
        page.set_component("Chat Completions", "partial_outage")
        async with http.get(page.summary_url) as resp:
            doc = await resp.json()
        assert doc["incidents"][0]["shortlink"] is None and doc["status"]["indicator"] == "major"


async def test_gcp_incidents_feed(status_page: FakeStatusPage, http: aiohttp.ClientSession) -> None:
    incident = status_page.add_gcp_incident("Vertex Gemini API")
    async with http.get(status_page.incidents_url) as resp:
        feed = await resp.json()
    assert [("end" in i) for i in feed] == [False, True]
    assert feed[0]["affected_products"][0]["title"] == "Vertex Gemini API"
    status_page.end_gcp_incident(incident)
    async with http.get(status_page.incidents_url) as resp:
        feed = await resp.json()
    assert all("end" in i for i in feed) and feed[0]["most_recent_update"]["status"] == "AVAILABLE"


async def test_statuspage_faults(status_page: FakeStatusPage, http: aiohttp.ClientSession) -> None:
    status_page.fault = "html"
    async with http.get(status_page.summary_url) as resp:
        assert resp.status == 405 and resp.content_type == "text/html"
        assert "Generated by cloudfront (CloudFront)" in await resp.text()
    status_page.fault = "error"
    async with http.get(status_page.summary_url) as resp:
        assert resp.status == 500
    status_page.fault = "garbage"
    async with http.get(status_page.summary_url) as resp:
        with pytest.raises(json.JSONDecodeError):
            json.loads(await resp.read())
    status_page.fault = "wrong_shape"
    async with http.get(status_page.summary_url) as resp:
        assert (await resp.json())["status"] == "none"
    status_page.oversized_bytes = 3 * 1024 * 1024
    status_page.fault = "oversized"
    async with http.get(status_page.summary_url) as resp:
        assert len(await resp.read()) > 3 * 1024 * 1024
    status_page.fault = "hang"
    with pytest.raises(asyncio.TimeoutError):
        async with http.get(status_page.summary_url, timeout=aiohttp.ClientTimeout(total=0.1)) as resp:
            await resp.read()
    status_page.fault = None
    async with http.get(status_page.summary_url) as resp:
        assert resp.status == 200
    await status_page.wait_for_requests(7)
    assert [r.status for r in status_page.requests] == [405, 500, 200, 200, 200, None, 200]


async def test_stop_is_prompt_refuses_connections_and_restart_keeps_the_port(
    http: aiohttp.ClientSession,
) -> None:
    fake = FakeProvider("flaky")
    await fake.start()
    url = fake.url
    fake.script(Hang(), Reply(delay=30))
    body = {"model": "m", "max_tokens": 10, "messages": USER}
    hung = [asyncio.create_task(http.post(url + "/v1/messages", json=body)) for _ in range(2)]
    await fake.wait_for_requests(2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await fake.stop()
    assert loop.time() - started < 0.5
    for task in hung:
        with pytest.raises(aiohttp.ClientError):
            (await task).raise_for_status()
    assert [r.outcome for r in fake.requests] == ["aborted", "aborted"]
    with pytest.raises(aiohttp.ClientConnectionError):  # a provider that is down: connection refused
        await http.post(url + "/v1/messages", json=body)
    await fake.start()
    try:
        assert fake.url == url
        async with http.post(url + "/v1/messages", json=body) as resp:
            assert resp.status == 200
    finally:
        await fake.stop()
