"""Turns the configured guards into the content checks the sender and receiver call.

Command rules need a file to look at: the exact bytes about to be shipped or applied are written to a
private snapshot in the state folder and the validator is run on that, never on the live file.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from engine.config import Config
from engine.guard import GuardRule, check_content, compile_pattern, run_command_rule

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
