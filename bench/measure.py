"""The measurements: each procedure drives one tool on the workload and returns plain result values.

Owns: the procedures (initial sync, reconciliation, latency, churn, sustained rate, torn and lost writes,
one large file, idle CPU, CPU and memory per phase) and the result types they fill. Timings use
``time.perf_counter``; "identical" is decided by :mod:`bench.trees`.

RACE: a live tool's replica is compared with a source that nobody writes meanwhile; every procedure that
writes waits until the replica is identical again before it returns, so the next starts from a quiet pair.

Must not: print tables or write result files (that is :mod:`bench.report`).
"""

from __future__ import annotations

import itertools
import math
import os
import re
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.procs import (
    Registry,
    cpu_seconds,
    in_disk_wait_or_parent,
    peak_rss_bytes,
    reset_peak_rss,
    tree_cpu_seconds,
    wait_log,
)
from bench.runners import LiveTool, RsyncPush, Standby
from bench.trees import (
    FileStat,
    ReplicaTimeout,
    differences,
    expect,
    file_sha256,
    read_or_none,
    snapshot,
    stat_of,
    wait_bytes,
    wait_identical,
)
from bench.workload import Workload, Writes, copy_in_place, generate_large, write_in_place

#: Pause between sequential latency samples, so each measures one change on a quiet pair.
SAMPLE_GAP = 0.02
#: Pause between the two halves of a torn write.
HALF_PAUSE = 0.2
#: Polling interval for single files (latency, correctness).
POLL = 0.0005
#: How long, beyond twice a tool's delay, a correctness trial waits for a version to arrive.
TRIAL_WAIT = 5.0
#: A tool that used (almost) no CPU for this long, past its own delay, while its replica still differs
#: is taken to have stopped: the replica will not become identical.
IDLE_WINDOW = 3.0
#: Latency samples that may time out, with none arriving, before the rest are not taken.
MAX_TIMEOUTS = 3
#: The large-file row's wait allows at least this rate (MiB/s), beyond ``settle_timeout``.
LARGE_MIN_MIB_PER_S = 4.0
#: Copies of the large file on the disk at once, besides its content made once per run: standby's
#: source, sender journal, replica and receiver journal (``keep_journal``); rsync's source and replica.
LARGE_COPIES_LIVE = 4
LARGE_COPIES_ONE_SHOT = 2
#: Free space the large-file row leaves beyond its copies.
LARGE_MARGIN = 1 << 30


# ---------------------------------------------------------------------------------------------------------
# Result values.


@dataclass
class Series:
    """Repeated measurements of one quantity."""

    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    @property
    def min(self) -> float | None:
        return min(self.values) if self.values else None

    @property
    def max(self) -> float | None:
        return max(self.values) if self.values else None


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


@dataclass
class Latency:
    """Write on the source until byte-identical on the replica, one sample per change."""

    method: str  # "sequential" (one change at a time) or "staggered" (overlapping, for long delays)
    samples: list[float] = field(default_factory=list)
    timeouts: int = 0

    def _all(self) -> list[float]:
        """The samples, with every timed-out change counted as infinitely late."""
        return self.samples + [math.inf] * self.timeouts

    @property
    def p50(self) -> float | None:
        return percentile(self._all(), 50)

    @property
    def p99(self) -> float | None:
        return percentile(self._all(), 99)

    @property
    def max(self) -> float | None:
        return max(self._all()) if self._all() else None


@dataclass
class Churn:
    writes: int
    write_seconds: Series = field(default_factory=Series)
    after_last: Series = field(default_factory=Series)
    total: Series = field(default_factory=Series)
    #: Per repetition that never became identical: how many paths stayed different.
    stale: list[int] = field(default_factory=list)


@dataclass
class Sustained:
    target_rate: float
    seconds: float
    changes: int = 0
    achieved_rate: float = 0.0
    probe_lags: list[float] = field(default_factory=list)
    probe_timeouts: int = 0
    catch_up: float | None = None
    #: Paths still different when the tool went idle or the wait ran out (0: it caught up).
    stale: int = 0
    writers: int = 0
    cpu_percent: dict[str, float] = field(default_factory=dict)

    @property
    def max_lag(self) -> float | None:
        if self.stale:
            return math.inf
        lags = [*self.probe_lags, *([self.catch_up] if self.catch_up is not None else [])]
        return max(lags) if lags else None


@dataclass
class Trials:
    """Trials of a known failure: ``bad`` is how many showed it (a half file seen, an update lost)."""

    trials: int = 0
    bad: int = 0
    same_second: int | None = None
    examples: list[str] = field(default_factory=list)

    def fail(self, example: str) -> None:
        self.bad += 1
        if len(self.examples) < 5:
            self.examples.append(example)


@dataclass
class LargeFile:
    """One new file of ``mib`` MiB of incompressible bytes, written into the source in place and closed.

    ``seconds``: a live tool, from the close until the replica holds it (its size and mtime; the bytes are
    checked by SHA-256 once after, untimed); a one-shot tool, one run that copies it (the rest of the
    tree already in sync)."""

    mib: int
    path: str = ""
    seconds: float | None = None
    #: The writer alone: writing it into the source and closing it (before the clock starts).
    write_seconds: float | None = None
    #: CPU seconds per process (and its children) from the first byte written until the tool is quiet
    #: again (a live tool) or the run has ended (a one-shot tool).
    cpu: dict[str, float] = field(default_factory=dict)
    #: Peak RSS per process over the row; ``rss_since`` says from when: "row" (the high-water mark was
    #: reset just before, Linux) or "process start" (it could not be).
    peak_rss: dict[str, int] = field(default_factory=dict)
    rss_since: str = ""

    @property
    def mib_per_s(self) -> float | None:
        return self.mib / self.seconds if self.seconds else None


@dataclass
class ToolResult:
    name: str
    label: str
    kind: str  # "live" or "one-shot"
    commands: list[str] = field(default_factory=list)
    initial_sync: Series | None = None
    reconcile_same: Series | None = None
    reconcile_changed: Series | None = None
    reconcile_internal: Series | None = None
    verify: Series | None = None
    latency_new: Latency | None = None
    latency_rewrite: Latency | None = None
    churn: Churn | None = None
    sustained: Sustained | None = None
    torn: Trials | None = None
    lost_same_second: Trials | None = None
    lost_same_mtime: Trials | None = None
    large_file: LargeFile | None = None
    cpu_initial: dict[str, Series] = field(default_factory=dict)
    cpu_churn: dict[str, Series] = field(default_factory=dict)
    idle_cpu_percent: dict[str, float] = field(default_factory=dict)
    peak_rss: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: ``--profile`` (standby only): a profiled initial sync's top functions per side (bench.profile).
    profile: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------------------
# The context every procedure gets.


@dataclass(frozen=True)
class Settings:
    """How much of everything to do; one per mode (``--smoke``, ``--quick``, full)."""

    mode: str
    files: int
    seed: int
    reps: int
    latency_samples: int
    churn_writes: int
    reconcile_changes: int
    sustained_rate: float
    sustained_seconds: float
    idle_seconds: float
    trials: int
    loopback_mib: int
    fsync_seconds: float
    #: Longest wait, beyond a tool's own delay, for a replica to become identical again.
    settle_timeout: float
    #: The large-file row's size in MiB (0: no such row, and no durable-write limit).
    big_mib: int = 0

    @property
    def disk_write_mib(self) -> int:
        """The size of the machine's durable-write limit: a second or two on most disks."""
        return min(self.big_mib, 512)


@dataclass
class Context:
    settings: Settings
    registry: Registry
    pristine: Workload
    source: Path
    say: Callable[[str], None]
    writes: Writes = field(init=False)

    #: Writers other than :attr:`writes` (the sustained-rate threads), for :meth:`reset_source`.
    more_writes: list[Writes] = field(default_factory=list)
    #: The large file's content once made (:meth:`large_content`): its path and SHA-256.
    large: tuple[Path, str] | None = None

    def __post_init__(self) -> None:
        self.writes = Writes(self.pristine, self.settings.seed + 1)

    @property
    def long_timeout(self) -> float:
        """For waits that grow with the tree: a full sync, a restart's reconciliation."""
        return 120 + self.settings.files / 200

    @property
    def work(self) -> Path:
        """The run's temporary folder (the source, the replicas, the tools' state are in it)."""
        return self.source.parent

    def large_content(self) -> tuple[Path, str]:
        """The large file's content (``big_mib`` MiB, seeded), made once per run outside the source, in
        the run's folder: its path and SHA-256."""
        if self.large is None:
            mib = self.settings.big_mib
            folder = self.work / "large-file"
            folder.mkdir(exist_ok=True)
            path = folder / f"content-{mib}mib.bin"
            self.say(f"making the large file's content: {mib:,} MiB, seeded (not timed)")
            self.large = (path, generate_large(path, mib, self.settings.seed + 7))
        return self.large

    def large_path(self) -> str:
        """Where the large file goes in the source (a new file in the first room), handed out like the
        writes' paths so that :meth:`reset_source` removes it if it is left behind."""
        rel = f"databases/{self.pristine.rooms[0]}/large-{self.settings.big_mib}mib.bin"
        self.writes.issued.add(rel)
        return rel

    def writer(self, seed_offset: int) -> Writes:
        w = Writes(self.pristine, self.settings.seed + seed_offset)
        self.more_writes.append(w)
        return w

    def reset_source(self) -> None:
        """Make the source the generated tree again, and the writes seeded afresh, so every tool gets the
        same tree and the same writes. The first time, a ``cp -a`` copy; after that only the paths the
        writes touched are put back (bytes and mtime) or removed: deleting and copying whole trees is
        slow on some disks and would disturb the next measurement."""
        if not self.source.exists():
            subprocess.run(["cp", "-a", str(self.pristine.root), str(self.source)], check=True)
        else:
            issued = set().union(self.writes.issued, *(w.issued for w in self.more_writes))
            for rel in sorted(issued):
                original = self.pristine.root / rel
                if original.exists():
                    shutil.copy2(original, self.source / rel)
                else:
                    (self.source / rel).unlink(missing_ok=True)
            now, was = snapshot(self.source), snapshot(self.pristine.root)
            if now.files != was.files or now.dirs != was.dirs:
                raise RuntimeError("the source could not be restored to the generated tree")
        self.writes = Writes(self.pristine, self.settings.seed + 1)
        self.more_writes = []
        os.sync()


def _cpu(pids: dict[str, int]) -> dict[str, tuple[int, float]]:
    """Role -> (pid, CPU seconds of the process and its children, finished or running)."""
    return {role: (pid, tree_cpu_seconds(pid)) for role, pid in pids.items()}


def _cpu_delta(before: dict[str, tuple[int, float]], after: dict[str, tuple[int, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for role, (pid, cpu) in after.items():
        b = before.get(role)
        out[role] = cpu - b[1] if b is not None and b[0] == pid else cpu
    return out


def _note_rss(res: ToolResult, pids: dict[str, int]) -> None:
    for role, pid in pids.items():
        res.peak_rss[role] = max(res.peak_rss.get(role, 0), peak_rss_bytes(pid))


def _add(d: dict[str, Series], values: dict[str, float]) -> None:
    for role, v in values.items():
        d.setdefault(role, Series()).values.append(v)


def _phase(ctx: Context, res: ToolResult, what: str, fn: Callable[[], None]) -> None:
    """Run one measurement; a failure is recorded and the benchmark goes on with the next."""
    t0 = time.perf_counter()
    try:
        fn()
    except (ReplicaTimeout, TimeoutError, RuntimeError, OSError, subprocess.SubprocessError) as e:
        msg = f"{what}: {type(e).__name__}: {e}"
        res.errors.append(msg[:600])
        ctx.say(f"[red]{res.name}: {msg[:300]}[/]")
        return
    ctx.say(f"{res.name}: {what} done in {time.perf_counter() - t0:.1f} s")


# ---------------------------------------------------------------------------------------------------------
# Live tools (standby, lsyncd).


def measure_live(ctx: Context, tool: LiveTool, replica: Path, res: ToolResult) -> None:
    """Every measurement of a live tool, in order, on one fresh copy of the tree."""
    st = ctx.settings
    ctx.reset_source()
    try:
        _phase(ctx, res, "initial sync", lambda: initial_sync_live(ctx, tool, replica, res))
        res.commands = tool.commands()
        if not tool.processes():
            res.errors.append("not running after the initial sync; later measurements skipped")
            return
        if isinstance(tool, Standby):
            _phase(ctx, res, "reconciliation", lambda: reconcile_standby(ctx, tool, replica, res))
        _phase(ctx, res, "idle CPU", lambda: idle_cpu(ctx, tool, res))
        wait_quiet(ctx, tool, res, "latency")
        if tool.delay >= 1.0:
            _phase(ctx, res, "latency (staggered)", lambda: latency_staggered(ctx, tool, replica, res))
        else:
            _phase(ctx, res, "latency", lambda: latency_sequential(ctx, tool, replica, res))
        _phase(ctx, res, "churn", lambda: churn(ctx, tool, replica, res))
        res.sustained = Sustained(st.sustained_rate, st.sustained_seconds)
        _phase(ctx, res, "sustained rate", lambda: sustained(ctx, tool, replica, res))
        _phase(ctx, res, "torn and lost writes", lambda: correctness_live(ctx, tool, replica, res))
        # INVARIANT: noted before the large file, so peak_rss is the other phases' (the row has its own).
        _note_rss(res, tool.processes())
        if isinstance(tool, Standby) and st.big_mib:
            _phase(ctx, res, "one large file", lambda: large_file_live(ctx, tool, replica, res))
    finally:
        tool.stop()
        res.notes.extend(dict.fromkeys(tool.notes))


def _activity(tool: LiveTool) -> Callable[[], float]:
    """A measure of the work the tool has done so far that grows while it works: its CPU seconds (all
    its processes and their children), plus 0.1 for every call that finds it waiting on the disk or
    running a child (lsyncd's rsync), which use no CPU of their own."""
    waits = [0.0]

    def activity() -> float:
        pids = tool.processes().values()
        if any(in_disk_wait_or_parent(pid) for pid in pids):
            waits[0] += 0.1
        return waits[0] + sum(tree_cpu_seconds(pid) for pid in pids)

    return activity


def _settle(
    ctx: Context,
    tool: LiveTool,
    replica: Path,
    expected: dict[str, FileStat | None] | None,
    extra: float = 0.0,
    confirm: bool = True,
) -> float:
    """Wait until the replica is identical, giving up once the tool has gone idle without getting there
    (``extra`` seconds more than usual; ``confirm`` as :func:`bench.trees.wait_identical`)."""
    return wait_identical(
        ctx.source,
        replica,
        ctx.settings.settle_timeout + 2 * tool.delay + extra,
        expected,
        activity=_activity(tool),
        idle_window=IDLE_WINDOW,
        idle_grace=2 * tool.delay + 1.0,
        confirm=confirm,
    )


def _repair(
    ctx: Context, tool: LiveTool, replica: Path, res: ToolResult, what: str, e: ReplicaTimeout
) -> None:
    """After a replica that never caught up: note it, and copy the source over it out of band (rsync
    --checksum), so the next measurement starts from an identical pair."""
    res.notes.append(f"{what}: {e}; repaired out of band before going on")
    if isinstance(tool, Standby):
        res.errors.append(f"{what}: standby's replica never became identical: {e}")
    if shutil.which("rsync") is not None:
        subprocess.run(
            ["rsync", "-a", "--delete", "--checksum", f"{ctx.source}/", f"{replica}/"],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def initial_sync_live(ctx: Context, tool: LiveTool, replica: Path, res: ToolResult) -> None:
    res.initial_sync = Series()
    expected: dict[str, FileStat | None] = dict(snapshot(ctx.source).files)
    timeout = ctx.long_timeout
    reps = ctx.settings.reps if tool.delay < 1.0 or ctx.settings.mode == "full" else 1
    if reps < ctx.settings.reps:
        res.notes.append(
            f"initial sync: {reps} repetition in this mode (the startup sync does not wait for the delay, "
            "so it is the same as with delay 0)"
        )
    for rep in range(reps):
        tool.reset()
        os.sync()  # the emptied replica's deletions are on disk before the clock starts
        tool.start_passive()
        before = _cpu(tool.processes())
        t0 = time.perf_counter()
        tool.start_active()
        t1 = wait_identical(ctx.source, replica, timeout, expected)
        res.initial_sync.values.append(t1 - t0)
        pids = tool.processes()
        _add(res.cpu_initial, _cpu_delta(before, _cpu(pids)))
        _note_rss(res, pids)
        ctx.say(f"{res.name}: initial sync {rep + 1}/{reps}: {t1 - t0:.2f} s")


_SECONDS = re.compile(r"seconds=([0-9.]+)")


def reconcile_standby(ctx: Context, tool: Standby, replica: Path, res: ToolResult) -> None:
    """Restart the sender and time its reconciliation; then the same after changes; then verify."""
    res.reconcile_same, res.reconcile_changed = Series(), Series()
    res.reconcile_internal, res.verify = Series(), Series()
    n = ctx.settings.reconcile_changes
    for _ in range(ctx.settings.reps):
        tool.wait_connected()
        tool.stop_active()
        t0 = time.perf_counter()
        tool.start_active()
        assert tool.sender is not None
        t1 = wait_log(tool.sender, "reconcile.done", ctx.long_timeout)
        res.reconcile_same.values.append(t1 - t0)
        m = _SECONDS.search(tool.sender.log_text().split("reconcile.done", 1)[1])
        if m:
            res.reconcile_internal.values.append(float(m.group(1)))
    for _ in range(ctx.settings.reps):
        tool.wait_connected()
        tool.stop_active()
        paths = ctx.writes.pick(n)
        for p in paths:
            write_in_place(ctx.source / p, ctx.writes.content())
        want = expect(ctx.source, paths)
        t0 = time.perf_counter()
        tool.start_active()
        t1 = wait_identical(ctx.source, replica, ctx.long_timeout, want)
        res.reconcile_changed.values.append(t1 - t0)
    tool.wait_connected()
    for _ in range(ctx.settings.reps):
        wall, rc, out = tool.verify()
        if rc == 4:  # refused by the peer (e.g. busy with the restarted sender): once more, and say so
            res.notes.append(f"standby verify was refused once (exit 4): {out.strip()[-300:]}")
            time.sleep(1.0)
            wall, rc, out = tool.verify()
        if rc != 0:
            raise RuntimeError(
                f"standby verify exited with {rc} on an identical replica: {out.strip()[-300:]}"
            )
        res.verify.values.append(wall)
    _note_rss(res, tool.processes())


def wait_quiet(ctx: Context, tool: LiveTool, res: ToolResult, what: str) -> None:
    """Wait until the tool has used less than 2 % of a core for a second (the work of an earlier phase,
    such as a reconciliation, is over), at most ``settle_timeout``; say so if it never quiets."""
    activity = _activity(tool)
    deadline = time.perf_counter() + ctx.settings.settle_timeout
    last = activity()
    while True:
        time.sleep(1.0)
        now = activity()
        if now - last < 0.02:
            return
        if time.perf_counter() > deadline:
            res.notes.append(f"{what}: the tool was still busy after {ctx.settings.settle_timeout:g} s")
            return
        last = now


def idle_cpu(ctx: Context, tool: LiveTool, res: ToolResult) -> None:
    wait_quiet(ctx, tool, res, "idle CPU")
    pids = tool.processes()
    seen = _checkpoint_folders(tool)
    before = _cpu(pids)
    time.sleep(ctx.settings.idle_seconds)
    delta = _cpu_delta(before, _cpu(tool.processes()))
    res.idle_cpu_percent = {role: 100 * v / ctx.settings.idle_seconds for role, v in delta.items()}
    after = _checkpoint_folders(tool)
    building = sorted(role for role, names in after.items() if names != seen.get(role) or _building(names))
    if building:
        res.notes.append(
            f"idle CPU: {' and '.join(building)} built a checkpoint during the window (scheduled work: the "
            "first one 60 s after a start, then every checkpoint_minutes); the figure includes it"
        )


def _checkpoint_folders(tool: LiveTool) -> dict[str, frozenset[str]]:
    """Standby's checkpoint folders on each side, finished and being built (empty for other tools)."""
    if not isinstance(tool, Standby):
        return {}
    out: dict[str, frozenset[str]] = {}
    for role, state in (("sender", tool.sender_state), ("receiver", tool.receiver_state)):
        try:
            out[role] = frozenset(p.name for p in (state / "checkpoints").iterdir())
        except OSError:
            out[role] = frozenset()
    return out


def _building(names: frozenset[str]) -> bool:
    return any(n.startswith(".building-") for n in names)


def latency_sequential(ctx: Context, tool: LiveTool, replica: Path, res: ToolResult) -> None:
    n = ctx.settings.latency_samples
    timeout = min(10.0, ctx.settings.settle_timeout) + tool.delay
    for kind in ("new", "rewrite"):
        lat = Latency("sequential")
        paths = [ctx.writes.new_path("latency") for _ in range(n)] if kind == "new" else ctx.writes.pick(n)
        for rel in paths:
            data = ctx.writes.content()
            t0 = time.perf_counter()
            write_in_place(ctx.source / rel, data)
            t1 = wait_bytes(replica / rel, data, timeout, POLL)
            if t1 is None:
                lat.timeouts += 1
                if lat.timeouts >= MAX_TIMEOUTS and not lat.samples:
                    res.notes.append(
                        f"latency ({kind}): {MAX_TIMEOUTS} changes in a row never arrived; stopped"
                    )
                    break
            else:
                lat.samples.append(t1 - t0)
            time.sleep(SAMPLE_GAP)
        if kind == "new":
            res.latency_new = lat
        else:
            res.latency_rewrite = lat
    try:
        _settle(ctx, tool, replica, None)
    except ReplicaTimeout as e:
        _repair(ctx, tool, replica, res, "after the latency samples", e)


def latency_staggered(ctx: Context, tool: LiveTool, replica: Path, res: ToolResult) -> None:
    """For a tool that waits seconds on purpose: overlapping samples, one change every ``spacing``."""
    n = ctx.settings.latency_samples
    spacing = min(0.1, 5.0 / (2 * n))
    plan: list[tuple[str, str, bytes]] = []
    news = [ctx.writes.new_path("latency") for _ in range(n)]
    olds = ctx.writes.pick(n)
    for a, b in zip(news, olds, strict=True):
        plan += [("new", a, ctx.writes.content()), ("rewrite", b, ctx.writes.content())]
    res.latency_new, res.latency_rewrite = Latency("staggered"), Latency("staggered")
    outstanding: list[tuple[str, str, bytes, float]] = []
    start = time.perf_counter()
    deadline = start + len(plan) * spacing + 2 * tool.delay + min(10.0, ctx.settings.settle_timeout)
    i = 0
    while i < len(plan) or outstanding:
        now = time.perf_counter()
        while i < len(plan) and now >= start + i * spacing:
            kind, rel, data = plan[i]
            t0 = time.perf_counter()
            write_in_place(ctx.source / rel, data)
            outstanding.append((kind, rel, data, t0))
            i += 1
        for item in list(outstanding):
            kind, rel, data, t0 = item
            if read_or_none(replica / rel) == data:
                lat = res.latency_new if kind == "new" else res.latency_rewrite
                lat.samples.append(time.perf_counter() - t0)
                outstanding.remove(item)
        if now > deadline:
            for kind, *_ in outstanding:
                (res.latency_new if kind == "new" else res.latency_rewrite).timeouts += 1
            break
        time.sleep(POLL)
    try:
        _settle(ctx, tool, replica, None)
    except ReplicaTimeout as e:
        _repair(ctx, tool, replica, res, "after the latency samples", e)


def churn(ctx: Context, tool: LiveTool, replica: Path, res: ToolResult) -> None:
    n = ctx.settings.churn_writes
    res.churn = Churn(n)
    for _ in range(ctx.settings.reps):
        paths = ctx.writes.pick(n)
        datas = [ctx.writes.content() for _ in paths]
        before = _cpu(tool.processes())
        t_first = time.perf_counter()
        for rel, data in zip(paths, datas, strict=True):
            write_in_place(ctx.source / rel, data)
        t_last = time.perf_counter()
        res.churn.write_seconds.values.append(t_last - t_first)
        try:
            t_id = _settle(ctx, tool, replica, expect(ctx.source, sorted(set(paths))))
        except ReplicaTimeout as e:
            res.churn.stale.append(e.stale)
            _repair(ctx, tool, replica, res, "churn", e)
            continue
        _add(res.cpu_churn, _cpu_delta(before, _cpu(tool.processes())))
        res.churn.after_last.values.append(t_id - t_last)
        res.churn.total.values.append(t_id - t_first)


#: Writer threads for the sustained rate: one Python thread cannot truncate and write 2,000 files a
#: second on every disk; the threads write disjoint sets of files, so no file has two writers.
SUSTAINED_WRITERS = 4


def sustained(ctx: Context, tool: LiveTool, replica: Path, res: ToolResult) -> None:
    """Rewrite files at a steady rate (change ``n`` is due at ``start + n / rate``); every ``rate/20``-th
    change is a new *probe* file whose arrival on the replica a checker thread times. Lag = the largest
    probe delay, or the catch-up after the last write, whichever is larger."""
    s = res.sustained
    assert s is not None
    rate, seconds = s.target_rate, s.seconds
    w = SUSTAINED_WRITERS
    s.writers = w
    probe_every = max(1, int(rate / 20))
    pool = ctx.writes.pick(min(len(ctx.pristine.meetings), max(w, int(rate))))
    pool = pool[: len(pool) - len(pool) % w] or pool[:1]
    outstanding: list[tuple[str, bytes, float]] = []
    lock = threading.Lock()
    writing_done = threading.Event()
    give_up = threading.Event()
    touched: list[set[str]] = [set() for _ in range(w)]
    counts = [0] * w
    failures: list[BaseException] = []
    start = time.perf_counter() + 0.05

    def writer(i: int) -> None:
        gen = gens[i]
        try:
            for n in itertools.count(i, w):
                due = start + n / rate
                if due - start >= seconds:
                    return
                ahead = due - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
                if n % probe_every == 0:
                    rel = gen.new_path(f"probe{i}")
                    data = gen.content()
                    t0 = time.perf_counter()
                    write_in_place(ctx.source / rel, data)
                    with lock:
                        outstanding.append((rel, data, t0))
                else:
                    rel = pool[n % len(pool)] if len(pool) >= w else pool[0]
                    write_in_place(ctx.source / rel, gen.content())
                touched[i].add(rel)
                counts[i] += 1
        except BaseException as e:  # handed to the main thread
            failures.append(e)

    def checker() -> None:
        while not give_up.is_set():
            with lock:
                items = list(outstanding)
            for item in items:
                rel, data, t0 = item
                if read_or_none(replica / rel) == data:
                    s.probe_lags.append(time.perf_counter() - t0)
                    with lock:
                        outstanding.remove(item)
            if writing_done.is_set() and not items:
                return
            time.sleep(0.001)

    gens = [ctx.writer(100 + i) for i in range(w)]
    threads = [threading.Thread(target=writer, args=(i,), name=f"bench-writer-{i}") for i in range(w)]
    check = threading.Thread(target=checker, name="bench-probe-checker")
    before = _cpu(tool.processes())
    check.start()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t_last = time.perf_counter()
        if failures:
            raise failures[0]
        s.changes = sum(counts)
        s.achieved_rate = s.changes / (t_last - start)
        writing_done.set()
        all_touched = sorted(set().union(*touched))
        try:
            t_id = _settle(ctx, tool, replica, expect(ctx.source, all_touched))
        except ReplicaTimeout as e:
            s.stale = e.stale
            _repair(ctx, tool, replica, res, "sustained rate", e)
            return
        s.catch_up = t_id - t_last
        elapsed = t_id - start
        s.cpu_percent = {r: 100 * v / elapsed for r, v in _cpu_delta(before, _cpu(tool.processes())).items()}
    finally:
        writing_done.set()
        for t in threads:
            t.join()
        check.join(5)
        give_up.set()
        check.join(5)
        with lock:
            s.probe_timeouts = len(outstanding)


@dataclass
class _Trial:
    kind: str  # torn, same-second, same-mtime
    rel: str
    old: bytes | None  # torn: what the replica may hold before the new version (None: no file)
    first: bytes  # torn: the new content; lost: version X
    second: bytes = b""  # lost: version Y (same size as X)
    phase: int = 0  # lost: 0 waiting for X on the replica, 1 waiting for Y, 2 done
    x_mtime: int = 0
    fd: int | None = None
    seen_bad: str = ""
    done: bool = False


def _make_trials(ctx: Context) -> list[_Trial]:
    k = ctx.settings.trials
    trials: list[_Trial] = []
    rewrites = ctx.writes.pick(3 * k)
    for i in range(k):
        if i % 2:
            rel = rewrites[i]
            trials.append(_Trial("torn", rel, read_or_none(ctx.source / rel), ctx.writes.content()))
        else:
            trials.append(_Trial("torn", ctx.writes.new_path("torn"), None, ctx.writes.content()))
    for kind, offset in (("same-second", k), ("same-mtime", 2 * k)):
        for i in range(k):
            x = ctx.writes.content()
            trials.append(_Trial(kind, rewrites[offset + i], None, x, ctx.writes.same_size(x)))
    return trials


def _next_second() -> None:
    """Sleep until just after the wall clock's next whole second, so that a version X written now and a
    version Y written up to ~0.9 s later share their mtime's second."""
    time.sleep(1.01 - time.time() % 1.0)


def _second_version(ctx: Context, t: _Trial) -> None:
    """Write Y over X in place (same size); for same-mtime, give it X's mtime back."""
    p = ctx.source / t.rel
    write_in_place(p, t.second)
    if t.kind == "same-mtime":
        os.utime(p, ns=(t.x_mtime, t.x_mtime))
    t.phase = 1


def _tally(res: ToolResult, trials: list[_Trial]) -> None:
    res.torn, res.lost_same_second, res.lost_same_mtime = Trials(), Trials(same_second=0), Trials()
    for t in trials:
        if t.kind == "torn":
            res.torn.trials += 1
            if t.seen_bad:
                res.torn.fail(t.seen_bad)
            continue
        tr = res.lost_same_second if t.kind == "same-second" else res.lost_same_mtime
        tr.trials += 1
        if not t.done:
            tr.fail(
                f"{t.rel}: {'the first version never arrived' if t.phase == 0 else 'second version lost'}"
            )


def correctness_live(ctx: Context, tool: LiveTool, replica: Path, res: ToolResult) -> None:
    """All trials at once, each on its own file: torn writes (half, 200 ms pause, rest) and same-size
    rewrites (X, then Y as soon as the replica shows X; once with a new mtime, once with X's mtime)."""
    trials = _make_trials(ctx)
    _next_second()
    start = time.perf_counter()
    for t in trials:
        if t.kind == "torn":
            t.fd = os.open(ctx.source / t.rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(t.fd, t.first[: len(t.first) // 2])
        else:
            write_in_place(ctx.source / t.rel, t.first)
            st = stat_of(ctx.source / t.rel)
            t.x_mtime = st[1] if st else 0
    halves_done = False
    same_second = 0
    deadline = start + 2 * tool.delay + min(TRIAL_WAIT, ctx.settings.settle_timeout / 2)
    try:
        while not all(t.done for t in trials) and time.perf_counter() < deadline:
            if not halves_done and time.perf_counter() - start >= HALF_PAUSE:
                for t in trials:
                    if t.fd is not None:
                        os.write(t.fd, t.first[len(t.first) // 2 :])
                        os.close(t.fd)
                        t.fd = None
                halves_done = True
            for t in trials:
                if t.done:
                    continue
                got = read_or_none(replica / t.rel)
                if t.kind == "torn":
                    if got != t.old and got != t.first and not t.seen_bad:
                        size = "no file" if got is None else f"{len(got)} of {len(t.first)} bytes"
                        t.seen_bad = f"{t.rel}: replica held {size}"
                    t.done = halves_done and got == t.first
                elif t.phase == 0 and got == t.first:
                    _second_version(ctx, t)
                    st = stat_of(ctx.source / t.rel)
                    if t.kind == "same-second" and st and st[1] // 10**9 == t.x_mtime // 10**9:
                        same_second += 1
                elif t.phase == 1 and got == t.second:
                    t.phase, t.done = 2, True
            time.sleep(POLL)
    finally:
        for t in trials:
            if t.fd is not None:
                os.close(t.fd)
                t.fd = None
    _tally(res, trials)
    assert res.lost_same_second is not None
    res.lost_same_second.same_second = same_second


# ---------------------------------------------------------------------------------------------------------
# One large file.


def _large_room(ctx: Context, copies: int) -> str | None:
    """Why the disk under the run's folder has no room for the large-file row (``copies`` copies of the
    file at once, its content if not made yet, and a margin), or None if it has."""
    mib = ctx.settings.big_mib
    files = copies + (ctx.large is None)
    need = files * (mib << 20) + LARGE_MARGIN
    free = shutil.disk_usage(ctx.work).free
    if free >= need:
        return None
    return (
        f"one large file: skipped, {free / 2**30:.1f} GiB free under {ctx.work}, the row needs "
        f"{need / 2**30:.1f} GiB ({files} copies of {mib:,} MiB and {LARGE_MARGIN >> 30} GiB to spare; "
        "--big-mib sets the size)"
    )


def _skip(ctx: Context, res: ToolResult, why: str) -> None:
    res.notes.append(why)
    ctx.say(f"[yellow]{res.name}: {why}[/]")


def _to_trash(ctx: Context, path: Path) -> None:
    """Move ``path`` into the run's ``.trash`` folder (deleted at the end, like every tree: see
    :func:`bench.runners.reset_dir`); out of a watched source, a live tool sees it deleted."""
    if not path.exists():
        return
    trash = ctx.work / ".trash"
    trash.mkdir(exist_ok=True)
    path.rename(trash / f"{path.name}.{sum(1 for _ in trash.iterdir())}")


def _check_large(ctx: Context, replica: Path, rel: str, digest: str, whole: bool) -> None:
    """Untimed, once: the replica's copy has the source's size and mtime and the content's SHA-256; with
    ``whole``, every other file and folder has the source's size and mtime too (not for rsync, whose
    replica keeps the updates its quick check lost in the correctness trials)."""
    have, want = stat_of(replica / rel), stat_of(ctx.source / rel)
    if have != want:
        raise RuntimeError(f"{rel}: the replica's copy has size and mtime {have}, not {want}")
    got = file_sha256(replica / rel)
    if got != digest:
        raise RuntimeError(f"{rel}: the replica's copy has SHA-256 {got}, not the content's {digest}")
    if not whole:
        return
    s, r = snapshot(ctx.source), snapshot(replica)
    if s.files != r.files or s.dirs != r.dirs:
        raise RuntimeError(f"after the large file the replica differs: {differences(ctx.source, replica)}")


def _large_start(ctx: Context, res: ToolResult, copies: int) -> tuple[LargeFile, Path, str] | None:
    """A tool's large-file row begun: its result, the content's path and SHA-256; None (and a line saying
    why) when the disk has no room for ``copies`` copies."""
    why = _large_room(ctx, copies)
    if why is not None:
        _skip(ctx, res, why)
        return None
    content, digest = ctx.large_content()
    lf = res.large_file = LargeFile(ctx.settings.big_mib, ctx.large_path())
    return lf, content, digest


def large_file_live(ctx: Context, tool: Standby, replica: Path, res: ToolResult) -> None:
    """One new large file, written in place into the source and closed (as the service writes a file);
    timed from the close until the replica holds it. The poll stats that one path (size and mtime); the
    bytes are checked by SHA-256 once, after. Then the file is moved out of the source (a deletion for the
    tool), and the replica waited for again, so the pair is as before."""
    start = _large_start(ctx, res, LARGE_COPIES_LIVE)
    if start is None:
        return
    lf, content, digest = start
    mib, rel = lf.mib, lf.path
    wait_quiet(ctx, tool, res, "one large file")
    pids = tool.processes()
    resets = [reset_peak_rss(pid) for pid in pids.values()]  # every one, not up to the first failure
    lf.rss_since = "row" if all(resets) else "process start"
    os.sync()  # the earlier phases' writes are on disk before the clock starts
    try:
        before = _cpu(pids)
        t0 = time.perf_counter()
        copy_in_place(content, ctx.source / rel)
        t_close = time.perf_counter()
        lf.write_seconds = t_close - t0
        try:
            t_done = _settle(
                ctx, tool, replica, expect(ctx.source, [rel]), mib / LARGE_MIN_MIB_PER_S, confirm=False
            )
        except ReplicaTimeout as e:
            _repair(ctx, tool, replica, res, "one large file", e)
        else:
            lf.seconds = t_done - t_close
            wait_quiet(ctx, tool, res, "after the large file")
            now = tool.processes()
            lf.cpu = _cpu_delta(before, _cpu(now))
            lf.peak_rss = {role: peak_rss_bytes(pid) for role, pid in now.items()}
            ctx.say(
                f"{res.name}: one large file, {mib:,} MiB: {lf.seconds:.2f} s after the close "
                f"({lf.mib_per_s or 0:,.0f} MiB/s; writing it took {lf.write_seconds:.2f} s)"
            )
            _check_large(ctx, replica, rel, digest, whole=True)
    finally:
        _to_trash(ctx, ctx.source / rel)
        try:
            _settle(ctx, tool, replica, {rel: None}, confirm=False)
        except ReplicaTimeout as e:
            _repair(ctx, tool, replica, res, "after the large file", e)


# ---------------------------------------------------------------------------------------------------------
# One-shot rsync.


def _daemon_children_done(pid: int | None) -> None:
    """Wait (briefly) until the rsync daemon has reaped its per-connection children."""
    if pid is None:
        return
    deadline = time.monotonic() + 2
    try:
        proc = psutil.Process(pid)
        while proc.children() and time.monotonic() < deadline:
            time.sleep(0.005)
    except psutil.Error:
        pass


def _run_rsync(tool: RsyncPush) -> tuple[float, float]:
    """One run: (wall seconds, CPU seconds of the client and the daemon's side)."""
    pid = tool.daemon.pid()
    before = cpu_seconds(pid) if pid is not None else 0.0
    wall, cpu = tool.run()
    _daemon_children_done(pid)
    after = cpu_seconds(pid) if pid is not None else 0.0
    return wall, cpu + after - before


def measure_rsync(ctx: Context, tool: RsyncPush, res: ToolResult) -> None:
    ctx.reset_source()
    tool.source = ctx.source
    res.commands = tool.commands()
    _phase(ctx, res, "initial sync", lambda: initial_sync_rsync(ctx, tool, res))
    _phase(ctx, res, "reconciliation", lambda: reconcile_rsync(ctx, tool, res))
    _phase(ctx, res, "torn and lost writes", lambda: correctness_rsync(ctx, tool, res))
    if ctx.settings.big_mib:
        _phase(ctx, res, "one large file", lambda: large_file_rsync(ctx, tool, res))


def initial_sync_rsync(ctx: Context, tool: RsyncPush, res: ToolResult) -> None:
    res.initial_sync = Series()
    for rep in range(ctx.settings.reps):
        tool.reset()
        os.sync()  # the emptied replica's deletions are on disk before the clock starts
        wall, cpu = _run_rsync(tool)
        diff = differences(ctx.source, tool.replica)
        if diff:
            raise RuntimeError(f"replica differs after rsync: {diff}")
        res.initial_sync.values.append(wall)
        _add(res.cpu_initial, {"rsync (client + daemon)": cpu})
        ctx.say(f"{res.name}: initial sync {rep + 1}/{ctx.settings.reps}: {wall:.2f} s")


def reconcile_rsync(ctx: Context, tool: RsyncPush, res: ToolResult) -> None:
    res.reconcile_same, res.reconcile_changed = Series(), Series()
    for _ in range(ctx.settings.reps):
        res.reconcile_same.values.append(_run_rsync(tool)[0])
    for _ in range(ctx.settings.reps):
        for p in ctx.writes.pick(ctx.settings.reconcile_changes):
            write_in_place(ctx.source / p, ctx.writes.content())
        res.reconcile_changed.values.append(_run_rsync(tool)[0])
        diff = differences(ctx.source, tool.replica)
        if diff:
            raise RuntimeError(f"replica differs after rsync: {diff}")


def correctness_rsync(ctx: Context, tool: RsyncPush, res: ToolResult) -> None:
    """The same trials for a one-shot copy, run as a cron job would: a run starts while the torn writes
    pause; for the rewrites, a run copies X, Y is written at once, and the next run should copy Y."""
    trials = _make_trials(ctx)
    torn = [t for t in trials if t.kind == "torn"]
    lost = [t for t in trials if t.kind != "torn"]
    for t in torn:
        t.fd = os.open(ctx.source / t.rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(t.fd, t.first[: len(t.first) // 2])
    start = time.perf_counter()
    p = subprocess.Popen(tool.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        halves_done = False
        while True:
            running = p.poll() is None
            if not halves_done and time.perf_counter() - start >= HALF_PAUSE:
                for t in torn:
                    assert t.fd is not None
                    os.write(t.fd, t.first[len(t.first) // 2 :])
                    os.close(t.fd)
                    t.fd = None
                halves_done = True
            for t in torn:
                got = read_or_none(tool.replica / t.rel)
                if got != t.old and got != t.first and not t.seen_bad:
                    size = "no file" if got is None else f"{len(got)} of {len(t.first)} bytes"
                    t.seen_bad = f"{t.rel}: replica held {size} until the next run"
            if not running and halves_done:
                break
            time.sleep(POLL)
    finally:
        for t in torn:
            if t.fd is not None:
                os.close(t.fd)
                t.fd = None
        if p.poll() is None:
            p.kill()
        p.wait()
    _next_second()
    for t in lost:
        write_in_place(ctx.source / t.rel, t.first)
        st = stat_of(ctx.source / t.rel)
        t.x_mtime = st[1] if st else 0
    tool.run()
    same_second = 0
    for t in lost:
        _second_version(ctx, t)
        st = stat_of(ctx.source / t.rel)
        if t.kind == "same-second" and st and st[1] // 10**9 == t.x_mtime // 10**9:
            same_second += 1
    tool.run()
    for t in lost:
        t.done = read_or_none(tool.replica / t.rel) == t.second
        t.phase = 1
    _tally(res, trials)
    assert res.lost_same_second is not None
    res.lost_same_second.same_second = same_second


def large_file_rsync(ctx: Context, tool: RsyncPush, res: ToolResult) -> None:
    """The same large file for a one-shot copy: written in place and closed, then one run (the rest of
    the tree in sync: an untimed run first), timed; checked as for a live tool. Then the file is moved out
    of the source and the replica."""
    start = _large_start(ctx, res, LARGE_COPIES_ONE_SHOT)
    if start is None:
        return
    lf, content, digest = start
    mib, rel = lf.mib, lf.path
    _run_rsync(tool)  # nothing but the large file is left to copy
    os.sync()
    try:
        t0 = time.perf_counter()
        copy_in_place(content, ctx.source / rel)
        lf.write_seconds = time.perf_counter() - t0
        wall, cpu = _run_rsync(tool)
        lf.seconds = wall
        lf.cpu = {"rsync (client + daemon)": cpu}
        ctx.say(f"{res.name}: one large file, {mib:,} MiB: {wall:.2f} s ({lf.mib_per_s or 0:,.0f} MiB/s)")
        _check_large(ctx, tool.replica, rel, digest, whole=False)
    finally:
        _to_trash(ctx, ctx.source / rel)
        _to_trash(ctx, tool.replica / rel)
