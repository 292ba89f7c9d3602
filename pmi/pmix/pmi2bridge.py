"""The PMI-2 → PMIx bridge: a task whose MPI speaks only PMIx, in a step that serves PMI-2.

Under `srun --mpi=pmi2` every task has Slurm's `PMI_FD` / `PMI_JOBID` / `PMI_RANK` /
`PMI_SIZE`; Open MPI 4.1/5 speaks only PMIx and fails in `MPI_Init` ("OMPI was not built
with SLURM's PMI support"). The bridge gives each node of the step one PMIx server,
registered with the whole job as Slurm placed it, whose fences cross nodes through the
node's Slurm PMI-2 connections.

Shape (per task; the executor calls `spawn`, or `python -m rankwire.pmi.pmix.pmi2bridge
-- CMD ARGS…` does it all)::

    bridge = spawn(os.environ)                  # UserError if no PMI-2 step, nothing left
    env = bridge.task_env(os.environ)           # PMIx env in, Slurm's PMI_* out
    ... start the task with env (bridge.pass_fds is always ()) and wait for it ...
    bridge.finish(code)                         # the node's server goes with its last task

Who serves: the node's first task (`SLURM_LOCALID=0`) *leads*: `spawn` forks the *bridge
process*, which takes over that task's PMI-2 socket, reads Slurm's `PMI_process_mapping`
(which ranks share this node), listens on a Unix socket in the user's private runtime dir
named after the step, the node and its slurmstepd (`socket_path`; removed once the node's
tasks are in), and waits for the node's other tasks. Each of those *follows*: `spawn`
connects (retrying until the leader listens), checks that the peer is the same user
(`SO_PEERCRED`), hands over its PMI-2 socket with its rank (`SCM_RIGHTS`) and waits for its
PMIx environment; no process, no libpmix. The connection stays open: its EOF (or the exit
code written on it) is that task's end, as the control pipe is the leader's own task's. The
bridge process hosts libpmix's server for the node's ranks with `helper.Helper` /
`helper.start_server` (the helper's code, in-process). The property `PmixServer` keeps
holds: the process that forks a task never loads libpmix and never gains a thread; the
bridge process, which has libpmix's progress thread, never forks. Its main thread is one
asyncio loop over the PMI-2 sockets, the control pipe and the followers' connections;
libpmix's upcalls reach it through `loop.call_soon_threadsafe`, as in the helper. It ends
when every task of the node ended, so the leader's `finish` waits for the node's last task.

Under the SPANK plugin the node's server starts earlier: the start phase (the job user,
which knows from the plan that the image needs the bridge) forks it with
`start_node_server` while it starts the container, listening at once, so that its imports
and `PMIx_server_init` overlap the container's start and slurmstepd's; then *every* task of
the node follows, the first included (the shim's `join_pmi2_bridge`, which also hands
over the task's stderr: the server's messages go to the first one's). It learns the
step's rank, size and layout from the first task that comes, ends with the node's last
task as the leader's does, and with slurmstepd (a pidfd) or at SIGTERM if no task ever
comes. A step that joins a named container without the helper (its ticket) has no start
phase: its first task leads as above. `rankwire exec` does as the plugin does, from its
tasks: the first of the node's tasks to take the socket starts the server there
(`start_node`), and every task follows it (`follow`; the front end's step plan follows in
C), so that no task picked in advance has to come first.

Because the node's ranks share one server, Open MPI sees its local peers and uses shared
memory between them (before, each task had a server of its own, emulating one node per
task: local ranks talked TCP). If the leader cannot start, it tells every follower that
connects why, so each task fails with the same one line.

Fence (PMIx_Fence from the node's ranks → libpmix, which collects them → the fence upcall):
  * (one bare `kvs-fence` on every connection at start, before any task runs: every
    server is up by then; not needed in a step of one node);
  * epoch += 1 (every node sees the same sequence of collective fences);
  * this node's blob, base64, in chunks: `rw.<epoch>.<node>.<i>`, the value of chunk 0
    being `<count>:<chunk>` and every value ≤ 1024 characters (Slurm's PMI-2
    `PMI2_MAX_VALLEN`); an empty blob is not put at all;
  * `kvs-fence` on every task's connection of the node (Slurm's allgather of the step's
    KVS wants each task);
  * with data collection asked for (or a blob of our own), `kvs-get` every other node's
    chunks (not found = empty) and hand libpmix the concatenation in node order; without
    it, the fence is a barrier and its result empty.
  A fence over a subset of the job cannot be carried by PMI-2 (its fence is step-wide): it
  fails with PMIX_ERR_NOT_SUPPORTED and one line on stderr. In a step of one node, every
  rank is this server's and in the fence when libpmix calls up: it completes at once with
  the node's blob (Slurm's PMI-2 fence goes up to srun and back, ≈ 20-30 ms each).

Direct modex: a rank's data reaches the other servers only through collecting fences.
Open MPI 4.1's `MPI_Init` runs its modex as a fence with data collection (the default,
`pmix_base_collect_data=1`, `pmix_base_async_modex=0`), and that is what the bridge relies
on: once it completed, libpmix answers every `PMIx_Get` of a peer's key from what it holds.
A direct-modex request (data of a rank that no fence collected) is refused with
PMIX_ERR_NOT_FOUND and one line naming the setting to undo.

Abort: a rank's `PMIx_Abort` (MPI_Abort) → PMI-2 `abort` (isworld): Slurm kills the step.
A task that ended without PMIx finalize after PMIx init, or with a non-zero code, ends the
step the same way (its peers would wait for it in their next fence). Slurm SIGKILLs the
whole step at once, this node's server with its ranks, so before the abort the server
deregisters its ranks: libpmix then removes the files they registered for cleanup (Open MPI
4.1's `/dev/shm/vader_segment.*`), as slurmstepd's does under `--mpi=pmix` when they die.
Other nodes' servers die with their ranks: there, those files remain. The leader's caller's
death (the bridge has `PR_SET_PDEATHSIG`), SIGTERM (Slurm ending the step), the node's
last task's end: the namespace is deregistered and the server finalized, PMI-2 `finalize`
sent on every idle connection, the bridge exits. libpmix's tmpdir is removed as soon as
the server is up (it keeps nothing there with gds=hash over TCP), so a step Slurm SIGKILLs
leaves nothing. `RANKWIRE_PMI2BRIDGE_DEBUG=1` logs every upcall to stderr.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import errno
import json
import os
import signal
import socket
import stat
import sys
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from rankwire.errors import UserError, exec_failure, shown
from rankwire.pmi.job import nodes_of
from rankwire.record import record
from rankwire.runtime import frame
from rankwire.runtime.peercred import connect_own, peer_creds

VALUE_MAX = 1024  # Slurm's and MPICH's PMI2_MAX_VALLEN
KEY_PREFIX = "rw"
WILDCARD = 0xFFFFFFFE
ERR_NOT_FOUND = -46
ERR_NOT_SUPPORTED = -47
ERR_LOST_CONNECTION = -61
START_TIMEOUT = 60.0  # the PMI-2 handshake and PMIx_server_init
GATHER_TIMEOUT = 30.0  # the leader waits this long for the node's tasks: less than START
STOP_TIMEOUT = 5.0
DEBUG = bool(os.environ.get("RANKWIRE_PMI2BRIDGE_DEBUG"))
STEP_VARS = ("PMI_FD", "PMI_JOBID", "PMI_RANK", "PMI_SIZE", "SLURM_LOCALID", "SLURM_NODEID")


# -- pure: the step, the keys, the chunks, the task's environment ------------------------------
@record
class Step:
    """This task in Slurm's PMI-2 step (from its environment)."""

    fd: int
    jobid: str  # PMI_JOBID: "<job>.<step>"
    rank: int
    size: int
    local_id: int = 0  # SLURM_LOCALID: 0 leads the node
    node_id: int = 0  # SLURM_NODEID: names the node's socket
    gtids: tuple[int, ...] = ()  # SLURM_GTIDS: the node's ranks, as slurmstepd knows them
    stepd: int = 0  # slurmstepd's pid, who made PMI_FD's socketpair (`_with_socket`); 0: unknown


def step_of(environ: Mapping[str, str]) -> Step:
    """The task's PMI-2 identity; UserError when the environment is not a PMI-2 step's."""
    missing = [name for name in STEP_VARS if not environ.get(name)]
    if missing:
        raise UserError(
            f"no Slurm PMI-2 connection to bridge ({', '.join(missing)} unset): "
            "run the PMI-2 bridge as a task of `srun --mpi=pmi2`"
        )
    values: dict[str, int] = {}
    for name in ("PMI_FD", "PMI_RANK", "PMI_SIZE", "SLURM_LOCALID", "SLURM_NODEID"):
        text = environ[name]
        if not (text.isascii() and text.isdigit()):
            raise UserError(f"{name}={shown(text)} is not a number; fix the PMI environment")
        values[name] = int(text)
    if values["PMI_RANK"] >= values["PMI_SIZE"]:
        raise UserError(
            f"PMI_RANK={values['PMI_RANK']} is not below PMI_SIZE={values['PMI_SIZE']}; "
            "fix the PMI environment"
        )
    return Step(
        values["PMI_FD"],
        environ["PMI_JOBID"],
        values["PMI_RANK"],
        values["PMI_SIZE"],
        values["SLURM_LOCALID"],
        values["SLURM_NODEID"],
        tuple(
            int(t) for t in environ.get("SLURM_GTIDS", "").split(",") if t.isascii() and t.isdigit()
        ),
    )


@record
class Layout:
    """Where Slurm placed the step's ranks: `node_of[rank]`, and this task's node."""

    node_of: tuple[int, ...]
    node: int

    @property
    def local(self) -> list[int]:
        return [r for r, n in enumerate(self.node_of) if n == self.node]

    @property
    def nodes(self) -> list[int]:
        return sorted(set(self.node_of))


def layout_of(mapping: Optional[str], step: Step, leads: bool = True) -> Layout:
    """The step's layout from Slurm's `PMI_process_mapping`; UserError unless it is one
    this task can lead (`leads`: its rank the first of its node)."""
    if not mapping:
        raise UserError(
            "Slurm's PMI-2 server gives no PMI_process_mapping, which the PMI-2 bridge needs "
            "to know the node's tasks; run without --distribution=arbitrary"
        )
    try:
        node_of = tuple(nodes_of(mapping, step.size))
    except ValueError:
        raise UserError(
            f"Slurm's PMI_process_mapping {mapping[:80]} is not one the PMI-2 bridge can read; "
            "run under srun --mpi=pmix"
        ) from None
    layout = Layout(node_of, node_of[step.rank])
    if step.gtids and tuple(layout.local) != step.gtids:
        raise UserError(
            f"Slurm's PMI_process_mapping {mapping} does not say where this node's ranks "
            f"(SLURM_GTIDS={','.join(map(str, step.gtids))}) run, which the PMI-2 bridge needs; "
            "run without --distribution=arbitrary or SLURM_HOSTFILE, or under srun --mpi=pmix"
        )
    if leads and layout.local[0] != step.rank:
        raise UserError(
            f"SLURM_LOCALID=0 is rank {step.rank}, but PMI_process_mapping {mapping} puts rank "
            f"{layout.local[0]} first on this node; the PMI-2 bridge needs them to agree"
        )
    return layout


def socket_path(step: Step, base: str) -> str:
    """The node's bridge socket, in the user's private runtime dir `base` (0700: no other
    user can take its name): one per step, node and slurmstepd (job ids are one cluster's:
    two clusters on one host run steps of the same id). It exists only while the node's
    tasks gather."""
    stepd = f".{step.stepd}" if step.stepd else ""
    return os.path.join(base, f"pmi2bridge.{step.jobid}.{step.node_id}{stepd}")


def _runtime_dir() -> str:
    from rankwire.runtime.instance import runtime_dir

    return str(runtime_dir())


def nspace_for(jobid: str) -> str:
    """The PMIx namespace: the same in every node's server (their fence blobs name it)."""
    return f"rankwire.pmi2.{jobid}"


def node_names(host: str, layout: Layout) -> list[str]:
    """This node's real name; the others' only need to differ."""
    return [host if n == layout.node else f"rankwire-node{n}" for n in layout.nodes]


def chunk_key(epoch: int, node: int, index: int) -> str:
    return f"{KEY_PREFIX}.{epoch}.{node}.{index}"


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


def helper_init(layout: Layout, jobid: str, nspace: str, host: str) -> dict[str, Any]:
    """The helper's `init`: the whole job as Slurm placed it, this node's ranks local."""
    return {
        "op": "init",
        "nspace": nspace,
        "jobid": jobid,
        "appnum": 0,
        "size": len(layout.node_of),
        "hostname": host,
        "local_ranks": layout.local,
        "node_ranks": [[r for r, m in enumerate(layout.node_of) if m == n] for n in layout.nodes],
        "node_names": node_names(host, layout),
        "tmpdir": "",
    }


def task_env(environ: Mapping[str, str], add: Mapping[str, str]) -> dict[str, str]:
    """The task's environment: without Slurm's PMI_* (Open MPI must not see a PMI-2 step)
    and any stale PMIX_*, with the bridge's PMIx variables."""
    env = {k: v for k, v in environ.items() if not k.startswith(("PMI_", "PMIX_"))}
    env.update(add)
    return env


def follower_reply(env: Optional[Mapping[str, str]] = None, error: Optional[str] = None) -> bytes:
    """The leader's answer to a follower, framed records (`runtime/frame.py`, which the
    SPANK shim parses too): `setenv=K=V` for each PMIx variable of its rank, or
    `error=LINE`; then `end=1` (the connection stays open: it is the task's end)."""
    records = [("error", error)] if error is not None else []
    records += [("setenv", f"{k}={v}") for k, v in (env or {}).items()]
    return frame.encode([*records, ("end", "1")])


def reply_ended(data: bytes) -> bool:
    """Whether `data` is a whole `follower_reply` (no value holds a NUL)."""
    return data == b"end=1\0" or data.endswith(b"\0end=1\0")


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
    """One task's hold on its node's bridge. `env` is what the task adds (`task_env`)."""

    pid: int  # the bridge process (the node's leader), or 0 (a follower)
    control: int  # the leader's control pipe or a follower's connection; EOF = task ended
    env: Mapping[str, str]
    pass_fds: tuple[int, ...] = ()
    returncode: Optional[int] = None

    def task_env(self, environ: Mapping[str, str]) -> dict[str, str]:
        return task_env(environ, self.env)

    def finish(self, code: Optional[int]) -> int:
        """The task ended with `code` (Popen's returncode: < 0 = killed by that signal;
        None = unknown). A task that ended without PMIx finalize after PMIx init, or with a
        non-zero code, ends the step (PMI-2 abort), so its peers do not wait for it
        forever. The leader's waits for the bridge, which stops its server and exits once
        the node's last task ended; returns the bridge's exit code (0 for a follower)."""
        if self.control >= 0:
            if code is not None:
                with contextlib.suppress(OSError):
                    os.write(self.control, f"{code}\n".encode())
            os.close(self.control)
            self.control = -1
        if self.returncode is None:
            self.returncode = _reap(self.pid, None) if self.pid else 0
        return self.returncode

    def close(self) -> None:
        """Stop the bridge (the task did not start)."""
        self.finish(None)


def _reap(pid: int, timeout: Optional[float]) -> int:
    """The bridge's exit code; SIGKILL after `timeout` seconds (None: wait)."""
    if timeout is None:
        with contextlib.suppress(ChildProcessError):
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        return 0
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


def spawn(
    environ: Mapping[str, str], *, timeout: float = START_TIMEOUT, base: Optional[str] = None
) -> Pmi2Bridge:
    """The bridge for the task whose PMI-2 identity `environ` holds: the node's first
    task starts it, the others join it; returns once the node's PMIx server is up. The
    caller's copy of PMI_FD is closed (the bridge owns it now). UserError if it cannot
    start; nothing is left then."""
    step = _with_socket(step_of(environ))
    if step.local_id:
        try:
            return _follow(step, timeout, base)
        finally:
            with contextlib.suppress(OSError):
                os.close(step.fd)  # the bridge's now, or nobody's: the task must not have it
    base = base or _runtime_dir()  # before the fork: the child never unwinds into our code
    report_r, report_w = os.pipe()
    control_r, control_w = os.pipe()
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the bridge process, exercised under srun
        os.close(report_r)
        os.close(control_w)
        # asyncio imports ssl if it can (10 ms of this start, on the task's path): this
        # process never speaks TLS, and asyncio runs without ssl when the import fails.
        sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]
        from rankwire.pmi.pmix.pmi2serve import child  # asyncio, the codec: its own

        child(step, report_w, control_r, parent, base)
    os.close(report_w)
    os.close(control_r)
    with contextlib.suppress(OSError):
        os.close(step.fd)  # the bridge's now: the task must not inherit it
    try:
        from rankwire.pmi.bridge import read_report

        text = read_report(
            report_r,
            timeout,
            f"the node's PMI-2 bridge did not start within {timeout:g} s; see the messages above",
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


def _with_socket(step: Step) -> Step:
    """`step`, whose PMI_FD is an open socket (else UserError), with its `stepd`: the
    process that made that socket (`SO_PEERCRED` of a socketpair), slurmstepd, which makes
    each task's before it forks the task."""
    try:
        is_socket = stat.S_ISSOCK(os.fstat(step.fd).st_mode)
    except OSError:
        is_socket = False
    if not is_socket:
        raise UserError(
            f"PMI_FD={step.fd} is not an open socket; run the PMI-2 bridge as the task "
            "srun started, not from a child that closed it"
        )
    sock = socket.socket(fileno=step.fd)  # the task's descriptor: read, then let go
    try:
        stepd = peer_creds(sock)[0]
    finally:
        sock.detach()
    return dataclasses.replace(step, stepd=stepd)


def _follow(step: Step, timeout: float, base: Optional[str] = None) -> Pmi2Bridge:
    """Join the node's bridge: connect (the leader may not listen yet), check it is ours,
    hand over the task's PMI-2 socket, wait for the task's PMIx environment."""
    deadline = time.monotonic() + timeout
    late = (
        f"the node's PMI-2 bridge (its first task's) did not start within {timeout:g} s; "
        "see that task's message"
    )
    gone = "the node's PMI-2 bridge ended during start-up; see its message"
    path = socket_path(step, base or _runtime_dir())
    sock = connect_own(path, deadline, late, "PMI-2 bridge")
    try:
        said = f"{step.rank} {step.jobid}\n".encode()  # and our stderr, as the shim's
        socket.send_fds(sock, [said], [step.fd, 2], socket.MSG_NOSIGNAL)
        text = b""
        while not reply_ended(text):
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                data = sock.recv(65536)
            except socket.timeout:
                raise UserError(late) from None
            if not data or len(text) > frame.MAX_FRAME:
                raise UserError(gone)
            text += data
        records = frame.decode(text)
        errors = [v for k, v in records if k == "error"]
        if errors:
            raise UserError(errors[0])
        env = dict(v.split("=", 1) for k, v in records if k == "setenv")
        sock.setblocking(True)
    except (OSError, ValueError, frame.FrameError) as err:
        sock.close()
        if isinstance(err, socket.timeout):
            raise UserError(late) from None
        raise UserError(gone) from None
    except BaseException:
        sock.close()
        raise
    return Pmi2Bridge(0, sock.detach(), env)


def start_node(environ: Mapping[str, str], base: Optional[str] = None) -> None:
    """`rankwire exec` in a task of a PMI-2 step, whose node's tasks come in any order
    (some join in C, `runtime/front.c`'s step plan): the first to take the node's socket
    starts the node's server there, as the plugin's start phase does
    (`start_node_server`), listening at once; then every task follows it (`follow`).
    Taken: another task's. UserError if it cannot listen or fork."""
    from rankwire.pmi.bridge import fork_started_server, node_tasks

    step = _with_socket(step_of(environ))
    base = base or _runtime_dir()
    path = socket_path(step, base)
    key = Step(-1, step.jobid, -1, 0, 0, step.node_id, stepd=step.stepd)

    def serve(listener: socket.socket, life: int) -> int:  # pragma: no cover - under srun
        sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]  # as in spawn
        from rankwire.pmi.pmix.pmi2serve import served

        return served(key, listener.detach(), life, node_tasks(environ), base)

    try:
        fork_started_server(path, os.getppid(), environ, serve)
    except OSError as err:
        if err.errno != errno.EADDRINUSE:
            raise UserError(
                f"cannot start the node's PMI-2 bridge at {path} ({err.strerror}); retry the step"
            ) from None


def follow(environ: Mapping[str, str], timeout: float = START_TIMEOUT) -> Pmi2Bridge:
    """Follow the node's server `start_node` started: hand over the task's PMI-2 socket
    (closed here: the bridge's now) and stderr, and wait for the task's PMIx
    environment. UserError if that fails."""
    step = _with_socket(step_of(environ))
    try:
        return _follow(step, timeout)
    finally:
        with contextlib.suppress(OSError):
            os.close(step.fd)


def start_node_server(
    job_id: int,
    step_id: int,
    node_id: int,
    local_tasks: int,
    stepd_pid: int,
    environ: Mapping[str, str],
    base: str,
) -> tuple[int, str]:
    """The SPANK plugin's way, before the node's tasks exist (its start phase, the job
    user, knows the image needs the bridge): fork the node's bridge process, listening at
    once, so that its start (imports, PMIx_server_init) overlaps the container's and
    slurmstepd's; every task of the node then follows it, the first included (the shim's
    `join_pmi2_bridge`). It ends with the node's last task, or with slurmstepd
    (`stepd_pid`) if no task ever comes. Returns (its pid, its socket); OSError if it
    cannot listen or fork (the shim's first task then starts one as today)."""
    from rankwire.pmi.bridge import fork_started_server

    step = Step(-1, f"{job_id}.{step_id}", -1, 0, 0, node_id, stepd=stepd_pid)
    path = socket_path(step, base)

    def serve(listener: socket.socket, life: int) -> int:  # pragma: no cover - under srun
        global DEBUG
        DEBUG = bool(environ.get("RANKWIRE_PMI2BRIDGE_DEBUG"))
        sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]  # as in spawn
        from rankwire.pmi.pmix.pmi2serve import served

        return served(step, listener.detach(), life, local_tasks, base)

    return fork_started_server(path, stepd_pid, environ, serve), path


# -- the hidden CLI ---------------------------------------------------------------------------
def for_task(
    report_fd: int, control_fd: int, environ: Mapping[str, str], base: Optional[str] = None
) -> int:
    """The SPANK plugin's way (`rankwire spank-helper pmi2-bridge DIR`, which the shim's
    task_init runs detached for the node's first task, with the task's environment; the
    node's socket in DIR): start the bridge of the task whose PMI-2
    identity `environ` holds, tell the shim the task's environment changes on `report_fd`
    as framed records (`setenv=K=V`, `unsetenv=K`, or `error=…`), then wait for EOF on
    `control_fd` (the task holds its other end: EOF is the task's end) and finish."""

    try:
        bridge = spawn(environ, base=base)
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
    import subprocess

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
