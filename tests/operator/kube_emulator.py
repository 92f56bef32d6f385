"""kmock's Kubernetes emulator with the API server behaviour kopf relies on filled in.

Stock kmock 0.8 stores objects as plain JSON; a real API server also versions them, and kopf's
patches and watches depend on that (shared/KUBERNETES-TESTING.md). This subclass adds, for every
create and patch (merge and JSON): a name from `generateName`, `uid`, `creationTimestamp`,
`metadata.namespace` from the URL, an increasing `resourceVersion`, a `generation` bumped on spec
changes (resources declaring a status subresource), status-subresource semantics (`/status` writes
only status; the main resource ignores status), 409 on a stale `resourceVersion` in a merge patch,
and 422 for a failed JSON-patch `test`. Lists carry the current resourceVersion; a watch subscribes
before it takes its snapshot and skips objects not newer than `?resourceVersion`. Deletion marks
(finalizers present) get a new version too.

Namespaces are listed from `namespace_labels` (kmock cannot route that path).

Still not emulated (tests must not rely on them): schema validation and defaulting, label selectors,
PUT, garbage collection of owned objects, DELETED events for objects removed between a list and the
following watch.

This touches kmock's private internals (`_handle`, `_objects`, `_buses`, `_lock`): kmock is pinned
to 0.8 in pyproject.toml for that reason.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
from kmock._internal import aiobus, dicts, enums, k8s, rendering

CREATE, UPDATE, DELETE = enums.action.CREATE, enums.action.UPDATE, enums.action.DELETE


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """`kmock.KubernetesEmulator` + resource versions, generations, subresources and proper watches."""

    _versions: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    _last_version: int = attrs.field(default=0, init=False)
    _writes: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False)
    namespace_labels: dict[str, dict[str, str]] = attrs.field(factory=dict, init=False)
    """Namespaces by name, with their labels: kmock 0.8 cannot parse `/api/v1/namespaces` at all, so the
    namespace list (with equality label selectors) is answered here, from this map."""

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if raw_request.method == "GET" and raw_request.path.rstrip("/") == "/api/v1/namespaces":
            wanted = dict(
                term.split("=", 1) for term in raw_request.query.get("labelSelector", "").split(",") if "=" in term
            )
            items = [
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}
                for name, labels in self.namespace_labels.items()
                if all(labels.get(key) == value for key, value in wanted.items())
            ]
            document = {"apiVersion": "v1", "kind": "NamespaceList", "metadata": {}, "items": items}
            return aiohttp.web.json_response(document)
        return await super().__call__(raw_request)

    def _next_version(self) -> str:
        self._last_version = next(self._versions)
        return str(self._last_version)

    def _has_status(self, resource: Any) -> bool:
        try:
            return "status" in self.resources[resource].subresources
        except KeyError:
            return False

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.resource is None or request.action not in (CREATE, UPDATE, DELETE):
            return await super()._handle(request)
        async with self._writes:  # one write at a time: each sees the result of the previous one
            # kmock matches requests by identity, so the parsed body is replaced in place.
            if request.action == CREATE and isinstance(request.data, dict):
                object.__setattr__(request, "data", self._created(request))
            elif request.action == UPDATE and request.name is not None:
                object.__setattr__(request, "data", self._patched(request))
            elif request.action == DELETE and request.name is not None:
                await self._mark_deleted(request)
            return await super()._handle(request)

    def _created(self, request: rendering.Request) -> dict[str, Any]:
        body = copy.deepcopy(request.data)
        meta = body.setdefault("metadata", {})
        if request.namespace and not meta.get("namespace"):
            meta["namespace"] = request.namespace
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        meta["resourceVersion"] = self._next_version()
        if self._has_status(request.resource):
            meta["generation"] = 1
        return body

    def _current(self, request: rendering.Request) -> dict[str, Any]:
        key = (request.resource, request.namespace, request.name)
        if key not in self._objects or self._objects[key].deleted:
            raise kmock.KubernetesObjectNotFoundError()
        return copy.deepcopy(self._objects[key].raw)

    def _patched(self, request: rendering.Request) -> list[dict[str, Any]]:
        """The patch as one `replace` of the whole object, computed with the API server's rules."""
        old = self._current(request)
        data = request.data
        if isinstance(data, dict):
            wanted = (data.get("metadata") or {}).get("resourceVersion")
            if wanted is not None and wanted != old["metadata"].get("resourceVersion"):
                raise k8s.KubernetesError(status=409, reason="Conflict", message="the object has been modified")
            new = dict(dicts.merge_patch_dict(old, data))
        elif isinstance(data, list):
            try:
                new = jsonpatch.apply_patch(old, data, in_place=False)
            except (jsonpatch.JsonPatchTestFailed, jsonpatch.JsonPatchConflict) as exc:
                raise k8s.KubernetesError(status=422, reason="Invalid", message=str(exc)) from None
        else:
            raise k8s.KubernetesError(status=400, reason="BadRequest", message="expected a merge or JSON patch")
        if self._has_status(request.resource):
            if request.subresource == "status":
                status = new.get("status")
                new = {key: value for key, value in old.items() if key != "status"}
                if status is not None:
                    new["status"] = status
            else:
                if "status" in old:
                    new["status"] = old["status"]
                else:
                    new.pop("status", None)
                if _essence(new) != _essence(old):
                    new["metadata"]["generation"] = int(old["metadata"].get("generation") or 1) + 1
        new["metadata"]["resourceVersion"] = self._next_version()
        return [{"op": "replace", "path": "", "value": new}]

    async def _mark_deleted(self, request: rendering.Request) -> None:
        key = (request.resource, request.namespace, request.name)
        if key not in self._objects or self._objects[key].deleted:
            return  # kmock answers 404
        meta = self._objects[key].get("metadata", {})
        if meta.get("finalizers") and not meta.get("deletionTimestamp"):
            async with self._lock:
                version = self._next_version()
                self._objects[key].patch({"metadata": {"deletionTimestamp": _now(), "resourceVersion": version}})
                raw = self._objects[key].raw
            await self._buses[request.resource].put({"type": "MODIFIED", "object": raw})

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        result: dict[str, Any] = await super()._serve_list(request)  # type: ignore[assignment]
        result["metadata"] = {"resourceVersion": str(self._last_version)}
        return result

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        yield b""  # headers out: the stream has started
        assert request.resource is not None
        bus: aiobus.Bus[Any] = self._buses[request.resource]
        mark = await bus.mark()  # subscribe first, then snapshot: nothing falls in between
        try:
            since = int(request.params.get("resourceVersion") or 0)
            async with self._lock:
                snapshot = [
                    obj.raw
                    for (resource, namespace, name), obj in self._objects.items()
                    if resource == request.resource and not obj.deleted
                    if request.namespace is None or namespace == request.namespace
                    if request.name is None or name == request.name
                ]
            sent: set[tuple[str, str]] = set()
            for raw in snapshot:
                if int(raw.get("metadata", {}).get("resourceVersion") or 0) > since:
                    sent.add(_identity(raw))
                    yield {"type": "ADDED", "object": raw}
            async for event in bus.stream(since=mark):
                raw = event.get("object", {})
                meta = raw.get("metadata", {})
                if request.namespace is not None and meta.get("namespace") != request.namespace:
                    continue
                if request.name is not None and meta.get("name") != request.name:
                    continue
                if event.get("type") != "DELETED" and _identity(raw) in sent:
                    continue  # already sent from the snapshot
                yield event
        finally:
            await bus.unmark(mark)


def _identity(raw: dict[str, Any]) -> tuple[str, str]:
    meta = raw.get("metadata", {})
    return str(meta.get("uid")), str(meta.get("resourceVersion"))


def _essence(body: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in body.items() if key not in ("metadata", "status")}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
