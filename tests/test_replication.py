"""End-to-end replication: a real receiver and sender as separate processes on 127.0.0.1, on real folders.

Every test drives the ``standby`` command through :class:`tests.pair.Pair`: real TCP, real files, real
signals. Nothing of the engine is mocked. Where a test needs the engine's own view it asks the way an
operator would: ``standby status --json``, ``standby verify`` and the logs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import skip_or_fail
from tests.pair import Pair, file_digest, temp_files, wait_for

MIB = 1 << 20
MAX_QUEUED_EVENTS = Path("/proc/sys/fs/inotify/max_queued_events")

#: The pair runs over TLS with pinned IDs, as deployed; STANDBY_E2E_PLAINTEXT=1 runs these tests in loopback
#: plaintext mode instead (to tell a transport problem from a replication one).
PLAINTEXT = os.environ.get("STANDBY_E2E_PLAINTEXT") == "1"


@pytest.fixture
def pair(pair: Pair) -> Pair:
    """The harness pair (plaintext only with STANDBY_E2E_PLAINTEXT=1). Tests that add config lines append
    to ``sender_extra``/``receiver_extra``."""
    if PLAINTEXT:
        pair.sender_extra = pair.receiver_extra = "insecure = true"
        pair.write_config()
    return pair


def write_files(folder: Path, count: int, prefix: str = "f") -> list[Path]:
    """``count`` small JSON files in ``folder`` (created), each with distinct content."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        p = folder / f"{prefix}{i:03d}.json"
        p.write_text(f'{{"meeting": {i}, "room": "{folder.name}"}}\n', "utf-8")
        out.append(p)
    return out


def files_below(root: Path) -> list[str]:
    """Relative paths of the regular files below ``root``, sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def connected_from(log: str) -> list[int]:
    """The ``from=`` position of every ``send.connected`` line of a sender log."""
    return [int(m) for m in re.findall(r"send\.connected .* from=(\d+) ", log)]


def wait_caught_up(pair: Pair, timeout: float = 15) -> dict[str, Any]:
    """Status once the sender is connected and the receiver has applied everything the sender journaled."""

    def caught_up(st: dict[str, Any]) -> bool:
        s, r = st["sender"], st["receiver"]
        return bool(s.get("connected")) and s.get("head", -1) == s.get("acked_seq") == r.get("applied_seq")

    return pair.wait_status(caught_up, timeout, "the sender to be connected with every entry acknowledged")


class RssSampler(threading.Thread):
    """Samples the resident set size of some processes until stopped; keeps the peak of each."""

    def __init__(self, pids: dict[str, int], interval: float = 0.05) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak = dict.fromkeys(pids, 0)
        self.samples = 0
        self.interval = interval
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            for name, proc in self.procs.items():
                try:
                    self.peak[name] = max(self.peak[name], int(proc.memory_info().rss))
                except psutil.NoSuchProcess:
                    pass
            self.samples += 1
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


# ---------------------------------------------------------------------------------------------------------
# 1. A large file streams through both processes in bounded memory


@pytest.mark.timeout(90)
def test_large_file_replicates_byte_identical_in_bounded_memory(pair: Pair) -> None:
    size = 200 * MIB
    limit = 300 * 1000 * 1000
    (pair.source / "databases").mkdir()
    pair.start("receive")
    pair.start("send")
    pids = {"sender": pair.procs["send"].pid, "receiver": pair.procs["receive"].pid}
    baseline = {name: int(psutil.Process(pid).memory_info().rss) for name, pid in pids.items()}
    sampler = RssSampler(pids)
    sampler.start()
    big = pair.source / "databases" / "big.bin"
    replica = pair.target / "databases" / "big.bin"

    def arrived() -> bool:
        if "receiver.protocol_error" in pair.log("receive"):
            raise AssertionError(f"the receiver dropped the stream of big.bin\n{pair.all_logs()}")
        return replica.exists() and replica.stat().st_size == size

    try:
        with open(big, "wb") as f:
            for _ in range(size // (8 * MIB)):
                f.write(os.urandom(8 * MIB))
        wait_for(
            arrived, 60, f"the replica of big.bin to reach {size} bytes\n{pair.all_logs()}", interval=0.1
        )
    finally:
        sampler.stop()
    assert file_digest(replica) == file_digest(big), "the replica of big.bin differs from the source"
    assert replica.stat().st_mtime_ns == big.stat().st_mtime_ns, "the modification time was not carried over"
    assert sampler.samples >= 10, f"only {sampler.samples} RSS samples were taken while streaming"
    for name, peak in sampler.peak.items():
        assert 0 < peak < limit, (
            f"the {name} peaked at {peak / 1e6:.0f} MB RSS while replicating a {size // MIB} MiB file "
            f"(limit {limit / 1e6:.0f} MB): content must stream in chunks\n{pair.all_logs()}"
        )
        # Stricter, since one whole copy of the file on top of a ~50 MB process would still fit in 300 MB:
        # streaming must not grow a process by even half the file.
        assert peak - baseline[name] < size // 2, (
            f"the {name} grew from {baseline[name] / 1e6:.0f} MB to {peak / 1e6:.0f} MB RSS while "
            f"replicating a {size // MIB} MiB file: content must stream in chunks"
        )
    assert not temp_files(pair.target), f"temporary files left in the replica: {temp_files(pair.target)}"


@pytest.mark.timeout(60)
def test_a_reconciliation_while_a_large_file_streams_does_not_break_the_stream(pair: Pair) -> None:
    pair.sender_extra += "\nreconcile_interval = 0.5"
    pair.write_config()
    (pair.source / "databases").mkdir()
    pair.start("receive")
    pair.start("send")
    big = pair.source / "databases" / "big.bin"
    # Large enough that its stream outlasts the 0.5 s between reconciliations on a fast machine too
    # (a large put streams at a few hundred MiB/s here).
    with open(big, "wb") as f:
        for _ in range(48):
            f.write(os.urandom(8 * MIB))
    replica = pair.target / "databases" / "big.bin"

    def arrived() -> bool:
        if "receiver.protocol_error" in pair.log("receive"):
            raise AssertionError(f"the receiver dropped the stream of big.bin\n{pair.all_logs()}")
        return replica.exists() and replica.stat().st_size == big.stat().st_size

    wait_for(arrived, 40, f"the replica of big.bin\n{pair.all_logs()}", interval=0.1)
    assert "reconcile.done reason=schedule" in pair.log("send"), "no reconciliation ran during the test"
    assert file_digest(replica) == file_digest(big)


# ---------------------------------------------------------------------------------------------------------
# 2. Start-up reconciliation: what changed while the sender was down


def test_changes_made_while_the_sender_was_stopped_replicate_on_restart(pair: Pair) -> None:
    dbs = pair.source / "databases"
    room1 = write_files(dbs / "room-1", 6)
    write_files(dbs / "room-2" / "sub", 3)
    (pair.source / "config").mkdir()
    (pair.source / "config" / "config.json").write_text('{"v": 1}')
    pair.start("receive")
    pair.start("send")
    pair.wait_converged()
    assert pair.stop("send") == 0, pair.all_logs()

    write_files(dbs / "room-3", 2)  # a new folder with files
    (dbs / "room-1" / "new.json").write_text('{"new": true}')  # a new file in a known folder
    room1[0].write_text('{"meeting": 0, "moved": "to 10:30"}')  # modified content and size
    (pair.source / "config" / "config.json").write_text('{"v": 2}')
    room1[1].unlink()  # a deleted file
    shutil.rmtree(dbs / "room-2")  # a deleted folder with a subfolder and files
    # 4 of the replica's 10 files go: under max_delete_share, so no safety halt.

    pair.start("send")
    pair.wait_converged()
    assert not (pair.target / "databases" / "room-2").exists(), "the deleted folder is still on the replica"
    assert not (pair.target / "databases" / "room-1" / room1[1].name).exists(), "the deleted file is back"
    assert "reconcile.done reason=connect" in pair.log("send"), pair.all_logs()


# ---------------------------------------------------------------------------------------------------------
# 3. Receiver down: the sender journals on and resumes from the receiver's position


def test_receiver_restart_resumes_the_stream_without_a_full_resend(pair: Pair) -> None:
    dbs = pair.source / "databases"
    files = write_files(dbs / "room-1", 40)
    pair.start("receive")
    pair.start("send")
    pair.wait_converged()
    before = wait_caught_up(pair)
    head = before["sender"]["head"]
    assert head >= 41, f"expected at least 41 entries (a folder and 40 files) before the outage: {before}"

    assert pair.stop("receive") == 0, pair.all_logs()
    pair.wait_log("send", "send.link_down")
    (dbs / "room-1" / "added-1.json").write_text("{}")
    (dbs / "room-1" / "added-2.json").write_text('{"x": 2}')
    files[0].write_text('{"meeting": 0, "changed": true}')
    files[1].unlink()
    changes = 4
    pair.wait_status(
        lambda st: st["sender"]["head"] >= head + changes,
        15,
        "the sender to journal the changes made while the receiver was down",
    )
    assert not pair.converged(), "the replica changed while its receiver was down"

    pair.start("receive")
    pair.wait_converged()
    st = wait_caught_up(pair)
    applied = st["receiver"]["counters"]["applied"]
    new = st["sender"]["head"] - head
    assert applied == new and new <= changes + 2, (
        f"the restarted receiver applied {applied} entries; the sender journaled {new} while it was down "
        f"(a full resend would be over {head})\n{pair.all_logs()}"
    )
    send_log = pair.log("send")
    assert connected_from(send_log)[-1] == head + 1, (
        f"the sender did not resume right after the receiver's position {head}\n{send_log}"
    )
    assert send_log.count("send.new_generation") == 1, f"the sender started a new generation\n{send_log}"


# ---------------------------------------------------------------------------------------------------------
# 4. A watcher overflow is noticed and answered with a full reconciliation


def overflow_burst() -> int:
    """How many new files overflow a sender's inotify queue while it is stopped: each makes at least two
    events (create, close), so half the kernel's ``max_queued_events``, and more. The limit is left as it
    is: it is read when an inotify instance is made, by every process, so lowering it for one test would
    give any sender another test starts meanwhile (pytest -n) a queue that overflows."""
    try:
        limit = int(MAX_QUEUED_EVENTS.read_text())
    except OSError as e:
        skip_or_fail(f"{MAX_QUEUED_EVENTS} is not readable ({e.strerror})", "CI=true: inotify is tested")
    if limit > 100_000:
        skip_or_fail(
            f"max_queued_events is {limit:,}: overflowing it would take over 50,000 files",
            "CI=true: the overflow must be tested; run CI with the default limit",
        )
    return limit // 2 + 1000


def start_and_converge(pair: Pair) -> Path:
    """Start the pair, wait until it has converged, and return the (existing, watched) folder
    ``databases/burst``."""
    burst = pair.source / "databases" / "burst"
    burst.mkdir(parents=True)  # exists before the sender starts: no watcher restart re-creates the observer
    pair.start("receive")
    pair.start("send")
    pair.wait_log("send", "watch.started")
    pair.wait_converged()
    return burst


@pytest.mark.timeout(90)
def test_watcher_overflow_triggers_a_reconciliation_that_converges(pair: Pair) -> None:
    # A short max_open keeps a file whose close event was lost from holding up convergence (see the next
    # test); the files whose events were lost altogether can only come back through the reconciliation.
    pair.sender_extra += "\nmax_open = 2"
    pair.write_config()
    count = overflow_burst()
    burst = start_and_converge(pair)
    sender = psutil.Process(pair.procs["send"].pid)
    # Deterministic loss: while the sender is stopped nothing drains its queue, so the burst overflows it.
    sender.suspend()
    try:
        for i in range(count):
            fd = os.open(burst / f"m{i:05d}.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, b'{"n": %d}' % i)
            finally:
                os.close(fd)
    finally:
        sender.resume()
    pair.wait_log("send", "watch.overflow", timeout=20)
    pair.wait_converged(timeout=60)
    repaired = [int(n) for n in re.findall(r"reconcile\.done reason=overflow puts=(\d+)", pair.log("send"))]
    assert any(repaired), f"no overflow reconciliation shipped a lost file: {repaired}\n{pair.all_logs()}"


@pytest.mark.timeout(90)
def test_a_close_lost_in_an_overflow_does_not_wait_for_max_open(pair: Pair) -> None:
    count = overflow_burst()
    burst = start_and_converge(pair)
    held = burst / "held-open.json"
    sender = psutil.Process(pair.procs["send"].pid)
    with open(held, "wb") as f:
        f.write(b'{"meeting": ')
        f.flush()  # created and modified: the sender now waits for the close
        pair.wait_status(
            lambda st: st["sender"]["pending_paths"] >= 1, 10, "the sender to track the file being written"
        )
        # Deterministic loss: while the sender is stopped nothing drains its queue, so the burst fills it
        # and the close that follows is dropped by the kernel.
        sender.suspend()
        try:
            for i in range(count):
                (burst / f"m{i:05d}.json").write_bytes(b"{}")
            f.write(b'"whole"}')
        finally:
            f.close()
            sender.resume()
    pair.wait_log("send", "watch.overflow", timeout=20)
    pair.wait_converged(timeout=30)  # the default max_open is 30 s; fixed, this takes a few seconds
    assert "send.max_open" not in pair.log("send"), pair.all_logs()


def test_a_writer_pausing_for_seconds_mid_file_never_has_its_half_shipped(pair: Pair) -> None:
    """The file has no close event for several seconds, so the sender checks it again and again (the
    check for a lost close); each check must find the writer and leave the file alone."""
    folder = pair.source / "databases" / "room-1"
    folder.mkdir(parents=True)
    pair.start("receive")
    pair.start("send")
    pair.wait_converged()
    target = pair.target / "databases" / "room-1" / "meeting.json"
    whole = json.dumps({"subject": "x" * 3000, "attendees": list(range(200))}).encode()
    half = whole[: len(whole) // 2]
    seen: list[bytes] = []
    stop = threading.Event()

    def watch_replica() -> None:
        while not stop.is_set():
            try:
                data = target.read_bytes()
            except FileNotFoundError:
                continue
            if data != whole:
                seen.append(data)

    checker = threading.Thread(target=watch_replica, daemon=True)
    checker.start()
    try:
        with open(folder / "meeting.json", "wb") as f:
            f.write(half)
            f.flush()
            stop.wait(4.0)  # four times the 1 s after which a file without a close event is checked
            assert not target.exists(), "the replica holds the file while its writer is half way"
            f.write(whole[len(half) :])
        pair.wait_converged(timeout=15)
    finally:
        stop.set()
        checker.join(timeout=5)
    assert target.read_bytes() == whole
    assert not seen, f"the replica held a partial version: {len(seen[0])} of {len(whole)} bytes"
    assert "send.max_open" not in pair.log("send")


# ---------------------------------------------------------------------------------------------------------
# 5. The epoch fence


def test_a_sender_with_a_lower_epoch_is_fenced_and_changes_nothing(pair: Pair) -> None:
    dbs = pair.source / "databases"
    files = write_files(dbs / "room-1", 4)
    pair.sender_state.mkdir(exist_ok=True)
    (pair.sender_state / "epoch").write_text("3\n")
    pair.start("receive")
    pair.start("send")
    pair.wait_converged()
    pair.wait_log("receive", "receiver.epoch_raised epoch=3")
    assert pair.stop("send") == 0, pair.all_logs()
    replica_before = pair.replica_tree()

    (pair.sender_state / "epoch").write_text("2\n")
    (dbs / "room-1" / "stale.json").write_text("{}")
    files[0].write_text('{"stale": true}')
    files[1].unlink()
    pair.start("send")
    code = pair.wait_exit("send", 30)
    out = pair.log("send")
    assert code == 4, f"a fenced sender exited with {code}, expected 4 (refused by peer)\n{pair.all_logs()}"
    assert re.search(r"refused by peer: .*epoch 2", out), f"the exit message does not name the epoch\n{out}"
    assert "Traceback" not in out, out
    assert pair.replica_tree() == replica_before, "the fenced sender changed the replica"
    assert pair.procs["receive"].poll() is None, "the receiver stopped"
    pair.wait_status(lambda st: st["receiver"].get("epoch") == 3, 10, "the receiver's status to show epoch 3")


# ---------------------------------------------------------------------------------------------------------
# 6. Safety halts


def test_a_reconciliation_that_would_delete_most_of_the_replica_halts(pair: Pair) -> None:
    room = pair.source / "databases" / "room-1"
    files = write_files(room, 20)
    pair.start("receive")
    pair.start("send")
    pair.wait_converged()
    assert pair.stop("send") == 0, pair.all_logs()
    for f in files[:15]:
        f.unlink()

    pair.start("send")
    code = pair.wait_exit("send", 30)
    out = pair.log("send")
    assert code == 3, f"expected exit 3 (safety halt), got {code}\n{pair.all_logs()}"
    assert "max_delete_share" in out, f"the halt does not name max_delete_share\n{out}"
    assert len(files_below(pair.target / "databases")) == 20, "the halted sender deleted replica files"

    pair.start("send", "--allow-mass-delete")
    pair.wait_converged()
    assert len(files_below(pair.target / "databases")) == 5


# ---------------------------------------------------------------------------------------------------------
# 7. Bad config: exit 2, one line naming the key, no traceback


def _edit_config(pair: Pair, old: str, new: str) -> None:
    text = pair.config.read_text("utf-8")
    assert old in text, f"{old!r} is not in the generated config:\n{text}"
    pair.config.write_text(text.replace(old, new, 1), "utf-8")


@pytest.mark.parametrize(
    ("role", "case", "named"),
    [
        ("send", "unknown key", "sender -> settl"),
        ("send", "bad port", "sender -> peer"),
        ("receive", "bad port", "receiver -> listen"),
        ("send", "missing required key", "sender -> source"),
        ("send", "wrong type", "sender -> settle"),
        ("send", "invalid TOML", "line {line}"),
    ],
)
def test_a_bad_config_exits_2_with_one_line_naming_the_key(
    pair: Pair, role: str, case: str, named: str
) -> None:
    if case == "unknown key":
        pair.sender_extra += "\nsettl = 0.5"
        pair.write_config()
    elif case == "bad port" and role == "send":
        _edit_config(pair, f'peer = "127.0.0.1:{pair.port}"', 'peer = "127.0.0.1:99999"')
    elif case == "bad port":
        _edit_config(pair, f'listen = "127.0.0.1:{pair.port}"', 'listen = "127.0.0.1:http"')
    elif case == "missing required key":
        _edit_config(pair, f"source = '{pair.source}'\n", "")
    elif case == "wrong type":
        _edit_config(pair, "settle = 0.2", 'settle = "fast"')
    else:
        _edit_config(pair, "settle = 0.2", "settle = ")  # a key without a value
        text = pair.config.read_text("utf-8").splitlines()
        named = named.format(line=text.index("settle = ") + 1)

    r = pair.cli(role, "--config", str(pair.config), timeout=20)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, f"{case}: exit {r.returncode}, expected 2\nstderr: {r.stderr}"
    assert len(lines) == 1, f"{case}: expected one line on stderr, got {len(lines)}:\n{r.stderr}"
    assert "Traceback" not in r.stderr + r.stdout
    assert lines[0].startswith("standby: config error:"), lines[0]
    assert named in lines[0], f"{case}: the message does not name {named!r}: {lines[0]}"
    if case == "invalid TOML":
        assert str(pair.config) in lines[0], f"the message does not name the file: {lines[0]}"
    started = [p for p in (pair.sender_state / "journal", pair.receiver_state / "position") if p.exists()]
    assert not started, f"{case}: a bad config still started work: {started}"


# ---------------------------------------------------------------------------------------------------------
# 8. A local edit on the passive is flagged and repaired


def test_a_local_edit_on_the_replica_is_logged_and_repaired(pair: Pair) -> None:
    pair.sender_extra += "\nreconcile_interval = 1"
    pair.write_config()
    write_files(pair.source / "databases" / "room-1", 5)
    pair.start("receive")
    pair.start("send")
    pair.wait_converged()

    edited = pair.target / "databases" / "room-1" / "f000.json"
    removed = pair.target / "databases" / "room-1" / "f001.json"
    edited.write_text('{"edited": "on the passive"}')
    removed.unlink()
    assert not pair.converged()
    pair.wait_converged(timeout=15)
    pair.wait_log("receive", "replica.local_edit path='databases/room-1/f000.json'", timeout=5)


# ---------------------------------------------------------------------------------------------------------
# 9. verify and status


def test_verify_and_status_report_the_pair(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps table cells to the terminal width
    write_files(pair.source / "databases" / "room-1", 5)
    (pair.source / "config").mkdir()
    (pair.source / "config" / "config.json").write_text("{}")
    pair.start("receive")
    pair.start("send")
    pair.wait_converged()

    st = wait_caught_up(pair)
    s, r = st["sender"], st["receiver"]
    assert s["running"] and r["running"], st
    assert s["connected"] is True and r["connected"] is True, st
    assert s["head"] >= 7 and s["lag_records"] == 0, st
    assert r["journal"] == s["journal"] and r["applied_seq"] == s["head"], st

    cfg = str(pair.config)
    ok = pair.cli("verify", "--config", cfg)
    assert ok.returncode == 0, f"verify of a converged pair exited {ok.returncode}\n{ok.stdout}{ok.stderr}"
    ok_json = pair.cli("verify", "--config", cfg, "--json")
    assert ok_json.returncode == 0, f"verify --json exited {ok_json.returncode}: {ok_json.stderr}"
    report = json.loads(ok_json.stdout)
    assert report["identical"] is True and report["differences"] == [], report
    assert report["replica_seq"] == s["head"], report

    assert pair.stop("send") == 0, pair.all_logs()
    tampered = pair.target / "databases" / "room-1" / "f002.json"
    tampered.write_text('{"tampered": true}')
    bad = pair.cli("verify", "--config", cfg)
    assert bad.returncode == 1, (
        f"verify of a tampered replica exited {bad.returncode}\n{bad.stdout}{bad.stderr}"
    )
    assert "databases/room-1/f002.json" in bad.stdout, f"verify does not list the path:\n{bad.stdout}"
    bad_json = pair.cli("verify", "--config", cfg, "--json")
    assert bad_json.returncode == 1, f"verify --json exited {bad_json.returncode}: {bad_json.stderr}"
    report = json.loads(bad_json.stdout)
    assert report["identical"] is False, report
    differences = [(d["path"], d["kind"]) for d in report["differences"]]
    assert differences == [("databases/room-1/f002.json", "content")], report


# ---------------------------------------------------------------------------------------------------------
# 10. Graceful stop


@pytest.mark.timeout(60)
def test_sigterm_stops_both_cleanly_and_the_next_run_continues(pair: Pair) -> None:
    dbs = pair.source / "databases"
    write_files(dbs / "room-1", 10)
    pair.start("receive")
    pair.start("send")
    pair.wait_converged()

    # Stop the receiver while a large put is being written into a temporary file on the replica.
    big = dbs / "room-1" / "attachment.bin"
    with open(big, "wb") as f:
        for _ in range(6):
            f.write(os.urandom(8 * MIB))
    wait_for(
        lambda: bool(temp_files(pair.target)) or (pair.target / big.relative_to(pair.source)).exists(),
        20,
        f"the receiver to start writing attachment.bin\n{pair.all_logs()}",
        interval=0.005,
    )
    assert pair.stop("receive") == 0, f"the receiver exited non-zero on SIGTERM\n{pair.all_logs()}"
    assert not temp_files(pair.target), f"temporary files left in the replica: {temp_files(pair.target)}"
    assert pair.stop("send") == 0, f"the sender exited non-zero on SIGTERM\n{pair.all_logs()}"
    assert "send.stopped" in pair.log("send") and "receiver.stopped" in pair.log("receive")

    saved = pair.status()
    assert not saved["sender"]["running"] and not saved["receiver"]["running"], saved
    assert "applied_seq" not in saved["receiver"], "a stopped process's figures are not shown as current"
    applied = saved["receiver"]["last"]["applied_seq"]
    head = saved["sender"]["last"]["head"]
    assert 11 <= applied <= head, saved

    pair.start("receive")
    assert f"seq={applied} " in pair.log("receive"), (
        f"the receiver did not reopen at {applied}\n{pair.all_logs()}"
    )
    pair.start("send")
    (dbs / "room-1" / "after-restart.json").write_text("{}")
    pair.wait_converged()
    send_log = pair.log("send")
    assert f"head={head} " in send_log, f"the sender did not reopen its journal at {head}\n{send_log}"
    assert connected_from(send_log)[0] == applied + 1, (
        f"the second run did not continue after the receiver's saved position {applied}\n{send_log}"
    )
    assert "send.new_generation" not in send_log, f"the second run started a new generation\n{send_log}"
    assert file_digest(pair.target / big.relative_to(pair.source)) == file_digest(big)
    assert pair.stop("send") == 0 and pair.stop("receive") == 0, pair.all_logs()
    assert not temp_files(pair.target), f"temporary files left in the replica: {temp_files(pair.target)}"
