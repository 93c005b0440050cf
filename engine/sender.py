"""The sender: watcher hints -> stable reads -> journal -> ordered stream to the receiver.

Tasks (one TaskGroup, owned here): the *pipeline* turns due paths and structural changes into journal
entries, one group (one fsync) at a time; the *link* keeps a connection to the receiver and streams the
journal from the receiver's acknowledged position; the *reconciler* compares the source with the
receiver's manifest on start, after a watcher overflow and on a schedule.

INVARIANT: the journal is written only by the pipeline, one group at a time, in the order the changes were
observed; the stream sends it in that order and resends from the receiver's position after any break.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import stat
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from engine import wire
from engine.aio import run_critical, tune_socket
from engine.config import SenderConfig
from engine.errors import (
    EpochFenced,
    JournalError,
    JournalFull,
    PathRejected,
    PeerRefused,
    PeerSilent,
    RemoteProtocolError,
    ReplicationError,
    SafetyHalt,
)
from engine.guards import GUARD_MAX_BYTES, GuardCheck
from engine.journal import Journal
from engine.model import Change, FileMeta, Op, check_relpath, is_temp_name, is_under, to_posix_rel
from engine.plan import (
    DELETE_QUIET,
    DELETE_WINDOW,
    DeletionFacts,
    deletion_release_at,
    deletion_verdict,
    diff,
    expected_after,
    mass_delete,
    same,
    small_burst,
)
from engine.scan import (
    SMALL_FILE,
    HashCache,
    Manifest,
    StableRead,
    Unstable,
    iter_file_chunks,
    iter_manifest,
    open_for_writing,
    read_stable,
)
from engine.status import write_status_quiet
from engine.tracker import Tracker
from engine.transport import TlsSettings, client_upgrade
from engine.watch import Hint, Watcher

log = logging.getLogger(__name__)


INFLIGHT_BYTES = 64 << 20
DRAIN_SECONDS = 5.0
#: How often the source root's identity is checked (moved away, deleted, moved back).
ROOT_CHECK = 1.0
#: While halted, how often held deletions are judged again (the files may have come back).
HALT_RECHECK = 1.0


def read_epoch(state_dir: Any) -> int:
    p = state_dir / "epoch"
    try:
        return int(p.read_text("ascii").strip())
    except FileNotFoundError:
        p.write_text("1\n", "ascii")
        return 1
    except ValueError:
        raise ReplicationError(f"{p}: not an epoch number") from None


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


class _Stop(Exception):
    pass


class Sender:
    def __init__(
        self,
        cfg: SenderConfig,
        *,
        allow_mass_delete: bool = False,
        check: GuardCheck | None = None,
        close_events: bool | None = None,
        tls: TlsSettings | None = None,
    ) -> None:
        self.cfg = cfg
        self.tls = tls
        self.allow_mass_delete = allow_mass_delete
        self.check = check
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.journal = Journal.open(
            cfg.state_dir / "journal", fsync=cfg.fsync, segment_bytes=cfg.segment_mb << 20
        )
        self.cache = HashCache.load(cfg.state_dir / "hashcache")
        self.epoch = read_epoch(cfg.state_dir)
        if close_events is None:
            close_events = sys.platform.startswith("linux")
        self.tracker = Tracker(cfg.settle, cfg.max_open, close_events)
        self.ops: deque[tuple[str, ...]] = deque()
        self.jlock = threading.Lock()
        # What was last journaled for each path (size, mtime, digest): a re-read that finds the same is not
        # sent again. Owned by the pipeline's worker thread.
        self.shipped: dict[str, tuple[int, int, bytes]] = {}
        # Paths whose read is under way, and paths a read recently found gone: a rename that races a read
        # makes the renamed file due again (RACE: the read may fail before or after the move hint arrives).
        self._reading: set[str] = set()
        self._vanished: dict[str, float] = {}
        self._retries: dict[str, int] = {}
        self._writer_since: dict[str, float] = {}  # first seen open for writing (no close event since)
        self._root = str(cfg.source)
        self._prefix = self._root.rstrip(os.sep) + os.sep
        # link state
        self.connected = False
        self.peer_node = ""
        self.sent = 0
        self.acked = 0
        self.behind_since: float | None = None
        self._inflight: deque[tuple[int, int]] = deque()
        self._inflight_bytes = 0
        self._control: deque[int] = deque()
        self._manifests: dict[int, tuple[list[FileMeta], asyncio.Future[tuple[int, list[FileMeta]]]]] = {}
        self._req_ids = itertools.count(1)
        self.counters = {
            "journaled": 0,
            "unstable_retries": 0,
            "held": 0,
            "forced_max_open": 0,
            "reconciles": 0,
            "overflows": 0,
            "refused_by_receiver": 0,
            "reconnects": 0,
            "silent_peer_drops": 0,
            "journal_read_errors": 0,
            "watch_failures": 0,
            "halts": 0,
            "journal_full": 0,
        }
        #: Files on the replica as the sender knows it: from the last reconciliation, plus files created
        #: minus files deleted since (before the first one: the hash cache's size). None: not known yet.
        self._replica_files: int | None = None
        self.last_reconcile: dict[str, Any] = {}
        self.started = time.time()
        self.stopping = False
        self._watcher: Watcher | None = None
        self._wake: asyncio.Event | None = None
        self._kick: asyncio.Event | None = None
        self._reconcile_req: asyncio.Event | None = None
        self._reconcile_reason = "start"
        # Live deletions (see _gate): the burst not yet judged, how many ops at the front of ``ops`` were
        # judged and approved, the halt that holds them, and what was deleted lately (for the share).
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
        self._bg: set[asyncio.Future[Any]] = set()

    # -- lifecycle ------------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        if not self.cfg.source.is_dir():
            raise SafetyHalt(
                f"source root {self.cfg.source} does not exist or is not a folder; refusing to "
                "replicate an empty set over the replica"
            )
        self._wake, self._kick, self._reconcile_req = asyncio.Event(), asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        self._watcher = Watcher(loop, self.cfg.source, self.cfg.include, self._on_hint)
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
        log.info(
            "send.started source=%s include=%s peer=%s:%d journal=%s head=%d epoch=%d",
            self.cfg.source,
            ",".join(self.cfg.include),
            *self.cfg.peer,
            self.journal.id,
            self.journal.head,
            self.epoch,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pipeline(), name="pipeline")
                tg.create_task(self._link_loop(), name="link")
                tg.create_task(self._reconciler(), name="reconciler")
                tg.create_task(self._status_loop(), name="status")
                tg.create_task(self._source_monitor(), name="source-monitor")
                tg.create_task(self._stopper(stop), name="stopper")
        except* _Stop:
            pass
        except* ReplicationError as eg:
            raise eg.exceptions[0] from None
        finally:
            self.stopping = True
            for fut in list(self._bg):  # a walk or a watcher restart still running in a worker thread
                fut.cancel()
            if self._bg:
                await asyncio.wait(self._bg, timeout=10)
            if self._watcher is not None:
                await asyncio.to_thread(self._watcher.stop)
            await asyncio.to_thread(self._close)
            log.info("send.stopped head=%d acked=%d", self.journal.head, self.acked)

    def _close(self) -> None:
        with self.jlock:
            self.journal.close()
        try:
            self.cache.save(self.cfg.state_dir / "hashcache")  # a no-op if a reconciliation just saved it
        except OSError as e:
            log.warning("hashcache.save_failed error=%s (costs only re-hashing after a restart)", e)
        write_status_quiet(self.cfg.state_dir, self.status())

    async def _stopper(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self.stopping = True
        log.info("send.stopping (intake stopped; draining up to %gs)", DRAIN_SECONDS)
        if self._watcher is not None:
            await asyncio.to_thread(self._watcher.stop)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_SECONDS):
                while self.connected and self.acked < self.journal.head:
                    await asyncio.sleep(0.02)
        raise _Stop

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

    def _on_hint(self, h: Hint) -> None:
        if self.stopping:
            return
        now = time.monotonic()
        if h.kind == "overflow":
            self.counters["overflows"] += 1
            log.warning("watch.overflow (events were lost; a full reconciliation follows)")
            # A lost close-after-write would leave a file waiting for max_open: read every tracked file
            # now (a stable read still refuses one that is moving).
            # Queued like reconciliation puts, so a file some process still holds open for writing is
            # left to wait for its close (see _journal_batch).
            self.ops.extend(("put", p, "force") for p in self.tracker.take_all())
            self.request_reconcile("overflow")
            return
        if h.kind == "moved":
            src, dst = self._rel(h.path), self._rel(h.dest)
            if src is not None and dst is not None:
                self.tracker.move(src, dst)
                for index in (self._writer_since, self._retries):
                    _move_tree(index, src, dst)
                if not h.is_dir and src not in self.shipped and self.cache.known(src) is None:
                    # The replica never had src (a file written under a temporary name and renamed into
                    # place): a rename would only come back as "missing source". The destination is put
                    # (below), and src deleted in case an old copy is there: a deletion of one file the
                    # replica does not know, so not one the wipe rules need to judge.
                    self.ops.append(("delete", src, "unknown"))
                    self.tracker.ready_now(dst, now)
                    self._poke()
                    return
                self.ops.append(("rename", src, dst))
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
        self._queue_deletion(("rmdir" if is_dir else "delete", rel), time.monotonic())
        if is_dir and rel in self.cfg.include:
            self._restart_watch()

    def _queue_deletion(self, op: tuple[str, str], now: float) -> None:
        if self._del_first is None:
            self._del_first = now
        self._del_times.append(now)
        self._del_count += 1
        self.ops.append(op)

    def _created(self, rel: str, is_dir: bool, now: float, complete: bool) -> None:
        if not is_dir:
            if complete:
                self.tracker.ready_now(rel, now)
            else:
                self.tracker.hint("created", rel, now)
            return
        self.ops.append(("mkdir", rel))
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
        now = time.monotonic()
        self.ops.extend(("mkdir", d) for d in dirs)
        for f in files:
            self.tracker.hint("scanned", f, now)
        self._poke()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # -- the pipeline: due paths -> journal ------------------------------------------------------------
    async def _pipeline(self) -> None:
        assert self._wake is not None
        last_prune = time.monotonic()
        while True:
            now = time.monotonic()
            due = self.tracker.due(now)
            # A path once found open for writing is checked again however it became due: its close
            # event may be the one an overflow lost. Its max_open counts from the first time it was seen
            # being written, whatever hints came between.
            for p, since in due.check:
                if now - self._writer_since.setdefault(p, since) >= self.cfg.max_open:
                    due.forced.append(p)
                else:
                    self.ops.append(("put", p, "check"))
            self.ops.extend(("put", p, "check") if p in self._writer_since else ("put", p) for p in due.ready)
            for p in due.forced:
                self.counters["forced_max_open"] += 1
                log.warning(
                    "send.max_open path=%r (open for writing over %gs; shipping a stable read)",
                    p,
                    self.cfg.max_open,
                )
            # Held open past max_open: shipped from a stable read even though a writer has it open.
            self.ops.extend(("put", p, "max_open") for p in due.forced)
            n, hold_until, judge = self._gate(now)
            if judge:
                await self._judge_deletions(now)
                continue
            if n == 0:
                nd = self.tracker.next_due()
                if hold_until is not None:
                    nd = hold_until if nd is None else min(nd, hold_until)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(None if nd is None else max(0.0, nd - time.monotonic())):
                        await self._wake.wait()
                continue
            batch = [self.ops.popleft() for _ in range(n)]
            self._approved = max(0, self._approved - n)
            self._reading = {op[1] for op in batch if op[0] == "put"}
            gen = self.tracker.gen
            try:
                res = await run_critical(functools.partial(self._journal_batch, batch, gen))
            finally:
                self._reading = set()
            if res.journal_full is not None:
                await self._journal_full(batch, res.journal_full)
                continue
            if self.journal_error is not None:
                log.warning("journal.writable_again (was: %s)", self.journal_error)
                self.journal_error, self._full_backoff = None, 1.0
            now = time.monotonic()
            for p in res.vanished:
                self._vanished[p] = now
                self._writer_since.pop(p, None)
                self._retries.pop(p, None)
            for p in res.writing:
                # A writer had it open: look again with backoff rather than wait for a close event that an
                # overflow may have lost. A newer hint (its close, maybe) keeps its own timing, but not a
                # later start: held open past max_open, it is shipped from a stable read (and logged).
                since = self._writer_since.setdefault(p, now)
                n = self._retries[p] = self._retries.get(p, 0) + 1
                self.tracker.still_writing(p, now, since, min(5.0, 0.25 * 2 ** min(n - 1, 8)))
            if self._vanished:
                self._vanished = {p: t for p, t in self._vanished.items() if now - t < 30}
            for p in res.retry:
                # Backs off for a file that stays unreadable (locked, delete pending): 0.05 s doubling to 5 s.
                self.counters["unstable_retries"] += 1
                n = self._retries[p] = self._retries.get(p, 0) + 1
                self.tracker.retry(p, now, min(5.0, 0.05 * 2 ** min(n - 1, 8)))
            for p in res.done:
                self._retries.pop(p, None)
                self._writer_since.pop(p, None)
            if res.files_deleted or res.files_created:
                files = self._replica_estimate() + res.files_created - res.files_deleted
                self._replica_files = max(0, files)
                self._counts.append((now, self._replica_files))
            if res.appended:
                self.counters["journaled"] += res.appended
                if self.behind_since is None:
                    self.behind_since = time.time()
                if self._kick is not None:
                    self._kick.set()
            if now - last_prune > 60:
                last_prune = now
                cutoff = time.time() - self.cfg.journal_retain_hours * 3600
                acked = self.acked if self.connected else min(self.acked, self.journal.head)
                removed = await run_critical(functools.partial(self._prune, acked, cutoff))
                if removed:
                    log.info("journal.pruned segments=%d", removed)

    async def _journal_full(self, batch: list[tuple[str, ...]], why: str) -> None:
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
        again = [("put", op[1], "force") if op[0] == "put" else op for op in batch]
        self.ops.extendleft(reversed(again))
        self._approved += len(batch)  # deletions among them were judged already
        acked = min(self.acked, self.journal.head)
        removed = await run_critical(functools.partial(self._prune, acked, 0.0, True))
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
            if op[0] in ("delete", "rmdir") and len(op) == 2 and n >= self._approved:
                if n:
                    return n, None, False  # journal what comes before the burst first
                if self.halt is not None:
                    at = self._halt_checked + HALT_RECHECK
                else:
                    first = now if self._del_first is None else self._del_first
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
        self._halt_checked = time.monotonic()
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
        return len(self.cache) if self._replica_files is None else self._replica_files

    def _deletion_facts(self, ops: list[tuple[str, ...]], peak: int) -> tuple[DeletionFacts, set[int]]:
        """Worker thread: what the source looks like for the deletions among ``ops``."""
        src = self.cfg.source
        root_present = src.is_dir()
        drop: set[int] = set()
        files = 0
        under: dict[str, int] = {}
        folders: set[str] = set()  # include items known to be folders (something below them was deleted)
        for i, op in enumerate(ops):
            kind, path = op[0], op[1]
            if kind not in ("delete", "rmdir") or len(op) > 2:
                continue
            if root_present:
                p = src / path
                back = p.is_dir() if kind == "rmdir" else p.is_file()
                if back and not p.is_symlink():
                    drop.add(i)
                    continue
            if kind == "delete":
                files += 1
            for inc in self.cfg.include:
                if path == inc and kind == "rmdir":
                    folders.add(inc)
                elif is_under(path, inc) and path != inc:
                    folders.add(inc)
                    if kind == "delete":
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
            replica_files=self._replica_estimate(),
            peak_files=max(peak, self._replica_estimate()),
        )
        return facts, drop

    def _prune(self, acked: int, cutoff: float, pressure: bool = False) -> int:
        with self.jlock:
            return self.journal.prune(acked, cutoff, pressure=pressure)

    def _journal_batch(self, batch: list[tuple[str, ...]], gen: int) -> _BatchResult:
        """One group: read, check and append every change in order, then one fsync. Worker thread.

        ``gen`` is the tracker's generation when the group was taken: a file with a hint newer than that
        (a writer opened it again while we read) is not journaled from this read; the tracker has it and
        makes it due again when the writer is done."""
        res = _BatchResult()
        src = self.cfg.source
        # Reconciliation puts and checks have no close event vouching for them: leave alone what some
        # process holds open for writing.
        unvouched = [src / op[1] for op in batch if op[0] == "put" and op[2:] in (("force",), ("check",))]
        busy, complete = open_for_writing(unvouched)
        with self.jlock:
            j = self.journal
            try:
                for op in batch:
                    kind, path = op[0], op[1]
                    ts = time.time_ns()
                    if kind == "put":
                        if busy and src / path in busy:
                            res.writing.append(path)
                            continue
                        guarded = self.check is not None and self.check.guarded(path)
                        r = read_stable(
                            self._os_path(path),
                            inline_max=GUARD_MAX_BYTES if guarded else SMALL_FILE,
                            lease_check=op[2:] != ("max_open",),
                            # A check that could not see every process needs the lease's word instead.
                            require_lease=op[2:] == ("check",) and not complete,
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
                        prev = self.shipped.get(path) if op[2:] != ("force",) else None
                        if prev == (r.size, r.mtime_ns, r.digest):
                            res.unchanged += 1
                            continue
                        if prev is not None and prev[0] == r.size and prev[2] == r.digest:
                            # Only its time changed (touch, cp -p, git): the time travels, not the content.
                            j.append(Change(0, Op.TOUCH, path, "", r.size, r.mtime_ns, r.digest, 0, ts))
                            self.shipped[path] = (r.size, r.mtime_ns, r.digest)
                            self.cache.put_key(path, r.key, r.digest)
                            res.appended += 1
                            continue
                        new = path not in self.shipped and self.cache.known(path) is None
                        if not self._put(j, path, r, ts, res):
                            continue
                        res.files_created += new
                        self.shipped[path] = (r.size, r.mtime_ns, r.digest)
                    elif kind in ("delete", "rmdir"):
                        j.append(Change(0, Op.DELETE if kind == "delete" else Op.RMDIR, path, ts_ns=ts))
                        self.cache.drop(path)
                        if kind == "delete":
                            self.shipped.pop(path, None)
                            res.files_deleted += op[2:] != ("unknown",)  # not a file the replica never had
                        else:
                            _move_tree(self.shipped, path, None)
                    elif kind == "mkdir":
                        j.append(Change(0, Op.MKDIR, path, ts_ns=ts))
                    elif kind == "rename":
                        j.append(Change(0, Op.RENAME, path, dst=op[2], ts_ns=ts))
                        _move_tree(self.shipped, path, op[2])
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

    def _put(self, j: Journal, path: str, r: StableRead, ts: int, res: _BatchResult) -> bool:
        try:
            check_relpath(path)
        except PathRejected as e:
            log.warning("send.skipped path=%r reason=%s", path, e.reason)
            return False
        if self.check is not None and self.check.guarded(path):
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

    # -- the link -----------------------------------------------------------------------------------------
    async def _link_loop(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._session()
            except* EpochFenced as eg:
                raise eg.exceptions[0] from None
            except* PeerRefused as eg:
                log.warning("send.refused peer=%s:%d reason=%s", *self.cfg.peer, eg.exceptions[0])
            except* JournalError as eg:
                # The journal on disk is what it is; a read that failed (a segment pruned under us, a
                # damaged frame) is retried from the receiver's position on a fresh connection and cursor.
                self.counters["journal_read_errors"] += 1
                log.error(
                    "send.journal_read_failed error=%s (the link restarts from the receiver's position)",
                    eg.exceptions[0],
                )
            except* (OSError, EOFError, RemoteProtocolError, TimeoutError) as eg:
                e = eg.exceptions[0]
                if self.connected:
                    log.warning(
                        "send.link_down peer=%s:%d reason=%s", *self.cfg.peer, str(e) or type(e).__name__
                    )
                else:
                    log.info(
                        "send.connect_failed peer=%s:%d reason=%s retry_in=%.1fs",
                        *self.cfg.peer,
                        str(e) or type(e).__name__,
                        backoff,
                    )
            if self.connected:
                backoff = 0.1  # a session that was up starts the backoff again
            self._disconnected()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.cfg.retry_max)

    def _disconnected(self) -> None:
        if self.connected:
            self.counters["reconnects"] += 1
        self.connected = False
        self._inflight.clear()
        self._inflight_bytes = 0
        self._control.clear()
        for _parts, fut in self._manifests.values():
            if not fut.done():
                fut.set_exception(ConnectionError("link down during reconciliation"))
        self._manifests.clear()

    async def _session(self) -> None:
        host, port = self.cfg.peer
        async with asyncio.timeout(self.cfg.connect_timeout):
            reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
            tune_socket(writer, self.cfg.silence_timeout)
            if self.tls is not None:
                await client_upgrade(reader, writer, self.tls)
        try:
            proto = wire.SenderProtocol(self.cfg.node, self.epoch)
            writer.write(proto.hello())
            await writer.drain()
            async with asyncio.timeout(self.cfg.connect_timeout * 2):
                ev = None
                while ev is None:
                    data = await reader.read(65536)
                    if not data:
                        raise ConnectionError("receiver closed the connection during the handshake")
                    proto.receive_data(data)
                    ev = proto.next_event()
            if isinstance(ev, wire.Refused):
                if ev.code == "epoch":
                    raise EpochFenced(f"receiver refused epoch {self.epoch}: {ev.reason}")
                raise PeerRefused(f"{ev.code}: {ev.reason}")
            assert isinstance(ev, wire.Welcome)
            j = self.journal
            if ev.journal == j.id and j.first_seq - 1 <= ev.seq <= j.head:
                start = ev.seq + 1
            else:
                start = j.head + 1
                log.info(
                    "send.new_generation receiver_journal=%s receiver_seq=%d journal=%s kept=%d..%d "
                    "(continuity cannot be proven: streaming from %d and reconciling)",
                    ev.journal or "-",
                    ev.seq,
                    j.id,
                    j.first_seq,
                    j.head,
                    start,
                )
            writer.write(proto.stream(j.id, start))
            self.acked = self.sent = start - 1
            self.behind_since = None if self.acked >= j.head else (self.behind_since or time.time())
            self.connected = True
            self.peer_node = ev.node
            log.info("send.connected peer=%s:%d node=%r from=%d head=%d", host, port, ev.node, start, j.head)
            self.request_reconcile("connect")
            cursor = await asyncio.to_thread(j.cursor, start)
            live = wire.Liveness(self.cfg.silence_timeout, time.monotonic())
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._stream_out(writer, proto, cursor, live))
                    tg.create_task(self._read_in(reader, proto, live))
            finally:
                cursor.close()
        finally:
            writer.transport.abort()

    async def _stream_out(
        self, writer: asyncio.StreamWriter, proto: wire.SenderProtocol, cursor: Any, live: wire.Liveness
    ) -> None:
        assert self._kick is not None
        while True:
            while self._control and not cursor.in_entry:  # never between a put's chunks
                req = self._control.popleft()
                writer.write(proto.manifest_request(req, self.cfg.include))
            # The window never stops a large put half way: the receiver acknowledges whole entries only.
            if cursor.seq <= self.journal.head and (self._inflight_bytes < INFLIGHT_BYTES or cursor.in_entry):
                raw, done = await asyncio.to_thread(cursor.read_raw)
                writer.write(proto.entries(raw, done))
                live.sent(time.monotonic())
                self._inflight.append((proto.sent.last_seq, len(raw)))
                self._inflight_bytes += len(raw)
                self.sent = proto.sent.last_seq
                await writer.drain()
                continue
            await writer.drain()
            now = time.monotonic()
            if live.due(now) and not cursor.in_entry:
                writer.write(proto.ping(time.time_ns()))
                live.sent(now)
                continue
            self._kick.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, live.last_sent + live.interval - now)):
                    await self._kick.wait()

    async def _read_in(
        self, reader: asyncio.StreamReader, proto: wire.SenderProtocol, live: wire.Liveness
    ) -> None:
        """Events from the receiver. RACE: a receiver that stops answering (a dead host, a stalled proxy, a
        corrupt frame length that leaves us waiting for bytes that never come) is dropped once no whole
        frame has come for the silence timeout; the receiver sends a heartbeat well within it."""
        assert self._kick is not None
        while True:
            try:
                async with asyncio.timeout(max(0.0, live.deadline() - time.monotonic())):
                    data = await reader.read(1 << 20)
            except TimeoutError:
                if live.silent(time.monotonic()):
                    self.counters["silent_peer_drops"] += 1
                    raise PeerSilent(
                        f"no whole frame from the receiver for {live.timeout:g}s (silence_timeout)"
                    ) from None
                continue
            if not data:
                raise ConnectionError("receiver closed the connection")
            proto.receive_data(data)
            while (ev := proto.next_event()) is not None:
                live.heard(time.monotonic())
                if isinstance(ev, wire.Ack):
                    self._on_ack(ev)
                elif isinstance(ev, wire.ManifestPart):
                    if ev.id in self._manifests:
                        self._manifests[ev.id][0].extend(ev.entries)
                elif isinstance(ev, wire.ManifestEnd):
                    item = self._manifests.pop(ev.id, None)
                    if item is not None and not item[1].done():
                        item[1].set_result((ev.seq, item[0]))
                elif isinstance(ev, wire.Refused):
                    raise PeerRefused(f"{ev.code}: {ev.reason}")

    def _on_ack(self, ev: wire.Ack) -> None:
        assert self._kick is not None
        self.acked = ev.seq
        while self._inflight and self._inflight[0][0] <= ev.seq:
            self._inflight_bytes -= self._inflight.popleft()[1]
        if self.acked >= self.journal.head:
            self.behind_since = None
        for p in ev.problems:
            self.counters["refused_by_receiver"] += 1
            log.warning(
                "send.receiver_problem seq=%d path=%r code=%s reason=%s", p.seq, p.path, p.code, p.reason
            )
            if p.code == "missing-source":
                self.request_reconcile("rename-missing-source")
            elif p.code == "stale":  # a time change for content the replica does not hold: send it all
                self.shipped.pop(p.path, None)
                self.ops.append(("put", p.path, "force"))
                self._poke()
        self._kick.set()

    # -- reconciliation -------------------------------------------------------------------------------------
    def request_reconcile(self, reason: str) -> None:
        self._reconcile_reason = reason
        if self._reconcile_req is not None:
            self._reconcile_req.set()

    async def _reconciler(self) -> None:
        assert self._reconcile_req is not None
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.cfg.reconcile_interval or None):
                    await self._reconcile_req.wait()
            reason = self._reconcile_reason if self._reconcile_req.is_set() else "schedule"
            self._reconcile_req.clear()
            while not self.connected:
                await asyncio.sleep(0.05)
            try:
                await self.reconcile(reason)
            except (ConnectionError, TimeoutError) as e:
                log.info("reconcile.interrupted reason=%s error=%s (retried on reconnect)", reason, e)

    async def reconcile(self, reason: str) -> None:
        t0 = time.monotonic()
        mark = self.tracker.gen
        req = next(self._req_ids)
        fut: asyncio.Future[tuple[int, list[FileMeta]]] = asyncio.get_running_loop().create_future()
        self._manifests[req] = ([], fut)
        self._control.append(req)
        assert self._kick is not None
        self._kick.set()
        async with asyncio.timeout(3600):
            seq, replica = await fut
        expected, source, unstable, unreadable = await asyncio.to_thread(self._reconcile_read, seq, replica)
        queued = {op[1] for op in self.ops} | {op[2] for op in self.ops if op[0] == "rename"}
        exclude = self.tracker.touched_since(mark) | self.tracker.pending() | queued | set(unstable)
        plan = diff(source, expected, self.cfg.include, exclude, unreadable)
        why = mass_delete(plan, self.cfg.max_delete_share)
        if why and not self.allow_mass_delete:
            raise SafetyHalt(
                f"{why}; nothing was deleted. If this is intended, restart with --allow-mass-delete"
            )
        now = time.monotonic()
        # The replica as of the manifest; the plan's puts and deletions adjust it as they are journaled.
        self._replica_files = plan.replica_files
        self._counts.append((now, plan.replica_files))
        for op, path in plan.removals:
            # Judged whole by mass_delete above: not held again as a burst of live deletions.
            self.ops.append(("rmdir" if op is Op.RMDIR else "delete", path, "reconciled"))
        for path in plan.mkdirs:
            self.ops.append(("mkdir", path))
        # A guarded file that differs because its source version is torn is *held*, not a difference to
        # repair: it is reported as such and left to its next change.
        held = await asyncio.to_thread(self._held, plan.puts) if self.check is not None else {}
        for path, why in held.items():
            log.warning(
                "reconcile.held path=%r reason=%s (torn on the source; the replica keeps its version)",
                path,
                why,
            )
        self.ops.extend(("put", path, "force") for path in plan.puts if path not in held)
        for path in unstable:
            self.tracker.ready_now(path, now)
        self.tracker.trim_touched(mark)
        self._poke()
        edits = sorted(m.path for m in replica if "local-edit" in m.flags)
        self.counters["reconciles"] += 1
        self.last_reconcile = {
            "reason": reason,
            "at": time.time(),
            "seconds": round(time.monotonic() - t0, 3),
            "puts": len(plan.puts) - len(held),
            "held": sorted(held),
            "removals": len(plan.removals),
            "mkdirs": len(plan.mkdirs),
            "local_edits": len(edits),
            "source_entries": len(source),
        }
        log.info(
            "reconcile.done reason=%s %s held=%d local_edits=%d seconds=%.3f",
            reason,
            plan.summary(),
            len(held),
            len(edits),
            time.monotonic() - t0,
        )
        try:
            await asyncio.to_thread(self.cache.save, self.cfg.state_dir / "hashcache")
        except OSError as e:
            log.warning("hashcache.save_failed error=%s (costs only re-hashing after a restart)", e)

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

    def _reconcile_read(
        self, seq: int, replica: list[FileMeta]
    ) -> tuple[dict[str, FileMeta], dict[str, FileMeta], list[str], list[str]]:
        """Worker thread: the expected replica (manifest + journal after ``seq``), then the source scan.
        RACE: the journal tail is read before the source is scanned, so a change journaled meanwhile is
        either in both or shows as a harmless re-send, never as a wrong deletion."""
        tail: list[Change] = []
        j = self.journal
        if seq < j.head:
            cur = j.cursor(max(seq + 1, j.first_seq))
            try:
                while (c := cur.next_header()) is not None:
                    cur.skip_chunks()
                    tail.append(c)
            finally:
                cur.close()
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

    # -- status ---------------------------------------------------------------------------------------------
    async def _status_loop(self) -> None:
        while True:
            await asyncio.to_thread(write_status_quiet, self.cfg.state_dir, self.status())
            await asyncio.sleep(1.0)

    def status(self) -> dict[str, Any]:
        head = self.journal.head
        lag_s = 0.0 if self.behind_since is None or self.acked >= head else time.time() - self.behind_since
        return {
            "role": "sender",
            "node": self.cfg.node,
            "peer": "{}:{}".format(*self.cfg.peer),
            "peer_node": self.peer_node,
            "connected": self.connected,
            "epoch": self.epoch,
            "journal": self.journal.id,
            "head": head,
            "sent_seq": self.sent,
            "acked_seq": self.acked,
            "lag_records": max(0, head - self.acked),
            "lag_seconds": round(lag_s, 3),
            "pending_paths": len(self.tracker) + len(self.ops),
            "halt": self.halt,
            "watch_error": self.watch_error,
            "journal_error": self.journal_error,
            "counters": dict(self.counters),
            "last_reconcile": self.last_reconcile,
            "started": self.started,
            "source": str(self.cfg.source),
        }


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
