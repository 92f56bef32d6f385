"""The webhook's TLS keeper (`webhook.tls.mode: operator`, the chart's default) against the real API server,
authenticated as the chart's webhook ServiceAccount: the server's RBAC (get/patch on the one Secret and the
one MutatingWebhookConfiguration, by name) and its patch semantics (merge patch with a resourceVersion, JSON
patch with `test` operations) are what the keeper's writes meet.

The session's release runs in helm mode (its webhook is outside the cluster), so this module installs the
chart a second time, in the default mode, under another name in another namespace (no CRD: the first
release owns it), and uninstalls it after: its webhooks name a Service nothing serves.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from tests.e2e.cluster import ApiError, Cluster
from tests.e2e.conftest import CHART, Release, chart_environment

from llmroute_operator.settings import Settings
from llmroute_operator.webhooks import connect_api, tls_keeper

pytestmark = pytest.mark.e2e
RELEASE = "llmroute-tls"
NAMESPACE = "llmroute-tls-system"
TLS_KEYS = {"ca.crt", "tls.crt", "tls.key"}
"""What a TLS Secret holds for its readers (the keeper keeps `ca.key` beside them, to sign renewals)."""


@pytest.fixture(scope="module")
def operator_mode(release: Release) -> Iterator[list[dict[str, Any]]]:
    """The chart in its default TLS mode, installed next to the session's release; its rendered objects."""
    cluster = release.cluster
    cluster.helm("install", RELEASE, str(CHART), "-n", NAMESPACE, "--create-namespace", "--set", "crds.enabled=false")
    try:
        text = cluster.helm("get", "manifest", RELEASE, "-n", NAMESPACE)
        yield [doc for doc in yaml.safe_load_all(text) if doc]
    finally:
        cluster.helm("uninstall", RELEASE, "-n", NAMESPACE, "--wait")


def _webhook_settings(manifests: list[dict[str, Any]], tls_dir: Path) -> Settings:
    """The webhook's settings as the chart's Deployment sets them, its TLS directory a local one."""
    deployment = next(d for d in manifests if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-webhook"))
    return Settings.from_env(chart_environment(deployment, LLMROUTE_WEBHOOK_TLS_DIR=str(tls_dir)))


def _as_service_account(cluster: Cluster, manifests: list[dict[str, Any]]) -> tuple[str, kopf.ConnectionInfo]:
    """A token the server issues for the chart's webhook ServiceAccount, and a connection that uses only it."""
    account = next(
        d["metadata"]["name"]
        for d in manifests
        if d["kind"] == "ServiceAccount" and d["metadata"]["name"].endswith("-webhook")
    )
    token = cluster.service_account_token(NAMESPACE, account)
    return token, kopf.ConnectionInfo(server=cluster.server, ca_path=str(cluster.ca_path), token=token)


async def test_the_keeper_fills_the_secret_and_the_ca_bundles_as_the_webhook_service_account(
    release: Release, operator_mode: list[dict[str, Any]], tmp_path: Path
) -> None:
    cluster = release.cluster
    settings = _webhook_settings(operator_mode, tmp_path / "tls")
    assert settings.webhook_tls_secret is not None, "operator mode is the chart's default"
    namespace, secret_name = settings.webhook_tls_secret.split("/")
    secret_path = f"/api/v1/namespaces/{namespace}/secrets/{secret_name}"
    configuration_path = (
        f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{settings.webhook_configuration}"
    )
    assert not (cluster.api("GET", secret_path).get("data") or {}), "the chart renders the Secret empty"

    token, connection = _as_service_account(cluster, operator_mode)
    api = await connect_api(connection)
    try:
        keeper = tls_keeper(settings, api)
        assert keeper is not None
        await keeper.check()
        secret = cluster.api("GET", secret_path)
        configuration = cluster.api("GET", configuration_path)

        assert set(secret["data"]) >= TLS_KEYS, sorted(secret["data"])
        webhooks = configuration["webhooks"]
        assert len(webhooks) == 2
        assert [hook["clientConfig"].get("caBundle") for hook in webhooks] == [secret["data"]["ca.crt"]] * 2
        served = {name: (tmp_path / "tls" / name).read_bytes() for name in ("tls.crt", "tls.key")}
        assert served["tls.crt"] == base64.b64decode(secret["data"]["tls.crt"]), "the pair it serves is the Secret's"

        await keeper.check()  # nothing is due: no write, so no new resourceVersion
        assert cluster.api("GET", secret_path)["metadata"]["resourceVersion"] == secret["metadata"]["resourceVersion"]
        assert (
            cluster.api("GET", configuration_path)["metadata"]["resourceVersion"]
            == configuration["metadata"]["resourceVersion"]
        )
    finally:
        await api.close()

    # The grant is the one Secret by name: the same identity reads no other Secret of its namespace.
    cluster.api("POST", f"/api/v1/namespaces/{NAMESPACE}/secrets", {"metadata": {"name": "neighbour"}})
    with pytest.raises(ApiError) as refused:
        cluster.api("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets/neighbour", token=token)
    assert refused.value.status == 403
