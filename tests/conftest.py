from __future__ import annotations

import compileall
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from tests.ha import HaNode, Sampler, sampled_pair
from tests.pair import Pair

IN_CI = os.environ.get("CI") == "true"


def pytest_configure(config: pytest.Config) -> None:
    """The engine's bytecode, written once before any test starts a process: Python reads it even where
    PYTHONDONTWRITEBYTECODE keeps it from writing it, and each of the suite's hundreds of engine processes
    would otherwise compile every module again (about 0.3 s of CPU each). Stale bytecode is never used:
    Python checks it against the source."""
    if not hasattr(config, "workerinput"):  # the controller only, not every xdist worker
        compileall.compile_dir(Path(__file__).resolve().parent.parent / "engine", quiet=1)


def skip_or_fail(reason: str, in_ci: str) -> NoReturn:
    """Skip for ``reason``; under CI=true fail instead (``in_ci`` says why it must not be missing there),
    so that nothing a test is about goes untested in CI."""
    if IN_CI:
        pytest.fail(f"{reason} ({in_ci})")
    pytest.skip(reason)


def need_binary(name: str) -> str:
    """Path of a system binary; skip if missing, but fail under CI=true."""
    path = shutil.which(name)
    if path is None:
        skip_or_fail(f"{name} is not installed", "CI=true: .ci/run must install it")
    return path


def stop_by_pid(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM ``proc`` by pid, SIGKILL if it is still there after ``timeout`` seconds; it is reaped
    whatever happens (never left running silently)."""
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
    finally:
        if proc.poll() is None:  # only if even SIGKILL did not reap it
            proc.kill()
            proc.wait()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    p = Pair(tmp_path)
    try:
        yield p
    finally:
        p.stop_all()


@pytest.fixture
def ha(tmp_path: Path) -> Iterator[tuple[HaNode, HaNode, Sampler]]:
    """An HA pair (not started; failover_after 10 s) with both services sampled every 50 ms; the test
    fails if they ever ran at once."""
    with sampled_pair(tmp_path) as (a, b, sampler):
        yield a, b, sampler
    assert not sampler.both, f"both services ran at once, {len(sampler.both)} samples of {sampler.samples}"


@pytest.fixture(autouse=True)
def no_thread_leaks() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
    for t in leaked:
        t.join(timeout=5)
    leaked = [t for t in leaked if t.is_alive()]
    assert not leaked, f"test leaked threads: {leaked}"
