"""Odd bytes from clients and a policy path that goes bad, through the real CLI (docs/hostile.md, rows
D13, D14 and E8).

The requests here are raw bytes on a socket: no SDK or HTTP client can send a header that is not UTF-8 or
a malformed request on purpose. The sidecar is `llmroute sidecar --policy FILE` (`harness.cli_sidecar`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from llmroute_sidecar.malformed import RateLimit
from llmroute_sidecar.reloading import PolicyWatcher
from llmroute_sidecar.scrubbing import printable
from llmroute_sidecar.simulator.fakes import FakeProvider

from .harness import cli_sidecar, policy_document
from .test_hostile import counter, exchange

pytestmark = pytest.mark.timeout(90)

MARKER = b"sk-secret-the-client-sent"
"""Bytes of a request aiohttp cannot parse: they must never reach the log."""
ANTHROPIC_BODY = b'{"model":"claude-app","max_tokens":20,"messages":[{"role":"user","content":"hi"}]}'
OPENAI_BODY = b'{"model":"gpt-app","messages":[{"role":"user","content":"hi"}]}'


def raw_post(path: bytes, body: bytes, *headers: bytes) -> bytes:
    head = [b"POST " + path + b" HTTP/1.1", b"Host: 127.0.0.1", b"Content-Type: application/json",
            b"Content-Length: %d" % len(body), *headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def policy_file(tmp_path: Path, fakes: tuple[FakeProvider, FakeProvider], name: str = "policy.yaml") -> Path:
    primary, fallback = fakes
    path = tmp_path / name
    path.write_text(yaml.safe_dump(policy_document(primary.url, fallback.url)))
    return path


# ----- D13: client-supplied names that are not UTF-8 -----------------------------------------------------
async def test_d13_a_header_or_path_that_is_not_utf8_is_refused_in_the_endpoints_shape(
    fakes: tuple[FakeProvider, FakeProvider], tmp_path: Path
) -> None:
    """`llmroute-route: caf\\xe9\\xff` used to crash the request (500, a traceback): the JSON encoder refused
    the surrogate-escaped name. Now: a 404 in the endpoint's shape naming the route safely escaped; a
    protocol header that must travel on (`anthropic-beta`) is a 400; long names are cut; no name a client
    makes up reaches a metric label; nothing goes upstream and nothing is logged as a crash."""
    primary, fallback = fakes
    async with cli_sidecar(policy_file(tmp_path, fakes)) as sidecar:
        status, headers, body, _ = await exchange(
            sidecar.url, raw_post(b"/anthropic/v1/messages", ANTHROPIC_BODY, b"llmroute-route: caf\xe9\xff\tx")
        )
        assert status == 404 and headers["x-should-retry"] == "false"
        error = json.loads(body)
        assert error["type"] == "error" and error["error"]["type"] == "not_found_error"
        assert error["error"]["message"] == 'unknown route "caf\\xe9\\xff\\tx" (llmroute-route header)'

        status, _, body, _ = await exchange(
            sidecar.url, raw_post(b"/openai/v1/chat/completions", OPENAI_BODY, b"llmroute-route: " + b"\xfe" * 500)
        )
        message = json.loads(body)["error"]["message"]
        assert status == 404 and message.startswith('unknown route "\\xfe\\xfe') and len(message) < 260

        for path, body_, header in [
            (b"/anthropic/v1/messages", ANTHROPIC_BODY, b"anthropic-beta: tools-\xff"),
            (b"/openai/v1/chat/completions", OPENAI_BODY, b"openai-organization: org-\xe9"),
        ]:
            status, _, body, _ = await exchange(sidecar.url, raw_post(path, body_, header))
            assert status == 400 and "header: not valid UTF-8" in json.loads(body)["error"]["message"]

        long_name = b"%ff" * 200
        status, _, body, _ = await exchange(sidecar.url, raw_post(b"/v1/routes/" + long_name, b'{"variables": {}}'))
        message = json.loads(body)["error"]["message"]
        assert status == 404 and message.startswith('unknown route "%ff%ff') and len(message) < 220

        async with aiohttp.ClientSession() as session:
            async with session.get(f"{sidecar.url}/metrics") as response:
                metrics = await response.text()
            async with session.get(f"{sidecar.url}/readyz") as response:
                assert response.status == 200
        await sidecar.wait_for(lambda: len(sidecar.events("request")) == 5)
    assert primary.count() == 0 and fallback.count() == 0
    assert counter(metrics, "llmroute_requests_total", route="none", outcome="request_error") == 5
    assert "caf" not in metrics and "%ff" not in metrics
    logs = "\n".join(sidecar.logs)
    assert "Traceback" not in logs and "Unhandled exception" not in logs


# ----- D14: malformed HTTP -------------------------------------------------------------------------------
MALFORMED = {
    "LineTooLong": b"POST /v1/routes/summarize HTTP/1.1\r\nHost: x\r\nX-Long: " + MARKER * 1200 + b"\r\n\r\n",
    "TransferEncodingError": b"POST /v1/routes/summarize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"zz\r\n" + MARKER + b"\r\n0\r\n\r\n",
    "InvalidHeader": b"POST /v1/routes/summarize HTTP/1.1\r\nHost: x\r\nX-Key" + MARKER + b" : v\r\n\r\n",
    "BadStatusLine": MARKER + b" prompt text in place of a request line\r\n\r\n",
    "InvalidURLError": b"POST /v1/routes/" + MARKER + b"\xff HTTP/1.1\r\nHost: x\r\n\r\n",
}


async def test_d14_malformed_http_is_one_short_warning_without_the_requests_bytes_and_rate_limited(
    fakes: tuple[FakeProvider, FakeProvider], tmp_path: Path
) -> None:
    """aiohttp answers each with a 400 before any handler; its log used to be a traceback quoting up to
    ~100 bytes of the request. Now each is one JSON line (kind, status, peer), no byte of the request; a
    flood writes at most 10 at once, then 1 a second, and the next line counts what was left out."""
    async with cli_sidecar(policy_file(tmp_path, fakes)) as sidecar:
        for sent, data in enumerate(MALFORMED.values(), start=1):
            status, _, _, _ = await exchange(sidecar.url, data)
            assert status == 400
            await sidecar.wait_for(lambda sent=sent: len(sidecar.events("malformed_request")) == sent)
        logged = sidecar.events("malformed_request")
        assert {e["kind"] for e in logged} <= {*MALFORMED, "BadHttpMessage", "BadHttpMethod"}
        assert all(e["peer"] == "127.0.0.1" and e["status"] == 400 for e in logged)

        started = asyncio.get_running_loop().time()
        flood = 40
        for _ in range(flood):
            assert (await exchange(sidecar.url, MALFORMED["BadStatusLine"]))[0] == 400
        elapsed = asyncio.get_running_loop().time() - started
        sent = len(MALFORMED) + flood

        def reported() -> int:
            return sum(1 + e.get("suppressed", 0) for e in sidecar.events("malformed_request"))

        # Every malformed request is a line or counted as left out by a later line: until the counts
        # meet, another bad request, which finds a token within a second, reports the left-out ones.
        while True:
            try:
                await sidecar.wait_for(lambda sent=sent: reported() == sent, timeout=0.5)
                break
            except TimeoutError:
                assert asyncio.get_running_loop().time() - started < 20, "the left-out requests were never reported"
            assert (await exchange(sidecar.url, MALFORMED["InvalidHeader"]))[0] == 400
            sent += 1
        assert any("suppressed" in e for e in sidecar.events("malformed_request"))
        async with aiohttp.ClientSession() as session, session.get(f"{sidecar.url}/healthz") as response:
            assert response.status == 200
    lines = sidecar.events("malformed_request")
    assert len(lines) <= 10 + elapsed + 2 + (sent - len(MALFORMED) - flood)  # the burst, the refill, the probes
    logs = "\n".join(sidecar.logs)
    assert MARKER.decode() not in logs and "prompt text" not in logs
    assert "Traceback" not in logs and "Error handling request" not in logs


# ----- E8: a policy path that goes bad -------------------------------------------------------------------
async def test_e8_a_policy_path_that_loops_becomes_a_directory_or_vanishes_is_logged_once_per_state(
    fakes: tuple[FakeProvider, FakeProvider], tmp_path: Path
) -> None:
    """The path is a symlink, as in a ConfigMap volume. It becomes a symlink loop, then a directory, then
    disappears, then comes back: each state is logged once with its reason, shown on `/status`, counted
    once in `llmroute_config_reload_errors_total`, and the last good policy serves throughout."""
    real = policy_file(tmp_path, fakes, "real.yaml")
    link = tmp_path / "policy.yaml"
    link.symlink_to(real.name)
    reasons = ["is a symlink loop", "is a directory", "does not exist"]

    def make(state: str) -> None:
        if link.is_dir() and not link.is_symlink():
            link.rmdir()
        elif link.is_symlink() or link.exists():
            link.unlink()
        if state == "is a symlink loop":
            os.symlink(link.name, link)
        elif state == "is a directory":
            link.mkdir()
        elif state == "good":
            link.symlink_to(real.name)

    async with cli_sidecar(link) as sidecar, aiohttp.ClientSession() as session:
        for position, reason in enumerate(reasons, start=1):
            make(reason)
            await sidecar.wait_for(lambda position=position: len(sidecar.events("policy_unreadable")) == position)
            assert sidecar.events("policy_unreadable")[-1] == {"event": "policy_unreadable", "path": str(link),
                                                               "reason": reason}
            async with session.get(f"{sidecar.url}/status") as response:
                shown = await response.json()
            assert shown["error"] == f"policy file {link} {reason}" and shown["ready"] is True
            async with session.post(f"{sidecar.url}/v1/routes/summarize", json={"variables": {"text": "a"}}) as answer:
                assert answer.status == 200  # the last good policy keeps serving
        make("good")
        await sidecar.wait_for(lambda: bool(sidecar.events("policy_readable")))
        await sidecar.wait_for(lambda: sum("policy applied" in line for line in sidecar.logs) == 2)
        async with session.get(f"{sidecar.url}/status") as response:
            assert (await response.json())["error"] is None
        async with session.get(f"{sidecar.url}/metrics") as response:
            metrics = await response.text()
    assert counter(metrics, "llmroute_config_reload_errors_total") == len(reasons)
    assert [e["reason"] for e in sidecar.events("policy_unreadable")] == reasons
    assert len(sidecar.events("policy_readable")) == 1


def test_e8_an_unreadable_policy_path_is_refused_once_however_often_it_is_polled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The watcher's poll, called directly: twenty polls of one bad state refuse (and log) once."""
    caplog.set_level(logging.INFO, "llmroute.reload")
    link = tmp_path / "policy.yaml"
    os.symlink(link.name, link)
    refused: list[str] = []
    applied: list[Any] = []
    watcher = PolicyWatcher(link, applied.append, refused.append)
    for _ in range(20):
        assert watcher.load_now() is False
    assert refused == [f"policy file {link} is a symlink loop"]
    link.unlink()
    for _ in range(20):
        watcher.load_now()
    assert refused[1:] == [f"policy file {link} does not exist"]
    link.write_text(yaml.safe_dump(policy_document("http://127.0.0.1:9", "http://127.0.0.1:9")))
    assert watcher.load_now() is True and len(applied) == 1
    logged = [json.loads(r.getMessage())["event"] for r in caplog.records if r.getMessage().startswith("{")]
    assert logged == ["policy_unreadable", "policy_unreadable", "policy_readable"]


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("summarize", "summarize"),
        ("caf\udce9\udcff", "caf\\xe9\\xff"),  # aiohttp's spelling of the bytes caf\xe9\xff
        ("a\tb\x00c\u200b", "a\\tb\\x00c\\u200b"),
        ("é" * 300, "é" * 199 + "…"),
    ],
)
def test_d13_printable_escapes_and_bounds_what_a_client_sent(value: str, shown: str) -> None:
    assert printable(value) == shown
    json.dumps(printable(value)).encode()  # always encodable


def test_d14_the_rate_limit_allows_a_burst_then_one_a_second() -> None:
    now = [0.0]
    limit = RateLimit(per_second=1.0, burst=10, clock=lambda: now[0])
    assert [limit.allow() for _ in range(12)] == [True] * 10 + [False] * 2
    now[0] = 0.5
    assert limit.allow() is False
    now[0] = 1.0
    assert limit.allow() is True and limit.allow() is False
    now[0] = 100.0
    assert sum(limit.allow() for _ in range(20)) == 10  # never more than the burst, however long the pause
