"""engine.metrics: the status of the moment as Prometheus metrics, and a real scrape over HTTP.

The statuses come from the real status functions: a real (never run) :class:`engine.node.Agent` with a
real role-machine state, durable role and receiver, whose ``status()`` gives the dict; the sender part is
``SenderStatus.to_dict()`` (what ``SenderNode.status()`` returns); a receiver's is ``Receiver.status()``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine import clocks, failover
from engine.config import parse_node
from engine.failover import Heartbeat, Role, ServiceState, Started
from engine.metrics import (
    COUNTER,
    HOLD_REASONS,
    METRICS,
    RENAMED,
    ROLES,
    SENDER_PARTS,
    SERVICE_STATES,
    StatusCollector,
    counter_name,
    families,
    serve,
    status_on_loop,
)
from engine.node import COUNTERS, Agent, SenderStatus

pytestmark = pytest.mark.timeout(30)

Key = tuple[str, tuple[tuple[str, str], ...]]


class Clock:
    """The agent's monotonic clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def agent(tmp_path: Path, clock: Clock) -> Iterator[Agent]:
    (tmp_path / "root").mkdir()
    setup = parse_node(
        {
            "node": {
                "name": "a",
                "listen": "127.0.0.1:7420",
                "root": str(tmp_path / "root"),
                "state_dir": str(tmp_path / "state"),
                "insecure": True,
            },
            "peer": {"name": "b", "address": "127.0.0.1:7421"},
            "service": {"backend": "command", "start": ["true"], "stop": ["true"], "status": ["true"]},
        },
        tmp_path / "node.toml",
    )
    a = Agent(setup, clock=clock)
    try:
        yield a
    finally:
        a.roles.close()
        a.receiver.applier.close()
        a.receiver.position.close()


def sender_status(**changes: Any) -> dict[str, Any]:
    """What ``SenderNode.status()`` returns: a SenderStatus as a dict."""
    s = SenderStatus(
        node="a",
        peer="127.0.0.1:7421",
        peer_node="b",
        connected=True,
        epoch=3,
        journal="0123abcd",
        head=120,
        sent_seq=110,
        acked_seq=100,
        lag_records=20,
        lag_seconds=4.5,
        pending_paths=2,
        halt=None,
        watch_error=None,
        journal_error=None,
        link_error=None,
        counters={name: i + 1 for i, name in enumerate(COUNTERS)},
        last_reconcile={},
        started=1.7e9,
        source="/srv/join",
    )
    return replace(s, **changes).to_dict()


def passive(agent: Agent, clock: Clock) -> dict[str, Any]:
    """A passive agent following an active peer: no sender, the receiver has applied up to 40."""
    st = failover.start(
        agent.setup.policy(), Started(boot=7, durable_role=Role.PASSIVE, durable_epoch=3), 0.0
    )
    peer = Heartbeat(7, 0.0, Role.ACTIVE, 3, ServiceState.RUNNING, False, False, True, 7, lag=20)
    agent.state = replace(
        st.state, service=ServiceState.STOPPED, service_since=clock.now - 600, peer=peer, reachable=True
    )
    agent.receiver.seq = 40
    agent.receiver.epoch = 3
    agent.receiver.counters["applied"] = 40
    agent.receiver.counters["refused_peers"] = 2
    clock.now += 1.5  # the peer's last heartbeat came 1.5 s ago
    return agent.status()


def active(agent: Agent, clock: Clock, **sender: Any) -> dict[str, Any]:
    """The same agent after a failover: active at epoch 4, its service up for 42 s, its sender streaming."""
    agent.roles.persist(Role.ACTIVE, 4, "promote.proven via=fence_ack")
    st = failover.start(agent.setup.policy(), Started(boot=8, durable_role=Role.ACTIVE, durable_epoch=4), 0.0)
    agent.state = replace(
        st.state, role=Role.ACTIVE, service=ServiceState.RUNNING, service_since=clock.now - 42, reachable=True
    )
    agent._alert(failover.Alert("failover.done", "this node is now active", (("epoch", "4"),)))
    agent._quarantined = 3
    agent._clock_samples = [clocks.Sample(3.5, 0.01)] * 3  # above max_clock_skew (2 s): one problem
    status = agent.status()
    # INVARIANT of the shape: Agent.status() puts SenderNode.status() under "sender".
    status["sender"] = sender_status(epoch=4, **sender)
    return status


def scrape(status: Mapping[str, Any] | None) -> dict[Key, float]:
    return values(StatusCollector(lambda: status, "a"))


def values(c: StatusCollector) -> dict[Key, float]:
    out: dict[Key, float] = {}
    for fam in c.collect():
        for s in fam.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def key(name: str, **labels: str) -> Key:
    return name, tuple(sorted({"node": "a", **labels}.items()))


def names(m: Mapping[Key, float]) -> set[str]:
    return {name for name, _ in m}


# ---- the collector against real statuses ------------------------------------------------------------------


def test_an_active_agent(agent: Agent, clock: Clock) -> None:
    m = scrape(active(agent, clock))
    assert m[key("standby_up")] == 1
    assert {r: m[key("standby_role", role=r)] for r in ROLES} == {
        "passive": 0,
        "promoting": 0,
        "active": 1,
        "demoting": 0,
        "fenced": 0,
    }
    assert m[key("standby_is_active")] == 1
    assert m[key("standby_epoch")] == 4
    assert m[key("standby_journal_head_seq")] == 120
    assert m[key("standby_journal_sent_seq")] == 110
    assert m[key("standby_journal_acked_seq")] == 100
    assert m[key("standby_lag_entries")] == 20
    assert m[key("standby_lag_seconds")] == 4.5
    assert m[key("standby_pending_paths")] == 2
    assert m[key("standby_sender_connected")] == 1
    assert m[key("standby_service_running")] == 1
    assert {s: m[key("standby_service_state", state=s)] for s in SERVICE_STATES} == {
        "running": 1,
        "stopped": 0,
        "unknown": 0,
    }
    assert m[key("standby_service_state_seconds")] == 42
    assert m[key("standby_maintenance")] == 0
    assert m[key("standby_peer_connected")] == 1
    assert m[key("standby_quarantined_files")] == 3
    assert m[key("standby_clock_skew_seconds")] == 3.5
    assert m[key("standby_clock_problems")] == 1
    assert m[key("standby_switchover_in_progress")] == 0
    assert m[key("standby_halted", reason="")] == 0
    assert {p: m[key("standby_sender_error", part=p)] for p in SENDER_PARTS} == dict.fromkeys(SENDER_PARTS, 0)
    failed_over = m[key("standby_last_failover_timestamp_seconds")]
    assert failed_over == agent.alerts[-1]["at"]
    assert m[key("standby_role_changed_timestamp_seconds")] == agent.roles.changed_at
    # No witness in today's status: its metrics are absent, not 0. Nothing is held: every reason is 0.
    assert not {n for n in names(m) if n.startswith("standby_witness_")}
    assert all(m[key("standby_failover_held", reason=r)] == 0 for r in HOLD_REASONS)


def test_every_counter_of_the_sender_and_the_receiver_is_a_counter(agent: Agent, clock: Clock) -> None:
    status = active(agent, clock)
    m = scrape(status)
    for i, name in enumerate(COUNTERS):
        assert m[key(counter_name("sender", name) or "?")] == i + 1, name
    for name, v in status["receiver"]["counters"].items():
        assert m[key(counter_name("receiver", name) or "?")] == v, name
    assert m[key("standby_guard_holds_total")] == COUNTERS.index("held") + 1
    assert m[key("standby_journal_read_errors_total")] == COUNTERS.index("journal_read_errors") + 1
    assert key("standby_sender_reconnects_total") in m
    assert key("standby_receiver_applied_total") in m
    fams = {f.name: f.type for f in families(status, "a")}
    assert fams["standby_guard_holds"] == fams["standby_sender_reconnects"] == COUNTER


def test_a_passive_agent_has_no_sender_metrics(agent: Agent, clock: Clock) -> None:
    m = scrape(passive(agent, clock))
    assert m[key("standby_role", role="passive")] == 1
    assert m[key("standby_is_active")] == 0
    assert m[key("standby_epoch")] == 3
    assert m[key("standby_replica_applied_seq")] == 40
    assert m[key("standby_receiver_connected")] == 0
    assert m[key("standby_refused_peers_total")] == 2
    assert m[key("standby_peer_last_seen_seconds")] == 1.5
    assert m[key("standby_service_state", state="stopped")] == 1
    assert m[key("standby_service_state_seconds")] == 601.5
    for gone in ("standby_journal_head_seq", "standby_lag_entries", "standby_lag_seconds", "standby_halted"):
        assert gone not in names(m), gone
    assert not {n for n in names(m) if n.startswith("standby_sender_")}
    # Not measured yet, no failover since the start, no durable role change: absent.
    assert "standby_clock_skew_seconds" not in names(m)
    assert "standby_last_failover_timestamp_seconds" not in names(m)
    assert "standby_role_changed_timestamp_seconds" not in names(m)


def test_a_starting_agent_is_up_in_no_role(agent: Agent) -> None:
    status = agent.status()
    assert status["role"] == "starting"
    m = scrape(status)
    assert m[key("standby_up")] == 1
    assert all(m[key("standby_role", role=r)] == 0 for r in ROLES)
    assert m[key("standby_is_active")] == 0
    assert m[key("standby_service_state", state="unknown")] == 1


def test_an_unknown_role_or_state_is_shown_not_hidden(agent: Agent) -> None:
    m = scrape({**agent.status(), "role": "witnessing", "service": "paused"})
    assert m[key("standby_role", role="witnessing")] == 1
    assert m[key("standby_service_state", state="paused")] == 1
    assert m[key("standby_service_running")] == 0


def test_a_halted_sender_with_errors(agent: Agent, clock: Clock) -> None:
    why = "a reconciliation would delete 80% of the replica's files"
    m = scrape(active(agent, clock, halt=why, journal_error="disk full", lag_records=None))
    assert m[key("standby_halted", reason=why)] == 1
    assert key("standby_halted", reason="") not in m
    assert m[key("standby_sender_error", part="journal")] == 1
    assert m[key("standby_sender_error", part="watch")] == 0
    # lag_records None: not connected since the start, so unknown (absent); lag_seconds is still there.
    assert "standby_lag_entries" not in names(m)
    assert m[key("standby_lag_seconds")] == 4.5


def test_a_held_failover_a_switchover_and_a_witness(agent: Agent, clock: Clock) -> None:
    status = {
        **passive(agent, clock),
        "failover_held": "maintenance",
        "switchover": "draining",
        "witness": {
            "reachable": True,
            "holder": "b",
            "lease_left": 7.5,
            "failsafe": True,
            "suspended": False,
        },
    }
    m = scrape(status)
    assert {r: m[key("standby_failover_held", reason=r)] for r in HOLD_REASONS} == {
        "planned_stop": 0,
        "maintenance": 1,
        "flap_window": 0,
        "conflict": 0,
    }
    assert m[key("standby_switchover_in_progress")] == 1
    assert m[key("standby_witness_reachable")] == 1
    assert m[key("standby_witness_holder", holder="b")] == 1
    assert m[key("standby_witness_lease_left_seconds")] == 7.5
    assert m[key("standby_witness_failsafe")] == 1 and m[key("standby_witness_suspended")] == 0
    released = scrape({**status, "failover_held": None})
    assert all(released[key("standby_failover_held", reason=r)] == 0 for r in HOLD_REASONS)


def test_a_send_process(agent: Agent) -> None:
    m = scrape(sender_status(connected=False))
    assert m[key("standby_up")] == 1
    assert m[key("standby_epoch")] == 3
    assert m[key("standby_journal_head_seq")] == 120
    assert m[key("standby_peer_connected")] == 0
    assert m[key("standby_guard_holds_total")] == COUNTERS.index("held") + 1
    assert "standby_role" not in names(m) and "standby_service_running" not in names(m)
    assert "standby_replica_applied_seq" not in names(m)


def test_a_receive_process(agent: Agent) -> None:
    agent.receiver.seq = 9
    m = scrape(agent.receiver.status())
    assert m[key("standby_replica_applied_seq")] == 9
    assert m[key("standby_peer_connected")] == 0
    assert m[key("standby_refused_peers_total")] == 0
    assert "standby_role" not in names(m) and "standby_journal_head_seq" not in names(m)


def test_every_metric_of_the_table_is_produced_as_listed(agent: Agent, clock: Clock) -> None:
    seen: dict[str, tuple[str, tuple[str, ...]]] = {}
    statuses = [
        {
            **active(agent, clock, halt="halted"),
            "failover_held": "flap_window",
            "witness": {
                "reachable": False,
                "holder": "a",
                "lease_left": 1.0,
                "failsafe": True,
                "suspended": False,
            },
        },
        passive(agent, clock),
        sender_status(),
    ]
    for status in statuses:
        for fam in families(status, "a"):
            labels = {tuple(s.labels) for s in fam.samples}
            assert len(labels) == 1, fam.name
            (label_names,) = labels
            seen[fam.name] = (fam.type, label_names)
    for name, (kind, label_names, _) in METRICS.items():
        assert seen.get(name) == (kind, ("node", *label_names)), name
    for name, (kind, label_names) in seen.items():
        assert name.startswith("standby_")
        assert name in METRICS or (kind == COUNTER and label_names == ("node",)), name


def test_the_text_exposition_holds_every_family(agent: Agent, clock: Clock) -> None:
    registry = CollectorRegistry()
    registry.register(StatusCollector(lambda: active(agent, clock), "a"))
    text = generate_latest(registry).decode()
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    assert parsed["standby_role"].type == "gauge"
    assert parsed["standby_sender_reconnects"].type == "counter"
    assert "# HELP standby_lag_seconds Seconds since the receiver last held everything journaled" in text


def test_counter_names() -> None:
    assert counter_name("sender", "reconnects") == "standby_sender_reconnects_total"
    assert counter_name("receiver", "apply_errors") == "standby_receiver_apply_errors_total"
    for (part, counter), (name, _) in RENAMED.items():
        assert counter_name(part, counter) == name
    assert counter_name("sender", "bad name") is None


# ---- a status that cannot be read -------------------------------------------------------------------------


def test_a_broken_status_gives_up_0_and_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> Mapping[str, Any] | None:
        raise RuntimeError("dictionary changed size during iteration")

    c = StatusCollector(broken, "a")
    with caplog.at_level(logging.DEBUG, logger="engine.metrics"):
        assert values(c) == {key("standby_up"): 0}
        assert values(c) == {key("standby_up"): 0}
    said = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert said[0][0] == logging.WARNING and "metrics.no_status" in said[0][1]
    assert "dictionary changed size" in said[0][1]
    assert said[1][0] == logging.DEBUG  # the same problem again is not repeated at warning level
    assert scrape(None) == {key("standby_up"): 0}
    not_a_mapping: Any = ["role", "active"]
    assert scrape(not_a_mapping) == {key("standby_up"): 0}


def test_mistyped_fields_are_absent_never_an_error() -> None:
    m = scrape(
        {
            "role": 5,
            "epoch": "3",
            "peer": "b",
            "sender": {"head": True, "counters": [1, 2], "halt": 7, "lag_seconds": "x"},
            "receiver": {"applied_seq": None, "counters": {"applied": -1, "ok": 2, 3: 4, "x y": 1}},
            "clock": {"skew": None, "problems": "none"},
            "last_failover": {"event": "failover.done"},
            "witness": ["b"],
            "service": None,
        }
    )
    assert m[key("standby_up")] == 1
    assert m[key("standby_receiver_ok_total")] == 2
    assert m[key("standby_halted", reason="")] == 0
    assert names(m) == {"standby_up", "standby_receiver_ok_total", "standby_halted"}


def test_status_on_loop_reads_on_the_loop_and_gives_up_when_it_does_not_answer() -> None:
    loop = asyncio.new_event_loop()  # never run: nothing scheduled on it is ever called
    try:
        c = StatusCollector(status_on_loop(loop, lambda: {"role": "active"}, timeout=0.05), "a")
        assert values(c) == {key("standby_up"): 0}
    finally:
        loop.close()
    assert values(c) == {key("standby_up"): 0}  # a closed loop: RuntimeError, still a scrape


async def test_status_on_loop_calls_the_status_on_the_loop_thread() -> None:
    threads: list[threading.Thread] = []

    def status() -> Mapping[str, Any]:
        threads.append(threading.current_thread())
        return {"role": "passive", "epoch": 2}

    get = status_on_loop(asyncio.get_running_loop(), status)
    m = await asyncio.to_thread(values, StatusCollector(get, "a"))
    assert m[key("standby_epoch")] == 2
    assert threads == [threading.current_thread()]


# ---- a real scrape over HTTP ------------------------------------------------------------------------------


def fetch(address: tuple[str, int]) -> dict[Key, float]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no http_proxy for loopback
    with opener.open(f"http://{address[0]}:{address[1]}/metrics", timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out: dict[Key, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


async def test_a_scrape_over_http_follows_the_status(agent: Agent, clock: Clock) -> None:
    statuses = [passive(agent, clock), active(agent, clock, lag_records=20, lag_seconds=4.5)]
    statuses.append({**statuses[1], "sender": sender_status(epoch=4, lag_records=900, lag_seconds=75.0)})
    now: list[Mapping[str, Any]] = [statuses[0]]
    srv = serve(
        ("127.0.0.1", 0), StatusCollector(status_on_loop(asyncio.get_running_loop(), lambda: now[0]), "a")
    )
    try:
        assert srv.address[0] == "127.0.0.1" and srv.address[1] > 0
        first = await asyncio.to_thread(fetch, srv.address)
        now[0] = statuses[1]
        second = await asyncio.to_thread(fetch, srv.address)
        now[0] = statuses[2]
        third = await asyncio.to_thread(fetch, srv.address)
    finally:
        await asyncio.to_thread(srv.close)
    assert first[key("standby_up")] == 1
    assert (first[key("standby_role", role="passive")], first[key("standby_role", role="active")]) == (1, 0)
    assert key("standby_lag_seconds") not in first
    assert (second[key("standby_role", role="passive")], second[key("standby_role", role="active")]) == (0, 1)
    assert second[key("standby_is_active")] == 1
    assert (second[key("standby_lag_entries")], second[key("standby_lag_seconds")]) == (20, 4.5)
    assert (third[key("standby_lag_entries")], third[key("standby_lag_seconds")]) == (900, 75.0)
    assert third[key("standby_sender_reconnects_total")] == COUNTERS.index("reconnects") + 1
    if any(name.startswith("process_") for name, _ in first):  # Linux: the process collector is on
        assert ("process_start_time_seconds", ()) in first
    # Closed: the thread is gone and the port answers no more.
    assert not [t for t in threading.enumerate() if t.name == f"metrics-{srv.address[1]}"]
    with pytest.raises(urllib.error.URLError):
        fetch(srv.address)
    srv.close()  # idempotent


def test_a_busy_port_is_an_error_at_start() -> None:
    with serve(("127.0.0.1", 0), StatusCollector(lambda: None, "a"), process_metrics=False) as srv:
        with pytest.raises(OSError):
            serve(srv.address, StatusCollector(lambda: None, "a"))
        assert fetch(srv.address) == {key("standby_up"): 0}
