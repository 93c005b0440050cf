"""The systemd unit in packaging/: it parses, runs `standby run`, restarts on failure but not on a config
error, and stops gracefully (the agent announces a planned stop on SIGTERM)."""

from __future__ import annotations

import configparser
import shutil
import subprocess

import pytest

from tests.pair import ROOT

UNIT = ROOT / "packaging" / "systemd" / "standby.service"


def _unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(UNIT.read_text("utf-8"))
    return cp


def test_the_unit_runs_the_agent_and_restarts_only_what_a_restart_can_fix() -> None:
    u = _unit()
    assert set(u.sections()) == {"Unit", "Service", "Install"}
    s = u["Service"]
    argv = s["ExecStart"].split()
    assert argv[0].endswith("/standby") and argv[1:3] == ["run", "--config"], argv
    assert s["Restart"] == "on-failure" and s["RestartPreventExitStatus"] == "2"
    assert s["KillSignal"] == "SIGTERM" and int(s["TimeoutStopSec"]) >= 30
    assert s["NoNewPrivileges"] == "yes" and s["ProtectSystem"] == "strict" and "ReadWritePaths" in s
    assert u["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_analyze_accepts_the_unit() -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (the unit is checked by the test above)")
    r = subprocess.run([tool, "verify", "--man=no", str(UNIT)], capture_output=True, text=True, timeout=60)
    # The ExecStart binary does not exist on a test machine: that is the one complaint allowed.
    problems = [x for x in r.stderr.splitlines() if x.strip() and "/opt/standby" not in x]
    assert not problems, r.stderr
