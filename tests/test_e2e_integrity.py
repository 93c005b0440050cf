"""End to end, real processes on 127.0.0.1: changes a stat-keyed cache could miss, and times a 64-bit
count of nanoseconds since 1970 cannot hold.

- Files dated before 1970 or after 2262 on the source, and a replica file dated 1938, replicate; the link
  stays up; ``standby verify`` exits 0; a time after 2262 is clamped once, not re-sent at every pass.
- A same-size rewrite whose mtime was put back (``touch -r``, ``cp -p``) is shipped, made while the sender
  was stopped (source side) or on the passive (replica side, repaired).
- ``standby verify --full`` hashes everything on both sides, whatever either hash cache says.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from engine.digest import digest_bytes
from engine.model import INT64_MAX
from engine.scan import HashCache, stat_key
from tests.conftest import skip_or_fail
from tests.pair import Pair, wait_for

pytestmark = pytest.mark.timeout(120)

DAY_NS = 86_400 * 10**9
MTIME_1969 = -DAY_NS  # 1969-12-31
MTIME_1938 = -1_009_843_200 * 10**9  # 1938-01-01
MTIME_2300 = 10_413_792_000 * 10**9  # 2300-01-01: above 2**63 ns


def set_mtime(path: Path, ns: int) -> None:
    os.utime(path, ns=(ns, ns))
    if path.stat().st_mtime_ns != ns:
        skip_or_fail(
            f"this file system cannot hold the time {ns} ns",
            "CI=true: the CI file system holds int64 times, and these tests are about them",
        )


def rewrite_keeping_size_and_mtime(path: Path, data: bytes) -> None:
    """New content in place, same size, the old mtime put back (what ``touch -r`` / ``cp -p`` leave)."""
    st = path.stat()
    assert len(data) == st.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def wait_same_content(pair: Pair, rels: list[str], timeout: float = 20) -> None:
    def same() -> bool:
        try:
            return all((pair.target / r).read_bytes() == (pair.source / r).read_bytes() for r in rels)
        except FileNotFoundError:
            return False

    try:
        wait_for(same, timeout, f"the replica to hold the source's content of {rels}")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{pair.all_logs()}") from None


def verify(pair: Pair, *extra: str) -> tuple[int, str]:
    r = pair.cli("verify", "--config", str(pair.config), *extra)
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, r.stdout + r.stderr


def caught_up_head(pair: Pair) -> int:
    """The sender's journal head once the receiver has applied and acknowledged all of it."""

    def caught_up(s: dict[str, Any]) -> bool:
        snd, rcv = s["sender"], s["receiver"]
        return bool(snd.get("head")) and snd.get("head") == snd.get("acked_seq") == rcv.get("applied_seq")

    return int(pair.wait_status(caught_up, 15, "the sender to be caught up")["sender"]["head"])


# ---------------------------------------------------------------------------------------------------------
# Times outside 1970..2262


def test_files_dated_before_1970_and_after_2262_replicate_and_verify(pair: Pair) -> None:
    pair.sender_extra += "\nreconcile_interval = 1"
    pair.write_config()
    dbs = pair.source / "databases"
    dbs.mkdir()
    (dbs / "old.json").write_text('{"dated": 1969}')
    (dbs / "future.json").write_text('{"dated": 2300}')
    (dbs / "both.json").write_text('{"on the source": true}')
    (pair.source / "config").mkdir()
    (pair.source / "config" / "config.json").write_text("{}")
    set_mtime(dbs / "old.json", MTIME_1969)
    set_mtime(dbs / "future.json", MTIME_2300)
    # The replica already holds files dated 1938: one the source has too (other content), one it has not.
    (pair.target / "databases").mkdir(parents=True)
    (pair.target / "databases" / "both.json").write_text('{"replica": 1938}')
    (pair.target / "databases" / "extra.json").write_text("{}")
    set_mtime(pair.target / "databases" / "both.json", MTIME_1938)
    set_mtime(pair.target / "databases" / "extra.json", MTIME_1938)

    pair.start("receive")
    pair.start("send")
    rels = ["databases/old.json", "databases/future.json", "databases/both.json", "config/config.json"]
    wait_same_content(pair, rels)
    wait_for(lambda: not (pair.target / "databases" / "extra.json").exists(), 20, "the extra file removed")
    assert (pair.target / "databases" / "old.json").stat().st_mtime_ns == MTIME_1969
    assert (pair.target / "databases" / "future.json").stat().st_mtime_ns == INT64_MAX, "not clamped"
    code, out = verify(pair)
    assert code == 0, f"verify exited {code}\n{out}\n{pair.all_logs()}"
    assert "scan.mtime_clamped path=" in pair.log("send") and "future.json" in pair.log("send")

    # A few reconciliations later nothing was re-sent (the clamped time is the one compared) and the link
    # never dropped.
    settled = caught_up_head(pair)
    passes = pair.log("send").count("reconcile.done")
    wait_for(lambda: pair.log("send").count("reconcile.done") >= passes + 3, 20, "three more reconciliations")
    assert caught_up_head(pair) == settled, f"entries were journaled again\n{pair.all_logs()}"
    assert len(re.findall(r"send\.connected ", pair.log("send"))) == 1, pair.all_logs()
    assert "protocol_error" not in pair.log("receive") + pair.log("send"), pair.all_logs()


# ---------------------------------------------------------------------------------------------------------
# A same-size rewrite with its mtime put back


def test_a_same_size_rewrite_with_its_mtime_put_back_while_the_sender_was_stopped_is_shipped(
    pair: Pair,
) -> None:
    dbs = pair.source / "databases" / "room-1"
    dbs.mkdir(parents=True)
    for i in range(5):
        (dbs / f"m{i}.json").write_text(f'{{"meeting": {i}, "subject": "a"}}')
    pair.start("receive")
    pair.start("send")
    pair.wait_converged()
    assert pair.stop("send") == 0, pair.all_logs()

    rewrite_keeping_size_and_mtime(dbs / "m2.json", b'{"meeting": 2, "subject": "b"}')
    pair.start("send")
    wait_same_content(pair, ["databases/room-1/m2.json"])
    pair.wait_converged()
    code, out = verify(pair)
    assert code == 0, out


def test_a_replica_edit_with_its_mtime_put_back_is_repaired(pair: Pair) -> None:
    pair.sender_extra += "\nreconcile_interval = 1"
    pair.write_config()
    dbs = pair.source / "databases" / "room-1"
    dbs.mkdir(parents=True)
    for i in range(5):
        (dbs / f"m{i}.json").write_text(f'{{"meeting": {i}, "subject": "a"}}')
    pair.start("receive")
    pair.start("send")
    pair.wait_converged()

    edited = pair.target / "databases" / "room-1" / "m3.json"
    rewrite_keeping_size_and_mtime(edited, b'{"meeting": 3, "subject": "X"}')
    assert not pair.converged()
    pair.wait_converged(timeout=20)
    pair.wait_log("receive", "replica.local_edit path='databases/room-1/m3.json'")
    code, out = verify(pair)
    assert code == 0, out


# ---------------------------------------------------------------------------------------------------------
# verify --full


def lie_in_cache(cache_file: Path, root: Path, rel: str, digest: bytes) -> None:
    """Make a saved hash cache claim ``digest`` for the current version of ``rel`` (what a cache keyed on a
    stat that a file system does not move would believe)."""
    c = HashCache.load(cache_file)
    assert c.known(rel) is not None, f"{rel} is not in {cache_file}"
    p = root / rel
    c.put_key(rel, stat_key(p, p.stat()), digest)
    c.save(cache_file)


def test_verify_full_hashes_both_sides_whatever_the_caches_say(pair: Pair) -> None:
    long_dir = "databases/" + "/".join(["a-long-folder-name-as-rooms-get"] * 4)
    rels = [f"{long_dir}/m{i}.json" for i in range(3)]
    assert len(rels[0]) > 120
    for i, rel in enumerate(rels):
        (pair.source / rel).parent.mkdir(parents=True, exist_ok=True)
        (pair.source / rel).write_text(f'{{"meeting": {i}}}')
    pair.start("receive")
    pair.start("send")
    pair.wait_converged()
    code, out = verify(pair, "--full")
    assert code == 0, out
    assert pair.stop("send") == 0 and pair.stop("receive") == 0, pair.all_logs()

    # Each side's cache now believes a file unchanged whose content changed under it.
    replica_rel, source_rel = rels[0], rels[1]
    old_replica = digest_bytes((pair.target / replica_rel).read_bytes())
    rewrite_keeping_size_and_mtime(pair.target / replica_rel, b'{"meeting": 9}')
    lie_in_cache(pair.receiver_state / "hashcache", pair.target, replica_rel, old_replica)
    old_source = digest_bytes((pair.source / source_rel).read_bytes())
    rewrite_keeping_size_and_mtime(pair.source / source_rel, b'{"meeting": 8}')
    lie_in_cache(pair.sender_state / "hashcache", pair.source, source_rel, old_source)
    pair.start("receive")

    code, out = verify(pair)
    assert code == 0, f"the premise failed: plain verify trusts the caches\n{out}"
    code, out = verify(pair, "--full")
    assert code == 1, f"verify --full exited {code}\n{out}\n{pair.all_logs()}"
    lines = out.splitlines()
    for rel in (replica_rel, source_rel):  # listed whole, on one line each, however long
        assert sum(line.startswith(f"content: {rel}: ") for line in lines) == 1, out
    assert not any(rels[2] in line for line in lines), out
    # The full pass left the receiver's cache as it was: a plain verify still sees what it saw.
    assert verify(pair)[0] == 0
