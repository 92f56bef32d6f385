"""`TlsKeeper` against the emulated API server, across a whole CA rotation, on a fake clock.

Two keepers stand for two webhook replicas sharing one Secret: they race on the first write
(optimistic concurrency: one wins, the other re-reads) and both serve what the Secret holds.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import kopf
import pytest
import pytest_asyncio
from cryptography import x509

from llmroute_operator.certificates import DAY, Lifetimes, TlsState, dns_names_of
from llmroute_operator.kubeapi import KubeApi, KubeApiError
from llmroute_operator.settings import Settings
from llmroute_operator.tls_keeper import TlsKeeper, utc_now
from llmroute_operator.webhooks import WebhookTls, serve, tls_keeper

from .kube_emulator import KubeEmulator
from .test_webhook_http import SETTINGS, free_port
from .test_webhook_tls_reload import EmptySource, presented, until

NAMESPACE, SECRET, CONFIGURATION = "llmroute-system", "llmroute-webhook-certs", "llmroute"
SECRETS = kmock.resource("", "v1", "secrets")
CONFIGURATIONS = kmock.resource("admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations")
NAMES = ("llmroute-webhook", "llmroute-webhook.llmroute-system", "llmroute-webhook.llmroute-system.svc")
HOOKS = ("namespaces.pods.llmroute.dev", "objects.pods.llmroute.dev")
T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
HOUR = datetime.timedelta(hours=1)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime.datetime:
        return self.now


@pytest_asyncio.fixture()
async def api(kube: KubeEmulator) -> AsyncIterator[KubeApi]:
    """The chart's objects as `helm template` renders them: an empty Secret, a configuration without caBundle."""
    kube.resources[CONFIGURATIONS] = kmock.ResourceInfo(
        kind="MutatingWebhookConfiguration", namespaced=False, verbs={"get", "list", "create", "patch"}
    )
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": {"name": SECRET}}
    async with kube.post(f"/api/v1/namespaces/{NAMESPACE}/secrets", json=secret) as response:
        assert response.status in (200, 201), await response.text()
    hooks = [
        {
            "name": name,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "clientConfig": {"service": {"name": NAMES[0], "namespace": NAMESPACE, "path": "/mutate-pods"}},
        }
        for name in HOOKS
    ]
    configuration = {"kind": "MutatingWebhookConfiguration", "metadata": {"name": CONFIGURATION}, "webhooks": hooks}
    async with kube.post(
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations", json=configuration
    ) as response:
        assert response.status in (200, 201), await response.text()
    client = await KubeApi.connect(kopf.ConnectionInfo(server=str(kube.url).rstrip("/")))
    try:
        yield client
    finally:
        await client.close()


SHORT_CA = Lifetimes(ca=730 * DAY)
"""The defaults but a 2-year CA (renewed a year ahead), so a CA rotation comes after a few leaf renewals."""


def keeper(api: KubeApi, directory: Path, clock: Clock, lifetimes: Lifetimes = SHORT_CA) -> TlsKeeper:
    return TlsKeeper(
        api, namespace=NAMESPACE, secret=SECRET, configuration=CONFIGURATION, dns_names=NAMES,
        directory=directory, clock=clock, lifetimes=lifetimes,
    )  # fmt: skip


def stored_secret(kube: KubeEmulator) -> TlsState:
    return TlsState.from_secret_data(kube.objects[SECRETS, NAMESPACE, SECRET]["data"])


def bundles(kube: KubeEmulator) -> list[list[x509.Certificate]]:
    hooks = kube.objects[CONFIGURATIONS, None, CONFIGURATION]["webhooks"]
    assert [hook["name"] for hook in hooks] == list(HOOKS)
    return [x509.load_pem_x509_certificates(base64.b64decode(hook["clientConfig"]["caBundle"])) for hook in hooks]


def served(directory: Path) -> x509.Certificate:
    """The pair on disk loads as a server certificate (key matches), and this is its certificate."""
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(directory / "tls.crt", directory / "tls.key")
    assert (directory / "tls.key").stat().st_mode & 0o077 == 0
    return x509.load_pem_x509_certificate((directory / "tls.crt").read_bytes())


def trusted_by(leaf: x509.Certificate, bundle: list[x509.Certificate]) -> bool:
    for ca in bundle:
        try:
            leaf.verify_directly_issued_by(ca)
        except Exception:
            continue
        return True
    return False


async def test_two_replicas_rotate_leaf_and_ca_without_a_moment_of_distrust(
    kube: KubeEmulator, api: KubeApi, tmp_path: Path
) -> None:
    clock = Clock()
    first, second = keeper(api, tmp_path / "a", clock), keeper(api, tmp_path / "b", clock)
    replicas = (first, second)

    async def check_all() -> tuple[x509.Certificate, list[x509.Certificate]]:
        for replica in replicas:
            await replica.check()
        state = stored_secret(kube)
        [bundle, other] = bundles(kube)
        assert bundle == other == list(state.cas)  # both webhooks carry the Secret's bundle
        for replica in replicas:  # every replica serves the Secret's leaf, trusted by the bundle
            leaf = served(replica.directory)
            assert leaf == state.leaf and trusted_by(leaf, bundle)
        assert state.leaf is not None
        return state.leaf, bundle

    # Install: both replicas start at once, one CA results (the loser of the write re-read).
    await asyncio.gather(first.check(), second.check())
    # Had the loser overwritten the winner's write, one replica would serve a leaf the Secret no longer holds.
    assert served(first.directory) == served(second.directory) == stored_secret(kube).leaf
    leaf, bundle = await check_all()
    [ca] = bundle
    assert sorted(dns_names_of(leaf)) == sorted(NAMES)
    secret_version = kube.objects[SECRETS, NAMESPACE, SECRET]["metadata"]["resourceVersion"]

    # A day later nothing is due: no write at all.
    clock.now = T0 + DAY
    assert await check_all() == (leaf, bundle)
    assert kube.objects[SECRETS, NAMESPACE, SECRET]["metadata"]["resourceVersion"] == secret_version

    # 61 days in, the leaf (90 days) is renewed by the same CA; the caBundle stays as it was.
    clock.now = T0 + 61 * DAY
    renewed, same_bundle = await check_all()
    assert renewed != leaf and same_bundle == [ca]

    # Checks go on every 60 days (each renews the leaf) until the CA has a year left: its successor
    # joins the bundle, and the leaf, due as well, waits until that bundle is out everywhere ...
    while True:
        clock.now += 60 * DAY
        before = renewed
        renewed, bundle = await check_all()
        if len(bundle) > 1:
            break
        assert bundle == [ca] and renewed != before
    assert datetime.timedelta(days=300) < ca.not_valid_after_utc - clock.now <= datetime.timedelta(days=365)
    new_ca, old_ca = bundle
    assert old_ca == ca and renewed == before and trusted_by(renewed, [ca])
    # ... the leaf moves after the grace period, then the old CA leaves the bundle.
    clock.now += 2 * HOUR
    moved, still_both = await check_all()
    assert still_both == bundle and trusted_by(moved, [new_ca])
    clock.now += 2 * HOUR
    assert await check_all() == (moved, [new_ca])


async def test_a_replica_serves_what_its_keeper_writes(kube: KubeEmulator, api: KubeApi, tmp_path: Path) -> None:
    """With `LLMROUTE_WEBHOOK_TLS_SECRET`, the webhook waits for its keeper's files, then serves them."""
    environment = {
        "LLMROUTE_WEBHOOK_TLS_SECRET": f"{NAMESPACE}/{SECRET}",
        "LLMROUTE_WEBHOOK_CONFIGURATION": CONFIGURATION,
        "LLMROUTE_WEBHOOK_DNS_NAMES": ",".join(NAMES),
        "LLMROUTE_WEBHOOK_TLS_DIR": str(tmp_path),
    }
    settings = Settings.from_env(environment)
    tls = WebhookTls(tmp_path / "tls.crt", tmp_path / "tls.key", wait=True)
    assert tls.reload_if_changed() is False  # nothing to serve yet
    made = tls_keeper(settings, api)
    assert made is not None
    await made.check()
    assert tls.reload_if_changed() is True
    assert stored_secret(kube).leaf == served(tmp_path)


async def test_a_missing_secret_or_configuration_is_reported(kube: KubeEmulator, api: KubeApi, tmp_path: Path) -> None:
    clock = Clock()
    lost = TlsKeeper(
        api, namespace=NAMESPACE, secret="gone", configuration=CONFIGURATION, dns_names=NAMES,
        directory=tmp_path, clock=clock,
    )  # fmt: skip
    with pytest.raises(KubeApiError, match="gone not found"):
        await lost.check()
    # No configuration (e.g. renamed): the Secret and the served files are still kept.
    orphan = TlsKeeper(
        api, namespace=NAMESPACE, secret=SECRET, configuration="elsewhere", dns_names=NAMES,
        directory=tmp_path, clock=clock, lifetimes=Lifetimes(),
    )  # fmt: skip
    state = await orphan.check()
    assert served(tmp_path) == state.leaf
    hooks: list[dict[str, Any]] = kube.objects[CONFIGURATIONS, None, CONFIGURATION]["webhooks"]
    assert all("caBundle" not in hook["clientConfig"] for hook in hooks), json.dumps(hooks)


async def readyz_trusting(port: int, bundle: bytes) -> int:
    """A fully verified HTTPS request, as the API server makes it: trusting the caBundle, checking the name."""
    trust = ssl.create_default_context(cadata=bundle.decode())
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as session,
        session.get(f"https://127.0.0.1:{port}/readyz", server_hostname=NAMES[2]) as answer,
    ):
        return answer.status


async def test_the_served_certificate_follows_the_secret_and_the_bundle_stays_trusted(
    kube: KubeEmulator, api: KubeApi, tmp_path: Path
) -> None:
    """The real `serve()` in operator mode: unready (no certificate) until its keeper writes the pair, then
    verified by the caBundle the keeper set; after a leaf renewal, a new certificate under the same bundle."""
    settings = replace(
        SETTINGS, webhook_tls_dir=str(tmp_path), webhook_port=free_port(), relay_port=free_port(),
        webhook_tls_secret=f"{NAMESPACE}/{SECRET}", webhook_configuration=CONFIGURATION, webhook_dns_names=NAMES,
    )  # fmt: skip
    stop = asyncio.Event()
    server = asyncio.create_task(serve(settings, EmptySource(), stop, tls_reload_interval=0.1))
    try:
        clock = Clock()
        clock.now = utc_now()  # the TLS client checks validity against the real time
        replica = keeper(api, tmp_path, clock)
        with pytest.raises((OSError, aiohttp.ClientError)):  # listening, but no certificate to show yet
            await asyncio.wait_for(presented(settings.webhook_port), 5)
        await replica.check()
        bundle = stored_secret(kube).bundle()
        assert (
            base64.b64decode(
                kube.objects[CONFIGURATIONS, None, CONFIGURATION]["webhooks"][0]["clientConfig"]["caBundle"]
            )
            == bundle
        )

        async def answers() -> bool:
            try:
                return await readyz_trusting(settings.webhook_port, bundle) == 200
            except (OSError, aiohttp.ClientError):
                return False

        await until(answers, "the webhook to serve the keeper's certificate")
        first = await presented(settings.webhook_port)

        # The leaf falls due (here: a renewal window as long as its life, so now, not weeks ahead; no
        # grace period, which would otherwise hold a due leaf back while the CA is younger than an hour).
        due_now = TlsKeeper(
            api, namespace=NAMESPACE, secret=SECRET, configuration=CONFIGURATION, dns_names=NAMES,
            directory=tmp_path, clock=clock, lifetimes=Lifetimes(leaf_renew_before=Lifetimes().leaf, grace=datetime.timedelta(0)),
        )  # fmt: skip
        await due_now.check()
        assert stored_secret(kube).bundle() == bundle

        async def renewed() -> bool:
            return await presented(settings.webhook_port) != first

        await until(renewed, "the renewed certificate")
        assert await readyz_trusting(settings.webhook_port, bundle) == 200
    finally:
        stop.set()
        await asyncio.wait_for(server, 15)
