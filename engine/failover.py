"""The role machine: which of the two servers may run the service, decided as a pure function.

Rules (the whole contract; the code below only spells them out):

1. Monitoring. Only the agent starts the service, and only as ``active``; the start type stays Manual
   on both nodes (``SetManual`` at start-up and on every demotion). The passive counts how long the
   active's service has been *positively* not running, on its own clock, from heartbeats: a heartbeat
   saying ``unknown``, a silent peer, an open maintenance window or an announced planned stop resets
   the count.
2. Automatic failover happens when the count reaches ``failover_after``, and only with proof that the
   old active cannot run the service: (a) its agent acknowledges a fence request (it stopped its
   service, keeps it Manual, persisted ``fenced`` at the new epoch, drained to us if it could and
   stopped sending), or (b) a configured fence command exits 0, run only when the agent cannot be
   reached or does not acknowledge within ``fence_timeout``, and only if this node was caught up.
   Without proof it alerts and does not promote: a dead host and a partition look the same. At most one
   automatic failover per ``flap_window``; after that, alerts.
3. Manual failover asks for the same proof at once. ``failover --force`` on the passive promotes
   without proof when the peer cannot be reached (a reachable peer is still asked first) and alerts
   that it assumes the peer is down; on a node waiting at start-up it starts alone.
4. Fencing by epoch. A promoting node picks an epoch above every epoch it has seen and persists
   ``PersistRole(ACTIVE, epoch)`` before ``StartService``, always. A node that sees a higher epoch
   while active (or waiting to be) persists ``fenced`` at that epoch, stops its service and becomes
   fenced. A fenced node never starts its service and never sends data (heartbeats and
   acknowledgements only); its data stays untouched until it rejoins: by itself (``auto_rejoin``) once
   the peer runs the service as active at no lower epoch, or when an operator says ``rejoin``. A rejoin
   first moves aside every file the active never had (``Quarantine``), then becomes passive. At start-up an
   agent whose durable role is active stops its service and starts it again only once the peer has
   confirmed, in a heartbeat sent after it heard this boot, that it is passive or fenced at no higher
   epoch; if the peer cannot be reached it alerts and waits, unless ``start_alone_after`` has elapsed
   or the operator forces.
7. Switchover (planned, no loss): the active stops its service, drains until the passive acknowledged
   everything and nothing waits, digests its tree and offers it (``OfferHandover``); the passive takes it
   only if its own tree has the same digest, and then promotes as in rule 2 (its fence request makes the
   old active fenced, which then rejoins). Until the offer is accepted any failure, a silent peer or
   ``switchover_timeout`` rolls back: the service starts where it was. The durable role stays active
   until the fence, so a crash anywhere is a restart (rule 4) or a finished failover.
5. Maintenance: no automatic failover while a window is open on either side. A graceful stop of an
   agent announces a planned stop; the passive then alerts instead of counting.
6. The epoch never goes back, and a node never holds ``active`` with an epoch lower than one it has seen.
   Every node persists the highest epoch it has seen, a passive too, so that a promotion forced after a
   crash still picks a higher one. Two durable actives at one epoch (possible only when a forced node
   never heard the other) both wait at start-up and alert; the operator forces the one to keep.
8. Witness (``Policy.witness``: an etcd lease, ``engine.witness``). Leadership is also a key bound to a
   lease of ``witness_ttl``. The active renews it every ``witness_interval``; once it has not renewed for
   ``witness_ttl - witness_margin`` it stops its service (``witness.lease_lost``) and keeps it stopped (a
   failed stop is retried, a service started by hand is stopped, an operator's restart refused) unless its
   peer confirms, in a heartbeat that echoes one of ours sent within ``FAILSAFE_WINDOW``, that it is
   passive or fenced and hears us (Patroni's failsafe); it starts it again as soon as it renews or is
   confirmed, and every other start of an active (start-up, ``start_alone``, a switchover's rollback)
   waits for the same. A witness holding the key for another node makes the active step down (fenced).
   Every promotion takes the key before the service starts (a ``--force`` does not wait for it: a forced
   node runs without it until it holds it or its peer is back) and persists an epoch derived from the
   key's create revision (:func:`epoch_from_revision`). A graceful stop of an active's agent stops its
   service (nothing renews the lease of a stopped agent).
9. Witness failover: a passive whose active is silent (``PeerSilent``) and has been for
   ``max(failover_after, FAILSAFE_WINDOW + witness_margin)`` (longer than any confirmation it gave can
   last plus the time a stop takes) takes the key when it is absent (the active's lease ended: it could
   not renew, so it stopped its service) and becomes active; only if the active's last heartbeat said it
   was within ``max_lag`` entries, announced no planned stop and no maintenance window is open, and within
   ``flap_window`` like any automatic failover. Not while the active's host refuses connections
   (``PeerSilent.refused``: the host is up, its agent is not, its service may run on), nor for
   ``FAILSAFE_WINDOW + witness_margin`` after it last did. A witness that cannot be reached never causes a
   promotion.
10. A node waiting at start-up with a durable active role looks at the witness too: another holder makes it
   step down (fenced). It never starts by taking the key alone (rule 4 stands): the peer may have been
   forced active without reaching the witness.

A passive whose peer reports ``fenced`` (an earlier failover whose acknowledgement was lost) finishes
that failover: it asks again and the fenced peer acknowledges again. This is not a new failover and is
not limited by the flap window, but it waits for maintenance like one.

Shape (Patroni's HA cycle as a function, h11's table): :func:`start` builds the first state from the
facts on disk, :func:`step` takes ``(state, event, now)`` and returns a :class:`Step` with the new
state, the actions to run in order and log lines that begin with a stable event name; :func:`tick` is
``step`` with nothing new but time; :func:`beat` is the heartbeat to send. Every change of role is a
row of :data:`TRANSITIONS` and is checked against it.

Owns: roles, epochs, the decisions. Must not: read a clock, run timers, do I/O, talk to the service or
the network. The caller (``node``) executes actions, feeds back their results, sends heartbeats about
once a second and reports ``PeerSilent`` when none came for the liveness timeout.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Any, TypeAlias

from engine.errors import LocalProtocolError

#: A rejoin whose quarantine failed (the peer unreachable, a disk error) is tried again after this long.
REJOIN_RETRY = 5.0
#: A peer's confirmation (rule 8) counts while the heartbeat of ours it echoes is at most this old.
FAILSAFE_WINDOW = 4.0
#: A witness call that failed, or a key wanted now (a proven promotion), is asked again after this long.
WITNESS_RETRY = 1.0

# ---- values -----------------------------------------------------------------------------------------------


class Role(enum.Enum):
    PASSIVE = "passive"
    PROMOTING = "promoting"  # wants the service, has not got proof yet; its service is stopped
    ACTIVE = "active"
    DEMOTING = "demoting"  # persisted fenced, its service is stopping (and draining, if asked to)
    FENCED = "fenced"


#: The roles ``PersistRole`` writes; ``promoting`` and ``demoting`` exist only in memory.
DURABLE_ROLES = frozenset({Role.PASSIVE, Role.ACTIVE, Role.FENCED})


class ServiceState(enum.Enum):
    RUNNING = "running"
    STOPPED = "stopped"
    UNKNOWN = "unknown"


class ServiceOp(enum.Enum):
    START = "start"
    STOP = "stop"


class Kind(enum.Enum):
    """Why a node is promoting."""

    AUTO = "auto"  # the active's service has been down for failover_after
    MANUAL = "manual"  # operator: failover
    FORCE = "force"  # operator: failover --force, peer reachable (asked first)
    FINISH = "finish"  # the peer is fenced and nobody is active
    RESTART = "restart"  # durable role active, waiting at start-up for the peer's confirmation
    SWITCHOVER = "switchover"  # the active handed over: stopped, drained, trees found equal


#: A fence request's identity: (boot of the requester, attempt number in that boot).
Token: TypeAlias = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Policy:
    failover_after: float = 300.0
    flap_window: float = 6 * 3600.0
    start_alone_after: float | None = None  # None: never start alone
    fence_command: bool = False  # a fence command is configured
    fence_timeout: float = 30.0  # how long a promotion waits for the peer's acknowledgement
    fence_retry: float = 3.0  # a fence request is sent again this often until acknowledged
    drain_timeout: float = 60.0  # how long a demoting active waits for its sender to drain
    service_retry: float = 30.0  # a failed StopService is tried again this often
    auto_rejoin: bool = True  # a fenced node rejoins by itself once the peer runs the service as active
    switchover_timeout: float = 120.0  # a handover not accepted by then is rolled back
    handover_settle: float = 1.0  # caught up and idle this long before the tree is measured
    witness: bool = False  # rules 8-10: leadership also needs the witness's lease
    witness_ttl: float = 30.0  # the lease
    witness_margin: float = 10.0  # stop the service this long before the lease could end
    witness_interval: float = 10.0  # renew (active) or look (others) this often
    max_lag: int = 100  # rule 9: journal entries the passive may miss when it takes over by the witness

    def __post_init__(self) -> None:
        for name in (
            "failover_after",
            "flap_window",
            "fence_timeout",
            "fence_retry",
            "drain_timeout",
            "switchover_timeout",
            "handover_settle",
            "witness_margin",
        ):
            if not getattr(self, name) >= 0:
                raise ValueError(f"policy: {name} must be >= 0")
        if not self.service_retry > 0:
            raise ValueError("policy: service_retry must be > 0")
        if self.start_alone_after is not None and not self.start_alone_after >= 0:
            raise ValueError("policy: start_alone_after must be >= 0 or None")
        if not (self.witness_ttl > self.witness_margin and self.witness_interval > 0 and self.max_lag >= 0):
            raise ValueError("policy: witness_ttl must exceed witness_margin, witness_interval be > 0")


# ---- events (inputs) --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Started:
    """Start-up facts, read from disk by the caller. ``boot`` is distinct for every start of the agent
    (a random 63-bit number will do): confirmations and fence tokens are tied to it."""

    boot: int
    durable_role: Role | None  # None: never started before, use initial_role
    durable_epoch: int = 0
    initial_role: Role = Role.PASSIVE


@dataclass(frozen=True, slots=True)
class LocalService:
    """The local service as observed now (the caller polls it); ``since`` is when it entered that state."""

    state: ServiceState
    since: float


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """What one agent tells the other about once a second (see :func:`beat`); an event when received.

    ``at`` is the sender's clock, monotonic within one boot: a heartbeat not newer than the last one
    from the same boot is dropped. ``echo`` is the boot of the receiver the sender last heard from.
    ``caught_up``: from an active, its peer has acknowledged everything it journaled; from a demoting or
    fenced node, it had when it stopped sending."""

    boot: int
    at: float
    role: Role
    epoch: int
    service: ServiceState
    maintenance: bool
    planned_stop: bool
    caught_up: bool
    echo: int | None
    last_failover_age: float | None = None  # seconds since the last automatic failover this node knows
    switching: str = ""  # an active handing over: the stage it is at ("" when none)
    # Carried for the agents, never read by the role machine (no decision compares clocks across nodes):
    preferred: bool = False  # [node] preferred: the node a failback returns to
    quarantined: int = 0  # files set aside by rejoins and not acknowledged yet
    lag: int | None = None  # an active's journal entries its peer has not acknowledged yet
    utc: float | None = None  # the sender's wall clock (seconds since 1970, UTC) when it sent this
    tz: str = ""  # its time zone's name
    tz_offset: int | None = None  # its UTC offset now, seconds east
    echo_at: float | None = None  # ``at`` of the last heartbeat it received from the receiver of this one
    echo_held: float | None = None  # seconds between receiving that heartbeat and sending this one


@dataclass(frozen=True, slots=True)
class PeerSilent:
    """No heartbeat from the peer for the liveness timeout (also sent when none came since start-up), again
    about once a second while it lasts. ``refused``: the peer's host refused the last connection (it is up,
    its agent is not: the service may still run there)."""

    refused: bool = False


@dataclass(frozen=True, slots=True)
class FenceRequest:
    """The peer asks this node to stop its service and persist fenced at ``epoch`` (a RequestFence)."""

    epoch: int
    token: Token


@dataclass(frozen=True, slots=True)
class FenceAck:
    """The peer's answer to our RequestFence: its service is stopped, it persisted fenced (or passive)
    at ``epoch`` and stopped sending. ``drained``: it knows we hold everything it journaled."""

    epoch: int
    token: Token
    drained: bool


@dataclass(frozen=True, slots=True)
class FenceCommandResult:
    exit_code: int


@dataclass(frozen=True, slots=True)
class ServiceResult:
    """The result of one StartService/StopService, in the order they were emitted."""

    op: ServiceOp
    ok: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Replication:
    """The local sender's report: the peer has acknowledged everything journaled (or not); ``idle``: and
    nothing waits to be journaled either."""

    caught_up: bool
    idle: bool = False


@dataclass(frozen=True, slots=True)
class Failover:
    """Operator: make this node active. ``force``: without proof if the peer cannot be reached."""

    force: bool = False


@dataclass(frozen=True, slots=True)
class MaintenanceStart:
    until: float


@dataclass(frozen=True, slots=True)
class MaintenanceEnd:
    pass


@dataclass(frozen=True, slots=True)
class Rejoin:
    """Operator, on a fenced node: become passive again (the replica will follow the active)."""


@dataclass(frozen=True, slots=True)
class Quarantined:
    """The result of :class:`Quarantine`: ``files`` this node wrote that the active never had were moved
    aside into ``folder``; ``ok`` False: it could not be done (``reason``), nothing was overwritten."""

    ok: bool
    files: int = 0
    folder: str = ""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Switchover:
    """Operator, on the active: hand the service over to the passive with nothing lost."""


@dataclass(frozen=True, slots=True)
class TreeMeasured:
    """The result of :class:`MeasureTree`. ``digest`` "" : it could not be measured (``reason``)."""

    digest: str
    files: int = 0
    reason: str = ""


@dataclass(frozen=True, slots=True)
class HandoverAnswer:
    """The passive's answer to :class:`OfferHandover`. ``retry``: its tree differs for now (a change may be
    on its way): drain and offer again."""

    ok: bool
    retry: bool = False
    reason: str = ""


@dataclass(frozen=True, slots=True)
class HandoverAccepted:
    """On the passive: the active offered a handover at ``epoch`` and this node's tree is equal to its."""

    epoch: int


@dataclass(frozen=True, slots=True)
class WitnessAnswer:
    """The result of :class:`AskWitness`. ``asked_at``: our clock when the call was made (a lease renewed by
    it lasts at least ``left`` from then). ``stale_self``: the key holds our name on a lease that is not ours
    (an earlier run's): it will end by itself. ``reachable`` False: the other fields are unknown."""

    op: str
    asked_at: float
    reachable: bool
    holder: str | None = None
    mine: bool = False
    stale_self: bool = False
    revision: int | None = None
    left: float | None = None
    error: str = ""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """The agent is stopping gracefully: announce a planned stop in the heartbeats that remain. With a
    witness an active also stops its service (its lease cannot outlive the agent); the caller waits for
    that stop's result before it exits."""


@dataclass(frozen=True, slots=True)
class Tick:
    pass


Event: TypeAlias = (
    LocalService
    | Heartbeat
    | PeerSilent
    | FenceRequest
    | FenceAck
    | FenceCommandResult
    | ServiceResult
    | Replication
    | Failover
    | MaintenanceStart
    | MaintenanceEnd
    | Rejoin
    | Quarantined
    | Switchover
    | TreeMeasured
    | HandoverAnswer
    | HandoverAccepted
    | WitnessAnswer
    | Shutdown
    | Tick
)


# ---- actions (outputs, executed in order) -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StopService:
    """Stop the local service (idempotent; stopped already is success). Answer with a ServiceResult."""


@dataclass(frozen=True, slots=True)
class StartService:
    """Start the local service (idempotent; running already is success). Answer with a ServiceResult."""


@dataclass(frozen=True, slots=True)
class SetManual:
    """Set the local service's start type to Manual (idempotent)."""


@dataclass(frozen=True, slots=True)
class PersistRole:
    """Write role and epoch to disk and fsync.

    INVARIANT: the caller has made this durable before it runs any action after it in the same list;
    a node restarted after a crash knows only what PersistRole wrote."""

    role: Role
    epoch: int


@dataclass(frozen=True, slots=True)
class RequestFence:
    """Ask the peer's agent to fence itself at ``epoch``; it answers with a FenceAck."""

    epoch: int
    token: Token


@dataclass(frozen=True, slots=True)
class SendFenceAck:
    epoch: int
    token: Token
    drained: bool


@dataclass(frozen=True, slots=True)
class RunFenceCommand:
    """Run the configured fence command against the peer; answer with a FenceCommandResult (a timeout
    is a non-zero exit)."""


@dataclass(frozen=True, slots=True)
class BecomeSender:
    pass


@dataclass(frozen=True, slots=True)
class BecomeReceiver:
    pass


@dataclass(frozen=True, slots=True)
class StopReplication:
    pass


@dataclass(frozen=True, slots=True)
class Quarantine:
    """Before a rejoin: move aside every local file the active never had (written after the fork, or never
    shipped), with a manifest, and retire the sender's journal. Answer with :class:`Quarantined`."""

    epoch: int


@dataclass(frozen=True, slots=True)
class MeasureTree:
    """Digest the local tree (paths, sizes and content hashes). Answer with :class:`TreeMeasured`."""


@dataclass(frozen=True, slots=True)
class OfferHandover:
    """Offer the peer the service at our ``epoch``: it takes it if its tree's digest is ``digest``.
    Answer with :class:`HandoverAnswer`."""

    epoch: int
    digest: str
    files: int


@dataclass(frozen=True, slots=True)
class AskWitness:
    """One witness call: ``look`` (who holds the key), ``acquire`` (take it if absent), ``renew`` (keep our
    lease) or ``release`` (give the key up). Answer with :class:`WitnessAnswer` (``release`` too)."""

    op: str


@dataclass(frozen=True, slots=True)
class Alert:
    """Something an operator must hear about. ``event`` is a stable name (see the README)."""

    event: str
    reason: str
    details: tuple[tuple[str, str], ...] = ()


Action: TypeAlias = (
    StopService
    | StartService
    | SetManual
    | PersistRole
    | RequestFence
    | SendFenceAck
    | RunFenceCommand
    | BecomeSender
    | BecomeReceiver
    | StopReplication
    | Quarantine
    | MeasureTree
    | OfferHandover
    | AskWitness
    | Alert
)


# ---- the transition table ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Transition:
    source: Role | None  # None: start-up
    event: str
    target: Role


_P, _R, _A, _D, _F = Role.PASSIVE, Role.PROMOTING, Role.ACTIVE, Role.DEMOTING, Role.FENCED

#: Every change of role there is. Anything else is a bug and raises LocalProtocolError.
TRANSITIONS: tuple[Transition, ...] = (
    Transition(None, "startup.passive", _P),  # durable passive, or first start as passive
    Transition(None, "startup.fenced", _F),  # durable fenced: stays fenced
    Transition(None, "startup.waiting", _R),  # durable active: wait for the peer's confirmation
    Transition(_P, "promote.auto", _R),  # rule 2
    Transition(_P, "promote.manual", _R),  # rule 3
    Transition(_P, "promote.force", _R),  # rule 3, peer reachable: ask it first
    Transition(_P, "promote.finish", _R),  # the peer is fenced and nobody is active
    Transition(_P, "promote.switchover", _R),  # the active handed over (stopped, drained, trees equal)
    Transition(_P, "promote.forced_alone", _A),  # rule 3, peer unreachable
    Transition(_P, "promote.witness", _A),  # rule 9: the active's lease ended and this node took the key
    Transition(_R, "promote.proven", _A),  # acknowledgement, fenced heartbeat or fence command exit 0
    Transition(_R, "promote.forced", _A),  # force: no proof came, promote anyway
    Transition(_R, "promote.abandoned", _P),  # no proof: alert, do not promote
    Transition(_R, "promote.yielded", _P),  # the peer holds or asks for a higher epoch
    Transition(_R, "startup.confirmed", _A),  # rule 4: the peer saw no higher epoch
    Transition(_R, "startup.alone", _A),  # rule 4: start_alone_after elapsed
    Transition(_R, "startup.forced_alone", _A),  # rule 4: failover --force while waiting
    Transition(_R, "startup.superseded", _D),  # rule 4: a higher epoch exists (or is asked for)
    Transition(_A, "demote.requested", _D),  # a fence request at a higher epoch
    Transition(_A, "demote.higher_epoch", _D),  # rule 6
    Transition(_A, "demote.split_brain", _D),  # the peer is active at our epoch: both step down
    Transition(_A, "demote.witness", _D),  # rule 8: the witness holds the key for another node
    Transition(_D, "demote.done", _F),  # service stopped (and drained): acknowledge
    Transition(_F, "rejoin", _P),  # operator, or by itself once the peer runs the service (after quarantine)
)
_ALLOWED = frozenset(TRANSITIONS)


# ---- state ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Promotion:
    kind: Kind
    epoch: int  # the epoch it will hold (RESTART: the durable one)
    token: Token
    since: float
    deadline: float  # give up on the peer's agent at this time (extended while it is demoting for us)
    next_request: float
    caught_up: bool  # last known: the peer's data is all here
    command: bool = False  # the fence command is running
    tried_command: bool = False
    proven: tuple[str, str, bool] | None = None  # rule 8: (event, via, drained): proven, waits for the key


@dataclass(frozen=True, slots=True)
class Demotion:
    epoch: int  # persisted fenced at this epoch
    since: float
    drain: bool  # asked by a promoting peer: let the sender drain before acknowledging
    token: Token | None  # the request to acknowledge
    request_epoch: int


@dataclass(frozen=True, slots=True)
class Handover:
    """An active handing the service over (a switchover). Stages, in order: ``stopping`` (its service),
    ``draining`` (until the peer acknowledged everything and nothing waits, for ``handover_settle``),
    ``measuring`` (the tree's digest), ``offered`` (the peer compares it with its own), ``accepted`` (the
    peer promotes: its fence request makes this node fenced). Before ``accepted`` a failure or the deadline
    rolls back: the service is started here again. The durable role stays active until the fence request."""

    stage: str
    since: float
    deadline: float
    settled_from: float | None = None
    offers: int = 0


@dataclass(frozen=True, slots=True)
class Lease:
    """The witness as this node last saw it (rules 8-10). ``until``: our clock, the lease we hold lasts at
    least until then (None: we hold none). ``suspended``: an active that stopped its service for want of the
    lease and starts it again when it renews or is confirmed; ``failsafe``: an active running on its peer's
    confirmation; ``forced``: an active started by ``--force``, which keeps running without the lease."""

    asking: str = ""  # the call in flight ("": none)
    next_call: float = 0.0
    reachable: bool | None = None  # None: not asked yet
    holder: str | None = None
    mine: bool = False
    stale_self: bool = False
    revision: int | None = None
    left: float | None = None
    until: float | None = None
    asked_at: float | None = None  # when the last answer's call was made
    error: str = ""
    failsafe: bool = False
    suspended: bool = False
    forced: bool = False
    forced_until: float | None = None  # forced, another holder seen: it steps down if the key outlives this
    failsafe_said: bool = False  # witness.failsafe alerted for this stretch of running on the peer's word
    alerted: bool = False  # witness.unreachable said for this outage


@dataclass(frozen=True, slots=True)
class Node:
    """The whole state of one agent's role machine. Build it with :func:`start`."""

    policy: Policy
    boot: int
    role: Role
    epoch: int  # INVARIANT: the epoch of the last PersistRole (or the one read at start-up)
    seen: int  # the highest epoch seen anywhere, >= epoch
    started_at: float
    service: ServiceState = ServiceState.UNKNOWN
    service_since: float = 0.0
    service_ops: int = 0  # service actions emitted whose ServiceResult has not come back
    stop_retry_at: float | None = None
    maintenance_until: float | None = None
    planned_stop: bool = False
    caught_up: bool = False
    fence_drained: bool = False  # what a fenced node tells in its acknowledgements
    peer: Heartbeat | None = None
    reachable: bool = False
    peer_down_since: float | None = None  # rule 1: our clock, first heartbeat of this outage
    hold: str | None = None  # why an automatic failover is held (alerted once per reason)
    quiet_until: float = 0.0  # no automatic promotion before this (after an abandoned one)
    last_auto: float | None = None
    attempts: int = 0
    promotion: Promotion | None = None
    demotion: Demotion | None = None
    idle: bool = False  # the sender has nothing waiting to be journaled (Replication.idle)
    handover: Handover | None = None
    rejoining: bool = False  # a Quarantine is running; the rejoin follows its result
    rejoin_retry_at: float = 0.0
    rejoin_failed: str = ""  # why the last quarantine failed (alerted once per reason)
    rejoin_asked: bool = False  # an operator asked: retried even without auto_rejoin
    peer_heard_at: float | None = None  # our clock, the last heartbeat from the peer
    peer_silent: bool = False  # a PeerSilent came after the last heartbeat (none: not known silent yet)
    peer_refused: bool = False  # silent, and its host refuses connections (PeerSilent.refused)
    peer_refused_at: float | None = None  # the last PeerSilent that said so, since the peer was last heard
    lease: Lease = Lease()

    @property
    def service_stopped(self) -> bool:
        """Known stopped: the last result or observation says so and no service action is in flight.

        INVARIANT: an acknowledgement is sent only when this holds."""
        return self.service_ops == 0 and self.service is ServiceState.STOPPED

    def maintenance_open(self, now: float) -> bool:
        return self.maintenance_until is not None and now < self.maintenance_until


@dataclass(frozen=True, slots=True)
class Step:
    state: Node
    actions: tuple[Action, ...]
    log: tuple[str, ...]  # "event.name key=value ...", one line per decision
    moves: tuple[Transition, ...]  # the rows of TRANSITIONS taken, in order


# ---- the cycle --------------------------------------------------------------------------------------------


class _Cycle:
    """Collects one step's results. Local to one call: the module keeps no state between calls."""

    __slots__ = ("actions", "log", "moves", "node", "now")

    def __init__(self, node: Node, now: float) -> None:
        self.node = node
        self.now = now
        self.actions: list[Action] = []
        self.log: list[str] = []
        self.moves: list[Transition] = []

    def set(self, **changes: Any) -> None:
        self.node = replace(self.node, **changes)

    def note(self, event: str, **ctx: object) -> None:
        self.log.append(" ".join([event, *(f"{k}={v}" for k, v in ctx.items())]))

    def emit(self, *actions: Action) -> None:
        for a in actions:
            if isinstance(a, StartService | StopService):
                self.node = replace(self.node, service_ops=self.node.service_ops + 1)
            self.actions.append(a)

    def alert(self, event: str, reason: str, **details: object) -> None:
        self.actions.append(Alert(event, reason, tuple((k, str(v)) for k, v in details.items())))
        self.note(f"alert.{event}", **details)

    def move(self, target: Role, event: str, **ctx: object) -> None:
        self.take(Transition(self.node.role, event, target), ctx)

    def take(self, row: Transition, ctx: dict[str, object]) -> None:
        if row not in _ALLOWED:
            raise LocalProtocolError(
                f"transition not in the table: {row.source} --{row.event}--> {row.target}"
            )
        self.moves.append(row)
        self.node = replace(self.node, role=row.target)
        self.note(row.event, role=row.target.value, epoch=self.node.epoch, **ctx)

    def result(self) -> Step:
        n = self.node
        # INVARIANT (rule 6): active only at the highest epoch seen.
        if n.role is Role.ACTIVE and n.epoch < n.seen:
            raise LocalProtocolError(f"active at epoch {n.epoch} after seeing {n.seen}")
        return Step(n, tuple(self.actions), tuple(self.log), tuple(self.moves))


# ---- public functions -------------------------------------------------------------------------------------


def start(policy: Policy, facts: Started, now: float) -> Step:
    """The first state, from the facts on disk. Every role stops the local service first: only an
    active that has been confirmed starts it."""
    role, epoch = facts.durable_role, facts.durable_epoch
    first = role is None
    if role is None:
        role = facts.initial_role
        epoch = max(epoch, 1 if role is Role.ACTIVE else 0)
    if role not in DURABLE_ROLES:
        raise LocalProtocolError(f"start-up role must be passive, active or fenced, not {role.value}")
    node = Node(policy=policy, boot=facts.boot, role=role, epoch=epoch, seen=epoch, started_at=now)
    c = _Cycle(node, now)
    c.emit(SetManual())
    if first:
        c.emit(PersistRole(role, epoch))
    c.emit(StopService())
    if role is Role.PASSIVE:
        c.emit(BecomeReceiver())
        c.take(Transition(None, "startup.passive", Role.PASSIVE), {"first": first})
    elif role is Role.FENCED:
        c.emit(StopReplication())
        c.take(Transition(None, "startup.fenced", Role.FENCED), {})
        _alert_fenced(c)
    else:
        c.emit(StopReplication())
        inf = float("inf")
        p = Promotion(Kind.RESTART, epoch, (facts.boot, 0), now, inf, inf, caught_up=False)
        c.set(promotion=p)
        c.take(Transition(None, "startup.waiting", Role.PROMOTING), {"first": first})
    return c.result()


def step(state: Node, event: Event, now: float) -> Step:
    """Absorb one event, then decide what the role calls for at ``now``."""
    c = _Cycle(state, now)
    match event:
        case Tick():
            pass
        case Heartbeat():
            _on_heartbeat(c, event)
        case PeerSilent():
            _on_silent(c, event)
        case LocalService():
            _on_local_service(c, event)
        case ServiceResult():
            _on_service_result(c, event)
        case FenceRequest():
            _on_fence_request(c, event)
        case FenceAck():
            _on_fence_ack(c, event)
        case FenceCommandResult():
            _on_fence_command(c, event)
        case Replication():
            c.set(caught_up=event.caught_up, idle=event.idle)
        case Failover():
            _on_failover(c, event)
        case MaintenanceStart():
            c.set(maintenance_until=event.until, peer_down_since=None)
            c.note("maintenance.started", until=event.until)
        case MaintenanceEnd():
            if c.node.maintenance_until is not None:
                c.set(maintenance_until=None)
                c.note("maintenance.ended")
        case Rejoin():
            _on_rejoin(c)
        case Quarantined():
            _on_quarantined(c, event)
        case Switchover():
            _on_switchover(c)
        case TreeMeasured():
            _on_tree_measured(c, event)
        case HandoverAnswer():
            _on_handover_answer(c, event)
        case HandoverAccepted():
            _on_handover_accepted(c, event)
        case WitnessAnswer():
            _on_witness(c, event)
        case Shutdown():
            c.set(planned_stop=True)
            n = c.node
            # Rule 8: nobody renews the lease of a stopped agent, so an active stops its service with it.
            stop = n.policy.witness and n.role is Role.ACTIVE and not n.service_stopped
            if stop:
                c.emit(StopService())
            c.note("agent.stopping", planned_stop=True, stops_service=stop)
    _decide(c)
    return c.result()


def tick(state: Node, now: float) -> Step:
    """Nothing new but time: deadlines, counts, retries."""
    return step(state, Tick(), now)


def beat(state: Node, now: float) -> Heartbeat:
    """The heartbeat this node sends now. A fenced node still sends heartbeats (never data)."""
    n = state
    if n.role is Role.ACTIVE:
        caught_up = n.caught_up
    elif n.role in (Role.DEMOTING, Role.FENCED):
        caught_up = n.fence_drained
    else:
        caught_up = False
    return Heartbeat(
        boot=n.boot,
        at=now,
        role=n.role,
        epoch=n.epoch,
        service=n.service if n.service_ops == 0 else ServiceState.UNKNOWN,
        maintenance=n.maintenance_open(now),
        planned_stop=n.planned_stop,
        caught_up=caught_up,
        echo=n.peer.boot if n.peer is not None else None,
        last_failover_age=None if n.last_auto is None else max(0.0, now - n.last_auto),
        switching=n.handover.stage if n.handover is not None else "",
    )


def handover_blocker(state: Node) -> str | None:
    """Why this node cannot start a switchover now, or None if it can."""
    n = state
    if n.role is not Role.ACTIVE:
        return f"this node is {n.role.value}; a switchover starts on the active"
    if n.handover is not None:
        return f"a switchover is already under way (stage {n.handover.stage})"
    if n.peer is None or not n.reachable:
        return "the passive's agent cannot be reached"
    if n.peer.role is not Role.PASSIVE:
        return f"the peer is {n.peer.role.value}, not passive"
    if n.service_ops:
        return "a service start or stop is in progress"
    if n.lease.suspended:
        return "the service is stopped for want of the witness's lease"
    return None


def epoch_from_revision(create_revision: int, seen_epoch: int) -> int:
    """The epoch a promotion persists when it won the leader key created at ``create_revision``.

    ``max(seen_epoch + 1, create_revision)``. etcd's revision is one counter for the whole cluster that
    only grows, so every later leader key has a higher create revision than every earlier one: two nodes
    that promote through the witness get epochs in the order etcd granted the key, whatever either of them
    saw. ``seen_epoch + 1`` keeps the epoch above everything this node has seen, which matters when epochs
    were also raised without the witness (a forced failover) or the etcd cluster was rebuilt and its
    revisions started again from 1: the epoch never goes back, at worst it stops following etcd's order
    until the revisions overtake it."""
    if isinstance(create_revision, bool) or not isinstance(create_revision, int) or create_revision < 1:
        raise ValueError(f"create_revision: expected an etcd revision >= 1, got {create_revision!r}")
    if isinstance(seen_epoch, bool) or not isinstance(seen_epoch, int) or seen_epoch < 0:
        raise ValueError(f"seen_epoch: expected an epoch >= 0, got {seen_epoch!r}")
    return max(seen_epoch + 1, create_revision)


# ---- events -----------------------------------------------------------------------------------------------


def _on_heartbeat(c: _Cycle, hb: Heartbeat) -> None:
    n, now = c.node, c.now
    if n.peer is not None and hb.boot == n.peer.boot and hb.at <= n.peer.at:
        return  # late or duplicated
    if not n.reachable:
        c.note("peer.reachable", peer_role=hb.role.value, peer_epoch=hb.epoch)
    last_auto = n.last_auto
    if hb.last_failover_age is not None:
        theirs = now - hb.last_failover_age
        last_auto = theirs if last_auto is None else max(last_auto, theirs)
    # Rule 1: positively not running, with nothing that holds a failover.
    down = (
        hb.role is Role.ACTIVE
        and hb.service is ServiceState.STOPPED
        and not hb.switching
        and not hb.planned_stop
        and not hb.maintenance
        and not n.maintenance_open(now)
    )
    since = (n.peer_down_since if n.peer_down_since is not None else now) if down else None
    c.set(
        peer=hb,
        reachable=True,
        seen=max(n.seen, hb.epoch),
        last_auto=last_auto,
        peer_down_since=since,
        peer_heard_at=now,
        peer_silent=False,
        peer_refused=False,
        peer_refused_at=None,
    )
    p = n.promotion
    if p is not None and p.kind is not Kind.RESTART and hb.role in (Role.ACTIVE, Role.DEMOTING, Role.FENCED):
        c.set(promotion=replace(p, caught_up=hb.caught_up))


def _on_silent(c: _Cycle, ev: PeerSilent) -> None:
    n = c.node
    if n.reachable:
        c.note("peer.silent", refused=ev.refused)
    c.set(reachable=False, peer_down_since=None, peer_silent=True, peer_refused=ev.refused)
    if ev.refused:
        c.set(peer_refused_at=c.now)
    if n.role is Role.PASSIVE and n.reachable and n.peer is not None and n.peer.role is Role.ACTIVE:
        c.alert(
            "failover.peer_unreachable",
            "the active's agent cannot be reached (a dead host and a partition look the same): its "
            "service is not counted as down and there is no failover without proof; failover --force "
            "on this node if you know the other is down",
            peer_service=n.peer.service.value,
        )
    if n.promotion is not None and n.promotion.kind is Kind.RESTART:
        c.alert(
            "startup.waiting",
            "durable role is active but the peer cannot be reached to confirm it saw no higher epoch; "
            "not starting the service (failover --force starts it alone)",
            epoch=n.epoch,
            start_alone_after=n.policy.start_alone_after,
        )


def _on_local_service(c: _Cycle, ev: LocalService) -> None:
    n = c.node
    c.set(service=ev.state, service_since=ev.since)
    if n.service_ops:
        return  # an action is in flight: its result settles the state
    if n.role is Role.ACTIVE and ev.state is ServiceState.STOPPED and n.service is not ServiceState.STOPPED:
        c.alert(
            "service.stopped",
            "the service stopped without being asked; the passive takes over after failover_after",
            since=ev.since,
        )
    if n.role is not Role.ACTIVE and ev.state is ServiceState.RUNNING:
        c.alert("service.unexpected_running", "the service runs on a node that is not active: stopping it")
        c.emit(StopService())


def _on_service_result(c: _Cycle, ev: ServiceResult) -> None:
    n = c.node
    c.set(service_ops=max(0, n.service_ops - 1))
    if ev.ok:
        state = ServiceState.RUNNING if ev.op is ServiceOp.START else ServiceState.STOPPED
        c.set(service=state, service_since=c.now)
        c.note("service.started" if ev.op is ServiceOp.START else "service.stopped", role=n.role.value)
        if state is ServiceState.RUNNING and n.role is not Role.ACTIVE and c.node.service_ops == 0:
            c.emit(StopService())  # cannot happen by construction: a demotion always queues a stop
        return
    c.set(service=ServiceState.UNKNOWN)
    c.alert(f"service.{ev.op.value}_failed", ev.reason or "no reason given", role=n.role.value)
    if ev.op is ServiceOp.STOP:
        c.set(stop_retry_at=c.now + n.policy.service_retry)


def _on_fence_request(c: _Cycle, ev: FenceRequest) -> None:
    n = c.node
    e = ev.epoch
    if n.role is Role.ACTIVE:
        if e > n.epoch:
            _demote(c, e, "demote.requested", drain=True, token=ev.token)
        else:
            c.note("fence.refused", asked=e)
        return
    if n.role is Role.PROMOTING:
        p = n.promotion
        assert p is not None
        if p.kind is Kind.RESTART:
            if e > n.epoch:
                _demote(c, e, "startup.superseded", drain=False, token=ev.token)
            else:
                c.note("fence.refused", asked=e)
            return
        if e <= p.epoch:
            c.note("fence.refused", asked=e, candidate=p.epoch)  # two promotions at once: neither wins
            return
        _abandon(c, "promote.yielded", asked=e)
        n = c.node  # now passive: answer as one
    if n.role is Role.DEMOTING:
        d = n.demotion
        assert d is not None
        if e < d.epoch:
            c.note("fence.refused", asked=e)
            return
        if e > d.epoch:
            c.emit(PersistRole(Role.FENCED, e))
            c.set(epoch=e, seen=max(n.seen, e))
        c.set(demotion=replace(d, epoch=e, token=ev.token, request_epoch=e))
        return
    # passive or fenced: neither runs the service; acknowledge once it is known stopped
    if e < n.epoch:
        c.note("fence.refused", asked=e)
        return
    if e > n.epoch:
        c.emit(PersistRole(n.role, e))
        c.set(epoch=e, seen=max(n.seen, e))
    if not c.node.service_stopped:
        if c.node.service_ops == 0:
            c.emit(StopService())
        c.note("fence.ack_deferred", asked=e, why="service not known stopped")
        return
    drained = True if n.role is Role.PASSIVE else n.fence_drained
    c.emit(SendFenceAck(e, ev.token, drained))
    c.note("fence.acknowledged", asked=e, role=n.role.value)


def _on_fence_ack(c: _Cycle, ev: FenceAck) -> None:
    p = c.node.promotion
    if c.node.role is not Role.PROMOTING or p is None or p.kind is Kind.RESTART:
        return
    if ev.token != p.token or ev.epoch != p.epoch:
        c.note("fence.stale_ack", epoch=ev.epoch)
        return
    _take_over(c, "promote.proven", via="acknowledgement", drained=ev.drained)


def _on_fence_command(c: _Cycle, ev: FenceCommandResult) -> None:
    p = c.node.promotion
    if c.node.role is not Role.PROMOTING or p is None or not p.command:
        c.note("fence.command_result_ignored", exit_code=ev.exit_code)
        return
    if ev.exit_code == 0:
        _take_over(c, "promote.proven", via="fence_command", drained=False)
        return
    c.alert(
        "failover.fence_command_failed",
        "the fence command did not exit 0: no proof the old active is down, not promoting",
        exit_code=ev.exit_code,
        kind=p.kind.value,
    )
    _abandon(c, "promote.abandoned", why="fence command failed")


def _on_failover(c: _Cycle, ev: Failover) -> None:
    n = c.node
    p = n.promotion
    if n.role is Role.PASSIVE:
        if ev.force and not n.reachable:
            _force_alone(c, "promote.forced_alone")
        else:
            _promote(c, Kind.FORCE if ev.force else Kind.MANUAL)
    elif n.role is Role.PROMOTING and p is not None:
        if p.kind is Kind.RESTART:
            if ev.force:
                _force_alone(c, "startup.forced_alone")
            else:
                c.note("command.noop", why="already waiting to start as active; --force starts alone")
        elif ev.force and p.kind is not Kind.FORCE:
            c.set(promotion=replace(p, kind=Kind.FORCE))
            c.note("promote.upgraded", kind="force")
        else:
            c.note("command.noop", why="already promoting")
    elif n.role is Role.ACTIVE:
        if n.lease.suspended:
            c.alert(
                "command.refused",
                "failover refused: the service is stopped for want of the witness's lease; it starts again "
                "when the lease is renewed or the peer confirms this node",
                role=n.role.value,
            )
        elif n.service_ops == 0 and n.service is not ServiceState.RUNNING:
            c.emit(StartService())
            c.note("service.restart", why="operator")
        else:
            c.note("command.noop", why="already active")
    else:
        c.alert(
            "command.refused",
            f"failover refused on a {n.role.value} node" + (": rejoin it first" if n.role is _F else ""),
            role=n.role.value,
        )


def _on_rejoin(c: _Cycle) -> None:
    n = c.node
    if n.role is not Role.FENCED:
        c.alert(
            "command.refused", f"rejoin refused: the node is {n.role.value}, not fenced", role=n.role.value
        )
        return
    if n.rejoining:
        c.note("command.noop", why="a rejoin is under way")
        return
    c.set(rejoin_asked=True)
    _start_rejoin(c, "operator")


def _start_rejoin(c: _Cycle, why: str) -> None:
    # INVARIANT: nothing of this node's data is overwritten before Quarantined(ok) (a fenced node refuses
    # the peer's sender); a crash in between leaves it fenced, and the next rejoin resumes the quarantine.
    c.emit(Quarantine(max(c.node.epoch, c.node.seen)))
    c.set(rejoining=True)
    c.note("rejoin.quarantining", why=why)


def _on_quarantined(c: _Cycle, ev: Quarantined) -> None:
    n = c.node
    if n.role is not Role.FENCED or not n.rejoining:
        c.note("rejoin.result_ignored", role=n.role.value)
        return
    c.set(rejoining=False)
    if not ev.ok:
        if ev.reason != n.rejoin_failed:
            c.alert(
                "rejoin.failed",
                f"this node's own changes could not be set aside ({ev.reason}): it stays fenced, nothing "
                "was overwritten, and it tries again",
                retry_in=REJOIN_RETRY,
            )
        c.set(rejoin_retry_at=c.now + REJOIN_RETRY, rejoin_failed=ev.reason)
        return
    epoch = max(n.epoch, n.seen)
    c.emit(PersistRole(Role.PASSIVE, epoch), BecomeReceiver())
    c.set(
        epoch=epoch,
        fence_drained=False,
        hold=None,
        peer_down_since=None,
        rejoin_failed="",
        rejoin_asked=False,
    )
    c.move(Role.PASSIVE, "rejoin", quarantined=ev.files)
    if ev.files:
        c.alert(
            "rejoin.quarantined",
            f"{ev.files} file(s) this node wrote that the active never had were moved aside, byte for byte, "
            "with a manifest (standby quarantine list); acknowledge them before a failback",
            files=ev.files,
            folder=ev.folder,
        )


# ---- switchover -------------------------------------------------------------------------------------------


def _on_switchover(c: _Cycle) -> None:
    n = c.node
    why = handover_blocker(n)
    if why is not None:
        c.alert("command.refused", f"switchover refused: {why}", role=n.role.value)
        return
    c.set(handover=Handover("stopping", c.now, c.now + n.policy.switchover_timeout))
    c.emit(StopService())
    c.note("switchover.stopping", epoch=n.epoch)


def _rollback(c: _Cycle, why: str) -> None:
    h = c.node.handover
    assert h is not None
    c.set(handover=None)
    _start_service(c, "switchover rolled back")
    c.alert(
        "switchover.rolled_back",
        f"switchover rolled back at stage {h.stage}: {why}; the service is started here again",
        stage=h.stage,
    )


def _on_tree_measured(c: _Cycle, ev: TreeMeasured) -> None:
    n = c.node
    h = n.handover
    if n.role is not Role.ACTIVE or h is None or h.stage != "measuring":
        return
    if not ev.digest:
        c.set(handover=replace(h, stage="draining", settled_from=None))
        c.note("switchover.measure_again", why=ev.reason)
        return
    c.emit(OfferHandover(n.epoch, ev.digest, ev.files))
    c.set(handover=replace(h, stage="offered", offers=h.offers + 1))
    c.note("switchover.offered", files=ev.files, digest=ev.digest)


def _on_handover_answer(c: _Cycle, ev: HandoverAnswer) -> None:
    n = c.node
    h = n.handover
    if n.role is not Role.ACTIVE or h is None or h.stage != "offered":
        return
    if ev.ok:
        pol = n.policy
        deadline = max(h.deadline, c.now + pol.fence_timeout + 2 * pol.fence_retry)
        c.set(handover=replace(h, stage="accepted", deadline=deadline))
        c.note("switchover.accepted")
    elif ev.retry:
        c.set(handover=replace(h, stage="draining", settled_from=None))
        c.note("switchover.drain_again", why=ev.reason)
    else:
        _rollback(c, f"the passive refused: {ev.reason}")


def _on_handover_accepted(c: _Cycle, ev: HandoverAccepted) -> None:
    n = c.node
    peer = n.peer
    if (
        n.role is Role.PASSIVE
        and n.reachable
        and peer is not None
        and peer.role is Role.ACTIVE
        and peer.epoch == ev.epoch
        and peer.switching
    ):
        _promote(c, Kind.SWITCHOVER, from_epoch=ev.epoch)
    else:
        c.note("switchover.not_taken", role=n.role.value, offered=ev.epoch)


# ---- the witness (rules 8-10) ------------------------------------------------------------------------------


def _ask(c: _Cycle, op: str) -> None:
    """Ask the witness, unless a call is in flight or it is not time yet (``Lease.next_call``)."""
    lease = c.node.lease
    if lease.asking or c.now < lease.next_call:
        return
    c.emit(AskWitness(op))
    c.set(lease=replace(lease, asking=op, next_call=c.now + c.node.policy.witness_interval))


def _ask_now(c: _Cycle) -> None:
    """The next :func:`_ask` goes out at once."""
    c.set(lease=replace(c.node.lease, next_call=c.now))


def _confirmed(n: Node, now: float) -> bool:
    """Rule 8: the peer says it is passive or fenced, in a heartbeat echoing one of ours sent within
    ``FAILSAFE_WINDOW`` (our clock on both ends: ``echo_at`` is our own ``at``)."""
    p = n.peer
    return (
        p is not None
        and n.reachable
        and p.role in (Role.PASSIVE, Role.FENCED)
        and p.echo == n.boot
        and p.echo_at is not None
        and n.started_at <= p.echo_at <= now  # of this boot: after a clock reset others mean nothing
        and now - p.echo_at <= FAILSAFE_WINDOW
    )


def _may_run(n: Node, now: float) -> bool:
    """Rule 8: this node may run its service as far as the witness is concerned: no witness, or it holds the
    lease with ``witness_margin`` to spare, or it was forced, or its peer confirms it."""
    pol, lease = n.policy, n.lease
    if not pol.witness or lease.forced:
        return True
    held = lease.mine and lease.until is not None and now < lease.until - pol.witness_margin
    return held or _confirmed(n, now)


def _start_service(c: _Cycle, why: str) -> None:
    """StartService for a node that is (becoming) active; with a witness, only if rule 8 allows it now,
    otherwise it waits suspended and starts when it holds the lease or is confirmed."""
    n = c.node
    if _may_run(n, c.now):
        c.emit(StartService())
        return
    c.set(lease=replace(n.lease, suspended=True))
    c.note("witness.start_deferred", why=why)


def _wants_key(c: _Cycle) -> bool:
    """This node would take the key now: an active, a proven promotion, a passive whose way to take over by
    the witness is open. Only these ask again within ``WITNESS_RETRY``; others keep ``witness_interval``."""
    n = c.node
    if n.role is Role.ACTIVE:
        return True
    if n.role is Role.PROMOTING:
        return n.promotion is not None and n.promotion.proven is not None
    return n.role is Role.PASSIVE and _witness_blocker(c) is None


def _on_witness(c: _Cycle, ev: WitnessAnswer) -> None:
    n = c.node
    lease = n.lease
    asking = "" if ev.op == lease.asking else lease.asking
    if not ev.reachable:
        c.set(
            lease=replace(
                lease,
                asking=asking,
                reachable=False,
                error=ev.error,
                next_call=min(lease.next_call, c.now + WITNESS_RETRY) if _wants_key(c) else lease.next_call,
            )
        )
        if not lease.alerted:
            c.set(lease=replace(c.node.lease, alerted=True))
            c.alert(
                "witness.unreachable",
                f"the witness cannot be reached ({ev.error or 'no answer'}): no failover by the witness; "
                "an active keeps its service only while its lease lasts or its peer confirms it",
                role=n.role.value,
            )
        return
    until = ev.asked_at + ev.left if ev.mine and ev.left is not None else None
    if lease.alerted:
        c.note("witness.reachable", holder=ev.holder)
    nxt = lease.next_call
    if ev.holder is None and _wants_key(c):
        nxt = min(nxt, c.now + WITNESS_RETRY)  # absent, and this node wants it: ask again soon
    elif n.role is not Role.ACTIVE:
        if ev.left is not None:
            nxt = min(nxt, ev.asked_at + ev.left + 0.5)  # look again when the holder's lease could end
        if _wants_key(c):
            nxt = min(nxt, c.now + WITNESS_RETRY)  # a proven promotion waits for the key
    c.set(
        lease=replace(
            lease,
            asking=asking,
            reachable=True,
            holder=ev.holder,
            mine=ev.mine,
            stale_self=ev.stale_self,
            revision=ev.revision,
            left=ev.left,
            until=until,
            asked_at=ev.asked_at,
            error="",
            alerted=False,
            next_call=nxt,
        )
    )
    n = c.node
    p = n.promotion
    if ev.mine:
        rev = ev.revision or 1
        if n.role is Role.PASSIVE and ev.op == "acquire" and _witness_blocker(c) is None:
            _witness_take_over(c, rev)
        elif n.role is Role.PROMOTING and p is not None and p.proven is not None:
            event, via, drained = p.proven
            _take_over(c, event, via=via, drained=drained, revision=rev)
        elif n.role is not Role.ACTIVE and not (n.role is Role.PROMOTING and p is not None):
            c.emit(AskWitness("release"))
            c.set(lease=replace(c.node.lease, mine=False, until=None))
            c.note("witness.releasing", role=n.role.value)
        return
    restart = n.role is Role.PROMOTING and p is not None and p.kind is Kind.RESTART
    other = ev.holder is not None and not ev.stale_self and ev.revision is not None
    lease = c.node.lease
    if other and n.role is Role.ACTIVE and lease.forced and ev.left is not None:
        # A --force while the old active's lease still ran: step down only if the key outlives that lease
        # (renewed by a live holder), not because of what was left of a dead one.
        if lease.forced_until is None:
            end = ev.asked_at + ev.left + 0.5
            c.set(lease=replace(lease, forced_until=end, next_call=min(lease.next_call, end)))
            c.note("witness.forced_waits", holder=ev.holder, left=ev.left)
            return
        if ev.asked_at < lease.forced_until:
            return
    if other and ev.revision is not None and (n.role is Role.ACTIVE or restart):
        # Another node holds the key: the witness says it leads. Its epoch is at least the revision.
        c.alert(
            "witness.superseded",
            f"the witness holds the leader key for {ev.holder}: this node steps down (fenced)",
            holder=ev.holder,
            revision=ev.revision,
        )
        _demote(
            c,
            max(n.epoch, n.seen, ev.revision),
            "demote.witness" if n.role is Role.ACTIVE else "startup.superseded",
            drain=False,
            token=None,
        )


def _witness_blocker(c: _Cycle) -> tuple[str, str] | None:
    """Rule 9 for a passive whose active went silent: why it must not take over by the witness now (a hold
    reason and its explanation), or None."""
    n, now, pol = c.node, c.now, c.node.policy
    peer = n.peer
    if peer is None or peer.role is not Role.ACTIVE or not n.peer_silent:
        return ("", "")  # a reachable active is asked first (rules 1-3); PeerSilent also says if it refuses
    silent_for = now - (n.peer_heard_at if n.peer_heard_at is not None else n.started_at)
    if silent_for < max(pol.failover_after, FAILSAFE_WINDOW + pol.witness_margin) or now < n.quiet_until:
        return ("", "")
    if peer.planned_stop:
        return ("planned_stop", "the active announced a planned stop before it went silent: not taking over")
    refused_lately = (
        n.peer_refused_at is not None and now - n.peer_refused_at < FAILSAFE_WINDOW + pol.witness_margin
    )
    if n.peer_refused or refused_lately:
        # Its agent was down with its host up (its service may have run on unleased); an agent that comes
        # back stops the service first and is heard within seconds: wait as long as a confirmation lasts.
        return (
            "agent_down",
            "the active's host refuses connections: it is up but its agent is not, so its service may still "
            "run; no failover by the witness until the agent is back or the host stops answering",
        )
    if n.maintenance_open(now) or peer.maintenance:
        return ("maintenance", "the active is silent, but a maintenance window is open")
    lag = peer.lag if peer.lag is not None else (0 if peer.caught_up else None)
    if lag is None or lag > pol.max_lag:
        return (
            "lag",
            f"the active went silent {'with an unknown lag' if lag is None else f'{lag} entries ahead'} "
            f"(max_lag {pol.max_lag}): not taking over by the witness; failover --force accepts the loss",
        )
    if n.last_auto is not None and now - n.last_auto < pol.flap_window:
        return (
            "flap_window",
            "the active is silent, but an automatic failover already happened within flap_window",
        )
    if n.lease.reachable is False:
        return (
            "witness_unreachable",
            "the active's agent is silent and the witness cannot be reached (a dead host and a partition "
            "look the same): no failover",
        )
    return None


def _witness_passive(c: _Cycle) -> bool:
    """Rule 9. True when the witness decided this step (the active is silent long enough)."""
    blocker = _witness_blocker(c)
    if blocker == ("", ""):
        _ask(c, "look")
        return False
    if blocker is not None:
        _hold(c, *blocker)
        _ask(c, "look")
        return True
    lease = c.node.lease
    if (
        lease.holder is None
        and lease.asked_at is not None
        and lease.next_call > lease.asked_at + WITNESS_RETRY
    ):
        lease = replace(lease, next_call=lease.asked_at + WITNESS_RETRY)  # it wants the key now: ask soon
        c.set(lease=lease)
    if lease.holder is None and lease.asked_at is not None and lease.asked_at >= (c.node.peer_heard_at or 0):
        _ask(c, "acquire")
    else:
        _ask(c, "look")  # the active's lease has not ended yet
    return True


def _witness_take_over(c: _Cycle, revision: int) -> None:
    n = c.node
    epoch = epoch_from_revision(revision, max(n.epoch, n.seen))
    peer = n.peer
    lag = None if peer is None else peer.lag
    # INVARIANT (rule 4): PersistRole(ACTIVE) comes before StartService in the same list.
    c.emit(PersistRole(Role.ACTIVE, epoch), BecomeSender(), StartService())
    c.set(epoch=epoch, seen=max(n.seen, epoch), hold=None, peer_down_since=None, last_auto=c.now)
    c.move(Role.ACTIVE, "promote.witness", revision=revision)
    c.alert(
        "failover.done",
        "this node is now active (witness: the active was silent and its lease ended)",
        epoch=epoch,
        revision=revision,
    )
    if lag:
        c.alert(
            "failover.behind",
            f"the old active's last heartbeat said {lag} journal entries were not acknowledged: they stay on "
            "it, and are set aside in its quarantine when it rejoins",
            epoch=epoch,
        )


def _witness_active(c: _Cycle) -> None:
    """Rule 8 on the active: keep the key, and the service only while the lease or the peer allows."""
    n, now, pol = c.node, c.now, c.node.policy
    lease = n.lease
    _ask(c, "renew" if lease.mine else "acquire" if lease.holder is None else "look")
    lease = c.node.lease
    held = lease.mine and lease.until is not None and now < lease.until - pol.witness_margin
    confirmed = _confirmed(n, now)
    # A forced node runs without the lease until it holds it or its peer is back to confirm it; from then
    # on the usual rule applies (a peer that hears it again may take the key once it stops hearing it).
    forced = lease.forced and not held and not confirmed
    if held or forced or confirmed:
        failsafe = not held and not forced
        said = lease.failsafe_said and failsafe
        if failsafe and not said and lease.reachable is False:
            said = True
            c.alert(
                "witness.failsafe",
                "the witness lease could not be renewed, but the peer confirms it is passive and hears this "
                "node: keeping the service (it stops if the confirmation stops too)",
            )
        c.set(lease=replace(lease, failsafe=failsafe, forced=forced, failsafe_said=said))
        if lease.suspended and n.handover is None:
            c.set(lease=replace(c.node.lease, suspended=False))
            if n.service_ops == 0 and n.service is not ServiceState.RUNNING:
                c.emit(StartService())
            c.note("witness.resumed", held=held)
        return
    if n.handover is not None:
        return  # a switchover stopped the service already; its rollback starts it only as rule 8 allows
    if not lease.suspended:
        c.set(lease=replace(lease, suspended=True, failsafe=False, forced=False))
        c.alert(
            "witness.lease_lost",
            "the witness lease was not renewed within ttl - safety_margin and the peer does not confirm "
            "it is passive: stopping the service before the lease can end (it starts again when the lease is "
            "renewed or the peer confirms)",
            reachable=lease.reachable,
        )
    # Until it may run again: stopped, and stopped again if a stop failed or the service came back.
    n = c.node
    if n.service_ops == 0 and n.service is not ServiceState.STOPPED and n.stop_retry_at is None:
        c.emit(StopService())
    else:
        _retry_stop(c)


# ---- decisions --------------------------------------------------------------------------------------------


def _decide(c: _Cycle) -> None:
    """What the role calls for now. Runs again after a change of role, so one step can take several."""
    n = c.node
    if n.maintenance_until is not None and c.now >= n.maintenance_until:
        c.set(maintenance_until=None)
        c.note("maintenance.expired")
    restart = n.promotion is not None and n.promotion.kind is Kind.RESTART
    if n.seen > n.epoch and (
        n.role in (Role.PASSIVE, Role.FENCED) or (n.role is Role.PROMOTING and not restart)
    ):
        # Rule 6 across restarts: a forced promotion after a crash must still pick an epoch above this.
        durable = Role.FENCED if n.role is Role.FENCED else Role.PASSIVE
        c.emit(PersistRole(durable, n.seen))
        c.set(epoch=n.seen)
    for _ in range(len(Role) + 2):
        before = c.node.role
        {
            Role.PASSIVE: _decide_passive,
            Role.PROMOTING: _decide_promoting,
            Role.ACTIVE: _decide_active,
            Role.DEMOTING: _decide_demoting,
            Role.FENCED: _decide_fenced,
        }[before](c)
        if c.node.role is before:
            return
    raise LocalProtocolError("role machine did not settle")  # pragma: no cover


def _retry_stop(c: _Cycle) -> None:
    n = c.node
    if (
        n.stop_retry_at is not None
        and c.now >= n.stop_retry_at
        and n.service_ops == 0
        and not n.service_stopped
    ):
        c.set(stop_retry_at=None)
        c.emit(StopService())
        c.note("service.stop_retry", role=n.role.value)


def _hold(c: _Cycle, reason: str | None, why: str = "") -> None:
    """Alert once per reason for holding back; ``None`` ends the episode."""
    if c.node.hold == reason:
        return
    c.set(hold=reason)
    if reason == "conflict":
        c.alert("startup.conflict", why, epoch=c.node.epoch)
    elif reason is not None:
        c.alert(f"failover.held_{reason}", why, failover_after=c.node.policy.failover_after)


def _decide_passive(c: _Cycle) -> None:
    _retry_stop(c)
    if c.node.policy.witness and _witness_passive(c):
        return
    n, now, pol = c.node, c.now, c.node.policy
    peer = n.peer
    if peer is None or not n.reachable:
        _hold(c, None)
        return
    maintenance = n.maintenance_open(now) or peer.maintenance
    if peer.role is Role.ACTIVE and peer.planned_stop:
        _hold(c, "planned_stop", "the active announced a planned stop: not counting its service as failed")
        return
    if peer.role is Role.ACTIVE and peer.switching:
        _hold(c, None)  # a switchover: the active stopped its service on purpose
        return
    if peer.role is Role.ACTIVE and peer.service is ServiceState.STOPPED:
        if maintenance:
            _hold(c, "maintenance", "the active's service is not running, but a maintenance window is open")
            return
        since = n.peer_down_since
        if since is None or now - since < pol.failover_after or now < n.quiet_until:
            _hold(c, None)
            return
        if n.last_auto is not None and now - n.last_auto < pol.flap_window:
            _hold(
                c,
                "flap_window",
                "the active's service is down, but an automatic failover already happened within "
                "flap_window: alerting only",
            )
            return
        _promote(c, Kind.AUTO, down_for=now - since)
        return
    if peer.role is Role.FENCED and not maintenance and now >= n.quiet_until:
        _promote(c, Kind.FINISH, peer_epoch=peer.epoch)
        return
    _hold(c, None)


def _decide_promoting(c: _Cycle) -> None:
    n, now, pol = c.node, c.now, c.node.policy
    p = n.promotion
    assert p is not None
    peer = n.peer
    fresh = peer if (peer is not None and n.reachable) else None
    if p.kind is Kind.RESTART:
        if pol.witness and not n.reachable:
            _ask(c, "look")  # rule 10: another holder makes this node step down
        if n.seen > n.epoch:
            _demote(c, n.seen, "startup.superseded", drain=False, token=None)
        elif fresh is not None and fresh.role is Role.ACTIVE and fresh.epoch == n.epoch:
            c.alert(
                "failover.split_brain", "the peer is active at our epoch: not starting, fencing this node"
            )
            _demote(c, n.epoch, "startup.superseded", drain=False, token=None)
        elif (
            fresh is not None
            and fresh.echo == n.boot
            and fresh.role in (Role.PASSIVE, Role.FENCED)
            and fresh.epoch <= n.epoch
        ):
            c.emit(BecomeSender())
            c.set(promotion=None)
            _start_service(c, "startup.confirmed")
            c.move(Role.ACTIVE, "startup.confirmed", peer_role=fresh.role.value, peer_epoch=fresh.epoch)
        elif (
            fresh is not None
            and fresh.role is Role.PROMOTING
            and fresh.epoch == n.epoch
            and now - n.started_at >= pol.fence_timeout + pol.failover_after
        ):
            # Two durable actives at one epoch (a forced promotion that never heard the other): each
            # waits for the other. Only an operator can choose: failover --force on the one to keep.
            _hold(
                c,
                "conflict",
                "the peer also waits to start as active at our epoch: failover --force on the node to keep",
            )
        elif (
            not n.reachable
            and pol.start_alone_after is not None
            and now - n.started_at >= pol.start_alone_after
        ):
            c.alert(
                "startup.alone",
                "the peer never confirmed and start_alone_after has elapsed: starting the service alone; "
                "if the peer promoted meanwhile, both run until one sees the other's epoch",
                epoch=n.epoch,
            )
            c.emit(BecomeSender())
            c.set(promotion=None)
            _start_service(c, "startup.alone")
            c.move(Role.ACTIVE, "startup.alone")
        return
    if n.seen > p.epoch or (fresh is not None and fresh.role is Role.ACTIVE and fresh.epoch >= p.epoch):
        _abandon(c, "promote.yielded", seen=n.seen)
        return
    if p.proven is not None:  # rule 8: proven, waiting for the witness's key
        if p.kind is Kind.FORCE:
            event, via, drained = p.proven
            _take_over(c, event, via=via, drained=drained)
        else:
            _ask(c, "acquire")
        return
    # proof by heartbeat: sent after the peer heard this boot, fenced at exactly our candidate
    if fresh is not None and fresh.echo == n.boot and fresh.role is Role.FENCED and fresh.epoch == p.epoch:
        _take_over(c, "promote.proven", via="heartbeat", drained=fresh.caught_up)
        return
    if fresh is not None and fresh.role is Role.DEMOTING and fresh.epoch == p.epoch:
        p = replace(p, deadline=max(p.deadline, now + pol.fence_timeout))  # it is stopping for us
        c.set(promotion=p)
    if p.command:
        return  # wait for the fence command's result
    if not n.reachable or now >= p.deadline:
        why = (
            "the peer's agent cannot be reached" if not n.reachable else "no acknowledgement in fence_timeout"
        )
        if p.kind is Kind.SWITCHOVER:
            c.alert("switchover.no_ack", f"switchover: {why}; not taking over", epoch=p.epoch)
            _abandon(c, "promote.abandoned", why=why)
        elif p.kind is Kind.FORCE:
            c.alert(
                "failover.forced",
                f"failover --force: {why}; ASSUMING THE OTHER NODE IS DOWN and starting the service here. "
                "If its service still runs, both run until it sees the new epoch",
                epoch=p.epoch,
            )
            _take_over(c, "promote.forced", via="operator", drained=False)
        elif pol.fence_command and not p.tried_command:
            if p.kind in (Kind.AUTO, Kind.MANUAL) and not p.caught_up:
                c.alert(
                    "failover.not_caught_up",
                    f"{why} and this node was not caught up: not fencing it by command, not promoting",
                    kind=p.kind.value,
                )
                _abandon(c, "promote.abandoned", why="not caught up")
            else:
                c.emit(RunFenceCommand())
                c.set(promotion=replace(p, command=True, tried_command=True))
                c.note("fence.command", why=why)
        else:
            c.alert(
                "failover.no_proof",
                f"{why} and no fence command proved it down (a dead host and a partition look the same): "
                "not promoting",
                kind=p.kind.value,
                epoch=p.epoch,
            )
            _abandon(c, "promote.abandoned", why=why)
        return
    if now >= p.next_request:
        c.emit(RequestFence(p.epoch, p.token))
        c.set(promotion=replace(p, next_request=now + pol.fence_retry))


def _decide_active(c: _Cycle) -> None:
    n = c.node
    if n.seen > n.epoch:
        _demote(c, n.seen, "demote.higher_epoch", drain=False, token=None)
        return
    peer = n.peer
    if n.reachable and peer is not None and peer.role is Role.ACTIVE and peer.epoch == n.epoch:
        c.alert("failover.split_brain", "both nodes are active at the same epoch: both step down")
        _demote(c, n.epoch, "demote.split_brain", drain=False, token=None)
        return
    if n.policy.witness:
        _witness_active(c)
    if n.handover is not None:
        _decide_handover(c)


def _decide_handover(c: _Cycle) -> None:
    n, now = c.node, c.now
    h = n.handover
    assert h is not None
    if h.stage != "accepted" and not n.reachable:
        _rollback(c, "the passive's agent cannot be reached")
        return
    if now >= h.deadline:
        _rollback(c, "not taken over within switchover_timeout" if h.stage == "accepted" else "timed out")
        return
    if h.stage == "stopping" and n.service_stopped:
        h = replace(h, stage="draining", settled_from=None)
        c.set(handover=h)
        c.note("switchover.stopped")
    if h.stage == "draining":
        if n.caught_up and n.idle and n.service_stopped:
            if h.settled_from is None:
                c.set(handover=replace(h, settled_from=now))
            elif now - h.settled_from >= n.policy.handover_settle:
                c.emit(MeasureTree())
                c.set(handover=replace(h, stage="measuring"))
                c.note("switchover.drained")
        elif h.settled_from is not None:
            c.set(handover=replace(h, settled_from=None))


def _decide_demoting(c: _Cycle) -> None:
    n, now = c.node, c.now
    d = n.demotion
    assert d is not None
    if n.seen > d.epoch:  # a still higher epoch: fenced at that one
        c.emit(PersistRole(Role.FENCED, n.seen))
        d = replace(d, epoch=n.seen)
        c.set(epoch=n.seen, demotion=d)
    _retry_stop(c)
    if not c.node.service_stopped:
        return
    drain_left = d.since + n.policy.drain_timeout - now
    if d.drain and not n.caught_up and drain_left > 0 and n.reachable:
        return
    drained = d.drain and n.caught_up
    if d.drain:
        c.emit(StopReplication())
    if d.token is not None:
        c.emit(SendFenceAck(d.request_epoch, d.token, drained))
    c.set(demotion=None, fence_drained=drained)
    c.move(Role.FENCED, "demote.done", drained=drained)
    _alert_fenced(c)


def _decide_fenced(c: _Cycle) -> None:
    _retry_stop(c)
    if c.node.policy.witness:
        _ask(c, "look")
    n = c.node
    peer = n.peer
    if n.rejoining or c.now < n.rejoin_retry_at:
        return
    if n.rejoin_asked and n.rejoin_failed:
        _start_rejoin(c, "operator (again)")
    elif (
        n.policy.auto_rejoin
        and n.reachable
        and peer is not None
        and peer.role is Role.ACTIVE
        and peer.epoch >= n.epoch
        and peer.service is ServiceState.RUNNING
        and n.service_stopped
    ):
        _start_rejoin(c, f"the peer runs the service as active at epoch {peer.epoch}")


# ---- moves ------------------------------------------------------------------------------------------------


def _promote(c: _Cycle, kind: Kind, **ctx: object) -> None:
    n, now = c.node, c.now
    candidate = max(n.epoch, n.seen) + 1  # rule 6: above everything seen
    attempts = n.attempts + 1
    caught_up = n.peer is not None and n.peer.role is not Role.PASSIVE and n.peer.caught_up
    p = Promotion(
        kind=kind,
        epoch=candidate,
        token=(n.boot, attempts),
        since=now,
        deadline=now + n.policy.fence_timeout,
        next_request=now,
        caught_up=caught_up,
    )
    c.set(promotion=p, attempts=attempts, hold=None, peer_down_since=None)
    c.move(Role.PROMOTING, f"promote.{kind.value}", candidate=candidate, **ctx)


def _take_over(c: _Cycle, event: str, *, via: str, drained: bool, revision: int | None = None) -> None:
    n = c.node
    p = n.promotion
    assert p is not None
    forced = p.kind is Kind.FORCE
    if n.policy.witness and revision is None and not forced:
        # Rule 8: proven, but the service starts only once this node holds the witness's key.
        if p.proven is None:
            c.set(promotion=replace(p, proven=(event, via, drained)))
            _ask_now(c)
            _ask(c, "acquire")
            c.note("promote.awaiting_witness", via=via)
        return
    epoch = p.epoch if revision is None else max(p.epoch, epoch_from_revision(revision, max(n.epoch, n.seen)))
    # INVARIANT (rule 4): PersistRole(ACTIVE) comes before StartService in the same list.
    c.emit(PersistRole(Role.ACTIVE, epoch), BecomeSender(), StartService())
    c.set(
        epoch=epoch,
        seen=max(n.seen, epoch),
        promotion=None,
        last_auto=c.now if p.kind is Kind.AUTO else n.last_auto,
        hold=None,
        lease=replace(n.lease, forced=forced and n.policy.witness),
    )
    c.move(Role.ACTIVE, event, via=via, kind=p.kind.value)
    c.alert("failover.done", f"this node is now active ({p.kind.value}, proof: {via})", epoch=epoch)
    if not drained and not p.caught_up:
        c.alert(
            "failover.behind",
            "promoted without knowing that every change of the old active reached this node; "
            "the fenced node keeps its data untouched",
            epoch=p.epoch,
        )


def _force_alone(c: _Cycle, event: str) -> None:
    n = c.node
    if n.role is Role.PASSIVE:
        epoch = max(n.epoch, n.seen) + 1
        c.emit(PersistRole(Role.ACTIVE, epoch))
        c.set(epoch=epoch, seen=epoch)
        assumes = "ASSUMING THE OTHER NODE IS DOWN (it cannot be reached)"
    else:
        assumes = "ASSUMING THE PEER DID NOT PROMOTE while this node was away (it cannot be reached)"
    c.alert(
        "failover.forced",
        f"failover --force: {assumes}; starting the service without proof. If the other node's "
        "service runs, both run until one sees the other's epoch",
        epoch=c.node.epoch,
    )
    c.emit(BecomeSender(), StartService())
    c.set(promotion=None, hold=None, lease=replace(c.node.lease, forced=c.node.policy.witness))
    c.move(Role.ACTIVE, event, via="operator")


def _abandon(c: _Cycle, event: str, **ctx: object) -> None:
    n = c.node
    c.set(promotion=None, quiet_until=c.now + n.policy.fence_timeout, peer_down_since=None)
    c.move(Role.PASSIVE, event, **ctx)


def _demote(c: _Cycle, epoch: int, event: str, *, drain: bool, token: Token | None) -> None:
    n = c.node
    # INVARIANT: fenced is durable before the stop, so a crash anywhere after this never restarts the
    # service; the acknowledgement waits for the stop's result (Node.service_stopped).
    c.emit(PersistRole(Role.FENCED, epoch), SetManual(), StopService())
    if not drain:
        c.emit(StopReplication())
    lease = n.lease
    if n.policy.witness and (lease.mine or lease.asking == "acquire"):
        c.emit(AskWitness("release"))  # hand the key over at once rather than when the lease ends
    c.set(lease=replace(lease, mine=False, until=None, suspended=False, failsafe=False, forced=False))
    d = Demotion(epoch=epoch, since=c.now, drain=drain, token=token, request_epoch=epoch)
    c.set(epoch=epoch, seen=max(n.seen, epoch), demotion=d, promotion=None, handover=None)
    c.move(Role.DEMOTING, event, drain=drain)


def _alert_fenced(c: _Cycle) -> None:
    c.alert(
        "node.fenced",
        "this node is fenced: its service stays stopped, it sends nothing and its data is kept untouched; "
        "it rejoins as passive by itself once the peer runs the service (its own changes are moved to "
        "quarantine first), or run rejoin",
        epoch=c.node.epoch,
    )
