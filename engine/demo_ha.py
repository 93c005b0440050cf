"""``standby demo --ha``: an HA pair on loopback that fails over and back, in temporary folders.

Two agents (``standby run``) run as separate processes, exactly as on two servers, each controlling its
own stand-in for the Synergy Join service (:mod:`engine.demoservice`, the simulator writing meetings)
through the ``command`` backend. The demo then:

1. lets the active's service write while the passive replicates;
2. kills the active's service (a crash): the passive takes over after ``failover_after``, the old active
   is fenced;
3. the old active rejoins as passive by itself: whatever it wrote that the new active never had is moved
   into quarantine (acknowledged here with ``standby quarantine ack``), then it catches up by delta;
4. fails back with ``standby failback`` (a switchover to the preferred node: stop, drain, compare the
   trees, hand over): the first node is active again, the other passive;

and prints every step with its time, the measured downtime, and whether the two services ever ran at
once (sampled every 50 ms) and whether the replica ends identical.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console

from engine import identity
from engine.demo import free_port, spawn, stop_process
from engine.demoservice import running
from engine.digest import digest_bytes

FAILOVER_AFTER = 10


class _Node:
    def __init__(self, base: Path, name: str, role: str) -> None:
        self.name = name
        self.base = base / name
        self.root = self.base / "root"
        self.state = self.base / "state"
        self.svc = self.base / "service"
        for d in (self.root, self.state, self.svc):
            d.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.role = role
        self.id = identity.create(self.state, name)[0].id
        self.config = self.base / "node.toml"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, peer: _Node) -> None:
        def q(p: Path) -> str:
            return "'" + str(p) + "'"

        ctl = [sys.executable, "-m", "engine.demoservice"]
        self.config.write_text(
            f"""[node]
name = "{self.name}"
listen = "127.0.0.1:{self.port}"
root = {q(self.root)}
state_dir = {q(self.state)}
initial_role = "{self.role}"
preferred = {"true" if self.role == "active" else "false"}

[peer]
name = "{peer.name}"
address = "127.0.0.1:{peer.port}"
id = "{peer.id}"

[service]
backend = "command"
start = {json.dumps([*ctl, "start", str(self.svc), str(self.root)])}
stop = {json.dumps([*ctl, "stop", str(self.svc), str(self.root)])}
status = {json.dumps([*ctl, "status", str(self.svc), str(self.root)])}
timeout = 30
failover_after = {FAILOVER_AFTER}
""",
            "utf-8",
        )

    def start(self) -> None:
        self.proc = spawn(["run", "--config", str(self.config)], self.base / "agent.log")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def service_pid(self) -> int | None:
        return running(self.svc)

    def status(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.state / "status.json").read_text("utf-8"))
            return data
        except (OSError, ValueError):
            return {}

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "engine", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def kill_service(self) -> None:
        pid = self.service_pid()
        if pid is not None:
            with_psutil_kill(pid)


def with_psutil_kill(pid: int) -> None:
    try:
        psutil.Process(pid).kill()
    except psutil.Error:
        pass


def _tree(root: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    base = root / "databases"
    for dirpath, _dirs, files in os.walk(base):
        for f in files:
            p = Path(dirpath) / f
            try:
                out[str(p.relative_to(root))] = digest_bytes(p.read_bytes()).hex()
            except OSError:
                continue
    return out


def _gap(downs: list[tuple[float, float]], after: float) -> float:
    """The first time neither service ran, after ``after`` (seconds; 0 if none was seen)."""
    return next((end - start for start, end in downs if end >= after), 0.0)


def run_ha_demo(keep: bool) -> int:
    con = Console()
    base = Path(tempfile.mkdtemp(prefix="standby-ha-demo-"))
    a, b = _Node(base, "join-a", "active"), _Node(base, "join-b", "passive")
    a.write_config(b)
    b.write_config(a)
    both: list[float] = []
    downs: list[tuple[float, float]] = []  # (from, to): neither service ran
    stop_sampling = threading.Event()

    def sample() -> None:
        down_since: float | None = None
        while not stop_sampling.is_set():
            now = time.monotonic()
            up = (a.service_pid() is not None, b.service_pid() is not None)
            if all(up):
                both.append(now)
            if not any(up) and down_since is None:
                down_since = now
            elif any(up) and down_since is not None:
                downs.append((down_since, now))
                down_since = None
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, name="sampler", daemon=True)
    t0 = time.monotonic()

    def say(text: str) -> None:
        con.print(f"[dim]{time.monotonic() - t0:6.1f} s[/]  {text}")

    def wait(cond: Callable[[], bool], timeout: float, what: str) -> float:
        start = time.monotonic()
        while not cond():
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(0.05)
        return time.monotonic() - start

    def roles() -> str:
        return f"{a.name} {a.status().get('role', '?')}, {b.name} {b.status().get('role', '?')}"

    con.print(f"[bold]standby HA demo[/] in {base}\n  configs: {a.config}, {b.config}")
    rc = 1
    try:
        sampler.start()
        a.start()
        b.start()
        wait(lambda: a.service_pid() is not None, 60, f"{a.name}'s service")
        wait(lambda: b.status().get("role") == "passive", 60, f"{b.name} passive")
        say(f"{a.name} is active and runs the service (the simulator books meetings); {b.name} is passive")
        time.sleep(3)
        wait(lambda: _tree(a.root) == _tree(b.root) != {}, 60, "the replica")
        say(f"{b.name} holds an identical replica ({len(_tree(b.root))} files)")

        a.kill_service()
        killed = time.monotonic()
        say(
            f"[bold red]{a.name}'s service crashed[/]; "
            f"the passive counts {FAILOVER_AFTER} s before failing over"
        )
        wait(lambda: b.service_pid() is not None, FAILOVER_AFTER + 60, f"{b.name}'s service")
        rto = time.monotonic() - killed
        say(f"[bold green]failed over[/]: {b.name} runs the service {rto:.1f} s after the crash; {roles()}")

        wait(lambda: a.status().get("role") == "passive", 60, f"{a.name} to rejoin by itself")
        held = a.status().get("quarantined") or 0
        say(
            f"{a.name} rejoined as passive by itself: {held} file(s) it wrote that {b.name} never had are in "
            "quarantine"
        )
        time.sleep(2)
        wait(lambda: _tree(a.root) == _tree(b.root), 60, f"{a.name} to catch up")
        say(f"{a.name} caught up from {b.name} by delta; {roles()}")
        if held:
            r = a.cli("quarantine", "ack", "--all")
            say(f"standby quarantine ack --all on {a.name}: {r.stdout.strip() or r.stderr.strip()}")
            wait(lambda: not (b.status().get("peer") or {}).get("quarantined"), 30, "the ack to be heard")

        wait(lambda: (a.status().get("peer") or {}).get("reachable") is True, 30, "the agents to meet")
        mark = time.monotonic()
        say(f"standby failback on {b.name}: a switchover back to the preferred node {a.name}")
        r = b.cli("failback")
        for line in (r.stdout or r.stderr).strip().splitlines():
            con.print(f"           | {line}", style="dim", markup=False, highlight=False, soft_wrap=True)
        if r.returncode != 0:
            raise TimeoutError(f"failback failed: {r.stderr.strip() or r.stdout.strip()}")
        wait(lambda: a.service_pid() is not None, 60, f"{a.name}'s service")
        time.sleep(0.2)  # the sampler closes the gap on its next look
        down = _gap(downs, mark)
        wait(lambda: b.status().get("role") == "passive", 60, f"{b.name} passive")
        say(f"[bold green]failed back[/]: {a.name} runs the service again ({down:.1f} s down); {roles()}")
        time.sleep(3)
        wait(lambda: _tree(a.root) == _tree(b.root), 60, "the replica")
        say(f"{b.name} is passive again and identical; {roles()}")
        stop_sampling.set()
        sampler.join(5)
        if both:
            con.print(f"[bold red]both services ran at once[/] ({len(both)} samples)")
        else:
            con.print("[bold green]never two services at once[/] (both sampled every 50 ms)")
            con.print(f"failover: {rto:.1f} s of downtime after a crash; failback (switchover): {down:.1f} s")
            rc = 0
    except (TimeoutError, OSError) as e:
        con.print(f"[bold red]demo failed[/]: {e} (logs: {a.base / 'agent.log'}, {b.base / 'agent.log'})")
        keep = True
    finally:
        stop_sampling.set()
        for n in (a, b):
            n.stop()
        for n in (a, b):
            subprocess.run(
                [sys.executable, "-m", "engine.demoservice", "stop", str(n.svc), str(n.root)],
                capture_output=True,
                timeout=30,
            )
        if keep:
            con.print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return rc
