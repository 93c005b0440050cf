"""The client side of the transport's door (engine.transport.client_upgrade) against what may really sit at
the peer's address: another service (an HTTP server, an SSH daemon), something that closes at once, a
standby receiver that pins another ID, the right receiver.

The error must say what was seen, so an operator looking at ``send.connect_failed`` / ``send.refused`` can
tell "wrong port" from "pin my ID over there". Tiny servers on 127.0.0.1 (real TCP), the real client code,
a real ``standby receive`` and a real ``standby send`` process.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from engine import identity
from engine.errors import PeerRefused, RemoteProtocolError
from engine.transport import PREAMBLE, TlsSettings, client_upgrade, describe_answer
from tests.pair import Pair, wait_for

pytestmark = pytest.mark.timeout(60)

HTTP_400 = b"HTTP/1.1 400 Bad Request\r\nServer: nginx\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_preamble(reader: asyncio.StreamReader) -> None:
    """Read until the client's preamble and certificate have arrived (nothing is left unread)."""
    head = await reader.readexactly(len(PREAMBLE) + 2)
    await reader.readexactly(int.from_bytes(head[-2:], "big"))


async def http_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_preamble(reader)  # "STBY1" is no request line: a web server answers 400 and closes
    writer.write(HTTP_400)
    await writer.drain()
    writer.close()


async def ssh_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"SSH-2.0-OpenSSH_9.6p1 Debian-4\r\n")  # a daemon that speaks first
    await writer.drain()
    await read_preamble(reader)
    writer.close()


async def binary_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_preamble(reader)
    writer.write(bytes(range(200, 240)))
    await writer.drain()
    writer.close()


async def closes_after_reading(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_preamble(reader)
    writer.close()


async def resets(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_preamble(reader)
    writer.transport.abort()


#: name -> (server, expected error class, pattern the message must match; {where} is 127.0.0.1:PORT).
PEERS: dict[str, tuple[Handler, type[Exception], str]] = {
    "an HTTP server": (
        http_server,
        RemoteProtocolError,
        r"the peer at {where} is not a standby receiver \(it answered 'HTTP/1\.1 400 Bad Request'\)",
    ),
    "an SSH daemon": (
        ssh_server,
        RemoteProtocolError,
        r"the peer at {where} is not a standby receiver \(it answered 'SSH-2\.0-OpenSSH_9\.6p1 Debian-4'\)",
    ),
    "binary garbage": (
        binary_server,
        RemoteProtocolError,
        r"the peer at {where} is not a standby receiver \(it answered 40 bytes that are not text: c8 c9 ca",
    ),
    "a server that closes without a word": (
        closes_after_reading,
        ConnectionError,
        r"the peer at {where} closed the connection without answering our preamble",
    ),
    "a server that resets": (
        resets,
        ConnectionError,
        r"the peer at {where} (reset|closed) the connection without answering our preamble",
    ),
}


async def upgrade_against(handler: Handler, tls: TlsSettings) -> tuple[int, BaseException | str]:
    """Run the real client against a tiny server on 127.0.0.1; returns the port and what the client got."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            async with asyncio.timeout(10):
                return port, await client_upgrade(reader, writer, tls)
        except (OSError, ValueError, RuntimeError, ArithmeticError) as e:
            return port, e
        except (PeerRefused, RemoteProtocolError) as e:
            return port, e
        finally:
            writer.transport.abort()
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
def tls(tmp_path: Path) -> TlsSettings:
    me = identity.create(tmp_path / "me", "me")[0]
    return TlsSettings(me, identity.create(tmp_path / "them", "them")[0].id)


@pytest.mark.parametrize("peer", PEERS.values(), ids=PEERS.keys())
async def test_the_client_says_what_the_peer_was(
    tls: TlsSettings, peer: tuple[Handler, type[Exception], str]
) -> None:
    handler, kind, pattern = peer
    port, got = await upgrade_against(handler, tls)
    assert isinstance(got, kind), f"expected {kind.__name__}, got {got!r}"
    assert not isinstance(got, PeerRefused), f"reported as a refusal of our ID: {got}"
    assert re.search(pattern.format(where=re.escape(f"127.0.0.1:{port}")), str(got)), str(got)
    assert "pinned" not in str(got), f"blames the pinning: {got}"


def test_describe_answer_names_tls_and_cuts_long_lines() -> None:
    assert "TLS alert" in describe_answer(b"\x15\x03\x03\x00\x02\x02\x46")
    assert "TLS handshake record" in describe_answer(b"\x16\x03\x01\x00\x10" + bytes(16))
    long = describe_answer(b"x" * 300 + b"\n")
    assert long == repr("x" * 100 + "..."), long
    assert describe_answer(b"a\x00b") == "3 bytes that are not text: 61 00 62"


# ---- against a real receiver -----------------------------------------------------------------------------


def real_upgrade(port: int, tls: TlsSettings) -> str | BaseException:
    async def go() -> str | BaseException:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            async with asyncio.timeout(10):
                return await client_upgrade(reader, writer, tls)
        except (OSError, PeerRefused, RemoteProtocolError) as e:
            return e
        finally:
            writer.transport.abort()

    return asyncio.run(go())


def test_a_receiver_that_pins_another_id_is_reported_as_refusing_ours(pair: Pair, tmp_path: Path) -> None:
    pair.start("receive")
    receiver_id = identity.load(pair.receiver_state).id
    stranger = identity.create(tmp_path / "stranger", "stranger")[0]
    got = real_upgrade(pair.port, TlsSettings(stranger, receiver_id))
    assert isinstance(got, PeerRefused), repr(got)
    assert f"the receiver at 127.0.0.1:{pair.port} refused our node ID {stranger.id}" in str(got), got
    assert "[receiver] peer_id" in str(got)
    # The control: the pinned sender's key is let in, and learns the receiver's ID.
    assert real_upgrade(pair.port, TlsSettings(identity.load(pair.sender_state), receiver_id)) == receiver_id


# ---- the log line of a real `standby send` ---------------------------------------------------------------


@contextlib.contextmanager
def threaded_http_server() -> Iterator[int]:
    """A tiny HTTP server answering 400 to whatever it reads, in a thread (the sender is another process)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    conn.recv(4096)
                    conn.sendall(HTTP_400)
                    conn.shutdown(socket.SHUT_WR)
                    while conn.recv(4096):
                        pass

    t = threading.Thread(target=serve, name="http-400")
    t.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        t.join(10)
        listener.close()


def point_sender_at(pair: Pair, port: int) -> None:
    text = pair.config.read_text("utf-8")
    direct = f'peer = "127.0.0.1:{pair.port}"'
    assert text.count(direct) == 1, text
    pair.config.write_text(text.replace(direct, f'peer = "127.0.0.1:{port}"'), "utf-8")


def test_standby_send_logs_that_an_http_server_is_not_a_receiver(pair: Pair) -> None:
    with threaded_http_server() as port:
        point_sender_at(pair, port)
        pair.start("send", wait=False)
        wanted = (
            f"the peer at 127.0.0.1:{port} is not a standby receiver (it answered 'HTTP/1.1 400 Bad Request')"
        )
        wait_for(lambda: wanted in pair.log("send"), 20, "the sender to say what answered")
        assert pair.stop("send") == 0, pair.log("send")
    log = pair.log("send")
    line = next(x for x in log.splitlines() if wanted in x)
    assert "send.connect_failed" in line, line
    assert "refused our node ID" not in log and "pinned" not in log, log


def test_standby_send_logs_a_receiver_refusing_its_id_with_the_id(pair: Pair, tmp_path: Path) -> None:
    # The receiver pins another sender's ID: the sender's log names its own ID and where to pin it.
    sender_id = identity.load(pair.sender_state).id
    text = pair.config.read_text("utf-8")
    other = identity.create(tmp_path / "other", "other")[0].id
    pair.config.write_text(text.replace(f'peer_id = "{sender_id}"', f'peer_id = "{other}"'), "utf-8")
    pair.start("receive")
    pair.start("send", wait=False)
    wanted = f"the receiver at 127.0.0.1:{pair.port} refused our node ID {sender_id}"
    wait_for(lambda: wanted in pair.log("send"), 20, "the sender to log the refusal")
    line = next(x for x in pair.log("send").splitlines() if wanted in x)
    assert "send.refused" in line and "[receiver] peer_id" in line, line
    assert pair.stop("send") == 0
