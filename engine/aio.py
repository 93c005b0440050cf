"""Small asyncio helpers shared by the sender and the receiver."""

from __future__ import annotations

import asyncio
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
