"""A hostile or broken peer against a real receiver process: hand-built frames over real TCP.

Only the receiver runs. A raw client builds every frame itself with :func:`engine.codec.encode` and drives
the handshake with :class:`engine.wire.SenderProtocol`, so it can send what the real sender never would:
paths that climb out of the replica, absolute and Windows paths, device names, writes through a symlink,
corrupt and oversized frames. The receiver must refuse each bad record (a problem in the ack, the position
still advancing), write nothing outside its target, and keep serving.

The pair runs in loopback ``insecure`` mode (plain TCP): what these tests attack is the frame and record
layer behind the handshake, which a peer holding the pinned sender key reaches just the same. Attacks on the
TLS handshake and the ID pinning themselves live in tests/test_tls.py; the one test here that runs the
receiver with TLS checks how such attempts are counted (``refused_peers``, never ``protocol_errors``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from engine import codec, identity, wire
from engine.digest import checksum, digest_bytes
from engine.journal import entry_header
from engine.model import CHUNK_SIZE, Change, Op, chunk_count
from engine.transport import PREAMBLE
from tests.pair import Pair, temp_files, wait_for

#: Paths a peer may send that must never be applied: (path, what it tries).
BAD_PATHS = [
    ("../x", "climb out of the target"),
    ("/etc/x", "absolute POSIX path"),
    ("C:\\x", "Windows drive path"),
    ("\\\\server\\share\\x", "Windows UNC path"),
    ("a/../../x", "climb out through a folder"),
    ("a\x00b", "NUL in a name"),
    ("a:b", "a colon (an NTFS alternate data stream)"),
    ("CON", "a Windows device name"),
]


class RawPeer:
    """A hand-driven sender (or observer) on a plain TCP connection."""

    def __init__(self, port: int, role: str = "sender", epoch: int = 1, node: str = "hostile") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.proto = wire.SenderProtocol(node, epoch, role=role)
        self.next_seq = 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def event(self, timeout: float = 10) -> wire.SenderEvent:
        self.sock.settimeout(timeout)
        while (ev := self.proto.next_event()) is None:
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the receiver closed the connection")
            self.proto.receive_data(data)
        return ev

    def handshake(self) -> wire.Welcome:
        self.send(self.proto.hello())
        ev = self.event()
        assert isinstance(ev, wire.Welcome), f"expected a welcome, got {ev}"
        return ev

    def start_stream(self, journal: str = "0bad0bad") -> wire.Welcome:
        welcome = self.handshake()
        self.next_seq = welcome.seq + 1
        self.send(self.proto.stream(journal, self.next_seq))
        return welcome

    def entry(
        self, op: Op, path: str, content: bytes = b"", dst: str = "", digest: bytes | None = None
    ) -> Change:
        """Send one entry (a put's content in protocol-sized chunks); returns its header."""
        c = Change(self.next_seq, op, path, dst=dst, ts_ns=time.time_ns())
        if op is Op.PUT:
            c = Change(
                self.next_seq,
                op,
                path,
                size=len(content),
                mtime_ns=1_700_000_000_000_000_000,
                digest=digest_bytes(content) if digest is None else digest,
                chunks=chunk_count(len(content)),
                ts_ns=c.ts_ns,
            )
        raw = codec.encode(entry_header(c)) + b"".join(
            codec.encode(content[i : i + CHUNK_SIZE]) for i in range(0, len(content), CHUNK_SIZE)
        )
        self.send(self.proto.entries(raw, [c]))
        self.next_seq += 1
        return c

    def wait_ack(self, seq: int, timeout: float = 15) -> list[wire.Problem]:
        """Read acks until ``seq`` is acknowledged; every problem reported on the way."""
        problems: list[wire.Problem] = []
        deadline = time.monotonic() + timeout
        while True:
            ev = self.event(max(0.1, deadline - time.monotonic()))
            if isinstance(ev, wire.Ack):
                problems.extend(ev.problems)
                if ev.seq >= seq:
                    return problems

    def assert_closed_by_peer(self, within: float) -> None:
        """The receiver closes the connection (EOF or reset) within ``within`` seconds."""
        self.sock.settimeout(within)
        try:
            while self.sock.recv(1 << 16):
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass
        except TimeoutError:
            raise AssertionError(f"the receiver kept the connection open for over {within} s") from None


@pytest.fixture
def receiver(pair: Pair) -> Iterator[Pair]:
    """A pair in loopback plaintext mode with only the receiver running."""
    pair.sender_extra = "insecure = true"
    pair.receiver_extra = "insecure = true"
    pair.write_config()
    pair.start("receive")
    yield pair


def outside_snapshot(pair: Pair) -> dict[str, bytes]:
    """Every file beside the target (the target's parent, minus what the processes keep there), by content."""
    out: dict[str, bytes] = {}
    for p in sorted(pair.base.rglob("*")):
        rel = p.relative_to(pair.base)
        if rel.parts[0] in (pair.target.name, pair.receiver_state.name, pair.sender_state.name):
            continue
        if p.suffix == ".log":
            continue
        out[str(rel)] = p.read_bytes() if p.is_file() and not p.is_symlink() else b"<dir>"
    return out


def assert_receiver_alive(pair: Pair) -> None:
    assert pair.procs["receive"].poll() is None, f"the receiver exited\n{pair.all_logs()}"


def assert_proper_sender_applies(pair: Pair, name: str) -> None:
    """A well-behaved raw sender is admitted, and its put is applied and acknowledged without problems."""
    peer = RawPeer(pair.port, node="proper")
    try:
        peer.start_stream(journal=f"{abs(hash(name)):x}")
        c = peer.entry(Op.PUT, f"after/{name}.txt", b"proper content")
        problems = peer.wait_ack(c.seq)
    finally:
        peer.close()
    assert problems == [], problems
    assert (pair.target / "after" / f"{name}.txt").read_bytes() == b"proper content"


# ---------------------------------------------------------------------------------------------------------
# Records with hostile paths


def test_hostile_paths_are_refused_and_nothing_is_written_outside(receiver: Pair) -> None:
    pair = receiver
    victim = pair.base / "victim.txt"
    victim.write_bytes(b"must survive")
    (pair.base / "victim-dir").mkdir()
    etc_x_existed = os.path.lexists("/etc/x")
    before = outside_snapshot(pair)

    peer = RawPeer(pair.port)
    try:
        peer.start_stream()
        bad: dict[int, str] = {}
        for path, _why in BAD_PATHS:
            bad[peer.entry(Op.PUT, path, b"evil").seq] = path
        bad[peer.entry(Op.PUT, str(pair.base / "abs-x"), b"evil").seq] = "absolute path beside the target"
        bad[peer.entry(Op.PUT, "../big-x", os.urandom(5 * CHUNK_SIZE)).seq] = "../big-x (streamed put)"
        bad[peer.entry(Op.DELETE, "../victim.txt").seq] = "delete ../victim.txt"
        bad[peer.entry(Op.RMDIR, "../victim-dir").seq] = "rmdir ../victim-dir"
        bad[peer.entry(Op.MKDIR, "../made-dir").seq] = "mkdir ../made-dir"
        good = peer.entry(Op.PUT, "valid/ok.txt", b"fine")
        bad[peer.entry(Op.RENAME, "valid/ok.txt", dst="../moved.txt").seq] = "rename to ../moved.txt"
        forged = peer.entry(Op.PUT, "valid/forged.txt", b"forged", digest=digest_bytes(b"other"))
        bad[forged.seq] = "a put whose content does not match its digest"
        last = peer.entry(Op.MKDIR, "valid/last")
        problems = peer.wait_ack(last.seq)
    finally:
        peer.close()
        if not etc_x_existed and os.path.lexists("/etc/x"):  # a regression must not leave it behind
            os.unlink("/etc/x")
            pytest.fail("the receiver wrote /etc/x (an absolute path from the wire)")

    refused = {p.seq: p for p in problems}
    missing = {seq: what for seq, what in bad.items() if seq not in refused}
    assert not missing, f"records not refused: {missing}\nproblems: {problems}\n{pair.all_logs()}"
    assert all(refused[seq].code == "refused" for seq in bad), problems
    assert good.seq not in refused and last.seq not in refused, problems
    assert "digest" in refused[forged.seq].reason, refused[forged.seq]
    assert (pair.target / "valid" / "ok.txt").read_bytes() == b"fine", "the valid record was not applied"
    assert (pair.target / "valid" / "last").is_dir()
    assert not (pair.target / "valid" / "forged.txt").exists(), "a put with a forged digest was applied"
    assert outside_snapshot(pair) == before, "something beside the target changed"
    assert victim.read_bytes() == b"must survive"
    assert not temp_files(pair.target), temp_files(pair.target)
    assert_receiver_alive(pair)

    # The receiver keeps serving: the real sender connects and replicates.
    (pair.source / "databases").mkdir()
    (pair.source / "databases" / "after.json").write_text('{"ok": true}')
    pair.start("send")
    pair.wait_converged()


def test_writes_through_a_symlink_in_the_replica_are_refused(receiver: Pair) -> None:
    pair = receiver
    outside = pair.base / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_bytes(b"must survive")
    (pair.target / "link").symlink_to(outside, target_is_directory=True)
    (pair.target / "deep").mkdir()
    (pair.target / "deep" / "link").symlink_to(outside, target_is_directory=True)
    (pair.target / "file-link").symlink_to(outside / "victim.txt")
    before = outside_snapshot(pair)

    peer = RawPeer(pair.port)
    try:
        peer.start_stream()
        bad: dict[int, str] = {}
        bad[peer.entry(Op.PUT, "link/x", b"evil").seq] = "put link/x"
        bad[peer.entry(Op.PUT, "deep/link/x", b"evil").seq] = "put deep/link/x"
        bad[peer.entry(Op.PUT, "link/big", os.urandom(5 * CHUNK_SIZE)).seq] = "streamed put link/big"
        bad[peer.entry(Op.PUT, "link/new/x", b"evil").seq] = "put link/new/x"
        bad[peer.entry(Op.DELETE, "link/victim.txt").seq] = "delete link/victim.txt"
        bad[peer.entry(Op.MKDIR, "link/sub").seq] = "mkdir link/sub"
        peer.entry(Op.PUT, "plain.txt", b"fine")
        bad[peer.entry(Op.RENAME, "plain.txt", dst="link/moved.txt").seq] = "rename to link/moved.txt"
        # The last name being a symlink is not refused, but the write must replace the link, not follow it.
        last = peer.entry(Op.PUT, "file-link", b"replaces the link")
        problems = peer.wait_ack(last.seq)
    finally:
        peer.close()

    refused = {p.seq for p in problems}
    missing = {seq: what for seq, what in bad.items() if seq not in refused}
    assert not missing, f"writes through a symlink not refused: {missing}\nproblems: {problems}"
    assert outside_snapshot(pair) == before, f"something outside the target changed\n{pair.all_logs()}"
    assert (outside / "victim.txt").read_bytes() == b"must survive"
    assert (pair.target / "plain.txt").read_bytes() == b"fine"
    assert not temp_files(pair.target) and not temp_files(outside)
    assert_receiver_alive(pair)
    assert_proper_sender_applies(pair, "after-symlinks")


def test_a_sender_that_vanishes_mid_put_leaves_no_temporary_file(receiver: Pair) -> None:
    pair = receiver
    peer = RawPeer(pair.port)
    content = os.urandom(6 * CHUNK_SIZE)
    try:
        peer.start_stream()
        c = Change(
            peer.next_seq,
            Op.PUT,
            "half/big.bin",
            size=len(content),
            mtime_ns=1,
            digest=digest_bytes(content),
            chunks=chunk_count(len(content)),
        )
        # The header and two of six chunks, then the connection goes away.
        peer.send(
            codec.encode(entry_header(c))
            + codec.encode(content[:CHUNK_SIZE])
            + codec.encode(content[CHUNK_SIZE : 2 * CHUNK_SIZE])
        )
        wait_for(lambda: bool(temp_files(pair.target)), 10, "the receiver to start the temporary file")
    finally:
        peer.close()
    wait_for(
        lambda: not temp_files(pair.target),
        10,
        f"the receiver to remove the half-written temporary file {temp_files(pair.target)}",
    )
    assert not (pair.target / "half" / "big.bin").exists()
    assert_receiver_alive(pair)
    assert_proper_sender_applies(pair, "after-vanish")


# ---------------------------------------------------------------------------------------------------------
# Broken frames: the connection is closed, the receiver keeps serving


def _hello_with_bad_checksum() -> bytes:
    frame = bytearray(wire.SenderProtocol("hostile", 1).hello())
    struct.pack_into("<I", frame, 4, (struct.unpack_from("<I", frame, 4)[0] + 1) & 0xFFFFFFFF)
    return bytes(frame)


def _not_msgpack() -> bytes:
    payload = b"\xc1" * 16  # 0xc1 is never used in msgpack
    return codec.HEADER.pack(len(payload), checksum(payload)) + payload


FRAME_FAULTS = {
    "garbage before hello": (False, b"GET / HTTP/1.1\r\nHost: standby\r\n\r\n"),
    "oversized header before hello": (False, codec.HEADER.pack(64 << 20, 0) + b"\0" * 64),
    "bad checksum before hello": (False, _hello_with_bad_checksum()),
    "not msgpack before hello": (False, _not_msgpack()),
    "oversized header mid-stream": (True, codec.HEADER.pack(3 << 20, 0) + b"\0" * 64),
    "bad checksum mid-stream": (True, _hello_with_bad_checksum()),
    "garbage mid-stream": (True, b"\xff" * 4096),
}


@pytest.mark.parametrize("fault", list(FRAME_FAULTS))
def test_a_broken_frame_closes_the_connection_and_the_receiver_keeps_serving(
    receiver: Pair, fault: str
) -> None:
    pair = receiver
    after_handshake, data = FRAME_FAULTS[fault]
    peer = RawPeer(pair.port)
    try:
        if after_handshake:
            peer.start_stream()
            peer.entry(Op.PUT, "before-fault.txt", b"whole")  # a whole record, then the broken frame
        peer.send(data)
        peer.assert_closed_by_peer(within=5)  # well before the 10 s handshake timeout
    finally:
        peer.close()
    # Before a valid hello the peer was never admitted: refused. After it: a protocol error.
    pair.wait_log("receive", "receiver.protocol_error" if after_handshake else "receiver.refused", timeout=5)
    wait_counters(
        pair,
        {"protocol_errors": 1, "refused_peers": 0}
        if after_handshake
        else {"protocol_errors": 0, "refused_peers": 1},
    )
    assert_receiver_alive(pair)
    assert_proper_sender_applies(pair, fault.replace(" ", "-"))


# ---------------------------------------------------------------------------------------------------------
# Refused peers and protocol errors are counted apart


def receiver_counters(pair: Pair) -> dict[str, int]:
    data: dict[str, int] = pair.status()["receiver"]["counters"]
    return data


def wait_counters(pair: Pair, want: dict[str, int]) -> None:
    pair.wait_status(
        lambda s: all(s["receiver"]["counters"].get(k) == v for k, v in want.items()),
        10,
        f"the receiver's counters to be {want}",
    )


def raw_attempt(port: int, data: bytes) -> None:
    """Connect, send ``data`` and wait until the receiver closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        try:
            while s.recv(1 << 16):
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass


def test_a_connection_that_never_completes_a_handshake_is_a_refused_peer(pair: Pair) -> None:
    # TLS receiver, as deployed: plain TCP, garbage and a TLS client that does not wait for the ACK byte
    # never complete a valid handshake. They are refused peers, not protocol errors.
    pair.start("receive")
    wait_counters(pair, {"refused_peers": 0, "protocol_errors": 0})
    cert = identity.load(pair.sender_state).cert_der
    raw_attempt(pair.port, wire.SenderProtocol("plain", 1).hello())  # plain TCP, no preamble
    raw_attempt(pair.port, b"GET / HTTP/1.1\r\nHost: standby\r\n\r\n")  # garbage
    # the pinned certificate, then TLS bytes before the receiver's ACK
    raw_attempt(pair.port, PREAMBLE + struct.pack(">H", len(cert)) + cert + b"\x16\x03\x01\x00\x05hello")
    wait_counters(pair, {"refused_peers": 3, "protocol_errors": 0})
    refused = [line for line in pair.log("receive").splitlines() if " receiver.refused " in line]
    assert len(refused) == 3, refused
    assert "receiver.protocol_error" not in pair.log("receive")
    assert_receiver_alive(pair)


def test_an_admitted_peer_that_breaks_the_protocol_is_a_protocol_error(receiver: Pair) -> None:
    pair = receiver
    wait_counters(pair, {"refused_peers": 0, "protocol_errors": 0})
    raw_attempt(pair.port, b"\xff" * 64)  # before any hello: refused
    wait_counters(pair, {"refused_peers": 1, "protocol_errors": 0})
    peer = RawPeer(pair.port)
    try:
        peer.start_stream()  # admitted
        peer.send(b"\xff" * 4096)
        peer.assert_closed_by_peer(within=5)
    finally:
        peer.close()
    wait_counters(pair, {"refused_peers": 1, "protocol_errors": 1})
    assert_receiver_alive(pair)


# ---------------------------------------------------------------------------------------------------------
# Manifests never list or hash anything outside the replica


def ask_manifest(port: int, include: list[str]) -> list[str]:
    """The paths of the receiver's manifest of ``include``, asked by an observer over real TCP."""
    peer = RawPeer(port, role="observer")
    try:
        peer.handshake()
        peer.send(peer.proto.manifest_request(1, include))
        paths: list[str] = []
        while True:
            ev = peer.event()
            if isinstance(ev, wire.ManifestPart):
                paths.extend(e.path for e in ev.entries)
            elif isinstance(ev, wire.ManifestEnd):
                return sorted(paths)
    finally:
        peer.close()


def test_a_manifest_never_follows_a_symlink_above_an_include(receiver: Pair) -> None:
    pair = receiver
    outside = pair.base / "outside"
    (outside / "inner").mkdir(parents=True)
    (outside / "inner" / "secret.txt").write_bytes(b"secret")
    (outside / "config.json").write_bytes(b'{"secret": true}')
    (pair.target / "lnk").symlink_to(outside, target_is_directory=True)
    (pair.target / "config").symlink_to(outside, target_is_directory=True)  # the default include's folder
    (pair.target / "databases" / "room").mkdir(parents=True)
    (pair.target / "databases" / "room" / "m.json").write_bytes(b"{}")
    (pair.target / "databases" / "room" / "lnk").symlink_to(outside, target_is_directory=True)

    got = ask_manifest(
        pair.port,
        ["lnk/inner", "lnk/inner/secret.txt", "config/config.json", "databases/room/lnk/inner", "databases"],
    )
    assert got == ["databases", "databases/room", "databases/room/m.json"], got
    assert "scan.symlink_skipped path='lnk/inner'" in pair.log("receive")
    assert "scan.symlink_skipped path='config/config.json'" in pair.log("receive")
    assert_receiver_alive(pair)
