"""Torn-write verdicts for guarded files: which rule guards a path, and whether given bytes pass it.

Some files of the watched tree must never reach a replica half-written. Synergy Join rewrites its per-room
Exchange sync cookie in place after every batch; a crash mid-write leaves a truncated cookie, and a replica
that received one would resync every room from scratch after failover. A *guard* names such files by a glob
and a rule:

- ``base64``: one block of standard base64 text (the cookie), optionally surrounded by ASCII whitespace;
- ``json``: exactly one JSON document, UTF-8 with an optional BOM (``config/config.json``);
- ``nonempty``: at least one byte;
- ``command``: an external validator run on the file, exit 0 meaning good.

Owns: the glob dialect (:func:`matches`), rule lookup (:func:`find_guard`), the content rules
(:func:`check_content`), the stat-before-and-after check (:func:`stable`), and for command rules the
validator's argv and the verdict on its exit (:func:`command_argv`, :func:`command_verdict`); the process
itself is run by :func:`engine.guards.run_command_rule`.

Must not: read files, stat them, run processes, read the clock, or log. Everything here is a pure
function of its arguments; the I/O layers (``scan``) read the bytes, take the stats and decide what to do
with a refusal (hold the file back and retry later), this module only gives the verdict.

INVARIANT: a content rule accepting some bytes does not prove that they are whole. A prefix of a base64 text
cut at a multiple of 4 characters is itself valid base64, and a JSON document followed by whitespace is
valid without it. Rules refuse what is provably torn; :func:`stable` and the scanner's retry cover writes
still in progress; a ``command`` validator that understands the payload is the only way to close the rest.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

RuleKind = Literal["base64", "json", "nonempty", "command"]

#: What the sender and receiver call on a file's bytes: None if good (or not guarded), else why not.
ContentCheck = Callable[[str, bytes], str | None]

#: Rule kinds, in the order the docs list them.
RULE_KINDS: tuple[str, ...] = get_args(RuleKind)

_UTF8_BOM = b"\xef\xbb\xbf"
_B64_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="  # with the padding


@dataclass(frozen=True)
class GuardRule:
    """Files whose relative path matches ``pattern`` are only shipped when they pass ``rule``.

    ``command`` and ``timeout`` are used by ``command`` rules only: ``command`` is an argv whose items may
    hold ``{path}``, replaced by the OS path of the file to check.
    """

    pattern: str
    rule: RuleKind
    command: tuple[str, ...] = ()
    timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.rule not in RULE_KINDS:
            raise ValueError(f"unknown guard rule {self.rule!r} (want one of {', '.join(RULE_KINDS)})")
        compile_pattern(self.pattern)  # raises ValueError on a bad pattern
        if self.rule == "command" and not self.command:
            raise ValueError(f"guard {self.pattern!r}: a command rule needs a command")
        if self.rule != "command" and self.command:
            raise ValueError(f"guard {self.pattern!r}: only command rules take a command")
        if not all(isinstance(item, str) for item in self.command):
            raise ValueError(f"guard {self.pattern!r}: command items must be strings")
        if not self.timeout > 0:
            raise ValueError(f"guard {self.pattern!r}: timeout must be positive, not {self.timeout!r}")


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check. ``reason`` says why a file was refused; it is empty when ``good``."""

    good: bool
    reason: str = ""


GOOD = Verdict(True)


# ---------------------------------------------------------------------------------------------------------
# Patterns. A glob over relative POSIX paths, anchored at both ends and case-sensitive:
#   **      as a whole segment: any number of directories, including none ("a/**/b" matches "a/b");
#           as the last segment: everything below ("a/**" matches "a/b" and "a/b/c", not "a")
#   *       any run of characters within one segment ("**" inside a segment is the same as "*")
#   ?       one character other than "/"
#   [abc] [a-z] [!a-z] [^a-z]   one character of (or not of) a class, never "/"; "]" first is literal
# There is no escape character: relative paths never hold a backslash. An unclosed "[" is literal.


@functools.lru_cache(maxsize=512)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a guard pattern to a regex that must match a whole relative path. Raises ValueError."""
    if not pattern:
        raise ValueError("empty guard pattern")
    if pattern.startswith("/"):
        raise ValueError(f"guard pattern {pattern!r} must be relative (no leading '/')")
    segments = pattern.split("/")
    if "" in segments:
        raise ValueError(f"guard pattern {pattern!r} has an empty segment")
    # Consecutive "**" segments mean the same as one.
    collapsed: list[str] = []
    for seg in segments:
        if not (seg == "**" and collapsed and collapsed[-1] == "**"):
            collapsed.append(seg)
    out: list[str] = []
    for i, seg in enumerate(collapsed):
        last = i == len(collapsed) - 1
        if seg == "**":
            # Not last: zero or more whole directories, each with its trailing slash. Last: the rest.
            out.append(".+" if last else "(?:[^/]+/)*")
            continue
        out.append(_translate_segment(seg))
        if not last:
            out.append("/")
    try:
        return re.compile("".join(out), re.DOTALL)
    except re.error as e:
        raise ValueError(f"bad guard pattern {pattern!r}: {e}") from None


def _translate_segment(seg: str) -> str:
    out: list[str] = []
    i, n = 0, len(seg)
    while i < n:
        c = seg[i]
        if c == "*":
            while i < n and seg[i] == "*":
                i += 1
            out.append("[^/]*")
            continue
        if c == "?":
            out.append("[^/]")
        elif c == "[":
            end = _class_end(seg, i)
            if end < 0:
                out.append(re.escape(c))
            else:
                out.append(_translate_class(seg[i + 1 : end]))
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _class_end(seg: str, start: int) -> int:
    """Index of the "]" closing the class opened at ``start``, or -1 if it is not closed."""
    j = start + 1
    if j < len(seg) and seg[j] in "!^":
        j += 1
    if j < len(seg) and seg[j] == "]":
        j += 1
    return seg.find("]", j)


def _translate_class(body: str) -> str:
    negate = body[:1] in ("!", "^")
    if negate:
        body = body[1:]
    items: list[str] = []
    for k, ch in enumerate(body):
        # "-" is a range only between two characters; every other character is escaped, so the
        # regex never sees "[[", "--" or "&&" (which Python warns about as possible set operations).
        if ch == "-" and 0 < k < len(body) - 1:
            items.append("-")
        else:
            items.append(re.escape(ch))
    # Segments never hold "/", so a positive class cannot match one; a negated class must exclude it.
    return f"[^/{''.join(items)}]" if negate else f"[{''.join(items)}]"


def matches(pattern: str, relpath: str) -> bool:
    """Whether relative POSIX path ``relpath`` matches guard ``pattern`` (whole path, case-sensitive)."""
    return compile_pattern(pattern).fullmatch(relpath) is not None


def find_guard(guards: Sequence[GuardRule], relpath: str) -> GuardRule | None:
    """The first guard whose pattern matches ``relpath``, or None when the path is not guarded."""
    for guard in guards:
        if matches(guard.pattern, relpath):
            return guard
    return None


# ---------------------------------------------------------------------------------------------------------
# Content rules.


def check_content(rule: GuardRule, data: bytes) -> Verdict:
    """Judge the whole content ``data`` of a file guarded by ``rule``.

    Raises ValueError for ``command`` rules: those read the file themselves, see
    :func:`engine.guards.run_command_rule`.
    """
    if rule.rule == "base64":
        return _check_base64(data)
    if rule.rule == "json":
        return _check_json(data)
    if rule.rule == "nonempty":
        return GOOD if data else Verdict(False, "empty file")
    raise ValueError(f"check_content cannot judge {rule.rule!r} rules; use run_command_rule")


def _check_base64(data: bytes) -> Verdict:
    if not data:
        return Verdict(False, "empty file")
    if data.startswith(_UTF8_BOM):
        return Verdict(False, "base64 text starts with a UTF-8 BOM")
    body = data.strip()  # ASCII whitespace only, CR and LF included
    if not body:
        return Verdict(False, "only whitespace")
    lead = len(data) - len(data.lstrip())
    stray = body.translate(None, _B64_CHARS)  # what is left once every base64 character is deleted
    if stray:
        offset = lead + body.index(stray[:1])
        return Verdict(False, f"invalid base64 byte 0x{stray[0]:02x} at offset {offset}")
    pad_at = body.find(b"=")
    if pad_at >= 0:
        padding = body[pad_at:]
        if padding.strip(b"=") or len(padding) > 2:
            return Verdict(False, f"misplaced base64 padding at offset {lead + pad_at}")
    if len(body) % 4:
        return Verdict(False, f"truncated base64 (length {len(body)} is not a multiple of 4)")
    try:
        decoded = base64.b64decode(body, validate=True)
    except binascii.Error as e:
        return Verdict(False, f"invalid base64: {e}")
    if base64.b64encode(decoded) != body:
        return Verdict(False, "non-canonical base64 (unused padding bits are set)")
    return GOOD


def _check_json(data: bytes) -> Verdict:
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM) :]
    if not data:
        return Verdict(False, "empty file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return Verdict(False, f"not UTF-8 at byte {e.start}: {e.reason}")
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        return Verdict(False, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}")
    except RecursionError:
        return Verdict(False, "JSON nested too deeply")
    return GOOD


def stable(before: tuple[int, int], after: tuple[int, int]) -> Verdict:
    """Compare ``(size, mtime_ns)`` taken before and after reading a file: a difference means torn bytes."""
    if before == after:
        return GOOD
    detail = f"size {before[0]} -> {after[0]}" if before[0] != after[0] else "mtime changed"
    return Verdict(False, f"file changed while it was read ({detail})")


# ---------------------------------------------------------------------------------------------------------
# Command rules: the argv to run and the verdict on its result (the process itself is run by engine.guards).


def command_argv(rule: GuardRule, path: str) -> list[str]:
    """The validator's argv for the file at OS path ``path``: ``{path}`` in any item is replaced."""
    if rule.rule != "command":
        raise ValueError(f"run_command_rule needs a command rule, not {rule.rule!r}")
    return [item.replace("{path}", path) for item in rule.command]


def command_verdict(returncode: int, stderr: bytes) -> Verdict:
    """Exit status 0 is good; otherwise the status and the first line of stderr are the reason."""
    if returncode == 0:
        return GOOD
    lines = stderr.decode("utf-8", errors="replace").strip().splitlines()
    first = lines[0].strip() if lines else ""
    status = (
        f"validator killed by signal {-returncode}"
        if returncode < 0
        else f"validator exited with code {returncode}"
    )
    return Verdict(False, f"{status}: {first}" if first else status)
