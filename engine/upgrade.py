"""Upgrades: the I/O pieces the agent and the CLI put together to upgrade the protected application.

Owns:

- the installer's command line (:func:`installer_argv`: msiexec on Windows, a configured command elsewhere),
  what its exit code means (:func:`installer_verdict`) and running it under a timeout (:func:`run_installer`:
  a program that overruns is killed with what it started, a missing one is a result, never a traceback);
- settling the service after an installer, which often starts it or sets it Automatic
  (:func:`settle_service`: manual and stopped, and seen so for a while, within a deadline);
- the application's version (:func:`version_from_command`, :func:`windows_file_version_argv`,
  :func:`parse_file_version`) and comparing two nodes' versions (:func:`compare_versions`);
- staging an installer on the passive: the sender's side (:func:`describe`, :func:`iter_chunks`) and the
  receiver's (:class:`Incoming` writes ``<state_dir>/upgrade/<digest>.part``, checks size and digest,
  renames it into place and records it in ``<state_dir>/upgrade/staged.json``; :func:`staged` reads that
  record back).

Rules:

1. Installer names come from the peer: they are checked at the boundary (:func:`check_installer_name`,
   the path rules of :mod:`engine.model`) before any file is made.
2. A staged installer is whole: ``staged.json`` is removed before a new installer is renamed into place and
   written (atomically) only after, so a crash anywhere leaves either no record or a record of a whole,
   checked file. What arrived differently from what was announced is deleted, never kept.
3. Settling only ever stops the service and sets it Manual; it never starts it and never kills it. Errors
   from the service are observations, retried until the deadline, never raised.

Must not: decide when to upgrade or which node goes first (the agent does), carry bytes between nodes (the
agents' channel does; this module only reads and writes the files at either end), start the service, or
read a clock except through what it is given (the installer's run time is measured with ``time``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from engine.digest import Hasher, hexdigest
from engine.errors import PathRejected, ReplicationError
from engine.journal import fsync_dir
from engine.model import MAX_NAME_CHARS, TEMP_MARKER, check_name
from engine.scan import digest_file
from engine.service import ServiceControl, ServiceError, ServiceState, ServiceStatus
from engine.service.command import kill_group

log = logging.getLogger(__name__)

__all__ = [
    "CHUNK",
    "EXIT_NOT_RUN",
    "EXIT_TIMED_OUT",
    "MAX_INSTALLER_SIZE",
    "TAIL_LINES",
    "Incoming",
    "InstallResult",
    "SettleResult",
    "StagedMismatch",
    "Staged",
    "StagingError",
    "UpgradeError",
    "check_installer_name",
    "compare_versions",
    "describe",
    "installer_argv",
    "installer_path",
    "installer_verdict",
    "iter_chunks",
    "parse_file_version",
    "powershell_quote",
    "run_installer",
    "settle_service",
    "staged",
    "upgrade_dir",
    "version_from_command",
    "windows_file_version_argv",
]

#: The exit code reported for an installer killed at its timeout (as coreutils ``timeout`` does).
EXIT_TIMED_OUT = 124
#: The exit code reported for an installer that could not be run at all (as a shell does).
EXIT_NOT_RUN = 127
#: How many of the installer's last output lines a result keeps.
TAIL_LINES = 20
#: How many bytes at most are read back from a command's output (the end for an installer, the start for
#: a version command).
OUTPUT_LIMIT = 64 * 1024

#: The folder below the state folder that holds staged installers.
UPGRADE_DIR = "upgrade"
#: The record of the staged installer, in :data:`UPGRADE_DIR`.
SIDECAR = "staged.json"
SIDECAR_FORMAT = "standby-upgrade-staged"
SIDECAR_VERSION = 1
#: The suffix of an installer being received.
PART_SUFFIX = ".part"
#: The largest installer accepted (4 GiB).
MAX_INSTALLER_SIZE = 4 << 30
#: The default chunk size for carrying an installer.
CHUNK = 256 * 1024
#: Hex digits in an xxh3_128 digest.
DIGEST_HEX_CHARS = 32


class UpgradeError(ReplicationError):
    """Base of the errors this module raises on purpose."""


class StagingError(UpgradeError):
    """An installer offered for staging was refused (its name, its size, a chunk out of order), or cannot
    be read on the sending side."""


class StagedMismatch(StagingError):
    """What arrived differs from what was announced; ``what`` is ``"size"`` or ``"digest"``. The partial
    file has been deleted."""

    def __init__(self, name: str, what: str, announced: str, received: str) -> None:
        super().__init__(
            f"installer {name!r} was not staged: its {what} differs from what was announced "
            f"(announced {announced}, received {received}); the partial file was deleted"
        )
        self.name = name
        self.what = what
        self.announced = announced
        self.received = received


# --- the installer ----------------------------------------------------------------------------------------

#: msiexec's exit codes (Windows Installer error codes) and what they mean for an upgrade.
MSI_CODES: dict[int, tuple[bool, str]] = {
    0: (True, "installed"),
    3010: (True, "installed; a reboot is required"),
    1641: (True, "installed; the installer started a reboot"),
    1602: (False, "the installation was cancelled (1602)"),
    1603: (False, "a fatal error occurred during installation (1603)"),
    1618: (False, "another installation is already in progress (1618)"),
    1619: (False, "the installation package could not be opened (1619)"),
    1638: (False, "another version of this product is already installed (1638)"),
}

_PLACEHOLDER = re.compile(r"\{(installer|log)\}")


def installer_argv(installer: Path, log: Path, *, windows: bool, command: Sequence[str] = ()) -> list[str]:
    """The command that installs ``installer`` quietly, writing its log to ``log``. Pure.

    A configured ``command`` is used on any OS, with ``{installer}`` and ``{log}`` replaced in each argument
    (in one pass: a path holding ``{log}`` is not replaced again). Without one, Windows runs
    ``msiexec /i <installer> /qn /l*v <log>`` (a ``.msi`` only: msiexec cannot run an ``.exe``), and other
    OSes have no default: ValueError, saying what to configure.
    """
    if command:
        if not command[0]:
            raise ValueError("the installer command is empty: its first item must be the program to run")
        values = {"installer": str(installer), "log": str(log)}
        return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], arg) for arg in command]
    if not windows:
        raise ValueError(
            "no installer command is configured: off Windows there is no default, so configure one "
            "(an argument list where {installer} and {log} are replaced by the paths)"
        )
    if installer.suffix.lower() != ".msi":
        raise ValueError(
            f"{installer.name!r} is not a .msi package: msiexec installs only those; configure an "
            "installer command for this installer (an argument list using {installer} and {log})"
        )
    return ["msiexec", "/i", str(installer), "/qn", "/l*v", str(log)]


def installer_verdict(exit_code: int, *, msi: bool = True) -> tuple[bool, str]:
    """Whether the installer succeeded, and a sentence saying so. Pure.

    With ``msi`` the Windows Installer codes are read (3010 and 1641 are successes that need a reboot);
    without, only 0 is success.
    """
    if msi and exit_code in MSI_CODES:
        return MSI_CODES[exit_code]
    if exit_code == 0:
        return True, "installed"
    return False, f"exit code {exit_code}"


@dataclass(frozen=True)
class InstallResult:
    """How a run of the installer ended. ``output_tail`` is the last :data:`TAIL_LINES` lines of its
    stdout and stderr together (or why it could not be run); ``exit_code`` is :data:`EXIT_TIMED_OUT` when it
    was killed at its timeout and :data:`EXIT_NOT_RUN` when it could not be started (``started`` False)."""

    exit_code: int
    seconds: float
    output_tail: str
    timed_out: bool = False
    started: bool = True

    def verdict(self, *, msi: bool = True) -> tuple[bool, str]:
        """:func:`installer_verdict`, after a timeout or a failure to start."""
        if not self.started:
            return False, f"the installer could not be run: {self.output_tail}"
        if self.timed_out:
            return False, f"the installer did not finish within {self.seconds:.0f} s and was killed"
        return installer_verdict(self.exit_code, msi=msi)


@dataclass(frozen=True)
class _Ran:
    exit_code: int
    seconds: float
    timed_out: bool
    stdout: str
    stderr: str


def _run(argv: Sequence[str], timeout: float, *, combine: bool, tail: bool) -> _Ran:
    """Run ``argv`` (no shell) for at most ``timeout`` seconds; OSError if it cannot be started.

    Output goes to temporary files, not pipes: a program that leaves something running behind that holds
    its stdout (an installer starting a service) must not make us wait for that. With ``combine``, stderr
    goes into stdout. ``tail``: keep the end of the output, else its start.
    """
    if not argv or not argv[0]:
        raise ValueError("the command is empty: its first item must be the program to run")
    if not timeout > 0 or timeout == float("inf"):
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        if sys.platform == "win32":  # pragma: no cover - Windows only
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out if combine else err,
                creationflags=subprocess.CREATE_NEW_PROCESS_GROUP,
            )
        else:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out if combine else err,
                start_new_session=True,
            )
        timed_out = False
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc)  # msiexec: the Windows Installer rolls an interrupted install back
            rc = EXIT_TIMED_OUT
        seconds = time.monotonic() - t0
        stdout, stderr = _read(out, tail), _read(err, tail)
    return _Ran(rc, seconds, timed_out, stdout, stderr)


def _read(f: IO[bytes], tail: bool) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - OUTPUT_LIMIT) if tail else 0)
    return f.read(OUTPUT_LIMIT).decode("utf-8", "replace").lstrip("\ufeff")


def _last_lines(text: str, n: int) -> str:
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines[-n:])


def run_installer(argv: Sequence[str], timeout: float) -> InstallResult:
    """Run the installer command and wait for it, at most ``timeout`` seconds (then it is killed, with its
    process group on POSIX, and the result says ``timed_out``). Blocks: the agent runs it in a worker
    thread. A program that cannot be started is a result (:data:`EXIT_NOT_RUN` and the system's reason),
    not an exception. ValueError only for an empty command or an unusable timeout (a bug in the caller)."""
    log.info("upgrade.installer_started program=%s timeout=%g", argv[0] if argv else "", timeout)
    try:
        ran = _run(argv, timeout, combine=True, tail=True)
    except OSError as e:
        said = f"cannot run {argv[0]!r}: {e.strerror or e}"
        log.warning("upgrade.installer_not_run program=%s error=%s", argv[0], e.strerror or e)
        return InstallResult(EXIT_NOT_RUN, 0.0, said, timed_out=False, started=False)
    result = InstallResult(ran.exit_code, ran.seconds, _last_lines(ran.stdout, TAIL_LINES), ran.timed_out)
    if ran.timed_out:
        log.warning("upgrade.installer_timed_out program=%s seconds=%.1f", argv[0], ran.seconds)
    else:
        log.info(
            "upgrade.installer_finished program=%s exit_code=%d seconds=%.1f",
            argv[0],
            ran.exit_code,
            ran.seconds,
        )
    return result


# --- settling the service ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SettleResult:
    """How settling the service went.

    ``stops``: how many stops it had to ask for. ``observations``: what it saw and did, in order, one line
    each with the seconds since it began, repeats left out. ``reason``: why it did not settle ("" when
    ``ok``). ``status``: the last status seen, if any.
    """

    ok: bool
    stops: int
    observations: tuple[str, ...]
    reason: str = ""
    seconds: float = 0.0
    status: ServiceStatus | None = None


def _quiet(status: ServiceStatus) -> bool:
    """Stopped, and manual if the backend can tell."""
    return status.state is ServiceState.STOPPED and status.start_type in (None, "manual")


def _seen(status: ServiceStatus) -> str:
    parts = [status.state.value.replace("_", " ")]
    if status.pid is not None:
        parts.append(f"pid {status.pid}")
    if status.start_type is not None:
        parts.append(f"start type {status.start_type}")
    return ", ".join(parts)


def _seconds(name: str, value: float) -> float:
    if not value >= 0 or value == float("inf"):  # NaN fails the comparison
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


def settle_service(
    control: ServiceControl,
    *,
    stable_for: float,
    timeout: float,
    stop_timeout: float,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
    poll: float = 0.5,
) -> SettleResult:
    """Bring the service back to stopped and Manual after an installer, and make sure it stays so.

    Every ``poll`` seconds until ``timeout``: ``set_manual``, ``query``, and if the service is not stopped,
    ``stop`` (within ``stop_timeout``, and never past the deadline). It has settled once it has been seen
    stopped (and manual, when the backend reports a start type) at every look for ``stable_for`` seconds:
    an installer's custom action or a service-recovery action may start it again a little later. A
    :class:`ServiceError` is an observation (and breaks the stable run), retried until the deadline; a
    service that does not exist never settles. ValueError only for unusable durations (a bug in the caller).
    """
    stable_for = _seconds("stable_for", stable_for)
    timeout = _seconds("timeout", timeout)
    stop_timeout = _seconds("stop_timeout", stop_timeout)
    if not poll > 0 or poll == float("inf"):
        raise ValueError(f"poll must be a finite number of seconds > 0, got {poll!r}")
    if stable_for > timeout:
        raise ValueError(
            f"stable_for ({stable_for:g} s) is longer than timeout ({timeout:g} s): it never settles"
        )
    t0 = clock()
    deadline = t0 + timeout
    notes: list[str] = []
    last_note = ""

    def note(text: str) -> None:
        nonlocal last_note
        if text != last_note:
            notes.append(f"{clock() - t0:.1f} s: {text}")
            last_note = text

    stops = 0
    quiet_since: float | None = None
    status: ServiceStatus | None = None
    problems: list[str] = []  # what was wrong at the last look
    while True:
        problems = []
        try:
            control.set_manual()
        except ServiceError as e:
            problems.append(f"cannot set the start type to manual: {e}")
            note(problems[-1])
            log.warning("upgrade.settle_set_manual_failed error=%s", e)
        try:
            seen: ServiceStatus | None = control.query()
        except ServiceError as e:
            seen = None
            problems.append(f"cannot query the service: {e}")
            note(problems[-1])
            log.warning("upgrade.settle_query_failed error=%s", e)
        now = clock()
        if seen is None:
            quiet_since = None  # INVARIANT: "continuously" means at every look; a failed look breaks the run
        else:
            status = seen
            note(_seen(seen))
            if _quiet(seen):
                if quiet_since is None:
                    quiet_since = now
                if now - quiet_since >= stable_for:
                    log.info("upgrade.settled stops=%d seconds=%.1f", stops, now - t0)
                    return SettleResult(True, stops, tuple(notes), "", now - t0, seen)
            else:
                quiet_since = None
                if seen.state is ServiceState.NOT_FOUND:
                    problems.append("the service does not exist")
                elif seen.state is ServiceState.STOPPED:
                    problems.append(
                        f"the service is stopped but its start type is {seen.start_type}, not manual"
                    )
                elif deadline - now > 0:
                    stops += 1
                    note("stop")
                    log.info("upgrade.settle_stopping state=%s pid=%s", seen.state.value, seen.pid)
                    try:
                        status = control.stop(min(stop_timeout, deadline - now))
                        note(_seen(status))
                    except ServiceError as e:
                        problems.append(f"the stop failed: {e}")
                        note(problems[-1])
                        log.warning("upgrade.settle_stop_failed error=%s", e)
                else:
                    problems.append(f"the service is {seen.state.value.replace('_', ' ')}")
        now = clock()
        if now >= deadline:
            break
        sleep(min(poll, deadline - now))
    if not problems and quiet_since is not None:
        problems.append(f"stopped and manual only for the last {clock() - quiet_since:.1f} s")
    elif not problems and status is not None:
        problems.append(f"last seen {_seen(status)}")
    reason = (
        f"the service was not seen stopped and manual for {stable_for:g} s within {timeout:g} s "
        f"({stops} stop{'s' if stops != 1 else ''} asked): {'; '.join(problems) or 'it was never seen'}"
    )
    log.warning("upgrade.settle_failed stops=%d reason=%s", stops, reason)
    return SettleResult(False, stops, tuple(notes), reason, clock() - t0, status)


# --- versions ---------------------------------------------------------------------------------------------


def version_from_command(argv: Sequence[str], timeout: float) -> str | None:
    """The first non-empty line the configured version command prints on stdout, stripped; None (and a
    warning naming why) if it cannot be run, overruns ``timeout`` (it is killed), exits non-zero or prints
    nothing."""
    try:
        ran = _run(argv, timeout, combine=False, tail=False)
    except OSError as e:
        log.warning("upgrade.version_failed program=%s error=%s", argv[0], e.strerror or e)
        return None
    if ran.timed_out:
        log.warning("upgrade.version_failed program=%s error=did not finish within %g s", argv[0], timeout)
        return None
    if ran.exit_code != 0:
        said = _last_lines(ran.stderr, 1) or _last_lines(ran.stdout, 1) or "no message"
        log.warning("upgrade.version_failed program=%s exit_code=%d said=%s", argv[0], ran.exit_code, said)
        return None
    for line in ran.stdout.splitlines():
        if line.strip():
            return line.strip()
    log.warning("upgrade.version_failed program=%s error=printed nothing", argv[0])
    return None


#: The characters PowerShell takes as a single quote (it reads the typographic ones as quotes too).
_PS_SINGLE_QUOTES = "'\u2018\u2019\u201a\u201b"


def powershell_quote(text: str) -> str:
    """``text`` as a PowerShell single-quoted string literal: nothing inside is expanded, and each quote
    character (any of the five PowerShell reads as one) is doubled. Pure."""
    return "'" + "".join(c + c if c in _PS_SINGLE_QUOTES else c for c in text) + "'"


def windows_file_version_argv(exe: str) -> list[str]:
    """A PowerShell command printing the file version of ``exe`` (its version resource's FileVersion;
    nothing if it has none). Read its output with :func:`parse_file_version`. Pure."""
    script = f"(Get-Item -LiteralPath {powershell_quote(exe)}).VersionInfo.FileVersion"
    return ["powershell.exe", "-NoProfile", "-NonInteractive", "-Command", script]


_VERSION = re.compile(r"[vV]?([0-9]+(?:[ \t]*[.,][ \t]*[0-9]+)+)(?:\s.*)?")


def parse_file_version(text: str) -> str | None:
    """The first line that is a version: numbers joined by dots (``5.2.1.3``), or by commas as old version
    resources print them (``5, 2, 1, 3``, read as ``5.2.1.3``); what follows it after a space (Windows'
    own ``10.0.19041.1 (WinBuild.160101.0800)``) is left out. None if no line is. Pure."""
    for line in text.lstrip("\ufeff").splitlines():
        m = _VERSION.fullmatch(line.strip())
        if m:
            return re.sub(r"[ \t]*[.,][ \t]*", ".", m.group(1))
    return None


def _version_key(version: str) -> tuple[int, ...] | None:
    """Dotted numbers without trailing zeros (``5.2`` and ``5.2.0.0`` are the same version), or None."""
    parts = version.strip().split(".")
    if not all(p.isascii() and p.isdigit() for p in parts):
        return None
    nums = [int(p) for p in parts]
    while len(nums) > 1 and nums[-1] == 0:
        nums.pop()
    return tuple(nums)


def compare_versions(local: str | None, peer: str | None) -> tuple[bool, str]:
    """Whether both nodes run the same version, and one line saying what each runs. Dotted numbers compare
    as numbers (``5.2.0`` is ``5.2.0.0``); anything else as text. An unknown version is never the same.
    Pure."""
    if local is None and peer is None:
        return False, "neither node's version is known"
    if peer is None:
        return False, f"the peer's version is unknown (this node runs {local})"
    if local is None:
        return False, f"this node's version is unknown (the peer runs {peer})"
    a, b = _version_key(local), _version_key(peer)
    same = a == b if a is not None and b is not None else local.strip() == peer.strip()
    if same:
        return True, f"both run {local}"
    return False, f"this node runs {local}, the peer {peer}"


# --- staging the installer --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Staged:
    """An installer: its plain file name, size in bytes and xxh3_128 digest (hex). A staged one also says
    which node sent it and when it was staged (UTC, ISO 8601)."""

    name: str
    size: int
    digest: str
    source_node: str | None = None
    staged_at: str | None = None


def check_installer_name(name: object) -> str:
    """``name`` if it can be an installer's file name in the upgrade folder: a plain name (no folder, no
    ``..``), one every OS we run on can hold (:func:`engine.model.check_name`), of at most 255 characters,
    and none of this module's own files (``staged.json``, ``*.part``). StagingError saying why, if not."""
    if not isinstance(name, str):
        raise StagingError(f"installer name {name!r} refused: not a string")
    if len(name) > MAX_NAME_CHARS:
        raise StagingError(
            f"installer name {name[:40]!r}... refused: longer than {MAX_NAME_CHARS} characters"
        )
    try:
        check_name(name, name)
    except PathRejected as e:
        raise StagingError(f"installer name {name!r} refused: {e.reason}") from None
    if name.lower() == SIDECAR or name.lower().endswith(PART_SUFFIX):
        raise StagingError(f"installer name {name!r} refused: it is reserved for standby's own files")
    return name


def _check_size(name: str, size: object) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise StagingError(f"installer {name!r} refused: size {size!r} is not a number of bytes")
    if size > MAX_INSTALLER_SIZE:
        raise StagingError(
            f"installer {name!r} refused: {size} bytes is more than the "
            f"{MAX_INSTALLER_SIZE >> 30} GiB allowed"
        )
    return size


def _check_digest(name: str, digest_hex: object) -> str:
    if (
        not isinstance(digest_hex, str)
        or len(digest_hex) != DIGEST_HEX_CHARS
        or any(c not in "0123456789abcdefABCDEF" for c in digest_hex)
    ):
        raise StagingError(
            f"installer {name!r} refused: digest {digest_hex!r} is not {DIGEST_HEX_CHARS} hex digits"
        )
    return digest_hex.lower()


def upgrade_dir(state_dir: Path) -> Path:
    """The folder staged installers are kept in."""
    return state_dir / UPGRADE_DIR


def installer_path(state_dir: Path, staged: Staged) -> Path:
    """Where the staged installer ``staged`` is on this node."""
    return upgrade_dir(state_dir) / staged.name


def _hash_file(path: Path, chunk: int = CHUNK) -> tuple[int, str]:
    """Bytes read and their digest (hex)."""
    n, d = digest_file(path, chunk)
    return n, hexdigest(d)


def describe(path: Path) -> Staged:
    """The installer at ``path`` as the receiver will check it: name, size and digest. StagingError if its
    name would be refused, it is too large, or it changed while it was read (stat before and after)."""
    name = check_installer_name(path.name)
    try:
        before = os.stat(path)
        if not path.is_file():
            raise StagingError(f"installer {str(path)!r} is not a file")
        _check_size(name, before.st_size)
        n, digest = _hash_file(path)
        after = os.stat(path)
    except OSError as e:
        raise StagingError(f"cannot read installer {str(path)!r}: {e.strerror or e}") from None
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or n != before.st_size:
        raise StagingError(f"installer {str(path)!r} changed while it was read; try again once it is whole")
    return Staged(name, n, digest)


def iter_chunks(path: Path, chunk: int = CHUNK) -> Iterator[tuple[int, bytes]]:
    """``(offset, data)`` for the whole file, ``chunk`` bytes at a time (the last may be shorter; none for
    an empty file). The receiver's digest check catches a file that changes meanwhile."""
    if chunk <= 0:
        raise ValueError(f"chunk must be a number of bytes > 0, got {chunk!r}")
    offset = 0
    with open(path, "rb") as f:
        while data := f.read(chunk):
            yield offset, data
            offset += len(data)


def _part_path(folder: Path, digest_hex: str) -> Path:
    """The partial file of an installer being received: named by its digest, so that a name of 255
    characters still leaves room for the suffix."""
    return folder / (digest_hex + PART_SUFFIX)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` whole: aside, fsync, rename over, fsync the folder."""
    tmp = path.with_name(path.name + TEMP_MARKER + "new")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class Incoming:
    """One installer being received into ``<state_dir>/upgrade/``, chunk by chunk, in order.

    Make one with :meth:`begin`; then :meth:`write` each chunk and :meth:`finish` (checks, renames into
    place, records it) or :meth:`abort` (deletes the partial file). The partial file is
    ``<digest>.part``; a leftover one (an interrupted transfer of the same installer) is overwritten. One
    transfer of an installer at a time: the caller keeps it so.
    Usable as a context manager: leaving it unfinished aborts it.
    """

    def __init__(self, folder: Path, announced: Staged, f: IO[bytes]) -> None:
        self._folder = folder
        self._announced = announced
        self._f: IO[bytes] | None = f
        self._hasher = Hasher()
        self._received = 0
        self.part = _part_path(folder, announced.digest)

    @classmethod
    def begin(cls, state_dir: Path, name: str, size: int, digest_hex: str, source_node: str) -> Incoming:
        """Check what the peer announces (StagingError if refused) and open the partial file."""
        name = check_installer_name(name)
        size = _check_size(name, size)
        digest_hex = _check_digest(name, digest_hex)
        if not isinstance(source_node, str):
            raise StagingError(f"installer {name!r} refused: source node {source_node!r} is not a string")
        folder = upgrade_dir(state_dir)
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if free < size:
            raise StagingError(
                f"installer {name!r} refused: it needs {size} bytes and {folder} has {free} bytes free"
            )
        f = open(_part_path(folder, digest_hex), "wb")  # noqa: SIM115 - held open across write() calls
        log.info("upgrade.staging_begun name=%s size=%d source=%s", name, size, source_node)
        return cls(folder, Staged(name, size, digest_hex, source_node), f)

    @property
    def name(self) -> str:
        return self._announced.name

    @property
    def received(self) -> int:
        """Bytes written so far: the offset the next chunk must have."""
        return self._received

    def _open(self, doing: str) -> IO[bytes]:
        if self._f is None:
            raise StagingError(f"installer {self.name!r}: cannot {doing}: the transfer is already over")
        return self._f

    def write(self, offset: int, data: bytes) -> None:
        """Append the chunk at ``offset``, which must be where the previous one ended. StagingError for a
        gap, a repeat or more bytes than announced (nothing is written; the caller aborts)."""
        f = self._open("write")
        if offset != self._received:
            raise StagingError(
                f"installer {self.name!r}: a chunk at offset {offset} where {self._received} was expected "
                "(chunks must come in order, without gaps or repeats)"
            )
        if self._received + len(data) > self._announced.size:
            raise StagingError(
                f"installer {self.name!r}: a chunk of {len(data)} bytes at offset {offset} goes past the "
                f"announced size of {self._announced.size} bytes"
            )
        f.write(data)
        self._hasher.update(data)
        self._received += len(data)

    def finish(self) -> Staged:
        """Check size and digest, make the installer durable in place and record it; the staged installer.

        On a mismatch the partial file is deleted and :class:`StagedMismatch` names what differs. An
        installer staged before under another name is deleted once this one is recorded.
        """
        f = self._open("finish")
        self._f = None
        a = self._announced
        digest = hexdigest(self._hasher.digest())
        mismatch = None
        if self._received != a.size:
            mismatch = StagedMismatch(a.name, "size", f"{a.size} bytes", f"{self._received} bytes")
        elif digest != a.digest:
            mismatch = StagedMismatch(a.name, "digest", a.digest, digest)
        if mismatch is not None:
            f.close()
            self.part.unlink(missing_ok=True)
            log.warning("upgrade.staging_mismatch name=%s what=%s", a.name, mismatch.what)
            raise mismatch
        try:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            previous = _read_sidecar(self._folder)
            # INVARIANT: the record goes before the file is replaced and comes back only once the new
            # file is durable in place: a record always describes a whole, checked file.
            (self._folder / SIDECAR).unlink(missing_ok=True)
            fsync_dir(self._folder)
            final = self._folder / a.name
            os.replace(self.part, final)
            fsync_dir(self._folder)
            now = datetime.now(UTC).isoformat(timespec="seconds")
            result = Staged(a.name, a.size, a.digest, a.source_node, now)
            _write_atomic(self._folder / SIDECAR, _sidecar_bytes(result))
        except BaseException:
            f.close()
            self.part.unlink(missing_ok=True)
            raise
        if previous is not None and previous.name != a.name:
            _remove_replaced(self._folder / previous.name, final)
        log.info(
            "upgrade.staged name=%s size=%d digest=%s source=%s", a.name, a.size, a.digest, a.source_node
        )
        return result

    def abort(self) -> None:
        """Give the transfer up and delete the partial file. Nothing if it is over already."""
        f, self._f = self._f, None
        if f is None:
            return
        f.close()
        self.part.unlink(missing_ok=True)
        log.info("upgrade.staging_aborted name=%s received=%d", self.name, self._received)

    def __enter__(self) -> Incoming:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.abort()


def _remove_replaced(old: Path, new: Path) -> None:
    """Delete the installer the new one replaces, unless it is the same file (a name differing only in
    case on a case-insensitive file system)."""
    try:
        if old.exists() and not os.path.samefile(old, new):
            old.unlink()
    except OSError as e:  # only disk space is lost; the new installer is staged
        log.warning("upgrade.old_installer_not_removed path=%s error=%s", old, e.strerror or e)


def _sidecar_bytes(s: Staged) -> bytes:
    record = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "name": s.name,
        "size": s.size,
        "digest": s.digest,
        "source_node": s.source_node,
        "staged_at": s.staged_at,
    }
    return (json.dumps(record, indent=1, sort_keys=True) + "\n").encode("utf-8")


def _parse_sidecar(raw: bytes) -> Staged:
    """The record in ``raw``; ValueError (or StagingError) saying what is wrong."""
    d: Any = json.loads(raw.decode("utf-8"))
    if not isinstance(d, dict) or d.get("format") != SIDECAR_FORMAT or d.get("version") != SIDECAR_VERSION:
        raise ValueError(f"not a {SIDECAR_FORMAT} record of version {SIDECAR_VERSION}")
    name = check_installer_name(d.get("name"))
    size = _check_size(name, d.get("size"))
    digest = _check_digest(name, d.get("digest"))
    source, at = d.get("source_node"), d.get("staged_at")
    if not isinstance(source, str) or not isinstance(at, str):
        raise ValueError("source_node and staged_at must be strings")
    return Staged(name, size, digest, source, at)


def _read_sidecar(folder: Path) -> Staged | None:
    """The record in ``folder``, or None (with a warning if there is one that cannot be read)."""
    path = folder / SIDECAR
    try:
        return _parse_sidecar(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UpgradeError) as e:
        log.warning("upgrade.staged_unreadable path=%s error=%s", path, e)
        return None


def staged(state_dir: Path, *, verify: bool = False) -> Staged | None:
    """The installer staged on this node, if its record is readable and the file is still there with its
    size (and, with ``verify``, its digest: the whole file is read). None otherwise, with a warning saying
    why when there is a record it cannot use."""
    folder = upgrade_dir(state_dir)
    record = _read_sidecar(folder)
    if record is None:
        return None
    path = folder / record.name
    try:
        size = os.stat(path).st_size
        if size != record.size:
            log.warning("upgrade.staged_changed path=%s size=%d recorded=%d", path, size, record.size)
            return None
        if verify:
            _, digest = _hash_file(path)
            if digest != record.digest:
                log.warning(
                    "upgrade.staged_changed path=%s digest=%s recorded=%s", path, digest, record.digest
                )
                return None
    except OSError as e:
        log.warning("upgrade.staged_missing path=%s error=%s", path, e.strerror or e)
        return None
    return record
