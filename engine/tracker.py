"""Which changed paths are ready to be read. Pure: fed hints and the time, asked what is due.

Rules (one place):
- ``modified`` marks a path dirty and *writing*: where the OS reports close-after-write (Linux), a writing
  file is not read before its ``closed`` hint, so a writer that pauses mid-file never gets its half read.
- ``closed`` ends writing: the path is due at once.
- ``created`` / ``scanned`` / ``attrib`` (metadata only, e.g. an mtime set) mark a path dirty; due after
  ``settle`` unless a write starts.
- Without close events (Windows), every hint restarts the ``settle`` interval; due when it has passed.
- A writing path whose close has not come after ``check_after`` is handed out to be *checked*: the caller
  asks the OS whether a writer still holds it open (a close event can be lost in a queue overflow, and the
  overflow notice can overtake the events before it). Still open: the caller hands it back with
  ``still_writing``, keeping the time the writing began.
- A path writing for longer than ``max_open`` is due anyway (read stably, and logged by the caller).
- ``retry`` (a read that found the file moving) makes a path due again after ``retry_delay``.
Every hint bumps a generation counter, so a reconciliation can leave alone what changed while it ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class _PathState:
    first: float
    due: float
    writing: bool
    gen: int


@dataclass(slots=True)
class Due:
    """What ``Tracker.due`` hands out (each path removed from tracking)."""

    ready: list[str] = field(default_factory=list)
    #: (path, when its writing began): no close yet; ask whether a writer still holds it open.
    check: list[tuple[str, float]] = field(default_factory=list)
    #: Held open for writing past max_open: shipped from a stable read anyway.
    forced: list[str] = field(default_factory=list)


class Tracker:
    def __init__(
        self,
        settle: float,
        max_open: float,
        close_events: bool,
        retry_delay: float = 0.05,
        check_after: float = 1.0,
    ):
        self.settle = settle
        self.max_open = max_open
        self.check_after = check_after
        self.close_events = close_events
        self.retry_delay = retry_delay
        self.gen = 0
        self._paths: dict[str, _PathState] = {}
        self._touched: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._paths)

    def __contains__(self, path: str) -> bool:
        return path in self._paths

    def _touch(self, path: str) -> int:
        self.gen += 1
        self._touched[path] = self.gen
        return self.gen

    def hint(self, kind: str, path: str, now: float) -> None:
        gen = self._touch(path)
        st = self._paths.get(path)
        if not self.close_events:
            if st is None:
                self._paths[path] = _PathState(now, now + self.settle, False, gen)
            else:
                st.due, st.gen = now + self.settle, gen
            return
        if kind == "modified":
            if st is None:
                self._paths[path] = _PathState(now, now + min(self.max_open, self.check_after), True, gen)
            elif not st.writing:
                st.writing, st.gen = True, gen
                st.due = min(st.first + self.max_open, now + self.check_after)
        elif kind == "closed":
            if st is None:
                self._paths[path] = _PathState(now, now, False, gen)
            else:
                st.writing, st.due, st.gen = False, now, gen
        else:  # created, scanned, attrib
            if st is None:
                self._paths[path] = _PathState(now, now + self.settle, False, gen)
            elif not st.writing:
                st.due, st.gen = min(st.due, now + self.settle), gen

    def ready_now(self, path: str, now: float) -> None:
        """Due at once (reconciliation found it different; it is read stably anyway)."""
        st = self._paths.get(path)
        if st is None:
            self._paths[path] = _PathState(now, now, False, self.gen)
        elif not st.writing:
            st.due = now

    def take_all(self) -> list[str]:
        """Events were lost: hand over every tracked path (the caller reads them with care)."""
        paths = list(self._paths)
        self._paths.clear()
        return paths

    def retry(self, path: str, now: float, delay: float | None = None) -> None:
        st = self._paths.get(path)
        if st is None:
            wait = self.retry_delay if delay is None else delay
            self._paths[path] = _PathState(now, now + wait, False, self.gen)

    def still_writing(self, path: str, now: float, since: float, delay: float) -> None:
        """A checked path is still open for writing: check again after ``delay``; its max_open counts from
        ``since``. A hint that came meanwhile keeps its own timing, but not a later start."""
        st = self._paths.get(path)
        if st is None:
            due = min(since + self.max_open, now + delay)
            self._paths[path] = _PathState(since, due, True, self.gen)
            return
        st.first = min(st.first, since)
        if st.writing:
            st.due = min(st.due, st.first + self.max_open)

    def forget(self, path: str) -> None:
        """The path (and anything below it) was deleted."""
        self._touch(path)
        prefix = path + "/"
        for p in [p for p in self._paths if p == path or p.startswith(prefix)]:
            del self._paths[p]

    def move(self, src: str, dst: str) -> None:
        self._touch(src)
        self._touch(dst)
        self.forget(dst)
        prefix = src + "/"
        for p in [p for p in self._paths if p == src or p.startswith(prefix)]:
            self._paths[dst + p[len(src) :]] = self._paths.pop(p)

    def due(self, now: float) -> Due:
        """Paths due now, removed from tracking."""
        out = Due()
        for p, st in list(self._paths.items()):
            if st.due <= now:
                if not st.writing:
                    out.ready.append(p)
                elif now >= st.first + self.max_open:
                    out.forced.append(p)
                else:
                    out.check.append((p, st.first))
                del self._paths[p]
        return out

    def next_due(self) -> float | None:
        return min((st.due for st in self._paths.values()), default=None)

    def touched_after(self, path: str, gen: int) -> bool:
        return self._touched.get(path, 0) > gen

    def touched_since(self, gen: int) -> set[str]:
        return {p for p, g in self._touched.items() if g > gen}

    def trim_touched(self, gen: int) -> None:
        for p in [p for p, g in self._touched.items() if g <= gen]:
            del self._touched[p]

    def pending(self) -> set[str]:
        return set(self._paths)
