"""The only writer of a replica tree: temp file, write, fsync, rename, fsync folder.

Every relative path is checked again here (:func:`engine.model.check_relpath`) and resolved without ever
passing through a symlink, so nothing a peer sends can write or delete outside the root.

Group commit: a batch of records is applied as one call (in a worker thread) in three phases:
1. the content of every put is written to a temporary file beside its target and fsynced, in parallel;
2. the operations run strictly in record order (rename of temps into place, deletes, folders, renames);
3. every folder touched is fsynced, in parallel.
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
import shutil
import stat as statmod
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from engine import codec
from engine.digest import Hasher, digest_bytes
from engine.errors import ApplyError, PathRejected
from engine.guard import ContentCheck
from engine.journal import fsync_dir
from engine.model import (
    MAX_PATH_CHARS,
    MAX_PATH_DEPTH,
    TEMP_MARKER,
    Change,
    Op,
    check_relpath,
    is_temp_name,
    is_under,
)
from engine.scan import HashCache, iter_file_chunks, stat_key
from engine.wire import Problem

log = logging.getLogger(__name__)

WINDOWS = sys.platform == "win32"

#: The earliest time Windows can set on a file (1601-01-01, FILETIME 0), in ns since 1970.
WINDOWS_MIN_MTIME_NS = -11_644_473_600 * 1_000_000_000


def settable_mtime_ns(path: str, mtime_ns: int, windows: bool = WINDOWS) -> int:
    """The mtime to set for ``mtime_ns``: itself, except on Windows before 1601, which it cannot hold
    (clamped to 1601-01-01 with a note in the log)."""
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
    """One record of a batch. Puts carry their content in memory or in a finished temporary file."""

    change: Change
    data: bytes | None = None
    temp: Path | None = None


@dataclass(frozen=True, slots=True)
class _Temp:
    """A finished temporary file. (Its stat is taken only once it is in place: the rename moves the
    change time the hash cache keys on.)"""

    path: str


#: A new temporary file: never an existing one; binary on Windows.
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)


@dataclass(slots=True)
class BatchResult:
    problems: list[Problem] = field(default_factory=list)
    applied: int = 0


class LargePut:
    """A put streamed chunk by chunk into a temporary file beside its target (bounded memory)."""

    def __init__(self, applier: Applier, change: Change, final: Path) -> None:
        self.change = change
        self.final = final
        self.applier = applier
        final.parent.mkdir(parents=True, exist_ok=True)
        self.temp = final.parent / applier._temp_name()
        self._f: IO[bytes] | None = open(self.temp, "xb")  # noqa: SIM115
        self._h = Hasher()
        self._n = 0

    def write(self, data: bytes) -> None:
        assert self._f is not None
        self._f.write(data)
        self._h.update(data)
        self._n += len(data)

    def finish(self) -> str | None:
        """Make the content durable; return None, or why it is refused (and remove the temp)."""
        assert self._f is not None
        f, self._f = self._f, None
        try:
            if self._n != self.change.size or self._h.digest() != self.change.digest:
                f.close()
                self.discard()
                return "content does not match its digest"
            f.flush()
            if self.applier.fsync:
                os.fsync(f.fileno())
        finally:
            f.close()
        mtime = settable_mtime_ns(self.change.path, self.change.mtime_ns)
        os.utime(self.temp, ns=(mtime, mtime))
        return None

    def discard(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        try:
            self.temp.unlink()
        except FileNotFoundError:
            pass


class Applier:
    def __init__(
        self,
        root: Path,
        *,
        fsync: bool = True,
        threads: int = 16,
        cache: HashCache | None = None,
        check: ContentCheck | None = None,
        sync_mode: str = "auto",
    ) -> None:
        self.root = root
        self.fsync = fsync
        self.cache = cache if cache is not None else HashCache()
        self.check = check
        self.max_path_chars = MAX_PATH_CHARS
        self.max_path_depth = MAX_PATH_DEPTH
        self._syncfs = _syncfs_for(root, sync_mode) if fsync else None
        #: Called after a small put is in place (guard history): (change, content).
        self.on_put: Callable[[Change, bytes], None] | None = None
        #: Called after a rename record has run, also when a replay finds it done (guard history): (src, dst).
        self.on_rename: Callable[[str, str], None] | None = None
        self._threads = max(1, threads)
        self._pool = ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix="apply")
        self._root = os.fspath(root)
        # Temporary names: unique per process run (a crash's leftovers are removed at the next start).
        self._temp_prefix = secrets.token_hex(4)
        self._temp_seq = itertools.count()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # -- paths --------------------------------------------------------------------------------------------
    def resolve(self, rel: str, checked: set[str] | None = None) -> Path:
        """The OS path of a relative path, refusing one that breaks the rules or passes a symlink.

        ``checked`` (one batch's memo) holds folder prefixes already found to be real folders.
        """
        return Path(self._resolve(rel, checked))

    def _resolve(self, rel: str, checked: set[str] | None = None) -> str:
        check_relpath(rel, self.max_path_chars, self.max_path_depth)
        parts = rel.split("/")
        folder = self._root  # OS form, joined with the OS's separator (a \\?\ root takes no "/")
        prefix = ""
        for name in parts[:-1]:
            folder = os.path.join(folder, name)
            prefix = f"{prefix}/{name}" if prefix else name
            if checked is not None and prefix in checked:
                continue
            try:
                st = os.lstat(folder)
            except (FileNotFoundError, NotADirectoryError):
                break  # the rest does not exist yet: it will be created as real folders
            if statmod.S_ISLNK(st.st_mode) or _is_reparse(st):
                raise PathRejected(rel, f"passes through a symlink at {name!r}")
            if checked is not None and statmod.S_ISDIR(st.st_mode):
                checked.add(prefix)
        return os.path.join(self._root, *parts)

    def clean_temps(self) -> int:
        """Remove temporary files left by a crash (anywhere below the root). Returns how many."""
        n = 0
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in filenames:
                if is_temp_name(name):
                    try:
                        os.unlink(os.path.join(dirpath, name))
                        n += 1
                    except FileNotFoundError:
                        pass
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
        if n:
            log.info("apply.temps_removed count=%d", n)
        return n

    def begin_large(self, change: Change) -> LargePut:
        return LargePut(self, change, self.resolve(change.path))

    # -- the batch ----------------------------------------------------------------------------------------
    def apply_batch(self, ops: Sequence[PendingOp]) -> BatchResult:
        res = BatchResult()
        # Phase 1: check every record, then write the content of small puts to durable temporary files
        # in parallel. RACE: checking first and submitting after keeps this thread off the GIL convoy.
        prepared: list[tuple[PendingOp, str | None]] = []
        checked: set[str] = set()
        for op in ops:
            c = op.change
            try:
                final = self._resolve(c.path, checked)
                if c.op is Op.RENAME:
                    self._resolve(c.dst, checked)
                    if c.dst != c.path and (is_under(c.dst, c.path) or is_under(c.path, c.dst)):
                        raise PathRejected(c.dst, f"a rename into or over its own tree ({c.path!r})")
            except PathRejected as e:
                log.warning("apply.refused seq=%d path=%r reason=%s", c.seq, c.path, e.reason)
                res.problems.append(Problem(c.seq, c.path, "refused", e.reason))
                if op.temp is not None:
                    _unlink(op.temp)
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
            parent = os.path.dirname(target)
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
        temps: dict[int, _Temp] = {}
        failed: BaseException | None = None
        for fut in jobs:
            try:
                temps.update((id(op), t) for op, t in fut.result())
            except BaseException as e:  # the job removed its own files; the others' go below
                failed = failed or e
        try:
            if failed is not None:
                raise _apply_error("cannot write the group's temporary files", failed) from failed
            if writes and self.fsync and self._syncfs is not None:
                try:
                    self._syncfs()  # one call makes every temporary file of the group durable
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
                    inside = [k for k, t in temps.items() if t.path.startswith(target + os.sep)]
                    for k in inside:
                        _unlink(temps.pop(k).path)
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
            for t in temps.values():  # not renamed into place (an error above)
                _unlink(t.path)
        # Phase 3: folder entries durable.
        if self.fsync and dirs:
            try:
                if self._syncfs is not None:
                    self._syncfs()
                else:
                    list(self._pool.map(_fsync_dir_quiet, dirs))
            except OSError as e:
                raise _apply_error("cannot make the group's folders durable", e) from e
        return res

    def _content_problem(self, c: Change, data: bytes) -> str | None:
        if len(data) != c.size or digest_bytes(data) != c.digest:
            return "content does not match its digest"
        if self.check is not None:
            return self.check(c.path, data)
        return None

    def _write_temps(self, writes: list[tuple[PendingOp, str]]) -> list[tuple[PendingOp, _Temp]]:
        """Worker thread: one job's temporary files. On an error, removes those it made and raises."""
        out: list[tuple[PendingOp, _Temp]] = []
        try:
            for op, final in writes:
                assert op.data is not None
                out.append((op, self._write_temp(final, op.change, op.data)))
        except BaseException:
            for _op, t in out:
                _unlink(t.path)
            raise
        return out

    def _write_temp(self, final: str, c: Change, data: bytes, force_fsync: bool = False) -> _Temp:
        """A temporary file beside ``final`` holding ``data`` with the change's mtime (its folder exists)."""
        tmp = os.path.join(os.path.dirname(final), self._temp_name())
        mtime = settable_mtime_ns(c.path, c.mtime_ns)
        fd = os.open(tmp, _CREATE_FLAGS, 0o666)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if not WINDOWS:  # in the same fsync as the content
                    os.utime(fd, ns=(mtime, mtime))
                if self.fsync and (self._syncfs is None or force_fsync):
                    os.fsync(fd)
            finally:
                os.close(fd)
            if WINDOWS:
                # Windows sets the last write time when the last writing handle closes: set it after.
                os.utime(tmp, ns=(mtime, mtime))
        except BaseException:
            _unlink(tmp)
            raise
        return _Temp(tmp)

    def _temp_name(self) -> str:
        return f".{TEMP_MARKER}{self._temp_prefix}{next(self._temp_seq):x}"

    def _missing_folders(self, folder: str) -> list[str]:
        """``folder`` and its ancestors below the root that are not folders yet, deepest first."""
        missing: list[str] = []
        p = folder
        while p != self._root and not os.path.isdir(p):
            missing.append(p)
            p = os.path.dirname(p)
        return missing

    def _make_dirs(self, folder: str, dirs: set[str]) -> None:
        """``os.makedirs``, noting the folders whose entries it changed (for fsync where no syncfs)."""
        missing = self._missing_folders(folder)
        if missing:
            os.makedirs(folder, exist_ok=True)
            dirs.update(os.path.dirname(d) for d in missing)

    def _make_parent(self, final: str, dirs: set[str]) -> None:
        """Create the parent folders of ``final``, removing files that stand where a folder must be."""
        for d in reversed(self._missing_folders(os.path.dirname(final))):
            if os.path.lexists(d):
                _remove(d)
            os.mkdir(d)
            dirs.add(os.path.dirname(d))

    def _apply_one(
        self, op: PendingOp, final: str, temp: _Temp | None, moved: bool, dirs: set[str], res: BatchResult
    ) -> bool:
        """Run one record. True if it may have removed or moved something (a temporary file's folder)."""
        c = op.change
        if c.op is Op.PUT:
            removed = False
            if temp is None and op.temp is not None:  # a large put, written as it arrived
                temp = _Temp(os.fspath(op.temp))
            if temp is not None and moved and not os.path.exists(temp.path):
                temp = None  # an earlier record of this batch removed its folder: write it again
            if temp is None:  # parent was blocked in phase 1, or removed since
                if op.data is None:
                    raise ApplyError(f"the temporary file of {c.path!r} was removed before its rename")
                self._make_parent(final, dirs)
                temp = self._write_temp(final, c, op.data, force_fsync=True)
            try:
                try:
                    os.replace(temp.path, final)
                except OSError:
                    if not (os.path.isdir(final) and not os.path.islink(final)):
                        raise
                    shutil.rmtree(final)  # a folder stands where the file goes
                    removed = True
                    os.replace(temp.path, final)
            except BaseException:
                _unlink(temp.path)
                raise
            dirs.add(os.path.dirname(final))
            try:
                # INVARIANT: the key is taken after the rename, which moves the change time (ctime).
                self.cache.put_key(c.path, stat_key(final, os.stat(final)), c.digest)
            except FileNotFoundError:
                pass
            if self.on_put is not None and op.data is not None:
                self.on_put(c, op.data)
            return removed
        if c.op is Op.TOUCH:
            self._touch(c, final, dirs, res)
            return False
        if c.op is Op.DELETE or c.op is Op.RMDIR:
            if os.path.lexists(final):
                _remove(final)
                dirs.add(os.path.dirname(final))
            self._forget(c.path)
        elif c.op is Op.MKDIR:
            if not os.path.isdir(final) or os.path.islink(final):
                self._make_parent(final, dirs)
                if os.path.lexists(final):
                    _remove(final)
                os.mkdir(final)
                dirs.add(os.path.dirname(final))
            return False
        if c.op is Op.RENAME:
            dst = self._resolve(c.dst)
            if not os.path.lexists(final):
                if os.path.lexists(dst):
                    if self.on_rename is not None:
                        self.on_rename(c.path, c.dst)  # idempotent: a crash may have come before it
                    return False  # already renamed (a replayed record)
                res.problems.append(Problem(c.seq, c.path, "missing-source", f"rename to {c.dst!r}"))
                return False
            self._make_parent(dst, dirs)
            if (
                os.path.lexists(dst)
                and (os.path.isdir(dst) or os.path.isdir(final))
                and not _same_file(final, dst)  # a case-only rename on a case-insensitive file system
            ):
                _remove(dst)
            os.replace(final, dst)
            dirs.add(os.path.dirname(final))
            dirs.add(os.path.dirname(dst))
            self._move_cache(c.path, c.dst)
            try:
                st = os.stat(dst, follow_symlinks=False)
                if statmod.S_ISREG(st.st_mode):  # a renamed file's change time moved (a folder's files' not)
                    self.cache.rekey(c.dst, stat_key(dst, st))
            except FileNotFoundError:
                pass
            if self.on_rename is not None:
                self.on_rename(c.path, c.dst)
        return True

    def _touch(self, c: Change, final: str, dirs: set[str], res: BatchResult) -> None:
        """Set a file's mtime, if it holds the content the change is about (else: "stale")."""
        try:
            st = os.stat(final, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        ok = st is not None and statmod.S_ISREG(st.st_mode) and st.st_size == c.size
        if ok:
            assert st is not None
            digest = self.cache.get(c.path, stat_key(final, st))
            if digest is None:
                h = Hasher()
                for chunk in iter_file_chunks(Path(final)):
                    h.update(chunk)
                digest = h.digest()
            ok = digest == c.digest
        if not ok or st is None:
            res.problems.append(
                Problem(c.seq, c.path, "stale", "the replica does not hold the content whose time changed")
            )
            return
        os.utime(final, ns=(st.st_atime_ns, settable_mtime_ns(c.path, c.mtime_ns)))
        if self.fsync and self._syncfs is None:
            with open(final, "rb+") as f:  # the inode's new time durable (Windows needs write access)
                os.fsync(f.fileno())
        dirs.add(os.path.dirname(final))  # with syncfs: one call at the end makes it durable
        # INVARIANT: the key is taken after the time is set, which moves the change time (ctime).
        self.cache.put_key(c.path, stat_key(final, os.stat(final)), c.digest)

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


def _syncfs_for(root: Path, mode: str) -> Callable[[], None] | None:
    """A function that makes every write to ``root``'s file system durable in one call (Linux syncfs),
    or None where per-file fsync is to be used (``mode`` "fsync", or no syncfs: Windows, macOS)."""
    if mode == "fsync":
        return None
    fn = None
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.syncfs
        except (OSError, AttributeError):
            fn = None
    if fn is None:
        if mode == "syncfs":
            raise ApplyError("sync_mode = 'syncfs' needs Linux syncfs(2)")
        return None

    def syncfs() -> None:
        fd = os.open(root, os.O_RDONLY)
        try:
            if fn(fd) != 0:
                import ctypes

                err = ctypes.get_errno()
                raise OSError(err, f"syncfs: {os.strerror(err)}", str(root))
        finally:
            os.close(fd)

    return syncfs


def _apply_error(what: str, e: BaseException) -> BaseException:
    """An OS error while applying a group, as the ApplyError the receiver reports (others unchanged)."""
    if isinstance(e, OSError):
        return ApplyError(f"{what}: {e.strerror or e}")
    return e


def _same_file(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _is_reparse(st: os.stat_result) -> bool:
    """A Windows junction or other reparse point (treated like a symlink)."""
    attrs = getattr(st, "st_file_attributes", 0)
    return bool(attrs & 0x400)


def _remove(p: str | Path) -> None:
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p)
    else:
        os.unlink(p)


def _unlink(p: str | Path) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


def _fsync_dir_quiet(d: str | Path) -> None:
    try:
        fsync_dir(Path(d))
    except FileNotFoundError:
        pass


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
