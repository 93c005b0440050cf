"""Prometheus metrics: a node's status, read when Prometheus scrapes, served over HTTP.

``[metrics] listen = "127.0.0.1:9420"`` makes a process serve its status as Prometheus text.
:class:`StatusCollector` turns one status dict (``Agent.status()`` of ``standby run``,
``SenderNode.status()`` of ``standby send``, ``Receiver.status()`` of ``standby receive``) into metric
families at each scrape; :func:`serve` runs prometheus_client's HTTP server on a private registry in a
daemon thread; :func:`status_on_loop` reads a status owned by an asyncio loop from the server's thread.

Rules:

1. Every value comes from the status of the moment: nothing is counted here, so there is no second
   bookkeeping to drift. The counters are the status' own counters (they start at 0 when the process, or
   the agent's sender, starts again; ``rate()`` and ``increase()`` handle that).
2. A field missing from the status (a passive agent has no sender, nobody has a witness yet) makes its
   metric absent, never an error. A status that cannot be read at all (the getter raised, returned
   something that is not a mapping, or the loop did not answer) gives ``standby_up 0`` alone and one log
   line; a scrape never fails.
3. Every metric is named ``standby_*`` and carries a ``node`` label. The names, types, labels and meanings
   are :data:`METRICS` (the README's table); the counters of the sender and the receiver are mapped by
   :func:`counter_name`.

Owns: the metric names and their meaning; the one prometheus_client importer.
Must not: change anything it reads, keep counts of its own, import the node or the CLI (they hand it a
status function), raise during a scrape.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

#: What a collector calls at each scrape: a status dict, or None when there is none (yet).
StatusGetter = Callable[[], Mapping[str, Any] | None]

GAUGE: Final = "gauge"
COUNTER: Final = "counter"

#: The roles of the role machine (``engine.failover.Role``), one-hot in ``standby_role``.
ROLES: Final = ("passive", "promoting", "active", "demoting", "fenced")
#: The service states the agent reports (``engine.failover.ServiceState``), one-hot in
#: ``standby_service_state``.
SERVICE_STATES: Final = ("running", "stopped", "unknown")
#: Why the role machine holds an automatic failover back (``failover.Node.hold``); a reason not listed
#: here is shown too, with value 1.
HOLD_REASONS: Final = ("planned_stop", "maintenance", "flap_window", "conflict")
#: The parts of a sender that report a current error (``SenderStatus``: watch_error, journal_error,
#: link_error), in ``standby_sender_error``.
SENDER_PARTS: Final = ("watch", "journal", "link")

#: Counters with a name of their own instead of ``standby_<part>_<name>_total``:
#: (part, counter) -> (name, meaning).
RENAMED: Final[Mapping[tuple[str, str], tuple[str, str]]] = {
    ("sender", "held"): (
        "standby_guard_holds_total",
        "Versions of guarded files held back as torn (the last good version stays on the replica)",
    ),
    ("sender", "journal_read_errors"): (
        "standby_journal_read_errors_total",
        "Journal reads that failed while streaming (the link reconnects and reads again)",
    ),
    ("sender", "torn_tails_cut"): (
        "standby_torn_tails_cut_total",
        "Torn journal tails cut when the journal was opened (shown once the sender counts them)",
    ),
    ("receiver", "refused_peers"): (
        "standby_refused_peers_total",
        "Connections the receiver refused: an unknown identity, no valid handshake, another sender "
        "already connected, a sender while this node is not passive, a lower epoch",
    ),
}

#: Every metric but the mapped counters: name -> (type, labels besides ``node``, meaning).
METRICS: Final[Mapping[str, tuple[str, tuple[str, ...], str]]] = {
    "standby_up": (GAUGE, (), "1 when the process gave its status at this scrape; 0 when it could not "
                   "(then no other standby_ metric is shown)"),
    "standby_role": (GAUGE, ("role",), "1 for the role the role machine is in, 0 for the other roles "
                     "(all 0 while the agent starts); standby run only"),
    "standby_is_active": (GAUGE, (), "1 when this node is active (may run the service); standby run only"),
    "standby_epoch": (GAUGE, (), "The epoch this node holds (run), streams at (send) or follows (receive)"),
    "standby_journal_head_seq": (GAUGE, (), "Last journaled entry (sequence number) of the sender"),
    "standby_journal_sent_seq": (GAUGE, (), "Last journal entry sent to the receiver"),
    "standby_journal_acked_seq": (GAUGE, (), "Last journal entry the receiver acknowledged (durable there)"),
    "standby_replica_applied_seq": (GAUGE, (), "Last entry applied to the replica here (receiver)"),
    "standby_lag_entries": (GAUGE, (), "Journal entries the receiver has not acknowledged yet"),
    "standby_lag_seconds": (GAUGE, (), "Seconds since the receiver last held everything journaled "
                            "(how long entries have waited to be acknowledged); 0 when caught up"),
    "standby_pending_paths": (GAUGE, (), "Changed paths the sender has seen and not journaled yet"),
    "standby_sender_connected": (GAUGE, (), "1 when the sender's link to the receiver is up"),
    "standby_receiver_connected": (GAUGE, (), "1 when a sender is streaming into this receiver"),
    "standby_receiver_last_apply_timestamp_seconds": (GAUGE, (), "When the receiver last applied a group "
                                                      "(Unix time; 0: not since it started)"),
    "standby_peer_connected": (GAUGE, (), "run: the peer's agent is heard (heartbeats); send/receive: the "
                               "replication link is up"),
    "standby_peer_last_seen_seconds": (GAUGE, (), "Seconds since the last heartbeat of the peer's agent"),
    "standby_service_running": (GAUGE, (), "1 when the local service is seen running"),
    "standby_service_state": (GAUGE, ("state",), "1 for the state the local service is seen in "
                              "(running, stopped, unknown), 0 for the others"),
    "standby_service_state_seconds": (GAUGE, (), "Seconds the local service has been in that state"),
    "standby_maintenance": (GAUGE, (), "1 while a maintenance window is open on this node"),
    "standby_last_failover_timestamp_seconds": (GAUGE, (), "When this agent last became active by a "
                                                "failover (Unix time); absent if it has not since it "
                                                "started (or 20 alerts came since)"),
    "standby_role_changed_timestamp_seconds": (GAUGE, (), "When the durable role last changed (Unix "
                                               "time; kept across restarts)"),
    "standby_failover_held": (GAUGE, ("reason",), "1 for the reason an automatic failover is held back "
                              "(planned_stop, maintenance, flap_window, conflict), 0 for the others"),
    "standby_halted": (GAUGE, ("reason",), "1 (reason: the halt) while the sender refuses to replicate "
                       "(a safety halt); 0 with reason=\"\" otherwise"),
    "standby_sender_error": (GAUGE, ("part",), "1 while a part of the sender (watch, journal, link) "
                             "reports an error, 0 otherwise"),
    "standby_quarantined_files": (GAUGE, (), "Files set aside by rejoins and not acknowledged yet"),
    "standby_clock_skew_seconds": (GAUGE, (), "The peer's clock minus this one's (median estimate); "
                                   "absent until measured"),
    "standby_clock_problems": (GAUGE, (), "Clock problems found (skew above max_clock_skew, another "
                               "time zone); 0 when all is well"),
    "standby_switchover_in_progress": (GAUGE, (), "1 while this node is handing the service over "
                                       "(switchover or failback)"),
    "standby_witness_reachable": (GAUGE, (), "1 when the witness answers"),
    "standby_witness_holder": (GAUGE, ("holder",), "1, labelled with the node the witness says holds "
                               "the lease"),
    "standby_witness_lease_left_seconds": (GAUGE, (), "Seconds left on the witness lease"),
    "standby_witness_failsafe": (GAUGE, (), "1 while the active runs without the witness's lease, on its "
                                 "peer's confirmation"),
    "standby_witness_suspended": (GAUGE, (), "1 while the active's service is stopped for want of the "
                                  "witness's lease"),
}  # fmt: skip

_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def counter_name(part: str, counter: str) -> str | None:
    """The metric of counter ``counter`` of ``part`` (``sender`` or ``receiver``): a name of its own
    (:data:`RENAMED`) or ``standby_<part>_<counter>_total``; None if the counter's name is no metric name."""
    if (part, counter) in RENAMED:
        return RENAMED[part, counter][0]
    name = f"standby_{part}_{counter}_total"
    return name if _NAME.fullmatch(name) else None


# ---- reading a status that may lack anything ---------------------------------------------------------------


def _map(m: Mapping[str, Any] | None, key: str) -> Mapping[str, Any] | None:
    v = m.get(key) if m is not None else None
    return v if isinstance(v, Mapping) else None


def _num(m: Mapping[str, Any] | None, key: str) -> float | None:
    v = m.get(key) if m is not None else None
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _flag(m: Mapping[str, Any] | None, key: str) -> float | None:
    v = m.get(key) if m is not None else None
    return float(v) if isinstance(v, bool) else None


def _text(m: Mapping[str, Any] | None, key: str) -> str | None:
    v = m.get(key) if m is not None else None
    return v if isinstance(v, str) else None


class _Families:
    """The families of one scrape, in the order they are first added."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.out: dict[str, Metric] = {}

    def add(self, name: str, value: float | None, labels: Sequence[str] = (), help_: str = "") -> None:
        """One sample of ``name``; nothing when ``value`` is None (the field was missing)."""
        if value is None:
            return
        if name in METRICS:
            kind, label_names, help_ = METRICS[name]
        else:
            kind, label_names = COUNTER, ()
        fam = self.out.get(name)
        if fam is None:
            names = ["node", *label_names]
            if kind == COUNTER:
                fam = CounterMetricFamily(name, help_, labels=names)
            else:
                fam = GaugeMetricFamily(name, help_, labels=names)
            self.out[name] = fam
        if kind == COUNTER:
            assert isinstance(fam, CounterMetricFamily)
            fam.add_metric([self.node, *labels], value)
        else:
            assert isinstance(fam, GaugeMetricFamily)
            fam.add_metric([self.node, *labels], value)

    def one_hot(self, name: str, choices: Sequence[str], current: str | None) -> None:
        """``name{label=c}`` for every choice, 1 for ``current``; a ``current`` not among the choices is
        shown too (with 1): a new value is seen rather than hidden."""
        for c in choices:
            self.add(name, 1.0 if c == current else 0.0, [c])
        if current is not None and current not in choices:
            self.add(name, 1.0, [current])

    def counters(self, part: str, status: Mapping[str, Any] | None) -> None:
        counters = _map(status, "counters")
        for key in sorted(k for k in counters or () if isinstance(k, str)):
            v, name = _num(counters, key), counter_name(part, key)
            if v is None or name is None or v < 0:
                continue
            if name.removesuffix("_total") in self.out or name in self.out:
                log.debug("metrics.counter_skipped name=%s (the name is taken)", name)
                continue
            what = RENAMED.get((part, key), ("", f"The {part}'s counter {key!r}"))[1]
            self.add(name, v, help_=f"{what} (counted since the {part} started)")


def families(status: Mapping[str, Any], node: str) -> list[Metric]:
    """The metric families of one status (of ``standby run``, ``send`` or ``receive``), ``standby_up`` 1
    first. Missing or mistyped fields make their metrics absent."""
    f = _Families(node)
    f.add("standby_up", 1.0)
    role = _text(status, "role")
    if role == "sender":
        _sender(f, status)
        f.add("standby_epoch", _num(status, "epoch"))
        f.add("standby_peer_connected", _flag(status, "connected"))
    elif role == "receiver":
        _receiver(f, status)
        f.add("standby_epoch", _num(status, "epoch"))
        f.add("standby_peer_connected", _flag(status, "connected"))
    else:
        _agent(f, status, role)
    return list(f.out.values())


def _agent(f: _Families, status: Mapping[str, Any], role: str | None) -> None:
    if role is not None:
        f.one_hot("standby_role", ROLES, None if role == "starting" else role)
        f.add("standby_is_active", float(role == "active"))
    f.add("standby_epoch", _num(status, "epoch"))
    _sender(f, _map(status, "sender"))
    _receiver(f, _map(status, "receiver"))
    peer = _map(status, "peer")
    f.add("standby_peer_connected", _flag(peer, "reachable"))
    f.add("standby_peer_last_seen_seconds", _num(peer, "silent_for"))
    service = _text(status, "service")
    if service is not None:
        f.add("standby_service_running", float(service == "running"))
        f.one_hot("standby_service_state", SERVICE_STATES, service)
    f.add("standby_service_state_seconds", _num(status, "service_for"))
    f.add("standby_maintenance", _flag(status, "maintenance"))
    f.add("standby_last_failover_timestamp_seconds", _num(_map(status, "last_failover"), "at"))
    f.add("standby_role_changed_timestamp_seconds", _num(_map(status, "last_role_change"), "role_changed_at"))
    if "failover_held" in status:
        held = _text(status, "failover_held") or None
        f.one_hot("standby_failover_held", HOLD_REASONS, held)
    f.add("standby_quarantined_files", _num(status, "quarantined"))
    clock = _map(status, "clock")
    f.add("standby_clock_skew_seconds", _num(clock, "skew"))
    problems = clock.get("problems") if clock is not None else None
    if isinstance(problems, list):
        f.add("standby_clock_problems", float(len(problems)))
    if "switchover" in status:
        f.add("standby_switchover_in_progress", float(bool(status["switchover"])))
    witness = _map(status, "witness")
    if witness is not None:
        f.add("standby_witness_reachable", _flag(witness, "reachable"))
        holder = _text(witness, "holder")
        if holder:
            f.add("standby_witness_holder", 1.0, [holder])
        f.add("standby_witness_lease_left_seconds", _num(witness, "lease_left"))
        f.add("standby_witness_failsafe", _flag(witness, "failsafe"))
        f.add("standby_witness_suspended", _flag(witness, "suspended"))


def _sender(f: _Families, s: Mapping[str, Any] | None) -> None:
    """A ``SenderStatus`` dict (``SenderNode.status()``): the agent's while active, or ``standby send``'s."""
    if s is None:
        return
    f.add("standby_journal_head_seq", _num(s, "head"))
    f.add("standby_journal_sent_seq", _num(s, "sent_seq"))
    f.add("standby_journal_acked_seq", _num(s, "acked_seq"))
    f.add("standby_lag_entries", _num(s, "lag_records"))
    f.add("standby_lag_seconds", _num(s, "lag_seconds"))
    f.add("standby_pending_paths", _num(s, "pending_paths"))
    f.add("standby_sender_connected", _flag(s, "connected"))
    if "halt" in s:
        halt = _text(s, "halt") or ""
        f.add("standby_halted", float(bool(halt)), [halt])
    for part in SENDER_PARTS:
        if f"{part}_error" in s:
            f.add("standby_sender_error", float(bool(s[f"{part}_error"])), [part])
    f.counters("sender", s)


def _receiver(f: _Families, r: Mapping[str, Any] | None) -> None:
    """A ``Receiver.status()`` dict: the agent's (always listening), or ``standby receive``'s."""
    if r is None:
        return
    f.add("standby_replica_applied_seq", _num(r, "applied_seq"))
    f.add("standby_receiver_connected", _flag(r, "connected"))
    f.add("standby_receiver_last_apply_timestamp_seconds", _num(r, "last_apply"))
    f.counters("receiver", r)


# ---- the collector ----------------------------------------------------------------------------------------


class StatusCollector:
    """A prometheus_client collector that reads the status at each scrape.

    RACE: ``collect`` runs on the HTTP server's request threads, several at once if scrapes overlap.
    ``get_status`` must be safe to call there: wrap a status owned by an asyncio loop in
    :func:`status_on_loop`.
    """

    def __init__(self, get_status: StatusGetter, node: str) -> None:
        self.get_status = get_status
        self.node = node
        self._said = ""  # the last problem logged at warning level (the same one again is debug)

    def describe(self) -> list[Metric]:
        """Nothing: the families depend on the status, and describing must not read it (a registry asks at
        ``register``)."""
        return []

    def collect(self) -> Iterator[Metric]:
        out: list[Metric] = []
        try:
            status = self.get_status()
            if status is None:
                problem = "no status yet"
            elif not isinstance(status, Mapping):
                problem = f"the status is a {type(status).__name__}, not a mapping"
            else:
                out = families(status, self.node)
                problem = ""
        except Exception as e:  # a scrape never fails (rule 2)
            problem = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if not problem:
            self._said = ""
            yield from out
            return
        level = logging.DEBUG if problem == self._said else logging.WARNING
        self._said = problem
        log.log(level, "metrics.no_status node=%s reason=%s (standby_up 0)", self.node, problem)
        down = GaugeMetricFamily("standby_up", METRICS["standby_up"][2], labels=["node"])
        down.add_metric([self.node], 0.0)
        yield down


def status_on_loop(
    loop: asyncio.AbstractEventLoop, status: Callable[[], Mapping[str, Any]], timeout: float = 2.0
) -> StatusGetter:
    """A getter for :class:`StatusCollector` that calls ``status`` on ``loop``'s thread and waits up to
    ``timeout`` seconds for it, so the status is read at one consistent instant of the loop. A loop that
    does not answer in time (blocked, or closed) raises, and the scrape shows ``standby_up 0``."""

    def get() -> Mapping[str, Any] | None:
        fut: concurrent.futures.Future[Mapping[str, Any]] = concurrent.futures.Future()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return  # the scrape gave up waiting
            try:
                fut.set_result(status())
            except Exception as e:
                fut.set_exception(e)

        loop.call_soon_threadsafe(run)  # RuntimeError once the loop is closed
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise TimeoutError(f"the event loop did not give the status within {timeout:g} s") from None

    return get


# ---- the HTTP server --------------------------------------------------------------------------------------


class MetricsServer:
    """A running metrics endpoint (any path answers). ``address`` is where it listens: the port the system
    chose when 0 was asked."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        host, port = server.server_address[:2]
        self.address: tuple[str, int] = (str(host), int(port))
        self._closed = False

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving, close the socket and join the thread (idempotent). Takes up to half a second: the
        server polls for shutdown twice a second."""
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout)
        log.info("metrics.stopped address=%s:%d", *self.address)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(
    listen: tuple[str, int], collector: StatusCollector, *, process_metrics: bool = True
) -> MetricsServer:
    """Serve ``collector`` as Prometheus text on ``listen`` (host, port; port 0: any free one) from a
    daemon thread. The registry is private: only this collector, and with ``process_metrics`` the standard
    ``process_*`` metrics of this process (memory, CPU, open files, start time; Linux only, nothing
    elsewhere), no Python GC or platform metrics. Raises OSError when the address cannot be bound."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if process_metrics:
        ProcessCollector(registry=registry)
    host, port = listen
    # prometheus_client >= 0.20 returns (server, thread); the server is built and bound before it returns.
    server, thread = start_http_server(port, addr=host, registry=registry)
    thread.name = f"metrics-{server.server_address[1]}"
    out = MetricsServer(server, thread)
    log.info("metrics.listening address=%s:%d node=%s", *out.address, collector.node)
    return out
