"""A full journal disk: JournalFull, a journal left consistent, and room made by pruning under pressure.

Runs on a real tiny file system (a tmpfs of a few MiB, mounted here as root: see COMPONENTS.md), so the
ENOSPC comes from the kernel, part way through a write. Without root or mount the tests skip, except under
CI=true, where that is a failure. The failing fsync (which tmpfs never gives) is injected at the journal's
own ``_fsync`` seam.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from engine.errors import JournalError, JournalFull
from engine.journal import Journal, scan_segment
from tests.conftest import skip_or_fail
from tests.test_journal import delete, entries, jopen, last_segment, put, snapshot, stream_put

KIB = 1 << 10
MIB = 1 << 20


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, mounted for this test."""
    where = tmp_path / "tiny"
    where.mkdir()
    reason = ""
    if os.name != "posix" or os.geteuid() != 0:
        reason = "mounting a tiny tmpfs needs root on Linux"
    elif shutil.which("mount") is None:
        reason = "no mount command"
    else:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0777", "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            reason = f"mount -t tmpfs failed: {r.stderr.strip()}"
    if reason:
        skip_or_fail(reason, "CI=true: the disk-full tests must run")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(path: Path) -> int:
    """Write a file until the disk is full; return how many bytes fit."""
    n = 0
    with open(path, "wb", buffering=0) as f:
        block = b"\xaa" * (64 * KIB)
        try:
            while True:
                n += f.write(block) or 0
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return n


def check_consistent(folder: Path, head: int) -> None:
    """What another process sees: exactly ``head`` entries, no torn tail, no damage."""
    with closing(jopen(folder, readonly=True)) as other:
        assert other.head == head
        seg = last_segment(other)
        scan = scan_segment(seg, other.id, other.segments()[-1][1])
        assert scan.problem == "" and scan.end == scan.size, scan
        assert [e.change.seq for e in entries(other, other.first_seq)] == list(
            range(other.first_seq, head + 1)
        )


def test_a_put_that_fills_the_disk_leaves_nothing_and_pressure_pruning_makes_room(tiny_fs: Path) -> None:
    folder = tiny_fs / "j"
    small = bytes(range(256)) * 256  # 64 KiB
    big = os.urandom(2 * MIB + 100 * KIB)  # three chunks
    with closing(jopen(folder, fsync=True, segment_bytes=256 * KIB)) as j:
        for i in range(34):  # about 2.2 MiB in nine segments, the last one not full
            j.append(put(f"s{i}", small), small)
            j.commit()
        head = j.head
        segs = len(j.segments())
        assert segs >= 8
        seg = last_segment(j)
        before = snapshot(folder)

        with pytest.raises(JournalFull) as exc:
            stream_put(j, "big", big, step=300 * KIB)
        assert isinstance(exc.value, JournalError)
        assert "disk full" in str(exc.value) and str(seg) in str(exc.value)
        assert (j.pending, j.head) == (head, head)
        assert snapshot(folder) == before, "nothing of the failed put is left"
        check_consistent(folder, head)

        # The space the failed put took is back: a small append works.
        assert j.append(delete("after")).seq == head + 1
        assert j.commit() == head + 1
        with pytest.raises(JournalFull):
            stream_put(j, "big", big)
        assert j.pending == head + 1

        # Pruning by age frees nothing (every segment is minutes old at most); under pressure, every
        # acknowledged segment goes whatever its age, but never the one being written.
        cutoff = time.time() - 3600
        assert j.prune(acked=j.head, keep_after_mtime=cutoff) == 0
        assert j.prune(acked=j.head, keep_after_mtime=cutoff, pressure=True) == segs - 1
        assert len(j.segments()) == 1
        done = stream_put(j, "big", big)
        assert done is not None and done.seq == head + 2
        assert j.commit() == head + 2
        got = entries(j, j.first_seq)
        assert got[-1].change.path == "big" and b"".join(got[-1].chunks) == big
    with closing(jopen(folder, fsync=True, segment_bytes=256 * KIB)) as j:
        assert j.head == head + 2
    check_consistent(folder, head + 2)


def test_small_appends_on_a_full_disk_keep_what_was_appended_before(tiny_fs: Path) -> None:
    folder = tiny_fs / "j"
    entry = bytes(40 * KIB)
    with closing(jopen(folder, fsync=True)) as j:
        made = []
        with pytest.raises(JournalFull):
            for i in range(200):  # 8 MiB would not fit: the disk fills part way through one
                made.append(j.append(put(f"f{i}", entry), entry))
        assert made and j.pending == made[-1].seq, "the entries before the failing one stay appended"
        seg = last_segment(j)
        assert scan_segment(seg, j.id, 1).end == seg.stat().st_size, "nothing half written"
        assert j.commit() == made[-1].seq
        assert [e.change for e in entries(j)] == made
    check_consistent(folder, made[-1].seq)


def test_a_new_segment_on_a_full_disk_is_not_left_behind(tiny_fs: Path) -> None:
    folder = tiny_fs / "j"
    with closing(jopen(folder, fsync=True, segment_bytes=8 * KIB)) as j:
        j.append(put("a", bytes(9 * KIB)), bytes(9 * KIB))  # past segment_bytes: the next append rotates
        j.commit()
        fill(tiny_fs / "filler")
        names = sorted(p.name for p in folder.iterdir())
        with pytest.raises(JournalFull):
            j.append(delete("b"))
        assert sorted(p.name for p in folder.iterdir()) == names
        assert (j.pending, j.head, len(j.segments())) == (1, 1, 1)
        (tiny_fs / "filler").unlink()
        assert j.append(delete("b")).seq == 2
        assert j.commit() == 2
        assert len(j.segments()) == 2
    check_consistent(folder, 2)


class FailingFsync(Journal):
    """A journal whose next fsyncs fail with ``errno`` (tmpfs never fails one)."""

    fail_with = 0

    def _fsync(self, f: io.FileIO) -> None:
        if self.fail_with:
            code, self.fail_with = self.fail_with, 0
            raise OSError(code, os.strerror(code))
        super()._fsync(f)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
def test_a_failed_fsync_drops_the_uncommitted_group(tmp_path: Path, code: int) -> None:
    folder = tmp_path / "j"
    with closing(FailingFsync.open(folder, fsync=True)) as j:
        assert isinstance(j, FailingFsync)
        j.append(delete("a"))
        assert j.commit() == 1
        before = snapshot(folder)
        j.append(delete("b"))
        j.append(put("c", b"sea"), b"sea")
        j.fail_with = code
        with pytest.raises(JournalError) as exc:
            j.commit()
        assert isinstance(exc.value, JournalFull) == (code != errno.EIO)
        # The kernel may have dropped pages it could not write: nothing since the last commit is trusted.
        assert (j.pending, j.head) == (1, 1)
        assert snapshot(folder) == before
        assert j.append(delete("d")).seq == 2
        assert j.commit() == 2
        assert [e.change.path for e in entries(j)] == ["a", "d"]
    check_consistent(folder, 2)
