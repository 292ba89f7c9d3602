"""PmixServer: PMIx for the ranks of one job, driven from the launcher's asyncio loop.

Shaped like `rankwire.pmi.server.PmiServer`::

    job = Job(size=4, nodes=[0, 0, 1, 1], fence_timeout=30)
    server = PmixServer(job)                        # mode="tcp": 127.0.0.1 only
    await server.start()                            # helpers up, every rank registered
    for rank in range(job.size):
        env, pass_fds = server.rank_env(rank)       # pass_fds is always ()
        pid = spawn(argv, env={**base_env, **env})
        server.spawned(rank)
    server.rank_exited(rank, code)                  # code < 0: killed by signal -code
    event = await server.wait_event()               # Aborted | FenceFailed | Finalized
    await server.close()

Design: libpmix in helper processes, never in the launcher
  libpmix's server starts a progress thread and calls its host's callbacks on it. The
  launcher forks host ranks with os.fork() (runtime.instance.start_in; a container's it
  posix_spawns through the C front end) and the child runs Python (chdir, prctl) before
  execve. After a fork only the forking thread survives; every lock another thread held at
  that moment stays locked forever in the child. The child's Python touches the allocator,
  ctypes/libffi closures, logging and import machinery; libpmix's thread takes malloc,
  libevent and our own locks and, during an upcall, the GIL and the logging lock (held
  across I/O with the GIL released). glibc protects malloc with atfork handlers, CPython
  re-creates the GIL and some module locks, but nothing covers the rest, and a proof would
  have to audit every line the child will ever run (Python 3.12 already warns on fork()
  with threads). So rather than argue, keep the launcher single-threaded: the PMIx server
  runs in one helper process per node, forked here before any rank exists (`launch`,
  which the launcher calls before its asyncio loop runs; `start` forks them for a caller
  that did not), which runs `helper.main` and loads libpmix only then, and the launcher
  talks to it over a Unix socketpair with asyncio streams (`wire`). The launcher process
  never loads libpmix and never gains a thread, so the fork itself is as safe as a
  rank's. The child does not exec a new interpreter: that start (≈ 20 ms, asyncio's
  imports ≈ 25 more) was what a PMIx job's ranks waited for; `_run_helper` gives it the
  helper's environment, /dev/null for stdin, no descriptor of ours but stdout and stderr,
  none of our signal handlers or blocked signals, its own name (`rankwire-pmix`), and ends
  it with `os._exit` (the launcher's exit handlers are not its own). Inside a helper,
  upcalls from libpmix's thread reach the helper's own asyncio loop through
  `loop.call_soon_threadsafe`.

  One helper per node label of `job.nodes` also gives multi-node jobs for free: each helper
  is the PMIx server of its node (own PMIX_HOSTNAME), the launcher is the allgather root of
  their fences (blobs concatenated in node order) and routes direct-modex requests to the
  helper hosting the rank. Several labels on one machine emulate several nodes (use
  `OMPI_MCA_btl=self,tcp`: Open MPI's vader segment names collide across emulated nodes).

Direct launch of Open MPI
  Open MPI 4.1 only uses PMIx when its schizo framework believes it was direct-launched.
  Each rank gets `FLUX_JOB_ID=<number>` (schizo/flux), not the Slurm triple
  (SLURM_NODELIST + SLURM_STEP_ID + SLURM_JOBID): fake SLURM_* variables make Open MPI
  force `--bind-to none`, and make srun, sbatch, MPICH/Hydra, Slurm-aware libraries and
  scripts believe they run inside a Slurm step of a job that does not exist, while nothing
  on a non-Flux host acts on FLUX_JOB_ID (Open MPI's own flux PMI component needs
  FLUX_PMI_LIBRARY_PATH and loses to ext3x anyway). Open MPI 5 connects through the PMIx
  env alone. Pass `direct_launch="none"` to leave it out, "slurm" for the triple.

Containers
  The helpers listen on TCP 127.0.0.1 (libpmix 4.2's default; the URI is in the rank's
  PMIX_SERVER_URI*). rankwire's containers share the host's network namespace, so ranks
  reach it from inside. With `PMIX_MCA_gds=hash` (no shared-memory dstore) the clients
  never touch the server's tmpdir, so nothing needs to be bound into the container.
  `PMIX_MCA_psec=none`: psec "native" over TCP compares the uid the client *reports*
  (getuid() inside its user namespace: 0 under --fakeroot) with the uid registered here
  (the launcher's), so it refuses fakeroot ranks without adding protection on TCP (a local
  peer could report any uid); the nspace name is random.

Events (await `wait_event()`), from `rankwire.pmi.server` / `rankwire.pmi.job`:
  Aborted(rank, code, message)   a rank called PMIx_Abort (MPI_Abort): kill the job
  Finalized(rank)                a rank called PMIx_Finalize
  FenceFailed(missing, reason, timed_out, waiting)
      * a rank exited (or was killed) without PMIx_Finalize while other ranks are connected:
        they will wait for it forever;
      * `job.fence_timeout` passed during wire-up (from the first PMIx_Init until the job's
        first fence completes; names the ranks that never called PMIx_Init, or the nodes
        whose ranks did not all join) or during a later multi-node fence (names the nodes
        that did not contribute). libpmix completes the fence of one node internally, so
        for later fences on one node only exits/finalizes are seen, not late ranks;
      * a helper process died (missing = its node's ranks).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import faulthandler
import fcntl
import gc
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Callable, NoReturn, Optional, Union

from rankwire.errors import UserError
from rankwire.fds import close_fds_except
from rankwire.pmi.job import FenceFailed, Job, format_ranks
from rankwire.pmi.pmix import wire
from rankwire.pmi.pmix.serverenv import HELPER_ENV, claim_tmpdir
from rankwire.pmi.server import Aborted, Finalized

Event = Union[Aborted, FenceFailed, Finalized]

WILDCARD = 0xFFFFFFFE
START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
ERR_TIMEOUT = -24
ERR_LOST_CONNECTION = -61


class _Node:
    """One helper process: the PMIx server of one node."""

    def __init__(self, index: int, name: str, ranks: list[int]) -> None:
        self.index = index
        self.name = name
        self.ranks = ranks
        self.proc: Optional[_Forked] = None
        self.sock: Optional[socket.socket] = None  # ours, until `start` opens the streams
        self.reader: Optional[asyncio.StreamReader] = None
        self.writer: Optional[asyncio.StreamWriter] = None
        self.task: Optional[asyncio.Task[None]] = None
        self.said_bye = False

    def send(self, msg: dict[str, Any]) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(wire.encode(msg))


class _Round:
    """One fence across the nodes it involves: node index → that helper's fence id + blob."""

    def __init__(self, nodes: frozenset[int]) -> None:
        self.nodes = nodes
        self.parts: dict[int, tuple[int, bytes]] = {}


class PmixServer:
    """Serves PMIx to the ranks of one `Job` (see the module docstring)."""

    def __init__(
        self,
        job: Job,
        mode: str = "tcp",
        *,
        node_names: Optional[Sequence[str]] = None,
        direct_launch: str = "flux",
        helper_env: Optional[Mapping[str, str]] = None,
    ) -> None:
        if mode != "tcp":
            raise ValueError(f"PMIx mode must be 'tcp' (loopback), got {mode!r}")
        if direct_launch not in ("flux", "slurm", "none"):
            raise ValueError(f"direct_launch must be flux, slurm or none: {direct_launch!r}")
        self.job = job
        self.mode = mode
        self.direct_launch = direct_launch
        self.helper_env = dict(helper_env or {})
        labels = list(dict.fromkeys(job.nodes))
        host = socket.gethostname()
        if node_names is None:
            node_names = (
                [host] if len(labels) == 1 else [f"{host}-n{i}" for i in range(len(labels))]
            )
        if len(node_names) != len(labels):
            raise ValueError(f"{len(labels)} nodes in the job, {len(node_names)} node names")
        self.nodes = [
            _Node(i, node_names[i], [r for r in range(job.size) if job.nodes[r] == label])
            for i, label in enumerate(labels)
        ]
        self.node_of = {r: n.index for n in self.nodes for r in n.ranks}
        self.nspace = f"rankwire.{secrets.token_hex(6)}"
        self.version: Optional[str] = None
        self._envs: dict[int, dict[str, str]] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._events: Optional[asyncio.Queue[Event]] = None
        self._tmpdir: Optional[str] = None
        self._tmpdir_lock = -1  # locked while we live (see `claim_tmpdir`)
        self._connected: set[int] = set()
        self._finalized: set[int] = set()
        # Called with a rank the helper says finalized (it may be exiting by then): the
        # launcher records its warm list there, as with `PmiServer.on_finalize`.
        self.on_finalize: Optional[Callable[[int], None]] = None
        self._gone: dict[int, str] = {}  # rank → how it ended without PMIx_Finalize
        self._exiting: dict[int, str] = {}  # exited, waiting for the helper's sync
        self._failed = False  # one FenceFailed per job: later ones are its consequences
        self._rounds: dict[tuple[Any, ...], list[_Round]] = {}
        self._fences_done = 0
        self._timer: Optional[asyncio.TimerHandle] = None
        self._dmodex: dict[int, tuple[int, int]] = {}  # our id → (asking node, its id)
        self._dmodex_ids = 0
        self._closing = False

    # -- the launcher's API -------------------------------------------------------------------
    def launch(self) -> None:
        """Start one helper per node and send it the job, without waiting for it: the
        helpers come up (libpmix and hwloc: ≈ 35 ms) while the caller goes on (the
        launcher starts its container meanwhile). `start` waits for them; `close` stops
        them, started or not."""
        self._tmpdir, self._tmpdir_lock = claim_tmpdir()
        for node in self.nodes:
            self._spawn_helper(node)

    async def start(self) -> None:
        """Start the helpers (unless `launch` did); returns once every rank is registered."""
        self._loop = asyncio.get_running_loop()
        self._events = asyncio.Queue()
        try:
            if self._tmpdir is None:
                self.launch()
            for node in self.nodes:
                assert node.sock is not None
                node.reader, node.writer = await asyncio.open_connection(
                    sock=node.sock, limit=wire.LINE_LIMIT
                )
                node.sock = None  # the stream's now
            await asyncio.wait_for(
                asyncio.gather(*(self._handshake(n) for n in self.nodes)), START_TIMEOUT
            )
        except asyncio.TimeoutError:
            await self.close()
            raise UserError(
                f"the PMIx helper did not start within {START_TIMEOUT:g} s; "
                "check libpmix2 (set RANKWIRE_LIBPMIX) and the helper's messages above"
            ) from None
        except BaseException:
            await self.close()
            raise
        for node in self.nodes:
            node.task = self._loop.create_task(self._read(node))

    def rank_env(self, rank: int) -> tuple[dict[str, str], tuple[int, ...]]:
        """Environment for rank `rank` (PMIX_* from libpmix + the direct-launch hint)."""
        if self._loop is None or self._closing or not self._envs:
            raise RuntimeError("PmixServer.rank_env() needs a started, open server")
        self.job.check_rank(rank)
        env = dict(self._envs[rank])
        jobnum = str(zlib.crc32(self.nspace.encode()) & 0x7FFFFFFF)
        if self.direct_launch == "flux":
            env["FLUX_JOB_ID"] = jobnum
        elif self.direct_launch == "slurm":
            env.update(SLURM_JOBID=jobnum, SLURM_STEP_ID="0", SLURM_NODELIST=self.nodes[0].name)
        return env, ()

    def spawned(self, rank: int) -> None:
        """The rank's process exists (nothing to close: PMIx needs no inherited fds)."""
        self.job.check_rank(rank)

    def rank_exited(self, rank: int, code: int) -> None:
        """The rank's process ended (`code` as in Popen.returncode: < 0 = signal).

        Its PMIx_Finalize may still be on its way from the helper (the exit can overtake
        it), so the verdict waits for a round trip through the rank's helper."""
        self.job.check_rank(rank)
        if rank in self._finalized or rank in self._gone or rank in self._exiting:
            return
        self._exiting[rank] = (
            f"exited with code {code}" if code >= 0 else f"was killed by signal {-code}"
        )
        node = self.nodes[self.node_of[rank]]
        if node.task is not None and not node.task.done():
            node.send({"op": "sync", "rank": rank})
        else:
            self._synced(rank)

    def _synced(self, rank: int) -> None:
        reason = self._exiting.pop(rank, None)
        if reason is None or rank in self._finalized:
            return
        self._gone[rank] = reason
        self._check_blocked()

    @property
    def connected_ranks(self) -> frozenset[int]:
        """The ranks that called PMIx_Init (see `PmiServer.connected_ranks`)."""
        return frozenset(self._connected)

    async def wait_event(self) -> Event:
        if self._events is None:
            raise RuntimeError("PmixServer.wait_event() before start()")
        return await self._events.get()

    async def close(self) -> None:
        """Stop every helper (PMIx_server_finalize), reap it, remove the tmpdir."""
        self._closing = True
        self._cancel_timer()
        for node in self.nodes:
            node.send({"op": "shutdown"})
        for node in self.nodes:
            await self._reap(node)
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            os.close(self._tmpdir_lock)
            self._tmpdir = None

    # -- helpers ------------------------------------------------------------------------------
    def _helper_environ(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PMIX_")}
        env.update(HELPER_ENV)
        env.update(self.helper_env)
        return env

    def _spawn_helper(self, node: _Node) -> None:
        """Start the node's helper and send it `init` (the socket buffer takes it whole
        before the helper reads, up to tens of thousands of ranks; past that, or if the
        helper hangs before it reads, the send gives up after START_TIMEOUT and `start`
        says the helper did not start)."""
        assert self._tmpdir is not None
        tmpdir = os.path.join(self._tmpdir, f"node{node.index}")
        os.mkdir(tmpdir, 0o700)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = self._helper_environ()
        for stream in (sys.stdout, sys.stderr):  # what is buffered is the launcher's
            with contextlib.suppress(Exception):
                stream.flush()  # (None when started without it)
        try:
            pid = os.fork()
        except OSError as err:
            ours.close()
            theirs.close()
            raise UserError(f"cannot start the PMIx helper: {err.strerror}") from err
        if pid == 0:
            _run_helper(theirs.fileno(), ours.fileno(), env)
        theirs.close()
        node.proc = _Forked(pid)
        node.sock = ours
        ours.settimeout(START_TIMEOUT)
        with contextlib.suppress(OSError):  # gone already: `start` says how it exited
            ours.sendall(
                wire.encode(
                    {
                        "op": "init",
                        "nspace": self.nspace,
                        "jobid": self.job.jobid,
                        "appnum": self.job.appnum,
                        "size": self.job.size,
                        "hostname": node.name,
                        "local_ranks": node.ranks,
                        "node_ranks": [n.ranks for n in self.nodes],
                        "node_names": [n.name for n in self.nodes],
                        "tmpdir": tmpdir,
                        "uid": os.getuid(),
                        "gid": os.getgid(),
                    }
                )
            )

    async def _handshake(self, node: _Node) -> None:
        assert node.reader is not None
        try:
            line = await node.reader.readline()
        except OSError:  # ECONNRESET: it ended with our `init` unread
            line = b""
        if not line:
            code = None
            if node.proc is not None and await _wait_exit(node.proc, STOP_TIMEOUT):
                code = node.proc.returncode
            raise UserError(f"the PMIx helper for node {node.name} exited at start (code {code})")
        msg = wire.decode(line)
        if msg["op"] == "error":
            raise UserError(f"PMIx server start failed on {node.name}: {msg['message']}")
        if msg["op"] != "ready":
            raise UserError(f"the PMIx helper for {node.name} answered {msg['op']!r} at start")
        self.version = msg["version"]
        for rank, env in msg["envs"].items():
            self._envs[int(rank)] = env

    async def _reap(self, node: _Node) -> None:
        if node.task is not None and node.task is not asyncio.current_task():
            try:
                await asyncio.wait_for(asyncio.shield(node.task), STOP_TIMEOUT)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                node.task.cancel()
        if node.sock is not None:  # launched, never started: this EOF is its shutdown
            node.sock.close()
            node.sock = None
        proc = node.proc
        if proc is not None:
            if not await _wait_exit(proc, STOP_TIMEOUT):
                proc.kill()
                await _wait_exit(proc, STOP_TIMEOUT)
            node.proc = None
        if node.writer is not None:
            node.writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await node.writer.wait_closed()

    async def _read(self, node: _Node) -> None:
        assert node.reader is not None
        while True:
            try:
                line = await node.reader.readline()
            except (OSError, ValueError):
                line = b""
            if not line:
                break
            msg = wire.decode(line)
            if msg["op"] == "bye":
                node.said_bye = True
                continue
            self._dispatch(node, msg)
        if not self._closing and not node.said_bye:
            self._emit(
                FenceFailed(
                    tuple(node.ranks),
                    f"the PMIx server of node {node.name} died; its "
                    f"{format_ranks(node.ranks)} lost PMIx",
                    False,
                    (),
                )
            )

    # -- helper messages -----------------------------------------------------------------------
    def _dispatch(self, node: _Node, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op == "connected":
            self._connected.add(int(msg["rank"]))
            if self.job.fence_timeout is not None and self._fences_done == 0 and not self._timer:
                self._start_timer()
            self._check_blocked()
        elif op == "finalized":
            rank = int(msg["rank"])
            self._finalized.add(rank)
            if self.on_finalize is not None:  # the rank may be exiting already
                self.on_finalize(rank)
            self._emit(Finalized(rank))
        elif op == "synced":
            self._synced(int(msg["rank"]))
        elif op == "abort":
            self._emit(Aborted(int(msg["rank"]), int(msg["code"]), str(msg.get("message", ""))))
        elif op == "fence":
            self._fence_part(node, msg)
        elif op == "dmodex":
            self._dmodex_ask(node, msg)
        elif op == "dmodex_data":
            asker, their_id = self._dmodex.pop(int(msg["id"]), (None, 0))
            if asker is not None:
                self.nodes[asker].send(
                    {
                        "op": "dmodex_done",
                        "id": their_id,
                        "status": msg["status"],
                        "data": msg["data"],
                    }
                )

    def _dmodex_ask(self, node: _Node, msg: dict[str, Any]) -> None:
        rank = int(msg["rank"])
        target = self.node_of.get(rank)
        if target is None or target == node.index:  # not ours, or local (libpmix's job)
            node.send({"op": "dmodex_done", "id": msg["id"], "status": -46, "data": ""})
            return
        self._dmodex_ids += 1
        self._dmodex[self._dmodex_ids] = (node.index, int(msg["id"]))
        self.nodes[target].send({"op": "dmodex_req", "id": self._dmodex_ids, "rank": rank})

    def _fence_part(self, node: _Node, msg: dict[str, Any]) -> None:
        procs = tuple(sorted((str(ns), int(r)) for ns, r in msg["procs"]))
        if any(r == WILDCARD for _, r in procs):
            involved = frozenset(n.index for n in self.nodes)
        else:
            involved = frozenset(self.node_of[r] for _, r in procs if r in self.node_of)
        involved = involved | {node.index}
        rounds = self._rounds.setdefault(procs, [])
        rnd = next((x for x in rounds if node.index not in x.parts), None)
        if rnd is None:
            rnd = _Round(involved)
            rounds.append(rnd)
        rnd.parts[node.index] = (int(msg["id"]), wire.unpack(msg["data"]))
        if set(rnd.parts) >= rnd.nodes:
            rounds.remove(rnd)
            if not rounds:
                del self._rounds[procs]
            blob = wire.pack(b"".join(rnd.parts[i][1] for i in sorted(rnd.parts)))
            for i, (ident, _) in rnd.parts.items():
                self.nodes[i].send({"op": "fence_done", "id": ident, "status": 0, "data": blob})
            self._fences_done += 1
            self._cancel_timer()
            if self._rounds and self.job.fence_timeout is not None:
                self._start_timer()
        elif len(rnd.parts) == 1 and self.job.fence_timeout is not None and not self._timer:
            self._start_timer()

    # -- failures -------------------------------------------------------------------------------
    def _check_blocked(self) -> None:
        """A rank gone without finalize blocks every connected rank's next fence."""
        if self._failed or not self._gone:
            return
        alive = self._connected - self._finalized - set(self._gone)
        if not alive:
            return
        by_reason: dict[str, list[int]] = {}
        for r, text in self._gone.items():
            by_reason.setdefault(text, []).append(r)
        reason = "fence cannot complete: " + "; ".join(
            f"{format_ranks(rs)} {text} without PMIx finalize" for text, rs in by_reason.items()
        )
        self._fail(sorted(self._gone), reason, timed_out=False)

    def _start_timer(self) -> None:
        assert self._loop is not None and self.job.fence_timeout is not None
        self._cancel_timer()
        self._timer = self._loop.call_later(self.job.fence_timeout, self._expired)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self._failed:
            return
        timeout = f"fence timed out after {self.job.fence_timeout:g} s"
        never = [r for r in range(self.job.size) if r not in self._connected]
        if self._fences_done == 0 and never:
            self._fail(never, f"{timeout}: no PMIx_Init from {format_ranks(never)}", True)
            return
        waiting_nodes: set[int] = set()
        involved: set[int] = set()
        for rounds in self._rounds.values():
            for rnd in rounds:
                waiting_nodes |= set(rnd.parts)
                involved |= rnd.nodes
        late = [n for n in self.nodes if (n.index in involved or not involved)]
        late = [n for n in late if n.index not in waiting_nodes]
        if not late:
            return
        missing = sorted(r for n in late for r in n.ranks)
        where = ", ".join(n.name for n in late)
        self._fail(
            missing, f"{timeout}: {format_ranks(missing)} (on {where}) did not all join", True
        )

    def _fail(self, missing: Sequence[int], reason: str, timed_out: bool) -> None:
        """Answer every open fence with an error and report. `waiting`: the ranks of nodes
        whose fence reached us, or else every connected rank still running."""
        self._failed = True
        waiting: list[int] = []
        for rounds in self._rounds.values():
            for rnd in rounds:
                for i, (ident, _) in rnd.parts.items():
                    waiting.extend(self.nodes[i].ranks)
                    status = ERR_TIMEOUT if timed_out else ERR_LOST_CONNECTION
                    self.nodes[i].send(
                        {"op": "fence_done", "id": ident, "status": status, "data": ""}
                    )
        self._rounds.clear()
        self._cancel_timer()
        if not waiting:
            waiting = sorted(self._connected - self._finalized - set(self._gone) - set(missing))
        self._emit(FenceFailed(tuple(missing), reason, timed_out, tuple(sorted(waiting))))

    def _emit(self, event: Event) -> None:
        if self._events is not None and not self._closing:
            self._events.put_nowait(event)


class _Forked:
    """A helper forked from the launcher: what `_wait_exit` and `_reap` use of a Popen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            try:
                done, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else: ended, how unknown
                done, status = self.pid, 0  # (as subprocess.Popen.poll says it)
            if done:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            os.kill(self.pid, signal.SIGKILL)


def _run_helper(fd: int, launchers: int, env: dict[str, str]) -> NoReturn:
    """In the forked child: become the node's helper on `fd` (`launchers`: the launcher's
    end of the pair); see the module docstring."""
    code = 1
    try:
        # What the launcher holds stays as it is: a descriptor closed below whose Python
        # object a garbage collection freed later would close the number again, maybe
        # reused by libpmix by then.
        gc.freeze()
        for sig in signal.valid_signals():  # the launcher's Python handlers are not ours
            with contextlib.suppress(OSError, ValueError):
                if callable(signal.getsignal(sig)):
                    signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # as the helper does: the launcher's ^C
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.set_wakeup_fd(-1)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        if faulthandler.is_enabled():  # it writes to a descriptor closed below
            faulthandler.disable()
        # the launcher's log handlers (none in `rankwire`; a test runner's) are not ours:
        # dropped, not closed (they are the launcher's to flush), so that `helper.main`
        # sets its own
        logging.root.handlers.clear()
        os.environ.clear()
        os.environ.update(env)
        # Our socket above 2, then /dev/null for stdin and for any of 0-2 that was one of
        # the pair (a launcher started without stdout, say), then only 0-2 and it.
        given = fd
        if fd < 3:
            fd = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
        null = os.open(os.devnull, os.O_RDWR)
        for std in (0, 1, 2):
            if std == 0 or std in (launchers, given):
                os.dup2(null, std)
        close_fds_except((fd,))
        from rankwire.pmi.pmix import helper
        from rankwire.runtime import syscalls

        with contextlib.suppress(OSError):
            syscalls.set_comm("rankwire-pmix")

        code = helper.main(fd)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
            ctypes.CDLL(None).fflush(None)  # libpmix's and hwloc's stdio too
        os._exit(code)


async def _wait_exit(proc: _Forked, timeout: float) -> bool:
    """Wait for a child without threads (pidfd); False on timeout."""
    if proc.poll() is not None:
        return True
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(proc.pid)
    except OSError:  # already reaped, or no pidfd: poll
        for _ in range(int(timeout / 0.05)):
            if proc.poll() is not None:
                return True
            await asyncio.sleep(0.05)
        return proc.poll() is not None
    done: asyncio.Future[None] = loop.create_future()

    def exited() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(fd, exited)
    try:
        await asyncio.wait_for(done, timeout)
    except asyncio.TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return proc.poll() is not None  # it exited: reaped now
