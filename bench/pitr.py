"""``python -m bench.pitr``: what point-in-time recovery costs on the benchmark's tree.

On the generated Synergy Join tree (``bench.workload``, 10,051 files by default) journaled as a sender
journals it (every file a put, then ``--rewrites`` meeting files rewritten per round), it measures:

- the first checkpoint (the whole set) and each later one (one per round of rewrites): seconds and the
  bytes it adds on disk (hard-linked files counted once), against ``cp -a`` + ``sync`` of the tree;
- a replay of the whole set at the head from the newest checkpoint, and from the first entry (no
  checkpoint): entries per second;
- the journal bytes a round adds, and from both, the disk cost of a day of retention at ``--per-hour``
  rounds an hour with a checkpoint an hour.

Owns: the scenario, its table and ``bench/results/pitr-<UTC time>.json``. Must not: leave a folder behind.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.workload import generate
from engine import checkpoint
from engine.digest import digest_bytes
from engine.journal import Journal
from engine.model import Change, Op
from engine.replay import replay

RESULTS = Path(__file__).resolve().parent / "results"


def _disk_bytes(root: Path, seen: set[tuple[int, int]]) -> int:
    """Bytes of the files below ``root`` whose inode was not counted yet (hard links once)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            key = (st.st_dev, st.st_ino)
            if key not in seen:
                seen.add(key)
                total += st.st_blocks * 512
    return total


def _journal_tree(j: Journal, root: Path) -> int:
    n = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in sorted(files):
            full = Path(dirpath) / f
            data = full.read_bytes()
            rel = full.relative_to(root).as_posix()
            st = full.stat()
            j.append(
                Change(
                    0,
                    Op.PUT,
                    rel,
                    size=len(data),
                    mtime_ns=st.st_mtime_ns,
                    digest=digest_bytes(data),
                    ts_ns=time.time_ns(),
                ),
                data,
            )
            n += 1
    j.commit()
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.pitr", description=__doc__.split("\n\n")[0] if __doc__ else ""
    )
    p.add_argument("--files", type=int, default=10_000, help="meeting files (default 10000)")
    p.add_argument(
        "--rewrites", type=int, default=1000, help="meeting files rewritten per round (default 1000)"
    )
    p.add_argument(
        "--rounds", type=int, default=3, help="rounds of rewrites, a checkpoint after each (default 3)"
    )
    p.add_argument(
        "--per-hour", type=float, default=1.0, help="rounds an hour, for the day's estimate (default 1)"
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes (default bench/results)")
    args = p.parse_args(argv)
    console = Console()
    work = Path(tempfile.mkdtemp(prefix="standby-pitr-"))
    try:
        tree = work / "tree"
        wl = generate(tree, args.files, 1)
        state = work / "state"
        jfolder = state / "journal"
        cks = checkpoint.folder_of(state)
        rng = random.Random(1)
        doc: dict[str, Any] = {"files": wl.files, "bytes": wl.total_bytes}
        os.sync()
        t0 = time.perf_counter()
        subprocess.run(["cp", "-a", str(tree), str(work / "cp")], check=True)
        os.sync()
        doc["cp_sync_s"] = round(time.perf_counter() - t0, 3)
        with closing(Journal.open(jfolder, fsync=True)) as j:
            entries = _journal_tree(j, tree)
        seen: set[tuple[int, int]] = set()
        t0 = time.perf_counter()
        first = checkpoint.build(jfolder, cks)
        doc["checkpoint_first_s"] = round(time.perf_counter() - t0, 3)
        assert first is not None
        doc["checkpoint_first_bytes"] = _disk_bytes(cks, seen)
        rounds = []
        journal_before = sum(f.stat().st_size for f in jfolder.iterdir() if f.is_file())
        for _round in range(args.rounds):
            with closing(Journal.open(jfolder, fsync=True)) as j:
                for rel in rng.sample(list(wl.meetings), min(args.rewrites, len(wl.meetings))):
                    data = os.urandom(rng.randint(1024, 8192))
                    j.append(
                        Change(
                            0,
                            Op.PUT,
                            rel,
                            size=len(data),
                            mtime_ns=time.time_ns(),
                            digest=digest_bytes(data),
                            ts_ns=time.time_ns(),
                        ),
                        data,
                    )
                    entries += 1
                j.commit()
            t0 = time.perf_counter()
            checkpoint.build(jfolder, cks)
            took = time.perf_counter() - t0
            rounds.append({"checkpoint_s": round(took, 3), "checkpoint_bytes": _disk_bytes(cks, seen)})
        journal_after = sum(f.stat().st_size for f in jfolder.iterdir() if f.is_file())
        doc["rounds"] = rounds
        doc["journal_bytes_per_round"] = (journal_after - journal_before) // max(1, args.rounds)
        # Replays of the whole set at the head: from the newest checkpoint (nothing after it), and from the
        # first entry with the checkpoints moved away.
        t0 = time.perf_counter()
        replay(jfolder, work / "from-checkpoint")
        doc["replay_from_checkpoint_s"] = round(time.perf_counter() - t0, 3)
        shutil.move(str(cks), str(work / "cks-aside"))
        t0 = time.perf_counter()
        replay(jfolder, work / "from-start")
        took = time.perf_counter() - t0
        doc["replay_from_start_s"] = round(took, 3)
        doc["replay_entries"] = entries
        doc["replay_entries_per_s"] = round(entries / took)
        per_round = doc["journal_bytes_per_round"] + sum(x["checkpoint_bytes"] for x in rounds) // max(
            1, len(rounds)
        )
        doc["day_bytes_estimate"] = int(per_round * 24 * args.per_hour + doc["checkpoint_first_bytes"])
        t = Table(
            title=f"point-in-time recovery on {wl.files:,} files ({wl.total_bytes / 1e6:.1f} MB)",
            title_justify="left",
        )
        t.add_column("figure")
        t.add_column("value")
        t.add_row("cp -a + sync of the tree (the machine's limit)", f"{doc['cp_sync_s']:.2f} s")
        t.add_row(
            "first checkpoint (the whole set)",
            f"{doc['checkpoint_first_s']:.2f} s, {doc['checkpoint_first_bytes'] / 1e6:.1f} MB",
        )
        for i, x in enumerate(rounds):
            t.add_row(
                f"checkpoint after {args.rewrites:,} rewrites (round {i + 1})",
                f"{x['checkpoint_s']:.2f} s, +{x['checkpoint_bytes'] / 1e6:.1f} MB",
            )
        t.add_row(
            f"journal per round of {args.rewrites:,} rewrites",
            f"{doc['journal_bytes_per_round'] / 1e6:.1f} MB",
        )
        t.add_row(
            "replay of the whole set from the newest checkpoint", f"{doc['replay_from_checkpoint_s']:.2f} s"
        )
        t.add_row(
            f"replay from the first entry ({entries:,} entries)",
            f"{doc['replay_from_start_s']:.2f} s ({doc['replay_entries_per_s']:,} entries/s)",
        )
        t.add_row(
            f"a day of retention at {args.per_hour:g} round(s) an hour, a checkpoint an hour",
            f"{doc['day_bytes_estimate'] / 1e6:.0f} MB",
        )
        console.print(t)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        args.out.mkdir(parents=True, exist_ok=True)
        out = args.out / f"pitr-{stamp}.json"
        out.write_text(json.dumps(doc, indent=1) + "\n", "utf-8")
        console.print(f"results: {out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
