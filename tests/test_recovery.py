"""Recovery of single files from the journal (engine.recovery): following a path through random histories
matches what the real applier leaves on disk after every entry (hypothesis); versions, restore in place,
folders, dry runs, refusals naming the window, and the commands `standby journal show --path` and
`standby restore`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.apply import Applier, PendingOp
from engine.digest import digest_bytes
from engine.errors import ConfigError
from engine.journal import Journal
from engine.model import Change, Op
from engine.recovery import Follow, follow_versions, restore, versions
from tests.pair import ROOT, Pair
from tests.test_journal import put

NAMES = ["a", "b", "d/x", "d/y", "d/e/z", "f/x"]
FOLDERS = ["d", "d/e", "f"]


def _op(draw: st.DrawFn, i: int) -> tuple[Change, bytes | None]:
    kind = draw(st.sampled_from(["put", "put", "put", "delete", "rmdir", "rename", "rename_dir"]))
    if kind == "put":
        path = draw(st.sampled_from(NAMES))
        data = f"{path}-{i}".encode() * draw(st.integers(1, 3))
        return put(path, data, mtime_ns=1_700_000_000_000_000_000 + i), data
    if kind == "delete":
        return Change(0, Op.DELETE, draw(st.sampled_from(NAMES))), None
    if kind == "rmdir":
        return Change(0, Op.RMDIR, draw(st.sampled_from(FOLDERS))), None
    src = draw(st.sampled_from(NAMES if kind == "rename" else FOLDERS))
    dst = draw(st.sampled_from(NAMES if kind == "rename" else FOLDERS))
    return Change(0, Op.RENAME, src, dst=dst), None


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[Change, bytes | None]]:
    n = draw(st.integers(1, 25))
    return [_op(draw, i) for i in range(n)]


def _files(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            full = Path(dirpath) / f
            out[full.relative_to(root).as_posix()] = full.read_bytes()
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=histories())
def test_following_matches_the_applier_after_every_entry(
    tmp_path_factory: pytest.TempPathFactory, history: list[tuple[Change, bytes | None]]
) -> None:
    """The oracle is the real applier: after each entry, what Follow says each path holds (by digest) is
    what the applier left on disk."""
    root = tmp_path_factory.mktemp("tree")
    applier = Applier(root, fsync=False)
    f = Follow(known=True)
    try:
        for seq, (c, data) in enumerate(history, start=1):
            c = replace(c, seq=seq)
            if c.op is Op.RENAME and (
                c.dst == c.path or c.dst.startswith(c.path + "/") or c.path.startswith(c.dst + "/")
            ):
                continue  # into itself or over its own folder: no file system does it, nothing journals it
            applier.apply_batch([PendingOp(c, data=data)])
            f.apply(c)
            on_disk = {p: digest_bytes(b) for p, b in _files(root).items()}
            assert {p: h.digest for p, h in f.files.items()} == on_disk, (seq, c)
    finally:
        applier.close()


def _journal(folder: Path, entries: list[tuple[Change, bytes | None]], t0: int = 1_764_064_800) -> None:
    with closing(Journal.open(folder, fsync=False)) as j:
        for i, (c, data) in enumerate(entries):
            j.append(replace(c, ts_ns=(t0 + 60 * i) * 1_000_000_000), data)
        j.commit()


def _config_history(folder: Path) -> None:
    v = [b'{"rooms": 10}', b'{"rooms": 11}', b"{broken", b'{"rooms": 12}']
    _journal(
        folder,
        [
            (put("config/config.json", v[0], mtime_ns=1), v[0]),  # 10:00 UTC
            (put("databases/r1/m1.json", b"m1"), b"m1"),  # 10:01
            (put("config/config.json", v[1], mtime_ns=2), v[1]),  # 10:02
            (put("config/config.json", v[2], mtime_ns=3), v[2]),  # 10:03: broken
            (Change(0, Op.RENAME, "databases/r1", dst="databases/r2"), None),  # 10:04
            (put("config/config.json", v[3], mtime_ns=4), v[3]),  # 10:05
            (Change(0, Op.DELETE, "databases/r2/m1.json"), None),  # 10:06
        ],
    )


def test_versions_list_every_change_of_a_path_with_its_time(tmp_path: Path) -> None:
    _config_history(tmp_path / "journal")
    window, found = versions(tmp_path / "journal", "config/config.json")
    assert (window.first, window.head, window.pruned) == (1, 7, False)
    assert [(v.seq, v.op, v.held.size if v.held else None) for v in found] == [
        (1, "put", 13),
        (3, "put", 13),
        (4, "put", 7),
        (6, "put", 13),
    ]
    _w, moved = versions(tmp_path / "journal", "databases/r2/m1.json")
    assert [(v.seq, v.op, v.other) for v in moved] == [
        (5, "moved-with-folder", "databases/r1/m1.json"),
        (7, "delete", "databases/r2/m1.json"),
    ]


def test_restore_puts_the_file_back_as_it_was_and_refuses_what_the_journal_cannot_say(tmp_path: Path) -> None:
    _config_history(tmp_path / "journal")
    root = tmp_path / "root"
    (root / "config").mkdir(parents=True)
    (root / "config" / "config.json").write_bytes(b'{"rooms": 12}')
    at_1002_30 = (1_764_064_800 + 150) * 1_000_000_000
    done = restore(tmp_path / "journal", root, "config/config.json", until_ns=at_1002_30)
    assert [(r.path, r.held.seq if r.held else None) for r in done] == [("config/config.json", 3)]
    assert (root / "config" / "config.json").read_bytes() == b'{"rooms": 11}'
    assert (root / "config" / "config.json").stat().st_mtime_ns == 2
    assert not list((root / "config").glob(".*restore*")), "no temp left behind"
    # A folder: every file below it as it was (here: before the rename, under its old name).
    done = restore(tmp_path / "journal", root, "databases/r1", until_seq=2)
    assert (root / "databases" / "r1" / "m1.json").read_bytes() == b"m1"
    # A dry run writes nothing.
    (root / "config" / "config.json").write_bytes(b"now")
    restore(tmp_path / "journal", root, "config/config.json", until_seq=1, dry_run=True)
    assert (root / "config" / "config.json").read_bytes() == b"now"
    # Nothing there then; and a moment before the window of a pruned journal.
    with pytest.raises(ConfigError, match="nothing was there at that moment"):
        restore(tmp_path / "journal", root, "databases/r2/m1.json", until_seq=7)
    with pytest.raises(ConfigError, match="outside the window"):
        restore(tmp_path / "journal", root, "config/config.json", until_seq=8)


def test_content_that_does_not_match_its_digest_is_never_written(tmp_path: Path) -> None:
    bad = put("config/config.json", b"right")
    _journal(tmp_path / "journal", [(replace(bad, digest=digest_bytes(b"wrong")), b"right")])
    root = tmp_path / "root"
    with pytest.raises(Exception, match="does not match the digest"):
        restore(tmp_path / "journal", root, "config/config.json", until_seq=1)
    assert not (root / "config" / "config.json").exists()


def test_follow_versions_of_a_folder_include_its_files(tmp_path: Path) -> None:
    changes = [
        replace(put("d/x", b"1"), seq=1),
        replace(put("d/e/z", b"2"), seq=2),
        Change(3, Op.RMDIR, "d"),
    ]
    got = [(v.seq, v.op, v.other) for v in follow_versions(changes, "d", known=True)]
    assert got == [
        (1, "put", "d/x"),
        (2, "put", "d/e/z"),
        (3, "removed-with-folder", "d/x"),
        (3, "removed-with-folder", "d/e/z"),
    ]


def _cli(pair: Pair, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine", *args, "--config", str(pair.config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_the_commands_show_and_restore_from_a_running_pair(pair: Pair) -> None:
    """Worked example of the README: config.json is broken; put the version before it back on the active;
    it replicates to the passive as a normal change."""
    cfg = pair.source / "config" / "config.json"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    pair.start("receive")
    pair.start("send")
    cfg.write_bytes(b'{"rooms": 10}')
    pair.wait_converged()
    cfg.write_bytes(b"{broken")
    pair.wait_converged()
    r = _cli(pair, "journal", "show", "--path", "config/config.json", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    good = [v for v in doc["versions"] if v["size"] == len(b'{"rooms": 10}')][-1]
    r = _cli(pair, "restore", "--path", "config/config.json", "--pos", str(good["seq"]))
    assert r.returncode == 0, r.stderr
    assert cfg.read_bytes() == b'{"rooms": 10}'
    pair.wait_converged()
    assert (pair.target / "config" / "config.json").read_bytes() == b'{"rooms": 10}'
    pair.stop_all()
    r = _cli(pair, "restore", "--path", "../etc/passwd", "--pos", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = _cli(pair, "journal", "show")
    assert r.returncode == 2 and "--path" in r.stderr


def test_restore_never_writes_through_a_symlink_out_of_the_root(tmp_path: Path) -> None:
    _config_history(tmp_path / "journal")
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "config").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ConfigError, match="not restored"):
        restore(tmp_path / "journal", root, "config/config.json", until_seq=3)
    assert list(outside.iterdir()) == []


def test_restore_refuses_what_a_pruned_journal_cannot_say_and_never_removes_a_folder(tmp_path: Path) -> None:
    old = b"older than the window"
    folder = tmp_path / "pruned"
    with closing(Journal.open(folder, fsync=False, segment_bytes=1)) as j:
        j.append(put("cfg/old.json", old), old)
        j.append(put("cfg/x", b"x"), b"x")
        j.append(Change(0, Op.RENAME, "cfg/old.json", dst="cfg/current.json"), None)
        j.append(put("other", b"o"), b"o")
        j.commit()
        j.prune(acked=2, keep_after_mtime=float("inf"))
    root = tmp_path / "root"
    with pytest.raises(ConfigError, match="older than the journal"):
        restore(folder, root, "cfg/current.json", until_seq=4)  # it came by a rename of a pruned put
    with pytest.raises(ConfigError, match="older than the journal"):
        restore(folder, root, "cfg/x", until_seq=4)
    # A folder stands where the file goes: refused, the folder and its files untouched.
    _config_history(tmp_path / "journal2")
    (root / "config" / "config.json").mkdir(parents=True)
    (root / "config" / "config.json" / "keep.txt").write_bytes(b"live data")
    with pytest.raises(ConfigError, match="a folder stands there now"):
        restore(tmp_path / "journal2", root, "config/config.json", until_seq=3)
    assert (root / "config" / "config.json" / "keep.txt").read_bytes() == b"live data"


def test_times_out_of_range_are_one_clear_error(pair: Pair) -> None:
    _journal(pair.sender_state / "journal", [(put("config/config.json", b"{}"), b"{}")])
    for when in ("0001-01-01T00:00:00", "noon"):
        r = _cli(pair, "restore", "--path", "config/config.json", "--at", when)
        one_line = len(r.stderr.strip().splitlines()) == 1
        assert r.returncode == 2 and "Traceback" not in r.stderr and one_line, (when, r.stderr)
    far = "9999-12-31T23:59:59-05:00"  # far ahead is a moment like any other: the latest state
    r = _cli(pair, "replay", "--into", str(pair.base / "far"), "--at", far, "--dry-run")
    assert r.returncode == 0 and "1 files" in r.stdout, r.stderr
