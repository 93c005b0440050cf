"""The transport's door: a real receiver process (``standby receive``) against raw, hostile asyncio clients.

Nothing of the engine runs in the test process but the codec (to write a hello), the preamble's magic
and identity creation.
Every hostile client must be refused or closed, the receiver must say why in its log (naming the ID a
client presented), count the refusal in ``standby status``, and stay up: a proper sender still replicates
afterwards. ``insecure`` plaintext is allowed on loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from engine import codec, identity
from engine.model import PROTOCOL_VERSION, node_id
from engine.transport import ACK, NAK, PREAMBLE
from tests.pair import Pair, wait_for

pytestmark = pytest.mark.timeout(90)


# ---------------------------------------------------------------------------------------------------------
# Raw clients


def hello_frame(role: str = "sender", epoch: int = 1) -> bytes:
    return codec.encode(
        {"k": "hello", "v": PROTOCOL_VERSION, "node": "intruder", "epoch": epoch, "role": role}
    )


def preamble(der: bytes) -> bytes:
    return PREAMBLE + struct.pack(">H", len(der)) + der


def client_context(cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A TLS 1.3 client context that accepts any server certificate and presents ``cert`` if given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


@dataclass
class Outcome:
    """What a raw client saw."""

    tls: bool  # the client side of the TLS handshake completed
    received: bytes  # everything read before the receiver closed (plaintext or decrypted)
    closed: bool  # the receiver closed the connection (EOF, reset or TLS alert) within the wait
    seconds: float  # from connect to close
    error: str  # the handshake or read error, if any

    def frames(self) -> list[Any]:
        dec = codec.FrameDecoder()
        dec.feed(self.received)
        out: list[Any] = []
        while True:
            ok, v = dec.next()
            if not ok:
                return out
            out.append(v)


async def attempt(
    port: int,
    send: bytes = b"",
    *,
    tls: ssl.SSLContext | None = None,
    then: bytes = b"",
    wait: float = 10.0,
    eof: bool = False,
    pause: float = 0.3,
    first_frame: bool = False,
) -> Outcome:
    """Connect, send ``send`` in plaintext, optionally start TLS with ``tls``, send ``then``, and read
    until the receiver closes (or ``wait`` seconds pass; with ``first_frame``, until a whole frame came).

    After a preamble it waits for the receiver's ACK byte before starting TLS, as the sender does: see
    test_preamble_and_client_hello_in_one_segment for a client that does not."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    raw = writer.transport
    tls_ok = False
    received = b""
    error = ""
    closed = False
    try:
        try:
            async with asyncio.timeout(wait):
                if send:
                    writer.write(send)
                    await writer.drain()
                if eof:
                    writer.write_eof()
                refused = False
                if tls is not None and send.startswith(PREAMBLE):
                    # The receiver answers ACK once it has read exactly the preamble and accepted the ID,
                    # else the NAK line (read below, as what the receiver sent).
                    received = await reader.readexactly(1)
                    refused = received != ACK
                    if not refused:
                        received = b""
                elif tls is not None and send:
                    await asyncio.sleep(pause)
                if tls is not None and not refused:
                    await writer.start_tls(tls, ssl_handshake_timeout=wait)
                    tls_ok = True
                if then and not refused:
                    writer.write(then)
                    await writer.drain()
                while chunk := await reader.read(65536):
                    received += chunk
                    if first_frame and Outcome(False, received, False, 0, "").frames():
                        break
                else:
                    closed = True
        except TimeoutError:
            closed = False
        except (ConnectionError, ssl.SSLError, OSError, asyncio.IncompleteReadError) as e:
            error = f"{type(e).__name__}: {e}"
            closed = True
    finally:
        writer.transport.abort()
        raw.abort()
    return Outcome(tls_ok, received, closed, time.monotonic() - t0, error)


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


def receiver_alive(pair: Pair) -> None:
    """The receiver process runs and still accepts connections."""
    p = pair.procs["receive"]
    assert p.poll() is None, f"the receiver exited with {p.returncode}\n{pair.all_logs()}"

    async def probe() -> None:
        _r, w = await asyncio.open_connection("127.0.0.1", pair.port)
        w.transport.abort()

    run(probe())


def log_lines(pair: Pair, role: str, event: str) -> list[str]:
    return [line for line in pair.log(role).splitlines() if f" {event} " in line]


def stranger(tmp_path: Path, name: str = "intruder") -> identity.Identity:
    """An identity nobody pinned."""
    return identity.create(tmp_path / f"{name}-state", name)[0]


def sender_identity(pair: Pair) -> identity.Identity:
    return identity.load(pair.sender_state)


def receiver_identity(pair: Pair) -> identity.Identity:
    return identity.load(pair.receiver_state)


def counters(pair: Pair) -> dict[str, int]:
    data: dict[str, int] = pair.status()["receiver"]["counters"]
    return data


# ---------------------------------------------------------------------------------------------------------
# Hostile clients, one kind at a time


def test_plain_tcp_hello_without_preamble_is_closed(pair: Pair) -> None:
    pair.start("receive")
    out = run(attempt(pair.port, hello_frame()))
    assert out.closed, out
    assert out.received == b"", "the receiver answered a plaintext hello"
    pair.wait_log("receive", "receiver.refused")
    (line,) = log_lines(pair, "receive", "receiver.refused")
    assert "no TLS preamble" in line
    assert "receiver.connected" not in pair.log("receive")
    receiver_alive(pair)


GARBAGE: dict[str, bytes] = {
    "random": bytes(random.Random(7).getrandbits(8) for _ in range(4096)),
    "http": b"GET / HTTP/1.1\r\nHost: passive:7420\r\nUser-Agent: curl/8\r\nAccept: */*\r\n\r\n",
    "zeros": bytes(64 << 10),
    "preamble, certificate length 0": PREAMBLE + b"\x00\x00" + b"x" * 100,
    "preamble, certificate length 65535": PREAMBLE + b"\xff\xff" + b"x" * 100,
    "wrong preamble version": b"STBY2\n" + b"\x00\x10" + b"x" * 16,
}


@pytest.mark.parametrize("data", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_is_closed(pair: Pair, data: bytes) -> None:
    pair.start("receive")
    out = run(attempt(pair.port, data))
    assert out.closed and out.received == b"", out
    pair.wait_log("receive", "receiver.refused")
    assert "receiver.connected" not in pair.log("receive")
    receiver_alive(pair)


def test_garbage_shorter_than_a_preamble_then_eof_is_closed(pair: Pair) -> None:
    pair.start("receive")
    out = run(attempt(pair.port, b"\x16\x03", eof=True))
    assert out.closed and out.received == b"", out
    pair.wait_log("receive", "receiver.disconnected")
    receiver_alive(pair)


def test_tls_client_without_preamble_is_closed(pair: Pair) -> None:
    # A TLS client that does not speak our preamble (its ClientHello is the "garbage" here).
    pair.start("receive")
    me = sender_identity(pair)
    out = run(attempt(pair.port, tls=client_context(me.cert_path, me.key_path), then=hello_frame()))
    assert not out.tls and out.closed, out
    pair.wait_log("receive", "receiver.refused")
    receiver_alive(pair)


def test_certificate_of_another_identity_is_refused_and_its_id_logged(pair: Pair, tmp_path: Path) -> None:
    pair.start("receive")
    other = stranger(tmp_path)
    out = run(
        attempt(
            pair.port,
            preamble(other.cert_der),
            tls=client_context(other.cert_path, other.key_path),
            then=hello_frame(),
        )
    )
    # The receiver says why (its NAK line, so the client can tell a refusal from a stranger), then closes.
    assert out.closed and out.received == NAK, out
    assert not out.tls, "the receiver started TLS with an unpinned certificate"
    pair.wait_log("receive", "receiver.refused")
    (line,) = log_lines(pair, "receive", "receiver.refused")
    assert other.id in line, line
    assert sender_identity(pair).id in line  # and the ID it pins instead
    assert "receiver.connected" not in pair.log("receive")
    receiver_alive(pair)


def test_garbage_certificate_is_refused_by_its_id(pair: Pair) -> None:
    pair.start("receive")
    der = b"\x30\x82" + bytes(300)
    out = run(attempt(pair.port, preamble(der), tls=client_context()))
    assert out.closed and not out.tls and out.received == NAK, out
    pair.wait_log("receive", "receiver.refused")
    assert node_id(der) in pair.log("receive")
    receiver_alive(pair)


@pytest.mark.parametrize("presents", ["another certificate", "no certificate"])
def test_right_certificate_announced_without_its_key_fails_the_handshake(
    pair: Pair, tmp_path: Path, presents: str
) -> None:
    pair.start("receive")
    right = sender_identity(pair)
    other = stranger(tmp_path)
    ctx = (
        client_context(other.cert_path, other.key_path)
        if presents == "another certificate"
        else client_context()
    )
    out = run(attempt(pair.port, preamble(right.cert_der), tls=ctx, then=hello_frame()))
    # TLS 1.3: the client may finish its side before the server checks the client certificate; either way
    # the receiver refuses and nothing but the refusal comes back.
    assert out.closed, out
    assert out.received == b"", f"the receiver answered a client that did not prove its key: {out}"
    pair.wait_log("receive", "receiver.refused")
    (line,) = log_lines(pair, "receive", "receiver.refused")
    assert "TLS handshake failed" in line and right.id in line, line
    assert "receiver.connected" not in pair.log("receive")
    receiver_alive(pair)


def test_the_proper_client_gets_a_welcome(pair: Pair) -> None:
    # The positive control for the raw client above: with the sender's own key it is let in.
    pair.start("receive")
    me = sender_identity(pair)
    out = run(
        attempt(
            pair.port,
            preamble(me.cert_der),
            tls=client_context(me.cert_path, me.key_path),
            then=hello_frame("observer"),
            first_frame=True,
        )
    )
    assert out.tls, out
    frames = out.frames()
    assert frames and frames[0]["k"] == "welcome", out
    pair.wait_log("receive", "receiver.connected")
    receiver_alive(pair)


async def tls_in_one_segment(port: int, me: identity.Identity, wait: float) -> Outcome:
    """The proper client, except that its preamble and its TLS ClientHello leave in one write (as they
    may arrive in one segment from any client: the sender writes them back to back). TLS runs over
    memory BIOs so the ClientHello exists before the connection does."""
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context(me.cert_path, me.key_path).wrap_bio(inc, out, server_side=False)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    client_hello = out.read()
    assert client_hello[:1] == b"\x16"  # a TLS handshake record
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    handshake_done, plain, closed, error = False, b"", False, ""
    try:
        writer.write(preamble(me.cert_der) + client_hello)
        async with asyncio.timeout(wait):
            while not closed:
                data = await reader.read(65536)
                if not data:
                    closed = True
                inc.write(data)
                if not handshake_done:
                    try:
                        tls.do_handshake()
                        handshake_done = True
                        tls.write(hello_frame("observer"))
                    except ssl.SSLWantReadError:
                        pass
                if handshake_done:
                    with contextlib.suppress(ssl.SSLWantReadError):
                        plain += tls.read(65536)
                writer.write(out.read())
                if plain:
                    break
    except TimeoutError:
        pass
    except (ConnectionError, ssl.SSLError) as e:
        closed, error = True, f"{type(e).__name__}: {e}"
    finally:
        writer.transport.abort()
    return Outcome(handshake_done, plain, closed, time.monotonic() - t0, error)


def test_preamble_and_client_hello_in_one_segment_is_refused_at_once(pair: Pair) -> None:
    # A client that does not wait for the ACK byte sends its ClientHello with the preamble; the receiver
    # must not let those bytes be swallowed (a stalled handshake): it refuses the connection at once.
    pair.start("receive")
    out = run(tls_in_one_segment(pair.port, sender_identity(pair), wait=5))
    assert not out.tls and out.closed, out
    assert out.seconds < 3, out
    pair.wait_log("receive", "started TLS before the preamble was acknowledged")
    receiver_alive(pair)


def test_preamble_and_client_hello_apart_control(pair: Pair) -> None:
    # The control for the test above: the same memory-BIO client, with the preamble sent on its own first.
    pair.start("receive")
    me = sender_identity(pair)

    async def apart() -> Outcome:
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = client_context(me.cert_path, me.key_path).wrap_bio(inc, out, server_side=False)
        reader, writer = await asyncio.open_connection("127.0.0.1", pair.port)
        try:
            writer.write(preamble(me.cert_der))
            await writer.drain()
            async with asyncio.timeout(4):
                assert await reader.readexactly(1) == ACK
                while True:
                    try:
                        tls.do_handshake()
                        break
                    except ssl.SSLWantReadError:
                        writer.write(out.read())
                        inc.write(await reader.read(65536))
                tls.write(hello_frame("observer"))
                writer.write(out.read())
                plain = b""
                while not plain:
                    inc.write(await reader.read(65536))
                    with contextlib.suppress(ssl.SSLWantReadError):
                        plain += tls.read(65536)
                return Outcome(True, plain, False, 0.0, "")
        finally:
            writer.transport.abort()

    out = run(apart())
    assert out.frames()[0]["k"] == "welcome", out


# ---------------------------------------------------------------------------------------------------------
# Slow clients: the handshake timeout


def test_silent_and_slow_clients_are_closed_after_the_handshake_timeout(pair: Pair) -> None:
    pair.receiver_extra = "handshake_timeout = 1"
    pair.write_config()
    pair.start("receive")
    me = sender_identity(pair)
    proper = client_context(me.cert_path, me.key_path)
    cases: dict[str, Callable[[], Awaitable[Outcome]]] = {
        "nothing at all": lambda: attempt(pair.port, wait=8),
        "mid-preamble": lambda: attempt(pair.port, PREAMBLE[:4], wait=8),
        "preamble without the certificate": lambda: attempt(pair.port, PREAMBLE + b"\x01\x00", wait=8),
        "half a certificate": lambda: attempt(pair.port, preamble(me.cert_der)[:-50], wait=8),
        # whole preamble, then no TLS ClientHello
        "preamble, then nothing": lambda: attempt(pair.port, preamble(me.cert_der), wait=8),
        # TLS done with the right key, then no hello (or half a hello)
        "TLS, then nothing": lambda: attempt(pair.port, preamble(me.cert_der), tls=proper, wait=8),
        "TLS, then half a hello": lambda: attempt(
            pair.port, preamble(me.cert_der), tls=proper, then=hello_frame()[:-3], wait=8
        ),
    }

    async def all_at_once() -> list[Outcome]:
        return list(await asyncio.gather(*(make() for make in cases.values())))

    outcomes = dict(zip(cases, run(all_at_once()), strict=True))
    for name, out in outcomes.items():
        assert out.closed, f"{name}: still open after {out.seconds:.1f} s"
        assert out.received in (b"", ACK), f"{name}: {out}"
        assert 0.8 <= out.seconds < 5, f"{name}: closed after {out.seconds:.2f} s, not about 1 s"
    assert outcomes["TLS, then nothing"].tls and outcomes["TLS, then half a hello"].tls
    receiver_alive(pair)
    assert "receiver.connected" not in pair.log("receive")


# ---------------------------------------------------------------------------------------------------------
# The real sender: pinning the receiver's ID


#: A connect that stalls (see test_preamble_and_client_hello_in_one_segment) is retried after 1 s, not 5.
FAST_RETRY = "connect_timeout = 1"


def pin_on_sender(pair: Pair, rid: str) -> None:
    """Rewrite the [sender] peer_id (Pair.write_config pins the right one)."""
    right = receiver_identity(pair).id
    text = pair.config.read_text("utf-8")
    sender_part, sep, receiver_part = text.partition("[receiver]")
    assert f'peer_id = "{right}"' in sender_part
    pair.config.write_text(
        sender_part.replace(f'peer_id = "{right}"', f'peer_id = "{rid}"') + sep + receiver_part
    )


def test_sender_pinning_another_receiver_id_does_not_replicate(pair: Pair, tmp_path: Path) -> None:
    pair.sender_extra = FAST_RETRY
    pair.write_config()
    other = stranger(tmp_path, "impostor")
    pin_on_sender(pair, other.id)
    (pair.source / "databases").mkdir()
    (pair.source / "databases" / "a.json").write_text('{"a": 1}', "utf-8")
    pair.start("receive")
    pair.start("send", wait=False)
    wait_for(lambda: len(log_lines(pair, "send", "send.refused")) >= 3, 20, "three refusals by the sender")
    line = log_lines(pair, "send", "send.refused")[0]
    rid = receiver_identity(pair).id
    assert f"presented ID {rid}" in line and other.id in line, line
    assert "send.connected" not in pair.log("send")
    assert not (pair.target / "databases" / "a.json").exists()
    assert pair.procs["send"].poll() is None, "the sender gave up instead of retrying"
    assert pair.stop("send") == 0

    pair.write_config()  # the right pins again
    pair.start("send")
    pair.wait_converged()
    assert (pair.target / "databases" / "a.json").read_text("utf-8") == '{"a": 1}'


# ---------------------------------------------------------------------------------------------------------
# All of them against one receiver; then a proper sender still replicates; the refusals are counted


def test_after_every_hostile_client_a_proper_sender_still_replicates(pair: Pair, tmp_path: Path) -> None:
    pair.receiver_extra = "handshake_timeout = 1"
    pair.sender_extra = FAST_RETRY
    pair.write_config()
    (pair.source / "databases" / "room1").mkdir(parents=True)
    (pair.source / "databases" / "room1" / "m.json").write_text('{"m": 1}', "utf-8")
    pair.start("receive")
    other = stranger(tmp_path)
    me = sender_identity(pair)

    async def gauntlet() -> list[Outcome]:
        return list(
            await asyncio.gather(
                attempt(pair.port, hello_frame()),
                attempt(pair.port, GARBAGE["random"]),
                attempt(pair.port, GARBAGE["http"]),
                attempt(
                    pair.port, preamble(other.cert_der), tls=client_context(other.cert_path, other.key_path)
                ),
                attempt(
                    pair.port,
                    preamble(me.cert_der),
                    tls=client_context(other.cert_path, other.key_path),
                    then=hello_frame(),
                ),
                attempt(pair.port, preamble(me.cert_der), tls=client_context(), then=hello_frame()),
                attempt(pair.port, preamble(me.cert_der)),  # then silence
                attempt(pair.port, PREAMBLE[:3]),  # stops mid-preamble
            )
        )

    for out in run(gauntlet()):
        assert out.closed and out.received in (b"", ACK, NAK), out
    receiver_alive(pair)
    st = pair.wait_status(
        lambda s: (
            s["receiver"].get("counters", {}).get("refused_peers", 0) >= 6
            and s["receiver"]["counters"].get("protocol_errors", 0) == 0
        ),
        10,
        "6 refused peers and no protocol error in the receiver's status",
    )
    assert st["receiver"]["connected"] is False
    assert st["receiver"]["applied_seq"] == 0
    refused = log_lines(pair, "receive", "receiver.refused")
    assert any(other.id in line for line in refused), refused
    assert sum("TLS handshake failed" in line for line in refused) == 2, refused

    pair.start("send")
    pair.wait_converged()
    (pair.source / "databases" / "room1" / "n.json").write_text('{"n": 2}', "utf-8")
    pair.wait_converged()
    receiver_alive(pair)


def test_refusals_are_counted_in_status(pair: Pair, tmp_path: Path) -> None:
    pair.start("receive")
    before = pair.wait_status(lambda s: "counters" in s["receiver"], 10, "the receiver's first status")
    assert before["receiver"]["counters"]["refused_peers"] == 0
    other = stranger(tmp_path)
    for _ in range(2):
        run(attempt(pair.port, preamble(other.cert_der), tls=client_context(other.cert_path, other.key_path)))
    st = pair.wait_status(
        lambda s: s["receiver"]["counters"]["refused_peers"] == 2, 10, "2 refused peers in the status"
    )
    assert st["receiver"]["transport"] == "TLS 1.3, pinned"
    assert st["receiver"]["running"] is True


# ---------------------------------------------------------------------------------------------------------
# insecure: plaintext on loopback only


def write_raw_config(path: Path, body: str) -> Path:
    path.write_text(body, "utf-8")
    return path


INSECURE_ELSEWHERE = {
    "receiver on 0.0.0.0": ("receive", "receiver", "[receiver]\nlisten = '0.0.0.0:{port}'\n"),
    "receiver on a LAN address": ("receive", "receiver", "[receiver]\nlisten = '192.168.1.20:{port}'\n"),
    "receiver on ::": ("receive", "receiver", "[receiver]\nlisten = '[::]:{port}'\n"),
    "sender to a LAN address": ("send", "sender", "[sender]\npeer = '10.0.0.5:{port}'\n"),
    "sender to a host name": ("send", "sender", "[sender]\npeer = 'passive.example.com:{port}'\n"),
}


@pytest.mark.parametrize(
    ("command", "section", "head"), INSECURE_ELSEWHERE.values(), ids=INSECURE_ELSEWHERE.keys()
)
def test_insecure_off_loopback_is_a_config_error(
    pair: Pair, tmp_path: Path, command: str, section: str, head: str
) -> None:
    body = head.format(port=pair.port) + (
        f"source = '{pair.source}'\nstate_dir = '{pair.sender_state}'\n"
        if section == "sender"
        else f"target = '{pair.target}'\nstate_dir = '{pair.receiver_state}'\n"
    )
    cfg = write_raw_config(tmp_path / "insecure.toml", body + "insecure = true\n")
    r = pair.cli(command, "--config", str(cfg), timeout=30)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert f"{section} -> insecure" in r.stderr, r.stderr
    assert "loopback" in r.stderr
    assert "Traceback" not in r.stderr
    # and without insecure the same address needs a pinned ID, named too
    cfg.write_text(body, "utf-8")
    r = pair.cli(command, "--config", str(cfg), timeout=30)
    assert r.returncode == 2 and f"{section} -> peer_id" in r.stderr, (r.returncode, r.stderr)


def test_insecure_on_loopback_runs_plaintext_and_warns(pair: Pair) -> None:
    pair.sender_extra = "insecure = true"
    pair.receiver_extra = "insecure = true"
    pair.write_config()
    (pair.source / "databases").mkdir()
    (pair.source / "databases" / "a.json").write_text('{"a": 1}', "utf-8")
    pair.start("receive")
    pair.start("send")
    pair.wait_converged()
    for role in ("receive", "send"):
        (line,) = log_lines(pair, role, "transport.insecure")
        assert re.search(r"\bwarning\b", line), line
    # plaintext: a hello with no preamble and no TLS is welcomed
    out = run(attempt(pair.port, hello_frame("observer"), first_frame=True))
    assert not out.closed, out  # open: the observer is let in and kept until its idle timeout
    assert out.frames() and out.frames()[0]["k"] == "welcome", out
    st = pair.wait_status(lambda s: s["receiver"].get("connected") is True, 10, "the sender connected")
    assert st["receiver"]["transport"].startswith("plaintext")


def test_secure_receiver_refuses_an_insecure_sender(pair: Pair) -> None:
    # One side in insecure mode does not downgrade the other: the secure receiver wants its preamble.
    pair.sender_extra = "insecure = true"
    pair.write_config()
    (pair.source / "databases").mkdir()
    (pair.source / "databases" / "a.json").write_text('{"a": 1}', "utf-8")
    pair.start("receive")
    pair.start("send", wait=False)
    wait_for(lambda: len(log_lines(pair, "receive", "receiver.refused")) >= 2, 20, "two refusals")
    assert "send.connected" not in pair.log("send")
    assert not (pair.target / "databases" / "a.json").exists()
    receiver_alive(pair)
