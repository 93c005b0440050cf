"""``python -m bench.ab``: standby's initial sync, one engine or setting against another, interleaved.

An A/B measurement on one generated tree (``bench.workload``, 10,051 files by default): the initial sync of
``python -m bench`` (:func:`bench.measure.initial_sync_live`: empty replica and state, ``sync``, receiver
up untimed, clock from the sender's start until the replica is identical), run by arm A and arm B in turn,
A B A B ..., after one untimed warm-up pair. An arm is an engine and a setting: ``--a worktree --b HEAD``
compares the working tree's engine with the last commit's (any git revision works), and ``,keep_journal=off``
after either sets ``[receiver] keep_journal`` (``python -m bench.keep_journal_ab`` is that comparison:
``--a head --b head,keep_journal=off``). Each arm's ``engine/`` is copied when the run starts, so edits
made meanwhile never mix into the runs.

Per run: wall seconds, CPU seconds of the sender and the receiver up to "identical" (as the benchmark
counts them), and the same CPU up to the moment both processes are quiet again (the last group is
journaled after it is applied, so a little of the journaling can come after the replica is identical), the
bytes of the receiver's journal folder, the load average, and the CPU the rest of the machine used
meanwhile (``others cores``: someone's tests).

Output: a table of medians and spreads, the ratios A/B (of the medians, and the median of the ratios of
adjacent pairs), that summary as JSON on stdout, and every raw figure in ``bench/results/ab-<UTC
time>.json``. Exit status 0, 1 when a sync failed, 2 on bad options, 130 when interrupted. Every process is
stopped and the temporary folder removed in a ``finally``.

Owns: the A/B procedure and its table. Must not: change how a figure of ``python -m bench`` is measured.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import psutil
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench import positive_int
from bench.measure import Context, Settings, ToolResult, initial_sync_live
from bench.procs import Registry, tree_cpu_seconds
from bench.runners import REPO, Standby
from bench.trees import ReplicaTimeout
from bench.workload import DEFAULT_FILES, generate

RESULTS = Path(__file__).resolve().parent / "results"
#: The two arms' names, in the order they run within a pair.
ARMS = ("A", "B")
#: Quiet: both processes together used less than this many CPU seconds over :data:`QUIET_WINDOW` seconds.
QUIET_CPU = 0.02
QUIET_WINDOW = 1.0
QUIET_MAX = 60.0


@dataclass(frozen=True)
class Arm:
    """What one arm runs: an engine (``worktree`` or a git revision) and ``[receiver] keep_journal``
    (None: the default)."""

    code: str
    keep_journal: bool | None = None

    def __str__(self) -> str:
        kj = "" if self.keep_journal is None else f",keep_journal={'on' if self.keep_journal else 'off'}"
        return f"{self.code}{kj}"


def parse_arm(text: str) -> Arm:
    """``CODE[,keep_journal=on|off]``, CODE ``worktree`` or a git revision (``head`` is ``HEAD``)."""
    code, *opts = [t.strip() for t in text.split(",")]
    if not code:
        raise argparse.ArgumentTypeError(f"{text!r}: no engine named (worktree, or a git revision)")
    keep: bool | None = None
    for opt in opts:
        key, _, value = opt.partition("=")
        if key != "keep_journal" or value not in ("on", "off"):
            raise argparse.ArgumentTypeError(
                f"{opt!r}: the one setting is keep_journal=on or keep_journal=off"
            )
        keep = value == "on"
    if code.lower() == "head":
        code = "HEAD"
    return Arm(code, keep)


def parser(
    prog: str = "python -m bench.ab", a: str | None = None, b: str | None = None
) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="A/B: standby's initial sync with one engine or setting against another, interleaved, "
        "on one generated tree: median wall and CPU seconds per side, and the ratios A/B.",
    )
    arm_help = "CODE[,keep_journal=on|off]: CODE is worktree (the working tree's engine/) or a git revision"
    for flag, preset, what in (("--a", a, "arm A"), ("--b", b, "arm B (the baseline)")):
        p.add_argument(
            flag,
            type=parse_arm,
            required=preset is None,
            default=preset and parse_arm(preset),
            metavar="ARM",
            help=f"{what}; {arm_help}",
        )
    p.add_argument("--runs", type=positive_int, default=5, metavar="N", help="measured runs per arm (5)")
    p.add_argument(
        "--warmup", type=int, default=1, metavar="N", help="untimed pairs before the measured ones (1)"
    )
    p.add_argument(
        "--files", type=positive_int, default=DEFAULT_FILES, metavar="N", help="meeting files (10,000)"
    )
    p.add_argument("--seed", type=int, default=1, metavar="S", help="seed for the workload (1)")
    p.add_argument("--tmp", type=Path, metavar="DIR", help="where the temporary folder goes")
    p.add_argument("--out", type=Path, default=RESULTS, metavar="DIR", help="where the JSON goes")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, trees)")
    return p


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text("ascii").strip()
    except OSError:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _engine_fingerprint(code: Path) -> str:
    h = hashlib.sha256()
    for f in sorted((code / "engine").rglob("*.py")):
        h.update(f.relative_to(code).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def freeze_engine(which: str, dest: Path) -> Path:
    """A copy of ``engine/`` (a git revision's, or ``worktree``: the working tree's as it is now) in
    ``dest``, checked to be the one ``python -m engine`` imports when run there; ``dest``."""
    dest.mkdir(parents=True)
    if which != "worktree":
        archive = subprocess.run(
            ["git", "archive", which, "engine"], capture_output=True, cwd=REPO, check=False
        )
        if archive.returncode != 0:
            raise RuntimeError(f"git archive {which}: {archive.stderr.decode(errors='replace').strip()}")
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    else:
        shutil.copytree(REPO / "engine", dest / "engine", ignore=shutil.ignore_patterns("__pycache__"))
    found = subprocess.run(
        [sys.executable, "-c", "import engine; print(engine.__file__)"],
        capture_output=True,
        text=True,
        cwd=dest,
        check=True,
    ).stdout.strip()
    if not Path(found).resolve().is_relative_to(dest.resolve()):
        raise RuntimeError(f"python run in {dest} imports the engine from {found}, not the frozen copy")
    return dest


def _disk_bytes(root: Path) -> tuple[int, int]:
    """(bytes on disk, files) below ``root``."""
    total = n = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
                n += 1
            except FileNotFoundError:
                continue
    return total, n


def _until_quiet(sb: Standby) -> tuple[dict[str, float], float]:
    """CPU seconds per side from now until both sides are quiet, and how long that took."""
    pids = sb.processes()
    start = {role: tree_cpu_seconds(pid) for role, pid in pids.items()}
    t0 = time.perf_counter()
    window: list[float] = [sum(start.values())]
    while True:
        time.sleep(QUIET_WINDOW / 4)
        now = {role: tree_cpu_seconds(pid) for role, pid in pids.items()}
        window.append(sum(now.values()))
        window = window[-5:]
        elapsed = time.perf_counter() - t0
        if (len(window) == 5 and window[-1] - window[0] < QUIET_CPU) or elapsed > QUIET_MAX:
            return {role: now[role] - start[role] for role in now}, elapsed


def _busy() -> float:
    """CPU seconds the whole machine has been busy (every core, every process and kernel thread)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0))


def _mine() -> float:
    """CPU seconds of this process and of its children that have been waited for (standby's processes,
    once stopped)."""
    t = psutil.Process().cpu_times()
    return float(t.user + t.system + t.children_user + t.children_system)


def one_run(ctx: Context, sb: Standby, arm: str) -> dict[str, Any]:
    load_before = _loadavg()
    t0, busy0, mine0 = time.perf_counter(), _busy(), _mine()
    res = ToolResult("standby", f"standby {arm}", "live")
    initial_sync_live(ctx, sb, sb.replica, res)
    assert res.initial_sync is not None
    cpu = {role: s.values[-1] for role, s in res.cpu_initial.items()}
    tail, quiet_after = _until_quiet(sb)
    journal_bytes, journal_files = _disk_bytes(sb.receiver_state / "journal")
    # User and system CPU of each process's whole life so far (start-up included), to see where it went.
    life: dict[str, tuple[float, float]] = {}
    for role, pid in sb.processes().items():
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        life[role] = (float(t.user), float(t.system))
    sb.stop()
    # What the rest of the machine used meanwhile (other people's tests, kernel threads), in cores.
    others = (_busy() - busy0 - (_mine() - mine0)) / (time.perf_counter() - t0)
    return {
        "arm": arm,
        "wall_s": res.initial_sync.values[-1],
        "cpu_s": cpu,
        "cpu_quiet_s": {role: cpu.get(role, 0.0) + t for role, t in tail.items()},
        "quiet_after_s": quiet_after,
        "receiver_journal_bytes": journal_bytes,
        "receiver_journal_files": journal_files,
        "others_cores": round(max(others, 0.0), 3),
        "life_user_s": {role: u for role, (u, _s) in life.items()},
        "life_system_s": {role: sy for role, (_u, sy) in life.items()},
        "load_before": load_before,
        "load_after": _loadavg(),
        "notes": list(sb.notes),
    }


def metric(r: dict[str, Any], name: str) -> float:
    """One figure of a run by name: ``wall``, ``cpu sender``, ``cpu receiver``, ``cpu total`` (to
    identical), the same with ``quiet`` (to quiet), ``journal MB``, ``others cores``."""
    if name == "wall":
        return float(r["wall_s"])
    if name == "others cores":
        return float(r["others_cores"])
    if name == "journal MB":
        return float(r["receiver_journal_bytes"]) / 1e6
    key = "cpu_quiet_s" if name.endswith("quiet") else "cpu_s"
    side = name.split()[1]
    d: dict[str, float] = r[key]
    return float(sum(d.values()) if side == "total" else d.get(side, 0.0))


METRICS = (
    "wall",
    "cpu sender",
    "cpu receiver",
    "cpu total",
    "cpu sender quiet",
    "cpu receiver quiet",
    "cpu total quiet",
    "journal MB",
    "others cores",
)
#: Figures without a ratio: they describe the run, not its cost.
NO_RATIO = ("journal MB", "others cores")


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    per_arm: dict[str, dict[str, dict[str, float]]] = {}
    for arm in ARMS:
        rs = [r for r in runs if r["arm"] == arm]
        per_arm[arm] = {}
        for m in METRICS:
            vs = [metric(r, m) for r in rs]
            per_arm[arm][m] = {
                "median": round(statistics.median(vs), 4),
                "min": round(min(vs), 4),
                "max": round(max(vs), 4),
                "n": len(vs),
            }
    ratios: dict[str, dict[str, float | None]] = {}
    first = [r for r in runs if r["arm"] == ARMS[0]]
    second = [r for r in runs if r["arm"] == ARMS[1]]
    for m in (m for m in METRICS if m not in NO_RATIO):
        a, b = per_arm[ARMS[0]][m]["median"], per_arm[ARMS[1]][m]["median"]
        paired = [metric(x, m) / metric(y, m) for x, y in zip(first, second, strict=True) if metric(y, m) > 0]
        ratios[m] = {
            "of_medians": round(a / b, 3) if b > 0 else None,
            "median_of_pairs": round(statistics.median(paired), 3) if paired else None,
            "pairs_min": round(min(paired), 3) if paired else None,
            "pairs_max": round(max(paired), 3) if paired else None,
        }
    return {"arms": per_arm, "ratio_a_over_b": ratios}


def print_table(console: Console, summary: dict[str, Any], arms: dict[str, Arm]) -> None:
    t = Table(
        title=escape(f"initial sync, A ({arms['A']}) vs B ({arms['B']}): median [min-max]"),
        title_justify="left",
    )
    t.add_column("figure")
    for arm in ARMS:
        t.add_column(f"{arm}: {arms[arm]}", justify="right")
    t.add_column("ratio A/B (of medians)", justify="right")
    t.add_column(escape("ratio A/B (median of pairs [min-max])"), justify="right")
    for m in METRICS:
        cells = []
        for arm in ARMS:
            s = summary["arms"][arm][m]
            cells.append(escape(f"{s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}]"))
        r = summary["ratio_a_over_b"].get(m)
        if r is None:
            cells += ["", ""]
        else:
            cells.append(f"{r['of_medians']:.3f}" if r["of_medians"] is not None else "-")
            cells.append(
                escape(f"{r['median_of_pairs']:.3f} [{r['pairs_min']:.3f}-{r['pairs_max']:.3f}]")
                if r["median_of_pairs"] is not None
                else "-"
            )
        unit = "" if m in NO_RATIO else " s"
        t.add_row(m + unit, *cells)
    console.print(t)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(
    argv: list[str] | None = None,
    prog: str = "python -m bench.ab",
    a: str | None = None,
    b: str | None = None,
) -> int:
    args = parser(prog, a, b).parse_args(argv)
    arms: dict[str, Arm] = {"A": args.a, "B": args.b}
    console = Console(width=max(Console().width, 150))
    started = time.perf_counter()

    def say(msg: str) -> None:
        console.print(f"[dim]{time.perf_counter() - started:6.1f}s[/] {msg}", highlight=False)

    signal.signal(signal.SIGTERM, _raise_interrupt)
    load_start = _loadavg()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    git_head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO, check=False
    ).stdout.strip()
    #: What the working tree's engine/ differs from HEAD by at the start.
    worktree_diff = subprocess.run(
        ["git", "diff", "--stat", "HEAD", "--", "engine"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    ).stdout.strip()
    say(f"load average at the start: {load_start} ({os.cpu_count()} cores)")
    work = Path(tempfile.mkdtemp(prefix="standby-ab-", dir=args.tmp))
    registry = Registry()
    runs: list[dict[str, Any]] = []
    status = 0
    try:
        settings = Settings(
            mode="ab",
            files=args.files,
            seed=args.seed,
            reps=1,
            latency_samples=0,
            churn_writes=0,
            reconcile_changes=0,
            sustained_rate=0,
            sustained_seconds=0,
            idle_seconds=0,
            trials=0,
            loopback_mib=0,
            fsync_seconds=0,
            settle_timeout=30,
        )
        say(f"generating {args.files:,} meeting files (seed {args.seed}) in {work}")
        workload = generate(work / "pristine", args.files, args.seed)
        say(f"workload: {workload.files:,} files, {workload.total_bytes / 1e6:.1f} MB")
        ctx = Context(settings, registry, workload, work / "source", say)
        ctx.reset_source()
        tools: dict[str, Standby] = {}
        fingerprints: dict[str, str] = {}
        for name, arm in arms.items():
            code = freeze_engine(arm.code, work / f"code-{name}")
            fingerprints[name] = _engine_fingerprint(code)
            say(f"arm {name}: {arm} (engine fingerprint {fingerprints[name]}), frozen in {code}")
            sb = Standby(
                registry, work / f"standby-{name}", ctx.source, work / f"replica-{name}", arm.keep_journal
            )
            sb.code = code
            tools[name] = sb
        for i in range(args.warmup):
            for name, sb in tools.items():
                say(f"warm-up {i + 1}/{args.warmup}: {name} (not counted)")
                one_run(ctx, sb, name)
        for i in range(args.runs):
            for name, sb in tools.items():
                r = one_run(ctx, sb, name)
                r["pair"] = i
                runs.append(r)
                cpu = ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_s"].items())
                say(
                    f"run {i + 1}/{args.runs} {name}: {r['wall_s']:.2f} s, CPU {cpu} "
                    f"(journal {r['receiver_journal_bytes'] / 1e6:.1f} MB; "
                    f"others {r['others_cores']:.2f} cores; load {r['load_after']})"
                )
        load_end = _loadavg()
        summary = summarise(runs)
        print_table(console, summary, arms)
        console.print(f"load average: start {load_start}, end {load_end}")
        for name, sb in tools.items():
            if _engine_fingerprint(sb.code) != fingerprints[name]:
                raise RuntimeError(f"the frozen engine in {sb.code} changed during the runs")
        doc = {
            "started": stamp,
            "seconds": round(time.perf_counter() - started, 1),
            "command": " ".join(
                [
                    Path(sys.executable).name,
                    "-m",
                    prog.split()[-1],
                    *(argv if argv is not None else sys.argv[1:]),
                ]
            ),
            "files": workload.files,
            "bytes": workload.total_bytes,
            "cores": os.cpu_count(),
            "load_start": load_start,
            "load_end": load_end,
            "arm_a": str(arms["A"]),
            "arm_b": str(arms["B"]),
            "git_head": git_head,
            "engine_fingerprints": fingerprints,
            "worktree_engine_diff": worktree_diff,
            "order": [f"{r['arm']}" for r in runs],
            **summary,
            "runs": runs,
            "config_a": tools["A"].config.read_text("utf-8"),
            "config_b": tools["B"].config.read_text("utf-8"),
        }
        args.out.mkdir(parents=True, exist_ok=True)
        out = args.out / f"ab-{stamp}.json"
        out.write_text(json.dumps(doc, indent=2) + "\n", "utf-8")
        print(
            json.dumps(
                {k: doc[k] for k in ("files", "arm_a", "arm_b", "load_start", "load_end", "ratio_a_over_b")}
            )
        )
        say(f"results: {out}")
    except (ReplicaTimeout, TimeoutError, RuntimeError, OSError, subprocess.SubprocessError) as e:
        console.print(f"[red]failed: {type(e).__name__}: {e}[/]")
        status = 1
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        status = 130
    finally:
        registry.stop_all()
        if args.keep:
            console.print(f"kept the temporary folder {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
