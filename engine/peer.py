"""The agent-to-agent channel: one connection we dial to the peer's agent, one the peer dials to ours.

Each agent sends its heartbeats and its requests (fence, relayed commands) on the connection it dialed,
and answers (fence acknowledgements, command replies) on whichever connection to the peer is up. Every
event from either connection goes to ``on_event`` in arrival order. The conversation itself is
:class:`engine.wire.AgentProtocol`; this module only moves its bytes (TLS as replication, same port).

Must not: decide anything (the role machine does), or keep state beyond the open connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from engine import failover, wire
from engine.errors import PeerRefused, PeerSilent, RemoteProtocolError
from engine.transport import TlsSettings, dial

log = logging.getLogger(__name__)

AgentEvent = wire.AgentEvent


class _Conn:
    def __init__(self, writer: asyncio.StreamWriter, proto: wire.AgentProtocol) -> None:
        self.writer = writer
        self.proto = proto

    def send(self, data: bytes) -> bool:
        if self.writer.is_closing():
            return False
        self.writer.write(data)
        return True


class PeerChannel:
    def __init__(
        self,
        address: tuple[str, int],
        tls: TlsSettings | None,
        node: str,
        *,
        silence: float,
        on_event: Callable[[AgentEvent], None],
        clock: Callable[[], float] = time.monotonic,
        connect_timeout: float = 5.0,
        retry_max: float = 5.0,
    ) -> None:
        self.address = address
        self.tls = tls
        self.node = node
        self.silence = silence
        self.on_event = on_event
        self.clock = clock
        self.connect_timeout = connect_timeout
        self.retry_max = retry_max
        self._out: _Conn | None = None  # the connection we dialed
        self._in: _Conn | None = None  # the connection the peer dialed
        self.last_error: str | None = None
        #: The last dial was refused by the peer's host (a reset: the host is up, nothing listens on the
        #: agent's port). A dead host or a cut network answers nothing: a timeout, never this.
        self.refused = False
        self._replies: dict[str, asyncio.Future[wire.AgentReply]] = {}

    @property
    def connected(self) -> bool:
        return self._out is not None

    # -- sending ------------------------------------------------------------------------------------------
    def heartbeat(self, hb: failover.Heartbeat) -> bool:
        """On both connections: each then carries traffic both ways (neither looks silent), and a
        heartbeat still arrives while one of them is being re-dialed. The role machine drops repeats."""
        sent = False
        for conn in (self._out, self._in):
            if conn is not None:
                sent = conn.send(conn.proto.heartbeat(hb)) or sent
        return sent

    def request_fence(self, epoch: int, token: failover.Token) -> bool:
        return self._out is not None and self._out.send(self._out.proto.fence_request(epoch, token))

    def fence_ack(self, epoch: int, token: failover.Token, drained: bool) -> bool:
        for conn in (self._in, self._out):
            if conn is not None and conn.send(conn.proto.fence_ack(epoch, token, drained)):
                return True
        return False

    async def command(self, name: str, args: dict[str, Any], timeout: float = 10.0) -> wire.AgentReply:
        """Relay an operator command to the peer's agent and wait for its reply."""
        conn = self._out
        if conn is None:
            raise ConnectionError("the peer's agent cannot be reached")
        fut: asyncio.Future[wire.AgentReply] = asyncio.get_running_loop().create_future()
        self._replies[name] = fut
        conn.send(conn.proto.command(name, args))
        try:
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            self._replies.pop(name, None)

    async def send_blob(self, offset: int, data: bytes) -> None:
        """A piece of a file announced by a command, on the dialed connection, waiting while the
        connection's buffer is full (a file is never held whole in memory)."""
        conn = self._out
        if conn is None or not conn.send(conn.proto.blob(offset, data)):
            raise ConnectionError("the peer's agent cannot be reached")
        await conn.writer.drain()

    def reply(self, name: str, ok: bool, text: str, data: dict[str, Any] | None = None) -> None:
        if self._in is not None:
            self._in.send(self._in.proto.reply(name, ok, text, data))

    # -- the dialed connection ---------------------------------------------------------------------------
    async def run(self) -> None:
        backoff = 0.2
        while True:
            try:
                await self._dial()
            except (OSError, EOFError, RemoteProtocolError, TimeoutError, PeerRefused) as e:
                self.refused = isinstance(e, ConnectionRefusedError)
                text = str(e) or type(e).__name__
                if text != self.last_error:
                    log.info("agent.peer_link_down peer=%s:%d reason=%s", *self.address, text)
                self.last_error = text
            finally:
                self._out = None
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.retry_max)

    async def _dial(self) -> None:
        hs = wire.SenderProtocol(self.node, 0, role="agent")
        d = await dial(self.address, self.tls, hs, connect_timeout=self.connect_timeout, silence=self.silence)
        try:
            if isinstance(d.answer, wire.Refused):
                raise PeerRefused(f"{d.answer.code}: {d.answer.reason}")
            proto = wire.AgentProtocol(hs.take_buffered())
            self._out = _Conn(d.writer, proto)
            self.refused = False
            if self.last_error is not None:
                log.info("agent.peer_link_up peer=%s:%d", *self.address)
            self.last_error = None
            await self._read(d.reader, self._out)
        finally:
            d.writer.transport.abort()

    # -- the connection the peer dialed (handed over by the receiver's listener) --------------------------
    async def serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, buffered: bytes, addr: str
    ) -> None:
        conn = _Conn(writer, wire.AgentProtocol(buffered))
        self._in = conn
        log.info("agent.peer_connected peer=%s", addr)
        try:
            await self._read(reader, conn)
        except (OSError, EOFError, RemoteProtocolError, TimeoutError) as e:
            log.info("agent.peer_disconnected peer=%s reason=%s", addr, str(e) or type(e).__name__)
        finally:
            if self._in is conn:
                self._in = None

    async def _read(self, reader: asyncio.StreamReader, conn: _Conn) -> None:
        """Events until the connection ends; a connection silent for the timeout is dropped."""
        live = wire.Liveness(self.silence, self.clock())
        while True:
            # Whatever came with the handshake is parsed first.
            while (ev := conn.proto.next_event()) is not None:
                live.heard(self.clock())
                if isinstance(ev, wire.AgentReply):
                    fut = self._replies.get(ev.name)
                    if fut is not None and not fut.done():
                        fut.set_result(ev)
                    continue
                self.on_event(ev)
            try:
                async with asyncio.timeout(max(0.0, live.deadline() - self.clock())):
                    data = await reader.read(1 << 16)
            except TimeoutError:
                if live.silent(self.clock()):
                    raise PeerSilent(f"no whole frame from the peer's agent for {self.silence:g}s") from None
                continue
            if not data:
                raise ConnectionError("the peer closed the connection")
            conn.proto.receive_data(data)
            with contextlib.suppress(ConnectionError):
                await conn.writer.drain()
