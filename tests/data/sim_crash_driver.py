"""Drive the Synergy Join simulator on an EXISTING tree, then crash it mid cookie write (a test tool).

``python -m engine.simulator ROOT`` always starts with ``setup()``, which rewrites the config and every
cookie and books a fresh set of meetings: it cannot carry on with a tree it made in an earlier run. This
script can. It rebuilds the simulator's bookkeeping from the files under ROOT (which meetings each room
has, their sequence numbers, the config revision, the newest cookie generation), then:

0. with ``--wait-start``: prints ``loaded`` and waits for a line ``start`` on stdin before it reads ROOT
   (a test starts the next run while the current one still works, hiding the interpreter's start-up);
1. runs ``--good-batches G`` ordinary batches (whole cookie rewrites);
2. prints ``ready`` on stdout and waits for a line ``go`` on stdin (the test records the last good cookies
   and lets the replica catch up meanwhile); any other line, or end of input, exits 0 without crashing;
3. runs one more batch with ``crash_after_bytes = K``: the first cookie rewrite of that batch longer than K
   bytes is cut after K bytes and the process SIGKILLs itself (``engine.simulator.crash_write``), leaving
   a genuinely torn cookie. The simulator logs ``simulator.crash path=... written=K of=N`` to stderr.

Exit status: killed by SIGKILL after a crash; 0 when told not to start or not to crash; 2 when ROOT holds
no tree; 3 when the crash batch finished without crashing (no cookie in it was longer than K).

It reaches into ``ServiceSimulator`` private state on purpose: the simulator has no public way to adopt a
tree, and the alternative (re-running ``setup()``) would rewrite every cookie at every run.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from engine.simulator import CONFIG_PATH, DATABASES, ServiceSimulator, cookie_relpath

_GEN = re.compile(rb";gen=(\d+);")


def adopt(sim: ServiceSimulator) -> None:
    """Fill the simulator's bookkeeping from the tree under ``sim.root`` instead of calling ``setup()``."""
    config = sim.root / CONFIG_PATH
    if not config.is_file():
        raise FileNotFoundError(f"{config}: no simulator tree here (run `python -m engine.simulator` first)")
    try:
        sim._config_revision = int(json.loads(config.read_bytes())["revision"])
    except (ValueError, KeyError, TypeError):
        sim._config_revision = 0
    generation = 0
    for room in sim.rooms:
        folder = sim.root / DATABASES / room
        folder.mkdir(parents=True, exist_ok=True)
        meetings = sorted(p.stem for p in folder.glob("*.json"))
        sim._meetings[room] = meetings
        for meeting in meetings:
            try:
                doc = json.loads((folder / f"{meeting}.json").read_bytes())
                sim._sequence[meeting] = int(doc["sequence"])
            except (ValueError, KeyError, TypeError):
                sim._sequence[meeting] = 0
        try:
            payload = gzip.decompress(base64.b64decode((sim.root / cookie_relpath(room)).read_bytes()))
        except (OSError, EOFError, ValueError):
            continue  # missing or torn by an earlier crash: it is rewritten whole when its room next syncs
        m = _GEN.search(payload[:200])
        if m:
            generation = max(generation, int(m[1]))
    sim._cookie_generation = generation
    sim._ready = True


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="sim_crash_driver.py", description="Drive the simulator on an existing tree, then crash it."
    )
    p.add_argument("root", type=Path)
    p.add_argument("--rooms", type=int, default=5)
    p.add_argument("--meetings-per-room", type=int, default=20)
    p.add_argument("--seed", type=int, required=True, help="use a different seed for every run")
    p.add_argument("--good-batches", type=int, default=1)
    p.add_argument("--crash-after-bytes", type=int, required=True, metavar="K")
    p.add_argument("--piece-delay", type=float, default=0.005)
    p.add_argument(
        "--wait-start",
        action="store_true",
        help="print `loaded` and wait for a line `start` before touching ROOT (so a test can "
        "start the next run while the current one is still going)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    if args.wait_start:
        print("loaded", flush=True)
        if sys.stdin.readline().strip() != "start":
            return 0
    sim = ServiceSimulator(
        args.root,
        rooms=args.rooms,
        meetings_per_room=args.meetings_per_room,
        seed=args.seed,
        piece_delay=args.piece_delay,
    )
    try:
        adopt(sim)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    for _ in range(args.good_batches):
        sim.batch()
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 0
    sim.crash_after_bytes = args.crash_after_bytes
    touched = sim.batch()  # SIGKILLs this process inside the first cookie rewrite longer than K
    print(
        f"no crash: every cookie of the batch was at most {args.crash_after_bytes} bytes: {touched}",
        file=sys.stderr,
    )
    return 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
