"""The relative-path rules of engine.model: what is accepted, what is refused and why.

Every path from outside (config, wire, journal) passes ``check_relpath`` before an I/O layer sees it, so
these tables are the boundary. Refusals are checked by reason, so a path refused for the wrong rule
(say, ``../x`` refused only because of its length) is caught. The properties at the end check the
promise itself: an accepted path is returned unchanged and, joined under a root with either pathlib
flavour, stays under that root.
"""

from __future__ import annotations

import contextlib
import ntpath
import posixpath
import re
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import codec
from engine.errors import PathRejected, ReplicationError
from engine.model import (
    MAX_NAME_CHARS,
    MAX_PATH_CHARS,
    MAX_PATH_DEPTH,
    TEMP_MARKER,
    RelpathChecker,
    _name_problem,
    _plain_name_ok,
    check_name,
    check_relpath,
    is_temp_name,
    is_under,
    parent_of,
    to_posix_rel,
)

# A path whose every name is at the length limit and whose total length is exactly MAX_PATH_CHARS.
_NAME_AT_LIMIT = "n" * MAX_NAME_CHARS
_PATH_AT_LIMIT = "/".join(["n" * 254] * 4 + ["xxxx"])
assert len(_PATH_AT_LIMIT) == MAX_PATH_CHARS
_DEEPEST = "/".join(["d"] * MAX_PATH_DEPTH)

ACCEPTED = [
    "a",
    "a/b",
    "databases/room1/m.json",
    "møte/ünïcødé 会议.json",
    "mo\u0308te/emoji 😀.txt",  # combining mark and an astral character
    ".hidden",
    "..a",
    "a..b/c",
    "...x",
    "a.b.c",
    " leading space",
    "inner space/x y",
    "CONSOLE",
    "COM10",
    "COM",
    "LPT",
    "nul1",
    "xCON",
    "aux_",
    "con_x.txt",
    "standby-tmp-",  # the marker without its leading dot
    "a-b_c~d$e#f%g&h(i)j[k]l{m}n+o=p,q;r'@!",
    "a\x7fb",  # DEL is not a control character Windows refuses
    # tildes that cannot be an 8.3 alias: a base over 8 characters, a tilde first, an extension over 3
    "report~final.docx",
    "~$meeting.docx",
    "ABCDEFGH~1",
    "file~1.json5",
    "a~b~c",
    _NAME_AT_LIMIT,
    _PATH_AT_LIMIT,
    _DEEPEST,
]


@pytest.mark.parametrize("path", ACCEPTED)
def test_accepted_path_is_returned_unchanged(path: str) -> None:
    assert check_relpath(path) == path


# (path, regex the refusal reason must match)
REFUSED: list[tuple[str, str]] = [
    # empty, '.' and '..' in every position
    ("", "empty path"),
    (".", r"'\.' or '\.\.'"),
    ("..", r"'\.' or '\.\.'"),
    ("../x", r"'\.' or '\.\.'"),
    ("a/..", r"'\.' or '\.\.'"),
    ("a/../../x", r"'\.' or '\.\.'"),
    ("a/../b", r"'\.' or '\.\.'"),
    ("./a", r"'\.' or '\.\.'"),
    ("a/./b", r"'\.' or '\.\.'"),
    ("a//b", "empty"),
    ("a/", "empty"),
    ("a/b/", "empty"),
    # absolute, POSIX and Windows forms
    ("/", "absolute"),
    ("/etc/passwd", "absolute"),
    ("//server/share", "absolute"),
    ("C:\\x", "backslash|drive letter"),
    ("C:x", "drive letter"),
    ("c:/x", "drive letter"),
    ("C:", "drive letter"),
    ("z:", "drive letter"),
    ("\\\\server\\share", "backslash"),
    ("\\\\?\\C:\\x", "backslash"),
    ("\\x", "backslash"),
    ("a\\b", "backslash"),
    ("a/b\\..\\..\\c", "backslash"),
    # characters a name cannot hold
    ("a\x00b", "NUL"),
    ("\x00", "NUL"),
    ("a:b", "drive letter|characters Windows cannot hold"),
    ("ab:c", "characters Windows cannot hold"),
    ("a/b:", "characters Windows cannot hold"),
    ("dir/file.txt:stream", "characters Windows cannot hold"),
    ("a<b", "characters Windows cannot hold"),
    ("a>b", "characters Windows cannot hold"),
    ("a|b", "characters Windows cannot hold"),
    ("a?b", "characters Windows cannot hold"),
    ("a*b", "characters Windows cannot hold"),
    ('a"b', "characters Windows cannot hold"),
    ("a\x01b", "characters Windows cannot hold"),
    ("a\tb", "characters Windows cannot hold"),
    ("a\nb", "characters Windows cannot hold"),
    ("a\rb", "characters Windows cannot hold"),
    ("a\x1fb", "characters Windows cannot hold"),
    # trailing space or dot, in the last name or in a folder name
    ("a ", "ends with a space or dot"),
    ("a.", "ends with a space or dot"),
    ("a. ", "ends with a space or dot"),
    ("a..", "ends with a space or dot"),
    ("dir /b", "ends with a space or dot"),
    ("dir./b", "ends with a space or dot"),
    ("...", "ends with a space or dot"),
    (" ", "ends with a space or dot"),
    # reserved device names, any case, with any extension, at any depth
    ("CON", "reserved device name"),
    ("con", "reserved device name"),
    ("con.txt", "reserved device name"),
    ("CON.tar.gz", "reserved device name"),
    ("NUL", "reserved device name"),
    ("nul.json", "reserved device name"),
    ("PRN", "reserved device name"),
    ("AUX.log", "reserved device name"),
    ("COM1", "reserved device name"),
    ("com9", "reserved device name"),
    ("COM¹", "reserved device name"),
    ("LPT1", "reserved device name"),
    ("LPT9.log", "reserved device name"),
    ("lpt³.x", "reserved device name"),
    ("CONIN$", "reserved device name"),
    ("conout$.txt", "reserved device name"),
    ("dir/CON/file", "reserved device name"),
    ("dir/sub/nul", "reserved device name"),
    # the shape of an 8.3 alias (NTFS, Samba's mangled names), any case, at any depth
    ("PROGRA~1", "8.3 alias"),
    ("progra~1", "8.3 alias"),
    ("MVNQDZ~Z", "8.3 alias"),
    ("rooms/AB12CD~1.JSO", "8.3 alias"),
    ("a~1/x", "8.3 alias"),
    # the receiver's temporary-file marker
    (TEMP_MARKER, "temporary-file marker"),
    ("a/" + TEMP_MARKER + "123", "temporary-file marker"),
    ("x" + TEMP_MARKER + "y/z", "temporary-file marker"),
    # limits
    ("n" * (MAX_NAME_CHARS + 1), f"longer than {MAX_NAME_CHARS}"),
    ("a/" + "n" * (MAX_NAME_CHARS + 1) + "/b", f"longer than {MAX_NAME_CHARS}"),
    (_PATH_AT_LIMIT + "x", f"longer than {MAX_PATH_CHARS}"),
    ("a/" * 600 + "a", f"longer than {MAX_PATH_CHARS}"),
    (_DEEPEST + "/d", f"deeper than {MAX_PATH_DEPTH}"),
]


@pytest.mark.parametrize(("path", "reason"), REFUSED, ids=[ascii(p)[:40] for p, _ in REFUSED])
def test_refused_path_names_its_reason(path: str, reason: str) -> None:
    with pytest.raises(PathRejected) as info:
        check_relpath(path)
    assert re.search(reason, info.value.reason), info.value.reason
    assert isinstance(info.value, ReplicationError)
    # The message quotes the path (shortened when over-long) so an operator can find it.
    assert info.value.path == path or len(path) > MAX_PATH_CHARS


@pytest.mark.parametrize("value", [None, b"a", 1, ["a"]])
def test_non_string_is_refused(value: object) -> None:
    with pytest.raises(PathRejected):
        check_relpath(cast(Any, value))


def test_over_long_path_message_is_shortened() -> None:
    with pytest.raises(PathRejected) as info:
        check_relpath("a/" * 5000 + "a")
    assert len(str(info.value)) < 200


# ---------------------------------------------------------------------------------------------------------
# check_name: one component


@pytest.mark.parametrize("name", ["a", "møte", "会议.json", ".hidden", "..a", _NAME_AT_LIMIT, "COM0x"])
def test_check_name_accepts(name: str) -> None:
    check_name(name, "some/path")


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        "a ",
        "a.",
        "CON",
        "lpt9.log",
        "CONIN$",
        "a:b",
        "a\\b",
        "a\x00",
        "a\x1f",
        "n" * (MAX_NAME_CHARS + 1),
        "t" + TEMP_MARKER,
    ],
    ids=ascii,
)
def test_check_name_refuses_and_reports_the_whole_path(name: str) -> None:
    with pytest.raises(PathRejected) as info:
        check_name(name, "the/whole/path")
    assert info.value.path == "the/whole/path"


@pytest.mark.parametrize("name", ["a/b", "/", "../x"])
def test_check_name_refuses_a_slash(name: str) -> None:
    with pytest.raises(PathRejected):
        check_name(name, name)


@pytest.mark.parametrize(
    ("name", "temp"),
    [(TEMP_MARKER + "1", True), ("a" + TEMP_MARKER, True), ("standby-tmp-", False), ("a", False)],
)
def test_is_temp_name(name: str, temp: bool) -> None:
    assert is_temp_name(name) is temp


# ---------------------------------------------------------------------------------------------------------
# Names the rules accept but some OS we run on cannot hold. Each is a bug in check_relpath.


@pytest.mark.parametrize("path", ["CON .txt", "nul .tar.gz", "dir/COM1 .log", "prn   .x"])
def test_device_name_with_spaces_before_extension_is_refused(path: str) -> None:
    with pytest.raises(PathRejected):
        check_relpath(path)


@pytest.mark.parametrize("path", ["a\udcff", "dir/\ud800x"], ids=ascii)
def test_lone_surrogate_is_refused(path: str) -> None:
    with pytest.raises(PathRejected):
        check_relpath(path)


@pytest.mark.parametrize("name", ["é" * 200, "会" * 100, "😀" * 128], ids=["latin", "cjk", "astral"])
def test_accepted_name_fits_every_filesystem(name: str) -> None:
    try:
        check_relpath(name)
    except PathRejected:
        return
    assert len(name.encode("utf-8")) <= 255
    assert len(name.encode("utf-16-le")) // 2 <= 255


# ---------------------------------------------------------------------------------------------------------
# to_posix_rel, is_under, parent_of


@pytest.mark.parametrize(
    ("os_rel", "sep", "posix"),
    [
        ("a\\b\\c.json", "\\", "a/b/c.json"),
        ("a", "\\", "a"),
        ("møte\\会议.json", "\\", "møte/会议.json"),
        ("a/b", "/", "a/b"),
        # On POSIX a backslash is part of a name: kept, so check_relpath refuses it afterwards.
        ("a\\b", "/", "a\\b"),
    ],
)
def test_to_posix_rel(os_rel: str, sep: str, posix: str) -> None:
    assert to_posix_rel(os_rel, sep) == posix


@pytest.mark.parametrize(
    ("path", "folder", "under"),
    [
        ("a", "a", True),
        ("a/b", "a", True),
        ("a/b/c", "a", True),
        ("a/b/c", "a/b", True),
        ("a/b", "a/b", True),
        ("ab", "a", False),
        ("a.b", "a", False),
        ("a/bc", "a/b", False),
        ("a", "a/b", False),
        ("b/a", "a", False),
        ("A/b", "a", False),
        ("møte/x", "møte", True),
        ("møte2/x", "møte", False),
    ],
)
def test_is_under(path: str, folder: str, under: bool) -> None:
    assert is_under(path, folder) is under


@pytest.mark.parametrize(
    ("path", "parent"),
    [("a", ""), ("a/b", "a"), ("a/b/c.json", "a/b"), ("møte/ü 会.json", "møte"), ("..a/b", "..a")],
)
def test_parent_of(path: str, parent: str) -> None:
    assert parent_of(path) == parent


# ---------------------------------------------------------------------------------------------------------
# Properties

_NAME_CHARS = st.characters(codec="utf-8", exclude_categories=["Cc"], exclude_characters='<>:"|?*\\/')
_TRICKY = st.sampled_from(
    [
        "..",
        ".",
        "",
        " ",
        "a ",
        "a.",
        "CON",
        "con.txt",
        "NUL",
        "LPT9.log",
        "CONIN$",
        "C:",
        "c:",
        ":",
        "\\",
        "\\\\server",
        "/",
        "\x00",
        "\x01",
        "\x7f",
        TEMP_MARKER,
        "møte",
        "ünïcødé 会议.json",
        "n" * 256,
    ]
)
_CLEAN_NAME = st.text(_NAME_CHARS, min_size=1, max_size=12)
_ANY_NAME = st.one_of(_TRICKY, _CLEAN_NAME, st.text(max_size=6))
_ANY_PATH = st.one_of(
    st.lists(_ANY_NAME, min_size=1, max_size=6).map("/".join),
    st.lists(_ANY_NAME, min_size=1, max_size=4).map("\\".join),
    st.text(max_size=40),
)
# Mostly accepted: clean names, now and then a tricky one.
_CLEAN_PATH = st.lists(st.one_of(_CLEAN_NAME, _CLEAN_NAME, _CLEAN_NAME, _TRICKY), min_size=1, max_size=8).map(
    "/".join
)

_POSIX_ROOTS = [PurePosixPath("/srv/replica"), PurePosixPath("/")]
_WINDOWS_ROOTS = [
    PureWindowsPath("D:/replica"),
    PureWindowsPath("//server/share/replica"),
    PureWindowsPath("C:/"),
]


def _accepted(path: str) -> bool:
    try:
        check_relpath(path)
    except PathRejected:
        return False
    return True


def _assert_clean(path: str) -> None:
    """What every accepted path must be, stated without reference to how check_relpath works."""
    assert check_relpath(path) == path
    assert not path.startswith("/")
    assert "\\" not in path
    assert "\x00" not in path
    parts = path.split("/")
    assert all(p not in ("", ".", "..") for p in parts)
    assert not (len(path) >= 2 and path[1] == ":")
    assert len(path) <= MAX_PATH_CHARS and len(parts) <= MAX_PATH_DEPTH
    assert not any(TEMP_MARKER in p for p in parts)
    # It can be framed: the journal and the wire carry it as msgpack str.
    assert codec.unpack(codec.pack(path)) == path


def _assert_stays_under_roots(path: str) -> None:
    for proot in _POSIX_ROOTS:
        joined = proot / path
        assert joined != proot and joined.is_relative_to(proot)
        assert joined.relative_to(proot).as_posix() == path
        # Nothing for the OS to normalise: the path means exactly what it says.
        assert posixpath.normpath(str(joined)) == str(joined)
        assert posixpath.commonpath([str(proot), posixpath.normpath(str(joined))]) == str(proot)
    for wroot in _WINDOWS_ROOTS:
        wjoined = wroot / path
        assert wjoined.drive == wroot.drive and wjoined.root == wroot.root
        assert wjoined != wroot and wjoined.is_relative_to(wroot)
        assert wjoined.relative_to(wroot).as_posix() == path
        assert to_posix_rel(str(wjoined.relative_to(wroot)), "\\") == path
        assert ntpath.normpath(str(wjoined)) == str(wjoined)
        assert ntpath.commonpath([str(wroot), ntpath.normpath(str(wjoined))]) == str(wroot)


@settings(max_examples=400, deadline=None)
@given(_ANY_PATH)
def test_property_any_accepted_string_is_clean(path: str) -> None:
    if _accepted(path):
        _assert_clean(path)
        _assert_stays_under_roots(path)


@settings(max_examples=400, deadline=None)
@given(_CLEAN_PATH)
def test_property_accepted_paths_stay_under_the_root(path: str) -> None:
    if _accepted(path):
        _assert_clean(path)
        _assert_stays_under_roots(path)


@settings(max_examples=200, deadline=None)
@given(st.lists(_CLEAN_NAME, min_size=1, max_size=6), st.lists(_CLEAN_NAME, min_size=1, max_size=6))
def test_property_is_under_agrees_with_pathlib(names: list[str], other: list[str]) -> None:
    path = "/".join(names)
    for folder in ["/".join(names[:k]) for k in range(1, len(names) + 1)] + ["/".join(other)]:
        expected = PurePosixPath(path).is_relative_to(PurePosixPath(folder))
        assert is_under(path, folder) is expected
    if len(names) > 1:
        assert parent_of(path) == "/".join(names[:-1])
        assert is_under(path, parent_of(path))
    else:
        assert parent_of(path) == ""


def test_cases_in_tables_are_consistent_with_the_property() -> None:
    # The hand-written accepted cases satisfy the same promises as generated ones.
    for path in ACCEPTED:
        _assert_clean(path)
        _assert_stays_under_roots(path)


# ---------------------------------------------------------------------------------------------------------
# RelpathChecker: check_relpath for the paths of a walk, by the last name once the folder has passed.


def _verdict(check: Any, path: str) -> str | None:
    try:
        assert check(path) == path
    except PathRejected as e:
        return e.reason
    return None


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(_CLEAN_PATH, _ANY_PATH), min_size=1, max_size=30))
def test_property_checker_agrees_with_check_relpath_path_by_path(paths: list[str]) -> None:
    # Each path's children and siblings follow it, so the checker takes its short way for most of them.
    seq = [q for p in paths for q in (p, p + "/x", p.rpartition("/")[0] + "/" + "CON", p + "/" + "y" * 300)]
    checker = RelpathChecker()
    for path in seq:
        assert _verdict(checker, path) == _verdict(check_relpath, path), path


@pytest.mark.parametrize(("path", "reason"), REFUSED, ids=[ascii(p)[:40] for p, _ in REFUSED])
def test_checker_refuses_each_path_for_its_reason_after_its_folder_passed(path: str, reason: str) -> None:
    checker = RelpathChecker()
    folder = path.rpartition("/")[0]
    if folder:
        # A sibling in the same folder first, so that the folder is known to the checker.
        with contextlib.suppress(PathRejected):
            checker(folder + "/ok")
    with pytest.raises(PathRejected) as info:
        checker(path)
    assert re.search(reason, info.value.reason), info.value.reason


def test_checker_keeps_the_depth_and_length_limits_below_a_known_folder() -> None:
    checker = RelpathChecker(max_chars=20, max_depth=3)
    assert checker("a/b/c") == "a/b/c"  # a/b is now known
    assert checker("a/b/d") == "a/b/d"
    with pytest.raises(PathRejected, match="longer than 20"):
        checker("a/b/" + "n" * 17)
    assert checker("a/b") == "a/b"  # a is now known
    with pytest.raises(PathRejected, match="deeper than 3"):
        checker("a/b/c/d")
    with pytest.raises(PathRejected, match="reserved device name"):
        checker("a/b/NUL")
    with pytest.raises(PathRejected, match="backslash"):
        checker("a/b/x\\y")


@pytest.mark.parametrize(
    "name",
    ["CON", "con.txt", "Lpt1.log", "nul", "a.", "x.standby-tmp-1", "n" * (MAX_NAME_CHARS + 1), "-", "_"],
)
def test_plain_name_shortcut_refuses_what_the_rules_refuse(name: str) -> None:
    assert _plain_name_ok(name) == (_name_problem.__wrapped__(name) is None)


@settings(max_examples=600, deadline=None)
@given(
    st.one_of(
        _TRICKY, _CLEAN_NAME, st.text(max_size=12), st.from_regex(r"[0-9A-Za-z_.~ -]{1,10}", fullmatch=True)
    )
)
def test_property_plain_name_shortcut_never_accepts_a_refused_name(name: str) -> None:
    if _plain_name_ok(name):
        assert _name_problem.__wrapped__(name) is None, name


def test_a_long_lived_checker_holds_a_bounded_number_of_folders(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RelpathChecker, "MAX_FOLDERS", 100)
    checker = RelpathChecker()
    for i in range(1000):
        assert checker(f"databases/room-{i}/a.json") == f"databases/room-{i}/a.json"
        assert len(checker._depth) <= 100
    with pytest.raises(PathRejected, match="reserved device name"):
        checker("databases/room-999/CON")  # a folder still known, and the name still checked
