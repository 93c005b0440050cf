"""Checkpoints: the replicated set as it was at a journal position, kept so that the journal before it can
be pruned and every moment after it still rebuilt.

A checkpoint is ``<state_dir>/checkpoints/<seq>/`` holding ``tree/`` (the set after entry ``seq``) and
``meta.json`` (seq, the time entry ``seq`` was journaled, files, bytes, the journal's id). It is built from
the previous checkpoint and the entries since, never from the live tree (which moves meanwhile): the
previous tree is copied as hard links, then the entries are applied by ``engine.apply``, which writes a
changed file as a new file renamed into place. So an unchanged file is one inode shared by every
checkpoint (a checkpoint costs its changed files and one link per file), and a changed one never alters
an older checkpoint; a touch (mtime only) first gives the file a copy of its own. The new checkpoint is
built in ``.building-<seq>`` and renamed into place when whole and durable: a crash leaves either no
checkpoint or a whole one (a half-built folder is removed at the next build).

Owns: building, listing and expiring checkpoints; the floor below which the journal may be pruned.
Must not: write into the replicated set, or delete a journal segment (``Journal.prune`` does, up to
:func:`prune_floor`).

NTFS allows 1023 links to one file: with the default of one checkpoint an hour and a day's retention a
file has at most about 26.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine import journal as jn
from engine.apply import Applier, PendingOp
from engine.errors import JournalError
from engine.journal import Journal
from engine.model import Op

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
#: Puts larger than this are streamed to a temporary file rather than held in memory.
LARGE = 4 << 20
#: Entries applied per batch.
BATCH = 1024


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int  # the set after this entry
    ts_ns: int  # when entry ``seq`` was journaled
    files: int
    bytes: int
    path: Path  # the checkpoint's folder; the set is ``path / "tree"``

    @property
    def tree(self) -> Path:
        return self.path / "tree"


def folder_of(state_dir: Path) -> Path:
    return state_dir / CHECKPOINTS


def list_checkpoints(folder: Path) -> list[Checkpoint]:
    """The whole checkpoints under ``folder``, oldest first (a folder without a readable meta is skipped)."""
    out: list[Checkpoint] = []
    if not folder.is_dir():
        return out
    for d in folder.iterdir():
        if not d.name.isdigit():
            continue
        try:
            meta = json.loads((d / "meta.json").read_text("utf-8"))
            out.append(
                Checkpoint(int(meta["seq"]), int(meta["ts_ns"]), int(meta["files"]), int(meta["bytes"]), d)
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("checkpoint.unreadable folder=%s error=%s", d, e)
    return sorted(out, key=lambda c: c.seq)


def base_for(checkpoints: list[Checkpoint], until_seq: int | None, until_ns: int | None) -> Checkpoint | None:
    """The newest checkpoint at or before the moment (a seq, a time, or neither: the newest of all)."""
    best = None
    for c in checkpoints:
        if until_seq is not None and c.seq > until_seq:
            continue
        if until_ns is not None and c.ts_ns > until_ns:
            continue
        best = c
    return best


def prune_floor(checkpoints: list[Checkpoint], cutoff_ns: int) -> int:
    """The journal may be pruned up to this seq: the newest checkpoint made at or before the retention's
    cut-off covers every moment of the window after it. 0: none yet, prune nothing."""
    older = [c for c in checkpoints if c.ts_ns <= cutoff_ns]
    return older[-1].seq if older else 0


def expire(folder: Path, cutoff_ns: int) -> int:
    """Delete the checkpoints no moment of the window needs: all older than the newest one at or before
    the cut-off. The number deleted."""
    cps = list_checkpoints(folder)
    keep_from = prune_floor(cps, cutoff_ns)
    gone = 0
    for c in cps:
        if c.seq < keep_from:
            shutil.rmtree(c.path, ignore_errors=True)
            gone += 1
    return gone


def build(journal_folder: Path, folder: Path, upto: int | None = None) -> Checkpoint | None:
    """A checkpoint after entry ``upto`` (default: the journal's head), from the newest one before it and
    the entries since; the existing one if it is already there; None if the journal holds no entry.
    JournalError when entries between the previous checkpoint and ``upto`` were pruned."""
    j = Journal.open(journal_folder, fsync=False, readonly=True)
    try:
        head = j.head if upto is None else min(upto, j.head)
        if head < 1 or head < j.first_seq - 1:
            return None
        cps = list_checkpoints(folder)
        base = base_for(cps, head, None)
        if base is not None and base.seq == head:
            return base
        start = base.seq + 1 if base is not None else 1
        if start < j.first_seq:
            raise JournalError(
                f"checkpoint at {head}: entries {start}..{j.first_seq - 1} were pruned and no checkpoint "
                "covers them"
            )
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".building-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = folder / f".building-{head}"
        tree = tmp / "tree"
        tree.mkdir(parents=True)
        try:
            if base is not None:
                _link_tree(base.tree, tree)
            ts = _apply(j, tree, start, head)
            files, size = _count(tree)
            meta = {"seq": head, "ts_ns": ts, "files": files, "bytes": size, "journal": j.id}
            _write_durable(tmp / "meta.json", json.dumps(meta).encode("utf-8"))
            final = folder / f"{head:012d}"
            os.replace(tmp, final)
            jn.fsync_dir(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info(
            "checkpoint.built seq=%d files=%d bytes=%d from=%s", head, files, size, base.seq if base else 0
        )
        return Checkpoint(head, ts, files, size, final)
    finally:
        j.close()


def _apply(j: Journal, tree: Path, start: int, end: int) -> int:
    """Apply entries ``start..end`` to ``tree`` durably; the time of the last one."""
    applier = Applier(tree, fsync=True)
    try:
        return apply_entries(j, applier, tree, start, end)[1]
    finally:
        applier.close()


def apply_entries(
    j: Journal,
    applier: Applier,
    tree: Path,
    start: int,
    end: int,
    until_ns: int | None = None,
    advance: Callable[[], object] | None = None,
) -> tuple[int, int]:
    """Apply entries ``start..end`` (none journaled after ``until_ns``) to ``tree`` through ``applier``, in
    order, in batches; a large put streamed. The last entry applied (``start - 1``: none) and its time."""
    last, ts = start - 1, 0
    cur = j.cursor(start)
    batch: list[PendingOp] = []
    try:
        while (c := cur.next_header()) is not None and c.seq <= end:
            if until_ns is not None and c.ts_ns > until_ns:
                break
            if c.op is Op.TOUCH:  # its time changes in place: never through a link another tree shares
                applier.apply_batch(batch)
                batch = []
                unshare(tree.joinpath(*c.path.split("/")))
            if c.op is Op.PUT and c.size > LARGE:
                applier.apply_batch(batch)
                batch = []
                large = applier.begin_large(c)
                for chunk in cur.chunks():
                    large.write(chunk)
                reason = large.finish()
                if reason:
                    raise JournalError(f"entry {c.seq}: {reason}")
                applier.apply_batch([PendingOp(c, temp=large.temp)])
            else:
                data = b"".join(cur.chunks()) if c.op is Op.PUT else None
                batch.append(PendingOp(c, data=data))
                if len(batch) >= BATCH:
                    applier.apply_batch(batch)
                    batch = []
            last, ts = c.seq, c.ts_ns
            if advance is not None:
                advance()
        res = applier.apply_batch(batch)
        for p in res.problems:
            log.warning("replay.problem seq=%d path=%r code=%s reason=%s", p.seq, p.path, p.code, p.reason)
    finally:
        cur.close()
    return last, ts


def unshare(path: Path) -> None:
    """Give a hard-linked file a copy of its own (same content and times), so that changing its time
    leaves the other checkpoints as they were."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if st.st_nlink <= 1 or not path.is_file():
        return
    tmp = path.with_name(f".{path.name}.unshare")
    shutil.copy2(path, tmp)
    os.replace(tmp, path)


def _link_tree(src: Path, dst: Path) -> None:
    for dirpath, dirs, files in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        for d in dirs:
            (dst / rel / d).mkdir()
        for f in files:
            os.link(Path(dirpath) / f, dst / rel / f)


def _count(tree: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, _dirs, names in os.walk(tree):
        for f in names:
            files += 1
            size += os.lstat(os.path.join(dirpath, f)).st_size
    return files, size


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    jn.fsync_dir(path.parent)
