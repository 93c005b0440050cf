"""Recovery past damage: one test per finding of the review that led to a589aa1, on real files in tmp_path.

Each test builds a journal (and checkpoints) with the real engine, damages it the way the review did, and
checks the outcome exactly: the rebuilt tree, ``ReplayResult`` (last entry applied, why it stopped, what
was skipped), the salvage's head and skips, the checkpoints listed, what housekeeping returns, and what
``verify`` finds. Before a589aa1 each of them failed: an entry lost in silence, a crash, a false stop, a
silent end, a foreign journal's entries applied, a wrong manifest, or checkpointing given up for good.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from contextlib import closing
from pathlib import Path

from engine import checkpoint, codec
from engine.journal import Salvage, Skip
from engine.replay import ReplayResult, replay
from tests.test_journal import jopen, put, seqs

T0 = 1_764_064_800  # entry i is journaled at T0 + 10 * i seconds
MTIME_NS = 1_700_000_000_000_000_000  # every file has this time: only its content tells them apart
ONE_ENTRY = 1  # segment_bytes: every segment holds exactly one entry


def default_name(i: int) -> str:
    return f"f{i}"


def default_data(i: int) -> bytes:
    return f"v{i}".encode() * 20


def make(
    state: Path,
    n: int,
    segment_bytes: int = 64 << 20,
    name: Callable[[int], str] = default_name,
    data: Callable[[int], bytes] = default_data,
) -> Path:
    """A journal in ``state/journal`` of entries 1..n, each committed: entry i puts ``name(i)`` =
    ``data(i)``. Its folder."""
    folder = state / "journal"
    with closing(jopen(folder, segment_bytes=segment_bytes)) as j:
        for i in range(1, n + 1):
            j.append(put(name(i), data(i), MTIME_NS, (T0 + 10 * i) * 10**9), data(i))
            j.commit()
    return folder


def spans(folder: Path) -> dict[int, tuple[Path, int, int]]:
    """{seq: (segment, start, end)}: where each entry of an intact journal lies, found by walking the
    frames of its segments (an entry is its header frame and its content frames, up to the next entry)."""
    out: dict[int, tuple[Path, int, int]] = {}
    for seg in sorted(folder.glob("*.sbj")):
        data = seg.read_bytes()
        starts: list[tuple[int, int]] = []
        off = 0
        while off < len(data):
            res = codec.decode_at(data, off)
            assert not isinstance(res, codec.Torn), f"{seg.name} is torn at {off}"
            value, nxt = res
            if isinstance(value, dict) and value.get("k") == "e":
                starts.append((int(value["s"]), off))
            off = nxt
        ends = [start for _, start in starts[1:]] + [len(data)]
        out.update({seq: (seg, start, end) for (seq, start), end in zip(starts, ends, strict=True)})
    return out


def flip(path: Path, at: int) -> None:
    """Bit rot: every bit of the byte at ``at``."""
    b = bytearray(path.read_bytes())
    b[at] ^= 0xFF
    path.write_bytes(bytes(b))


def damage_header(where: dict[int, tuple[Path, int, int]], seq: int) -> tuple[Path, int, int]:
    """Damage the header frame of entry ``seq`` (its content frames stay whole); where the entry lies."""
    seg, start, end = where[seq]
    flip(seg, start + 12)
    return seg, start, end


def salvaged(folder: Path) -> Salvage:
    with closing(jopen(folder, salvaging=True)) as j:
        assert j.salvage is not None
        return j.salvage


def where_lost(k: Skip) -> tuple[Path, int, int | None, int, int | None]:
    """A skip's place: (segment, start, resume, after, next_seq)."""
    return k.path, k.start, k.resume, k.after, k.next_seq


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by its relative path, with its bytes."""
    out: dict[str, bytes] = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[p.relative_to(root).as_posix()] = p.read_bytes()
    return out


def the_set(seqs_: Iterable[int], name: Callable[[int], str] = default_name) -> dict[str, bytes]:
    """The tree the entries ``seqs_`` of ``make`` leave behind (every entry puts its own file)."""
    return {name(i): default_data(i) for i in seqs_}


# ---------------------------------------------------------------------------------------------------------
# The journal read past damage


def test_a_seek_past_damage_reads_the_first_whole_entry_after_it(tmp_path: Path) -> None:
    """Finding 1: damage to the entry a checkpoint was built at; the replay from that checkpoint seeks to
    the next entry through the damage, which used to read and drop that entry (f6 lost in silence)."""
    folder = make(tmp_path / "state", 10)
    checkpoint.build(folder, checkpoint.folder_of(tmp_path / "state"), upto=5)
    damage_header(spans(folder), 5)

    with closing(jopen(folder, salvaging=True)) as j:
        assert seqs(j, 6) == [6, 7, 8, 9, 10]
    res = replay(folder, tmp_path / "out")
    assert res == ReplayResult(first=6, last=10, checkpoint=5)
    assert tree(tmp_path / "out") == the_set(range(1, 11))


def test_two_damaged_stretches_in_a_row_are_both_passed_over(tmp_path: Path) -> None:
    """Finding 3: entry 5's header and entry 6's content damaged, the second skip starting where the first
    resumes; --skip-corrupt used to die on a JournalDamaged at entry 6."""
    folder = make(tmp_path / "state", 10)
    where = spans(folder)
    seg, start5, _ = damage_header(where, 5)
    _, start6, end6 = where[6]
    flip(seg, end6 - 3)  # inside entry 6's one content frame

    sv = salvaged(folder)
    assert sv.head == 10
    assert [where_lost(k) for k in sv.skips] == [
        (seg, start5, start6, 4, 6),
        (seg, start6, end6, 5, 7),
    ]
    res = replay(folder, tmp_path / "out", skip_corrupt=True)
    assert (res.last, res.stopped, res.skipped) == (10, "", tuple(str(k) for k in sv.skips))
    assert tree(tmp_path / "out") == the_set(r for r in range(1, 11) if r not in (5, 6))


def test_a_gap_after_a_segment_damaged_to_its_end_may_be_a_missing_segment_and_says_so(
    tmp_path: Path,
) -> None:
    """Finding 4: segment 5 damaged to its end and segment 6 deleted; the entries between are listed as
    lost in the damage *or in a missing segment* (the skip used to claim them for the damage alone)."""
    folder = make(tmp_path / "state", 10, segment_bytes=ONE_ENTRY)
    where = spans(folder)
    seg5, start5, _ = damage_header(where, 5)
    seg6 = where[6][0]
    seg6.unlink()

    sv = salvaged(folder)
    assert (sv.head, sv.missing) == (10, "")
    assert [where_lost(k) for k in sv.skips] == [(seg5, start5, None, 4, 7)]
    skip = sv.skips[0]
    assert skip.problem.endswith("; or in a missing segment")
    assert f"bytes {start5} to its end: entries 5..6 (" in str(skip)
    res = replay(folder, tmp_path / "out", skip_corrupt=True)
    assert (res.last, res.stopped, res.skipped) == (10, "", (str(skip),))
    assert tree(tmp_path / "out") == the_set(r for r in range(1, 11) if r not in (5, 6))


def test_damage_the_journal_ends_in_stops_a_replay_to_the_head(tmp_path: Path) -> None:
    """Finding 5: the header of the last entry damaged, its content frame whole after it (so not a torn
    tail): the replay to the head used to end at entry 5 saying nothing (exit 0, f6 silently absent)."""
    folder = make(tmp_path / "state", 6)
    seg, start6, _ = damage_header(spans(folder), 6)

    sv = salvaged(folder)
    assert sv.head == 5
    assert [where_lost(k) for k in sv.skips] == [(seg, start6, None, 5, None)]
    skip = sv.skips[0]
    res = replay(folder, tmp_path / "out")
    assert res == ReplayResult(first=1, last=5, stopped=f"the journal is damaged after it: {skip}")
    assert tree(tmp_path / "out") == the_set(range(1, 6))


def test_stray_bytes_after_a_sealed_segments_last_entry_lose_no_entry(tmp_path: Path) -> None:
    """Finding 6: bytes after the last entry of segment 3 (segment 4 starts at entry 4): nothing is lost,
    so no replay stops there nor lists a skip (one used to stop at entry 3)."""
    folder = make(tmp_path / "state", 6, segment_bytes=ONE_ENTRY)
    seg3, _, end3 = spans(folder)[3]
    with open(seg3, "ab") as f:
        f.write(b"\x00" * 20 + codec.encode(b"x" * 50))

    sv = salvaged(folder)
    assert sv.head == 6
    assert [where_lost(k) for k in sv.skips] == [(seg3, end3, None, 3, 4)]
    skip = sv.skips[0]
    assert skip.lost == "no whole entry (bytes between two entries)"
    assert not skip.touches(1, 6)
    for skip_corrupt in (False, True):
        out = tmp_path / f"out-{skip_corrupt}"
        res = replay(folder, out, skip_corrupt=skip_corrupt)
        assert res == ReplayResult(first=1, last=6)
        assert tree(out) == the_set(range(1, 7))


def test_resync_never_resumes_inside_a_puts_content_holding_another_journal(tmp_path: Path) -> None:
    """Finding 7: entry 4 puts a file that is itself a journal segment (12 entries FOREIGN1..12), and its
    header is damaged; the salvage used to resume inside that content and apply the foreign entries."""

    def foreign(i: int) -> str:
        return f"FOREIGN{i}"

    inner = make(tmp_path / "inner", 12, name=foreign)
    [inner_seg] = sorted(inner.glob("*.sbj"))
    segment_bytes = inner_seg.read_bytes()

    def data(i: int) -> bytes:
        return segment_bytes if i == 4 else default_data(i)

    folder = make(tmp_path / "state", 8, data=data)
    where = spans(folder)
    seg, start4, _ = damage_header(where, 4)
    start5 = where[5][1]

    sv = salvaged(folder)
    assert sv.head == 8
    assert [where_lost(k) for k in sv.skips] == [(seg, start4, start5, 3, 5)]
    skip = sv.skips[0]
    res = replay(folder, tmp_path / "out", skip_corrupt=True)
    assert (res.last, res.stopped, res.skipped) == (8, "", (str(skip),))
    assert tree(tmp_path / "out") == the_set(r for r in range(1, 9) if r != 4)


def test_a_crash_while_creating_a_segment_leaves_replays_from_the_head_working(tmp_path: Path) -> None:
    """Finding 11: an empty segment 7 after the head (the writer crashed creating it) is the journal's
    end; a replay from the checkpoint at the head used to open it and raise JournalDamaged."""
    folder = make(tmp_path / "state", 6)
    checkpoint.build(folder, checkpoint.folder_of(tmp_path / "state"), upto=6)
    (folder / f"{7:020d}.sbj").write_bytes(b"")

    assert salvaged(folder) == Salvage(head=6, segments=2)
    for until_seq in (None, 6):
        out = tmp_path / f"out-{until_seq}"
        res = replay(folder, out, until_seq=until_seq)
        assert res == ReplayResult(first=7, last=6, checkpoint=6)
        assert tree(out) == the_set(range(1, 7))


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def test_a_restored_state_folder_gets_digests_read_not_taken_by_inode_number(tmp_path: Path) -> None:
    """Finding 8, made deterministic: the state folder is restored from a copy (shutil.copytree: same
    times, new inode numbers) and the file system reuses the old numbers, so each number the manifest
    recorded now names another file of the same size and time. The next checkpoint used to take each
    file's digest from the file that had its number: a wrong manifest, 'content differs' everywhere."""
    n = 4

    def data(i: int) -> bytes:
        return f"{i:08d}".encode() * 8  # same size and time, other content

    state = tmp_path / "state"
    make(state, n, data=data)
    checkpoint.build(state / "journal", checkpoint.folder_of(state), upto=n)

    restored = tmp_path / "restored"
    shutil.copytree(state, restored)
    cks = checkpoint.folder_of(restored)
    [c1] = checkpoint.list_checkpoints(cks)
    old_tree = checkpoint.list_checkpoints(checkpoint.folder_of(state))[0].tree
    names = [f"f{i}" for i in range(1, n + 1)]
    old_ino = {name: (old_tree / name).stat().st_ino for name in names}  # what a manifest would record
    for name, other in zip(names, names[1:] + names[:1], strict=True):
        # the restored file `name` lands on the inode number `other` had: its content, its time
        reused = old_tree / other
        st = (c1.tree / name).stat()
        with open(reused, "r+b") as f:
            f.write((c1.tree / name).read_bytes())
        os.utime(reused, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(reused, c1.tree / name)
    for name, other in zip(names, names[1:] + names[:1], strict=True):
        assert (c1.tree / name).stat().st_ino == old_ino[other]  # the number names another file
    assert checkpoint.verify(c1) == []  # the restored checkpoint itself is whole

    with closing(jopen(restored / "journal")) as j:
        j.append(put("new", b"n", MTIME_NS, (T0 + 10 * (n + 1)) * 10**9), b"n")
        j.commit()
    c2 = checkpoint.build(restored / "journal", cks, upto=n + 1)
    assert c2 is not None and c2.seq == n + 1
    assert checkpoint.verify(c2) == []
    assert tree(c2.tree) == {**{f"f{i}": data(i) for i in range(1, n + 1)}, "new": b"n"}


def test_a_stray_file_in_the_only_base_checkpoint_never_ends_checkpointing(tmp_path: Path) -> None:
    """Finding 9: the journal goes on only from the checkpoint at 6 (entries before it pruned) and a stray
    .DS_Store appears in its tree. Housekeeping used to set it aside and then find nothing to build from:
    NO_FLOOR for good, and the checkpoint gone from the list. Now the build leaves the stray file out."""
    state = tmp_path / "state"
    folder = make(state, 8, segment_bytes=ONE_ENTRY)
    cks = checkpoint.folder_of(state)
    checkpoint.build(folder, cks, upto=6)
    with closing(jopen(folder, segment_bytes=ONE_ENTRY)) as j:
        j.prune(acked=6, keep_after_mtime=float("inf"))
        jid, first, head = j.id, j.first_seq, j.head
    assert (first, head) == (7, 8)
    (cks / "000000000006" / "tree" / ".DS_Store").write_bytes(b"\0" * 6148)

    cutoff = T0 + 65.0  # after entry 6 (the checkpoint at 6 is the floor), before entry 8
    assert checkpoint.chores(state, jid, first, head, cutoff, 60, checkpoint.Cadence()) == (6, 8)
    listed = checkpoint.list_checkpoints(cks)
    assert [c.seq for c in listed] == [6, 8]
    assert checkpoint.verify(listed[0]) == [(".DS_Store", checkpoint.EXTRA)]  # kept, as it was
    assert checkpoint.verify(listed[1]) == []
    assert tree(listed[1].tree) == the_set(range(1, 9))

    res = replay(folder, tmp_path / "out", skip_corrupt=True, until_seq=7)
    assert res == ReplayResult(
        first=7, last=7, checkpoint=6, skipped=(f"checkpoint 6 file .DS_Store: {checkpoint.EXTRA}",)
    )
    assert tree(tmp_path / "out") == the_set(range(1, 8))


def test_a_name_holding_a_line_separator_keeps_its_checkpoint_whole(tmp_path: Path) -> None:
    """Finding 12: a file named with U+2028 (a legal name) split its manifest line, so every checkpoint
    holding it read as damaged: passed over by replays, refused once the journal was pruned."""
    odd = "notes\u2028draft.txt"

    def name(i: int) -> str:
        return odd if i == 2 else default_name(i)

    state = tmp_path / "state"
    folder = make(state, 6, segment_bytes=ONE_ENTRY, name=name)
    c = checkpoint.build(folder, checkpoint.folder_of(state), upto=4)
    assert c is not None
    assert checkpoint.verify(c) == []
    manifest = checkpoint.read_manifest(c)
    assert manifest is not None and sorted(manifest) == sorted(name(i) for i in range(1, 5))
    with closing(jopen(folder, segment_bytes=ONE_ENTRY)) as j:
        j.prune(acked=4, keep_after_mtime=float("inf"))
        assert j.first_seq == 5

    res = replay(folder, tmp_path / "out")
    assert res == ReplayResult(first=5, last=6, checkpoint=4)
    assert tree(tmp_path / "out") == the_set(range(1, 7), name)
