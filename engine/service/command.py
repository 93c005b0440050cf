"""The command backend: a service controlled by three configured programs, ``start``, ``stop`` and
``status`` (argv lists, run without a shell).

Owns: running those commands with a timeout, and :func:`parse_status`, the pure reading of a status
command's result. Status follows the LSB init-script convention: exit 0 is running, 3 is stopped, anything
else is unknown. Its output may add ``pid=N`` and ``exit_code=N`` lines (how the service last ended),
which are reported; other lines are ignored. The start type is whatever the admin set: it reports "manual"
and ``set_manual`` does nothing.

``start`` and ``stop`` run their command only when the status says there is something to do, then wait
(polling ``status``) until it is so. A command that overruns the time left is killed with its process group
and is a ServiceError; so is one that exits non-zero, with the last line it printed.

Output goes to temporary files, not pipes: a start command that leaves a daemon behind holding its stdout
must not make us wait for the daemon to exit.

Must not: use a shell, decide when to start or stop, or kill the service itself.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

from engine.service import ServiceError, ServiceState, ServiceStatus, check_timeout

log = logging.getLogger(__name__)

#: LSB status exit codes.
LSB_RUNNING = 0
LSB_STOPPED = 3
#: How often the status command is run while waiting, seconds.
POLL = 0.1
#: The least time a status command gets while waiting, even at the deadline.
MIN_STATUS_TIME = 0.5
#: How much of a command's stdout and of its stderr is read.
OUTPUT_LIMIT = 64 * 1024


def parse_status(returncode: int, stdout: str) -> ServiceStatus:
    """The status command's exit code and output as a status. Pure."""
    if returncode == LSB_RUNNING:
        state = ServiceState.RUNNING
    elif returncode == LSB_STOPPED:
        state = ServiceState.STOPPED
    else:
        state = ServiceState.UNKNOWN
    values: dict[str, int] = {}
    for line in stdout.splitlines():
        key, sep, value = line.strip().partition("=")
        value = value.strip()
        if sep and key.strip() in ("pid", "exit_code") and value.lstrip("-").isdigit():
            values[key.strip()] = int(value)
    pid = values.get("pid")
    return ServiceStatus(
        state=state,
        exit_code=values.get("exit_code") if state is ServiceState.STOPPED else None,
        pid=pid if pid and pid > 0 and state is not ServiceState.STOPPED else None,
        start_type="manual",
    )


class _Overran(ServiceError):
    """A command did not finish within its time (it was killed)."""


class CommandControl:
    """:class:`engine.service.ServiceControl` over configured start, stop and status commands."""

    def __init__(
        self,
        start: Sequence[str],
        stop: Sequence[str],
        status: Sequence[str],
        *,
        status_timeout: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        for name, argv in (("start", start), ("stop", stop), ("status", status)):
            if not argv or not argv[0]:
                raise ServiceError(f"service command {name!r} is empty: it needs a program to run")
        self._argv = {"start": tuple(start), "stop": tuple(stop), "status": tuple(status)}
        self._status_timeout = check_timeout(status_timeout)
        self._clock = clock
        self._sleep = sleep

    def _run(self, which: str, timeout: float) -> tuple[int, str]:
        """Run the ``which`` command; its exit code and output (stdout, then stderr)."""
        argv = self._argv[which]
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=sys.platform != "win32",
                )
            except OSError as e:
                raise ServiceError(f"cannot run the {which} command {argv[0]!r}: {e.strerror or e}") from None
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                kill_group(proc)
                raise _Overran(f"the {which} command did not finish within {timeout:g} s") from None
            out.seek(0)
            err.seek(0)
            text = out.read(OUTPUT_LIMIT).decode("utf-8", "replace")
            said = err.read(OUTPUT_LIMIT).decode("utf-8", "replace")
        return rc, text + ("\n" + said if said else "")

    def _query(self, timeout: float) -> ServiceStatus:
        rc, out = self._run("status", timeout)
        return parse_status(rc, out)

    def query(self) -> ServiceStatus:
        return self._query(self._status_timeout)

    def _checked(self, which: str, deadline: float, timeout: float, status: ServiceStatus) -> None:
        remaining = max(deadline - self._clock(), 0.001)
        try:
            rc, out = self._run(which, remaining)
        except _Overran as e:
            raise ServiceError(f"the service did not {which} within {timeout:g} s: {e}", status) from None
        except ServiceError as e:
            raise ServiceError(f"cannot {which} the service: {e}", status) from None
        if rc != 0:
            lines = [line.strip() for line in out.splitlines() if line.strip()]
            said = lines[-1][:300] if lines else "no message"
            raise ServiceError(f"cannot {which} the service: the {which} command exited {rc}: {said}", status)

    def start(self, timeout: float) -> ServiceStatus:
        deadline = self._clock() + check_timeout(timeout)
        status = self._query(self._status_timeout)
        if status.state is ServiceState.RUNNING:
            return status
        log.info("service.starting command=%s", self._argv["start"][0])
        self._checked("start", deadline, timeout, status)
        status = self._wait(deadline, ServiceState.RUNNING, "start", timeout)
        log.info("service.started pid=%s", status.pid)
        return status

    def stop(self, timeout: float) -> ServiceStatus:
        deadline = self._clock() + check_timeout(timeout)
        status = self._query(self._status_timeout)
        if status.state is ServiceState.STOPPED:
            return status
        log.info("service.stopping command=%s pid=%s", self._argv["stop"][0], status.pid)
        self._checked("stop", deadline, timeout, status)
        status = self._wait(deadline, ServiceState.STOPPED, "stop", timeout)
        log.info("service.stopped exit_code=%s", status.exit_code)
        return status

    def _wait(self, deadline: float, want: ServiceState, doing: str, timeout: float) -> ServiceStatus:
        while True:
            remaining = deadline - self._clock()
            status = self._query(min(self._status_timeout, max(remaining, MIN_STATUS_TIME)))
            if status.state is want:
                return status
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise ServiceError(
                    f"the service did not {doing} within {timeout:g} s (status: {status.describe()})", status
                )
            self._sleep(min(POLL, remaining))

    def set_manual(self) -> None:
        """Nothing: with commands, the start type is whatever the admin set."""


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """End an overrunning command and whatever it started in its process group, and reap it (it must have
    been started in a group of its own: ``start_new_session`` on POSIX). On Windows only the program
    itself ends."""
    try:
        if sys.platform != "win32":
            os.killpg(proc.pid, signal.SIGKILL)
        else:  # pragma: no cover - Windows only
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
