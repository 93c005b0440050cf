"""The Windows service logic, over a small :class:`ScmApi` so it runs (and is tested) anywhere.

Owns: what start, stop, query and set-manual mean against the Service Control Manager: its state numbers,
wait hints and checkpoints, exit codes, and which errors are success (1056 "already running" on start,
1062 "not active" on stop) and which are refusals, each turned into a :class:`ServiceError` that says why.

Waiting follows the SCM documentation (and Salt's ``win_service``): while a state is pending, poll at a
tenth of the service's wait hint, but never less than 1 s nor more than 10 s, and never past the caller's
deadline. The deadline is the only bound; a service whose checkpoint stops moving is reported when it
passes, with its checkpoint and pid, and the caller decides what to do.

Must not: import pywin32 (``windows`` is the one importer), read the clock or sleep except through the
injected ``clock`` and ``sleep``, or decide to kill anything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from engine.service import ServiceError, ServiceState, ServiceStatus, check_timeout

log = logging.getLogger(__name__)

# dwCurrentState
SERVICE_STOPPED = 1
SERVICE_START_PENDING = 2
SERVICE_STOP_PENDING = 3
SERVICE_RUNNING = 4
SERVICE_CONTINUE_PENDING = 5
SERVICE_PAUSE_PENDING = 6
SERVICE_PAUSED = 7

# dwStartType
SERVICE_BOOT_START = 0
SERVICE_SYSTEM_START = 1
SERVICE_AUTO_START = 2
SERVICE_DEMAND_START = 3
SERVICE_DISABLED = 4

# service access rights (OpenService)
SERVICE_QUERY_CONFIG = 0x0001
SERVICE_CHANGE_CONFIG = 0x0002
SERVICE_QUERY_STATUS = 0x0004
SERVICE_START = 0x0010
SERVICE_STOP = 0x0020

# win32 error codes
ERROR_ACCESS_DENIED = 5
ERROR_INVALID_SERVICE_CONTROL = 1052
ERROR_SERVICE_REQUEST_TIMEOUT = 1053
ERROR_SERVICE_ALREADY_RUNNING = 1056
ERROR_SERVICE_DISABLED = 1058
ERROR_SERVICE_DOES_NOT_EXIST = 1060
ERROR_SERVICE_CANNOT_ACCEPT_CTRL = 1061
ERROR_SERVICE_NOT_ACTIVE = 1062
ERROR_SERVICE_SPECIFIC_ERROR = 1066
ERROR_PROCESS_ABORTED = 1067
ERROR_SERVICE_DEPENDENCY_FAIL = 1068
ERROR_SERVICE_LOGON_FAILED = 1069

#: Poll bounds while a state is pending, seconds (a tenth of the wait hint, clamped).
POLL_MIN = 1.0
POLL_MAX = 10.0

_STATES = {
    SERVICE_STOPPED: ServiceState.STOPPED,
    SERVICE_START_PENDING: ServiceState.START_PENDING,
    SERVICE_STOP_PENDING: ServiceState.STOP_PENDING,
    SERVICE_RUNNING: ServiceState.RUNNING,
    SERVICE_CONTINUE_PENDING: ServiceState.START_PENDING,
    SERVICE_PAUSE_PENDING: ServiceState.PAUSED,
    SERVICE_PAUSED: ServiceState.PAUSED,
}
_PENDING = {SERVICE_START_PENDING, SERVICE_STOP_PENDING, SERVICE_CONTINUE_PENDING, SERVICE_PAUSE_PENDING}

_REASONS = {
    ERROR_ACCESS_DENIED: "access denied: the agent's account may not control this service "
    "(run the agent as LocalSystem or an administrator)",
    ERROR_INVALID_SERVICE_CONTROL: "the service does not accept a stop request",
    ERROR_SERVICE_REQUEST_TIMEOUT: "the service did not respond to the request in time",
    ERROR_SERVICE_DISABLED: "the service is disabled (set its start type to Manual)",
    ERROR_SERVICE_DOES_NOT_EXIST: "the service does not exist",
    ERROR_SERVICE_CANNOT_ACCEPT_CTRL: "the service cannot accept control requests now",
    ERROR_SERVICE_LOGON_FAILED: "the service's account could not log on",
    ERROR_SERVICE_DEPENDENCY_FAIL: "a service it depends on failed to start",
    ERROR_PROCESS_ABORTED: "the service's process ended unexpectedly",
}


class ScmError(Exception):
    """A failed SCM call: the win32 error ``code``, the function that failed, and the system's text."""

    def __init__(self, code: int, func: str = "", text: str = "") -> None:
        super().__init__(f"{func}: {text} ({code})" if func else f"{text} ({code})")
        self.code = code
        self.func = func
        self.text = text


@dataclass(frozen=True)
class ScmStatus:
    """SERVICE_STATUS_PROCESS, as numbers."""

    state: int
    win32_exit_code: int = 0
    service_exit_code: int = 0
    checkpoint: int = 0
    wait_hint_ms: int = 0
    pid: int = 0


@dataclass(frozen=True)
class ScmConfig:
    """The part of QUERY_SERVICE_CONFIG we read; ``delayed`` is the delayed auto-start flag."""

    start_type: int
    delayed: bool = False


class ScmApi(Protocol):
    """The SCM calls the logic needs. Each raises :class:`ScmError` on failure."""

    def open_service(self, name: str, access: int) -> object: ...

    def close_service(self, handle: object) -> None: ...

    def query_status(self, handle: object) -> ScmStatus: ...

    def start_service(self, handle: object) -> None: ...

    def control_stop(self, handle: object) -> None: ...

    def query_config(self, handle: object) -> ScmConfig: ...

    def change_start_type(self, handle: object, start_type: int) -> None:
        """Change the start type only: every other setting is left as it is (SERVICE_NO_CHANGE)."""
        ...


def reason(code: int, text: str = "") -> str:
    """A sentence for a win32 error code, with the code."""
    said = _REASONS.get(code) or text.strip().rstrip(".") or "error"
    return f"{said} (error {code})"


def start_type_name(config: ScmConfig) -> str:
    if config.start_type == SERVICE_AUTO_START:
        return "delayed-auto" if config.delayed else "auto"
    if config.start_type == SERVICE_DEMAND_START:
        return "manual"
    if config.start_type == SERVICE_DISABLED:
        return "disabled"
    return "auto"  # boot and system start: drivers, started by the system


def exit_code(raw: ScmStatus) -> int:
    """The service's own code when it reported one (1066), else the win32 code (0, 1067...)."""
    if raw.win32_exit_code == ERROR_SERVICE_SPECIFIC_ERROR:
        return raw.service_exit_code
    return raw.win32_exit_code


def to_status(raw: ScmStatus, config: ScmConfig | None) -> ServiceStatus:
    state = _STATES.get(raw.state, ServiceState.UNKNOWN)
    return ServiceStatus(
        state=state,
        exit_code=exit_code(raw) if state is ServiceState.STOPPED else None,
        pid=raw.pid or None,
        start_type=start_type_name(config) if config is not None else None,
        wait_hint=raw.wait_hint_ms / 1000 if raw.state in _PENDING else 0.0,
    )


def poll_interval(wait_hint_ms: int, remaining: float) -> float:
    """How long to wait before the next look: a tenth of the wait hint in 1..10 s, at most ``remaining``."""
    return max(0.0, min(max(POLL_MIN, min(POLL_MAX, wait_hint_ms / 10_000)), remaining))


def _exit_note(raw: ScmStatus) -> str:
    if raw.win32_exit_code == ERROR_SERVICE_SPECIFIC_ERROR:
        return f"service-specific exit code {raw.service_exit_code}"
    if raw.win32_exit_code:
        return reason(raw.win32_exit_code)
    return "exit code 0"


class ScmControl:
    """:class:`engine.service.ServiceControl` for one Windows service, over ``api``."""

    def __init__(
        self,
        api: ScmApi,
        name: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._api = api
        self.name = name
        self._clock = clock
        self._sleep = sleep

    @contextmanager
    def _open(self, access: int, doing: str) -> Iterator[object]:
        try:
            handle = self._api.open_service(self.name, access)
        except ScmError as e:
            raise self._error(doing, e) from None
        try:
            yield handle
        finally:
            try:
                self._api.close_service(handle)
            except ScmError as e:  # nothing to do about it; the work is done or has failed already
                log.debug("service.close_failed name=%s error=%s", self.name, e)

    def _error(self, doing: str, e: ScmError, status: ServiceStatus | None = None) -> ServiceError:
        return ServiceError(f"service {self.name}: cannot {doing}: {reason(e.code, e.text)}", status)

    def _raw(self, handle: object, doing: str) -> ScmStatus:
        try:
            return self._api.query_status(handle)
        except ScmError as e:
            raise self._error(doing, e) from None

    def _config(self, handle: object) -> ScmConfig | None:
        try:
            return self._api.query_config(handle)
        except ScmError as e:  # the state is what matters; the start type is extra
            log.debug("service.query_config_failed name=%s error=%s", self.name, e)
            return None

    def _status(self, handle: object, raw: ScmStatus) -> ServiceStatus:
        return to_status(raw, self._config(handle))

    def query(self) -> ServiceStatus:
        try:
            handle = self._api.open_service(self.name, SERVICE_QUERY_STATUS | SERVICE_QUERY_CONFIG)
        except ScmError as e:
            if e.code == ERROR_SERVICE_DOES_NOT_EXIST:
                return ServiceStatus(ServiceState.NOT_FOUND)
            raise self._error("query", e) from None
        try:
            return self._status(handle, self._raw(handle, "query"))
        finally:
            try:
                self._api.close_service(handle)
            except ScmError as e:
                log.debug("service.close_failed name=%s error=%s", self.name, e)

    def start(self, timeout: float) -> ServiceStatus:
        deadline = self._clock() + check_timeout(timeout)
        access = SERVICE_START | SERVICE_QUERY_STATUS | SERVICE_QUERY_CONFIG
        with self._open(access, "start") as handle:
            asked = False
            while True:
                raw = self._raw(handle, "start")
                if raw.state == SERVICE_RUNNING:
                    status = self._status(handle, raw)
                    if asked:
                        log.info("service.started name=%s pid=%s", self.name, status.pid)
                    return status
                if raw.state in (SERVICE_PAUSED, SERVICE_PAUSE_PENDING):
                    raise ServiceError(
                        f"service {self.name}: cannot start: it is paused (continue or stop it first)",
                        self._status(handle, raw),
                    )
                if raw.state == SERVICE_STOPPED:
                    if asked:
                        raise ServiceError(
                            f"service {self.name}: stopped while starting ({_exit_note(raw)})",
                            self._status(handle, raw),
                        )
                    asked = True
                    try:
                        log.info("service.starting name=%s", self.name)
                        self._api.start_service(handle)
                    except ScmError as e:
                        if e.code != ERROR_SERVICE_ALREADY_RUNNING:  # started by someone else meanwhile
                            raise self._error("start", e, self._status(handle, raw)) from None
                    continue
                # pending: a start under way (ours or not), or a stop to let finish first
                self._wait(handle, raw, deadline, "start", timeout)

    def stop(self, timeout: float) -> ServiceStatus:
        deadline = self._clock() + check_timeout(timeout)
        access = SERVICE_STOP | SERVICE_QUERY_STATUS | SERVICE_QUERY_CONFIG
        with self._open(access, "stop") as handle:
            asked = False
            while True:
                raw = self._raw(handle, "stop")
                if raw.state == SERVICE_STOPPED:
                    status = self._status(handle, raw)
                    if asked:
                        log.info("service.stopped name=%s exit_code=%s", self.name, status.exit_code)
                    return status
                if not asked and raw.state in (SERVICE_RUNNING, SERVICE_PAUSED):
                    try:
                        log.info("service.stopping name=%s pid=%s", self.name, raw.pid)
                        self._api.control_stop(handle)
                        asked = True
                        continue
                    except ScmError as e:
                        if e.code == ERROR_SERVICE_NOT_ACTIVE:  # it stopped meanwhile
                            continue
                        if e.code != ERROR_SERVICE_CANNOT_ACCEPT_CTRL:  # not now: look again shortly
                            raise self._error("stop", e, self._status(handle, raw)) from None
                # pending (a start to let finish first, or our stop), or running after we asked it to stop
                self._wait(handle, raw, deadline, "stop", timeout)

    def _wait(self, handle: object, raw: ScmStatus, deadline: float, doing: str, timeout: float) -> None:
        """Sleep until the next look, or raise if the deadline has passed."""
        remaining = deadline - self._clock()
        if remaining <= 0:
            status = self._status(handle, raw)
            what = status.state.value.replace("_", " ")
            raise ServiceError(
                f"service {self.name}: did not {doing} within {timeout:g} s: still {what} "
                f"(checkpoint {raw.checkpoint}, wait hint {raw.wait_hint_ms / 1000:g} s, "
                f"pid {raw.pid or '-'})",
                status,
            )
        self._sleep(poll_interval(raw.wait_hint_ms, remaining))

    def set_manual(self) -> None:
        doing = "set the start type to Manual"
        # first only look: an account that may not change the config is fine if it is manual already
        with self._open(SERVICE_QUERY_CONFIG, doing) as handle:
            try:
                config = self._api.query_config(handle)
            except ScmError as e:
                raise self._error(doing, e) from None
        if config.start_type == SERVICE_DEMAND_START:
            return
        with self._open(SERVICE_CHANGE_CONFIG, doing) as handle:
            try:
                self._api.change_start_type(handle, SERVICE_DEMAND_START)
            except ScmError as e:
                raise self._error(doing, e) from None
        log.info("service.set_manual name=%s was=%s", self.name, start_type_name(config))
