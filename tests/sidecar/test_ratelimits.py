"""Rate-limit headers (ratelimits.py): parsing, the decision, the book, on a fake clock.

Table-driven: each row is what a provider (or a proxy in between) might send and what must come of it.
The end-to-end conduct through the real CLI and the SDKs is in test_ratelimit_shedding.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from multidict import CIMultiDict

from llmroute_sidecar.keys import KeySource
from llmroute_sidecar.messages import ChatRequest, Image, Message, Text, ToolSpec
from llmroute_sidecar.policy import Provider
from llmroute_sidecar.ratelimits import (
    PROCEED,
    ProviderLimits,
    RateLimitBook,
    RateLimitCollector,
    Reading,
    Shed,
    Wait,
    decide,
    estimate_input_tokens,
    fingerprint,
    parse_headers,
)

WALL = datetime(2026, 12, 3, 18, 0, 0, tzinfo=UTC).timestamp()
NOW = 1000.0  # the monotonic clock of the tests


def rfc3339(seconds_from_now: float) -> str:
    return (datetime.fromtimestamp(WALL, UTC) + timedelta(seconds=seconds_from_now)).isoformat().replace(
        "+00:00", "Z"
    )


def anthropic(dimension: str, limit: str | None, remaining: str | None, reset: str | None) -> dict[str, str]:
    headers = {}
    for part, value in (("limit", limit), ("remaining", remaining), ("reset", reset)):
        if value is not None:
            headers[f"anthropic-ratelimit-{dimension}-{part}"] = value
    return headers


def openai(dimension: str, limit: str | None, remaining: str | None, reset: str | None) -> dict[str, str]:
    headers = {}
    for part, value in (("limit", limit), ("remaining", remaining), ("reset", reset)):
        if value is not None:
            headers[f"x-ratelimit-{part}-{dimension}"] = value
    return headers


# ----- parsing ---------------------------------------------------------------------------------------------
PARSE_CASES: list[tuple[str, str, dict[str, str], list[tuple[str, int, int | None, float]], list[str]]] = [
    # (case, dialect, headers, readings as (dimension, remaining, limit, reset in s), ignored reasons)
    ("anthropic requests, whole seconds", "anthropic", anthropic("requests", "50", "0", rfc3339(30)),
     [("requests", 0, 50, 30.0)], []),
    ("anthropic fractional seconds and an offset", "anthropic",
     anthropic("input-tokens", "40000", "1200", "2026-12-03T19:00:12.5+01:00"), [("input-tokens", 1200, 40000, 12.5)],
     []),
    ("anthropic all four dimensions", "anthropic",
     {**anthropic("requests", "50", "49", rfc3339(1)), **anthropic("tokens", "90000", "80000", rfc3339(2)),
      **anthropic("input-tokens", "80000", "70000", rfc3339(3)),
      **anthropic("output-tokens", "10000", "9000", rfc3339(4))},
     [("requests", 49, 50, 1.0), ("tokens", 80000, 90000, 2.0), ("input-tokens", 70000, 80000, 3.0),
      ("output-tokens", 9000, 10000, 4.0)], []),
    ("openai durations", "openai",
     {**openai("requests", "500", "0", "6m0s"), **openai("tokens", "30000", "29000", "20ms")},
     [("requests", 0, 500, 360.0), ("tokens", 29000, 30000, 0.02)], []),
    ("openai fractional duration", "openai", openai("tokens", "30000", "10", "1.5s"), [("tokens", 10, 30000, 1.5)],
     []),
    ("no limit header is fine", "openai", openai("requests", None, "3", "1s"), [("requests", 3, None, 1.0)], []),
    ("no headers at all: unknown, not hostile", "anthropic", {"request-id": "req_1"}, [], []),
    ("gemini sends none and none are read", "gemini", openai("requests", "5", "0", "1s"), [], []),
    ("the other vendor's family is not read", "anthropic", openai("requests", "5", "0", "1s"), [], []),
    ("negative remaining", "anthropic", anthropic("requests", "50", "-1", rfc3339(30)), [], ["malformed"]),
    ("non-numeric remaining", "openai", openai("requests", "50", "lots", "1s"), [], ["malformed"]),
    ("float remaining", "openai", openai("requests", "50", "1.5", "1s"), [], ["malformed"]),
    ("absurdly long number", "openai", openai("requests", None, "9" * 40, "1s"), [], ["malformed"]),
    ("a limit of zero", "openai", openai("requests", "0", "0", "1s"), [], ["malformed"]),
    ("remaining above the limit", "anthropic", anthropic("requests", "50", "51", rfc3339(30)), [], ["inconsistent"]),
    ("remaining without a reset", "openai", openai("requests", "50", "0", None), [], ["incomplete"]),
    ("a reset without remaining", "anthropic", anthropic("requests", "50", None, rfc3339(30)), [], ["incomplete"]),
    ("unparseable RFC 3339", "anthropic", anthropic("requests", "50", "0", "tomorrow"), [], ["malformed"]),
    ("RFC 3339 without a zone", "anthropic", anthropic("requests", "50", "0", "2026-12-03T18:00:30"), [],
     ["malformed"]),
    ("negative duration", "openai", openai("requests", "50", "0", "-1s"), [], ["malformed"]),
    ("a duration in days (not Go)", "openai", openai("requests", "50", "0", "2d"), [], ["malformed"]),
    ("a reset in the past", "anthropic", anthropic("requests", "50", "0", rfc3339(-60)), [], ["reset-past"]),
    ("a reset days ahead", "anthropic", anthropic("requests", "50", "0", rfc3339(3 * 86400)), [], ["reset-too-far"]),
    ("a duration days ahead", "openai", openai("requests", "50", "0", "100h"), [], ["reset-too-far"]),
    ("a reset just now: already turned over", "openai", openai("requests", "50", "0", "0s"), [], []),
    ("one bad dimension leaves the good one", "openai",
     {**openai("requests", "50", "x", "1s"), **openai("tokens", "100", "7", "2s")}, [("tokens", 7, 100, 2.0)],
     ["malformed"]),
]


@pytest.mark.parametrize(("dialect", "headers", "readings", "ignored"),
                         [case[1:] for case in PARSE_CASES], ids=[case[0] for case in PARSE_CASES])
def test_rate_limit_headers_parse_into_readings_or_counted_reasons(
    dialect: str, headers: dict[str, str], readings: list[tuple[str, int, int | None, float]], ignored: list[str]
) -> None:
    parsed = parse_headers(dialect, headers, NOW, WALL)
    got = [(r.dimension, r.remaining, r.limit, round(r.reset_at - NOW, 3)) for r in parsed.readings]
    assert got == readings
    assert parsed.ignored == ignored


def test_a_header_sent_twice_with_different_values_is_not_believed() -> None:
    headers = CIMultiDict(openai("requests", "50", "0", "30s"))
    headers.add("x-ratelimit-remaining-requests", "49")  # a proxy in between added its own
    parsed = parse_headers("openai", headers, NOW, WALL)
    assert parsed.readings == [] and parsed.ignored == ["inconsistent"]
    same = CIMultiDict(openai("requests", "50", "0", "30s"))
    same.add("x-ratelimit-remaining-requests", "0")  # repeated, but agreeing
    assert [r.remaining for r in parse_headers("openai", same, NOW, WALL).readings] == [0]


def test_anthropic_resets_are_read_against_the_servers_date_when_the_local_clock_is_off() -> None:
    skewed_wall = WALL + 300  # our clock runs 5 minutes fast
    headers = {**anthropic("requests", "50", "0", rfc3339(30)),
               "date": format_datetime(datetime.fromtimestamp(WALL, UTC), usegmt=True)}
    (reading,) = parse_headers("anthropic", headers, NOW, skewed_wall).readings
    assert 29 <= reading.reset_at - NOW <= 31  # not "in the past", and not 5 minutes off (Date: 1 s resolution)
    without_date = {k: v for k, v in headers.items() if k != "date"}
    assert parse_headers("anthropic", without_date, NOW, skewed_wall).ignored == ["reset-past"]


# ----- the decision ----------------------------------------------------------------------------------------
def r(dimension: str, remaining: int, reset_in: float, limit: int | None = 1000) -> Reading:
    return Reading(dimension, remaining, limit, NOW + reset_in)


DECIDE_CASES: list[tuple[str, list[Reading], float, int, int, object]] = [
    # (case, readings, budget left, estimated input tokens, minRemaining, verdict)
    ("nothing known", [], 8.0, 100, 0, PROCEED),
    ("plenty left", [r("requests", 900, 40), r("input-tokens", 50_000, 40, 80_000)], 8.0, 100, 0, PROCEED),
    ("no requests, far reset: shed", [r("requests", 0, 30)], 8.0, 100, 0, Shed(30.0, "requests")),
    ("no requests, near reset: wait", [r("requests", 0, 2)], 8.0, 100, 0, Wait(2.0, "requests")),
    ("reset exactly at the budget: wait", [r("requests", 0, 8)], 8.0, 100, 0, Wait(8.0, "requests")),
    ("reset passed: no longer applies", [r("requests", 0, -0.001)], 8.0, 100, 0, PROCEED),
    ("one request left is enough", [r("requests", 1, 30)], 8.0, 100, 0, PROCEED),
    ("floor: two left, minRemaining 2", [r("requests", 2, 30)], 8.0, 100, 2, Shed(30.0, "requests")),
    ("floor: three left, minRemaining 2", [r("requests", 3, 30)], 8.0, 100, 2, PROCEED),
    ("input tokens short of the estimate", [r("input-tokens", 500, 20, 80_000)], 8.0, 600, 0,
     Shed(20.0, "input-tokens")),
    ("input tokens enough for the estimate", [r("input-tokens", 600, 20, 80_000)], 8.0, 600, 0, PROCEED),
    ("openai tokens short, near reset", [r("tokens", 10, 0.5, 30_000)], 8.0, 600, 0, Wait(0.5, "tokens")),
    ("an estimate above the whole limit is left to the provider", [r("input-tokens", 100, 20, 1000)], 8.0,
     5000, 0, PROCEED),
    ("output tokens: only an empty limit blocks", [r("output-tokens", 1, 20)], 8.0, 5000, 0, PROCEED),
    ("output tokens empty", [r("output-tokens", 0, 20)], 8.0, 5000, 0, Shed(20.0, "output-tokens")),
    ("the latest reset of the exhausted ones decides", [r("requests", 0, 3), r("input-tokens", 0, 12)], 8.0, 1,
     0, Shed(12.0, "input-tokens")),
    ("a non-exhausted later reset does not", [r("requests", 0, 3), r("input-tokens", 9000, 50)], 8.0, 1, 0,
     Wait(3.0, "requests")),
    ("no budget left at all", [r("requests", 0, 0.2)], 0.0, 1, 0, Shed(0.2, "requests")),
]


@pytest.mark.parametrize(("readings", "budget_left", "tokens", "min_remaining", "verdict"),
                         [case[1:] for case in DECIDE_CASES], ids=[case[0] for case in DECIDE_CASES])
def test_decide(readings: list[Reading], budget_left: float, tokens: int, min_remaining: int, verdict: Any) -> None:
    got = decide(readings, NOW, budget_left, tokens, min_remaining)
    if isinstance(verdict, Wait | Shed):
        assert type(got) is type(verdict)
        assert got.dimension == verdict.dimension  # type: ignore[union-attr]
        seconds = got.seconds if isinstance(got, Wait) else got.reset_in  # type: ignore[union-attr]
        expected = verdict.seconds if isinstance(verdict, Wait) else verdict.reset_in
        assert seconds == pytest.approx(expected)
    else:
        assert got == verdict


def test_the_token_estimate_is_cheap_and_counts_everything_sent() -> None:
    request = ChatRequest(messages=[Message("user", [Text("x" * 4000)])], system="s" * 400)
    assert estimate_input_tokens(request) == 4400 // 4 + 1
    request.tools = [ToolSpec("get_weather", "Weather in a city", {"type": "object"})]
    request.messages.append(Message("user", [Image("image/png", data="AAAA")]))
    assert estimate_input_tokens(request) > 4400 // 4 + 1600


# ----- the book, on a fake clock -----------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def provider(**rate_limits: Any) -> Provider:
    return Provider.model_validate({"name": "claude", "type": "anthropic", "rateLimits": rate_limits})


def test_the_book_keeps_readings_per_provider_and_key_until_their_reset() -> None:
    clock = Clock()
    book = RateLimitBook(clock=clock, wall=lambda: WALL + (clock.now - NOW))
    key_a, key_b = KeySource.fixed("sk-ant-key-a"), KeySource.fixed("sk-ant-key-b")
    limits_a = ProviderLimits(book, provider(), key_a)
    limits_b = ProviderLimits(book, provider(), key_b)
    limits_a.record(anthropic("requests", "50", "0", rfc3339(30)))
    assert isinstance(limits_a.verdict(8.0, lambda: 10), Shed)
    assert limits_b.verdict(8.0, lambda: 10) is PROCEED  # another key, another organisation's limit
    clock.now += 25
    assert isinstance(limits_a.verdict(8.0, lambda: 10), Wait)  # the reset now lies within the budget
    clock.now += 5.001
    assert limits_a.verdict(8.0, lambda: 10) is PROCEED  # after the reset the reading no longer applies
    assert book.readings("claude", fingerprint("sk-ant-key-a")) == []


def test_a_garbage_response_keeps_the_last_good_reading_and_is_counted() -> None:
    clock = Clock()
    book = RateLimitBook(clock=clock, wall=lambda: WALL)
    limits = ProviderLimits(book, provider(), KeySource.fixed("sk-ant-key"))
    limits.record(anthropic("requests", "50", "0", rfc3339(30)))
    limits.record(anthropic("requests", "50", "NaN", rfc3339(30)))
    assert isinstance(limits.verdict(8.0, lambda: 10), Shed)
    assert book.ignored[("claude", "malformed")] == 1


def test_disabled_rate_limits_read_the_headers_but_never_change_routing() -> None:
    book = RateLimitBook(clock=Clock(), wall=lambda: WALL)
    limits = ProviderLimits(book, provider(enabled=False), KeySource.fixed("sk-ant-key"))
    limits.record(anthropic("requests", "50", "0", rfc3339(30)))
    assert limits.verdict(8.0, lambda: 10) is PROCEED
    assert book.snapshot()["claude"]["dimensions"]["requests"]["remaining"] == 0  # type: ignore[index]


def test_the_estimate_is_only_computed_when_a_token_reading_applies() -> None:
    book = RateLimitBook(clock=Clock(), wall=lambda: WALL)
    limits = ProviderLimits(book, provider(), KeySource.fixed("sk-ant-key"))
    calls: list[int] = []

    def estimate() -> int:
        calls.append(1)
        return 10

    limits.record(anthropic("requests", "50", "10", rfc3339(30)))
    assert limits.verdict(8.0, estimate) is PROCEED and calls == []
    limits.record(anthropic("input-tokens", "50000", "5", rfc3339(30)))
    assert isinstance(limits.verdict(8.0, estimate), Shed) and calls == [1]


def test_status_and_metrics_show_the_reading_never_the_key() -> None:
    clock = Clock()
    book = RateLimitBook(clock=clock, wall=lambda: WALL)
    limits = ProviderLimits(book, provider(), KeySource.fixed("sk-ant-secret-key-123"))
    limits.record({**anthropic("requests", "50", "10", rfc3339(30)), **anthropic("tokens", "x", "1", rfc3339(30))})
    snapshot = book.snapshot()
    assert "sk-ant-secret-key-123" not in repr(snapshot)
    assert snapshot["claude"] == {
        "key": fingerprint("sk-ant-secret-key-123"), "observedSecondsAgo": 0.0,
        "dimensions": {"requests": {"limit": 50, "remaining": 10, "resetInSeconds": 30.0, "reset": False}},
        "ignoredHeaders": {"malformed": 1},
    }
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for m in RateLimitCollector(book).collect() for s in m.samples}
    assert samples[("llmroute_ratelimit_remaining_ratio", (("dimension", "requests"), ("provider", "claude")))] == 0.2
    assert samples[("llmroute_ratelimit_reset_seconds", (("dimension", "requests"), ("provider", "claude")))] == 30
    assert samples[("llmroute_ratelimit_headers_ignored_total", (("provider", "claude"), ("reason", "malformed")))] == 1
    clock.now += 31  # after the reset the limit is whole again
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for m in RateLimitCollector(book).collect() for s in m.samples}
    assert samples[("llmroute_ratelimit_remaining_ratio", (("dimension", "requests"), ("provider", "claude")))] == 1
    assert samples[("llmroute_ratelimit_reset_seconds", (("dimension", "requests"), ("provider", "claude")))] == 0


def test_fingerprints_are_short_stable_and_not_the_key() -> None:
    assert fingerprint("sk-ant-abc") == fingerprint("sk-ant-abc") != fingerprint("sk-ant-abd")
    assert "abc" not in fingerprint("sk-ant-abc") and len(fingerprint("sk-ant-abc")) == len("sha256:") + 8
    assert fingerprint(None) == "none"
