"""The offline Windows bundle: ``packaging/bundle.py`` and the installer it ships, ``packaging/install.ps1``.

The bundle is built for real into tmp_path: pip builds standby's wheel and downloads the cp311 win_amd64
wheels from the package index (PyPI), with pip's cache in a pytest tmp folder (nothing is cached
elsewhere). If the index cannot be reached these tests skip with the reason, except under CI=true, where
they fail. The marker evaluation, the closure walk, the tag rule and pip's error lines are also tested
offline, on hand-made values.

install.ps1 is checked statically here (there is no PowerShell on the Linux test machines): balanced
braces, parentheses, brackets and quotes (outside comments and strings), a ``param(`` block, ASCII only, no
tabs, nothing that needs PowerShell 7, and that it verifies MANIFEST.txt and installs with --no-index. The
script itself is run only by the admin, on Windows.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tomllib
import types
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.tags import Tag
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

from tests.conftest import skip_or_fail

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / "packaging" / "bundle.py"
INSTALL_PS1 = ROOT / "packaging" / "install.ps1"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]

#: Distributions of the test and bench extras (and their usual companions) that must not be bundled.
DEV_ONLY = {"pytest", "pytest-asyncio", "pytest-timeout", "hypothesis", "ruff", "mypy", "matplotlib", "numpy"}


def _load_bundle() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("standby_bundle", BUNDLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


bundle = _load_bundle()


def _index_unreachable() -> str | None:
    """Why the package index cannot be reached, or None if it answers."""
    url = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple/")
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10):
            return None
    except (urllib.error.URLError, OSError) as exc:
        return f"the package index {url} is unreachable ({exc}); the bundle test downloads from it"


def need_index() -> None:
    reason = _index_unreachable()
    if reason is None:
        return
    skip_or_fail(reason, "CI=true: the runner must reach PyPI")


@pytest.fixture(scope="module")
def pip_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment for pip: its cache in a pytest tmp folder, shared by this module's builds."""
    return {**os.environ, "PIP_CACHE_DIR": str(tmp_path_factory.mktemp("pip-cache"))}


@dataclass(frozen=True)
class Built:
    zip_path: Path
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, pip_env: dict[str, str]) -> Built:
    need_index()
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, str(BUNDLE), "--out", str(out)],
        capture_output=True,
        text=True,
        env=pip_env,
        timeout=100,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return Built(zip_path=Path(proc.stdout.strip()), stdout=proc.stdout, stderr=proc.stderr)


def windows_tag(tag: Tag) -> bool:
    """win_amd64 for CPython 3.11 (cp311, or abi3 from an older cp3, or a py3 binary) or py3-none-any."""
    if tag.platform == "any":
        return tag.interpreter == "py3" and tag.abi == "none"
    if tag.platform != "win_amd64":
        return False
    if tag.abi == "abi3":
        return re.fullmatch(r"cp3\d+", tag.interpreter) is not None and int(tag.interpreter[3:]) <= 11
    return tag.interpreter in {"cp311", "py3"} and tag.abi in {"cp311", "none"}


def wheel_names(zf: zipfile.ZipFile) -> list[str]:
    return sorted(n for n in zf.namelist() if n.endswith(".whl"))


# --- the real bundle (network) ----------------------------------------------------------------------


def test_the_zip_holds_standby_pywin32_and_only_windows_wheels(built: Built) -> None:
    version = PROJECT["version"]
    assert built.zip_path.name == f"standby-offline-{version}-win_amd64.zip"
    assert built.zip_path.is_file(), built.stdout
    assert built.stdout.splitlines() == [str(built.zip_path)], "stdout is the zip's path and nothing else"
    with zipfile.ZipFile(built.zip_path) as zf:
        assert zf.testzip() is None
        names = wheel_names(zf)
        assert all("/" not in n for n in zf.namelist()), "the zip is flat: install.ps1 sits by the wheels"
        assert {"install.ps1", "MANIFEST.txt"} <= set(zf.namelist())
        shipped_script = zf.read("install.ps1")
    parsed = {n: parse_wheel_filename(n) for n in names}
    bad = [n for n, (_, _, _, tags) in parsed.items() if not any(windows_tag(t) for t in tags)]
    assert not bad, f"wheels that do not install on cp311 win_amd64: {bad}"
    dists = {name: v for name, v, _, _ in parsed.values()}
    assert dists.get(canonicalize_name("standby")) == Version(version)
    own = next(n for n in names if n.startswith("standby-"))
    assert own.endswith("-py3-none-any.whl"), own
    assert "pywin32" in dists, names
    for dep in PROJECT["dependencies"]:
        assert canonicalize_name(Requirement(dep).name) in dists, f"{dep} is not bundled"
    assert not DEV_ONLY & set(dists), "the test and bench extras are not bundled"
    source = INSTALL_PS1.read_text("ascii").replace("\r\n", "\n")
    assert shipped_script == source.replace("\n", "\r\n").encode("ascii"), "install.ps1 ships with CRLF"


def test_the_manifest_lists_every_wheel_with_its_sha256(built: Built) -> None:
    with zipfile.ZipFile(built.zip_path) as zf:
        manifest = zf.read("MANIFEST.txt").decode("ascii")
        header: dict[str, str] = {}
        for line in manifest.splitlines():
            if match := re.fullmatch(r"# (\w+): (\S+)", line):
                header[match[1]] = match[2]
        assert header == {
            "name": "standby",
            "version": PROJECT["version"],
            "python": "3.11",
            "platform": "win_amd64",
        }
        listed: dict[str, str] = {}
        for line in manifest.splitlines():
            if line.startswith("#"):
                continue
            digest, name = line.split("  ")
            assert re.fullmatch(r"[0-9a-f]{64}", digest), line
            listed[name] = digest
        assert sorted(listed) == wheel_names(zf), "every wheel in the zip, and only those, is listed"
        for name, digest in listed.items():
            assert hashlib.sha256(zf.read(name)).hexdigest() == digest, name


def test_a_dependency_without_a_windows_wheel_is_one_line_and_exit_1(
    tmp_path: Path,
    pip_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A project needing uvloop (no Windows wheels): the build stops with one line naming it."""
    need_index()
    project = tmp_path / "proj"
    (project / "fakeproj").mkdir(parents=True)
    (project / "fakeproj" / "__init__.py").write_text("")
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        '[project]\nname = "fakeproj"\nversion = "0.0.1"\nrequires-python = ">=3.11"\n'
        'dependencies = ["uvloop>=0.19"]\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["fakeproj"]\n'
    )
    monkeypatch.setattr(bundle, "PROJECT_ROOT", project)
    monkeypatch.setenv("PIP_CACHE_DIR", pip_env["PIP_CACHE_DIR"])
    assert bundle.main(["--out", str(tmp_path / "dist")]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("bundle: error: "), err
    assert "no wheel of uvloop" in errors[0] and "cp311-win_amd64" in errors[0], errors[0]
    assert "no [windows] extra: added pywin32>=306 explicitly" in err, "the fallback is said"
    assert not list((tmp_path / "dist").iterdir()), "no zip, no partial zip"


# --- the pure parts (offline) -----------------------------------------------------------------------

WIN311 = bundle.Target(python_version=(3, 11), platform="win_amd64")


def _project(deps: tuple[str, ...], windows: tuple[str, ...] | None) -> Any:
    return bundle.Project(
        name="standby", version="1.2.3", requires_python=">=3.11", dependencies=deps, windows_extra=windows
    )


def test_markers_are_evaluated_for_windows_not_for_this_machine() -> None:
    plan = bundle.plan_requirements(
        _project(("bar>=1", "foo; sys_platform == 'linux'"), ("pywin32>=306; sys_platform == 'win32'",)),
        WIN311,
    )
    assert [str(r) for r in plan.requirements] == ["bar>=1", "pywin32>=306"]
    assert [str(r) for r in plan.roots] == ["standby[windows]==1.2.3"]
    assert any("skipped foo" in note for note in plan.notes), plan.notes


def test_pywin32_is_added_and_said_when_the_windows_extra_is_missing() -> None:
    plan = bundle.plan_requirements(_project(("bar",), None), WIN311)
    assert [str(r) for r in plan.requirements] == ["bar", "pywin32>=306"]
    assert [str(r) for r in plan.roots] == ["standby==1.2.3", "pywin32>=306"]
    assert plan.notes == ("pyproject.toml has no [windows] extra: added pywin32>=306 explicitly",)


def test_a_target_python_the_project_does_not_support_is_refused() -> None:
    with pytest.raises(bundle.BundleError, match=re.escape("requires Python >=3.11")):
        bundle.plan_requirements(
            _project((), ()), bundle.Target(python_version=(3, 10), platform="win_amd64")
        )


def _wheel(filename: str, *requires: str) -> Any:
    name, version, _, tags = parse_wheel_filename(filename)
    return bundle.Wheel(
        path=Path(filename),
        name=name,
        version=version,
        tags=frozenset(tags),
        requires=tuple(Requirement(r) for r in requires),
    )


def test_the_closure_follows_the_targets_markers_and_extras() -> None:
    wheels = {
        w.name: w
        for w in [
            _wheel(
                "standby-1.2.3-py3-none-any.whl",
                "a>=1",
                "pywin32>=306; sys_platform == 'win32' and extra == 'windows'",
                "uvloop; sys_platform != 'win32'",
                "pytest; extra == 'test'",
            ),
            _wheel("a-1.0-py3-none-any.whl", "colorama; platform_system == 'Windows'"),
            _wheel("uvloop-0.21-cp311-cp311-manylinux_2_17_x86_64.whl"),
        ]
    }
    needed, missing = bundle.walk_closure([Requirement("standby[windows]==1.2.3")], wheels, WIN311)
    assert needed == {"standby", "a"}, "uvloop is only what this Linux machine would need"
    assert sorted(str(r) for r in missing) == ["colorama", "pywin32>=306"], "pip skipped these on Linux"
    with pytest.raises(bundle.BundleError, match="does not satisfy a>=2"):
        bundle.walk_closure([Requirement("a>=2")], wheels, WIN311)


@pytest.mark.parametrize(
    ("filename", "ok"),
    [
        ("cryptography-50.0-cp311-abi3-win_amd64.whl", True),
        ("psutil-7.2-cp37-abi3-win_amd64.whl", True),
        ("watchdog-7.1-py3-none-win_amd64.whl", True),
        ("rich-15.0-py3-none-any.whl", True),
        ("six-1.17-py2.py3-none-any.whl", True),
        ("xxhash-4.1-cp312-cp312-win_amd64.whl", False),
        ("xxhash-4.1-cp311-cp311-win32.whl", False),
        ("xxhash-4.1-cp311-cp311-manylinux_2_17_x86_64.whl", False),
    ],
)
def test_only_wheels_the_target_installs_pass(filename: str, ok: bool) -> None:
    wheel = _wheel(filename)
    if ok:
        bundle.check_installable(wheel, WIN311)
        assert any(windows_tag(t) for t in wheel.tags)
    else:
        with pytest.raises(bundle.BundleError, match="no wheel tag for cp311-win_amd64"):
            bundle.check_installable(wheel, WIN311)


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (
            "Collecting uvloop\nERROR: Could not find a version that satisfies the requirement uvloop>=0.19"
            " (from versions: none)\nERROR: No matching distribution found for uvloop>=0.19\n",
            "downloading: no wheel of uvloop>=0.19 for cp311-win_amd64 (nor py3-none-any)",
        ),
        (
            "WARNING: Retrying (Retry(total=4, connect=None)) after connection broken by 'NewConnectionError("
            "\"HTTPSConnection(host='pypi.org', port=443): Failed to establish a new connection:"
            " [Errno 101] Network is unreachable\")': /simple/rich/\n"
            "ERROR: Could not find a version that satisfies the requirement rich>=13 (from versions: none)\n",
            "downloading: pip could not reach the package index"
            " (pypi.org: Failed to establish a new connection: [Errno 101] Network is unreachable)",
        ),
        ("/usr/bin/python3: No module named pip\n", "downloading failed (pip exit 1): /usr/bin/python3: No"),
    ],
)
def test_pip_failures_become_one_line(output: str, expected: str) -> None:
    message = str(bundle.pip_failure("downloading", output, 1, WIN311))
    assert message.startswith(expected), message
    assert "\n" not in message


def test_help_explains_the_bundle() -> None:
    proc = subprocess.run(
        [sys.executable, str(BUNDLE), "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stderr
    for word in ("--out", "--python-version", "--platform", "win_amd64", "install.ps1", "MANIFEST.txt"):
        assert word in proc.stdout, word


def test_a_bad_python_version_is_a_usage_error() -> None:
    proc = subprocess.run(
        [sys.executable, str(BUNDLE), "--out", "x", "--python-version", "311"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2 and "expected 3.N" in proc.stderr, proc.stderr


# --- install.ps1, statically ------------------------------------------------------------------------


def ps_problems(text: str) -> list[str]:
    """Unbalanced (), {}, [] or quotes in PowerShell source; comments and string contents are skipped.

    Follows PowerShell's lexing closely enough for one script: ``#`` and ``<# #>`` comments, '...' with
    '' inside, "..." with backtick escapes, "" inside and ``$( )`` subexpressions (which may hold strings
    of their own), and here-strings.
    """
    closers = {")": "(", "}": "{", "]": "["}
    stack: list[tuple[str, int]] = []  # opener ( { [ " $( and where it is

    def line(at: int) -> int:
        return text.count("\n", 0, at) + 1

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if stack and stack[-1][0] == '"':
            if c == "`" or text.startswith('""', i):
                i += 2
            elif c == '"':
                stack.pop()
                i += 1
            elif text.startswith("$(", i):
                stack.append(("$(", i))
                i += 2
            else:
                i += 1
            continue
        if text.startswith("<#", i):
            end = text.find("#>", i + 2)
            if end < 0:
                return [f"line {line(i)}: <# comment never closed"]
            i = end + 2
        elif c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif text.startswith(("@'\n", '@"\n', "@'\r\n", '@"\r\n'), i):
            close = "\n" + text[i + 1] + "@"
            end = text.find(close, i + 2)
            if end < 0:
                return [f"line {line(i)}: here-string never closed"]
            i = end + len(close)
        elif c == "'":
            j = i + 1
            while (j := text.find("'", j)) >= 0 and text.startswith("''", j):
                j += 2
            if j < 0:
                return [f"line {line(i)}: ' never closed"]
            i = j + 1
        elif c == '"':
            stack.append(('"', i))
            i += 1
        elif c == "`":
            i += 2
        elif c in "({[":
            stack.append((c, i))
            i += 1
        elif c in closers:
            if not stack:
                return [f"line {line(i)}: {c} closes nothing"]
            opener, at = stack.pop()
            if opener != closers[c] and not (opener == "$(" and c == ")"):
                return [f"line {line(i)}: {c} closes {opener} from line {line(at)}"]
            i += 1
        else:
            i += 1
    return [f"line {line(at)}: {opener} never closed" for opener, at in stack]


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("if ($a) { Write-Host 'x' }\n# it's a comment\n", None),
        ('Write-Host "a $(Get-Item "b") c ""q"" `" d" # (\n', None),
        ("<# don't ( #>\n$h = @{ a = '(' + 'it''s' }\n$s = @'\n(\"\n'@\n", None),
        ("if ($a) {\n  Write-Host 'x'\n", "line 1: { never closed"),
        ("Write-Host 'it''s\n", "line 1: ' never closed"),
        ('Write-Host "a $(Get-Item "b") c\n', 'line 1: " never closed'),
        ("$a = (1, 2]\n", "line 1: ] closes ( from line 1"),
        ("}\n", "line 1: } closes nothing"),
    ],
)
def test_the_static_checker_finds_what_it_should(source: str, problem: str | None) -> None:
    assert ps_problems(source) == ([] if problem is None else [problem])


@pytest.fixture(scope="module")
def ps1() -> str:
    raw = INSTALL_PS1.read_bytes()
    assert all(b < 128 for b in raw), "ASCII only: PowerShell 5.1 reads a file without a BOM as ANSI"
    return raw.decode("ascii")


def test_install_ps1_is_balanced_ascii_without_tabs(ps1: str) -> None:
    assert "\t" not in ps1
    assert ps_problems(ps1) == []


def test_install_ps1_declares_its_parameters_and_strict_mode(ps1: str) -> None:
    code = re.sub(r"<#.*?#>", "", ps1, flags=re.S)
    first = [ln.strip() for ln in code.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert first[:2] == ["[CmdletBinding()]", "param("], "param( comes first, after the help"
    params = code[code.index("param(") : code.index("\n)\n")]
    for param in (
        r"\[string\]\$Target = 'C:\\Program Files\\standby'",
        r"\[string\]\$Config",
        r"\[string\]\$Python",
    ):
        assert re.search(param, params), param
    assert "Set-StrictMode -Version Latest" in code
    assert "$ErrorActionPreference = 'Stop'" in code


def test_install_ps1_verifies_the_manifest_then_installs_offline(ps1: str) -> None:
    code = "\n".join(ln for ln in ps1.splitlines() if not ln.lstrip().startswith("#"))
    for needle in (
        "MANIFEST.txt",
        "Get-FileHash",
        "'--no-index'",
        "'--find-links', $Bundle",
        "[windows]==$Version",
        "pywin32_postinstall.py",
        "'-install'",
        "'service', 'install', '--config', $ConfigPath",
        "'-m', 'venv', $Target",
        "py",
    ):
        assert needle in code, needle
    assert code.index("Get-FileHash") < code.index("'--no-index'"), "the hashes are checked before pip runs"


def test_install_ps1_needs_nothing_newer_than_powershell_5_1(ps1: str) -> None:
    code = "\n".join(ln for ln in ps1.splitlines() if not ln.lstrip().startswith("#"))
    for pwsh7 in ("&&", "||", "??", "?.", "-Parallel", "#requires -version 7"):
        assert pwsh7 not in code, pwsh7
    # "$name: " in a double-quoted string is read as a drive-qualified variable: a parse error.
    assert not re.findall(r"\$\w+:\s", code)
