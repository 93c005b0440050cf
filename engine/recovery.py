"""Recovery of single files from the journal: what a path held at a moment, every version of it kept, and
putting one file (or every file of a folder) back in place as it was.

The journal holds every change with its content, so following its entries in order says what any path
held after any entry (:class:`Follow`, pure: the same moves as ``engine.apply``: a put replaces, a delete or
rmdir removes the path and all below it, a rename moves a file or a folder and replaces its target). What
a path held *before* the first entry kept is unknown once older entries were pruned: a moment whose answer
depends on it is refused, naming the window, never answered with a guess.

Restore writes as the service would: a temp file beside the target, fsynced, renamed over it, the folder
fsynced; on the active, the sender then journals and ships it as any other change. The content read back
is checked against the digest the journal recorded before anything is written.

Owns: following a path through the journal, ``standby journal show --path`` and ``standby restore``.
Must not: write anywhere but the one path (or the folder's files) it restores, or touch the journal.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from engine import checkpoint
from engine.apply import Applier, PendingOp
from engine.digest import digest_bytes
from engine.errors import ConfigError, JournalError, PathRejected
from engine.journal import Journal
from engine.model import Change, Op, check_relpath
from engine.replay import (
    Basis,
    UntilTime,
    Window,
    bar,
    basis,
    refuse_unanswerable,
    short_of_missing,
    usable_checkpoints,
    window,
)
from engine.replay import utc_and_local as when
from engine.scan import NoCache

# ---- following paths (pure) -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Held:
    """What a file path holds: the entry whose content it is, and its size, digest and mtime."""

    seq: int  # the PUT whose content this is
    size: int
    digest: bytes
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class Version:
    """One change of what ``path`` holds, as ``journal show --path`` lists it. ``held`` None: absent."""

    seq: int
    ts_ns: int
    op: str  # put, touch, delete, rename-in, rename-away, removed-with-folder, moved-with-folder
    held: Held | None
    other: str = ""  # the other path of a rename


def _under(path: str, folder: str) -> bool:
    return path.startswith(folder + "/")


class Follow:
    """The files' contents (and the folders) after each entry, starting from ``known`` (True: the journal
    starts from an empty tree, nothing before its first entry; False: older entries were pruned, so a path
    not changed since is unknown). The moves are ``engine.apply``'s: a put or mkdir removes a file standing
    where one of its folders goes and a folder standing where it goes; delete and rmdir remove the path
    and all below it; a rename of a path that exists moves it and all below it, replacing its target."""

    def __init__(self, known: bool) -> None:
        self.known = known
        self.files: dict[str, Held] = {}
        self.dirs: set[str] = set()
        self.touched: set[str] = set()  # paths (and folders) whose state the kept entries decided
        self.unknown: set[str] = set()  # paths (and folders) that received what was there before the window

    def state(self, path: str) -> Held | None:
        """What ``path`` holds now; LookupError if that depends on entries no longer kept."""
        if path in self.files:
            return self.files[path]
        if any(path == u or _under(path, u) for u in self.unknown):
            raise LookupError(path)
        if self.known or path in self.touched or any(_under(path, t) for t in self.touched if t):
            return None
        raise LookupError(path)

    def _drop(self, path: str, how: str, why: str, changed: list[tuple[str, str, str]]) -> None:
        """Remove ``path`` and all below it (files and folders)."""
        for p in [p for p in self.files if p == path or _under(p, path)]:
            del self.files[p]
            changed.append((p, how if p == path else "removed-with-folder", why))
        self.dirs = {d for d in self.dirs if not (d == path or _under(d, path))}

    def _parents(self, path: str, why: str, changed: list[tuple[str, str, str]]) -> None:
        """The folders above ``path`` exist; a file standing where one goes is removed."""
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d in self.files:
                del self.files[d]
                changed.append((d, "replaced-by-folder", why))
            self.dirs.add(d)

    def apply(self, c: Change) -> list[tuple[str, str, str]]:
        """Apply one entry; the paths whose content changed: (path, how, other path)."""
        changed: list[tuple[str, str, str]] = []
        if c.op is Op.PUT:
            self._parents(c.path, c.path, changed)
            if c.path in self.dirs:
                self._drop(c.path, "replaced-by-file", c.path, changed)
            self.files[c.path] = Held(c.seq, c.size, c.digest, c.mtime_ns)
            changed.append((c.path, "put", ""))
        elif c.op is Op.MKDIR:
            if c.path not in self.dirs:
                self._parents(c.path, c.path, changed)
                if c.path in self.files:
                    del self.files[c.path]
                    changed.append((c.path, "replaced-by-folder", c.path))
                self.dirs.add(c.path)
        elif c.op is Op.TOUCH:
            old = self.files.get(c.path)
            if old is not None and old.digest == c.digest:
                self.files[c.path] = Held(old.seq, old.size, old.digest, c.mtime_ns)
                changed.append((c.path, "touch", ""))
        elif c.op in (Op.DELETE, Op.RMDIR):
            self._drop(c.path, "delete", c.path, changed)
        elif c.op is Op.RENAME:
            self._rename(c.path, c.dst, changed)
        self.touched.add(c.path)
        if c.op is Op.RENAME:
            self.touched.add(c.dst)
        return changed

    def _rename(self, src: str, dst: str, changed: list[tuple[str, str, str]]) -> None:
        if src not in self.files and src not in self.dirs:
            if not self.known and not (src in self.touched or any(_under(src, t) for t in self.touched)):
                # What moved was there before the window: what ``dst`` holds now is not known.
                self._drop(dst, "replaced-by-rename", src, changed)
                self.unknown.add(dst)
            return  # (known: nothing there; the applier reports a missing source and changes nothing)
        moving = {p: h for p, h in self.files.items() if p == src or _under(p, src)}
        folders = {d for d in self.dirs if d == src or _under(d, src)}
        self.dirs -= folders
        for p in moving:
            del self.files[p]
        self._parents(dst, src, changed)
        self._drop(dst, "replaced-by-rename", src, changed)
        self.dirs |= {dst + d[len(src) :] for d in folders}
        for p, h in moving.items():
            new = dst + p[len(src) :]
            self.files[new] = h
            how = ("rename-away", "rename-in") if p == src else ("moved-with-folder", "moved-with-folder")
            changed.append((p, how[0], new))
            changed.append((new, how[1], p))


def follow_versions(changes: Iterable[Change], path: str, known: bool) -> list[Version]:
    """Every change of what ``path`` (a file, or every file below a folder) held, in order."""
    f = Follow(known)
    out: list[Version] = []
    for c in changes:
        for p, how, other in f.apply(c):
            if p == path or _under(p, path):
                out.append(Version(c.seq, c.ts_ns, how, f.files.get(p), other if p == path else p))
    return out


# ---- reading the journal ----------------------------------------------------------------------------------


def _rel(path: str) -> str:
    try:
        return check_relpath(path)
    except PathRejected as e:
        raise ConfigError(f"--path: {e}") from None


def _open(folder: Path) -> Journal:
    if not folder.is_dir():
        raise JournalError(f"{folder}: no journal here")
    return Journal.open(folder, fsync=False, readonly=True)


def _upto(j: Journal, until_ns: int | None, until_seq: int | None) -> Iterator[Change]:
    for c in j.headers(j.first_seq):
        if until_seq is not None and c.seq > until_seq:
            return
        if until_ns is not None and c.ts_ns > until_ns:
            return
        yield c


def versions(folder: Path, path: str) -> tuple[Window, list[Version]]:
    """``journal show --path``: the window and every version of ``path`` it keeps."""
    rel = _rel(path)
    j = _open(folder)
    try:
        w = window(j)
        return w, follow_versions(j.headers(j.first_seq), rel, known=not w.pruned)
    finally:
        j.close()


@dataclass(frozen=True, slots=True)
class Restored:
    path: str
    held: Held | None  # None: the path held nothing at that moment (nothing was written)
    wrote: bool


def restore(
    folder: Path,
    root: Path,
    path: str,
    *,
    until_ns: int | None = None,
    until_seq: int | None = None,
    dry_run: bool = False,
) -> list[Restored]:
    """Put ``path`` (a file, or every file below a folder) back as it was after the last entry at or before
    the moment; ConfigError (exit 2) naming the window when the journal cannot say."""
    rel = _rel(path)
    j = _open(folder)
    try:
        w = window(j)
        if until_seq is not None and not (w.first - (0 if w.pruned else 1) <= until_seq <= w.head):
            raise ConfigError(f"--pos {until_seq}: outside the window ({w})")
        if until_ns is not None and (w.head < w.first or (w.pruned and until_ns < w.first_ts)):
            raise ConfigError(f"--at {when(until_ns)}: outside the window ({w})")
        f = Follow(known=not w.pruned)
        for c in _upto(j, until_ns, until_seq):
            f.apply(c)
        targets = sorted(p for p in f.files if p == rel or _under(p, rel))
        if not f.known and targets and targets != [rel]:
            # A folder's files that did not change within the window are in no entry kept.
            raise ConfigError(
                f"{rel}: a folder can be restored only while the journal holds its whole history ({w}); "
                "rebuild the set with standby replay --into DIR (from a checkpoint) and copy the folder"
            )
        if targets == [rel] and rel in f.unknown:
            raise ConfigError(
                f"{rel}: what it held then is older than the journal ({w}); it cannot be restored"
            )
        if not targets:
            try:
                held = f.state(rel)
            except LookupError:
                raise ConfigError(
                    f"{rel}: what it held then is older than the journal ({w}); it cannot be restored"
                ) from None
            assert held is None
            raise ConfigError(f"{rel}: nothing was there at that moment (see `standby journal show --path`)")
        out: list[Restored] = []
        puts: list[PendingOp] = []
        with bar("reading the versions", len(targets)) as advance:
            for p in targets:
                held = f.files[p]
                data = _content(j, held)
                change = Change(0, Op.PUT, p, size=held.size, mtime_ns=held.mtime_ns, digest=held.digest)
                puts.append(PendingOp(change, data=data))
                out.append(Restored(p, held, not dry_run))
                advance()
        if not dry_run:
            _write(root, puts)
        return out
    finally:
        j.close()


def _content(j: Journal, held: Held) -> bytes:
    cur = j.cursor(held.seq)
    try:
        c = cur.next_header()
        if c is None or c.seq != held.seq or c.op is not Op.PUT:
            raise JournalError(f"entry {held.seq}: not the put it should be")
        data = b"".join(cur.chunks())
    finally:
        cur.close()
    if len(data) != held.size or digest_bytes(data) != held.digest:
        raise JournalError(f"entry {held.seq}: its content does not match the digest it was journaled with")
    return data


#: Files written per durable group by a restore.
_BATCH = 256


def _write(root: Path, puts: list[PendingOp]) -> None:
    """Write the files as the receiver writes them: the applier's checked paths (no symlink crossed, no
    reserved name), temp files made durable, renamed into place, folders made durable. Refused, before
    anything is written, when a folder stands where a file goes or a file where a folder goes (the
    applier would remove it: restore never deletes live data)."""
    for op in puts:
        parts = op.change.path.split("/")
        for i in range(1, len(parts)):
            above = root.joinpath(*parts[:i])
            if above.is_symlink() or (above.exists() and not above.is_dir()):
                raise ConfigError(
                    f"{op.change.path}: not restored: {'/'.join(parts[:i])} is not a folder now"
                )
        final = root.joinpath(*parts)
        if final.is_dir() and not final.is_symlink():
            raise ConfigError(f"{op.change.path}: not restored: a folder stands there now")
    applier = Applier(root, fsync=True, cache=NoCache())
    try:
        with bar("restoring", len(puts)) as advance:
            for i in range(0, len(puts), _BATCH):
                res = applier.apply_batch(puts[i : i + _BATCH])
                if res.problems:
                    p = res.problems[0]
                    raise ConfigError(f"{p.path}: not restored: {p.reason}")
                for _ in puts[i : i + _BATCH]:
                    advance()
    finally:
        applier.close()


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    first: int
    last: int
    files: int
    bytes: int
    window: Window
    basis: Basis


def plan_replay(
    folder: Path, *, until_ns: int | None = None, until_seq: int | None = None, skip_corrupt: bool = False
) -> ReplayPlan:
    """``standby replay --dry-run``: the entries a replay would apply and what the folder would hold, from
    the newest whole checkpoint at or before the moment if any; the same refusals, and the same damage, as
    the replay itself."""
    if not folder.is_dir():
        raise JournalError(f"{folder}: no journal here")
    j = Journal.open(folder, fsync=False, salvaging=True)
    try:
        cps = usable_checkpoints(folder, j)
        until = None if until_ns is None else UntilTime(until_ns, when(until_ns))
        until_seq = short_of_missing(j, until_seq)
        w = refuse_unanswerable(j, until_seq, until, cps)
        b = basis(j, cps, w, until_seq, until_ns, skip_corrupt)
        f = Follow(known=True)
        if b.base is not None:
            omit = {p for p, _ in b.omit}
            for rel, st in checkpoint.tree_files(b.base.tree):
                if rel not in omit:
                    f.files[rel] = Held(0, st.st_size, b"", st.st_mtime_ns)
        last = b.start - 1
        for c in j.headers(b.start):
            if c.seq > b.end or (until_ns is not None and c.ts_ns > until_ns):
                break
            f.apply(c)
            last = c.seq
        return ReplayPlan(b.start, last, len(f.files), sum(h.size for h in f.files.values()), w, b)
    finally:
        j.close()
