"""Point-in-time recovery and the journal's tools: replay into a new folder, list, check, repair.

Restore is validate, plan, apply in order into a temporary output, rename: the output folder appears only
when it is whole. A replay that cannot be answered is refused before anything is written (a negative seq,
a seq past the head, a seq or a time before the first entry kept). Replay starts from the first entry the
journal still keeps; a journal pruned past its start recovers only what changed since (the output says so).

``--until-time`` is ISO 8601; without a UTC offset it is the local time of this machine.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from engine import checkpoint
from engine import journal as jn
from engine.apply import Applier
from engine.errors import ConfigError, JournalError
from engine.journal import Journal
from engine.scan import NoCache

log = logging.getLogger(__name__)


def list_journal(folder: Path) -> None:
    """The segments, the checkpoints and the window a replay can answer (times in UTC and local time)."""
    if not folder.is_dir():
        raise JournalError(f"{folder}: no journal here")
    j = Journal.open(folder, fsync=False, salvaging=True)
    try:
        t = Table(title=f"journal {j.id}: entries {j.first_seq}..{j.head}")
        for col in ("segment", "first seq", "bytes", "modified (local)"):
            t.add_column(col)
        for path, first in j.segments():
            st = path.stat()
            t.add_row(
                path.name,
                str(first),
                f"{st.st_size:,}",
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.st_mtime)),
            )
        con = Console()
        con.print(t)
        cps = usable_checkpoints(folder, j)
        if cps:
            ct = Table(title="checkpoints (the set after the entry)")
            for col in ("entry", "journaled", "files", "bytes"):
                ct.add_column(col)
            for c in cps:
                ct.add_row(str(c.seq), utc_and_local(c.ts_ns), f"{c.files:,}", f"{c.bytes:,}")
            con.print(ct)
        sv = j.salvage
        for k in sv.skips if sv is not None else ():
            con.print(
                f"damaged: {k} (a replay stops before it; --skip-corrupt passes over it)", highlight=False
            )
        if sv is not None and sv.missing:
            con.print(f"missing: {sv.missing} (nothing after it is read)", highlight=False)
        w = window(j, cps)
        start = w.checkpoint if w.pruned else (0, w.first_ts)  # the first moment a replay answers
        if start is None:
            con.print(f"recoverable: none (older entries were pruned and no checkpoint covers them: {w})")
        else:
            con.print(
                f"recoverable: any moment from {utc_and_local(start[1]) if start[1] else 'the first entry'} "
                f"to {utc_and_local(w.head_ts)} (entries {max(start[0], 1)}..{w.head})",
                highlight=False,
            )
    finally:
        j.close()


def utc_and_local(ns: int) -> str:
    """A moment in UTC and in this machine's local time, both labelled."""
    if not ns:
        return "(unknown)"
    try:
        utc = datetime.fromtimestamp(ns / 1e9, tz=UTC)
        utc.astimezone()
    except (OverflowError, OSError, ValueError):
        return f"(out of range: {ns} ns)"
    return f"{utc.strftime('%Y-%m-%d %H:%M:%S')} UTC ({utc.astimezone().strftime('%H:%M:%S %Z')} local)"


# -- replay -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UntilTime:
    """A ``--until-time``: the moment in ns since 1970, and how to say it back (with its time zone)."""

    ns: int
    text: str


def parse_until_time(text: str) -> UntilTime:
    """ISO 8601 with or without a UTC offset; without one it is this machine's local time."""
    try:
        return _parse_until_time(text)
    except (OverflowError, OSError, ValueError) as e:
        raise ConfigError(f"--at/--until-time {text!r}: out of range ({e})") from None


def _parse_until_time(text: str) -> UntilTime:
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"--until-time: not an ISO 8601 time: {text!r} (e.g. 2026-11-25T10:00:00 for local time, "
            "2026-11-25T10:00:00+01:00 or 2026-11-25T09:00:00Z)"
        ) from None
    if dt.tzinfo is None:
        local = dt.astimezone()  # a naive time is local time
        return UntilTime(_ns(local), f"{text} local time (UTC{_offset(local)})")
    return UntilTime(_ns(dt), text)


def _ns(dt: datetime) -> int:
    return int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000


def _offset(dt: datetime) -> str:
    z = dt.strftime("%z") or "+0000"
    return f"{z[:3]}:{z[3:5]}"


def _when(ns: int) -> str:
    try:
        return datetime.fromtimestamp(ns / 1e9).astimezone().isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return f"(out of range: {ns} ns)"


@dataclass(frozen=True, slots=True)
class Window:
    first: int  # first seq kept
    head: int
    first_ts: int  # wall time of the first kept entry (0 if unknown or no entry)
    head_ts: int
    #: The oldest checkpoint a replay can start from (seq, time): one the journal goes on from.
    checkpoint: tuple[int, int] | None = None

    @property
    def pruned(self) -> bool:
        return self.first > 1

    def __str__(self) -> str:
        if self.head < self.first:
            return "the journal holds no entry"
        s = f"the journal holds seqs {self.first}..{self.head}"
        if self.first_ts and self.head_ts:
            s += f", written {_when(self.first_ts)} .. {_when(self.head_ts)}"
        if self.pruned:
            s += f"; entries before {self.first} were pruned"
            if self.checkpoint is not None:
                s += f"; the oldest checkpoint is at seq {self.checkpoint[0]} ({_when(self.checkpoint[1])})"
        return s


def usable_checkpoints(folder: Path, j: Journal) -> list[checkpoint.Checkpoint]:
    """The checkpoints beside the journal in ``folder`` that the journal goes on from."""
    return checkpoint.usable(checkpoint.list_checkpoints(folder.parent / checkpoint.CHECKPOINTS), j)


def window(j: Journal, checkpoints: list[checkpoint.Checkpoint] | None = None) -> Window:
    def ts(seq: int) -> int:
        cur = j.cursor(seq)
        try:
            c = cur.next_header()
            return c.ts_ns if c is not None else 0
        finally:
            cur.close()

    oldest = (checkpoints[0].seq, checkpoints[0].ts_ns) if checkpoints else None
    if j.head < j.first_seq:
        return Window(j.first_seq, j.head, 0, 0, oldest)
    return Window(j.first_seq, j.head, ts(j.first_seq), ts(j.head), oldest)


def refuse_unanswerable(
    j: Journal,
    until_seq: int | None,
    until: UntilTime | None,
    checkpoints: list[checkpoint.Checkpoint] | None = None,
) -> Window:
    """The journal's window; ConfigError (exit 2) naming it when a replay up to there cannot be answered."""
    w = window(j, checkpoints)
    _refuse_unanswerable(w, until_seq, until)
    return w


def _refuse_unanswerable(w: Window, until_seq: int | None, until: UntilTime | None) -> None:
    """One clear line for a replay whose tree cannot be rebuilt (ConfigError: exit 2). Once entries were
    pruned, a moment is answerable only from a checkpoint at or before it: files unchanged since the first
    entry kept are in no entry, and a tree rebuilt without them would be partial."""
    ck = w.checkpoint if w.pruned else None
    if until_seq is not None:
        if until_seq < 0:
            raise ConfigError(f"--until-seq {until_seq}: a seq is not negative ({w})")
        if until_seq > w.head:
            raise ConfigError(f"--until-seq {until_seq} is past the journal's head {w.head} ({w})")
        if w.pruned and (ck is None or until_seq < ck[0]):
            raise ConfigError(
                f"--until-seq {until_seq}: the set as it was then cannot be rebuilt: older entries were "
                f"pruned and no checkpoint is at or before it ({w})"
            )
        if until_seq < w.first - (1 if ck is not None else 0):
            raise ConfigError(f"--until-seq {until_seq} is before the journal's first entry, {w.first} ({w})")
    if w.pruned and ck is None:
        raise ConfigError(
            f"the whole set cannot be rebuilt: {w}, no checkpoint covers what was pruned, and files "
            "unchanged since then are in no entry kept (standby restore still puts back a file changed since)"
        )
    if until is not None:
        if w.head < w.first and ck is None:
            raise ConfigError(f"--until-time {until.text}: {w}")
        if ck is not None and until.ns < ck[1]:
            raise ConfigError(
                f"--until-time {until.text} is before the oldest checkpoint, at {_when(ck[1])} (older "
                f"entries were pruned) ({w})"
            )
        if ck is None and w.first_ts and until.ns < w.first_ts:
            raise ConfigError(
                f"--until-time {until.text} is before the journal's first entry, at {_when(w.first_ts)} ({w})"
            )


@dataclass(frozen=True, slots=True)
class Basis:
    """Where a replay starts and ends, and what damage it meets on the way."""

    base: checkpoint.Checkpoint | None  # the checkpoint it starts from (None: the journal's first entry)
    start: int  # the first entry to apply
    end: int  # the last entry it may apply (the loop also stops at the moment's time)
    passed_over: tuple[str, ...] = ()  # damaged checkpoints passed over for an older one
    omit: tuple[tuple[str, str], ...] = ()  # --skip-corrupt: damaged files of the base left out, and why
    damage: jn.Skip | None = None  # without --skip-corrupt: the damage the replay stops before
    skips: tuple[jn.Skip, ...] = ()  # with --skip-corrupt: the damage it passes over
    missing: str = ""  # a missing segment the replay stops before (never jumped)


def short_of_missing(j: Journal, until_seq: int | None) -> int | None:
    """A seq past a missing segment, or past damage the journal ends in, is asked as the head (None): the
    replay answers up to the entry before it and says so; a missing segment is never jumped."""
    sv = j.salvage
    if sv is not None and (sv.missing or _ends_in_damage(j)) and until_seq is not None and until_seq > j.head:
        return None
    return until_seq


def _ends_in_damage(j: Journal) -> list[jn.Skip]:
    """The damage the journal ends in: nothing whole after it (not a torn tail: a whole frame follows)."""
    sv = j.salvage
    return [k for k in sv.skips if k.next_seq is None and k.after == j.head] if sv is not None else []


def basis(
    j: Journal,
    cps: list[checkpoint.Checkpoint],
    w: Window,
    until_seq: int | None,
    until_ns: int | None,
    skip_corrupt: bool = False,
) -> Basis:
    """The replay's plan: the newest whole checkpoint at or before the moment (each candidate's files
    checked against its manifest), and the journal damage between it and the moment."""
    candidates = checkpoint.at_or_before(cps, until_seq, until_ns)
    passed: list[str] = []
    base = None
    omit: tuple[tuple[str, str], ...] = ()
    first_bad: tuple[checkpoint.Checkpoint, list[tuple[str, str]]] | None = None
    for c in reversed(candidates):
        problems = checkpoint.verify(c)
        if not problems:
            base = c
            break
        passed.append(checkpoint.describe_damage(c, problems))
        first_bad = first_bad or (c, problems)
    if base is None and w.pruned and first_bad is not None:
        c, problems = first_bad
        if not skip_corrupt or any(not path for path, _ in problems):
            raise checkpoint.CheckpointDamaged(
                f"{checkpoint.describe_damage(c, problems)}; no older checkpoint is whole and the entries "
                "before it were pruned"
                + (
                    ""
                    if skip_corrupt
                    else ": --skip-corrupt rebuilds from it without its damaged files, listed"
                )
            )
        base, omit, passed = c, tuple(problems), passed[1:]
    start = base.seq + 1 if base is not None else j.first_seq
    end = j.head if until_seq is None else min(until_seq, j.head)
    sv = j.salvage
    if sv is None:
        return Basis(base, start, end, tuple(passed), omit)
    # Asked up to the head (or any time): a missing segment or damage after the head is met too.
    missing = sv.missing if sv.missing and until_seq is None else ""
    touching = [k for k in sv.skips if k.touches(start, end)]
    if until_seq is None:
        touching += [k for k in _ends_in_damage(j) if k not in touching]
    if skip_corrupt:
        return Basis(base, start, end, tuple(passed), omit, None, tuple(touching), missing)
    damage = touching[0] if touching else None
    if damage is not None:
        end = min(end, damage.after)
    return Basis(base, start, end, tuple(passed), omit, damage, (), missing)


@dataclass(frozen=True, slots=True)
class ReplayResult:
    first: int  # first entry applied
    last: int  # last entry applied (first - 1: none)
    checkpoint: int | None = None  # the checkpoint it started from (the set after that entry)
    #: Why the tree is the set at an earlier moment than asked: damage or a missing segment after ``last``.
    stopped: str = ""
    skipped: tuple[str, ...] = ()  # --skip-corrupt: what was passed over (entries, a checkpoint's files)
    notes: tuple[str, ...] = ()  # damaged checkpoints passed over for an older one; entries not applied

    def summary(self, out: Path, until: UntilTime | None = None) -> str:
        parts = []
        if self.checkpoint is not None:
            parts.append(f"from the checkpoint at seq {self.checkpoint}")
        if self.last >= self.first:
            parts.append(f"replayed seqs {self.first}..{self.last}")
        s = (" then ".join(parts) or "replayed no entry") + f" into {out}"
        if until is not None and not self.stopped:
            s += f" (entries up to {until.text})"
        lines = [s]
        lines += [f"note: {n}" for n in self.notes[:10]]
        if len(self.notes) > 10:
            lines.append(f"note: and {len(self.notes) - 10} more (in the log)")
        if self.skipped:
            lines.append(
                f"skipped ({len(self.skipped)}), so the tree may differ from the set at that moment there:"
            )
            lines += [f"  {k}" for k in self.skipped]
        if self.stopped:
            lines.append(
                f"STOPPED at entry {self.last}: {self.stopped}. {out} holds the set as it was after entry "
                f"{self.last}, not at the moment asked. --skip-corrupt goes past damaged entries and lists "
                "them; a missing segment is never jumped"
            )
        return "\n".join(lines)


def replay(
    folder: Path,
    out: Path,
    until_seq: int | None = None,
    until: UntilTime | None = None,
    skip_corrupt: bool = False,
) -> ReplayResult:
    """The set as it was after an entry or at a moment, into a new folder ``out``: from the newest whole
    checkpoint at or before it (if any), then the entries after it. The journal is read past its damage:
    the replay stops at the last whole entry before the first damage it meets (or, with
    ``skip_corrupt``, passes over it) and at a missing segment, and says so."""
    if out.exists():
        raise ConfigError(f"--out {out}: already exists; replay writes a new folder")
    if not folder.is_dir():
        raise JournalError(f"{folder}: no journal here")
    j = Journal.open(folder, fsync=False, salvaging=True)
    try:
        cps = usable_checkpoints(folder, j)
        w = window(j, cps)
        until_seq = short_of_missing(j, until_seq)
        _refuse_unanswerable(w, until_seq, until)
        until_ns = None if until is None else until.ns
        b = basis(j, cps, w, until_seq, until_ns, skip_corrupt)
    except BaseException:
        j.close()
        raise
    if b.base is None and w.pruned:  # refused above; kept as the invariant it is
        j.close()
        raise ConfigError(f"no checkpoint to start from ({w})")
    tmp = out.with_name(f".{out.name}.replay-{os.getpid()}")
    applier: Applier | None = None
    problems: list[str] = []
    try:
        if b.base is not None:
            omit = {p for p, _ in b.omit}
            shutil.copytree(  # real copies: the output is the user's to change
                b.base.tree, tmp, symlinks=True, ignore=_leave_out(b.base.tree, omit) if omit else None
            )
        else:
            tmp.mkdir(parents=True)
        applier = Applier(tmp, fsync=True, cache=NoCache())
        with bar("replaying", max(0, b.end - b.start + 1)) as advance:
            last, _ts = checkpoint.apply_entries(j, applier, tmp, b.start, b.end, until_ns, advance, problems)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if applier is not None:
            applier.close()
        j.close()
    stopped = ""
    if b.damage is not None and (last >= b.damage.after or b.damage.after < b.start):
        stopped = f"the journal is damaged after it: {b.damage}"
    elif b.missing and last == j.head:
        stopped = b.missing
    skipped = [f"checkpoint {b.base.seq if b.base else '?'} file {p}: {why}" for p, why in b.omit]
    skipped += [str(k) for k in b.skips if k.after <= last]  # met: the loop went past it, or ended in it
    notes = [f"passed over: {n}" for n in b.passed_over] + [f"not applied: {p}" for p in problems]
    log.info(
        "replay.done out=%s last_seq=%d checkpoint=%s stopped=%r skipped=%d",
        out,
        last,
        b.base.seq if b.base else "-",
        stopped,
        len(skipped),
    )
    return ReplayResult(
        b.start, last, b.base.seq if b.base is not None else None, stopped, tuple(skipped), tuple(notes)
    )


@contextmanager
def bar(label: str, total: int) -> Iterator[Callable[[], None]]:
    """A progress bar on the terminal while the work runs (gone when it ends); yields its step."""
    with Progress(transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda: progress.advance(task)


def _leave_out(root: Path, omit: set[str]) -> Callable[[str, list[str]], set[str]]:
    def ignore(dirpath: str, names: list[str]) -> set[str]:
        rel = Path(dirpath).relative_to(root).as_posix()
        return {n for n in names if (n if rel == "." else f"{rel}/{n}") in omit}

    return ignore


# -- check and repair ---------------------------------------------------------------------------------------


def _span(first: int, last: int) -> str:
    return f"entries {first}..{last}" if last >= first else "no entry"


def check_journal(folder: Path, config: Path | str = "FILE") -> bool:
    """Print what a whole-journal check found; True when the journal is whole (a torn tail is not damage:
    the sender cuts it when it next opens the journal). Read-only: takes no lock."""
    res = jn.check(folder)
    lines = [f"journal {res.id or '(no id)'} in {folder}: {len(res.scans) + len(res.later)} segment(s)"]
    bad = res.bad
    if res.problem:
        lines.append(f"damaged: {res.problem}")
        lines.append("a repair cannot rebuild this: restore the journal folder from a backup")
    elif bad is None:
        lines.append(f"whole: {_span(res.first_seq, res.last_seq)}")
    elif res.torn_tail_only:
        lines.append(f"whole: {_span(res.first_seq, res.last_seq)}")
        lines.append(
            f"torn tail: {bad.path.name} bytes {bad.end}..{bad.size} ({bad.problem}): an interrupted "
            "append, cut when the sender next opens the journal"
        )
    else:
        lines.append(f"damaged: segment {bad.path} at byte {bad.at}: {bad.problem}")
        where = f" (up to byte {bad.end} of {bad.path.name})" if bad.end else ""
        lines.append(f"valid prefix: {_span(res.first_seq, res.last_seq)}{where}")
        aside = [f"{bad.path.name} bytes {bad.end}..{bad.size}" if bad.end else f"{bad.path.name} (whole)"]
        aside += [f"{p.name} (whole)" for p in res.later]
        lines.append("a repair sets aside (moves, never deletes): " + ", ".join(aside))
        lines.append(f"run: standby journal repair --config {config}   (with the sender stopped)")
    print("\n".join(lines))
    return not res.damaged


def repair_journal(folder: Path) -> None:
    """Keep the valid prefix, set the rest aside, print what was set aside. The caller holds the lock."""
    res = jn.repair(folder)
    chk = res.check
    if res.aside is None:
        print(
            f"journal {chk.id} in {folder} is whole ({_span(chk.first_seq, chk.last_seq)}): nothing to repair"
        )
        return
    print(f"journal {chk.id} repaired: kept {_span(chk.first_seq, chk.last_seq)}; set aside in {res.aside}:")
    for line in res.moved:
        print(f"  {line}")
    # A checkpoint built from entries set aside would be taken for one of the entries written next.
    for c in checkpoint.list_checkpoints(folder.parent / checkpoint.CHECKPOINTS):
        if c.seq > chk.last_seq:
            os.replace(c.path, Path(res.aside) / f"checkpoint-{c.path.name}")
            print(f"  checkpoint at seq {c.seq} (built from entries set aside)")
    print(
        f"the sender goes on from seq {chk.last_seq + 1}; a receiver that applied later entries starts a new "
        "stream there and is reconciled"
    )
