"""Changes the sender used to miss or handle expensively: mtime-only changes, files created by temp and
rename, a source root moved away and back, an include list that matches nothing, a watcher that cannot
start, and a walk of a new folder (never on the event loop thread)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from engine import config
from engine.journal import Journal
from engine.node import SenderNode
from engine.sender import intake
from engine.transport import settings_for
from engine.watch import Watcher
from tests.pair import Pair, wait_for
from tests.test_replication import write_files


def _mtime(p: Path) -> int:
    return os.stat(p).st_mtime_ns


def test_an_mtime_only_change_is_replicated_at_once(pair: Pair) -> None:
    f = write_files(pair.source / "databases" / "room", 3)[1]
    pair.start("receive")
    pair.start("send")
    pair.wait_converged()
    replica = pair.target / "databases" / "room" / f.name

    os.utime(f, ns=(time.time_ns(), 1_600_000_000_123_456_789))  # content unchanged, as `touch -d`, git do
    wait_for(lambda: _mtime(replica) == _mtime(f), 5, "the new mtime on the replica")
    assert _journaled_ops(pair)[-1] == "touch", "the time change was shipped with its content"

    # A replica whose content differs (edited behind our back, same size) answers "stale": the whole
    # file is sent instead, and the replica ends equal to the source.
    replica.write_bytes(b"X" * replica.stat().st_size)
    os.utime(f, ns=(time.time_ns(), 1_600_000_000_999_999_999))
    pair.wait_converged(timeout=10)
    assert _journaled_ops(pair)[-2:] == ["touch", "put"], _journaled_ops(pair)


def _journaled_ops(pair: Pair) -> list[str]:
    j = Journal.open(pair.sender_state / "journal", readonly=True)
    try:
        cur = j.cursor(j.first_seq)
        ops = []
        while (c := cur.next_header()) is not None:
            cur.skip_chunks()
            ops.append(c.op.value)
        cur.close()
        return ops
    finally:
        j.close()


def test_files_created_by_temp_and_rename_cost_no_reconciliation(pair: Pair) -> None:
    dbs = pair.source / "databases"
    for room in range(10):
        write_files(dbs / f"room-{room}", 200)
    pair.start("receive")
    pair.start("send")
    pair.wait_converged(timeout=60)
    time.sleep(1.0)  # let the start-up reconciliations finish
    before = pair.wait_status(lambda st: st["sender"]["connected"], 10, "connected")["sender"]["counters"]

    for i in range(100):
        tmp = dbs / "room-0" / f".meeting-{i}.json.tmp"
        tmp.write_text(f'{{"meeting": "new-{i}"}}', "utf-8")
        os.replace(tmp, dbs / "room-0" / f"new-{i:03d}.json")
    pair.wait_converged(timeout=30)
    time.sleep(1.0)
    after = pair.status()["sender"]["counters"]
    assert after["reconciles"] == before["reconciles"], (
        f"{after['reconciles'] - before['reconciles']} reconciliations for 100 creates\n{pair.log('send')}"
    )
    assert "missing-source" not in pair.log("send"), pair.log("send")


def test_a_source_root_moved_away_and_back_is_reconciled(pair: Pair) -> None:
    files = write_files(pair.source / "databases" / "room", 5)
    pair.start("receive")
    pair.start("send")
    pair.wait_converged()

    away = pair.base / "away"
    os.rename(pair.source, away)
    pair.wait_log("send", "send.source_root_missing")
    (away / "databases" / "room" / files[2].name).write_text('{"edited": "while away"}', "utf-8")
    os.rename(away, pair.source)
    pair.wait_log("send", "send.source_root_back")
    pair.wait_converged(timeout=10)
    assert pair.procs["send"].poll() is None


def test_an_include_list_that_matches_nothing_is_said(pair: Pair) -> None:
    pair.include = ("databasez", "config/config.jsn")
    pair.write_config()
    pair.start("receive")
    pair.start("send")
    pair.wait_log("send", "send.include_matches_nothing")


# ---- in-process: the sender with a watcher that cannot start (a fault at a seam we own) ------------------
class _FailingWatcher(Watcher):
    failures = 2

    def start(self) -> None:
        if _FailingWatcher.failures > 0:
            _FailingWatcher.failures -= 1
            raise OSError(28, "inotify watch limit reached")
        super().start()


def _run_sender(pair: Pair, until: Any, timeout: float = 30) -> SenderNode:
    cfg = config.load(pair.config).need_sender()
    s = SenderNode(cfg, tls=settings_for(cfg))

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(s.run(stop))
        deadline = time.monotonic() + timeout
        while not until(s) and time.monotonic() < deadline and not task.done():
            await asyncio.sleep(0.05)
        stop.set()
        await task

    asyncio.run(main())
    return s


def test_a_watcher_that_cannot_start_is_an_error_retried_and_reconciled(
    pair: Pair, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    write_files(pair.source / "databases" / "room", 3)
    pair.start("receive")
    monkeypatch.setattr(intake, "Watcher", _FailingWatcher)
    _FailingWatcher.failures = 2
    seen_error: list[str] = []

    def done(s: SenderNode) -> bool:
        if s.intake.watch_error:
            seen_error.append(s.intake.watch_error)
            if s.status()["watch_error"] != s.intake.watch_error:
                raise AssertionError("the status does not show the watcher error")
        return bool(seen_error) and s.intake.watch_error is None and pair.converged()

    with caplog.at_level("INFO"):
        s = _run_sender(pair, done)
    assert seen_error and "watch limit" in seen_error[0]
    assert s.intake.watch_error is None, "the watcher was never restored"
    assert s.counters["watch_failures"] == 2
    text = caplog.text
    assert "watch.failed" in text and "watch.restored" in text, text
    assert "reason=watch-failed" in text, "no reconciliation after the failure"
    pair.wait_converged()


def test_a_new_folder_is_walked_off_the_event_loop(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    pair.start("receive")
    (pair.source / "databases").mkdir()
    walked_on: list[str] = []
    real_walk = os.walk

    new = pair.source / "databases" / "new"

    def walk(top: Any, *a: Any, **kw: Any) -> Any:
        if os.fsdecode(top) == str(new):  # the sender's walk of the new folder (not this test's own walks)
            walked_on.append(threading.current_thread().name)
        return real_walk(top, *a, **kw)

    monkeypatch.setattr(os, "walk", walk)

    def made(s: SenderNode) -> bool:
        if s.link.connected and not (pair.source / "databases" / "new").exists():
            tmp = pair.base / "staged"
            write_files(tmp / "sub", 20)
            os.rename(tmp, pair.source / "databases" / "new")  # a folder moved in whole
        return pair.converged() and (pair.target / "databases" / "new" / "sub").is_dir()

    _run_sender(pair, made)
    assert walked_on, "the new folder was never walked"
    assert "MainThread" not in walked_on, f"os.walk ran on the event loop thread: {walked_on}"
    pair.wait_converged()


def test_a_shipped_version_tells_a_new_time_from_new_content() -> None:
    v = intake.pack_version
    d, e = bytes(range(16)), bytes(16)
    assert v(5, -7, d) == v(5, -7, d) and v(5, -7, d) != v(5, -8, d)
    assert intake.same_content(v(5, -7, d), v(5, 1 << 62, d))  # only the time changed: a touch
    assert not intake.same_content(v(5, -7, d), v(5, -7, e))
    assert not intake.same_content(v(5, -7, d), v(6, -7, d))
