"""``--profile``: one more initial sync of standby after the measured ones, with both sides under cProfile,
summarised as the top functions per side, so that the next optimisation starts from data.

Profiling slows Python down about twice, so the profiled sync is never one of the measured repetitions.
Each side runs as ``python -m bench.profiled FILE -m engine send|receive``: every thread profiled (standby
reads, hashes, journals and applies in worker threads), merged into one file when the process ends
normally, which a SIGTERM to standby does (it stops gracefully).

Owns: the profiled run and the summary (function, calls, own time, cumulative time). Must not: change a
measured figure.
"""

from __future__ import annotations

import os
import pstats
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.measure import Context
from bench.runners import Standby
from bench.trees import FileStat, snapshot, wait_identical

#: Functions kept per side and per order.
TOP = 15


@dataclass(frozen=True)
class Hot:
    function: str  # file:line(name), shortened to the project's paths
    calls: int
    own_seconds: float
    cumulative_seconds: float


def summarise(files: list[Path], top: int = TOP) -> dict[str, list[Hot]]:
    """The ``top`` functions by cumulative time and by own time over ``files`` (cProfile outputs)."""
    if not files:
        return {"cumulative": [], "own": []}
    stats = pstats.Stats(str(files[0]))
    for f in files[1:]:
        stats.add(str(f))
    raw = stats.stats  # type: ignore[attr-defined]
    rows = []
    for (filename, line, name), (_cc, calls, own, cum, _callers) in raw.items():
        where = _short(filename)
        rows.append(Hot(f"{where}:{line}({name})" if line else f"{where}({name})", calls, own, cum))
    by_cum = sorted(rows, key=lambda h: h.cumulative_seconds, reverse=True)[:top]
    by_own = sorted(rows, key=lambda h: h.own_seconds, reverse=True)[:top]
    return {"cumulative": _rounded(by_cum), "own": _rounded(by_own)}


def _rounded(hs: list[Hot]) -> list[Hot]:
    return [Hot(h.function, h.calls, round(h.own_seconds, 4), round(h.cumulative_seconds, 4)) for h in hs]


def _short(filename: str) -> str:
    for marker in ("/engine/", "/site-packages/", "/lib/python"):
        i = filename.find(marker)
        if i >= 0:
            return filename[i + 1 :]
    return filename


def profiled_initial_sync(ctx: Context, sb: Standby, replica: Path, out: Path) -> dict[str, Any]:
    """One initial sync with both sides profiled into ``out``; the summary per side, and its wall time."""
    out.mkdir(parents=True, exist_ok=True)
    sb.profile_dir = out
    try:
        sb.reset()
        os.sync()
        sb.start_passive()
        expected: dict[str, FileStat | None] = dict(snapshot(ctx.source).files)
        t0 = time.perf_counter()
        sb.start_active()
        wall = wait_identical(ctx.source, replica, ctx.long_timeout, expected) - t0
        sb.stop()
    finally:
        sb.profile_dir = None
    return {
        "wall_seconds": round(wall, 3),
        "note": "under cProfile (about twice slower than the measured runs)",
        "sender": summarise(sorted(out.glob("send.*.prof"))),
        "receiver": summarise(sorted(out.glob("receive.*.prof"))),
    }


def print_profile(console: Console, profile: dict[str, Any]) -> None:
    """The top functions by cumulative time, per side, as a table each."""
    for side in ("sender", "receiver"):
        summary = profile.get(side)
        if not isinstance(summary, dict):
            continue
        t = Table(
            title=f"profile, {side}: top functions by cumulative, then own time ({profile.get('note')})",
            title_justify="left",
        )
        for col in ("function", "calls", "own s", "cumulative s"):
            t.add_column(col)
        busy = [h for h in summary.get("cumulative", []) if not _idle(h.function)]
        shown = busy[:10]
        shown += [h for h in summary.get("own", []) if not _idle(h.function) and h not in shown][:8]
        for h in shown:
            t.add_row(h.function, f"{h.calls:,}", f"{h.own_seconds:.3f}", f"{h.cumulative_seconds:.3f}")
        console.print(t)


#: Left out of the printed table only (the JSON keeps them): frames every run has (the interpreter
#: starting the module) and threads waiting (locks, queues, polls), which say nothing of the work.
_PLUMBING = ("<frozen", "<string>", "~(<built-in method builtins.exec>")
_WAITING = (
    "acquire' of '_thread",
    "SimpleQueue",
    "'poll' of",
    "threading.py:",
    "selectors.py:",
    "delayed_queue",
    "inotify",
    "futures/thread.py",
    "base_events.py",
    "runners.py:",
    "events.py:",
)


def _idle(function: str) -> bool:
    return function.startswith(_PLUMBING) or any(w in function for w in _WAITING)
