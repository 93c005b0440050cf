"""Intake: watcher hints -> readiness -> stable reads -> journal. The one owner of per-path state.

Owns the tracker (when a path is ready), the queue of pending operations, what was last journaled for each
path (``shipped``), the writers seen holding files open, the live-deletion gate (bursts judged whole before
any deletion is journaled) and the journal's write side. Other components reach it through methods: the
reconciler asks what is busy and queues what a plan says; the link reports the replica's problems.

Must not: touch sockets or know about the peer beyond the acknowledged position it is given (for pruning).

INVARIANT: the journal is written only here, one group at a time, in the order the changes were observed.
INVARIANT: no deletion is journaled before the burst it belongs to was judged whole (:meth:`Intake._gate`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import os
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from engine import checkpoint
from engine.aio import run_critical
from engine.config import SenderConfig
from engine.errors import JournalFull, PathRejected
from engine.guards import GUARD_MAX_BYTES, GuardCheck
from engine.journal import Journal
from engine.model import Change, Op, RelpathChecker, is_temp_name, is_under, to_posix_rel
from engine.plan import (
    DELETE_QUIET,
    DELETE_WINDOW,
    DeletionFacts,
    deletion_release_at,
    deletion_verdict,
    small_burst,
)
from engine.scan import (
    SMALL_FILE,
    HashCache,
    StableRead,
    Unstable,
    iter_file_chunks,
    open_for_writing,
    read_stable,
)
from engine.tracker import Tracker
from engine.watch import Hint, Watcher

log = logging.getLogger(__name__)

#: How often the source root's identity is checked (moved away, deleted, moved back).
ROOT_CHECK = 1.0
#: While halted, how often held deletions are judged again (the files may have come back).
HALT_RECHECK = 1.0
#: How often acknowledged segments past their retention are pruned.
PRUNE_INTERVAL = 60.0


class How(enum.Enum):
    """Why an operation is pending, which decides how it is journaled."""

    HINT = "hint"  # the watcher reported it (a put vouched for by its close event)
    CHECK = "check"  # no close event: read only if no process holds the file open for writing
    FORCE = "force"  # a reconciliation or an overflow: unvouched, and shipped even if it looks unchanged
    MAX_OPEN = "max_open"  # held open for writing past max_open: shipped from a stable read anyway
    UNKNOWN = "unknown"  # the deletion of a file the replica never had (not judged as a burst)
    RECONCILED = "reconciled"  # a deletion the reconciliation's mass-delete rule judged already


@dataclass(frozen=True, slots=True)
class Pending:
    """One operation waiting to be journaled."""

    op: Op
    path: str
    dst: str = ""
    how: How = How.HINT

    @property
    def live_deletion(self) -> bool:
        """A deletion the watcher saw: judged as part of a burst before it is journaled."""
        return self.op in (Op.DELETE, Op.RMDIR) and self.how is How.HINT


@dataclass(slots=True)
class _BatchResult:
    appended: int = 0
    retry: list[str] = field(default_factory=list)
    held: list[tuple[str, str]] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)
    writing: list[str] = field(default_factory=list)
    superseded: int = 0
    done: list[str] = field(default_factory=list)
    unchanged: int = 0
    files_deleted: int = 0
    files_created: int = 0
    #: The journal's disk was full: nothing of this batch can be trusted to be journaled; it is retried.
    journal_full: str | None = None


@dataclass(frozen=True, slots=True)
class IntakeStatus:
    pending_paths: int
    halt: str | None
    watch_error: str | None
    journal_error: str | None


class Intake:
    """Turns what the watcher says into journal entries. ``run`` is its loop; ``step`` one pass of it."""

    def __init__(
        self,
        cfg: SenderConfig,
        journal: Journal,
        jlock: threading.Lock,
        cache: HashCache,
        counters: dict[str, int],
        *,
        acked: Callable[[], int],
        on_appended: Callable[[], None],
        on_reconcile: Callable[[str], None],
        allow_mass_delete: bool = False,
        check: GuardCheck | None = None,
        close_events: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.journal = journal
        self.jlock = jlock
        self.cache = cache
        self.counters = counters
        #: Every path journaled passes check_relpath; this one checks a path by its name once its folder has.
        self._check_path = RelpathChecker()
        self._acked = acked
        self._on_appended = on_appended
        self.request_reconcile = on_reconcile
        self.allow_mass_delete = allow_mass_delete
        self.check = check
        self.clock = clock
        self.tracker = Tracker(cfg.settle, cfg.max_open, close_events)
        self.ops: deque[Pending] = deque()
        # What was last journaled for each path (size, mtime, digest): a re-read that finds the same is not
        # sent again. Owned by the pipeline's worker thread.
        self.shipped: dict[str, bytes] = {}  # path -> pack_version(size, mtime, digest)
        self._retries: dict[str, int] = {}
        self._writer_since: dict[str, float] = {}  # first seen open for writing (no close event since)
        self._prefix = str(cfg.source).rstrip(os.sep) + os.sep
        #: Files on the replica as the sender knows it: from the last reconciliation, plus files created
        #: minus files deleted since (before the first one: the hash cache's size). None: not known yet.
        self._replica_files: int | None = None
        # Live deletions (see _gate): the burst not yet judged, how many ops at the front of ``ops`` were
        # judged and approved, the halt that holds them, and the replica's size lately (for the share).
        self._del_first: float | None = None
        self._del_times: deque[float] = deque()  # of the burst's deletions within the last DELETE_QUIET
        self._del_count = 0
        self._approved = 0
        self.halt: str | None = None
        self._halt_checked = 0.0
        self._counts: deque[tuple[float, int]] = deque()  # (when, replica files then): the window's peak
        self.watch_error: str | None = None
        self.journal_error: str | None = None
        self._full_backoff = 1.0
        self._watch_retry = 1.0
        self._last_prune = clock()
        self._ck_task: asyncio.Future[None] | None = None
        self._ck_floor = 0  # the journal may be pruned up to here (checkpoint.prune_floor)
        self._ck_newest = 0  # the newest checkpoint's seq (0: none)
        self._ck_clock = checkpoint.Cadence()
        self.stopping = False
        self._watcher: Watcher | None = None
        self._wake = asyncio.Event()
        self._bg: set[asyncio.Future[Any]] = set()

    # -- lifecycle ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start watching (a watcher that cannot start is retried; reconciliation covers meanwhile)."""
        loop = asyncio.get_running_loop()
        self._watcher = Watcher(loop, self.cfg.source, self.cfg.include, self.on_hint)
        try:
            await asyncio.to_thread(self._watcher.start)
        except OSError as e:  # e.g. the inotify watch limit: run on reconciliation and keep retrying
            self._watch_failed(e)
        missing = await asyncio.to_thread(self._missing_includes)
        if len(missing) == len(self.cfg.include):
            log.warning(
                "send.include_matches_nothing source=%s include=%s (nothing to replicate yet; check the "
                "include list; items are picked up when they appear)",
                self.cfg.source,
                ",".join(self.cfg.include),
            )
        elif missing:
            log.warning("send.include_missing items=%s (picked up when they appear)", ",".join(missing))

    async def run(self) -> None:
        """The pipeline and the source root's monitor, until cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._pipeline(), name="intake")
            tg.create_task(self._source_monitor(), name="source-monitor")

    async def stop_watching(self) -> None:
        """Intake stops: no hint is taken any more (what is queued is journaled no further)."""
        self.stopping = True
        if self._watcher is not None:
            await asyncio.to_thread(self._watcher.stop)

    async def close(self) -> None:
        self.stopping = True
        for fut in list(self._bg):  # a walk or a watcher restart still running in a worker thread
            fut.cancel()
        if self._bg:
            await asyncio.wait(self._bg, timeout=10)
        if self._watcher is not None:
            await asyncio.to_thread(self._watcher.stop)

    def status(self) -> IntakeStatus:
        return IntakeStatus(
            len(self.tracker) + len(self.ops), self.halt, self.watch_error, self.journal_error
        )

    # -- what the reconciler and the link ask --------------------------------------------------------------
    def mark(self) -> int:
        """A generation mark: :meth:`busy_since` names the paths touched after it."""
        return self.tracker.gen

    def busy_since(self, mark: int) -> set[str]:
        """Paths a reconciliation must leave alone: touched since ``mark``, tracked, or queued."""
        queued = {p.path for p in self.ops} | {p.dst for p in self.ops if p.op is Op.RENAME}
        return self.tracker.touched_since(mark) | self.tracker.pending() | queued

    def queue_plan(
        self,
        removals: Iterable[tuple[Op, str]],
        mkdirs: Iterable[str],
        puts: Iterable[str],
        unstable: Iterable[str],
        mark: int,
        replica_files: int,
    ) -> None:
        """What a reconciliation found different, in plan order; its deletions were judged already."""
        now = self.clock()
        # The replica as of the manifest; the plan's puts and deletions adjust it as they are journaled.
        # INVARIANT: the window's peaks are of this count, so a count that drifted (a put taken for a new
        # file after a restart, when the hash cache did not know the file) starts again from the truth.
        self._replica_files = replica_files
        self._counts.clear()
        self._counts.append((now, replica_files))
        self.ops.extend(Pending(op, path, how=How.RECONCILED) for op, path in removals)
        self.ops.extend(Pending(Op.MKDIR, path) for path in mkdirs)
        self.ops.extend(Pending(Op.PUT, path, how=How.FORCE) for path in puts)
        for path in unstable:
            self.tracker.ready_now(path, now)
        self.tracker.trim_touched(mark)
        self._poke()

    def on_problem(self, path: str, code: str) -> None:
        """The receiver could not apply an entry as sent (see :class:`engine.wire.Problem`)."""
        if code == "missing-source":
            self.request_reconcile("rename-missing-source")
        elif code == "stale":  # a time change for content the replica does not hold: send it all
            self.shipped.pop(path, None)
            self.ops.append(Pending(Op.PUT, path, how=How.FORCE))
            self._poke()

    # -- hints from the watcher -----------------------------------------------------------------------------
    def _os_path(self, rel: str) -> str:
        """The source path of relative POSIX path ``rel`` (a string join: this runs for every file read)."""
        return self._prefix + (rel if os.sep == "/" else rel.replace("/", os.sep))

    def _rel(self, path: str) -> str | None:
        if not path.startswith(self._prefix):
            return None
        rel = to_posix_rel(path[len(self._prefix) :], os.sep)
        if not any(is_under(rel, inc) for inc in self.cfg.include):
            return None
        if is_temp_name(rel.rpartition("/")[2]):
            return None
        return rel

    def on_hint(self, h: Hint) -> None:
        if self.stopping:
            return
        now = self.clock()
        if h.kind == "overflow":
            self.counters["overflows"] += 1
            log.warning("watch.overflow (events were lost; a full reconciliation follows)")
            # A lost close-after-write would leave a file waiting for max_open: read every tracked file
            # now (a stable read still refuses one that is moving).
            # Queued like reconciliation puts, so a file some process still holds open for writing is
            # left to wait for its close (see _journal_batch).
            self.ops.extend(Pending(Op.PUT, p, how=How.FORCE) for p in self.tracker.take_all())
            self.request_reconcile("overflow")
            return
        if h.kind == "moved":
            src, dst = self._rel(h.path), self._rel(h.dest)
            if src is not None and dst is not None:
                self.tracker.move(src, dst)
                for index in (self._writer_since, self._retries):
                    _move_tree(index, src, dst)
                if not h.is_dir and src not in self.shipped and src not in self.cache:
                    # The replica never had src (a file written under a temporary name and renamed into
                    # place): a rename would only come back as "missing source". The destination is put
                    # (below), and src deleted in case an old copy is there: a deletion of one file the
                    # replica does not know, so not one the wipe rules need to judge.
                    self.ops.append(Pending(Op.DELETE, src, how=How.UNKNOWN))
                    self.tracker.ready_now(dst, now)
                    self._poke()
                    return
                self.ops.append(Pending(Op.RENAME, src, dst))
                # The replica's copy of src may be older than the file now at dst (changed while we were
                # down, or while a reconciliation that leaves touched paths alone ran): look at dst again.
                # An unchanged file is not re-sent (see shipped).
                if h.is_dir:
                    asyncio.get_running_loop().call_later(0.05, self._scan_new_dir, dst, False)
                else:
                    self.tracker.ready_now(dst, now)
            elif src is not None:
                self._deleted(src, h.is_dir)
            elif dst is not None:
                self._created(dst, h.is_dir, now, complete=True)
            self._poke()
            return
        rel = self._rel(h.path)
        if rel is None:
            return
        if h.kind == "deleted":
            self._deleted(rel, h.is_dir)
        elif h.kind == "created":
            self._created(rel, h.is_dir, now, complete=False)
        elif not h.is_dir:
            if h.kind == "closed":
                self._writer_since.pop(rel, None)  # a close vouches for the file again
            self.tracker.hint(h.kind, rel, now)
        self._poke()

    def _deleted(self, rel: str, is_dir: bool) -> None:
        self.tracker.forget(rel)
        for index in (self._writer_since, self._retries):
            _move_tree(index, rel, None)
        # Held until the burst it belongs to is judged whole (see _gate): a whole replicated folder being
        # removed shows as file deletions long before the folder's own.
        now = self.clock()
        if self._del_first is None:
            self._del_first = now
        self._del_times.append(now)
        self._del_count += 1
        self.ops.append(Pending(Op.RMDIR if is_dir else Op.DELETE, rel))
        if is_dir and rel in self.cfg.include:
            self._restart_watch()

    def _created(self, rel: str, is_dir: bool, now: float, complete: bool) -> None:
        if not is_dir:
            if complete:
                self.tracker.ready_now(rel, now)
            else:
                self.tracker.hint("created", rel, now)
            return
        self.ops.append(Pending(Op.MKDIR, rel))
        if rel in self.cfg.include:
            self._restart_watch()
        # Files made inside a new folder before its watch existed get no events of their own.
        asyncio.get_running_loop().call_later(0.05, self._scan_new_dir, rel)

    def _background(self, fut: asyncio.Future[Any]) -> None:
        self._bg.add(fut)
        fut.add_done_callback(self._bg.discard)

    def _restart_watch(self) -> None:
        """An included folder appeared or vanished, or the source root came back: plan the watches again.
        Events during the restart may be lost, so a reconciliation follows."""
        if self._watcher is None or self.stopping:
            return
        fut = asyncio.get_running_loop().run_in_executor(None, self._watcher.restart)
        self._background(fut)
        fut.add_done_callback(self._watch_restarted)

    def _watch_restarted(self, fut: asyncio.Future[None]) -> None:
        if fut.cancelled():
            return
        e = fut.exception()
        if isinstance(e, OSError):
            self._watch_failed(e)
        elif e is not None:
            log.error("watch.restart_failed error=%r (a bug; the sender stops)", e)
            raise e
        else:
            if self.watch_error is not None:
                log.info("watch.restored (watching again after: %s)", self.watch_error)
            self.watch_error = None
            self._watch_retry = 1.0
        self.request_reconcile("watch-restart")

    def _watch_failed(self, e: OSError) -> None:
        """Without a watcher, changes are found only by reconciliation: say so loudly, reconcile at once
        and try again with backoff (1 s doubling to 60 s)."""
        self.watch_error = str(e) or type(e).__name__
        self.counters["watch_failures"] += 1
        log.error(
            "watch.failed error=%s retry_in=%gs (changes are found by reconciliation until it works; "
            "on Linux check fs.inotify.max_user_watches)",
            self.watch_error,
            self._watch_retry,
        )
        self.request_reconcile("watch-failed")
        if not self.stopping:
            asyncio.get_running_loop().call_later(self._watch_retry, self._restart_watch)
        self._watch_retry = min(60.0, self._watch_retry * 2)

    def _missing_includes(self) -> list[str]:
        return [inc for inc in self.cfg.include if not os.path.lexists(self.cfg.source / inc)]

    async def _source_monitor(self) -> None:
        """The source root moved away, deleted or moved back: the watches follow the old folder, so a
        root that comes back (the same folder or another) is watched again and reconciled."""
        ident = await asyncio.to_thread(_dir_id, self.cfg.source)
        lost = ident is None
        while True:
            await asyncio.sleep(ROOT_CHECK)
            now_id = await asyncio.to_thread(_dir_id, self.cfg.source)
            if now_id is None:
                if not lost:
                    log.warning(
                        "send.source_root_missing root=%s (moved away or deleted: deletions are held; "
                        "replication resumes and reconciles when it is back)",
                        self.cfg.source,
                    )
                lost = True
            elif lost or now_id != ident:
                log.warning(
                    "send.source_root_back root=%s (%s; watching it again and reconciling)",
                    self.cfg.source,
                    "the same folder" if now_id == ident else "another folder",
                )
                ident, lost = now_id, False
                self._restart_watch()
                self._poke()

    def _scan_new_dir(self, rel: str, mkdirs: bool = True) -> None:
        """Files made inside a new folder before its watch existed get no events of their own: walk it
        (in a worker thread; the loop never blocks on a large folder) and hint what is there."""
        if self.stopping:
            return
        fut = asyncio.ensure_future(asyncio.to_thread(self._walk_new_dir, rel, mkdirs))
        self._background(fut)
        fut.add_done_callback(self._new_dir_walked)

    def _walk_new_dir(self, rel: str, mkdirs: bool) -> tuple[list[str], list[str]]:
        dirs: list[str] = []
        files: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.cfg.source / rel):
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
            sub = to_posix_rel(os.path.relpath(dirpath, self.cfg.source), os.sep)
            if mkdirs:
                dirs.extend(f"{sub}/{d}" for d in dirnames)
            files.extend(f"{sub}/{f}" for f in filenames if not is_temp_name(f))
        return dirs, files

    def _new_dir_walked(self, fut: asyncio.Future[tuple[list[str], list[str]]]) -> None:
        if fut.cancelled() or self.stopping:
            return
        if (e := fut.exception()) is not None:
            log.warning("send.walk_failed error=%s (the next reconciliation covers it)", e)
            self.request_reconcile("walk-failed")
            return
        dirs, files = fut.result()
        now = self.clock()
        self.ops.extend(Pending(Op.MKDIR, d) for d in dirs)
        for f in files:
            self.tracker.hint("scanned", f, now)
        self._poke()

    def _poke(self) -> None:
        self._wake.set()

    # -- the pipeline: due paths -> journal ------------------------------------------------------------
    async def _pipeline(self) -> None:
        while True:
            wait = await self.step()
            if wait is not None and wait <= 0:
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def step(self) -> float | None:
        """One pass: hand out what is due, judge a burst of deletions or journal one group. Returns how
        long to wait for the next pass (None: until something happens; 0: go on at once)."""
        now = self.clock()
        due = self.tracker.due(now)
        # A path once found open for writing is checked again however it became due: its close
        # event may be the one an overflow lost. Its max_open counts from the first time it was seen
        # being written, whatever hints came between.
        for p, since in due.check:
            if now - self._writer_since.setdefault(p, since) >= self.cfg.max_open:
                due.forced.append(p)
            else:
                self.ops.append(Pending(Op.PUT, p, how=How.CHECK))
        self.ops.extend(
            Pending(Op.PUT, p, how=How.CHECK) if p in self._writer_since else Pending(Op.PUT, p)
            for p in due.ready
        )
        for p in due.forced:
            self.counters["forced_max_open"] += 1
            log.warning(
                "send.max_open path=%r (open for writing over %gs; shipping a stable read)",
                p,
                self.cfg.max_open,
            )
        # Held open past max_open: shipped from a stable read even though a writer has it open.
        self.ops.extend(Pending(Op.PUT, p, how=How.MAX_OPEN) for p in due.forced)
        n, hold_until, judge = self._gate(now)
        if judge:
            await self._judge_deletions(now)
            return 0
        if n == 0:
            nd = self.tracker.next_due()
            if hold_until is not None:
                nd = hold_until if nd is None else min(nd, hold_until)
            return None if nd is None else max(0.0, nd - self.clock())
        batch = [self.ops.popleft() for _ in range(n)]
        self._approved = max(0, self._approved - n)
        gen = self.tracker.gen
        res = await run_critical(functools.partial(self._journal_batch, batch, gen))
        if res.journal_full is not None:
            await self._journal_full(batch, res.journal_full)
            return 0
        if self.journal_error is not None:
            log.warning("journal.writable_again (was: %s)", self.journal_error)
            self.journal_error, self._full_backoff = None, 1.0
        now = self.clock()
        for p in res.vanished:  # gone again (a delete or move hint follows)
            self._writer_since.pop(p, None)
            self._retries.pop(p, None)
        for p in res.writing:
            # A writer had it open: look again with backoff rather than wait for a close event that an
            # overflow may have lost. A newer hint (its close, maybe) keeps its own timing, but not a
            # later start: held open past max_open, it is shipped from a stable read (and logged).
            since = self._writer_since.setdefault(p, now)
            n = self._retries[p] = self._retries.get(p, 0) + 1
            self.tracker.still_writing(p, now, since, min(5.0, 0.25 * 2 ** min(n - 1, 8)))
        for p in res.retry:
            # Backs off for a file that stays unreadable (locked, delete pending): 0.05 s doubling to 5 s.
            self.counters["unstable_retries"] += 1
            n = self._retries[p] = self._retries.get(p, 0) + 1
            self.tracker.retry(p, now, min(5.0, 0.05 * 2 ** min(n - 1, 8)))
        for p in res.done:
            self._retries.pop(p, None)
            self._writer_since.pop(p, None)
        if self._replica_files is not None and (res.files_deleted or res.files_created):
            self._replica_files = max(0, self._replica_files + res.files_created - res.files_deleted)
            self._counts.append((now, self._replica_files))
        if res.appended:
            self.counters["journaled"] += res.appended
            self._on_appended()
        every = self.cfg.checkpoint_minutes * 60
        if now - self._last_prune > (min(PRUNE_INTERVAL, every) if every else PRUNE_INTERVAL):
            self._last_prune = now
            cfg = self.cfg
            cutoff = checkpoint.retention_cutoff(
                self.journal, cfg.state_dir, cfg.journal_retain_hours, cfg.journal_retain_gb, time.time()
            )
            acked = min(self._acked(), self.journal.head)
            if every:
                # The window's first moment must stay answerable: prune only up to the checkpoint that
                # covers it (none yet: nothing). Building runs aside; journaling never waits for it.
                if self._ck_task is None or self._ck_task.done():
                    head = self.journal.head  # committed: an entry not yet durable may still be undone
                    self._ck_task = asyncio.ensure_future(asyncio.to_thread(self._checkpoints, cutoff, head))
                acked = min(acked, self._ck_floor)
            removed = await run_critical(functools.partial(self._prune, acked, cutoff))
            if removed:
                log.info("journal.pruned segments=%d up_to=%d", removed, acked)
        return 0

    def _checkpoints(self, cutoff: float, head: int) -> None:
        """A checkpoint (up to the committed ``head``) when ``checkpoint_minutes`` have passed since the last
        one built here; those the window no longer needs deleted; the floor the journal may be pruned to.
        Worker thread."""
        j = self.journal
        self._ck_floor, self._ck_newest = checkpoint.chores(
            self.cfg.state_dir, j.id, j.first_seq, head, cutoff, self.cfg.checkpoint_minutes, self._ck_clock
        )

    async def _journal_full(self, batch: list[Pending], why: str) -> None:
        """The journal's disk is full: the whole batch goes back to the front of the queue (puts forced, so
        that nothing is skipped as already shipped; whatever did reach the journal is re-sent harmlessly),
        acknowledged segments are pruned whatever their age, and the batch is tried again with backoff."""
        self.counters["journal_full"] += 1
        if self.journal_error is None:
            log.error(
                "journal.full error=%s (changes wait and nothing is lost; acknowledged segments are pruned "
                "to make room; free space in the state folder's file system)",
                why,
            )
        self.journal_error = why
        again = [Pending(Op.PUT, p.path, how=How.FORCE) if p.op is Op.PUT else p for p in batch]
        self.ops.extendleft(reversed(again))
        self._approved += len(batch)  # deletions among them were judged already
        acked = min(self._acked(), self.journal.head)
        # Keep what the newest checkpoint goes on from while that frees anything (the checkpoints go on);
        # past it only when nothing else is left: then whole-set replays start again from a later point.
        floor = min(acked, self._ck_newest) if self._ck_newest else acked
        removed = await run_critical(functools.partial(self._prune, floor, 0.0, True))
        if not removed and floor < acked:
            removed = await run_critical(functools.partial(self._prune, acked, 0.0, True))
            if removed:
                log.error(
                    "checkpoint.chain_broken up_to=%d (the disk is full: segments after the newest "
                    "checkpoint were pruned, so no later checkpoint can be built from this journal and "
                    "whole-set replays are refused until it is retired; single files changed since can "
                    "still be restored)",
                    acked,
                )
                self._ck_newest = 0
        if removed:
            log.warning("journal.pruned_for_space segments=%d", removed)
        await asyncio.sleep(self._full_backoff)
        self._full_backoff = min(30.0, self._full_backoff * 2)

    def _gate(self, now: float) -> tuple[int, float | None, bool]:
        """How many ops from the front may be journaled now, until when the rest waits, and whether the
        deletions at the front are to be judged now.

        INVARIANT: no deletion is journaled before the burst it belongs to was judged whole (see
        :func:`engine.plan.deletion_verdict`); order is kept, so a held deletion holds back what follows
        it. A burst is judged once deletions have been quiet for a moment (a long ``rm -rf`` is judged
        when it has finished, or at the latest after DELETE_MAX_HOLD); while halted, every HALT_RECHECK."""
        n = 0
        for op in self.ops:
            if n >= self.cfg.batch_files:
                break
            if op.live_deletion and n >= self._approved:
                if n:
                    return n, None, False  # journal what comes before the burst first
                if self.halt is not None:
                    at = self._halt_checked + HALT_RECHECK
                else:
                    if self._del_first is None:  # deletions queued while the last burst was judged
                        self._del_first = now
                    first = self._del_first
                    while self._del_times and now - self._del_times[0] > DELETE_QUIET:
                        self._del_times.popleft()
                    small = small_burst(self._replica_estimate())
                    at = deletion_release_at(now, first, self._del_count, len(self._del_times), small)
                return 0, at, now >= at
            n += 1
        return n, None, False

    async def _judge_deletions(self, now: float) -> None:
        """Judge every queued deletion as one burst (I/O in a worker thread). Deletions of paths that exist
        again are dropped (a folder deleted and put back); a wipe halts them all; else they are approved."""
        ops = list(self.ops)
        while self._counts and now - self._counts[0][0] > DELETE_WINDOW:
            self._counts.popleft()
        peak = max((c for _t, c in self._counts), default=0)
        facts, drop = await asyncio.to_thread(self._deletion_facts, ops, peak)
        if drop:
            # Only the pipeline takes ops from the front; the snapshot is still a prefix of self.ops.
            kept = [op for i, op in enumerate(ops) if i not in drop]
            for _ in range(len(ops)):
                self.ops.popleft()
            self.ops.extendleft(reversed(kept))
            log.info("send.deletions_dropped count=%d (the paths exist again on the source)", len(drop))
        why = None if self.allow_mass_delete else deletion_verdict(facts, self.cfg.max_delete_share)
        self._halt_checked = self.clock()
        if why is not None:
            if why != self.halt:
                self.counters["halts"] += 1
                log.error(
                    "send.halted reason=%s (nothing was deleted on the replica; the deletions and the "
                    "changes after them wait: they go on by themselves if the files come back; to confirm "
                    "the deletion, restart with --allow-mass-delete)",
                    why,
                )
            self.halt = why
            return
        if self.halt is not None:
            log.warning("send.halt_cleared (was: %s)", self.halt)
            self.halt = None
        self._approved = len(ops) - len(drop)
        self._del_first, self._del_count = None, 0
        self._del_times.clear()
        self._poke()

    def _replica_estimate(self) -> int:
        """The replica's file count as last known; before the first reconciliation the hash cache's size,
        which only sizes bursts (the share rule waits for a count from a manifest, see _deletion_facts)."""
        return len(self.cache) if self._replica_files is None else self._replica_files

    def _deletion_facts(self, ops: list[Pending], peak: int) -> tuple[DeletionFacts, set[int]]:
        """Worker thread: what the source looks like for the deletions among ``ops``."""
        src = self.cfg.source
        root_present = src.is_dir()
        drop: set[int] = set()
        files = 0
        under: dict[str, int] = {}
        folders: set[str] = set()  # include items known to be folders (something below them was deleted)
        for i, op in enumerate(ops):
            if not op.live_deletion:
                continue
            path, is_dir = op.path, op.op is Op.RMDIR
            if root_present:
                p = src / path
                back = p.is_dir() if is_dir else p.is_file()
                if back and not p.is_symlink():
                    drop.add(i)
                    continue
            if not is_dir:
                files += 1
            for inc in self.cfg.include:
                if path == inc and is_dir:
                    folders.add(inc)
                elif is_under(path, inc) and path != inc:
                    folders.add(inc)
                    if not is_dir:
                        under[inc] = under.get(inc, 0) + 1
        vanished = tuple(inc for inc in sorted(folders) if root_present and not (src / inc).is_dir())
        emptied = tuple(
            (inc, n)
            for inc, n in sorted(under.items())
            if inc not in vanished and not _holds_a_file(src / inc)
        )
        facts = DeletionFacts(
            root_present=root_present,
            vanished=vanished,
            emptied=emptied,
            files_deleted=files,
            # No share rule before a reconciliation has counted the replica: the hash cache's size could be
            # far off (it keeps renamed-away paths until the next one).
            replica_files=self._replica_files or 0,
            peak_files=max(peak, self._replica_files or 0),
        )
        return facts, drop

    def _prune(self, acked: int, cutoff: float, pressure: bool = False) -> int:
        with self.jlock:
            return self.journal.prune(acked, cutoff, pressure=pressure)

    def _journal_batch(self, batch: list[Pending], gen: int) -> _BatchResult:
        """One group: read, check and append every change in order, then one fsync. Worker thread.

        ``gen`` is the tracker's generation when the group was taken: a file with a hint newer than that
        (a writer opened it again while we read) is not journaled from this read; the tracker has it and
        makes it due again when the writer is done."""
        res = _BatchResult()
        # Reconciliation puts and checks have no close event vouching for them: leave alone what some
        # process holds open for writing.
        unvouched = [
            self._os_path(p.path) for p in batch if p.op is Op.PUT and p.how in (How.FORCE, How.CHECK)
        ]
        busy, complete = open_for_writing(unvouched)
        with self.jlock:
            j = self.journal
            try:
                for op in batch:
                    kind, path = op.op, op.path
                    ts = time.time_ns()
                    if kind is Op.PUT:
                        if busy and self._os_path(path) in busy:
                            res.writing.append(path)
                            continue
                        guarded = self.check is not None and self.check.guarded(path)
                        r = read_stable(
                            self._os_path(path),
                            inline_max=GUARD_MAX_BYTES if guarded else SMALL_FILE,
                            lease_check=op.how is not How.MAX_OPEN,
                            # A check that could not see every process needs the lease's word instead.
                            require_lease=op.how is How.CHECK and not complete,
                        )
                        if r is None:
                            res.vanished.append(path)  # gone again (a delete or move hint follows)
                            continue
                        if isinstance(r, Unstable):
                            (res.writing if r.writing else res.retry).append(path)
                            continue
                        # RACE: the loop records hints while this thread reads; a dict lookup is atomic.
                        if self.tracker.touched_after(path, gen):
                            res.superseded += 1
                            continue
                        if self._retries or self._writer_since:
                            res.done.append(path)
                        prev = self.shipped.get(path) if op.how is not How.FORCE else None
                        version = pack_version(r.size, r.mtime_ns, r.digest)
                        if prev == version:
                            res.unchanged += 1
                            continue
                        if prev is not None and same_content(prev, version):
                            # Only its time changed (touch, cp -p, git): the time travels, not the content.
                            j.append(Change(0, Op.TOUCH, path, "", r.size, r.mtime_ns, r.digest, 0, ts))
                            self.shipped[path] = version
                            self.cache.put_key(path, r.key, r.digest)
                            res.appended += 1
                            continue
                        new = path not in self.shipped and path not in self.cache
                        if not self._put(j, path, r, ts, res, guarded):
                            continue
                        res.files_created += new
                        self.shipped[path] = version
                    elif kind is Op.DELETE or kind is Op.RMDIR:
                        j.append(Change(0, kind, path, ts_ns=ts))
                        self.cache.drop(path)
                        if kind is Op.DELETE:
                            self.shipped.pop(path, None)
                            res.files_deleted += op.how is not How.UNKNOWN  # not a file the replica never had
                        else:
                            _move_tree(self.shipped, path, None)
                    elif kind is Op.MKDIR:
                        j.append(Change(0, Op.MKDIR, path, ts_ns=ts))
                    elif kind is Op.RENAME:
                        j.append(Change(0, Op.RENAME, path, dst=op.dst, ts_ns=ts))
                        _move_tree(self.shipped, path, op.dst)
                    res.appended += 1
                j.commit()
            except JournalFull as e:
                # Nothing of this batch is trusted to be journaled: the caller puts it all back. What an
                # append left pending is committed if it can be (else the journal drops it itself).
                try:
                    j.commit()
                except JournalFull:
                    pass
                return _BatchResult(journal_full=str(e))
        return res

    def _put(self, j: Journal, path: str, r: StableRead, ts: int, res: _BatchResult, guarded: bool) -> bool:
        try:
            self._check_path(path)
        except PathRejected as e:
            log.warning("send.skipped path=%r reason=%s", path, e.reason)
            return False
        if guarded and self.check is not None:
            if r.data is None:
                reason: str | None = f"a guarded file over {GUARD_MAX_BYTES >> 20} MiB cannot be checked"
            else:
                reason = self.check(path, r.data)
            if reason is not None:
                self.counters["held"] += 1
                res.held.append((path, reason))
                log.warning(
                    "guard.torn path=%r reason=%s (held back; the last good version stays)", path, reason
                )
                return False
        change = Change(0, Op.PUT, path, size=r.size, mtime_ns=r.mtime_ns, digest=r.digest, ts_ns=ts)
        if r.data is not None:
            j.append(change, r.data)
        else:
            ap = j.begin_put(change)
            try:
                for chunk in iter_file_chunks(self.cfg.source / path):
                    ap.write(chunk)
            except OSError:
                ap.abort()
                res.retry.append(path)
                return False
            if ap.finish() is None:
                res.retry.append(path)
                return False
        self.cache.put_key(path, r.key, r.digest)
        return True


_VERSION = struct.Struct("<qq")


def pack_version(size: int, mtime_ns: int, digest: bytes) -> bytes:
    """A file's version as ``shipped`` and the reconciler's scan hold it: size and mtime packed, then the
    digest, in one bytes object (about 70 bytes, where a tuple of three objects held about 200: at 100,000
    files, 13 MB less). Never empty."""
    return _VERSION.pack(size, mtime_ns) + digest


def unpack_version(v: bytes) -> tuple[int, int, bytes]:
    """Size, mtime and digest of a :func:`pack_version`."""
    size, mtime_ns = _VERSION.unpack_from(v)
    return size, mtime_ns, v[_VERSION.size :]


def same_content(a: bytes, b: bytes) -> bool:
    """Two shipped versions of the same size and digest (their times may differ)."""
    return a[:8] == b[:8] and a[16:] == b[16:]


def _move_tree(index: dict[str, Any], src: str, dst: str | None) -> None:
    """Move (or, with ``dst`` None, drop) ``src`` and everything below it in a path-keyed index."""
    prefix = src + "/"
    keys = [k for k in index if k == src or k.startswith(prefix)]
    if dst is not None:
        prefix_d = dst + "/"
        for k in [k for k in index if k == dst or k.startswith(prefix_d)]:
            del index[k]
    for k in keys:
        v = index.pop(k)
        if dst is not None:
            index[dst + k[len(src) :]] = v


def _dir_id(path: Any) -> tuple[int, int] | None:
    """(device, file id) of a folder, or None if it is not one (st_ino is the file index on Windows)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def _holds_a_file(folder: Any) -> bool:
    """Whether any file is left below ``folder`` (stops at the first one)."""
    return any(filenames for _dirpath, _dirnames, filenames in os.walk(folder))
