"""One parser each for durations, retry hints and server-sent events (HOSTILE U8, U12, U13, E1).

Pure unit tests: the end-to-end behaviour through the sidecar is in test_hostile.py.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterator

import pytest
from multidict import CIMultiDict

from llmroute_sidecar.durations import format_duration, parse_duration, retry_after
from llmroute_sidecar.errors import RetryableError
from llmroute_sidecar.sse import SseEvent, SseParser, frame

NOW = 1_800_000_000.0  # a fixed wall clock for HTTP dates


def http_date(offset: float) -> str:
    return email.utils.formatdate(NOW + offset, usegmt=True)


# ----- U12: retry-after like the SDKs read it -------------------------------------------------------------
@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "1.5"}, 1.5),  # a float
        ({"retry-after": " 2 "}, 2.0),
        ({"retry-after": "0"}, 0.0),
        ({"retry-after": "3600"}, 3600.0),  # huge: returned as is, the engine caps it at its deadline
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # milliseconds first, like the SDKs
        ({"retry-after-ms": "-5", "retry-after": "9"}, 9.0),  # a negative ms hint is ignored
        ({"retry-after-ms": "soon", "retry-after": "9"}, 9.0),
        ({"retry-after": "-1"}, None),  # negative: no hint (a 429 then fails over at once)
        ({"retry-after": "inf"}, None),  # non-finite: no hint, never an overflow later
        ({"retry-after": "1e400"}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after-ms": "inf"}, None),
        ({"retry-after": "soon"}, None),
        ({"retry-after": ""}, None),
        ({}, None),
    ],
)
def test_retry_after_numbers(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after(headers, now=NOW) == expected


@pytest.fixture
def far_from_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A local zone far from UTC (a naive date read as local time would be off by hours)."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_retry_after_http_dates_are_relative_to_the_wall_clock_and_clamped(far_from_utc: None) -> None:
    assert retry_after({"retry-after": http_date(30)}, now=NOW) == pytest.approx(30.0)
    assert retry_after({"retry-after": http_date(-120)}, now=NOW) == 0.0  # in the past (clock skew): now
    assert retry_after({"retry-after": http_date(3600)}, now=NOW) == pytest.approx(3600.0)
    # A date without a zone (or "-0000") is UTC, as HTTP dates are, whatever the local zone.
    bare = http_date(45).removesuffix(" GMT")
    assert retry_after({"retry-after": bare}, now=NOW) == pytest.approx(45.0)
    assert retry_after({"retry-after": bare + " -0000"}, now=NOW) == pytest.approx(45.0)
    assert retry_after({"retry-after": "Sunday, 06-Nov-94 08:49:37 GMT"}, now=NOW) == 0.0  # RFC 850 form


def test_retry_after_header_names_are_case_insensitive_as_aiohttp_delivers_them() -> None:
    headers = CIMultiDict({"Retry-After": "4", "Retry-After-Ms": "1500"})
    assert retry_after(headers) == 1.5


# ----- U13: one duration parser for policies, OpenAI reset headers and Gemini protobuf Durations ----------
@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("6m0s", 360.0),  # OpenAI x-ratelimit-reset-requests
        ("12ms", 0.012),  # OpenAI
        ("58s", 58.0),  # Gemini RetryInfo.retryDelay
        ("0.29s", 0.29),
        ("156h14m36.75s", 156 * 3600 + 14 * 60 + 36.75),
        ("1m30s", 90.0),
        ("250ms", 0.25),
        ("1.5h", 5400.0),
        ("500us", 0.0005),
        ("10µs", 0.00001),
        ("100ns", 1e-7),
        (".5s", 0.5),
        ("0", 0.0),
        (" 8s ", 8.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "-1s", "1d", "s", "1s2", "1 s", "+5s", "1e3s", "ms", "5S"])
def test_parse_duration_refuses_what_go_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize("seconds", [0.0, 0.25, 1.0, 8.0, 60.0, 90.0, 120.0, 0.0001, 3600.0])
def test_format_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


# ----- U8: server-sent events per WHATWG ----------------------------------------------------------------
def parse_all(data: bytes, sizes: int | None = None) -> list[SseEvent]:
    """Feed `data` whole, or `sizes` bytes at a time (every split must give the same events)."""
    parser = SseParser()
    if sizes is None:
        return parser.feed(data)
    events: list[SseEvent] = []
    for start in range(0, len(data), sizes):
        events += parser.feed(data[start : start + sizes])
    return events


HOSTILE_STREAM = (
    b"\xef\xbb\xbf: keepalive comment\r\n"  # a BOM, then a comment
    b"event: one\r\ndata:no-space\r\n\r\n"  # CRLF, `data:` without its space
    b"event: two\rdata: cr only\r\r"  # CR-only line ends
    b"data: line 1\ndata: line 2\nid: 7\nretry: 100\nunknown: x\ngarbage line without colon\n\n"
    b"event: three\ndata:  two spaces\n\n"  # only one leading space is stripped
    b"data\n\n"  # a field without a colon: empty data
    b"\n\n: comment only\n\n"  # blank lines without data dispatch nothing
    b"event: four\ndata: a\nevent: five\ndata: b\n\n"  # no blank line between: one event, the last type
    b"event: last\ndata: dropped without its blank line\n"
)
EXPECTED = [
    SseEvent("one", "no-space"),
    SseEvent("two", "cr only"),
    SseEvent("message", "line 1\nline 2"),
    SseEvent("three", " two spaces"),
    SseEvent("message", ""),
    SseEvent("five", "a\nb"),
]


@pytest.mark.parametrize("sizes", [None, 1, 2, 3, 5, 7, 64])
def test_parser_follows_whatwg_however_the_bytes_are_split(sizes: int | None) -> None:
    assert parse_all(HOSTILE_STREAM, sizes) == EXPECTED


def test_a_bom_only_counts_at_the_start_of_the_stream() -> None:
    # Mid-stream, the BOM is part of the field name ("\ufeffdata"): an unknown field, ignored.
    assert parse_all(b"data: x\n\n\xef\xbb\xbfdata: y\n\n") == [SseEvent("message", "x")]
    assert parse_all(b"\xef\xbb\xbfdata: x\n\n", 1) == [SseEvent("message", "x")]


def test_utf8_split_inside_a_character_survives() -> None:
    data = "data: héllo wörld ✓\n\n".encode()
    assert parse_all(data, 1) == [SseEvent("message", "héllo wörld ✓")]


def test_an_oversized_line_or_event_is_an_upstream_fault_not_unbounded_memory() -> None:
    parser = SseParser(max_event_bytes=1000)
    with pytest.raises(RetryableError, match="oversized"):
        for _ in range(20):
            parser.feed(b"data: " + b"x" * 100)  # one line that never ends
    parser = SseParser(max_event_bytes=1000)
    with pytest.raises(RetryableError, match="oversized"):
        for _ in range(20):
            parser.feed(b"data: " + b"x" * 100 + b"\n")  # one event that never ends
    parser = SseParser(max_event_bytes=1000)
    for _ in range(100):  # comments and complete events do not accumulate
        assert parser.feed(b": ping\n" + b"data: " + b"x" * 100 + b"\n\n") == [SseEvent("message", "x" * 100)]


@pytest.mark.parametrize("data", ["single line", "line 1\nline 2\n\nline 4", "", "trailing\n"])
@pytest.mark.parametrize("event", [None, "content_block_delta"])
def test_frame_round_trips_multi_line_data(data: str, event: str | None) -> None:
    """A relayed event with multi-line data goes back out as several `data:` lines, not as one line whose
    LF would end the field (what a downstream parser would then read is garbage)."""
    assert SseParser().feed(frame(event, data)) == [SseEvent(event or "message", data)]


def test_frame_keeps_single_line_data_byte_for_byte() -> None:
    assert frame(None, b'{"a": 1}') == b'data: {"a": 1}\n\n'
    assert frame("ping", '{"type": "ping"}') == b'event: ping\ndata: {"type": "ping"}\n\n'
