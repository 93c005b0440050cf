"""``python -m bench.rejoin``: how an old active that rejoins after a failover catches up, by delta.

The scenario, on two real ``standby run`` agents on 127.0.0.1 (the harness of the HA tests,
:mod:`tests.ha`, each agent with its own little service through the command backend):

1. node a (active) holds ``--files`` files in 50 rooms; b (passive) gets the first copy;
2. a's host dies (agent and service killed); ``--unshipped`` files are then written into a's tree, the
   changes an active makes as it dies that were never shipped; b is forced to take over;
3. b's service rewrites ``--differ`` files;
4. a's agent starts again: it must move its unshipped files into quarantine, become passive and receive
   only what differs, not the whole tree.

Measured: the time from a's start until it is passive (quarantine done) and until both trees are
identical, the changes applied to catch up, the files quarantined; and, in the same run, what an
admin's failback copy would do at best, ``rsync -a --delete --checksum`` from b's tree onto a copy of
a's tree taken before the rejoin.

Owns: the scenario, its table and ``bench/results/rejoin-<UTC time>.json``. Must not: change the agents'
configuration beyond what :func:`tests.ha.make_pair` writes, or leave a process or a folder behind
(``--keep`` keeps the folders).

Exit status: 0 when the trees converged and every unshipped file is in quarantine byte for byte, 1
otherwise (or when a step timed out), 2 on bad options, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.table import Table

from bench import positive_int
from bench.trees import ReplicaTimeout, differences, expect, wait_identical
from tests.ha import HaNode, make_pair, same_trees, wait_for

RESULTS = Path(__file__).resolve().parent / "results"
ROOMS = 50
MIN_SIZE, MAX_SIZE = 1024, 8192
FAILOVER_AFTER = 10.0
#: How long the applied-changes counter must hold still before it is read.
QUIET_SECONDS = 2.0
ALPHABET = "abcdefghijklmnopqrstuvwxyz      ,.0123456789"

EPILOG = """\
steps:
  1. a pair in a temporary folder (a active, b passive, failover_after 10 s); N files of 1-8 KB in
     50 rooms under a's databases/; both agents start; time until b's tree is identical (first copy)
  2. a's agent and service are killed; U new files are written into a's tree (never shipped); once b
     no longer hears a: `standby failover --force` on b
  3. b's service rewrites K of the N files (new content, similar size); 2 s pause
  4. a's tree is copied to a scratch folder (for rsync)
  5. a's agent starts again: time until it says passive (quarantine done) and until the trees are
     identical; the changes it applied to catch up; the files in its quarantine
  6. rsync -a --delete --checksum --stats from b's tree onto the scratch copy: time, files transferred

Results: a table on stdout and bench/results/rejoin-<UTC time>.json. Exit status 0 when the trees
converged and every unshipped file is in quarantine byte for byte, 1 otherwise.
"""


@dataclass
class Result:
    """The figures of one run; None where a step did not get that far."""

    files: int
    differ: int
    unshipped: int
    seed: int
    first_copy_s: float | None = None
    peer_lost_s: float | None = None  # a killed -> b's status says the peer is unreachable
    promotion_s: float | None = None  # failover --force -> b's service runs
    scanned: int | None = None  # from a's log: rejoin.divergence scanned=
    suspects: int | None = None  # rejoin.divergence suspects=
    quarantined: int | None = None  # manifest lines
    quarantine_log_files: int | None = None  # rejoin.quarantine_done files=
    quarantine_done_s: float | None = None  # a start -> the quarantine_done log line
    quarantine_s: float | None = None  # a start -> a's status says passive
    sender_connected_s: float | None = None  # a start -> b's log: send.connected (its sender streams to a)
    reconcile_puts: int | None = None  # b's log: the first reconcile.done after a's start, puts=
    converge_s: float | None = None  # a start -> trees identical
    transferred: int | None = None  # a's receiver counters.applied, once still
    transferred_per_differ: float | None = None
    unshipped_kept: int | None = None  # unshipped files found in quarantine byte for byte
    converged: bool = False
    rsync_files: int | None = None
    rsync_s: float | None = None
    ratio_converge_vs_rsync: float | None = None
    full_copy_files: int = 0  # N + U: what copying everything would move
    errors: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# Content.


def room(i: int) -> str:
    return f"room-{i % ROOMS + 1:02d}"


def content(rng: random.Random, size: int, tag: str) -> bytes:
    """``size`` bytes of meeting-like JSON text, drawn from ``rng``."""
    head = f'{{"id": "{tag}", "rev": {rng.randrange(10**12):012d}, "body": "'.encode("ascii")
    tail = b'"}\n'
    body = "".join(rng.choices(ALPHABET, k=max(0, size - len(head) - len(tail)))).encode("ascii")
    return head + body + tail


def write_tree(root: Path, files: int, rng: random.Random) -> list[str]:
    """``files`` files of 1-8 KB in 50 rooms under ``root/databases``; their relative paths."""
    rels = [f"databases/{room(i)}/m{i:06d}.json" for i in range(files)]
    for i, rel in enumerate(rels):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content(rng, rng.randint(MIN_SIZE, MAX_SIZE), f"m{i}"))
    return rels


def rewrite(root: Path, rel: str, rng: random.Random) -> None:
    """New content of about the same size (within 10 %), written in place as the service does."""
    path = root / rel
    old = path.stat().st_size
    size = min(MAX_SIZE, max(MIN_SIZE, old + rng.randint(-old // 10, old // 10)))
    path.write_bytes(content(rng, size, f"{rel}@b"))


# ---------------------------------------------------------------------------------------------------------
# Reading the nodes.


def this_run(n: HaNode) -> dict[str, Any]:
    """The status written by the agent running now (empty if it is one left by an earlier run)."""
    st = n.status()
    return st if n.proc is not None and st.get("pid") == n.proc.pid else {}


def applied(n: HaNode) -> int | None:
    v = ((this_run(n).get("receiver") or {}).get("counters") or {}).get("applied")
    return v if isinstance(v, int) else None


def wait_still(read: Callable[[], int | None], quiet: float, timeout: float) -> int | None:
    """Poll ``read()`` until its value has not changed for ``quiet`` seconds; that value."""
    deadline = time.monotonic() + timeout
    last = read()
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        v = read()
        if v != last:
            last, since = v, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return last
    raise AssertionError(f"timed out after {timeout:g} s waiting for the applied count to hold still")


LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3}) ")


def log_lines(text: str, event: str) -> list[tuple[dict[str, str], float | None]]:
    """The lines logging ``event``, in order: their key=value fields and time (seconds since the epoch)."""
    out: list[tuple[dict[str, str], float | None]] = []
    for line in text.splitlines():
        if f" {event} " not in line and not line.endswith(f" {event}"):
            continue
        fields = dict(re.findall(r"(\w+)=(\S+)", line.split(f" {event}", 1)[1]))
        m = LOG_TIME.match(line)
        at = None
        if m:
            at = time.mktime(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")) + int(m.group(2)) / 1000
        out.append((fields, at))
    return out


def first_after(text: str, event: str, after: float) -> tuple[dict[str, str], float | None] | None:
    """The first line logging ``event`` at or after ``after`` (seconds since the epoch; the log's times
    have whole milliseconds)."""
    return next((x for x in log_lines(text, event) if x[1] is not None and x[1] >= after - 0.001), None)


def _int(fields: dict[str, str], key: str) -> int | None:
    try:
        return int(fields[key])
    except (KeyError, ValueError):
        return None


def quarantine_lines(state: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every manifest line of every quarantine folder, with its folder."""
    out: list[tuple[Path, dict[str, Any]]] = []
    for manifest in sorted((state / "quarantine").glob("*/manifest.jsonl")):
        for line in manifest.read_text("utf-8").splitlines():
            if line.strip():
                out.append((manifest.parent, json.loads(line)))
    return out


def kept_in_quarantine(state: Path, unshipped: dict[str, bytes]) -> int:
    """How many of ``unshipped`` are in the quarantine byte for byte."""
    kept = 0
    lines = quarantine_lines(state)
    for rel, data in unshipped.items():
        for folder, e in lines:
            if e.get("path") != rel:
                continue
            stored = folder / str(e.get("stored", f"files/{rel}"))
            try:
                if stored.read_bytes() == data:
                    kept += 1
                    break
            except OSError:
                continue
    return kept


# ---------------------------------------------------------------------------------------------------------
# rsync.

RSYNC_FILES = re.compile(r"Number of (?:regular )?files transferred: ([\d,.]+)")


def run_rsync(src: Path, dst: Path) -> tuple[float, int | None, str]:
    argv = ["rsync", "-a", "--delete", "--checksum", "--stats", f"{src}/", f"{dst}/"]
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    took = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip()[-500:]}")
    m = RSYNC_FILES.search(r.stdout)
    return took, int(re.sub(r"[,.]", "", m.group(1))) if m else None, " ".join(argv)


# ---------------------------------------------------------------------------------------------------------
# The scenario.


def scenario(
    args: argparse.Namespace, work: Path, nodes: list[HaNode], res: Result, say: Callable[[str], None]
) -> None:
    """Run steps 1-6, filling ``res``; raises AssertionError when a step times out."""
    rng = random.Random(args.seed)
    a, b = make_pair(work / "pair", failover_after=FAILOVER_AFTER)
    nodes += [a, b]
    slow = 60 + args.files / 100  # seconds: waits that scale with the tree

    # 1. The first copy.
    say(f"writing {args.files:,} files into a's tree (seed {args.seed})")
    rels = write_tree(a.root, args.files, rng)
    say("starting both agents; waiting for the first copy")
    t0 = time.perf_counter()
    a.start()
    b.start()
    wait_for(lambda: a.service_pid() is not None, 60, "a's service to start")
    wait_for(lambda: this_run(b).get("role") == "passive", 60, "b to say it is passive")
    wait_for(lambda: this_run(a).get("service") == "running", 60, "a's agent to see its service run")
    done = wait_identical(a.root / "databases", b.root / "databases", slow)
    res.first_copy_s = done - t0
    if not same_trees(a, b):
        raise AssertionError("the first copy: the stat poll said identical, same_trees says not")
    say(f"first copy identical after {res.first_copy_s:.1f} s")

    # 2. a's host dies; what it wrote last was never shipped; b is forced to take over.
    a.kill()
    a.kill_service()
    t_kill = time.perf_counter()
    unshipped: dict[str, bytes] = {}
    for i in range(args.unshipped):
        rel = f"databases/{room(i)}/unshipped-{i:04d}.json"
        unshipped[rel] = content(rng, rng.randint(MIN_SIZE, MAX_SIZE), f"unshipped-{i}")
        (a.root / rel).write_bytes(unshipped[rel])
    say(f"a killed; {args.unshipped} unshipped file(s) written into its tree; waiting for b to notice")
    wait_for(lambda: (this_run(b).get("peer") or {}).get("reachable") is False, 120, "b to lose its peer")
    res.peer_lost_s = time.perf_counter() - t_kill
    t_fo = time.perf_counter()
    r = b.cli("failover", "--force")
    if r.returncode != 0:
        raise AssertionError(f"standby failover --force on b exited {r.returncode}: {r.stderr.strip()}")
    wait_for(lambda: b.service_pid() is not None, 60, "b's service to start (the forced promotion)")
    res.promotion_s = time.perf_counter() - t_fo
    say(
        f"b lost its peer after {res.peer_lost_s:.1f} s; "
        f"its service runs {res.promotion_s:.1f} s after the forced failover"
    )

    # 3. The new active's service changes K files.
    rewritten = rng.sample(rels, args.differ)
    for rel in rewritten:
        rewrite(b.root, rel, rng)
    say(f"b's service rewrote {args.differ} file(s); waiting 2 s")
    time.sleep(2.0)

    # 4. a's tree as it is before the rejoin, for rsync.
    scratch = work / "scratch"
    shutil.copytree(a.root, scratch, symlinks=True)

    # 5. The rejoin.
    say("starting a's agent again: the rejoin")
    t0 = time.perf_counter()
    t0_wall = time.time()
    a.start()
    wait_for(lambda: this_run(a).get("role") == "passive", slow, "a to rejoin as passive", interval=0.01)
    res.quarantine_s = time.perf_counter() - t0
    # Only the paths that differ are polled (b's rewrites, a's unshipped files, which must go); then a
    # full walk and a byte compare confirm, falling back to the whole tree if anything else differs.
    src, dst = b.root / "databases", a.root / "databases"
    pending = [p.removeprefix("databases/") for p in [*rewritten, *unshipped]]
    try:
        done = wait_identical(src, dst, slow, expected=expect(src, pending))
    except ReplicaTimeout as e:
        raise AssertionError(f"a never became identical to b: {e}") from None
    res.converge_s = done - t0
    res.converged = same_trees(a, b)
    if not res.converged:
        res.errors.append("the trees differ: " + "; ".join(differences(src, dst, 5)))
    say(f"a passive after {res.quarantine_s:.2f} s, identical after {res.converge_s:.2f} s")
    res.transferred = wait_still(lambda: applied(a), QUIET_SECONDS, 60)
    if res.transferred is not None and args.differ:
        res.transferred_per_differ = res.transferred / args.differ
    log = a.log()
    div = first_after(log, "rejoin.divergence", t0_wall)
    if div is not None:
        res.scanned, res.suspects = _int(div[0], "scanned"), _int(div[0], "suspects")
    qd = first_after(log, "rejoin.quarantine_done", t0_wall)
    if qd is not None:
        res.quarantine_log_files = _int(qd[0], "files")
        res.quarantine_done_s = None if qd[1] is None else qd[1] - t0_wall
    # How the new active caught a up: its sender's connection to a, and the reconcile that followed.
    blog = b.log()
    sc = first_after(blog, "send.connected", t0_wall)
    if sc is not None and sc[1] is not None:
        res.sender_connected_s = sc[1] - t0_wall
    rc = first_after(blog, "reconcile.done", t0_wall)
    if rc is not None:
        res.reconcile_puts = _int(rc[0], "puts")
    res.quarantined = len(quarantine_lines(a.state))
    res.unshipped_kept = kept_in_quarantine(a.state, unshipped)
    if res.unshipped_kept != len(unshipped):
        res.errors.append(f"only {res.unshipped_kept} of {len(unshipped)} unshipped file(s) in quarantine")

    # 6. What an admin's failback copy would do at best.
    res.full_copy_files = args.files + args.unshipped
    if shutil.which("rsync") is None:
        say("[yellow]skipped:[/] rsync is not installed (apt-get install rsync)")
        return
    say("rsync -a --delete --checksum from b's tree onto the copy of a's")
    res.rsync_s, res.rsync_files, _ = run_rsync(b.root, scratch)
    if res.converge_s is not None and res.rsync_s > 0:
        res.ratio_converge_vs_rsync = res.converge_s / res.rsync_s


# ---------------------------------------------------------------------------------------------------------
# Report.


def _s(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f} s"


def _n(v: int | None) -> str:
    return "-" if v is None else f"{v:,}"


def print_report(console: Console, res: Result) -> None:
    t = Table(
        title=f"Rejoin after a failover: {res.files:,} files, {res.differ:,} rewritten on the new active, "
        f"{res.unshipped:,} unshipped on the old one (seed {res.seed})",
        title_justify="left",
    )
    t.add_column("step")
    t.add_column("figure", justify="right")
    t.add_column("what")
    t.add_row("first copy", _s(res.first_copy_s, 1), "both agents start -> b's tree identical")
    t.add_row("b loses its peer", _s(res.peer_lost_s, 1), "a's agent and service killed -> b's status")
    t.add_row("forced promotion", _s(res.promotion_s, 1), "failover --force on b -> b's service runs")
    t.add_row(
        "divergence scan",
        f"{_n(res.scanned)} / {_n(res.suspects)}",
        "files scanned / suspects (a's log, rejoin.divergence)",
    )
    t.add_row(
        "quarantined",
        _n(res.quarantined),
        f"manifest lines; {_n(res.unshipped_kept)} of {res.unshipped:,} unshipped kept byte for byte "
        f"(log: files={_n(res.quarantine_log_files)})",
    )
    t.add_row(
        "rejoin: a passive",
        _s(res.quarantine_s),
        f"a's agent starts -> its status says passive "
        f"(quarantine_done logged at {_s(res.quarantine_done_s)})",
    )
    t.add_row(
        "rejoin: b streams to a",
        _s(res.sender_connected_s),
        f"a's agent starts -> b's sender connected (b's log); "
        f"its reconcile put {_n(res.reconcile_puts)} file(s)",
    )
    t.add_row("rejoin: converged", _s(res.converge_s), "a's agent starts -> both trees identical")
    t.add_row(
        "changes applied",
        _n(res.transferred),
        f"a's receiver, to catch up (K = {res.differ:,}, K + U = {res.differ + res.unshipped:,}); "
        + ("-" if res.transferred_per_differ is None else f"{res.transferred_per_differ:.2f}")
        + " per rewritten file",
    )
    console.print(t)
    c = Table(title="The catch-up compared (same run, same trees)", title_justify="left")
    c.add_column("how")
    c.add_column("files moved", justify="right")
    c.add_column("time", justify="right")
    c.add_row("standby: the rejoin (start -> identical)", _n(res.transferred), _s(res.converge_s))
    c.add_row("rsync -a --delete --checksum b/ -> copy of a/", _n(res.rsync_files), _s(res.rsync_s))
    c.add_row("copy everything (the vendor's guide), N + U", _n(res.full_copy_files), "-")
    console.print(c)
    if res.ratio_converge_vs_rsync is not None:
        console.print(
            f"rejoin / rsync --checksum: {res.ratio_converge_vs_rsync:.2f}x the time "
            "(the rejoin includes the agent's start-up, the scan, the quarantine, the reconnect)"
        )
    for e in res.errors:
        console.print(f"[red]error:[/] {e}", highlight=False)


# ---------------------------------------------------------------------------------------------------------
# The command.


def _count(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {v}")
    return v


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.rejoin",
        description="Measure how an old active that rejoins after a forced failover catches up: its "
        "unshipped files moved into quarantine, then only what differs received from the new active, "
        "compared with rsync --checksum in the same run. Two real `standby run` agents on 127.0.0.1.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--files", type=positive_int, default=10_000, metavar="N", help="files in the tree (default: 10000)"
    )
    p.add_argument(
        "--differ",
        type=_count,
        default=100,
        metavar="K",
        help="files the new active's service rewrites before the rejoin (default: 100, 1%% of 10000)",
    )
    p.add_argument(
        "--unshipped",
        type=_count,
        default=10,
        metavar="U",
        help="new files written into the old active's tree after its agent died (default: 10)",
    )
    p.add_argument(
        "--seed", type=int, default=1, metavar="S", help="seed for every file's content (default: 1)"
    )
    p.add_argument(
        "--tmp", type=Path, metavar="DIR", help="where the temporary folders go (default: the system's)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        metavar="DIR",
        help="where the JSON goes (default: bench/results)",
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the temporary folders (trees, logs) and say where"
    )
    return p


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.differ > args.files:
        p.error(f"--differ {args.differ} is more than --files {args.files}")
    console = Console(width=max(Console().width, 130))
    started = time.perf_counter()

    def say(msg: str) -> None:
        console.print(f"[dim]{time.perf_counter() - started:6.1f}s[/] {msg}", highlight=False)

    signal.signal(signal.SIGTERM, _raise_interrupt)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    res = Result(args.files, args.differ, args.unshipped, args.seed)
    nodes: list[HaNode] = []
    work = Path(tempfile.mkdtemp(prefix="standby-rejoin-", dir=args.tmp))
    load_start = os.getloadavg()
    cores = os.cpu_count() or 1
    if load_start[0] > cores / 2:
        say(
            f"[yellow]warning:[/] load average {load_start[0]:.1f} on {cores} cores: other work is running "
            "on this machine; the figures will be slower and noisier"
        )
    try:
        try:
            scenario(args, work, nodes, res, say)
        except (AssertionError, RuntimeError, OSError, subprocess.SubprocessError) as e:
            res.errors.append(str(e) or type(e).__name__)
            for n in nodes:
                console.print(
                    f"--- the log of {n.name} (run {n.starts}), its end:\n{n.log()[-3000:]}", markup=False
                )
        print_report(console, res)
        doc: dict[str, Any] = {
            "started": stamp,
            "seconds": round(time.perf_counter() - started, 1),
            "command": ["python", "-m", "bench.rejoin", *(sys.argv[1:] if argv is None else argv)],
            "failover_after": FAILOVER_AFTER,
            "cores": cores,
            "load_start": [round(x, 2) for x in load_start],
            "load_end": [round(x, 2) for x in os.getloadavg()],
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(res).items()},
        }
        out = args.out / f"rejoin-{stamp}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n", "utf-8")
        say(f"results: {out}")
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        return 130
    finally:
        for n in nodes:
            n.cleanup()
        if args.keep:
            console.print(f"kept the temporary folders in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    ok = res.converged and res.unshipped_kept == args.unshipped and not res.errors
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
