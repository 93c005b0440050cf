"""The link survives what the journal and the state folder throw at it: a damaged frame it must stream is
an error in the log and the status (the process stays up and keeps trying), and a hash cache that cannot
be saved is logged, never swallowed, never an exit."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from engine import config
from engine.node import SenderNode
from engine.transport import settings_for
from tests.pair import Pair, wait_for
from tests.test_replication import write_files


def _segments(pair: Pair) -> list[Path]:
    return sorted((pair.sender_state / "journal").glob("*.sbj"))


MARKER = b"standby-marker-" * 20


def _journal_a_late_entry_then_damage_it(pair: Pair, restart_sender: bool) -> None:
    """A converged pair; the receiver stops, the sender journals one more file (``late.json``), and that
    entry is damaged on disk (a flipped byte in its content frame: its checksum fails if it is read back),
    with the sender stopped first or left running."""
    pair.start("receive")
    pair.start("send")
    write_files(pair.source / "databases" / "room", 3)
    pair.wait_converged()
    assert pair.stop("receive") == 0
    (pair.source / "databases" / "room" / "late.json").write_bytes(MARKER)
    wait_for(lambda: any(MARKER in p.read_bytes() for p in _segments(pair)), 10, "the entry in the journal")
    if restart_sender:
        assert pair.stop("send") == 0
    seg = next(p for p in _segments(pair) if MARKER in p.read_bytes())
    data = bytearray(seg.read_bytes())
    data[data.index(MARKER) + 5] ^= 0xFF
    seg.write_bytes(bytes(data))


def test_a_damaged_frame_the_link_must_stream_is_an_error_not_an_exit(pair: Pair) -> None:
    # The sender is restarted: a running one still holds the entries it appended last in memory and sends
    # those (the test below); a restarted one reads them back and finds the damage.
    _journal_a_late_entry_then_damage_it(pair, restart_sender=True)
    pair.start("receive")
    pair.start("send")
    pair.wait_log("send", "send.journal_read_failed")
    time.sleep(1.0)
    assert pair.procs["send"].poll() is None, f"the sender exited\n{pair.log('send')}"
    st = pair.wait_status(lambda s: bool(s["sender"].get("link_error")), 10, "the error in the status")
    assert "journal" in st["sender"]["link_error"]


def test_a_running_sender_streams_what_it_just_journaled_from_memory(pair: Pair) -> None:
    """The sender keeps the entries it appended last in memory and streams those, never reading them
    back: an entry damaged on disk after it was journaled still reaches the replica whole (what a restarted
    sender then does with the damage is the test above)."""
    _journal_a_late_entry_then_damage_it(pair, restart_sender=False)
    pair.start("receive")
    pair.wait_converged()
    assert (pair.target / "databases" / "room" / "late.json").read_bytes() == MARKER
    assert "send.journal_read_failed" not in pair.log("send")


def test_a_hash_cache_that_cannot_be_saved_is_logged_and_the_stop_is_clean(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    write_files(pair.source / "databases" / "room", 3)
    pair.start("receive")
    cfg = config.load(pair.config).need_sender()
    node = SenderNode(cfg, tls=settings_for(cfg))
    (cfg.state_dir / "hashcache").mkdir()  # the cache cannot be replaced by a file now

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(node.run(stop))
        deadline = time.monotonic() + 20
        while not pair.converged() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stop.set()
        await task  # a graceful stop: no exception

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    assert pair.converged()
    assert "hashcache.save_failed" in caplog.text, caplog.text
