"""The SPANK shim's frame parser (spank/frame.c), run as `spank/frame_test`.

The binary is built from the very frame.c the plugin is (`make -C spank frame-test`): a
frame on stdin; each record out as `KEY<TAB>VALUE<LF>` and exit 0, or `bad frame` on stderr
and exit 2. What Python encodes (`rankwire.runtime.frame`), the shim must read back as is.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwire.runtime import frame

SPANK = Path(__file__).resolve().parent.parent / "spank"


@pytest.fixture(scope="module")
def frame_test() -> Path:
    subprocess.run(["make", "-C", str(SPANK), "frame-test"], check=True, capture_output=True)
    return SPANK / "frame_test"


def run(binary: Path, data: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(binary)], input=data, capture_output=True, timeout=30)


def printed(records: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(key + b"\t" + value + b"\n" for key, value in records)


@pytest.mark.parametrize(
    ("data", "records"),
    [
        (b"", []),  # nothing at all is the empty frame
        (b"uid=1000\0", [(b"uid", b"1000")]),
        (b"arg=a\0arg=b\0arg=a\0", [(b"arg", b"a"), (b"arg", b"b"), (b"arg", b"a")]),
        (b"skip=\0", [(b"skip", b"")]),
        (b"opt=container-image=/x.sif\0", [(b"opt", b"container-image=/x.sif")]),
        (b"env=A==B=\0", [(b"env", b"A==B=")]),
        ("cwd=/tmp/é ü 日本\0".encode(), [(b"cwd", "/tmp/é ü 日本".encode())]),
        (b"env=RAW=\xff\xfe end\0", [(b"env", b"RAW=\xff\xfe end")]),
        (b"k=line\nnext\ttab\0", [(b"k", b"line\nnext\ttab")]),
        (b"x=1\0y=2\0x=3\0", [(b"x", b"1"), (b"y", b"2"), (b"x", b"3")]),
    ],
)
def test_valid_frames_print_every_record(
    frame_test: Path, data: bytes, records: list[tuple[bytes, bytes]]
) -> None:
    proc = run(frame_test, data)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, printed(records), b"")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"uid=1000", id="no-trailing-nul"),
        pytest.param(b"uid=1000\0gid=1000", id="last-record-unterminated"),
        pytest.param(b"uid1000\0", id="missing-equals"),
        pytest.param(b"uid=1\0flag\0", id="later-record-missing-equals"),
        pytest.param(b"=value\0", id="empty-key"),
        pytest.param(b"\0", id="empty-record"),
        pytest.param(b"a=1\0\0", id="empty-record-after-one"),
        pytest.param(b"k=" + b"v" * frame.MAX_FRAME + b"\0", id="oversize"),
    ],
)
def test_malformed_frames_are_refused(frame_test: Path, data: bytes) -> None:
    proc = run(frame_test, data)
    # Refused as a whole: not one record of it is printed first.
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, b"", b"bad frame\n")


def test_largest_frame_is_read(frame_test: Path) -> None:
    value = b"v" * (frame.MAX_FRAME - len(b"k=\0"))
    proc = run(frame_test, b"k=" + value + b"\0")
    assert (proc.returncode, proc.stdout) == (0, b"k\t" + value + b"\n")
    over = run(frame_test, b"k=" + value + b"v\0")
    assert (over.returncode, over.stderr) == (2, b"bad frame\n")


def test_python_request_round_trips(frame_test: Path) -> None:
    """A request as the helper's peer would build it, odd bytes and all."""
    odd = os.fsdecode(b'q"b\\s\nn\tt \xc3\xa9 \xff end')
    records = [
        ("uid", "1000"),
        ("gids", "1000"),
        ("gids", "27"),
        ("cwd", "/home/ü"),
        ("arg", "helper=/usr/local/bin/rankwire"),
        ("opt", "container-image=/x.sif"),
        ("opt", "container-writable=1"),
        ("env", f"ODD={odd}"),
        ("env", "EMPTY="),
        ("checked", '{"binds": ["/a:/b:ro"], "workdir": null}'),
    ]
    proc = run(frame_test, frame.encode(records))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == printed(
        [(k.encode(), v.encode("utf-8", "surrogateescape")) for k, v in records]
    )


KEYS = st.text(st.characters(blacklist_characters="=\0", codec="utf-8"), min_size=1)
VALUES = st.text(st.characters(blacklist_characters="\0", codec="utf-8")) | st.binary().filter(
    lambda b: b"\0" not in b
).map(os.fsdecode)


@settings(max_examples=60, deadline=None)
@given(records=st.lists(st.tuples(KEYS, VALUES), max_size=8))
def test_anything_python_encodes_the_shim_decodes(
    frame_test: Path, records: list[tuple[str, str]]
) -> None:
    data = frame.encode(records)
    proc = run(frame_test, data)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == printed(
        [(k.encode(), v.encode("utf-8", "surrogateescape")) for k, v in records]
    )
    assert frame.decode(data) == records
