"""Provider API keys, read where the policy says and re-read when they rotate (HOSTILE.md E7).

A key comes from a file (`apiKey.file`: a Kubernetes Secret volume, which the kubelet updates in place
when the Secret changes, or a Docker secret), else from an environment variable (`apiKey.env`, fixed for
the life of the process). The file is checked at most once a second, so rotating a Secret reaches
running sidecars without a restart; its old value keeps serving while the new file is missing or empty
(a half-written update never blanks the key). The key itself is never logged: callers get `current()`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .reloading import Fingerprint, file_fingerprint

RECHECK_SECONDS = 1.0
MAX_KEY_BYTES = 16 * 1024


class KeySource:
    """Where one provider's key lives; `current()` is cheap enough for every request."""

    __slots__ = ("_checked", "_file", "_key", "_stamp")

    def __init__(self, env: str | None = None, file: str | Path | None = None, value: str | None = None) -> None:
        self._file = Path(file) if file is not None else None
        self._key = value
        self._stamp: Fingerprint | None = None
        self._checked = float("-inf")
        if self._file is not None:
            self._reload()
            self._checked = time.monotonic()
        if self._key is None and env is not None:
            self._key = os.environ.get(env) or None

    @classmethod
    def fixed(cls, value: str | None) -> KeySource:
        return cls(value=value)

    def current(self) -> str | None:
        if self._file is not None:
            now = time.monotonic()
            if now - self._checked >= RECHECK_SECONDS:
                self._checked = now
                self._reload()
        return self._key

    def _reload(self) -> None:
        assert self._file is not None
        try:
            stamp = file_fingerprint(self._file)
            if stamp == self._stamp or stamp[-1] > MAX_KEY_BYTES:
                return
            value = Path(stamp[0]).read_bytes().decode("utf-8", "replace").strip()
        except OSError:
            return  # missing or unreadable for now: keep what we have (env or the last good file)
        if value:
            self._key = value
            self._stamp = stamp
