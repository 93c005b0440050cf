"""Point-in-time recovery: the journal replayed into a new folder, up to a seq or a time."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

from engine.journal import DEFAULT_SEGMENT_BYTES, Journal
from tests.pair import ROOT, Pair, temp_files, tree
from tests.test_journal import put


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


# -- what a replay cannot answer is refused: exit 2, one line naming the journal's range -------------------

T0 = datetime(2026, 11, 25, 10, 0, 0, tzinfo=UTC)  # entry i is written at 10:0i:00 UTC
#: Local time for the CLI: a POSIX zone string (no tz database needed), UTC+05:30 all year.
LOCAL_TZ = {"TZ": "XST-5:30"}


def journal_of_five(pair: Pair, segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> None:
    with closing(Journal.open(pair.sender_state / "journal", fsync=False, segment_bytes=segment_bytes)) as j:
        for i in range(5):
            content = f"v{i}".encode()
            ts = int((T0 + timedelta(minutes=i)).timestamp()) * 1_000_000_000
            j.append(put(f"databases/f{i}", content, ts_ns=ts), content)
        j.commit()


def replay_cli(pair: Pair, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "journal",
            "--config",
            str(pair.config),
            "replay",
            "--out",
            str(out),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **LOCAL_TZ},
    )


def restore_cli(pair: Pair, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine", "restore", "--config", str(pair.config), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={**os.environ, **LOCAL_TZ},
    )


def refused(r: subprocess.CompletedProcess[str], out: Path, *words: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.replay-*"))


def test_replay_refuses_a_seq_or_time_it_cannot_answer(pair: Pair) -> None:
    journal_of_five(pair)
    out = pair.base / "out"
    window = "the journal holds seqs 1..5, written 2026-11-25T15:30:00+05:30 .. 2026-11-25T15:34:00+05:30"
    refused(replay_cli(pair, out, "--until-seq", "-5"), out, "--until-seq -5", window)
    refused(replay_cli(pair, out, "--until-seq", "6"), out, "past the journal's head 5", window)
    refused(replay_cli(pair, out, "--until-seq", "0"), out, "before the journal's first entry, 1", window)
    refused(
        replay_cli(pair, out, "--until-time", "2026-11-25T09:59:59Z"),
        out,
        "before the journal's first entry, at 2026-11-25T15:30:00+05:30",
        window,
    )
    refused(replay_cli(pair, out, "--until-time", "2026-11-25T15:29:00"), out, "local time (UTC+05:30)")
    refused(replay_cli(pair, out, "--until-time", "yesterday"), out, "not an ISO 8601 time")


def test_replay_until_a_time_with_an_offset_or_in_local_time(pair: Pair) -> None:
    journal_of_five(pair)
    for name, until, last in [
        ("offset", "2026-11-25T11:02:30+01:00", 2),  # 10:02:30 UTC: entries written at 10:00..10:02
        ("utc", "2026-11-25T10:01:00Z", 1),  # an entry written at exactly that moment is included
        ("local", "2026-11-25T15:33:30", 3),  # local time, UTC+05:30: 10:03:30 UTC
        ("later", "2030-01-01T00:00:00+00:00", 4),  # after the head: the whole journal
    ]:
        out = pair.base / name
        r = replay_cli(pair, out, "--until-time", until)
        assert r.returncode == 0, r.stderr
        assert sorted(p.name for p in (out / "databases").iterdir()) == [f"f{i}" for i in range(last + 1)]
        assert f"replayed seqs 1..{last + 1} into {out}" in r.stdout, r.stdout
        tz = " local time (UTC+05:30)" if name == "local" else ""
        assert f"(entries up to {until}{tz})" in r.stdout, r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "engine", "journal", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert "is local time" in r.stdout and "+01:00" in r.stdout


def test_a_pruned_journal_refuses_to_rebuild_the_set_but_restores_a_file_changed_since(pair: Pair) -> None:
    """What replay used to answer with a partial tree (only the files changed since the first entry kept)
    is refused, naming the window; one file whose change is kept can still be put back."""
    journal_of_five(pair, segment_bytes=1)  # one entry per segment
    with closing(Journal.open(pair.sender_state / "journal", fsync=False, segment_bytes=1)) as j:
        assert j.prune(acked=2, keep_after_mtime=float("inf")) == 2
        assert j.first_seq == 3
    out = pair.base / "out"
    for args in (["--until-seq", "2"], ["--until-time", "2026-11-25T10:01:30Z"], ["--until-seq", "4"], []):
        refused(
            replay_cli(pair, out, *args),
            out,
            "cannot be rebuilt",
            "entries before 3 were pruned",
        )
    source = pair.source
    r = restore_cli(pair, "--path", "databases/f3", "--pos", "4")
    assert r.returncode == 0, r.stderr
    assert (source / "databases" / "f3").read_bytes() == b"v3" and "from entry 4" in r.stdout
    r = restore_cli(pair, "--path", "databases/f0", "--pos", "4")  # its only put was pruned
    assert r.returncode == 2 and "older than the journal" in r.stderr and "Traceback" not in r.stderr
    assert not (source / "databases" / "f0").exists()


def test_standby_replay_with_at_pos_and_a_dry_run(pair: Pair) -> None:
    journal_of_five(pair)
    out = pair.base / "set"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "engine",
                "replay",
                "--config",
                str(pair.config),
                "--into",
                str(out),
                *args,
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
            env={**os.environ, **LOCAL_TZ},
        )

    r = run("--pos", "3", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "would replay entries 1..3" in r.stdout and "3 files, 6 bytes" in r.stdout, r.stdout
    assert not out.exists()
    r = run("--at", "2026-11-25T15:31:30")  # local time, UTC+05:30: entries of 10:00 and 10:01 UTC
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (out / "databases").iterdir()) == ["f0", "f1"]
    r = run("--pos", "9", "--dry-run")
    assert r.returncode == 2 and "past the journal's head 5" in r.stderr and "Traceback" not in r.stderr
