"""A fake provider status page (Atlassian Statuspage / incident.io ``summary.json`` and Google Cloud
``incidents.json``) whose state and faults a test or a simulation scenario sets.

Why this exists: llmroute sheds traffic on status-page readings, and its poller must survive what real
status hosts do (WAF/CloudFront HTML challenges, 5xx, hangs, garbage or oversized bodies, 304s). Status
pages change only during real incidents, so tests and ``llmroute demo`` / ``llmroute simulate`` flip
component states here instead. Shapes follow the captures of status.claude.com, status.openai.com
(incident.io) and status.cloud.google.com.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeAlias

from aiohttp import web

from llmroute_sidecar.simulator.fakes import LoopbackServer, ServerStopping, close_transport

__all__ = [
    "COMPONENT_STATUSES",
    "ComponentStatus",
    "FakeStatusPage",
    "StatusFault",
    "StatusRequest",
]

ComponentStatus: TypeAlias = Literal[
    "operational", "degraded_performance", "partial_outage", "major_outage", "under_maintenance"
]
COMPONENT_STATUSES: tuple[ComponentStatus, ...] = (
    "operational", "degraded_performance", "partial_outage", "major_outage", "under_maintenance")
StatusFault: TypeAlias = Literal[
    "html", "error", "rate_limited", "hang", "garbage", "wrong_shape", "oversized"]
Flavor: TypeAlias = Literal["statuspage", "incidentio"]

_INDICATOR_FOR_STATUS = {"operational": "none", "degraded_performance": "minor", "partial_outage": "major",
                         "major_outage": "critical", "under_maintenance": "maintenance"}
_INDICATOR_RANK = {"none": 0, "maintenance": 1, "minor": 2, "major": 3, "critical": 4}
_DESCRIPTIONS = {"none": "All Systems Operational", "minor": "Partially Degraded Service",
                 "major": "Partial System Outage", "critical": "Major System Outage",
                 "maintenance": "Service Under Maintenance"}

# status.claude.com/api/v2/summary.json, 2026-09-04 (trimmed). "Claude API" is k8w3r06qmzrp.
CLAUDE_SUMMARY: dict[str, Any] = {
    "page": {"id": "tymt9n04zgry", "name": "Claude", "url": "https://status.claude.com",
             "time_zone": "Etc/UTC", "updated_at": "2026-09-04T12:03:36.857Z"},
    "status": {"indicator": "none", "description": "All Systems Operational"},
    "components": [
        {"id": "rwppv331jlwc", "name": "claude.ai", "status": "operational", "position": 1, "group": False,
         "group_id": None},
        {"id": "0qbwn08sd68x", "name": "Claude Console (platform.claude.com)", "status": "operational",
         "position": 2, "group": False, "group_id": None},
        {"id": "k8w3r06qmzrp", "name": "Claude API (api.anthropic.com)", "status": "operational",
         "position": 3, "group": False, "group_id": None},
        {"id": "yyzkbfz2thpt", "name": "Claude Code", "status": "operational", "position": 4, "group": False,
         "group_id": None},
    ],
    "incidents": [],
    "scheduled_maintenances": [],
}

# status.openai.com/api/v2/summary.json (incident.io), 2026-09-04 (trimmed) plus the "API" component of the
# 2026-08-06 capture. The "Chat Completions" and "Responses" ids are synthetic (real ones are ULIDs too).
OPENAI_SUMMARY: dict[str, Any] = {
    "page": {"id": "01JMDK9XYNY6RXSED6SDWW50WY", "name": "OpenAI", "url": "https://status.openai.com/",
             "updated_at": "2026-07-09T19:25:56Z"},
    "status": {"description": "All Systems Operational", "indicator": "none"},
    "components": [
        {"id": "01JMDK9Y1B4V4CE6NA2SVREJ1Q", "name": "API", "status": "operational", "position": 1},
        {"id": "01JFAKECHATC0MP1ET10NS0000", "name": "Chat Completions", "status": "operational",
         "position": 2},
        {"id": "01JFAKERESP0NSES0000000000", "name": "Responses", "status": "operational", "position": 3},
        {"id": "01JMXBRMFE6N2NNT7DG6XZQ6PW", "name": "Images", "status": "operational", "position": 10},
        {"id": "01KMP3KP5MGE23B80K1EK4S8PV", "name": "Codex API", "status": "operational", "position": 17},
    ],
}

# One resolved incident from status.cloud.google.com/incidents.json (the feed lists all recent incidents;
# active ones have no "end").
_GCP_RESOLVED_EXAMPLE: dict[str, Any] = {
    "id": "rZvZvSKVdDHyWh4dZJ8D", "number": "15564124031412553730",
    "begin": "2023-03-10T14:09:43+00:00", "created": "2023-03-10T14:26:24+00:00",
    "end": "2023-03-10T14:54:50+00:00", "modified": "2023-03-10T14:54:50+00:00",
    "external_desc": "Retry errors for Google BigQuery in europe-north1",
    "updates": [], "most_recent_update": {
        "created": "2023-03-10T14:26:17+00:00", "modified": "2023-03-10T14:26:28+00:00",
        "when": "2023-03-10T14:26:17+00:00",
        "text": "Summary: Retry errors for Google BigQuery in europe-north1",
        "status": "SERVICE_INFORMATION",
        "affected_locations": [{"title": "Finland (europe-north1)", "id": "europe-north1"}]},
    "status_impact": "SERVICE_INFORMATION", "severity": "low", "service_key": "9CcrhHUcFevXPSVaSxkf",
    "service_name": "Google BigQuery",
    "affected_products": [{"title": "Google BigQuery", "id": "9CcrhHUcFevXPSVaSxkf"}],
    "uri": "incidents/rZvZvSKVdDHyWh4dZJ8D",
    "currently_affected_locations": [{"title": "Finland (europe-north1)", "id": "europe-north1"}],
    "previously_affected_locations": [],
}

# What status.claude.com's CloudFront answered non-browser clients from 2026-09-17 (405 challenge).
CLOUDFRONT_405_PAGE = (
    '<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 4.01 Transitional//EN" "http://www.w3.org/TR/html4/loose.dtd">\n'
    '<HTML><HEAD><META HTTP-EQUIV="Content-Type" CONTENT="text/html; charset=iso-8859-1">\n'
    "<TITLE>ERROR: The request could not be satisfied</TITLE>\n</HEAD><BODY>\n"
    "<H1>405 ERROR</H1>\n<H2>The request could not be satisfied.</H2>\n<HR noshade size=\"1px\">\n"
    "This distribution is not configured to allow the HTTP request method that was used for this request.\n"
    "<BR clear=\"all\">\n<HR noshade size=\"1px\">\n<PRE>\nGenerated by cloudfront (CloudFront)\n"
    "Request ID: fake-Zl2Qy3Rk8Jm1Xc0Vb9Nn4Pp7Tt6Ww5Aa==\n</PRE>\n</BODY></HTML>\n"
)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class StatusRequest:
    """One request the fake status page received (``headers`` with lower-case names)."""

    method: str
    path: str
    headers: dict[str, str]
    received_at: float
    status: int | None = None


class FakeStatusPage(LoopbackServer):
    """Serves ``GET /api/v2/summary.json`` and ``/api/v2/status.json`` (Statuspage / incident.io shape) and
    ``GET /incidents.json`` (Google Cloud shape) on a loopback port, with ETag / If-None-Match support.

    ``summary`` is the initial page (default: Claude's); ``flavor="incidentio"`` mimics OpenAI's host (no
    ``scheduled_maintenances``, ``incidents`` only when there are some, no group fields). The page indicator
    is derived from component statuses and open incidents unless pinned with :meth:`set_indicator`.
    Set ``fault`` to make every endpoint misbehave until it is set back to None.
    """

    def __init__(
        self,
        summary: Mapping[str, Any] | None = None,
        *,
        flavor: Flavor = "statuspage",
        gcp_incidents: Iterable[Mapping[str, Any]] | None = None,
        cache_max_age: int = 10,
        oversized_bytes: int = 6 * 1024 * 1024,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host, port)
        base = copy.deepcopy(dict(summary if summary is not None else CLAUDE_SUMMARY))
        self.flavor: Flavor = flavor
        self.page: dict[str, Any] = base.get("page", {})
        self.components: list[dict[str, Any]] = list(base.get("components", []))
        self.incidents: list[dict[str, Any]] = list(base.get("incidents", []))
        self.scheduled_maintenances: list[dict[str, Any]] = list(base.get("scheduled_maintenances", []))
        gcp = gcp_incidents if gcp_incidents is not None else [_GCP_RESOLVED_EXAMPLE]
        self.gcp_incidents: list[dict[str, Any]] = [copy.deepcopy(dict(i)) for i in gcp]
        self.cache_max_age = cache_max_age
        self.oversized_bytes = oversized_bytes
        self.fault: StatusFault | None = None
        self.requests: list[StatusRequest] = []
        self.not_modified = 0
        self._indicator_override: tuple[str, str] | None = None
        self._ids = itertools.count(1)
        given = base.get("status")
        if isinstance(given, dict) and given.get("indicator") != self.indicator:
            self._indicator_override = (str(given.get("indicator")), str(given.get("description", "")))

    @classmethod
    def claude(cls, **kwargs: Any) -> FakeStatusPage:
        return cls(CLAUDE_SUMMARY, flavor="statuspage", **kwargs)

    @classmethod
    def openai(cls, **kwargs: Any) -> FakeStatusPage:
        return cls(OPENAI_SUMMARY, flavor="incidentio", **kwargs)

    # ---- state -----------------------------------------------------------------------------------------

    def component(self, key: str) -> dict[str, Any]:
        """The component with this id or name (KeyError if none)."""
        for c in self.components:
            if key in (c.get("id"), c.get("name")):
                return c
        raise KeyError(key)

    def set_component(self, key: str, status: ComponentStatus | str) -> None:
        """Set a component's status by id or name (unknown values are served as given: S5 tests)."""
        c = self.component(key)
        c["status"] = status
        if "updated_at" in c:
            c["updated_at"] = _now_iso()
        self._touch()

    def remove_component(self, key: str) -> None:
        self.components.remove(self.component(key))
        self._touch()

    def set_indicator(self, indicator: str | None, description: str | None = None) -> None:
        """Pin the page indicator (``none|minor|major|critical|maintenance`` or anything); None: derive."""
        if indicator is None:
            self._indicator_override = None
        else:
            self._indicator_override = (indicator, description or _DESCRIPTIONS.get(indicator, indicator))
        self._touch()

    @property
    def indicator(self) -> str:
        if self._indicator_override is not None:
            return self._indicator_override[0]
        levels = [_INDICATOR_FOR_STATUS.get(str(c.get("status")), "none") for c in self.components]
        levels += [str(i.get("impact", "none")) for i in self._open_incidents()]
        return max(levels, key=lambda v: _INDICATOR_RANK.get(v, 0), default="none")

    def add_incident(
        self,
        name: str,
        *,
        impact: str = "major",
        status: str = "investigating",
        components: Iterable[str] = (),
        body: str = "We are currently investigating this issue.",
    ) -> str:
        """Open an incident (optionally naming components by id or name); returns its id."""
        now = _now_iso()
        incident_id = f"fakeinc{next(self._ids):05d}"
        incident: dict[str, Any] = {
            "id": incident_id, "name": name, "status": status, "impact": impact,
            "shortlink": None if self.flavor == "incidentio" else f"https://stspg.io/{incident_id}",
            "updated_at": now}
        if self.flavor == "statuspage":
            affected = [copy.deepcopy(self.component(k)) for k in components]
            incident.update({
                "created_at": now, "monitoring_at": None, "resolved_at": None, "page_id": self.page.get("id"),
                "incident_updates": [{
                    "id": f"{incident_id}u1", "status": status, "body": body, "incident_id": incident_id,
                    "created_at": now, "display_at": now, "updated_at": now,
                    "affected_components": [{"code": c["id"], "name": c["name"], "old_status": "operational",
                                             "new_status": c.get("status")} for c in affected]}],
                "components": affected})
        self.incidents.append(incident)
        self._touch()
        return incident_id

    def update_incident(self, incident_id: str, status: str, impact: str | None = None) -> None:
        for i in self.incidents:
            if i["id"] == incident_id:
                i["status"] = status
                i["updated_at"] = _now_iso()
                if impact is not None:
                    i["impact"] = impact
                if status == "resolved" and "resolved_at" in i:
                    i["resolved_at"] = i["updated_at"]
                self._touch()
                return
        raise KeyError(incident_id)

    def resolve_incident(self, incident_id: str) -> None:
        """Resolve an incident (summary.json lists unresolved incidents only)."""
        self.update_incident(incident_id, "resolved")

    def add_gcp_incident(
        self,
        product: str = "Vertex Gemini API",
        *,
        product_id: str = "Z0FZJAMvEB4j3NbCJs6B",
        description: str | None = None,
        severity: str = "high",
        status_impact: str = "SERVICE_OUTAGE",
        locations: Iterable[str] = ("global",),
    ) -> str:
        """Open a Google Cloud incident for ``product`` (no ``end``: active); returns its id."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        incident_id = f"fakegcp{next(self._ids):013d}"
        desc = description or f"Elevated error rates for {product}"
        locs = [{"title": loc, "id": loc} for loc in locations]
        update = {"created": now, "modified": now, "when": now, "text": f"Summary: {desc}",
                  "status": status_impact, "affected_locations": locs}
        self.gcp_incidents.insert(0, {
            "id": incident_id, "number": str(10**18 + next(self._ids)), "begin": now, "created": now,
            "modified": now, "external_desc": desc, "updates": [update], "most_recent_update": update,
            "status_impact": status_impact, "severity": severity, "service_key": product_id,
            "service_name": product, "affected_products": [{"title": product, "id": product_id}],
            "uri": f"incidents/{incident_id}", "currently_affected_locations": locs,
            "previously_affected_locations": []})
        return incident_id

    def end_gcp_incident(self, incident_id: str) -> None:
        for i in self.gcp_incidents:
            if i["id"] == incident_id:
                now = datetime.now(UTC).isoformat(timespec="seconds")
                update = {**i["most_recent_update"], "created": now, "modified": now, "when": now,
                          "status": "AVAILABLE", "text": "The issue has been resolved."}
                i.update({"end": now, "modified": now, "most_recent_update": update,
                          "updates": [update, *i["updates"]], "status_impact": "AVAILABLE",
                          "previously_affected_locations": i["currently_affected_locations"],
                          "currently_affected_locations": []})
                return
        raise KeyError(incident_id)

    def _open_incidents(self) -> list[dict[str, Any]]:
        return [i for i in self.incidents if i.get("status") not in ("resolved", "postmortem")]

    def _touch(self) -> None:
        if "updated_at" in self.page:
            self.page["updated_at"] = _now_iso()

    def summary(self) -> dict[str, Any]:
        """The summary.json document as it would be served now."""
        indicator = self.indicator
        description = (self._indicator_override[1] if self._indicator_override is not None
                       else _DESCRIPTIONS.get(indicator, indicator))
        out: dict[str, Any] = {"page": self.page,
                               "status": {"indicator": indicator, "description": description},
                               "components": self.components}
        incidents = self._open_incidents()
        if self.flavor == "statuspage":
            out["incidents"] = incidents
            out["scheduled_maintenances"] = self.scheduled_maintenances
        elif incidents:
            out["incidents"] = incidents
        return out

    # ---- inspection ------------------------------------------------------------------------------------

    def count(self, path_substring: str | None = None) -> int:
        if path_substring is None:
            return len(self.requests)
        return sum(1 for r in self.requests if path_substring in r.path)

    async def wait_for_requests(self, n: int, timeout: float = 2.0) -> list[StatusRequest]:
        await self.wait_for(lambda: len(self.requests) >= n, timeout)
        return list(self.requests)

    @property
    def summary_url(self) -> str:
        return self.url + "/api/v2/summary.json"

    @property
    def status_url(self) -> str:
        return self.url + "/api/v2/status.json"

    @property
    def incidents_url(self) -> str:
        return self.url + "/incidents.json"

    # ---- server ----------------------------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        rec = StatusRequest(request.method, request.path, {k.lower(): v for k, v in request.headers.items()},
                            time.monotonic())
        self.requests.append(rec)
        self._notify()
        try:
            response = await self._serve(request)
            rec.status = response.status
            return response
        except ServerStopping:
            close_transport(request, rst=False)
            return web.Response(status=503)
        finally:
            self._notify()

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        fault = self.fault
        if fault == "hang":
            await self._park()  # until the client leaves or the server stops
        if fault == "html":
            return web.Response(status=405, text=CLOUDFRONT_405_PAGE, content_type="text/html",
                                charset="iso-8859-1",
                                headers={"Server": "CloudFront", "X-Cache": "Error from cloudfront"})
        if fault == "error":
            page = "<html><body><h1>500 Internal Server Error</h1></body></html>"
            return web.Response(status=500, text=page, content_type="text/html")
        if fault == "rate_limited":
            return web.Response(status=429, text="Too Many Requests", headers={"Retry-After": "60"})
        if fault == "garbage":
            return web.Response(status=200, body=b'{"page":{"id":"tymt9n04zgry","name":"Cla',
                                content_type="application/json")
        if fault == "wrong_shape":
            return self._json(request, {"page": self.page, "status": "none", "components": "n/a"})

        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, text="Method Not Allowed")
        doc: Any
        if request.path == "/api/v2/summary.json":
            doc = self.summary()
        elif request.path == "/api/v2/status.json":
            summary = self.summary()
            doc = {"page": summary["page"], "status": summary["status"]}
        elif request.path == "/incidents.json":
            doc = self.gcp_incidents
        else:
            return web.Response(status=404, text="Not Found")
        if fault == "oversized" and isinstance(doc, dict):
            doc = {**doc, "padding": "x" * self.oversized_bytes}
        elif fault == "oversized":
            doc = [*doc, {"padding": "x" * self.oversized_bytes}]
        return self._json(request, doc)

    def _json(self, request: web.Request, doc: Any) -> web.Response:
        body = json.dumps(doc).encode()
        etag = 'W/"' + hashlib.sha1(body).hexdigest()[:32] + '"'
        headers = {"ETag": etag, "Cache-Control": f"max-age={self.cache_max_age}, public",
                   "Vary": "Accept-Encoding"}
        if _etag_matches(request.headers.get("If-None-Match"), etag):
            self.not_modified += 1
            return web.Response(status=304, headers=headers)
        return web.Response(status=200, body=body, content_type="application/json", charset="utf-8",
                            headers=headers)


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    wanted = etag.removeprefix("W/")
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == wanted:
            return True
    return False
