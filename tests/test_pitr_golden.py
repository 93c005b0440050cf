"""Point-in-time recovery against golden damaged journals and checkpoints (tests/data/pitr, written by
tests/data/make_pitr_golden.py, whose docstring describes the history and each case).

Each case is copied into tmp_path first (a replay may write beside the journal; git keeps no file times,
so the copy gets the checkpoint files' times back from their manifests). For every case:
- the real command, ``python -m engine replay`` and ``python -m engine journal check``: exit code, the
  STOPPED / skipped / passed-over lines naming the segment, byte range and entry, and the rebuilt folder
  equal to the set in expected.json (files by xxh3, their times, the folders) at the entry it stopped at;
- a sweep of the library's ``replay()`` over every entry, with and without ``skip_corrupt``, against the
  documented outcome (written out below in ``documented``) and the tree the model gives for the entries
  actually applied (for ``skip_corrupt``: the history without the skipped entries, or without the
  checkpoint's damaged files).
And the generator reproduces the committed files byte for byte.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from engine.checkpoint import CheckpointDamaged
from engine.errors import ConfigError
from engine.replay import ReplayResult, replay
from tests.data.make_pitr_golden import (
    CASES,
    CHECKPOINTS,
    DEFAULT_OUT,
    Model,
    Step,
    generate,
    history,
    materialize,
    model_after,
    snapshot,
)
from tests.pair import ROOT

DATA = DEFAULT_OUT
EXPECTED: dict[str, Any] = json.loads((DATA / "expected.json").read_text("utf-8"))
STEPS: list[Step] = history()
HEAD = len(STEPS)
SEG = {first: f"{first:020d}.sbj" for first in (1, 4, 7, 10, 13, 16, 19, 22)}
Tree = tuple[dict[str, str], dict[str, int], list[str]]


def at(seq: int) -> Tree:
    """The set after entry ``seq`` as expected.json has it."""
    k = str(seq)
    return EXPECTED["trees"][k], {p: int(m) for p, m in EXPECTED["mtimes"][k].items()}, EXPECTED["folders"][k]


def without(seq: int, lost: Sequence[int] = (), base: int = 0, omit: Sequence[str] = ()) -> Tree:
    """The set after entry ``seq`` when the replay starts from the checkpoint at ``base`` (less its files
    ``omit``) and passes over the entries ``lost``."""
    files, mtimes, folders = at(base)
    start = Model({p: (h, mtimes[p]) for p, h in files.items() if p not in omit}, set(folders))
    return model_after([s for s in STEPS[base:seq] if s.change.seq not in lost], start).trees()


def where(case: str) -> dict[str, Any]:
    return dict(EXPECTED["cases"][case])


@dataclass
class Copy:
    """A working copy of a case: its state folder and a sender config pointing at it."""

    base: Path
    state: Path
    config: Path

    def out(self, name: str) -> Path:
        return self.base / "out" / name


def copy_of(case: str, tmp_path: Path) -> Copy:
    state = materialize(DATA / case, tmp_path)
    (tmp_path / "src").mkdir()
    (tmp_path / "out").mkdir()
    config = tmp_path / "standby.toml"
    config.write_text(
        f"[sender]\nsource = '{tmp_path / 'src'}'\npeer = \"127.0.0.1:7420\"\n"
        f"state_dir = '{state}'\ninsecure = true\n",
        "utf-8",
    )
    return Copy(tmp_path, state, config)


def run(*calls: Sequence[str]) -> list[subprocess.CompletedProcess[str]]:
    """``python -m engine ARGS`` for each call, side by side (they only read the journal), in order."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "engine", *call],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for call in calls
    ]
    out = []
    try:
        for call, p in zip(calls, procs, strict=True):
            stdout, stderr = p.communicate(timeout=60)
            out.append(subprocess.CompletedProcess(list(call), p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def replay_call(c: Copy, name: str, *args: str) -> list[str]:
    return ["replay", "--config", str(c.config), "--into", str(c.out(name)), *args]


def check_call(c: Copy) -> list[str]:
    return ["journal", "--config", str(c.config), "check"]


def lines(r: subprocess.CompletedProcess[str]) -> list[str]:
    return r.stdout.strip().splitlines()


def one(r: subprocess.CompletedProcess[str], prefix: str) -> str:
    """The one output line that starts with ``prefix``."""
    found = [line for line in lines(r) if line.startswith(prefix)]
    assert len(found) == 1, (prefix, r.stdout, r.stderr)
    return found[0]


def moment(seq: int, plus_s: int = 30) -> str:
    """An ISO time ``plus_s`` seconds after entry ``seq`` was journaled."""
    ns = int(EXPECTED["ts_ns"][str(seq)]) + plus_s * 1_000_000_000
    return datetime.fromtimestamp(ns // 1_000_000_000, tz=UTC).isoformat()


# -- the data itself ----------------------------------------------------------------------------------------


def test_the_golden_data_is_small_and_as_the_generator_says() -> None:
    files = [p for p in DATA.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 300_000
    assert sorted(p.name for p in DATA.iterdir() if p.is_dir()) == sorted(CASES)
    assert [e["seq"] for e in EXPECTED["entries"]] == list(range(1, HEAD + 1))
    assert [(e["op"], e["path"], e["dst"]) for e in EXPECTED["entries"]] == [
        (s.change.op.value, s.change.path, s.change.dst) for s in STEPS
    ]
    assert EXPECTED["checkpoints"] == [6, 14] == list(CHECKPOINTS)
    assert EXPECTED["segments"] == {SEG[f]: [f, f + 2] for f in SEG}
    clean = DATA / "clean" / "state"
    assert sorted(p.name for p in (clean / "journal").glob("*.sbj")) == sorted(SEG.values())
    assert sorted(p.name for p in (clean / "checkpoints").iterdir()) == ["000000000006", "000000000014"]


def test_the_generator_reproduces_the_committed_files_byte_for_byte(tmp_path: Path) -> None:
    """Manifests are rewritten sorted by path (see the generator's docstring), so every byte is
    reproducible, times and ids included."""
    out = tmp_path / "pitr"
    generate(out, check=False)  # the model is checked against real replays by the sweep below

    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    new, committed = files(out), files(DATA)
    assert sorted(new) == sorted(committed)
    differ = [p for p in new if new[p] != committed[p]]
    assert not differ, f"regenerate: python -m tests.data.make_pitr_golden ({differ[:5]})"


# -- the real command, case by case -------------------------------------------------------------------------


def test_clean(tmp_path: Path) -> None:
    c = copy_of("clean", tmp_path)
    early, cp, later, chk = run(
        replay_call(c, "early", "--pos", "5"),
        replay_call(c, "cp", "--pos", "14"),
        replay_call(c, "later", "--at", moment(20)),
        check_call(c),
    )
    assert (early.returncode, lines(early)) == (0, [f"replayed seqs 1..5 into {c.out('early')}"]), early
    assert snapshot(c.out("early")) == at(5)
    assert (cp.returncode, lines(cp)) == (0, [f"from the checkpoint at seq 14 into {c.out('cp')}"]), cp
    assert snapshot(c.out("cp")) == at(14)
    want = f"from the checkpoint at seq 14 then replayed seqs 15..20 into {c.out('later')} (entries up to "
    assert later.returncode == 0 and lines(later) == [f"{want}{moment(20)})"], later
    assert snapshot(c.out("later")) == at(20)
    assert chk.returncode == 0 and lines(chk)[1:] == ["whole: entries 1..24"], chk


def test_torn_tail_is_not_damage(tmp_path: Path) -> None:
    """The torn entry 24 never was: a replay answers up to entry 23, exit 0, and asking for 24 is asking past
    the head (exit 2), as for any journal whose head is 23."""
    c = copy_of("torn-tail", tmp_path)
    w = where("torn-tail")
    last, pos, past, chk = run(
        replay_call(c, "last", "--at", "2030-01-01T00:00:00+00:00"),
        replay_call(c, "pos", "--pos", "23"),
        replay_call(c, "past", "--pos", "24"),
        check_call(c),
    )
    for r, name in ((last, "last"), (pos, "pos")):
        assert r.returncode == 0 and "STOPPED" not in r.stdout and "skipped" not in r.stdout, r
        assert lines(r)[0].startswith(
            f"from the checkpoint at seq 14 then replayed seqs 15..23 into {c.out(name)}"
        )
        assert snapshot(c.out(name)) == at(23)
    assert past.returncode == 2 and "past the journal's head 23" in past.stderr, past
    assert not c.out("past").exists()
    assert chk.returncode == 0, chk
    assert one(chk, "whole:") == "whole: entries 1..23"
    a, b = w["bytes"]
    assert one(chk, "torn tail:").startswith(
        f"torn tail: {SEG[22]} bytes {a}..{b} (content frame 1 of 1 of entry 24"
    )


def test_corrupt_entry_stops_before_it_or_is_skipped_and_listed(tmp_path: Path) -> None:
    c = copy_of("corrupt-entry", tmp_path)
    w = where("corrupt-entry")
    assert (w["segment"], w["entry"]) == (SEG[10], 11)
    a, b = w["bytes"]
    damage = (
        f"segment {SEG[10]} bytes {a}..{b}: entry 11 (content frame 1 of 1 of entry 11: checksum mismatch"
    )
    stop, skip, covered, dry, chk = run(
        replay_call(c, "stop", "--pos", "13"),
        replay_call(c, "skip", "--pos", "13", "--skip-corrupt"),
        replay_call(c, "covered", "--pos", "24"),
        replay_call(c, "dry", "--pos", "13", "--dry-run"),
        check_call(c),
    )
    assert stop.returncode == 1, stop
    assert lines(stop)[0] == f"from the checkpoint at seq 6 then replayed seqs 7..10 into {c.out('stop')}"
    assert one(stop, "STOPPED").startswith(f"STOPPED at entry 10: the journal is damaged after it: {damage}")
    assert snapshot(c.out("stop")) == at(10)

    assert skip.returncode == 0 and "STOPPED" not in skip.stdout, skip
    head, listed, item = lines(skip)
    assert head == f"from the checkpoint at seq 6 then replayed seqs 7..13 into {c.out('skip')}"
    assert listed == "skipped (1), so the tree may differ from the set at that moment there:"
    assert item.startswith(f"  {damage}"), skip
    got = snapshot(c.out("skip"))
    assert got == without(13, lost=[11], base=6)
    assert {p for p in got[0] if got[0][p] != at(13)[0].get(p)} == {"config/app.json"}  # entry 11's put

    # The checkpoint at 14 covers the damage: a moment after it never reads entry 11.
    assert covered.returncode == 0 and "STOPPED" not in covered.stdout, covered
    assert snapshot(c.out("covered")) == at(24)

    assert dry.returncode == 0 and not c.out("dry").exists(), dry
    assert one(dry, "would stop").startswith(
        f"would stop at entry 10: the journal is damaged after it: {damage}"
    )

    assert chk.returncode == 1, chk
    assert one(chk, "damaged:").endswith(
        f"{SEG[10]} at byte {w['frame']}: content frame 1 of 1 of entry 11: checksum mismatch, with a whole "
        f"frame after it at byte {b}"
    )
    assert one(chk, "valid prefix:") == f"valid prefix: entries 1..10 (up to byte {a} of {SEG[10]})"


def test_corrupt_entry_header_stops_before_it_or_is_skipped_and_listed(tmp_path: Path) -> None:
    c = copy_of("corrupt-header", tmp_path)
    w = where("corrupt-header")
    assert (w["segment"], w["entry"]) == (SEG[16], 17)
    a, b = w["bytes"]
    damage = f"segment {SEG[16]} bytes {a}..{b}: entry 17 (bad frame: checksum mismatch"
    stop, skip, chk = run(
        replay_call(c, "stop", "--pos", "24"),
        replay_call(c, "skip", "--pos", "24", "--skip-corrupt"),
        check_call(c),
    )
    assert stop.returncode == 1, stop
    assert lines(stop)[0] == f"from the checkpoint at seq 14 then replayed seqs 15..16 into {c.out('stop')}"
    assert one(stop, "STOPPED").startswith(f"STOPPED at entry 16: the journal is damaged after it: {damage}")
    assert snapshot(c.out("stop")) == at(16)

    assert skip.returncode == 0 and "STOPPED" not in skip.stdout, skip
    assert one(skip, "skipped (1)") and one(skip, "  segment").startswith(f"  {damage}")
    got = snapshot(c.out("skip"))
    # Without entry 17 (config/app.json v4), entry 20 moved v3 into the archive.
    assert got == without(24, lost=[17], base=14)
    assert {p for p in got[0] if got[0][p] != at(24)[0].get(p)} == {"archive/app-v4.json"}

    assert chk.returncode == 1, chk
    assert one(chk, "damaged:").endswith(
        f"{SEG[16]} at byte {a}: bad frame: checksum mismatch, with a whole frame after it at byte "
        f"{w['whole_after']}"  # entry 17's content frame
    )
    assert one(chk, "valid prefix:") == f"valid prefix: entries 1..16 (up to byte {a} of {SEG[16]})"


def test_bad_segment_header_stops_before_the_segment_or_skips_it_whole(tmp_path: Path) -> None:
    c = copy_of("bad-segment-header", tmp_path)
    assert where("bad-segment-header")["segment"] == SEG[19]
    damage = f"segment {SEG[19]} bytes 0 to its end: entries 19..21 (bad segment header: checksum mismatch)"
    stop, skip, chk = run(
        replay_call(c, "stop", "--pos", "24"),
        replay_call(c, "skip", "--pos", "24", "--skip-corrupt"),
        check_call(c),
    )
    assert stop.returncode == 1, stop
    assert lines(stop)[0] == f"from the checkpoint at seq 14 then replayed seqs 15..18 into {c.out('stop')}"
    assert one(stop, "STOPPED").startswith(f"STOPPED at entry 18: the journal is damaged after it: {damage}.")
    assert snapshot(c.out("stop")) == at(18)

    assert skip.returncode == 0 and "STOPPED" not in skip.stdout, skip
    assert lines(skip)[1:] == [
        "skipped (1), so the tree may differ from the set at that moment there:",
        f"  {damage}",
    ]
    got = snapshot(c.out("skip"))
    assert got == without(24, lost=[19, 20, 21], base=14)
    assert {p for p in set(got[0]) | set(at(24)[0]) if got[0].get(p) != at(24)[0].get(p)} == {
        "docs/README.txt",  # 19: its v2 never came
        "archive/app-v4.json",  # 20: never moved there
        "config/app.json",  # 21: still v4, not v5
    }

    assert chk.returncode == 1, chk
    assert one(chk, "damaged:").endswith(f"{SEG[19]} at byte 0: bad segment header: checksum mismatch")
    assert one(chk, "valid prefix:") == "valid prefix: entries 1..18"


def test_a_missing_segment_is_never_jumped(tmp_path: Path) -> None:
    c = copy_of("missing-segment", tmp_path)
    assert where("missing-segment")["segment"] == SEG[16]
    missing = f"a segment is missing before {SEG[19]}: the one before ends at entry 15, this one starts at 19"
    stop, skip, before, chk = run(
        replay_call(c, "stop", "--pos", "24"),
        replay_call(c, "skip", "--pos", "24", "--skip-corrupt"),
        replay_call(c, "before", "--pos", "15"),
        check_call(c),
    )
    for r, name in ((stop, "stop"), (skip, "skip")):
        assert r.returncode == 1, r
        assert lines(r)[0] == f"from the checkpoint at seq 14 then replayed seqs 15..15 into {c.out(name)}"
        assert one(r, "STOPPED").startswith(f"STOPPED at entry 15: {missing}.")
        assert "skipped" not in r.stdout
        assert snapshot(c.out(name)) == at(15)
    assert before.returncode == 0 and "STOPPED" not in before.stdout, before
    assert snapshot(c.out("before")) == at(15)

    assert chk.returncode == 1, chk
    assert one(chk, "damaged:").endswith(
        f"{SEG[19]} at byte 0: starts at seq 19, but the segment before ends at seq 15"
    )
    assert one(chk, "valid prefix:") == "valid prefix: entries 1..15"


def test_a_damaged_checkpoint_is_passed_over_for_an_older_one(tmp_path: Path) -> None:
    c = copy_of("damaged-checkpoint", tmp_path)
    assert where("damaged-checkpoint") == {"checkpoint": 14, "changed": "docs/README.txt"}
    newest, at_14, chk = run(
        replay_call(c, "newest", "--pos", "24"),
        replay_call(c, "at-14", "--pos", "14"),
        check_call(c),
    )
    cp = c.state / "checkpoints" / "000000000014"
    note = f"note: passed over: checkpoint at seq 14 ({cp}) is damaged: docs/README.txt: content differs"
    for r, name, seq in ((newest, "newest", 24), (at_14, "at-14", 14)):
        assert r.returncode == 0 and "STOPPED" not in r.stdout and "skipped" not in r.stdout, r
        assert lines(r)[0] == f"from the checkpoint at seq 6 then replayed seqs 7..{seq} into {c.out(name)}"
        assert one(r, "note:").startswith(note)
        assert snapshot(c.out(name)) == at(seq)
    assert chk.returncode == 0 and one(chk, "whole:") == "whole: entries 1..24", chk


def test_no_whole_checkpoint_and_a_pruned_journal_is_refused_unless_skip_corrupt(tmp_path: Path) -> None:
    c = copy_of("damaged-checkpoint-pruned", tmp_path)
    w = where("damaged-checkpoint-pruned")
    assert w["segments_removed"] == [SEG[1], SEG[4]] and (w["changed"], w["missing"]) == (
        "docs/README.txt",
        "docs/notes.txt",
    )
    newest, older, skip, skip_back, chk = run(
        replay_call(c, "newest", "--pos", "24"),
        replay_call(c, "older", "--pos", "10"),
        replay_call(c, "skip", "--pos", "18", "--skip-corrupt"),
        replay_call(c, "skip-back", "--pos", "24", "--skip-corrupt"),
        check_call(c),
    )
    cp6, cp14 = (c.state / "checkpoints" / f"{s:012d}" for s in (6, 14))
    bad14 = f"checkpoint at seq 14 ({cp14}) is damaged: docs/README.txt: content differs from its manifest"
    bad6 = f"checkpoint at seq 6 ({cp6}) is damaged: docs/notes.txt: missing"
    refusal = "no older checkpoint is whole and the entries before it were pruned: --skip-corrupt rebuilds"
    for r, name, bad in ((newest, "newest", bad14), (older, "older", bad6)):
        assert r.returncode == 5 and r.stdout == "", r
        (line,) = r.stderr.strip().splitlines()
        assert line.startswith(f"standby: {bad}") and refusal in line, line
        assert not c.out(name).exists()

    assert skip.returncode == 0 and "STOPPED" not in skip.stdout, skip
    assert lines(skip)[0] == f"from the checkpoint at seq 14 then replayed seqs 15..18 into {c.out('skip')}"
    assert one(skip, "note:") == f"note: passed over: {bad6}"
    assert one(skip, "skipped (1)")
    assert one(skip, "  checkpoint").startswith("  checkpoint 14 file docs/README.txt: content differs")
    got = snapshot(c.out("skip"))
    assert got == without(18, base=14, omit=["docs/README.txt"])
    assert set(at(18)[0]) - set(got[0]) == {"docs/README.txt"} and set(got[0]) < set(at(18)[0])
    # Entry 19 writes docs/README.txt again: from then on the set is whole again.
    assert skip_back.returncode == 0 and snapshot(c.out("skip-back")) == at(24), skip_back

    assert chk.returncode == 0 and one(chk, "whole:") == "whole: entries 7..24", chk


def test_skip_corrupt_lists_damage_even_when_the_moment_asked_is_inside_it(tmp_path: Path) -> None:
    """--skip-corrupt up to entry 11 of corrupt-entry (by --pos, or by --at a moment after entry 11 was
    journaled and before entry 12): entry 11 is passed over, and the folder is the set after entry 10,
    right for "the set then, without entry 11"; so entry 11 is listed as skipped. The same for entries
    19..21 of bad-segment-header at --pos 20 (as the dry run says "would skip")."""
    c = copy_of("corrupt-entry", tmp_path / "entry")
    b = copy_of("bad-segment-header", tmp_path / "segment")
    by_pos, by_time, segment = run(
        replay_call(c, "pos", "--pos", "11", "--skip-corrupt"),
        replay_call(c, "time", "--at", moment(11), "--skip-corrupt"),
        replay_call(b, "pos", "--pos", "20", "--skip-corrupt"),
    )
    for r, copy, name, last in ((by_pos, c, "pos", 10), (by_time, c, "time", 10), (segment, b, "pos", 18)):
        assert r.returncode == 0 and "STOPPED" not in r.stdout, r
        assert snapshot(copy.out(name)) == at(last)
    unlisted = [
        r.stdout
        for r, seg in ((by_pos, SEG[10]), (by_time, SEG[10]), (segment, SEG[19]))
        if "skipped (1)" not in r.stdout or f"  segment {seg} bytes " not in r.stdout
    ]
    assert not unlisted, unlisted


# -- the library, at every entry ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    base: int | None  # the checkpoint it starts from
    last: int  # the last entry applied
    stopped: bool = False
    lost: tuple[int, ...] = ()  # entries passed over, missing from the tree
    omit: tuple[str, ...] = ()  # the base checkpoint's damaged files, left out
    passed_over: tuple[int, ...] = ()  # damaged checkpoints named in a note
    refused: type[Exception] | None = None


#: The damage of each case, as ``documented`` needs it: checkpoints whose files are damaged (and which file),
#: and the entries (first, last) lost to damage in the journal.
DAMAGED_CPS = {
    "damaged-checkpoint": {14: "docs/README.txt"},
    "damaged-checkpoint-pruned": {14: "docs/README.txt", 6: "docs/notes.txt"},
}
LOST = {"corrupt-entry": (11, 11), "corrupt-header": (17, 17), "bad-segment-header": (19, 21)}


def documented(case: str, pos: int, skip: bool) -> Outcome:
    """What ``standby replay --help`` says a replay up to ``pos`` does on ``case``."""
    head = 23 if case == "torn-tail" else HEAD
    first = 7 if case == "damaged-checkpoint-pruned" else 1
    bad = DAMAGED_CPS.get(case, {})
    if pos > head or (first > 1 and pos < CHECKPOINTS[0]):
        return Outcome(None, 0, refused=ConfigError)
    candidates = [s for s in CHECKPOINTS if s <= pos]
    whole = [s for s in candidates if s not in bad]
    base = whole[-1] if whole else None
    omit: tuple[str, ...] = ()
    passed = tuple(s for s in candidates if s in bad and (base is None or s > base))
    if base is None and first > 1:
        if not skip:
            return Outcome(None, 0, refused=CheckpointDamaged)
        base, omit, passed = candidates[-1], (bad[candidates[-1]],), passed[:-1]
    start = (base or 0) + 1
    if case == "missing-segment" and pos >= 16:
        return Outcome(base, 15, stopped=True, passed_over=passed)
    if case in LOST:
        lo, hi = LOST[case]
        if start <= hi and pos >= lo:
            if not skip:
                return Outcome(base, lo - 1, stopped=True, passed_over=passed)
            lost = tuple(s for s in range(lo, hi + 1) if s <= pos)
            return Outcome(base, pos if pos > hi else lo - 1, lost=lost, omit=omit, passed_over=passed)
    return Outcome(base, pos, omit=omit, passed_over=passed)


@pytest.mark.parametrize("case", CASES)
def test_every_entry_of_every_case(case: str, tmp_path: Path) -> None:
    """``replay()`` up to each entry, with and without skip_corrupt: the documented outcome and the tree."""
    state = materialize(DATA / case, tmp_path)
    for skip in (False, True):
        for pos in range(1, HEAD + 1):
            want = documented(case, pos, skip)
            out = tmp_path / f"out-{pos}-{skip}"
            why = (case, pos, skip, want)
            if want.refused is not None:
                with pytest.raises(want.refused), contextlib.redirect_stdout(io.StringIO()):
                    replay(state / "journal", out, until_seq=pos, skip_corrupt=skip)
                assert not out.exists(), why
                continue
            with contextlib.redirect_stdout(io.StringIO()):  # its progress bar
                r: ReplayResult = replay(state / "journal", out, until_seq=pos, skip_corrupt=skip)
            assert (r.checkpoint, r.last, bool(r.stopped)) == (want.base, want.last, want.stopped), (why, r)
            assert [n.split(" (")[0] for n in r.notes] == [
                f"passed over: checkpoint at seq {s}" for s in sorted(want.passed_over, reverse=True)
            ], (why, r.notes)
            listed = [k for k in r.skipped if k.startswith("segment ")]
            if want.lost:  # met, whether the replay went past the damage or ended inside it
                assert len(listed) == 1, (why, r.skipped)
            elif not want.lost:
                assert listed == [], (why, r.skipped)
            assert [k.split(":")[0] for k in r.skipped if k.startswith("checkpoint ")] == [
                f"checkpoint {want.base} file {p}" for p in want.omit
            ], (why, r.skipped)
            got = snapshot(out)
            assert got == without(want.last, lost=want.lost, base=want.base or 0, omit=want.omit), why
            if not (want.lost or want.omit):
                assert got == at(want.last), why
