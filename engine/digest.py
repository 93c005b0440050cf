"""Content digests (xxh3_128) and frame checksums (xxh32). The one module that imports xxhash."""

from __future__ import annotations

from collections.abc import Iterable

import xxhash

DIGEST_SIZE = 16


class Hasher:
    """Incremental xxh3_128 over chunks."""

    __slots__ = ("_h",)

    def __init__(self) -> None:
        self._h = xxhash.xxh3_128()

    def update(self, data: bytes | memoryview) -> None:
        self._h.update(data)

    def digest(self) -> bytes:
        return bytes(self._h.digest())


def digest_bytes(data: bytes | memoryview) -> bytes:
    return bytes(xxhash.xxh3_128_digest(data))


def digest_chunks(chunks: Iterable[bytes]) -> bytes:
    h = Hasher()
    for c in chunks:
        h.update(c)
    return h.digest()


def checksum(data: bytes | memoryview) -> int:
    """32-bit frame checksum."""
    return int(xxhash.xxh32_intdigest(data))


def checksum_parts(*parts: bytes | memoryview) -> int:
    """:func:`checksum` of the parts joined, without joining them."""
    h = xxhash.xxh32()
    for p in parts:
        h.update(p)
    return int(h.intdigest())


def hexdigest(d: bytes) -> str:
    return d.hex()
