"""Point-in-time recovery: the journal replayed into a new folder, up to a seq or a time."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

from engine.journal import Journal
from tests.pair import Pair, temp_files, tree


def test_replay_rebuilds_the_tree_as_it_was(pair: Pair) -> None:
    db = pair.source / "databases" / "r1"
    db.mkdir(parents=True)
    (db / "a.json").write_text("a1")
    (db / "b.json").write_text("b1")
    pair.start("receive")
    pair.start("send")
    pair.wait_converged()
    time.sleep(0.05)
    moment = datetime.now().isoformat()
    before = tree(pair.source / "databases")
    time.sleep(0.05)
    (db / "a.json").write_text("a2")
    (db / "b.json").unlink()
    (db / "c.json").write_text("c1")
    pair.wait_converged()
    after = tree(pair.source / "databases")

    out1 = pair.base / "pit"
    r = pair.cli(
        "journal", "--config", str(pair.config), "replay", "--out", str(out1), "--until-time", moment
    )
    assert r.returncode == 0, r.stderr
    assert tree(out1 / "databases") == before
    out2 = pair.base / "now"
    r = pair.cli("journal", "--config", str(pair.config), "replay", "--out", str(out2))
    assert r.returncode == 0, r.stderr
    assert tree(out2 / "databases") == after
    assert not temp_files(out2)

    # An existing output folder is never overwritten.
    r = pair.cli("journal", "--config", str(pair.config), "replay", "--out", str(out2))
    assert r.returncode == 2 and "already exists" in r.stderr

    r = pair.cli("journal", "--config", str(pair.config), "list")
    assert r.returncode == 0 and ".sbj" in r.stdout


def test_replay_until_seq(pair: Pair, tmp_path: Path) -> None:
    db = pair.source / "databases"
    db.mkdir()
    pair.start("receive")
    pair.start("send")
    for i in range(5):
        (db / f"f{i}").write_text(str(i))
        pair.wait_converged()
    j = Journal.open(pair.sender_state / "journal", readonly=True)
    cur = j.cursor(j.first_seq)
    seqs = {}
    while (c := cur.next_header()) is not None:
        cur.skip_chunks()
        seqs[c.path] = c.seq
    cur.close()
    j.close()
    out = tmp_path / "upto"
    until = str(seqs["databases/f2"])
    r = pair.cli("journal", "--config", str(pair.config), "replay", "--out", str(out), "--until-seq", until)
    assert r.returncode == 0, r.stderr
    got = sorted(p.name for p in (out / "databases").iterdir())
    assert got == ["f0", "f1", "f2"], got
