"""Watching the policy file: apply valid changes, refuse broken ones, never crash-loop.

In a cluster the file is a ConfigMap volume: the kubelet writes a new timestamped directory and swaps
the `..data` symlink atomically (HOSTILE.md E2), so the file's resolved path changes while its own
mtime may not. The watcher therefore compares the resolved path *and* stat data, polled (cheap, and
immune to inotify's missed events on symlink swaps). A half-written or invalid file is refused: the
last good policy keeps serving and `/status` shows the error; the next good write applies. Even an
unexpected failure while applying a policy is a refusal (shown, counted), never a crash at startup.

A path that cannot be read at all (gone, a directory, a symlink loop, no permission) is a state, not an
event: it is logged, shown on `/status` and counted once when it begins or changes, not on every poll,
and once more (at info) when the file is readable again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

import orjson

from .policy import LoadedPolicy, PolicyError, parse_policy_text

log = logging.getLogger("llmroute.reload")

Fingerprint = tuple[str, int, int, int, int]


def file_fingerprint(path: str | os.PathLike[str]) -> Fingerprint:
    """What changes when a mounted file is rewritten or swapped (the kubelet's `..data` symlink swap
    changes the resolved path and inode; an in-place write changes mtime or size): the resolved path,
    device, inode, mtime and size. Raises OSError when the file cannot be found."""
    resolved = os.path.realpath(path)
    info = os.stat(resolved)
    return (resolved, info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)


class PolicyWatcher:
    def __init__(
        self,
        path: Path,
        apply: Callable[[LoadedPolicy], None],
        refuse: Callable[[str], None],
        interval: float = 1.0,
    ) -> None:
        self.path = path
        self._apply = apply
        self._refuse = refuse
        self.interval = interval
        self._seen: Fingerprint | None = None
        self._unreadable: str | None = None
        """Why the path cannot be read now (None: it can); logged and refused once per change."""
        self._task: asyncio.Task[None] | None = None

    def _fingerprint(self) -> tuple[Fingerprint | None, str | None]:
        """The file's fingerprint, or why the path holds no file to read."""
        try:
            info = os.stat(self.path)
            if not stat.S_ISREG(info.st_mode):
                return None, "is a directory" if stat.S_ISDIR(info.st_mode) else "is not a regular file"
            return file_fingerprint(self.path), None
        except OSError as exc:
            return None, _unreadable_reason(self.path, exc)

    def _cannot_read(self, reason: str) -> None:
        self._seen = None  # whatever comes back is read afresh
        if reason == self._unreadable:
            return  # the same state as at the last poll: said already
        self._unreadable = reason
        log.warning(orjson.dumps({"event": "policy_unreadable", "path": str(self.path), "reason": reason}).decode())
        self._refuse(f"policy file {self.path} {reason}")

    def load_now(self) -> bool:
        """Read, validate and apply the file if it changed; True when a new policy was applied."""
        fingerprint, reason = self._fingerprint()
        if fingerprint is None:
            self._cannot_read(reason or "cannot be read")
            return False
        if self._unreadable is not None:
            log.info(orjson.dumps({"event": "policy_readable", "path": str(self.path)}).decode())
            self._unreadable = None
        if fingerprint == self._seen:
            return False
        self._seen = fingerprint
        try:
            text = Path(fingerprint[0]).read_bytes()
            policy = parse_policy_text(text)
            self._apply(policy)
        except PolicyError as exc:
            message = "; ".join(exc.problems)
            log.warning("policy refused, keeping the last good one: %s", message)
            self._refuse(message)
            return False
        except OSError as exc:
            self._cannot_read(_unreadable_reason(self.path, exc))
            return False
        except Exception as exc:  # a bug must not crash startup or freeze reloads silently: refuse, show it
            log.exception("policy could not be applied, keeping the last good one")
            self._refuse(f"policy could not be applied: {type(exc).__name__}")
            return False
        log.info("policy applied from %s", self.path)
        return True

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.load_now()
            except Exception:  # a watcher that dies silently would freeze the config: log and go on
                log.exception("policy watcher failed; retrying")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _unreadable_reason(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "is a symlink loop"
    if exc.errno == errno.ENOENT:
        return "is a symlink to nothing" if os.path.islink(path) else "does not exist"
    if exc.errno == errno.EISDIR:
        return "is a directory"
    return f"cannot be read: {exc.strerror or type(exc).__name__}"
