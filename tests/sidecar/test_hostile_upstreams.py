"""Hostile upstreams, through the real CLI: redirects, errors that quote keys, answers and requests that
cannot be translated or trusted (docs/hostile.md, rows U20-U23).

Each test runs `llmroute sidecar --policy FILE` as a subprocess (`harness.cli_sidecar`) against
`FakeProvider`s on loopback, and talks to it with the official SDKs where they apply.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from llmroute_sidecar.errors import ClientError
from llmroute_sidecar.keys import KeySource
from llmroute_sidecar.scrubbing import Keyring, Scrubber
from llmroute_sidecar.simulator.fakes import Fail, FakeProvider, Garbage, RecordedRequest, StreamError

from .harness import cli_sidecar

pytestmark = pytest.mark.timeout(90)

KEYS = {
    "anthropic": "sk-ant-api03-cli-hostile-secret-0001",
    "openai": "sk-proj-cli-hostile-secret-0002",
    "gemini": "AIzaSy-cli-hostile-secret-0003",
    "backup": "sk-proj-cli-hostile-backup-0004",
}
ENV = {f"HOSTILE_CLI_{name.upper()}_KEY": key for name, key in KEYS.items()}
APP_KEY = "sk-app-placeholder-the-app-sent-0005"
MODEL = {"anthropic": "claude-sonnet-4-5", "openai": "gpt-4.1", "gemini": "gemini-2.5-flash"}
USER: Any = [{"role": "user", "content": "Summarize: the printer is on fire"}]


def base_url(fake: FakeProvider, kind: str) -> str:
    return fake.url + "/v1" if kind == "openai" else fake.url


def write_policy(
    tmp_path: Path, primary: FakeProvider, fallback: FakeProvider, route: dict[str, Any] | None = None
) -> Path:
    """One route per provider type (`anthropic`, `openai`, `gemini`), each with its primary on `primary`
    and the same OpenAI-shaped `backup` on `fallback`; keys from the environment (`ENV`)."""
    providers = [
        {"name": kind, "type": kind, "baseURL": base_url(primary, kind), "apiKey": {"env": f"HOSTILE_CLI_{kind.upper()}_KEY"}}
        for kind in MODEL
    ]
    providers.append({"name": "backup", "type": "openai", "baseURL": base_url(fallback, "openai"),
                      "apiKey": {"env": "HOSTILE_CLI_BACKUP_KEY"}})
    routes = [
        {
            "name": kind,
            "budget": "400ms",
            "attemptTimeout": "3s",
            "backoff": {"initial": "20ms", "max": "50ms"},
            "targets": [
                {"name": "primary", "provider": kind, "model": MODEL[kind],
                 "prompt": {"template": "Summarize:\n{{ text }}"}},
                {"name": "backup", "provider": "backup", "model": "gpt-4.1-mini", "degraded": True,
                 "prompt": {"system": "You are the backup.", "template": "{{ text }}"}},
            ],
            **(route or {}),
        }
        for kind in MODEL
    ]
    policy = {
        "apiVersion": "llmroute.dev/v1alpha1",
        "kind": "LLMRoutePolicy",
        "metadata": {"name": "hostile-upstreams"},
        "spec": {"providers": providers, "routes": routes, "defaultRoute": "anthropic",
                 "retryBudget": {"ratio": 0.2, "minPerSecond": 100, "window": "10s"}},
    }
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    return path


async def route_api(url: str, route: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/routes/{route}", json={"variables": {"text": "fire"}}) as response:
            return response.status, await response.json()


def anthropic_client(url: str, route: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=f"{url}/anthropic", api_key=APP_KEY, max_retries=0,
                                    default_headers={"llmroute-route": route})


def openai_client(url: str, route: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/openai/v1", api_key=APP_KEY, max_retries=0,
                              default_headers={"llmroute-route": route})


def received_key(request: RecordedRequest) -> str:
    """The key a provider of the request's dialect received."""
    headers = request.headers
    return headers.get("x-api-key") or headers.get("x-goog-api-key") or headers["authorization"].split()[-1]


# ----- U20: redirects ------------------------------------------------------------------------------------
async def test_u20_a_redirect_from_any_provider_type_is_a_failed_attempt_never_followed(tmp_path: Path) -> None:
    """Each provider type answers a 3xx pointing at another origin: nothing (no key, no body) goes there,
    the fallback answers, and the log names the `Location` host only."""
    statuses = {"anthropic": 307, "openai": 302, "gemini": 308}
    async with (
        FakeProvider("trap", reply_text="the trap answered") as trap,
        FakeProvider("redirector") as redirector,
        FakeProvider("fallback", reply_text="the fallback answered") as fallback,
    ):

        def redirect(request: RecordedRequest) -> Fail:
            # The rest of a Location can carry anything: here the very key the provider received.
            location = f"{trap.url}{request.path}?key={received_key(request)}"
            return Fail(statuses[str(request.dialect)], headers={"Location": location}, body=b"")

        redirector.decide = redirect
        async with cli_sidecar(write_policy(tmp_path, redirector, fallback), ENV) as sidecar:
            for kind in statuses:
                status, body = await route_api(sidecar.url, kind)
                assert status == 200, body
                assert body["target"] == "backup" and body["output"]["text"] == "the fallback answered"
                assert [a["target"] for a in body["attempts"]] == ["primary", "backup"]
            async with anthropic_client(sidecar.url, "anthropic") as client:
                message = await client.messages.create(model="claude-app", max_tokens=20, messages=USER)
                assert message.content[0].type == "text" and message.content[0].text == "the fallback answered"
            await sidecar.wait_for(lambda: len(sidecar.events("upstream_redirect")) == 4)
    assert trap.count() == 0
    assert sorted(str(r.dialect) for r in redirector.requests) == ["anthropic", "anthropic", "gemini", "openai"]
    logged = sidecar.events("upstream_redirect")
    assert sorted(e["status"] for e in logged) == [302, 307, 307, 308]
    assert {e["locationHost"] for e in logged} == {"127.0.0.1"}
    assert {e["provider"] for e in logged} == set(statuses)
    everything = "\n".join(sidecar.logs)
    assert not any(key in everything for key in KEYS.values())


# ----- U21: errors that quote keys -----------------------------------------------------------------------
def echo_the_key(request: RecordedRequest) -> Fail:
    """A 401 (Gemini: 400 API_KEY_INVALID) whose message and headers quote the key received, the app's
    own key and, JSON-escaped, the key again."""
    key = received_key(request)
    quoted = f"invalid key {key}; the app sent {APP_KEY}"
    headers = {"x-echo-key": key}
    if request.dialect == "anthropic":
        return Fail(401, error_type="authentication_error", message=quoted, headers=headers)
    if request.dialect == "openai":
        body = {"error": {"message": quoted, "type": "invalid_request_error", "param": None,
                          "code": "invalid_api_key", "escaped": key.replace("-", "\\u002d")}}
        return Fail(401, body=json.dumps(body).replace("\\\\u002d", "\\u002d"), headers=headers)
    body = {"error": {"code": 400, "message": quoted, "status": "INVALID_ARGUMENT",
                      "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                                   "metadata": {"key": key}}]}}
    return Fail(400, body=body, headers=headers)


async def test_u21_an_error_quoting_a_key_reaches_no_app_log_or_span_with_it(tmp_path: Path) -> None:
    """Every provider type echoes the key it received (and the app's own) in its error body and a header;
    the app gets the error relayed (same dialect) or translated, with `[redacted]` in their place; the
    logs and the spans (printed by the console exporter) never hold a key. A stream's error event too."""
    async with FakeProvider("echo") as echo, FakeProvider("fallback") as fallback:
        echo.decide = echo_the_key
        env = {**ENV, "OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "50"}
        seen: list[str] = []
        async with cli_sidecar(write_policy(tmp_path, echo, fallback, {"resumeStreams": False}), env) as sidecar:
            for route in MODEL:
                async with anthropic_client(sidecar.url, route) as claude:
                    with pytest.raises(anthropic.APIStatusError) as raised:
                        await claude.messages.create(model="claude-app", max_tokens=20, messages=USER)
                    seen += [str(raised.value), json.dumps(raised.value.body), json.dumps(dict(raised.value.response.headers))]
                    assert raised.value.status_code in (400, 401) and "[redacted]" in str(raised.value)
                async with openai_client(sidecar.url, route) as gpt:
                    with pytest.raises(openai.APIStatusError) as failed:
                        await gpt.chat.completions.create(model="gpt-app", messages=USER)
                    seen += [str(failed.value), json.dumps(failed.value.body), json.dumps(dict(failed.value.response.headers))]
                    assert failed.value.status_code in (400, 401) and "[redacted]" in str(failed.value)
            # A stream whose error event quotes the key, after the first words reached the app.
            echo.decide = None
            echo.script(StreamError(after_chunks=1, error_type="api_error", message=f"boom {KEYS['anthropic']} {APP_KEY}"))
            async with anthropic_client(sidecar.url, "anthropic") as claude:
                with pytest.raises(anthropic.APIStatusError) as broke:
                    async with claude.messages.stream(model="claude-app", max_tokens=20, messages=USER) as stream:
                        async for _ in stream:
                            pass
            seen.append(str(broke.value))
            assert "[redacted]" in str(broke.value)
            async with aiohttp.ClientSession() as session, session.get(f"{sidecar.url}/status") as response:
                seen.append(await response.text())
            await sidecar.wait_for(lambda: sum('"llmroute.outcome"' in line for line in sidecar.stdout) >= 7)
    assert echo.count() == 7
    surfaces = [*seen, "\n".join(sidecar.logs), "\n".join(sidecar.stdout)]
    for secret in (*KEYS.values(), APP_KEY):
        for surface in surfaces:
            assert secret not in surface


# ----- U22: a request that cannot be translated, a primary that keeps failing ---------------------------
async def test_u22_an_untranslatable_request_gets_the_primarys_error_even_with_its_circuit_open(
    tmp_path: Path,
) -> None:
    """The primary fails with 503 (its circuit opens after the first request's retries); the app's
    request holds a document block the OpenAI fallback cannot take. Every answer is the primary's own
    503, never a "cannot translate": the primary is the only target that can serve it, so it is tried."""
    document = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "notes"}}
    async with FakeProvider("primary") as primary, FakeProvider("fallback") as fallback:
        primary.default = Fail(503, error_type="api_error", message="the primary is down")
        # maxAttempts above what the 400 ms budget fits: the first request's retries outlast openAfter.
        policy = write_policy(tmp_path, primary, fallback, route={"maxAttempts": 20})
        async with cli_sidecar(policy, ENV) as sidecar:
            async with anthropic_client(sidecar.url, "anthropic") as claude:
                for stream in (False, True, False, True):
                    with pytest.raises(anthropic.InternalServerError) as raised:
                        await claude.messages.create(
                            model="claude-app", max_tokens=20, stream=stream,
                            messages=[{"role": "user", "content": [document, {"type": "text", "text": "sum up"}]}],
                        )
                    assert raised.value.status_code == 503
                    assert raised.value.body["error"]["message"] == "the primary is down"  # type: ignore[index]
            async with aiohttp.ClientSession() as session, session.get(f"{sidecar.url}/status") as response:
                health = (await response.json())["routes"]["anthropic"]["targets"]["primary"]
    assert health["state"] == "open"  # the later requests came while the circuit was open
    assert fallback.count() == 0 and primary.count() >= 4


async def test_u22_a_content_item_no_dialect_can_read_is_a_400_never_dropped(tmp_path: Path) -> None:
    """`content: 5`, a block that is no object, a text block whose text is a number: a 400 in the app's
    dialect, nothing sent anywhere (a translation used to drop the item and send `messages: []`)."""
    async with FakeProvider("primary") as primary, FakeProvider("fallback") as fallback:
        async with cli_sidecar(write_policy(tmp_path, primary, fallback), ENV) as sidecar:
            async with anthropic_client(sidecar.url, "openai") as claude:
                for content in (5, [5], [{"type": "text", "text": 5}]):
                    with pytest.raises(anthropic.BadRequestError) as raised:
                        await claude.messages.create(model="claude-app", max_tokens=20,
                                                     messages=[{"role": "user", "content": content}])  # type: ignore[typeddict-item]
                    assert raised.value.body["error"]["message"].startswith("messages[0].content")  # type: ignore[index]
            async with openai_client(sidecar.url, "anthropic") as gpt:
                with pytest.raises(openai.BadRequestError) as refused:
                    await gpt.chat.completions.create(model="gpt-app", messages=[{"role": "user", "content": 5}])  # type: ignore[list-item,misc]
                assert refused.value.body["message"].startswith("messages[0].content")  # type: ignore[index]
    assert primary.count() == 0 and fallback.count() == 0


# ----- U23: a same-dialect 200 with fields of the wrong type -----------------------------------------------
@pytest.mark.parametrize(
    ("route", "answer"),
    [
        ("anthropic", {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
                       "content": [{"type": "text", "text": 5}], "stop_reason": "end_turn",
                       "usage": {"input_tokens": 3, "output_tokens": 1}}),
        ("openai", {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4.1",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": {"text": "hi"}},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": "1", "total_tokens": 4}}),
    ],
)
async def test_u23_a_same_dialect_200_with_mistyped_fields_is_a_failed_attempt(
    tmp_path: Path, route: str, answer: dict[str, Any]
) -> None:
    """Relayed as is, the SDK would hand the app a number or an object where its types promise a string:
    the answer is a failed attempt (502 class: retried, then the fallback answers)."""
    async with FakeProvider("primary") as primary, FakeProvider("fallback", reply_text="a typed answer") as fallback:
        primary.default = Garbage(200, json.dumps(answer).encode())
        async with cli_sidecar(write_policy(tmp_path, primary, fallback), ENV) as sidecar:
            if route == "anthropic":
                async with anthropic_client(sidecar.url, route) as claude:
                    raw = await claude.messages.with_raw_response.create(model="claude-app", max_tokens=20, messages=USER)
                    message = await raw.parse()
                    assert message.content[0].type == "text" and message.content[0].text == "a typed answer"
                    headers = raw.headers
            else:
                async with openai_client(sidecar.url, route) as gpt:
                    answered = await gpt.chat.completions.with_raw_response.create(model="gpt-app", messages=USER)
                    completion = answered.parse()
                    assert completion.choices[0].message.content == "a typed answer"
                    headers = answered.headers
            assert headers["llmroute-target"] == "backup" and headers["llmroute-degraded"] == "true"
            await sidecar.wait_for(lambda: bool(sidecar.events("request")))
    attempts = sidecar.events("request")[0]["attempts"]
    assert attempts[0]["target"] == "primary" and attempts[0]["status"] == "error"
    assert "502" in attempts[0]["error"] and attempts[-1]["target"] == "backup"
    assert primary.count() >= 1 and fallback.count() == 1


def test_u21_the_scrubber_catches_plain_escaped_and_nested_spellings_and_spares_short_values() -> None:
    key = "sk-ant-api03-abc/def"
    scrubber = Scrubber([key, "sk-ant-api03-abc", "x", "test"])  # a key inside a longer one; too short ones
    assert scrubber.text(f"bad key {key}.") == "bad key [redacted]."
    assert scrubber.text("x marks the test") == "x marks the test"
    escaped = json.dumps({"error": {"message": f"got {key}", key: [key]}}).replace("/", "\\/").encode()
    assert key.encode() not in escaped  # JSON may escape "/": only parsing finds it
    assert json.loads(scrubber.body(escaped)) == {"error": {"message": "got [redacted]", "[redacted]": ["[redacted]"]}}
    untouched = b'{ "error" : "nothing secret" }'
    assert scrubber.body(untouched) is untouched  # re-encoded only when something was found
    assert scrubber.body(b"<h1>" + key.encode() + b"</h1>\xff") == b"<h1>[redacted]</h1>\xff"
    error = ClientError(f"401 {key}", status=401, error_type=f"auth {key}", body=escaped, headers={"x-echo": key})
    assert scrubber.error(error) is error
    assert key not in f"{error} {error.message} {error.error_type} {error.headers} {error.body!r}"


def test_u21_the_keyring_remembers_keys_after_a_reload_or_rotation_replaced_them() -> None:
    keyring = Keyring()
    keyring.track([KeySource.fixed("sk-first-key-0001"), KeySource.fixed(None)])
    assert keyring.values() == ["sk-first-key-0001"]
    keyring.track([KeySource.fixed("sk-second-key-0002")])
    assert keyring.values() == ["sk-first-key-0001", "sk-second-key-0002"]
