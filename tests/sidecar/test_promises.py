"""Promises the README policy reference and the module docstrings make, each proven end to end.

`fallbackRetries`, the route `deadline`, the client's timeout hints, the template sandbox, `validate`
(`minChars`), hot reload of a policy that parses but does not validate, and quorum `pick: first` with
validation. Every test runs the real sidecar on loopback against scripted `FakeProvider`s and asserts
on what the fakes received, the `llmroute-*` headers and the `attempts` of the answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from llmroute_sidecar.simulator.fakes import Fail, FakeProvider, Hang, Reply

from .harness import policy_document, running_sidecar

pytestmark = pytest.mark.timeout(30)

ROUTE = "/v1/routes/summarize"
ANTHROPIC = "/anthropic/v1/messages"
SHORT = {"budget": "300ms", "backoff": {"initial": "20ms", "max": "50ms"}, "attemptTimeout": "2s"}



async def post(
    url: str, path: str = ROUTE, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    body = body if body is not None else {"variables": {"text": "printer on fire"}}
    async with aiohttp.ClientSession() as session, session.post(url + path, json=body, headers=headers) as response:
        raw = await response.read()
        return response.status, {k.lower(): v for k, v in response.headers.items()}, json.loads(raw)


def attempts(body: dict[str, Any]) -> list[tuple[str, str]]:
    return [(a["target"], a["status"]) for a in body["attempts"]]


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def target(name: str, provider: str, model: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "provider": provider, "model": model, "prompt": {"template": "{{ text }}"}, **extra}


# ----- 1. fallbackRetries -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fallback_retries", [1, 0])
async def test_fallback_retries_bounds_the_attempts_each_fallback_target_gets(
    fakes: tuple[FakeProvider, FakeProvider], fallback_retries: int
) -> None:
    """README: `fallbackRetries` is the number of extra attempts each fallback target gets."""
    primary, fallback = fakes
    primary.default = Fail(529)
    fallback.script(Fail(503), Reply(text="from the backup"))
    route = {**SHORT, "deadline": "5s", "fallbackRetries": fallback_retries}
    spec = {"circuitBreaker": {"openAfter": "10s"}}  # the primary sheds on its budget, never its circuit
    async with running_sidecar(policy_document(primary.url, fallback.url, route=route, spec=spec)) as (url, _):
        status, headers, body = await post(url)
    backup = [s for t, s in attempts(body) if t == "backup"]
    assert primary.count() >= 2 and {t for t, _ in attempts(body)} <= {"primary", "backup"}
    if fallback_retries == 1:
        assert status == 200 and body["target"] == "backup" and body["output"]["text"] == "from the backup"
        assert fallback.count() == 2 and fallback.pending_steps == 0
        assert backup == ["error", "ok"]
        assert headers["llmroute-target"] == "backup" and headers["llmroute-degraded"] == "true"
        assert headers["llmroute-attempts"] == str(len(body["attempts"]))
    else:
        assert status == 529 and headers["x-should-retry"] == "false"  # the primary's error (U18)
        assert fallback.count() == 1 and fallback.pending_steps == 1  # the Reply was never asked for
        assert backup == ["error"]
        assert "llmroute-target" not in headers
    assert headers["llmroute-shed-reason"] == "budget-exhausted"


# ----- 2. the route deadline --------------------------------------------------------------------------------


@pytest.mark.parametrize("deadline", ["300ms", "5s"])
async def test_no_retry_starts_after_the_deadline_but_every_fallback_gets_its_first_attempt(
    fakes: tuple[FakeProvider, FakeProvider], deadline: str
) -> None:
    """strategies.py: "no retry starts after the route's deadline (each fallback still gets its first
    attempt)". The primary's single attempt outlives a 300ms deadline; the backup (fallbackRetries: 2)
    then gets exactly one attempt, and the third target still gets its first. With room left (5s) the
    same script lets the backup retry and answer, and the third target is never called."""
    primary, fallback = fakes
    async with FakeProvider("third") as third:
        primary.script(Fail(529, delay=0.45))
        fallback.script(Fail(529), Reply(text="backup after a retry"))
        third.reply_text = "from the third target"
        route = {
            **SHORT,
            "deadline": deadline,
            "fallbackRetries": 2,
            "targets": [
                target("primary", "claude", "claude-sonnet-4-5"),
                target("backup", "gpt", "gpt-4.1-mini", degraded=True),
                target("third", "gpt2", "gpt-4.1-nano", degraded=True),
            ],
        }
        document = policy_document(primary.url, fallback.url, route=route)
        document["spec"]["providers"].append({"name": "gpt2", "type": "openai", "baseURL": third.openai_base_url})
        async with running_sidecar(document) as (url, _):
            status, headers, body = await post(url)
    assert status == 200 and primary.count() == 1
    if deadline == "300ms":
        assert body["target"] == "third" and body["output"]["text"] == "from the third target"
        assert attempts(body) == [("primary", "error"), ("backup", "error"), ("third", "ok")]
        assert fallback.count() == 1 and third.count() == 1
        assert headers["llmroute-target"] == "third" and headers["llmroute-attempts"] == "3"
    else:
        assert body["target"] == "backup" and body["output"]["text"] == "backup after a retry"
        assert attempts(body) == [("primary", "error"), ("backup", "error"), ("backup", "ok")]
        assert fallback.count() == 2 and third.count() == 0
    assert headers["llmroute-shed-reason"] == "budget-exhausted"


# ----- 3. client timeout hints ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hint",
    [
        {"x-stainless-read-timeout": "1"},
        {"X-Server-Timeout": "1"},
        {"x-stainless-timeout": "600", "X-Server-Timeout": "1"},  # the tightest hint wins
    ],
    ids=["x-stainless-read-timeout", "X-Server-Timeout", "tightest-wins"],
)
async def test_every_client_timeout_hint_caps_the_deadline_like_x_stainless_timeout(
    fakes: tuple[FakeProvider, FakeProvider], hint: dict[str, str]
) -> None:
    """README: `x-stainless-timeout`, `x-stainless-read-timeout` and `X-Server-Timeout` cap the route's
    deadline (mirrors test_hostile.py's u3 test): the hanging primary's attempt ends at the client's
    deadline, not at attemptTimeout (2s), and no doomed attempt on the backup follows."""
    primary, fallback = fakes
    primary.default = Hang()
    body = {"model": "claude-app", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
    async with running_sidecar(policy_document(primary.url, fallback.url, route=SHORT)) as (url, state):
        started = time.monotonic()
        status, headers, _ = await post(url, ANTHROPIC, body, headers=hint)
        seconds = time.monotonic() - started
        backup = state.upstreams.healths()[("summarize", "backup")]
        assert backup.failures == 0 and backup.last_failure < 0
        await primary.wait_idle()
    assert status >= 500 and headers["x-should-retry"] == "false"
    assert seconds < 1.5  # the client's 1 s minus the margin, not attemptTimeout (2 s)
    assert primary.count() == 1 and primary.requests[0].outcome == "disconnected"
    assert fallback.count() == 0


# ----- 4. the template sandbox ------------------------------------------------------------------------------

LEAKS = ("<class", "<module", "<function", "<built-in", "__builtins__'")


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ joiner.__init__.__globals__.os }}",
        "{{ lipsum.__globals__['os'] }}",
        "{{ namespace.__init__.__globals__ }}",
        "{{ text.__class__.__base__.__subclasses__() }}",
        "{{ ().__class__.__bases__[0].__subclasses__() }}",
        "{{ text|attr('__class__') }}",
        "{{ text['__class__'] }}",
        "{{ '{0.__class__.__mro__}'.format(text) }}",
        "{{ self._TemplateReference__context }}",
    ],
)
async def test_template_escapes_are_refused_before_any_upstream_call(
    fakes: tuple[FakeProvider, FakeProvider], template: str
) -> None:
    """prompts.py: Jinja runs sandboxed. An escape attempt in a target's template is a 400 (a render
    failure), nothing goes upstream, and neither the answer nor any prompt carries Python internals."""
    primary, fallback = fakes
    route = {
        "targets": [
            {"name": "primary", "provider": "claude", "model": "m", "prompt": {"template": template}},
            target("backup", "gpt", "gpt-4.1-mini", degraded=True),
        ]
    }
    async with running_sidecar(policy_document(primary.url, fallback.url, route=route)) as (url, _):
        status, headers, body = await post(url)
    sent = " ".join(r.raw_body.decode() for r in primary.requests + fallback.requests)
    for leak in LEAKS:
        assert leak not in json.dumps(body) and leak not in sent
    assert status == 400, body
    assert headers["x-should-retry"] == "false"
    assert "unsafe" in body["error"]["message"]
    assert primary.count() == 0 and fallback.count() == 0


async def test_request_variables_are_data_never_templates(fakes: tuple[FakeProvider, FakeProvider]) -> None:
    """A variable holding template syntax is sent verbatim: it is never rendered a second time."""
    primary, fallback = fakes
    payload = "{{ ''.__class__.__mro__ }} {% for x in range(3) %}x{% endfor %}"
    async with running_sidecar(policy_document(primary.url, fallback.url)) as (url, _):
        status, _, body = await post(url, body={"variables": {"text": payload}})
    assert status == 200 and body["target"] == "primary"
    assert primary.count() == 1 and primary.last.last_user_text == "Summarize:\n" + payload
    assert "<class" not in primary.last.raw_body.decode()


# ----- 5. validate.minChars ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "valid"),
    [
        ("too short", False),
        ("   padded    " + " " * 30, False),  # whitespace does not count
        ("x" * 20, True),  # exactly minChars passes
    ],
    ids=["short", "whitespace-padded", "exactly-min"],
)
async def test_min_chars_failure_is_a_failed_attempt_and_the_next_target_answers(
    fakes: tuple[FakeProvider, FakeProvider], answer: str, valid: bool
) -> None:
    """README: `validate.minChars`; checks.py: a failed check is a failed attempt of that target (no
    retry on it: the same model would answer alike) and the next target is tried."""
    primary, fallback = fakes
    primary.default = Reply(text=answer)
    fallback.reply_text = "a backup answer long enough to pass"
    route = {
        **SHORT,
        "targets": [
            target("primary", "claude", "claude-sonnet-4-5", validate={"minChars": 20}),
            target("backup", "gpt", "gpt-4.1-mini", degraded=True, validate={"minChars": 20}),
        ],
    }
    async with running_sidecar(policy_document(primary.url, fallback.url, route=route)) as (url, _):
        status, headers, body = await post(url)
    assert status == 200 and primary.count() == 1
    if valid:
        assert body["target"] == "primary" and attempts(body) == [("primary", "ok")]
        assert fallback.count() == 0 and "llmroute-shed-reason" not in headers
        return
    assert body["target"] == "backup" and body["output"]["text"] == "a backup answer long enough to pass"
    assert attempts(body) == [("primary", "invalid"), ("backup", "ok")]
    assert fallback.count() == 1
    assert headers["llmroute-target"] == "backup" and headers["llmroute-degraded"] == "true"
    assert headers["llmroute-shed-reason"] == "primary-error" and headers["llmroute-attempts"] == "2"


async def test_an_invalid_answer_is_not_labelled_as_a_connection_failure(
    fakes: tuple[FakeProvider, FakeProvider],
) -> None:
    primary, fallback = fakes
    primary.default = Reply(text="short")
    route = {
        **SHORT,
        "targets": [
            target("primary", "claude", "m", validate={"minChars": 20}),
            target("backup", "gpt", "m2", degraded=True),
        ],
    }
    async with running_sidecar(policy_document(primary.url, fallback.url, route=route)) as (url, _):
        status, _, body = await post(url)
    assert status == 200 and body["attempts"][0]["status"] == "invalid"
    assert body["attempts"][0]["error"] == "validation: quality check failed: answer shorter than 20 characters"


# ----- 6. hot reload of a policy that parses but does not validate ------------------------------------------


def _unknown_provider(doc: dict[str, Any]) -> None:
    doc["spec"]["routes"][0]["targets"][1]["provider"] = "nope"


def _bad_budget(doc: dict[str, Any]) -> None:
    doc["spec"]["routes"][0]["budget"] = "soon"


def _typo_field(doc: dict[str, Any]) -> None:
    doc["spec"]["routes"][0]["fallbackRetry"] = 2


def _bad_template(doc: dict[str, Any]) -> None:
    doc["spec"]["routes"][0]["targets"][0]["prompt"]["template"] = "{{ text "


@pytest.mark.parametrize(
    ("breaks", "expected"),
    [
        (_unknown_provider, 'spec.routes[0].targets[1].provider: unknown provider "nope"'),
        (_bad_budget, "spec.routes[0].budget"),
        (_typo_field, "spec.routes[0].fallbackRetry"),
        (_bad_template, "spec.routes[0].targets[0]: invalid template"),
    ],
    ids=["unknown-provider", "bad-budget", "typo-field", "bad-template"],
)
@pytest.mark.parametrize("dump", ["json", "yaml"])
async def test_a_reload_that_parses_but_fails_validation_is_refused_with_its_field_path(
    fakes: tuple[FakeProvider, FakeProvider],
    tmp_path: Path,
    breaks: Callable[[dict[str, Any]], None],
    expected: str,
    dump: str,
) -> None:
    """reloading.py: a file that fails validation (schema, semantics or compile) is refused; the last
    good policy keeps serving and `/status` shows the error with its field path; the next good write
    applies and clears it."""
    primary, fallback = fakes
    path = tmp_path / f"policy.{dump}"
    encode = json.dumps if dump == "json" else yaml.safe_dump

    def write(doc: dict[str, Any]) -> None:
        staged = tmp_path / "staged"
        staged.write_text(encode(doc))
        os.replace(staged, path)  # atomic: never a half-written file

    document = policy_document(primary.url, fallback.url, route=SHORT)
    write(document)
    async with running_sidecar(policy_path=path) as (url, state):
        assert state.runtime is not None and state.last_error is None
        good_hash = state.runtime.policy.config_hash
        broken = json.loads(json.dumps(document))
        broken["metadata"]["generation"] = 2
        breaks(broken)
        write(broken)
        await until(lambda: state.last_error is not None)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/status") as response:
                status = await response.json()
            async with session.get(f"{url}/readyz") as response:
                assert response.status == 200
            async with session.get(f"{url}/metrics") as response:
                metrics = await response.text()
        assert expected in status["error"], status["error"]
        assert status["errorAt"] and status["ready"] is True
        assert status["configHash"] == good_hash and status["generation"] == 1
        assert "llmroute_config_reload_errors_total 1.0" in metrics
        code, headers, body = await post(url)
        assert code == 200 and body["target"] == "primary" and headers["llmroute-route"] == "summarize"
        assert primary.count() == 1 and primary.last.model == "claude-sonnet-4-5"

        fixed = json.loads(json.dumps(document))
        fixed["metadata"]["generation"] = 3
        fixed["spec"]["routes"][0]["targets"][0]["model"] = "claude-haiku-4-5"
        write(fixed)
        await until(lambda: state.runtime is not None and state.runtime.policy.generation == 3)
        assert state.last_error is None
        code, _, body = await post(url)
        assert code == 200 and primary.last.model == "claude-haiku-4-5"


# ----- 7. quorum pick: first with validation ----------------------------------------------------------------


@pytest.mark.parametrize("invalid", ["primary", "backup"])
async def test_quorum_pick_first_never_lets_an_invalid_answer_win(
    fakes: tuple[FakeProvider, FakeProvider], invalid: str
) -> None:
    """Policy `pick: first`: "first valid answer wins". The invalid answer arrives first; the slower
    valid one from the other target wins, and the invalid one is listed as an `invalid` attempt."""
    primary, fallback = fakes
    long_enough = "a valid answer, long enough to pass"
    bad, good = (primary, fallback) if invalid == "primary" else (fallback, primary)
    bad.script(Reply(text="short"))
    good.script(Reply(text=long_enough, delay=0.3))
    route = {
        **SHORT,
        "strategy": "quorum",
        "quorum": {"pick": "first"},
        "targets": [
            target("primary", "claude", "claude-sonnet-4-5", validate={"minChars": 20}),
            target("backup", "gpt", "gpt-4.1-mini", degraded=True, validate={"minChars": 20}),
        ],
    }
    winner = "backup" if invalid == "primary" else "primary"
    async with running_sidecar(policy_document(primary.url, fallback.url, route=route)) as (url, _):
        status, headers, body = await post(url)
    assert status == 200, body
    assert body["target"] == winner and body["output"]["text"] == long_enough
    assert headers["llmroute-target"] == winner
    assert sorted(attempts(body)) == sorted([(invalid, "invalid"), (winner, "ok")])
    assert primary.count() == 1 and fallback.count() == 1
    if winner == "backup":
        assert headers["llmroute-degraded"] == "true" and headers["llmroute-shed-reason"] == "quorum"
    else:
        assert headers["llmroute-degraded"] == "false" and "llmroute-shed-reason" not in headers
