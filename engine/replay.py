"""Point-in-time recovery: rebuild a tree from the journal, and list what the journal holds.

Restore is validate, plan, apply in order into a temporary output, rename: the output folder appears only
when it is whole. Replay starts from the first entry the journal still keeps; a journal pruned past its
start recovers only a tree that already holds everything before that (``--base``-less replays say so).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from engine.apply import Applier, PendingOp
from engine.errors import ConfigError, JournalError
from engine.journal import Journal
from engine.model import Op

log = logging.getLogger(__name__)


def list_journal(folder: Path) -> None:
    if not folder.is_dir():
        raise JournalError(f"{folder}: no journal here")
    j = Journal.open(folder, fsync=False, readonly=True)
    try:
        t = Table(title=f"journal {j.id}: entries {j.first_seq}..{j.head}")
        for col in ("segment", "first seq", "bytes", "modified"):
            t.add_column(col)
        for path, first in j.segments():
            st = path.stat()
            t.add_row(
                path.name,
                str(first),
                f"{st.st_size:,}",
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.st_mtime)),
            )
        Console().print(t)
    finally:
        j.close()


def replay(folder: Path, out: Path, until_seq: int | None = None, until_ns: int | None = None) -> int:
    """Apply the journal's entries (up to a seq or a time) into a new folder ``out``. Returns the last seq."""
    if out.exists():
        raise ConfigError(f"--out {out}: already exists; replay writes a new folder")
    if not folder.is_dir():
        raise JournalError(f"{folder}: no journal here")
    j = Journal.open(folder, fsync=False, readonly=True)
    tmp = out.with_name(f".{out.name}.replay-{os.getpid()}")
    tmp.mkdir(parents=True)
    applier = Applier(tmp, fsync=True)
    last = 0
    try:
        if j.first_seq > 1:
            log.warning(
                "replay.partial first_seq=%d (older entries were pruned: the result holds only what "
                "changed since)",
                j.first_seq,
            )
        end = j.head if until_seq is None else min(until_seq, j.head)
        cur = j.cursor(j.first_seq)
        batch: list[PendingOp] = []
        with Progress(transient=True) as progress:
            task = progress.add_task("replaying", total=max(0, end - j.first_seq + 1))
            while (c := cur.next_header()) is not None and c.seq <= end:
                if until_ns is not None and c.ts_ns > until_ns:
                    break
                if c.op is Op.PUT and c.size > (4 << 20):
                    applier.apply_batch(batch)
                    batch = []
                    large = applier.begin_large(c)
                    for chunk in cur.chunks():
                        large.write(chunk)
                    reason = large.finish()
                    if reason:
                        raise JournalError(f"entry {c.seq}: {reason}")
                    applier.apply_batch([PendingOp(c, temp=large.temp)])
                else:
                    data = b"".join(cur.chunks()) if c.op is Op.PUT else None
                    batch.append(PendingOp(c, data=data))
                    if len(batch) >= 1024:
                        applier.apply_batch(batch)
                        batch = []
                last = c.seq
                progress.advance(task)
            res = applier.apply_batch(batch)
            for p in res.problems:
                log.warning(
                    "replay.problem seq=%d path=%r code=%s reason=%s", p.seq, p.path, p.code, p.reason
                )
        cur.close()
        os.replace(tmp, out)
        log.info("replay.done out=%s last_seq=%d", out, last)
        return last
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        applier.close()
        j.close()
