"""The agent conversation (:class:`engine.wire.AgentProtocol`): bytes in, events out, bytes to send.

No sockets, no mocks. Every event goes through the wire and comes back equal and of the same types (a
``True`` that came back as ``1``, a tuple as a list or a float as an int would be a bug that ``==`` does
not see, so events are also compared by ``repr``), whole, byte by byte and split anywhere. Every hostile
field is refused with a :class:`RemoteProtocolError` that names it, and the conversation stays closed
with the same fault. The hand-over from the replication handshake keeps the bytes that came behind the
hello or the welcome.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import codec
from engine.errors import LocalProtocolError, RemoteProtocolError
from engine.failover import FenceAck, FenceRequest, Heartbeat, Role, ServiceState, Token
from engine.model import PROTOCOL_VERSION
from engine.wire import (
    AGENT_COMMANDS,
    AGENT_MAX_FRAME,
    AGENT_MAX_KEYS,
    AGENT_MAX_STRING,
    AGENT_MAX_UNANSWERED,
    AgentCommand,
    AgentEvent,
    AgentProtocol,
    AgentReply,
    ArgValue,
    Hello,
    Liveness,
    ReceiverProtocol,
    SenderProtocol,
    State,
    Welcome,
)

I63 = 2**63 - 1
U64 = 2**64 - 1
HB = Heartbeat(
    boot=7,
    at=12.5,
    role=Role.ACTIVE,
    epoch=3,
    service=ServiceState.RUNNING,
    maintenance=False,
    planned_stop=False,
    caught_up=True,
    echo=9,
    last_failover_age=None,
)

# ---------------------------------------------------------------------------------------------------------
# Helpers


def enc(*values: Any) -> bytes:
    return b"".join(codec.encode(v) for v in values)


def pump(proto: AgentProtocol, pieces: Iterable[bytes]) -> list[AgentEvent]:
    """Feed ``pieces`` one after the other, taking every event out after each."""
    out: list[AgentEvent] = []
    for piece in pieces:
        proto.receive_data(piece)
        while (ev := proto.next_event()) is not None:
            out.append(ev)
    return out


def cut(data: bytes, offsets: Iterable[int]) -> list[bytes]:
    points = sorted({0, len(data), *(o % (len(data) + 1) for o in offsets)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def same(got: list[AgentEvent], want: list[AgentEvent]) -> None:
    """Equal, and of the same types all the way down (``repr`` tells 1 from True and 1.0, lists from
    tuples; dicts keep their order on the wire)."""
    assert got == want
    assert [repr(e) for e in got] == [repr(e) for e in want]


def frame_ends(data: bytes) -> list[int]:
    """Where each frame in ``data`` ends, from the length in its header."""
    ends, pos = [], 0
    while pos < len(data):
        length, _ = codec.HEADER.unpack_from(data, pos)
        pos += codec.HEADER_SIZE + length
        ends.append(pos)
    return ends


def owing(*names: str) -> AgentProtocol:
    """An agent that has received these commands from its peer and owes the replies."""
    a, peer = AgentProtocol(), AgentProtocol()
    a.receive_data(b"".join(peer.command(n) for n in names))
    assert len(pump(a, [b""])) == len(names)
    return a


def asking(*names: str) -> AgentProtocol:
    """An agent that has sent these commands to its peer and waits for the replies."""
    a = AgentProtocol()
    for n in names:
        a.command(n)
    return a


def hb_map(**fields: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "k": "hb",
        "boot": 7,
        "at": 12.5,
        "role": "active",
        "epoch": 3,
        "service": "running",
        "maintenance": False,
        "planned_stop": False,
        "caught_up": True,
        "echo": 9,
    }
    d.update(fields)
    return d


def fence_map(**fields: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"k": "fence", "epoch": 4, "token": [7, 1]}
    d.update(fields)
    return d


def fack_map(**fields: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"k": "fack", "epoch": 4, "token": [7, 1], "drained": True}
    d.update(fields)
    return d


def cmd_map(**fields: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"k": "cmd", "name": "maintenance-start", "args": {"minutes": 30}}
    d.update(fields)
    return d


def reply_map(**fields: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"k": "reply", "name": "status", "ok": True, "text": "passive", "data": {"epoch": 3}}
    d.update(fields)
    return d


def without(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


# ---------------------------------------------------------------------------------------------------------
# Round trips

st_u63 = st.integers(0, I63)
st_float = st.floats(allow_nan=False, allow_infinity=False)
st_heartbeat = st.builds(
    Heartbeat,
    boot=st_u63,
    at=st_float,
    role=st.sampled_from(Role),
    epoch=st_u63,
    service=st.sampled_from(ServiceState),
    maintenance=st.booleans(),
    planned_stop=st.booleans(),
    caught_up=st.booleans(),
    echo=st.none() | st_u63,
    last_failover_age=st.none() | st.floats(min_value=0.0, allow_nan=False, allow_infinity=False),
)
st_token: st.SearchStrategy[Token] = st.tuples(st.integers(0, U64), st.integers(0, U64))
st_key = st.text(min_size=1, max_size=20)
st_value: st.SearchStrategy[ArgValue] = (
    st.booleans() | st.integers(-(2**63), U64) | st_float | st.text(max_size=40)
)
st_args = st.dictionaries(st_key, st_value, max_size=AGENT_MAX_KEYS)
st_name = st.sampled_from(sorted(AGENT_COMMANDS))


@dataclass(frozen=True)
class Msg:
    """Something one agent sends, and the event its peer must see."""

    send: Callable[[AgentProtocol], bytes]
    event: AgentEvent


def hb_msg(hb: Heartbeat) -> Msg:
    return Msg(lambda a: a.heartbeat(hb), hb)


def fence_msg(epoch: int, token: Token) -> Msg:
    return Msg(lambda a: a.fence_request(epoch, token), FenceRequest(epoch, token))


def fack_msg(epoch: int, token: Token, drained: bool) -> Msg:
    return Msg(lambda a: a.fence_ack(epoch, token, drained), FenceAck(epoch, token, drained))


def cmd_msg(name: str, args: dict[str, ArgValue]) -> Msg:
    return Msg(lambda a: a.command(name, args), AgentCommand(name, dict(args)))


def reply_msg(name: str, ok: bool, text: str, data: dict[str, ArgValue]) -> Msg:
    return Msg(lambda a: a.reply(name, ok, text, data), AgentReply(name, ok, text, dict(data)))


st_plain = st.one_of(
    st_heartbeat.map(hb_msg),
    st.builds(fence_msg, st_u63, st_token),
    st.builds(fack_msg, st_u63, st_token, st.booleans()),
)
st_cmd = st.builds(cmd_msg, st_name, st_args)
st_reply = st.builds(reply_msg, st_name, st.booleans(), st.text(max_size=60), st_args)


def send_all(msgs: list[Msg]) -> tuple[AgentProtocol, bytes, list[AgentEvent]]:
    """A sends ``msgs`` (it first gets, from B, the commands its replies answer); returns B, ready to read
    A's bytes, and the events B must see."""
    a, b = AgentProtocol(), AgentProtocol()
    asked = [m.event.name for m in msgs if isinstance(m.event, AgentReply)]
    if asked:
        a.receive_data(b"".join(b.command(n) for n in asked))
        assert [e.name for e in pump(a, [b""]) if isinstance(e, AgentCommand)] == asked
    data = b"".join(m.send(a) for m in msgs)
    return b, data, [m.event for m in msgs]


def fixed_conversation() -> list[Msg]:
    return [
        hb_msg(HB),
        hb_msg(Heartbeat(1, 0.0, Role.PASSIVE, 0, ServiceState.UNKNOWN, True, True, False, None, 0.0)),
        fence_msg(I63, (I63, U64)),
        fack_msg(4, (7, 0), False),
        cmd_msg("failover-force", {"why": "host a is down", "n": -1, "x": 1.5, "yes": True}),
        cmd_msg("status", {}),
        reply_msg("rejoin", False, "rejoin refused: the node is passive, not fenced", {"role": "passive"}),
        reply_msg("status", True, "", {}),
    ]


def test_every_event_round_trips_whole_and_in_one_feed() -> None:
    b, data, want = send_all(fixed_conversation())
    same(pump(b, [data]), want)


def test_byte_by_byte_each_event_comes_out_when_its_frame_is_complete() -> None:
    b, data, want = send_all(fixed_conversation())
    ends = frame_ends(data)
    assert len(ends) == len(want)
    got: list[AgentEvent] = []
    for i in range(len(data)):
        b.receive_data(data[i : i + 1])
        while (ev := b.next_event()) is not None:
            assert i + 1 == ends[len(got)], f"event {len(got)} came out at byte {i + 1}"
            got.append(ev)
    same(got, want)


def test_split_at_every_offset() -> None:
    msgs = fixed_conversation()
    for k in range(len(send_all(msgs)[1]) + 1):
        b, data, want = send_all(msgs)
        same(pump(b, [data[:k], data[k:]]), want)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st_heartbeat)
def test_heartbeats_round_trip(hb: Heartbeat) -> None:
    b, data, want = send_all([hb_msg(hb)])
    same(pump(b, [data]), want)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st_plain, max_size=10),
    st.lists(st_cmd, max_size=AGENT_MAX_UNANSWERED),
    st.lists(st_reply, max_size=AGENT_MAX_UNANSWERED),
    st.randoms(use_true_random=False),
    st.lists(st.integers(0, 1 << 20), max_size=12),
)
def test_conversations_round_trip_however_split(
    plain: list[Msg], cmds: list[Msg], replies: list[Msg], rnd: random.Random, offsets: list[int]
) -> None:
    msgs = plain + cmds + replies
    rnd.shuffle(msgs)
    # replies keep their order among themselves (each answers the oldest command): shuffle the rest only
    it = iter(replies)
    msgs = [next(it) if isinstance(m.event, AgentReply) else m for m in msgs]
    b, data, want = send_all(msgs)
    same(pump(b, cut(data, offsets)), want)


def test_the_largest_legal_command_and_reply_fit_in_a_frame() -> None:
    big = "\U0001f600" * AGENT_MAX_STRING  # four bytes each in UTF-8
    args: dict[str, ArgValue] = {f"{i:02d}" + big[: AGENT_MAX_STRING - 2]: big for i in range(AGENT_MAX_KEYS)}
    b, data, want = send_all([cmd_msg("status", args), reply_msg("status", True, big, args)])
    ends = frame_ends(data)
    assert len(ends) == 2 and all(
        end - start < AGENT_MAX_FRAME for start, end in itertools.pairwise([0, *ends])
    )
    same(pump(b, [data]), want)


def test_tokens_stay_tuples_and_optional_fields_may_be_absent_or_nil() -> None:
    a = AgentProtocol()
    a.receive_data(
        enc(
            hb_map(echo=None, last_failover_age=None),
            without(hb_map(), "echo"),
            hb_map(last_failover_age=0),
            hb_map(at=5),  # another implementation may send a whole number: it is a float here
            fence_map(),
        )
    )
    evs = pump(a, [b""])
    assert [e.echo for e in evs[:2] if isinstance(e, Heartbeat)] == [None, None]
    assert isinstance(evs[2], Heartbeat) and repr(evs[2].last_failover_age) == "0.0"
    assert isinstance(evs[3], Heartbeat) and repr(evs[3].at) == "5.0"
    assert isinstance(evs[4], FenceRequest) and evs[4].token == (7, 1) and type(evs[4].token) is tuple


def test_the_bytes_out_are_the_documented_frames() -> None:
    a = owing("status")
    assert codec.unpack(a.heartbeat(HB)[codec.HEADER_SIZE :]) == hb_map()
    assert codec.unpack(a.fence_request(4, (7, 1))[codec.HEADER_SIZE :]) == fence_map()
    assert codec.unpack(a.fence_ack(4, (7, 1), True)[codec.HEADER_SIZE :]) == fack_map()
    assert codec.unpack(a.command("maintenance-start", {"minutes": 30})[codec.HEADER_SIZE :]) == cmd_map()
    assert codec.unpack(a.reply("status", True, "passive", {"epoch": 3})[codec.HEADER_SIZE :]) == reply_map()


@pytest.mark.parametrize("frame", [hb_map(), fence_map(), fack_map(), cmd_map(), reply_map()])
def test_unknown_keys_are_ignored(frame: dict[str, Any]) -> None:
    """A newer peer may add fields: they are ignored, the event is the same."""
    plain, extended = asking("status"), asking("status")
    plain.receive_data(enc(frame))
    extended.receive_data(enc({**frame, "future": [1, {"x": None}], "zz": b"\x00"}))
    same(pump(extended, [b""]), pump(plain, [b""]))


def test_replies_pair_with_commands_in_order_both_ways() -> None:
    a, b = AgentProtocol(), AgentProtocol()
    b.receive_data(a.command("status") + a.command("failover"))
    a.receive_data(b.command("rejoin"))
    assert [e.name for e in pump(b, [b""]) if isinstance(e, AgentCommand)] == ["status", "failover"]
    assert [e.name for e in pump(a, [b""]) if isinstance(e, AgentCommand)] == ["rejoin"]
    assert a.unanswered == 2 and b.unanswered == 1
    with pytest.raises(LocalProtocolError, match="oldest unanswered command is 'status'"):
        b.reply("failover", True, "")
    a.receive_data(b.reply("status", True, "ok") + b.reply("failover", False, "already active"))
    b.receive_data(a.reply("rejoin", False, "not fenced"))
    assert [(e.name, e.ok) for e in pump(a, [b""]) if isinstance(e, AgentReply)] == [
        ("status", True),
        ("failover", False),
    ]
    assert [(e.name, e.ok) for e in pump(b, [b""]) if isinstance(e, AgentReply)] == [("rejoin", False)]
    assert a.unanswered == 0 and b.unanswered == 0


def test_heartbeats_every_second_keep_the_link_alive_without_pings() -> None:
    """What the docstring promises: with heartbeats once a second both ways and a silence timeout of three
    seconds or more, nothing else is ever due and neither side goes silent."""
    live = Liveness(3.0, 0.0)
    for t in range(1, 60):
        assert not live.silent(float(t)) and not live.due(t - 0.001)
        live.sent(float(t))
        live.heard(float(t))
    assert live.silent(59.0 + 3.0)  # and one that stops is dropped


# ---------------------------------------------------------------------------------------------------------
# Hostile input: each one a RemoteProtocolError naming what is wrong; the conversation stays closed


@dataclass(frozen=True)
class Bad:
    name: str
    frames: list[Any]  # all but the last are valid
    match: str
    setup: Callable[[], AgentProtocol] = AgentProtocol


MANY = {f"k{i}": i for i in range(AGENT_MAX_KEYS + 1)}
LONG = "x" * (AGENT_MAX_STRING + 1)

BAD = [
    # heartbeats
    Bad("hb bool for int epoch", [hb_map(epoch=True)], "'epoch' must be a non-negative integer, not True"),
    Bad("hb str for int epoch", [hb_map(epoch="3")], "'epoch' must be a non-negative integer"),
    Bad("hb negative epoch", [hb_map(epoch=-1)], "'epoch' must be a non-negative integer, not int -1"),
    Bad("hb float epoch", [hb_map(epoch=3.0)], "'epoch' must be a non-negative integer"),
    Bad("hb bool boot", [hb_map(boot=False)], "'boot' must be a non-negative integer"),
    Bad("hb negative boot", [hb_map(boot=-7)], "'boot' must be a non-negative integer"),
    Bad("hb bool echo", [hb_map(echo=True)], "'echo' must be a non-negative integer"),
    Bad("hb negative echo", [hb_map(echo=-1)], "'echo' must be a non-negative integer"),
    Bad("hb str at", [hb_map(at="now")], "'at' must be a finite number"),
    Bad("hb bool at", [hb_map(at=True)], "'at' must be a finite number"),
    Bad("hb nan at", [hb_map(at=math.nan)], "'at' must be a finite number"),
    Bad("hb infinite at", [hb_map(at=math.inf)], "'at' must be a finite number"),
    Bad("hb negative age", [hb_map(last_failover_age=-1.0)], "'last_failover_age' must be >= 0"),
    Bad("hb str age", [hb_map(last_failover_age="1")], "'last_failover_age' must be a finite number"),
    Bad("hb unknown role", [hb_map(role="leader")], "'role' has the unknown value 'leader'"),
    Bad("hb role by name", [hb_map(role="ACTIVE")], "'role' has the unknown value 'ACTIVE'"),
    Bad("hb int role", [hb_map(role=2)], "'role' must be a string"),
    Bad("hb unknown service", [hb_map(service="paused")], "'service' has the unknown value 'paused'"),
    Bad("hb nil service", [hb_map(service=None)], "'service' must be a string"),
    Bad("hb int for bool", [hb_map(maintenance=1)], "'maintenance' must be a boolean, not int 1"),
    Bad("hb str for bool", [hb_map(planned_stop="no")], "'planned_stop' must be a boolean"),
    Bad("hb nil bool", [hb_map(caught_up=None)], "'caught_up' must be a boolean"),
    *(
        Bad(f"hb without {key}", [without(hb_map(), key)], f"heartbeat: field {key!r} is missing")
        for key in (
            "boot",
            "at",
            "role",
            "epoch",
            "service",
            "maintenance",
            "planned_stop",
            "caught_up",
        )
    ),
    # fencing
    Bad("fence bool epoch", [fence_map(epoch=True)], "fence: field 'epoch' must be a non-negative integer"),
    Bad("fence negative epoch", [fence_map(epoch=-4)], "fence: field 'epoch' must be a non-negative"),
    Bad("fence short token", [fence_map(token=[7])], "fence: field 'token' must be a list of two"),
    Bad("fence long token", [fence_map(token=[7, 1, 2])], "fence: field 'token' must be a list of two"),
    Bad("fence bool in token", [fence_map(token=[7, True])], "fence: field 'token' must be a list of two"),
    Bad("fence negative token", [fence_map(token=[-7, 1])], "fence: field 'token' must be a list of two"),
    Bad("fence str token", [fence_map(token="7,1")], "fence: field 'token' must be a list of two"),
    Bad("fence without token", [without(fence_map(), "token")], "fence: field 'token' is missing"),
    Bad("fack int for bool", [fack_map(drained=0)], "fack: field 'drained' must be a boolean"),
    Bad("fack without drained", [without(fack_map(), "drained")], "fack: field 'drained' is missing"),
    Bad("fack bool epoch", [fack_map(epoch=False)], "fack: field 'epoch' must be a non-negative integer"),
    # commands
    Bad("cmd unknown name", [cmd_map(name="format-disk")], "'name' is the unknown command 'format-disk'"),
    Bad("cmd int name", [cmd_map(name=1)], "cmd: field 'name' must be a string"),
    Bad("cmd oversize name", [cmd_map(name=LONG)], "cmd: field 'name' holds 1001 characters"),
    Bad("cmd too many args", [cmd_map(args=MANY)], f"'args' has {AGENT_MAX_KEYS + 1} keys, more than"),
    Bad("cmd args a list", [cmd_map(args=[1])], "cmd: field 'args' must be a map"),
    Bad("cmd without args", [without(cmd_map(), "args")], "cmd: field 'args' is missing"),
    Bad("cmd oversize arg", [cmd_map(args={"why": LONG})], "'args', key 'why': the value must be"),
    Bad("cmd oversize key", [cmd_map(args={LONG: 1})], "'args' has a key that is not a string of 1 to"),
    Bad("cmd empty key", [cmd_map(args={"": 1})], "'args' has a key that is not a string of 1 to"),
    Bad("cmd nil arg", [cmd_map(args={"x": None})], "'args', key 'x': the value must be"),
    Bad("cmd list arg", [cmd_map(args={"x": [1]})], "'args', key 'x': the value must be"),
    Bad("cmd bytes arg", [cmd_map(args={"x": b"1"})], "'args', key 'x': the value must be"),
    Bad("cmd nan arg", [cmd_map(args={"x": math.nan})], "'args', key 'x': the value must be"),
    Bad(
        "cmd too many unanswered",
        [cmd_map()] * (AGENT_MAX_UNANSWERED + 1),
        f"more than {AGENT_MAX_UNANSWERED} commands unanswered",
    ),
    # replies
    Bad("reply to nothing", [reply_map()], "reply: 'status' answers no command"),
    Bad(
        "reply out of order",
        [reply_map(name="rejoin")],
        "'name' is 'rejoin', but the oldest unanswered command is 'status'",
        lambda: asking("status", "rejoin"),
    ),
    Bad("reply unknown name", [reply_map(name="reboot")], "'name' is the unknown command 'reboot'"),
    Bad(
        "reply str ok", [reply_map(ok="yes")], "reply: field 'ok' must be a boolean", lambda: asking("status")
    ),
    Bad(
        "reply oversize text",
        [reply_map(text=LONG)],
        "reply: field 'text' holds 1001",
        lambda: asking("status"),
    ),
    Bad(
        "reply int text",
        [reply_map(text=5)],
        "reply: field 'text' must be a string",
        lambda: asking("status"),
    ),
    Bad("reply too many data", [reply_map(data=MANY)], "'data' has 33 keys", lambda: asking("status")),
    Bad("reply data list", [reply_map(data=[])], "'data' must be a map", lambda: asking("status")),
    # frames
    Bad("unknown kind", [{"k": "shutdown"}], "unexpected frame kind 'shutdown'"),
    Bad("replication kind", [{"k": "ping", "ts": 1}], "unexpected frame kind 'ping'"),
    Bad("no kind", [{"epoch": 3}], "unexpected frame kind None"),
    Bad("int kind", [{"k": 1}], "unexpected frame kind int 1"),
    Bad("a list frame", [[1, 2]], "expected a map frame"),
    Bad("a bytes frame", [b"hb"], "expected a map frame"),
]


@pytest.mark.parametrize("case", BAD, ids=[c.name for c in BAD])
def test_hostile_frames_are_refused_naming_what_is_wrong(case: Bad) -> None:
    a = case.setup()
    *good, bad = case.frames
    a.receive_data(enc(*good, bad, hb_map()))  # a valid frame behind it never comes out
    for _ in good:
        assert a.next_event() is not None
    with pytest.raises(RemoteProtocolError, match=re.escape(case.match)) as first:
        a.next_event()
    assert a.state is State.CLOSED
    with pytest.raises(RemoteProtocolError) as again:  # closed: the same fault, never an event
        a.next_event()
    assert str(again.value) == str(first.value)
    with pytest.raises(LocalProtocolError):
        a.receive_data(enc(hb_map()))
    with pytest.raises(LocalProtocolError, match="after close"):
        a.heartbeat(HB)


def test_the_hostile_cases_differ_from_a_valid_frame_only_in_what_is_named() -> None:
    """Each base frame, unbroken, is accepted in the same set-up: the refusals above are for the field
    each case breaks, nothing else."""
    cases: list[tuple[list[dict[str, Any]], Callable[[], AgentProtocol]]] = [
        ([hb_map(), fence_map(), fack_map(), cmd_map()], AgentProtocol),
        ([reply_map()], lambda: asking("status")),
        ([cmd_map()] * AGENT_MAX_UNANSWERED, AgentProtocol),
    ]
    for frames, setup in cases:
        a = setup()
        a.receive_data(enc(*frames))
        assert len(pump(a, [b""])) == len(frames)


def test_an_oversized_frame_is_refused() -> None:
    a = AgentProtocol()
    a.receive_data(codec.encode(cmd_map(args={"x": "y" * AGENT_MAX_FRAME})))
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        a.next_event()


# ---------------------------------------------------------------------------------------------------------
# Our own misuse: LocalProtocolError, nothing sent, nothing counted


@pytest.mark.parametrize(
    ("name", "send"),
    [
        ("nan at", lambda a: a.heartbeat(Heartbeat(1, math.nan, *HB_REST))),
        ("negative epoch", lambda a: a.heartbeat(Heartbeat(1, 0.0, Role.ACTIVE, -1, *HB_REST[2:]))),
        ("negative fence epoch", lambda a: a.fence_request(-1, (1, 1))),
        ("three-part token", lambda a: a.fence_ack(1, (1, 1, 1), True)),
        ("unknown command", lambda a: a.command("format-disk")),
        ("list arg", lambda a: a.command("status", {"x": [1]})),
        ("too many args", lambda a: a.command("status", MANY)),
        ("oversize arg", lambda a: a.command("status", {"x": LONG})),
        ("int arg beyond 64 bits", lambda a: a.command("status", {"x": 2**64})),
        ("int arg below 64 bits", lambda a: a.command("status", {"x": -(2**63) - 1})),
        ("bytes data", lambda a: a.command("status", {"x": b"1"})),
        ("reply to nothing", lambda a: a.reply("status", True, "")),
    ],
)
def test_we_never_send_what_the_peer_would_refuse(name: str, send: Callable[[Any], bytes]) -> None:
    a = AgentProtocol()
    with pytest.raises(LocalProtocolError):
        send(a)
    assert a.unanswered == 0 and a.state is State.READY
    a.command("status")  # still usable
    assert a.unanswered == 1


HB_REST: tuple[Any, ...] = (Role.ACTIVE, 3, ServiceState.RUNNING, False, False, True, None, None)


def test_our_unanswered_commands_are_bounded_and_replies_must_be_owed() -> None:
    a = asking(*["status"] * AGENT_MAX_UNANSWERED)
    with pytest.raises(LocalProtocolError, match="unanswered already"):
        a.command("status")
    b = owing("status")
    b.reply("status", True, "")
    with pytest.raises(LocalProtocolError, match="oldest unanswered command is none"):
        b.reply("status", True, "")
    b.close()
    with pytest.raises(LocalProtocolError, match="after close"):
        b.fence_request(1, (1, 1))


# ---------------------------------------------------------------------------------------------------------
# Hostile fuzz: only events or a RemoteProtocolError come out


st_any = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), U64)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
FIELDS = sorted({k for m in (hb_map(), fence_map(), fack_map(), cmd_map(), reply_map()) for k in m} - {"k"})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([hb_map(), fence_map(), fack_map(), cmd_map(), reply_map()]),
    st.dictionaries(st.sampled_from([*FIELDS, "k"]), st_any, max_size=4),
    st.lists(st.sampled_from(FIELDS), max_size=2),
)
def test_any_field_of_any_type_gives_an_event_or_a_remote_error(
    base: dict[str, Any], changes: dict[str, Any], dropped: list[str]
) -> None:
    frame = {k: v for k, v in {**base, **changes}.items() if k not in dropped}
    a = asking("status")
    a.receive_data(enc(frame))
    try:
        a.next_event()
    except RemoteProtocolError:
        assert a.state is State.CLOSED


# ---------------------------------------------------------------------------------------------------------
# The hand-over from the replication handshake


def agent_hello(**fields: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"k": "hello", "v": PROTOCOL_VERSION, "node": "node-a", "epoch": 3, "role": "agent"}
    d.update(fields)
    return d


def answer(pieces: Iterable[bytes]) -> tuple[ReceiverProtocol, AgentProtocol | None, list[Any]]:
    """The answering side's loop: read until the hello, welcome it, hand over, then read as an agent."""
    rx = ReceiverProtocol("node-b")
    agent: AgentProtocol | None = None
    events: list[Any] = []
    for piece in pieces:
        if agent is None:
            rx.receive_data(piece)
            ev = rx.next_event()
            if ev is None:
                continue
            events.append(ev)
            rx.welcome("", 0, 3)
            agent = AgentProtocol(rx.take_buffered())
        else:
            agent.receive_data(piece)
        while (aev := agent.next_event()) is not None:
            events.append(aev)
    return rx, agent, events


def test_hello_and_a_heartbeat_in_one_read_reach_both_protocols_intact() -> None:
    hb = codec.encode(hb_map())
    rx = ReceiverProtocol("node-b")
    rx.receive_data(enc(agent_hello()) + hb)
    hello = rx.next_event()
    assert hello == Hello(PROTOCOL_VERSION, "node-a", 3, "agent")
    with pytest.raises(LocalProtocolError, match="take_buffered"):  # not parsed as replication
        rx.next_event()
    with pytest.raises(LocalProtocolError, match="after welcoming an agent"):
        rx.take_buffered()
    welcome = rx.welcome("", 0, 3)
    rest = rx.take_buffered()
    assert rest == hb
    assert rx.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        rx.take_buffered()
    with pytest.raises(LocalProtocolError):
        rx.receive_data(b"x")
    assert rx.next_event() is None
    same(pump(AgentProtocol(rest), [b""]), [HB])
    assert codec.unpack(welcome[codec.HEADER_SIZE :])["k"] == "welcome"


def test_hand_over_split_at_every_offset_and_byte_by_byte() -> None:
    a = AgentProtocol()
    data = enc(agent_hello()) + a.heartbeat(HB) + a.command("status", {"v": 1}) + a.fence_request(4, (7, 1))
    want = [
        Hello(PROTOCOL_VERSION, "node-a", 3, "agent"),
        HB,
        AgentCommand("status", {"v": 1}),
        FenceRequest(4, (7, 1)),
    ]
    for k in range(len(data) + 1):
        _, agent, got = answer([data[:k], data[k:]])
        assert agent is not None and got == want, k
    _, _, got = answer([data[i : i + 1] for i in range(len(data))])
    assert got == want


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 1000), max_size=8))
def test_hand_over_however_split(offsets: list[int]) -> None:
    a = AgentProtocol()
    data = enc(agent_hello()) + a.heartbeat(HB) + a.fence_ack(4, (7, 1), True)
    _, _, got = answer(cut(data, offsets))
    assert got == [Hello(PROTOCOL_VERSION, "node-a", 3, "agent"), HB, FenceAck(4, (7, 1), True)]


def test_the_dialing_agent_hands_over_what_came_behind_the_welcome() -> None:
    tx = SenderProtocol("node-a", 3, role="agent")
    rx = ReceiverProtocol("node-b")
    rx.receive_data(tx.hello())
    assert rx.next_event() == Hello(PROTOCOL_VERSION, "node-a", 3, "agent")
    b_side = AgentProtocol()
    tx.receive_data(rx.welcome("", 0, 3) + b_side.heartbeat(HB) + b_side.command("failover"))
    assert b_side.unanswered == 1
    with pytest.raises(LocalProtocolError, match="take_buffered"):
        tx.take_buffered()  # before the welcome is read
    assert isinstance(tx.next_event(), Welcome)
    with pytest.raises(LocalProtocolError, match="take_buffered"):
        tx.next_event()
    with pytest.raises(LocalProtocolError, match="heartbeats are the traffic"):
        tx.ping(1)
    with pytest.raises(LocalProtocolError, match="manifests"):
        tx.manifest_request(1, [])
    a_side = AgentProtocol(tx.take_buffered())
    assert tx.state is State.CLOSED
    evs = pump(a_side, [b""])
    same(evs, [HB, AgentCommand("failover", {})])
    # and the conversation goes on both ways
    b_side.receive_data(a_side.reply("failover", True, "promoting", {"epoch": 4}))
    same(pump(b_side, [b""]), [AgentReply("failover", True, "promoting", {"epoch": 4})])


def test_take_buffered_is_for_agents_only() -> None:
    rx = ReceiverProtocol("node-b")
    rx.receive_data(enc({**agent_hello(), "role": "observer"}))
    assert isinstance(rx.next_event(), Hello)
    rx.welcome("", 0, 3)
    with pytest.raises(LocalProtocolError):
        rx.take_buffered()
    tx = SenderProtocol("node-a", 3)  # a sender, welcomed
    rx2 = ReceiverProtocol("node-b")
    rx2.receive_data(tx.hello())
    assert isinstance(rx2.next_event(), Hello)
    tx.receive_data(rx2.welcome("", 0, 3))
    assert isinstance(tx.next_event(), Welcome)
    with pytest.raises(LocalProtocolError):
        rx2.take_buffered()
    with pytest.raises(LocalProtocolError):
        tx.take_buffered()


def test_a_refused_agent_hands_nothing_over() -> None:
    rx = ReceiverProtocol("node-b")
    rx.receive_data(enc(agent_hello()))
    assert isinstance(rx.next_event(), Hello)
    rx.refuse("busy", "try later")
    with pytest.raises(LocalProtocolError):
        rx.take_buffered()
