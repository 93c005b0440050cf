"""The HA rows of ``python -m bench``: failover RTO, switchover downtime and rejoin transfer, each next to
its target, on two real ``standby run`` agents on 127.0.0.1 (the HA tests' harness, :mod:`tests.ha`,
each agent with its own service process through the command backend; both services sampled every 50 ms).

1. Failover: the active's service is killed; RTO is the time until the passive's service runs. Target:
   ``failover_after`` plus the time a fence request and a service start take (a few seconds).
2. Switchover: ``standby switchover`` on the new active; downtime is the time no service runs. Target:
   a few seconds (stop, drain, compare the trees, start), nothing lost (the trees are compared).
3. Rejoin: :func:`bench.rejoin.scenario` with a small tree: the changes the old active receives to catch
   up, against the changes that differ, and its time against ``rsync --checksum`` from the same trees.

Owns: the scenario and :class:`HaFigures`. Must not: leave a process behind (every node is cleaned up).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import rejoin
from tests.ha import HaNode, Sampler, make_pair, same_trees, wait_for

FAILOVER_AFTER = 10.0
#: Targets, in seconds: the RTO's beyond failover_after, and a switchover's downtime.
RTO_SLACK = 5.0
SWITCHOVER_TARGET = 5.0
#: The rejoin's target: changes received per changed file (1: only what differs), at most.
REJOIN_TARGET = 1.5


@dataclass
class HaFigures:
    files: int
    failover_after: float = FAILOVER_AFTER
    rto_s: float | None = None
    rto_target_s: float = FAILOVER_AFTER + RTO_SLACK
    rejoined_s: float | None = None  # the old active passive again, its tree identical
    switchover_downtime_s: float | None = None
    switchover_target_s: float = SWITCHOVER_TARGET
    both_ran: bool = False
    rejoin_files: int = 0
    rejoin_differ: int = 0
    rejoin_transferred: int | None = None
    rejoin_per_differ: float | None = None
    rejoin_target_per_differ: float = REJOIN_TARGET
    rejoin_converge_s: float | None = None
    rejoin_rsync_s: float | None = None
    rejoin_vs_rsync: float | None = None
    errors: list[str] = field(default_factory=list)


def _write(root: Path, files: int) -> None:
    for i in range(files):
        p = root / "databases" / f"room-{i % 20:02d}" / f"meeting-{i:05d}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b'{"meeting": %d, "pad": "%s"}' % (i, b"x" * (200 + i % 700)))


def _first(sampler: Sampler, cond: Callable[[tuple[bool, ...]], bool], after: float, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = sampler.first_time(cond, after=after)
        if t is not None:
            return t
        time.sleep(0.05)
    raise AssertionError(f"no sample matched within {timeout:g} s")


def _passive_hearing(n: HaNode) -> bool:
    st = n.status()
    return st.get("role") == "passive" and bool((st.get("peer") or {}).get("reachable"))


def failover_and_switchover(work: Path, files: int, say: Callable[[str], None]) -> HaFigures:
    """Steps 1 and 2 on a fresh pair; every process is stopped on the way out."""
    fig = HaFigures(files)
    a, b = make_pair(work / "ha", failover_after=FAILOVER_AFTER)
    sampler = Sampler([a, b])
    sampler.start()
    try:
        _write(a.root, files)
        a.start()
        b.start()
        wait_for(lambda: a.service_pid() is not None, 60, "the active's service")
        wait_for(lambda: b.status().get("role") == "passive", 60, "the passive")
        wait_for(lambda: a.status().get("service") == "running", 60, "the active's agent to see it run")
        wait_for(lambda: same_trees(a, b), 120, "the first copy")
        say(f"HA: failover (the active's service killed; failover_after {FAILOVER_AFTER:g} s)")
        t0 = time.monotonic()
        a.kill_service()
        up = _first(sampler, lambda s: s[1], t0, FAILOVER_AFTER + 60)
        fig.rto_s = round(up - t0, 2)
        wait_for(lambda: _passive_hearing(a), 90, "the old active to rejoin")
        # A switchover asks of the peer what this node last heard of it: wait until that is "passive" too.
        wait_for(
            lambda: (b.status().get("peer") or {}).get("role") == "passive", 30, "the new active to hear it"
        )
        wait_for(lambda: same_trees(a, b), 60, "the trees to be equal again")
        fig.rejoined_s = round(time.monotonic() - t0, 2)
        say("HA: switchover back (standby switchover on the new active)")
        t1 = time.monotonic()
        r = b.cli("switchover", timeout=120)
        if r.returncode != 0:
            raise AssertionError(
                f"standby switchover exited {r.returncode}: {r.stdout[-500:]}{r.stderr[-500:]}"
            )
        down = _first(sampler, lambda s: not s[1], t1, 60)
        back = _first(sampler, lambda s: s[0], down, 60)
        fig.switchover_downtime_s = round(back - down, 2)
        if not same_trees(a, b):
            fig.errors.append("after the switchover the trees differ")
    finally:
        sampler.stop()
        fig.both_ran = bool(sampler.both)
        for n in (a, b):
            n.cleanup()
    return fig


def rejoin_transfer(work: Path, fig: HaFigures, files: int, differ: int, say: Callable[[str], None]) -> None:
    """Step 3 with :mod:`bench.rejoin`'s scenario, into ``fig``."""
    args = argparse.Namespace(files=files, differ=differ, unshipped=5, seed=1)
    res = rejoin.Result(files, differ, 5, 1)
    nodes: list[HaNode] = []
    fig.rejoin_files, fig.rejoin_differ = files, differ
    try:
        rejoin.scenario(args, work / "rejoin", nodes, res, say)
    finally:
        for n in nodes:
            n.cleanup()
    fig.rejoin_transferred = res.transferred
    fig.rejoin_per_differ = res.transferred_per_differ
    fig.rejoin_converge_s = res.converge_s
    fig.rejoin_rsync_s = res.rsync_s
    fig.rejoin_vs_rsync = res.ratio_converge_vs_rsync
    fig.errors += res.errors


def measure_ha(work: Path, files: int, say: Callable[[str], None]) -> HaFigures:
    """All three; a failure of one step is an error in the figures, not an exception."""
    try:
        fig = failover_and_switchover(work, files, say)
    except (AssertionError, OSError, RuntimeError) as e:
        fig = HaFigures(files, errors=[f"failover/switchover: {e}"])
    try:
        say("HA: rejoin after a forced failover (bench.rejoin's scenario)")
        rejoin_transfer(work, fig, max(files, 1000), max(10, files // 100), say)
    except (AssertionError, OSError, RuntimeError) as e:
        fig.errors.append(f"rejoin: {e}")
    return fig
