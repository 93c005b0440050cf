"""Metrics from a running HA pair (real agents, real HTTP scrapes): the values move as the state does.
Lag rises while the passive is down, the roles flip on a failover, a safety halt shows with its reason,
and `standby status` says the same with its exit codes."""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.ha import HaNode, same_trees, sampled_pair, wait_for
from tests.pair import free_port
from tests.test_ha import _logs, _up
from tests.test_replication import write_files


def scrape(n: HaNode) -> dict[str, float]:
    """``name{label=value,...}`` -> value, without the node label; only standby_* samples."""
    with urllib.request.urlopen(f"http://127.0.0.1:{n.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if not s.name.startswith("standby_"):
                continue
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "node")
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_metrics_follow_replication_failover_and_a_halt(tmp_path: Path) -> None:
    def metrics_config(n: HaNode) -> str:
        n.metrics_port = free_port()
        return f'[metrics]\nlisten = "127.0.0.1:{n.metrics_port}"\n'

    with sampled_pair(tmp_path, 10.0, metrics_config) as (a, b, sampler):
        try:
            write_files(a.root / "databases" / "room-1", 30)
            _up(a, b)
            wait_for(lambda: same_trees(a, b), 30, "the first copy")
            wait_for(lambda: scrape(a).get("standby_lag_entries") == 0, 15, "the active caught up")
            m = scrape(a)
            assert (
                m["standby_up"] == 1 and m["standby_is_active"] == 1 and m["standby_role{role=active}"] == 1
            )
            assert m["standby_service_running"] == 1 and m["standby_peer_connected"] == 1
            assert m["standby_journal_acked_seq"] == m["standby_journal_head_seq"] >= 31
            assert scrape(b)["standby_role{role=passive}"] == 1

            # The passive's agent is down: the active's lag rises, its peer is unseen.
            b.kill()
            write_files(a.root / "databases" / "room-2", 10)
            wait_for(lambda: (scrape(a).get("standby_lag_entries") or 0) >= 10, 20, "the lag to rise")
            wait_for(lambda: scrape(a).get("standby_peer_connected") == 0, 20, "the peer unseen")
            wait_for(lambda: a.cli("status").returncode == 1, 10, "status to say degraded (peer silent)")
            b.start()
            wait_for(lambda: scrape(a).get("standby_lag_entries") == 0, 30, "the lag back to 0")

            # A failover: the roles flip in the metrics of both.
            a.kill_service()
            wait_for(lambda: b.service_pid() is not None, 40, "the failover")
            wait_for(
                lambda: (
                    scrape(b).get("standby_is_active") == 1 and scrape(b).get("standby_service_running") == 1
                ),
                15,
                "b's metrics to say active and running",
            )
            after = scrape(b)
            print("\nscrape of join-b after the failover:")
            for k in sorted(after):
                if k.startswith(
                    ("standby_role", "standby_is_active", "standby_epoch", "standby_service", "standby_lag")
                ):
                    print(f"  {k} {after[k]:g}")
            assert after["standby_epoch"] >= 2 and after["standby_service_running"] == 1
            wait_for(lambda: scrape(a).get("standby_is_active") == 0, 15, "a's metrics to say not active")
            assert b.cli("status").returncode in (0, 1)

            # A safety halt on the new active: the reason appears, status exits 3.
            wait_for(lambda: a.status().get("role") == "passive", 30, "the old active to rejoin")
            wait_for(lambda: same_trees(a, b), 30, "the rejoin to catch up")
            shutil.rmtree(b.root / "databases")
            wait_for(
                lambda: any(k.startswith("standby_halted{") and v == 1 for k, v in scrape(b).items()),
                30,
                "the halt in the metrics",
            )
            halted = next(k for k, v in scrape(b).items() if k.startswith("standby_halted{") and v == 1)
            assert "reason=" in halted and len(halted) > len("standby_halted{reason=}"), halted
            # The status file is rewritten about once a second (the metrics read the live status).
            wait_for(lambda: b.cli("status").returncode == 3, 10, "status to exit 3 (halted)")
            r = b.cli("status", "--json")
            assert r.returncode == 3 and json.loads(r.stdout)["halted"], "the status names the halt"
        except AssertionError as e:
            raise AssertionError(f"{e}\n{_logs(a, b)}") from None
    assert not sampler.both
    # A stopped agent: status says so (exit 5), and nothing is served.
    r = a.cli("status")
    assert r.returncode == 5 and "NOT RUNNING" in r.stdout
