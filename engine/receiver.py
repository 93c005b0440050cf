"""The receiver: a thin asyncio loop around :class:`engine.wire.ReceiverProtocol` and the applier.

One sender at a time streams into the replica; observers (``standby verify``) may ask for manifests.
Records are applied strictly in order, in groups: everything that arrived while the previous group was
being made durable forms the next group. A group is acknowledged only after its files, its folders and the
position are durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any, TypeVar

from engine import checkpoint, wire
from engine.aio import tune_socket
from engine.apply import Applier, LargePut, PendingOp, PositionFile
from engine.config import ReceiverConfig
from engine.errors import ApplyError, PathRejected, PeerRefused, RemoteProtocolError
from engine.guards import GUARD_MAX_BYTES, GuardCheck
from engine.history import GuardHistory
from engine.journal import Journal
from engine.model import PROTOCOL_VERSION, Change, FileMeta, Op, check_relpath
from engine.scan import SMALL_FILE, HashCache, Manifest
from engine.status import write_status_quiet
from engine.targets import receiver_target
from engine.transport import TlsSettings, server_upgrade

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Takes over an agent's connection: (reader, writer, bytes already received behind the hello, address).
AgentHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes, str], Awaitable[None]]

#: How often (seconds) the replica's hash cache is saved while changes are being applied.
CACHE_SAVE_INTERVAL = 60.0

#: Apply a group once it holds this many records or bytes, even if more are waiting.
GROUP_RECORDS = 4096
GROUP_BYTES = 32 << 20


class Receiver:
    def __init__(
        self,
        cfg: ReceiverConfig,
        check: GuardCheck | None = None,
        tls: TlsSettings | None = None,
    ) -> None:
        self.cfg = cfg
        self.tls = tls
        self.check: GuardCheck | None = check
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        skip = None
        if cfg.share is None:
            cfg.target.mkdir(parents=True, exist_ok=True)
            skip = cfg.state_dir.resolve() if _inside(cfg.state_dir, cfg.target) else None
        self.position = PositionFile(cfg.state_dir / "position", fsync=cfg.fsync)
        self.cache = HashCache.load(cfg.state_dir / "hashcache")
        self.applier = Applier(
            receiver_target(cfg, skip),
            fsync=cfg.fsync,
            threads=cfg.fsync_threads,
            cache=self.cache,
            check=check,
        )
        self.applier.max_path_chars = cfg.max_path_chars
        self.applier.max_path_depth = cfg.max_path_depth
        if check is not None:
            history = GuardHistory(cfg.state_dir / "guard-history", cfg.guard_history, cfg.fsync)
            self.history: GuardHistory | None = history

            def keep(c: Change, data: bytes) -> None:
                if check.guarded(c.path):
                    history.record(c.path, c.seq, c.mtime_ns, data)

            self.applier.on_put = keep
            self.applier.on_rename = history.rename  # the versions follow a renamed file or folder
        else:
            self.history = None
        #: What this side applied, journaled again with checkpoints beside it (``[receiver] keep_journal``):
        #: the passive can rebuild any moment of its window by itself. Its seqs are its own.
        self.kept: Journal | None = None  # opened by serve()
        self._housekeeping = time.monotonic()
        self._cadence = checkpoint.Cadence()
        self.journal = self.position.current.journal
        self.seq = self.position.current.seq
        self.epoch = self.position.current.epoch
        self.sender: dict[str, Any] | None = None
        self._sender_conn: _Conn | None = None
        # Held by a group's apply and by manifest builds: both touch the hash cache and the replica.
        self.apply_lock = threading.Lock()
        self.counters = {
            "applied": 0,
            "groups": 0,
            "problems": 0,
            "refused_peers": 0,
            "silent_peer_drops": 0,
            "protocol_errors": 0,
            "apply_errors": 0,
        }
        self.last_apply = 0.0
        self.started = time.time()
        #: One task per connection (its writer to abort it): stopping waits for them, never polls.
        self._conns: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self._server: asyncio.Server | None = None
        self.bound: tuple[str, int] | None = None
        #: Set by a node's agent: it takes over connections whose hello says role "agent" (the bytes that
        #: came behind the hello are handed along), and says when senders may stream (only while the node
        #: is passive or promoting). Without an agent, agents are refused and senders always accepted.
        self.on_agent: AgentHandler | None = None
        self.accept_senders: Callable[[], bool] = lambda: True

    # -- lifecycle ------------------------------------------------------------------------------------------
    async def serve(self, stop: asyncio.Event) -> None:
        if self.cfg.keep_journal and self.kept is None:
            self.kept = await asyncio.to_thread(
                Journal.open, self.cfg.state_dir / "journal", fsync=self.cfg.fsync
            )
        try:
            removed = await asyncio.to_thread(self.applier.clean_temps)
        except OSError as e:
            raise ApplyError(f"the target {self.cfg.location} cannot be used: {e.strerror or e}") from None
        if removed:
            log.info("receiver.temps_removed count=%d", removed)
        host, port = self.cfg.listen
        self._server = await asyncio.start_server(self._handle, host, port, limit=1 << 20)
        sock = self._server.sockets[0].getsockname()
        self.bound = (sock[0], sock[1])
        log.info(
            "receiver.listening address=%s:%d target=%s seq=%d epoch=%d",
            sock[0],
            sock[1],
            self.cfg.location,
            self.seq,
            self.epoch,
        )
        status_task = asyncio.create_task(self._status_loop())
        try:
            await stop.wait()
        finally:
            log.info("receiver.stopping")
            self._server.close()
            for w in list(self._conns.values()):
                w.transport.abort()
            # The group being applied finishes (and its position is saved) before anything is closed.
            if self._conns:
                await asyncio.wait(set(self._conns), timeout=120)
            status_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await status_task
            if self._conns:
                log.error("receiver.stop_forced (a group is still being applied; it will be replayed)")
            else:
                with self.apply_lock:
                    self._save()
                    self.applier.close()
                    self.position.close()
                    if self.kept is not None:
                        self.kept.close()
                log.info("receiver.stopped seq=%d", self.seq)

    def keep(self, ops: list[PendingOp], not_applied: AbstractSet[int] = frozenset()) -> None:
        """Journal a group just applied, in order, durably (one commit), leaving out the records the applier
        reported a problem with (nothing of them is in the tree). Caller holds ``apply_lock``. A large
        put's content is read back from the file it became."""
        kept = self.kept
        if kept is None or not ops:
            return
        for op in ops:
            c = op.change
            if c.seq in not_applied:
                continue
            if c.op is Op.PUT and op.data is None and op.temp is not None:
                appender = kept.begin_put(c)
                try:
                    for chunk in self.applier.target.read_chunks(c.path):
                        appender.write(chunk)
                except OSError:
                    appender.abort()
                    raise
                appender.finish()
            else:
                kept.append(c, op.data if c.op is Op.PUT else None)
        kept.commit()

    def housekeeping(self) -> None:
        """A checkpoint of the kept journal when due, those the window no longer needs deleted, and the
        journal pruned up to the checkpoint covering the window's first moment. Worker thread."""
        kept, cfg = self.kept, self.cfg
        if kept is None or not cfg.checkpoint_minutes:
            return
        with self.apply_lock:
            head = kept.head  # committed
        cutoff = checkpoint.retention_cutoff(
            kept, cfg.state_dir, cfg.journal_retain_hours, cfg.journal_retain_gb, time.time()
        )
        floor, _newest = checkpoint.chores(
            cfg.state_dir, kept.id, kept.first_seq, head, cutoff, cfg.checkpoint_minutes, self._cadence
        )
        with self.apply_lock:
            kept.prune(min(floor, kept.head), cutoff)

    def _save(self) -> None:
        try:
            self.cache.save(self.cfg.state_dir / "hashcache")
        except OSError as e:
            log.warning("hashcache.save_failed error=%s (costs only re-hashing after a restart)", e)
        write_status_quiet(self.cfg.state_dir, self.status())

    async def _status_loop(self) -> None:
        saved_at, saved_applied = time.monotonic(), self.counters["applied"]
        every = min(60.0, self.cfg.checkpoint_minutes * 60)
        chores: asyncio.Future[None] | None = None
        while True:
            await asyncio.to_thread(write_status_quiet, self.cfg.state_dir, self.status())
            due = self.kept is not None and every and time.monotonic() - self._housekeeping >= every
            if due and (chores is None or chores.done()):  # aside: applying never waits for a checkpoint
                self._housekeeping = time.monotonic()
                chores = asyncio.ensure_future(asyncio.to_thread(self.housekeeping))
            # The hash cache is also saved now and then, so that a restart after a crash does not re-hash
            # the whole replica for its first manifest (a stale entry is harmless: it is keyed on the stat).
            now = time.monotonic()
            if now - saved_at >= CACHE_SAVE_INTERVAL and self.counters["applied"] != saved_applied:
                saved_at, saved_applied = now, self.counters["applied"]
                try:
                    await asyncio.to_thread(self.cache.save, self.cfg.state_dir / "hashcache")
                except OSError as e:
                    log.warning("hashcache.save_failed error=%s", e)
            await asyncio.sleep(1.0)

    def status(self) -> dict[str, Any]:
        return {
            "role": "receiver",
            "node": self.cfg.node,
            "listen": "{}:{}".format(*(self.bound or self.cfg.listen)),
            "target": self.cfg.location,
            "connected": self.sender is not None,
            "peer": self.sender,
            "journal": self.journal,
            "applied_seq": self.seq,
            "epoch": self.epoch,
            "last_apply": self.last_apply,
            "counters": dict(self.counters),
            "started": self.started,
            "transport": "plaintext (insecure, loopback only)" if self.tls is None else "TLS 1.3, pinned",
        }

    async def take_over_silent(self, new: _Conn) -> bool:
        """A sender connection silent for longer than silence_timeout is presumed dead (a host that
        rebooted, a cut without FIN): close it and let ``new`` in, once its in-flight group is done."""
        old = self._sender_conn
        if old is None or time.monotonic() - old.last_rx < self.cfg.silence_timeout:
            return False
        log.warning(
            "receiver.takeover peer=%s (the connection from %s was silent for %.0f s)",
            new.addr,
            old.addr,
            time.monotonic() - old.last_rx,
        )
        old.writer.transport.abort()
        if old.task is not None:  # its in-flight group finishes and its position is saved first
            await asyncio.wait({old.task}, timeout=60)
        return self.sender is None

    # -- one connection -------------------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        addr = f"{peer[0]}:{peer[1]}" if peer else "?"
        task = asyncio.current_task()
        assert task is not None
        self._conns[task] = writer
        conn = _Conn(self, reader, writer, addr)
        conn.task = task
        try:
            await conn.run()
        except RemoteProtocolError as e:
            if conn.admitted:  # an admitted peer that broke the protocol
                self.counters["protocol_errors"] += 1
                log.warning("receiver.protocol_error peer=%s error=%s", addr, e)
            else:  # never a valid handshake: plain TCP, garbage, TLS without the preamble
                self.counters["refused_peers"] += 1
                log.warning("receiver.refused peer=%s reason=%s", addr, e)
        except ApplyError as e:
            self.counters["apply_errors"] += 1
            log.error(
                "receiver.apply_error peer=%s error=%s (not acknowledged; the sender will resend)", addr, e
            )
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as e:
            log.info("receiver.disconnected peer=%s reason=%s", addr, e)
        finally:
            # RACE: the sender's place is free before the cleanup below waits on a worker thread (a sender
            # reconnecting at once is not turned away as "busy"), and the bookkeeping runs even if that
            # wait is cancelled.
            if conn.is_sender:
                self.sender = None
                self._sender_conn = None
            writer.transport.abort()
            try:  # on a worker thread: on a share each removal is a call to the server
                await asyncio.to_thread(conn.cleanup)
            except OSError as e:
                log.warning("receiver.cleanup_failed error=%s (temporary files go at the next start)", e)
            finally:
                self._conns.pop(task, None)


class _Conn:
    def __init__(
        self, rx: Receiver, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, addr: str
    ) -> None:
        self.rx = rx
        self.reader = reader
        self.writer = writer
        self.addr = addr
        self.proto = wire.ReceiverProtocol(rx.cfg.node, max_frame=rx.cfg.max_frame_mb << 20)
        self.is_sender = False
        self.group: list[PendingOp] = []
        self.group_bytes = 0
        self.cur: Any = None  # the put whose chunks are arriving: bytearray parts or a LargePut
        self.cur_parts: list[bytes] = []
        self.cur_skip = ""  # why the put whose chunks are arriving is refused ("": it is not)
        self._refusals: list[wire.Problem] = []
        #: Applying the groups gathered so far (at most one such task per connection).
        self._applying: asyncio.Task[None] | None = None
        self._failed: BaseException | None = None
        self.peer_id = ""
        self.last_rx = time.monotonic()
        self.task: asyncio.Task[Any] | None = None
        #: The handshake completed and the peer was welcomed (until then a fault is a refusal).
        self.admitted = False

    def cleanup(self) -> None:
        if isinstance(self.cur, LargePut):
            self.cur.discard()
        self.cleanup_ops(self.group)

    def cleanup_ops(self, ops: list[PendingOp]) -> None:
        """Remove the temporary files of large puts that will not be applied."""
        for op in ops:
            if op.temp is not None:
                with contextlib.suppress(OSError):
                    self.rx.applier.target.unlink_quiet(op.temp)

    async def run(self) -> None:
        cfg = self.rx.cfg
        async with asyncio.timeout(cfg.handshake_timeout):
            if self.rx.tls is not None:
                try:
                    self.peer_id = await server_upgrade(self.reader, self.writer, self.rx.tls)
                except PeerRefused as e:
                    self.rx.counters["refused_peers"] += 1
                    log.warning("receiver.refused peer=%s reason=%s", self.addr, e)
                    return
            hello = None
            while hello is None:
                data = await self.reader.read(65536)
                if not data:
                    return
                self.proto.receive_data(data)
                ev = self.proto.next_event()
                if ev is not None:
                    assert isinstance(ev, wire.Hello)
                    hello = ev
        if not await self._admit(hello):
            return
        tune_socket(self.writer, cfg.silence_timeout)
        if hello.role == "agent":
            assert self.rx.on_agent is not None
            await self.rx.on_agent(self.reader, self.writer, self.proto.take_buffered(), self.addr)
            return
        live = wire.Liveness(cfg.silence_timeout, time.monotonic())
        # The heartbeat runs beside the stream loop, so that a long manifest walk or a slow group apply
        # (the loop waits for it) never looks like a dead receiver to the sender.
        beat = asyncio.create_task(self._heartbeat(live.interval))
        try:
            await self._stream(live)
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
            # The group being applied finishes (and its position is saved) however the connection ended;
            # an error it raised is the one reported.
            if self._applying is not None:
                await asyncio.wait({self._applying})
            if self._failed is not None:
                raise self._failed

    async def _heartbeat(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.writer.write(self.proto.pong(0))

    async def _stream(self, live: wire.Liveness) -> None:
        while True:
            try:
                async with asyncio.timeout(max(0.0, live.deadline() - time.monotonic())):
                    data = await self.reader.read(1 << 20)
            except TimeoutError:
                if not live.silent(time.monotonic()):
                    continue
                self.rx.counters["silent_peer_drops"] += 1
                log.warning(
                    "receiver.peer_silent peer=%s after=%gs (no whole frame; dropping the connection)",
                    self.addr,
                    live.timeout,
                )
                await self._commit()
                return
            if not data:
                await self._commit()
                return
            self.proto.receive_data(data)
            heard = False
            while (ev := self.proto.next_event()) is not None:
                heard = True
                self.last_rx = time.monotonic()
                await self._on_event(ev)
                if len(self.group) >= GROUP_RECORDS or self.group_bytes >= GROUP_BYTES:
                    await self._commit()  # backpressure: at most one group gathers while one is applied
            # What arrived is applied at once, or as soon as the group being applied is durable; reading
            # goes on meanwhile (pipelined).
            self._start_apply()
            if heard:
                # Counted from now: time spent above (a manifest walk, waiting for a group) was ours, not
                # the peer's silence. Bytes that completed no frame are not life.
                self.last_rx = time.monotonic()
                live.heard(self.last_rx)

    async def _admit(self, hello: wire.Hello) -> bool:
        rx = self.rx
        refuse = None
        if hello.version != PROTOCOL_VERSION:
            refuse = ("version", f"protocol version {hello.version} is not supported")
        elif hello.role == "sender" and rx.sender is not None and not await rx.take_over_silent(self):
            refuse = (
                "busy",
                f"another sender ({rx.sender['node']} from {rx.sender['address']}) is connected",
            )
        elif hello.role == "agent" and rx.on_agent is None:
            refuse = ("role", "no agent runs here (a `standby receive`, not a `standby run`)")
        elif hello.role == "sender" and not rx.accept_senders():
            refuse = ("role", "this node is not passive: it takes no replication stream")
        elif hello.role == "sender" and hello.epoch < rx.epoch:
            refuse = (
                "epoch",
                f"epoch {hello.epoch} is lower than {rx.epoch}, the highest this receiver has "
                "seen: a newer active exists (fenced)",
            )
        if refuse is not None:
            rx.counters["refused_peers"] += 1
            log.warning(
                "receiver.refused peer=%s node=%r code=%s reason=%s",
                self.addr,
                hello.node,
                refuse[0],
                refuse[1],
            )
            self.writer.write(self.proto.refuse(*refuse))
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()
            return False
        if hello.role == "sender":
            self.is_sender = True
            rx._sender_conn = self
            rx.sender = {"node": hello.node, "address": self.addr, "epoch": hello.epoch, "since": time.time()}
            if hello.epoch > rx.epoch:
                rx.epoch = hello.epoch
                await asyncio.to_thread(rx.position.save, rx.journal, rx.seq, rx.epoch)
                log.info("receiver.epoch_raised epoch=%d", rx.epoch)
        log.info(
            "receiver.connected peer=%s node=%r role=%s epoch=%d",
            self.addr,
            hello.node,
            hello.role,
            hello.epoch,
        )
        self.writer.write(self.proto.welcome(rx.journal, rx.seq, rx.epoch))
        self.admitted = True
        await self.writer.drain()
        return True

    async def _on_event(self, ev: wire.ReceiverEvent) -> None:
        rx = self.rx
        if isinstance(ev, wire.StreamStart):
            await self._commit()  # the position moves below: what came before is applied first
            if ev.journal != rx.journal or ev.first != rx.seq + 1:
                log.info(
                    "receiver.stream_restart journal=%s from=%d (had journal=%s seq=%d)",
                    ev.journal,
                    ev.first,
                    rx.journal or "-",
                    rx.seq,
                )
            rx.journal = ev.journal
            rx.seq = ev.first - 1
        elif isinstance(ev, wire.EntryHeader):
            c = ev.change
            if c.op is Op.RENAME:
                # INVARIANT: a rename is a group of its own. Its effect depends on what exists, so replaying
                # it together with later records (after a crash before the position was saved) could move
                # a file those records had put in place. Alone, a replayed rename finds its work done.
                await self._commit()
                self._add(PendingOp(c), 64)
                await self._commit()
                return
            if c.op is not Op.PUT or c.chunks == 0:
                self._add(PendingOp(c, data=b"" if c.op is Op.PUT else None), 64)
                return
            guarded = rx.check is not None and rx.check.guarded(c.path)
            if guarded and c.size > GUARD_MAX_BYTES:
                self.cur, self.cur_skip = c, "guarded file too large to check"
                return
            if c.size <= SMALL_FILE or guarded:  # guarded files are checked whole, in memory
                self.cur, self.cur_parts = c, []
                return
            await self._commit()  # a large put starts a group of its own
            try:
                self.cur = await self._on_target(rx.applier.begin_large, c)
                self.cur_skip = ""
            except PathRejected as e:
                self.cur, self.cur_skip = c, e.reason
        elif isinstance(ev, wire.Chunk):
            if isinstance(self.cur, LargePut):
                await self._on_target(self.cur.write, ev.data)
                if ev.last:
                    large, self.cur = self.cur, None
                    reason = await self._on_target(large.finish)
                    self._add(PendingOp(large.change, temp=None if reason else large.temp), 0, refused=reason)
                    await self._commit()
            else:
                if not self.cur_skip:
                    self.cur_parts.append(ev.data)
                if ev.last:
                    # INVARIANT: a record joins a group only once it has been received whole (a refused
                    # one too): a group may be applied, and acknowledged, while the next record arrives.
                    c, self.cur = self.cur, None
                    if self.cur_skip:
                        self._add(PendingOp(c, data=None), 0, refused=self.cur_skip)
                    else:
                        self._add(PendingOp(c, data=b"".join(self.cur_parts)), c.size)
                    self.cur_parts, self.cur_skip = [], ""
        elif isinstance(ev, wire.ManifestRequest):
            await self._commit()
            try:
                include = [check_relpath(p) for p in ev.include]
            except PathRejected as e:
                raise RemoteProtocolError(f"manifest request: {e}") from None

            # Parts are sent as the tree is walked (the sender decodes one while the next is made), each
            # encoded as its entries come: a manifest of 100,000 entries is never held as objects.
            loop = asyncio.get_running_loop()
            parts: asyncio.Queue[bytes | None] = asyncio.Queue()

            def manifest() -> list[str]:
                edits: list[str] = []

                def noting(entries: Iterator[FileMeta]) -> Iterator[FileMeta]:
                    for e in entries:
                        if e.flags:
                            edits.append(e.path)
                        yield e

                with rx.apply_lock:
                    # A full request (verify --full) hashes every file and leaves the cache alone.
                    found = rx.applier.target.manifest(
                        include, rx.cache, Manifest({}, [], []), True, full=ev.full
                    )
                    for part in self.proto.manifest_parts(ev.id, noting(found)):
                        loop.call_soon_threadsafe(parts.put_nowait, part)
                return edits

            walking = asyncio.ensure_future(self._on_target(manifest))
            # The end mark, however the walk ends (also when it fails before its thread runs it): it comes
            # after every part, whose puts the thread scheduled before it returned.
            walking.add_done_callback(lambda _f: parts.put_nowait(None))
            try:
                while (part := await parts.get()) is not None:
                    self.writer.write(part)
                    await self.writer.drain()
            except BaseException:
                walking.add_done_callback(_retrieved)  # the walk ends by itself; its result is not wanted
                raise
            edits = await walking  # the replica failing part way: its error, and no end of manifest
            for path in edits:
                log.warning(
                    "replica.local_edit path=%r (the replica is read-only; it will be repaired)", path
                )
            self.writer.write(self.proto.manifest_end(ev.id, rx.seq))
            await self.writer.drain()
        elif isinstance(ev, wire.Ping):
            self.writer.write(self.proto.pong(ev.ts))

    async def _on_target(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a worker thread; the replica failing (a full disk, a share gone) is the
        ApplyError it is, not a lost peer."""
        try:
            return await asyncio.to_thread(fn, *args)
        except OSError as e:
            raise ApplyError(f"the target {self.rx.cfg.location}: {e.strerror or e}") from e

    def _add(self, op: PendingOp, size: int, refused: str | None = None) -> None:
        if refused is not None:
            op = PendingOp(op.change, data=None, temp=None)
            self.group.append(op)
            self._refusals.append(wire.Problem(op.change.seq, op.change.path, "refused", refused))
            log.warning("apply.refused seq=%d path=%r reason=%s", op.change.seq, op.change.path, refused)
        else:
            self.group.append(op)
        self.group_bytes += size

    async def _commit(self) -> None:
        """Apply everything gathered so far and wait until it is durable and acknowledged."""
        while self.group or self._applying is not None:
            self._start_apply()
            if self._applying is not None:
                await asyncio.shield(self._applying)

    def _start_apply(self) -> None:
        if self._failed is not None:
            raise self._failed
        if self._applying is None and self.group:
            self._applying = asyncio.create_task(self._apply_groups())
            self._applying.add_done_callback(_retrieved)

    async def _apply_groups(self) -> None:
        """Apply groups one after the other, in order, until nothing is waiting. Each is everything that
        arrived while the one before was being made durable.

        INVARIANT: ``_applying`` is this task exactly while it runs: it is cleared in the same step that
        finds nothing more to apply, so no group can be left waiting behind a finished task."""
        rx = self.rx
        try:
            while self.group:
                group, self.group, self.group_bytes = self.group, [], 0
                refused = {p.seq for p in self._refusals}
                problems = list(self._refusals)
                self._refusals.clear()
                todo = [op for op in group if op.change.seq not in refused]
                last = group[-1].change.seq

                def critical(todo: list[PendingOp] = todo, last: int = last) -> list[wire.Problem]:
                    # One call in a worker thread: apply, then persist the position. Never split.
                    with rx.apply_lock:
                        res = rx.applier.apply_batch(todo)
                        # Before the position: a crash in between journals the group twice (harmless).
                        rx.keep(todo, {p.seq for p in res.problems})
                        rx.position.save(rx.journal, last, rx.epoch)
                    return res.problems

                try:
                    problems += await asyncio.shield(asyncio.to_thread(critical))
                except asyncio.CancelledError:
                    raise  # the thread may still be applying; leftovers are removed at the next start
                except BaseException:
                    await asyncio.to_thread(self.cleanup_ops, group)
                    raise
                rx.seq = last
                rx.counters["applied"] += len(group)
                rx.counters["groups"] += 1
                rx.counters["problems"] += len(problems)
                rx.last_apply = time.time()
                self.writer.write(self.proto.ack(last, problems))
        except BaseException as e:
            # Nothing more is applied or acknowledged on this connection; run() raises the error.
            self._failed = e
            self.writer.transport.abort()
            raise
        finally:
            self._applying = None


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Done callback: the error, if any, is raised by the connection's run(); mark it retrieved here."""
    if not task.cancelled():
        task.exception()


def _inside(p: Path, root: Path) -> bool:
    try:
        p.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False
