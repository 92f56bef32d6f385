"""Fixtures shared by the sidecar tests (a module that needs other fakes defines its own `fakes`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from llmroute_sidecar.simulator.fakes import FakeProvider


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeProvider, FakeProvider]]:
    """A primary and a fallback provider on loopback, named like the providers of `harness.policy_document`."""
    async with FakeProvider("claude") as primary, FakeProvider("gpt") as fallback:
        yield primary, fallback
