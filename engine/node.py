"""The composition root: builds a role's components, runs them in one TaskGroup, stops them in order.

A node replicates as a *sender* (:class:`SenderNode`: intake, link and reconciler over one journal) or as a
*receiver* (:class:`engine.receiver.Receiver`). Stopping is: stop intake, let the link drain (waiting on a
condition, up to DRAIN_SECONDS), cancel, close the journal, save state.

Must not: be imported by anything but the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine.config import SenderConfig
from engine.errors import ReplicationError, SafetyHalt
from engine.guards import GuardCheck
from engine.journal import Journal
from engine.scan import HashCache
from engine.sender.intake import Intake
from engine.sender.link import Link
from engine.sender.reconcile import Reconciler
from engine.status import write_status_quiet

log = logging.getLogger(__name__)

#: On a graceful stop, how long the link may take to have everything journaled acknowledged.
DRAIN_SECONDS = 5.0
#: How often the status file is rewritten.
STATUS_INTERVAL = 1.0

COUNTERS = (
    "journaled",
    "unstable_retries",
    "held",
    "forced_max_open",
    "reconciles",
    "overflows",
    "refused_by_receiver",
    "reconnects",
    "silent_peer_drops",
    "journal_read_errors",
    "watch_failures",
    "halts",
    "journal_full",
)


def read_epoch(state_dir: Path) -> int:
    p = state_dir / "epoch"
    try:
        return int(p.read_text("ascii").strip())
    except FileNotFoundError:
        p.write_text("1\n", "ascii")
        return 1
    except ValueError:
        raise ReplicationError(f"{p}: not an epoch number") from None


@dataclass(frozen=True, slots=True)
class SenderStatus:
    """What ``standby status`` shows of a sender (written to the state folder as JSON)."""

    node: str
    peer: str
    peer_node: str
    connected: bool
    epoch: int
    journal: str
    head: int
    sent_seq: int
    acked_seq: int
    lag_records: int
    lag_seconds: float
    pending_paths: int
    halt: str | None
    watch_error: str | None
    journal_error: str | None
    link_error: str | None
    counters: dict[str, int]
    last_reconcile: dict[str, Any]
    started: float
    source: str
    role: str = "sender"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Stop(Exception):
    pass


class SenderNode:
    """The sender role: watcher hints -> journal -> ordered stream to the receiver."""

    def __init__(
        self,
        cfg: SenderConfig,
        *,
        allow_mass_delete: bool = False,
        check: GuardCheck | None = None,
        close_events: bool | None = None,
        tls: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.journal = Journal.open(
            cfg.state_dir / "journal", fsync=cfg.fsync, segment_bytes=cfg.segment_mb << 20
        )
        self.cache = HashCache.load(cfg.state_dir / "hashcache")
        self.epoch = read_epoch(cfg.state_dir)
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.started = time.time()
        if close_events is None:
            close_events = sys.platform.startswith("linux")
        self.jlock = threading.Lock()
        self.link = Link(
            cfg,
            self.journal,
            self.counters,
            epoch=self.epoch,
            tls=tls,
            on_connect=lambda: self.reconciler.request("connect"),
            on_problem=lambda path, code: self.intake.on_problem(path, code),
            clock=clock,
        )
        self.intake = Intake(
            cfg,
            self.journal,
            self.jlock,
            self.cache,
            self.counters,
            acked=lambda: self.link.acked.seq,
            on_appended=self.link.kick,
            on_reconcile=lambda reason: self.reconciler.request(reason),
            allow_mass_delete=allow_mass_delete,
            check=check,
            close_events=close_events,
            clock=clock,
        )
        self.reconciler = Reconciler(
            cfg,
            self.journal,
            self.cache,
            self.intake,
            self.link,
            self.counters,
            allow_mass_delete=allow_mass_delete,
            check=check,
            clock=clock,
        )

    async def run(self, stop: asyncio.Event) -> None:
        if not self.cfg.source.is_dir():
            raise SafetyHalt(
                f"source root {self.cfg.source} does not exist or is not a folder; refusing to "
                "replicate an empty set over the replica"
            )
        await self.intake.start()
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
                tg.create_task(self.intake.run(), name="intake")
                tg.create_task(self.link.run(), name="link")
                tg.create_task(self.reconciler.run(), name="reconciler")
                tg.create_task(self._status_loop(), name="status")
                tg.create_task(self._stopper(stop), name="stopper")
        except* _Stop:
            pass
        except* ReplicationError as eg:
            raise eg.exceptions[0] from None
        finally:
            await self.intake.close()
            await asyncio.to_thread(self._close)
            log.info("send.stopped head=%d acked=%d", self.journal.head, self.link.acked.seq)

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
        log.info("send.stopping (intake stopped; draining up to %gs)", DRAIN_SECONDS)
        await self.intake.stop_watching()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_SECONDS):
                await self.link.wait_acked(self.journal.head)
        raise _Stop

    async def _status_loop(self) -> None:
        while True:
            await asyncio.to_thread(write_status_quiet, self.cfg.state_dir, self.status())
            await asyncio.sleep(STATUS_INTERVAL)

    def status(self) -> dict[str, Any]:
        return self.typed_status().to_dict()

    def typed_status(self) -> SenderStatus:
        head = self.journal.head
        link = self.link.status()
        intake = self.intake.status()
        behind = link.behind_since
        lag_s = 0.0 if behind is None or link.acked.seq >= head else time.time() - behind
        last = self.reconciler.last
        return SenderStatus(
            node=self.cfg.node,
            peer="{}:{}".format(*self.cfg.peer),
            peer_node=link.peer_node,
            connected=link.connected,
            epoch=self.epoch,
            journal=self.journal.id,
            head=head,
            sent_seq=link.sent.seq,
            acked_seq=link.acked.seq,
            lag_records=max(0, head - link.acked.seq),
            lag_seconds=round(lag_s, 3),
            pending_paths=intake.pending_paths,
            halt=intake.halt,
            watch_error=intake.watch_error,
            journal_error=intake.journal_error,
            link_error=link.last_error,
            counters=dict(self.counters),
            last_reconcile={} if last is None else last.to_dict(),
            started=self.started,
            source=str(self.cfg.source),
        )
