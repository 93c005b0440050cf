"""One process per state folder: the OS lock, and what ``standby`` does when it is held.

Two ``standby send`` on one state folder interleaved their seqs in one journal and corrupted it for good
(``expected seq 552, found 550``, exit 5 at every start since); a second ``standby receive`` started too.
Now the second one is refused at once with one line (exit 2, as for any invocation that cannot work),
read-only commands still run beside the first, and a killed holder never leaves a stale lock.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import statelock
from engine.errors import StateLocked
from tests.pair import ROOT, Pair, free_port, wait_for

EXIT_USAGE = 2


def test_a_second_lock_on_a_folder_is_refused_until_the_first_is_released(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = statelock.acquire(state, "standby send")
    assert first.held
    with pytest.raises(StateLocked) as exc:
        statelock.acquire(state, "standby send")
    msg = str(exc.value)
    assert str(state) in msg and "in use by another standby process" in msg
    assert re.search(r"\(pid \d+: standby send, since ", msg), msg
    first.release()
    assert not first.held
    with statelock.acquire(state, "standby receive") as again:
        assert again.held
    other = tmp_path / "other"
    with statelock.acquire(state, "a"), statelock.acquire(other, "b"):
        pass  # one lock per folder, not one per process


HOLDER = """
import sys, time
from pathlib import Path
from engine import statelock
lock = statelock.acquire(Path(sys.argv[1]), "standby send")
print("held", flush=True)
time.sleep(60)
"""


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    state = tmp_path / "state"
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(state)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "held"
        with pytest.raises(StateLocked, match=rf"pid {p.pid}: standby send"):
            statelock.acquire(state, "standby send")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        if p.stdout is not None:
            p.stdout.close()
    with statelock.acquire(state, "standby send") as lock:  # the OS released it with the process
        assert lock.held


def refused(r: subprocess.CompletedProcess[str], state: Path) -> None:
    assert r.returncode == EXIT_USAGE, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("standby: state folder ") and str(state) in lines[0], lines[0]
    assert "Traceback" not in r.stderr


def test_a_second_send_or_receive_on_one_state_folder_is_refused(pair: Pair) -> None:
    db = pair.source / "databases"
    db.mkdir()
    (db / "a.json").write_text("a1")
    pair.start("receive")
    pair.start("send")
    pair.wait_converged()

    # The same config again: refused at once, before it opens the journal.
    t0 = time.monotonic()
    r = pair.cli("send", "--config", str(pair.config), timeout=30)
    refused(r, pair.sender_state)
    assert "standby send" in r.stderr and time.monotonic() - t0 < 20
    # A receiver on another port but the same state folder: refused too.
    other = pair.base / "other.toml"
    other.write_text(
        pair.config.read_text("utf-8").replace(
            f'listen = "127.0.0.1:{pair.port}"', f'listen = "127.0.0.1:{free_port()}"'
        )
    )
    assert other.read_text("utf-8") != pair.config.read_text("utf-8")
    refused(pair.cli("receive", "--config", str(other), timeout=30), pair.receiver_state)
    # A repair changes the journal: it needs the lock, so it is refused while the sender runs.
    refused(pair.cli("journal", "--config", str(pair.config), "repair", timeout=30), pair.sender_state)

    # Read-only commands never take the lock. `status` exits 0 only once both sides say they are connected
    # (each rewrites its status about once a second: a pair this fast can be here before that).
    pair.wait_status(
        lambda st: bool(st["sender"].get("connected") and st["receiver"].get("connected")),
        10,
        "both sides' status to say connected",
    )
    for args in (["status"], ["journal", "list"], ["journal", "check"]):
        r = pair.cli(*args[:1], "--config", str(pair.config), *args[1:], timeout=30)
        assert r.returncode == 0, (args, r.stderr, r.stdout)

    # The first pair never noticed: it goes on replicating, and its journal is whole.
    (db / "b.json").write_text("b1")
    pair.wait_converged()
    assert pair.procs["send"].poll() is None and pair.procs["receive"].poll() is None
    r = pair.cli("journal", "--config", str(pair.config), "check", timeout=30)
    assert r.returncode == 0 and "whole" in r.stdout, r.stdout

    # Once the first sender is gone, a new one starts (the lock died with it, even killed).
    pair.kill("send")
    pair.start("send")
    wait_for(lambda: "send.connected" in pair.log("send"), 20, "the restarted sender to connect")
    (db / "c.json").write_text("c1")
    pair.wait_converged()
