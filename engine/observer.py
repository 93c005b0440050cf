"""Read-only conversations with a receiver: fetch its manifest, and compare it with the source."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from engine import wire
from engine.config import SenderConfig
from engine.errors import PeerRefused, RemoteProtocolError
from engine.guard import ContentCheck
from engine.model import FileMeta
from engine.plan import same
from engine.scan import HashCache, StableRead, build_manifest, read_stable
from engine.transport import TlsSettings, client_upgrade, settings_for


async def fetch_manifest(
    cfg: SenderConfig, tls: TlsSettings | None, timeout: float = 60.0, full: bool = False
) -> tuple[int, list[FileMeta]]:
    """The receiver's manifest of ``cfg.include`` and the seq it describes. ``full``: the receiver hashes
    every file instead of trusting its hash cache (a receiver older than the flag ignores it)."""
    host, port = cfg.peer
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        try:
            if tls is not None:
                await client_upgrade(reader, writer, tls)
            proto = wire.SenderProtocol(cfg.node + "/verify", 0, role="observer")
            writer.write(proto.hello())
            await writer.drain()
            entries: list[FileMeta] = []
            asked = False
            while True:
                data = await reader.read(1 << 20)
                if not data:
                    raise ConnectionError("receiver closed the connection")
                proto.receive_data(data)
                while (ev := proto.next_event()) is not None:
                    if isinstance(ev, wire.Refused):
                        raise PeerRefused(f"{ev.code}: {ev.reason}")
                    if isinstance(ev, wire.Welcome) and not asked:
                        asked = True
                        writer.write(proto.manifest_request(1, cfg.include, full=full))
                        await writer.drain()
                    elif isinstance(ev, wire.ManifestPart):
                        entries.extend(ev.entries)
                    elif isinstance(ev, wire.ManifestEnd):
                        return ev.seq, entries
                    elif not isinstance(ev, wire.Welcome | wire.Pong | wire.Ack):
                        raise RemoteProtocolError(f"unexpected {type(ev).__name__}")
        finally:
            writer.transport.abort()


@dataclass
class Difference:
    path: str
    kind: str  # missing (on replica), extra (on replica), content, type, mtime
    detail: str = ""


@dataclass
class VerifyReport:
    replica_seq: int
    source_entries: int
    replica_entries: int
    differences: list[Difference] = field(default_factory=list)
    unstable: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        """No difference to repair. Files held back because they are torn on the source do not count."""
        return not [d for d in self.differences if d.kind != "held"]

    @property
    def held(self) -> list[Difference]:
        return [d for d in self.differences if d.kind == "held"]


def compare(source: dict[str, FileMeta], replica: dict[str, FileMeta]) -> list[Difference]:
    out: list[Difference] = []
    for path in sorted(set(source) | set(replica)):
        s, r = source.get(path), replica.get(path)
        if r is None:
            out.append(Difference(path, "missing", "on the source, not on the replica"))
        elif s is None:
            out.append(Difference(path, "extra", "on the replica, not on the source"))
        elif s.is_dir != r.is_dir:
            out.append(Difference(path, "type", "folder on one side, file on the other"))
        elif not same(s, r):
            if s.size != r.size or s.digest != r.digest:
                out.append(
                    Difference(
                        path,
                        "content",
                        f"source {s.size} B {s.digest.hex()[:12]}, replica {r.size} B {r.digest.hex()[:12]}",
                    )
                )
            else:
                out.append(
                    Difference(
                        path,
                        "mtime",
                        f"modification times differ by {abs(s.mtime_ns - r.mtime_ns) / 1e9:.3f} s",
                    )
                )
    return out


def mark_held(diffs: list[Difference], source: Path, check: ContentCheck | None) -> list[Difference]:
    """A guarded file that differs because its source version is torn is *held*, not to be repaired."""
    if check is None:
        return diffs
    out = []
    for d in diffs:
        if d.kind in ("content", "missing", "mtime"):
            r = read_stable(source / d.path)
            if isinstance(r, StableRead) and r.data is not None:
                reason = check(d.path, r.data)
                if reason is not None:
                    d = Difference(d.path, "held", f"torn on the source, not replicated: {reason}")
        out.append(d)
    return out


#: How long a full verify waits for the receiver's manifest: every file of the replica is read for it.
FULL_TIMEOUT = 3600.0


async def verify(cfg: SenderConfig, check: ContentCheck | None = None, full: bool = False) -> VerifyReport:
    """Compare the source with the receiver's manifest. ``full``: hash every file on both sides, whatever
    either hash cache holds (a cache keyed on a stat can be fooled by a file system that keeps no change
    time, or by a clock set back)."""
    timeout = FULL_TIMEOUT if full else 60.0
    seq, entries = await fetch_manifest(cfg, settings_for(cfg), timeout, full=full)
    # The sender's cache is only read here (the running sender owns the file).
    cache = HashCache() if full else HashCache.load(cfg.state_dir / "hashcache")
    m = await asyncio.to_thread(build_manifest, cfg.source, cfg.include, cache, full=full)
    replica = {e.path: e for e in entries}
    diffs = await asyncio.to_thread(mark_held, compare(m.entries, replica), cfg.source, check)
    return VerifyReport(seq, len(m.entries), len(replica), diffs, m.unstable)


#: At most this many differences are listed in the text report (``--json`` lists them all).
REPORT_LIMIT = 1000


def report_lines(report: VerifyReport, limit: int = REPORT_LIMIT) -> list[tuple[str, str]]:
    """The text report as (style, line): every difference once (a held file among them, as ``held``), whole
    paths however long, then the verdict. Pure: the caller prints (and colours by style)."""
    out: list[tuple[str, str]] = []
    for d in report.differences[:limit]:
        out.append(("yellow" if d.kind == "held" else "red", f"{d.kind}: {d.path}: {d.detail}"))
    if len(report.differences) > limit:
        out.append(("red", f"... and {len(report.differences) - limit} more (--json lists them all)"))
    at = f"(replica at seq {report.replica_seq})"
    held = len(report.held)
    if report.identical and not held:
        out.append(("green", f"identical: {report.source_entries} entries on both sides {at}"))
    elif report.identical:
        out.append(("green", f"identical apart from {held} held file(s) {at}"))
    else:
        n = len(report.differences) - held
        extra = f" and {held} held file(s)" if held else ""
        out.append(("red", f"different: {n} difference(s){extra} {at}"))
    if report.unstable:
        out.append(("yellow", f"{len(report.unstable)} files were changing while read and were not compared"))
    return out
