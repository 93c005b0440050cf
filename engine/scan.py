"""Walking a replicated set, stable reads and the hash cache. Decides nothing about what changed.

A *stable read* takes a stat before and after reading and hashing a file; if size, mtime or file id moved,
the read is :class:`Unstable` and must be retried later: a version that mixes two writes is never used.
On Windows files are opened with FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE, so a read never
makes the service's own write, rename or delete fail.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as statmod
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import msgpack

from engine.digest import Hasher, digest_bytes
from engine.model import CHUNK_SIZE, NO_FLAGS, FileMeta, is_temp_name

log = logging.getLogger(__name__)

#: Files up to this size are read whole into memory; larger ones are streamed.
SMALL_FILE = 4 << 20


def open_shared(path: str | Path) -> IO[bytes]:
    """Open for reading without denying writers, renamers or deleters (matters on Windows only)."""
    if sys.platform != "win32":
        return open(path, "rb", buffering=0)
    import ctypes  # pragma: no cover - Windows
    import msvcrt  # type: ignore[import-not-found,unused-ignore]
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
    generic_read, share_all, open_existing, normal = 0x80000000, 0x7, 3, 0x80
    h = create(str(path), generic_read, share_all, None, open_existing, normal, None)
    if h == wintypes.HANDLE(-1).value:
        err = ctypes.get_last_error()  # type: ignore[attr-defined,unused-ignore]
        if err in (2, 3):
            raise FileNotFoundError(2, "No such file", str(path))
        raise ctypes.WinError(err)  # type: ignore[attr-defined,unused-ignore]
    fd = msvcrt.open_osfhandle(h, os.O_RDONLY | getattr(os, "O_BINARY", 0))  # type: ignore[attr-defined,unused-ignore]
    return open(fd, "rb", buffering=0)


def file_key(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def same_key(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """Size and mtime equal, and the file id too where both are known (Windows' DirEntry.stat() gives
    0 for the file id)."""
    return a[0] == b[0] and a[1] == b[1] and (a[2] == b[2] or a[2] == 0 or b[2] == 0)


@dataclass(frozen=True, slots=True)
class StableRead:
    size: int
    mtime_ns: int
    ino: int
    digest: bytes
    data: bytes | None  # whole content for small files; None for streamed ones


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
        after = os.stat(path, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:  # locked, delete pending, unreadable: try again later, never give up the process
        return Unstable(f"cannot read it now: {e.strerror or e}")
    if not same_key(file_key(before), file_key(after)):
        return Unstable("file changed while it was read")
    data = b"".join(parts) if small else None
    if data is not None and len(data) != after.st_size:
        return Unstable("size changed while it was read")
    digest = h.digest() if data is None else digest_bytes(data)
    return StableRead(after.st_size, after.st_mtime_ns, after.st_ino, digest, data)


def open_for_writing(paths: Sequence[Path]) -> tuple[set[Path], bool]:
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
    want: dict[tuple[int, int], Path] = {}
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        want[(st.st_dev, st.st_ino)] = p
    found: set[Path] = set()
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


@dataclass(frozen=True, slots=True)
class Found:
    """One path found by a walk: a folder, or a file with its stat."""

    path: str
    is_dir: bool
    st: os.stat_result | None
    unreadable: bool = False  # listing the folder (or stat of the file) failed: say nothing about it


def walk(root: Path, include: Sequence[str], skip: Path | None = None) -> Iterator[Found]:
    """Every folder and regular file of the replicated set, as relative POSIX paths.

    Symlinks and temporary files are skipped; so is ``skip`` (a state folder inside the root).
    """
    for item in include:
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
            if e.is_symlink():
                continue
            if e.is_dir(follow_symlinks=False):
                if skip is not None and Path(e.path) == skip:
                    continue
                yield Found(child, True, None)
                yield from _walk_dir(Path(e.path), child, skip)
            elif e.is_file(follow_symlinks=False):
                yield Found(child, False, e.stat(follow_symlinks=False))
        except FileNotFoundError:
            continue
        except OSError:
            yield Found(child, False, None, unreadable=True)


class HashCache:
    """Digests of files keyed on (size, mtime, file id): an unchanged file is never hashed again."""

    def __init__(self) -> None:
        self._d: dict[str, tuple[int, int, int, bytes]] = {}

    def get(self, path: str, st: os.stat_result) -> bytes | None:
        v = self._d.get(path)
        if v is not None and same_key((v[0], v[1], v[2]), file_key(st)):
            return v[3]
        return None

    def put(self, path: str, st: os.stat_result, digest: bytes) -> None:
        self._d[sys.intern(path)] = (*file_key(st), digest)

    def put_key(self, path: str, key: tuple[int, int, int], digest: bytes) -> None:
        self._d[sys.intern(path)] = (*key, digest)

    def known(self, path: str) -> tuple[int, int, int, bytes] | None:
        return self._d.get(path)

    def drop(self, path: str) -> None:
        self._d.pop(path, None)

    def retain(self, paths: set[str]) -> None:
        for p in [p for p in self._d if p not in paths]:
            del self._d[p]

    def __len__(self) -> int:
        return len(self._d)

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            snapshot = dict(self._d)  # RACE: another thread may add entries; a C-level copy is atomic
            # Written entry by entry (a map header, then key, value, ...): the same bytes as one packed
            # map, without building the whole encoding in memory.
            pk = msgpack.Packer(use_bin_type=True)
            f.write(pk.pack_map_header(len(snapshot)))
            for k, v in snapshot.items():
                f.write(pk.pack(k) + pk.pack(v))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> HashCache:
        c = cls()
        try:
            # Entry by entry: the cache of a large tree is never held twice (as decoded lists and tuples).
            with open(path, "rb") as f:
                u = msgpack.Unpacker(f, raw=False, max_buffer_size=64 << 20)
                for _ in range(u.read_map_header()):
                    k: Any = u.unpack()
                    v: Any = u.unpack()
                    if isinstance(k, str) and isinstance(v, list) and len(v) == 4:
                        c._d[sys.intern(k)] = (int(v[0]), int(v[1]), int(v[2]), bytes(v[3]))
        except FileNotFoundError:
            pass
        except Exception as e:  # a damaged cache only costs re-hashing
            log.warning("hashcache.unreadable path=%s error=%s", path, e)
        return c


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
) -> Manifest:
    """Path, size, mtime and digest of every file and folder in the set, hashing only cache misses.

    With ``flag_edits`` (the receiver), a file whose stat no longer matches what standby itself last wrote
    is flagged ``local-edit``. ``need_digest(path)`` False leaves a file's digest empty (it is sent
    anyway: the replica does not have it), so it is not read here.
    """
    m = Manifest({}, [], [])
    m.entries = {e.path: e for e in iter_manifest(root, include, cache, m, skip, flag_edits, need_digest)}
    return m


def iter_manifest(
    root: Path,
    include: Sequence[str],
    cache: HashCache,
    out: Manifest,
    skip: Path | None = None,
    flag_edits: bool = False,
    need_digest: Callable[[str], bool] | None = None,
) -> Iterator[FileMeta]:
    """The entries of :func:`build_manifest` one by one (so a large manifest need not be held whole);
    the paths that could not be read are added to ``out.unstable`` and ``out.unreadable``."""
    for f in walk(root, include, skip):
        if f.unreadable:
            (out.unreadable if f.is_dir else out.unstable).append(f.path)
            continue
        if f.is_dir:
            yield FileMeta(f.path, is_dir=True)
            continue
        assert f.st is not None
        digest = cache.get(f.path, f.st)
        flags: frozenset[str] = NO_FLAGS
        if digest is None and need_digest is not None and not need_digest(f.path):
            digest = b""
        if digest is None:
            if flag_edits and cache.known(f.path) is not None:
                flags = LOCAL_EDIT
            r = read_stable(root / f.path, keep_data=False)
            if r is None:
                continue
            if isinstance(r, Unstable):
                out.unstable.append(f.path)
                continue
            digest = r.digest
            if not flags:
                cache.put_key(f.path, (r.size, r.mtime_ns, r.ino), digest)
        yield FileMeta(f.path, False, f.st.st_size, f.st.st_mtime_ns, digest, flags)
