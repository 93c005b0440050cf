"""Rejoin with quarantine, switchover, failback, upgrades and clock checks, end to end: two `standby run`
agents (real processes, TLS on 127.0.0.1), each controlling its own real service process; both services
are sampled every 50 ms for the whole of every test, which fails if they ever run at once."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.digest import digest_bytes
from tests.ha import HaNode, Sampler, same_trees, sampled_pair, wait_for
from tests.pair import ROOT
from tests.test_ha import _logs, _meets, _up
from tests.test_replication import write_files

FAILOVER_AFTER = 10.0


def _settled(a: HaNode, b: HaNode) -> bool:
    """One active and one passive, as told by the agents running now (not a status left by an earlier
    run), each having heard the other's role (a command asks a node what it last heard of its peer), with
    exactly one service running."""
    if not (_meets(a) and _meets(b)):
        return False
    sa, sb = a.status(), b.status()
    roles = {sa.get("role"), sb.get("role")}
    heard = (sa.get("peer") or {}).get("role") == sb.get("role") and (sb.get("peer") or {}).get(
        "role"
    ) == sa.get("role")
    running = [n.service_pid() is not None for n in (a, b)]
    return roles == {"active", "passive"} and heard and running.count(True) == 1


def _meets_nobody(n: HaNode) -> bool:
    """This run of ``n``'s agent is up and hears no peer."""
    st = n.status()
    return (
        n.proc is not None
        and st.get("pid") == n.proc.pid
        and (st.get("peer") or {}).get("reachable") is False
    )


def _active(a: HaNode, b: HaNode) -> HaNode:
    return a if a.status().get("role") == "active" else b


# ---- rejoin with quarantine, then failback -------------------------------------------------------------


def test_the_old_active_keeps_its_post_fork_files_in_quarantine_and_fails_back_after_ack(
    ha: tuple[HaNode, HaNode, Sampler],
) -> None:
    a, b, sampler = ha
    room = a.root / "databases" / "room-1"
    write_files(room, 200)
    _up(a, b)
    wait_for(lambda: same_trees(a, b), 30, "the first copy")
    # The fork: the passive's host goes down, the active's service goes on writing: these changes are
    # journaled on the active but never applied on the passive ("unacknowledged").
    b.kill()
    journaled = {f"databases/room-1/late-{i}.json": os.urandom(300 + i) for i in range(5)}
    for rel, data in journaled.items():
        (a.root / rel).write_bytes(data)
    (room / "f003.json").write_bytes(b"booked after the fork")
    journaled["databases/room-1/f003.json"] = b"booked after the fork"
    wait_for(lambda: (a.status().get("lag_records") or 0) >= 6, 20, "the active to journal its changes")
    # ...then its host dies; what it wrote last was never even journaled ("unshipped").
    a.kill()
    a.kill_service()
    unshipped = {"databases/room-1/unshipped.json": b"written as the host died"}
    for rel, data in unshipped.items():
        (a.root / rel).write_bytes(data)
    b.start()
    wait_for(lambda: _meets_nobody(b), 30, "the passive to come back alone")
    r = b.cli("failover", "--force")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: b.service_pid() is not None, 30, "the forced promotion")
    # The new active's service books, updates and deletes meetings while the old active is down.
    broom = b.root / "databases" / "room-1"
    for i in range(10):
        (broom / f"new-{i}.json").write_bytes(os.urandom(200))
    (broom / "f005.json").write_bytes(b"updated on the new active")
    (broom / "f006.json").unlink()
    # The old active comes back: fenced by the higher epoch, it moves its own changes aside and rejoins.
    t0 = time.monotonic()
    a.start()
    try:
        wait_for(lambda: a.status().get("role") == "passive", 60, "the old active to rejoin")
        wait_for(lambda: same_trees(a, b), 60, "the rejoined node to converge")
    except AssertionError:
        raise AssertionError(_logs(a, b)) from None
    took = time.monotonic() - t0
    qroot = a.state / "quarantine"
    folders = [p for p in qroot.iterdir() if p.is_dir() and "epoch" in p.name]
    assert len(folders) == 1, list(qroot.iterdir())
    lines = [json.loads(x) for x in (folders[0] / "manifest.jsonl").read_text("utf-8").splitlines()]
    kept = {line["path"]: line for line in lines}
    for rel, data in {**journaled, **unshipped}.items():
        assert rel in kept, f"{rel} was not quarantined: {sorted(kept)}"
        stored = folders[0] / kept[rel].get("stored", f"files/{rel}")
        assert stored.read_bytes() == data, f"{rel} not kept byte for byte"
        assert kept[rel]["size"] == len(data) and kept[rel]["hash"] == digest_bytes(data).hex()
    assert kept["databases/room-1/unshipped.json"]["why"] == "unshipped"
    # Its journal, with entries the new active never applied, is kept beside them, never streamed again.
    assert (folders[0] / "sender-journal").is_dir() and not (a.state / "sender" / "journal").exists()
    assert kept["databases/room-1/late-0.json"]["why"] in ("unacknowledged", "unshipped")
    assert len(kept) <= len(journaled) + len(unshipped) + 1, f"far more than the fork's files: {sorted(kept)}"
    # The catch-up is a delta: about the changes that differ travel (the new active's 12, the quarantined
    # file it has another version of), not the 200 files of the tree.
    wait_for(lambda: a.status()["receiver"]["counters"]["applied"] >= 12, 10, "the status to count them")
    time.sleep(2.0)  # anything more would have arrived by now
    applied = a.status()["receiver"]["counters"]["applied"]
    print(
        f"\nrejoin: {len(kept)} file(s) quarantined, {applied} change(s) applied to catch up, "
        f"converged {took:.1f} s after the old active's agent started"
    )
    assert 12 <= applied <= 12 + len(kept) + 3, a.status()["receiver"]
    # The operator is told, and failback waits for the acknowledgement.
    wait_for(lambda: any(e["event"] == "rejoin.quarantined" for e in a.alerts()), 10, "the alert")
    wait_for(lambda: a.status().get("quarantined") == len(kept), 15, "the count in the status")
    listing = a.cli("quarantine", "list")
    assert "NOT ACKNOWLEDGED" in listing.stdout and folders[0].name in listing.stdout, listing
    r = b.cli("failback")
    assert r.returncode != 0 and "quarantine" in r.stderr, (r.stdout, r.stderr)
    assert b.service_pid() is not None, "a refused failback changes nothing"
    assert a.cli("quarantine", "ack", "--all").returncode == 0
    wait_for(lambda: a.status().get("quarantined") == 0, 15, "the acknowledgement to be seen")
    wait_for(lambda: (b.status().get("peer") or {}).get("quarantined") == 0, 15, "the peer to hear it")
    # Failback (asked on the node that is not preferred): the preferred node runs the service again.
    r = b.cli("failback", timeout=120)
    assert r.returncode == 0, _logs(a, b) + r.stdout + r.stderr
    assert "switchover done" in r.stdout and "join-a" in r.stdout, r.stdout
    wait_for(lambda: a.service_pid() is not None and b.status().get("role") == "passive", 30, "failback")
    wait_for(lambda: same_trees(a, b), 30, "the trees after failback")
    assert (a.root / "databases" / "room-1" / "new-3.json").exists(), "the new active's bookings were lost"
    assert (a.root / "databases" / "room-1" / "f005.json").read_bytes() == b"updated on the new active"
    assert not sampler.both


# ---- switchover --------------------------------------------------------------------------------------------


class Churn:
    """The active's service at work: writes a file every few milliseconds into the root of the node whose
    service runs. A write counts as made by the running service if the service ran before and after it."""

    def __init__(self, node: HaNode) -> None:
        self.node = node
        self.made: dict[str, bytes] = {}
        self.unsure: set[str] = set()  # written as the service stopped: either version may be kept
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        i = 0
        folder = self.node.root / "databases" / "churn"
        folder.mkdir(parents=True, exist_ok=True)
        while not self._stop.is_set():
            if self.node.service_pid() is None:
                time.sleep(0.01)
                continue
            i += 1
            rel = f"databases/churn/m-{i % 40}.json"
            data = f"meeting {i} {time.time()}".encode()
            tmp = self.node.root / (rel + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, self.node.root / rel)
            if self.node.service_pid() is not None:
                self.made[rel] = data
            else:
                self.unsure.add(rel)
            time.sleep(0.005)


def test_a_switchover_under_churn_loses_nothing_and_reports_the_downtime(
    ha: tuple[HaNode, HaNode, Sampler],
) -> None:
    a, b, sampler = ha
    write_files(a.root / "databases" / "room-1", 50)
    _up(a, b)
    wait_for(lambda: same_trees(a, b), 30, "the first copy")
    churn = Churn(a)
    churn.start()
    time.sleep(2.0)
    t0 = time.monotonic()
    r = b.cli("switchover", timeout=180)  # asked on the passive: relayed to the active
    churn.stop()
    assert r.returncode == 0, _logs(a, b) + r.stdout + r.stderr
    print("\n" + r.stdout)
    assert "switchover done" in r.stdout and "join-b" in r.stdout, r.stdout
    stopped = sampler.first_time(lambda up: not up[0], after=t0)
    started = sampler.first_time(lambda up: up[1], after=t0)
    assert stopped is not None and started is not None
    whole = time.monotonic() - t0
    print(f"switchover: service down {started - stopped:.2f} s (sampled), whole command {whole:.1f} s")
    # RPO 0: every change the service made while it ran is on the new active, byte for byte.
    checked = {rel: data for rel, data in churn.made.items() if rel not in churn.unsure}
    assert len(checked) >= 20, "the churn wrote too little to check"
    for rel, data in checked.items():
        assert (b.root / rel).read_bytes() == data, f"{rel}: the new active lacks the last version"
    # The old active rejoins as passive by itself, with nothing to quarantine; replication runs back.
    wait_for(lambda: a.status().get("role") == "passive", 30, "the old active to become passive")
    assert a.cli("quarantine", "list").stdout.strip() == "standby: nothing in quarantine"
    # Drained to its end, the old active's journal stays where it is (nothing in it to keep from being
    # streamed), rather than piling up in quarantine at every switchover.
    assert (a.state / "sender" / "journal").is_dir()
    assert not list((a.state / "quarantine").glob("retired-journal-*"))
    (b.root / "databases" / "room-1" / "after.json").write_bytes(b"booked on the new active")
    wait_for(lambda: same_trees(a, b), 30, "replication from the new active")
    # Asked again, it does nothing.
    r = b.cli("switchover", "--to", "join-b")
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stdout
    r = b.cli("switchover", "--to", "join-c")
    assert r.returncode != 0 and "not a node of this pair" in r.stderr
    assert not sampler.both


#: Steps of a switchover at which an agent dies (STANDBY_CRASH_AFTER=ACTION:ROLE): the old active while
#: it measures its tree, after its offer, after it persisted fenced, and during its rejoin; the taker
#: after it persisted active, before its service ran.
CRASH_STEPS = [
    ("a", "MeasureTree:active"),
    ("a", "OfferHandover:active"),
    ("a", "PersistRole:demoting"),
    ("a", "Quarantine:fenced"),
    ("b", "PersistRole:active"),
]


@pytest.mark.parametrize(("who", "step"), CRASH_STEPS, ids=[f"{w}-{s}" for w, s in CRASH_STEPS])
def test_sigkill_at_a_step_of_a_switchover_ends_with_one_service_and_equal_trees(
    tmp_path: Path, who: str, step: str
) -> None:
    with sampled_pair(tmp_path) as (a, b, sampler):
        write_files(a.root / "databases" / "room-1", 30)
        _up(a, b)
        wait_for(lambda: same_trees(a, b), 30, "the first copy")
        victim = a if who == "a" else b
        victim.stop()
        victim.start(env={"STANDBY_CRASH_AFTER": step})
        wait_for(lambda: _settled(a, b) and same_trees(a, b), 60, "the pair before the switchover")
        out = tmp_path / "switchover.out"
        with open(out, "wb") as f:
            cmd = subprocess.Popen(
                [sys.executable, "-m", "engine", "switchover", "--config", str(a.config)],
                cwd=ROOT,
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        assert victim.proc is not None
        proc = victim.proc
        try:
            wait_for(lambda: proc.poll() is not None, 60, f"the crash at {step}")
        except AssertionError:
            raise AssertionError(out.read_text() + _logs(a, b)) from None
        cmd.kill()  # the command dies too: the agents finish on their own
        cmd.wait(10)
        victim.start()
        try:
            wait_for(lambda: _settled(a, b), 90, "one active and one passive")
            wait_for(lambda: same_trees(a, b), 60, "equal trees")
        except AssertionError:
            raise AssertionError(_logs(a, b)) from None
        # Running the command again finishes or says there is nothing to do.
        r = a.cli("switchover", "--to", _active(a, b).name)
        assert r.returncode == 0 and "nothing to do" in r.stdout, r.stdout + r.stderr
        assert (_active(a, b).root / "databases" / "room-1" / "f007.json").exists()
    assert not sampler.both, f"both services ran at once at {step}"


#: Rounds of random kills during switchovers (STANDBY_SOAK=1: many more).
SOAK = os.environ.get("STANDBY_SOAK", "") not in ("", "0")
KILL_ROUNDS = 40 if SOAK else 3


@pytest.mark.timeout(3600 if SOAK else 300)
def test_sigkill_of_an_agent_or_the_command_at_random_moments_of_switchovers(
    ha: tuple[HaNode, HaNode, Sampler],
) -> None:
    """Rounds of: a switchover asked on a random node, then at a random moment SIGKILL one of the two
    agents or the command, and restart what was killed. Every round ends with one active, one passive,
    one service and equal trees; nothing written before the round is lost; never two services."""
    a, b, sampler = ha
    seed = int(os.environ.get("STANDBY_SEED", "0")) or random.SystemRandom().randrange(1 << 32)
    rng = random.Random(seed)
    print(f"\nseed {seed}")
    write_files(a.root / "databases" / "room-1", 30)
    _up(a, b)
    wait_for(lambda: same_trees(a, b), 30, "the first copy")
    for rnd in range(KILL_ROUNDS):
        wait_for(lambda: _settled(a, b) and same_trees(a, b), 90, f"seed={seed} round {rnd}: settled")
        active = _active(a, b)
        marker = active.root / "databases" / "room-1" / f"round-{rnd}.json"
        marker.write_text(f'{{"round": {rnd}}}')
        wait_for(lambda: same_trees(a, b), 30, f"seed={seed} round {rnd}: the marker replicated")
        asker = rng.choice([a, b])
        cmd = subprocess.Popen(
            [sys.executable, "-m", "engine", "switchover", "--config", str(asker.config)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.0, 4.0))
        victim = rng.choice([a, b, None])
        if victim is None:
            cmd.kill()
        else:
            victim.kill()
            time.sleep(rng.uniform(0.0, 1.0))
            victim.start()
        try:
            wait_for(lambda: _settled(a, b), 120, f"seed={seed} round {rnd}: one active, one passive")
            wait_for(lambda: same_trees(a, b), 60, f"seed={seed} round {rnd}: equal trees")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{_logs(a, b)}") from None
        finally:
            cmd.kill()
            cmd.wait(10)
        assert (_active(a, b).root / "databases" / "room-1" / f"round-{rnd}.json").exists(), f"seed={seed}"
    assert not sampler.both, f"seed={seed}: both services ran at once"


# ---- upgrades ----------------------------------------------------------------------------------------------

#: A fake installer: logs its arguments, then starts the service at its end, as many MSIs do.
FAKE_INSTALLER = """
import subprocess, sys
installer, log, svc = sys.argv[1], sys.argv[2], sys.argv[3]
open(log, "w").write("installed " + installer + "\\n")
subprocess.run([sys.executable, {svc_helper!r}, "start", svc], check=True)
"""


def test_an_upgrade_is_staged_by_hash_run_on_the_passive_which_ends_stopped(tmp_path: Path) -> None:
    installer_py = tmp_path / "installer.py"
    installer_py.write_text(FAKE_INSTALLER.format(svc_helper=str(ROOT / "tests" / "svc_helper.py")))
    msi = tmp_path / "SetupProject.msi"
    msi.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    version = tmp_path / "version.txt"
    version.write_text("5.2.1.3\n")
    install = [sys.executable, str(installer_py), "{installer}", "{log}"]
    show = [sys.executable, "-c", f"print(open({str(version)!r}).read())"]

    def upgrade_config(n: HaNode) -> str:
        return (
            "[upgrade]\n"
            f"installer = '{msi}'\n"
            f"command = {json.dumps([*install, str(n.svc)])}\n"
            f"version_command = {json.dumps(show)}\n"
            "stable_for = 2\n"
        )

    with sampled_pair(tmp_path / "pair", FAILOVER_AFTER, upgrade_config) as (a, b, sampler):
        _up(a, b)
        r = a.cli("upgrade", "stage", timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        staged = b.state / "upgrade" / "SetupProject.msi"
        assert staged.read_bytes() == msi.read_bytes()
        r = b.cli("upgrade", "run", timeout=180)
        assert r.returncode == 0, _logs(a, b) + r.stdout + r.stderr
        assert "stopped and Manual" in r.stdout, r.stdout
        assert b.service_pid() is None, "the passive's service was left running after the upgrade"
        assert list((b.state / "upgrade").glob("*.log")), "the installer's log"
        wait_for(lambda: b.status().get("maintenance") is False, 10, "the maintenance window to close")
        r = a.cli("upgrade", "check")
        assert r.returncode == 0 and "5.2.1.3" in r.stdout, r.stdout + r.stderr
        # An upgrade run on the active is refused.
        r = a.cli("upgrade", "run")
        assert r.returncode != 0 and "upgrade the passive" in r.stderr
    # The fake installer starts the passive's service as its last act (as the vendor's MSI may): the
    # agent stops it at once. The overlap with the active's is that of the installer, and is bounded.
    overlap = len(sampler.both) * sampler.interval
    print(f"\nupgrade: the installer's start of the passive's service overlapped ~{overlap:.2f} s")
    assert overlap <= 3.0, f"the installer's service start was not stopped promptly ({overlap:.2f} s)"


# ---- clocks ------------------------------------------------------------------------------------------------


def test_a_skewed_clock_on_one_node_is_warned_about_and_decides_nothing(tmp_path: Path) -> None:
    with sampled_pair(tmp_path) as (a, b, sampler):
        a.start()
        b.start(env={"STANDBY_CLOCK_OFFSET": "7.5"})
        wait_for(lambda: a.service_pid() is not None, 30, "the active's service")
        wait_for(lambda: (a.status().get("clock") or {}).get("ok") is False, 30, "the skew warning")
        clock = a.status()["clock"]
        assert 6.5 <= clock["skew"] <= 8.5, clock
        assert "ahead" in clock["problems"][0]
        wait_for(lambda: any(e["event"] == "clock.check" for e in a.alerts()), 10, "the alert")
        # The skew is in what b tells (a test seam): b's own reading of a's clock is right.
        assert abs(b.status()["clock"]["skew"]) < 1.0, b.status()["clock"]
        assert a.status()["role"] == "active" and b.status()["role"] == "passive"
    assert not sampler.both
