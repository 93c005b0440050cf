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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine import failover, identity, wire
from engine.aio import run_critical
from engine.config import NodeSetup, SenderConfig
from engine.errors import ReplicationError, SafetyHalt
from engine.guards import GuardCheck, receiver_check, sender_check
from engine.journal import Journal
from engine.peer import PeerChannel
from engine.receiver import Receiver
from engine.rolestate import RoleState
from engine.scan import HashCache
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
    lag_records: int
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
            cfg.state_dir / "journal", fsync=cfg.fsync, segment_bytes=cfg.segment_mb << 20
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
            lag_records=max(0, head - link.acked.seq),
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
        self._caught_up: bool | None = None
        self.alerts: list[dict[str, Any]] = []
        self._bg: set[asyncio.Task[Any]] = set()
        self._crash_after = os.environ.get(CRASH_AFTER, "")
        self._why = "role machine"

    def _accepts_senders(self) -> bool:
        return self.state is not None and self.state.role in (failover.Role.PASSIVE, failover.Role.PROMOTING)

    def _post(self, ev: failover.Event | wire.AgentEvent) -> None:
        if isinstance(ev, failover.Heartbeat):
            self._last_heartbeat = self.clock()
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
            self.roles.close()
            log.info("agent.stopped")

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
                    self._events.put_nowait(failover.PeerSilent())
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
        if caught != self._caught_up:
            self._caught_up = caught
            self._events.put_nowait(failover.Replication(caught))

    # -- the peer and the operator --------------------------------------------------------------------------
    async def _send_heartbeat(self) -> None:
        if self.state is not None:
            self.peer.heartbeat(failover.beat(self.state, self.clock()))

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
        ok, text = await self._command(name, args, relay=True)
        tmp = reply.with_suffix(".tmp")
        tmp.write_text(json.dumps({"ok": ok, "text": text}), "utf-8")
        os.replace(tmp, reply)

    async def _relayed(self, cmd: wire.AgentCommand) -> None:
        ok, text = await self._command(cmd.name, dict(cmd.args), relay=False)
        self.peer.reply(cmd.name, ok, text)

    async def _command(self, name: str, args: dict[str, Any], *, relay: bool) -> tuple[bool, str]:
        """One operator command here; ``failover`` on the active is relayed to the passive."""
        st = self.state
        if st is None:
            return False, "the agent is starting"
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
            self._events.put_nowait(failover.Rejoin())
            return True, "rejoin asked"
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
            },
            "lag_records": sender["lag_records"] if sender else None,
            "lag_seconds": sender["lag_seconds"] if sender else None,
            "last_failover": next((e for e in reversed(self.alerts) if e["event"] == "failover.done"), None),
            "sender": sender,
            "receiver": self.receiver.status(),
            "last_role_change": self.roles.status(),
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


def _crash() -> None:
    """Die at once, as a power cut would (the test seam above)."""
    if sys.platform == "win32":
        os._exit(137)
    import signal

    os.kill(os.getpid(), signal.SIGKILL)
