"""Where a policy may send its API keys: https by default, plain http only by explicit opt-in, and in a
cluster only to hosts on the operator's allowlist (the vendors' API hosts, plus the chart's additions)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from llmroute_operator.reconcile import host_allowed, load_cluster_policy
from llmroute_operator.settings import DEFAULT_PROVIDER_HOSTS, Settings
from llmroute_sidecar.policy import PolicyError, load_policy

from .conftest import policy_body


def with_base_url(url: str, **provider: Any) -> dict[str, Any]:
    body = policy_body()
    body["spec"]["providers"][0].update({"baseURL": url, **provider})
    return body


def problems(body: dict[str, Any], hosts: tuple[str, ...] = DEFAULT_PROVIDER_HOSTS) -> str:
    with pytest.raises(PolicyError) as caught:
        load_cluster_policy(body, hosts)
    return "; ".join(caught.value.problems)


def test_the_default_allowlist_is_the_vendors_api_hosts() -> None:
    assert DEFAULT_PROVIDER_HOSTS == ("api.anthropic.com", "api.openai.com", "generativelanguage.googleapis.com")
    assert load_cluster_policy(policy_body()).spec.providers[0].base_url is None  # the vendor's default URL
    assert load_cluster_policy(with_base_url("https://api.anthropic.com")).name == "support-bot"


def test_a_host_off_the_allowlist_is_refused_with_how_to_add_it() -> None:
    message = problems(with_base_url("https://collector.example.net/v1"))
    assert message.startswith('spec.providers[0].baseURL: host "collector.example.net" is not on the operator')
    assert "operator.providerHosts" in message


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("corp.openai.azure.com", True),
        ("a.b.openai.azure.com", True),
        ("openai.azure.com", False),  # "*." is for subdomains, not the bare domain
        ("evilopenai.azure.com", False),
        ("openai.azure.com.evil.net", False),
        ("GATEWAY.example.com", True),
        ("gateway.example.com.", True),
        ("other.example.com", False),
    ],
)
def test_allowlist_entries_match_exact_hosts_and_subdomains(host: str, allowed: bool) -> None:
    assert host_allowed(host, ("*.openai.azure.com", "gateway.example.com")) is allowed


def test_plain_http_needs_the_opt_in_in_a_cluster_even_on_loopback() -> None:
    hosts = (*DEFAULT_PROVIDER_HOSTS, "127.0.0.1", "proxy.internal")
    assert "allowPlainHTTP" in problems(with_base_url("http://127.0.0.1:8080"), hosts)
    assert "allowPlainHTTP" in problems(with_base_url("http://proxy.internal"), hosts)
    load_cluster_policy(with_base_url("http://proxy.internal", allowPlainHTTP=True), hosts)


def test_standalone_loopback_http_needs_no_opt_in_but_any_other_http_host_does() -> None:
    """The sidecar runs standalone against loopback fakes (tests, the demo, `make simulate`)."""
    for url in ("http://127.0.0.1:9999", "http://localhost:9999/v1", "http://[::1]:9999"):
        assert load_policy(with_base_url(url)).spec.providers[0].base_url == url
    with pytest.raises(PolicyError, match=re.escape("plain http would send the API key unencrypted to 10.0.0.7")):
        load_policy(with_base_url("http://10.0.0.7/v1"))
    assert load_policy(with_base_url("http://10.0.0.7/v1", allowPlainHTTP=True)).spec.providers[0].allow_plain_http


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ftp://api.openai.com", "expected https://<host>"),
        ("https:///v1", "expected https://<host>"),
        ("https://key:secret@api.openai.com", "must not carry credentials"),
        ("https://api.openai.com:99999", "not a valid URL"),
    ],
)
def test_urls_that_cannot_carry_a_key_safely_are_refused_everywhere(url: str, expected: str) -> None:
    with pytest.raises(PolicyError, match=re.escape(expected)):
        load_policy(with_base_url(url))


def test_the_chart_value_adds_hosts_to_the_vendors() -> None:
    settings = Settings.from_env({"LLMROUTE_PROVIDER_HOSTS": "gateway.example.com, *.openai.azure.com"})
    assert settings.provider_hosts == (*DEFAULT_PROVIDER_HOSTS, "gateway.example.com", "*.openai.azure.com")
    assert Settings.from_env({}).provider_hosts == DEFAULT_PROVIDER_HOSTS
