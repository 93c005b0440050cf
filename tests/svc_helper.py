"""A real service for the command backend's tests: an LSB-style control script and the service it runs.

    python tests/svc_helper.py start|stop|status|serve DIR

- ``start``: spawns ``serve DIR`` detached (its own session, stdio closed), returns once its pid file is
  written; exits 0 at once if it runs already. If ``DIR/refuse`` exists, prints its text to stderr and
  exits 1 (a refusal, like "Access is denied").
- ``serve``: the service: writes ``DIR/pid`` and appends its pid to ``DIR/pids`` (every pid ever started,
  for the tests' cleanup), then sleeps in a loop. SIGTERM: writes ``DIR/exit_code`` 0 and exits 0. If
  ``DIR/crash`` appears, it writes the code it holds to ``DIR/exit_code`` and exits with it (a crash).
- ``stop``: SIGTERM to the pid in ``DIR/pid`` and waits until it is gone; exits 0 if nothing runs. If
  ``DIR/hang`` exists, it sleeps for a minute instead (a hung stop).
- ``status``: exit 0 and ``pid=N`` while it runs, else exit 3 and ``exit_code=N`` if known.

Not product code; POSIX only (signals, sessions), like the tests that use it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def running(d: Path) -> int | None:
    try:
        pid = int((d / "pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def start(d: Path) -> int:
    if (d / "refuse").exists():
        print((d / "refuse").read_text().strip(), file=sys.stderr)
        return 1
    if running(d) is not None:
        return 0
    (d / "exit_code").unlink(missing_ok=True)
    (d / "pid").unlink(missing_ok=True)
    subprocess.Popen(
        [sys.executable, __file__, "serve", str(d)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 5
    while running(d) is None:
        if time.monotonic() > deadline:
            print("the service did not write its pid file within 5 s", file=sys.stderr)
            return 1
        time.sleep(0.01)
    return 0


def serve(d: Path) -> int:
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    with (d / "pids").open("a") as f:
        f.write(f"{os.getpid()}\n")
    write(d / "pid", str(os.getpid()))
    code = 0
    while not stop:
        crash = d / "crash"
        if crash.exists():
            code = int(crash.read_text())
            crash.unlink()
            break
        time.sleep(0.01)
    write(d / "exit_code", str(code))
    (d / "pid").unlink(missing_ok=True)
    return code


def stop(d: Path) -> int:
    if (d / "hang").exists():
        time.sleep(60)
    pid = running(d)
    if pid is None:
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while alive(pid):
        if time.monotonic() > deadline:
            print(f"pid {pid} did not end within 5 s of SIGTERM", file=sys.stderr)
            return 1
        time.sleep(0.01)
    return 0


def status(d: Path) -> int:
    pid = running(d)
    if pid is not None:
        print(f"pid={pid}")
        return 0
    try:
        print(f"exit_code={int((d / 'exit_code').read_text())}")
    except (OSError, ValueError):
        pass
    return 3


def main(argv: list[str]) -> int:
    verbs = {"start": start, "serve": serve, "stop": stop, "status": status}
    if len(argv) != 2 or argv[0] not in verbs:
        print(f"usage: svc_helper.py {'|'.join(verbs)} DIR", file=sys.stderr)
        return 2
    return verbs[argv[0]](Path(argv[1]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
