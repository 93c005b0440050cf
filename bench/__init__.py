"""The benchmark suite: ``python -m bench [--quick | --smoke]`` (see bench/README.md).

Modules, imports pointing downward: ``workload`` (the tree and the writes), ``trees`` (comparing trees),
``procs`` (starting and stopping processes, CPU and memory), ``runners`` (standby, rsync, lsyncd),
``machine`` (the machine and its limits), ``measure`` (the procedures), ``report`` (tables, goals, JSON,
chart) and ``__main__`` (the command).
"""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An option's whole number of at least 1 (the commands' shared argparse type)."""
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {v}")
    return v


def non_negative_int(text: str) -> int:
    """An option's whole number of at least 0 (0 usually turns a row off)."""
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {v}")
    return v
