"""The hash cache on disk: saved and loaded entry by entry, and a damaged file only costs re-hashing; its key
sees a rewrite that put size and mtime back; times outside 1970..2262; walks never pass a symlink."""

from __future__ import annotations

import logging
import os
import struct
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import msgpack
import pytest

from engine import codec, scan
from engine.digest import digest_bytes
from engine.model import INT64_MAX, FileMeta
from engine.scan import (
    LEASE_MAX,
    HashCache,
    StableRead,
    Unstable,
    build_manifest,
    open_for_writing,
    read_stable,
    stat_key,
)
from tests.conftest import skip_or_fail


def test_the_hash_cache_round_trips_in_the_documented_format(tmp_path: Path) -> None:
    c = HashCache()
    for i in range(500):
        c.put_key(f"databases/r/{i}.json", (i, i * 1_000_003 - 10**18, i + 7, i * 3), os.urandom(16))
    c.put_key("no-change-time", (1, 2, 3), bytes(16))  # kept, but it never matches
    c.save(tmp_path / "hashcache")
    raw = (tmp_path / "hashcache").read_bytes()
    u = msgpack.Unpacker(raw=False)
    u.feed(raw)
    assert next(u) == {"fmt": "standby-hashcache", "v": 3}  # the format header, then maps of entries
    maps = list(u)
    assert [len(m) for m in maps] == [scan.CACHE_MAP_ENTRIES] * (501 // scan.CACHE_MAP_ENTRIES) + [
        501 % scan.CACHE_MAP_ENTRIES
    ]
    saved = {k: v for m in maps for k, v in m.items()}
    for k, (size, mtime, fid, change, digest) in c.items():
        if change is None:
            assert saved[k] == struct.pack("<qqQ16s", size, mtime, fid, digest)
        else:
            assert saved[k] == struct.pack("<qqQq16s", size, mtime, fid, change, digest)
    loaded = HashCache.load(tmp_path / "hashcache")
    assert dict(loaded.items()) == dict(c.items()) and len(loaded) == 501
    assert loaded.known("no-change-time") == (1, 2, 3, None, bytes(16))
    assert loaded.get("no-change-time", (1, 2, 3, None)) is None


def test_a_hash_cache_of_version_2_is_still_read(tmp_path: Path) -> None:
    """Version 2 (one map of path -> [size, mtime, file id, change time or nil, digest]) is what the
    release before wrote: an upgrade must not cost hashing every file again."""
    entries = {
        f"databases/{i}.json": [i, i * 7, i + 1, i * 3 if i % 2 else None, os.urandom(16)] for i in range(50)
    }
    entries["odd"] = [1, 2, 3, 4, bytes(20)]
    (tmp_path / "hashcache").write_bytes(
        msgpack.packb({"fmt": "standby-hashcache", "v": 2}) + msgpack.packb(entries, use_bin_type=True)
    )
    loaded = HashCache.load(tmp_path / "hashcache")
    assert dict(loaded.items()) == {k: tuple(v) for k, v in entries.items()}
    loaded.save(tmp_path / "hashcache")  # written again as version 3, the same entries
    assert dict(HashCache.load(tmp_path / "hashcache").items()) == {k: tuple(v) for k, v in entries.items()}


def test_a_damaged_hash_cache_keeps_its_whole_maps_before_the_damage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    c = HashCache()
    n = scan.CACHE_MAP_ENTRIES * 2 + 10
    for i in range(n):
        c.put_key(f"f{i}", (i, i, i, i), bytes(16))
    c.save(tmp_path / "hashcache")
    raw = (tmp_path / "hashcache").read_bytes()
    (tmp_path / "hashcache").write_bytes(raw[: len(raw) * 3 // 4])  # cut inside the second map
    loaded = HashCache.load(tmp_path / "hashcache")
    assert len(loaded) == scan.CACHE_MAP_ENTRIES
    assert set(loaded.items()) <= set(c.items())
    assert "hashcache.unreadable" in caplog.text


def test_hash_cache_entries_that_do_not_pack_are_kept_exactly(tmp_path: Path) -> None:
    """An entry is held packed in 48 bytes; one that does not fit (a digest of another length, a size past
    int64 from a crafted file) is kept as it is, never cut or refused."""
    odd = {
        "long-digest": (5, 6, 7, 8, bytes(20)),
        "huge-size": ((1 << 64) - 1, 6, 7, None, bytes(16)),
        "edges": (5, -(1 << 63), (1 << 64) - 1, (1 << 63) - 1, bytes(range(16))),
    }
    c = HashCache()
    for path, (size, mtime, fid, change, digest) in odd.items():
        c.put_key(path, (size, mtime, fid) if change is None else (size, mtime, fid, change), digest)
    for path, want in odd.items():
        assert c.known(path) == want
        if want[3] is not None:
            assert c.get(path, want[:4]) == want[4]
    c.save(tmp_path / "hashcache")
    assert dict(HashCache.load(tmp_path / "hashcache").items()) == odd
    c.rekey("edges", (5, -(1 << 63), (1 << 64) - 1, 99))
    assert c.known("edges") == (5, -(1 << 63), (1 << 64) - 1, 99, bytes(range(16)))


def test_a_file_id_past_64_bits_is_folded_into_a_key_the_cache_can_save(tmp_path: Path) -> None:
    """ReFS file IDs are 128 bits (Python 3.12 on Windows gives them whole): the key holds 64, the same
    file always the same, and the cache saves it."""
    st = os.stat_result((0o100644, (7 << 64) | 5, 1, 1, 0, 0, 3, 0, 0, 0), {"st_mtime_ns": 4})
    key = scan.file_key(st, 11)
    assert key[2] == 7 ^ 5 and key == scan.file_key(st, 11)
    c = HashCache()
    c.put_key("refs", key, bytes(16))
    c.save(tmp_path / "hashcache")
    assert HashCache.load(tmp_path / "hashcache").get("refs", key) == bytes(16)
    halves = os.stat_result((0o100644, (5 << 64) | 5, 1, 1, 0, 0, 3, 0, 0, 0), {"st_mtime_ns": 4})
    assert scan.file_key(halves, 11)[2] == 1, "folded to 0, which would match any file id"


def test_a_hash_cache_entry_costs_about_a_hundred_bytes() -> None:
    """At 100,000 files the cache is on both sides for the whole run: an entry as a tuple of five objects
    was about 310 bytes, packed it is about 120 (the path is shared with the scan, not counted)."""
    paths = [sys.intern(f"databases/room-{i // 100:03d}/meeting-{i:06d}.json") for i in range(20_000)]
    digests = [os.urandom(16) for _ in paths]
    c = HashCache()
    tracemalloc.start()
    try:
        for i, p in enumerate(paths):
            c.put_key(
                p,
                (1000 + i, 1_764_000_000_123_456_789 + i, 9_000_000 + i, 1_764_000_001_000_000_000 + i),
                digests[i],
            )
        per = tracemalloc.get_traced_memory()[0] / len(paths)
    finally:
        tracemalloc.stop()
    assert per < 160, f"{per:.0f} bytes an entry"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong type"])
def test_a_damaged_hash_cache_loads_what_it_can_and_warns(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    c = HashCache()
    for i in range(100):
        c.put_key(f"f{i}", (i, i, i, i), bytes(16))
    c.save(tmp_path / "hashcache")
    raw = (tmp_path / "hashcache").read_bytes()
    header = msgpack.packb(scan.CACHE_HEADER)
    bad = {
        "truncated": raw[: len(raw) // 2],
        "garbage": header + b"\x00\xff" * 50,
        "wrong type": header + b"\x93\x01\x02\x03",
    }
    (tmp_path / "hashcache").write_bytes(bad[damage])
    loaded = HashCache.load(tmp_path / "hashcache")
    assert set(loaded.items()) <= set(c.items())  # never a wrong entry
    assert "hashcache.unreadable" in caplog.text
    assert len(HashCache.load(tmp_path / "missing")) == 0


def test_an_empty_hash_cache_is_its_header_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    HashCache().save(tmp_path / "hashcache")
    assert (tmp_path / "hashcache").read_bytes() == msgpack.packb(scan.CACHE_HEADER)
    assert len(HashCache.load(tmp_path / "hashcache")) == 0
    assert "hashcache" not in caplog.text


def test_a_hash_cache_of_the_old_format_is_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Version 1: one map of path -> [size, mtime, file id, digest], keyed without a change time.
    (tmp_path / "hashcache").write_bytes(msgpack.packb({"databases/a.json": [3, 5, 7, bytes(16)]}))
    caplog.set_level(logging.INFO)
    assert len(HashCache.load(tmp_path / "hashcache")) == 0
    assert "hashcache.old_format" in caplog.text
    assert "hashcache.unreadable" not in caplog.text


def rewrite_keeping_size_and_mtime(path: Path, data: bytes) -> None:
    """What ``cp -p`` or an editor plus ``touch -r`` do: new content, same size, the old mtime put back."""
    st = path.stat()
    assert len(data) == st.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size


def test_a_same_size_rewrite_with_its_mtime_put_back_is_hashed_again(tmp_path: Path) -> None:
    (tmp_path / "databases").mkdir()
    f = tmp_path / "databases" / "m.json"
    f.write_bytes(b'{"room": 1}')
    cache = HashCache()
    first = build_manifest(tmp_path, ["databases"], cache).entries["databases/m.json"]
    assert first.digest == digest_bytes(b'{"room": 1}')
    rewrite_keeping_size_and_mtime(f, b'{"room": 2}')
    second = build_manifest(tmp_path, ["databases"], cache).entries["databases/m.json"]
    assert second.digest == digest_bytes(b'{"room": 2}'), "the cache served the old content's digest"
    assert second.mtime_ns == first.mtime_ns
    # and the saved cache carries the change time across a restart
    cache.save(tmp_path / "hashcache")
    rewrite_keeping_size_and_mtime(f, b'{"room": 3}')
    third = build_manifest(tmp_path, ["databases"], HashCache.load(tmp_path / "hashcache"))
    assert third.entries["databases/m.json"].digest == digest_bytes(b'{"room": 3}')


def test_a_replica_file_edited_with_size_and_mtime_put_back_is_flagged(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    f = tmp_path / "config" / "config.json"
    f.write_bytes(b'{"a": 1}')
    cache = HashCache()
    assert (
        build_manifest(tmp_path, ["config/config.json"], cache, flag_edits=True)
        .entries["config/config.json"]
        .flags
        == frozenset()
    )
    rewrite_keeping_size_and_mtime(f, b'{"b": 2}')
    for _ in range(2):  # flagged until repaired: the edit is not learnt into the cache
        e = build_manifest(tmp_path, ["config/config.json"], cache, flag_edits=True).entries[
            "config/config.json"
        ]
        assert e.digest == digest_bytes(b'{"b": 2}') and "local-edit" in e.flags, e


@pytest.mark.skipif(sys.platform == "win32", reason="chmod changes no content key on Windows")
def test_a_chmod_on_the_replica_is_no_local_edit(tmp_path: Path) -> None:
    f = tmp_path / "a.json"
    f.write_bytes(b"{}")
    cache = HashCache()
    build_manifest(tmp_path, ["a.json"], cache, flag_edits=True)
    before = cache.known("a.json")
    time.sleep(0.01)
    f.chmod(0o600)  # moves only the change time
    e = build_manifest(tmp_path, ["a.json"], cache, flag_edits=True).entries["a.json"]
    assert e.flags == frozenset(), "a chmod was reported as a local edit"
    after = cache.known("a.json")
    assert before is not None and after is not None and after[3] != before[3], "the new key was not learnt"


def test_verify_full_ignores_a_cache_that_lies(tmp_path: Path) -> None:
    f = tmp_path / "a.json"
    f.write_bytes(b"{}")
    cache = HashCache()
    cache.put_key("a.json", stat_key(f, f.stat()), digest_bytes(b"not the content"))
    assert build_manifest(tmp_path, ["a.json"], cache).entries["a.json"].digest == digest_bytes(
        b"not the content"
    )
    full = build_manifest(tmp_path, ["a.json"], cache, full=True).entries["a.json"]
    assert full.digest == digest_bytes(b"{}")
    known = cache.known("a.json")
    assert known is not None and known[4] == digest_bytes(b"not the content"), "a full walk changed the cache"


def test_file_basic_info_change_time() -> None:
    # FILE_BASIC_INFO as GetFileInformationByHandleEx fills it: four FILETIMEs (100 ns since 1601) and the
    # attributes, padded to 40 bytes.
    epoch_1970 = 116_444_736_000_000_000
    change = epoch_1970 + 17_000_000_000 * 10_000_000 + 1234567  # 2508-..., 123.4567 ms past a second
    buf = struct.pack("<qqqqI4x", 1, 2, 3, change, 0x20)
    assert len(buf) == scan.BASIC_INFO_SIZE
    assert scan.change_time_from_basic_info(buf) == 17_000_000_000 * 10**9 + 123_456_700
    assert scan.change_time_from_basic_info(struct.pack("<qqqqI", 0, 0, 0, 0, 0)) == -epoch_1970 * 100
    with pytest.raises(ValueError):
        scan.change_time_from_basic_info(b"\0" * 16)


FAR_FUTURE_NS = 10_413_792_000 * 10**9  # 2300-01-01, above what an int64 of ns holds


def test_times_before_1970_and_after_2262_are_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    old, future = tmp_path / "old.json", tmp_path / "future.json"
    old.write_bytes(b"1969")
    future.write_bytes(b"2300")
    os.utime(old, ns=(-86_400 * 10**9, -86_400 * 10**9))  # 1969-12-31
    os.utime(future, ns=(FAR_FUTURE_NS, FAR_FUTURE_NS))
    if future.stat().st_mtime_ns != FAR_FUTURE_NS:
        skip_or_fail(
            "this file system cannot hold a time after 2262", "CI=true: run the tests on ext4 or tmpfs"
        )
    r = read_stable(old)
    assert isinstance(r, StableRead) and r.mtime_ns == -86_400 * 10**9
    r = read_stable(future)
    assert isinstance(r, StableRead) and r.mtime_ns == INT64_MAX
    assert "scan.mtime_clamped" in caplog.text and "future.json" in caplog.text
    m = build_manifest(tmp_path, ["old.json", "future.json"], HashCache())
    assert m.entries["old.json"].mtime_ns == -86_400 * 10**9
    assert m.entries["future.json"].mtime_ns == INT64_MAX  # the same as what is sent: never re-sent
    for e in m.entries.values():
        dec = codec.FrameDecoder()
        dec.feed(codec.encode(e.to_wire()))
        assert FileMeta.from_wire(dec.next()[1]) == e


def test_an_include_below_a_symlinked_folder_is_not_listed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, outside = tmp_path / "replica", tmp_path / "outside"
    (outside / "inner").mkdir(parents=True)
    (outside / "inner" / "secret.txt").write_bytes(b"secret")
    (outside / "config.json").write_bytes(b"{}")
    root.mkdir()
    (root / "lnk").symlink_to(outside, target_is_directory=True)
    (root / "config").symlink_to(outside, target_is_directory=True)
    (root / "databases" / "deep").mkdir(parents=True)
    (root / "databases" / "deep" / "lnk").symlink_to(outside, target_is_directory=True)
    m = build_manifest(
        root, ["lnk/inner", "config/config.json", "databases/deep/lnk/inner", "databases"], HashCache()
    )
    assert sorted(m.entries) == ["databases", "databases/deep"], m.entries
    assert "scan.symlink_skipped" in caplog.text
    assert scan.link_in_path(root, "lnk/inner/secret.txt") == "lnk"
    assert scan.link_in_path(root, "databases/deep/lnk/x") == "lnk"
    assert scan.link_in_path(root, "databases/deep/missing/x") is None
    assert scan.link_in_path(root, "lnk") is None  # the last component is the caller's


needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="leases and /proc are Linux")


@needs_linux
def test_a_file_held_open_for_writing_is_not_read_and_is_found_in_proc(tmp_path: Path) -> None:
    path = tmp_path / "held.json"
    path.write_bytes(b'{"half": ')
    with open(path, "ab") as writer:
        writer.write(b"1")
        writer.flush()
        r = read_stable(path, lease_check=True)
        if scan._lease_broken:
            skip_or_fail("read leases are not available on this file system", "CI=true: leases are tested")
        assert isinstance(r, Unstable) and r.writing, r
        busy, complete = open_for_writing([path])
        assert busy == {path}
        if os.geteuid() == 0:
            assert complete  # as root every process is visible
    r = read_stable(path, lease_check=True)
    assert isinstance(r, StableRead) and r.data == b'{"half": 1'
    assert open_for_writing([path])[0] == set()


def test_a_check_that_needs_a_lease_treats_a_file_too_large_for_one_as_being_written(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(LEASE_MAX + 1))  # never leased: a writer must not wait on a long read
    r = read_stable(path, lease_check=True, require_lease=True)
    assert isinstance(r, Unstable) and r.writing
    r = read_stable(path, lease_check=True)  # without the requirement it is read
    assert isinstance(r, StableRead) and r.size == LEASE_MAX + 1


def test_hash_cache_saves_from_several_threads_never_collide(tmp_path: Path) -> None:
    """A reconciliation's save, the status timer's and the one at stop may overlap: each must succeed and
    leave a whole file (they shared one temporary name, so one replace found the other's file gone)."""
    cache = HashCache()
    for i in range(20_000):
        cache.put_key(f"databases/room/{i:06d}.json", (10, i, i, i), b"\x01" * 16)
    dest = tmp_path / "hashcache"
    errors: list[BaseException] = []

    def saver() -> None:
        try:
            for i in range(30):
                cache.put_key(f"x/{threading.get_ident()}-{i}", (1, 1, 1, 1), b"\x02" * 16)
                cache.save(dest)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=saver) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(HashCache.load(dest)) == len(cache)
    assert not [p for p in tmp_path.iterdir() if p.name != "hashcache"], "temporary files left behind"
    assert cache.save(dest) is False, "a save with nothing changed wrote the file again"


def test_is_reparse_point_reads_the_windows_attribute() -> None:
    assert scan.is_reparse_point(cast(os.stat_result, SimpleNamespace(st_file_attributes=0x400 | 0x10)))
    assert not scan.is_reparse_point(cast(os.stat_result, SimpleNamespace(st_file_attributes=0x10)))
    assert not scan.is_reparse_point(os.stat("."))  # POSIX: no such attribute


def test_a_walk_on_windows_never_enters_a_junction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A junction is a folder to is_dir(follow_symlinks=False) (Python reports only true symlinks as
    links): the walk must look at its reparse attribute. Windows' DirEntry is stood in for by flagging
    the folder named ``junction`` by its inode."""
    (tmp_path / "databases" / "junction").mkdir(parents=True)
    (tmp_path / "databases" / "junction" / "outside.json").write_text("x", "utf-8")
    (tmp_path / "databases" / "room").mkdir()
    (tmp_path / "databases" / "room" / "a.json").write_text("a", "utf-8")
    junction = os.stat(tmp_path / "databases" / "junction").st_ino
    monkeypatch.setattr(scan, "WINDOWS", True)
    monkeypatch.setattr(scan, "is_reparse_point", lambda st: st.st_ino == junction)
    found = sorted(f.path for f in scan.walk(tmp_path, ["databases"]))
    assert found == ["databases", "databases/room", "databases/room/a.json"]
    monkeypatch.setattr(scan, "WINDOWS", False)  # POSIX never asks: the same folder is walked
    assert "databases/junction/outside.json" in {f.path for f in scan.walk(tmp_path, ["databases"])}


def test_a_folder_gone_between_found_and_listed_is_unreadable_not_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder renamed away and back while the walk passes it: its contents are not known, which must
    not read as "none" (a reconciliation would delete them on the replica)."""
    (tmp_path / "databases" / "room").mkdir(parents=True)
    (tmp_path / "databases" / "room" / "a.json").write_text("a", "utf-8")
    (tmp_path / "databases" / "other.json").write_text("o", "utf-8")
    real = os.scandir

    def scandir(path: Any) -> Any:
        if Path(path).name == "room":
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    m = scan.Manifest({}, [], [])
    found = {e.path for e in scan.iter_manifest(tmp_path, ["databases"], HashCache(), m)}
    assert m.unreadable == ["databases/room"]
    assert "databases/other.json" in found and "databases/room/a.json" not in found
