"""The hash cache on disk: saved and loaded entry by entry, and a damaged file only costs re-hashing."""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import pytest

from engine.scan import HashCache


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
