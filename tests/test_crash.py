"""Crash consistency: SIGKILL the receiver or the sender again and again while the source churns.

The contract under test (see engine/apply.py and engine/journal.py):
- a file at a final path of the replica is always one whole version, never a partial one, at any moment;
- after any number of crashes the pair converges (same digests and mtimes) and no temporary file is left.

Every file the churn writer makes is self-validating (:func:`make_version`), so a reader can tell a whole
version from a partial one without knowing which version it is. The writer runs as a child process
(``python -m tests.test_crash churn ...``) so the GIL of the test process does not slow it down; a checker
thread walks the replica for the whole run and records every partial file it reads.

A partial file the checker reads is a failure. The report tells the two kinds apart: a partial file the
receiver made itself (crash consistency broken), or a torn read of the *source* that the sender journaled
and shipped (a sender bug: the race of a rewrite starting between a close event and the read, pinned
deterministically by test_sender_never_ships_a_file_rewritten_after_its_close_event). Both fail the loop
with the seed and the paths; neither is ever an XFAIL.

Beside the two kill loops (marked ``soak``), deterministic tests: a receiver killed in the middle of a
large put (a proxy freezes the transfer), and regressions for bugs the loops found, each driven to the
exact interleaving by a proxy or a hook instead of by luck.

Knobs: ``STANDBY_SOAK=1`` runs 200 kills instead of 20; ``STANDBY_SEED`` fixes the random seed (it is
printed, and named in every failure, so a run can be repeated with the same kill intervals).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from engine import codec, identity
from engine.apply import PositionFile
from engine.digest import DIGEST_SIZE, digest_bytes
from engine.errors import ReplicationError
from engine.journal import Journal
from engine.model import TEMP_MARKER, Op
from engine.transport import TlsSettings, client_upgrade, server_upgrade
from tests.pair import ROOT, Pair, temp_files, wait_for

SOAK = os.environ.get("STANDBY_SOAK", "") not in ("", "0")
KILLS = 200 if SOAK else 20
ROOMS = 10
#: Per-test timeout: the short mode must stay well under a minute; the soak mode runs for minutes.
TEST_TIMEOUT = 1800 if SOAK else 120

# ---- self-validating content -----------------------------------------------------------------------------
MAGIC = b"SBYCRSH1"
_LEN = struct.Struct(">Q")
HEAD_SIZE = len(MAGIC) + _LEN.size


def make_version(payload: bytes) -> bytes:
    """``MAGIC + len(payload) (8 bytes, big-endian) + payload + xxh3_128(payload)``."""
    return MAGIC + _LEN.pack(len(payload)) + payload + digest_bytes(payload)


def version_problem(data: bytes) -> str | None:
    """None if ``data`` is one whole version made by :func:`make_version`, else what is wrong with it."""
    if len(data) < HEAD_SIZE + DIGEST_SIZE:
        return f"too short ({len(data)} bytes)"
    if data[: len(MAGIC)] != MAGIC:
        return "bad magic"
    (n,) = _LEN.unpack_from(data, len(MAGIC))
    if len(data) != HEAD_SIZE + n + DIGEST_SIZE:
        return f"length says {HEAD_SIZE + n + DIGEST_SIZE} bytes, file has {len(data)}"
    payload = data[HEAD_SIZE : HEAD_SIZE + n]
    if digest_bytes(payload) != data[HEAD_SIZE + n :]:
        return "payload digest mismatch"
    return None


# ---- the churn writer (a child process) ------------------------------------------------------------------
@dataclass
class ChurnStats:
    """What the churn writer did (each count is one change to the source)."""

    creates: int = 0
    rewrites: int = 0
    renames: int = 0
    replaces: int = 0  # renames onto an existing file
    deletes: int = 0

    @property
    def changes(self) -> int:
        return self.creates + self.rewrites + self.renames + self.replaces + self.deletes


def _payload_size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.70:
        return rng.randint(0, 4 << 10)
    if r < 0.97:
        return rng.randint(4 << 10, 64 << 10)
    return rng.randint(64 << 10, 256 << 10)


def write_in_place(path: Path, data: bytes, rng: random.Random) -> None:
    """Open 'wb' (truncating), write in 2-3 pieces with a flush between: readers can see every prefix."""
    cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(1, 2)))
    bounds = [0, *cuts, len(data)]
    with open(path, "wb") as f:
        for a, b in itertools.pairwise(bounds):
            f.write(data[a:b])
            f.flush()
            if rng.random() < 0.1:
                time.sleep(0.001)


#: The churn keeps the number of files between these bounds. Large enough that what changes while the
#: sender is down (renames look like delete + create to its reconciliation) stays well under the
#: mass-delete safety share (50 %) of the replica.
LIVE_LOW, LIVE_HIGH = 600, 1200


def populate(root: Path, count: int, seed: int) -> None:
    """The starting set: ``count`` whole files spread over the rooms (before the pair starts)."""
    rng = random.Random(seed)
    for i in range(count):
        room = root / "databases" / f"room-{i % ROOMS:02d}"
        room.mkdir(parents=True, exist_ok=True)
        (room / f"p{i:06d}.db").write_bytes(make_version(rng.randbytes(_payload_size(rng))))


def churn(root: Path, seed: int, stop_file: Path, stats_file: Path, rate: float, max_seconds: float) -> None:
    """Create, rewrite in place, rename and delete files under ``root/databases/room-NN`` at about ``rate``
    changes a second until ``stop_file`` exists; then write the counts to ``stats_file`` (atomically)."""
    rng = random.Random(seed)
    rooms = [root / "databases" / f"room-{i:02d}" for i in range(ROOMS)]
    for room in rooms:
        room.mkdir(parents=True, exist_ok=True)
    live = sorted(p for room in rooms for p in room.iterdir() if p.suffix == ".db")
    stats = ChurnStats()
    serial = 0
    t0 = time.monotonic()
    parent = os.getppid()
    n = 0

    def new_name() -> Path:
        nonlocal serial
        serial += 1
        return rng.choice(rooms) / f"c{serial:06d}.db"

    while True:
        if n % 16 == 0 and (
            stop_file.exists() or os.getppid() != parent or time.monotonic() - t0 > max_seconds
        ):
            break
        n += 1
        r = rng.random()
        if len(live) < LIVE_LOW or (r < 0.12 and len(live) < LIVE_HIGH):
            p = new_name()
            write_in_place(p, make_version(rng.randbytes(_payload_size(rng))), rng)
            live.append(p)
            stats.creates += 1
        elif r < 0.72:
            p = rng.choice(live)
            write_in_place(p, make_version(rng.randbytes(_payload_size(rng))), rng)
            stats.rewrites += 1
        elif r < 0.86:
            i = rng.randrange(len(live))
            src = live[i]
            j = rng.randrange(len(live))
            if rng.random() < 0.15 and j != i:  # onto an existing file (os.replace semantics)
                os.replace(src, live[j])
                live.pop(i)
                stats.replaces += 1
            else:
                dst = new_name()
                os.rename(src, dst)
                live[i] = dst
                stats.renames += 1
        else:
            p = live.pop(rng.randrange(len(live)))
            p.unlink()
            stats.deletes += 1
        # Pace to about ``rate`` changes a second.
        ahead = stats.changes / rate - (time.monotonic() - t0)
        if ahead > 0:
            time.sleep(ahead)
    tmp = stats_file.with_name(stats_file.name + ".part")
    tmp.write_text(
        json.dumps(
            {
                **stats.__dict__,
                "changes": stats.changes,
                "live": len(live),
                "seconds": round(time.monotonic() - t0, 3),
            }
        ),
        "utf-8",
    )
    os.replace(tmp, stats_file)


class Churn:
    """The churn writer as a child process of the test."""

    def __init__(self, base: Path, source: Path, seed: int, rate: float = 200.0) -> None:
        self.stop_file = base / "churn.stop"
        self.stats_file = base / "churn.stats.json"
        self.log_path = base / "churn.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.test_crash",
                    "churn",
                    "--root",
                    str(source),
                    "--seed",
                    str(seed),
                    "--stop-file",
                    str(self.stop_file),
                    "--stats-file",
                    str(self.stats_file),
                    "--rate",
                    str(rate),
                    "--max-seconds",
                    str(TEST_TIMEOUT),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )

    def stop(self) -> ChurnStats:
        self.stop_file.touch()
        try:
            rc = self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("the churn writer did not stop within 20 s") from None
        assert rc == 0, f"churn writer failed ({rc}):\n{self.log_path.read_text('utf-8', errors='replace')}"
        d = json.loads(self.stats_file.read_text("utf-8"))
        return ChurnStats(d["creates"], d["rewrites"], d["renames"], d["replaces"], d["deletes"])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# ---- the replica checker (a thread) ----------------------------------------------------------------------
@dataclass(frozen=True)
class Partial:
    """A file read at a final path of the replica that is not a whole version (its bytes are kept)."""

    path: str  # relative to the checked folder
    size: int
    head: str  # the first bytes, hex
    problem: str
    copy: str  # where the bytes were saved
    digest: bytes = field(repr=False)


@dataclass
class ReplicaChecker:
    """Walks ``root`` over and over, reading every file at a final path; records every partial one."""

    root: Path
    evidence: Path
    partials: list[Partial] = field(default_factory=list)  # distinct partial versions
    partial_reads: int = 0
    reads: int = 0
    passes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="replica-checker")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            assert not self._thread.is_alive(), "the replica checker did not stop"

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check_once()
            self._stop.wait(0.005)

    def check_once(self) -> None:
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if TEMP_MARKER in name:
                    continue
                path = os.path.join(dirpath, name)
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                    continue  # renamed or deleted under us: fine
                self.reads += 1
                problem = version_problem(data)
                if problem is not None:
                    self._record(path, data, problem)
        self.passes += 1

    def _record(self, path: str, data: bytes, problem: str) -> None:
        """Keep each partial version once (the same one is often read on many passes)."""
        self.partial_reads += 1
        rel = os.path.relpath(path, self.root).replace(os.sep, "/")
        digest = digest_bytes(data)
        if any(p.path == rel and p.digest == digest for p in self.partials):
            return
        self.evidence.mkdir(parents=True, exist_ok=True)
        copy = self.evidence / f"{len(self.partials):04d}-{os.path.basename(path)}"
        copy.write_bytes(data)
        self.partials.append(Partial(rel, len(data), data[:48].hex(), problem, str(copy), digest))


# ---- helpers ---------------------------------------------------------------------------------------------
def soak_seed() -> int:
    """``STANDBY_SEED`` if set, else a fresh one (printed and named in failures, so a run can be repeated)."""
    env = os.environ.get("STANDBY_SEED")
    return int(env) if env else random.SystemRandom().randrange(1 << 32)


def start_alive(pair: Pair, role: str) -> None:
    """Start ``role`` and fail (with its log) if it exited instead of coming up."""
    p = pair.start(role)
    if p.poll() is not None:
        raise AssertionError(
            f"{role} exited with {p.returncode} on start #{pair.starts[role]}:\n{pair.log(role)[-6000:]}"
        )


def keep_running(pair: Pair, seed: int) -> None:
    """Both processes must still be up: one that exits by itself after it connected (a safety halt, an
    unhandled error in a task) would otherwise go unseen until convergence times out."""
    for role in ("receive", "send"):
        p = pair.procs[role]
        if p.poll() is not None:
            raise AssertionError(
                f"seed={seed}: {role} (start #{pair.starts[role]}) exited by itself with "
                f"{p.returncode}:\n{pair.log(role)[-6000:]}"
            )


def wait_sender_attached(pair: Pair, timeout: float = 15) -> None:
    """Wait until the current receiver process has a sender connected (so a kill interrupts real work),
    or the sender died (the caller's :func:`keep_running` reports that)."""
    wait_for(
        lambda: "role=sender" in pair.log("receive") or pair.procs["send"].poll() is not None,
        timeout,
        "the sender to reconnect to the receiver",
    )


def tear_journal_tail(journal: Path, rng: random.Random) -> bool:
    """Append a prefix of the last whole frame to the newest journal segment: what a sender killed in the
    middle of an append leaves behind (SIGKILL alone rarely lands inside the write call)."""
    segments = sorted(journal.glob("*.sbj"))
    if not segments:
        return False
    data = segments[-1].read_bytes()
    off, start = 0, -1
    while not isinstance(r := codec.decode_at(data, off), codec.Torn):
        start, off = off, r[1]
    if start < 0 or off - start < 2:
        return False
    with open(segments[-1], "ab") as f:
        f.write(data[start : start + rng.randint(1, off - start - 1)])
    return True


def receiver_seq(pair: Pair) -> int:
    """The last seq the receiver made durable (its position file)."""
    pf = PositionFile(pair.receiver_state / "position", fsync=False)
    try:
        return pf.current.seq
    finally:
        pf.close()


def wait_progress(pair: Pair, since: int, timeout: float = 30) -> None:
    """Wait until the receiver made a group past ``since`` durable (or the sender died: see keep_running)."""
    wait_for(
        lambda: receiver_seq(pair) > since or pair.procs["send"].poll() is not None,
        timeout,
        "the receiver to make a group durable",
    )


def count_in_logs(pair: Pair, pattern: str) -> int:
    rx = re.compile(pattern)
    return sum(len(rx.findall(p.read_text("utf-8", errors="replace"))) for p in pair.base.glob("*.log"))


def plaintext(pair: Pair) -> None:
    """Run the pair in plaintext on loopback: the gated proxy below parses frames to hold a manifest
    reply, which it cannot do through TLS. Every other test here runs over TLS, as deployed."""
    pair.sender_extra += "\ninsecure = true"
    pair.receiver_extra += "\ninsecure = true"
    pair.write_config()


def make_rooms(pair: Pair) -> None:
    for i in range(ROOMS):
        (pair.source / "databases" / f"room-{i:02d}").mkdir(parents=True, exist_ok=True)


def shipped_versions(pair: Pair) -> dict[str, set[bytes]]:
    """Digests of every version the sender journaled for each path (following renames), read from its
    journal after the run: tells a torn *source* read the sender shipped from a partial file the receiver
    made itself."""
    j = Journal.open(pair.sender_state / "journal", readonly=True)
    ever: dict[str, set[bytes]] = defaultdict(set)
    cur = j.cursor(j.first_seq)
    try:
        while (c := cur.next_header()) is not None:
            cur.skip_chunks()
            if c.op is Op.PUT:
                ever[c.path].add(c.digest)
            elif c.op is Op.RENAME:
                ever[c.dst] |= ever[c.path]
    finally:
        cur.close()
        j.close()
    return ever


def run_kill_loop(pair: Pair, role: str, seed: int) -> None:
    """Churn the source and SIGKILL ``role`` KILLS times at random moments; then converge and check."""
    print(f"\n[{role} sigkill loop] seed={seed} kills={KILLS}")  # shown with any failure (captured stdout)
    make_rooms(pair)
    populate(pair.source, LIVE_LOW, seed)
    checker = ReplicaChecker(pair.target / "databases", pair.base / "partials")
    start_alive(pair, "receive")
    start_alive(pair, "send")
    pair.wait_converged(60)
    # The receiver applies a backlog in large groups (everything that arrived meanwhile); a lower rate keeps
    # the backlog small enough that its lives between kills make progress, so kills land in every phase.
    churn = Churn(pair.base, pair.source, seed, rate=100.0 if role == "receive" else 200.0)
    checker.start()
    rng = random.Random(seed)
    kills = tears = 0
    t0 = time.monotonic()
    try:
        for _ in range(KILLS):
            if role == "receive":
                at_start = receiver_seq(pair)
                wait_sender_attached(pair)  # so that the kill lands while the receiver is applying
                if rng.random() < 0.5:
                    # Half the lives first make one group durable: the backlog drains (a receiver killed
                    # again and again inside its first, large group never gets anywhere) and later kills
                    # land in every phase of the smaller groups that follow.
                    wait_progress(pair, at_start)
            keep_running(pair, seed)
            time.sleep(rng.uniform(0.05, 0.6))
            assert churn.proc.poll() is None, f"the churn writer died:\n{churn.log_path.read_text('utf-8')}"
            keep_running(pair, seed)
            pair.kill(role)
            kills += 1
            if role == "send" and rng.random() < 0.5:
                tears += tear_journal_tail(pair.sender_state / "journal", rng)
            start_alive(pair, role)
        stats = churn.stop()
        t_churn = time.monotonic() - t0
        keep_running(pair, seed)
        try:
            pair.wait_converged(60)
        except AssertionError as e:
            raise AssertionError(f"seed={seed} ({role} loop, {kills} kills): {e}") from None
        leftovers = temp_files(pair.target)
        checker.check_once()  # one last pass over the converged replica
    finally:
        churn.kill()
        checker.stop()
    t_total = time.monotonic() - t0
    assert pair.stop("send") == 0, pair.log("send")
    assert pair.stop("receive") == 0, pair.log("receive")
    leftovers += temp_files(pair.target)
    shipped = shipped_versions(pair) if checker.partials else {}
    cuts = count_in_logs(pair, r"journal\.torn_tail_cut")
    temps = count_in_logs(pair, r"(?:receiver|apply)\.temps_removed count=\d+")
    print(
        f"[{role} sigkill loop] seed={seed} kills={kills} changes={stats.changes} ({stats}) "
        f"partial_files={len(checker.partials)} (read {checker.partial_reads} times) "
        f"checker_reads={checker.reads} "
        f"passes={checker.passes} torn_tails_made={tears} torn_tails_cut={cuts} temp_cleanups={temps} "
        f"churn={t_churn:.1f}s total={t_total:.1f}s"
    )
    judge_loop(
        LoopResult(role, seed, kills, tears, cuts, leftovers, checker.partials, shipped), pair.all_logs()
    )


@dataclass(frozen=True)
class LoopResult:
    """What a kill loop found, for :func:`judge_loop`."""

    role: str
    seed: int
    kills: int
    torn_tails_made: int
    torn_tails_cut: int
    leftovers: list[str]
    partials: list[Partial]
    #: Digests of every version the sender journaled per path (:func:`shipped_versions`).
    shipped: dict[str, set[bytes]]


def judge_loop(r: LoopResult, logs: str) -> None:
    """Every check of a finished kill loop, each a hard failure naming the seed (no XFAIL: a torn source
    read the sender shipped is a sender bug, reported with its paths, never hidden)."""
    where = f"seed={r.seed} ({r.role} loop, {r.kills} kills)"
    made_here = [p for p in r.partials if p.digest not in r.shipped.get(f"databases/{p.path}", set())]
    torn_reads = [p for p in r.partials if p not in made_here]
    print(
        f"[{r.role} sigkill loop] seed={r.seed} receiver-made partial files={len(made_here)}, "
        f"torn source reads shipped by the sender={len(torn_reads)}"
    )
    assert r.kills >= 20, f"{where}: only {r.kills} kills"
    assert r.torn_tails_cut >= r.torn_tails_made, (
        f"{where}: {r.torn_tails_made} torn journal tails made, only {r.torn_tails_cut} cut on open"
    )
    assert not r.leftovers, f"{where}: temporary files left in the replica: {r.leftovers[:10]}"
    assert not made_here, (
        f"{where}: the checker read {len(made_here)} partial file(s) at final paths of the replica "
        f"that the sender never journaled (the receiver made them): {made_here[:5]}\n{logs}"
    )
    assert not torn_reads, (
        f"{where}: BUG (sender): {len(torn_reads)} torn source read(s) journaled and shipped to the "
        f"replica (the race test_sender_never_ships_a_file_rewritten_after_its_close_event pins): "
        f"{[(p.path, p.size, p.problem, p.copy) for p in torn_reads[:10]]}\n{logs}"
    )


def test_a_torn_source_read_the_sender_shipped_fails_the_loop(tmp_path: Path) -> None:
    """The verdict of a kill loop whose checker read a partial file the sender had journaled (a torn read
    of the source): a hard failure naming the seed and the path, not an XFAIL that hides it."""
    data = make_version(b"x" * 5000)[:2000]
    copy = tmp_path / "0000-c000042.db"
    copy.write_bytes(data)
    torn = Partial(
        "room-03/c000042.db",
        len(data),
        data[:48].hex(),
        version_problem(data) or "",
        str(copy),
        digest_bytes(data),
    )
    whole = make_version(b"y" * 100)
    result = LoopResult(
        "send",
        1234,
        20,
        3,
        3,
        [],
        [torn],
        {"databases/room-03/c000042.db": {digest_bytes(data), digest_bytes(whole)}},
    )
    try:
        with pytest.raises(AssertionError) as failed:
            judge_loop(result, "(logs)")
    except pytest.xfail.Exception as e:
        pytest.fail(f"a torn read shipped by the sender was turned into an XFAIL: {e}")
    msg = str(failed.value)
    assert "seed=1234" in msg and "room-03/c000042.db" in msg and "torn source read" in msg, msg
    # The controls: the same loop without the partial file passes; one the sender never journaled fails
    # as made by the receiver.
    judge_loop(replace(result, partials=[]), "")
    with pytest.raises(AssertionError, match="the receiver made them"):
        judge_loop(replace(result, shipped={}), "")


# ---- the tests -------------------------------------------------------------------------------------------
@pytest.mark.soak
@pytest.mark.timeout(TEST_TIMEOUT)
def test_receiver_sigkill_loop(pair: Pair) -> None:
    run_kill_loop(pair, "receive", soak_seed())


@pytest.mark.soak
@pytest.mark.timeout(TEST_TIMEOUT)
def test_sender_sigkill_loop(pair: Pair) -> None:
    # Small segments, so that kills also land around segment rotation.
    pair.sender_extra = "segment_mb = 1"
    pair.write_config()
    run_kill_loop(pair, "send", soak_seed())


def test_sender_restart_does_not_ship_a_file_paused_mid_write(pair: Pair) -> None:
    """A writer truncates a file, writes half of it and pauses; the sender restarts and reconciles. The
    replica must keep the old whole version until the writer closes the file.

    Regression: found by the sender kill loop, where reconciliation on connect shipped half-written files
    (fixed in f84605a: reconciliation leaves alone files open for writing)."""
    make_rooms(pair)
    rng = random.Random(5)
    src = pair.source / "databases" / "room-00" / "sync-cookie.db"
    replica = pair.target / "databases" / "room-00" / "sync-cookie.db"
    v1, v2 = make_version(rng.randbytes(20_000)), make_version(rng.randbytes(30_000))
    src.write_bytes(v1)
    start_alive(pair, "receive")
    start_alive(pair, "send")
    pair.wait_converged(30)
    assert pair.stop("send") == 0
    seen: list[tuple[int, str]] = []
    with open(src, "wb") as f:
        f.write(v2[: len(v2) // 2])
        f.flush()
        start_alive(pair, "send")  # reconciles on connect while the writer is paused mid-file
        wait_for(lambda: "reconcile.done" in pair.log("send"), 20, "the sender's reconciliation")
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            data = replica.read_bytes()
            problem = version_problem(data)
            if problem is not None:
                seen.append((len(data), problem))
            if data != v1:
                break
            time.sleep(0.01)
        f.write(v2[len(v2) // 2 :])
    pair.wait_converged(30)
    assert replica.read_bytes() == v2
    assert not seen, f"the replica held a partial version mid-write: {seen[:3]}\n{pair.log('send')}"


# ---- a rewrite that starts between the close event and the read ------------------------------------------


def hooked_send(config: Path, victim: str, path: Path, next_version: Path, hold: float, late: float) -> int:
    """``standby send`` with a hook: the first time the pipeline takes ``victim`` as due, a rewrite of it
    (``next_version``) starts, truncating and writing the first half, and finishes ``hold`` s later; the
    watcher's hints for it in the next ``late`` s reach the sender ``late`` s late. So the rewrite surely
    starts after the close event and before the read, and its hint comes after the read: the window of
    the race, which a loaded machine opens by itself now and then."""
    from engine import tracker
    from engine.cli import main
    from engine.sender.intake import Intake
    from engine.watch import Hint

    due = tracker.Tracker.due
    on_hint = Intake.on_hint
    fired: list[float] = []

    def hooked_due(self: tracker.Tracker, now: float) -> tracker.Due:
        out = due(self, now)
        if victim in out.ready + out.forced and not fired:
            fired.append(time.monotonic())
            data = next_version.read_bytes()
            f = open(path, "wb")  # noqa: SIM115 - closed by the timer
            f.write(data[: len(data) // 2])
            f.flush()

            def finish() -> None:
                f.write(data[len(data) // 2 :])
                f.close()

            timer = threading.Timer(hold, finish)
            timer.daemon = True
            timer.start()
        return out

    def hooked_on_hint(self: Intake, h: Hint) -> None:
        if fired and h.path == str(path) and time.monotonic() < fired[0] + late:
            asyncio.get_running_loop().call_later(late, on_hint, self, h)
            return
        on_hint(self, h)

    tracker.Tracker.due = hooked_due  # type: ignore[method-assign]
    Intake.on_hint = hooked_on_hint  # type: ignore[method-assign]
    return main(["--log-level", "debug", "send", "--config", str(config)])


def test_sender_never_ships_a_file_rewritten_after_its_close_event(pair: Pair) -> None:
    """Deterministic (the sender runs with a hook, see :func:`hooked_send`): a file is written and closed,
    and a rewrite of it starts before the sender reads it and pauses half way, its hint late. The replica
    must never hold the half version."""
    make_rooms(pair)
    rng = random.Random(13)
    rel = "databases/room-00/cookie.db"
    src, replica = pair.source / rel, pair.target / rel
    v1, v2 = make_version(rng.randbytes(20_000)), make_version(rng.randbytes(30_000))
    (pair.base / "next-version").write_bytes(v2)
    start_alive(pair, "receive")
    pair.starts["send"] = 1  # the harness's log naming: pair.log("send") reads send.1.log
    with open(pair.base / "send.1.log", "wb") as log:
        pair.procs["send"] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.test_crash",
                "hooked-send",
                "--config",
                str(pair.config),
                "--victim",
                rel,
                "--path",
                str(src),
                "--next-version",
                str(pair.base / "next-version"),
                "--hold",
                "3",
                "--late",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    wait_for(lambda: "send.connected" in pair.log("send"), 20, "the hooked sender to connect")
    src.write_bytes(v1)
    seen: list[tuple[int, str]] = []
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:
        try:
            data = replica.read_bytes()
        except FileNotFoundError:
            data = None
        if data is not None and (problem := version_problem(data)) is not None:
            seen.append((len(data), problem))
        time.sleep(0.005)
    pair.wait_converged(20)
    assert replica.read_bytes() == v2
    assert not seen, f"the replica held a partial version: {seen[:3]}\n{pair.log('send')[-3000:]}"


# ---- a deterministic crash mid-transfer ------------------------------------------------------------------
class GatedProxy:
    """A TCP proxy on 127.0.0.1 in front of ``upstream``, to freeze a session at a chosen point without
    touching either process.

    Upstream (sender to receiver) bytes pass only while ``budget`` lasts (``None``: no limit). Downstream,
    :meth:`hold_manifests` (plaintext sessions only) makes the proxy parse frames and hold back the
    receiver's first manifest reply and everything after it until :meth:`release` (order kept), so a
    reconciliation waits as long as a test needs."""

    def __init__(self, upstream: int, budget: int | None = None) -> None:
        self.upstream = upstream
        self._budget = budget
        self._cond = threading.Condition()
        self._closing = False
        self._hold_armed = False
        self._held = bytearray()
        self._held_dst: socket.socket | None = None
        self.manifest_held = threading.Event()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self.connections = 0
        self._spawn(self._accept_loop, "proxy-accept")

    def route(self, pair: Pair) -> None:
        """Point the pair's sender at this proxy."""
        cfg = pair.config.read_text("utf-8")
        direct = f'peer = "127.0.0.1:{pair.port}"'
        assert cfg.count(direct) == 1, cfg
        pair.config.write_text(cfg.replace(direct, f'peer = "127.0.0.1:{self.port}"'), "utf-8")

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        t = threading.Thread(target=target, args=args, name=name)
        self._threads.append(t)
        t.start()

    def open_gate(self) -> None:
        with self._cond:
            self._budget = None
            self._cond.notify_all()

    def hold_manifests(self) -> None:
        with self._cond:
            self._hold_armed = True

    def release(self) -> None:
        with self._cond:
            self._hold_armed = False
            if self._held_dst is not None:
                try:
                    self._held_dst.sendall(bytes(self._held))
                except OSError:
                    pass
            self._held.clear()
            self._held_dst = None

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                up = socket.create_connection(("127.0.0.1", self.upstream), timeout=2)
                up.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._cond:
                if self._closing:
                    client.close()
                    up.close()
                    return
                self._socks += [client, up]
                self.connections += 1
            self._spawn(self._pump_up, "proxy-up", client, up)
            self._spawn(self._pump_down, "proxy-down", up, client)

    def _allowance(self) -> int | None:
        """Bytes that may pass now (waits while the budget is spent); None when closing."""
        with self._cond:
            while self._budget is not None and self._budget <= 0 and not self._closing:
                self._cond.wait(0.1)
            if self._closing:
                return None
            return 1 << 16 if self._budget is None else min(1 << 16, self._budget)

    def _pump_up(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while (n := self._allowance()) is not None:
                data = src.recv(n)
                if not data:
                    return
                with self._cond:
                    if self._budget is not None:
                        self._budget -= len(data)
                dst.sendall(data)
        except OSError:
            return
        finally:
            _shut(src)
            _shut(dst)

    def _pump_down(self, src: socket.socket, dst: socket.socket) -> None:
        pending = bytearray()  # bytes of a frame not yet whole, while frames are parsed
        try:
            while data := src.recv(1 << 16):
                with self._cond:
                    pending += data
                    out = bytearray()
                    while self._hold_armed:
                        r = codec.decode_at(pending, 0)
                        if isinstance(r, codec.Torn):
                            break  # the rest of the frame is still on its way
                        frame = bytes(pending[: r[1]])
                        del pending[: r[1]]
                        manifest = isinstance(r[0], dict) and r[0].get("k") in ("mpart", "mend")
                        if self._held_dst is None and manifest:
                            self._held_dst = dst
                            self.manifest_held.set()
                        if self._held_dst is dst:
                            self._held += frame
                        else:
                            out += frame
                    if not self._hold_armed:
                        out += pending
                        pending.clear()
                    dst.sendall(bytes(out))
        except OSError:
            return
        finally:
            _shut(src)
            _shut(dst)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            socks = list(self._socks)
        self._listener.close()
        for s in socks:
            _shut(s)
        for t in self._threads:
            t.join(10)
        for s in socks:
            s.close()


def _shut(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def test_receiver_sigkill_mid_large_put_leaves_no_temp(pair: Pair) -> None:
    """SIGKILL the receiver while a 30 MiB put streams into its temporary file (the proxy lets only the
    first 6 MiB through, so the moment is certain). The restarted receiver removes the temporary file
    before it listens, and the file converges once the sender is back."""
    big_payload = 30 << 20
    proxy = GatedProxy(pair.port, budget=6 << 20)
    try:
        proxy.route(pair)
        make_rooms(pair)
        start_alive(pair, "receive")
        start_alive(pair, "send")
        room = pair.source / "databases" / "room-00"
        content = make_version(random.Random(7).randbytes(big_payload))
        (room / "big.db").write_bytes(content)

        # The proxy lets about 6 MiB through, so the receiver is stuck mid-put with its temp file open.
        replica_dir = pair.target / "databases" / "room-00"

        def temp_started() -> bool:
            return any(p.stat().st_size >= 1 << 20 for p in map(Path, temp_files(replica_dir)) if p.exists())

        wait_for(temp_started, 30, "a temporary file of the large put in the replica")
        assert not (replica_dir / "big.db").exists()
        pair.kill("receive")
        left = temp_files(pair.target)
        assert len(left) == 1, left
        assert TEMP_MARKER in left[0] and Path(left[0]).parent == replica_dir

        start_alive(pair, "receive")  # clean_temps runs before the receiver listens
        assert not temp_files(pair.target), temp_files(pair.target)
        assert re.search(r"(?:receiver|apply)\.temps_removed count=1\b", pair.log("receive")), pair.log(
            "receive"
        )

        proxy.open_gate()
        pair.wait_converged(60)
        assert not temp_files(pair.target)
        assert version_problem((replica_dir / "big.db").read_bytes()) is None
        assert proxy.connections >= 2  # the sender came back through the proxy after the crash
        assert pair.stop("send") == 0, pair.log("send")
        assert pair.stop("receive") == 0, pair.log("receive")
    finally:
        pair.stop_all()
        proxy.close()


# ---- a change made while the sender was down -------------------------------------------------------------
def test_rename_during_reconcile_of_a_file_changed_while_the_sender_was_down(pair: Pair) -> None:
    """A file rewritten while the sender was down, then renamed while the restarted sender's reconciliation
    runs, must reach the replica with its new content. The proxy holds the receiver's manifest reply, so
    the rename surely lands while the reconciliation waits for it.

    Regression: found by the sender kill loop ('replica differs at 1 paths' 60 s after the churn stopped):
    reconciliation left out paths touched while it ran, and a rename journals no content, so the replica
    kept the old content under the new name until the next scheduled reconciliation (fixed in f84605a:
    the destination of a rename is looked at again)."""
    proxy = GatedProxy(pair.port)
    try:
        plaintext(pair)
        proxy.route(pair)
        make_rooms(pair)
        rng = random.Random(11)
        room = pair.source / "databases" / "room-00"
        v1, v2 = make_version(rng.randbytes(5000)), make_version(rng.randbytes(6000))
        (room / "a.db").write_bytes(v1)
        start_alive(pair, "receive")
        start_alive(pair, "send")
        pair.wait_converged(30)
        pair.kill("send")
        (room / "a.db").write_bytes(v2)  # nobody watches: only reconciliation can find this
        proxy.hold_manifests()
        start_alive(pair, "send")
        wait_for(proxy.manifest_held.is_set, 20, "the receiver's manifest reply")
        (room / "a.db").rename(room / "b.db")  # journaled as RENAME while the reconciliation waits
        replica_b = pair.target / "databases" / "room-00" / "b.db"
        wait_for(replica_b.exists, 20, "the rename to reach the replica")
        proxy.release()
        wait_for(lambda: "reconcile.done" in pair.log("send"), 20, "the reconciliation to finish")
        pair.wait_converged(10)
        assert replica_b.read_bytes() == v2
    finally:
        pair.stop_all()
        proxy.close()


# ---- reconnecting to a receiver that was just restarted ---------------------------------------------------
async def test_tls_handshake_when_the_receiver_reads_the_preamble_late(tmp_path: Path) -> None:
    """The receiver reads the client's preamble only after a pause (busy, e.g. just restarted), when
    anything the client sent next has arrived too. The handshake must still complete.

    Regression: found by the receiver kill loop, where reconnects hung for connect_timeout because the
    ClientHello sat in the StreamReader buffer that read the preamble (fixed in 238cf5e: the receiver
    acknowledges the preamble before the handshake)."""
    sender = identity.create(tmp_path / "sender", "sender")[0]
    receiver = identity.create(tmp_path / "receiver", "receiver")[0]
    results: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.sleep(0.2)  # busy: whatever the client sends without waiting has arrived now
            async with asyncio.timeout(3):
                results.append(await server_upgrade(reader, writer, TlsSettings(receiver, sender.id)))
        except (TimeoutError, ReplicationError) as e:
            results.append(f"server: {type(e).__name__} {e}")
        finally:
            writer.transport.abort()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            async with asyncio.timeout(3):
                got = await client_upgrade(reader, writer, TlsSettings(sender, receiver.id))
        except TimeoutError:
            got = "client: TLS handshake did not complete within 3 s"
        except ReplicationError as e:
            got = f"client: {type(e).__name__} {e}"
        finally:
            writer.transport.abort()
        async with asyncio.timeout(5):
            while not results:
                await asyncio.sleep(0.01)
    finally:
        server.close()
        await server.wait_closed()
    assert got == receiver.id and results == [sender.id], (got, results)


# ---- child-process entry point ---------------------------------------------------------------------------
def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.test_crash")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("churn")
    c.add_argument("--root", type=Path, required=True)
    c.add_argument("--seed", type=int, required=True)
    c.add_argument("--stop-file", type=Path, required=True)
    c.add_argument("--stats-file", type=Path, required=True)
    c.add_argument("--rate", type=float, default=300.0)
    c.add_argument("--max-seconds", type=float, default=600.0)
    h = sub.add_parser("hooked-send")
    h.add_argument("--config", type=Path, required=True)
    h.add_argument("--victim", required=True)
    h.add_argument("--path", type=Path, required=True)
    h.add_argument("--next-version", type=Path, required=True)
    h.add_argument("--hold", type=float, default=3.0)
    h.add_argument("--late", type=float, default=1.0)
    a = ap.parse_args(argv)
    if a.cmd == "hooked-send":
        return hooked_send(a.config, a.victim, a.path, a.next_version, a.hold, a.late)
    churn(a.root, a.seed, a.stop_file, a.stats_file, a.rate, a.max_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
