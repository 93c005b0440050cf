"""Golden damaged journals and checkpoints for point-in-time recovery (used by tests/test_pitr_golden.py).

Regenerate from the repository root (it rewrites ``tests/data/pitr/`` from scratch), then commit it:

    .venv/bin/python -m tests.data.make_pitr_golden
    .venv/bin/python tests/data/make_pitr_golden.py              # the same, as a script
    .venv/bin/python -m tests.data.make_pitr_golden --out /tmp/pitr    # somewhere else

The output is byte-identical on every run (tests/test_pitr_golden.py checks it): the history's contents,
file times (``mtime_ns``) and journal times (``ts_ns``) are fixed, the journal's id is written into
``journal.id`` before the journal is first opened (``Journal.open`` only draws a random id when there is
none), and each checkpoint's ``manifest.jsonl`` is rewritten sorted by path (a build writes it in the
order the file system lists the tree).

What is built, with the real engine (``engine.journal.Journal`` with a small ``segment_bytes``, and
``engine.checkpoint.build``): the history below (puts, a touch, deletes, file and folder renames, mkdirs,
an rmdir) in 8 segments of 3 entries, and checkpoints after entries 6 and 14. Then each case is a copy of
that state with one kind of damage, in ``pitr/<case>/state/{journal,checkpoints}``:

- ``clean``: no damage.
- ``torn-tail``: the last segment cut in the middle of entry 24's content (an interrupted append).
- ``corrupt-entry``: a flipped byte in entry 11's content frame (segment 10, between the checkpoints).
- ``corrupt-header``: a flipped byte in entry 17's header frame (segment 16, after the newest checkpoint).
- ``bad-segment-header``: a flipped byte in the header of segment 19 (entries 19..21).
- ``missing-segment``: segment 16 (entries 16..18) removed.
- ``damaged-checkpoint``: a byte of ``docs/README.txt`` flipped in the checkpoint at 14 (same size, time).
- ``damaged-checkpoint-pruned``: as ``damaged-checkpoint``, plus the segments before entry 7 removed (as a
  prune up to the checkpoint at 6 does) and ``docs/notes.txt`` removed from the checkpoint at 6: no whole
  checkpoint is left and the entries before the oldest one are gone.

``pitr/expected.json`` holds the history, the clean layout (segments, checkpoints), the set after every
entry (``trees``: path -> xxh3_128 hex; ``mtimes``; ``folders``), computed by the small model below and
checked here against a real replay of the clean journal at every entry, and per case where its damage is
(segment, entry, byte offsets), found by walking the frames independently of the engine's scanners.

Git keeps neither file times, hard links nor empty folders: use :func:`materialize` to get a working copy
of a case (a copy, because a replay or a build may write beside the journal; the checkpoint files' times
are set back from their manifest; the checkpoint trees hold no empty folder, which this script checks).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root on the path, for `engine`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine import checkpoint, codec
from engine.digest import digest_bytes
from engine.journal import END_HINT, Journal
from engine.model import Change, Op, chunk_count

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "pitr"
JOURNAL_ID = "9017d0e5ba5e1e7700c0ffee5eed0001"
SEGMENT_BYTES = 560
#: Entry ``seq`` was journaled at T0_S + 60 * seq seconds (2025-11-25T10:00:00Z + seq minutes).
T0_S = 1_764_064_800
#: A put's file time: MTIME0_NS + seq seconds.
MTIME0_NS = 1_700_000_000_000_000_000
CHECKPOINTS = (6, 14)
#: The clean layout: each segment's (first, last) entry.
SEGMENTS = ((1, 3), (4, 6), (7, 9), (10, 12), (13, 15), (16, 18), (19, 21), (22, 24))
CASES = (
    "clean",
    "torn-tail",
    "corrupt-entry",
    "corrupt-header",
    "bad-segment-header",
    "missing-segment",
    "damaged-checkpoint",
    "damaged-checkpoint-pruned",
)


def ts_ns(seq: int) -> int:
    return (T0_S + 60 * seq) * 1_000_000_000


def _text(path: str, version: int, size: int) -> bytes:
    line = f"{path} version {version}: the quick brown fox jumps over the lazy dog.\n".encode()
    return (line * (size // len(line) + 1))[:size]


@dataclass(frozen=True, slots=True)
class Step:
    """One entry of the history: the change (seq filled in by :func:`history`) and a put's content."""

    change: Change
    content: bytes | None = None


def _put(path: str, version: int, size: int) -> tuple[str, str, bytes]:
    return ("put", path, _text(path, version, size))


def history() -> list[Step]:
    """The entries 1..24, with their seqs, times and contents."""
    logo = bytes((i * 37 + 11) % 256 for i in range(150))
    raw: list[tuple[str, str, bytes | str]] = [  # (kind, path, a put's content or a rename's target)
        _put("config/app.json", 1, 120),  # 1
        _put("docs/readme.txt", 1, 130),  # 2
        _put("docs/notes.txt", 1, 110),  # 3
        ("mkdir", "media", ""),  # 4
        ("put", "media/logo.bin", logo),  # 5
        _put("config/app.json", 2, 200),  # 6  <- checkpoint
        ("delete", "docs/notes.txt", ""),  # 7
        _put("data/r1/m1.json", 1, 150),  # 8
        _put("data/r1/m2.json", 1, 150),  # 9
        ("rename", "docs/readme.txt", "docs/README.txt"),  # 10
        _put("config/app.json", 3, 270),  # 11
        ("rename", "data/r1", "data/r2"),  # 12 (a folder)
        _put("data/r2/m3.json", 1, 200),  # 13
        ("touch", "media/logo.bin", ""),  # 14  <- checkpoint
        _put("logs/app.log", 1, 200),  # 15
        ("mkdir", "archive", ""),  # 16
        _put("config/app.json", 4, 300),  # 17
        ("delete", "data/r2/m1.json", ""),  # 18
        _put("docs/README.txt", 2, 200),  # 19
        ("rename", "config/app.json", "archive/app-v4.json"),  # 20 (a file into a folder)
        _put("config/app.json", 5, 210),  # 21
        _put("logs/app.log", 2, 260),  # 22
        ("rmdir", "data", ""),  # 23 (and all below it)
        _put("data/r3/m1.json", 1, 150),  # 24
    ]
    steps: list[Step] = []
    for seq, (kind, path, arg) in enumerate(raw, start=1):
        if kind == "put":
            assert isinstance(arg, bytes)
            data = arg
            c = Change(seq, Op.PUT, path, size=len(data), mtime_ns=MTIME0_NS + seq * 10**9)
            c = replace(c, digest=digest_bytes(data), chunks=chunk_count(len(data)), ts_ns=ts_ns(seq))
            steps.append(Step(c, data))
        elif kind == "touch":
            (held,) = [s.content for s in steps if s.change.op is Op.PUT and s.change.path == path][-1:]
            assert held is not None  # the content whose time changes
            c = Change(seq, Op.TOUCH, path, size=len(held), mtime_ns=MTIME0_NS + seq * 10**9)
            steps.append(Step(replace(c, digest=digest_bytes(held), ts_ns=ts_ns(seq))))
        else:
            assert isinstance(arg, str)
            steps.append(Step(Change(seq, Op(kind), path, dst=arg, ts_ns=ts_ns(seq))))
    return steps


# -- the model: what the replicated set holds after each entry (pure) ---------------------------------------


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder + "/")


@dataclass
class Model:
    """Files (path -> (xxh3 hex, mtime_ns)) and folders, moved by entries the way the applier does."""

    files: dict[str, tuple[str, int]] = field(default_factory=dict)
    folders: set[str] = field(default_factory=set)

    def _parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.folders.add("/".join(parts[:i]))

    def _drop(self, path: str) -> None:
        self.files = {p: v for p, v in self.files.items() if not _under(p, path)}
        self.folders = {d for d in self.folders if not _under(d, path)}

    def apply(self, step: Step) -> None:
        c = step.change
        if c.op is Op.PUT:
            assert step.content is not None and c.path not in self.folders
            self._parents(c.path)
            self.files[c.path] = (digest_bytes(step.content).hex(), c.mtime_ns)
        elif c.op is Op.TOUCH:
            old = self.files.get(c.path)
            if old is not None and old[0] == c.digest.hex():
                self.files[c.path] = (old[0], c.mtime_ns)
        elif c.op is Op.MKDIR:
            assert c.path not in self.files
            self._parents(c.path)
            self.folders.add(c.path)
        elif c.op in (Op.DELETE, Op.RMDIR):
            self._drop(c.path)
        elif c.op is Op.RENAME:
            src, dst = c.path, c.dst
            if src not in self.files and src not in self.folders:
                return  # nothing to move (the applier reports a missing source)
            moving = {p: v for p, v in self.files.items() if _under(p, src)}
            folders = {d for d in self.folders if _under(d, src)}
            self._drop(src)
            self._drop(dst)
            self._parents(dst)
            self.files.update({dst + p[len(src) :]: v for p, v in moving.items()})
            self.folders |= {dst + d[len(src) :] for d in folders}

    def trees(self) -> tuple[dict[str, str], dict[str, int], list[str]]:
        """(path -> xxh3 hex, path -> mtime_ns, folders), sorted."""
        paths = sorted(self.files)
        return (
            {p: self.files[p][0] for p in paths},
            {p: self.files[p][1] for p in paths},
            sorted(self.folders),
        )


def model_after(steps: Iterable[Step], start: Model | None = None) -> Model:
    m = Model(dict(start.files), set(start.folders)) if start is not None else Model()
    for s in steps:
        m.apply(s)
    return m


# -- reading a working copy back ----------------------------------------------------------------------------


def snapshot(root: Path) -> tuple[dict[str, str], dict[str, int], list[str]]:
    """A folder on disk as :meth:`Model.trees` says it: (path -> xxh3 hex, path -> mtime_ns, folders)."""
    files: dict[str, str] = {}
    mtimes: dict[str, int] = {}
    folders: list[str] = []
    for dirpath, dirs, names in os.walk(root):
        rel = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel == "." else f"{rel}/"
        folders += [prefix + d for d in dirs]
        for n in names:
            full = Path(dirpath) / n
            files[prefix + n] = digest_bytes(full.read_bytes()).hex()
            mtimes[prefix + n] = full.stat().st_mtime_ns
    paths = sorted(files)
    return {p: files[p] for p in paths}, {p: mtimes[p] for p in paths}, sorted(folders)


def materialize(case_dir: Path, dest: Path) -> Path:
    """A working copy of ``case_dir/state`` at ``dest/state`` (returned): plain copies of every file, and
    each checkpoint file's time set back from its manifest (git does not keep file times)."""
    state = dest / "state"
    shutil.copytree(case_dir / "state", state)
    for manifest in sorted(state.glob(f"{checkpoint.CHECKPOINTS}/*/{checkpoint.MANIFEST}")):
        tree = manifest.parent / "tree"
        for line in manifest.read_text("utf-8").splitlines():
            rec = json.loads(line)
            f = tree / rec["p"]
            if f.exists():  # a file the case removed stays missing
                os.utime(f, ns=(rec["m"], rec["m"]))
    return state


# -- frames: where each entry is, read independently of the engine's scanners -------------------------------


@dataclass(frozen=True, slots=True)
class Where:
    seq: int
    start: int  # offset of its header frame
    content: int  # offset of its first content frame (== end when none)
    end: int  # offset just past its last frame


def entries_in(segment: Path) -> tuple[int, list[Where]]:
    """The end of the segment's header frame and every entry in it, by offset."""
    buf = segment.read_bytes()
    res = codec.decode_at(buf, 0)
    assert not isinstance(res, codec.Torn), segment
    off = header_end = res[1]
    out: list[Where] = []
    while off < len(buf):
        res = codec.decode_at(buf, off)
        assert not isinstance(res, codec.Torn), (segment, off)
        value, nxt = res
        start, content = off, nxt
        for _ in range(int(value.get("c", 0))):
            chunk = codec.decode_at(buf, nxt)
            assert not isinstance(chunk, codec.Torn)
            nxt = chunk[1]
        out.append(Where(int(value["s"]), start, content, nxt))
        off = nxt
    return header_end, out


def seg_name(first: int) -> str:
    return f"{first:020d}.sbj"


def _flip(path: Path, offset: int) -> None:
    """Flip the low bit of one byte, keeping the file's size and time (written as a new file: a checkpoint
    file may be a hard link shared with another checkpoint)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    st = path.stat()
    path.unlink()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# -- building -----------------------------------------------------------------------------------------------


def build_clean(state: Path, steps: list[Step]) -> None:
    """The clean state: the journal of ``steps`` and the checkpoints, built by the engine."""
    folder = state / "journal"
    folder.mkdir(parents=True)
    (folder / "journal.id").write_text(JOURNAL_ID + "\n", "ascii")  # before open: no random id is drawn
    j = Journal.open(folder, fsync=False, segment_bytes=SEGMENT_BYTES)
    try:
        for s in steps:
            got = j.append(s.change, s.content)
            assert got == s.change, (got, s.change)
        j.commit()
    finally:
        j.close()
    # A clean close's hint of where the committed entries end: the cases are what a crash or damage leaves
    # (no clean close), and a writer's open is not what they test.
    (folder / END_HINT).unlink()
    layout = []
    for p in sorted(folder.glob("*.sbj")):
        _hdr, found = entries_in(p)
        layout.append((found[0].seq, found[-1].seq))
    assert tuple(layout) == SEGMENTS, f"the segment layout changed: {layout}; update SEGMENTS and the tests"
    cks = state / checkpoint.CHECKPOINTS
    for seq in CHECKPOINTS:
        c = checkpoint.build(folder, cks, upto=seq)
        assert c is not None and c.seq == seq
    for c in checkpoint.list_checkpoints(cks):
        manifest = c.path / checkpoint.MANIFEST
        recs = [json.loads(line) for line in manifest.read_text("utf-8").splitlines()]
        lines = [json.dumps(r) for r in sorted(recs, key=lambda r: r["p"])]
        manifest.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
        for dirpath, dirs, names in os.walk(c.tree):
            assert dirs or names, f"{dirpath}: an empty folder (git would not keep it)"
    assert sorted(p.name for p in cks.iterdir()) == [f"{s:012d}" for s in CHECKPOINTS]


def check_against_replay(state: Path, steps: list[Step], scratch: Path) -> None:
    """The model is the engine's own replay of the clean journal, after every entry (files, times and
    folders): from the journal alone, and from the checkpoints."""
    from engine.replay import replay

    bare = scratch / "bare"
    shutil.copytree(state / "journal", bare / "journal")
    for root in (state, bare):
        for seq in range(1, len(steps) + 1):
            out = scratch / f"replay-{root.name}-{seq}"
            with contextlib.redirect_stdout(io.StringIO()):  # its progress bar
                replay(root / "journal", out, until_seq=seq)
            want = model_after(steps[:seq]).trees()
            assert snapshot(out) == want, (root, seq, snapshot(out), want)
            shutil.rmtree(out)


def _segment(state: Path, first: int) -> Path:
    return state / "journal" / seg_name(first)


def _entry(state: Path, seq: int) -> tuple[Path, Where]:
    first = max(f for f, _last in SEGMENTS if f <= seq)
    path = _segment(state, first)
    (where,) = [w for w in entries_in(path)[1] if w.seq == seq]
    return path, where


def damage(case: str, state: Path) -> dict[str, object]:
    """Damage the copy ``state`` as ``case`` says; where it is, for expected.json."""
    if case == "clean":
        return {}
    if case == "torn-tail":
        path, w = _entry(state, 24)
        cut = (w.content + w.end) // 2
        with open(path, "rb+") as f:
            f.truncate(cut)
        return {"segment": path.name, "entry": 24, "bytes": [w.start, cut], "size_was": w.end}
    if case == "corrupt-entry":
        path, w = _entry(state, 11)
        nxt = _entry(state, 12)[1]
        _flip(path, (w.content + w.end) // 2)  # inside the content frame's payload
        return {"segment": path.name, "entry": 11, "bytes": [w.start, nxt.start], "frame": w.content}
    if case == "corrupt-header":
        path, w = _entry(state, 17)
        nxt = _entry(state, 18)[1]
        _flip(path, (w.start + codec.HEADER_SIZE + w.content) // 2)  # inside the header frame's payload
        return {
            "segment": path.name,
            "entry": 17,
            "bytes": [w.start, nxt.start],
            "frame": w.start,
            "whole_after": w.content,
        }
    if case == "bad-segment-header":
        path = _segment(state, 19)
        header_end, _found = entries_in(path)
        _flip(path, header_end // 2)
        return {"segment": path.name, "entries": [19, 21], "header_end": header_end}
    if case == "missing-segment":
        path = _segment(state, 16)
        path.unlink()
        return {"segment": path.name, "entries": [16, 18]}
    cks = state / checkpoint.CHECKPOINTS
    newest = cks / f"{CHECKPOINTS[1]:012d}" / "tree" / "docs" / "README.txt"
    _flip(newest, 7)
    out: dict[str, object] = {"checkpoint": CHECKPOINTS[1], "changed": "docs/README.txt"}
    if case == "damaged-checkpoint":
        return out
    assert case == "damaged-checkpoint-pruned", case
    removed = []
    for first, last in SEGMENTS:
        if last <= CHECKPOINTS[0]:
            _segment(state, first).unlink()
            removed.append(seg_name(first))
    (cks / f"{CHECKPOINTS[0]:012d}" / "tree" / "docs" / "notes.txt").unlink()
    return {**out, "segments_removed": removed, "older": CHECKPOINTS[0], "missing": "docs/notes.txt"}


GITATTRIBUTES = "# Golden bytes: line ends are never converted.\n* -text\n"


def generate(out: Path, check: bool = True) -> None:
    """Write the golden data into ``out``: built beside it, then put in place of a previous output."""
    if out.exists() and not (out / "expected.json").is_file():
        raise SystemExit(f"{out}: exists and holds no expected.json; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pitr-golden-") as tmp:
        new = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
        new.chmod(0o755)  # mkdtemp's 0700 is for a temporary folder, not for data kept in the repository
        try:
            _generate(new, Path(tmp), check)
            if out.exists():
                shutil.rmtree(out)
            os.replace(new, out)
        finally:
            shutil.rmtree(new, ignore_errors=True)


def _generate(out: Path, tmp: Path, check: bool) -> None:
    steps = history()
    clean = tmp / "state"
    build_clean(clean, steps)
    if check:
        check_against_replay(clean, steps, tmp / "scratch")
    where = {}
    for case in CASES:
        state = out / case / "state"
        shutil.copytree(clean, state)  # plain copies: the checkpoints' hard links are not kept
        where[case] = damage(case, state)
    trees, mtimes, folders = {}, {}, {}
    m = Model()
    for seq in range(len(steps) + 1):
        if seq:
            m.apply(steps[seq - 1])
        trees[str(seq)], mtimes[str(seq)], folders[str(seq)] = m.trees()
    doc = {
        "journal_id": JOURNAL_ID,
        "segment_bytes": SEGMENT_BYTES,
        "head": len(steps),
        "checkpoints": list(CHECKPOINTS),
        "segments": {seg_name(first): [first, last] for first, last in SEGMENTS},
        "entries": [
            {"seq": s.change.seq, "op": s.change.op.value, "path": s.change.path, "dst": s.change.dst}
            for s in steps
        ],
        "ts_ns": {str(s.change.seq): s.change.ts_ns for s in steps},
        "cases": where,
        "trees": trees,
        "mtimes": mtimes,
        "folders": folders,
    }
    (out / "expected.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", "utf-8")
    (out / ".gitattributes").write_text(GITATTRIBUTES, "utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default: {DEFAULT_OUT}")
    ap.add_argument(
        "--no-check", action="store_true", help="skip checking the model against a real replay (faster)"
    )
    args = ap.parse_args(argv)
    generate(args.out, check=not args.no_check)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out}: {size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
