"""Status pages: parsing real captures and hostile bodies, polling, hysteresis, and the cluster relay.

The servers here are real loopback aiohttp servers (a scripted status host and the relay app); poll
intervals are tens of milliseconds and every wait is bounded on a condition.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from llmroute_sidecar.policy import Provider
from llmroute_sidecar.statusboard import FAIL_OPEN_AFTER, StatusBoard
from llmroute_sidecar.statuspages import MAX_BODY, Reading, page_key, parse_google_cloud, parse_statuspage
from llmroute_sidecar.statuspolling import backoff_cap, backoff_delay
from llmroute_sidecar.statusrelay import RELAY_PATH, build_relay_app, decode_document, relay_endpoint

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "providers"  # copies of shared/ captures
API = "k8w3r06qmzrp"
JSON = "application/json; charset=utf-8"
CHALLENGE = b"<!DOCTYPE html><html><head><title>Just a moment...</title></head><body>challenge</body></html>"


def fixture(name: str) -> bytes:
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"fixture {name} not available")
    return path.read_bytes()


def summary(api: str = "operational", indicator: str = "none", incidents: list[Any] | None = None) -> bytes:
    """A Claude-shaped summary.json with the API component in `api` state."""
    return orjson.dumps({
        "page": {"id": "tymt9n04zgry", "name": "Claude", "updated_at": "2026-09-04T12:03:36.857Z"},
        "status": {"indicator": indicator, "description": "..."},
        "components": [
            {"id": "rwppv331jlwc", "name": "claude.ai", "status": "operational", "group_id": None},
            {"id": API, "name": "Claude API (api.anthropic.com)", "status": api, "group_id": None},
        ],
        "incidents": incidents or [],
        "scheduled_maintenances": [],
    })  # fmt: skip


# ----- parsing --------------------------------------------------------------------------------------------


def test_claude_summary_reads_the_api_component_by_id_and_by_name() -> None:
    body = fixture("claude_summary_2026-09-04_trimmed.json")
    by_id = parse_statuspage(body, JSON, [API])
    by_name = parse_statuspage(body, JSON, ["claude api (API.anthropic.com)"])
    for reading in (by_id, by_name):
        assert reading.usable and reading.error is None
        assert (reading.state, reading.level, reading.missing_components) == ("operational", 0, [])
    assert by_id.components == {API: "operational"}


def test_component_status_decides_not_the_page_indicator() -> None:
    reading = parse_statuspage(fixture("claude_summary_incident_shape_2026-08-06.json"), JSON, [API])
    assert (reading.state, reading.level, reading.usable) == ("partial_outage", 2, True)
    assert reading.incidents == ["Elevated errors on Claude API"]
    # a claude.ai-only incident raises the page indicator, but the watched API component is fine
    calm_api = parse_statuspage(summary(api="operational", indicator="critical"), JSON, [API])
    assert calm_api.state == "operational"


@pytest.mark.parametrize(
    ("name", "state", "level"),
    [
        ("claude_summary_2026-09-04_trimmed.json", "none", 0),
        ("claude_summary_incident_shape_2026-08-06.json", "major", 2),
        ("claude_status_json_2026-08-09.json", "none", 0),
        ("openai_incidentio_summary_2026-09-04_trimmed.json", "none", 0),
        ("openai_incidentio_summary_with_incident_2026-08-06.json", "minor", 1),
        ("statuspage_docs_example_summary.json", "major", 2),
        ("statuspage_indicator_maintenance_asana_observed.json", "maintenance", 1),
        ("openai_incidentio_proxy_shape.json", "major", 2),
    ],
)
def test_page_indicator_is_the_state_when_no_component_is_watched(name: str, state: str, level: int) -> None:
    reading = parse_statuspage(fixture(name), JSON, [])
    assert (reading.state, reading.level, reading.usable) == (state, level, True)


def test_incidentio_summary_without_incidents_or_groups_is_usable() -> None:
    reading = parse_statuspage(
        fixture("openai_incidentio_summary_2026-09-04_trimmed.json"), JSON, ["Codex API"]
    )
    assert (reading.state, reading.usable, reading.incidents) == ("operational", True, [])
    assert reading.components == {"Codex API": "operational"}


def test_incident_in_monitoring_is_listed_but_does_not_shed() -> None:
    body = fixture("openai_incidentio_summary_with_incident_2026-08-06.json")
    reading = parse_statuspage(body, JSON, ["API"])
    assert reading.state == "operational"
    assert reading.incidents == ["Issues with Custom GPT actions"]


def test_unresolved_incident_naming_a_watched_component_counts() -> None:
    naming = {"name": "API down", "status": "identified", "impact": "critical",
              "components": [{"id": API, "name": "Claude API (api.anthropic.com)"}]}  # fmt: skip
    other = {"name": "claude.ai slow", "status": "investigating", "impact": "critical",
             "components": [{"id": "rwppv331jlwc", "name": "claude.ai"}]}  # fmt: skip
    resolved = {**naming, "name": "old", "status": "resolved"}
    assert parse_statuspage(summary(incidents=[naming]), JSON, [API]).state == "major_outage"
    by_name = {**naming, "components": [{"name": "Claude API (api.anthropic.com)"}]}
    assert parse_statuspage(summary(incidents=[by_name]), JSON, [API]).state == "operational"
    assert parse_statuspage(summary(incidents=[by_name]), JSON, ["Claude API (api.anthropic.com)"]).state == (
        "major_outage"
    )
    quiet = parse_statuspage(summary(incidents=[other, resolved]), JSON, [API])
    assert quiet.state == "operational"
    assert quiet.incidents == ["claude.ai slow"]


def test_components_inside_groups_are_matched() -> None:
    body = fixture("statuspage_group_components_hashicorp_derived.json")
    group = parse_statuspage(body, JSON, ["ym75hzpmfq4q"])
    member = parse_statuspage(body, JSON, ["Consul"])
    assert (group.state, member.state) == ("under_maintenance", "degraded_performance")
    both = parse_statuspage(body, JSON, ["ym75hzpmfq4q", "vault"])
    assert both.state == "degraded_performance"  # maintenance ranks below degraded performance
    # that capture has no page indicator: usable only while every watched component is found
    assert not parse_statuspage(body, JSON, []).usable


def test_incidentio_widget_shape_matches_group_members_and_hides_hidden_ones() -> None:
    body = fixture("openai_incidentio_proxy_shape.json")
    reading = parse_statuspage(body, JSON, ["CLI", "k5", "Codex"])
    assert reading.components == {"CLI": "partial_outage", "k5": "operational", "Codex": "partial_outage"}
    assert reading.state == "partial_outage"
    hidden = parse_statuspage(body, JSON, ["Hidden thing", "Nope"])
    assert hidden.missing_components == ["Hidden thing", "Nope"]


def test_maintenance_indicator_is_known_and_mild() -> None:
    body = fixture("statuspage_indicator_maintenance_asana_observed.json")
    reading = parse_statuspage(body, JSON, [])
    assert (reading.state, reading.level, reading.usable) == ("maintenance", 1, True)


def test_missing_component_falls_back_to_the_page_indicator_and_is_reported() -> None:
    status_json = parse_statuspage(fixture("claude_status_json_2026-08-09.json"), JSON, [API])
    assert status_json.usable and status_json.state == "operational"
    assert status_json.missing_components == [API]
    renamed = parse_statuspage(summary(indicator="critical"), JSON, ["gone-id"])
    assert (renamed.state, renamed.missing_components) == ("major_outage", ["gone-id"])
    partly = parse_statuspage(summary(api="degraded_performance", indicator="major"), JSON, [API, "gone-id"])
    assert partly.state == "partial_outage"
    assert partly.components == {API: "degraded_performance"}


def test_google_cloud_resolved_incident_is_operational() -> None:
    body = fixture("gcp_incidents_json_element_checkmk.json")
    reading = parse_google_cloud(body, JSON, ["Google BigQuery"])
    assert (reading.state, reading.usable, reading.incidents) == ("operational", True, [])


def gcp(severity: str | None = "high", product: str = "Vertex Gemini API", end: str | None = None) -> bytes:
    incident = orjson.loads(fixture("gcp_incidents_json_element_checkmk.json"))[0]
    incident.pop("end")
    if end is not None:
        incident["end"] = end
    if severity is None:
        incident.pop("severity")
    else:
        incident["severity"] = severity
    incident["external_desc"] = f"{product} errors"
    incident["service_name"] = product
    incident["affected_products"] = [{"title": product, "id": "Z0FZJAMvEB4j3NbCJs6B"}]
    return orjson.dumps([incident])


@pytest.mark.parametrize(
    ("severity", "state"),
    [("high", "major_outage"), ("medium", "partial_outage"), ("low", "degraded_performance")],
)
def test_google_cloud_active_incident_maps_severity(severity: str, state: str) -> None:
    reading = parse_google_cloud(gcp(severity), JSON, ["vertex gemini api"])
    assert (reading.state, reading.usable, reading.incidents) == (state, True, ["Vertex Gemini API errors"])


def test_google_cloud_ignores_other_products_and_ended_incidents() -> None:
    other_product = gcp(product="Google BigQuery")
    assert parse_google_cloud(other_product, JSON, ["Vertex Gemini API"]).state == "operational"
    ended = gcp(end="2026-01-01T00:00:00+00:00")
    assert parse_google_cloud(ended, JSON, ["Vertex Gemini API"]).state == "operational"
    # without severity, status_impact decides (the fixture's SERVICE_INFORMATION)
    assert parse_google_cloud(gcp(None), JSON, ["Vertex Gemini API"]).state == "degraded_performance"
    assert parse_google_cloud(gcp("high"), JSON, ["Z0FZJAMvEB4j3NbCJs6B"]).state == "major_outage"


def test_google_cloud_without_products_reads_any_incident_as_an_indicator() -> None:
    assert parse_google_cloud(gcp("high"), JSON, []).state == "critical"
    assert parse_google_cloud(b"[]", JSON, []).state == "none"


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        (CHALLENGE, "text/html; charset=UTF-8", "content_type"),
        (CHALLENGE, JSON, "not_json"),
        (summary(), "text/html", "content_type"),
        (b"", JSON, "not_json"),
        (b'{"status": {"indicator": "none"', JSON, "invalid_json"),
        (b'{"status":"none"}', JSON, "shape"),
        (b'{"status":{"indicator":7}}', JSON, "shape"),
        (b'{"page":{"id":"x"}}', JSON, "shape"),
        (b'{"status":{"indicator":"none"},"components":{"a":1}}', JSON, "shape"),
        (b'["not", "a", "summary"]', JSON, "not_json"),
        (b"{" * 100_000, JSON, "invalid_json"),
        (b" " * (MAX_BODY + 1), JSON, "too_large"),
    ],
)
def test_garbage_is_unusable_never_operational(body: bytes, content_type: str, reason: str) -> None:
    reading = parse_statuspage(body, content_type, [])
    assert not reading.usable
    assert reading.state == "unknown" and reading.level == 0
    assert reading.reason == reason, reading.error


def test_google_cloud_garbage_is_unusable() -> None:
    assert parse_google_cloud(summary(), JSON, []).reason == "not_json"
    assert parse_google_cloud(b'[{"end": 7}]', JSON, []).reason == "shape"
    assert parse_google_cloud(gcp("apocalyptic"), JSON, ["Vertex Gemini API"]).reason == "unknown_value"
    assert parse_google_cloud(CHALLENGE, "text/html", []).reason == "content_type"


def test_unknown_enum_values_are_unusable_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    odd = f"exploded-{uuid.uuid4().hex[:6]}"
    with caplog.at_level(logging.WARNING, logger="llmroute_sidecar.statuspages"):
        for _ in range(3):
            reading = parse_statuspage(summary(api=odd), JSON, [API])
            assert (reading.usable, reading.state, reading.reason) == (False, "unknown", "unknown_value")
        assert not parse_statuspage(summary(indicator=odd), JSON, []).usable
    logged = [record for record in caplog.records if odd in record.getMessage()]
    assert len(logged) == 2  # once as a component status, once as a page indicator
    # an odd value on a component nobody watches does not matter
    body = orjson.loads(summary())
    body["components"][0]["status"] = odd
    assert parse_statuspage(orjson.dumps(body), JSON, [API]).usable


def test_incidentio_full_outage_is_read_as_major_outage() -> None:
    assert parse_statuspage(summary(api="full_outage"), JSON, [API]).state == "major_outage"


def test_reading_round_trips_through_json_and_rejects_garbage() -> None:
    reading = parse_statuspage(fixture("claude_summary_incident_shape_2026-08-06.json"), JSON, [API])
    assert Reading.from_json(orjson.loads(orjson.dumps(reading.to_json()))) == reading
    bad_ones: list[Any] = [
        {"state": "fine", "level": 0, "usable": True},
        {"state": "none", "level": 9, "usable": True},
        {"state": "unknown", "level": 0, "usable": True},
        {"state": "none", "level": 0},
        [],
    ]
    for bad in bad_ones:
        with pytest.raises(ValueError):
            Reading.from_json(bad)


def test_backoff_grows_exponentially_with_jitter_up_to_a_cap() -> None:
    rng = random.Random(7)
    for failures in range(1, 6):
        delays = [backoff_delay(30.0, failures, rng) for _ in range(50)]
        base = min(30.0 * 2**failures, backoff_cap(30.0))
        assert all(base / 2 <= d <= base for d in delays)
        assert len(set(delays)) > 1
    assert backoff_cap(30.0) == 300.0 and backoff_cap(0.05) == pytest.approx(0.8)
    assert backoff_delay(30.0, 1, rng, hint=200.0) == 200.0  # retry-after honoured, up to the cap
    assert backoff_delay(30.0, 1, rng, hint=9999.0) == 300.0


def test_page_key_ignores_component_order_and_shedding_rules() -> None:
    one = provider("a", components=["x", "y"], shed_on=["major_outage"]).status_page
    two = provider("b", components=["y", "x"], shed_on=["partial_outage"], interval="1m").status_page
    assert one is not None and two is not None
    assert page_key(one) == page_key(two)


# ----- a scripted loopback status host ------------------------------------------------------------------


@dataclass
class FakePage:
    """What one path of the fake status host answers, and what it saw."""

    body: bytes = field(default_factory=summary)
    status: int = 200
    content_type: str = JSON
    etag: str | None = None
    last_modified: str | None = None
    hang: bool = False
    script: list[bytes] = field(default_factory=list)
    """Bodies served one per request before falling back to `body`."""
    requests: int = 0
    not_modified: int = 0
    seen: list[dict[str, str]] = field(default_factory=list)
    requested: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)


class FakeStatusHost:
    def __init__(self) -> None:
        self.pages: dict[str, FakePage] = {}
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        self.server = TestServer(app)

    def page(self, path: str = "/api/v2/summary.json", **kwargs: Any) -> tuple[str, FakePage]:
        self.pages[path] = FakePage(**kwargs)
        return str(self.server.make_url(path)), self.pages[path]

    @property
    def total_requests(self) -> int:
        return sum(page.requests for page in self.pages.values())

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        page = self.pages.get(request.path)
        if page is None:
            return web.Response(status=404, text="no such page")
        page.requests += 1
        page.seen.append(dict(request.headers))
        page.requested.set()
        if page.hang:
            await page.release.wait()
        if page.etag and request.headers.get("If-None-Match") == page.etag:
            page.not_modified += 1
            return web.Response(status=304, headers={"ETag": page.etag})
        if page.last_modified and request.headers.get("If-Modified-Since") == page.last_modified:
            page.not_modified += 1
            return web.Response(status=304)
        headers = {"Content-Type": page.content_type}
        if page.etag:
            headers["ETag"] = page.etag
        if page.last_modified:
            headers["Last-Modified"] = page.last_modified
        body = page.script.pop(0) if page.script else page.body
        return web.Response(status=page.status, body=body, headers=headers)

    async def close(self) -> None:
        for page in self.pages.values():
            page.release.set()
        await self.server.close()


@pytest.fixture
async def host() -> AsyncIterator[FakeStatusHost]:
    fake = FakeStatusHost()
    await fake.server.start_server()
    yield fake
    await fake.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def make_board(session: aiohttp.ClientSession) -> AsyncIterator[Callable[..., StatusBoard]]:
    boards: list[StatusBoard] = []

    def make(**kwargs: Any) -> StatusBoard:
        kwargs.setdefault("min_interval", 0.0)
        kwargs.setdefault("autostart", False)
        board = StatusBoard(session, **kwargs)
        boards.append(board)
        return board

    yield make
    for board in boards:
        await board.close()


def provider(
    name: str,
    url: str = "http://127.0.0.1:9/summary.json",
    *,
    components: list[str] | None = None,
    shed_on: list[str] | None = None,
    partial: dict[str, float] | None = None,
    confirm: int = 2,
    recover: int = 2,
    interval: str = "50ms",
    type_: str = "statuspage",
) -> Provider:
    page: dict[str, Any] = {
        "type": type_,
        "url": url,
        "components": [API] if components is None else components,
        "pollInterval": interval,
        "confirmAfter": confirm,
        "recoverAfter": recover,
    }
    if shed_on is not None:
        page["shedOn"] = shed_on
    if partial is not None:
        page["partialShed"] = partial
    return Provider.model_validate({"name": name, "type": "anthropic", "statusPage": page})


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


# ----- polling and hysteresis ---------------------------------------------------------------------------


async def test_major_outage_sheds_after_confirm_after_polls_and_returns_after_recover_after(
    host: FakeStatusHost, make_board: Callable[..., StatusBoard]
) -> None:
    url, page = host.page(body=summary("major_outage"))
    board = make_board()
    board.configure([provider("claude", url, confirm=3, recover=2)])
    assert board.shed_share("claude") == (0.0, None)
    shares = []
    for _ in range(3):
        await board.poll_now()
        shares.append(board.shed_share("claude"))
    assert shares == [(0.0, None), (0.0, None), (1.0, "major_outage")]
    page.body = summary("operational")
    await board.poll_now()
    assert board.shed_share("claude") == (1.0, "major_outage")
    await board.poll_now()
    assert board.shed_share("claude") == (0.0, "operational")
    assert board.levels() == {"claude": 0}
    assert board.shed_share("nobody") == (0.0, None)


async def test_probes_end_a_shed_after_two_successes_in_a_row_and_a_failure_resets_the_count(
    host: FakeStatusHost, make_board: Callable[..., StatusBoard]
) -> None:
    """Evidence beats the page: one probe per interval (the first one an interval after the shed began),
    two successful probes in a row end the shed while the page still says major_outage; a failed probe
    resets the count; the override ends with the page's own recovery. On a fake clock."""
    now = [100.0]
    url, page = host.page(body=summary("major_outage"))
    board = make_board(clock=lambda: now[0])
    board.configure([provider("claude", url, confirm=1, recover=1)])
    assert not board.probe("claude", 1.0)  # not shed: nothing to probe
    await board.poll_now()
    assert board.shed_share("claude") == (1.0, "major_outage")
    assert not board.probe("claude", 1.0)  # the shed just began
    now[0] += 1.0
    assert board.probe("claude", 1.0) and not board.probe("claude", 1.0)  # one per interval
    board.probe_result("claude", True)
    now[0] += 1.3
    assert board.probe("claude", 1.0)
    board.probe_result("claude", False)  # a failure: start counting again
    assert board.shed_share("claude")[0] == 1.0
    for _ in range(2):
        now[0] += 1.3
        assert board.probe("claude", 1.0)
        board.probe_result("claude", True)
    assert board.shed_share("claude") == (0.0, "major_outage")  # the page has not recovered; traffic has
    assert board.snapshot()["claude"]["overriddenByProbes"] is True
    now[0] += 5
    assert not board.probe("claude", 1.0)  # nothing left to probe
    page.body = summary("operational")
    await board.poll_now()
    assert board.shed_share("claude") == (0.0, "operational")
    assert board.snapshot()["claude"]["overriddenByProbes"] is False
    page.body = summary("major_outage")  # a new outage: shed again, probes counted afresh
    await board.poll_now()
    assert board.shed_share("claude") == (1.0, "major_outage")


async def test_flapping_page_never_sheds(
    host: FakeStatusHost, make_board: Callable[..., StatusBoard]
) -> None:
    url, page = host.page(script=[summary("major_outage"), summary("operational")] * 6)
    board = make_board()
    board.configure([provider("claude", url, confirm=2)])
    for _ in range(12):
        await board.poll_now()
        assert board.shed_share("claude")[0] == 0.0
    assert page.requests == 12


async def test_partial_outage_sheds_the_configured_share_and_escalates(
    host: FakeStatusHost, make_board: Callable[..., StatusBoard]
) -> None:
    url, page = host.page(body=summary("partial_outage"))
    board = make_board()
    board.configure([provider("claude", url, confirm=1, recover=1, partial={"partial_outage": 0.5})])
    await board.poll_now()
    assert board.shed_share("claude") == (0.5, "partial_outage")
    page.body = summary("major_outage")
    await board.poll_now()
    assert board.shed_share("claude") == (1.0, "major_outage")
    page.body = summary("degraded_performance")
    await board.poll_now()
    assert board.shed_share("claude") == (0.0, "degraded_performance")
    assert board.levels() == {"claude": 1}


@pytest.mark.parametrize(
    ("status", "body", "content_type", "reason"),
    [
        (405, CHALLENGE, "text/html", "http"),
        (500, b"internal error", "text/plain", "http"),
        (429, b"slow down", "text/plain", "http"),
        (200, CHALLENGE, "text/html; charset=utf-8", "content_type"),
        (200, b'{"status": {"indicator": ', JSON, "invalid_json"),
        (200, b'{"status":"none"}', JSON, "shape"),
        (200, b'{"status":{"indicator":7}}', JSON, "shape"),
        (200, b" " * (MAX_BODY + 10), JSON, "too_large"),
    ],
)
async def test_garbage_answers_never_shed(
    host: FakeStatusHost,
    make_board: Callable[..., StatusBoard],
    status: int,
    body: bytes,
    content_type: str,
    reason: str,
) -> None:
    url, _ = host.page(body=body, status=status, content_type=content_type)
    board = make_board()
    board.configure([provider("claude", url, components=[], shed_on=["major", "critical"], confirm=1)])
    for _ in range(2):
        await board.poll_now()
        assert board.shed_share("claude")[0] == 0.0
    snap = board.snapshot()["claude"]
    assert snap["usable"] is False and snap["lastError"].startswith(reason), snap["lastError"]
    assert snap["lastGoodPoll"] is None and snap["lastPoll"] is not None
    assert board.error_counts() == {reason: 2}
    if status == 405:
        assert "Just a moment..." in snap["lastError"]


async def test_unusable_page_stops_a_shed_after_three_polls(
    host: FakeStatusHost, make_board: Callable[..., StatusBoard]
) -> None:
    url, page = host.page(body=summary("major_outage"))
    board = make_board()
    board.configure([provider("claude", url, confirm=1)])
    await board.poll_now()
    assert board.shed_share("claude") == (1.0, "major_outage")
    page.status, page.body, page.content_type = 405, CHALLENGE, "text/html"
    for _ in range(FAIL_OPEN_AFTER - 1):
        await board.poll_now()
        assert board.shed_share("claude") == (1.0, "major_outage")  # the last good reading still holds
    await board.poll_now()
    assert board.shed_share("claude") == (0.0, "unknown")
    assert board.levels() == {"claude": 3}  # the page's last readable word
    page.status, page.body, page.content_type = 200, summary("major_outage"), JSON
    await board.poll_now()
    assert board.shed_share("claude") == (1.0, "major_outage")  # confirmAfter 1: sheds again at once


async def test_unusable_polls_neither_confirm_nor_reset_a_streak(
    host: FakeStatusHost, make_board: Callable[..., StatusBoard]
) -> None:
    url, _ = host.page(script=[summary("major_outage"), b"oops", summary("major_outage")])
    board = make_board()
    board.configure([provider("claude", url, confirm=2)])
    await board.poll_now()
    await board.poll_now()
    assert board.shed_share("claude")[0] == 0.0
    assert board.snapshot()["claude"]["consecutive"] == {"shedding": 1, "clear": 0, "unusable": 1}
    await board.poll_now()
    assert board.shed_share("claude") == (1.0, "major_outage")


async def test_etag_304_keeps_the_reading_and_counts_as_a_poll(
    host: FakeStatusHost, make_board: Callable[..., StatusBoard]
) -> None:
    url, page = host.page(body=summary("major_outage"), etag='W/"v1"')
    board = make_board()
    board.configure([provider("claude", url, confirm=3)])
    for _ in range(3):
        await board.poll_now()
    assert (page.requests, page.not_modified) == (3, 2)
    assert "If-None-Match" not in page.seen[0] and page.seen[1]["If-None-Match"] == 'W/"v1"'
    assert board.shed_share("claude") == (1.0, "major_outage")
    snap = board.snapshot()["claude"]
    assert snap["usable"] is True and snap["reportedState"] == "major_outage"
    page.etag, page.body = 'W/"v2"', summary("operational")
    for _ in range(2):
        await board.poll_now()
    assert board.shed_share("claude") == (0.0, "operational")
    assert (page.requests, page.not_modified) == (5, 3)


async def test_last_modified_is_sent_back_as_if_modified_since(
    host: FakeStatusHost, make_board: Callable[..., StatusBoard]
) -> None:
    stamp = "Wed, 04 Sep 2026 12:03:36 GMT"
    url, page = host.page(last_modified=stamp)
    board = make_board()
    board.configure([provider("claude", url)])
    await board.poll_now()
    await board.poll_now()
    assert page.seen[1]["If-Modified-Since"] == stamp and page.not_modified == 1
    assert board.snapshot()["claude"]["usable"] is True


async def test_unusable_200_does_not_become_the_validated_reading(
    host: FakeStatusHost, make_board: Callable[..., StatusBoard]
) -> None:
    url, page = host.page(body=b"<html>", content_type="text/html", etag='"bad"')
    board = make_board()
    board.configure([provider("claude", url)])
    await board.poll_now()
    await board.poll_now()
    assert "If-None-Match" not in page.seen[1] and page.not_modified == 0


async def test_one_poller_serves_every_provider_sharing_a_page(
    host: FakeStatusHost, make_board: Callable[..., StatusBoard]
) -> None:
    url, page = host.page(body=summary("partial_outage"))
    board = make_board()
    board.configure(list(board_providers(url)))
    pollers = dict(board.pollers)
    board.configure(list(board_providers(url)))  # a reload with the same providers keeps the pollers
    assert board.pollers == pollers and len(pollers) == 2
    await board.poll_now()
    assert page.requests == 2  # one per distinct page (components differ for "nopage")
    assert board.shed_share("claude") == (0.25, "partial_outage")
    assert board.shed_share("claude-eu") == (1.0, "partial_outage")
    assert board.levels() == {"claude": 2, "claude-eu": 2, "nopage": 0}


def board_providers(url: str) -> Iterator[Provider]:
    yield provider("claude", url, confirm=1, partial={"partial_outage": 0.25})
    yield provider("claude-eu", url, confirm=1, shed_on=["partial_outage"])
    yield provider("nopage", url, components=["other"], confirm=1)


async def test_reconfigure_keeps_unchanged_state_and_stops_unreferenced_pollers(
    host: FakeStatusHost, make_board: Callable[..., StatusBoard]
) -> None:
    url, page = host.page(body=summary("major_outage"))
    other_url, other = host.page("/other.json")
    board = make_board(autostart=True)
    board.configure([provider("claude", url, confirm=2, interval="1h"), provider("gpt", other_url)])
    await eventually(lambda: page.requests == 1 and other.requests >= 1)
    old_poller = board.pollers[page_key_of(url)]
    board.configure([provider("claude", url, confirm=2, interval="1h")])  # gpt gone, claude unchanged
    assert board.pollers[page_key_of(url)] is old_poller and len(board.pollers) == 1
    await asyncio.sleep(0.15)
    gone = other.requests
    await board.poll_now()
    assert board.shed_share("claude") == (1.0, "major_outage")  # the first poll still counted
    await asyncio.sleep(0.15)
    assert other.requests == gone  # its poller stopped
    board.configure([provider("claude", url, confirm=3, interval="1h")])  # rules changed: fresh hysteresis
    assert board.shed_share("claude") == (0.0, None)
    assert board.pollers[page_key_of(url)] is old_poller  # but the page keeps its poller
    board.configure([])
    assert board.pollers == {} and board.snapshot() == {}


def page_key_of(url: str) -> str:
    status_page = provider("x", url).status_page
    assert status_page is not None
    return page_key(status_page)


async def test_hanging_status_page_never_blocks_shed_share(
    host: FakeStatusHost, make_board: Callable[..., StatusBoard]
) -> None:
    url, page = host.page(body=summary("major_outage"), hang=True)
    board = make_board(autostart=True, timeout=0.5)
    board.configure([provider("claude", url)])
    await asyncio.wait_for(page.requested.wait(), 2)
    started = time.perf_counter()
    for _ in range(1000):
        assert board.shed_share("claude") == (0.0, None)
    board.levels()
    board.snapshot()
    assert time.perf_counter() - started < 0.1
    assert board.pollers[page_key_of(url)].seq == 0  # the poll is still hanging
    await eventually(lambda: board.snapshot()["claude"]["lastError"] is not None, timeout=3)
    assert board.snapshot()["claude"]["lastError"].startswith("timeout")
    closing = time.perf_counter()
    await board.close()
    assert time.perf_counter() - closing < 1.0


async def test_background_polls_follow_the_interval_with_jitter(
    host: FakeStatusHost, make_board: Callable[..., StatusBoard]
) -> None:
    url, page = host.page()
    board = make_board(autostart=True)
    board.configure([provider("claude", url, interval="50ms")])
    started = time.monotonic()
    await eventually(lambda: page.requests >= 5)
    elapsed = time.monotonic() - started
    assert elapsed >= 4 * 0.045  # never faster than the interval minus jitter
    assert page.seen[0]["User-Agent"].startswith("llmroute/")


async def test_min_interval_is_a_floor_under_poll_interval(
    host: FakeStatusHost, make_board: Callable[..., StatusBoard]
) -> None:
    url, page = host.page()
    board = make_board(autostart=True, min_interval=10.0)
    board.configure([provider("claude", url, interval="50ms")])
    await eventually(lambda: page.requests >= 1)
    await asyncio.sleep(0.3)
    assert page.requests == 1


async def test_a_reload_that_shortens_the_interval_wakes_the_poller(
    host: FakeStatusHost, make_board: Callable[..., StatusBoard]
) -> None:
    url, page = host.page()
    board = make_board(autostart=True)
    board.configure([provider("claude", url, interval="1h")])
    await eventually(lambda: page.requests == 1)
    board.configure([provider("claude", url, interval="30ms")])
    await eventually(lambda: page.requests >= 3)


async def test_failing_page_backs_off(host: FakeStatusHost, make_board: Callable[..., StatusBoard]) -> None:
    url, page = host.page(status=503, body=b"down", content_type="text/plain")
    board = make_board(autostart=True)
    board.configure([provider("claude", url, interval="20ms")])
    await asyncio.sleep(0.5)
    # healthy polling would be ~25 requests; backoff (2, 4, 8 .. up to 16 intervals) allows far fewer
    assert 2 <= page.requests <= 12
    assert board.snapshot()["claude"]["usable"] is False


async def test_snapshot_describes_each_provider(
    host: FakeStatusHost, make_board: Callable[..., StatusBoard]
) -> None:
    incident = {"name": "Elevated errors", "status": "identified"}
    url, _ = host.page(body=summary("partial_outage", incidents=[incident]))
    board = make_board()
    watched = [API, "renamed"]
    board.configure([provider("claude", url, components=watched, confirm=1, partial={"partial_outage": 0.5})])
    await board.poll_now()
    snap = board.snapshot()["claude"]
    assert snap["page"] == url and snap["source"] == "direct"
    assert (snap["state"], snap["level"], snap["shedding"]) == ("partial_outage", 2, 0.5)
    assert snap["usable"] is True
    assert snap["missingComponents"] == ["renamed"] and snap["incidents"] == ["Elevated errors"]
    assert snap["lastPoll"].endswith("Z") and snap["lastPoll"] == snap["lastGoodPoll"]
    assert snap["consecutive"] == {"shedding": 1, "clear": 0, "unusable": 0}
    assert orjson.loads(orjson.dumps(board.snapshot()))  # JSON-ready


async def test_google_cloud_page_is_polled_with_its_own_parser(
    host: FakeStatusHost, make_board: Callable[..., StatusBoard]
) -> None:
    url, _ = host.page("/incidents.json", body=gcp("high"))
    board = make_board()
    board.configure(
        [provider("gemini", url, type_="google-cloud", components=["Vertex Gemini API"], confirm=1)]
    )
    await board.poll_now()
    assert board.shed_share("gemini") == (1.0, "major_outage")


# ----- the relay ------------------------------------------------------------------------------------------


@pytest.fixture
async def relay_server() -> AsyncIterator[Callable[[StatusBoard], Any]]:
    servers: list[TestServer] = []

    async def start(board: StatusBoard, port: int | None = None) -> TestServer:
        server = TestServer(build_relay_app(board), port=port) if port else TestServer(build_relay_app(board))
        await server.start_server()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


async def test_relay_serves_each_page_with_a_poll_counter(
    host: FakeStatusHost,
    make_board: Callable[..., StatusBoard],
    relay_server: Callable[..., Any],
    session: aiohttp.ClientSession,
) -> None:
    url, _ = host.page(body=summary("major_outage"))
    relay = make_board()
    relay.configure([provider("claude", url), provider("claude", url, components=[])])  # names may repeat
    server = await relay_server(relay)
    async with session.get(server.make_url(RELAY_PATH)) as response:
        assert response.status == 200 and response.headers["Cache-Control"] == "no-store"
        before = await response.read()
    assert {entry["seq"] for entry in orjson.loads(before)["pages"].values()} == {0}
    await relay.poll_now()
    await relay.poll_now()
    async with session.get(server.make_url(RELAY_PATH)) as response:
        document = orjson.loads(await response.read())
    entry = document["pages"][page_key_of(url)]
    assert (entry["seq"], entry["state"], entry["usable"], entry["level"]) == (2, "major_outage", True, 3)
    assert entry["url"] == url and entry["watched"] == [API] and entry["age"] >= 0
    decoded = decode_document(orjson.dumps(document))
    assert decoded[page_key_of(url)].reading == relay.pollers[page_key_of(url)].reading
    assert len(decoded) == 2
    assert relay_endpoint("http://relay:8090/") == "http://relay:8090/v1/statuspages"
    assert relay_endpoint("http://relay:8090/v1/statuspages") == "http://relay:8090/v1/statuspages"


async def test_sidecars_read_the_relay_and_never_the_page(
    host: FakeStatusHost, make_board: Callable[..., StatusBoard], relay_server: Callable[..., Any]
) -> None:
    url, page = host.page(body=summary("major_outage"))
    relay = make_board(autostart=True)
    relay.configure([provider("claude", url, interval="100ms")])
    server = await relay_server(relay)
    relay_url = str(server.make_url("/"))
    sidecars = [make_board(relay_url=relay_url, autostart=True) for _ in range(2)]
    for sidecar in sidecars:
        sidecar.configure([provider("claude", url, interval="100ms", confirm=2)])
    started = time.monotonic()
    await eventually(lambda: all(s.shed_share("claude") == (1.0, "major_outage") for s in sidecars))
    await asyncio.sleep(0.3)
    elapsed = time.monotonic() - started
    relay_poller = relay.pollers[page_key_of(url)]
    assert page.requests == relay_poller.requests  # every request to the page came from the relay
    assert page.requests <= elapsed / 0.09 + 2  # once per interval
    for sidecar in sidecars:
        poller = sidecar.pollers[page_key_of(url)]
        assert poller.requests == 0 and poller.source == "relay"
        assert sidecar.snapshot()["claude"]["source"] == "relay"
        assert sidecar.levels() == {"claude": 3}


async def test_sidecar_counts_each_relay_poll_once(
    host: FakeStatusHost, make_board: Callable[..., StatusBoard], relay_server: Callable[..., Any]
) -> None:
    url, page = host.page(body=summary("major_outage"))
    relay = make_board()  # polled by hand
    relay.configure([provider("claude", url, interval="1h")])
    server = await relay_server(relay)
    sidecar = make_board(relay_url=str(server.make_url("/")), autostart=True)
    sidecar.configure([provider("claude", url, interval="20ms", confirm=3)])
    poller = sidecar.pollers[page_key_of(url)]
    for polls in (1, 2):
        await relay.poll_now()
        await eventually(lambda n=polls: poller.seq == n)  # type: ignore[misc]
        await asyncio.sleep(0.1)  # several more relay reads, no new poll
        assert poller.seq == polls
        assert sidecar.snapshot()["claude"]["consecutive"]["shedding"] == polls
        assert sidecar.shed_share("claude")[0] == 0.0
    await relay.poll_now()
    await eventually(lambda: sidecar.shed_share("claude") == (1.0, "major_outage"))
    assert page.requests == 3 and poller.requests == 0


async def test_two_relay_replicas_behind_one_service_count_each_poll_once(
    host: FakeStatusHost, make_board: Callable[..., StatusBoard], relay_server: Callable[..., Any]
) -> None:
    """The relay runs as 2 replicas behind a Service: a sidecar reads either, alternately. Each replica's
    poll counts once towards `confirmAfter`, however often the sidecar switches between them."""
    url, _ = host.page(body=summary("major_outage"))
    replicas = [make_board(), make_board()]  # polled by hand
    for replica in replicas:
        replica.configure([provider("claude", url, interval="1h")])
    backends = [await relay_server(replica) for replica in replicas]
    turn = itertools.count()

    async def balance(request: web.Request) -> web.Response:
        backend = backends[next(turn) % 2]
        async with aiohttp.ClientSession() as session, session.get(backend.make_url(RELAY_PATH)) as response:
            return web.Response(body=await response.read(), content_type="application/json")

    app = web.Application()
    app.router.add_get(RELAY_PATH, balance)
    service = TestServer(app)
    await service.start_server()
    try:
        sidecar = make_board(relay_url=str(service.make_url("/")), autostart=True)
        sidecar.configure([provider("claude", url, interval="20ms", confirm=3)])
        consecutive = lambda: sidecar.snapshot()["claude"]["consecutive"]["shedding"]  # noqa: E731
        await replicas[0].poll_now()
        await eventually(lambda: consecutive() == 1)
        await replicas[1].poll_now()
        await eventually(lambda: consecutive() == 2)
        await asyncio.sleep(0.3)  # a dozen reads, alternating between the replicas: no new poll
        assert consecutive() == 2 and sidecar.shed_share("claude")[0] == 0.0
        await replicas[0].poll_now()
        await eventually(lambda: sidecar.shed_share("claude") == (1.0, "major_outage"))
    finally:
        await service.close()


async def test_sidecar_polls_directly_while_the_relay_is_down_and_returns_to_it(
    host: FakeStatusHost,
    make_board: Callable[..., StatusBoard],
    relay_server: Callable[..., Any],
) -> None:
    url, page = host.page(body=summary("major_outage"))
    relay = make_board()
    relay.configure([provider("claude", url)])
    server = await relay_server(relay)
    port, relay_url = server.port, str(server.make_url("/"))
    await server.close()  # nothing listens there now
    sidecar = make_board(relay_url=relay_url, autostart=True)
    sidecar.configure([provider("claude", url, interval="30ms", confirm=2)])
    poller = sidecar.pollers[page_key_of(url)]
    await eventually(lambda: sidecar.shed_share("claude") == (1.0, "major_outage"))
    assert poller.source == "direct" and poller.requests >= 2 and page.requests == poller.requests
    snap = sidecar.snapshot()["claude"]
    assert snap["source"] == "direct" and snap["relayError"]
    # the relay comes back on the same address: the sidecar goes back to it
    await relay.poll_now()
    await relay_server(relay, port)
    await eventually(lambda: poller.source == "relay")
    direct = poller.requests
    await asyncio.sleep(0.2)
    assert poller.requests == direct
    assert sidecar.shed_share("claude") == (1.0, "major_outage")


@pytest.mark.parametrize("answer", ["html", "no-page"])
async def test_garbage_from_the_relay_falls_back_to_the_page(
    host: FakeStatusHost, make_board: Callable[..., StatusBoard], answer: str
) -> None:
    url, page = host.page(body=summary("operational"))
    if answer == "html":
        relay_url, relay_page = host.page("/v1/statuspages", body=CHALLENGE, content_type="text/html")
    else:  # a relay that does not (yet) poll this sidecar's page
        relay_url, relay_page = host.page("/v1/statuspages", body=b'{"relay": {}, "pages": {}}')
    sidecar = make_board(relay_url=relay_url, autostart=True)
    sidecar.configure([provider("claude", url, interval="30ms")])
    poller = sidecar.pollers[page_key_of(url)]
    await eventually(lambda: poller.source == "direct" and page.requests >= 1)
    assert relay_page.requests >= 2  # two tries before falling back
    assert sidecar.snapshot()["claude"]["usable"] is True
