"""The admission server follows a rotated certificate without a restart.

cert-manager renews the webhook's certificate in its Secret; the kubelet then swaps the mounted files
(a new timestamped directory, then an atomic rename of the `..data` symlink). The server must present
the new certificate to new connections, and must keep the old one while a pair on disk is inconsistent.
The tests run the real `serve()` on loopback and look at the certificate a TLS client is shown.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from llmroute_operator.webhooks import serve, webhook_tls

from .test_webhook_http import SETTINGS, free_port

HOSTNAME = "llmroute-webhook.llmroute.svc"
RELOAD_INTERVAL = 0.1
ROTATION_WAIT = 5.0
"""How long the test allows a rotation to show: many reload intervals, still short."""


@dataclass(frozen=True)
class Pair:
    cert_pem: bytes
    key_pem: bytes
    der: bytes


def make_pair(serial: int) -> Pair:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTNAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOSTNAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return Pair(cert.public_bytes(serialization.Encoding.PEM), key_pem, cert.public_bytes(serialization.Encoding.DER))


def test_tls_is_loaded_from_the_tls_directory(tmp_path: Path) -> None:
    pair = make_pair(1)
    (tmp_path / "tls.crt").write_bytes(pair.cert_pem)
    (tmp_path / "tls.key").write_bytes(pair.key_pem)

    tls = webhook_tls(replace(SETTINGS, webhook_tls_dir=str(tmp_path)))

    assert tls is not None and isinstance(tls.context, ssl.SSLContext)
    assert tls.context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert webhook_tls(replace(SETTINGS, webhook_tls_dir=str(tmp_path / "absent"))) is None


class EmptySource:
    async def read_policy(self, namespace: str, name: str) -> dict[str, Any] | None:
        return None

    async def list_policies(self) -> list[dict[str, Any]]:
        return []


def kubelet_write(directory: Path, pair: Pair, version: str) -> None:
    """What the kubelet does for a Secret volume: files in a new directory, then one atomic rename."""
    target = directory / f"..{version}"
    target.mkdir()
    (target / "tls.crt").write_bytes(pair.cert_pem)
    (target / "tls.key").write_bytes(pair.key_pem)
    (directory / "..data_tmp").symlink_to(target.name)
    os.rename(directory / "..data_tmp", directory / "..data")
    for name in ("tls.crt", "tls.key"):
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")


async def presented(port: int) -> bytes:
    """The certificate (DER) the server shows a new connection."""
    client = ssl.create_default_context()
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname=HOSTNAME)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert isinstance(der, bytes)
        return der
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


async def healthz_trusting(port: int, pair: Pair) -> int:
    """A fully verified HTTPS request, as the API server makes it, trusting only `pair`'s certificate."""
    trust = ssl.create_default_context(cadata=pair.cert_pem.decode())
    connector = aiohttp.TCPConnector(ssl=trust)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(f"https://127.0.0.1:{port}/healthz", server_hostname=HOSTNAME) as answer,
    ):
        return answer.status


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = ROTATION_WAIT) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


@pytest_asyncio.fixture()
async def webhook_on(tmp_path: Path) -> AsyncIterator[Callable[[], Awaitable[int]]]:
    """Starts `serve()` with the TLS directory `tmp_path`; the starter returns the admission port."""
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    async def start() -> int:
        settings = replace(SETTINGS, webhook_tls_dir=str(tmp_path), webhook_port=free_port(), relay_port=free_port())
        tasks.append(asyncio.create_task(serve(settings, EmptySource(), stop, tls_reload_interval=RELOAD_INTERVAL)))

        async def listening() -> bool:
            try:
                await presented(settings.webhook_port)
            except OSError:
                return False
            return True

        await until(listening, "the admission listener")
        return settings.webhook_port

    yield start
    stop.set()
    for task in tasks:
        await asyncio.wait_for(task, 10)


async def test_a_kubelet_symlink_swap_is_served_to_new_connections(tmp_path: Path, webhook_on: Any) -> None:
    first, second = make_pair(1), make_pair(2)
    kubelet_write(tmp_path, first, "2026_01_01_00_00_00.1")
    port = await webhook_on()
    assert await presented(port) == first.der
    assert await healthz_trusting(port, first) == 200

    kubelet_write(tmp_path, second, "2026_03_01_00_00_00.2")

    async def rotated() -> bool:
        return await presented(port) == second.der

    await until(rotated, "the rotated certificate")
    assert await healthz_trusting(port, second) == 200  # the new key was loaded with it
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await healthz_trusting(port, first)


async def test_a_half_written_pair_keeps_the_old_certificate_until_the_key_arrives(
    tmp_path: Path, webhook_on: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A plain rewrite (no symlink swap): the new certificate lands before its key."""
    first, second = make_pair(1), make_pair(2)
    (tmp_path / "tls.crt").write_bytes(first.cert_pem)
    (tmp_path / "tls.key").write_bytes(first.key_pem)
    port = await webhook_on()
    caplog.set_level(logging.WARNING, logger="llmroute_operator.webhooks")

    (tmp_path / "tls.crt").write_bytes(second.cert_pem)  # the key still belongs to the first
    await asyncio.sleep(10 * RELOAD_INTERVAL)  # ten checks of the mismatched pair

    assert await presented(port) == first.der
    assert await healthz_trusting(port, first) == 200  # handshakes still complete: the old key is kept
    mismatch = [r for r in caplog.records if "keeping the previous certificate" in r.getMessage()]
    assert len(mismatch) == 1, [r.getMessage() for r in caplog.records]  # logged once, not per check

    (tmp_path / "tls.key").write_bytes(second.key_pem)

    async def rotated() -> bool:
        return await presented(port) == second.der

    await until(rotated, "the completed pair")
    assert await healthz_trusting(port, second) == 200
