"""The role machine: the transition table walked row by row, one test per rule, properties over random
event sequences, and a two-node simulation (tests/failover_sim.py) for safety and liveness."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import LocalProtocolError
from engine.failover import (
    FAILSAFE_WINDOW,
    REJOIN_RETRY,
    TRANSITIONS,
    WITNESS_RETRY,
    Action,
    Alert,
    AskWitness,
    BecomeReceiver,
    BecomeSender,
    Event,
    Failover,
    FenceAck,
    FenceCommandResult,
    FenceRequest,
    HandoverAccepted,
    HandoverAnswer,
    Heartbeat,
    LocalService,
    MaintenanceEnd,
    MaintenanceStart,
    MeasureTree,
    Node,
    OfferHandover,
    PeerSilent,
    PersistRole,
    Policy,
    Quarantine,
    Quarantined,
    Rejoin,
    Replication,
    RequestFence,
    Role,
    RunFenceCommand,
    SendFenceAck,
    ServiceOp,
    ServiceResult,
    ServiceState,
    SetManual,
    Shutdown,
    Started,
    StartService,
    Step,
    StopService,
    Switchover,
    Tick,
    Transition,
    TreeMeasured,
    WitnessAnswer,
    beat,
    epoch_from_revision,
    start,
    step,
)
from tests.failover_sim import SILENCE, SIM_POLICY, Faults, Sim

POLICY = Policy()  # the defaults: failover_after 300 s, flap_window 6 h, no fence command, never alone
PEER = 9000  # the peer agent's boot
RUNNING, STOPPED, UNKNOWN = ServiceState.RUNNING, ServiceState.STOPPED, ServiceState.UNKNOWN


class Agent:
    """One role machine driven by hand: events in, steps kept."""

    def __init__(
        self,
        policy: Policy = POLICY,
        *,
        role: Role | None = Role.PASSIVE,
        epoch: int = 1,
        initial: Role = Role.PASSIVE,
        boot: int = 1,
        now: float = 0.0,
    ) -> None:
        self.now = now
        self.peer_at = 0.0
        first = start(policy, Started(boot, role, epoch, initial), now)
        self.state: Node = first.state
        self.steps: list[Step] = [first]

    def role(self) -> Role:
        """A call, not a property: mypy would narrow a property across the events that change it."""
        return self.state.role

    def feed(self, event: Event, at: float | None = None) -> Step:
        if at is not None:
            assert at >= self.now
            self.now = at
        s = step(self.state, event, self.now)
        self.state = s.state
        self.steps.append(s)
        return s

    def at(self, t: float) -> Step:
        return self.feed(Tick(), t)

    def stopped(self) -> Step:
        return self.feed(ServiceResult(ServiceOp.STOP, True))

    def started(self) -> Step:
        return self.feed(ServiceResult(ServiceOp.START, True))

    def peer(
        self,
        role: Role,
        epoch: int,
        service: ServiceState = RUNNING,
        *,
        echo: bool = True,
        caught_up: bool = True,
        maintenance: bool = False,
        planned_stop: bool = False,
        boot: int = PEER,
        switching: str = "",
        echo_at: float | None = None,
        lag: int | None = None,
    ) -> Step:
        self.peer_at += 1.0
        echo_boot = self.state.boot if echo else None
        hb = Heartbeat(
            boot,
            self.peer_at,
            role,
            epoch,
            service,
            maintenance,
            planned_stop,
            caught_up,
            echo_boot,
            switching=switching,
            echo_at=echo_at,
            lag=lag,
        )
        return self.feed(hb)

    def active_down(self, seconds: float, epoch: int = 1, **kw: Any) -> Step:
        """The active's heartbeats say its service is stopped, once a second for ``seconds``."""
        end = self.now + seconds
        s = self.peer(Role.ACTIVE, epoch, STOPPED, **kw)
        while self.now < end:
            self.now = min(end, self.now + 1.0)
            s = self.peer(Role.ACTIVE, epoch, STOPPED, **kw)
        return s

    def actions(self, since: int = 0) -> list[Action]:
        return [a for s in self.steps[since:] for a in s.actions]

    def alerts(self) -> list[str]:
        return [a.event for a in self.actions() if isinstance(a, Alert)]

    def moves(self) -> list[Transition]:
        return [m for s in self.steps for m in s.moves]


def passive(policy: Policy = POLICY) -> Agent:
    """A passive at epoch 1, its service stopped, hearing a healthy active at epoch 1."""
    a = Agent(policy)
    a.stopped()
    a.peer(Role.ACTIVE, 1)
    assert a.role() is Role.PASSIVE
    return a


def waiting(policy: Policy = POLICY, epoch: int = 1) -> Agent:
    """Durable role active at start-up, its service stopped, no word from the peer yet."""
    a = Agent(policy, role=Role.ACTIVE, epoch=epoch)
    a.stopped()
    assert a.role() is Role.PROMOTING
    return a


def active(policy: Policy = POLICY, epoch: int = 1) -> Agent:
    """Active at ``epoch``, confirmed by a passive peer, its service running."""
    a = waiting(policy, epoch)
    a.peer(Role.PASSIVE, epoch)
    a.started()
    assert a.role() is Role.ACTIVE and a.state.service is RUNNING
    return a


def request_of(a: Agent) -> RequestFence:
    reqs = [x for x in a.actions() if isinstance(x, RequestFence)]
    assert reqs, "no fence request was sent"
    return reqs[-1]


def index(actions: list[Action], kind: type) -> int:
    return next(i for i, x in enumerate(actions) if isinstance(x, kind))


# ---- the transition table, walked ---------------------------------------------------------------------


def _promoting_manual() -> Agent:
    a = passive()
    a.feed(Failover())
    return a


def _demoting_requested() -> Agent:
    a = active()
    a.feed(FenceRequest(2, (PEER, 1)), at=10.0)
    return a


def _script_auto() -> Agent:
    a = passive()
    a.active_down(POLICY.failover_after)
    return a


def _script_proven() -> Agent:
    a = _promoting_manual()
    r = request_of(a)
    a.feed(FenceAck(r.epoch, r.token, drained=True))
    return a


def _script_forced() -> Agent:
    a = passive()
    a.feed(Failover(force=True))
    a.at(POLICY.fence_timeout)
    return a


def _script_abandoned() -> Agent:
    a = _promoting_manual()
    a.at(POLICY.fence_timeout)
    return a


def _script_yielded() -> Agent:
    a = _promoting_manual()
    a.feed(FenceRequest(request_of(a).epoch + 1, (PEER, 1)))
    return a


def _script_alone() -> Agent:
    a = waiting(dataclasses.replace(POLICY, start_alone_after=60.0))
    a.feed(PeerSilent(), at=15.0)
    a.at(60.0)
    return a


def _script_forced_alone_passive() -> Agent:
    a = passive()
    a.feed(PeerSilent())
    a.feed(Failover(force=True))
    return a


def _script_split_brain() -> Agent:
    a = active()
    a.peer(Role.ACTIVE, 1)
    return a


def _script_done() -> Agent:
    a = _demoting_requested()
    a.feed(Replication(caught_up=True))
    a.stopped()
    return a


def _script_rejoin() -> Agent:
    a = Agent(role=Role.FENCED, epoch=2)
    a.feed(Rejoin())
    a.feed(Quarantined(ok=True, files=3, folder="q"))
    return a


def _script_switchover() -> Agent:
    a = passive()
    a.peer(Role.ACTIVE, 1, STOPPED, switching="offered")
    a.feed(HandoverAccepted(1))
    return a


def _row(source: Role | None, event: str, target: Role) -> Transition:
    return Transition(source, event, target)


_P, _R, _A, _D, _F = Role.PASSIVE, Role.PROMOTING, Role.ACTIVE, Role.DEMOTING, Role.FENCED

#: One script per row: it ends with that transition.
SCRIPTS: dict[Transition, Callable[[], Agent]] = {
    _row(None, "startup.passive", _P): lambda: Agent(role=None),
    _row(None, "startup.fenced", _F): lambda: Agent(role=Role.FENCED),
    _row(None, "startup.waiting", _R): lambda: Agent(role=Role.ACTIVE),
    _row(_P, "promote.auto", _R): _script_auto,
    _row(_P, "promote.manual", _R): _promoting_manual,
    _row(_P, "promote.force", _R): lambda: _then(passive(), Failover(force=True)),
    _row(_P, "promote.finish", _R): lambda: _then(passive(), lambda a: a.peer(Role.FENCED, 2)),
    _row(_P, "promote.switchover", _R): _script_switchover,
    _row(_P, "promote.forced_alone", _A): _script_forced_alone_passive,
    _row(_R, "promote.proven", _A): _script_proven,
    _row(_R, "promote.forced", _A): _script_forced,
    _row(_R, "promote.abandoned", _P): _script_abandoned,
    _row(_R, "promote.yielded", _P): _script_yielded,
    _row(_R, "startup.confirmed", _A): lambda: _then(waiting(), lambda a: a.peer(Role.PASSIVE, 1)),
    _row(_R, "startup.alone", _A): _script_alone,
    _row(_R, "startup.forced_alone", _A): lambda: _then(waiting(), Failover(force=True)),
    _row(_R, "startup.superseded", _D): lambda: _then(waiting(), lambda a: a.peer(Role.ACTIVE, 2)),
    _row(_A, "demote.requested", _D): _demoting_requested,
    _row(_A, "demote.higher_epoch", _D): lambda: _then(active(), lambda a: a.peer(Role.ACTIVE, 2)),
    _row(_A, "demote.split_brain", _D): _script_split_brain,
    _row(_D, "demote.done", _F): _script_done,
    _row(_F, "rejoin", _P): _script_rejoin,
    _row(_P, "promote.witness", _A): lambda: _script_witness_failover(),
    _row(_A, "demote.witness", _D): lambda: _script_witness_superseded(),
}


def _then(a: Agent, what: Event | Callable[[Agent], object]) -> Agent:
    if callable(what):
        what(a)
    else:
        a.feed(what)
    return a


def test_every_row_has_a_script_and_nothing_else_is_a_row() -> None:
    assert set(SCRIPTS) == set(TRANSITIONS)
    assert len(set(TRANSITIONS)) == len(TRANSITIONS)
    assert len({t.event for t in TRANSITIONS}) == len(TRANSITIONS), "event names are unique"


@pytest.mark.parametrize("row", TRANSITIONS, ids=lambda t: t.event)
def test_every_row_is_reachable(row: Transition) -> None:
    a = SCRIPTS[row]()
    assert a.steps[-1].moves[-1] == row, a.steps[-1].log
    assert a.role() is row.target
    assert any(line.split()[0] == row.event for line in a.steps[-1].log), "logged by its stable name"


def test_a_move_not_in_the_table_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.failover as fo

    monkeypatch.setattr(fo, "_ALLOWED", fo._ALLOWED - {_row(_F, "rejoin", _P)})
    with pytest.raises(LocalProtocolError, match="not in the table"):
        _script_rejoin()


# ---- rule 1: monitoring ---------------------------------------------------------------------------------


def test_start_up_keeps_the_service_manual_and_stopped_on_every_role() -> None:
    for role in (None, Role.PASSIVE, Role.ACTIVE, Role.FENCED):
        acts = Agent(role=role).actions()
        assert isinstance(acts[0], SetManual)
        assert any(isinstance(x, StopService) for x in acts)
        assert not any(isinstance(x, StartService) for x in acts)


def test_first_start_persists_its_initial_role() -> None:
    assert PersistRole(Role.ACTIVE, 1) in Agent(role=None, epoch=0, initial=Role.ACTIVE).actions()
    assert PersistRole(Role.PASSIVE, 0) in Agent(role=None, epoch=0).actions()


def test_unknown_does_not_count_as_not_running() -> None:
    a = passive()
    for _ in range(400):
        a.now += 1
        a.peer(Role.ACTIVE, 1, UNKNOWN)
    assert a.role() is Role.PASSIVE and a.state.peer_down_since is None


def test_silence_resets_the_count() -> None:
    a = passive()
    a.active_down(POLICY.failover_after - 10)
    a.feed(PeerSilent())
    a.active_down(POLICY.failover_after - 10)
    assert a.role() is Role.PASSIVE, "the 290 s before the silence were not added"
    a.active_down(10)
    assert a.role() is Role.PROMOTING


def test_a_service_running_on_a_non_active_node_is_stopped() -> None:
    a = passive()
    s = a.feed(LocalService(RUNNING, 5.0))
    assert StopService() in s.actions
    assert "service.unexpected_running" in a.alerts()


def test_the_active_alerts_when_its_service_stops_and_does_not_restart_it() -> None:
    a = active()
    s = a.feed(LocalService(STOPPED, 50.0), at=50.0)
    assert not any(isinstance(x, StartService) for x in s.actions)
    assert "service.stopped" in a.alerts()
    assert beat(a.state, 51.0).service is STOPPED


def test_heartbeat_says_unknown_while_a_service_action_is_in_flight() -> None:
    a = waiting()
    a.peer(Role.PASSIVE, 1)
    assert a.role() is Role.ACTIVE
    assert beat(a.state, a.now).service is UNKNOWN
    a.started()
    assert beat(a.state, a.now).service is RUNNING


def test_late_and_duplicated_heartbeats_are_dropped() -> None:
    a = passive()
    a.active_down(100)
    last = a.state.peer
    assert last is not None
    a.feed(dataclasses.replace(last, at=1.0, service=RUNNING))
    a.feed(last)
    assert a.state.peer_down_since is not None


# ---- rule 2: automatic failover -------------------------------------------------------------------------


def test_failover_after_the_threshold_with_an_acknowledgement() -> None:
    a = passive()
    a.active_down(POLICY.failover_after - 1)
    assert a.role() is Role.PASSIVE, "not before the threshold"
    a.active_down(1)
    assert a.role() is Role.PROMOTING
    r = request_of(a)
    assert r.epoch == 2
    mark = len(a.steps)
    a.feed(FenceAck(r.epoch, r.token, drained=True))
    assert a.role() is Role.ACTIVE and a.state.epoch == 2
    acts = a.actions(mark)
    assert index(acts, PersistRole) < index(acts, BecomeSender) < index(acts, StartService)
    assert PersistRole(Role.ACTIVE, 2) in acts
    assert "failover.done" in a.alerts() and "failover.behind" not in a.alerts()


def test_no_failover_before_the_threshold() -> None:
    a = passive()
    a.active_down(POLICY.failover_after - 0.5)
    assert a.role() is Role.PASSIVE
    assert not any(isinstance(x, RequestFence) for x in a.actions())


def test_a_stale_or_foreign_acknowledgement_is_not_proof() -> None:
    a = _promoting_manual()
    r = request_of(a)
    a.feed(FenceAck(r.epoch, (r.token[0], r.token[1] + 1), drained=True))
    a.feed(FenceAck(r.epoch - 1, r.token, drained=True))
    assert a.role() is Role.PROMOTING


def test_a_fenced_heartbeat_at_our_epoch_after_hearing_us_is_proof() -> None:
    a = _promoting_manual()
    epoch = request_of(a).epoch
    a.peer(Role.FENCED, epoch, STOPPED, echo=False)
    assert a.role() is Role.PROMOTING, "sent before it heard this boot"
    a.peer(Role.FENCED, epoch, STOPPED)
    assert a.role() is Role.ACTIVE


def test_requests_are_sent_again_until_acknowledged() -> None:
    a = _promoting_manual()
    for t in range(1, 13):
        a.at(float(t))
    assert len([x for x in a.actions() if isinstance(x, RequestFence)]) == 1 + 12 // POLICY.fence_retry


def test_no_promotion_without_proof_when_the_peer_is_silent() -> None:
    a = passive()
    a.active_down(POLICY.failover_after)
    assert a.role() is Role.PROMOTING
    a.feed(PeerSilent())
    assert a.role() is Role.PASSIVE
    assert "failover.no_proof" in a.alerts()
    assert not any(isinstance(x, StartService | PersistRole) for x in a.actions(1))


def test_a_silent_peer_never_starts_the_count() -> None:
    a = passive()
    a.feed(PeerSilent())
    a.at(10 * POLICY.failover_after)
    assert a.role() is Role.PASSIVE and a.alerts() == ["failover.peer_unreachable"]


def test_fence_command_exit_0_is_proof() -> None:
    a = passive(dataclasses.replace(POLICY, fence_command=True))
    a.active_down(POLICY.failover_after)
    s = a.feed(PeerSilent())
    assert RunFenceCommand() in s.actions and a.role() is Role.PROMOTING
    a.feed(FenceCommandResult(0), at=a.now + 40)  # no deadline while the command runs
    assert a.role() is Role.ACTIVE


def test_fence_command_failure_is_no_proof() -> None:
    a = passive(dataclasses.replace(POLICY, fence_command=True))
    a.active_down(POLICY.failover_after)
    a.feed(PeerSilent())
    a.feed(FenceCommandResult(1))
    assert a.role() is Role.PASSIVE
    assert "failover.fence_command_failed" in a.alerts()


def test_fence_command_is_not_used_when_not_caught_up() -> None:
    a = passive(dataclasses.replace(POLICY, fence_command=True))
    a.active_down(POLICY.failover_after, caught_up=False)
    s = a.feed(PeerSilent())
    assert RunFenceCommand() not in s.actions
    assert a.role() is Role.PASSIVE and "failover.not_caught_up" in a.alerts()


def test_not_caught_up_but_reachable_the_active_drains_first() -> None:
    a = passive()
    a.active_down(POLICY.failover_after, caught_up=False)
    r = request_of(a)
    old = active()
    old.feed(FenceRequest(r.epoch, r.token), at=10.0)
    old.stopped()
    assert old.role() is Role.DEMOTING, "waits for its sender to drain"
    assert not any(isinstance(x, SendFenceAck) for x in old.actions())
    s = old.feed(Replication(caught_up=True), at=11.0)
    assert SendFenceAck(r.epoch, r.token, True) in s.actions and old.role() is Role.FENCED
    assert old.state.epoch == r.epoch
    a.feed(FenceAck(r.epoch, r.token, True))
    assert a.role() is Role.ACTIVE and "failover.behind" not in a.alerts()


def test_a_drain_that_does_not_finish_is_acknowledged_undrained_and_alerted() -> None:
    old = active()
    old.feed(FenceRequest(2, (PEER, 1)), at=10.0)
    old.stopped()
    old.at(10.0 + POLICY.drain_timeout)
    assert SendFenceAck(2, (PEER, 1), False) in old.actions() and old.role() is Role.FENCED
    a = passive()
    a.active_down(POLICY.failover_after, caught_up=False)
    r = request_of(a)
    a.feed(FenceAck(r.epoch, r.token, drained=False))
    assert a.role() is Role.ACTIVE and "failover.behind" in a.alerts()


def test_at_most_one_automatic_failover_per_flap_window() -> None:
    a = passive()
    a.active_down(POLICY.failover_after)
    r = request_of(a)
    a.feed(FenceAck(r.epoch, r.token, True))
    assert a.role() is Role.ACTIVE
    # The old node is rejoined and becomes passive; the new active learns nothing new, but the old
    # node learns the failover's age from the new active's heartbeats.
    b = Agent(role=Role.FENCED, epoch=2, boot=2)
    b.stopped()
    b.feed(Rejoin())
    b.feed(Quarantined(ok=True))
    b.feed(beat(a.state, a.now))
    assert b.state.last_auto is not None
    b.now = a.now
    b.active_down(POLICY.failover_after, epoch=2)
    assert b.role() is Role.PASSIVE and "failover.held_flap_window" in b.alerts()
    assert b.alerts().count("failover.held_flap_window") == 1, "alerted once, not every heartbeat"
    b.now = a.now + POLICY.flap_window  # the outage goes on; the window has passed
    b.peer(Role.ACTIVE, 2, STOPPED)
    assert b.role() is Role.PROMOTING


def test_a_manual_failover_is_not_limited_by_the_flap_window() -> None:
    a = passive()
    a.state = dataclasses.replace(a.state, last_auto=0.0)
    a.feed(Failover())
    assert a.role() is Role.PROMOTING


# ---- rule 3: manual and forced failover -----------------------------------------------------------------


def test_manual_failover_asks_at_once_and_needs_the_same_proof() -> None:
    a = passive()
    s = a.feed(Failover())
    assert a.role() is Role.PROMOTING and any(isinstance(x, RequestFence) for x in s.actions)
    a.at(POLICY.fence_timeout)
    assert a.role() is Role.PASSIVE and "failover.no_proof" in a.alerts()


def test_manual_failover_with_the_peer_unreachable_does_not_promote() -> None:
    a = passive()
    a.feed(PeerSilent())
    a.feed(Failover())
    assert a.role() is Role.PASSIVE and "failover.no_proof" in a.alerts()


def test_force_with_the_peer_unreachable_promotes_and_says_what_it_assumes() -> None:
    a = passive()
    a.feed(PeerSilent())
    s = a.feed(Failover(force=True))
    assert a.role() is Role.ACTIVE and a.state.epoch == 2
    assert index(list(s.actions), PersistRole) < index(list(s.actions), StartService)
    forced = [x for x in s.actions if isinstance(x, Alert) and x.event == "failover.forced"]
    assert forced and "ASSUMING THE OTHER NODE IS DOWN" in forced[0].reason


def test_force_with_the_peer_reachable_asks_it_first() -> None:
    a = passive()
    a.feed(Failover(force=True))
    assert a.role() is Role.PROMOTING
    r = request_of(a)
    a.feed(FenceAck(r.epoch, r.token, True))
    assert a.role() is Role.ACTIVE and "failover.forced" not in a.alerts()


def test_failover_on_a_fenced_node_is_refused() -> None:
    a = Agent(role=Role.FENCED, epoch=3)
    a.stopped()
    a.feed(Failover(force=True))
    assert a.role() is Role.FENCED and "command.refused" in a.alerts()
    assert not any(isinstance(x, StartService) for x in a.actions())


def test_failover_on_the_active_restarts_its_stopped_service() -> None:
    a = active()
    a.feed(LocalService(STOPPED, 5.0))
    s = a.feed(Failover())
    assert StartService() in s.actions


# ---- rule 4: fencing by epoch, start-up ---------------------------------------------------------------


def test_a_higher_epoch_fences_an_active_at_once() -> None:
    a = active()
    s = a.peer(Role.ACTIVE, 5)
    acts = list(s.actions)
    assert a.role() is Role.DEMOTING
    assert acts[:3] == [PersistRole(Role.FENCED, 5), SetManual(), StopService()]
    a.stopped()
    assert a.role() is Role.FENCED and "node.fenced" in a.alerts()


def test_a_fence_request_is_acknowledged_only_once_the_service_has_stopped() -> None:
    a = active()
    a.feed(Replication(caught_up=True))
    s = a.feed(FenceRequest(2, (PEER, 1)))
    assert PersistRole(Role.FENCED, 2) in s.actions
    a.feed(LocalService(STOPPED, 1.0))  # an observation while the stop is in flight settles nothing
    a.feed(FenceRequest(2, (PEER, 1)))
    assert not any(isinstance(x, SendFenceAck) for x in a.actions())
    s = a.stopped()
    assert SendFenceAck(2, (PEER, 1), True) in s.actions and a.role() is Role.FENCED


def test_a_fence_request_at_a_lower_or_equal_epoch_is_refused() -> None:
    a = active(epoch=3)
    a.feed(FenceRequest(3, (PEER, 1)))
    a.feed(FenceRequest(2, (PEER, 2)))
    assert a.role() is Role.ACTIVE


def test_a_fenced_node_acknowledges_again_and_keeps_the_highest_epoch() -> None:
    a = Agent(role=Role.FENCED, epoch=2)
    a.stopped()
    s = a.feed(FenceRequest(4, (PEER, 3)))
    assert list(s.actions) == [PersistRole(Role.FENCED, 4), SendFenceAck(4, (PEER, 3), False)]
    s = a.feed(FenceRequest(3, (PEER, 4)))
    assert not s.actions


def test_a_passive_acknowledges_a_promoting_peer() -> None:
    a = passive()
    s = a.feed(FenceRequest(2, (PEER, 1)))
    assert list(s.actions) == [PersistRole(Role.PASSIVE, 2), SendFenceAck(2, (PEER, 1), True)]
    assert a.role() is Role.PASSIVE


def test_two_promotions_at_once_neither_wins() -> None:
    a = _promoting_manual()
    r = request_of(a)
    s = a.feed(FenceRequest(r.epoch, (PEER, 1)))
    assert a.role() is Role.PROMOTING and not any(isinstance(x, SendFenceAck) for x in s.actions)


def test_start_up_waits_for_the_peer_to_confirm() -> None:
    a = waiting()
    a.at(1000.0)
    assert a.role() is Role.PROMOTING
    a.peer(Role.PASSIVE, 1, echo=False)
    assert a.role() is Role.PROMOTING, "a heartbeat sent before the peer heard this boot confirms nothing"
    a.peer(Role.PROMOTING, 1)
    assert a.role() is Role.PROMOTING
    s = a.peer(Role.PASSIVE, 1)
    assert a.role() is Role.ACTIVE and StartService() in s.actions
    assert not any(isinstance(x, PersistRole) for x in a.actions()), "already durable"


def test_start_up_with_a_higher_epoch_at_the_peer_fences_this_node() -> None:
    a = waiting()
    a.peer(Role.PASSIVE, 3)
    assert a.role() is Role.DEMOTING
    a.stopped()
    assert a.role() is Role.FENCED
    assert PersistRole(Role.FENCED, 3) in a.actions()
    assert not any(isinstance(x, StartService) for x in a.actions())


def test_start_up_with_the_peer_unreachable_alerts_and_waits() -> None:
    a = waiting()
    a.feed(PeerSilent(), at=15.0)
    a.at(10 * 3600.0)
    assert a.role() is Role.PROMOTING and "startup.waiting" in a.alerts()
    assert not any(isinstance(x, StartService) for x in a.actions())


def test_start_alone_after() -> None:
    a = waiting(dataclasses.replace(POLICY, start_alone_after=600.0))
    a.feed(PeerSilent(), at=15.0)
    a.at(599.0)
    assert a.role() is Role.PROMOTING
    s = a.at(600.0)
    assert a.role() is Role.ACTIVE and StartService() in s.actions and "startup.alone" in a.alerts()


def test_start_alone_after_does_not_apply_to_a_reachable_peer() -> None:
    a = waiting(dataclasses.replace(POLICY, start_alone_after=600.0))
    a.peer(Role.PROMOTING, 1)
    a.at(700.0)
    assert a.role() is Role.PROMOTING


def test_force_on_a_node_waiting_at_start_up_starts_it_alone() -> None:
    a = waiting(epoch=4)
    a.feed(PeerSilent())
    s = a.feed(Failover(force=True))
    assert a.role() is Role.ACTIVE and a.state.epoch == 4 and StartService() in s.actions
    assert "failover.forced" in a.alerts()


def test_a_node_waiting_at_start_up_yields_to_a_fence_request() -> None:
    a = waiting(epoch=1)
    a.feed(FenceRequest(2, (PEER, 1)))
    a.stopped()
    assert a.role() is Role.FENCED
    assert SendFenceAck(2, (PEER, 1), False) in a.actions()


def test_a_passive_persists_the_highest_epoch_it_hears() -> None:
    a = passive()
    s = a.peer(Role.ACTIVE, 3)
    assert PersistRole(Role.PASSIVE, 3) in s.actions
    after_crash = Agent(role=Role.PASSIVE, epoch=a.state.epoch, boot=2)
    after_crash.stopped()
    after_crash.feed(PeerSilent())
    after_crash.feed(Failover(force=True))
    assert after_crash.state.epoch == 4, "above the active it heard before the crash"


def test_two_durable_actives_at_one_epoch_alert_and_wait_for_the_operator() -> None:
    a = waiting(epoch=2)
    t = 0.0
    while t < POLICY.fence_timeout + POLICY.failover_after + 10:
        t += 1.0
        a.now = t
        a.peer(Role.PROMOTING, 2)
    assert a.role() is Role.PROMOTING and a.alerts().count("startup.conflict") == 1
    a.feed(Failover(force=True))
    assert a.role() is Role.ACTIVE
    other = waiting(epoch=2)
    other.peer(Role.ACTIVE, 2)
    other.stopped()
    assert other.role() is Role.FENCED and "failover.split_brain" in other.alerts()


def test_a_fenced_node_never_starts_and_without_auto_rejoin_rejoins_only_on_command() -> None:
    a = Agent(dataclasses.replace(POLICY, auto_rejoin=False), role=Role.FENCED, epoch=2)
    a.stopped()
    a.peer(Role.ACTIVE, 2)
    a.at(10 * 3600.0)
    a.feed(LocalService(RUNNING, 1.0))  # someone started it by hand
    assert StopService() in a.steps[-1].actions
    assert a.role() is Role.FENCED
    assert not any(isinstance(x, StartService | BecomeSender | Quarantine) for x in a.actions())
    s = a.feed(Rejoin())
    assert s.actions == (Quarantine(2),) and a.role() is Role.FENCED, "quarantine first, then passive"
    s = a.feed(Quarantined(ok=True, files=0))
    assert a.role() is Role.PASSIVE and s.actions[0] == PersistRole(Role.PASSIVE, 2)


def test_a_fenced_node_rejoins_by_itself_once_the_peer_runs_the_service() -> None:
    a = Agent(role=Role.FENCED, epoch=2)
    a.stopped()
    a.peer(Role.PROMOTING, 2, STOPPED)
    a.peer(Role.ACTIVE, 2, STOPPED)
    assert not any(isinstance(x, Quarantine) for x in a.actions()), "not before the peer's service runs"
    s = a.peer(Role.ACTIVE, 2, RUNNING)
    assert Quarantine(2) in s.actions and a.role() is Role.FENCED
    a.peer(Role.ACTIVE, 2, RUNNING)
    assert sum(isinstance(x, Quarantine) for x in a.actions()) == 1, "one quarantine at a time"
    a.feed(Quarantined(ok=False, reason="disk full"))
    assert a.role() is Role.FENCED and "rejoin.failed" in a.alerts()
    a.peer(Role.ACTIVE, 2, RUNNING)
    assert sum(isinstance(x, Quarantine) for x in a.actions()) == 1, "retried only after a pause"
    a.at(a.now + REJOIN_RETRY)
    a.peer(Role.ACTIVE, 2, RUNNING)
    assert sum(isinstance(x, Quarantine) for x in a.actions()) == 2
    s = a.feed(Quarantined(ok=True, files=4, folder="q/1"))
    assert a.role() is Role.PASSIVE and "rejoin.quarantined" in a.alerts()
    assert [type(x) for x in s.actions[:2]] == [PersistRole, BecomeReceiver]


def test_an_operator_rejoin_that_failed_is_tried_again_even_without_auto_rejoin() -> None:
    a = Agent(dataclasses.replace(POLICY, auto_rejoin=False), role=Role.FENCED, epoch=2)
    a.stopped()
    a.feed(Rejoin())
    a.feed(Quarantined(ok=False, reason="the peer's agent cannot be reached"))
    a.feed(Quarantined(ok=False, reason="the peer's agent cannot be reached"))  # a stale repeat
    a.at(a.now + REJOIN_RETRY)
    assert sum(isinstance(x, Quarantine) for x in a.actions()) == 2
    a.feed(Quarantined(ok=False, reason="the peer's agent cannot be reached"))
    assert a.alerts().count("rejoin.failed") == 1, "alerted once per reason"
    a.at(a.now + REJOIN_RETRY)
    a.feed(Quarantined(ok=True))
    assert a.role() is Role.PASSIVE


def test_a_fenced_node_whose_peer_is_not_at_a_higher_or_equal_epoch_does_not_rejoin() -> None:
    a = Agent(role=Role.FENCED, epoch=3)
    a.stopped()
    a.peer(Role.ACTIVE, 2, RUNNING)
    assert not any(isinstance(x, Quarantine) for x in a.actions())


# ---- rule 7: switchover -----------------------------------------------------------------------------


def handing_over(policy: Policy = POLICY) -> Agent:
    """An active asked to switch over, its service stopped, replication caught up and idle."""
    a = active(policy)
    a.peer(Role.PASSIVE, 1, STOPPED)
    s = a.feed(Switchover())
    assert StopService() in s.actions and a.state.handover is not None
    a.stopped()
    a.feed(Replication(caught_up=True, idle=True))
    return a


def test_a_switchover_drains_measures_offers_and_is_fenced_by_the_taker() -> None:
    a = handing_over()
    assert beat(a.state, a.now).switching == "draining"
    assert not any(isinstance(x, MeasureTree) for x in a.actions()), "settles first"
    a.at(a.now + POLICY.handover_settle)
    assert MeasureTree() in a.actions()
    s = a.feed(TreeMeasured("abc", 10))
    assert s.actions == (OfferHandover(1, "abc", 10),)
    a.feed(HandoverAnswer(ok=True))
    assert a.state.handover is not None and a.state.handover.stage == "accepted"
    s = a.feed(FenceRequest(2, (PEER, 1)))
    assert a.role() is Role.DEMOTING and s.actions[0] == PersistRole(Role.FENCED, 2)
    a.stopped()  # the demotion's own (idempotent) stop
    assert SendFenceAck(2, (PEER, 1), True) in a.actions() and a.role() is Role.FENCED
    assert not any(isinstance(x, StartService) for x in a.actions()[-6:])


def test_a_switchover_rolls_back_when_refused_silent_or_late() -> None:
    a = handing_over()
    a.at(a.now + POLICY.handover_settle)
    a.feed(TreeMeasured("abc", 10))
    s = a.feed(HandoverAnswer(ok=False, reason="not passive"))
    assert StartService() in s.actions and a.state.handover is None
    assert a.role() is Role.ACTIVE and "switchover.rolled_back" in a.alerts()
    b = handing_over()
    s = b.feed(PeerSilent())
    assert StartService() in s.actions and b.state.handover is None
    c = handing_over()
    c.feed(Replication(caught_up=False))  # never drains
    for t in range(1, int(POLICY.switchover_timeout) + 1):
        c.peer(Role.PASSIVE, 1, STOPPED)
        c.at(t + 0.5)
    assert c.state.handover is None and "switchover.rolled_back" in c.alerts()


def test_a_tree_that_differs_is_drained_and_offered_again() -> None:
    a = handing_over()
    a.at(a.now + POLICY.handover_settle)
    a.feed(TreeMeasured("abc", 10))
    a.feed(HandoverAnswer(ok=False, retry=True, reason="trees differ"))
    assert a.state.handover is not None and a.state.handover.stage == "draining"
    a.at(a.now + 0.5)
    a.at(a.now + POLICY.handover_settle)
    assert sum(isinstance(x, MeasureTree) for x in a.actions()) == 2


def test_the_passive_holds_quietly_while_the_active_switches_and_takes_only_a_real_offer() -> None:
    a = passive(dataclasses.replace(POLICY, failover_after=5.0))
    a.active_down(60.0, switching="draining")
    assert a.role() is Role.PASSIVE and not a.alerts(), "no count, no alert during a switchover"
    b = passive()
    b.feed(HandoverAccepted(1))  # the active is not switching: ignored
    assert b.role() is Role.PASSIVE
    b.peer(Role.ACTIVE, 1, STOPPED, switching="offered")
    b.feed(HandoverAccepted(1))
    r = request_of(b)
    assert r.epoch == 2 and b.role() is Role.PROMOTING
    b.feed(FenceAck(r.epoch, r.token, drained=True))
    assert b.role() is Role.ACTIVE
    assert b.actions()[-4:-1] == [PersistRole(Role.ACTIVE, 2), BecomeSender(), StartService()]


def test_a_switchover_without_an_acknowledgement_is_abandoned_never_forced() -> None:
    b = passive(dataclasses.replace(POLICY, fence_command=True))
    b.peer(Role.ACTIVE, 1, STOPPED, switching="offered")
    b.feed(HandoverAccepted(1))
    b.at(b.now + POLICY.fence_timeout)
    assert b.role() is Role.PASSIVE and "switchover.no_ack" in b.alerts()
    assert not any(isinstance(x, RunFenceCommand | StartService) for x in b.actions())


def test_a_failed_stop_is_alerted_and_retried() -> None:
    a = active()
    a.feed(FenceRequest(2, (PEER, 1)))
    a.feed(ServiceResult(ServiceOp.STOP, False, "access denied"))
    assert "service.stop_failed" in a.alerts() and a.role() is Role.DEMOTING
    s = a.at(a.now + POLICY.service_retry)
    assert StopService() in s.actions


# ---- rule 5: maintenance and planned stops --------------------------------------------------------------


def test_no_automatic_failover_during_local_maintenance() -> None:
    a = passive()
    a.feed(MaintenanceStart(until=3600.0))
    a.active_down(2 * POLICY.failover_after)
    assert a.role() is Role.PASSIVE and a.alerts().count("failover.held_maintenance") == 1
    a.feed(MaintenanceEnd())
    a.active_down(POLICY.failover_after - 1)
    assert a.role() is Role.PASSIVE, "the count starts again when the window closes"
    a.active_down(1)
    assert a.role() is Role.PROMOTING


def test_no_automatic_failover_during_the_peers_maintenance() -> None:
    a = passive()
    a.active_down(2 * POLICY.failover_after, maintenance=True)
    assert a.role() is Role.PASSIVE and "failover.held_maintenance" in a.alerts()


def test_a_maintenance_window_expires_by_itself() -> None:
    a = passive()
    a.feed(MaintenanceStart(until=100.0))
    assert beat(a.state, 99.0).maintenance
    s = a.at(100.0)
    assert any(line.startswith("maintenance.expired") for line in s.log)
    assert not beat(a.state, 100.0).maintenance


def test_a_planned_stop_is_alerted_not_counted() -> None:
    a = passive()
    a.active_down(2 * POLICY.failover_after, planned_stop=True)
    assert a.role() is Role.PASSIVE and a.alerts() == ["failover.held_planned_stop"]


def test_a_graceful_stop_announces_itself() -> None:
    a = active()
    a.feed(Shutdown())
    assert beat(a.state, a.now).planned_stop


# ---- rule 6 and the pure-module contract, over random event sequences ------------------------------------

_roles = st.sampled_from(list(Role))
_services = st.sampled_from(list(ServiceState))
_tokens = st.tuples(st.sampled_from([1, PEER]), st.integers(0, 3))
_events: st.SearchStrategy[Event] = st.one_of(
    st.builds(LocalService, _services, st.just(0.0)),
    st.builds(
        Heartbeat,
        boot=st.sampled_from([PEER, PEER + 1]),
        at=st.floats(0, 50),
        role=_roles,
        epoch=st.integers(0, 6),
        service=_services,
        maintenance=st.booleans(),
        planned_stop=st.booleans(),
        caught_up=st.booleans(),
        echo=st.sampled_from([None, 1, 2]),
        last_failover_age=st.none() | st.floats(0, 10_000),
        switching=st.sampled_from(["", "draining", "offered"]),
    ),
    st.just(PeerSilent()),
    st.builds(FenceRequest, st.integers(0, 7), _tokens),
    st.builds(FenceAck, st.integers(0, 7), st.tuples(st.just(1), st.integers(0, 3)), st.booleans()),
    st.builds(FenceCommandResult, st.sampled_from([0, 1])),
    st.builds(ServiceResult, st.sampled_from(list(ServiceOp)), st.booleans()),
    st.builds(Replication, st.booleans(), st.booleans()),
    st.builds(Failover, st.booleans()),
    st.builds(MaintenanceStart, st.floats(0, 2000)),
    st.just(MaintenanceEnd()),
    st.just(Rejoin()),
    st.builds(Quarantined, st.booleans(), st.integers(0, 3)),
    st.just(Switchover()),
    st.builds(TreeMeasured, st.sampled_from(["", "d"]), st.integers(0, 3)),
    st.builds(HandoverAnswer, st.booleans(), st.booleans()),
    st.builds(HandoverAccepted, st.integers(0, 6)),
    st.just(Shutdown()),
    st.just(Tick()),
)
_small = Policy(failover_after=5.0, flap_window=50.0, fence_timeout=3.0, fence_retry=1.0, drain_timeout=2.0)


def check_step(s: Step, disk: list[tuple[Role, int]]) -> None:
    """What every step must respect, whatever came in."""
    for a in s.actions:
        if isinstance(a, PersistRole):
            assert a.role in (Role.PASSIVE, Role.ACTIVE, Role.FENCED)
            assert not disk or a.epoch >= disk[-1][1], "an epoch on disk never goes back"
            disk.append((a.role, a.epoch))
        if isinstance(a, StartService):
            assert disk and disk[-1] == (Role.ACTIVE, s.state.epoch), "persisted active before starting"
            assert s.state.role is Role.ACTIVE
        if isinstance(a, BecomeSender):
            assert s.state.role is Role.ACTIVE
        if isinstance(a, SendFenceAck):
            assert s.state.role not in (Role.ACTIVE, Role.DEMOTING)
    for m in s.moves:
        assert m in TRANSITIONS
    if s.state.role is Role.ACTIVE:
        assert s.state.epoch >= s.state.seen
    assert s.state.seen >= s.state.epoch
    for line in s.log:
        assert line and line.split()[0].replace("_", "").replace(".", "").isalpha()


@settings(max_examples=300, deadline=None)
@given(
    role=st.sampled_from([None, Role.PASSIVE, Role.ACTIVE, Role.FENCED]),
    epoch=st.integers(0, 4),
    initial=st.sampled_from([Role.PASSIVE, Role.ACTIVE]),
    fence_command=st.booleans(),
    alone=st.none() | st.floats(0, 20),
    script=st.lists(st.tuples(_events, st.floats(0, 4)), max_size=40),
)
def test_random_events_keep_the_rules(
    role: Role | None,
    epoch: int,
    initial: Role,
    fence_command: bool,
    alone: float | None,
    script: list[tuple[Event, float]],
) -> None:
    policy = dataclasses.replace(_small, fence_command=fence_command, start_alone_after=alone)
    first = start(policy, Started(1, role, epoch, initial), 0.0)
    disk: list[tuple[Role, int]] = [] if role is None else [(role, epoch)]
    check_step(first, disk)
    state, now = first.state, 0.0
    for event, dt in script:
        now += dt
        s = step(state, event, now)
        check_step(s, disk)
        state = s.state
    if disk:
        assert state.epoch == disk[-1][1], "the state's epoch is the one on disk"


def test_the_module_is_pure() -> None:
    import ast
    from pathlib import Path

    import engine.failover as fo

    tree = ast.parse(Path(fo.__file__).read_text("utf-8"))
    mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert mods <= {"__future__", "enum", "dataclasses", "typing", "engine.errors"}, mods


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="failover_after"):
        Policy(failover_after=-1)
    with pytest.raises(ValueError, match="start_alone_after"):
        Policy(start_alone_after=-5)


# ---- the two-node simulation ----------------------------------------------------------------------------

SOAK = os.environ.get("STANDBY_SOAK") == "1"
HOSTILE = Faults(
    drop=0.1,
    dup=0.1,
    delay=(0.05, 2.5),
    late=0.02,
    op_time=(0.2, 3.0),
    op_fail=0.05,
    partition=0.01,
    host_crash=0.003,
    agent_crash=0.003,
    service_crash=0.01,
    mid_step_crash=0.01,
    operator=0.02,
)


SWITCHOVERS = Faults(
    drop=0.1,
    dup=0.2,
    delay=(0.05, 3.0),
    late=0.05,
    op_time=(0.2, 4.0),
    op_fail=0.05,
    partition=0.01,
    host_crash=0.002,
    agent_crash=0.004,
    service_crash=0.005,
    mid_step_crash=0.01,
    operator=0.01,
    switchover=0.05,
)


def settled(sim: Sim) -> bool:
    roles = sim.roles()
    return (
        roles.count(Role.ACTIVE) == 1
        and roles.count(Role.PASSIVE) == 1
        and sim.running() == [r is Role.ACTIVE for r in roles]
    )


def converge(sim: Sim, limit: float) -> bool:
    """What an operator does after the storm, following the alerts: rejoin fenced nodes, restart a
    stopped service on the active (the flap window held the failover), fail over if nobody is active."""
    t0 = sim.now
    while sim.now - t0 < limit and not settled(sim):
        for i, n in enumerate(sim.nodes):
            if n.agent is None:
                continue
            if n.agent.role is Role.FENCED and not n.agent.rejoining:
                sim.feed(i, Rejoin())
            elif n.agent.role is Role.ACTIVE and not n.service.running and not n.agent.service_ops:
                sim.feed(i, Failover())
        if all(n.agent is not None and n.agent.role is Role.PASSIVE for n in sim.nodes):
            sim.feed(sim.rng.randrange(2), Failover())
        if any("startup.conflict" in (a.event for a in n.alerts[-3:]) for n in sim.nodes):
            sim.feed(sim.rng.randrange(2), Failover(force=True))
        sim.run(15.0)
    return settled(sim)


def seeds(n: int, soak: int) -> Iterable[int]:
    return range(soak if SOAK else n)


def storm(runs: Iterable[int], faults: Faults, policy: Callable[[int], Policy]) -> set[Transition]:
    """Per seed: 300 s of ``faults`` never run two services; after they stop, the operator's routine
    settles the pair. The transitions taken, over all runs."""
    moves: set[Transition] = set()
    for seed in runs:
        sim = Sim(seed, faults, policy(seed))
        sim.run(300.0)
        assert not sim.violations, "\n".join(sim.violations[:5]) + "\n" + sim.describe()
        sim.heal()
        assert converge(sim, 300.0), "did not settle after the faults stopped\n" + sim.describe()
        assert not sim.violations, "\n".join(sim.violations[:5]) + "\n" + sim.describe()
        moves.update(m for n in sim.nodes for m in n.moves)
    return moves


@pytest.mark.parametrize("faults", [HOSTILE, SWITCHOVERS], ids=["hostile", "switchovers"])
def test_simulation_never_runs_two_services_and_recovers(faults: Faults) -> None:
    """Safety under a hostile schedule (force is used only while the other host is really down), then
    liveness: once the faults stop, the operator's routine brings back one active and one passive."""
    moves = storm(
        seeds(60, 1000), faults, lambda seed: dataclasses.replace(SIM_POLICY, fence_command=seed % 2 == 1)
    )
    assert moves <= set(TRANSITIONS)
    common = {"promote.auto", "promote.proven", "demote.requested", "demote.done", "startup.confirmed"}
    if faults.switchover:
        common |= {"promote.switchover", "rejoin"}
    assert common <= {m.event for m in moves}, "the schedule exercises failover"


@pytest.mark.parametrize(
    "faults", [Faults(), Faults(drop=0.05, dup=0.3, delay=(0.05, 1.5))], ids=["fair", "lossy"]
)
def test_simulation_fails_over_when_the_active_service_dies(faults: Faults) -> None:
    """Liveness: the active's service is killed with the peer reachable; the passive's service runs
    within failover_after plus a few heartbeats, fence retries and service start times."""
    slack = 6.0 if faults.drop == 0 else 12.0
    for seed in seeds(10, 200):
        sim = Sim(seed, faults)
        assert sim.run_until(lambda s=sim: s.running() == [True, False], 30.0) is not None, sim.describe()
        sim.crash_service(0)
        took = sim.run_until(lambda s=sim: s.running()[1], SIM_POLICY.failover_after + 30.0)
        assert took is not None and took <= SIM_POLICY.failover_after + slack, (
            f"took {took}\n{sim.describe()}"
        )
        assert sim.roles() == [Role.FENCED, Role.ACTIVE] and not sim.violations
        assert sim.nodes[1].disk == (Role.ACTIVE, 2) and sim.nodes[0].disk == (Role.FENCED, 2)


def test_simulation_switchover_swaps_the_roles_and_the_old_active_rejoins() -> None:
    """A switchover on a fair network: the service moves to the passive within a few seconds, the old
    active rejoins as passive by itself, and at no moment do both services run."""
    for seed in seeds(10, 200):
        sim = Sim(seed, Faults())
        assert sim.run_until(lambda s=sim: s.running() == [True, False], 30.0) is not None, sim.describe()
        sim.feed(0, Switchover())
        took = sim.run_until(lambda s=sim: s.running() == [False, True], 30.0)
        assert took is not None and took <= SIM_POLICY.handover_settle + 8.0, f"took {took}\n{sim.describe()}"
        assert sim.run_until(lambda s=sim: s.roles() == [Role.PASSIVE, Role.ACTIVE], 20.0) is not None
        assert not sim.violations, sim.describe()
        assert sim.nodes[1].disk == (Role.ACTIVE, 2) and sim.nodes[0].disk == (Role.PASSIVE, 2)
        assert "switchover.rolled_back" not in [a.event for n in sim.nodes for a in n.alerts]


def test_simulation_without_proof_keeps_the_passive_waiting() -> None:
    """The active's host dies with no fence command: the passive alerts and does not promote."""
    sim = Sim(7, Faults())
    sim.run_until(lambda: sim.running() == [True, False], 30.0)
    sim.crash_service(0)
    sim.nodes[0].restart_at = None
    sim.run(2.0)
    sim.crash_host(0)
    sim.nodes[0].restart_at = 10_000.0
    sim.run(10 * SIM_POLICY.failover_after)
    assert sim.roles()[1] is Role.PASSIVE and not any(sim.running())
    sim.feed(1, Failover(force=True))  # the operator knows the host is gone
    sim.run(5.0)
    assert sim.running() == [False, True]
    assert "failover.forced" in [a.event for a in sim.nodes[1].alerts]


# ---- rules 8-10: the witness ------------------------------------------------------------------------------

WITNESS = dataclasses.replace(
    POLICY, witness=True, witness_ttl=30.0, witness_margin=10.0, witness_interval=10.0, failover_after=60.0
)
#: How long a passive waits after the active went silent before it may take the key (rule 9).
QUIET = max(WITNESS.failover_after, FAILSAFE_WINDOW + WITNESS.witness_margin)


def asked(a: Agent, since: int = 0) -> list[str]:
    return [x.op for x in a.actions(since) if isinstance(x, AskWitness)]


def answer(a: Agent, op: str | None = None, *, reachable: bool = True, **kw: Any) -> Step:
    """The witness answers the last call this node made (``op`` checks which it was)."""
    last = [x for x in a.actions() if isinstance(x, AskWitness)]
    assert last, "the node asked the witness nothing"
    if op is not None:
        assert last[-1].op == op, (last[-1].op, op)
    return a.feed(WitnessAnswer(last[-1].op, a.now, reachable, **kw))


def witness_active(epoch: int = 1) -> Agent:
    """Active at ``epoch``, holding the key (acquired at its first tick), its service running."""
    a = waiting(WITNESS, epoch)
    a.peer(Role.PASSIVE, epoch, echo_at=a.now)  # confirms: it heard this boot just now
    a.started()
    assert a.role() is Role.ACTIVE and not a.state.lease.suspended
    if asked(a)[-1:] == ["look"]:
        answer(a, "look")  # asked while it waited for its peer: nobody holds the key
    a.at(a.now + WITNESS_RETRY)
    answer(a, "acquire", holder="join-a", mine=True, revision=7, left=30.0)
    assert a.state.lease.mine and a.state.lease.until == a.now + 30.0
    return a


def witness_passive() -> Agent:
    """A passive hearing a healthy active (nothing unacknowledged), and the witness holding its key."""
    a = passive(WITNESS)
    a.peer(Role.ACTIVE, 1, lag=0)
    answer(a, "look", holder="join-a", revision=7, left=30.0)
    return a


def _script_witness_failover() -> Agent:
    a = witness_passive()
    silent_from = a.now
    a.feed(PeerSilent(), at=silent_from + 15.0)
    a.at(silent_from + QUIET)
    answer(a, "look")  # the key is gone: the active's lease ended
    a.at(a.now + WITNESS_RETRY)
    answer(a, "acquire", holder="join-b", mine=True, revision=57, left=30.0)
    return a


def _script_witness_superseded() -> Agent:
    a = witness_active()
    a.at(a.now + 10.0)
    answer(a, "renew", holder="join-b", revision=57, left=25.0)
    return a


def test_the_epoch_follows_the_witness_and_never_goes_back() -> None:
    assert epoch_from_revision(57, 3) == 57  # the witness's order
    assert epoch_from_revision(57, 80) == 81  # never back below what this node has seen
    first = epoch_from_revision(57, 3)
    assert epoch_from_revision(90, 3) > first and epoch_from_revision(90, first) > first
    for rev, seen in ((0, 1), (-1, 1), (True, 1), (1, -1)):
        with pytest.raises(ValueError):
            epoch_from_revision(rev, seen)


def test_without_a_witness_nothing_asks_it() -> None:
    for script in (_script_proven, _script_auto, _script_done, _script_rejoin, _script_alone):
        assert asked(script()) == []


def test_the_active_renews_every_interval_and_keeps_its_service_while_the_lease_lasts() -> None:
    a = witness_active()
    t0 = a.now
    for i in range(1, 4):
        a.at(t0 + 10.0 * i)
        answer(a, "renew", holder="join-a", mine=True, revision=7, left=30.0)
    assert [op for op in asked(a) if op != "look"] == ["acquire", "renew", "renew", "renew"]
    assert not [x for x in a.actions() if isinstance(x, StopService)][1:], "only the start-up stop"
    assert a.state.lease.until == a.now + 30.0


def test_the_active_stops_its_service_before_the_lease_can_end_and_starts_it_when_renewed() -> None:
    a = witness_active()
    t0 = a.now
    n = len(a.steps)
    for t in (10.0, 11.0, 12.0, 19.9):  # renewals fail (the witness is gone)
        a.at(t0 + t)
        if a.state.lease.asking:
            answer(a, reachable=False, error="no answer")
    assert not any(isinstance(x, StopService) for x in a.actions(n)), "ttl - margin not reached yet"
    s = a.at(t0 + 20.0)
    assert StopService() in s.actions and "witness.lease_lost" in a.alerts()
    assert "witness.unreachable" in a.alerts()
    a.stopped()
    assert beat(a.state, a.now).service is STOPPED and a.role() is Role.ACTIVE
    a.at(a.now + 1.0)
    answer(a, "renew", holder="join-a", mine=True, revision=7, left=30.0)
    assert StartService() in a.steps[-1].actions, a.steps[-1].log
    assert any(line.startswith("witness.resumed") for line in a.steps[-1].log)


def test_failsafe_the_active_keeps_its_service_while_its_peer_confirms() -> None:
    a = witness_active()
    t0 = a.now
    n = len(a.steps)
    t = t0
    while t < t0 + 60.0:  # the witness is down for a minute; the passive hears us all along
        t += 1.0
        a.now = t
        a.peer(Role.PASSIVE, 1, echo_at=t - 1.5)
        if a.state.lease.asking:
            answer(a, reachable=False, error="no answer")
    assert not any(isinstance(x, StopService) for x in a.actions(n))
    assert a.state.lease.failsafe and "witness.failsafe" in a.alerts()
    # The confirmations stop (the passive no longer hears us): the service stops within the window.
    s = a.at(t + FAILSAFE_WINDOW + 0.1)
    assert StopService() in s.actions


def test_a_confirmation_must_echo_this_boot_and_be_fresh() -> None:
    a = witness_active()
    t0 = a.now
    a.now = t0 + 20.0
    a.peer(Role.PASSIVE, 1, echo_at=a.now - FAILSAFE_WINDOW - 0.5)  # too old
    assert StopService() in a.actions(len(a.steps) - 2)
    b = witness_active()
    b.now = t0 + 20.0
    b.peer(Role.PASSIVE, 1, echo_at=b.now - 1.0, echo=False)  # it has not heard this boot
    assert StopService() in b.actions(len(b.steps) - 2)
    c = witness_active()
    c.now = t0 + 20.0
    c.peer(Role.PROMOTING, 1, echo_at=c.now - 1.0)  # not passive: no confirmation
    assert StopService() in c.actions(len(c.steps) - 2)


def test_another_holder_makes_the_active_step_down_fenced() -> None:
    a = _script_witness_superseded()
    assert a.role() is Role.DEMOTING
    assert PersistRole(Role.FENCED, 57) in a.steps[-1].actions
    assert "witness.superseded" in a.alerts()


def test_a_demotion_releases_the_key() -> None:
    a = witness_active()
    s = a.feed(FenceRequest(2, (PEER, 1)), at=a.now + 1.0)
    assert a.role() is Role.DEMOTING
    assert AskWitness("release") in s.actions
    assert not a.state.lease.mine


def test_the_passive_takes_over_by_the_witness_once_the_lease_ended() -> None:
    a = _script_witness_failover()
    s = a.steps[-1]
    assert a.role() is Role.ACTIVE and a.state.epoch == 57
    acts = list(s.actions)
    assert index(acts, PersistRole) < index(acts, StartService)
    assert acts[index(acts, PersistRole)] == PersistRole(Role.ACTIVE, 57)
    assert "failover.done" in a.alerts()


def test_the_passive_waits_for_the_quiet_time_and_for_the_lease_to_end() -> None:
    a = witness_passive()
    t0 = a.now
    a.feed(PeerSilent(), at=t0 + 15.0)
    a.at(t0 + QUIET - 0.5)
    if a.state.lease.asking:
        answer(a, "look")  # absent already, but not quiet long enough
    a.at(t0 + QUIET - 0.1)
    assert "acquire" not in asked(a)
    a.at(t0 + QUIET)
    answer(a, holder="join-a", revision=7, left=12.0)  # the active's lease still runs
    a.at(a.now + 5.0)
    assert "acquire" not in asked(a)
    a.at(a.now + 8.0)
    answer(a, "look")
    a.at(a.now + WITNESS_RETRY)
    assert asked(a)[-1] == "acquire"


@pytest.mark.parametrize(
    ("heartbeat", "reachable", "reason"),
    [
        ({"planned_stop": True, "lag": 0}, True, "failover.held_planned_stop"),
        ({"maintenance": True, "lag": 0}, True, "failover.held_maintenance"),
        ({"lag": 101}, True, "failover.held_lag"),
        ({"caught_up": False}, True, "failover.held_lag"),
        ({"lag": 0}, False, "failover.held_witness_unreachable"),
    ],
)
def test_the_passive_does_not_take_over_by_the_witness_when(
    heartbeat: dict[str, Any], reachable: bool, reason: str
) -> None:
    a = passive(WITNESS)
    a.peer(Role.ACTIVE, 1, **heartbeat)
    t0 = a.now
    a.feed(PeerSilent(), at=t0 + 15.0)
    silent = len(a.steps)
    for t in range(16, 200, 2):
        a.at(t0 + t)
        if a.state.lease.asking:
            answer(a, reachable=reachable)
    assert "acquire" not in asked(a) and a.role() is Role.PASSIVE
    said = [x.event for x in a.actions(silent) if isinstance(x, Alert)]
    assert said.count(reason) == 1, said


def test_a_heartbeat_during_the_acquisition_gives_the_key_back() -> None:
    a = witness_passive()
    t0 = a.now
    a.feed(PeerSilent(), at=t0 + 15.0)
    a.at(t0 + QUIET)
    answer(a, "look")
    a.at(a.now + WITNESS_RETRY)
    assert asked(a)[-1] == "acquire"
    a.peer(Role.ACTIVE, 1, lag=0)  # the active was only slow
    s = answer(a, "acquire", holder="join-b", mine=True, revision=57, left=30.0)
    assert a.role() is Role.PASSIVE and AskWitness("release") in s.actions
    assert not any(isinstance(x, StartService) for x in s.actions)


def test_an_unreachable_witness_never_promotes_a_passive() -> None:
    a = witness_passive()
    t0 = a.now
    a.feed(PeerSilent(), at=t0 + 15.0)
    for t in range(16, 600, 3):
        a.at(t0 + t)
        if a.state.lease.asking:
            answer(a, reachable=False, error="deadline exceeded")
    assert a.role() is Role.PASSIVE and "acquire" not in asked(a)


def test_a_proven_promotion_starts_the_service_only_with_the_key() -> None:
    a = witness_passive()
    a.feed(Failover())
    r = request_of(a)
    a.feed(FenceAck(r.epoch, r.token, drained=True))
    assert a.role() is Role.PROMOTING and a.state.promotion is not None and a.state.promotion.proven
    answer(a, "acquire", holder="join-a", revision=7, left=29.0)  # the old active has not released it yet
    for t in (1.0, 2.0, 3.0):
        a.at(a.now + t)
        if a.state.lease.asking:
            answer(a, reachable=False)
    assert a.role() is Role.PROMOTING, "no deadline abandons a proven promotion"
    assert not any(isinstance(x, StartService) for x in a.actions())
    a.at(a.now + 1.0)
    s = answer(a, "acquire", holder="join-b", mine=True, revision=58, left=30.0)
    assert a.role() is Role.ACTIVE and PersistRole(Role.ACTIVE, 58) in s.actions
    assert index(list(s.actions), PersistRole) < index(list(s.actions), StartService)


def test_force_does_not_wait_for_the_key_and_keeps_running_without_it() -> None:
    a = witness_passive()
    a.feed(Failover())
    r = request_of(a)
    a.feed(FenceAck(r.epoch, r.token, drained=True))
    answer(a, "acquire", reachable=False)
    a.feed(Failover(force=True))
    assert a.role() is Role.ACTIVE and a.state.lease.forced
    n = len(a.steps)
    for _ in range(1, 60):
        a.at(a.now + 1.0)
        if a.state.lease.asking:
            answer(a, reachable=False)
    assert not any(isinstance(x, StopService) for x in a.actions(n))


def test_a_restarting_active_steps_down_when_the_witness_has_another_holder() -> None:
    a = waiting(WITNESS, epoch=3)
    a.feed(PeerSilent(), at=FAILSAFE_WINDOW + WITNESS.witness_margin)
    answer(a, "look", holder="join-b", revision=57, left=20.0)
    assert a.role() is Role.DEMOTING and PersistRole(Role.FENCED, 57) in a.steps[-1].actions
    assert not any(isinstance(x, StartService) for x in a.actions())


def test_a_restarting_active_waits_for_its_own_stale_key() -> None:
    a = waiting(WITNESS, epoch=3)
    a.feed(PeerSilent(), at=FAILSAFE_WINDOW + WITNESS.witness_margin)
    answer(a, "look", holder="join-a", stale_self=True, revision=5, left=20.0)
    assert a.role() is Role.PROMOTING
    a.at(a.now + 5.0)
    assert asked(a)[-1] == "look" and a.role() is Role.PROMOTING


def test_a_passive_or_fenced_node_that_finds_itself_holding_the_key_releases_it() -> None:
    a = Agent(WITNESS, role=Role.FENCED, epoch=2)
    a.stopped()
    a.at(1.0)
    s = answer(a, "look", holder="join-b", mine=True, revision=9, left=20.0)
    assert AskWitness("release") in s.actions


def test_a_host_that_refuses_connections_holds_the_witness_failover_until_it_stops_answering() -> None:
    a = witness_passive()
    t0 = a.now
    for t in range(15, 120):  # the active's agent died, its host is up: every dial is refused
        a.feed(PeerSilent(refused=True), at=t0 + t)
        if a.state.lease.asking:
            answer(a, "look")
    assert "acquire" not in asked(a) and "failover.held_agent_down" in a.alerts()
    n = len(a.steps)
    gone = a.now + 1.0  # now it answers nothing: the host is gone too (or its agent is about to be heard)
    while a.now + 1.0 < gone - 1.0 + FAILSAFE_WINDOW + WITNESS.witness_margin:
        a.feed(PeerSilent(refused=False), at=a.now + 1.0)
        if a.state.lease.asking == "look":
            answer(a, "look")
    assert "acquire" not in asked(a, n), "held as long as a confirmation could last"
    for _ in range(4):
        a.feed(PeerSilent(refused=False), at=a.now + 1.0)
        if a.state.lease.asking == "look":
            answer(a, "look")
    assert "acquire" in asked(a, n)


def test_without_a_peer_silent_the_witness_path_does_not_start() -> None:
    """Rule 9 waits for the caller's PeerSilent (the liveness timeout, and whether the host refuses)."""
    a = witness_passive()
    for _ in range(100):
        a.at(a.now + 2.0)
        if a.state.lease.asking:
            answer(a, "look")
    assert "acquire" not in asked(a) and a.role() is Role.PASSIVE


def test_a_restarting_active_never_takes_the_key_alone() -> None:
    """Rule 10: the peer may have been forced active without reaching the witness; rule 4 stands."""
    a = waiting(WITNESS)
    for t in range(15, 300):
        a.feed(PeerSilent(), at=float(t))
        if a.state.lease.asking:
            answer(a, "look")  # nobody holds the key
    assert "acquire" not in asked(a) and a.role() is Role.PROMOTING
    assert not any(isinstance(x, StartService) for x in a.actions())


def _lease_lost(a: Agent) -> None:
    """The witness goes away; the active's lease runs out (no peer confirms it): it stops its service."""
    t0 = a.now
    for t in range(1, 22):
        a.at(t0 + t)
        if a.state.lease.asking:
            answer(a, reachable=False)
    assert a.state.lease.suspended and "witness.lease_lost" in a.alerts()


def test_a_failed_stop_for_want_of_the_lease_is_tried_again() -> None:
    a = witness_active()
    _lease_lost(a)
    a.feed(ServiceResult(ServiceOp.STOP, False, "access denied"))
    n = len(a.steps)
    for _t in range(1, int(POLICY.service_retry) + 2):
        a.at(a.now + 1.0)
        if a.state.lease.asking:
            answer(a, reachable=False)
    assert StopService() in a.actions(n), "the stop is retried"
    a.stopped()
    a.feed(LocalService(RUNNING, a.now), at=a.now + 1.0)  # someone started it by hand
    assert StopService() in a.steps[-1].actions


def test_an_operator_cannot_restart_a_service_held_stopped_for_want_of_the_lease() -> None:
    a = witness_active()
    _lease_lost(a)
    a.stopped()
    s = a.feed(Failover(force=True))
    assert StartService() not in s.actions and "command.refused" in a.alerts()


def test_a_rollback_without_lease_or_confirmation_does_not_start_the_service() -> None:
    a = witness_active()
    a.peer(Role.PASSIVE, 1, echo_at=a.now)
    a.feed(Switchover())
    a.stopped()
    assert a.state.handover is not None
    for _t in range(1, 200):  # the witness and the peer are gone: the handover times out
        a.at(a.now + 1.0)
        if a.state.lease.asking:
            answer(a, reachable=False)
        if a.state.reachable and a.now > 30:
            a.feed(PeerSilent())
    assert "switchover.rolled_back" in a.alerts()
    assert not any(isinstance(x, StartService) for x in a.actions(len(a.steps) - 150))
    assert a.state.lease.suspended


def test_start_alone_with_a_witness_waits_for_the_key() -> None:
    a = waiting(dataclasses.replace(WITNESS, start_alone_after=60.0))
    a.feed(PeerSilent(), at=15.0)
    for t in range(16, 62):
        a.at(float(t))
        if a.state.lease.asking:
            answer(a, "look")  # nobody holds the key (a restarting node never takes it for that)
    assert a.role() is Role.ACTIVE and a.state.lease.suspended
    assert not any(isinstance(x, StartService) for x in a.actions())
    for _ in range(12):
        if a.state.lease.asking == "acquire":
            break
        if a.state.lease.asking:
            answer(a, "look")
        a.at(a.now + WITNESS_RETRY)
    s = answer(a, "acquire", holder="join-a", mine=True, revision=12, left=30.0)
    assert StartService() in s.actions


def test_a_forced_active_waits_out_a_dead_holders_lease_before_stepping_down() -> None:
    a = witness_passive()
    a.feed(PeerSilent(), at=a.now + 15.0)
    a.feed(Failover(force=True))
    assert a.role() is Role.ACTIVE and a.state.lease.forced
    a.at(a.now + 0.5)
    answer(a, holder="join-a", revision=7, left=6.0)  # what is left of the dead active's lease
    assert a.role() is Role.ACTIVE
    a.at(a.now + 7.0)
    answer(a, "look")  # it ended: the key is free
    assert a.role() is Role.ACTIVE
    b = witness_passive()
    b.feed(PeerSilent(), at=b.now + 15.0)
    b.feed(Failover(force=True))
    b.at(b.now + 0.5)
    answer(b, holder="join-a", revision=7, left=6.0)
    b.at(b.now + 7.0)
    answer(b, holder="join-a", revision=7, left=29.0)  # renewed: a live holder
    assert b.role() is Role.DEMOTING


def test_a_confirmation_echoing_a_time_this_boot_never_sent_is_no_confirmation() -> None:
    a = witness_active()
    a.now += 20.0
    a.peer(Role.PASSIVE, 1, echo_at=a.now + 100.0)  # from before a clock reset
    assert StopService() in a.actions(len(a.steps) - 2)


# ---- the witness in the two-node simulation ---------------------------------------------------------------

SIM_WITNESS = dataclasses.replace(
    SIM_POLICY,
    witness=True,
    # What a witness assumes (README, "A witness"): a crashed agent is back, and has stopped its service,
    # before its lease could end (the simulation: back within 15 s, a stop within 4 s; the lease renewed
    # every 3 s ends 30 s after); and safety_margin is longer than a stop takes.
    witness_ttl=30.0,
    witness_margin=8.0,
    witness_interval=3.0,
    failover_after=10.0,
)
#: The hostile schedule plus a witness that goes down and is cut from one node at a time. Service stops
#: never fail here: a stop that keeps failing defeats any lease, which is what safety_margin assumes away.
WITNESS_STORM = dataclasses.replace(HOSTILE, witness_down=0.005, witness_cut=0.005, op_fail=0.0)


def test_simulation_with_a_witness_never_runs_two_services_and_recovers() -> None:
    """Safety with the witness under the storm, then liveness once the faults stop."""
    moves = storm(seeds(40, 1000), WITNESS_STORM, lambda seed: SIM_WITNESS)
    events = {m.event for m in moves}
    assert {"promote.witness", "demote.witness", "promote.proven"} <= events, events


def test_simulation_with_a_witness_fails_over_when_the_active_host_dies() -> None:
    """Liveness without a fence command: the active's host dies for good; the passive's service runs once
    the silence, the quiet time and the old lease are over, and never while the old one ran."""
    bound = (
        SILENCE
        + SIM_WITNESS.witness_ttl
        + max(SIM_WITNESS.failover_after, FAILSAFE_WINDOW + SIM_WITNESS.witness_margin)
    )
    for seed in seeds(10, 200):
        sim = Sim(seed, Faults(), SIM_WITNESS)
        assert sim.run_until(lambda s=sim: s.running() == [True, False], 30.0) is not None, sim.describe()
        sim.run(5.0)
        sim.crash_host(0)
        sim.nodes[0].restart_at = 10_000.0
        took = sim.run_until(lambda s=sim: s.running()[1], bound + 30.0)
        assert took is not None and took <= bound + 4.0, f"took {took} (bound {bound})\n{sim.describe()}"
        assert sim.roles()[1] is Role.ACTIVE and not sim.violations
        assert sim.witness is not None and sim.witness.key is not None and sim.witness.key[0] == 1


def test_simulation_witness_down_keeps_the_active_running_on_its_peers_word() -> None:
    for seed in seeds(10, 200):
        sim = Sim(seed, Faults(), SIM_WITNESS)
        assert sim.run_until(lambda s=sim: s.running() == [True, False], 30.0) is not None, sim.describe()
        w = sim.witness
        assert w is not None
        assert sim.run_until(lambda w=w: w.key is not None and w.key[0] == 0, 30.0) is not None
        w.down_until = sim.now + 200.0
        sim.run(150.0)
        assert sim.running() == [True, False] and sim.roles() == [Role.ACTIVE, Role.PASSIVE], sim.describe()
        assert "witness.failsafe" in [a.event for a in sim.nodes[0].alerts]
        assert not sim.violations
