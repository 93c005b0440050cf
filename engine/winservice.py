"""standby as a native Windows service: the thin pywin32 layer, and the portable host that runs the agent.

Owns:

- :class:`ServiceHost` (portable, tested on Linux): runs ``main(stop)`` in a fresh asyncio loop in the
  calling thread, takes :meth:`ServiceHost.request_stop` from any thread (the SCM calls the control handler
  on another thread than the service's) and reports ``running``, ``stopping``, ``stopped`` in that order;
- :func:`agent_session`: what ``standby run`` does before it runs (``engine.cli._cmd_run``): load the node
  config, set up the log, take the state folder's lock, build the :class:`engine.node.Agent`;
- ``StandbyService``: the ServiceFramework class pythonservice.exe loads (:data:`winsvc.PYTHON_CLASS`),
  defined only where pywin32 imports. A control goes through :func:`winsvc.on_control`: STOP and PRESHUTDOWN
  set the agent's stop event, so it announces a planned stop to its peer (no failover) and exits;
- for the CLI: :func:`plan` and :func:`install`, :func:`remove`, :func:`start`, :func:`stop`. Off Windows
  each raises :class:`winsvc.WindowsOnly` (a ReplicationError: one line, no traceback).

Settings, the control table and the status numbers come from :mod:`engine.service.winsvc` (pure). Start,
stop and the wait before a removal are :class:`engine.service.scm.ScmControl`'s (idempotent, polling with
the wait hints), over :class:`engine.service.windows.WindowsScm`. The pywin32 calls made here
(CreateService, ChangeServiceConfig2, the registry values, the framework's status reports) are not run by
the tests, which run on Linux; everything they are given is.

Must not: install signal handlers (under the SCM a stop is a control, and the service runs on a thread that
is not the main thread); decide a setting or what a control means (winsvc does); be imported by anything
but the CLI and pythonservice.exe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from engine import config, logs
from engine.errors import ConfigError
from engine.service import ServiceError, ServiceState, ServiceStatus, winsvc
from engine.service.scm import ScmControl, reason
from engine.service.windows import WindowsScm
from engine.service.winsvc import Registration, WindowsOnly

try:  # pywin32: on Windows with the [windows] extra; elsewhere the Windows parts refuse
    import pywintypes  # type: ignore[import-not-found,import-untyped,unused-ignore]
    import servicemanager  # type: ignore[import-not-found,import-untyped,unused-ignore]
    import win32service  # type: ignore[import-not-found,import-untyped,unused-ignore]
    import win32serviceutil  # type: ignore[import-not-found,import-untyped,unused-ignore]
except ImportError:
    HAVE_PYWIN32 = False
else:  # pragma: no cover - Windows
    HAVE_PYWIN32 = True

__all__ = [
    "HAVE_PYWIN32",
    "Main",
    "ServiceHost",
    "WindowsOnly",
    "agent_session",
    "install",
    "plan",
    "remove",
    "start",
    "stop",
]

log = logging.getLogger(__name__)

#: A long-running command: runs until ``stop`` is set, returns its exit code.
Main = Callable[[asyncio.Event], Awaitable[int]]

#: Default waits of the CLI operations, seconds.
START_TIMEOUT = 60.0
STOP_TIMEOUT = winsvc.STOP_WAIT_HINT_MS / 1000 + 30.0

ERROR_SERVICE_EXISTS = 1073
ERROR_SERVICE_MARKED_FOR_DELETE = 1072
_INSTALL_REASONS = {
    5: "access denied: run it from an elevated prompt (Run as administrator)",
    ERROR_SERVICE_EXISTS: "a service of that name exists already (standby service remove, then install "
    "again; or choose another name)",
    ERROR_SERVICE_MARKED_FOR_DELETE: "the old service of that name is still being deleted (close the "
    "Services console and any handle to it, then try again)",
}


class ServiceHost:
    """Runs one ``main(stop)`` in a fresh asyncio loop in the calling thread: :meth:`run`.

    States, each reported once through ``on_state``, in this order: ``running`` (the loop runs; main starts),
    ``stopping`` (a stop was requested while main ran, and ``stop`` is set), ``stopped`` (main returned or
    raised, and the loop is closed: its other tasks cancelled, its worker threads joined). ``stopping`` is
    skipped when main returns by itself.

    :meth:`request_stop` works from any thread and at any time: before :meth:`run` has started the loop, it
    is honoured as soon as the loop starts (main starts with ``stop`` already set); a second request, or
    one after main ended, changes nothing.

    :meth:`run` returns main's exit code. An exception from main is re-raised after ``stopped`` has been
    reported: the caller logs it and ends as a failed stop (for the SCM: a non-zero exit, which the recovery
    actions treat as a failure; see ``winsvc.Registration.failure_actions_on_non_crash``).

    ``on_state`` is called under the host's lock, on the thread that caused the transition (the order is
    kept across threads that way): keep it short and never wait in it for another thread. An exception
    from it is logged and does not stop the host: a status report that failed must not end the agent.
    """

    def __init__(self, on_state: Callable[[str], None] | None = None) -> None:
        self._on_state = on_state
        self._lock = threading.RLock()
        self._state = "new"  # new -> starting (run called) -> running -> [stopping] -> stopped
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._reason: str | None = None

    @property
    def state(self) -> str:
        with self._lock:
            return self._state

    @property
    def stop_reason(self) -> str | None:
        """The reason of the first stop request, if there was one."""
        with self._lock:
            return self._reason

    def run(self, main: Main) -> int:
        """Run ``main`` until it returns; its exit code (its exception, re-raised). Once per host."""
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"a ServiceHost runs once (this one is {self._state})")
            self._state = "starting"
        try:
            return asyncio.run(self._serve(main))
        finally:
            with self._lock:
                self._state = "stopped"
                self._report("stopped")

    async def _serve(self, main: Main) -> int:
        stop = asyncio.Event()
        with self._lock:
            self._loop, self._stop = asyncio.get_running_loop(), stop
            self._state = "running"
            self._report("running")
            if self._reason is not None:  # asked before the loop ran: main starts with stop set
                self._stopping()
                stop.set()
        try:
            return await main(stop)
        finally:
            with self._lock:
                # INVARIANT: _loop is set only while the loop runs (this finally runs inside it), so
                # request_stop never hands a callback to a closed loop.
                self._loop = None

    def request_stop(self, reason: str) -> None:
        """Ask main to stop (set its ``stop`` event in its loop). From any thread; at most once takes
        effect."""
        with self._lock:
            if self._reason is not None:
                log.debug("winservice.stop_again reason=%s first=%s", reason, self._reason)
                return
            self._reason = reason
            log.info("winservice.stop_requested reason=%s state=%s", reason, self._state)
            if self._state == "running" and self._loop is not None and self._stop is not None:
                self._stopping()
                self._loop.call_soon_threadsafe(self._stop.set)
            # new or starting: _serve honours it; main already ended: nothing left to stop

    def _stopping(self) -> None:
        self._state = "stopping"
        self._report("stopping")

    def _report(self, state: str) -> None:
        log.debug("winservice.state state=%s", state)
        if self._on_state is None:
            return
        try:
            self._on_state(state)
        except Exception as e:
            log.warning("winservice.report_failed state=%s error=%r", state, e)


@contextlib.contextmanager
def agent_session(
    config_path: Path,
    *,
    command: str = "standby service",
    level: str = "info",
    fmt: str = "text",
    event_log: bool = False,
) -> Iterator[Main]:
    """What ``standby run`` does before it runs the agent (``engine.cli._cmd_run``), for a host without a
    console: load the node config, set up the log as ``[log]`` says (``event_log``: also to the Application
    event log, whatever ``[log]`` says; the service passes True), take the state folder's lock for
    ``command``, build the agent. Yields the agent's main; the lock is held until the block ends.

    ConfigError for a bad config, StateLocked when another process (``standby run``, another service)
    holds the state folder.
    """
    from engine import statelock
    from engine.node import Agent

    setup = config.load_node(config_path)
    lf = setup.log
    to_event_log = event_log or lf.event_log
    if to_event_log and sys.platform != "win32":
        raise ConfigError("log -> event_log: the Windows event log exists on Windows only")
    if lf.file is not None or to_event_log:
        file = logs.FileLog(lf.file, int(lf.max_mb * (1 << 20)), lf.backups, lf.format) if lf.file else None
        logs.setup(level, fmt, file=file, event_log=to_event_log)
    with statelock.acquire(setup.node.state_dir, command):
        agent = Agent(setup)

        async def main(stop: asyncio.Event) -> int:
            await agent.run(stop)
            return 0

        yield main


def _require_windows(operation: str) -> None:
    if sys.platform != "win32":
        raise WindowsOnly(operation)
    if not HAVE_PYWIN32:
        raise ServiceError(f"standby service {operation} needs pywin32 (pip install 'standby[windows]')")


def plan(config_path: Path, *, service_name: str = winsvc.DEFAULT_NAME) -> Registration:
    """The registration ``install`` would make for the node config at ``config_path``, checked: the file
    loads as a node config (what the service will load), and pywin32's pythonservice.exe is found (pywin32
    moves it to ``sys.exec_prefix`` the first time: the Python's folder, or the virtual environment's).
    ConfigError for a bad path, name or config."""
    _require_windows("install")
    path = config_path.absolute()
    config.load_node(path)
    try:
        host = str(win32serviceutil.LocatePythonServiceExe())
    except (RuntimeError, pywintypes.error) as e:
        raise ServiceError(
            f"standby service install: pywin32's pythonservice.exe not found ({e}); reinstall pywin32"
        ) from None
    try:
        return winsvc.registration(str(path), host_exe=host, service_name=service_name)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _place_runtime(host_exe: str) -> None:
    """In a virtual environment, copy the DLLs pythonservice.exe needs (:func:`winsvc.runtime_dlls`) from
    the base Python beside it, where a service finds them (pywin32 issue #1450; pywin32 itself does this
    for pywintypes only). A copy there is overwritten, so installing again after a Python update brings
    it up to date."""
    import shutil

    target = Path(host_exe).parent
    # pywintypes is loaded from its DLL: its __file__ is that DLL (pywin32 copies it the same way)
    sources = [Path(sys.base_prefix), Path(sys.base_prefix) / "DLLs", Path(str(pywintypes.__file__)).parent]
    for name in winsvc.runtime_dlls(*sys.version_info[:2]):
        found = next((d / name for d in sources if (d / name).is_file()), None)
        if found is None or found.parent == target:
            continue
        try:
            shutil.copyfile(found, target / name)
        except OSError as e:
            raise ServiceError(
                f"standby service install: cannot copy {found} beside {host_exe}: {e}"
            ) from None
        log.info("winservice.runtime_placed dll=%s from=%s", target / name, found.parent)


def install(reg: Registration) -> None:
    """Register the service as ``reg`` says: CreateService, then each ChangeServiceConfig2 setting of
    :func:`winsvc.config2`, then the registry values (PythonClass, Parameters). Anything failing after
    CreateService deletes the service again: never a half-registered service. ServiceError with the reason
    (not elevated, exists already...)."""
    _require_windows("install")
    if sys.prefix != sys.base_prefix:  # a virtual environment: see _place_runtime
        _place_runtime(reg.host_exe)
    ws, wsu = win32service, win32serviceutil
    create = winsvc.create_service(reg)
    try:
        scm = ws.OpenSCManager(None, None, ws.SC_MANAGER_ALL_ACCESS)
    except pywintypes.error as e:
        raise _install_error(reg.name, e) from None
    try:
        try:
            hs = ws.CreateService(
                scm,
                create.name,
                create.display_name,
                ws.SERVICE_ALL_ACCESS,
                create.service_type,
                create.start_type,
                create.error_control,
                create.binary_path,
                None,  # load order group
                0,  # fetch tag
                list(create.dependencies) or None,
                create.account,  # None: LocalSystem
                None,  # password
            )
        except pywintypes.error as e:
            raise _install_error(reg.name, e) from None
        try:
            for level, value in winsvc.config2(reg):
                ws.ChangeServiceConfig2(hs, level, value)
            wsu.InstallPythonClassString(reg.python_class, reg.name)
            for option, text in reg.parameters.items():
                wsu.SetServiceCustomOption(reg.name, option, text)
        except pywintypes.error as e:
            try:
                ws.DeleteService(hs)
            except pywintypes.error as e2:
                log.warning("winservice.rollback_failed name=%s error=%s", reg.name, e2)
            raise _install_error(reg.name, e) from None
        finally:
            ws.CloseServiceHandle(hs)
    finally:
        ws.CloseServiceHandle(scm)
    log.info("winservice.installed name=%s config=%s", reg.name, reg.config_path)


def remove(name: str = winsvc.DEFAULT_NAME, *, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop the service gracefully (a planned stop, announced to the peer) and delete it. False if there
    was no such service (nothing to do), True once it is removed. ServiceError if it does not stop within
    ``timeout`` seconds or cannot be deleted."""
    _require_windows("remove")
    control = _control(name)
    if control.query().state is ServiceState.NOT_FOUND:
        return False
    control.stop(timeout)
    try:
        win32serviceutil.RemoveService(name)
    except pywintypes.error as e:
        raise _install_error(name, e, doing="remove") from None
    log.info("winservice.removed name=%s", name)
    return True


def start(name: str = winsvc.DEFAULT_NAME, *, timeout: float = START_TIMEOUT) -> ServiceStatus:
    """Start the service and return once it runs (nothing if it runs already); ServiceError with the
    reason otherwise."""
    _require_windows("start")
    return _control(name).start(timeout)


def stop(name: str = winsvc.DEFAULT_NAME, *, timeout: float = STOP_TIMEOUT) -> ServiceStatus:
    """Stop the service gracefully (the agent announces a planned stop: the peer does not fail over) and
    return once it is stopped (nothing if it is); ServiceError with the reason otherwise."""
    _require_windows("stop")
    return _control(name).stop(timeout)


def _control(name: str) -> ScmControl:
    try:
        winsvc.check_name(name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return ScmControl(WindowsScm(), name)


def _install_error(name: str, e: Any, doing: str = "install") -> ServiceError:
    code = int(getattr(e, "winerror", 0) or 0)
    text = str(getattr(e, "strerror", e))
    said = _INSTALL_REASONS.get(code)
    return ServiceError(
        f"standby service {doing} {name}: {f'{said} (error {code})' if said else reason(code, text)}"
    )


if HAVE_PYWIN32:  # pragma: no cover - Windows

    class StandbyService(win32serviceutil.ServiceFramework):  # type: ignore[misc,unused-ignore]
        """The service pythonservice.exe hosts. It reports START_PENDING while it loads the node config
        (from the registry, see :mod:`engine.service.winsvc`) and builds the agent, RUNNING once the agent
        runs, STOP_PENDING (with a wait hint) once a stop is asked for; pywin32 reports STOPPED when
        :meth:`SvcRun` returns (exit 0) or raises (a service-specific error: the recovery actions apply)."""

        _svc_name_ = winsvc.DEFAULT_NAME
        _svc_display_name_ = winsvc.DISPLAY_NAME
        _svc_description_ = winsvc.DESCRIPTION

        def __init__(self, args: Any) -> None:
            # The host first: the control handler the framework registers below may use it at once.
            self.host = ServiceHost(on_state=self._report)
            self.name = str(args[0]) if args else self._svc_name_  # the name it runs as, from the SCM
            super().__init__(args)

        def GetAcceptedControls(self) -> int:
            return winsvc.ACCEPTED_CONTROLS

        def ServiceCtrlHandlerEx(self, control: int, event_type: int, data: Any) -> int:
            # Every control comes here (pywin32's own dispatch would call SvcInterrogate, which reports
            # RUNNING even while we stop).
            what = winsvc.control_name(int(control))
            if winsvc.on_control(what) is winsvc.Action.STOP:
                self.host.request_stop(what)
            return winsvc.handler_result(what)

        def SvcStop(self) -> None:  # pywin32's debug mode calls this directly
            self.host.request_stop("stop")

        def SvcRun(self) -> None:
            # Not the framework's SvcRun: it reports RUNNING before anything is loaded; ours reports it
            # once the agent runs (ServiceHost's "running").
            self.SvcDoRun()

        def SvcDoRun(self) -> None:
            self._report("starting")
            servicemanager.LogMsg(
                servicemanager.EVENTLOG_INFORMATION_TYPE, servicemanager.PYS_SERVICE_STARTING, (self.name, "")
            )
            try:
                path = self._config_path()
                with agent_session(path, command=f"standby service {self.name}", event_log=True) as main:
                    code = self.host.run(main)
                if code != 0:
                    raise ServiceError(f"the agent ended with exit code {code}")
            except Exception as e:
                # One line for the operator; pywin32 logs the traceback and reports a failed stop.
                servicemanager.LogErrorMsg(f"{self.name}: {e}")
                log.error("winservice.failed name=%s error=%s", self.name, e)
                raise
            servicemanager.LogMsg(
                servicemanager.EVENTLOG_INFORMATION_TYPE,
                servicemanager.PYS_SERVICE_STOPPED,
                (self.name, f" ({self.host.stop_reason or 'the agent ended'})"),
            )

        def _config_path(self) -> Path:
            value = win32serviceutil.GetServiceCustomOption(self.name, winsvc.CONFIG_VALUE)
            if not value:
                raise ConfigError(
                    f"no node config path in HKLM\\{winsvc.parameters_key(self.name)}\\"
                    f"{winsvc.CONFIG_VALUE}; install the service again: standby service install --config FILE"
                )
            return Path(str(value))

        def _report(self, state: str) -> None:
            status = winsvc.scm_status(state)
            if status is not None:
                self.ReportServiceStatus(status.state, waitHint=status.wait_hint_ms)
