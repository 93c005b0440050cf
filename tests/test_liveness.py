"""Links that die quietly: a stalled connection, a corrupt frame length and a frozen peer are dropped and
reconnected within the silence timeout, on both sides (real processes, real TCP on 127.0.0.1)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from engine import codec, wire
from engine.errors import LocalProtocolError, RemoteProtocolError
from tests.pair import Pair, free_port, wait_for

SILENCE = 3.0


# ---- the pure part ----------------------------------------------------------------------------------------
def test_liveness_says_when_to_ping_and_when_the_peer_is_silent() -> None:
    live = wire.Liveness(15.0, now=100.0)
    assert live.interval == 5.0
    assert not live.due(104.9) and live.due(105.0)
    live.sent(105.0)
    assert not live.due(109.9) and live.due(110.0)
    assert not live.silent(114.9) and live.silent(115.0)
    assert live.deadline() == 115.0
    live.heard(114.0)
    assert not live.silent(128.9) and live.silent(129.0)
    with pytest.raises(LocalProtocolError):
        wire.Liveness(0, now=0.0)


def test_a_bug_in_the_decoder_is_not_reported_as_a_peer_fault() -> None:
    """Only a bad frame is the peer's fault; any other exception is ours and must surface as itself."""
    proto = wire.ReceiverProtocol("r")

    class Boom(Exception):
        pass

    def broken() -> tuple[bool, object]:
        raise Boom("a bug of ours")

    proto._dec.next = broken  # type: ignore[method-assign]
    with pytest.raises(Boom):
        proto.next_event()
    # A real bad frame still is a peer fault.
    proto = wire.ReceiverProtocol("r")
    proto.receive_data(b"\xff\xff\xff\x7f" + b"\0" * 8)
    with pytest.raises(RemoteProtocolError):
        proto.next_event()


# ---- a proxy we can stall and corrupt ---------------------------------------------------------------------
class Proxy:
    """Forwards 127.0.0.1:port -> 127.0.0.1:target, one thread per direction per connection.

    ``stall()`` stops forwarding on the connections open now (they stay open, silent: a stuck middlebox);
    later connections pass. ``flip_length_back()`` flips a high bit of the length of the next frame-sized
    read from the receiver back to the sender (plaintext only)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self._srv = socket.create_server(("127.0.0.1", self.port))
        self._srv.settimeout(0.2)
        self._stop = threading.Event()
        self._stalled: set[int] = set()
        self._gen = 0
        self.connections = 0
        self.flip_next_back = False
        self._socks: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self._srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                c.close()
                continue
            self.connections += 1
            gen = self._gen = self._gen + 1
            self._socks += [c, u]
            for a, b, back in ((c, u, False), (u, c, True)):
                t = threading.Thread(target=self._pump, args=(a, b, gen, back), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, a: socket.socket, b: socket.socket, gen: int, back: bool) -> None:
        a.settimeout(0.2)
        while not self._stop.is_set():
            if gen in self._stalled:
                time.sleep(0.05)
                continue
            try:
                data = a.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            while gen in self._stalled and not self._stop.is_set():  # held, never forwarded
                time.sleep(0.05)
            if back and self.flip_next_back and len(data) >= codec.HEADER_SIZE:
                self.flip_next_back = False
                data = bytes([data[0], data[1], data[2] ^ 0x01]) + data[3:]  # length += 64 KiB
            try:
                b.sendall(data)
            except OSError:
                break
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stall(self) -> None:
        self._stalled.add(self._gen)

    def close(self) -> None:
        self._stop.set()
        self._srv.close()
        for s in self._socks:
            s.close()
        for t in self._threads:
            t.join(timeout=5)


def _through_proxy(pair: Pair, insecure: bool = False) -> Proxy:
    proxy = Proxy(pair.port)
    pair.sender_extra = f"silence_timeout = {SILENCE}" + ("\ninsecure = true" if insecure else "")
    pair.receiver_extra = f"silence_timeout = {SILENCE}" + ("\ninsecure = true" if insecure else "")
    pair.write_config()
    text = pair.config.read_text("utf-8")
    pair.config.write_text(
        text.replace(f'peer = "127.0.0.1:{pair.port}"', f'peer = "127.0.0.1:{proxy.port}"'), "utf-8"
    )
    return proxy


def _write(pair: Pair, name: str) -> Path:
    p = pair.source / "databases" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(f"meeting {name} {time.time_ns()}\n", "utf-8")
    return p


def test_a_stalled_connection_is_dropped_and_replication_resumes(pair: Pair) -> None:
    proxy = _through_proxy(pair)
    try:
        _write(pair, "before.json")
        pair.start("receive")
        pair.start("send")
        pair.wait_converged()
        proxy.stall()
        t0 = time.monotonic()
        _write(pair, "during-stall.json")
        pair.wait_converged(timeout=SILENCE + 15)
        took = time.monotonic() - t0
        assert proxy.connections >= 2, "the sender never reconnected"
        assert took < SILENCE + 10, f"replication resumed only after {took:.1f} s"
        assert "no whole frame from the receiver" in pair.log("send"), pair.log("send")
    finally:
        proxy.close()


def test_a_corrupt_frame_length_from_the_receiver_does_not_freeze_acks(pair: Pair) -> None:
    """In plaintext a flipped bit in a frame length leaves the sender waiting for bytes that never come;
    the receiver's heartbeats keep bytes flowing, but no whole frame: the sender must still drop it."""
    proxy = _through_proxy(pair, insecure=True)
    try:
        pair.start("receive")
        pair.start("send")
        _write(pair, "first.json")
        pair.wait_converged()
        proxy.flip_next_back = True
        _write(pair, "second.json")  # its ack (or the next heartbeat) is corrupted on the way back
        wait_for(lambda: not proxy.flip_next_back, 10, "the proxy to corrupt a frame")
        pair.wait_log("send", "no whole frame from the receiver", timeout=SILENCE + 5)
        _write(pair, "third.json")
        pair.wait_converged(timeout=SILENCE + 15)
        pair.wait_status(
            lambda st: st["sender"].get("acked_seq", 0) >= st["sender"].get("head", 1),
            SILENCE + 15,
            "the sender to see every entry acknowledged",
        )
        assert proxy.connections >= 2, "the sender never reconnected"
    finally:
        proxy.close()


@pytest.mark.parametrize("frozen", ["receive", "send"])
def test_a_frozen_peer_is_reported_silent_within_the_timeout(pair: Pair, frozen: str) -> None:
    """SIGSTOP stands for a powered-off host: no FIN, no RST, nothing. The other side says so in time."""
    pair.sender_extra = f"silence_timeout = {SILENCE}"
    pair.receiver_extra = f"silence_timeout = {SILENCE}"
    pair.write_config()
    pair.start("receive")
    pair.start("send")
    _write(pair, "a.json")
    pair.wait_converged()
    other = "send" if frozen == "receive" else "receive"
    expect = "no whole frame from the receiver" if other == "send" else "receiver.peer_silent"
    proc = pair.procs[frozen]
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        pair.wait_log(other, expect, timeout=SILENCE + 10)
        took = time.monotonic() - t0
        assert took <= SILENCE + 3, f"the {other} side noticed the silence only after {took:.1f} s"
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    # Once back, the pair replicates again.
    _write(pair, "after.json")
    pair.wait_converged(timeout=SILENCE + 20)
