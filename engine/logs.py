"""Structured log lines: ``event.name key=value ...`` as text, or one JSON object per line.

Modules log with ``getLogger(__name__)`` and a message whose first word is a stable event name followed by
key=value pairs. Only the CLI calls :func:`setup`.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

_PAIR = re.compile(r"""(\w+)=('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\S+)""")


def parse_message(msg: str) -> dict[str, str]:
    event, _, rest = msg.partition(" ")
    out = {"event": event}
    for k, v in _PAIR.findall(rest):
        out[k] = v[1:-1] if v[:1] in "'\"" and v[-1:] == v[:1] else v
    note = _PAIR.sub("", rest).strip(" ()")
    if note:
        out["note"] = note
    return out


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        d: dict[str, object] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        d.update(parse_message(record.getMessage()))
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        line = f"{t}.{int(record.msecs):03d} {record.levelname.lower():7} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


#: Windows Event Log ids, stable per event family (the first words of the event name); anything else is
#: 1000 (information), 2000 (warning) or 3000 (error). An alert's id is its family's plus 500.
EVENT_FAMILIES: dict[str, int] = {
    "failover": 1100,
    "promote": 1110,
    "demote": 1120,
    "startup": 1130,
    "rejoin": 1140,
    "switchover": 1150,
    "node": 1160,
    "service": 1200,
    "agent": 1210,
    "send": 1300,
    "receiver": 1310,
    "reconcile": 1320,
    "journal": 1400,
    "guard": 1500,
    "quarantine": 1600,
    "upgrade": 1700,
    "clock": 1800,
    "maintenance": 1900,
}


def event_id(message: str, levelno: int) -> int:
    """The Event Log id of a log line: by its event family (``alert.`` lines add 500), else by level."""
    name = message.split(" ", 1)[0]
    alert = name.startswith("alert.")
    family = name.removeprefix("alert.").split(".", 1)[0]
    if family in EVENT_FAMILIES:
        return EVENT_FAMILIES[family] + (500 if alert else 0)
    return 3000 if levelno >= logging.ERROR else 2000 if levelno >= logging.WARNING else 1000


@dataclass(frozen=True)
class FileLog:
    """Where a long-running command also writes its log (``[log]`` of a node config)."""

    path: Path
    max_bytes: int = 10 << 20
    backups: int = 5
    fmt: str = "text"  # "text" (key=value) or "json"


def setup(
    level: str = "info",
    fmt: str = "text",
    *,
    file: FileLog | None = None,
    event_log: bool = False,
) -> None:
    """Log lines to stderr; with ``file``, also to a rotating file; with ``event_log`` (Windows), warnings
    and errors also to the Application event log (source "standby", ids from :func:`event_id`)."""
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handlers = [handler]
    if file is not None:
        file.path.parent.mkdir(parents=True, exist_ok=True)
        rotating = logging.handlers.RotatingFileHandler(
            file.path, maxBytes=file.max_bytes, backupCount=file.backups, encoding="utf-8"
        )
        rotating.setFormatter(JsonFormatter() if file.fmt == "json" else TextFormatter())
        handlers.append(rotating)
    if event_log:
        handlers.append(_event_log_handler())
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(level.upper())
    # watchdog's own chatter stays quiet, but its overflow warnings still reach our handlers.
    logging.getLogger("watchdog").setLevel(logging.WARNING)


class _EventLogHandler(logging.handlers.NTEventLogHandler):  # pragma: no cover - Windows
    def getEventID(self, record: logging.LogRecord) -> int:
        return event_id(record.getMessage(), record.levelno)


def _event_log_handler() -> logging.Handler:  # pragma: no cover - Windows
    """The Application event log, warnings and errors only (needs pywin32: the [windows] extra)."""
    if sys.platform != "win32":
        raise ValueError("[log] event_log works on Windows only")
    h = _EventLogHandler("standby")
    h.setLevel(logging.WARNING)
    h.setFormatter(TextFormatter())
    return h
