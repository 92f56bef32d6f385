"""Shared pieces of the operator tests: an emulated API server with the CRD, and policy documents."""

from __future__ import annotations

import asyncio
import copy
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import kmock
import pytest_asyncio

from .kube_emulator import KubeEmulator

# The reconciler reads its settings at import (a kopf timer's interval is fixed when decorated):
# re-check missing Secrets often, so the test that creates one late stays short.
os.environ.setdefault("LLMROUTE_SECRET_RECHECK_INTERVAL", "0.5")

POLICIES = kmock.resource("llmroute.dev", "v1alpha1", "llmroutepolicies")
CONFIGMAPS = kmock.resource("", "v1", "configmaps")
SECRETS = kmock.resource("", "v1", "secrets")
EVENTS = kmock.resource("", "v1", "events")
NAMESPACE = "apps"

POLICY_URL = f"/apis/llmroute.dev/v1alpha1/namespaces/{NAMESPACE}/llmroutepolicies"
SECRET_URL = f"/api/v1/namespaces/{NAMESPACE}/secrets"

SPEC: dict[str, Any] = {
    "providers": [
        {
            "name": "claude",
            "type": "anthropic",
            "apiKey": {"secretKeyRef": {"name": "llm-keys", "key": "anthropic"}},
        },
        {"name": "gpt", "type": "openai", "apiKey": {"secretKeyRef": {"name": "llm-keys", "key": "openai"}}},
    ],
    "defaultRoute": "chat",
    "routes": [
        {
            "name": "chat",
            "budget": "8s",
            "targets": [
                {"name": "primary", "provider": "claude", "model": "claude-sonnet-4-5"},
                {"name": "backup", "provider": "gpt", "model": "gpt-4.1-mini", "degraded": True},
            ],
        }
    ],
}


def policy_body(name: str = "support-bot", spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """An LLMRoutePolicy manifest as a user would apply it."""
    return {
        "apiVersion": "llmroute.dev/v1alpha1",
        "kind": "LLMRoutePolicy",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": copy.deepcopy(SPEC if spec is None else spec),
    }


def secret_body(name: str = "llm-keys", keys: tuple[str, ...] = ("anthropic", "openai")) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "data": {key: "c2VjcmV0" for key in keys},
    }


@pytest_asyncio.fixture()
async def kube() -> AsyncIterator[KubeEmulator]:
    """An emulated API server on loopback, with the built-in resources and the LLMRoutePolicy CRD."""
    async with KubeEmulator() as emulator, kmock.Server(emulator):
        emulator.resources.load_bundled()
        emulator.resources[POLICIES] = kmock.ResourceInfo(
            kind="LLMRoutePolicy",
            singular="llmroutepolicy",
            namespaced=True,
            shortnames={"lrp"},
            subresources={"status"},
            verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
        )
        yield emulator


async def eventually(check: Callable[[], Any], *, timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll `check` (every 50 ms, in the test's loop so the emulator keeps serving) until it is truthy."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except (KeyError, AssertionError, ValueError, TypeError) as exc:
            last_error, result = exc, None
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last error: {last_error!r}")
