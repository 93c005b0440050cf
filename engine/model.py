"""Frozen values shared by every layer: positions, change records, file metadata, and the path rules.

Pure: no I/O, no clock. Paths inside standby are *relative* and *POSIX-form* (``databases/room1/m.json``)
everywhere: on the wire, in the journal and in manifests. Only the I/O layers turn them into OS paths.

INVARIANT: every relative path that reaches an I/O layer has passed :func:`check_relpath`.
"""

from __future__ import annotations

import base64
import enum
import functools
import hashlib
import re
import sys
from dataclasses import dataclass
from typing import Any

from engine.errors import ConfigError, PathRejected

PROTOCOL_VERSION = 1

#: Name marker of the receiver's temporary files. Scans and manifests ignore any name containing it.
TEMP_MARKER = ".standby-tmp-"

#: Limits applied to every path from outside (config, wire, journal).
MAX_PATH_CHARS = 1024
MAX_NAME_CHARS = 255
MAX_PATH_DEPTH = 64

#: Modification times travel as msgpack int64 nanoseconds since 1970: signed (a file may be dated before
#: 1970), from 1677-09-21 to 2262-04-11. A scan clamps a time beyond that range into it (see clamp_ns).
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1


def clamp_ns(ns: int) -> int:
    """``ns`` if an int64 holds it, else the nearest bound (a file dated after 2262 or before 1677)."""
    return INT64_MIN if ns < INT64_MIN else INT64_MAX if ns > INT64_MAX else ns


@dataclass(frozen=True, order=True, slots=True)
class Pos:
    """A position in the change stream: compared, printed and parsed, never re-derived.

    ``epoch`` rises at each failover; ``seq`` numbers journal entries from 1 within one journal.
    """

    epoch: int
    seq: int

    def __str__(self) -> str:
        return f"{self.epoch}/{self.seq}"

    @classmethod
    def parse(cls, text: str) -> Pos:
        epoch, sep, seq = text.partition("/")
        if not sep or not epoch.isdigit() or not seq.isdigit():
            raise ValueError(f"not a position (want EPOCH/SEQ): {text!r}")
        return cls(int(epoch), int(seq))


class Op(enum.StrEnum):
    PUT = "put"
    DELETE = "delete"
    MKDIR = "mkdir"
    RMDIR = "rmdir"
    RENAME = "rename"
    #: The modification time of a file changed and its content did not: ``m`` is the new time, ``z`` and
    #: ``h`` the content it applies to (a replica holding other content reports "stale").
    TOUCH = "touch"


@dataclass(frozen=True, slots=True)
class Change:
    """One journal entry's header. A PUT's content follows as ``chunks`` data frames.

    ``digest`` is the xxh3_128 of the whole content (PUT only); ``ts_ns`` is the wall time the change was
    journaled, used by point-in-time replay.
    """

    seq: int
    op: Op
    path: str
    dst: str = ""
    size: int = 0
    mtime_ns: int = 0
    digest: bytes = b""
    chunks: int = 0
    ts_ns: int = 0

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {"s": self.seq, "o": self.op.value, "p": self.path}
        if self.op is Op.RENAME:
            d["d"] = self.dst
        if self.op is Op.PUT:
            d.update(z=self.size, m=self.mtime_ns, h=self.digest, c=self.chunks)
        elif self.op is Op.TOUCH:
            d.update(z=self.size, m=self.mtime_ns, h=self.digest)
        if self.ts_ns:
            d["t"] = self.ts_ns
        return d

    @classmethod
    def from_wire(cls, d: Any) -> Change:
        """Build from an untrusted decoded map. Raises ValueError naming what is wrong."""
        if not isinstance(d, dict):
            raise ValueError("change header is not a map")
        try:
            op = Op(d["o"])
        except (KeyError, ValueError):
            raise ValueError(f"unknown change op {d.get('o')!r}") from None
        seq = _int(d, "s")
        path = d.get("p")
        if not isinstance(path, str):
            raise ValueError("change path is not a string")
        dst = d.get("d", "")
        if not isinstance(dst, str):
            raise ValueError("rename destination is not a string")
        if op is Op.RENAME and not dst:
            raise ValueError("rename without destination")
        digest = d.get("h", b"")
        if not isinstance(digest, bytes) or (op in (Op.PUT, Op.TOUCH) and len(digest) != 16):
            raise ValueError(f"{op.value} digest is not 16 bytes")
        size = _int(d, "z", 0)
        chunks = _int(d, "c", 0)
        if op is not Op.PUT and chunks:
            raise ValueError(f"a {op.value} carries no content, but announces {chunks} chunks")
        if op is Op.PUT and chunks != chunk_count(size):
            # The chunk count follows from the size: the chunk size is fixed by the protocol.
            raise ValueError(f"put of {size} bytes announces {chunks} chunks")
        return cls(
            seq=seq,
            op=op,
            path=path,
            dst=dst,
            size=size,
            mtime_ns=_mtime(d, "m"),
            digest=digest,
            chunks=chunks,
            ts_ns=_int(d, "t", 0),
        )


#: Content is carried in data frames of at most this many bytes (journal and wire alike).
CHUNK_SIZE = 1 << 20


def chunk_count(size: int) -> int:
    return (size + CHUNK_SIZE - 1) // CHUNK_SIZE


def _int(d: dict[str, Any], key: str, default: int | None = None) -> int:
    v = d.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v >= 1 << 63:
        raise ValueError(f"field {key!r} is not a non-negative integer")
    return v


def _mtime(d: dict[str, Any], key: str) -> int:
    """A modification time: any int64 (signed: before 1970 is negative)."""
    v = d.get(key, 0)
    if not _is_mtime(v):
        raise ValueError(f"field {key!r} is not a 64-bit signed integer")
    assert isinstance(v, int)
    return v


def _is_mtime(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and INT64_MIN <= v <= INT64_MAX


#: The flags of almost every manifest entry: one shared object (an empty frozenset is not a singleton, and
#: a manifest of 100,000 entries would otherwise hold 100,000 of them).
NO_FLAGS: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class FileMeta:
    """What a manifest knows of one path. Directories have ``is_dir`` and no digest."""

    path: str
    is_dir: bool = False
    size: int = 0
    mtime_ns: int = 0
    digest: bytes = b""
    flags: frozenset[str] = NO_FLAGS

    def same_content(self, other: FileMeta) -> bool:
        return self.is_dir == other.is_dir and (
            self.is_dir or (self.size == other.size and self.digest == other.digest)
        )

    def to_wire(self) -> list[Any]:
        return [self.path, self.is_dir, self.size, self.mtime_ns, self.digest, sorted(self.flags)]

    @classmethod
    def from_wire(cls, v: Any) -> FileMeta:
        if not isinstance(v, list) or len(v) != 6:
            raise ValueError("manifest entry is not a 6-item list")
        path, is_dir, size, mtime_ns, digest, flags = v
        # Exact types (msgpack decodes to nothing else; a bool is no size): the checks of 100,000 entries
        # are a tenth of a restart's reconciliation.
        if not (
            type(path) is str
            and type(is_dir) is bool
            and type(size) is int
            and size >= 0
            and type(mtime_ns) is int
            and INT64_MIN <= mtime_ns <= INT64_MAX
            and type(digest) is bytes
            and type(flags) is list
            and (not flags or all(type(f) is str for f in flags))
        ):
            raise ValueError("manifest entry has a field of the wrong type")
        # The path is interned: the same string is a key of the hash cache and of the source manifest.
        return cls(sys.intern(path), is_dir, size, mtime_ns, digest, frozenset(flags) if flags else NO_FLAGS)


# ---------------------------------------------------------------------------------------------------------
# Path rules. A relative path is accepted only if every OS we run on can hold it under the root, unchanged.

_WIN_RESERVED = re.compile(r"^(CON|PRN|AUX|NUL|COM[0-9¹²³]|LPT[0-9¹²³]|CONIN\$|CONOUT\$)$", re.I)
_WIN_BAD_CHARS = frozenset('<>:"|?*\\/') | frozenset(chr(c) for c in range(32))
#: The shape of an 8.3 alias (NTFS ``PROGRA~1``, ``AB12CD~1``; Samba's mangled ``MVNQD~Z1``): up to eight
#: characters with a tilde after the first, then up to three after a dot. Where 8.3 names are on (the
#: NTFS default on many servers, Samba's ``mangled names``), such a name may *be* another file's alias:
#: a put to it would overwrite that file.
_SHORT_ALIAS = re.compile(r"^(?=[^.]{1,8}(\.|$))[^.~]{1,7}~[0-9A-Za-z_]{1,7}(\.[^.]{1,3})?$")


#: Everything check_name refuses character by character, as one search (the common case finds nothing).
_BAD_NAME_CHAR = re.compile('[<>:"|?*\\\\/\x00-\x1f\ud800-\udfff]')


def check_name(name: str, path: str) -> None:
    """Refuse one path component that Windows or POSIX cannot hold as a plain name."""
    why = _name_problem(name)
    if why is not None:
        raise PathRejected(path, why)


#: A name of letters, digits, ``_``, ``-`` and dots, not starting with a dot: no character any system
#: refuses, no space, no tilde (so no 8.3 alias), one byte and one UTF-16 unit per character.
_PLAIN_NAME = re.compile(r"[0-9A-Za-z_\-][0-9A-Za-z_.\-]*")


def _plain_name_ok(name: str) -> bool:
    """True if ``name`` is a plain name (see _PLAIN_NAME) that :func:`_name_problem` accepts, decided
    without its cache: file names are mostly unique, so a walk would only fill and churn the cache."""
    return (
        _PLAIN_NAME.fullmatch(name) is not None
        and len(name) <= MAX_NAME_CHARS
        and name[-1] != "."
        and TEMP_MARKER not in name
        and _WIN_RESERVED.match(name.partition(".")[0]) is None
    )


@functools.lru_cache(maxsize=8192)
def _name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a path component, or None. Cached: folder names repeat in every path."""
    if name in ("", ".", ".."):
        return "empty, '.' or '..' component"
    bad_char = _BAD_NAME_CHAR.search(name) is not None
    if bad_char and any(0xD800 <= ord(c) <= 0xDFFF for c in name):
        return "name is not valid Unicode (an undecodable file name)"
    # A name of up to MAX_NAME_CHARS // 4 characters fits in both encodings whatever it holds.
    if 4 * len(name) > MAX_NAME_CHARS and (
        len(name.encode("utf-8")) > MAX_NAME_CHARS or len(name.encode("utf-16-le")) > 2 * MAX_NAME_CHARS
    ):
        return f"a name is longer than {MAX_NAME_CHARS} bytes (UTF-8) or UTF-16 units"
    if bad_char:
        bad = sorted({c for c in name if c in _WIN_BAD_CHARS})
        return f"name {name!r} holds characters Windows cannot hold: {bad!r}"
    if name.endswith((" ", ".")):
        return f"name {name!r} ends with a space or dot"
    # Windows ignores what follows the first dot, and spaces before it, when it looks for device names.
    if _WIN_RESERVED.match(name.partition(".")[0].rstrip(" ")):
        return f"name {name!r} is a reserved device name on Windows"
    if TEMP_MARKER in name:
        return "name uses the temporary-file marker"
    if "~" in name and _SHORT_ALIAS.match(name):
        return f"name {name!r} has the shape of an 8.3 alias: on Windows or SMB it may name another file"
    return None


def check_relpath(path: str, max_chars: int = MAX_PATH_CHARS, max_depth: int = MAX_PATH_DEPTH) -> str:
    """Return ``path`` if it is a clean, relative, POSIX-form path under a root; raise PathRejected.

    Refused: empty, absolute (``/x``, ``C:\\x``, ``C:x``, ``\\\\server\\share``), backslashes, ``.``/``..``
    or empty components, names Windows cannot hold, NUL and control characters, over-long or over-deep
    paths. The path is returned unchanged: a path that would need normalising is refused, not rewritten.
    """
    if not isinstance(path, str) or not path:
        raise PathRejected(str(path), "empty path")
    if len(path) > max_chars:
        raise PathRejected(path[:80] + "...", f"longer than {max_chars} characters")
    if "\x00" in path:
        raise PathRejected(path, "holds a NUL character")
    if path.startswith("/"):
        raise PathRejected(path, "absolute path")
    if "\\" in path:
        raise PathRejected(path, "backslash (paths are sent in POSIX form; may be a Windows absolute path)")
    if len(path) >= 2 and path[1] == ":" and path[0].isalpha():
        raise PathRejected(path, "drive letter")
    parts = path.split("/")
    if len(parts) > max_depth:
        raise PathRejected(path, f"deeper than {max_depth} components")
    for name in parts:
        check_name(name, path)
    return path


class RelpathChecker:
    """:func:`check_relpath` for the many paths of one walk or stream, by their last name where it can.

    A path that passes has a folder that passes too (shorter, shallower, the same names), so once a path
    below a folder was accepted, another path below it is checked by its length, its depth and its last
    name alone. Same verdict, and for a refusal the same reason, as :func:`check_relpath`; at 100,000
    files it saves splitting and looking up every folder name again (a third of a second). Pure: holds
    only accepted folders.
    """

    __slots__ = ("_depth", "max_chars", "max_depth")
    #: Accepted folders held at most (about 8 MB); then it starts again from none.
    MAX_FOLDERS = 65536

    def __init__(self, max_chars: int = MAX_PATH_CHARS, max_depth: int = MAX_PATH_DEPTH) -> None:
        self.max_chars = max_chars
        self.max_depth = max_depth
        #: Accepted folder -> the depth of a path directly below it.
        self._depth: dict[str, int] = {}

    def __call__(self, path: str) -> str:
        if not isinstance(path, str):
            return check_relpath(path)  # refused, with check_relpath's reason
        folder, slash, name = path.rpartition("/")
        depth = self._depth.get(folder) if slash else None
        if (
            depth is not None
            and len(path) <= self.max_chars
            and depth <= self.max_depth
            and (_plain_name_ok(name) or _name_problem(name) is None)  # a backslash, NUL, ... is one
        ):
            return path
        check_relpath(path, self.max_chars, self.max_depth)  # a refusal says what check_relpath says
        if len(self._depth) >= self.MAX_FOLDERS:
            self._depth.clear()  # a long-lived checker (the intake's) holds at most this many
        if slash:
            self._depth[folder] = folder.count("/") + 2
        return path


def is_temp_name(name: str) -> bool:
    return TEMP_MARKER in name


def parent_of(path: str) -> str:
    """The relative parent of a relative path ('' for a top-level name)."""
    return path.rpartition("/")[0]


def child_of(folder: str, name: str) -> str:
    """The relative path of ``name`` in ``folder`` (``""`` is the root): :func:`parent_of`'s inverse."""
    return f"{folder}/{name}" if folder else name


def is_under(path: str, folder: str) -> bool:
    """True if ``path`` is ``folder`` or lies below it (both relative POSIX paths)."""
    return path == folder or path.startswith(folder + "/")


def to_posix_rel(os_rel: str, sep: str) -> str:
    """Turn an OS-relative path (separator ``sep``) into POSIX form. Pure: Windows logic is testable."""
    return os_rel.replace(sep, "/") if sep != "/" else os_rel


# ---- node IDs (see engine.identity for the key files they name) ------------------------------------------
def node_id(cert_der: bytes) -> str:
    raw = base64.b32encode(hashlib.sha256(cert_der).digest()).decode("ascii").rstrip("=")
    return "-".join(raw[i : i + 4] for i in range(0, len(raw), 4))


def parse_id(text: str, key: str) -> str:
    """Normalise a pinned ID from config (case, dashes and spaces do not matter); error names ``key``."""
    raw = "".join(c for c in text.upper() if c not in "- ")
    if len(raw) != 52 or any(c not in "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567" for c in raw):
        raise ConfigError(f"{key}: not a node ID (52 base32 characters, as printed by `standby init`)")
    return "-".join(raw[i : i + 4] for i in range(0, 52, 4))
