"""The Synergy Join simulator: layout, determinism, valid content, and a real crash leaving a torn cookie."""

from __future__ import annotations

import base64
import gzip
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.guard import GuardRule, check_content
from engine.guards import run_command_rule
from engine.simulator import (
    COOKIE_MAX_CHARS,
    COOKIE_MIN_CHARS,
    MEETING_MAX_BYTES,
    MEETING_MIN_BYTES,
    ServiceSimulator,
    room_id,
    torn_write,
)

BASE64 = GuardRule("databases/**/sync.cookie", "base64")
JSON = GuardRule("databases/**/*.json", "json")

#: A validator that understands the cookie's payload (gzip): it catches cuts the base64 rule cannot.
GZIP_VALIDATOR = GuardRule(
    "databases/**/sync.cookie",
    "command",
    command=(
        sys.executable,
        "-c",
        "import base64, gzip, sys\n"
        "try:\n"
        "    gzip.decompress(base64.b64decode(open(sys.argv[1], 'rb').read().strip(), validate=True))\n"
        "except Exception as e:\n"
        "    sys.exit(f'not a whole sync state: {e}')\n",
        "{path}",
    ),
)

MEETING_NAME = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\.json")


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def simulator(root: Path, seed: int = 0, **kw: int) -> ServiceSimulator:
    return ServiceSimulator(root, seed=seed, piece_delay=0, **kw)


def assert_tree_valid(sim: ServiceSimulator) -> None:
    tree = snapshot(sim.root)
    assert json.loads(tree.pop("config/config.json"))["rooms"][0]["id"] == room_id(1)
    for room in sim.rooms:
        cookie = tree.pop(f"databases/{room}/sync.cookie")
        assert COOKIE_MIN_CHARS <= len(cookie) <= COOKIE_MAX_CHARS
        assert check_content(BASE64, cookie).good
        assert gzip.decompress(base64.b64decode(cookie, validate=True)).startswith(room.encode())
        meetings = sorted(f"{m}.json" for m in sim.meetings(room))
        assert sorted(p.rpartition("/")[2] for p in tree if p.startswith(f"databases/{room}/")) == meetings
        for name in meetings:
            data = tree.pop(f"databases/{room}/{name}")
            assert MEETING_NAME.fullmatch(name)
            assert MEETING_MIN_BYTES <= len(data) <= MEETING_MAX_BYTES
            assert check_content(JSON, data).good
            doc = json.loads(data)
            assert doc["id"] == name.removesuffix(".json") and doc["room"] == room
            assert doc["start"] < doc["end"] and doc["dialIn"].startswith("https://")
            assert {"subject", "organizer", "attendees", "sequence"} <= doc.keys()
    assert tree == {}


def test_setup_layout(tmp_path: Path) -> None:
    sim = simulator(tmp_path, rooms=3, meetings_per_room=4)
    sim.setup()
    assert sorted(p.name for p in (tmp_path / "databases").iterdir()) == [
        "room-0001@example.com",
        "room-0002@example.com",
        "room-0003@example.com",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config", "databases"]
    for room in sim.rooms:
        assert len(sim.meetings(room)) == 4
    assert_tree_valid(sim)


def test_batches_keep_the_tree_valid_and_report_what_they_touched(tmp_path: Path) -> None:
    sim = simulator(tmp_path, rooms=4, meetings_per_room=3, seed=7)
    sim.setup()
    before = snapshot(tmp_path)
    seen: set[str] = set()
    for _ in range(40):
        paths = sim.batch()
        assert paths and len(paths) == len(set(paths))
        assert any(p.endswith("/sync.cookie") for p in paths)
        for p in paths:
            assert not p.startswith("/") and "\\" not in p
            assert (tmp_path / p).exists() or p.endswith(".json")  # a deleted meeting is gone
        seen.update(paths)
    assert_tree_valid(sim)
    after = snapshot(tmp_path)
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    assert changed <= seen
    deleted, booked = before.keys() - after.keys(), after.keys() - before.keys()
    updated = {p for p in before.keys() & after.keys() & changed if not p.endswith("sync.cookie")}
    assert deleted and booked and updated, "40 batches should delete, book and update meetings"


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    trees, touched = [], []
    for name in ("a", "b"):
        sim = simulator(tmp_path / name, seed=42, rooms=3, meetings_per_room=5)
        sim.setup()
        touched.append([sim.batch() for _ in range(15)])
        trees.append(snapshot(tmp_path / name))
    assert trees[0] == trees[1]
    assert touched[0] == touched[1]
    other = simulator(tmp_path / "c", seed=43, rooms=3, meetings_per_room=5)
    other.setup()
    assert snapshot(tmp_path / "c") != snapshot(tmp_path / "a")


def test_command_line_matches_the_library(tmp_path: Path) -> None:
    args = ["--rooms", "2", "--meetings-per-room", "3", "--seed", "9", "--batches", "4", "--rate", "0"]
    proc = subprocess.run(
        [sys.executable, "-m", "engine.simulator", str(tmp_path / "cli"), *args, "--piece-delay", "0"],
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert proc.stdout.strip() == b"batches=4"
    sim = simulator(tmp_path / "lib", seed=9, rooms=2, meetings_per_room=3)
    assert sim.run(batches=4, rate=0) == 4
    assert snapshot(tmp_path / "cli") == snapshot(tmp_path / "lib")


def test_run_paces_batches(tmp_path: Path) -> None:
    sim = simulator(tmp_path, rooms=1, meetings_per_room=1)
    started = time.monotonic()
    done = sim.run(seconds=0.3, rate=20)
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 2
    assert 2 <= done <= 8


def test_batch_before_setup_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        simulator(tmp_path).batch()


@pytest.mark.parametrize("stop_after", [0, 1, 1023, 2049])
def test_torn_write(tmp_path: Path, stop_after: int) -> None:
    path = tmp_path / "sync.cookie"
    whole = base64.b64encode(bytes(range(256)) * 12)
    path.write_bytes(whole)
    torn_write(path, whole, stop_after)
    assert path.read_bytes() == whole[:stop_after]
    assert not check_content(BASE64, path.read_bytes()).good
    with pytest.raises(ValueError):
        torn_write(path, whole, len(whole) + 1)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX; Windows exits with os._exit(137)")
@pytest.mark.parametrize("crash_after", [1000, 1001, 1002, 1003])
def test_crash_mode_dies_by_sigkill_leaving_a_torn_cookie(tmp_path: Path, crash_after: int) -> None:
    root = tmp_path / "service"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.simulator",
            str(root),
            "--rooms",
            "3",
            "--meetings-per-room",
            "2",
            "--rate",
            "0",
            "--piece-delay",
            "0.001",
            "--crash-after-bytes",
            str(crash_after),
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert b"batches=" not in proc.stdout  # no clean exit path ran
    match = re.search(rb"simulator\.crash path=(\S+) written=(\d+) of=(\d+)", proc.stderr)
    assert match, proc.stderr
    torn = Path(match[1].decode())
    assert int(match[2]) == crash_after < int(match[3])

    cookies = sorted(root.glob("databases/*/sync.cookie"))
    assert len(cookies) == 3 and torn in cookies
    for cookie in cookies:
        data = cookie.read_bytes()
        if cookie != torn:
            assert check_content(BASE64, data).good
            assert run_command_rule(GZIP_VALIDATOR, str(cookie)).good
            continue
        assert len(data) == crash_after
        verdict = check_content(BASE64, data)
        if crash_after % 4:
            assert verdict.reason == f"truncated base64 (length {crash_after} is not a multiple of 4)"
        else:
            # The base64 rule's blind spot: a cut at a multiple of 4 is valid base64. Only a validator
            # that understands the payload sees that this cookie is torn.
            assert verdict.good
        payload_verdict = run_command_rule(GZIP_VALIDATOR, str(cookie))
        assert not payload_verdict.good
        assert "not a whole sync state" in payload_verdict.reason
