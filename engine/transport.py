"""Connections between nodes: TCP, upgraded to TLS 1.3 with mutual authentication pinned by node ID.

Python's ssl module cannot ask for a client certificate without checking it against a trust store, so the
client first announces its (public) certificate in a short plaintext preamble::

    b"STBY1\\n" | u16 BE length | certificate DER

The server refuses at once unless the certificate's ID is the pinned peer ID (logging the ID presented),
answers one byte ``ACK``, then starts TLS 1.3 trusting exactly that certificate and requiring it: the TLS
handshake proves the client holds its key. The client starts its handshake only after that byte, so no TLS
byte is ever read as part of the preamble. The client checks the server's certificate against its own
pinned ID after the handshake (the handshake proves the server holds that key). Nothing but public
certificates crosses in plaintext.

``insecure`` mode skips all of this; the config only allows it on loopback addresses.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
from dataclasses import dataclass

from engine.config import ReceiverConfig, SenderConfig
from engine.errors import PeerRefused, RemoteProtocolError
from engine.identity import Identity, load, node_id

log = logging.getLogger(__name__)

PREAMBLE = b"STBY1\n"
ACK = b"\x06"
MAX_CERT = 16 * 1024


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


async def client_upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tls: TlsSettings) -> str:
    """Run the client side on a fresh connection; returns the server's ID (== the pinned one)."""
    der = tls.identity.cert_der
    writer.write(PREAMBLE + struct.pack(">H", len(der)) + der)
    await writer.drain()
    # RACE: the ClientHello must not share a read with the preamble, or the server's stream buffer would
    # swallow it before TLS starts. The server's ACK byte says it read exactly the preamble.
    if await reader.read(1) != ACK:
        raise PeerRefused("the receiver refused our node ID (is it pinned in its [receiver] peer_id?)")
    try:
        await writer.start_tls(_context(False, tls, None))
    except (ssl.SSLError, ConnectionError) as e:
        raise PeerRefused(f"TLS handshake failed (is our ID pinned on the receiver?): {e}") from None
    presented = node_id(_peer_der(writer))
    if presented != tls.peer_id:
        raise PeerRefused(f"the receiver presented ID {presented}, not the pinned {tls.peer_id}")
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
