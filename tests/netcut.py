"""Test harness: cut TCP ports on the loopback with nftables, in a table of the test's own.

:func:`cut` drops every packet to or from the given ports (``tcp dport`` and ``tcp sport``) in the output
hook of the host's loopback, so established connections stall both ways and new ones time out, as across
a network partition; leaving the block deletes the table and TCP carries on. Only this process's table is
touched (``inet standby_cut_<pid>``), never the host's own rules. Dropping rather than rejecting is the
point: a dead link sends no reset.

When ``nft`` is missing the test skips with the reason, or fails under ``CI=true`` (``need_binary``).
Needs root (CI runs as root); without it the test skips.

Must not: touch any table but its own, or leave it behind (every exit path deletes it).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterable, Iterator

from tests.conftest import need_binary, skip_or_fail


class Cut:
    """The ports currently cut; :meth:`set` changes them in place (one table all along)."""

    def __init__(self, nft: str, table: str) -> None:
        self.nft = nft
        self.table = table
        self.ports: frozenset[int] = frozenset()

    def _run(self, *args: str) -> None:
        r = subprocess.run([self.nft, *args], capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            raise RuntimeError(f"nft {' '.join(args)}: {r.stderr.strip()}")

    def set(self, ports: Iterable[int]) -> None:
        """Drop exactly these ports from now on (an empty set heals the link)."""
        self._run("flush", "chain", "inet", self.table, "out")
        self.ports = frozenset(ports)
        if not self.ports:
            return
        listed = "{ " + ", ".join(str(p) for p in sorted(self.ports)) + " }"
        for direction in ("dport", "sport"):
            rule = ("oifname", "lo", "tcp", direction, listed, "drop")
            self._run("add", "rule", "inet", self.table, "out", *rule)


@contextlib.contextmanager
def nft_table() -> Iterator[Cut]:
    """A table of this process's own with an empty output chain; deleted on the way out."""
    nft = need_binary("nft")
    if os.geteuid() != 0:
        skip_or_fail("nftables needs root", "CI runs as root")
    table = f"standby_cut_{os.getpid()}"
    cut = Cut(nft, table)
    subprocess.run([nft, "delete", "table", "inet", table], capture_output=True, timeout=10)
    cut._run("add", "table", "inet", table)
    try:
        hook = "{ type filter hook output priority 0; policy accept; }"
        cut._run("add", "chain", "inet", table, "out", hook)
        yield cut
    finally:
        subprocess.run([nft, "delete", "table", "inet", table], capture_output=True, timeout=10)
