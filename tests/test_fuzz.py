"""A bounded run of the coverage-guided fuzz harness (fuzz/fuzz_decoder.py) for the frame decoder and the
protocol state machines. Needs atheris; skipped without it, except under CI=true, where it fails."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "fuzz" / "fuzz_decoder.py"
RUNS = 20_000


def need_atheris() -> None:
    """Skip unless atheris imports (in a child: its native libFuzzer stays out of the test process)."""
    found = importlib.util.find_spec("atheris") is not None
    if found:
        r = subprocess.run(
            [sys.executable, "-c", "import atheris"], capture_output=True, text=True, timeout=60
        )
        found = r.returncode == 0
    if not found:
        msg = "atheris is not importable (pip install atheris; wheels exist for CPython 3.11 on Linux x86_64)"
        skip_or_fail(msg, "CI=true: .ci/run must install it")


@pytest.mark.timeout(120)
def test_fuzz_decoder_bounded_run(tmp_path: Path) -> None:
    need_atheris()
    t0 = time.monotonic()
    r = subprocess.run(
        [
            sys.executable,
            str(HARNESS),
            f"-runs={RUNS}",
            "-seed=1",  # reproducible
            "-max_len=2048",
            "-timeout=10",  # seconds for one input: a hang is a failure too
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=tmp_path,  # libFuzzer writes nothing into the repository
    )
    seconds = time.monotonic() - t0
    crashes = sorted(p.name for p in tmp_path.iterdir())
    tail = (r.stdout + r.stderr)[-6000:]  # atheris prints the Python traceback on stdout
    assert r.returncode == 0, f"the fuzzer found a crash (exit {r.returncode}); artifacts {crashes}\n{tail}"
    assert f"Done {RUNS} runs" in r.stderr, tail
    assert "Instrumenting engine.wire" in r.stderr, "the state machine was not instrumented"
    assert not crashes, crashes
    assert seconds < 60, f"{RUNS} runs took {seconds:.0f} s"


def test_harness_rejects_foreign_exceptions(tmp_path: Path) -> None:
    """The harness can fail: an exception other than the allowed ones (here a KeyError planted in the
    decoder run) makes it exit non-zero and print the traceback."""
    need_atheris()
    probe = tmp_path / "probe.py"
    probe.write_text(
        f"""
import sys
sys.path.insert(0, {str(ROOT / "fuzz")!r})
sys.path.insert(0, {str(ROOT)!r})
import atheris
import fuzz_decoder

def boom(pieces):
    raise KeyError("not an allowed exception")

fuzz_decoder.run_decoder = boom
atheris.Setup(sys.argv, fuzz_decoder.TestOneInput)
atheris.Fuzz()
""",
        "utf-8",
    )
    seed = tmp_path / "seed"
    seed.write_bytes(b"\x00" * 8)
    r = subprocess.run(
        [sys.executable, str(probe), str(seed), f"-artifact_prefix={tmp_path}/"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert "KeyError: 'not an allowed exception'" in out, out[-3000:]
