"""The sender's durable, append-only change journal. Knows nothing of TCP.

Layout of ``<state_dir>/journal/``::

    journal.id                      the journal's identity (hex), written once
    00000000000000000001.sbj        a segment, named by the first seq it holds
    00000000000000052213.sbj        ...

A segment is a sequence of frames (see :mod:`engine.codec`). The first frame is the segment header
``{"k": "seg", "fmt": "standby-journal", "v": 1, "journal": ID, "first": SEQ}``. Then come entries: an
entry is a header frame ``{"k": "e", "s": SEQ, "o": OP, "p": PATH, ...}`` (see :class:`engine.model.Change`)
followed, for a put, by exactly ``c`` frames each holding one raw content chunk (msgpack bin, at most
1 MiB). These bytes are also the wire format of an entry, so the sender streams journal bytes as they are.

INVARIANT: seqs are consecutive from the first segment to the head, with no gap.
INVARIANT: only entries up to ``head`` (made durable by :meth:`Journal.commit`) are ever read.
A torn tail (a crash mid-append) is cut back to the last whole entry when the journal is opened.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from engine import codec
from engine.digest import DIGEST_SIZE, Hasher, digest_bytes
from engine.errors import JournalError
from engine.model import CHUNK_SIZE, Change, Op, chunk_count

log = logging.getLogger(__name__)

FORMAT = "standby-journal"
FORMAT_VERSION = 1
SUFFIX = ".sbj"
DEFAULT_SEGMENT_BYTES = 64 << 20


def fsync_dir(path: Path) -> None:
    """Make a directory's entries durable. Windows has no directory fsync: NTFS journals metadata."""
    if sys.platform == "win32":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _seg_name(first: int) -> str:
    return f"{first:020d}{SUFFIX}"


def entry_header(change: Change) -> dict[str, Any]:
    d = change.to_wire()
    d["k"] = "e"
    return d


@dataclass(frozen=True, slots=True)
class Entry:
    """One whole entry read back: its header and (for a put) its content chunks."""

    change: Change
    chunks: tuple[bytes, ...] = ()


@dataclass(slots=True)
class _Segment:
    path: Path
    first: int


class Journal:
    """Append entries, make them durable in groups, read them back from any seq still kept."""

    def __init__(
        self,
        folder: Path,
        *,
        fsync: bool = True,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        readonly: bool = False,
    ):
        self.folder = folder
        self.readonly = readonly
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.id = ""
        self.head = 0  # last durable seq
        self._next = 1  # next seq to assign
        self._segments: list[_Segment] = []
        self._out: BinaryIO | None = None
        self._out_size = 0
        self._dirty = False

    # -- opening ------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: Path, **kw: Any) -> Journal:
        j = cls(folder, **kw)
        j._open()
        return j

    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        id_file = self.folder / "journal.id"
        segs = sorted(p for p in self.folder.iterdir() if p.suffix == SUFFIX)
        if id_file.exists():
            self.id = id_file.read_text("ascii").strip()
        elif segs:
            raise JournalError(f"{self.folder}: segments without journal.id; refusing to guess its identity")
        elif self.readonly:
            raise JournalError(f"{self.folder}: no journal here")
        else:
            self.id = secrets.token_hex(16)
            tmp = id_file.with_suffix(".tmp")
            tmp.write_text(self.id + "\n", "ascii")
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, id_file)
            fsync_dir(self.folder)
        for p in segs:
            stem = p.stem
            if not stem.isdigit():
                raise JournalError(f"{p}: not a segment name")
            self._segments.append(_Segment(p, int(stem)))
        if not self._segments:
            if self.readonly:
                raise JournalError(f"{self.folder}: the journal holds no segment")
            self._start_segment(1)
            self._next = 1
            self.head = 0
            return
        last = self._segments[-1]
        end, last_seq = self._scan_tail(last)
        size = last.path.stat().st_size
        self.head = last_seq
        self._next = last_seq + 1
        if self.readonly:  # a live sender may be appending: never cut, only read what is whole
            return
        if end < size:
            log.warning("journal.torn_tail_cut segment=%s cut_at=%d size=%d", last.path.name, end, size)
            with open(last.path, "rb+") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        self._out = open(last.path, "ab")  # noqa: SIM115 - held open for appends
        self._out_size = end

    def _scan_tail(self, seg: _Segment) -> tuple[int, int]:
        """Return (end offset of the last whole entry, its seq) of a segment; checks seq continuity."""
        data = seg.path.read_bytes()
        res = codec.decode_at(data, 0)
        if isinstance(res, codec.Torn) or not _is_seg_header(res[0], self.id, seg.first):
            expected = self._seg_header(seg.first)
            if len(data) < len(expected) and expected.startswith(data) and not self.readonly:
                # A crash while the segment was being created: it holds a prefix of its own header and no
                # entry. Write the header again. Anything else is not ours to repair.
                log.warning("journal.segment_header_repaired segment=%s", seg.path.name)
                self._rewrite_header(seg)
                return len(expected), seg.first - 1
            raise JournalError(f"{seg.path}: bad segment header (not a torn creation; refusing to guess)")
        off = res[1]
        seq = seg.first - 1
        good = off
        for header, _chunks, end in _iter_entries(data, off):
            if header is None:
                break
            if header.seq != seq + 1:
                raise JournalError(f"{seg.path}: seq {header.seq} follows {seq}")
            seq = header.seq
            good = end
        return good, seq

    def _seg_header(self, first: int) -> bytes:
        return codec.encode(
            {"k": "seg", "fmt": FORMAT, "v": FORMAT_VERSION, "journal": self.id, "first": first}
        )

    def _rewrite_header(self, seg: _Segment) -> None:
        with open(seg.path, "wb") as f:
            f.write(self._seg_header(seg.first))
            f.flush()
            os.fsync(f.fileno())

    def _start_segment(self, first: int) -> None:
        if self._out is not None:
            self._out.close()
        seg = _Segment(self.folder / _seg_name(first), first)
        self._out = open(seg.path, "wb")  # noqa: SIM115
        header = self._seg_header(first)
        self._out.write(header)
        self._out.flush()  # INVARIANT: a listed segment always has its header readable
        self._out_size = len(header)
        self._dirty = True
        if self.fsync:
            os.fsync(self._out.fileno())
            fsync_dir(self.folder)
        self._segments.append(seg)

    # -- appending ----------------------------------------------------------------------------------------
    @property
    def first_seq(self) -> int:
        return self._segments[0].first

    @property
    def pending(self) -> int:
        """Seq of the last appended (maybe not yet durable) entry."""
        return self._next - 1

    def _write(self, data: bytes) -> None:
        assert self._out is not None
        self._out.write(data)
        self._out_size += len(data)
        self._dirty = True

    def _maybe_rotate(self) -> None:
        if self._out_size >= self.segment_bytes and self._next > self._segments[-1].first:
            self.commit()
            self._start_segment(self._next)

    def append(self, change: Change, content: bytes | None = None) -> Change:
        """Append one entry (content whole, for a put of a small file). Returns it with its seq."""
        self._maybe_rotate()
        c = change
        if c.op is Op.PUT:
            data = content or b""
            digest = c.digest if len(c.digest) == DIGEST_SIZE else digest_bytes(data)
            # Built directly (not dataclasses.replace): this runs once per file shipped.
            n = chunk_count(len(data))
            change = Change(self._next, c.op, c.path, c.dst, len(data), c.mtime_ns, digest, n, c.ts_ns)
            parts = [codec.encode(entry_header(change))]
            parts.extend(codec.encode(data[i : i + CHUNK_SIZE]) for i in range(0, len(data), CHUNK_SIZE))
            self._write(b"".join(parts))
        else:
            change = Change(self._next, c.op, c.path, c.dst, c.size, c.mtime_ns, c.digest, c.chunks, c.ts_ns)
            self._write(codec.encode(entry_header(change)))
        self._next += 1
        return change

    def begin_put(self, change: Change) -> PutAppender:
        """Start a streamed put whose header (size, digest) is known; chunks follow."""
        self._maybe_rotate()
        change = replace(change, seq=self._next, chunks=chunk_count(change.size))
        assert self._out is not None
        self._out.flush()
        return PutAppender(self, change, self._out_size)

    def _truncate_to(self, offset: int) -> None:
        assert self._out is not None
        self._out.flush()
        self._out.truncate(offset)
        self._out.seek(offset)
        self._out_size = offset

    def commit(self) -> int:
        """Make every appended entry durable (one fsync for the group); return the new head."""
        if self._out is not None and self._dirty:
            self._out.flush()
            if self.fsync:
                os.fsync(self._out.fileno())
            self._dirty = False
        self.head = self._next - 1
        return self.head

    def close(self) -> None:
        if self._out is not None:
            self.commit()
            self._out.close()
            self._out = None

    # -- reading ------------------------------------------------------------------------------------------
    def cursor(self, seq: int) -> Cursor:
        """A reader positioned at ``seq`` (the next entry it yields). ``seq`` must still be kept."""
        if seq < self.first_seq or seq > self.head + 1:
            raise JournalError(f"seq {seq} is not in the journal (kept: {self.first_seq}..{self.head})")
        return Cursor(self, seq)

    def segments(self) -> list[tuple[Path, int]]:
        return [(s.path, s.first) for s in self._segments]

    def prune(self, acked: int, keep_after_mtime: float) -> int:
        """Delete whole segments whose entries are all acknowledged and that are older than the cut-off."""
        removed = 0
        while len(self._segments) > 1 and self._segments[1].first - 1 <= acked:
            seg = self._segments[0]
            try:
                if seg.path.stat().st_mtime >= keep_after_mtime:
                    break
                seg.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:  # Windows: a reader still has it open; try again next time
                log.info("journal.prune_deferred segment=%s reason=%s", seg.path.name, e)
                break
            self._segments.pop(0)
            removed += 1
        return removed


class PutAppender:
    """Streams one put's chunks into the journal; :meth:`abort` removes every byte it wrote."""

    def __init__(self, journal: Journal, change: Change, start: int) -> None:
        self.journal = journal
        self.change = change
        self.start = start
        self._hasher = Hasher()
        self._written = 0
        self._chunks = 0
        self._buf = bytearray()
        journal._write(codec.encode(entry_header(change)))

    def write(self, data: bytes) -> None:
        """Add content; it is framed in chunks of exactly CHUNK_SIZE (the last one shorter)."""
        self._hasher.update(data)
        self._written += len(data)
        self._buf += data
        while len(self._buf) >= CHUNK_SIZE:
            self._emit(bytes(self._buf[:CHUNK_SIZE]))
            del self._buf[:CHUNK_SIZE]

    def _emit(self, chunk: bytes) -> None:
        self._chunks += 1
        self.journal._write(codec.encode(chunk))

    def finish(self) -> Change | None:
        """Close the entry. Returns None (and aborts) if the content did not match the header."""
        if self._buf:
            self._emit(bytes(self._buf))
            self._buf.clear()
        if (
            self._written != self.change.size
            or self._chunks != self.change.chunks
            or self._hasher.digest() != self.change.digest
        ):
            self.abort()
            return None
        self.journal._next += 1
        return self.change

    def abort(self) -> None:
        self.journal._truncate_to(self.start)


def _is_seg_header(v: Any, journal_id: str, first: int) -> bool:
    return (
        isinstance(v, dict)
        and v.get("k") == "seg"
        and v.get("fmt") == FORMAT
        and v.get("v") == FORMAT_VERSION
        and (not journal_id or v.get("journal") == journal_id)
        and v.get("first") == first
    )


def _iter_entries(data: bytes, off: int) -> Iterator[tuple[Change | None, list[bytes], int]]:
    """Yield (header, chunks, end) for each whole entry from ``off``; a final (None, [], off) if torn."""
    while off < len(data):
        res = codec.decode_at(data, off)
        if isinstance(res, codec.Torn):
            yield None, [], off
            return
        value, nxt = res
        try:
            if not isinstance(value, dict) or value.get("k") != "e":
                raise ValueError("not an entry header")
            change = Change.from_wire(value)
        except ValueError:
            yield None, [], off
            return
        chunks: list[bytes] = []
        for _ in range(change.chunks):
            r = codec.decode_at(data, nxt)
            if isinstance(r, codec.Torn) or not isinstance(r[0], bytes):
                yield None, [], off
                return
            chunks.append(r[0])
            nxt = r[1]
        yield change, chunks, nxt
        off = nxt


class Cursor:
    """Reads forward from a seq, across segments, never past the durable head.

    Works frame by frame, so a 2 GiB put is read in 1 MiB pieces: :meth:`next_header` then, for a put,
    :meth:`chunks` (or :meth:`skip_chunks`); or :meth:`read_raw` for wire-ready bytes.
    """

    def __init__(self, journal: Journal, seq: int) -> None:
        self.journal = journal
        self.seq = seq  # seq of the next header to read
        self._f: BinaryIO | None = None
        self._seg_first = -1  # first seq of the open segment (indexes shift when old ones are pruned)
        self._cur: Change | None = None  # header whose chunks are still to be read
        self._remaining = 0
        try:
            self._seek(seq)
        except BaseException:
            self.close()
            raise

    def _seek(self, seq: int) -> None:
        segs = self.journal._segments
        seg = max((s for s in segs if s.first <= seq), key=lambda s: s.first)
        self._open_segment(seg)
        while self.seq < seq:
            if self.next_header() is None:
                raise JournalError(f"seq {seq} not found in {seg.path}")
            self.skip_chunks()

    def _next_segment(self) -> _Segment | None:
        later = [s for s in self.journal._segments if s.first > self._seg_first]
        return min(later, key=lambda s: s.first) if later else None

    def _open_segment(self, seg: _Segment) -> None:
        if self._f is not None:
            self._f.close()
        self._f = open(seg.path, "rb")  # noqa: SIM115
        self._seg_first = seg.first
        header = self._read_frame(skip=False)
        if header is None or not _is_seg_header(header[0], self.journal.id, seg.first):
            raise JournalError(f"{seg.path}: bad segment header")
        self.seq = seg.first

    def _read_frame(self, skip: bool) -> tuple[Any, bytes] | None:
        assert self._f is not None
        head = self._f.read(codec.HEADER_SIZE)
        if len(head) < codec.HEADER_SIZE:
            return None
        length, _crc = codec.HEADER.unpack(head)
        if skip:
            self._f.seek(length, os.SEEK_CUR)
            return None, b""
        raw = head + self._f.read(length)
        res = codec.decode_at(raw, 0)
        if isinstance(res, codec.Torn):
            raise JournalError(f"journal frame near seq {self.seq} is corrupt: {res.reason}")
        return res[0], raw

    def _header_frame(self) -> tuple[Change, bytes] | None:
        if self._remaining:
            raise JournalError("read the previous entry's chunks first")
        if self.seq > self.journal.head:
            return None
        frame = self._read_frame(skip=False)
        if frame is None:
            nxt = self._next_segment()
            if nxt is not None:
                self._open_segment(nxt)
                return self._header_frame()
            raise JournalError(f"journal ends before durable head {self.journal.head} (at {self.seq})")
        value, raw = frame
        if not isinstance(value, dict) or value.get("k") != "e":
            raise JournalError(f"expected an entry header at seq {self.seq}")
        change = Change.from_wire(value)
        if change.seq != self.seq:
            raise JournalError(f"expected seq {self.seq}, found {change.seq}")
        self._cur = change
        self._remaining = change.chunks
        if not self._remaining:
            self.seq += 1
        return change, raw

    def _chunk_frame(self, skip: bool) -> bytes:
        frame = self._read_frame(skip=skip)
        if frame is None or (not skip and not isinstance(frame[0], bytes)):
            raise JournalError(f"entry {self.seq} is missing content")
        self._remaining -= 1
        if not self._remaining:
            self.seq += 1
        return frame[1] if skip is False else b""

    @property
    def in_entry(self) -> bool:
        """True between a put's header and its last chunk."""
        return self._remaining > 0

    def next_header(self) -> Change | None:
        """The next durable entry's header, or None at the head."""
        r = self._header_frame()
        return None if r is None else r[0]

    def chunks(self) -> Iterator[bytes]:
        """The current put's content, chunk by chunk (each decoded from its frame)."""
        while self._remaining:
            raw = self._chunk_frame(skip=False)
            value = codec.decode_at(raw, 0)
            assert not isinstance(value, codec.Torn)
            yield value[0]

    def skip_chunks(self) -> None:
        while self._remaining:
            self._chunk_frame(skip=True)

    def next(self) -> Entry | None:
        """The next whole entry with its content in memory (small entries: tests, tools)."""
        change = self.next_header()
        if change is None:
            return None
        return Entry(change, tuple(self.chunks()))

    def read_raw(self, max_bytes: int = 4 << 20) -> tuple[bytes, list[Change]]:
        """Frames as stored (wire-ready), up to about ``max_bytes`` or the head. The list holds the
        headers of the entries *completed* by these bytes; a large put may span several calls."""
        out: list[bytes] = []
        done: list[Change] = []
        size = 0
        while size < max_bytes:
            if self._remaining:
                raw = self._chunk_frame(skip=False)
                if not self._remaining:
                    assert self._cur is not None
                    done.append(self._cur)
            else:
                r = self._header_frame()
                if r is None:
                    break
                raw = r[1]
                if not self._remaining:
                    done.append(r[0])
            out.append(raw)
            size += len(raw)
        return b"".join(out), done

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
