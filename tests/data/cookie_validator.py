"""Validator for guarded Synergy Join sync cookies: exit 0 only if the file is base64 over whole gzip.

Used two ways by ``tests/test_guarded.py``:

- as the ``command`` of a ``[[guard]]`` rule: ``python tests/data/cookie_validator.py {path}``;
- imported, through :func:`cookie_problem`, by the test's own checks (the checker thread that watches the
  passive and the check of every torn cookie on the active), so the engine and the test judge a cookie
  with the same code.

Why a command rule and not the ``base64`` rule: a cookie cut at a multiple of 4 characters is itself valid
base64 (see the docstring of ``engine/guard.py``). Only the payload can tell: a cut gzip stream has no
end-of-stream marker, and gzip checks the CRC-32 and length of what it inflated.

Exit status: 0 good; 1 torn or not a cookie (the reason is the first line on stderr); 2 usage or I/O error.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import sys
import zlib
from collections.abc import Sequence


def cookie_problem(data: bytes) -> str | None:
    """None if ``data`` is a whole cookie (standard base64 text over one whole gzip stream), else why not."""
    body = data.strip()
    if not body:
        return "empty cookie"
    try:
        raw = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as e:
        return f"not base64: {e}"
    try:
        gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        return f"not a whole gzip stream: {e}"
    return None


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: cookie_validator.py FILE", file=sys.stderr)
        return 2
    try:
        with open(argv[0], "rb") as f:
            data = f.read()
    except OSError as e:
        print(f"cannot read {argv[0]}: {e.strerror or e}", file=sys.stderr)
        return 2
    problem = cookie_problem(data)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
