"""The PMI server for one job: asyncio transports around `ServerCodec` and `Job`.

It runs inside the caller's event loop and starts no threads (the launcher forks and calls
setns in children, so it must stay single-threaded)::

    job = Job(size=4, nodes=[0, 0, 1, 1], fence_timeout=None)
    server = PmiServer(job, mode="fd")              # or mode="port"
    await server.start()
    for rank in range(job.size):
        env, pass_fds = server.rank_env(rank)
        proc = subprocess.Popen(argv, env={**os.environ, **env}, pass_fds=pass_fds)
        server.spawned(rank)                        # the parent's copy of the fd is closed
    ...
    server.rank_exited(rank, returncode)            # whenever a rank process ends
    event = await server.wait_event()               # see "Events"
    await server.close()

Modes
  "fd"   one socketpair per rank, created by `rank_env()`; the child gets `PMI_FD`. The
         child end is close-on-exec in the parent: hand it over with `Popen(pass_fds=...)`,
         or `os.set_inheritable(fd, True)` in the forked child before exec, keeping its
         number (PMI_FD names it).
  "port" a TCP listener on 127.0.0.1 (random port); each rank gets `PMI_PORT` and its own
         random `PMI_ID`, which the client sends back (PMI-1 `initack`, PMI-2 `fullinit`) to
         say which rank it is. For containers that cannot inherit fds.

Every rank also gets `PMI_RANK`, `PMI_SIZE` and `PMI_JOBID`. PMI-1 or PMI-2 is each client's
choice (its first `init` line); one job may mix them.

Events
  `await server.wait_event()` returns the next one of, in order of occurrence:
  `Aborted(rank, code, message)` (a rank called PMI abort: kill the job with `code`),
  `FenceFailed(missing, reason, timed_out, waiting)` (a fence cannot complete: a rank exited,
  closed its connection or finalized without joining it, or `Job.fence_timeout` passed; the
  waiting ranks got an error reply), `RankLost(rank, during_fence)` (an initialized rank
  closed its PMI connection before finalize; the fence fails with it, so the launcher need
  not wait for the others), `Finalized(rank)`, `ProtocolViolation(rank, message)` (a
  client sent something malformed or impossible; it got an error reply, the server goes on;
  a connection whose byte stream is lost, or that errs MAX_VIOLATIONS times, is closed).
  The queue is unbounded; drain it for the life of the job.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Callable, Optional, Union

from rankwire.errors import UserError
from rankwire.pmi.codec import ServerCodec
from rankwire.pmi.errors import LocalProtocolError, RemoteProtocolError
from rankwire.pmi.job import FenceDone, FenceFailed, FenceResult, Job, RequestRejected
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
class Aborted:
    rank: int
    code: int
    message: str


@record
class Finalized:
    rank: int


@record
class RankLost:
    rank: int
    during_fence: bool = False  # it had sent its fence request: that fence failed with it


@record
class ProtocolViolation:
    rank: Optional[int]  # None: a PMI_PORT connection not yet identified
    message: str


Event = Union[Aborted, FenceFailed, RankLost, Finalized, ProtocolViolation]

MAX_VIOLATIONS = 16  # malformed or refused requests before a connection is dropped


class _Conn(asyncio.Protocol):
    """One client connection; `rank` is None until a PMI_PORT client says who it is."""

    def __init__(self, server: PmiServer, rank: Optional[int]) -> None:
        self.server = server
        self.rank = rank
        self.codec = ServerCodec()
        self.violations = 0
        self.transport: Optional[asyncio.Transport] = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server._connected(self)

    def data_received(self, data: bytes) -> None:
        self.server._received(self, data)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self.server._lost(self)

    def reply(self, reply: Reply) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        try:
            data = self.codec.send(reply)
        except LocalProtocolError as err:  # e.g. a value too long for a PMI-1 line
            data = self.codec.send(ErrorReply(str(err)))
        self.transport.write(data)

    def close(self, flush: bool = True) -> None:
        """Close after writing what is queued (`flush`), or at once."""
        if self.transport is not None:
            if flush:
                self.transport.close()
            else:
                self.transport.abort()


class PmiServer:
    """Serves PMI-1 and PMI-2 to the ranks of one `Job` (see the module docstring)."""

    def __init__(self, job: Job, mode: str = "fd") -> None:
        if mode not in ("fd", "port"):
            raise ValueError(f"mode must be 'fd' or 'port', got {mode!r}")
        self.job = job
        self.mode = mode
        self.port: Optional[int] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._events: Optional[asyncio.Queue[Event]] = None
        self._listener: Optional[asyncio.AbstractServer] = None
        self._conns: set[_Conn] = set()
        self._by_rank: dict[int, _Conn] = {}
        self._child_ends: dict[int, socket.socket] = {}
        self._handed_out: set[int] = set()
        self._attaching: set[asyncio.Task[object]] = set()
        self._pmi_ids: list[int] = []  # rank → its random PMI_ID (port mode)
        self._rank_of_id: dict[int, int] = {}
        self._spoke: set[int] = set()  # ranks that sent at least one request
        self._timer: Optional[asyncio.TimerHandle] = None
        self._closing = False
        # Called with a rank that asked to finalize, before it is answered (so while it
        # still waits, alive): the launcher records its warm list there.
        self.on_finalize: Optional[Callable[[int], None]] = None

    # -- the launcher's API ----------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._events = asyncio.Queue()
        if self.mode == "port":
            # Random ids, so another local user cannot easily pose as a rank on the port.
            import secrets  # not at import: random and hashlib, for the port mode only

            while len(self._pmi_ids) < self.job.size:
                pmiid = secrets.randbelow(2**31 - 2) + 1  # clients parse it with atoi()
                if pmiid not in self._rank_of_id:
                    self._rank_of_id[pmiid] = len(self._pmi_ids)
                    self._pmi_ids.append(pmiid)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind(("127.0.0.1", 0))
                sock.listen(min(self.job.size, socket.SOMAXCONN))
            except OSError as err:
                sock.close()
                raise UserError(
                    f"cannot listen on 127.0.0.1 for PMI_PORT ({err}); use the PMI_FD mode"
                ) from err
            self.port = sock.getsockname()[1]
            self._listener = await self._loop.create_server(lambda: _Conn(self, None), sock=sock)

    def rank_env(self, rank: int) -> tuple[dict[str, str], tuple[int, ...]]:
        """Environment for rank `rank` and the fds its process must inherit (fd mode)."""
        if self._loop is None or self._closing:
            raise RuntimeError("PmiServer.rank_env() needs a started, open server")
        self.job.check_rank(rank)
        env = {
            "PMI_RANK": str(rank),
            "PMI_SIZE": str(self.job.size),
            "PMI_JOBID": self.job.jobid,
        }
        if self.mode == "port":
            env.update(PMI_PORT=f"127.0.0.1:{self.port}", PMI_ID=str(self._pmi_ids[rank]))
            return env, ()
        if rank in self._handed_out:
            raise RuntimeError(f"PMI_FD of rank {rank} was already handed out")
        self._handed_out.add(rank)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        self._child_ends[rank] = theirs
        task = self._loop.create_task(
            self._loop.connect_accepted_socket(lambda: _Conn(self, rank), sock=ours)
        )
        self._attaching.add(task)
        task.add_done_callback(self._attaching.discard)
        env["PMI_FD"] = str(theirs.fileno())
        return env, (theirs.fileno(),)

    def adopt(self, rank: int, fd: int) -> None:
        """Serve rank `rank`, already started by the C front end (`runtime/front.c`
        `launch_plan`) with the other end of the socketpair whose end `fd` is ours (fd
        mode): as `rank_env` then `spawned`, for a rank we did not start."""
        if self._loop is None or self._closing or self.mode != "fd":
            raise RuntimeError("PmiServer.adopt() needs a started, open server in fd mode")
        self.job.check_rank(rank)
        if rank in self._handed_out:
            raise RuntimeError(f"PMI_FD of rank {rank} was already handed out")
        self._handed_out.add(rank)
        ours = socket.socket(fileno=fd)
        ours.setblocking(False)
        task = self._loop.create_task(
            self._loop.connect_accepted_socket(lambda: _Conn(self, rank), sock=ours)
        )
        self._attaching.add(task)
        task.add_done_callback(self._attaching.discard)

    def spawned(self, rank: int) -> None:
        """The rank's process exists: close the parent's copy of its PMI_FD end."""
        end = self._child_ends.pop(rank, None)
        if end is not None:
            end.close()

    def rank_exited(self, rank: int, code: int) -> None:
        """The rank's process ended (`code` as in Popen.returncode: < 0 = signal)."""
        self.spawned(rank)
        reason = f"exited with code {code}" if code >= 0 else f"was killed by signal {-code}"
        self._fence_result(self.job.rank_exited(rank, reason))

    @property
    def connected_ranks(self) -> frozenset[int]:
        """The ranks that ever spoke PMI to us (none, in a job of N > 1 that ran: every
        rank took MPI's singleton init, e.g. because it speaks another PMI)."""
        return frozenset(self._spoke)

    async def wait_event(self) -> Event:
        if self._events is None:
            raise RuntimeError("PmiServer.wait_event() before start()")
        return await self._events.get()

    async def close(self) -> None:
        """Close every socket (listener, connections, unspawned fd ends)."""
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._attaching):
            task.cancel()
        if self._attaching:
            await asyncio.gather(*self._attaching, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
            await self._listener.wait_closed()
        conns = list(self._conns)
        for conn in conns:
            conn.close(flush=False)
        await asyncio.gather(*(c.closed for c in conns))
        for rank in list(self._child_ends):
            self.spawned(rank)

    # -- connections ------------------------------------------------------------------------
    def _connected(self, conn: _Conn) -> None:
        if self._closing:
            conn.close()
            return
        self._conns.add(conn)
        if conn.rank is not None:
            self._by_rank[conn.rank] = conn

    def _lost(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        rank = conn.rank
        if self._closing or rank is None or self._by_rank.get(rank) is not conn:
            return
        del self._by_rank[rank]
        if self.job.is_finalized(rank) or self.job.is_gone(rank):
            return  # a normal exit, or the launcher already reported it
        during_fence = rank in self.job.fence_waiting
        if self.job.is_initialized(rank):
            self._emit(RankLost(rank, during_fence))
        when = "during a fence" if during_fence else "before finalize"
        self._fence_result(self.job.rank_exited(rank, f"closed its PMI connection {when}"))

    def _received(self, conn: _Conn, data: bytes) -> None:
        conn.codec.receive_data(data)
        while conn.transport is not None and not conn.transport.is_closing():
            try:
                req = conn.codec.next_event()
                if req is None:
                    return
                if conn.rank is not None:
                    self._spoke.add(conn.rank)
                self._dispatch(conn, req)
            except (RemoteProtocolError, RequestRejected) as err:
                fatal = isinstance(err, RemoteProtocolError) and err.fatal
                self._violation(conn, str(err), fatal)

    def _violation(self, conn: _Conn, message: str, fatal: bool) -> None:
        """Error reply; the connection is closed when the stream is lost or it keeps erring."""
        conn.violations += 1
        self._emit(ProtocolViolation(conn.rank, message))
        conn.reply(ErrorReply(message))
        if fatal or conn.violations >= MAX_VIOLATIONS:
            conn.close()

    def _bind(self, conn: _Conn, pmiid: Optional[int]) -> bool:
        """Tie a PMI_PORT connection to the rank whose PMI_ID it sent."""
        rank = self._rank_of_id.get(pmiid) if pmiid is not None else None
        if rank is None or (rank in self._by_rank and self._by_rank[rank] is not conn):
            why = "unknown PMI_ID" if rank is None else f"rank {rank} is already connected"
            self._violation(conn, f"{why} (PMI_ID {pmiid})", fatal=True)
            return False
        conn.rank = rank
        self._by_rank[rank] = conn
        self._spoke.add(rank)
        return True

    # -- requests ---------------------------------------------------------------------------
    def _dispatch(self, conn: _Conn, req: Request) -> None:
        job = self.job
        if isinstance(req, InitAck):
            if self.mode != "port":
                raise RequestRejected("initack is only for PMI_PORT connections")
            if self._bind(conn, req.pmiid) and conn.rank is not None:
                conn.reply(InitAckReply(conn.rank, job.size))
            return
        if isinstance(req, Init):
            if req.version not in (1, 2):
                raise RequestRejected(f"PMI version {req.version} is not served (1 or 2)")
            if conn.rank is not None:
                job.initialize(conn.rank)
            conn.reply(InitReply(req.version, 1 if req.version == 1 else 0))
            return
        if isinstance(req, FullInit) and conn.rank is None and not self._bind(conn, req.pmiid):
            return
        rank = conn.rank
        if rank is None:
            raise RequestRejected("connection not identified: send initack with PMI_ID first")
        if isinstance(req, FullInit):
            job.initialize(rank)
            conn.reply(FullInitReply(rank, job.size, job.appnum))
        elif isinstance(req, GetMaxes):
            conn.reply(MaxesReply())
        elif isinstance(req, GetAppnum):
            conn.reply(AppnumReply(job.appnum))
        elif isinstance(req, GetKvsName):
            conn.reply(KvsNameReply(job.jobid))
        elif isinstance(req, GetUniverseSize):
            conn.reply(UniverseSizeReply(job.universe_size))
        elif isinstance(req, Put):
            job.put(rank, req.key, req.value)
            conn.reply(PutReply())
        elif isinstance(req, Get):
            conn.reply(GetReply(job.get(req.key)))
        elif isinstance(req, GetJobAttr):
            conn.reply(GetReply(job.attr(req.key)))
        elif isinstance(req, PutNodeAttr):
            released = job.put_node_attr(rank, req.key, req.value)
            conn.reply(PutReply())
            for r in released:
                if r in self._by_rank:
                    self._by_rank[r].reply(GetReply(req.value))
        elif isinstance(req, GetNodeAttr):
            value = job.node_attr(rank, req.key)
            if value is None and req.wait:
                job.wait_node_attr(rank, req.key)
            else:
                conn.reply(GetReply(value))
        elif isinstance(req, Fence):
            result = job.fence(rank)
            if result is None and len(job.fence_waiting) == 1:
                self._start_fence_timer()
            self._fence_result(result)
        elif isinstance(req, Finalize):
            failed = job.finalize(rank)
            if self.on_finalize is not None:
                self.on_finalize(rank)
            conn.reply(FinalizeReply())
            self._emit(Finalized(rank))
            self._fence_result(failed)
        elif isinstance(req, Abort):
            job.abort(rank, req.code, req.message)
            self._emit(Aborted(rank, req.code, req.message))
        elif isinstance(req, Unsupported):
            raise RequestRejected(f"{req.cmd} is not supported by rankwire's PMI server")

    # -- fences -----------------------------------------------------------------------------
    def _start_fence_timer(self) -> None:
        if self.job.fence_timeout is not None and self._loop is not None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_later(self.job.fence_timeout, self._fence_expired)

    def _fence_expired(self) -> None:
        self._timer = None
        self._fence_result(self.job.expire_fence())

    def _fence_result(self, result: Optional[FenceResult]) -> None:
        if result is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if isinstance(result, FenceDone):
            for r in result.ranks:
                if r in self._by_rank:
                    self._by_rank[r].reply(FenceReply())
            return
        assert isinstance(result, FenceFailed)
        for r in result.waiting:
            if r in self._by_rank:
                self._by_rank[r].reply(ErrorReply(result.reason))
        self._emit(result)

    def _emit(self, event: Event) -> None:
        if self._events is not None and not self._closing:
            self._events.put_nowait(event)
