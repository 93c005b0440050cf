"""``standby demo``: a live pair on loopback, in temporary folders, with a simulated Synergy Join writing.

The receiver and the sender run as separate processes (``python -m engine``), exactly as on two servers;
the writer books, updates and deletes meetings and rewrites sync cookies. A live table shows both nodes'
positions and lag; at the end the replica is verified by hash.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from engine import config, identity
from engine.guards import sender_check
from engine.observer import verify
from engine.simulator import ServiceSimulator
from engine.status import read_status


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_config(base: Path, port: int, sender_id: str, receiver_id: str) -> str:
    def q(p: Path) -> str:
        return "'" + str(p) + "'"  # TOML literal string: backslashes in Windows paths stay as they are

    return f"""\
[sender]
source = {q(base / "active")}
include = ["databases", "config/config.json"]
peer = "127.0.0.1:{port}"
state_dir = {q(base / "sender-state")}
peer_id = "{receiver_id}"
reconcile_interval = 30

[receiver]
listen = "127.0.0.1:{port}"
target = {q(base / "passive")}
state_dir = {q(base / "receiver-state")}
peer_id = "{sender_id}"

[[guard]]
pattern = "config/config.json"
rule = "json"

[[guard]]
pattern = "databases/**/*.cookie"
rule = "base64"
"""


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """``python -m engine ARGS`` as a child process (its own process group on Windows, for Ctrl-Break),
    its stderr (the log) into ``log``."""
    kw: dict[str, object] = {}
    if sys.platform == "win32":
        kw["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined,unused-ignore]
    with open(log, "wb") as err:
        p: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            [sys.executable, "-m", "engine", *args], stdout=subprocess.DEVNULL, stderr=err, **kw
        )
    return p


def stop_process(p: subprocess.Popen[bytes]) -> None:
    """Ask a child ``standby`` process to stop (SIGTERM, Ctrl-Break on Windows); kill it after 15 s."""
    if p.poll() is None:
        if sys.platform == "win32":
            p.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined,unused-ignore]
        else:
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _table(
    cfg: config.Config,
    sim_batches: int,
    elapsed: float,
    statuses: tuple[dict[str, Any], dict[str, Any]] | None = None,
) -> Table:
    assert cfg.sender is not None and cfg.receiver is not None
    if statuses is None:
        statuses = (read_status(cfg.sender.state_dir) or {}, read_status(cfg.receiver.state_dir) or {})
    s, r = statuses
    t = Table(title=f"standby demo: {elapsed:5.1f} s, {sim_batches} writer batches")
    t.add_column("node")
    t.add_column("state")
    t.add_column("position")
    t.add_column("lag")
    t.add_column("counters")
    sc = s.get("counters", {})
    t.add_row(
        "sender (active)",
        "connected" if s.get("connected") else "connecting",
        f"journal head {s.get('head', 0)}, acked {s.get('acked_seq', 0)}",
        f"{s.get('lag_records', 0)} records, {s.get('lag_seconds', 0):.3f} s",
        f"journaled {sc.get('journaled', 0)}, held torn {sc.get('held', 0)}, "
        f"reconciles {sc.get('reconciles', 0)}",
    )
    rc = r.get("counters", {})
    t.add_row(
        "receiver (passive)",
        "streaming" if r.get("connected") else "listening",
        f"applied {r.get('applied_seq', 0)}",
        "",
        f"groups {rc.get('groups', 0)}, problems {rc.get('problems', 0)}",
    )
    return t


def wait_final_status(
    sender_state: Path, receiver_state: Path, verified_at: float, replica_seq: int, timeout: float = 5.0
) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """The two nodes' status as of the verdict: wait until both have rewritten it since ``verified_at``
    (wall clock; each does about once a second) and it shows the verified position (the receiver at
    ``replica_seq`` or later, and the sender's head acknowledged and applied). A table printed from the
    status read just before would show positions up to a second old next to "verified identical".
    Returns the statuses and whether they settled within ``timeout`` (if not: the last ones read)."""
    deadline = time.monotonic() + timeout
    while True:
        s = read_status(sender_state) or {}
        r = read_status(receiver_state) or {}
        fresh = float(s.get("updated", 0)) > verified_at and float(r.get("updated", 0)) > verified_at
        head = s.get("head", -1)
        if fresh and s.get("acked_seq") == head == r.get("applied_seq") and head >= replica_seq:
            return s, r, True
        if time.monotonic() >= deadline:
            return s, r, False
        time.sleep(0.05)


def run_demo(seconds: float, rooms: int, rate: float, keep: bool) -> int:
    con = Console()
    base = Path(tempfile.mkdtemp(prefix="standby-demo-"))
    port = free_port()
    cfg_path = base / "standby.toml"
    sender_id = identity.create(base / "sender-state", "demo-active")[0].id
    receiver_id = identity.create(base / "receiver-state", "demo-passive")[0].id
    cfg_path.write_text(demo_config(base, port, sender_id, receiver_id), "utf-8")
    cfg = config.load(cfg_path)
    assert cfg.sender is not None
    check = sender_check(cfg)
    sim = ServiceSimulator(base / "active", rooms=rooms, meetings_per_room=10, seed=1)
    sim.setup()
    con.print(
        f"[bold]standby demo[/] in {base}\n  config: {cfg_path}\n"
        f"  active (source): {base / 'active'}\n  passive (replica): {base / 'passive'}"
    )
    rx = spawn(["receive", "--config", str(cfg_path)], base / "receiver.log")
    tx = spawn(["send", "--config", str(cfg_path)], base / "sender.log")
    batches = [0]
    stop_writer = threading.Event()

    def writer() -> None:
        while not stop_writer.is_set():
            sim.batch()
            batches[0] += 1
            stop_writer.wait(1.0 / rate)

    w = threading.Thread(target=writer, name="writer", daemon=True)
    t0 = time.monotonic()
    rc = 1
    settled = True
    try:
        w.start()
        with Live(_table(cfg, 0, 0.0), console=con, refresh_per_second=4) as live:
            while time.monotonic() - t0 < seconds:
                time.sleep(0.25)
                live.update(_table(cfg, batches[0], time.monotonic() - t0))
                for name, p in (("receiver", rx), ("sender", tx)):
                    if p.poll() is not None:
                        raise RuntimeError(f"the {name} exited early; see {base / (name + '.log')}")
            stop_writer.set()
            w.join()
            deadline = time.monotonic() + 30
            report = asyncio.run(verify(cfg.sender, check))
            while not report.identical and time.monotonic() < deadline:
                time.sleep(0.2)
                live.update(_table(cfg, batches[0], time.monotonic() - t0))
                report = asyncio.run(verify(cfg.sender, check))
            statuses = None
            if report.identical:
                assert cfg.receiver is not None
                s, r, settled = wait_final_status(
                    cfg.sender.state_dir, cfg.receiver.state_dir, time.time(), report.replica_seq
                )
                statuses = (s, r)
            live.update(_table(cfg, batches[0], time.monotonic() - t0, statuses))
        if not con.is_terminal:
            con.line()  # the last frame of a Live that is not on a terminal ends without a newline
        if report.identical:
            con.print(
                f"[green]verified[/]: the replica is identical to the source, "
                f"{report.source_entries} files and folders, by xxh3-128 hash"
            )
            if not settled:
                con.print("(the positions above are the last the nodes reported; they had not caught up)")
            rc = 0
        else:
            con.print(f"[red]{len(report.differences)} differences remain[/]:")
            for d in report.differences[:20]:
                con.print(f"  {d.kind:8} {d.path} {d.detail}")
    except KeyboardInterrupt:
        con.print("interrupted")
        rc = 130
    except RuntimeError as e:
        con.print(f"[red]{e}[/]")
    finally:
        stop_writer.set()
        stop_process(tx)
        stop_process(rx)
        if keep:
            con.print(f"kept {base} (logs: sender.log, receiver.log)")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return rc
