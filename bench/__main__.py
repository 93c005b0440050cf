"""``python -m bench``: the whole benchmark as one command. The composition root; imported by nothing.

Generates the workload, measures the machine's limits, runs every installed tool on the same tree in the
same run, prints the tables and writes ``bench/results/<timestamp>.json`` and ``.png``. Every process it
starts is stopped and every temporary folder removed in a ``finally``, also on Ctrl-C or SIGTERM.

Exit status: 0 when everything could be measured (missed goals do not fail the run), 1 when a
measurement failed, 2 on bad options, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console

from bench import measure, non_negative_int, positive_int
from bench.ha import HaFigures, measure_ha
from bench.machine import Limits, describe, measure_limits
from bench.measure import Context, Settings, ToolResult
from bench.procs import Registry
from bench.profile import print_profile, profiled_initial_sync
from bench.ratios import ha_ratios, ratios, shares
from bench.report import evaluate_goals, print_ha, print_report, write_chart, write_json
from bench.runners import Lsyncd, RsyncDaemon, RsyncPush, Standby, lsyncd_default_delay
from bench.smb import DEFAULT_FILES as SMB_FILES
from bench.smb import SmbFigures, measure_smb, print_smb
from bench.smb import available as smb_available
from bench.workload import DEFAULT_FILES, generate

RESULTS = Path(__file__).resolve().parent / "results"
TOOLS = ("standby", "rsync", "rsync-fsync", "lsyncd0", "lsyncd")

MODES: dict[str, Settings] = {
    "full": Settings(
        mode="full",
        files=DEFAULT_FILES,
        seed=1,
        reps=5,
        latency_samples=200,
        churn_writes=1000,
        reconcile_changes=100,
        sustained_rate=2000,
        sustained_seconds=10,
        idle_seconds=5,
        trials=30,
        loopback_mib=256,
        fsync_seconds=2,
        settle_timeout=60,
        big_mib=1024,
    ),
    "quick": Settings(
        mode="quick",
        files=DEFAULT_FILES,
        seed=1,
        reps=2,
        latency_samples=50,
        churn_writes=1000,
        reconcile_changes=100,
        sustained_rate=2000,
        sustained_seconds=3,
        idle_seconds=5,
        trials=10,
        loopback_mib=256,
        fsync_seconds=1,
        settle_timeout=30,
        big_mib=1024,
    ),
    "smoke": Settings(
        mode="smoke",
        files=300,
        seed=1,
        reps=1,
        latency_samples=10,
        churn_writes=200,
        reconcile_changes=20,
        sustained_rate=2000,
        sustained_seconds=1,
        idle_seconds=2,
        trials=4,
        loopback_mib=64,
        fsync_seconds=0.5,
        settle_timeout=8,
        big_mib=32,
    ),
}

EPILOG = """\
modes:
  (default)  full: 10,000 files, 5 repetitions, 200 latency samples per kind, 10 s sustained rate,
             30 trials per known failure, one large file of 1,024 MiB. About 10 minutes on an idle
             machine.
  --quick    the same tree, 2 repetitions, 50 samples, 3 s sustained, 10 trials, the same large
             file. Under 5 minutes on an idle machine.
  --smoke    300 files, 1 repetition, 10 samples, 1 s sustained, 4 trials, a large file of 32 MiB;
             lsyncd's default delay is left out. Under 60 s: the CI smoke test.

tools (--tools, comma-separated; default all that are installed):
  standby      standby receive + standby send, separate processes on 127.0.0.1, fsync on
  rsync        rsync -a --delete into an rsync daemon on 127.0.0.1 (one-shot)
  rsync-fsync  the same with --fsync
  lsyncd0      lsyncd, default.rsync into the daemon, delay = 0
  lsyncd       lsyncd, default.rsync into the daemon, its default delay (15 s in lsyncd 2.2)

Results: a table on stdout, bench/results/<timestamp>.json and a latency chart <timestamp>.png beside
it. Goals are shown next to the figures; a missed goal does not fail the run. Exit status 1 means a
measurement could not be made.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark standby against rsync and lsyncd on a generated Synergy Join data folder: "
        "initial sync, reconciliation, change latency, churn, a sustained change rate, torn and lost "
        "writes, CPU and memory, all on this machine, in one run.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        action="store_true",
        help="fewer repetitions and samples: under 5 minutes on an otherwise idle 2-core machine",
    )
    mode.add_argument(
        "--smoke",
        action="store_true",
        help="the smallest run, a few hundred files, 1 repetition (< 60 s; CI)",
    )
    p.add_argument(
        "--files",
        type=positive_int,
        metavar="N",
        help="meeting files to generate, spread over 50 room folders (default: 10,000; 300 with --smoke); "
        "100000 is the size the memory goal is about",
    )
    p.add_argument("--seed", type=int, metavar="S", help="seed for the workload and every write (default: 1)")
    p.add_argument(
        "--reps",
        type=positive_int,
        metavar="R",
        help="repetitions of initial sync, reconciliation and churn "
        "(default: 5; 2 with --quick; 1 with --smoke)",
    )
    p.add_argument(
        "--samples",
        type=positive_int,
        metavar="N",
        help="latency samples per kind, new file and rewrite "
        "(default: 200; 50 with --quick; 10 with --smoke)",
    )
    p.add_argument(
        "--big-mib",
        type=non_negative_int,
        metavar="N",
        help="size of the one-large-file row in MiB, for standby, rsync and rsync --fsync (default: 1024; "
        "32 with --smoke; 0: no such row). Needs about 5 times N free under --tmp, else the row is skipped",
    )
    p.add_argument(
        "--tools",
        metavar="LIST",
        default=",".join(TOOLS),
        help=f"comma-separated subset of: {', '.join(TOOLS)} (default: all; missing ones are skipped)",
    )
    p.add_argument(
        "--tmp",
        type=Path,
        metavar="DIR",
        help="where the temporary folders go (default: the system's temp folder); the disk under it is "
        "what is measured",
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        default=RESULTS,
        help="where the JSON and PNG go (default: bench/results)",
    )
    p.add_argument("--no-chart", action="store_true", help="do not draw the PNG (no matplotlib needed)")
    p.add_argument(
        "--ha",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the HA rows: failover RTO, switchover downtime and rejoin transfer on two real agents, each "
        "next to its target (about a minute; default: on, off with --smoke)",
    )
    p.add_argument(
        "--smb",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the SMB row: initial sync and change latency into a Samba share on 127.0.0.1 next to a local "
        "folder, same run (2,000 files; needs Samba and root; default: on when they are there, off with "
        "--smoke)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="after the measurements, one more initial sync of standby with both sides under cProfile: the "
        "top functions per side go into the JSON (tools[standby].profile) and the report; the .prof files "
        "stay next to the JSON",
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the temporary folders (logs, trees) and say where"
    )
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    s = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
    changes: dict[str, Any] = {}
    if args.files is not None:
        changes["files"] = args.files
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.reps is not None:
        changes["reps"] = args.reps
    if args.samples is not None:
        changes["latency_samples"] = args.samples
    if args.big_mib is not None:
        changes["big_mib"] = args.big_mib
    return replace(s, **changes)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = settings_from(args)
    wanted = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in TOOLS]
    if unknown:
        print(
            f"python -m bench: unknown tool(s) {', '.join(unknown)}; known: {', '.join(TOOLS)}",
            file=sys.stderr,
        )
        return 2
    console = Console(width=max(Console().width, 150))
    started = time.perf_counter()

    def say(msg: str) -> None:
        console.print(f"[dim]{time.perf_counter() - started:6.1f}s[/] {msg}", highlight=False)

    signal.signal(signal.SIGTERM, _raise_interrupt)
    work = Path(tempfile.mkdtemp(prefix="standby-bench-", dir=args.tmp))
    registry = Registry()
    results: list[ToolResult] = []
    skipped: list[str] = []
    try:
        machine = describe(work)
        say(f"generating {settings.files:,} meeting files (seed {settings.seed}) in {work}")
        workload = generate(work / "pristine", settings.files, settings.seed)
        say(f"workload: {workload.files:,} files, {workload.total_bytes / 1e6:.1f} MB")
        say("measuring the machine's limits (cp -a, fsynced replace rate, durable write, loopback TCP)")
        measured = measure_limits(
            workload.root, work, settings.loopback_mib, settings.fsync_seconds, settings.disk_write_mib
        )
        limits: Limits | None = measured
        if not settings.big_mib:
            skipped.append("one large file: --big-mib 0")
        elif not measured.disk_write_mib:
            skipped.append(
                f"durable write limit: less than {settings.disk_write_mib} MiB and a margin free under {work}"
            )
        for line in skipped:
            say(f"[yellow]skipped:[/] {line}")
        ctx = Context(settings, registry, workload, work / "source", say)
        if machine.busy():
            say(
                f"[yellow]warning:[/] load average {machine.load_start[0]:.1f} on {machine.cores} cores: "
                "other work is running on this machine; the figures will be slower and noisier"
            )
        stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
        profile_out = args.out / f"{stamp}-profile" if args.profile else None
        results, tool_skips = run_tools(ctx, wanted, work, profile_out)
        skipped += tool_skips
        ha: HaFigures | None = None
        if args.ha if args.ha is not None else settings.mode != "smoke":
            say("[bold]HA[/]: two standby run agents, failover, switchover, rejoin")
            ha = measure_ha(work / "ha", min(settings.files, 2000), say)
        smb_figs: SmbFigures | None = None
        want_smb = args.smb if args.smb is not None else settings.mode != "smoke"
        if want_smb:
            why = smb_available()
            if why is None:
                say("[bold]SMB[/]: a pair into a Samba share and into a local folder")
                smb_figs = measure_smb(work / "smb", min(settings.files, SMB_FILES), 30, say)
            else:
                skipped.append(why)
                say(f"[yellow]skipped:[/] {why}")
        machine.load_end = os.getloadavg()
        goals = evaluate_goals(results, settings, limits)
        print_report(
            console, results, settings, machine, limits, workload.files, workload.total_bytes, goals, skipped
        )
        if ha is not None:
            print_ha(console, ha)
        if smb_figs is not None:
            print_smb(console, smb_figs)
        for r in results:
            if r.profile is not None:
                print_profile(console, r.profile)
        out = args.out / f"{stamp}.json"
        doc: dict[str, Any] = {
            "started": stamp,
            "seconds": round(time.perf_counter() - started, 1),
            "settings": settings,
            "machine": machine,
            "limits": limits,
            "workload": {
                "files": workload.files,
                "bytes": workload.total_bytes,
                "rooms": len(workload.rooms),
            },
            "tools": results,
            # standby ÷ each other tool and ÷ the machine's own limit, per metric, as numbers
            "ratios": {
                **ratios(results, limits, settings),
                **ha_ratios(ha),
                **(smb_figs.ratios() if smb_figs else {}),
            },
            # each tool's throughput as a share of the machine's (above 1 cannot be; higher is better)
            "shares": shares(results, limits),
            "ha": ha,
            "smb": smb_figs,
            "goals": goals,
            "skipped": skipped,
        }
        write_json(out, doc)
        say(f"results: {out}")
        if not args.no_chart:
            png = out.with_suffix(".png")
            title = (
                f"standby bench {stamp}: {workload.files:,} files, {machine.cores} cores, {machine.kernel}, "
                f"{machine.disk.split(' (')[0]}"
            )
            if write_chart(png, results, title):
                say(f"chart: {png}")
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        return 130
    finally:
        registry.stop_all()
        if args.keep:
            console.print(f"kept the temporary folders in {work}")
        else:
            say("removing the temporary folders")
            shutil.rmtree(work, ignore_errors=True)
    say(f"done in {time.perf_counter() - started:.0f} s")
    return 1 if any(r.errors for r in results) else 0


def run_tools(
    ctx: Context, wanted: list[str], work: Path, profile_out: Path | None = None
) -> tuple[list[ToolResult], list[str]]:
    """Measure each wanted tool that is installed, one after the other, on fresh copies of the tree; with
    ``profile_out``, then one profiled initial sync of standby (``--profile``)."""
    results: list[ToolResult] = []
    has_rsync = shutil.which("rsync") is not None
    has_lsyncd = shutil.which("lsyncd") is not None
    default_delay = lsyncd_default_delay() if has_lsyncd else None
    why_not: dict[str, str] = {}
    for name in wanted:
        if name in ("rsync", "rsync-fsync", "lsyncd0", "lsyncd") and not has_rsync:
            why_not[name] = f"{name}: rsync is not installed (apt-get install rsync)"
        elif name in ("lsyncd0", "lsyncd") and not has_lsyncd:
            why_not[name] = f"{name}: lsyncd is not installed (apt-get install lsyncd)"
        elif name == "lsyncd" and default_delay is None:
            why_not[name] = "lsyncd (default delay): could not read lsyncd's default delay"
        elif name == "lsyncd" and ctx.settings.mode == "smoke":
            why_not[name] = (
                f"lsyncd (default delay {default_delay:g} s): left out of --smoke, its delay does not fit "
                "the 60 s budget"
            )
    skipped = list(why_not.values())
    for line in skipped:
        ctx.say(f"[yellow]skipped:[/] {line}")
    todo = [n for n in wanted if n not in why_not]
    daemon: RsyncDaemon | None = None
    if any(n != "standby" for n in todo):
        modules = {n.replace("-", "_"): work / f"replica-{n}" for n in todo if n != "standby"}
        daemon = RsyncDaemon(ctx.registry, work / "rsyncd", modules)
        daemon.start()
    try:
        for name in todo:
            if name == "standby":
                replica = work / "replica-standby"
                sb = Standby(ctx.registry, work / "standby", ctx.source, replica)
                res = ToolResult("standby", "standby", "live")
                results.append(res)
                ctx.say("[bold]standby[/]")
                measure.measure_live(ctx, sb, replica, res)
                if profile_out is not None:
                    ctx.say("standby: one more initial sync, profiled (not measured)")
                    res.profile = profiled_initial_sync(ctx, sb, replica, profile_out)
            elif name in ("rsync", "rsync-fsync"):
                assert daemon is not None
                push = RsyncPush(
                    daemon, name.replace("-", "_"), name == "rsync-fsync", ctx.source, work / f"{name}.log"
                )
                res = ToolResult(push.name, push.name, "one-shot")
                results.append(res)
                ctx.say(f"[bold]{push.name}[/]")
                measure.measure_rsync(ctx, push, res)
            else:
                assert daemon is not None and default_delay is not None
                ls = Lsyncd(
                    ctx.registry,
                    work / name,
                    ctx.source,
                    daemon,
                    name,
                    0.0 if name == "lsyncd0" else None,
                    default_delay,
                )
                res = ToolResult(ls.name, ls.label, "live")
                results.append(res)
                ctx.say(f"[bold]{ls.label}[/]")
                measure.measure_live(ctx, ls, daemon.modules[name], res)
    finally:
        if daemon is not None:
            daemon.stop()
    return results, skipped


if __name__ == "__main__":
    sys.exit(main())
