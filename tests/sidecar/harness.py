"""Shared test harness: fake providers and a real sidecar, both on loopback.

Tests build a policy pointing at `FakeProvider` servers, start the real sidecar app on an ephemeral
port (`aiohttp.test_utils.TestServer`, a real TCP listener), and talk to it over HTTP.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry import trace

from llmroute_sidecar.policy import load_policy
from llmroute_sidecar.server import STATE, SidecarState, create_app


def policy_document(
    primary_url: str,
    fallback_url: str,
    *,
    primary_type: str = "anthropic",
    fallback_type: str = "openai",
    route: dict[str, Any] | None = None,
    spec: dict[str, Any] | None = None,
    primary_status_page: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A two-target policy with short budgets (tests must be fast); `route`/`spec` override fields."""
    primary: dict[str, Any] = {
        "name": "claude",
        "type": primary_type,
        "baseURL": _base(primary_url, primary_type),
    }
    if primary_status_page is not None:
        primary["statusPage"] = primary_status_page
    document: dict[str, Any] = {
        "apiVersion": "llmroute.dev/v1alpha1",
        "kind": "LLMRoutePolicy",
        "metadata": {"name": "test-policy", "generation": 1},
        "spec": {
            "providers": [
                primary,
                {"name": "gpt", "type": fallback_type, "baseURL": _base(fallback_url, fallback_type)},
            ],
            "defaultRoute": "summarize",
            "routes": [
                {
                    "name": "summarize",
                    "budget": "1s",
                    "backoff": {"initial": "20ms", "max": "100ms"},
                    "attemptTimeout": "2s",
                    "targets": [
                        {
                            "name": "primary",
                            "provider": "claude",
                            "model": "claude-sonnet-4-5",
                            "params": {"max_tokens": 256},
                            "prompt": {
                                "system": "You summarize support tickets.",
                                "template": "Summarize:\n{{ text }}",
                            },
                        },
                        {
                            "name": "backup",
                            "provider": "gpt",
                            "model": "gpt-4.1-mini",
                            "degraded": True,
                            "prompt": {
                                "system": "Summarize the ticket in 3 bullet points.",
                                "template": "{{ text }}",
                            },
                        },
                    ],
                    "degradedNotice": "We're temporarily using a backup model.",
                }
            ],
            "retryBudget": {"ratio": 0.2, "minPerSecond": 100, "window": "10s"},
        },
    }
    if route:
        document["spec"]["routes"][0].update(copy.deepcopy(route))
    if spec:
        document["spec"].update(copy.deepcopy(spec))
    return document


def _base(url: str, kind: str) -> str:
    return url + "/v1" if kind == "openai" else url


@asynccontextmanager
async def running_sidecar(
    document: dict[str, Any] | None = None,
    *,
    policy_path: Any = None,
    tracer_provider: trace.TracerProvider | None = None,
    status_relay: str | None = None,
    watch_interval: float = 0.05,
    statuspage_min_interval: float | None = 0.01,
    **options: Any,
) -> AsyncIterator[tuple[str, SidecarState]]:
    """Start the real sidecar on loopback; yields (base URL, its state). `statuspage_min_interval`
    lowers the pollers' 10 s floor (None keeps it); `options` go to `create_app` (short timeouts, caps)."""
    policy = load_policy(document) if document is not None else None
    app: web.Application = create_app(
        policy_path=policy_path,
        policy=policy,
        tracer_provider=tracer_provider,
        status_relay=status_relay,
        watch_interval=watch_interval,
        statuspage_min_interval=statuspage_min_interval,
        **options,
    )
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()  # TestServer already enables handler cancellation
    try:
        yield str(server.make_url("")).rstrip("/"), app[STATE]
    finally:
        await server.close()
