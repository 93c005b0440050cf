"""Guarded files end to end: a torn sync cookie or config never reaches the passive.

The contract under test (engine/guard.py, engine/guards.py, engine/sender.py, engine/apply.py,
engine/history.py):
- the sender holds back a guarded file that fails its rule (log ``guard.torn``, counter ``held``) and the
  passive keeps the last good version; a later good write is replicated as usual;
- the receiver checks the rule again and refuses a torn version a guard-less sender ships (ack problem
  ``refused``);
- ``standby verify`` reports a file that is torn on the source as ``held`` (exit 0 if nothing else differs);
- the receiver keeps the last N good versions of every guarded file; ``standby guard history`` lists them
  and ``standby guard restore`` puts one back atomically, only while the receiver is stopped;
- a bad ``[[guard]]`` table is a config error naming ``guard[i]``.

Everything runs for real: a receiver and a sender as processes on 127.0.0.1 (:class:`tests.pair.Pair`,
plaintext loopback: see :func:`configure`), and the Synergy Join simulator (engine/simulator.py) as a
process that SIGKILLs itself inside a cookie rewrite. ``python -m engine.simulator`` can only set a tree up
afresh, so ``tests/data/sim_crash_driver.py`` runs it on the existing tree. Cookies are judged by
``tests/data/cookie_validator.py``, run by the engine as a ``command`` rule and imported here, so the engine
and the test use the same verdict. The ``base64`` rule is not enough for cookies: a cut at a multiple of 4
characters is valid base64 (see the docstring of engine/guard.py).

Knobs: ``STANDBY_SOAK=1`` injects 1000 crashes instead of 200; ``STANDBY_SEED`` fixes the random seed (it
is printed, and named in every failure, so a run can be repeated).
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from engine import history
from engine.digest import digest_bytes
from engine.errors import ReplicationError
from engine.guard import GuardRule, check_content
from engine.simulator import (
    CONFIG_PATH,
    COOKIE_MIN_CHARS,
    cookie_relpath,
    room_id,
    torn_write,
    write_in_place,
)
from tests.data.cookie_validator import cookie_problem
from tests.pair import ROOT, Pair, temp_files, wait_for

SOAK = os.environ.get("STANDBY_SOAK", "") not in ("", "0")
#: Crashes injected by the soak test. The short (CI) mode must finish well inside 90 s.
CRASHES = 1000 if SOAK else 200
SOAK_TIMEOUT = 1800 if SOAK else 90

DATA = Path(__file__).resolve().parent / "data"
VALIDATOR = DATA / "cookie_validator.py"
DRIVER = DATA / "sim_crash_driver.py"

COOKIE_PATTERN = "databases/*/sync.cookie"
BASE64_RULE = GuardRule(COOKIE_PATTERN, "base64")
JSON_RULE = GuardRule(CONFIG_PATH, "json")

#: The guards every test here configures: a payload-aware validator for cookies, the json rule for the
#: service's config.
GUARDS = f"""
[[guard]]
pattern = "{COOKIE_PATTERN}"
rule = "command"
command = ['{sys.executable}', "-I", "-S", '{VALIDATOR}', "{{path}}"]
timeout = 20

[[guard]]
pattern = "{CONFIG_PATH}"
rule = "json"
"""


# ---- helpers ---------------------------------------------------------------------------------------------
def run_seed() -> int:
    """``STANDBY_SEED`` if set, else a fresh one (printed and named in failures, so a run can be repeated)."""
    env = os.environ.get("STANDBY_SEED")
    return int(env) if env else random.SystemRandom().randrange(1 << 32)


def configure(pair: Pair, guards: str) -> None:
    """Write the pair's config (TLS with pinned IDs, as deployed) with ``guards`` appended."""
    pair.guards = guards
    pair.write_config()


def file_problem(rel: str, data: bytes) -> str | None:
    """The test's own verdict on a guarded file: None if whole, else why it is torn."""
    if rel.endswith("/sync.cookie"):
        return cookie_problem(data)
    if rel == CONFIG_PATH:
        v = check_content(JSON_RULE, data)
        return None if v.good else v.reason
    raise AssertionError(f"{rel} is not a guarded path")


def make_tree(pair: Pair, rooms: int, meetings: int, seed: int) -> list[str]:
    """The simulator's initial tree in the active folder (``python -m engine.simulator --batches 0``)."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.simulator",
            str(pair.source),
            "--rooms",
            str(rooms),
            "--meetings-per-room",
            str(meetings),
            "--seed",
            str(seed),
            "--batches",
            "0",
            "--piece-delay",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 0, f"simulator set-up exited with {r.returncode}: {r.stderr}"
    names = [room_id(i) for i in range(1, rooms + 1)]
    for room in names:
        assert cookie_problem((pair.source / cookie_relpath(room)).read_bytes()) is None, room
    return names


def make_cookie(room: str, generation: int, rng: random.Random, chars: int = 4096) -> bytes:
    """A whole cookie like the simulator's: base64 over gzip over ``room;gen=N;`` and random bytes."""
    header = f"{room};gen={generation};".encode()
    payload = header + rng.randbytes(max(0, chars * 3 // 4 - 23 - len(header)))
    return base64.b64encode(gzip.compress(payload, compresslevel=6, mtime=0))


def start_with_config(pair: Pair, role: str, config: Path) -> subprocess.Popen[bytes]:
    """Start ``role`` like :meth:`Pair.start` does, but from another config file. The process is kept in
    ``pair.procs`` (killed at teardown) and logs where :meth:`Pair.log` reads."""
    pair.starts[role] = pair.starts.get(role, 0) + 1
    with open(pair.base / f"{role}.{pair.starts[role]}.log", "wb") as log:
        p = subprocess.Popen(
            [sys.executable, "-m", "engine", "--log-level", "debug", role, "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    pair.procs[role] = p
    return p


def start_alive(pair: Pair, role: str) -> None:
    """Start ``role`` and fail (with its log) if it exited instead of coming up."""
    p = pair.start(role)
    assert p.poll() is None, f"{role} exited with {p.returncode}:\n{pair.log(role)}"
    if role == "send":
        assert "send.connected" in pair.log("send"), pair.all_logs()


def verify_json(pair: Pair) -> tuple[int, dict[str, Any]]:
    """``standby verify --json``: (exit code, report)."""
    r = pair.cli("verify", "--config", str(pair.config), "--json")
    assert r.returncode in (0, 1), f"verify exited with {r.returncode}:\n{r.stderr}\n{pair.all_logs()}"
    data: dict[str, Any] = json.loads(r.stdout)
    return r.returncode, data


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed command (no traceback)."""
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{r.stderr}"
    return lines[0]


class PassiveChecker(threading.Thread):
    """Reads the guarded files of the replica over and over; records every distinct version by hash and
    every one that fails its rule. Files on the replica are replaced by rename, so each read is one whole
    file as the receiver put it in place."""

    def __init__(self, target: Path, rels: list[str], interval: float = 0.01) -> None:
        super().__init__(name="passive-checker", daemon=True)
        self.target = target
        self.rels = rels
        self.interval = interval
        self.versions: dict[str, set[bytes]] = defaultdict(set)
        self.torn: list[tuple[str, int, str]] = []  # (path, size, reason)
        self.reads = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                self.poll()
                self._halt.wait(self.interval)
            self.poll()
        except BaseException as e:  # reported by stop(): an exception must not end the thread silently
            self.error = e

    def poll(self) -> None:
        for rel in self.rels:
            try:
                data = (self.target / rel).read_bytes()
            except FileNotFoundError:
                continue
            self.reads += 1
            key = digest_bytes(data)
            if key in self.versions[rel]:
                continue
            self.versions[rel].add(key)
            problem = file_problem(rel, data)
            if problem is not None:
                self.torn.append((rel, len(data), problem))

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        assert not self.is_alive(), "the passive checker did not stop"
        if self.error is not None:
            raise AssertionError(f"the passive checker failed: {self.error!r}") from self.error

    @property
    def distinct(self) -> int:
        return sum(len(v) for v in self.versions.values())


class Driver:
    """One run of ``tests/data/sim_crash_driver.py`` (a real process), stepped through its handshake."""

    def __init__(self, root: Path, rooms: int, seed: int, k: int, good_batches: int) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(DRIVER),
                str(root),
                "--rooms",
                str(rooms),
                "--meetings-per-room",
                "10",
                "--seed",
                str(seed),
                "--good-batches",
                str(good_batches),
                "--crash-after-bytes",
                str(k),
                "--piece-delay",
                "0.002",
                "--wait-start",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self.result: tuple[int, str] | None = None

    def expect(self, line: str, what: str) -> None:
        assert self.proc.stdout is not None
        got = self.proc.stdout.readline().strip()
        if got != line:
            code, err = self.finish()
            raise AssertionError(f"{what}: the driver said {got!r}, not {line!r}; exit {code}\n{err}")

    def tell(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        """Wait for the process to end (killing it if it does not) and return (returncode, stderr). A run
        still waiting for ``start`` or ``go`` sees its input closed and exits 0 without touching the tree."""
        if self.result is None:
            try:
                _, err = self.proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                _, err = self.proc.communicate()
            self.result = (self.proc.returncode, err)
        return self.result


_CRASH_LINE = re.compile(r"simulator\.crash path=(\S+) written=(\d+) of=(\d+)")


# ---- 1. the crash soak -----------------------------------------------------------------------------------
@pytest.mark.soak
@pytest.mark.timeout(SOAK_TIMEOUT)
def test_torn_cookies_never_reach_the_passive(pair: Pair) -> None:
    seed = run_seed()
    rng = random.Random(seed)
    tag = f"(STANDBY_SEED={seed})"
    print(f"\nseed {seed}, {CRASHES} crashes")
    rooms = 5
    configure(pair, GUARDS)
    names = make_tree(pair, rooms, 10, seed)
    cookies = {room: cookie_relpath(room) for room in names}
    start_alive(pair, "receive")
    start_alive(pair, "send")
    pair.wait_converged()

    last_good = {room: (pair.source / rel).read_bytes() for room, rel in cookies.items()}

    checker = PassiveChecker(pair.target, [*cookies.values(), CONFIG_PATH])

    def passive_has_last_good() -> bool:
        if checker.torn:  # fail at once rather than wait for a good version that may never come
            raise AssertionError(f"{tag} torn versions reached the passive (path, size, why): {checker.torn}")
        return all((pair.target / cookies[r]).read_bytes() == last_good[r] for r in names)

    checker.start()
    # Each run's K is below every cookie's length, so the first cookie rewrite of its crash batch is cut.
    plans = [(rng.randint(1, COOKIE_MIN_CHARS - 1), rng.choice((0, 1))) for _ in range(CRASHES)]
    crashes = torn_on_active = base64_blind = 0
    t0 = time.monotonic()

    def driver(i: int) -> Driver:
        return Driver(pair.source, rooms, seed * 10_000 + i, *plans[i])

    run: Driver | None = None
    nxt: Driver | None = driver(0)
    try:
        for i, (k, _good) in enumerate(plans):
            assert nxt is not None
            run = nxt
            # The next run's interpreter starts while this one works; it waits before touching the tree.
            nxt = driver(i + 1) if i + 1 < CRASHES else None
            what = f"run {i} {tag}"
            run.expect("loaded", what)
            run.tell("start")
            run.expect("ready", what)
            # Before the crash: every cookie that is whole on the active is its room's last good version,
            # and the replica gets the chance to have it (the service writes a cookie per batch, seconds
            # apart; a version torn before the sender could read it was never there to replicate).
            for room, rel in cookies.items():
                data = (pair.source / rel).read_bytes()
                if cookie_problem(data) is None:
                    last_good[room] = data
            wait_for(passive_has_last_good, 20, f"{what}: the last good cookies on the replica", 0.01)
            run.tell("go")
            code, err = run.finish()
            assert code == -signal.SIGKILL, f"{what}: the simulator exited with {code}, not SIGKILL\n{err}"
            crashes += 1
            m = _CRASH_LINE.search(err)
            assert m is not None, f"{what}: no simulator.crash line:\n{err}"
            assert int(m[2]) == k < int(m[3]), f"{what}: crash line {m[0]!r} for K={k}"
            assert os.path.relpath(m[1], pair.source) in cookies.values(), f"{what}: {m[0]!r} is not a cookie"
            torn = Path(m[1]).read_bytes()
            assert len(torn) == k, f"{what}: {m[1]} has {len(torn)} bytes after a crash at {k}"
            if cookie_problem(torn) is not None:
                torn_on_active += 1
            if check_content(BASE64_RULE, torn).good:
                base64_blind += 1
        elapsed = time.monotonic() - t0

        # The end state: each room's passive cookie is its last good version, whether the active's is torn
        # (held back) or whole (the same bytes); every other file has converged.
        torn_rooms = {r for r in names if cookie_problem((pair.source / cookies[r]).read_bytes()) is not None}
        held_rels = {cookies[r] for r in torn_rooms}

        def settled() -> bool:
            s, r = pair.source_tree(), pair.replica_tree()
            same = {k: v for k, v in s.items() if k not in held_rels} == {
                k: v for k, v in r.items() if k not in held_rels
            }
            return same and passive_has_last_good()

        try:
            wait_for(settled, 30, "the replica to settle", interval=0.1)
        except AssertionError as e:
            s, r = pair.source_tree(), pair.replica_tree()
            diff = sorted(k for k in set(s) | set(r) if s.get(k) != r.get(k))
            raise AssertionError(
                f"{e} {tag}; torn rooms {sorted(torn_rooms)}; differing: {diff[:10]}\n{pair.all_logs()}"
            ) from None
    finally:
        for d in (run, nxt):
            if d is not None:
                d.finish()
        checker.stop()

    st = pair.wait_status(lambda s: s["sender"]["counters"]["held"] > 0, 10, "counters.held > 0")
    held = st["sender"]["counters"]["held"]
    code, report = verify_json(pair)
    refused_by_receiver = pair.log("receive").count("apply.refused")
    print(
        f"crashes injected: {crashes} in {elapsed:.1f} s\n"
        f"torn cookies refused by the validator on the active: {torn_on_active} "
        f"(of which the base64 rule alone would have passed {base64_blind})\n"
        f"torn versions seen on the passive: {len(checker.torn)} "
        f"(distinct versions seen: {checker.distinct}, reads: {checker.reads})\n"
        f"sender counters.held: {held}; receiver refusals: {refused_by_receiver}; "
        f"rooms torn at the end: {len(torn_rooms)}"
    )

    assert crashes == CRASHES >= 200
    assert torn_on_active == crashes, f"{crashes - torn_on_active} crashes left a cookie the validator passed"
    assert not checker.torn, f"torn versions reached the passive {tag}: {checker.torn[:5]}"
    assert checker.distinct > len(names) + crashes // 4, (
        f"the checker saw only {checker.distinct} versions: it did not watch the replication it checks"
    )
    assert held > 0
    assert code == 0 and report["identical"], report
    assert {d["path"] for d in report["differences"]} == held_rels, report["differences"]
    assert all(d["kind"] == "held" for d in report["differences"]), report["differences"]


# ---- 2. torn, then fixed by a good write -------------------------------------------------------------------
def test_a_torn_cookie_is_held_and_replicated_once_a_good_write_fixes_it(pair: Pair) -> None:
    configure(pair, GUARDS)
    room = make_tree(pair, 2, 3, seed=7)[0]
    rel = cookie_relpath(room)
    start_alive(pair, "receive")
    start_alive(pair, "send")
    pair.wait_converged()
    old = (pair.target / rel).read_bytes()

    new = make_cookie(room, 1000, random.Random(2))
    cut = len(new) // 2 // 4 * 4
    assert check_content(BASE64_RULE, new[:cut]).good, "premise: a cut at 4k characters is valid base64"
    torn_write(pair.source / rel, new, cut)
    pair.wait_log("send", f"guard.torn path={rel!r}")
    assert (pair.target / rel).read_bytes() == old, "the passive lost its good cookie to a torn one"
    code, report = verify_json(pair)
    assert code == 0, report
    assert report["identical"] is True, report
    assert [(d["path"], d["kind"]) for d in report["differences"]] == [(rel, "held")], report
    r = pair.cli("verify", "--config", str(pair.config))
    assert r.returncode == 0, f"verify exited with {r.returncode}:\n{r.stdout}{r.stderr}"
    assert "held" in r.stdout and "identical" in r.stdout, r.stdout
    st = pair.wait_status(lambda s: s["sender"]["counters"]["held"] >= 1, 10, "counters.held >= 1")
    assert st["sender"]["counters"]["held"] >= 1

    write_in_place(pair.source / rel, new, pieces=4, piece_delay=0.005)
    pair.wait_converged()
    assert (pair.target / rel).read_bytes() == new
    code, report = verify_json(pair)
    assert (code, report["differences"]) == (0, []), report


# ---- 3. the receiver defends itself ------------------------------------------------------------------------
def test_the_receiver_refuses_a_torn_file_from_a_sender_without_guards(pair: Pair) -> None:
    configure(pair, GUARDS)
    room = make_tree(pair, 1, 2, seed=11)[0]
    cookie = cookie_relpath(room)
    text = pair.config.read_text("utf-8")
    unguarded = pair.base / "sender-unguarded.toml"
    unguarded.write_text(text[: text.index("[[guard]]")], "utf-8")
    assert "guard" not in unguarded.read_text("utf-8")
    start_alive(pair, "receive")
    sender = start_with_config(pair, "send", unguarded)
    pair.wait_log("send", "send.connected")
    pair.wait_converged()
    old_config = (pair.target / CONFIG_PATH).read_bytes()
    old_cookie = (pair.target / cookie).read_bytes()

    new_config = json.dumps({"service": {"name": "Synergy Join"}, "revision": 99}, indent=2).encode()
    torn_write(pair.source / CONFIG_PATH, new_config, len(new_config) // 2)
    new_cookie = make_cookie(room, 1000, random.Random(3))
    torn_write(pair.source / cookie, new_cookie, len(new_cookie) // 2 // 4 * 4)  # valid base64, cut gzip

    for rel in (CONFIG_PATH, cookie):
        problem = re.compile(rf"send\.receiver_problem seq=\d+ path={re.escape(repr(rel))} code=refused ")
        refusal = re.compile(rf"apply\.refused seq=\d+ path={re.escape(repr(rel))} reason=")
        try:
            wait_for(lambda: problem.search(pair.log("send")) is not None, 20, f"{rel} refused")  # noqa: B023
        except AssertionError as e:
            raise AssertionError(f"{e}\n{pair.all_logs()}") from None
        assert refusal.search(pair.log("receive")), pair.log("receive")
    assert sender.poll() is None, pair.all_logs()
    assert "guard.torn" not in pair.log("send"), "the sender held the file: it was meant to have no guards"
    assert (pair.target / CONFIG_PATH).read_bytes() == old_config
    assert (pair.target / cookie).read_bytes() == old_cookie
    assert not temp_files(pair.target)

    # The torn versions never entered the history, and a good write afterwards replicates.
    history = pair.receiver_state / "guard-history"
    kept = [(p.parent.name, p.read_bytes()) for p in history.rglob("*.v")]
    assert kept, "the receiver kept no history of the guarded files"
    for folder, data in kept:
        rel = {quote(r, safe=""): r for r in (CONFIG_PATH, cookie)}[folder]
        assert file_problem(rel, data) is None, f"a torn version of {rel} is in the history"
    write_in_place(pair.source / CONFIG_PATH, new_config)
    write_in_place(pair.source / cookie, new_cookie)
    pair.wait_converged()


# ---- 4. the history of good versions, and restore ----------------------------------------------------------
def test_guard_history_lists_the_last_good_versions_and_restore_puts_one_back(pair: Pair) -> None:
    configure(pair, GUARDS)
    room = make_tree(pair, 1, 1, seed=5)[0]
    rel = cookie_relpath(room)
    start_alive(pair, "receive")
    start_alive(pair, "send")
    pair.wait_converged()
    rng = random.Random(4)
    written = [(pair.target / rel).read_bytes()]
    mtimes = [(pair.target / rel).stat().st_mtime_ns]  # as the replica had each version
    for gen in range(1, 8):  # 8 good versions in all, more than the 5 kept
        data = make_cookie(room, gen, rng, chars=rng.randint(2048, 8192))
        write_in_place(pair.source / rel, data, pieces=4, piece_delay=0.002)
        wait_for(lambda: (pair.target / rel).read_bytes() == data, 20, f"version {gen}")  # noqa: B023
        written.append(data)
        mtimes.append((pair.target / rel).stat().st_mtime_ns)

    r = pair.cli("guard", "history", "--config", str(pair.config), rel, "--json")
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    assert [v["version"] for v in listed] == [0, 1, 2, 3, 4], listed
    assert [v["digest"] for v in listed] == [digest_bytes(d).hex() for d in reversed(written[-5:])], (
        "not the last 5 versions, newest first"
    )
    assert [v["size"] for v in listed] == [len(d) for d in reversed(written[-5:])]
    seqs = [v["seq"] for v in listed]
    assert seqs == sorted(seqs, reverse=True), seqs
    kept = sorted((pair.receiver_state / "guard-history" / quote(rel, safe="")).glob("*.v"))
    assert len(kept) == 5 and all(cookie_problem(p.read_bytes()) is None for p in kept)

    # Restore refuses while the receiver runs: the next change it applies would overwrite the file.
    before = (pair.target / rel).stat()
    r = pair.cli("guard", "restore", "--config", str(pair.config), rel, "--version", "2")
    assert r.returncode != 0, f"restore ran while the receiver was running: {r.stdout}"
    line = one_line_error(r)
    assert "receiver is running" in line and "stop it" in line, line
    assert (pair.target / rel).read_bytes() == written[-1]

    assert pair.stop("send") == 0
    assert pair.stop("receive") == 0
    r = pair.cli("guard", "restore", "--config", str(pair.config), rel, "--version", "99")
    assert r.returncode != 0, r.stdout
    line = one_line_error(r)
    assert "99" in line and "0..4" in line, line
    assert (pair.target / rel).read_bytes() == written[-1]

    r = pair.cli("guard", "restore", "--config", str(pair.config), rel, "--version", "2")
    assert r.returncode == 0, r.stderr
    assert "version 2" in r.stdout, r.stdout
    after = (pair.target / rel).stat()
    assert (pair.target / rel).read_bytes() == written[-3], "restored bytes are not version 2"
    assert after.st_mtime_ns == mtimes[-3], "the restored file does not have version 2's modification time"
    assert after.st_ino != before.st_ino, "restore rewrote the file in place instead of renaming a new one"
    assert not temp_files(pair.target)


class SteppedClock:
    """Stands in for the ``time`` module inside engine.history: a wall clock the test sets."""

    def __init__(self, now_ns: int) -> None:
        self.now_ns = now_ns

    def time_ns(self) -> int:
        return self.now_ns


def test_guard_history_keeps_the_newest_version_when_the_clock_steps_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = SteppedClock(1_800_000_000 * 10**9)
    monkeypatch.setattr(history, "time", clock, raising=False)  # history must not order by it
    kept = history.GuardHistory(tmp_path / "guard-history", keep=3, fsync=False)
    rel = cookie_relpath(room_id(1))
    for seq in range(1, 5):
        clock.now_ns += 10**9
        if seq == 4:
            clock.now_ns -= 3600 * 10**9  # the receiver's clock is corrected an hour back
        kept.record(rel, seq, seq * 10**9, f"version {seq}".encode())
    got = [(v.index, v.path.read_bytes()) for v in kept.versions(rel)]
    assert got == [(0, b"version 4"), (1, b"version 3"), (2, b"version 2")], got


def test_a_torn_guarded_file_larger_than_4_mib_is_held_too(pair: Pair) -> None:
    configure(pair, GUARDS)
    make_tree(pair, 1, 1, seed=13)
    config = pair.source / CONFIG_PATH
    big = json.dumps({"revision": 1, "padding": "x" * (5 << 20)}).encode()
    write_in_place(config, big)
    start_alive(pair, "receive")
    start_alive(pair, "send")
    pair.wait_converged(timeout=60)
    assert (pair.target / CONFIG_PATH).read_bytes() == big

    bigger = json.dumps({"revision": 2, "padding": "y" * (10 << 20)}).encode()
    torn_write(config, bigger, 6 << 20)  # the torn file is 6 MiB: over SMALL_FILE
    assert file_problem(CONFIG_PATH, config.read_bytes()) is not None
    try:
        wait_for(
            lambda: (
                "guard.torn" in pair.log("send") or (pair.target / CONFIG_PATH).stat().st_size != len(big)
            ),
            30,
            "the sender to decide",
        )
    except AssertionError as e:
        raise AssertionError(f"{e}\n{pair.all_logs()}") from None
    time.sleep(1)  # let a wrongly shipped version land, so the assertion below sees it
    got = (pair.target / CONFIG_PATH).read_bytes()
    held, refused = pair.log("send").count("guard.torn"), pair.log("receive").count("apply.refused")
    assert file_problem(CONFIG_PATH, got) is None, (
        f"a torn {len(got)}-byte config.json is on the passive (guard.torn: {held}, refused: {refused})"
    )
    assert got == big
    assert f"guard.torn path={CONFIG_PATH!r}" in pair.log("send")


# ---- 5. config errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("role", ["send", "receive"])
@pytest.mark.parametrize(
    ("case", "table", "named"),
    [
        pytest.param(
            "unknown rule", 'pattern = "databases/*/sync.cookie"\nrule = "crc32"', "crc32", id="unknown-rule"
        ),
        pytest.param(
            "command rule without command",
            'pattern = "databases/*/sync.cookie"\nrule = "command"',
            "needs a command",
            id="command-without-command",
        ),
        pytest.param(
            "unknown key",
            'pattern = "databases/*/sync.cookie"\nrule = "base64"\ncolour = "red"',
            "guard[0] -> colour: unknown key",
            id="unknown-key",
        ),
    ],
)
def test_a_bad_guard_table_exits_2_naming_it(
    pair: Pair, role: str, case: str, table: str, named: str
) -> None:
    configure(pair, f"\n[[guard]]\n{table}\n")
    r = pair.cli(role, "--config", str(pair.config), timeout=20)
    assert r.returncode == 2, f"{case}: exit {r.returncode}, expected 2\n{r.stderr}"
    line = one_line_error(r)
    assert line.startswith("standby: config error: guard[0]"), line
    assert named in line, f"{case}: the message does not name {named!r}: {line}"
    started = [p for p in (pair.sender_state / "journal", pair.receiver_state / "position") if p.exists()]
    assert not started, f"{case}: a bad config still started work: {started}"


# ---- 6. history across renames, odd times and symlinks; verify's text report ------------------------------
def test_guard_history_follows_a_renamed_folder(pair: Pair) -> None:
    configure(pair, GUARDS)
    room = make_tree(pair, 1, 1, seed=17)[0]
    rel = cookie_relpath(room)
    start_alive(pair, "receive")
    start_alive(pair, "send")
    pair.wait_converged()
    rng = random.Random(6)
    data = make_cookie(room, 1, rng)
    write_in_place(pair.source / rel, data, pieces=2, piece_delay=0.002)
    wait_for(lambda: (pair.target / rel).read_bytes() == data, 20, "the new cookie on the passive")
    r = pair.cli("guard", "history", "--config", str(pair.config), rel, "--json")
    assert r.returncode == 0, r.stderr
    before = json.loads(r.stdout)
    assert len(before) == 2, before  # the initial version and the rewrite

    folder = rel.rsplit("/", 2)[0] + "/" + room  # databases/<room>
    moved_folder = folder + "-moved"
    moved = moved_folder + "/" + rel.rsplit("/", 1)[1]
    (pair.source / folder).rename(pair.source / moved_folder)
    pair.wait_converged()
    assert (pair.target / moved).read_bytes() == data

    r = pair.cli("guard", "history", "--config", str(pair.config), moved, "--json")
    assert r.returncode == 0, r.stderr
    after = json.loads(r.stdout)
    assert [v["digest"] for v in after] == [v["digest"] for v in before], (
        f"the kept versions did not follow the rename: {after}\n{pair.all_logs()}"
    )
    r = pair.cli("guard", "history", "--config", str(pair.config), rel, "--json")
    assert json.loads(r.stdout) == [], "the old path still has versions"

    # and restore works under the new path
    assert pair.stop("send") == 0 and pair.stop("receive") == 0
    r = pair.cli("guard", "restore", "--config", str(pair.config), moved, "--version", "1")
    assert r.returncode == 0, r.stderr
    assert digest_bytes((pair.target / moved).read_bytes()).hex() == before[1]["digest"]


def test_guard_history_of_files_dated_before_1970_and_renames(tmp_path: Path) -> None:
    kept = history.GuardHistory(tmp_path / "guard-history", keep=3, fsync=False)
    rel = "databases/r1/sync.cookie"
    kept.record(rel, 1, -86_400 * 10**9, b"v1")  # 1969-12-31
    kept.record(rel, 2, -1_009_843_200 * 10**9, b"v2")  # 1938
    kept.record("databases/r1/other.cookie", 3, 5, b"o")
    kept.record("databases/r10/sync.cookie", 4, 5, b"not below r1")
    assert [(v.seq, v.mtime_ns) for v in kept.versions(rel)] == [
        (2, -1_009_843_200 * 10**9),
        (1, -86_400 * 10**9),
    ]

    kept.record("databases/r2/sync.cookie", 9, 9, b"replaced by the rename")
    kept.rename("databases/r1", "databases/r2")
    kept.rename("databases/r1", "databases/r2")  # a replayed record finds its work done
    assert kept.versions(rel) == []
    assert [v.path.read_bytes() for v in kept.versions("databases/r2/sync.cookie")] == [b"v2", b"v1"]
    assert [v.path.read_bytes() for v in kept.versions("databases/r2/other.cookie")] == [b"o"]
    assert [v.path.read_bytes() for v in kept.versions("databases/r10/sync.cookie")] == [b"not below r1"]
    kept.rename("databases/r2/sync.cookie", "databases/r2/renamed.cookie")
    assert len(kept.versions("databases/r2/renamed.cookie")) == 2

    # restore puts the 1938 time back
    target = tmp_path / "replica"
    v = kept.restore("databases/r2/renamed.cookie", 0, target)
    assert (target / "databases/r2/renamed.cookie").read_bytes() == b"v2"
    assert (target / "databases/r2/renamed.cookie").stat().st_mtime_ns == v.mtime_ns == -1_009_843_200 * 10**9


def test_guard_restore_never_writes_through_a_symlink(tmp_path: Path) -> None:
    kept = history.GuardHistory(tmp_path / "guard-history", fsync=False)
    kept.record("config/config.json", 1, 1, b"{}")
    target, outside = tmp_path / "replica", tmp_path / "outside"
    target.mkdir()
    outside.mkdir()
    (target / "config").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ReplicationError, match="symlink at 'config'"):
        kept.restore("config/config.json", 0, target)
    assert list(outside.iterdir()) == []


def test_verify_lists_a_held_file_once_and_long_paths_whole(pair: Pair) -> None:
    configure(pair, GUARDS)
    room = make_tree(pair, 2, 1, seed=19)[0]
    rel = cookie_relpath(room)
    long_rel = "databases/" + "/".join(["a-rather-long-folder-name-for-meetings"] * 3) + "/m.json"
    assert len(long_rel) > 100
    (pair.source / long_rel).parent.mkdir(parents=True)
    (pair.source / long_rel).write_text('{"m": 1}', "utf-8")
    start_alive(pair, "receive")
    start_alive(pair, "send")
    pair.wait_converged()
    new = make_cookie(room, 1000, random.Random(8))
    torn_write(pair.source / rel, new, len(new) // 2 // 4 * 4)
    pair.wait_log("send", f"guard.torn path={rel!r}")
    assert pair.stop("send") == 0
    (pair.target / long_rel).write_text('{"m": "changed on the passive"}', "utf-8")

    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    r = subprocess.run(
        [sys.executable, "-m", "engine", "verify", "--config", str(pair.config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    assert r.returncode == 1, f"verify exited {r.returncode}\n{r.stdout}{r.stderr}"
    lines = r.stdout.splitlines()
    assert sum(rel in line for line in lines) == 1, f"the held file is not listed exactly once:\n{r.stdout}"
    assert any(line.startswith(f"held: {rel}: ") for line in lines), r.stdout
    assert any(line.startswith(f"content: {long_rel}: ") for line in lines), f"a path was cut:\n{r.stdout}"
