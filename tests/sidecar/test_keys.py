"""Provider keys: from a file that rotates (a Kubernetes Secret volume) or the environment (HOSTILE E7)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aiohttp
import pytest

from llmroute_sidecar import keys
from llmroute_sidecar.keys import KeySource
from llmroute_sidecar.simulator.fakes import FakeProvider

from .harness import policy_document, running_sidecar


def kubelet_write(directory: Path, name: str, value: str, version: int) -> None:
    """What the kubelet does on a Secret update: write a new timestamped dir, swap the `..data` link."""
    fresh = directory / f"..v{version}"
    fresh.mkdir()
    (fresh / name).write_text(value)
    link = directory / "..data_tmp"
    link.symlink_to(fresh.name)
    os.replace(link, directory / "..data")
    if not (directory / name).is_symlink():
        (directory / name).symlink_to(f"..data/{name}")


def test_a_rotated_file_is_picked_up_and_a_broken_update_keeps_the_last_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keys, "RECHECK_SECONDS", 0.0)
    kubelet_write(tmp_path, "claude", "sk-old\n", 1)
    source = KeySource(env="UNSET_VARIABLE_FOR_TEST", file=tmp_path / "claude")
    assert source.current() == "sk-old"  # trailing newline of `kubectl create secret --from-file` gone

    kubelet_write(tmp_path, "claude", "sk-new", 2)
    assert source.current() == "sk-new"

    kubelet_write(tmp_path, "claude", "", 3)  # half-written or emptied: never blank the key
    assert source.current() == "sk-new"


def test_the_environment_serves_until_the_file_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keys, "RECHECK_SECONDS", 0.0)
    monkeypatch.setenv("TEST_KEY_FROM_ENV", "sk-env")
    source = KeySource(env="TEST_KEY_FROM_ENV", file=tmp_path / "missing")
    assert source.current() == "sk-env"
    (tmp_path / "missing").write_text("sk-file")
    assert source.current() == "sk-file"


def test_the_file_is_checked_at_most_once_per_interval(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("sk-1")
    source = KeySource(file=path)
    path.write_text("sk-2-longer")
    assert source.current() == "sk-1"  # within RECHECK_SECONDS of the first read: no stat at all


async def test_a_running_sidecar_sends_the_rotated_key_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keys, "RECHECK_SECONDS", 0.05)
    kubelet_write(tmp_path, "claude", "sk-ant-first", 1)
    async with FakeProvider("claude") as primary, FakeProvider("gpt") as fallback:
        document = policy_document(primary.url, fallback.url)
        document["spec"]["providers"][0]["apiKey"] = {"file": str(tmp_path / "claude")}
        async with running_sidecar(document) as (url, _), aiohttp.ClientSession() as session:

            async def key_sent() -> str:
                async with session.post(f"{url}/v1/routes/summarize", json={"variables": {"text": "hi"}}) as r:
                    assert r.status == 200
                return primary.requests[-1].headers["x-api-key"]

            assert await key_sent() == "sk-ant-first"
            kubelet_write(tmp_path, "claude", "sk-ant-rotated", 2)
            sent = [await key_sent() for _ in range(3)]  # at most RECHECK_SECONDS of the old key
            deadline = time.monotonic() + 5
            while sent[-1] != "sk-ant-rotated" and time.monotonic() < deadline:
                await asyncio.sleep(0.02)  # a request every 20 ms until the rotation shows
                sent.append(await key_sent())
            assert sent[-1] == "sk-ant-rotated"
            assert set(sent) <= {"sk-ant-first", "sk-ant-rotated"}
            assert fallback.count() == 0
