"""The SMB row: a real sender and receiver replicating into a Samba share on 127.0.0.1, next to the same
pair replicating into a local folder, in the same run: initial sync and single-change latency.

``python -m bench.smb [--files N] [--samples N]`` on its own, or as part of ``python -m bench`` when Samba
is installed and the run is root's (smbd serves as root; the tests' harness ``tests/samba.py`` starts it).
A share keeps times to 100 ns, so a file counts as arrived with its mtime at that resolution.

Must not: leave smbd or a pair running (everything stops in a ``finally``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench import positive_int
from bench.procs import Registry
from bench.runners import Standby, _q
from bench.trees import snapshot, wait_bytes, wait_identical
from bench.workload import Workload, Writes, generate, write_in_place

#: A smaller tree than the main run's: a share takes a few milliseconds per file.
DEFAULT_FILES = 2_000
DEFAULT_SAMPLES = 30


@dataclass
class TargetFigures:
    initial_sync_s: float = 0.0
    latency_p50_s: float | None = None
    latency_p90_s: float | None = None
    latency_timeouts: int = 0


@dataclass
class SmbFigures:
    files: int
    bytes: int
    local: TargetFigures = field(default_factory=TargetFigures)
    smb: TargetFigures = field(default_factory=TargetFigures)
    notes: list[str] = field(default_factory=list)

    def ratios(self) -> dict[str, dict[str, float]]:
        """SMB ÷ local, per figure (above 1: the share is slower)."""
        out: dict[str, dict[str, float]] = {}
        if self.local.initial_sync_s > 0 and self.smb.initial_sync_s > 0:
            out["smb_initial_sync"] = {"local": round(self.smb.initial_sync_s / self.local.initial_sync_s, 2)}
        if self.local.latency_p50_s and self.smb.latency_p50_s:
            out["smb_latency_p50"] = {"local": round(self.smb.latency_p50_s / self.local.latency_p50_s, 2)}
        return out


def available() -> str | None:
    """None when the SMB row can run here, else why not (one line, with the install hint)."""
    if shutil.which("smbd") is None and not Path("/usr/sbin/smbd").exists():
        return "smb: Samba is not installed (apt-get install samba)"
    if os.name != "posix" or os.geteuid() != 0:
        return "smb: smbd serves as root: run the benchmark as root for the SMB row"
    try:
        import smbclient  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return "smb: smbprotocol is not installed (pip install smbprotocol)"
    return None


class ShareStandby(Standby):
    """The same pair, its receiver writing into ``location`` (an smb:// URL) as ``user``."""

    def __init__(
        self, registry: Registry, base: Path, source: Path, view: Path, location: str, user: str
    ) -> None:
        super().__init__(registry, base, source, view)
        self.location = location
        self.user = user

    def write_config(self) -> None:
        super().write_config()
        text = self.config.read_text("utf-8")
        text = text.replace(
            f"target = {_q(self.replica)}\n",
            f'target = "{self.location}"\nsmb_username = "{self.user}"\n',
        )
        self.config.write_text(text, "utf-8")


def measure_smb(
    work: Path, files: int, samples: int, say: Callable[[str], None], seed: int = 1
) -> SmbFigures:
    """Both rows, on one generated tree, with one smbd started and stopped here."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.samba import running_samba

    workload = generate(work / "source", files, seed)
    figs = SmbFigures(workload.files, workload.total_bytes)
    registry = Registry()
    try:
        with running_samba(work / "samba") as srv:
            os.environ["STANDBY_SMB_PASSWORD"] = srv.password
            local = Standby(registry, work / "local", workload.root, work / "replica-local")
            say(f"smb: local target, {workload.files:,} files")
            _one(local, workload, local.replica, 1, figs.local, samples, say)
            share = ShareStandby(
                registry, work / "share", workload.root, srv.path / "replica", srv.url("replica"), srv.user
            )
            say(f"smb: SMB target {srv.url('replica')}, {workload.files:,} files")
            _one(share, workload, share.replica, 100, figs.smb, samples, say)
    finally:
        registry.stop_all()
        os.environ.pop("STANDBY_SMB_PASSWORD", None)
    return figs


def _one(
    tool: Standby,
    workload: Workload,
    view: Path,
    step: int,
    out: TargetFigures,
    samples: int,
    say: Callable[[str], None],
) -> None:
    """One target's figures; the files its latency samples wrote are removed again afterwards."""
    source = workload.root
    written: list[Path] = []
    try:
        tool.reset()
        view.mkdir(parents=True, exist_ok=True)
        want = snapshot(source, step).files
        os.sync()
        tool.start_passive()
        t0 = time.perf_counter()
        tool.start_active()
        out.initial_sync_s = wait_identical(source, view, 600, dict(want), mtime_step=step) - t0
        say(f"smb: initial sync {out.initial_sync_s:.2f} s")
        writes = Writes(workload, seed=7)
        lat: list[float] = []
        for _ in range(samples):
            rel = writes.new_path("smb-latency")
            data = writes.content()
            t1 = time.perf_counter()
            write_in_place(source / rel, data)
            written.append(source / rel)
            t2 = wait_bytes(view / rel, data, 10.0)
            if t2 is None:
                out.latency_timeouts += 1
            else:
                lat.append(t2 - t1)
            time.sleep(0.05)
        if lat:
            lat.sort()
            out.latency_p50_s = statistics.median(lat)
            out.latency_p90_s = lat[min(len(lat) - 1, int(len(lat) * 0.9))]
            say(f"smb: change latency p50 {out.latency_p50_s * 1000:.1f} ms")
    finally:
        tool.stop()
        for p in written:
            p.unlink(missing_ok=True)


def table(figs: SmbFigures) -> list[tuple[str, str, str, str]]:
    """Rows of (figure, local, SMB, SMB ÷ local) for printing."""

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.1f} ms"

    r = figs.ratios()
    return [
        (
            f"initial sync, {figs.files:,} files",
            f"{figs.local.initial_sync_s:.2f} s",
            f"{figs.smb.initial_sync_s:.2f} s",
            f"x{r['smb_initial_sync']['local']:.2f}" if "smb_initial_sync" in r else "-",
        ),
        (
            "single change, p50",
            ms(figs.local.latency_p50_s),
            ms(figs.smb.latency_p50_s),
            f"x{r['smb_latency_p50']['local']:.2f}" if "smb_latency_p50" in r else "-",
        ),
        ("single change, p90", ms(figs.local.latency_p90_s), ms(figs.smb.latency_p90_s), ""),
    ]


def as_json(figs: SmbFigures) -> dict[str, Any]:
    doc = asdict(figs)
    doc["ratios"] = figs.ratios()
    return doc


def print_smb(console: Console, figs: SmbFigures) -> None:
    t = Table(
        title=f"standby into an SMB share (Samba on 127.0.0.1) vs a local folder ({figs.files:,} files)",
        title_justify="left",
    )
    for col in ("figure", "local folder", "SMB share", "SMB ÷ local"):
        t.add_column(col)
    for row in table(figs):
        t.add_row(*row)
    console.print(t)
    for note in figs.notes:
        console.print(f"  note: {note}", highlight=False)


def main(argv: list[str] | None = None) -> int:
    import json

    p = argparse.ArgumentParser(
        prog="python -m bench.smb",
        description="Initial sync and single-change latency into a Samba share on 127.0.0.1, next to a local "
        "folder, in one run (needs Samba and root).",
    )
    p.add_argument(
        "--files", type=positive_int, default=DEFAULT_FILES, help="files in the tree (default %(default)s)"
    )
    p.add_argument(
        "--samples",
        type=positive_int,
        default=DEFAULT_SAMPLES,
        help="single changes timed (default %(default)s)",
    )
    args = p.parse_args(argv)
    why = available()
    if why is not None:
        print(f"python -m bench.smb: {why}", file=sys.stderr)
        return 2
    console = Console()
    work = Path(tempfile.mkdtemp(prefix="standby-bench-smb-"))
    try:
        figs = measure_smb(work, args.files, args.samples, lambda m: console.print(m, highlight=False))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_smb(console, figs)
    print(json.dumps(as_json(figs), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
