"""Provider status pages, read in the background and turned into a shed share the engine asks in O(1).

Why this exists: when a provider declares an outage on its status page, retrying it burns the route's
budget for nothing; shedding to the fallback straight away is cheaper. But status pages are advisory,
slow, sometimes wrong and sometimes hostile (HOSTILE.md 5.3), so everything here is **fail-open**: a page
we cannot read never sheds traffic, and the request path never waits for, or fails because of, a poll.

Three layers, pure to stateful:

1. **Parsing** (`parse_statuspage`, `parse_google_cloud`): bytes in, a `Reading` out, no I/O. Atlassian
   `summary.json`, incident.io's compatible `summary.json`, incident.io's widget proxy shape
   (`{"summary": {"structure": …, "affected_components": …}}`) and Google Cloud's `incidents.json`.
   Anything unexpected (HTML, WAF challenge, wrong content type, bad JSON, unknown shape or enum value,
   more than `MAX_BODY` bytes) gives `usable=False` with a `reason: detail` error, never "operational".
2. **Polling** (`StatusPagePoller`): one per distinct page (`page_key`), on its own task; jittered interval,
   conditional GETs (ETag / Last-Modified; a 304 repeats the last good reading), exponential backoff with
   jitter on failures, last good reading kept. In a cluster it reads the operator's relay instead
   (`statusrelay.py`) and falls back to the page itself when the relay fails twice in a row.
3. **Deciding** (`StatusBoard`): per provider hysteresis (`confirmAfter` / `recoverAfter`) over the readings
   of its page, precomputed on every poll so `shed_share()` is a dict lookup.

State vocabulary. With components watched, a reading's state is the worst watched component status, in
the order `operational < under_maintenance < degraded_performance < partial_outage < major_outage`
(incident.io's `full_outage` is read as `major_outage`). Unresolved incidents that name a watched component
(in their `components` list, by id or name) count too, their impact mapped `none -> operational`,
`minor -> degraded_performance`, `major -> partial_outage`, `critical -> major_outage`; an incident in
`monitoring` does not (its fix is deployed; the component status is the live signal). A watched component
absent from the page (renamed or removed, S9) is reported in `missing_components` and estimated from the
page indicator with the same mapping. With no components watched, the state is the page indicator
(`none | minor | major | critical | maintenance`). Levels for `llmroute_statuspage_indicator`:
none/operational 0, minor/degraded_performance/maintenance 1, major/partial_outage 2,
critical/major_outage 3.

Google Cloud (`incidents.json`, a flat array of recent incidents): active = no `end`; an incident matches
when a watched name equals (case-insensitively) one of its `affected_products` titles or ids or its
`service_name`; severity `high -> major_outage`, `medium -> partial_outage`, `low -> degraded_performance`
(without `severity`: `status_impact` `SERVICE_OUTAGE / SERVICE_DISRUPTION / SERVICE_INFORMATION`, same
order). A product without incidents is operational, so renamed products cannot be detected there. With no
products named, any active GCP incident counts, as indicator `critical / major / minor`.

Hysteresis (S8), per provider: a reading *sheds* when its state is in `shedOn` (share 1.0) or in
`partialShed` (that share). Shedding starts after `confirmAfter` consecutive usable shedding readings and
stops after `recoverAfter` consecutive usable non-shedding ones; while shedding, the share follows the
latest shedding reading (partial -> major escalates at once). A 304 is a usable reading (the page is
unchanged). Unusable readings are *no information*: they neither count towards nor reset either streak,
but after `FAIL_OPEN_AFTER` consecutive unusable readings any shed is dropped and the streaks reset
(fail open: a dead page must not keep a shed forever).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import aiohttp
import orjson

from . import __version__
from .durations import retry_after
from .policy import Provider, StatusPage

log = logging.getLogger(__name__)

COMPONENT_STATES = (
    "operational", "under_maintenance", "degraded_performance", "partial_outage", "major_outage",
)  # fmt: skip
"""Component statuses, least to most severe (the order `worst` uses)."""
INDICATORS = ("none", "minor", "major", "critical", "maintenance")
"""Page-level indicators (Atlassian `status.indicator`)."""
UNKNOWN = "unknown"
"""The state of an unusable reading: we do not know, so we do not shed."""

MAX_BODY = 4 * 1024 * 1024
"""Largest status document read (S6): GCP's incidents.json is ~100 KB, a hostile body can be anything."""
FAIL_OPEN_AFTER = 3
"""Consecutive unusable polls after which a provider stops shedding (fail open)."""
RELAY_FALLBACK_AFTER = 2
"""Consecutive failed relay reads after which a sidecar polls the page itself."""
RELAY_READ_INTERVAL = 5.0
"""A sidecar reads the relay every min(this, pollInterval)."""
DEFAULT_MIN_INTERVAL = 10.0
"""Floor under `pollInterval` (Claude's status CDN caches for 10 s; polling faster only reads the cache)."""
DEFAULT_TIMEOUT = 5.0
MAX_BACKOFF = 300.0
MAX_LISTED = 20
"""At most this many incident names per reading, each at most `MAX_NAME` characters (hostile input)."""
MAX_NAME = 200
USER_AGENT = f"llmroute/{__version__} (status-page poller; +https://llmroute.dev)"

_LEVELS = {
    "none": 0, "operational": 0,
    "minor": 1, "degraded_performance": 1, "maintenance": 1, "under_maintenance": 1,
    "major": 2, "partial_outage": 2,
    "critical": 3, "major_outage": 3,
    UNKNOWN: 0,
}  # fmt: skip
_RANK = {state: rank for rank, state in enumerate(COMPONENT_STATES)}
_STATUS_ALIASES = {"full_outage": "major_outage"}
"""Spellings of known states by other vendors: incident.io's widget API says `full_outage`."""
_IMPACT_TO_STATE = {
    "none": "operational",
    "minor": "degraded_performance",
    "major": "partial_outage",
    "critical": "major_outage",
    "maintenance": "under_maintenance",
    **{state: state for state in COMPONENT_STATES},
    **_STATUS_ALIASES,
}
_STATE_TO_INDICATOR = {
    "operational": "none",
    "under_maintenance": "maintenance",
    "degraded_performance": "minor",
    "partial_outage": "major",
    "major_outage": "critical",
}
_GCP_SEVERITY = {"high": "major_outage", "medium": "partial_outage", "low": "degraded_performance"}
_GCP_IMPACT = {
    "SERVICE_OUTAGE": "major_outage",
    "SERVICE_DISRUPTION": "partial_outage",
    "SERVICE_INFORMATION": "degraded_performance",
}
_RESOLVED = frozenset({"resolved", "postmortem", "completed"})
_NOT_SHEDDING_INCIDENT = frozenset({"monitoring"})
_JSON_LIKE = frozenset({"text/plain", "application/octet-stream"})
_TITLE = re.compile(rb"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)

Source = Literal["direct", "relay"]


# ----- readings ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """What one poll of one status page said, normalised. Immutable; shared by every provider on the page."""

    state: str
    """Worst watched component status, or the page indicator when no component is watched; `unknown`."""
    level: int
    """0 none .. 3 critical, for the metric `llmroute_statuspage_indicator`."""
    usable: bool
    """False: the page could not be read or understood; the reading must not shed anything."""
    error: str | None = None
    """`reason: detail` when unusable (reason is a short label: `http`, `timeout`, `content_type`, …)."""
    missing_components: list[str] = field(default_factory=list)
    """Watched components the page does not list (S9): estimated from the page indicator instead."""
    incidents: list[str] = field(default_factory=list)
    """Names of active incidents (statuspage: all of the page's; google-cloud: the matching ones)."""
    components: dict[str, str] = field(default_factory=dict)
    """Watched component (as written in the policy) -> the status found for it."""

    @property
    def reason(self) -> str | None:
        """The error's label (for `status_fetch_errors{reason}`), None when usable."""
        return None if self.error is None else self.error.split(":", 1)[0]

    @classmethod
    def failed(cls, reason: str, detail: str) -> Reading:
        return cls(state=UNKNOWN, level=0, usable=False, error=f"{reason}: {detail}")

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "level": self.level,
            "usable": self.usable,
            "error": self.error,
            "missingComponents": list(self.missing_components),
            "incidents": list(self.incidents),
            "components": dict(self.components),
        }

    @classmethod
    def from_json(cls, data: Any) -> Reading:
        """The inverse of `to_json`, for readings that crossed the network (the relay); ValueError if odd."""
        if not isinstance(data, dict):
            raise ValueError("reading is not an object")
        state, level = data.get("state"), data.get("level")
        usable, error = data.get("usable"), data.get("error")
        if state not in _LEVELS:
            raise ValueError(f"unknown state {_short(state)}")
        if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level <= 3:
            raise ValueError("level is not 0..3")
        if not isinstance(usable, bool) or (error is not None and not isinstance(error, str)):
            raise ValueError("usable/error have the wrong type")
        if usable and state == UNKNOWN:
            raise ValueError("a usable reading with state unknown")
        missing, incidents = data.get("missingComponents", []), data.get("incidents", [])
        components = data.get("components", {})
        if not (_str_list(missing) and _str_list(incidents) and isinstance(components, dict)):
            raise ValueError("lists have the wrong type")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in components.items()):
            raise ValueError("components has the wrong type")
        return cls(
            state=state,
            level=level,
            usable=usable,
            error=error[: MAX_NAME * 2] if error else error,
            missing_components=missing[:32],
            incidents=[name[:MAX_NAME] for name in incidents[:MAX_LISTED]],
            components=dict(list(components.items())[:32]),
        )


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_noted: set[tuple[str, str]] = set()


def _note_unknown(kind: str, value: str) -> None:
    """Log an unknown enum value once per (kind, value); bounded, since the values come from the wire."""
    key = (kind, value[:64])
    if key not in _noted and len(_noted) < 256:
        _noted.add(key)
        log.warning(
            "status page: unknown %s %r; treated as unknown (the page is unusable if it matters)",
            kind,
            key[1],
        )


# ----- parsing ------------------------------------------------------------------------------------------


class _Unusable(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class _Component:
    id: str | None
    name: str | None
    status: str | None
    """Normalised status; None: missing or not a string; UNKNOWN: a string we do not know (see `raw`)."""
    raw: Any


@dataclass
class _Incident:
    name: str
    status: str
    impact: str | None
    raw_impact: Any
    ids: set[str]
    names: set[str]


@dataclass
class _Page:
    indicator: str | None
    """None: the document has no page indicator; UNKNOWN: an indicator we do not know."""
    raw_indicator: Any
    components: list[_Component]
    incidents: list[_Incident]


def _precheck(body: bytes, content_type: str | None, opener: bytes) -> Any:
    """Size, content type and first byte (S1, S6), then the JSON document; raises _Unusable.

    Accepted content types: any `…json…`, `text/plain`, `application/octet-stream` or none at all (some
    CDNs mislabel); `text/html` and the rest are refused even when the body would parse. A UTF-8 BOM and
    leading whitespace are tolerated; the first byte must then open the expected document.
    """
    if len(body) > MAX_BODY:
        raise _Unusable("too_large", f"body of {len(body)} bytes exceeds {MAX_BODY}")
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    if mime and "json" not in mime and mime not in _JSON_LIKE:
        title = _TITLE.search(body[:8192])
        hint = f" ({_clean(title.group(1))})" if title else ""
        raise _Unusable("content_type", f"{mime}{hint}")
    text = body.removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
    if not text:
        raise _Unusable("not_json", "empty body")
    if text[:1] != opener:
        title = _TITLE.search(text[:8192])
        hint = f" ({_clean(title.group(1))})" if title else ""
        raise _Unusable("not_json", f"starts with {text[:1]!r}, expected {opener!r}{hint}")
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise _Unusable("invalid_json", str(exc)[:120]) from None


def _clean(raw: bytes) -> str:
    return " ".join(raw.decode("utf-8", "replace").split())[:80]


def _list(value: Any, path: str) -> list[Any]:
    """An optional array (S4): missing or null is empty; anything else but a list is a shape error."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Unusable("shape", f"{path} is not an array")
    return value


def _obj(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Unusable("shape", f"{path} is not an object")
    return value


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _component_status(raw: Any) -> str | None:
    if not isinstance(raw, str):
        return None
    status = _STATUS_ALIASES.get(raw, raw)
    if status not in _RANK:
        _note_unknown("component status", raw)
        return UNKNOWN
    return status


def _impact(raw: Any) -> str | None:
    if raw is None:
        return None
    if isinstance(raw, str) and raw in _IMPACT_TO_STATE:
        return _IMPACT_TO_STATE[raw]
    _note_unknown("incident impact", str(raw))
    return UNKNOWN


def _incident_refs(entries: list[Any]) -> tuple[set[str], set[str]]:
    ids: set[str] = set()
    names: set[str] = set()
    for entry in entries:
        if isinstance(entry, str):
            ids.add(entry)
            names.add(entry.casefold())
        elif isinstance(entry, dict):
            for key in ("id", "component_id"):
                if isinstance(entry.get(key), str):
                    ids.add(entry[key])
            if isinstance(entry.get("name"), str):
                names.add(entry["name"].casefold())
    return ids, names


def _atlassian(doc: dict[str, Any]) -> _Page:
    """Atlassian `summary.json` / `status.json`, and incident.io's compatible `summary.json`."""
    indicator: str | None = None
    raw_indicator: Any = None
    if "status" in doc:
        status = doc["status"]
        if not isinstance(status, dict):
            raise _Unusable("shape", f"status is {type(status).__name__}, expected an object")
        raw_indicator = status.get("indicator")
        if not isinstance(raw_indicator, str):
            raise _Unusable("shape", f"status.indicator is {_short(raw_indicator)}, expected a string")
        indicator = raw_indicator
        if indicator not in INDICATORS:
            _note_unknown("page indicator", indicator)
            indicator = UNKNOWN
    components = []
    for i, item in enumerate(_list(doc.get("components"), "components")):
        c = _obj(item, f"components[{i}]")
        components.append(_Component(
            id=_opt_str(c.get("id")), name=_opt_str(c.get("name")),
            status=_component_status(c.get("status")), raw=c.get("status"),
        ))  # fmt: skip
    incidents = []
    for i, item in enumerate(_list(doc.get("incidents"), "incidents")):
        inc = _obj(item, f"incidents[{i}]")
        ids, names = _incident_refs(_list(inc.get("components"), f"incidents[{i}].components"))
        incidents.append(_Incident(
            name=str(inc.get("name") or inc.get("id") or "(unnamed incident)")[:MAX_NAME],
            status=str(inc.get("status") or ""),
            impact=_impact(inc.get("impact")), raw_impact=inc.get("impact"), ids=ids, names=names,
        ))  # fmt: skip
    return _Page(indicator, raw_indicator, components, incidents)


def _incidentio_widget(summary: dict[str, Any]) -> _Page:
    """incident.io's widget proxy: a component tree plus the statuses of affected components only.

    Hidden components, and components of hidden groups, are left out as the public page leaves them out
    (watching one reports it missing). A group is also a component, with the worst status of its members.
    """
    structure = _obj(summary.get("structure") or {}, "summary.structure")
    affected: dict[str, Any] = {}
    for i, item in enumerate(_list(summary.get("affected_components"), "summary.affected_components")):
        entry = _obj(item, f"summary.affected_components[{i}]")
        if isinstance(entry.get("component_id"), str):
            affected[entry["component_id"]] = entry.get("status")

    def component(raw: Any, path: str) -> _Component | None:
        c = _obj(raw, path)
        if c.get("hidden") is True:
            return None
        cid = _opt_str(c.get("component_id")) or _opt_str(c.get("id"))
        status = affected.get(cid, "operational") if cid else "operational"
        return _Component(id=cid, name=_opt_str(c.get("name")), status=_component_status(status), raw=status)

    components: list[_Component] = []
    for i, raw_item in enumerate(_list(structure.get("items"), "summary.structure.items")):
        item = _obj(raw_item, f"summary.structure.items[{i}]")
        if "group" in item:
            group = _obj(item["group"], f"summary.structure.items[{i}].group")
            if group.get("hidden") is True:
                continue
            members = [
                member
                for j, raw in enumerate(_list(group.get("components"), f"summary.structure.items[{i}].group"))
                if (member := component(raw, f"summary.structure.items[{i}].group.components[{j}]"))
            ]
            components.extend(members)
            statuses = [m.status for m in members if m.status in _RANK]
            worst = max(statuses, key=_RANK.__getitem__, default="operational")
            group_id, group_name = _opt_str(group.get("id")), _opt_str(group.get("name"))
            components.append(_Component(group_id, group_name, worst, worst))
        elif "component" in item:
            member = component(item["component"], f"summary.structure.items[{i}].component")
            if member:
                components.append(member)
    incidents = []
    for i, raw_inc in enumerate(_list(summary.get("ongoing_incidents"), "summary.ongoing_incidents")):
        inc = _obj(raw_inc, f"summary.ongoing_incidents[{i}]")
        ids, names = _incident_refs(_list(inc.get("affected_components"), f"ongoing_incidents[{i}]"))
        raw_impact = inc.get("current_worst_impact", inc.get("impact"))
        incidents.append(_Incident(
            name=str(inc.get("name") or inc.get("id") or "(unnamed incident)")[:MAX_NAME],
            status=str(inc.get("status") or ""),
            impact=_impact(raw_impact), raw_impact=raw_impact, ids=ids, names=names,
        ))  # fmt: skip
    visible = [c.status for c in components if c.status in _RANK]
    worst = max(visible, key=_RANK.__getitem__, default="operational")
    return _Page(_STATE_TO_INDICATOR[worst], None, components, incidents)


def _worse(a: str, b: str) -> str:
    return a if _RANK[a] >= _RANK[b] else b


def _evaluate(page: _Page, watched: Sequence[str]) -> Reading:
    active = [inc for inc in page.incidents if inc.status not in _RESOLVED]
    listed = [inc.name for inc in active][:MAX_LISTED]

    def indicator() -> str:
        if page.indicator is None:
            raise _Unusable("shape", "no status.indicator")
        if page.indicator == UNKNOWN:
            raise _Unusable("unknown_value", f"page indicator {_short(page.raw_indicator)}")
        return page.indicator

    if not watched:
        state = indicator()
        return Reading(state=state, level=_LEVELS[state], usable=True, incidents=listed)

    by_id: dict[str, list[_Component]] = {}
    by_name: dict[str, list[_Component]] = {}
    for comp in page.components:
        if comp.id:
            by_id.setdefault(comp.id, []).append(comp)
        if comp.name:
            by_name.setdefault(comp.name.casefold(), []).append(comp)
    worst = "operational"
    found: dict[str, str] = {}
    missing: list[str] = []
    for name in watched:
        matches = by_id.get(name) or by_name.get(name.casefold())
        if not matches:
            missing.append(name)
            continue
        own = "operational"
        for comp in matches:
            if comp.status is None:
                raise _Unusable("shape", f"component {name!r} has status {_short(comp.raw)}")
            if comp.status == UNKNOWN:
                raise _Unusable("unknown_value", f"component {name!r} status {_short(comp.raw)}")
            own = _worse(own, comp.status)
        found[name] = own
        worst = _worse(worst, own)
    for inc in active:
        if inc.status in _NOT_SHEDDING_INCIDENT or inc.impact is None:
            continue
        if any(w in inc.ids or w.casefold() in inc.names for w in watched):
            if inc.impact == UNKNOWN:
                raise _Unusable("unknown_value", f"incident {inc.name!r} impact {_short(inc.raw_impact)}")
            worst = _worse(worst, inc.impact)
    if missing:
        worst = _worse(worst, _IMPACT_TO_STATE[indicator()])
    return Reading(
        state=worst, level=_LEVELS[worst], usable=True,
        missing_components=missing, incidents=listed, components=found,
    )  # fmt: skip


def parse_statuspage(body: bytes, content_type: str | None, components: Sequence[str]) -> Reading:
    """Read an Atlassian `summary.json` (or incident.io's compatible one, or its widget proxy shape).

    `components` are watched component ids or names (names case-insensitively, groups included); empty:
    the page indicator. Never raises: garbage gives `usable=False` with the reason.
    """
    try:
        doc = _obj(_precheck(body, content_type, b"{"), "document")
        if "status" not in doc and isinstance(doc.get("summary"), dict):
            page = _incidentio_widget(doc["summary"])
        elif "status" not in doc and "components" not in doc:
            raise _Unusable("shape", "neither status nor components")
        else:
            page = _atlassian(doc)
        return _evaluate(page, components)
    except _Unusable as exc:
        return Reading.failed(exc.reason, exc.detail)
    except RecursionError:
        return Reading.failed("invalid_json", "nested too deeply")


def parse_google_cloud(body: bytes, content_type: str | None, products: Sequence[str]) -> Reading:
    """Read `status.cloud.google.com/incidents.json`: active incidents of the watched products.

    `products` are product names or ids (`Vertex Gemini API`), compared case-insensitively; empty: any
    active incident, as a page indicator. Never raises.
    """
    try:
        doc = _precheck(body, content_type, b"[")
        if not isinstance(doc, list):
            raise _Unusable("shape", "expected an array of incidents")
        watched = {p.casefold() for p in products}
        worst = "operational"
        names: list[str] = []
        for i, item in enumerate(doc):
            inc = _obj(item, f"[{i}]")
            end = inc.get("end")
            if end is not None and not isinstance(end, str):
                raise _Unusable("shape", f"[{i}].end is {_short(end)}")
            if end:
                continue
            if watched:
                keys = {inc.get("service_name"), inc.get("service_key")}
                for j, product in enumerate(_list(inc.get("affected_products"), f"[{i}].affected_products")):
                    entry = _obj(product, f"[{i}].affected_products[{j}]")
                    keys.update((entry.get("title"), entry.get("id")))
                if not any(isinstance(k, str) and k.casefold() in watched for k in keys):
                    continue
            severity, impact = inc.get("severity"), inc.get("status_impact")
            raw = severity if severity is not None else impact
            table = _GCP_SEVERITY if severity is not None else _GCP_IMPACT
            state = table.get(raw) if isinstance(raw, str) else None
            if state is None:
                _note_unknown("google-cloud severity", str(raw))
                raise _Unusable("unknown_value", f"[{i}] severity {_short(raw)}")
            worst = _worse(worst, state)
            if len(names) < MAX_LISTED:
                names.append(str(inc.get("external_desc") or inc.get("id") or "(unnamed)")[:MAX_NAME])
        state = worst if watched else _STATE_TO_INDICATOR[worst]
        return Reading(state=state, level=_LEVELS[state], usable=True, incidents=names)
    except _Unusable as exc:
        return Reading.failed(exc.reason, exc.detail)
    except RecursionError:
        return Reading.failed("invalid_json", "nested too deeply")


def parse_page(page: StatusPage, body: bytes, content_type: str | None) -> Reading:
    """Parse a document fetched for `page` with the parser its type names."""
    if page.type == "google-cloud":
        return parse_google_cloud(body, content_type, page.components)
    return parse_statuspage(body, content_type, page.components)


# ----- polling ------------------------------------------------------------------------------------------


def page_key(page: StatusPage) -> str:
    """Identity of a distinct poll: providers (and policies) sharing it share one poller."""
    return f"{page.type}|{page.url}|{','.join(sorted(page.components))}"


def backoff_cap(interval: float) -> float:
    """The longest wait between polls of a failing page: 16 intervals, at most 5 min, at least 1."""
    return max(interval, min(16 * interval, MAX_BACKOFF))


def backoff_delay(interval: float, failures: int, rng: random.Random, hint: float | None = None) -> float:
    """Wait before the next poll after `failures` consecutive failures (S2).

    Exponential (2, 4, 8 … intervals) with jitter over the upper half, capped by `backoff_cap`; a
    `retry-after` from the status host (429/503) is honoured up to the cap.
    """
    cap = backoff_cap(interval)
    base = min(interval * 2 ** min(failures, 20), cap)
    delay = rng.uniform(base / 2, base)
    if hint is not None:
        delay = max(delay, min(hint, cap))
    return delay


@dataclass(frozen=True)
class RelayEntry:
    """One page as the relay serves it: the relay poller's latest reading and its poll counter."""

    reading: Reading | None
    """None before the relay's first poll of the page completed."""
    seq: int
    epoch: str
    """The relay poller's identity; a new one (relay restarted, page re-added) restarts `seq`."""
    polled_at: float | None = None
    """Wall time of the relay's poll (display only: node clocks differ)."""
    age: float | None = None
    """Seconds since the relay's poll, by the relay's monotonic clock (skew-free staleness)."""


class RelayUnavailable(Exception):
    """The relay could not be read, or answered something that is not a relay document."""


class RelaySource(Protocol):
    """Where a sidecar's pollers read pages polled by someone else (`statusrelay.RelayClient`)."""

    async def fetch(self, max_age: float) -> Mapping[str, RelayEntry]:
        """Page key -> entry; a result younger than `max_age` may be reused. Raises RelayUnavailable."""
        ...


class _FetchError(Exception):
    def __init__(self, reason: str, detail: str, hint: float | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.hint = hint


async def _read_capped(response: aiohttp.ClientResponse, cap: int) -> bytes:
    if response.content_length is not None and response.content_length > cap:
        raise _FetchError("too_large", f"Content-Length {response.content_length} exceeds {cap}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > cap:
            raise _FetchError("too_large", f"body exceeds {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def iso_time(wall: float | None) -> str | None:
    """A wall-clock time for display (UTC, `Z`), None stays None."""
    if wall is None:
        return None
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class StatusPagePoller:
    """Polls one distinct status page on its own task and keeps what it learnt. Never raises to callers.

    `reading` is the outcome of the latest completed poll (for a 304: the reading it confirmed), `seq`
    counts completed polls (the relay publishes it so sidecars count each real poll once), `last_good*`
    describe the latest usable one. Every completed poll is handed to `listener` (the board).
    """

    def __init__(
        self,
        page: StatusPage,
        session: aiohttp.ClientSession,
        *,
        listener: Callable[[str, Reading], None] | None = None,
        relay: RelaySource | None = None,
        min_interval: float = DEFAULT_MIN_INTERVAL,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.page = page
        self.key = page_key(page)
        self.epoch = secrets.token_hex(6)
        """Changes when a poller is re-created: with `seq`, tells relay readers a reading is new."""
        self._session = session
        self._listener = listener
        self._relay = relay
        self._min_interval = min_interval
        self._timeout = timeout
        self._clock = clock
        self._wall = wall_clock
        self._rng = rng or random.Random()
        self.seq = 0
        self.reading: Reading | None = None
        self.last_poll_at: float | None = None
        self.last_poll_wall: float | None = None
        self.last_good: Reading | None = None
        self.last_good_at: float | None = None
        self.last_good_wall: float | None = None
        self.last_error: str | None = None
        self.last_error_wall: float | None = None
        self.failures = 0
        """Consecutive unusable direct polls (drives the backoff)."""
        self.relay_failures = 0
        self.relay_error: str | None = None
        self.source: Source = "relay" if relay is not None else "direct"
        self.requests = 0
        """Requests sent to the status page itself."""
        self.not_modified = 0
        self.errors: Counter[str] = Counter()
        """Unusable polls by reason (`status_fetch_errors{reason}`)."""
        self._etag: str | None = None
        self._last_modified: str | None = None
        self._validated: Reading | None = None
        self._hint: float | None = None
        self._relay_mark: tuple[str, int] | None = None
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def interval(self) -> float:
        return max(self.page.poll_interval, self._min_interval, 0.01)  # never a busy loop

    @property
    def relay_interval(self) -> float:
        return min(RELAY_READ_INTERVAL, self.interval)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def update_page(self, page: StatusPage) -> None:
        """Same page, new settings (the shortest pollInterval of the providers sharing it).

        A shorter interval wakes a sleeping poller (it polls at once, then keeps the new pace).
        """
        sooner = page.poll_interval < self.page.poll_interval
        self.page = page
        if sooner:
            self._wake.set()

    # -- lifecycle
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"statuspage {self.key}")

    def cancel(self) -> asyncio.Task[None] | None:
        """Stop polling; returns the task to await (if one was running)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        return task

    async def stop(self) -> None:
        task = self.cancel()
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    def age(self) -> float | None:
        """Seconds since the latest completed poll (monotonic), None before the first."""
        return None if self.last_poll_at is None else max(0.0, self._clock() - self.last_poll_at)

    async def _run(self) -> None:
        while True:
            try:
                await self.poll_once()
                delay = self.next_delay()
            except Exception:  # a bug must not end the poller; the page simply stays unread
                log.exception("status page %s: poller error", self.page.url)
                delay = self.interval
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    def next_delay(self) -> float:
        if self._relay is not None and self.source == "relay":
            return self.relay_interval * self._rng.uniform(0.9, 1.1)
        if self.failures:
            return backoff_delay(self.interval, self.failures, self._rng, self._hint)
        return self.interval * self._rng.uniform(0.9, 1.1)

    # -- one cycle
    async def poll_once(self) -> None:
        """One cycle: the relay if there is one (falling back to the page), else the page."""
        async with self._lock:
            if self._relay is not None:
                if await self._read_relay():
                    if self.source != "relay":
                        log.info("status page %s: reading from the relay again", self.page.url)
                    self.relay_failures, self.relay_error, self.source = 0, None, "relay"
                    return
                self.relay_failures += 1
                if self.source == "relay" and self.relay_failures < RELAY_FALLBACK_AFTER:
                    return
                if self.source == "relay":
                    log.warning(
                        "status page %s: relay failed %d times (%s); polling the page directly",
                        self.page.url,
                        self.relay_failures,
                        self.relay_error,
                    )
                self.source = "direct"
            await self._poll_direct()

    async def _read_relay(self) -> bool:
        """Apply the relay's reading if it is new; False when the relay cannot serve this page."""
        assert self._relay is not None
        try:
            pages = await self._relay.fetch(max_age=self.relay_interval / 2)
        except RelayUnavailable as exc:
            self.relay_error = str(exc)
            return False
        entry = pages.get(self.key)
        if entry is None:
            self.relay_error = "the relay does not serve this page"
            return False
        if entry.seq == 0 or entry.reading is None:
            return True  # known to the relay, first poll still running
        limit = 2 * backoff_cap(self.interval) + self._timeout + self.relay_interval
        if entry.age is not None and entry.age > limit:
            self.relay_error = f"the relay's reading is {entry.age:.0f}s old"
            return False
        mark = (entry.epoch, entry.seq)
        if self._relay_mark is not None and mark[0] == self._relay_mark[0] and mark[1] <= self._relay_mark[1]:
            return True
        self._relay_mark = mark
        self._complete(entry.reading, entry.polled_at)
        return True

    async def _poll_direct(self) -> None:
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if self._validated is not None:
            if self._etag:
                headers["If-None-Match"] = self._etag
            if self._last_modified:
                headers["If-Modified-Since"] = self._last_modified
        self.requests += 1
        self._hint = None
        try:
            async with self._session.get(
                self.page.url,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                max_redirects=3,
            ) as response:
                if response.status == 304 and self._validated is not None:
                    self.not_modified += 1
                    reading = self._validated
                elif response.status != 200:
                    hint = retry_after(response.headers) if response.status in (429, 503) else None
                    raise _FetchError("http", f"HTTP {response.status}{await _title(response)}", hint)
                else:
                    body = await _read_capped(response, MAX_BODY)
                    reading = parse_page(self.page, body, response.headers.get("Content-Type"))
                    etag = response.headers.get("ETag")
                    last_modified = response.headers.get("Last-Modified")
                    if reading.usable:
                        self._validated, self._etag, self._last_modified = reading, etag, last_modified
        except _FetchError as exc:
            reading, self._hint = Reading.failed(exc.reason, exc.detail), exc.hint
        except TimeoutError:
            reading = Reading.failed("timeout", f"no answer within {self._timeout:g}s")
        except aiohttp.ClientError as exc:
            reading = Reading.failed("connection", f"{type(exc).__name__}: {exc}"[:200])
        except ValueError as exc:  # e.g. an unusable URL
            reading = Reading.failed("request", str(exc)[:200])
        except Exception as exc:  # a surprise from the HTTP stack must not escape into poll_now()
            log.exception("status page %s: unexpected error while polling", self.page.url)
            reading = Reading.failed("internal", f"{type(exc).__name__}: {exc}"[:200])
        if reading.usable:
            self.failures, self._hint = 0, None
        else:
            self.failures += 1
        self._complete(reading, None)

    def _complete(self, reading: Reading, polled_wall: float | None) -> None:
        previous = self.reading
        self.seq += 1
        self.reading = reading
        self.last_poll_at = self._clock()
        self.last_poll_wall = polled_wall if polled_wall is not None else self._wall()
        if reading.usable:
            self.last_good = reading
            self.last_good_at, self.last_good_wall = self.last_poll_at, self.last_poll_wall
            if previous is not None and not previous.usable:
                log.info("status page %s: readable again (%s)", self.page.url, reading.state)
        else:
            self.last_error, self.last_error_wall = reading.error, self.last_poll_wall
            self.errors[reading.reason or "unknown"] += 1
            if previous is None or previous.usable:
                log.warning("status page %s unusable (%s); not shedding on it", self.page.url, reading.error)
        if self._listener is not None:
            try:
                self._listener(self.key, reading)
            except Exception:
                log.exception("status page %s: listener failed", self.page.url)


async def _title(response: aiohttp.ClientResponse) -> str:
    """` (title)` of an HTML error page (WAF challenge, CDN error), for the error message."""
    try:
        head = await response.content.read(8192)
    except (aiohttp.ClientError, TimeoutError):
        return ""
    match = _TITLE.search(head)
    return f" ({_clean(match.group(1))})" if match else ""


# ----- deciding -----------------------------------------------------------------------------------------


class _Watch:
    """One provider's view of its page: the hysteresis that turns readings into a shed share."""

    def __init__(self, provider: str, page: StatusPage) -> None:
        self.provider = provider
        self.page = page
        self.key = page_key(page)
        self.share = 0.0
        self.state: str | None = None
        """The confirmed state (what `shed_share` reports); None before the first usable reading."""
        self.shedding_streak = 0
        self.clear_streak = 0
        self.unusable_streak = 0

    def same_rules(self, page: StatusPage) -> bool:
        old = self.page
        return (page_key(page), page.shed_on, page.partial_shed, page.confirm_after, page.recover_after) == (
            self.key,
            old.shed_on,
            old.partial_shed,
            old.confirm_after,
            old.recover_after,
        )

    def target(self, state: str) -> float:
        if state in self.page.shed_on:
            return 1.0
        return self.page.partial_shed.get(state, 0.0)

    def observe(self, reading: Reading) -> None:
        if not reading.usable:
            self.unusable_streak += 1
            if self.unusable_streak >= FAIL_OPEN_AFTER:
                if self.share > 0:
                    log.warning(
                        "provider %s: status page unusable %d times in a row; no longer shedding",
                        self.provider,
                        self.unusable_streak,
                    )
                self.share, self.state = 0.0, UNKNOWN
                self.shedding_streak = self.clear_streak = 0
            return
        self.unusable_streak = 0
        share = self.target(reading.state)
        if share > 0:
            self.shedding_streak += 1
            self.clear_streak = 0
            if self.share > 0 or self.shedding_streak >= self.page.confirm_after:
                if self.share == 0:
                    log.warning(
                        "provider %s: status page says %s; shedding %.0f%% of its traffic",
                        self.provider,
                        reading.state,
                        share * 100,
                    )
                self.share, self.state = share, reading.state
        else:
            self.clear_streak += 1
            self.shedding_streak = 0
            if self.share == 0 or self.clear_streak >= self.page.recover_after:
                if self.share > 0:
                    log.info("provider %s: status page says %s; traffic returns", self.provider, reading.state)
                self.share, self.state = 0.0, reading.state


class StatusBoard:
    """What the engine owns: pollers for the distinct pages of its providers, and their shed shares.

    `configure()` on start and on each policy reload; `shed_share()` on each request (a dict lookup, no
    I/O). With `relay_url` (`LLMROUTE_STATUS_RELAY`), pages are read from the operator's relay and polled
    directly only while the relay fails. Pollers start when `configure()` runs inside an event loop
    (`autostart=False` leaves them to `poll_now()`, for tests).
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        relay_url: str | None = None,
        *,
        min_interval: float = DEFAULT_MIN_INTERVAL,
        timeout: float = DEFAULT_TIMEOUT,
        relay_timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        autostart: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        self._session = session
        self.relay_url = relay_url
        self._relay: RelaySource | None = None
        if relay_url:
            from .statusrelay import RelayClient  # statusrelay builds on this module

            self._relay = RelayClient(session, relay_url, timeout=relay_timeout, clock=clock)
        self._min_interval = min_interval
        self._timeout = timeout
        self._clock = clock
        self._wall = wall_clock
        self._autostart = autostart
        self._rng = rng or random.Random()
        self._pollers: dict[str, StatusPagePoller] = {}
        self._watches: dict[str, _Watch] = {}
        self._by_key: dict[str, list[_Watch]] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- configuration
    def configure(self, providers: Sequence[Provider]) -> None:
        """Watch these providers' pages: new pages get a poller, unreferenced ones stop, others keep state.

        A provider whose page and shedding rules are unchanged keeps its hysteresis. Names may repeat
        (the operator passes the providers of every policy): the last one decides shedding for the name,
        every page is polled.
        """
        if self._closed:
            raise RuntimeError("the status board is closed")
        pages: dict[str, StatusPage] = {}
        watches: dict[str, _Watch] = {}
        for provider in providers:
            page = provider.status_page
            if page is None:
                continue
            key = page_key(page)
            if key not in pages or page.poll_interval < pages[key].poll_interval:
                pages[key] = page
            old = self._watches.get(provider.name)
            if old is not None and old.same_rules(page):
                old.page = page
                watches[provider.name] = old
            else:
                watches[provider.name] = _Watch(provider.name, page)
        for key in list(self._pollers):
            if key not in pages:
                task = self._pollers.pop(key).cancel()
                if task is not None:
                    self._stopping.add(task)
                    task.add_done_callback(self._stopping.discard)
        for key, page in pages.items():
            poller = self._pollers.get(key)
            if poller is None:
                self._pollers[key] = StatusPagePoller(
                    page, self._session, listener=self._observe, relay=self._relay,
                    min_interval=self._min_interval, timeout=self._timeout,
                    clock=self._clock, wall_clock=self._wall, rng=self._rng,
                )  # fmt: skip
            else:
                poller.update_page(page)
        self._watches = watches
        self._by_key = {}
        for watch in watches.values():
            self._by_key.setdefault(watch.key, []).append(watch)
        if self._autostart:
            self.start()

    def start(self) -> None:
        """Start the pollers' tasks (idempotent). `configure()` calls it; outside a running event loop it
        does nothing, and the next `configure()`, `start()` or `poll_now()` inside the loop starts them."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        for poller in self._pollers.values():
            poller.start()

    def _observe(self, key: str, reading: Reading) -> None:
        for watch in self._by_key.get(key, ()):
            watch.observe(reading)

    # -- the request path
    def shed_share(self, provider_name: str) -> tuple[float, str | None]:
        """Share of this provider's traffic to shed now (0.0 .. 1.0) and the confirmed page state."""
        watch = self._watches.get(provider_name)
        if watch is None:
            return 0.0, None
        return watch.share, watch.state

    def levels(self) -> dict[str, int]:
        """Provider -> level (0..3) of its page's latest usable reading; 0 before one arrives."""
        result: dict[str, int] = {}
        for name, watch in self._watches.items():
            poller = self._pollers.get(watch.key)
            result[name] = poller.last_good.level if poller and poller.last_good else 0
        return result

    # -- introspection
    @property
    def pollers(self) -> Mapping[str, StatusPagePoller]:
        """Distinct page key -> its poller (read-only use: the relay and tests)."""
        return self._pollers

    def error_counts(self) -> dict[str, int]:
        """Unusable polls by reason, summed over pages (`status_fetch_errors{reason}`)."""
        total: Counter[str] = Counter()
        for poller in self._pollers.values():
            total.update(poller.errors)
        return dict(total)

    def snapshot(self) -> dict[str, Any]:
        """Per provider, for the sidecar's `/status`."""
        result: dict[str, Any] = {}
        for name, watch in self._watches.items():
            poller = self._pollers.get(watch.key)
            reading = poller.reading if poller else None
            result[name] = {
                "page": watch.page.url,
                "type": watch.page.type,
                "components": list(watch.page.components),
                "state": watch.state,
                "reportedState": reading.state if reading else None,
                "level": poller.last_good.level if poller and poller.last_good else 0,
                "usable": reading.usable if reading else None,
                "shedding": watch.share,
                "lastPoll": iso_time(poller.last_poll_wall) if poller else None,
                "lastGoodPoll": iso_time(poller.last_good_wall) if poller else None,
                "lastError": poller.last_error if poller else None,
                "lastErrorAt": iso_time(poller.last_error_wall) if poller else None,
                "missingComponents": list(reading.missing_components) if reading else [],
                "incidents": list(reading.incidents) if reading else [],
                "consecutive": {
                    "shedding": watch.shedding_streak,
                    "clear": watch.clear_streak,
                    "unusable": watch.unusable_streak,
                },
                "source": poller.source if poller else ("relay" if self._relay else "direct"),
                "relayError": poller.relay_error if poller else None,
                "polls": poller.seq if poller else 0,
            }
        return result

    # -- tests and shutdown
    async def poll_now(self) -> None:
        """Poll every page once, now, and wait for it (a test hook; concurrent loop polls are serialised)."""
        if self._autostart:
            self.start()
        await asyncio.gather(*(poller.poll_once() for poller in list(self._pollers.values())))

    async def close(self) -> None:
        """Stop every poller and wait for them. The session belongs to the caller and stays open."""
        self._closed = True
        tasks = [task for poller in self._pollers.values() if (task := poller.cancel())]
        tasks.extend(self._stopping)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._stopping.clear()
