"""standby as a Windows service: the registration plan, its renderings and the control table (pure, in
engine.service.winsvc), and the host that runs the agent (engine.winservice.ServiceHost), for real.

The pywin32 calls themselves (CreateService, ChangeServiceConfig2, the framework's status reports) need
Windows and are not run here; what they are given is checked here, and so is the refusal off Windows.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine import statelock, winservice
from engine.errors import ConfigError, ReplicationError, StateLocked
from engine.service import winsvc
from engine.service.winsvc import Action, Registration, WindowsOnly, registration
from engine.winservice import ServiceHost, agent_session
from tests.pair import ROOT, free_port

pytestmark = pytest.mark.timeout(30)

HOST = r"C:\Program Files\Python312\pythonservice.exe"
CONFIG = r"C:\standby\node.toml"


def reg(config: str = CONFIG, host: str = HOST, name: str = "standby") -> Registration:
    return registration(config, host_exe=host, service_name=name)


# --- the registration -------------------------------------------------------------------------------------


def test_the_registration_holds_what_the_service_needs() -> None:
    r = reg()
    assert r.name == "standby"
    assert r.display_name == "standby replication and failover agent"
    assert "planned stop" in r.description
    assert r.python_class == "engine.winservice.StandbyService"
    assert r.start_type == "delayed-auto"
    assert r.account == "LocalSystem"
    assert r.dependencies == ("Tcpip",)
    assert r.restart_delays_ms == (10_000, 30_000, 60_000)
    assert r.reset_failures_after_s == 86_400
    assert r.failure_actions_on_non_crash is True
    assert r.preshutdown_timeout_ms == 60_000
    # the config path is a registry value, not an argument: the command is the host alone, quoted
    assert r.parameters == {"config": CONFIG}
    assert r.command == f'"{HOST}"'
    assert winsvc.parameters_key("standby") == r"SYSTEM\CurrentControlSet\Services\standby\Parameters"


def test_the_command_is_quoted_only_when_it_must_be() -> None:
    assert reg(host=r"C:\Python312\pythonservice.exe").command == r"C:\Python312\pythonservice.exe"
    spaced = reg(host=r"C:\Program Files\Python 3.12\pythonservice.exe").command
    assert spaced == r'"C:\Program Files\Python 3.12\pythonservice.exe"'
    # what the SCM (the C runtime's rules) reads back is the one path, not "C:\Program" and the rest
    assert subprocess.list2cmdline([HOST]) == reg().command


def test_paths_are_normalised_and_spaces_kept() -> None:
    r = reg(config="C:/Program Data/standby/./conf/../node.toml", host="c:/Python312/pythonservice.EXE")
    assert r.config_path == r"C:\Program Data\standby\node.toml"
    assert r.parameters == {"config": r"C:\Program Data\standby\node.toml"}
    assert r.host_exe == r"c:\Python312\pythonservice.EXE"


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("node.toml", "not an absolute Windows path"),
        (r"standby\node.toml", "not an absolute Windows path"),
        ("C:node.toml", "not an absolute Windows path"),
        (r"\standby\node.toml", "not an absolute Windows path"),
        ("/etc/standby/node.toml", "not an absolute Windows path"),
        (r"\\server\share\node.toml", "network or device path"),
        (r"\\?\C:\standby\node.toml", "network or device path"),
        ('"C:\\standby\\node.toml"', "quote"),
        ('C:\\stand"by\\node.toml', "quote"),
        ("C:\\standby\\node.toml\n", "control character"),
        ("C:\\standby\\no\x00de.toml", "control character"),
        ("C:\\standby\\no\x7fde.toml", "control character"),
        ("C:\\standby\\node\t.toml", "control character"),
        (r"C:\standby\*.toml", "cannot hold"),
        (r"C:\standby\node.toml|x", "cannot hold"),
        (r" C:\standby\node.toml", "space"),
        ("C:\\standby\\node.toml ", "space"),
        ("C:\\standby\\", "a folder"),
        ("C:/standby/", "a folder"),
        ("C:\\", "a folder"),
        (r"C:\standby\..", "a drive"),
        (r"C:\standby\node.toml:stream", "':' after the drive"),
        ("1:\\standby\\node.toml", "not an absolute Windows path"),
    ],
)
def test_a_bad_config_path_is_refused_with_the_reason(path: str, why: str) -> None:
    with pytest.raises(ValueError, match="config path") as e:
        reg(config=path)
    assert why in str(e.value)


@pytest.mark.parametrize(
    ("host", "why"),
    [
        (r"C:\Python312\python.bat", "not an .exe"),
        ("pythonservice.exe", "not an absolute Windows path"),
        ('"C:\\Program Files\\pythonservice.exe"', "quote"),
    ],
)
def test_a_bad_host_is_refused(host: str, why: str) -> None:
    with pytest.raises(ValueError, match="service host") as e:
        reg(host=host)
    assert why in str(e.value)


@pytest.mark.parametrize("name", ["", "a b", "a/b", r"a\b", "-standby", ".x", "x" * 81, "stand\nby", 'a"b'])
def test_a_bad_service_name_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="service name"):
        reg(name=name)


@pytest.mark.parametrize("name", ["standby", "standby-b", "Standby_2.x", "x" * 80, "9"])
def test_good_service_names(name: str) -> None:
    assert reg(name=name).name == name


@given(st.lists(st.text(alphabet=' \t"\\ab\u00e9', max_size=12), max_size=4))
def test_quoting_follows_the_windows_rules(args: list[str]) -> None:
    assert winsvc.cmdline(args) == subprocess.list2cmdline(args)


@pytest.mark.parametrize(
    ("arg", "quoted"),
    [
        ("", '""'),
        ("plain", "plain"),
        ("a b", '"a b"'),
        ('a"b', 'a\\"b'),
        ('a\\"b', 'a\\\\\\"b'),
        ("a\\b", "a\\b"),
        ("a b\\", '"a b\\\\"'),
        ("a\\", "a\\"),
    ],
)
def test_quoting_examples(arg: str, quoted: str) -> None:
    assert winsvc.quote_arg(arg) == quoted


# --- its renderings ---------------------------------------------------------------------------------------


def test_create_service_arguments() -> None:
    c = winsvc.create_service(reg())
    assert c == winsvc.CreateService(
        name="standby",
        display_name="standby replication and failover agent",
        service_type=0x10,  # SERVICE_WIN32_OWN_PROCESS
        start_type=2,  # SERVICE_AUTO_START (delayed: a ChangeServiceConfig2 setting)
        error_control=1,  # SERVICE_ERROR_NORMAL
        binary_path=f'"{HOST}"',
        dependencies=("Tcpip",),
        account=None,  # LocalSystem
    )
    other = winsvc.create_service(Registration(CONFIG, HOST, account=r"DOMAIN\svc-standby"))
    assert other.account == r"DOMAIN\svc-standby"


def test_change_service_config2_settings_in_order() -> None:
    r = reg()
    assert winsvc.config2(r) == (
        (1, r.description),  # SERVICE_CONFIG_DESCRIPTION
        (3, True),  # SERVICE_CONFIG_DELAYED_AUTO_START_INFO
        (
            2,  # SERVICE_CONFIG_FAILURE_ACTIONS: reset in seconds, (SC_ACTION_RESTART, delay ms)
            {
                "ResetPeriod": 86_400,
                "RebootMsg": None,
                "Command": None,
                "Actions": ((1, 10_000), (1, 30_000), (1, 60_000)),
            },
        ),
        (4, True),  # SERVICE_CONFIG_FAILURE_ACTIONS_FLAG: also on a non-zero exit
        (7, 60_000),  # SERVICE_CONFIG_PRESHUTDOWN_INFO
    )


def test_sc_exe_renderings() -> None:
    r = reg(name="standby-b")
    assert winsvc.sc_failure_args(r) == [
        "sc.exe",
        "failure",
        "standby-b",
        "reset=",
        "86400",
        "actions=",
        "restart/10000/restart/30000/restart/60000",
    ]
    assert winsvc.sc_failureflag_args(r) == ["sc.exe", "failureflag", "standby-b", "1"]
    assert winsvc.sc_start_args(r) == ["sc.exe", "config", "standby-b", "start=", "delayed-auto"]
    assert winsvc.sc_description_args(r) == ["sc.exe", "description", "standby-b", r.description]
    assert winsvc.sc_commands(r) == [
        winsvc.sc_start_args(r),
        winsvc.sc_description_args(r),
        winsvc.sc_failure_args(r),
        winsvc.sc_failureflag_args(r),
    ]
    line = winsvc.cmdline(winsvc.sc_failure_args(r))
    assert line == "sc.exe failure standby-b reset= 86400 actions= restart/10000/restart/30000/restart/60000"
    unflagged = Registration(CONFIG, HOST, failure_actions_on_non_crash=False, restart_delays_ms=(5000,))
    assert winsvc.sc_failureflag_args(unflagged)[-1] == "0"
    assert winsvc.sc_failure_args(unflagged)[-1] == "restart/5000"


def test_the_dlls_the_host_needs_beside_it() -> None:
    assert winsvc.runtime_dlls(3, 11) == (
        "python311.dll",
        "python3.dll",
        "vcruntime140.dll",
        "vcruntime140_1.dll",
        "pywintypes311.dll",
    )


def test_describe_says_what_is_registered() -> None:
    text = "\n".join(winsvc.describe(reg()))
    for part in (
        "standby (standby replication and failover agent)",
        f'"{HOST}" hosting engine.winservice.StandbyService',
        r"C:\standby\node.toml (HKLM\SYSTEM\CurrentControlSet\Services\standby\Parameters\config)",
        "delayed-auto, after Tcpip",
        "LocalSystem",
        "restart after 10 s, 30 s, 60 s",
        "reset after 24 h; also on a non-zero exit",
        "up to 60 s",
    ):
        assert part in text, part


# --- the control table ------------------------------------------------------------------------------------


def test_win32_constants() -> None:
    assert (winsvc.SERVICE_ACCEPT_STOP, winsvc.SERVICE_ACCEPT_PRESHUTDOWN) == (0x1, 0x100)
    assert (winsvc.SERVICE_CONTROL_STOP, winsvc.SERVICE_CONTROL_PRESHUTDOWN) == (1, 0xF)
    assert (winsvc.SERVICE_CONTROL_SHUTDOWN, winsvc.SERVICE_CONTROL_INTERROGATE) == (5, 4)


def test_accepted_controls_are_stop_and_preshutdown_not_shutdown() -> None:
    assert winsvc.ACCEPTED_CONTROLS == 0x101
    assert winsvc.ACCEPTED_CONTROLS & winsvc.SERVICE_ACCEPT_SHUTDOWN == 0


@pytest.mark.parametrize(
    ("code", "name", "action", "result"),
    [
        (1, "stop", Action.STOP, 0),
        (0xF, "preshutdown", Action.STOP, 0),
        (5, "shutdown", Action.STOP, 0),
        (4, "interrogate", Action.IGNORE, 0),
        (2, "pause", Action.IGNORE, 120),
        (3, "continue", Action.IGNORE, 120),
        (6, "paramchange", Action.IGNORE, 120),
        (0xD, "powerevent", Action.IGNORE, 120),
        (0xE, "sessionchange", Action.IGNORE, 120),
        (0x10, "timechange", Action.IGNORE, 120),
        (0x80, "control-128", Action.IGNORE, 120),
    ],
)
def test_each_control_maps_to_one_action(code: int, name: str, action: Action, result: int) -> None:
    assert winsvc.control_name(code) == name
    assert winsvc.on_control(name) is action
    assert winsvc.handler_result(name) == result


def test_the_status_reported_for_each_host_state() -> None:
    assert winsvc.scm_status("starting") == winsvc.ScmReport(2, 30_000)  # START_PENDING
    assert winsvc.scm_status("running") == winsvc.ScmReport(4, 0)  # RUNNING
    assert winsvc.scm_status("stopping") == winsvc.ScmReport(3, 60_000)  # STOP_PENDING, wait hint
    assert winsvc.scm_status("stopped") is None  # pywin32 reports STOPPED, with the exit code
    with pytest.raises(ValueError, match="paused"):
        winsvc.scm_status("paused")


# --- the host ---------------------------------------------------------------------------------------------


class Recorder:
    """on_state: each state with the thread it was reported on."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def __call__(self, state: str) -> None:
        self.seen.append((state, threading.current_thread().name))

    @property
    def states(self) -> list[str]:
        return [s for s, _ in self.seen]


def run_in_thread(host: ServiceHost, main: winservice.Main) -> tuple[threading.Thread, dict[str, object]]:
    out: dict[str, object] = {}

    def target() -> None:
        try:
            out["code"] = host.run(main)
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=target, name="service-main")
    t.start()
    return t, out


def test_a_stop_from_another_thread_reaches_main() -> None:
    rec = Recorder()
    host = ServiceHost(on_state=rec)
    started = threading.Event()
    loops: list[asyncio.AbstractEventLoop] = []

    async def main(stop: asyncio.Event) -> int:
        loops.append(asyncio.get_running_loop())
        started.set()
        await stop.wait()
        await asyncio.sleep(0.01)  # draining
        return 7

    t, out = run_in_thread(host, main)
    assert started.wait(5)
    assert host.state == "running"
    host.request_stop("stop")  # the SCM's handler thread
    t.join(5)
    assert out == {"code": 7}
    assert rec.seen == [("running", "service-main"), ("stopping", "MainThread"), ("stopped", "service-main")]
    assert host.state == "stopped" and host.stop_reason == "stop"
    assert loops[0].is_closed()  # a fresh loop, closed when run returns


def test_a_stop_before_the_loop_starts_is_honoured_when_it_does() -> None:
    rec = Recorder()
    host = ServiceHost(on_state=rec)
    host.request_stop("preshutdown")
    assert rec.states == []
    seen: list[bool] = []

    async def main(stop: asyncio.Event) -> int:
        seen.append(stop.is_set())  # set before main's first line
        await stop.wait()
        return 0

    assert host.run(main) == 0
    assert seen == [True]
    assert rec.states == ["running", "stopping", "stopped"]
    assert host.stop_reason == "preshutdown"


def test_a_second_stop_request_is_harmless() -> None:
    rec = Recorder()
    host = ServiceHost(on_state=rec)
    started = threading.Event()

    async def main(stop: asyncio.Event) -> int:
        started.set()
        await stop.wait()
        return 0

    t, out = run_in_thread(host, main)
    assert started.wait(5)
    host.request_stop("preshutdown")
    host.request_stop("stop")
    t.join(5)
    host.request_stop("late")  # after the loop closed: nothing to wake, no error
    assert out == {"code": 0}
    assert rec.states == ["running", "stopping", "stopped"]
    assert host.stop_reason == "preshutdown"


def test_stop_requests_racing_from_many_threads() -> None:
    rec = Recorder()
    host = ServiceHost(on_state=rec)
    started = threading.Event()

    async def main(stop: asyncio.Event) -> int:
        started.set()
        await stop.wait()
        return 3

    t, out = run_in_thread(host, main)
    assert started.wait(5)
    askers = [threading.Thread(target=host.request_stop, args=(f"r{i}",)) for i in range(8)]
    for a in askers:
        a.start()
    for a in askers:
        a.join(5)
    t.join(5)
    assert out == {"code": 3}
    assert rec.states == ["running", "stopping", "stopped"]


def test_main_asking_its_own_host_to_stop() -> None:
    rec = Recorder()
    host = ServiceHost(on_state=rec)

    async def main(stop: asyncio.Event) -> int:
        host.request_stop("self")
        await stop.wait()
        return 0

    assert host.run(main) == 0
    assert rec.states == ["running", "stopping", "stopped"]


def test_main_ending_by_itself_skips_stopping() -> None:
    rec = Recorder()
    host = ServiceHost(on_state=rec)

    async def main(stop: asyncio.Event) -> int:
        return 4

    assert host.run(main) == 4
    assert rec.states == ["running", "stopped"]
    host.request_stop("after")
    assert rec.states == ["running", "stopped"]


def test_an_exception_in_main_is_re_raised_after_stopped() -> None:
    rec = Recorder()
    host = ServiceHost(on_state=rec)

    async def main(stop: asyncio.Event) -> int:
        await asyncio.sleep(0)
        raise ReplicationError("journal gone")

    with pytest.raises(ReplicationError, match="journal gone"):
        host.run(main)
    assert rec.states == ["running", "stopped"]
    assert host.state == "stopped"


def test_an_exception_while_stopping_is_re_raised_after_stopped() -> None:
    rec = Recorder()
    host = ServiceHost(on_state=rec)
    started = threading.Event()

    async def main(stop: asyncio.Event) -> int:
        started.set()
        await stop.wait()
        raise OSError("disk gone while saving state")

    t, out = run_in_thread(host, main)
    assert started.wait(5)
    host.request_stop("stop")
    t.join(5)
    assert isinstance(out.get("error"), OSError)
    assert rec.states == ["running", "stopping", "stopped"]


def test_tasks_left_by_main_are_cancelled_before_stopped() -> None:
    rec = Recorder()
    host = ServiceHost(on_state=rec)
    cancelled: list[bool] = []

    async def straggler() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def main(stop: asyncio.Event) -> int:
        asyncio.get_running_loop().create_task(straggler())
        await asyncio.sleep(0)
        return 0

    assert host.run(main) == 0
    assert cancelled == [True]
    assert rec.states[-1] == "stopped"


def test_a_failing_status_report_does_not_stop_the_host(caplog: pytest.LogCaptureFixture) -> None:
    def on_state(state: str) -> None:
        raise RuntimeError(f"SetServiceStatus failed in {state}")

    host = ServiceHost(on_state=on_state)
    host.request_stop("stop")

    async def main(stop: asyncio.Event) -> int:
        await stop.wait()
        return 0

    assert host.run(main) == 0
    assert sum("winservice.report_failed" in r.getMessage() for r in caplog.records) == 3


def test_a_host_runs_once() -> None:
    host = ServiceHost()

    async def main(stop: asyncio.Event) -> int:
        return 0

    assert host.run(main) == 0
    with pytest.raises(RuntimeError, match="runs once"):
        host.run(main)


# --- the agent, as the service runs it --------------------------------------------------------------------


def node_config(base: Path) -> Path:
    svc = [sys.executable, str(ROOT / "tests" / "svc_helper.py")]
    for d in ("root", "state", "svc"):
        (base / d).mkdir(exist_ok=True)

    def cmd(verb: str) -> str:
        return "[" + ", ".join(f"'{a}'" for a in [*svc, verb, str(base / "svc")]) + "]"

    path = base / "node.toml"
    path.write_text(
        f"""
[node]
name = "a"
listen = "127.0.0.1:{free_port()}"
root = '{base / "root"}'
state_dir = '{base / "state"}'
initial_role = "passive"
insecure = true

[peer]
name = "b"
address = "127.0.0.1:{free_port()}"

[service]
backend = "command"
start = {cmd("start")}
stop = {cmd("stop")}
status = {cmd("status")}
timeout = 10
""",
        "utf-8",
    )
    return path


def test_the_agent_runs_under_the_host_and_stops_when_asked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What the service does on Windows, minus pywin32: the session builds the agent as `standby run` does,
    holding the state lock; a stop (PRESHUTDOWN) asked before the loop ran stops it gracefully, with a
    planned stop announced; the lock is released."""
    caplog.set_level(logging.INFO)
    path = node_config(tmp_path)
    rec = Recorder()
    host = ServiceHost(on_state=rec)
    host.request_stop("preshutdown")
    t0 = time.monotonic()
    with agent_session(path, command="standby service test") as main:
        with pytest.raises(StateLocked, match="standby service test"):
            statelock.acquire(tmp_path / "state", "standby run")
        assert host.run(main) == 0
    assert rec.states == ["running", "stopping", "stopped"]
    assert time.monotonic() - t0 < 10
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("agent.stopping planned_stop=True") for m in said) and "agent.stopped" in said
    statelock.acquire(tmp_path / "state", "standby run").release()  # free again


def test_a_session_refuses_a_bad_config_and_a_held_state_folder(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[sender]\n", "utf-8")
    with pytest.raises(ConfigError), agent_session(bad):
        pass
    path = node_config(tmp_path)
    with (
        statelock.acquire(tmp_path / "state", "standby run"),
        pytest.raises(StateLocked),
        agent_session(path),
    ):
        pass
    if sys.platform != "win32":
        with pytest.raises(ConfigError, match="event_log"), agent_session(path, event_log=True):
            pass


# --- the Windows parts, off Windows -----------------------------------------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="the refusal off Windows")
def test_the_windows_operations_refuse_off_windows(tmp_path: Path) -> None:
    path = node_config(tmp_path)
    calls: dict[str, Callable[[], object]] = {
        "install": lambda: winservice.install(reg()),
        "remove": lambda: winservice.remove("standby"),
        "start": lambda: winservice.start("standby"),
        "stop": lambda: winservice.stop("standby"),
    }
    for op, call in calls.items():
        with pytest.raises(WindowsOnly) as e:
            call()
        assert str(e.value) == (
            f"standby service {op} works on Windows only; on Linux use the systemd unit (README: systemd)"
        )
        assert isinstance(e.value, ReplicationError)
    with pytest.raises(WindowsOnly, match="install works on Windows only"):
        winservice.plan(path)  # refused before the path is even looked at


@pytest.mark.skipif(winservice.HAVE_PYWIN32, reason="pywin32 is installed")
def test_the_service_class_exists_only_with_pywin32() -> None:
    assert not hasattr(winservice, "StandbyService")


def test_the_registered_class_is_the_one_defined() -> None:
    module, cls = winsvc.PYTHON_CLASS.rsplit(".", 1)
    assert module == winservice.__name__
    source = Path(winservice.__file__).read_text("utf-8")
    assert f"    class {cls}(win32serviceutil.ServiceFramework)" in source
