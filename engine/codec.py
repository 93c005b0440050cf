"""Frame encoding shared by the journal and the wire. Pure: bytes in, values out.

A frame is::

    +----------------+------------------+---------------------+
    | length: u32 LE | checksum: u32 LE | payload: msgpack    |
    +----------------+------------------+---------------------+

``checksum`` is xxh32 of the payload. A torn or corrupt tail is a *result* (:class:`Torn`), never an
exception: the journal cuts it, the wire treats it as a peer fault.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from engine.digest import checksum, checksum_parts
from engine.errors import FrameError

HEADER = struct.Struct("<II")
HEADER_SIZE = HEADER.size
#: Largest payload accepted by default: a 1 MiB content chunk plus its envelope.
DEFAULT_MAX_FRAME = (1 << 20) + 4096


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(payload: bytes | memoryview) -> Any:
    """Decode one msgpack value, refusing anything but plain maps, lists, str, bytes, ints, bools, None."""
    try:
        return msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_ext_len=0,
            timestamp=0,
            ext_hook=_no_ext,
        )
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as e:
        raise FrameError(f"payload is not one msgpack value: {e}") from None


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not allowed")


def encode(obj: Any) -> bytes:
    payload = pack(obj)
    return HEADER.pack(len(payload), checksum(payload)) + payload


#: msgpack's bin types (bin 8, bin 16, bin 32): the first byte of a content chunk's payload.
BIN_TYPES = (0xC4, 0xC5, 0xC6)


def bin_frame_head(data: bytes | memoryview) -> bytes:
    """The bytes that come before ``data`` in ``encode(bytes(data))``: the frame header and msgpack's bin
    prefix. A content chunk is framed as ``bin_frame_head(chunk)`` then the chunk itself, never copied."""
    n = len(data)
    if n < 1 << 8:
        prefix = b"\xc4" + n.to_bytes(1, "big")
    elif n < 1 << 16:
        prefix = b"\xc5" + n.to_bytes(2, "big")
    else:
        prefix = b"\xc6" + n.to_bytes(4, "big")
    return HEADER.pack(len(prefix) + n, checksum_parts(prefix, data)) + prefix


def bin_payload_ok(payload: bytes | memoryview) -> bool:
    """Whether a frame's (checksummed) payload is exactly one msgpack bin value: a content chunk."""
    if not payload or payload[0] not in BIN_TYPES:
        return False
    width = 1 << (payload[0] - 0xC4)
    return (
        len(payload) >= 1 + width
        and int.from_bytes(payload[1 : 1 + width], "big") == len(payload) - 1 - width
    )


@dataclass(frozen=True, slots=True)
class Torn:
    """Why the bytes at ``offset`` do not hold a whole, valid frame."""

    offset: int
    reason: str


def decode_at(
    buf: bytes | bytearray | memoryview, offset: int, max_frame: int = DEFAULT_MAX_FRAME
) -> tuple[Any, int] | Torn:
    """Decode the frame at ``offset``: ``(value, next_offset)`` or a :class:`Torn` result."""
    if len(buf) - offset < HEADER_SIZE:
        return Torn(offset, "truncated header")
    length, crc = HEADER.unpack_from(buf, offset)
    if length > max_frame:
        return Torn(offset, f"frame length {length} exceeds the limit {max_frame}")
    end = offset + HEADER_SIZE + length
    if end > len(buf):
        return Torn(offset, "truncated payload")
    payload = memoryview(buf)[offset + HEADER_SIZE : end]
    if checksum(payload) != crc:
        return Torn(offset, "checksum mismatch")
    try:
        return unpack(payload), end
    except FrameError as e:
        return Torn(offset, str(e))


class FrameDecoder:
    """Incremental decoder: feed bytes as they arrive, take whole frames out.

    Raises :class:`FrameError` on a corrupt or oversized frame (a stream cannot resynchronise).
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.max_frame = max_frame

    def feed(self, data: bytes) -> None:
        if self._pos and self._pos > len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next(self) -> tuple[bool, Any]:
        """``(True, value)`` for a whole frame, ``(False, None)`` when more bytes are needed."""
        res = decode_at(self._buf, self._pos, self.max_frame)
        if isinstance(res, Torn):
            if res.reason.startswith("truncated"):
                return False, None
            raise FrameError(res.reason)
        value, self._pos = res
        return True, value

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def take_buffered(self) -> bytes:
        """The bytes fed but not yet taken out as frames (a whole frame is consumed only when taken);
        the decoder is empty afterwards. For handing a stream over to another protocol."""
        rest = bytes(self._buf[self._pos :])
        self._buf.clear()
        self._pos = 0
        return rest
