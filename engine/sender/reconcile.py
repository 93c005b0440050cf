"""Reconciler: compares the source with the receiver's manifest and turns the difference into entries.

On start (each connect), after a watcher overflow or failure, when a rename finds no source, and every
``reconcile_interval``: the replica as the sender expects it (the receiver's manifest as of entry *n*, with
the journal's entries after *n* laid over it) is compared with a scan of the source, and the plan
(:func:`engine.plan.diff`) is handed to the intake as ordinary pending operations.

Must not: write the journal (the intake does), or touch paths the intake is busy with (it says which).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.config import SenderConfig
from engine.errors import PathRejected, SafetyHalt
from engine.guards import GUARD_MAX_BYTES, GuardCheck
from engine.journal import Journal
from engine.model import NO_FLAGS, Change, FileMeta, RelpathChecker
from engine.plan import diff, expected_after, mass_delete, same, same_file
from engine.scan import HashCache, Manifest, StableRead, iter_known, read_digest, read_stable, wire_mtime
from engine.sender.intake import Intake, pack_version, unpack_version
from engine.sender.link import Link

log = logging.getLogger(__name__)

#: A manifest that takes longer than this to arrive is given up on (retried at the next occasion).
MANIFEST_TIMEOUT = 3600.0
#: Reconciliations that stand in for lost watcher events. A path the intake was busy with is left out of
#: one (its change is on the way), but the events that would tell of a later change to it may be among the
#: lost ones: such a reconciliation is done again a moment later (a few times at most).
LOSSY = ("overflow", "watch-restart", "watch-failed")
FOLLOW_UP_DELAY = 1.0
FOLLOW_UPS = 3


#: How the scan holds a folder. A file is held as its pack_version (digest empty: the hash cache did not
#: know it), never empty: about 65 bytes instead of an entry's 190, so at 100,000 files the scan beside
#: the decoded manifest costs 12 MB less at the sender's peak.
_FOLDER = b""


@dataclass(frozen=True, slots=True)
class _Scan:
    """A scan of the source, made while the manifest was on its way (see Reconciler._merge)."""

    head: int  # the journal's head when the scan began
    source: dict[str, bytes]  # path -> _FOLDER, or a file's packed size and mtime and its digest
    unstable: list[str]
    unreadable: list[str]

    def meta(self, path: str) -> FileMeta:
        """The entry of ``path`` (an empty digest: the hash cache did not know it)."""
        v = self.source[path]
        if not v:
            return FileMeta(path, is_dir=True)
        return FileMeta(path, False, *unpack_version(v))


@dataclass(frozen=True, slots=True)
class _Merged:
    """The scan laid beside the manifest (see Reconciler._merge)."""

    expected: dict[str, FileMeta]  # the replica as the sender expects it
    source: dict[str, FileMeta]
    unstable: list[str]
    unreadable: list[str]
    late: list[str]  # paths journaled while the scan ran: nothing at or below them is removed
    pruned: bool  # the entries of the scan's time were pruned: late is the whole include set


class _Abandoned(Exception):
    """A scan told to stop: its manifest never came."""


def _retrieved(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    reason: str
    at: float  # wall time
    seconds: float
    puts: int
    held: tuple[str, ...]
    removals: int
    mkdirs: int
    local_edits: int
    source_entries: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "at": self.at,
            "seconds": self.seconds,
            "puts": self.puts,
            "held": list(self.held),
            "removals": self.removals,
            "mkdirs": self.mkdirs,
            "local_edits": self.local_edits,
            "source_entries": self.source_entries,
        }


class Reconciler:
    def __init__(
        self,
        cfg: SenderConfig,
        journal: Journal,
        cache: HashCache,
        intake: Intake,
        link: Link,
        counters: dict[str, int],
        *,
        allow_mass_delete: bool = False,
        check: GuardCheck | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.journal = journal
        self.cache = cache
        self.intake = intake
        self.link = link
        self.counters = counters
        self.allow_mass_delete = allow_mass_delete
        self.check = check
        self.clock = clock
        self.last: ReconcileReport | None = None
        self._req = asyncio.Event()
        self._reason = "start"
        self._follow_ups = 0
        #: The scan of the step in progress, or of one whose manifest never came (see step).
        self._scanning: asyncio.Future[_Scan] | None = None

    def request(self, reason: str) -> None:
        self._reason = reason
        self._req.set()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.cfg.reconcile_interval or None):
                    await self._req.wait()
            reason = self._reason if self._req.is_set() else "schedule"
            self._req.clear()
            await self.link.wait_connected()
            try:
                await self.step(reason)
            except (ConnectionError, TimeoutError) as e:
                log.info("reconcile.interrupted reason=%s error=%s (retried on reconnect)", reason, e)

    async def step(self, reason: str) -> ReconcileReport:
        """One reconciliation, now. Raises SafetyHalt if it would delete most of the replica."""
        t0 = self.clock()
        if self._scanning is not None:
            # A scan whose manifest never came (the link went down) is told to stop; it ends first, so
            # that scans never pile up on the worker threads the intake needs.
            await asyncio.wait({self._scanning})
        mark = self.intake.mark()
        # The source is scanned while the receiver walks the replica and its manifest arrives (one after
        # the other, a restart at 100,000 files spent a second longer).
        stop = threading.Event()
        scanning = self._scanning = asyncio.ensure_future(asyncio.to_thread(self._scan, stop))
        try:
            async with asyncio.timeout(MANIFEST_TIMEOUT):
                seq, replica = await self.link.manifest(self.cfg.include)
        except BaseException:
            stop.set()
            scanning.add_done_callback(_retrieved)  # its result is not wanted
            raise
        scan = await scanning
        self._scanning = None
        del scanning
        merged = await asyncio.to_thread(self._merge, seq, replica, scan)
        del scan  # the source's entries the replica has too are the replica's objects now
        expected, source, unstable, late = merged.expected, merged.source, merged.unstable, merged.late
        pruned = merged.pruned
        edits = sorted(m.path for m in replica if "local-edit" in m.flags)
        del replica
        exclude = self.intake.busy_since(mark) | set(unstable)
        plan = diff(source, expected, self.cfg.include, exclude, merged.unreadable + late)
        del merged
        # RACE: a busy path that differs was left out, and so were removals below a path journaled while
        # the scan ran; if events were lost, look at them again shortly. A scan whose journal entries were
        # pruned meanwhile removed nothing at all: look again shortly, whatever the reason.
        skipped = bool(late) or any(
            p in exclude and not (p in expected and same(m, expected[p])) for p, m in source.items()
        )
        base = reason.split("+")[0]
        if ((base in LOSSY and skipped) or pruned) and self._follow_ups < FOLLOW_UPS:
            self._follow_ups += 1
            asyncio.get_running_loop().call_later(FOLLOW_UP_DELAY, self.request, f"{base}+again")
        elif not reason.endswith("+again"):
            self._follow_ups = 0
        why = mass_delete(plan, self.cfg.max_delete_share)
        if why and not self.allow_mass_delete:
            raise SafetyHalt(
                f"{why}; nothing was deleted. If this is intended, restart with --allow-mass-delete"
            )
        # A guarded file that differs because its source version is torn is *held*, not a difference to
        # repair: it is reported as such and left to its next change.
        held = await asyncio.to_thread(self._held, plan.puts) if self.check is not None else {}
        for path, held_why in held.items():
            log.warning(
                "reconcile.held path=%r reason=%s (torn on the source; the replica keeps its version)",
                path,
                held_why,
            )
        self.intake.queue_plan(
            plan.removals,
            plan.mkdirs,
            [p for p in plan.puts if p not in held],
            unstable,
            mark,
            plan.replica_files,
        )
        self.counters["reconciles"] += 1
        seconds = self.clock() - t0
        self.last = ReconcileReport(
            reason,
            time.time(),
            round(seconds, 3),
            len(plan.puts) - len(held),
            tuple(sorted(held)),
            len(plan.removals),
            len(plan.mkdirs),
            len(edits),
            len(source),
        )
        log.info(
            "reconcile.done reason=%s %s held=%d local_edits=%d seconds=%.3f",
            reason,
            plan.summary(),
            len(held),
            len(edits),
            seconds,
        )
        try:
            await asyncio.to_thread(self.cache.save, self.cfg.state_dir / "hashcache")
        except OSError as e:
            log.warning("hashcache.save_failed error=%s (costs only re-hashing after a restart)", e)
        return self.last

    def _held(self, paths: list[str]) -> dict[str, str]:
        """Worker thread: the guarded files among ``paths`` whose source version fails its rule."""
        out: dict[str, str] = {}
        check = self.check
        assert check is not None
        for path in paths:
            if not check.guarded(path):
                continue
            r = read_stable(self.cfg.source / path, inline_max=GUARD_MAX_BYTES)
            if isinstance(r, StableRead) and r.data is not None and (why := check(path, r.data)):
                out[path] = why
        return out

    def _scan(self, stop: threading.Event | None = None) -> _Scan:
        """Worker thread: every folder and file of the source, and the journal's head when the scan began.
        A file the hash cache does not know is not read here (its digest is left empty): only the manifest
        can say whether the replica has it, and one it does not have is sent whatever its digest."""
        head = self.journal.head
        m = Manifest({}, [], [])
        source: dict[str, bytes] = {}
        check_relpath = RelpathChecker()
        for n, (path, st, digest) in enumerate(iter_known(self.cfg.source, self.cfg.include, self.cache, m)):
            if stop is not None and n % 1024 == 0 and stop.is_set():
                raise _Abandoned
            try:
                check_relpath(path)
            except PathRejected as e:
                log.warning("send.skipped path=%r reason=%s", path, e.reason)
                continue
            if st is None:
                source[path] = _FOLDER
            else:
                source[path] = pack_version(st.st_size, wire_mtime(path, st.st_mtime_ns), digest or b"")
        return _Scan(head, source, m.unstable, m.unreadable)

    def _merge(self, seq: int, replica: list[FileMeta], scan: _Scan) -> _Merged:
        """Worker thread: the expected replica (the manifest as of ``seq`` and the journal after it), the
        source (files of the replica the cache did not know are hashed now), the paths that could not be
        read, and *late*: the paths of entries journaled while the scan ran.

        RACE: the scan ran beside the manifest, before the journal tail is read. A change journaled after
        the scan began may be in the expected replica and not in the scan (a folder renamed after the scan
        listed it: its contents are under the old name in the scan, the new one in the journal). Nothing at
        or below a late path is removed (it goes with ``exclude_under``); the path itself is busy (the
        intake touched it), so it is not sent either. Anything else that changed during the scan either is
        seen by it or shows as a harmless re-send, never as a wrong deletion."""
        j = self.journal
        first = max(min(seq, scan.head) + 1, j.first_seq)
        entries: list[Change] = list(j.headers(first)) if first <= j.head else []
        tail = [c for c in entries if c.seq > seq]
        pruned = scan.head + 1 < j.first_seq
        if pruned:
            # Entries of the scan's time were pruned already (a checkpoint in between): which they were is
            # not known, so nothing is removed this time (step asks for a follow-up, which removes it).
            late = list(self.cfg.include)
        else:
            late = sorted({p for c in entries if c.seq > scan.head for p in (c.path, c.dst) if p})
        expected = expected_after({m.path: m for m in replica}, tail, copy=False)
        source: dict[str, FileMeta] = {}
        out = Manifest({}, scan.unstable, scan.unreadable)
        for path, v in scan.source.items():
            have = expected.get(path)
            if not v:  # a folder
                source[path] = have if have is not None and have.is_dir else FileMeta(path, is_dir=True)
                continue
            size, mtime_ns, digest = unpack_version(v)
            flags = NO_FLAGS
            if have is not None and not have.is_dir and not digest:
                read = read_digest(self.cfg.source, path, self.cache, out)
                if read is None:
                    continue  # gone, or moving (then in out.unstable)
                digest, flags = read
            # An entry the replica already has is kept as the replica's object: a large tree is not held
            # twice while the two are compared (diff asks only same() of it). A file the replica does not
            # have is sent whatever its digest.
            if have is not None and same_file(have, size, mtime_ns, digest):
                source[path] = have
            else:
                source[path] = FileMeta(path, False, size, mtime_ns, digest, flags)
        return _Merged(expected, source, out.unstable, out.unreadable, late, pruned)
