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


def _drop_tree(m: dict[str, FileMeta], path: str) -> None:
    m.pop(path, None)
    prefix = path + "/"
    for k in [k for k in m if k.startswith(prefix)]:
        del m[k]


def expected_after(manifest: Mapping[str, FileMeta], changes: Iterable[Change]) -> dict[str, FileMeta]:
    """The replica after ``changes`` are applied to a replica described by ``manifest``."""
    m = dict(manifest)
    for c in changes:
        if c.op is Op.PUT:
            _drop_tree(m, c.path)
            m[c.path] = FileMeta(c.path, False, c.size, c.mtime_ns, c.digest)
        elif c.op in (Op.DELETE, Op.RMDIR):
            _drop_tree(m, c.path)
        elif c.op is Op.MKDIR:
            if not (c.path in m and m[c.path].is_dir):
                _drop_tree(m, c.path)
                m[c.path] = FileMeta(c.path, True)
        elif c.op is Op.RENAME:
            if c.path not in m:
                continue
            moved = {k: v for k, v in m.items() if is_under(k, c.path)}
            _drop_tree(m, c.path)
            _drop_tree(m, c.dst)
            for k, v in moved.items():
                nk = c.dst + k[len(c.path) :]
                m[nk] = FileMeta(nk, v.is_dir, v.size, v.mtime_ns, v.digest, v.flags)
    return m


def same(a: FileMeta, b: FileMeta) -> bool:
    if a.is_dir or b.is_dir:
        return a.is_dir == b.is_dir
    return a.size == b.size and a.digest == b.digest and abs(a.mtime_ns - b.mtime_ns) <= MTIME_TOLERANCE_NS


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
    removed_dirs: list[str] = []
    files_removed = 0
    for path in sorted(replica):
        r = replica[path]
        s = source.get(path)
        if s is not None and s.is_dir == r.is_dir:
            continue
        if path in exclude or not any(is_under(path, inc) for inc in include):
            continue
        if any(is_under(path, d) for d in exclude_under):
            continue  # below a folder the scan could not list: absent from the scan is not absent
        if any(is_under(path, d) for d in _ancestors_in(path, removed_dirs)):
            if not r.is_dir:
                files_removed += 1
            continue
        if r.is_dir:
            removals.append((Op.RMDIR, path))
            removed_dirs.append(path)
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


def _ancestors_in(path: str, removed: list[str]) -> list[str]:
    out = []
    p = parent_of(path)
    while p:
        if p in removed:
            out.append(p)
        p = parent_of(p)
    return out


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
