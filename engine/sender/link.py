"""Link: one per peer. Keeps a connection to the receiver and streams the journal from its position.

Owns the connection, the sans-I/O protocol (:class:`engine.wire.SenderProtocol`), the journal cursor, the
window of unacknowledged bytes, the acknowledged position and the liveness check. It reads the journal
and never writes it; what the receiver reports about entries goes to ``on_problem``.

Must not: decide what to journal or when to reconcile (it asks ``on_connect`` to, once a session is up).

INVARIANT: the stream starts after the receiver's acknowledged position and sends entries in journal order;
after any break it starts again from the receiver's position, so nothing is skipped and a resent entry is
harmless (every operation is idempotent on the replica).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engine import wire
from engine.config import SenderConfig
from engine.errors import (
    EpochFenced,
    JournalError,
    PeerRefused,
    PeerSilent,
    RemoteProtocolError,
)
from engine.journal import Cursor, Journal
from engine.model import FileMeta, Pos
from engine.transport import TlsSettings, dial

log = logging.getLogger(__name__)

#: Bytes sent and not yet acknowledged, at most (a put being streamed is never stopped half way).
INFLIGHT_BYTES = 64 << 20
#: A peer that refuses the stream because it is not passive yet is asked again this often (seconds).
ROLE_RETRY = 1.0
#: A session up this long (seconds) counts as healthy even with nothing acknowledged (an idle link).
HEALTHY_SESSION = 10.0

Manifest = tuple[int, list[FileMeta]]


@dataclass(frozen=True, slots=True)
class LinkStatus:
    connected: bool
    peer_node: str
    sent: Pos
    acked: Pos
    behind_since: float | None
    last_error: str | None


class Link:
    """The connection to one receiver. ``run`` keeps it up (reconnecting with backoff) until cancelled."""

    def __init__(
        self,
        cfg: SenderConfig,
        journal: Journal,
        counters: dict[str, int],
        *,
        epoch: int,
        tls: TlsSettings | None,
        on_connect: Callable[[], None],
        on_problem: Callable[[str, str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.journal = journal
        self.counters = counters
        self.epoch = epoch
        self.tls = tls
        self._on_connect = on_connect
        self._on_problem = on_problem
        self.clock = clock
        self.connected = False
        self.peer_node = ""
        self.sent = Pos(epoch, 0)
        self.acked = Pos(epoch, 0)
        #: Where the current session's acknowledgements started, and when (see _session_went_well).
        self._session_from: tuple[int, float] = (0, 0.0)
        #: Wall time since which entries wait to be acknowledged (None: caught up). Shown as lag.
        self.behind_since: float | None = None
        self.last_error: str | None = None
        self._inflight: deque[tuple[int, int]] = deque()
        self._inflight_bytes = 0
        self._control: deque[tuple[int, bool]] = deque()
        self._manifests: dict[int, tuple[list[FileMeta], asyncio.Future[Manifest]]] = {}
        self._req_ids = itertools.count(1)
        self._kick = asyncio.Event()
        self._changed = asyncio.Condition()  # notified when connected or acked changes

    # -- what the others ask ----------------------------------------------------------------------------
    def kick(self) -> None:
        """New entries were journaled: stream them."""
        if self.behind_since is None and self.acked.seq < self.journal.head:
            self.behind_since = time.time()
        self._kick.set()

    async def manifest(self, include: Sequence[str], full: bool = False) -> Manifest:
        """The receiver's manifest of ``include`` as of the entry it names. Raises ConnectionError if the
        link goes down meanwhile."""
        req = next(self._req_ids)
        fut: asyncio.Future[Manifest] = asyncio.get_running_loop().create_future()
        self._manifests[req] = ([], fut)
        self._control.append((req, full))
        self._kick.set()
        try:
            return await fut
        finally:
            self._manifests.pop(req, None)

    async def wait_connected(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.connected)

    async def wait_acked(self, seq: int) -> bool:
        """Until the receiver has acknowledged ``seq`` (True), or the link is down (False)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.acked.seq >= seq or not self.connected)
        return self.acked.seq >= seq

    def status(self) -> LinkStatus:
        return LinkStatus(
            self.connected, self.peer_node, self.sent, self.acked, self.behind_since, self.last_error
        )

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- the loop ---------------------------------------------------------------------------------------
    async def run(self) -> None:
        backoff = 0.1
        while True:
            cap = self.cfg.retry_max
            try:
                await self.step()
            except* EpochFenced as eg:
                raise eg.exceptions[0] from None
            except* PeerRefused as eg:
                text = str(eg.exceptions[0])
                level = logging.WARNING if text != self.last_error else logging.DEBUG
                self.last_error = text
                log.log(level, "send.refused peer=%s:%d reason=%s", *self.cfg.peer, text)
                if text.startswith("role:"):
                    # The peer's agent is up but not passive yet (rejoining, starting): it takes the stream
                    # the moment it is, so look again every second rather than after a long backoff.
                    cap = min(cap, ROLE_RETRY)
            except* JournalError as eg:
                # The journal on disk is what it is; a read that failed (a segment pruned under us, a
                # damaged frame) is retried from the receiver's position on a fresh connection and cursor.
                self.counters["journal_read_errors"] += 1
                self.last_error = f"journal read failed: {eg.exceptions[0]}"
                log.error(
                    "send.journal_read_failed error=%s (the link restarts from the receiver's position)",
                    eg.exceptions[0],
                )
            except* (OSError, EOFError, RemoteProtocolError, TimeoutError) as eg:
                e = eg.exceptions[0]
                self.last_error = str(e) or type(e).__name__
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
            if self.connected and self._session_went_well():
                backoff = 0.1  # a session that was up and useful starts the backoff again
            await self._disconnected()
            backoff = min(backoff, cap)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, cap)

    def _session_went_well(self) -> bool:
        """The session that just ended had something acknowledged, or lasted a while. One that ended soon
        with nothing acknowledged (the receiver failing to apply: a full disk, a share gone) keeps the
        backoff growing, so a lasting fault is retried every few seconds, not ten times a second."""
        acked_from, since = self._session_from
        return self.acked.seq > acked_from or time.monotonic() - since > HEALTHY_SESSION

    async def _disconnected(self) -> None:
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
        await self._notify()

    async def step(self) -> None:
        """One session: connect, handshake, stream and read acknowledgements until the link breaks (it
        raises what broke it; :meth:`run` reconnects with backoff)."""
        host, port = self.cfg.peer
        proto = wire.SenderProtocol(self.cfg.node, self.epoch)
        d = await dial(
            self.cfg.peer,
            self.tls,
            proto,
            connect_timeout=self.cfg.connect_timeout,
            silence=self.cfg.silence_timeout,
        )
        reader, writer, ev = d.reader, d.writer, d.answer
        try:
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
            self.acked = self.sent = Pos(self.epoch, start - 1)
            self.behind_since = None if start - 1 >= j.head else (self.behind_since or time.time())
            self._session_from = (start - 1, time.monotonic())
            self.connected = True
            self.last_error = None
            self.peer_node = ev.node
            await self._notify()
            log.info("send.connected peer=%s:%d node=%r from=%d head=%d", host, port, ev.node, start, j.head)
            self._on_connect()
            cursor = await asyncio.to_thread(j.cursor, start)
            live = wire.Liveness(self.cfg.silence_timeout, self.clock())
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._stream_out(writer, proto, cursor, live))
                    tg.create_task(self._read_in(reader, proto, live))
            finally:
                cursor.close()
        finally:
            writer.transport.abort()

    async def _stream_out(
        self, writer: asyncio.StreamWriter, proto: wire.SenderProtocol, cursor: Cursor, live: wire.Liveness
    ) -> None:
        while True:
            while self._control and not cursor.in_entry:  # never between a put's chunks
                req, full = self._control.popleft()
                writer.write(proto.manifest_request(req, self.cfg.include, full))
            # The window never stops a large put half way: the receiver acknowledges whole entries only.
            if cursor.seq <= self.journal.head and (self._inflight_bytes < INFLIGHT_BYTES or cursor.in_entry):
                pieces, size, done = await asyncio.to_thread(cursor.read_pieces)
                proto.entries(b"", done)  # checks and records their order; the bytes go below
                writer.writelines(pieces)  # over TLS, no join: a large put's 1 MiB chunks go out as read
                live.sent(self.clock())
                self._inflight.append((proto.sent.last_seq, size))
                self._inflight_bytes += size
                self.sent = Pos(self.epoch, proto.sent.last_seq)
                await writer.drain()
                continue
            await writer.drain()
            now = self.clock()
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
        while True:
            try:
                async with asyncio.timeout(max(0.0, live.deadline() - self.clock())):
                    data = await reader.read(1 << 20)
            except TimeoutError:
                if live.silent(self.clock()):
                    self.counters["silent_peer_drops"] += 1
                    raise PeerSilent(
                        f"no whole frame from the receiver for {live.timeout:g}s (silence_timeout)"
                    ) from None
                continue
            if not data:
                raise ConnectionError("receiver closed the connection")
            proto.receive_data(data)
            while (ev := proto.next_event()) is not None:
                live.heard(self.clock())
                if isinstance(ev, wire.Ack):
                    await self._on_ack(ev)
                elif isinstance(ev, wire.ManifestPart):
                    if ev.id in self._manifests:
                        self._manifests[ev.id][0].extend(ev.entries)
                elif isinstance(ev, wire.ManifestEnd):
                    item = self._manifests.get(ev.id)
                    if item is not None and not item[1].done():
                        item[1].set_result((ev.seq, item[0]))
                elif isinstance(ev, wire.Refused):
                    raise PeerRefused(f"{ev.code}: {ev.reason}")

    async def _on_ack(self, ev: wire.Ack) -> None:
        self.acked = Pos(self.epoch, ev.seq)
        while self._inflight and self._inflight[0][0] <= ev.seq:
            self._inflight_bytes -= self._inflight.popleft()[1]
        if ev.seq >= self.journal.head:
            self.behind_since = None
        for p in ev.problems:
            self.counters["refused_by_receiver"] += 1
            log.warning(
                "send.receiver_problem seq=%d path=%r code=%s reason=%s", p.seq, p.path, p.code, p.reason
            )
            self._on_problem(p.path, p.code)
        self._kick.set()
        await self._notify()
