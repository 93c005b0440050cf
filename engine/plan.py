"""Reconciliation planning. Pure: manifests and change headers in, a plan out; no disk, no clock.

The replica as the sender expects it = the receiver's manifest (as of entry ``seq``) with the journal's
entries after ``seq`` laid over it. The plan turns that expectation into the source, through the same
ordered stream: removals first (top-most only: a folder removal takes its contents), then folders
(shallow first), then files to read and ship.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from engine.model import Change, FileMeta, Op, is_under, parent_of

#: Two modification times this close are the same (file systems round them differently).
MTIME_TOLERANCE_NS = 2_000_000


def _drop_tree(m: dict[str, FileMeta], path: str, parents: set[str]) -> None:
    """Remove ``path`` and everything below it. The whole map is looked through only when ``parents``
    (every folder with an entry below it, see _add_parents) says something is below ``path``."""
    m.pop(path, None)
    if path not in parents:
        return
    prefix = path + "/"
    for k in [k for k in m if k.startswith(prefix)]:
        del m[k]
    parents.difference_update([f for f in parents if f == path or f.startswith(prefix)])


def _add_parents(paths: Iterable[str], parents: set[str]) -> None:
    """Add every folder above each of ``paths`` to ``parents``. INVARIANT: a folder in ``parents`` has its
    own folders above it there too (so the walk up stops at the first one known)."""
    for k in paths:
        p = k.rpartition("/")[0]
        while p and p not in parents:
            parents.add(p)
            p = p.rpartition("/")[0]


def expected_after(
    manifest: Mapping[str, FileMeta], changes: Iterable[Change], *, copy: bool = True
) -> dict[str, FileMeta]:
    """The replica after ``changes`` are applied to a replica described by ``manifest``.

    Linear in the manifest plus the changes: a change looks through the whole map only for a path with
    entries below it (a folder deleted, replaced or renamed). Looking through it for every change made a
    reconciliation after a long outage (100,000 files on the replica, 20,000 changes journaled meanwhile)
    take minutes. ``copy=False``: ``manifest`` is a dict the caller gives up, changed in place (a second
    map of 100,000 entries is 5 MB)."""
    m = manifest if not copy and isinstance(manifest, dict) else dict(manifest)
    parents: set[str] | None = None
    for c in changes:
        if parents is None:
            parents = set()
            _add_parents(m, parents)
        if c.op is Op.PUT:
            _drop_tree(m, c.path, parents)
            m[c.path] = FileMeta(c.path, False, c.size, c.mtime_ns, c.digest)
            _add_parents((c.path,), parents)
        elif c.op in (Op.DELETE, Op.RMDIR):
            _drop_tree(m, c.path, parents)
        elif c.op is Op.TOUCH:
            old = m.get(c.path)
            if old is not None and not old.is_dir and old.size == c.size and old.digest == c.digest:
                m[c.path] = FileMeta(c.path, False, c.size, c.mtime_ns, c.digest, old.flags)
        elif c.op is Op.MKDIR:
            if not (c.path in m and m[c.path].is_dir):
                _drop_tree(m, c.path, parents)
                m[c.path] = FileMeta(c.path, True)
                _add_parents((c.path,), parents)
        elif c.op is Op.RENAME:
            if c.path not in m:
                continue
            if c.path in parents:
                moved = {k: v for k, v in m.items() if is_under(k, c.path)}
            else:
                moved = {c.path: m[c.path]}
            _drop_tree(m, c.path, parents)
            _drop_tree(m, c.dst, parents)
            for k, v in moved.items():
                nk = c.dst + k[len(c.path) :]
                m[nk] = FileMeta(nk, v.is_dir, v.size, v.mtime_ns, v.digest, v.flags)
                _add_parents((nk,), parents)
    return m


def same(a: FileMeta, b: FileMeta) -> bool:
    if a.is_dir or b.is_dir:
        return a.is_dir == b.is_dir
    return same_file(a, b.size, b.mtime_ns, b.digest)


def same_file(a: FileMeta, size: int, mtime_ns: int, digest: bytes) -> bool:
    """:func:`same` for ``a`` and a file known by its size, mtime and digest (no entry made for it)."""
    return (
        not a.is_dir
        and a.size == size
        and a.digest == digest
        and abs(a.mtime_ns - mtime_ns) <= MTIME_TOLERANCE_NS
    )


@dataclass(frozen=True)
class Plan:
    removals: list[tuple[Op, str]] = field(default_factory=list)  # (DELETE | RMDIR, path)
    mkdirs: list[str] = field(default_factory=list)
    puts: list[str] = field(default_factory=list)
    replica_files: int = 0
    files_removed: int = 0

    @property
    def empty(self) -> bool:
        return not (self.removals or self.mkdirs or self.puts)

    def summary(self) -> str:
        return (
            f"puts={len(self.puts)} removals={len(self.removals)} mkdirs={len(self.mkdirs)} "
            f"files_removed={self.files_removed}/{self.replica_files}"
        )


def diff(
    source: Mapping[str, FileMeta],
    replica: Mapping[str, FileMeta],
    include: Sequence[str],
    exclude: frozenset[str] | set[str] = frozenset(),
    exclude_under: Sequence[str] = (),
) -> Plan:
    """What to send so that ``replica`` becomes ``source``. Paths in ``exclude`` (changing right now)
    are left to the watcher. Only paths inside the include set are ever removed."""
    removals: list[tuple[Op, str]] = []
    # Sets, looked up for a path and each folder above it: a long list of late paths or removed folders
    # must not cost its length for every candidate.
    removed_dirs: set[str] = set()
    unlisted = set(exclude_under)
    files_removed = 0
    for path in sorted(replica):
        r = replica[path]
        s = source.get(path)
        if s is not None and s.is_dir == r.is_dir:
            continue
        if path in exclude or not any(is_under(path, inc) for inc in include):
            continue
        if _at_or_below(path, unlisted):
            continue  # below a folder the scan could not list: absent from the scan is not absent
        if _at_or_below(parent_of(path), removed_dirs):
            if not r.is_dir:
                files_removed += 1
            continue
        if r.is_dir:
            removals.append((Op.RMDIR, path))
            removed_dirs.add(path)
        else:
            removals.append((Op.DELETE, path))
            files_removed += 1
    mkdirs: list[str] = []
    puts: list[str] = []
    for path in sorted(source, key=lambda p: (p.count("/"), p)):
        s = source[path]
        if path in exclude:
            continue
        rm = replica.get(path)
        if s.is_dir:
            if rm is None or not rm.is_dir:
                mkdirs.append(path)
        elif rm is None or not same(s, rm):
            puts.append(path)
    return Plan(removals, mkdirs, puts, sum(1 for r in replica.values() if not r.is_dir), files_removed)


def _at_or_below(path: str, folders: set[str]) -> bool:
    """``path`` or a folder above it is in ``folders``."""
    while path:
        if path in folders:
            return True
        path = parent_of(path)
    return False


def mass_delete(plan: Plan, max_share: float) -> str | None:
    """Why the plan looks like a wipe, or None. Small replicas (< 4 files) are never judged."""
    if plan.replica_files < 4 or plan.files_removed == 0:
        return None
    share = plan.files_removed / plan.replica_files
    if share > max_share:
        return (
            f"reconciliation would delete {plan.files_removed} of {plan.replica_files} files on the "
            f"replica ({share:.0%} > max_delete_share {max_share:.0%})"
        )
    return None


# ---- live deletions --------------------------------------------------------------------------------------
#: A burst of live deletions is looked at DELETE_QUIET after its first one. If it is small by then (fewer
#: than small_burst() files: ordinary churn, one meeting at a time) it is judged at once; else it is a mass
#: deletion, held until the deletions have slowed down to churn again (fewer than small_burst() within
#: the last DELETE_QUIET: a long ``rm -rf`` is judged when it has finished) or DELETE_MAX_HOLD has passed,
#: and judged whole.
DELETE_QUIET = 0.25
DELETE_MAX_HOLD = 10.0
#: The share rule compares with the most files the replica held within this many seconds.
DELETE_WINDOW = 60.0
#: An include folder emptied by at least this many deletions is a wipe (fewer: a tiny tree, not judged).
MIN_JUDGED = 4
#: The share rule needs at least this many files lost: a small tree's ordinary churn (a few dozen meetings
#: booked and deleted) swings by half without being a wipe; emptying or removing it is still caught.
SHARE_MIN_FILES = 100


def small_burst(replica_files: int) -> int:
    """Fewer file deletions than this within DELETE_QUIET are ordinary churn, judged without waiting."""
    return max(32, replica_files // 100)


def deletion_release_at(now: float, first: float, count: int, lately: int, small: int) -> float:
    """When a burst of ``count`` deletions, the first seen at ``first`` and ``lately`` of them within the
    last DELETE_QUIET, is judged (a time at or before ``now``: judge it now)."""
    if count < small:
        return first + DELETE_QUIET
    if lately < small:  # slowed down to churn again (or stopped)
        return first + DELETE_QUIET
    return min(now + DELETE_QUIET / 5, first + DELETE_MAX_HOLD)


@dataclass(frozen=True, slots=True)
class DeletionFacts:
    """What the sender found on the source when it judged a burst of deletions (gathered by I/O)."""

    root_present: bool
    #: Include items that are folders on the replica and are gone from the source.
    vanished: tuple[str, ...] = ()
    #: Include folders still there but holding no file, with how many file deletions emptied them.
    emptied: tuple[tuple[str, int], ...] = ()
    files_deleted: int = 0  # file deletions in this burst
    replica_files: int = 0  # files the replica holds now (as the sender knows it)
    peak_files: int = 0  # the most it held within DELETE_WINDOW


def deletion_verdict(f: DeletionFacts, max_share: float) -> str | None:
    """Why a burst of live deletions looks like a wipe (then none of it is journaled), or None.

    The rules, judged on the burst as a whole before any of it is journaled: the source root is gone;
    an include folder is gone or was emptied; or the replica would hold less than ``1 - max_share`` of
    the most files it held within DELETE_WINDOW seconds (so several bursts in a row count together, and
    churn that deletes and creates as much is no wipe). Fewer than SHARE_MIN_FILES files lost are not
    judged by share."""
    if not f.root_present:
        return "the source root vanished or moved away; refusing to propagate the wipe"
    if f.vanished:
        return (
            f"the replicated folder {f.vanished[0]!r} vanished on the source; refusing to remove it (or "
            "anything in it) on the replica"
        )
    for inc, n in f.emptied:
        if n >= MIN_JUDGED:
            return f"the replicated folder {inc!r} was emptied on the source ({n} files deleted)"
    peak = max(f.peak_files, f.replica_files)
    lost = peak - (f.replica_files - f.files_deleted)
    if peak > 0 and lost >= SHARE_MIN_FILES and lost / peak > max_share:
        return (
            f"the replica would lose {lost} of its {peak} files within {DELETE_WINDOW:g} s "
            f"({lost / peak:.0%} > max_delete_share {max_share:.0%})"
        )
    return None
