"""Imports point downward: pure modules import no I/O module of ours, no asyncio and no clock."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "engine"

PURE = {"errors", "model", "digest", "codec", "wire", "plan", "guard", "config", "tracker", "identity"}
IO = {
    "scan",
    "watch",
    "journal",
    "apply",
    "sender",
    "receiver",
    "transport",
    "observer",
    "history",
    "status",
    "replay",
    "guards",
    "aio",
    "logs",
    "simulator",
    "statelock",
}
EDGE = {"cli", "demo", "node", "__main__"}
#: Pure modules may use these standard modules; nothing that reads the clock or does I/O by itself.
FORBIDDEN_IN_PURE = {"asyncio", "socket", "time", "subprocess", "watchdog", "aiofiles", "smbprotocol"}


def imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_every_module_has_a_layer() -> None:
    names = {p.stem for p in ENGINE.glob("*.py")} - {"__init__"}
    assert names <= PURE | IO | EDGE, f"unplaced modules: {names - PURE - IO - EDGE}"


def test_pure_modules_import_only_pure_modules() -> None:
    for name in PURE:
        mods = imports(ENGINE / f"{name}.py")
        ours = {m.split(".")[1] for m in mods if m.startswith("engine.")}
        assert ours <= PURE, f"engine/{name}.py imports I/O modules {ours - PURE}"
        # guard.py runs a validator process in one clearly separated function; identity writes key files.
        allowed = {"guard": {"subprocess"}, "identity": set(), "config": set()}.get(name, set())
        bad = {m.split(".")[0] for m in mods} & (FORBIDDEN_IN_PURE - allowed)
        assert not bad, f"engine/{name}.py imports {bad}"


def test_nothing_imports_the_edge() -> None:
    for p in ENGINE.glob("*.py"):
        if p.stem in EDGE:
            continue
        ours = {m.split(".")[1] for m in imports(p) if m.startswith("engine.")}
        assert not ours & EDGE, f"{p.name} imports {ours & EDGE}"


def test_one_importer_each_for_watchdog_and_xxhash() -> None:
    for lib, owner in (("watchdog", "watch"), ("xxhash", "digest"), ("filelock", "statelock")):
        users = {p.stem for p in ENGINE.glob("*.py") if any(m.split(".")[0] == lib for m in imports(p))}
        assert users == {owner}, f"{lib} is imported by {users}"
