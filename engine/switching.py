"""Following a switchover from the command line: each step as the pair goes through it, and the downtime.

The agents do the switchover (engine.failover rule 7); the command that asked only watches, through the
status the local agent rewrites about once a second: its own role, service and handover stage, and the
peer's as its heartbeats tell them. A line is printed whenever that picture changes. Killing the command
changes nothing for the agents; running it again follows the switchover under way.

The downtime printed is what this command saw: from the first moment neither service was known to run
to the first moment the new active's service ran, to within the status interval (about a second).

Must not: decide anything, or talk to the agents other than by reading the status.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.status import read_status

#: How often the status is read.
POLL = 0.2
EXIT_DONE, EXIT_NOT_DONE = 0, 1


@dataclass(frozen=True, slots=True)
class Picture:
    """One look at the pair: (role, service, stage) of this node and of the peer."""

    me: tuple[str, str, str]
    peer: tuple[str, str, str]

    def line(self, me: str, other: str) -> str:
        def one(name: str, v: tuple[str, str, str]) -> str:
            role, service, stage = v
            return f"{name} {role}, service {service}" + (f" (switchover: {stage})" if stage else "")

        return f"{one(me, self.me)}; {one(other, self.peer)}"

    def active(self) -> str | None:
        """Which side runs the service as active: "me", "peer" or None."""
        if self.me[0] == "active" and self.me[1] == "running" and not self.me[2]:
            return "me"
        if self.peer[0] == "active" and self.peer[1] == "running" and not self.peer[2]:
            return "peer"
        return None

    def switching(self) -> bool:
        return bool(self.me[2] or self.peer[2]) or "promoting" in (self.me[0], self.peer[0])


def picture(status: dict[str, Any]) -> Picture | None:
    """The picture in an agent's status (None: not an agent's status, or no peer heard yet)."""
    peer = status.get("peer")
    if not isinstance(peer, dict) or "role" not in status:
        return None
    return Picture(
        (str(status.get("role")), str(status.get("service")), str(status.get("switchover") or "")),
        (str(peer.get("role")), str(peer.get("service")), str(status.get("peer_switching") or "")),
    )


def follow(
    state_dir: Path,
    me: str,
    other: str,
    timeout: float,
    *,
    out: Callable[[str], None] = print,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Print the switchover's steps until one node runs the service again with no switchover under way
    (exit 0 if it moved, 1 if it came back where it was or ``timeout`` passed)."""
    t0 = clock()
    first = picture(read_status(state_dir) or {})
    was = first.active() if first is not None else None
    last_line = ""
    down_since: float | None = None
    seen_switch = False
    while clock() - t0 < timeout:
        pic = picture(read_status(state_dir) or {})
        if pic is None:
            sleep(POLL)
            continue
        now = clock()
        line = pic.line(me, other)
        if line != last_line:
            out(f"{now - t0:6.1f} s  {line}")
            last_line = line
        running = "running" in (pic.me[1], pic.peer[1])
        if not running and down_since is None:
            down_since = now
        seen_switch = seen_switch or pic.switching()
        who = pic.active()
        if who is not None and not pic.switching() and (seen_switch or who != was):
            down = 0.0 if down_since is None else now - down_since
            where = me if who == "me" else other
            if who == was:
                out(f"switchover rolled back: the service runs on {where} again (down {down:.1f} s)")
                return EXIT_NOT_DONE
            out(f"switchover done: the service runs on {where}; it was down {down:.1f} s (seen from here)")
            return EXIT_DONE
        sleep(POLL)
    out(f"not finished within {timeout:g} s; the agents go on (standby status shows where they are)")
    return EXIT_NOT_DONE


def follow_rejoin(
    state_dir: Path,
    timeout: float,
    *,
    out: Callable[[str], None] = print,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Follow a rejoin: the quarantine, then the catch-up as a progress bar (the changes the active has
    not had acknowledged yet, from its heartbeats), until this node is passive and caught up."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    t0 = clock()
    said_passive = False
    total = 0
    with Progress(
        TextColumn("catching up"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=False
    ) as bar:
        task = bar.add_task("catch-up", total=None)
        while clock() - t0 < timeout:
            st = read_status(state_dir) or {}
            peer = st.get("peer") or {}
            if st.get("role") == "passive" and not said_passive:
                said_passive = True
                q = st.get("quarantined") or 0
                bar.console.print(
                    f"passive; {q} file(s) in quarantine, not acknowledged"
                    if q
                    else "passive; nothing quarantined"
                )
            lag = peer.get("lag")
            if said_passive and isinstance(lag, int):
                total = max(total, lag)
                bar.update(task, total=max(total, 1), completed=max(total, 1) - lag)
                if lag == 0 and peer.get("caught_up"):
                    bar.update(task, total=max(total, 1), completed=max(total, 1))
                    out(f"rejoined and caught up in {clock() - t0:.1f} s")
                    return EXIT_DONE
            sleep(POLL)
    out(f"not caught up within {timeout:g} s; the agent goes on (standby status shows where it is)")
    return EXIT_NOT_DONE
