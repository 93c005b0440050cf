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
from engine.scan import HashCache
from engine.wire import Problem

log = logging.getLogger(__name__)

WINDOWS = sys.platform == "win32"


def temp_name() -> str:
    return f".{TEMP_MARKER}{secrets.token_hex(8)}"


@dataclass(slots=True)
class PendingOp:
    """One record of a batch. Puts carry their content in memory or in a finished temporary file."""

    change: Change
    data: bytes | None = None
    temp: Path | None = None


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
        self.temp = final.parent / temp_name()
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
        os.utime(self.temp, ns=(self.change.mtime_ns, self.change.mtime_ns))
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
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="apply")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # -- paths --------------------------------------------------------------------------------------------
    def resolve(self, rel: str, checked: set[str] | None = None) -> Path:
        """The OS path of a relative path, refusing one that breaks the rules or passes a symlink.

        ``checked`` (one batch's memo) holds folder prefixes already found to be real folders.
        """
        check_relpath(rel, self.max_path_chars, self.max_path_depth)
        parts = rel.split("/")
        p = self.root
        prefix = ""
        for name in parts[:-1]:
            p = p / name
            prefix = f"{prefix}/{name}" if prefix else name
            if checked is not None and prefix in checked:
                continue
            try:
                st = os.lstat(p)
            except (FileNotFoundError, NotADirectoryError):
                break  # the rest does not exist yet: it will be created as real folders
            if statmod.S_ISLNK(st.st_mode) or _is_reparse(st):
                raise PathRejected(rel, f"passes through a symlink at {name!r}")
            if checked is not None and statmod.S_ISDIR(st.st_mode):
                checked.add(prefix)
        return self.root.joinpath(*parts)

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
        prepared: list[tuple[PendingOp, Path | None]] = []
        checked: set[str] = set()
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
        writes = [
            (op, final, op.data)
            for op, final in prepared
            if final is not None and op.change.op is Op.PUT and op.data is not None
        ]
        temps: dict[int, Path | None] = {}
        # Creating files in parallel helps even without a per-file fsync (the file system overlaps them).
        jobs = [
            (op, self._pool.submit(self._write_temp, final, op.change, data)) for op, final, data in writes
        ]
        for op, fut in jobs:
            temps[id(op)] = fut.result()  # None: parent not creatable yet, done in order below
        if writes and self.fsync and self._syncfs is not None:
            self._syncfs()  # one call makes every temporary file of the group durable
        # Phase 2: in record order.
        dirs: set[Path] = set()
        try:
            for op, target in prepared:
                if target is None:
                    continue
                try:
                    self._apply_one(op, target, temps.get(id(op)), dirs, res)
                    res.applied += 1
                except OSError as e:
                    c = op.change
                    log.error("apply.failed seq=%d op=%s path=%r error=%s", c.seq, c.op, c.path, e)
                    raise ApplyError(f"cannot apply {c.op} {c.path!r}: {e.strerror or e}") from e
        finally:
            for t in temps.values():
                if t is not None and t.exists():
                    _unlink(t)
        # Phase 3: folder entries durable.
        if self.fsync and dirs:
            if self._syncfs is not None:
                self._syncfs()
            else:
                list(self._pool.map(_fsync_dir_quiet, dirs))
        return res

    def _content_problem(self, c: Change, data: bytes) -> str | None:
        if len(data) != c.size or digest_bytes(data) != c.digest:
            return "content does not match its digest"
        if self.check is not None:
            return self.check(c.path, data)
        return None

    def _write_temp(self, final: Path, c: Change, data: bytes, force_fsync: bool = False) -> Path | None:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            return None
        tmp = final.parent / temp_name()
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                if not WINDOWS:  # in the same fsync as the content
                    os.utime(tmp, ns=(c.mtime_ns, c.mtime_ns))
                if self.fsync and (self._syncfs is None or force_fsync):
                    os.fsync(f.fileno())
            if WINDOWS:
                # Windows sets the last write time when the last writing handle closes: set it after.
                os.utime(tmp, ns=(c.mtime_ns, c.mtime_ns))
        except BaseException:
            _unlink(tmp)
            raise
        return tmp

    def _make_parent(self, final: Path, dirs: set[Path]) -> None:
        """Create the parent folders of ``final``, removing files that stand where a folder must be."""
        missing: list[Path] = []
        p = final.parent
        while p != self.root and not p.is_dir():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            if os.path.lexists(d):
                _remove(d)
            d.mkdir()
            dirs.add(d.parent)

    def _apply_one(
        self, op: PendingOp, final: Path, temp: Path | None, dirs: set[Path], res: BatchResult
    ) -> None:
        c = op.change
        if c.op is Op.PUT:
            if temp is None:
                temp = op.temp
            if temp is not None and not os.path.exists(temp):
                temp = None  # an earlier record of this batch removed its folder: write it again
            if temp is None:  # parent was blocked in phase 1, or removed since
                assert op.data is not None
                self._make_parent(final, dirs)
                temp = self._write_temp(final, c, op.data, force_fsync=True)
                if temp is None:
                    raise ApplyError(f"cannot create the folder of {c.path!r}")
            if os.path.isdir(final) and not os.path.islink(final):
                shutil.rmtree(final)
            os.replace(temp, final)
            dirs.add(final.parent)
            try:
                self.cache.put(c.path, os.stat(final), c.digest)
            except FileNotFoundError:
                pass
            if self.on_put is not None and op.data is not None:
                self.on_put(c, op.data)
        elif c.op is Op.DELETE or c.op is Op.RMDIR:
            if os.path.lexists(final):
                _remove(final)
                dirs.add(final.parent)
            self._forget(c.path)
        elif c.op is Op.MKDIR:
            if not final.is_dir() or final.is_symlink():
                self._make_parent(final, dirs)
                if os.path.lexists(final):
                    _remove(final)
                final.mkdir()
                dirs.add(final.parent)
        elif c.op is Op.RENAME:
            dst = self.resolve(c.dst)
            if not os.path.lexists(final):
                if os.path.lexists(dst):
                    return  # already renamed (a replayed record)
                res.problems.append(Problem(c.seq, c.path, "missing-source", f"rename to {c.dst!r}"))
                return
            self._make_parent(dst, dirs)
            if (
                os.path.lexists(dst)
                and (os.path.isdir(dst) or os.path.isdir(final))
                and not _same_file(final, dst)  # a case-only rename on a case-insensitive file system
            ):
                _remove(dst)
            os.replace(final, dst)
            dirs.add(final.parent)
            dirs.add(dst.parent)
            self._move_cache(c.path, c.dst)

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


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _is_reparse(st: os.stat_result) -> bool:
    """A Windows junction or other reparse point (treated like a symlink)."""
    attrs = getattr(st, "st_file_attributes", 0)
    return bool(attrs & 0x400)


def _remove(p: Path) -> None:
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p)
    else:
        os.unlink(p)


def _unlink(p: Path) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


def _fsync_dir_quiet(d: Path) -> None:
    try:
        fsync_dir(d)
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
