"""The readiness rules (pure, fed a fake clock)."""

from __future__ import annotations

from engine.tracker import Tracker


def linux() -> Tracker:
    return Tracker(settle=0.5, max_open=30.0, close_events=True)


def test_writing_file_waits_for_close_however_long_the_pause() -> None:
    t = linux()
    t.hint("created", "a", 0.0)
    t.hint("modified", "a", 0.01)
    assert t.due(10.0) == ([], [])  # a writer pausing mid-file is not read
    t.hint("closed", "a", 10.2)
    assert t.due(10.2) == (["a"], [])
    assert len(t) == 0


def test_created_and_closed_without_modify_is_due_at_close() -> None:
    t = linux()
    t.hint("created", "a", 0.0)
    t.hint("closed", "a", 0.001)
    assert t.due(0.001) == (["a"], [])


def test_created_only_is_due_after_settle() -> None:
    t = linux()
    t.hint("created", "a", 0.0)
    assert t.due(0.4) == ([], [])
    assert t.due(0.5) == (["a"], [])


def test_held_open_too_long_is_forced() -> None:
    t = linux()
    t.hint("modified", "a", 0.0)
    t.hint("modified", "a", 29.0)
    assert t.due(29.9) == ([], [])
    assert t.due(30.0) == ([], ["a"])


def test_without_close_events_every_hint_restarts_settle() -> None:
    t = Tracker(settle=0.5, max_open=30.0, close_events=False)
    t.hint("modified", "a", 0.0)
    t.hint("modified", "a", 0.4)
    assert t.due(0.8) == ([], [])
    assert t.next_due() == 0.9
    assert t.due(0.9) == (["a"], [])


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
    assert t.due(1.01) == ([], [])
    assert t.due(1.05) == (["a"], [])
