"""Every LLMRoutePolicy in memory, kept current by a watch: the webhook's policy source.

Admission then costs no API call (a scale-up to 100 pods reads nothing), and the status relay learns
the policies' status pages from the same memory instead of listing them all every 30 s. One paginated
list at start (and after the watch loses its place: 410 Gone, or any failure), then one long watch.
Until the first list succeeds the informer is not `synced`, and the webhook answers `/readyz` with
503: a replica that cannot see policies never receives reviews.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from .kubeapi import KubeApi, KubeApiError

log = logging.getLogger(__name__)

WATCH_TIMEOUT = 300
"""Seconds one watch request lasts before it is renewed from the last seen resourceVersion."""
FIRST_RETRY = 1.0
MAX_RETRY = 30.0


class PolicyInformer:
    """A `PolicySource` answering from memory; `run()` keeps the memory current."""

    def __init__(self, api: KubeApi, *, watch_timeout: int = WATCH_TIMEOUT, first_retry: float = FIRST_RETRY) -> None:
        self._api = api
        self._policies: dict[tuple[str, str], dict[str, Any]] = {}
        self._watch_timeout = watch_timeout
        self._first_retry = first_retry
        self.synced = asyncio.Event()
        """Set once the first list has been read (and stays set: later gaps are bounded by the retry)."""

    async def read_policy(self, namespace: str, name: str) -> dict[str, Any] | None:
        if not self.synced.is_set():
            raise KubeApiError(0, "the policy cache has not been filled yet")
        return self._policies.get((namespace, name))

    async def list_policies(self) -> list[dict[str, Any]]:
        if not self.synced.is_set():
            raise KubeApiError(0, "the policy cache has not been filled yet")
        return list(self._policies.values())

    def _key(self, body: Mapping[str, Any]) -> tuple[str, str]:
        metadata = body.get("metadata") or {}
        return str(metadata.get("namespace")), str(metadata.get("name"))

    async def _relist(self) -> str:
        policies, version = await self._api.list_policies_at()
        self._policies = {self._key(body): body for body in policies}
        self.synced.set()
        return version

    async def run(self) -> None:
        """List, then watch from the list's version, renewing the watch from the last version seen; list
        again after any failure (retry delay doubling up to `MAX_RETRY`)."""
        delay = self._first_retry
        version: str | None = None
        while True:
            try:
                if version is None:
                    version = await self._relist()
                async for kind, body in self._api.watch_policies(version, self._watch_timeout):
                    version = str((body.get("metadata") or {}).get("resourceVersion") or version)
                    if kind == "DELETED":
                        self._policies.pop(self._key(body), None)
                    elif kind in ("ADDED", "MODIFIED"):
                        self._policies[self._key(body)] = body
                delay = self._first_retry
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a 410 or any failure: list again after a pause
                unexpected = not isinstance(exc, KubeApiError)  # a traceback only for what would be a bug of ours
                log.warning("policy cache: %s; listing again in %gs", exc, delay, exc_info=unexpected)
                version = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY)
