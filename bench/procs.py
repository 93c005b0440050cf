"""Processes the benchmark starts: one registry, so every one of them is stopped in a ``finally``.

Owns: spawning (output to a log file), stopping (SIGTERM, then SIGKILL after a grace period), waiting for
a line in a log, and reading a process's CPU seconds (its own and its waited-for children's) and peak RSS
(and starting the peak again, for a phase's own).

Must not: know about any particular tool.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil


@dataclass
class Spawned:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    argv: tuple[str, ...]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self, offset: int = 0) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_size(self) -> int:
        try:
            return self.log.stat().st_size
        except FileNotFoundError:
            return 0


@dataclass
class Registry:
    """Every process started through it; :meth:`stop_all` ends those still running."""

    procs: list[Spawned] = field(default_factory=list)

    def spawn(self, name: str, argv: Sequence[str], log: Path, cwd: Path | None = None) -> Spawned:
        with open(log, "ab") as out:
            p = subprocess.Popen(
                list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd
            )
        s = Spawned(name, p, log, tuple(argv))
        self.procs.append(s)
        return s

    def stop(self, s: Spawned, grace: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Returns the exit code."""
        if s.proc.poll() is None:
            s.proc.send_signal(signal.SIGTERM)
            try:
                s.proc.wait(grace)
            except subprocess.TimeoutExpired:
                s.proc.kill()
                s.proc.wait(10)
        if s in self.procs:
            self.procs.remove(s)
        return s.proc.returncode

    def stop_all(self) -> None:
        for s in list(reversed(self.procs)):
            try:
                self.stop(s, grace=5.0)
            except (OSError, subprocess.SubprocessError):
                pass


def wait_log(s: Spawned, text: str, timeout: float, offset: int = 0, interval: float = 0.005) -> float:
    """Wait until ``text`` appears in the process's log after ``offset``; the ``perf_counter()`` then."""
    deadline = time.perf_counter() + timeout
    while True:
        now = time.perf_counter()
        if text in s.log_text(offset):
            return now
        if not s.alive():
            raise RuntimeError(f"{s.name} exited with {s.proc.returncode}: {s.log_text()[-2000:]}")
        if now > deadline:
            raise TimeoutError(f"{s.name}: no {text!r} in its log after {timeout:g} s")
        time.sleep(interval)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and of its children that have been waited for."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(t.user + t.system + t.children_user + t.children_system)


def tree_cpu_seconds(pid: int) -> float:
    """:func:`cpu_seconds` of ``pid`` plus what its still-running descendants have used so far."""
    total = cpu_seconds(pid)
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return total
    for c in children:
        try:
            t = c.cpu_times()
        except psutil.Error:
            continue
        total += float(t.user + t.system)
    return total


def in_disk_wait_or_parent(pid: int) -> bool:
    """Whether ``pid`` has a running child, or a thread (its own or a descendant's) waiting on the disk
    (state D): work in progress that uses no CPU, such as an fsync on a busy disk."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return False
    if len(procs) > 1:
        return True
    for p in procs:
        try:
            tasks = os.listdir(f"/proc/{p.pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{p.pid}/task/{tid}/stat", encoding="ascii", errors="replace") as f:
                    stat = f.read()
            except OSError:
                continue
            if stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] == "D":
                return True
    return False


def peak_rss_bytes(pid: int) -> int:
    """The peak resident set size of ``pid`` (VmHWM on Linux; the current RSS elsewhere)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


def reset_peak_rss(pid: int) -> bool:
    """Start ``pid``'s peak RSS (VmHWM) again from its current RSS, so that :func:`peak_rss_bytes` then
    gives the peak since now (Linux 4.0+: ``5`` into its ``clear_refs``). False where that cannot be done."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_timed(argv: Sequence[str], log: Path, cwd: Path | None = None) -> tuple[float, float, int]:
    """Run a command to completion: (wall seconds, CPU seconds of it and its children, exit code)."""
    with open(log, "ab") as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(
            list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd
        )
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_utime + usage.ru_stime, p.returncode
