"""Showing the results: the rich tables, the goals, the JSON file and the latency chart.

Owns: formatting figures, the ratios (standby's figure divided by each alternative's), the goal verdicts
(benchmark goals, shown next to the figures, never assertions), ``<timestamp>.json`` and ``<timestamp>.png``.

Must not: measure anything.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.ha import HaFigures
from bench.machine import Limits, Machine
from bench.measure import LargeFile, Latency, Series, Settings, Sustained, ToolResult, Trials
from bench.ratios import limit_rows, share

MB = 1e6
TIMES = "\u00d7"  # the multiplication sign
DASH = "\u2013"  # the en dash of a range
GOAL_FILES_INITIAL = 10_000
GOAL_FILES_MEMORY = 100_000
GOAL_LARGE_MIB = 1024
#: The large file's goal: at least this share of loopback TCP's throughput, measured in the same run.
GOAL_LARGE_SHARE = 0.5


# ---------------------------------------------------------------------------------------------------------
# Formatting.


def fmt_time(v: float | None) -> str:
    if v is None:
        return "—"
    if math.isinf(v):
        return "timed out"
    if v < 0.001:
        return f"{v * 1e3:.2f} ms"
    if v < 0.1:
        return f"{v * 1e3:.1f} ms"
    if v < 1:
        return f"{v * 1e3:.0f} ms"
    return f"{v:.2f} s"


def fmt_num(v: float | None, unit: str = "", digits: int = 1) -> str:
    return "—" if v is None else f"{v:,.{digits}f}{unit}"


def fmt_ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return ""
    return f"{TIMES}{a / b:.2f}"


@dataclass
class Cell:
    text: str
    value: float | None = None
    sub: str = ""


def series_cell(s: Series | None, fmt: Callable[[float | None], str] = fmt_time) -> Cell | None:
    if s is None or not s.values:
        return None
    sub = f"{fmt(s.min)}{DASH}{fmt(s.max)}" if len(s.values) > 1 else ""
    return Cell(fmt(s.median), s.median, sub)


def trials_cell(t: Trials | None, what: str) -> Cell | None:
    if t is None:
        return None
    extra = f", {t.same_second} same-second" if t.same_second is not None else ""
    return Cell(f"{t.bad} of {t.trials}", None, f"{what}{extra}")


@dataclass
class Row:
    label: str
    cells: dict[str, Cell | None]
    ratio: bool = True


def _lat(r: ToolResult, kind: str) -> Latency | None:
    return r.latency_new if kind == "new" else r.latency_rewrite


def _lat_cell(r: ToolResult, kind: str, q: str) -> Cell | None:
    lat = _lat(r, kind)
    if lat is None:
        return None
    v: float | None = getattr(lat, q)
    sub = f"{len(lat.samples)} samples" + (f", {lat.timeouts} timed out" if lat.timeouts else "")
    if lat.method != "sequential":
        sub += f", {lat.method}"
    return Cell(fmt_time(v), v, sub)


def _sum(d: dict[str, float]) -> float | None:
    return sum(d.values()) if d else None


def _cpu_cell(d: dict[str, Series]) -> Cell | None:
    if not d:
        return None
    total = sum(s.median or 0.0 for s in d.values())
    parts = ", ".join(f"{k} {s.median or 0:.2f}" for k, s in d.items()) if len(d) > 1 else ""
    return Cell(f"{total:.2f} s", total, parts)


def _rss_cell(r: ToolResult) -> Cell | None:
    if not r.peak_rss:
        return None
    top = max(r.peak_rss.values())
    parts = ", ".join(f"{k} {v / MB:.0f}" for k, v in r.peak_rss.items())
    return Cell(f"{top / MB:.0f} MB", top, parts)


def _large_cell(r: ToolResult) -> Cell | None:
    lf = r.large_file
    if lf is None or lf.seconds is None:
        return None
    return Cell(fmt_time(lf.seconds), lf.seconds, f"{lf.mib_per_s or 0:,.0f} MiB/s")


def _large_share_cell(r: ToolResult, rate: float) -> Cell | None:
    v = share(r.large_file.mib_per_s if r.large_file else None, rate)
    return None if v is None else Cell(f"{100 * v:.0f} %", v)


def _large_cpu_cell(r: ToolResult) -> Cell | None:
    lf = r.large_file
    if lf is None or lf.seconds is None or not lf.cpu:
        return None
    total = sum(lf.cpu.values())
    parts = ", ".join(f"{k} {v:.2f}" for k, v in lf.cpu.items()) if len(lf.cpu) > 1 else ""
    return Cell(f"{total:.2f} s", total, parts)


def _large_rss_cell(r: ToolResult) -> Cell | None:
    lf = r.large_file
    if lf is None or lf.seconds is None or not lf.peak_rss:
        return None
    top = max(lf.peak_rss.values())
    parts = ", ".join(f"{k} {v / MB:.0f}" for k, v in lf.peak_rss.items())
    since = "" if lf.rss_since == "row" else f" (since {lf.rss_since})"
    return Cell(f"{top / MB:.0f} MB", top, parts + since)


def _large_rows(
    row: Callable[..., Row], results: Sequence[ToolResult], settings: Settings, limits: Limits | None
) -> list[Row]:
    if not settings.big_mib:
        return []

    def seconds(fn: Callable[[LargeFile], float | None]) -> Callable[[ToolResult], Cell | None]:
        def cell(r: ToolResult) -> Cell | None:
            v = fn(r.large_file) if r.large_file is not None else None
            return None if v is None else Cell(fmt_time(v), v)

        return cell

    rows = [
        row(
            f"one large file, {settings.big_mib:,} MiB: close → on the replica (one-shot: one run)",
            _large_cell,
        ),
    ]
    if limits is not None:
        for label, rate in (
            ("loopback TCP", limits.loopback_mib_per_s),
            ("durable disk write", limits.disk_write_mib_per_s),
        ):
            if rate > 0:
                rows.append(
                    row(
                        f"  share of {label} ({rate:,.0f} MiB/s)",
                        lambda r, v=rate: _large_share_cell(r, v),
                        False,
                    )
                )
    rows += [
        row("  time to write it (the writer alone)", seconds(lambda lf: lf.write_seconds), False),
        row("CPU seconds, one large file", _large_cpu_cell),
        row("peak RSS, one large file (per process in MB)", _large_rss_cell),
    ]
    return rows


def build_rows(results: Sequence[ToolResult], settings: Settings, limits: Limits | None = None) -> list[Row]:
    def row(label: str, fn: Callable[[ToolResult], Cell | None], ratio: bool = True) -> Row:
        return Row(label, {r.name: fn(r) for r in results}, ratio)

    n = settings.reconcile_changes
    rows = [
        row("initial sync into an empty replica", lambda r: series_cell(r.initial_sync)),
        row("reconcile, nothing changed (standby: restart)", lambda r: series_cell(r.reconcile_same)),
        row(f"reconcile, {n} files changed (standby: restart)", lambda r: series_cell(r.reconcile_changed)),
        row("  standby's own reconcile time (from its log)", lambda r: series_cell(r.reconcile_internal)),
        row("standby verify, nothing changed", lambda r: series_cell(r.verify)),
    ]
    for kind, what in (("new", "new file"), ("rewrite", "rewritten file")):
        for q in ("p50", "p99", "max"):
            rows.append(row(f"latency, {what}: {q}", lambda r, k=kind, qq=q: _lat_cell(r, k, qq)))  # type: ignore[misc]
    rows += [
        row(f"churn, {settings.churn_writes} rewrites: last write → identical", _churn_cell),
        row("  first write → identical", lambda r: series_cell(r.churn.total) if r.churn else None),
        row(
            "  time to write them (the writer alone)",
            lambda r: series_cell(r.churn.write_seconds) if r.churn else None,
            ratio=False,
        ),
        row(
            f"sustained {settings.sustained_rate:,.0f}/s for {settings.sustained_seconds:g} s: largest lag",
            _sustained_lag,
        ),
        row("  achieved rate", _sustained_rate, ratio=False),
        row(
            f"half file seen (torn write, {HALF_MS} ms pause)", lambda r: trials_cell(r.torn, "trials"), False
        ),
        row(
            "update lost (same-size rewrite, same second)",
            lambda r: trials_cell(r.lost_same_second, "trials"),
            False,
        ),
        row(
            "update lost (same-size rewrite, same mtime)",
            lambda r: trials_cell(r.lost_same_mtime, "trials"),
            False,
        ),
        row("CPU seconds, initial sync", lambda r: _cpu_cell(r.cpu_initial)),
        row(f"CPU seconds, churn of {settings.churn_writes}", lambda r: _cpu_cell(r.cpu_churn)),
        row("CPU % of one core, sustained", _sustained_cpu),
        row(f"CPU % of one core, idle ({settings.idle_seconds:g} s)", _idle_cell),
        row("peak RSS (largest process; per process in MB)", _rss_cell),
        *_large_rows(row, results, settings, limits),
    ]
    return [r for r in rows if any(c is not None for c in r.cells.values())]


HALF_MS = 200


def _churn_cell(r: ToolResult) -> Cell | None:
    c = r.churn
    if c is None:
        return None
    if not c.stale:
        return series_cell(c.after_last)
    never = f"never in {len(c.stale)} of {len(c.stale) + len(c.after_last.values)} reps"
    cell = series_cell(c.after_last)
    sub = f"{never} ({max(c.stale)} files stale)"
    return Cell(cell.text if cell else "never", cell.value if cell else None, sub)


def _sustained_lag(r: ToolResult) -> Cell | None:
    s = r.sustained
    if s is None or s.max_lag is None:
        return None
    if s.stale:
        return Cell("never", None, f"{s.stale} files stayed stale")
    sub = f"probes {len(s.probe_lags)}, catch-up {fmt_time(s.catch_up)}"
    if s.probe_timeouts:
        sub += f", {s.probe_timeouts} probes timed out"
    return Cell(fmt_time(s.max_lag), s.max_lag, sub)


def _sustained_rate(r: ToolResult) -> Cell | None:
    s = r.sustained
    if s is None or not s.changes:
        return None
    return Cell(f"{s.achieved_rate:,.0f}/s", s.achieved_rate, f"{s.changes:,} changes")


def _sustained_cpu(r: ToolResult) -> Cell | None:
    s = r.sustained
    if s is None or not s.cpu_percent:
        return None
    total = sum(s.cpu_percent.values())
    parts = ", ".join(f"{k} {v:.0f}" for k, v in s.cpu_percent.items()) if len(s.cpu_percent) > 1 else ""
    return Cell(f"{total:.0f} %", total, parts)


def _idle_cell(r: ToolResult) -> Cell | None:
    if not r.idle_cpu_percent:
        return None
    total = sum(r.idle_cpu_percent.values())
    parts = (
        ", ".join(f"{k} {v:.2f}" for k, v in r.idle_cpu_percent.items())
        if len(r.idle_cpu_percent) > 1
        else ""
    )
    return Cell(f"{total:.2f} %", total, parts)


# ---------------------------------------------------------------------------------------------------------
# Goals.


@dataclass
class Goal:
    goal: str
    measured: str
    met: bool | None  # None: not measured in this run
    verdict: str


def _by_name(results: Sequence[ToolResult], name: str) -> ToolResult | None:
    return next((r for r in results if r.name == name), None)


def _large_goal(sb: ToolResult, settings: Settings, limits: Limits | None) -> Goal:
    """One large file, durable, at ``GOAL_LARGE_SHARE`` or more of loopback TCP's throughput."""
    at = "" if settings.big_mib == GOAL_LARGE_MIB else f" (this run: {settings.big_mib:,} MiB)"
    goal = f"one large file, 1 GiB, durable: ≥ {100 * GOAL_LARGE_SHARE:.0f}% of loopback TCP{at}"
    lf = sb.large_file
    mine = lf.mib_per_s if lf is not None else None
    rate = limits.loopback_mib_per_s if limits is not None else 0.0
    v = share(mine, rate)
    if mine is None or v is None:
        why = "--big-mib 0" if not settings.big_mib else "skipped or failed; see the notes"
        return Goal(goal, "—", None, f"not measured ({why})")
    shown = f"{mine:,.0f} MiB/s = {100 * v:.0f} % of {rate:,.0f} MiB/s"
    ok = v >= GOAL_LARGE_SHARE
    miss = f"missed: {100 * v:.0f} % (needs {GOAL_LARGE_SHARE / v:.1f}{TIMES} the throughput)"
    return Goal(goal, shown, ok, "met" if ok else miss)


def evaluate_goals(
    results: Sequence[ToolResult], settings: Settings, limits: Limits | None = None
) -> list[Goal]:
    goals: list[Goal] = []
    sb = _by_name(results, "standby")
    if sb is None:
        return goals
    at = "" if settings.files == GOAL_FILES_INITIAL else f" (this run: {settings.files:,} files)"
    t_sb = sb.initial_sync.median if sb.initial_sync else None
    for name, goal, target, lower in (
        ("rsync", f"initial sync, 10k files: standby ÷ rsync (no fsync) ≤ 1.0{at}", 1.0, True),
        ("rsync --fsync", f"initial sync, 10k files: ≥ 4{TIMES} faster than rsync --fsync{at}", 4.0, False),
    ):
        alt = _by_name(results, name)
        t_alt = alt.initial_sync.median if alt and alt.initial_sync else None
        if t_sb is None or t_alt is None:
            goals.append(Goal(goal, "—", None, f"not measured ({name} missing or failed)"))
            continue
        v = t_sb / t_alt if lower else t_alt / t_sb
        shown = f"standby {fmt_time(t_sb)} vs {fmt_time(t_alt)}: " + (
            f"ratio {v:.2f}" if lower else f"{v:.2f}{TIMES} faster"
        )
        ok = v <= target if lower else v >= target
        miss = (
            f"missed: {v:.2f} > {target:g} (standby {v / target:.1f}{TIMES} the target time)"
            if lower
            else f"missed: {v:.2f}{TIMES} instead of ≥ {target:g}{TIMES} "
            f"(needs {target / v:.1f}{TIMES} less time)"
        )
        goals.append(Goal(goal, shown, ok, "met" if ok else miss))
    for q, limit in (("p50", 0.005), ("p99", 0.025)):
        vals = {k: getattr(_lat(sb, k), q) if _lat(sb, k) else None for k in ("new", "rewrite")}
        present = [v for v in vals.values() if v is not None]
        shown = ", ".join(f"{k} {fmt_time(v)}" for k, v in vals.items())
        if not present:
            goals.append(Goal(f"latency {q} ≤ {fmt_time(limit)}", "—", None, "not measured"))
            continue
        worst = max(present)
        ok = worst <= limit
        if ok:
            verdict = "met"
        elif math.isinf(worst):
            verdict = "missed: changes never arrived"
        else:
            verdict = f"missed by {fmt_time(worst - limit)} ({worst / limit:.2f}{TIMES} the target)"
        goals.append(Goal(f"latency {q} ≤ {fmt_time(limit)}", shown, ok, verdict))
    c = sb.churn.after_last if sb.churn else None
    if sb.churn is not None and sb.churn.stale:
        goals.append(
            Goal(
                f"{settings.churn_writes:,} rewrites identical within 0.5 s of the last write",
                f"never identical in {len(sb.churn.stale)} repetition(s)",
                False,
                "missed: the replica did not catch up",
            )
        )
    elif c is None or c.median is None:
        goals.append(
            Goal("1,000 rewrites identical within 0.5 s of the last write", "—", None, "not measured")
        )
    else:
        ok = c.median <= 0.5
        goals.append(
            Goal(
                f"{settings.churn_writes:,} rewrites identical within 0.5 s of the last write",
                f"median {fmt_time(c.median)} (worst {fmt_time(c.max)})",
                ok,
                "met" if ok else f"missed by {fmt_time(c.median - 0.5)}",
            )
        )
    s = sb.sustained
    if s is None or s.max_lag is None:
        goals.append(Goal("sustained 2,000 changes/s with lag < 1 s", "—", None, "not measured"))
    else:
        rate_ok = s.achieved_rate >= 0.95 * s.target_rate
        ok = rate_ok and s.max_lag < 1.0
        why = []
        if not rate_ok:
            why.append(f"the writer reached only {s.achieved_rate:,.0f}/s")
        if s.stale:
            why.append(f"never caught up ({s.stale} files stale)")
        elif s.max_lag >= 1.0:
            why.append(f"lag missed by {fmt_time(s.max_lag - 1.0)}")
        goals.append(
            Goal(
                f"sustained {s.target_rate:,.0f} changes/s ({s.seconds:g} s) with lag < 1 s",
                f"{s.achieved_rate:,.0f}/s, largest lag "
                + ("never caught up" if s.stale else fmt_time(s.max_lag)),
                ok,
                "met" if ok else "missed: " + "; ".join(why),
            )
        )
    if sb.torn is None:
        goals.append(Goal("zero half files", "—", None, "not measured"))
    else:
        ok = sb.torn.bad == 0
        goals.append(
            Goal("zero half files", f"{sb.torn.bad} of {sb.torn.trials}", ok, "met" if ok else "missed")
        )
    lost = [t for t in (sb.lost_same_second, sb.lost_same_mtime) if t is not None]
    if not lost:
        goals.append(Goal("zero lost updates", "—", None, "not measured"))
    else:
        bad, total = sum(t.bad for t in lost), sum(t.trials for t in lost)
        goals.append(
            Goal("zero lost updates", f"{bad} of {total}", bad == 0, "met" if bad == 0 else "missed")
        )
    if sb.peak_rss:
        top = max(sb.peak_rss.values())
        shown = f"{top / MB:.0f} MB at {settings.files:,} files"
        if settings.files >= GOAL_FILES_MEMORY:
            ok = top < 150 * MB
            goals.append(
                Goal(
                    "memory < 150 MB for 100,000 files",
                    shown,
                    ok,
                    "met" if ok else f"missed by {top / MB - 150:.0f} MB",
                )
            )
        else:
            goals.append(
                Goal(
                    "memory < 150 MB for 100,000 files",
                    shown,
                    None,
                    "not tested at this size (run with --files 100000)"
                    + ("; already over at this size" if top >= 150 * MB else ""),
                )
            )
    idle = _sum(sb.idle_cpu_percent)
    if idle is None:
        goals.append(Goal("idle CPU < 1%", "—", None, "not measured"))
    else:
        ok = idle < 1.0
        goals.append(
            Goal(
                "idle CPU < 1%",
                f"{idle:.2f} % of one core",
                ok,
                "met" if ok else f"missed by {idle - 1:.2f} points",
            )
        )
    goals.append(_large_goal(sb, settings, limits))
    return goals


# ---------------------------------------------------------------------------------------------------------
# Printing.


def print_report(
    console: Console,
    results: Sequence[ToolResult],
    settings: Settings,
    machine: Machine,
    limits: Limits | None,
    files: int,
    total_bytes: int,
    goals: Sequence[Goal],
    skipped: Sequence[str],
) -> None:
    m = Table(title="machine", show_header=False, title_justify="left")
    m.add_column("what", style="bold")
    m.add_column("value")
    m.add_row("cores", f"{machine.cores} ({machine.cpu_model})")
    m.add_row("memory", f"{machine.memory_gib:g} GiB")
    m.add_row("kernel", machine.kernel)
    m.add_row("python", machine.python)
    m.add_row("disk", machine.disk)
    m.add_row(
        "load average (1, 5, 15 min)",
        f"at start {', '.join(f'{v:.2f}' for v in machine.load_start)}; "
        f"at end {', '.join(f'{v:.2f}' for v in machine.load_end)}"
        + (
            " [red](the machine was busy with other work: figures are slower and noisier)[/]"
            if machine.busy()
            else ""
        ),
    )
    for tool, version in machine.tools.items():
        m.add_row(tool, version)
    if limits is not None:
        m.add_row(
            "cp -a of the tree", f"{fmt_time(limits.cp_seconds)} ({limits.cp_files_per_s:,.0f} files/s)"
        )
        m.add_row("  then sync (durable)", fmt_time(limits.cp_sync_seconds))
        m.add_row("walk + stat of the tree", fmt_time(limits.walk_seconds))
        m.add_row("fsynced replace (temp + fsync + rename)", f"{limits.replace_per_s:,.0f} files/s")
        m.add_row("  + fsync of the folder (standby's apply)", f"{limits.replace_dirsync_per_s:,.0f} files/s")
        if limits.disk_write_mib:
            m.add_row(
                f"durable write (one file, {limits.disk_write_mib} MiB + fsync)",
                f"{limits.disk_write_mib_per_s:,.0f} MiB/s",
            )
        m.add_row(f"loopback TCP ({limits.loopback_mib} MiB)", f"{limits.loopback_mib_per_s:,.0f} MiB/s")
    console.print(m)

    t = Table(
        title=f"standby vs alternatives: {files:,} files, {total_bytes / MB:.1f} MB, mode {settings.mode}, "
        f"{settings.reps} rep(s), median (min{DASH}max)",
        caption=f"{TIMES}r after an alternative's figure = standby's figure ÷ that figure "
        "(below 1: standby takes less time / CPU / memory)",
        title_justify="left",
        show_lines=True,
    )
    t.add_column("metric", max_width=34)
    for r in results:
        t.add_column(r.label, max_width=26)
    sb = _by_name(results, "standby")
    for row in build_rows(results, settings, limits):
        cells = []
        base = row.cells.get("standby") if sb is not None else None
        for r in results:
            c = row.cells.get(r.name)
            if c is None:
                cells.append("—")
                continue
            text = c.text
            if row.ratio and r.name != "standby" and base is not None:
                ratio = fmt_ratio(base.value, c.value)
                text = f"{text} [cyan]{ratio}[/]" if ratio else text
            cells.append(text + (f"\n[dim]{c.sub}[/]" if c.sub else ""))
        t.add_row(row.label, *cells)
    console.print(t)

    if limits is not None:
        lt = Table(
            title="standby against this machine's own limits (measured in this run)",
            caption="ratio = standby ÷ limit (1 would be as fast as the machine allows)",
            title_justify="left",
        )
        for col in ("metric", "standby", "limit", "", "ratio"):
            lt.add_column(col)
        for label, mine, what, lim, quotient in limit_rows(results, limits, settings):
            shown = "—" if quotient is None else f"{quotient:.2f}"
            lt.add_row(label, fmt_time(mine), what, fmt_time(lim), shown)
        console.print(lt)
    missing = [t for t in ("rsync", "lsyncd") if machine.tools.get(t) == "not installed"]
    if missing:
        console.print(
            f"[yellow]no {' or '.join(missing)} here: compared with the machine's limits only; "
            f"apt-get install {' '.join(missing)} (or your system's package) for the side-by-side rows[/]"
        )

    g = Table(title="goals (benchmark goals, not assertions)", title_justify="left")
    g.add_column("goal", max_width=48)
    g.add_column("measured", max_width=44)
    g.add_column("verdict", max_width=48)
    for goal in goals:
        style = "green" if goal.met else ("red" if goal.met is False else "yellow")
        g.add_row(goal.goal, goal.measured, f"[{style}]{goal.verdict}[/]")
    console.print(g)

    for line in skipped:
        console.print(f"[yellow]skipped:[/] {line}")
    for r in results:
        for e in r.errors:
            console.print(f"[red]{r.name}: could not measure: {e}[/]")
        for n in r.notes:
            console.print(f"[yellow]{r.name}: {n}[/]")
        for tr, what in ((r.torn, "half file"), (r.lost_same_second, "lost"), (r.lost_same_mtime, "lost")):
            if tr is not None and tr.examples:
                console.print(f"{r.name}: {what}, e.g. {tr.examples[0]}")


def print_ha(console: Console, ha: HaFigures) -> None:
    """The HA rows, each next to its target."""
    t = Table(
        title=f"HA on two standby run agents ({ha.files:,} files; both services sampled every 50 ms)",
        title_justify="left",
    )
    for col in ("figure", "measured", "target", "verdict"):
        t.add_column(col)

    def verdict(v: float | None, target: float) -> str:
        return "—" if v is None else "[green]met[/]" if v <= target else "[red]missed[/]"

    t.add_row(
        f"failover RTO (service killed; failover_after {ha.failover_after:g} s)",
        fmt_time(ha.rto_s),
        f"<= {ha.rto_target_s:g} s",
        verdict(ha.rto_s, ha.rto_target_s),
    )
    t.add_row("  old active passive again, trees equal", fmt_time(ha.rejoined_s), "", "")
    t.add_row(
        "switchover downtime (no service running)",
        fmt_time(ha.switchover_downtime_s),
        f"<= {ha.switchover_target_s:g} s",
        verdict(ha.switchover_downtime_s, ha.switchover_target_s),
    )
    per = ha.rejoin_per_differ
    t.add_row(
        f"rejoin: changes received per changed file ({ha.rejoin_differ} of {ha.rejoin_files:,} changed)",
        "—" if per is None else f"{per:.2f} ({ha.rejoin_transferred} changes)",
        f"<= {ha.rejoin_target_per_differ:g}",
        verdict(per, ha.rejoin_target_per_differ),
    )
    t.add_row(
        "  rejoin to identical, vs rsync --checksum",
        fmt_time(ha.rejoin_converge_s),
        f"rsync {fmt_time(ha.rejoin_rsync_s)}",
        "—" if ha.rejoin_vs_rsync is None else f"{ha.rejoin_vs_rsync:.2f}x",
    )
    t.add_row(
        "both services ever ran at once",
        "yes" if ha.both_ran else "no",
        "no",
        verdict(1.0 if ha.both_ran else 0.0, 0.5),
    )
    console.print(t)
    for e in ha.errors:
        console.print(f"[red]HA: {e}[/]")


# ---------------------------------------------------------------------------------------------------------
# Files.


def jsonable(obj: Any) -> Any:
    """Dataclasses to dicts (with their derived figures: median, p99, ...), paths to strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        derived = {
            Series: ("median", "min", "max"),
            Latency: ("p50", "p99", "max"),
            Sustained: ("max_lag",),
            LargeFile: ("mib_per_s",),
        }.get(type(obj), ())
        for name in derived:
            out[name] = getattr(obj, name)
        return out
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(doc), indent=1, ensure_ascii=False) + "\n", "utf-8")


def write_chart(path: Path, results: Sequence[ToolResult], title: str) -> bool:
    """Latency distributions (new file, rewritten file, sustained-rate probes) as cumulative curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, Callable[[ToolResult], list[float]]]] = [
        ("new file", lambda r: r.latency_new.samples if r.latency_new else []),
        ("rewritten file", lambda r: r.latency_rewrite.samples if r.latency_rewrite else []),
        ("sustained-rate probes (lag)", lambda r: r.sustained.probe_lags if r.sustained else []),
    ]
    if not any(fn(r) for r in results for _, fn in panels):
        return False
    fig, axes = plt.subplots(1, 3, figsize=(16, 5), sharey=True)
    for ax, (name, fn) in zip(axes, panels, strict=True):
        for r in results:
            xs = sorted(v * 1e3 for v in fn(r))
            if not xs:
                continue
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, where="post", label=f"{r.label} (n={len(xs)})")
        ax.set_xscale("log")
        ax.set_xlabel("milliseconds (log scale)")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        if name != "sustained-rate probes (lag)":
            ax.axvline(5, color="green", linestyle="--", linewidth=1, label="goal p50 ≤ 5 ms")
            ax.axvline(25, color="orange", linestyle="--", linewidth=1, label="goal p99 ≤ 25 ms")
        else:
            ax.axvline(1000, color="orange", linestyle="--", linewidth=1, label="goal lag < 1 s")
        ax.legend(fontsize=8, loc="lower right" if name != "sustained-rate probes (lag)" else "upper left")
    axes[0].set_ylabel("share of samples at or below")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
