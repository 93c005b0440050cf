"""The node's durable role: what ``failover.PersistRole`` writes and what ``failover.Started`` is read from.

Owns ``<state_dir>/role``: the durable role (passive, active or fenced; none before the first start), the
node's own epoch, the highest epoch it has seen, the boot counter and the time and reason of the last role
change. Must not: decide anything (``failover`` does), or be written by two processes (the agent holds the
state folder's lock, ``engine.statelock``).

Rules:

1. ``persist`` and ``see_epoch`` return only once the value is durable (written and fsynced): the
   INVARIANT of ``PersistRole`` is that nothing after it runs before it is on disk.
2. The epoch never goes back (failover rule 6): persisting an epoch below the highest seen is refused with
   :class:`RoleStateError`. That is a bug in the caller, never a state to write down.
3. A file that cannot be read is an error naming the file and what to do. It is never taken for "no
   role yet": a node that was active would start as if new, with ``initial_role``.
4. No file at all is a first start. The file is created whole (written aside, fsynced, renamed into
   place, folder fsynced), so a crash while creating it leaves none or a whole one.

Format: two slots of :data:`SLOT` bytes, each one codec frame (length, xxh32 checksum, msgpack map) padded
with zeros; the slot with the higher ``gen`` (a write counter) is the value. A write goes first into one
slot (one that may not hold the current value, if there is one) and, once that copy is durable, into the
other too. So a write torn by a power cut (half a sector on disk) fails its checksum and the other slot is
whole: the previous value when the first copy is torn (that write never returned), the new one when the
second is. And damage to one slot at rest (a bad sector, a stray write) loses nothing. Never a mix of two
values, never older than the last write that returned. This is ``apply.PositionFile``'s shape, plus the
second copy: a position that goes back one write is applied again, but a role that goes back one write may
be active where it was fenced.

Two slots in place rather than write-temp + ``os.replace`` for every write, because:

- the write happens in a file this process holds open, so it does not depend on anyone else. On Windows
  ``os.replace`` onto a file another process has open without delete sharing (an antivirus scan, a backup
  agent, an editor) fails with PermissionError, and PersistRole sits right before StartService and
  StopService: a failover must not fail there;
- no change to the folder's entries after creation, so no folder fsync per write (which Windows cannot do
  anyway; NTFS journals its metadata) and nothing that depends on doing one right on every platform;
- a torn or damaged copy is detected and the other read, where a replaced file that is damaged at rest
  has nothing to fall back to.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from engine import codec
from engine.errors import ReplicationError
from engine.failover import DURABLE_ROLES, Role, Started
from engine.journal import fsync_dir

log = logging.getLogger(__name__)

ROLE_FILE = "role"
#: Bytes per slot; the file is two of them.
SLOT = 1024
FORMAT = "standby-role"
VERSION = 1
#: The reason is cut to this many bytes of UTF-8, so a record always fits its slot.
REASON_BYTES = 512

_ROLES = {r.value: r for r in DURABLE_ROLES}


class RoleStateError(ReplicationError):
    """The durable role cannot be read or written, or a caller asked for what rule 6 forbids (an epoch going
    back, a role that is not durable; a bug in the caller)."""


@dataclass(frozen=True, slots=True)
class Record:
    """One slot's value. ``gen`` counts writes; ``seen >= epoch`` always."""

    gen: int
    role: Role | None
    epoch: int
    seen: int
    boot: int
    changed_at: float | None
    reason: str

    def encode(self) -> bytes:
        blob = codec.encode(
            {
                "fmt": FORMAT,
                "v": VERSION,
                "gen": self.gen,
                "role": None if self.role is None else self.role.value,
                "epoch": self.epoch,
                "seen": self.seen,
                "boot": self.boot,
                "changed": self.changed_at,
                "reason": self.reason,
            }
        )
        if len(blob) > SLOT:  # cannot happen: the reason is cut to REASON_BYTES
            raise RoleStateError(f"role record of {len(blob)} bytes does not fit a slot of {SLOT}")
        return blob.ljust(SLOT, b"\0")


def decode_slot(buf: bytes) -> Record | str:
    """The record in one slot's bytes, or why they hold none."""
    if not buf.strip(b"\0"):
        return "empty" if buf else "missing (the file is short)"
    r = codec.decode_at(buf, 0, max_frame=SLOT)
    if isinstance(r, codec.Torn):
        return r.reason
    v = r[0]
    if not isinstance(v, dict) or v.get("fmt") != FORMAT:
        return "not a role record"
    if v.get("v") != VERSION:
        raise RoleStateError(
            f"role record format {v.get('v')!r}, this standby reads {VERSION}: written by another version "
            "of standby; run that version"
        )
    gen, epoch, seen, boot = (_count(v.get(k)) for k in ("gen", "epoch", "seen", "boot"))
    if gen is None or epoch is None or seen is None or boot is None:
        return "bad counters"
    role, changed, reason = v.get("role"), v.get("changed"), v.get("reason")
    if role is not None and role not in _ROLES:
        return f"unknown role {role!r}"
    if seen < epoch:
        return f"seen epoch {seen} below epoch {epoch}"
    if not (changed is None or isinstance(changed, float | int)) or not isinstance(reason, str):
        return "bad change time or reason"
    at = None if changed is None else float(changed)
    return Record(gen, None if role is None else _ROLES[role], epoch, seen, boot, at, reason)


class RoleState:
    """The durable role of the node whose state folder is ``path.parent``. Open with :meth:`open`."""

    def __init__(self, path: Path, f: BinaryIO, record: Record, stale: int | None = None) -> None:
        self.path = path
        self._f = f
        self._rec = record
        #: The slot that may not hold the current record (damaged, older, or a write to it failed): the
        #: next write goes there first. None: both hold it.
        self._stale = stale

    # ---- opening ------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, state_dir: Path) -> RoleState:
        """The role file in ``state_dir``, created (role None: no durable role yet) on the first start.

        Raises RoleStateError when the file exists and neither slot holds a whole record."""
        path = state_dir / ROLE_FILE
        if not path.exists():
            _create(path)
        try:
            f = open(path, "r+b")  # noqa: SIM115 (held for the object's life)
        except OSError as e:
            raise RoleStateError(f"{path}: cannot open the durable role: {e.strerror or e}") from None
        try:
            data = f.read(2 * SLOT)
            slots = [decode_slot(data[i * SLOT : (i + 1) * SLOT]) for i in range(2)]
        except BaseException:
            f.close()
            raise
        good = [s for s in slots if isinstance(s, Record)]
        if not good:
            f.close()
            raise RoleStateError(
                f"{path}: the durable role is damaged (slot 0: {slots[0]}; slot 1: {slots[1]}). It decides "
                "whether this node may run the service, so standby will not guess. Restore the file from a "
                "backup; or, once you know which server should run the service, move the file aside and "
                "start this node with [node] initial_role set to what it should be (passive if the other "
                "server is active)"
            )
        rec = max(good, key=lambda r: r.gen)
        stale = None
        for i, s in enumerate(slots):
            if isinstance(s, str):
                log.warning("rolestate.slot_damaged path=%s slot=%d why=%r (the other is used)", path, i, s)
            if s != rec:
                stale = i
        return cls(path, f, rec, stale)

    # ---- reading ------------------------------------------------------------------------------------------

    @property
    def role(self) -> Role | None:
        """The durable role: passive, active or fenced; None before the first ``persist``."""
        return self._rec.role

    @property
    def epoch(self) -> int:
        return self._rec.epoch

    @property
    def seen_epoch(self) -> int:
        """The highest epoch this node has seen anywhere (its own included): ``>= epoch``."""
        return self._rec.seen

    @property
    def boot(self) -> int:
        """This start's number (after :meth:`begin_boot`); 0 before the first."""
        return self._rec.boot

    @property
    def changed_at(self) -> float | None:
        """When the role last changed (seconds since the epoch), None before the first ``persist``."""
        return self._rec.changed_at

    @property
    def reason(self) -> str:
        """Why the role last changed."""
        return self._rec.reason

    def status(self) -> dict[str, Any]:
        return {
            "role": None if self.role is None else self.role.value,
            "epoch": self.epoch,
            "seen_epoch": self.seen_epoch,
            "boot": self.boot,
            "role_changed_at": self.changed_at,
            "role_reason": self.reason,
        }

    # ---- writing ------------------------------------------------------------------------------------------

    def begin_boot(self) -> int:
        """Count this start and make it durable; the number is ``Started.boot``, distinct for every start."""
        self._write(boot=self._rec.boot + 1)
        return self._rec.boot

    def persist(self, role: Role, epoch: int, reason: str) -> None:
        """``PersistRole(role, epoch)``: durable when this returns. The time and ``reason`` are kept when the
        role changes. Raises RoleStateError for an epoch below the highest seen or a role that is not
        durable (bugs in the caller)."""
        if role not in DURABLE_ROLES:
            raise RoleStateError(f"persist: {role.value} is not a durable role (passive, active, fenced)")
        _check_epoch(epoch)
        if epoch < self._rec.seen:
            raise RoleStateError(
                f"{self.path}: persist {role.value} at epoch {epoch} refused: this node has seen epoch "
                f"{self._rec.seen}, and the epoch never goes back (failover rule 6)"
            )
        if role is self._rec.role and epoch == self._rec.epoch:
            return  # already durable
        if role is self._rec.role:
            self._write(epoch=epoch, seen=epoch)
        else:
            self._write(role=role, epoch=epoch, seen=epoch, changed_at=time.time(), reason=_cut(reason))
        log.info("rolestate.persisted role=%s epoch=%d reason=%r", role.value, epoch, reason)

    def see_epoch(self, epoch: int) -> None:
        """Record that ``epoch`` was seen (rule 6: every node persists the highest epoch it has seen);
        durable when this returns. A lower or equal one changes nothing."""
        _check_epoch(epoch)
        if epoch > self._rec.seen:
            self._write(seen=epoch)

    def started(self, initial_role: Role = Role.PASSIVE) -> Started:
        """The start-up facts for ``failover.start``, after :meth:`begin_boot`.

        A node that has seen an epoch above its own (a crash between hearing it and the role machine
        persisting it) first persists what the machine would have: a passive or fenced node its role at
        that epoch (rule 6), an active one fenced at that epoch (rule 4). So a forced promotion later still
        picks an epoch above everything seen, which ``Started`` alone, holding one epoch, could not carry."""
        if self._rec.boot == 0:
            raise RoleStateError("started: call begin_boot first (the boot number is part of the facts)")
        role, seen = self._rec.role, self._rec.seen
        if role is not None and seen > self._rec.epoch:
            durable = Role.FENCED if role is Role.ACTIVE else role
            why = f"start-up: epoch {seen} was seen while {role.value} at epoch {self._rec.epoch}"
            self.persist(durable, seen, why)
        # seen == epoch now, but before the first persist (role None) a seen epoch is all there is.
        return Started(self._rec.boot, self._rec.role, self._rec.seen, initial_role)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> RoleState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, **change: Any) -> None:
        """Write the next record into one slot, fsync, then into the other, fsync.

        INVARIANT: a slot is written only while the other holds a durable copy of the current record or of
        the new one: the first copy goes into the stale slot if there is one. The record in memory becomes
        the new one once its first copy is durable.
        """
        rec = replace(self._rec, gen=self._rec.gen + 1, **change)
        blob = rec.encode()
        first = rec.gen % 2 if self._stale is None else self._stale
        for i, slot in enumerate((first, 1 - first)):
            try:
                self._f.seek(slot * SLOT)
                self._f.write(blob)
                self._f.flush()
                os.fsync(self._f.fileno())
            except OSError as e:
                self._stale = slot
                done = " (the new value is durable in one copy)" if i else ""
                raise RoleStateError(
                    f"{self.path}: cannot write the durable role{done}: {e.strerror or e}"
                ) from e
            self._rec = rec
        self._stale = None


def _create(path: Path) -> None:
    """Create the file whole: both slots hold the first record (no role, epochs 0, boot 0)."""
    folder = path.parent
    new_folder = not folder.exists()
    tmp = path.with_name(ROLE_FILE + ".tmp")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if new_folder:
            fsync_dir(folder.parent)
        first = Record(0, None, 0, 0, 0, None, "")
        with open(tmp, "wb") as f:
            f.write(first.encode() * 2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(folder)
    except OSError as e:
        raise RoleStateError(f"{path}: cannot create the durable role: {e.strerror or e}") from e
    log.info("rolestate.created path=%s", path)


def _count(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) and x >= 0 else None


def _check_epoch(epoch: int) -> None:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise RoleStateError(f"epoch must be a whole number >= 0, got {epoch!r}")


def _cut(reason: str) -> str:
    return reason.encode("utf-8")[:REASON_BYTES].decode("utf-8", "ignore")
