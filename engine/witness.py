"""The witness: a leader key bound to a lease in etcd, the third vote of a two-server pair.

Owns: the one connection to etcd (the only importer of ``aetcd`` and ``grpc``), the lease we hold and the
key ``<prefix>/leader``. It answers four questions, each as a :class:`LeaderView` value: who holds the key
(:meth:`Witness.look`), can I take it (:meth:`Witness.acquire`), do I still hold it (:meth:`Witness.renew`)
and let it go (:meth:`Witness.release`). Its config and the pure checks of it (timing, endpoints) are in
:mod:`engine.config`; the epoch rule is :func:`engine.failover.epoch_from_revision`.

Must not: decide roles, run timers or loops (the role machine asks, ``node`` schedules), or let a network
failure escape as an exception: etcd being unreachable is a result (``reachable=False`` with the error
text), never a promotion and never a crash. Only programming errors (calling before :meth:`Witness.connect`,
an empty node name, a bad config) raise.

The rules, after Patroni's etcd3 DCS:

- Leadership is the key ``<prefix>/leader`` = node name, bound to a lease of ``ttl`` seconds and created in
  ONE transaction that succeeds only if the key's create revision is 0 (absent). The key's create revision
  is the fencing token (:func:`engine.failover.epoch_from_revision`).
- INVARIANT: the key is ours only while it is bound to *our* lease (the lease id we were granted) and holds
  our name. A key with our name on another lease (an earlier run of ours) is not ours: we cannot know it is
  current, and it will expire.
- Timing (checked by :func:`check_timing`): ``check_interval + 2 * retry_timeout <= ttl``, so a holder that
  renews every check and whose renewals may each take a full retry timeout still renews before its lease
  ends; ``safety_margin < ttl``: the holder stops its service after ``ttl - safety_margin`` without a
  renewal, before the lease can expire at etcd.
- Every call is bounded by ``retry_timeout`` as a whole. It tries the member that answered last, then the
  others in the configured order, each try getting an equal share of the time left, and goes round again
  until the time is spent. A stopped member refuses at once and the next one is asked, so a 3-member
  cluster with one member down keeps working; a member without quorum hangs until its share runs out.
- RACE: a write that timed out may still have been applied. ``acquire`` keeps the granted lease after an
  unreachable result, so the next ``acquire`` or ``renew`` finds the key bound to it and reports it as ours
  (or revokes it); a lease we could not revoke ends by itself after ``ttl``.

Why aetcd's generated stubs and not its ``Client``: aetcd 1.0.0 is asyncio-native and its protobuf code
works with Debian's etcd 3.4.23 and protobuf 7 (``etcd3`` does not import under protobuf > 3.20), so its
``aetcd.rpc`` module (the etcd v3 gRPC stubs and messages) is what we use. Its ``Client`` is too thin to
fit: it always opens a plain-text channel (no TLS, which ``https://`` endpoints need), takes a single
endpoint, and has one whole-second timeout per client, not per call. So this module opens the gRPC
channels itself (``grpc.aio``, TLS with a CA and client certificate when the endpoint is ``https``) and
calls the stubs with a deadline per try. grpcio has wheels for Windows and Linux.

etcd facts that shape it: lease TTLs are whole seconds (``lease_left`` is too, rounded down by etcd);
etcd raises a TTL below its minimum (1.5 x election timeout, 2 s by default) without saying so; after a
raft leader change etcd 3.4 restarts every lease's TTL, so a lease can outlive ``ttl`` (never end sooner).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc  # type: ignore[import-untyped]
from aetcd import rpc  # type: ignore[import-untyped]

from engine.config import WitnessConfig, check_config

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The shortest try worth making on one member (unless less time than this is left).
MIN_TRY = 0.5
#: Pause between two rounds over the members, when every one of them failed.
ROUND_PAUSE = 0.2
#: gRPC status codes after which another member may answer: the member is down, partitioned, has no
#: leader or quorum, or the connection broke. Any other code (permission, bad argument...) ends the call.
TRY_NEXT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
#: Channel options: reconnect quickly to a member that comes back.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


@dataclass(frozen=True)
class LeaderView:
    """What one witness call saw. ``reachable`` False: etcd (or its quorum) did not answer in time; the
    other fields are then unknown (None/False) and ``error`` says why. ``mine``: the key is bound to our
    lease and holds our name. ``lease_left``: seconds until the holder's lease ends, as etcd counts them."""

    reachable: bool
    holder: str | None = None
    create_revision: int | None = None
    lease_id: int | None = None
    lease_left: float | None = None
    mine: bool = False
    error: str | None = None


# -- the client ---------------------------------------------------------------------------------------------


class _TryNext(Exception):
    """This member gave no usable answer; another one may."""


class _Unreachable(Exception):
    """No member answered within the call's time; the text says what each one said last."""


class Witness:
    """One node's view of the witness: its channels to the etcd members and the lease it holds.

    Calls are serialised (one at a time); each returns within ``retry_timeout`` (plus a little for
    closing a broken channel). ``close`` drops the connections only: call ``release`` first to hand the
    key over at once, otherwise it ends with the lease."""

    def __init__(self, cfg: WitnessConfig) -> None:
        self.cfg = cfg
        self.endpoints = check_config(cfg)
        self._key = cfg.leader_key.encode("utf-8")
        self._channels: dict[int, Any] = {}
        self._credentials: Any = None
        self._open = False
        self._current = 0  # the member that answered last: asked first next time
        self._lock = asyncio.Lock()
        self._lease: int | None = None  # INVARIANT: the lease we were granted and have not given up
        self._node: str | None = None  # the name we acquired with

    # -- life ------------------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Get ready to talk (reads the TLS files). gRPC connects lazily: reachability shows in the views."""
        if self._open:
            return
        if any(e.startswith("https://") for e in self.endpoints):
            self._credentials = _credentials(self.cfg)
        self._open = True

    async def close(self) -> None:
        """Close every channel. The lease is not revoked (see the class doc); safe to call twice."""
        self._open = False
        for i in list(self._channels):
            await self._drop(i)

    async def __aenter__(self) -> Witness:
        await self.connect()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def lease_id(self) -> int | None:
        """The lease we hold (or may hold, after an unanswered acquire), if any."""
        return self._lease

    # -- the four calls ----------------------------------------------------------------------------------

    async def look(self, node: str) -> LeaderView:
        """Who holds the leader key, the lease time it has left, and whether it is ``node`` on our lease."""
        _check_node(node)
        async with self._lock:
            return await self._bounded("look", lambda deadline: self._look(node, deadline))

    async def acquire(self, node: str) -> LeaderView:
        """Take the leader key for ``node`` if it is absent: grant a lease of ``ttl``, then one transaction
        that creates the key on it only if its create revision is 0. The view's ``create_revision`` is the
        fencing token. Lost: the lease is revoked and the view names the holder."""
        _check_node(node)
        async with self._lock:
            return await self._bounded("acquire", lambda deadline: self._acquire(node, deadline))

    async def renew(self) -> LeaderView:
        """Keep our lease alive once and check the key is still ours. A lease that ended, or a key now gone
        or someone else's, gives ``mine=False`` and we forget our lease."""
        async with self._lock:
            return await self._bounded("renew", self._renew)

    async def release(self) -> LeaderView:
        """Delete the leader key if it is still ours (a transaction on our name and lease), then revoke
        our lease. The view shows the key after that (normally absent)."""
        async with self._lock:
            return await self._bounded("release", self._release)

    # -- the calls' bodies -----------------------------------------------------------------------------

    async def _look(self, node: str, deadline: float) -> LeaderView:
        kv = await self._range(deadline)
        return await self._view(node, kv, deadline)

    async def _acquire(self, node: str, deadline: float) -> LeaderView:
        if self._lease is not None:
            # Held, or an earlier acquire went unanswered and may have succeeded (see RACE above).
            kv = await self._range(deadline)
            if self._ours(kv, node):
                self._node = node
                return await self._view(node, kv, deadline)
            await self._revoke_quietly(self._lease, deadline)
            self._lease = self._node = None
        grant = await self._rpc(
            deadline,
            lambda ch, t: rpc.LeaseStub(ch).LeaseGrant(rpc.LeaseGrantRequest(TTL=self.cfg.ttl), timeout=t),
        )
        if grant.error:
            raise _Unreachable(f"lease grant refused: {grant.error}")
        lease = int(grant.ID)
        self._lease, self._node = lease, node  # tentative until the transaction answers
        absent = rpc.Compare(
            key=self._key, target=rpc.Compare.CREATE, result=rpc.Compare.EQUAL, create_revision=0
        )
        put = rpc.RequestOp(
            request_put=rpc.PutRequest(key=self._key, value=node.encode("utf-8"), lease=lease)
        )
        get = rpc.RequestOp(request_range=rpc.RangeRequest(key=self._key))
        request = rpc.TxnRequest(compare=[absent], success=[put, get], failure=[get])
        txn = await self._rpc(deadline, lambda ch, t: rpc.KVStub(ch).Txn(request, timeout=t))
        kvs = txn.responses[-1].response_range.kvs
        kv = kvs[0] if kvs else None
        # Ours if created now, or by an earlier try that timed out after etcd had applied it.
        if kv is not None and self._ours(kv, node):
            log.info(
                "witness.acquired key=%s node=%s create_revision=%d lease=%x",
                self.cfg.leader_key, node, kv.create_revision, lease,
            )  # fmt: skip
            return _view_of(kv, node, lease, float(grant.TTL))
        await self._revoke_quietly(lease, deadline)
        self._lease = self._node = None
        return await self._view(node, kv, deadline)

    async def _renew(self, deadline: float) -> LeaderView:
        lease, node = self._lease, self._node
        if lease is None or node is None:
            kv = await self._range(deadline)
            return await self._view(node or "", kv, deadline)
        ttl = await self._rpc(deadline, lambda ch, t: _keepalive(ch, lease, t))
        kv = await self._range(deadline)
        if ttl > 0 and self._ours(kv, node):
            return _view_of(kv, node, lease, float(ttl))
        if ttl > 0:  # the lease lives but the key went (deleted, or someone else's): give it up
            await self._revoke_quietly(lease, deadline)
        log.warning(
            "witness.lost key=%s node=%s lease=%x lease_ended=%s holder=%s",
            self.cfg.leader_key, node, lease, ttl <= 0, None if kv is None else _holder(kv),
        )  # fmt: skip
        self._lease = self._node = None
        return await self._view(node, kv, deadline)

    async def _release(self, deadline: float) -> LeaderView:
        lease, node = self._lease, self._node
        if lease is None or node is None:
            kv = await self._range(deadline)
            return await self._view(node or "", kv, deadline)
        same_name = rpc.Compare(
            key=self._key, target=rpc.Compare.VALUE, result=rpc.Compare.EQUAL, value=node.encode("utf-8")
        )
        same_lease = rpc.Compare(
            key=self._key, target=rpc.Compare.LEASE, result=rpc.Compare.EQUAL, lease=lease
        )
        delete = rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=self._key))
        get = rpc.RequestOp(request_range=rpc.RangeRequest(key=self._key))
        request = rpc.TxnRequest(compare=[same_name, same_lease], success=[delete], failure=[get])
        txn = await self._rpc(deadline, lambda ch, t: rpc.KVStub(ch).Txn(request, timeout=t))
        await self._rpc(deadline, lambda ch, t: _revoke(ch, lease, t))
        self._lease = self._node = None
        kv = None
        if not txn.succeeded:
            kvs = txn.responses[-1].response_range.kvs
            kv = kvs[0] if kvs else None
        log.info(
            "witness.released key=%s node=%s lease=%x deleted=%s",
            self.cfg.leader_key,
            node,
            lease,
            txn.succeeded,
        )
        return await self._view(node, kv, deadline)

    # -- helpers -----------------------------------------------------------------------------------------

    def _ours(self, kv: Any, node: str) -> bool:
        return (
            kv is not None
            and self._lease is not None
            and int(kv.lease) == self._lease
            and _holder(kv) == node
        )

    async def _range(self, deadline: float) -> Any:
        """The leader key's KeyValue, or None when absent (a linearizable read: it needs the quorum)."""
        resp = await self._rpc(
            deadline, lambda ch, t: rpc.KVStub(ch).Range(rpc.RangeRequest(key=self._key), timeout=t)
        )
        return resp.kvs[0] if resp.kvs else None

    async def _view(self, node: str, kv: Any, deadline: float) -> LeaderView:
        """The view of ``kv``, with its lease's time left asked of etcd."""
        if kv is None:
            return LeaderView(reachable=True)
        left: float | None = None
        if kv.lease:
            lease = int(kv.lease)
            resp = await self._rpc(
                deadline,
                lambda ch, t: rpc.LeaseStub(ch).LeaseTimeToLive(
                    rpc.LeaseTimeToLiveRequest(ID=lease), timeout=t
                ),
            )
            left = float(max(int(resp.TTL), 0))  # -1: ended between the two reads
        return _view_of(kv, node, self._lease, left)

    async def _revoke_quietly(self, lease: int, deadline: float) -> None:
        """Revoke a lease we no longer want; if etcd does not answer, it ends by itself after ``ttl``."""
        try:
            await self._rpc(deadline, lambda ch, t: _revoke(ch, lease, t))
        except _Unreachable as e:
            log.info("witness.revoke_failed lease=%x error=%s (it ends by itself)", lease, e)

    async def _bounded(self, op: str, body: Callable[[float], Awaitable[LeaderView]]) -> LeaderView:
        """Run one call within ``retry_timeout``; unreachable etcd becomes a view, never an exception."""
        if not self._open:
            raise RuntimeError("Witness.connect() was not called (or close() was)")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.retry_timeout
        try:
            # The tries' own deadlines keep within the budget; this is the backstop if one does not.
            async with asyncio.timeout_at(deadline + MIN_TRY):
                return await body(deadline)
        except _Unreachable as e:
            error = str(e)
        except TimeoutError:
            error = f"no answer within retry_timeout ({self.cfg.retry_timeout:g} s)"
        log.warning("witness.unreachable op=%s key=%s error=%s", op, self.cfg.leader_key, error)
        return LeaderView(reachable=False, error=error)

    async def _rpc(self, deadline: float, call: Callable[[Any, float], Awaitable[T]]) -> T:
        """``call(channel, timeout)`` on the member that answered last, then the others in order, in
        rounds until ``deadline``; each try gets an equal share of the time left in its round."""
        loop = asyncio.get_running_loop()
        n = len(self.endpoints)
        errors: dict[str, str] = {}
        while True:
            start = self._current
            for k in range(n):
                i = (start + k) % n
                left = deadline - loop.time()
                if left <= 0:
                    raise _Unreachable(_summary(errors) or "no time left")
                timeout = max(left / (n - k), min(left, MIN_TRY))
                try:
                    result = await call(self._channel(i), timeout)
                except grpc.aio.AioRpcError as e:
                    code = e.code()
                    errors[self.endpoints[i]] = f"{code.name}: {e.details()}"
                    await self._drop(i)  # a fresh channel next time: no reconnect backoff to wait out
                    if code not in TRY_NEXT:
                        raise _Unreachable(_summary(errors)) from None
                    continue
                except _TryNext as e:
                    errors[self.endpoints[i]] = str(e)
                    await self._drop(i)
                    continue
                self._current = i
                return result
            left = deadline - loop.time()
            if left <= 0:
                raise _Unreachable(_summary(errors))
            await asyncio.sleep(min(ROUND_PAUSE, left))

    def _channel(self, i: int) -> Any:
        ch = self._channels.get(i)
        if ch is None:
            endpoint = self.endpoints[i]
            target = endpoint.split("://", 1)[1]
            if endpoint.startswith("https://"):
                ch = grpc.aio.secure_channel(target, self._credentials, options=CHANNEL_OPTIONS)
            else:
                ch = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
            self._channels[i] = ch
        return ch

    async def _drop(self, i: int) -> None:
        ch = self._channels.pop(i, None)
        if ch is not None:
            await ch.close()


def _credentials(cfg: WitnessConfig) -> Any:
    """TLS credentials from the CA, certificate and key files (a few kB, read once at connect)."""
    pem: dict[str, bytes | None] = {}
    for name in ("ca", "cert", "key"):
        path = getattr(cfg, name)
        try:
            pem[name] = None if path is None else Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"witness -> {name}: cannot read {path}: {e}") from None
    return grpc.ssl_channel_credentials(
        root_certificates=pem["ca"], private_key=pem["key"], certificate_chain=pem["cert"]
    )


def _check_node(node: str) -> None:
    if not isinstance(node, str) or not node or "\0" in node:
        raise ValueError(f"node: expected a non-empty name, got {node!r}")


def _holder(kv: Any) -> str:
    return bytes(kv.value).decode("utf-8", "replace")


def _view_of(kv: Any, node: str, our_lease: int | None, left: float | None) -> LeaderView:
    holder = _holder(kv)
    lease = int(kv.lease) or None
    return LeaderView(
        reachable=True,
        holder=holder,
        create_revision=int(kv.create_revision),
        lease_id=lease,
        lease_left=left,
        mine=our_lease is not None and lease == our_lease and holder == node,
    )


def _summary(errors: dict[str, str]) -> str:
    return "; ".join(f"{endpoint}: {text}" for endpoint, text in errors.items())


async def _keepalive(channel: Any, lease: int, timeout: float) -> int:
    """One keep-alive of ``lease``; the TTL etcd now gives it (0: the lease had already ended)."""
    call = rpc.LeaseStub(channel).LeaseKeepAlive(iter([rpc.LeaseKeepAliveRequest(ID=lease)]), timeout=timeout)
    try:
        resp = await call.read()
    finally:
        call.cancel()
    if resp is grpc.aio.EOF:
        raise _TryNext("keep-alive stream closed without an answer")
    return int(resp.TTL)


async def _revoke(channel: Any, lease: int, timeout: float) -> None:
    """Revoke ``lease`` (its keys go with it); a lease etcd no longer knows is revoked already."""
    try:
        await rpc.LeaseStub(channel).LeaseRevoke(rpc.LeaseRevokeRequest(ID=lease), timeout=timeout)
    except grpc.aio.AioRpcError as e:
        if e.code() != grpc.StatusCode.NOT_FOUND:
            raise
