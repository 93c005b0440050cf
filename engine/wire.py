"""The replication protocol as sans-I/O state machines: bytes in, events out, bytes to send.

No sockets, no asyncio, no clock. Every frame is a :mod:`engine.codec` frame. Maps carry their kind in
``"k"``; a put's content travels as bare bytes frames right after its entry header, exactly as the journal
stores it (the sender streams journal bytes untouched).

Conversation (S = sender, observer or agent, R = receiver)::

    S: hello {v, node, epoch, role}           role "sender" streams; "observer" only asks manifests;
                                               "agent": the agent conversation follows the welcome
    R: welcome {v, node, journal, seq, epoch}  or  refuse {code, reason}, then close
    S: stream {journal, from}                  sender only: entries follow, seqs consecutive from `from`
    S: e {s, o, p, ...}  [bytes] * c           entries (header, then c content chunks)
    S: mreq {id, include[, full]}              manifest request, answered after all earlier entries
    S: ping {ts}                               when it has sent nothing else for a while
    R: ack {seq, problems}                     all entries <= seq are durable on the replica
    R: mpart {id, entries} ... mend {id, seq}  manifest of the replica as of entry `seq`
    R: pong {ts}                               the answer to a ping, or unsolicited as a heartbeat

The agent conversation (:class:`AgentProtocol`): the agent that dials says ``hello`` with role "agent" and
reads ``welcome`` (or ``refuse``) through :class:`SenderProtocol`, the agent that answers reads the hello
through :class:`ReceiverProtocol`. After the welcome, both sides are alike and either may send any of::

    hb {boot, at, role, epoch, service, maintenance, planned_stop, caught_up[, echo][, last_failover_age]
        [, switching][, preferred][, quarantined][, lag][, utc, tz, tz_offset][, echo_at, echo_held]}
                                               a failover.Heartbeat, about once a second
    fence {epoch, token: [boot, attempt]}      failover.RequestFence: fence yourself at epoch
    fack {epoch, token, drained}               failover.SendFenceAck: my service has stopped
    cmd {name, args}                           an operator command for the peer's agent (AGENT_COMMANDS)
    reply {name, ok, text, data}               the answer to the oldest unanswered command from the peer
    blob {offset, data}                        a piece of a file announced by a command (an installer)

Hand-over: the hello (on R) and the welcome (on S) are the last frames the replication protocols parse on
an agent connection; bytes that came behind them in the same read are the agent conversation's. After
the welcome, each side calls ``take_buffered()`` (which closes the replication protocol) and starts
``AgentProtocol(buffered)`` with those bytes; until then ``next_event()`` refuses to parse them.

Liveness (both sides, see :class:`Liveness`): each side sends something at least every third of the
silence timeout (entries or pings one way, acks or pongs the other), and a peer from which no whole
frame has come for the silence timeout is dropped (:class:`PeerSilent`). Bytes that never complete a frame
(a flipped length, a stalled proxy trickling) do not count as life. Agents use the same :class:`Liveness`:
the heartbeats they send every second are the traffic (there is no agent ping), so the agent's silence
timeout is at least three heartbeat intervals; a heartbeat is also what to send when ``due()``.

Rules (the transition table):
- R accepts only ``hello`` first; S accepts only ``welcome``/``refuse`` first.
- After ``welcome``, an observer may send ``mreq``/``ping`` only.
- A sender's ``stream`` comes once, before any entry; entry seqs are consecutive from ``from``.
- While a put's chunks are due, only bytes frames are accepted, and bytes frames nowhere else.
- An agent sends nothing on the replication side after its hello: R parses no frame after it, S none
  after the welcome, and both hand the rest over (``take_buffered()``, once, after the welcome).
- Agents: ``hb``, ``fence``, ``fack``, ``cmd`` and ``reply`` come in any order, both ways. A ``reply``
  answers the oldest unanswered ``cmd`` sent the other way and carries its name; at most
  AGENT_MAX_UNANSWERED commands are unanswered each way. Command names are AGENT_COMMANDS only; strings
  hold at most AGENT_MAX_STRING characters, ``args`` and ``data`` at most AGENT_MAX_KEYS keys. Integers
  are never booleans, epochs, boots and tokens never negative; unknown keys are ignored (a newer peer
  may add fields), unknown kinds and unknown enum values are faults.
A peer that breaks a rule gets :class:`RemoteProtocolError`; we breaking one is :class:`LocalProtocolError`.
"""

from __future__ import annotations

import collections
import enum
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

from engine import codec, failover
from engine.errors import FrameError, LocalProtocolError, RemoteProtocolError
from engine.model import PROTOCOL_VERSION, Change, FileMeta

MANIFEST_PART_ENTRIES = 2000


# ---- events ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    node: str
    epoch: int
    role: str


@dataclass(frozen=True, slots=True)
class Welcome:
    version: int
    node: str
    journal: str
    seq: int
    epoch: int


@dataclass(frozen=True, slots=True)
class Refused:
    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class StreamStart:
    journal: str
    first: int


@dataclass(frozen=True, slots=True)
class EntryHeader:
    change: Change


@dataclass(frozen=True, slots=True)
class Chunk:
    seq: int
    data: bytes
    last: bool


@dataclass(frozen=True, slots=True)
class ManifestRequest:
    id: int
    include: tuple[str, ...]
    full: bool = False  # hash every file, ignoring the receiver's hash cache (absent on the wire: False)


@dataclass(frozen=True, slots=True)
class Problem:
    """A record the receiver could not apply as asked; the position still advances past it."""

    seq: int
    path: str
    code: str  # "refused" (bad path or content), "missing-source" (rename), "error"
    reason: str

    def to_wire(self) -> list[Any]:
        return [self.seq, self.path, self.code, self.reason]


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    problems: tuple[Problem, ...] = ()


@dataclass(frozen=True, slots=True)
class ManifestPart:
    id: int
    entries: tuple[FileMeta, ...]


@dataclass(frozen=True, slots=True)
class ManifestEnd:
    id: int
    seq: int


@dataclass(frozen=True, slots=True)
class Ping:
    ts: int


@dataclass(frozen=True, slots=True)
class Pong:
    ts: int


SenderEvent = Welcome | Refused | Ack | ManifestPart | ManifestEnd | Pong
ReceiverEvent = Hello | StreamStart | EntryHeader | Chunk | ManifestRequest | Ping


class State(enum.Enum):
    HANDSHAKE = "handshake"
    READY = "ready"  # handshake done; sender: before `stream`
    STREAMING = "streaming"
    CLOSED = "closed"


def _field(d: dict[str, Any], key: str, typ: type, what: str) -> Any:
    v = d.get(key)
    if not isinstance(v, typ) or (isinstance(v, int) and (isinstance(v, bool) or v < 0)):
        raise RemoteProtocolError(f"{what}: field {key!r} missing or of the wrong type")
    return v


class _Base:
    def __init__(self, max_frame: int) -> None:
        self._dec = codec.FrameDecoder(max_frame)
        self.state = State.HANDSHAKE
        self._fault: str | None = None

    def receive_data(self, data: bytes) -> None:
        if self.state is State.CLOSED:
            raise LocalProtocolError("receive_data after close")
        self._dec.feed(data)

    def _next_frame(self) -> tuple[bool, Any]:
        if self.state is State.CLOSED:
            # No event ever comes from a closed conversation: after a peer fault, the fault again.
            if self._fault is not None:
                raise RemoteProtocolError(self._fault)
            return False, None
        try:
            return self._dec.next()
        except FrameError as e:  # a stream cannot resynchronise; any other exception is a bug of ours
            self.state = State.CLOSED
            self._fault = f"bad frame: {e}"
            raise RemoteProtocolError(self._fault) from None

    def close(self) -> None:
        self.state = State.CLOSED


# ---- receiver side --------------------------------------------------------------------------------------
class ReceiverProtocol(_Base):
    """The receiver's half: parses and checks everything the peer sends. Paths are checked by the caller
    (a bad path refuses one record, not the connection)."""

    def __init__(self, node: str, max_frame: int = codec.DEFAULT_MAX_FRAME) -> None:
        super().__init__(max_frame)
        self.node = node
        self.role = ""
        self.expected_seq = 0  # next entry seq; 0 before `stream`
        self._welcomed = False
        self._chunk_seq = 0
        self._chunks_due = 0

    def next_event(self) -> ReceiverEvent | None:
        if self.role == "agent" and self.state is not State.CLOSED:
            raise LocalProtocolError("an agent connection: after welcome, take_buffered() for AgentProtocol")
        ok, v = self._next_frame()
        if not ok:
            return None
        try:
            return self._event(v)
        except RemoteProtocolError as e:
            self.state = State.CLOSED
            self._fault = str(e)
            raise

    def _event(self, v: Any) -> ReceiverEvent:
        if self._chunks_due:
            if not isinstance(v, bytes):
                raise RemoteProtocolError(f"entry {self._chunk_seq}: expected a content chunk")
            self._chunks_due -= 1
            last = self._chunks_due == 0
            if last:
                self.expected_seq = self._chunk_seq + 1
            return Chunk(self._chunk_seq, v, last)
        if not isinstance(v, dict):
            raise RemoteProtocolError("expected a map frame")
        kind = v.get("k")
        if self.state is State.HANDSHAKE:
            if kind != "hello":
                raise RemoteProtocolError(f"expected hello, got {kind!r}")
            role = _field(v, "role", str, "hello")
            if role not in ("sender", "observer", "agent"):
                raise RemoteProtocolError(f"hello: unknown role {role!r}")
            hello = Hello(
                _field(v, "v", int, "hello"),
                _field(v, "node", str, "hello")[:200],
                _field(v, "epoch", int, "hello"),
                role,
            )
            self.role = role
            self.state = State.READY
            return hello
        if kind == "mreq":
            inc = v.get("include")
            if not isinstance(inc, list) or not all(isinstance(x, str) for x in inc) or len(inc) > 1000:
                raise RemoteProtocolError("mreq: include is not a list of strings")
            full = v.get("full", False)
            if not isinstance(full, bool):
                raise RemoteProtocolError("mreq: full is not a boolean")
            return ManifestRequest(_field(v, "id", int, "mreq"), tuple(inc), full)
        if kind == "ping":
            return Ping(_field(v, "ts", int, "ping"))
        if self.role != "sender":
            raise RemoteProtocolError(f"an observer may not send {kind!r}")
        if kind == "stream":
            if self.state is not State.READY:
                raise RemoteProtocolError("stream sent twice")
            first = _field(v, "from", int, "stream")
            if first < 1:
                raise RemoteProtocolError("stream: from must be >= 1")
            journal = _field(v, "journal", str, "stream")
            if not 0 < len(journal) <= 64 or any(ch not in "0123456789abcdef" for ch in journal):
                raise RemoteProtocolError("stream: journal id is not 1-64 lowercase hex digits")
            self.state = State.STREAMING
            self.expected_seq = first
            return StreamStart(journal, first)
        if kind == "e":
            if self.state is not State.STREAMING:
                raise RemoteProtocolError("entry before stream")
            try:
                change = Change.from_wire(v)
            except ValueError as e:
                raise RemoteProtocolError(f"bad entry header: {e}") from None
            if change.seq != self.expected_seq:
                raise RemoteProtocolError(f"entry seq {change.seq}, expected {self.expected_seq}")
            if change.chunks:
                self._chunks_due = change.chunks
                self._chunk_seq = change.seq
            else:
                self.expected_seq = change.seq + 1
            return EntryHeader(change)
        raise RemoteProtocolError(f"unexpected frame kind {kind!r}")

    # -- what we send --
    def welcome(self, journal: str, seq: int, epoch: int) -> bytes:
        if self.state is State.HANDSHAKE:
            raise LocalProtocolError("welcome before hello")
        if self._welcomed:
            raise LocalProtocolError("welcome sent twice")
        self._welcomed = True
        return codec.encode(
            {
                "k": "welcome",
                "v": PROTOCOL_VERSION,
                "node": self.node,
                "journal": journal,
                "seq": seq,
                "epoch": epoch,
            }
        )

    def take_buffered(self) -> bytes:
        """Hands an agent connection over, once, after its welcome: the bytes received behind the hello,
        for :class:`AgentProtocol`. This protocol is closed afterwards."""
        if self.role != "agent" or not self._welcomed or self.state is State.CLOSED:
            raise LocalProtocolError("take_buffered: only once, after welcoming an agent")
        return _hand_over(self)

    def refuse(self, code: str, reason: str) -> bytes:
        self.state = State.CLOSED
        return codec.encode({"k": "refuse", "code": code, "reason": reason})

    def ack(self, seq: int, problems: Sequence[Problem] = ()) -> bytes:
        if (
            self.state is not State.STREAMING
            or seq >= self.expected_seq
            or (self._chunks_due and seq >= self._chunk_seq)
        ):
            raise LocalProtocolError(f"ack {seq}: that entry has not been received whole")
        return codec.encode({"k": "ack", "seq": seq, "problems": [p.to_wire() for p in problems]})

    def manifest(self, req_id: int, entries: Iterable[FileMeta], seq: int) -> bytes:
        return b"".join(self.manifest_parts(req_id, entries)) + self.manifest_end(req_id, seq)

    def manifest_parts(self, req_id: int, entries: Iterable[FileMeta]) -> Iterator[bytes]:
        """The entries as parts of at most MANIFEST_PART_ENTRIES, encoded as they come."""
        part: list[Any] = []
        for e in entries:
            part.append(e.to_wire())
            if len(part) >= MANIFEST_PART_ENTRIES:
                yield codec.encode({"k": "mpart", "id": req_id, "entries": part})
                part = []
        if part:
            yield codec.encode({"k": "mpart", "id": req_id, "entries": part})

    def manifest_end(self, req_id: int, seq: int) -> bytes:
        """Closes a manifest: the entries describe the replica as of ``seq``."""
        return codec.encode({"k": "mend", "id": req_id, "seq": seq})

    def pong(self, ts: int) -> bytes:
        return codec.encode({"k": "pong", "ts": ts})


# ---- sender side ----------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Sent:
    last_seq: int = 0


class SenderProtocol(_Base):
    """The sender's (or an observer's) half."""

    def __init__(self, node: str, epoch: int, role: str = "sender", max_frame: int = 64 << 20) -> None:
        # Manifest parts can be large; the receiver is trusted less than the sender trusts itself, but a
        # manifest part of 2000 entries fits easily in 64 MiB.
        super().__init__(max_frame)
        self.node = node
        self.epoch = epoch
        self.role = role
        self.sent = _Sent()
        self.acked = 0

    def hello(self) -> bytes:
        return codec.encode(
            {"k": "hello", "v": PROTOCOL_VERSION, "node": self.node, "epoch": self.epoch, "role": self.role}
        )

    def next_event(self) -> SenderEvent | None:
        if self.role == "agent" and self.state is State.READY:
            raise LocalProtocolError("an agent connection: after welcome, take_buffered() for AgentProtocol")
        ok, v = self._next_frame()
        if not ok:
            return None
        if not isinstance(v, dict):
            self.state = State.CLOSED
            self._fault = "expected a map frame from the receiver"
            raise RemoteProtocolError(self._fault)
        kind = v.get("k")
        try:
            if self.state is State.HANDSHAKE:
                if kind == "refuse":
                    self.state = State.CLOSED
                    return Refused(_field(v, "code", str, "refuse"), _field(v, "reason", str, "refuse"))
                if kind != "welcome":
                    raise RemoteProtocolError(f"expected welcome, got {kind!r}")
                self.state = State.READY
                return Welcome(
                    _field(v, "v", int, "welcome"),
                    _field(v, "node", str, "welcome"),
                    _field(v, "journal", str, "welcome"),
                    _field(v, "seq", int, "welcome"),
                    _field(v, "epoch", int, "welcome"),
                )
            if kind == "ack":
                seq = _field(v, "seq", int, "ack")
                if seq > self.sent.last_seq or seq < self.acked:
                    raise RemoteProtocolError(f"ack {seq} outside {self.acked}..{self.sent.last_seq}")
                self.acked = seq
                probs = []
                for p in _field(v, "problems", list, "ack"):
                    if not (
                        isinstance(p, list)
                        and len(p) == 4
                        and isinstance(p[0], int)
                        and not isinstance(p[0], bool)
                        and p[0] >= 0
                        and all(isinstance(x, str) for x in p[1:])
                    ):
                        raise RemoteProtocolError("ack: malformed problem")
                    probs.append(Problem(p[0], p[1], p[2], p[3]))
                return Ack(seq, tuple(probs))
            if kind == "mpart":
                try:
                    entries = tuple(map(FileMeta.from_wire, _field(v, "entries", list, "mpart")))
                except ValueError as e:
                    raise RemoteProtocolError(f"mpart: {e}") from None
                return ManifestPart(_field(v, "id", int, "mpart"), entries)
            if kind == "mend":
                return ManifestEnd(_field(v, "id", int, "mend"), _field(v, "seq", int, "mend"))
            if kind == "pong":
                return Pong(_field(v, "ts", int, "pong"))
            if kind == "refuse":
                self.state = State.CLOSED
                return Refused(_field(v, "code", str, "refuse"), _field(v, "reason", str, "refuse"))
            raise RemoteProtocolError(f"unexpected frame kind {kind!r} from the receiver")
        except RemoteProtocolError as e:
            self.state = State.CLOSED
            self._fault = str(e)
            raise

    def stream(self, journal: str, first: int) -> bytes:
        if self.role != "sender" or self.state is not State.READY:
            raise LocalProtocolError(f"stream in state {self.state.value} as {self.role}")
        self.state = State.STREAMING
        self.sent.last_seq = first - 1
        self.acked = first - 1
        return codec.encode({"k": "stream", "journal": journal, "from": first})

    def entries(self, raw: bytes, done: Sequence[Change]) -> bytes:
        """Journal bytes to send as they are; ``done`` lists the entries they complete."""
        if self.state is not State.STREAMING:
            raise LocalProtocolError("entries before stream")
        for c in done:
            if c.seq != self.sent.last_seq + 1:
                raise LocalProtocolError(f"entry {c.seq} after {self.sent.last_seq}")
            self.sent.last_seq = c.seq
        return raw

    def manifest_request(self, req_id: int, include: Sequence[str], full: bool = False) -> bytes:
        """``full``: the receiver hashes every file, whatever its cache says (only sent when set, so a
        request without it is the one every receiver version understands)."""
        if self.state not in (State.READY, State.STREAMING):
            raise LocalProtocolError("mreq before welcome")
        if self.role == "agent":
            raise LocalProtocolError("an agent does not ask manifests")
        req: dict[str, Any] = {"k": "mreq", "id": req_id, "include": list(include)}
        if full:
            req["full"] = True
        return codec.encode(req)

    def ping(self, ts: int) -> bytes:
        if self.role == "agent":
            raise LocalProtocolError("an agent does not ping: its heartbeats are the traffic")
        return codec.encode({"k": "ping", "ts": ts})

    def take_buffered(self) -> bytes:
        """Hands an agent connection over, once, after the welcome: the bytes received behind it, for
        :class:`AgentProtocol`. This protocol is closed afterwards."""
        if self.role != "agent" or self.state is not State.READY:
            raise LocalProtocolError(f"take_buffered in state {self.state.value} as {self.role}")
        return _hand_over(self)


# ---- liveness -------------------------------------------------------------------------------------------
class Liveness:
    """When to send a keepalive and when the peer counts as silent. Pure: the caller passes the time.

    ``heard(now)`` after every whole frame (event) received, ``sent(now)`` after every frame written.
    ``silent(now)`` once nothing whole has come for ``timeout`` seconds; ``due(now)`` when nothing has been
    written for a third of it (the peer's own timer must never fire on a healthy link).
    """

    def __init__(self, timeout: float, now: float) -> None:
        if timeout <= 0:
            raise LocalProtocolError("the silence timeout must be positive")
        self.timeout = timeout
        self.last_heard = now
        self.last_sent = now

    def heard(self, now: float) -> None:
        self.last_heard = now

    def sent(self, now: float) -> None:
        self.last_sent = now

    @property
    def interval(self) -> float:
        return self.timeout / 3

    def silent(self, now: float) -> bool:
        return now - self.last_heard >= self.timeout

    def due(self, now: float) -> bool:
        return now - self.last_sent >= self.interval

    def deadline(self) -> float:
        """The moment the peer becomes silent if nothing else is heard."""
        return self.last_heard + self.timeout


# ---- agents ---------------------------------------------------------------------------------------------
#: The operator commands one agent may relay to the other.
AGENT_COMMANDS = frozenset(
    {
        "failover",
        "failover-force",
        "maintenance-start",
        "maintenance-end",
        "rejoin",
        "status",
        "switchover",  # relayed to the active by a passive asked to switch over
        "handover",  # the active offers the service: {epoch, digest, files}
        "position",  # what of our journal the peer has applied: reply {journal, seq}
        "upgrade-begin",  # {name, size, digest}: an installer follows in blob frames
        "upgrade-end",  # the installer is whole: check it and keep it
        "version",  # reply {service, standby}
    }
)
AGENT_MAX_STRING = 1000  # characters, for every string an agent frame carries (keys too)
AGENT_MAX_KEYS = 32  # in a command's args and a reply's data
AGENT_MAX_UNANSWERED = 8  # commands sent and not yet answered, each way
#: Largest agent frame: the largest legal reply (32 keys and values of 1000 four-byte characters, and its
#: text) takes about 260 KiB.
AGENT_MAX_FRAME = 1 << 19
_U64_MAX = (1 << 64) - 1  # msgpack's integer range
_I64_MIN = -(1 << 63)

ArgValue: TypeAlias = str | int | float | bool


@dataclass(frozen=True, slots=True)
class AgentCommand:
    """An operator command the peer's agent relays to this one (``name`` is one of AGENT_COMMANDS)."""

    name: str
    args: dict[str, ArgValue]


@dataclass(frozen=True, slots=True)
class AgentReply:
    """The peer's answer to the oldest command this agent sent it, which had this ``name``."""

    name: str
    ok: bool
    text: str
    data: dict[str, ArgValue]


@dataclass(frozen=True, slots=True)
class AgentBlob:
    """A piece of the file the last ``upgrade-begin`` announced, at ``offset``."""

    offset: int
    data: bytes


#: The largest piece of a file one blob frame carries.
AGENT_BLOB_BYTES = 256 * 1024

AgentEvent = (
    failover.Heartbeat | failover.FenceRequest | failover.FenceAck | AgentCommand | AgentReply | AgentBlob
)

_E = TypeVar("_E", bound=enum.Enum)


def _hand_over(proto: _Base) -> bytes:
    """The bytes ``proto`` has received but not parsed; closes it."""
    rest = proto._dec.take_buffered()
    proto.state = State.CLOSED
    return rest


def _show(v: Any) -> str:
    """A peer's value in an error message: its type, and a short repr for strings and numbers."""
    if isinstance(v, bool) or v is None:
        return repr(v)
    if isinstance(v, str):
        return repr(v[:40]) + ("..." if len(v) > 40 else "")
    if isinstance(v, int | float):
        return f"{type(v).__name__} {v}"
    return type(v).__name__


def _present(m: dict[str, Any], key: str, what: str) -> Any:
    if key not in m:
        raise RemoteProtocolError(f"{what}: field {key!r} is missing")
    return m[key]


def _uint(m: dict[str, Any], key: str, what: str) -> int:
    v = _present(m, key, what)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= _U64_MAX:
        raise RemoteProtocolError(f"{what}: field {key!r} must be a non-negative integer, not {_show(v)}")
    return v


def _opt_uint(m: dict[str, Any], key: str, what: str) -> int | None:
    return None if m.get(key) is None else _uint(m, key, what)


def _opt_int(m: dict[str, Any], key: str, what: str) -> int | None:
    v = m.get(key)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not _I64_MIN <= v <= _U64_MAX:
        raise RemoteProtocolError(f"{what}: field {key!r} must be an integer, not {_show(v)}")
    return v


def _number(m: dict[str, Any], key: str, what: str, *, minimum: float | None = None) -> float:
    v = _present(m, key, what)
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
        raise RemoteProtocolError(f"{what}: field {key!r} must be a finite number, not {_show(v)}")
    if minimum is not None and v < minimum:
        raise RemoteProtocolError(f"{what}: field {key!r} must be >= {minimum}, not {_show(v)}")
    return float(v)


def _opt_number(m: dict[str, Any], key: str, what: str, *, minimum: float | None = None) -> float | None:
    return None if m.get(key) is None else _number(m, key, what, minimum=minimum)


def _bool(m: dict[str, Any], key: str, what: str) -> bool:
    v = _present(m, key, what)
    if not isinstance(v, bool):
        raise RemoteProtocolError(f"{what}: field {key!r} must be a boolean, not {_show(v)}")
    return v


def _string(m: dict[str, Any], key: str, what: str) -> str:
    v = _present(m, key, what)
    if not isinstance(v, str):
        raise RemoteProtocolError(f"{what}: field {key!r} must be a string, not {_show(v)}")
    if len(v) > AGENT_MAX_STRING:
        raise RemoteProtocolError(
            f"{what}: field {key!r} holds {len(v)} characters, more than {AGENT_MAX_STRING}"
        )
    return v


def _enum(m: dict[str, Any], key: str, cls: type[_E], what: str) -> _E:
    v = _present(m, key, what)
    if not isinstance(v, str):
        raise RemoteProtocolError(f"{what}: field {key!r} must be a string, not {_show(v)}")
    for member in cls:
        if member.value == v:
            return member
    raise RemoteProtocolError(f"{what}: field {key!r} has the unknown value {_show(v)}")


def _command_name(m: dict[str, Any], what: str) -> str:
    name = _string(m, "name", what)
    if name not in AGENT_COMMANDS:
        raise RemoteProtocolError(f"{what}: field 'name' is the unknown command {_show(name)}")
    return name


def _token(m: dict[str, Any], what: str) -> failover.Token:
    v = _present(m, "token", what)
    if not (
        isinstance(v, list)
        and len(v) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= _U64_MAX for x in v)
    ):
        raise RemoteProtocolError(f"{what}: field 'token' must be a list of two non-negative integers")
    return (v[0], v[1])


def _arg_value_ok(x: Any) -> bool:
    if isinstance(x, bool):
        return True
    if isinstance(x, int):
        return _I64_MIN <= x <= _U64_MAX
    if isinstance(x, float):
        return math.isfinite(x)
    return isinstance(x, str) and len(x) <= AGENT_MAX_STRING


def _args(m: dict[str, Any], key: str, what: str) -> dict[str, ArgValue]:
    v = _present(m, key, what)
    if not isinstance(v, dict):
        raise RemoteProtocolError(f"{what}: field {key!r} must be a map, not {_show(v)}")
    if len(v) > AGENT_MAX_KEYS:
        raise RemoteProtocolError(f"{what}: field {key!r} has {len(v)} keys, more than {AGENT_MAX_KEYS}")
    out: dict[str, ArgValue] = {}
    for k, x in v.items():
        if not isinstance(k, str) or not 0 < len(k) <= AGENT_MAX_STRING:
            raise RemoteProtocolError(
                f"{what}: field {key!r} has a key that is not a string of 1 to {AGENT_MAX_STRING} characters"
            )
        if not _arg_value_ok(x):
            raise RemoteProtocolError(
                f"{what}: field {key!r}, key {_show(k)}: the value must be a boolean, a 64-bit integer, a "
                f"finite number or a string of at most {AGENT_MAX_STRING} characters, not {_show(x)}"
            )
        out[k] = x
    return out


def _heartbeat_from_wire(m: dict[str, Any]) -> failover.Heartbeat:
    w = "heartbeat"
    return failover.Heartbeat(
        boot=_uint(m, "boot", w),
        at=_number(m, "at", w),
        role=_enum(m, "role", failover.Role, w),
        epoch=_uint(m, "epoch", w),
        service=_enum(m, "service", failover.ServiceState, w),
        maintenance=_bool(m, "maintenance", w),
        planned_stop=_bool(m, "planned_stop", w),
        caught_up=_bool(m, "caught_up", w),
        echo=_opt_uint(m, "echo", w),
        last_failover_age=_opt_number(m, "last_failover_age", w, minimum=0.0),
        switching=_string(m, "switching", w) if "switching" in m else "",
        preferred=_bool(m, "preferred", w) if "preferred" in m else False,
        quarantined=_uint(m, "quarantined", w) if "quarantined" in m else 0,
        lag=_opt_uint(m, "lag", w),
        utc=_opt_number(m, "utc", w),
        tz=_string(m, "tz", w) if "tz" in m else "",
        tz_offset=_opt_int(m, "tz_offset", w),
        echo_at=_opt_number(m, "echo_at", w),
        echo_held=_opt_number(m, "echo_held", w, minimum=0.0),
    )


def _fence_from_wire(m: dict[str, Any]) -> failover.FenceRequest:
    return failover.FenceRequest(_uint(m, "epoch", "fence"), _token(m, "fence"))


def _fack_from_wire(m: dict[str, Any]) -> failover.FenceAck:
    return failover.FenceAck(_uint(m, "epoch", "fack"), _token(m, "fack"), _bool(m, "drained", "fack"))


def _command_from_wire(m: dict[str, Any]) -> AgentCommand:
    return AgentCommand(_command_name(m, "cmd"), _args(m, "args", "cmd"))


def _reply_from_wire(m: dict[str, Any]) -> AgentReply:
    w = "reply"
    return AgentReply(_command_name(m, w), _bool(m, "ok", w), _string(m, "text", w), _args(m, "data", w))


def _blob_from_wire(m: dict[str, Any]) -> AgentBlob:
    data = _present(m, "data", "blob")
    if not isinstance(data, bytes) or len(data) > AGENT_BLOB_BYTES:
        raise RemoteProtocolError(f"blob: field 'data' must be at most {AGENT_BLOB_BYTES} bytes")
    return AgentBlob(_uint(m, "offset", "blob"), data)


_AGENT_FRAMES: dict[str, Callable[[dict[str, Any]], AgentEvent]] = {
    "blob": _blob_from_wire,
    "hb": _heartbeat_from_wire,
    "fence": _fence_from_wire,
    "fack": _fack_from_wire,
    "cmd": _command_from_wire,
    "reply": _reply_from_wire,
}


class AgentProtocol(_Base):
    """One agent's half of the agent conversation, alike on both ends; starts after the handshake.

    ``buffered`` is what ``take_buffered()`` returned on the replication protocol that did the handshake:
    bytes the peer sent right behind its hello or our welcome. Every frame is checked field by field
    (see the rules in the module docstring); a bad one is :class:`RemoteProtocolError` and closes the
    conversation. What we send is checked by the same rules first: what this side would refuse, it does
    not send (:class:`LocalProtocolError`)."""

    def __init__(self, buffered: bytes = b"", max_frame: int = AGENT_MAX_FRAME) -> None:
        super().__init__(max_frame)
        self.state = State.READY
        self._asked: collections.deque[str] = collections.deque()  # sent, the peer's reply due
        self._owed: collections.deque[str] = collections.deque()  # received, our reply due
        self._dec.feed(buffered)

    @property
    def unanswered(self) -> int:
        """Commands this side sent that the peer has not answered yet."""
        return len(self._asked)

    def next_event(self) -> AgentEvent | None:
        ok, v = self._next_frame()
        if not ok:
            return None
        try:
            return self._event(v)
        except RemoteProtocolError as e:
            self.state = State.CLOSED
            self._fault = str(e)
            raise

    def _event(self, v: Any) -> AgentEvent:
        if not isinstance(v, dict):
            raise RemoteProtocolError("agent: expected a map frame")
        kind = v.get("k")
        parse = _AGENT_FRAMES.get(kind) if isinstance(kind, str) else None
        if parse is None:
            raise RemoteProtocolError(f"agent: unexpected frame kind {_show(kind)}")
        ev = parse(v)
        if isinstance(ev, AgentCommand):
            if len(self._owed) >= AGENT_MAX_UNANSWERED:
                raise RemoteProtocolError(f"cmd: more than {AGENT_MAX_UNANSWERED} commands unanswered")
            self._owed.append(ev.name)
        elif isinstance(ev, AgentReply):
            if not self._asked:
                raise RemoteProtocolError(f"reply: {ev.name!r} answers no command")
            if ev.name != self._asked[0]:
                raise RemoteProtocolError(
                    f"reply: field 'name' is {ev.name!r}, but the oldest unanswered command is "
                    f"{self._asked[0]!r}"
                )
            self._asked.popleft()
        return ev

    # -- what we send --
    def _encode(self, m: dict[str, Any], parse: Callable[[dict[str, Any]], AgentEvent]) -> bytes:
        if self.state is State.CLOSED:
            raise LocalProtocolError(f"agent: {m['k']} after close")
        try:
            parse(m)
        except RemoteProtocolError as e:
            raise LocalProtocolError(f"the peer would refuse this: {e}") from None
        return codec.encode(m)

    def heartbeat(self, hb: failover.Heartbeat) -> bytes:
        m: dict[str, Any] = {
            "k": "hb",
            "boot": hb.boot,
            "at": hb.at,
            "role": hb.role.value,
            "epoch": hb.epoch,
            "service": hb.service.value,
            "maintenance": hb.maintenance,
            "planned_stop": hb.planned_stop,
            "caught_up": hb.caught_up,
        }
        if hb.echo is not None:
            m["echo"] = hb.echo
        if hb.last_failover_age is not None:
            m["last_failover_age"] = hb.last_failover_age
        if hb.switching:
            m["switching"] = hb.switching
        if hb.preferred:
            m["preferred"] = True
        if hb.quarantined:
            m["quarantined"] = hb.quarantined
        if hb.tz:
            m["tz"] = hb.tz
        for key in ("utc", "tz_offset", "echo_at", "echo_held", "lag"):
            if (v := getattr(hb, key)) is not None:
                m[key] = v
        return self._encode(m, _heartbeat_from_wire)

    def fence_request(self, epoch: int, token: failover.Token) -> bytes:
        """A failover.RequestFence for the peer."""
        return self._encode({"k": "fence", "epoch": epoch, "token": list(token)}, _fence_from_wire)

    def fence_ack(self, epoch: int, token: failover.Token, drained: bool) -> bytes:
        """A failover.SendFenceAck for the peer."""
        m = {"k": "fack", "epoch": epoch, "token": list(token), "drained": drained}
        return self._encode(m, _fack_from_wire)

    def blob(self, offset: int, data: bytes) -> bytes:
        """A piece of a file announced by a command before it."""
        return self._encode({"k": "blob", "offset": offset, "data": data}, _blob_from_wire)

    def command(self, name: str, args: Mapping[str, ArgValue] | None = None) -> bytes:
        """Relays an operator command; the peer answers with a reply (an :class:`AgentReply` event)."""
        if len(self._asked) >= AGENT_MAX_UNANSWERED:
            raise LocalProtocolError(f"cmd: {AGENT_MAX_UNANSWERED} commands are unanswered already")
        out = self._encode({"k": "cmd", "name": name, "args": dict(args or {})}, _command_from_wire)
        self._asked.append(name)
        return out

    def reply(self, name: str, ok: bool, text: str, data: Mapping[str, ArgValue] | None = None) -> bytes:
        """Answers the oldest command received and not answered yet, which must be ``name``."""
        if not self._owed or self._owed[0] != name:
            oldest = repr(self._owed[0]) if self._owed else "none"
            raise LocalProtocolError(f"reply {name!r}: the oldest unanswered command is {oldest}")
        m = {"k": "reply", "name": name, "ok": ok, "text": text, "data": dict(data or {})}
        out = self._encode(m, _reply_from_wire)
        self._owed.popleft()
        return out
