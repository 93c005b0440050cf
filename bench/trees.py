"""Comparing a source tree with a replica: cheap checks while waiting, bytes once at the end.

Owns: walking a tree into ``{relative path: (size, mtime_ns)}``, waiting until a replica matches the source
(stat only the paths still pending, so a poll costs little; then one full walk and a byte-for-byte compare
to confirm, outside the timed part), polling one file until it holds given bytes, and the SHA-256 of a file
read in pieces (a large file is checked by its hash once, never read whole into memory).

"Identical" means: the same folders, the same files, each with the same size, modification time and bytes.
Temporary files a tool leaves while working count as differences, so a replica is identical only once the
tool has finished.

Must not: start processes or write anywhere.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

FileStat = tuple[int, int]  # size, mtime_ns


@dataclass(frozen=True)
class Snapshot:
    files: dict[str, FileStat]
    dirs: frozenset[str]


def snapshot(root: Path, mtime_step: int = 1) -> Snapshot:
    """The tree at ``root``; mtimes rounded down to ``mtime_step`` ns (a replica that keeps coarser times,
    an SMB share's 100 ns, is compared at its own resolution)."""
    files: dict[str, FileStat] = {}
    dirs: set[str] = set()

    def walk(path: str, prefix: str) -> None:
        try:
            entries = list(os.scandir(path))
        except FileNotFoundError:
            return
        for e in entries:
            rel = prefix + e.name
            try:
                if e.is_dir(follow_symlinks=False):
                    dirs.add(rel)
                    walk(e.path, rel + "/")
                else:
                    st = e.stat(follow_symlinks=False)
                    files[rel] = (st.st_size, st.st_mtime_ns - st.st_mtime_ns % mtime_step)
            except FileNotFoundError:
                continue

    walk(str(root), "")
    return Snapshot(files, frozenset(dirs))


def stat_of(path: Path, mtime_step: int = 1) -> FileStat | None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_size, st.st_mtime_ns - st.st_mtime_ns % mtime_step)


def read_or_none(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def differences(source: Path, replica: Path, limit: int = 10, mtime_step: int = 1) -> list[str]:
    """Paths where the replica is not identical to the source (bytes compared), at most ``limit``."""
    s, r = snapshot(source, mtime_step), snapshot(replica, mtime_step)
    out: list[str] = []
    for d in sorted(s.dirs ^ r.dirs):
        out.append(f"{d}/ ({'missing' if d in s.dirs else 'extra'} folder)")
    for p in sorted(set(s.files) | set(r.files)):
        if len(out) >= limit:
            break
        a, b = s.files.get(p), r.files.get(p)
        if b is None:
            out.append(f"{p} (missing)")
        elif a is None:
            out.append(f"{p} (extra)")
        elif a != b:
            out.append(f"{p} (size/mtime {b} instead of {a})")
        elif read_or_none(source / p) != read_or_none(replica / p):
            out.append(f"{p} (bytes differ)")
    return out[:limit]


class ReplicaTimeout(Exception):
    """The replica did not become identical in time; the message names some differences."""

    def __init__(self, message: str, stale: int = 0) -> None:
        super().__init__(message)
        self.stale = stale


def expect(source: Path, paths: list[str]) -> dict[str, FileStat | None]:
    """What the replica must hold at ``paths`` (None: nothing), read from the source's metadata."""
    return {p: stat_of(source / p) for p in paths}


def wait_identical(
    source: Path,
    replica: Path,
    timeout: float,
    expected: dict[str, FileStat | None] | None = None,
    interval: float = 0.002,
    activity: Callable[[], float] | None = None,
    idle_window: float = 0.0,
    idle_grace: float = 0.0,
    mtime_step: int = 1,
    confirm: bool = True,
) -> float:
    """Wait until ``replica`` is identical to ``source`` (which must not change meanwhile), mtimes
    compared to ``mtime_step`` ns (``expected`` then holds them rounded down to it too).

    ``expected`` is what the replica must hold, by path: the whole tree (a :func:`snapshot`'s files, taken
    before the clock started) or only what the caller changed (:func:`expect`). Polls the size and mtime of
    the paths still pending, then confirms with a full walk and a byte compare, which is not timed. The
    poll sleeps at least four times as long as a round took, so the poller never takes more than a fifth
    of a core from the tool it watches; rounds get cheaper, and so finer, as the replica completes.

    With ``activity`` (the tool's CPU seconds so far), give up early once, ``idle_grace`` seconds or more
    after the call, the tool has used less than 20 ms of CPU in the last ``idle_window`` seconds while the
    replica still differs: it has stopped working, and waiting longer shows nothing.

    With ``confirm`` False, the paths of ``expected`` holding their size and mtime is enough: no walk and no
    byte compare (a caller that checks a large file by its hash, once, after).

    Returns the ``time.perf_counter()`` of the poll that first saw every path complete.
    """
    start = time.perf_counter()
    deadline = start + timeout
    want = snapshot(source, mtime_step).files if expected is None else expected
    pending: dict[str, FileStat | None] = dict(want)
    marks: list[tuple[float, float]] = []
    while True:
        now = time.perf_counter()
        for rel, w in list(pending.items()):
            if stat_of(replica / rel, mtime_step) == w:
                del pending[rel]
        if not pending:
            if not confirm or not differences(source, replica, limit=1, mtime_step=mtime_step):
                return now
            # Something beyond the expected paths differs: fall back to the whole tree.
            pending = dict(snapshot(source, mtime_step).files)
        idle = False
        if activity is not None and idle_window > 0:
            marks.append((now, activity()))
            while len(marks) > 1 and marks[1][0] <= now - idle_window:
                marks.pop(0)
            idle = (
                now >= start + idle_grace
                and marks[0][0] <= now - idle_window
                and marks[-1][1] - marks[0][1] < 0.02
            )
        if now > deadline or idle:
            diff = differences(source, replica, limit=1_000_000, mtime_step=mtime_step)
            why = f"the tool was idle for {idle_window:g} s" if idle else f"{timeout:g} s passed"
            raise ReplicaTimeout(
                f"not identical ({why}): {len(diff)} paths differ, e.g. {'; '.join(diff[:3]) or 'pending'}",
                len(diff),
            )
        took = time.perf_counter() - now
        time.sleep(max(interval, 4 * took))


def wait_bytes(path: Path, data: bytes, timeout: float, interval: float = 0.0005) -> float | None:
    """Poll ``path`` until it holds exactly ``data``; the ``perf_counter()`` then, or None on timeout."""
    deadline = time.perf_counter() + timeout
    while True:
        now = time.perf_counter()
        if read_or_none(path) == data:
            return now
        if now > deadline:
            return None
        time.sleep(interval)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str | None:
    """The SHA-256 of the file at ``path`` (hex), read ``chunk`` bytes at a time; None if it is missing."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while b := f.read(chunk):
                h.update(b)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    return h.hexdigest()
