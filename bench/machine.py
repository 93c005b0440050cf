"""The machine a run happened on, and its raw limits, so every figure can be read in context.

Owns: a description (cores, CPU model, memory, kernel, Python, the disk and file system under the work
folder, tool versions) and its limits: ``cp -a`` of the tree, the fsynced replace rate, a sequential
durable write (one file written and fsynced), and loopback TCP throughput.

Must not: run any replicator.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.trees import snapshot


@dataclass
class Machine:
    cores: int
    cpu_model: str
    memory_gib: float
    kernel: str
    python: str
    disk: str
    tools: dict[str, str] = field(default_factory=dict)
    #: 1, 5 and 15 minute load averages when the run started and when it ended: other work on the
    #: machine (a load near or above the core count) makes every figure slower and noisier.
    load_start: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_end: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def busy(self) -> bool:
        return max(self.load_start[0], self.load_end[0]) > 0.5 * max(1, self.cores)


@dataclass
class Limits:
    cp_seconds: float = 0.0
    cp_files_per_s: float = 0.0
    cp_sync_seconds: float = 0.0  # cp -a, then sync: the copy made durable
    walk_seconds: float = 0.0  # a walk that stats every file of the tree (the floor of a reconciliation)
    replace_per_s: float = 0.0  # write temp + fsync + rename
    replace_dirsync_per_s: float = 0.0  # the same + fsync of the folder (what standby's apply does)
    loopback_mib: int = 0
    loopback_mib_per_s: float = 0.0
    #: One file of ``disk_write_mib`` MiB written in 1 MiB pieces, then fsynced (0: not measured).
    disk_write_mib: int = 0
    disk_write_mib_per_s: float = 0.0


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "not installed"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _disk(path: Path) -> str:
    """Device, file system and size of the mount holding ``path``; rotational flag where known."""
    best = None
    for part in psutil.disk_partitions(all=True):
        if str(path).startswith(part.mountpoint) and (
            best is None or len(part.mountpoint) > len(best.mountpoint)
        ):
            best = part
    usage = shutil.disk_usage(path)
    if best is None:
        return f"{usage.total / 2**30:.0f} GiB"
    kind = ""
    dev = os.path.basename(best.device)
    rot = Path(f"/sys/block/{dev.rstrip('0123456789')}/queue/rotational")
    if rot.exists():
        kind = ", rotational" if rot.read_text().strip() == "1" else ", non-rotational"
    return (
        f"{best.device} {best.fstype} at {best.mountpoint} ({usage.total / 2**30:.0f} GiB, "
        f"{usage.free / 2**30:.0f} GiB free{kind}; options {best.opts})"
    )


def describe(work: Path) -> Machine:
    import sys

    m = Machine(
        cores=os.cpu_count() or 0,
        cpu_model=_cpu_model(),
        memory_gib=round(psutil.virtual_memory().total / 2**30, 1),
        kernel=f"{platform.system()} {platform.release()}",
        python=f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        disk=_disk(work),
        load_start=os.getloadavg(),
    )
    m.tools["rsync"] = _first_line(["rsync", "--version"]) if shutil.which("rsync") else "not installed"
    m.tools["lsyncd"] = _first_line(["lsyncd", "--version"]) if shutil.which("lsyncd") else "not installed"
    return m


def cp_tree(src: Path, work: Path) -> tuple[float, float, float]:
    """``cp -a`` of the tree into ``work``: (seconds, files per second, seconds until synced too). The copy
    is left in ``work``'s ``.trash`` folder, deleted with everything else at the end (deleting it now would
    slow what follows)."""
    dst = work / ".trash" / "cp-copy"
    dst.parent.mkdir(exist_ok=True)
    files = len(snapshot(src).files)
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    took = time.perf_counter() - t0
    os.sync()
    synced = time.perf_counter() - t0
    return took, files / took, synced


def walk_tree(root: Path) -> float:
    """Seconds to walk the tree and stat every file (warm cache: what a reconciliation cannot go below)."""
    t0 = time.perf_counter()
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            os.stat(os.path.join(dirpath, f))
    return time.perf_counter() - t0


def replace_rate(work: Path, seconds: float, dir_fsync: bool) -> float:
    """Files per second of: write 4 KiB to a temp file, fsync it, rename it over a target
    (and, with ``dir_fsync``, fsync the folder)."""
    d = work / "replace-rate"
    d.mkdir()
    data = os.urandom(4096)
    n = 0
    try:
        dfd = os.open(d, os.O_RDONLY)
        try:
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                tmp = d / f".tmp{n}"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, d / f"f{n % 100}")
                if dir_fsync:
                    os.fsync(dfd)
                n += 1
            took = time.perf_counter() - t0
        finally:
            os.close(dfd)
    finally:
        shutil.rmtree(d)
    return n / took


#: Free space a durable-write measurement leaves beyond its own file.
DISK_MARGIN = 512 << 20


def durable_write(work: Path, mib: int) -> float:
    """MiB/s of writing one new file of ``mib`` MiB (1 MiB at a time) and fsyncing it, from its open to the
    fsync's return; dirty data of earlier work is synced first. The file is deleted after."""
    path = work / "durable-write.bin"
    chunk = os.urandom(1 << 20)
    os.sync()
    try:
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for _ in range(mib):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        took = time.perf_counter() - t0
    finally:
        path.unlink(missing_ok=True)
    return mib / took


def loopback_throughput(mib: int) -> float:
    """MiB/s of one TCP connection over 127.0.0.1 sending ``mib`` MiB."""
    total = mib << 20
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    received = [0]

    def sink() -> None:
        conn, _ = srv.accept()
        with conn:
            while True:
                b = conn.recv(1 << 20)
                if not b:
                    break
                received[0] += len(b)

    th = threading.Thread(target=sink, name="bench-loopback-sink", daemon=True)
    th.start()
    chunk = os.urandom(1 << 20)
    try:
        with socket.create_connection(("127.0.0.1", port)) as c:
            t0 = time.perf_counter()
            for _ in range(mib):
                c.sendall(chunk)
            c.shutdown(socket.SHUT_WR)
            th.join(60)
            took = time.perf_counter() - t0
    finally:
        srv.close()
    if received[0] != total:
        raise RuntimeError(f"loopback: received {received[0]} of {total} bytes")
    return mib / took


def measure_limits(
    tree: Path, work: Path, loopback_mib: int, fsync_seconds: float, disk_write_mib: int = 0
) -> Limits:
    """Every limit; the durable write only with ``disk_write_mib`` (and only when the disk has room for it:
    else it stays 0, not measured)."""
    lim = Limits(loopback_mib=loopback_mib)
    lim.cp_seconds, lim.cp_files_per_s, lim.cp_sync_seconds = cp_tree(tree, work)
    walk_tree(tree)  # warm the cache, as a restarted replicator finds it
    lim.walk_seconds = min(walk_tree(tree) for _ in range(3))
    lim.replace_per_s = replace_rate(work, fsync_seconds, dir_fsync=False)
    lim.replace_dirsync_per_s = replace_rate(work, fsync_seconds, dir_fsync=True)
    if disk_write_mib and shutil.disk_usage(work).free >= (disk_write_mib << 20) + DISK_MARGIN:
        lim.disk_write_mib = disk_write_mib
        lim.disk_write_mib_per_s = durable_write(work, disk_write_mib)
    lim.loopback_mib_per_s = loopback_throughput(loopback_mib)
    return lim
