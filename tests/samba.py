"""Test harness: a real Samba ``smbd`` (Debian's ``samba``) serving one share on 127.0.0.1, by process id.

:func:`running_samba` writes an ``smb.conf`` under the test's folder (a free port on 127.0.0.1 only; the
private, lock, state, cache, pid and ncalrpc folders and the logs all under ``root``, so nothing touches
``/var/lib/samba``, ``/run/samba`` or a system instance), puts the SMB user ``root`` with a password into
that temp passdb (``smbpasswd -c``: no Unix account is added, nothing system-wide changes), starts
``smbd --foreground`` as a plain child and waits until its pid listens on the port. On the way out it
closes this process's smbclient connection to it, then stops it: SIGTERM by pid, SIGKILL after a timeout,
then SIGKILL to whatever is left of the process group smbd made for itself (its helpers and the processes
serving clients).

Facts this relies on (``../shared/COMPONENTS.md`` §1, checked here again):

- never ``--no-process-group`` (smbd's SIGTERM then reaches the caller's group) and never a new session
  (``start_new_session``/``setsid``: smbd's own ``setsid()`` fails, "daemon failed to start");
- smbd forks one process per client connection; its other children are the helpers ``smbd-notifyd`` and
  ``cleanupd``. :meth:`SambaServer.session_pids` tells them apart by the TCP connection to the port;
- a port taken meanwhile makes smbd panic (``open_sockets_smbd() failed``, SIGABRT) at once: the start is
  tried again on a new port;
- smbd's unix sockets (``<lock dir>/msg.sock/<pid>``) must fit in 107 bytes ("messaging_dgm_ref failed:
  File name too long", exit 1): for a deep ``root`` the lock and ncalrpc folders go to a short temp folder
  (``/tmp/smbd-*``), removed on the way out;
- Samba 4.17's default ``mangled names = illegal`` is kept: an 8.3 alias of a long name (hash2, e.g.
  ``L2H7A4~R``) still opens that file and FileAlternateNameInformation reports it, but directory listings
  carry no short name (``share_options={"mangled names": "yes"}`` makes them do);
- smbprotocol needs ``port=`` on every call and keeps one global connection cache: tests reset it between
  servers (:func:`reset_smbclient`).

When ``smbd`` or ``smbpasswd`` is missing (looked up on PATH and in the sbin folders: ``env -i`` leaves
no PATH, and ``/usr/sbin`` is not on Python's default one) the test skips with the reason, or fails under
``CI=true`` (``need_binary``).

Must not: add a Unix user or touch the system's Samba configuration, state or ports; know about the
engine; leave a process behind (every exit path stops smbd and its children).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.conftest import need_binary, stop_by_pid
from tests.etcd import free_ports

HOST = "127.0.0.1"
SHARE = "share"
USER = "root"  # the SMB user: root is a Unix account already, so smbpasswd needs no useradd
#: Longest lock folder whose ``msg.sock/<pid>`` still fits a unix socket path (107 bytes), with room.
MAX_SOCKET_DIR = 80
STATE_DIRS = ("private", "lock", "state", "cache", "pid", "ncalrpc", "log")


@dataclass(frozen=True)
class SambaServer:
    """A running smbd serving :attr:`share` (the folder :attr:`path`) on :attr:`host`::attr:`port`."""

    host: str
    port: int
    user: str
    password: str
    share: str
    path: Path  # the share's folder on the local disk
    pid: int  # the parent smbd
    log_dir: Path
    conf: Path

    def url(self, sub: str = "") -> str:
        """``smb://127.0.0.1:PORT/share/sub`` (``sub`` with ``/`` or ``\\``; none: the share itself)."""
        rest = sub.replace("\\", "/").strip("/")
        return f"smb://{self.host}:{self.port}/{self.share}" + (f"/{rest}" if rest else "")

    def unc(self, sub: str = "") -> str:
        """``\\\\127.0.0.1\\share\\sub`` (no port: give smbclient ``port=`` on every call)."""
        rest = sub.replace("/", "\\").strip("\\")
        return f"\\\\{self.host}\\{self.share}" + (f"\\{rest}" if rest else "")

    def register(self, connection_timeout: float = 10) -> None:
        """``smbclient.register_session`` for this server with its user, password and port."""
        import smbclient  # type: ignore[import-untyped]

        smbclient.register_session(
            self.host,
            username=self.user,
            password=self.password,
            port=self.port,
            connection_timeout=connection_timeout,
        )

    def short_name(self, sub: str) -> str:
        """Samba's 8.3 alias of ``sub`` (e.g. ``L2H7A4~R``; a name that is 8.3 already comes back as is),
        asked over SMB with FileAlternateNameInformation (needs a session: :meth:`register`).

        This works with Samba's default ``mangled names = illegal``, where directory listings carry no
        short name. Opening the alias opens ``sub``."""
        from smbclient._io import SMBRawIO  # type: ignore[import-untyped]
        from smbprotocol.file_info import FileInformationClass, InfoType  # type: ignore[import-untyped]
        from smbprotocol.open import (  # type: ignore[import-untyped]
            FilePipePrinterAccessMask,
            SMB2QueryInfoRequest,
            SMB2QueryInfoResponse,
        )

        raw = SMBRawIO(
            self.unc(sub),
            mode="r",
            share_access="rwd",
            desired_access=FilePipePrinterAccessMask.FILE_READ_ATTRIBUTES,
            port=self.port,
        )
        with raw:
            req = SMB2QueryInfoRequest()
            req["info_type"] = InfoType.SMB2_0_INFO_FILE
            req["file_info_class"] = FileInformationClass.FILE_ALTERNATE_NAME_INFORMATION
            req["file_id"] = raw.fd.file_id
            req["output_buffer_length"] = 1024
            tree = raw.fd.tree_connect
            sent = raw.fd.connection.send(req, tree.session.session_id, tree.tree_connect_id)
            resp = SMB2QueryInfoResponse()
            resp.unpack(raw.fd.connection.receive(sent)["data"].get_value())
        buf: bytes = resp["buffer"].get_value()  # FileNameLength (4 bytes LE), FileName (UTF-16-LE)
        return buf[4 : 4 + int.from_bytes(buf[:4], "little")].decode("utf-16-le")

    def session_pids(self) -> list[int]:
        """The smbd children serving a client: those holding a TCP connection to :attr:`port`.

        (The helpers ``smbd-notifyd`` and ``cleanupd`` hold none; a child that was SIGKILLed and not yet
        reaped holds none either.)"""
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        pids = []
        for child in children:
            try:
                conns = child.net_connections(kind="tcp")
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
            if any(c.laddr and c.laddr.port == self.port and c.raddr for c in conns):
                pids.append(child.pid)
        return sorted(pids)

    def kill_sessions(self, timeout: float = 5.0) -> int:
        """SIGKILL every process serving a client connection (smbd itself keeps running); how many.

        Returns once they are gone. The clients see their connection drop."""
        procs = []
        for pid in self.session_pids():
            try:
                proc = psutil.Process(pid)
                proc.kill()  # psutil checks the pid was not reused
            except psutil.NoSuchProcess:
                continue
            procs.append(proc)
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        if alive:
            raise RuntimeError(f"smbd session processes {[p.pid for p in alive]} survived SIGKILL")
        return len(procs)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of each smbd log (the server's, per client, its stdout), for messages."""
        return _log_tail(self.log_dir, lines)


def _log_tail(log_dir: Path, lines: int = 40) -> str:
    out = []
    for log in sorted(p for p in log_dir.iterdir() if p.is_file()):
        text = log.read_text("utf-8", "replace")
        out.append(f"--- {log.name} ---\n" + "\n".join(text.splitlines()[-lines:]))
    return "\n".join(out)


def reset_smbclient() -> None:
    """Close every connection in smbclient's global cache, ignoring (and not logging) dead ones."""
    import smbclient

    logger = logging.getLogger("smbclient._pool")
    disabled, logger.disabled = logger.disabled, True
    try:
        smbclient.reset_connection_cache(fail_on_error=False)
    finally:
        logger.disabled = disabled


def _conf_text(
    port: int, dirs: Mapping[str, Path], share_path: Path, share_options: Mapping[str, str]
) -> str:
    glob = {
        "server role": "standalone server",
        "smb ports": str(port),
        "interfaces": HOST,
        "bind interfaces only": "yes",
        "private dir": str(dirs["private"]),
        "lock directory": str(dirs["lock"]),
        "state directory": str(dirs["state"]),
        "cache directory": str(dirs["cache"]),
        "pid directory": str(dirs["pid"]),
        "ncalrpc dir": str(dirs["ncalrpc"]),
        "log file": str(dirs["log"] / "log.%m"),
        "log level": "1",
        "max log size": "10000",
        "disable netbios": "yes",
        "load printers": "no",
        "printing": "bsd",
        "printcap name": "/dev/null",
        "disable spoolss": "yes",
        "map to guest": "never",
    }
    share = {
        "path": str(share_path),
        "read only": "no",
        "valid users": USER,
        "force user": "root",
        **share_options,
    }

    def section(name: str, opts: Mapping[str, str]) -> str:
        return f"[{name}]\n" + "".join(f"   {k} = {v}\n" for k, v in opts.items())

    return section("global", glob) + section(SHARE, share)


def _listening(pid: int, port: int) -> bool:
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.NoSuchProcess:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM smbd by pid (it passes it on to its process group), SIGKILL after ``timeout``; then wait for
    its children, SIGKILLing what is left of the group smbd made for itself (pgid = its pid: it calls
    ``setsid()``). Children that exited may stay zombies for ~1 s until init reaps them: they count as gone.
    """
    own_group = False  # smbd made its own group (not if it died before setsid(), or was reaped already)
    kids: list[psutil.Process] = []
    with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess):
        own_group = os.getpgid(proc.pid) == proc.pid
        kids = psutil.Process(proc.pid).children(recursive=True)
    try:
        stop_by_pid(proc, timeout)
    finally:
        if not _wait_gone(kids, timeout / 2) and own_group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            _wait_gone(kids, timeout)


def _wait_gone(procs: list[psutil.Process], timeout: float) -> bool:
    """Whether every one of ``procs`` exited (gone or a zombie) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return True
        if time.monotonic() > deadline:
            return False
        procs = alive
        time.sleep(0.01)


@contextlib.contextmanager
def running_samba(
    root: Path,
    share_path: Path | None = None,
    password: str = "Standby-test-1",
    share_options: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> Iterator[SambaServer]:
    """smbd serving ``share_path`` (default ``root/share``; chmod 0777 either way) as ``share`` to user
    ``root`` with ``password``, its state and logs under ``root``; stopped on the way out whatever happens.

    ``share_options`` adds or overrides options of the ``[share]`` section. Skips (fails under ``CI=true``)
    when Samba is not installed."""
    smbd, smbpasswd = _binary("smbd"), _binary("smbpasswd")
    root.mkdir(parents=True, exist_ok=True)
    share = root / SHARE if share_path is None else share_path
    share.mkdir(parents=True, exist_ok=True)
    share.chmod(0o777)
    dirs = {name: root / name for name in STATE_DIRS}
    short: Path | None = None
    if len(str(dirs["lock"])) > MAX_SOCKET_DIR:
        short = Path(tempfile.mkdtemp(prefix="smbd-", dir="/tmp"))
        dirs["lock"], dirs["ncalrpc"] = short / "lock", short / "ncalrpc"
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    dirs["private"].chmod(0o700)
    conf = root / "smb.conf"
    proc: subprocess.Popen[bytes] | None = None
    try:
        for attempt in range(3):
            (port,) = free_ports(1)
            conf.write_text(_conf_text(port, dirs, share, share_options or {}))
            if attempt == 0:  # the passdb is keyed by user, not by port
                _add_user(smbpasswd, conf, password)
            proc = _start(smbd, conf, dirs["log"], port, timeout)
            if proc.poll() is None:
                break
            _stop(proc)  # it died (port taken meanwhile: it panics): try another port
        assert proc is not None
        if proc.poll() is not None:
            raise RuntimeError(f"smbd exited with {proc.returncode} three times:\n{_log_tail(dirs['log'])}")
        server = SambaServer(HOST, port, USER, password, SHARE, share, proc.pid, dirs["log"], conf)
        try:
            yield server
        finally:
            with contextlib.suppress(Exception):
                import smbclient

                smbclient.delete_session(HOST, port=port, timeout=5)
    finally:
        if proc is not None:
            _stop(proc)
        if short is not None:
            shutil.rmtree(short, ignore_errors=True)


def _binary(name: str) -> str:
    """``name`` on PATH or in the sbin folders (``smbd`` is in /usr/sbin, which a bare PATH, or none under
    ``env -i``, leaves out); else skip (fail under ``CI=true``) via ``need_binary``."""
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    return shutil.which(name, path=path) or need_binary(name)


def _add_user(smbpasswd: str, conf: Path, password: str) -> None:
    """Put :data:`USER` with ``password`` into the passdb under ``conf``'s private dir (it reads it twice)."""
    res = subprocess.run(
        [smbpasswd, "-c", str(conf), "-s", "-a", USER],
        input=f"{password}\n{password}\n".encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    if res.returncode != 0:
        raise RuntimeError(f"smbpasswd -a {USER} failed ({res.returncode}): {res.stdout!r} {res.stderr!r}")


def _start(smbd: str, conf: Path, log_dir: Path, port: int, timeout: float) -> subprocess.Popen[bytes]:
    """smbd in the foreground as a plain child; returned once its pid listens on ``port``, or once it
    exited (the caller looks at ``poll()``). Raises if it neither listens nor exits within ``timeout``."""
    with (log_dir / "stdout").open("ab") as out:
        proc = subprocess.Popen(
            [smbd, "--foreground", "-s", str(conf)], stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not _listening(proc.pid, port):
        if time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(
                f"smbd did not listen on {HOST}:{port} within {timeout} s:\n{_log_tail(log_dir)}"
            )
        time.sleep(0.01)
    return proc
