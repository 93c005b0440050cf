"""Test harness: a real receiver and sender as separate processes on 127.0.0.1, on real folders."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import identity
from engine.digest import Hasher, digest_bytes
from engine.model import TEMP_MARKER

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree(root: Path, with_mtime: bool = True) -> dict[str, Any]:
    """Every file and folder below ``root``: relative path -> ('dir',) or (digest, mtime_ns)."""
    out: dict[str, Any] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
        for d in dirnames:
            out[f"{d}" if rel == "." else f"{rel}/{d}"] = ("dir",)
        for f in filenames:
            p = os.path.join(dirpath, f)
            key = f if rel == "." else f"{rel}/{f}"
            try:
                data = Path(p).read_bytes()
                mt = os.stat(p).st_mtime_ns if with_mtime else 0
            except FileNotFoundError:
                continue
            out[key] = (digest_bytes(data).hex(), mt)
    return out


def temp_files(root: Path) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if TEMP_MARKER in f]


def wait_for(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@dataclass
class Pair:
    base: Path
    port: int = field(default_factory=free_port)
    sender_extra: str = ""
    receiver_extra: str = ""
    guards: str = ""
    include: tuple[str, ...] = ("databases", "config/config.json")
    #: The receiver's ``target`` when it is not the local folder :attr:`target` (an smb:// URL whose
    #: folder on the local disk the test then sets as :attr:`target`).
    target_location: str = ""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    starts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.source = self.base / "active"
        self.target = self.base / "passive"
        self.sender_state = self.base / "sender-state"
        self.receiver_state = self.base / "receiver-state"
        self.source.mkdir(parents=True, exist_ok=True)
        self.config = self.base / "standby.toml"
        self.write_config()

    def write_config(self) -> None:
        inc = ", ".join(f'"{i}"' for i in self.include)
        sid = identity.create(self.sender_state, "test-sender")[0].id
        rid = identity.create(self.receiver_state, "test-receiver")[0].id
        self.config.write_text(
            f"""
[sender]
source = '{self.source}'
include = [{inc}]
peer = "127.0.0.1:{self.port}"
state_dir = '{self.sender_state}'
peer_id = "{rid}"
settle = 0.2
retry_max = 0.5
{self.sender_extra}

[receiver]
listen = "127.0.0.1:{self.port}"
target = '{self.target_location or self.target}'
state_dir = '{self.receiver_state}'
peer_id = "{sid}"
{self.receiver_extra}
{self.guards}
""",
            "utf-8",
        )

    def _log(self, role: str) -> Path:
        n = self.starts.get(role, 0)
        return self.base / f"{role}.{n}.log"

    def start(self, role: str, *extra: str, wait: bool = True) -> subprocess.Popen[bytes]:
        assert role in ("send", "receive")
        self.starts[role] = self.starts.get(role, 0) + 1
        log = open(self._log(role), "wb")  # noqa: SIM115
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "engine",
                "--log-level",
                "debug",
                role,
                "--config",
                str(self.config),
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        log.close()
        self.procs[role] = p
        if wait and role == "receive":
            wait_for(self._listening, 20, "the receiver to listen")
        if wait and role == "send":
            wait_for(
                lambda: "send.connected" in self.log("send") or p.poll() is not None,
                20,
                "the sender to connect",
            )
        return p

    def _listening(self) -> bool:
        p = self.procs["receive"]
        if p.poll() is not None:
            raise AssertionError(f"receiver exited with {p.returncode}:\n{self.log('receive')}")
        return "receiver.listening" in self.log("receive")

    def log(self, role: str) -> str:
        try:
            return self._log(role).read_text("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def all_logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text('utf-8', errors='replace')[-4000:]}"
            for p in sorted(self.base.glob("*.log"))
        )

    def kill(self, role: str) -> None:
        p = self.procs[role]
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait(10)

    def stop(self, role: str, timeout: float = 20) -> int:
        p = self.procs[role]
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                raise AssertionError(f"{role} did not stop on SIGTERM within {timeout} s") from None
        return p.returncode

    def stop_all(self) -> None:
        for role in list(self.procs):
            p = self.procs[role]
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait(10)

    def source_tree(self) -> dict[str, Any]:
        return {k: v for k, v in tree(self.source).items() if self._included(k)}

    def replica_tree(self) -> dict[str, Any]:
        return {k: v for k, v in tree(self.target).items() if self._included(k)}

    def _included(self, rel: str) -> bool:
        return any(rel == i or rel.startswith(i + "/") for i in self.include)

    def converged(self) -> bool:
        return self.source_tree() == self.replica_tree()

    def wait_converged(self, timeout: float = 30) -> None:
        try:
            wait_for(self.converged, timeout, "the replica to match the source", interval=0.1)
        except AssertionError:
            s, r = self.source_tree(), self.replica_tree()
            diff = sorted(k for k in set(s) | set(r) if s.get(k) != r.get(k))
            raise AssertionError(
                f"replica differs at {len(diff)} paths, e.g. {diff[:10]}\n{self.all_logs()}"
            ) from None

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "engine", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )

    # -- helpers added for the end-to-end replication tests (additive) ---------------------------------------
    def wait_log(self, role: str, text: str, timeout: float = 20) -> None:
        """Wait until the current run's log of ``role`` holds ``text``; fail with every log if not."""
        try:
            wait_for(lambda: text in self.log(role), timeout, f"{text!r} in the {role} log")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.all_logs()}") from None

    def wait_exit(self, role: str, timeout: float = 30) -> int:
        """Wait for ``role`` to exit on its own and return its exit code."""
        p = self.procs[role]
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{role} did not exit within {timeout} s\n{self.all_logs()}") from None

    def status(self) -> dict[str, Any]:
        """What ``standby status --config F --json`` prints, parsed."""
        r = self.cli("status", "--config", str(self.config), "--json")
        # 0 healthy, 1 degraded (not connected), 3 halted, 5 not running: all print the status.
        assert r.returncode in (0, 1, 3, 5), f"status exited with {r.returncode}: {r.stderr}"
        data: dict[str, Any] = json.loads(r.stdout)
        return data

    def wait_status(
        self, cond: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> dict[str, Any]:
        """Poll ``standby status`` (the processes rewrite it about once a second) until ``cond`` holds."""
        seen: list[dict[str, Any]] = []

        def check() -> bool:
            st = self.status()
            seen[:] = [st]
            return cond(st)

        try:
            wait_for(check, timeout, what, interval=0.3)
        except AssertionError as e:
            last = seen[-1] if seen else None
            raise AssertionError(f"{e}; last status: {last}\n{self.all_logs()}") from None
        return seen[-1]


def file_digest(path: Path, chunk: int = 8 << 20) -> str:
    """xxh3-128 of a file, read in chunks (for files too large to read whole)."""
    h = Hasher()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.digest().hex()
