"""The durable journal, on real files in tmp_path.

Covers appending (whole and streamed puts, deletes, renames), group commit, cursors and ``read_raw``,
reopening, segment rotation, pruning, and the torn tail: a journal cut anywhere inside its last entry, or
with its last frame damaged, reopens at the last whole entry and carries on with consecutive seqs. Damage
that is not a torn tail (a whole frame that is no valid entry, a bad frame with a whole frame after it) is
refused, naming segment and offset, and nothing is cut. Cursors read only committed bytes. Most tests run
with ``fsync=False`` for speed; the reopen test runs with fsync on.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import shutil
import warnings
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from engine import codec
from engine import journal as journal_mod
from engine.digest import digest_bytes
from engine.errors import JournalDamaged, JournalError
from engine.journal import DEFAULT_SEGMENT_BYTES, END_HINT, RECOVERY_HINT, Cursor, Entry, Journal
from engine.model import CHUNK_SIZE, Change, Op

# A segment header is 87 bytes for small seqs; with this limit every segment holds exactly one small
# entry, and rotation never starts from an empty segment (see the segment_bytes-below-header bug below).
ONE_ENTRY_SEGMENTS = 100
BIG = bytes(range(256)) * (CHUNK_SIZE * 5 // 2 // 256)  # 2.5 MiB: three chunks, the last one short


def jopen(folder: Path, **kw: Any) -> Journal:
    kw.setdefault("fsync", False)
    return Journal.open(folder, **kw)


def delete(path: str) -> Change:
    return Change(0, Op.DELETE, path)


def rename(src: str, dst: str) -> Change:
    return Change(0, Op.RENAME, src, dst=dst)


def put(path: str, content: bytes, mtime_ns: int = 0, ts_ns: int = 0) -> Change:
    return Change(
        0, Op.PUT, path, size=len(content), mtime_ns=mtime_ns, digest=digest_bytes(content), ts_ns=ts_ns
    )


def stream_put(j: Journal, path: str, content: bytes, step: int = CHUNK_SIZE) -> Change | None:
    appender = j.begin_put(put(path, content))
    for i in range(0, len(content), step):
        appender.write(content[i : i + step])
    return appender.finish()


def entries(j: Journal, seq: int = 1) -> list[Entry]:
    with closing(j.cursor(seq)) as cur:
        out: list[Entry] = []
        while (e := cur.next()) is not None:
            out.append(e)
        return out


def seqs(j: Journal, seq: int = 1) -> list[int]:
    return [e.change.seq for e in entries(j, seq)]


def last_segment(j: Journal) -> Path:
    return j.segments()[-1][0]


def entry_frames(change: Change, content: bytes = b"") -> list[Any]:
    """The frames an entry is made of, as decoded values: its header, then its content chunks."""
    header = {"k": "e", **change.to_wire()}
    return [header] + [content[i : i + CHUNK_SIZE] for i in range(0, len(content), CHUNK_SIZE)]


def decode_all(data: bytes) -> list[Any]:
    d = codec.FrameDecoder()
    d.feed(data)
    out: list[Any] = []
    while True:
        ok, value = d.next()
        if not ok:
            assert d.buffered == 0, "bytes left that are not a whole frame"
            return out
        out.append(value)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def restore(folder: Path, snap: dict[str, bytes]) -> None:
    for p in folder.iterdir():
        if p.name not in snap:
            p.unlink()
    for name, data in snap.items():
        (folder / name).write_bytes(data)


# ---------------------------------------------------------------------------------------------------------
# Append, commit, read back


def test_append_commit_and_read_back(tmp_path: Path) -> None:
    with closing(jopen(tmp_path / "j")) as j:
        assert (j.head, j.pending, j.first_seq) == (0, 0, 1)
        small = b"hello"
        made = [
            j.append(delete("a")),
            j.append(Change(0, Op.MKDIR, "d")),
            j.append(put("d/f", small, mtime_ns=123, ts_ns=456), small),
            j.append(rename("d/f", "d/g")),
            j.append(Change(0, Op.RMDIR, "x")),
            stream_put(j, "big", BIG),
            j.append(put("empty", b""), b""),
            stream_put(j, "streamed-small", small),
        ]
        assert all(c is not None for c in made)
        assert [c.seq for c in made if c] == list(range(1, 9))
        assert j.pending == 8
        assert j.head == 0, "nothing is durable before commit"
        assert j.commit() == 8
        assert j.head == 8

        got = entries(j)
        assert [e.change for e in got] == made
        contents = {e.change.path: b"".join(e.chunks) for e in got if e.change.op is Op.PUT}
        assert contents == {"d/f": small, "big": BIG, "empty": b"", "streamed-small": small}
        big = next(e for e in got if e.change.path == "big")
        assert big.change.chunks == 3 == len(big.chunks)
        assert all(len(c) <= CHUNK_SIZE for c in big.chunks)
        assert big.change.digest == digest_bytes(BIG) and big.change.size == len(BIG)
        assert got[2].change.mtime_ns == 123 and got[2].change.ts_ns == 456
        assert got[3].change.dst == "d/g"


def test_cursor_from_every_seq(tmp_path: Path) -> None:
    with closing(jopen(tmp_path / "j")) as j:
        for i in range(6):
            j.append(put(f"f{i}", b"x" * i), b"x" * i)
        j.commit()
        for start in range(1, 8):
            assert seqs(j, start) == list(range(start, 7))


def test_cursor_header_then_chunks_or_skip(tmp_path: Path) -> None:
    with closing(jopen(tmp_path / "j")) as j:
        stream_put(j, "big", BIG)
        j.append(delete("after"))
        j.commit()
        with closing(j.cursor(1)) as cur:
            h = cur.next_header()
            assert h is not None and h.path == "big"
            with pytest.raises(JournalError):
                cur.next_header()  # the chunks must be read or skipped first
            cur.skip_chunks()
            h2 = cur.next_header()
            assert h2 is not None and h2.path == "after"
            assert cur.next_header() is None
        with closing(j.cursor(1)) as cur:
            assert cur.next_header() is not None
            assert b"".join(cur.chunks()) == BIG


def test_cursor_outside_the_kept_range_raises(tmp_path: Path) -> None:
    with closing(jopen(tmp_path / "j", fsync=True)) as j:
        assert entries(j, 1) == []  # an empty journal can be read from seq 1
        for bad in (0, -1, 2):
            with pytest.raises(JournalError):
                j.cursor(bad)
        for i in range(3):
            j.append(delete(f"f{i}"))
        with pytest.raises(JournalError):
            j.cursor(2)  # appended but not durable
        j.commit()
        assert entries(j, 4) == []
        for bad in (0, 5, 100):
            with pytest.raises(JournalError):
                j.cursor(bad)


def test_entries_past_the_durable_head_are_never_returned(tmp_path: Path) -> None:
    with closing(jopen(tmp_path / "j")) as j:
        j.append(delete("a"))
        j.append(delete("b"))
        j.commit()
        # Large enough to pass the write buffer: these bytes are on disk, but not committed.
        pending = b"p" * 200_000
        j.append(put("c", pending), pending)
        with closing(j.cursor(1)) as cur, closing(j.cursor(1)) as raw_cur:
            assert [cur.next(), cur.next()] != [None, None]
            assert cur.next() is None
            raw, done = raw_cur.read_raw()
            assert [c.seq for c in done] == [1, 2]
            assert len(decode_all(raw)) == 2
            assert raw_cur.read_raw() == (b"", [])

            j.commit()  # the same cursors now see entry 3
            e = cur.next()
            assert e is not None and e.change.seq == 3 and b"".join(e.chunks) == pending
            raw, done = raw_cur.read_raw()
            assert [c.seq for c in done] == [3]

            # A put still being streamed is invisible, even across commits.
            appender = j.begin_put(put("d", BIG))
            appender.write(BIG[:CHUNK_SIZE])
            j.commit()
            assert j.head == 3
            assert cur.next() is None
            assert raw_cur.read_raw() == (b"", [])
            appender.write(BIG[CHUNK_SIZE : 2 * CHUNK_SIZE])
            appender.write(BIG[2 * CHUNK_SIZE :])
            assert appender.finish() is not None
            assert cur.next() is None, "finished but not committed"
            assert j.commit() == 4
            e = cur.next()
            assert e is not None and e.change.seq == 4 and b"".join(e.chunks) == BIG
            assert cur.next() is None


# ---------------------------------------------------------------------------------------------------------
# Streamed puts: abort and refused content


@pytest.mark.parametrize("reopened", [False, True], ids=["fresh", "reopened"])
def test_put_appender_abort_removes_its_bytes(tmp_path: Path, reopened: bool) -> None:
    folder = tmp_path / "j"
    j = jopen(folder)
    j.append(delete("a"))
    j.append(put("b", b"bee"), b"bee")
    j.commit()
    if reopened:  # the segment is then held open for append ("ab"), not written ("wb")
        j.close()
        j = jopen(folder)
    with closing(j):
        seg = last_segment(j)
        before = seg.read_bytes()
        appender = j.begin_put(put("big", BIG))
        appender.write(BIG[:CHUNK_SIZE])
        appender.write(BIG[CHUNK_SIZE : 2 * CHUNK_SIZE])
        appender.abort()
        assert seg.read_bytes() == before
        assert (j.pending, j.head) == (2, 2)
        assert j.append(delete("c")).seq == 3
        assert j.commit() == 3
        assert seqs(j) == [1, 2, 3]
    with closing(jopen(folder)) as j:
        assert j.head == 3
        assert [e.change.path for e in entries(j)] == ["a", "b", "c"]


WRONG_CONTENT: dict[str, tuple[bytes, list[bytes]]] = {
    # case: (content the header announces, chunks actually written)
    "wrong-digest": (b"0123456789", [b"0123456780"]),
    "too-short": (b"0123456789", [b"012345678"]),
    "too-long": (b"0123456789", [b"0123456789!"]),
    "nothing-written": (b"0123456789", []),
    "big-missing-last-chunk": (BIG, [BIG[:CHUNK_SIZE], BIG[CHUNK_SIZE : 2 * CHUNK_SIZE]]),
    "big-one-byte-flipped": (
        BIG,
        [BIG[:CHUNK_SIZE], BIG[CHUNK_SIZE : 2 * CHUNK_SIZE], b"\xff" + BIG[2 * CHUNK_SIZE + 1 :]],
    ),
}


@pytest.mark.parametrize("case", list(WRONG_CONTENT))
def test_finish_with_wrong_content_returns_none_and_leaves_the_journal_as_before(
    tmp_path: Path, case: str
) -> None:
    announced, written = WRONG_CONTENT[case]
    folder = tmp_path / "j"
    with closing(jopen(folder)) as j:
        j.append(delete("a"))
        j.append(put("b", b"bee"), b"bee")
        j.commit()
        before = snapshot(folder)
        appender = j.begin_put(put("x", announced))
        for chunk in written:
            appender.write(chunk)
        assert appender.finish() is None
        assert snapshot(folder) == before
        assert (j.pending, j.head) == (2, 2)
        assert j.append(delete("c")).seq == 3
        j.commit()
        assert [e.change.path for e in entries(j)] == ["a", "b", "c"]
    with closing(jopen(folder)) as j:
        assert j.head == 3


# ---------------------------------------------------------------------------------------------------------
# Reopening


def test_reopen_after_close_keeps_head_and_id(tmp_path: Path) -> None:
    folder = tmp_path / "j"
    with closing(Journal.open(folder, fsync=True)) as j:
        jid = j.id
        assert len(jid) == 32 and int(jid, 16) >= 0
        assert (folder / "journal.id").read_text("ascii").strip() == jid
        made = [j.append(delete("a")), j.append(put("b", b"bee"), b"bee"), j.append(rename("b", "c"))]
        j.commit()
        made.append(j.append(delete("d")))  # not committed: close() commits it
    with closing(Journal.open(folder, fsync=True)) as j:
        assert j.id == jid
        assert (j.head, j.pending, j.first_seq) == (4, 4, 1)
        assert [e.change for e in entries(j)] == made
        assert j.append(delete("e")).seq == 5
        j.commit()
    with closing(jopen(folder)) as j:
        assert j.head == 5 and j.id == jid
    with closing(jopen(tmp_path / "other")) as other:
        assert other.id != jid


def test_reopen_an_empty_journal(tmp_path: Path) -> None:
    folder = tmp_path / "j"
    with closing(jopen(folder)) as j:
        jid = j.id
    with closing(jopen(folder)) as j:
        assert (j.id, j.head, j.pending) == (jid, 0, 0)
        assert j.append(delete("a")).seq == 1
        j.commit()
        assert seqs(j) == [1]


def test_open_refuses_segments_without_an_id(tmp_path: Path) -> None:
    folder = tmp_path / "j"
    with closing(jopen(folder)) as j:
        j.append(delete("a"))
    (folder / "journal.id").unlink()
    with pytest.raises(JournalError):
        jopen(folder)


def test_open_refuses_a_segment_name_that_is_not_a_seq(tmp_path: Path) -> None:
    folder = tmp_path / "j"
    with closing(jopen(folder)) as j:
        j.append(delete("a"))
    (folder / "notaseq.sbj").write_bytes(b"")
    with pytest.raises(JournalError):
        jopen(folder)


# ---------------------------------------------------------------------------------------------------------
# Segments


def test_rotation_and_reading_across_segments(tmp_path: Path) -> None:
    folder = tmp_path / "j"
    limit = 256
    made: list[Change] = []
    with closing(jopen(folder, segment_bytes=limit)) as j:
        for i in range(40):
            content = bytes([i]) * (i * 7)
            made.append(j.append(put(f"f{i}", content), content) if i % 3 else j.append(delete(f"d{i}")))
            if i % 4 == 0:
                j.commit()
        wide = b"w" * (limit * 4)  # an entry larger than a segment stays whole in one segment
        made.append(j.append(put("wide", wide), wide))
        made.append(j.append(delete("last")))
        j.commit()
        segs = j.segments()
        assert len(segs) > 5
        firsts = [first for _, first in segs]
        assert firsts[0] == 1 and firsts == sorted(set(firsts))
        for path, first in segs:
            assert path.name == f"{first:020d}.sbj"
            header = codec.decode_at(path.read_bytes(), 0)
            assert not isinstance(header, codec.Torn)
            assert header[0] == {
                "k": "seg",
                "fmt": "standby-journal",
                "v": 1,
                "journal": j.id,
                "first": first,
            }
        for path, _ in segs[:-1]:
            assert path.stat().st_size >= limit
        assert [e.change for e in entries(j)] == made
        for start in [*firsts, firsts[2] + 1, j.head]:
            assert seqs(j, start) == list(range(start, j.head + 1))
        # Each segment starts where the one before it ended.
        for (_, first), (_, nxt) in itertools.pairwise(segs):
            assert seqs(j, first)[: nxt - first] == list(range(first, nxt))
        head = j.head
    with closing(jopen(folder, segment_bytes=limit)) as j:
        assert j.head == head
        assert [e.change for e in entries(j)] == made
        assert j.append(delete("more")).seq == head + 1
        j.commit()
        assert seqs(j)[-2:] == [head, head + 1]


def test_read_raw_is_exactly_the_entry_frames(tmp_path: Path) -> None:
    with closing(jopen(tmp_path / "j", segment_bytes=512)) as j:
        small = b"small content"
        plan: list[tuple[Change, bytes]] = []
        for change, content in [(delete("a"), b""), (put("s", small), small), (rename("s", "t"), b"")]:
            plan.append((j.append(change, content or None), content))
        big = stream_put(j, "big", BIG)
        assert big is not None
        plan.append((big, BIG))
        plan.append((j.append(delete("z")), b""))
        j.commit()
        assert len(j.segments()) > 1

        with closing(j.cursor(1)) as cur:
            calls: list[tuple[bytes, list[Change]]] = []
            while True:
                raw, done = cur.read_raw(max_bytes=1000)
                if not raw:
                    assert done == []
                    break
                calls.append((raw, done))
            assert cur.read_raw() == (b"", [])

        everything = b"".join(raw for raw, _ in calls)
        expected = [frame for change, content in plan for frame in entry_frames(change, content)]
        assert decode_all(everything) == expected
        assert [c for _, done in calls for c in done] == [change for change, _ in plan]
        assert any(raw and not done for raw, done in calls), "the big put should span several calls"
        # The bytes are the stored bytes: every segment minus its header, in order.
        stored = b""
        for path, _ in j.segments():
            data = path.read_bytes()
            header = codec.decode_at(data, 0)
            assert not isinstance(header, codec.Torn)
            stored += data[header[1] :]
        assert everything == stored

        # From the middle, with a budget past the big put.
        with closing(j.cursor(4)) as cur:
            raw, done = cur.read_raw(max_bytes=len(BIG) + (1 << 20))
            assert decode_all(raw) == entry_frames(big, BIG) + entry_frames(plan[4][0])
            assert [c.seq for c in done] == [4, 5]


def test_prune(tmp_path: Path) -> None:
    folder = tmp_path / "j"
    with closing(jopen(folder, segment_bytes=ONE_ENTRY_SEGMENTS)) as j:
        for i in range(10):
            j.append(delete(f"f{i}"))
        j.commit()
        segs = j.segments()
        firsts = [first for _, first in segs]
        assert len(segs) >= 5

        def age(paths: list[Path], mtime: float) -> None:
            for p in paths:
                os.utime(p, (mtime, mtime))

        age([p for p, _ in segs], 1000.0)
        assert j.prune(acked=0, keep_after_mtime=2000.0) == 0, "nothing acknowledged"
        assert j.prune(acked=j.head, keep_after_mtime=500.0) == 0, "everything is newer than the cut-off"
        assert j.prune(acked=firsts[1] - 2, keep_after_mtime=2000.0) == 0, "a segment is only partly acked"

        acked = firsts[3] - 1  # the first three segments are wholly acknowledged
        assert j.prune(acked=acked, keep_after_mtime=2000.0) == 3
        assert j.first_seq == firsts[3]
        assert [p for p, _ in j.segments()] == [p for p, _ in segs[3:]]
        assert not any(p.exists() for p, _ in segs[:3])
        with pytest.raises(JournalError):
            j.cursor(firsts[3] - 1)
        assert seqs(j, firsts[3]) == list(range(firsts[3], 11))

        # Pruning stops at the first segment newer than the cut-off, in order.
        age([segs[3][0]], 3000.0)
        assert j.prune(acked=j.head, keep_after_mtime=2000.0) == 0

        # The segment being written is never pruned, even when everything is acknowledged.
        assert j.prune(acked=j.head, keep_after_mtime=float("inf")) == len(segs) - 4
        assert [p for p, _ in j.segments()] == [segs[-1][0]]
        assert seqs(j, j.first_seq) == list(range(j.first_seq, 11))
        first = j.first_seq
    with closing(jopen(folder, segment_bytes=ONE_ENTRY_SEGMENTS)) as j:
        assert (j.first_seq, j.head) == (first, 10)
        assert j.append(delete("g")).seq == 11
        j.commit()
        assert seqs(j, first) == list(range(first, 12))


# ---------------------------------------------------------------------------------------------------------
# Torn tail: cut back to the last whole entry, never raise, carry on with consecutive seqs

N = 5

LAST_ENTRIES: dict[str, Callable[[Journal], Change | None]] = {
    "delete": lambda j: j.append(delete("last")),
    "rename": lambda j: j.append(rename("møte/a", "møte/b")),
    "put-empty": lambda j: j.append(put("last", b""), b""),
    "put-small": lambda j: j.append(put("last", bytes(range(200))), bytes(range(200))),
    "put-streamed": lambda j: stream_put(j, "last", b"stream" * 20),
}


def build(folder: Path, segment_bytes: int, last: Callable[[Journal], Change | None]) -> list[Change]:
    made: list[Change] = []
    with closing(jopen(folder, segment_bytes=segment_bytes)) as j:
        for i in range(N - 1):
            content = f"content {i}".encode()
            made.append(j.append(put(f"f{i}", content), content) if i % 2 else j.append(delete(f"d{i}")))
        j.commit()
        change = last(j)
        assert change is not None
        made.append(change)
        assert j.commit() == N
    return made


def last_entry_span(seg: Path, seq: int) -> tuple[int, int]:
    """(start, end) offsets of entry ``seq`` in a segment, found by walking its frames."""
    data = seg.read_bytes()
    off = 0
    while off < len(data):
        res = codec.decode_at(data, off)
        assert not isinstance(res, codec.Torn)
        value, nxt = res
        if isinstance(value, dict) and value.get("k") == "e" and value.get("s") == seq:
            return off, len(data)
        off = nxt
    raise AssertionError(f"entry {seq} not in {seg}")


def check_reopens_at(folder: Path, segment_bytes: int, made: list[Change], head: int, size: int) -> None:
    """Reopen: head as expected, tail cut to ``size``, appending carries on, and it all reads back."""
    with closing(jopen(folder, segment_bytes=segment_bytes)) as j:
        assert (j.head, j.pending) == (head, head)
        assert last_segment(j).stat().st_size == size
        assert [e.change for e in entries(j)] == made[:head]
        assert j.append(delete("next")).seq == head + 1
        assert j.commit() == head + 1
        assert seqs(j) == list(range(1, head + 2))
    with closing(jopen(folder, segment_bytes=segment_bytes)) as j:
        assert j.head == head + 1


@pytest.mark.parametrize(
    "segment_bytes", [DEFAULT_SEGMENT_BYTES, ONE_ENTRY_SEGMENTS], ids=["one-seg", "many-seg"]
)
@pytest.mark.parametrize("kind", list(LAST_ENTRIES))
def test_torn_tail_truncated_at_every_offset(tmp_path: Path, segment_bytes: int, kind: str) -> None:
    folder = tmp_path / "j"
    made = build(folder, segment_bytes, LAST_ENTRIES[kind])
    with closing(jopen(folder, segment_bytes=segment_bytes)) as j:
        seg = last_segment(j)
        many = len(j.segments()) > 1
    assert many == (segment_bytes == ONE_ENTRY_SEGMENTS)
    start, end = last_entry_span(seg, N)
    snap = snapshot(folder)
    original = seg.read_bytes()
    for cut in range(start, end + 1):
        restore(folder, snap)
        seg.write_bytes(original[:cut])
        whole = cut == end
        check_reopens_at(folder, segment_bytes, made, N if whole else N - 1, end if whole else start)


def test_torn_tail_in_a_multi_chunk_put(tmp_path: Path) -> None:
    folder = tmp_path / "j"
    content = BIG[: CHUNK_SIZE + 100]
    made = build(folder, DEFAULT_SEGMENT_BYTES, lambda j: stream_put(j, "big", content))
    with closing(jopen(folder)) as j:
        seg = last_segment(j)
    start, end = last_entry_span(seg, N)
    original = seg.read_bytes()
    # Frame boundaries inside the entry: header | chunk 1 | chunk 2.
    bounds = [start]
    while bounds[-1] < end:
        res = codec.decode_at(original, bounds[-1])
        assert not isinstance(res, codec.Torn)
        bounds.append(res[1])
    assert len(bounds) == 4
    cuts = set(range(bounds[0], bounds[1] + 1))  # every offset of the header frame
    for b in bounds:
        cuts |= {c for c in range(b - 9, b + 10) if start <= c <= end}
    cuts |= set(range(start, end, 65_536))
    snap = snapshot(folder)
    for cut in sorted(cuts):
        restore(folder, snap)
        seg.write_bytes(original[:cut])
        whole = cut == end
        check_reopens_at(folder, DEFAULT_SEGMENT_BYTES, made, N if whole else N - 1, end if whole else start)


#: What an interrupted append can leave after the last whole entry: cut on open.
TORN_GARBAGE: dict[str, bytes] = {
    "one-zero": b"\x00",
    "zeros-short-of-a-header": b"\x00" * 7,
    "zero-length-frame": b"\x00" * 8,
    "zeros": b"\x00" * 4096,
    "ones": b"\xff" * 100,
    "all-bytes": bytes(range(256)) * 3,
    "put-header-without-its-chunk": codec.encode(
        {"k": "e", "s": N + 1, "o": "put", "p": "x", "z": 3, "m": 0, "h": digest_bytes(b"abc"), "c": 1}
    ),
    "torn-frame": codec.encode({"k": "e", "s": N + 1, "o": "delete", "p": "x"})[:-1],
}

#: Whole frames (length and checksum good) that are not a valid next entry: no append leaves these, so they
#: are damage (or a newer format), refused and never cut.
INTACT_GARBAGE: dict[str, bytes] = {
    "frame-not-an-entry": codec.encode({"k": "x"}),
    "frame-a-string": codec.encode("just a string"),
    "entry-with-unknown-op": codec.encode({"k": "e", "s": N + 1, "o": "bogus", "p": "x"}),
    "entry-with-a-seq-gap": codec.encode({"k": "e", "s": N + 2, "o": "delete", "p": "x"}),
    "entry-repeating-a-seq": codec.encode({"k": "e", "s": N, "o": "delete", "p": "x"}),
}


@pytest.mark.parametrize("garbage", list(TORN_GARBAGE))
def test_garbage_after_the_last_entry_is_cut(tmp_path: Path, garbage: str) -> None:
    folder = tmp_path / "j"
    made = build(folder, DEFAULT_SEGMENT_BYTES, LAST_ENTRIES["put-small"])
    with closing(jopen(folder)) as j:
        seg = last_segment(j)
    end = seg.stat().st_size
    with open(seg, "ab") as f:
        f.write(TORN_GARBAGE[garbage])
    check_reopens_at(folder, DEFAULT_SEGMENT_BYTES, made, N, end)


def check_refused(folder: Path, seg: Path, at: int, **kw: Any) -> JournalDamaged:
    """Opening (to write or read-only) refuses, naming segment and offset, and changes no byte."""
    before = snapshot(folder)
    for readonly in (False, True):
        with pytest.raises(JournalDamaged) as exc:
            jopen(folder, readonly=readonly, **kw).close()
        e = exc.value
        assert (e.segment, e.offset) == (str(seg), at), str(e)
        assert str(seg) in str(e) and f"byte {at}" in str(e)
        assert str(e).endswith(f"({RECOVERY_HINT})")
        assert snapshot(folder) == before
    return e


@pytest.mark.parametrize("garbage", list(INTACT_GARBAGE))
def test_a_whole_frame_that_is_no_valid_entry_after_the_last_entry_is_refused(
    tmp_path: Path, garbage: str
) -> None:
    folder = tmp_path / "j"
    build(folder, DEFAULT_SEGMENT_BYTES, LAST_ENTRIES["put-small"])
    with closing(jopen(folder)) as j:
        seg = last_segment(j)
    end = seg.stat().st_size
    with open(seg, "ab") as f:
        f.write(INTACT_GARBAGE[garbage])
    check_refused(folder, seg, end)


def frame_bounds(data: bytes, start: int, end: int) -> list[int]:
    """Offsets of the frames between ``start`` and ``end``, and ``end``."""
    bounds = [start]
    while bounds[-1] < end:
        res = codec.decode_at(data, bounds[-1])
        assert not isinstance(res, codec.Torn)
        bounds.append(res[1])
    return bounds


@pytest.mark.parametrize(
    "segment_bytes", [DEFAULT_SEGMENT_BYTES, ONE_ENTRY_SEGMENTS], ids=["one-seg", "many-seg"]
)
def test_flipped_byte_in_the_last_entry_at_every_offset(tmp_path: Path, segment_bytes: int) -> None:
    """A damaged last frame is a torn tail (cut); a damaged frame with a whole frame after it is not."""
    folder = tmp_path / "j"
    made = build(folder, segment_bytes, LAST_ENTRIES["put-streamed"])
    with closing(jopen(folder, segment_bytes=segment_bytes)) as j:
        seg = last_segment(j)
    start, end = last_entry_span(seg, N)
    # As a crash leaves it: no clean close's hint, so the open scans the whole last segment (with the hint,
    # the bytes it says were committed are not scanned at open: a cursor finds damage there when it reads).
    (folder / END_HINT).unlink()
    snap = snapshot(folder)
    original = seg.read_bytes()
    header_end = frame_bounds(original, start, end)[1]  # the entry is its header frame, then one chunk
    assert header_end < end
    for i in range(start, end):
        restore(folder, snap)
        damaged = bytearray(original)
        damaged[i] ^= 0x01 if i % 2 else 0xFF  # a single bit, or a whole byte
        seg.write_bytes(bytes(damaged))
        if i < header_end:  # the header frame is bad, and its whole content frame follows
            check_refused(folder, seg, start, segment_bytes=segment_bytes)
        else:
            check_reopens_at(folder, segment_bytes, made, N - 1, start)


def test_torn_header_of_the_first_segment_starts_again(tmp_path: Path) -> None:
    folder = tmp_path / "j"
    with closing(jopen(folder)) as j:
        seg = last_segment(j)
    header = seg.read_bytes()
    snap = snapshot(folder)
    for cut in range(len(header)):
        restore(folder, snap)
        seg.write_bytes(header[:cut])
        check_reopens_at(folder, DEFAULT_SEGMENT_BYTES, [], 0, len(header))


def test_tiny_segment_bytes_after_a_torn_tail_never_repeats_an_entry(tmp_path: Path) -> None:
    # A torn-tail cut leaves a header-only last segment; with segment_bytes below the header size the next
    # append rotates from it. The cursor must still read every seq once (it did not before the cursor
    # started following segments by first seq).
    folder = tmp_path / "j"
    made = build(folder, 1, LAST_ENTRIES["delete"])
    with closing(jopen(folder, segment_bytes=1)) as j:
        seg = last_segment(j)
    start, _end = last_entry_span(seg, N)
    seg.write_bytes(seg.read_bytes()[:start])
    with closing(jopen(folder, segment_bytes=1)) as j:
        assert j.head == N - 1
        for i in range(3):
            j.append(delete(f"g{i}"))
        j.commit()
        assert seqs(j) == list(range(1, N + 3))
        assert [e.change for e in entries(j)][: N - 1] == made[: N - 1]


# ---------------------------------------------------------------------------------------------------------
# Regression tests for bugs these tests found (all fixed)


@pytest.mark.parametrize("cut", [0, 1, 8, 86])
def test_torn_header_of_a_new_segment_after_rotation(tmp_path: Path, cut: int) -> None:
    folder = tmp_path / "j"
    made = build(folder, ONE_ENTRY_SEGMENTS, LAST_ENTRIES["delete"])
    with closing(jopen(folder, segment_bytes=ONE_ENTRY_SEGMENTS)) as j:
        header = codec.encode({"k": "seg", "fmt": "standby-journal", "v": 1, "journal": j.id, "first": N + 1})
    assert len(header) == 87
    # What _start_segment leaves behind if the machine stops between creating the file and its fsync.
    (folder / f"{N + 1:020d}.sbj").write_bytes(header[:cut])
    with closing(jopen(folder, segment_bytes=ONE_ENTRY_SEGMENTS)) as j:
        assert j.head == N
        assert [e.change for e in entries(j)] == made
        assert j.append(delete("next")).seq == N + 1
        j.commit()
        assert seqs(j) == list(range(1, N + 2))


def test_a_committed_put_appended_whole_reads_back_and_survives_reopen(tmp_path: Path) -> None:
    folder = tmp_path / "j"
    with closing(jopen(folder)) as j:
        j.append(delete("a"))
        try:
            j.append(Change(0, Op.PUT, "b"), b"hello")  # no digest given
        except (ValueError, JournalError):
            return  # refusing it at append time is also a fix
        j.append(delete("c"))
        assert j.commit() == 3
        got = entries(j)
        assert [e.change.path for e in got] == ["a", "b", "c"]
        assert got[1].change.digest == digest_bytes(b"hello")
    with closing(jopen(folder)) as j:
        assert j.head == 3


def test_put_appender_refuses_or_stores_readable_oversized_chunks(tmp_path: Path) -> None:
    folder = tmp_path / "j"
    content = bytes(2 * CHUNK_SIZE)
    with closing(jopen(folder)) as j:
        appender = j.begin_put(put("big", content))
        try:
            # The right size, digest and chunk count, but the first chunk is 5000 bytes over.
            appender.write(content[: CHUNK_SIZE + 5000])
            appender.write(content[CHUNK_SIZE + 5000 :])
            done = appender.finish()
        except (ValueError, JournalError):
            appender.abort()
            done = None
        if done is None:
            return  # refusing the oversized chunk is a fix
        assert j.commit() == 1
        assert [b"".join(e.chunks) for e in entries(j)] == [content]
    with closing(jopen(folder)) as j:
        assert j.head == 1


def test_tiny_segment_bytes_never_duplicates_a_segment_or_prunes_unacked(tmp_path: Path) -> None:
    with closing(jopen(tmp_path / "j", segment_bytes=1)) as j:
        for i in range(3):
            j.append(delete(f"f{i}"))
        j.commit()
        paths = [p for p, _ in j.segments()]
        assert len(paths) == len(set(paths))
        j.prune(acked=0, keep_after_mtime=float("inf"))
        assert seqs(j) == [1, 2, 3]


@pytest.mark.parametrize("damage", ["foreign-journal", "flipped-header-byte"])
def test_first_segment_with_a_wrong_header_is_refused_not_wiped(tmp_path: Path, damage: str) -> None:
    folder = tmp_path / "j"
    build(folder, DEFAULT_SEGMENT_BYTES, LAST_ENTRIES["delete"])
    seg = folder / f"{1:020d}.sbj"
    if damage == "foreign-journal":
        with closing(jopen(tmp_path / "other")) as other:
            for i in range(N):
                other.append(delete(f"other{i}"))
        shutil.copy(tmp_path / "other" / seg.name, seg)
    else:
        data = bytearray(seg.read_bytes())
        data[20] ^= 0x01
        seg.write_bytes(bytes(data))
    committed = seg.read_bytes()
    with pytest.raises(JournalError):
        jopen(folder).close()
    assert seg.read_bytes() == committed


def cursor_or_error(j: Journal, seq: int) -> Cursor | str:
    """j.cursor(seq), or the JournalError's message. A Cursor that fails in its constructor leaks its open
    segment file (see test_a_cursor_that_fails_to_open_leaks_no_file): its ResourceWarning is silenced
    here so it does not surface, as an unraisable-exception error, in some later test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            return j.cursor(seq)
        except JournalError as e:
            message = str(e)
        gc.collect()
    return message


@pytest.mark.parametrize("where", ["fresh-journal", "after-rotation"])
def test_cursor_at_the_head_works_without_fsync(tmp_path: Path, where: str) -> None:
    with closing(jopen(tmp_path / "j", fsync=False, segment_bytes=ONE_ENTRY_SEGMENTS)) as j:
        if where == "after-rotation":
            j.append(delete("a"))
            j.commit()
            j.append(delete("b"))  # starts segment 2; not committed yet
            assert [first for _, first in j.segments()] == [1, 2]
        cur = cursor_or_error(j, j.head + 1)
        assert isinstance(cur, Cursor), cur
        with closing(cur):
            assert cur.next() is None
            j.commit()
            e = cur.next()
            assert (e is None) == (where == "fresh-journal")


def test_a_cursor_that_fails_to_open_leaks_no_file(tmp_path: Path) -> None:
    folder = tmp_path / "j"
    build(folder, ONE_ENTRY_SEGMENTS, LAST_ENTRIES["delete"])
    seg2 = folder / f"{2:020d}.sbj"
    data = bytearray(seg2.read_bytes())
    data[20] ^= 0x01  # damage segment 2's header; only the last segment is checked on open
    seg2.write_bytes(bytes(data))
    with closing(jopen(folder, segment_bytes=ONE_ENTRY_SEGMENTS)) as j:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(JournalError):
                j.cursor(2)
            gc.collect()
        assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_writes_of_any_size_are_framed_in_whole_chunks(tmp_path: Path) -> None:
    """The appender re-frames content, so how the caller slices its writes never matters."""
    with closing(jopen(tmp_path / "j")) as j:
        appender = j.begin_put(put("x", BIG))
        for i in range(0, len(BIG), 12345):
            appender.write(BIG[i : i + 12345])
        appender.write(b"")
        assert appender.finish() is not None
        j.commit()
        got = list(entries(j))
    assert b"".join(got[-1].chunks) == BIG
    assert all(len(c) == CHUNK_SIZE for c in got[-1].chunks[:-1])


#: Ways to slice BIG (2.5 MiB) into writes: whole chunks (kept as given, never copied), odd sizes, and
#: whole chunks then odd sizes and back (the appender moves between its two ways of holding content).
SLICINGS: dict[str, list[int]] = {
    "whole-chunks": [CHUNK_SIZE, CHUNK_SIZE, CHUNK_SIZE // 2],
    "odd": [12345] * (len(BIG) // 12345 + 1),
    "whole-then-odd-then-whole": [CHUNK_SIZE, 1000, CHUNK_SIZE - 1000, CHUNK_SIZE, CHUNK_SIZE // 2],
    "one-write": [len(BIG)],
}


@pytest.mark.parametrize("slicing", list(SLICINGS))
def test_a_streamed_put_is_stored_byte_for_byte_as_one_whole_append_however_it_is_written(
    tmp_path: Path, slicing: str
) -> None:
    """The appender frames chunks without copying them into the frame; what it stores is exactly the
    frames Journal.append stores for the same content, and reads back through every reader."""

    def entry_bytes(seg: Path) -> bytes:
        data = seg.read_bytes()
        header = codec.decode_at(data, 0)  # the segment header names its journal: left out
        assert not isinstance(header, codec.Torn)
        return data[header[1] :]

    with closing(jopen(tmp_path / "whole")) as j:
        j.append(put("x", BIG), BIG)
        j.commit()
        want = entry_bytes(last_segment(j))
    with closing(jopen(tmp_path / "streamed")) as j:
        appender = j.begin_put(put("x", BIG))
        at = 0
        for n in SLICINGS[slicing]:
            appender.write(BIG[at : at + n])
            at += n
        assert at >= len(BIG)
        assert appender.finish() is not None
        j.commit()
        assert entry_bytes(last_segment(j)) == want
        with closing(j.cursor(1)) as cur:
            raw, done = cur.read_raw(max_bytes=1)
            while cur.in_entry:
                more, fin = cur.read_raw(max_bytes=1)
                raw += more
                done += fin
        assert decode_all(raw) == entry_frames(done[0], BIG)
        assert [b"".join(e.chunks) for e in entries(j)] == [BIG]


def test_a_damaged_content_frame_is_refused_by_the_stream_reader(tmp_path: Path) -> None:
    """The stream sends a put's content frames without decoding them, but checks each: a flipped byte is
    damage, named with its segment and offset."""
    with closing(jopen(tmp_path / "j")) as j:
        assert stream_put(j, "big", BIG) is not None
        j.commit()
        seg = last_segment(j)
        data = seg.read_bytes()
        at = data.index(BIG[CHUNK_SIZE : CHUNK_SIZE + 64])
        with open(seg, "r+b") as f:  # under the running journal, as a failing disk would
            f.seek(at)
            f.write(bytes([data[at] ^ 1]))
        with closing(j.cursor(1)) as cur:
            first, done = cur.read_raw(max_bytes=1)
            assert decode_all(first)[0]["p"] == "big" and done == []
            with pytest.raises(JournalDamaged, match=f"{seg.name}.*checksum mismatch"):
                while cur.read_raw(max_bytes=1)[0]:
                    pass


# ---------------------------------------------------------------------------------------------------------
# Damage inside the journal is refused, never cut: only a torn tail is


def raw_segment(folder: Path, frames: list[bytes]) -> Path:
    """A journal whose one segment holds ``frames`` after its header, written byte for byte."""
    with closing(jopen(folder)) as j:
        seg = last_segment(j)
    with open(seg, "ab") as f:
        f.write(b"".join(frames))
    return seg


def delete_frame(seq: int, path: str) -> bytes:
    return codec.encode({"k": "e", "s": seq, "o": "delete", "p": path})


#: Entry headers whose frame is whole (length and checksum good) but that do not decode as an entry.
UNDECODABLE: dict[str, dict[str, Any]] = {
    "op-of-a-newer-version": {"k": "e", "s": 3, "o": "chmod", "p": "x"},
    "path-not-a-string": {"k": "e", "s": 3, "o": "delete", "p": 7},
    "put-chunk-count-wrong": {"k": "e", "s": 3, "o": "put", "p": "x", "z": 1, "h": b"0" * 16, "c": 5},
    "mtime-not-a-number": {"k": "e", "s": 3, "o": "put", "p": "x", "z": 0, "m": "x", "h": b"0" * 16, "c": 0},
    "not-an-entry": {"k": "note", "s": 3},
}


@pytest.mark.parametrize("kind", list(UNDECODABLE))
def test_an_undecodable_entry_in_the_middle_is_refused_and_nothing_is_cut(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "j"
    frames = [
        delete_frame(1, "a"),
        delete_frame(2, "b"),
        codec.encode(UNDECODABLE[kind]),
        delete_frame(4, "d"),
    ]
    seg = raw_segment(folder, frames)
    size = seg.stat().st_size
    at = size - len(frames[3]) - len(frames[2])
    e = check_refused(folder, seg, at)
    assert "not a valid entry" in e.reason
    assert seg.stat().st_size == size


#: Damage to a frame in the middle: (offset in the frame, xor mask, what the scan finds at that frame).
MIDDLE_DAMAGE: dict[str, tuple[int, int, str]] = {
    "payload": (-1, 0x01, "checksum mismatch"),
    "length-longer": (0, 0x01, "checksum mismatch"),  # one byte longer: the next frame's start is lost
    "length-huge": (3, 0x80, "exceeds the limit"),
    "length-past-the-end": (2, 0x08, "truncated payload"),  # 512 KiB: past the end of the file
}


@pytest.mark.parametrize("damage", list(MIDDLE_DAMAGE))
def test_a_bad_frame_in_the_middle_is_refused_and_nothing_is_cut(tmp_path: Path, damage: str) -> None:
    """A bad frame with whole frames after it is not a torn tail, wherever its own length says it ends."""
    folder = tmp_path / "j"
    at, mask, why = MIDDLE_DAMAGE[damage]
    bad = bytearray(delete_frame(2, "b"))
    bad[at] ^= mask
    after = [delete_frame(3, "c"), codec.encode(put("d", b"dee").to_wire() | {"k": "e", "s": 4, "c": 1})]
    after.append(codec.encode(b"dee"))
    seg = raw_segment(folder, [delete_frame(1, "a"), bytes(bad), *after])
    size = seg.stat().st_size
    e = check_refused(folder, seg, size - sum(map(len, after)) - len(bad))
    assert why in e.reason and "whole frame after it" in e.reason, e.reason


def test_a_cursor_names_segment_and_offset_of_damage_in_an_earlier_segment(tmp_path: Path) -> None:
    folder = tmp_path / "j"
    build(folder, ONE_ENTRY_SEGMENTS, LAST_ENTRIES["delete"])
    seg2 = folder / f"{2:020d}.sbj"
    data = seg2.read_bytes()
    start, _ = last_entry_span(seg2, 2)
    seg2.write_bytes(data[:start] + delete_frame(7, "x"))  # only the last segment is scanned on open
    with closing(jopen(folder, segment_bytes=ONE_ENTRY_SEGMENTS)) as j, closing(j.cursor(1)) as cur:
        assert cur.next() is not None
        with pytest.raises(JournalDamaged) as exc:
            cur.next()
    assert (exc.value.segment, exc.value.offset) == (str(seg2), start)
    assert "expected seq 2, found 7" in str(exc.value) and str(exc.value).endswith(f"({RECOVERY_HINT})")


# ---------------------------------------------------------------------------------------------------------
# A cursor reads only committed bytes, straight from the file


@pytest.mark.parametrize("read", ["next", "read_raw"])
@pytest.mark.parametrize("opened", ["before-the-put", "during-the-put"])
def test_a_cursor_never_serves_bytes_an_aborted_put_left_behind(
    tmp_path: Path, read: str, opened: str
) -> None:
    """The sender's crash 'journal frame near seq N is corrupt: truncated payload': its cursor's read-ahead
    buffer held the first bytes of a large put still being appended; the put was aborted (its source file
    changed while read) and other entries were written at the same offset; the cursor served stale bytes."""
    folder = tmp_path / "j"
    with closing(jopen(folder)) as j:
        for i in range(3):  # more than a read-ahead buffer (8 KiB): a cursor made first reads on later
            j.append(put(f"a{i}", bytes(5000)), bytes(5000))
        j.commit()
        cur = j.cursor(1) if opened == "before-the-put" else None
        appender = j.begin_put(put("big", BIG))
        appender.write(BIG[: 2 * CHUNK_SIZE])  # on disk (two chunk frames), not committed
        j.commit()
        cur = cur or j.cursor(1)
        other = jopen(folder, readonly=True)  # another process' view, e.g. `standby journal list`
        with closing(cur), closing(other):
            assert other.head == 3
            if read == "next":
                assert [e.change.path for e in iter(cur.next, None)] == ["a0", "a1", "a2"]
            else:
                raw, done = cur.read_raw()
                assert [c.seq for c in done] == [1, 2, 3]
                assert decode_all(raw) == [f for c in done for f in entry_frames(c, bytes(5000))]
            appender.abort()
            made = [j.append(delete("x")), j.append(put("y", b"why"), b"why")]
            j.commit()
            if read == "next":
                got = [e.change for e in iter(cur.next, None)]
                assert got == made
            else:
                raw, done = cur.read_raw()
                assert done == made
                assert decode_all(raw) == entry_frames(made[0]) + entry_frames(made[1], b"why")
            assert [e.change.path for e in entries(other)] == ["a0", "a1", "a2"]


def test_a_cursor_stops_at_the_committed_end_even_when_more_bytes_are_whole(tmp_path: Path) -> None:
    with closing(jopen(tmp_path / "j")) as j:
        j.append(delete("a"))
        j.commit()
        j.append(delete("b"))  # whole on disk, not committed
        with closing(j.cursor(1)) as cur:
            assert cur.read_raw()[1] == [Change(1, Op.DELETE, "a")]
            j.head += 1  # a bug that moved the head without a commit must not reach uncommitted bytes
            with pytest.raises(JournalDamaged):
                cur.read_raw()


def test_entries_without_content_that_name_a_size_reopen_whole(tmp_path: Path) -> None:
    """A touch names the size and digest of the content it applies to, and carries none."""
    folder = tmp_path / "j"
    with closing(jopen(folder)) as j:
        j.append(put("a", b"abc"), b"abc")
        touch = j.append(Change(0, Op.TOUCH, "a", size=3, mtime_ns=5, digest=digest_bytes(b"abc")))
        j.commit()
    with closing(jopen(folder)) as j:
        assert j.head == 2 and [e.change for e in entries(j)][1] == touch


def test_a_clean_close_lets_the_next_open_start_after_the_committed_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clean close writes where the last segment's committed entries end; the next open scans only what
    follows (a torn tail after it is still cut) and removes the hint before appending. A crash after that
    open leaves no hint (or, its removal lost, a hint still true), and a hint that does not fit is ignored."""
    folder = tmp_path / "j"
    with closing(jopen(folder)) as j:
        for i in range(20):
            j.append(put(f"f{i}", b"x" * 100), b"x" * 100)
        j.commit()
    hint = folder / END_HINT
    assert hint.exists()
    last_segment_path = sorted(folder.glob("*.sbj"))[-1]
    size = last_segment_path.stat().st_size
    started: list[tuple[int, int] | None] = []
    real = journal_mod.scan_segment

    def spy(path: Path, journal_id: str, first: int, start: tuple[int, int] | None = None) -> Any:
        started.append(start)
        return real(path, journal_id, first, start)

    monkeypatch.setattr(journal_mod, "scan_segment", spy)
    with closing(jopen(folder)) as j:
        assert started == [(size, 20)]  # the walk started after the 20 committed entries
        assert not hint.exists()  # removed before anything is appended
        assert j.head == 20
    assert hint.exists()
    with open(last_segment_path, "ab") as f:  # a torn append after the clean close
        f.write(b"\x10\x00\x00\x00torn")
    started.clear()
    with closing(jopen(folder)) as j:
        # After the hint something is not whole: judged from the segment's start before anything is cut.
        assert started == [(size, 20), None]
        assert j.head == 20 and last_segment_path.stat().st_size == size  # the torn tail was cut
        assert [e.change.path for e in entries(j)] == [f"f{i}" for i in range(20)]
        j.append(put("g", b"y"), b"y")
        j.commit()
    # A hint that does not describe this segment (another journal's, past its end, garbage) is ignored.
    for bad in ('{"journal": "other", "segment": 1, "end": 10, "head": 1}', "{", '{"journal": 1}'):
        hint.write_text(bad, "utf-8")
        with closing(jopen(folder)) as j:
            assert started[-1] is None and j.head == 21
    doc = {"journal": (folder / "journal.id").read_text().strip(), "segment": 1, "end": 10**9, "head": 3}
    hint.write_text(json.dumps(doc), "utf-8")
    with closing(jopen(folder)) as j:
        assert started[-1] is None and j.head == 21
    # A hint pointing inside an entry (never written by a close) finds no whole entry there: the open
    # falls back to the whole segment and cuts nothing committed.
    doc["end"], doc["head"] = size - 50, 19
    hint.write_text(json.dumps(doc), "utf-8")
    with closing(jopen(folder)) as j:
        assert j.head == 21 and [e.change.path for e in entries(j)][-2:] == ["f19", "g"]


def test_a_cursor_starts_at_the_nearest_mark_and_reads_every_entry_from_any_seq(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cursor starts at the committed end, or the nearest mark of where committed entries ended, before
    its seq (not at the segment's start): from every seq it still reads exactly the entries from there."""
    monkeypatch.setattr(journal_mod, "MARK_EVERY", 3)
    folder = tmp_path / "j"
    contents = {i: f"v{i}".encode() * (1 + i % 5) for i in range(1, 41)}
    with closing(jopen(folder, segment_bytes=1500)) as j:
        for i in range(1, 41):
            j.append(put(f"f{i}", contents[i]), contents[i])
            if i % 2 == 0:
                j.commit()
        j.commit()
        assert len(j.segments()) > 2 and any(len(m) > 1 for m in j._marks.values())
        for seq in range(j.first_seq, j.head + 2):
            got = [(e.change.seq, e.change.path, b"".join(e.chunks)) for e in entries(j, seq)]
            assert got == [(i, f"f{i}", contents[i]) for i in range(seq, 41)], seq
        frames: list[int] = []
        real = Cursor._read_frame

        def counted(self: Cursor, skip: bool, limit: int | None = -1) -> Any:
            frames.append(self._off)
            return real(self, skip, limit)

        monkeypatch.setattr(Cursor, "_read_frame", counted)
        with closing(j.cursor(j.head + 1)) as cur:  # a stream from the head reads nothing before it
            assert frames == [0]  # the segment's header only, then straight to the committed end
            assert cur.seq == j.head + 1


def test_the_end_hint_is_removed_durably_before_appends_and_by_repair_and_vouches_only_for_durable_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hint's removal is made durable (a removal lost in a crash could bring back a hint a repair made
    untrue); a repair removes it before it cuts; with fsync off, the bytes it vouches for are fsynced
    before it is written; a hint that cannot be removed (held open on Windows) does not stop the open."""
    synced: list[str] = []
    real_fsync_dir = journal_mod.fsync_dir
    real_fsync = os.fsync

    def dir_spy(path: Path) -> None:
        synced.append(f"dir {Path(path).name} hint={(Path(path) / END_HINT).exists()}")
        real_fsync_dir(path)

    def file_spy(fd: int) -> None:
        synced.append("file")
        real_fsync(fd)

    monkeypatch.setattr(journal_mod, "fsync_dir", dir_spy)
    folder = tmp_path / "j"
    with closing(Journal.open(folder)) as j:  # fsync on
        j.append(put("a", b"1"), b"1")
        j.commit()
    synced.clear()
    with closing(Journal.open(folder)) as j:
        assert synced == ["dir j hint=False"]  # the hint's removal, made durable before any append
    synced.clear()
    journal_mod.repair(folder)
    assert synced[:1] == ["dir j hint=False"]  # whole journal: nothing cut, the hint gone durably first
    # fsync off: the segment is fsynced once, at close, before the hint exists.
    monkeypatch.setattr(os, "fsync", file_spy)
    with closing(jopen(folder)) as j:
        j.append(put("b", b"2"), b"2")
        j.commit()
        synced.clear()
    assert synced == ["file"] and (folder / END_HINT).exists()
    # Held open elsewhere (Windows): the open goes on, and the hint, still true, is used next time.
    real_unlink = Path.unlink

    def held(self: Path, missing_ok: bool = False) -> None:
        if self.name == END_HINT:
            raise PermissionError(13, "The process cannot access the file", str(self))
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", held)
    with closing(jopen(folder)) as j:
        assert j.head == 2


class _FailingFsync(Journal):
    """The next fsync fails once with ENOSPC (a full disk found at commit)."""

    fail_next = False

    def _fsync(self, f: Any) -> None:
        if self.fail_next:
            self.fail_next = False
            raise OSError(28, os.strerror(28))
        super()._fsync(f)


def test_a_cursor_following_the_head_sends_from_memory_exactly_what_the_segments_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream takes the entries appended last from the journal's memory instead of reading them back:
    across small and streamed puts, rotations, an aborted put, a failed commit whose seqs are used again
    and a memory that holds about one round of entries, every read gives the bytes and headers a cursor
    reading the segments from the same seq gives, and most small entries never touch the segment."""
    folder = tmp_path / "j"
    frames = [0]
    real = Cursor._read_frame

    def counted(self: Cursor, skip: bool, limit: int | None = -1) -> tuple[Any, bytes] | None:
        frames[0] += 1
        return real(self, skip, limit)

    with closing(_FailingFsync.open(folder, fsync=True, segment_bytes=4000, remember=8000)) as j:
        assert isinstance(j, _FailingFsync)
        j.append(delete("first"))
        j.commit()
        follower = j.cursor(j.head + 1)
        got_raw = bytearray()
        got: list[Change] = []
        monkeypatch.setattr(Cursor, "_read_frame", counted)

        def follow(cur: Cursor, raw_out: bytearray, done_out: list[Change]) -> None:
            while True:
                raw, done = cur.read_raw(max_bytes=700)
                if not raw:
                    return
                raw_out += raw
                done_out.extend(done)

        per_round: list[int] = []
        for round_ in range(12):
            before = frames[0]
            for i in range(5):
                body = f"{round_}-{i}".encode() * (1 + (round_ * 7 + i) % 40)
                j.append(put(f"r{round_}/f{i}", body), body)
            j.append(rename(f"r{round_}/f0", f"r{round_}/g0"))
            if round_ % 4 == 1:
                assert stream_put(j, f"big{round_}", BIG[: CHUNK_SIZE + 10]) is not None
            if round_ % 4 == 2:
                appender = j.begin_put(put("aborted", BIG))
                appender.write(BIG[:CHUNK_SIZE])
                appender.abort()
            if round_ % 4 == 3:
                j.commit()
                j.append(put("lost", b"never committed"), b"never committed")
                j.fail_next = True
                with pytest.raises(JournalError):
                    j.commit()
                # The seq of "lost" goes to a streamed put, which memory never holds.
                assert stream_put(j, f"after-lost{round_}", BIG[:100]) is not None
            j.append(delete(f"r{round_}/f1"))
            j.commit()
            follow(follower, got_raw, got)
            per_round.append(frames[0] - before)
        monkeypatch.setattr(Cursor, "_read_frame", real)
        assert len(j.segments()) > 3, "the test should cross segments"
        assert "lost" not in [c.path for c in got]
        want_raw = bytearray()
        want: list[Change] = []
        with closing(Cursor(j, 2)) as disk:
            j._recent.clear()  # nothing from memory: everything read back from the segments
            follow(disk, want_raw, want)
        follower.close()
        assert got == want
        assert got_raw == want_raw
        assert [c.seq for c in got] == list(range(2, j.head + 1))
        # Frames read from the segments, per round: at most a new segment's header, plus the streamed
        # put's header and two chunks; an aborted put after them or a failed commit (its entry never
        # committed) loses none of the committed entries from memory.
        assert all(n <= {1: 4, 3: 2}.get(r % 4, 1) for r, n in enumerate(per_round)), per_round


@pytest.mark.parametrize("remember", [0, 8 << 20])
def test_small_frames_come_joined_and_large_content_as_read(tmp_path: Path, remember: int) -> None:
    """A TLS transport makes a record of every piece it is given: a stream of small entries must come as
    few pieces (joined runs), from memory or from the segment; a large put's 1 MiB content frames come by
    themselves, not copied into a run. The pieces joined are the stored bytes."""
    with closing(jopen(tmp_path / "j", remember=remember)) as j:
        for i in range(2000):
            j.append(delete(f"d{i}"))
        assert stream_put(j, "big", BIG) is not None
        for i in range(50):
            j.append(put(f"p{i}", b"x" * 40), b"x" * 40)
        j.commit()
        with closing(j.cursor(1)) as cur:
            pieces, size, done = cur.read_pieces(max_bytes=64 << 20)
        assert [c.seq for c in done] == list(range(1, j.head + 1))
        assert size == sum(map(len, pieces))
        stored = last_segment(j).read_bytes()
        header = codec.decode_at(stored, 0)
        assert not isinstance(header, codec.Torn)
        assert b"".join(pieces) == stored[header[1] :]
        big_payloads = [p for p in pieces if len(p) >= CHUNK_SIZE // 2]
        assert len(big_payloads) == 3  # the put's three content frames' payloads, each alone
        assert len(pieces) <= 2 * 3 + 1, len(pieces)  # runs between them: deletes + header, heads, puts


def test_the_memory_budget_counts_each_entry_not_only_its_bytes(tmp_path: Path) -> None:
    """8 MiB of tiny entries must not be a hundred thousand objects: each remembered entry is charged its
    overhead too."""
    with closing(jopen(tmp_path / "j", remember=64 << 10)) as j:
        for i in range(10_000):
            j.append(delete(f"d{i}"))
        j.commit()
        assert 0 < len(j._recent) <= (64 << 10) // journal_mod.RECENT_OVERHEAD
