"""The durable role survives anything a crash can do to it, and never goes back.

Round trips; epochs only go up; a torn slot falls back to the other one; two bad slots (or an empty file)
are an error naming the file, never "no role yet"; and a child process persisting a sequence of roles is
killed (SIGKILL) at random moments and before each of its fsyncs and renames, and after every kill the file
opens and holds a value the child persisted, whole, and not older than the last one it reported durable.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import rolestate
from engine.failover import Role, Started
from engine.rolestate import REASON_BYTES, ROLE_FILE, SLOT, RoleState, RoleStateError
from tests.pair import ROOT

pytestmark = pytest.mark.timeout(60)


def reopen(state: Path) -> RoleState:
    rs = RoleState.open(state)
    rs.close()
    return rs


# ---- round trips -----------------------------------------------------------------------------------------


def test_a_first_start_creates_the_file_with_no_role(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with RoleState.open(state) as rs:
        assert (rs.role, rs.epoch, rs.seen_epoch, rs.boot, rs.changed_at, rs.reason) == (
            None,
            0,
            0,
            0,
            None,
            "",
        )
    assert (state / ROLE_FILE).stat().st_size == 2 * SLOT
    assert sorted(p.name for p in state.iterdir()) == [ROLE_FILE]  # no temporary file left


def test_every_value_round_trips(tmp_path: Path) -> None:
    with RoleState.open(tmp_path) as rs:
        assert rs.begin_boot() == 1
        before = time.time()
        rs.persist(Role.ACTIVE, 3, "failover: join-b's service stopped for 300 s")
        rs.see_epoch(5)
    rs = reopen(tmp_path)
    assert (rs.role, rs.epoch, rs.seen_epoch, rs.boot) == (Role.ACTIVE, 3, 5, 1)
    assert rs.reason == "failover: join-b's service stopped for 300 s"
    assert rs.changed_at is not None and before <= rs.changed_at <= time.time()
    assert rs.status() == {
        "role": "active",
        "epoch": 3,
        "seen_epoch": 5,
        "boot": 1,
        "role_changed_at": rs.changed_at,
        "role_reason": rs.reason,
    }
    with RoleState.open(tmp_path) as rs:
        assert rs.begin_boot() == 2
    assert reopen(tmp_path).boot == 2


def test_a_new_epoch_in_the_same_role_keeps_the_time_and_reason_of_the_role_change(tmp_path: Path) -> None:
    with RoleState.open(tmp_path) as rs:
        rs.persist(Role.PASSIVE, 1, "first start")
        at = rs.changed_at
        rs.persist(Role.PASSIVE, 4, "heard epoch 4")
        assert (rs.role, rs.epoch, rs.changed_at, rs.reason) == (Role.PASSIVE, 4, at, "first start")
        rs.persist(Role.FENCED, 4, "fenced by join-b")
        assert rs.reason == "fenced by join-b"


def test_persisting_what_is_already_durable_writes_nothing(tmp_path: Path) -> None:
    with RoleState.open(tmp_path) as rs:
        rs.persist(Role.PASSIVE, 2, "x")
        before = (tmp_path / ROLE_FILE).read_bytes()
        rs.persist(Role.PASSIVE, 2, "again")
        rs.see_epoch(1)
        rs.see_epoch(2)
        assert (tmp_path / ROLE_FILE).read_bytes() == before


def test_a_long_reason_is_cut_to_fit_its_slot(tmp_path: Path) -> None:
    with RoleState.open(tmp_path) as rs:
        rs.persist(Role.ACTIVE, 1, "é" * 2000)
    reason = reopen(tmp_path).reason
    assert reason == "é" * (REASON_BYTES // 2)


# ---- the epoch never goes back ---------------------------------------------------------------------------


def test_an_epoch_below_the_highest_seen_is_refused(tmp_path: Path) -> None:
    with RoleState.open(tmp_path) as rs:
        rs.persist(Role.ACTIVE, 3, "a")
        with pytest.raises(RoleStateError, match=r"epoch 2 refused: this node has seen epoch 3"):
            rs.persist(Role.FENCED, 2, "b")
        rs.see_epoch(7)
        rs.see_epoch(6)  # lower: nothing changes
        assert rs.seen_epoch == 7
        with pytest.raises(RoleStateError, match=r"rule 6"):
            rs.persist(Role.ACTIVE, 6, "c")
        rs.persist(Role.FENCED, 7, "d")
    rs = reopen(tmp_path)
    assert (rs.role, rs.epoch, rs.seen_epoch) == (Role.FENCED, 7, 7)


@pytest.mark.parametrize("epoch", [-1, True, 1.0, "2"])
def test_an_epoch_that_is_not_a_whole_number_is_refused(tmp_path: Path, epoch: object) -> None:
    with RoleState.open(tmp_path) as rs:
        with pytest.raises(RoleStateError, match="epoch must be a whole number"):
            rs.persist(Role.PASSIVE, epoch, "x")  # type: ignore[arg-type]
        with pytest.raises(RoleStateError, match="epoch must be a whole number"):
            rs.see_epoch(epoch)  # type: ignore[arg-type]


@pytest.mark.parametrize("role", [Role.PROMOTING, Role.DEMOTING])
def test_a_role_that_lives_only_in_memory_is_refused(tmp_path: Path, role: Role) -> None:
    with RoleState.open(tmp_path) as rs, pytest.raises(RoleStateError, match="not a durable role"):
        rs.persist(role, 1, "x")
    assert reopen(tmp_path).role is None


# ---- start-up facts --------------------------------------------------------------------------------------


def test_the_start_up_facts(tmp_path: Path) -> None:
    with RoleState.open(tmp_path) as rs:
        with pytest.raises(RoleStateError, match="begin_boot first"):
            rs.started()
        boot = rs.begin_boot()
        assert rs.started(Role.ACTIVE) == Started(boot, None, 0, Role.ACTIVE)
        rs.persist(Role.ACTIVE, 2, "first start")
        assert rs.started() == Started(boot, Role.ACTIVE, 2, Role.PASSIVE)


@pytest.mark.parametrize(
    ("role", "after"), [(Role.PASSIVE, Role.PASSIVE), (Role.FENCED, Role.FENCED), (Role.ACTIVE, Role.FENCED)]
)
def test_a_node_that_saw_a_higher_epoch_starts_at_it(tmp_path: Path, role: Role, after: Role) -> None:
    """A crash between hearing a higher epoch and the role machine persisting it: the start persists what
    the machine would have (an active is fenced by a higher epoch), so a forced promotion later still picks
    an epoch above it."""
    with RoleState.open(tmp_path) as rs:
        rs.persist(role, 2, "before")
        rs.see_epoch(5)
    with RoleState.open(tmp_path) as rs:
        boot = rs.begin_boot()
        assert rs.started() == Started(boot, after, 5, Role.PASSIVE)
    rs = reopen(tmp_path)
    assert (rs.role, rs.epoch, rs.seen_epoch) == (after, 5, 5)


# ---- torn and damaged files ------------------------------------------------------------------------------


def three_writes(state: Path) -> None:
    """Passive at 1, active at 2, fenced at 3: both slots end holding fenced at 3 (write 3, or gen 3)."""
    with RoleState.open(state) as rs:
        rs.persist(Role.PASSIVE, 1, "one")
        rs.persist(Role.ACTIVE, 2, "two")
        rs.persist(Role.FENCED, 3, "three")


def slots(path: Path) -> list[rolestate.Record | str]:
    data = path.read_bytes()
    return [rolestate.decode_slot(data[i * SLOT : (i + 1) * SLOT]) for i in range(2)]


def value(state: Path) -> tuple[Role | None, int]:
    rs = reopen(state)
    return rs.role, rs.epoch


def damage(path: Path, slot: int, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[slot * SLOT + 20] ^= 0x40
    elif how == "zero":
        data[slot * SLOT : (slot + 1) * SLOT] = bytes(SLOT)
    elif how == "header":
        data[slot * SLOT : slot * SLOT + 4] = b"\xff\xff\xff\x7f"  # an absurd length
    elif how == "truncate":
        del data[slot * SLOT + 40 :]
    path.write_bytes(bytes(data))


def torn(path: Path, slot: int, rec: rolestate.Record, share: float = 0.5) -> None:
    """``slot`` as a write of ``rec`` cut by a power loss leaves it: its first part new, the rest old."""
    data = bytearray(path.read_bytes())
    blob = rec.encode()
    cut = int(len(blob.rstrip(b"\0")) * share)
    data[slot * SLOT : slot * SLOT + cut] = blob[:cut]
    path.write_bytes(bytes(data))


DAMAGE = [(how, slot) for how in ("flip", "zero", "header") for slot in (0, 1)] + [("truncate", 1)]


@pytest.mark.parametrize(("how", "slot"), DAMAGE, ids=[f"{how}-slot{slot}" for how, slot in DAMAGE])
def test_one_damaged_slot_loses_nothing(
    tmp_path: Path, how: str, slot: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Each value is in both slots: damage to either (a bad sector, a stray write, a short file) leaves the
    newest, and the next write repairs the damaged slot first."""
    three_writes(tmp_path)
    damage(tmp_path / ROLE_FILE, slot, how)
    with RoleState.open(tmp_path) as rs:
        assert (rs.role, rs.epoch, rs.reason) == (Role.FENCED, 3, "three")
        assert "rolestate.slot_damaged" in caplog.text and f"slot={slot}" in caplog.text
        rs.persist(Role.PASSIVE, 4, "four")
    assert all(isinstance(r, rolestate.Record) and r.epoch == 4 for r in slots(tmp_path / ROLE_FILE))


@pytest.mark.parametrize("share", [0.1, 0.5, 0.9])
def test_a_torn_first_copy_falls_back_to_the_previous_value(tmp_path: Path, share: float) -> None:
    """A power loss while the first copy of a write goes down: that write never returned, so the other
    slot's value, the one before it, is the last durable one."""
    three_writes(tmp_path)
    new = rolestate.Record(4, Role.ACTIVE, 4, 4, 0, 1.0, "four")
    torn(tmp_path / ROLE_FILE, new.gen % 2, new, share)
    assert value(tmp_path) == (Role.FENCED, 3)


def test_a_torn_second_copy_keeps_the_new_value(tmp_path: Path) -> None:
    three_writes(tmp_path)
    new = rolestate.Record(4, Role.ACTIVE, 4, 4, 0, 1.0, "four")
    data = bytearray((tmp_path / ROLE_FILE).read_bytes())
    first = new.gen % 2
    data[first * SLOT : (first + 1) * SLOT] = new.encode()
    (tmp_path / ROLE_FILE).write_bytes(bytes(data))
    torn(tmp_path / ROLE_FILE, 1 - first, new)
    assert value(tmp_path) == (Role.ACTIVE, 4)


@pytest.mark.parametrize("how", ["both", "empty file", "other data"])
def test_a_file_with_no_good_slot_is_an_error_naming_it_never_no_role(tmp_path: Path, how: str) -> None:
    path = tmp_path / ROLE_FILE
    three_writes(tmp_path)
    if how == "both":
        damage(path, 0, "flip")
        damage(path, 1, "zero")
    elif how == "empty file":
        path.write_bytes(b"")
    else:
        path.write_bytes(b'{"role": "active"}\n' * 200)
    before = path.read_bytes()
    with pytest.raises(RoleStateError) as e:
        RoleState.open(tmp_path)
    msg = str(e.value)
    assert str(path) in msg and "damaged" in msg and "initial_role" in msg and "backup" in msg, msg
    assert path.read_bytes() == before  # left as it was, for the operator


def test_a_record_from_another_format_version_is_refused(tmp_path: Path) -> None:
    from engine import codec

    three_writes(tmp_path)
    path = tmp_path / ROLE_FILE
    data = bytearray(path.read_bytes())
    newer = codec.encode({"fmt": rolestate.FORMAT, "v": rolestate.VERSION + 1, "gen": 5})
    data[SLOT : SLOT + len(newer)] = newer
    path.write_bytes(bytes(data))
    with pytest.raises(RoleStateError, match="another version of standby"):
        RoleState.open(tmp_path)


def fail_fsync(monkeypatch: pytest.MonkeyPatch, calls: set[int]) -> None:
    """os.fsync raises EIO on these calls (1 is the first after this)."""
    real = os.fsync
    count = 0

    def fsync(fd: int) -> None:
        nonlocal count
        count += 1
        if count in calls:
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr("engine.rolestate.os.fsync", fsync)


def test_a_failed_first_copy_leaves_the_last_value_current_and_its_slot_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    three_writes(tmp_path)
    path = tmp_path / ROLE_FILE
    with RoleState.open(tmp_path) as rs:
        fail_fsync(monkeypatch, {1})
        with pytest.raises(RoleStateError, match="cannot write the durable role: Input/output error"):
            rs.persist(Role.PASSIVE, 4, "four")
        assert (rs.role, rs.epoch) == (Role.FENCED, 3)  # not durable: not the value
        after = slots(path)
        assert sorted(str(r.role) for r in after if isinstance(r, rolestate.Record)) == [
            "Role.FENCED",
            "Role.PASSIVE",  # written, not known durable; the other slot still holds fenced at 3
        ]
        stale = next(i for i, r in enumerate(after) if isinstance(r, rolestate.Record) and r.epoch == 4)
        fail_fsync(monkeypatch, {1})  # the retry fails again: it went into the same slot first
        with pytest.raises(RoleStateError):
            rs.persist(Role.PASSIVE, 5, "five")
        assert slots(path)[1 - stale] == after[1 - stale]
        monkeypatch.undo()
        rs.persist(Role.PASSIVE, 5, "five")
    assert value(tmp_path) == (Role.PASSIVE, 5)
    assert all(isinstance(r, rolestate.Record) and r.epoch == 5 for r in slots(path))


def test_a_failed_second_copy_keeps_the_new_value_and_repairs_that_slot_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    three_writes(tmp_path)
    path = tmp_path / ROLE_FILE
    with RoleState.open(tmp_path) as rs:
        fail_fsync(monkeypatch, {2})
        with pytest.raises(RoleStateError, match="durable in one copy"):
            rs.persist(Role.ACTIVE, 4, "four")
        assert (rs.role, rs.epoch) == (Role.ACTIVE, 4)  # durable in its first copy
        first = 0  # write 4 (gen 4 % 2), both slots holding write 3 before it
        fail_fsync(monkeypatch, {1})  # the next write goes first into the slot whose fsync failed
        good = slots(path)[first]
        with pytest.raises(RoleStateError):
            rs.persist(Role.FENCED, 5, "five")
        assert slots(path)[first] == good
        monkeypatch.undo()


def test_of_two_good_slots_the_newer_is_the_value_and_the_older_is_written_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash between the two copies of a write: both slots are whole, one a write behind."""
    three_writes(tmp_path)
    path = tmp_path / ROLE_FILE
    new = rolestate.Record(4, Role.ACTIVE, 4, 4, 0, 1.0, "four")
    data = bytearray(path.read_bytes())
    data[SLOT : 2 * SLOT] = new.encode()  # slot 1: write 4; slot 0: write 3
    path.write_bytes(bytes(data))
    with RoleState.open(tmp_path) as rs:
        assert (rs.role, rs.epoch) == (Role.ACTIVE, 4)
        fail_fsync(monkeypatch, {1})
        with pytest.raises(RoleStateError):
            rs.persist(Role.FENCED, 5, "five")
        assert slots(path)[1] == new  # the newest copy was not touched
        monkeypatch.undo()


# ---- SIGKILL at every step -------------------------------------------------------------------------------

#: The child: open, count a boot, then forever: step e persists (ROLES[e % 3], e, "step e"), except every
#: fourth step, which only sees epoch e; after each it prints the step. With a kill-at number N it SIGKILLs
#: itself just before its N-th fsync or rename (the points a crash can split).
CHILD = r"""
import os, signal, sys
from pathlib import Path
from engine.failover import Role
from engine.rolestate import RoleState

ROLES = [Role.ACTIVE, Role.PASSIVE, Role.FENCED]
kill_at = int(sys.argv[2])
calls = 0

def counted(real):
    def call(*args):
        global calls
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
        return real(*args)
    return call

if kill_at:
    os.fsync, os.replace = counted(os.fsync), counted(os.replace)
rs = RoleState.open(Path(sys.argv[1]))
print("boot", rs.begin_boot(), flush=True)
e = rs.seen_epoch
while True:
    e += 1
    if e % 4 == 0:
        rs.see_epoch(e)
    else:
        rs.persist(ROLES[e % 3], e, f"step {e}")
    print("step", e, flush=True)
"""
ROLES = [Role.ACTIVE, Role.PASSIVE, Role.FENCED]


def spawn(state: Path, kill_at: int = 0) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(state), str(kill_at)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


class Tracker:
    """What the children have reported durable, and the check of the file after each kill."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.boot = 0  # the last boot a child reported
        self.step = 0  # the last step a child reported (or found in the file)
        self.starts = 0

    def killed(self, proc: subprocess.Popen[str], first: str = "") -> int:
        """Wait for the killed child, take what it reported and check the file; returns the steps it did."""
        # Read through the pipes' own buffers: communicate() reads the raw descriptors and would miss
        # what the readline of the first line already buffered (a line cut in two, seen in CI).
        assert proc.stdout is not None and proc.stderr is not None
        with proc.stdout, proc.stderr:
            out, err = proc.stdout.read(), proc.stderr.read()
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}: {err[-2000:]}"
        steps = 0
        for line in (first + out).split("\n")[:-1]:  # a line cut by the kill has no newline: dropped
            word, number = line.split()
            if word == "boot":
                assert int(number) > self.boot
                self.boot = int(number)
            else:
                assert int(number) > self.step
                self.step = int(number)
                steps += 1
        self.check()
        return steps

    def check(self) -> None:
        rs = reopen(self.state)  # never raises: no kill leaves a damaged file
        # Never older than what was reported, and at most the one step that was durable but not reported.
        assert rs.seen_epoch in (self.step, self.step + 1), (rs.status(), self.step)
        assert rs.boot in (self.boot, self.boot + 1) and rs.boot <= self.starts, (rs.status(), self.boot)
        # A value that was persisted, whole: role, epoch and reason of one step.
        last = rs.seen_epoch - 1 if rs.seen_epoch % 4 == 0 and rs.seen_epoch else rs.seen_epoch
        if last == 0:
            assert (rs.role, rs.epoch, rs.reason) == (None, 0, ""), rs.status()
        else:
            assert (rs.role, rs.epoch, rs.reason) == (ROLES[last % 3], last, f"step {last}"), rs.status()
            assert rs.changed_at is not None
        self.step, self.boot = rs.seen_epoch, rs.boot


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
@pytest.mark.timeout(120)
def test_sigkill_at_random_moments_never_loses_or_mixes_a_value(tmp_path: Path) -> None:
    """50 kills: a third at a random moment from the spawn (interpreter start-up, creating the file,
    counting the boot), the rest a random moment into the loop of persists."""
    rng = random.Random(7)
    t = Tracker(tmp_path / "state")
    started = time.monotonic()
    in_loop = during_start = 0
    for i in range(50):
        proc = spawn(t.state)
        t.starts += 1
        first = ""
        if i % 3 == 0:
            time.sleep(rng.uniform(0, 0.25))
        else:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            assert first.startswith("boot "), first
            time.sleep(rng.uniform(0, 0.03))
        proc.kill()
        if t.killed(proc, first):
            in_loop += 1
        else:
            during_start += 1
    elapsed = time.monotonic() - started
    print(
        f"50 kills in {elapsed:.1f} s: {in_loop} in the loop, {during_start} before its first step; "
        f"last step {t.step}, boot {t.boot}"
    )
    assert in_loop >= 25 and during_start >= 5, (in_loop, during_start)
    assert t.step > 200  # the loop ran through many persists between kills
    assert elapsed < 20


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
@pytest.mark.parametrize("fresh", [True, False], ids=["creating", "existing"])
def test_sigkill_before_each_fsync_and_rename(tmp_path: Path, fresh: bool) -> None:
    """Kill just before the 1st, 2nd, ... 12th fsync or rename: creating the file (the temporary file's
    fsync, the new folder's parent's, the rename, the folder's), counting the boot, then the two copies of
    each persist or seen epoch."""
    t = Tracker(tmp_path / "state")
    for n in range(1, 13):
        if fresh:
            t = Tracker(tmp_path / f"state-{n}")
        proc = spawn(t.state, kill_at=n)
        t.starts += 1
        t.killed(proc)
    assert t.step > 0
