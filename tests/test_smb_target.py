"""The SMB target against a real Samba server when things go wrong: smbd's session process killed (at any
moment of a group, and mid-put), the share full, a hung server, a refused logon, a file held open, and a
real sender and receiver replicating into a share.

Skipped without Samba, a failure under CI=true (``tests/samba.py``).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.apply import Applier, PendingOp
from engine.config import parse_share
from engine.digest import digest_bytes
from engine.errors import ApplyError
from engine.model import Change, Op
from engine.targets.smb import SmbTarget
from tests.pair import Pair, temp_files, wait_for
from tests.samba import SambaServer, running_samba
from tests.test_journal_full import tiny_fs

__all__ = ["tiny_fs"]  # the fixture, used by name below

MTIME = 1_700_000_000_123_456_700  # a whole number of 100 ns: what a share keeps


@pytest.fixture(scope="module")
def samba(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SambaServer]:
    with running_samba(tmp_path_factory.mktemp("samba"), share_options={"follow symlinks": "no"}) as srv:
        yield srv


def target(srv: SambaServer, sub: str, timeout: float = 10.0, password: str | None = None) -> SmbTarget:
    pw = srv.password if password is None else password
    return SmbTarget(parse_share(srv.url(sub), "target"), srv.user, pw, timeout=timeout)


def put(seq: int, path: str, data: bytes) -> PendingOp:
    c = Change(seq, Op.PUT, path, size=len(data), mtime_ns=MTIME, digest=digest_bytes(data))
    return PendingOp(c, data=data)


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def sub(samba: SambaServer) -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


# -- smbd's session killed -------------------------------------------------------------------------------
@pytest.mark.parametrize("delay", [0.0, 0.02, 0.05, 0.1, 0.2, 0.4])
def test_a_session_killed_during_a_group_leaves_whole_files_and_the_group_replays(
    samba: SambaServer, sub: str, delay: float
) -> None:
    """smbd's session process is SIGKILLed ``delay`` seconds into a group of 120 puts over 40 files that
    exist: every file is its old or its new content, never torn; after the reconnect no temp is left, and
    applying the group again gives the new tree."""
    t = target(samba, sub)
    a = Applier(t, threads=8)
    try:
        a.clean_temps()
        old = {f"databases/r{i % 4}/m{i}.json": f"old {i}".encode() * 50 for i in range(40)}
        assert a.apply_batch([put(i + 1, p, d) for i, (p, d) in enumerate(old.items())]).problems == []
        new = {p: os.urandom(3000 + i) for i, p in enumerate(old)}
        new.update({f"databases/new/n{i}.json": os.urandom(500) for i in range(80)})
        group = [put(100 + i, p, d) for i, (p, d) in enumerate(new.items())]
        killer = threading.Timer(delay, samba.kill_sessions)
        killer.start()
        try:
            a.apply_batch(group)
        except ApplyError as e:
            assert "connection" in str(e) or "no answer" in str(e), e
        finally:
            killer.join()
        view = samba.path / sub
        for rel, data in files(view).items():
            if rel in old:
                assert data in (old[rel], new[rel]), f"{rel} is torn"
            elif "standby-tmp" not in rel:
                assert data == new[rel], f"{rel} is torn"
        # The next call reconnects; the broken session's temps are removed then or at the next start.
        a.clean_temps()
        assert not temp_files(view)
        assert a.apply_batch(group).problems == []
        assert files(view) == new
        assert not temp_files(view)
    finally:
        a.close()


def test_a_session_killed_mid_put_keeps_the_old_file_and_the_put_resumes(
    samba: SambaServer, sub: str
) -> None:
    t = target(samba, sub)
    a = Applier(t, threads=2)
    try:
        a.clean_temps()
        assert a.apply_batch([put(1, "databases/big.bin", b"old content")]).problems == []
        data = os.urandom(4 << 20)
        c = Change(2, Op.PUT, "databases/big.bin", size=len(data), mtime_ns=MTIME, digest=digest_bytes(data))
        large = a.begin_large(c)
        large.write(data[: 1 << 20])
        assert samba.kill_sessions() >= 1
        with pytest.raises(OSError) as err:
            large.write(data[1 << 20 :])
        assert err.value.errno in (errno.ECONNRESET, errno.ETIMEDOUT), err.value
        large.discard()
        view = samba.path / sub
        assert (view / "databases/big.bin").read_bytes() == b"old content"
        # Reconnected: the half-written temp is gone (removed through its handle, or cleaned after the
        # reconnect), and the put goes through.
        large = a.begin_large(c)
        for k in range(0, len(data), 1 << 20):
            large.write(data[k : k + (1 << 20)])
        assert large.finish() is None
        assert a.apply_batch([PendingOp(c, temp=large.temp)]).problems == []
        assert (view / "databases/big.bin").read_bytes() == data
        assert not temp_files(view)
        assert t.reconnects >= 1
    finally:
        a.close()


# -- the share full ---------------------------------------------------------------------------------------
@pytest.fixture
def tiny_share(tiny_fs: Path, tmp_path: Path) -> Iterator[SambaServer]:
    """Samba serving a 4 MiB tmpfs."""
    with running_samba(tmp_path / "samba", share_path=tiny_fs) as srv:
        yield srv


def test_a_full_share_is_one_clear_error_the_old_content_stays_and_it_resumes_when_space_returns(
    tiny_share: SambaServer,
) -> None:
    srv = tiny_share
    t = target(srv, "replica")
    a = Applier(t, threads=4)
    try:
        a.clean_temps()
        assert a.apply_batch([put(1, "databases/keep.json", b"old")]).problems == []
        filler = srv.path / "filler"
        filler.write_bytes(b"\0" * (2 << 20))
        group = [
            put(2, "databases/keep.json", os.urandom(1 << 20)),
            put(3, "databases/big.bin", os.urandom(2 << 20)),
        ]
        with pytest.raises(ApplyError) as err:
            a.apply_batch(group)
        assert "full" in str(err.value) or "space" in str(err.value), err.value
        view = srv.path / "replica"
        assert (view / "databases/keep.json").read_bytes() == b"old"
        assert not temp_files(view)
        filler.unlink()
        assert a.apply_batch(group).problems == []
        assert (view / "databases/keep.json").read_bytes() == group[0].data
        assert (view / "databases/big.bin").read_bytes() == group[1].data
        assert not temp_files(view)
    finally:
        a.close()


# -- a hung server, a refused logon, nobody there ----------------------------------------------------------
def test_a_hung_server_fails_the_call_at_its_deadline_and_the_next_call_reconnects(
    samba: SambaServer, sub: str
) -> None:
    t = target(samba, sub, timeout=2.0)
    try:
        t.makedirs("d")
        pids = samba.session_pids()
        assert pids
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(OSError) as err:
                t.stat("d")
            took = time.monotonic() - t0
            assert err.value.errno == errno.ETIMEDOUT and 1.5 < took < 5, (err.value, took)
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        samba.kill_sessions()
        st = t.stat("d")
        assert st is not None and t.reconnects == 1
    finally:
        t.close()


def test_a_wrong_password_is_one_clear_error(samba: SambaServer, sub: str) -> None:
    t = target(samba, sub, password="not-the-password", timeout=5)
    try:
        with pytest.raises(OSError) as err:
            t.stat("")
        assert err.value.errno == errno.EACCES and "logon refused" in str(err.value), err.value
        assert "not-the-password" not in str(err.value)
    finally:
        t.close()


def test_nobody_listening_is_one_clear_error_within_the_deadline(samba: SambaServer) -> None:
    from tests.etcd import free_ports

    (port,) = free_ports(1)
    t = SmbTarget(parse_share(f"smb://127.0.0.1:{port}/share/x", "t"), "u", "p", timeout=2)
    try:
        t0 = time.monotonic()
        with pytest.raises(OSError) as err:
            t.stat("")
        assert err.value.errno in (errno.ECONNREFUSED, errno.ETIMEDOUT) and time.monotonic() - t0 < 5
        assert f"127.0.0.1:{port}" in str(err.value)
    finally:
        t.close()


def test_a_rename_over_a_file_another_client_holds_open_waits_for_it(samba: SambaServer, sub: str) -> None:
    import smbclient  # type: ignore[import-untyped]

    t = target(samba, sub)
    a = Applier(t, threads=2)
    other: dict[str, object] = {}
    try:
        a.clean_temps()
        assert a.apply_batch([put(1, "held.json", b"v1")]).problems == []
        kw = {
            "port": samba.port,
            "connection_cache": other,
            "username": samba.user,
            "password": samba.password,
        }
        f = smbclient.open_file(samba.unc(f"{sub}/held.json"), mode="rb", share_access="r", **kw)
        threading.Timer(0.5, f.close).start()
        t0 = time.monotonic()
        assert a.apply_batch([put(2, "held.json", b"v2")]).problems == []
        assert time.monotonic() - t0 >= 0.4  # it waited for the reader to let go
        assert (samba.path / sub / "held.json").read_bytes() == b"v2"
    finally:
        a.close()
        smbclient.reset_connection_cache(fail_on_error=False, connection_cache=other)


# -- a real pair -------------------------------------------------------------------------------------------
def test_a_sender_replicates_into_a_share_and_a_restarted_receiver_resumes(
    samba: SambaServer, sub: str, tmp_path: Path
) -> None:
    pair = Pair(tmp_path, target_location=samba.url(sub))
    pair.target = samba.path / sub
    pair.receiver_extra = f'smb_username = "{samba.user}"\n'
    pair.write_config()
    env_pw = {"STANDBY_SMB_PASSWORD": samba.password}
    old = dict(os.environ)
    os.environ.update(env_pw)  # the password from the environment, not the config
    try:
        db = pair.source / "databases"
        for i in range(50):
            (db / f"room{i % 5}").mkdir(parents=True, exist_ok=True)
            (db / f"room{i % 5}/m{i}.json").write_bytes(os.urandom(100 + i))
        (pair.source / "config").mkdir()
        (pair.source / "config/config.json").write_text('{"a": 1}')
        pair.start("receive")
        pair.start("send")
        wait_for(lambda: _same(pair), 30, "the share to hold the source")
        assert samba.password not in pair.log("receive")
        assert samba.url(sub) in pair.log("receive")
        pair.stop("receive")
        (db / "room1/m1.json").write_bytes(b"changed while the receiver was down")
        (db / "room2/m2.json").unlink()
        pair.start("receive")
        wait_for(lambda: _same(pair), 30, "the share to catch up after a restart")
        # SIGKILL in the middle of a stream of new files: whole files or none, and it catches up.
        for i in range(300):
            (db / f"room{i % 5}/late{i}.json").write_bytes(os.urandom(2000 + i))
        wait_for(lambda: any((pair.target / "databases").rglob("late*.json")), 30, "the first late file")
        pair.kill("receive")
        for p in (pair.target / "databases").rglob("late*.json"):
            if "standby-tmp" not in p.name:
                assert p.read_bytes() == (pair.source / p.relative_to(pair.target)).read_bytes(), p
        pair.start("receive")
        wait_for(lambda: _same(pair), 60, "the share to catch up after a SIGKILL")
        assert not temp_files(pair.target)
        # verify reads the share through the receiver's manifest: identical, then one file edited on the
        # share behind standby's back is named (with --full too, which reads every file over SMB).
        cfg = str(pair.config)
        for extra in ((), ("--full",)):
            ok = pair.cli("verify", "--config", cfg, *extra)
            assert ok.returncode == 0, f"verify {extra} exited {ok.returncode}\n{ok.stdout}{ok.stderr}"
        assert pair.stop("send") == 0
        (pair.target / "databases/room3/m3.json").write_bytes(b"edited on the share")
        bad = pair.cli("verify", "--config", cfg)
        assert bad.returncode == 1 and "databases/room3/m3.json" in bad.stdout, bad.stdout + bad.stderr
    finally:
        os.environ.clear()
        os.environ.update(old)
        pair.stop_all()


def _same(pair: Pair) -> bool:
    """The share holds the source: paths and contents, times to the share's 100 ns."""

    def norm(t: dict[str, object]) -> dict[str, object]:
        return {k: v if v == ("dir",) else (v[0], v[1] - v[1] % 100) for k, v in t.items()}  # type: ignore[index]

    return norm(pair.source_tree()) == norm(pair.replica_tree())


def test_with_follow_symlinks_off_nothing_goes_through_a_server_side_symlink(tmp_path: Path) -> None:
    """Samba follows a symlink itself and shows it as a plain folder, so standby cannot see it; with
    ``follow symlinks = no`` on the share (what the README asks for) a put or delete through one fails,
    and nothing outside the replica folder is written or removed."""
    with running_samba(tmp_path / "samba", share_options={"follow symlinks": "no"}) as srv:
        (srv.path / "replica").mkdir()
        (srv.path / "other").mkdir()
        (srv.path / "other/precious").write_bytes(b"keep")
        os.symlink("../other", srv.path / "replica/link")
        a = Applier(target(srv, "replica"), threads=2)
        try:
            for group in ([put(1, "link/f", b"x")], [PendingOp(Change(2, Op.DELETE, "link/precious"))]):
                try:
                    a.apply_batch(group)
                except ApplyError:
                    pass
            assert sorted(os.listdir(srv.path / "other")) == ["precious"]
            assert (srv.path / "other/precious").read_bytes() == b"keep"
        finally:
            a.close()


def test_a_share_closed_under_the_target_is_a_lost_connection_and_the_next_call_reconnects(
    samba: SambaServer, sub: str
) -> None:
    """``smbcontrol close-share`` (an admin, or a server restarting its shares): the tree connect is gone
    (STATUS_NETWORK_NAME_DELETED), which is reported once as a lost connection, then reconnected."""
    smbcontrol = shutil.which("smbcontrol")
    if smbcontrol is None:
        pytest.fail("smbcontrol is missing although smbd is installed (Debian's samba package has both)")
    t = target(samba, sub)
    try:
        t.makedirs("d")
        r = subprocess.run(
            [smbcontrol, "-s", str(samba.conf), "smbd", "close-share", "share"], capture_output=True
        )
        assert r.returncode == 0, r.stderr
        # smbcontrol returns once the message is sent; smbd closes the share a moment later (a call
        # before that still succeeds, on the share as it was).
        deadline = time.monotonic() + 30
        while True:
            try:
                t.stat("d")
            except OSError as e:
                assert e.errno == errno.ECONNRESET, e
                break
            assert time.monotonic() < deadline, "the share was never closed under the target"
            time.sleep(0.05)
        st = t.stat("d")
        assert st is not None and t.reconnects == 1
    finally:
        t.close()


def test_a_folder_tree_larger_than_one_deadline_is_removed_entry_by_entry(
    samba: SambaServer, sub: str
) -> None:
    """Removing a tree is many calls, each within the deadline (one call for the whole tree would pass
    it and never finish: each retry would remove only what fits in one deadline)."""
    t = target(samba, sub, timeout=1.0)
    try:
        t.makedirs("big")
        for d in range(4):
            (samba.path / sub / "big" / f"d{d}").mkdir()
            for i in range(300):
                (samba.path / sub / "big" / f"d{d}" / f"f{i}").write_bytes(b"x")
        t.remove("big")
        assert not (samba.path / sub / "big").exists()
        assert t.reconnects == 0
    finally:
        t.close()
