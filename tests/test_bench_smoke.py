"""The benchmark's smallest mode runs end to end (a smoke test: no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import need_binary
from tests.pair import ROOT


@pytest.mark.timeout(240)
def test_bench_smoke_runs_and_writes_results(tmp_path: Path) -> None:
    need_binary("rsync")
    need_binary("lsyncd")
    r = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--no-chart", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=230,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = list(tmp_path.glob("*.json"))
    assert len(results) == 1
    data = json.loads(results[0].read_text())
    names = {t["name"] for t in data["tools"]}
    assert {"standby", "rsync"} <= names, names
    standby = next(t for t in data["tools"] if t["name"] == "standby")
    assert standby["initial_sync"]["median"] > 0
    assert standby["torn"]["bad"] == 0 and standby["lost_same_second"]["bad"] == 0
