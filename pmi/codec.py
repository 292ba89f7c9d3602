"""Sans-I/O PMI-1 and PMI-2 wire codecs: bytes in → typed messages out, messages in → bytes.

Both protocols carry the same requests and replies (`pmi.messages`); each codec only knows
how to frame and spell them:

* PMI-1 ("simple"): one message per line, `cmd=<name> key=value ...\\n`; values cannot hold
  spaces but may hold `=`; a line is at most 1024 bytes. MPICH's multi-line `mcmd=spawn`
  blocks are consumed whole and surface as `Unsupported("spawn")`.
* PMI-2: a 6-byte decimal length (space padded) then `key=value;` pairs, a `;` inside a value
  doubled. A PMI-2 connection opens with the PMI-1 line `cmd=init pmi_version=2` and switches
  to PMI-2 framing right after it; both codecs handle that switch.

`ServerCodec` decodes requests and encodes replies, `ClientCodec` the reverse. Neither does
I/O: feed bytes with `receive_data()`, pull messages with `next_event()` (None = need more
bytes), write what `send()` returns. Clients speak strictly request → reply, so a server
reply answers the last request decoded (that picks the PMI-2 response name and the echoed
`thrid`). Limits: keys ≤ 64 bytes, values ≤ 1024 bytes, PMI-1 lines ≤ 1024 bytes, PMI-2
bodies ≤ 64 KiB. Every malformed input raises `PmiProtocolError`; after one with
`fatal=True` the byte stream cannot be trusted any more (close the connection), otherwise
the bad message was skipped and decoding goes on.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

from rankwire.pmi.messages import (
    KEY_MAX,
    VALUE_MAX,
    Abort,
    AppnumReply,
    ErrorReply,
    Fence,
    FenceReply,
    Finalize,
    FinalizeReply,
    FullInit,
    FullInitReply,
    Get,
    GetAppnum,
    GetJobAttr,
    GetKvsName,
    GetMaxes,
    GetNodeAttr,
    GetReply,
    GetUniverseSize,
    Init,
    InitAck,
    InitAckReply,
    InitReply,
    KvsNameReply,
    MaxesReply,
    Put,
    PutNodeAttr,
    PutReply,
    Reply,
    Request,
    UniverseSizeReply,
    Unsupported,
)

LINE_MAX = 1024  # PMI-1, newline included
FRAME_MAX = 64 * 1024  # PMI-2 body
SPAWN_MAX = 64 * 1024  # bytes of one PMI-1 mcmd=spawn sequence
ERROR_MSG_MAX = 256

_INT = re.compile(rb"-?[0-9]{1,10}")


class PmiProtocolError(Exception):
    """Malformed PMI input or a message the other side's protocol cannot carry."""

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


Fields = dict[str, str]


# -- helpers --------------------------------------------------------------------------------
def _text(raw: bytes) -> str:
    # PMI strings are C strings of arbitrary bytes; keep them lossless.
    return raw.decode("utf-8", "surrogateescape")


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _show(raw: bytes, limit: int = 60) -> str:
    return repr(raw[:limit]) + ("..." if len(raw) > limit else "")


def _field(fields: Fields, name: str, cmd: str) -> str:
    if name not in fields:
        raise PmiProtocolError(f"{cmd}: missing {name}=")
    return fields[name]


def _int(fields: Fields, name: str, cmd: str, default: Optional[int] = None) -> int:
    if name not in fields and default is not None:
        return default
    text = _field(fields, name, cmd)
    if not _INT.fullmatch(_raw(text)):
        raise PmiProtocolError(f"{cmd}: {name}={text!r} is not an integer")
    return int(text)


def _bool(fields: Fields, name: str, cmd: str) -> bool:
    text = fields.get(name, "FALSE")
    if text not in ("TRUE", "FALSE"):
        raise PmiProtocolError(f"{cmd}: {name}={text!r} is not TRUE or FALSE")
    return text == "TRUE"


def _key(fields: Fields, cmd: str, name: str = "key") -> str:
    key = _field(fields, name, cmd)
    size = len(_raw(key))
    if not 0 < size <= KEY_MAX:
        raise PmiProtocolError(f"{cmd}: key of {size} bytes (1..{KEY_MAX} allowed)")
    return key


def _value(fields: Fields, cmd: str) -> str:
    value = _field(fields, "value", cmd)
    if len(_raw(value)) > VALUE_MAX:
        raise PmiProtocolError(f"{cmd}: value of {len(_raw(value))} bytes (max {VALUE_MAX})")
    return value


def _one_line(message: str) -> str:
    return " ".join(message.split())[:ERROR_MSG_MAX] or "error"


# -- PMI-1 ("simple") -------------------------------------------------------------------------
def _parse_line(line: bytes) -> tuple[str, Fields]:
    """`cmd=name a=b c=d=e` (no newline) → ("name", {"a": "b", "c": "d=e"})."""
    fields: Fields = {}
    for token in _text(line).split(" "):
        if not token:
            continue
        key, eq, value = token.partition("=")
        if not eq or not key:
            raise PmiProtocolError(f"PMI-1 token {token[:60]!r} is not key=value")
        fields[key] = value
    if "cmd" not in fields:
        raise PmiProtocolError(f"PMI-1 line without cmd=: {_show(line)}")
    return fields.pop("cmd"), fields


def _format_line(cmd: str, *pairs: tuple[str, object]) -> bytes:
    tokens = ["cmd=" + cmd]
    for key, value in pairs:
        text = value if isinstance(value, str) else str(value)
        if " " in text or "\n" in text:
            raise PmiProtocolError(f"PMI-1 cannot carry {key}={text[:60]!r} (space or newline)")
        tokens.append(f"{key}={text}")
    line = _raw(" ".join(tokens) + "\n")
    if len(line) > LINE_MAX:
        raise PmiProtocolError(f"PMI-1 line of {len(line)} bytes (max {LINE_MAX}): {cmd}")
    return line


class _LineReader:
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
                    raise PmiProtocolError(f"PMI-1 line longer than {LINE_MAX} bytes")
                return None
            if end + 1 > LINE_MAX:
                del self.buf[: end + 1]
                raise PmiProtocolError(f"PMI-1 line of {end + 1} bytes (max {LINE_MAX})")
            line = bytes(self.buf[:end])
            del self.buf[: end + 1]
            return line


_PMI1_REPLY_NAME = {
    "init": "response_to_init",
    "initack": "initack",
    "get_maxes": "maxes",
    "get_appnum": "appnum",
    "get_my_kvsname": "my_kvsname",
    "get_universe_size": "universe_size",
    "put": "put_result",
    "get": "get_result",
    "barrier_in": "barrier_out",
    "finalize": "finalize_ack",
    "publish_name": "publish_result",
    "unpublish_name": "unpublish_result",
    "lookup_name": "lookup_result",
    "spawn": "spawn_result",
}

_PMI1_REQUESTS: dict[str, Callable[[Fields], Request]] = {
    "init": lambda f: Init(_int(f, "pmi_version", "init"), _int(f, "pmi_subversion", "init")),
    "initack": lambda f: InitAck(_int(f, "pmiid", "initack")),
    "get_maxes": lambda f: GetMaxes(),
    "get_appnum": lambda f: GetAppnum(),
    "get_my_kvsname": lambda f: GetKvsName(),
    "get_universe_size": lambda f: GetUniverseSize(),
    "put": lambda f: Put(_key(f, "put"), _value(f, "put"), f.get("kvsname", "")),
    "get": lambda f: Get(_key(f, "get"), f.get("kvsname", "")),
    "barrier_in": lambda f: Fence(),
    "finalize": lambda f: Finalize(),
    "abort": lambda f: Abort(_int(f, "exitcode", "abort", 1), f.get("message", "")),
    "publish_name": lambda f: Unsupported("publish_name"),
    "unpublish_name": lambda f: Unsupported("unpublish_name"),
    "lookup_name": lambda f: Unsupported("lookup_name"),
}


def _pmi1_reply(reply: Reply, pending_cmd: str) -> bytes:
    if isinstance(reply, InitReply):
        return _format_line(
            "response_to_init",
            ("pmi_version", reply.version),
            ("pmi_subversion", reply.subversion),
            ("rc", 0),
        )
    if isinstance(reply, InitAckReply):
        return (
            _format_line("initack")
            + _format_line("set", ("size", reply.size))
            + _format_line("set", ("rank", reply.rank))
            + _format_line("set", ("debug", 0))
        )
    if isinstance(reply, MaxesReply):
        return _format_line(
            "maxes",
            ("rc", 0),
            ("kvsname_max", reply.kvsname_max),
            ("keylen_max", reply.keylen_max),
            ("vallen_max", reply.vallen_max),
        )
    if isinstance(reply, AppnumReply):
        return _format_line("appnum", ("rc", 0), ("appnum", reply.appnum))
    if isinstance(reply, KvsNameReply):
        return _format_line("my_kvsname", ("rc", 0), ("kvsname", reply.name))
    if isinstance(reply, UniverseSizeReply):
        return _format_line("universe_size", ("rc", 0), ("size", reply.size))
    if isinstance(reply, PutReply):
        return _format_line("put_result", ("rc", 0), ("msg", "success"))
    if isinstance(reply, GetReply):
        if reply.value is None:
            return _format_line("get_result", ("rc", -1), ("msg", "key_not_found"))
        # value last: some clients stop parsing after it (flux-core#6081).
        return _format_line("get_result", ("rc", 0), ("msg", "success"), ("value", reply.value))
    if isinstance(reply, FenceReply):
        return _format_line("barrier_out", ("rc", 0))
    if isinstance(reply, FinalizeReply):
        return _format_line("finalize_ack", ("rc", 0))
    if isinstance(reply, ErrorReply):
        name = _PMI1_REPLY_NAME.get(pending_cmd, "error")
        msg = "_".join(_one_line(reply.message).split())
        return _format_line(name, ("rc", -1), ("msg", msg))
    raise PmiProtocolError(f"{type(reply).__name__} has no PMI-1 form")


def _pmi1_request(req: Request) -> bytes:
    if isinstance(req, Init):
        return _format_line(
            "init", ("pmi_version", req.version), ("pmi_subversion", req.subversion)
        )
    if isinstance(req, InitAck):
        return _format_line("initack", ("pmiid", req.pmiid))
    if isinstance(req, GetMaxes):
        return _format_line("get_maxes")
    if isinstance(req, GetAppnum):
        return _format_line("get_appnum")
    if isinstance(req, GetKvsName):
        return _format_line("get_my_kvsname")
    if isinstance(req, GetUniverseSize):
        return _format_line("get_universe_size")
    if isinstance(req, Put):
        _check_key(req.key)
        _check_value(req.value)
        return _format_line("put", ("kvsname", req.kvsname), ("key", req.key), ("value", req.value))
    if isinstance(req, Get):
        _check_key(req.key)
        return _format_line("get", ("kvsname", req.kvsname), ("key", req.key))
    if isinstance(req, Fence):
        return _format_line("barrier_in")
    if isinstance(req, Finalize):
        return _format_line("finalize")
    if isinstance(req, Abort):
        message = "_".join(_one_line(req.message).split()) if req.message else ""
        extra = (("message", message),) if message else ()
        return _format_line("abort", ("exitcode", req.code), *extra)
    raise PmiProtocolError(f"{type(req).__name__} has no PMI-1 form")


def _pmi1_reply_from(cmd: str, fields: Fields) -> Reply:
    """Client side: one PMI-1 reply line (other than initack/set) → Reply."""
    rc = _int(fields, "rc", cmd, 0)
    if cmd == "get_result":
        return GetReply(_field(fields, "value", cmd) if rc == 0 else None)
    if rc != 0 or cmd == "error":
        return ErrorReply(fields.get("msg", f"{cmd} failed with rc={rc}"))
    if cmd == "response_to_init":
        return InitReply(_int(fields, "pmi_version", cmd), _int(fields, "pmi_subversion", cmd))
    if cmd == "maxes":
        return MaxesReply(
            _int(fields, "kvsname_max", cmd),
            _int(fields, "keylen_max", cmd),
            _int(fields, "vallen_max", cmd),
        )
    if cmd == "appnum":
        return AppnumReply(_int(fields, "appnum", cmd))
    if cmd == "my_kvsname":
        return KvsNameReply(_field(fields, "kvsname", cmd))
    if cmd == "universe_size":
        return UniverseSizeReply(_int(fields, "size", cmd))
    if cmd == "put_result":
        return PutReply()
    if cmd == "barrier_out":
        return FenceReply()
    if cmd == "finalize_ack":
        return FinalizeReply()
    raise PmiProtocolError(f"unexpected PMI-1 reply cmd={cmd}")


def _check_key(key: str) -> None:
    size = len(_raw(key))
    if not 0 < size <= KEY_MAX or any(c in key for c in "=; \n"):
        raise PmiProtocolError(f"invalid PMI key {key!r}: 1..{KEY_MAX} bytes, no '=;' or spaces")


def _check_value(value: str) -> None:
    if len(_raw(value)) > VALUE_MAX:
        raise PmiProtocolError(f"PMI value of {len(_raw(value))} bytes (max {VALUE_MAX})")


# -- PMI-2 ------------------------------------------------------------------------------------
def _parse_body(body: bytes) -> tuple[str, Fields]:
    """`cmd=kvs-put;key=k;value=a;;b;` → ("kvs-put", {"key": "k", "value": "a;b"})."""
    fields: Fields = {}
    cmd: Optional[str] = None
    i, n = 0, len(body)
    while i < n:
        eq = body.find(b"=", i)
        if eq < 0:
            raise PmiProtocolError(f"PMI-2 pair without '=': {_show(body[i:])}")
        key = body[i:eq]
        if not key or b";" in key or len(key) > KEY_MAX:
            raise PmiProtocolError(f"PMI-2 bad key {_show(key)}")
        value = bytearray()
        j = eq + 1
        while True:
            semi = body.find(b";", j)
            if semi < 0:
                raise PmiProtocolError(f"PMI-2 value not terminated by ';': {_show(body[eq:])}")
            if body[semi + 1 : semi + 2] == b";":
                value += body[j : semi + 1]
                j = semi + 2
                continue
            value += body[j:semi]
            i = semi + 1
            break
        if len(value) > VALUE_MAX:
            raise PmiProtocolError(f"PMI-2 value of {len(value)} bytes (max {VALUE_MAX})")
        if cmd is None:
            if key != b"cmd":
                raise PmiProtocolError(f"PMI-2 message must start with cmd=: {_show(body)}")
            cmd = _text(bytes(value))
        else:
            fields[_text(key)] = _text(bytes(value))
    if cmd is None:
        raise PmiProtocolError("empty PMI-2 message")
    return cmd, fields


def _format_frame(cmd: str, *pairs: tuple[str, object]) -> bytes:
    parts = [b"cmd=" + _raw(cmd) + b";"]
    for key, value in pairs:
        raw = _raw(str(value))
        if len(raw) > VALUE_MAX:
            raise PmiProtocolError(f"PMI-2 value of {len(raw)} bytes (max {VALUE_MAX}): {key}")
        parts.append(_raw(key) + b"=" + raw.replace(b";", b";;") + b";")
    body = b"".join(parts)
    if len(body) > FRAME_MAX:
        raise PmiProtocolError(f"PMI-2 message of {len(body)} bytes (max {FRAME_MAX})")
    return f"{len(body):<6d}".encode() + body


class _FrameReader:
    def __init__(self, buf: bytearray) -> None:
        self.buf = buf

    def next_body(self) -> Optional[bytes]:
        if len(self.buf) < 6:
            return None
        header = bytes(self.buf[:6]).strip(b" ")
        if not header.isdigit() or len(header) == 0:
            raise PmiProtocolError(
                f"PMI-2 length header {_show(bytes(self.buf[:6]))} is not a number", fatal=True
            )
        length = int(header)
        if length > FRAME_MAX:
            raise PmiProtocolError(
                f"PMI-2 message of {length} bytes announced (max {FRAME_MAX})", fatal=True
            )
        if len(self.buf) < 6 + length:
            return None
        body = bytes(self.buf[6 : 6 + length])
        del self.buf[: 6 + length]
        return body


_PMI2_UNSUPPORTED = (
    "spawn", "job-connect", "job-disconnect", "name-publish", "name-unpublish", "name-lookup",
    "ring",
)  # fmt: skip


def _pmi2_fullinit(f: Fields) -> FullInit:
    # MPICH sends pmirank (PMI_ID or PMI_RANK), Slurm's libpmi2 srcid=PMI_ID or pmirank.
    name = next((n for n in ("pmirank", "srcid", "pmiid") if n in f), None)
    pmiid = _int(f, name, "fullinit") if name else None
    return FullInit(pmiid, f.get("pmijobid", ""), _bool(f, "threaded", "fullinit"))


def _pmi2_abort(f: Fields) -> Abort:
    return Abort(_int(f, "exitcode", "abort", 1), f.get("msg", f.get("message", "")))


_PMI2_REQUESTS: dict[str, Callable[[Fields], Request]] = {
    "fullinit": _pmi2_fullinit,
    "job-getid": lambda f: GetKvsName(),
    "kvs-put": lambda f: Put(_key(f, "kvs-put"), _value(f, "kvs-put")),
    "kvs-get": lambda f: Get(_key(f, "kvs-get"), f.get("jobid", "")),
    "kvs-fence": lambda f: Fence(),
    "info-getjobattr": lambda f: GetJobAttr(_key(f, "info-getjobattr")),
    "info-putnodeattr": lambda f: PutNodeAttr(
        _key(f, "info-putnodeattr"), _value(f, "info-putnodeattr")
    ),
    "info-getnodeattr": lambda f: GetNodeAttr(
        _key(f, "info-getnodeattr"), _bool(f, "wait", "info-getnodeattr")
    ),
    "finalize": lambda f: Finalize(),
    "abort": _pmi2_abort,
    **{name: (lambda f, name=name: Unsupported(name)) for name in _PMI2_UNSUPPORTED},
}


def _pmi2_reply(reply: Reply, pending_cmd: str, thrid: Optional[str]) -> bytes:
    name = f"{pending_cmd or 'error'}-response"
    head: tuple[tuple[str, object], ...] = (("thrid", thrid),) if thrid is not None else ()
    if isinstance(reply, FullInitReply):
        return _format_frame(
            "fullinit-response",
            *head,
            ("rc", 0),
            ("pmi-version", 2),
            ("pmi-subversion", 0),
            ("rank", reply.rank),
            ("size", reply.size),
            ("appnum", reply.appnum),
            ("debugged", "FALSE"),
            ("pmiverbose", "FALSE"),
        )
    if isinstance(reply, KvsNameReply):
        return _format_frame("job-getid-response", *head, ("rc", 0), ("jobid", reply.name))
    if isinstance(reply, (PutReply, FenceReply, FinalizeReply)):
        return _format_frame(name, *head, ("rc", 0))
    if isinstance(reply, GetReply):
        if reply.value is None:
            return _format_frame(name, *head, ("rc", 0), ("found", "FALSE"))
        return _format_frame(name, *head, ("rc", 0), ("found", "TRUE"), ("value", reply.value))
    if isinstance(reply, ErrorReply):
        return _format_frame(name, *head, ("rc", -1), ("errmsg", _one_line(reply.message)))
    raise PmiProtocolError(f"{type(reply).__name__} has no PMI-2 form")


def _pmi2_request(req: Request) -> bytes:
    if isinstance(req, FullInit):
        pairs: list[tuple[str, object]] = []
        if req.jobid:
            pairs.append(("pmijobid", req.jobid))
        if req.pmiid is not None:
            pairs.append(("pmirank", req.pmiid))
        pairs.append(("threaded", "TRUE" if req.threaded else "FALSE"))
        return _format_frame("fullinit", *pairs)
    if isinstance(req, GetKvsName):
        return _format_frame("job-getid")
    if isinstance(req, Put):
        _check_key(req.key)
        return _format_frame("kvs-put", ("key", req.key), ("value", req.value))
    if isinstance(req, Get):
        _check_key(req.key)
        return _format_frame("kvs-get", ("jobid", req.kvsname), ("srcid", -1), ("key", req.key))
    if isinstance(req, GetJobAttr):
        _check_key(req.key)
        return _format_frame("info-getjobattr", ("key", req.key))
    if isinstance(req, PutNodeAttr):
        _check_key(req.key)
        return _format_frame("info-putnodeattr", ("key", req.key), ("value", req.value))
    if isinstance(req, GetNodeAttr):
        _check_key(req.key)
        wait = "TRUE" if req.wait else "FALSE"
        return _format_frame("info-getnodeattr", ("key", req.key), ("wait", wait))
    if isinstance(req, Fence):
        return _format_frame("kvs-fence")
    if isinstance(req, Finalize):
        return _format_frame("finalize")
    if isinstance(req, Abort):
        return _format_frame(
            "abort", ("isworld", "TRUE"), ("msg", req.message), ("exitcode", req.code)
        )
    raise PmiProtocolError(f"{type(req).__name__} has no PMI-2 form")


def _pmi2_reply_from(cmd: str, fields: Fields) -> Reply:
    rc = _int(fields, "rc", cmd)
    if rc != 0:
        return ErrorReply(fields.get("errmsg", f"{cmd} failed with rc={rc}"))
    if cmd == "fullinit-response":
        return FullInitReply(
            _int(fields, "rank", cmd), _int(fields, "size", cmd), _int(fields, "appnum", cmd)
        )
    if cmd == "job-getid-response":
        return KvsNameReply(_field(fields, "jobid", cmd))
    if cmd in ("kvs-put-response", "info-putnodeattr-response"):
        return PutReply()
    if cmd in ("kvs-get-response", "info-getjobattr-response", "info-getnodeattr-response"):
        found = _bool(fields, "found", cmd)
        return GetReply(_field(fields, "value", cmd) if found else None)
    if cmd == "kvs-fence-response":
        return FenceReply()
    if cmd == "finalize-response":
        return FinalizeReply()
    raise PmiProtocolError(f"unexpected PMI-2 reply cmd={cmd}")


# -- the two ends ------------------------------------------------------------------------------
class ServerCodec:
    """Server end of one connection: requests out of `next_event()`, replies into `send()`.

    Starts in PMI-1; `Init(version=2)` as the first request (after an optional `InitAck`)
    switches the rest of the stream to PMI-2 framing. `version` tells which one is spoken.
    """

    def __init__(self) -> None:
        self.version = 1
        self._lines = _LineReader()
        self._frames = _FrameReader(self._lines.buf)
        self._broken: Optional[PmiProtocolError] = None
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
        except PmiProtocolError as err:
            if err.fatal:
                self._broken = err
            raise

    def send(self, reply: Reply) -> bytes:
        """Bytes answering the last decoded request."""
        if isinstance(reply, InitReply):
            return _pmi1_reply(reply, "init")
        if self.version == 2:
            return _pmi2_reply(reply, self._pending_cmd, self._thrid)
        return _pmi1_reply(reply, self._pending_cmd)

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
            self._pending_cmd = "error"
            cmd, fields = _parse_line(line)
            self._pending_cmd = cmd
            build = _PMI1_REQUESTS.get(cmd)
            if build is None:
                raise PmiProtocolError(f"unknown PMI-1 command {cmd!r}")
            return self._check_start(build(fields))

    def _spawn_line(self, line: bytes) -> Optional[Request]:
        """Consume one line of an mcmd=spawn sequence; Unsupported("spawn") at its end."""
        self._spawn_bytes = (self._spawn_bytes or 0) + len(line) + 1
        if self._spawn_bytes > SPAWN_MAX:
            raise PmiProtocolError(f"mcmd=spawn longer than {SPAWN_MAX} bytes", fatal=True)
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
        self._pending_cmd = "spawn"
        return self._check_start(Unsupported("spawn"))

    def _next_pmi2(self) -> Optional[Request]:
        body = self._frames.next_body()
        if body is None:
            return None
        self._pending_cmd, self._thrid = "", None
        cmd, fields = _parse_body(body)
        self._pending_cmd = cmd
        self._thrid = fields.pop("thrid", None)
        build = _PMI2_REQUESTS.get(cmd)
        if build is None:
            raise PmiProtocolError(f"unknown PMI-2 command {cmd!r}")
        return build(fields)

    def _check_start(self, req: Request) -> Request:
        if isinstance(req, InitAck):
            if self._started:
                raise PmiProtocolError("initack must come first")
            return req
        if isinstance(req, Init):
            if self._started:
                raise PmiProtocolError("init sent twice or after other commands")
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
        self._lines = _LineReader()
        self._frames = _FrameReader(self._lines.buf)
        self._framed = False  # PMI-2 framing active
        self._initack: Optional[dict[str, int]] = None

    def send(self, req: Request) -> bytes:
        if isinstance(req, (Init, InitAck)) or self.version == 1:
            if self._framed:
                raise PmiProtocolError(f"{type(req).__name__} after the PMI-2 switch")
            return _pmi1_request(req)
        return _pmi2_request(req)

    def receive_data(self, data: bytes) -> None:
        self._lines.buf += data

    def next_event(self) -> Optional[Reply]:
        if self._framed:
            body = self._frames.next_body()
            if body is None:
                return None
            cmd, fields = _parse_body(body)
            fields.pop("thrid", None)
            return _pmi2_reply_from(cmd, fields)
        while True:
            line = self._lines.next_line()
            if line is None:
                return None
            cmd, fields = _parse_line(line)
            if cmd == "initack" and _int(fields, "rc", cmd, 0) == 0:
                self._initack = {}
                continue
            if cmd == "set" and self._initack is not None:
                for name in ("size", "rank", "debug"):
                    if name in fields:
                        self._initack[name] = _int(fields, name, cmd)
                if len(self._initack) < 3:
                    continue
                got, self._initack = self._initack, None
                return InitAckReply(got["rank"], got["size"])
            reply = _pmi1_reply_from(cmd, fields)
            if isinstance(reply, InitReply) and self.version == 2:
                self._framed = True
            return reply
