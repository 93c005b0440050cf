"""The receiver's pipelined groups, in process: a real Receiver and applier on real folders, a real socket
pair, and bytes sent at chosen moments (while a group is being applied) to reach the windows where a
group could be left waiting or a rename share a group with other records."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from pathlib import Path

import pytest

from engine import codec, wire
from engine.apply import BatchResult, PendingOp, Position
from engine.config import load
from engine.journal import entry_header
from engine.model import Change, Op
from engine.receiver import Receiver, _Conn


def receiver(tmp_path: Path) -> Receiver:
    cfg = tmp_path / "standby.toml"
    cfg.write_text(
        f"""
[receiver]
listen = "127.0.0.1:7420"  # never bound: the test hands the receiver a socket
target = '{tmp_path / "replica"}'
state_dir = '{tmp_path / "state"}'
insecure = true
""",
        "utf-8",
    )
    return Receiver(load(cfg).need_receiver())


def entry(seq: int, op: Op, path: str, dst: str = "") -> tuple[bytes, Change]:
    c = Change(seq, op, path, dst=dst)
    return codec.encode(entry_header(c)), c


@pytest.mark.parametrize("hops", range(8))
async def test_records_arriving_as_a_group_finishes_are_applied_and_a_rename_alone(
    tmp_path: Path, hops: int
) -> None:
    """The next records arrive ``hops`` turns of the event loop after the first group's apply returns: one
    of these turns is the one in which the finished apply has not yet been noticed."""
    rx = receiver(tmp_path)
    groups: list[list[int]] = []
    client, server = socket.socketpair()
    peer = wire.SenderProtocol("peer", epoch=1)
    follow = [
        entry(2, Op.MKDIR, "databases/b"),
        entry(3, Op.RENAME, "databases/a", "databases/c"),
        entry(4, Op.MKDIR, "databases/d"),
    ]
    apply_batch = rx.applier.apply_batch
    loop = asyncio.get_running_loop()

    def send_after(k: int) -> None:
        if k:
            loop.call_soon(send_after, k - 1)
        else:
            # Straight into the connection's stream reader: the socket would add turns of its own.
            reader.feed_data(peer.entries(b"".join(raw for raw, _ in follow), [c for _, c in follow]))

    def recording(ops: Sequence[PendingOp]) -> BatchResult:
        groups.append([op.change.seq for op in ops])
        return apply_batch(ops)

    save = rx.position.save

    def saved(journal: str, seq: int, epoch: int) -> Position:
        pos = save(journal, seq, epoch)  # the last step of a group's apply, in its worker thread
        if seq == 1:
            loop.call_soon_threadsafe(send_after, hops)
        return pos

    rx.applier.apply_batch = recording  # type: ignore[method-assign]
    rx.position.save = saved  # type: ignore[method-assign]

    acked: list[int] = []
    client.setblocking(False)

    async def until(done: type[wire.SenderEvent] | int) -> None:
        """Read the receiver's answers until a welcome (a type) or the ack of a seq (an int) arrives."""
        while True:
            data = await loop.sock_recv(client, 1 << 16)
            assert data, "the receiver closed the connection"
            peer.receive_data(data)
            while (ev := peer.next_event()) is not None:
                if isinstance(ev, wire.Ack):
                    acked.append(ev.seq)
                if (isinstance(done, int) and acked and acked[-1] >= done) or (
                    isinstance(done, type) and isinstance(ev, done)
                ):
                    return

    reader, writer = await asyncio.open_connection(sock=server)
    run = asyncio.create_task(_Conn(rx, reader, writer, "test").run())
    try:
        async with asyncio.timeout(5):  # an ack left waiting for more data would time out here
            await loop.sock_sendall(client, peer.hello())
            await until(wire.Welcome)
            raw, c = entry(1, Op.MKDIR, "databases/a")
            await loop.sock_sendall(client, peer.stream("0123abcd", 1) + peer.entries(raw, [c]))
            await until(4)
        client.close()
        await run
    finally:
        client.close()
        writer.close()
        rx.applier.close()
        rx.position.close()
    assert [3] in groups, f"the rename shared a group: {groups}"
    assert sorted(s for g in groups for s in g) == [1, 2, 3, 4]
    assert (tmp_path / "replica/databases/c").is_dir() and (tmp_path / "replica/databases/d").is_dir()
