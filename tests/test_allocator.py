"""The allocator set-up of every ``standby`` process (``engine.cli.tune_allocator``): on Linux with glibc,
memory a replication's large buffers took is handed back when they are freed, instead of staying in the
heap for good behind the long-lived objects allocated between them. Real processes, their real RSS."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.pair import ROOT

#: In a fresh interpreter: free one 4 MiB block (by default glibc then serves blocks up to 4 MiB from its
#: heap), allocate 64 blocks of 2 MiB with a small long-lived block after each, free the large ones, and
#: print how many MiB of RSS stayed over the start.
PROBE = """
import sys
from engine.cli import tune_allocator
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 >> 20
tuned = tune_allocator() if sys.argv[1] == "on" else False
start = rss()
x = b"x" * (4 << 20)
del x
big, small = [], []
for i in range(64):
    big.append(b"x" * (2 << 20))  # written: calloc'ed zeros would never be resident
    small.append(bytearray(1000 + i))
del big
print(tuned, rss() - start)
"""


def _probe(mode: str) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    tuned, kept = out.stdout.split()
    return tuned == "True", int(kept)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator: Linux only")
def test_large_buffers_freed_are_handed_back_to_the_system() -> None:
    tuned, kept = _probe("on")
    assert tuned, "mallopt was not available: not glibc?"
    assert kept < 16, f"{kept} MiB of 128 MiB freed stayed in the process"
    # What it prevents: glibc's default keeps them (else this test could not fail).
    untuned, kept_by_default = _probe("off")
    assert not untuned and kept_by_default > 100, f"default glibc kept only {kept_by_default} MiB"


@pytest.mark.parametrize(
    "setting",
    [
        ("MALLOC_MMAP_THRESHOLD_", "65536"),
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1:glibc.malloc.mmap_threshold=65536"),
    ],
)
def test_an_operators_own_threshold_is_left_alone(setting: tuple[str, str]) -> None:
    out = subprocess.run(
        [sys.executable, "-c", "from engine.cli import tune_allocator; print(tune_allocator())"],
        cwd=ROOT,
        env={**os.environ, setting[0]: setting[1]},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.strip() == "False", out.stderr
