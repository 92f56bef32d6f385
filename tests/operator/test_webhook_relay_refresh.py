"""The relay's policy refresher survives any failure, retries with backoff, and does not flood the log."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest

from llmroute_operator.kubeapi import KubeApiError
from llmroute_operator.webhooks import keep_board_fresh
from llmroute_sidecar.statusboard import StatusBoard

from .conftest import policy_body


class FlakySource:
    """`list_policies` raises the queued errors in turn, then lists one policy with a status page."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def read_policy(self, namespace: str, name: str) -> dict[str, Any] | None:
        return None

    async def list_policies(self) -> list[dict[str, Any]]:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        body = policy_body()
        body["spec"]["providers"][0]["statusPage"] = {"url": "https://status.example/api/v2/summary.json"}
        return [body]


async def test_the_refresher_outlives_connection_errors_and_bugs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="llmroute_operator.webhooks")
    reset = aiohttp.ClientConnectionError("Connection reset by peer")
    source = FlakySource(reset, reset, reset, KubeApiError(503, "Service Unavailable"), RuntimeError("a bug"))
    async with aiohttp.ClientSession() as session:
        board = StatusBoard(session, autostart=False)
        # A long interval: the quick retries below can only come from the backoff after failures.
        refresher = asyncio.create_task(keep_board_fresh(board, source, interval=60, first_retry=0.01))
        try:
            for _ in range(200):
                if board.pollers:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)  # after a success, the next refresh waits for the interval

            assert not refresher.done()
            assert len(board.pollers) == 1
            assert source.calls == 6  # five failures retried, one success, nothing since
        finally:
            refresher.cancel()
            await asyncio.gather(refresher, return_exceptions=True)
            await board.close()

    messages = [r.getMessage() for r in caplog.records]
    problems = [m for m in messages if "cannot refresh the policies" in m]
    assert problems == [  # one line per distinct failure, not one per retry
        "status relay: cannot refresh the policies: ClientConnectionError: Connection reset by peer",
        "status relay: cannot refresh the policies: KubeApiError: Kubernetes API answered 503: Service Unavailable",
        "status relay: cannot refresh the policies: RuntimeError: a bug",
    ]
    assert messages.count("status relay: policies refreshed again") == 1


async def test_the_backoff_doubles_up_to_the_interval() -> None:
    sleeps: list[float] = []
    source = FlakySource(*(KubeApiError(500, "boom") for _ in range(6)))
    real_sleep = asyncio.sleep

    async def recorded_sleep(delay: float) -> None:
        sleeps.append(delay)
        if len(sleeps) >= 7:
            raise asyncio.CancelledError
        await real_sleep(0)

    async with aiohttp.ClientSession() as session:
        board = StatusBoard(session, autostart=False)
        monkey = pytest.MonkeyPatch()
        monkey.setattr("llmroute_operator.webhooks.asyncio.sleep", recorded_sleep)
        try:
            with pytest.raises(asyncio.CancelledError):
                await keep_board_fresh(board, source, interval=0.5, first_retry=0.1)
        finally:
            monkey.undo()
            await board.close()

    assert sleeps == [0.1, 0.2, 0.4, 0.5, 0.5, 0.5, 0.5]  # six failures, then a success waits the interval
