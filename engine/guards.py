"""Turns the configured guards into the content checks the sender and receiver call.

Command rules need a file to look at: the exact bytes about to be shipped or applied are written to a
private snapshot in the state folder and the validator is run on that, never on the live file.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Sequence
from pathlib import Path

from engine.config import Config
from engine.guard import GuardRule, Verdict, check_content, command_argv, command_verdict, compile_pattern

#: Guarded files are checked whole, in memory; a larger one is held back (it cannot be checked).
GUARD_MAX_BYTES = 64 << 20


class GuardCheck:
    """The content check both sides run on guarded files: ``check(path, data)`` is None when the bytes
    are good (or the path is not guarded), else the reason they are refused."""

    def __init__(self, guards: Sequence[GuardRule], scratch: Path) -> None:
        self.rules = tuple(guards)
        self.scratch = scratch
        # Asked for every file shipped or applied: the patterns are compiled once, here.
        self._compiled = tuple((compile_pattern(g.pattern).fullmatch, g) for g in self.rules)

    def rule_for(self, path: str) -> GuardRule | None:
        """The first guard whose pattern matches ``path`` (as :func:`engine.guard.find_guard`)."""
        for fullmatch, rule in self._compiled:
            if fullmatch(path) is not None:
                return rule
        return None

    def guarded(self, path: str) -> bool:
        return self.rule_for(path) is not None

    def __call__(self, path: str, data: bytes) -> str | None:
        rule = self.rule_for(path)
        if rule is None:
            return None
        if rule.rule != "command":
            v = check_content(rule, data)
            return None if v.good else v.reason
        self.scratch.mkdir(parents=True, exist_ok=True)
        snap = self.scratch / f"guard-{secrets.token_hex(6)}-{path.rpartition('/')[2]}"
        try:
            snap.write_bytes(data)
            v = run_command_rule(rule, str(snap))
        finally:
            try:
                os.unlink(snap)
            except FileNotFoundError:
                pass
        return None if v.good else v.reason


def content_check(guards: Sequence[GuardRule], scratch: Path) -> GuardCheck | None:
    return GuardCheck(guards, scratch) if guards else None


def sender_check(cfg: Config) -> GuardCheck | None:
    s = cfg.need_sender()
    return content_check(cfg.guards, s.state_dir / "guard-scratch")


def receiver_check(cfg: Config) -> GuardCheck | None:
    r = cfg.need_receiver()
    return content_check(cfg.guards, r.state_dir / "guard-scratch")


def run_command_rule(rule: GuardRule, path: str) -> Verdict:
    """Run the validator of a ``command`` rule on the file at OS path ``path``; exit status 0 is good.

    ``{path}`` in any argv item is replaced by ``path``. No shell is involved. The validator gets no stdin;
    its output is captured and the first line of its stderr is quoted in the reason on failure.

    RACE: the validator opens the file itself. Pass the path of a private snapshot of the bytes about to be
    shipped, not the live file, or the validator and the sender may see different contents.
    """
    argv = command_argv(rule, path)
    try:
        proc = subprocess.run(
            argv, timeout=rule.timeout, capture_output=True, stdin=subprocess.DEVNULL, check=False
        )
    except subprocess.TimeoutExpired:
        return Verdict(False, f"validator timed out after {rule.timeout:g} s")
    except FileNotFoundError:
        return Verdict(False, f"validator not found: {argv[0]}")
    except PermissionError:
        return Verdict(False, f"validator not executable: {argv[0]}")
    except OSError as e:
        return Verdict(False, f"validator could not start: {argv[0]}: {e.strerror or e}")
    return command_verdict(proc.returncode, proc.stderr)
