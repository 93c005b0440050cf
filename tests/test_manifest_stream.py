"""The receiver's manifest is streamed: its parts go out from the walking worker thread through a queue as
they are made. A walk that fails part way is the replica's error and no end of manifest; a walk that fails
before its thread runs never leaves the connection waiting for parts."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from engine import wire
from engine.errors import ApplyError
from engine.receiver import _Conn
from tests.test_receiver_groups import receiver


def _replica_with(tmp_path: Path, files: int) -> Any:
    rx = receiver(tmp_path)
    for i in range(files):
        p = tmp_path / "replica" / "databases" / f"f{i}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    return rx


async def _run(rx: Any, timeout: float) -> tuple[list[Any], BaseException | None, bool]:
    loop = asyncio.get_running_loop()
    client, server = socket.socketpair()
    client.setblocking(False)
    peer = wire.SenderProtocol("verify", 0, role="observer")
    reader, writer = await asyncio.open_connection(sock=server)
    run = asyncio.create_task(_Conn(rx, reader, writer, "test").run())
    events: list[Any] = []
    err: BaseException | None = None
    hung = False
    try:
        await loop.sock_sendall(client, peer.hello())
        asked = False
        async with asyncio.timeout(timeout):
            while True:
                try:
                    data = await asyncio.wait_for(loop.sock_recv(client, 1 << 16), 0.2)
                except TimeoutError:
                    if run.done():
                        break
                    continue
                if not data:
                    break
                peer.receive_data(data)
                while (ev := peer.next_event()) is not None:
                    events.append(ev)
                    if isinstance(ev, wire.Welcome) and not asked:
                        asked = True
                        await loop.sock_sendall(client, peer.manifest_request(1, ["databases"]))
                    if isinstance(ev, wire.ManifestEnd):
                        raise StopAsyncIteration
    except StopAsyncIteration:
        pass
    except TimeoutError:
        hung = not run.done()
    finally:
        client.close()
        try:
            async with asyncio.timeout(2):
                await run
        except TimeoutError:
            hung = True
            run.cancel()
        except BaseException as e:
            err = e
        writer.close()
        rx.applier.close()
        rx.position.close()
    return events, err, hung


async def test_a_walk_that_fails_part_way_is_an_apply_error_and_no_end(tmp_path: Path) -> None:
    """The parts made before the failure are sent, then the error ends the connection: never an end."""
    rx = _replica_with(tmp_path, 4500)
    real = rx.applier.target.manifest

    def failing(*a: Any, **kw: Any) -> Any:
        for n, e in enumerate(real(*a, **kw)):
            if n == 4100:
                raise OSError(5, "Input/output error")
            yield e

    rx.applier.target.manifest = failing
    events, err, hung = await _run(rx, 10)
    assert not hung
    assert isinstance(err, ApplyError), err
    assert [type(e).__name__ for e in events].count("ManifestPart") == 2
    assert not any(isinstance(e, wire.ManifestEnd) for e in events)


async def test_a_walk_that_never_starts_must_not_leave_the_connection_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk's task fails before its worker runs (here: no thread can be started, as when the process
    is out of threads): its error ends the connection; it does not wait for parts that never come."""
    rx = _replica_with(tmp_path, 10)
    real = _Conn._on_target

    async def on_target(self: _Conn, fn: Any, *args: Any) -> Any:
        if getattr(fn, "__name__", "") == "manifest":
            raise RuntimeError("can't start new thread")
        return await real(self, fn, *args)

    monkeypatch.setattr(_Conn, "_on_target", on_target)
    _events, err, hung = await _run(rx, 3)
    assert not hung, "the connection is still waiting for manifest parts that will never come"
    assert isinstance(err, RuntimeError)
