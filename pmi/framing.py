"""PMI framing, below the messages: bytes ↔ (cmd, fields) for PMI-1 lines and PMI-2 bodies.

* PMI-1 ("simple"): one message per line, `cmd=<name> key=value ...\\n`; values cannot hold
  spaces but may hold `=`; a line is at most LINE_MAX bytes, newline included.
* PMI-2: a 6-byte decimal length (space padded) then `key=value;` pairs, a `;` inside a
  value doubled; a body is at most FRAME_MAX bytes.

`parse_*` and the readers raise RemoteProtocolError (the peer's bytes), `format_*` raise
LocalProtocolError (what we were asked to send). PMI strings are C strings of arbitrary
bytes: they are decoded with surrogateescape, so nothing is lost either way.
"""

from __future__ import annotations

from typing import Optional

from rankwire.pmi.errors import LocalProtocolError, RemoteProtocolError
from rankwire.pmi.messages import KEY_MAX, VALUE_MAX

LINE_MAX = 1024  # PMI-1, newline included
FRAME_MAX = 64 * 1024  # PMI-2 body

Fields = dict[str, str]


def as_text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def as_raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def show(raw: bytes, limit: int = 60) -> str:
    return repr(raw[:limit]) + ("..." if len(raw) > limit else "")


# -- PMI-1 ("simple") -------------------------------------------------------------------------
def parse_line(line: bytes) -> tuple[str, Fields]:
    """`cmd=name a=b c=d=e` (no newline) → ("name", {"a": "b", "c": "d=e"})."""
    fields: Fields = {}
    for token in as_text(line).split(" "):
        if not token:
            continue
        key, eq, value = token.partition("=")
        if not eq or not key:
            raise RemoteProtocolError(f"PMI-1 token {token[:60]!r} is not key=value")
        fields[key] = value
    if "cmd" not in fields:
        raise RemoteProtocolError(f"PMI-1 line without cmd=: {show(line)}")
    return fields.pop("cmd"), fields


def format_line(cmd: str, *pairs: tuple[str, object]) -> bytes:
    tokens = ["cmd=" + cmd]
    for key, value in pairs:
        text = value if isinstance(value, str) else str(value)
        if " " in text or "\n" in text:
            raise LocalProtocolError(f"PMI-1 cannot carry {key}={text[:60]!r} (space or newline)")
        tokens.append(f"{key}={text}")
    line = as_raw(" ".join(tokens) + "\n")
    if len(line) > LINE_MAX:
        raise LocalProtocolError(f"PMI-1 line of {len(line)} bytes (max {LINE_MAX}): {cmd}")
    return line


class LineReader:
    """Splits a byte stream into PMI-1 lines; an overlong line is reported once and skipped."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self._skipping = False

    def next_line(self) -> Optional[bytes]:
        while True:
            end = self.buf.find(b"\n")
            if self._skipping:
                if end < 0:
                    self.buf.clear()
                    return None
                del self.buf[: end + 1]
                self._skipping = False
                continue
            if end < 0:
                if len(self.buf) >= LINE_MAX:
                    self.buf.clear()
                    self._skipping = True
                    raise RemoteProtocolError(f"PMI-1 line longer than {LINE_MAX} bytes")
                return None
            if end + 1 > LINE_MAX:
                del self.buf[: end + 1]
                raise RemoteProtocolError(f"PMI-1 line of {end + 1} bytes (max {LINE_MAX})")
            line = bytes(self.buf[:end])
            del self.buf[: end + 1]
            return line


# -- PMI-2 ------------------------------------------------------------------------------------
def parse_body(body: bytes) -> tuple[str, Fields]:
    """`cmd=kvs-put;key=k;value=a;;b;` → ("kvs-put", {"key": "k", "value": "a;b"})."""
    fields: Fields = {}
    cmd: Optional[str] = None
    i, n = 0, len(body)
    while i < n:
        eq = body.find(b"=", i)
        if eq < 0:
            raise RemoteProtocolError(f"PMI-2 pair without '=': {show(body[i:])}")
        key = body[i:eq]
        if not key or b";" in key or len(key) > KEY_MAX:
            raise RemoteProtocolError(f"PMI-2 bad key {show(key)}")
        value = bytearray()
        j = eq + 1
        while True:
            semi = body.find(b";", j)
            if semi < 0:
                raise RemoteProtocolError(f"PMI-2 value not terminated by ';': {show(body[eq:])}")
            if body[semi + 1 : semi + 2] == b";":
                value += body[j : semi + 1]
                j = semi + 2
                continue
            value += body[j:semi]
            i = semi + 1
            break
        if len(value) > VALUE_MAX:
            raise RemoteProtocolError(f"PMI-2 value of {len(value)} bytes (max {VALUE_MAX})")
        if cmd is None:
            if key != b"cmd":
                raise RemoteProtocolError(f"PMI-2 message must start with cmd=: {show(body)}")
            cmd = as_text(bytes(value))
        else:
            fields[as_text(key)] = as_text(bytes(value))
    if cmd is None:
        raise RemoteProtocolError("empty PMI-2 message")
    return cmd, fields


def format_frame(cmd: str, *pairs: tuple[str, object]) -> bytes:
    parts = [b"cmd=" + as_raw(cmd) + b";"]
    for key, value in pairs:
        raw = as_raw(str(value))
        if len(raw) > VALUE_MAX:
            raise LocalProtocolError(f"PMI-2 value of {len(raw)} bytes (max {VALUE_MAX}): {key}")
        parts.append(as_raw(key) + b"=" + raw.replace(b";", b";;") + b";")
    body = b"".join(parts)
    if len(body) > FRAME_MAX:
        raise LocalProtocolError(f"PMI-2 message of {len(body)} bytes (max {FRAME_MAX})")
    return f"{len(body):<6d}".encode() + body


class FrameReader:
    """Splits a byte stream into PMI-2 bodies; a bad length header loses the stream (fatal)."""

    def __init__(self, buf: bytearray) -> None:
        self.buf = buf

    def next_body(self) -> Optional[bytes]:
        if len(self.buf) < 6:
            return None
        header = bytes(self.buf[:6]).strip(b" ")
        if not header.isdigit() or len(header) == 0:
            raise RemoteProtocolError(
                f"PMI-2 length header {show(bytes(self.buf[:6]))} is not a number", fatal=True
            )
        length = int(header)
        if length > FRAME_MAX:
            raise RemoteProtocolError(
                f"PMI-2 message of {length} bytes announced (max {FRAME_MAX})", fatal=True
            )
        if len(self.buf) < 6 + length:
            return None
        body = bytes(self.buf[6 : 6 + length])
        del self.buf[: 6 + length]
        return body
