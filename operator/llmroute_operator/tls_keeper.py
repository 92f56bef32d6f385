"""Keeps the webhook's TLS Secret, its webhook configuration's caBundle and the served files current.

Every webhook replica runs a `TlsKeeper` (`webhook.tls.mode: operator`). Each check reads the Secret,
asks `certificates.renew` what it should hold now and, when that differs, merge-patches it with the
`resourceVersion` it read: of replicas deciding at once, one write wins, the others get 409, read
again and find nothing left to do. Then every webhook of the MutatingWebhookConfiguration gets the
Secret's CA bundle (a JSON patch whose `test` operations pin each webhook's name), and the serving
pair is written to this replica's own directory, where `webhooks.WebhookTls` picks it up. No volume
mount: a replica serves a new leaf as soon as it reads it, not when the kubelet refreshes a mount.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization

from .certificates import DEFAULT_LIFETIMES, Lifetimes, TlsState, renew
from .kubeapi import KubeApiError

log = logging.getLogger(__name__)

CHECK_INTERVAL = 300.0
"""Seconds between checks: rotation steps are days (leaves) or an hour (`Lifetimes.grace`) apart."""
FIRST_RETRY = 1.0
"""Seconds before a failed check is retried, doubled per failure up to `CHECK_INTERVAL`."""
CONFLICT_RETRIES = 5


class TlsApi(Protocol):
    """The four calls the keeper makes (`KubeApi` in production)."""

    async def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def patch_secret(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]: ...

    async def read_webhook_configuration(self, name: str) -> dict[str, Any] | None: ...

    async def patch_webhook_configuration(self, name: str, operations: list[dict[str, Any]]) -> None: ...


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class TlsKeeper:
    def __init__(
        self,
        api: TlsApi,
        *,
        namespace: str,
        secret: str,
        configuration: str,
        dns_names: Sequence[str],
        directory: Path,
        clock: Callable[[], datetime.datetime] = utc_now,
        lifetimes: Lifetimes = DEFAULT_LIFETIMES,
    ) -> None:
        self._api = api
        self._namespace, self._secret, self._configuration = namespace, secret, configuration
        self._dns_names = list(dns_names)
        self.directory = directory
        self._clock = clock
        self._lifetimes = lifetimes

    async def check(self) -> TlsState:
        """One pass: the Secret renewed if due, the caBundle published, the serving pair on disk."""
        state = await self._renew_secret()
        await self._publish_bundle(state)
        self._write_files(state)
        return state

    async def _renew_secret(self) -> TlsState:
        for _ in range(CONFLICT_RETRIES):
            secret = await self._api.read_secret(self._namespace, self._secret)
            if secret is None:
                raise KubeApiError(
                    404, f"Secret {self._namespace}/{self._secret} not found (the chart creates it empty: upgrade it)"
                )
            state = TlsState.from_secret_data(secret.get("data"))
            renewed, reasons = renew(state, self._dns_names, self._clock(), self._lifetimes)
            if not reasons:
                return state
            version = (secret.get("metadata") or {}).get("resourceVersion")
            patch = {"metadata": {"resourceVersion": version}, "data": renewed.secret_data()}
            try:
                await self._api.patch_secret(self._namespace, self._secret, patch)
            except KubeApiError as exc:
                if exc.status == 409:  # another replica wrote first: read what it wrote
                    continue
                raise
            log.info("webhook TLS: %s", "; ".join(reasons))
            return renewed
        raise KubeApiError(409, f"Secret {self._namespace}/{self._secret} kept changing while it was renewed")

    async def _publish_bundle(self, state: TlsState) -> None:
        configuration = await self._api.read_webhook_configuration(self._configuration)
        if configuration is None:
            log.warning("webhook TLS: no MutatingWebhookConfiguration %s to give the CA bundle", self._configuration)
            return
        bundle = base64.b64encode(state.bundle()).decode()
        operations: list[dict[str, Any]] = []
        for index, webhook in enumerate(configuration.get("webhooks") or []):
            if (webhook.get("clientConfig") or {}).get("caBundle") == bundle:
                continue
            operations += [
                {"op": "test", "path": f"/webhooks/{index}/name", "value": webhook.get("name")},
                {"op": "add", "path": f"/webhooks/{index}/clientConfig/caBundle", "value": bundle},
            ]
        if operations:
            await self._api.patch_webhook_configuration(self._configuration, operations)
            log.info("webhook TLS: CA bundle (%d CA) set on %s", len(state.cas), self._configuration)

    def _write_files(self, state: TlsState) -> None:
        assert state.leaf is not None and state.leaf_key is not None
        key = state.leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        # Key first: WebhookTls loads a pair only when it matches, so a reader in between keeps the old one.
        _replace(self.directory / "tls.key", key)
        _replace(self.directory / "tls.crt", state.leaf.public_bytes(serialization.Encoding.PEM))

    async def run(self, interval: float = CHECK_INTERVAL, first_retry: float = FIRST_RETRY) -> None:
        """Check now and every `interval` seconds; a failure is logged and retried sooner."""
        delay = first_retry
        while True:
            try:
                await self.check()
            except Exception as exc:
                log.warning(
                    "webhook TLS: cannot renew the certificate: %s", exc, exc_info=not isinstance(exc, KubeApiError)
                )
                await asyncio.sleep(min(delay, interval))
                delay = min(delay * 2, interval)
                continue
            delay = first_retry
            await asyncio.sleep(interval)


def _replace(path: Path, content: bytes) -> None:
    """Write `path` atomically (a reader sees the old file or the new one), owner-only, if it changed."""
    try:
        if path.read_bytes() == content:
            return
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    scratch = path.with_name(f".{path.name}.new")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(content)
    os.replace(scratch, path)
