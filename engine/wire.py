"""The replication protocol as sans-I/O state machines: bytes in, events out, bytes to send.

No sockets, no asyncio, no clock. Every frame is a :mod:`engine.codec` frame. Maps carry their kind in
``"k"``; a put's content travels as bare bytes frames right after its entry header, exactly as the journal
stores it (the sender streams journal bytes untouched).

Conversation (S = sender or observer, R = receiver)::

    S: hello {v, node, epoch, role}           role "sender" streams; role "observer" only asks manifests
    R: welcome {v, node, journal, seq, epoch}  or  refuse {code, reason}, then close
    S: stream {journal, from}                  sender only: entries follow, seqs consecutive from `from`
    S: e {s, o, p, ...}  [bytes] * c           entries (header, then c content chunks)
    S: mreq {id, include[, full]}              manifest request, answered after all earlier entries
    S: ping {ts}                               when it has sent nothing else for a while
    R: ack {seq, problems}                     all entries <= seq are durable on the replica
    R: mpart {id, entries} ... mend {id, seq}  manifest of the replica as of entry `seq`
    R: pong {ts}                               the answer to a ping, or unsolicited as a heartbeat

Liveness (both sides, see :class:`Liveness`): each side sends something at least every third of the
silence timeout (entries or pings one way, acks or pongs the other), and a peer from which no whole
frame has come for the silence timeout is dropped (:class:`PeerSilent`). Bytes that never complete a frame
(a flipped length, a stalled proxy trickling) do not count as life.

Rules (the transition table):
- R accepts only ``hello`` first; S accepts only ``welcome``/``refuse`` first.
- After ``welcome``, an observer may send ``mreq``/``ping`` only.
- A sender's ``stream`` comes once, before any entry; entry seqs are consecutive from ``from``.
- While a put's chunks are due, only bytes frames are accepted, and bytes frames nowhere else.
A peer that breaks a rule gets :class:`RemoteProtocolError`; we breaking one is :class:`LocalProtocolError`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from engine import codec
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
            if role not in ("sender", "observer"):
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
                    entries = tuple(FileMeta.from_wire(e) for e in _field(v, "entries", list, "mpart"))
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
        req: dict[str, Any] = {"k": "mreq", "id": req_id, "include": list(include)}
        if full:
            req["full"] = True
        return codec.encode(req)

    def ping(self, ts: int) -> bytes:
        return codec.encode({"k": "ping", "ts": ts})


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
