"""PMI-1 / PMI-2 codecs: the wire shapes MPICH and Slurm really send, limits, fuzzing."""

from __future__ import annotations

import contextlib
from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwire.pmi.codec import ClientCodec, PmiProtocolError, ServerCodec
from rankwire.pmi.messages import (
    Abort,
    ErrorReply,
    Fence,
    FenceReply,
    Finalize,
    FullInit,
    FullInitReply,
    Get,
    GetJobAttr,
    GetKvsName,
    GetMaxes,
    GetNodeAttr,
    GetReply,
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
        *reqs[2:4],
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
    with pytest.raises(PmiProtocolError) as err:
        codec.next_event()
    assert not err.value.fatal
    assert codec.next_event() == Fence()


def test_pmi1_line_limit() -> None:
    codec = ServerCodec()
    ok = b"cmd=put kvsname=k key=x value=" + b"v" * (1023 - 30) + b"\n"
    assert len(ok) == 1024
    assert decode_all(codec, ok)[0] == Put("x", "v" * 993, "k")
    codec.receive_data(b"cmd=put kvsname=k key=x value=" + b"v" * 2000)
    with pytest.raises(PmiProtocolError, match="longer than 1024"):
        codec.next_event()
    # the rest of the overlong line is dropped, the next line is served
    assert decode_all(codec, b"vvv\ncmd=barrier_in\n") == [Fence()]
    # a reply that cannot fit one PMI-1 line is refused, not truncated
    decode_all(codec, b"cmd=get kvsname=k key=x\n")
    with pytest.raises(PmiProtocolError, match="line of"):
        codec.send(GetReply("v" * 1024))


def test_init_after_other_commands_is_refused() -> None:
    codec = ServerCodec()
    decode_all(codec, b"cmd=get_maxes\n")
    codec.receive_data(b"cmd=init pmi_version=2 pmi_subversion=0\n")
    with pytest.raises(PmiProtocolError, match="init"):
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
    with pytest.raises(PmiProtocolError) as err:
        codec.next_event()
    assert not err.value.fatal
    assert codec.next_event() == Fence()


@pytest.mark.parametrize("header", [b"abcdef", b"12 3  ", b"-5    ", b"999999"])
def test_pmi2_bad_length_is_fatal(header: bytes) -> None:
    codec = pmi2_server()
    codec.receive_data(header + b"cmd=kvs-fence;")
    for _ in range(2):  # and stays broken
        with pytest.raises(PmiProtocolError) as err:
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
    with pytest.raises(PmiProtocolError, match="key"):
        client.send(Put("k" * 65, "v"))
    with pytest.raises(PmiProtocolError, match="1024"):
        client.send(Put("k", "v" * 1025))
    with pytest.raises(PmiProtocolError, match="no PMI-2 form"):
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
            except PmiProtocolError as err:
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
        except PmiProtocolError as err:
            assert not err.fatal  # framing was fine, so decoding goes on
            codec.send(ErrorReply(str(err)))  # and an error reply can always be built


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=200), max_size=6), st.sampled_from([1, 2]))
def test_fuzz_client_codec(chunks: list[bytes], version: int) -> None:
    codec = ClientCodec(version)
    for chunk in chunks:
        codec.receive_data(chunk)
        with contextlib.suppress(PmiProtocolError):
            codec.next_event()
