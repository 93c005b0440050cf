"""Frame codec: round trips, incremental decoding split at every offset, and every way a frame is refused.

Sans-I/O style: bytes in, values out, no files or sockets. A stream decoder (``FrameDecoder``) must give
exactly the same frames however the bytes are cut, must ask for more on a short read, and must raise
``FrameError`` (never anything else) on a bad frame. ``decode_at`` reports a torn or corrupt tail as a
``Torn`` value.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import codec
from engine.codec import DEFAULT_MAX_FRAME, HEADER_SIZE, FrameDecoder, Torn, decode_at
from engine.digest import checksum
from engine.errors import FrameError, ReplicationError
from engine.model import CHUNK_SIZE, INT64_MAX, INT64_MIN, Change, FileMeta, Op, clamp_ns

VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2**63 - 1,
    2**64 - 1,
    -(2**63),
    "",
    "møte/ünïcødé 会议.json",
    b"",
    b"\x00\xff" * 100,
    [],
    {},
    [1, [2, [3, [None]]]],
    {"k": "e", "s": 7, "o": "put", "p": "a/b", "h": b"\x01" * 16},
    {b"raw key": [True, "x"]},
]


def frame(payload: bytes) -> bytes:
    """A frame with a correct header around any payload (msgpack or not)."""
    return codec.HEADER.pack(len(payload), checksum(payload)) + payload


def drain(decoder: FrameDecoder) -> list[Any]:
    out: list[Any] = []
    while True:
        ok, value = decoder.next()
        if not ok:
            assert value is None
            return out
        out.append(value)


def stream_of(values: list[Any]) -> tuple[bytes, list[int]]:
    """The concatenated frames and the end offset of each."""
    parts = [codec.encode(v) for v in values]
    ends, total = [], 0
    for p in parts:
        total += len(p)
        ends.append(total)
    return b"".join(parts), ends


# ---------------------------------------------------------------------------------------------------------
# Encoding and round trips


@pytest.mark.parametrize("value", VALUES, ids=lambda v: ascii(v)[:30])
def test_round_trip(value: Any) -> None:
    data = codec.encode(value)
    assert decode_at(data, 0) == (value, len(data))
    d = FrameDecoder()
    d.feed(data)
    assert drain(d) == [value]
    assert d.buffered == 0


def test_frame_layout_is_length_checksum_payload() -> None:
    value = {"k": "seg", "first": 1}
    data = codec.encode(value)
    length, crc = struct.unpack_from("<II", data)
    payload = data[HEADER_SIZE:]
    assert HEADER_SIZE == 8
    assert length == len(payload)
    assert crc == checksum(payload)
    assert payload == codec.pack(value) == msgpack.packb(value, use_bin_type=True)


def test_tuples_decode_as_lists() -> None:
    assert decode_at(codec.encode((1, (2, 3))), 0) == ([1, [2, 3]], len(codec.encode((1, (2, 3)))))


def test_str_and_bytes_stay_distinct() -> None:
    value = ["a", b"a"]
    decoded = decode_at(codec.encode(value), 0)
    assert not isinstance(decoded, Torn)
    assert decoded[0] == value
    assert [type(v) for v in decoded[0]] == [str, bytes]


def test_full_content_chunk_fits_the_default_limit() -> None:
    chunk = bytes(range(256)) * (CHUNK_SIZE // 256)
    data = codec.encode(chunk)
    assert len(data) - HEADER_SIZE <= DEFAULT_MAX_FRAME
    d = FrameDecoder()
    d.feed(data)
    assert drain(d) == [chunk]


def test_decode_at_walks_consecutive_frames() -> None:
    data, ends = stream_of(VALUES)
    offset, got = 0, []
    for end in ends:
        res = decode_at(data, offset)
        assert not isinstance(res, Torn)
        got.append(res[0])
        assert res[1] == end
        offset = end
    assert got == VALUES
    assert decode_at(data, offset) == Torn(offset, "truncated header")


def test_decode_at_accepts_memoryview_and_bytearray() -> None:
    data = codec.encode({"a": 1})
    assert decode_at(memoryview(data), 0) == ({"a": 1}, len(data))
    assert decode_at(bytearray(b"xx" + data), 2) == ({"a": 1}, 2 + len(data))


# ---------------------------------------------------------------------------------------------------------
# Splitting: the decoder gives the same frames however the bytes arrive

SPLIT_VALUES: list[Any] = [{"k": "e", "s": 1, "p": "a"}, None, b"\x00" * 300, "møte", [], 2**64 - 1, {}]


def test_split_at_every_offset() -> None:
    data, _ends = stream_of(SPLIT_VALUES)
    for cut in range(len(data) + 1):
        d = FrameDecoder()
        d.feed(data[:cut])
        got = drain(d)
        d.feed(data[cut:])
        got += drain(d)
        assert got == SPLIT_VALUES, cut
        assert d.buffered == 0


def test_split_at_every_pair_of_offsets() -> None:
    values: list[Any] = [{"s": 1}, None, b"xyz", "é", [1, 2]]
    data, _ends = stream_of(values)
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            d = FrameDecoder()
            got: list[Any] = []
            for piece in (data[:i], data[i:j], data[j:]):
                d.feed(piece)
                got += drain(d)
            assert got == values, (i, j)


def test_byte_by_byte_frames_come_out_exactly_when_complete() -> None:
    data, ends = stream_of(SPLIT_VALUES)
    d = FrameDecoder()
    got: list[Any] = []
    completed_at: list[int] = []
    for i in range(len(data)):
        d.feed(data[i : i + 1])
        new = drain(d)
        got += new
        completed_at += [i + 1] * len(new)
    assert got == SPLIT_VALUES
    assert completed_at == ends
    assert d.buffered == 0


def test_decoder_keeps_working_over_many_frames() -> None:
    # Exercises the buffer compaction in feed(): many frames through one decoder in uneven pieces.
    values: list[Any] = [{"i": i, "pad": b"p" * (i % 97)} for i in range(500)]
    data, _ends = stream_of(values)
    d = FrameDecoder()
    got: list[Any] = []
    step = 1
    pos = 0
    while pos < len(data):
        d.feed(data[pos : pos + step])
        got += drain(d)
        pos += step
        step = step % 251 + 7
    assert got == values
    assert d.buffered == 0


def test_empty_feed_asks_for_more() -> None:
    d = FrameDecoder()
    d.feed(b"")
    assert d.next() == (False, None)
    assert d.buffered == 0


# ---------------------------------------------------------------------------------------------------------
# Torn input: decode_at returns Torn, the decoder asks for more


@pytest.mark.parametrize("prefix", [b"", codec.encode("first")], ids=["at-0", "after-a-frame"])
def test_decode_at_truncated_at_every_offset_is_torn(prefix: bytes) -> None:
    whole = codec.encode({"k": "e", "s": 3, "p": "møte/a", "h": b"\x02" * 16, "c": [1, 2, 3]})
    for cut in range(len(whole)):
        res = decode_at(prefix + whole[:cut], len(prefix))
        assert isinstance(res, Torn), cut
        assert res.offset == len(prefix)
        expected = "truncated header" if cut < HEADER_SIZE else "truncated payload"
        assert res.reason == expected
    assert decode_at(prefix + whole, len(prefix)) == (
        {"k": "e", "s": 3, "p": "møte/a", "h": b"\x02" * 16, "c": [1, 2, 3]},
        len(prefix) + len(whole),
    )


def test_decoder_asks_for_more_at_every_truncation() -> None:
    whole = codec.encode(b"content" * 10)
    for cut in range(len(whole)):
        d = FrameDecoder()
        d.feed(whole[:cut])
        assert d.next() == (False, None)
        assert d.buffered == cut


# ---------------------------------------------------------------------------------------------------------
# Corrupt frames: Torn from decode_at, FrameError from the decoder


def assert_refused(data: bytes, reason_start: str, max_frame: int = DEFAULT_MAX_FRAME) -> None:
    res = decode_at(data, 0, max_frame)
    assert isinstance(res, Torn)
    assert res.offset == 0
    assert res.reason.startswith(reason_start), res.reason
    d = FrameDecoder(max_frame)
    d.feed(data)
    with pytest.raises(FrameError):
        d.next()
    # Same result when the bad frame follows a good one.
    good = codec.encode("ok")
    d = FrameDecoder(max_frame)
    d.feed(good + data)
    assert d.next() == (True, "ok")
    with pytest.raises(FrameError):
        d.next()


def test_corrupt_checksum() -> None:
    good = codec.encode({"k": "e", "s": 1})
    for i in range(4, HEADER_SIZE):
        bad = bytearray(good)
        bad[i] ^= 0x01
        assert_refused(bytes(bad), "checksum mismatch")


def test_flipped_payload_byte_at_every_offset() -> None:
    good = codec.encode({"k": "e", "s": 1, "p": "a/b", "h": b"\x00" * 16})
    for i in range(HEADER_SIZE, len(good)):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(good)
            bad[i] ^= mask
            assert_refused(bytes(bad), "checksum mismatch")


def test_length_over_the_limit_is_refused_from_the_header_alone() -> None:
    header = codec.HEADER.pack(DEFAULT_MAX_FRAME + 1, 0)
    assert_refused(header, "frame length")
    assert_refused(codec.HEADER.pack(0xFFFFFFFF, 0), "frame length")


def test_custom_max_frame_boundary() -> None:
    at_limit = frame(codec.pack(b"x" * 14))  # 16-byte payload
    assert len(at_limit) - HEADER_SIZE == 16
    d = FrameDecoder(max_frame=16)
    d.feed(at_limit)
    assert drain(d) == [b"x" * 14]
    assert_refused(frame(codec.pack(b"x" * 15)), "frame length", max_frame=16)


NOT_MSGPACK = [
    pytest.param(b"", id="empty"),
    pytest.param(b"\xc1", id="never-used-byte"),
    pytest.param(b"\x00\x00", id="two-values"),
    pytest.param(codec.pack({"a": 1}) + b"\x00", id="trailing-byte"),
    pytest.param(b"\x91", id="incomplete-array"),
    pytest.param(b"\xa2\xff\xfe", id="bad-utf8-str"),
    pytest.param(b"\x81\x01\x02", id="int-map-key"),
    pytest.param(b"\x81\x90\x01", id="list-map-key"),
    pytest.param(b"\xdd\xff\xff\xff\xff", id="huge-array-count"),
    pytest.param(b"\xc6\xff\xff\xff\xff", id="huge-bin-length"),
    pytest.param(b"\x91" * 5000 + b"\xc0", id="nested-too-deep"),
    pytest.param(b"not msgpack at all, just text", id="text"),
]


@pytest.mark.parametrize("payload", NOT_MSGPACK)
def test_payload_that_is_not_one_msgpack_value(payload: bytes) -> None:
    with pytest.raises(FrameError):
        codec.unpack(payload)
    assert_refused(frame(payload), "payload is not one msgpack value")


EXT_PAYLOADS = [
    pytest.param(b"\xd4\x05\x00", id="fixext1"),
    pytest.param(b"\xd8\x05" + b"\x00" * 16, id="fixext16"),
    pytest.param(b"\xc7\x01\x05\x00", id="ext8"),
    pytest.param(b"\xd6\xff\x00\x00\x00\x00", id="timestamp32"),
    pytest.param(b"\xd7\xff" + b"\x00" * 8, id="timestamp64"),
    pytest.param(b"\x91\xd4\x05\x00", id="fixext1-in-list"),
    pytest.param(b"\x81\xa1k\xd4\x05\x00", id="fixext1-in-map"),
    pytest.param(b"\xc7\x00\xff", id="empty-timestamp"),
    pytest.param(
        msgpack.packb(msgpack.ExtType(5, b"")),
        id="empty-ext8",
    ),
    pytest.param(
        b"\x91" + msgpack.packb(msgpack.ExtType(5, b"")),
        id="empty-ext8-in-list",
    ),
]


@pytest.mark.parametrize("payload", EXT_PAYLOADS)
def test_msgpack_ext_types_are_refused(payload: bytes) -> None:
    with pytest.raises(FrameError):
        codec.unpack(payload)
    assert_refused(frame(payload), "payload is not one msgpack value")


def test_frame_error_is_a_replication_error() -> None:
    assert issubclass(FrameError, ReplicationError)


# ---------------------------------------------------------------------------------------------------------
# Property: the decoder fed arbitrary bytes returns values, asks for more, or raises FrameError

_PLAIN = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=10,
)
_PIECE = st.one_of(
    st.binary(max_size=40),  # noise
    st.binary(max_size=40).map(frame),  # a correct header around any payload: reaches msgpack
    _PLAIN.map(codec.encode),  # a good frame
    _PLAIN.map(codec.encode).map(lambda b: b[: len(b) // 2]),  # a torn frame
    st.integers(0, 0xFFFFFFFF).map(lambda n: codec.HEADER.pack(n, 0)),  # any length
)


@settings(max_examples=500, deadline=None)
@given(st.lists(_PIECE, max_size=6), st.lists(st.integers(1, 64), min_size=1, max_size=8))
def test_property_decoder_never_raises_anything_but_frame_error(
    pieces: list[bytes], steps: list[int]
) -> None:
    data = b"".join(pieces)
    d = FrameDecoder(max_frame=1 << 16)
    pos, i = 0, 0
    try:
        while pos < len(data):
            n = steps[i % len(steps)]
            d.feed(data[pos : pos + n])
            pos += n
            i += 1
            drain(d)
    except FrameError:
        return
    # No error: whatever is left is a frame still waiting for bytes.
    assert d.next() == (False, None)


@settings(max_examples=300, deadline=None)
@given(st.lists(_PLAIN, max_size=6), st.data())
def test_property_good_frames_survive_any_split(values: list[Any], data: st.DataObject) -> None:
    stream, _ends = stream_of(values)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    d = FrameDecoder()
    got: list[Any] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        d.feed(stream[prev:cut])
        got += drain(d)
        prev = cut
    assert got == values
    assert d.buffered == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_property_decode_at_returns_value_or_torn(data: bytes) -> None:
    res = decode_at(data, 0, 1 << 16)
    if not isinstance(res, Torn):
        _value, end = res
        assert HEADER_SIZE <= end <= len(data)


# ---------------------------------------------------------------------------------------------------------
# Modification times in entry headers and manifest entries: any int64, signed (before 1970 is negative)

MTIMES_OK = [0, 1, -1, -86_400 * 10**9, -1_009_843_200 * 10**9, INT64_MIN, INT64_MAX]
MTIMES_BAD: list[Any] = [INT64_MAX + 1, INT64_MIN - 1, 2**64 - 1, True, 1.5, "0", None, b"\x00"]


def _through_a_frame(value: Any) -> Any:
    dec = FrameDecoder()
    dec.feed(codec.encode(value))
    ok, got = dec.next()
    assert ok
    return got


@pytest.mark.parametrize("mtime", MTIMES_OK)
def test_a_put_header_carries_any_int64_mtime(mtime: int) -> None:
    c = Change(7, Op.PUT, "databases/a.json", size=3, mtime_ns=mtime, digest=bytes(16), chunks=1, ts_ns=9)
    assert Change.from_wire(_through_a_frame(c.to_wire())) == c


@pytest.mark.parametrize("mtime", MTIMES_OK)
def test_a_manifest_entry_carries_any_int64_mtime(mtime: int) -> None:
    e = FileMeta("databases/a.json", size=3, mtime_ns=mtime, digest=bytes(16))
    assert FileMeta.from_wire(_through_a_frame(e.to_wire())) == e


@pytest.mark.parametrize("mtime", MTIMES_BAD, ids=repr)
def test_an_mtime_outside_int64_or_not_an_int_is_refused(mtime: Any) -> None:
    header = {"s": 1, "o": "put", "p": "a", "z": 1, "m": mtime, "h": bytes(16), "c": 1}
    with pytest.raises(ValueError, match="field 'm' is not a 64-bit signed integer"):
        Change.from_wire(header)
    with pytest.raises(ValueError, match="wrong type"):
        FileMeta.from_wire(["a", False, 1, mtime, bytes(16), []])


def test_clamp_ns_keeps_a_time_inside_int64() -> None:
    assert clamp_ns(10_413_792_000 * 10**9) == INT64_MAX  # 2300-01-01
    assert clamp_ns(-(2**70)) == INT64_MIN
    assert [clamp_ns(m) for m in MTIMES_OK] == MTIMES_OK


@pytest.mark.parametrize("mtime", MTIMES_OK)
def test_a_touch_header_carries_its_time_size_and_digest(mtime: int) -> None:
    c = Change(8, Op.TOUCH, "databases/a.json", size=3, mtime_ns=mtime, digest=bytes(range(16)), ts_ns=9)
    wire = c.to_wire()
    assert wire["o"] == "touch" and "c" not in wire
    assert Change.from_wire(_through_a_frame(wire)) == c


@pytest.mark.parametrize(
    "fields",
    [{"h": b"short"}, {"h": "0" * 16}, {"c": 1}],
    ids=["digest too short", "digest a string", "announces content"],
)
def test_a_touch_without_a_digest_or_with_content_is_refused(fields: dict[str, Any]) -> None:
    d = {"s": 1, "o": "touch", "p": "a", "z": 1, "m": 5, "h": bytes(16)} | fields
    with pytest.raises(ValueError):
        Change.from_wire(d)


@pytest.mark.parametrize("n", [0, 1, 255, 256, 65535, 65536, 1 << 20])
def test_a_content_chunk_framed_without_copying_is_the_frame_encode_makes(n: int) -> None:
    data = bytes(range(256)) * (n // 256) + bytes(n % 256)
    frame = codec.encode(data)
    assert codec.bin_frame_head(data) + data == frame
    assert codec.bin_payload_ok(frame[codec.HEADER_SIZE :])
    assert not codec.bin_payload_ok(frame[codec.HEADER_SIZE : -1] if n else b"")  # length disagrees
    assert not codec.bin_payload_ok(codec.encode({"k": "e"})[codec.HEADER_SIZE :])  # a map, not bytes
    assert not codec.bin_payload_ok(codec.encode("text")[codec.HEADER_SIZE :])
