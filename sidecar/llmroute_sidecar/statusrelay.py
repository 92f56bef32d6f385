"""The cluster status relay: each status page polled once per cluster, its readings served to every sidecar.

Why: hundreds of pods each polling status.claude.com every 30 s get a WAF challenge instead of JSON
(PROVIDERS.md 4, HOSTILE.md S10), and incident.io asks integrators to proxy and cache. So in a cluster the
operator runs one `StatusBoard`, configured with the providers of every policy, and serves its pollers'
latest readings here (`build_relay_app`); sidecars given `LLMROUTE_STATUS_RELAY` read them with
`RelayClient` instead of the pages. If the relay fails twice in a row a sidecar polls the page itself and
keeps trying the relay (E4; see `statuspolling.StatusPagePoller`).

Wire format, `GET /v1/statuspages` (no request body, no state changed by readers: there is no way for a
pod to make the operator poll an arbitrary URL):

    {"relay": {"pages": 2},
     "pages": {"<page_key>": {"type": "statuspage", "url": "...", "watched": ["k8w3r06qmzrp"],
                              "state": "operational", "level": 0, "usable": true, "error": null,
                              "missingComponents": [], "incidents": [],
                              "components": {"k8w3r06qmzrp": "operational"},
                              "seq": 12, "epoch": "3f9a0c11d2e4", "polledAt": "2026-09-04T12:03:36.857Z",
                              "age": 4.2, "lastGoodAt": "..."}}}

`seq` counts the relay poller's completed polls and `epoch` names the poller, so a sidecar reading every
few seconds applies each real poll exactly once to its hysteresis. `age` is measured on the relay's
monotonic clock, so staleness survives node clock skew (E1). Before the first poll, `seq` is 0 and the
reading fields are null. The page key is `statuspages.page_key`: type, url and sorted components.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from .statusboard import StatusBoard
from .statuspages import MAX_BODY, Reading
from .statuspolling import USER_AGENT, RelayEntry, RelayUnavailable, StatusPagePoller, iso_time

log = logging.getLogger(__name__)

RELAY_PATH = "/v1/statuspages"
BOARD_KEY = web.AppKey("llmroute_status_board", StatusBoard)


# ----- the relay (operator side) -------------------------------------------------------------------------


def encode_page(poller: StatusPagePoller) -> dict[str, Any]:
    """One page's entry in the relay document."""
    entry: dict[str, Any] = {
        "type": poller.page.type,
        "url": poller.page.url,
        "watched": list(poller.page.components),
    }
    if poller.reading is not None:
        entry.update(poller.reading.to_json())
        # The reason label only (`http`, `timeout`, ...): the detail quotes what the fetched URL answered
        # (an HTML title, an HTTP status), and this document is served to every pod unauthenticated.
        entry["error"] = poller.reading.reason
    else:
        entry.update(state=None, level=None, usable=None, error=None)
    age = poller.age()
    entry.update(
        seq=poller.seq,
        epoch=poller.epoch,
        polledAt=iso_time(poller.last_poll_wall),
        age=None if age is None else round(age, 3),
        lastGoodAt=iso_time(poller.last_good_wall),
    )
    return entry


def relay_document(board: StatusBoard) -> dict[str, Any]:
    """What `GET /v1/statuspages` answers: every page the board polls."""
    pages = {key: encode_page(poller) for key, poller in board.pollers.items()}
    return {"relay": {"pages": len(pages)}, "pages": pages}


async def _serve_pages(request: web.Request) -> web.Response:
    document = relay_document(request.app[BOARD_KEY])
    return web.Response(
        body=orjson.dumps(document),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def build_relay_app(board: StatusBoard) -> web.Application:
    """The relay's HTTP app: `GET /v1/statuspages` (and `GET /healthz`). The caller owns the board."""
    app = web.Application()
    app[BOARD_KEY] = board
    app.router.add_get(RELAY_PATH, _serve_pages)
    app.router.add_get("/healthz", _healthz)
    return app


# ----- the client (sidecar side) -------------------------------------------------------------------------


def relay_endpoint(url: str) -> str:
    """`LLMROUTE_STATUS_RELAY` may name the service (`http://llmroute-relay:8090`) or the endpoint."""
    base = url.rstrip("/")
    return base if base.endswith(RELAY_PATH) else base + RELAY_PATH


def decode_page(raw: Any) -> RelayEntry:
    """One page entry of a relay document; ValueError when it is not one."""
    if not isinstance(raw, dict):
        raise ValueError("page entry is not an object")
    seq, epoch, polled_at, age = raw.get("seq"), raw.get("epoch"), raw.get("polledAt"), raw.get("age")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise ValueError("seq is not a counter")
    if not isinstance(epoch, str) or not epoch or len(epoch) > 64:
        raise ValueError("epoch is not a short string")
    if age is not None and (not isinstance(age, int | float) or isinstance(age, bool) or age < 0):
        raise ValueError("age is not a number of seconds")
    wall: float | None = None
    if isinstance(polled_at, str):
        try:
            wall = datetime.fromisoformat(polled_at).timestamp()
        except ValueError:
            wall = None
    reading = None if seq == 0 or raw.get("state") is None else Reading.from_json(raw)
    return RelayEntry(
        reading=reading, seq=seq, epoch=epoch, polled_at=wall, age=None if age is None else float(age)
    )


def decode_document(body: bytes) -> dict[str, RelayEntry]:
    """A relay document: page key -> entry. Malformed entries are dropped (their pollers fall back)."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RelayUnavailable(f"invalid JSON: {exc}"[:160]) from None
    pages = document.get("pages") if isinstance(document, dict) else None
    if not isinstance(pages, dict):
        raise RelayUnavailable("not a relay document (no pages object)")
    result: dict[str, RelayEntry] = {}
    for key, raw in pages.items():
        try:
            result[key] = decode_page(raw)
        except ValueError as exc:
            log.debug("status relay: page %r dropped: %s", key, exc)
    return result


class RelayClient:
    """Reads the relay for all the pollers of one sidecar: one request serves every page.

    Pollers ask with a `max_age`; a document (or failure) younger than that is shared, and concurrent
    asks wait for the one request in flight.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        *,
        timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = relay_endpoint(url)
        self._session = session
        self._timeout = timeout
        self._clock = clock
        self._lock = asyncio.Lock()
        self._cached: tuple[float, dict[str, RelayEntry] | str] | None = None
        self.requests = 0

    async def fetch(self, max_age: float) -> Mapping[str, RelayEntry]:
        async with self._lock:
            if self._cached is None or self._clock() - self._cached[0] > max_age:
                try:
                    result: dict[str, RelayEntry] | str = await self._get()
                except RelayUnavailable as exc:
                    result = str(exc)
                self._cached = (self._clock(), result)
            result = self._cached[1]
        if isinstance(result, str):
            raise RelayUnavailable(result)
        return result

    async def _get(self) -> dict[str, RelayEntry]:
        self.requests += 1
        try:
            async with self._session.get(
                self.url,
                headers={"Accept": "application/json", "User-Agent": USER_AGENT},
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                allow_redirects=False,
            ) as response:
                if response.status != 200:
                    raise RelayUnavailable(f"HTTP {response.status}")
                if "json" not in (response.content_type or ""):
                    raise RelayUnavailable(f"content type {response.content_type}")
                if response.content_length is not None and response.content_length > MAX_BODY:
                    raise RelayUnavailable("document too large")
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_chunked(64 * 1024):
                    size += len(chunk)
                    if size > MAX_BODY:
                        raise RelayUnavailable("document too large")
                    chunks.append(chunk)
                body = b"".join(chunks)
        except TimeoutError:
            raise RelayUnavailable(f"no answer within {self._timeout:g}s") from None
        except aiohttp.ClientError as exc:
            raise RelayUnavailable(f"{type(exc).__name__}: {exc}"[:200]) from None
        return decode_document(body)
