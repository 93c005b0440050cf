"""The replica behind one interface: what the applier, the receiver's manifest, guard history restore and
replay ask of the place a replica lives. Two kinds: a local folder (:mod:`engine.targets.local`) and an
SMB share (:mod:`engine.targets.smb`, the one smbprotocol importer).

Every path given to a target is relative to its root, in POSIX form (``a/b/c``), already checked by the
caller against :func:`engine.model.check_relpath`; ``""`` is the root itself. A target never follows a
symlink or reparse point of its own accord: :meth:`Target.stat` reports one as :attr:`Kind.LINK`.

INVARIANT (every target): nothing is renamed into place before its content is durable. A put is written
to a temporary name in the folder of its final path (:meth:`Target.write_temp` or :meth:`Target.begin_put`)
and made durable there: at once (``durable=True``), or, on a target with ``caps.group_sync``, by one
:meth:`Target.sync_group` that the applier calls before it places anything. Only then :meth:`Target.place`
renames it over its final path.

Must not: hold policy (what to apply, when, in which order: the applier's), or know about the wire.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from engine.config import ReceiverConfig
from engine.model import FileMeta, child_of
from engine.scan import FileKey, HashCache, Manifest


class Kind(enum.Enum):
    FILE = "file"
    DIR = "dir"
    LINK = "link"  # a symlink, junction or other reparse point: never followed, never written through
    OTHER = "other"  # a device, socket or fifo


@dataclass(frozen=True, slots=True)
class Stat:
    """What a target knows of one entry: its kind, size and mtime, and the hash cache's key for it."""

    kind: Kind
    size: int
    mtime_ns: int
    key: FileKey
    atime_ns: int = 0


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What differs between targets, for callers and the README.

    ``group_sync``: one call makes every write since the last durable (Linux syncfs); without it each put
    is made durable as it is written. ``case_insensitive``: ``A`` and ``a`` name one entry.
    ``mtime_resolution_ns``: the finest time the target keeps. ``filetime``: times are Windows FILETIMEs
    (nothing before 1601). ``short_names``: 8.3 aliases may exist (a name shaped like one may *be* another
    file: :mod:`engine.model` refuses such names everywhere)."""

    group_sync: bool
    case_insensitive: bool
    mtime_resolution_ns: int
    filetime: bool
    short_names: bool


class Put(Protocol):
    """A put streamed into its temporary file (large content, bounded memory)."""

    temp: str  # the temporary file's relative path

    def write(self, data: bytes) -> None: ...

    def seal(self, mtime_ns: int, durable: bool) -> None:
        """The content and its mtime written, and durable if ``durable``; the file stays a temp."""
        ...

    def abort(self) -> None:
        """Close and remove the temporary file (quietly: it may be gone)."""
        ...


class Target(ABC):
    """The place a replica lives. See the module docstring for the rules every implementation keeps."""

    caps: Capabilities

    @property
    @abstractmethod
    def label(self) -> str:
        """How logs and status name it (a path, or ``smb://server:port/share/path``; never a credential)."""

    # -- reading ---------------------------------------------------------------------------------------------
    @abstractmethod
    def stat(self, rel: str) -> Stat | None:
        """The entry at ``rel`` (not followed if a link), or None if nothing is there."""

    @abstractmethod
    def read_chunks(self, rel: str) -> Iterator[bytes]:
        """The content of the file at ``rel``, chunk by chunk."""

    @abstractmethod
    def manifest(
        self,
        include: Sequence[str],
        cache: HashCache,
        out: Manifest,
        flag_edits: bool = False,
        need_digest: Callable[[str], bool] | None = None,
        full: bool = False,
    ) -> Iterator[FileMeta]:
        """The replica's entries under ``include``, as :func:`engine.scan.iter_manifest` gives them."""

    # -- writing -------------------------------------------------------------------------------------------
    @abstractmethod
    def write_temp(self, temp: str, data: bytes, mtime_ns: int, durable: bool) -> None:
        """Create ``temp`` (a new name: never an existing file) holding ``data`` with ``mtime_ns``; durable
        if ``durable``. On any failure the temp is removed and the error raised."""

    @abstractmethod
    def begin_put(self, temp: str) -> Put:
        """Create ``temp`` (a new name) for content written chunk by chunk."""

    @abstractmethod
    def place(self, temp: str, rel: str) -> Stat | None:
        """Rename the durable ``temp`` over ``rel`` (atomically replacing a file there). Returns the
        entry's stat where the same round trip tells it (None: ask :meth:`stat`)."""

    @abstractmethod
    def rename(self, src: str, dst: str) -> None:
        """Rename ``src`` to ``dst``, replacing a file at ``dst``."""

    @abstractmethod
    def remove(self, rel: str) -> None:
        """Remove the file, link or whole folder tree at ``rel`` (never following a link)."""

    @abstractmethod
    def unlink_quiet(self, rel: str) -> None:
        """Remove the file at ``rel`` if it is there."""

    @abstractmethod
    def mkdir(self, rel: str) -> None:
        """Create the folder ``rel`` (its parent exists)."""

    @abstractmethod
    def makedirs(self, rel: str) -> None:
        """Create the folder ``rel`` and its missing parents."""

    @abstractmethod
    def set_mtime(self, rel: str, mtime_ns: int, durable: bool) -> None:
        """Set the mtime of the file at ``rel`` (its access time kept where the target keeps one)."""

    @abstractmethod
    def same_file(self, a: str, b: str) -> bool:
        """True if ``a`` and ``b`` are one entry (a case-only rename on a case-insensitive target)."""

    # -- durability ----------------------------------------------------------------------------------------
    def sync_group(self) -> None:
        """Make every write since the last call durable (only where ``caps.group_sync``)."""
        raise NotImplementedError

    @abstractmethod
    def sync_folders(self, rels: Iterable[str]) -> None:
        """Make the entries of these folders (creations, renames, removals) durable."""

    @abstractmethod
    def clean_temps(self) -> int:
        """Remove temporary files a crash left anywhere below the root; how many."""

    def close(self) -> None:  # noqa: B027 - most targets hold nothing to let go of
        """Let go of connections and threads."""


def link_on_way(target: Target, rel: str, checked: dict[str, bool] | None = None) -> str | None:
    """The first folder on the way to ``rel`` that is a symlink or reparse point (its relative path), or
    None: writing to ``rel`` stays inside the target (folders not there yet are made as real folders).

    ``checked`` (one batch's memo): folder prefixes already found to be real folders (True) or absent
    (False: nothing below them exists yet). On a share each look is a round trip: a first copy into new
    folders would otherwise look once per file."""
    prefix = ""
    for name in rel.split("/")[:-1]:
        prefix = child_of(prefix, name)
        known = checked.get(prefix) if checked is not None else None
        if known is True:
            continue
        if known is False:
            return None
        st = target.stat(prefix)
        if st is None:
            if checked is not None:
                checked[prefix] = False
            return None
        if st.kind is Kind.LINK:
            return prefix
        if checked is not None and st.kind is Kind.DIR:
            checked[prefix] = True
    return None


def receiver_target(cfg: ReceiverConfig, skip: Path | None = None) -> Target:
    """The target a receiver config names: its SMB share, or its local folder (``skip``: a state folder
    inside it, left out of manifests)."""
    if cfg.share is not None:
        from engine.targets.smb import SmbTarget

        return SmbTarget.from_config(cfg)
    from engine.targets.local import LocalTarget

    return LocalTarget(cfg.target, sync_mode=cfg.sync_mode if cfg.fsync else "fsync", skip=skip)
