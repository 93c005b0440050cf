"""Guard rules on golden whole and torn inputs, every truncation point, the glob table and command rules."""

from __future__ import annotations

import binascii
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.guard import (
    GuardRule,
    Verdict,
    check_content,
    compile_pattern,
    find_guard,
    matches,
    stable,
)
from engine.guards import run_command_rule

DATA = Path(__file__).parent / "data" / "guard"
BOM = b"\xef\xbb\xbf"

BASE64 = GuardRule("databases/**/*.cookie", "base64")
JSON = GuardRule("config/*.json", "json")
NONEMPTY = GuardRule("**", "nonempty")


def golden(name: str) -> bytes:
    return (DATA / name).read_bytes()


def oracle_base64(data: bytes) -> bool:
    """Independent of engine.guard: strict binascii decoding, then a canonical round trip."""
    body = data.strip()
    if not body:
        return False
    try:
        decoded = binascii.a2b_base64(body, strict_mode=True)
    except binascii.Error:
        return False
    return binascii.b2a_base64(decoded, newline=False) == body


# ---------------------------------------------------------------------------------------------------------
# Golden files.


def test_golden_cookie_is_good() -> None:
    cookie = golden("cookie.b64")
    assert 3500 <= len(cookie) <= 4500 and cookie.endswith(b"==")
    assert check_content(BASE64, cookie) == Verdict(True)


@pytest.mark.parametrize("wrap", [b"\r\n", b"\n", b" \t\r\n  "])
def test_cookie_with_surrounding_whitespace_is_good(wrap: bytes) -> None:
    assert check_content(BASE64, wrap + golden("cookie.b64") + wrap).good


def test_golden_config_is_good() -> None:
    config = golden("config.json")
    assert config.count(b"\r\n") > 10
    assert check_content(JSON, config) == Verdict(True)
    assert check_content(JSON, BOM + config) == Verdict(True)


@pytest.mark.parametrize(
    ("name", "rule", "reason"),
    [
        ("half.json", JSON, "invalid JSON at line "),
        ("bad_padding.b64", BASE64, "misplaced base64 padding at offset 4069"),
        ("wrong_alphabet.b64", BASE64, "invalid base64 byte 0x"),
        ("empty.b64", BASE64, "empty file"),
        ("empty.b64", JSON, "empty file"),
        ("empty.b64", NONEMPTY, "empty file"),
    ],
)
def test_golden_torn_inputs_are_refused(name: str, rule: GuardRule, reason: str) -> None:
    verdict = check_content(rule, golden(name))
    assert not verdict.good
    assert verdict.reason.startswith(reason), verdict.reason


def test_base64_reasons_are_specific() -> None:
    cookie = golden("cookie.b64")
    assert check_content(BASE64, cookie[:1023]).reason == (
        "truncated base64 (length 1023 is not a multiple of 4)"
    )
    assert check_content(BASE64, BOM + cookie).reason == "base64 text starts with a UTF-8 BOM"
    assert check_content(BASE64, b" \r\n").reason == "only whitespace"
    assert check_content(BASE64, b"QR==").reason.startswith("non-canonical base64")
    # MIME-style line wrapping is not the service's format: a line break inside is refused.
    wrapped = cookie[:76] + b"\r\n" + cookie[76:]
    assert check_content(BASE64, wrapped).reason == "invalid base64 byte 0x0d at offset 76"
    assert check_content(BASE64, b"QUJD\xff").reason == "invalid base64 byte 0xff at offset 4"


def test_json_reasons_are_specific() -> None:
    assert check_content(JSON, b'{\n  "a": 1\n  "b": 2\n}').reason == (
        "invalid JSON at line 3 column 3: Expecting ',' delimiter"
    )
    assert check_content(JSON, BOM).reason == "empty file"
    assert check_content(JSON, b'{"a": "\xc3"}').reason.startswith("not UTF-8 at byte 7")
    assert check_content(JSON, b"{} {}").reason.startswith("invalid JSON at line 1 column 4: Extra data")


def test_nonempty() -> None:
    assert check_content(NONEMPTY, b"\0") == Verdict(True)
    assert check_content(NONEMPTY, b"") == Verdict(False, "empty file")


# ---------------------------------------------------------------------------------------------------------
# Every truncation point.


def test_every_prefix_of_the_cookie_is_judged_like_the_oracle() -> None:
    cookie = golden("cookie.b64")
    accepted = []
    for cut in range(len(cookie)):
        prefix = cookie[:cut]
        verdict = check_content(BASE64, prefix)
        assert verdict.good == oracle_base64(prefix), (cut, verdict)
        assert verdict.good or verdict.reason
        if verdict.good:
            accepted.append(cut)
    # The known blind spot, pinned: a cut at a multiple of 4 characters (before the padding) leaves valid
    # base64, which no content rule can tell from a whole cookie. Every other cut is refused.
    assert accepted == [cut for cut in range(1, len(cookie)) if cut % 4 == 0]


def test_every_prefix_of_the_cookie_with_crlf_is_refused_unless_valid() -> None:
    cookie = golden("cookie.b64") + b"\r\n"
    for cut in range(len(cookie)):
        assert check_content(BASE64, cookie[:cut]).good == oracle_base64(cookie[:cut]), cut


@pytest.mark.parametrize("bom", [b"", BOM], ids=["plain", "bom"])
def test_every_strict_prefix_of_a_multiline_object_is_refused(bom: bytes) -> None:
    document = bom + golden("config.json").rstrip()
    assert document.endswith(b"}") and document.count(b"\n") > 10
    assert check_content(JSON, document).good
    for cut in range(len(document)):
        verdict = check_content(JSON, document[:cut])
        assert not verdict.good, cut
        assert verdict.reason, cut


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=24) | st.text("AQw+/=\r\n -_", max_size=24).map(str.encode))
def test_base64_rule_agrees_with_the_oracle(data: bytes) -> None:
    assert check_content(BASE64, data).good == oracle_base64(data)


# ---------------------------------------------------------------------------------------------------------
# Patterns.


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("databases/**/*.cookie", "databases/a.cookie", True),
        ("databases/**/*.cookie", "databases/r/s/x.cookie", True),
        ("databases/**/*.cookie", "databases/room-0007@example.com/sync.cookie", True),
        ("databases/**/*.cookie", "databasesX/a.cookie", False),
        ("databases/**/*.cookie", "databases/a.cookiex", False),
        ("databases/**/*.cookie", "x/databases/a.cookie", False),
        ("databases/**/*.cookie", "databases/a.COOKIE", False),
        ("databases/**/*.cookie", "Databases/a.cookie", False),
        ("**/*.cookie", "a.cookie", True),
        ("**/*.cookie", "a/b/c.cookie", True),
        ("**/sync.cookie", "a/sync.cookie", True),
        ("**/sync.cookie", "a/xsync.cookie", False),
        ("databases/**", "databases/a", True),
        ("databases/**", "databases/a/b/c", True),
        ("databases/**", "databases", False),
        ("**", "anything/at/all", True),
        ("a/**/**/b", "a/b", True),
        ("a/**/b", "a/x/y/b", True),
        ("config/config.json", "config/config.json", True),
        ("config/config.json", "config/config.jsonx", False),
        ("config/*.json", "config/sub/config.json", False),
        ("*.json", "config/config.json", False),
        ("*", "a", True),
        ("*", "a/b", False),
        ("a**b/c", "axyzb/c", True),
        ("a**b/c", "ax/yb/c", False),
        ("room-000?/x", "room-0007/x", True),
        ("room-000?/x", "room-00007/x", False),
        ("a?b", "a/b", False),
        ("room-000[1-3]/x", "room-0002/x", True),
        ("room-000[1-3]/x", "room-0004/x", False),
        ("room-000[!1-3]/x", "room-0004/x", True),
        ("room-000[^1-3]/x", "room-0002/x", False),
        ("[]]x", "]x", True),
        ("[!]]x", "ax", True),
        ("[!]]x", "]x", False),
        ("[a-]x", "-x", True),
        ("[[]x", "[x", True),
        ("[&&]x", "&x", True),
        ("[--]x", "-x", True),
        ("a[b", "a[b", True),
        ("a.b", "axb", False),
        ("a+b(c)", "a+b(c)", True),
        ("$x^", "$x^", True),
    ],
)
def test_matches(pattern: str, path: str, expected: bool) -> None:
    assert matches(pattern, path) is expected


@pytest.mark.parametrize("pattern", ["", "/databases/*.cookie", "a//b", "a/", "[z-a]"])
def test_bad_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError):
        compile_pattern(pattern)
    with pytest.raises(ValueError):
        GuardRule(pattern, "nonempty")


def test_find_guard_first_match_wins() -> None:
    guards = [
        GuardRule("databases/**/sync.cookie", "base64"),
        GuardRule("databases/**", "nonempty"),
        GuardRule("config/config.json", "json"),
    ]
    assert find_guard(guards, "databases/r/sync.cookie") is guards[0]
    assert find_guard(guards, "databases/r/m.json") is guards[1]
    assert find_guard(guards, "config/config.json") is guards[2]
    assert find_guard(guards, "config/other.json") is None
    assert find_guard([], "config/config.json") is None


def test_guard_rule_validation() -> None:
    with pytest.raises(ValueError, match="needs a command"):
        GuardRule("**", "command")
    with pytest.raises(ValueError, match="only command rules"):
        GuardRule("**", "json", command=("true",))
    with pytest.raises(ValueError, match="timeout"):
        GuardRule("**", "command", command=("true",), timeout=0)
    with pytest.raises(ValueError, match="unknown guard rule"):
        GuardRule("**", "xml")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# Stability.


def test_stable() -> None:
    assert stable((10, 5), (10, 5)) == Verdict(True)
    assert stable((10, 5), (12, 6)) == Verdict(False, "file changed while it was read (size 10 -> 12)")
    assert stable((10, 5), (10, 6)) == Verdict(False, "file changed while it was read (mtime changed)")


# ---------------------------------------------------------------------------------------------------------
# Command rules.


def command_rule(script: str, *extra: str, timeout: float = 5.0) -> GuardRule:
    return GuardRule("**", "command", command=(sys.executable, "-c", script, *extra), timeout=timeout)


def test_command_timeout_gives_a_clear_verdict(tmp_path: Path) -> None:
    rule = command_rule("import time; time.sleep(30)", timeout=0.5)
    started = time.monotonic()
    verdict = run_command_rule(rule, str(tmp_path / "x"))
    assert verdict == Verdict(False, "validator timed out after 0.5 s")
    assert time.monotonic() - started < 10


def test_command_exit_code_non_zero_is_torn(tmp_path: Path) -> None:
    rule = command_rule("import sys; sys.stderr.write('cookie is torn\\nsecond line\\n'); sys.exit(3)")
    expected = Verdict(False, "validator exited with code 3: cookie is torn")
    assert run_command_rule(rule, str(tmp_path)) == expected
    silent = command_rule("raise SystemExit(4)")
    assert run_command_rule(silent, str(tmp_path)) == Verdict(False, "validator exited with code 4")


def test_command_exit_zero_is_good(tmp_path: Path) -> None:
    assert run_command_rule(command_rule("pass"), str(tmp_path)) == Verdict(True)


def test_command_path_substitution(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "path, flag = sys.argv[1], sys.argv[2]\n"
        "ok = flag == '--file=' + path and open(path, 'rb').read() == b'whole'\n"
        "sys.exit(0 if ok else 1)\n"
    )
    rule = command_rule(script, "{path}", "--file={path}")
    good, bad = tmp_path / "good file.cookie", tmp_path / "bad.cookie"
    good.write_bytes(b"whole")
    bad.write_bytes(b"who")
    assert run_command_rule(rule, str(good)) == Verdict(True)
    assert not run_command_rule(rule, str(bad)).good


def test_command_missing_executable(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-validator")
    rule = GuardRule("**", "command", command=(missing, "{path}"))
    assert run_command_rule(rule, "x") == Verdict(False, f"validator not found: {missing}")


def test_rule_kinds_do_not_mix() -> None:
    with pytest.raises(ValueError):
        check_content(command_rule("pass"), b"data")
    with pytest.raises(ValueError):
        run_command_rule(BASE64, "x")
