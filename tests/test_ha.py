"""The HA pair end to end: two `standby run` agents (real processes, TLS on 127.0.0.1), each controlling
its own service (a real process, through the command backend). Both services are sampled every 50 ms
for the whole of every test, which fails if they ever run at once."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

import pytest

from tests.ha import HaNode, Sampler, same_trees, wait_for
from tests.test_replication import write_files

FAILOVER_AFTER = 10.0


def _logs(*nodes: HaNode) -> str:
    return "\n".join(f"--- {n.name}\n{n.log()[-6000:]}" for n in nodes)


def _meets(n: HaNode) -> bool:
    """This run of ``n``'s agent (not a status left by an earlier one) hears its peer."""
    st = n.status()
    return (
        n.proc is not None and st.get("pid") == n.proc.pid and (st.get("peer") or {}).get("reachable") is True
    )


def _up(a: HaNode, b: HaNode) -> None:
    a.start()
    b.start()
    wait_for(lambda: a.service_pid() is not None, 30, "the active's service to start")
    wait_for(lambda: b.status().get("role") == "passive", 30, "the passive to say so")
    # The agent itself has seen its start succeed (a service killed while its start is still being
    # confirmed is a failed start, reported after the start timeout, not a crash of a running service).
    wait_for(lambda: a.status().get("service") == "running", 30, "the active's agent to see it run")


def test_the_active_runs_the_service_and_replicates_to_the_passive(
    ha: tuple[HaNode, HaNode, Sampler],
) -> None:
    a, b, _sampler = ha
    write_files(a.root / "databases" / "room-1", 20)
    _up(a, b)
    try:
        wait_for(lambda: same_trees(a, b), 30, "the passive's replica")
    except AssertionError:
        raise AssertionError(_logs(a, b)) from None
    assert b.service_pid() is None
    st = a.status()
    assert st["role"] == "active" and st["epoch"] >= 1, st
    assert a.cli("status", "--json").returncode == 0


def test_a_dead_service_fails_over_and_the_old_active_is_fenced(ha: tuple[HaNode, HaNode, Sampler]) -> None:
    a, b, sampler = ha
    write_files(a.root / "databases" / "room-1", 20)
    _up(a, b)
    wait_for(lambda: same_trees(a, b), 30, "the first copy")
    write_files(a.root / "databases" / "room-2", 5)  # changes the service made just before it died
    wait_for(lambda: same_trees(a, b), 30, "the last changes")

    t0 = time.monotonic()
    a.kill_service()
    try:
        wait_for(lambda: b.service_pid() is not None, FAILOVER_AFTER + 20, "the passive's service")
    except AssertionError:
        raise AssertionError(_logs(a, b)) from None
    rto = time.monotonic() - t0
    print(
        f"\nRTO (service killed -> the other service runs): {rto:.1f} s (failover_after {FAILOVER_AFTER:g} s)"
    )
    assert rto <= FAILOVER_AFTER + 5 + 5, f"RTO {rto:.1f} s"
    wait_for(lambda: a.status().get("role") in ("fenced", "passive"), 15, "the old active to be fenced")
    # The alert command got the decision, as JSON on stdin.
    wait_for(lambda: any(e["event"] == "failover.done" for e in b.alerts()), 10, "the failover alert")
    done = next(e for e in b.alerts() if e["event"] == "failover.done")
    assert done["node"] == "join-b" and "active" in done["reason"], done
    # The status names the last failover and why the role last changed.
    wait_for(lambda: bool(b.status().get("last_failover")), 10, "the last failover in the status")
    st = b.status()
    assert st["last_failover"]["event"] == "failover.done", st
    assert st["last_role_change"]["role_reason"].startswith("promote."), st["last_role_change"]
    assert b.status()["epoch"] > a.status().get("epoch", 0) - 1
    assert (b.root / "databases" / "room-2").is_dir(), "changes acknowledged before the failover were lost"
    assert a.service_pid() is None
    # The old active rejoins as passive by itself once the new active runs the service, and a restart of
    # its agent never starts its service.
    wait_for(lambda: a.status().get("role") == "passive", 30, "the old active to rejoin by itself")
    assert a.status()["last_role_change"]["role_reason"].startswith("rejoin"), a.status()
    a.stop()
    a.start()
    time.sleep(5)
    assert a.service_pid() is None
    assert a.status().get("role") == "passive", a.status()
    assert not sampler.both


def test_no_promotion_without_proof_and_force_promotes(ha: tuple[HaNode, HaNode, Sampler]) -> None:
    a, b, _sampler = ha
    _up(a, b)
    a.kill()  # the agent and its service die together (a host gone)
    a.kill_service()
    time.sleep(FAILOVER_AFTER + 5)
    assert b.service_pid() is None, "promoted without proof that the old active cannot run the service"
    assert b.status().get("role") == "passive"
    r = b.cli("failover", "--force")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: b.service_pid() is not None, 30, "the forced promotion")
    assert b.status().get("role") == "active"


def test_a_maintenance_window_suppresses_failover(ha: tuple[HaNode, HaNode, Sampler]) -> None:
    a, b, _sampler = ha
    _up(a, b)
    wait_for(lambda: (b.status().get("peer") or {}).get("reachable") is True, 20, "the agents to meet")
    r = a.cli("maintenance", "start", "--for", "2m")
    assert r.returncode == 0, r.stderr
    time.sleep(2)
    a.kill_service()
    time.sleep(FAILOVER_AFTER + 5)
    assert b.service_pid() is None, "failed over during a maintenance window"


def test_an_announced_stop_of_the_active_agent_holds_failover(ha: tuple[HaNode, HaNode, Sampler]) -> None:
    """A reboot of the active: its agent stops gracefully (announced), then its service stops. The
    passive alerts instead of counting, and does not promote."""
    a, b, _sampler = ha
    _up(a, b)
    wait_for(lambda: (b.status().get("peer") or {}).get("reachable") is True, 20, "the agents to meet")
    assert a.stop() == 0, a.log()
    a.kill_service()
    time.sleep(FAILOVER_AFTER + 5)
    assert b.service_pid() is None, "failed over after an announced stop"
    assert b.status().get("role") == "passive"


def test_a_frozen_peer_is_reported_silent_and_degraded(ha: tuple[HaNode, HaNode, Sampler]) -> None:
    a, b, _sampler = ha
    _up(a, b)
    wait_for(lambda: (b.status().get("peer") or {}).get("reachable") is True, 20, "the agents to meet")
    assert a.proc is not None
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: (b.status().get("peer") or {}).get("reachable") is False, 20, "the peer silent")
        r = b.cli("status", "--json")
        assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
        assert "silent" in " ".join(json.loads(r.stdout)["degraded"])
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    wait_for(lambda: b.cli("status").returncode == 0, 30, "healthy again")


def test_sigkill_of_either_agent_during_a_promotion_never_makes_two_actives(
    ha: tuple[HaNode, HaNode, Sampler],
) -> None:
    """Rounds of: a failover is asked for, and at a random moment while it runs one agent (either) is
    SIGKILLed and started again. Never two services at once (the sampler); in the end exactly one runs;
    the epoch in each node's status never goes back. (Manual failovers: automatic ones are limited to one
    per flap_window, and the automatic path is the test above; each step in turn is the test below.)"""
    a, b, sampler = ha
    seed = random.SystemRandom().randrange(1 << 32)
    rng = random.Random(seed)
    print(f"\nseed {seed}")
    _up(a, b)
    epochs: dict[str, int] = {}

    def check_epochs() -> None:
        for n in (a, b):
            e = n.status().get("epoch")
            if isinstance(e, int):
                assert e >= epochs.get(n.name, 0), f"seed={seed}: {n.name}'s epoch went back to {e}"
                epochs[n.name] = e

    for rnd in range(4):
        wait_for(
            lambda: (a.service_pid() is None) != (b.service_pid() is None), 60, f"round {rnd}: one active"
        )
        active, passive = (a, b) if a.service_pid() is not None else (b, a)
        wait_for(lambda: _meets(a) and _meets(b), 30, f"seed={seed} round {rnd}: the agents to meet")
        r = passive.cli("failover")
        assert r.returncode == 0, r.stderr
        time.sleep(rng.uniform(0.0, 0.6))
        victim = rng.choice([active, passive])
        victim.kill()
        check_epochs()
        time.sleep(rng.uniform(0, 1.0))
        victim.start()
        try:
            wait_for(
                lambda: (a.service_pid() is None) != (b.service_pid() is None) and _meets(a) and _meets(b),
                60,
                f"seed={seed} round {rnd} ({victim.name} killed): exactly one service running",
            )
        except AssertionError as e:
            raise AssertionError(f"{e}\n{_logs(a, b)}") from None
        check_epochs()
        # A fenced node rejoins by itself (auto_rejoin), so the next round has a passive.
        wait_for(
            lambda: {a.status().get("role"), b.status().get("role")} == {"active", "passive"},
            30,
            f"seed={seed} round {rnd}: an active and a passive",
        )
    assert not sampler.both, f"seed={seed}: both services ran at once"


#: (node, the action after which its agent kills itself, as ACTION:ROLE; see engine.node.CRASH_AFTER).
PROMOTION_STEPS = [
    ("b", "RequestFence:promoting"),  # the passive asked the active to fence itself
    ("a", "PersistRole:demoting"),  # the active persisted fenced at the new epoch
    ("a", "StopService:demoting"),  # ... and asked its service to stop
    ("a", "SendFenceAck:fenced"),  # ... and acknowledged
    ("b", "PersistRole:active"),  # the passive persisted active at the new epoch
    ("b", "BecomeSender:active"),  # ... and started sending
    ("b", "StartService:active"),  # ... and asked its service to start
]


@pytest.mark.parametrize(("who", "step"), PROMOTION_STEPS, ids=[s for _w, s in PROMOTION_STEPS])
def test_sigkill_at_each_step_of_a_promotion_leaves_one_active_or_none(
    ha: tuple[HaNode, HaNode, Sampler], who: str, step: str
) -> None:
    """A manual failover, with one agent killing itself (SIGKILL) right after one step of it; then it is
    started again. Never two services at once (the sampler); the epoch never goes back; in the end exactly
    one service runs."""
    a, b, sampler = ha
    _up(a, b)
    wait_for(lambda: _meets(b), 30, "the agents to meet")
    victim = a if who == "a" else b
    victim.stop()
    victim.start(env={"STANDBY_CRASH_AFTER": step})
    wait_for(lambda: _meets(a) and _meets(b), 30, "the agents to meet again")
    epochs = {n.name: n.status().get("epoch", 0) for n in (a, b)}
    r = b.cli("failover")
    assert r.returncode == 0, r.stderr
    assert victim.proc is not None
    try:
        victim.proc.wait(30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{victim.name} never reached {step}\n{_logs(a, b)}") from None
    assert victim.proc.returncode == -signal.SIGKILL, victim.proc.returncode
    victim.start()
    try:
        wait_for(
            lambda: (a.service_pid() is None) != (b.service_pid() is None) and _meets(a) and _meets(b),
            60,
            f"exactly one service after a crash at {victim.name} {step}",
        )
    except AssertionError as e:
        raise AssertionError(f"{e}\n{_logs(a, b)}") from None
    for n in (a, b):
        assert n.status().get("epoch", 0) >= epochs[n.name], f"{n.name}'s epoch went back"
    assert not sampler.both
