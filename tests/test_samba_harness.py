"""The Samba harness (``tests/samba.py``) with smbprotocol: files cross between SMB and the share's folder,
dropped sessions come back, 8.3 aliases open their long file, servers stay apart, nothing is left behind."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import smbclient  # type: ignore[import-untyped]
from smbprotocol.exceptions import (  # type: ignore[import-untyped]
    SMBAuthenticationError,
    SMBConnectionClosed,
    SMBOSError,
)

from tests.samba import SambaServer, reset_smbclient, running_samba

#: An 8.3 name Samba's hash2 mangling makes: up to 8 characters with a ``~``, up to 3 of extension.
SHORT = re.compile(r"^[A-Z0-9_]{1,7}~[A-Z0-9_]{1,7}(\.[A-Z0-9_]{1,3})?$")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SambaServer]:
    reset_smbclient()
    with running_samba(tmp_path / "smb") as s:
        yield s
    reset_smbclient()


def test_write_over_smb_lands_in_the_share_folder(server: SambaServer, tmp_path: Path) -> None:
    assert server.url("a/b.txt") == f"smb://127.0.0.1:{server.port}/share/a/b.txt"
    assert server.unc("a/b.txt") == "\\\\127.0.0.1\\share\\a\\b.txt"
    assert server.path == tmp_path / "smb" / "share"
    listening = [
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process(server.pid).net_connections("tcp")
        if c.status == psutil.CONN_LISTEN
    ]
    assert listening == [("127.0.0.1", server.port)], "smbd must listen on its own port on 127.0.0.1 only"

    smbclient.register_session(server.host, username=server.user, password=server.password, port=server.port)
    smbclient.mkdir(server.unc("a"), port=server.port)
    with smbclient.open_file(server.unc("a/b.txt"), mode="wb", port=server.port) as f:
        f.write(b"over smb\n")
    assert (server.path / "a" / "b.txt").read_bytes() == b"over smb\n"

    (server.path / "local.bin").write_bytes(b"x" * 1234)
    sizes = {e.name: e.smb_info.end_of_file for e in smbclient.scandir(server.unc(), port=server.port)}
    assert sizes == {"a": 0, "local.bin": 1234}
    with smbclient.open_file(server.unc("local.bin"), mode="rb", port=server.port) as f:
        assert f.read() == b"x" * 1234
    with pytest.raises(SMBOSError) as missing:
        smbclient.stat(server.unc("nope"), port=server.port)
    assert missing.value.errno == 2


def test_kill_sessions_drops_the_connection_and_the_next_session_works(
    server: SambaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = smbclient.ClientConfig()  # the global one: no credentials, so it cannot reconnect by itself
    monkeypatch.setattr(config, "username", None)
    monkeypatch.setattr(config, "password", None)
    assert server.session_pids() == []
    helpers = {p.name() for p in psutil.Process(server.pid).children()}
    assert {"smbd-notifyd", "cleanupd"} <= helpers, helpers  # what session_pids must leave out

    server.register()
    smbclient.stat(server.unc(), port=server.port)
    before = server.session_pids()
    assert len(before) == 1, before
    assert psutil.Process(before[0]).name() == "smbd"

    assert server.kill_sessions() == 1
    assert server.session_pids() == []
    assert psutil.Process(server.pid).is_running(), "smbd itself must keep running"
    # Seen: SMBAuthenticationError (it noticed the drop and reconnected without credentials, most often),
    # SMBConnectionClosed, or under load a plain OSError [Errno 9] Bad file descriptor from the socket's send.
    with pytest.raises((SMBAuthenticationError, SMBConnectionClosed, OSError)):
        smbclient.stat(server.unc(), port=server.port)

    reset_smbclient()
    server.register()
    with smbclient.open_file(server.unc("after.txt"), mode="wb", port=server.port) as f:
        f.write(b"again")
    assert (server.path / "after.txt").read_bytes() == b"again"
    after = server.session_pids()
    assert len(after) == 1 and after != before, (before, after)


def test_an_8_3_alias_opens_its_long_file(server: SambaServer) -> None:
    (server.path / "longfilename_here.json").write_bytes(b'{"long": true}')
    (server.path / "short.txt").write_bytes(b"s")
    server.register()
    alias = server.short_name("longfilename_here.json")
    assert SHORT.match(alias), alias
    assert server.short_name("short.txt") == "short.txt"  # an 8.3 name is its own alias

    # A fresh session is a fresh smbd process: nothing of the alias query above is cached in it.
    server.kill_sessions()
    reset_smbclient()
    server.register()
    with smbclient.open_file(server.unc(alias), mode="rb", port=server.port) as f:
        assert f.read() == b'{"long": true}'
    assert smbclient.stat(server.unc(alias.lower()), port=server.port).st_size == 14
    with pytest.raises(SMBOSError):  # not any ~name: only the alias Samba made
        smbclient.stat(server.unc("LONGFI~1.JSO"), port=server.port)
    # Samba 4.17's default (mangled names = illegal): listings carry no short name.
    assert _listed_short_names(server) == {"longfilename_here.json": "", "short.txt": ""}


def test_mangled_names_yes_lists_the_same_alias(tmp_path: Path) -> None:
    reset_smbclient()
    with running_samba(tmp_path, share_options={"mangled names": "yes"}) as server:
        (server.path / "longfilename_here.json").write_bytes(b"{}")
        server.register()
        listed = _listed_short_names(server)
        assert listed["longfilename_here.json"] == server.short_name("longfilename_here.json")
        assert SHORT.match(listed["longfilename_here.json"]), listed
    reset_smbclient()


def _listed_short_names(server: SambaServer) -> dict[str, str]:
    """Name → short name of the share's root entries, from FileIdBothDirectoryInformation."""
    from smbclient._io import SMBDirectoryIO  # type: ignore[import-untyped]
    from smbprotocol.file_info import FileInformationClass  # type: ignore[import-untyped]

    names = {}
    with SMBDirectoryIO(server.unc(), mode="r", share_access="rwd", port=server.port) as d:
        for e in d.query_directory("*", FileInformationClass.FILE_ID_BOTH_DIRECTORY_INFORMATION):
            name = e["file_name"].get_value().decode("utf-16-le")
            if name not in (".", ".."):
                names[name] = e["short_name"].get_value().decode("utf-16-le")
    return names


def test_two_servers_stay_apart_and_leave_nothing_behind(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100)  # too deep for smbd's unix sockets: they go to a short folder
    reset_smbclient()
    with running_samba(tmp_path / "one") as one, running_samba(deep, share_path=tmp_path / "two") as two:
        assert one.port != two.port and one.pid != two.pid
        assert two.path == tmp_path / "two" and (two.path.stat().st_mode & 0o777) == 0o777
        sockets = Path(two.conf.read_text().split("lock directory = ")[1].splitlines()[0])
        assert sockets.is_dir() and not sockets.is_relative_to(deep)
        for s in (one, two):
            s.register()
            with smbclient.open_file(s.unc("who.txt"), mode="wb", port=s.port) as f:
                f.write(str(s.port).encode())
        assert (one.path / "who.txt").read_text() == str(one.port)
        assert (two.path / "who.txt").read_text() == str(two.port)
        assert len({*one.session_pids(), *two.session_pids()}) == 2
        family = [psutil.Process(s.pid) for s in (one, two)]
        family += [c for p in family for c in p.children()]  # helpers and the two sessions
    reset_smbclient()
    assert not sockets.exists()
    left = [p for p in family if _alive(p)]
    assert left == [], f"smbd processes left behind: {left}"


def _alive(p: psutil.Process) -> bool:
    """Running, and not a zombie (what exited is reaped by init a moment later)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
