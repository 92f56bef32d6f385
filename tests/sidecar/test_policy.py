"""The policy model on its own: field-path errors, warnings, and the derived timings the engine uses."""

from __future__ import annotations

from typing import Any

import pytest

from llmroute_sidecar.policy import DEFAULT_ATTEMPT_TIMEOUT, PolicyError, load_policy


def manifest(route: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "llmroute.dev/v1alpha1",
        "kind": "LLMRoutePolicy",
        "metadata": {"name": "p"},
        "spec": {
            "providers": [{"name": "claude", "type": "anthropic"}, {"name": "gpt", "type": "openai"}],
            "routes": [{
                "name": "chat",
                "targets": [{"name": "primary", "provider": "claude"}, {"name": "backup", "provider": "gpt"}],
                **(route or {}),
            }],
        },
    }


def test_errors_name_the_field_path() -> None:
    document = manifest()
    document["spec"]["routes"][0]["targets"][1]["provider"] = "gtp"
    with pytest.raises(PolicyError) as caught:
        load_policy(document)
    assert 'spec.routes[0].targets[1].provider: unknown provider "gtp"' in caught.value.problems


def test_a_budget_outside_4_to_12_seconds_is_a_warning_not_an_error() -> None:
    policy = load_policy(manifest({"budget": "30s"}))
    assert policy.warnings == ["spec.routes[0].budget: 30s is outside the sane range 4s..12s"]


def test_an_unset_attempt_timeout_grows_with_max_tokens_for_plain_calls_only() -> None:
    route = load_policy(manifest()).spec.routes[0]
    assert route.first_byte_timeout(stream=True, max_tokens=8192) == DEFAULT_ATTEMPT_TIMEOUT
    assert route.first_byte_timeout(stream=False, max_tokens=None) == DEFAULT_ATTEMPT_TIMEOUT
    assert route.first_byte_timeout(stream=False, max_tokens=256) == DEFAULT_ATTEMPT_TIMEOUT
    long_answer = route.first_byte_timeout(stream=False, max_tokens=4096)
    assert long_answer > 2 * DEFAULT_ATTEMPT_TIMEOUT  # minutes of generation before the first byte


def test_an_explicit_attempt_timeout_is_the_policy_authors_choice() -> None:
    route = load_policy(manifest({"attemptTimeout": "5s"})).spec.routes[0]
    assert route.first_byte_timeout(stream=False, max_tokens=4096) == 5.0
    assert route.first_byte_timeout(stream=True) == 5.0


@pytest.mark.parametrize(("name", "key"), [("llm_keys", "anthropic"), ("LLM-Keys", "anthropic"), ("llm-keys", "a/b")])
def test_secret_references_the_pod_api_would_refuse_are_refused_here(name: str, key: str) -> None:
    """An invalid `secretKeyRef` would make every injected pod invalid: refuse the policy instead."""
    document = manifest()
    document["spec"]["providers"][0]["apiKey"] = {"secretKeyRef": {"name": name, "key": key}}
    with pytest.raises(PolicyError) as caught:
        load_policy(document)
    assert any(p.startswith("spec.providers[0].apiKey.secretKeyRef.") for p in caught.value.problems)


def test_provider_names_that_would_share_a_key_variable_are_refused() -> None:
    document = manifest()
    document["spec"]["providers"] = [{"name": "claude-x", "type": "anthropic"}, {"name": "claude.x", "type": "openai"}]
    document["spec"]["routes"][0]["targets"] = [{"name": "primary", "provider": "claude-x"}]
    with pytest.raises(PolicyError) as caught:
        load_policy(document)
    assert caught.value.problems == [
        'spec.providers[1].name: "claude.x" and "claude-x" would share the key variable LLMROUTE_KEY_CLAUDE_X; '
        "rename one"
    ]
