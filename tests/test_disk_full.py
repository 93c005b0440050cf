"""A full journal disk on the active: an error in the log and the status, acknowledged segments pruned to
make room, and every change shipped once there is space (real processes, a real tiny tmpfs)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.pair import Pair, file_digest, wait_for
from tests.test_journal_full import tiny_fs

__all__ = ["tiny_fs"]  # the fixture, used by name below


def test_a_full_journal_disk_is_said_and_large_rewrites_still_ship(pair: Pair, tiny_fs: Path) -> None:
    pair.sender_state = tiny_fs / "sender-state"
    pair.sender_extra = "segment_mb = 1"
    pair.write_config()
    big = pair.source / "databases" / "big.bin"
    big.parent.mkdir(parents=True)
    big.write_bytes(os.urandom(1 << 20))
    pair.start("receive")
    pair.start("send")
    pair.wait_converged()

    replica = pair.target / "databases" / "big.bin"
    for i in range(8):  # 8 x 1.5 MiB: far more than the 4 MiB disk holds, with 24 h retention
        big.write_bytes(os.urandom(3 << 19) + bytes([i]))
        wait_for(lambda: file_digest(replica) == file_digest(big), 30, f"rewrite {i} on the replica")
    out = pair.log("send")
    assert "journal.full" in out, f"the disk never filled up (the test proves nothing)\n{out}"
    assert "journal.pruned_for_space" in out or "journal.pruned_under_pressure" in out, out
    assert "journal.writable_again" in out, out
    pair.wait_status(lambda st: st["sender"].get("journal_error") is None, 10, "the error to clear")
    assert pair.procs["send"].poll() is None


def test_a_full_replica_disk_is_retried_with_a_growing_backoff_and_catches_up(
    pair: Pair, tiny_fs: Path
) -> None:
    """The passive's disk is full: each session fails on the receiver's side with nothing acknowledged.
    The sender retries with a growing backoff (not ten times a second: each retry is a connection and a
    manifest walk), and everything lands once there is space."""
    pair.target = tiny_fs / "replica"
    pair.write_config()
    filler = tiny_fs / "filler"
    filler.write_bytes(b"\0" * (3 << 20))
    db = pair.source / "databases" / "r"
    db.mkdir(parents=True)
    for i in range(4):
        (db / f"m{i}.bin").write_bytes(os.urandom(600 << 10))  # 2.4 MiB: more than the 1 MiB left
    pair.start("receive")
    pair.start("send", wait=False)
    wait_for(lambda: "receiver.apply_error" in pair.log("receive"), 30, "the first apply error")
    first = pair.log("receive").count("receiver.apply_error")
    time.sleep(6)
    retries = pair.log("receive").count("receiver.apply_error") - first
    # The pair's retry_max is 0.5 s: at most about 12 sessions in 6 s (a backoff started again at 0.1 s
    # after every session, as before, gave 30 and more).
    assert 1 <= retries <= 16, f"{retries} failed sessions in 6 s (a hot loop?)\n{pair.log('send')[-3000:]}"
    filler.unlink()
    pair.wait_converged()
