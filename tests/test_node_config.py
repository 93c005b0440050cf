"""A node config (``[node]``, ``[peer]``, ``[service]``, ``[failover]``, ``[alert]``) is read whole or refused
with one error naming the key, and gives the sender and receiver the node runs as.

The example in config.example.toml parses and documents every key with its range; each bad value is one
ConfigError naming its key path; the derived parts have the expected values and never share a file; and the
commands written for [sender]/[receiver] files refuse a node config with one line instead of a traceback.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from engine import config
from engine.config import (
    NODE_RANGES,
    AlertConfig,
    FailoverConfig,
    LogConfig,
    MetricsConfig,
    NodeConfig,
    NodeSetup,
    PeerConfig,
    ServiceConfig,
    UpgradeConfig,
    WitnessConfig,
    load,
    load_node,
    parse_node,
)
from engine.errors import ConfigError
from engine.failover import Policy, Role
from engine.guard import GuardRule
from tests.pair import ROOT
from tests.test_config import cli, comment_above, one_config_error

pytestmark = pytest.mark.timeout(60)

ID = "ABCD-EFGH-IJKL-MNOP-QRST-UVWX-YZ23-4567-ABCD-EFGH-IJKL-MNOP-QRST"
WHERE = Path("/etc/standby/node.toml")


def full() -> dict[str, Any]:
    """A node config with every section and key set (to values other than the defaults)."""
    return {
        "node": {
            "name": "join-a",
            "listen": "10.0.0.11:7420",
            "root": "/srv/join",
            "include": ["databases", "config/config.json", "license"],
            "state_dir": "/var/lib/standby",
            "initial_role": "active",
            "insecure": False,
            "preferred": True,
        },
        "peer": {"name": "join-b", "address": "10.0.0.12:7421", "id": ID.lower().replace("-", "")},
        "service": {"backend": "systemd", "name": "synergy", "timeout": 30, "failover_after": 120},
        "failover": {"flap_window": 3600, "start_alone_after": 900, "fence_command": ["/usr/bin/fence", "b"]},
        "alert": {"command": ["/usr/bin/alert", "--json"], "timeout": 5},
        "guard": [{"pattern": "config/config.json", "rule": "json"}],
    }


def test_a_full_node_config_parses() -> None:
    setup = parse_node(full(), WHERE)
    assert setup == NodeSetup(
        path=WHERE,
        node=NodeConfig(
            name="join-a",
            listen=("10.0.0.11", 7420),
            root=Path("/srv/join"),
            state_dir=Path("/var/lib/standby"),
            include=("databases", "config/config.json", "license"),
            initial_role=Role.ACTIVE,
            insecure=False,
            preferred=True,
        ),
        peer=PeerConfig("join-b", ("10.0.0.12", 7421), ID),  # the ID normalised
        service=ServiceConfig(backend="systemd", name="synergy", timeout=30.0, failover_after=120.0),
        failover=FailoverConfig(3600.0, 900.0, ("/usr/bin/fence", "b")),
        alert=AlertConfig(("/usr/bin/alert", "--json"), 5.0),
        guards=(GuardRule("config/config.json", "json"),),
    )


def test_the_defaults() -> None:
    data = {
        "node": {"name": "a", "listen": "10.0.0.11:7420", "root": "root", "state_dir": "state"},
        "peer": {"name": "b", "address": "10.0.0.12", "id": ID},
    }
    setup = parse_node(data, WHERE)
    n = setup.node
    assert (n.root, n.state_dir) == (WHERE.parent / "root", WHERE.parent / "state")  # relative to the file
    assert (n.include, n.initial_role, n.insecure, n.preferred) == (
        ("databases", "config/config.json"),
        Role.PASSIVE,
        False,
        False,
    )
    assert setup.peer.address == ("10.0.0.12", config.DEFAULT_PORT)
    assert (setup.service, setup.failover, setup.alert, setup.guards) == (
        ServiceConfig(),
        FailoverConfig(21_600.0, 0.0, ()),
        AlertConfig((), 10.0),
        (),
    )
    assert setup.policy() == Policy(failover_after=300.0, flap_window=21_600.0, start_alone_after=None)


def test_plaintext_on_loopback_needs_no_peer_id() -> None:
    data = {
        "node": {"name": "a", "listen": "127.0.0.1:7420", "root": "/r", "state_dir": "/s", "insecure": True},
        "peer": {"name": "b", "address": "localhost:7421"},
    }
    setup = parse_node(data, WHERE)
    assert setup.peer.id == "" and setup.sender().insecure and setup.receiver().insecure


# ---- the derived parts -----------------------------------------------------------------------------------


def test_the_sender_and_receiver_a_node_runs_as() -> None:
    setup = parse_node(full(), WHERE)
    s, r = setup.sender(), setup.receiver()
    assert s == config.SenderConfig(
        source=Path("/srv/join"),
        peer=("10.0.0.12", 7421),
        state_dir=Path("/var/lib/standby/sender"),
        include=("databases", "config/config.json", "license"),
        node="join-a",
        peer_id=ID,
        insecure=False,
    )
    assert r == config.ReceiverConfig(
        listen=("10.0.0.11", 7420),
        target=Path("/srv/join"),
        state_dir=Path("/var/lib/standby/receiver"),
        node="join-a",
        peer_id=ID,
        insecure=False,
    )
    # One root, two part folders below the node's: the journal and the position never meet, and neither
    # part's hash cache or status overwrites the other's.
    assert s.source == r.target
    assert s.state_dir.parent == r.state_dir.parent == setup.node.state_dir != s.state_dir
    parts = setup.parts()
    assert (parts.sender, parts.receiver, parts.guards, parts.path) == (s, r, setup.guards, WHERE)
    assert setup.policy() == Policy(
        failover_after=120.0, flap_window=3600.0, start_alone_after=900.0, fence_command=True
    )


# ---- bad values ------------------------------------------------------------------------------------------


class _Delete:
    """A stable marker (its repr names it, so test ids are the same in every process)."""

    def __repr__(self) -> str:
        return "DELETE"


DELETE: Any = _Delete()

#: (section, key, value or DELETE, how the one error begins).
BAD: list[tuple[str, str, Any, str]] = [
    ("node", "initial_role", "fenced", "node -> initial_role: expected 'active' or 'passive', got 'fenced'"),
    ("node", "initial_role", "Active", "node -> initial_role: expected 'active' or 'passive'"),
    ("node", "listen", "10.0.0.11:99999", "node -> listen: port must be 1-65535"),
    ("node", "listen", DELETE, "node -> listen: required"),
    ("node", "name", "", "node -> name: expected a name"),
    ("node", "name", DELETE, "node -> name: required"),
    ("node", "root", DELETE, "node -> root: required"),
    ("node", "root", 5, "node -> root: expected a path string"),
    ("node", "state_dir", "/srv/join/standby", "node -> state_dir: /srv/join/standby is inside root"),
    ("node", "state_dir", "/srv/join", "node -> state_dir: /srv/join is inside root"),
    ("node", "include", ["../etc/passwd"], "node -> include: path '../etc/passwd' refused"),
    ("node", "include", ["databases/../../x"], "node -> include: path 'databases/../../x' refused"),
    ("node", "include", ["/etc"], "node -> include: path '/etc' refused"),
    ("node", "include", "databases", "node -> include: expected a non-empty list"),
    ("node", "include", [], "node -> include: expected a non-empty list"),
    ("node", "insecure", True, "node -> insecure: plaintext is only allowed on loopback, but node -> listen"),
    ("node", "preferred", "yes", "node -> preferred: expected true or false"),
    ("node", "witness", "x", "node -> witness: unknown key (known: "),
    ("peer", "address", "", "peer -> address: expected 'host:port'"),
    ("peer", "address", 7420, "peer -> address: expected 'host:port'"),
    ("peer", "address", "10.0.0.12:0", "peer -> address: port must be 1-65535"),
    ("peer", "address", "10.0.0.11:7420", "peer -> address: 10.0.0.11:7420 is this node's own"),
    ("peer", "address", DELETE, "peer -> address: required"),
    ("peer", "id", "ABCD-EFGH", "peer -> id: not a node ID"),
    ("peer", "id", 1234, "peer -> id: expected the peer's node ID as a string"),
    ("peer", "id", DELETE, "peer -> id: required: run `standby init --config FILE`"),
    ("peer", "name", "JOIN-A", "peer -> name: 'JOIN-A' is this node's own name"),
    ("peer", "port", 7420, "peer -> port: unknown key"),
    ("service", "timeout", 0, "service -> timeout: expected 1 to 3600 seconds, got 0"),
    ("service", "backend", "launchd", "service -> backend: expected one of"),
    ("failover", "start_alone_after", -1, "failover -> start_alone_after: expected 0 (off) or 60 to 604800"),
    ("failover", "start_alone_after", 30, "failover -> start_alone_after: expected 0 (off) or 60 to 604800"),
    ("failover", "start_alone_after", "never", "failover -> start_alone_after: expected a number"),
    ("failover", "flap_window", 0, "failover -> flap_window: expected 60 to 604800 seconds, got 0"),
    (
        "failover",
        "flap_window",
        float("nan"),
        "failover -> flap_window: expected 60 to 604800 seconds, got nan",
    ),
    ("failover", "failover_after", 300, "failover -> failover_after: set it in [service]"),
    ("failover", "fence_command", "poweroff b", "failover -> fence_command: expected a list of strings"),
    ("failover", "fence_command", [""], "failover -> fence_command: expected a list of strings"),
    ("alert", "command", "mail ops", "alert -> command: expected a list of strings"),
    ("alert", "command", ["mail", 3], "alert -> command: expected a list of strings"),
    ("alert", "timeout", 0, "alert -> timeout: expected 1 to 600 seconds, got 0"),
    ("alert", "to", "ops@example.com", "alert -> to: unknown key (known: command, timeout)"),
]


def test_the_witness_section_feeds_the_policy_and_derives_one_prefix_for_the_pair() -> None:
    data = full()
    data["witness"] = {
        "endpoints": ["https://E.example:2379"],
        "ttl": 9,
        "check_interval": 3,
        "retry_timeout": 3,
    }
    data["witness"]["safety_margin"] = 4
    setup = parse_node(data, WHERE)
    w = setup.witness
    assert w is not None and w.endpoints == ("https://e.example:2379",)
    assert w.prefix == "/standby/join-a+join-b" and w.leader_key == "/standby/join-a+join-b/leader"
    p = setup.policy()
    assert (p.witness, p.witness_ttl, p.witness_margin, p.witness_interval, p.max_lag) == (True, 9, 4, 3, 100)
    # The other node's config names the pair the other way round: the same prefix.
    other = full()
    other["node"]["name"], other["peer"]["name"] = "join-b", "join-a"
    other["witness"] = {"endpoints": ["https://e.example:2379"]}
    assert parse_node(other, WHERE).witness.prefix == w.prefix  # type: ignore[union-attr]
    assert parse_node(full(), WHERE).witness is None and not parse_node(full(), WHERE).policy().witness


@pytest.mark.parametrize(
    ("section", "key", "value", "message"), BAD, ids=[f"{s}.{k}={v!r}" for s, k, v, _ in BAD]
)
def test_each_bad_value_is_one_error_naming_its_key(section: str, key: str, value: Any, message: str) -> None:
    data = full()
    if value is DELETE:
        del data[section][key]
    else:
        data[section][key] = value
    with pytest.raises(ConfigError) as e:
        parse_node(data, WHERE)
    assert str(e.value).startswith(message), str(e.value)


BAD_SECTIONS: list[tuple[dict[str, Any], str]] = [
    ({"witness": {"endpoints": []}}, "witness -> endpoints: expected a non-empty list"),
    ({"witness": {}}, "witness -> endpoints: expected a list"),
    (
        {"witness": {"endpoints": ["http://10.0.0.13:2379"]}},
        "witness -> endpoints: 'http://10.0.0.13:2379': plain",
    ),
    ({"witness": {"endpoints": ["https://e:2379"], "ttl": 2.5}}, "witness -> ttl: expected whole seconds"),
    ({"witness": {"endpoints": ["https://e:2379"], "ttl": 1}}, "witness -> ttl: expected 2 to 3600 seconds"),
    (
        {"witness": {"endpoints": ["https://e:2379"], "ttl": 20}},
        "witness -> check_interval + 2 * witness -> retry_timeout (10 + 2 * 10) must be <= witness -> ttl",
    ),
    (
        {"witness": {"endpoints": ["https://e:2379"], "cert": "c.pem"}},
        "witness -> cert, witness -> key: give both or neither",
    ),
    ({"witness": {"endpoints": ["https://e:2379"], "lease": 3}}, "witness -> lease: unknown key"),
    ({"wittness": {}}, "wittness: unknown section (known in a node config: node, peer,"),
    ({"sender": {"source": "/s"}}, "sender: not part of a node config"),
    ({"receiver": {"listen": ":7420"}}, "receiver: not part of a node config"),
    ({"peer": DELETE}, "peer: required in a node config"),
    ({"node": DELETE}, "node: required in a node config"),
    ({"node": "join-a"}, "node: expected a table"),
    ({"failover": [1]}, "failover: expected a table"),
    ({"guard": [{"pattern": "x"}]}, "guard[0] -> rule: required"),
]


@pytest.mark.parametrize(("change", "message"), BAD_SECTIONS, ids=[m for _, m in BAD_SECTIONS])
def test_a_bad_section_is_one_error_naming_it(change: dict[str, Any], message: str) -> None:
    data = full()
    for name, value in change.items():
        if value is DELETE:
            del data[name]
        else:
            data[name] = value
    with pytest.raises(ConfigError) as e:
        parse_node(data, WHERE)
    assert str(e.value).startswith(message), str(e.value)


def test_plaintext_needs_both_addresses_on_loopback() -> None:
    data = full()
    data["node"].update(listen="127.0.0.1:7420", insecure=True)
    with pytest.raises(ConfigError, match=r"^node -> insecure: .* but peer -> address is '10\.0\.0\.12'"):
        parse_node(data, WHERE)


# ---- the example -----------------------------------------------------------------------------------------

MARKER = "# ==== A node config"


def example_lines() -> list[str]:
    """The node config block at the end of config.example.toml, with one '# ' taken off each line."""
    lines = (ROOT / "config.example.toml").read_text("utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(MARKER))
    block = lines[next(i for i in range(start, len(lines)) if lines[i] == "# [node]") :]
    assert all(line == "#" or line.startswith("# ") for line in block), "the block is all comments"
    return [line[2:] for line in block]


def test_the_example_node_config_parses() -> None:
    setup = parse_node(tomllib.loads("\n".join(example_lines())), WHERE)
    assert (setup.node.name, setup.peer.name, setup.node.initial_role) == ("join-a", "join-b", Role.ACTIVE)
    assert setup.node.listen == ("10.0.0.11", 7420) and setup.peer.address == ("10.0.0.12", 7420)


def test_the_example_documents_every_key_of_a_node_config_with_its_range() -> None:
    lines = example_lines()
    found: dict[str, set[str]] = {}
    section = ""
    for i, line in enumerate(lines):
        if m := re.match(r"\[(\w+)\]$", line):
            section = m.group(1)
            continue
        m = re.match(r"(?:# )?(\w+) = ", line)
        if m is None:
            continue
        key = m.group(1)
        found.setdefault(section, set()).add(key)
        allowed = NODE_RANGES.get(section, {}).get(key)
        doc = comment_above(lines, i)
        assert doc, f"[{section}] {key} has no comment"
        if allowed is not None:
            for bound in (allowed.lo, allowed.hi):
                assert re.search(rf"(?<![\d.]){re.escape(f'{bound:g}')}(?!\.?\d)", doc), (
                    f"config.example.toml does not state the range of [{section}] {key}:\n{doc}"
                )
    names = {f.name for f in dataclasses.fields(NodeConfig)}
    assert found["node"] == names
    assert found["peer"] == {f.name for f in dataclasses.fields(PeerConfig)}
    assert found["service"] == {f.name for f in dataclasses.fields(ServiceConfig)}
    assert found["failover"] == {f.name for f in dataclasses.fields(FailoverConfig)}
    assert found["alert"] == {f.name for f in dataclasses.fields(AlertConfig)}
    assert found["upgrade"] == {f.name for f in dataclasses.fields(UpgradeConfig)}
    assert found["log"] == {f.name for f in dataclasses.fields(LogConfig)}
    assert found["metrics"] == {f.name for f in dataclasses.fields(MetricsConfig)}
    assert found["witness"] == {f.name for f in dataclasses.fields(WitnessConfig)}


def test_every_node_range_holds_its_default() -> None:
    defaults = {
        "service": ServiceConfig(),
        "failover": FailoverConfig(),
        "alert": AlertConfig(),
        "upgrade": UpgradeConfig(),
        "log": LogConfig(),
        "witness": WitnessConfig(("https://e:2379",), "/p"),
    }
    for section, ranges in NODE_RANGES.items():
        for key, allowed in ranges.items():
            assert allowed.allows(getattr(defaults[section], key)), f"[{section}] {key}"


# ---- loading, and the commands that do not read node configs ---------------------------------------------


def write_node(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "node.toml"
    path.write_text(
        "[node]\n"
        'name = "a"\nlisten = "127.0.0.1:17420"\nroot = "root"\nstate_dir = "state"\ninsecure = true\n'
        f"{extra}\n"
        '[peer]\nname = "b"\naddress = "127.0.0.1:17421"\n',
        "utf-8",
    )
    return path


def test_load_reads_a_node_config_only_when_asked(tmp_path: Path) -> None:
    path = write_node(tmp_path)
    with pytest.raises(ConfigError, match=r"a node config \(\[node\]\), read by `standby run`"):
        load(path)
    cfg = load(path, allow_node=True)
    assert cfg.node is not None and cfg.sender is None and cfg.receiver is None
    assert cfg.node.node.state_dir == tmp_path.resolve() / "state"
    assert load_node(path) == cfg.node
    plain = tmp_path / "plain.toml"
    plain.write_text('[receiver]\nlisten = "127.0.0.1:7"\ntarget = "t"\nstate_dir = "s"\ninsecure = true\n')
    assert load(plain, allow_node=True).node is None
    with pytest.raises(ConfigError, match=r"not a node config \(no \[node\] section"):
        load_node(plain)


def test_a_node_state_folder_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("not a folder", "utf-8")
    with pytest.raises(ConfigError, match=r"^node -> state_dir: .*state is a file, not a folder"):
        load_node(write_node(tmp_path))


@pytest.mark.parametrize("command", ["send", "receive"])
def test_the_cli_refuses_a_node_config_with_one_line(tmp_path: Path, command: str) -> None:
    path = write_node(tmp_path)
    one_config_error(cli(command, "--config", str(path)), str(path), "a node config", "standby run")
    assert not (tmp_path / "state").exists()  # nothing started


def test_the_cli_names_the_key_of_a_bad_node_config(tmp_path: Path) -> None:
    path = write_node(tmp_path, 'initial_role = "primary"')
    with pytest.raises(ConfigError, match=r"^node -> initial_role: expected 'active' or 'passive'"):
        load_node(path)
    one_config_error(cli("status", "--config", str(path)), "node -> initial_role")


def test_status_of_a_node_whose_agent_is_not_running_says_so(tmp_path: Path) -> None:
    path = write_node(tmp_path)
    r = cli("status", "--config", str(path))
    assert r.returncode == 5, (r.returncode, r.stdout, r.stderr)
    assert "NOT RUNNING" in r.stdout and "Traceback" not in r.stderr
