"""The status file each running process keeps in its state folder, and reading it back.

A running ``send`` or ``receive`` rewrites ``status.json`` (atomically) about once a second; ``standby
status`` reads it and checks that the process is alive. No socket is needed to ask a node how it is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

STATUS_FILE = "status.json"

log = logging.getLogger(__name__)


def write_status(state_dir: Path, data: dict[str, Any]) -> None:
    data = dict(data, pid=os.getpid(), updated=time.time())
    tmp = state_dir / f"{STATUS_FILE}.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), "utf-8")
    try:
        os.replace(tmp, state_dir / STATUS_FILE)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_status_quiet(state_dir: Path, data: dict[str, Any]) -> None:
    """write_status that never fails its caller: a reader holding the file open (Windows) or a full
    disk costs one refresh, not the process."""
    try:
        write_status(state_dir, data)
    except OSError as e:
        log.info("status.write_failed error=%s", e)


def pid_alive(pid: int) -> bool:
    try:
        import psutil

        return bool(psutil.pid_exists(pid))
    except ImportError:  # pragma: no cover
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True


def read_status(state_dir: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((state_dir / STATUS_FILE).read_text("utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    data["running"] = (
        isinstance(data.get("pid"), int)
        and pid_alive(data["pid"])
        and (time.time() - float(data.get("updated", 0)) < 30)
    )
    return data
