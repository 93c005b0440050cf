"""Walking a replicated set, stable reads and the hash cache. Decides nothing about what changed.

A *stable read* takes a stat before and after reading and hashing a file; if size, mtime, file id or change
time moved, the read is :class:`Unstable` and must be retried later: a version that mixes two writes is
never used. Modification times leave here clamped into int64 nanoseconds (:func:`wire_mtime`), the range the
journal and the wire hold. Walks never pass a symlink or junction, above an include item or below it.
On Windows files are opened with FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE, so a read never
makes the service's own write, rename or delete fail.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import stat as statmod
import struct
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import msgpack

from engine.digest import Hasher, digest_bytes
from engine.model import CHUNK_SIZE, NO_FLAGS, FileMeta, clamp_ns, is_temp_name

log = logging.getLogger(__name__)

#: Files up to this size are read whole into memory; larger ones are streamed.
SMALL_FILE = 4 << 20

WINDOWS = sys.platform == "win32"


def _create_file_w() -> tuple[Any, Any]:  # pragma: no cover - Windows
    """kernel32 and its CreateFileW, typed (Windows only)."""
    import ctypes
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined,unused-ignore]
    create = kernel32.CreateFileW
    create.restype = wintypes.HANDLE
    create.argtypes = [
        wintypes.LPCWSTR,
        wintypes.DWORD,
        wintypes.DWORD,
        wintypes.LPVOID,
        wintypes.DWORD,
        wintypes.DWORD,
        wintypes.HANDLE,
    ]
    return kernel32, create


def open_shared(path: str | Path) -> IO[bytes]:
    """Open for reading without denying writers, renamers or deleters (matters on Windows only)."""
    if sys.platform != "win32":
        return open(path, "rb", buffering=0)
    import ctypes  # pragma: no cover - Windows
    import msvcrt  # type: ignore[import-not-found,unused-ignore]
    from ctypes import wintypes

    _kernel32, create = _create_file_w()
    generic_read, share_all, open_existing, normal = 0x80000000, 0x7, 3, 0x80
    h = create(str(path), generic_read, share_all, None, open_existing, normal, None)
    if h == wintypes.HANDLE(-1).value:
        err = ctypes.get_last_error()  # type: ignore[attr-defined,unused-ignore]
        if err in (2, 3):
            raise FileNotFoundError(2, "No such file", str(path))
        raise ctypes.WinError(err)  # type: ignore[attr-defined,unused-ignore]
    fd = msvcrt.open_osfhandle(h, os.O_RDONLY | getattr(os, "O_BINARY", 0))  # type: ignore[attr-defined,unused-ignore]
    return open(fd, "rb", buffering=0)


#: What the hash cache knows a file version by: (size, mtime ns, file id, change time ns). The change time
#: (POSIX st_ctime; Windows' ChangeTime, not st_ctime, which is the creation time there) moves on every
#: write even when the writer puts size and mtime back (``touch -r``, ``cp -p``). None: not known, and a
#: key holding None never matches.
FileKey = tuple[int, int, int, int | None]


def file_id(st: os.stat_result) -> int:
    """``st_ino``, folded into 64 bits: Windows gives ReFS's 128-bit file IDs (Python 3.12 and later),
    and a key is held and saved in 64. Only equality matters (is it still the same file); a fold that
    comes to 0 is taken as 1, 0 meaning "not known" (see :func:`same_key`)."""
    ino = st.st_ino
    return ino if ino < 1 << 64 else ((ino ^ (ino >> 64)) & ((1 << 64) - 1)) or 1


def file_key(st: os.stat_result, change_ns: int | None) -> FileKey:
    """The key of a stat whose change time is ``change_ns`` (see :func:`change_time_ns`). The mtime is
    clamped into int64, as everywhere it is used, and the file id into 64 bits."""
    return (
        st.st_size,
        clamp_ns(st.st_mtime_ns),
        file_id(st),
        None if change_ns is None else clamp_ns(change_ns),
    )


def stat_key(path: str | Path, st: os.stat_result) -> FileKey:
    """The key of the file at ``path`` whose stat is ``st``."""
    return file_key(st, change_time_ns(path, st))


def change_time_ns(path: str | Path, st: os.stat_result) -> int | None:
    """The time the file's content or metadata last changed: st_ctime on POSIX; on Windows (where st_ctime
    is the creation time) the ChangeTime of FILE_BASIC_INFO, which costs an open. None if unreadable."""
    if not WINDOWS:
        return st.st_ctime_ns
    return _win_change_time_ns(path)  # pragma: no cover - Windows


def same_key(a: FileKey, b: FileKey) -> bool:
    """Size, mtime and change time equal and known, and the file id too where both are known (Windows'
    DirEntry.stat() gives 0 for the file id)."""
    return (
        a[0] == b[0]
        and a[1] == b[1]
        and (a[2] == b[2] or a[2] == 0 or b[2] == 0)
        and a[3] is not None
        and a[3] == b[3]
    )


#: FILE_BASIC_INFO: CreationTime, LastAccessTime, LastWriteTime, ChangeTime (LARGE_INTEGER, 100 ns units
#: since 1601-01-01 UTC), FileAttributes (DWORD); 40 bytes with its padding.
_BASIC_INFO = struct.Struct("<qqqqI")
BASIC_INFO_SIZE = 40
#: 100 ns intervals from 1601-01-01 to 1970-01-01.
_FILETIME_1970 = 116_444_736_000_000_000


def change_time_from_basic_info(buf: bytes) -> int:
    """The ChangeTime of a FILE_BASIC_INFO structure, in ns since 1970 (negative before). Pure."""
    if len(buf) < _BASIC_INFO.size:
        raise ValueError(f"FILE_BASIC_INFO is {_BASIC_INFO.size} bytes, got {len(buf)}")
    change = _BASIC_INFO.unpack_from(buf)[3]
    return int((change - _FILETIME_1970) * 100)


def _win_handle_change_time_ns(handle: int) -> int | None:  # pragma: no cover - Windows
    """GetFileInformationByHandleEx(FileBasicInfo) on an open handle; None if it fails."""
    import ctypes
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined,unused-ignore]
    fn = kernel32.GetFileInformationByHandleEx
    fn.restype = wintypes.BOOL
    fn.argtypes = [wintypes.HANDLE, ctypes.c_int, wintypes.LPVOID, wintypes.DWORD]
    buf = ctypes.create_string_buffer(BASIC_INFO_SIZE)
    if not fn(handle, 0, buf, BASIC_INFO_SIZE):  # 0: FileBasicInfo
        return None
    return change_time_from_basic_info(buf.raw)


def _win_change_time_ns(path: str | Path) -> int | None:  # pragma: no cover - Windows
    """Open ``path`` for its attributes only (sharing everything, not following a reparse point) and read
    its ChangeTime."""
    from ctypes import wintypes

    kernel32, create = _create_file_w()
    read_attributes, share_all, open_existing = 0x80, 0x7, 3
    flags = 0x02000000 | 0x00200000  # FILE_FLAG_BACKUP_SEMANTICS | FILE_FLAG_OPEN_REPARSE_POINT
    h = create(str(path), read_attributes, share_all, None, open_existing, flags, None)
    if h == wintypes.HANDLE(-1).value:
        return None
    try:
        return _win_handle_change_time_ns(h)
    finally:
        kernel32.CloseHandle(h)


def _open_change_time_ns(f: IO[bytes]) -> int | None:  # pragma: no cover - Windows
    """The ChangeTime of a file open in ``f`` (Windows)."""
    import msvcrt  # type: ignore[import-not-found,unused-ignore]

    return _win_handle_change_time_ns(msvcrt.get_osfhandle(f.fileno()))  # type: ignore[attr-defined,unused-ignore]


#: Paths whose out-of-range mtime was already logged (bounded: a note per path, not per scan).
_clamp_noted: set[str] = set()


def wire_mtime(path: str | Path, mtime_ns: int) -> int:
    """``mtime_ns`` as it is journaled, sent and listed: clamped into int64 (a file dated after 2262-04-11
    or before 1677-09-21), with a note in the log the first time a path is clamped."""
    v = clamp_ns(mtime_ns)
    if v != mtime_ns:
        key = os.fspath(path)
        if key not in _clamp_noted and len(_clamp_noted) < 10_000:
            _clamp_noted.add(key)
            log.warning(
                "scan.mtime_clamped path=%r mtime_ns=%d used=%d (beyond what a 64-bit time holds)",
                key,
                mtime_ns,
                v,
            )
    return v


@dataclass(frozen=True, slots=True)
class StableRead:
    size: int
    mtime_ns: int  # clamped into int64 (see wire_mtime)
    ino: int
    digest: bytes
    data: bytes | None  # whole content for small files; None for streamed ones
    change_ns: int | None = None  # see change_time_ns

    @property
    def key(self) -> FileKey:
        """The hash cache key of the version read."""
        return (self.size, self.mtime_ns, self.ino, self.change_ns)


@dataclass(frozen=True, slots=True)
class Unstable:
    reason: str
    writing: bool = False  # another process holds it open for writing: wait for its close


#: Read leases (Linux) are taken only for reads this small, so a writer is never held up for long.
LEASE_MAX = SMALL_FILE
_LEASE = sys.platform.startswith("linux")
_lease_broken = False


def _take_lease(fd: int) -> bool | None:
    """Linux: a read lease is granted only while no process has the file open for writing, and while we
    hold it a writer's open waits (for the microseconds of our read) instead of writing under us.
    True: held; False: someone is writing; None: leases are not available here (ownership, file system)."""
    global _lease_broken
    if not _LEASE or _lease_broken:
        return None
    import fcntl

    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)  # type: ignore[attr-defined,unused-ignore]
        return True
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EBUSY):
            return False
        _lease_broken = True
        log.info("scan.no_leases error=%s (open-for-writing checks fall back to close events)", e)
        return None


def _drop_lease(fd: int) -> None:
    import fcntl

    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)  # type: ignore[attr-defined,unused-ignore]
    except OSError:
        pass


def read_stable(
    path: str | Path,
    keep_data: bool = True,
    inline_max: int = SMALL_FILE,
    lease_check: bool = False,
    require_lease: bool = False,
) -> StableRead | Unstable | None:
    """Read and hash ``path`` if it holds still. None if it is missing or not a regular file.

    With ``lease_check`` (Linux), a file some process holds open for writing is not read at all
    (``Unstable(writing=True)``), and no writer can open it while it is read (see _take_lease). With
    ``require_lease`` too, a file for which no lease can be had (too large, leases unavailable) counts as
    open for writing: the caller has no other way to know."""
    try:
        before = os.stat(path, follow_symlinks=False)
        if not statmod.S_ISREG(before.st_mode):
            return None
        h = Hasher()
        parts: list[bytes] = []
        small = keep_data and before.st_size <= inline_max
        with open_shared(path) as f:
            change_before = _open_change_time_ns(f) if WINDOWS else before.st_ctime_ns
            lease = _take_lease(f.fileno()) if lease_check and before.st_size <= LEASE_MAX else None
            if lease is False:
                return Unstable("open for writing by another process", writing=True)
            if lease is None and require_lease:
                return Unstable("cannot tell whether a writer holds it open", writing=True)
            try:
                # A small file in one read (and one more that finds the end) rather than chunk by chunk.
                size = before.st_size + 1 if small else CHUNK_SIZE
                while True:
                    b = f.read(size)
                    if not b:
                        break
                    if small:
                        parts.append(b)  # hashed whole below
                    else:
                        h.update(b)
            finally:
                if lease:
                    _drop_lease(f.fileno())
            change_after = _open_change_time_ns(f) if WINDOWS else None
        after = os.stat(path, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:  # locked, delete pending, unreadable: try again later, never give up the process
        return Unstable(f"cannot read it now: {e.strerror or e}")
    if not WINDOWS:
        change_after = after.st_ctime_ns
    kb, ka = file_key(before, change_before), file_key(after, change_after)
    # A write that put size and mtime back still moves the change time.
    if kb[3] != ka[3] or not same_key((*kb[:3], 0), (*ka[:3], 0)):
        return Unstable("file changed while it was read")
    data = b"".join(parts) if small else None
    if data is not None and len(data) != after.st_size:
        return Unstable("size changed while it was read")
    digest = h.digest() if data is None else digest_bytes(data)
    return StableRead(after.st_size, wire_mtime(path, after.st_mtime_ns), ka[2], digest, data, ka[3])


_P = TypeVar("_P", str, Path)


def open_for_writing(paths: Sequence[_P]) -> tuple[set[_P], bool]:
    """Which of ``paths`` some process holds open for writing right now (Linux: one pass over /proc), and
    whether every process could be looked at (not so for other users' processes when not root, or with
    /proc mounted ``hidepid``; writers in another PID namespace are never seen).

    Used where no close-after-write event vouches for a file (reconciliation after a restart, a close
    event that never came): a writer paused mid-file must not have its half read. Elsewhere (Windows) this
    cannot be asked without taking a lock that could make the writer fail, so it answers the empty set
    and the settle interval applies.
    """
    if not sys.platform.startswith("linux") or not paths:
        return set(), False
    want: dict[tuple[int, int], _P] = {}
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        want[(st.st_dev, st.st_ino)] = p
    found: set[_P] = set()
    complete = True
    try:
        pids = [d for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return found, False
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except FileNotFoundError:
            continue  # the process ended
        except OSError:
            complete = False
            continue
        for fd in fds:
            try:
                st = os.stat(f"{fd_dir}/{fd}")
            except OSError:
                continue
            hit = want.get((st.st_dev, st.st_ino))
            if hit is None or hit in found:
                continue
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii") as f:
                    flags = next((int(line.split()[1], 8) for line in f if line.startswith("flags:")), 0)
            except (OSError, ValueError):
                continue
            if flags & (os.O_WRONLY | os.O_RDWR):
                found.add(hit)
    return found, complete


def iter_file_chunks(path: Path) -> Iterator[bytes]:
    with open_shared(path) as f:
        while b := f.read(CHUNK_SIZE):
            yield b


@dataclass(slots=True)
class Found:
    """One path found by a walk: a folder, or a file with its stat. (Not frozen: a walk makes one per file,
    and a frozen dataclass costs five times as much to make.)"""

    path: str
    is_dir: bool
    st: os.stat_result | None
    unreadable: bool = False  # listing the folder (or stat of the file) failed: say nothing about it


def is_reparse_point(st: os.stat_result) -> bool:
    """A Windows junction, mount point or other reparse point (FILE_ATTRIBUTE_REPARSE_POINT; never on
    POSIX). Python reports only a true symlink as a link (``is_symlink``): a junction looks like a plain
    folder to ``is_dir(follow_symlinks=False)``, and a walk that entered it could leave the root."""
    return bool(getattr(st, "st_file_attributes", 0) & 0x400)


def link_in_path(root: str | Path, rel: str) -> str | None:
    """The first folder of ``rel`` (a checked relative path) below ``root`` that is a symlink or a Windows
    junction or other reparse point, or None: then every existing folder on the way is a real one inside
    the root. The last component is not looked at (callers treat it themselves)."""
    folder = os.fspath(root)
    for name in rel.split("/")[:-1]:
        folder = os.path.join(folder, name)
        try:
            st = os.lstat(folder)
        except (FileNotFoundError, NotADirectoryError):
            return None  # the rest does not exist: nothing to follow
        if statmod.S_ISLNK(st.st_mode) or is_reparse_point(st):
            return name
    return None


def walk(root: Path, include: Sequence[str], skip: Path | None = None) -> Iterator[Found]:
    """Every folder and regular file of the replicated set, as relative POSIX paths.

    Symlinks and temporary files are skipped; so is ``skip`` (a state folder inside the root), and an
    include item below a symlinked folder (``config/config.json`` with ``config`` a link): nothing outside
    the root is ever listed or read.
    """
    for item in include:
        link = link_in_path(root, item)
        if link is not None:
            log.warning("scan.symlink_skipped path=%r link=%r (a symlink is never followed)", item, link)
            continue
        p = root / item
        try:
            st = os.stat(p, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if statmod.S_ISDIR(st.st_mode):
            # The parent folders of an include are implied, not listed.
            yield Found(item, True, None)
            yield from _walk_dir(p, item, skip)
        elif statmod.S_ISREG(st.st_mode):
            yield Found(item, False, st)


def _walk_dir(folder: Path, rel: str, skip: Path | None) -> Iterator[Found]:
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        # Gone between being found and being listed: deleted, or renamed (perhaps away and back). Its
        # contents are not known, which is not the same as none: it counts as unreadable, so that a
        # reconciliation removes nothing below it (a real deletion comes with the watcher's events).
        log.info("scan.folder_vanished path=%r (listed as unreadable)", rel)
        yield Found(rel, True, None, unreadable=True)
        return
    except OSError as err:
        log.warning("scan.unreadable_folder path=%r error=%s", rel, err.strerror or err)
        yield Found(rel, True, None, unreadable=True)
        return
    for e in entries:
        if is_temp_name(e.name):
            continue
        # Interned: the same path is a key in the hash cache and in both manifests of a reconciliation;
        # one string object serves them all (about 11 MB per copy at 100,000 files).
        child = sys.intern(f"{rel}/{e.name}")
        try:
            # Not following links, a symlink is neither a file nor a folder: it is skipped.
            if e.is_file(follow_symlinks=False):
                yield Found(child, False, e.stat(follow_symlinks=False))
            elif e.is_dir(follow_symlinks=False):
                if skip is not None and Path(e.path) == skip:
                    continue
                if WINDOWS and is_reparse_point(e.stat(follow_symlinks=False)):  # pragma: no cover - Windows
                    log.warning("scan.symlink_skipped path=%r (a junction is never followed)", child)
                    continue
                yield Found(child, True, None)
                yield from _walk_dir(Path(e.path), child, skip)
        except FileNotFoundError:
            continue
        except OSError:
            yield Found(child, False, None, unreadable=True)


#: The first value of a hash cache file; a file without it (an older format) is dropped, costing re-hashing.
CACHE_HEADER = {"fmt": "standby-hashcache", "v": 3}
#: The version before, still read: one map of path -> [size, mtime_ns, file id, change_ns or nil, digest].
CACHE_HEADER_V2 = {"fmt": "standby-hashcache", "v": 2}
#: Entries per map in a version 3 file: each map is decoded in one call, and a damaged file still gives
#: the whole maps before the damage.
CACHE_MAP_ENTRIES = 4096


#: A cache entry: size, mtime (ns), file id, change time (ns; None: not known) and digest.
CacheEntry = tuple[int, int, int, int | None, bytes]
#: How an entry is held in memory: packed into one bytes object (81 bytes), not a tuple of five objects
#: (about 230 bytes): 100,000 files cost about 20 MB less on each side. An entry that does not fit (an
#: unusual digest length, a number out of range) stays a tuple.
_PACKED = struct.Struct("<qqQq16s")
_PACKED_NO_CHANGE = struct.Struct("<qqQ16s")
#: The key part of a _PACKED entry (size, mtime, file id, change time): what HashCache.get_stat compares.
_KEY = struct.Struct("<qqQq")


def _pack(size: int, mtime_ns: int, file_id: int, change: int | None, digest: bytes) -> bytes | CacheEntry:
    try:
        if len(digest) == 16:
            if change is None:
                return _PACKED_NO_CHANGE.pack(size, mtime_ns, file_id, digest)
            return _PACKED.pack(size, mtime_ns, file_id, change, digest)
    except (struct.error, OverflowError):
        pass
    return (size, mtime_ns, file_id, change, digest)


def _unpack(v: bytes | CacheEntry) -> CacheEntry:
    if isinstance(v, tuple):
        return v
    if len(v) == _PACKED.size:
        size, mtime_ns, file_id, change, digest = _PACKED.unpack(v)
        return (size, mtime_ns, file_id, change, digest)
    size, mtime_ns, file_id, digest = _PACKED_NO_CHANGE.unpack(v)
    return (size, mtime_ns, file_id, None, digest)


class HashCache:
    """Digests of files keyed on :data:`FileKey`: an unchanged file is never hashed again.

    File format (version 3): the msgpack map :data:`CACHE_HEADER`, then msgpack maps of at most
    :data:`CACHE_MAP_ENTRIES` entries, relative path to the entry as held in memory: 48 bytes
    (``struct "<qqQq16s"``: size, mtime_ns, file id, change_ns, digest), 40 bytes (``"<qqQ16s"``, no change
    time), or, for an entry that does not pack, ``[size, mtime_ns, file id, change_ns or nil, digest]``.
    Loading one takes a tenth of the time version 2 took (one map of path -> that list), which is still read.
    """

    def __init__(self) -> None:
        self._d: dict[str, bytes | CacheEntry] = {}
        # RACE: saves come from several threads (after a reconciliation, on a timer, at stop): one at a
        # time, each through a temporary file of its own, and none when nothing changed since the last.
        self._save_lock = threading.Lock()
        self._changes = 0
        self._saved_at = -1

    def get(self, path: str, key: FileKey) -> bytes | None:
        v = self._d.get(path)
        if v is None:
            return None
        e = _unpack(v)
        return e[4] if same_key((e[0], e[1], e[2], e[3]), key) else None

    def get_stat(self, path: str, st: os.stat_result) -> bytes | None:
        """:meth:`get` for the key of ``st`` with its st_ctime as change time (POSIX). The common case, an
        entry packed with its change time that matches exactly, is one comparison of bytes instead of
        making the key and unpacking the entry (a walk of 100,000 files asks 100,000 times)."""
        v = self._d.get(path)
        if v is None:
            return None
        if type(v) is bytes and len(v) == _PACKED.size:
            try:
                key = _KEY.pack(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
            except (struct.error, OverflowError):
                pass  # out of int64 (clamped) or a 128-bit file id (folded): the general way below
            else:
                if v.startswith(key):
                    return v[_KEY.size :]
        return self.get(path, file_key(st, st.st_ctime_ns))

    def put_key(self, path: str, key: tuple[int, ...] | FileKey, digest: bytes) -> None:
        """Record ``digest`` for the version of ``path`` known by ``key``. A key without a change time
        (size, mtime, file id) is kept but never matches: the file is hashed once more to learn it."""
        change = key[3] if len(key) > 3 else None
        self._d[sys.intern(path)] = _pack(key[0], key[1], key[2], change, digest)
        self._changes += 1

    def rekey(self, path: str, key: FileKey) -> None:
        """``path`` was moved by us (a rename moves the change time): keep its digest under ``key`` if size,
        mtime and file id are still those recorded."""
        v = self._d.get(path)
        if v is None:
            return
        e = _unpack(v)
        if same_key((e[0], e[1], e[2], 0), (*key[:3], 0)):
            self._d[path] = _pack(key[0], key[1], key[2], key[3], e[4])
            self._changes += 1

    def __contains__(self, path: object) -> bool:
        return path in self._d

    def known(self, path: str) -> CacheEntry | None:
        v = self._d.get(path)
        return None if v is None else _unpack(v)

    def items(self) -> Iterator[tuple[str, CacheEntry]]:
        """Every entry (a snapshot: safe while other threads add entries)."""
        for k, v in dict(self._d).items():  # RACE: a C-level copy is atomic
            yield k, _unpack(v)

    def drop(self, path: str) -> None:
        if self._d.pop(path, None) is not None:
            self._changes += 1

    def retain(self, paths: set[str]) -> None:
        for p in [p for p in self._d if p not in paths]:
            del self._d[p]
            self._changes += 1

    def __len__(self) -> int:
        return len(self._d)

    def save(self, path: Path) -> bool:
        """Write the cache to ``path`` (atomically, by rename); False if nothing changed since the last
        save, so nothing was written. Raises OSError (the caller logs it: a lost cache costs re-hashing)."""
        with self._save_lock:
            changes = self._changes
            if changes == self._saved_at and path.exists():
                return False
            tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
            try:
                with open(tmp, "wb") as f:
                    snapshot = dict(self._d)  # RACE: another thread may add entries; a C-level copy is atomic
                    # Map by map: the whole encoding is never built in memory.
                    pk = msgpack.Packer(use_bin_type=True)
                    f.write(pk.pack(CACHE_HEADER))
                    items = iter(snapshot.items())
                    while chunk := dict(itertools.islice(items, CACHE_MAP_ENTRIES)):
                        f.write(pk.pack({k: v if type(v) is bytes else list(v) for k, v in chunk.items()}))
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            self._saved_at = changes
            return True

    @classmethod
    def load(cls, path: Path) -> HashCache:
        c = cls()
        try:
            with open(path, "rb") as f:
                u = msgpack.Unpacker(f, raw=False, max_buffer_size=64 << 20)
                if u.read_map_header() != len(CACHE_HEADER):
                    raise _OldFormat
                head = {u.unpack(): u.unpack() for _ in CACHE_HEADER}
                if head == CACHE_HEADER_V2:
                    c._load_v2(u)
                elif head == CACHE_HEADER:
                    for chunk in u:
                        if not isinstance(chunk, dict):
                            raise ValueError("not a map of entries")
                        c._add_chunk(chunk)
                    if u.tell() != os.fstat(f.fileno()).st_size:  # the iteration stops at a cut map
                        raise ValueError(f"cut off after {len(c)} entries")
                else:
                    raise _OldFormat
        except FileNotFoundError:
            pass
        except _OldFormat:
            log.info("hashcache.old_format path=%s (dropped; files are hashed again once)", path)
        except Exception as e:  # a damaged cache only costs re-hashing
            log.warning("hashcache.unreadable path=%s error=%s", path, e)
        return c

    def _add_chunk(self, chunk: dict[Any, Any]) -> None:
        d = self._d
        for k, v in chunk.items():
            if type(k) is not str:
                continue
            if type(v) is bytes:
                if len(v) == _PACKED.size or len(v) == _PACKED_NO_CHANGE.size:
                    d[sys.intern(k)] = v
            elif _valid_entry(v):
                d[sys.intern(k)] = _pack(v[0], v[1], v[2], v[3], v[4])

    def _load_v2(self, u: msgpack.Unpacker) -> None:
        # Entry by entry: the cache of a large tree is never held twice (as decoded lists and tuples).
        for _ in range(u.read_map_header()):
            k: Any = u.unpack()
            v: Any = u.unpack()
            if isinstance(k, str) and _valid_entry(v):
                self._d[sys.intern(k)] = _pack(v[0], v[1], v[2], v[3], v[4])


def _valid_entry(v: Any) -> bool:
    """A saved entry as a list: [size, mtime_ns, file id, change_ns or nil, digest]."""
    return (
        isinstance(v, list)
        and len(v) == 5
        and all(isinstance(x, int) for x in v[:3])
        and (v[3] is None or isinstance(v[3], int))
        and isinstance(v[4], bytes)
    )


class NoCache(HashCache):
    """A cache that keeps nothing: for an applier that writes a tree once and leaves it (a checkpoint, a
    replay, a restore), where remembering every file's digest would only hold memory (about 200 bytes a
    file, which the allocator keeps after). A touch then hashes the file it finds."""

    def put_key(self, path: str, key: tuple[int, ...] | FileKey, digest: bytes) -> None:
        return None

    def rekey(self, path: str, key: FileKey) -> None:
        return None


class _OldFormat(Exception):
    """A hash cache file of another format version."""


LOCAL_EDIT: frozenset[str] = frozenset({"local-edit"})


@dataclass(slots=True)
class Manifest:
    entries: dict[str, FileMeta]
    unstable: list[str]
    #: Folders that could not be listed: nothing below them may be judged missing.
    unreadable: list[str] = field(default_factory=list)


def build_manifest(
    root: Path,
    include: Sequence[str],
    cache: HashCache,
    skip: Path | None = None,
    flag_edits: bool = False,
    need_digest: Callable[[str], bool] | None = None,
    full: bool = False,
) -> Manifest:
    """Path, size, mtime and digest of every file and folder in the set, hashing only cache misses.

    With ``flag_edits`` (the receiver), a file whose content, size or mtime no longer match what standby
    itself last wrote is flagged ``local-edit``. ``need_digest(path)`` False leaves a file's digest empty
    (it is sent anyway: the replica does not have it), so it is not read here.
    """
    m = Manifest({}, [], [])
    found = iter_manifest(root, include, cache, m, skip, flag_edits, need_digest, full)
    m.entries = {e.path: e for e in found}
    return m


def iter_manifest(
    root: Path,
    include: Sequence[str],
    cache: HashCache,
    out: Manifest,
    skip: Path | None = None,
    flag_edits: bool = False,
    need_digest: Callable[[str], bool] | None = None,
    full: bool = False,
) -> Iterator[FileMeta]:
    """The entries of :func:`build_manifest` one by one (so a large manifest need not be held whole);
    the paths that could not be read are added to ``out.unstable`` and ``out.unreadable``.

    ``full``: every file is read and hashed, whatever the cache says (``standby verify --full``); the cache
    is neither consulted nor changed."""
    for path, st, digest in iter_known(root, include, cache, out, skip, full):
        if st is None:
            yield FileMeta(path, is_dir=True)
            continue
        flags: frozenset[str] = NO_FLAGS
        if digest is None and need_digest is not None and not need_digest(path):
            digest = b""
        if digest is None:
            read = read_digest(root, path, cache, out, full, flag_edits)
            if read is None:
                continue
            digest, flags = read
        yield FileMeta(path, False, st.st_size, wire_mtime(path, st.st_mtime_ns), digest, flags)


def iter_known(
    root: Path,
    include: Sequence[str],
    cache: HashCache,
    out: Manifest,
    skip: Path | None = None,
    full: bool = False,
) -> Iterator[tuple[str, os.stat_result | None, bytes | None]]:
    """Every folder (its stat None) and file of the set with the digest the hash cache knows for it (None:
    not known, or ``full``); nothing is read. The paths that could not be listed or stat'ed are added to
    ``out.unreadable`` and ``out.unstable``. (What :func:`iter_manifest` and the reconciler's scan walk.)"""
    for f in walk(root, include, skip):
        if f.unreadable:
            (out.unreadable if f.is_dir else out.unstable).append(f.path)
            continue
        if f.is_dir:
            yield f.path, None, None
            continue
        assert f.st is not None
        # The path object is made only where it is used (Windows' change time, a read): at 100,000 files
        # a pathlib join per file is a tenth of a second.
        if full:
            yield f.path, f.st, None
        elif WINDOWS:  # pragma: no cover - Windows
            yield f.path, f.st, cache.get(f.path, stat_key(root / f.path, f.st))
        else:
            yield f.path, f.st, cache.get_stat(f.path, f.st)


def read_digest(
    root: Path, path: str, cache: HashCache, out: Manifest, full: bool = False, flag_edits: bool = False
) -> tuple[bytes, frozenset[str]] | None:
    """Read and hash the file ``path`` below ``root`` for a manifest (see :func:`note_read`): its digest
    and flags, or None if it is gone, or moving (then it is added to ``out.unstable``)."""
    r = read_stable(root / path, keep_data=False)
    if r is None:
        return None
    if isinstance(r, Unstable):
        out.unstable.append(path)
        return None
    return r.digest, note_read(cache, path, r.key, r.digest, full, flag_edits)


def note_read(
    cache: HashCache, path: str, key: FileKey, digest: bytes, full: bool, flag_edits: bool
) -> frozenset[str]:
    """A manifest read ``path`` (the version ``key``, hashed to ``digest``): its digest goes into the
    cache, or, with ``flag_edits``, the file is flagged LOCAL_EDIT (and not cached: flagged again until
    the sender repairs it) if it is a replica file standby wrote that someone else changed: its content,
    size or mtime differ from what was written (only its change time moving, a chmod or an indexer, is no
    edit). ``full`` (verify --full) leaves the cache alone."""
    if full:
        return NO_FLAGS
    if flag_edits:
        known = cache.known(path)
        if known is not None and (known[4] != digest or known[0] != key[0] or known[1] != key[1]):
            return LOCAL_EDIT
    cache.put_key(path, key, digest)
    return NO_FLAGS


@dataclass(frozen=True, slots=True)
class TreeDigest:
    """One digest of a whole tree (paths, kinds, sizes and content hashes; not times), for a switchover's
    check that both servers hold the same. ``unstable``: files that could not be read steadily (being
    written): the digest is then not to be trusted."""

    digest: str
    files: int
    folders: int
    bytes: int
    unstable: int


def tree_digest(root: Path, include: Sequence[str], cache: HashCache, skip: Path | None = None) -> TreeDigest:
    """Digest every file and folder of the set under ``root``, in path order, hashing only cache misses."""
    m = Manifest({}, [], [])
    entries = sorted(iter_manifest(root, include, cache, m, skip), key=lambda e: e.path)
    h = Hasher()
    files = folders = size = 0
    for e in entries:
        if e.is_dir:
            folders += 1
            h.update(b"d\0" + e.path.encode("utf-8") + b"\0")
        else:
            files += 1
            size += e.size
            h.update(b"f\0" + e.path.encode("utf-8") + b"\0" + str(e.size).encode() + b"\0" + e.digest)
    return TreeDigest(h.digest().hex(), files, folders, size, len(m.unstable) + len(m.unreadable))


def digest_file(path: str | Path, chunk: int = 1 << 20) -> tuple[int, bytes]:
    """Bytes read from the file at ``path`` and their digest."""
    h = Hasher()
    n = 0
    with open(path, "rb") as f:
        while data := f.read(chunk):
            h.update(data)
            n += len(data)
    return n, h.digest()
