"""Filesystem watching: the one watchdog importer. Turns watcher events into hints on the asyncio loop.

Watcher events are hints, never facts: a kernel queue overflow loses them silently apart from a log
warning (watchdog >= 7.1 logs "Inotify queue overflowed"), so an overflow is reported as an event of its
own and the sender answers it with a full reconciliation. The handler runs on the observer thread and
never raises (an exception there would stop delivery); it hands everything to the loop with
``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileClosedNoWriteEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Hint:
    """kind: created, modified, attrib, closed, deleted, moved, overflow. Paths are absolute OS strings.
    ``attrib``: metadata only (an mtime set by ``touch``, ``cp -p``, ``git``): the file is read again, and
    shipped if its mtime (or anything else we replicate) differs from what was shipped."""

    kind: str
    path: str
    is_dir: bool = False
    dest: str = ""


def classify(event: FileSystemEvent) -> Hint | None:
    """Map one watchdog event to a hint (pure). Opens, reads and folder mtime changes carry no news."""
    src = os.fsdecode(event.src_path)
    if isinstance(event, FileOpenedEvent | FileClosedNoWriteEvent | DirModifiedEvent):
        return None
    if isinstance(event, FileMovedEvent | DirMovedEvent):
        if event.is_synthetic:
            return None  # the children of a moved folder: the folder's own move covers them
        return Hint("moved", src, event.is_directory, os.fsdecode(event.dest_path))
    if isinstance(event, FileCreatedEvent | DirCreatedEvent):
        return Hint("created", src, event.is_directory)
    if isinstance(event, FileDeletedEvent | DirDeletedEvent):
        return Hint("deleted", src, event.is_directory)
    if isinstance(event, FileClosedEvent):
        return Hint("closed", src)
    if isinstance(event, FileModifiedEvent):
        return Hint("modified", src)
    if isinstance(event, FileAttribEvent):
        return Hint("attrib", src)
    return None


class _Handler(FileSystemEventHandler):
    def __init__(self, deliver: Callable[[Hint], None]) -> None:
        self._deliver = deliver

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            hint = classify(event)
            if hint is not None:
                self._deliver(hint)
        except Exception:  # never let an exception stop the observer thread
            log.exception("watch.handler_failed")


class _OverflowFlag(logging.Handler):
    def __init__(self, deliver: Callable[[Hint], None]) -> None:
        super().__init__(logging.WARNING)
        self._deliver = deliver

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self._deliver(Hint("overflow", ""))


#: The events we ask the kernel for. Opens and read-only closes are left out: our own reads would
#: otherwise come back as events, one pair per file read.
EVENT_FILTER = [
    FileCreatedEvent,
    DirCreatedEvent,
    FileModifiedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileDeletedEvent,
    DirDeletedEvent,
    FileMovedEvent,
    DirMovedEvent,
]

WATCHDOG_LOGGERS = (
    "watchdog.observers.inotify_c",
    "watchdog.observers.inotify",
    "watchdog.observers.read_directory_changes",
)


def watch_roots(root: Path, include: Sequence[str]) -> list[tuple[Path, bool]]:
    """Folders to watch for an include set: each included folder recursively, the parent of each
    included file, and the root itself (to see included items appear). Pure."""
    out: dict[Path, bool] = {root: False}
    for item in include:
        p = root / item
        if p.is_dir():
            out[p] = True
        else:
            out.setdefault(p.parent, False)
    # A recursive watch already covers its descendants.
    rec = [p for p, r in out.items() if r]
    return [(p, r) for p, r in out.items() if r or not any(p != q and p.is_relative_to(q) for q in rec)]


class Watcher:
    """Runs a watchdog observer and delivers hints to ``on_hint`` on the event loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        root: Path,
        include: Sequence[str],
        on_hint: Callable[[Hint], None],
    ) -> None:
        self._loop = loop
        self._root = root
        self._include = include
        self._on_hint = on_hint
        self._observer: Any = None
        self._flag = _OverflowFlag(self._deliver)
        self._lock = threading.Lock()
        self.watched: list[tuple[Path, bool]] = []

    def _deliver(self, hint: Hint) -> None:
        try:
            self._loop.call_soon_threadsafe(self._on_hint, hint)
        except RuntimeError:  # loop closed during shutdown
            pass

    def start(self) -> None:
        for name in WATCHDOG_LOGGERS:
            logging.getLogger(name).addHandler(self._flag)
        obs = Observer()
        handler = _Handler(self._deliver)
        self.watched = watch_roots(self._root, self._include)
        for path, recursive in self.watched:
            if path.is_dir():
                obs.schedule(handler, str(path), recursive=recursive, event_filter=EVENT_FILTER)
        obs.start()
        self._observer = obs
        log.info("watch.started folders=%d", len(self.watched))

    def restart(self) -> None:
        """Re-plan the watches (an included folder appeared or vanished). Serialised: two restarts close
        together must not leak an observer."""
        with self._lock:
            self.stop()
            self.start()

    def stop(self) -> None:
        for name in WATCHDOG_LOGGERS:
            logging.getLogger(name).removeHandler(self._flag)
        obs, self._observer = self._observer, None
        if obs is not None:
            obs.stop()
            obs.join(timeout=10)
