"""Connections between nodes: TCP, upgraded to TLS 1.3 with mutual authentication pinned by node ID.

Python's ssl module cannot ask for a client certificate without checking it against a trust store, so the
client first announces its (public) certificate in a short plaintext preamble::

    b"STBY1\\n" | u16 BE length | certificate DER

The server refuses at once unless the certificate's ID is the pinned peer ID (logging the ID presented, and
answering the line ``NAK`` so that the client can say why), else answers one byte ``ACK``, then starts
TLS 1.3 trusting exactly that certificate and requiring it: the TLS handshake proves the client holds its
key. The client starts its handshake only after that byte, so no TLS
byte is ever read as part of the preamble. The client checks the server's certificate against its own
pinned ID after the handshake (the handshake proves the server holds that key). Nothing but public
certificates crosses in plaintext.

Whatever else answers the preamble is described in the client's error, so that an operator can tell a
refusal of our ID (``NAK``) from a peer that is not a standby receiver at all (an HTTP server's
``HTTP/1.1 400 Bad Request``, a TLS server's alert) and from one that closed without a word.

``insecure`` mode skips all of this; the config only allows it on loopback addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
from dataclasses import dataclass

from engine.aio import tune_socket
from engine.config import ReceiverConfig, SenderConfig
from engine.errors import PeerRefused, RemoteProtocolError
from engine.identity import Identity, load
from engine.model import node_id
from engine.wire import SenderEvent, SenderProtocol

log = logging.getLogger(__name__)

PREAMBLE = b"STBY1\n"
ACK = b"\x06"
#: The server's answer to a preamble whose ID it does not pin (then it closes). Printable, and unlike any
#: TLS record or the ACK byte, so a client never mistakes it.
NAK = b"STBY1 refused: node ID not pinned\n"
MAX_CERT = 16 * 1024
#: How long, and for how many bytes, the client reads an answer that is not ACK to describe it.
ANSWER_WAIT = 1.0
ANSWER_MAX = 256
#: How long the server waits after NAK for the client to read it and close (a reset could beat it).
NAK_LINGER = 0.5


@dataclass(frozen=True)
class TlsSettings:
    identity: Identity
    peer_id: str


def _context(server: bool, tls: TlsSettings, trust_der: bytes | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(tls.identity.cert_path), str(tls.identity.key_path))
    if server:
        ctx.verify_mode = ssl.CERT_REQUIRED
        assert trust_der is not None
        ctx.load_verify_locations(cadata=trust_der)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # pinned below, after the handshake proved the key
    return ctx


def _peer_der(writer: asyncio.StreamWriter) -> bytes:
    obj = writer.get_extra_info("ssl_object")
    der = obj.getpeercert(binary_form=True) if obj is not None else None
    if not der:
        raise PeerRefused("the peer presented no certificate")
    return bytes(der)


def _where(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return "the other end"


async def _answer(reader: asyncio.StreamReader, first: bytes) -> bytes:
    """What the peer answered instead of ACK: ``first`` and whatever follows it within ANSWER_WAIT, up to a
    line end, EOF or ANSWER_MAX bytes."""
    data = bytearray(first)
    with contextlib.suppress(TimeoutError, OSError):
        async with asyncio.timeout(ANSWER_WAIT):
            while b"\n" not in data and len(data) < ANSWER_MAX:
                more = await reader.read(ANSWER_MAX - len(data))
                if not more:
                    break
                data += more
    return bytes(data)


def describe_answer(data: bytes) -> str:
    """A short, printable account of bytes a peer sent (for an error message): the first line of text in
    quotes, or what kind of bytes they are."""
    if data[:1] == b"\x15" and data[1:2] == b"\x03":
        return "a TLS alert: it speaks TLS, not standby's preamble"
    if data[:1] == b"\x16" and data[1:2] == b"\x03":
        return "a TLS handshake record: it speaks TLS, not standby's preamble"
    line = data.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:  # text cut inside a character at ANSWER_MAX is still text
        text = line[: e.start].decode("utf-8") if e.end == len(line) else ""
    if text and text.isprintable():
        return repr(text[:100] + ("..." if len(text) > 100 else ""))
    return f"{len(data)} bytes that are not text: {data[:16].hex(' ')}{' ...' if len(data) > 16 else ''}"


async def client_upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tls: TlsSettings) -> str:
    """Run the client side on a fresh connection; returns the server's ID (== the pinned one). On any
    failure the connection is closed and the error says what the peer did: refused our ID
    (:class:`PeerRefused`), answered as something else (:class:`RemoteProtocolError`), or closed without a
    word (:class:`ConnectionError`)."""
    try:
        return await _client_upgrade(reader, writer, tls)
    except BaseException:
        writer.transport.abort()
        raise


async def _client_upgrade(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tls: TlsSettings
) -> str:
    where = _where(writer)
    der = tls.identity.cert_der
    writer.write(PREAMBLE + struct.pack(">H", len(der)) + der)
    await writer.drain()
    # RACE: the ClientHello must not share a read with the preamble, or the server's stream buffer would
    # swallow it before TLS starts. The server's ACK byte says it read exactly the preamble.
    try:
        first = await reader.read(1)
    except ConnectionResetError:
        raise ConnectionResetError(
            f"the peer at {where} reset the connection without answering our preamble "
            "(is it a standby receiver?)"
        ) from None
    if not first:
        raise ConnectionError(
            f"the peer at {where} closed the connection without answering our preamble "
            "(is it a standby receiver?)"
        )
    if first != ACK:
        answer = await _answer(reader, first)
        if answer.startswith(NAK):
            raise PeerRefused(
                f"the receiver at {where} refused our node ID {tls.identity.id}: it is not the one pinned "
                "in its [receiver] peer_id"
            )
        raise RemoteProtocolError(
            f"the peer at {where} is not a standby receiver (it answered {describe_answer(answer)})"
        )
    try:
        await writer.start_tls(_context(False, tls, None))
    except (ssl.SSLError, ConnectionError) as e:
        raise PeerRefused(
            f"TLS handshake with the receiver at {where} failed after it accepted our node ID "
            f"(do this node's node.key and node.crt belong together?): {e}"
        ) from None
    presented = node_id(_peer_der(writer))
    if presented != tls.peer_id:
        raise PeerRefused(f"the receiver at {where} presented ID {presented}, not the pinned {tls.peer_id}")
    return presented


async def server_upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tls: TlsSettings) -> str:
    """Run the server side on an accepted connection; returns the client's ID or raises."""
    head = await reader.readexactly(len(PREAMBLE) + 2)
    if head[: len(PREAMBLE)] != PREAMBLE:
        raise RemoteProtocolError("not a standby peer (no TLS preamble: plain TCP or garbage)")
    (n,) = struct.unpack(">H", head[len(PREAMBLE) :])
    if not 0 < n <= MAX_CERT:
        raise RemoteProtocolError(f"certificate length {n} out of range")
    der = await reader.readexactly(n)
    presented = node_id(der)
    if presented != tls.peer_id:
        writer.write(NAK)
        with contextlib.suppress(TimeoutError, OSError):
            await writer.drain()
            # Let the client read the refusal and close first: our caller aborts the connection, and a
            # reset can make the client's OS drop the NAK unread.
            async with asyncio.timeout(NAK_LINGER):
                while await reader.read(4096):
                    pass
        raise PeerRefused(f"peer presented ID {presented}, not the pinned {tls.peer_id}")
    if reader._buffer:  # type: ignore[attr-defined]
        raise RemoteProtocolError("the peer started TLS before the preamble was acknowledged")
    writer.write(ACK)
    await writer.drain()
    try:
        await writer.start_tls(_context(True, tls, der))
    except (ssl.SSLError, ConnectionError) as e:
        raise PeerRefused(f"TLS handshake failed for ID {presented} (key not proven): {e}") from None
    if _peer_der(writer) != der:
        raise PeerRefused(f"peer announced ID {presented} but authenticated with another certificate")
    return presented


def settings_for(section: SenderConfig | ReceiverConfig) -> TlsSettings | None:
    """The TLS settings of a config section: None in (loopback-only) insecure mode."""
    if section.insecure:
        log.warning("transport.insecure plaintext, no authentication (allowed on loopback only)")
        return None
    return TlsSettings(load(section.state_dir), section.peer_id)


@dataclass(slots=True)
class Dialed:
    """A connection to a peer after ``hello``: the streams, the protocol and the peer's first answer."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    proto: SenderProtocol
    answer: SenderEvent


async def dial(
    address: tuple[str, int],
    tls: TlsSettings | None,
    proto: SenderProtocol,
    *,
    connect_timeout: float,
    silence: float,
) -> Dialed:
    """Connect to ``address``, upgrade to TLS (unless insecure), say ``proto``'s hello and read the answer
    (welcome or refuse). The caller owns the writer from here: it aborts it when done. On any error the
    connection is aborted here."""
    host, port = address
    async with asyncio.timeout(connect_timeout):
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    try:
        tune_socket(writer, silence)
        if tls is not None:
            async with asyncio.timeout(connect_timeout):
                await client_upgrade(reader, writer, tls)
        writer.write(proto.hello())
        await writer.drain()
        async with asyncio.timeout(connect_timeout * 2):
            ev = None
            while ev is None:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError(f"{host}:{port} closed the connection during the handshake")
                proto.receive_data(data)
                ev = proto.next_event()
        return Dialed(reader, writer, proto, ev)
    except BaseException:
        writer.transport.abort()
        raise
