"""The framed records the SPANK shim, its helper and the holder exchange (Python side;
the C parser is tested against the same frames in test_spank_frame.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rankwire.runtime import frame

KEYS = st.text(st.characters(blacklist_characters="=\0", codec="utf-8"), min_size=1)
VALUES = st.text(st.characters(blacklist_characters="\0", codec="utf-8"))


@given(st.lists(st.tuples(KEYS, VALUES)))
def test_round_trip(records: list[tuple[str, str]]) -> None:
    assert frame.decode(frame.encode(records)) == records


def test_wire_form_and_lookups() -> None:
    data = frame.encode([("env", "A=1"), ("env", "B="), ("raw", "\udcff"), ("env", "C=3")])
    assert data == b"env=A=1\0env=B=\0raw=\xff\0env=C=3\0"
    records = frame.decode(data)
    assert frame.every(records, "env") == ["A=1", "B=", "C=3"]
    assert frame.pairs(frame.every(records, "env")) == {"A": "1", "B": "", "C": "3"}
    assert frame.one(records, "raw") == "\udcff" and frame.one(records, "nope") is None
    assert frame.decode(b"") == []


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"a=1", "frame does not end with a NUL"),
        (b"a=1\0b\0", "record b'b' is not KEY=VALUE"),
        (b"=1\0", "record b'=1' is not KEY=VALUE"),
        (b"\0", "record b'' is not KEY=VALUE"),
        (b"k=" + b"x" * frame.MAX_FRAME + b"\0", f"is over {frame.MAX_FRAME}"),
    ],
)
def test_malformed_frames_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(frame.FrameError) as err:
        frame.decode(data)
    assert why in str(err.value)


@pytest.mark.parametrize(("key", "value"), [("", "v"), ("a=b", "v"), ("a\0", "v"), ("a", "\0")])
def test_what_cannot_be_framed_is_never_sent(key: str, value: str) -> None:
    with pytest.raises(ValueError, match=r"^cannot frame record"):
        frame.encode([(key, value)])
