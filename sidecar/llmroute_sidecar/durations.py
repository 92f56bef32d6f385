"""Durations and retry hints, parsed once, in one place.

Policies use Go-style durations (`250ms`, `8s`, `1m30s`); providers send `retry-after` as seconds,
floats or HTTP dates, `retry-after-ms` as milliseconds, OpenAI reset headers as `6m0s` and Gemini
protobuf Durations as `"0.29s"`. Everything becomes float seconds. Absolute dates are turned into a
relative wait against the wall clock and clamped (clock skew: HOSTILE.md E1).
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Mapping
from datetime import UTC

_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
DURATION_PATTERN = r"^([0-9]+(\.[0-9]*)?(ns|us|µs|ms|s|m|h))+$|^0$"


def parse_duration(text: str) -> float:
    """Parse a Go-style duration (`1m30s`, `250ms`, `0.29s`, `0`) into seconds; ValueError otherwise."""
    value = text.strip()
    if value == "0":
        return 0.0
    pos, total = 0, 0.0
    for match in _PART.finditer(value):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(value) or not value:
        raise ValueError(f'invalid duration "{text}" (use Go-style durations such as 250ms, 8s, 1m)')
    return total


def format_duration(seconds: float) -> str:
    """The shortest Go-style spelling of `seconds` that parses back to the same value."""
    if seconds == 0:
        return "0s"
    millis = round(seconds * 1000)
    if abs(millis - seconds * 1000) < 1e-6:
        if millis % 60_000 == 0:
            return f"{millis // 60_000}m"
        if millis % 1000 == 0:
            return f"{millis // 1000}s"
        return f"{millis}ms"
    return f"{seconds:g}s"


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """How long the server asked us to wait, like the official SDKs read it (HOSTILE.md U12).

    `retry-after-ms` first, then `retry-after` as (float) seconds, then as an HTTP date. Negative,
    non-finite (`inf`, `nan`, `1e400`) or unparseable values are ignored (None): a 429 then counts as
    one without a hint. A date is turned into a wait against the wall clock (`now`, default
    `time.time()`) and clamped at 0 (clock skew, E1); a date without a zone is read as UTC, as HTTP
    dates are. The caller caps the result at its own deadline.
    """
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        seconds = _seconds(raw_ms, scale=1000.0)
        if seconds is not None:
            return seconds
    raw = headers.get("retry-after")
    if raw is None:
        return None
    seconds = _seconds(raw)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(raw.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    wall = time.time() if now is None else now
    return max(0.0, when.timestamp() - wall)


def _seconds(raw: str, scale: float = 1.0) -> float | None:
    """A finite, non-negative number of (`scale`ths of) seconds, else None."""
    try:
        value = float(raw) / scale
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None
