"""Clock skew and time zones between the servers (engine.clocks): the estimate and the warnings."""

from __future__ import annotations

import pytest

from engine.clocks import Sample, sample, view


def test_the_estimate_takes_half_the_round_trip() -> None:
    # We sent at mono 100.0; the peer held it 0.2 s; it arrives back at mono 100.6: rtt 0.4 s.
    # The peer's clock said 5000.0 when it sent; it arrives at our utc 4999.0 -> the peer is 1.2 s ahead.
    s = sample(peer_utc=5000.0, echo_at=100.0, echo_held=0.2, now_mono=100.6, now_utc=4999.0)
    assert s is not None
    assert s.rtt == pytest.approx(0.4)
    assert s.offset == pytest.approx(1.2)


def test_an_echo_from_an_earlier_boot_is_no_sample() -> None:
    assert sample(5000.0, echo_at=900.0, echo_held=0.1, now_mono=10.0, now_utc=5000.0) is None


def test_a_skew_above_the_limit_and_another_zone_are_problems() -> None:
    ok = view([Sample(0.3, 0.01)] * 3, 2.0, "W. Europe Standard Time", 3600, "W. Europe Standard Time", 3600)
    assert ok.problems == () and ok.to_dict()["ok"] is True
    slow = [Sample(0.1, 0.01), Sample(-5.0, 0.01), Sample(-5.2, 0.01), Sample(-4.9, 0.02), Sample(9.0, 1)]
    v = view(slow, 2.0, "UTC", 0, "UTC", 0)
    assert v.skew == pytest.approx(-4.9) and len(v.problems) == 1 and "behind" in v.problems[0]
    z = view([Sample(0.0, 0.01)], 2.0, "CET", 3600, "GMT", 0)
    assert len(z.problems) == 1 and "UTC+01:00" in z.problems[0] and "one time zone" in z.problems[0]


def test_no_samples_no_skew_problem() -> None:
    v = view([], 2.0, "UTC", 0, "", None)
    assert v.skew is None and v.problems == ()
