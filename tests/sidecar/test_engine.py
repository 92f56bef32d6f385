"""The engine end to end: route API -> strategy -> adapters -> fake providers on loopback."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from llmroute_sidecar.simulator.fakes import Fail, Hang, Reply, Reset

from .harness import policy_document, running_sidecar


async def post(url: str, route: str = "summarize", **body) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as session, session.post(f"{url}/v1/routes/{route}", json=body) as response:
        return response.status, dict(response.headers), await response.json()


async def test_microspike_recovers_on_primary_without_fallback(fakes):
    primary, fallback = fakes
    primary.script(Fail(529), Fail(529))
    async with running_sidecar(policy_document(primary.url, fallback.url)) as (url, _):
        status, headers, body = await post(url, variables={"text": "printer on fire"})
    assert status == 200
    assert body["target"] == "primary" and body["degraded"] is False
    assert [a["status"] for a in body["attempts"]] == ["error", "error", "ok"]
    assert headers["llmroute-degraded"] == "false" and headers["llmroute-attempts"] == "3"
    assert "llmroute-shed-reason" not in headers
    assert primary.count() == 3 and fallback.count() == 0
    assert body["output"]["text"] == "echo: Summarize:\nprinter on fire"


async def test_sustained_outage_sheds_to_fallback_with_its_own_prompt_and_model(fakes):
    primary, fallback = fakes
    primary.default = Fail(529)
    # openAfter defaults to the budget: this one request, failing for its whole budget, may open the
    # circuit in its last retry (then the reason is circuit-open). Here the budget alone decides.
    document = policy_document(primary.url, fallback.url, spec={"circuitBreaker": {"openAfter": "10s"}})
    async with running_sidecar(document) as (url, _):
        status, headers, body = await post(url, variables={"text": "printer on fire"})
    assert status == 200
    assert body["target"] == "backup" and body["degraded"] is True
    assert body["notice"] == "We're temporarily using a backup model."
    assert headers["llmroute-degraded"] == "true"
    assert headers["llmroute-shed-reason"] == "budget-exhausted"
    sent = fallback.last.body
    assert sent["model"] == "gpt-4.1-mini"
    assert sent["messages"][0] == {"role": "system", "content": "Summarize the ticket in 3 bullet points."}
    assert sent["messages"][-1]["content"] in (
        "printer on fire",
        [{"type": "text", "text": "printer on fire"}],
    )
    assert primary.count() >= 3


async def test_client_error_from_primary_goes_back_without_fallback(fakes):
    primary, fallback = fakes
    primary.script(Fail(400, message="max_tokens: too large"))
    async with running_sidecar(policy_document(primary.url, fallback.url)) as (url, _):
        status, headers, body = await post(url, variables={"text": "x"})
    assert status == 400
    assert headers["x-should-retry"] == "false"
    assert fallback.count() == 0 and primary.count() == 1
    assert "max_tokens" in body["error"]["message"]


async def test_retry_after_beyond_budget_sheds_early(fakes):
    primary, fallback = fakes
    primary.script(Fail(529, retry_after=30))
    async with running_sidecar(policy_document(primary.url, fallback.url, route={"budget": "5s"})) as (
        url,
        _,
    ):
        started = asyncio.get_running_loop().time()
        status, headers, body = await post(url, variables={"text": "x"})
        elapsed = asyncio.get_running_loop().time() - started
    assert status == 200 and body["target"] == "backup"
    assert primary.count() == 1
    assert headers["llmroute-shed-reason"] == "budget-exhausted"
    assert elapsed < 2.0


async def test_missing_template_variable_is_a_400_with_no_upstream_call(fakes):
    primary, fallback = fakes
    async with running_sidecar(policy_document(primary.url, fallback.url)) as (url, _):
        status, headers, body = await post(url, variables={"txet": "typo"})
    assert status == 400
    assert "text" in body["error"]["message"]
    assert primary.count() == 0 and fallback.count() == 0


async def test_retry_budget_stops_a_retry_storm(fakes):
    primary, fallback = fakes
    primary.default = Fail(503)
    document = policy_document(
        primary.url,
        fallback.url,
        spec={"retryBudget": {"ratio": 0.1, "minPerSecond": 0.5, "window": "10s"}},
        # maxAttempts at its ceiling: the retry budget, not the per-request cap, is what binds here.
        route={"budget": "2s", "backoff": {"initial": "10ms", "max": "20ms"}, "maxAttempts": 20},
    )
    async with running_sidecar(document) as (url, state):
        results = await asyncio.gather(*(post(url, variables={"text": str(i)}) for i in range(40)))
    assert all(status == 200 for status, _, _ in results)
    reasons = {headers.get("llmroute-shed-reason") for _, headers, _ in results}
    assert "retry-budget" in reasons
    # 40 first attempts + at most 0.1 * 40 + 0.5 * 10 retries allowed by the budget.
    assert primary.count() <= 40 + 9
    assert fallback.count() == 40


async def test_failover_strategy_makes_one_primary_attempt(fakes):
    primary, fallback = fakes
    primary.default = Fail(500)
    async with running_sidecar(
        policy_document(primary.url, fallback.url, route={"strategy": "failover"})
    ) as (
        url,
        _,
    ):
        status, headers, body = await post(url, variables={"text": "x"})
    assert status == 200 and body["target"] == "backup"
    assert primary.count() == 1
    assert headers["llmroute-shed-reason"] == "primary-error"


async def test_connection_reset_and_hang_are_retried_then_shed(fakes):
    primary, fallback = fakes
    primary.script(Reset(), Hang())
    route = {"attemptTimeout": "300ms", "budget": "2s"}
    async with running_sidecar(policy_document(primary.url, fallback.url, route=route)) as (url, _):
        status, _, body = await post(url, variables={"text": "x"})
    assert status == 200 and body["target"] == "primary"
    assert [a["status"] for a in body["attempts"]] == ["error", "error", "ok"]
    assert body["attempts"][1]["error"] == "timeout"


async def test_everything_failing_returns_the_primary_error_without_sdk_retry(fakes):
    primary, fallback = fakes
    primary.default = Fail(529)
    fallback.default = Fail(500)
    async with running_sidecar(policy_document(primary.url, fallback.url)) as (url, _):
        status, headers, body = await post(url, variables={"text": "x"})
    assert status == 529
    assert headers["x-should-retry"] == "false"
    assert body["error"]["type"] == "overloaded_error"


async def test_quality_check_failure_moves_to_the_next_target(fakes):
    primary, fallback = fakes
    primary.script(Reply(text="not json"))
    route = {
        "targets": [
            {
                "name": "primary",
                "provider": "claude",
                "model": "m1",
                "validate": {"jsonSchema": {"type": "object"}},
            },
            {"name": "backup", "provider": "gpt", "model": "m2", "degraded": True},
        ]
    }
    fallback.reply_text = '{"ok": true}'
    async with running_sidecar(policy_document(primary.url, fallback.url, route=route)) as (url, _):
        status, _, body = await post(url, variables={"input": "x"})
    assert status == 200 and body["target"] == "backup"
    assert body["attempts"][0]["status"] == "invalid"
    assert body["output"]["json"] == {"ok": True}


async def test_streaming_route_api_sends_meta_deltas_done(fakes):
    primary, fallback = fakes
    primary.script(Fail(529))
    async with running_sidecar(policy_document(primary.url, fallback.url)) as (url, _):
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{url}/v1/routes/summarize", json={"variables": {"text": "hi"}, "stream": True}
            ) as response:
                assert response.headers["Content-Type"].startswith("text/event-stream")
                raw = (await response.read()).decode()
    blocks = [block.split("\n", 1) for block in raw.strip().split("\n\n")]
    events = [(head.removeprefix("event: "), json.loads(data.removeprefix("data: "))) for head, data in blocks]
    names = [name for name, _ in events]
    assert names[0] == "meta" and names[-1] == "done" and "delta" in names
    meta = events[0][1]
    # The scripted 529 happened before the stream: a failed attempt, then the one that streamed.
    assert meta["target"] == "primary"
    assert [(a["target"], a["status"], a.get("error")) for a in meta["attempts"]] == [
        ("primary", "error", "529 overloaded_error"),
        ("primary", "ok", None),
    ]
    assert primary.count() == 2 and fallback.count() == 0
    text = "".join(data["text"] for name, data in events if name == "delta")
    assert text == "echo: Summarize:\nhi"


def test_a_request_asking_for_thinking_or_reasoning_waits_at_least_five_minutes_for_its_first_token():
    """firstTokenTimeout (15 s) is for plain requests; extended thinking / reasoning requests (whoever
    asked: the app's body or a target's params) think before their first visible token."""
    from llmroute_sidecar.messages import ChatRequest, NativeBody
    from llmroute_sidecar.policy import Route
    from llmroute_sidecar.strategies import asks_for_reasoning

    route = Route.model_validate({"name": "r", "targets": [{"name": "t", "provider": "p"}]})
    plain = ChatRequest(messages=[])
    asking = [
        ChatRequest(messages=[], native=NativeBody("anthropic", {"thinking": {"type": "enabled", "budget_tokens": 8000}})),
        ChatRequest(messages=[], native=NativeBody("openai", {"reasoning_effort": "high"})),
        ChatRequest(messages=[], extra={"thinkingConfig": {"thinkingBudget": 2048}}),
        ChatRequest(messages=[], extra={"generationConfig": {"thinkingConfig": {"includeThoughts": True}}}),
    ]
    not_asking = [
        plain,
        ChatRequest(messages=[], native=NativeBody("anthropic", {"thinking": {"type": "disabled"}})),
        ChatRequest(messages=[], native=NativeBody("openai", {"reasoning_effort": "minimal"})),
        ChatRequest(messages=[], extra={"thinkingConfig": {"thinkingBudget": 0}}),
    ]
    assert all(asks_for_reasoning(r) for r in asking)
    assert not any(asks_for_reasoning(r) for r in not_asking)
    assert route.first_token_limit(False) == 15.0 and route.first_token_limit(True) == 300.0
    assert route.stall_timeout == 30.0 and route.max_attempts == 5 and route.fallback_on == ["context-window"]
