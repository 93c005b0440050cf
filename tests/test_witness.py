"""The witness against a real etcd (1 and 3 members on 127.0.0.1, tests/etcd.py), plus its pure rules.

Small leases (2-4 s) keep the file short; every timing assertion leaves room for a loaded CI machine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from engine.config import WitnessConfig, check_config, check_endpoints, check_timing
from engine.failover import epoch_from_revision
from engine.witness import LeaderView, Witness
from tests.etcd import EtcdCluster, free_ports, make_tls, running_etcd

#: Slack for a call that must give up within retry_timeout (scheduling on a busy 2-core machine).
SLACK = 0.75


def config(endpoints: list[str], prefix: str, ttl: int = 2, retry_timeout: float = 0.75) -> WitnessConfig:
    """A valid config for short tests: check_interval + 2 * retry_timeout == ttl."""
    return WitnessConfig(
        endpoints=tuple(endpoints),
        prefix=prefix,
        ttl=ttl,
        safety_margin=ttl / 2,
        check_interval=ttl - 2 * retry_timeout,
        retry_timeout=retry_timeout,
    )


async def timed(call: Callable[[], Awaitable[LeaderView]]) -> tuple[LeaderView, float]:
    t0 = time.monotonic()
    view = await call()
    return view, time.monotonic() - t0


@pytest.fixture(scope="module")
def etcd1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with running_etcd(tmp_path_factory.mktemp("etcd1"), 1) as cluster:
        print(f"\netcd 1 member healthy after {cluster.startup_seconds[0]:.2f} s")
        yield cluster


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    return f"/standby/{request.node.name}"


# -- pure rules -----------------------------------------------------------------------------------------


def test_check_endpoints_normalises_good_ones() -> None:
    got = check_endpoints(
        ["HTTPS://Etcd.Example:2379/", "http://127.0.0.1:2379", "http://[::1]:2380", "http://localhost:1"]
    )
    assert got == [
        "https://etcd.example:2379",
        "http://127.0.0.1:2379",
        "http://[::1]:2380",
        "http://localhost:1",
    ]


@pytest.mark.parametrize(
    "bad",
    [
        "http://10.0.0.13:2379",  # clear text off loopback
        "http://etcd.example:2379",
        "ftp://127.0.0.1:2379",
        "https://etcd.example",  # no port
        "https://etcd.example:99999",
        "https://etcd.example:2379/v3",
        "https://user@etcd.example:2379",
        "127.0.0.1:2379",
    ],
)
def test_check_endpoints_names_the_bad_one(bad: str) -> None:
    with pytest.raises(ValueError, match="witness -> endpoints") as e:
        check_endpoints(["https://ok.example:2379", bad])
    assert repr(bad) in str(e.value)


def test_check_endpoints_refuses_empty_and_duplicates() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        check_endpoints([])
    with pytest.raises(ValueError, match="listed twice"):
        check_endpoints(["https://a.example:2379", "https://A.example:2379/"])


def test_check_timing_is_patronis_rule() -> None:
    check_timing(WitnessConfig(endpoints=("https://a.example:2379",), prefix="/p"))  # the defaults pass
    base = config(["http://127.0.0.1:1"], "/p", ttl=30, retry_timeout=10)
    check_timing(base)
    for bad, keys in (
        (dict(check_interval=10.0, retry_timeout=10.5), ("check_interval", "retry_timeout", "ttl")),
        (dict(safety_margin=30.0), ("safety_margin", "ttl")),
        (dict(ttl=1), ("ttl",)),
        (dict(ttl=2.5), ("ttl",)),
        (dict(retry_timeout=0.0), ("retry_timeout",)),
    ):
        cfg = WitnessConfig(**{**base.__dict__, **bad})
        with pytest.raises(ValueError) as e:
            check_timing(cfg)
        assert all(f"witness -> {k}" in str(e.value) for k in keys), (bad, str(e.value))


def test_check_config_prefix_and_tls_pairs() -> None:
    ok = config(["http://127.0.0.1:1"], "/standby/pair")
    assert check_config(ok) == ["http://127.0.0.1:1"]
    for p in ("standby", "/standby/", "/", ""):
        with pytest.raises(ValueError, match="witness -> prefix"):
            check_config(WitnessConfig(**{**ok.__dict__, "prefix": p}))
    with pytest.raises(ValueError, match="cert, witness -> key"):
        check_config(WitnessConfig(**{**ok.__dict__, "cert": Path("c.pem")}))


async def test_programming_errors_raise() -> None:
    w = Witness(config(["http://127.0.0.1:1"], "/p"))
    with pytest.raises(RuntimeError, match="connect"):
        await w.look("a")
    async with w:
        with pytest.raises(ValueError, match="node"):
            await w.acquire("")


# -- unreachable witness: a result, never a hang ------------------------------------------------------


async def test_all_endpoints_down_is_unreachable_within_retry_timeout() -> None:
    eps = [f"http://127.0.0.1:{p}" for p in free_ports(3)]  # nothing listens there
    cfg = config(eps, "/standby/down")
    async with Witness(cfg) as w:
        for call in (lambda: w.look("a"), lambda: w.acquire("a"), w.renew, w.release):
            view, took = await timed(call)
            assert not view.reachable and not view.mine and view.holder is None, view
            assert view.error and all(e in view.error for e in eps), view.error
            assert took <= cfg.retry_timeout + SLACK, took
        assert w.lease_id is None


async def test_a_silent_member_is_unreachable_within_retry_timeout() -> None:
    """A member that accepts TCP and never answers (a hung or cut-off host) costs the budget, no more."""
    conns: list[asyncio.StreamWriter] = []

    async def accept(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conns.append(w)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cfg = config([f"http://127.0.0.1:{port}"], "/standby/silent")
    try:
        async with Witness(cfg) as w:
            for call in (lambda: w.look("a"), lambda: w.acquire("a")):
                view, took = await timed(call)
                assert not view.reachable and view.error, view
                assert took <= cfg.retry_timeout + SLACK, took
                print(f"\nsilent member: unreachable after {took:.2f} s: {view.error}")
    finally:
        for c in conns:
            c.close()
        server.close()
        await server.wait_closed()


# -- one member --------------------------------------------------------------------------------------


@pytest.fixture
async def ab(etcd1: EtcdCluster, prefix: str) -> AsyncIterator[tuple[Witness, Witness]]:
    cfg = config(etcd1.endpoints, prefix)
    async with Witness(cfg) as a, Witness(cfg) as b:
        yield a, b


async def test_acquire_contend_renew_release(ab: tuple[Witness, Witness]) -> None:
    a, b = ab
    assert await a.look("a") == LeaderView(reachable=True)  # empty key

    got = await a.acquire("a")
    assert got.reachable and got.mine and got.holder == "a" and got.lease_id == a.lease_id
    assert got.create_revision is not None and got.create_revision > 0
    assert got.lease_left is not None and 0 < got.lease_left <= 2
    again = await a.acquire("a")  # idempotent for the holder: same key, same lease
    assert replace(again, lease_left=None) == replace(got, lease_left=None)

    lost = await b.acquire("b")
    assert lost.reachable and not lost.mine and lost.holder == "a"
    assert lost.create_revision == got.create_revision and lost.lease_id == a.lease_id
    assert b.lease_id is None  # its lease was revoked

    kept = await a.renew()
    assert kept.mine and kept.create_revision == got.create_revision and kept.lease_left == 2
    seen = await b.look("b")
    assert seen.holder == "a" and not seen.mine and seen.lease_left is not None and seen.lease_left > 0
    assert (await b.renew()).holder == "a"  # renew without a lease just looks

    freed = await a.release()
    assert freed.reachable and freed.holder is None and a.lease_id is None
    assert (await b.look("b")).holder is None  # at once, not after the ttl
    won = await b.acquire("b")
    assert won.mine and won.create_revision is not None and won.create_revision > got.create_revision
    assert not (await a.renew()).mine  # a released: nothing to renew
    assert (await a.release()).holder == "b"  # releasing what is not ours touches nothing
    assert (await b.look("b")).mine


async def test_renewal_keeps_the_key_and_silence_frees_it(ab: tuple[Witness, Witness]) -> None:
    a, b = ab
    ttl = a.cfg.ttl
    first = await a.acquire("a")
    assert first.mine and first.create_revision is not None
    t_end = time.monotonic() + ttl + 1.0
    while time.monotonic() < t_end:  # renewing for longer than the ttl keeps it
        await asyncio.sleep(0.4)
        assert (await a.renew()).mine
    last_renewal = time.monotonic()

    # a goes silent: the key disappears within the ttl (etcd checks expiry every 0.5 s).
    while (seen := await b.look("b")).holder is not None:
        assert seen.holder == "a" and time.monotonic() - last_renewal < ttl + 2.0, seen
        await asyncio.sleep(0.05)
    gone = time.monotonic() - last_renewal
    print(f"\nlease ttl {ttl} s: key gone {gone:.2f} s after the last renewal")
    assert ttl - 1.0 <= gone <= ttl + 1.0

    won = await b.acquire("b")
    assert won.mine and won.create_revision is not None and won.create_revision > first.create_revision
    late = await a.renew()  # the old holder learns it lost
    assert late.reachable and not late.mine and late.holder == "b" and a.lease_id is None
    assert not (await a.acquire("a")).mine
    assert epoch_from_revision(won.create_revision, epoch_from_revision(first.create_revision, 0)) > (
        epoch_from_revision(first.create_revision, 0)
    )


# -- three members -----------------------------------------------------------------------------------


async def test_three_members_one_down_works_two_down_is_unreachable(tmp_path: Path) -> None:
    with running_etcd(tmp_path / "etcd3", 3) as cluster:
        print(f"\netcd 3 members healthy after {cluster.startup_seconds[0]:.2f} s")
        cfg = config(cluster.endpoints, "/standby/three", ttl=4, retry_timeout=1.5)
        async with Witness(cfg) as a, Witness(cfg) as b:
            got = await a.acquire("a")
            assert got.mine

            cluster.stop_member(0)  # the first endpoint, the one both were talking to
            for name, call in (
                ("renew", a.renew),
                ("look", lambda: b.look("b")),
                ("acquire", lambda: b.acquire("b")),
            ):
                view, took = await timed(call)
                print(f"one member down: {name} in {took:.2f} s")
                assert view.reachable and view.holder == "a", (name, view)
            assert (await a.release()).holder is None
            won = await b.acquire("b")
            assert (
                won.mine
                and won.create_revision is not None
                and won.create_revision > (got.create_revision or 0)
            )

            cluster.stop_member(1)  # no quorum: the last member answers nothing that needs one
            for name, call in (
                ("look", lambda: a.look("a")),
                ("acquire", lambda: a.acquire("a")),
                ("renew", b.renew),
            ):
                view, took = await timed(call)
                print(f"no quorum: {name} unreachable in {took:.2f} s: {view.error}")
                assert not view.reachable and not view.mine and view.error, (name, view)
                assert took <= cfg.retry_timeout + SLACK, (name, took)

            took = cluster.start_member(1)
            print(f"member restarted and healthy in {took:.2f} s")
            back, took = await timed(b.renew)
            print(f"quorum back: renew in {took:.2f} s -> {back}")
            # etcd 3.4 restarts every lease's TTL when a new raft leader is elected, so b still holds it.
            assert back.reachable and back.mine and back.holder == "b", back


# -- TLS -----------------------------------------------------------------------------------------------


async def test_https_with_a_client_certificate(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls")
    stranger = make_tls(tmp_path / "stranger", "stranger")
    with running_etcd(tmp_path / "etcd-tls", 1, tls) as cluster:
        assert cluster.endpoints[0].startswith("https://127.0.0.1:")
        good = replace(config(cluster.endpoints, "/standby/tls"), ca=tls.ca, cert=tls.cert, key=tls.key)
        async with Witness(good) as w:
            got = await w.acquire("a")
            assert got.mine and (await w.renew()).mine and (await w.release()).holder is None
        # A server certificate from another CA is refused, and so is a client without a certificate.
        for bad in (replace(good, ca=stranger.ca), replace(good, cert=None, key=None)):
            async with Witness(bad) as w:
                view = await w.look("a")
                assert not view.reachable and view.error, view
                print(f"\nTLS refused: {view.error}")
    with pytest.raises(ValueError, match="witness -> ca: cannot read"):
        await Witness(replace(good, ca=tmp_path / "missing.pem")).connect()
