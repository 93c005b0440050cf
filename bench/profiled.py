"""``python -m bench.profiled OUT -m MODULE ARGS...``: run a module under cProfile in every thread.

``python -m cProfile`` sees the main thread only, and standby reads, hashes, journals and applies in worker
threads (``asyncio.to_thread``), so its profile showed little but the event loop waiting. This runner
gives the main thread and every thread started afterwards a profiler of its own
(``threading.setprofile`` starts one at a thread's first event) and, when the module returns, merges them
all into one ``pstats`` file at ``OUT``. A thread still running at that moment is read as it stands.

Owns: that merge. Must not: change what the module does (it runs in ``__main__`` as ``-m`` would).
"""

from __future__ import annotations

import cProfile
import pstats
import runpy
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

_profiles: list[cProfile.Profile] = []
_lock = threading.Lock()


def _start_in_thread(frame: FrameType, event: str, arg: Any) -> None:
    """The first profile event of a new thread: give it a profiler (which replaces this hook)."""
    prof = cProfile.Profile()
    with _lock:
        _profiles.append(prof)
    prof.enable()


def _dump(out: Path) -> None:
    with _lock:
        profs = list(_profiles)
    stats: pstats.Stats | None = None
    for prof in profs:
        prof.disable()  # this thread's only; the others are read as they stand
        try:
            s = pstats.Stats(prof)
        except TypeError:  # a profiler that never saw an event
            continue
        if stats is None:
            stats = s
        else:
            stats.add(s)
    if stats is not None:
        stats.dump_stats(str(out))


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "-m":
        print("usage: python -m bench.profiled OUT -m MODULE [ARGS...]", file=sys.stderr)
        return 2
    out, module, rest = Path(argv[0]), argv[2], argv[3:]
    threading.setprofile(_start_in_thread)
    main_prof = cProfile.Profile()
    with _lock:
        _profiles.append(main_prof)
    sys.argv = [module, *rest]
    code = 0
    main_prof.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        main_prof.disable()
        threading.setprofile(None)
        _dump(out)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
