"""A full journal disk on the sender keeps the checkpoint chain while it can (``Intake._journal_full``).

Under pressure, acknowledged segments are pruned whatever their age, but first only up to the newest
checkpoint, so that the next checkpoint can still be built from it and the entries after it, and a
whole-set replay still works. Only when that frees nothing are the segments after the checkpoint pruned
too: ``checkpoint.chain_broken`` is logged and the intake forgets its newest checkpoint.

Real parts: a sender running in this process (so that its journal, intake and counters are in reach), the
pair's receiver as a process on 127.0.0.1, real files, and the sender's state folder (journal and
checkpoints, fsync on) on a real 4 MiB tmpfs (``tiny_fs``), so the ENOSPC comes from the kernel. The disk is
filled by a file beside the state folder, leaving less room than the next put needs. One seam is stepped
by hand: the intake's housekeeping (checkpoint chores, at most once a PRUNE_INTERVAL) is made due now, so
that the one checkpoint is built where the test needs it; with ``checkpoint_minutes = 60`` no other is.

Segments are 1 MiB (the smallest setting) and each version of ``a.bin`` is 400 KiB: three versions take a
segment past its size, so the entry after them starts a new segment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from pathlib import Path

import pytest

from engine import checkpoint, config
from engine.journal import Journal
from engine.node import SenderNode
from engine.replay import replay
from engine.transport import settings_for
from tests.pair import Pair
from tests.test_journal_full import tiny_fs

__all__ = ["tiny_fs"]  # the fixture, used by name below

KIB = 1 << 10
VERSION = 400 * KIB  # three versions of a.bin take a 1 MiB segment past its size
LEFT_FREE = 64 * KIB  # room left on the full disk: less than LATE
LATE = 300 * KIB  # the put that finds the disk full (fits once one segment is pruned)
# No age-based pruning (24 h retention) and no checkpoint but the one the test asks for (60 min cadence).
SENDER_EXTRA = "segment_mb = 1\njournal_retain_hours = 24\ncheckpoint_minutes = 60"


def files(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below ``root``: relative path -> (content, mtime_ns)."""
    out: dict[str, tuple[bytes, int]] = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            full = Path(dirpath) / name
            out[full.relative_to(root).as_posix()] = (full.read_bytes(), full.stat().st_mtime_ns)
    return out


def content(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def fill_all_but(where: Path, left: int) -> Path:
    """A file on ``where``'s file system taking all its free space but ``left`` bytes (synced)."""
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    assert free > left, f"the disk is full already ({free} bytes free)"
    filler = where / "filler"
    with open(filler, "wb") as f:
        f.write(bytes(free - left))
        f.flush()
        os.fsync(f.fileno())
    return filler


class Sender:
    """A sender running in this process, and the steps the tests take with it."""

    def __init__(self, pair: Pair, node: SenderNode, task: asyncio.Task[None]) -> None:
        self.pair = pair
        self.node = node
        self.task = task

    async def until(self, cond: Callable[[], bool], what: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if self.task.done():
                self.task.result()  # raises what stopped it
                raise AssertionError(f"the sender stopped while waiting for {what}\n{self.pair.all_logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout} s waiting for {what}\n{self.pair.all_logs()}"
                )
            await asyncio.sleep(0.05)

    def all_acked(self) -> bool:
        return self.node.link.acked.seq == self.node.journal.head

    async def write(self, rel: str, data: bytes) -> None:
        """Write a source file; wait until the replica has it and every entry is acknowledged."""
        await asyncio.to_thread(write_file, self.pair.source / rel, data)
        replica = self.pair.target / rel
        await self.until(lambda: content(replica) == data and self.all_acked(), f"{rel} on the replica")

    async def checkpoint_now(self, rel: str) -> int:
        """Make the intake's housekeeping due (as if PRUNE_INTERVAL had passed), journal ``rel`` so that it
        runs, and wait for the checkpoint it builds at the head. The checkpoint's seq."""
        intake = self.node.intake
        assert intake._ck_newest == 0 and intake._ck_task is None, "a checkpoint was built before"
        intake._last_prune = -math.inf
        await self.write(rel, rel.encode())
        await self.until(
            lambda: intake._ck_task is not None and intake._ck_task.done() and intake._ck_newest > 0,
            "the checkpoint",
        )
        assert intake._ck_task is not None
        intake._ck_task.result()
        cks = checkpoint.list_checkpoints(checkpoint.folder_of(self.node.cfg.state_dir))
        assert [c.seq for c in cks] == [intake._ck_newest], cks
        return intake._ck_newest

    def segment_starts(self) -> list[int]:
        return [first for _path, first in self.node.journal.segments()]

    async def disk_full_episode(self, where: Path) -> Path:
        """Fill ``where`` but LEFT_FREE bytes, then write a file the journal has no room for: it is
        journaled (and replicated) once pressure pruning made room. The filler (left in place)."""
        filler = await asyncio.to_thread(fill_all_but, where, LEFT_FREE)
        full_before = self.node.counters["journal_full"]
        await self.write("databases/late.bin", os.urandom(LATE))
        assert self.node.counters["journal_full"] > full_before, "the disk never filled up (proves nothing)"
        assert self.node.intake.journal_error is None, "the journal error was never cleared"
        return filler


@contextlib.asynccontextmanager
async def running_sender(pair: Pair) -> AsyncIterator[Sender]:
    cfg = config.load(pair.config).need_sender()
    node = SenderNode(cfg, tls=settings_for(cfg))
    stop = asyncio.Event()
    task = asyncio.create_task(node.run(stop))
    sender = Sender(pair, node, task)
    try:
        await sender.until(lambda: node.link.connected, "the sender to connect")
        yield sender
    finally:
        stop.set()
        await task


def set_up(pair: Pair, tiny_fs: Path, caplog: pytest.LogCaptureFixture) -> Path:
    """The pair with the sender's state folder on the tiny disk, the receiver started. The state folder."""
    caplog.set_level(logging.INFO)
    pair.sender_state = tiny_fs / "sender-state"
    pair.sender_extra = SENDER_EXTRA
    pair.write_config()
    (pair.source / "databases").mkdir()
    pair.start("receive")
    return pair.sender_state


def test_a_full_disk_prunes_up_to_the_newest_checkpoint_first_and_the_chain_goes_on(
    pair: Pair, tiny_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = set_up(pair, tiny_fs, caplog)

    async def scenario() -> tuple[int, int, Path]:
        async with running_sender(pair) as s:
            for _ in range(3):
                await s.write("databases/a.bin", os.urandom(VERSION))  # segment 1, past its size
            ck = await s.checkpoint_now("databases/tick.txt")  # the first entry of segment 2
            for _ in range(3):
                await s.write("databases/a.bin", os.urandom(VERSION))  # segment 2, past its size
            await s.write("databases/b.txt", b"in segment 3")
            starts = s.segment_starts()
            # Pruning up to the checkpoint frees segment 1; segment 2 is acknowledged too (only the
            # checkpoint keeps it).
            assert len(starts) == 3 and starts[1] - 1 <= ck < starts[2] - 1, (starts, ck)

            filler = await s.disk_full_episode(tiny_fs)
            assert s.node.journal.first_seq == starts[1], "only the segment before the checkpoint went"
            assert s.node.intake._ck_newest == ck
            await s.until(pair.converged, "the replica to equal the source")
            return ck, s.node.journal.head, filler

    ck, head, filler = asyncio.run(scenario())
    text = caplog.text
    assert "journal.full" in text and "journal.pruned_for_space segments=1" in text, text
    assert "checkpoint.chain_broken" not in text, text

    # A whole-set replay to the head starts from the checkpoint and equals the source byte for byte.
    out = pair.base / "replayed"
    res = replay(state / "journal", out)
    assert (res.checkpoint, res.last) == (ck, head), res
    want = files(pair.source)
    assert files(out) == want

    # The chain goes on: the next checkpoint is built from this one and the entries kept after it.
    filler.unlink()  # room for its copies
    built = checkpoint.build(state / "journal", checkpoint.folder_of(state))
    assert built is not None and built.seq == head
    assert files(built.tree) == want
    with closing(Journal.open(state / "journal", fsync=False, readonly=True)) as j:
        usable = checkpoint.usable(checkpoint.list_checkpoints(checkpoint.folder_of(state)), j)
    assert [c.seq for c in usable] == [ck, head]


def test_when_that_frees_nothing_the_segments_after_the_checkpoint_go_and_the_chain_break_is_said(
    pair: Pair, tiny_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = set_up(pair, tiny_fs, caplog)

    async def scenario() -> tuple[int, list[int]]:
        async with running_sender(pair) as s:
            await s.write("databases/a.bin", os.urandom(VERSION))
            ck = await s.checkpoint_now("databases/tick.txt")  # in segment 1
            for _ in range(5):  # two more versions in segment 1, past its size; three in segment 2
                await s.write("databases/a.bin", os.urandom(VERSION))
            await s.write("databases/b.txt", b"in segment 3")
            starts = s.segment_starts()
            # No segment lies wholly before the checkpoint: pruning up to it frees nothing.
            assert len(starts) == 3 and ck < starts[1] - 1, (starts, ck)

            await s.disk_full_episode(tiny_fs)
            assert s.node.journal.first_seq == starts[2], "every acknowledged segment went"
            assert s.node.intake._ck_newest == 0, (
                "the intake still counts on a checkpoint it cannot go on from"
            )
            # Nothing is lost from the replica: the put that found the disk full arrived (waited for in
            # disk_full_episode), and so did everything before it.
            await s.until(pair.converged, "the replica to equal the source")
            return ck, starts

    ck, starts = asyncio.run(scenario())
    text = caplog.text
    assert f"checkpoint.chain_broken up_to={starts[2]}" in text, text
    assert "journal.pruned_for_space segments=2" in text, text
    assert files(pair.target) == files(pair.source)
    # The old checkpoint is still on disk, but the journal no longer goes on from it.
    cks = checkpoint.list_checkpoints(checkpoint.folder_of(state))
    assert [c.seq for c in cks] == [ck]
    with closing(Journal.open(state / "journal", fsync=False, readonly=True)) as j:
        assert j.first_seq == starts[2]
        assert checkpoint.usable(cks, j) == []
