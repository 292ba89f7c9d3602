"""The PMI bridge process's side (see `pmi/bridge.py` for the design): PMIx_Init as the
task's rank, the job's info, and `Session`, the blocking loop that serves the task's one
PMI-1/PMI-2 connection through the sans-I/O `ServerCodec`; `serve_node`, the node's bridge
server that forks them. Imported only in those processes (after `bridge.spawn`'s fork, in
the node server `bridge.task_pmi_env` forks, or by `rankwire spank-helper pmi-bridge`, the
SPANK shim's way)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional

from rankwire.errors import UserError
from rankwire.pmi import messages as m
from rankwire.pmi.bridge import (
    _NO_PMIX,
    ABORT_GRACE,
    MAPPING_ATTR,
    NODE_WAIT,
    EpochKvs,
    JobInfo,
    _quiet,
    _say,
    epoch_key,
    fork_detached,
    jobid_for,
    node_socket,
    node_tasks,
    nodes_from_peers,
)
from rankwire.pmi.bridgeplan import step_offer
from rankwire.pmi.codec import ServerCodec
from rankwire.pmi.errors import LocalProtocolError, RemoteProtocolError
from rankwire.pmi.job import RESERVED_PREFIX

if TYPE_CHECKING:
    from rankwire.pmi.pmix.abi import Proc
    from rankwire.pmi.pmix.client_lib import Client
    from rankwire.pmi.pmix.values import InfoLike


def _connect(environ: Mapping[str, str]) -> tuple[Client, JobInfo]:
    """PMIx_Init as the task's rank and the job's info (UserError: no PMIx server)."""
    from rankwire.pmi.pmix.abi import PmixError
    from rankwire.pmi.pmix.client_lib import Client

    client = Client()
    try:
        me = client.init()
    except PmixError as err:
        raise UserError(
            f"the PMI bridge cannot connect to the step's PMIx server ({err}): "
            "run it under `srun --mpi=pmix` as the task's user, outside any container"
        ) from err
    try:
        return client, _job_info(client, me.nspace, me.rank, environ)
    except PmixError as err:
        raise UserError(
            f"the step's PMIx server did not describe the job ({err}): the bridge needs "
            "pmix.job.size; check the site's Slurm mpi/pmix plugin"
        ) from err


def run(sock: socket.socket, wpipe: int, environ: Mapping[str, str]) -> int:
    """The forked bridge: connect, tell the parent on `wpipe`, serve."""
    try:
        client, info = _connect(environ)
    except UserError as err:
        os.write(wpipe, json.dumps({"error": str(err)}).encode())
        os.close(wpipe)
        return 1
    os.write(wpipe, info.to_json().encode())
    os.close(wpipe)
    return Session(sock, client, info).serve()


def serve_fd(fd: int, environ: Mapping[str, str]) -> int:
    """Be the bridge in this process, on the already connected socket `fd` whose other
    end the task has as PMI_FD (what the SPANK shim starts, detached: the task's end
    closing ends it, and the step's end kills it). Returns the exit code; UserError when
    `fd` is no socket or there is no PMIx server."""
    sock = _socket_of(fd)
    if step_offer(environ) != "pmix":
        raise UserError(_NO_PMIX)
    _quiet({fd})
    client, info = _connect(environ)
    return Session(sock, client, info).serve()


def _socket_of(fd: int) -> socket.socket:
    """The bridge's end of a task's PMI_FD socketpair; UserError for anything else."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as err:
        raise UserError(
            f"fd {fd}: not an open socket ({err.strerror}); pass the bridge's end "
            "of the task's PMI_FD socketpair"
        ) from err
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise UserError(f"fd {fd}: not a Unix stream socket; pass a socketpair end")
    return sock


def serve_node(
    fd: int,
    environ: Mapping[str, str],
    base: str,
    listener: Optional[socket.socket] = None,
    life: int = -1,
) -> int:
    """The node's bridge server, in the node's first task: started by its SPANK shim
    (`rankwire spank-helper pmi-bridge DIR`) or forked by its `rankwire exec`
    (`bridge.task_pmi_env`). Every task of the node gets a bridge forked from this
    process, whose imports and libpmix are loaded once (per task they cost the node's cores
    more than the bridges' work). This task's bridge serves `fd`; the node's other tasks
    connect to `node_socket` in `base` (their shims in C, or `bridge._hand_over`), each
    handing over its end of its PMI_FD
    socketpair and its stderr, then its environment as framed `env=K=V` records (and
    `cpus=` its CPU set, which its bridge takes: it would otherwise run on this task's)
    ending with `end=1`. Same user only (SO_PEERCRED). A task whose hand-over fails hears
    why on its own stderr, as does each task still waiting when this server ends. Returns
    once every task of the node (SLURM_GTIDS) has its bridge, or after NODE_WAIT; SIGTERM
    (the step's end) ends it too, as does the end of `life` (a pidfd: `rankwire exec`'s
    slurmstepd, which an aborted step's end does not always signal us)."""
    path = node_socket(environ, base) if node_tasks(environ) > 1 else None
    why = "the node's PMI bridge server ended"
    try:  # a signal from here on: the socket goes too
        _socket_of(fd).detach()  # checked before anything forks
        if step_offer(environ) != "pmix":
            raise UserError(_NO_PMIX)
        _on_signals_exit()
        _load_libpmix()
        if listener is None and path:
            # a signal while the socket takes its name, before `listener` has it, would
            # leave the name behind: held until then (the `finally` below removes it)
            signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
            try:
                listener = _listen(path)
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)
        try:
            _fork_bridge(fd, 2, dict(environ))
        except OSError as err:
            why = f"the node's PMI bridge server failed ({err.strerror})"
            _say(f"cannot fork this task's PMI bridge ({err.strerror}); retry the step")
            return 1
        os.close(fd)
        if listener is None:
            return 0
        # `_serve_tasks` closes it: a signal before it holds it would leave the name behind
        signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
        serving, listener = listener, None
        return _serve_tasks(serving, str(path), node_tasks(environ) - 1, NODE_WAIT, life)
    finally:
        if listener is not None:
            _close(listener, str(path), why)


def serve_started(listener: socket.socket, path: str, life: int, tasks: int) -> int:
    """The node's bridge server started before its tasks (`bridge.start_node_server`,
    the SPANK plugin's start phase): each of the node's `tasks` joins it, as the other
    tasks join `serve_node`'s; its messages go to the first one's stderr. Returns once
    each has its bridge; when they do not come within NODE_WAIT of the first, or
    slurmstepd (`life`, a pidfd) ends first, or at SIGTERM, after saying so."""
    try:
        _on_signals_exit()
        _load_libpmix()
        signal.pthread_sigmask(signal.SIG_BLOCK, HELD)  # until `_serve_tasks` holds it
    except BaseException:  # SIGTERM meanwhile: the socket goes too
        _close(listener, path, "the node's PMI bridge server ended")
        raise
    return _serve_tasks(listener, path, tasks, None, life)


# The longest a signal that ends a node's server waits to be seen (`_serve_tasks`)
SIGNAL_SEEN_S = 0.5
# The signals that end a node's server (`_on_signals_exit`), held while its socket changes
# hands.
HELD = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def _on_signals_exit() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # the `finally`s run
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)


def _load_libpmix() -> None:
    """libpmix and its dependencies loaded and declared once, in the server, not in each
    bridge (measured: a bridge's PMIx_Init and job info then take 4 ms of CPU instead of
    14); without libpmix, each bridge says so to its task."""
    from rankwire.pmi.pmix.abi import lib
    from rankwire.pmi.pmix.client_lib import Client  # noqa: F401

    with contextlib.suppress(UserError):
        lib()


def _serve_tasks(
    listener: socket.socket, path: str, others: int, wait: Optional[float], life: int = -1
) -> int:
    """Fork the bridge of each of `others` tasks as it joins at `listener` (`path`), within
    `wait` seconds (None: NODE_WAIT from the first that comes; before it, as long as
    slurmstepd, `life`, lives); a server started before its tasks takes the first one's
    stderr. 0 once all came; 1, said, if not. Called with `HELD` blocked: a signal
    delivered from here on ends it through the `finally` that removes the socket. Its
    handler runs between bytecodes, so one that comes after the last of them and before
    `select` sleeps is seen only when the select returns: each sleeps `SIGNAL_SEEN_S` at
    most (without, such a SIGTERM waited out the tasks' minute, or slurmstepd's life)."""
    import select
    import time

    why = "the node's PMI bridge server ended"
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)
        served = wait is None
        deadline = time.monotonic() + wait if wait is not None else None
        while others > 0:
            left = deadline - time.monotonic() if deadline is not None else None
            watched = [listener.fileno(), *([life] if life >= 0 else [])]
            nap = SIGNAL_SEEN_S if left is None else min(left, SIGNAL_SEEN_S)
            ready = select.select(watched, [], [], nap)[0] if nap > 0 else []
            if life >= 0 and life in ready:
                why = "slurmstepd ended first"
                return 1
            if not ready and (left is None or left > SIGNAL_SEEN_S):
                continue  # not yet the deadline
            if not ready:
                why = f"the node's PMI bridge server waited {NODE_WAIT:.0f} s for it"
                _say(
                    f"{others} task(s) of this node did not reach its PMI bridge server "
                    f"within {NODE_WAIT:.0f} s; see those tasks' messages (srun -l)"
                )
                return 1
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                took = _take_task(conn, deadline or time.monotonic() + NODE_WAIT, served)
            if took < 0:
                why = "a task of this node ended the step"
                return 1
            if took and deadline is None:
                deadline = time.monotonic() + NODE_WAIT
                served = False  # the first one's stderr is ours now
            others -= took
        return 0
    finally:
        _close(listener, path, why)


def _close(listener: socket.socket, path: str, why: str) -> None:
    """No task joins any more: the socket goes; each already queued hears `why`."""
    with contextlib.suppress(OSError):
        os.unlink(path)
    _refuse_waiting(listener, why)
    listener.close()


def _listen(path: str) -> Optional[socket.socket]:
    """The node's socket (over a dead server's); None, said, if it cannot be."""
    from rankwire.runtime.instance import listen_at

    try:
        return listen_at(path)
    except OSError as err:  # this task still gets its bridge; the others say why not
        _say(f"cannot serve the node's PMI bridges at {path} ({err.strerror})")
        return None


def _refuse_waiting(listener: socket.socket, why: str) -> None:
    """Each task already queued on the listener (whose hand-over is sent, its PMI client
    about to wait) hears `why` on its stderr instead of seeing its PMI_FD close."""
    import time

    listener.setblocking(False)
    until = time.monotonic() + 2.0  # all of them: a stalling client holds nobody long
    while time.monotonic() < until:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(max(min(0.5, until - time.monotonic()), 0.01))
            fds: list[int] = []
            with contextlib.suppress(OSError):
                _, fds, _, _ = socket.recv_fds(conn, 1 << 16, 2)
            if len(fds) == 2:
                _tell_no_bridge(fds[1], why)
            for got in fds:
                os.close(got)


def _take_task(conn: socket.socket, deadline: float, adopt: bool = False) -> int:
    """One task's hand-over, within 5 s and `deadline`: 1 when the task is dealt with (its
    bridge forked, or, when it gave its stderr but no bridge could be, told why), else 0;
    -1 for a task that ends the step (`bridge.abort_step`: `abort=1`, no descriptor).
    `adopt`: its stderr becomes ours too."""
    import time

    from rankwire.runtime import frame
    from rankwire.runtime.peercred import peer_creds

    pid, uid, _ = peer_creds(conn)
    if uid != os.getuid():
        _say(f"PMI bridge server: refused a connection from uid {uid} (pid {pid})")
        return 0
    until = min(deadline, time.monotonic() + 5.0)
    fds: list[int] = []
    try:
        try:
            conn.settimeout(max(until - time.monotonic(), 0.01))
            data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 2)
            while data and not data.endswith(b"\0end=1\0") and len(data) <= frame.MAX_FRAME:
                conn.settimeout(max(until - time.monotonic(), 0.01))
                more = conn.recv(1 << 16)
                if not more:
                    break
                data += more
            records = frame.decode(data)
            why = "its hand-over was cut short"
        except (OSError, frame.FrameError) as err:
            records, why = [], f"its hand-over failed ({err})"
        if len(fds) == 2 and adopt:
            os.dup2(fds[1], 2)
        if len(fds) == 2 and records[-1:] == [("end", "1")]:
            env = frame.pairs(frame.every(records, "env"))
            cpus = {
                int(c)
                for v in frame.every(records, "cpus")
                for c in v.split(",")
                if c.isascii() and c.isdigit()
            }
            try:
                _fork_bridge(fds[0], fds[1], env, frozenset(cpus))
                return 1
            except OSError as err:
                why = f"cannot fork its PMI bridge ({err.strerror}); retry the step"
        if not fds and records == [("abort", "1"), ("end", "1")]:
            return -1
        if len(fds) != 2:
            return 0
        _tell_no_bridge(fds[1], why)
        return 1
    finally:
        for got in fds:
            os.close(got)


def _tell_no_bridge(err: int, why: str) -> None:
    """One line on a task's stderr `err`: its PMI_FD will see EOF, and MPICH's own message
    says little."""
    with contextlib.suppress(OSError):
        os.write(err, f"rankwire: this task has no PMI bridge: {why}\n".encode())


def _fork_bridge(
    fd: int, err: int, environ: dict[str, str], cpus: frozenset[int] = frozenset()
) -> None:
    """A detached bridge serving `fd` as the task whose environment `environ` is, on its
    CPUs `cpus` (none given: ours), its messages on `err`. OSError when it could not be
    forked."""

    def bridge() -> int:  # pragma: no cover - the bridge, exercised under srun
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # not the server's
            signal.signal(sig, signal.SIG_DFL)
        if err != 2:
            os.dup2(err, 2)
        return _bridge(fd, environ, cpus)

    fork_detached(bridge)


def _bridge(fd: int, environ: dict[str, str], cpus: frozenset[int]) -> int:  # pragma: no cover
    """The forked bridge of one task: on its CPUs, with its environment."""
    if cpus:
        with contextlib.suppress(OSError, ValueError):
            os.sched_setaffinity(0, cpus)
    os.environ.clear()
    os.environ.update(environ)  # libpmix reads the task's PMIX_* from it
    try:
        return serve_fd(fd, environ)
    except UserError as failure:
        _say(str(failure))
        return failure.exit_code


def _optional(client: Client, key: str, proc: Proc, info: Optional[InfoLike] = None) -> Any:
    from rankwire.pmi.pmix.abi import PmixError

    try:
        return client.get(key, proc, info)
    except PmixError:
        return None


def _job_info(client: Client, nspace: str, rank: int, environ: Mapping[str, str]) -> JobInfo:
    from rankwire.pmi.pmix.abi import RANK_WILDCARD, Proc

    job = Proc(nspace, RANK_WILDCARD)
    me = Proc(nspace, rank)
    size = int(client.get("pmix.job.size", job))
    universe = _optional(client, "pmix.univ.size", job)
    appnum = _optional(client, "pmix.appnum", me)
    spawned = _optional(client, "pmix.spawned", job)
    return JobInfo(
        nspace=nspace,
        rank=rank,
        size=size,
        jobid=jobid_for(environ, nspace),
        appnum=int(appnum) if isinstance(appnum, int) else 0,
        universe_size=int(universe) if isinstance(universe, int) else size,
        spawned=spawned is True,
        nodes=_locality(client, nspace, size),
    )


def _locality(client: Client, nspace: str, size: int) -> Optional[tuple[int, ...]]:
    """rank → node from PMIx: one node → all on it; else each node's local peers (a get
    per node), else each rank's node id (a get per rank); None when neither is whole."""
    from rankwire.pmi.pmix.abi import RANK_WILDCARD, Proc

    job = Proc(nspace, RANK_WILDCARD)
    nlist = _optional(client, "pmix.nlist", job)
    hosts = [h for h in nlist.split(",") if h] if isinstance(nlist, str) else []
    if len(hosts) == 1:
        return (0,) * size
    if hosts:
        peers = [_optional(client, "pmix.lpeers", job, [("pmix.hname", h)]) for h in hosts]
        if all(isinstance(p, str) for p in peers):
            nodes = nodes_from_peers(size, peers)
            if nodes is not None:
                return tuple(nodes)
    ids = [_optional(client, "pmix.nodeid", Proc(nspace, r)) for r in range(size)]
    if all(isinstance(i, int) for i in ids):
        return tuple(ids)
    return None


class Session:
    """Serves one PMI connection through the PMIx client `client` (blocking)."""

    def __init__(self, sock: socket.socket, client: Client, info: JobInfo) -> None:
        self.sock = sock
        self.client = client
        self.info = info
        self.codec = ServerCodec()
        self.kvs = EpochKvs(info.rank, info.nodes)
        self.spoke = False  # the task sent at least one request
        self.done: Optional[int] = None  # exit code once finalized or aborted

    def serve(self) -> int:
        sock = self.sock
        while self.done is None:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                return self._eof()
            self.codec.receive_data(data)
            while self.done is None:
                try:
                    req = self.codec.next_event()
                except RemoteProtocolError as err:
                    self._reply_error(f"PMI bridge: {err}")
                    if err.fatal:
                        return 1
                    continue
                if req is None:
                    break
                self.spoke = True
                self._dispatch(req)
        return self.done

    def _eof(self) -> int:
        if not self.spoke:  # the task never used PMI: nothing to tell anybody
            with contextlib.suppress(Exception):
                self.client.finalize()
            return 0
        _say(
            f"PMI bridge: rank {self.info.rank} closed its PMI connection without "
            "finalize (it exited or crashed)"
        )
        return 1

    def _send(self, reply: m.Reply) -> None:
        try:
            data = self.codec.send(reply)
        except LocalProtocolError as err:  # e.g. a value too long for a PMI-1 line
            data = self.codec.send(m.ErrorReply(str(err)))
        with contextlib.suppress(OSError):  # the task is gone: the next recv sees EOF
            self.sock.sendall(data)

    def _reply_error(self, message: str) -> None:
        self._send(m.ErrorReply(message))

    def _dispatch(self, req: m.Request) -> None:
        from rankwire.pmi.pmix.abi import PmixError

        info = self.info
        if isinstance(req, m.Init):
            if req.version not in (1, 2):
                self._reply_error(f"PMI version {req.version} is not served (1 or 2)")
            else:
                self._send(m.InitReply(req.version, 1 if req.version == 1 else 0))
        elif isinstance(req, m.InitAck):
            self._reply_error("initack is only for PMI_PORT connections; this is PMI_FD")
        elif isinstance(req, m.FullInit):
            self._send(m.FullInitReply(info.rank, info.size, info.appnum))
        elif isinstance(req, m.GetMaxes):
            self._send(m.MaxesReply())
        elif isinstance(req, m.GetAppnum):
            self._send(m.AppnumReply(info.appnum))
        elif isinstance(req, m.GetKvsName):
            self._send(m.KvsNameReply(info.jobid))
        elif isinstance(req, m.GetUniverseSize):
            self._send(m.UniverseSizeReply(info.universe_size or info.size))
        elif isinstance(req, m.Put):
            if req.key.startswith(RESERVED_PREFIX):
                self._reply_error(f"key {req.key!r} is reserved (prefix {RESERVED_PREFIX!r})")
            else:
                self.kvs.put(req.key, req.value)
                self._send(m.PutReply())
        elif isinstance(req, m.PutNodeAttr):
            self.kvs.put_node(req.key, req.value)
            self._send(m.PutReply())
        elif isinstance(req, (m.Get, m.GetNodeAttr)):
            try:
                self._fetch()
            except (PmixError, ValueError) as err:
                self._reply_error(f"PMI bridge: fetching the KVS through PMIx failed: {err}")
                return
            if isinstance(req, m.GetNodeAttr):
                self._send(m.GetReply(self.kvs.node_attr(req.key)))
            elif req.key == MAPPING_ATTR:
                self._send(m.GetReply(info.mapping))
            else:
                self._send(m.GetReply(self.kvs.get(req.key)))
        elif isinstance(req, m.GetJobAttr):
            self._send(m.GetReply(info.attr(req.key)))
        elif isinstance(req, m.Fence):
            self._fence()
        elif isinstance(req, m.Finalize):
            self._send(m.FinalizeReply())
            with contextlib.suppress(PmixError):
                self.client.finalize()
            self.done = 0
        elif isinstance(req, m.Abort):
            self._abort(req.code, req.message)
        elif isinstance(req, m.Unsupported):
            self._reply_error(f"{req.cmd} is not supported by rankwire's PMI bridge")

    def _fence(self) -> None:
        from rankwire.pmi.pmix.abi import PmixError

        epoch, blob = self.kvs.enter_fence()
        try:
            if blob is not None:
                self.client.put(epoch_key(epoch), blob)
                self.client.commit()
            self.client.fence(collect=True)
        except PmixError as err:
            self.kvs.fence_failed()
            self._reply_error(f"PMI bridge: the PMIx fence failed: {err}")
            return
        self.kvs.fence_done()
        self._send(m.FenceReply())

    def _fetch(self) -> None:
        """The other ranks' blobs of every fenced epoch not merged yet."""
        from rankwire.pmi.pmix.abi import ERR_NOT_FOUND, PmixError, Proc

        for epoch in self.kvs.pending():
            blobs: dict[int, str] = {}
            for rank in range(self.info.size):
                if rank == self.info.rank:
                    continue
                try:
                    value = self.client.get(
                        epoch_key(epoch),
                        Proc(self.info.nspace, rank),
                        [("pmix.optional", True)],  # collected or absent: never wait
                    )
                except PmixError as err:
                    if err.status == ERR_NOT_FOUND:
                        continue  # that rank put nothing in this epoch
                    raise
                if isinstance(value, str):
                    blobs[rank] = value
            self.kvs.merge(epoch, blobs)

    def _abort(self, code: int, message: str) -> None:
        """PMIx_Abort, then no reply (as Slurm's mpi/pmi2): the step's end kills the task
        while it waits for one; the bridge waits for that (bounded) and goes."""
        from rankwire.pmi.pmix.abi import PmixError

        text = message or f"PMI abort with code {code}"
        self.done = code if 0 < code < 256 else 1
        try:
            self.client.abort(code, text)
        except PmixError as err:
            _say(f"PMI bridge: PMIx_Abort failed ({err}); rank {self.info.rank} aborts alone")
            return
        self.sock.settimeout(ABORT_GRACE)
        with contextlib.suppress(OSError):
            while self.sock.recv(65536):
                pass
