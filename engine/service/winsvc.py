"""What registering standby itself as a Windows service means, and what the running service does with each
control the SCM sends: pure data, checked without Windows.

Owns: :class:`Registration` (built and checked by :func:`registration`): the service's name, display name,
description, binary path, start type (delayed automatic), account (LocalSystem), dependencies (Tcpip),
recovery actions (restart after 10 s, 30 s, 60 s; the failure count resets after a day; also on a non-zero
exit, not only on a crash) and preshutdown time-out (60 s); its renderings for the SCM calls
(:func:`create_service`, :func:`config2`, :func:`runtime_dlls`) and for ``sc.exe`` (:func:`sc_commands`);
the control table (:func:`on_control`, :func:`handler_result`, :data:`ACCEPTED_CONTROLS`) and the status
the service reports for each state of its host (:func:`scm_status`). Win32 constants are written out as
numbers.

How the service runs, the pywin32-standard way: the SCM starts pywin32's host ``pythonservice.exe`` (the
binary path is that one quoted path, no arguments), which loads the class named in the service's registry
key (``...\\Services\\NAME\\PythonClass`` = :data:`PYTHON_CLASS`) and calls it. The node config's path is
a registry value of the service, ``...\\Services\\NAME\\Parameters\\config`` (REG_SZ), where pywin32's
``GetServiceCustomOption`` reads it. Not an argument, because pythonservice.exe does not hand the binary
path's arguments to the service, only ``StartService`` arguments, which a start at boot does not have. So
the path is fixed at install, seen with ``reg query``, and changed by reinstalling.

Must not: import pywin32, run anything, or touch the registry or the disk (``engine.winservice`` does, with
these values); know about the agent beyond "a graceful stop announces a planned stop to the peer".
"""

from __future__ import annotations

import enum
import ntpath
import re
from collections.abc import Sequence
from dataclasses import dataclass

from engine.errors import ReplicationError

DEFAULT_NAME = "standby"
DISPLAY_NAME = "standby replication and failover agent"
DESCRIPTION = (
    "Keeps this server and its peer an active/passive pair: replicates the protected service's files, "
    "controls the service and fails over. Stopping it (or shutting Windows down) announces a planned "
    "stop to the peer, which then does not fail over."
)
#: The class pythonservice.exe loads (module importable from the Python that hosts it, and the class name).
PYTHON_CLASS = "engine.winservice.StandbyService"
#: The registry value (under the service's Parameters key) holding the node config's path.
CONFIG_VALUE = "config"
LOCAL_SYSTEM = "LocalSystem"

# dwServiceType, dwStartType, dwErrorControl (CreateService)
SERVICE_WIN32_OWN_PROCESS = 0x10
SERVICE_AUTO_START = 2
SERVICE_ERROR_NORMAL = 1

# dwInfoLevel (ChangeServiceConfig2)
SERVICE_CONFIG_DESCRIPTION = 1
SERVICE_CONFIG_FAILURE_ACTIONS = 2
SERVICE_CONFIG_DELAYED_AUTO_START_INFO = 3
SERVICE_CONFIG_FAILURE_ACTIONS_FLAG = 4
SERVICE_CONFIG_PRESHUTDOWN_INFO = 7

# SC_ACTION_TYPE
SC_ACTION_RESTART = 1

# dwCurrentState (SetServiceStatus)
SERVICE_STOPPED = 1
SERVICE_START_PENDING = 2
SERVICE_STOP_PENDING = 3
SERVICE_RUNNING = 4

# dwControlsAccepted
SERVICE_ACCEPT_STOP = 0x1
SERVICE_ACCEPT_SHUTDOWN = 0x4
SERVICE_ACCEPT_PRESHUTDOWN = 0x100

# dwControl (HandlerEx)
SERVICE_CONTROL_STOP = 1
SERVICE_CONTROL_PAUSE = 2
SERVICE_CONTROL_CONTINUE = 3
SERVICE_CONTROL_INTERROGATE = 4
SERVICE_CONTROL_SHUTDOWN = 5
SERVICE_CONTROL_PARAMCHANGE = 6
SERVICE_CONTROL_DEVICEEVENT = 0xB
SERVICE_CONTROL_POWEREVENT = 0xD
SERVICE_CONTROL_SESSIONCHANGE = 0xE
SERVICE_CONTROL_PRESHUTDOWN = 0xF
SERVICE_CONTROL_TIMECHANGE = 0x10

# HandlerEx return values
NO_ERROR = 0
ERROR_CALL_NOT_IMPLEMENTED = 120

#: The controls the service accepts: STOP and PRESHUTDOWN. Not SHUTDOWN: with PRESHUTDOWN accepted, a
#: shutdown reaches the service before the others are told, and with the time-out it registered (the
#: SHUTDOWN notification gives every service the same few seconds, shared).
ACCEPTED_CONTROLS = SERVICE_ACCEPT_STOP | SERVICE_ACCEPT_PRESHUTDOWN

#: Wait hints, milliseconds: how long the SCM should wait before it may think a pending state is stuck.
START_WAIT_HINT_MS = 30_000  # loading the config, taking the state lock, building the agent
STOP_WAIT_HINT_MS = 60_000  # announcing the planned stop, draining the link, saving state

_CONTROL_NAMES = {
    SERVICE_CONTROL_STOP: "stop",
    SERVICE_CONTROL_PAUSE: "pause",
    SERVICE_CONTROL_CONTINUE: "continue",
    SERVICE_CONTROL_INTERROGATE: "interrogate",
    SERVICE_CONTROL_SHUTDOWN: "shutdown",
    SERVICE_CONTROL_PARAMCHANGE: "paramchange",
    SERVICE_CONTROL_DEVICEEVENT: "deviceevent",
    SERVICE_CONTROL_POWEREVENT: "powerevent",
    SERVICE_CONTROL_SESSIONCHANGE: "sessionchange",
    SERVICE_CONTROL_PRESHUTDOWN: "preshutdown",
    SERVICE_CONTROL_TIMECHANGE: "timechange",
}

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,79}")
_DRIVE = re.compile(r"[A-Za-z]:")


class WindowsOnly(ReplicationError):
    """A Windows-service operation asked for on another system."""

    def __init__(self, operation: str) -> None:
        super().__init__(
            f"standby service {operation} works on Windows only; "
            "on Linux use the systemd unit (README: systemd)"
        )
        self.operation = operation


@dataclass(frozen=True)
class Registration:
    """Everything ``standby service install`` registers. ``host_exe`` is pywin32's pythonservice.exe;
    ``config_path`` goes to the registry (``Parameters\\config``), not to the command line."""

    config_path: str
    host_exe: str
    name: str = DEFAULT_NAME
    display_name: str = DISPLAY_NAME
    description: str = DESCRIPTION
    python_class: str = PYTHON_CLASS
    start_type: str = "delayed-auto"
    account: str = LOCAL_SYSTEM
    dependencies: tuple[str, ...] = ("Tcpip",)
    #: Recovery: restart after each delay in turn; the last one repeats for every later failure.
    restart_delays_ms: tuple[int, ...] = (10_000, 30_000, 60_000)
    #: The failure count goes back to zero after this long without a failure.
    reset_failures_after_s: int = 86_400
    #: Recovery also when the service stops with a non-zero exit code (the agent failed), not only when
    #: its process dies without reporting SERVICE_STOPPED.
    failure_actions_on_non_crash: bool = True
    #: How long Windows waits, on shutdown, for the service to stop after PRESHUTDOWN (default 10 s).
    preshutdown_timeout_ms: int = 60_000

    @property
    def parameters(self) -> dict[str, str]:
        """The values written under the service's Parameters key (:func:`parameters_key`)."""
        return {CONFIG_VALUE: self.config_path}

    @property
    def command(self) -> str:
        """The binary path the SCM runs: the host, quoted (an unquoted path with spaces is a hijack risk:
        ``C:\\Program.exe``)."""
        return cmdline([self.host_exe])


@dataclass(frozen=True)
class CreateService:
    """The arguments of ``CreateService`` for a :class:`Registration` (``account`` None: LocalSystem)."""

    name: str
    display_name: str
    service_type: int
    start_type: int
    error_control: int
    binary_path: str
    dependencies: tuple[str, ...]
    account: str | None


@dataclass(frozen=True)
class ScmReport:
    """What the service reports to the SCM (SetServiceStatus) for a state of its host."""

    state: int
    wait_hint_ms: int


class Action(enum.Enum):
    """What the running service does with a control."""

    STOP = "stop"  # graceful stop: the agent's stop event, so it announces a planned stop to its peer
    IGNORE = "ignore"  # nothing (interrogate: the SCM already has the last status reported)


def registration(config_path: str, *, host_exe: str, service_name: str = DEFAULT_NAME) -> Registration:
    """The registration for the node config at ``config_path`` (an absolute path on a local drive),
    hosted by ``host_exe`` (pythonservice.exe's absolute path). ValueError saying which input is wrong."""
    return Registration(
        config_path=check_path(config_path, "config path"),
        host_exe=check_host(host_exe),
        name=check_name(service_name),
    )


def check_name(name: str) -> str:
    """A service name we register: a letter or digit, then letters, digits, ``_ . -``; at most 80."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"service name {name!r}: expected letters, digits and '_.-' (starting with a letter or digit, "
            "at most 80)"
        )
    return name


def check_path(path: str, what: str) -> str:
    """``path`` normalised (``/`` to ``\\``, ``.`` and ``..`` folded) if it is an absolute Windows path to
    a file on a local drive (``C:\\...``) with no quote, wildcard or control character; ValueError if not.

    Not a share (``\\\\server\\share``): the service starts at boot, maybe before the network, and as
    LocalSystem, which sees neither mapped drives nor the user's shares."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{what}: empty")
    shown = repr(path)
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise ValueError(f"{what} {shown}: contains a control character")
    if '"' in path:
        raise ValueError(f"{what} {shown}: contains a quote (give the path without quotes)")
    drive, rest = ntpath.splitdrive(path)
    if drive.startswith(("\\\\", "//")):
        raise ValueError(f"{what} {shown}: a network or device path; use a path on a local drive (C:\\...)")
    if any(c in path for c in "*?<>|"):
        raise ValueError(f"{what} {shown}: contains a character Windows paths cannot hold (* ? < > |)")
    if path != path.strip():
        raise ValueError(f"{what} {shown}: starts or ends with a space")
    if not _DRIVE.fullmatch(drive) or not rest.startswith(("\\", "/")):
        raise ValueError(f"{what} {shown}: not an absolute Windows path (like C:\\standby\\node.toml)")
    if ":" in rest:
        raise ValueError(f"{what} {shown}: ':' after the drive")
    if rest.endswith(("\\", "/")):
        raise ValueError(f"{what} {shown}: a folder, not a file")
    normal = ntpath.normpath(path)
    if normal == drive + "\\":
        raise ValueError(f"{what} {shown}: a drive, not a file")
    return normal


def check_host(host_exe: str) -> str:
    """The service host's path, checked like :func:`check_path`, and an ``.exe``."""
    host = check_path(host_exe, "service host")
    if not host.lower().endswith(".exe"):
        raise ValueError(f"service host {host_exe!r}: not an .exe")
    return host


def quote_arg(arg: str) -> str:
    """One argument as the Microsoft C runtime parses it back (the rules of ``subprocess.list2cmdline``):
    quoted when empty or holding a space or tab; a ``"`` escaped as ``\\"``, the backslashes before it
    doubled; inside quotes, trailing backslashes doubled so the closing quote stays a quote."""
    escaped = re.sub(r'(\\*)"', lambda m: m.group(1) * 2 + '\\"', arg)
    if arg and " " not in arg and "\t" not in arg:
        return escaped
    return '"' + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped) + '"'


def cmdline(args: Sequence[str]) -> str:
    """A Windows command line for ``args`` (see :func:`quote_arg`)."""
    return " ".join(quote_arg(a) for a in args)


def parameters_key(name: str) -> str:
    """The registry key (under HKEY_LOCAL_MACHINE) holding the service's parameters."""
    return f"SYSTEM\\CurrentControlSet\\Services\\{name}\\Parameters"


def create_service(reg: Registration) -> CreateService:
    """``CreateService``'s arguments: an own-process service starting automatically (delayed: see
    :func:`config2`), normal error control, our binary path, our dependencies and account."""
    return CreateService(
        name=reg.name,
        display_name=reg.display_name,
        service_type=SERVICE_WIN32_OWN_PROCESS,
        start_type=SERVICE_AUTO_START,
        error_control=SERVICE_ERROR_NORMAL,
        binary_path=reg.command,
        dependencies=reg.dependencies,
        account=None if reg.account == LOCAL_SYSTEM else reg.account,
    )


def failure_actions(reg: Registration) -> dict[str, object]:
    """SERVICE_FAILURE_ACTIONS as pywin32's ``ChangeServiceConfig2`` takes it (reset period in seconds,
    delays in milliseconds; no reboot message, no command)."""
    return {
        "ResetPeriod": reg.reset_failures_after_s,
        "RebootMsg": None,
        "Command": None,
        "Actions": tuple((SC_ACTION_RESTART, delay) for delay in reg.restart_delays_ms),
    }


def config2(reg: Registration) -> tuple[tuple[int, object], ...]:
    """The ``ChangeServiceConfig2`` calls after ``CreateService``, in order: (info level, value)."""
    return (
        (SERVICE_CONFIG_DESCRIPTION, reg.description),
        (SERVICE_CONFIG_DELAYED_AUTO_START_INFO, reg.start_type == "delayed-auto"),
        (SERVICE_CONFIG_FAILURE_ACTIONS, failure_actions(reg)),
        (SERVICE_CONFIG_FAILURE_ACTIONS_FLAG, reg.failure_actions_on_non_crash),
        (SERVICE_CONFIG_PRESHUTDOWN_INFO, reg.preshutdown_timeout_ms),
    )


def runtime_dlls(major: int, minor: int) -> tuple[str, ...]:
    """The DLLs pythonservice.exe loads at start, before any Python runs: the interpreter's, the stable
    ABI's, the C runtime's, pywin32's. In a Python's own folder they sit beside the host; in a virtual
    environment (where pywin32 puts the host, ``sys.exec_prefix``) they do not, and a service finds them
    nowhere else (its PATH is the system's), so install places them beside it."""
    return (
        f"python{major}{minor}.dll",
        "python3.dll",
        "vcruntime140.dll",
        "vcruntime140_1.dll",
        f"pywintypes{major}{minor}.dll",
    )


def sc_start_args(reg: Registration) -> list[str]:
    return ["sc.exe", "config", reg.name, "start=", reg.start_type]


def sc_description_args(reg: Registration) -> list[str]:
    return ["sc.exe", "description", reg.name, reg.description]


def sc_failure_args(reg: Registration) -> list[str]:
    actions = "/".join(f"restart/{delay}" for delay in reg.restart_delays_ms)
    return ["sc.exe", "failure", reg.name, "reset=", str(reg.reset_failures_after_s), "actions=", actions]


def sc_failureflag_args(reg: Registration) -> list[str]:
    return ["sc.exe", "failureflag", reg.name, "1" if reg.failure_actions_on_non_crash else "0"]


def sc_commands(reg: Registration) -> list[list[str]]:
    """The start type, description and recovery settings as ``sc.exe`` commands, for an operator who
    checks them (``sc.exe qfailure standby``) or applies them again by hand. ``install`` does not run
    these (it calls ``ChangeServiceConfig2``, see :func:`config2`); sc.exe has no preshutdown setting."""
    return [sc_start_args(reg), sc_description_args(reg), sc_failure_args(reg), sc_failureflag_args(reg)]


def describe(reg: Registration) -> list[str]:
    """What is registered, one line per setting, for the operator."""
    delays = ", ".join(f"{d / 1000:g} s" for d in reg.restart_delays_ms)
    return [
        f"service     {reg.name} ({reg.display_name})",
        f"runs        {reg.command} hosting {reg.python_class}",
        f"config      {reg.config_path} (HKLM\\{parameters_key(reg.name)}\\{CONFIG_VALUE})",
        f"start       {reg.start_type}, after {', '.join(reg.dependencies) or 'nothing'}",
        f"account     {reg.account}",
        f"recovery    restart after {delays} (the last repeats); failure count reset after "
        f"{reg.reset_failures_after_s / 3600:g} h"
        + ("; also on a non-zero exit" if reg.failure_actions_on_non_crash else ""),
        f"shutdown    PRESHUTDOWN: up to {reg.preshutdown_timeout_ms / 1000:g} s to announce a planned stop "
        "to the peer and stop",
    ]


def control_name(code: int) -> str:
    """The name of a SERVICE_CONTROL_* code (``control-<n>`` for one we do not name)."""
    return _CONTROL_NAMES.get(code, f"control-{code}")


def on_control(control: str) -> Action:
    """What the service does with a control: STOP, PRESHUTDOWN (a reboot or shutdown is coming) and
    SHUTDOWN (sent only if PRESHUTDOWN was not accepted) stop the agent gracefully, which announces a
    planned stop to its peer; everything else is ignored."""
    if control in ("stop", "preshutdown", "shutdown"):
        return Action.STOP
    return Action.IGNORE


def handler_result(control: str) -> int:
    """The handler's return value: NO_ERROR for the controls we handle and for INTERROGATE (which needs
    no work: the SCM has the last status reported), ERROR_CALL_NOT_IMPLEMENTED for the rest."""
    if on_control(control) is Action.STOP or control == "interrogate":
        return NO_ERROR
    return ERROR_CALL_NOT_IMPLEMENTED


def scm_status(state: str) -> ScmReport | None:
    """The status to report for a state of the service host: ``starting`` -> START_PENDING, ``running`` ->
    RUNNING, ``stopping`` -> STOP_PENDING, each with its wait hint; ``stopped`` -> None: pywin32's framework
    reports SERVICE_STOPPED itself, with the exit code, when the service's run method returns (reporting it
    first would let the SCM end the process before that). ValueError for any other state."""
    table = {
        "starting": ScmReport(SERVICE_START_PENDING, START_WAIT_HINT_MS),
        "running": ScmReport(SERVICE_RUNNING, 0),
        "stopping": ScmReport(SERVICE_STOP_PENDING, STOP_WAIT_HINT_MS),
    }
    if state == "stopped":
        return None
    if state not in table:
        raise ValueError(f"unknown service host state {state!r}")
    return table[state]
