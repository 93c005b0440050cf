"""The benchmark's workload: a Synergy Join data folder, and the writes made to it, all from one seed.

Owns: generating the tree (the layout of :mod:`engine.simulator`, the stand-in for the service the tests
use: ``databases/<room>/<meeting>.json`` of 1-8 KB, one ``sync.cookie`` of 2-20 KB base64 per room and
``config/config.json``), and :class:`Writes`, which makes the new and rewritten files the measurements
write, deterministically, in place (truncate and write, no temp file), the way the service writes; and the
large file's content (seeded incompressible bytes, made once per run outside the tree, copied in place).

Must not: start processes or measure anything.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import random
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from engine.simulator import (
    CONFIG_PATH,
    COOKIE_MAX_CHARS,
    COOKIE_MIN_CHARS,
    COOKIE_NAME,
    EPOCH,
    MEETING_MAX_BYTES,
    MEETING_MIN_BYTES,
    NAMES,
    WORDS,
    cookie_relpath,
    meeting_relpath,
    room_id,
)

DEFAULT_FILES = 10_000
DEFAULT_ROOMS = 50
#: Width of the revision field in generated JSON, so a same-size rewrite only changes digits.
REV_DIGITS = 12


@dataclass(frozen=True)
class Workload:
    """A generated tree: what is in it, by relative POSIX path."""

    root: Path
    seed: int
    rooms: tuple[str, ...]
    meetings: tuple[str, ...]
    cookies: tuple[str, ...]
    config: str
    total_bytes: int

    @property
    def files(self) -> int:
        return len(self.meetings) + len(self.cookies) + 1


def generate(root: Path, files: int, seed: int) -> Workload:
    """Write ``files`` meeting files (rounded down to whole rooms) in up to 50 rooms under ``root``.

    The layout and sizes are the simulator's (:mod:`engine.simulator`); the text is drawn faster (slices
    of one seeded word list rather than word by word), so 100,000 files take seconds, not minutes.
    """
    rng = random.Random(seed)
    words = " ".join(rng.choices(WORDS, k=200_000))
    rooms = [room_id(i) for i in range(1, max(1, min(DEFAULT_ROOMS, files)) + 1)]
    per_room = files // len(rooms)
    (root / "config").mkdir(parents=True, exist_ok=True)
    config = {
        "service": {"name": "Synergy Join", "instance": f"bench-{seed}", "logLevel": "Information"},
        "exchange": {"url": "https://outlook.office365.com/EWS/Exchange.asmx", "syncIntervalSeconds": 30},
        "rooms": [{"id": room, "displayName": f"Room {i}"} for i, room in enumerate(rooms, 1)],
    }
    write_in_place(root / CONFIG_PATH, json.dumps(config, indent=2).encode("ascii"))
    for room in rooms:
        (root / "databases" / room).mkdir(parents=True, exist_ok=True)
        for _ in range(per_room):
            meeting = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            write_in_place(root / meeting_relpath(room, meeting), _meeting(rng, room, meeting, words))
        chars = rng.randint(COOKIE_MIN_CHARS, COOKIE_MAX_CHARS)
        payload = f"{room};gen=1;".encode() + rng.randbytes(max(1, chars * 3 // 4 - 40))
        write_in_place(root / cookie_relpath(room), base64.b64encode(gzip.compress(payload, 6, mtime=0)))
    return describe(root, seed)


def _meeting(rng: random.Random, room: str, meeting: str, words: str) -> bytes:
    start = EPOCH + timedelta(days=rng.randint(0, 90), minutes=15 * rng.randint(28, 72))
    organizer = rng.choice(NAMES)
    doc = {
        "id": meeting,
        "room": room,
        "subject": " ".join(rng.choices(WORDS, k=rng.randint(2, 5))).capitalize(),
        "organizer": {"name": organizer, "email": organizer.lower().replace(" ", ".") + "@example.com"},
        "start": start.isoformat(),
        "end": (start + timedelta(minutes=15 * rng.randint(1, 8))).isoformat(),
        "dialIn": f"https://join.example.com/meet/{rng.randrange(10**9, 10**10)}"
        f"?pwd={rng.getrandbits(64):016x}",
        "attendees": [rng.choice(NAMES) for _ in range(rng.randint(1, 6))],
        "sequence": 0,
        "notes": "",
    }
    bare = len(json.dumps(doc, indent=2))
    length = max(0, rng.randint(MEETING_MIN_BYTES, MEETING_MAX_BYTES) - bare)
    at = rng.randrange(0, len(words) - length - 1)
    doc["notes"] = words[at : at + length]
    return json.dumps(doc, indent=2).encode("ascii")


def describe(root: Path, seed: int) -> Workload:
    """List a generated tree (sorted, so the same seed gives the same lists)."""
    meetings: list[str] = []
    cookies: list[str] = []
    config = ""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        for name in sorted(filenames):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            total += os.stat(os.path.join(dirpath, name)).st_size
            if name == COOKIE_NAME:
                cookies.append(rel)
            elif rel == "config/config.json":
                config = rel
            else:
                meetings.append(rel)
    db = root / "databases"
    rooms = tuple(sorted(p.name for p in db.iterdir() if p.is_dir())) if db.is_dir() else ()
    return Workload(root, seed, rooms, tuple(meetings), tuple(cookies), config, total)


def meeting_json(rng: random.Random, rev: int, size: int, text: str) -> bytes:
    """A JSON document of exactly ``size`` bytes (at least about 80) whose revision field is ``rev``.

    The notes are a seeded slice of ``text``, so two documents of the same size differ in their bytes.
    """
    head = f'{{"rev": "{rev:0{REV_DIGITS}d}", "id": "{rng.getrandbits(128):032x}", "notes": "'
    tail = '"}\n'
    n = max(0, min(size - len(head) - len(tail), len(text) - 1))
    at = rng.randrange(0, len(text) - n)
    return (head + text[at : at + n] + tail).encode("ascii")


def write_in_place(path: Path, data: bytes) -> None:
    """Truncate and write, as the service does (no temp file, no rename)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


#: The large file is made and copied in pieces of this size.
LARGE_CHUNK = 1 << 20


def generate_large(path: Path, mib: int, seed: int) -> str:
    """Write ``mib`` MiB of seeded incompressible bytes to ``path``, in pieces (never whole in memory);
    their SHA-256 (hex)."""
    rng = random.Random(seed)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(mib):
            b = rng.randbytes(LARGE_CHUNK)
            h.update(b)
            f.write(b)
    return h.hexdigest()


def copy_in_place(src: Path, dst: Path) -> None:
    """Write ``src``'s bytes to ``dst`` as the service writes a file: truncate, write (1 MiB at a time),
    close; no temp file, no rename."""
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with open(src, "rb") as f:
            while b := f.read(LARGE_CHUNK):
                view = memoryview(b)
                while view:
                    view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def write_in_halves(path: Path, data: bytes, pause: float) -> None:
    """Write the first half, pause with the file open, write the rest: what a slow writer does."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        half = len(data) // 2
        os.write(fd, data[:half])
        time.sleep(pause)
        os.write(fd, data[half:])
    finally:
        os.close(fd)


class Writes:
    """Deterministic content for the measurements' writes, and the choice of which files to rewrite.

    Every call returns new content (a fresh revision), so a stale copy on the replica is never mistaken
    for the current one.
    """

    def __init__(self, workload: Workload, seed: int) -> None:
        self.workload = workload
        self.rng = random.Random(seed)
        self.rev = 0
        self._new = 0
        #: Every path handed out by :meth:`pick` or :meth:`new_path`: what a restore must undo.
        self.issued: set[str] = set()
        self._text = " ".join(self.rng.choices(WORDS, k=20_000))

    def content(self, size: int | None = None) -> bytes:
        self.rev += 1
        if size is None:
            size = self.rng.randint(MEETING_MIN_BYTES, MEETING_MAX_BYTES)
        return meeting_json(self.rng, self.rev, size, self._text)

    def same_size(self, previous: bytes) -> bytes:
        """Content of the same length as ``previous`` but different bytes."""
        return self.content(len(previous))

    def pick(self, count: int) -> list[str]:
        """``count`` existing meeting files, distinct while the tree has enough, in a seeded order."""
        pool = list(self.workload.meetings)
        out: list[str] = []
        while len(out) < count and pool:
            take = min(count - len(out), len(pool))
            out.extend(self.rng.sample(pool, take))
        self.issued.update(out)
        return out

    def new_path(self, tag: str) -> str:
        """A path for a new meeting file (in a seeded room) that no earlier call returned."""
        self._new += 1
        room = self.rng.choice(self.workload.rooms)
        rel = f"databases/{room}/{tag}-{self._new:06d}.json"
        self.issued.add(rel)
        return rel
