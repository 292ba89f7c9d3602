"""The messages PMI-1 and PMI-2 carry, shared by both protocols (plain frozen dataclasses).

Requests go client → server, replies server → client. `pmi.commands` spells them on the wire;
the server maps requests onto `pmi.job.Job`, the clients map API calls onto requests.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

KEY_MAX = 64
VALUE_MAX = 1024
KVSNAME_MAX = 256


# -- requests (client → server) ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Init:
    """First message of both protocols (a PMI-1 line); version 2 switches to PMI-2."""

    version: int
    subversion: int


@dataclasses.dataclass(frozen=True)
class InitAck:
    """PMI-1 over PMI_PORT: identifies the connection by the PMI_ID it was given."""

    pmiid: int


@dataclasses.dataclass(frozen=True)
class FullInit:
    """PMI-2 `fullinit`; `pmiid` is what the client sent as pmirank/srcid/pmiid."""

    pmiid: Optional[int] = None
    jobid: str = ""
    threaded: bool = False


@dataclasses.dataclass(frozen=True)
class GetMaxes:
    pass


@dataclasses.dataclass(frozen=True)
class GetAppnum:
    pass


@dataclasses.dataclass(frozen=True)
class GetKvsName:
    """PMI-1 `get_my_kvsname`, PMI-2 `job-getid`."""


@dataclasses.dataclass(frozen=True)
class GetUniverseSize:
    pass


@dataclasses.dataclass(frozen=True)
class Put:
    key: str
    value: str
    kvsname: str = ""


@dataclasses.dataclass(frozen=True)
class Get:
    key: str
    kvsname: str = ""


@dataclasses.dataclass(frozen=True)
class GetJobAttr:
    key: str


@dataclasses.dataclass(frozen=True)
class PutNodeAttr:
    key: str
    value: str


@dataclasses.dataclass(frozen=True)
class GetNodeAttr:
    key: str
    wait: bool = False


@dataclasses.dataclass(frozen=True)
class Fence:
    """PMI-1 `barrier_in`, PMI-2 `kvs-fence`."""


@dataclasses.dataclass(frozen=True)
class Finalize:
    pass


@dataclasses.dataclass(frozen=True)
class Abort:
    code: int = 1
    message: str = ""


@dataclasses.dataclass(frozen=True)
class Unsupported:
    """A well-formed command this implementation does not serve (spawn, name service...)."""

    cmd: str


Request = Union[
    Init, InitAck, FullInit, GetMaxes, GetAppnum, GetKvsName, GetUniverseSize, Put, Get,
    GetJobAttr, PutNodeAttr, GetNodeAttr, Fence, Finalize, Abort, Unsupported,
]  # fmt: skip


# -- replies (server → client) ---------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class InitReply:
    version: int
    subversion: int


@dataclasses.dataclass(frozen=True)
class InitAckReply:
    rank: int
    size: int


@dataclasses.dataclass(frozen=True)
class FullInitReply:
    rank: int
    size: int
    appnum: int


@dataclasses.dataclass(frozen=True)
class MaxesReply:
    kvsname_max: int = KVSNAME_MAX
    keylen_max: int = KEY_MAX
    vallen_max: int = VALUE_MAX


@dataclasses.dataclass(frozen=True)
class AppnumReply:
    appnum: int


@dataclasses.dataclass(frozen=True)
class KvsNameReply:
    name: str


@dataclasses.dataclass(frozen=True)
class UniverseSizeReply:
    size: int


@dataclasses.dataclass(frozen=True)
class PutReply:
    """Answers Put and PutNodeAttr."""


@dataclasses.dataclass(frozen=True)
class GetReply:
    """Answers Get, GetJobAttr and GetNodeAttr; None = not found."""

    value: Optional[str]


@dataclasses.dataclass(frozen=True)
class FenceReply:
    pass


@dataclasses.dataclass(frozen=True)
class FinalizeReply:
    pass


@dataclasses.dataclass(frozen=True)
class ErrorReply:
    """Any request failed (rc != 0); `message` is one line."""

    message: str


Reply = Union[
    InitReply, InitAckReply, FullInitReply, MaxesReply, AppnumReply, KvsNameReply,
    UniverseSizeReply, PutReply, GetReply, FenceReply, FinalizeReply, ErrorReply,
]  # fmt: skip
