"""Configuration: frozen dataclasses, defaults, one TOML load, errors that name the key path.

Pure apart from :func:`load` reading the file. Each command reads only its own section; one file may hold
both. Unknown keys are errors, never ignored.
"""

from __future__ import annotations

import ipaddress
import math
import platform
import re
import stat
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from engine.errors import ConfigError, PathRejected
from engine.failover import Policy, Role
from engine.guard import GuardRule
from engine.model import check_relpath, parse_id

WINDOWS = platform.system() == "Windows"
#: A URL's scheme and "://" (not a drive letter: "C:\\x" has no "//").
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")

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
    journal_retain_gb: float = 0.0  # a size cap on the journal kept for recovery (0: none, time only)
    checkpoint_minutes: float = 60.0  # a checkpoint this often (0: none; then replays end at the first prune)
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
    keep_journal: bool = True  # journal what is applied, with checkpoints: the passive can recover too
    journal_retain_hours: float = 24.0
    journal_retain_gb: float = 0.0
    checkpoint_minutes: float = 60.0
    peer_id: str = ""
    insecure: bool = False
    #: The replica on an SMB share (``target`` is then unused): see :func:`parse_share`.
    share: Share | None = None
    smb_username: str = ""
    #: Or the environment variable STANDBY_SMB_PASSWORD (read by the target). Never shown.
    smb_password: str = field(default="", repr=False)
    smb_encrypt: bool = False
    smb_timeout: float = 30.0  # the deadline of every call to the server
    smb_threads: int = 8

    @property
    def location(self) -> str:
        """Where the replica lives, as logs and status name it (never a credential)."""
        return self.share.url if self.share is not None else str(self.target)


@dataclass(frozen=True)
class Share:
    """An SMB share and a folder in it (``smb://server[:port]/share/folder`` or a UNC path)."""

    server: str
    port: int
    share: str
    folder: str  # relative, POSIX form ("" for the share's root)

    @property
    def url(self) -> str:
        tail = f"/{self.folder}" if self.folder else ""
        host = f"[{self.server}]" if ":" in self.server else self.server
        return f"smb://{host}:{self.port}/{self.share}{tail}"

    @property
    def unc(self) -> str:
        """The UNC path of the folder (what smbprotocol opens)."""
        tail = "\\" + self.folder.replace("/", "\\") if self.folder else ""
        return f"\\\\{self.server}\\{self.share}{tail}"


_SMB_URL = re.compile(
    r"^smb://(?P<server>[^/:@\\]+|\[[0-9A-Fa-f:.]+\])(?::(?P<port>[0-9]{1,5}))?(?P<rest>/.*)?$", re.I
)
_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])$")
_UNC = re.compile(r"^\\\\(?P<server>[^/\\]+)(?P<rest>[/\\].*)?$")


def is_share_text(text: str) -> bool:
    """``text`` names an SMB share (an ``smb://`` URL, or a UNC path), not a local folder."""
    return text.lower().startswith("smb://") or text.startswith("\\\\")


def parse_share(text: str, where: str) -> Share:
    """The share ``text`` names; one error naming ``where`` and what is wrong otherwise (never echoing a
    password someone put in the URL)."""
    authority = re.split(r"[/\\]", text[6:] if text.lower().startswith("smb://") else text.lstrip("\\"))[0]
    if "@" in authority:
        raise ConfigError(
            f"{where}: a user or password in the location is not read (it would end up in logs): give "
            "them as smb_username and smb_password (or STANDBY_SMB_PASSWORD)"
        )
    m = _SMB_URL.match(text) or _UNC.match(text)
    if m is None:
        raise ConfigError(
            f"{where}: {text!r} is not an SMB location (smb://server[:port]/share/folder or "
            "\\\\server\\share\\folder)"
        )
    server = m.group("server")
    if m.re is _UNC and ":" in server:
        raise ConfigError(
            f"{where}: a UNC path carries no port ({server!r}): use smb://server:port/share/folder"
        )
    if not _HOST.match(server):
        raise ConfigError(f"{where}: {server!r} is not a server name or address")
    port = int(m.groupdict().get("port") or 445)
    if not 1 <= port <= 65535:
        raise ConfigError(f"{where}: port {port} is out of range (1-65535)")
    rest = m.group("rest") or ""
    if m.re is _SMB_URL:
        rest = unquote(rest)
    parts = [p for p in re.split(r"[/\\]", rest) if p]
    if not parts:
        raise ConfigError(f"{where}: {text!r} names a server but no share (smb://server/share/folder)")
    share, folder = parts[0], "/".join(parts[1:])
    if share in (".", "..") or "$" in share[:-1] or any(c in share for c in '"*+,:;<=>?[]|'):
        raise ConfigError(f"{where}: {share!r} is not a share name")
    if folder:
        try:
            check_relpath(folder)
        except PathRejected as e:
            raise ConfigError(f"{where}: the folder in the share: {e}") from None
    return Share(server.strip("[]"), port, share, folder)


@dataclass(frozen=True)
class Config:
    path: Path
    sender: SenderConfig | None
    receiver: ReceiverConfig | None
    guards: tuple[GuardRule, ...] = ()
    node: NodeSetup | None = None  # a node config (``load(path, allow_node=True)``); sender, receiver None

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
    "journal_retain_gb": Range(0.001, 100_000, "GiB", off=True),
    "checkpoint_minutes": Range(0.05, 525_600, "minutes", off=True),
    "connect_timeout": Range(0.5, 300, "seconds"),
    "retry_max": Range(0.1, 600, "seconds"),  # the wait starts at 0.1 s and doubles up to this
    # both sections
    "silence_timeout": Range(2, 600, "seconds"),
    # [receiver]
    "fsync_threads": Range(1, 256, "threads"),
    "smb_timeout": Range(1, 3600, "seconds"),
    "smb_threads": Range(1, 64, "threads"),
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


_SPECIAL = {"source", "peer", "state_dir", "include", "listen", "target", "share"}


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
    check_local_path(v, f"{name} -> {key}")
    p = Path(v).expanduser()
    return p if p.is_absolute() else (base / p)


def _target(r: dict[str, Any], base: Path) -> dict[str, Any]:
    """The receiver's ``target``: a local folder, or an SMB share (then ``share``)."""
    if "share" in r:
        raise ConfigError('receiver -> share: unknown key (an SMB share is given as target = "smb://...")')
    v = r.get("target")
    if isinstance(v, str) and is_share_text(v):
        return {"target": Path(), "share": parse_share(v, "receiver -> target")}
    return {"target": _path(r, "target", "receiver", base)}


def check_local_path(text: str, where: str, windows: bool = WINDOWS) -> None:
    """Refuse what is not a path this machine opens itself: a URL (``smb://server/share``: it would be
    taken for a folder named ``smb:``), or a UNC path (``\\\\server\\share``) anywhere but on Windows."""
    if _URL.match(text):
        raise ConfigError(
            f"{where}: {text!r} is a URL; this is a folder this machine opens itself (only the receiver's "
            'target may be a share, smb://server/share/folder: see "SMB targets" in the README)'
        )
    if text.startswith("\\\\") and not windows:
        raise ConfigError(
            f"{where}: {text!r} is a UNC path, which only Windows opens itself; mount the share and give "
            "the mount's path"
        )


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
                **_target(r, base),
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


def decode_config(raw: bytes, path: Path) -> str:
    """The text of a config file as Windows tools save it: UTF-8 with or without a BOM, or UTF-16 (LE or
    BE) with its BOM (what PowerShell 5.1's ``>`` writes). Anything else is one clear error."""
    boms = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))
    for bom, encoding in boms:
        if raw.startswith(bom):
            body, name = raw[len(bom) :], f"{encoding} (with a BOM)"
            break
    else:
        body, encoding, name = raw, "utf-8", "UTF-8"
    try:
        return body.decode(encoding)
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not readable as {name} text (byte {e.start}); save it as UTF-8 or UTF-16 with a BOM"
        ) from None


def read_config_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror or e}") from None
    return decode_config(raw, path)


def load(path: Path, allow_node: bool = False) -> Config:
    """The config in the file at ``path``. A node config (a ``[node]`` section, read by ``standby run``) is
    read into :attr:`Config.node` when ``allow_node``; otherwise it is refused with one line, so a command
    that reads ``[sender]`` or ``[receiver]`` never runs a node's part outside its role machine."""
    text = read_config_text(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    if "node" in data:
        if not allow_node:
            raise ConfigError(
                f"{path}: a node config ([node]), read by `standby run`; this command reads [sender] and "
                "[receiver] configs and does not read node configs yet"
            )
        setup = parse_node(data, path.resolve())
        check_state_dir(setup.node.state_dir, "node -> state_dir")
        return Config(setup.path, None, None, setup.guards, setup)
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
# from RANGES, which is by key alone (``timeout`` differs by section): NODE_RANGES holds it by section.


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


# ---- the witness: [witness] in a node config (engine.witness talks to it) ----------------------------------


@dataclass(frozen=True)
class WitnessConfig:
    """``[witness]``: where etcd is, the pair's key prefix, and the lease timing (seconds)."""

    endpoints: tuple[str, ...]  # "https://host:port"; plain "http://" on loopback only
    prefix: str  # "/standby/<pair-name>": the leader key is "<prefix>/leader"
    ttl: int = 30  # the lease, in whole seconds (etcd's unit)
    safety_margin: float = 10.0  # the holder stops its service after ttl - safety_margin without renewal
    check_interval: float = 10.0  # one HA cycle (renew or look)
    retry_timeout: float = 10.0  # the bound on one witness call, every try on every member included
    ca: Path | None = None  # CA bundle for https endpoints; None: the system's roots
    cert: Path | None = None  # client certificate (PEM), with key
    key: Path | None = None  # client private key (PEM), with cert
    max_lag: int = 100  # a passive takes over by the witness only if its active was at most this far ahead

    @property
    def leader_key(self) -> str:
        return f"{self.prefix}/leader"


def check_endpoints(endpoints: Sequence[str]) -> list[str]:
    """The endpoints normalised to ``scheme://host:port``; ValueError naming the first bad one.

    ``https`` anywhere; ``http`` only to a loopback host (``localhost``, 127.0.0.0/8, ``::1``), since the
    lease decides which server runs the service and must not cross a network in clear text."""
    if isinstance(endpoints, str) or not endpoints:
        raise ValueError("witness -> endpoints: expected a non-empty list of 'https://host:port'")
    out: list[str] = []
    for text in endpoints:
        where = f"witness -> endpoints: {text!r}"
        if not isinstance(text, str):
            raise ValueError(f"{where}: expected a string 'https://host:port'")
        try:
            parts = urlsplit(text.strip())
            port = parts.port
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        scheme = parts.scheme.lower()
        host = parts.hostname
        if scheme not in ("http", "https"):
            raise ValueError(f"{where}: expected http:// or https://")
        if not host or port is None:
            raise ValueError(f"{where}: expected scheme://host:port (the port is required)")
        if parts.username is not None or parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"{where}: only scheme://host:port, no user, path, query or fragment")
        if scheme == "http" and not is_loopback(host.lower()):
            raise ValueError(f"{where}: plain http is allowed on loopback only; use https")
        netloc = f"[{host}]:{port}" if ":" in host else f"{host.lower()}:{port}"
        norm = f"{scheme}://{netloc}"
        if norm in out:
            raise ValueError(f"{where}: listed twice")
        out.append(norm)
    return out


def check_timing(cfg: WitnessConfig) -> None:
    """Patroni's timing rules; ValueError naming the keys that break them."""
    if isinstance(cfg.ttl, bool) or not isinstance(cfg.ttl, int) or cfg.ttl < 2:
        raise ValueError(f"witness -> ttl: expected whole seconds >= 2 (etcd's unit), got {cfg.ttl!r}")
    for name in ("safety_margin", "check_interval", "retry_timeout"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"witness -> {name}: expected seconds > 0, got {value!r}")
    if cfg.check_interval + 2 * cfg.retry_timeout > cfg.ttl:
        raise ValueError(
            f"witness -> check_interval + 2 * witness -> retry_timeout ({cfg.check_interval:g} + 2 * "
            f"{cfg.retry_timeout:g}) must be <= witness -> ttl ({cfg.ttl}): a renewal could come too late"
        )
    if not cfg.safety_margin < cfg.ttl:
        raise ValueError(
            f"witness -> safety_margin ({cfg.safety_margin:g}) must be < witness -> ttl ({cfg.ttl}): the "
            "holder must stop its service before its lease can expire"
        )


def check_config(cfg: WitnessConfig) -> list[str]:
    """Every check of a witness config (endpoints, timing, prefix, TLS pairs); the normalised endpoints."""
    endpoints = check_endpoints(cfg.endpoints)
    check_timing(cfg)
    p = cfg.prefix
    if not isinstance(p, str) or not p.startswith("/") or p.endswith("/") or len(p) < 2 or "\0" in p:
        raise ValueError(f"witness -> prefix: expected '/name' without a trailing '/', got {p!r}")
    if (cfg.cert is None) != (cfg.key is None):
        raise ValueError("witness -> cert, witness -> key: give both or neither")
    return endpoints


# ---- the node: one config per server, read by `standby run` ------------------------------------------------
#
# A node config has [node] and [peer] (and optionally [service], [failover], [alert], [[guard]]) instead of
# [sender] and [receiver]: the agent replicates as a sender while the node is active and as a receiver while
# it is passive, so it derives both parts' configs from the one file (NodeSetup.sender/receiver).


@dataclass(frozen=True)
class NodeConfig:
    name: str
    listen: tuple[str, int]  # replication and agent-to-agent traffic (TLS unless insecure)
    root: Path  # the replicated root: the sender's source when active, the receiver's target when passive
    state_dir: Path  # see NodeSetup for its layout
    include: tuple[str, ...] = SenderConfig.include
    initial_role: Role = Role.PASSIVE  # only when there is no durable role yet (engine.rolestate)
    insecure: bool = False  # plaintext, loopback only
    preferred: bool = False  # the node `standby failback` returns the service to


@dataclass(frozen=True)
class PeerConfig:
    name: str
    address: tuple[str, int]
    id: str = ""  # the peer's node ID; "" only with [node] insecure


@dataclass(frozen=True)
class FailoverConfig:
    # failover_after is in [service], where it was first (ServiceConfig.failover_after).
    flap_window: float = 21_600.0
    start_alone_after: float = 0.0  # 0: never
    fence_command: tuple[str, ...] = ()  # argv; exit 0 means the old active is fenced
    auto_rejoin: bool = True  # a fenced node rejoins as passive by itself (after setting its changes aside)
    switchover_timeout: float = 120.0  # a switchover not taken over by then is rolled back
    max_clock_skew: float = 2.0  # warn when the peer's clock is further off than this (seconds)


@dataclass(frozen=True)
class LogConfig:
    """``[log]``: where `standby run` also writes its log, besides stderr."""

    file: Path | None = None  # a rotating log file (None: stderr only)
    max_mb: float = 10.0  # rotate at this size
    backups: int = 5  # rotated files kept
    format: str = "text"  # "text" (event key=value) or "json"
    event_log: bool = False  # Windows: warnings and errors also to the Application event log


@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: Prometheus text served over HTTP, read from the status at each scrape."""

    listen: tuple[str, int] | None = None  # None: no metrics endpoint


@dataclass(frozen=True)
class UpgradeConfig:
    """``[upgrade]``: the installer ``standby upgrade`` carries to the passive and runs there."""

    installer: str = "config/upgrade/SetupProject.msi"  # relative to [node] root, or absolute
    command: tuple[str, ...] = ()  # off Windows: the installer command ({installer}, {log} substituted)
    version_command: tuple[str, ...] = ()  # prints the service's version on its first line
    service_exe: str = ""  # Windows: the service's program, whose file version is its version
    stable_for: float = 10.0  # after the installer: stopped and Manual this long
    timeout: float = 1800.0  # the installer's time limit


@dataclass(frozen=True)
class AlertConfig:
    command: tuple[str, ...] = ()  # argv; gets each alert event as JSON on stdin
    timeout: float = 10.0


#: The part folders below a node's state folder.
SENDER_DIR = "sender"
RECEIVER_DIR = "receiver"


@dataclass(frozen=True)
class NodeSetup:
    """A node config: everything ``standby run`` needs on one server.

    The state folder (``[node] state_dir``) is laid out as::

        node.key, node.crt   the node's one identity: both parts present it, and the peer pins its ID
        standby.lock         held by `standby run` for its life (engine.statelock)
        role                 the durable role, epochs and boot counter (engine.rolestate)
        sender/              the sender part's state_dir: journal/, epoch, hashcache, status.json, ...
        receiver/            the receiver part's state_dir: position, hashcache, status.json, guard-history/

    A folder per part, not one folder for both: the parts keep files of the same names (``hashcache``,
    ``status.json``, ``guard-scratch``) that would overwrite each other on a node that is one and then the
    other, and each part's state outlives a change of role: the journal stays for ``journal replay``, the
    receiver's position and guard history for the next time the node is passive. The journal
    (``sender/journal/``) and the receiver's position (``receiver/position``) can never be taken for each
    other. The identity, the lock and the role belong to the node, not to a part, so they stay at the top.

    For the composition root this means: TLS comes from the node's folder,
    ``TlsSettings(identity.load(setup.node.state_dir), setup.peer.id)`` (``transport.settings_for(part)``
    would look in the part's folder), and one lock, on the node's folder, covers both parts (no other
    command reads a node config: :func:`load` refuses it without ``allow_node``).
    """

    path: Path
    node: NodeConfig
    peer: PeerConfig
    service: ServiceConfig = ServiceConfig()
    failover: FailoverConfig = FailoverConfig()
    alert: AlertConfig = AlertConfig()
    guards: tuple[GuardRule, ...] = ()
    upgrade: UpgradeConfig = UpgradeConfig()
    log: LogConfig = LogConfig()
    metrics: MetricsConfig = MetricsConfig()
    witness: WitnessConfig | None = None  # [witness]: None, no witness (failover needs proof)

    def sender(self) -> SenderConfig:
        """The sender part, run while the node is active: it ships ``root`` to the peer."""
        n = self.node
        return SenderConfig(
            source=n.root,
            peer=self.peer.address,
            state_dir=n.state_dir / SENDER_DIR,
            include=n.include,
            node=n.name,
            peer_id=self.peer.id,
            insecure=n.insecure,
        )

    def receiver(self) -> ReceiverConfig:
        """The receiver part, run while the node is passive: it applies the peer's changes to ``root``."""
        n = self.node
        return ReceiverConfig(
            listen=n.listen,
            target=n.root,
            state_dir=n.state_dir / RECEIVER_DIR,
            node=n.name,
            peer_id=self.peer.id,
            insecure=n.insecure,
        )

    def parts(self) -> Config:
        """Both parts as a :class:`Config`, for code written against one (``engine.guards``)."""
        return Config(self.path, self.sender(), self.receiver(), self.guards)

    def policy(self) -> Policy:
        """The role machine's policy from ``[service] failover_after``, ``[failover]`` and ``[witness]``."""
        f = self.failover
        policy = Policy(
            failover_after=self.service.failover_after,
            flap_window=f.flap_window,
            start_alone_after=f.start_alone_after or None,
            fence_command=bool(f.fence_command),
            auto_rejoin=f.auto_rejoin,
            switchover_timeout=f.switchover_timeout,
        )
        w = self.witness
        if w is None:
            return policy
        return replace(
            policy,
            witness=True,
            witness_ttl=float(w.ttl),
            witness_margin=w.safety_margin,
            witness_interval=w.check_interval,
            max_lag=w.max_lag,
        )


FAILOVER_RANGES: dict[str, Range] = {
    # below a minute a flapping service fails over back and forth about as fast as it can restart
    "flap_window": Range(60, 604_800, "seconds"),
    # below a minute a restarted active would start alone before a rebooting peer could answer
    "start_alone_after": Range(60, 604_800, "seconds", off=True),
    # long enough to stop the service, drain and hash both trees; a switchover is watched by its operator
    "switchover_timeout": Range(10, 3600, "seconds"),
    "max_clock_skew": Range(0.1, 3600, "seconds"),
}
LOG_RANGES: dict[str, Range] = {
    "max_mb": Range(1, 1024, "MB"),
    "backups": Range(1, 100, "files"),
}
UPGRADE_RANGES: dict[str, Range] = {
    "stable_for": Range(1, 600, "seconds"),
    "timeout": Range(10, 86_400, "seconds"),
}
ALERT_RANGES: dict[str, Range] = {"timeout": Range(1, 600, "seconds")}
WITNESS_RANGES: dict[str, Range] = {
    "ttl": Range(2, 3600, "seconds"),
    "safety_margin": Range(0.5, 3600, "seconds"),
    "check_interval": Range(0.2, 3600, "seconds"),
    "retry_timeout": Range(0.2, 600, "seconds"),
    "max_lag": Range(0, 1_000_000_000, "entries"),
}
#: Every numeric key of a node config's own sections, by section ([node] and [peer] have none). Kept apart
#: from RANGES, which is by key alone: ``timeout`` means one thing in [service], another in [alert] and in
#: [[guard]]. config.example.toml states each range in its section (a test checks).
NODE_RANGES: dict[str, dict[str, Range]] = {
    "service": SERVICE_RANGES,
    "failover": FAILOVER_RANGES,
    "alert": ALERT_RANGES,
    "upgrade": UPGRADE_RANGES,
    "log": LOG_RANGES,
    "witness": WITNESS_RANGES,
}
NODE_SECTIONS = (
    "node",
    "peer",
    "service",
    "failover",
    "alert",
    "guard",
    "upgrade",
    "log",
    "metrics",
    "witness",
)
_NODE_KEYS = ("name", "listen", "root", "include", "state_dir", "initial_role", "insecure", "preferred")
_PEER_KEYS = ("name", "address", "id")
_INITIAL_ROLES = {"active": Role.ACTIVE, "passive": Role.PASSIVE}


def parse_node(data: dict[str, Any], path: Path) -> NodeSetup:
    """The node config in ``data`` (a decoded TOML document with ``[node]``) read from ``path``: relative
    paths in it are relative to ``path``'s folder (``load`` passes it absolute). Every error is one
    ConfigError naming the key path (``node -> listen``)."""
    base = path.parent
    for key in data:
        if key in ("sender", "receiver"):
            raise ConfigError(
                f"{key}: not part of a node config: [node] and [peer] give what the {key} needs (a file "
                "with [node] is read by `standby run`)"
            )
        if key not in NODE_SECTIONS:
            raise ConfigError(f"{key}: unknown section (known in a node config: {', '.join(NODE_SECTIONS)})")
    n = _table(data, "node", _NODE_KEYS)
    p = _table(data, "peer", _PEER_KEYS)
    name = _name(n, "node")
    listen = parse_address(_required(n, "listen", "node"), "node -> listen")
    root = _path(n, "root", "node", base)
    state_dir = _path(n, "state_dir", "node", base)
    if state_dir == root or state_dir.is_relative_to(root):
        raise ConfigError(
            f"node -> state_dir: {state_dir} is inside root ({root}); keep the state folder outside the "
            "replicated root"
        )
    include = n.get("include", list(SenderConfig.include))
    if not isinstance(include, list) or not include or not all(isinstance(x, str) for x in include):
        raise ConfigError(f"node -> include: expected a non-empty list of relative paths, got {include!r}")
    for item in include:
        try:
            check_relpath(item)
        except PathRejected as e:
            raise ConfigError(f"node -> include: {e}") from None
    role = n.get("initial_role", "passive")
    if role not in _INITIAL_ROLES:
        raise ConfigError(f"node -> initial_role: expected 'active' or 'passive', got {role!r}")
    insecure, preferred = _flag(n, "insecure", "node"), _flag(n, "preferred", "node")
    node = NodeConfig(
        name, listen, root, state_dir, tuple(include), _INITIAL_ROLES[role], insecure, preferred
    )

    peer_name = _name(p, "peer")
    if peer_name.casefold() == name.casefold():
        raise ConfigError(f"peer -> name: {peer_name!r} is this node's own name (node -> name)")
    address = parse_address(_required(p, "address", "peer"), "peer -> address")
    if address == listen:
        raise ConfigError(f"peer -> address: {address[0]}:{address[1]} is this node's own (node -> listen)")
    peer_id = ""
    if "id" in p:
        if not isinstance(p["id"], str):
            raise ConfigError(f"peer -> id: expected the peer's node ID as a string, got {p['id']!r}")
        peer_id = parse_id(p["id"], "peer -> id")
    if insecure:
        for key, host in (("node -> listen", listen[0]), ("peer -> address", address[0])):
            if not is_loopback(host):
                raise ConfigError(
                    f"node -> insecure: plaintext is only allowed on loopback, but {key} is {host!r}; pin "
                    "the peer's ID with [peer] id instead"
                )
    elif not peer_id:
        raise ConfigError(
            "peer -> id: required: run `standby init --config FILE` on the other server and copy the node "
            "ID it prints (or [node] insecure = true, loopback only)"
        )
    peer = PeerConfig(peer_name, address, peer_id)

    service = parse_service(data.get("service", {}))
    f = _table(
        data,
        "failover",
        (
            "flap_window",
            "start_alone_after",
            "fence_command",
            "auto_rejoin",
            "switchover_timeout",
            "max_clock_skew",
        ),
        required=False,
    )
    failover = FailoverConfig(
        flap_window=_section_number(f, "failover", "flap_window", FailoverConfig.flap_window),
        start_alone_after=_section_number(
            f, "failover", "start_alone_after", FailoverConfig.start_alone_after
        ),
        fence_command=_argv(f.get("fence_command", []), "failover -> fence_command"),
        auto_rejoin=_flag(f, "auto_rejoin", "failover") if "auto_rejoin" in f else True,
        switchover_timeout=_section_number(
            f, "failover", "switchover_timeout", FailoverConfig.switchover_timeout
        ),
        max_clock_skew=_section_number(f, "failover", "max_clock_skew", FailoverConfig.max_clock_skew),
    )
    u = _table(
        data,
        "upgrade",
        ("installer", "command", "version_command", "service_exe", "stable_for", "timeout"),
        required=False,
    )
    for key in ("installer", "service_exe"):
        if key in u and (not isinstance(u[key], str) or (key == "installer" and not u[key])):
            raise ConfigError(f"upgrade -> {key}: expected a path as a string, got {u[key]!r}")
    upgrade = UpgradeConfig(
        installer=u.get("installer", UpgradeConfig.installer),
        command=_argv(u.get("command", []), "upgrade -> command"),
        version_command=_argv(u.get("version_command", []), "upgrade -> version_command"),
        service_exe=u.get("service_exe", ""),
        stable_for=_section_number(u, "upgrade", "stable_for", UpgradeConfig.stable_for),
        timeout=_section_number(u, "upgrade", "timeout", UpgradeConfig.timeout),
    )
    a = _table(data, "alert", ("command", "timeout"), required=False)
    alert = AlertConfig(
        command=_argv(a.get("command", []), "alert -> command"),
        timeout=_section_number(a, "alert", "timeout", AlertConfig.timeout),
    )
    lg = _table(data, "log", ("file", "max_mb", "backups", "format", "event_log"), required=False)
    fmt = lg.get("format", "text")
    if fmt not in ("text", "json"):
        raise ConfigError(f"log -> format: expected 'text' or 'json', got {fmt!r}")
    log_cfg = LogConfig(
        file=_path(lg, "file", "log", base) if "file" in lg else None,
        max_mb=_section_number(lg, "log", "max_mb", LogConfig.max_mb),
        backups=int(_section_number(lg, "log", "backups", LogConfig.backups)),
        format=fmt,
        event_log=_flag(lg, "event_log", "log"),
    )
    m = _table(data, "metrics", ("listen",), required=False)
    metrics = MetricsConfig(listen=parse_address(m["listen"], "metrics -> listen") if "listen" in m else None)
    if metrics.listen is not None and metrics.listen in (listen, address):
        raise ConfigError(
            f"metrics -> listen: {metrics.listen[0]}:{metrics.listen[1]} is a replication port; pick another"
        )
    return NodeSetup(
        path,
        node,
        peer,
        service,
        failover,
        alert,
        _guards(data.get("guard", [])),
        upgrade,
        log_cfg,
        metrics,
        _witness(data, name, peer_name, base),
    )


def _witness(data: dict[str, Any], node: str, peer: str, base: Path) -> WitnessConfig | None:
    """``[witness]``, or None when the section is absent. The prefix defaults to one both nodes derive alike
    from the pair's names, so that two configs written separately name the same key."""
    keys = tuple(f.name for f in fields(WitnessConfig))
    w = _table(data, "witness", keys, required=False)
    if "witness" not in data:
        return None
    endpoints = w.get("endpoints")
    if not isinstance(endpoints, list):
        raise ConfigError(f"witness -> endpoints: expected a list of 'https://host:port', got {endpoints!r}")
    prefix = w.get("prefix", "/standby/" + "+".join(sorted((node, peer), key=str.casefold)))
    ttl = _section_number(w, "witness", "ttl", WitnessConfig.ttl)
    if ttl != int(ttl):
        raise ConfigError(f"witness -> ttl: expected whole seconds (etcd's unit), got {w['ttl']!r}")
    cfg = WitnessConfig(
        endpoints=tuple(endpoints),
        prefix=prefix,
        ttl=int(ttl),
        safety_margin=_section_number(w, "witness", "safety_margin", WitnessConfig.safety_margin),
        check_interval=_section_number(w, "witness", "check_interval", WitnessConfig.check_interval),
        retry_timeout=_section_number(w, "witness", "retry_timeout", WitnessConfig.retry_timeout),
        ca=_path(w, "ca", "witness", base) if "ca" in w else None,
        cert=_path(w, "cert", "witness", base) if "cert" in w else None,
        key=_path(w, "key", "witness", base) if "key" in w else None,
        max_lag=int(_section_number(w, "witness", "max_lag", WitnessConfig.max_lag)),
    )
    try:
        endpoints = check_config(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return replace(cfg, endpoints=tuple(endpoints))


def load_node(path: Path) -> NodeSetup:
    """The node config in the file at ``path`` (``load(path, allow_node=True)``); a file without ``[node]``
    is an error."""
    cfg = load(path, allow_node=True)
    if cfg.node is None:
        raise ConfigError(f"{path}: not a node config (no [node] section; `standby run` needs one)")
    return cfg.node


def _table(data: dict[str, Any], name: str, known: tuple[str, ...], required: bool = True) -> dict[str, Any]:
    """Section ``name`` of ``data`` (``{}`` when absent and not ``required``); no key outside ``known``."""
    if name not in data:
        if required:
            raise ConfigError(f"{name}: required in a node config")
        return {}
    section = data[name]
    if not isinstance(section, dict):
        raise ConfigError(f"{name}: expected a table")
    if name == "failover" and "failover_after" in section:
        raise ConfigError("failover -> failover_after: set it in [service] (service -> failover_after)")
    for key in section:
        if key not in known:
            raise ConfigError(f"{name} -> {key}: unknown key (known: {', '.join(sorted(known))})")
    return section


def _required(section: dict[str, Any], key: str, name: str) -> Any:
    if key not in section:
        raise ConfigError(f"{name} -> {key}: required")
    return section[key]


def _name(section: dict[str, Any], name: str) -> str:
    v = _required(section, "name", name)
    if not isinstance(v, str) or not v or len(v) > 255 or any(ord(c) < 32 for c in v):
        raise ConfigError(
            f"{name} -> name: expected a name of 1 to 255 characters without control characters, got {v!r}"
        )
    return v


def _flag(section: dict[str, Any], key: str, name: str) -> bool:
    v = section.get(key, False)
    if not isinstance(v, bool):
        raise ConfigError(f"{name} -> {key}: expected true or false, got {v!r}")
    return v


def _section_number(section: dict[str, Any], name: str, key: str, default: float) -> float:
    if key not in section:
        return default
    return float(_number(section[key], f"{name} -> {key}", NODE_RANGES[name][key]))


def _argv(value: Any, key: str) -> tuple[str, ...]:
    """A command as an argv list (run without a shell): ``[]`` for none, else a program and its arguments."""
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value) or (value and not value[0]):
        raise ConfigError(
            f"{key}: expected a list of strings (the program, then its arguments; [] for none), got {value!r}"
        )
    return tuple(value)
