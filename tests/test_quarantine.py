"""Quarantine on a rejoin, on real files in tmp_path: a real journal, real hash caches saved to disk.

Covers the pure fold of journal headers (puts, touches, deletes, file and folder renames), the divergence
rules (unacknowledged, unshipped, versions matching either hash cache or the shipped content), that the
journal is only read (a torn tail stays as it is), moving files byte for byte with a manifest, resuming an
interrupted quarantine (each file listed once, nothing overwritten), the copy fallback across volumes
(EXDEV through the module's ``_replace`` seam), retiring the journal, and listing and acknowledging.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from engine import quarantine as q
from engine.digest import digest_bytes
from engine.errors import ConfigError, PathRejected, ReplicationError
from engine.journal import Journal
from engine.model import Change, Op
from engine.quarantine import Suspect
from engine.scan import HashCache, Unstable, stat_key

NOW = datetime(2026, 11, 25, 10, 0, 0, tzinfo=UTC)
INCLUDE = ("data",)


def put(path: str, content: bytes, seq: int = 0) -> Change:
    return Change(seq, Op.PUT, path, size=len(content), digest=digest_bytes(content))


def change(seq: int, op: Op, path: str, dst: str = "", digest: bytes = b"") -> Change:
    return Change(seq, op, path, dst=dst, digest=digest)


class Node:
    """A node's replicated tree and state folder (``sender/`` and ``receiver/`` below it)."""

    def __init__(self, tmp: Path) -> None:
        self.root = tmp / "root"
        self.state = tmp / "state"
        (self.root / "data").mkdir(parents=True)
        self.state.mkdir()

    def write(self, rel: str, data: bytes) -> Path:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return p

    def journal(self, *entries: tuple[Change, bytes | None]) -> str:
        """Write a sender journal holding ``entries`` (seqs from 1); return its id."""
        j = Journal.open(self.state / "sender" / "journal", fsync=False)
        try:
            for c, content in entries:
                j.append(c, content)
            j.commit()
            return j.id
        finally:
            j.close()

    def cache(self, part: str, *rels: str) -> HashCache:
        """Record the files' current versions in a part's hash cache, saved to disk."""
        cache = HashCache.load(self.state / part / "hashcache")
        for rel in rels:
            p = self.root / rel
            cache.put_key(rel, stat_key(p, os.stat(p)), digest_bytes(p.read_bytes()))
        (self.state / part).mkdir(exist_ok=True)
        cache.save(self.state / part / "hashcache")
        return cache

    def find(self, applied: int | None, journal_id: str | None = None) -> dict[str, str]:
        d = q.find_divergence(self.root, INCLUDE, self.state, applied, journal_id=journal_id)
        return {s.path: s.why for s in d.suspects}

    def quarantine(self, *paths: str, epoch: int = 7, now: datetime = NOW) -> q.QuarantineResult:
        return q.quarantine(
            self.state, self.root, [Suspect(p, "unshipped") for p in paths], epoch=epoch, now=now
        )

    @property
    def qdir(self) -> Path:
        return self.state / "quarantine"


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


def lines(folder: Path) -> list[dict[str, object]]:
    return q.manifest(folder)


# -- shipped_versions (pure) -----------------------------------------------------------------------------


def test_shipped_versions_puts_touches_and_deletes() -> None:
    a1, a2, b, c = digest_bytes(b"a1"), digest_bytes(b"a2"), digest_bytes(b"b"), digest_bytes(b"c")
    changes = [
        change(1, Op.PUT, "d/a", digest=a1),
        change(2, Op.PUT, "d/b", digest=b),
        change(3, Op.DELETE, "d/b"),
        change(4, Op.TOUCH, "d/a", digest=a2),
        change(5, Op.PUT, "d/c", digest=c),
        change(6, Op.DELETE, "d/a"),
    ]
    shipped, unacked = q.shipped_versions(changes, 4)
    assert shipped == {"d/a": a2, "d/b": None}
    assert unacked == {"d/c", "d/a"}


def test_shipped_versions_renames_files_and_folders() -> None:
    x, y, f, z, old = (digest_bytes(n) for n in (b"x", b"y", b"f", b"z", b"old"))
    changes = [
        change(1, Op.PUT, "d/x", digest=x),
        change(2, Op.PUT, "d/sub/y", digest=y),
        change(3, Op.PUT, "f", digest=f),
        change(4, Op.PUT, "e/stale", digest=old),
        change(5, Op.RMDIR, "e"),
        change(6, Op.RENAME, "d", dst="e"),  # a folder: everything below moves
        change(7, Op.PUT, "g", digest=old),
        change(8, Op.RENAME, "f", dst="g"),  # onto a file: replaces it
        change(9, Op.PUT, "z", digest=z),
        change(10, Op.RENAME, "g", dst="h"),  # after applied
    ]
    shipped, unacked = q.shipped_versions(changes, 9)
    assert shipped == {
        "d/x": None,
        "d/sub/y": None,
        "e/x": x,
        "e/sub/y": y,
        "f": None,
        "g": f,
        "z": z,
    }
    assert unacked == {"g", "h"}


def test_shipped_versions_rename_of_an_unknown_source_forgets_the_destination() -> None:
    d = digest_bytes(b"d")
    shipped, _ = q.shipped_versions([change(1, Op.PUT, "b", digest=d), change(2, Op.RENAME, "a", dst="b")], 2)
    assert shipped == {}


def test_shipped_versions_with_nothing_applied_leaves_everything_unacknowledged() -> None:
    changes = [put("a", b"1", 1), change(2, Op.RENAME, "a", dst="b"), change(3, Op.MKDIR, "m")]
    assert q.shipped_versions(changes, None) == ({}, {"a", "b", "m"})


# -- find_divergence -------------------------------------------------------------------------------------


def test_a_file_changed_after_applied_is_unacknowledged(node: Node) -> None:
    node.write("data/a", b"A")
    node.write("data/c", b"C")
    node.journal((put("data/a", b"A"), b"A"), (put("data/c", b"C"), b"C"))
    node.cache("sender", "data/a", "data/c")  # the sender hashed both: the cache does not excuse data/c
    assert node.find(1) == {"data/c": "unacknowledged"}
    assert node.find(None) == {"data/a": "unacknowledged", "data/c": "unacknowledged"}


def test_a_file_edited_on_disk_and_never_shipped_is_unshipped(node: Node) -> None:
    node.write("data/b", b"shipped")
    node.journal((put("data/b", b"shipped"), b"shipped"))
    node.cache("sender", "data/b")
    node.write("data/b", b"edited after the fork")  # another size: no cache entry matches
    node.write("data/new", b"never journaled")
    assert node.find(1) == {"data/b": "unshipped", "data/new": "unshipped"}


def test_a_file_matching_the_receiver_cache_is_not_a_suspect(node: Node) -> None:
    node.write("data/r", b"received from the old active")
    node.cache("receiver", "data/r")
    d = q.find_divergence(node.root, INCLUDE, node.state, None)
    assert d == q.Divergence([], None, 1)


def test_a_file_matching_the_sender_cache_is_not_a_suspect(node: Node) -> None:
    node.write("data/s", b"scanned by our sender")
    node.journal((put("data/other", b"o"), b"o"))
    node.cache("sender", "data/s")
    assert node.find(1) == {}


def test_same_content_as_shipped_with_another_stat_is_not_a_suspect(node: Node) -> None:
    p = node.write("data/a", b"content")
    node.journal((put("data/a", b"content"), b"content"))
    cache = node.cache("receiver", "data/a")
    os.utime(p, ns=(1_000_000_000, 1_000_000_000))  # mtime and change time move, the content does not
    assert cache.get("data/a", stat_key(p, os.stat(p))) is None
    assert node.find(1) == {}
    p.write_bytes(b"CONTENT")
    assert node.find(1) == {"data/a": "unshipped"}


def test_files_below_a_folder_renamed_after_applied_are_unacknowledged(node: Node) -> None:
    node.write("data/new/x", b"x")
    node.journal((put("data/old/x", b"x"), b"x"), (change(0, Op.RENAME, "data/old", dst="data/new"), None))
    node.cache("sender", "data/new/x")  # the sender moved its cache entry with the rename
    assert node.find(1) == {"data/new/x": "unacknowledged"}
    assert node.find(2) == {}


def test_another_journal_id_counts_nothing_as_applied(node: Node) -> None:
    node.write("data/a", b"A")
    jid = node.journal((put("data/a", b"A"), b"A"))
    assert node.find(1, journal_id=jid) == {}
    assert node.find(1, journal_id="0" * 32) == {"data/a": "unacknowledged"}
    assert q.find_divergence(node.root, INCLUDE, node.state, 1).journal_id == jid


def test_a_journal_with_entries_the_active_did_not_apply_is_said_to_be_so(node: Node) -> None:
    """What decides whether a rejoin retires the journal: entries after ``applied`` (or of unknown fate)."""
    node.write("data/a", b"A")
    node.write("data/c", b"C")
    jid = node.journal((put("data/a", b"A"), b"A"), (put("data/c", b"C"), b"C"))
    d = q.find_divergence
    assert d(node.root, INCLUDE, node.state, 2, journal_id=jid).unapplied is False
    assert d(node.root, INCLUDE, node.state, 1, journal_id=jid).unapplied is True
    assert d(node.root, INCLUDE, node.state, None).unapplied is True
    assert d(node.root, INCLUDE, node.state, 2, journal_id="0" * 32).unapplied is True


def test_no_journal_and_no_caches_make_every_file_unshipped(node: Node) -> None:
    node.write("data/a", b"A")
    node.write("data/sub/b", b"B")
    d = q.find_divergence(node.root, INCLUDE, node.state, 3)
    assert d.journal_id is None and d.scanned == 2
    assert sorted(d.suspects, key=lambda s: s.path) == [
        Suspect("data/a", "unshipped"),
        Suspect("data/sub/b", "unshipped"),
    ]
    assert not (node.state / "sender").exists()


def test_a_file_that_will_not_hold_still_is_a_suspect(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    node.write("data/busy", b"being written")
    monkeypatch.setattr(q, "read_stable", lambda *a, **kw: Unstable("file changed while it was read"))
    assert node.find(None) == {"data/busy": "unshipped"}


def test_the_journal_is_only_read_and_a_torn_tail_stays(node: Node) -> None:
    node.write("data/a", b"A")
    node.journal((put("data/a", b"A"), b"A"), (put("data/b", b"B"), b"B"))
    folder = node.state / "sender" / "journal"
    seg = sorted(folder.glob("*.sbj"))[-1]
    with open(seg, "ab") as f:
        f.write(b"\x40\x00\x00\x00torn")  # a frame cut short: a writable open would cut it
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert node.find(1) == {}
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_the_state_folder_inside_the_root_is_skipped(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "data" / "state").mkdir(parents=True)
    (root / "data" / "state" / "x").write_bytes(b"state")
    (root / "data" / "a").write_bytes(b"A")
    d = q.find_divergence(root, INCLUDE, root / "data" / "state", None, skip=root / "data" / "state")
    assert d.suspects == [Suspect("data/a", "unshipped")]


# -- quarantine ------------------------------------------------------------------------------------------


def test_quarantine_moves_files_byte_for_byte_with_a_manifest(node: Node) -> None:
    a = bytes(range(256)) * 40
    node.write("data/a", a)
    node.write("data/sub/b", b"")
    ino = os.stat(node.root / "data/a").st_ino
    res = q.quarantine(
        node.state,
        node.root,
        [
            Suspect("data/a", "unacknowledged"),
            Suspect("data/sub/b", "unshipped"),
            Suspect("data/gone", "unshipped"),
        ],
        epoch=7,
        now=NOW + timedelta(hours=1),
    )
    folder = node.qdir / "20261125T110000Z-epoch-7"
    assert res == q.QuarantineResult(folder, 2, len(a))
    assert (folder / "files/data/a").read_bytes() == a
    assert os.stat(folder / "files/data/a").st_ino == ino  # moved, not copied
    assert (folder / "files/data/sub/b").read_bytes() == b""
    assert not (node.root / "data/a").exists() and not (node.root / "data/sub/b").exists()
    assert lines(folder) == [
        {
            "path": "data/a",
            "size": len(a),
            "hash": digest_bytes(a).hex(),
            "why": "unacknowledged",
            "stored": "files/data/a",
        },
        {
            "path": "data/sub/b",
            "size": 0,
            "hash": digest_bytes(b"").hex(),
            "why": "unshipped",
            "stored": "files/data/sub/b",
        },
    ]
    assert [p.name for p in node.qdir.iterdir()] == [folder.name]


def test_nothing_to_quarantine_creates_nothing(node: Node) -> None:
    assert node.quarantine() == q.QuarantineResult(None, 0, 0)
    assert node.quarantine("data/missing") == q.QuarantineResult(None, 0, 0)
    assert not node.qdir.exists()


def test_a_suspect_path_outside_the_rules_is_refused_before_anything_moves(node: Node) -> None:
    node.write("data/a", b"A")
    with pytest.raises(PathRejected):
        node.quarantine("data/a", "../escape")
    assert (node.root / "data/a").exists() and not node.qdir.exists()


def fail_on(calls: list[Path], fail: Callable[[Path], OSError | None]) -> Callable[[Path, Path], None]:
    """A ``_replace`` that records its sources and raises ``fail(src)`` when that is not None."""

    def replace(src: Path, dst: Path) -> None:
        calls.append(src)
        e = fail(src)
        if e is not None:
            raise e
        os.replace(src, dst)

    return replace


def test_an_interrupted_quarantine_resumes_and_lists_each_file_once(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in "abc":
        node.write(f"data/{name}", name.encode() * 10)
    calls: list[Path] = []
    crash = fail_on(calls, lambda src: OSError(errno.EIO, "I/O error") if src.name == "b" else None)
    monkeypatch.setattr(q, "_replace", crash)
    with pytest.raises(ReplicationError, match="data/b"):
        node.quarantine("data/a", "data/b")  # a moved; b listed (the line comes first), then the crash
    partial = node.qdir / "20261125T100000Z-epoch-7.partial"
    assert [e["path"] for e in lines(partial)] == ["data/a", "data/b"]
    assert not (node.root / "data/a").exists() and (node.root / "data/b").exists()
    with open(partial / "manifest.jsonl", "ab") as f:
        f.write(b'{"path": "data/c", "si')  # and a line torn by the crash
    monkeypatch.undo()

    res = node.quarantine("data/a", "data/b", "data/c", now=NOW + timedelta(minutes=5))
    folder = node.qdir / "20261125T100000Z-epoch-7"  # the partial's name, not the time of the resume
    assert res == q.QuarantineResult(folder, 3, 30)
    assert [e["path"] for e in lines(folder)] == ["data/a", "data/b", "data/c"]
    for name in "abc":
        assert (folder / "files/data" / name).read_bytes() == name.encode() * 10
        assert not (node.root / "data" / name).exists()
    assert sorted(p.name for p in node.qdir.iterdir()) == [folder.name]


def test_a_new_version_of_a_quarantined_path_never_overwrites_it(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    node.write("data/a", b"first")
    node.write("data/b", b"b")
    monkeypatch.setattr(
        q, "_replace", fail_on([], lambda src: OSError(errno.EIO, "x") if src.name == "b" else None)
    )
    with pytest.raises(ReplicationError):
        node.quarantine("data/a", "data/b")
    monkeypatch.undo()
    node.write("data/a", b"second version")  # written again after it was moved
    res = node.quarantine("data/a", "data/b")
    assert res.folder is not None and res.files == 3
    assert [(e["path"], e["stored"]) for e in lines(res.folder)] == [
        ("data/a", "files/data/a"),
        ("data/b", "files/data/b"),
        ("data/a", "files-2/data/a"),
    ]
    assert (res.folder / "files/data/a").read_bytes() == b"first"
    assert (res.folder / "files-2/data/a").read_bytes() == b"second version"


def test_another_volume_copies_then_unlinks(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    content = b"x" * 5000
    p = node.write("data/a", content)
    os.utime(p, ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    calls: list[Path] = []
    monkeypatch.setattr(
        q, "_replace", fail_on(calls, lambda src: OSError(errno.EXDEV, "Invalid cross-device link"))
    )
    res = node.quarantine("data/a")
    assert calls == [p]
    assert res.folder is not None and res.files == 1 and res.bytes == 5000
    moved = res.folder / "files/data/a"
    assert moved.read_bytes() == content and not p.exists()
    assert os.stat(moved).st_mtime_ns == 1_500_000_000_000_000_000
    assert sorted(x.name for x in moved.parent.iterdir()) == ["a"]  # no temporary copy left


def test_a_copy_across_volumes_interrupted_before_the_unlink_is_finished(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    node.write("data/a", b"A" * 100)
    node.write("data/b", b"B")

    def fail(src: Path) -> OSError:
        return OSError(errno.EXDEV, "cross-device") if src.name == "a" else OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(q, "_replace", fail_on([], fail))
    with pytest.raises(ReplicationError):
        node.quarantine("data/a", "data/b")
    monkeypatch.undo()
    node.write("data/a", b"A" * 100)  # as if the crash came between the copy and the unlink
    res = node.quarantine("data/a", "data/b")
    assert res.folder is not None and res.files == 2
    assert [e["path"] for e in lines(res.folder)] == ["data/a", "data/b"]
    assert not (node.root / "data/a").exists() and not (node.root / "data/b").exists()


def test_a_partial_folder_of_another_epoch_is_finished_as_it_stands(node: Node) -> None:
    stray = node.qdir / "20261101T000000Z-epoch-5.partial"
    (stray / "files/data").mkdir(parents=True)
    (stray / "files/data/old").write_bytes(b"old")
    (stray / "manifest.jsonl").write_text(
        json.dumps({"path": "data/old", "size": 3, "hash": None, "why": "unshipped"}) + "\n"
    )
    res = node.quarantine(epoch=7)
    assert res == q.QuarantineResult(None, 0, 0)
    assert [(f.id, f.files, f.bytes) for f in q.list_folders(node.state)] == [
        ("20261101T000000Z-epoch-5", 1, 3)
    ]


# -- retiring the journal --------------------------------------------------------------------------------


def test_retire_journal_into_the_quarantine_folder_is_idempotent(node: Node) -> None:
    node.write("data/a", b"A")
    jid = node.journal((put("data/a", b"A"), b"A"))
    res = node.quarantine("data/a")
    assert res.folder is not None
    where = q.retire_journal(node.state, res.folder, NOW)
    assert where == res.folder / "sender-journal"
    assert (where / "journal.id").read_text().strip() == jid
    assert not (node.state / "sender" / "journal").exists()
    assert q.retire_journal(node.state, res.folder, NOW) == where
    assert [e["path"] for e in lines(res.folder)] == ["data/a"]


def test_retire_journal_without_a_folder(node: Node) -> None:
    assert q.retire_journal(node.state, None, NOW) is None
    node.journal((put("data/a", b"A"), b"A"))
    where = q.retire_journal(node.state, None, NOW)
    assert where == node.qdir / "retired-journal-20261125T100000Z"
    assert (where / "journal.id").exists()
    assert q.list_folders(node.state) == []


# -- listing and acknowledging ---------------------------------------------------------------------------


def test_list_acknowledge_and_count(node: Node) -> None:
    node.write("data/a", b"12345")
    node.write("data/b", b"123")
    node.write("data/c", b"1")
    first = node.quarantine("data/a", "data/b", epoch=3, now=NOW)
    second = node.quarantine("data/c", epoch=4, now=NOW + timedelta(days=1))
    assert first.folder is not None and second.folder is not None
    (node.qdir / "20261201T000000Z-epoch-9.partial").mkdir()  # being filled: not listed
    folders = q.list_folders(node.state)
    assert [(f.id, f.epoch, f.created, f.files, f.bytes, f.acknowledged, f.path) for f in folders] == [
        ("20261125T100000Z-epoch-3", 3, "2026-11-25T10:00:00Z", 2, 8, False, first.folder),
        ("20261126T100000Z-epoch-4", 4, "2026-11-26T10:00:00Z", 1, 1, False, second.folder),
    ]
    assert q.unacknowledged_files(node.state) == 3

    assert q.acknowledge(node.state, "20261125T100000Z-epoch-3", now=NOW) == ["20261125T100000Z-epoch-3"]
    assert (first.folder / "ACKNOWLEDGED").read_text() == "2026-11-25T10:00:00Z\n"
    assert q.unacknowledged_files(node.state) == 1
    assert q.acknowledge(node.state, None) == ["20261126T100000Z-epoch-4"]
    assert q.acknowledge(node.state, None) == []
    assert q.unacknowledged_files(node.state) == 0
    assert (first.folder / "files/data/a").read_bytes() == b"12345"  # nothing deleted


def test_acknowledging_an_unknown_id_names_it_and_the_known_ones(node: Node) -> None:
    node.write("data/a", b"A")
    node.quarantine("data/a")
    with pytest.raises(ConfigError, match=r"'nope'.*20261125T100000Z-epoch-7"):
        q.acknowledge(node.state, "nope")
    assert q.list_folders(node.state)[0].acknowledged is False


def test_no_quarantine_folder_lists_nothing(tmp_path: Path) -> None:
    assert q.list_folders(tmp_path) == []
    assert q.unacknowledged_files(tmp_path) == 0
    with pytest.raises(ConfigError, match="none"):
        q.acknowledge(tmp_path, "x")
