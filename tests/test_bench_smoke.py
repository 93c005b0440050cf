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
    # Ratios as numbers: against every other tool measured and against the machine's own limits.
    ratios = data["ratios"]
    assert isinstance(ratios["initial_sync"]["rsync"], float) and ratios["initial_sync"]["rsync"] > 0
    for key in ("initial_sync", "reconcile_same", "latency_rewrite_p50"):
        assert isinstance(ratios[key]["limit"], float) and ratios[key]["limit"] > 0, (key, ratios)
    assert data["limits"]["cp_sync_seconds"] >= data["limits"]["cp_seconds"] > 0
    assert data["limits"]["walk_seconds"] > 0
    assert "against this machine's own limits" in r.stdout


def test_ratios_are_standby_over_each_figure_and_skip_what_is_missing() -> None:
    from bench.__main__ import MODES
    from bench.machine import Limits
    from bench.measure import Latency, Series, ToolResult
    from bench.ratios import ratios

    sb = ToolResult("standby", "standby", "live", initial_sync=Series([2.0, 2.2, 2.1]))
    sb.latency_rewrite = Latency("sequential", [0.005, 0.005, 0.005])
    rs = ToolResult("rsync", "rsync", "one-shot", initial_sync=Series([1.0]))
    lim = Limits(cp_sync_seconds=0.5, replace_dirsync_per_s=500.0)
    got = ratios([sb, rs], lim, MODES["smoke"])
    assert got["initial_sync"] == {"rsync": 2.1, "limit": 4.2}
    assert got["latency_rewrite_p50"] == {"limit": 2.5}  # 5 ms against one 2 ms replace
    assert "reconcile_same" not in got  # nobody measured it, and the walk was not measured either
    assert ratios([rs], lim, MODES["smoke"]) == {}  # no standby, no ratios


def test_a_profile_is_summarised_by_cumulative_and_own_time(tmp_path: Path) -> None:
    import cProfile

    from bench.profile import summarise

    def busy() -> int:
        return sum(i * i for i in range(200_000))

    prof = cProfile.Profile()
    prof.runcall(busy)
    out = tmp_path / "send.1.prof"
    prof.dump_stats(out)
    got = summarise([out, out], top=3)  # two files of one side add up
    assert len(got["cumulative"]) == 3 and len(got["own"]) == 3
    top = got["cumulative"][0]
    assert "busy" in top.function and top.calls == 2 and top.cumulative_seconds >= top.own_seconds
    assert summarise([]) == {"cumulative": [], "own": []}


def test_the_ha_rows_are_ratios_to_their_targets() -> None:
    from bench.ha import HaFigures
    from bench.ratios import ha_ratios

    fig = HaFigures(300, rto_s=11.4, switchover_downtime_s=1.5, rejoin_per_differ=1.0, rejoin_vs_rsync=4.0)
    got = ha_ratios(fig)
    assert got["failover_rto"] == {"target": 0.76}
    assert got["switchover_downtime"] == {"target": 0.3}
    assert got["rejoin_transfer"] == {"target": 0.6667, "rsync": 4.0}
    assert ha_ratios(HaFigures(300)) == {} and ha_ratios(None) == {}


@pytest.mark.timeout(180)
def test_the_smb_row_runs_a_pair_into_a_samba_share_next_to_a_local_folder() -> None:
    """``python -m bench.smb`` on a small tree: both targets' figures and their ratio, as numbers."""
    need_binary("smbd")
    r = subprocess.run(
        [sys.executable, "-m", "bench.smb", "--files", "150", "--samples", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(r.stdout[r.stdout.index("\n{") :])
    assert doc["local"]["initial_sync_s"] > 0 and doc["smb"]["initial_sync_s"] > 0
    assert doc["smb"]["latency_timeouts"] == 0 and doc["smb"]["latency_p50_s"] > 0
    assert isinstance(doc["ratios"]["smb_initial_sync"]["local"], float)
    assert "SMB share" in r.stdout
