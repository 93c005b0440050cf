"""Test harness: a real etcd (Debian's ``etcd-server``) of 1 or 3 members on 127.0.0.1, by process id.

Every member gets a free client and peer port, its own data folder (mode 0700) and log file under the
test's folder. :func:`running_etcd` starts them, waits until each member's ``/health`` says true, and on
the way out stops them one at a time (SIGTERM by pid, SIGKILL after a timeout): stopping all at once
leaves the raft leader waiting out a leadership transfer (~5 s, ``../shared/COMPONENTS.md``). A member
can be stopped and started again with its data kept, which is how tests take a member or the quorum away.
With ``tls`` (:func:`make_tls`: a throw-away CA and one certificate for 127.0.0.1) the client URLs are
``https`` and etcd requires a client certificate from that CA; peers stay plain http on loopback.

When the ``etcd`` binary is missing the test skips with the reason, or fails under ``CI=true``
(``need_binary``).

Must not: know about the witness or its keys; leave a process behind (every exit path stops them all).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import need_binary, stop_by_pid

#: Short raft timings: elections in about half a second (the minimum lease TTL becomes 1 s).
FAST_RAFT = ("--heartbeat-interval", "50", "--election-timeout", "500")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1 (held open together, so they differ)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path  # for 127.0.0.1, server and client use; etcd and the tests' clients share it
    key: Path


def make_tls(root: Path, name: str = "ca") -> TlsFiles:
    """A new CA under ``root`` and a certificate it signed for 127.0.0.1 (server and client auth)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    root.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def build(subject: str, issuer: x509.Name, public: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"standby test {name}")])
    ca = (
        build(f"standby test {name}", ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        build("127.0.0.1", ca_name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(root / f"{name}.pem", root / f"{name}-leaf.pem", root / f"{name}-leaf.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    files.key.chmod(0o600)
    return files


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log: Path
    scheme: str = "http"
    proc: subprocess.Popen[bytes] | None = None
    more_ports: tuple[int, ...] = ()  # more client ports, the same member (a client each, to cut apart)

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    def url(self, i: int) -> str:
        """The member's ``i``-th client URL (0: :attr:`endpoint`)."""
        port = self.client_port if i == 0 else self.more_ports[i - 1]
        return f"{self.scheme}://127.0.0.1:{port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class EtcdCluster:
    """``size`` members under ``root``; nothing runs until :meth:`start`."""

    binary: str
    root: Path
    size: int = 1
    tls: TlsFiles | None = None
    token: str = "standby-test"
    clients: int = 1  # client ports per member: give each client its own to cut one off (nftables)
    members: list[Member] = field(default_factory=list)
    #: Seconds from the first spawn until every member was healthy, per (re)start.
    startup_seconds: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        per = 1 + self.clients
        ports = free_ports(per * self.size)
        self.root.mkdir(parents=True, exist_ok=True)
        scheme = "http" if self.tls is None else "https"
        for i in range(self.size):
            name = f"n{i}"
            mine = ports[per * i : per * (i + 1)]
            self.members.append(
                Member(
                    name,
                    mine[0],
                    mine[-1],
                    self.root / name,
                    self.root / f"{name}.log",
                    scheme,
                    more_ports=tuple(mine[1:-1]),
                )
            )
        self._ssl: ssl.SSLContext | None = None
        if self.tls is not None:
            self._ssl = ssl.create_default_context(cafile=str(self.tls.ca))
            self._ssl.load_cert_chain(self.tls.cert, self.tls.key)

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def client_endpoints(self, i: int) -> list[str]:
        """Every member's ``i``-th client URL: what client ``i`` is configured with."""
        return [m.url(i) for m in self.members]

    def _argv(self, m: Member) -> list[str]:
        cluster = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        tls: list[str] = []
        if self.tls is not None:
            tls = [
                "--cert-file", str(self.tls.cert), "--key-file", str(self.tls.key),
                "--trusted-ca-file", str(self.tls.ca), "--client-cert-auth",
            ]  # fmt: skip
        return [
            self.binary,
            "--name", m.name,
            "--data-dir", str(m.data_dir),
            "--listen-client-urls", ",".join(m.url(i) for i in range(self.clients)),
            "--advertise-client-urls", m.endpoint,
            "--listen-peer-urls", m.peer_url,
            "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", cluster,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self.token,
            *FAST_RAFT,
            *tls,
            "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
        ]  # fmt: skip

    def _spawn(self, m: Member) -> None:
        assert not m.running, f"{m.name} is already running"
        m.data_dir.mkdir(mode=0o700, exist_ok=True)
        with m.log.open("ab") as log:
            m.proc = subprocess.Popen(
                self._argv(m), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    def start(self, timeout: float = 20.0) -> float:
        """Spawn every member and wait until all are healthy; seconds it took."""
        t0 = time.monotonic()
        for m in self.members:
            self._spawn(m)
        self.wait_healthy(self.members, timeout)
        took = time.monotonic() - t0
        self.startup_seconds.append(took)
        return took

    def start_member(self, i: int, timeout: float = 20.0) -> float:
        """Start member ``i`` again on its old data (it rejoins); seconds until it is healthy."""
        t0 = time.monotonic()
        self._spawn(self.members[i])
        self.wait_healthy([self.members[i]], timeout)
        took = time.monotonic() - t0
        self.startup_seconds.append(took)
        return took

    def stop_member(self, i: int, timeout: float = 5.0) -> None:
        """SIGTERM member ``i`` by pid, SIGKILL if it is still there after ``timeout`` seconds."""
        m = self.members[i]
        p = m.proc
        if p is None:
            return
        try:
            stop_by_pid(p, timeout)
        finally:
            m.proc = None

    def stop_all(self, timeout: float = 5.0) -> None:
        """Stop every member, one at a time (followers are no different: order does not matter)."""
        for i in range(len(self.members)):
            self.stop_member(i, timeout)

    def healthy(self, m: Member) -> bool:
        try:
            with urllib.request.urlopen(f"{m.endpoint}/health", timeout=0.5, context=self._ssl) as r:
                return bool(json.loads(r.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def wait_healthy(self, members: list[Member], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            dead = [m.name for m in members if not m.running]
            if dead:
                raise RuntimeError(f"etcd member(s) {dead} exited:\n{self.log_tails()}")
            if all(self.healthy(m) for m in members):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd not healthy after {timeout} s:\n{self.log_tails()}")
            time.sleep(0.05)

    def log_tails(self, lines: int = 15) -> str:
        out = []
        for m in self.members:
            text = m.log.read_text("utf-8", "replace") if m.log.exists() else ""
            out.append(f"--- {m.name} ---\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(out)


@contextlib.contextmanager
def running_etcd(
    root: Path, size: int = 1, tls: TlsFiles | None = None, clients: int = 1
) -> Iterator[EtcdCluster]:
    """A started cluster of ``size`` members under ``root``, stopped on the way out whatever happens.

    Skips (fails under ``CI=true``) when etcd is not installed."""
    binary = need_binary("etcd")
    cluster = EtcdCluster(binary, root, size, tls, clients=clients)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop_all()
