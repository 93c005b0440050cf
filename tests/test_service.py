"""Service control: golden parsers, one contract suite over every backend Linux can run, backend details.

The contract suite runs against (1) the Windows logic (``engine.service.scm``) over a fake SCM with a fake
clock (pending states with wait hints, hung stops, crash codes, refusals), instantly, and (2) the command
backend driving a real service process (``tests/svc_helper.py``: real processes, real pid files in
tmp_path). The pywin32 calls themselves (``engine.service.windows``) run only on Windows; here they are
checked against a stub of ``win32service`` for their argument shapes only.
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import psutil
import pytest

from engine.config import ServiceConfig, parse_service
from engine.errors import ConfigError, ReplicationError
from engine.service import (
    ServiceControl,
    ServiceError,
    ServiceState,
    ServiceStatus,
    check_timeout,
    make_control,
    scm,
)
from engine.service.command import CommandControl, parse_status
from engine.service.scm import ScmControl, poll_interval
from engine.service.systemd import SystemdControl, parse_show
from tests.fake_scm import FakeClock, FakeScm

ENGINE = Path(__file__).resolve().parent.parent / "engine"
HELPER = Path(__file__).resolve().parent / "svc_helper.py"
NAME = "SynergySKYEnterpriseSchedulingService"
S = ServiceState

pytestmark = pytest.mark.timeout(30)


# --- golden: systemctl show -------------------------------------------------------------------------------

SHOW: dict[str, tuple[str, ServiceStatus]] = {
    "active-running": (
        "LoadState=loaded\nActiveState=active\nSubState=running\nExecMainCode=0\nExecMainStatus=0\n"
        "ExecMainPID=1234\nUnitFileState=disabled\n",
        ServiceStatus(S.RUNNING, None, 1234, "manual"),
    ),
    "inactive-dead-clean": (
        "ExecMainPID=0\nExecMainCode=1\nExecMainStatus=0\nLoadState=loaded\nActiveState=inactive\n"
        "SubState=dead\nUnitFileState=enabled\n",
        ServiceStatus(S.STOPPED, 0, None, "auto"),
    ),
    "failed-status-1": (
        "LoadState=loaded\nActiveState=failed\nSubState=failed\nExecMainCode=1\nExecMainStatus=1\n"
        "ExecMainPID=0\nUnitFileState=static\n",
        ServiceStatus(S.STOPPED, 1, None, "manual"),
    ),
    "failed-killed-by-sigkill": (
        "LoadState=loaded\nActiveState=failed\nSubState=failed\nExecMainCode=2\nExecMainStatus=9\n"
        "ExecMainPID=0\nUnitFileState=enabled\n",
        ServiceStatus(S.STOPPED, -9, None, "auto"),
    ),
    "activating": (
        "LoadState=loaded\nActiveState=activating\nSubState=start\nExecMainCode=0\nExecMainStatus=0\n"
        "ExecMainPID=77\nUnitFileState=disabled\n",
        ServiceStatus(S.START_PENDING, None, 77, "manual"),
    ),
    "deactivating": (
        "LoadState=loaded\nActiveState=deactivating\nSubState=stop-sigterm\nExecMainCode=0\n"
        "ExecMainStatus=0\nExecMainPID=77\nUnitFileState=masked\n",
        ServiceStatus(S.STOP_PENDING, None, 77, "disabled"),
    ),
    "never-started": (
        "LoadState=loaded\nActiveState=inactive\nSubState=dead\nExecMainCode=0\nExecMainStatus=0\n"
        "ExecMainPID=0\nUnitFileState=disabled\n",
        ServiceStatus(S.STOPPED, None, None, "manual"),
    ),
    "not-found": (
        "LoadState=not-found\nActiveState=inactive\nSubState=dead\nExecMainCode=0\nExecMainStatus=0\n"
        "ExecMainPID=0\nUnitFileState=\n",
        ServiceStatus(S.NOT_FOUND),
    ),
    "spec-properties-only": (  # the property list without ExecMainCode: the status is the exit code
        "ActiveState=failed\nSubState=failed\nExecMainStatus=3\nExecMainPID=0\nUnitFileState=disabled\n",
        ServiceStatus(S.STOPPED, 3, None, "manual"),
    ),
    "odd-lines-and-new-states": (
        "\nnot a property\nActiveState=maintenance\nExecMainPID=abc\nUnitFileState=generated\n",
        ServiceStatus(S.UNKNOWN, None, None, None),
    ),
}


@pytest.mark.parametrize("name", list(SHOW))
def test_systemctl_show_golden(name: str) -> None:
    text, want = SHOW[name]
    assert parse_show(text) == want
    assert parse_show(text.replace("\n", "\r\n")) == want  # line ends do not matter


# --- golden: command status -------------------------------------------------------------------------------

STATUS = [
    (0, "", ServiceStatus(S.RUNNING, None, None, "manual")),
    (0, "pid=4242\n", ServiceStatus(S.RUNNING, None, 4242, "manual")),
    (0, "pid=4242\nexit_code=3\n", ServiceStatus(S.RUNNING, None, 4242, "manual")),  # no exit code while up
    (3, "", ServiceStatus(S.STOPPED, None, None, "manual")),
    (3, "exit_code=3\n", ServiceStatus(S.STOPPED, 3, None, "manual")),
    (3, "pid=12\nexit_code=-15", ServiceStatus(S.STOPPED, -15, None, "manual")),
    (3, "service is stopped\n exit_code = 0 \n", ServiceStatus(S.STOPPED, 0, None, "manual")),
    (1, "pid=12\n", ServiceStatus(S.UNKNOWN, None, 12, "manual")),  # LSB 1: dead, pid file left
    (4, "exit_code=x\npid=-3\n", ServiceStatus(S.UNKNOWN, None, None, "manual")),
    (-9, "", ServiceStatus(S.UNKNOWN, None, None, "manual")),
]


@pytest.mark.parametrize(("rc", "out", "want"), STATUS, ids=[f"{rc}:{out!r}" for rc, out, _ in STATUS])
def test_command_status_golden(rc: int, out: str, want: ServiceStatus) -> None:
    assert parse_status(rc, out) == want


# --- the contract suite -----------------------------------------------------------------------------------


class Rig(Protocol):
    """A backend with a service behind it, and the faults the suite injects into that service."""

    @property
    def control(self) -> ServiceControl: ...

    @property
    def timeout(self) -> float:
        """For a start or stop that should succeed."""
        ...

    @property
    def hang_timeout(self) -> float: ...

    @property
    def slack(self) -> float:
        """How far past its timeout a call may return."""
        ...

    @property
    def clock(self) -> Callable[[], float]: ...

    def pause(self) -> None: ...

    def starts(self) -> int:
        """How many times the service has been launched."""
        ...

    def crash(self, code: int) -> None: ...

    def hang_stop(self) -> None: ...

    def refuse(self) -> str:
        """Make the next start be refused; the reason the error must name."""
        ...

    def close(self) -> None: ...


class ScmRig:
    """The Windows logic over the fake SCM; time is the fake clock's."""

    timeout = 60.0
    hang_timeout = 30.0
    slack = 0.0

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.scm = FakeScm(self.clock)
        self.svc = self.scm.add(NAME, start_type=scm.SERVICE_AUTO_START)
        self.control = ScmControl(self.scm, NAME, clock=self.clock, sleep=self.clock.sleep)

    def pause(self) -> None:
        self.clock.sleep(0.5)

    def starts(self) -> int:
        return sum(1 for call, _ in self.scm.calls if call == "StartService")

    def crash(self, code: int) -> None:
        self.scm.crash(NAME, code)

    def hang_stop(self) -> None:
        self.svc.hang_stop = True

    def refuse(self) -> str:
        self.svc.denied = scm.SERVICE_START
        return "access denied"

    def close(self) -> None:
        assert self.scm.open_handles == 0, "a service handle was left open"


class CommandRig:
    """The command backend over a real service process (tests/svc_helper.py)."""

    timeout = 10.0
    hang_timeout = 0.6
    slack = 1.0
    clock = staticmethod(time.monotonic)

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "svc"
        self.dir.mkdir()
        argv = [sys.executable, str(HELPER)]
        self.control = CommandControl(
            [*argv, "start", str(self.dir)],
            [*argv, "stop", str(self.dir)],
            [*argv, "status", str(self.dir)],
            status_timeout=5.0,
        )

    def pause(self) -> None:
        time.sleep(0.02)

    def starts(self) -> int:
        try:
            return len((self.dir / "pids").read_text().split())
        except FileNotFoundError:
            return 0

    def _write(self, name: str, text: str) -> None:
        tmp = self.dir / f"{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.dir / name)

    def crash(self, code: int) -> None:
        self._write("crash", str(code))

    def hang_stop(self) -> None:
        self._write("hang", "")

    def refuse(self) -> str:
        self._write("refuse", "Access is denied.")
        return "Access is denied."

    def close(self) -> None:
        """Kill every process this rig started: the service, and any control command (there must be none)."""
        stray: list[psutil.Process] = []
        for p in psutil.process_iter(["cmdline"]):
            cmdline = p.info["cmdline"] or []
            if str(self.dir) in cmdline and p.pid != os.getpid():
                stray.append(p)
        for p in stray:
            try:
                p.kill()
            except psutil.Error:
                pass
        wait_gone(stray)
        commands = [p for p in stray if "serve" not in (p.info["cmdline"] or [])]
        assert not commands, f"control commands outlived their call: {[p.info['cmdline'] for p in commands]}"


def wait_gone(procs: list[psutil.Process], within: float = 5.0) -> None:
    """Until every process has ended (a zombie has: init reaps it in its own time)."""
    end = time.monotonic() + within
    for p in procs:
        while time.monotonic() < end:
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.01)
        else:
            raise AssertionError(f"pid {p.pid} outlived SIGKILL by {within} s")


@pytest.fixture(params=["fake-scm", "command"])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    if request.param == "command" and sys.platform == "win32":
        pytest.skip("the helper service is POSIX only")
    r: Rig = ScmRig() if request.param == "fake-scm" else CommandRig(tmp_path)
    try:
        yield r
    finally:
        r.close()


def wait_for(r: Rig, state: ServiceState, within: float = 3.0) -> ServiceStatus:
    end = r.clock() + within
    while True:
        status = r.control.query()
        if status.state is state or r.clock() > end:
            return status
        r.pause()


def test_start_from_stopped(rig: Rig) -> None:
    assert rig.control.query().state is S.STOPPED
    status = rig.control.start(rig.timeout)
    assert status.state is S.RUNNING and status.pid is not None and status.exit_code is None
    again = rig.control.query()
    assert again.state is S.RUNNING and again.pid == status.pid
    assert rig.starts() == 1


def test_start_when_running_is_a_no_op_success(rig: Rig) -> None:
    first = rig.control.start(rig.timeout)
    second = rig.control.start(rig.timeout)
    assert second.state is S.RUNNING and second.pid == first.pid
    assert rig.starts() == 1


def test_stop_when_stopped_is_a_no_op_success(rig: Rig) -> None:
    status = rig.control.stop(rig.timeout)
    assert status.state is S.STOPPED
    assert rig.control.stop(rig.timeout).state is S.STOPPED
    assert rig.starts() == 0


def test_stop_of_a_running_service(rig: Rig) -> None:
    rig.control.start(rig.timeout)
    status = rig.control.stop(rig.timeout)
    assert status.state is S.STOPPED and status.exit_code == 0 and status.pid is None
    assert rig.control.query().state is S.STOPPED
    assert rig.control.start(rig.timeout).state is S.RUNNING  # and it starts again
    assert rig.starts() == 2


def test_a_crash_shows_as_stopped_with_its_exit_code(rig: Rig) -> None:
    rig.control.start(rig.timeout)
    rig.crash(3)
    status = wait_for(rig, S.STOPPED)
    assert status.state is S.STOPPED and status.exit_code == 3 and status.pid is None
    assert rig.control.stop(rig.timeout).exit_code == 3  # stopping a crashed service: nothing to do
    assert rig.control.start(rig.timeout).state is S.RUNNING


def test_a_hung_stop_raises_after_the_timeout(rig: Rig) -> None:
    started = rig.control.start(rig.timeout)
    rig.hang_stop()
    t0 = rig.clock()
    with pytest.raises(ServiceError, match="did not stop within") as e:
        rig.control.stop(rig.hang_timeout)
    elapsed = rig.clock() - t0
    assert rig.hang_timeout <= elapsed <= rig.hang_timeout + rig.slack, elapsed
    assert e.value.status is not None and e.value.status.pid == started.pid  # the caller can decide
    assert isinstance(e.value, ReplicationError)


def test_a_refusal_is_a_service_error_naming_the_reason(rig: Rig) -> None:
    why = rig.refuse()
    with pytest.raises(ServiceError) as e:
        rig.control.start(rig.timeout)
    assert why in str(e.value) and "start" in str(e.value)
    assert rig.control.query().state is S.STOPPED


def test_set_manual_is_idempotent(rig: Rig) -> None:
    rig.control.set_manual()
    rig.control.set_manual()
    assert rig.control.query().start_type == "manual"


# --- the Windows logic, beyond the contract ---------------------------------------------------------------


def scm_rig(**service: Any) -> tuple[FakeClock, FakeScm, ScmControl]:
    clock = FakeClock()
    fake = FakeScm(clock)
    fake.add(NAME, **service)
    return clock, fake, ScmControl(fake, NAME, clock=clock, sleep=clock.sleep)


@pytest.mark.parametrize(
    ("hint_ms", "remaining", "want"),
    [(0, 60, 1.0), (2000, 60, 1.0), (30_000, 60, 3.0), (200_000, 60, 10.0), (30_000, 2.5, 2.5), (5, 0, 0)],
)
def test_poll_interval_is_a_tenth_of_the_wait_hint_within_1_to_10_s(
    hint_ms: int, remaining: float, want: float
) -> None:
    assert poll_interval(hint_ms, remaining) == want


def test_pending_states_are_polled_with_the_wait_hint() -> None:
    clock, _, control = scm_rig(start_time=9.0, start_hint_ms=30_000, stop_time=25.0, stop_hint_ms=200_000)
    control.start(60)
    assert clock.sleeps == [3.0, 3.0, 3.0]  # a tenth of 30 s until the 9 s start is over
    clock.sleeps.clear()
    control.stop(60)
    assert clock.sleeps == [10.0, 10.0, 10.0]  # a tenth of 200 s is 20: at most 10


def test_a_hung_stop_waits_no_longer_than_the_timeout_and_says_where_it_stuck() -> None:
    clock, fake, control = scm_rig(stop_hint_ms=30_000, hang_stop=True)
    control.start(60)
    clock.sleeps.clear()
    with pytest.raises(ServiceError) as e:
        control.stop(7.5)
    assert sum(clock.sleeps) == 7.5 and max(clock.sleeps) == 3.0
    assert "still stop pending" in str(e.value) and "checkpoint 1" in str(e.value)
    assert e.value.status is not None and e.value.status.state is S.STOP_PENDING
    assert e.value.status.wait_hint == 30.0
    assert fake.open_handles == 0


def test_start_while_a_stop_is_pending_waits_for_the_stop_then_starts() -> None:
    _, fake, control = scm_rig()
    control.start(60)
    fake.services[NAME].state = scm.SERVICE_STOP_PENDING
    fake.services[NAME].pending_since = fake.clock()
    status = control.start(60)
    assert status.state is S.RUNNING
    assert [c for c, _ in fake.calls].count("StartService") == 2


def test_stop_while_a_start_is_pending_waits_for_the_start_then_stops() -> None:
    clock, fake, control = scm_rig(start_time=5.0)
    handle = fake.open_service(NAME, scm.SERVICE_START)  # someone else starts it
    fake.start_service(handle)
    fake.close_service(handle)
    assert control.query().state is S.START_PENDING
    assert control.stop(60).state is S.STOPPED
    assert clock.now >= 1000.0 + 5.0


def test_already_running_and_not_active_races_are_success() -> None:
    _, fake, control = scm_rig()
    fake.race_already_running = True  # StartService says 1056, but a start is under way
    assert control.start(60).state is S.RUNNING
    fake.race_not_active = True  # ControlService says 1062: it stopped meanwhile
    assert control.stop(60).state is S.STOPPED


@pytest.mark.parametrize(
    ("setup", "words"),
    [
        ({"start_type": scm.SERVICE_DISABLED}, ["disabled", "error 1058"]),
        ({"denied": scm.SERVICE_START}, ["access denied", "error 5"]),
    ],
    ids=["disabled", "access-denied"],
)
def test_refusals_name_the_reason_and_code(setup: dict[str, Any], words: list[str]) -> None:
    _, fake, control = scm_rig(**setup)
    with pytest.raises(ServiceError) as e:
        control.start(60)
    for word in words:
        assert word in str(e.value)
    assert NAME in str(e.value)
    assert fake.open_handles == 0


def test_a_disabled_service_starts_once_set_to_manual() -> None:
    _, _, control = scm_rig(start_type=scm.SERVICE_DISABLED)
    assert control.query().start_type == "disabled"
    control.set_manual()
    assert control.start(60).state is S.RUNNING


def test_a_missing_service_is_not_found_and_cannot_be_started() -> None:
    fake = FakeScm(FakeClock())
    control = ScmControl(fake, "NoSuchService", clock=fake.clock, sleep=fake.clock.sleep)
    assert control.query().state is S.NOT_FOUND
    for call in (lambda: control.start(5), lambda: control.stop(5), control.set_manual):
        with pytest.raises(ServiceError, match=r"does not exist \(error 1060\)"):
            call()


def test_a_service_that_stops_while_starting_reports_its_code() -> None:
    _, _, control = scm_rig(fail_start_code=7)
    with pytest.raises(ServiceError, match=r"stopped while starting \(service-specific exit code 7\)") as e:
        control.start(60)
    assert e.value.status is not None and e.value.status.exit_code == 7


def test_an_aborted_process_shows_the_win32_code() -> None:
    _, fake, control = scm_rig()
    control.start(60)
    fake.abort(NAME)
    assert control.query() == ServiceStatus(S.STOPPED, scm.ERROR_PROCESS_ABORTED, None, "auto")


def test_a_service_that_refuses_stop_and_a_paused_one_are_errors() -> None:
    _, fake, control = scm_rig(accepts_stop=False)
    control.start(60)
    with pytest.raises(ServiceError, match=r"does not accept a stop request \(error 1052\)"):
        control.stop(60)
    fake.services[NAME].state = scm.SERVICE_PAUSED
    with pytest.raises(ServiceError, match="paused"):
        control.start(60)


def test_a_start_that_outlasts_the_timeout_is_an_error() -> None:
    _, _, control = scm_rig(start_time=100.0, start_hint_ms=120_000)
    with pytest.raises(ServiceError, match=r"did not start within 30 s: still start pending"):
        control.start(30)


@pytest.mark.parametrize(
    ("start_type", "delayed", "was"),
    [
        (scm.SERVICE_AUTO_START, False, "auto"),
        (scm.SERVICE_AUTO_START, True, "delayed-auto"),
        (scm.SERVICE_DISABLED, False, "disabled"),
    ],
)
def test_set_manual_changes_only_the_start_type(start_type: int, delayed: bool, was: str) -> None:
    _, fake, control = scm_rig(start_type=start_type, delayed=delayed)
    assert control.query().start_type == was
    control.set_manual()
    assert fake.services[NAME].start_type == scm.SERVICE_DEMAND_START
    assert control.query().start_type == "manual"
    assert [c for c, _ in fake.calls].count("ChangeServiceConfig") == 1
    control.set_manual()
    assert [c for c, _ in fake.calls].count("ChangeServiceConfig") == 1


def test_set_manual_on_a_manual_service_needs_no_right_to_change_it() -> None:
    _, fake, control = scm_rig(start_type=scm.SERVICE_DEMAND_START, denied=scm.SERVICE_CHANGE_CONFIG)
    control.set_manual()
    fake.services[NAME].start_type = scm.SERVICE_AUTO_START
    with pytest.raises(ServiceError, match="cannot set the start type to Manual: access denied"):
        control.set_manual()


def test_bad_timeouts_are_refused() -> None:
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="timeout"):
            check_timeout(bad)
    assert check_timeout(0) == 0.0


# --- the pywin32 layer, against a stub: argument shapes only ----------------------------------------------


class StubWin32Error(Exception):
    def __init__(self, winerror: int, funcname: str, strerror: str) -> None:
        super().__init__(winerror, funcname, strerror)
        self.winerror, self.funcname, self.strerror = winerror, funcname, strerror


def stub_win32service(calls: list[tuple[Any, ...]]) -> types.ModuleType:
    m = types.ModuleType("win32service")
    consts = {
        "SC_MANAGER_CONNECT": 1,
        "SERVICE_NO_CHANGE": 0xFFFFFFFF,
        "SERVICE_AUTO_START": 2,
        "SERVICE_CONTROL_STOP": 1,
        "SERVICE_CONFIG_DELAYED_AUTO_START_INFO": 3,
    }
    for k, v in consts.items():
        setattr(m, k, v)

    def record(name: str, result: Any = None) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            calls.append((name, *args))
            if isinstance(result, BaseException):
                raise result
            return result

        return call

    answers: dict[str, Any] = {
        "OpenSCManager": "manager",
        "OpenService": "service",
        "CloseServiceHandle": None,
        "ChangeServiceConfig": None,
        "QueryServiceConfig": (16, 2, 1, r"C:\Synergy\svc.exe", "", 0, [], "", ""),
        "QueryServiceConfig2": True,
        "QueryServiceStatusEx": {
            "ServiceType": 16,
            "CurrentState": 1,
            "ControlsAccepted": 0,
            "Win32ExitCode": 1066,
            "ServiceSpecificExitCode": 3,
            "CheckPoint": 0,
            "WaitHint": 0,
            "ProcessId": 0,
            "ServiceFlags": 0,
        },
        "StartService": StubWin32Error(1058, "StartService", "The service cannot be started"),
    }
    for name, answer in answers.items():
        setattr(m, name, record(name, answer))
    return m


def test_the_pywin32_layer_changes_only_the_start_type_and_translates_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setitem(sys.modules, "win32service", stub_win32service(calls))
    monkeypatch.setitem(sys.modules, "pywintypes", types.SimpleNamespace(error=StubWin32Error))
    from engine.service.windows import WindowsScm

    control = ScmControl(WindowsScm(), NAME)
    assert control.query() == ServiceStatus(S.STOPPED, 3, None, "delayed-auto")
    control.set_manual()
    change = [c for c in calls if c[0] == "ChangeServiceConfig"]
    no = 0xFFFFFFFF
    assert change == [
        ("ChangeServiceConfig", "service", no, 3, no, None, None, False, None, None, None, None)
    ]
    with pytest.raises(ServiceError, match=r"disabled \(set its start type to Manual\) \(error 1058\)"):
        control.start(1)
    opened = sum(1 for c in calls if c[0] in ("OpenSCManager", "OpenService"))
    assert opened == sum(1 for c in calls if c[0] == "CloseServiceHandle")


def imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_pywin32_is_imported_by_two_modules_each_for_its_own_service() -> None:
    """service/windows.py controls the protected service; winservice.py registers and hosts standby's
    own (pywin32's service framework, the only user of win32serviceutil)."""
    pywin32 = ("win32service", "win32serviceutil", "pywintypes", "win32api", "win32con", "servicemanager")
    users = {
        p.relative_to(ENGINE).as_posix()
        for p in ENGINE.rglob("*.py")
        if any(m.split(".")[0] in pywin32 for m in imports(p))
    }
    assert users == {"service/windows.py", "winservice.py"}
    framework = {
        p.relative_to(ENGINE).as_posix()
        for p in ENGINE.rglob("*.py")
        if any("win32serviceutil" in m for m in imports(p))
    }
    assert framework == {"winservice.py"}


def test_the_service_package_imports_nothing_above_it() -> None:
    allowed = {"engine.errors", "engine.config", "engine.service"}
    for p in (ENGINE / "service").glob("*.py"):
        ours = {m for m in imports(p) if m.startswith("engine")}
        assert all(m in allowed or m.startswith("engine.service.") for m in ours), (p.name, ours)


# --- systemd, over a scripted systemctl -------------------------------------------------------------------


class FakeSystemctl:
    """Answers systemctl calls from a few properties; records every argv."""

    def __init__(self, active: str = "inactive", file_state: str = "disabled") -> None:
        self.props = {
            "LoadState": "loaded",
            "ActiveState": active,
            "ExecMainCode": "0",
            "ExecMainStatus": "0",
            "ExecMainPID": "0",
            "UnitFileState": file_state,
        }
        self.calls: list[list[str]] = []
        self.fail: dict[str, tuple[int, str]] = {}
        self.hang: set[str] = set()

    def __call__(self, argv: list[str], timeout: float) -> tuple[int, str, str]:
        self.calls.append(argv)
        verb = argv[1]
        if verb in self.hang:
            raise subprocess.TimeoutExpired(argv, timeout)
        if verb in self.fail:
            rc, err = self.fail[verb]
            return rc, "", err
        if verb == "show":
            wanted = argv[3].split(",")
            return 0, "".join(f"{k}={v}\n" for k, v in self.props.items() if k in wanted), ""
        if verb == "start":
            self.props.update(ActiveState="active", ExecMainPID="321")
        elif verb == "stop":
            self.props.update(ActiveState="inactive", ExecMainPID="0", ExecMainCode="1")
        elif verb == "disable":
            self.props["UnitFileState"] = "disabled"
        elif verb == "unmask":
            self.props["UnitFileState"] = "enabled"  # it was enabled before it was masked
        return 0, "", ""

    def verbs(self) -> list[str]:
        return [a[1] for a in self.calls]


def systemd(ctl: FakeSystemctl) -> SystemdControl:
    clock = FakeClock()
    return SystemdControl("synergy.service", run=ctl, clock=clock, sleep=clock.sleep)


def test_systemd_start_and_stop_run_systemctl_only_when_needed() -> None:
    ctl = FakeSystemctl()
    control = systemd(ctl)
    assert control.start(10) == ServiceStatus(S.RUNNING, None, 321, "manual")
    assert ["systemctl", "start", "--no-ask-password", "synergy.service"] in ctl.calls
    assert control.start(10).state is S.RUNNING
    assert ctl.verbs().count("start") == 1
    assert control.stop(10) == ServiceStatus(S.STOPPED, 0, None, "manual")
    assert control.stop(10).state is S.STOPPED
    assert ctl.verbs().count("stop") == 1


def test_systemd_refusals_and_hangs_are_service_errors() -> None:
    ctl = FakeSystemctl()
    ctl.fail["start"] = (4, "Failed to start synergy.service: Access denied\n")
    with pytest.raises(
        ServiceError, match=r"systemctl start exited 4: Failed to start synergy\.service: Access"
    ):
        systemd(ctl).start(10)
    ctl = FakeSystemctl(active="active")
    ctl.hang.add("stop")
    with pytest.raises(ServiceError, match="systemctl stop did not finish within") as e:
        systemd(ctl).stop(10)
    assert e.value.status is not None and e.value.status.state is S.RUNNING


def test_systemd_a_unit_that_fails_right_after_start_is_an_error() -> None:
    ctl = FakeSystemctl()
    real = ctl.__call__

    def failing(argv: list[str], timeout: float) -> tuple[int, str, str]:
        out = real(argv, timeout)
        if argv[1] == "start":
            ctl.props.update(ActiveState="failed", ExecMainCode="1", ExecMainStatus="1", ExecMainPID="0")
        return out

    control = SystemdControl("synergy.service", run=failing)
    with pytest.raises(ServiceError, match=r"not running after start \(stopped, exit code 1\)"):
        control.start(10)


@pytest.mark.parametrize(
    ("file_state", "verbs"),
    [
        ("enabled", ["show", "disable", "show"]),
        ("disabled", ["show"]),
        ("static", ["show"]),
        ("masked", ["show", "unmask", "show", "disable"]),
    ],
)
def test_systemd_set_manual_disables_the_unit(file_state: str, verbs: list[str]) -> None:
    ctl = FakeSystemctl(file_state=file_state)
    systemd(ctl).set_manual()
    assert ctl.verbs() == verbs
    assert ctl.props["UnitFileState"] == "disabled" or file_state == "static"


def test_systemd_a_missing_unit_cannot_be_started_or_stopped() -> None:
    ctl = FakeSystemctl()
    ctl.props["LoadState"] = "not-found"
    control = systemd(ctl)
    assert control.query().state is S.NOT_FOUND
    calls: list[Callable[[], object]] = [lambda: control.start(5), lambda: control.stop(5)]
    for call in calls:
        with pytest.raises(ServiceError, match="the unit does not exist"):
            call()
    assert ctl.verbs() == ["show"] * 3


def test_systemd_refuses_a_unit_name_that_is_an_option() -> None:
    for bad in ("-H evil", "", "../x", "a b"):
        with pytest.raises(ServiceError, match="not usable"):
            SystemdControl(bad)


# --- the command backend, beyond the contract -------------------------------------------------------------


def test_a_command_that_cannot_run_is_a_service_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-program")
    control = CommandControl([missing], [missing], [missing])
    with pytest.raises(ServiceError, match="cannot run the status command"):
        control.query()


def test_a_status_command_that_hangs_is_a_service_error(tmp_path: Path) -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(30)"]
    control = CommandControl(sleeper, sleeper, sleeper, status_timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(ServiceError, match=r"the status command did not finish within 0\.3 s"):
        control.query()
    assert time.monotonic() - t0 < 2


def test_a_start_command_that_leaves_a_daemon_on_its_output_does_not_block(tmp_path: Path) -> None:
    up, child = tmp_path / "up", tmp_path / "child"
    spawn = (
        "import subprocess, sys, pathlib; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(20)']); "
        f"pathlib.Path({str(child)!r}).write_text(str(p.pid)); pathlib.Path({str(up)!r}).touch()"
    )
    status = [sys.executable, "-c", f"import os, sys; sys.exit(0 if os.path.exists({str(up)!r}) else 3)"]
    control = CommandControl([sys.executable, "-c", spawn], ["true"], status)
    try:
        t0 = time.monotonic()
        assert control.start(10).state is S.RUNNING
        assert time.monotonic() - t0 < 3
    finally:
        if child.exists():
            pid = int(child.read_text())
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            wait_gone([psutil.Process(pid)] if psutil.pid_exists(pid) else [])


# --- config and make_control ------------------------------------------------------------------------------


def test_service_config_defaults() -> None:
    cfg = parse_service({})
    assert cfg == ServiceConfig()
    assert (cfg.backend, cfg.name, cfg.timeout, cfg.failover_after) == ("windows", NAME, 60.0, 300.0)


def test_a_command_service_config() -> None:
    cfg = parse_service(
        {
            "backend": "command",
            "start": ["/usr/sbin/service", "synergy", "start"],
            "stop": ["/usr/sbin/service", "synergy", "stop"],
            "status": ["/usr/sbin/service", "synergy", "status"],
            "timeout": 30,
            "failover_after": 120,
        }
    )
    assert cfg.start == ("/usr/sbin/service", "synergy", "start") and cfg.timeout == 30.0
    assert isinstance(make_control(cfg), CommandControl)
    assert isinstance(make_control(parse_service({"backend": "systemd", "name": "synergy"})), SystemdControl)


BAD_SERVICE = [
    ({"backend": "launchd"}, "service -> backend: expected one of 'windows', 'systemd', 'command'"),
    ({"nmae": "x"}, "service -> nmae: unknown key"),
    ({"name": ""}, "service -> name: expected a non-empty string"),
    ({"name": "a/b"}, "service -> name: expected a service name"),
    ({"backend": "systemd", "name": "-H"}, "service -> name: expected a systemd unit name"),
    ({"timeout": 0}, "service -> timeout: expected 1 to 3600 seconds, got 0"),
    ({"timeout": "60"}, "service -> timeout: expected a number"),
    ({"failover_after": float("nan")}, "service -> failover_after: expected 10 to 86400 seconds, got nan"),
    ({"start": ["x"]}, "service -> start: only used with backend = 'command'"),
    ({"backend": "command", "stop": ["x"], "status": ["x"]}, "service -> start: required"),
    ({"backend": "command", "start": [], "stop": ["x"], "status": ["x"]}, "service -> start: expected a non"),
    (
        {"backend": "command", "start": "svc start", "stop": ["x"], "status": ["x"]},
        "service -> start: expected",
    ),
    ({"backend": "command", "start": ["x"], "stop": ["x", 1], "status": ["x"]}, "service -> stop: expected"),
    ({"backend": "command", "start": ["x"], "stop": ["x"], "status": [""]}, "service -> status: expected"),
]


@pytest.mark.parametrize(("section", "message"), BAD_SERVICE, ids=[m for _, m in BAD_SERVICE])
def test_a_bad_service_section_is_one_config_error_naming_the_key(
    section: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as e:
        parse_service(section)
    assert str(e.value).startswith(message), str(e.value)


def test_a_service_section_that_is_not_a_table() -> None:
    with pytest.raises(ConfigError, match="service: expected a table"):
        parse_service("windows")  # type: ignore[arg-type]


def test_the_windows_backend_without_pywin32_is_one_clear_error() -> None:
    if sys.platform == "win32":
        pytest.skip("pywin32 may be installed here")
    with pytest.raises(ServiceError, match="needs pywin32"):
        make_control(ServiceConfig())
