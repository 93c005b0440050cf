"""The reconciler's scan and merge, in-process: real files, a real journal, no watcher and no link.

The source is scanned while the receiver's manifest is on its way, so the journal's tail is read after the
scan instead of before it. These tests pin what that must not cost: a change journaled during the scan
never turns into a wrong deletion, a replica file the hash cache has forgotten is hashed (not re-sent),
and a new file is not read twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from engine.config import SenderConfig
from engine.journal import Journal
from engine.model import Change, FileMeta, Op
from engine.plan import diff
from engine.scan import HashCache, build_manifest
from engine.sender.intake import Intake
from engine.sender.reconcile import FOLLOW_UP_DELAY, Reconciler, _Abandoned, _Scan

INCLUDE = ("databases",)


@contextlib.contextmanager
def _reconciler(tmp_path: Path, cache: HashCache) -> Iterator[tuple[Reconciler, Journal]]:
    cfg = SenderConfig(
        source=tmp_path / "src", peer=("127.0.0.1", 1), state_dir=tmp_path / "state", include=INCLUDE
    )
    journal = Journal.open(tmp_path / "state" / "journal")
    try:
        # The scan and the merge use the configuration, the journal and the cache; the intake and the
        # link are what step() talks to, and are not used here.
        yield Reconciler(cfg, journal, cache, cast(Any, None), cast(Any, None), {}), journal
    finally:
        journal.close()


def _write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, "utf-8")


def _replica_of(root: Path) -> list[FileMeta]:
    """The manifest a receiver would send for a replica identical to ``root``."""
    return list(build_manifest(root, INCLUDE, HashCache()).entries.values())


def test_a_folder_renamed_while_the_scan_ran_is_not_deleted_on_the_replica(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for name in ("a.json", "b.json"):
        _write(src, f"databases/old/{name}", name)
    with _reconciler(tmp_path, HashCache()) as (rec, journal):
        before = _replica_of(src)  # the replica as the receiver walked it: databases/old/*
        scan = rec._scan()  # the source as it was when the scan passed: databases/old/*
        # Then the folder is renamed, and the intake journals it (the receiver may apply it or not yet).
        (src / "databases" / "old").rename(src / "databases" / "new")
        journal.append(Change(0, Op.RENAME, "databases/old", dst="databases/new"))
        journal.commit()
        busy = {"databases/old", "databases/new"}  # what the intake touched meanwhile
        for seq, replica in ((0, before), (journal.head, _replica_of(src))):
            m = rec._merge(seq, replica, scan)
            assert "databases/new/a.json" in m.expected
            assert set(m.late) == busy and not m.pruned
            plan = diff(m.source, m.expected, INCLUDE, busy, m.unreadable + m.late)
            assert not [p for _op, p in plan.removals if p.startswith("databases/new")], plan
            # The same merge without the late paths deletes the renamed files: the case is a real one.
            unsafe = diff(m.source, m.expected, INCLUDE, busy, m.unreadable)
            assert ("delete", "databases/new/a.json") in [(op.value, p) for op, p in unsafe.removals]


def test_entries_journaled_before_the_scan_began_are_not_late(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _write(src, "databases/a.json", "a")
    with _reconciler(tmp_path, HashCache()) as (rec, journal):
        journal.append(Change(0, Op.DELETE, "databases/gone.json"))
        journal.commit()
        scan = rec._scan()
        m = rec._merge(0, [], scan)
        assert m.late == [] and not m.pruned
        assert "databases/gone.json" not in m.expected


def test_a_replica_file_the_cache_forgot_is_hashed_and_a_new_file_is_not_read(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _write(src, "databases/kept.json", "same on both")
    _write(src, "databases/changed.json", "new content")
    replica = _replica_of(src)
    _write(src, "databases/added.json", "not on the replica")
    replica = [
        m if m.path != "databases/changed.json" else FileMeta(m.path, False, m.size, m.mtime_ns, b"x" * 16)
        for m in replica
    ]
    cache = HashCache()  # empty: as after a lost hash cache
    with _reconciler(tmp_path, cache) as (rec, _journal):
        scan = rec._scan()
        assert scan.meta("databases/kept.json").digest == b""  # not read by the scan
        m = rec._merge(0, replica, scan)
        plan = diff(m.source, m.expected, INCLUDE, set(), m.unreadable + m.late)
        assert sorted(plan.puts) == ["databases/added.json", "databases/changed.json"]
        assert m.source["databases/kept.json"] is m.expected["databases/kept.json"]  # held once
        assert "databases/kept.json" in cache and "databases/changed.json" in cache
        assert "databases/added.json" not in cache  # read once, by the intake that sends it


def test_a_replica_file_gone_before_it_is_hashed_is_left_out_of_the_source(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _write(src, "databases/kept.json", "v1")
    replica = _replica_of(src)
    with _reconciler(tmp_path, HashCache()) as (rec, _journal):
        scan = rec._scan()
        (src / "databases" / "kept.json").unlink()  # gone before the merge hashes it
        m = rec._merge(0, replica, scan)
        assert "databases/kept.json" not in m.source and m.unstable == []


def test_a_scan_with_its_entries_pruned_removes_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _write(src, "databases/a.json", "a")
    with _reconciler(tmp_path, HashCache()) as (rec, _journal):
        scan = rec._scan()
        # As if the entries journaled since the scan began were already pruned: which paths they named
        # cannot be known, so every include item counts as late.
        pruned = type(scan)(-5, scan.source, scan.unstable, scan.unreadable)
        m = rec._merge(0, [], pruned)
        assert m.late == list(INCLUDE) and m.pruned


def test_the_scan_and_a_writer_may_run_at_once(tmp_path: Path) -> None:
    """The scan runs on a worker thread beside the event loop's appends: it reads the head once."""
    src = tmp_path / "src"
    for i in range(200):
        _write(src, f"databases/f{i}.json", str(i))
    with _reconciler(tmp_path, HashCache()) as (rec, journal):
        lock = threading.Lock()

        def append() -> None:
            for i in range(50):
                with lock:
                    journal.append(Change(0, Op.DELETE, f"databases/x{i}.json"))
                    journal.commit()

        t = threading.Thread(target=append)
        t.start()
        scan = rec._scan()
        t.join()
        m = rec._merge(0, [], scan)
        assert len([p for p in m.source if p.startswith("databases/f")]) == 200
        assert set(m.late) <= {f"databases/x{i}.json" for i in range(50)}
        assert len(m.late) == journal.head - scan.head


# ---- step(): a real intake and journal; the link is a stand-in that hands over a manifest (or fails) ----
class _Link:
    """The one thing step() asks of the link: the receiver's manifest."""

    def __init__(self, manifest: list[FileMeta] | None) -> None:
        self.manifest_entries = manifest  # None: the link goes down before the manifest comes

    async def manifest(self, include: Any, full: bool = False) -> tuple[int, list[FileMeta]]:
        await asyncio.sleep(0)
        if self.manifest_entries is None:
            raise ConnectionError("link down during reconciliation")
        return 0, self.manifest_entries


def _stepper(tmp_path: Path, link: _Link) -> tuple[Reconciler, Journal]:
    cfg = SenderConfig(
        source=tmp_path / "src", peer=("127.0.0.1", 1), state_dir=tmp_path / "state", include=INCLUDE
    )
    (tmp_path / "src" / "databases").mkdir(parents=True, exist_ok=True)
    journal = Journal.open(tmp_path / "state" / "journal")
    cache = HashCache()
    intake = Intake(
        cfg,
        journal,
        threading.Lock(),
        cache,
        {},
        acked=lambda: 0,
        on_appended=lambda: None,
        on_reconcile=lambda _reason: None,
        clock=lambda: 0.0,
    )
    counters: dict[str, int] = {"reconciles": 0}
    return Reconciler(cfg, journal, cache, intake, cast(Any, link), counters), journal


def test_a_step_whose_scan_entries_were_pruned_removes_nothing_and_looks_again(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _write(src, "databases/kept.json", "k")
    replica = _replica_of(src)
    replica.append(FileMeta("databases/stale.json", False, 1, 1, bytes(16)))  # deleted while we were down
    rec, journal = _stepper(tmp_path, _Link(replica))
    real_scan = rec._scan

    def pruned_scan(stop: threading.Event | None = None) -> _Scan:
        s = real_scan(stop)
        return _Scan(-5, s.source, s.unstable, s.unreadable)  # as if its entries were pruned meanwhile

    async def main() -> None:
        rec._scan = pruned_scan  # type: ignore[method-assign]
        report = await rec.step("connect")
        assert report.removals == 0  # which paths changed during the scan cannot be known
        await asyncio.sleep(FOLLOW_UP_DELAY + 0.2)
        assert rec._req.is_set() and rec._reason == "connect+again"
        rec._scan = real_scan  # type: ignore[method-assign]
        again = await rec.step(rec._reason)
        assert again.removals == 1  # the follow-up removes it

    try:
        asyncio.run(main())
    finally:
        journal.close()


def test_a_scan_whose_manifest_never_came_is_stopped_and_ends_before_the_next(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(5000):
        _write(src, f"databases/d{i // 500}/f{i}.json", str(i))
    link = _Link(None)
    rec, journal = _stepper(tmp_path, link)
    running = 0
    most = 0
    lock = threading.Lock()
    real_scan = rec._scan

    def counted_scan(stop: threading.Event | None = None) -> _Scan:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            return real_scan(stop)
        finally:
            with lock:
                running -= 1

    async def main() -> None:
        rec._scan = counted_scan  # type: ignore[method-assign]
        for _ in range(3):  # a flapping link: each manifest request fails
            with pytest.raises(ConnectionError):
                await rec.step("connect")
        abandoned = rec._scanning
        assert abandoned is not None
        await asyncio.wait({abandoned})
        assert isinstance(abandoned.exception(), _Abandoned), "the scan ran on after its step failed"
        link.manifest_entries = []
        report = await rec.step("connect")
        assert report.source_entries == 5000 + 11  # the files, databases and its 10 folders
        assert rec._scanning is None

    try:
        asyncio.run(main())
    finally:
        journal.close()
    assert most == 1, f"{most} scans ran at once"


def test_the_scan_held_beside_the_manifest_costs_under_120_bytes_a_file(tmp_path: Path) -> None:
    """At 100,000 files the scan is held while the receiver's manifest is decoded beside it: as entries
    (about 190 bytes each) it took the sender over its 150 MB goal; packed it is about 85."""
    src = tmp_path / "src"
    for i in range(5000):
        _write(src, f"databases/room-{i // 100:03d}/meeting-{i:06d}.json", "x" * (i % 300))
    cache = HashCache()
    build_manifest(src, INCLUDE, cache)  # the cache knows every file, as after a restart
    with _reconciler(tmp_path, cache) as (rec, _journal):
        rec._scan()  # paths interned, as in a running sender
        tracemalloc.start()
        try:
            scan = rec._scan()
            per = tracemalloc.get_traced_memory()[0] / len(scan.source)
        finally:
            tracemalloc.stop()
        assert per < 120, f"{per:.0f} bytes a file"
        assert all(scan.meta(p).digest for p in scan.source if not scan.meta(p).is_dir)
