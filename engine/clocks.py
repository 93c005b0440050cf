"""Clock checks between the two servers: the skew of the peer's wall clock, and its time zone.

The HA guide asks for both servers in one time zone on one NTP source; nothing decides by comparing wall
clocks across nodes (the role machine counts on its own monotonic clock), but meeting times, logs and
alerts read wrong when the clocks disagree, so the agents check and warn.

The estimate is NTP's, on heartbeats: each heartbeat carries the sender's UTC time, and echoes the
monotonic ``at`` of the last heartbeat it received from us with how long it held it. The round trip is
then ``(now - echo_at) - echo_held`` on our own monotonic clock, and the peer's clock reads
``utc + rtt / 2`` when its heartbeat arrives. The median of the last few samples rides over a slow one.

Pure: no clock is read here; times are passed in.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

#: Samples kept for the median.
WINDOW = 9


@dataclass(frozen=True, slots=True)
class Sample:
    offset: float  # the peer's clock minus ours, seconds
    rtt: float


def sample(
    peer_utc: float, echo_at: float, echo_held: float, now_mono: float, now_utc: float
) -> Sample | None:
    """One estimate from a heartbeat received at ``now_mono``/``now_utc`` (our clocks); None if the
    echo does not make sense (an echo of a heartbeat from before a restart of ours)."""
    rtt = (now_mono - echo_at) - echo_held
    if not 0.0 <= rtt < 30.0:
        return None
    return Sample(peer_utc + rtt / 2 - now_utc, rtt)


@dataclass(frozen=True, slots=True)
class ClockView:
    """What the agent shows and warns about."""

    skew: float | None  # median offset of the peer's clock (positive: the peer is ahead)
    rtt: float | None
    local_tz: str
    local_offset: int
    peer_tz: str
    peer_offset: int | None
    problems: tuple[str, ...]  # one line each; empty when all is well

    def to_dict(self) -> dict[str, object]:
        return {
            "skew": None if self.skew is None else round(self.skew, 3),
            "rtt": None if self.rtt is None else round(self.rtt, 4),
            "local_tz": self.local_tz,
            "local_offset": self.local_offset,
            "peer_tz": self.peer_tz,
            "peer_offset": self.peer_offset,
            "ok": not self.problems,
            "problems": list(self.problems),
        }


def view(
    samples: list[Sample],
    max_skew: float,
    local_tz: str,
    local_offset: int,
    peer_tz: str,
    peer_offset: int | None,
) -> ClockView:
    """The median skew of ``samples`` and what is wrong: a skew above ``max_skew``, or another zone."""
    problems: list[str] = []
    skew = statistics.median(s.offset for s in samples) if samples else None
    rtt = statistics.median(s.rtt for s in samples) if samples else None
    if skew is not None and abs(skew) > max_skew:
        ahead = "ahead of" if skew > 0 else "behind"
        problems.append(
            f"the peer's clock is {abs(skew):.1f} s {ahead} this one (max_clock_skew {max_skew:g} s): "
            "point both servers at one NTP source"
        )
    if peer_offset is not None and peer_offset != local_offset:
        problems.append(
            f"the peer's time zone is {peer_tz or '?'} (UTC{_hours(peer_offset)}), this one's "
            f"{local_tz or '?'} (UTC{_hours(local_offset)}): keep both servers in one time zone"
        )
    elif peer_tz and local_tz and peer_tz != local_tz and peer_offset is None:
        problems.append(f"the peer's time zone is {peer_tz}, this one's {local_tz}")
    return ClockView(skew, rtt, local_tz, local_offset, peer_tz, peer_offset, tuple(problems))


def _hours(offset: int) -> str:
    sign = "+" if offset >= 0 else "-"
    h, m = divmod(abs(offset) // 60, 60)
    return f"{sign}{h:02d}:{m:02d}"
