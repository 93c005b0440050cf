#!/usr/bin/env python3
"""Build the offline install bundle of standby for a Windows server without internet.

Owns: turning this checkout into one zip, ``standby-offline-<version>-<platform>.zip``, that holds
standby's own wheel, the wheels of its runtime dependencies with the ``windows`` extra for one target
(a CPython version and a Windows platform), ``install.ps1`` and ``MANIFEST.txt`` (every wheel and its
sha256, which the installer checks before it installs anything).
Must not: install anything, write into the checkout (pip builds from it; the staging folder is temporary),
or bundle the ``test`` and ``bench`` extras.

pip evaluates environment markers on the machine it runs on, not for the ``--platform`` it downloads for
(``pywin32; sys_platform == 'win32'`` is skipped on Linux). So the markers of the top-level requirements
are evaluated here for the target, and after the download the dependency closure is walked again from the
wheels' own metadata with the target's markers: a requirement pip skipped is added and the download runs
again into a fresh folder (so pip resolves everything together); a wheel only the build machine needed is
left out.

Errors are one line on stderr and exit 1; the zip's path is the only line on stdout.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

try:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.tags import Tag, compatible_tags, cpython_tags
    from packaging.utils import (
        InvalidWheelFilename,
        NormalizedName,
        canonicalize_name,
        parse_wheel_filename,
    )
    from packaging.version import Version
except ImportError:  # pragma: no cover - depends on the interpreter running the script
    sys.exit("bundle: error: this script needs the 'packaging' library: python -m pip install packaging")

HERE = Path(__file__).resolve().parent
PROJECT_ROOT = HERE.parent
INSTALL_SCRIPT = HERE / "install.ps1"
MANIFEST_NAME = "MANIFEST.txt"

#: ``platform_machine`` and ``sysconfig.get_platform()`` on each Windows wheel platform.
WINDOWS_PLATFORMS = {"win_amd64": "AMD64", "win_arm64": "ARM64", "win32": "x86"}

#: Added when pyproject.toml's ``windows`` extra does not name pywin32 (engine.service.windows needs it).
PYWIN32_FALLBACK = "pywin32>=306"

#: Download rounds before giving up on a closure that keeps finding requirements pip skipped.
MAX_ROUNDS = 4

#: pip's signs of an unreachable index, the most telling first; the match is the reason shown.
_NETWORK = (
    re.compile(r"Failed to establish a new connection: [^\"')]*"),
    re.compile(r"Temporary failure in name resolution|Name or service not known|getaddrinfo failed"),
    re.compile(r"Network is unreachable|Connection refused|Read timed out|timed out"),
    re.compile(r"NewConnectionError|ConnectTimeoutError|ProxyError|SSLError|Max retries exceeded"),
)
_HOST = re.compile(r"host='([^']+)'")
_NO_VERSION = re.compile(r"Could not find a version that satisfies the requirement (?P<req>\S+)")
_NO_MATCH = re.compile(r"No matching distribution found for (?P<req>\S+)")


class BundleError(Exception):
    """Why the bundle cannot be built: one line, printed as ``bundle: error: ...``."""


@dataclass(frozen=True)
class Target:
    """The interpreter and platform the wheels are for, e.g. CPython 3.11 on win_amd64."""

    python_version: tuple[int, int]
    platform: str

    @property
    def version_text(self) -> str:
        return f"{self.python_version[0]}.{self.python_version[1]}"

    @property
    def interpreter(self) -> str:
        return f"cp{self.python_version[0]}{self.python_version[1]}"

    def __str__(self) -> str:
        return f"{self.interpreter}-{self.platform}"

    def markers(self, extra: str = "") -> dict[str, str]:
        """The marker environment of the target (the patch level is unknown: ``.0`` stands for it)."""
        return {
            "implementation_name": "cpython",
            "implementation_version": f"{self.version_text}.0",
            "os_name": "nt",
            "platform_machine": WINDOWS_PLATFORMS[self.platform],
            "platform_python_implementation": "CPython",
            "platform_release": "",
            "platform_system": "Windows",
            "platform_version": "",
            "python_full_version": f"{self.version_text}.0",
            "python_version": self.version_text,
            "sys_platform": "win32",
            "extra": extra,
        }

    def tags(self) -> frozenset[Tag]:
        """Every wheel tag pip on the target accepts (cp311, abi3, none; py3 and any)."""
        found = set(cpython_tags(self.python_version, platforms=[self.platform]))
        found.update(compatible_tags(self.python_version, self.interpreter, [self.platform]))
        return frozenset(found)

    def pip_args(self) -> list[str]:
        return [
            "--platform",
            self.platform,
            "--python-version",
            self.version_text,
            "--implementation",
            "cp",
            "--only-binary=:all:",
        ]


@dataclass(frozen=True)
class Project:
    """What pyproject.toml says about the distribution we bundle."""

    name: str
    version: str
    requires_python: str
    dependencies: tuple[str, ...]
    windows_extra: tuple[str, ...] | None


@dataclass(frozen=True)
class Wheel:
    path: Path
    name: NormalizedName
    version: Version
    tags: frozenset[Tag]
    requires: tuple[Requirement, ...]


@dataclass(frozen=True)
class Plan:
    """What pip downloads (markers already evaluated for the target), the roots of the closure, notes."""

    requirements: tuple[Requirement, ...]
    roots: tuple[Requirement, ...]
    notes: tuple[str, ...]


def read_project(pyproject: Path) -> Project:
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BundleError(f"cannot read {pyproject}: {exc}") from None
    project = data.get("project")
    if not isinstance(project, dict):
        raise BundleError(f"{pyproject}: no [project] table")
    name, version = project.get("name"), project.get("version")
    if not isinstance(name, str) or not isinstance(version, str):
        raise BundleError(f"{pyproject}: project -> name and project -> version must be plain strings")
    deps = project.get("dependencies", [])
    extras = project.get("optional-dependencies", {})
    windows = extras.get("windows") if isinstance(extras, dict) else None
    if not _is_str_list(deps):
        raise BundleError(f"{pyproject}: project -> dependencies must be a list of strings")
    if windows is not None and not _is_str_list(windows):
        raise BundleError(f"{pyproject}: project -> optional-dependencies -> windows must list strings")
    requires_python = project.get("requires-python", "")
    return Project(
        name=name,
        version=version,
        requires_python=requires_python if isinstance(requires_python, str) else "",
        dependencies=tuple(deps),
        windows_extra=None if windows is None else tuple(windows),
    )


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _parse(text: str, where: str) -> Requirement:
    try:
        return Requirement(text)
    except InvalidRequirement as exc:
        raise BundleError(f"{where}: invalid requirement {text!r}: {exc}") from None


def _without_marker(req: Requirement) -> Requirement:
    plain = Requirement(str(req))
    plain.marker = None
    return plain


def plan_requirements(project: Project, target: Target) -> Plan:
    """The dependencies and the ``windows`` extra, with their markers evaluated for the target."""
    if project.requires_python and not SpecifierSet(project.requires_python).contains(target.version_text):
        raise BundleError(f"{project.name} requires Python {project.requires_python}, the target is {target}")
    notes: list[str] = []
    wanted: list[Requirement] = []
    env = target.markers()
    for text in (*project.dependencies, *(project.windows_extra or ())):
        req = _parse(text, "pyproject.toml")
        if req.marker is not None and not req.marker.evaluate(env):
            notes.append(f"skipped {req}: its marker is false on {target}")
            continue
        wanted.append(_without_marker(req))
    root = Requirement(f"{project.name}=={project.version}")
    added: list[Requirement] = []
    if not any(canonicalize_name(r.name) == "pywin32" for r in wanted):
        added.append(Requirement(PYWIN32_FALLBACK))
        if project.windows_extra is None:
            notes.append(f"pyproject.toml has no [windows] extra: added {PYWIN32_FALLBACK} explicitly")
        else:
            notes.append(f"the [windows] extra does not name pywin32: added {PYWIN32_FALLBACK} explicitly")
    if project.windows_extra is not None:
        root.extras = {"windows"}
    return Plan(requirements=(*wanted, *added), roots=(root, *added), notes=tuple(notes))


def read_wheel(path: Path) -> Wheel:
    try:
        name, version, _build, tags = parse_wheel_filename(path.name)
    except InvalidWheelFilename as exc:
        raise BundleError(f"{path.name}: not a wheel file name: {exc}") from None
    try:
        with zipfile.ZipFile(path) as zf:
            metadata = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
            if len(metadata) != 1:
                raise BundleError(f"{path.name}: expected one .dist-info/METADATA, found {len(metadata)}")
            raw = zf.read(metadata[0])
    except (OSError, zipfile.BadZipFile) as exc:
        raise BundleError(f"{path.name}: unreadable wheel: {exc}") from None
    headers = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(raw, headersonly=True)
    requires = tuple(_parse(text, path.name) for text in headers.get_all("Requires-Dist") or [])
    return Wheel(path=path, name=name, version=version, tags=frozenset(tags), requires=requires)


def index_wheels(paths: Iterable[Path]) -> dict[NormalizedName, Wheel]:
    found: dict[NormalizedName, Wheel] = {}
    for path in sorted(paths):
        wheel = read_wheel(path)
        if wheel.name in found:
            raise BundleError(f"two wheels of {wheel.name}: {found[wheel.name].path.name} and {path.name}")
        found[wheel.name] = wheel
    return found


def walk_closure(
    roots: Iterable[Requirement], wheels: Mapping[NormalizedName, Wheel], target: Target
) -> tuple[set[NormalizedName], list[Requirement]]:
    """The distributions the target needs, and the requirements no wheel here provides.

    Pure: Requires-Dist markers are evaluated with the target's environment and each requested extra.
    """
    needed: set[NormalizedName] = set()
    missing: dict[NormalizedName, Requirement] = {}
    expanded: set[tuple[NormalizedName, str]] = set()
    todo = list(roots)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        wheel = wheels.get(name)
        if wheel is None:
            missing.setdefault(name, _without_marker(req))
            continue
        if not req.specifier.contains(wheel.version, prereleases=True):
            raise BundleError(f"{wheel.path.name} does not satisfy {req} (pip resolved on this machine)")
        needed.add(name)
        for extra in ("", *sorted(req.extras)):
            if (name, extra) in expanded:
                continue
            expanded.add((name, extra))
            env = target.markers(extra)
            todo.extend(dep for dep in wheel.requires if dep.marker is None or dep.marker.evaluate(env))
    return needed, list(missing.values())


def check_installable(wheel: Wheel, target: Target) -> None:
    if not wheel.tags & target.tags():
        tags = ", ".join(sorted(str(t) for t in wheel.tags))
        raise BundleError(f"{wheel.path.name} has no wheel tag for {target} or py3-none-any (tags: {tags})")


def pip_failure(what: str, output: str, returncode: int, target: Target) -> BundleError:
    """One line saying why pip failed, from its output."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    network = next((m for pattern in _NETWORK if (m := pattern.search(output))), None)
    if network is not None:
        host = _HOST.search(output)
        where = f"{host[1]}: " if host else ""
        reason = _clip(network[0].strip())
        return BundleError(f"{what}: pip could not reach the package index ({where}{reason})")
    missing = _NO_VERSION.search(output) or _NO_MATCH.search(output)
    if missing is not None:
        return BundleError(
            f"{what}: no wheel of {missing['req']} for {target} (nor py3-none-any) on the index;"
            " the target cannot install it without a compiler"
        )
    errors = [line for line in lines if line.startswith("ERROR:")]
    detail = errors[-1] if errors else (lines[-1] if lines else "no output")
    return BundleError(f"{what} failed (pip exit {returncode}): {_clip(detail)}")


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_pip(args: Sequence[str], what: str, target: Target, verbose: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args]
    if verbose:
        say("run: " + " ".join(cmd))
    try:
        proc = subprocess.run(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            check=False,
        )
    except OSError as exc:
        raise BundleError(f"{what}: cannot run pip: {exc}") from None
    if verbose:
        sys.stderr.write(proc.stdout)
    if proc.returncode != 0:
        raise pip_failure(what, proc.stdout, proc.returncode, target)


def build_own_wheel(project: Project, dest: Path, target: Target, verbose: bool) -> Wheel:
    say(f"building the wheel of {project.name} {project.version}")
    run_pip(
        ["wheel", str(PROJECT_ROOT), "--no-deps", "--wheel-dir", str(dest), "--progress-bar", "off"],
        f"building the {project.name} wheel",
        target,
        verbose,
    )
    wheels = list(index_wheels(dest.glob("*.whl")).values())
    if len(wheels) != 1:
        raise BundleError(f"pip wheel wrote {len(wheels)} wheels into {dest}, expected one")
    own = wheels[0]
    if own.name != canonicalize_name(project.name) or own.version != Version(project.version):
        raise BundleError(f"pip wheel built {own.path.name}, expected {project.name} {project.version}")
    if Tag("py3", "none", "any") not in own.tags:
        raise BundleError(f"{own.path.name} is not a pure Python py3-none-any wheel")
    return own


def download_closure(plan: Plan, own: Wheel, work: Path, target: Target, verbose: bool) -> list[Wheel]:
    """Download until the target's closure is complete; the wheels it needs, standby's own first."""
    requirements = list(plan.requirements)
    for round_no in range(1, MAX_ROUNDS + 1):
        dest = work / f"deps-{round_no}"
        say(f"downloading for {target}: " + ", ".join(str(r) for r in requirements))
        run_pip(
            ["download", "--dest", str(dest), "--progress-bar", "off", *target.pip_args()]
            + [str(r) for r in requirements],
            "downloading the dependencies",
            target,
            verbose,
        )
        wheels = index_wheels(dest.glob("*.whl"))
        wheels.pop(own.name, None)
        wheels[own.name] = own
        needed, missing = walk_closure(plan.roots, wheels, target)
        if not missing:
            for name in sorted(set(wheels) - needed):
                say(f"left out {wheels[name].path.name}: not required on {target}")
            chosen = [own] + [wheels[n] for n in sorted(needed) if n != own.name]
            for wheel in chosen:
                check_installable(wheel, target)
            return chosen
        say("pip skipped what the target needs (markers), adding: " + ", ".join(str(r) for r in missing))
        requirements.extend(missing)
    raise BundleError(f"the dependency closure for {target} did not settle after {MAX_ROUNDS} downloads")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_text(project: Project, target: Target, wheels: Sequence[Wheel]) -> str:
    lines = [
        f"# {project.name} offline bundle: install.ps1 checks every wheel below before installing anything",
        "# header lines are '# key: value'; wheel lines are '<sha256>  <file>' (sha256sum format)",
        f"# name: {project.name}",
        f"# version: {project.version}",
        f"# python: {target.version_text}",
        f"# platform: {target.platform}",
    ]
    lines += [f"{sha256_of(w.path)}  {w.path.name}" for w in sorted(wheels, key=lambda w: w.path.name)]
    return "\n".join(lines) + "\n"


def install_script_text() -> str:
    """install.ps1 with Windows line endings; it must stay ASCII (PowerShell 5.1 reads it as ANSI)."""
    try:
        text = INSTALL_SCRIPT.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"cannot use {INSTALL_SCRIPT}: {exc}") from None
    return text.replace("\r\n", "\n").replace("\n", "\r\n")


def write_zip(dest: Path, members: Mapping[str, Path | str]) -> None:
    """Write the zip beside its final name, then rename, so a half-written zip is never left at ``dest``."""
    partial = dest.with_name(dest.name + ".partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for arcname in sorted(members):
            member = members[arcname]
            if isinstance(member, Path):
                zf.write(member, arcname)
            else:
                zf.writestr(arcname, member.encode("ascii"))
    os.replace(partial, dest)


def build(out: Path, target: Target, verbose: bool = False) -> Path:
    project = read_project(PROJECT_ROOT / "pyproject.toml")
    plan = plan_requirements(project, target)
    for note in plan.notes:
        say(note)
    script = install_script_text()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BundleError(f"cannot create {out}: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="standby-bundle-") as tmp:
        work = Path(tmp)
        own = build_own_wheel(project, work / "own", target, verbose)
        wheels = download_closure(plan, own, work, target, verbose)
        members: dict[str, Path | str] = {w.path.name: w.path for w in wheels}
        members[MANIFEST_NAME] = manifest_text(project, target, wheels)
        members[INSTALL_SCRIPT.name] = script
        dest = out / f"{project.name}-offline-{project.version}-{target.platform}.zip"
        try:
            write_zip(dest, members)
        except OSError as exc:
            raise BundleError(f"cannot write {dest}: {exc}") from None
    say(f"{len(wheels)} wheels: " + ", ".join(w.path.name for w in wheels))
    return dest


def say(message: str) -> None:
    print(f"bundle: {message}", file=sys.stderr, flush=True)


def python_version(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"3\.(\d{1,2})", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected 3.N such as 3.11, got {text!r}")
    return 3, int(match[1])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bundle.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Build a zip that installs standby on a Windows server without internet.\n\n"
            "Run it on any machine that reaches the package index (PyPI): it builds standby's own wheel\n"
            "(pip wheel . --no-deps), downloads the wheels of the runtime dependencies and the [windows]\n"
            "extra (pywin32) for the target interpreter and platform (binary wheels only, no test or bench\n"
            "extras), and zips them with install.ps1 and MANIFEST.txt (each wheel's sha256) into\n"
            "OUT/standby-offline-<version>-<platform>.zip. The zip's path is printed on stdout."
        ),
        epilog=(
            "example:\n"
            "  python packaging/bundle.py --out dist\n"
            "then on the server, in the unzipped folder, from an elevated PowerShell:\n"
            "  powershell -ExecutionPolicy Bypass -File install.ps1 -Config C:\\standby\\node.toml\n\n"
            "exit status: 0 built, 1 pip failed or a dependency has no wheel for the target, 2 bad arguments"
        ),
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the zip")
    parser.add_argument(
        "--python-version",
        default=(3, 11),
        type=python_version,
        metavar="3.N",
        help="CPython version on the server (default 3.11); the server needs exactly this version",
    )
    parser.add_argument(
        "--platform",
        default="win_amd64",
        choices=sorted(WINDOWS_PLATFORMS),
        help="wheel platform of the server's Python (default win_amd64: 64-bit Python on x64)",
    )
    parser.add_argument("--verbose", action="store_true", help="show pip's commands and output")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    target = Target(python_version=args.python_version, platform=args.platform)
    try:
        dest = build(args.out, target, verbose=args.verbose)
    except BundleError as exc:
        print(f"bundle: error: {exc}", file=sys.stderr)
        return 1
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
