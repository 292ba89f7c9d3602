"""PMI-1 / PMI-2 codecs: the wire shapes MPICH and Slurm really send, limits, fuzzing."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import socket
import typing
from typing import ClassVar, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwire.pmi import commands
from rankwire.pmi.client import Pmi1Client
from rankwire.pmi.codec import SPAWN_MAX, ClientCodec, ServerCodec
from rankwire.pmi.commands import COMMANDS, Command, Spelling, Table
from rankwire.pmi.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from rankwire.pmi.fields import Field, Int, Text
from rankwire.pmi.framing import parse_body, parse_line
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


def frame(body: bytes) -> bytes:
    return f"{len(body):<6d}".encode() + body


def decode_all(codec: ServerCodec, data: bytes) -> list[Request]:
    codec.receive_data(data)
    out = []
    while (req := codec.next_event()) is not None:
        out.append(req)
    return out


def pmi2_server() -> ServerCodec:
    codec = ServerCodec()
    assert decode_all(codec, b"cmd=init pmi_version=2 pmi_subversion=0\n") == [Init(2, 0)]
    assert (
        codec.send(InitReply(2, 0)) == b"cmd=response_to_init pmi_version=2 pmi_subversion=0 rc=0\n"
    )
    assert codec.version == 2
    return codec


# -- PMI-1 server side -----------------------------------------------------------------------
def test_pmi1_mpich_transcript_decodes() -> None:
    codec = ServerCodec()
    wire = (
        b"cmd=init pmi_version=1 pmi_subversion=1\n"
        b"cmd=get_maxes\ncmd=get_appnum\ncmd=get_my_kvsname\n"
        b"cmd=get kvsname=kvs_1 key=PMI_process_mapping\n"
        b"cmd=barrier_in\n"
        b"cmd=put kvsname=kvs_1 key=-bcast-1-0 value=2F6465762F73686D\n"
        b"cmd=put kvsname=kvs_1 key=-allgather-shm-1-3 value=segments=3\n"
        b"cmd=put kvsname=kvs_1 key=-allgather-shm-1-3-seg-2/3 value=ABCD\n"
        b"cmd=put kvsname=kvs_1 key=hostname[5] value=node-5\n"
        b"cmd=get kvsname=kvs_1 key=hostname[5]\n"
        b"cmd=finalize\n"
        b"cmd=abort exitcode=7\n"
    )
    reqs = decode_all(codec, wire)
    assert reqs == [
        Init(1, 1),
        GetMaxes(),
        GetAppnum(),
        GetKvsName(),
        Get("PMI_process_mapping", "kvs_1"),
        Fence(),
        Put("-bcast-1-0", "2F6465762F73686D", "kvs_1"),
        Put("-allgather-shm-1-3", "segments=3", "kvs_1"),
        Put("-allgather-shm-1-3-seg-2/3", "ABCD", "kvs_1"),
        Put("hostname[5]", "node-5", "kvs_1"),
        Get("hostname[5]", "kvs_1"),
        Finalize(),
        Abort(7, ""),
    ]


def test_pmi1_lines_split_anywhere_and_extra_spaces() -> None:
    codec = ServerCodec()
    wire = b"cmd=put  kvsname=k key=a   value=b=c=d\ncmd=barrier_in\n"
    got = []
    for i in range(len(wire)):
        got += decode_all(codec, wire[i : i + 1])
    assert got == [Put("a", "b=c=d", "k"), Fence()]


def test_pmi1_replies_match_what_mpich_requires() -> None:
    codec = ServerCodec()
    decode_all(codec, b"cmd=init pmi_version=1 pmi_subversion=1\n")
    assert b" rc=0" in codec.send(InitReply(1, 1))  # mandatory for MPICH
    decode_all(codec, b"cmd=get_maxes\n")
    assert (
        codec.send(MaxesReply())
        == b"cmd=maxes rc=0 kvsname_max=256 keylen_max=64 vallen_max=1024\n"
    )
    decode_all(codec, b"cmd=get kvsname=k key=x\n")
    found = codec.send(GetReply("a=b"))
    assert found == b"cmd=get_result rc=0 msg=success value=a=b\n"  # value last
    assert codec.send(GetReply(None)).startswith(b"cmd=get_result rc=-1 ")
    decode_all(codec, b"cmd=put kvsname=k key=x value=y\n")
    assert codec.send(ErrorReply("no such thing here")) == (
        b"cmd=put_result rc=-1 msg=no_such_thing_here\n"
    )


def test_pmi1_initack_reply_is_four_lines() -> None:
    codec = ServerCodec()
    assert decode_all(codec, b"cmd=initack pmiid=123456\n") == [InitAck(123456)]
    assert codec.send(InitAckReply(rank=2, size=4)) == (
        b"cmd=initack\ncmd=set size=4\ncmd=set rank=2\ncmd=set debug=0\n"
    )


def test_pmi1_spawn_is_consumed_and_rejected() -> None:
    codec = ServerCodec()
    block = (
        b"mcmd=spawn\nnprocs=2\nexecname=/bin/my prog\ntotspawns=2\nspawnssofar=%d\n"
        b"arg1=a b=c\nargcnt=1\npreput_num=0\ninfo_num=0\nendcmd\n"
    )
    assert decode_all(codec, block % 1) == []  # more blocks announced
    assert decode_all(codec, block % 2) == [Unsupported("spawn")]
    assert codec.send(ErrorReply("spawn is not supported")).startswith(b"cmd=spawn_result rc=-1")
    assert decode_all(codec, b"cmd=barrier_in\n") == [Fence()]


@pytest.mark.parametrize(
    "line",
    [
        b"garbage\n",
        b"cmd=nosuchcommand\n",
        b"key=value\n",
        b"=x cmd=put\n",
        b"cmd=put kvsname=k key=x\n",  # no value
        b"cmd=put kvsname=k value=v\n",  # no key
        b"cmd=put kvsname=k key= value=v\n",
        b"cmd=put kvsname=k key=" + b"k" * 65 + b" value=v\n",
        b"cmd=init pmi_version=one pmi_subversion=1\n",
        b"cmd=abort exitcode=99999999999\n",
        b"\n",
    ],
)
def test_pmi1_malformed_lines_are_skipped(line: bytes) -> None:
    codec = ServerCodec()
    codec.receive_data(line + b"cmd=barrier_in\n")
    with pytest.raises(RemoteProtocolError) as err:
        codec.next_event()
    assert not err.value.fatal
    assert codec.next_event() == Fence()


def test_pmi1_line_limit() -> None:
    codec = ServerCodec()
    ok = b"cmd=put kvsname=k key=x value=" + b"v" * (1023 - 30) + b"\n"
    assert len(ok) == 1024
    assert decode_all(codec, ok)[0] == Put("x", "v" * 993, "k")
    codec.receive_data(b"cmd=put kvsname=k key=x value=" + b"v" * 2000)
    with pytest.raises(RemoteProtocolError, match="longer than 1024"):
        codec.next_event()
    # the rest of the overlong line is dropped, the next line is served
    assert decode_all(codec, b"vvv\ncmd=barrier_in\n") == [Fence()]
    # a reply that cannot fit one PMI-1 line is refused, not truncated
    decode_all(codec, b"cmd=get kvsname=k key=x\n")
    with pytest.raises(LocalProtocolError, match="line of"):
        codec.send(GetReply("v" * 1024))


def test_init_after_other_commands_is_refused() -> None:
    codec = ServerCodec()
    decode_all(codec, b"cmd=get_maxes\n")
    codec.receive_data(b"cmd=init pmi_version=2 pmi_subversion=0\n")
    with pytest.raises(RemoteProtocolError, match="init"):
        codec.next_event()
    assert codec.version == 1


# -- PMI-2 server side -----------------------------------------------------------------------
def test_pmi2_slurm_libpmi2_transcript() -> None:
    codec = pmi2_server()
    reqs = decode_all(
        codec,
        frame(b"cmd=fullinit;pmijobid=9.0;pmirank=0;threaded=FALSE;")
        + frame(b"cmd=job-getid;")
        + frame(b"cmd=info-getjobattr;key=PMI_process_mapping;")
        + frame(b"cmd=kvs-put;key=k0;value=v=0;")
        + frame(b"cmd=info-putnodeattr;key=n0;value=nv0;")
        + frame(b"cmd=kvs-fence;")
        + frame(b"cmd=kvs-get;jobid=9.0;srcid=-1;key=k0;")
        + frame(b"cmd=info-getnodeattr;key=n0;wait=TRUE;")
        + frame(b"cmd=abort;isworld=TRUE;msg=bye now;")
        + frame(b"cmd=finalize;"),
    )
    assert reqs == [
        FullInit(0, "9.0", False),
        GetKvsName(),
        GetJobAttr("PMI_process_mapping"),
        Put("k0", "v=0"),
        PutNodeAttr("n0", "nv0"),
        Fence(),
        Get("k0", "9.0"),
        GetNodeAttr("n0", True),
        Abort(1, "bye now"),
        Finalize(),
    ]


def test_pmi2_srcid_and_mpich_length_padding() -> None:
    codec = pmi2_server()
    body = b"cmd=fullinit;srcid=77;threaded=FALSE;"
    header = str(len(body)).encode().ljust(6)  # MPICH: digits then spaces
    assert decode_all(codec, header + body) == [FullInit(77, "", False)]
    body = b"cmd=abort;exitcode=3;message=m;"
    assert decode_all(codec, str(len(body)).encode().rjust(6) + body) == [Abort(3, "m")]


def test_pmi2_escaping_round_trip_and_reply_names() -> None:
    codec = pmi2_server()
    body = b"cmd=kvs-put;thrid=0x55;key=k;value=a;;b;;;;=c;;;"
    assert decode_all(codec, frame(body)) == [Put("k", "a;b;;=c;")]
    assert codec.send(PutReply()) == frame(b"cmd=kvs-put-response;thrid=0x55;rc=0;")
    decode_all(codec, frame(b"cmd=info-getjobattr;key=x;"))
    assert codec.send(GetReply("v;w")) == frame(
        b"cmd=info-getjobattr-response;rc=0;found=TRUE;value=v;;w;"
    )
    assert codec.send(GetReply(None)) == frame(b"cmd=info-getjobattr-response;rc=0;found=FALSE;")
    assert codec.send(FullInitReply(1, 2, 0)) == frame(
        b"cmd=fullinit-response;rc=0;pmi-version=2;pmi-subversion=0;rank=1;size=2;appnum=0;"
        b"debugged=FALSE;pmiverbose=FALSE;"
    )
    decode_all(codec, frame(b"cmd=spawn;ncmds=1;"))
    assert codec.send(ErrorReply("no; spawn")) == frame(
        b"cmd=spawn-response;rc=-1;errmsg=no;; spawn;"
    )


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"key=k;cmd=kvs-put;",
        b"cmd=kvs-put;key=k;value=v",  # unterminated
        b"cmd=kvs-put;key=k;value=v;;",  # escaped, still unterminated
        b"cmd=kvs-put;novalue;",
        b"cmd=kvs-put;value=v;",
        b"cmd=kvs-put;key=" + b"k" * 65 + b";value=v;",
        b"cmd=kvs-put;key=k;value=" + b"v" * 1025 + b";",
        b"cmd=unknown-thing;",
        b"cmd=info-getnodeattr;key=k;wait=maybe;",
    ],
)
def test_pmi2_malformed_bodies_are_skipped(body: bytes) -> None:
    codec = pmi2_server()
    codec.receive_data(frame(body) + frame(b"cmd=kvs-fence;"))
    with pytest.raises(RemoteProtocolError) as err:
        codec.next_event()
    assert not err.value.fatal
    assert codec.next_event() == Fence()


@pytest.mark.parametrize("header", [b"abcdef", b"12 3  ", b"-5    ", b"999999"])
def test_pmi2_bad_length_is_fatal(header: bytes) -> None:
    codec = pmi2_server()
    codec.receive_data(header + b"cmd=kvs-fence;")
    for _ in range(2):  # and stays broken
        with pytest.raises(RemoteProtocolError) as err:
            codec.next_event()
        assert err.value.fatal


def test_limits_hold_exactly() -> None:
    codec = pmi2_server()
    key, value = "k" * 64, "v" * 1024
    req = decode_all(codec, frame(f"cmd=kvs-put;key={key};value={value};".encode()))
    assert req == [Put(key, value)]
    client = ClientCodec(2)
    client.send(Init(2, 0))
    client.receive_data(b"cmd=response_to_init rc=0 pmi_version=2 pmi_subversion=0\n")
    assert client.next_event() == InitReply(2, 0)
    with pytest.raises(LocalProtocolError, match="key"):
        client.send(Put("k" * 65, "v"))
    with pytest.raises(LocalProtocolError, match="1024"):
        client.send(Put("k", "v" * 1025))
    with pytest.raises(LocalProtocolError, match="no PMI-2 form"):
        client.send(GetMaxes())


# -- client side -------------------------------------------------------------------------------
def test_client_decodes_hydra_and_slurm_pmi1_replies() -> None:
    codec = ClientCodec(1)
    codec.receive_data(
        b"cmd=response_to_init pmi_version=1 pmi_subversion=1 rc=0\n"
        b"cmd=initack\ncmd=set size=4\ncmd=set rank=2\ncmd=set debug=0\n"
        b"cmd=my_kvsname rc=0 kvsname=10.0\n"
        b"cmd=get_result rc=0 value=v=0\n"  # Slurm: no msg
        b"cmd=get_result rc=1\n"  # Slurm not found
        b"cmd=get_result rc=-1 msg=key_x_not_found value=unknown\n"  # Hydra not found
        b"cmd=barrier_out\n"  # Hydra: no rc
        b"cmd=put_result rc=3 msg=full\n"
    )
    got: list[Optional[Reply]] = []
    while (reply := codec.next_event()) is not None:
        got.append(reply)
    assert got == [
        InitReply(1, 1),
        InitAckReply(rank=2, size=4),
        KvsNameReply("10.0"),
        GetReply("v=0"),
        GetReply(None),
        GetReply(None),
        FenceReply(),
        ErrorReply("full"),
    ]


def test_client_pmi2_switches_after_init() -> None:
    codec = ClientCodec(2)
    assert codec.send(Init(2, 0)) == b"cmd=init pmi_version=2 pmi_subversion=0\n"
    codec.receive_data(b"cmd=response_to_init rc=0 pmi_version=2 pmi_subversion=0\n")
    assert codec.next_event() == InitReply(2, 0)
    assert codec.send(FullInit(3, "9.0")) == frame(
        b"cmd=fullinit;pmijobid=9.0;pmirank=3;threaded=FALSE;"
    )
    codec.receive_data(frame(b"cmd=kvs-get-response;rc=0;found=TRUE;value=a;;b;"))
    assert codec.next_event() == GetReply("a;b")
    codec.receive_data(frame(b"cmd=kvs-fence-response;rc=7;errmsg=rank 2 died;"))
    assert codec.next_event() == ErrorReply("rank 2 died")


# -- the command table ---------------------------------------------------------------------------
# Samples per protocol: every (message, protocol) the table spells needs at least one here.
ROUND_TRIP: dict[int, list[object]] = {
    1: [
        Init(1, 1), InitAck(123456), GetMaxes(), GetAppnum(), GetKvsName(), GetUniverseSize(),
        Put("k", "v=1;x", "kvs_1"), Put("k", ""), Get("k", "kvs_1"), Fence(), Finalize(),
        Abort(7, "out_of_memory"), Abort(1, ""),
        InitReply(1, 1), InitAckReply(rank=2, size=4), MaxesReply(), MaxesReply(1, 2, 3),
        AppnumReply(3), KvsNameReply("kvs_1"), UniverseSizeReply(8), PutReply(),
        GetReply("v=1;x"), GetReply(None), FenceReply(), FinalizeReply(), ErrorReply("no_such_key"),
    ],
    2: [
        FullInit(3, "9.0", True), FullInit(None, "", False), GetKvsName(), Put("k", "a;b=c d"),
        Get("k", "9.0"), GetJobAttr("PMI_process_mapping"), PutNodeAttr("n", "v;"),
        GetNodeAttr("n", True), GetNodeAttr("n", False), Fence(), Finalize(), Abort(3, "bye now"),
        Abort(1, ""),
        FullInitReply(1, 2, 0), KvsNameReply("9.0"), PutReply(), GetReply("a;b"), GetReply(None),
        FenceReply(), FinalizeReply(), ErrorReply("rank 2 died"),
    ],
}  # fmt: skip
REQUEST_TYPES = typing.get_args(Request)
ENTRIES = [(c, v) for c in COMMANDS for v in (1, 2) if c.spelling(v) is not None]


def client_for(version: int) -> ClientCodec:
    client = ClientCodec(version)
    if version == 2:
        client.send(Init(2, 0))
        client.receive_data(b"cmd=response_to_init rc=0 pmi_version=2 pmi_subversion=0\n")
        assert client.next_event() == InitReply(2, 0)
    return client


def server_for(version: int) -> ServerCodec:
    return pmi2_server() if version == 2 else ServerCodec()


def wire_names(version: int, data: bytes) -> list[tuple[str, list[str]]]:
    """(cmd, field names in order) of every message in `data`, read back by the framing."""
    out = []
    while data:
        if version == 1:
            line, _, data = data.partition(b"\n")
            cmd, fields = parse_line(line)
        else:
            length = int(data[:6])
            cmd, fields = parse_body(data[6 : 6 + length])
            data = data[6 + length :]
        out.append((cmd, list(fields)))
    return out


def test_every_message_has_exactly_one_table_entry() -> None:
    messages = [c.message for c in COMMANDS]
    assert len(messages) == len(set(messages))
    everything = {*REQUEST_TYPES, *typing.get_args(Reply)} - {Unsupported}
    assert set(messages) == everything
    for command in COMMANDS:
        assert command.pmi1 or command.pmi2, command
        assert command.reply is None or command.reply in typing.get_args(Reply), command


@pytest.mark.parametrize("version", [1, 2])
def test_round_trip_samples_cover_every_table_entry(version: int) -> None:
    spelled = {c.message for c, v in ENTRIES if v == version}
    assert {type(m) for m in ROUND_TRIP[version]} == spelled


@pytest.mark.parametrize(
    ("message", "version"), [(m, v) for v in (1, 2) for m in ROUND_TRIP[v]], ids=repr
)
def test_every_table_entry_round_trips(message: object, version: int) -> None:
    """Encoding writes the table's name and fields in table order; decoding reads it back."""
    command = next(c for c in COMMANDS if c.message is type(message))
    spelling = command.spelling(version)
    assert spelling is not None
    written = [name for name, _ in spelling.write(message)]
    client, server = client_for(version), server_for(version)
    if type(message) in REQUEST_TYPES:
        wire = client.send(message)  # type: ignore[arg-type]
        assert wire_names(version, wire) == [(spelling.name, written)]
        assert decode_all(server, wire) == [message]
        return
    # a reply: first decode a request it answers (an error answers anything)
    answered = {c.message for c in COMMANDS if c.reply is type(message) and c.spelling(version)}
    request = next((m for m in ROUND_TRIP[version] if type(m) in answered), Fence())
    wire = client.send(request)  # type: ignore[arg-type]
    assert decode_all(server, wire) == [request]
    request_name = wire_names(version, wire)[0][0]
    data = server.send(message)  # type: ignore[arg-type]
    if spelling.set_lines:
        assert wire_names(version, data) == [(spelling.name, [])] + [("set", [n]) for n in written]
    else:
        name = spelling.name or (
            f"{request_name}-response" if version == 2 else commands.TABLE.pmi1_answer[request_name]
        )
        assert wire_names(version, data) == [(name, written)]
    client.receive_data(data)
    assert client.next_event() == message
    assert client.next_event() is None


@dataclasses.dataclass(frozen=True)
class CountKeys:
    """A PMI-2 command rankwire does not have: defined here, taught to the codecs below."""

    prefix: str
    limit: int = 10


def test_a_new_pmi2_command_is_one_table_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = Command(
        CountKeys,
        reply=GetReply,
        pmi2=Spelling(
            "kvs-count", (Field("prefix", "prefix", Text()), Field("max", "limit", Int(10)))
        ),
    )
    table = Table((*COMMANDS, entry), request_types=(*REQUEST_TYPES, CountKeys))
    monkeypatch.setattr(commands, "TABLE", table)
    client, server = client_for(2), pmi2_server()
    wire = client.send(CountKeys("rank-", 4))  # type: ignore[arg-type]
    assert wire == frame(b"cmd=kvs-count;prefix=rank-;max=4;")
    decoded: list[object] = [*decode_all(server, wire + frame(b"cmd=kvs-count;prefix=p;"))]
    assert decoded == [CountKeys("rank-", 4), CountKeys("p", 10)]
    reply = server.send(GetReply("7"))
    assert reply == frame(b"cmd=kvs-count-response;rc=0;found=TRUE;value=7;")
    client.receive_data(reply)
    assert client.next_event() == GetReply("7")
    with pytest.raises(LocalProtocolError, match="CountKeys has no PMI-1 form"):
        ClientCodec(1).send(CountKeys("p"))  # type: ignore[arg-type]


# -- which side is at fault ---------------------------------------------------------------------
def test_the_two_errors_are_distinct() -> None:
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert not issubclass(LocalProtocolError, RemoteProtocolError)
    assert not issubclass(RemoteProtocolError, LocalProtocolError)


@pytest.mark.parametrize(
    ("side", "version", "data", "match"),
    [
        ("server", 1, b"garbage\n", "not key=value"),
        ("server", 1, b"cmd=put kvsname=k key=x\n", "put: missing value="),
        ("server", 1, b"cmd=nosuchcommand\n", "unknown PMI-1 command"),
        ("server", 1, b"cmd=initack pmiid=x\n", "not an integer"),
        ("server", 2, frame(b"cmd=kvs-get;"), "kvs-get: missing key="),
        ("server", 2, frame(b"cmd=info-getnodeattr;key=k;wait=maybe;"), "TRUE or FALSE"),
        ("server", 2, b"abcdef", "not a number"),
        ("client", 1, b"cmd=maxes rc=0\n", "maxes: missing kvsname_max="),
        ("client", 1, b"cmd=surprise\n", "unexpected PMI-1 reply"),
        ("client", 1, b"cmd=initack\ncmd=set size=x\n", "set: size='x' is not an integer"),
        ("client", 2, frame(b"cmd=kvs-get-response;found=TRUE;"), "missing rc="),
        ("client", 2, frame(b"cmd=kvs-get-response;rc=0;found=TRUE;"), "missing value="),
        ("client", 2, frame(b"cmd=kvs-fence"), "not terminated"),
    ],
)
def test_garbage_from_the_peer_is_a_remote_error(
    side: str, version: int, data: bytes, match: str
) -> None:
    codec = server_for(version) if side == "server" else client_for(version)
    codec.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=match):
        while codec.next_event() is not None:
            pass


def _v1_server_after_get() -> ServerCodec:
    server = ServerCodec()
    assert decode_all(server, b"cmd=get kvsname=k key=x\n") == [Get("x", "k")]
    return server


@pytest.mark.parametrize(
    ("case", "match"),
    [
        (lambda: client_for(1).send(Put("a b", "v")), "invalid PMI key"),
        (lambda: client_for(1).send(Put("k", "v" * 1025)), "PMI value of 1025 bytes"),
        (lambda: client_for(1).send(Put("k", "a b")), "cannot carry value="),
        (lambda: client_for(2).send(Put("k", "v" * 1025)), "PMI-2 value of 1025 bytes"),
        (lambda: client_for(2).send(GetMaxes()), "GetMaxes has no PMI-2 form"),
        (lambda: client_for(1).send(GetJobAttr("x")), "GetJobAttr has no PMI-1 form"),
        (lambda: client_for(2).send(Init(2, 0)), "Init after the PMI-2 switch"),
        (lambda: client_for(1).send(Unsupported("spawn")), "Unsupported has no PMI-1 form"),
        (lambda: client_for(1).send(PutReply()), "PutReply has no PMI-1 form"),  # type: ignore[arg-type]
        (lambda: _v1_server_after_get().send(GetReply("v" * 1024)), "PMI-1 line of"),
        (lambda: _v1_server_after_get().send(FullInitReply(0, 1, 0)), "no PMI-1 form"),
        (lambda: ServerCodec().send(Fence()), "Fence has no PMI-1 form"),  # type: ignore[arg-type]
        (lambda: pmi2_server().send(AppnumReply(0)), "AppnumReply has no PMI-2 form"),
    ],
)
def test_misusing_a_codec_is_a_local_error(case: typing.Callable[[], bytes], match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        case()


def test_a_reply_that_does_not_answer_the_request_is_a_remote_error() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"cmd=barrier_out rc=0\n")  # answers a put with a fence reply
        client = Pmi1Client(ours, {})
        with pytest.raises(RemoteProtocolError, match="was answered with FenceReply"):
            client.put("k", "v")


# -- properties ----------------------------------------------------------------------------------
KEYS = st.text(
    st.characters(blacklist_characters="=; \n", blacklist_categories=("Cs",)), min_size=1
).filter(lambda k: len(k.encode()) <= 64)
PMI1_VALUES = st.text(
    st.characters(blacklist_characters=" \n", blacklist_categories=("Cs",)), max_size=200
)
PMI2_VALUES = st.text(st.characters(blacklist_categories=("Cs",))).filter(
    lambda v: len(v.encode()) <= 1024
)


@given(KEYS, PMI1_VALUES)
def test_pmi1_client_to_server_round_trip(key: str, value: str) -> None:
    wire = ClientCodec(1).send(Put(key, value, "kvs"))
    assert decode_all(ServerCodec(), wire) == [Put(key, value, "kvs")]


@given(KEYS, PMI2_VALUES)
def test_pmi2_client_to_server_round_trip(key: str, value: str) -> None:
    client = ClientCodec(2)
    server = pmi2_server()
    client.send(Init(2, 0))
    client.receive_data(b"cmd=response_to_init rc=0 pmi_version=2 pmi_subversion=0\n")
    client.next_event()
    assert decode_all(server, client.send(Put(key, value))) == [Put(key, value)]
    client.receive_data(server.send(PutReply()))
    assert client.next_event() == PutReply()
    decode_all(server, client.send(Get(key)))
    client.receive_data(server.send(GetReply(value)))
    assert client.next_event() == GetReply(value)


def _feed_garbage(codec: ServerCodec, chunks: list[bytes]) -> None:
    for chunk in chunks:
        codec.receive_data(chunk)
        for _ in range(10_000):
            try:
                if codec.next_event() is None:
                    break
            except RemoteProtocolError as err:
                if err.fatal:
                    return


@settings(max_examples=400)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_fuzz_pmi1_server_codec_raises_only_its_own_error(chunks: list[bytes]) -> None:
    _feed_garbage(ServerCodec(), chunks)


@settings(max_examples=400)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_fuzz_pmi2_server_codec_raises_only_its_own_error(chunks: list[bytes]) -> None:
    _feed_garbage(pmi2_server(), chunks)


PMI2_ISH = st.lists(
    st.one_of(
        st.binary(max_size=40),
        st.sampled_from([b"cmd=", b"kvs-put", b";", b";;", b"=", b"key=", b"value=", b"cmd=init"]),
    ),
    max_size=12,
).map(b"".join)


@settings(max_examples=400)
@given(st.lists(PMI2_ISH.map(frame), max_size=6))
def test_fuzz_pmi2_well_framed_garbage(frames: list[bytes]) -> None:
    codec = pmi2_server()
    for data in frames:
        codec.receive_data(data)
        try:
            codec.next_event()
        except RemoteProtocolError as err:
            assert not err.fatal  # framing was fine, so decoding goes on
            codec.send(ErrorReply(str(err)))  # and an error reply can always be built


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=200), max_size=6), st.sampled_from([1, 2]))
def test_fuzz_client_codec(chunks: list[bytes], version: int) -> None:
    codec = ClientCodec(version)
    for chunk in chunks:
        codec.receive_data(chunk)
        with contextlib.suppress(RemoteProtocolError):
            codec.next_event()


# -- mutation-testing kills (tools/mutants.py, `make mutants`) ------------------------------
def _spawn_sequence(total: int) -> bytes:
    """A whole mcmd=spawn sequence of exactly `total` bytes (newlines included)."""
    head = b"mcmd=spawn\nnprocs=1\nexecname=/bin/x\ntotspawns=1\nspawnssofar=1\n"
    tail = b"argcnt=0\npreput_num=0\ninfo_num=0\nendcmd\n"
    pad = total - len(head) - len(tail)
    fill = b""
    while pad > 0:
        n = min(pad, 1000) if pad - min(pad, 1000) != 1 else 998  # no 1-byte remainder
        fill += b"k=" + b"x" * (n - 3) + b"\n"
        pad -= n
    data = head + fill + tail
    assert len(data) == total
    return data


def test_pmi1_spawn_sequence_limit_is_exact() -> None:
    assert SPAWN_MAX == 65536
    codec = ServerCodec()
    assert decode_all(codec, _spawn_sequence(65536)) == [Unsupported("spawn")]
    with pytest.raises(RemoteProtocolError) as err:
        decode_all(ServerCodec(), _spawn_sequence(65537))
    assert str(err.value) == "mcmd=spawn longer than 65536 bytes"
    assert err.value.fatal is True


def test_pmi1_client_rejects_a_set_line_without_its_reply() -> None:
    client = ClientCodec(1)
    client.receive_data(b"cmd=set size=4\n")
    with pytest.raises(RemoteProtocolError) as err:
        client.next_event()
    assert str(err.value) == "unexpected PMI-1 reply cmd=set"
    assert err.value.fatal is False


def test_key_and_value_limits_are_exact() -> None:
    from rankwire.pmi.fields import check_key, check_value

    check_key("k" * 64)
    check_value("v" * 1024)
    for key in ("", "k" * 65):
        with pytest.raises(LocalProtocolError) as err:
            check_key(key)
        assert str(err.value) == f"invalid PMI key {key!r}: 1..64 bytes, no '=;' or spaces"
    with pytest.raises(LocalProtocolError) as err:
        check_value("v" * 1025)
    assert str(err.value) == "PMI value of 1025 bytes (max 1024)"


def test_error_messages_are_one_line_of_at_most_256_characters() -> None:
    from rankwire.pmi.fields import one_line, pmi1_words

    assert one_line("x" * 300) == "x" * 256
    assert one_line(" a\n b ") == "a b"
    assert one_line(" \n") == "error"
    assert pmi1_words("no such key") == "no_such_key"


def test_field_kinds_are_frozen_and_default_as_documented() -> None:
    import dataclasses

    from rankwire.pmi.fields import Const, FoundByFlag, FoundByRc, Int, Text, Value

    for kind, attr in ((Const("x"), "text"), (Int(), "default"), (Text(), "default"),
                       (Value(), "checked"), (FoundByFlag(), "flag"),
                       (Field("n", "a", Int()), "name")):  # fmt: skip
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(kind, attr, None)
    assert Text().write("k", "") == [("k", "")]
    assert Text(omit_empty=True).write("k", "") == []
    assert FoundByRc().read({"value": "v"}, "value", "get_result") == "v"  # no rc: found
    assert FoundByRc().read({"rc": "1", "value": "v"}, "value", "get_result") is None


# -- @record: what a frozen dataclass gives, without its per-class code generation ----------
def test_a_record_behaves_as_the_frozen_dataclass_it_replaces() -> None:
    from rankwire.record import record

    @record
    class Rec:
        key: str
        value: int = 1
        note: Optional[str] = None
        tags: list[str] = dataclasses.field(default_factory=list)
        kind: ClassVar[str] = "k"

    @dataclasses.dataclass(frozen=True)
    class Dc:
        key: str
        value: int = 1
        note: Optional[str] = None
        tags: list[str] = dataclasses.field(default_factory=list)
        kind: ClassVar[str] = "k"

    for make in (Rec, Dc):
        a = make("k", 2, note="n")
        assert (a.key, a.value, a.note, a.tags) == ("k", 2, "n", [])
        assert make("k").tags is not make("k").tags  # a new list each time
        assert make("k") == make(key="k", value=1) and make("k") != make("k", 2)
        assert hash(make("k", 2, tags=())) == hash(make("k", 2, tags=()))  # type: ignore[arg-type]
        assert repr(make("k")) == f"{make.__qualname__}(key='k', value=1, note=None, tags=[])"
        assert make.__match_args__ == ("key", "value", "note", "tags")  # type: ignore[attr-defined]
        assert [f.name for f in dataclasses.fields(make)] == ["key", "value", "note", "tags"]
        assert dataclasses.asdict(a) == {"key": "k", "value": 2, "note": "n", "tags": []}
        assert dataclasses.replace(a, value=3) == make("k", 3, note="n")
        assert dataclasses.is_dataclass(a) and make.kind == "k"
        with pytest.raises(dataclasses.FrozenInstanceError):
            a.key = "x"  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            del a.value  # type: ignore[misc]
        bad: list[tuple[tuple[object, ...], dict[str, object], str]] = [
            ((), {}, "missing"),
            (("k", 1, None, [], 5), {}, "positional arguments but"),
            (("k",), {"key": "j"}, "multiple values for argument 'key'"),
            (("k",), {"other": 1}, "unexpected keyword argument 'other'"),
        ]
        for args, kwargs, said in bad:
            with pytest.raises(TypeError, match=said):
                make(*args, **kwargs)
    assert Rec.__doc__ == "Rec(key, value, note, tags)"  # made without inspect.signature
    # equal fields, another class: not equal (a tuple's equality would say so)
    assert Rec("k") != Dc("k") and Rec("k") != ("k", 1, None, [])

    @record
    class More(Rec):
        extra: bool = False

    assert More("k", extra=True).extra and More("k") != Rec("k")
    assert More.__match_args__ == ("key", "value", "note", "tags", "extra")  # type: ignore[attr-defined]

    @record
    class Checked:
        n: int

        def __post_init__(self) -> None:
            if self.n < 0:
                raise ValueError("n < 0")

    assert Checked(1).n == 1
    with pytest.raises(ValueError, match=r"^n < 0$"):
        Checked(-1)


def test_a_record_refuses_what_it_does_not_support() -> None:
    from rankwire.record import record

    class Plain:
        a: int

    @record
    class Rec:
        r: int

    def ann(**names: str) -> dict[str, object]:
        return {"__annotations__": names}

    keep = "which a record does not keep"
    not_record = "base Plain has annotations but is no record"
    flags = "a field's init, repr, compare or hash flag is not supported"
    cases: list[tuple[str, tuple[type, ...], dict[str, object], str]] = [
        ("Late", (), {**ann(a="int", b="int"), "a": 0},
         "non-default field b follows a default one"),
        ("Fac", (), {**ann(a="list[int]", b="int"), "a": dataclasses.field(default_factory=list)},
         "non-default field b follows a default one"),
        ("Own", (), {**ann(a="int"), "__repr__": repr}, f"defines __repr__, {keep}"),
        ("Hidden", (), {**ann(a="int"), "a": dataclasses.field(repr=False)}, f"a: {flags}"),
        ("Uncompared", (), {**ann(a="int"), "a": dataclasses.field(compare=False)},
         f"a: {flags}"),
        ("Init", (), {"__annotations__": {"a": int, "b": dataclasses.InitVar(int)}},
         "b is an InitVar, which a record does not support"),
        ("Kw", (), {**ann(a="int"), "a": dataclasses.field(kw_only=True)},
         "a: keyword-only fields are not supported"),
        ("Sub", (Plain,), ann(b="int"), not_record),
        ("Left", (Plain, Rec), ann(b="int"), not_record),
        ("Right", (Rec, Plain), ann(b="int"), not_record),
    ]  # fmt: skip
    for name, bases, namespace, said in cases:
        with pytest.raises(TypeError, match=f"^{re.escape(f'{name}: {said}')}$"):
            record(type(name, bases, namespace))
    # what a dataclass refuses, a record refuses the same way
    with pytest.raises(ValueError, match=r"^mutable default <class 'list'> for field a is not"):
        record(type("Mut", (), {**ann(a="list[int]"), "a": []}))


# -- framing limits, exact (mutation-testing kills) ----------------------------------------
def test_framing_limits_are_exact() -> None:
    from rankwire.pmi.framing import (
        FRAME_MAX,
        LINE_MAX,
        FrameReader,
        LineReader,
        format_frame,
        format_line,
        parse_body,
        show,
    )

    assert (LINE_MAX, FRAME_MAX) == (1024, 65536)
    assert show(b"x" * 60) == repr(b"x" * 60)
    assert show(b"x" * 61) == repr(b"x" * 60) + "..."
    # PMI-1: a line of exactly LINE_MAX bytes (newline included) passes, one more does not.
    line = format_line("put", ("v", "x" * (1024 - len("cmd=put v=\n"))))
    assert len(line) == 1024
    with pytest.raises(LocalProtocolError) as lerr:
        format_line("put", ("v", "x" * (1025 - len("cmd=put v=\n"))))
    assert str(lerr.value) == "PMI-1 line of 1025 bytes (max 1024): put"
    reader = LineReader()
    reader.buf += line + b"y" * 1022 + b"\n" + b"cmd=a\n"
    assert reader.next_line() == line[:-1]
    assert reader.next_line() == b"y" * 1022
    assert reader.next_line() == b"cmd=a"
    assert reader.next_line() is None
    reader.buf += b"z" * 1024 + b"\n" + b"cmd=b\n"
    with pytest.raises(RemoteProtocolError) as err:
        reader.next_line()
    assert str(err.value) == "PMI-1 line of 1025 bytes (max 1024)"
    assert reader.next_line() == b"cmd=b"
    reader.buf += b"w" * 1023  # no newline yet: wait
    assert reader.next_line() is None
    reader.buf += b"w"  # 1024 bytes and still no newline: too long
    with pytest.raises(RemoteProtocolError) as err:
        reader.next_line()
    assert str(err.value) == "PMI-1 line longer than 1024 bytes"
    reader.buf += b"rest of it"
    assert reader.next_line() is None  # skipped to the end of the long line
    reader.buf += b"\ncmd=c\n"
    assert reader.next_line() == b"cmd=c"
    # PMI-2: keys up to KEY_MAX, values up to VALUE_MAX, bodies up to FRAME_MAX.
    assert parse_body(b"cmd=x;" + b"k" * 64 + b"=" + b"v" * 1024 + b";") == (
        "x", {"k" * 64: "v" * 1024},
    )  # fmt: skip
    assert parse_body(b"cmd=x;k=a;;b;;;") == ("x", {"k": "a;b;"})
    for body, message in (
        (b"cmd=x;" + b"k" * 65 + b"=v;", f"PMI-2 bad key {show(b'k' * 65)}"),
        (b"cmd=x;=v;", "PMI-2 bad key b''"),
        (b"=v;", "PMI-2 bad key b''"),
        (b"cmd=x;k=" + b"v" * 1025 + b";", "PMI-2 value of 1025 bytes (max 1024)"),
        (b"cmd=x;k", "PMI-2 pair without '=': b'k'"),
        (b"", "empty PMI-2 message"),
    ):
        with pytest.raises(RemoteProtocolError) as err:
            parse_body(body)
        assert str(err.value) == message
    assert len(format_frame("x", ("v", "v" * 1024))) == 6 + len(b"cmd=x;v=") + 1024 + 1
    with pytest.raises(LocalProtocolError) as lerr:
        format_frame("x", ("v", "v" * 1025))
    assert str(lerr.value) == "PMI-2 value of 1025 bytes (max 1024): v"
    pairs = [(f"k{i}", "v" * 1000) for i in range(65)]
    room = 65536 - (len(format_frame("x", *pairs)) - 6) - len(b"z=;")  # a body of FRAME_MAX
    big = format_frame("x", *pairs, ("z", "v" * room))
    assert len(big) == 6 + 65536
    with pytest.raises(LocalProtocolError) as lerr:
        format_frame("x", *pairs, ("z", "v" * (room + 1)))
    assert str(lerr.value) == "PMI-2 message of 65537 bytes (max 65536)"
    frames = FrameReader(bytearray(big))
    assert frames.next_body() == big[6:]
    frames.buf += b"65537 "
    with pytest.raises(RemoteProtocolError) as err:
        frames.next_body()
    assert str(err.value) == "PMI-2 message of 65537 bytes announced (max 65536)"
    assert err.value.fatal is True
    short = FrameReader(bytearray(b"6    "))
    assert short.next_body() is None  # five bytes of header: wait for the sixth
    short.buf += b" cmd=x"
    assert short.next_body() is None
    short.buf += b";"
    assert short.next_body() == b"cmd=x;"
