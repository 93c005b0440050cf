"""The only writer of a replica: temp file, write, make durable, rename, make the folder durable.

Every relative path is checked again here (:func:`engine.model.check_relpath`) and resolved without ever
passing through a symlink, so nothing a peer sends can write or delete outside the root. Every write goes
through the replica's :class:`~engine.targets.Target` (a local folder or an SMB share); this module holds
the policy: order, grouping, parallelism, verification.

Group commit: a batch of records is applied as one call (in a worker thread) in three phases:
1. the content of every put is written to a temporary file beside its target and made durable, in parallel
   (on a target with group sync, one call makes them all durable);
2. the operations run strictly in record order (rename of temps into place, deletes, folders, renames);
3. every folder touched is made durable.
The caller then persists the position and acknowledges. A crash anywhere leaves only whole files at final
paths (old or new) and temporary files that :meth:`Applier.clean_temps` removes at the next start;
replaying the batch is harmless because every operation is idempotent.

INVARIANT: nothing is renamed into place before its content is durable.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from engine import codec
from engine.digest import Hasher, digest_bytes
from engine.errors import ApplyError, PathRejected
from engine.guard import ContentCheck
from engine.model import (
    MAX_PATH_CHARS,
    MAX_PATH_DEPTH,
    TEMP_MARKER,
    Change,
    Op,
    check_relpath,
    child_of,
    is_under,
    parent_of,
)
from engine.scan import HashCache
from engine.targets import Kind, Put, Target, link_on_way
from engine.targets.local import LocalTarget
from engine.wire import Problem

log = logging.getLogger(__name__)

WINDOWS = sys.platform == "win32"

#: The earliest time Windows can set on a file (1601-01-01, FILETIME 0), in ns since 1970.
WINDOWS_MIN_MTIME_NS = -11_644_473_600 * 1_000_000_000


def settable_mtime_ns(path: str, mtime_ns: int, windows: bool = WINDOWS) -> int:
    """The mtime to set for ``mtime_ns``: itself, except on Windows before 1601, which it cannot hold
    (clamped to 1601-01-01 with a note in the log). SMB carries Windows' times, so a share clamps too."""
    if windows and mtime_ns < WINDOWS_MIN_MTIME_NS:
        log.warning(
            "apply.mtime_clamped path=%r mtime_ns=%d used=%d (Windows holds no time before 1601)",
            path,
            mtime_ns,
            WINDOWS_MIN_MTIME_NS,
        )
        return WINDOWS_MIN_MTIME_NS
    return mtime_ns


@dataclass(slots=True)
class PendingOp:
    """One record of a batch. Puts carry their content in memory or in a finished temporary file (its path
    relative to the replica's root)."""

    change: Change
    data: bytes | None = None
    temp: str | None = None


@dataclass(slots=True)
class BatchResult:
    problems: list[Problem] = field(default_factory=list)
    applied: int = 0


class LargePut:
    """A put streamed chunk by chunk into a temporary file beside its target (bounded memory)."""

    def __init__(self, applier: Applier, change: Change, final: str) -> None:
        self.change = change
        self.final = final
        self.applier = applier
        folder = parent_of(final)
        if folder:
            applier.target.makedirs(folder)
        self._put: Put | None = applier.target.begin_put(child_of(folder, applier._temp_name()))
        self.temp: str = self._put.temp
        self._h = Hasher()
        self._n = 0

    def write(self, data: bytes) -> None:
        assert self._put is not None
        self._put.write(data)
        self._h.update(data)
        self._n += len(data)

    def finish(self) -> str | None:
        """Make the content durable; return None, or why it is refused (and remove the temp)."""
        assert self._put is not None
        put, self._put = self._put, None
        if self._n != self.change.size or self._h.digest() != self.change.digest:
            put.abort()
            return "content does not match its digest"
        try:
            put.seal(self.applier._mtime(self.change), self.applier.fsync)
        except BaseException:
            put.abort()
            raise
        return None

    def discard(self) -> None:
        if self._put is not None:
            self._put.abort()
            self._put = None
        else:
            self.applier.target.unlink_quiet(self.temp)


class Applier:
    def __init__(
        self,
        root: Path | Target,
        *,
        fsync: bool = True,
        threads: int = 16,
        cache: HashCache | None = None,
        check: ContentCheck | None = None,
        sync_mode: str = "auto",
    ) -> None:
        """``root``: a local folder, or any target (then ``sync_mode`` is the target's own business)."""
        if isinstance(root, Target):
            self.target: Target = root
            self.root = root.root if isinstance(root, LocalTarget) else Path()
        else:
            self.target = LocalTarget(root, sync_mode=sync_mode if fsync else "fsync")
            self.root = root
        self.fsync = fsync
        self.cache = cache if cache is not None else HashCache()
        self.check = check
        self.max_path_chars = MAX_PATH_CHARS
        self.max_path_depth = MAX_PATH_DEPTH
        #: One call makes a group's temporary files durable (else each is made durable as it is written).
        self._group_sync = fsync and self.target.caps.group_sync
        #: Where times before 1601 cannot be held (Windows, SMB).
        self._windows_times = WINDOWS or self.target.caps.filetime
        #: Called after a small put is in place (guard history): (change, content).
        self.on_put: Callable[[Change, bytes], None] | None = None
        #: Called after a rename record has run, also when a replay finds it done (guard history): (src, dst).
        self.on_rename: Callable[[str, str], None] | None = None
        self._threads = max(1, threads)
        self._pool = ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix="apply")
        # Temporary names: unique per process run (a crash's leftovers are removed at the next start).
        self._temp_prefix = secrets.token_hex(4)
        self._temp_seq = itertools.count()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.target.close()

    # -- paths --------------------------------------------------------------------------------------------
    def resolve(self, rel: str, checked: dict[str, bool] | None = None) -> str:
        """``rel`` itself, once checked against the path rules and found to pass through no symlink
        (``checked``: one batch's memo, see :func:`engine.targets.link_on_way`)."""
        check_relpath(rel, self.max_path_chars, self.max_path_depth)
        link = link_on_way(self.target, rel, checked)
        if link is not None:
            raise PathRejected(rel, f"passes through a symlink at {link.rpartition('/')[2]!r}")
        return rel

    def clean_temps(self) -> int:
        """Remove temporary files left by a crash (anywhere below the root). Returns how many."""
        n = self.target.clean_temps()
        if n:
            log.info("apply.temps_removed count=%d", n)
        return n

    def begin_large(self, change: Change) -> LargePut:
        return LargePut(self, change, self.resolve(change.path))

    def _mtime(self, c: Change) -> int:
        return settable_mtime_ns(c.path, c.mtime_ns, self._windows_times)

    # -- the batch ----------------------------------------------------------------------------------------
    def apply_batch(self, ops: Sequence[PendingOp]) -> BatchResult:
        try:
            return self._apply_batch(ops)
        except OSError as e:  # reading the replica failed (a lost connection to a share, an I/O error)
            raise ApplyError(f"cannot apply the group: {e.strerror or e}") from e

    def _apply_batch(self, ops: Sequence[PendingOp]) -> BatchResult:
        res = BatchResult()
        t = self.target
        # Phase 1: check every record, then write the content of small puts to durable temporary files
        # in parallel. RACE: checking first and submitting after keeps this thread off the GIL convoy.
        prepared: list[tuple[PendingOp, str | None]] = []
        checked: dict[str, bool] = {}
        for op in ops:
            c = op.change
            try:
                final = self.resolve(c.path, checked)
                if c.op is Op.RENAME:
                    self.resolve(c.dst, checked)
                    if c.dst != c.path and (is_under(c.dst, c.path) or is_under(c.path, c.dst)):
                        raise PathRejected(c.dst, f"a rename into or over its own tree ({c.path!r})")
            except PathRejected as e:
                log.warning("apply.refused seq=%d path=%r reason=%s", c.seq, c.path, e.reason)
                res.problems.append(Problem(c.seq, c.path, "refused", e.reason))
                if op.temp is not None:
                    t.unlink_quiet(op.temp)
                prepared.append((op, None))
                continue
            if c.op is Op.PUT and op.data is not None:
                reason = self._content_problem(c, op.data)
                if reason:
                    log.warning("apply.refused seq=%d path=%r reason=%s", c.seq, c.path, reason)
                    res.problems.append(Problem(c.seq, c.path, "refused", reason))
                    prepared.append((op, None))
                    continue
            prepared.append((op, final))
        # Parent folders once per folder, here; a put whose folder cannot be made yet (a file stands in
        # the way) is written in order below, after the records before it have run.
        parents: dict[str, bool] = {}
        writes: list[tuple[PendingOp, str]] = []
        dirs: set[str] = set()  # folders whose entries changed: made durable at the end
        for op, target in prepared:
            if target is None or op.change.op is not Op.PUT or op.data is None:
                continue
            parent = parent_of(target)
            ok = parents.get(parent)
            if ok is None:
                try:
                    self._make_dirs(parent, dirs)
                    ok = True
                except OSError:  # a file in the way (removed in order below), or an error raised there
                    ok = False
                parents[parent] = ok
            if ok:
                writes.append((op, target))
        # Creating files in parallel helps even without a per-file fsync (the file system overlaps them);
        # a few files per job keeps the executor's own cost per file small.
        step = max(1, min(32, -(-len(writes) // self._threads)))
        jobs = [
            self._pool.submit(self._write_temps, writes[k : k + step]) for k in range(0, len(writes), step)
        ]
        temps: dict[int, str] = {}
        failed: BaseException | None = None
        for fut in jobs:
            try:
                temps.update((id(op), tmp) for op, tmp in fut.result())
            except BaseException as e:  # the job removed its own files; the others' go below
                failed = failed or e
        try:
            if failed is not None:
                raise _apply_error("cannot write the group's temporary files", failed) from failed
            if writes and self._group_sync:
                try:
                    t.sync_group()  # one call makes every temporary file of the group durable
                except OSError as e:
                    raise _apply_error("cannot make the group durable", e) from e
            # Phase 2: in record order.
            moved = False  # only a record that removes or moves something can take a temp's folder away
            for op, target in prepared:
                if target is None:
                    continue
                if op.change.op in (Op.RENAME, Op.DELETE, Op.RMDIR) and temps:
                    # A later put's temporary file inside the tree this record moves or removes would be
                    # carried along (and left behind); remove it now: that put writes its temp again.
                    inside = [k for k, tmp in temps.items() if tmp.startswith(target + "/")]
                    for k in inside:
                        t.unlink_quiet(temps.pop(k))
                try:
                    removed = self._apply_one(op, target, temps.get(id(op)), moved, dirs, res)
                    temps.pop(id(op), None)
                    res.applied += 1
                except OSError as e:
                    c = op.change
                    log.error("apply.failed seq=%d op=%s path=%r error=%s", c.seq, c.op, c.path, e)
                    raise ApplyError(f"cannot apply {c.op} {c.path!r}: {e.strerror or e}") from e
                moved = moved or removed
        finally:
            for tmp in temps.values():  # not renamed into place (an error above)
                t.unlink_quiet(tmp)
        # Phase 3: folder entries durable.
        if self.fsync and dirs:
            try:
                t.sync_folders(dirs)
            except OSError as e:
                raise _apply_error("cannot make the group's folders durable", e) from e
        return res

    def _content_problem(self, c: Change, data: bytes) -> str | None:
        if len(data) != c.size or digest_bytes(data) != c.digest:
            return "content does not match its digest"
        if self.check is not None:
            return self.check(c.path, data)
        return None

    def _write_temps(self, writes: list[tuple[PendingOp, str]]) -> list[tuple[PendingOp, str]]:
        """Worker thread: one job's temporary files. On an error, removes those it made and raises."""
        out: list[tuple[PendingOp, str]] = []
        try:
            for op, final in writes:
                assert op.data is not None
                out.append((op, self._write_temp(final, op.change, op.data)))
        except BaseException:
            for _op, tmp in out:
                self.target.unlink_quiet(tmp)
            raise
        return out

    def _write_temp(self, final: str, c: Change, data: bytes, force_durable: bool = False) -> str:
        """A temporary file beside ``final`` holding ``data`` with the change's mtime (its folder exists)."""
        tmp = child_of(parent_of(final), self._temp_name())
        durable = self.fsync and (not self._group_sync or force_durable)
        self.target.write_temp(tmp, data, self._mtime(c), durable)
        return tmp

    def _temp_name(self) -> str:
        return f".{TEMP_MARKER}{self._temp_prefix}{next(self._temp_seq):x}"

    def _is_dir(self, rel: str) -> bool:
        st = self.target.stat(rel)
        return st is not None and st.kind is Kind.DIR

    def _missing_folders(self, folder: str) -> list[str]:
        """``folder`` and its ancestors below the root that are not folders yet, deepest first."""
        missing: list[str] = []
        p = folder
        while p and not self._is_dir(p):
            missing.append(p)
            p = parent_of(p)
        return missing

    def _make_dirs(self, folder: str, dirs: set[str]) -> None:
        """``makedirs``, noting the folders whose entries it changed (made durable at the end)."""
        missing = self._missing_folders(folder)
        if missing:
            self.target.makedirs(folder)
            dirs.update(parent_of(d) for d in missing)

    def _make_parent(self, final: str, dirs: set[str]) -> None:
        """Create the parent folders of ``final``, removing files that stand where a folder must be."""
        for d in reversed(self._missing_folders(parent_of(final))):
            if self.target.stat(d) is not None:
                self.target.remove(d)
            self.target.mkdir(d)
            dirs.add(parent_of(d))

    def _apply_one(
        self, op: PendingOp, final: str, temp: str | None, moved: bool, dirs: set[str], res: BatchResult
    ) -> bool:
        """Run one record. True if it may have removed or moved something (a temporary file's folder)."""
        c = op.change
        t = self.target
        if c.op is Op.PUT:
            removed = False
            if temp is None and op.temp is not None:  # a large put, written as it arrived
                temp = op.temp
            if temp is not None and moved and t.stat(temp) is None:
                temp = None  # an earlier record of this batch removed its folder: write it again
            if temp is None:  # parent was blocked in phase 1, or removed since
                if op.data is None:
                    raise ApplyError(f"the temporary file of {c.path!r} was removed before its rename")
                self._make_parent(final, dirs)
                temp = self._write_temp(final, c, op.data, force_durable=True)
            try:
                try:
                    st = t.place(temp, final)
                except OSError:
                    if not self._is_dir(final):
                        raise
                    t.remove(final)  # a folder stands where the file goes
                    removed = True
                    st = t.place(temp, final)
            except BaseException:
                t.unlink_quiet(temp)
                raise
            dirs.add(parent_of(final))
            if st is None:
                st = t.stat(final)
            if st is not None:
                # INVARIANT: the key is taken after the rename, which moves the change time (ctime).
                self.cache.put_key(c.path, st.key, c.digest)
            if self.on_put is not None and op.data is not None:
                self.on_put(c, op.data)
            return removed
        if c.op is Op.TOUCH:
            self._touch(c, final, dirs, res)
            return False
        if c.op is Op.DELETE or c.op is Op.RMDIR:
            if t.stat(final) is not None:
                t.remove(final)
                dirs.add(parent_of(final))
            self._forget(c.path)
        elif c.op is Op.MKDIR:
            st = t.stat(final)
            if st is None or st.kind is not Kind.DIR:
                self._make_parent(final, dirs)
                if t.stat(final) is not None:
                    t.remove(final)
                t.mkdir(final)
                dirs.add(parent_of(final))
            return False
        if c.op is Op.RENAME:
            dst = self.resolve(c.dst)
            if t.stat(final) is None:
                if t.stat(dst) is not None:
                    if self.on_rename is not None:
                        self.on_rename(c.path, c.dst)  # idempotent: a crash may have come before it
                    return False  # already renamed (a replayed record)
                res.problems.append(Problem(c.seq, c.path, "missing-source", f"rename to {c.dst!r}"))
                return False
            self._make_parent(dst, dirs)
            st_dst = t.stat(dst)
            if (
                st_dst is not None
                and (st_dst.kind is Kind.DIR or self._is_dir(final))
                and not t.same_file(final, dst)  # a case-only rename on a case-insensitive file system
            ):
                t.remove(dst)
            t.rename(final, dst)
            dirs.add(parent_of(final))
            dirs.add(parent_of(dst))
            self._move_cache(c.path, c.dst)
            st = t.stat(dst)
            if st is not None and st.kind is Kind.FILE:  # a file's change time moved (not a folder's files')
                self.cache.rekey(c.dst, st.key)
            if self.on_rename is not None:
                self.on_rename(c.path, c.dst)
        return True

    def _touch(self, c: Change, final: str, dirs: set[str], res: BatchResult) -> None:
        """Set a file's mtime, if it holds the content the change is about (else: "stale")."""
        t = self.target
        st = t.stat(final)
        ok = st is not None and st.kind is Kind.FILE and st.size == c.size
        if ok:
            assert st is not None
            digest = self.cache.get(c.path, st.key)
            if digest is None:
                h = Hasher()
                for chunk in t.read_chunks(final):
                    h.update(chunk)
                digest = h.digest()
            ok = digest == c.digest
        if not ok or st is None:
            res.problems.append(
                Problem(c.seq, c.path, "stale", "the replica does not hold the content whose time changed")
            )
            return
        t.set_mtime(final, self._mtime(c), self.fsync and not self._group_sync)
        dirs.add(parent_of(final))  # with group sync: one call at the end makes it durable
        st = t.stat(final)
        if st is not None:
            # INVARIANT: the key is taken after the time is set, which moves the change time (ctime).
            self.cache.put_key(c.path, st.key, c.digest)

    def _forget(self, rel: str) -> None:
        self.cache.drop(rel)
        prefix = rel + "/"
        for k in [k for k in list(self.cache._d) if k.startswith(prefix)]:
            self.cache.drop(k)

    def _move_cache(self, src: str, dst: str) -> None:
        self._forget(dst)
        prefix = src + "/"
        for k in [k for k in list(self.cache._d) if k == src or k.startswith(prefix)]:
            v = self.cache._d.pop(k)
            self.cache._d[dst + k[len(src) :]] = v


def _apply_error(what: str, e: BaseException) -> BaseException:
    """An OS error while applying a group, as the ApplyError the receiver reports (others unchanged)."""
    if isinstance(e, OSError):
        return ApplyError(f"{what}: {e.strerror or e}")
    return e


# ---- the replica's durable position ---------------------------------------------------------------------
SLOT = 512


@dataclass(frozen=True, slots=True)
class Position:
    """Where the replica stands: the sender journal it follows, the last applied seq, the highest epoch."""

    journal: str = ""
    seq: int = 0
    epoch: int = 0
    gen: int = 0


class PositionFile:
    """Two checksummed slots written alternately, so a torn write never loses the previous position."""

    def __init__(self, path: Path, fsync: bool = True) -> None:
        self.path = path
        self.fsync = fsync
        self.current = self._load()
        self._f = open(path, "r+b" if path.exists() else "w+b")  # noqa: SIM115

    def _load(self) -> Position:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return Position()
        best = Position()
        for i in range(2):
            r = codec.decode_at(data[i * SLOT : (i + 1) * SLOT], 0)
            if isinstance(r, codec.Torn) or not isinstance(r[0], dict):
                continue
            v = r[0]
            try:
                pos = Position(str(v["journal"]), int(v["seq"]), int(v["epoch"]), int(v["gen"]))
            except (KeyError, ValueError, TypeError):
                continue
            if pos.gen >= best.gen:
                best = pos
        return best

    def save(self, journal: str, seq: int, epoch: int) -> Position:
        pos = Position(journal, seq, epoch, self.current.gen + 1)
        blob = codec.encode({"journal": journal, "seq": seq, "epoch": epoch, "gen": pos.gen})
        if len(blob) > SLOT:
            raise ApplyError("position record too large")
        self._f.seek((pos.gen % 2) * SLOT)
        self._f.write(blob.ljust(SLOT, b"\0"))
        self._f.flush()
        if self.fsync:
            os.fsync(self._f.fileno())
        self.current = pos
        return pos

    def close(self) -> None:
        self._f.close()
