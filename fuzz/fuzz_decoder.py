#!/usr/bin/env python3
"""Coverage-guided fuzzing of the frame decoder and the receiver's protocol state machine (atheris).

Each input is fed to :class:`engine.codec.FrameDecoder`, to :class:`engine.wire.ReceiverProtocol` and to
:class:`engine.wire.SenderProtocol` in one to three pieces. Allowed outcomes: frames or events, ``FrameError``
(decoder), ``RemoteProtocolError`` / ``LocalProtocolError`` (protocols). Anything else is a crash, and so is
any difference between feeding the input whole and in pieces (events, or where the error came).

The first bytes of an input steer it (via ``atheris.FuzzedDataProvider``): how many pieces and where they
are cut; whether the rest is raw bytes or a list of payloads framed here with a correct length and checksum
(so the fuzzer spends its time on msgpack and the state machine, not on guessing xxh32 checksums); and a
valid start of conversation to put before it (a hello, a stream, a put whose chunks are due...).

Usage (from the repository root; any libFuzzer flag works)::

    python fuzz/fuzz_decoder.py -runs=100000
    python fuzz/fuzz_decoder.py fuzz/corpus -max_total_time=600 -artifact_prefix=fuzz/
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports():
    from engine import codec, wire
    from engine.digest import checksum
    from engine.errors import FrameError, LocalProtocolError, RemoteProtocolError
    from engine.journal import entry_header
    from engine.model import CHUNK_SIZE, PROTOCOL_VERSION, Change, Op

MAX_FRAME = 1 << 16  # small, so that the size limit is within the fuzzer's reach


def _frame(payload: bytes) -> bytes:
    return codec.HEADER.pack(len(payload), checksum(payload)) + payload


def _hello(role: str) -> bytes:
    return codec.encode({"k": "hello", "v": PROTOCOL_VERSION, "node": "fuzz", "epoch": 1, "role": role})


_STREAM = codec.encode({"k": "stream", "journal": "j", "from": 1})
_PUT = codec.encode(
    entry_header(Change(1, Op.PUT, "databases/a", size=CHUNK_SIZE + 1, digest=bytes(16), chunks=2))
)
_WELCOME = codec.encode(
    {"k": "welcome", "v": PROTOCOL_VERSION, "node": "r", "journal": "j", "seq": 0, "epoch": 1}
)

#: Valid starts of a conversation: the fuzzer picks one to reach the deeper states at once.
PREFIXES: list[bytes] = [
    b"",
    _hello("sender"),
    _hello("observer"),
    _hello("sender") + _STREAM,
    _hello("sender") + _STREAM + _PUT,
    _hello("sender") + _STREAM + _PUT + codec.encode(b"first chunk"),
    _WELCOME,
]


KINDS = ["hello", "stream", "e", "mreq", "ping", "welcome", "ack", "mpart", "mend", "pong", "refuse", "x"]
FIELDS = [
    "k",
    "v",
    "node",
    "epoch",
    "role",
    "journal",
    "from",
    "s",
    "o",
    "p",
    "d",
    "z",
    "m",
    "h",
    "c",
    "t",
    "id",
    "include",
    "ts",
    "seq",
    "problems",
    "entries",
    "code",
    "reason",
]
WORDS = ["sender", "observer", "put", "delete", "mkdir", "rmdir", "rename", "j", "databases/a", "", "refused"]


def _value(fdp: Any, depth: int = 0) -> Any:
    kind = fdp.ConsumeIntInRange(0, 10 if depth < 3 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeIntInRange(-2, 20)
    if kind == 3:
        return fdp.ConsumeIntInRange(-(2**63), 2**64 - 1)
    if kind == 4:
        return WORDS[fdp.ConsumeIntInRange(0, len(WORDS) - 1)]
    if kind == 5:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 8))
    if kind == 6:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 20))
    if kind == 7:
        return fdp.ConsumeRegularFloat()
    if kind == 8:
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 6))]
    if kind == 9:
        return [_value(fdp, depth + 1) for _ in range(6)]  # the shape of a manifest entry or a problem
    return {
        FIELDS[fdp.ConsumeIntInRange(0, len(FIELDS) - 1)]: _value(fdp, depth + 1)
        for _ in range(fdp.ConsumeIntInRange(0, 3))
    }


def _message(fdp: Any) -> Any:
    """Mostly maps shaped like protocol messages; now and then a bare chunk or any value."""
    pick = fdp.ConsumeIntInRange(0, 9)
    if pick == 0:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))
    if pick == 1:
        return _value(fdp)
    d: dict[str, Any] = {"k": KINDS[fdp.ConsumeIntInRange(0, len(KINDS) - 1)]}
    for _ in range(fdp.ConsumeIntInRange(0, 8)):
        d[FIELDS[fdp.ConsumeIntInRange(0, len(FIELDS) - 1)]] = _value(fdp)
    return d


def build(data: bytes) -> tuple[bytes, list[int]]:
    """The byte stream an input stands for, and where to cut it."""
    fdp = atheris.FuzzedDataProvider(data)
    pieces = fdp.ConsumeIntInRange(1, 3)
    cuts = [fdp.ConsumeIntInRange(0, 4096) for _ in range(pieces - 1)]
    mode = fdp.ConsumeIntInRange(0, 2)
    prefix = PREFIXES[fdp.ConsumeIntInRange(0, len(PREFIXES) - 1)]
    if mode == 0:  # raw bytes
        return prefix + fdp.ConsumeBytes(fdp.remaining_bytes()), cuts
    out = [prefix]
    if mode == 1:  # [length byte][payload] ..., each payload framed with a correct header
        body = fdp.ConsumeBytes(fdp.remaining_bytes())
        i = 0
        while i < len(body):
            n = body[i]
            out.append(_frame(body[i + 1 : i + 1 + n]))
            i += 1 + n
        return b"".join(out), cuts
    while fdp.remaining_bytes() and len(out) < 24:  # messages built from the input, then encoded
        out.append(codec.encode(_message(fdp)))
    return b"".join(out), cuts


def split(stream: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = sorted({min(c, len(stream)) for c in cuts})
    bounds = [0, *points, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def run_decoder(pieces: Sequence[bytes]) -> tuple[list[Any], str]:
    dec = codec.FrameDecoder(MAX_FRAME)
    out: list[Any] = []
    try:
        for piece in pieces:
            dec.feed(piece)
            while True:
                ok, value = dec.next()
                if not ok:
                    if value is not None:
                        raise AssertionError(f"no frame, but a value: {value!r}")
                    break
                out.append(value)
    except FrameError:
        return out, "FrameError"
    return out, f"buffered={dec.buffered}"


def run_protocol(
    make: Callable[[], wire.ReceiverProtocol | wire.SenderProtocol], pieces: Sequence[bytes]
) -> tuple[list[Any], str]:
    """Events and how the run ended; stops at once when the protocol closes, as a caller does."""
    p = make()
    out: list[Any] = []
    try:
        for piece in pieces:
            p.receive_data(piece)
            while (ev := p.next_event()) is not None:
                out.append(ev)
                if p.state is wire.State.CLOSED:
                    return out, "closed"
    except RemoteProtocolError:
        if p.state is not wire.State.CLOSED:
            raise AssertionError("RemoteProtocolError left the protocol open") from None
        return out, "RemoteProtocolError"
    except LocalProtocolError:
        return out, "LocalProtocolError"
    return out, "open"


def _receiver() -> wire.ReceiverProtocol:
    return wire.ReceiverProtocol("fuzz", max_frame=MAX_FRAME)


def _sender() -> wire.SenderProtocol:
    s = wire.SenderProtocol("fuzz", 1, max_frame=MAX_FRAME)
    s.hello()
    return s


def TestOneInput(data: bytes) -> None:  # the name atheris looks for
    stream, cuts = build(data)
    pieces = split(stream, cuts)
    whole = [stream]
    got = run_decoder(pieces)
    if got != run_decoder(whole):
        raise AssertionError(f"decoder: pieces {got!r} != whole {run_decoder(whole)!r}")
    for make in (_receiver, _sender):
        got = run_protocol(make, pieces)
        ref = run_protocol(make, whole)
        if got != ref:
            raise AssertionError(f"{make.__name__}: pieces {got!r} != whole {ref!r}")


def main(argv: list[str]) -> None:
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
