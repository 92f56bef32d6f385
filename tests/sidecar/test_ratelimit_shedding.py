"""Rate-limit-aware shedding, end to end: the real `llmroute sidecar` CLI between the official anthropic and
openai SDKs and fake providers that send the providers' rate-limit headers (issue 13's "Done when").

The primary is Anthropic-shaped (`anthropic-ratelimit-*`, RFC 3339 resets), the fallback OpenAI-shaped. The
route's budget is 1 s: a reset 30 s away is "far" (shed), one 0.4 s away is "near" (waited for). A few
finer points (a 429's own retry-after vs the reading, the switch) run against the in-process sidecar.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from llmroute_sidecar.ratelimits import fingerprint
from llmroute_sidecar.simulator.fakes import Fail, FakeProvider, Reply, ratelimit_headers

from .harness import policy_document, running_sidecar, until_ready

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
USER: Any = [{"role": "user", "content": "Summarize: the printer is on fire"}]
KEY = "sk-ant-ratelimit-test-key-0123456789"


def exhausted(reset_in: float) -> dict[str, str]:
    """What Anthropic sends with the last request of a window: nothing left until `reset_in` seconds."""
    return ratelimit_headers("anthropic", {"requests": (50, 0, reset_in), "input-tokens": (40_000, 30_000, 1.0)})


def plenty() -> dict[str, str]:
    return ratelimit_headers(
        "anthropic", {"requests": (50, 49, 30.0), "tokens": (90_000, 89_000, 30.0), "input-tokens": (80_000, 79_000, 30.0)}
    )


def garbage() -> list[dict[str, str]]:
    """Headers nobody should believe (a proxy's, a broken one's); built at use: resets are relative to now."""
    return [
        {"anthropic-ratelimit-requests-remaining": "-1", "anthropic-ratelimit-requests-reset": "2099-01-01T00:00:00Z"},
        {"anthropic-ratelimit-requests-remaining": "NaN", "anthropic-ratelimit-requests-limit": "50",
         "anthropic-ratelimit-requests-reset": "soon"},
        {**exhausted(30.0), "anthropic-ratelimit-requests-reset": "2020-01-01T00:00:00Z"},  # a reset in the past
        {**exhausted(30.0), "anthropic-ratelimit-requests-reset": "2099-01-01T00:00:00Z"},  # decades ahead
        {**exhausted(30.0), "anthropic-ratelimit-requests-limit": "0"},
        {"anthropic-ratelimit-requests-remaining": "0"},  # no reset: nothing says when it would stop applying
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1m"},  # a proxy's, not Anthropic's
    ]


# ----- the real CLI ----------------------------------------------------------------------------------------
@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeProvider, FakeProvider]]:
    async with FakeProvider("claude") as primary, FakeProvider("gpt") as fallback:
        fallback.default = Reply(headers=ratelimit_headers("openai", {"requests": (500, 499, 0.2)}))
        yield primary, fallback


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def sidecar(fakes: tuple[FakeProvider, FakeProvider], tmp_path: Path) -> AsyncIterator[str]:
    """`llmroute sidecar --policy FILE` as a subprocess, with the default rateLimits (on, minRemaining 0)."""
    primary, fallback = fakes
    document = policy_document(primary.url, fallback.url)
    document["spec"]["providers"][0]["apiKey"] = {"env": "TEST_RATELIMIT_KEY"}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(document))
    port = _free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmroute_sidecar.cli", "sidecar", "--policy", str(path),
        "--listen", f"127.0.0.1:{port}",
        env={**os.environ, "PYTHONPATH": f"{ROOT / 'sidecar'}:{ROOT / 'operator'}", "TEST_RATELIMIT_KEY": KEY},
        stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await until_ready(url, timeout=30.0)
        yield url
    finally:
        process.terminate()
        await process.wait()



async def ask(url: str, sdk: str, stream: bool = False) -> dict[str, str]:
    """One request through an official SDK (no SDK retries); the sidecar's answer headers."""
    if sdk == "anthropic":
        async with anthropic.AsyncAnthropic(base_url=f"{url}/anthropic", api_key="app-key", max_retries=0,
                                            timeout=10.0) as client:
            if stream:
                async with client.messages.stream(model="claude-sonnet-4-5", max_tokens=64, messages=USER) as s:
                    headers = dict(s.response.headers)
                    assert (await s.get_final_message()).content
                return headers
            raw = await client.messages.with_raw_response.create(model="claude-sonnet-4-5", max_tokens=64,
                                                                 messages=USER)
            assert (await raw.parse()).content
            return dict(raw.headers)
    async with openai.AsyncOpenAI(base_url=f"{url}/openai/v1", api_key="app-key", max_retries=0,
                                  timeout=10.0) as client:
        if stream:
            chunks = await client.chat.completions.with_raw_response.create(
                model="claude-sonnet-4-5", messages=USER, stream=True)
            parsed = chunks.parse()  # an AsyncStream (awaitable in some SDK versions)
            events = await parsed if inspect.isawaitable(parsed) else parsed
            text = "".join([c.choices[0].delta.content or "" async for c in events if c.choices])
            assert text
            return dict(chunks.headers)
        raw = await client.chat.completions.with_raw_response.create(model="claude-sonnet-4-5", messages=USER)
        completion = raw.parse()
        completion = await completion if inspect.isawaitable(completion) else completion
        assert completion.choices[0].message.content
        return dict(raw.headers)


def sample(metrics: str, name: str, **labels: str) -> float | None:
    """The value of one sample of a Prometheus exposition (None: not there)."""
    for family in text_string_to_metric_families(metrics):
        for item in family.samples:
            if item.name == name and item.labels == labels:
                return float(item.value)
    return None


async def scrape(url: str, path: str = "/metrics") -> str:
    async with aiohttp.ClientSession() as session, session.get(url + path) as response:
        return await response.text()


async def test_an_exhausted_limit_with_a_far_reset_sheds_with_zero_calls_to_the_primary(
    fakes: tuple[FakeProvider, FakeProvider], sidecar: str
) -> None:
    primary, fallback = fakes
    primary.default = Reply(headers=exhausted(30.0))  # the last request of the window: it is answered
    first = await ask(sidecar, "openai", stream=True)  # streamed: its headers count like any other's
    assert first["llmroute-target"] == "primary" and primary.count() == 1
    for sdk in ("anthropic", "openai", "anthropic", "openai"):
        for stream in (False, True):
            headers = await ask(sidecar, sdk, stream)
            assert headers["llmroute-target"] == "backup"
            assert headers["llmroute-shed-reason"] == "rate-limit"
            assert headers["llmroute-degraded"] == "true"
    assert primary.count() == 1, "a shed request must not call the primary"
    assert fallback.count() == 8
    metrics = await scrape(sidecar)
    assert sample(metrics, "llmroute_shed_total", route="summarize", reason="rate-limit") == 8
    assert sample(metrics, "llmroute_ratelimit_remaining_ratio", provider="claude", dimension="requests") == 0
    assert 25 < sample(metrics, "llmroute_ratelimit_reset_seconds", provider="claude", dimension="requests") <= 30
    status = await scrape(sidecar, "/status")
    assert '"remaining":0' in status and f'"key":"{fingerprint(KEY)}"' in status
    assert KEY not in status and KEY not in metrics  # the limits are the key's, but never show it


async def test_the_primary_gets_traffic_again_after_the_reset(
    fakes: tuple[FakeProvider, FakeProvider], sidecar: str
) -> None:
    primary, _fallback = fakes
    reset_in = 5.0  # beyond the 1 s budget: shed until then, not waited for
    reset_at = time.monotonic() + reset_in
    primary.script(Reply(headers=exhausted(reset_in)))
    primary.default = Reply(headers=plenty())
    await ask(sidecar, "anthropic")
    shed = 0
    while True:
        sdk = "anthropic" if shed % 2 else "openai"
        headers = await ask(sidecar, sdk)
        if headers["llmroute-target"] == "primary":
            break
        assert headers["llmroute-shed-reason"] == "rate-limit"
        shed += 1
        assert time.monotonic() < reset_at + 10.0, "the primary never got traffic again"
        await asyncio.sleep(0.1)
    assert shed >= 1  # requests before the reset were shed (each SDK call takes a while on a busy machine)
    assert primary.count() == 2
    assert primary.requests[1].received_at >= reset_at - 0.1  # not before the reset (clock resolution)
    for sdk in ("anthropic", "openai"):
        assert (await ask(sidecar, sdk))["llmroute-target"] == "primary"


async def test_plenty_left_changes_nothing(fakes: tuple[FakeProvider, FakeProvider], sidecar: str) -> None:
    primary, fallback = fakes
    primary.default = Reply(headers=plenty())
    for sdk in ("anthropic", "openai"):
        for stream in (False, True):
            headers = await ask(sidecar, sdk, stream)
            assert headers["llmroute-target"] == "primary"
            assert "llmroute-shed-reason" not in headers
    assert primary.count() == 4 and fallback.count() == 0
    metrics = await scrape(sidecar)
    assert sample(metrics, "llmroute_ratelimit_remaining_ratio", provider="claude", dimension="requests") == 0.98


async def test_garbage_rate_limit_headers_change_nothing_and_are_counted(
    fakes: tuple[FakeProvider, FakeProvider], sidecar: str
) -> None:
    primary, fallback = fakes
    bad = garbage()
    primary.script(*(Reply(headers=headers) for headers in bad))
    for index in range(len(bad)):
        headers = await ask(sidecar, "anthropic" if index % 2 else "openai", stream=index % 3 == 0)
        assert headers["llmroute-target"] == "primary"
        assert "llmroute-shed-reason" not in headers
    assert primary.count() == len(bad) and fallback.count() == 0
    metrics = await scrape(sidecar)
    ignored = {
        reason: sample(metrics, "llmroute_ratelimit_headers_ignored_total", provider="claude", reason=reason)
        for reason in ("malformed", "inconsistent", "incomplete", "reset-past", "reset-too-far")
    }
    assert ignored == {"malformed": 3, "inconsistent": None, "incomplete": 1, "reset-past": 1, "reset-too-far": 1}


# ----- finer points, in process -------------------------------------------------------------------------
async def test_a_reset_within_the_budget_is_waited_for_instead_of_shed(
    fakes: tuple[FakeProvider, FakeProvider]
) -> None:
    primary, fallback = fakes
    reset_at = time.monotonic() + 2.0
    primary.script(Reply(headers=exhausted(2.0)))
    async with running_sidecar(policy_document(primary.url, fallback.url, route={"budget": "4s"})) as (url, _):
        await ask(url, "anthropic")
        assert time.monotonic() < reset_at - 0.3  # else this test would not show a wait
        headers = await ask(url, "openai")
        assert headers["llmroute-target"] == "primary" and "llmroute-shed-reason" not in headers
        assert primary.requests[1].received_at >= reset_at - 0.1  # it waited for the reset, then called
        assert fallback.count() == 0


async def test_a_429s_retry_after_and_the_reading_agree_on_the_later(
    fakes: tuple[FakeProvider, FakeProvider]
) -> None:
    primary, fallback = fakes
    reset_at = time.monotonic() + 2.0
    primary.script(Fail(429, retry_after=0.05, headers=exhausted(2.0)), Reply())
    async with running_sidecar(policy_document(primary.url, fallback.url, route={"budget": "4s"})) as (url, _):
        headers = await ask(url, "anthropic")
        assert headers["llmroute-target"] == "primary"
        first, second = primary.requests
        assert first.received_at < reset_at - 0.3  # else this test would not tell the two apart
        assert second.received_at >= reset_at - 0.1  # the reading's reset, not retry-after's 50 ms
        assert fallback.count() == 0


async def test_with_rate_limits_off_an_exhausted_reading_never_changes_routing(
    fakes: tuple[FakeProvider, FakeProvider]
) -> None:
    primary, fallback = fakes
    primary.default = Reply(headers=exhausted(30.0))
    document = policy_document(primary.url, fallback.url)
    document["spec"]["providers"][0]["rateLimits"] = {"enabled": False}
    async with running_sidecar(document) as (url, state):
        for sdk in ("anthropic", "openai"):
            assert (await ask(url, sdk))["llmroute-target"] == "primary"
        assert primary.count() == 2 and fallback.count() == 0
        assert state.upstreams.rate_limits.snapshot()["claude"]["dimensions"]["requests"]["remaining"] == 0  # type: ignore[index]


async def test_min_remaining_treats_a_nearly_spent_limit_as_exhausted(fakes: tuple[FakeProvider, FakeProvider]) -> None:
    primary, fallback = fakes
    primary.default = Reply(headers=ratelimit_headers("anthropic", {"requests": (50, 3, 30.0)}))
    document = policy_document(primary.url, fallback.url)
    document["spec"]["providers"][0]["rateLimits"] = {"minRemaining": 3}
    async with running_sidecar(document) as (url, _state):
        await ask(url, "anthropic")
        headers = await ask(url, "openai")
        assert headers["llmroute-target"] == "backup" and headers["llmroute-shed-reason"] == "rate-limit"
        assert primary.count() == 1
