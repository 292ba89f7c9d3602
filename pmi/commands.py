"""The PMI command table: how every message of `pmi.messages` is spelled in PMI-1 and PMI-2.

One `Command` per message dataclass gives its `Spelling` in each protocol that carries it:
the `cmd=` name and the fields in wire order (`pmi.fields`: attribute, wire name, kind).
Requests also name the reply that answers them. Both directions come from this table:
`spell_*` turns a message into a name and pairs, `read_*` turns a parsed name and fields
back into a message. Adding a PMI-2 command is one entry here plus its dataclass.

Replies with no name of their own are named after the request they answer: in PMI-2
`<request>-response`, in PMI-1 the reply name of that request (`put` → `put_result`), or
`error` when the request is unknown. Commands this implementation does not serve are
listed in UNSUPPORTED; they decode to `Unsupported(cmd)` (MPICH's multi-line
`mcmd=spawn` is framed by the codec, which reports it as `spawn`).
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Sequence
from typing import Any, Optional, cast

from rankwire.pmi.errors import LocalProtocolError, RemoteProtocolError
from rankwire.pmi.fields import (
    Field,
    Flag,
    FoundByFlag,
    FoundByRc,
    Int,
    Key,
    Kind,
    OptionalInt,
    Pair,
    Text,
    Value,
    const,
    one_line,
    pmi1_words,
    read_int,
)
from rankwire.pmi.framing import Fields
from rankwire.pmi.messages import (
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
from rankwire.record import record


@record
class Spelling:
    """A message in one protocol. `name` None: named after the request it answers.
    `set_lines` (PMI-1 `initack`): `cmd=<name>` then one `cmd=set <field>` line per field.
    `rc_is_result` (PMI-1 `get_result`): the fields read `rc` themselves, rc != 0 is a
    result (not found), not an error."""

    name: Optional[str]
    fields: tuple[Field, ...] = ()
    set_lines: bool = False
    rc_is_result: bool = False

    def read(self, message: type[Any], fields: Fields, cmd: str) -> object:
        return message(**{f.attr: f.read(fields, cmd) for f in self.fields if f.attr})

    def write(self, message: object) -> list[Pair]:
        return [pair for f in self.fields for pair in f.write(message)]


@record
class Command:
    """One message: its spelling per protocol (None: that protocol cannot carry it) and, for
    a request, the reply that answers it (None: none does)."""

    message: type[Any]
    pmi1: Optional[Spelling] = None
    pmi2: Optional[Spelling] = None
    reply: Optional[type[Any]] = None

    def spelling(self, version: int) -> Optional[Spelling]:
        return self.pmi1 if version == 1 else self.pmi2


INT = Int()
TEXT = Text()
KEY = Key()
FLAG = Flag()
RC_OK = const("rc", "0")
RC_FAILED = const("rc", "-1")


def _f(name: str, attr: str, kind: Kind = TEXT, *aliases: str) -> Field:
    return Field(name, attr, kind, aliases)


# fmt: off
COMMANDS: tuple[Command, ...] = (
    # -- requests (client → server) --------------------------------------------------------
    Command(Init, reply=InitReply,  # PMI-1 in both protocols: version 2 switches to PMI-2
            pmi1=Spelling("init", (_f("pmi_version", "version", INT),
                                   _f("pmi_subversion", "subversion", INT)))),
    Command(InitAck, reply=InitAckReply,
            pmi1=Spelling("initack", (_f("pmiid", "pmiid", INT),))),
    Command(FullInit, reply=FullInitReply,
            # MPICH sends pmirank (PMI_ID or PMI_RANK), Slurm's libpmi2 srcid or pmirank.
            pmi2=Spelling("fullinit", (
                _f("pmijobid", "jobid", Text(default="", omit_empty=True)),
                _f("pmirank", "pmiid", OptionalInt(), "srcid", "pmiid"),
                _f("threaded", "threaded", FLAG)))),
    Command(GetMaxes, reply=MaxesReply, pmi1=Spelling("get_maxes")),
    Command(GetAppnum, reply=AppnumReply, pmi1=Spelling("get_appnum")),
    Command(GetKvsName, reply=KvsNameReply,
            pmi1=Spelling("get_my_kvsname"), pmi2=Spelling("job-getid")),
    Command(GetUniverseSize, reply=UniverseSizeReply, pmi1=Spelling("get_universe_size")),
    Command(Put, reply=PutReply,
            pmi1=Spelling("put", (_f("kvsname", "kvsname", Text(default="")),
                                  _f("key", "key", KEY), _f("value", "value", Value()))),
            pmi2=Spelling("kvs-put", (_f("key", "key", KEY),
                                      _f("value", "value", Value(checked=False))))),
    Command(Get, reply=GetReply,
            pmi1=Spelling("get", (_f("kvsname", "kvsname", Text(default="")),
                                  _f("key", "key", KEY))),
            pmi2=Spelling("kvs-get", (_f("jobid", "kvsname", Text(default="")),
                                      const("srcid", "-1"), _f("key", "key", KEY)))),
    Command(GetJobAttr, reply=GetReply,
            pmi2=Spelling("info-getjobattr", (_f("key", "key", KEY),))),
    Command(PutNodeAttr, reply=PutReply,
            pmi2=Spelling("info-putnodeattr", (_f("key", "key", KEY),
                                               _f("value", "value", Value(checked=False))))),
    Command(GetNodeAttr, reply=GetReply,
            pmi2=Spelling("info-getnodeattr", (_f("key", "key", KEY),
                                               _f("wait", "wait", FLAG)))),
    Command(Fence, reply=FenceReply, pmi1=Spelling("barrier_in"), pmi2=Spelling("kvs-fence")),
    Command(Finalize, reply=FinalizeReply,
            pmi1=Spelling("finalize"), pmi2=Spelling("finalize")),
    Command(Abort,  # no reply: the server kills the job
            pmi1=Spelling("abort", (
                _f("exitcode", "code", Int(default=1)),
                _f("message", "message",
                   Text(default="", spell=pmi1_words, omit_empty=True)))),
            pmi2=Spelling("abort", (
                const("isworld", "TRUE"),
                _f("msg", "message", Text(default=""), "message"),
                _f("exitcode", "code", Int(default=1))))),
    # -- replies (server → client) ---------------------------------------------------------
    Command(InitReply,
            pmi1=Spelling("response_to_init", (_f("pmi_version", "version", INT),
                                               _f("pmi_subversion", "subversion", INT),
                                               RC_OK))),
    Command(InitAckReply,
            pmi1=Spelling("initack", (_f("size", "size", INT), _f("rank", "rank", INT),
                                      const("debug", "0")), set_lines=True)),
    Command(FullInitReply,
            pmi2=Spelling("fullinit-response", (
                RC_OK, const("pmi-version", "2"), const("pmi-subversion", "0"),
                _f("rank", "rank", INT), _f("size", "size", INT), _f("appnum", "appnum", INT),
                const("debugged", "FALSE"), const("pmiverbose", "FALSE")))),
    Command(MaxesReply,
            pmi1=Spelling("maxes", (RC_OK, _f("kvsname_max", "kvsname_max", INT),
                                    _f("keylen_max", "keylen_max", INT),
                                    _f("vallen_max", "vallen_max", INT)))),
    Command(AppnumReply, pmi1=Spelling("appnum", (RC_OK, _f("appnum", "appnum", INT)))),
    Command(KvsNameReply,
            pmi1=Spelling("my_kvsname", (RC_OK, _f("kvsname", "name"))),
            pmi2=Spelling("job-getid-response", (RC_OK, _f("jobid", "name")))),
    Command(UniverseSizeReply,
            pmi1=Spelling("universe_size", (RC_OK, _f("size", "size", INT)))),
    Command(PutReply,
            pmi1=Spelling("put_result", (RC_OK, const("msg", "success"))),
            pmi2=Spelling(None, (RC_OK,))),
    Command(GetReply,
            pmi1=Spelling("get_result", (_f("value", "value", FoundByRc()),), rc_is_result=True),
            pmi2=Spelling(None, (RC_OK, _f("value", "value", FoundByFlag())))),
    Command(FenceReply, pmi1=Spelling("barrier_out", (RC_OK,)), pmi2=Spelling(None, (RC_OK,))),
    Command(FinalizeReply,
            pmi1=Spelling("finalize_ack", (RC_OK,)), pmi2=Spelling(None, (RC_OK,))),
    Command(ErrorReply,  # a client reads any rc != 0 as one (text absent: a default)
            pmi1=Spelling(None, (RC_FAILED, _f("msg", "message", Text(spell=pmi1_words)))),
            pmi2=Spelling(None, (RC_FAILED, _f("errmsg", "message", Text(spell=one_line))))),
)

# Well-formed commands rankwire does not serve → the name of the reply they expect.
UNSUPPORTED: dict[int, dict[str, str]] = {
    1: {"publish_name": "publish_result", "unpublish_name": "unpublish_result",
        "lookup_name": "lookup_result"},
    2: {name: f"{name}-response" for name in (
        "spawn", "job-connect", "job-disconnect", "name-publish", "name-unpublish",
        "name-lookup", "ring")},
}
# fmt: on
SPAWN = "spawn"  # what a PMI-1 mcmd=spawn sequence reports; answered with spawn_result
NO_REQUEST = "error"  # names a reply that answers no known request


# -- the table, indexed ------------------------------------------------------------------------
class Table:
    """Commands indexed for both directions. `request_types`: the messages that are requests
    (default: the `Request` union); every other message is a reply."""

    def __init__(
        self, commands: Sequence[Command], request_types: Iterable[type] = typing.get_args(Request)
    ) -> None:
        self.request_types = frozenset(request_types)
        self.by_type = {c.message: c for c in commands}
        self.requests: dict[int, dict[str, Command]] = {1: {}, 2: {}}  # by request name
        self.replies: dict[int, dict[str, Command]] = {1: {}, 2: {}}  # by reply name
        self.pmi1_answer = {**UNSUPPORTED[1], SPAWN: "spawn_result"}  # request → reply name
        self.set_replies: dict[str, Command] = {}  # PMI-1 replies spelled as set lines
        self.error_text: dict[int, str] = {}  # the field an ErrorReply's message travels in
        for command in commands:
            for version in (1, 2):
                spelling = command.spelling(version)
                if spelling is not None:
                    self._add(command, version, spelling)

    def _add(self, command: Command, version: int, spelling: Spelling) -> None:
        if command.message in self.request_types:
            assert spelling.name is not None, command
            self.requests[version][spelling.name] = command
            reply = self.by_type[command.reply] if command.reply else None
            answer = reply.spelling(version) if reply else None
            if reply is None or answer is None:
                return
            if version == 1 and answer.name is not None:
                self.pmi1_answer[spelling.name] = answer.name
            if version == 2:  # PMI-2 replies are named after the request they answer
                self.replies[2][f"{spelling.name}-response"] = reply
        elif spelling.set_lines:
            assert spelling.name is not None, command
            self.set_replies[spelling.name] = command
        elif spelling.name is not None:
            self.replies[version][spelling.name] = command
        if command.message is ErrorReply:
            self.error_text[version] = next(f.name for f in spelling.fields if f.attr == "message")

    def spelling_of(self, version: int, message: object, request: bool) -> Spelling:
        """The spelling of a request (or reply) message (LocalProtocolError: it has none)."""
        for cls in type(message).__mro__:
            if cls in self.by_type and (cls in self.request_types) == request:
                spelling = self.by_type[cls].spelling(version)
                if spelling is not None:
                    return spelling
                break
        raise LocalProtocolError(f"{type(message).__name__} has no PMI-{version} form")


TABLE = Table(COMMANDS)


# -- the two directions -----------------------------------------------------------------------
def spell_request(version: int, req: Request) -> tuple[str, list[Pair]]:
    """A request as its `cmd=` name and pairs in wire order."""
    spelling = TABLE.spelling_of(version, req, request=True)
    assert spelling.name is not None
    return spelling.name, spelling.write(req)


def read_request(version: int, cmd: str, fields: Fields) -> Request:
    """A parsed request back as a message (RemoteProtocolError: malformed or unknown)."""
    command = TABLE.requests[version].get(cmd)
    if command is None:
        if cmd in UNSUPPORTED[version]:
            return Unsupported(cmd)
        raise RemoteProtocolError(f"unknown PMI-{version} command {cmd!r}")
    spelling = command.spelling(version)
    assert spelling is not None
    return cast(Request, spelling.read(command.message, fields, cmd))


@record
class SpelledReply:
    name: str
    pairs: list[Pair]
    set_lines: bool = False


def spell_reply(version: int, reply: Reply, answering: str) -> SpelledReply:
    """A reply to the request named `answering` ("" or NO_REQUEST: none known)."""
    spelling = TABLE.spelling_of(version, reply, request=False)
    name = spelling.name
    if name is None and version == 1:
        name = TABLE.pmi1_answer.get(answering, NO_REQUEST)
    elif name is None:
        name = f"{answering or NO_REQUEST}-response"
    return SpelledReply(name, spelling.write(reply), spelling.set_lines)


def read_reply(version: int, cmd: str, fields: Fields) -> Reply:
    """A parsed reply back as a message; rc != 0 is an ErrorReply unless the reply reads
    rc itself. PMI-1 replies may leave rc out (Hydra's barrier_out), PMI-2 ones may not."""
    rc = read_int(fields, "rc", cmd, 0 if version == 1 else None)
    command = TABLE.replies[version].get(cmd)
    spelling = command.spelling(version) if command else None
    if command is None or spelling is None or not spelling.rc_is_result:
        if rc != 0 or (version == 1 and cmd == NO_REQUEST):
            return ErrorReply(fields.get(TABLE.error_text[version], f"{cmd} failed with rc={rc}"))
        if command is None or spelling is None:
            raise RemoteProtocolError(f"unexpected PMI-{version} reply cmd={cmd}")
    return cast(Reply, spelling.read(command.message, fields, cmd))


def set_reply(cmd: str) -> Optional[Command]:
    """The PMI-1 reply that `cmd=<cmd>` opens and `cmd=set` lines complete, if any."""
    return TABLE.set_replies.get(cmd)


def read_set_reply(command: Command, fields: Fields) -> Reply:
    """A PMI-1 set-lines reply from the fields its `cmd=set` lines carried."""
    assert command.pmi1 is not None
    return cast(Reply, command.pmi1.read(command.message, fields, "set"))
