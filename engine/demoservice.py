"""A stand-in for the Synergy Join Windows service, for the HA demo: an LSB-style control program around the
simulator (:mod:`engine.simulator`), used through the ``command`` service backend.

    python -m engine.demoservice start|stop|status DIR ROOT

- ``start``: runs ``python -m engine.simulator ROOT`` detached, writes its pid to ``DIR/pid``; does nothing
  if it runs already.
- ``stop``: terminates it and waits until it is gone; nothing to do if it does not run.
- ``status``: exit 0 and ``pid=N`` while it runs, else exit 3 (stopped).

Must not: be imported by the engine (a tool, like the simulator it starts).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil

LSB_RUNNING, LSB_STOPPED = 0, 3


def running(d: Path) -> int | None:
    try:
        pid = int((d / "pid").read_text("ascii"))
        p = psutil.Process(pid)
        if p.status() != psutil.STATUS_ZOMBIE and "engine.simulator" in " ".join(p.cmdline()):
            return pid
    except (OSError, ValueError, psutil.Error):
        pass
    return None


def start(d: Path, root: Path) -> int:
    if running(d) is not None:
        return 0
    d.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "engine.simulator", str(root), "--rooms", "4", "--meetings-per-room", "10"]
    kw: dict[str, object] = {}
    if sys.platform == "win32":
        kw["creationflags"] = subprocess.DETACHED_PROCESS | subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined,unused-ignore]
    else:
        kw["start_new_session"] = True
    with open(d / "service.log", "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, **kw)  # type: ignore[call-overload]
    tmp = d / "pid.tmp"
    tmp.write_text(str(proc.pid), "ascii")
    tmp.replace(d / "pid")
    return 0


def stop(d: Path) -> int:
    pid = running(d)
    if pid is None:
        return 0
    try:
        p = psutil.Process(pid)
        p.terminate()
        try:
            p.wait(10)
        except psutil.TimeoutExpired:
            p.kill()
            p.wait(10)
    except psutil.NoSuchProcess:
        pass
    return 0


def status(d: Path) -> int:
    pid = running(d)
    if pid is None:
        return LSB_STOPPED
    print(f"pid={pid}")
    return LSB_RUNNING


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("start", "stop", "status"):
        print("usage: python -m engine.demoservice start|stop|status DIR ROOT", file=sys.stderr)
        return 2
    action, d, root = argv[0], Path(argv[1]), Path(argv[2])
    if action == "start":
        return start(d, root)
    if action == "stop":
        return stop(d)
    return status(d)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
