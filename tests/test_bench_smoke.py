"""The benchmark's smallest mode runs end to end (a smoke test: no timing is asserted)."""

from __future__ import annotations

import argparse
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
    # One large file (32 MiB in --smoke): every tool's time and throughput, standby's CPU per side, the
    # ratios (as times), the shares of the machine's two rates, and the goal (judged, met or not).
    assert data["settings"]["big_mib"] == 32 and data["limits"]["disk_write_mib"] == 32
    assert data["limits"]["disk_write_mib_per_s"] > 0
    for tool in data["tools"]:
        big = tool["large_file"]
        if tool["name"].startswith("lsyncd"):
            assert big is None  # not durable, and not asked: standby against rsync and rsync --fsync
            continue
        assert big["mib"] == 32 and big["seconds"] > 0, (tool["name"], big)
        assert big["mib_per_s"] == pytest.approx(32 / big["seconds"])
    big = standby["large_file"]
    assert big["cpu"]["sender"] > 0 and big["cpu"]["receiver"] > 0, big
    assert big["peak_rss"]["sender"] > 0 and big["rss_since"] == "row", big
    rsync = next(t for t in data["tools"] if t["name"] == "rsync")["large_file"]
    assert ratios["large_file"]["rsync"] == pytest.approx(big["seconds"] / rsync["seconds"], rel=1e-3)
    assert isinstance(ratios["large_file"]["limit"], float) and ratios["large_file"]["limit"] > 0
    share, limits = data["shares"]["large_file"], data["limits"]
    assert share["loopback_tcp"] == pytest.approx(big["mib_per_s"] / limits["loopback_mib_per_s"], 1e-3)
    assert share["durable_disk_write"] == pytest.approx(
        big["mib_per_s"] / limits["disk_write_mib_per_s"], 1e-3
    )
    goal = next(g for g in data["goals"] if g["goal"].startswith("one large file"))
    assert goal["met"] is (share["loopback_tcp"] >= 0.5), goal
    assert "one large file, 32 MiB" in r.stdout and "share of loopback TCP" in r.stdout


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


def test_the_large_file_is_a_time_ratio_and_a_share_of_each_machine_rate() -> None:
    from dataclasses import replace

    from bench.__main__ import MODES
    from bench.machine import Limits
    from bench.measure import LargeFile, ToolResult
    from bench.ratios import ratios, shares

    settings = replace(MODES["quick"], big_mib=1024)
    sb = ToolResult("standby", "standby", "live", large_file=LargeFile(1024, seconds=4.0))
    rs = ToolResult("rsync", "rsync", "one-shot", large_file=LargeFile(1024, seconds=5.0))
    lim = Limits(loopback_mib_per_s=2048.0, disk_write_mib=512, disk_write_mib_per_s=512.0)
    # A time, like every other ratio (below 1: standby is faster); the limit is 1,024 MiB at the slower
    # of the two rates (512 MiB/s: 2 s).
    assert ratios([sb, rs], lim, settings)["large_file"] == {"rsync": 0.8, "limit": 2.0}
    assert sb.large_file is not None and sb.large_file.mib_per_s == 256.0
    assert shares([sb, rs], lim) == {"large_file": {"loopback_tcp": 0.125, "durable_disk_write": 0.5}}
    # Without the durable write: no limit ratio (it needs both rates), a share of loopback only.
    no_disk = Limits(loopback_mib_per_s=2048.0)
    assert ratios([sb, rs], no_disk, settings)["large_file"] == {"rsync": 0.8}
    assert shares([sb], no_disk) == {"large_file": {"loopback_tcp": 0.125}}
    assert shares([rs], lim) == {} and shares([sb], None) == {}
    failed = ToolResult("standby", "standby", "live", large_file=LargeFile(1024))  # never arrived
    assert "large_file" not in ratios([failed, rs], lim, settings) and shares([failed], lim) == {}


def test_the_large_file_goal_is_half_of_loopback_tcp() -> None:
    from dataclasses import replace

    from bench.__main__ import MODES
    from bench.machine import Limits
    from bench.measure import LargeFile, Settings, ToolResult
    from bench.report import TIMES, evaluate_goals

    quick = MODES["quick"]
    lim = Limits(loopback_mib_per_s=1000.0, disk_write_mib_per_s=800.0)

    def goal(seconds: float | None, settings: Settings = quick) -> tuple[str, bool | None, str]:
        sb = ToolResult("standby", "standby", "live", large_file=LargeFile(1024, seconds=seconds))
        g = next(g for g in evaluate_goals([sb], settings, lim) if g.goal.startswith("one large file"))
        return g.goal, g.met, g.verdict

    text, met, verdict = goal(2.0)  # 512 MiB/s of 1,000
    assert met is True and verdict == "met" and "50%" in text and "this run" not in text
    text, met, verdict = goal(4.0)  # 256 MiB/s: a quarter
    assert met is False and verdict == f"missed: 26 % (needs 2.0{TIMES} the throughput)"
    assert goal(None)[1] is None  # skipped or failed: not judged
    off = replace(quick, big_mib=0)
    assert goal(None, off)[1:] == (None, "not measured (--big-mib 0)")
    smoke = replace(quick, big_mib=32)
    assert "(this run: 32 MiB)" in goal(0.05, smoke)[0]


def test_big_mib_sets_the_large_file_row_and_zero_turns_it_off() -> None:
    from bench.__main__ import parser, settings_from

    def big(*argv: str) -> int:
        return settings_from(parser().parse_args(list(argv))).big_mib

    assert big() == 1024 and big("--quick") == 1024 and big("--smoke") == 32
    assert big("--smoke", "--big-mib", "0") == 0 and big("--big-mib", "64") == 64
    settings = settings_from(parser().parse_args(["--big-mib", "2048"]))
    assert settings.disk_write_mib == 512  # the durable-write limit is capped: a second or two
    with pytest.raises(SystemExit):
        parser().parse_args(["--big-mib", "-1"])


def test_a_wait_without_confirm_trusts_size_and_mtime_and_the_hash_reads_in_pieces(tmp_path: Path) -> None:
    import hashlib
    import os

    from bench.trees import ReplicaTimeout, file_sha256, wait_identical

    src, rep = tmp_path / "src", tmp_path / "rep"
    src.mkdir()
    rep.mkdir()
    (src / "f").write_bytes(b"a" * 1000)
    (rep / "f").write_bytes(b"b" * 1000)  # same size, other bytes
    st = os.stat(src / "f")
    os.utime(rep / "f", ns=(st.st_atime_ns, st.st_mtime_ns))
    want: dict[str, tuple[int, int] | None] = {"f": (1000, st.st_mtime_ns)}
    assert wait_identical(src, rep, 5.0, want, confirm=False) > 0
    with pytest.raises(ReplicaTimeout):
        wait_identical(src, rep, 0.05, want)  # confirmed byte for byte: never identical
    assert file_sha256(src / "f", chunk=7) == hashlib.sha256(b"a" * 1000).hexdigest()
    assert file_sha256(src / "missing") is None


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


def test_an_ab_arm_is_an_engine_and_a_setting_and_bad_arms_say_what_is_wrong() -> None:
    from bench.ab import Arm, parse_arm

    assert parse_arm("worktree") == Arm("worktree")
    assert parse_arm("head") == Arm("HEAD")
    assert parse_arm("60e5a8e,keep_journal=off") == Arm("60e5a8e", False)
    assert str(parse_arm("HEAD,keep_journal=on")) == "HEAD,keep_journal=on"
    for bad, says in [
        ("", "no engine named"),
        (",keep_journal=on", "no engine named"),
        ("HEAD,keep_journal=maybe", "keep_journal=on or keep_journal=off"),
        ("HEAD,fsync=off", "'fsync=off'"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=says):
            parse_arm(bad)
