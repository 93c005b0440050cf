"""Logging: the rotating log file and Windows event ids of [log], the options after the command, and the
config errors of [log] and [metrics]."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import logs
from engine.config import load_node
from engine.errors import ConfigError
from tests.test_config import cli, one_config_error
from tests.test_node_config import write_node


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for h in root.handlers:
        if h not in handlers:
            h.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def test_a_log_file_gets_every_line_as_json_and_rotates(tmp_path: Path, restore_logging: None) -> None:
    path = tmp_path / "logs" / "standby.log"
    logs.setup("info", "text", file=logs.FileLog(path, max_bytes=2000, backups=2, fmt="json"))
    log = logging.getLogger("engine.test")
    for i in range(60):
        log.info("send.connected peer=%s n=%d", "127.0.0.1:7420", i)
    for h in logging.getLogger().handlers:
        h.flush()
    lines = [json.loads(x) for x in path.read_text("utf-8").splitlines()]
    assert lines and all(x["event"] == "send.connected" and x["peer"] == "127.0.0.1:7420" for x in lines)
    rotated = sorted(p.name for p in path.parent.iterdir())
    assert rotated == ["standby.log", "standby.log.1", "standby.log.2"], rotated
    assert all(p.stat().st_size <= 2000 for p in path.parent.iterdir())


@pytest.mark.parametrize(
    ("message", "level", "expected"),
    [
        ("alert.failover.done reason=x", logging.WARNING, 1600),
        ("failover.something", logging.INFO, 1100),
        ("alert.service.stopped reason=y", logging.WARNING, 1700),
        ("rejoin.quarantine_done files=3", logging.INFO, 1140),
        ("alert.clock.check reason=z", logging.WARNING, 2300),
        ("something.else", logging.ERROR, 3000),
        ("something.else", logging.WARNING, 2000),
        ("", logging.INFO, 1000),
    ],
)
def test_event_ids_are_stable_per_event_family(message: str, level: int, expected: int) -> None:
    assert logs.event_id(message, level) == expected


def test_log_and_metrics_sections_are_checked(tmp_path: Path) -> None:
    cfg = load_node(
        write_node(
            tmp_path, '[log]\nfile = "logs/s.log"\nformat = "json"\n[metrics]\nlisten = "127.0.0.1:9420"'
        )
    )
    assert cfg.log.file == tmp_path.resolve() / "logs" / "s.log" and cfg.log.format == "json"
    assert cfg.metrics.listen == ("127.0.0.1", 9420)
    for extra, named in [
        ('[log]\nformat = "xml"', "log -> format"),
        ("[log]\nmax_mb = 0", "log -> max_mb"),
        ('[log]\nfiles = "x"', "log -> files"),
        ('[metrics]\nlisten = "127.0.0.1:17420"', "metrics -> listen"),
        ('[metrics]\nlisten = "127.0.0.1:99999"', "metrics -> listen"),
    ]:
        with pytest.raises(ConfigError, match=named):
            load_node(write_node(tmp_path, extra))


def test_the_event_log_off_windows_is_one_config_error_and_options_follow_the_command(tmp_path: Path) -> None:
    path = write_node(tmp_path, "[log]\nevent_log = true")
    one_config_error(cli("run", "--config", str(path), "--log-level", "debug"), "log -> event_log")
    r = cli("status", "--config", str(path), "--log-format", "json")
    assert r.returncode == 5 and "Traceback" not in r.stderr, r.stderr
