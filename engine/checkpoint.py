"""Checkpoints: the replicated set as it was at a journal position, kept so that the journal before it can
be pruned and every moment after it still rebuilt.

A checkpoint is ``<state_dir>/checkpoints/<seq>/`` holding ``tree/`` (the set after entry ``seq``),
``manifest.jsonl`` (every file's path, size, mtime and xxh3) and ``meta.json`` (seq, the time entry
``seq`` was journaled, files, bytes, the journal's id). It is built from
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

Damage: a checkpoint's files are checked against its manifest: by size and time before a build links
from it (a damaged one is moved aside as ``.damaged-<seq>-<time>`` and the build starts from an older
one), and by content before a replay starts from it (a damaged one is passed over for an older one).

NTFS allows 1023 links to one file: with the default of one checkpoint an hour and a day's retention a
file has at most about 26.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from engine import journal as jn
from engine.apply import Applier, PendingOp
from engine.errors import JournalError
from engine.journal import Journal
from engine.model import Op
from engine.scan import NoCache, digest_file

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.jsonl"
#: What verify says of a file in a checkpoint's tree that its manifest does not name.
EXTRA = "not in its manifest"
DAMAGED_PREFIX = ".damaged-"
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
    journal: str = ""  # the id of the journal it was built from: only that journal's entries follow it

    @property
    def tree(self) -> Path:
        return self.path / "tree"


class CheckpointDamaged(JournalError):
    """A checkpoint's files differ from its manifest (changed, missing or added behind our back)."""


@dataclass(frozen=True, slots=True)
class FileRecord:
    size: int
    mtime_ns: int
    digest: str  # xxh3_128, hex


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
            seq, ts, files, size = (int(meta[k]) for k in ("seq", "ts_ns", "files", "bytes"))
            out.append(Checkpoint(seq, ts, files, size, d, str(meta.get("journal", ""))))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("checkpoint.unreadable folder=%s error=%s", d, e)
    return sorted(out, key=lambda c: c.seq)


def usable(checkpoints: list[Checkpoint], j: Journal) -> list[Checkpoint]:
    """The checkpoints ``j``'s entries go on from: built from this journal (a retired or rebuilt journal
    starts its seqs again), at a seq it still has the entry after, and not past its committed head (a
    repair may have cut entries a checkpoint was built from)."""
    return [c for c in checkpoints if c.journal == j.id and j.first_seq - 1 <= c.seq <= j.head]


def at_or_before(
    checkpoints: list[Checkpoint], until_seq: int | None, until_ns: int | None
) -> list[Checkpoint]:
    """The checkpoints at or before the moment (a seq, a time, or neither: all), in their order."""
    return [
        c
        for c in checkpoints
        if (until_seq is None or c.seq <= until_seq) and (until_ns is None or c.ts_ns <= until_ns)
    ]


def base_for(checkpoints: list[Checkpoint], until_seq: int | None, until_ns: int | None) -> Checkpoint | None:
    """The newest checkpoint at or before the moment (a seq, a time, or neither: the newest of all)."""
    found = at_or_before(checkpoints, until_seq, until_ns)
    return found[-1] if found else None


def prune_floor(checkpoints: list[Checkpoint], cutoff_ns: int) -> int:
    """The journal may be pruned up to this seq: the newest checkpoint made at or before the retention's
    cut-off covers every moment of the window after it. 0: none yet, prune nothing."""
    older = [c for c in checkpoints if c.ts_ns <= cutoff_ns]
    return older[-1].seq if older else 0


def expire(folder: Path, cutoff_ns: int, journal_id: str, first_seq: int = 1) -> int:
    """Delete the checkpoints no moment of the window needs: all older than the newest one at or before
    the cut-off, any of another journal, and any the journal (its first entry ``first_seq``) no longer goes
    on from. The number deleted. Each is first renamed out of the list (``.expiring-*``), so that a crash
    half way never leaves a partial checkpoint that counts as whole."""
    cps = list_checkpoints(folder)
    mine = [c for c in cps if c.journal == journal_id and c.seq >= first_seq - 1]
    keep_from = prune_floor(mine, cutoff_ns)
    gone = 0
    for c in cps:
        if c.journal != journal_id or c.seq < keep_from or c.seq < first_seq - 1:
            _remove(c.path)
            gone += 1
    return gone


def _remove(path: Path) -> None:
    doomed = path.with_name(f".expiring-{path.name}")
    os.replace(path, doomed)
    jn.fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def cap_cutoff(segments: list[tuple[int, int]], checkpoints: list[Checkpoint], cap_bytes: int) -> int:
    """The retention cut-off (ns) a size cap asks for: the time of the oldest checkpoint after which the
    journal's segments (``(first seq, bytes)``, in order) fit in ``cap_bytes``; the newest checkpoint when
    none does (entries after it are never pruned for the cap); 0 (no cut-off) without a checkpoint. Pure."""
    best = 0
    for c in reversed(checkpoints):
        # A segment is kept when it holds an entry after the checkpoint (its next one starts past c + 1).
        firsts = [f for f, _ in segments]
        kept = sum(
            size for i, (_f, size) in enumerate(segments) if i + 1 >= len(firsts) or firsts[i + 1] > c.seq + 1
        )
        if best and kept > cap_bytes:
            break
        best = c.ts_ns
    return best


def retention_cutoff(j: Journal, state_dir: Path, hours: float, cap_gb: float, now: float) -> float:
    """The retention cut-off (seconds since 1970) of a side's journal: ``hours`` back, or later when the
    journal is over its size cap (``cap_gb`` GiB, 0: none). Reads the journal's segment sizes."""
    cutoff = now - hours * 3600
    if not cap_gb:
        return cutoff
    sizes: list[tuple[int, int]] = []
    for path, first in j.segments():
        try:
            sizes.append((first, path.stat().st_size))
        except FileNotFoundError:
            continue
    if sum(size for _f, size in sizes) <= cap_gb * (1 << 30):
        return cutoff
    cps = [c for c in list_checkpoints(folder_of(state_dir)) if c.journal == j.id]
    capped = cap_cutoff(sizes, cps, int(cap_gb * (1 << 30)))
    return max(cutoff, capped / 1e9 + 1.0) if capped else cutoff


class Cadence:
    """When this process last built a checkpoint (its own monotonic clock: a checkpoint's entry time may
    be far off when the wall clock jumped)."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.unavailable_said = False

    def due(self, every_s: float) -> bool:
        return self.last is None or time.monotonic() - self.last >= every_s


#: No floor: the journal is pruned as its retention says (checkpoints cannot be built).
NO_FLOOR = 1 << 62


def chores(
    state_dir: Path,
    journal_id: str,
    first_seq: int,
    head: int,
    cutoff: float,
    minutes: float,
    cadence: Cadence,
) -> tuple[int, int]:
    """A side's housekeeping (the sender's, or a passive's kept journal): a checkpoint up to ``head`` when
    one is due, expiry, and (the floor the journal may be pruned to, the newest checkpoint's seq). When no
    checkpoint can be built from the journal (entries pruned before checkpoints existed, or the chain
    broken under disk pressure), the floor is lifted: the journal is pruned as its retention says, and
    whole-set replays are refused before the window the checkpoints can answer."""
    folder = folder_of(state_dir)
    cutoff_ns = int(cutoff * 1e9)
    try:
        if cadence.due(minutes * 60):
            build(state_dir / "journal", folder, upto=head)
            cadence.last = time.monotonic()
        expire(folder, cutoff_ns, journal_id, first_seq)
        cps = _going_on(folder, journal_id, first_seq)
        return prune_floor(cps, cutoff_ns), (cps[-1].seq if cps else 0)
    except CheckpointDamaged as e:
        log.error("checkpoint.damaged %s", e)
        cadence.last = time.monotonic()
        cps = _going_on(folder, journal_id, first_seq)
        return prune_floor(cps, cutoff_ns), (cps[-1].seq if cps else 0)
    except JournalError as e:
        if not cadence.unavailable_said:
            cadence.unavailable_said = True
            log.error("checkpoint.unavailable error=%s (the journal is pruned as its retention says)", e)
        cadence.last = time.monotonic()
        return NO_FLOOR, 0
    except OSError as e:
        log.warning("checkpoint.failed error=%s (the journal is not pruned past the last checkpoint)", e)
        cps = _going_on(folder, journal_id, first_seq)
        return prune_floor(cps, cutoff_ns), (cps[-1].seq if cps else 0)


def _going_on(folder: Path, journal_id: str, first_seq: int) -> list[Checkpoint]:
    """The checkpoints the journal (``journal_id``, its first entry ``first_seq``) still goes on from."""
    return [c for c in list_checkpoints(folder) if c.journal == journal_id and c.seq >= first_seq - 1]


def build(journal_folder: Path, folder: Path, upto: int | None = None) -> Checkpoint | None:
    """A checkpoint after entry ``upto`` (default: the journal's head), from the newest one before it and
    the entries since; the existing one if it is already there; None if the journal holds no entry.
    JournalError when entries between the previous checkpoint and ``upto`` were pruned."""
    j = Journal.open(journal_folder, fsync=False, readonly=True)
    try:
        head = j.head if upto is None else min(upto, j.head)
        if head < 1 or head < j.first_seq - 1:
            return None
        cps = [c for c in list_checkpoints(folder) if c.journal == j.id and c.seq <= head]
        base = base_for(cps, head, None)
        if base is not None and base.seq == head:
            return base
        while base is not None and (damage := [d for d in verify(base, content=False) if d[1] != EXTRA]):
            older = base_for([c for c in cps if c.seq < base.seq], head, None)
            if (older.seq + 1 if older is not None else 1) < j.first_seq:
                raise CheckpointDamaged(
                    f"{describe_damage(base, damage)}; it is kept, being the only checkpoint the journal "
                    "goes on from: no checkpoint is built and the journal is not pruned past it until the "
                    "file is put back or the checkpoint removed (replay --skip-corrupt rebuilds from it)"
                )
            _set_aside(base, damage)
            cps.remove(base)
            base = older
        start = base.seq + 1 if base is not None else 1
        if start < j.first_seq:
            raise JournalError(
                f"checkpoint at {head}: entries {start}..{j.first_seq - 1} were pruned and no checkpoint "
                "covers them"
            )
        folder.mkdir(parents=True, exist_ok=True)
        for stale in [*folder.glob(".building-*"), *folder.glob(".expiring-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp = folder / f".building-{head}"
        tree = tmp / "tree"
        tree.mkdir(parents=True)
        try:
            base_manifest = read_manifest(base) if base is not None else None
            if base is not None:  # a file added behind our back (not in its manifest) is left out
                _link_tree(base.tree, tree, base_manifest)
            ts = _apply(j, tree, start, head)
            files, size = _write_manifest(tree, tmp / MANIFEST, base, base_manifest)
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
        return Checkpoint(head, ts, files, size, final, j.id)
    finally:
        j.close()


def _apply(j: Journal, tree: Path, start: int, end: int) -> int:
    """Apply entries ``start..end`` to ``tree`` durably; the time of the last one. Any problem the applier
    reports (an entry refused, stale, a missing source) fails the build: a checkpoint must be exact."""
    applier = Applier(tree, fsync=True, cache=NoCache())
    problems: list[str] = []
    try:
        ts = apply_entries(j, applier, tree, start, end, problems=problems)[1]
    finally:
        applier.close()
    if problems:
        raise JournalError(f"checkpoint at {end}: {len(problems)} entries not applied, e.g. {problems[0]}")
    return ts


def apply_entries(
    j: Journal,
    applier: Applier,
    tree: Path,
    start: int,
    end: int,
    until_ns: int | None = None,
    advance: Callable[[], object] | None = None,
    problems: list[str] | None = None,
) -> tuple[int, int]:
    """Apply entries ``start..end`` (none journaled after ``until_ns``) to ``tree`` through ``applier``, in
    order, in batches; a large put streamed. The last entry applied (``start - 1``: none) and its time."""
    last, ts = start - 1, 0
    cur = j.cursor(start)
    batch: list[PendingOp] = []

    def run(ops: list[PendingOp]) -> None:
        res = applier.apply_batch(ops)
        for p in res.problems:
            log.warning("replay.problem seq=%d path=%r code=%s reason=%s", p.seq, p.path, p.code, p.reason)
            if problems is not None:
                problems.append(f"entry {p.seq} {p.path!r}: {p.code} ({p.reason})")

    try:
        while (c := cur.next_header()) is not None and c.seq <= end:
            if until_ns is not None and c.ts_ns > until_ns:
                break
            if c.op is Op.TOUCH:  # its time changes in place: never through a link another tree shares
                run(batch)
                batch = []
                unshare(tree.joinpath(*c.path.split("/")))
            if c.op is Op.PUT and c.size > LARGE:
                run(batch)
                batch = []
                large = applier.begin_large(c)
                for chunk in cur.chunks():
                    large.write(chunk)
                reason = large.finish()
                if reason:
                    raise JournalError(f"entry {c.seq}: {reason}")
                run([PendingOp(c, temp=large.temp)])
            else:
                data = b"".join(cur.chunks()) if c.op is Op.PUT else None
                batch.append(PendingOp(c, data=data))
                if len(batch) >= BATCH:
                    run(batch)
                    batch = []
            last, ts = c.seq, c.ts_ns
            if advance is not None:
                advance()
        run(batch)
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


def _link_tree(src: Path, dst: Path, only: Container[str] | None = None) -> None:
    """Link every file of ``src`` (only those named in ``only``, if given) into ``dst``."""
    for dirpath, dirs, files in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        for d in dirs:
            (dst / rel / d).mkdir()
        for f in files:
            if only is not None and (rel / f).as_posix() not in only:
                continue
            try:
                os.link(Path(dirpath) / f, dst / rel / f)
            except OSError:  # NTFS's limit of 1023 links to a file, a file system without links: a copy
                shutil.copy2(Path(dirpath) / f, dst / rel / f)


def tree_files(tree: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every file below ``tree``: its path relative to it (with ``/``) and its lstat."""
    for dirpath, _dirs, names in os.walk(tree):
        rel = Path(dirpath).relative_to(tree).as_posix()
        for f in names:
            yield (f if rel == "." else f"{rel}/{f}"), os.lstat(os.path.join(dirpath, f))


def _write_manifest(
    tree: Path, out: Path, base: Checkpoint | None, base_manifest: dict[str, FileRecord] | None
) -> tuple[int, int]:
    """Write ``tree``'s manifest durably; (files, bytes). A file that is, right now, the very file (same
    inode, same device) at the same path in the previous checkpoint, unchanged since that checkpoint's
    manifest, takes its digest from it; every other file is read. Inode numbers recorded in a manifest
    are never trusted: a state folder copied or restored from a backup gives its files new ones."""
    files = size = 0
    # Written as walked, a line at a time: the whole manifest of a large set as one list of strings
    # would be a peak of small objects that the allocator keeps after (the process's RSS never comes down).
    with _durable_file(out) as fh:
        for rel, st in tree_files(tree):
            digest = ""
            old = base_manifest.get(rel) if base_manifest is not None else None
            if base is not None and old is not None and st.st_ino:
                try:
                    was = os.lstat(os.path.join(base.tree, rel))
                except OSError:
                    was = None
                same = was is not None and (was.st_ino, was.st_dev) == (st.st_ino, st.st_dev)
                if same and (old.size, old.mtime_ns) == (st.st_size, st.st_mtime_ns):
                    digest = old.digest
            if not digest:
                digest = digest_file(os.path.join(tree, rel))[1].hex()
            rec = {"p": rel, "s": st.st_size, "m": st.st_mtime_ns, "h": digest}
            # ASCII: a name holding U+2028 and the like stays on one line
            fh.write(json.dumps(rec).encode("ascii") + b"\n")
            files += 1
            size += st.st_size
    return files, size


def read_manifest(c: Checkpoint) -> dict[str, FileRecord] | None:
    """The checkpoint's manifest by path; None when it has none (built before manifests existed)."""
    try:
        fh = open(c.path / MANIFEST, "rb")  # noqa: SIM115 (closed below; FileNotFoundError first)
    except FileNotFoundError:
        return None
    out: dict[str, FileRecord] = {}
    n = 0
    # A line at a time, ended by \n, \r\n or \r as a text read would (never str.splitlines: it also
    # splits at U+2028 and the like, which a name may hold; the writer escapes them anyway).
    with fh:
        for raw in fh:
            body = raw[:-1] if raw.endswith(b"\n") else raw
            if body.endswith(b"\r"):
                body = body[:-1]
            for line in body.split(b"\r"):
                n += 1
                if not line:
                    continue
                try:
                    v = json.loads(line)
                    out[str(v["p"])] = FileRecord(int(v["s"]), int(v["m"]), str(v["h"]))
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    raise CheckpointDamaged(
                        f"checkpoint at seq {c.seq}: {MANIFEST} line {n} is damaged ({e})"
                    ) from None
    return out


def verify(c: Checkpoint, content: bool = True) -> list[tuple[str, str]]:
    """What differs between the checkpoint's tree and its manifest, as (path, what) ("" for the whole
    checkpoint); empty when whole, or when it has no manifest to check against. Files changed (size or
    time; with ``content``, their bytes too), missing or added."""
    try:
        manifest = read_manifest(c)
    except CheckpointDamaged as e:
        return [("", str(e))]
    if manifest is None:
        return []
    problems: list[tuple[str, str]] = []
    try:  # walked, not listed: a large tree's stat results are never all held at once
        for rel, st in tree_files(c.tree):
            want = manifest.pop(rel, None)  # what is left at the end is missing
            if want is None:
                problems.append((rel, EXTRA))
            elif (st.st_size, st.st_mtime_ns) != (want.size, want.mtime_ns):
                problems.append(
                    (rel, f"size or time changed ({st.st_size} bytes, the manifest says {want.size})")
                )
            elif content:
                try:
                    got = digest_file(os.path.join(c.tree, rel))[1].hex()
                except OSError as e:
                    problems.append((rel, f"unreadable ({e})"))
                    continue
                if got != want.digest:
                    problems.append(
                        (rel, f"content differs from its manifest (xxh3 {got}, not {want.digest})")
                    )
    except OSError as e:
        return [("", f"its tree cannot be read: {e}")]
    problems += [(rel, "missing") for rel in manifest]
    return problems


def describe_damage(c: Checkpoint, problems: list[tuple[str, str]]) -> str:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    path, what = problems[0]
    return f"checkpoint at seq {c.seq} ({c.path}) is damaged: {f'{path}: ' if path else ''}{what}{more}"


def _set_aside(c: Checkpoint, problems: list[tuple[str, str]]) -> None:
    """Move a damaged checkpoint out of the list (kept for inspection, never used again)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    os.replace(c.path, c.path.with_name(f"{DAMAGED_PREFIX}{c.path.name}-{stamp}"))
    jn.fsync_dir(c.path.parent)
    log.error(
        "checkpoint.damaged %s; set aside, the next checkpoint is built from an older one",
        describe_damage(c, problems),
    )


@contextlib.contextmanager
def _durable_file(path: Path) -> Iterator[BinaryIO]:
    """``path`` opened for writing; when the block ends without an error, the file and its folder are
    made durable."""
    with open(path, "wb") as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())
    jn.fsync_dir(path.parent)


def _write_durable(path: Path, data: bytes) -> None:
    with _durable_file(path) as fh:
        fh.write(data)
