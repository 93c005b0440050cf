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
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.config import SenderConfig
from engine.errors import PathRejected, SafetyHalt
from engine.guards import GUARD_MAX_BYTES, GuardCheck
from engine.journal import Journal
from engine.model import Change, FileMeta, check_relpath
from engine.plan import diff, expected_after, mass_delete, same
from engine.scan import HashCache, Manifest, StableRead, iter_manifest, read_stable
from engine.sender.intake import Intake
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
        mark = self.intake.mark()
        async with asyncio.timeout(MANIFEST_TIMEOUT):
            seq, replica = await self.link.manifest(self.cfg.include)
        expected, source, unstable, unreadable = await asyncio.to_thread(self._read, seq, replica)
        exclude = self.intake.busy_since(mark) | set(unstable)
        plan = diff(source, expected, self.cfg.include, exclude, unreadable)
        # RACE: a busy path that differs was left out; if events were lost, look at it again shortly.
        skipped = any(
            p in exclude and not (p in expected and same(m, expected[p])) for p, m in source.items()
        )
        if reason.split("+")[0] in LOSSY and skipped and self._follow_ups < FOLLOW_UPS:
            self._follow_ups += 1
            base = reason.split("+")[0]
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
        edits = sorted(m.path for m in replica if "local-edit" in m.flags)
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

    def _read(
        self, seq: int, replica: list[FileMeta]
    ) -> tuple[dict[str, FileMeta], dict[str, FileMeta], list[str], list[str]]:
        """Worker thread: the expected replica (manifest + journal after ``seq``), then the source scan.
        RACE: the journal tail is read before the source is scanned, so a change journaled meanwhile is
        either in both or shows as a harmless re-send, never as a wrong deletion."""
        j = self.journal
        tail: list[Change] = list(j.headers(max(seq + 1, j.first_seq))) if seq < j.head else []
        expected = expected_after({m.path: m for m in replica}, tail)
        # A file the replica does not have is sent whatever its digest: do not read it twice.
        m = Manifest({}, [], [])
        source: dict[str, FileMeta] = {}
        for meta in iter_manifest(
            self.cfg.source, self.cfg.include, self.cache, m, need_digest=expected.__contains__
        ):
            path = meta.path
            try:
                check_relpath(path)
            except PathRejected as e:
                log.warning("send.skipped path=%r reason=%s", path, e.reason)
                continue
            # An entry the replica already has is kept as the replica's object: a large tree is not held
            # twice while the two are compared (diff asks only same() of it).
            have = expected.get(path)
            source[path] = have if have is not None and same(meta, have) else meta
        return expected, source, m.unstable, m.unreadable
