"""Upgrades (engine.upgrade): the pure pieces table-tested; the rest against real things.

- The installer command, its verdicts, version parsing and comparison: tables (PowerShell quoting is
  checked by reading the literal back with PowerShell's own single-quote rules).
- ``run_installer`` and ``version_from_command`` run real tiny Python scripts: a clean exit, msiexec's
  1603, a hang killed at the timeout (with the child it started), a missing program.
- ``settle_service`` runs against the Windows logic over the fake SCM (fake clock: instant) and against a
  real command-backend service (``tests/svc_helper.py``) that a fake installer script starts at its end.
- Staging: a random 1 MiB installer carried in chunks, corrupted and out-of-order chunks, refused names.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest

from engine.errors import ReplicationError
from engine.model import TEMP_MARKER
from engine.service import ServiceControl, ServiceError, ServiceState, ServiceStatus, scm
from engine.service.command import CommandControl
from engine.service.scm import ScmControl
from engine.upgrade import (
    EXIT_NOT_RUN,
    EXIT_TIMED_OUT,
    MAX_INSTALLER_SIZE,
    TAIL_LINES,
    Incoming,
    Staged,
    StagedMismatch,
    StagingError,
    compare_versions,
    describe,
    installer_argv,
    installer_path,
    installer_verdict,
    iter_chunks,
    parse_file_version,
    run_installer,
    settle_service,
    staged,
    version_from_command,
    windows_file_version_argv,
)
from tests.fake_scm import FakeClock, FakeScm

HELPER = Path(__file__).resolve().parent / "svc_helper.py"
NAME = "SynergySKYEnterpriseSchedulingService"
PY = sys.executable

pytestmark = pytest.mark.timeout(30)


# --- the installer command --------------------------------------------------------------------------------

ARGV = [
    (
        "windows-msi",
        Path("C:/stage/App 5.2.msi"),
        Path("C:/logs/install.log"),
        True,
        (),
        ["msiexec", "/i", str(Path("C:/stage/App 5.2.msi")), "/qn", "/l*v", str(Path("C:/logs/install.log"))],
    ),
    (
        "windows-msi-upper-case",
        Path("C:/stage/APP.MSI"),
        Path("C:/l.log"),
        True,
        (),
        ["msiexec", "/i", str(Path("C:/stage/APP.MSI")), "/qn", "/l*v", str(Path("C:/l.log"))],
    ),
    (
        "posix-command",
        Path("/srv/up/app_5.2.deb"),
        Path("/var/log/up.log"),
        False,
        ("sudo", "dpkg", "-i", "{installer}", "--log={log}"),
        ["sudo", "dpkg", "-i", "/srv/up/app_5.2.deb", "--log=/var/log/up.log"],
    ),
    (
        "windows-exe-with-a-command",
        Path("D:/setup.exe"),
        Path("D:/setup.log"),
        True,
        ("{installer}", "/quiet", "/log", "{log}"),
        [str(Path("D:/setup.exe")), "/quiet", "/log", str(Path("D:/setup.log"))],
    ),
    (
        "placeholders-in-paths-are-not-replaced-again",
        Path("/tmp/{log}/x.run"),
        Path("/tmp/{installer}.log"),
        False,
        ("sh", "{installer}", "{log}", "{other}", "{{installer}}"),
        ["sh", "/tmp/{log}/x.run", "/tmp/{installer}.log", "{other}", "{/tmp/{log}/x.run}"],
    ),
]


@pytest.mark.parametrize(
    ("installer", "log", "windows", "command", "want"), [a[1:] for a in ARGV], ids=[a[0] for a in ARGV]
)
def test_installer_argv(
    installer: Path, log: Path, windows: bool, command: tuple[str, ...], want: list[str]
) -> None:
    assert installer_argv(installer, log, windows=windows, command=command) == want


@pytest.mark.parametrize(
    ("installer", "windows", "command", "words"),
    [
        (Path("/srv/app.deb"), False, (), "no installer command is configured"),
        (Path("C:/stage/setup.exe"), True, (), "not a .msi package"),
        (Path("/srv/app.deb"), False, ("", "{installer}"), "empty"),
    ],
)
def test_installer_argv_refusals(
    installer: Path, windows: bool, command: tuple[str, ...], words: str
) -> None:
    with pytest.raises(ValueError, match=words):
        installer_argv(installer, Path("x.log"), windows=windows, command=command)


VERDICTS = [
    (0, True, True, "installed"),
    (3010, True, True, "a reboot is required"),
    (1641, True, True, "the installer started a reboot"),
    (1602, True, False, "cancelled"),
    (1618, True, False, "another installation is already in progress"),
    (1603, True, False, "fatal error"),
    (1619, True, False, "could not be opened"),
    (1638, True, False, "another version of this product is already installed"),
    (1, True, False, "exit code 1"),
    (-9, True, False, "exit code -9"),
    (0, False, True, "installed"),
    (3010, False, False, "exit code 3010"),  # a generic command: only 0 is success
    (2, False, False, "exit code 2"),
]


@pytest.mark.parametrize(("code", "msi", "ok", "words"), VERDICTS)
def test_installer_verdict(code: int, msi: bool, ok: bool, words: str) -> None:
    got_ok, text = installer_verdict(code, msi=msi)
    assert got_ok is ok and words in text
    if msi:
        assert installer_verdict(code) == (got_ok, text)  # msiexec's codes are the default


# --- running the installer --------------------------------------------------------------------------------


def script(tmp_path: Path, name: str, body: str) -> list[str]:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body), "utf-8")
    return [PY, str(path)]


def gone(pid: int, within: float = 5.0) -> bool:
    """Whether ``pid`` ends within ``within`` s (a zombie has ended: its parent reaps it in its own time)."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.01)
    return False


def kill_quietly(pid: int) -> None:
    try:
        psutil.Process(pid).kill()
    except psutil.Error:
        pass


def test_a_clean_install_keeps_the_tail_of_its_output(tmp_path: Path) -> None:
    argv = script(
        tmp_path,
        "ok.py",
        """
        import sys
        for i in range(30):
            print(f"step {i}", flush=True)
        print("warning: on stderr", file=sys.stderr, flush=True)
        print()
        """,
    )
    result = run_installer(argv, timeout=10)
    assert result.exit_code == 0 and result.started and not result.timed_out
    lines = result.output_tail.splitlines()
    assert len(lines) == TAIL_LINES and lines[-1] == "warning: on stderr" and lines[0] == "step 11"
    assert 0 < result.seconds < 10
    assert result.verdict() == (True, "installed")


def test_a_failed_install_reports_msiexecs_meaning(tmp_path: Path) -> None:
    argv = script(
        tmp_path, "fail.py", "import sys\nprint('Product: X -- Installation failed.')\nsys.exit(1603)\n"
    )
    result = run_installer(argv, timeout=10)
    # POSIX keeps only the low 8 bits of an exit status (1603 is 67 there); Windows keeps all 32
    want = 1603 if sys.platform == "win32" else 1603 & 0xFF
    assert result.exit_code == want and not result.timed_out and result.started
    assert "Installation failed." in result.output_tail
    assert result.verdict() == installer_verdict(want) and not result.verdict()[0]
    ok, text = replace(result, exit_code=1603).verdict()  # what msiexec's own 1603 reads as
    assert not ok and "fatal error" in text and "1603" in text
    assert replace(result, exit_code=1603).verdict(msi=False) == (False, "exit code 1603")


def test_a_hung_installer_is_killed_at_the_timeout_with_what_it_started(tmp_path: Path) -> None:
    child_pid = tmp_path / "child.pid"
    argv = script(
        tmp_path,
        "hang.py",
        f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(child_pid)!r}, "w").write(str(child.pid))
        print("waiting for ever", flush=True)
        time.sleep(60)
        """,
    )
    t0 = time.monotonic()
    result = run_installer(argv, timeout=1.0)
    elapsed = time.monotonic() - t0
    pid = int(child_pid.read_text())
    try:
        assert result.timed_out and result.exit_code == EXIT_TIMED_OUT and result.started
        assert 1.0 <= elapsed < 4.0, elapsed
        assert "waiting for ever" in result.output_tail
        ok, text = result.verdict()
        assert not ok and "did not finish" in text and "killed" in text
        if sys.platform != "win32":  # POSIX kills the process group; Windows only the installer itself
            assert gone(pid), "the installer's child outlived the timeout"
    finally:
        kill_quietly(pid)


def test_an_installer_that_leaves_a_process_holding_its_output_does_not_make_us_wait(tmp_path: Path) -> None:
    """Like an installer that starts a service which inherits its stdout: it has finished when it exits."""
    child_pid = tmp_path / "child.pid"
    argv = script(
        tmp_path,
        "daemon.py",
        f"""
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(20)"])
        open({str(child_pid)!r}, "w").write(str(child.pid))
        print("started the service", flush=True)
        """,
    )
    t0 = time.monotonic()
    result = run_installer(argv, timeout=15)
    pid = int(child_pid.read_text())
    try:
        assert time.monotonic() - t0 < 5 and result.exit_code == 0 and not result.timed_out
        assert result.output_tail == "started the service"
    finally:
        kill_quietly(pid)
        assert gone(pid)


def test_a_missing_installer_program_is_a_result_not_a_traceback(tmp_path: Path) -> None:
    result = run_installer([str(tmp_path / "no-such-msiexec"), "/i", "x.msi"], timeout=5)
    assert result.exit_code == EXIT_NOT_RUN and not result.started and not result.timed_out
    assert result.output_tail.startswith("cannot run ") and "no-such-msiexec" in result.output_tail
    if sys.platform != "win32":
        assert "No such file" in result.output_tail
    ok, text = result.verdict()
    assert not ok and "could not be run" in text


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf")])
def test_run_installer_refuses_unusable_timeouts_and_empty_commands(timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        run_installer([PY, "-c", "pass"], timeout=timeout)
    with pytest.raises(ValueError, match="empty"):
        run_installer([], timeout=5)


# --- versions ---------------------------------------------------------------------------------------------


def test_version_from_command_takes_the_first_non_empty_line(tmp_path: Path) -> None:
    argv = script(tmp_path, "v.py", "print()\nprint('   ')\nprint('  5.2.1.3  ')\nprint('build 77')\n")
    assert version_from_command(argv, timeout=10) == "5.2.1.3"


@pytest.mark.parametrize(
    ("body", "timeout", "words"),
    [
        ("import sys\nprint('1.0')\nprint('no licence', file=sys.stderr)\nsys.exit(2)\n", 10.0, "no licence"),
        ("print()\n", 10.0, "printed nothing"),
        ("import time\ntime.sleep(30)\n", 0.5, "did not finish"),
    ],
    ids=["non-zero-exit", "prints-nothing", "hangs"],
)
def test_version_from_command_failures_are_none_and_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, body: str, timeout: float, words: str
) -> None:
    caplog.set_level(logging.WARNING, logger="engine.upgrade")
    assert version_from_command(script(tmp_path, "v.py", body), timeout=timeout) is None
    assert any("upgrade.version_failed" in r.getMessage() and words in r.getMessage() for r in caplog.records)


def test_version_from_a_missing_program_is_none(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="engine.upgrade")
    assert version_from_command([str(tmp_path / "nope")], timeout=5) is None
    assert any("upgrade.version_failed" in r.getMessage() for r in caplog.records)


#: What PowerShell reads as a single quote.
PS_QUOTES = "'\u2018\u2019\u201a\u201b"


def ps_single_quoted(text: str) -> tuple[str, str]:
    """Read a PowerShell single-quoted literal at the start of ``text`` as PowerShell's tokenizer does (a
    quote character followed by another is one literal quote, the second); its value and what follows."""
    assert text[0] in PS_QUOTES, text
    value: list[str] = []
    i = 1
    while True:
        c = text[i]
        if c in PS_QUOTES:
            if i + 1 < len(text) and text[i + 1] in PS_QUOTES:
                value.append(text[i + 1])
                i += 2
                continue
            return "".join(value), text[i + 1 :]
        value.append(c)
        i += 1


@pytest.mark.parametrize(
    "exe",
    [
        r"C:\Program Files\Synergy SKY\Scheduler.exe",
        r"C:\Users\O'Brien\app.exe",
        r"C:\x\''\y.exe",
        "C:\\typographic \u2019quote\u2018 and \u201a\u201b\\a.exe",
        r"C:\$env:TEMP\`n\$(calc).exe",  # nothing expands in single quotes
        r"C:\ends with a quote'",
    ],
)
def test_windows_file_version_argv_quotes_the_path_for_powershell(exe: str) -> None:
    argv = windows_file_version_argv(exe)
    assert argv[:-1] == ["powershell.exe", "-NoProfile", "-NonInteractive", "-Command"]
    head = "(Get-Item -LiteralPath "
    assert argv[-1].startswith(head)
    value, rest = ps_single_quoted(argv[-1][len(head) :])
    assert value == exe and rest == ").VersionInfo.FileVersion"


def test_a_quote_in_the_path_is_doubled() -> None:
    assert windows_file_version_argv(r"C:\O'Brien\a.exe")[-1] == (
        r"(Get-Item -LiteralPath 'C:\O''Brien\a.exe').VersionInfo.FileVersion"
    )


FILE_VERSIONS = [
    ("5.2.1.3", "5.2.1.3"),
    ("5.2.1.3\r\n", "5.2.1.3"),
    ("5, 2, 1, 3", "5.2.1.3"),
    ("5,2,1,3\n", "5.2.1.3"),
    ("\n\n  7.1.0  \n", "7.1.0"),
    ("10.0.19041.1 (WinBuild.160101.0800)", "10.0.19041.1"),
    ("\ufeff1.2.3\r\n", "1.2.3"),
    ("v2.4", "2.4"),
    ("Get-Item : Cannot find path 'C:\\x.exe'\nAt line:1 char:2\n", None),
    ("", None),
    ("\r\n", None),
    ("5", None),
    ("5.", None),
    ("5..2", None),
    ("5.2.x", None),
    ("version 5.2", None),
    ("noise\n5.2.0.11\n6.0\n", "5.2.0.11"),
]


@pytest.mark.parametrize(("text", "want"), FILE_VERSIONS)
def test_parse_file_version(text: str, want: str | None) -> None:
    assert parse_file_version(text) == want


COMPARISONS = [
    ("5.2.1.3", "5.2.1.3", True, "both run 5.2.1.3"),
    ("5.2.1.3", "5.1.0.9", False, "this node runs 5.2.1.3, the peer 5.1.0.9"),
    ("5.2", "5.2.0.0", True, "both run 5.2"),
    ("5.02.1", "5.2.1", True, "both run 5.02.1"),
    ("5.2.1.30", "5.2.1.3", False, "this node runs 5.2.1.30, the peer 5.2.1.3"),
    ("2024.1-beta", "2024.1-beta", True, "both run 2024.1-beta"),
    ("2024.1-beta", "2024.1", False, "this node runs 2024.1-beta, the peer 2024.1"),
    ("5.2.1.3", None, False, "the peer's version is unknown (this node runs 5.2.1.3)"),
    (None, "5.2.1.3", False, "this node's version is unknown (the peer runs 5.2.1.3)"),
    (None, None, False, "neither node's version is known"),
]


@pytest.mark.parametrize(("local", "peer", "same", "text"), COMPARISONS)
def test_compare_versions(local: str | None, peer: str | None, same: bool, text: str) -> None:
    assert compare_versions(local, peer) == (same, text)


# --- settling the service: the Windows logic over the fake SCM --------------------------------------------


def scm_rig(**service: object) -> tuple[FakeClock, FakeScm, ScmControl]:
    clock = FakeClock()
    fake = FakeScm(clock)
    if service.pop("missing", False) is False:
        fake.add(NAME, **service)
    return clock, fake, ScmControl(fake, NAME, clock=clock, sleep=clock.sleep)


def as_installer_left_it(fake: FakeScm, control: ScmControl) -> None:
    """What an installer often does: the service set to Automatic and started."""
    fake.services[NAME].start_type = scm.SERVICE_AUTO_START
    control.start(60)
    assert control.query().state is ServiceState.RUNNING


def test_settle_stops_the_service_and_sets_it_manual() -> None:
    clock, fake, control = scm_rig()
    as_installer_left_it(fake, control)
    t0 = clock()
    result = settle_service(
        control, stable_for=10, timeout=120, stop_timeout=30, clock=clock, sleep=clock.sleep, poll=1
    )
    assert result.ok and result.stops == 1 and result.reason == ""
    assert fake.services[NAME].state == scm.SERVICE_STOPPED
    assert fake.services[NAME].start_type == scm.SERVICE_DEMAND_START
    assert result.status is not None and result.status.state is ServiceState.STOPPED
    assert 10 <= result.seconds == clock() - t0 < 20
    assert any("running" in o for o in result.observations) and any(
        o.endswith(": stop") for o in result.observations
    )
    assert fake.open_handles == 0


def test_settle_stops_it_again_when_something_starts_it_during_the_stable_window() -> None:
    clock, fake, control = scm_rig()
    as_installer_left_it(fake, control)
    t0 = clock()
    restarted: list[float] = []

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        if not restarted and clock() - t0 >= 8:  # a custom action starts it again, and sets it Automatic
            svc = fake.services[NAME]
            svc.state, svc.pid, svc.start_type = scm.SERVICE_RUNNING, 9999, scm.SERVICE_AUTO_START
            restarted.append(clock())

    result = settle_service(
        control, stable_for=10, timeout=120, stop_timeout=30, clock=clock, sleep=sleep, poll=1
    )
    assert result.ok and result.stops == 2
    assert clock() >= restarted[0] + 10  # stable for the whole window after the second stop
    assert fake.services[NAME].state == scm.SERVICE_STOPPED
    assert fake.services[NAME].start_type == scm.SERVICE_DEMAND_START


def test_a_hung_stop_is_not_ok_after_the_timeout_and_nothing_is_raised() -> None:
    clock, fake, control = scm_rig(hang_stop=True)
    as_installer_left_it(fake, control)
    t0 = clock()
    result = settle_service(
        control, stable_for=5, timeout=60, stop_timeout=20, clock=clock, sleep=clock.sleep, poll=1
    )
    assert not result.ok and result.stops >= 2
    assert clock() - t0 <= 60  # the stops never run past the deadline
    assert "did not stop" in result.reason and "60 s" in result.reason
    assert result.status is not None and result.status.state is ServiceState.STOP_PENDING
    assert any("the stop failed" in o for o in result.observations)
    assert fake.open_handles == 0


class Flaky:
    """A ServiceControl whose first ``fail`` queries raise, as a busy SCM or a lost RPC would."""

    def __init__(self, inner: ServiceControl, fail: int) -> None:
        self.inner = inner
        self.fail = fail

    def query(self) -> ServiceStatus:
        if self.fail:
            self.fail -= 1
            raise ServiceError("the SCM is busy")
        return self.inner.query()

    def start(self, timeout: float) -> ServiceStatus:
        return self.inner.start(timeout)

    def stop(self, timeout: float) -> ServiceStatus:
        return self.inner.stop(timeout)

    def set_manual(self) -> None:
        self.inner.set_manual()


def test_service_errors_are_recorded_and_retried() -> None:
    clock, fake, control = scm_rig()
    as_installer_left_it(fake, control)
    result = settle_service(
        Flaky(control, fail=3),
        stable_for=5,
        timeout=60,
        stop_timeout=20,
        clock=clock,
        sleep=clock.sleep,
        poll=1,
    )
    assert result.ok and result.stops == 1
    assert (
        sum("cannot query the service: the SCM is busy" in o for o in result.observations) == 1
    )  # repeats left out


def test_a_query_error_breaks_the_stable_run() -> None:
    clock, _, control = scm_rig(start_type=scm.SERVICE_DEMAND_START)
    flaky = Flaky(control, fail=0)
    t0 = clock()

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        if clock() - t0 == 3:
            flaky.fail = 1

    result = settle_service(
        flaky, stable_for=5, timeout=60, stop_timeout=20, clock=clock, sleep=sleep, poll=1
    )
    assert result.ok and result.stops == 0
    assert clock() - t0 == 4 + 5  # the run began again at the look after the failed one


def test_a_service_that_cannot_be_set_manual_does_not_settle() -> None:
    clock, _, control = scm_rig(start_type=scm.SERVICE_AUTO_START, denied=scm.SERVICE_CHANGE_CONFIG)
    result = settle_service(
        control, stable_for=5, timeout=30, stop_timeout=10, clock=clock, sleep=clock.sleep, poll=1
    )
    assert not result.ok and result.stops == 0
    assert "start type is auto" in result.reason and "access denied" in result.reason
    assert any(
        "cannot set the start type to manual" in o and "access denied" in o for o in result.observations
    )


def test_a_missing_service_does_not_settle() -> None:
    clock, _, control = scm_rig(missing=True)
    result = settle_service(
        control, stable_for=5, timeout=30, stop_timeout=10, clock=clock, sleep=clock.sleep, poll=1
    )
    assert not result.ok and result.stops == 0 and "does not exist" in result.reason


def test_settle_with_no_stable_window_succeeds_at_the_first_quiet_look() -> None:
    clock, _, control = scm_rig(start_type=scm.SERVICE_DEMAND_START)
    result = settle_service(
        control, stable_for=0, timeout=30, stop_timeout=10, clock=clock, sleep=clock.sleep
    )
    assert result.ok and result.stops == 0 and clock.sleeps == [] and result.seconds == 0


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"stable_for": 61.0}, "never settles"),
        ({"stable_for": -1.0}, "stable_for"),
        ({"timeout": float("nan")}, "timeout"),
        ({"stop_timeout": float("inf")}, "stop_timeout"),
        ({"poll": 0.0}, "poll"),
    ],
)
def test_settle_refuses_unusable_durations(kw: dict[str, float], words: str) -> None:
    clock, _, control = scm_rig()
    args = {"stable_for": 5.0, "timeout": 60.0, "stop_timeout": 10.0, "poll": 1.0} | kw
    with pytest.raises(ValueError, match=words):
        settle_service(
            control,
            stable_for=args["stable_for"],
            timeout=args["timeout"],
            stop_timeout=args["stop_timeout"],
            clock=clock,
            sleep=clock.sleep,
            poll=args["poll"],
        )


# --- settling the service: a real command-backend service started by a fake installer --------------------


@pytest.fixture
def svc_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "svc"
    d.mkdir()
    try:
        yield d
    finally:
        try:
            pids = [int(p) for p in (d / "pids").read_text().split()]
        except FileNotFoundError:
            pids = []
        for pid in pids:
            kill_quietly(pid)
        for pid in pids:
            assert gone(pid)


@pytest.mark.skipif(sys.platform == "win32", reason="the helper service is POSIX only")
def test_settle_stops_a_real_service_an_installer_started(tmp_path: Path, svc_dir: Path) -> None:
    installer = script(
        tmp_path,
        "installer.py",
        f"""
        import subprocess, sys
        print("copying files", flush=True)
        sys.exit(subprocess.call([sys.executable, {str(HELPER)!r}, "start", {str(svc_dir)!r}]))
        """,
    )
    result = run_installer(installer, timeout=10)
    assert result.verdict(msi=False) == (True, "installed"), result
    control = CommandControl(
        [PY, str(HELPER), "start", str(svc_dir)],
        [PY, str(HELPER), "stop", str(svc_dir)],
        [PY, str(HELPER), "status", str(svc_dir)],
        status_timeout=5.0,
    )
    running = control.query()
    assert running.state is ServiceState.RUNNING and running.pid is not None
    settled = settle_service(
        control, stable_for=0.3, timeout=10, stop_timeout=5, clock=time.monotonic, sleep=time.sleep, poll=0.05
    )
    assert settled.ok and settled.stops == 1, settled
    assert 0.3 <= settled.seconds < 10
    assert control.query().state is ServiceState.STOPPED
    assert gone(running.pid, within=1)


# --- staging the installer --------------------------------------------------------------------------------

DIGEST = "0" * 32


def make_installer(tmp_path: Path, name: str = "Scheduler 5.2.1.3.msi", size: int = 1 << 20) -> Path:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    path = src / name
    path.write_bytes(random.Random(size).randbytes(size))
    return path


def carry(path: Path, state: Path, source: str = "node-a", chunk: int = 64 * 1024) -> Staged:
    sent = describe(path)
    with Incoming.begin(state, sent.name, sent.size, sent.digest, source) as incoming:
        for offset, data in iter_chunks(path, chunk):
            incoming.write(offset, data)
        return incoming.finish()


def upgrade_files(state: Path) -> list[str]:
    folder = state / "upgrade"
    return sorted(os.listdir(folder)) if folder.exists() else []


def test_staging_round_trip_in_chunks(tmp_path: Path) -> None:
    src = make_installer(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    sent = describe(src)
    assert (sent.name, sent.size, len(sent.digest)) == (src.name, 1 << 20, 32)
    chunks = list(iter_chunks(src, 64 * 1024))
    assert len(chunks) == 16 and [o for o, _ in chunks] == [i * 64 * 1024 for i in range(16)]

    incoming = Incoming.begin(state, sent.name, sent.size, sent.digest.upper(), "node-a")
    for offset, data in chunks:
        incoming.write(offset, data)
    assert incoming.received == 1 << 20
    got = incoming.finish()

    assert (got.name, got.size, got.digest, got.source_node) == (sent.name, sent.size, sent.digest, "node-a")
    assert got.staged_at is not None
    at = datetime.fromisoformat(got.staged_at)
    assert at.tzinfo is not None and at.utcoffset() == UTC.utcoffset(None)
    assert abs((datetime.now(UTC) - at).total_seconds()) < 60
    assert installer_path(state, got).read_bytes() == src.read_bytes()
    assert upgrade_files(state) == sorted([src.name, "staged.json"])  # no .part left
    record = json.loads((state / "upgrade" / "staged.json").read_text("utf-8"))
    assert {k: record[k] for k in ("name", "size", "digest", "source_node", "staged_at")} == {
        "name": got.name,
        "size": got.size,
        "digest": got.digest,
        "source_node": "node-a",
        "staged_at": got.staged_at,
    }
    assert staged(state) == got
    assert staged(state, verify=True) == got
    with pytest.raises(StagingError, match="already over"):
        incoming.write(1 << 20, b"x")


def test_an_empty_installer_stages(tmp_path: Path) -> None:
    src = make_installer(tmp_path, "empty.msi", 0)
    assert list(iter_chunks(src)) == []
    got = carry(src, tmp_path / "state")
    assert got.size == 0 and staged(tmp_path / "state", verify=True) == got


def test_a_corrupted_chunk_is_a_digest_mismatch_and_leaves_no_file(tmp_path: Path) -> None:
    src = make_installer(tmp_path)
    state = tmp_path / "state"
    sent = describe(src)
    incoming = Incoming.begin(state, sent.name, sent.size, sent.digest, "node-a")
    for offset, data in iter_chunks(src, 64 * 1024):
        if offset == 3 * 64 * 1024:
            data = data[:100] + bytes([data[100] ^ 0x01]) + data[101:]
        incoming.write(offset, data)
    with pytest.raises(StagedMismatch) as e:
        incoming.finish()
    assert isinstance(e.value, ReplicationError) and e.value.what == "digest"
    assert "digest" in str(e.value) and sent.digest in str(e.value) and src.name in str(e.value)
    assert upgrade_files(state) == []
    assert staged(state) is None


def test_fewer_bytes_than_announced_is_a_size_mismatch(tmp_path: Path) -> None:
    src = make_installer(tmp_path)
    state = tmp_path / "state"
    sent = describe(src)
    incoming = Incoming.begin(state, sent.name, sent.size, sent.digest, "node-a")
    for offset, data in iter_chunks(src, 64 * 1024):
        if offset >= 1 << 19:
            break
        incoming.write(offset, data)
    with pytest.raises(StagedMismatch, match="size") as e:
        incoming.finish()
    assert e.value.what == "size" and "1048576 bytes" in str(e.value) and "524288 bytes" in str(e.value)
    assert upgrade_files(state) == []


def test_chunks_must_be_contiguous(tmp_path: Path) -> None:
    src = make_installer(tmp_path, size=3000)
    state = tmp_path / "state"
    sent = describe(src)
    data = src.read_bytes()
    incoming = Incoming.begin(state, sent.name, sent.size, sent.digest, "node-a")
    incoming.write(0, data[:1000])
    with pytest.raises(StagingError, match="offset 1001 where 1000 was expected"):
        incoming.write(1001, data[1001:2000])  # a gap
    with pytest.raises(StagingError, match="offset 0 where 1000 was expected"):
        incoming.write(0, data[:1000])  # a repeat
    with pytest.raises(StagingError, match="goes past the announced size"):
        incoming.write(1000, data[1000:] + b"extra")
    incoming.write(1000, data[1000:])  # a refused chunk changed nothing: the right one carries on
    got = incoming.finish()
    assert got.digest == sent.digest and installer_path(state, got).read_bytes() == data


BAD_NAMES = [
    "",
    ".",
    "..",
    "../evil.msi",
    "sub/app.msi",
    "sub\\app.msi",
    "/abs.msi",
    "C:app.msi",
    "C:\\app.msi",
    "x" * 252 + ".msi",  # 256 characters
    "staged.json",
    "STAGED.JSON",
    "app.msi.part",
    "con.msi",
    "NUL",
    "app\x00.msi",
    "app\n.msi",
    "trailing.msi ",
    "trailing.",
    "app" + TEMP_MARKER + "1.msi",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(StagingError, match="refused"):
        Incoming.begin(tmp_path / "state", name, 10, DIGEST, "node-a")
    assert upgrade_files(tmp_path / "state") == []


def test_a_name_of_255_characters_and_other_plain_names_are_accepted(tmp_path: Path) -> None:
    for name in ("x" * 251 + ".msi", "setup.exe", "Scheduler 5.2 (x64).msi", "pakke-æøå.msi", "noext"):
        src = make_installer(tmp_path, name, 100)
        assert carry(src, tmp_path / "state").name == name


@pytest.mark.parametrize(
    ("size", "digest", "source", "words"),
    [
        (-1, DIGEST, "node-a", "not a number of bytes"),
        (MAX_INSTALLER_SIZE + 1, DIGEST, "node-a", "more than the 4 GiB"),
        (True, DIGEST, "node-a", "not a number of bytes"),
        (1.5, DIGEST, "node-a", "not a number of bytes"),
        (10, "xyz", "node-a", "32 hex digits"),
        (10, "g" * 32, "node-a", "32 hex digits"),
        (10, DIGEST + "0", "node-a", "32 hex digits"),
        (10, DIGEST, 7, "source node"),
    ],
)
def test_bad_announcements_are_refused(
    tmp_path: Path, size: object, digest: object, source: object, words: str
) -> None:
    with pytest.raises(StagingError, match=words):
        Incoming.begin(tmp_path / "state", "app.msi", size, digest, source)  # type: ignore[arg-type]
    assert upgrade_files(tmp_path / "state") == []


def test_the_largest_size_is_accepted(tmp_path: Path) -> None:
    try:
        incoming = Incoming.begin(tmp_path / "state", "big.msi", MAX_INSTALLER_SIZE, DIGEST, "node-a")
    except StagingError as e:  # a small disk: the refusal must say so
        assert "bytes free" in str(e)
        return
    incoming.abort()


def test_abort_deletes_the_partial_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    incoming = Incoming.begin(state, "app.msi", 10, DIGEST, "node-a")
    incoming.write(0, b"12345")
    assert incoming.part.exists()
    incoming.abort()
    incoming.abort()
    assert upgrade_files(state) == []
    with pytest.raises(StagingError, match="already over"):
        incoming.finish()
    with Incoming.begin(state, "app.msi", 10, DIGEST, "node-a") as again:
        again.write(0, b"123")
    assert upgrade_files(state) == []  # left unfinished: aborted


def test_staged_checks_the_file_is_still_there_and_whole(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="engine.upgrade")
    state = tmp_path / "state"
    assert staged(state) is None  # nothing staged yet
    got = carry(make_installer(tmp_path, size=5000), state)
    path = installer_path(state, got)
    data = path.read_bytes()

    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # same size, other bytes
    assert staged(state) == got  # the size is all that is checked without verify
    assert staged(state, verify=True) is None

    path.write_bytes(data + b"more")
    assert staged(state) is None

    path.unlink()
    assert staged(state) is None

    path.write_bytes(data)
    assert staged(state, verify=True) == got
    (state / "upgrade" / "staged.json").write_text("{not json", "utf-8")
    assert staged(state) is None
    messages = " ".join(r.getMessage() for r in caplog.records)
    for event in ("upgrade.staged_changed", "upgrade.staged_missing", "upgrade.staged_unreadable"):
        assert event in messages


def test_a_new_installer_replaces_the_staged_one(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = carry(make_installer(tmp_path, "app-5.1.msi", 3000), state)
    second = carry(make_installer(tmp_path, "app-5.2.msi", 4000), state, source="node-b")
    assert staged(state, verify=True) == second and second.source_node == "node-b"
    assert upgrade_files(state) == ["app-5.2.msi", "staged.json"]  # the older installer was removed
    assert first.name != second.name

    src = make_installer(tmp_path, "app-5.2.msi", 4500)  # the same name again, other bytes
    third = carry(src, state)
    assert (
        staged(state, verify=True) == third and installer_path(state, third).read_bytes() == src.read_bytes()
    )
    assert upgrade_files(state) == ["app-5.2.msi", "staged.json"]


def test_describe_refuses_what_the_receiver_would(tmp_path: Path) -> None:
    with pytest.raises(StagingError, match="reserved"):
        describe(make_installer(tmp_path, "x.part", 10))
    folder = tmp_path / "src" / "folder.msi"
    folder.mkdir()
    with pytest.raises(StagingError, match="not a file"):
        describe(folder)
    with pytest.raises(StagingError, match="cannot read"):
        describe(tmp_path / "src" / "missing.msi")
    with pytest.raises(ValueError, match="chunk"):
        list(iter_chunks(make_installer(tmp_path, "a.msi", 10), 0))
