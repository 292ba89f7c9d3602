"""The PMI-2 → PMIx bridge's own process: libpmix's server for the node's ranks, their
Slurm PMI-2 connections, one asyncio loop (see `pmi2bridge`'s docstring for the design).

Forked by `pmi2bridge.spawn` in the node's first task (`child`), or by the SPANK plugin's
start phase before the tasks (`pmi2bridge.start_node_server` → `served`); kept out of
`pmi2bridge` so that the node's other tasks, which only connect and hand over their
socket, import neither asyncio nor the PMI codec (about 50 ms of each task's start).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import stat
import time
from typing import Any, Callable, NoReturn, Optional, TypeVar, cast

from rankwire.errors import UserError
from rankwire.fds import close_fds_except
from rankwire.pmi.codec import ClientCodec
from rankwire.pmi.errors import RemoteProtocolError
from rankwire.pmi.messages import (
    Abort,
    ErrorReply,
    Fence,
    FenceReply,
    Finalize,
    FinalizeReply,
    FullInit,
    FullInitReply,
    Get,
    GetJobAttr,
    GetKvsName,
    GetReply,
    Init,
    InitReply,
    KvsNameReply,
    Put,
    PutReply,
    Request,
)
from rankwire.pmi.pmix import wire
from rankwire.pmi.pmix.pmi2bridge import (
    DEBUG,
    ERR_LOST_CONNECTION,
    ERR_NOT_FOUND,
    ERR_NOT_SUPPORTED,
    GATHER_TIMEOUT,
    STOP_TIMEOUT,
    Layout,
    Step,
    chunk_count,
    chunk_key,
    follower_reply,
    helper_init,
    join_chunks,
    layout_of,
    nspace_for,
    pmix_env,
    socket_path,
    split_blob,
    task_ending,
    whole_job,
)
from rankwire.pmi.pmix.serverenv import HELPER_ENV, claim_tmpdir
from rankwire.runtime.peercred import peer_creds

R = TypeVar("R")
NOSIGNAL = socket.MSG_NOSIGNAL  # a gone follower is an error, not the bridge's death


def child(step: Step, report: int, control: int, parent: int, base: str) -> NoReturn:
    """The leader's bridge (forked by `pmi2bridge.spawn`): it dies with its task's caller."""
    code = 1
    try:
        from rankwire.runtime import syscalls as sc

        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)
        _detach({step.fd, report, control})
        code = _run(Bridge(step, base, report=report, control=control))
    except BaseException as err:  # the child must never unwind into the parent's code
        with contextlib.suppress(BaseException):
            _say(f"PMI-2 bridge failed: {err}")
    finally:
        os._exit(code)


def served(step: Step, listener: int, life: int, local_tasks: int, base: str) -> int:
    """The node's server started before its tasks (`pmi2bridge.start_node_server`, whose
    child, set up by `bridge.fork_started_server`, calls this and exits with what it
    returns): every task of the node follows; it ends with the node's last task, or when
    slurmstepd (`life`, a pidfd) ends first, or at SIGTERM."""
    logging.basicConfig(format="rankwire pmix server: %(message)s", level=logging.WARNING)
    return _run(Bridge(step, base, listener=listener, life=life, local_tasks=local_tasks))


def _run(bridge: Bridge) -> int:
    """The bridge's loop, in a process that exits right after it: not `asyncio.run`,
    which would wait for libpmix's start-up thread, without a limit, if it hangs."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    return loop.run_until_complete(bridge.run())


def _detach(keep: set[int]) -> None:
    """Signals as the task decides them, stdin and stdout on /dev/null, every descriptor
    but stderr and `keep` closed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the task decides; ^C reaches it
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    close_fds_except(keep)
    logging.basicConfig(format="rankwire pmix server: %(message)s", level=logging.WARNING)


def _say(text: str) -> None:
    os.write(2, f"rankwire: {text}\n".encode(errors="replace"))


_T0 = time.monotonic()


def _debug(text: str) -> None:
    if DEBUG:
        _say(f"debug {time.monotonic() - _T0:.3f}s {text}")


class PmiFailure(Exception):
    """Slurm's PMI-2 server refused a request or closed the connection."""


class AsyncPmi2:
    """A PMI-2 client on the asyncio loop (the codec of `pmi.client`, non-blocking I/O)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.codec = ClientCodec(2)
        self.kvsname = ""
        self.busy = False  # a request is waiting for its answer

    async def call(self, req: Request, expect: type[R]) -> R:
        loop = asyncio.get_running_loop()
        self.busy = True
        try:
            await loop.sock_sendall(self.sock, self.codec.send(req))
            while True:
                reply = self.codec.next_event()
                if reply is not None:
                    break
                data = await loop.sock_recv(self.sock, 65536)
                if not data:
                    raise PmiFailure(f"Slurm's PMI-2 server closed the connection during {req}")
                self.codec.receive_data(data)
        finally:
            self.busy = False
        if isinstance(reply, ErrorReply):
            raise PmiFailure(f"Slurm's PMI-2 server refused {req}: {reply.message}")
        if not isinstance(reply, expect):
            raise RemoteProtocolError(f"{req} was answered with {reply}")
        return reply

    async def init(self, step: Step) -> FullInitReply:
        await self.call(Init(2, 0), InitReply)
        reply = await self.call(FullInit(step.rank, step.jobid), FullInitReply)
        self.kvsname = (await self.call(GetKvsName(), KvsNameReply)).name
        return reply

    async def put(self, key: str, value: str) -> None:
        await self.call(Put(key, value, self.kvsname), PutReply)

    async def fence(self) -> None:
        await self.call(Fence(), FenceReply)

    async def get(self, key: str) -> Optional[str]:
        return (await self.call(Get(key, self.kvsname), GetReply)).value

    async def finalize(self) -> None:
        await self.call(Finalize(), FinalizeReply)

    def abort(self, code: int, message: str) -> None:
        """No answer comes: Slurm kills the step. Written even mid-request."""
        self.sock.setblocking(True)
        with contextlib.suppress(OSError):
            self.sock.sendall(self.codec.send(Abort(code, message)))


class _Sink:
    """The in-process `helper.Helper`'s writer: its messages, decoded, to the bridge (on
    the loop thread: the Helper's upcalls reach it through call_soon_threadsafe)."""

    def __init__(self, deliver: Callable[[dict[str, Any]], None]) -> None:
        self.deliver = deliver
        self.closed = False

    def is_closing(self) -> bool:
        return self.closed

    def write(self, data: bytes) -> None:
        for line in data.splitlines():
            self.deliver(wire.decode(line))


class Bridge:
    """The bridge process's loop: libpmix's server for the node's ranks (through
    `helper.Helper`), their PMI-2 connections, the leader's control pipe and the
    followers' connections. Either the leader's (`report`/`control`: its own task's Slurm
    socket is `step.fd`) or the node's server started before its tasks (`listener`,
    `life`: every task follows; the step's rank and size come from the first one)."""

    def __init__(
        self,
        step: Step,
        base: str,
        *,
        report: int = -1,
        control: int = -1,
        listener: int = -1,
        life: int = -1,
        local_tasks: int = 0,
    ) -> None:
        self.step = step
        self.base = base  # the private dir of the node's socket
        self.report = report
        self.control = control
        self.life = life  # slurmstepd's pidfd (a server started before its tasks)
        self.served = listener >= 0  # every task follows, the first's socket is `pmi`
        self.local_tasks = local_tasks  # the node's task count, as slurmstepd knows it
        self.nspace = nspace_for(step.jobid)
        self.pmi: Optional[AsyncPmi2] = None  # the connection that puts, gets and aborts
        self.conns: dict[int, AsyncPmi2] = {}  # rank → its PMI-2 socket
        if not self.served:
            self.pmi = self.conns[step.rank] = AsyncPmi2(socket.socket(fileno=step.fd))
        self.tasks: dict[int, socket.socket] = {}  # follower rank → its connection
        self.said: dict[int, bytes] = {}  # what a follower wrote so far
        self.layout: Optional[Layout] = None
        self.listener: Optional[socket.socket] = None
        self.path = ""  # the listener's socket file
        if self.served:
            self.listener = socket.socket(fileno=listener)
            self.listener.setblocking(False)
            self.path = socket_path(step, base)
        self.stderr = False  # a follower's stderr is ours (a served bridge has none before)
        self.inited: set[int] = set()  # ranks whose PMI-2 connection completed init
        self.helper: Any = None  # helper.Helper, imported in the bridge process only
        self.sink = _Sink(self._from_helper)
        self.epoch = 0
        self.fences: Optional[asyncio.Queue[dict[str, Any]]] = None
        self.done: Optional[asyncio.Future[int]] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.starting: Optional[asyncio.Task[dict[int, dict[str, str]]]] = None  # `_start`
        self.quitting = False  # SIGTERM or slurmstepd's end came
        self.aborted = False
        self.connected: set[int] = set()  # ranks whose PMIx_Init reached the server
        self.finalized: set[int] = set()
        self.ended: set[int] = set()
        self.said_dmodex = False

    def send(self, msg: dict[str, Any]) -> None:
        """To the server: a fence's or a direct modex's answer."""
        if self.helper is not None and not self.sink.closed:
            self.helper.answer(msg)

    def end(self, code: int) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(code)

    async def run(self) -> int:
        self.loop = loop = asyncio.get_running_loop()
        self.fences = asyncio.Queue()
        done: asyncio.Future[int] = loop.create_future()
        self.done = done
        loop.add_signal_handler(signal.SIGTERM, self._quit, 143, "SIGTERM")
        if self.life >= 0:
            loop.add_reader(self.life, self._quit, 1, "slurmstepd ended")
        for key in [k for k in os.environ if k.startswith(("PMIX_", "PMI_"))]:
            del os.environ[key]
        os.environ.update(HELPER_ENV)  # read by PMIx_server_init
        fences: Optional[asyncio.Task[None]] = None
        try:
            try:
                self.starting = loop.create_task(self._start(claim_tmpdir))
                envs = await self.starting
                # Every node's server is up (and its tmpdir gone) before any task starts:
                # so no task can end the step (PMI-2 abort: SIGKILL) while a server starts.
                assert self.layout is not None
                if len(self.layout.nodes) > 1:  # one node: this server is the step's
                    await asyncio.gather(*(c.fence() for c in self.conns.values()))
                    _debug(f"node {self.step.node_id}: start fence done")
            except asyncio.CancelledError:  # `_start` ended by `_quit`: no task came
                return done.result() if done.done() else 1
            except Exception as err:  # UserError, PmixError, PMI-2 failures: one line
                line = str(err).splitlines()[0]
                if self.report >= 0:
                    os.write(self.report, json.dumps({"error": line}).encode())
                    os.close(self.report)
                await self._refuse_followers(follower_reply(error=line))
                return 1
            if self.report >= 0:
                os.write(self.report, json.dumps({"env": envs[self.step.rank]}).encode())
                os.close(self.report)
            for rank, conn in self.tasks.items():
                try:
                    conn.sendall(follower_reply(env=envs[rank]), NOSIGNAL)
                except OSError:  # its caller is gone: its rank never comes, the peers would wait
                    _say(f"rank {rank} left before it started; ending the step")
                    self._abort(1, "", quiet=True)
                    self.ended.add(rank)
                    continue
                conn.setblocking(False)
                loop.add_reader(conn.fileno(), self._follower, rank)
            fences = loop.create_task(self._fences())
            if self.control >= 0:
                loop.add_reader(self.control, self._control)
            try:
                return await done
            finally:
                with contextlib.suppress(ValueError, OSError):
                    loop.remove_reader(self.control)
                for conn in self.tasks.values():
                    with contextlib.suppress(ValueError, OSError):
                        loop.remove_reader(conn.fileno())
        finally:
            if self.life >= 0:
                with contextlib.suppress(ValueError, OSError):
                    loop.remove_reader(self.life)
            if fences is not None:
                fences.cancel()
            await self._stop()

    def _quit(self, code: int, why: str) -> None:
        """SIGTERM (Slurm ending the step), or slurmstepd's end: the step is over, whether
        or not the node's tasks came."""
        assert self.loop is not None
        _debug(f"node {self.step.node_id}: {why}")
        if self.life >= 0:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self.life)
        if self.starting is not None and not self.quitting:
            self.starting.cancel()  # once: still starting (waiting for the tasks, or PMIx)?
        self.quitting = True
        self.end(code)

    async def _start(
        self, claim_tmpdir: Callable[[], tuple[str, int]]
    ) -> dict[int, dict[str, str]]:
        from rankwire.pmi.pmix import helper as hp

        _debug(f"node {self.step.node_id}: bridge process up")
        if self.listener is None:
            self._listen()  # first: the node's tasks hear of any failure from here on
        assert self.loop is not None
        self.helper = helper = hp.Helper(self.loop, cast(asyncio.StreamWriter, self.sink))
        # libpmix (gds=hash, TCP, not a system server) keeps nothing in its tmpdir once it
        # is up: the dir lives only until then and the node's tasks are in, so a step Slurm
        # SIGKILLs (an abort) in that window leaves it to the next claim, which prunes it.
        tmpdir, lock = claim_tmpdir()
        try:
            node_dir = os.path.join(tmpdir, "node")
            os.mkdir(node_dir, 0o700)
            # PMIx_server_init (≈ 35 ms: hwloc) in a thread, while this task's PMI-2 init
            # and the node's other tasks come: neither needs it, nor it them
            starting = asyncio.ensure_future(
                asyncio.to_thread(hp.init_server, helper, node_dir, socket.gethostname())
            )
            try:
                layout = await self._job_layout()
                await starting
            except BaseException:
                # a thread cannot be cancelled: it ends first (its dir is removed below),
                # unless it hangs
                await asyncio.shield(asyncio.wait({starting}, timeout=STOP_TIMEOUT))
                if starting.done() and not starting.cancelled():
                    starting.exception()  # retrieved: the line that counts is raised here
                raise
            _debug(f"node {self.step.node_id}: PMIx server up")
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
            os.close(lock)
        init = helper_init(layout, self.step.jobid, self.nspace, socket.gethostname())
        init.update(uid=os.getuid(), gid=os.getgid())
        ready = hp.register_job(helper, init)
        _debug(f"node {self.step.node_id}: job registered")
        return {r: pmix_env(ready["envs"][str(r)], self.nspace) for r in layout.local}

    async def _job_layout(self) -> Layout:
        """This task's PMI-2 init, where Slurm placed the step, and the node's other tasks.
        A served bridge's "this task" is the first that hands over its socket."""
        if self.served:
            await self._first_follower()
        assert self.pmi is not None
        reply = await self.pmi.init(self.step)
        self.inited.add(self.step.rank)
        if self.served:  # the size is Slurm's to say
            self.step = dataclasses.replace(self.step, size=reply.size)
        if (reply.rank, reply.size) != (self.step.rank, self.step.size):
            raise UserError(
                f"Slurm's PMI-2 server says rank {reply.rank} of {reply.size}, the environment "
                f"rank {self.step.rank} of {self.step.size}; fix PMI_RANK/PMI_SIZE"
            )
        mapping = (await self.pmi.call(GetJobAttr("PMI_process_mapping"), GetReply)).value
        self.layout = layout = layout_of(mapping, self.step, leads=not self.served)
        if self.served and self.local_tasks and len(layout.local) != self.local_tasks:
            raise UserError(
                f"Slurm's PMI_process_mapping {mapping} puts {len(layout.local)} ranks on this "
                f"node, slurmstepd {self.local_tasks}, which the PMI-2 bridge needs to agree; "
                "run without --distribution=arbitrary or SLURM_HOSTFILE, or under srun --mpi=pmix"
            )
        _debug(f"rank {self.step.rank}: PMI-2 init done, mapping {mapping}")
        await self._gather_followers(layout)
        _debug(f"node {self.step.node_id}: {len(self.tasks)} followers")
        return layout

    async def _first_follower(self) -> None:
        """A served bridge waits for the node's first task, however late (slurmstepd's end
        cancels the wait): its Slurm socket is the one that asks where the ranks are."""
        assert self.loop is not None and self.listener is not None
        while not self.tasks:
            conn, _ = await self.loop.sock_accept(self.listener)
            rank = self._take_follower(conn, None)
            if rank is None:
                conn.close()
                continue
            self.step = dataclasses.replace(self.step, rank=rank)
            self.pmi = self.conns[rank]

    def _listen(self) -> None:
        """The node's socket, in the user's private runtime dir (over a dead bridge's)."""
        from rankwire.runtime.instance import listen_at

        path = socket_path(self.step, self.base)
        try:
            sock = listen_at(path)
        except OSError as err:
            raise UserError(
                f"cannot serve the node's PMI-2 bridge at {path} ({err.strerror}); is another "
                f"bridge of step {self.step.jobid} running here?"
            ) from None
        sock.setblocking(False)
        self.listener, self.path = sock, path

    def _unlisten(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    async def _gather_followers(self, layout: Layout) -> None:
        """Accept the node's other tasks: each hands over its PMI-2 socket with its rank;
        then PMI-2 init on each (Slurm knows the task by its socket)."""
        assert self.loop is not None and self.listener is not None
        deadline = time.monotonic() + GATHER_TIMEOUT
        waiting = set(layout.local) - {self.step.rank}
        while waiting:
            left = deadline - time.monotonic()
            try:
                conn, _ = await asyncio.wait_for(self.loop.sock_accept(self.listener), max(left, 0))
            except asyncio.TimeoutError:
                raise UserError(
                    f"ranks {','.join(map(str, sorted(waiting)))} of this node did not reach "
                    f"the PMI-2 bridge within {GATHER_TIMEOUT:g} s; see their messages"
                ) from None
            # a served bridge takes any rank: one that is not this node's is Slurm's error
            rank = self._take_follower(conn, None if self.served else waiting)
            if rank is None:
                conn.close()
                continue
            if rank not in layout.local:
                raise UserError(
                    f"Slurm's PMI_process_mapping puts rank {rank} on node "
                    f"{layout.node_of[rank] if rank < len(layout.node_of) else '?'}, yet it runs "
                    f"on node {layout.node} with rank {self.step.rank}, which the PMI-2 bridge "
                    "needs to agree; run without --distribution=arbitrary or SLURM_HOSTFILE, or "
                    "under srun --mpi=pmix"
                )
            waiting.discard(rank)
        self._unlisten()
        ranks = [r for r in self.tasks if r not in self.inited]
        replies = await asyncio.gather(
            *(self.conns[r].init(dataclasses.replace(self.step, rank=r, fd=-1)) for r in ranks)
        )
        self.inited.update(ranks)
        for rank, reply in zip(ranks, replies):
            if reply.rank != rank:
                raise UserError(
                    f"a task of this node claimed rank {rank}, Slurm says it is rank "
                    f"{reply.rank}; fix PMI_RANK"
                )

    def _take_follower(self, conn: socket.socket, waiting: Optional[set[int]]) -> Optional[int]:
        """A follower's rank and PMI-2 socket (the shim's also say the task's PMI_JOBID
        and hand over its stderr: a served bridge takes the first one's); None (and a
        line) for anything else. `waiting` None: any rank (a served bridge's first)."""
        pid, uid, _gid = peer_creds(conn)
        if uid != os.getuid():
            _say(f"PMI-2 bridge: refused a connection from uid {uid} (pid {pid})")
            return None
        conn.setblocking(True)
        conn.settimeout(STOP_TIMEOUT)
        try:
            data, fds, _flags, _addr = socket.recv_fds(conn, 256, 2)
        except OSError:
            return None
        if not data and not fds:
            return None  # a liveness probe (`instance.prune_stale` tries every socket)
        stderr = fds.pop() if len(fds) == 2 else -1
        text = data.decode(errors="replace").strip()
        said, _, jobid = text.partition(" ")
        rank = int(said) if said.isascii() and said.isdigit() else -1
        wanted = rank >= 0 and rank not in self.tasks if waiting is None else rank in waiting
        if len(fds) != 1 or not wanted or not stat.S_ISSOCK(os.fstat(fds[0]).st_mode):
            for fd in [*fds, stderr]:
                if fd >= 0:
                    os.close(fd)
            _say(f"PMI-2 bridge: refused pid {pid}: rank {text!r} is not one this node waits for")
            return None
        if stderr >= 0:
            if self.served and not self.stderr:
                os.dup2(stderr, 2)
                self.stderr = True
            os.close(stderr)
        if self.served and not self.tasks and jobid:  # the step's id as Slurm's PMI-2 says
            self.step = dataclasses.replace(self.step, jobid=jobid)  # it (a het job's too)
            self.nspace = nspace_for(jobid)
        self.tasks[rank] = conn
        self.conns[rank] = AsyncPmi2(socket.socket(fileno=fds[0]))
        return rank

    async def _refuse_followers(self, error: bytes) -> None:
        """The start failed: every follower hears why (each task fails with that line)."""
        for conn in self.tasks.values():
            with contextlib.suppress(OSError):
                conn.sendall(error, NOSIGNAL)
        if self.listener is None:
            return
        assert self.loop is not None and self.done is not None
        # a served bridge's tasks may still be on their way (it started before them): it
        # tells each as it comes, until slurmstepd ends (`done`)
        deadline = None if self.served else time.monotonic() + STOP_TIMEOUT
        told = len(self.tasks)
        expected: Optional[int] = self.local_tasks or None
        if self.layout:
            expected = len(self.layout.local) - (0 if self.served else 1)
        while expected is None or told < expected:
            left = None if deadline is None else max(deadline - time.monotonic(), 0)
            accept = asyncio.ensure_future(self.loop.sock_accept(self.listener))
            watched: set[asyncio.Future[Any]] = {accept, self.done}
            await asyncio.wait(watched, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if not accept.done() or accept.exception() is not None:
                accept.cancel()
                break
            conn, _ = accept.result()
            data, fds = b"", list[int]()
            with conn, contextlib.suppress(OSError):
                conn.setblocking(True)
                conn.settimeout(STOP_TIMEOUT)
                data, fds, _, _ = socket.recv_fds(conn, 256, 2)
                for fd in fds:
                    os.close(fd)
                conn.sendall(error, NOSIGNAL)
            told += bool(data or fds)  # not a liveness probe (`instance.prune_stale`)

    def _control(self) -> None:
        try:
            data = os.read(self.control, 64)
        except OSError:
            data = b""
        self._heard(self.step.rank, self.control, data)

    def _follower(self, rank: int) -> None:
        conn = self.tasks[rank]
        try:
            data = conn.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._heard(rank, conn.fileno(), data)

    def _heard(self, rank: int, fd: int, data: bytes) -> None:
        """What task `rank` wrote on `fd`: its exit code and a newline, or EOF alone (its
        caller is gone or gave no code), is its end. What libpmix's thread already posted
        to this loop (an abort, a finalize: both happen before the task can exit) runs
        first: decide after it."""
        said = self.said.get(rank, b"") + data
        if data and not said.endswith(b"\n"):
            self.said[rank] = said  # the rest of the line follows
            return
        assert self.loop is not None
        self.loop.remove_reader(fd)
        text = said.decode(errors="replace").strip()
        code = int(text) if text.lstrip("-").isdigit() else None
        self.loop.call_soon(self._task_ended, rank, code)

    def _task_ended(self, rank: int, code: Optional[int]) -> None:
        if rank in self.ended:
            return
        self.ended.add(rank)
        if rank in self.finalized or self.aborted:
            pass
        elif code is not None and (rank in self.connected or code != 0):
            _say(f"{task_ending(rank, code)}; ending the step, whose ranks would wait")
            self._abort(code if code > 0 else 1, "", quiet=True)
        elif code is None and rank in self.connected:  # its caller is gone, or the task
            _say(
                f"rank {rank} ended without PMIx finalize; ending the step, whose ranks would wait"
            )
            self._abort(1, "", quiet=True)
        assert self.layout is not None
        if len(self.ended) == len(self.layout.local):
            self.end(0)

    def _from_helper(self, msg: dict[str, Any]) -> None:
        op = msg["op"]
        _debug(f"node {self.step.node_id}: server {str(msg)[:200]}")
        if op == "fence":
            assert self.fences is not None
            self.fences.put_nowait(msg)
        elif op == "dmodex":
            self._dmodex(msg)
        elif op == "abort":
            self._abort(int(msg["code"]), str(msg.get("message", "")), int(msg["rank"]))
        elif op == "connected":
            self.connected.add(int(msg["rank"]))
        elif op == "finalized":
            self.finalized.add(int(msg["rank"]))

    def _abort(self, code: int, message: str, rank: int = -1, quiet: bool = False) -> None:
        if self.aborted:
            return
        self.aborted = True
        if not quiet:
            _say(f"rank {rank} aborted the job (code {code}): {message}")
        self._drop_clients()
        if self.pmi is not None:
            self.pmi.abort(code, message or f"rank {rank} aborted")

    def _drop_clients(self) -> None:
        """Before a PMI-2 abort: deregister the node's ranks from libpmix, which removes the
        files each registered for cleanup (Open MPI 4.1's `/dev/shm/vader_segment.*`).
        Slurm SIGKILLs the whole step at once, this server with its ranks, so libpmix never
        sees their connections end (under `--mpi=pmix`, slurmstepd does and cleans up)."""
        from rankwire.pmi.pmix.abi import PmixError, Proc

        helper = self.helper
        if helper is None or helper.server is None or not helper.nspace:
            return
        assert self.layout is not None
        deadline = time.monotonic() + STOP_TIMEOUT
        for rank in self.layout.local:
            left = max(deadline - time.monotonic(), 0.1)
            try:
                helper.server.deregister_client(Proc(self.nspace, rank), timeout=left)
            except PmixError as err:
                _say(f"PMIx server: rank {rank}'s cleanup: {err}")
        _debug(f"node {self.step.node_id}: ranks deregistered")

    def _dmodex(self, msg: dict[str, Any]) -> None:
        if not self.said_dmodex:
            self.said_dmodex = True
            _say(
                f"a rank of node {self.step.node_id} asked for rank {msg['rank']}'s data "
                "outside a collecting fence (direct modex), which the PMI-2 bridge cannot "
                "serve; unset OMPI_MCA_pmix_base_async_modex and OMPI_MCA_pmix_base_collect_data"
            )
        self.send({"op": "dmodex_done", "id": msg["id"], "status": ERR_NOT_FOUND, "data": ""})

    async def _fences(self) -> None:
        assert self.fences is not None
        while True:
            msg = await self.fences.get()
            try:
                status, data = await self._fence(msg)
            except (PmiFailure, RemoteProtocolError, ValueError, OSError) as err:
                # a connection is gone or out of step: no later fence can be trusted
                _say(f"fence of node {self.step.node_id} failed: {err}; ending the step")
                self._abort(1, "", quiet=True)
                status, data = ERR_LOST_CONNECTION, b""
            self.send(
                {"op": "fence_done", "id": msg["id"], "status": status, "data": wire.pack(data)}
            )

    async def _fence(self, msg: dict[str, Any]) -> tuple[int, bytes]:
        if not whole_job(msg["procs"], self.nspace, self.step.size):
            _say(
                f"a rank of node {self.step.node_id} asked for a fence over part of the job, "
                "which a PMI-2 step cannot carry (its fences are step-wide); run under "
                "srun --mpi=pmix"
            )
            return ERR_NOT_SUPPORTED, b""
        assert self.layout is not None
        data = wire.unpack(msg["data"])
        if len(self.layout.nodes) == 1:
            # every rank of the step is this server's and has entered the fence: nothing
            # to wait for or fetch elsewhere (Slurm's PMI-2 fence goes up to srun and back)
            return 0, data
        self.epoch += 1
        epoch, me = self.epoch, self.layout.node
        _debug(f"node {me}: fence {epoch} ({len(data)} bytes) in")
        assert self.pmi is not None
        if data:
            for i, chunk in enumerate(split_blob(data)):
                await self.pmi.put(chunk_key(epoch, me, i), chunk)
        await asyncio.gather(*(c.fence() for c in self.conns.values()))
        _debug(f"node {me}: fence {epoch} out")
        if not (msg.get("collect") or data):
            return 0, b""
        parts = []
        for node in self.layout.nodes:
            parts.append(data if node == me else await self._fetch(epoch, node))
        return 0, b"".join(parts)

    async def _fetch(self, epoch: int, node: int) -> bytes:
        assert self.pmi is not None
        first = await self.pmi.get(chunk_key(epoch, node, 0))
        if first is None:
            return b""
        count, payload = chunk_count(first)
        parts = [payload]
        for i in range(1, count):
            value = await self.pmi.get(chunk_key(epoch, node, i))
            if value is None:
                raise ValueError(f"chunk {i} of node {node}'s fence blob {epoch} is missing")
            parts.append(value)
        return join_chunks(parts)

    async def _stop(self) -> None:
        from rankwire.pmi.pmix.abi import PmixError

        _debug(f"node {self.step.node_id}: stopping")
        helper, self.sink.closed = self.helper, True
        if helper is not None and helper.server is not None:
            helper.fail_all(ERR_LOST_CONNECTION)
            steps = [helper.server.finalize]
            if helper.nspace:  # registered
                steps.insert(0, lambda: helper.server.deregister_nspace(self.nspace))
            for step in steps:
                try:
                    step()
                except PmixError as err:
                    _say(f"PMIx server stop: {err}")
        idle = [c for r, c in self.conns.items() if r in self.inited and not c.busy]
        if idle and not self.aborted:
            with contextlib.suppress(
                PmiFailure, RemoteProtocolError, OSError, asyncio.TimeoutError
            ):
                await asyncio.wait_for(asyncio.gather(*(c.finalize() for c in idle)), STOP_TIMEOUT)
        for conn in self.conns.values():
            conn.sock.close()
        for sock in self.tasks.values():
            sock.close()
        self._unlisten()
        _debug(f"node {self.step.node_id}: stopped")
