"""Reconciliation planning (pure): expected replica = manifest + journal tail; diff; mass-delete verdict."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.digest import digest_bytes
from engine.model import Change, FileMeta, Op
from engine.plan import Plan, diff, expected_after, mass_delete

INC = ("databases", "config/config.json")


def f(path: str, content: bytes = b"x", mtime: int = 1_000_000_000) -> FileMeta:
    return FileMeta(path, False, len(content), mtime, digest_bytes(content))


def d(path: str) -> FileMeta:
    return FileMeta(path, True)


def m(*metas: FileMeta) -> dict[str, FileMeta]:
    return {x.path: x for x in metas}


def test_identical_trees_need_nothing() -> None:
    t = m(d("databases"), d("databases/r"), f("databases/r/a"), f("config/config.json"))
    assert diff(t, t, INC).empty


def test_missing_changed_and_extra_files() -> None:
    src = m(d("databases"), f("databases/a", b"new"), f("databases/b"))
    rep = m(d("databases"), f("databases/a", b"old"), f("databases/c"))
    p = diff(src, rep, INC)
    assert p.puts == ["databases/a", "databases/b"]
    assert p.removals == [(Op.DELETE, "databases/c")]
    assert p.files_removed == 1 and p.replica_files == 2


def test_mtime_only_difference_is_resent_but_tolerance_applies() -> None:
    src = m(f("databases/a", mtime=5_000_000_000))
    assert diff(src, m(f("databases/a", mtime=5_001_000_000)), INC).empty
    assert diff(src, m(f("databases/a", mtime=6_000_000_000)), INC).puts == ["databases/a"]


def test_extra_folder_is_removed_once_at_the_top() -> None:
    src = m(d("databases"))
    rep = m(d("databases"), d("databases/old"), d("databases/old/x"))
    rep |= m(f("databases/old/x/1"), f("databases/old/2"))
    p = diff(src, rep, INC)
    assert p.removals == [(Op.RMDIR, "databases/old")]
    assert p.files_removed == 2


def test_type_conflicts_remove_then_create() -> None:
    src = m(d("databases"), f("databases/x"), d("databases/y"))
    rep = m(d("databases"), d("databases/x"), f("databases/x/inner"), f("databases/y"))
    p = diff(src, rep, INC)
    assert (Op.RMDIR, "databases/x") in p.removals and (Op.DELETE, "databases/y") in p.removals
    assert p.mkdirs == ["databases/y"] and p.puts == ["databases/x"]


def test_paths_outside_the_include_set_are_never_removed() -> None:
    rep = m(d("logs"), f("logs/today.log"), f("config/other.json"))
    assert diff({}, rep, INC).removals == []


def test_excluded_paths_are_left_to_the_watcher() -> None:
    src = m(f("databases/a", b"new"))
    rep = m(f("databases/a", b"old"), f("databases/gone"))
    p = diff(src, rep, INC, exclude={"databases/a", "databases/gone"})
    assert p.empty


def test_folders_are_created_shallow_first() -> None:
    src = m(d("databases/a/b/c"), d("databases/a"), d("databases/a/b"))
    assert diff(src, {}, INC).mkdirs == ["databases/a", "databases/a/b", "databases/a/b/c"]


def test_expected_after_lays_the_journal_tail_over_the_manifest() -> None:
    man = m(d("databases"), d("databases/r"), f("databases/r/a", b"1"), f("databases/r/b", b"2"))
    h = digest_bytes(b"3")
    tail = [
        Change(10, Op.PUT, "databases/r/a", size=1, mtime_ns=7, digest=h),
        Change(11, Op.RENAME, "databases/r", dst="databases/s"),
        Change(12, Op.DELETE, "databases/s/b"),
        Change(13, Op.MKDIR, "databases/t"),
        Change(14, Op.RENAME, "databases/missing", dst="databases/u"),
    ]
    exp = expected_after(man, tail)
    assert set(exp) == {"databases", "databases/s", "databases/s/a", "databases/t"}
    assert exp["databases/s/a"].digest == h and exp["databases/t"].is_dir


def test_expected_after_rmdir_and_put_over_folder() -> None:
    man = m(d("databases/x"), f("databases/x/1"))
    exp = expected_after(man, [Change(1, Op.PUT, "databases/x", size=1, digest=digest_bytes(b"z"))])
    assert set(exp) == {"databases/x"} and not exp["databases/x"].is_dir
    assert expected_after(man, [Change(1, Op.RMDIR, "databases/x")]) == {}


def test_mass_delete_verdict() -> None:
    assert mass_delete(Plan(replica_files=10, files_removed=5), 0.5) is None
    why = mass_delete(Plan(replica_files=10, files_removed=6), 0.5)
    assert why is not None and "6 of 10" in why and "max_delete_share" in why
    assert mass_delete(Plan(replica_files=3, files_removed=3), 0.5) is None  # tiny replicas are not judged


def test_the_example_config_loads() -> None:
    from pathlib import Path

    from engine.config import load

    cfg = load(Path(__file__).resolve().parent.parent / "config.example.toml")
    assert cfg.sender is not None and cfg.receiver is not None and len(cfg.guards) == 2
    assert cfg.sender.include == ("databases", "config/config.json")


def test_a_touch_changes_the_expected_time_of_the_content_it_names_only() -> None:
    a, b = f("databases/a", b"1", 10), f("databases/b", b"2", 10)
    touch_a = Change(5, Op.TOUCH, "databases/a", size=1, mtime_ns=99, digest=digest_bytes(b"1"))
    touch_b = Change(6, Op.TOUCH, "databases/b", size=1, mtime_ns=99, digest=digest_bytes(b"x"))
    touch_c = Change(7, Op.TOUCH, "databases/c", size=1, mtime_ns=99, digest=digest_bytes(b"c"))
    got = expected_after(m(a, b), [touch_a, touch_b, touch_c])
    assert got["databases/a"].mtime_ns == 99
    assert got["databases/b"].mtime_ns == 10  # stale on the replica: it keeps its time
    assert "databases/c" not in got


# ---- expected_after against the plain definition -------------------------------------------------------
def _reference_expected_after(manifest: dict[str, FileMeta], changes: list[Change]) -> dict[str, FileMeta]:
    """The definition, looking through the whole map for every change (what expected_after did before it
    kept an index of folders)."""

    def drop(m: dict[str, FileMeta], path: str) -> None:
        m.pop(path, None)
        for k in [k for k in m if k.startswith(path + "/")]:
            del m[k]

    m = dict(manifest)
    for c in changes:
        if c.op is Op.PUT:
            drop(m, c.path)
            m[c.path] = FileMeta(c.path, False, c.size, c.mtime_ns, c.digest)
        elif c.op in (Op.DELETE, Op.RMDIR):
            drop(m, c.path)
        elif c.op is Op.TOUCH:
            old = m.get(c.path)
            if old is not None and not old.is_dir and old.size == c.size and old.digest == c.digest:
                m[c.path] = FileMeta(c.path, False, c.size, c.mtime_ns, c.digest, old.flags)
        elif c.op is Op.MKDIR:
            if not (c.path in m and m[c.path].is_dir):
                drop(m, c.path)
                m[c.path] = FileMeta(c.path, True)
        elif c.op is Op.RENAME:
            if c.path not in m:
                continue
            moved = {k: v for k, v in m.items() if k == c.path or k.startswith(c.path + "/")}
            drop(m, c.path)
            drop(m, c.dst)
            for k, v in moved.items():
                nk = c.dst + k[len(c.path) :]
                m[nk] = FileMeta(nk, v.is_dir, v.size, v.mtime_ns, v.digest, v.flags)
    return m


# Names that are prefixes of one another ("a", "ab", "a.b", "a-"): a prefix test without its slash would show.
_TREE_PATH = st.lists(st.sampled_from(["a", "ab", "a.b", "a-", "b", "c"]), min_size=1, max_size=4).map(
    "/".join
)
_ENTRY = st.builds(
    lambda p, d, n: FileMeta(p, d, 0 if d else n, n, b"" if d else bytes([n]) * 16),
    _TREE_PATH,
    st.booleans(),
    st.integers(0, 3),
)
_CHANGE = st.builds(
    lambda op, p, dst, n: Change(
        0, op, p, dst=dst if op is Op.RENAME else "", size=n, mtime_ns=n, digest=bytes([n]) * 16
    ),
    st.sampled_from([Op.PUT, Op.DELETE, Op.RMDIR, Op.TOUCH, Op.MKDIR, Op.RENAME]),
    _TREE_PATH,
    _TREE_PATH,
    st.integers(0, 3),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(_ENTRY, max_size=25), st.lists(_CHANGE, max_size=12))
def test_property_expected_after_is_the_definition(entries: list[FileMeta], changes: list[Change]) -> None:
    manifest = {e.path: e for e in entries}  # folders and files, some without their folders listed
    assert expected_after(manifest, changes) == _reference_expected_after(manifest, changes)


def _reference_diff(
    source: dict[str, FileMeta],
    replica: dict[str, FileMeta],
    include: tuple[str, ...],
    exclude: set[str],
    exclude_under: list[str],
) -> Plan:
    """diff's removals as first written: every candidate against every listed folder."""

    def under(path: str, folder: str) -> bool:
        return path == folder or path.startswith(folder + "/")

    removals: list[tuple[Op, str]] = []
    removed_dirs: list[str] = []
    files_removed = 0
    for path in sorted(replica):
        r, s = replica[path], source.get(path)
        if s is not None and s.is_dir == r.is_dir:
            continue
        if path in exclude or not any(under(path, inc) for inc in include):
            continue
        if any(under(path, d) for d in exclude_under):
            continue
        if any(under(path, d) and d != path for d in removed_dirs):
            files_removed += 0 if r.is_dir else 1
            continue
        if r.is_dir:
            removals.append((Op.RMDIR, path))
            removed_dirs.append(path)
        else:
            removals.append((Op.DELETE, path))
            files_removed += 1
    return Plan(
        removals, replica_files=sum(1 for r in replica.values() if not r.is_dir), files_removed=files_removed
    )


@settings(max_examples=500, deadline=None)
@given(
    st.lists(_ENTRY, max_size=20),
    st.lists(_ENTRY, max_size=20),
    st.sets(_TREE_PATH, max_size=3),
    st.lists(_TREE_PATH, max_size=3),
)
def test_property_diff_removes_what_the_definition_removes(
    source_entries: list[FileMeta], replica_entries: list[FileMeta], exclude: set[str], unlisted: list[str]
) -> None:
    source = {e.path: e for e in source_entries}
    replica = {e.path: e for e in replica_entries}
    include = ("a", "b/c")
    got = diff(source, replica, include, exclude, unlisted)
    want = _reference_diff(source, replica, include, exclude, unlisted)
    assert (got.removals, got.files_removed, got.replica_files) == (
        want.removals,
        want.files_removed,
        want.replica_files,
    )
