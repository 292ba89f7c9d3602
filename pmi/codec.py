"""Sans-I/O PMI-1 and PMI-2 codecs: bytes in → typed messages out, messages in → bytes.

Both protocols carry the same requests and replies (`pmi.messages`). How each message is
spelled comes from one table (`pmi.commands`), the byte framing from `pmi.framing`; the
codecs add the state of one connection:

* PMI-1 ("simple"): one message per line, `cmd=<name> key=value ...\\n`. MPICH's
  multi-line `mcmd=spawn` blocks are consumed whole and surface as `Unsupported("spawn")`.
* PMI-2: length-prefixed `key=value;` bodies. A PMI-2 connection opens with the PMI-1 line
  `cmd=init pmi_version=2` and switches to PMI-2 framing right after it; both codecs handle
  that switch.

`ServerCodec` decodes requests and encodes replies, `ClientCodec` the reverse. Neither does
I/O: feed bytes with `receive_data()`, pull messages with `next_event()` (None = need more
bytes), write what `send()` returns. Clients speak strictly request → reply, so a server
reply answers the last request decoded (that picks the PMI-2 response name and the echoed
`thrid`). Limits: keys ≤ 64 bytes, values ≤ 1024 bytes, PMI-1 lines ≤ 1024 bytes, PMI-2
bodies ≤ 64 KiB.

Errors (`pmi.errors`), as in h11: malformed input from the peer raises
`RemoteProtocolError`; after one with `fatal=True` the byte stream cannot be trusted any
more (close the connection), otherwise the bad message was skipped and decoding goes on.
Asking `send()` for something the protocol cannot carry, or that is not allowed at this
point, raises `LocalProtocolError` and produces no bytes.
"""

from __future__ import annotations

from typing import Optional

from rankwire.pmi.commands import (
    NO_REQUEST,
    SPAWN,
    Command,
    read_reply,
    read_request,
    read_set_reply,
    set_reply,
    spell_reply,
    spell_request,
)
from rankwire.pmi.errors import LocalProtocolError, RemoteProtocolError
from rankwire.pmi.fields import read_int
from rankwire.pmi.framing import (
    Fields,
    FrameReader,
    LineReader,
    format_frame,
    format_line,
    parse_body,
    parse_line,
)
from rankwire.pmi.messages import Init, InitAck, InitReply, Reply, Request, Unsupported

SPAWN_MAX = 64 * 1024  # bytes of one PMI-1 mcmd=spawn sequence


def encode_request(version: int, req: Request) -> bytes:
    name, pairs = spell_request(version, req)
    return format_line(name, *pairs) if version == 1 else format_frame(name, *pairs)


def encode_reply(version: int, reply: Reply, answering: str, thrid: Optional[str] = None) -> bytes:
    spelled = spell_reply(version, reply, answering)
    if version == 2:
        head = [("thrid", thrid)] if thrid is not None else []
        return format_frame(spelled.name, *head, *spelled.pairs)
    if spelled.set_lines:
        return format_line(spelled.name) + b"".join(
            format_line("set", pair) for pair in spelled.pairs
        )
    return format_line(spelled.name, *spelled.pairs)


class ServerCodec:
    """Server end of one connection: requests out of `next_event()`, replies into `send()`.

    Starts in PMI-1; `Init(version=2)` as the first request (after an optional `InitAck`)
    switches the rest of the stream to PMI-2 framing. `version` tells which one is spoken.
    """

    def __init__(self) -> None:
        self.version = 1
        self._lines = LineReader()
        self._frames = FrameReader(self._lines.buf)
        self._broken: Optional[RemoteProtocolError] = None
        self._started = False  # a request other than initack was decoded
        self._pending_cmd = ""  # wire name of the request the next reply answers
        self._thrid: Optional[str] = None
        self._spawn_bytes: Optional[int] = None  # inside an mcmd=spawn sequence
        self._spawn_counts: dict[bytes, bytes] = {}  # spawnssofar / totspawns of this block

    def receive_data(self, data: bytes) -> None:
        self._lines.buf += data

    def next_event(self) -> Optional[Request]:
        """The next complete request, None if more bytes are needed."""
        if self._broken is not None:
            raise self._broken
        try:
            return self._next_pmi2() if self.version == 2 else self._next_pmi1()
        except RemoteProtocolError as err:
            if err.fatal:
                self._broken = err
            raise

    def send(self, reply: Reply) -> bytes:
        """Bytes answering the last decoded request."""
        if isinstance(reply, InitReply):
            return encode_reply(1, reply, "init")
        if self.version == 2:
            return encode_reply(2, reply, self._pending_cmd, self._thrid)
        return encode_reply(1, reply, self._pending_cmd)

    def _next_pmi1(self) -> Optional[Request]:
        while True:
            line = self._lines.next_line()
            if line is None:
                return None
            if self._spawn_bytes is not None or line.strip() == b"mcmd=spawn":
                req = self._spawn_line(line)
                if req is None:
                    continue
                return req
            self._pending_cmd = NO_REQUEST
            cmd, fields = parse_line(line)
            self._pending_cmd = cmd
            return self._check_start(read_request(1, cmd, fields))

    def _spawn_line(self, line: bytes) -> Optional[Request]:
        """Consume one line of an mcmd=spawn sequence; Unsupported("spawn") at its end."""
        self._spawn_bytes = (self._spawn_bytes or 0) + len(line) + 1
        if self._spawn_bytes > SPAWN_MAX:
            raise RemoteProtocolError(f"mcmd=spawn longer than {SPAWN_MAX} bytes", fatal=True)
        key, _, value = line.partition(b"=")
        if key in (b"spawnssofar", b"totspawns"):
            self._spawn_counts[key] = value
        if line.strip() != b"endcmd":
            return None
        sofar = self._spawn_counts.get(b"spawnssofar", b"")
        total = self._spawn_counts.get(b"totspawns", b"")
        self._spawn_counts = {}
        if sofar.isdigit() and total.isdigit() and int(sofar) < int(total):
            return None  # more blocks follow before the client waits for the reply
        self._spawn_bytes = None
        self._pending_cmd = SPAWN
        return self._check_start(Unsupported(SPAWN))

    def _next_pmi2(self) -> Optional[Request]:
        body = self._frames.next_body()
        if body is None:
            return None
        self._pending_cmd, self._thrid = "", None
        cmd, fields = parse_body(body)
        self._pending_cmd = cmd
        self._thrid = fields.pop("thrid", None)
        return read_request(2, cmd, fields)

    def _check_start(self, req: Request) -> Request:
        if isinstance(req, InitAck):
            if self._started:
                raise RemoteProtocolError("initack must come first")
            return req
        if isinstance(req, Init):
            if self._started:
                raise RemoteProtocolError("init sent twice or after other commands")
            if req.version == 2:
                self.version = 2
        self._started = True
        return req


class ClientCodec:
    """Client end: requests into `send()`, replies out of `next_event()`.

    `version` 1 or 2. For version 2 the `Init` request and its reply are PMI-1 lines, then
    the codec speaks PMI-2. A PMI-1 `initack` reply (four lines) comes out as one
    `InitAckReply`.
    """

    def __init__(self, version: int) -> None:
        if version not in (1, 2):
            raise ValueError(f"PMI version must be 1 or 2, got {version}")
        self.version = version
        self._lines = LineReader()
        self._frames = FrameReader(self._lines.buf)
        self._framed = False  # PMI-2 framing active
        self._sets: Optional[tuple[Command, Fields]] = None  # inside a set-lines reply

    def send(self, req: Request) -> bytes:
        if isinstance(req, (Init, InitAck)) or self.version == 1:
            if self._framed:
                raise LocalProtocolError(f"{type(req).__name__} after the PMI-2 switch")
            return encode_request(1, req)
        return encode_request(2, req)

    def receive_data(self, data: bytes) -> None:
        self._lines.buf += data

    def next_event(self) -> Optional[Reply]:
        if self._framed:
            body = self._frames.next_body()
            if body is None:
                return None
            cmd, fields = parse_body(body)
            fields.pop("thrid", None)
            return read_reply(2, cmd, fields)
        while True:
            line = self._lines.next_line()
            if line is None:
                return None
            cmd, fields = parse_line(line)
            opened = set_reply(cmd)
            if opened is not None and read_int(fields, "rc", cmd, 0) == 0:
                self._sets = (opened, {})
                continue
            if cmd == "set" and self._sets is not None:
                command, got = self._sets
                assert command.pmi1 is not None
                for field in command.pmi1.fields:  # set lines carry integers
                    if field.name in fields:
                        read_int(fields, field.name, cmd)
                        got[field.name] = fields[field.name]
                if len(got) < len(command.pmi1.fields):
                    continue
                self._sets = None
                return read_set_reply(command, got)
            reply = read_reply(1, cmd, fields)
            if isinstance(reply, InitReply) and self.version == 2:
                self._framed = True
            return reply
