"""Config values that would break replication are refused when the config is read, by the real CLI.

Every numeric key has a range (engine.config.RANGES). A value outside it (0 retries in a busy loop, a batch
of 0 journals nothing, a frame limit below a content chunk refuses every put, NaN compares false with
everything) makes ``standby send`` / ``standby receive`` exit 2 with one line naming the key path and the
allowed range, and nothing is started. A state folder that is a file is refused the same way, by ``send``,
``receive`` and ``init``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine import config
from engine.errors import ConfigError
from tests.pair import ROOT, free_port

pytestmark = pytest.mark.timeout(120)

#: A bad value that today's engine would accept must not start the process: if it does, it runs (send
#: retries its connection, receive listens) until this many seconds pass, and the test fails.
RUNS_IF_ACCEPTED = 8.0

ROLE = {"sender": "send", "receiver": "receive"}


def write_config(tmp_path: Path, section: str, extra: str, state_dir: str = "state") -> Path:
    """A minimal config for ``section`` in insecure loopback mode (no keys needed), plus ``extra`` lines."""
    port = free_port()
    body = {
        "sender": f'[sender]\nsource = "src"\npeer = "127.0.0.1:{port}"\n',
        "receiver": f'[receiver]\nlisten = "127.0.0.1:{port}"\ntarget = "replica"\n',
    }[section]
    path = tmp_path / "standby.toml"
    path.write_text(f"{body}state_dir = '{state_dir}'\ninsecure = true\n{extra}\n", "utf-8")
    (tmp_path / "src").mkdir(exist_ok=True)
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-m", "engine", *args],
            capture_output=True,
            text=True,
            timeout=RUNS_IF_ACCEPTED,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise AssertionError(
            f"standby {' '.join(args)} accepted the config and ran for {RUNS_IF_ACCEPTED} s:\n{out[-2000:]}"
        ) from None


def one_config_error(r: subprocess.CompletedProcess[str], *named: str) -> str:
    """The run exited 2 with exactly one line on stderr, a config error naming every string in ``named``."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, f"exit {r.returncode}, expected 2\nstderr: {r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{r.stderr}"
    assert lines[0].startswith("standby: config error: "), lines[0]
    for text in named:
        assert text in lines[0], f"the message does not name {text!r}: {lines[0]}"
    return lines[0]


# ---- numeric ranges --------------------------------------------------------------------------------------

#: (section, key, bad value as TOML). Each is a value the engine accepted before it had ranges.
BAD_VALUES: list[tuple[str, str, str]] = [
    ("sender", "retry_max", "0"),  # a busy reconnect loop
    ("sender", "retry_max", "0.01"),
    ("sender", "retry_max", "inf"),
    ("sender", "batch_files", "0"),  # nothing is ever journaled
    ("sender", "segment_mb", "0"),
    ("sender", "segment_mb", "100000"),
    ("sender", "connect_timeout", "0"),
    ("sender", "settle", "0"),
    ("sender", "settle", "nan"),
    ("sender", "max_open", "0"),
    ("sender", "reconcile_interval", "0.01"),  # 0 is allowed: off
    ("sender", "reconcile_interval", "1e9"),
    ("sender", "journal_retain_hours", "1e6"),
    ("sender", "silence_timeout", "0"),
    ("sender", "silence_timeout", "1"),
    ("sender", "silence_timeout", "601"),
    ("sender", "max_delete_share", "nan"),
    ("receiver", "max_frame_mb", "0"),
    ("receiver", "max_frame_mb", "1"),  # below a 1 MiB content chunk and its header
    ("receiver", "handshake_timeout", "0"),
    ("receiver", "idle_timeout", "0"),
    ("receiver", "max_path_depth", "0"),
    ("receiver", "max_path_chars", "0"),
    ("receiver", "max_path_chars", "100"),  # below one name's 255
    ("receiver", "fsync_threads", "0"),
    ("receiver", "guard_history", "0"),
    ("receiver", "silence_timeout", "0"),
    ("receiver", "silence_timeout", "inf"),
]


@pytest.mark.parametrize(
    ("section", "key", "value"), BAD_VALUES, ids=[f"{s}.{k}={v}" for s, k, v in BAD_VALUES]
)
def test_a_value_out_of_range_exits_2_naming_the_key_and_the_range(
    tmp_path: Path, section: str, key: str, value: str
) -> None:
    cfg = write_config(tmp_path, section, f"{key} = {value}")
    line = one_config_error(cli(ROLE[section], "--config", str(cfg)), f"{section} -> {key}: expected")
    allowed = config.RANGES[key]
    assert f"{allowed.lo:g}" in line and f"{allowed.hi:g}" in line, f"the range is not stated: {line}"
    assert line.endswith(f"got {value}") or line.endswith(f"got {float(value)!r}"), line
    assert not (tmp_path / "state").exists(), "a refused config still created the state folder"


def test_a_bad_guard_timeout_exits_2_naming_the_guard(tmp_path: Path) -> None:
    guard = '[[guard]]\npattern = "a.json"\nrule = "json"\ntimeout = 0\n'
    cfg = write_config(tmp_path, "receiver", guard)
    one_config_error(cli("receive", "--config", str(cfg)), "guard[0] -> timeout: expected 0.1 to 600 seconds")


def test_values_at_the_ends_of_each_range_are_accepted(tmp_path: Path) -> None:
    """The control: every bound itself is a good value (a real CLI run reads the whole file and says so)."""
    for end in ("lo", "hi"):
        lines: dict[str, list[str]] = {"sender": [], "receiver": []}
        for key, allowed in config.RANGES.items():
            value = getattr(allowed, end)
            if end == "lo" and allowed.lo_open:
                value = allowed.lo + 1e-6
            for section, cls in (("sender", config.SenderConfig), ("receiver", config.ReceiverConfig)):
                f = {f.name: f for f in dataclasses.fields(cls)}.get(key)
                if f is not None:
                    lines[section].append(f"{key} = {int(value) if f.type == 'int' else float(value)!r}")
        for section, extra in lines.items():
            cfg = write_config(tmp_path, section, "\n".join(extra))
            r = cli("status", "--config", str(cfg))
            # Accepted: status reads it and says nothing runs (exit 5), never a config error (exit 2).
            assert r.returncode == 5 and not r.stderr, f"{end}s of {section}: {r.stderr}\n{extra}"


def test_reconcile_interval_0_means_off_and_is_accepted(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "sender", "reconcile_interval = 0")
    assert config.load(cfg).need_sender().reconcile_interval == 0


def numeric_fields(cls: type[Any]) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if f.type in ("int", "float")]


@pytest.mark.parametrize("cls", [config.SenderConfig, config.ReceiverConfig])
def test_every_numeric_key_has_a_range_and_its_default_lies_in_it(cls: type[Any]) -> None:
    fields = numeric_fields(cls)
    assert fields
    for f in fields:
        assert f.name in config.RANGES, f"{cls.__name__}.{f.name} has no range in engine.config.RANGES"
        default = f.default
        assert isinstance(default, int | float), f"{cls.__name__}.{f.name} has no default"
        assert config.RANGES[f.name].allows(default), f"{cls.__name__}.{f.name}: default {default}"
    assert config.GUARD_TIMEOUT.allows(5.0)


def test_silence_timeout_is_a_key_of_both_sections_with_default_15(tmp_path: Path) -> None:
    for section in ("sender", "receiver"):
        cfg = write_config(tmp_path, section, "")
        loaded = config.load(cfg)
        part = loaded.sender if section == "sender" else loaded.receiver
        assert part is not None and part.silence_timeout == 15.0
        cfg = write_config(tmp_path, section, "silence_timeout = 4")
        loaded = config.load(cfg)
        part = loaded.sender if section == "sender" else loaded.receiver
        assert part is not None and part.silence_timeout == 4.0


def comment_above(lines: list[str], i: int) -> str:
    """The comment block documenting the key on line ``i`` (over keys documented together with it)."""
    j = i - 1
    while j >= 0 and lines[j].strip() and not lines[j].startswith("#"):
        j -= 1
    block = []
    while j >= 0 and lines[j].startswith("#"):
        block.append(lines[j])
        j -= 1
    return "\n".join(reversed(block))


def test_the_example_config_states_every_range() -> None:
    lines = (ROOT / "config.example.toml").read_text("utf-8").splitlines()
    seen: set[str] = set()
    for i, line in enumerate(lines):
        m = re.match(r"(?:# )?(\w+) = ", line)
        if m is None or m.group(1) not in config.RANGES:
            continue
        key = m.group(1)
        allowed = config.RANGES[key]
        doc = comment_above(lines, i)
        for bound in (allowed.lo, allowed.hi):
            assert re.search(rf"(?<![\d.]){re.escape(f'{bound:g}')}(?!\.?\d)", doc), (
                f"config.example.toml does not state the range of {key} ({allowed.describe()}):\n{doc}"
            )
        seen.add(key)
    assert seen == set(config.RANGES), f"keys missing from config.example.toml: {set(config.RANGES) - seen}"
    config.load(ROOT / "config.example.toml")  # and the example itself is a valid config


def test_nan_and_infinity_are_refused_in_process() -> None:
    # The pure parse behind the CLI tests, for the float specials TOML allows.
    base = {"source": "/s", "peer": "127.0.0.1:7420", "state_dir": "/st", "insecure": True}
    for value in (math.nan, math.inf, -math.inf, -1.0):
        with pytest.raises(ConfigError, match=r"sender -> settle: expected 0\.05 to 60 seconds"):
            config.parse({"sender": {**base, "settle": value}}, Path("/x/standby.toml"))


# ---- a state folder that is a file -----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["send", "receive", "init"])
@pytest.mark.parametrize("where", ["the folder itself", "a parent"])
def test_a_state_folder_that_is_a_file_exits_2_naming_state_dir(
    tmp_path: Path, command: str, where: str
) -> None:
    section = "receiver" if command == "receive" else "sender"
    blocker = tmp_path / "state"
    blocker.write_text("not a folder", "utf-8")
    state = blocker if where == "the folder itself" else blocker / "sender"
    cfg = write_config(tmp_path, section, "", state_dir=str(state))
    line = one_config_error(cli(command, "--config", str(cfg)), f"{section} -> state_dir", str(state))
    assert "not a folder" in line, line
    assert blocker.read_text("utf-8") == "not a folder"


@pytest.mark.parametrize(
    ("encoding", "bom"),
    [("utf-8", b""), ("utf-8", b"\xef\xbb\xbf"), ("utf-16-le", b"\xff\xfe"), ("utf-16-be", b"\xfe\xff")],
    ids=["utf-8", "utf-8 with BOM", "utf-16 LE (PowerShell 5.1 >)", "utf-16 BE"],
)
def test_configs_saved_by_windows_tools_load(tmp_path: Path, encoding: str, bom: bytes) -> None:
    text = '[sender]\nsource = "/data/møte"\npeer = "127.0.0.1:7420"\nstate_dir = "/st"\ninsecure = true\n'
    path = tmp_path / "standby.toml"
    path.write_bytes(bom + text.encode(encoding))
    cfg = config.load(path)
    assert cfg.sender is not None and cfg.sender.source == Path("/data/møte")


def test_an_undecodable_config_is_one_line_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "standby.toml"
    path.write_bytes(b"[sender]\nsource = '\xff\xfe\xfa'\n")
    r = subprocess.run(
        [sys.executable, "-m", "engine", "send", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "UTF-8" in lines[0] and "Traceback" not in r.stderr, r.stderr


# ---- paths that are not local ------------------------------------------------------------------------------


def test_an_smb_url_as_the_source_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    """`source = "smb://..."` would have been taken for a relative folder named "smb:" beside the config:
    refused, naming the key, and nothing is created (the sender reads a folder of its own machine)."""
    port = free_port()
    path = tmp_path / "standby.toml"
    path.write_text(
        f'[sender]\nsource = "smb://10.0.0.12:445/share/SynergySKY"\npeer = "127.0.0.1:{port}"\n'
        "state_dir = 'state'\ninsecure = true\n",
        "utf-8",
    )
    one_config_error(cli("send", "--config", str(path)), "sender -> source", "is a URL")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["standby.toml"]


@pytest.mark.parametrize(
    ("target", "named"),
    [
        ("smb://10.0.0.12", "names a server but no share"),
        ("smb://alice:s3cret@10.0.0.12/share", "smb_username and smb_password"),
        ("\\\\srv:4455\\share", "carries no port"),
        ("\\\\?\\UNC\\srv\\share", "not a server name"),
        ("smb://10.0.0.12/../x", "not a share name"),
        ("smb://10.0.0.12:99999/share", "out of range"),
        ("smb://10.0.0.12/share/../x", "the folder in the share"),
        ("\\\\server", "names a server but no share"),
    ],
)
def test_a_bad_smb_target_exits_2_naming_the_key(tmp_path: Path, target: str, named: str) -> None:
    path = tmp_path / "standby.toml"
    path.write_text(
        f"[receiver]\nlisten = \"127.0.0.1:{free_port()}\"\ntarget = '{target}'\n"
        "state_dir = 'state'\ninsecure = true\n",
        "utf-8",
    )
    line = one_config_error(cli("receive", "--config", str(path)), "receiver -> target", named)
    assert "s3cret" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["standby.toml"]


def test_an_smb_target_is_read_as_a_share_and_its_password_never_shown() -> None:
    data = {
        "receiver": {
            "listen": "127.0.0.1:7420",
            "target": "\\\\fs01\\replicas\\SynergySKY\\Join",
            "state_dir": "state",
            "insecure": True,
            "smb_username": "standby",
            "smb_password": "s3cret",
        }
    }
    r = config.parse(data, Path("/etc/standby/standby.toml")).need_receiver()
    assert r.share is not None
    assert (r.share.server, r.share.port, r.share.share, r.share.folder) == (
        "fs01",
        445,
        "replicas",
        "SynergySKY/Join",
    )
    assert r.location == "smb://fs01:445/replicas/SynergySKY/Join"
    assert "s3cret" not in repr(r)


def test_a_receiver_whose_share_nobody_serves_exits_5_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "standby.toml"
    path.write_text(
        f'[receiver]\nlisten = "127.0.0.1:{free_port()}"\ntarget = "smb://127.0.0.1:{free_port()}/share/x"\n'
        "state_dir = 'state'\ninsecure = true\nsmb_timeout = 2\n"
        "smb_username = 'u'\nsmb_password = 'pw-123'\n",
        "utf-8",
    )
    r = cli("receive", "--config", str(path))
    assert r.returncode == 5, r.stderr
    assert "Traceback" not in r.stderr and "pw-123" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "smb://127.0.0.1:" in last and "cannot" in last, last


@pytest.mark.parametrize(
    ("text", "windows", "refused"),
    [
        ("smb://server/share/x", True, "is a URL"),  # a source: the sender reads its own folders
        ("file:///srv/x", False, "is a URL"),
        ("\\\\server\\share\\x", False, "is a UNC path"),
        ("\\\\server\\share\\x", True, ""),  # Windows opens it itself
        ("C:\\ProgramData\\Synergy SKY", True, ""),
        ("C:/ProgramData", True, ""),
        ("/srv/replica", False, ""),
        ("replica", False, ""),
    ],
)
def test_local_path_rules(text: str, windows: bool, refused: str) -> None:
    if refused:
        with pytest.raises(ConfigError, match=refused):
            config.check_local_path(text, "receiver -> target", windows)
    else:
        config.check_local_path(text, "receiver -> target", windows)
