"""Two role machines in a simulated world, driven by a seeded random scheduler.

The world: a message channel that delays, drops, duplicates, reorders and partitions; services that
start and stop late, fail to and crash; hosts that crash (service and agent die, only what PersistRole
wrote survives, even when the crash falls between two actions of one step); agents that crash or stop
gracefully while their service runs on; a fence command that really powers the other host off, or
fails; operators that fail over, force (only while the other host is really down), open and close
maintenance windows and rejoin fenced nodes. With ``Policy.witness``, a witness (a model of etcd: one key,
leases that end, a revision counter) that goes down, or is cut from one node, and whose writes may apply
with their answer lost.

The simulation checks, as it runs, what must never happen (``Sim.violations``): two services running at
once; an epoch on disk going back; StartService run while the disk does not say active at the node's
epoch; a fenced node starting its service or becoming a sender. Tests read ``violations`` and the
per-node records.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from engine.failover import (
    Action,
    Alert,
    AskWitness,
    BecomeReceiver,
    BecomeSender,
    Event,
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
    StopReplication,
    StopService,
    Switchover,
    Transition,
    TreeMeasured,
    WitnessAnswer,
    beat,
    start,
    step,
    tick,
)
from engine.failover import Failover as FailoverCommand


@dataclass(frozen=True)
class Offer:
    """OfferHandover on the wire (the agent relays it as a command)."""

    epoch: int


Message = Heartbeat | FenceRequest | FenceAck | Offer | HandoverAnswer

DT = 0.5  # one scheduler round, seconds
BEAT_EVERY = 1.0
OBSERVE_EVERY = 2.0
SILENCE = 3.0  # the caller's liveness timeout: PeerSilent after this long without a heartbeat

#: A policy scaled to the simulation's clock.
SIM_POLICY = Policy(
    failover_after=10.0,
    flap_window=120.0,
    fence_timeout=5.0,
    fence_retry=1.0,
    drain_timeout=3.0,
    service_retry=2.0,
)


@dataclass
class Faults:
    drop: float = 0.0  # per message
    dup: float = 0.0  # per message
    delay: tuple[float, float] = (0.05, 0.3)
    late: float = 0.0  # per message: delivered 5..60 s late (a stalled buffer), after restarts
    op_time: tuple[float, float] = (0.2, 1.0)  # a service start or stop takes this long
    op_fail: float = 0.0  # a service start or stop fails (nothing changes)
    partition: float = 0.0  # per round: a partition begins (lasts 2..40 s)
    host_crash: float = 0.0  # per round, per node (down 3..40 s)
    agent_crash: float = 0.0  # per round, per node: the agent dies, the service runs on (down 1..15 s)
    service_crash: float = 0.0  # per round, per running service
    mid_step_crash: float = 0.0  # per action: the host crashes before the next action of the step
    operator: float = 0.0  # per round: one random operator command
    switchover: float = 0.0  # per round: a manual failover or a switchover, asked of a random node
    fence_ok: float = 0.75  # the fence command powers the other host off and exits 0
    witness_down: float = 0.0  # per round: the witness is down (2..40 s)
    witness_cut: float = 0.0  # per round, per node: the node cannot reach the witness (2..40 s)


@dataclass
class SimService:
    running: bool = False
    changed_at: float = 0.0
    queue: list[tuple[ServiceOp, int]] = field(default_factory=list)  # (op, boot of the agent that asked)
    done_at: float | None = None  # when the head of the queue finishes


@dataclass
class SimNode:
    name: str
    initial: Role
    host_up: bool = True
    agent: Node | None = None
    boot: int = 0
    disk: tuple[Role, int] | None = None
    disk_epochs: list[int] = field(default_factory=list)
    service: SimService = field(default_factory=SimService)
    last_heard: float = 0.0
    silent_told: bool = False
    next_beat: float = 0.0
    next_observe: float = 0.0
    restart_at: float | None = None
    peer_at: float | None = None  # ``at`` of the last heartbeat delivered from the peer (echoed back)
    witness_cut_until: float = -1.0
    alerts: list[Alert] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    moves: list[Transition] = field(default_factory=list)


@dataclass(order=True)
class InFlight:
    at: float
    seq: int
    dst: int = field(compare=False)
    msg: Message = field(compare=False)


@dataclass
class SimWitness:
    """etcd as the role machine needs it: one leader key bound to a lease, and a revision counter."""

    ttl: float
    revision: int = 0
    key: tuple[int, int, int] | None = None  # (holder node, lease, create revision)
    leases: dict[int, float] = field(default_factory=dict)  # lease -> when it ends
    client: dict[int, int | None] = field(default_factory=lambda: {0: None, 1: None})  # the agent's lease
    next_lease: int = 0
    down_until: float = -1.0

    def expire(self, now: float) -> None:
        for lease, end in list(self.leases.items()):
            if end <= now:
                del self.leases[lease]
        if self.key is not None and self.key[1] not in self.leases:
            self.key = None

    def view(self, i: int, op: str, now: float) -> WitnessAnswer:
        mine = self.key is not None and self.key[0] == i and self.key[1] == self.client[i]
        left = None if self.key is None else self.leases[self.key[1]] - now
        return WitnessAnswer(
            op,
            now,
            True,
            holder=None if self.key is None else "ab"[self.key[0]],
            mine=mine,
            stale_self=self.key is not None and self.key[0] == i and not mine,
            revision=None if self.key is None else self.key[2],
            left=left,
        )

    def apply(self, i: int, op: str, now: float) -> WitnessAnswer:
        """What ``op`` does at etcd now, as ``engine.witness`` asks it; the view it answers."""
        self.expire(now)
        lease = self.client[i]
        ours = self.key is not None and self.key[0] == i and self.key[1] == lease
        if op == "acquire" and not ours:
            if lease is not None:
                self.leases.pop(lease, None)
                self.client[i] = None
                self.expire(now)
            if self.key is None:
                self.next_lease += 1
                self.revision += 1
                self.leases[self.next_lease] = now + self.ttl
                self.client[i] = self.next_lease
                self.key = (i, self.next_lease, self.revision)
        elif op == "renew" and lease is not None:
            if lease in self.leases and ours:
                self.leases[lease] = now + self.ttl
            else:
                self.leases.pop(lease, None)
                self.client[i] = None
                self.expire(now)
        elif op == "release" and lease is not None:
            if ours:
                self.key = None
            self.leases.pop(lease, None)
            self.client[i] = None
        return self.view(i, op, now)


@dataclass
class WitnessCall:
    effect_at: float
    answer_at: float
    node: int
    boot: int
    op: str
    asked_at: float
    answer: WitnessAnswer | None = None


@dataclass
class FenceRun:
    at: float
    issuer: int
    boot: int


class Sim:
    def __init__(self, seed: int, faults: Faults, policy: Policy = SIM_POLICY) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.faults = faults
        self.policy = policy
        self.now = 0.0
        self.nodes = [SimNode("a", Role.ACTIVE), SimNode("b", Role.PASSIVE)]
        self.flight: list[InFlight] = []
        self.fence_runs: list[FenceRun] = []
        self.results: list[tuple[float, int, int, Event]] = []  # (at, node, boot, event): local I/O results
        self.partition_until = -1.0
        self.boots = 0
        self.seq = 0
        self.violations: list[str] = []
        self.both_running_for = 0.0
        self.witness = SimWitness(policy.witness_ttl) if policy.witness else None
        self.calls: list[WitnessCall] = []
        for i in (0, 1):
            self.start_agent(i)

    # ---- the world ------------------------------------------------------------------------------------
    def other(self, i: int) -> int:
        return 1 - i

    def partitioned(self) -> bool:
        return self.now < self.partition_until

    def violation(self, what: str) -> None:
        self.violations.append(f"seed={self.seed} t={self.now:.1f}: {what}")

    def check_services(self) -> None:
        a, b = self.nodes
        if a.service.running and b.service.running:
            roles = [n.agent.role.value if n.agent else "down" for n in self.nodes]
            self.violation(f"both services running (agents: {roles})")

    def start_agent(self, i: int) -> None:
        n = self.nodes[i]
        self.boots += 1
        n.boot = self.boots
        n.restart_at = None
        n.last_heard = self.now
        n.silent_told = False
        n.next_beat = self.now
        n.next_observe = self.now
        role, epoch = n.disk if n.disk is not None else (None, 0)
        s = start(self.policy, Started(n.boot, role, epoch, n.initial), self.now)
        n.agent = s.state
        self.apply(i, s)

    def crash_host(self, i: int) -> None:
        n = self.nodes[i]
        if not n.host_up:
            return
        n.host_up = False
        n.agent = None
        n.service.running = False
        n.service.changed_at = self.now
        n.service.queue.clear()
        n.service.done_at = None
        n.restart_at = self.now + self.rng.uniform(3.0, 40.0)
        n.log.append(f"{self.now:.1f} host.crash")
        if self.witness is not None:
            self.witness.client[i] = None  # the agent's lease is forgotten; etcd keeps it until it ends

    def crash_agent(self, i: int, down_for: float | None = None, graceful: bool = False) -> None:
        n = self.nodes[i]
        if n.agent is None:
            return
        n.agent = None
        if not graceful:  # a graceful stop waits for its service actions; they finish without it
            del n.service.queue[1:]  # an operation already handed to the service manager finishes
        n.restart_at = self.now + (down_for if down_for is not None else self.rng.uniform(1.0, 15.0))
        n.log.append(f"{self.now:.1f} agent.crash")
        if self.witness is not None:
            self.witness.client[i] = None

    def send(self, src: int, msg: Message) -> None:
        f = self.faults
        if self.partitioned() or self.rng.random() < f.drop:
            return
        copies = 2 if self.rng.random() < f.dup else 1
        for _ in range(copies):
            self.seq += 1
            late = self.rng.random() < f.late
            at = self.now + (self.rng.uniform(5.0, 60.0) if late else self.rng.uniform(*f.delay))
            self.flight.append(InFlight(at, self.seq, self.other(src), msg))

    def feed(self, i: int, event: Event) -> None:
        n = self.nodes[i]
        if n.agent is None:
            return
        self.apply(i, step(n.agent, event, self.now))

    def apply(self, i: int, s: Step) -> None:
        """Run a step's actions in order, as ``node`` would; the host may crash between two of them."""
        n = self.nodes[i]
        n.agent = s.state
        n.moves.extend(s.moves)
        n.log.extend(f"{self.now:.1f} {line}" for line in s.log)
        if s.state.role is Role.FENCED and any(isinstance(a, StartService | BecomeSender) for a in s.actions):
            self.violation(f"{n.name}: a fenced node asked to start its service or send")
        boot = n.boot
        for a in s.actions:
            if n.agent is None or n.boot != boot:
                return  # crashed mid-step: the rest never ran
            self.run_action(i, a)
            if self.rng.random() < self.faults.mid_step_crash:
                self.crash_host(i)

    def run_action(self, i: int, a: Action) -> None:
        n = self.nodes[i]
        agent = n.agent
        assert agent is not None
        match a:
            case PersistRole(role=role, epoch=epoch):
                if n.disk_epochs and epoch < n.disk_epochs[-1]:
                    self.violation(f"{n.name}: epoch on disk went back {n.disk_epochs[-1]} -> {epoch}")
                n.disk = (role, epoch)
                n.disk_epochs.append(epoch)
            case StartService():
                if n.disk != (Role.ACTIVE, agent.epoch):
                    self.violation(f"{n.name}: StartService with disk {n.disk}, epoch {agent.epoch}")
                self.queue_op(i, ServiceOp.START)
            case StopService():
                self.queue_op(i, ServiceOp.STOP)
            case RequestFence() | SendFenceAck():
                self.send(
                    i,
                    FenceRequest(a.epoch, a.token)
                    if isinstance(a, RequestFence)
                    else FenceAck(a.epoch, a.token, a.drained),
                )
            case RunFenceCommand():
                self.fence_runs.append(FenceRun(self.now + self.rng.uniform(0.5, 3.0), i, n.boot))
            case Quarantine():
                self.later(i, Quarantined(ok=self.rng.random() >= self.faults.op_fail, files=0))
            case MeasureTree():
                self.later(i, TreeMeasured("same-tree", 1))
            case OfferHandover(epoch=epoch):
                self.send(i, Offer(epoch))
            case AskWitness(op=op):
                d1, d2 = self.rng.uniform(0.01, 0.6), self.rng.uniform(0.01, 0.6)
                self.calls.append(WitnessCall(self.now + d1, self.now + d1 + d2, i, n.boot, op, self.now))
            case Alert():
                n.alerts.append(a)
            case SetManual() | BecomeSender() | BecomeReceiver() | StopReplication():
                pass

    def later(self, i: int, ev: Event) -> None:
        """The result of a local action (a quarantine, a tree digest), a moment later to this boot."""
        self.results.append((self.now + self.rng.uniform(0.1, 2.0), i, self.nodes[i].boot, ev))

    def offered(self, i: int, offer: Offer) -> None:
        """What the agent does with an offer: checks the machine would take it, hands it over, answers.
        The simulated trees are always equal once the active drained."""
        agent = self.nodes[i].agent
        assert agent is not None
        peer = agent.peer
        ok = agent.role is Role.PASSIVE and peer is not None and peer.role is Role.ACTIVE
        if ok:
            self.feed(i, HandoverAccepted(offer.epoch))
        self.send(i, HandoverAnswer(ok, reason="" if ok else "not passive"))

    def queue_op(self, i: int, op: ServiceOp) -> None:
        svc = self.nodes[i].service
        svc.queue.append((op, self.nodes[i].boot))
        if svc.done_at is None:
            svc.done_at = self.now + self.rng.uniform(*self.faults.op_time)

    def reaches_witness(self, i: int) -> bool:
        w = self.witness
        return w is not None and self.now >= w.down_until and self.now >= self.nodes[i].witness_cut_until

    def witness_round(self) -> None:
        """Witness calls take effect (if the node reaches etcd then) and are answered (unreachable if it does
        not reach it at either moment: a write may apply with its answer lost)."""
        w = self.witness
        if w is None:
            return
        w.expire(self.now)
        for call in list(self.calls):
            caller = self.nodes[call.node]
            alive = caller.boot == call.boot and caller.agent is not None
            if (
                call.answer is None
                and call.effect_at <= self.now
                and self.reaches_witness(call.node)
                and alive
            ):
                call.answer = w.apply(call.node, call.op, self.now)
            if call.answer_at > self.now:
                continue
            self.calls.remove(call)
            n = self.nodes[call.node]
            if n.agent is None or n.boot != call.boot:
                continue
            ok = call.answer is not None and self.reaches_witness(call.node)
            ans = (
                replace(call.answer, asked_at=call.asked_at)
                if ok and call.answer is not None
                else WitnessAnswer(call.op, call.asked_at, False, error="unreachable")
            )
            self.feed(call.node, ans)

    # ---- one round ------------------------------------------------------------------------------------
    def round(self) -> None:
        self.now += DT
        f = self.faults
        self.inject_faults()
        for i, n in enumerate(self.nodes):
            if not n.host_up and n.restart_at is not None and self.now >= n.restart_at:
                n.host_up = True
                self.start_agent(i)
            elif n.host_up and n.agent is None and n.restart_at is not None and self.now >= n.restart_at:
                self.start_agent(i)
        for i, n in enumerate(self.nodes):
            svc = n.service
            while n.host_up and svc.done_at is not None and svc.done_at <= self.now and svc.queue:
                op, boot = svc.queue.pop(0)
                ok = self.rng.random() >= f.op_fail
                if ok and svc.running != (op is ServiceOp.START):
                    svc.running = op is ServiceOp.START
                    svc.changed_at = self.now
                    self.check_services()
                svc.done_at = self.now + self.rng.uniform(*f.op_time) if svc.queue else None
                if n.agent is not None and n.boot == boot:
                    self.feed(i, ServiceResult(op, ok, "" if ok else "simulated failure"))
        due = sorted(m for m in self.flight if m.at <= self.now)
        self.flight = [m for m in self.flight if m.at > self.now]
        for m in due:
            if self.partitioned():
                continue
            dst = self.nodes[m.dst]
            if dst.agent is None:
                continue
            if isinstance(m.msg, Heartbeat):
                dst.last_heard = self.now
                dst.silent_told = False
                dst.peer_at = m.msg.at
            if isinstance(m.msg, Offer):
                self.offered(m.dst, m.msg)
            else:
                self.feed(m.dst, m.msg)
        for r in [r for r in self.results if r[0] <= self.now]:
            self.results.remove(r)
            _, i, boot, ev = r
            if self.nodes[i].agent is not None and self.nodes[i].boot == boot:
                self.feed(i, ev)
        self.witness_round()
        for run in [r for r in self.fence_runs if r.at <= self.now]:
            self.fence_runs.remove(run)
            ok = self.rng.random() < f.fence_ok
            if ok:
                self.crash_host(self.other(run.issuer))
            issuer = self.nodes[run.issuer]
            if issuer.agent is not None and issuer.boot == run.boot:
                self.feed(run.issuer, FenceCommandResult(0 if ok else 1))
        for i, n in enumerate(self.nodes):
            if n.agent is None:
                continue
            if self.now - n.last_heard >= SILENCE and (not n.silent_told or self.now >= n.next_beat):
                n.silent_told = True  # again every beat while it lasts, with what a dial would find
                other = self.nodes[self.other(i)]
                refused = not self.partitioned() and other.host_up and other.agent is None
                self.feed(i, PeerSilent(refused=refused))
            if n.agent is not None and self.now >= n.next_observe:
                n.next_observe = self.now + OBSERVE_EVERY
                state = ServiceState.RUNNING if n.service.running else ServiceState.STOPPED
                self.feed(i, LocalService(state, n.service.changed_at))
            if n.agent is not None and n.agent.role in (Role.ACTIVE, Role.DEMOTING):
                peer = self.nodes[self.other(i)]
                up = peer.agent is not None and not self.partitioned()
                self.feed(i, Replication(up, idle=up))
            if n.agent is not None:
                self.apply(i, tick(n.agent, self.now))
            if n.agent is not None and self.now >= n.next_beat:
                n.next_beat = self.now + BEAT_EVERY
                self.send(i, self.heartbeat(i))

    def inject_faults(self) -> None:
        f, rng = self.faults, self.rng
        if not self.partitioned() and rng.random() < f.partition:
            self.partition_until = self.now + rng.uniform(2.0, 40.0)
        w = self.witness
        if w is not None and self.now >= w.down_until and rng.random() < f.witness_down:
            w.down_until = self.now + rng.uniform(2.0, 40.0)
        for i, n in enumerate(self.nodes):
            if w is not None and self.now >= n.witness_cut_until and rng.random() < f.witness_cut:
                n.witness_cut_until = self.now + rng.uniform(2.0, 40.0)
            if n.host_up and rng.random() < f.host_crash:
                self.crash_host(i)
            if n.agent is not None and rng.random() < f.agent_crash:
                self.crash_agent(i)
            if n.service.running and rng.random() < f.service_crash:
                self.crash_service(i)
        if rng.random() < f.operator:
            self.operator()
        if rng.random() < f.switchover:  # fenced nodes are rejoined, so that switchovers go on
            i = rng.randrange(2)
            agent = self.nodes[i].agent
            fenced = agent is not None and agent.role is Role.FENCED
            planned = not fenced and rng.random() < 0.5
            what = "rejoin" if fenced else "switchover" if planned else "failover"
            self.nodes[i].log.append(f"{self.now:.1f} operator.{what}")
            if planned:
                # The agent asked on the passive relays a switchover to the active.
                j = i if agent is not None and agent.role is Role.ACTIVE else self.other(i)
                if j == i or not self.partitioned():
                    self.feed(j, Switchover())
            else:
                self.feed(i, Rejoin() if fenced else FailoverCommand())

    def heartbeat(self, i: int) -> Heartbeat:
        """What the agent sends: the role machine's beat, plus the echo and the lag ``node`` adds."""
        n = self.nodes[i]
        assert n.agent is not None
        hb = beat(n.agent, self.now)
        lag = None if n.agent.role is not Role.ACTIVE else 0 if n.agent.caught_up else 5
        return replace(hb, echo_at=n.peer_at, lag=lag)

    def crash_service(self, i: int) -> None:
        n = self.nodes[i]
        n.service.running = False
        n.service.changed_at = self.now
        n.log.append(f"{self.now:.1f} service.crash")
        self.feed(i, LocalService(ServiceState.STOPPED, self.now))

    def operator(self) -> None:
        rng = self.rng
        i = rng.randrange(2)
        n, other = self.nodes[i], self.nodes[self.other(i)]
        if n.agent is None:
            return
        what = rng.choice(["failover", "force", "maintenance", "end", "rejoin", "shutdown"])
        n.log.append(f"{self.now:.1f} operator.{what}")
        if what == "failover":
            self.feed(i, FailoverCommand())
        elif what == "force":
            # The operator asserts the other node is down: modelled only when it really is.
            if not other.host_up:
                self.feed(i, FailoverCommand(force=True))
        elif what == "maintenance":
            self.feed(i, MaintenanceStart(self.now + rng.uniform(5.0, 60.0)))
        elif what == "end":
            self.feed(i, MaintenanceEnd())
        elif what == "rejoin":
            if n.agent.role is Role.FENCED:
                self.feed(i, Rejoin())
        else:
            self.feed(i, Shutdown())
            if n.agent is not None:
                self.send(i, self.heartbeat(i))
            self.crash_agent(i, down_for=rng.uniform(1.0, 20.0), graceful=True)

    # ---- driving --------------------------------------------------------------------------------------
    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            self.round()

    def run_until(self, cond: object, limit: float) -> float | None:
        """Rounds until ``cond()`` holds; the time it took, or None after ``limit`` seconds."""
        assert callable(cond)
        t0 = self.now
        while self.now - t0 < limit:
            if cond():
                return self.now - t0
            self.round()
        return self.now - t0 if cond() else None

    def roles(self) -> list[Role | None]:
        return [n.agent.role if n.agent is not None else None for n in self.nodes]

    def running(self) -> list[bool]:
        return [n.service.running for n in self.nodes]

    def heal(self) -> None:
        """Stop injecting faults and bring everything back (hosts, agents, the network)."""
        self.faults = Faults(delay=self.faults.delay, op_time=self.faults.op_time)
        self.partition_until = -1.0
        if self.witness is not None:
            self.witness.down_until = -1.0
        for i, n in enumerate(self.nodes):
            n.witness_cut_until = -1.0
            if not n.host_up:
                n.host_up = True
                self.start_agent(i)
            elif n.agent is None:
                self.start_agent(i)
            self.feed(i, MaintenanceEnd())

    def describe(self) -> str:
        lines = [f"seed={self.seed} t={self.now:.1f} roles={self.roles()} running={self.running()}"]
        for n in self.nodes:
            lines.append(f"--- {n.name} disk={n.disk}")
            lines.extend(n.log[-40:])
        return "\n".join(lines)
