"""The systemd backend: ``systemctl show`` read as data, ``systemctl start/stop/disable``.

Owns: :func:`parse_show`, a pure parser of ``systemctl show -p ...`` output into a
:class:`engine.service.ServiceStatus`, and :class:`SystemdControl`, a thin runner around ``systemctl``.

Mapping: ``LoadState=not-found`` is not_found; ``ActiveState`` active/reloading is running, activating is
start_pending, deactivating is stop_pending, inactive/failed is stopped; anything else is unknown. The exit
code (reported when stopped) is ``ExecMainStatus`` when the main process exited (``ExecMainCode=1``) and
minus the signal when it was killed (2) or dumped core (3). ``UnitFileState`` enabled is "auto", masked is
"disabled" (it cannot be started), disabled/static/indirect/linked are "manual".

"Manual" for systemd is a unit that is not enabled (started only by the agent): ``set_manual`` runs
``systemctl disable`` (and ``unmask`` for a masked unit). ``systemctl start``/``stop`` wait for their job;
past the caller's timeout the client is killed (the job stays queued in systemd) and ServiceError is raised.

Must not: decide when to start or stop; pass anything to systemctl that is not a validated unit name.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable

from engine.service import ServiceError, ServiceState, ServiceStatus, check_timeout

log = logging.getLogger(__name__)

PROPERTIES = (
    "LoadState",
    "ActiveState",
    "SubState",
    "ExecMainCode",
    "ExecMainStatus",
    "ExecMainPID",
    "UnitFileState",
)

_ACTIVE = {
    "active": ServiceState.RUNNING,
    "reloading": ServiceState.RUNNING,
    "refreshing": ServiceState.RUNNING,
    "activating": ServiceState.START_PENDING,
    "deactivating": ServiceState.STOP_PENDING,
    "inactive": ServiceState.STOPPED,
    "failed": ServiceState.STOPPED,
}
_START_TYPES = {
    "enabled": "auto",
    "enabled-runtime": "auto",
    "masked": "disabled",
    "masked-runtime": "disabled",
    "disabled": "manual",
    "static": "manual",
    "indirect": "manual",
    "linked": "manual",
    "linked-runtime": "manual",
}
#: ExecMainCode: how the main process ended (CLD_EXITED, CLD_KILLED, CLD_DUMPED).
CLD_EXITED, CLD_KILLED, CLD_DUMPED = 1, 2, 3
#: How often a pending state is looked at again, seconds.
POLL = 0.25
#: systemctl show is one quick D-Bus call; this bounds a systemd that does not answer.
SHOW_TIMEOUT = 10.0

#: argv, timeout -> (exit status, stdout, stderr); raises subprocess.TimeoutExpired or OSError
Runner = Callable[[list[str], float], tuple[int, str, str]]


def parse_show(text: str) -> ServiceStatus:
    """``systemctl show -p ...`` output (``Key=Value`` lines, any order) as a status. Pure."""
    props: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            props[key.strip()] = value.strip()
    if props.get("LoadState") == "not-found":
        return ServiceStatus(ServiceState.NOT_FOUND)
    state = _ACTIVE.get(props.get("ActiveState", ""), ServiceState.UNKNOWN)
    pid = _int(props.get("ExecMainPID"))
    code, status = _int(props.get("ExecMainCode")), _int(props.get("ExecMainStatus"))
    exit_code: int | None = None
    if state is ServiceState.STOPPED and status is not None:
        if code == CLD_EXITED:
            exit_code = status
        elif code in (CLD_KILLED, CLD_DUMPED):
            exit_code = -status
        elif code is None and "ExecMainCode" not in props:  # asked without ExecMainCode: the status as is
            exit_code = status
    return ServiceStatus(
        state=state,
        exit_code=exit_code,
        pid=pid or None,
        start_type=_START_TYPES.get(props.get("UnitFileState", "")),
    )


def _int(text: str | None) -> int | None:
    if text is None or not text.lstrip("-").isdigit():
        return None
    return int(text)


def run_systemctl(argv: list[str], timeout: float) -> tuple[int, str, str]:
    """Run ``argv`` (systemctl ...). Raises subprocess.TimeoutExpired past ``timeout`` (the client is
    killed) and OSError if it cannot run."""
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return r.returncode, r.stdout, r.stderr


class SystemdControl:
    """:class:`engine.service.ServiceControl` for one systemd unit."""

    def __init__(
        self,
        unit: str,
        *,
        run: Runner = run_systemctl,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        systemctl: str = "systemctl",
    ) -> None:
        if not unit or unit.startswith("-") or "/" in unit or any(c.isspace() for c in unit):
            raise ServiceError(f"systemd unit name {unit!r} is not usable")
        self.unit = unit
        self._run = run
        self._clock = clock
        self._sleep = sleep
        self._systemctl_path = systemctl

    def _systemctl(self, args: list[str], timeout: float, doing: str) -> str:
        """stdout of ``systemctl ARGS UNIT``; ServiceError (naming ``doing``) if it fails or overruns."""
        argv = [self._systemctl_path, *args, self.unit]
        try:
            rc, out, err = self._run(argv, timeout)
        except subprocess.TimeoutExpired:
            raise ServiceError(
                f"unit {self.unit}: cannot {doing}: systemctl {args[0]} did not finish within {timeout:g} s"
            ) from None
        except OSError as e:
            raise ServiceError(
                f"unit {self.unit}: cannot {doing}: cannot run {argv[0]}: {e.strerror or e}"
            ) from None
        if rc != 0:
            said = (err.strip() or out.strip() or "no message").splitlines()[-1][:300]
            raise ServiceError(f"unit {self.unit}: cannot {doing}: systemctl {args[0]} exited {rc}: {said}")
        return out

    def query(self) -> ServiceStatus:
        return parse_show(self._systemctl(["show", "-p", ",".join(PROPERTIES)], SHOW_TIMEOUT, "query"))

    def start(self, timeout: float) -> ServiceStatus:
        deadline = self._clock() + check_timeout(timeout)
        status = self.query()
        if status.state is ServiceState.RUNNING:
            return status
        if status.state is ServiceState.NOT_FOUND:
            raise ServiceError(f"unit {self.unit}: cannot start: the unit does not exist", status)
        log.info("service.starting unit=%s", self.unit)
        self._systemctl(["start", "--no-ask-password"], max(deadline - self._clock(), 0.001), "start")
        status = self._wait(deadline, ServiceState.RUNNING, "start", timeout)
        log.info("service.started unit=%s pid=%s", self.unit, status.pid)
        return status

    def stop(self, timeout: float) -> ServiceStatus:
        deadline = self._clock() + check_timeout(timeout)
        status = self.query()
        if status.state is ServiceState.STOPPED:
            return status
        if status.state is ServiceState.NOT_FOUND:  # as on Windows: said, not taken as stopped
            raise ServiceError(f"unit {self.unit}: cannot stop: the unit does not exist", status)
        log.info("service.stopping unit=%s pid=%s", self.unit, status.pid)
        try:
            self._systemctl(["stop", "--no-ask-password"], max(deadline - self._clock(), 0.001), "stop")
        except ServiceError as e:
            raise ServiceError(str(e), status) from None
        status = self._wait(deadline, ServiceState.STOPPED, "stop", timeout)
        log.info("service.stopped unit=%s exit_code=%s", self.unit, status.exit_code)
        return status

    def _wait(self, deadline: float, want: ServiceState, doing: str, timeout: float) -> ServiceStatus:
        while True:
            status = self.query()
            if status.state is want:
                return status
            pending = status.state in (ServiceState.START_PENDING, ServiceState.STOP_PENDING)
            if want is ServiceState.RUNNING and not pending:
                raise ServiceError(f"unit {self.unit}: not running after start ({status.describe()})", status)
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise ServiceError(
                    f"unit {self.unit}: did not {doing} within {timeout:g} s ({status.describe()})", status
                )
            self._sleep(min(POLL, remaining))

    def set_manual(self) -> None:
        doing = "set the start type to manual"
        for _ in range(2):  # masked: unmask, then (if it is also enabled) disable
            out = self._systemctl(["show", "-p", "UnitFileState"], SHOW_TIMEOUT, doing)
            state = out.strip().partition("=")[2]
            runtime = ["--runtime"] if state.endswith("-runtime") else []
            if state in ("enabled", "enabled-runtime"):
                self._systemctl(["disable", "--no-ask-password", *runtime], SHOW_TIMEOUT, doing)
            elif state in ("masked", "masked-runtime"):
                self._systemctl(["unmask", "--no-ask-password", *runtime], SHOW_TIMEOUT, doing)
            else:
                return
            log.info("service.set_manual unit=%s was=%s", self.unit, state)
