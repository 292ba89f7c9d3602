"""The PMI-2 → PMIx bridge: a task whose MPI speaks only PMIx, in a step that serves PMI-2.

Under `srun --mpi=pmi2` every task has Slurm's `PMI_FD` / `PMI_JOBID` / `PMI_RANK` /
`PMI_SIZE`; Open MPI 4.1/5 speaks only PMIx and fails in `MPI_Init` ("OMPI was not built
with SLURM's PMI support"). The bridge gives each task a PMIx server of its own, registered
with the whole job, whose fences cross tasks through that task's Slurm PMI-2 connection.

Shape (per task; the executor calls `spawn`, or `python -m rankwire.pmi.pmix.pmi2bridge
-- CMD ARGS…` does it all)::

    bridge = spawn(os.environ)                  # UserError if no PMI-2 step, nothing left
    env = bridge.task_env(os.environ)           # PMIx env in, Slurm's PMI_* out
    ... start the task with env (bridge.pass_fds is always ()) and wait for it ...
    bridge.finish(code)                         # the server goes, the bridge exits

Processes: `spawn` forks the *bridge process* (before the task exists), which takes over
the task's PMI-2 socket (the caller closes its copy, so the task never inherits it) and
hosts libpmix's server for this task's rank with `helper.Helper` / `helper.start_server`
(the helper's code, in-process: no second interpreter to start, which halved the bridged
launch here). The property `PmixServer` keeps holds: the process that forks the task (the
executor, or the CLI below) never loads libpmix and never gains a thread; the bridge
process, which has libpmix's progress thread, never forks. Its main thread is one asyncio
loop over the PMI-2 socket and the control pipe from the caller; libpmix's upcalls reach it
through `loop.call_soon_threadsafe`, as in the helper.

One emulated node per task. Each bridge registers the job's N ranks as N one-rank nodes
(`<host>-t<rank>`), so libpmix hands every fence of the task to us (it has no local peer to
complete it with) and the fence result is simply the N per-rank contributions. The cost:
Open MPI sees no local peers, so ranks on one machine talk over TCP, not shared memory,
and Open MPI's vader/sm segment names (real hostname + jobid + local rank 0) would collide
between tasks of one machine: the task gets `OMPI_MCA_btl=self,tcp` unless the caller set
`OMPI_MCA_btl` (sharing one server per node would need the node's tasks to find each other
and elect a leader: not built).

Fence (PMIx_Fence from the task's MPI → libpmix's fence upcall → here):
  * (one bare `kvs-fence` at start, before the task runs: every server is up by then);
  * epoch += 1 (every task sees the same sequence of collective fences);
  * this task's blob, base64, in chunks: `rw.<epoch>.<rank>.<i>`, the value of chunk 0 being
    `<count>:<chunk>` and every value ≤ 1024 characters (Slurm's PMI-2 `PMI2_MAX_VALLEN`);
    an empty blob is not put at all;
  * `kvs-fence` (Slurm's allgather of the step's KVS);
  * with data collection asked for (or a blob of our own), `kvs-get` every other rank's
    chunks (not found = empty) and hand libpmix the concatenation in rank order, which is
    `PmixServer`'s node order here; without it, the fence is a barrier and its result empty.
  A fence over a subset of the job cannot be carried by PMI-2 (its fence is step-wide): it
  fails with PMIX_ERR_NOT_SUPPORTED and one line on stderr.

Direct modex: a rank's data reaches the other servers only through collecting fences.
Open MPI 4.1's `MPI_Init` runs its modex as a fence with data collection (the default,
`pmix_base_collect_data=1`, `pmix_base_async_modex=0`), and that is what the bridge relies
on: once it completed, libpmix answers every `PMIx_Get` of a peer's key from what it holds.
A direct-modex request (data of a rank that no fence collected) is refused with
PMIX_ERR_NOT_FOUND and one line naming the setting to undo.

Abort: the task's `PMIx_Abort` (MPI_Abort) → PMI-2 `abort` (isworld): Slurm kills the
step. Task end (`finish`), the caller's death (the bridge has `PR_SET_PDEATHSIG`), SIGTERM
(Slurm ending the step): the namespace is deregistered and the server finalized, PMI-2
`finalize` sent when the connection is idle, the bridge exits. libpmix's tmpdir is removed
as soon as the server is up (it keeps nothing there with gds=hash over TCP), so a step
Slurm SIGKILLs leaves nothing. `RANKWIRE_PMI2BRIDGE_DEBUG=1` logs every upcall to stderr.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Callable, NoReturn, Optional, TypeVar, cast

from rankwire.errors import UserError, exec_failure, shown
from rankwire.pmi.bridge import read_report
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

VALUE_MAX = 1024  # Slurm's and MPICH's PMI2_MAX_VALLEN
KEY_PREFIX = "rw"
WILDCARD = 0xFFFFFFFE
ERR_NOT_FOUND = -46
ERR_NOT_SUPPORTED = -47
ERR_LOST_CONNECTION = -61
START_TIMEOUT = 60.0  # the PMI-2 handshake and PMIx_server_init
STOP_TIMEOUT = 5.0
DEBUG = bool(os.environ.get("RANKWIRE_PMI2BRIDGE_DEBUG"))
STEP_VARS = ("PMI_FD", "PMI_JOBID", "PMI_RANK", "PMI_SIZE")

R = TypeVar("R")


# -- pure: the step, the keys, the chunks, the task's environment ------------------------------
@dataclasses.dataclass(frozen=True)
class Step:
    """This task in Slurm's PMI-2 step (from its environment)."""

    fd: int
    jobid: str  # PMI_JOBID: "<job>.<step>"
    rank: int
    size: int


def step_of(environ: Mapping[str, str]) -> Step:
    """The task's PMI-2 identity; UserError when the environment is not a PMI-2 step's."""
    missing = [name for name in STEP_VARS if not environ.get(name)]
    if missing:
        raise UserError(
            f"no Slurm PMI-2 connection to bridge ({', '.join(missing)} unset): "
            "run the PMI-2 bridge as a task of `srun --mpi=pmi2`"
        )
    values: dict[str, int] = {}
    for name in ("PMI_FD", "PMI_RANK", "PMI_SIZE"):
        text = environ[name]
        if not text.isdigit():
            raise UserError(f"{name}={shown(text)} is not a number; fix the PMI environment")
        values[name] = int(text)
    if values["PMI_RANK"] >= values["PMI_SIZE"]:
        raise UserError(
            f"PMI_RANK={values['PMI_RANK']} is not below PMI_SIZE={values['PMI_SIZE']}; "
            "fix the PMI environment"
        )
    return Step(values["PMI_FD"], environ["PMI_JOBID"], values["PMI_RANK"], values["PMI_SIZE"])


def nspace_for(jobid: str) -> str:
    """The PMIx namespace: the same in every task's server (their fence blobs name it)."""
    return f"rankwire.pmi2.{jobid}"


def node_names(host: str, size: int) -> list[str]:
    """One emulated node per task."""
    return [f"{host}-t{r}" for r in range(size)]


def chunk_key(epoch: int, rank: int, index: int) -> str:
    return f"{KEY_PREFIX}.{epoch}.{rank}.{index}"


def split_blob(data: bytes, value_max: int = VALUE_MAX) -> list[str]:
    """`data` as PMI values of at most `value_max` characters; chunk 0 says how many."""
    text = base64.b64encode(data).decode()
    width = value_max - 12  # room for "<count>:" on chunk 0
    parts = [text[i : i + width] for i in range(0, len(text), width)] or [""]
    parts[0] = f"{len(parts)}:{parts[0]}"
    return parts


def chunk_count(first: str) -> tuple[int, str]:
    """(number of chunks, payload) of a chunk 0; ValueError if it is not one."""
    count, sep, payload = first.partition(":")
    if not sep or not count.isdigit() or int(count) < 1:
        raise ValueError(f"not a rankwire fence chunk: {first[:40]!r}")
    return int(count), payload


def join_chunks(parts: Sequence[str]) -> bytes:
    try:
        return base64.b64decode("".join(parts), validate=True)
    except binascii.Error as err:
        raise ValueError(f"a fence blob is not base64: {err}") from None


def whole_job(procs: Sequence[Sequence[Any]], nspace: str, size: int) -> bool:
    """Whether a fence's participants are every rank of the job (PMI-2 fences are)."""
    ranks: set[int] = set()
    for ns, rank in procs:
        if ns != nspace:
            return False
        if int(rank) == WILDCARD:
            return True
        ranks.add(int(rank))
    return ranks == set(range(size))


def helper_init(step: Step, nspace: str, host: str, tmpdir: str) -> dict[str, Any]:
    """The helper's `init`: the whole job, this task's rank local."""
    return {
        "op": "init",
        "nspace": nspace,
        "jobid": step.jobid,
        "appnum": 0,
        "size": step.size,
        "hostname": node_names(host, step.size)[step.rank],
        "local_ranks": [step.rank],
        "node_ranks": [[r] for r in range(step.size)],
        "node_names": node_names(host, step.size),
        "tmpdir": tmpdir,
    }


def task_env(environ: Mapping[str, str], add: Mapping[str, str]) -> dict[str, str]:
    """The task's environment: without Slurm's PMI_* (Open MPI must not see a PMI-2 step)
    and any stale PMIX_*, with the bridge's PMIx variables; `OMPI_MCA_btl=self,tcp`
    unless set (see the module docstring)."""
    env = {k: v for k, v in environ.items() if not k.startswith(("PMI_", "PMIX_"))}
    env.setdefault("OMPI_MCA_btl", "self,tcp")
    env.update(add)
    return env


def task_ending(rank: int, code: int) -> str:
    """Why the step ends when a task ended (`code` as Popen's returncode) without PMIx
    finalize: its peers would wait for it in their next fence (PMI-2 has no timeout)."""
    how = f"exited with code {code}" if code >= 0 else f"was killed by signal {-code}"
    return f"rank {rank} {how} without PMIx finalize"


def pmix_env(server_env: Mapping[str, str], nspace: str) -> dict[str, str]:
    """The server's env for the rank plus Open MPI's direct-launch hint (as PmixServer's
    default, `FLUX_JOB_ID`; the step's own SLURM_* variables stay too)."""
    env = dict(server_env)
    env["FLUX_JOB_ID"] = str(zlib.crc32(nspace.encode()) & 0x7FFFFFFF)
    return env


# -- the caller's side ------------------------------------------------------------------------
@dataclasses.dataclass
class Pmi2Bridge:
    """A running bridge process for one task. `env` is what the task adds (`task_env`)."""

    pid: int
    control: int  # write end of the control pipe; its EOF tells the bridge the task ended
    env: Mapping[str, str]
    pass_fds: tuple[int, ...] = ()
    returncode: Optional[int] = None

    def task_env(self, environ: Mapping[str, str]) -> dict[str, str]:
        return task_env(environ, self.env)

    def finish(self, code: Optional[int], timeout: float = STOP_TIMEOUT) -> int:
        """The task ended with `code` (Popen's returncode: < 0 = killed by that signal;
        None = unknown): the bridge stops its server and exits. A task that ended without
        PMIx finalize after PMIx init, or with a non-zero code, ends the step first (PMI-2
        abort), so its peers do not wait for it forever. Returns the bridge's exit code
        (it is killed if it does not exit within `timeout`)."""
        if self.control >= 0:
            if code is not None:
                with contextlib.suppress(OSError):
                    os.write(self.control, f"{code}\n".encode())
            os.close(self.control)
            self.control = -1
        if self.returncode is None:
            self.returncode = _reap(self.pid, timeout)
        return self.returncode

    def close(self) -> None:
        """Stop the bridge (the task did not start)."""
        self.finish(None)


def _reap(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return 0
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)


def spawn(environ: Mapping[str, str], *, timeout: float = START_TIMEOUT) -> Pmi2Bridge:
    """Start the bridge for the task whose PMI-2 identity `environ` holds; returns once its
    PMIx server is up. The caller's copy of PMI_FD is closed (the bridge owns it now).
    UserError if it cannot start; nothing is left then."""
    step = step_of(environ)
    try:
        is_socket = stat.S_ISSOCK(os.fstat(step.fd).st_mode)
    except OSError:
        is_socket = False
    if not is_socket:
        raise UserError(
            f"PMI_FD={step.fd} is not an open socket; run the PMI-2 bridge as the task "
            "srun started, not from a child that closed it"
        )
    report_r, report_w = os.pipe()
    control_r, control_w = os.pipe()
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the bridge process, exercised under srun
        os.close(report_r)
        os.close(control_w)
        _child(step, report_w, control_r, parent)
    os.close(report_w)
    os.close(control_r)
    with contextlib.suppress(OSError):
        os.close(step.fd)  # the bridge's now: the task must not inherit it
    try:
        text = read_report(
            report_r,
            timeout,
            f"the PMI-2 bridge's PMIx server did not start within {timeout:g} s; "
            "check libpmix2 (set RANKWIRE_LIBPMIX) and the messages above",
        )
        doc: dict[str, Any] = (
            json.loads(text) if text else {"error": "the PMI-2 bridge exited during start-up"}
        )
        if "error" in doc:
            raise UserError(str(doc["error"]))
    except BaseException:
        os.close(control_w)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        _reap(pid, STOP_TIMEOUT)
        raise
    finally:
        os.close(report_r)
    env = {str(k): str(v) for k, v in doc["env"].items()}
    return Pmi2Bridge(pid, control_w, env)


# -- the bridge process -----------------------------------------------------------------------
def _child(step: Step, report: int, control: int, parent: int) -> NoReturn:
    code = 1
    try:
        from rankwire.runtime import syscalls as sc

        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the task decides; ^C reaches it
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.close(null)
        keep = sorted({0, 1, 2, step.fd, report, control})
        low = 3
        for fd in keep:
            if fd >= low:
                os.closerange(low, fd)
                low = fd + 1
        os.closerange(low, 65536)
        logging.basicConfig(format="rankwire pmix server: %(message)s", level=logging.WARNING)
        code = asyncio.run(Bridge(step, report, control).run())
    except BaseException as err:  # the child must never unwind into the parent's code
        with contextlib.suppress(BaseException):
            _say(f"PMI-2 bridge failed: {err}")
    finally:
        os._exit(code)


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
    """The bridge process's loop: libpmix's server (through `helper.Helper`), the PMI-2
    connection, the control pipe."""

    def __init__(self, step: Step, report: int, control: int) -> None:
        self.step = step
        self.report = report
        self.control = control
        self.nspace = nspace_for(step.jobid)
        self.pmi = AsyncPmi2(socket.socket(fileno=step.fd))
        self.helper: Any = None  # helper.Helper, imported in the bridge process only
        self.sink = _Sink(self._from_helper)
        self.epoch = 0
        self.fences: Optional[asyncio.Queue[dict[str, Any]]] = None
        self.done: Optional[asyncio.Future[int]] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.aborted = False
        self.connected = False  # the task's PMIx_Init reached the server
        self.finalized = False
        self.said_dmodex = False

    def send(self, msg: dict[str, Any]) -> None:
        """To the server: a fence's or a direct modex's answer."""
        if self.helper is not None and not self.sink.closed:
            self.helper.answer(msg)

    def end(self, code: int) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(code)

    async def run(self) -> int:
        from rankwire.pmi.pmix.server import HELPER_ENV, claim_tmpdir

        self.loop = loop = asyncio.get_running_loop()
        self.fences = asyncio.Queue()
        done: asyncio.Future[int] = loop.create_future()
        self.done = done
        loop.add_signal_handler(signal.SIGTERM, self.end, 143)
        for key in [k for k in os.environ if k.startswith(("PMIX_", "PMI_"))]:
            del os.environ[key]
        os.environ.update(HELPER_ENV)  # read by PMIx_server_init
        fences: Optional[asyncio.Task[None]] = None
        try:
            try:
                env = await self._start(claim_tmpdir)
                # Every task's server is up (and its tmpdir gone) before any task starts:
                # so no task can end the step (PMI-2 abort: SIGKILL) while a server starts.
                await self.pmi.fence()
                _debug(f"rank {self.step.rank}: start fence done")
            except Exception as err:  # UserError, PmixError, PMI-2 failures: one line
                os.write(self.report, json.dumps({"error": str(err).splitlines()[0]}).encode())
                os.close(self.report)
                return 1
            os.write(self.report, json.dumps({"env": env}).encode())
            os.close(self.report)
            fences = loop.create_task(self._fences())
            loop.add_reader(self.control, self._control)
            try:
                return await done
            finally:
                with contextlib.suppress(ValueError, OSError):
                    loop.remove_reader(self.control)
        finally:
            if fences is not None:
                fences.cancel()
            await self._stop()

    async def _start(self, claim_tmpdir: Callable[[], tuple[str, int]]) -> dict[str, str]:
        from rankwire.pmi.pmix import helper as hp

        _debug(f"rank {self.step.rank}: bridge process up")
        reply = await self.pmi.init(self.step)
        _debug(f"rank {self.step.rank}: PMI-2 init done")
        if (reply.rank, reply.size) != (self.step.rank, self.step.size):
            raise UserError(
                f"Slurm's PMI-2 server says rank {reply.rank} of {reply.size}, the environment "
                f"rank {self.step.rank} of {self.step.size}; fix PMI_RANK/PMI_SIZE"
            )
        assert self.loop is not None
        self.helper = hp.Helper(self.loop, cast(asyncio.StreamWriter, self.sink))
        init = helper_init(self.step, self.nspace, socket.gethostname(), "")
        init.update(uid=os.getuid(), gid=os.getgid())
        # libpmix (gds=hash, TCP, not a system server) keeps nothing in its tmpdir once it
        # is up: the dir lives only around start_server, so a step Slurm SIGKILLs (an
        # abort) leaves nothing unless it hits that moment (then the next claim prunes it).
        tmpdir, lock = claim_tmpdir()
        try:
            init["tmpdir"] = os.path.join(tmpdir, "node")
            os.mkdir(init["tmpdir"], 0o700)
            ready = hp.start_server(self.helper, init)
            _debug(f"rank {self.step.rank}: PMIx server up")
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
            os.close(lock)
        return pmix_env(ready["envs"][str(self.step.rank)], self.nspace)

    def _control(self) -> None:
        try:
            data = os.read(self.control, 64)
        except OSError:
            data = b""
        if data and not data.endswith(b"\n"):
            return  # the rest of the line follows
        # The task ended (EOF alone: the caller is gone or gave no code). What libpmix's
        # thread already posted to this loop (an abort, a finalize: both happen before the
        # task can exit) runs first: decide after it.
        assert self.loop is not None
        self.loop.remove_reader(self.control)
        text = data.decode(errors="replace").strip()
        code = int(text) if text.lstrip("-").isdigit() else None
        self.loop.call_soon(self._task_ended, code)

    def _task_ended(self, code: Optional[int]) -> None:
        ended = code is not None and not self.finalized and not self.aborted
        if ended and code is not None and (self.connected or code != 0):
            _say(f"{task_ending(self.step.rank, code)}; ending the step, whose ranks would wait")
            self._abort(code if code > 0 else 1, "", quiet=True)
        self.end(0)

    def _from_helper(self, msg: dict[str, Any]) -> None:
        op = msg["op"]
        _debug(f"rank {self.step.rank}: server {str(msg)[:200]}")
        if op == "fence":
            assert self.fences is not None
            self.fences.put_nowait(msg)
        elif op == "dmodex":
            self._dmodex(msg)
        elif op == "abort":
            self._abort(int(msg["code"]), str(msg.get("message", "")))
        elif op == "connected":
            self.connected = True
        elif op == "finalized":
            self.finalized = True

    def _abort(self, code: int, message: str, quiet: bool = False) -> None:
        if self.aborted:
            return
        self.aborted = True
        if not quiet:
            _say(f"rank {self.step.rank} aborted the job (code {code}): {message}")
        self.pmi.abort(code, message or f"rank {self.step.rank} aborted")

    def _dmodex(self, msg: dict[str, Any]) -> None:
        if not self.said_dmodex:
            self.said_dmodex = True
            _say(
                f"rank {self.step.rank} asked for rank {msg['rank']}'s data outside a "
                "collecting fence (direct modex), which the PMI-2 bridge cannot serve; "
                "unset OMPI_MCA_pmix_base_async_modex and OMPI_MCA_pmix_base_collect_data"
            )
        self.send({"op": "dmodex_done", "id": msg["id"], "status": ERR_NOT_FOUND, "data": ""})

    async def _fences(self) -> None:
        assert self.fences is not None
        while True:
            msg = await self.fences.get()
            try:
                status, data = await self._fence(msg)
            except (PmiFailure, RemoteProtocolError, ValueError) as err:
                _say(f"fence of rank {self.step.rank} failed: {err}")
                status, data = ERR_LOST_CONNECTION, b""
            self.send(
                {"op": "fence_done", "id": msg["id"], "status": status, "data": wire.pack(data)}
            )

    async def _fence(self, msg: dict[str, Any]) -> tuple[int, bytes]:
        if not whole_job(msg["procs"], self.nspace, self.step.size):
            _say(
                f"rank {self.step.rank} asked for a fence over part of the job, which a PMI-2 "
                "step cannot carry (its fences are step-wide); run under srun --mpi=pmix"
            )
            return ERR_NOT_SUPPORTED, b""
        data = wire.unpack(msg["data"])
        self.epoch += 1
        epoch, me = self.epoch, self.step.rank
        if data:
            for i, chunk in enumerate(split_blob(data)):
                await self.pmi.put(chunk_key(epoch, me, i), chunk)
        await self.pmi.fence()
        if not (msg.get("collect") or data):
            return 0, b""
        parts = []
        for rank in range(self.step.size):
            parts.append(data if rank == me else await self._fetch(epoch, rank))
        return 0, b"".join(parts)

    async def _fetch(self, epoch: int, rank: int) -> bytes:
        first = await self.pmi.get(chunk_key(epoch, rank, 0))
        if first is None:
            return b""
        count, payload = chunk_count(first)
        parts = [payload]
        for i in range(1, count):
            value = await self.pmi.get(chunk_key(epoch, rank, i))
            if value is None:
                raise ValueError(f"chunk {i} of rank {rank}'s fence blob {epoch} is missing")
            parts.append(value)
        return join_chunks(parts)

    async def _stop(self) -> None:
        from rankwire.pmi.pmix.abi import PmixError

        helper, self.sink.closed = self.helper, True
        if helper is not None and helper.server is not None:
            helper.fail_all(ERR_LOST_CONNECTION)
            for step in (
                lambda: helper.server.deregister_nspace(self.nspace),
                helper.server.finalize,
            ):
                try:
                    step()
                except PmixError as err:
                    _say(f"PMIx server stop: {err}")
        if not self.pmi.busy and not self.aborted:
            with contextlib.suppress(PmiFailure, RemoteProtocolError, OSError):
                await asyncio.wait_for(self.pmi.finalize(), STOP_TIMEOUT)
        self.pmi.sock.close()


# -- the hidden CLI ---------------------------------------------------------------------------
def for_task(report_fd: int, control_fd: int, environ: Mapping[str, str]) -> int:
    """The SPANK plugin's way (`rankwire pmi pmix-server`, which the shim's task_init runs
    detached, with the task's environment): start the bridge of the task whose PMI-2
    identity `environ` holds, tell the shim the task's environment changes on `report_fd`
    as framed records (`setenv=K=V`, `unsetenv=K`, or `error=…`), then wait for EOF on
    `control_fd` (the task holds its other end: EOF is the task's end) and finish."""
    from rankwire.runtime import frame

    try:
        bridge = spawn(environ)
    except UserError as err:
        os.write(report_fd, frame.encode([("error", f"rankwire: {err}")]))
        os.close(report_fd)
        return 1
    env = task_env(environ, bridge.env)
    records = [("unsetenv", k) for k in environ if k not in env]
    records += [("setenv", f"{k}={v}") for k, v in env.items() if environ.get(k) != v]
    try:
        os.write(report_fd, frame.encode(records))
        os.close(report_fd)
        while os.read(control_fd, 4096):
            pass
    except OSError:
        pass
    return bridge.finish(None)


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m rankwire.pmi.pmix.pmi2bridge -- CMD ARGS…`: CMD under the bridge."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m rankwire.pmi.pmix.pmi2bridge -- CMD [ARGS…]", file=sys.stderr)
        return 2
    try:
        bridge = spawn(os.environ)
    except UserError as err:
        print(f"rankwire: {err}", file=sys.stderr)
        return err.exit_code
    try:
        proc = subprocess.Popen(args, env=bridge.task_env(os.environ))
    except OSError as err:
        code, message = exec_failure(args[0], err, "on this host")
        print(f"rankwire: {message}", file=sys.stderr)
        bridge.finish(code)  # a task that could not start ends the step, as one that failed
        return code

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    code = proc.wait()
    bridge.finish(code)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
