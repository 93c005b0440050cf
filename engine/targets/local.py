"""A replica in a local folder (or one the OS mounts): the :class:`~engine.targets.Target` over ``os`` calls.

Durability: on Linux one ``syncfs`` makes a whole group's temporary files durable (``caps.group_sync``),
then one more its folders' entries; elsewhere (Windows, macOS, ``sync_mode = "fsync"``) each file is
fsynced as it is written and each folder touched once per group.

Must not: decide what to write (the applier's), follow a symlink or junction.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat as statmod
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

from engine.errors import ApplyError
from engine.journal import fsync_dir
from engine.model import FileMeta, is_temp_name
from engine.scan import (
    HashCache,
    Manifest,
    change_time_ns,
    file_key,
    is_reparse_point,
    iter_file_chunks,
    iter_manifest,
)
from engine.targets import Capabilities, Kind, Stat, Target

log = logging.getLogger(__name__)

WINDOWS = sys.platform == "win32"

#: A new temporary file: never an existing one; binary on Windows.
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)


class LocalTarget(Target):
    def __init__(self, root: Path, *, sync_mode: str = "auto", skip: Path | None = None) -> None:
        """``sync_mode``: "auto" (syncfs where there is one), "fsync" (per file) or "syncfs" (required).
        ``skip``: a folder inside the root that is not part of the replica (a state folder)."""
        self.root = root
        self._root = os.fspath(root)
        self._sep = os.sep
        self._skip = skip
        self._syncfs = _syncfs_for(root, sync_mode)
        self.caps = Capabilities(
            group_sync=self._syncfs is not None,
            case_insensitive=WINDOWS or sys.platform == "darwin",
            mtime_resolution_ns=100 if WINDOWS else 1,
            filetime=WINDOWS,
            short_names=WINDOWS,
        )
        self._pool: ThreadPoolExecutor | None = None

    @property
    def label(self) -> str:
        return self._root

    def os_path(self, rel: str) -> str:
        """The OS path of ``rel`` (joined with the OS's separator: a ``\\\\?\\`` root takes no "/")."""
        if not rel:
            return self._root
        if self._sep != "/":
            rel = rel.replace("/", self._sep)
        return os.path.join(self._root, rel)

    # -- reading ---------------------------------------------------------------------------------------------
    def stat(self, rel: str) -> Stat | None:
        p = self.os_path(rel)
        try:
            st = os.lstat(p)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return _stat_of(p, st)

    def read_chunks(self, rel: str) -> Iterator[bytes]:
        return iter_file_chunks(Path(self.os_path(rel)))

    def manifest(
        self,
        include: Sequence[str],
        cache: HashCache,
        out: Manifest,
        flag_edits: bool = False,
        need_digest: Callable[[str], bool] | None = None,
        full: bool = False,
    ) -> Iterator[FileMeta]:
        return iter_manifest(self.root, include, cache, out, self._skip, flag_edits, need_digest, full)

    # -- writing -------------------------------------------------------------------------------------------
    def write_temp(self, temp: str, data: bytes, mtime_ns: int, durable: bool) -> None:
        tmp = self.os_path(temp)
        fd = os.open(tmp, _CREATE_FLAGS, 0o666)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if not WINDOWS:  # in the same fsync as the content
                    os.utime(fd, ns=(mtime_ns, mtime_ns))
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if WINDOWS:
                # Windows sets the last write time when the last writing handle closes: set it after.
                os.utime(tmp, ns=(mtime_ns, mtime_ns))
        except BaseException:
            _unlink(tmp)
            raise

    def begin_put(self, temp: str) -> _LocalPut:
        return _LocalPut(temp, self.os_path(temp))

    def place(self, temp: str, rel: str) -> Stat | None:
        os.replace(self.os_path(temp), self.os_path(rel))
        return None

    def rename(self, src: str, dst: str) -> None:
        os.replace(self.os_path(src), self.os_path(dst))

    def remove(self, rel: str) -> None:
        p = self.os_path(rel)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.unlink(p)

    def unlink_quiet(self, rel: str) -> None:
        _unlink(self.os_path(rel))

    def mkdir(self, rel: str) -> None:
        os.mkdir(self.os_path(rel))

    def makedirs(self, rel: str) -> None:
        os.makedirs(self.os_path(rel), exist_ok=True)

    def set_mtime(self, rel: str, mtime_ns: int, durable: bool) -> None:
        p = self.os_path(rel)
        st = os.stat(p, follow_symlinks=False)
        os.utime(p, ns=(st.st_atime_ns, mtime_ns))
        if durable:
            with open(p, "rb+") as f:  # the inode's new time durable (Windows needs write access)
                os.fsync(f.fileno())

    def same_file(self, a: str, b: str) -> bool:
        try:
            return os.path.samefile(self.os_path(a), self.os_path(b))
        except OSError:
            return False

    # -- durability ----------------------------------------------------------------------------------------
    def sync_group(self) -> None:
        if self._syncfs is None:
            raise NotImplementedError("no group sync here")
        self._syncfs()

    def sync_folders(self, rels: Iterable[str]) -> None:
        if self._syncfs is not None:
            self._syncfs()
            return
        folders = [self.os_path(r) for r in rels]
        if len(folders) < 4:
            for f in folders:
                _fsync_dir_quiet(f)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync-dir")
        list(self._pool.map(_fsync_dir_quiet, folders))

    def clean_temps(self) -> int:
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
        return n

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class _LocalPut:
    def __init__(self, temp: str, path: str) -> None:
        self.temp = temp
        self._path = path
        self._f: IO[bytes] | None = open(path, "xb")  # noqa: SIM115

    def write(self, data: bytes) -> None:
        assert self._f is not None
        self._f.write(data)

    def seal(self, mtime_ns: int, durable: bool) -> None:
        assert self._f is not None
        f, self._f = self._f, None
        try:
            f.flush()
            if durable:
                os.fsync(f.fileno())
        finally:
            f.close()
        os.utime(self._path, ns=(mtime_ns, mtime_ns))

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        _unlink(self._path)


def _stat_of(path: str, st: os.stat_result) -> Stat:
    mode = st.st_mode
    if statmod.S_ISLNK(mode) or is_reparse_point(st):
        kind = Kind.LINK
    elif statmod.S_ISDIR(mode):
        kind = Kind.DIR
    elif statmod.S_ISREG(mode):
        kind = Kind.FILE
    else:
        kind = Kind.OTHER
    change = change_time_ns(path, st) if kind is Kind.FILE else None
    return Stat(kind, st.st_size, st.st_mtime_ns, file_key(st, change), st.st_atime_ns)


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


def _unlink(p: str) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


def _fsync_dir_quiet(d: str) -> None:
    try:
        fsync_dir(Path(d))
    except FileNotFoundError:
        pass
