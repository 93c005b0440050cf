"""The sender's durable, append-only change journal. Knows nothing of TCP.

Layout of ``<state_dir>/journal/``::

    journal.id                      the journal's identity (hex), written once
    00000000000000000001.sbj        a segment, named by the first seq it holds
    00000000000000052213.sbj        ...
    damaged-20261125T100000Z/       what ``standby journal repair`` set aside (never read, never deleted)

A segment is a sequence of frames (see :mod:`engine.codec`). The first frame is the segment header
``{"k": "seg", "fmt": "standby-journal", "v": 1, "journal": ID, "first": SEQ}``. Then come entries: an
entry is a header frame ``{"k": "e", "s": SEQ, "o": OP, "p": PATH, ...}`` (see :class:`engine.model.Change`)
followed, for a put, by exactly ``c`` frames each holding one raw content chunk (msgpack bin, at most
1 MiB). These bytes are also the wire format of an entry, so the sender streams journal bytes as they are.

INVARIANT: seqs are consecutive from the first segment to the head, with no gap.
INVARIANT: only entries up to ``head`` (made durable by :meth:`Journal.commit`) are ever read, and a cursor
never reads a byte past the committed end (segment, offset) recorded with the head: bytes beyond it may
still be truncated (an aborted put, a failed append) and written again.
INVARIANT: a whole entry on disk is a finished one: a streamed put writes its last chunk only once its
content is checked, so an aborted put is never whole, even for a moment.
INVARIANT: only a torn tail is ever cut on open: a frame cut short (or failing its checksum) at the very end
of the last segment, with no whole frame after it. A whole frame that is not a valid entry, a bad frame
with a whole frame after it, or a seq out of order is damage: open refuses it (:class:`JournalDamaged`,
naming segment and offset) and ``standby journal repair`` keeps the valid prefix and sets the rest aside.
A full disk (ENOSPC, EDQUOT) raises :class:`JournalFull` and leaves the journal holding exactly the entries
up to :attr:`Journal.pending`.
"""

from __future__ import annotations

import bisect
import errno
import io
import json
import logging
import os
import re
import secrets
import sys
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from engine import codec
from engine.digest import DIGEST_SIZE, Hasher, checksum, digest_bytes
from engine.errors import JournalDamaged, JournalError, JournalFull
from engine.model import CHUNK_SIZE, Change, Op, chunk_count

log = logging.getLogger(__name__)

FORMAT = "standby-journal"
FORMAT_VERSION = 1
SUFFIX = ".sbj"
DEFAULT_SEGMENT_BYTES = 64 << 20
DAMAGED_PREFIX = "damaged-"
#: Entries between two of the journal's marks of where committed entries end (see Journal._marks).
MARK_EVERY = 256
#: How many bytes of the entries appended last the sender's journal keeps in memory, as written, for the
#: cursor that follows its head (the stream): it sends them without reading them back from the segment.
RECENT_BYTES = 8 << 20
#: A content frame at least this large is handed on by itself (read_pieces); smaller frames are joined.
RUN_MAX = 64 << 10
#: What one read_pieces hands on, about: TLS holds it two or three times more while it encrypts and sends
#: (4 MiB made the sender's peak 12-15 MB higher for a moment; more, smaller reads cost nothing measurable).
READ_BYTES = 1 << 20
#: What one remembered entry costs beyond its bytes (its header object, the tuple, the dict slot): charged
#: against the budget too, so 8 MiB of deletions is not 160,000 entries and 70 MiB.
RECENT_OVERHEAD = 512
#: Written at a clean close: where the committed entries of the last segment end, so that the next open
#: scans only what may follow them (a 64 MiB segment of small entries takes a second to scan whole).
END_HINT = "journal.end"
#: Ends every message about a journal that open or a cursor found inconsistent.
RECOVERY_HINT = (
    "run: standby journal check --config FILE; "
    "standby journal repair --config FILE keeps the valid prefix and sets the rest aside"
)
#: The errors that mean "no space left": the disk is full or the user is over quota.
FULL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


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


def _seg_header(journal_id: str, first: int) -> bytes:
    return codec.encode(
        {"k": "seg", "fmt": FORMAT, "v": FORMAT_VERSION, "journal": journal_id, "first": first}
    )


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
    #: Size once sealed (a later segment exists); None for the segment being written.
    end: int | None = None


def _pread(f: io.FileIO, offset: int, n: int) -> bytes:
    """Up to ``n`` bytes at ``offset`` (fewer only at the end of the file), straight from the OS: never
    from a read-ahead buffer that a truncation may have made stale."""
    parts: list[bytes] = []
    while n > 0:
        if sys.platform == "win32":
            f.seek(offset)
            b = f.read(n) or b""
        else:
            b = os.pread(f.fileno(), n, offset)
        if not b:
            break
        parts.append(b)
        offset += len(b)
        n -= len(b)
    return b"".join(parts)


def _write_all(f: io.FileIO, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = f.write(view)
        view = view[n or 0 :]


def _full_or_error(e: OSError, what: str) -> JournalError:
    if e.errno in FULL_ERRNOS:
        return JournalFull(f"journal disk full: {what}: {e.strerror or e} (nothing half-written was kept)")
    return JournalError(f"journal write failed: {what}: {e.strerror or e}")


class Journal:
    """Append entries, make them durable in groups, read them back from any seq still kept."""

    def __init__(
        self,
        folder: Path,
        *,
        fsync: bool = True,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        readonly: bool = False,
        salvaging: bool = False,
        remember: int = 0,
    ):
        self.folder = folder
        #: Bytes of the entries appended last to keep in memory for a cursor (0: none; see ``_recent``).
        self.remember = remember
        self.readonly = readonly or salvaging
        #: Recovery's reader: every segment is scanned at open and read past its damage (see Salvage).
        self.salvaging = salvaging
        self.salvage: Salvage | None = None
        self._skips: dict[tuple[int, int], Skip] = {}  # by (segment's first seq, offset)
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.id = ""
        self.head = 0  # last durable seq
        self._next = 1  # next seq to assign
        self._segments: list[_Segment] = []
        self._out: io.FileIO | None = None  # unbuffered: what a write returned is in the file, no more
        self._out_size = 0
        self._durable = 0  # end of the committed entries in the segment being written
        self._dirty = False
        self._appender: PutAppender | None = None
        self._broken = ""  # why appending is no longer possible (a failed append could not be undone)
        # (head, first seq of the segment holding the committed end, byte offset of that end), replaced as
        # one tuple so that a reader in another thread never sees half of an update.
        self._committed: tuple[int, int, int] = (0, 0, 0)
        #: Where committed entries ended, now and then (every MARK_EVERY entries), by segment: (seq, offset)
        #: in seq order. A cursor starts at the nearest one before its seq instead of the segment's start.
        self._marks: dict[int, list[tuple[int, int]]] = {}
        #: The entries appended last, by seq: (header, their bytes as written, the segment's first seq, the
        #: offset where they end). A cursor takes from here what it would read back (Cursor.read_raw). Only
        #: whole, non-streamed entries; dropped whole whenever bytes are cut back or a commit fails, so an
        #: entry here with a seq up to ``head`` is always the committed one. RACE: filled by the appending
        #: thread and read by a cursor's; single dict operations only, never iterated.
        self._recent: dict[int, tuple[Change, bytes, int, int]] = {}
        self._recent_lo = self._recent_hi = 1
        self._recent_bytes = 0

    # -- opening ------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: Path, **kw: Any) -> Journal:
        j = cls(folder, **kw)
        try:
            j._open()
        except OSError as e:
            j._close_quietly()
            if e.errno in FULL_ERRNOS:
                raise JournalFull(f"journal disk full: {folder}: {e.strerror or e}") from e
            raise
        except BaseException:
            j._close_quietly()
            raise
        return j

    def _close_quietly(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def _open(self) -> None:
        if self.readonly and not self.folder.is_dir():
            raise JournalError(f"{self.folder}: no journal here")
        self.folder.mkdir(parents=True, exist_ok=True)
        id_file = self.folder / "journal.id"
        segs = sorted(p for p in self.folder.iterdir() if p.suffix == SUFFIX and p.is_file())
        if id_file.exists():
            self.id = id_file.read_text("ascii").strip()
        elif segs:
            raise JournalError(
                f"{self.folder}: segments without journal.id; refusing to guess its identity "
                f"({RECOVERY_HINT})"
            )
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
            if not p.stem.isdigit():
                raise JournalError(f"{p}: not a segment name ({RECOVERY_HINT})")
            self._segments.append(_Segment(p, int(p.stem)))
        if not self._segments:
            if self.readonly:
                raise JournalError(f"{self.folder}: the journal holds no segment")
            self._remove_end_hint()
            self._start_segment(1)
            self._next = 1
            self.head = 0
            return
        if self.salvaging:
            self._open_salvaging()
            return
        for s in self._segments[:-1]:
            s.end = s.path.stat().st_size
        last = self._segments[-1]
        hint = None if self.readonly else self._take_end_hint(last)
        scan = scan_segment(last.path, self.id, last.first, hint)
        if hint is not None and scan.problem:
            # Anything but whole entries after the hint (a crash's torn tail, damage): judged from the
            # segment's start, as without a hint, before anything is cut.
            scan = scan_segment(last.path, self.id, last.first)
        end = scan.end
        if scan.problem and scan.torn and scan.end == 0 and not self.readonly:
            # A crash while the segment was being created: it holds a prefix of its own header and no
            # entry. Write the header again. Anything else is not ours to repair.
            log.warning("journal.segment_header_repaired segment=%s", last.path.name)
            end = self._rewrite_header(last)
        elif scan.problem and (not scan.torn or scan.end == 0):
            # RACE: a reader in another process may catch a live sender between an aborted put's
            # truncation and the next append; opening again a moment later reads a consistent file.
            raise JournalDamaged(str(last.path), scan.at, scan.problem, RECOVERY_HINT)
        self.head = scan.last
        self._next = scan.last + 1
        if self.readonly:  # a live sender may be appending: never cut, only read what is whole
            self._committed = (self.head, last.first, end)
            return
        if end < scan.size:
            log.warning(
                "journal.torn_tail_cut segment=%s cut_at=%d size=%d reason=%r",
                last.path.name,
                end,
                scan.size,
                scan.problem,
            )
            with open(last.path, "rb+") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        self._remove_end_hint()
        self._out = open(last.path, "ab", buffering=0)  # noqa: SIM115 - held open for appends
        self._out_size = self._durable = end
        self._committed = (self.head, last.first, end)

    def _remove_end_hint(self) -> None:
        """Remove the hint before appending, durably: a removal lost in a crash would bring back a hint
        that a later repair could make untrue. Held open elsewhere (Windows): it is still true, and the
        open goes on."""
        path = self.folder / END_HINT
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as e:
            log.warning("journal.end_hint_not_removed error=%s", e)
            return
        if self.fsync:
            fsync_dir(self.folder)

    def _take_end_hint(self, last: _Segment) -> tuple[int, int] | None:
        """(offset, seq) where the last segment's committed entries ended at the last clean close, if the
        hint is there and fits. It is removed once the journal is open for appending, so that it describes
        no state but the one it was written for.

        INVARIANT: committed bytes never change (appends add, a failed append cuts only what was not
        committed), so a hint stays true while the journal is appended to; only ``repair`` cuts committed
        bytes, and it removes the hint first. Both removals are made durable. The trade-off: bit rot in
        the committed bytes of the last segment is found by the cursor that reads them, not at open (as
        in every older segment)."""
        path = self.folder / END_HINT
        try:
            doc = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError):
            doc = None
        if not isinstance(doc, dict) or doc.get("journal") != self.id or doc.get("segment") != last.first:
            return None
        end, head = doc.get("end"), doc.get("head")
        if not isinstance(end, int) or not isinstance(head, int) or head < last.first - 1:
            return None
        try:
            size = last.path.stat().st_size
        except OSError:
            return None
        return (end, head) if 0 < end <= size else None

    def _write_end_hint(self) -> None:
        """At a clean close: where the committed entries end (see _take_end_hint). Best effort: without
        it the next open scans the whole last segment."""
        seg = self._segments[-1]
        doc = {"journal": self.id, "segment": seg.first, "end": self._durable, "head": self.head}
        tmp = self.folder / (END_HINT + ".tmp")
        try:
            if not self.fsync and self._out is not None:  # the hint vouches for these bytes: durable first
                os.fsync(self._out.fileno())
            tmp.write_text(json.dumps(doc), "utf-8")
            os.replace(tmp, self.folder / END_HINT)
        except OSError as e:
            log.debug("journal.end_hint_not_written error=%s", e)

    def _open_salvaging(self) -> None:
        sv = salvage(self.folder, self.id, [(s.path, s.first) for s in self._segments])
        self.salvage = sv
        # Segments after a missing one are never read; nor trailing ones holding no whole entry (one being
        # created when the writer crashed): a cursor past the head must not open them.
        kept = self._segments[: sv.segments]
        while len(kept) > 1 and kept[-1].first > sv.head:
            kept.pop()
        self._segments = kept
        for seg in self._segments:
            seg.end = seg.path.stat().st_size
        self._skips = {(int(k.path.stem), k.start): k for k in sv.skips}
        self.head = sv.head
        self._next = sv.head + 1
        last = self._segments[-1]
        self._committed = (self.head, last.first, last.end or 0)

    def _seg_header(self, first: int) -> bytes:
        return _seg_header(self.id, first)

    def _rewrite_header(self, seg: _Segment) -> int:
        header = self._seg_header(seg.first)
        with open(seg.path, "wb") as f:
            f.write(header)
            f.flush()
            os.fsync(f.fileno())
        return len(header)

    def _start_segment(self, first: int) -> None:
        seg = _Segment(self.folder / _seg_name(first), first)
        header = self._seg_header(first)
        try:
            f = open(seg.path, "wb", buffering=0)  # noqa: SIM115 - held open for appends
        except OSError as e:
            raise _full_or_error(e, str(seg.path)) from e
        try:
            _write_all(f, header)  # INVARIANT: a listed segment always has its header readable
            if self.fsync:
                self._fsync(f)
                fsync_dir(self.folder)
        except OSError as e:
            f.close()
            try:
                seg.path.unlink()
            except OSError:
                pass  # a prefix of a header: the next open writes it again
            raise _full_or_error(e, str(seg.path)) from e
        if self._out is not None:
            self._segments[-1].end = self._out_size  # sealed before the committed end moves past it
            self._out.close()
        self._out = f
        self._out_size = self._durable = len(header)
        self._dirty = False
        self._segments.append(seg)
        self._committed = (self.head, first, len(header))

    # -- appending ----------------------------------------------------------------------------------------
    @property
    def first_seq(self) -> int:
        return self._segments[0].first

    @property
    def pending(self) -> int:
        """Seq of the last appended (maybe not yet durable) entry."""
        return self._next - 1

    def _fsync(self, f: io.FileIO) -> None:
        """The one place the journal's data is fsynced (a seam for tests that inject a full disk)."""
        os.fsync(f.fileno())

    def _writable(self) -> io.FileIO:
        if self.readonly:
            raise JournalError(f"{self.folder}: the journal was opened read-only")
        if self._broken:
            raise JournalError(self._broken)
        if self._appender is not None:
            raise JournalError(f"entry {self._appender.change.seq}: a streamed put is still open")
        assert self._out is not None
        return self._out

    def _write(self, data: bytes) -> None:
        """Append bytes at the end of the segment; on an OSError the caller undoes its entry (``_undo``)."""
        assert self._out is not None
        view = memoryview(data)
        self._dirty = True
        while view:
            n = self._out.write(view) or 0
            self._out_size += n
            view = view[n:]

    def _undo(self, offset: int, e: OSError) -> JournalError:
        """Cut the segment back to ``offset`` after a failed append; the error to raise for ``e``."""
        seg = self._segments[-1].path
        self._cut_back(offset)
        err = _full_or_error(e, str(seg))
        log.debug("journal.append_undone segment=%s offset=%d error=%r", seg.name, offset, e.strerror)
        return err

    def _forget_recent(self, offset: int) -> None:
        """Drop the remembered entries that end past ``offset`` in the segment being written: their bytes
        are being cut back. Entries are remembered in order, so from the last."""
        first = self._segments[-1].first
        while self._recent and self._recent_hi >= self._recent_lo:
            item = self._recent.get(self._recent_hi)
            if item is not None:
                if item[2] != first or item[3] <= offset:
                    return
                del self._recent[self._recent_hi]
                self._recent_bytes -= len(item[1]) + RECENT_OVERHEAD
            self._recent_hi -= 1

    def _remember(self, change: Change, raw: bytes) -> None:
        if not self.remember:
            return
        if not self._recent:
            self._recent_lo = change.seq
        self._recent[change.seq] = (change, raw, self._segments[-1].first, self._out_size)
        self._recent_hi = change.seq
        self._recent_bytes += len(raw) + RECENT_OVERHEAD
        while self._recent_bytes > self.remember and self._recent_lo <= change.seq:
            old = self._recent.pop(self._recent_lo, None)
            self._recent_lo += 1
            if old is not None:
                self._recent_bytes -= len(old[1]) + RECENT_OVERHEAD

    def recent(self, seq: int) -> tuple[Change, bytes, int, int] | None:
        """Entry ``seq`` as it was written, if it is committed and still in memory (see ``_recent``)."""
        if seq > self._committed[0]:  # read first: an entry up to the committed head is never replaced
            return None
        return self._recent.get(seq)

    def _cut_back(self, offset: int) -> None:
        assert self._out is not None
        self._forget_recent(offset)
        try:
            self._out.truncate(offset)
            self._out.seek(offset)
        except OSError as e:
            self._broken = (
                f"journal segment {self._segments[-1].path}: a failed append could not be removed ({e}); "
                "restart to reopen the journal (its torn tail is cut then)"
            )
            raise JournalError(self._broken) from e
        self._out_size = offset

    def _maybe_rotate(self) -> None:
        if self._out_size >= self.segment_bytes and self._next > self._segments[-1].first:
            self.commit()
            self._start_segment(self._next)

    def append(self, change: Change, content: bytes | None = None) -> Change:
        """Append one entry (content whole, for a put of a small file). Returns it with its seq.

        Raises :class:`JournalFull` (disk full) with nothing of the entry left in the journal."""
        self._writable()
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
            raw = b"".join(parts)
        else:
            change = Change(self._next, c.op, c.path, c.dst, c.size, c.mtime_ns, c.digest, c.chunks, c.ts_ns)
            raw = codec.encode(entry_header(change))
        start = self._out_size
        try:
            self._write(raw)
        except OSError as e:
            raise self._undo(start, e) from e
        self._next += 1
        self._remember(change, raw)
        return change

    def begin_put(self, change: Change) -> PutAppender:
        """Start a streamed put whose header (size, digest) is known; chunks follow."""
        self._writable()
        self._maybe_rotate()
        change = replace(change, seq=self._next, chunks=chunk_count(change.size))
        return PutAppender(self, change, self._out_size)

    def _truncate_to(self, offset: int) -> None:
        self._cut_back(offset)

    def commit(self) -> int:
        """Make every appended entry durable (one fsync for the group); return the new head.

        Raises :class:`JournalFull` if the fsync finds the disk full: then nothing appended since the last
        commit can be trusted, so all of it is removed (``pending == head``)."""
        if self.readonly:
            return self.head
        if self._broken:
            raise JournalError(self._broken)
        if self._out is not None and self._dirty:
            if self.fsync:
                try:
                    self._fsync(self._out)
                except OSError as e:
                    # After a failed fsync the kernel may have dropped the pages it could not write: only
                    # what an earlier commit made durable is trusted.
                    if self._appender is not None:
                        self._appender._dead()
                    self._next = self.head + 1
                    raise self._undo(self._durable, e) from e
            self._dirty = False
        seg = self._segments[-1]
        # A put still being streamed is not committed, whatever was fsynced of it.
        end = self._appender.start if self._appender is not None else self._out_size
        self._durable = end
        self._committed = (self._next - 1, seg.first, end)  # INVARIANT: before head, for readers
        marks = self._marks.setdefault(seg.first, [])
        if self._next - 1 - (marks[-1][0] if marks else seg.first - 1) >= MARK_EVERY:
            marks.append((self._next - 1, end))
        self.head = self._next - 1
        return self.head

    def close(self) -> None:
        if self._out is not None:
            try:
                if self._appender is not None:
                    self._appender.abort()
                self.commit()
                if not self._broken:
                    self._write_end_hint()
            finally:
                self._out.close()
                self._out = None

    # -- reading ------------------------------------------------------------------------------------------
    def _mark_before(self, first: int, seq: int) -> tuple[int, int] | None:
        """(s, offset): in the segment starting at ``first``, the committed entries up to ``s < seq`` end at
        ``offset``; the nearest such point known (the committed end, or a mark), None if none."""
        head, cfirst, end = self._committed
        best = (head, end) if cfirst == first and first - 1 <= head < seq else None
        marks = self._marks.get(first, [])
        i = bisect.bisect_left(marks, (seq, -1)) - 1
        if i >= 0 and (best is None or marks[i][0] > best[0]):
            best = marks[i]
        return best

    def cursor(self, seq: int) -> Cursor:
        """A reader positioned at ``seq`` (the next entry it yields). ``seq`` must still be kept."""
        if seq < self.first_seq or seq > self.head + 1:
            raise JournalError(f"seq {seq} is not in the journal (kept: {self.first_seq}..{self.head})")
        return Cursor(self, seq)

    def headers(self, seq: int) -> Generator[Change, None, None]:
        """The entries' headers from ``seq`` to the committed head, their content skipped (what a plan
        needs: paths, kinds, digests)."""
        cur = self.cursor(seq)
        try:
            while (c := cur.next_header()) is not None:
                cur.skip_chunks()
                yield c
        finally:
            cur.close()

    def segments(self) -> list[tuple[Path, int]]:
        return [(s.path, s.first) for s in self._segments]

    def _readable_end(self, seg: _Segment) -> int:
        """How many bytes of ``seg`` a cursor may read: never past the committed end."""
        _head, first, end = self._committed  # read first: a sealed segment's end is set before it moves
        if seg.first == first:
            return end
        if seg.end is not None:
            return seg.end
        if seg.first < first:  # not expected: sealed segments carry their end
            return seg.path.stat().st_size
        return 0  # started after the committed end: only its header (always readable) is there

    def prune(self, acked: int, keep_after_mtime: float, *, pressure: bool = False) -> int:
        """Delete whole segments whose entries are all acknowledged and that are older than the cut-off.

        ``pressure=True`` (the journal's disk is full) deletes every wholly acknowledged segment whatever
        its age. The segment being written is never deleted, nor anything not acknowledged."""
        removed = 0
        while len(self._segments) > 1 and self._segments[1].first - 1 <= acked:
            seg = self._segments[0]
            try:
                if not pressure and seg.path.stat().st_mtime >= keep_after_mtime:
                    break
                seg.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:  # Windows: a reader still has it open; try again next time
                log.info("journal.prune_deferred segment=%s reason=%s", seg.path.name, e)
                break
            self._marks.pop(self._segments.pop(0).first, None)
            removed += 1
        if removed and pressure:
            log.warning("journal.pruned_under_pressure segments=%d first_seq=%d", removed, self.first_seq)
        return removed


class PutAppender:
    """Streams one put's chunks into the journal; :meth:`abort` removes every byte it wrote.

    A :class:`JournalFull` from :meth:`write` or :meth:`finish` has already removed them: the put is over.
    """

    def __init__(self, journal: Journal, change: Change, start: int) -> None:
        self.journal = journal
        self.change = change
        self.start = start
        self._hasher = Hasher()
        self._written = 0
        self._chunks = 0
        self._buf = bytearray()
        #: A whole chunk given whole (the usual case: content read CHUNK_SIZE at a time), kept as it is
        #: instead of copied into ``_buf``. Never both: one of them is empty.
        self._held: bytes | None = None
        self._open = True
        try:
            journal._write(codec.encode(entry_header(change)))
        except OSError as e:
            self._open = False
            raise journal._undo(start, e) from e
        journal._appender = self

    def write(self, data: bytes) -> None:
        """Add content; it is framed in chunks of exactly CHUNK_SIZE (the last one shorter)."""
        if not self._open:
            raise JournalError(f"entry {self.change.seq}: the streamed put is over (finished or aborted)")
        self._hasher.update(data)
        self._written += len(data)
        if self._written > self.change.size:
            self._buf.clear()  # more than announced: finish() refuses it, nothing more is written
            self._held = None
            return
        # The last chunk stays here until finish() has checked the content (see the INVARIANT above).
        if not self._buf and len(data) == CHUNK_SIZE:
            if self._held is not None:
                self._emit(self._held)
            self._held = bytes(data)  # no copy when it is bytes already
            return
        if self._held is not None:
            self._buf += self._held
            self._held = None
        self._buf += data
        while len(self._buf) > CHUNK_SIZE:
            self._emit(bytes(self._buf[:CHUNK_SIZE]))
            del self._buf[:CHUNK_SIZE]

    def _emit(self, chunk: bytes) -> None:
        try:
            # The frame encode(chunk) makes, written without copying the chunk into it.
            self.journal._write(codec.bin_frame_head(chunk))
            self.journal._write(chunk)
        except OSError as e:
            self._dead()
            raise self.journal._undo(self.start, e) from e
        self._chunks += 1

    def _dead(self) -> None:
        self._open = False
        if self.journal._appender is self:
            self.journal._appender = None

    def finish(self) -> Change | None:
        """Close the entry. Returns None (and aborts) if the content did not match the header."""
        if not self._open:
            return None
        last = self._held if self._held is not None else bytes(self._buf)
        self._buf.clear()
        self._held = None
        if (
            self._written != self.change.size
            or self._chunks + (1 if last else 0) != self.change.chunks
            or self._hasher.digest() != self.change.digest
        ):
            self.abort()
            return None
        if last:
            self._emit(last)
        self._dead()
        self.journal._next += 1
        return self.change

    def abort(self) -> None:
        """Remove every byte of this put (a no-op once it is over)."""
        if self._open:
            self._dead()
            self.journal._cut_back(self.start)


def _is_seg_header(v: Any, journal_id: str, first: int) -> bool:
    return (
        isinstance(v, dict)
        and v.get("k") == "seg"
        and v.get("fmt") == FORMAT
        and v.get("v") == FORMAT_VERSION
        and (not journal_id or v.get("journal") == journal_id)
        and v.get("first") == first
    )


# -- scanning: what open, check and repair know about a segment --------------------------------------------


@dataclass(frozen=True, slots=True)
class SegmentScan:
    """What a segment holds: its header and whole, valid entries up to ``end``, then maybe a problem."""

    path: Path
    first: int
    size: int
    end: int  # end of the valid prefix: the header and the whole entries after it (0: not even a header)
    last: int  # seq of the last whole entry (first - 1 if none)
    entries: int = 0
    problem: str = ""  # why the bytes from ``end`` on are not whole entries ("" when there are none)
    at: int = 0  # offset of the first bad frame (inside the entry starting at ``end``)
    torn: bool = False  # a torn tail: the end of an interrupted append, the only thing open ever cuts


class _FrameReader:
    """Frames of a segment file by offset, through a read-ahead window. Used by scans only, which read a
    file no writer truncates below what they scan (cursors read without a window: see Cursor)."""

    WINDOW = 1 << 20

    def __init__(self, f: io.FileIO, size: int) -> None:
        self._f = f
        self.size = size
        self._base = 0
        self._buf = b""

    def _ensure(self, off: int, n: int) -> None:
        if off < self._base or off + n > self._base + len(self._buf):
            self._base = off
            self._buf = _pread(self._f, off, max(n, self.WINDOW))

    def frame_at(self, off: int) -> tuple[Any, int] | codec.Torn:
        if self.size - off < codec.HEADER_SIZE:
            return codec.Torn(off, "truncated header")
        self._ensure(off, codec.HEADER_SIZE)
        length, _crc = codec.HEADER.unpack_from(self._buf, off - self._base)
        if length <= codec.DEFAULT_MAX_FRAME and off + codec.HEADER_SIZE + length <= self.size:
            self._ensure(off, codec.HEADER_SIZE + length)
        res = codec.decode_at(self._buf, off - self._base)
        if isinstance(res, codec.Torn):
            return codec.Torn(off, res.reason)
        return res[0], res[1] + self._base

    def declared_end(self, off: int) -> int | None:
        """Where the frame at ``off`` says it ends, if its length is plausible and inside the file."""
        if self.size - off < codec.HEADER_SIZE:
            return None
        self._ensure(off, codec.HEADER_SIZE)
        length = int(codec.HEADER.unpack_from(self._buf, off - self._base)[0])
        end = off + codec.HEADER_SIZE + length
        return end if 0 < length <= codec.DEFAULT_MAX_FRAME and end < self.size else None


#: Where a frame may start that holds an entry header (a msgpack map under 16 KiB: two paths of at most
#: 1,024 characters) or a content chunk (msgpack bin, at most about 1 MiB): u32 length (little-endian),
#: u32 checksum, then the map or bin marker. Each candidate is then decoded and its checksum checked.
_FRAME_START = re.compile(
    rb"(?=[\x00-\xff][\x00-\x3f]\x00\x00[\x00-\xff]{4}[\x80-\x8f\xde])"
    rb"|(?=[\x00-\xff]{2}[\x00-\x10]\x00[\x00-\xff]{4}[\xc4\xc5\xc6])"
)


def _is_header(v: Any) -> bool:
    """Whether a decoded frame is an entry's header (the other frames are content chunks)."""
    return isinstance(v, dict) and v.get("k") == "e"


def _entry(v: Any) -> Change:
    """The entry a decoded frame is the header of; ValueError if it is not one."""
    if not _is_header(v):
        raise ValueError("not an entry header")
    return Change.from_wire(v)


def _whole_frame_after(f: io.FileIO, rd: _FrameReader, at: int) -> int | None:
    """Offset of a whole, valid frame after the bad frame at ``at``: first where that frame says it ends,
    then anywhere later (an entry header or a content chunk). None: nothing after it is whole."""
    end = rd.declared_end(at)
    if end is not None and not isinstance(rd.frame_at(end), codec.Torn):
        return end
    for off, v in _frames_after(f, rd, at):
        if _is_header(v) or isinstance(v, bytes):
            return off
    return None


def _frames_after(f: io.FileIO, rd: _FrameReader, at: int) -> Iterator[tuple[int, Any]]:
    """Every whole, valid frame that starts after byte ``at``, by scanning the bytes for frame starts:
    (offset, value), in order."""
    step = 4 << 20
    overlap = codec.DEFAULT_MAX_FRAME + codec.HEADER_SIZE
    pos = at + 1
    while pos < rd.size - codec.HEADER_SIZE:
        buf = _pread(f, pos, step + overlap)
        for m in _FRAME_START.finditer(buf):
            i = m.start()
            if i >= step:
                break
            res = codec.decode_at(buf, i)
            if not isinstance(res, codec.Torn):
                yield pos + i, res[0]
        pos += step


def scan_segment(
    path: Path, journal_id: str, first: int, start: tuple[int, int] | None = None
) -> SegmentScan:
    """Walk a segment frame by frame and say how far it holds whole, valid entries, and why not further.
    ``start`` (offset, seq): the whole entries up to ``seq`` are known to end at that offset (a clean
    close's hint): the walk starts there.

    Decides torn tail against damage: a bad frame is a torn tail only if no whole frame follows it."""
    with open(path, "rb", buffering=0) as f:
        rd, base, off = _open_scan(f, path, journal_id, first)
        if off is None:
            return base
        if start is not None and start[0] >= off:
            return _scan_entries(f, rd, base, start[0], start[1])
        return _scan_entries(f, rd, base, off, first - 1)


def _open_scan(
    f: io.FileIO, path: Path, journal_id: str, first: int
) -> tuple[_FrameReader, SegmentScan, int | None]:
    """A frame reader over the segment, the scan so far, and the offset after its header (None: the header
    is bad, and the scan says why)."""
    size = os.fstat(f.fileno()).st_size
    rd = _FrameReader(f, size)
    base = SegmentScan(path, first, size, 0, first - 1)
    hdr = rd.frame_at(0)
    if isinstance(hdr, codec.Torn) or not _is_seg_header(hdr[0], journal_id, first):
        expected = _seg_header(journal_id, first)
        if size < len(expected) and expected.startswith(_pread(f, 0, size)):
            return (
                rd,
                replace(base, problem="torn segment header (a crash while it was created)", torn=True),
                None,
            )
        why = hdr.reason if isinstance(hdr, codec.Torn) else "not this journal's header for this name"
        return rd, replace(base, problem=f"bad segment header: {why}"), None
    return rd, base, hdr[1]


def _scan_entries(f: io.FileIO, rd: _FrameReader, base: SegmentScan, off: int, seq: int) -> SegmentScan:
    """Walk whole entries from ``off`` (the next one must be ``seq + 1``) to the end or the first problem."""
    size = rd.size
    count = 0

    def bad(at: int, reason: str) -> SegmentScan:
        nxt = _whole_frame_after(f, rd, at)
        if nxt is None:
            return replace(base, end=off, last=seq, entries=count, problem=reason, at=at, torn=True)
        why = f"{reason}, with a whole frame after it at byte {nxt}"
        return replace(base, end=off, last=seq, entries=count, problem=why, at=at)

    def damaged(at: int, reason: str) -> SegmentScan:
        return replace(base, end=off, last=seq, entries=count, problem=reason, at=at)

    while off < size:
        r = rd.frame_at(off)
        if isinstance(r, codec.Torn):
            return bad(off, f"bad frame: {r.reason}")
        value, nxt = r
        try:
            change = _entry(value)
        except ValueError as e:
            return damaged(off, f"a whole frame that is not a valid entry after seq {seq}: {e}")
        if change.seq != seq + 1:
            return damaged(off, f"seq {change.seq} follows {seq}")
        total = 0
        for i in range(change.chunks):
            c = rd.frame_at(nxt)
            if isinstance(c, codec.Torn):
                return bad(nxt, f"content frame {i + 1} of {change.chunks} of entry {change.seq}: {c.reason}")
            if not isinstance(c[0], bytes):
                return damaged(nxt, f"content frame {i + 1} of entry {change.seq} is not bytes")
            total += len(c[0])
            nxt = c[1]
        if change.op is Op.PUT and total != change.size:  # a touch names a size but carries nothing
            return damaged(
                off, f"entry {change.seq} holds {total} content bytes, its header says {change.size}"
            )
        seq = change.seq
        off = nxt
        count += 1
    return replace(base, end=off, last=seq, entries=count)


# -- salvage: reading past damage, for recovery -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Skip:
    """Damaged bytes of a segment a salvaging reader passes over."""

    path: Path
    start: int  # where the damage starts: the end of the whole entries before it
    resume: int | None  # offset of the next whole entry in the segment (None: nothing whole after it)
    after: int  # seq of the last whole entry before it
    next_seq: int | None  # seq of the entry it resumes at (None: in a later segment, or none)
    problem: str

    @property
    def lost(self) -> str:
        """The entries in the damaged bytes."""
        if self.next_seq is None:
            return f"entries from {self.after + 1} on"
        if self.next_seq <= self.after + 1:
            return "no whole entry (bytes between two entries)"
        if self.next_seq == self.after + 2:
            return f"entry {self.after + 1}"
        return f"entries {self.after + 1}..{self.next_seq - 1}"

    def __str__(self) -> str:
        end = f"..{self.resume}" if self.resume is not None else " to its end"
        return f"segment {self.path.name} bytes {self.start}{end}: {self.lost} ({self.problem})"

    def touches(self, start: int, end: int) -> bool:
        """Whether a reader of entries ``start..end`` loses an entry to this damage (bytes between two
        whole entries lose none)."""
        if self.next_seq is not None and self.next_seq <= self.after + 1:
            return False
        return self.after < end and (self.next_seq is None or self.next_seq > start)


@dataclass(frozen=True, slots=True)
class Salvage:
    """What a reader can get out of a damaged journal: every whole entry up to ``head``, past ``skips``;
    nothing after a ``missing`` segment (never jumped)."""

    head: int
    skips: tuple[Skip, ...] = ()
    missing: str = ""
    segments: int = 0  # how many segments are read (those after a missing one are not)


def _next_entry_after(
    f: io.FileIO, rd: _FrameReader, at: int, after: int, bound: int | None = None
) -> tuple[int, int] | None:
    """Offset and seq of the first whole entry header after the bad frame at ``at``, with a seq past
    ``after`` (and at most ``bound``). First along the chain of whole frames from where the bad frame says
    it ends (content chunks passed over as content: a file that holds journal frames is never read as
    entries); only when that chain breaks, by scanning the bytes for a frame start."""

    def entry_seq(v: Any) -> int | None:
        try:
            seq = _entry(v).seq
        except ValueError:
            return None
        return seq if seq > after and (bound is None or seq <= bound) else None

    pos = rd.declared_end(at)
    while pos is not None and pos < rd.size:
        r = rd.frame_at(pos)
        if isinstance(r, codec.Torn):
            break
        if (seq := entry_seq(r[0])) is not None:
            return pos, seq
        if _is_header(r[0]):  # a whole header out of bounds: no chain
            break
        pos = r[1]
    for off, v in _frames_after(f, rd, at):
        if (seq := entry_seq(v)) is not None:
            return off, seq
    return None


def _salvage_segment(path: Path, journal_id: str, first: int, bound: int | None) -> tuple[int, list[Skip]]:
    """The last whole entry of one segment read past its damage, and the damage passed over. A torn tail of
    the last segment (``bound`` None; else the last seq the segment can hold, by the next one's name) is
    where the journal ends (not damage); a bad header skips the whole segment."""
    last = bound is None
    with open(path, "rb", buffering=0) as f:
        rd, base, off = _open_scan(f, path, journal_id, first)
        sc = base
        if off is None:
            if sc.torn and last:
                return first - 1, []
            return first - 1, [Skip(path, 0, None, first - 1, None, sc.problem)]
        skips: list[Skip] = []
        seq = first - 1
        while True:
            sc = _scan_entries(f, rd, base, off, seq)
            if not sc.problem or (sc.torn and last):
                return sc.last, skips
            nxt = _next_entry_after(f, rd, sc.at, sc.last, bound)
            if nxt is None:
                skips.append(Skip(path, sc.end, None, sc.last, None, sc.problem))
                return sc.last, skips
            skips.append(Skip(path, sc.end, nxt[0], sc.last, nxt[1], sc.problem))
            off, seq = nxt[0], nxt[1] - 1


def salvage(folder: Path, journal_id: str, segments: list[tuple[Path, int]]) -> Salvage:
    """Read every segment past its damage (see :class:`Salvage`). A gap between segments that no damage
    explains is a missing segment: reading stops before it."""
    skips: list[Skip] = []
    last: int | None = None
    for i, (path, first) in enumerate(segments):
        open_end = bool(skips) and skips[-1].next_seq is None and skips[-1].after == last
        if open_end and last is not None and first == last + 1:
            skips[-1] = replace(skips[-1], next_seq=first)  # bytes after the last entry: no entry lost
        if last is not None and first != last + 1:
            if open_end and first > last + 1:
                # Entries last+1..first-1 are in the damaged tail of the segment before (its name says it
                # holds them), or in a segment missing between: the skip says both (a segment unread from
                # its header on is taken at its name).
                tail = skips[-1]
                why = tail.problem + ("; or in a missing segment" if tail.start else "")
                skips[-1] = replace(tail, next_seq=first, problem=why)
            else:
                missing = (
                    f"a segment is missing before {path.name}: the one before ends at entry {last}, this one "
                    f"starts at {first}"
                    if first > last + 1
                    else f"{path.name} starts at entry {first}, inside the segment before (it ends at {last})"
                )
                return Salvage(last, tuple(skips), missing, i)
        bound = segments[i + 1][1] - 1 if i + 1 < len(segments) else None
        end, found = _salvage_segment(path, journal_id, first, bound)
        skips += found
        last = end
    return Salvage(last if last is not None else 0, tuple(skips), "", len(segments))


# -- check and repair: the documented recovery from damage ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class JournalCheck:
    """A whole-journal check: every segment scanned in order until the first problem."""

    folder: Path
    id: str
    scans: tuple[SegmentScan, ...]  # in order, the last one the first with a problem (if any)
    later: tuple[Path, ...] = ()  # segments after the bad one, not scanned
    problem: str = ""  # a problem no segment scan names (no journal.id, a file that is not a segment)

    @property
    def bad(self) -> SegmentScan | None:
        """The first segment with a problem (its valid prefix ends at ``end``)."""
        return self.scans[-1] if self.scans and self.scans[-1].problem else None

    @property
    def torn_tail_only(self) -> bool:
        """The only problem is a torn tail of the last segment (open cuts it: not damage)."""
        b = self.bad
        return b is not None and b.torn and not self.later and not self.problem

    @property
    def damaged(self) -> bool:
        return bool(self.problem) or (self.bad is not None and not self.torn_tail_only)

    @property
    def first_seq(self) -> int:
        return self.scans[0].first if self.scans else 0

    @property
    def last_seq(self) -> int:
        """The last seq of the valid prefix."""
        if not self.scans:
            return 0
        if self.scans[-1].end == 0:  # nothing of the last one scanned is kept
            return self.scans[-2].last if len(self.scans) > 1 else self.scans[-1].first - 1
        return self.scans[-1].last


def check(folder: Path) -> JournalCheck:
    """Scan the whole journal, read-only: the valid prefix and the first problem. Takes no lock."""
    if not folder.is_dir():
        raise JournalError(f"{folder}: no journal here")
    id_file = folder / "journal.id"
    segs = sorted(p for p in folder.iterdir() if p.suffix == SUFFIX and p.is_file())
    journal_id = id_file.read_text("ascii").strip() if id_file.exists() else ""
    if not journal_id:
        return JournalCheck(
            folder, "", (), tuple(segs), problem="no journal.id: the journal's identity is lost"
        )
    odd = [p for p in segs if not p.stem.isdigit()]
    if odd:
        return JournalCheck(folder, journal_id, (), (), problem=f"{odd[0].name}: not a segment name")
    scans: list[SegmentScan] = []
    for i, p in enumerate(segs):
        first = int(p.stem)
        scan = scan_segment(p, journal_id, first)
        if scans and first != scans[-1].last + 1:
            why = f"starts at seq {first}, but the segment before ends at seq {scans[-1].last}"
            scan = replace(scan, end=0, last=first - 1, entries=0, at=0, torn=False, problem=why)
        if scan.problem and scan.torn and i < len(segs) - 1:
            scan = replace(
                scan, torn=False, problem=f"{scan.problem} (not the last segment: a later one exists)"
            )
        scans.append(scan)
        if scan.problem:
            return JournalCheck(folder, journal_id, tuple(scans), tuple(segs[i + 1 :]))
    return JournalCheck(folder, journal_id, tuple(scans))


@dataclass(frozen=True, slots=True)
class RepairResult:
    check: JournalCheck
    aside: Path | None = None  # the damaged-<UTC time> folder, if anything was set aside
    moved: tuple[str, ...] = field(default=())  # one line per thing set aside


def repair(folder: Path, now: datetime | None = None) -> RepairResult:
    """Keep the valid prefix; move everything after it into ``damaged-<UTC time>/``. Never deletes.

    The caller holds the state lock (no sender runs). Safe to run again after a crash part way: later
    segments move first (the journal is a prefix at every step), then the bad segment's tail is copied
    aside (and made durable) before the segment is cut."""
    try:  # it may describe bytes this repair cuts: gone, durably, before they are
        (folder / END_HINT).unlink()
        fsync_dir(folder)
    except FileNotFoundError:
        pass
    result = check(folder)
    bad = result.bad
    if result.problem:
        raise JournalError(
            f"{folder}: {result.problem}; repair cannot rebuild this, restore it from a backup"
        )
    if bad is None:
        return RepairResult(result)
    stamp = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = folder / f"{DAMAGED_PREFIX}{stamp}"
    n = 1
    while aside.exists():
        n += 1
        aside = folder / f"{DAMAGED_PREFIX}{stamp}-{n}"
    aside.mkdir()
    moved: list[str] = []
    for p in reversed(result.later):
        os.replace(p, aside / p.name)
        moved.append(f"{p.name} (whole segment)")
    if bad.end == 0:
        os.replace(bad.path, aside / bad.path.name)
        moved.append(f"{bad.path.name} (whole segment: {bad.problem})")
    else:
        tail = aside / f"{bad.path.name}.from-{bad.end}"
        with open(bad.path, "rb") as src, open(tail, "wb") as dst:
            src.seek(bad.end)
            while block := src.read(1 << 20):
                dst.write(block)
            dst.flush()
            os.fsync(dst.fileno())
        fsync_dir(aside)
        with open(bad.path, "rb+") as f:
            f.truncate(bad.end)
            os.fsync(f.fileno())
        moved.append(f"{bad.path.name} bytes {bad.end}..{bad.size} as {tail.name} ({bad.problem})")
    moved.reverse()
    fsync_dir(aside)
    fsync_dir(folder)
    kept = [s for s in result.scans if s.end > 0]
    if not kept and not any(p.suffix == SUFFIX for p in folder.iterdir()):
        # Nothing left: a fresh header for the first seq, so the journal goes on where it was.
        (folder / bad.path.name).write_bytes(_seg_header(result.id, bad.first))
        fsync_dir(folder)
    log.warning("journal.repaired folder=%s aside=%s kept_through=%d", folder, aside.name, result.last_seq)
    return RepairResult(result, aside, tuple(moved))


class Cursor:
    """Reads forward from a seq, across segments, never past the committed end.

    Works frame by frame, so a 2 GiB put is read in 1 MiB pieces: :meth:`next_header` then, for a put,
    :meth:`chunks` (or :meth:`skip_chunks`); or :meth:`read_raw` for wire-ready bytes.

    INVARIANT: reads go to the OS at explicit offsets and never past the journal's committed end, read-ahead
    included: committed bytes never change, so nothing a cursor holds can be made stale by the truncation
    of an aborted put (which only ever cuts bytes past the committed end).
    """

    READ_AHEAD = 64 << 10

    def __init__(self, journal: Journal, seq: int) -> None:
        self.journal = journal
        self.seq = seq  # seq of the next header to read
        self._f: io.FileIO | None = None
        self._seg: _Segment | None = None
        self._off = 0  # offset of the next frame in the open segment
        self._ahead = b""  # committed bytes of the open segment from offset _ahead_at (see the INVARIANT)
        self._ahead_at = 0
        self._cur: Change | None = None  # header whose chunks are still to be read
        self._remaining = 0
        try:
            self._seek(seq)
        except BaseException:
            self.close()
            raise

    def _seek(self, seq: int) -> None:
        segs = list(self.journal._segments)
        seg = max((s for s in segs if s.first <= seq), key=lambda s: s.first)
        self._open_segment(seg)
        if not self.journal._skips and (at := self.journal._mark_before(seg.first, seq)) is not None:
            self.seq, self._off = at[0] + 1, at[1]  # whole entries end there: the next one starts there
        while True:
            # Salvaging: damage passed over before the entry wanted may land past it (the first whole entry
            # after the damage); that entry is then the next one read, never read and dropped here.
            if not self._pass_damage() or self.seq >= seq:
                break
            if self.next_header() is None:
                raise JournalError(f"seq {seq} not found in {seg.path}")
            self.skip_chunks()

    def _pass_damage(self) -> bool:
        """Salvaging: move past every damaged stretch at the cursor (several may follow each other). False
        when the journal ends in damage (nothing whole after it)."""
        skips = self.journal._skips
        while skips and self._seg is not None:
            skip = skips.get((self._seg.first, self._off))
            if skip is None:
                return True
            if skip.resume is None:
                nxt = self._next_segment()
                if nxt is None:
                    self.seq = self.journal.head + 1
                    return False
                self._open_segment(nxt)
            else:
                self._off = skip.resume
                self.seq = skip.next_seq or self.seq
        return True

    def _next_segment(self) -> _Segment | None:
        assert self._seg is not None
        later = [s for s in list(self.journal._segments) if s.first > self._seg.first]
        return min(later, key=lambda s: s.first) if later else None

    def _damaged(self, offset: int, reason: str) -> JournalDamaged:
        where = str(self._seg.path) if self._seg is not None else str(self.journal.folder)
        return JournalDamaged(where, offset, reason, RECOVERY_HINT)

    def _open_segment(self, seg: _Segment) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if (seg.first, 0) in self.journal._skips:  # salvaging: a segment whose header is damaged
            self._seg = seg
            self._off = 0
            self.seq = seg.first
            return
        self._f = open(seg.path, "rb", buffering=0)  # noqa: SIM115
        self._seg = seg
        self._off = 0
        self._ahead = b""
        # The header is written whole when the segment is created and never changes: always readable.
        header = self._read_frame(skip=False, limit=None)
        if header is None or not _is_seg_header(header[0], self.journal.id, seg.first):
            raise self._damaged(0, "bad segment header")
        self.seq = seg.first

    def _read_exact(self, offset: int, n: int, limit: int | None) -> bytes:
        """``n`` bytes at ``offset``; may read ahead, but only up to ``limit`` (the committed end)."""
        assert self._f is not None
        at = offset - self._ahead_at
        if at >= 0 and at + n <= len(self._ahead):
            return self._ahead[at : at + n]
        if limit is None or n >= self.READ_AHEAD or limit - offset <= n:
            data = _pread(self._f, offset, n)
        else:
            self._ahead = _pread(self._f, offset, min(self.READ_AHEAD, limit - offset))
            self._ahead_at = offset
            data = self._ahead[:n]
        if len(data) < n:
            raise self._damaged(
                offset, f"the segment ends at byte {offset + len(data)}, before its committed end"
            )
        return data

    def _frame_head(self, limit: int | None) -> tuple[int, bytes, int] | None:
        """The frame at the cursor: its offset, its header's bytes and where it ends, its length checked
        against ``limit`` (the committed end); None at that end. The cursor does not move."""
        off = self._off
        if limit is not None and off >= limit:
            return None
        head = self._read_exact(off, codec.HEADER_SIZE, limit)
        length, _crc = codec.HEADER.unpack(head)
        end = off + codec.HEADER_SIZE + length
        if length > codec.DEFAULT_MAX_FRAME or (limit is not None and end > limit):
            raise self._damaged(off, f"a frame of {length} bytes runs past the committed end (byte {limit})")
        return off, head, end

    def _read_frame(self, skip: bool, limit: int | None = -1) -> tuple[Any, bytes] | None:
        """The frame at the cursor, or None at the committed end of the open segment."""
        assert self._seg is not None
        if limit == -1:
            limit = self.journal._readable_end(self._seg)
        frame = self._frame_head(limit)
        if frame is None:
            return None
        off, head, end = frame
        if skip:
            self._off = end
            return None, b""
        raw = head + self._read_exact(off + codec.HEADER_SIZE, end - off - codec.HEADER_SIZE, limit)
        res = codec.decode_at(raw, 0)
        if isinstance(res, codec.Torn):
            raise self._damaged(off, f"frame near seq {self.seq} is corrupt: {res.reason}")
        self._off = end
        return res[0], raw

    def _header_frame(self) -> tuple[Change, bytes] | None:
        if self._remaining:
            raise JournalError("read the previous entry's chunks first")
        head = self.journal.head
        if self.seq > head:
            return None
        if not self._pass_damage():  # salvaging: see Salvage
            return None
        off = self._off
        frame = self._read_frame(skip=False)
        if frame is None:
            nxt = self._next_segment()
            if nxt is not None:
                self._open_segment(nxt)
                return self._header_frame()
            raise self._damaged(off, f"the journal ends before its durable head {head} (at seq {self.seq})")
        value, raw = frame
        try:
            change = _entry(value)
        except ValueError as e:
            raise self._damaged(
                off, f"expected entry {self.seq}, found a frame that is not one: {e}"
            ) from None
        if change.seq != self.seq:
            raise self._damaged(off, f"expected seq {self.seq}, found {change.seq}")
        self._cur = change
        self._remaining = change.chunks
        if not self._remaining:
            self.seq += 1
        return change, raw

    def _chunk_frame(self, skip: bool) -> bytes:
        off = self._off
        frame = self._read_frame(skip=skip)
        if frame is None or (not skip and not isinstance(frame[0], bytes)):
            raise self._damaged(off, f"entry {self.seq} is missing content")
        self._chunk_done()
        return frame[1] if skip is False else b""

    def _chunk_done(self) -> None:
        """One content frame of the current put read: the entry is done after its last."""
        self._remaining -= 1
        if not self._remaining:
            self.seq += 1

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

    def _take_recent(self) -> tuple[Change, bytes] | None:
        """The next entry whole from the journal's memory of what it appended last (see Journal._recent),
        the cursor moved past it as if it had been read from the segment. None: read it from the segment."""
        hit = self.journal.recent(self.seq)
        if hit is None or self.journal._skips:
            return None
        change, raw, seg_first, end = hit
        if self._seg is None or self._seg.first != seg_first:
            seg = next((s for s in list(self.journal._segments) if s.first == seg_first), None)
            if seg is None:
                return None
            self._open_segment(seg)
        self._off = end
        self.seq = change.seq + 1
        return change, raw

    def _chunk_pieces(self) -> tuple[bytes, bytes]:
        """The current put's next content frame as stored, in two pieces (header, payload), checked (its
        checksum, a msgpack bin of the right length) but never decoded or joined: a large put's content
        goes out as it was read."""
        assert self._seg is not None
        limit = self.journal._readable_end(self._seg)
        frame = self._frame_head(limit)
        if frame is None:
            raise self._damaged(self._off, f"entry {self.seq} is missing content")
        off, head, end = frame
        payload = self._read_exact(off + codec.HEADER_SIZE, end - off - codec.HEADER_SIZE, limit)
        if checksum(payload) != codec.HEADER.unpack(head)[1]:
            raise self._damaged(off, f"frame near seq {self.seq} is corrupt: checksum mismatch")
        if not codec.bin_payload_ok(payload):
            raise self._damaged(off, f"entry {self.seq} is missing content")
        self._off = end
        self._chunk_done()
        return head, payload

    def read_pieces(self, max_bytes: int = READ_BYTES) -> tuple[list[bytes], int, list[Change]]:
        """Frames as stored (wire-ready), up to about ``max_bytes`` or the head: the pieces to send in
        order, their total size, and the headers of the entries *completed* by them (a large put may span
        several calls). Entries still in the journal's memory are taken from there, byte for byte what
        the segment holds. Small frames come joined into runs (a TLS transport makes a record of every
        piece it is given); a large put's content comes as read, never copied into a run."""
        out: list[bytes] = []
        run: list[bytes] = []  # small frames, joined into one piece before the next large one
        done: list[Change] = []
        size = 0
        while size < max_bytes:
            if not self._remaining and (hit := self._take_recent()) is not None:
                done.append(hit[0])
                run.append(hit[1])
                size += len(hit[1])
                continue
            if self._remaining:
                head, payload = self._chunk_pieces()
                run.append(head)
                if len(payload) >= RUN_MAX:
                    out += (b"".join(run), payload)
                    run.clear()
                else:
                    run.append(payload)
                size += len(head) + len(payload)
                if not self._remaining:
                    assert self._cur is not None
                    done.append(self._cur)
                continue
            r = self._header_frame()
            if r is None:
                break
            if not self._remaining:
                done.append(r[0])
            run.append(r[1])
            size += len(r[1])
        if run:
            out.append(b"".join(run))
        return out, size, done

    def read_raw(self, max_bytes: int = READ_BYTES) -> tuple[bytes, list[Change]]:
        """:meth:`read_pieces` joined."""
        pieces, _size, done = self.read_pieces(max_bytes)
        return b"".join(pieces), done

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
