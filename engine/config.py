"""Configuration: frozen dataclasses, defaults, one TOML load, errors that name the key path.

Pure apart from :func:`load` reading the file. Each command reads only its own section; one file may hold
both. Unknown keys are errors, never ignored.
"""

from __future__ import annotations

import ipaddress
import math
import platform
import stat
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from engine.errors import ConfigError, PathRejected
from engine.guard import GuardRule
from engine.model import check_relpath, parse_id

DEFAULT_PORT = 7420


@dataclass(frozen=True)
class SenderConfig:
    source: Path
    peer: tuple[str, int]
    state_dir: Path
    include: tuple[str, ...] = ("databases", "config/config.json")
    node: str = "standby"
    reconcile_interval: float = 600.0
    settle: float = 0.5
    max_open: float = 30.0
    max_delete_share: float = 0.5
    fsync: bool = True
    batch_files: int = 1024
    segment_mb: int = 64
    journal_retain_hours: float = 24.0
    connect_timeout: float = 5.0
    retry_max: float = 5.0
    silence_timeout: float = 15.0
    peer_id: str = ""
    insecure: bool = False


@dataclass(frozen=True)
class ReceiverConfig:
    listen: tuple[str, int]
    target: Path
    state_dir: Path
    node: str = "standby"
    fsync: bool = True
    fsync_threads: int = 16
    max_frame_mb: int = 2
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    silence_timeout: float = 15.0
    guard_history: int = 5
    max_path_chars: int = 1024
    max_path_depth: int = 64
    sync_mode: str = "auto"
    peer_id: str = ""
    insecure: bool = False


@dataclass(frozen=True)
class Config:
    path: Path
    sender: SenderConfig | None
    receiver: ReceiverConfig | None
    guards: tuple[GuardRule, ...] = ()

    def need_sender(self) -> SenderConfig:
        if self.sender is None:
            raise ConfigError(f"{self.path}: no [sender] section")
        return self.sender

    def need_receiver(self) -> ReceiverConfig:
        if self.receiver is None:
            raise ConfigError(f"{self.path}: no [receiver] section")
        return self.receiver


@dataclass(frozen=True)
class Range:
    """The values a numeric key allows: ``lo`` to ``hi`` (``lo`` itself excluded when ``lo_open``), and 0 as
    well when ``off`` (0 turns the feature off)."""

    lo: float
    hi: float
    unit: str = ""
    off: bool = False
    lo_open: bool = False

    def allows(self, value: float) -> bool:
        if self.off and value == 0:
            return True
        above = value > self.lo if self.lo_open else value >= self.lo
        return above and value <= self.hi  # NaN fails both comparisons

    def describe(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        text = (
            f"more than {self.lo:g} and at most {self.hi:g}{unit}"
            if self.lo_open
            else f"{self.lo:g} to {self.hi:g}{unit}"
        )
        return f"0 (off) or {text}" if self.off else text


#: INVARIANT: every numeric key of every section has its range here (a test walks the dataclasses), and
#: every default lies in it. A value outside breaks replication in a way that is hard to see (0 retries
#: in a busy loop, a batch of 0 journals nothing, a frame limit below a content chunk refuses every put),
#: so it is refused when the config is read. config.example.toml and the README state the same ranges.
RANGES: dict[str, Range] = {
    # [sender]
    "reconcile_interval": Range(0.5, 604_800, "seconds", off=True),
    "settle": Range(0.05, 60, "seconds"),
    "max_open": Range(1, 3600, "seconds"),
    "max_delete_share": Range(0, 1, "(a share of the replica's files)", lo_open=True),
    "batch_files": Range(1, 100_000, "changes"),
    "segment_mb": Range(1, 1024, "MiB"),
    "journal_retain_hours": Range(0, 8760, "hours"),
    "connect_timeout": Range(0.5, 300, "seconds"),
    "retry_max": Range(0.1, 600, "seconds"),  # the wait starts at 0.1 s and doubles up to this
    # both sections
    "silence_timeout": Range(2, 600, "seconds"),
    # [receiver]
    "fsync_threads": Range(1, 256, "threads"),
    "max_frame_mb": Range(2, 256, "MiB"),  # content travels in 1 MiB chunks, plus the frame's header
    "handshake_timeout": Range(0.5, 300, "seconds"),
    "idle_timeout": Range(10, 86_400, "seconds"),  # unused (silence_timeout decides); kept for old configs
    "guard_history": Range(1, 1000, "versions"),
    "max_path_chars": Range(255, 32_767, "characters"),  # one name may have 255
    "max_path_depth": Range(8, 1024, "folders"),
}
#: [[guard]] timeout, seconds.
GUARD_TIMEOUT = Range(0.1, 600, "seconds")


def parse_address(text: Any, key: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` into a tuple; the error names ``key``."""
    if not isinstance(text, str) or not text:
        raise ConfigError(f"{key}: expected 'host:port', got {text!r}")
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(DEFAULT_PORT)
    host = host.strip("[]") or default_host
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: port must be 1-65535, got {port!r}")
    return host, int(port)


_SPECIAL = {"source", "peer", "state_dir", "include", "listen", "target"}


def _build(cls: type[Any], section: dict[str, Any], name: str, base: Path, extra: dict[str, Any]) -> Any:
    known = {f.name: f for f in fields(cls)}
    for key in section:
        if key not in known:
            raise ConfigError(f"{name} -> {key}: unknown key (known: {', '.join(sorted(known))})")
    kw: dict[str, Any] = dict(extra)
    for key, value in section.items():
        if key in _SPECIAL:
            continue
        f = known[key]
        want = f.type if isinstance(f.type, str) else f.type.__name__
        if want == "bool":
            if not isinstance(value, bool):
                raise ConfigError(f"{name} -> {key}: expected true or false, got {value!r}")
        elif want in ("int", "float"):
            value = _number(value, f"{name} -> {key}", RANGES[key], whole=want == "int")
        elif want == "str" and (not isinstance(value, str) or not value):
            raise ConfigError(f"{name} -> {key}: expected a non-empty string, got {value!r}")
        kw[key] = value
    return cls(**kw)


def _number(value: Any, key: str, allowed: Range, whole: bool = False) -> Any:
    """``value`` if it is a number ``allowed`` accepts (an int when ``whole``, else as a float); the error
    names ``key`` and the range."""
    kind = "a whole number" if whole else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: expected {kind} ({allowed.describe()}), got {value!r}")
    if whole and not isinstance(value, int):
        raise ConfigError(f"{key}: expected a whole number ({allowed.describe()}), got {value!r}")
    if not allowed.allows(value):
        shown = repr(value) if math.isfinite(value) else str(value)  # nan, inf: as TOML spells them
        raise ConfigError(f"{key}: expected {allowed.describe()}, got {shown}")
    return value if whole else float(value)


def _path(section: dict[str, Any], key: str, name: str, base: Path) -> Path:
    if key not in section:
        raise ConfigError(f"{name} -> {key}: required")
    v = section[key]
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{name} -> {key}: expected a path string, got {v!r}")
    p = Path(v).expanduser()
    return p if p.is_absolute() else (base / p)


def parse(data: dict[str, Any], path: Path, default_node: str = "standby") -> Config:
    """The config in ``data`` (a decoded TOML document) read from ``path``: relative paths in it are
    relative to ``path``'s folder (``load`` passes it absolute)."""
    base = path.parent
    for key in data:
        if key not in ("sender", "receiver", "guard"):
            raise ConfigError(f"{key}: unknown section (known: sender, receiver, guard)")
    sender = receiver = None
    if "sender" in data:
        s = data["sender"]
        if not isinstance(s, dict):
            raise ConfigError("sender: expected a table")
        include = s.get("include", list(SenderConfig.include))
        if not isinstance(include, list) or not include or not all(isinstance(x, str) for x in include):
            raise ConfigError("sender -> include: expected a non-empty list of relative paths")
        for item in include:
            try:
                check_relpath(item)
            except PathRejected as e:
                raise ConfigError(f"sender -> include: {e}") from None
        if "peer" not in s:
            raise ConfigError("sender -> peer: required")
        sender = _build(
            SenderConfig,
            s,
            "sender",
            base,
            {
                "node": default_node,
                "source": _path(s, "source", "sender", base),
                "state_dir": _path(s, "state_dir", "sender", base),
                "peer": parse_address(s["peer"], "sender -> peer"),
                "include": tuple(include),
            },
        )
        sender = _secure(sender, "sender", sender.peer[0], "peer")
    if "receiver" in data:
        r = data["receiver"]
        if not isinstance(r, dict):
            raise ConfigError("receiver: expected a table")
        if "listen" not in r:
            raise ConfigError("receiver -> listen: required")
        receiver = _build(
            ReceiverConfig,
            r,
            "receiver",
            base,
            {
                "node": default_node,
                "target": _path(r, "target", "receiver", base),
                "state_dir": _path(r, "state_dir", "receiver", base),
                "listen": parse_address(r["listen"], "receiver -> listen"),
            },
        )
        receiver = _secure(receiver, "receiver", receiver.listen[0], "listen")
        if receiver.sync_mode not in ("auto", "fsync", "syncfs"):
            raise ConfigError("receiver -> sync_mode: expected 'auto', 'fsync' or 'syncfs'")
    return Config(path, sender, receiver, _guards(data.get("guard", [])))


def _guards(items: Any) -> tuple[GuardRule, ...]:
    if not isinstance(items, list):
        raise ConfigError("guard: expected [[guard]] tables")
    out = []
    for i, g in enumerate(items):
        name = f"guard[{i}]"
        if not isinstance(g, dict):
            raise ConfigError(f"{name}: expected a table")
        for key in g:
            if key not in ("pattern", "rule", "command", "timeout"):
                raise ConfigError(f"{name} -> {key}: unknown key (known: command, pattern, rule, timeout)")
        pattern, rule = g.get("pattern"), g.get("rule")
        if not isinstance(pattern, str):
            raise ConfigError(f"{name} -> pattern: required, a glob relative to the replicated root")
        if not isinstance(rule, str):
            raise ConfigError(f"{name} -> rule: required, one of base64, json, nonempty, command")
        command = g.get("command", [])
        if not isinstance(command, list) or not all(isinstance(x, str) for x in command):
            raise ConfigError(f"{name} -> command: expected a list of strings (argv; {{path}} is the file)")
        timeout = _number(g.get("timeout", 5.0), f"{name} -> timeout", GUARD_TIMEOUT)
        try:
            out.append(GuardRule(pattern, rule, tuple(command), float(timeout)))  # type: ignore[arg-type]
        except ValueError as e:
            raise ConfigError(f"{name}: {e}") from None
    return tuple(out)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _secure(section: Any, name: str, host: str, addr_key: str) -> Any:
    """Pinned peer ID required, unless ``insecure`` (plaintext), which only loopback addresses allow."""
    if section.insecure:
        if not is_loopback(host):
            raise ConfigError(
                f"{name} -> insecure: plaintext is only allowed on loopback, but {addr_key} is {host!r}; "
                "pin the peer's ID with peer_id instead"
            )
        return section
    if not section.peer_id:
        raise ConfigError(
            f"{name} -> peer_id: required: run `standby init --config FILE` on the other server and copy "
            "the node ID it prints (or insecure = true, loopback only)"
        )
    return replace(section, peer_id=parse_id(section.peer_id, f"{name} -> peer_id"))


def load(path: Path) -> Config:
    try:
        text = path.read_text("utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror or e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    cfg = parse(data, path.resolve(), platform.node() or "standby")
    for name, section in (("sender", cfg.sender), ("receiver", cfg.receiver)):
        if section is not None:
            check_state_dir(section.state_dir, f"{name} -> state_dir")
    return cfg


def check_state_dir(path: Path, key: str) -> None:
    """Refuse a state folder that cannot be one: ``path`` or the nearest of its parents that exists is not a
    folder (a file there would otherwise surface later as a bare 'File exists' or 'Not a directory')."""
    p = path
    while True:
        try:
            st = p.stat()
        except (FileNotFoundError, NotADirectoryError):  # not there yet (or under a file: found next)
            if p.parent == p:
                return
            p = p.parent
            continue
        except OSError as e:
            raise ConfigError(f"{key}: cannot use {path}: {e.strerror or e}") from None
        if stat.S_ISDIR(st.st_mode):
            return
        where = f"{path} is a file" if p == path else f"{path} is inside {p}, which is a file"
        raise ConfigError(
            f"{key}: {where}, not a folder (the state folder holds the journal, keys and status)"
        )


# [service]: how the agent controls the Synergy Join service on this server (engine.service). Kept apart
# from RANGES until config.example.toml documents the section (a test requires every RANGES key there).


@dataclass(frozen=True)
class ServiceConfig:
    backend: str = "windows"
    name: str = "SynergySKYEnterpriseSchedulingService"
    start: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()
    status: tuple[str, ...] = ()
    timeout: float = 60.0
    failover_after: float = 300.0


SERVICE_BACKENDS = ("windows", "systemd", "command")
SERVICE_RANGES: dict[str, Range] = {
    "timeout": Range(1, 3600, "seconds"),  # one start or stop, and one status command
    "failover_after": Range(10, 86_400, "seconds"),  # below 10 s a restart of the service is a failover
}
_SERVICE_ARGV = ("start", "stop", "status")
#: A unit name systemctl takes as a name, never as an option or a path.
_UNIT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:-_.@")


def parse_service(section: dict[str, Any]) -> ServiceConfig:
    """The ``[service]`` table as a :class:`ServiceConfig`; every error names ``service -> KEY``."""
    if not isinstance(section, dict):
        raise ConfigError("service: expected a table")
    later = {*SERVICE_RANGES, *_SERVICE_ARGV}
    cfg: ServiceConfig = _build(
        ServiceConfig, {k: v for k, v in section.items() if k not in later}, "service", Path("."), {}
    )
    if cfg.backend not in SERVICE_BACKENDS:
        known = ", ".join(repr(b) for b in SERVICE_BACKENDS)
        raise ConfigError(f"service -> backend: expected one of {known}, got {cfg.backend!r}")
    _service_name(cfg.name, cfg.backend)
    numbers = {
        key: _number(section[key], f"service -> {key}", allowed)
        for key, allowed in SERVICE_RANGES.items()
        if key in section
    }
    argv: dict[str, Any] = {}
    for key in _SERVICE_ARGV:
        if key not in section:
            if cfg.backend == "command":
                raise ConfigError(f"service -> {key}: required with backend = 'command' (a list: argv)")
            continue
        if cfg.backend != "command":
            raise ConfigError(f"service -> {key}: only used with backend = 'command', not {cfg.backend!r}")
        value = section[key]
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(x, str) for x in value)
            or not value[0]
        ):
            raise ConfigError(
                f"service -> {key}: expected a non-empty list of strings (the program, then its "
                f"arguments), got {value!r}"
            )
        argv[key] = tuple(value)
    return replace(cfg, **numbers, **argv)


def _service_name(name: str, backend: str) -> None:
    if any(ord(c) < 32 or c in "/\\" for c in name) or len(name) > 256:
        raise ConfigError(
            f"service -> name: expected a service name of at most 256 characters, without '/', '\\' or "
            f"control characters, got {name!r}"
        )
    if backend == "systemd" and (name.startswith("-") or not set(name) <= _UNIT_CHARS):
        raise ConfigError(
            f"service -> name: expected a systemd unit name (letters, digits and ':-_.@', not starting "
            f"with '-'), got {name!r}"
        )
