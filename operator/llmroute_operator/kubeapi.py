"""The few Kubernetes API calls kopf does not make for us, as plain dicts in and out.

kopf watches and patches the policies it serves, but creates nothing and reads nothing else. The
reconciler still has to create and patch ConfigMaps and look at Secrets, and the admission server
has to read policies; both go through `KubeApi`, a thin layer over the official client's asyncio
flavour (`kubernetes.aio`), so the code above it never sees generated models or URLs.

Credentials: in a pod, the service account (the client re-reads the rotating token itself);
elsewhere, the kubeconfig like kubectl; or an explicit `kopf.ConnectionInfo` (tests, local runs),
which the reconciler also hands to kopf so both talk to the same server.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import aiohttp
import kopf
from kubernetes.aio import client as kube
from kubernetes.aio import config as kube_config
from kubernetes.aio import watch as kube_watch

from . import GROUP, PLURAL, VERSION


class KubeApiError(RuntimeError):
    """An API call failed for a reason other than "not found"; `status` is the HTTP status, 0 when
    there was no answer (timeout, connection refused or reset)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Kubernetes API answered {status}: {message}" if status else f"Kubernetes API: {message}")
        self.status = status


@contextlib.contextmanager
def _transport_errors() -> Iterator[None]:
    """Timeouts and connection failures as `KubeApiError`, so callers handle one error type."""
    try:
        yield
    except TimeoutError:  # asyncio's and aiohttp's timeouts are this builtin
        raise KubeApiError(0, "no answer in time") from None
    except aiohttp.ClientError as exc:
        raise KubeApiError(0, f"{type(exc).__name__}: {exc}") from None


def configuration_from(connection: kopf.ConnectionInfo) -> kube.Configuration:
    """A client configuration for an explicit endpoint and credentials."""
    if connection.certificate_data or connection.private_key_data:
        raise ValueError("client certificates must be given as files (certificate_path, private_key_path)")
    ca_data = connection.ca_data.decode() if isinstance(connection.ca_data, bytes) else connection.ca_data
    configuration = kube.Configuration(
        host=connection.server.rstrip("/"),
        ssl_ca_cert=str(connection.ca_path) if connection.ca_path else None,
        ca_cert_data=ca_data,
        cert_file=str(connection.certificate_path) if connection.certificate_path else None,
        key_file=str(connection.private_key_path) if connection.private_key_path else None,
        verify_ssl=not connection.insecure,
        username=connection.username,
        password=connection.password,
    )
    if connection.token:
        configuration.api_key = {"BearerToken": connection.token}
        configuration.api_key_prefix = {"BearerToken": connection.scheme or "Bearer"}
    return configuration


async def load_configuration() -> kube.Configuration:
    """In a pod: the service account; elsewhere: the current kubeconfig context."""
    configuration = kube.Configuration()
    try:
        kube_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except kube_config.ConfigException:
        await kube_config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    return configuration


class KubeApi:
    """ConfigMaps, Secrets (existence and key names only) and LLMRoutePolicies, as plain dicts.

    `request_timeout` bounds every call but the list of all policies, which `list_timeout` bounds
    (seconds; None: the client's default of 300 s). The admission server sets them: a read that
    outlives the API server's webhook timeout only delays the failurePolicy decision.
    """

    def __init__(
        self, api_client: kube.ApiClient, *, request_timeout: float | None = None, list_timeout: float | None = None
    ) -> None:
        self._client = api_client
        self._core = kube.CoreV1Api(api_client)
        self._custom = kube.CustomObjectsApi(api_client)
        self._admission = kube.AdmissionregistrationV1Api(api_client)
        self._timeout: dict[str, Any] = {"_request_timeout": request_timeout} if request_timeout else {}
        self._list_timeout: dict[str, Any] = {"_request_timeout": list_timeout} if list_timeout else {}

    @classmethod
    async def connect(
        cls,
        connection: kopf.ConnectionInfo | None = None,
        *,
        request_timeout: float | None = None,
        list_timeout: float | None = None,
    ) -> KubeApi:
        """A client for `connection`, or for the ambient credentials when None."""
        configuration = configuration_from(connection) if connection else await load_configuration()
        return cls(kube.ApiClient(configuration), request_timeout=request_timeout, list_timeout=list_timeout)

    async def close(self) -> None:
        await self._client.close()  # type: ignore[no-untyped-call]

    def _plain(self, model: Any) -> dict[str, Any]:
        plain = self._client.sanitize_for_serialization(model)  # type: ignore[no-untyped-call]
        return dict(plain) if isinstance(plain, Mapping) else {}

    async def read_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            with _transport_errors():
                return self._plain(await self._core.read_namespaced_config_map(name, namespace, **self._timeout))
        except kube.ApiException as exc:
            _raise_unless_missing(exc)
            return None

    async def create_configmap(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        try:
            configmap = kube.V1ConfigMap.from_dict(dict(body))
            assert configmap is not None
            with _transport_errors():
                return self._plain(await self._core.create_namespaced_config_map(namespace, configmap, **self._timeout))
        except kube.ApiException as exc:
            raise _error(exc) from None

    async def patch_configmap(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        try:
            with _transport_errors():
                result = await self._core.patch_namespaced_config_map(
                    name, namespace, dict(patch), _content_type="application/merge-patch+json", **self._timeout
                )
        except kube.ApiException as exc:
            raise _error(exc) from None
        return self._plain(result)

    async def list_configmaps(self, label_selector: str) -> list[dict[str, Any]]:
        """ConfigMaps of every namespace matching `label_selector`."""
        try:
            with _transport_errors():
                found = await self._core.list_config_map_for_all_namespaces(
                    label_selector=label_selector, **self._list_timeout
                )
        except kube.ApiException as exc:
            raise _error(exc) from None
        return [self._plain(item) for item in found.items or []]

    async def list_pods(self, *, label_selector: str = "", namespace: str | None = None) -> list[dict[str, Any]]:
        """Pods matching `label_selector`, in `namespace` or in all namespaces."""
        try:
            with _transport_errors():
                if namespace is None:
                    found = await self._core.list_pod_for_all_namespaces(
                        label_selector=label_selector, **self._list_timeout
                    )
                else:
                    found = await self._core.list_namespaced_pod(
                        namespace, label_selector=label_selector, **self._list_timeout
                    )
        except kube.ApiException as exc:
            raise _error(exc) from None
        return [self._plain(item) for item in found.items or []]

    async def list_namespace_names(self, label_selector: str) -> list[str]:
        """Names of the namespaces matching `label_selector`."""
        try:
            with _transport_errors():
                found = await self._core.list_namespace(label_selector=label_selector, **self._list_timeout)
        except kube.ApiException as exc:
            raise _error(exc) from None
        return [str(item.metadata.name) for item in found.items or [] if item.metadata and item.metadata.name]

    async def read_secret_keys(self, namespace: str, name: str) -> list[str] | None:
        """The key names a Secret holds (never the values), or None when there is no such Secret."""
        try:
            with _transport_errors():
                secret = await self._core.read_namespaced_secret(name, namespace, **self._timeout)
        except kube.ApiException as exc:
            _raise_unless_missing(exc)
            return None
        return sorted({*(secret.data or {}), *(secret.string_data or {})})

    async def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A whole Secret, values included (only the webhook's own TLS Secret: its RBAC names that one)."""
        try:
            with _transport_errors():
                return self._plain(await self._core.read_namespaced_secret(name, namespace, **self._timeout))
        except kube.ApiException as exc:
            _raise_unless_missing(exc)
            return None

    async def patch_secret(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """Merge-patch a Secret; a `metadata.resourceVersion` in `patch` makes a stale write a 409."""
        try:
            with _transport_errors():
                result = await self._core.patch_namespaced_secret(
                    name, namespace, dict(patch), _content_type="application/merge-patch+json", **self._timeout
                )
        except kube.ApiException as exc:
            raise _error(exc) from None
        return self._plain(result)

    async def read_webhook_configuration(self, name: str) -> dict[str, Any] | None:
        """A MutatingWebhookConfiguration, or None when there is none of that name."""
        try:
            with _transport_errors():
                found = await self._admission.read_mutating_webhook_configuration(name, **self._timeout)
        except kube.ApiException as exc:
            _raise_unless_missing(exc)
            return None
        return self._plain(found)

    async def patch_webhook_configuration(self, name: str, operations: list[dict[str, Any]]) -> None:
        """Apply a JSON patch (RFC 6902, `test` operations included) to a MutatingWebhookConfiguration."""
        try:
            with _transport_errors():
                await self._admission.patch_mutating_webhook_configuration(
                    name, operations, _content_type="application/json-patch+json", **self._timeout
                )
        except kube.ApiException as exc:
            raise _error(exc) from None

    async def read_policy(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            with _transport_errors():
                found = await self._custom.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, name, **self._timeout
                )
        except kube.ApiException as exc:
            _raise_unless_missing(exc)
            return None
        return dict(found) if isinstance(found, Mapping) else None

    async def patch_policy_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """Merge `status` into a policy's status (the status subresource)."""
        try:
            with _transport_errors():
                await self._custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, namespace, PLURAL, name, {"status": dict(status)},
                    _content_type="application/merge-patch+json", **self._timeout,
                )  # fmt: skip
        except kube.ApiException as exc:
            _raise_unless_missing(exc)

    async def create_event(self, namespace: str, event: Mapping[str, Any]) -> None:
        """Record a core/v1 Event (given as the plain manifest)."""
        try:
            body = kube.CoreV1Event.from_dict(dict(event))
            assert body is not None
            with _transport_errors():
                await self._core.create_namespaced_event(namespace, body, **self._timeout)
        except kube.ApiException as exc:
            raise _error(exc) from None

    async def list_policies(self) -> list[dict[str, Any]]:
        """Every LLMRoutePolicy the credentials may list, in all namespaces."""
        return (await self.list_policies_at())[0]

    async def list_policies_at(self, page_size: int = 500) -> tuple[list[dict[str, Any]], str]:
        """Every LLMRoutePolicy, read `page_size` at a time, and the list's resourceVersion (to watch from)."""
        policies: list[dict[str, Any]] = []
        version, token = "", None
        while True:
            paging: dict[str, Any] = {"limit": page_size, **({"_continue": token} if token else {})}
            try:
                with _transport_errors():
                    found = await self._custom.list_cluster_custom_object(
                        GROUP, VERSION, PLURAL, **paging, **self._list_timeout
                    )
            except kube.ApiException as exc:
                raise _error(exc) from None
            if not isinstance(found, Mapping):
                break
            policies += [dict(item) for item in found.get("items") or [] if isinstance(item, Mapping)]
            metadata = found.get("metadata") or {}
            version, token = str(metadata.get("resourceVersion") or version), metadata.get("continue")
            if not token:
                break
        return policies, version

    async def watch_policies(self, resource_version: str, timeout: int) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(event type, policy) from `resource_version` on, for up to `timeout` seconds. A version too old
        to watch from raises `KubeApiError` 410 (list again)."""
        watcher = kube_watch.Watch()  # type: ignore[no-untyped-call]
        try:
            with _transport_errors():
                async with watcher.stream(  # type: ignore[no-untyped-call]
                    self._custom.list_cluster_custom_object, GROUP, VERSION, PLURAL,
                    resource_version=resource_version, timeout_seconds=timeout, _request_timeout=timeout + 30,
                ) as stream:  # fmt: skip
                    async for event in stream:
                        kind, body = event.get("type"), event.get("raw_object")
                        if isinstance(kind, str) and isinstance(body, Mapping):
                            yield kind, dict(body)
        except kube.ApiException as exc:
            raise _error(exc) from None


def _raise_unless_missing(exc: kube.ApiException) -> None:
    if exc.status != 404:
        raise _error(exc) from None


def _error(exc: kube.ApiException) -> KubeApiError:
    return KubeApiError(int(exc.status or 0), str(exc.reason or exc))
