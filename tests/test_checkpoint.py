"""Checkpoints (engine.checkpoint) and the replays that start from them: on random histories of puts,
touches, deletes, rmdirs and file and folder renames with recorded times, checkpoints at random
positions and the journal pruned up to one of them, a replay at many moments of the window equals the
tree the real applier left at that moment, byte for byte and mtime for mtime (hypothesis); moments
before the window are refused. Plus: a checkpoint costs its changed files (unchanged ones are one
shared inode) and a touch never changes an older checkpoint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tracemalloc
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import checkpoint
from engine.apply import Applier, PendingOp
from engine.digest import digest_bytes
from engine.errors import ConfigError
from engine.journal import Journal
from engine.model import Change, Op
from engine.replay import UntilTime, replay
from tests.pair import ROOT, Pair, wait_for
from tests.test_journal import put

NAMES = ["a", "b", "d/x", "d/y", "d/e/z", "f/x"]
FOLDERS = ["d", "d/e", "f"]
T0 = 1_764_064_800  # seconds: entry i of a history is journaled at T0 + 10 i
#: The time of each journaled entry, by seq - 1 (filled by _journal_and_oracle).
times: list[int] = []


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[Change, bytes | None]]:
    out: list[tuple[Change, bytes | None]] = []
    for i in range(draw(st.integers(1, 30))):
        kind = draw(
            st.sampled_from(["put", "put", "put", "touch", "delete", "rmdir", "rename", "rename_dir"])
        )
        if kind in ("put", "touch"):
            path = draw(st.sampled_from(NAMES))
            data = f"{path}-{i}".encode() * draw(st.integers(1, 3))
            out.append((put(path, data, mtime_ns=1_700_000_000_000_000_000 + i), data))
            if kind == "touch":
                touched = Change(0, Op.TOUCH, path, size=len(data), mtime_ns=1_600_000_000_000_000_000 + i)
                out.append((replace(touched, digest=digest_bytes(data)), None))
        elif kind == "delete":
            out.append((Change(0, Op.DELETE, draw(st.sampled_from(NAMES))), None))
        elif kind == "rmdir":
            out.append((Change(0, Op.RMDIR, draw(st.sampled_from(FOLDERS))), None))
        else:
            pool = NAMES if kind == "rename" else FOLDERS
            src, dst = draw(st.sampled_from(pool)), draw(st.sampled_from(pool))
            if dst == src or dst.startswith(src + "/") or src.startswith(dst + "/"):
                continue  # no file system does it, nothing journals it
            out.append((Change(0, Op.RENAME, src, dst=dst), None))
    return out or [(put("a", b"a"), b"a")]


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            full = Path(dirpath) / f
            out[full.relative_to(root).as_posix()] = (full.read_bytes(), full.stat().st_mtime_ns)
    return out


def _journal_and_oracle(
    base: Path, history: list[tuple[Change, bytes | None]]
) -> tuple[Path, list[dict[str, tuple[bytes, int]]]]:
    """The journal (one entry per segment, so that it prunes entry by entry) and the tree after each entry
    (index 0: before the first)."""
    folder = base / "state" / "journal"
    oracle_root = base / "oracle"
    oracle_root.mkdir()
    trees: list[dict[str, tuple[bytes, int]]] = [{}]
    times.clear()
    applier = Applier(oracle_root, fsync=False)
    try:
        with closing(Journal.open(folder, fsync=False, segment_bytes=1)) as j:
            for i, (c, data) in enumerate(history):
                if c.op is Op.RENAME and not (oracle_root / c.path).exists():
                    continue  # renaming what is not there fails on the source: it is never journaled
                entry = j.append(replace(c, ts_ns=(T0 + 10 * i) * 1_000_000_000), data)
                applier.apply_batch([PendingOp(entry, data=data)])
                trees.append(_snapshot(oracle_root))
                times.append(entry.ts_ns)
            j.commit()
    finally:
        applier.close()
    return folder, trees


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=histories(), data=st.data())
def test_a_replay_at_any_moment_of_the_window_is_the_tree_of_that_moment(
    tmp_path_factory: pytest.TempPathFactory, history: list[tuple[Change, bytes | None]], data: st.DataObject
) -> None:
    base = tmp_path_factory.mktemp("pitr")
    folder, trees = _journal_and_oracle(base, history)
    head = len(trees) - 1
    if head == 0:
        return  # every entry drawn was a rename of nothing: an empty journal
    cks = folder.parent / checkpoint.CHECKPOINTS
    positions = sorted(data.draw(st.sets(st.integers(1, head), max_size=4), label="checkpoints"))
    for p in positions:
        assert checkpoint.build(folder, cks, upto=p) is not None
    floor = data.draw(st.sampled_from([0, *positions]), label="prune up to")
    if floor:
        with closing(Journal.open(folder, fsync=False, segment_bytes=1)) as j:
            j.prune(acked=floor, keep_after_mtime=float("inf"))
            first = j.first_seq
    else:
        first = 1
    oldest = min((p for p in positions if p >= first - 1), default=None) if first > 1 else 0
    for n, m in enumerate(data.draw(st.lists(st.integers(0, head), min_size=1, max_size=5), label="moments")):
        out = base / f"out-{n}"
        answerable = oldest is not None and m >= oldest and (m >= 1 or first == 1)
        by_time = data.draw(st.booleans(), label="by time")
        moment = UntilTime(times[m - 1], f"entry {m}") if by_time and m >= 1 else None
        if not answerable:
            with pytest.raises(ConfigError):
                replay(folder, out, until_seq=None if moment else m, until=moment)
            assert not out.exists()
            continue
        if m == 0:
            continue  # the empty tree before the first entry: nothing to compare
        replay(folder, out, until_seq=None if moment else m, until=moment)
        assert _snapshot(out) == trees[m], (m, positions, floor)


def test_a_checkpoint_costs_its_changed_files_and_a_touch_never_changes_an_older_one(tmp_path: Path) -> None:
    history: list[tuple[Change, bytes | None]] = [
        (put(f"r/m{i}", b"x" * (100 + i)), b"x" * (100 + i)) for i in range(50)
    ]
    history.append((put("r/m0", b"new"), b"new"))
    touched = Change(0, Op.TOUCH, "r/m1", size=101, digest=digest_bytes(b"x" * 101), mtime_ns=5)
    history.append((touched, None))
    folder, _trees = _journal_and_oracle(tmp_path, history)
    cks = folder.parent / checkpoint.CHECKPOINTS
    first = checkpoint.build(folder, cks, upto=50)
    second = checkpoint.build(folder, cks, upto=52)
    assert first is not None and second is not None and (first.files, second.files) == (50, 50)
    same = (first.tree / "r" / "m7").stat(), (second.tree / "r" / "m7").stat()
    assert same[0].st_ino == same[1].st_ino, "an unchanged file is shared"
    assert (first.tree / "r" / "m0").read_bytes() == b"x" * 100 and (
        second.tree / "r" / "m0"
    ).read_bytes() == b"new"
    assert (second.tree / "r" / "m1").stat().st_mtime_ns == 5
    assert (first.tree / "r" / "m1").stat().st_mtime_ns != 5, "the touch did not reach the older checkpoint"
    assert checkpoint.build(folder, cks, upto=52) == second  # already there
    assert [c.seq for c in checkpoint.list_checkpoints(cks)] == [50, 52]


def test_expiry_and_the_prune_floor_keep_what_the_window_needs(tmp_path: Path) -> None:
    history: list[tuple[Change, bytes | None]] = [(put(f"f{i}", b"v"), b"v") for i in range(6)]
    folder, trees = _journal_and_oracle(tmp_path, history)
    cks = folder.parent / checkpoint.CHECKPOINTS
    for p in (2, 4, 6):
        checkpoint.build(folder, cks, upto=p)
    cps = checkpoint.list_checkpoints(cks)
    cutoff = (T0 + 10 * 4) * 1_000_000_000  # between entry 4 (T0 + 30) and entry 5
    assert checkpoint.prune_floor(cps, cutoff) == 4
    journal_id = cps[0].journal
    assert checkpoint.expire(cks, cutoff, journal_id) == 1  # the one at 2: the window starts at or after 4
    with closing(Journal.open(folder, fsync=False, segment_bytes=1)) as j:
        j.prune(acked=4, keep_after_mtime=float("inf"))
    replay(folder, tmp_path / "out", until_seq=5)
    assert _snapshot(tmp_path / "out") == trees[5]
    with pytest.raises(ConfigError, match="no checkpoint is at or before it"):
        replay(folder, tmp_path / "out2", until_seq=3)
    with pytest.raises(ConfigError, match="before the oldest checkpoint"):
        replay(folder, tmp_path / "out3", until=UntilTime((T0 + 10) * 1_000_000_000, "entry 2"))


def test_a_running_sender_checkpoints_prunes_up_to_its_checkpoint_and_every_moment_stays_answerable(
    pair: Pair,
) -> None:
    """`standby send` with a checkpoint every 3 s and no retention: the journal is pruned, but only up to a
    checkpoint, and `standby replay` still rebuilds the whole set as it was at any later entry."""
    import time

    pair.sender_extra = "checkpoint_minutes = 0.05\njournal_retain_hours = 0\nsegment_mb = 1"
    pair.write_config()
    room = pair.source / "databases" / "r1"
    room.mkdir(parents=True)
    pair.start("receive")
    pair.start("send")
    versions: list[dict[str, bytes]] = []
    for round_ in range(4):
        for i in range(40):
            (room / f"m{i:02d}.json").write_bytes(os.urandom(20_000 + round_))  # ~1 MB a round: segments
        pair.wait_converged()
        versions.append({p.name: p.read_bytes() for p in room.iterdir()})
        time.sleep(3.5)  # a checkpoint, then a prune up to it
    cks = pair.sender_state / checkpoint.CHECKPOINTS
    wait_for(lambda: len(checkpoint.list_checkpoints(cks)) >= 1, 30, "a checkpoint")
    with closing(Journal.open(pair.sender_state / "journal", fsync=False, readonly=True)) as j:
        first, head = j.first_seq, j.head
    assert first > 1, "acknowledged segments were pruned"
    oldest = checkpoint.list_checkpoints(cks)[0]
    assert oldest.seq >= first - 1, "never past the oldest checkpoint"
    out = pair.base / "rebuilt"
    r = _replay_cli(pair.config, out, "--pos", str(head))
    assert r.returncode == 0, r.stderr
    assert {p.name: p.read_bytes() for p in (out / "databases" / "r1").iterdir()} == versions[-1]
    r = subprocess.run(
        [sys.executable, "-m", "engine", "journal", "-c", str(pair.config), "list"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 0 and "checkpoints" in r.stdout and "recoverable: any moment from" in r.stdout, (
        r.stdout
    )
    pair.stop_all()


def test_the_passive_rebuilds_the_set_by_itself_after_the_actives_state_is_lost(pair: Pair) -> None:
    """The receiver keeps a journal of what it applied, with checkpoints: with the active's state folder
    deleted, the passive's own config replays the set as it was."""

    pair.receiver_extra = "checkpoint_minutes = 0.05"
    pair.write_config()
    room = pair.source / "databases" / "r1"
    room.mkdir(parents=True)
    pair.start("receive")
    pair.start("send")
    for i in range(30):
        (room / f"m{i:02d}.json").write_bytes(os.urandom(3000 + i))
    big = os.urandom(6 << 20)  # a large put: streamed, kept by reading back the file it became
    (room / "big.bin").write_bytes(big)
    pair.wait_converged()
    want = {p.name: p.read_bytes() for p in room.iterdir()}
    cks = pair.receiver_state / checkpoint.CHECKPOINTS
    wait_for(lambda: len(checkpoint.list_checkpoints(cks)) >= 1, 30, "the passive's checkpoint")
    pair.stop_all()
    shutil.rmtree(pair.sender_state)  # the active server is gone, its state with it
    passive_only = pair.base / "passive.toml"
    text = pair.config.read_text("utf-8")
    passive_only.write_text(text[text.index("[receiver]") :], "utf-8")
    out = pair.base / "rebuilt"
    r = _replay_cli(passive_only, out, "--at", "2100-01-01T00:00:00Z")
    assert r.returncode == 0, r.stderr
    assert {p.name: p.read_bytes() for p in (out / "databases" / "r1").iterdir()} == want


def test_checkpoints_of_another_journal_are_never_used_and_are_expired(tmp_path: Path) -> None:
    """A journal retired by a rejoin (or rebuilt) starts its seqs again: the old journal's checkpoints must
    not be taken for the new one's."""
    folder, _trees = _journal_and_oracle(tmp_path, [(put(f"old{i}", b"o"), b"o") for i in range(5)])
    cks = folder.parent / checkpoint.CHECKPOINTS
    assert checkpoint.build(folder, cks, upto=5) is not None
    shutil.move(str(folder), str(tmp_path / "retired-journal"))
    new = [(put(f"n{i}", b"n"), b"n") for i in range(6)]
    with closing(Journal.open(folder, fsync=False)) as j:
        for c, data in new:
            j.append(c, data)
        j.commit()
        new_id = j.id
    replay(folder, tmp_path / "out", until_seq=6)
    assert sorted(_snapshot(tmp_path / "out")) == [f"n{i}" for i in range(6)]
    assert checkpoint.build(folder, cks, upto=6) is not None  # a new chain, from the new journal's start
    assert checkpoint.expire(cks, 0, new_id) == 1  # the old journal's
    assert [c.journal for c in checkpoint.list_checkpoints(cks)] == [new_id]


def test_a_half_expired_checkpoint_is_never_listed_and_is_cleaned_at_the_next_build(tmp_path: Path) -> None:
    folder, _trees = _journal_and_oracle(tmp_path, [(put(f"f{i}", b"v"), b"v") for i in range(4)])
    cks = folder.parent / checkpoint.CHECKPOINTS
    first = checkpoint.build(folder, cks, upto=2)
    assert first is not None
    os.replace(first.path, first.path.with_name(f".expiring-{first.path.name}"))  # a crash mid-expiry
    assert checkpoint.list_checkpoints(cks) == []
    checkpoint.build(folder, cks, upto=4)
    assert not list(cks.glob(".expiring-*"))


def _replay_cli(config: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine", "replay", "-c", str(config), "--into", str(out), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_a_size_cap_moves_the_window_to_the_oldest_checkpoint_the_journal_fits_after(tmp_path: Path) -> None:
    """journal_retain_gb: segments past the cap go even inside the hours kept, but only down to a checkpoint
    (the newest one when even the entries after it are over the cap), so every moment left is answerable."""
    history: list[tuple[Change, bytes | None]] = [(put(f"f{i}", b"x" * 1000), b"x" * 1000) for i in range(8)]
    folder, trees = _journal_and_oracle(tmp_path, history)  # one entry per segment, at T0 + 10 (i - 1)
    cks = folder.parent / checkpoint.CHECKPOINTS
    for p in (2, 4, 6):
        checkpoint.build(folder, cks, upto=p)
    cps = checkpoint.list_checkpoints(cks)
    with closing(Journal.open(folder, fsync=False, segment_bytes=1)) as j:
        sizes = [(first, path.stat().st_size) for path, first in j.segments()]
        seg = sizes[0][1]
        assert [f for f, _ in sizes] == list(range(1, 9)) and all(s == seg for _f, s in sizes)
        # Entries 5..8 after the checkpoint at 4 fit in 4 segments; 3..8 after the one at 2 do not.
        assert checkpoint.cap_cutoff(sizes, cps, 4 * seg) == cps[1].ts_ns
        assert checkpoint.cap_cutoff(sizes, cps, 100 * seg) == cps[0].ts_ns  # all fit: the oldest
        assert checkpoint.cap_cutoff(sizes, cps, 1) == cps[2].ts_ns  # never past the newest
        assert checkpoint.cap_cutoff(sizes, [], 1) == 0  # no checkpoint: the cap cannot cut
        now = (T0 + 1000) / 1.0
        # No cap, or under it: the hours decide (a year back here); over it: just after the checkpoint at 4.
        assert checkpoint.retention_cutoff(j, folder.parent, 8760, 0, now) == now - 8760 * 3600
        assert checkpoint.retention_cutoff(j, folder.parent, 8760, 1.0, now) == now - 8760 * 3600
        cap_gb = 4 * seg / (1 << 30)
        cutoff = checkpoint.retention_cutoff(j, folder.parent, 8760, cap_gb, now)
        assert cutoff == cps[1].ts_ns / 1e9 + 1.0
        # What the sender and the receiver then do with it: the floor is the checkpoint at 4.
        floor, newest = checkpoint.chores(folder.parent, j.id, j.first_seq, j.head, cutoff, 60, _not_due())
        assert (floor, newest) == (4, 6)
        for path, _first in j.segments():  # the prune's mtime test: segments are as old as their entries
            os.utime(path, (T0, T0))
        j.prune(floor, cutoff)
        assert j.first_seq == 5
    assert [c.seq for c in checkpoint.list_checkpoints(cks)] == [4, 6]
    replay(folder, tmp_path / "out", until_seq=5)
    assert _snapshot(tmp_path / "out") == trees[5]
    with pytest.raises(ConfigError, match="no checkpoint is at or before it"):
        replay(folder, tmp_path / "out2", until_seq=3)


def _not_due() -> checkpoint.Cadence:
    c = checkpoint.Cadence()
    c.last = float("inf")  # built just now: no checkpoint is due
    return c


def test_a_checkpoint_the_journal_no_longer_goes_on_from_is_expired_and_never_the_newest(
    tmp_path: Path,
) -> None:
    """After the disk-pressure path pruned past the newest checkpoint (the chain broken), that checkpoint
    can never be replayed from: housekeeping deletes it and never reports it as the newest again."""
    history: list[tuple[Change, bytes | None]] = [(put(f"f{i}", b"v"), b"v") for i in range(6)]
    folder, _trees = _journal_and_oracle(tmp_path, history)
    cks = folder.parent / checkpoint.CHECKPOINTS
    checkpoint.build(folder, cks, upto=2)
    with closing(Journal.open(folder, fsync=False, segment_bytes=1)) as j:
        j.prune(acked=4, keep_after_mtime=0.0, pressure=True)
        assert j.first_seq == 5
        _floor, newest = checkpoint.chores(folder.parent, j.id, j.first_seq, j.head, 0.0, 60, _not_due())
    assert newest == 0 and checkpoint.list_checkpoints(cks) == []


def test_a_damaged_checkpoint_is_passed_over_by_a_replay_and_set_aside_by_the_next_build(
    tmp_path: Path,
) -> None:
    """Each checkpoint's manifest names its files' sizes, times and xxh3: a replay checks the checkpoint it
    starts from and passes over a damaged one for an older one (saying so); the next build moves a
    damaged one aside rather than carry its damage on; with nothing older and the journal pruned, the
    replay is refused, or rebuilt without the damaged files with --skip-corrupt (listed)."""
    history: list[tuple[Change, bytes | None]] = [
        (put(f"f{i}", f"v{i}".encode()), f"v{i}".encode()) for i in range(6)
    ]
    folder, trees = _journal_and_oracle(tmp_path, history)
    cks = folder.parent / checkpoint.CHECKPOINTS
    for p in (2, 4):
        checkpoint.build(folder, cks, upto=p)
    older, newer = checkpoint.list_checkpoints(cks)
    assert checkpoint.verify(newer) == []
    damaged = newer.tree / "f3"  # its own file (f0, f1 are shared with the older one)
    damaged.write_bytes(b"V3")  # same size: only the content check sees it
    os.utime(damaged, ns=(trees[4]["f3"][1], trees[4]["f3"][1]))
    assert [p for p, _ in checkpoint.verify(newer)] == ["f3"]
    assert checkpoint.verify(newer, content=False) == []
    res = replay(folder, tmp_path / "out", until_seq=5)
    assert res.checkpoint == 2 and not res.stopped
    assert any("checkpoint at seq 4" in n and "f3" in n for n in res.notes), res.notes
    assert _snapshot(tmp_path / "out") == trees[5]
    # A missing file is seen by size and time too: the next build sets the checkpoint aside.
    (newer.tree / "f2").unlink()
    assert ("f2", "missing") in checkpoint.verify(newer, content=False)
    built = checkpoint.build(folder, cks, upto=6)
    assert built is not None and checkpoint.verify(built) == []
    assert [c.seq for c in checkpoint.list_checkpoints(cks)] == [2, 6]
    assert [p.name.startswith(checkpoint.DAMAGED_PREFIX) for p in cks.iterdir() if not p.name.isdigit()] == [
        True
    ]
    # Only a damaged checkpoint left, the journal pruned before it: refused, or --skip-corrupt.
    shutil.rmtree(built.path)
    (older.tree / "f1").write_bytes(b"xx")
    with closing(Journal.open(folder, fsync=False, segment_bytes=1)) as j:
        j.prune(acked=2, keep_after_mtime=float("inf"))
    with pytest.raises(checkpoint.CheckpointDamaged, match=r"checkpoint at seq 2.*f1.*--skip-corrupt"):
        replay(folder, tmp_path / "out2", until_seq=5)
    res = replay(folder, tmp_path / "out3", until_seq=5, skip_corrupt=True)
    assert any("f1" in k for k in res.skipped), res.skipped
    want = {k: v for k, v in trees[5].items() if k != "f1"}
    assert _snapshot(tmp_path / "out3") == want


def _build_peak(base: Path, files: int) -> int:
    """The most memory Python held while building the first checkpoint of a journal of ``files`` puts
    (one folder per 100 files), over what it held before."""
    folder = base / "journal"
    with closing(Journal.open(folder, fsync=False)) as j:
        for i in range(files):
            data = b"m%06d" % i * 20
            j.append(put(f"room-{i // 100:03d}/meeting-{i:06d}.json", data), data)
        j.commit()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        made = checkpoint.build(folder, base / checkpoint.CHECKPOINTS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert made is not None and made.files == files
    return peak - before


def test_a_checkpoint_is_built_in_memory_bounded_by_its_batch_not_by_the_set(tmp_path: Path) -> None:
    """A large set's checkpoint must not hold something for every file at once (a digest per file in the
    applier's cache, the manifest as one list of lines): the allocator keeps what a peak took, so a
    build of 100,000 files left the process about 70 MB larger for good. What still grows with the set is
    the journal's opening (about 200 bytes an entry, while it checks them); it was about 700 bytes a file."""
    small = _build_peak(tmp_path / "small", 1_200)
    large = _build_peak(tmp_path / "large", 6_000)
    per_file = (large - small) / (6_000 - 1_200)
    assert per_file < 300, f"the peak grows by {per_file:.0f} bytes a file ({small:,} then {large:,} bytes)"


def test_a_manifest_is_read_line_by_line_at_newlines_alone_and_a_damaged_line_is_named(
    tmp_path: Path,
) -> None:
    odd = "r/a\u2028b\u0085c"  # str.splitlines would cut these names in two
    history: list[tuple[Change, bytes | None]] = [(put(odd, b"one"), b"one"), (put("r/c", b"two"), b"two")]
    folder, _trees = _journal_and_oracle(tmp_path, history)
    made = checkpoint.build(folder, folder.parent / checkpoint.CHECKPOINTS)
    assert made is not None
    manifest = checkpoint.read_manifest(made)
    assert manifest is not None and set(manifest) == {odd, "r/c"}
    assert manifest[odd].digest == digest_bytes(b"one").hex() and manifest["r/c"].size == 3
    assert checkpoint.verify(made) == []
    written = (made.path / checkpoint.MANIFEST).read_bytes()
    for ends in (b"\r\n", b"\r"):  # a manifest whose line ends were converted is still read
        (made.path / checkpoint.MANIFEST).write_bytes(written.replace(b"\n", ends) + ends)
        assert checkpoint.read_manifest(made) == manifest
    (made.path / checkpoint.MANIFEST).write_bytes(written)
    lines = written.split(b"\n")
    lines[1] = lines[1][:-3]
    (made.path / checkpoint.MANIFEST).write_bytes(b"\n".join(lines))
    [(where, what)] = checkpoint.verify(made)
    assert where == "" and what.startswith(
        f"checkpoint at seq 2: {checkpoint.MANIFEST} line 2 is damaged ("
    ), what
