"""Turns the configured guards into the content checks the sender and receiver call.

Command rules need a file to look at: the exact bytes about to be shipped or applied are written to a
private snapshot in the state folder and the validator is run on that, never on the live file.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path

from engine.config import Config
from engine.guard import GuardRule, check_content, find_guard, run_command_rule

ContentCheck = Callable[[str, bytes], str | None]


def content_check(guards: Sequence[GuardRule], scratch: Path) -> ContentCheck | None:
    if not guards:
        return None

    def check(path: str, data: bytes) -> str | None:
        rule = find_guard(guards, path)
        if rule is None:
            return None
        if rule.rule != "command":
            v = check_content(rule, data)
            return None if v.good else v.reason
        scratch.mkdir(parents=True, exist_ok=True)
        snap = scratch / f"guard-{secrets.token_hex(6)}-{path.rpartition('/')[2]}"
        try:
            snap.write_bytes(data)
            v = run_command_rule(rule, str(snap))
        finally:
            try:
                os.unlink(snap)
            except FileNotFoundError:
                pass
        return None if v.good else v.reason

    return check


def sender_check(cfg: Config) -> ContentCheck | None:
    s = cfg.need_sender()
    return content_check(cfg.guards, s.state_dir / "guard-scratch")


def receiver_check(cfg: Config) -> ContentCheck | None:
    r = cfg.need_receiver()
    return content_check(cfg.guards, r.state_dir / "guard-scratch")
