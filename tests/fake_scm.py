"""A fake Windows Service Control Manager: the seam ``engine.service.scm`` is tested through.

Owns: a model of the SCM as far as our logic can see it, driven by a fake clock: services with a start
type, pending states that last a set time and report a wait hint and a moving checkpoint, a process id
while running, crash exit codes (a service-specific code, 1066, or an aborted process, 1067), hung stops
(stop pending forever, the checkpoint stuck), and refusals: access rights the caller's account lacks (5 at
OpenService, as Windows does), a disabled service (1058 at StartService), a missing one (1060), a service
that does not accept stop (1052). Every call is recorded in ``calls``.

Must not: be imported by engine code. Not product code: a seam the tests own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.service import scm
from engine.service.scm import ScmConfig, ScmError, ScmStatus


class FakeClock:
    """A clock that moves only when something sleeps; every sleep is recorded."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0, f"negative sleep {seconds}"
        self.sleeps.append(seconds)
        self.now += seconds


@dataclass
class FakeService:
    name: str
    state: int = scm.SERVICE_STOPPED
    start_type: int = scm.SERVICE_AUTO_START
    delayed: bool = False
    #: how long START_PENDING / STOP_PENDING last, and the wait hints reported meanwhile (ms)
    start_time: float = 4.0
    start_hint_ms: int = 5000
    stop_time: float = 3.0
    stop_hint_ms: int = 4000
    #: faults
    hang_stop: bool = False
    fail_start_code: int | None = None  # the service reports this code and stops while starting
    accepts_stop: bool = True
    denied: int = 0  # access rights OpenService refuses
    #: what the SCM shows
    pid: int = 0
    win32_exit_code: int = 0
    service_exit_code: int = 0
    checkpoint: int = 0
    wait_hint_ms: int = 0
    pending_since: float = 0.0


@dataclass(frozen=True)
class Handle:
    name: str
    access: int


@dataclass
class FakeScm:
    """An :class:`engine.service.scm.ScmApi` over :class:`FakeService` values."""

    clock: FakeClock
    services: dict[str, FakeService] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    open_handles: int = 0
    #: one-shot races: StartService answers 1056 / ControlService answers 1062 while doing the thing anyway
    race_already_running: bool = False
    race_not_active: bool = False
    next_pid: int = 4000

    def add(self, name: str, **kw: object) -> FakeService:
        svc = FakeService(name, **kw)  # type: ignore[arg-type]
        self.services[name] = svc
        return svc

    # --- faults the tests inject -------------------------------------------------------------------------

    def crash(self, name: str, code: int) -> None:
        """The service ends by itself, reporting service-specific exit code ``code``."""
        svc = self.services[name]
        self._advance(svc)
        svc.state, svc.pid = scm.SERVICE_STOPPED, 0
        svc.win32_exit_code, svc.service_exit_code = scm.ERROR_SERVICE_SPECIFIC_ERROR, code
        svc.checkpoint = svc.wait_hint_ms = 0

    def abort(self, name: str) -> None:
        """The service's process dies without reporting anything (the SCM says 1067)."""
        svc = self.services[name]
        self._advance(svc)
        svc.state, svc.pid = scm.SERVICE_STOPPED, 0
        svc.win32_exit_code, svc.service_exit_code = scm.ERROR_PROCESS_ABORTED, 0

    # --- the model ---------------------------------------------------------------------------------------

    def _advance(self, svc: FakeService) -> None:
        """Move a pending state on by the clock."""
        elapsed = self.clock() - svc.pending_since
        if svc.state == scm.SERVICE_START_PENDING:
            if elapsed < svc.start_time:
                svc.checkpoint = int(elapsed) + 1
            elif svc.fail_start_code is not None:
                svc.state, svc.pid, svc.checkpoint, svc.wait_hint_ms = scm.SERVICE_STOPPED, 0, 0, 0
                svc.win32_exit_code = scm.ERROR_SERVICE_SPECIFIC_ERROR
                svc.service_exit_code = svc.fail_start_code
            else:
                svc.state, svc.checkpoint, svc.wait_hint_ms = scm.SERVICE_RUNNING, 0, 0
        elif svc.state == scm.SERVICE_STOP_PENDING:
            if svc.hang_stop:
                svc.checkpoint = 1  # INVARIANT: a hung stop's checkpoint never moves
            elif elapsed < svc.stop_time:
                svc.checkpoint = int(elapsed) + 1
            else:
                svc.state, svc.pid, svc.checkpoint, svc.wait_hint_ms = scm.SERVICE_STOPPED, 0, 0, 0
                svc.win32_exit_code = svc.service_exit_code = 0

    def _service(self, handle: object, need: int, call: str) -> FakeService:
        assert isinstance(handle, Handle)
        self.calls.append((call, handle.name))
        if not handle.access & need:
            raise ScmError(scm.ERROR_ACCESS_DENIED, call, "Access is denied.")
        svc = self.services[handle.name]
        self._advance(svc)
        return svc

    def open_service(self, name: str, access: int) -> object:
        self.calls.append(("OpenService", name))
        svc = self.services.get(name)
        if svc is None:
            raise ScmError(
                scm.ERROR_SERVICE_DOES_NOT_EXIST, "OpenService", "The specified service does not exist."
            )
        if access & svc.denied:
            raise ScmError(scm.ERROR_ACCESS_DENIED, "OpenService", "Access is denied.")
        self.open_handles += 1
        return Handle(name, access)

    def close_service(self, handle: object) -> None:
        assert isinstance(handle, Handle)
        self.open_handles -= 1

    def query_status(self, handle: object) -> ScmStatus:
        s = self._service(handle, scm.SERVICE_QUERY_STATUS, "QueryServiceStatusEx")
        return ScmStatus(s.state, s.win32_exit_code, s.service_exit_code, s.checkpoint, s.wait_hint_ms, s.pid)

    def start_service(self, handle: object) -> None:
        s = self._service(handle, scm.SERVICE_START, "StartService")
        if s.start_type == scm.SERVICE_DISABLED:
            raise ScmError(scm.ERROR_SERVICE_DISABLED, "StartService", "The service cannot be started...")
        if s.state != scm.SERVICE_STOPPED:
            raise ScmError(scm.ERROR_SERVICE_ALREADY_RUNNING, "StartService", "An instance is running.")
        s.state, s.pid, s.checkpoint, s.wait_hint_ms = (
            scm.SERVICE_START_PENDING,
            self.next_pid,
            1,
            s.start_hint_ms,
        )
        s.win32_exit_code = s.service_exit_code = 0
        s.pending_since = self.clock()
        self.next_pid += 4
        if self.race_already_running:
            self.race_already_running = False
            raise ScmError(scm.ERROR_SERVICE_ALREADY_RUNNING, "StartService", "An instance is running.")

    def control_stop(self, handle: object) -> None:
        s = self._service(handle, scm.SERVICE_STOP, "ControlService")
        if s.state == scm.SERVICE_STOPPED:
            raise ScmError(
                scm.ERROR_SERVICE_NOT_ACTIVE, "ControlService", "The service has not been started."
            )
        if not s.accepts_stop:
            raise ScmError(scm.ERROR_INVALID_SERVICE_CONTROL, "ControlService", "The control is not valid.")
        if s.state in (scm.SERVICE_START_PENDING, scm.SERVICE_STOP_PENDING):
            raise ScmError(scm.ERROR_SERVICE_CANNOT_ACCEPT_CTRL, "ControlService", "Cannot accept control.")
        s.state, s.checkpoint, s.wait_hint_ms = scm.SERVICE_STOP_PENDING, 1, s.stop_hint_ms
        s.pending_since = self.clock()
        if self.race_not_active:
            self.race_not_active = False
            s.state, s.pid, s.checkpoint, s.wait_hint_ms = scm.SERVICE_STOPPED, 0, 0, 0
            raise ScmError(
                scm.ERROR_SERVICE_NOT_ACTIVE, "ControlService", "The service has not been started."
            )

    def query_config(self, handle: object) -> ScmConfig:
        s = self._service(handle, scm.SERVICE_QUERY_CONFIG, "QueryServiceConfig")
        return ScmConfig(s.start_type, s.delayed)

    def change_start_type(self, handle: object, start_type: int) -> None:
        s = self._service(handle, scm.SERVICE_CHANGE_CONFIG, "ChangeServiceConfig")
        s.start_type = start_type
