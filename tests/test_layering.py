"""Imports point downward, and pure modules do no I/O: no I/O module of ours, no asyncio, no clock, no
file or process calls (a pure module that opens a file, stats a path or runs a process fails here)."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "engine"

PURE = {
    "errors",
    "model",
    "digest",
    "codec",
    "wire",
    "plan",
    "guard",
    "config",
    "tracker",
    "failover",
    "clocks",
    "service.winsvc",
}
IO = {
    "identity",
    "scan",
    "watch",
    "journal",
    "apply",
    "sender",
    "sender.intake",
    "sender.link",
    "sender.reconcile",
    "receiver",
    "transport",
    "observer",
    "history",
    "status",
    "replay",
    "recovery",
    "checkpoint",
    "guards",
    "aio",
    "logs",
    "simulator",
    "statelock",
    "rolestate",
    "quarantine",
    "upgrade",
    "metrics",
    "witness",
    "peer",
    "service",
    "service.scm",
    "service.systemd",
    "service.command",
    "service.windows",
    "targets",
    "targets.local",
    "targets.smb",
}
EDGE = {"cli", "demo", "demo_ha", "demoservice", "node", "switching", "winservice", "__main__"}
#: Pure modules may use these standard modules; nothing that reads the clock or does I/O by itself.
FORBIDDEN_IN_PURE = {
    "asyncio",
    "socket",
    "time",
    "subprocess",
    "shutil",
    "threading",
    "watchdog",
    "aiofiles",
    "smbprotocol",
}
#: Calls that do file or process I/O: the builtin ``open``, these functions of ``os``, and these methods
#: (pathlib's I/O, whatever object they are called on).
IO_BUILTINS = {"open", "input", "print", "exec", "eval"}
IO_OS = {
    "stat", "lstat", "open", "read", "write", "close", "listdir", "scandir", "walk", "remove", "unlink",
    "rename", "replace", "mkdir", "makedirs", "rmdir", "fsync", "utime", "chmod", "fdopen", "system",
    "popen", "kill", "getcwd", "chdir", "environ", "getenv",
}  # fmt: skip
IO_METHODS = {
    "read_text",
    "read_bytes",
    "write_text",
    "write_bytes",
    "mkdir",
    "iterdir",
    "unlink",
    "rmdir",
    "touch",
    "lstat",
    "exists",
    "is_dir",
    "is_file",
    "is_symlink",
    "glob",
    "rglob",
    "resolve",
    "samefile",
    "rename",
    "symlink_to",
    "chmod",
}  # fmt: skip (not "replace": str.replace is pure; os.replace is caught above)
#: The one place a pure module may touch the disk: config's one TOML load and its state-folder check.
ALLOWED_IO = {"config": {"load", "read_config_text", "check_state_dir"}}


def module_files() -> dict[str, Path]:
    """Every module of the engine package, by dotted name below ``engine`` (packages' ``__init__`` as the
    package's own name)."""
    out: dict[str, Path] = {}
    for p in ENGINE.rglob("*.py"):
        rel = p.relative_to(ENGINE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            out[".".join(parts)] = p
    return out


def imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def ours(mods: set[str]) -> set[str]:
    """Our modules among ``mods``, by dotted name below ``engine``."""
    return {m.removeprefix("engine.") for m in mods if m.startswith("engine.")}


def layer(name: str) -> str:
    for n in (name, name.split(".")[0]):
        if n in PURE:
            return "pure"
        if n in IO:
            return "io"
        if n in EDGE:
            return "edge"
    return ""


def io_calls(path: Path, allowed: set[str]) -> list[str]:
    """``file:line call`` for every file or process call outside the functions in ``allowed``."""
    tree = ast.parse(path.read_text("utf-8"))
    found: list[str] = []

    def visit(node: ast.AST, inside: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            inside = inside or node.name
        if isinstance(node, ast.Call) and inside not in allowed:
            f = node.func
            if isinstance(f, ast.Name) and f.id in IO_BUILTINS:
                found.append(f"{path.name}:{node.lineno} {f.id}()")
            elif isinstance(f, ast.Attribute):
                owner = f.value.id if isinstance(f.value, ast.Name) else ""
                if (owner == "os" and f.attr in IO_OS) or (owner != "os" and f.attr in IO_METHODS):
                    found.append(f"{path.name}:{node.lineno} {owner or '...'}.{f.attr}()")
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
            and node.attr == "environ"
            and inside not in allowed
        ):
            found.append(f"{path.name}:{node.lineno} os.environ")
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(tree, "")
    return found


def test_every_module_has_a_layer() -> None:
    unplaced = {name for name in module_files() if not layer(name)}
    assert not unplaced, f"unplaced modules: {unplaced}"


def test_pure_modules_import_only_pure_modules_and_do_no_io() -> None:
    files = module_files()
    for name in PURE:
        mods = imports(files[name])
        bad_ours = {m for m in ours(mods) if layer(m) != "pure"}
        assert not bad_ours, f"engine/{name} imports I/O modules {bad_ours}"
        bad = {m.split(".")[0] for m in mods} & FORBIDDEN_IN_PURE
        assert not bad, f"engine/{name} imports {bad}"
        calls = io_calls(files[name], ALLOWED_IO.get(name, set()))
        assert not calls, f"engine/{name} does file or process I/O: {calls}"


def test_the_io_check_finds_io() -> None:
    """The check above can fail: a pure-looking module that opens a file or runs a process is caught."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.py"
        p.write_text(
            "import os, subprocess\nfrom pathlib import Path\n"
            "def f(x):\n    return open(x).read() + Path(x).read_text() + str(os.stat(x))\n"
            "def g():\n    subprocess.run(['true'])\n    return os.environ['X']\n",
            "utf-8",
        )
        calls = io_calls(p, set())
        mods = imports(p)
    assert any("open()" in c for c in calls) and any("read_text" in c for c in calls), calls
    assert any("os.stat" in c for c in calls) and any("os.environ" in c for c in calls), calls
    assert {"subprocess"} <= {m.split(".")[0] for m in mods} & FORBIDDEN_IN_PURE


def test_nothing_imports_the_edge() -> None:
    for name, p in module_files().items():
        if layer(name) == "edge":
            continue
        bad = {m for m in ours(imports(p)) if layer(m) == "edge"}
        assert not bad, f"engine/{name} imports {bad}"


def test_the_sender_parts_share_nothing_but_what_the_node_hands_them() -> None:
    """intake, link and reconcile: the link and the intake never import each other; the reconciler
    reaches both only through the objects the node gives it."""
    files = module_files()
    assert "sender.link" not in ours(imports(files["sender.intake"]))
    assert "sender.intake" not in ours(imports(files["sender.link"]))


def test_one_importer_each_for_third_party_libraries() -> None:
    files = module_files()
    for lib, owner in (
        ("watchdog", "watch"),
        ("xxhash", "digest"),
        ("filelock", "statelock"),
        ("prometheus_client", "metrics"),
        ("aetcd", "witness"),
        ("grpc", "witness"),
        ("win32service", "service.windows"),
    ):
        users = {n for n, p in files.items() if any(m.split(".")[0] == lib for m in imports(p))}
        # Creating and deleting a service (standby's own registration) is winservice's; controlling the
        # protected service is service.windows'.
        allowed = {owner, "winservice"} if lib == "win32service" else {owner}
        assert users <= allowed and owner in users, f"{lib} is imported by {users}"
