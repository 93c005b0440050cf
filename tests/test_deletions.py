"""Live deletions are judged as a burst before any of them is journaled: a wipe never reaches the replica,
an ordinary deletion replicates at once, and a folder deleted and put back leaves nothing halted."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

from engine.config import SenderConfig
from engine.journal import Journal
from engine.model import Op
from engine.plan import DeletionFacts, deletion_release_at, deletion_verdict, small_burst
from engine.scan import HashCache
from engine.sender.intake import Intake, Pending
from tests.pair import Pair, wait_for
from tests.test_replication import files_below, write_files


# ---- the pure verdict ----------------------------------------------------------------------------------
def test_the_verdict_names_each_kind_of_wipe() -> None:
    ok = DeletionFacts(root_present=True, files_deleted=200, replica_files=10_000, peak_files=10_000)
    assert deletion_verdict(ok, 0.5) is None
    assert "root vanished" in (deletion_verdict(DeletionFacts(root_present=False), 0.5) or "")
    gone = DeletionFacts(root_present=True, vanished=("databases",), files_deleted=1, replica_files=100)
    assert "'databases' vanished" in (deletion_verdict(gone, 0.5) or "")
    emptied = DeletionFacts(
        root_present=True, emptied=(("databases", 5),), files_deleted=5, replica_files=100
    )
    assert "emptied" in (deletion_verdict(emptied, 0.5) or "")
    tiny = DeletionFacts(root_present=True, emptied=(("databases", 3),), files_deleted=3, replica_files=3)
    assert deletion_verdict(tiny, 0.5) is None  # a tree of 3 files is not judged
    share = DeletionFacts(root_present=True, files_deleted=300, replica_files=700, peak_files=1000)
    why = deletion_verdict(share, 0.5) or ""
    assert "lose 600 of its 1000 files" in why and "max_delete_share" in why
    churn = DeletionFacts(root_present=True, files_deleted=300, replica_files=1000, peak_files=1100)
    assert deletion_verdict(churn, 0.5) is None  # as many created as deleted meanwhile: no wipe
    small = DeletionFacts(root_present=True, files_deleted=30, replica_files=70, peak_files=100)
    assert deletion_verdict(small, 0.5) is None  # a small tree's churn: fewer than 100 files lost


def test_a_small_burst_is_judged_at_once_and_a_mass_deletion_once_it_slows_down() -> None:
    assert small_burst(1000) == 32 and small_burst(100_000) == 1000
    assert deletion_release_at(10.2, 10.0, 5, 5, 32) == 10.25  # churn: judged at once
    assert deletion_release_at(11.0, 10.0, 1000, 400, 32) == 11.05  # rm -rf under way: look again soon
    assert deletion_release_at(11.3, 10.0, 1000, 3, 32) == 10.25  # it has finished: judge it now
    assert deletion_release_at(19.99, 10.0, 9000, 400, 32) == 20.0  # held at most DELETE_MAX_HOLD


# ---- real pairs -------------------------------------------------------------------------------------------
def _count_files(root: Path) -> int:
    """Files below ``root``; os.walk skips folders that vanish while it runs (a replica being changed)."""
    return sum(len(files) for _d, _s, files in os.walk(root))


def _halted(pair: Pair) -> bool:
    return "send.halted" in pair.log("send")


def test_removing_the_whole_replicated_folder_halts_and_the_replica_keeps_its_files(pair: Pair) -> None:
    dbs = pair.source / "databases"
    for room in range(3):
        write_files(dbs / f"room-{room}", 10)
    pair.start("receive")
    pair.start("send")
    pair.wait_converged()
    replica_before = pair.replica_tree()
    backup = pair.base / "backup"
    shutil.copytree(dbs, backup)

    shutil.rmtree(dbs)
    wait_for(lambda: _halted(pair), 15, "the sender to halt")
    out = pair.log("send")
    assert "databases" in out and "--allow-mass-delete" in out, out
    st = pair.wait_status(lambda st: bool(st["sender"].get("halt")), 10, "the halt in the status")
    assert "databases" in st["sender"]["halt"]
    time.sleep(2)
    assert pair.procs["send"].poll() is None, "a halted sender stays up, holding the deletions"
    assert pair.replica_tree() == replica_before, (
        f"the replica lost {len(set(replica_before) - set(pair.replica_tree()))} of its "
        f"{len(replica_before)} entries\n{pair.all_logs()}"
    )

    # The folder comes back with its files (and one more): the halt clears and replication goes on.
    shutil.copytree(backup, dbs)
    (dbs / "room-0" / "new.json").write_text("{}", "utf-8")
    pair.wait_log("send", "send.halt_cleared")
    pair.wait_converged()
    pair.wait_status(lambda st: st["sender"].get("halt") is None, 10, "the halt to clear in the status")


def test_a_live_rm_rf_of_a_large_tree_deletes_nothing_on_the_replica(pair: Pair) -> None:
    dbs = pair.source / "databases"
    for room in range(20):
        write_files(dbs / f"room-{room:02d}", 100)
    pair.start("receive")
    pair.start("send")
    pair.wait_converged(timeout=60)
    before = len(files_below(pair.target / "databases"))
    assert before == 2000

    subprocess.run(["rm", "-rf", str(dbs)], check=True)
    wait_for(lambda: _halted(pair), 20, "the sender to halt")
    time.sleep(2)
    after = len(files_below(pair.target / "databases"))
    assert after == before, f"{before - after} of {before} replica files were deleted\n{pair.log('send')}"

    # Restarted while halted: nothing is replayed without --allow-mass-delete (the start-up
    # reconciliation halts with exit 3); with it, the deletion is confirmed.
    assert pair.stop("send") == 0, pair.log("send")
    pair.start("send", wait=False)
    assert pair.wait_exit("send", 30) == 3, pair.log("send")
    assert len(files_below(pair.target / "databases")) == before
    dbs.mkdir()  # an empty include folder: the operator confirms the wipe
    pair.start("send", "--allow-mass-delete")
    wait_for(lambda: _count_files(pair.target / "databases") == 0, 30, "the confirmed deletion")


def test_deleting_one_room_of_many_replicates_at_once(pair: Pair) -> None:
    dbs = pair.source / "databases"
    for room in range(10):
        write_files(dbs / f"room-{room}", 100)
    pair.start("receive")
    pair.start("send")
    pair.wait_converged(timeout=60)

    t0 = time.monotonic()
    shutil.rmtree(dbs / "room-3")
    wait_for(lambda: not (pair.target / "databases" / "room-3").exists(), 10, "room-3 to go on the replica")
    took = time.monotonic() - t0
    assert took < 5, f"deleting 100 of 1,000 files took {took:.1f} s to replicate"
    assert not _halted(pair), pair.log("send")
    pair.wait_converged()


def test_deleting_and_recreating_the_folder_leaves_nothing_halted(pair: Pair) -> None:
    dbs = pair.source / "databases"
    for room in range(3):
        write_files(dbs / f"room-{room}", 20)
    pair.start("receive")
    pair.start("send")
    pair.wait_converged()
    backup = pair.base / "backup"
    shutil.copytree(dbs, backup)

    shutil.rmtree(dbs)
    shutil.copytree(backup, dbs)  # a restore from backup, straight after
    (dbs / "room-1" / "f005.json").write_text('{"changed": true}', "utf-8")
    pair.wait_converged()
    time.sleep(1.5)
    pair.wait_status(lambda st: st["sender"].get("halt") is None, 10, "no halt")
    assert pair.procs["send"].poll() is None


def test_deleting_half_the_files_one_room_at_a_time_halts_by_share(pair: Pair) -> None:
    """Deletions spread over several bursts count together within the window."""
    dbs = pair.source / "databases"
    for room in range(10):
        write_files(dbs / f"room-{room}", 30)
    pair.start("receive")
    pair.start("send")
    pair.wait_converged()

    for room in range(6):
        shutil.rmtree(dbs / f"room-{room}")
        time.sleep(1.0)  # each burst (30 files: churn-sized) judged on its own
    wait_for(lambda: _halted(pair), 15, "the sender to halt by share")
    assert "max_delete_share" in pair.log("send")
    left = len(files_below(pair.target / "databases"))
    assert left >= 150, f"only {left} of 300 files left on the replica"


# ---- the gate in-process (a fake clock; no watcher, no link) ----------------------------------------------
def _intake(tmp_path: Path) -> Intake:
    cfg = SenderConfig(source=tmp_path / "src", peer=("127.0.0.1", 1), state_dir=tmp_path / "state")
    (tmp_path / "src" / "databases").mkdir(parents=True)
    journal = Journal.open(tmp_path / "state" / "journal")
    return Intake(
        cfg,
        journal,
        threading.Lock(),
        HashCache(),
        {},
        acked=lambda: 0,
        on_appended=lambda: None,
        on_reconcile=lambda _reason: None,
        clock=lambda: 0.0,
    )


def test_deletions_queued_while_a_burst_was_judged_are_judged_in_their_turn(tmp_path: Path) -> None:
    """After a burst is approved its bookkeeping is reset; a deletion queued meanwhile must still come to
    judgement (it was once postponed for ever: each look started its quiet time again)."""
    intake = _intake(tmp_path)
    try:
        intake.ops.append(Pending(Op.DELETE, "databases/a.json"))
        intake._del_first = None  # as right after an approval, with this one queued during it
        n, at, judge = intake._gate(100.0)
        assert (n, judge) == (0, False) and at == 100.25
        n, at, judge = intake._gate(100.3)
        assert judge, "the deletion is never judged"
    finally:
        intake.journal.close()


def test_a_reconciliation_restarts_the_share_window_from_the_counted_replica(tmp_path: Path) -> None:
    """The count between reconciliations drifts (after a restart a put is taken for a new file when the
    hash cache does not know it): an old, drifted peak must not make ordinary deletions look like a wipe
    (the sender kill loop halted on 'lose 1276 of its 1873 files' with 600 on the replica)."""
    intake = _intake(tmp_path)
    (tmp_path / "src" / "databases" / "kept.json").write_text("{}", "utf-8")  # not emptied
    try:
        ops = [Pending(Op.DELETE, f"databases/r/{i}.json") for i in range(120)]
        facts, _ = intake._deletion_facts(ops, 0)
        assert facts.replica_files == 0 and deletion_verdict(facts, 0.5) is None  # not counted yet
        intake._replica_files = 1873
        intake._counts.append((0.0, 1873))
        intake.queue_plan([], [], [], [], intake.mark(), 600)
        peak = max(c for _t, c in intake._counts)
        facts, _ = intake._deletion_facts(ops, peak)
        assert (facts.replica_files, facts.peak_files) == (600, 600)
        assert deletion_verdict(facts, 0.5) is None  # 120 of 600
    finally:
        intake.journal.close()
