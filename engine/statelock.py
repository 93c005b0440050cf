"""The exclusive lock on a state folder: one ``send`` or ``receive`` (or ``journal repair``) per folder.

Two senders appending to one journal corrupt it for good (seqs interleave), and two receivers would apply
into one replica and fight over its position file. So a process that writes a state folder holds an OS lock
on ``<state_dir>/standby.lock`` for its whole life: ``flock`` on POSIX, ``LockFileEx`` on Windows (through
``filelock``, imported here only). The OS releases it when the process ends, however it ends, so a crash
never leaves a stale lock. ``standby.lock.owner`` says who holds it, for the refusal message.

Read-only commands (``status``, ``verify``, ``journal list/check/replay``) never take it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout

from engine.errors import StateLocked

log = logging.getLogger(__name__)

LOCK_FILE = "standby.lock"
OWNER_FILE = "standby.lock.owner"


class StateLock:
    """A held lock on one state folder; :meth:`release` (or leaving the ``with`` block) gives it up."""

    def __init__(self, state_dir: Path, lock: FileLock) -> None:
        self.state_dir = state_dir
        self._lock = lock

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()

    def __enter__(self) -> StateLock:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def acquire(state_dir: Path, command: str) -> StateLock:
    """Take the state folder's lock for ``command`` (e.g. ``"standby send"``) or raise :class:`StateLocked`
    at once, naming the folder and, when known, the process that holds it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(state_dir / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise StateLocked(
            f"state folder {state_dir} is in use by another standby process{_owner(state_dir)}; "
            "one process per state folder (stop the other one first)"
        ) from None
    _write_owner(state_dir, command)
    log.debug("statelock.acquired state_dir=%s command=%r", state_dir, command)
    return StateLock(state_dir, lock)


def _write_owner(state_dir: Path, command: str) -> None:
    info = {"pid": os.getpid(), "command": command, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = state_dir / f"{OWNER_FILE}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(info), "utf-8")
        os.replace(tmp, state_dir / OWNER_FILE)
    except OSError as e:  # only informative: never a reason not to run
        log.debug("statelock.owner_not_written error=%r", e)
        with contextlib.suppress(OSError):
            tmp.unlink()


def _owner(state_dir: Path) -> str:
    try:
        info = json.loads((state_dir / OWNER_FILE).read_text("utf-8"))
        return f" (pid {int(info['pid'])}: {info['command']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""
