"""The readiness rules (pure, fed a fake clock)."""

from __future__ import annotations

from engine.tracker import Due, Tracker


def linux() -> Tracker:
    return Tracker(settle=0.5, max_open=30.0, close_events=True)


def test_writing_file_waits_for_close_however_long_the_pause() -> None:
    t = linux()
    t.hint("created", "a", 0.0)
    t.hint("modified", "a", 0.01)
    assert t.due(1.0) == Due()  # a writer pausing mid-file is not read
    # No close after check_after: handed out to ask the OS whether a writer still holds it (never read).
    assert t.due(1.5) == Due(check=[("a", 0.0)])
    t.still_writing("a", 1.5, since=0.0, delay=5.0)
    assert t.due(6.0) == Due()
    assert t.due(6.5) == Due(check=[("a", 0.0)])
    t.still_writing("a", 6.5, since=0.0, delay=5.0)
    t.hint("closed", "a", 10.2)
    assert t.due(10.2) == Due(ready=["a"])
    assert len(t) == 0


def test_a_checked_path_keeps_when_its_writing_began() -> None:
    t = linux()
    t.hint("modified", "a", 0.0)
    assert t.due(1.0) == Due(check=[("a", 0.0)])
    # While it was checked the writer wrote again: the new hint does not restart the max_open clock.
    t.hint("modified", "a", 1.5)
    t.still_writing("a", 1.6, since=0.0, delay=60.0)
    assert t.next_due() == 2.5
    t.still_writing("a", 25.0, since=0.0, delay=60.0)
    assert t.due(29.9) == Due(check=[("a", 0.0)])
    t.still_writing("a", 29.9, since=0.0, delay=60.0)
    assert t.next_due() == 30.0
    assert t.due(30.0) == Due(forced=["a"])


def test_created_and_closed_without_modify_is_due_at_close() -> None:
    t = linux()
    t.hint("created", "a", 0.0)
    t.hint("closed", "a", 0.001)
    assert t.due(0.001) == Due(ready=["a"])


def test_created_only_is_due_after_settle() -> None:
    t = linux()
    t.hint("created", "a", 0.0)
    assert t.due(0.4) == Due()
    assert t.due(0.5) == Due(ready=["a"])


def test_held_open_too_long_is_forced() -> None:
    t = Tracker(settle=0.5, max_open=30.0, close_events=True, check_after=60.0)
    t.hint("modified", "a", 0.0)
    t.hint("modified", "a", 29.0)
    assert t.due(29.9) == Due()
    assert t.due(30.0) == Due(forced=["a"])


def test_without_close_events_every_hint_restarts_settle() -> None:
    t = Tracker(settle=0.5, max_open=30.0, close_events=False)
    t.hint("modified", "a", 0.0)
    t.hint("modified", "a", 0.4)
    assert t.due(0.8) == Due()
    assert t.next_due() == 0.9
    assert t.due(0.9) == Due(ready=["a"])


def test_move_carries_state_and_forget_drops_subtree() -> None:
    t = linux()
    t.hint("modified", "d/x", 0.0)
    t.hint("created", "d/y", 0.0)
    t.move("d", "e")
    assert "e/x" in t and "e/y" in t and "d/x" not in t
    t.forget("e")
    assert len(t) == 0


def test_touched_since_marks_changes_during_a_reconciliation() -> None:
    t = linux()
    t.hint("closed", "a", 0.0)
    mark = t.gen
    t.hint("closed", "b", 1.0)
    t.forget("c")
    assert t.touched_since(mark) == {"b", "c"}
    t.trim_touched(t.gen)
    assert t.touched_since(0) == set()


def test_retry_is_due_after_the_delay() -> None:
    t = linux()
    t.retry("a", 1.0)
    assert t.due(1.01) == Due()
    assert t.due(1.05) == Due(ready=["a"])
