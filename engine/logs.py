"""Structured log lines: ``event.name key=value ...`` as text, or one JSON object per line.

Modules log with ``getLogger(__name__)`` and a message whose first word is a stable event name followed by
key=value pairs. Only the CLI calls :func:`setup`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

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


def setup(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # watchdog's own chatter stays quiet, but its overflow warnings still reach our handlers.
    logging.getLogger("watchdog").setLevel(logging.WARNING)
