"""Quarantine: what an old active wrote after a failover, moved aside before it receives from the new one.

Owns ``<state_dir>/quarantine/``::

    20261125T100000Z-epoch-7/            one folder per rejoin (UTC time it was started, the new epoch)
        manifest.jsonl                   one JSON line per file: path, size, hash, why, stored
        files/<path>                     the files, moved (not copied) out of the replicated tree
        ACKNOWLEDGED                     written by ``acknowledge`` (the UTC time inside); nothing else
        sender-journal/                  the old sender journal, set aside by ``retire_journal``
    20261125T100000Z-epoch-7.partial/    a folder still being filled (finished by the next run)
    retired-journal-20261125T100000Z/    a journal retired when there was nothing to quarantine

Must not: delete anything in the quarantine (a file, a line, a folder), decide when a rejoin happens, or
write to the sender journal (it is read with ``Journal.open(readonly=True)``, which never cuts a torn tail,
creates no ``journal.id`` and repairs no segment header: a writable open would do all three).

The rules, in order, for each regular file of the replicated set (see :func:`find_divergence`):

1. Its path (or a folder it lies in that an unacknowledged rename named) was changed by a journal entry
   after ``applied``, the last seq of our journal the new active applied: *unacknowledged*.
2. Its stat key matches the sender's or the receiver's hash cache: a version standby shipped or received.
3. Its content equals the last version of the path shipped at or before ``applied``: not a suspect.
4. Anything else, a file that could not be read still included, is *unshipped*.

A path :func:`engine.model.check_relpath` refuses is never a suspect: apply never writes it, so nothing
will overwrite it. The journal is read before the retirement, so the order of a rejoin is
:func:`find_divergence`, :func:`quarantine`, :func:`retire_journal` (once the journal is retired, a file
journaled after ``applied`` looks shipped: its version is in the sender's hash cache).

Crash safety of :func:`quarantine`: the manifest line of a file is durable before the file moves; the move
is one ``os.replace`` (on another volume, a copy made durable under a temporary name, renamed into place,
then the original unlinked); the folder is renamed from ``.partial`` to its final name only at the end. A
run interrupted anywhere is finished by the next one for the same epoch, and every file is listed once.
INVARIANT: a stored name is never reused: a second version of a path goes to ``files-2/<path>`` (and so on).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import stat as statmod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal

from engine.config import RECEIVER_DIR, SENDER_DIR
from engine.digest import Hasher
from engine.errors import ConfigError, PathRejected, ReplicationError
from engine.journal import SUFFIX, Journal, fsync_dir
from engine.model import TEMP_MARKER, Change, Op, check_relpath
from engine.scan import HashCache, StableRead, Unstable, link_in_path, read_stable, stat_key, walk

log = logging.getLogger(__name__)

QUARANTINE_DIR = "quarantine"
JOURNAL_DIR = "journal"
HASHCACHE = "hashcache"
MANIFEST = "manifest.jsonl"
ACK_FILE = "ACKNOWLEDGED"
FILES_DIR = "files"
PARTIAL = ".partial"
RETIRED_JOURNAL = "sender-journal"
RETIRED_PREFIX = "retired-journal-"
STAMP = "%Y%m%dT%H%M%SZ"
#: A folder's name: the UTC stamp, a counter when two rejoins fall in the same second, the epoch.
_FOLDER_NAME = re.compile(r"^(?P<stamp>\d{8}T\d{6}Z)(?:-(?P<n>\d+))?-epoch-(?P<epoch>\d+)$")
#: The temporary name of a copy to another volume (check_relpath refuses it as a path: never a stored name).
_COPY_TEMP = f"{TEMP_MARKER}quarantine-copy"

Why = Literal["unacknowledged", "unshipped"]
UNACKNOWLEDGED: Why = "unacknowledged"
UNSHIPPED: Why = "unshipped"


@dataclass(frozen=True, slots=True)
class Suspect:
    """A file that differs from anything the new active has: it must not be overwritten silently."""

    path: str
    why: Why


@dataclass(frozen=True, slots=True)
class Divergence:
    """What :func:`find_divergence` found, in walk order."""

    suspects: list[Suspect]
    journal_id: str | None  # the id of the sender journal read (None: there was none)
    scanned: int  # regular files looked at
    unapplied: bool = False  # the journal holds entries the new active has not applied


@dataclass(frozen=True, slots=True)
class QuarantineResult:
    """The folder filled (None: nothing to quarantine) and what it holds in all, resumed runs included."""

    folder: Path | None
    files: int
    bytes: int


@dataclass(frozen=True, slots=True)
class Folder:
    """A finished quarantine folder, as ``standby quarantine list`` shows it."""

    id: str
    epoch: int
    created: str  # ISO 8601 UTC, from the id
    files: int
    bytes: int
    acknowledged: bool
    path: Path


# -- the pure part ---------------------------------------------------------------------------------------


def _index(dirs: set[str], path: str) -> None:
    """Note every folder above ``path``, so that only a folder known to hold entries is ever searched."""
    while "/" in path:
        path = path.rpartition("/")[0]
        if path in dirs:
            return
        dirs.add(path)


def _tree(shipped: dict[str, bytes | None], dirs: set[str], path: str) -> list[str]:
    """The keys at or below ``path``."""
    keys = [path] if path in shipped else []
    if path in dirs:
        prefix = path + "/"
        keys.extend(k for k in shipped if k.startswith(prefix))
    return keys


def _fold(
    changes: Iterable[Change], applied: int | None
) -> tuple[dict[str, bytes | None], set[str], set[str]]:
    """:func:`shipped_versions`, plus the folders named by unacknowledged renames (source and
    destination): everything below them moved without the new active knowing."""
    shipped: dict[str, bytes | None] = {}
    dirs: set[str] = set()
    unacked: set[str] = set()
    renamed: set[str] = set()
    for c in changes:
        if applied is None or c.seq > applied:
            unacked.add(c.path)
            if c.op is Op.RENAME:
                unacked.add(c.dst)
                renamed.update((c.path, c.dst))
            continue
        if c.op is Op.PUT or c.op is Op.TOUCH:
            shipped[c.path] = c.digest
            _index(dirs, c.path)
        elif c.op is Op.DELETE or c.op is Op.RMDIR:
            for k in _tree(shipped, dirs, c.path):
                shipped[k] = None
        elif c.op is Op.MKDIR:
            if c.path in shipped:  # a folder where a file was
                shipped[c.path] = None
        elif c.op is Op.RENAME:
            moved = {c.dst + k[len(c.path) :]: shipped[k] for k in _tree(shipped, dirs, c.path)}
            for k in _tree(shipped, dirs, c.path):
                shipped[k] = None
            for k in _tree(shipped, dirs, c.dst):  # replaced by what the source held (unknown: gone)
                del shipped[k]
            for k, v in moved.items():
                shipped[k] = v
                _index(dirs, k)
    return shipped, unacked, renamed


def shipped_versions(
    changes: Iterable[Change], applied: int | None
) -> tuple[dict[str, bytes | None], set[str]]:
    """From journal headers in seq order: the digest of each path as shipped at ``applied`` (None: shipped
    as deleted; a path not in the map is not known), and the paths changed after ``applied`` (every path
    of every change when ``applied`` is None, both paths of a rename).

    A put or touch sets the digest; a delete or rmdir makes the path and everything below it None; a rename
    moves the entries at and below its source to its destination (replacing what was there) and leaves the
    source None."""
    shipped, unacked, _renamed = _fold(changes, applied)
    return shipped, unacked


def _unacknowledged(path: str, unacked: set[str], renamed: set[str]) -> bool:
    """``path`` was changed after ``applied``, or lies in a folder an unacknowledged rename named."""
    if path in unacked:
        return True
    while renamed and "/" in path:
        path = path.rpartition("/")[0]
        if path in renamed:
            return True
    return False


# -- finding the divergence ------------------------------------------------------------------------------


def _read_journal(
    folder: Path, applied: int | None, journal_id: str | None
) -> tuple[str | None, dict[str, bytes | None], set[str], set[str]]:
    """Fold the journal at ``folder`` read-only. No journal (no folder, or neither id nor segment): empty.
    A damaged journal raises (its recovery hint names the commands): what was shipped cannot be known."""
    if not folder.is_dir():
        return None, {}, set(), set()
    has_id = (folder / "journal.id").exists()
    has_segments = any(p.suffix == SUFFIX for p in folder.iterdir())
    if not has_id and not has_segments:
        return None, {}, set(), set()
    if has_id and not has_segments:
        return (folder / "journal.id").read_text("ascii").strip(), {}, set(), set()
    j = Journal.open(folder, fsync=False, readonly=True)
    try:
        if journal_id is not None and journal_id != j.id and applied is not None:
            log.warning(
                "quarantine.other_journal ours=%s applied_of=%s (nothing of ours counts as applied)",
                j.id,
                journal_id,
            )
            applied = None
        if applied is not None and applied > j.head:
            log.warning("quarantine.applied_past_head applied=%d head=%d journal=%s", applied, j.head, j.id)
        shipped, unacked, renamed = _fold(j.headers(j.first_seq), applied)
        return j.id, shipped, unacked, renamed
    finally:
        j.close()


def find_divergence(
    root: Path,
    include: Sequence[str],
    state_dir: Path,
    applied: int | None,
    skip: Path | None = None,
    *,
    journal_id: str | None = None,
) -> Divergence:
    """The files under ``root`` that the new active does not have (see the rules in the module docstring).

    ``state_dir`` is the node's state folder (``sender/`` and ``receiver/`` below it); ``skip`` a folder to
    leave out of the walk (the state folder, if it lies inside the root). ``journal_id``: the journal
    ``applied`` belongs to; if given and not our journal's, nothing of ours counts as applied."""
    folder = state_dir / SENDER_DIR / JOURNAL_DIR
    jid, shipped, unacked, renamed = _read_journal(folder, applied, journal_id)
    caches = (
        HashCache.load(state_dir / SENDER_DIR / HASHCACHE),
        HashCache.load(state_dir / RECEIVER_DIR / HASHCACHE),
    )
    suspects: list[Suspect] = []
    scanned = 0
    for f in walk(root, include, skip):
        if f.is_dir or f.unreadable or f.st is None:
            continue
        scanned += 1
        path = f.path
        try:
            check_relpath(path)
        except PathRejected as e:
            log.debug("quarantine.skipped path=%r reason=%s (never replicated)", path, e.reason)
            continue
        if _unacknowledged(path, unacked, renamed):
            suspects.append(Suspect(path, UNACKNOWLEDGED))
            continue
        os_path = root / path
        key = stat_key(os_path, f.st)
        if any(c.get(path, key) is not None for c in caches):
            continue
        r = read_stable(os_path, keep_data=False)
        if r is None:
            continue  # gone since the walk
        if isinstance(r, StableRead) and r.digest == shipped.get(path):
            continue
        suspects.append(Suspect(path, UNSHIPPED))
    log.info(
        "quarantine.divergence journal=%s applied=%s scanned=%d suspects=%d",
        jid,
        applied,
        scanned,
        len(suspects),
    )
    return Divergence(suspects, jid, scanned, unapplied=bool(unacked))


# -- the manifest ----------------------------------------------------------------------------------------


def _parse_lines(data: bytes, where: Path) -> tuple[list[dict[str, Any]], int]:
    """The whole lines of a manifest and where they end (a last line without its newline is torn)."""
    out: list[dict[str, Any]] = []
    end = data.rfind(b"\n") + 1
    for n, raw in enumerate(data[:end].splitlines(), 1):
        try:
            v = json.loads(raw)
        except ValueError:
            v = None
        if not isinstance(v, dict) or not isinstance(v.get("path"), str):
            log.warning("quarantine.bad_manifest_line manifest=%s line=%d (kept, not read)", where, n)
            continue
        out.append(v)
    return out, end


def manifest(folder: Path) -> list[dict[str, Any]]:
    """The manifest lines of a quarantine folder, in the order written: ``path``, ``size``, ``hash`` (hex
    xxh3_128; None for a file that would not hold still), ``why``, ``stored`` (where below ``folder``).
    A later line with the same ``stored`` supersedes an earlier one."""
    try:
        data = (folder / MANIFEST).read_bytes()
    except FileNotFoundError:
        return []
    return _parse_lines(data, folder / MANIFEST)[0]


def _tally(folder: Path) -> tuple[int, int]:
    """Files and bytes held: the last line of each stored name whose file is there."""
    last = {str(e.get("stored", f"{FILES_DIR}/{e['path']}")): e for e in manifest(folder)}
    files = size = 0
    for stored, e in last.items():
        if os.path.lexists(folder / stored):
            files += 1
            size += int(e.get("size") or 0)
    return files, size


@dataclass(slots=True)
class _Book:
    """The manifest of a folder being filled: open for appends, indexed by stored name and by path."""

    folder: Path
    f: BinaryIO
    lines: dict[str, dict[str, Any]] = field(default_factory=dict)  # stored -> its last line
    by_path: dict[str, list[str]] = field(default_factory=dict)  # path -> stored names, in order
    dirs: set[str] = field(default_factory=set)  # every folder above a stored name

    @classmethod
    def open(cls, folder: Path) -> _Book:
        path = folder / MANIFEST
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = b""
        lines, end = _parse_lines(data, path)
        f = open(path, "r+b" if data else "wb")  # noqa: SIM115 - held open for appends
        try:
            if not data:
                fsync_dir(folder)
            if end < len(data):  # a line torn by a crash: its file was never moved (the line came first)
                log.warning("quarantine.torn_manifest_line manifest=%s cut_at=%d", path, end)
                f.truncate(end)
                os.fsync(f.fileno())
            f.seek(end)
        except BaseException:
            f.close()
            raise
        book = cls(folder, f)
        for e in lines:
            book._note(e)
        return book

    def _note(self, e: dict[str, Any]) -> None:
        stored = str(e.get("stored", f"{FILES_DIR}/{e['path']}"))
        if stored not in self.lines:
            self.by_path.setdefault(e["path"], []).append(stored)
        self.lines[stored] = e
        _index(self.dirs, stored)

    def append(self, e: dict[str, Any]) -> None:
        """Add a line and make it durable (INVARIANT: before the file it names moves)."""
        self.f.write(json.dumps(e, ensure_ascii=False).encode("utf-8") + b"\n")
        self.f.flush()
        os.fsync(self.f.fileno())
        self._note(e)

    def new_name(self, path: str) -> str:
        """A stored name for ``path`` that no line holds, nor a folder of one, nor a file in the way."""
        n = 1
        while True:
            name = f"{FILES_DIR}/{path}" if n == 1 else f"{FILES_DIR}-{n}/{path}"
            if name not in self.lines and name not in self.dirs and not os.path.lexists(self.folder / name):
                above = name.split("/")
                if not any("/".join(above[:i]) in self.lines for i in range(1, len(above))):
                    return name
            n += 1

    def close(self) -> None:
        self.f.close()


# -- moving ----------------------------------------------------------------------------------------------


def _replace(src: Path, dst: Path) -> None:
    """The one place a suspect is moved (a seam for tests that make it fail, as another volume does)."""
    os.replace(src, dst)


def _make_dirs(top: Path, folder: Path) -> None:
    """Create ``folder`` (below ``top``, which exists), making each new entry durable in its parent."""
    missing: list[Path] = []
    p = folder
    while p != top and not p.is_dir():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        os.mkdir(d)
        fsync_dir(d.parent)


def _copy_across(src: Path, dst: Path, digest: str | None) -> None:
    """Another volume: copy under a temporary name, make it durable, check it against ``digest`` (the hash
    in its manifest line), rename it into place, then unlink the original. A crash leaves the original, or
    the original and a whole copy (the next run unlinks the original), never neither."""
    tmp = dst.parent / _COPY_TEMP
    h = Hasher()
    try:
        with open(src, "rb") as fs, open(tmp, "wb") as fd:
            while block := fs.read(1 << 20):
                h.update(block)
                fd.write(block)
            fd.flush()
            shutil.copystat(src, tmp)
            os.fsync(fd.fileno())
        if digest is not None and h.digest().hex() != digest:
            raise ReplicationError(
                f"quarantine: {src} changed while it was copied to another volume; run again"
            )
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # our temporary copy, never a quarantined file
        raise
    fsync_dir(dst.parent)
    os.unlink(src)


def _move(src: Path, folder: Path, stored: str, rel: str, digest: str | None) -> None:
    dst = folder / stored
    _make_dirs(folder, dst.parent)
    if os.path.lexists(dst):  # INVARIANT: a quarantined file is never overwritten
        raise ReplicationError(f"quarantine: {dst} already exists; not moving {rel!r} over it")
    try:
        try:
            _replace(src, dst)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            _copy_across(src, dst, digest)
    except OSError as e:
        raise ReplicationError(
            f"quarantine: cannot move {rel!r} to {dst}: {e.strerror or e} "
            "(nothing was lost; fix this and run again: the quarantine resumes)"
        ) from e
    fsync_dir(dst.parent)
    fsync_dir(src.parent)


def _settle(book: _Book, root: Path, s: Suspect) -> bool:
    """Quarantine one suspect; False if there was nothing to move (gone, moved by an earlier run)."""
    rel = s.path
    src = root / rel
    if link_in_path(root, rel) is not None:
        log.warning("quarantine.skipped path=%r reason=symlinked-folder", rel)
        return False
    try:
        st = os.lstat(src)
    except (FileNotFoundError, NotADirectoryError):
        return False  # missing, or moved by an interrupted run (then it is listed)
    if not statmod.S_ISREG(st.st_mode):
        log.warning("quarantine.skipped path=%r reason=not-a-file", rel)
        return False
    r = read_stable(src, keep_data=False)
    if r is None:
        return False
    if isinstance(r, Unstable):
        log.warning("quarantine.unstable path=%r reason=%s (moved without a hash)", rel, r.reason)
    digest = r.digest.hex() if isinstance(r, StableRead) else None
    size = r.size if isinstance(r, StableRead) else st.st_size
    line: dict[str, Any] = {"path": rel, "size": size, "hash": digest, "why": s.why}
    for stored in book.by_path.get(rel, []):
        prev = book.lines[stored]
        if os.path.lexists(book.folder / stored):
            if digest is not None and prev.get("hash") == digest:
                # Copied to another volume by an interrupted run, which did not unlink the original.
                os.unlink(src)
                fsync_dir(src.parent)
                log.info("quarantine.moved path=%r why=%s resumed=copied", rel, s.why)
                return True
            continue
        # Listed by an interrupted run that did not move it: move it now (a changed version supersedes).
        if (prev.get("hash"), prev.get("size")) != (digest, size):
            book.append({**line, "stored": stored})
        _move(src, book.folder, stored, rel, digest)
        log.info("quarantine.moved path=%r why=%s resumed=listed", rel, s.why)
        return True
    stored = book.new_name(rel)
    book.append({**line, "stored": stored})
    _move(src, book.folder, stored, rel, digest)
    log.info("quarantine.moved path=%r why=%s size=%d", rel, s.why, size)
    return True


# -- folders ---------------------------------------------------------------------------------------------


def _stamp(now: datetime) -> str:
    return now.astimezone(UTC).strftime(STAMP)


def _free_name(qdir: Path, stamp: str, epoch: int) -> str:
    """``<stamp>-epoch-<E>``, or with a counter when that name (or its partial) is taken."""
    n = 1
    while True:
        name = f"{stamp}-epoch-{epoch}" if n == 1 else f"{stamp}-{n}-epoch-{epoch}"
        if not (qdir / name).exists() and not (qdir / f"{name}{PARTIAL}").exists():
            return name
        n += 1


def _partials(qdir: Path) -> list[tuple[Path, int]]:
    if not qdir.is_dir():
        return []
    out: list[tuple[Path, int]] = []
    for p in sorted(qdir.iterdir()):
        m = _FOLDER_NAME.match(p.name.removesuffix(PARTIAL))
        if p.name.endswith(PARTIAL) and m is not None and p.is_dir():
            out.append((p, int(m["epoch"])))
    return out


def _finish(qdir: Path, partial: Path, epoch: int) -> Path:
    """Rename a partial folder to its final name (with a counter if that is taken) and make it durable."""
    name = partial.name.removesuffix(PARTIAL)
    if (qdir / name).exists():
        m = _FOLDER_NAME.match(name)
        assert m is not None
        name = _free_name(qdir, m["stamp"], epoch)
    final = qdir / name
    os.rename(partial, final)
    fsync_dir(qdir)
    return final


def _ensure_qdir(state_dir: Path) -> Path:
    qdir = state_dir / QUARANTINE_DIR
    if not qdir.is_dir():
        qdir.mkdir(parents=True, exist_ok=True)
        fsync_dir(qdir.parent)
    return qdir


def quarantine(
    state_dir: Path, root: Path, suspects: Iterable[Suspect], *, epoch: int, now: datetime
) -> QuarantineResult:
    """Move ``suspects`` out of ``root`` into ``<state_dir>/quarantine/<UTC time>-epoch-<epoch>/``.

    Resumes an interrupted run for the same epoch (its ``.partial`` folder); a partial folder of another
    epoch is finished as it stands (its files are already out of the tree). Raises PathRejected (nothing
    done) for a suspect path the path rules refuse, ReplicationError for a file that cannot be moved (the
    folder stays partial; run again). Counts are of the whole folder."""
    todo = list(suspects)
    for s in todo:
        check_relpath(s.path)
    qdir = state_dir / QUARANTINE_DIR
    partial: Path | None = None
    for p, e in _partials(qdir):
        if e == epoch and partial is None:
            partial = p
        else:
            final = _finish(qdir, p, e)
            log.warning("quarantine.finished_stray folder=%s (an interrupted run of epoch %d)", final.name, e)
    if partial is None:
        if not any(os.path.lexists(root / s.path) for s in todo):  # none, or none left on disk
            return QuarantineResult(None, 0, 0)
        qdir = _ensure_qdir(state_dir)
        partial = qdir / f"{_free_name(qdir, _stamp(now), epoch)}{PARTIAL}"
        partial.mkdir()
        fsync_dir(qdir)
    else:
        log.info("quarantine.resumed folder=%s", partial.name)
    book = _Book.open(partial)
    try:
        seen: set[str] = set()
        moved = 0
        for s in todo:
            if s.path in seen:
                continue
            seen.add(s.path)
            moved += _settle(book, root, s)
    finally:
        book.close()
    fsync_dir(partial)
    final = _finish(qdir, partial, epoch)
    files, size = _tally(final)
    log.warning("quarantine.done folder=%s moved=%d files=%d bytes=%d", final.name, moved, files, size)
    return QuarantineResult(final, files, size)


def retire_journal(state_dir: Path, folder: Path | None, now: datetime) -> Path | None:
    """Move ``<state_dir>/sender/journal`` aside so that none of its entries is ever streamed: into
    ``folder/sender-journal`` or, with no folder, to ``<state_dir>/quarantine/retired-journal-<UTC>``.
    Returns where it is now: where it was moved, or (run again, with ``folder``) where an earlier call put
    it; None if there is no journal to retire (never made, or retired earlier without ``folder``)."""
    src = state_dir / SENDER_DIR / JOURNAL_DIR
    if folder is not None:
        names = [folder / RETIRED_JOURNAL, *(folder / f"{RETIRED_JOURNAL}-{n}" for n in range(2, 1000))]
    else:
        qdir = state_dir / QUARANTINE_DIR
        base = f"{RETIRED_PREFIX}{_stamp(now)}"
        names = [qdir / base, *(qdir / f"{base}-{n}" for n in range(2, 1000))]
    if not src.is_dir():
        done = [p for p in names if p.is_dir()]
        return done[-1] if done else None
    dst = next(p for p in names if not p.exists())
    if folder is None:
        _ensure_qdir(state_dir)
    os.rename(src, dst)
    fsync_dir(dst.parent)
    fsync_dir(src.parent)
    log.warning("quarantine.journal_retired to=%s", dst)
    return dst


def list_folders(state_dir: Path) -> list[Folder]:
    """The finished quarantine folders, oldest first."""
    qdir = state_dir / QUARANTINE_DIR
    if not qdir.is_dir():
        return []
    found: list[tuple[tuple[str, int, int, str], Folder]] = []
    for p in qdir.iterdir():
        m = _FOLDER_NAME.match(p.name)
        if m is None or not p.is_dir():
            continue
        s = m["stamp"]
        created = f"{s[0:4]}-{s[4:6]}-{s[6:8]}T{s[9:11]}:{s[11:13]}:{s[13:15]}Z"
        files, size = _tally(p)
        folder = Folder(p.name, int(m["epoch"]), created, files, size, (p / ACK_FILE).exists(), p)
        found.append(((s, int(m["n"] or 1), folder.epoch, p.name), folder))
    return [f for _key, f in sorted(found, key=lambda kf: kf[0])]


def _write_marker(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}{TEMP_MARKER}tmp")
    with open(tmp, "wb") as f:
        f.write(text.encode("ascii"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def acknowledge(state_dir: Path, ident: str | None, now: datetime | None = None) -> list[str]:
    """Mark a folder (``ident``) or every folder (None) as seen by the operator: an ``ACKNOWLEDGED`` file
    holding the UTC time. Nothing is deleted. Returns the ids newly acknowledged. An unknown id raises
    ConfigError naming it and the known ones."""
    folders = list_folders(state_dir)
    if ident is not None:
        chosen = [f for f in folders if f.id == ident]
        if not chosen:
            known = ", ".join(f.id for f in folders) or "none"
            raise ConfigError(f"quarantine: no folder {ident!r} (the folders are: {known})")
    else:
        chosen = folders
    when = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    done: list[str] = []
    for f in chosen:
        if f.acknowledged:
            continue
        _write_marker(f.path / ACK_FILE, when + "\n")
        log.info("quarantine.acknowledged folder=%s", f.id)
        done.append(f.id)
    return done


def unacknowledged_files(state_dir: Path) -> int:
    """Files held in folders the operator has not acknowledged yet."""
    return sum(f.files for f in list_folders(state_dir) if not f.acknowledged)
