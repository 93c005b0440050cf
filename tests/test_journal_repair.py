"""A damaged journal is never a node that cannot start without a word: check names it, repair recovers.

``standby journal check`` (read-only) reports the valid prefix and the first damage (segment, byte, why);
``standby journal repair`` keeps that prefix and moves every later byte into ``damaged-<UTC time>/`` (never
deletes). Damage is made byte by byte on real files: the two-senders corruption (a seq repeated), an entry
that is whole but undecodable, a segment missing from the middle, a first segment whose header is gone.
"""

from __future__ import annotations

from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import pytest

from engine import codec
from engine import journal as jn
from engine.errors import JournalDamaged
from engine.journal import RECOVERY_HINT
from tests.pair import Pair
from tests.test_journal import ONE_ENTRY_SEGMENTS, delete, jopen, last_entry_span, put, seqs

EXIT_DAMAGED = 1


def make_journal(folder: Path, n: int, segment_bytes: int = jn.DEFAULT_SEGMENT_BYTES) -> None:
    with closing(jopen(folder, segment_bytes=segment_bytes)) as j:
        for i in range(n):
            j.append(put(f"f{i}", f"content {i}".encode()), f"content {i}".encode())
        j.commit()


def seg(folder: Path, first: int) -> Path:
    return folder / f"{first:020d}.sbj"


def entry_frame(seq: int, path: str, op: str = "delete") -> bytes:
    return codec.encode({"k": "e", "s": seq, "o": op, "p": path})


def aside_files(folder: Path) -> dict[str, bytes]:
    (aside,) = folder.glob("damaged-*")
    return {p.name: p.read_bytes() for p in aside.iterdir()}


def test_repair_keeps_the_valid_prefix_and_sets_the_rest_aside(tmp_path: Path) -> None:
    """The two-senders corruption: a second writer appended its own seq 4 after ours (and more after)."""
    folder = tmp_path / "j"
    make_journal(folder, 5)
    s1 = seg(folder, 1)
    original = s1.read_bytes()
    s1.write_bytes(original + entry_frame(4, "theirs") + entry_frame(6, "later"))
    damaged = s1.read_bytes()
    with pytest.raises(JournalDamaged) as exc:
        jopen(folder).close()
    assert "seq 4 follows 5" in str(exc.value) and f"byte {len(original)}" in str(exc.value)

    chk = jn.check(folder)
    assert chk.damaged and chk.bad is not None
    assert (chk.bad.path, chk.bad.at, chk.bad.end, chk.last_seq) == (s1, len(original), len(original), 5)
    assert s1.read_bytes() == damaged, "check is read-only"

    when = datetime(2026, 11, 25, 9, 30, 0, tzinfo=UTC)
    res = jn.repair(folder, now=when)
    assert res.aside == folder / "damaged-20261125T093000Z"
    assert s1.read_bytes() == original
    assert aside_files(folder) == {f"{s1.name}.from-{len(original)}": damaged[len(original) :]}
    assert not jn.check(folder).damaged
    with closing(jopen(folder)) as j:
        assert j.head == 5
        assert j.append(delete("next")).seq == 6
        j.commit()
        assert seqs(j) == list(range(1, 7))
    # Repairing a whole journal does nothing.
    assert jn.repair(folder).aside is None


def test_damage_in_an_earlier_segment_moves_the_later_segments_aside(tmp_path: Path) -> None:
    folder = tmp_path / "j"
    make_journal(folder, 6, ONE_ENTRY_SEGMENTS)
    s3 = seg(folder, 3)
    start, _ = last_entry_span(s3, 3)
    whole = s3.read_bytes()
    bad = bytearray(whole)
    bad[start + 12] ^= 0x40  # entry 3's header frame fails its checksum; its content frame is whole
    s3.write_bytes(bytes(bad))
    later = {p.name: p.read_bytes() for p in (seg(folder, 4), seg(folder, 5), seg(folder, 6))}
    # Open scans the last segment only; a cursor finds the damage when it gets there.
    with closing(jopen(folder, segment_bytes=ONE_ENTRY_SEGMENTS)) as j, closing(j.cursor(1)) as cur:
        assert cur.next() is not None and cur.next() is not None
        with pytest.raises(JournalDamaged) as exc:
            cur.next()
    assert exc.value.segment == str(s3) and exc.value.offset == start
    chk = jn.check(folder)
    assert chk.bad is not None and chk.bad.path == s3 and chk.bad.at == start and chk.last_seq == 2
    assert "checksum mismatch" in chk.bad.problem and "whole frame after it" in chk.bad.problem
    assert [p.name for p in chk.later] == list(later)

    res = jn.repair(folder)
    assert res.aside is not None
    assert aside_files(folder) == {f"{s3.name}.from-{start}": bytes(bad[start:]), **later}
    assert s3.read_bytes() == whole[:start]
    with closing(jopen(folder, segment_bytes=ONE_ENTRY_SEGMENTS)) as j:
        assert j.head == 2
        assert seqs(j) == [1, 2]


def test_a_missing_segment_is_a_gap_that_check_names(tmp_path: Path) -> None:
    folder = tmp_path / "j"
    make_journal(folder, 4, ONE_ENTRY_SEGMENTS)
    seg(folder, 2).unlink()
    chk = jn.check(folder)
    assert chk.bad is not None and chk.bad.path == seg(folder, 3) and chk.last_seq == 1
    assert "starts at seq 3, but the segment before ends at seq 1" in chk.bad.problem
    jn.repair(folder)
    assert sorted(aside_files(folder)) == [seg(folder, 3).name, seg(folder, 4).name]
    with closing(jopen(folder, segment_bytes=ONE_ENTRY_SEGMENTS)) as j:
        assert (j.first_seq, j.head) == (1, 1)


def test_a_first_segment_without_its_header_is_set_aside_and_the_journal_goes_on(tmp_path: Path) -> None:
    folder = tmp_path / "j"
    make_journal(folder, 3)
    s1 = seg(folder, 1)
    data = bytearray(s1.read_bytes())
    data[20] ^= 0x01
    s1.write_bytes(bytes(data))
    chk = jn.check(folder)
    assert chk.bad is not None and chk.bad.end == 0 and "bad segment header" in chk.bad.problem
    jn.repair(folder)
    assert aside_files(folder) == {s1.name: bytes(data)}
    with closing(jopen(folder)) as j:  # a fresh header for seq 1: nothing kept, seqs go on from there
        assert (j.first_seq, j.head) == (1, 0)


def test_a_torn_tail_is_not_damage(tmp_path: Path) -> None:
    folder = tmp_path / "j"
    make_journal(folder, 3)
    with open(seg(folder, 1), "ab") as f:
        f.write(entry_frame(4, "torn")[:-3])
    chk = jn.check(folder)
    assert chk.torn_tail_only and not chk.damaged and chk.last_seq == 3


# -- the commands, as an operator runs them -----------------------------------------------------------------


def test_check_and_repair_commands(pair: Pair) -> None:
    folder = pair.sender_state / "journal"
    make_journal(folder, 5)
    cfg = str(pair.config)
    r = pair.cli("journal", "--config", cfg, "check")
    assert r.returncode == 0, r.stderr
    assert "whole: entries 1..5" in r.stdout

    s1 = seg(folder, 1)
    size = s1.stat().st_size
    with open(s1, "ab") as f:  # a whole frame that is no entry this version knows, then a good one
        f.write(codec.encode({"k": "e", "s": 6, "o": "chmod", "p": "x"}) + entry_frame(7, "y"))
    damaged = s1.read_bytes()

    # The sender does not start, and says where and what to do, in one line.
    p = pair.start("send", wait=False)
    assert p.wait(30) == 5
    log = pair.log("send")
    line = next(ln for ln in log.splitlines() if ln.startswith("standby: "))
    assert f"journal segment {s1} at byte {size}" in line and line.endswith(f"({RECOVERY_HINT})"), log
    assert "Traceback" not in log
    assert s1.read_bytes() == damaged, "nothing cut"

    r = pair.cli("journal", "--config", cfg, "check")
    assert r.returncode == EXIT_DAMAGED, (r.stdout, r.stderr)
    assert f"damaged: segment {s1} at byte {size}" in r.stdout and "unknown change op 'chmod'" in r.stdout
    assert "valid prefix: entries 1..5" in r.stdout
    assert f"{s1.name} bytes {size}..{len(damaged)}" in r.stdout
    assert f"standby journal repair --config {cfg}" in r.stdout

    r = pair.cli("journal", "--config", cfg, "repair")
    assert r.returncode == 0, r.stderr
    assert "kept entries 1..5" in r.stdout and f"{s1.name} bytes {size}..{len(damaged)}" in r.stdout
    (aside,) = folder.glob("damaged-*")
    assert str(aside) in r.stdout
    assert (aside / f"{s1.name}.from-{size}").read_bytes() == damaged[size:]
    r = pair.cli("journal", "--config", cfg, "check")
    assert r.returncode == 0 and "whole: entries 1..5" in r.stdout, r.stdout

    # And the pair runs again from there.
    pair.start("receive")
    pair.start("send")
    db = pair.source / "databases"
    db.mkdir()
    (db / "a.json").write_text("a")
    pair.wait_converged()
