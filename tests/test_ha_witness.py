"""The witness end to end: two `standby run` agents (real processes, TLS on 127.0.0.1), each with its own
real service process, and a real etcd (Debian's ``etcd-server``, 1 or 3 members, tests/etcd.py). Both
services are sampled every 50 ms for the whole of every test, which fails if they ever run at once.

Each agent reaches etcd on a client port of its own (every member listens on two), so that nftables
(tests/netcut.py) can cut one node off the witness, or off the witness and its peer, as a partition would.
Short timings keep the tests short: a lease of 6 s, renewed every second, the service stopped 2 s before
the lease could end; failover_after is 10 s, its minimum. The measured figures are printed (``-s``).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.etcd import EtcdCluster, running_etcd
from tests.ha import HaNode, Sampler, same_trees, sampled_pair, wait_for
from tests.netcut import nft_table
from tests.test_ha import _logs, _meets, _up
from tests.test_replication import write_files

TTL = 6
MARGIN = 2.0
INTERVAL = 1.0
RETRY = 2.5
FAILOVER_AFTER = 10.0
#: Which etcd client port each node uses (see the module's doc).
CLIENT = {"join-a": 0, "join-b": 1}


def _witness_toml(endpoints: list[str]) -> str:
    return f"""
[witness]
endpoints = {json.dumps(endpoints)}
ttl = {TTL}
safety_margin = {MARGIN}
check_interval = {INTERVAL}
retry_timeout = {RETRY}
"""


@contextlib.contextmanager
def witnessed_pair(tmp_path: Path, size: int = 1) -> Iterator[tuple[EtcdCluster, HaNode, HaNode, Sampler]]:
    with running_etcd(tmp_path / "etcd", size, clients=2) as etcd:
        extra = lambda n: _witness_toml(etcd.client_endpoints(CLIENT[n.name]))  # noqa: E731
        with sampled_pair(tmp_path, FAILOVER_AFTER, extra) as (a, b, sampler):
            yield etcd, a, b, sampler
        both = len(sampler.both)
        assert not both, f"both services ran at once, {both} samples of {sampler.samples}"


def _witness(n: HaNode) -> dict[str, Any]:
    return n.status().get("witness") or {}


def _holds(n: HaNode) -> bool:
    return bool(_witness(n).get("mine"))


def _seen_up(sampler: Sampler, i: int, after: float) -> bool:
    """The sampler has recorded node ``i``'s service running since ``after``."""
    return sampler.first_time(lambda up: up[i], after=after) is not None


def _failsafe(n: HaNode) -> bool:
    return _witness(n).get("failsafe") is True


def _ports(etcd: EtcdCluster, client: int) -> list[int]:
    return [m.client_port if client == 0 else m.more_ports[client - 1] for m in etcd.members]


def _alerts(n: HaNode) -> list[str]:
    return [str(e.get("event")) for e in n.alerts()]


def _ready(tmp_path: Path, etcd: EtcdCluster, a: HaNode, b: HaNode) -> None:
    write_files(a.root / "databases" / "room-1", 40)
    _up(a, b)
    wait_for(lambda: _holds(a), 20, "the active to hold the witness's key")
    wait_for(lambda: same_trees(a, b), 30, "the first copy")
    wait_for(lambda: (b.status().get("peer") or {}).get("lag") == 0, 15, "the passive to hear no lag")


def test_the_passive_takes_over_by_the_witness_when_the_active_host_dies_and_the_old_active_rejoins(
    tmp_path: Path,
) -> None:
    with nft_table() as cut, witnessed_pair(tmp_path) as (etcd, a, b, sampler):
        _ready(tmp_path, etcd, a, b)
        old_epoch = a.status()["epoch"]
        t0 = time.monotonic()
        # The host dies: its agent and its service at once, and it answers nothing any more (a host that
        # is up but whose agent is down refuses connections, which holds the failover: see below).
        cut.set([a.port, *_ports(etcd, CLIENT["join-a"])])
        a.kill()
        a.kill_service()
        bound = TTL + FAILOVER_AFTER + 5
        wait_for(lambda: _seen_up(sampler, 1, t0), bound + 5, "the passive's service to start")
        started = sampler.first_time(lambda up: up[1], after=t0)
        assert started is not None
        rto = started - t0
        print(f"\nMEASURED witness host death: passive service running {rto:.2f} s after the kill")
        assert rto <= bound, _logs(a, b)
        wait_for(lambda: _holds(b) and b.status().get("role") == "active", 10, "the new active's key")
        w = _witness(b)
        assert b.status()["epoch"] >= max(old_epoch + 1, w["revision"])
        assert "promote.witness" in b.log()
        # The old active's host comes back: the higher epoch (and the key held by the other) fences it,
        # and it rejoins as passive by itself.
        cut.set([])
        t1 = time.monotonic()
        a.start()
        wait_for(lambda: a.status().get("role") == "passive" and _meets(a), 60, "the old active to rejoin")
        wait_for(lambda: same_trees(a, b), 30, "the trees to be equal again")
        print(f"MEASURED witness host return: passive again {time.monotonic() - t1:.2f} s after its restart")
        assert a.service_pid() is None and b.service_pid() is not None
        assert "startup.superseded" in a.log() or "demote." in a.log()


def test_an_active_cut_from_the_witness_and_its_peer_stops_its_service_before_the_passive_starts(
    tmp_path: Path,
) -> None:
    with nft_table() as cut, witnessed_pair(tmp_path) as (etcd, a, b, sampler):
        _ready(tmp_path, etcd, a, b)
        t0 = time.monotonic()
        cut.set([a.port, b.port, *_ports(etcd, CLIENT["join-a"])])  # a partition around the active
        wait_for(lambda: _seen_up(sampler, 1, t0), TTL + FAILOVER_AFTER + 15, "the passive to take over")
        stopped = sampler.first_time(lambda up: not up[0], after=t0)
        started = sampler.first_time(lambda up: up[1], after=t0)
        assert stopped is not None and started is not None
        print(
            f"\nMEASURED witness partition: the cut active stopped its service {stopped - t0:.2f} s after "
            "the cut, "
            f"the passive started its own {started - t0:.2f} s after it (gap {started - stopped:.2f} s)"
        )
        assert stopped < started, _logs(a, b)
        assert "witness.lease_lost" in _alerts(a)
        cut.set([])  # the partition heals: the old active sees the higher epoch, is fenced, rejoins
        t1 = time.monotonic()
        wait_for(lambda: a.status().get("role") == "passive" and _meets(a), 60, "the old active to rejoin")
        wait_for(lambda: same_trees(a, b), 30, "the trees to be equal again")
        print(f"MEASURED witness partition healed: old active passive after {time.monotonic() - t1:.2f} s")
        assert a.service_pid() is None


def test_without_the_witness_nobody_promotes_and_the_active_runs_on_its_peers_word(tmp_path: Path) -> None:
    with nft_table() as cut, witnessed_pair(tmp_path) as (etcd, a, b, _sampler):
        _ready(tmp_path, etcd, a, b)
        # The passive alone is cut from the witness: nothing changes for the active.
        cut.set(_ports(etcd, CLIENT["join-b"]))
        wait_for(lambda: _witness(b).get("reachable") is False, 15, "the passive to find the witness gone")
        time.sleep(TTL + 1)
        assert _holds(a) and not _witness(a).get("failsafe")
        assert a.service_pid() is not None and b.status().get("role") == "passive"
        cut.set([])
        # The witness is down entirely: the active's lease ends, its peer confirms it, it keeps running.
        etcd.stop_all()
        t0 = time.monotonic()
        wait_for(lambda: _failsafe(a), TTL + 10, "the active to run on its peer's word")
        time.sleep(max(0.0, t0 + TTL + 4 - time.monotonic()))  # well past the end of its lease
        assert a.service_pid() is not None and b.service_pid() is None
        assert a.status().get("role") == "active" and b.status().get("role") == "passive"
        said = _alerts(a)
        assert "witness.unreachable" in said and "witness.failsafe" in said, said
        assert "witness.lease_lost" not in said
        # It comes back: the active holds the key again, on its lease, not on its peer's word.
        etcd.start()
        wait_for(lambda: _holds(a) and not _failsafe(a), 30, "the active to hold the key again")
        assert a.service_pid() is not None and b.service_pid() is None
        # The active's agent dies but its host is up and its service runs on: the host refuses
        # connections, and the passive holds the failover instead of taking the key when the lease ends.
        a.kill()
        wait_for(lambda: "failover.held_agent_down" in _alerts(b), FAILOVER_AFTER + 15, "the passive to hold")
        time.sleep(2)
        assert a.service_pid() is not None and b.service_pid() is None
        assert b.status().get("role") == "passive"
        a.start()  # the agent comes back: it is confirmed active again
        wait_for(lambda: _meets(a) and a.status().get("role") == "active", 30, "the agent to be back")
        wait_for(lambda: a.service_pid() is not None, 30, "the active's service")
        assert b.service_pid() is None


def test_three_members_one_down_changes_nothing_two_down_is_the_witness_down(tmp_path: Path) -> None:
    with witnessed_pair(tmp_path, size=3) as (etcd, a, b, _sampler):
        _ready(tmp_path, etcd, a, b)
        etcd.stop_member(0)
        time.sleep(TTL + 1)
        w = _witness(a)
        assert w.get("mine") and w.get("reachable") and not w.get("failsafe"), w
        assert a.service_pid() is not None and b.service_pid() is None
        etcd.stop_member(1)  # no quorum
        wait_for(lambda: _failsafe(a), TTL + 10, "the active to run on its peer's word")
        assert a.service_pid() is not None and b.service_pid() is None
        assert b.status().get("role") == "passive"
        etcd.start_member(0)
        etcd.start_member(1)
        wait_for(lambda: _holds(a) and not _failsafe(a), 30, "the active to hold the key again")
        assert a.service_pid() is not None and b.service_pid() is None
