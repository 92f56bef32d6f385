"""What a provider's status page says, read into one normalised `Reading`: bytes in, no I/O.

Why status pages at all: when a provider declares an outage on its status page, retrying it burns the
route's budget for nothing; shedding to the fallback straight away is cheaper. But status pages are
advisory, slow, sometimes wrong and sometimes hostile (HOSTILE.md 5.3), so everything about them is
**fail-open**: a page we cannot read never sheds traffic, and the request path never waits for, or fails
because of, a poll.

Three layers, pure to stateful, one module each:

1. **Parsing** (this module: `parse_statuspage`, `parse_google_cloud`): bytes in, a `Reading` out, no I/O.
   Atlassian `summary.json`, incident.io's compatible `summary.json`, incident.io's widget proxy shape
   (`{"summary": {"structure": …, "affected_components": …}}`) and Google Cloud's `incidents.json`.
   Anything unexpected (HTML, WAF challenge, wrong content type, bad JSON, unknown shape or enum value,
   more than `MAX_BODY` bytes) gives `usable=False` with a `reason: detail` error, never "operational".
   `page_key` names a distinct page, so providers sharing one share its poller and its readings.
2. **Polling** (`statuspolling.StatusPagePoller`): one poller per distinct page, on its own task, or
   reading the operator's relay (`statusrelay.py`) in a cluster.
3. **Deciding** (`statusboard.StatusBoard`): per provider hysteresis over the readings of its page, so
   the engine's `shed_share()` is a dict lookup.

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
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from .policy import StatusPage

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
DEFAULT_MIN_INTERVAL = 10.0
"""Floor under `pollInterval` (Claude's status CDN caches for 10 s; polling faster only reads the cache)."""
MAX_LISTED = 20
"""At most this many incident names per reading, each at most `MAX_NAME` characters (hostile input)."""
MAX_NAME = 200

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
        raise _Unusable("content_type", f"{mime}{title_hint(body)}")
    text = body.removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
    if not text:
        raise _Unusable("not_json", "empty body")
    if text[:1] != opener:
        raise _Unusable("not_json", f"starts with {text[:1]!r}, expected {opener!r}{title_hint(text)}")
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise _Unusable("invalid_json", str(exc)[:120]) from None


def title_hint(html: bytes) -> str:
    """` (title)` of an HTML page (WAF challenge, CDN error) from its first 8 KiB, for error messages."""
    match = _TITLE.search(html[:8192])
    return f" ({_clean(match.group(1))})" if match else ""


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


# ----- identity -----------------------------------------------------------------------------------------


def page_key(page: StatusPage) -> str:
    """Identity of a distinct poll: providers (and policies) sharing it share one poller."""
    return f"{page.type}|{page.url}|{','.join(sorted(page.components))}"
