"""A stand-in for the Synergy Join service: writes the tree standby replicates, the way the service does.

Owns: a deterministic generator of the service's files under a root, for tests, soaks and benches:

- ``config/config.json``: the settings, valid JSON, rewritten in place now and then;
- ``databases/<room-id>/`` (``room-0007@example.com``): one folder per room;
- ``databases/<room-id>/<meeting-uuid>.json``: one 1-8 KB JSON file per meeting, booked (created), updated
  (rewritten in place: open, truncate, write, like a .NET ``FileStream`` with ``FileMode.Create``) and
  deleted;
- ``databases/<room-id>/sync.cookie``: the room's Exchange sync state, 2-20 KB of base64 text (the payload
  is gzip, as Exchange sync states are), rewritten IN PLACE after every batch that touched the room:
  truncated, then written in several pieces with a flush and a short sleep between pieces.

Everything written is a function of the seed (``random.Random(seed)``): the same seed and the same calls
give the same tree, byte for byte. Only the pacing (``run``) reads the clock.

Crash mode (``crash_after_bytes``) makes the process kill itself with SIGKILL (``os._exit`` on Windows)
after the first ``K`` bytes of a cookie rewrite were written and flushed, leaving a genuinely torn cookie.

Must not: import any engine module, or be imported by one: it is a test and bench tool that plays the
service's part. Only :func:`main` configures logging.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import logging
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

log = logging.getLogger(__name__)

CONFIG_PATH = "config/config.json"
DATABASES = "databases"
COOKIE_NAME = "sync.cookie"

#: Exit status of a crash on Windows, where a process cannot send itself SIGKILL.
CRASH_EXIT_CODE = 137

#: How many pieces a cookie rewrite is written in.
COOKIE_PIECES = 4

MEETING_MIN_BYTES = 1024
MEETING_MAX_BYTES = 8 * 1024
COOKIE_MIN_CHARS = 2 * 1024
COOKIE_MAX_CHARS = 20 * 1024

#: Chance that a batch also rewrites config/config.json.
CONFIG_REWRITE_CHANCE = 0.02

EPOCH = datetime(2030, 1, 7, 0, 0, tzinfo=UTC)  # a Monday; meeting times are offsets from it
WORDS = (
    "budget",
    "review",
    "sprint",
    "planning",
    "standup",
    "retro",
    "roadmap",
    "hiring",
    "sync",
    "customer",
    "demo",
    "design",
    "architecture",
    "security",
    "audit",
    "quarterly",
    "offsite",
    "launch",
    "onboarding",
    "training",
    "interview",
    "board",
    "update",
    "vendor",
    "call",
    "release",
    "triage",
    "incident",
    "postmortem",
    "workshop",
    "lunch",
    "kickoff",
    "strategy",
    "finance",
    "legal",
    "marketing",
    "sales",
)
NAMES = (
    "Ada Lovelace",
    "Alan Turing",
    "Grace Hopper",
    "Edsger Dijkstra",
    "Barbara Liskov",
    "Donald Knuth",
    "Frances Allen",
    "Ken Thompson",
    "Margaret Hamilton",
    "Radia Perlman",
    "John Backus",
    "Leslie Lamport",
)


def room_id(index: int) -> str:
    """The id (and folder name) of room ``index``, counted from 1: ``room-0007@example.com``."""
    return f"room-{index:04d}@example.com"


def meeting_relpath(room: str, meeting: str) -> str:
    return f"{DATABASES}/{room}/{meeting}.json"


def cookie_relpath(room: str) -> str:
    return f"{DATABASES}/{room}/{COOKIE_NAME}"


# ---------------------------------------------------------------------------------------------------------
# Writers. Each rewrites a file in place, the way the service does: no temp file, no rename.


def _piece_ends(length: int, pieces: int) -> list[int]:
    """End offsets of ``pieces`` near-equal pieces covering ``length`` bytes (no empty piece)."""
    pieces = max(1, min(pieces, length))
    return [length * (k + 1) // pieces for k in range(pieces)]


def _write_pieces(f: Any, data: bytes, pieces: int, piece_delay: float) -> None:
    start = 0
    for k, end in enumerate(_piece_ends(len(data), pieces)):
        if k and piece_delay > 0:
            time.sleep(piece_delay)
        f.write(data[start:end])
        f.flush()  # into the OS: what a reader (or the survivor of a crash) sees
        start = end


def write_in_place(path: Path, data: bytes, pieces: int = 1, piece_delay: float = 0.0) -> None:
    """Truncate ``path`` and write ``data`` in ``pieces`` flushed pieces, sleeping between pieces."""
    with open(path, "wb") as f:
        _write_pieces(f, data, pieces, piece_delay)


def torn_write(path: Path, data: bytes, stop_after: int) -> None:
    """Rewrite ``path`` in place but stop after its first ``stop_after`` bytes: the file a crash leaves."""
    if not 0 <= stop_after <= len(data):
        raise ValueError(f"stop_after must be within 0..{len(data)}, not {stop_after}")
    write_in_place(path, data[:stop_after], pieces=COOKIE_PIECES)


def crash_write(path: Path, data: bytes, stop_after: int, piece_delay: float = 0.0) -> NoReturn:
    """Rewrite ``path`` in place, and kill this process once ``stop_after`` bytes are written and flushed.

    The file is still open when the process dies, as when the real service is killed mid-write.
    """
    if not 0 <= stop_after <= len(data):
        raise ValueError(f"stop_after must be within 0..{len(data)}, not {stop_after}")
    f = open(path, "wb")  # noqa: SIM115 - deliberately never closed: the process dies holding it
    _write_pieces(f, data[:stop_after], COOKIE_PIECES, piece_delay)
    log.warning("simulator.crash path=%s written=%d of=%d", path, stop_after, len(data))
    kill_self()


def kill_self() -> NoReturn:
    """End this process at once, with no clean-up: SIGKILL on POSIX, ``os._exit`` on Windows."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if sys.platform == "win32":
        os._exit(CRASH_EXIT_CODE)
    else:
        os.kill(os.getpid(), signal.SIGKILL)
        # SIGKILL cannot be caught; this line is never reached but keeps the NoReturn promise.
        os._exit(CRASH_EXIT_CODE)


# ---------------------------------------------------------------------------------------------------------
# The simulator.


class ServiceSimulator:
    """Generates and mutates a Synergy Join tree under ``root``, deterministically from ``seed``.

    Call :meth:`setup` once, then :meth:`batch` as often as wanted (or :meth:`run` to pace batches).
    ``piece_delay`` is the sleep between the pieces of a cookie rewrite (0 in tests). With
    ``crash_after_bytes`` set, the first cookie rewrite of a batch whose new content is longer than that
    many bytes kills the process after writing them.
    """

    def __init__(
        self,
        root: Path,
        rooms: int = 5,
        meetings_per_room: int = 20,
        seed: int = 0,
        *,
        piece_delay: float = 0.005,
        crash_after_bytes: int | None = None,
    ) -> None:
        if rooms < 1:
            raise ValueError(f"rooms must be at least 1, not {rooms}")
        if meetings_per_room < 0:
            raise ValueError(f"meetings_per_room must not be negative, not {meetings_per_room}")
        if crash_after_bytes is not None and crash_after_bytes < 0:
            raise ValueError(f"crash_after_bytes must not be negative, not {crash_after_bytes}")
        self.root = Path(root)
        self.rooms = [room_id(i) for i in range(1, rooms + 1)]
        self.meetings_per_room = meetings_per_room
        self.seed = seed
        self.piece_delay = piece_delay
        self.crash_after_bytes = crash_after_bytes
        self.batches = 0
        self._rng = random.Random(seed)
        self._meetings: dict[str, list[str]] = {room: [] for room in self.rooms}
        self._sequence: dict[str, int] = {}
        self._config_revision = 0
        self._cookie_generation = 0
        self._ready = False

    # -- public API --------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Write the initial tree: config, room folders, ``meetings_per_room`` meetings and a cookie each."""
        self._write_config()
        for room in self.rooms:
            (self.root / DATABASES / room).mkdir(parents=True, exist_ok=True)
            for _ in range(self.meetings_per_room):
                self._book(room)
            write_in_place(self.root / cookie_relpath(room), self._cookie_bytes(room))
        self._ready = True

    def batch(self) -> list[str]:
        """One batch: book, update and delete meetings in some rooms, then rewrite those rooms' cookies.

        Returns the relative POSIX paths touched (written or deleted), each once, in order.
        """
        if not self._ready:
            raise RuntimeError("call setup() before batch()")
        rng = self._rng
        touched: list[str] = []
        rooms = rng.sample(self.rooms, rng.randint(1, min(3, len(self.rooms))))
        for room in rooms:
            for _ in range(rng.randint(1, 4)):
                touched.append(self._meeting_op(room))
        if rng.random() < CONFIG_REWRITE_CHANCE:
            touched.append(self._write_config())
        for room in rooms:
            touched.append(self._write_cookie(room))
        self.batches += 1
        log.debug("simulator.batch n=%d rooms=%d paths=%d", self.batches, len(rooms), len(touched))
        return list(dict.fromkeys(touched))

    def run(self, seconds: float | None = None, batches: int | None = None, rate: float = 1.0) -> int:
        """Run batches at ``rate`` per second (0: as fast as possible) until ``seconds`` have passed or
        ``batches`` were run; with neither, until interrupted. Calls :meth:`setup` first if needed.
        Returns the number of batches run.
        """
        if not self._ready:
            self.setup()
        start = time.monotonic()
        done = 0
        while batches is None or done < batches:
            if seconds is not None and time.monotonic() - start >= seconds:
                break
            self.batch()
            done += 1
            if rate > 0:
                # Paced against the start, so a slow batch does not push every later one back.
                delay = start + done / rate - time.monotonic()
                if seconds is not None:
                    delay = min(delay, start + seconds - time.monotonic())
                if delay > 0:
                    time.sleep(delay)
        return done

    def meetings(self, room: str) -> list[str]:
        """The meeting ids the simulator believes are in ``room`` (a copy)."""
        return list(self._meetings[room])

    # -- operations --------------------------------------------------------------------------------------

    def _meeting_op(self, room: str) -> str:
        rng = self._rng
        count = len(self._meetings[room])
        kinds = ["book", "update", "delete"]
        weights = [2 if count < self.meetings_per_room else 1, 3, 1 if count > self.meetings_per_room else 2]
        if count == 0:
            weights = [1, 0, 0]
        elif count >= 2 * max(1, self.meetings_per_room):
            weights[0] = 0
        kind = rng.choices(kinds, weights)[0]
        if kind == "book":
            return self._book(room)
        meeting = rng.choice(self._meetings[room])
        if kind == "update":
            return self._write_meeting(room, meeting)
        self._meetings[room].remove(meeting)
        del self._sequence[meeting]
        relpath = meeting_relpath(room, meeting)
        (self.root / relpath).unlink(missing_ok=True)
        return relpath

    def _book(self, room: str) -> str:
        meeting = str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
        self._meetings[room].append(meeting)
        self._sequence[meeting] = -1
        return self._write_meeting(room, meeting)

    def _write_meeting(self, room: str, meeting: str) -> str:
        self._sequence[meeting] += 1
        relpath = meeting_relpath(room, meeting)
        write_in_place(self.root / relpath, self._meeting_bytes(room, meeting))
        return relpath

    def _write_config(self) -> str:
        self._config_revision += 1
        (self.root / "config").mkdir(parents=True, exist_ok=True)
        write_in_place(self.root / CONFIG_PATH, self._config_bytes())
        return CONFIG_PATH

    def _write_cookie(self, room: str) -> str:
        relpath = cookie_relpath(room)
        data = self._cookie_bytes(room)
        k = self.crash_after_bytes
        if k is not None and len(data) > k:
            crash_write(self.root / relpath, data, k, self.piece_delay)
        write_in_place(self.root / relpath, data, COOKIE_PIECES, self.piece_delay)
        return relpath

    # -- content -----------------------------------------------------------------------------------------

    def _meeting_bytes(self, room: str, meeting: str) -> bytes:
        rng = self._rng
        start = EPOCH + timedelta(days=rng.randint(0, 90), minutes=15 * rng.randint(28, 72))
        end = start + timedelta(minutes=15 * rng.randint(1, 8))
        organizer = rng.choice(NAMES)
        doc: dict[str, Any] = {
            "id": meeting,
            "room": room,
            "subject": " ".join(rng.choices(WORDS, k=rng.randint(2, 5))).capitalize(),
            "organizer": {"name": organizer, "email": organizer.lower().replace(" ", ".") + "@example.com"},
            "start": start.isoformat(),
            "end": end.isoformat(),
            "dialIn": f"https://join.example.com/meet/{rng.randrange(10**9, 10**10)}"
            f"?pwd={rng.getrandbits(64):016x}",
            "attendees": [rng.choice(NAMES) for _ in range(rng.randint(1, 6))],
            "sequence": self._sequence[meeting],
            "notes": "",
        }
        target = rng.randint(MEETING_MIN_BYTES, MEETING_MAX_BYTES)
        bare = len(_dump(doc))
        doc["notes"] = _filler(rng, max(0, target - bare))  # ASCII without escapes: adds exactly its length
        return _dump(doc)

    def _cookie_bytes(self, room: str) -> bytes:
        # An Exchange sync state is base64 over gzip. Random bytes do not compress, so the base64 text is
        # about 4/3 of the payload, plus the gzip framing.
        self._cookie_generation += 1
        chars = self._rng.randint(COOKIE_MIN_CHARS, COOKIE_MAX_CHARS)
        header = f"{room};gen={self._cookie_generation};".encode()
        raw_len = max(len(header), chars * 3 // 4 - 23)  # gzip adds 23 bytes to stored data
        payload = header + self._rng.randbytes(raw_len - len(header))
        return base64.b64encode(gzip.compress(payload, compresslevel=6, mtime=0))

    def _config_bytes(self) -> bytes:
        doc = {
            "service": {"name": "Synergy Join", "instance": f"sim-{self.seed}", "logLevel": "Information"},
            "exchange": {"url": "https://outlook.office365.com/EWS/Exchange.asmx", "syncIntervalSeconds": 30},
            "rooms": [{"id": room, "displayName": f"Room {i}"} for i, room in enumerate(self.rooms, 1)],
            "revision": self._config_revision,
        }
        return _dump(doc)


def _dump(doc: Any) -> bytes:
    return json.dumps(doc, indent=2).encode("ascii")


def _filler(rng: random.Random, length: int) -> str:
    words: list[str] = []
    size = -1
    while size < length:
        word = rng.choice(WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)[:length]


# ---------------------------------------------------------------------------------------------------------
# Command line.


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine.simulator",
        description="Simulate the Synergy Join service writing its meeting files, config and sync cookies "
        "under ROOT, deterministically from a seed.",
    )
    parser.add_argument("root", metavar="ROOT", type=Path, help="folder to write the service's tree into")
    parser.add_argument(
        "--rooms",
        metavar="N",
        type=_positive_int,
        default=5,
        help="number of room folders under ROOT/databases (default: 5)",
    )
    parser.add_argument(
        "--meetings-per-room",
        metavar="M",
        type=_non_negative_int,
        default=20,
        help="meetings booked per room at set-up (default: 20)",
    )
    parser.add_argument(
        "--seed",
        metavar="S",
        type=int,
        default=0,
        help="random seed: the same seed gives the same files, byte for byte (default: 0)",
    )
    stop = parser.add_mutually_exclusive_group()
    stop.add_argument(
        "--seconds",
        metavar="T",
        type=_non_negative_float,
        help="stop after T seconds (default: run until interrupted)",
    )
    stop.add_argument(
        "--batches",
        metavar="B",
        type=_non_negative_int,
        help="stop after B batches (default: run until interrupted)",
    )
    parser.add_argument(
        "--rate",
        metavar="R",
        type=_non_negative_float,
        default=1.0,
        help="batches per second; 0 runs them back to back (default: 1)",
    )
    parser.add_argument(
        "--piece-delay",
        metavar="SECONDS",
        type=_non_negative_float,
        default=0.005,
        help="sleep between the pieces of a cookie rewrite (default: 0.005)",
    )
    parser.add_argument(
        "--crash-after-bytes",
        metavar="K",
        type=_non_negative_int,
        help="kill this process (SIGKILL; os._exit on Windows) after writing the first K "
        "bytes of the first cookie rewrite longer than K, leaving a torn cookie",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every batch")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s", stream=sys.stderr
    )
    sim = ServiceSimulator(
        args.root,
        rooms=args.rooms,
        meetings_per_room=args.meetings_per_room,
        seed=args.seed,
        piece_delay=args.piece_delay,
        crash_after_bytes=args.crash_after_bytes,
    )
    try:
        sim.setup()
        sim.run(seconds=args.seconds, batches=args.batches, rate=args.rate)
    except KeyboardInterrupt:
        pass
    print(f"batches={sim.batches}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
