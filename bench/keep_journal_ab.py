"""``python -m bench.keep_journal_ab``: what ``[receiver] keep_journal`` costs standby's initial sync.

:mod:`bench.ab` with its arms set: A the last commit's engine with ``keep_journal`` on (the default: the
passive journals every applied change again), B the same engine with it off. ``--a``/``--b`` still override.
"""

from __future__ import annotations

import sys

from bench.ab import main as ab_main


def main(argv: list[str] | None = None) -> int:
    return ab_main(argv, "python -m bench.keep_journal_ab", "HEAD,keep_journal=on", "HEAD,keep_journal=off")


if __name__ == "__main__":
    sys.exit(main())
