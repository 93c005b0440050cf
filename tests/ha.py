"""Test harness for HA pairs: two `standby run` agents as real processes on 127.0.0.1, each with its own
service (a real process controlled through the command backend, tests/svc_helper.py), and a sampler that
looks at both services every 50 ms for the whole test and remembers any moment both ran."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import identity
from tests.pair import ROOT, free_port, tree, wait_for
from tests.svc_helper import running

SVC = str(ROOT / "tests" / "svc_helper.py")
#: The alert command of the test nodes: appends each event (JSON on stdin) as a line to a file.
ALERT_SCRIPT = "import sys; f = open(sys.argv[1], 'a'); f.write(sys.stdin.read().strip() + '\\n')"


@dataclass
class HaNode:
    name: str
    base: Path
    port: int
    peer_port: int = 0
    initial_role: str = "passive"
    failover_after: float = 10.0
    preferred: bool = False
    extra: str = ""  # more TOML, appended to the config
    metrics_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        self.root = self.base / "root"
        self.state = self.base / "state"
        self.svc = self.base / "svc"
        for d in (self.root, self.state, self.svc):
            d.mkdir(parents=True, exist_ok=True)
        self.config = self.base / "node.toml"
        self.id = identity.create(self.state, self.name)[0].id

    def write_config(self, peer: HaNode) -> None:
        cmd = [sys.executable, SVC]
        self.config.write_text(
            f"""
[node]
name = "{self.name}"
listen = "127.0.0.1:{self.port}"
root = '{self.root}'
state_dir = '{self.state}'
initial_role = "{self.initial_role}"
preferred = {"true" if self.preferred else "false"}

[peer]
name = "{peer.name}"
address = "127.0.0.1:{peer.port}"
id = "{peer.id}"

[service]
backend = "command"
start = {json.dumps([*cmd, "start", str(self.svc)])}
stop = {json.dumps([*cmd, "stop", str(self.svc)])}
status = {json.dumps([*cmd, "status", str(self.svc)])}
timeout = 20
failover_after = {self.failover_after}

[alert]
command = {json.dumps([sys.executable, "-c", ALERT_SCRIPT, str(self.base / "alerts.jsonl")])}
{self.extra}
""",
            "utf-8",
        )

    def log_path(self) -> Path:
        return self.base / f"run.{self.starts}.log"

    def start(self, env: dict[str, str] | None = None) -> None:
        self.starts += 1
        with open(self.log_path(), "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "engine", "--log-level", "debug", "run", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, **(env or {})},
            )

    def log(self) -> str:
        try:
            return self.log_path().read_text("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout)
        return self.proc.returncode

    def alerts(self) -> list[dict[str, Any]]:
        try:
            lines = (self.base / "alerts.jsonl").read_text("utf-8").splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def service_pid(self) -> int | None:
        return running(self.svc)

    def kill_service(self) -> None:
        """The service dies by itself (a crash), without the agent asking."""
        pid = self.service_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)

    def status(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.state / "status.json").read_text("utf-8"))
        except (FileNotFoundError, ValueError):
            return {}
        return data

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "engine", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )

    def cleanup(self) -> None:
        self.kill()
        try:
            pids = [int(x) for x in (self.svc / "pids").read_text().split()]
        except (OSError, ValueError):
            pids = []
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


@dataclass
class Sampler:
    """Both services every 50 ms: the moments both ran, and when each started and stopped."""

    nodes: list[HaNode]
    interval: float = 0.05
    both: list[float] = field(default_factory=list)
    samples: int = 0
    history: list[tuple[float, tuple[bool, ...]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last: tuple[bool, ...] | None = None
        while not self._stop.is_set():
            now = time.monotonic()
            up = tuple(n.service_pid() is not None for n in self.nodes)
            self.samples += 1
            if all(up):
                self.both.append(now)
            if up != last:
                self.history.append((now, up))
                last = up
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def first_time(self, cond: Callable[[tuple[bool, ...]], bool], after: float = 0.0) -> float | None:
        return next((t for t, up in self.history if t >= after and cond(up)), None)


def make_pair(base: Path, failover_after: float = 10.0, extra: str = "") -> tuple[HaNode, HaNode]:
    a = HaNode(
        "join-a",
        base / "a",
        free_port(),
        initial_role="active",
        failover_after=failover_after,
        preferred=True,
        extra=extra,
    )
    b = HaNode("join-b", base / "b", free_port(), failover_after=failover_after, extra=extra)
    a.write_config(b)
    b.write_config(a)
    return a, b


@contextlib.contextmanager
def sampled_pair(
    base: Path, failover_after: float = 10.0, extra: str | Callable[[HaNode], str] = ""
) -> Iterator[tuple[HaNode, HaNode, Sampler]]:
    """A pair (not started) and a running sampler; on the way out the sampler stops and every process of
    both nodes is killed. ``extra``: more TOML for both configs, or a function giving each node's. The
    caller asserts on ``sampler.both``."""
    a, b = make_pair(base, failover_after, extra if isinstance(extra, str) else "")
    if callable(extra):
        for n in (a, b):
            n.extra = extra(n)
        a.write_config(b)
        b.write_config(a)
    sampler = Sampler([a, b])
    sampler.start()
    try:
        yield a, b, sampler
    finally:
        sampler.stop()
        for n in (a, b):
            n.cleanup()


def same_trees(a: HaNode, b: HaNode) -> bool:
    return tree(a.root / "databases") == tree(b.root / "databases")


__all__ = ["HaNode", "Sampler", "make_pair", "same_trees", "sampled_pair", "wait_for"]
