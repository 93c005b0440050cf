"""The hash cache on disk: saved and loaded entry by entry, and a damaged file only costs re-hashing."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import msgpack
import pytest

from engine import scan
from engine.scan import LEASE_MAX, HashCache, StableRead, Unstable, open_for_writing, read_stable


def test_the_hash_cache_round_trips_in_the_documented_format(tmp_path: Path) -> None:
    c = HashCache()
    for i in range(500):
        c.put_key(f"databases/r/{i}.json", (i, i * 1_000_003, i + 7), os.urandom(16))
    c.save(tmp_path / "hashcache")
    raw = (tmp_path / "hashcache").read_bytes()
    assert msgpack.unpackb(raw, raw=False) == {k: list(v) for k, v in c._d.items()}  # one msgpack map
    assert HashCache.load(tmp_path / "hashcache")._d == c._d


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong type"])
def test_a_damaged_hash_cache_loads_what_it_can_and_warns(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    c = HashCache()
    for i in range(100):
        c.put_key(f"f{i}", (i, i, i), bytes(16))
    c.save(tmp_path / "hashcache")
    raw = (tmp_path / "hashcache").read_bytes()
    bad = {"truncated": raw[: len(raw) // 2], "garbage": b"\x00\xff" * 50, "wrong type": b"\x93\x01\x02\x03"}
    (tmp_path / "hashcache").write_bytes(bad[damage])
    loaded = HashCache.load(tmp_path / "hashcache")
    assert set(loaded._d.items()) <= set(c._d.items())  # never a wrong entry
    assert "hashcache.unreadable" in caplog.text
    assert HashCache.load(tmp_path / "missing")._d == {}


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
            pytest.skip("read leases are not available on this file system")
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
