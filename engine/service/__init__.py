"""Service control: one small, synchronous interface to the service standby protects, per backend.

Owns: the values every backend returns (:class:`ServiceState`, :class:`ServiceStatus`), the one error
(:class:`ServiceError`), the :class:`ServiceControl` protocol and :func:`make_control`, which picks a backend
from the config. Backends: ``scm`` (the Windows logic, over ``windows``, the one pywin32 importer),
``systemd`` and ``command``.

Rules every backend keeps:

- every call is idempotent: starting a running service and stopping a stopped one succeed and change
  nothing; ``set_manual`` on a manual service changes nothing;
- ``start``/``stop`` return only in the state asked for, or raise :class:`ServiceError` with the reason
  (a refusal, a service that stopped while starting, a timeout). Nothing is retried or escalated here;
- calls block (subprocesses, the SCM): the agent runs them in a worker thread.

Must not: decide when to start or stop, kill a hung service, or retry: the caller (the role machine, through
``node``) decides, from the status and the error.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from engine.errors import ReplicationError

if TYPE_CHECKING:
    from engine.config import ServiceConfig

__all__ = ["ServiceControl", "ServiceError", "ServiceState", "ServiceStatus", "make_control"]


class ServiceState(enum.Enum):
    RUNNING = "running"
    STOPPED = "stopped"
    START_PENDING = "start_pending"
    STOP_PENDING = "stop_pending"
    PAUSED = "paused"
    UNKNOWN = "unknown"
    NOT_FOUND = "not_found"


#: Start types a status may report (None: the backend cannot tell).
START_TYPES = ("manual", "auto", "delayed-auto", "disabled")


@dataclass(frozen=True)
class ServiceStatus:
    """What a backend knows about the service at one moment.

    ``exit_code`` is how the service last ended, reported only when it is stopped (0: a clean stop).
    ``pid`` is its main process while it has one. ``wait_hint`` is the time, in seconds, the service says
    its pending operation may still take (0 when none is pending or the backend has no such notion).
    """

    state: ServiceState
    exit_code: int | None = None
    pid: int | None = None
    start_type: str | None = None
    wait_hint: float = 0.0

    def describe(self) -> str:
        parts = [self.state.value]
        if self.exit_code is not None:
            parts.append(f"exit code {self.exit_code}")
        if self.pid is not None:
            parts.append(f"pid {self.pid}")
        return ", ".join(parts)


class ServiceError(ReplicationError):
    """The service could not be queried, started, stopped or reconfigured. The message says why; ``status``
    is the last status seen, when there is one (a hung stop: the pid the caller may decide to end)."""

    def __init__(self, message: str, status: ServiceStatus | None = None) -> None:
        super().__init__(message)
        self.status = status


class ServiceControl(Protocol):
    """Control of one service. Synchronous; every method is idempotent."""

    def query(self) -> ServiceStatus:
        """The service's status now (``NOT_FOUND`` if it does not exist); ServiceError if it cannot be
        read at all."""
        ...

    def start(self, timeout: float) -> ServiceStatus:
        """Start the service (nothing if it runs) and return once it runs; ServiceError with the reason if
        it cannot start or is not running within ``timeout`` seconds."""
        ...

    def stop(self, timeout: float) -> ServiceStatus:
        """Stop the service (nothing if it is stopped) and return once it is stopped; ServiceError if it
        is not stopped within ``timeout`` seconds (a hung stop: the caller decides what to do)."""
        ...

    def set_manual(self) -> None:
        """Make the service start only when asked to (never by itself at boot); nothing if it already is."""
        ...


def check_timeout(timeout: float) -> float:
    """``timeout`` if it is a usable number of seconds (0: look once, do not wait); ValueError if not."""
    if not timeout >= 0 or timeout == float("inf"):  # NaN fails the comparison
        raise ValueError(f"timeout must be a finite number of seconds >= 0, got {timeout!r}")
    return float(timeout)


def make_control(cfg: ServiceConfig) -> ServiceControl:
    """The backend ``cfg.backend`` names, for the service ``cfg.name`` (or the configured commands)."""
    if cfg.backend == "windows":
        from engine.service.scm import ScmControl
        from engine.service.windows import WindowsScm

        return ScmControl(WindowsScm(), cfg.name)
    if cfg.backend == "systemd":
        from engine.service.systemd import SystemdControl

        return SystemdControl(cfg.name)
    if cfg.backend == "command":
        from engine.service.command import CommandControl

        return CommandControl(cfg.start, cfg.stop, cfg.status, status_timeout=cfg.timeout)
    raise ServiceError(f"service backend {cfg.backend!r} is not one of windows, systemd, command")
