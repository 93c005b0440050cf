"""The composition root: builds a role's components, runs them in one TaskGroup, stops them in order.

A node replicates as a *sender* (:class:`SenderNode`: intake, link and reconciler over one journal) or as a
*receiver* (:class:`engine.receiver.Receiver`). Stopping is: stop intake, let the link drain (waiting on a
condition, up to DRAIN_SECONDS), cancel, close the journal, save state.

:class:`Agent` (``standby run``) is a node that holds both: it asks the role machine
(:mod:`engine.failover`) which one to be, controls the service, talks to the peer's agent
(:mod:`engine.peer`) and swaps the sender in and out as the machine says.

Must not: be imported by anything but the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from engine import clocks, failover, identity, quarantine, wire
from engine.aio import run_critical
from engine.config import NodeSetup, SenderConfig
from engine.errors import ReplicationError, SafetyHalt
from engine.guards import GuardCheck, receiver_check, sender_check
from engine.journal import RECENT_BYTES, Journal
from engine.peer import PeerChannel
from engine.receiver import Receiver
from engine.rolestate import RoleState
from engine.scan import HashCache, TreeDigest, tree_digest
from engine.sender.intake import Intake
from engine.sender.link import Link
from engine.sender.reconcile import Reconciler
from engine.service import ServiceControl, ServiceError, make_control
from engine.service import ServiceState as ServiceStateOfControl
from engine.status import write_status_quiet
from engine.transport import TlsSettings

log = logging.getLogger(__name__)

#: On a graceful stop, how long the link may take to have everything journaled acknowledged.
DRAIN_SECONDS = 5.0
#: How often the status file is rewritten.
STATUS_INTERVAL = 1.0

COUNTERS = (
    "journaled",
    "unstable_retries",
    "held",
    "forced_max_open",
    "reconciles",
    "overflows",
    "refused_by_receiver",
    "reconnects",
    "silent_peer_drops",
    "journal_read_errors",
    "watch_failures",
    "halts",
    "journal_full",
)


def read_epoch(state_dir: Path) -> int:
    p = state_dir / "epoch"
    try:
        return int(p.read_text("ascii").strip())
    except FileNotFoundError:
        p.write_text("1\n", "ascii")
        return 1
    except ValueError:
        raise ReplicationError(f"{p}: not an epoch number") from None


@dataclass(frozen=True, slots=True)
class SenderStatus:
    """What ``standby status`` shows of a sender (written to the state folder as JSON)."""

    node: str
    peer: str
    peer_node: str
    connected: bool
    epoch: int
    journal: str
    head: int
    sent_seq: int
    acked_seq: int
    lag_records: int | None  # None: not connected since the start, so unknown (not the whole journal)
    lag_seconds: float
    pending_paths: int
    halt: str | None
    watch_error: str | None
    journal_error: str | None
    link_error: str | None
    counters: dict[str, int]
    last_reconcile: dict[str, Any]
    started: float
    source: str
    role: str = "sender"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Stop(Exception):
    pass


class SenderNode:
    """The sender role: watcher hints -> journal -> ordered stream to the receiver."""

    def __init__(
        self,
        cfg: SenderConfig,
        *,
        allow_mass_delete: bool = False,
        check: GuardCheck | None = None,
        close_events: bool | None = None,
        tls: Any = None,
        epoch: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.journal = Journal.open(
            cfg.state_dir / "journal",
            fsync=cfg.fsync,
            segment_bytes=cfg.segment_mb << 20,
            remember=RECENT_BYTES,  # the link's cursor follows the head: it sends from memory
        )
        self.cache = HashCache.load(cfg.state_dir / "hashcache")
        # A node's agent gives the epoch of its durable role; `standby send` keeps its own in state_dir.
        self.epoch = read_epoch(cfg.state_dir) if epoch is None else epoch
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.started = time.time()
        if close_events is None:
            close_events = sys.platform.startswith("linux")
        self.jlock = threading.Lock()
        self.link = Link(
            cfg,
            self.journal,
            self.counters,
            epoch=self.epoch,
            tls=tls,
            on_connect=lambda: self.reconciler.request("connect"),
            on_problem=lambda path, code: self.intake.on_problem(path, code),
            clock=clock,
        )
        self.intake = Intake(
            cfg,
            self.journal,
            self.jlock,
            self.cache,
            self.counters,
            acked=lambda: self.link.acked.seq,
            on_appended=self.link.kick,
            on_reconcile=lambda reason: self.reconciler.request(reason),
            allow_mass_delete=allow_mass_delete,
            check=check,
            close_events=close_events,
            clock=clock,
        )
        self.reconciler = Reconciler(
            cfg,
            self.journal,
            self.cache,
            self.intake,
            self.link,
            self.counters,
            allow_mass_delete=allow_mass_delete,
            check=check,
            clock=clock,
        )

    async def run(self, stop: asyncio.Event) -> None:
        if not self.cfg.source.is_dir():
            raise SafetyHalt(
                f"source root {self.cfg.source} does not exist or is not a folder; refusing to "
                "replicate an empty set over the replica"
            )
        await self.intake.start()
        log.info(
            "send.started source=%s include=%s peer=%s:%d journal=%s head=%d epoch=%d",
            self.cfg.source,
            ",".join(self.cfg.include),
            *self.cfg.peer,
            self.journal.id,
            self.journal.head,
            self.epoch,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.intake.run(), name="intake")
                tg.create_task(self.link.run(), name="link")
                tg.create_task(self.reconciler.run(), name="reconciler")
                tg.create_task(self._status_loop(), name="status")
                tg.create_task(self._stopper(stop), name="stopper")
        except* _Stop:
            pass
        except* ReplicationError as eg:
            raise eg.exceptions[0] from None
        finally:
            await self.intake.close()
            await asyncio.to_thread(self._close)
            log.info("send.stopped head=%d acked=%d", self.journal.head, self.link.acked.seq)

    def _close(self) -> None:
        with self.jlock:
            self.journal.close()
        try:
            self.cache.save(self.cfg.state_dir / "hashcache")  # a no-op if a reconciliation just saved it
        except OSError as e:
            log.warning("hashcache.save_failed error=%s (costs only re-hashing after a restart)", e)
        write_status_quiet(self.cfg.state_dir, self.status())

    async def _stopper(self, stop: asyncio.Event) -> None:
        await stop.wait()
        log.info("send.stopping (intake stopped; draining up to %gs)", DRAIN_SECONDS)
        await self.intake.stop_watching()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_SECONDS):
                await self.link.wait_acked(self.journal.head)
        raise _Stop

    async def _status_loop(self) -> None:
        while True:
            await asyncio.to_thread(write_status_quiet, self.cfg.state_dir, self.status())
            await asyncio.sleep(STATUS_INTERVAL)

    def status(self) -> dict[str, Any]:
        return self.typed_status().to_dict()

    def typed_status(self) -> SenderStatus:
        head = self.journal.head
        link = self.link.status()
        intake = self.intake.status()
        behind = link.behind_since
        lag_s = 0.0 if behind is None or link.acked.seq >= head else time.time() - behind
        last = self.reconciler.last
        return SenderStatus(
            node=self.cfg.node,
            peer="{}:{}".format(*self.cfg.peer),
            peer_node=link.peer_node,
            connected=link.connected,
            epoch=self.epoch,
            journal=self.journal.id,
            head=head,
            sent_seq=link.sent.seq,
            acked_seq=link.acked.seq,
            lag_records=max(0, head - link.acked.seq) if link.connected or link.acked.seq else None,
            lag_seconds=round(lag_s, 3),
            pending_paths=intake.pending_paths,
            halt=intake.halt,
            watch_error=intake.watch_error,
            journal_error=intake.journal_error,
            link_error=link.last_error,
            counters=dict(self.counters),
            last_reconcile={} if last is None else last.to_dict(),
            started=self.started,
            source=str(self.cfg.source),
        )


# ---- the agent: one per server, both roles ----------------------------------------------------------------
#: Test seam: ``STANDBY_CRASH_AFTER=ACTION:ROLE`` (e.g. ``PersistRole:active``) makes the agent kill itself
#: (SIGKILL) right after it has run that action of the role machine while in that role: a crash at an exact
#: step of a promotion, for the kill-loop tests. Never set in production.
CRASH_AFTER = "STANDBY_CRASH_AFTER"

#: Test seam: ``STANDBY_CLOCK_OFFSET=SECONDS`` is added to the UTC time this agent tells its peer (a skewed
#: clock, for the clock-check tests). Never set in production.
CLOCK_OFFSET = "STANDBY_CLOCK_OFFSET"

#: The role machine's transition event names: the log line that starts with one says why a role changed.
_MOVES = frozenset(t.event for t in failover.TRANSITIONS)

#: How often the role machine is ticked, the service looked at and a heartbeat sent.
TICK = 0.5
SERVICE_POLL = 1.0
HEARTBEAT = 1.0


def _service_state(state: ServiceStateOfControl) -> failover.ServiceState:
    if state is ServiceStateOfControl.RUNNING:
        return failover.ServiceState.RUNNING
    if state in (ServiceStateOfControl.STOPPED, ServiceStateOfControl.NOT_FOUND):
        return failover.ServiceState.STOPPED
    return failover.ServiceState.UNKNOWN


class Agent:
    """``standby run``: the node that knows its role, controls the service and fails over.

    One loop takes events (the service as polled, the peer's heartbeats and requests, operator commands,
    the replication's progress, time) one at a time, asks the role machine (:mod:`engine.failover`) what
    to do, and does it in order: ``PersistRole`` is durable (fsync) before the next action runs; service
    starts and stops run one at a time in a worker and come back as ``ServiceResult`` events. The receiver
    listens all along (agents and, while passive, the peer's sender); the sender runs only while active.
    """

    def __init__(self, setup: NodeSetup, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.setup = setup
        self.clock = clock
        n = setup.node
        n.state_dir.mkdir(parents=True, exist_ok=True)
        self.tls: TlsSettings | None = (
            None if n.insecure else TlsSettings(identity.load(n.state_dir), setup.peer.id)
        )
        self.roles = RoleState.open(n.state_dir)
        self.service: ServiceControl = make_control(setup.service)
        self.parts = setup.parts()
        self.receiver = Receiver(setup.receiver(), check=receiver_check(self.parts), tls=self.tls)
        self.receiver.accept_senders = self._accepts_senders
        self.peer = PeerChannel(
            setup.peer.address,
            self.tls,
            n.name,
            silence=setup.receiver().silence_timeout,
            on_event=self._post,
            clock=clock,
        )
        self.receiver.on_agent = self.peer.serve
        self.state: failover.Node | None = None
        self.sender: SenderNode | None = None
        self._sender_task: asyncio.Task[None] | None = None
        self._sender_stop = asyncio.Event()
        self._events: asyncio.Queue[failover.Event] = asyncio.Queue()
        self._service_ops: asyncio.Queue[failover.StopService | failover.StartService] = asyncio.Queue()
        self._last_heartbeat = clock()
        self._silent_said = 0.0
        self._service_seen: tuple[failover.ServiceState, float] | None = None
        self._caught_up: tuple[bool, bool] | None = None
        self.alerts: list[dict[str, Any]] = []
        self._bg: set[asyncio.Task[Any]] = set()
        self._crash_after = os.environ.get(CRASH_AFTER, "")
        self._clock_offset = float(os.environ.get(CLOCK_OFFSET, "0") or 0)
        self._why = "role machine"
        self._peer_beat: tuple[float, float] | None = None  # (its ``at``, our clock when it came)
        self._clock_samples: list[clocks.Sample] = []
        self._clock_problems: tuple[str, ...] = ()
        self._quarantined = 0
        self._quarantine_checked = 0.0
        self._incoming: Any = None  # engine.upgrade.Incoming while an installer arrives
        self.witness: Any = None  # engine.witness.Witness when [witness] is configured

    def _accepts_senders(self) -> bool:
        """Only a passive takes the peer's stream (and one promoting from passive, which still drains the
        old active). A node waiting at start-up with a durable active role, a demoting or a fenced node
        refuses it: their own changes must not be overwritten before a rejoin has set them aside."""
        st = self.state
        if st is None:
            return False
        if st.role is failover.Role.PASSIVE:
            return True
        p = st.promotion
        return st.role is failover.Role.PROMOTING and p is not None and p.kind is not failover.Kind.RESTART

    def _post(self, ev: failover.Event | wire.AgentEvent) -> None:
        if isinstance(ev, failover.Heartbeat):
            self._last_heartbeat = self.clock()
            self._heard(ev)
        if isinstance(ev, wire.AgentBlob):
            self._blob(ev)
            return
        if isinstance(ev, wire.AgentCommand):
            self._spawn(self._relayed(ev))
            return
        if isinstance(ev, wire.AgentReply):
            return
        self._events.put_nowait(ev)

    def _spawn(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    # -- the loop -------------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        boot = await asyncio.to_thread(self.roles.begin_boot)
        facts = await asyncio.to_thread(self.roles.started, self.setup.node.initial_role)
        log.info(
            "agent.started node=%s boot=%d durable_role=%s epoch=%d",
            self.setup.node.name,
            boot,
            facts.durable_role.value if facts.durable_role else "-",
            facts.durable_epoch,
        )
        rx_stop = asyncio.Event()
        served = self._serve_metrics()
        if self.setup.witness is not None:
            from engine.witness import Witness  # grpc is loaded only by a node with a witness

            self.witness = Witness(self.setup.witness)
            await self.witness.connect()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.receiver.serve(rx_stop), name="receiver")
                tg.create_task(self.peer.run(), name="peer")
                tg.create_task(self._service_worker(), name="service")
                tg.create_task(self._decide(facts, stop), name="decide")
        except* _Stop:
            pass
        finally:
            rx_stop.set()
            await self._stop_sender()
            for t in list(self._bg):
                t.cancel()
            if served is not None:
                await asyncio.to_thread(served.close)
            if self.witness is not None:
                await self.witness.close()  # the lease is kept: it ends by itself unless renewed
            self.roles.close()
            log.info("agent.stopped")

    def _serve_metrics(self) -> Any:
        """``[metrics] listen``: Prometheus text, read from :meth:`status` on this loop at each scrape."""
        listen = self.setup.metrics.listen
        if listen is None:
            return None
        from engine import metrics

        getter = metrics.status_on_loop(asyncio.get_running_loop(), self.status)
        try:
            server = metrics.serve(listen, metrics.StatusCollector(getter, self.setup.node.name))
        except OSError as e:
            raise ReplicationError(
                f"metrics -> listen: cannot serve on {listen[0]}:{listen[1]}: {e}"
            ) from None
        log.info("metrics.serving address=%s:%d", *server.address)
        return server

    async def _decide(self, facts: failover.Started, stop: asyncio.Event) -> None:
        first = failover.start(self.setup.policy(), facts, self.clock())
        await self._apply(first)
        next_tick = next_poll = next_beat = self.clock()
        shutting = False
        while True:
            now = self.clock()
            if stop.is_set() and not shutting:
                shutting = True
                await self._feed(failover.Shutdown())
                await self._finish_service_ops()
                await self._send_heartbeat()
                raise _Stop
            self._commands()
            if now >= next_poll:
                next_poll = now + SERVICE_POLL
                await self._poll_service()
            if now >= next_beat:
                next_beat = now + HEARTBEAT
                await self._send_heartbeat()
                self._replication_progress()
                if now - self._last_heartbeat >= self.peer.silence and now - self._silent_said >= 1.0:
                    self._silent_said = now
                    self._events.put_nowait(failover.PeerSilent(refused=self.peer.refused))
            if now >= next_tick:
                next_tick = now + TICK
                self._events.put_nowait(failover.Tick())
            # RACE: only the wait is timed. A step's actions (a PersistRole in a worker thread, say) must
            # never be cut by the timeout: the machine's state already says they ran.
            ev: failover.Event | None = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, min(next_tick, next_poll, next_beat) - self.clock())):
                    ev = await self._events.get()
            if ev is not None:
                await self._feed(ev)
            while not self._events.empty():
                await self._feed(self._events.get_nowait())
            self._write_status()

    async def _finish_service_ops(self) -> None:
        """Before the agent exits: wait (up to the service timeout) for the service actions in flight (the
        stop a Shutdown asked for), feeding their results and whatever else comes meanwhile."""
        deadline = self.clock() + self.setup.service.timeout + 1.0
        while self.state is not None and self.state.service_ops and self.clock() < deadline:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - self.clock())):
                    await self._feed(await self._events.get())

    async def _feed(self, ev: failover.Event) -> None:
        assert self.state is not None
        await self._apply(failover.step(self.state, ev, self.clock()))

    async def _apply(self, st: failover.Step) -> None:
        self.state = st.state
        for line in st.log:
            log.info("%s", line)
        # Why a role is persisted: the decision of this step, as logged (e.g. "promote.proven via=...").
        self._why = next((line for line in st.log if line.split(" ", 1)[0] in _MOVES), "role machine")
        for a in st.actions:
            await self._act(a)

    async def _act(self, a: failover.Action) -> None:
        if isinstance(a, failover.PersistRole):
            # INVARIANT: durable before the next action runs (the role machine's rule 4), and never cut
            # half way by a cancellation (run_critical waits for the thread).
            await run_critical(functools.partial(self.roles.persist, a.role, a.epoch, self._why))
        elif isinstance(a, failover.StartService | failover.StopService):
            self._service_ops.put_nowait(a)
        elif isinstance(a, failover.SetManual):
            self._spawn(self._set_manual())
        elif isinstance(a, failover.RequestFence):
            self.peer.request_fence(a.epoch, a.token)
        elif isinstance(a, failover.SendFenceAck):
            self.peer.fence_ack(a.epoch, a.token, a.drained)
        elif isinstance(a, failover.RunFenceCommand):
            self._spawn(self._fence_command())
        elif isinstance(a, failover.BecomeSender):
            await self._start_sender()
        elif isinstance(a, failover.BecomeReceiver | failover.StopReplication):
            await self._stop_sender()
        elif isinstance(a, failover.Quarantine):
            self._spawn(self._quarantine(a.epoch))
        elif isinstance(a, failover.MeasureTree):
            self._spawn(self._measure_tree())
        elif isinstance(a, failover.OfferHandover):
            self._spawn(self._offer(a))
        elif isinstance(a, failover.AskWitness):
            self._spawn(self._ask_witness(a.op))
        elif isinstance(a, failover.Alert):
            self._alert(a)
        if self._crash_after and self._crash_after == f"{type(a).__name__}:{self._role_now()}":
            log.warning("agent.crash_after step=%s (test seam %s)", self._crash_after, CRASH_AFTER)
            _crash()

    def _role_now(self) -> str:
        return self.state.role.value if self.state is not None else ""

    # -- the service ----------------------------------------------------------------------------------------
    async def _poll_service(self) -> None:
        try:
            st = await asyncio.to_thread(self.service.query)
            state = _service_state(st.state)
        except ServiceError as e:
            log.warning("agent.service_query_failed error=%s", e)
            state = failover.ServiceState.UNKNOWN
        now = self.clock()
        if self._service_seen is None or self._service_seen[0] is not state:
            self._service_seen = (state, now)
        await self._feed(failover.LocalService(state, self._service_seen[1]))

    async def _service_worker(self) -> None:
        """Service starts and stops, one at a time, in the order the role machine asked for them."""
        timeout = self.setup.service.timeout
        while True:
            op = await self._service_ops.get()
            kind = (
                failover.ServiceOp.START if isinstance(op, failover.StartService) else failover.ServiceOp.STOP
            )
            try:
                if kind is failover.ServiceOp.START:
                    await asyncio.to_thread(self.service.start, timeout)
                else:
                    await asyncio.to_thread(self.service.stop, timeout)
                self._events.put_nowait(failover.ServiceResult(kind, True))
            except (ServiceError, ValueError) as e:
                log.error("agent.service_%s_failed error=%s", kind.value, e)
                self._events.put_nowait(failover.ServiceResult(kind, False, str(e)))

    async def _set_manual(self) -> None:
        try:
            await asyncio.to_thread(self.service.set_manual)
        except ServiceError as e:
            log.warning("agent.set_manual_failed error=%s", e)

    async def _fence_command(self) -> None:
        argv = list(self.setup.failover.fence_command)
        try:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL)
            try:
                async with asyncio.timeout(self.setup.service.timeout):
                    code = await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
                code = 124
        except OSError as e:
            log.error("agent.fence_command_failed error=%s", e)
            code = 127
        self._events.put_nowait(failover.FenceCommandResult(code))

    # -- replication ----------------------------------------------------------------------------------------
    async def _start_sender(self) -> None:
        if self._sender_task is not None:
            return
        cfg = self.setup.sender()
        assert self.state is not None
        self.sender = SenderNode(
            cfg, check=sender_check(self.parts), tls=self.tls, epoch=self.state.epoch, clock=self.clock
        )
        self._sender_stop = asyncio.Event()
        self._sender_task = asyncio.ensure_future(self._run_sender(self.sender, self._sender_stop))
        log.info("agent.sending epoch=%d", self.state.epoch)

    async def _run_sender(self, sender: SenderNode, stop: asyncio.Event) -> None:
        try:
            await sender.run(stop)
        except ReplicationError as e:
            log.error("agent.sender_stopped error=%s", e)
            self._alert(failover.Alert("replication.stopped", str(e)))

    async def _stop_sender(self) -> None:
        task, self._sender_task = self._sender_task, None
        if task is None:
            return
        self._sender_stop.set()
        with contextlib.suppress(Exception):
            await task
        self.sender = None
        log.info("agent.sending_stopped")

    def _replication_progress(self) -> None:
        s = self.sender
        if s is None:
            return
        caught = s.link.connected and s.link.acked.seq >= s.journal.head
        idle = caught and s.intake.status().pending_paths == 0
        if (caught, idle) != self._caught_up:
            self._caught_up = (caught, idle)
            self._events.put_nowait(failover.Replication(caught, idle))

    # -- the witness ---------------------------------------------------------------------------------------
    async def _ask_witness(self, op: str) -> None:
        """One witness call; its answer goes back to the role machine (an error is an unreachable answer)."""
        w, name = self.witness, self.setup.node.name
        asked_at = self.clock()
        if w is None:
            return
        try:
            if op in ("look", "acquire"):
                view = await getattr(w, op)(name)
            else:
                view = await getattr(w, op)()
        except Exception as e:  # the answer must come back whatever happened
            log.error("witness.call_failed op=%s error=%r", op, e)
            self._post(failover.WitnessAnswer(op, asked_at, False, error=f"{type(e).__name__}: {e}"))
            return
        if not view.reachable:
            log.warning("witness.unreachable op=%s error=%s", op, view.error)
        self._post(
            failover.WitnessAnswer(
                op,
                asked_at,
                view.reachable,
                holder=view.holder,
                mine=view.mine,
                stale_self=view.holder == name and not view.mine,
                revision=view.create_revision,
                left=view.lease_left,
                error=view.error or "",
            )
        )

    def _witness_status(self) -> dict[str, Any] | None:
        st = self.state
        if self.witness is None or st is None:
            return None
        lease = st.lease
        now = self.clock()
        return {
            "endpoints": list(self.witness.endpoints),
            "key": self.setup.witness.leader_key if self.setup.witness else None,
            "reachable": lease.reachable,
            "holder": lease.holder,
            "mine": lease.mine,
            "revision": lease.revision,
            "lease_left": None
            if lease.left is None or lease.asked_at is None
            else round(max(0.0, lease.asked_at + lease.left - now), 1),
            "asked_ago": None if lease.asked_at is None else round(now - lease.asked_at, 1),
            "failsafe": lease.failsafe,
            "suspended": lease.suspended,
            "forced": lease.forced,
            "error": lease.error or None,
        }

    # -- the peer and the operator --------------------------------------------------------------------------
    async def _send_heartbeat(self) -> None:
        if self.state is None:
            return
        now = self.clock()
        if now - self._quarantine_checked >= 5.0:
            self._quarantine_checked = now
            try:
                self._quarantined = await asyncio.to_thread(
                    quarantine.unacknowledged_files, self.setup.node.state_dir
                )
            except (OSError, ReplicationError) as e:
                log.warning("quarantine.count_failed error=%s", e)
        tz, tz_offset = _local_zone()
        hb = replace(
            failover.beat(self.state, now),
            preferred=self.setup.node.preferred,
            quarantined=self._quarantined,
            utc=time.time() + self._clock_offset,
            tz=tz,
            tz_offset=tz_offset,
            echo_at=self._peer_beat[0] if self._peer_beat else None,
            echo_held=max(0.0, now - self._peer_beat[1]) if self._peer_beat else None,
            lag=self._lag(),
        )
        self.peer.heartbeat(hb)

    def _lag(self) -> int | None:
        s = self.sender
        return None if s is None else max(0, s.journal.head - s.link.acked.seq)

    def _heard(self, hb: failover.Heartbeat) -> None:
        """Clock checks on a heartbeat from the peer (warn only: no decision compares wall clocks)."""
        now = self.clock()
        self._peer_beat = (hb.at, now)
        if hb.utc is not None and hb.echo_at is not None and hb.echo_held is not None:
            sample = clocks.sample(hb.utc, hb.echo_at, hb.echo_held, now, time.time())
            if sample is not None:
                self._clock_samples = [*self._clock_samples[-(clocks.WINDOW - 1) :], sample]
        v = self._clock_view(hb)
        if v.problems != self._clock_problems and len(self._clock_samples) >= 3:
            for problem in v.problems:
                if problem not in self._clock_problems:
                    self._alert(failover.Alert("clock.check", problem, (("skew", f"{v.skew}"),)))
            self._clock_problems = v.problems

    def _clock_view(self, hb: failover.Heartbeat | None) -> clocks.ClockView:
        tz, tz_offset = _local_zone()
        return clocks.view(
            self._clock_samples,
            self.setup.failover.max_clock_skew,
            tz,
            tz_offset if tz_offset is not None else 0,
            hb.tz if hb is not None else "",
            hb.tz_offset if hb is not None else None,
        )

    # -- upgrades -------------------------------------------------------------------------------------------
    def _installer(self) -> Path:
        p = Path(self.setup.upgrade.installer)
        return p if p.is_absolute() else self.setup.node.root / p

    async def _upgrade_stage(self) -> tuple[bool, str]:
        """On the active: carry the installer to the passive over the agents' channel, checked by hash."""
        from engine import upgrade

        path = self._installer()
        try:
            staged = await asyncio.to_thread(upgrade.describe, path)
        except OSError as e:
            return False, f"the installer {path} cannot be read: {e.strerror or e}"
        other = self.setup.peer.name
        try:
            args = {"name": staged.name, "size": staged.size, "digest": staged.digest}
            r = await self.peer.command("upgrade-begin", args)
            if not r.ok:
                return False, f"{other}: {r.text}"
            t0 = time.monotonic()
            chunks = upgrade.iter_chunks(path, wire.AGENT_BLOB_BYTES)
            while (piece := await asyncio.to_thread(next, chunks, None)) is not None:
                await self.peer.send_blob(*piece)
            r = await self.peer.command("upgrade-end", {}, timeout=600.0)
        except (ConnectionError, TimeoutError, ReplicationError, OSError) as e:
            return False, f"the installer did not reach {other}: {e}"
        if not r.ok:
            return False, f"{other}: {r.text}"
        secs = time.monotonic() - t0
        return True, f"{staged.name} ({staged.size} bytes) staged on {other} in {secs:.1f} s, hash checked"

    def _blob(self, ev: wire.AgentBlob) -> None:
        inc = self._incoming
        if inc is None or isinstance(inc, str):
            return
        try:
            inc.write(ev.offset, ev.data)
        except (OSError, ReplicationError) as e:
            inc.abort()
            self._incoming = f"the installer could not be written: {e}"

    def _upgrade_begin(self, args: dict[str, Any]) -> tuple[bool, str]:
        from engine import upgrade

        if isinstance(self._incoming, upgrade.Incoming):
            self._incoming.abort()
        try:
            self._incoming = upgrade.Incoming.begin(
                self.setup.node.state_dir,
                str(args.get("name", "")),
                int(args.get("size", -1)),
                str(args.get("digest", "")),
                self.setup.peer.name,
            )
        except (OSError, ValueError, ReplicationError) as e:
            self._incoming = None
            return False, f"cannot receive the installer: {e}"
        return True, "ready"

    async def _upgrade_end(self) -> tuple[bool, str]:
        inc, self._incoming = self._incoming, None
        if isinstance(inc, str):
            return False, inc
        if inc is None:
            return False, "no installer was announced"
        try:
            staged = await asyncio.to_thread(inc.finish)
        except (OSError, ReplicationError) as e:
            return False, str(e)
        log.info("upgrade.staged name=%s size=%d digest=%s", staged.name, staged.size, staged.digest)
        return True, f"{staged.name} staged ({staged.size} bytes, hash checked)"

    async def _upgrade_run(self) -> tuple[bool, str]:
        """On the passive: a maintenance window, the installer, then the service stopped and Manual."""
        from engine import upgrade

        st = self.state
        assert st is not None
        if st.role not in (failover.Role.PASSIVE, failover.Role.FENCED):
            return (
                False,
                f"upgrade run refused: {self.setup.node.name} is {st.role.value}; upgrade the passive",
            )
        n, u = self.setup.node, self.setup.upgrade
        staged = await asyncio.to_thread(upgrade.staged, n.state_dir, verify=True)
        if staged is None:
            return False, "no installer is staged here: run `standby upgrade stage` on the active first"
        installer = n.state_dir / "upgrade" / staged.name
        logfile = n.state_dir / "upgrade" / f"{staged.name}.{datetime.now(UTC):%Y%m%dT%H%M%SZ}.log"
        try:
            argv = upgrade.installer_argv(
                installer, logfile, windows=sys.platform == "win32", command=u.command
            )
        except ValueError as e:
            return False, str(e)
        window = u.timeout + u.stable_for + 120.0
        self._events.put_nowait(failover.MaintenanceStart(until=self.clock() + window))
        try:
            log.info("upgrade.installing argv=%s", argv)
            res = await asyncio.to_thread(upgrade.run_installer, argv, u.timeout)
            ok, verdict = upgrade.installer_verdict(res.exit_code, msi=sys.platform == "win32")
            log.info("upgrade.installed exit_code=%d ok=%s seconds=%.1f", res.exit_code, ok, res.seconds)
            settle = await asyncio.to_thread(
                upgrade.settle_service,
                self.service,
                stable_for=u.stable_for,
                timeout=u.stable_for * 3 + self.setup.service.timeout * 2,
                stop_timeout=self.setup.service.timeout,
                clock=time.monotonic,
                sleep=time.sleep,
            )
        finally:
            self._events.put_nowait(failover.MaintenanceEnd())
        text = f"installer: {verdict} (exit code {res.exit_code}, {res.seconds:.0f} s); "
        if settle.ok:
            text += f"the service is stopped and Manual (stopped it {settle.stops} time(s))"
        else:
            text += f"the service could not be left stopped and Manual: {settle.reason}"
            self._alert(failover.Alert("upgrade.service_not_settled", settle.reason))
        if not ok and res.output_tail:
            text += "\n" + res.output_tail
        return ok and settle.ok, text

    def _versions(self) -> dict[str, str]:
        from engine import __version__, upgrade

        u = self.setup.upgrade
        service: str | None = None
        if u.version_command:
            service = upgrade.version_from_command(list(u.version_command), 30.0)
        elif u.service_exe and sys.platform == "win32":
            raw = upgrade.version_from_command(upgrade.windows_file_version_argv(u.service_exe), 30.0)
            service = upgrade.parse_file_version(raw or "")
        return {"service": service or "", "standby": __version__}

    async def _upgrade_check(self) -> tuple[bool, str]:
        from engine import upgrade

        mine = await asyncio.to_thread(self._versions)
        try:
            r = await self.peer.command("version", {}, timeout=60.0)
            theirs = {k: str(v) for k, v in r.data.items()}
        except (ConnectionError, TimeoutError, ReplicationError) as e:
            return False, f"the agent of {self.setup.peer.name} cannot be reached ({e})"
        same_svc, svc = upgrade.compare_versions(mine["service"] or None, theirs.get("service") or None)
        same_sb, sb = upgrade.compare_versions(mine["standby"], theirs.get("standby") or None)
        return same_svc and same_sb, f"service: {svc}\nstandby: {sb}"

    # -- rejoin and switchover ------------------------------------------------------------------------------
    async def _quarantine(self, epoch: int) -> None:
        """Quarantine: ask the peer what of our journal it applied, then set aside what it never had."""
        try:
            for _ in range(50):  # the peer's agent may be coming up (both restarted): up to 10 s
                if self.peer.connected:
                    break
                await asyncio.sleep(0.2)
            r = await self.peer.command("position", {})
            if not r.ok:
                raise ReplicationError(f"the peer did not say what it applied: {r.text}")
            journal = str(r.data.get("journal", ""))
            seq = r.data.get("seq")
            applied = seq if isinstance(seq, int) and not isinstance(seq, bool) else None
            result = await run_critical(functools.partial(self._set_aside, epoch, journal, applied))
            folder = str(result.folder) if result.folder is not None else ""
            log.info("rejoin.quarantine_done files=%d bytes=%d folder=%s", result.files, result.bytes, folder)
            self._quarantine_checked = 0.0
            self._events.put_nowait(failover.Quarantined(True, result.files, folder))
        except (ConnectionError, TimeoutError, ReplicationError, OSError) as e:
            log.error("rejoin.quarantine_failed error=%s", e)
            self._events.put_nowait(failover.Quarantined(False, reason=str(e) or type(e).__name__))

    def _set_aside(self, epoch: int, journal: str, applied: int | None) -> quarantine.QuarantineResult:
        """Worker thread: find, move aside, retire the old journal (its unacknowledged tail is in quarantine
        now, and must never be streamed by a later promotion)."""
        n = self.setup.node
        div = quarantine.find_divergence(n.root, n.include, n.state_dir, applied, journal_id=journal or None)
        now = datetime.now(UTC)
        log.info(
            "rejoin.divergence scanned=%d suspects=%d applied=%s journal=%s",
            div.scanned,
            len(div.suspects),
            applied,
            journal or "-",
        )
        result = quarantine.quarantine(n.state_dir, n.root, div.suspects, epoch=epoch, now=now)
        # A journal with entries the peer never applied is retired, never streamed again. One the peer
        # applied to its end (a switchover) stays: a later promotion streams on from where the peer is,
        # and nothing piles up in quarantine. (A damaged journal made find_divergence raise: no rejoin.)
        if result.folder is not None or div.unapplied:
            quarantine.retire_journal(n.state_dir, result.folder, now)
        return result

    def _digest(self, part: str) -> TreeDigest:
        """Worker thread: the local tree's digest, with a copy of a part's hash cache."""
        n = self.setup.node
        cache = HashCache.load(n.state_dir / part / "hashcache")
        return tree_digest(n.root, n.include, cache)

    async def _measure_tree(self) -> None:
        try:
            td = await asyncio.to_thread(self._digest, "sender")
        except (OSError, ReplicationError) as e:
            self._events.put_nowait(failover.TreeMeasured("", reason=str(e)))
            return
        if td.unstable:
            self._events.put_nowait(failover.TreeMeasured("", td.files, f"{td.unstable} file(s) unsteady"))
        else:
            self._events.put_nowait(failover.TreeMeasured(td.digest, td.files))

    async def _offer(self, a: failover.OfferHandover) -> None:
        args = {"epoch": a.epoch, "digest": a.digest, "files": a.files}
        try:
            r = await self.peer.command("handover", args, timeout=self.setup.failover.switchover_timeout)
        except (ConnectionError, TimeoutError, ReplicationError) as e:
            self._events.put_nowait(failover.HandoverAnswer(False, reason=str(e) or type(e).__name__))
            return
        retry = bool(r.data.get("retry", False))
        self._events.put_nowait(failover.HandoverAnswer(r.ok, retry, r.text))

    async def _take_offer(self, args: dict[str, Any]) -> tuple[bool, str, dict[str, Any]]:
        """On the passive: the active offers the service. Take it only if this tree is the same."""
        st = self.state
        epoch, digest = args.get("epoch"), str(args.get("digest", ""))
        peer = st.peer if st is not None else None
        if st is None or st.role is not failover.Role.PASSIVE or peer is None or peer.epoch != epoch:
            role = st.role.value if st is not None else "starting"
            return False, f"{self.setup.node.name} is {role}, not a passive following epoch {epoch}", {}
        try:
            mine = await asyncio.to_thread(self._digest, "receiver")
        except (OSError, ReplicationError) as e:
            return False, f"this tree could not be measured: {e}", {"retry": True}
        if mine.unstable or mine.digest != digest:
            why = f"{mine.unstable} file(s) unsteady" if mine.unstable else "the trees differ"
            text = (
                f"{why}: here {mine.files} files ({mine.digest[:12]}), "
                f"there {args.get('files')} ({digest[:12]})"
            )
            return False, text, {"retry": True}
        self._events.put_nowait(failover.HandoverAccepted(int(epoch)))
        return True, f"trees equal ({mine.files} files, {mine.bytes} bytes): taking over", {}

    async def _switchover(
        self, name: str, args: dict[str, Any], *, relay: bool
    ) -> tuple[bool, str, dict[str, Any]]:
        """``switchover [--to NODE]`` and ``failback``, asked on either node: the active hands over."""
        st = self.state
        assert st is not None
        me, other = self.setup.node.name, self.setup.peer.name
        peer = st.peer if st.reachable else None
        if name == "failback":
            mine, theirs = self.setup.node.preferred, bool(peer is not None and peer.preferred)
            if peer is None:
                return False, f"the agent of {other} cannot be reached", {}
            if mine == theirs:
                which = "both nodes are" if mine else "neither node is"
                return False, f"failback refused: {which} configured with [node] preferred = true", {}
            here = self._quarantined
            if here or peer.quarantined:
                where = ", ".join(
                    f"{n_} on {node}" for n_, node in ((here, me), (peer.quarantined, other)) if n_
                )
                return (
                    False,
                    f"failback refused: quarantined files not acknowledged ({where}); look at them with "
                    "`standby quarantine list` and acknowledge them with `standby quarantine ack`",
                    {},
                )
            target = me if mine else other
        else:
            to = str(args.get("to", "") or "")
            if to and to.casefold() not in (me.casefold(), other.casefold()):
                return False, f"switchover --to {to!r}: not a node of this pair ({me}, {other})", {}
            if to:
                target = me if to.casefold() == me.casefold() else other
            else:
                target = other if st.role is failover.Role.ACTIVE else me
        active = st.role is failover.Role.ACTIVE
        peer_active = peer is not None and peer.role is failover.Role.ACTIVE
        under_way = st.handover is not None or (peer is not None and bool(peer.switching))
        if ((target == me and active) or (target == other and peer_active)) and not under_way:
            return True, f"{target} is already active: nothing to do", {}
        if active:
            if target == me:
                return True, f"{me} is already active: nothing to do", {}
            why = failover.handover_blocker(st)
            if why is not None:
                return False, f"switchover refused: {why}", {}
            self._events.put_nowait(failover.Switchover())
            return True, f"switchover started: {me} -> {other}", {}
        if not relay:
            return (
                False,
                f"switchover refused: {me} is {st.role.value}, and the service is not here to hand over",
                {},
            )
        try:
            r = await self.peer.command("switchover", {"to": target})
        except (ConnectionError, TimeoutError, ReplicationError) as e:
            return False, f"the agent of {other} cannot be reached ({e})", {}
        return r.ok, f"{other}: {r.text}", {}

    def _alert(self, a: failover.Alert) -> None:
        event = {"event": a.event, "reason": a.reason, "node": self.setup.node.name, "at": time.time()}
        event.update(dict(a.details))
        self.alerts = [*self.alerts[-19:], event]
        log.warning("alert.%s reason=%s %s", a.event, a.reason, " ".join(f"{k}={v}" for k, v in a.details))
        if self.setup.alert.command:
            self._spawn(self._run_alert(event))

    async def _run_alert(self, event: dict[str, Any]) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.setup.alert.command, stdin=asyncio.subprocess.PIPE
            )
            async with asyncio.timeout(self.setup.alert.timeout):
                await proc.communicate(json.dumps(event).encode())
        except TimeoutError:
            log.warning("alert.command_timeout event=%s", event["event"])
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        except OSError as e:
            log.warning("alert.command_failed event=%s error=%s", event["event"], e)

    def _commands(self) -> None:
        """Operator commands: files the CLI drops in ``<state_dir>/commands`` (see :func:`send_command`)."""
        folder = self.setup.node.state_dir / COMMANDS
        try:
            names = sorted(p for p in folder.iterdir() if p.suffix == ".cmd")
        except FileNotFoundError:
            return
        for p in names:
            try:
                cmd = json.loads(p.read_text("utf-8"))
                p.unlink()
            except (OSError, ValueError):
                continue
            self._spawn(
                self._operator(p.with_suffix(".reply"), str(cmd.get("name", "")), cmd.get("args", {}))
            )

    async def _operator(self, reply: Path, name: str, args: dict[str, Any]) -> None:
        ok, text, _ = await self._command(name, args, relay=True)
        tmp = reply.with_suffix(".tmp")
        tmp.write_text(json.dumps({"ok": ok, "text": text}), "utf-8")
        os.replace(tmp, reply)

    async def _relayed(self, cmd: wire.AgentCommand) -> None:
        ok, text, data = await self._command(cmd.name, dict(cmd.args), relay=False)
        self.peer.reply(cmd.name, ok, text, data)

    async def _command(
        self, name: str, args: dict[str, Any], *, relay: bool
    ) -> tuple[bool, str, dict[str, Any]]:
        """One operator command here (or a request of the peer's agent, ``relay`` False)."""
        st = self.state
        if st is None:
            return False, "the agent is starting", {}
        if name in ("switchover", "failback"):
            return await self._switchover(name, args, relay=relay)
        if name == "handover" and not relay:
            return await self._take_offer(args)
        if name == "position":
            return True, "applied", {"journal": self.receiver.journal, "seq": self.receiver.seq}
        if name == "version":
            return True, "versions", await asyncio.to_thread(self._versions)
        if name == "upgrade-begin" and not relay:
            ok, text = self._upgrade_begin(args)
            return ok, text, {}
        if name == "upgrade-end" and not relay:
            ok, text = await self._upgrade_end()
            return ok, text, {}
        upgrades = {"upgrade-stage": self._upgrade_stage, "upgrade-run": self._upgrade_run}
        if name in upgrades and relay:
            ok, text = await upgrades[name]()
            return ok, text, {}
        if name == "upgrade-check":
            ok, text = await self._upgrade_check()
            return ok, text, {}
        ok, text = await self._operator_command(name, args, relay=relay)
        return ok, text, {}

    async def _operator_command(self, name: str, args: dict[str, Any], *, relay: bool) -> tuple[bool, str]:
        st = self.state
        assert st is not None
        now = self.clock()
        if name in ("failover", "failover-force"):
            force = name == "failover-force"
            if st.role is failover.Role.ACTIVE and relay and not force:
                try:
                    r = await self.peer.command("failover", {})
                except (ConnectionError, TimeoutError, ReplicationError) as e:
                    return False, f"the passive's agent cannot be reached ({e}); run the command there"
                return r.ok, f"{self.setup.peer.name}: {r.text}"
            self._events.put_nowait(failover.Failover(force=force))
            return True, f"failover{' --force' if force else ''} asked of {self.setup.node.name}"
        if name == "maintenance-start":
            seconds = float(args.get("seconds", 1800))
            self._events.put_nowait(failover.MaintenanceStart(until=now + seconds))
            return True, f"maintenance window open for {seconds:g} s"
        if name == "maintenance-end":
            self._events.put_nowait(failover.MaintenanceEnd())
            return True, "maintenance window closed"
        if name == "rejoin":
            if st.role is not failover.Role.FENCED:
                return False, f"rejoin refused: {self.setup.node.name} is {st.role.value}, not fenced"
            self._events.put_nowait(failover.Rejoin())
            return True, "rejoin asked: this node's own changes are set aside first"
        return False, f"unknown command {name!r}"

    # -- status ---------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        st = self.state
        now = self.clock()
        peer = st.peer if st is not None else None
        sender = self.sender.status() if self.sender is not None else None
        out: dict[str, Any] = {
            "role": st.role.value if st is not None else "starting",
            "epoch": st.epoch if st is not None else self.roles.epoch,
            "node": self.setup.node.name,
            "maintenance": bool(st is not None and st.maintenance_open(now)),
            "service": st.service.value if st is not None else "unknown",
            "service_for": round(now - st.service_since, 1) if st is not None else 0.0,
            "peer": {
                "name": self.setup.peer.name,
                "reachable": bool(st is not None and st.reachable),
                "silent_for": round(now - self._last_heartbeat, 1),
                "role": peer.role.value if peer is not None else None,
                "epoch": peer.epoch if peer is not None else None,
                "service": peer.service.value if peer is not None else None,
                "preferred": peer.preferred if peer is not None else None,
                "quarantined": peer.quarantined if peer is not None else None,
                "lag": peer.lag if peer is not None else None,
                "caught_up": peer.caught_up if peer is not None else None,
            },
            "lag_records": sender["lag_records"] if sender else None,
            "lag_seconds": sender["lag_seconds"] if sender else None,
            "last_failover": next((e for e in reversed(self.alerts) if e["event"] == "failover.done"), None),
            "sender": sender,
            "receiver": self.receiver.status(),
            "last_role_change": self.roles.status(),
            "switchover": st.handover.stage if st is not None and st.handover is not None else None,
            "failover_held": st.hold if st is not None else None,
            "peer_switching": peer.switching if peer is not None else "",
            "quarantined": self._quarantined,
            "preferred": self.setup.node.preferred,
            "clock": self._clock_view(peer).to_dict(),
            "witness": self._witness_status(),
            "alerts": self.alerts[-5:],
            "updated": time.time(),
        }
        return out

    def _write_status(self) -> None:
        write_status_quiet(self.setup.node.state_dir, self.status())


#: Where the CLI leaves operator commands for the running agent (``<state_dir>/commands``).
COMMANDS = "commands"


def send_command(state_dir: Path, name: str, args: dict[str, Any], timeout: float = 15.0) -> tuple[bool, str]:
    """Hand an operator command to the agent running on this server and wait for its answer."""
    folder = state_dir / COMMANDS
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{time.time_ns()}-{os.getpid()}"
    tmp = folder / f"{stem}.tmp"
    tmp.write_text(json.dumps({"name": name, "args": args}), "utf-8")
    os.replace(tmp, folder / f"{stem}.cmd")
    reply = folder / f"{stem}.reply"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = json.loads(reply.read_text("utf-8"))
        except (OSError, ValueError):
            time.sleep(0.1)
            continue
        reply.unlink(missing_ok=True)
        return bool(data.get("ok")), str(data.get("text", ""))
    (folder / f"{stem}.cmd").unlink(missing_ok=True)
    return False, f"no answer from the agent within {timeout:g} s (is `standby run` running?)"


def _local_zone() -> tuple[str, int | None]:
    """This machine's time zone now: its name, and its UTC offset in seconds (None if unknown)."""
    local = datetime.now().astimezone()
    offset = local.utcoffset()
    return local.tzname() or "", int(offset.total_seconds()) if offset is not None else None


def _crash() -> None:
    """Die at once, as a power cut would (the test seam above)."""
    if sys.platform == "win32":
        os._exit(137)
    import signal

    os.kill(os.getpid(), signal.SIGKILL)
