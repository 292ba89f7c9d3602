#!/usr/bin/env python3
"""`make fuzz`: millions of mutated inputs through every parser of untrusted bytes.

Targets (each input is bytes; `TARGETS` says what each does with them):
  pmi1, pmi2   the PMI server codec (pmi/codec.py): requests decoded, each answered
  pmi-server   PmiServer over socketpairs, 32 sessions per job (one rank each)
  sif          the SIF reader (runtime/sif_read.py) on a mutated small image
  policy       the site policy parser (spank/policy.py): TOML text
  frame-c      spank/frame.c under ASan/UBSan (tools/fuzz_frame.c), checked against ...
  frame-py     ... runtime/frame.py (decode, and encode back)
  binds        the bind grammar (runtime/plan.py parse_binds/resolve_bind, spank parse_mounts)
  deffile      the definition-file parser (runtime/deffile.py): a DefFile or one UserError line
  elf          the ELF reader (fabric/elf.py: read_elf, read_symbol): facts or one ValueError
               line, of synthetic objects (each class and byte order) and /bin/true

A crash is any exception other than the target's documented error (or, for C, a sanitizer
report or a signal); a hang is an input running past its deadline. Inputs come from a
seeded mutator (byte flips, inserts, deletions, splices, tokens, boundary integers) over
each target's seed corpus, plus random bytes; work is split into shards run by --jobs
processes. Every crashing or hanging input is saved under tests/data/fuzz-corpus/<target>/
and tests/test_fuzz_corpus.py replays it (`replay()` below) in `make test`.

    tools/fuzz.py [-n INPUTS_PER_TARGET] [--seed S] [--jobs 2] [--targets pmi1,sif]
    tools/fuzz.py --replay FILE...     # run saved inputs (target = parent directory name)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import multiprocessing
import os
import random
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "data" / "fuzz-corpus"
FRAME_BINARY = ROOT / "build" / "fuzz" / "fuzz_frame"
DEADLINE = 2.0  # seconds one input may take (a server batch: 4 x this)
SHARD = 50_000  # inputs per unit of work
SERVER_BATCH = 32  # sessions (ranks) per PmiServer job
SESSIONS_SEP = b"\0--next-rank--\0"  # joins the sessions of a saved pmi-server batch
RSS_SLACK = 64 << 20  # a pmi-server shard may grow this much after warm-up, no more


class Hang(BaseException):
    """Raised by the watchdog in an input that ran past DEADLINE (BaseException: targets
    catching Exception must not swallow it)."""


class Bad(Exception):
    """An input broke a target's contract without raising (wrong result, multi-line error)."""


# -- the mutator -------------------------------------------------------------------------------
INTERESTING_INTS = [0, 1, -1, 2, 6, 7, 8, 64, 65, 127, 128, 255, 256, 585, 1023, 1024, 1025,
                    4096, 32767, 32768, 65535, 65536, 65537, 2**31 - 1, 2**31, -(2**31),
                    2**32 - 1, 2**32, 2**63 - 1, -(2**63), 4 << 20, (4 << 20) + 1]  # fmt: skip


class Mutator:
    """Seeded, reproducible inputs: a corpus element mutated 1-8 times, or random bytes.

    `focus`: mutate inside the first `focus` bytes mostly (the SIF header and table);
    `binary`: boundary integers are written packed as well as in decimal.
    """

    def __init__(
        self,
        rng: random.Random,
        seeds: Sequence[bytes],
        tokens: Sequence[bytes],
        max_len: int,
        *,
        focus: int = 0,
        binary: bool = False,
    ) -> None:
        self.rng = rng
        self.seeds = list(seeds)
        self.tokens = list(tokens) or [b"\0"]
        self.max_len = max_len
        self.focus = focus
        self.binary = binary
        self.ops: list[Callable[[bytearray], None]] = [
            self._flip, self._byte, self._insert, self._token, self._delete,
            self._duplicate, self._splice, self._truncate,
        ]  # fmt: skip
        self.ops += [self._packed, self._packed] if binary else [self._decimal]

    def __call__(self) -> bytes:
        rng = self.rng
        if rng.random() < 0.03:
            return rng.randbytes(rng.randrange(0, 300))
        data = bytearray(rng.choice(self.seeds))
        for _ in range(1 << rng.randrange(4)):
            rng.choice(self.ops)(data)
        return bytes(data[: self.max_len])

    def _pos(self, data: bytearray, end: bool = False) -> int:
        n = len(data) + end
        if n <= 0:
            return 0
        if self.focus and self.rng.random() < 0.9:
            n = min(n, self.focus)
        return self.rng.randrange(n)

    def _flip(self, data: bytearray) -> None:
        if data:
            data[self._pos(data)] ^= 1 << self.rng.randrange(8)

    def _byte(self, data: bytearray) -> None:
        if data:
            data[self._pos(data)] = self.rng.choice(b"\0\x01\x7f\x80\xff =;\n\r\t\\:,\"'[]")

    def _insert(self, data: bytearray) -> None:
        at = self._pos(data, end=True)
        data[at:at] = self.rng.randbytes(self.rng.randrange(1, 9))

    def _token(self, data: bytearray) -> None:
        at = self._pos(data, end=True)
        token = self.rng.choice(self.tokens)
        if self.rng.random() < 0.3:  # overwrite rather than insert
            data[at : at + len(token)] = token
        else:
            data[at:at] = token

    def _delete(self, data: bytearray) -> None:
        if data:
            at = self._pos(data)
            del data[at : at + self.rng.randrange(1, 33)]

    def _duplicate(self, data: bytearray) -> None:
        if data:
            at = self._pos(data)
            piece = data[at : at + self.rng.randrange(1, 65)]
            for _ in range(self.rng.choice((1, 1, 2, 16))):
                data[at:at] = piece

    def _splice(self, data: bytearray) -> None:
        other = self.rng.choice(self.seeds)
        at = self._pos(data, end=True)
        data[at:] = other[self.rng.randrange(len(other) + 1) :]

    def _decimal(self, data: bytearray) -> None:
        runs = [m.span() for m in re.finditer(rb"-?\d+", data)]
        value = str(self.rng.choice(INTERESTING_INTS) + self.rng.choice((0, 0, -1, 1)))
        if runs:
            start, end = self.rng.choice(runs)
            data[start:end] = value.encode()
        else:
            at = self._pos(data, end=True)
            data[at:at] = value.encode()

    def _truncate(self, data: bytearray) -> None:
        del data[self.rng.randrange(len(data) + 1) :]

    def _packed(self, data: bytearray) -> None:
        size = self.rng.choice((1, 2, 4, 8))
        value = self.rng.choice(INTERESTING_INTS) & ((1 << (8 * size)) - 1)
        at = self._pos(data) & ~(size - 1) if self.rng.random() < 0.7 else self._pos(data)
        data[at : at + size] = value.to_bytes(size, "little")


# -- targets: seeds, tokens and what an input must not do --------------------------------------
def _frame2(body: bytes) -> bytes:
    return f"{len(body):<6d}".encode() + body


PMI1_SEEDS = [
    b"cmd=init pmi_version=1 pmi_subversion=1\ncmd=get_maxes\ncmd=get_appnum\n"
    b"cmd=get_my_kvsname\ncmd=get kvsname=kvs_1 key=PMI_process_mapping\ncmd=barrier_in\n"
    b"cmd=put kvsname=kvs_1 key=-bcast-1-0 value=2F6465762F73686D\n"
    b"cmd=put kvsname=kvs_1 key=hostname[5] value=node-5\ncmd=get kvsname=kvs_1 key=hostname[5]\n"
    b"cmd=finalize\n",
    b"cmd=initack pmiid=123456\ncmd=init pmi_version=1 pmi_subversion=1\n"
    b"cmd=get_universe_size\ncmd=abort exitcode=7\n",
    b"mcmd=spawn\nnprocs=2\nexecname=/bin/my prog\ntotspawns=2\nspawnssofar=1\n"
    b"arg1=a b=c\nargcnt=1\npreput_num=0\ninfo_num=0\nendcmd\ncmd=barrier_in\n",
    b"cmd=put  kvsname=k key=a   value=b=c=d\ncmd=barrier_in\ncmd=get kvsname=k key=a\n",
    b"cmd=put kvsname=k key=x value=" + b"v" * 993 + b"\ncmd=finalize\n",
]
PMI2_BODIES = [
    b"cmd=fullinit;pmijobid=9.0;pmirank=0;threaded=FALSE;",
    b"cmd=job-getid;",
    b"cmd=info-getjobattr;key=PMI_process_mapping;",
    b"cmd=kvs-put;key=k0;value=v=0;",
    b"cmd=kvs-put;thrid=0x55;key=k;value=a;;b;;;;=c;;;",
    b"cmd=info-putnodeattr;key=n0;value=nv0;",
    b"cmd=kvs-fence;",
    b"cmd=kvs-get;jobid=9.0;srcid=-1;key=k0;",
    b"cmd=info-getnodeattr;key=n0;wait=TRUE;",
    b"cmd=info-getnodeattr;key=n0;wait=FALSE;",
    b"cmd=abort;isworld=TRUE;msg=bye now;",
    b"cmd=fullinit;srcid=77;threaded=FALSE;",
    b"cmd=finalize;",
]
PMI2_SEEDS = [
    b"".join(_frame2(b) for b in PMI2_BODIES[:4] + PMI2_BODIES[5:10] + PMI2_BODIES[12:]),
    _frame2(PMI2_BODIES[0]) + _frame2(PMI2_BODIES[6]) + _frame2(PMI2_BODIES[10]),
    *(_frame2(b) for b in PMI2_BODIES),
]
PMI2_INIT = b"cmd=init pmi_version=2 pmi_subversion=0\n"
PMI_TOKENS = [
    b"cmd=", b"mcmd=spawn\n", b"endcmd\n", b"init", b"initack", b"pmiid=", b"pmi_version=",
    b"pmi_subversion=", b"get", b"put", b"barrier_in", b"finalize", b"abort", b"exitcode=",
    b"kvsname=", b"key=", b"value=", b"fullinit", b"kvs-put", b"kvs-get", b"kvs-fence",
    b"info-getnodeattr", b"info-putnodeattr", b"info-getjobattr", b"job-getid", b"thrid=",
    b"srcid=", b"wait=TRUE", b"found=", b"threaded=", b"isworld=", b"msg=", b"rc=", b";",
    b";;", b"=", b" ", b"\n", b"PMI_", b"totspawns=", b"spawnssofar=", b"65536 ", b"000000",
    b"-1", b"99999999999999999999", b"\xff\xfe", b"k" * 65, b"v" * 1025,
]  # fmt: skip

POLICY_SEEDS = [
    b'image_dirs = ["/apps/images"]\nmount_sources = ["/home", "/scratch"]\n'
    b"allow_fabric_choice = true\nallow_remap_root = true\nallow_writable = true\n"
    b"enforce = false\n",
    b'image_dirs = ["/srv", "/tmp/../srv/./x"]\nenforce = true\n',
    b"# only flags\nallow_writable = false # no\n",
    b"mount_sources = [\n  \"/home\",\n  '/scratch',\n]\n",
    b"",
]
POLICY_TOKENS = [
    b"image_dirs", b"mount_sources", b"allow_fabric_choice", b"allow_remap_root",
    b"allow_writable", b"enforce", b"true", b"false", b" = ", b"[", b"]", b"{", b"}", b'"',
    b"'", b'"""', b"'''", b",", b"\n", b"#", b"\\u0000", b"\\n", b"\\", b"/", b"..", b"1979-05-27",
    b"[table]", b"[[arr]]", b"inf", b"nan", b"0x1f", b"1e999", b"\xff", b"a.b.c",
]  # fmt: skip

FRAME_SEEDS = [
    b"image=/apps/a.sif\0uid=1001\0gid=1001\0mount=/home:/home:rw\0mount=/scratch\0",
    b"ENV=A=1\0ENV=B=\0key=\xff\xfe\0",
    b"",
    b"k=v\0",
]
FRAME_TOKENS = [b"\0", b"=", b"==", b"\0\0", b"key=", b"\xc3\x28", b"\xed\xa0\x80"]

BIND_SEEDS = [
    b"/data", b"/data:/mnt", b"/data:/mnt:ro", b"/a:/b:rw,/c:/d:ro", b"rel/dir:/x",
    b"/s:/t:ro+rw", b"/a,,/b", b" /x : /y ", b"/a:/b/../c/./d//e:ro\n/other",
]  # fmt: skip
BIND_TOKENS = [b":", b",", b"ro", b"rw", b"+", b"/", b"..", b".", b"//", b" ", b"\n", b"\xff",
               b"\0", b"~", b"yes", b"off"]  # fmt: skip


DEFFILE_SEEDS = [
    b"Bootstrap: docker\nFrom: debian:12\n\n%post\n  apt-get update\n%runscript\n  exec x\n",
    b"Bootstrap: docker\nFrom: a\nStage: build\n%post\n  make\nBootstrap: scratch\n"
    b"%files from build\n  /opt/view /opt/view\n%labels\n  K V\n",
    b"Bootstrap: localimage\nFrom: x.sif\nFingerprints: AB, CD\n%environment\n export A=1\n",
]
DEFFILE_TOKENS = [b"Bootstrap:", b"From:", b"Stage:", b"%post", b"%files", b"from", b"%labels",
                  b"%environment", b"%runscript", b"\n", b"\\\n", b"#", b'"', b"'", b" ", b"\r",
                  b"-c", b"\xff"]  # fmt: skip


def run_deffile(data: bytes) -> None:
    """Any bytes: a DefFile, or one UserError line naming the recipe line."""
    from rankwire.errors import UserError
    from rankwire.runtime.deffile import parse

    try:
        parse(data)
    except UserError as err:
        message = str(err)
        if "\n" in message or not message.startswith("RECIPE.def"):
            raise AssertionError(f"not one line naming the recipe: {message!r}") from None


def elf_seeds() -> list[bytes]:
    sys.path.insert(0, str(ROOT / "tests"))
    from harness.elfgen import make_elf

    tables: dict[str, Any] = dict(
        soname="libx.so.1",
        needed=["libc.so.6"],
        runpath="/opt/lib",
        defines=["X_1.0"],
        requires={"libc.so.6": ["GLIBC_2.34", "GLIBC_2.2.5"]},
        symbols={"v": b"4.0\0"},
    )
    seeds = [make_elf(wide=w, order=o, **tables) for w in (True, False) for o in "<>"]
    return [*seeds, Path("/bin/true").read_bytes()]


def run_elf(data: bytes) -> None:
    """Any bytes: ElfFacts, or one ValueError line."""
    from rankwire.fabric.elf import read_elf, read_symbol

    try:
        read_elf(data, name="fuzz")
        read_symbol(data, "v", 64, name="fuzz")
    except ValueError as err:
        message = str(err)
        if not (
            message.startswith("fuzz: unreadable ELF (") or message == "fuzz is not an ELF file"
        ):
            raise AssertionError(f"not the reader's refusal: {message!r}") from None
        _one_line(err)


def _pmi_answer(codec: Any, req: object) -> None:
    """Answer `req` as the server would; a LocalProtocolError then needs an ErrorReply."""
    from rankwire.pmi import messages as m
    from rankwire.pmi.errors import LocalProtocolError

    replies: dict[type, Callable[[Any], Any]] = {
        m.Init: lambda r: (
            m.InitReply(r.version, 1 if r.version == 1 else 0)
            if r.version in (1, 2)
            else m.ErrorReply("bad version")
        ),
        m.InitAck: lambda r: m.InitAckReply(0, 1),
        m.FullInit: lambda r: m.FullInitReply(0, 1, 0),
        m.GetMaxes: lambda r: m.MaxesReply(),
        m.GetAppnum: lambda r: m.AppnumReply(0),
        m.GetKvsName: lambda r: m.KvsNameReply("kvs_0"),
        m.GetUniverseSize: lambda r: m.UniverseSizeReply(1),
        m.Put: lambda r: m.PutReply(),
        m.PutNodeAttr: lambda r: m.PutReply(),
        m.Get: lambda r: m.GetReply(r.key),
        m.GetJobAttr: lambda r: m.GetReply(None),
        m.GetNodeAttr: lambda r: m.GetReply(r.key),
        m.Fence: lambda r: m.FenceReply(),
        m.Finalize: lambda r: m.FinalizeReply(),
        m.Unsupported: lambda r: m.ErrorReply(f"{r.cmd} is not supported"),
    }
    make = replies.get(type(req))
    if make is None:
        if isinstance(req, m.Abort):
            return
        raise Bad(f"next_event() returned {req!r}, not a request")
    try:
        codec.send(make(req))
    except LocalProtocolError as err:
        codec.send(m.ErrorReply(str(err)))  # what the server does; this must not fail


def _chunks(data: bytes) -> Iterator[bytes]:
    """The input as the peer's writes: whole, or (first byte 1 mod 4) in pieces of 1-64
    bytes."""
    if not data or data[0] & 3 != 1:
        yield data
        return
    step = data[0] % 64 + 1
    for i in range(0, len(data), step):
        yield data[i : i + step]


def run_pmi(data: bytes, version: int) -> None:
    from rankwire.pmi.codec import ServerCodec
    from rankwire.pmi.errors import RemoteProtocolError
    from rankwire.pmi.messages import ErrorReply

    codec = ServerCodec()
    if version == 2:
        codec.receive_data(PMI2_INIT)
        _pmi_answer(codec, codec.next_event())
    for chunk in _chunks(data):
        codec.receive_data(chunk)
        while True:
            try:
                req = codec.next_event()
            except RemoteProtocolError as err:
                codec.send(ErrorReply(str(err)))  # the server's error reply
                if err.fatal:
                    return
                continue
            if req is None:
                break
            _round_trip(codec.version, req)
            _pmi_answer(codec, req)
        if codec.version not in (1, 2):
            raise Bad(f"codec version {codec.version}")


def _round_trip(version: int, req: object) -> None:
    """A decoded request, encoded again (if it can be), decodes to itself."""
    from rankwire.pmi.codec import ServerCodec, encode_request
    from rankwire.pmi.errors import LocalProtocolError
    from rankwire.pmi.messages import Init, InitAck

    version = 1 if isinstance(req, (Init, InitAck)) else version
    try:
        wire = encode_request(version, req)  # type: ignore[arg-type]
    except LocalProtocolError:
        return
    again = ServerCodec()
    if version == 2:
        again.receive_data(PMI2_INIT)
        again.next_event()
    again.receive_data(wire)
    if again.next_event() != req:
        raise Bad(f"{req!r} does not survive encoding: {wire[:100]!r}")


_sif_fd = -1


def sif_seeds() -> list[bytes]:
    from rankwire.runtime.sif_format import DataType, FsType, PartType
    from rankwire.runtime.sif_write import ObjectInput, create_sif

    objects = [
        ObjectInput(DataType.DEFFILE, data=b"Bootstrap: scratch\n", name="def"),
        ObjectInput(DataType.PARTITION, data=b"s" * 5000, fs_type=FsType.SQUASHFS,
                    part_type=PartType.PRIMSYS, arch="amd64"),
        ObjectInput(DataType.GENERIC, data=b"tail"),
    ]  # fmt: skip
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for capacity in (4, 48):
            path = Path(tmp) / f"c{capacity}.sif"
            create_sif(path, objects, deterministic=True, capacity=capacity)
            out.append(path.read_bytes())
    return out


def run_sif(data: bytes) -> None:
    from rankwire.runtime.sif_digest import descriptor_digest, header_digest
    from rankwire.runtime.sif_format import SifError
    from rankwire.runtime.sif_read import SifImage

    global _sif_fd
    if _sif_fd < 0:
        _sif_fd = os.memfd_create("fuzz.sif")
    os.ftruncate(_sif_fd, 0)
    os.pwrite(_sif_fd, data, 0)
    try:
        with SifImage.open_fd(_sif_fd, "fuzz.sif") as img:
            header_digest(img)
            for d in img.descriptors:
                _ = (d.fs_type, d.part_type, d.arch, d.type_label, d.name)
                img.read(d)
                descriptor_digest(img, d)
            img.raw_metadata()
            img.primary_partition()
    except SifError as err:
        _one_line(err)


def _one_line(err: BaseException) -> None:
    if "\n" in str(err) or "\r" in str(err):
        raise Bad(f"a multi-line error: {str(err)[:200]!r}")


_policy_dir: Optional[str] = None


def run_policy(data: bytes) -> None:
    from rankwire.spank import policy

    global _policy_dir
    if _policy_dir is None:
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        _policy_dir = tempfile.mkdtemp(prefix="rankwire-fuzz-", dir=shm)
    path = os.path.join(_policy_dir, "policy.toml")
    with open(path, "wb") as f:
        f.write(data)
    trusted = policy._trusted
    policy._trusted = lambda path: None  # the file's ownership is not what is fuzzed here
    try:
        policy.load_policy(path)
    except policy.PolicyError as err:
        _one_line(err)
    finally:
        policy._trusted = trusted


def run_frame_py(data: bytes) -> None:
    from rankwire.runtime import frame

    try:
        records = frame.decode(data)
    except frame.FrameError:
        return
    if frame.encode(records) != data:
        raise Bad("decode then encode changed the frame")
    keys = {k for k, _ in records}
    for key in keys:
        if frame.one(records, key) != frame.every(records, key)[-1]:
            raise Bad(f"one() and every() disagree on {key!r}")
    frame.pairs(v for _, v in records)


def run_binds(data: bytes) -> None:
    from rankwire.errors import UserError
    from rankwire.runtime.plan import parse_bind, parse_binds, resolve_bind
    from rankwire.spank.plan import _flag, parse_mounts

    text = data.decode("utf-8", "surrogateescape")
    for call in (
        lambda: _check_binds(parse_binds(text.split("\n")), parse_bind, resolve_bind),
        lambda: parse_mounts(text, "/work/dir"),
        lambda: _flag("container-writable", text),
    ):
        try:
            call()
        except UserError as err:
            _one_line(err)


def _check_binds(mounts: Sequence[Any], parse: Any, resolve: Any) -> None:
    for m in mounts:
        if parse(m.spec()) != m:
            raise Bad(f"{m} does not survive spec() → parse_bind")
        r = resolve(m, "/work/dir")
        if not r.source.startswith("/") or not r.target.startswith("/"):
            raise Bad(f"{m} resolves to relative paths: {r}")


# -- pmi-server: sessions over socketpairs ----------------------------------------------------
def run_server_batch(sessions: Sequence[bytes]) -> Optional[str]:
    """One job of len(sessions) ranks, each session sent on its rank's PMI_FD, then EOF;
    every connection must end within the deadline. The failure, or None."""
    problems: list[str] = []
    loop = asyncio.new_event_loop()

    def on_error(_: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, Hang):
            problems.append("hang: the event loop stalled")
        else:
            problems.append(_describe(exc) if exc else str(context.get("message")))

    loop.set_exception_handler(on_error)
    try:
        loop.run_until_complete(_server_job(sessions, problems))
    except Hang:
        problems.append("hang: the event loop stalled")
    finally:
        loop.close()
    return problems[0] if problems else None


async def _server_job(sessions: Sequence[bytes], problems: list[str]) -> None:
    from rankwire.pmi.job import Job
    from rankwire.pmi.server import PmiServer

    server = PmiServer(Job(size=len(sessions), fence_timeout=DEADLINE), mode="fd")
    await server.start()
    drain = asyncio.ensure_future(_drain(server))
    clients = []
    try:
        for rank, data in enumerate(sessions):
            _, fds = server.rank_env(rank)
            clients.append(socket.socket(fileno=os.dup(fds[0])))
            server.spawned(rank)
            clients[-1].sendall(data)  # fits the socket buffer: max_len is 4096
            clients[-1].shutdown(socket.SHUT_WR)
        # Every connection must end (the client sent EOF). The server has no public
        # "connection ended" signal: its connections' `closed` futures are awaited.
        await asyncio.gather(*list(server._attaching))
        ended = asyncio.gather(*(c.closed for c in list(server._conns)))
        try:
            await asyncio.wait_for(ended, 4 * DEADLINE)
        except asyncio.TimeoutError:
            problems.append("hang: a session did not end")
        for rank in range(len(sessions)):
            server.rank_exited(rank, 0)
    finally:
        for c in clients:
            c.close()
        await server.close()
        drain.cancel()
        await asyncio.gather(drain, return_exceptions=True)


async def _drain(server: Any) -> None:
    while True:
        await server.wait_event()


def run_server(data: bytes) -> None:
    """A saved pmi-server input: one session, or several joined by SESSIONS_SEP."""
    problem = run_server_batch(data.split(SESSIONS_SEP))
    if problem:
        raise Bad(problem)


def _ignore(_: object) -> None:
    pass


# -- the table --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    tokens: Sequence[bytes]
    max_len: int
    seeds: Callable[[], list[bytes]]
    focus: int = 0
    binary: bool = False


TARGETS = {
    t.name: t
    for t in [
        Target("pmi1", lambda d: run_pmi(d, 1), PMI_TOKENS, 4096, lambda: PMI1_SEEDS),
        Target("pmi2", lambda d: run_pmi(d, 2), PMI_TOKENS, 4096, lambda: PMI2_SEEDS),
        Target(
            "pmi-server",
            run_server,
            PMI_TOKENS,
            4096,
            lambda: [*PMI1_SEEDS, *(PMI2_INIT + s for s in PMI2_SEEDS)],
        ),
        Target("sif", run_sif, [], 1 << 16, sif_seeds, focus=4096 + 4 * 585, binary=True),
        Target("policy", run_policy, POLICY_TOKENS, 2048, lambda: POLICY_SEEDS),
        Target(
            "frame-c", lambda d: _ignore(run_frame_c([d])), FRAME_TOKENS, 4096, lambda: FRAME_SEEDS
        ),
        Target("frame-py", run_frame_py, FRAME_TOKENS, 4096, lambda: FRAME_SEEDS),
        Target("binds", run_binds, BIND_TOKENS, 512, lambda: BIND_SEEDS),
        Target("deffile", run_deffile, DEFFILE_TOKENS, 2048, lambda: DEFFILE_SEEDS),
        Target("elf", run_elf, [], 1 << 16, elf_seeds, binary=True),
    ]
}


# -- the C frame parser -----------------------------------------------------------------------
def build_frame_driver() -> Path:
    """tools/fuzz_frame.c + spank/frame.c with ASan and UBSan, into build/fuzz/."""
    sources = [ROOT / "tools" / "fuzz_frame.c", ROOT / "spank" / "frame.c"]
    newest = max(p.stat().st_mtime for p in [*sources, ROOT / "spank" / "frame.h"])
    if FRAME_BINARY.exists() and FRAME_BINARY.stat().st_mtime >= newest:
        return FRAME_BINARY
    FRAME_BINARY.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["gcc", "-std=gnu11", "-g", "-O1", "-Wall", "-Wextra", "-Werror",
         "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
         "-I", str(ROOT / "spank"), "-o", str(FRAME_BINARY), *map(str, sources)],
        check=True,
    )  # fmt: skip
    return FRAME_BINARY


def _python_frame(data: bytes) -> str:
    from rankwire.runtime import frame

    try:
        return f"ok {len(frame.decode(data))}"
    except frame.FrameError:
        return "bad"


class FrameDriver:
    """The ASan build of frame.c, fed inputs over a pipe; restarted after each death."""

    def __init__(self) -> None:
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())

    def start(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            self.stderr.seek(0)
            self.stderr.truncate()
            self.proc = subprocess.Popen(
                [str(build_frame_driver())],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.stderr,
                env={**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0"},
            )
        return self.proc

    def run(self, inputs: Sequence[bytes]) -> tuple[list[str], Optional[str]]:
        """Results of the inputs in order, up to the first that killed the driver; why."""
        proc = self.start()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(b"".join(struct.pack("<I", len(d)) + d for d in inputs))
            proc.stdin.flush()
        except BrokenPipeError:
            pass
        out: list[str] = []
        while len(out) < len(inputs):
            line = proc.stdout.readline()
            if not line:
                return out, self._death()
            out.append(line.decode().strip())
        return out, None

    def _death(self) -> str:
        assert self.proc is not None
        code = self.proc.wait()
        self.proc = None
        self.stderr.seek(0)
        report = [ln for ln in self.stderr.read().decode(errors="replace").splitlines() if ln]
        summary = next((ln for ln in report if "SUMMARY" in ln), report[0] if report else "")
        kind = "hang" if code == -signal.SIGALRM else "crash"
        return f"{kind}: frame_c exited with {code}: {summary}"

    def close(self) -> None:
        if self.proc is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait()
            self.proc = None
        self.stderr.close()


_driver: Optional[FrameDriver] = None


def run_frame_c(inputs: Sequence[bytes]) -> list[Optional[str]]:
    """Each input through the C parser and runtime/frame.py: the problem of each, or None.
    With one input (a saved case) a problem raises Bad."""
    global _driver
    if _driver is None:
        _driver = FrameDriver()
    problems: list[Optional[str]] = []
    while len(problems) < len(inputs):
        todo = inputs[len(problems) :]
        results, death = _driver.run(todo)
        for data, got in zip(todo, results):
            want = _python_frame(data)
            problems.append(None if got == want else f"crash: C says {got!r}, Python {want!r}")
        if death is not None:
            problems.append(death)
    if len(inputs) == 1 and problems[0]:
        raise Bad(problems[0])
    return problems


# -- running a shard --------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    target: str
    inputs: int = 0
    crashes: int = 0
    hangs: int = 0
    seconds: float = 0.0
    saved: list[str] = dataclasses.field(default_factory=list)
    first: list[str] = dataclasses.field(default_factory=list)  # first problems, described
    rss: tuple[int, int] = (0, 0)  # pmi-server: after warm-up, at the end
    fds: tuple[int, int] = (0, 0)


class Watchdog:
    """SIGALRM every DEADLINE/4 s: raises Hang in an input running past its deadline."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.started = time.monotonic()
        signal.signal(signal.SIGALRM, self._tick)
        signal.setitimer(signal.ITIMER_REAL, deadline / 4, deadline / 4)

    def _tick(self, *_: object) -> None:
        if time.monotonic() - self.started > self.deadline:
            self.started = time.monotonic()
            raise Hang()

    def stop(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _describe(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else "?"
    return f"{type(exc).__name__} at {where}: {str(exc)[:160]}"


def check(target: Target, data: bytes, watchdog: Optional[Watchdog] = None) -> Optional[str]:
    """Run one input: None, or "crash: ..." / "hang: ..."."""
    if watchdog is not None:
        watchdog.started = time.monotonic()
    start = time.monotonic()
    try:
        target.run(data)
    except Hang:
        return "hang: past the deadline"
    except Exception as exc:
        return _describe(exc) if not isinstance(exc, Bad) else str(exc)
    if time.monotonic() - start > (4 if target.name == "pmi-server" else 1) * DEADLINE:
        return "hang: past the deadline"
    return None


def save(target: str, data: bytes, problem: str, result: Result, corpus: Path) -> None:
    if problem.startswith("hang"):
        result.hangs += 1
    else:
        result.crashes += 1
    if len(result.first) < 5:
        result.first.append(problem)
    # one file per distinct problem (its text up to the first digit-free colon part)
    kind = re.sub(r"\d+", "N", problem.split(": ")[0] + problem.split(": ")[-1][:40])
    if len(result.saved) >= 20 or any(s.endswith(kind) for s in result.saved):
        return
    folder = corpus / target
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / hashlib.sha256(data).hexdigest()[:16]
    path.write_bytes(data)
    result.saved.append(f"{path}\t{kind}")


def _memory() -> tuple[int, int]:
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return rss, len(os.listdir("/proc/self/fd"))


def run_shard(unit: tuple[str, int, int, str, str]) -> Result:
    name, shard, count, seed, corpus = unit
    target = TARGETS[name]
    rng = random.Random(f"{seed}:{name}:{shard}")
    mutate = Mutator(rng, target.seeds(), target.tokens, target.max_len,
                     focus=target.focus, binary=target.binary)  # fmt: skip
    result = Result(name)
    start = _cpu()
    watchdog = Watchdog(DEADLINE)
    try:
        if name == "pmi-server":
            _server_shard(mutate, count, result, Path(corpus), watchdog)
        elif name == "frame-c":
            watchdog.stop()  # the driver has its own alarm
            _frame_c_shard(mutate, count, result, Path(corpus))
        else:
            for _ in range(count):
                data = mutate()
                problem = check(target, data, watchdog)
                if problem:
                    save(name, data, problem, result, Path(corpus))
            result.inputs = count
    finally:
        watchdog.stop()
        cleanup()
    result.seconds = _cpu() - start
    return result


def _cpu() -> float:
    """CPU seconds of this process and its waited-for children (the C driver)."""
    us, them = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return us.ru_utime + us.ru_stime + them.ru_utime + them.ru_stime


def _frame_c_shard(mutate: Mutator, count: int, result: Result, corpus: Path) -> None:
    for done in range(0, count, 1000):
        inputs = [mutate() for _ in range(min(1000, count - done))]
        if mutate.rng.random() < 0.002:  # the size limit, once in a while
            inputs[0] = b"k=" + b"v" * ((4 << 20) - 3 + mutate.rng.randrange(3)) + b"\0"
        for data, problem in zip(inputs, run_frame_c(inputs)):
            if problem:
                save("frame-c", data, problem, result, corpus)
        result.inputs += len(inputs)


def _server_shard(
    mutate: Mutator, count: int, result: Result, corpus: Path, watchdog: Watchdog
) -> None:
    target = TARGETS["pmi-server"]
    warm = None
    while result.inputs < count:
        sessions = [mutate() for _ in range(min(SERVER_BATCH, count - result.inputs))]
        watchdog.deadline = 8 * DEADLINE
        watchdog.started = time.monotonic()
        problem = run_server_batch(sessions)
        if problem:  # whose? one session alone, else the whole batch
            watchdog.deadline = 8 * DEADLINE
            alone = [(s, p) for s in sessions if (p := check(target, s, watchdog))]
            data, problem = alone[0] if alone else (SESSIONS_SEP.join(sessions), problem)
            save("pmi-server", data, problem, result, corpus)
        result.inputs += len(sessions)
        if warm is None and result.inputs >= 50 * SERVER_BATCH:
            warm = _memory()
    end = _memory()
    result.rss, result.fds = ((warm or end)[0], end[0]), ((warm or end)[1], end[1])
    if end[1] > (warm or end)[1] or end[0] - (warm or end)[0] > RSS_SLACK:
        save("pmi-server", b"", f"crash: grows: rss/fds {warm} -> {end}", result, corpus)


def cleanup() -> None:
    """Close and remove what the targets keep between inputs."""
    global _sif_fd, _policy_dir, _driver
    if _sif_fd >= 0:
        os.close(_sif_fd)
        _sif_fd = -1
    if _policy_dir is not None:
        shutil.rmtree(_policy_dir, ignore_errors=True)
        _policy_dir = None
    if _driver is not None:
        _driver.close()
        _driver = None


# -- the command ------------------------------------------------------------------------------
def replay(path: Path) -> Optional[str]:
    """A saved input through its target (the directory's name): None or the problem."""
    watchdog = Watchdog(8 * DEADLINE)
    try:
        return check(TARGETS[path.parent.name], path.read_bytes(), watchdog)
    finally:
        watchdog.stop()


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=int(os.environ.get("FUZZ_N") or 1_000_000),
                    help="inputs per target (FUZZ_N)")  # fmt: skip
    ap.add_argument("--seed", default=os.environ.get("FUZZ_SEED") or os.urandom(6).hex())
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("FUZZ_JOBS") or 2))
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--corpus", default=str(CORPUS))
    ap.add_argument("--replay", nargs="*", type=Path)
    args = ap.parse_args(argv)
    if args.replay is not None:
        bad = [(p, r) for p in args.replay if (r := replay(p))]
        for p, r in bad:
            print(f"{p}: {r}")
        return 1 if bad else 0
    names = args.targets.split(",")
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        ap.error(f"unknown target {unknown[0]} (known: {', '.join(TARGETS)})")
    if "frame-c" in names:
        build_frame_driver()
    print(f"fuzz: seed {args.seed}, {args.n} inputs per target, {args.jobs} processes", flush=True)
    shards = -(-args.n // SHARD)
    units = [
        (name, i, min(SHARD, args.n - i * SHARD), args.seed, args.corpus)
        for i in range(shards)
        for name in names
    ]
    totals = {n: Result(n) for n in names}
    started = time.monotonic()
    with multiprocessing.get_context("fork").Pool(args.jobs, maxtasksperchild=1) as pool:
        for res in pool.imap_unordered(run_shard, units):
            t = totals[res.target]
            t.inputs += res.inputs
            t.crashes += res.crashes
            t.hangs += res.hangs
            t.seconds += res.seconds
            t.saved += res.saved
            t.first += res.first
            if res.target == "pmi-server":
                t.rss = (max(t.rss[0], res.rss[0]), max(t.rss[1], res.rss[1]))
                t.fds = (max(t.fds[0], res.fds[0]), max(t.fds[1], res.fds[1]))
    print(f"{'target':<12}{'inputs':>10}{'crashes':>9}{'hangs':>7}{'seconds':>9}  (CPU)")
    for t in totals.values():
        print(f"{t.target:<12}{t.inputs:>10}{t.crashes:>9}{t.hangs:>7}{t.seconds:>9.0f}")
    server = totals.get("pmi-server")
    if server and server.inputs:
        print(
            f"pmi-server, per {SHARD}-input shard (worst): RSS {server.rss[0] >> 20} MiB after "
            f"warm-up, {server.rss[1] >> 20} MiB at the end; fds {server.fds[0]} -> {server.fds[1]}"
        )
    for t in totals.values():
        for problem in t.first[:3]:
            print(f"  {t.target}: {problem}")
        for saved in t.saved:
            print(f"  saved {saved.split(chr(9))[0]}")
    print(f"fuzz: seed {args.seed}, {time.monotonic() - started:.0f} s wall", flush=True)
    return 1 if any(t.crashes or t.hangs for t in totals.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
