"""The applier on real files: group commit, record order, odd trees, refusals, and nothing left behind."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.apply import WINDOWS_MIN_MTIME_NS, Applier, PendingOp, settable_mtime_ns
from engine.digest import digest_bytes
from engine.errors import ApplyError
from engine.model import INT64_MAX, Change, Op
from engine.scan import build_manifest, stat_key
from tests.pair import temp_files

MTIME = 1_700_000_000_123_456_789


def files(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` (relative POSIX path -> content)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def applier(tmp_path: Path) -> Iterator[Applier]:
    root = tmp_path / "replica"
    root.mkdir()
    a = Applier(root, threads=4)
    yield a
    a.close()


def put(seq: int, path: str, data: bytes, digest: bytes | None = None) -> PendingOp:
    d = digest_bytes(data) if digest is None else digest
    return PendingOp(Change(seq, Op.PUT, path, size=len(data), mtime_ns=MTIME, digest=d), data=data)


def op(seq: int, kind: Op, path: str, dst: str = "") -> PendingOp:
    return PendingOp(Change(seq, kind, path, dst=dst))


def test_a_group_of_puts_lands_whole_with_its_mtimes_and_no_temp_files(applier: Applier) -> None:
    want = {f"databases/room-{i % 7}/m{i:03d}.json": os.urandom(i * 13) for i in range(200)}
    res = applier.apply_batch([put(i + 1, p, d) for i, (p, d) in enumerate(want.items())])
    assert res.problems == [] and res.applied == 200
    assert files(applier.root) == want
    assert not temp_files(applier.root)
    for p in want:
        st = os.stat(applier.root / p)
        assert st.st_mtime_ns == MTIME
        assert applier.cache.get(p, stat_key(applier.root / p, st)) == digest_bytes(want[p])


def test_applying_a_group_twice_gives_the_same_tree(applier: Applier) -> None:
    group = [
        put(1, "databases/a/x.json", b"x1"),
        op(2, Op.RENAME, "databases/a/x.json", "databases/b/y.json"),
        put(3, "databases/a/x.json", b"x2"),
        op(4, Op.MKDIR, "databases/c"),
        op(5, Op.DELETE, "databases/missing.json"),
    ]
    applier.apply_batch(group)
    first = files(applier.root)
    applier.apply_batch(group)
    assert files(applier.root) == first == {"databases/a/x.json": b"x2", "databases/b/y.json": b"x1"}
    assert (applier.root / "databases/c").is_dir()


def test_a_put_replaces_a_folder_standing_at_its_path(applier: Applier) -> None:
    (applier.root / "databases/x.json/inner").mkdir(parents=True)
    (applier.root / "databases/x.json/inner/f").write_bytes(b"old")
    res = applier.apply_batch([put(1, "databases/x.json", b"file now")])
    assert res.problems == []
    assert (applier.root / "databases/x.json").read_bytes() == b"file now"
    assert not temp_files(applier.root)


def test_a_put_below_a_file_replaces_the_file_with_a_folder(applier: Applier) -> None:
    (applier.root / "databases").mkdir()
    (applier.root / "databases/room").write_bytes(b"a file where a folder must be")
    res = applier.apply_batch([put(1, "databases/room/m.json", b"m"), put(2, "databases/z.json", b"z")])
    assert res.problems == []
    assert files(applier.root) == {"databases/room/m.json": b"m", "databases/z.json": b"z"}


def test_a_folder_removed_earlier_in_the_group_is_made_again_for_a_later_put(applier: Applier) -> None:
    applier.apply_batch([put(1, "databases/r/old.json", b"old")])
    res = applier.apply_batch([op(2, Op.RMDIR, "databases/r"), put(3, "databases/r/new.json", b"new")])
    assert res.problems == []
    assert files(applier.root) == {"databases/r/new.json": b"new"}


def test_bad_records_are_refused_and_the_rest_applied(applier: Applier, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, applier.root / "link")
    res = applier.apply_batch(
        [
            put(1, "../escape.json", b"no"),
            put(2, "link/through.json", b"no"),
            put(3, "databases/bad-digest.json", b"torn", digest=digest_bytes(b"whole")),
            put(4, "databases/good.json", b"yes"),
            op(5, Op.RENAME, "databases", "databases/inside"),
        ]
    )
    assert [(p.seq, p.code) for p in res.problems] == [(n, "refused") for n in (1, 2, 3, 5)]
    assert res.applied == 1
    assert files(applier.root) == {"databases/good.json": b"yes"}
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "escape.json").exists()


def test_an_error_mid_group_raises_and_leaves_no_temporary_file(applier: Applier) -> None:
    # A real OS error: a path the file system cannot hold (longer than PATH_MAX once joined), which the
    # path rules let through because they were widened for this test.
    applier.max_path_chars = 10_000
    deep = "/".join(["d" * 200] * 25) + "/m.json"
    with pytest.raises(ApplyError, match="cannot apply"):
        applier.apply_batch(
            [put(1, "databases/a.json", b"a"), put(2, deep, b"deep"), put(3, "databases/b.json", b"b")]
        )
    assert not temp_files(applier.root)
    assert (applier.root / "databases/a.json").read_bytes() == b"a"  # applied in order before the error
    assert not (applier.root / "databases/b.json").exists()


def test_a_put_that_replaces_a_folder_does_not_lose_a_later_put_into_it(applier: Applier) -> None:
    # The later put's temporary file is written (phase 1) inside the folder the earlier put removes.
    (applier.root / "databases/f").mkdir(parents=True)
    res = applier.apply_batch([put(1, "databases/f", b"a file"), put(2, "databases/f/z.json", b"z")])
    assert res.problems == []
    assert files(applier.root) == {"databases/f/z.json": b"z"}  # the later record wins
    assert not temp_files(applier.root)


# ---------------------------------------------------------------------------------------------------------
# Modification times outside 1970..2262, and the hash cache key of what the applier wrote

SIGNED_MTIMES = {
    "1969-12-31": -86_400 * 10**9,
    "1938-01-01": -1_009_843_200 * 10**9,
    "the int64 maximum (2262, where a later source time is clamped)": INT64_MAX,
}


@pytest.mark.parametrize("mtime", SIGNED_MTIMES.values(), ids=SIGNED_MTIMES.keys())
def test_any_int64_mtime_is_applied(applier: Applier, mtime: int) -> None:
    data = b"dated"
    big = os.urandom(5 << 20)  # streamed (a large put): its time is set on the temporary file after close
    ops = [
        PendingOp(
            Change(1, Op.PUT, "databases/a.json", size=5, mtime_ns=mtime, digest=digest_bytes(data)), data
        ),
        PendingOp(
            Change(2, Op.PUT, "databases/big.bin", size=len(big), mtime_ns=mtime, digest=digest_bytes(big))
        ),
    ]
    large = applier.begin_large(ops[1].change)
    large.write(big)
    assert large.finish() is None
    ops[1].temp = large.temp
    res = applier.apply_batch(ops)
    assert res.problems == [] and res.applied == 2
    for rel in ("databases/a.json", "databases/big.bin"):
        assert (applier.root / rel).stat().st_mtime_ns == mtime, rel


def test_windows_clamps_a_time_before_1601_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    before_1601 = WINDOWS_MIN_MTIME_NS - 1
    assert settable_mtime_ns("a", before_1601, windows=True) == WINDOWS_MIN_MTIME_NS
    assert "apply.mtime_clamped path='a'" in caplog.text
    assert settable_mtime_ns("a", WINDOWS_MIN_MTIME_NS, windows=True) == WINDOWS_MIN_MTIME_NS
    assert settable_mtime_ns("a", -1, windows=True) == -1
    assert settable_mtime_ns("a", before_1601, windows=False) == before_1601
    assert WINDOWS_MIN_MTIME_NS == -11_644_473_600 * 10**9  # 1601-01-01 UTC


def test_the_cache_key_of_an_applied_file_is_taken_once_it_is_in_place(applier: Applier) -> None:
    # The rename into place, and a later rename record, move the file's change time: the key recorded must
    # be the final one, or every manifest would re-hash (and flag as a local edit) what standby wrote.
    time.sleep(0.01)
    applier.apply_batch([put(1, "databases/r1/a.json", b"a"), put(2, "databases/r1/b.json", b"b")])
    time.sleep(0.01)
    applier.apply_batch([op(3, Op.RENAME, "databases/r1/a.json", "databases/r1/c.json")])
    applier.apply_batch([op(4, Op.RENAME, "databases/r1", "databases/r2")])
    for rel, data in (("databases/r2/c.json", b"a"), ("databases/r2/b.json", b"b")):
        p = applier.root / rel
        assert applier.cache.get(rel, stat_key(p, p.stat())) == digest_bytes(data), rel
    m = build_manifest(applier.root, ["databases"], applier.cache, flag_edits=True)
    assert {e.path for e in m.entries.values() if e.flags} == set()


def test_a_replica_edit_that_puts_size_and_mtime_back_is_flagged_and_listed(applier: Applier) -> None:
    applier.apply_batch([put(1, "config/config.json", b'{"x": 1}')])
    p = applier.root / "config" / "config.json"
    st = p.stat()
    time.sleep(0.01)
    p.write_bytes(b'{"y": 2}')
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # touch -r
    e = build_manifest(applier.root, ["config/config.json"], applier.cache, flag_edits=True).entries[
        "config/config.json"
    ]
    assert e.digest == digest_bytes(b'{"y": 2}'), (
        "the manifest listed the content standby wrote, not the edit"
    )
    assert "local-edit" in e.flags


def test_a_touch_sets_the_time_of_the_content_it_names_and_nothing_else(applier: Applier) -> None:
    data = b"meeting 7"
    applier.apply_batch([put(1, "databases/a.json", data), put(2, "databases/b.json", b"other 9")])
    new_time = 1_500_000_000_123_456_789
    touch = Change(
        3, Op.TOUCH, "databases/a.json", size=len(data), mtime_ns=new_time, digest=digest_bytes(data)
    )
    stale = Change(
        4, Op.TOUCH, "databases/b.json", size=7, mtime_ns=new_time, digest=digest_bytes(b"not it!")
    )
    missing = Change(5, Op.TOUCH, "databases/c.json", size=1, mtime_ns=new_time, digest=digest_bytes(b"c"))
    res = applier.apply_batch([PendingOp(touch), PendingOp(stale), PendingOp(missing)])
    root = applier.root
    assert os.stat(root / "databases" / "a.json").st_mtime_ns == new_time
    assert (root / "databases" / "a.json").read_bytes() == data
    assert os.stat(root / "databases" / "b.json").st_mtime_ns == MTIME, "a stale touch changed the time"
    assert not (root / "databases" / "c.json").exists()
    assert [(p.seq, p.code) for p in res.problems] == [(4, "stale"), (5, "stale")]
    # The cache learnt the new key: the file is not hashed again for a manifest.
    st = os.stat(root / "databases" / "a.json")
    assert applier.cache.get("databases/a.json", stat_key(root / "databases" / "a.json", st)) == digest_bytes(
        data
    )


def test_a_folder_renamed_or_removed_in_a_group_carries_no_later_puts_temp_file_along(
    applier: Applier,
) -> None:
    """A group: a folder moved away (or removed), then a file put into a new folder of its old name. The
    put's temporary file, written first into that folder, must not travel with the move and stay there."""
    applier.apply_batch([put(1, "d/old", b"old")])
    res = applier.apply_batch(
        [op(2, Op.RENAME, "d", "f"), put(3, "d/x", b"new"), op(4, Op.RMDIR, "g"), put(5, "d/y", b"y")]
    )
    assert res.problems == [] and files(applier.root) == {"f/old": b"old", "d/x": b"new", "d/y": b"y"}
    assert not temp_files(applier.root)
    res = applier.apply_batch([put(6, "d/z", b"z"), op(7, Op.RMDIR, "d"), put(8, "d/w", b"w")])
    assert files(applier.root) == {"f/old": b"old", "d/w": b"w"}
    assert not temp_files(applier.root)
