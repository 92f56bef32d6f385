"""Failover conduct out of the box (issue 10), tried as a new user tries it.

Every test runs the real command line (`llmroute sidecar --policy FILE` as a subprocess) with a policy that
names only providers and targets, so every knob is at its default, and talks to it with the official
`openai` and `anthropic` SDKs (their defaults too) while `FakeProvider`s on loopback play the providers:

1. a persistent 503 costs the primary `maxAttempts` (5) calls with growing waits, then the request sheds;
2. a stream whose finish reason arrived is complete without its terminal event (`[DONE]`, `message_stop`);
3. a context-window error moves to the next (larger) target, a content-policy error goes back to the app;
4. a silent first token fails over after `firstTokenTimeout` (15 s), a stream of pings ends after
   `stallTimeout` (30 s) with the dialect's error event;
5. a status page that still says `major_outage` stops shedding once probes find the primary answering;
6. bad input at the command line gets one line naming what is wrong;
7. a 429 on the last target that can answer is retried instead of failing the request.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
import yaml

from llmroute_sidecar.simulator.fake_statuspage import FakeStatusPage
from llmroute_sidecar.simulator.fakes import (
    CutStream,
    Fail,
    FakeProvider,
    NoTerminal,
    PingStream,
    RecordedRequest,
    Reply,
    Step,
)

from .harness import until_ready

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
CLAUDE_API = "k8w3r06qmzrp"
MODELS = {"anthropic": "claude-sonnet-4-5", "openai": "gpt-4.1", "gemini": "gemini-2.5-pro"}
MESSAGES: list[Any] = [{"role": "user", "content": "Summarize: the printer is on fire."}]


# ----- the real CLI with a policy that names only the targets ------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT / "sidecar"), str(ROOT / "operator"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, **extra}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmroute_sidecar.cli", *args]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _base(fake: FakeProvider, kind: str) -> str:
    return {"anthropic": fake.anthropic_base_url, "openai": fake.openai_base_url, "gemini": fake.gemini_base_url}[kind]


def target(name: str, provider: str, kind: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "provider": provider, "model": MODELS[kind], **extra}


def minimal_policy(
    primary: FakeProvider,
    backup: FakeProvider,
    primary_kind: str = "openai",
    backup_kind: str = "anthropic",
    route: dict[str, Any] | None = None,
    status_page: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Providers and targets, nothing else: the policy a new user writes first."""
    first: dict[str, Any] = {"name": "primary", "type": primary_kind, "baseURL": _base(primary, primary_kind)}
    if status_page is not None:
        first["statusPage"] = status_page
    return {
        "apiVersion": "llmroute.dev/v1alpha1",
        "kind": "LLMRoutePolicy",
        "metadata": {"name": "first-try"},
        "spec": {
            "providers": [first, {"name": "backup", "type": backup_kind, "baseURL": _base(backup, backup_kind)}],
            "defaultRoute": "chat",
            "routes": [{
                "name": "chat",
                "targets": [
                    target("main", "primary", primary_kind),
                    target("backup", "backup", backup_kind, degraded=True),
                ],
                **(route or {}),
            }],
        },
    }  # fmt: skip


@asynccontextmanager
async def cli_sidecar(document: dict[str, Any], tmp_path: Path, **env: str) -> AsyncIterator[str]:
    """`llmroute sidecar --policy FILE` on a free loopback port; yields its URL once ready."""
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(document))
    port = _free_port()
    log = (tmp_path / "sidecar.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        *_cli("sidecar", "--policy", str(path), "--listen", f"127.0.0.1:{port}"),
        env=_env(**env), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        await until_ready(url, process)
        yield url
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        log.close()



async def get_json(url: str, path: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url + path) as response:
        return await response.json()


async def metrics(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as response:
        return await response.text()


def openai_client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/openai/v1", api_key="app-key")


def anthropic_client(url: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=f"{url}/anthropic", api_key="app-key")


async def ask_openai(url: str, **extra: Any) -> tuple[dict[str, str], Any]:
    raw = await openai_client(url).chat.completions.with_raw_response.create(
        model="gpt-4.1", messages=MESSAGES, **extra
    )
    return {k.lower(): v for k, v in raw.headers.items()}, raw.parse()


# ----- 1. bounded attempts ---------------------------------------------------------------------------------


async def test_a_persistent_503_gets_five_attempts_with_growing_waits_then_sheds(tmp_path: Path) -> None:
    """Not the 10-11 attempts of the 8 s budget: `maxAttempts` 5 with full-jitter waits under 0.5, 1, 2
    and 4 s, then the backup answers, marked degraded, shed reason `budget-exhausted`."""
    async with FakeProvider("primary", default=Fail(503)) as primary, FakeProvider("backup") as backup:
        async with cli_sidecar(minimal_policy(primary, backup), tmp_path) as url:
            started = time.monotonic()
            headers, answer = await ask_openai(url)
            elapsed = time.monotonic() - started
    assert answer.choices[0].message.content.startswith("echo:")
    assert headers["llmroute-target"] == "backup" and headers["llmroute-degraded"] == "true"
    assert headers["llmroute-shed-reason"] == "budget-exhausted"
    assert primary.count() == 5 and backup.count() == 1
    arrivals = [r.received_at for r in primary.requests]
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    for gap, ceiling in zip(gaps, (0.5, 1.0, 2.0, 4.0), strict=True):
        assert gap <= ceiling + 0.5, gaps  # full jitter below each ceiling (plus a busy machine's slack)
    assert elapsed < 8.0, elapsed  # shed on attempts, before the 8 s budget


# ----- 2. complete streams without their terminal event -----------------------------------------------------


async def test_an_openai_stream_that_ends_without_done_is_a_complete_answer(tmp_path: Path) -> None:
    """A compatible server that omits `data: [DONE]` after the finish reason and usage: the SDK gets the
    whole answer and a clean end, the request counts `ok`, its tokens are recorded. A body that ends
    before any finish reason is still a break: the SDK raises."""
    async with FakeProvider("primary") as primary, FakeProvider("backup") as backup:
        primary.script(NoTerminal(text="All four words.", output_tokens=7), CutStream(after_chunks=2, clean=True))
        async with cli_sidecar(minimal_policy(primary, backup), tmp_path) as url:
            client = openai_client(url)
            stream = await client.chat.completions.create(
                model="gpt-4.1", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
            chunks = [chunk async for chunk in stream]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            usage = [c.usage for c in chunks if c.usage is not None]

            broken = await client.chat.completions.create(model="gpt-4.1", messages=MESSAGES, stream=True)
            with pytest.raises(openai.APIError):
                async for _ in broken:
                    pass
            exposition = await metrics(url)
    assert text == "All four words." and finish == ["stop"]
    assert usage and usage[-1].completion_tokens == 7
    assert re.search(r'llmroute_requests_total\{[^}]*outcome="ok"[^}]*\} 1\.0', exposition), exposition
    assert re.search(r'llmroute_requests_total\{[^}]*outcome="stream_broken"[^}]*\} 1\.0', exposition)
    assert re.search(r'llmroute_tokens_total\{kind="output",model="gpt-4\.1[^"]*",provider="primary"\} 7\.0', exposition)
    assert backup.count() == 0  # nothing failed over: a committed stream never splices another model in


async def test_an_anthropic_stream_whose_stop_reason_arrived_is_complete_without_message_stop(tmp_path: Path) -> None:
    async with FakeProvider("primary") as primary, FakeProvider("backup") as backup:
        primary.script(NoTerminal(text="Fire out.", output_tokens=3))
        document = minimal_policy(primary, backup, primary_kind="anthropic", backup_kind="openai")
        async with cli_sidecar(document, tmp_path) as url:
            async with anthropic_client(url).messages.stream(
                model="claude-sonnet-4-5", max_tokens=64, messages=MESSAGES
            ) as stream:
                text = "".join([piece async for piece in stream.text_stream])
                message = await stream.get_final_message()
            exposition = await metrics(url)
    assert text == "Fire out." and message.stop_reason == "end_turn" and message.usage.output_tokens == 3
    assert re.search(r'llmroute_requests_total\{[^}]*outcome="ok"[^}]*\} 1\.0', exposition)
    assert backup.count() == 0


# ----- 3. context window and content policy ---------------------------------------------------------------


CONTEXT_ERRORS: dict[str, Fail] = {
    "openai": Fail(400, error_type="invalid_request_error", code="context_length_exceeded",
                   message="This model's maximum context length is 128000 tokens. However, your messages "
                           "resulted in 129500 tokens. Please reduce the length of the messages."),
    "anthropic": Fail(400, error_type="invalid_request_error",
                      message="prompt is too long: 208310 tokens > 200000 maximum"),
    "gemini": Fail(400, error_type="INVALID_ARGUMENT",
                   message="The input token count (1200000) exceeds the maximum number of tokens allowed (1048576)."),
}  # fmt: skip


@pytest.mark.parametrize("primary_kind", list(CONTEXT_ERRORS))
async def test_a_context_window_error_moves_to_the_next_target_once(tmp_path: Path, primary_kind: str) -> None:
    """The app's request is fine for a bigger model: no retry of the same target, the backup answers with
    its own prompt, degraded, shed reason `context-window`."""
    async with FakeProvider("primary", default=CONTEXT_ERRORS[primary_kind]) as primary, \
            FakeProvider("backup") as backup:  # fmt: skip
        async with cli_sidecar(minimal_policy(primary, backup, primary_kind=primary_kind), tmp_path) as url:
            headers, answer = await ask_openai(url)
    assert primary.count() == 1 and backup.count() == 1
    assert headers["llmroute-target"] == "backup" and headers["llmroute-degraded"] == "true"
    assert headers["llmroute-shed-reason"] == "context-window"
    assert answer.choices[0].message.content.startswith("echo:")


async def test_a_context_window_failover_skips_targets_that_declare_no_larger_window(tmp_path: Path) -> None:
    async with FakeProvider("primary", default=CONTEXT_ERRORS["openai"]) as primary, \
            FakeProvider("backup") as backup, FakeProvider("large") as large:  # fmt: skip
        document = minimal_policy(primary, backup)
        spec = document["spec"]
        spec["providers"].append({"name": "large", "type": "openai", "baseURL": large.openai_base_url})
        spec["routes"][0]["targets"] = [
            target("main", "primary", "openai", contextWindow=128000),
            target("backup", "backup", "anthropic", degraded=True, contextWindow=128000),
            target("long", "large", "openai", degraded=True, contextWindow=1000000),
        ]
        async with cli_sidecar(document, tmp_path) as url:
            headers, _ = await ask_openai(url)
    assert headers["llmroute-target"] == "long" and headers["llmroute-shed-reason"] == "context-window"
    assert (primary.count(), backup.count(), large.count()) == (1, 0, 1)


async def test_a_content_policy_error_goes_back_to_the_app_unless_the_policy_says_fallbackon(tmp_path: Path) -> None:
    refusal = Fail(400, error_type="invalid_request_error", code="content_policy_violation",
                   message="Your request was rejected as a result of our safety system.")
    async with FakeProvider("primary", default=refusal) as primary, FakeProvider("backup") as backup:
        async with cli_sidecar(minimal_policy(primary, backup), tmp_path) as url:
            with pytest.raises(openai.BadRequestError) as refused:
                await ask_openai(url)
        assert refused.value.response.headers["x-should-retry"] == "false"
        assert refused.value.code == "content_policy_violation"
        assert primary.count() == 1 and backup.count() == 0  # not retried, not routed around

        route = {"fallbackOn": ["context-window", "content-policy"]}  # routing around it is opted into
        async with cli_sidecar(minimal_policy(primary, backup, route=route), tmp_path) as url:
            headers, _ = await ask_openai(url)
        assert headers["llmroute-target"] == "backup" and headers["llmroute-shed-reason"] == "content-policy"


# ----- 4. first-token and stall limits ---------------------------------------------------------------------


async def test_a_silent_first_token_fails_over_at_15s_and_a_stream_of_pings_ends_at_30s(tmp_path: Path) -> None:
    """Both at their defaults, side by side on one sidecar. Anthropic pings carry no content: a primary
    that sends only pings fails over after `firstTokenTimeout`, and the backup answers. An OpenAI
    primary that stops after two words and sends keep-alives is cut after `stallTimeout`: no prefill
    to resume with, so the stream ends with the dialect's error event and the SDK raises."""

    def pings_only(request: RecordedRequest) -> Step:
        return PingStream(after_chunks=0, ping_interval=1.0)

    def stalls_when_asked(request: RecordedRequest) -> Step:
        if "stall" in request.last_user_text:
            return PingStream(text="Two words then nothing", after_chunks=2, ping_interval=1.0)
        return Reply(text="backup answer")

    async with FakeProvider("claude", decide=pings_only) as claude, \
            FakeProvider("gpt", decide=stalls_when_asked) as gpt:  # fmt: skip
        document = minimal_policy(claude, gpt, primary_kind="anthropic", backup_kind="openai")
        spec = document["spec"]
        spec["providers"].append({"name": "gpt-direct", "type": "openai", "baseURL": gpt.openai_base_url})
        spec["routes"].append({"name": "direct", "targets": [target("only", "gpt-direct", "openai")]})
        async with cli_sidecar(document, tmp_path) as url:

            async def first_token() -> tuple[float, str, str]:
                started = time.monotonic()
                async with anthropic_client(url).messages.with_streaming_response.create(
                    model="claude-sonnet-4-5", max_tokens=64, messages=MESSAGES, stream=True
                ) as response:
                    body = await response.text()
                    return time.monotonic() - started, response.headers["llmroute-target"], body

            async def stall() -> tuple[float, str, BaseException | None]:
                started = time.monotonic()
                client = openai.AsyncOpenAI(
                    base_url=f"{url}/openai/v1", api_key="app-key", default_headers={"llmroute-route": "direct"}
                )
                received: list[str] = []
                try:
                    stream = await client.chat.completions.create(
                        model="gpt-4.1", messages=[{"role": "user", "content": "please stall"}], stream=True
                    )
                    async for chunk in stream:
                        received.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
                except openai.APIError as exc:
                    return time.monotonic() - started, "".join(received), exc
                return time.monotonic() - started, "".join(received), None

            (waited, answered_by, body), (stalled, words, error) = await asyncio.gather(first_token(), stall())
            exposition = await metrics(url)
    assert 14.0 <= waited < 25.0, waited
    assert answered_by == "backup" and '"text":"answer"' in body and "message_stop" in body
    assert 29.0 <= stalled < 40.0, stalled
    assert words == "Two words " and isinstance(error, openai.APIError)
    assert re.search(r'llmroute_requests_total\{[^}]*outcome="stream_stalled"[^}]*route="direct"[^}]*\} 1\.0', exposition)


# ----- 5. probes beat a lagging status page -----------------------------------------------------------------


def page(url: str) -> dict[str, Any]:
    """The primary's status page; confirmAfter 1 so the shed starts at the first poll (its hysteresis is
    not what these tests are about)."""
    return {"url": url, "components": [CLAUDE_API], "confirmAfter": 1}


async def until(condition: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_probes_end_a_status_page_shed_within_seconds_of_the_primary_answering(tmp_path: Path) -> None:
    """The page says `major_outage` throughout; the primary answers. One probe per `probeInterval` (1 s)
    reaches it, and after two successful probes traffic is back on the primary, page notwithstanding."""
    async with FakeStatusPage.claude() as status, FakeProvider("primary") as primary, \
            FakeProvider("backup") as backup:  # fmt: skip
        status.set_component(CLAUDE_API, "major_outage")
        document = minimal_policy(primary, backup, primary_kind="anthropic", status_page=page(status.summary_url))
        async with cli_sidecar(document, tmp_path) as url:

            async def shedding() -> bool:
                return (await get_json(url, "/status"))["providers"]["primary"]["state"] == "major_outage"

            await until(shedding, 10, "the page's outage was never read")
            shed_at = time.monotonic()
            targets: list[tuple[float, str]] = []
            while time.monotonic() - shed_at < 8:
                headers, _ = await ask_openai(url)
                targets.append((time.monotonic() - shed_at, headers["llmroute-target"]))
                if targets[-1][1] == "main" and len(targets) > 3 and targets[-3][1] == "main":
                    break
                await asyncio.sleep(0.1)
            provider = (await get_json(url, "/status"))["providers"]["primary"]
    back = next(at for at, name in targets if name == "main")
    assert targets[0][1] == "backup", targets  # shed at first: the page is read
    assert back < 4.0, targets  # two probes, about a second apart, a second after the shed began
    assert [name for at, name in targets if at > back + 1.5] == ["main"] * len([a for a, _ in targets if a > back + 1.5])
    assert provider["state"] == "major_outage" and provider["overriddenByProbes"] is True
    assert provider["shedding"] == 0.0


async def test_failing_probes_keep_the_status_page_shed_at_one_call_per_probe_interval(tmp_path: Path) -> None:
    async with FakeStatusPage.claude() as status, FakeProvider("primary", default=Fail(529)) as primary, \
            FakeProvider("backup") as backup:  # fmt: skip
        status.set_component(CLAUDE_API, "major_outage")
        document = minimal_policy(primary, backup, primary_kind="anthropic", status_page=page(status.summary_url))
        async with cli_sidecar(document, tmp_path) as url:

            async def shedding() -> bool:
                return (await get_json(url, "/status"))["providers"]["primary"]["state"] == "major_outage"

            await until(shedding, 10, "the page's outage was never read")
            started = time.monotonic()
            answers = []
            while time.monotonic() - started < 4:
                answers.append(await ask_openai(url))
            elapsed = time.monotonic() - started
            provider = (await get_json(url, "/status"))["providers"]["primary"]
    assert all(headers["llmroute-target"] == "backup" for headers, _ in answers)
    assert 1 <= primary.count() <= elapsed / 0.8 + 1, primary.count()  # probes only, one per interval
    assert provider["overriddenByProbes"] is False and provider["shedding"] == 1.0


# ----- 6. the command line ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "accepts"),
    [
        ("LLMROUTE_LOG_LEVEL", "verbose", "debug, info, warning, error, critical"),
        ("LLMROUTE_LISTEN", "garbage", "host:port"),
        ("LLMROUTE_LISTEN", "127.0.0.1:99999", "host:port"),
        ("LLMROUTE_MAX_IN_FLIGHT", "lots", "a positive integer"),
        ("LLMROUTE_MAX_BUFFERED_BYTES", "-5", "a positive integer"),
        ("LLMROUTE_STREAM_IDLE_TIMEOUT", "0", "a positive number of seconds"),
        ("LLMROUTE_IDLE_TIMEOUT", "soon", "a positive number of seconds"),
        ("LLMROUTE_STATUS_RELAY", "relay:8080", "an http(s) URL"),
    ],
)
def test_a_bad_environment_variable_is_one_line_naming_it_and_what_it_accepts(
    tmp_path: Path, variable: str, value: str, accepts: str
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text((ROOT / "examples" / "standalone.yaml").read_text())
    done = subprocess.run(_cli("sidecar", "--policy", str(path)), env=_env(**{variable: value}),
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert variable in lines[0] and accepts in lines[0] and repr(value) in lines[0]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("level", ["debug", "Warning", "ERROR", "warn"])
async def test_log_levels_are_accepted_in_any_case(tmp_path: Path, level: str) -> None:
    async with FakeProvider("primary") as primary, FakeProvider("backup") as backup:
        async with cli_sidecar(minimal_policy(primary, backup), tmp_path, LLMROUTE_LOG_LEVEL=level) as url:
            headers, _ = await ask_openai(url)
    assert headers["llmroute-target"] == "main"
    logged = (tmp_path / "sidecar.log").read_text()
    assert ('"event": "request"' in logged or '"event":"request"' in logged) == (level == "debug")


async def test_a_missing_policy_file_is_said_at_once_and_on_readyz_until_it_appears(tmp_path: Path) -> None:
    path = tmp_path / "later" / "policy.yaml"
    port = _free_port()
    process = await asyncio.create_subprocess_exec(
        *_cli("sidecar", "--policy", str(path), "--listen", f"127.0.0.1:{port}"),
        env=_env(), stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        assert process.stderr is not None
        first = await asyncio.wait_for(process.stderr.readline(), 10)
        assert b"does not exist" in first and str(path).encode() in first, first
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(f"{url}/readyz") as response:
                        status, text = response.status, await response.text()
                        break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
            assert status == 503 and str(path) in text, text
            async with FakeProvider("primary") as primary, FakeProvider("backup") as backup:
                path.parent.mkdir()
                path.write_text(yaml.safe_dump(minimal_policy(primary, backup)))
                await until_ready(url, process)  # the mount appeared: the policy loads, no restart
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 10)


def test_validate_lists_every_problem_with_its_field_path(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({
        "apiVersion": "llmroute.dev/v1alpha1", "kind": "LLMRoutePolicy", "metadata": {"name": "x"},
        "spec": {
            "providers": [{"name": "claude", "type": "anthropic", "colour": "blue"}],
            "routes": [{"name": "chat", "strategy": "hotHot", "targets": [
                {"name": "a", "provider": "claude"}, {"name": "b", "provider": "gtp"}]}],
        },
    }))  # fmt: skip
    done = subprocess.run(_cli("validate", str(path)), env=_env(), capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    problems = done.stderr.strip().splitlines()
    assert any("spec.providers[0].colour" in line for line in problems), problems
    assert any('spec.routes[0].targets[1].provider: unknown provider "gtp"' in line for line in problems), problems
    assert any("spec.routes[0].strategy" in line and "acknowledgeOutputVariance" in line for line in problems)
    assert len(problems) == 3, problems


def test_help_says_what_each_command_does() -> None:
    done = subprocess.run(_cli("--help"), env=_env(), capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    assert "run `" not in done.stdout
    for command, words in {
        "sidecar": "failover sidecar", "validate": "every problem", "render": "operator would write",
        "operator": "reconcile", "webhook": "injection", "demo": "failover work", "simulate": "compare",
    }.items():  # fmt: skip
        line = next((line for line in done.stdout.splitlines() if line.strip().startswith(command + " ")), "")
        assert words in line, (command, done.stdout)


# ----- 7. the last target that can answer -----------------------------------------------------------------


async def test_a_429_on_the_last_target_that_can_answer_is_retried(tmp_path: Path) -> None:
    """The primary's 429 without `retry-after` fails over at once (the backup may well answer now); the
    backup's own 429s, with nowhere left to go, are retried with backoff until it answers."""
    async with FakeProvider("primary", default=Fail(429)) as primary, FakeProvider("backup") as backup:
        backup.script(Fail(429), Fail(429), Reply(text="answered after two 429s"))
        async with cli_sidecar(minimal_policy(primary, backup), tmp_path) as url:
            headers, answer = await ask_openai(url)
    assert answer.choices[0].message.content == "answered after two 429s"
    assert primary.count() == 1 and backup.count() == 3
    assert headers["llmroute-target"] == "backup" and headers["llmroute-attempts"] == "4"
