"""Blocking PMI-1 and PMI-2 clients (one rank's side), e.g. for `rankwire pmi probe`.

    with Pmi2Client.from_env() as pmi:       # PMI_FD, or PMI_PORT (+ PMI_ID)
        pmi.init()                          # fills rank, size, appnum, kvsname
        pmi.put("key", "value")
        pmi.fence()                         # commit + barrier: every rank's puts are visible
        pmi.get("other-key")                # None when absent
        pmi.get_job_attr("PMI_process_mapping")
        pmi.finalize()

PMI-1 has no separate commit (MPICH's is a no-op) and no job attributes: `get_job_attr` reads
the KVS there, where servers pre-put `PMI_process_mapping`. A request the server answers
with an error raises `PmiRequestError`; malformed bytes or an answer that does not fit the
request raise `RemoteProtocolError`, a request PMI cannot carry `LocalProtocolError`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Optional, TypeVar

from rankwire.errors import UserError
from rankwire.pmi.codec import ClientCodec
from rankwire.pmi.errors import RemoteProtocolError
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
    GetReply,
    Init,
    InitAck,
    InitAckReply,
    InitReply,
    KvsNameReply,
    MaxesReply,
    Put,
    PutReply,
    Request,
)

R = TypeVar("R")
_C = TypeVar("_C", bound="_Client")


class PmiRequestError(Exception):
    """The PMI server answered a request with an error (rc != 0)."""


class _Client:
    version = 0

    def __init__(self, sock: socket.socket, env: Mapping[str, str]) -> None:
        self._sock = sock
        self._codec = ClientCodec(self.version)
        self._env = env
        self.rank = _env_int(env, "PMI_RANK", 0)
        self.size = _env_int(env, "PMI_SIZE", 1)
        self.appnum = -1
        self.kvsname = ""

    @classmethod
    def from_env(cls: type[_C], environ: Optional[Mapping[str, str]] = None) -> _C:
        """Connect as the PMI environment says (PMI_FD first, else PMI_PORT)."""
        env = os.environ if environ is None else environ
        if "PMI_FD" in env:
            fd = _env_int(env, "PMI_FD", -1)
            try:
                sock = socket.socket(fileno=fd)
            except OSError as err:
                raise UserError(
                    f"PMI_FD={env['PMI_FD']} is not an open socket ({err.strerror}); "
                    "start this process from the PMI server that set PMI_FD"
                ) from err
        elif "PMI_PORT" in env:
            host, _, port = env["PMI_PORT"].partition(":")
            if not port.isdigit():
                raise UserError(f"PMI_PORT={env['PMI_PORT']!r} is not host:port; fix PMI_PORT")
            try:
                sock = socket.create_connection((host, int(port)), timeout=30)
            except OSError as err:
                raise UserError(
                    f"cannot connect to the PMI server at {env['PMI_PORT']} ({err}); "
                    "is the launcher still running?"
                ) from err
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            raise UserError(
                "no PMI server: neither PMI_FD nor PMI_PORT is set; run under "
                "srun --mpi=pmi2, mpiexec.hydra or rankwire's launcher"
            )
        return cls(sock, env)

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    # -- the calls --------------------------------------------------------------------------
    def init(self) -> None:
        raise NotImplementedError

    def put(self, key: str, value: str) -> None:
        self._call(Put(key, value, self.kvsname), PutReply)

    def fence(self) -> None:
        """Commit this rank's puts and wait until every rank did (PMI barrier / kvs-fence)."""
        self._call(Fence(), FenceReply)

    def get(self, key: str) -> Optional[str]:
        return self._call(Get(key, self.kvsname), GetReply).value

    def get_job_attr(self, key: str) -> Optional[str]:
        raise NotImplementedError

    def abort(self, code: int, message: str) -> None:
        """Ask the server to kill the job; no reply is read. Closes the connection."""
        self._sock.sendall(self._codec.send(Abort(code, message)))
        self.close()

    def finalize(self) -> None:
        self._call(Finalize(), FinalizeReply)
        self.close()

    # -- plumbing ---------------------------------------------------------------------------
    def _call(self, req: Request, expect: type[R]) -> R:
        self._sock.sendall(self._codec.send(req))
        while True:
            reply = self._codec.next_event()
            if reply is not None:
                break
            data = self._sock.recv(65536)
            if not data:
                raise PmiRequestError(f"PMI server closed the connection during {req}")
            self._codec.receive_data(data)
        if isinstance(reply, ErrorReply):
            raise PmiRequestError(f"PMI server refused {req}: {reply.message}")
        if not isinstance(reply, expect):
            raise RemoteProtocolError(f"{req} was answered with {reply}")
        return reply


class Pmi1Client(_Client):
    """PMI-1 ("simple" wire protocol), as MPICH 4.0.2 speaks it."""

    version = 1

    def init(self) -> None:
        if "PMI_PORT" in self._env and "PMI_FD" not in self._env and "PMI_ID" in self._env:
            ack = self._call(InitAck(_env_int(self._env, "PMI_ID", 0)), InitAckReply)
            self.rank, self.size = ack.rank, ack.size
        self._call(Init(1, 1), InitReply)
        self._call(GetMaxes(), MaxesReply)
        self.appnum = self._call(GetAppnum(), AppnumReply).appnum
        self.kvsname = self._call(GetKvsName(), KvsNameReply).name

    def get_job_attr(self, key: str) -> Optional[str]:
        return self.get(key)


class Pmi2Client(_Client):
    """PMI-2: PMI-1 `init` handshake, then length-prefixed `key=value;` messages."""

    version = 2

    def init(self) -> None:
        self._call(Init(2, 0), InitReply)
        # Like MPICH: pmirank is PMI_ID (port mode) or PMI_RANK; Slurm needs pmijobid.
        name = "PMI_ID" if "PMI_ID" in self._env else "PMI_RANK"
        pmiid = _env_int(self._env, name, -1) if name in self._env else None
        fullinit = FullInit(pmiid, self._env.get("PMI_JOBID", ""))
        reply = self._call(fullinit, FullInitReply)
        self.rank, self.size, self.appnum = reply.rank, reply.size, reply.appnum
        self.kvsname = self._call(GetKvsName(), KvsNameReply).name

    def get_job_attr(self, key: str) -> Optional[str]:
        return self._call(GetJobAttr(key), GetReply).value


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{name}={text!r} is not an integer; fix the PMI environment") from None
