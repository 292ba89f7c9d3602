"""The messages PMI-1 and PMI-2 carry, shared by both protocols (plain frozen dataclasses).

Requests go client → server, replies server → client. `pmi.commands` spells them on the wire;
the server maps requests onto `pmi.job.Job`, the clients map API calls onto requests.
"""

from __future__ import annotations

from typing import Optional, Union

from rankwire.record import record

KEY_MAX = 64
VALUE_MAX = 1024
KVSNAME_MAX = 256


# -- requests (client → server) ------------------------------------------------------------
@record
class Init:
    """First message of both protocols (a PMI-1 line); version 2 switches to PMI-2."""

    version: int
    subversion: int


@record
class InitAck:
    """PMI-1 over PMI_PORT: identifies the connection by the PMI_ID it was given."""

    pmiid: int


@record
class FullInit:
    """PMI-2 `fullinit`; `pmiid` is what the client sent as pmirank/srcid/pmiid."""

    pmiid: Optional[int] = None
    jobid: str = ""
    threaded: bool = False


@record
class GetMaxes:
    pass


@record
class GetAppnum:
    pass


@record
class GetKvsName:
    """PMI-1 `get_my_kvsname`, PMI-2 `job-getid`."""


@record
class GetUniverseSize:
    pass


@record
class Put:
    key: str
    value: str
    kvsname: str = ""


@record
class Get:
    key: str
    kvsname: str = ""


@record
class GetJobAttr:
    key: str


@record
class PutNodeAttr:
    key: str
    value: str


@record
class GetNodeAttr:
    key: str
    wait: bool = False


@record
class Fence:
    """PMI-1 `barrier_in`, PMI-2 `kvs-fence`."""


@record
class Finalize:
    pass


@record
class Abort:
    code: int = 1
    message: str = ""


@record
class Unsupported:
    """A well-formed command this implementation does not serve (spawn, name service...)."""

    cmd: str


Request = Union[
    Init, InitAck, FullInit, GetMaxes, GetAppnum, GetKvsName, GetUniverseSize, Put, Get,
    GetJobAttr, PutNodeAttr, GetNodeAttr, Fence, Finalize, Abort, Unsupported,
]  # fmt: skip


# -- replies (server → client) ---------------------------------------------------------------
@record
class InitReply:
    version: int
    subversion: int


@record
class InitAckReply:
    rank: int
    size: int


@record
class FullInitReply:
    rank: int
    size: int
    appnum: int


@record
class MaxesReply:
    kvsname_max: int = KVSNAME_MAX
    keylen_max: int = KEY_MAX
    vallen_max: int = VALUE_MAX


@record
class AppnumReply:
    appnum: int


@record
class KvsNameReply:
    name: str


@record
class UniverseSizeReply:
    size: int


@record
class PutReply:
    """Answers Put and PutNodeAttr."""


@record
class GetReply:
    """Answers Get, GetJobAttr and GetNodeAttr; None = not found."""

    value: Optional[str]


@record
class FenceReply:
    pass


@record
class FinalizeReply:
    pass


@record
class ErrorReply:
    """Any request failed (rc != 0); `message` is one line."""

    message: str


Reply = Union[
    InitReply, InitAckReply, FullInitReply, MaxesReply, AppnumReply, KvsNameReply,
    UniverseSizeReply, PutReply, GetReply, FenceReply, FinalizeReply, ErrorReply,
]  # fmt: skip
