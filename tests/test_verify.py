"""``standby verify`` without processes: the ``full`` flag of a manifest request (sans-I/O, bytes in and
out) and the text report (every difference once, whole paths). The end-to-end runs are in
tests/test_e2e_integrity.py and tests/test_guarded.py."""

from __future__ import annotations

from typing import Any

import pytest

from engine import codec, wire
from engine.errors import RemoteProtocolError
from engine.observer import Difference, VerifyReport, report_lines

HELLO = {"k": "hello", "v": 1, "node": "active/verify", "epoch": 0, "role": "observer"}


def receiver_events(*frames: Any) -> list[wire.ReceiverEvent]:
    r = wire.ReceiverProtocol("passive")
    r.receive_data(b"".join(codec.encode(f) for f in frames))
    out = []
    while (ev := r.next_event()) is not None:
        out.append(ev)
    return out


def test_a_full_manifest_request_says_so_on_the_wire() -> None:
    s = wire.SenderProtocol("active/verify", 0, role="observer")
    s.receive_data(codec.encode({"k": "welcome", "v": 1, "node": "p", "journal": "", "seq": 0, "epoch": 0}))
    assert isinstance(s.next_event(), wire.Welcome)
    plain, full = s.manifest_request(1, ["databases"]), s.manifest_request(2, ["databases"], full=True)
    # A plain request is byte for byte what receivers before the flag understand.
    assert plain == codec.encode({"k": "mreq", "id": 1, "include": ["databases"]})
    assert full == codec.encode({"k": "mreq", "id": 2, "include": ["databases"], "full": True})
    r = wire.ReceiverProtocol("passive")
    r.receive_data(codec.encode(HELLO) + plain + full)
    assert isinstance(r.next_event(), wire.Hello)
    assert r.next_event() == wire.ManifestRequest(1, ("databases",), full=False)  # an old peer's request
    assert r.next_event() == wire.ManifestRequest(2, ("databases",), full=True)


@pytest.mark.parametrize("flag", [1, "yes", None, [True]], ids=repr)
def test_a_full_flag_that_is_not_a_boolean_is_a_protocol_error(flag: Any) -> None:
    with pytest.raises(RemoteProtocolError, match="mreq: full is not a boolean"):
        receiver_events(HELLO, {"k": "mreq", "id": 1, "include": [], "full": flag})


LONG = "databases/" + "/".join(["a-folder-name-long-enough-to-pass-eighty-columns"] * 3) + "/m.json"


def test_the_report_lists_each_difference_once_with_its_whole_path() -> None:
    report = VerifyReport(
        42,
        10,
        10,
        [
            Difference("databases/r1/sync.cookie", "held", "torn on the source, not replicated: bad gzip"),
            Difference(LONG, "content", "source 3 B 0123, replica 4 B 4567"),
        ],
    )
    lines = [text for _style, text in report_lines(report)]
    assert lines == [
        "held: databases/r1/sync.cookie: torn on the source, not replicated: bad gzip",
        f"content: {LONG}: source 3 B 0123, replica 4 B 4567",
        "different: 1 difference(s) and 1 held file(s) (replica at seq 42)",
    ]


def test_the_report_of_identical_trees() -> None:
    assert report_lines(VerifyReport(7, 3, 3)) == [
        ("green", "identical: 3 entries on both sides (replica at seq 7)")
    ]
    held = VerifyReport(7, 3, 3, [Difference("a", "held", "torn")], unstable=["b"])
    assert [t for _s, t in report_lines(held)] == [
        "held: a: torn",
        "identical apart from 1 held file(s) (replica at seq 7)",
        "1 files were changing while read and were not compared",
    ]


def test_the_report_stops_listing_at_its_limit() -> None:
    report = VerifyReport(1, 5, 0, [Difference(f"f{i}", "missing", "") for i in range(5)])
    lines = [t for _s, t in report_lines(report, limit=2)]
    assert lines[2] == "... and 3 more (--json lists them all)", lines
    assert len(lines) == 4
