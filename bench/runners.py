"""The replicators under test, each behind the same small interface.

Owns: how to configure, start and stop each tool, and the exact command lines used:

- :class:`Standby`: ``standby receive`` and ``standby send`` as separate processes on 127.0.0.1, with the
  production settings: every default (fsync on, settle 0.5 s, ...), TLS with both node IDs pinned
  (``standby init``), and the guards of ``config.example.toml``.
- :class:`RsyncDaemon`: one ``rsync --daemon`` on 127.0.0.1 (a generated rsyncd.conf, a free port), the
  receiving end for :class:`RsyncPush` and :class:`Lsyncd`.
- :class:`RsyncPush`: one ``rsync -a --delete [--fsync]`` run into a daemon module (a one-shot tool).
- :class:`Lsyncd`: ``lsyncd`` with ``default.rsync`` into a daemon module, with delay 0 or its default.

A *live* tool (:class:`LiveTool`) keeps a replica up to date by itself: ``start_passive`` (untimed) brings
up the receiving side, ``start_active`` (timed) starts replicating. A *one-shot* tool copies when run.

Must not: measure anything or decide what a result means.
"""

from __future__ import annotations

import compileall
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

from bench.procs import Registry, Spawned, free_port, run_timed, wait_log

REPO = Path(__file__).resolve().parent.parent
#: How long a process gets between SIGTERM and SIGKILL.
STOP_GRACE = 30.0


def reset_dir(path: Path) -> None:
    """Make ``path`` an empty folder. What was there is moved into a ``.trash`` folder beside it, which
    the benchmark deletes at the end: deleting 10,000 files makes some disks slow for seconds after
    (discards, journal), and that must not fall into the next timed run."""
    if path.exists():
        trash = path.parent / ".trash"
        trash.mkdir(exist_ok=True)
        n = sum(1 for _ in trash.iterdir())
        path.rename(trash / f"{path.name}.{n}")
    path.mkdir(parents=True)


class LiveTool(Protocol):
    name: str
    label: str
    #: Seconds the tool deliberately waits before copying a change (0 for standby and lsyncd delay 0).
    delay: float
    #: Things worth reporting that happened while starting or stopping (a process that had to be killed).
    notes: list[str]

    def reset(self) -> None:
        """Stop everything and empty the replica and the tool's own state."""

    def start_passive(self) -> None: ...

    def start_active(self) -> None: ...

    def stop(self) -> None: ...

    def processes(self) -> dict[str, int]:
        """Role -> pid of the tool's running processes (for CPU and memory)."""
        ...

    def commands(self) -> list[str]: ...


_NODE_ID = re.compile(r"^(sender|receiver) node ID .*: (\S+)$")


def _q(p: Path) -> str:
    return "'" + str(p) + "'"  # TOML literal string


class Standby:
    """A real pair: ``python -m engine receive`` and ``python -m engine send``, over 127.0.0.1."""

    name = "standby"
    label = "standby"
    delay = 0.0

    def __init__(
        self,
        registry: Registry,
        base: Path,
        source: Path,
        replica: Path,
        keep_journal: bool | None = None,
    ) -> None:
        self.registry = registry
        self.base = base
        self.source = source
        self.replica = replica
        self.port = free_port()
        self.config = base / "standby.toml"
        self.sender_state = base / "sender-state"
        self.receiver_state = base / "receiver-state"
        self.sender: Spawned | None = None
        self.receiver: Spawned | None = None
        self._n = 0
        #: The node IDs ``standby init`` printed: role -> ID (empty before :meth:`reset`).
        self.ids: dict[str, str] = {}
        self.notes: list[str] = []
        #: ``--profile``: send and receive run under ``bench.profiled``, writing ``<role>.<n>.prof`` here.
        self.profile_dir: Path | None = None
        #: ``[receiver] keep_journal`` set explicitly (``bench.keep_journal_ab``); None: the default.
        self.keep_journal = keep_journal
        #: The folder ``python -m engine`` runs in, so the ``engine`` package found there is the one run:
        #: the repository's, or a frozen copy of it (``bench.keep_journal_ab``).
        self.code = REPO
        base.mkdir(parents=True, exist_ok=True)

    def write_config(self) -> None:
        def pin(role: str) -> str:
            return f'peer_id = "{self.ids[role]}"\n' if role in self.ids else ""

        keep = "" if self.keep_journal is None else f"keep_journal = {str(self.keep_journal).lower()}\n"

        self.config.write_text(
            f"""\
[sender]
source = {_q(self.source)}
include = ["databases", "config/config.json"]
peer = "127.0.0.1:{self.port}"
state_dir = {_q(self.sender_state)}
{pin("receiver")}
[receiver]
listen = "127.0.0.1:{self.port}"
target = {_q(self.replica)}
state_dir = {_q(self.receiver_state)}
{keep}{pin("sender")}

[[guard]]
pattern = "config/config.json"
rule = "json"

[[guard]]
pattern = "databases/**/*.cookie"
rule = "base64"
""",
            "utf-8",
        )

    def argv(self, role: str) -> list[str]:
        if self.profile_dir is not None and role in ("send", "receive"):
            prof = self.profile_dir / f"{role}.{self._n + 1}.prof"
            engine = ["-m", "engine", role, "--config", str(self.config)]
            return [sys.executable, "-m", "bench.profiled", str(prof), *engine]
        return [sys.executable, "-m", "engine", role, "--config", str(self.config)]

    def commands(self) -> list[str]:
        return [
            " ".join(self.argv("init")),
            " ".join(self.argv("receive")),
            " ".join(self.argv("send")),
            self.config.read_text("utf-8") if self.config.exists() else "",
        ]

    def reset(self) -> None:
        """Stop, empty the replica and both state folders, create both nodes' identities with
        ``standby init`` and pin each in the other's section (TLS with mutual pinning, as in production)."""
        self.stop()
        # As installed (pip compiles a package's modules when it installs it): without this, where
        # PYTHONDONTWRITEBYTECODE is set, every start would compile the engine again (about 0.3 s of CPU).
        compileall.compile_dir(self.code / "engine", quiet=1)
        for d in (self.replica, self.sender_state, self.receiver_state):
            reset_dir(d)
        self.port = free_port()
        self.ids = {}
        self.write_config()
        out = subprocess.run(self.argv("init"), capture_output=True, text=True, timeout=60, cwd=self.code)
        if out.returncode != 0:
            raise RuntimeError(f"standby init exited with {out.returncode}: {out.stderr.strip()[-500:]}")
        for line in out.stdout.splitlines():
            m = _NODE_ID.match(line.strip())
            if m:
                self.ids[m.group(1)] = m.group(2)
        if set(self.ids) != {"sender", "receiver"}:
            raise RuntimeError(f"standby init printed no node IDs: {out.stdout.strip()[-500:]}")
        self.write_config()

    def _log(self, role: str) -> Path:
        self._n += 1
        return self.base / f"{role}.{self._n}.log"

    def start_passive(self) -> None:
        self.receiver = self.registry.spawn(
            "standby receive", self.argv("receive"), self._log("receive"), self.code
        )
        wait_log(self.receiver, "receiver.listening", 30)

    def start_active(self) -> None:
        self.sender = self.registry.spawn("standby send", self.argv("send"), self._log("send"), self.code)

    def wait_connected(self, timeout: float = 30) -> None:
        assert self.sender is not None
        wait_log(self.sender, "send.connected", timeout)

    def _stop(self, p: Spawned) -> None:
        t0 = time.perf_counter()
        rc = self.registry.stop(p, grace=STOP_GRACE)
        if rc == -signal.SIGKILL:
            self.notes.append(f"{p.name} did not stop within {STOP_GRACE:g} s of SIGTERM and was killed")
        elif rc != 0:
            self.notes.append(f"{p.name} exited with {rc} on SIGTERM after {time.perf_counter() - t0:.1f} s")

    def stop_active(self) -> None:
        if self.sender is not None:
            self._stop(self.sender)
            self.sender = None

    def stop(self) -> None:
        self.stop_active()
        if self.receiver is not None:
            self._stop(self.receiver)
            self.receiver = None

    def processes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.sender is not None and self.sender.alive():
            out["sender"] = self.sender.pid
        if self.receiver is not None and self.receiver.alive():
            out["receiver"] = self.receiver.pid
        return out

    def verify(self) -> tuple[float, int, str]:
        """Run ``standby verify`` once: (wall seconds, exit code, its output)."""
        log = self.base / "verify.log"
        log.unlink(missing_ok=True)
        wall, _cpu, rc = run_timed(
            [sys.executable, "-m", "engine", "verify", "--config", str(self.config)], log, self.code
        )
        return wall, rc, log.read_text("utf-8", errors="replace")


class RsyncDaemon:
    """``rsync --daemon --no-detach`` on 127.0.0.1 with one writable module per replica."""

    def __init__(self, registry: Registry, base: Path, modules: dict[str, Path]) -> None:
        self.registry = registry
        self.base = base
        self.modules = modules
        self.port = free_port()
        self.conf = base / "rsyncd.conf"
        self.proc: Spawned | None = None

    def argv(self) -> list[str]:
        return [
            "rsync",
            "--daemon",
            "--no-detach",
            f"--config={self.conf}",
            f"--port={self.port}",
            "--address=127.0.0.1",
        ]

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        lines = [
            "use chroot = no",
            f"uid = {os.getuid()}",
            f"gid = {os.getgid()}",
            "numeric ids = yes",
            "max connections = 0",
            f"log file = {self.base / 'rsyncd.log'}",
            "transfer logging = no",
            "",
        ]
        for name, path in self.modules.items():
            path.mkdir(parents=True, exist_ok=True)
            lines += [f"[{name}]", f"    path = {path}", "    read only = false", ""]
        self.conf.write_text("\n".join(lines), "utf-8")
        self.proc = self.registry.spawn("rsync --daemon", self.argv(), self.base / "rsyncd.out")
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if not self.proc.alive() or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"rsync daemon did not start: {self.proc.log_text()[-1000:]}"
                    ) from None
                time.sleep(0.02)

    def url(self, module: str) -> str:
        return f"rsync://127.0.0.1:{self.port}/{module}/"

    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.alive() else None

    def stop(self) -> None:
        if self.proc is not None:
            self.registry.stop(self.proc)
            self.proc = None


class RsyncPush:
    """One run of ``rsync -a --delete [--fsync] SOURCE/ rsync://127.0.0.1:PORT/MODULE/``."""

    def __init__(self, daemon: RsyncDaemon, module: str, fsync: bool, source: Path, log: Path) -> None:
        self.daemon = daemon
        self.module = module
        self.fsync = fsync
        self.source = source
        self.log = log
        self.name = "rsync --fsync" if fsync else "rsync"
        self.replica = daemon.modules[module]

    def argv(self) -> list[str]:
        return [
            "rsync",
            "-a",
            "--delete",
            *(["--fsync"] if self.fsync else []),
            f"{self.source}/",
            self.daemon.url(self.module),
        ]

    def commands(self) -> list[str]:
        return [" ".join(self.argv()), " ".join(self.daemon.argv()), self.daemon.conf.read_text("utf-8")]

    def run(self) -> tuple[float, float]:
        """Run once: (wall seconds, CPU seconds of the client). Raises if rsync fails."""
        wall, cpu, rc = run_timed(self.argv(), self.log)
        if rc != 0:
            raise RuntimeError(f"{' '.join(self.argv())} exited with {rc} (see {self.log})")
        return wall, cpu

    def reset(self) -> None:
        reset_dir(self.replica)


def lsyncd_default_delay() -> float | None:
    """The delay lsyncd's ``default.rsync`` uses when none is set, asked from the installed lsyncd."""
    lsyncd = shutil.which("lsyncd")
    if lsyncd is None:
        return None
    import tempfile

    with tempfile.TemporaryDirectory(prefix="standby-bench-lsyncd-") as d:
        q = Path(d) / "q.lua"
        q.write_text('print("default.rsync.delay=" .. tostring(default.rsync.delay))\nos.exit(0)\n', "utf-8")
        try:
            out = subprocess.run(
                [lsyncd, "-nodaemon", str(q)], capture_output=True, text=True, timeout=10
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    for line in out.splitlines():
        if line.startswith("default.rsync.delay="):
            try:
                return float(line.split("=", 1)[1])
            except ValueError:
                return None
    return None


class Lsyncd:
    """``lsyncd -nodaemon`` with ``default.rsync`` (archive) into a daemon module."""

    def __init__(
        self,
        registry: Registry,
        base: Path,
        source: Path,
        daemon: RsyncDaemon,
        module: str,
        delay: float | None,
        default_delay: float,
    ) -> None:
        self.registry = registry
        self.base = base
        self.source = source
        self.daemon = daemon
        self.module = module
        self.replica = daemon.modules[module]
        self.set_delay = delay
        self.delay = default_delay if delay is None else delay
        self.name = "lsyncd" if delay is None else f"lsyncd delay {delay:g}"
        self.label = (
            f"lsyncd (default delay {default_delay:g} s)" if delay is None else f"lsyncd (delay {delay:g})"
        )
        self.config = base / f"lsyncd-{module}.lua"
        self.proc: Spawned | None = None
        self.notes: list[str] = []
        self._n = 0
        base.mkdir(parents=True, exist_ok=True)

    def write_config(self) -> None:
        delay = "" if self.set_delay is None else f"    delay = {self.set_delay:g},\n"
        self.config.write_text(
            f"""\
settings {{
    nodaemon = true,
    logfile = "{self.base / f"lsyncd-{self.module}.log"}",
    statusFile = "{self.base / f"lsyncd-{self.module}.status"}",
    insist = true,
}}
sync {{
    default.rsync,
    source = "{self.source}/",
    target = "{self.daemon.url(self.module)}",
{delay}    rsync = {{ archive = true }},
}}
""",
            "utf-8",
        )

    def argv(self) -> list[str]:
        return ["lsyncd", "-nodaemon", str(self.config)]

    def commands(self) -> list[str]:
        return [
            " ".join(self.argv()),
            self.config.read_text("utf-8") if self.config.exists() else "",
            " ".join(self.daemon.argv()),
            self.daemon.conf.read_text("utf-8"),
        ]

    def reset(self) -> None:
        self.stop()
        reset_dir(self.replica)
        self.write_config()

    def start_passive(self) -> None:
        pass  # the rsync daemon runs for the whole benchmark

    def start_active(self) -> None:
        self._n += 1
        self.proc = self.registry.spawn(
            self.name, self.argv(), self.base / f"lsyncd-{self.module}.{self._n}.out"
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.registry.stop(self.proc)
            self.proc = None

    def processes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.proc is not None and self.proc.alive():
            out["lsyncd"] = self.proc.pid
        pid = self.daemon.pid()
        if pid is not None:
            out["rsync daemon"] = pid
        return out
