"""One contract for every target: the same tests run against a local folder and against an SMB share on a
real Samba server (``tests/samba.py``; skipped without Samba, a failure under CI=true).

Each test gets a fresh folder and sees what the target wrote through the local disk (``view``): for the
share, the folder smbd serves. Times are compared at the target's own resolution.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from engine.apply import Applier, PendingOp
from engine.config import parse_share
from engine.digest import digest_bytes
from engine.errors import ApplyError, PathRejected
from engine.model import TEMP_MARKER, Change, Op
from engine.scan import HashCache, Manifest, iter_manifest
from engine.targets import Kind, Target, link_on_way
from engine.targets.local import LocalTarget
from tests.pair import temp_files
from tests.samba import SambaServer, running_samba

MTIME = 1_700_000_000_123_456_789


@dataclass
class Case:
    target: Target
    view: Path  # what the target writes, on the local disk
    kind: str
    appliers: list[Applier] = field(default_factory=list)

    def applier(self, threads: int = 4) -> Applier:
        a = Applier(self.target, threads=threads)
        self.appliers.append(a)
        return a

    def at_resolution(self, ns: int) -> int:
        step = self.target.caps.mtime_resolution_ns
        return ns - ns % step


@pytest.fixture(scope="module")
def samba(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SambaServer]:
    # As the README asks of a share standby writes to: Samba itself never follows a symlink in it.
    with running_samba(tmp_path_factory.mktemp("samba"), share_options={"follow symlinks": "no"}) as srv:
        yield srv


@pytest.fixture(params=["local", "smb"])
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Case]:
    if request.param == "local":
        view = tmp_path / "replica"
        view.mkdir()
        t: Target = LocalTarget(view)
    else:
        srv: SambaServer = request.getfixturevalue("samba")
        sub = f"t-{uuid.uuid4().hex[:8]}"
        t = open_smb(srv, sub)
        view = srv.path / sub
        t.clean_temps()  # connects and makes the folder, as a receiver's start does
    c = Case(t, view, request.param)
    try:
        yield c
    finally:
        for a in c.appliers:
            a.close()  # closes the target too
        t.close()


def open_smb(srv: SambaServer, sub: str, timeout: float = 10.0) -> Target:
    from engine.targets.smb import SmbTarget

    return SmbTarget(parse_share(srv.url(sub), "target"), srv.user, srv.password, timeout=timeout)


def put(seq: int, path: str, data: bytes, mtime: int = MTIME) -> PendingOp:
    return PendingOp(
        Change(seq, Op.PUT, path, size=len(data), mtime_ns=mtime, digest=digest_bytes(data)), data=data
    )


def rec(seq: int, kind: Op, path: str, dst: str = "") -> PendingOp:
    return PendingOp(Change(seq, kind, path, dst=dst))


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# -- the interface -------------------------------------------------------------------------------------------
def test_a_temp_placed_over_a_file_replaces_it_whole_with_its_mtime(case: Case) -> None:
    t = case.target
    t.makedirs("databases/a")
    t.write_temp(f"databases/a/.{TEMP_MARKER}1", b"old", MTIME, durable=True)
    t.place(f"databases/a/.{TEMP_MARKER}1", "databases/a/m.json")
    t.write_temp(f"databases/a/.{TEMP_MARKER}2", b"new content", MTIME + 1000, durable=True)
    t.sync_folders(["databases/a"])
    assert (case.view / "databases/a/m.json").read_bytes() == b"old"  # not yet placed
    t.place(f"databases/a/.{TEMP_MARKER}2", "databases/a/m.json")
    assert files(case.view) == {"databases/a/m.json": b"new content"}
    st = t.stat("databases/a/m.json")
    assert st is not None and st.kind is Kind.FILE and st.size == 11
    assert st.mtime_ns == case.at_resolution(MTIME + 1000)
    assert (case.view / "databases/a/m.json").stat().st_mtime_ns == case.at_resolution(MTIME + 1000)


def test_stat_tells_files_folders_and_nothing_apart(case: Case) -> None:
    t = case.target
    t.makedirs("a/b")
    (case.view / "a/f").write_bytes(b"x" * 5)
    assert t.stat("nope") is None
    assert t.stat("nope/deeper") is None
    assert t.stat("a/f/under-a-file") is None
    d, f = t.stat("a/b"), t.stat("a/f")
    assert d is not None and d.kind is Kind.DIR
    assert f is not None and f.kind is Kind.FILE and f.size == 5
    root = t.stat("")
    assert root is not None and root.kind is Kind.DIR


def test_a_streamed_put_is_read_back_whole_and_an_aborted_one_leaves_nothing(case: Case) -> None:
    t = case.target
    data = os.urandom(3 * 1024 * 1024 + 17)
    p = t.begin_put(f".{TEMP_MARKER}big")
    for k in range(0, len(data), 256 * 1024):
        p.write(data[k : k + 256 * 1024])
    p.seal(MTIME, durable=True)
    t.place(f".{TEMP_MARKER}big", "big.bin")
    assert b"".join(t.read_chunks("big.bin")) == data
    q = t.begin_put(f".{TEMP_MARKER}gone")
    q.write(b"half")
    q.abort()
    assert files(case.view) == {"big.bin": data}


def test_remove_takes_a_whole_tree_and_rename_moves_one(case: Case) -> None:
    t = case.target
    for rel in ("d/x/1", "d/x/y/2", "d/3"):
        (case.view / rel).parent.mkdir(parents=True, exist_ok=True)
        (case.view / rel).write_bytes(rel.encode())
    t.rename("d/x", "e")
    assert files(case.view) == {"e/1": b"d/x/1", "e/y/2": b"d/x/y/2", "d/3": b"d/3"}
    t.remove("e")
    t.remove("d/3")
    assert files(case.view) == {} and (case.view / "d").is_dir() and not (case.view / "e").exists()
    t.unlink_quiet("d/never-there")
    t.mkdir("d/new")
    assert (case.view / "d/new").is_dir()


def test_set_mtime_changes_only_the_time(case: Case) -> None:
    t = case.target
    (case.view / "f").write_bytes(b"abc")
    t.set_mtime("f", MTIME, durable=True)
    assert (case.view / "f").read_bytes() == b"abc"
    assert (case.view / "f").stat().st_mtime_ns == case.at_resolution(MTIME)


def test_clean_temps_removes_temporary_files_anywhere_and_nothing_else(case: Case) -> None:
    for rel in (f"a/.{TEMP_MARKER}x", f"a/b/.{TEMP_MARKER}y", f".{TEMP_MARKER}z", "a/keep", "a/b/keep"):
        (case.view / rel).parent.mkdir(parents=True, exist_ok=True)
        (case.view / rel).write_bytes(b"t")
    assert case.target.clean_temps() == 3
    assert sorted(files(case.view)) == ["a/b/keep", "a/keep"]


def test_the_manifest_matches_a_walk_of_the_disk_and_uses_the_hash_cache(case: Case) -> None:
    for i in range(30):
        p = case.view / f"databases/r{i % 4}/m{i}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(i * 7))
    (case.view / "config").mkdir()
    (case.view / "config/config.json").write_bytes(b"{}")
    (case.view / f"databases/.{TEMP_MARKER}q").write_bytes(b"skip me")
    include = ["databases", "config/config.json"]
    cache = HashCache()
    got = {m.path: m for m in case.target.manifest(include, cache, Manifest({}, [], []))}
    want = {m.path: m for m in iter_manifest(case.view, include, HashCache(), Manifest({}, [], []))}
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        g = got[k]
        assert (g.is_dir, g.size, g.digest) == (w.is_dir, w.size, w.digest), k
        assert abs(g.mtime_ns - w.mtime_ns) < case.target.caps.mtime_resolution_ns, k
    # A second walk finds every digest in the cache: no file is read again.
    again = {
        m.path: m for m in case.target.manifest(include, cache, Manifest({}, [], []), need_digest=_never)
    }
    assert {k: m.digest for k, m in again.items()} == {k: m.digest for k, m in got.items()}


def _never(path: str) -> bool:
    raise AssertionError(f"{path} was read again: its digest was not found in the hash cache")


# -- the applier through the target ------------------------------------------------------------------------
def test_the_applier_lands_a_group_whole_in_order_with_nothing_left_behind(case: Case) -> None:
    a = case.applier(4)
    want = {f"databases/room-{i % 5}/m{i:03d}.json": os.urandom(i * 11) for i in range(60)}
    ops = [put(i + 1, p, d) for i, (p, d) in enumerate(want.items())]
    ops += [
        rec(100, Op.RENAME, "databases/room-1", "databases/moved"),
        rec(101, Op.DELETE, "databases/room-2/m002.json"),
        rec(102, Op.MKDIR, "databases/empty"),
        put(103, "databases/moved/m001.json", b"rewritten after the move"),
    ]
    res = a.apply_batch(ops)
    assert res.problems == [] and res.applied == len(ops)
    for rel in [k for k in want if k.startswith("databases/room-1/")]:
        want[rel.replace("room-1", "moved")] = want.pop(rel)
    del want["databases/room-2/m002.json"]
    want["databases/moved/m001.json"] = b"rewritten after the move"
    assert files(case.view) == want
    assert (case.view / "databases/empty").is_dir()
    assert not temp_files(case.view)
    for rel, data in want.items():
        st = case.target.stat(rel)
        assert st is not None and a.cache.get(rel, st.key) == digest_bytes(data), rel
    # A replayed group changes nothing (every record is idempotent).
    a.apply_batch(ops[:60])  # the puts again: the same content lands again
    res = a.apply_batch(ops[60:])
    assert res.problems == [] or all(p.code == "missing-source" for p in res.problems)
    assert files(case.view) == want


def test_a_touch_sets_the_time_only_of_the_content_it_names(case: Case) -> None:
    a = case.applier(2)
    a.apply_batch([put(1, "f.json", b"v1")])
    c = Change(2, Op.TOUCH, "f.json", size=2, mtime_ns=MTIME + 5_000_000_000, digest=digest_bytes(b"v1"))
    stale = Change(3, Op.TOUCH, "f.json", size=2, mtime_ns=MTIME, digest=digest_bytes(b"v2"))
    res = a.apply_batch([PendingOp(c), PendingOp(stale)])
    assert [p.code for p in res.problems] == ["stale"]
    assert (case.view / "f.json").stat().st_mtime_ns == case.at_resolution(MTIME + 5_000_000_000)


def test_a_file_where_a_folder_must_be_and_a_folder_where_a_file_goes_are_replaced(case: Case) -> None:
    a = case.applier(2)
    (case.view / "databases").mkdir()
    (case.view / "databases/room").write_bytes(b"a file where a folder must be")
    (case.view / "databases/x.json/inner").mkdir(parents=True)
    res = a.apply_batch([put(1, "databases/room/m.json", b"m"), put(2, "databases/x.json", b"file now")])
    assert res.problems == []
    assert files(case.view) == {"databases/room/m.json": b"m", "databases/x.json": b"file now"}


def test_a_folder_in_the_way_of_one_put_of_a_group_is_removed_and_the_rest_land(case: Case) -> None:
    a = case.applier(4)
    (case.view / "databases/x.json/inner").mkdir(parents=True)
    (case.view / "databases/x.json/inner/old").write_bytes(b"old")
    group = [put(i + 1, f"databases/m{i}.json", b"m%d" % i) for i in range(10)]
    group.insert(5, put(50, "databases/x.json", b"file now"))
    res = a.apply_batch(group)
    assert res.problems == [] and res.applied == 11
    want = {f"databases/m{i}.json": b"m%d" % i for i in range(10)}
    want["databases/x.json"] = b"file now"
    assert files(case.view) == want
    assert not temp_files(case.view)


@pytest.mark.parametrize("name", ["PROGRA~1", "MVNQDZ~Z", "AB12CD~1.JSO"])
def test_a_name_shaped_like_an_8_3_alias_is_refused_and_nothing_is_written(case: Case, name: str) -> None:
    a = case.applier(2)
    a.apply_batch([put(1, "databases/a-long-file-name.json", b"keep me")])
    res = a.apply_batch([put(2, f"databases/{name}", b"overwrite?")])
    assert [p.code for p in res.problems] == ["refused"]
    assert files(case.view) == {"databases/a-long-file-name.json": b"keep me"}


@pytest.mark.parametrize(
    "path",
    ["../escape.json", "databases/../../escape.json", "/etc/escape.json", "C:/escape.json", "a\\..\\escape",
     "databases/CON", "databases/x.json.", "\\\\server\\share\\x", "databases/a:stream"],
)  # fmt: skip
def test_a_hostile_path_from_the_wire_is_refused_and_nothing_is_written(case: Case, path: str) -> None:
    a = case.applier(2)
    before = sorted(p.name for p in case.view.parent.iterdir())
    res = a.apply_batch([put(1, path, b"x"), rec(2, Op.DELETE, path), rec(3, Op.RENAME, "databases", path)])
    assert [p.code for p in res.problems] == ["refused"] * 3
    assert files(case.view) == {}
    assert sorted(p.name for p in case.view.parent.iterdir()) == before


def test_a_path_through_a_symlink_is_refused(case: Case, tmp_path: Path) -> None:
    """Locally the link is seen (a symlink or junction) and the record refused. A Samba share with
    ``follow symlinks = no`` hides the link: the record fails instead. Either way nothing outside the
    replica is written or removed."""
    outside = tmp_path / "outside" if case.kind == "local" else case.view.parent / f"outside-{case.view.name}"
    outside.mkdir()
    (outside / "precious").write_bytes(b"keep")
    os.symlink(outside, case.view / "link")
    a = case.applier(2)
    if case.kind == "local":
        st = case.target.stat("link")
        assert st is not None and st.kind is Kind.LINK
        assert link_on_way(case.target, "link/f") == "link"
        res = a.apply_batch([put(1, "link/f", b"x"), rec(2, Op.DELETE, "link/precious")])
        assert [p.code for p in res.problems] == ["refused", "refused"]
        with pytest.raises(PathRejected):
            a.resolve("link/f")
    else:
        assert case.target.stat("link") is None  # hidden by the server
        for group in ([put(1, "link/f", b"x")], [rec(2, Op.DELETE, "link/precious")]):
            try:
                a.apply_batch(group)
            except ApplyError:
                pass
    assert sorted(p.name for p in outside.iterdir()) == ["precious"]
    assert (outside / "precious").read_bytes() == b"keep"


def test_capabilities_say_what_differs(case: Case) -> None:
    caps = case.target.caps
    if case.kind == "smb":
        assert not caps.group_sync and caps.case_insensitive and caps.filetime and caps.short_names
        assert caps.mtime_resolution_ns == 100
        assert case.target.label.startswith("smb://") and "Standby-test" not in case.target.label
    else:
        assert case.target.label == str(case.view)


def test_groups_that_turn_files_and_folders_around_apply_alike_on_every_target(case: Case) -> None:
    """A folder that becomes a file in the same group (its folder entry is then no folder to make
    durable), and a file in the way of a folder while a large put is being streamed: both apply, the
    second without losing the large put's temporary file."""
    a = case.applier(2)
    assert a.apply_batch([put(1, "d/f", b"f")]).problems == []
    group = [put(2, "d/g", b"g"), rec(3, Op.DELETE, "d"), put(4, "d", b"now a file")]
    assert a.apply_batch(group).problems == []
    assert files(case.view) == {"d": b"now a file"}
    data = os.urandom(3 << 20)
    c = Change(5, Op.PUT, "big.bin", size=len(data), mtime_ns=MTIME, digest=digest_bytes(data))
    large = a.begin_large(c)
    for k in range(0, len(data), 1 << 20):
        large.write(data[k : k + (1 << 20)])
    assert large.finish() is None
    res = a.apply_batch([PendingOp(c, temp=large.temp), rec(6, Op.DELETE, "d"), put(7, "d/x", b"x")])
    assert res.problems == []
    assert files(case.view) == {"big.bin": data, "d/x": b"x"}
    assert not temp_files(case.view)
