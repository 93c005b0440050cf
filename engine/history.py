"""The receiver's history of guarded files: the last N good versions of each, kept in its state folder.

``<state_dir>/guard-history/<quoted relative path>/<n>-<seq>-<mtime_ns>.v`` holds one version's bytes; ``n``
counts up per file (never the wall clock, which may step back), the newest version has the largest;
``mtime_ns`` is signed (``-86400000000000`` for a file dated 1969-12-31). A rename in the replica moves the
versions with the file (:meth:`GuardHistory.rename`).
Versions are written like replica files (temp, fsync, rename) right after the version was applied, and
only good versions ever get here: a torn one is refused before it is applied. ``standby guard history``
lists them; ``standby guard restore`` puts one back atomically.
"""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from engine.apply import WINDOWS, settable_mtime_ns
from engine.digest import digest_bytes
from engine.errors import ReplicationError
from engine.journal import fsync_dir
from engine.model import TEMP_MARKER, check_relpath, child_of, is_under, parent_of
from engine.targets import Target, link_on_way
from engine.targets.local import LocalTarget


@dataclass(frozen=True)
class Version:
    index: int  # 0 = the newest
    path: Path
    number: int  # counts up per file
    saved_ns: int
    seq: int
    mtime_ns: int
    size: int

    def digest(self) -> bytes:
        return digest_bytes(self.path.read_bytes())


class GuardHistory:
    def __init__(self, folder: Path, keep: int = 5, fsync: bool = True) -> None:
        self.folder = folder
        self.keep = max(1, keep)
        self.fsync = fsync

    def _dir(self, rel: str) -> Path:
        return self.folder / quote(rel, safe="")

    def record(self, rel: str, seq: int, mtime_ns: int, data: bytes) -> None:
        d = self._dir(rel)
        d.mkdir(parents=True, exist_ok=True)
        have = self.versions(rel)
        n = have[0].number + 1 if have else 1
        name = f"{n:012d}-{seq:012d}-{mtime_ns}.v"
        tmp = d / f".{TEMP_MARKER}{secrets.token_hex(6)}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        os.replace(tmp, d / name)
        for old in self.versions(rel)[self.keep :]:
            try:
                old.path.unlink()
            except FileNotFoundError:
                pass
        if self.fsync:
            fsync_dir(d)

    def versions(self, rel: str) -> list[Version]:
        d = self._dir(rel)
        out: list[tuple[int, int, int, Path]] = []
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return []
        for name in names:
            if not name.endswith(".v"):
                continue
            parts = name[:-2].split("-", 2)
            if len(parts) != 3 or not all(p.isdigit() for p in (*parts[:2], parts[2].removeprefix("-"))):
                continue
            out.append((int(parts[0]), int(parts[1]), int(parts[2]), d / name))
        out.sort(reverse=True)
        versions = []
        for i, (n, seq, mtime, p) in enumerate(out):
            st = p.stat()
            versions.append(Version(i, p, n, st.st_mtime_ns, seq, mtime, st.st_size))
        return versions

    def paths(self) -> list[str]:
        try:
            return sorted(unquote(n) for n in os.listdir(self.folder))
        except FileNotFoundError:
            return []

    def rename(self, src: str, dst: str) -> None:
        """Follow a rename in the replica: the versions of ``src`` and of every path below it (a folder's
        files) move to the new path, replacing those of the file the rename replaced. Idempotent."""
        if src == dst:
            return
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return
        moved = False
        for name in names:
            rel = unquote(name)
            if not is_under(rel, src):
                continue
            old, new = self.folder / name, self._dir(dst + rel[len(src) :])
            # (the same folder: a case-only rename where names are not case-sensitive)
            if new.exists() and not os.path.samefile(old, new):
                shutil.rmtree(new)
            os.replace(old, new)
            moved = True
        if moved and self.fsync:
            fsync_dir(self.folder)

    def restore(self, rel: str, index: int, target: Path | Target) -> Version:
        """Put version ``index`` back at ``rel`` in the replica (a folder or any target): temp, durable,
        rename, folder durable. Refused if a folder on the way is a symlink or junction: nothing outside the
        replica is written."""
        check_relpath(rel)
        t = LocalTarget(target, sync_mode="fsync") if isinstance(target, Path) else target
        link = link_on_way(t, rel)
        if link is not None:
            raise ReplicationError(
                f"{rel!r} passes through a symlink at {link!r} in the replica: not restored"
            )
        versions = self.versions(rel)
        if not versions:
            raise ReplicationError(f"no kept versions of {rel!r}")
        if not 0 <= index < len(versions):
            raise ReplicationError(f"{rel!r} has versions 0..{len(versions) - 1}, not {index}")
        v = versions[index]
        folder = parent_of(rel)
        if folder:
            t.makedirs(folder)
        tmp = child_of(folder, f".{TEMP_MARKER}{secrets.token_hex(8)}")
        mtime = settable_mtime_ns(rel, v.mtime_ns, WINDOWS or t.caps.filetime)
        t.write_temp(tmp, v.path.read_bytes(), mtime, durable=True)
        try:
            t.place(tmp, rel)
        except BaseException:
            t.unlink_quiet(tmp)
            raise
        t.sync_folders([folder])
        return v
