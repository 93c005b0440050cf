"""Ratios: every figure of standby's next to the same figure of each other tool and of the machine itself.

Owns: which figure is compared with which limit, and the ratios as numbers (``standby ÷ other``: below 1,
standby takes less time). A machine without rsync or lsyncd still gets one comparison per row, with the
machine's own limit measured in the same run (``bench.machine``):

- initial sync: ``cp -a`` of the tree followed by ``sync`` (a copy made durable, no network);
- reconciliation with nothing changed: a walk that stats every file of the tree;
- reconciliation with N files changed: that walk plus N fsynced replaces;
- change latency (p50): one fsynced replace with the folder fsynced (what one durable apply costs);
- churn of N rewrites, last write to identical: N such replaces, back to back;
- one large file of N MiB: N MiB at the slower of loopback TCP and a sequential durable write (the bytes
  must cross the one and go through the other).

The large file is compared as a time too (seconds to identical), so below 1 still means standby is
faster; its throughput against each of the machine's two rates is also given the other way round, as a
share (:func:`shares`: standby's MiB/s ÷ the machine's, higher is better, 1 is the machine's rate).

Must not: measure anything, or print. It is pure: results and limits in, numbers out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.ha import HaFigures
from bench.machine import Limits
from bench.measure import Settings, ToolResult

#: A figure of a tool (None: not measured), and the machine's limit for it (None: none measured).
Figure = Callable[[ToolResult], "float | None"]
Limit = Callable[[Limits, Settings], "float | None"]


def _per_replace(lim: Limits) -> float | None:
    return 1.0 / lim.replace_dirsync_per_s if lim.replace_dirsync_per_s > 0 else None


def _large_limit(lim: Limits, s: Settings) -> float | None:
    """Seconds for ``big_mib`` MiB at the slower of loopback TCP and the durable write (both measured)."""
    rates = (lim.loopback_mib_per_s, lim.disk_write_mib_per_s)
    return s.big_mib / min(rates) if s.big_mib and min(rates) > 0 else None


def _walk_plus(lim: Limits, n: int) -> float | None:
    one = _per_replace(lim)
    return None if lim.walk_seconds <= 0 or one is None else lim.walk_seconds + n * one


@dataclass(frozen=True)
class Metric:
    key: str  # the JSON key, stable across runs
    label: str
    figure: Figure
    limit: Limit
    limit_label: str


METRICS: tuple[Metric, ...] = (
    Metric(
        "initial_sync",
        "initial sync",
        lambda r: r.initial_sync.median if r.initial_sync else None,
        lambda lim, s: lim.cp_sync_seconds or None,
        "cp -a + sync",
    ),
    Metric(
        "reconcile_same",
        "reconcile, nothing changed",
        lambda r: r.reconcile_same.median if r.reconcile_same else None,
        lambda lim, s: lim.walk_seconds or None,
        "walk + stat of the tree",
    ),
    Metric(
        "reconcile_changed",
        "reconcile, N changed",
        lambda r: r.reconcile_changed.median if r.reconcile_changed else None,
        lambda lim, s: _walk_plus(lim, s.reconcile_changes),
        "walk + N fsynced replaces",
    ),
    Metric(
        "latency_new_p50",
        "latency, new file, p50",
        lambda r: r.latency_new.p50 if r.latency_new else None,
        lambda lim, s: _per_replace(lim),
        "one fsynced replace",
    ),
    Metric(
        "latency_rewrite_p50",
        "latency, rewrite, p50",
        lambda r: r.latency_rewrite.p50 if r.latency_rewrite else None,
        lambda lim, s: _per_replace(lim),
        "one fsynced replace",
    ),
    Metric(
        "churn",
        "churn, last write → identical",
        lambda r: r.churn.after_last.median if r.churn else None,
        lambda lim, s: None if _per_replace(lim) is None else s.churn_writes * (_per_replace(lim) or 0.0),
        "N fsynced replaces",
    ),
    Metric(
        "large_file",
        "one large file, close → identical",
        lambda r: r.large_file.seconds if r.large_file else None,
        _large_limit,
        "N MiB at min(loopback TCP, durable write)",
    ),
)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0 or a != a or b != b or a == float("inf"):
        return None
    return float(f"{a / b:.4g}")  # four significant digits: 0.0004 stays 0.0004


def ratios(
    results: Sequence[ToolResult], limits: Limits | None, settings: Settings
) -> dict[str, dict[str, float]]:
    """``{metric: {tool or "limit": standby ÷ it}}`` for every metric standby has a figure for."""
    sb = next((r for r in results if r.name == "standby"), None)
    out: dict[str, dict[str, float]] = {}
    if sb is None:
        return out
    for m in METRICS:
        mine = m.figure(sb)
        row: dict[str, float] = {}
        for r in results:
            if r.name == "standby":
                continue
            v = _ratio(mine, m.figure(r))
            if v is not None:
                row[r.name] = v
        if limits is not None:
            v = _ratio(mine, m.limit(limits, settings))
            if v is not None:
                row["limit"] = v
        if row:
            out[m.key] = row
    return out


#: The machine's rates a throughput is a share of: JSON key -> the rate in :class:`Limits`.
RATES: dict[str, Callable[[Limits], float]] = {
    "loopback_tcp": lambda lim: lim.loopback_mib_per_s,
    "durable_disk_write": lambda lim: lim.disk_write_mib_per_s,
}


def share(mib_per_s: float | None, rate: float) -> float | None:
    """``mib_per_s`` as a share of the machine's ``rate`` (four significant digits), None if either is
    unknown."""
    if mib_per_s is None or rate <= 0:
        return None
    return float(f"{mib_per_s / rate:.4g}")


def shares(results: Sequence[ToolResult], limits: Limits | None) -> dict[str, dict[str, float]]:
    """``{"large_file": {"loopback_tcp": s, "durable_disk_write": s}}``: standby's large-file throughput as
    a share of each of the machine's rates (higher is better). Empty without standby's figure or limits."""
    sb = next((r for r in results if r.name == "standby"), None)
    mine = sb.large_file.mib_per_s if sb is not None and sb.large_file is not None else None
    if limits is None or mine is None:
        return {}
    row = {key: v for key, rate in RATES.items() if (v := share(mine, rate(limits))) is not None}
    return {"large_file": row} if row else {}


def limit_rows(
    results: Sequence[ToolResult], limits: Limits, settings: Settings
) -> list[tuple[str, float | None, str, float | None, float | None]]:
    """(metric, standby's figure, the limit's name, the limit, standby ÷ limit) for the printed table."""
    sb = next((r for r in results if r.name == "standby"), None)
    rows = []
    for m in METRICS:
        mine = m.figure(sb) if sb is not None else None
        lim = m.limit(limits, settings)
        if mine is None and lim is None:
            continue
        rows.append((m.label, mine, m.limit_label, lim, _ratio(mine, lim)))
    return rows


def ha_ratios(ha: HaFigures | None) -> dict[str, dict[str, float]]:
    """The HA rows against their targets (and the rejoin against rsync --checksum from the same trees)."""
    if ha is None:
        return {}
    out: dict[str, dict[str, float]] = {}
    pairs = (
        ("failover_rto", ha.rto_s, ha.rto_target_s, None),
        ("switchover_downtime", ha.switchover_downtime_s, ha.switchover_target_s, None),
        ("rejoin_transfer", ha.rejoin_per_differ, ha.rejoin_target_per_differ, ha.rejoin_vs_rsync),
    )
    for key, value, target, vs_rsync in pairs:
        row: dict[str, float] = {}
        t = _ratio(value, target)
        if t is not None:
            row["target"] = t
        if vs_rsync is not None:
            row["rsync"] = round(vs_rsync, 3)
        if row:
            out[key] = row
    return out
