"""Settings from the environment, and how they become kopf's run options."""

from __future__ import annotations

import pytest

from llmroute_operator.handlers import operator_options, registry
from llmroute_operator.settings import Settings, SettingsError


def test_defaults_match_the_chart_ports_and_refuse_unknown_policies() -> None:
    settings = Settings.from_env({})
    assert (settings.webhook_port, settings.relay_port, settings.health_port) == (8443, 8080, 8081)
    assert settings.unknown_policy == "refuse"
    assert settings.namespaces == () and settings.peering is None
    assert settings.status_relay is None


def test_every_variable_is_read() -> None:
    settings = Settings.from_env(
        {
            "LLMROUTE_NAMESPACES": "team-a, team-b",
            "LLMROUTE_PEERING": "llmroute",
            "LLMROUTE_WEBHOOK_PORT": "9443",
            "LLMROUTE_RELAY_PORT": "9080",
            "LLMROUTE_HEALTH_PORT": "9081",
            "LLMROUTE_UNKNOWN_POLICY": "allow",
            "LLMROUTE_SIDECAR_IMAGE": "example/llmroute:9",
            "LLMROUTE_STATUS_RELAY": "http://relay:8080",
            "LLMROUTE_WEBHOOK_TLS_DIR": "/tls",
            "LLMROUTE_POLICY_CACHE_TTL": "2.5",
            "LLMROUTE_SIDECAR_RESOURCES": '{"requests": {"cpu": "10m"}}',
        }
    )
    assert settings.namespaces == ("team-a", "team-b")
    assert (settings.webhook_port, settings.relay_port, settings.health_port) == (9443, 9080, 9081)
    assert settings.unknown_policy == "allow" and settings.policy_cache_ttl == 2.5
    assert settings.sidecar_image == "example/llmroute:9" and settings.status_relay == "http://relay:8080"
    assert settings.sidecar_resources == {"requests": {"cpu": "10m"}}
    assert settings.peering == "llmroute" and settings.webhook_tls_dir == "/tls"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LLMROUTE_WEBHOOK_PORT", "https"),
        ("LLMROUTE_UNKNOWN_POLICY", "maybe"),
        ("LLMROUTE_SIDECAR_RESOURCES", "{not json"),
        ("LLMROUTE_SIDECAR_RESOURCES", '{"cpu": "1"}'),
        ("LLMROUTE_POLICY_CACHE_TTL", "-1"),
    ],
)
def test_a_malformed_variable_is_a_settings_error_naming_it(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_kopf_runs_standalone_and_cluster_wide_by_default() -> None:
    options = operator_options(Settings())
    assert options["registry"] is registry
    assert options["standalone"] is True and options["peering_name"] is None
    assert options["clusterwide"] is True and options["namespaces"] == []
    assert options["liveness_endpoint"] == "http://0.0.0.0:8081/healthz"


def test_kopf_peers_and_limits_namespaces_when_configured() -> None:
    options = operator_options(Settings(namespaces=("team-a",), peering="llmroute"))
    assert options["standalone"] is False and options["peering_name"] == "llmroute"
    assert options["clusterwide"] is False and options["namespaces"] == ["team-a"]
    assert operator_options(Settings(peering="llmroute"), standalone=True)["standalone"] is True


def test_the_webhook_keeps_its_own_tls_only_with_a_secret_and_names() -> None:
    assert Settings.from_env({}).webhook_tls_secret is None
    settings = Settings.from_env(
        {
            "LLMROUTE_WEBHOOK_TLS_SECRET": "llmroute-system/llmroute-webhook-certs",
            "LLMROUTE_WEBHOOK_CONFIGURATION": "llmroute",
            "LLMROUTE_WEBHOOK_DNS_NAMES": "llmroute-webhook, llmroute-webhook.llmroute-system.svc",
        }
    )
    assert settings.webhook_tls_secret == "llmroute-system/llmroute-webhook-certs"
    assert settings.webhook_dns_names == ("llmroute-webhook", "llmroute-webhook.llmroute-system.svc")
    assert settings.webhook_configuration == "llmroute"
    for secret in ("llmroute-webhook-certs", "a/b/c", "/name"):
        with pytest.raises(SettingsError, match="namespace/name"):
            Settings.from_env({"LLMROUTE_WEBHOOK_TLS_SECRET": secret, "LLMROUTE_WEBHOOK_DNS_NAMES": "x"})
    with pytest.raises(SettingsError, match="LLMROUTE_WEBHOOK_DNS_NAMES"):
        Settings.from_env({"LLMROUTE_WEBHOOK_TLS_SECRET": "ns/name"})
