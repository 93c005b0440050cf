"""Small asyncio helpers shared by the sender and the receiver."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def run_critical(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a worker thread as one critical section that cancellation cannot split.

    If the awaiting task is cancelled, we still wait for the thread to finish (so state such as the journal
    or the replica position is never closed under it), then let the cancellation through.
    """
    fut = asyncio.ensure_future(asyncio.to_thread(fn))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait({fut})
        raise


def tune_socket(writer: asyncio.StreamWriter, silence: float) -> None:
    """Let the kernel give up on a dead peer too: keepalive probes, and (Linux) TCP_USER_TIMEOUT so that
    data unacknowledged for ``silence`` seconds fails the connection. The application-level liveness
    check (:class:`engine.wire.Liveness`) is the rule; this only bounds what a write can block on."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux only; Windows relies on keepalive and liveness
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(silence * 1000))
    except OSError:  # not a TCP socket (tests over socket pairs), or an option the OS refuses
        pass
