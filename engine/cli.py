"""The ``standby`` command: subcommands, logging set-up, signals and exit codes. Imported by nothing.

Exit codes: 0 success; 1 ``verify`` found differences (``replay``: stopped short by damage); 2 bad
config or usage; 3 safety halt (an operator must confirm); 4 refused by the peer (epoch fence, busy,
version); 5 any other replication error; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from engine import __version__, config, logs
from engine.errors import (
    ConfigError,
    JournalError,
    PeerRefused,
    ReplicationError,
    SafetyHalt,
    StateLocked,
)

log = logging.getLogger("engine.cli")

EXIT_OK, EXIT_DIFF, EXIT_CONFIG, EXIT_HALT, EXIT_REFUSED, EXIT_ERROR = 0, 1, 2, 3, 4, 5

DESCRIPTION = """\
standby keeps a passive server an exact, crash-consistent copy of an active one.

On the active server `standby send` watches the replicated set, journals every change durably and streams
the journal in order to `standby receive` on the passive server, which applies each change atomically and
acknowledges it. Both read one TOML file (see config.example.toml); each uses its own section.

For an HA pair, `standby run` on each server (a node config) does both as its role requires, controls
the service and fails over with proof that the old active cannot run it; `standby failover`,
`switchover`, `failback`, `maintenance`, `rejoin`, `quarantine`, `upgrade` and `status` talk to it, and
`standby service install` runs it as a Windows service. `standby demo --ha` shows a pair on loopback.
"""

EPILOG = """\
examples:
  standby demo --seconds 20              a live pair on loopback, in temporary folders
  standby init --config standby.toml     create this server's key; print the node ID to pin on the other
  standby receive --config standby.toml  on the passive server
  standby send --config standby.toml     on the active server
  standby verify --config standby.toml   compare source and replica by hash (exit 1 if they differ)
  standby status --config standby.toml   role, peer, positions and lag of the local node
  standby demo --ha                      an HA pair on loopback: failover, rejoin, failback
  standby switchover --config node.toml  move the service to the other server, losing nothing

exit codes: 0 ok, 1 differences found (replay: stopped short by damage), 2 bad config or usage,
            3 safety halt, 4 refused by peer, 5 other error, 130 interrupted
"""


LOG_LEVELS = ["debug", "info", "warning", "error"]
LOG_FORMATS = ["text", "json"]


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="standby", description=DESCRIPTION, epilog=EPILOG, formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"standby {__version__}")
    p.add_argument(
        "--log-level",
        default="info",
        choices=LOG_LEVELS,
        help="log verbosity (default: info); also accepted after the command",
    )
    p.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="text lines 'event key=value', or one JSON object per line (default: text); also accepted\n"
        "after the command",
    )
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    def cmd(name: str, help: str, desc: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=desc, formatter_class=fmt)
        # Accepted after the command too (`standby run --config F --log-level debug`, as a service's
        # arguments are usually written); given there, they win.
        sp.add_argument("--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS, help=argparse.SUPPRESS)
        sp.add_argument(
            "--log-format", default=argparse.SUPPRESS, choices=LOG_FORMATS, help=argparse.SUPPRESS
        )
        return sp

    def follow(sp: argparse.ArgumentParser, default: float) -> None:
        """--timeout of a command that follows what it asked for (the agents go on after it)."""
        sp.add_argument(
            "--timeout",
            type=float,
            default=default,
            metavar="SECONDS",
            help=f"how long to follow (default: {default:g}); the agents go on after it",
        )

    def moment(sp: argparse.ArgumentParser, pos: str, dry: str) -> None:
        """``--at TIME | --pos N`` (one of them) and ``--dry-run``."""
        when = sp.add_mutually_exclusive_group(required=True)
        when.add_argument(
            "--at",
            metavar="TIME",
            help="ISO 8601: 2026-11-25T10:01:00 is this machine's local time; 2026-11-25T10:01:00+01:00\n"
            "or 2026-11-25T09:01:00Z carry their own offset",
        )
        when.add_argument("--pos", type=int, metavar="N", help=pos)
        sp.add_argument("--dry-run", action="store_true", help=dry)

    def conf(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--config",
            "-c",
            type=Path,
            required=True,
            metavar="FILE",
            help="the TOML config file (see config.example.toml)",
        )

    sp = cmd(
        "send",
        "run the sender on the active server",
        "Watch the replicated set under [sender] source, journal every change in [sender] state_dir and\n"
        "stream it to the receiver at [sender] peer. Runs in the foreground until SIGINT/SIGTERM\n"
        "(Ctrl-C / Ctrl-Break); a second signal forces the exit.",
    )
    conf(sp)
    sp.add_argument(
        "--allow-mass-delete",
        action="store_true",
        help="confirm a deletion the safety halt stopped (more than [sender] max_delete_share\n"
        "of the replica, or a whole replicated folder)",
    )
    sp = cmd(
        "run",
        "run this server's agent: its role, the service, failover and replication",
        "The one long-running command on each server of an HA pair (a node config: [node], [peer],\n"
        "[service], see config.example.toml). It replicates to the peer while this node is active and\n"
        "from it while passive, starts the service only as active, watches the active's service from\n"
        "the passive and fails over when it has been down for [service] failover_after, with proof that\n"
        "the old active cannot run it (its agent stopped it, or [failover] fence_command). Runs in the\n"
        "foreground until SIGINT/SIGTERM (a planned stop, announced to the peer).",
    )
    conf(sp)
    sp = cmd(
        "failover",
        "make the passive active now (from either server)",
        "Ask the agents to fail over now, without waiting for failover_after: the active stops its\n"
        "service and is fenced, then the passive starts its own. --force (on the passive) promotes even\n"
        "when the active's agent cannot be reached: only when you KNOW the active is down, or both run.",
    )
    conf(sp)
    sp.add_argument("--force", action="store_true", help="promote without proof (the active is down)")
    sp = cmd(
        "maintenance",
        "open or close a maintenance window (no automatic failover while open)",
        "start --for 30m: no automatic failover for that long (reboots, upgrades); end: close it.",
    )
    conf(sp)
    sp.add_argument("action", choices=["start", "end"])
    sp.add_argument("--for", dest="duration", default="30m", metavar="DURATION", help="e.g. 90s, 30m, 2h")
    sp = cmd(
        "rejoin",
        "let a fenced node become passive again",
        "A fenced node keeps its data untouched and never starts the service. Rejoin first moves every\n"
        "file it has that the active never had (written after the failover, or never shipped) into\n"
        "<state_dir>/quarantine/ with a manifest, then makes it passive, so the replica follows the\n"
        "active again (only files that differ travel). With [failover] auto_rejoin (the default) a\n"
        "fenced node does this by itself once the other node runs the service. The command shows the\n"
        "quarantine and the catch-up as a progress bar.",
    )
    conf(sp)
    follow(sp, 600.0)
    sp = cmd(
        "service",
        "install, remove, start or stop standby run as a Windows service",
        "install --config FILE: register `standby run` for that node config with the Service Control\n"
        "Manager (delayed automatic start, restart after a crash, a reboot announced to the peer as a\n"
        "planned stop). remove, start, stop: what they say. Windows only (pywin32: standby[windows]);\n"
        "on Linux use packaging/systemd/standby.service.",
    )
    sp.add_argument("action", choices=["install", "remove", "start", "stop"])
    sp.add_argument("--config", "-c", type=Path, default=None, metavar="FILE", help="install: the config")
    sp.add_argument("--name", default="standby", help="the service's name (default: standby)")
    sp = cmd(
        "switchover",
        "move the service to the other node, planned, losing nothing",
        "Run on either server. The active stops its service, drains until the other node has applied\n"
        "everything, both trees are compared by hash, the epoch is raised and the other node starts\n"
        "the service; the old active becomes passive. If anything fails before the new service runs,\n"
        "the service is started again where it was. Prints each step and the time the service was\n"
        "down. Running it again after an interruption follows the switchover under way.",
    )
    conf(sp)
    sp.add_argument("--to", metavar="NODE", default="", help="the node to move to (default: the passive)")
    follow(sp, 300.0)
    sp = cmd(
        "failback",
        "switch over to the node configured with [node] preferred = true",
        "A switchover to the preferred node (see switchover). Refused while files a rejoin set aside\n"
        "are not acknowledged (standby quarantine list / ack).",
    )
    conf(sp)
    follow(sp, 300.0)
    sp = cmd(
        "quarantine",
        "list or acknowledge the files a rejoin set aside",
        "list: the quarantine folders of this node (<state_dir>/quarantine/), what each holds and\n"
        "whether it is acknowledged. --files shows each file with its size, hash and why.\n"
        "ack ID | --all: mark folders as looked at (nothing is deleted); failback needs it.",
    )
    conf(sp)
    sp.add_argument("action", choices=["list", "ack"])
    sp.add_argument("id", nargs="?", default=None, help="ack: the folder to acknowledge")
    sp.add_argument("--all", action="store_true", help="ack: every folder")
    sp.add_argument("--files", action="store_true", help="list: every file of every folder")
    sp.add_argument("--json", action="store_true", help="list: machine-readable output")
    sp = cmd(
        "upgrade",
        "carry the service's installer to the passive, run it there, compare versions",
        "stage (on the active): send [upgrade] installer to the passive over the authenticated link,\n"
        "checked by hash. run (on the passive): open a maintenance window, run the installer\n"
        "(Windows: msiexec /i FILE /qn /l*v LOG), then make sure the service is stopped and Manual\n"
        "and stays so for [upgrade] stable_for, and close the window. check (either node): do both\n"
        "nodes run the same version of the service and of standby? Exit 0 yes, 1 no.",
    )
    conf(sp)
    sp.add_argument("action", choices=["stage", "run", "check"])
    sp = cmd(
        "init",
        "create this node's key and certificate; print its node ID",
        "Create the private key and self-signed certificate of each section's node in its state_dir (if\n"
        "missing) and print the node ID. Copy the sender's ID into the receiver's [receiver] peer_id\n"
        "and the receiver's ID into the sender's [sender] peer_id. --rotate replaces the key (then\n"
        "update the pinned ID on the other server).",
    )
    conf(sp)
    sp.add_argument("--rotate", action="store_true", help="replace an existing key and certificate")
    sp = cmd(
        "receive",
        "run the receiver on the passive server",
        "Listen on [receiver] listen and apply changes in order, atomically and durably, under\n"
        "[receiver] target: a local folder, or a folder on an SMB share (smb://server/share/folder, with\n"
        "smb_username and smb_password or STANDBY_SMB_PASSWORD). Runs in the foreground until\n"
        "SIGINT/SIGTERM; a second signal forces.",
    )
    conf(sp)
    sp = cmd(
        "verify",
        "compare source and replica by hash (on the active)",
        "Ask the receiver for its manifest and compare it with the source, file by file, by size and\n"
        "xxh3-128 hash. Exit 0 when identical, 1 when not.",
    )
    conf(sp)
    sp.add_argument(
        "--full",
        action="store_true",
        help="hash every file on both sides, trusting neither side's hash cache (reads the whole set)",
    )
    sp.add_argument(
        "--settle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="retry for up to this long while changes are still in flight (default: 0)",
    )
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp = cmd(
        "status",
        "show role, peer, positions and lag of this node",
        "Read the status the running send/receive process keeps in its state folder.",
    )
    conf(sp)
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp = cmd(
        "demo",
        "run a live pair on loopback with a simulated service",
        "Start a receiver and a sender as separate processes on 127.0.0.1 in temporary folders, and a\n"
        "writer that books, updates and deletes meetings the way Synergy Join does. Shows replication\n"
        "as it happens, then verifies the replica.",
    )
    sp.add_argument("--seconds", type=float, default=15.0, help="how long the writer runs (default: 15)")
    sp.add_argument("--rooms", type=int, default=5, help="meeting rooms to simulate (default: 5)")
    sp.add_argument("--rate", type=float, default=20.0, help="batches of changes per second (default: 20)")
    sp.add_argument("--keep", action="store_true", help="keep the temporary folders and print where")
    sp.add_argument(
        "--ha",
        action="store_true",
        help="an HA pair instead: two agents with simulated services that fail over after a crash,\n"
        "rejoin, and fail back by hand (about a minute)",
    )
    sp = cmd(
        "guard",
        "list or restore the kept good versions of a guarded file (on the passive)",
        "history: the last good versions of a guarded file the receiver kept (newest is 0).\n"
        "restore: put version K back in the replica atomically (the receiver must be stopped, or\n"
        "--force).",
    )
    conf(sp)
    sp.add_argument("action", choices=["history", "restore"])
    sp.add_argument("path", help="the file, relative to the replicated root (e.g. databases/r1/sync.cookie)")
    sp.add_argument("--version", type=int, default=0, metavar="K", help="restore: which version (default 0)")
    sp.add_argument("--force", action="store_true", help="restore even while the receiver runs")
    sp.add_argument("--json", action="store_true", help="history: machine-readable output")
    sp = cmd(
        "journal",
        "inspect, check, repair the journal or replay it into a folder",
        "list: the journal's segments and positions.\n"
        "show --path P: every version of one file (or the files below a folder) the journal keeps:\n"
        "time (UTC and local), entry, size, hash, what changed it.\n"
        "replay: rebuild a tree from the journal into a new folder, up to a seq or a time\n"
        "(point-in-time recovery). The output is built aside and renamed into place when whole.\n"
        "check: read every segment; report the valid prefix and the first damage (segment, byte,\n"
        "why). Exit 0 whole, 1 damaged. Read-only: safe while the sender runs.\n"
        "repair: with the sender stopped, keep the valid prefix and move everything after it into\n"
        "<state_dir>/journal/damaged-<UTC time>/ (never deletes); prints what it set aside.",
    )
    conf(sp)
    sp.add_argument("action", choices=["list", "show", "replay", "check", "repair"])
    sp.add_argument("--path", help="show: a path relative to the replicated root, e.g. config/config.json")
    sp.add_argument("--json", action="store_true", help="show: machine-readable output")
    sp.add_argument("--out", type=Path, help="replay: the folder to create (must not exist)")
    sp.add_argument(
        "--until-seq", type=int, metavar="N", help="replay: last entry to apply (within the journal's seqs)"
    )
    sp.add_argument(
        "--until-time",
        metavar="TIME",
        help="replay: last moment to apply, ISO 8601: 2026-11-25T10:00:00 is local time,\n"
        "2026-11-25T10:00:00+01:00 or 2026-11-25T09:00:00Z carry their own offset",
    )
    sp = cmd(
        "replay",
        "rebuild the whole replicated set as it was at a moment, into a new folder",
        "Applies the journal's entries up to the moment into a new folder, built aside and renamed\n"
        "into place when whole (a progress bar on long replays). --dry-run prints the plan: the\n"
        "entries it would apply and the files and bytes the folder would hold. A moment the journal\n"
        "cannot answer is refused with its window (exit 2), never answered with a partial tree: once\n"
        "segments were pruned, files unchanged since are in no entry kept (standby restore still puts\n"
        "back one file whose change is kept).\n"
        "Damage: a checkpoint whose files differ from its manifest is passed over for an older one. A\n"
        "damaged journal entry stops the replay at the last whole entry before it: the folder holds\n"
        "the set as it was then, the output names the damage, exit 1. --skip-corrupt goes past it and\n"
        "lists what it skipped. A missing segment is never jumped: the replay stops before it, exit 1.",
    )
    conf(sp)
    sp.add_argument(
        "--into", type=Path, required=True, metavar="DIR", help="the folder to create (must not exist)"
    )
    moment(sp, "the last journal entry to apply", "print the plan, write nothing")
    sp.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="go past damaged journal entries (and a damaged checkpoint's files) and list them;\n"
        "without it a replay stops at the last whole entry before the damage (exit 1)",
    )
    sp = cmd(
        "restore",
        "put one file (or a folder's files) back as it was at a moment, from the journal",
        "Reads the journal (a sender's, a passive's kept one, or a node's latest) and writes the file as it\n"
        "was after the last change at or before the moment, in place, atomically and durably (temp file,\n"
        "fsync, rename); on the active it then replicates as any other change. A folder: every file\n"
        "below it that existed then (files added since are left alone). Refused on a node\n"
        "that is passive while its agent runs, and for a moment whose answer the journal no longer\n"
        "holds (older entries pruned): the message names the window. Exit 0 restored, 2 refused.",
    )
    conf(sp)
    sp.add_argument("--path", required=True, help="relative to the replicated root, e.g. config/config.json")
    moment(sp, "the journal entry to restore after", "say what would be written, write nothing")
    return p


def _run_async(main: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    """Run a long-lived command: the first SIGINT/SIGTERM asks for a graceful stop, the second forces."""

    async def runner() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        count = 0

        def on_signal(*_: Any) -> None:
            nonlocal count
            count += 1
            if count > 1:
                log.warning("cli.forced (second signal)")
                os._exit(130)
            loop.call_soon_threadsafe(stop.set)

        sigs = [signal.SIGINT, signal.SIGTERM]
        if sys.platform == "win32":
            sigs = [signal.SIGINT, signal.SIGBREAK]  # type: ignore[attr-defined,unused-ignore]
            for s in sigs:
                signal.signal(s, on_signal)
        else:
            for s in sigs:
                loop.add_signal_handler(s, on_signal)
        return await main(stop)

    return asyncio.run(runner())


def _cmd_send(args: argparse.Namespace) -> int:
    from engine import statelock
    from engine.guards import sender_check
    from engine.node import SenderNode
    from engine.transport import settings_for

    cfg = config.load(args.config)
    # One process per state folder, for the life of the process: a second sender would interleave its
    # seqs with ours in the one journal. A held lock is StateLocked: one line and exit 2 (see _report).
    lock = statelock.acquire(cfg.need_sender().state_dir, "standby send")
    if hasattr(signal, "SIGIO"):
        # Read leases (engine.scan) notify a breaking writer's open with SIGIO; we release them ourselves
        # within microseconds, so the signal carries nothing we need (and would end the process).
        signal.signal(signal.SIGIO, signal.SIG_IGN)
    with lock:
        s = SenderNode(
            cfg.need_sender(),
            allow_mass_delete=args.allow_mass_delete,
            check=sender_check(cfg),
            tls=settings_for(cfg.need_sender()),
        )

        async def main(stop: asyncio.Event) -> int:
            await s.run(stop)
            return EXIT_OK

        return _run_async(main)


def _cmd_receive(args: argparse.Namespace) -> int:
    from engine import statelock
    from engine.guards import receiver_check
    from engine.receiver import Receiver
    from engine.transport import settings_for

    cfg = config.load(args.config)
    lock = statelock.acquire(cfg.need_receiver().state_dir, "standby receive")  # see _cmd_send
    with lock:
        r = Receiver(
            cfg.need_receiver(),
            check=receiver_check(cfg),
            tls=settings_for(cfg.need_receiver()),
        )

        async def main(stop: asyncio.Event) -> int:
            await r.serve(stop)
            return EXIT_OK

        return _run_async(main)


def _cmd_verify(args: argparse.Namespace) -> int:
    from engine.guards import sender_check
    from engine.observer import verify

    full = config.load(args.config)
    cfg = full.need_sender()
    check = sender_check(full)
    deadline = time.monotonic() + args.settle
    while True:
        report = asyncio.run(verify(cfg, check, full=args.full))
        if report.identical or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if args.json:
        print(
            json.dumps(
                {
                    "identical": report.identical,
                    "replica_seq": report.replica_seq,
                    "source_entries": report.source_entries,
                    "replica_entries": report.replica_entries,
                    "differences": [d.__dict__ for d in report.differences],
                    "unstable": report.unstable,
                },
                indent=1,
            )
        )
    else:
        from rich.console import Console

        from engine.observer import report_lines

        # One line per difference, never wrapped or cut whatever the width (a path is copied from here),
        # and no markup: a path may hold brackets.
        con = Console(soft_wrap=True, highlight=False, markup=False, emoji=False)
        for style, line in report_lines(report):
            con.print(line, style=style)
    return EXIT_OK if report.identical else EXIT_DIFF


#: The version of the JSON ``standby status --json`` prints (README: "Status").
STATUS_SCHEMA = 1


def _stopped(st: dict[str, Any] | None) -> dict[str, Any]:
    """What is shown of a process that is not running: that it is not, and when it last wrote; its last
    figures only under ``last`` (for a post-mortem), never as if they were current."""
    last = {k: v for k, v in (st or {}).items() if k != "running"}
    return {"schema": STATUS_SCHEMA, "running": False, "last_seen": last.get("updated"), "last": last or None}


def _ago(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _node_status(args: argparse.Namespace, setup: config.NodeSetup) -> int:
    """The pair as this node's agent sees it: exit 0 healthy, 1 degraded (peer silent, the active's
    service not running, a node fenced, quarantine or clock to look at), 3 halted (replication stopped by
    a safety halt), 5 the agent is not running."""
    from engine.status import read_status

    raw = read_status(setup.node.state_dir)
    if raw is None or not raw.get("running"):
        out = _stopped(raw) | {"node": setup.node.name}
        if args.json:
            print(json.dumps(out, indent=1, sort_keys=True))
        else:
            seen = _ago(out["last_seen"])
            print(f"{setup.node.name}: NOT RUNNING (the agent last wrote its status: {seen})")
        return EXIT_ERROR
    st = raw
    peer = st.get("peer") or {}
    sender = st.get("sender") or {}
    clock = st.get("clock") or {}
    halt = sender.get("halt")
    degraded = [
        why
        for cond, why in (
            (st.get("role") == "fenced", "this node is fenced"),
            (st.get("role") == "active" and st.get("service") != "running", "the service is not running"),
            (peer.get("reachable") is False, "the peer's agent is silent"),
            (
                bool(st.get("quarantined")),
                f"{st.get('quarantined')} quarantined file(s) not acknowledged (standby quarantine list)",
            ),
        )
        if cond
    ]
    degraded += [f"clock: {p}" for p in clock.get("problems") or []]
    witness = st.get("witness") or {}
    if witness:
        degraded += [
            why
            for cond, why in (
                (witness.get("reachable") is False, f"the witness cannot be reached: {witness.get('error')}"),
                (
                    bool(witness.get("failsafe")),
                    "running without the witness's lease, on the peer's confirmation",
                ),
                (bool(witness.get("suspended")), "the service is stopped: the witness's lease is lost"),
            )
            if cond
        ]
    st["schema"] = STATUS_SCHEMA
    st["degraded"] = degraded
    st["halted"] = halt
    if args.json:
        print(json.dumps(st, indent=1, sort_keys=True))
    else:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"standby pair, as {setup.node.name} sees it", title_justify="left")
        for col in ("node", "role", "epoch", "service", "connection", "lag", "last failover", "clock"):
            t.add_column(col)
        last = st.get("last_failover") or {}
        lag = st.get("lag_records")
        t.add_row(
            f"{setup.node.name} (this)",
            str(st.get("role")) + (f" [{st['switchover']}]" if st.get("switchover") else ""),
            str(st.get("epoch")),
            f"{st.get('service')} {st.get('service_for')} s",
            "-",
            "-" if lag is None else f"{lag} entries, {st.get('lag_seconds')} s",
            _ago(last.get("at")) if last else "-",
            "-",
        )
        reach = "reachable" if peer.get("reachable") else f"silent {peer.get('silent_for')} s"
        plag = peer.get("lag")
        skew = clock.get("skew")
        t.add_row(
            str(peer.get("name")),
            str(peer.get("role")) + (f" [{st['peer_switching']}]" if st.get("peer_switching") else ""),
            str(peer.get("epoch")),
            str(peer.get("service")),
            reach,
            "-" if plag is None else f"{plag} entries",
            "-",
            "-" if skew is None else f"{skew:+.2f} s {clock.get('peer_tz') or ''}".strip(),
        )
        con = Console(soft_wrap=True)
        con.print(t)
        con.print(f"maintenance: {'open' if st.get('maintenance') else 'closed'}", highlight=False)
        if witness:
            if witness.get("reachable") is False:
                said = "UNREACHABLE"
            elif witness.get("holder"):
                said = f"key held by {witness['holder']}" + (" (this node)" if witness.get("mine") else "")
                said += f", lease left {witness.get('lease_left')} s, revision {witness.get('revision')}"
            else:
                said = "no one holds the key" if witness.get("reachable") else "not asked yet"
            con.print(f"witness: {said} ({', '.join(witness.get('endpoints') or [])})", highlight=False)
        if halt:
            con.print(f"HALTED: {halt}", style="bold red", markup=False, highlight=False)
        for why in degraded:
            con.print(f"degraded: {why}", markup=False, highlight=False)
    if halt:
        return EXIT_HALT
    return EXIT_DIFF if degraded else EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    from engine.status import read_status

    cfg = config.load(args.config, allow_node=True)
    if cfg.node is not None:
        return _node_status(args, cfg.node)
    out: dict[str, Any] = {}
    codes: list[int] = []
    for role, section in (("sender", cfg.sender), ("receiver", cfg.receiver)):
        if section is None:
            continue
        st = read_status(section.state_dir)
        if st is None or not st.get("running"):
            out[role] = _stopped(st)
            codes.append(EXIT_ERROR)
            continue
        st["schema"] = STATUS_SCHEMA
        out[role] = st
        codes.append(EXIT_HALT if st.get("halt") else EXIT_OK if st.get("connected") else EXIT_DIFF)
    code = max(codes, default=EXIT_OK)
    if args.json:
        print(json.dumps(out, indent=1, sort_keys=True))
        return code
    from rich.console import Console
    from rich.table import Table

    con = Console()
    for role, st in out.items():
        if not st.get("running"):
            con.print(f"{role}: NOT RUNNING (last status: {_ago(st.get('last_seen'))})", highlight=False)
            continue
        t = Table(title=f"{role} (running)", show_header=False)
        t.add_column("key", style="bold")
        t.add_column("value")
        keys = (
            [
                "node",
                "peer",
                "peer_node",
                "connected",
                "halt",
                "epoch",
                "head",
                "sent_seq",
                "acked_seq",
                "lag_records",
                "lag_seconds",
                "pending_paths",
                "last_reconcile",
                "counters",
            ]
            if role == "sender"
            else [
                "node",
                "listen",
                "target",
                "connected",
                "peer",
                "epoch",
                "applied_seq",
                "last_apply",
                "counters",
            ]
        )
        for k in keys:
            if k in st:
                v = st[k]
                if k == "last_apply" and v:
                    v = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v))
                t.add_row(k, json.dumps(v) if isinstance(v, dict | list) else str(v))
        con.print(t)
    return code


def _cmd_demo(args: argparse.Namespace) -> int:
    from engine.demo import run_demo

    if args.ha:
        from engine.demo_ha import run_ha_demo

        return run_ha_demo(keep=args.keep)
    return run_demo(seconds=args.seconds, rooms=args.rooms, rate=args.rate, keep=args.keep)


def _cmd_guard(args: argparse.Namespace) -> int:
    from engine.history import GuardHistory
    from engine.model import check_relpath
    from engine.status import read_status

    cfg = config.load(args.config)
    r = cfg.need_receiver()
    rel = args.path.replace("\\", "/")
    try:
        check_relpath(rel)
    except ReplicationError as e:
        raise ConfigError(f"path: {e}") from None
    hist = GuardHistory(r.state_dir / "guard-history", r.guard_history)
    if args.action == "history":
        versions = hist.versions(rel)
        if args.json:
            print(
                json.dumps(
                    [
                        {
                            "version": v.index,
                            "saved": v.saved_ns / 1e9,
                            "seq": v.seq,
                            "size": v.size,
                            "digest": v.digest().hex(),
                        }
                        for v in versions
                    ],
                    indent=1,
                )
            )
            return EXIT_OK
        if not versions:
            print(
                f"no kept versions of {rel} (guarded paths with history: {', '.join(hist.paths()) or 'none'})"
            )
            return EXIT_OK
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"good versions of {rel} (newest first)")
        for col in ("version", "saved", "entry seq", "bytes", "xxh3-128"):
            t.add_column(col)
        for v in versions:
            t.add_row(
                str(v.index),
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.saved_ns / 1e9)),
                str(v.seq),
                f"{v.size:,}",
                v.digest().hex()[:16],
            )
        Console().print(t)
        return EXIT_OK
    st = read_status(r.state_dir)
    if st and st.get("running") and not args.force:
        raise ReplicationError(
            "the receiver is running; stop it first (or --force: it may overwrite the "
            "restored file with the next change it applies)"
        )
    from engine.targets import receiver_target

    target = receiver_target(r)
    try:
        v = hist.restore(rel, args.version, target)
    finally:
        target.close()
    print(f"restored {rel} version {v.index} ({v.size} bytes, entry {v.seq})")
    return EXIT_OK


def _journal_of(path: Path, writing: bool = False) -> tuple[Path, Path, config.NodeSetup | None]:
    """The journal folder and the replicated root of a config: a sender's journal; a receiver's kept
    journal (``[receiver] keep_journal``); for a node, whichever of its two holds the latest entry (the
    sender's while it was active, the receiver's while it was passive)."""
    cfg = config.load(path, allow_node=True)
    if cfg.node is not None:
        sides = [(cfg.node.sender().state_dir / "journal", cfg.node.node.root)]
        sides.append((cfg.node.receiver().state_dir / "journal", cfg.node.node.root))
        newest = max(sides, key=lambda side: _head_time(side[0]))
        return newest[0], newest[1], cfg.node
    if cfg.sender is not None:
        return cfg.sender.state_dir / "journal", cfg.sender.source, None
    receiver = cfg.need_receiver()
    if receiver.share is not None and writing:
        raise ConfigError(
            f"{path}: the receiver's target is the share {receiver.share.url}: restore on the active, where "
            "the file replicates as a normal change (or replay --into a folder)"
        )
    return receiver.state_dir / "journal", receiver.target, None


def _head_time(folder: Path) -> int:
    """When the newest entry of the journal in ``folder`` was journaled (0: none, or no journal)."""
    from engine.journal import Journal
    from engine.replay import window

    if not folder.is_dir():
        return 0
    try:
        j = Journal.open(folder, fsync=False, readonly=True)
    except ReplicationError:
        return 0
    try:
        return window(j).head_ts
    finally:
        j.close()


def _cmd_journal(args: argparse.Namespace) -> int:
    from engine.replay import check_journal, list_journal, parse_until_time, repair_journal, replay

    folder, _root, node = _journal_of(args.config)
    if args.action == "list":
        list_journal(folder)
        return EXIT_OK
    if args.action == "show":
        return _journal_show(folder, args)
    if args.action == "check":  # read-only: never takes the state lock
        return EXIT_OK if check_journal(folder, args.config) else EXIT_DIFF
    if args.action == "repair":
        from engine import statelock

        # The lock of whoever writes this journal: the node's (its agent) or the sender's.
        owner = node.node.state_dir if node is not None else folder.parent
        with statelock.acquire(owner, "standby journal repair"):
            repair_journal(folder)
        return EXIT_OK
    if args.out is None:
        raise ConfigError("journal replay: --out FOLDER is required")
    until = parse_until_time(args.until_time) if args.until_time else None
    res = replay(folder, args.out, until_seq=args.until_seq, until=until)
    print(res.summary(args.out, until))
    return EXIT_DIFF if res.stopped else EXIT_OK


def _journal_show(folder: Path, args: argparse.Namespace) -> int:
    from engine import recovery
    from engine.replay import utc_and_local

    if not args.path:
        raise ConfigError("journal show: --path P is required (a path relative to the replicated root)")
    window, found = recovery.versions(folder, args.path)
    if args.json:
        doc = {
            "path": args.path,
            "window": {"first": window.first, "head": window.head, "pruned": window.pruned},
            "versions": [
                {
                    "seq": v.seq,
                    "utc": v.ts_ns / 1e9,
                    "op": v.op,
                    "other": v.other,
                    "size": v.held.size if v.held else None,
                    "xxh3": v.held.digest.hex() if v.held else None,
                }
                for v in found
            ],
        }
        print(json.dumps(doc, indent=1))
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{args.path}: {len(found)} version(s) kept ({window})", title_justify="left")
    for col in ("time", "entry", "what", "size", "xxh3"):
        t.add_column(col)
    for v in found:
        what = v.op + (f" ({v.other})" if v.other else "")
        size = f"{v.held.size:,}" if v.held else "—"
        t.add_row(utc_and_local(v.ts_ns), str(v.seq), what, size, v.held.digest.hex()[:16] if v.held else "—")
    Console(soft_wrap=True).print(t)
    if not found:
        print(f"{args.path}: no change of it is kept in the journal ({window})")
    return EXIT_OK


def _cmd_replay(args: argparse.Namespace) -> int:
    from engine import recovery
    from engine.replay import parse_until_time, replay

    folder, _root, _node = _journal_of(args.config)
    until = parse_until_time(args.at) if args.at else None
    if args.dry_run:
        plan = recovery.plan_replay(
            folder, until_ns=until.ns if until else None, until_seq=args.pos, skip_corrupt=args.skip_corrupt
        )
        b = plan.basis
        print(
            f"would replay entries {plan.first}..{plan.last} into {args.into}"
            + (f" (from the checkpoint at seq {b.base.seq})" if b.base is not None else "")
            + f": {plan.files:,} files, "
            f"{plan.bytes:,} bytes ({plan.window})"
        )
        for n in b.passed_over:
            print(f"passes over: {n}")
        for path, why in b.omit:
            print(f"would skip the checkpoint's file {path}: {why}")
        for k in b.skips:
            print(f"would skip: {k}")
        if b.damage is not None and (plan.last >= b.damage.after or b.damage.after < b.start):
            print(f"would stop at entry {plan.last}: the journal is damaged after it: {b.damage}")
        elif b.missing and plan.last == b.end:
            print(f"would stop at entry {plan.last}: {b.missing}")
        return EXIT_OK
    res = replay(folder, args.into, until_seq=args.pos, until=until, skip_corrupt=args.skip_corrupt)
    print(res.summary(args.into, until))
    return EXIT_DIFF if res.stopped else EXIT_OK


def _cmd_restore(args: argparse.Namespace) -> int:
    from engine import recovery
    from engine.replay import parse_until_time
    from engine.status import read_status

    folder, root, node = _journal_of(args.config, writing=True)
    if node is not None:
        st = read_status(node.node.state_dir) or {}
        if st.get("running") and st.get("role") not in ("active", None):
            raise ConfigError(
                f"restore refused: this node is {st.get('role')} and its agent runs (what it receives would "
                "overwrite the file); restore on the active, where it replicates as a normal change"
            )
    until = parse_until_time(args.at) if args.at else None
    done = recovery.restore(
        folder,
        root,
        args.path,
        until_ns=until.ns if until else None,
        until_seq=args.pos,
        dry_run=args.dry_run,
    )
    moment = until.text if until else f"entry {args.pos}"
    verb = "would restore" if args.dry_run else "restored"
    for r in done:
        assert r.held is not None
        print(
            f"{verb} {r.path} as it was at {moment}: {r.held.size:,} bytes from entry {r.held.seq} "
            f"(xxh3 {r.held.digest.hex()[:16]})"
        )
    return EXIT_OK


def _cmd_init(args: argparse.Namespace) -> int:
    import tomllib

    from engine import identity

    # init must work before peer_id is known, so it reads only what it needs from the file.
    try:
        data = tomllib.loads(config.read_config_text(args.config))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{args.config}: {e}") from None
    done = False
    node = data.get("node")
    if isinstance(node, dict):
        sd = node.get("state_dir")
        if not isinstance(sd, str) or not sd:
            raise ConfigError("node -> state_dir: required")
        state_dir = Path(sd) if Path(sd).is_absolute() else args.config.parent.resolve() / sd
        config.check_state_dir(state_dir, "node -> state_dir")
        ident, created = identity.create(state_dir, str(node.get("name", "node")), force=args.rotate)
        print(f"node ID ({'created' if created else 'existing'}, {state_dir}): {ident.id}")
        return EXIT_OK
    for role in ("sender", "receiver"):
        section = data.get(role)
        if not isinstance(section, dict):
            continue
        sd = section.get("state_dir")
        if not isinstance(sd, str) or not sd:
            raise ConfigError(f"{role} -> state_dir: required")
        state_dir = Path(sd) if Path(sd).is_absolute() else args.config.parent.resolve() / sd
        config.check_state_dir(state_dir, f"{role} -> state_dir")
        ident, created = identity.create(state_dir, str(section.get("node", role)), force=args.rotate)
        verb = "created" if created else "existing"
        print(f"{role} node ID ({verb}, {state_dir}): {ident.id}")
        done = True
    if not done:
        raise ConfigError(f"{args.config}: no [sender] or [receiver] section")
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from engine import winservice

    if hasattr(signal, "SIGIO"):
        signal.signal(signal.SIGIO, signal.SIG_IGN)  # read leases (see _cmd_send)
    # The same session a Windows service runs (engine.winservice): config, [log], the state lock, the agent.
    with winservice.agent_session(
        args.config, command="standby run", level=args.log_level, fmt=args.log_format
    ) as main:
        return _run_async(main)


def _cmd_service(args: argparse.Namespace) -> int:
    from engine import winservice
    from engine.service import winsvc

    if args.action == "install":
        if args.config is None:
            raise ConfigError("service install: --config FILE is required (the node config to run)")
        reg = winservice.plan(args.config, service_name=args.name)
        winservice.install(reg)
        print("\n".join(winsvc.describe(reg)))
        print(f"standby: installed the service {reg.name}; start it with `standby service start`")
    elif args.action == "remove":
        removed = winservice.remove(args.name)
        print(f"standby: {'removed' if removed else 'no such service:'} {args.name}")
    elif args.action == "start":
        print(f"standby: {args.name}: {winservice.start(args.name).describe()}")
    else:
        print(f"standby: {args.name}: {winservice.stop(args.name).describe()}")
    return EXIT_OK


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        value = -1.0
    if not 0 < value <= 7 * 86400:
        raise ConfigError(f"--for: {text!r} is not a duration up to 7 days (e.g. 90s, 30m, 2h)")
    return value


def _agent_command(args: argparse.Namespace, name: str, cmd_args: dict[str, Any]) -> int:
    from engine.node import send_command

    setup = config.load_node(args.config)
    ok, text = send_command(setup.node.state_dir, name, cmd_args)
    print(f"standby: {text}", file=sys.stdout if ok else sys.stderr)
    return EXIT_OK if ok else EXIT_ERROR


def _cmd_failover(args: argparse.Namespace) -> int:
    return _agent_command(args, "failover-force" if args.force else "failover", {})


def _cmd_maintenance(args: argparse.Namespace) -> int:
    if args.action == "end":
        return _agent_command(args, "maintenance-end", {})
    return _agent_command(args, "maintenance-start", {"seconds": _duration(args.duration)})


def _cmd_rejoin(args: argparse.Namespace) -> int:
    from engine.node import send_command
    from engine.switching import follow_rejoin

    setup = config.load_node(args.config)
    ok, text = send_command(setup.node.state_dir, "rejoin", {})
    print(f"standby: {text}", file=sys.stdout if ok else sys.stderr)
    if not ok:
        return EXIT_ERROR
    return follow_rejoin(setup.node.state_dir, args.timeout)


def _cmd_switchover(args: argparse.Namespace) -> int:
    from engine.node import send_command
    from engine.switching import follow

    setup = config.load_node(args.config)
    name = "failback" if args.cmd == "failback" else "switchover"
    cmd_args = {} if name == "failback" else {"to": args.to}
    ok, text = send_command(setup.node.state_dir, name, cmd_args, timeout=60.0)
    print(f"standby: {text}", file=sys.stdout if ok else sys.stderr)
    if not ok:
        return EXIT_ERROR
    if text.endswith("nothing to do"):
        return EXIT_OK
    return follow(setup.node.state_dir, setup.node.name, setup.peer.name, args.timeout)


def _cmd_quarantine(args: argparse.Namespace) -> int:
    from engine import quarantine

    setup = config.load_node(args.config)
    state_dir = setup.node.state_dir
    if args.action == "ack":
        if bool(args.id) == bool(args.all):
            raise ConfigError("quarantine ack: give one folder ID, or --all")
        done = quarantine.acknowledge(state_dir, None if args.all else args.id)
        print(f"standby: acknowledged {len(done)} folder(s)" + (f": {', '.join(done)}" if done else ""))
        return EXIT_OK
    folders = quarantine.list_folders(state_dir)
    if args.json:
        out = [
            {**{k: v for k, v in f.__dict__.items() if k != "path"}, "path": str(f.path)}
            | ({"files_list": quarantine.manifest(f.path)} if args.files else {})
            for f in folders
        ]
        print(json.dumps(out, indent=1))
        return EXIT_OK
    if not folders:
        print("standby: nothing in quarantine")
        return EXIT_OK
    for f in folders:
        state = "acknowledged" if f.acknowledged else "NOT ACKNOWLEDGED"
        print(f"{f.id}  epoch {f.epoch}  {f.files} file(s)  {f.bytes} bytes  {state}  {f.path}")
        if args.files:
            for line in quarantine.manifest(f.path):
                print(
                    f"    {line.get('path')}  {line.get('size')} bytes  {line.get('hash')}  {line.get('why')}"
                )
    return EXIT_OK


def _cmd_upgrade(args: argparse.Namespace) -> int:
    from engine.node import send_command

    setup = config.load_node(args.config)
    wait = setup.upgrade.timeout + setup.upgrade.stable_for * 4 + 600.0
    print(f"standby: upgrade {args.action} ...", flush=True)
    ok, text = send_command(setup.node.state_dir, f"upgrade-{args.action}", {}, timeout=wait)
    print(f"standby: {text}", file=sys.stdout if ok else sys.stderr)
    if args.action == "check":
        return EXIT_OK if ok else EXIT_DIFF
    return EXIT_OK if ok else EXIT_ERROR


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _cmd_run,
    "failover": _cmd_failover,
    "maintenance": _cmd_maintenance,
    "rejoin": _cmd_rejoin,
    "service": _cmd_service,
    "switchover": _cmd_switchover,
    "failback": _cmd_switchover,
    "quarantine": _cmd_quarantine,
    "upgrade": _cmd_upgrade,
    "init": _cmd_init,
    "send": _cmd_send,
    "receive": _cmd_receive,
    "verify": _cmd_verify,
    "status": _cmd_status,
    "demo": _cmd_demo,
    "guard": _cmd_guard,
    "journal": _cmd_journal,
    "restore": _cmd_restore,
    "replay": _cmd_replay,
}


#: glibc's mallopt parameter M_MMAP_THRESHOLD.
_M_MMAP_THRESHOLD = -3
#: Blocks this large and larger get pages of their own, handed back to the system when freed.
MMAP_THRESHOLD = 1 << 20


def tune_allocator() -> bool:
    """On Linux with glibc, fix the size from which a block gets pages of its own at 1 MiB. By default
    glibc raises that size to the largest block freed so far (up to 32 MiB); after the first large
    batches, a replication's multi-megabyte buffers then come from the heap, and the holes they leave
    between long-lived objects are never given back: a sender at 100,000 files stayed at 150-170 MB
    instead of 125-137. Below 1 MiB nothing changes (a smaller fixed size cost 20-30 % more CPU in page
    faults). Not on Windows, whose heap already gives blocks over about 508 KiB allocations of their own;
    nor when the operator set it (``MALLOC_MMAP_THRESHOLD_``, or ``glibc.malloc.mmap_threshold`` in
    ``GLIBC_TUNABLES``). True if it was set."""
    if sys.platform != "linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    if "glibc.malloc.mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        import ctypes  # here: a Python built without ctypes still runs every command

        mallopt = ctypes.CDLL(None).mallopt
    except (ImportError, OSError, AttributeError):  # no ctypes, or a C library without mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    tune_allocator()
    try:
        return COMMANDS[args.cmd](args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        return _report(e)


def _report(e: BaseException) -> int:
    """One clear line for the operator and the exit code; a traceback only for a bug (in the log)."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:  # raised from inside a task group
        e = e.exceptions[0]
    if isinstance(e, ConfigError):
        print(f"standby: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if isinstance(e, StateLocked):  # another process holds the state folder: the invocation cannot work
        print(f"standby: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if isinstance(e, SafetyHalt):
        log.error("send.safety_halt %s", e)
        print(f"standby: safety halt: {e}", file=sys.stderr)
        return EXIT_HALT
    if isinstance(e, PeerRefused):
        print(f"standby: refused by peer: {e}", file=sys.stderr)
        return EXIT_REFUSED
    if isinstance(e, ReplicationError | JournalError):
        print(f"standby: {e}", file=sys.stderr)
        return EXIT_ERROR
    if isinstance(e, ConnectionError | TimeoutError):
        print(f"standby: cannot reach the peer: {e or type(e).__name__}", file=sys.stderr)
        return EXIT_ERROR
    if isinstance(e, OSError):
        where = f": {e.filename}" if e.filename else ""
        print(f"standby: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_ERROR
    if isinstance(e, KeyboardInterrupt):
        return 130
    log.error("cli.internal_error error=%r", e, exc_info=e)
    print(f"standby: internal error: {e!r} (the log has the details)", file=sys.stderr)
    return EXIT_ERROR
