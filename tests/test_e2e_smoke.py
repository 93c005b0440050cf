from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from engine.demo import wait_final_status
from engine.status import write_status
from tests.pair import ROOT, Pair, temp_files


def test_pair_replicates_basic_changes(pair: Pair) -> None:
    db = pair.source / "databases" / "room-1"
    db.mkdir(parents=True)
    (db / "m1.json").write_text('{"a": 1}')
    (pair.source / "config").mkdir()
    (pair.source / "config" / "config.json").write_text("{}")
    pair.start("receive")
    pair.start("send")
    pair.wait_converged()
    (db / "m1.json").write_text('{"a": 2}')
    (db / "empty").write_bytes(b"")
    (db / "møte ünïcødé 会议.json").write_text("x")
    (db / "m1.json").rename(db / "m2.json")
    (db.parent / "room-2" / "deep" / "er").mkdir(parents=True)
    (db.parent / "room-2" / "deep" / "er" / "f").write_text("deep")
    pair.wait_converged()
    db.rename(db.parent / "room-1-renamed")
    pair.wait_converged()
    (db.parent / "room-1-renamed" / "m2.json").unlink()
    pair.wait_converged()
    assert pair.stop("send") == 0
    assert pair.stop("receive") == 0
    assert not temp_files(pair.target)


# ---- the demo's final table ------------------------------------------------------------------------------
def test_demo_final_table_shows_the_verified_positions() -> None:
    """``standby demo`` ends with a table and "verified": the table's positions are those of the verified
    replica (head acknowledged and applied, no lag), not a status read up to a second before."""
    env = dict(os.environ, COLUMNS="200")  # one table row per line, for the parse below
    r = subprocess.run(
        [sys.executable, "-m", "engine", "demo", "--seconds", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    out = r.stdout
    assert r.returncode == 0, f"demo exited {r.returncode}\n{out}\n{r.stderr}"
    assert "verified: the replica is identical to the source" in out, out
    sender = re.findall(r"journal head (\d+), acked (\d+) .*? (\d+) records", out)
    receiver = re.findall(r"applied (\d+)", out)
    assert sender and receiver, out
    head, acked, lag = map(int, sender[-1])
    applied = int(receiver[-1])
    assert head > 0 and head == acked == applied and lag == 0, (
        f"the final table shows head {head}, acked {acked}, applied {applied}, lag {lag} next to "
        f"'verified identical':\n{out}"
    )
    assert "had not caught up" not in out, out


def test_wait_final_status_takes_the_status_written_after_the_verdict(tmp_path: Path) -> None:
    """The refresh behind the demo's final table, on real status files: a status written before the
    verdict (one second old, behind) is not taken; the one the nodes write next is."""
    sender_state, receiver_state = tmp_path / "s", tmp_path / "r"
    sender_state.mkdir()
    receiver_state.mkdir()
    write_status(sender_state, {"head": 186, "acked_seq": 179})
    write_status(receiver_state, {"applied_seq": 179})
    time.sleep(0.01)
    verified_at = time.time()

    def next_refresh() -> None:
        time.sleep(0.3)
        write_status(sender_state, {"head": 186, "acked_seq": 186})
        write_status(receiver_state, {"applied_seq": 186})

    t = threading.Thread(target=next_refresh)
    t.start()
    try:
        s, r, settled = wait_final_status(sender_state, receiver_state, verified_at, 186, timeout=5)
    finally:
        t.join()
    assert settled and s["acked_seq"] == 186 and r["applied_seq"] == 186, (s, r)
    # The same positions written before the verdict are not enough: they are not known to be its own.
    write_status(sender_state, {"head": 186, "acked_seq": 186})
    write_status(receiver_state, {"applied_seq": 186})
    s, r, settled = wait_final_status(sender_state, receiver_state, time.time() + 1, 186, timeout=0.3)
    assert not settled


def test_the_ha_demo_fails_over_and_back_without_two_actives() -> None:
    """The README's first command: two agents fail over after a crash, rejoin by themselves, and fail back
    with a switchover."""
    r = subprocess.run(
        [sys.executable, "-m", "engine", "demo", "--ha"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env=dict(os.environ, COLUMNS="200"),
    )
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    for text in (
        "failed over",
        "failed back",
        "never two services at once",
        "is passive again and identical",
        "rejoined as passive by itself",
        "switchover done",
    ):
        assert text in r.stdout, r.stdout
    assert "Traceback" not in r.stdout + r.stderr
