from __future__ import annotations

from tests.pair import Pair, temp_files


def test_pair_replicates_basic_changes(pair: Pair) -> None:
    db = pair.source / "databases" / "room-1"
    db.mkdir(parents=True)
    (db / "m1.json").write_text('{"a": 1}')
    (pair.source / "config").mkdir()
    (pair.source / "config" / "config.json").write_text("{}")
    pair.start("receive")
    pair.start("send")
    pair.wait_converged()
    (db / "m1.json").write_text('{"a": 2}')
    (db / "empty").write_bytes(b"")
    (db / "møte ünïcødé 会议.json").write_text("x")
    (db / "m1.json").rename(db / "m2.json")
    (db.parent / "room-2" / "deep" / "er").mkdir(parents=True)
    (db.parent / "room-2" / "deep" / "er" / "f").write_text("deep")
    pair.wait_converged()
    db.rename(db.parent / "room-1-renamed")
    pair.wait_converged()
    (db.parent / "room-1-renamed" / "m2.json").unlink()
    pair.wait_converged()
    assert pair.stop("send") == 0
    assert pair.stop("receive") == 0
    assert not temp_files(pair.target)
