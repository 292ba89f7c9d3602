"""The PMI bridge: a task whose MPI speaks PMI-1/PMI-2, in a step that serves PMIx.

Under `srun --mpi=pmix` every task has `PMIX_NAMESPACE` / `PMIX_RANK` / `PMIX_SERVER_URI*`
and Slurm's PMIx server answers it; an MPI that speaks only PMI-1/PMI-2 (Debian's MPICH
4.0) finds no `PMI_FD` there and starts as a singleton. The bridge is one process per task
that is the PMIx client of that task's rank and serves the task ONE PMI-1 or PMI-2
connection (a socketpair end the task gets as `PMI_FD`, with `PMI_RANK`, `PMI_SIZE`,
`PMI_JOBID` as Slurm's mpi/pmi2 sets them). Requests are decoded by the sans-I/O
`ServerCodec`; the transport is a blocking loop on that one socket (one task, one
connection: a blocking `PMIx_Fence` is fine).

How PMI maps onto PMIx:

* put → buffered in this process (`EpochKvs`).
* fence (PMI-1 `barrier_in`, PMI-2 `kvs-fence`) → the puts since the last fence go out as
  ONE value, `rankwire.kvs.<epoch>` = a JSON object, with `PMIx_Put(GLOBAL)` + `Commit`
  (nothing is put when there is nothing new), then `PMIx_Fence` with data collection.
* get → answered from the merged map; the first get after a fence first fetches the other
  ranks' blobs of every epoch completed since (`PMIx_Get` with `pmix.optional`, so a rank
  that put nothing is "not found" at once instead of a direct-modex wait).

  Why blobs per epoch and lazily: PMI's get names a key, not the rank that put it, so
  per-key PMIx values would need a get per rank per key (MPICH's card exchange is already
  N gets per rank); one blob per rank per epoch makes it N-1 PMIx gets per epoch, whatever
  the number of keys. Lazily, because most fences are bare barriers that no get follows
  (the end of MPI_Init, MPI_Finalize): fetching eagerly would pay N-1 gets for each.
  Fetching every pending epoch at the first get (rather than only on a miss) keeps PMI's
  "later put wins" right for a key written again in a later epoch.
* job attributes (`PMI_process_mapping`, `universeSize`; PMI-1 `get_universe_size`,
  `get_appnum`, maxes) → PMIx job info, read once at start. The mapping is built from
  PMIx's locality info: the node list (`pmix.nlist`) and each node's local peers
  (`pmix.lpeers` qualified by the node's name), else every rank's `pmix.nodeid`; it is
  absent (not found) when that is incomplete, never wrong (MPICH 4.0 crashes on a
  malformed one).
* PMI-2 node attributes (`info-putnodeattr` / `info-getnodeattr`) ride in the same epoch
  blobs and are seen by the ranks of the putter's node after the next fence (the pattern
  MPICH uses: put, barrier, get). Before that fence another rank's node attribute is "not
  found", also with `wait=TRUE` (the bridge cannot block for a put it is not told about).
* abort → `PMIx_Abort(code, message)` (Slurm ends the step); finalize → `PMIx_Finalize`,
  the bridge exits 0.

Lifetime: the bridge never outlives its task. One that `spawn` forked gets SIGKILL when
the process that forked it dies (`PR_SET_PDEATHSIG`); one the node's server forked ends with
the step (Slurm kills the step's processes). Each ends on EOF of its socket (the task
closed it without finalize: exit 1, without `PMIx_Finalize`, so the PMIx server sees a lost
rank; a task that never spoke PMI ends it quietly). It keeps no other descriptor of its
parent (no lease, no pipe but stderr).

Entry points: `task_pmi_env(environ)` is what an executor calls (before it joins a
container: the bridge is a PMIx client on the host, as the task's user). In a Slurm step the
node's first task forks the node's bridge server (`bridgeserve.serve_node`, also what the
SPANK shim starts as `rankwire spank-helper pmi-bridge`), which forks every bridge of the
node as its tasks hand over their socket ends; elsewhere `spawn(environ)` forks one for the
task. `rankwire pmi bridge -- CMD` does the same and execs CMD. `pmi_env`, `task_env`,
`EpochKvs`, `nodes_from_peers` and `JobInfo.attr` are pure. This module is the parent's
side and what both share; the bridge process's own (the PMI codec, libpmix, `Session`) is
`pmi/bridgeserve.py`, imported after the fork only, so that the task's start does not wait
for those imports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn, Optional

from rankwire.errors import UserError
from rankwire.fds import close_fds_except
from rankwire.pmi.bridgeplan import step_offer
from rankwire.pmi.job import process_mapping
from rankwire.record import record

PMI_CHOICES = ("pmi1", "pmi2")
EPOCH_PREFIX = "rankwire.kvs."
START_TIMEOUT = 60.0  # seconds for the bridge's PMIx_Init and job info
MAPPING_ATTR = "PMI_process_mapping"
_NO_PMIX = (
    "no PMIx server to bridge (PMIX_NAMESPACE / PMIX_RANK / PMIX_SERVER_URI* unset): "
    "run the PMI bridge under `srun --mpi=pmix`"
)
_EXITED = (
    "the PMI bridge exited before it reached the step's PMIx server (see the message "
    "above): run it under `srun --mpi=pmix`"
)
ABORT_GRACE = 60.0  # seconds the bridge waits for the step to end after PMIx_Abort


# -- pure: what the step offers, the task's environment ---------------------------------------
def pmi_env(fd: int, rank: int, size: int, jobid: str, spawned: bool, pmi: str) -> dict[str, str]:
    """What the task gets: Slurm's mpi/pmi2 set (`PMI_FD`, `PMI_RANK`, `PMI_SIZE`,
    `PMI_JOBID`, `PMI_SPAWNED=1` when spawned); `pmi1` leaves out PMI_JOBID as Hydra does
    (the bridge serves both versions either way: the client's first line chooses)."""
    if pmi not in PMI_CHOICES:
        raise UserError(f"--pmi {pmi}: use pmi1 or pmi2")
    env = {"PMI_FD": str(fd), "PMI_RANK": str(rank), "PMI_SIZE": str(size)}
    if pmi == "pmi2":
        env["PMI_JOBID"] = jobid
    if spawned:
        env["PMI_SPAWNED"] = "1"
    return env


def task_env(environ: Mapping[str, str], add: Mapping[str, str]) -> dict[str, str]:
    """`environ` without the PMIx variables (so the task's MPI does not try PMIx, and no
    stale PMI variable of another manager), plus `add`."""
    env = {k: v for k, v in environ.items() if not k.startswith(("PMIX_", "PMI_"))}
    env.update(add)
    return env


# -- pure: the process mapping from PMIx's locality info --------------------------------------
def parse_ranks(text: str) -> Optional[list[int]]:
    """`"0,2,5-7"` → [0, 2, 5, 6, 7]; None when malformed."""
    ranks: list[int] = []
    for part in text.split(","):
        part = part.strip()
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            return None
        lo, hi = int(first), int(last) if dash else int(first)
        if hi < lo:
            return None
        ranks.extend(range(lo, hi + 1))
    return ranks


def nodes_from_peers(size: int, peers: Sequence[str]) -> Optional[list[int]]:
    """rank → node index from each node's local peers (`pmix.lpeers` strings in node
    order); None unless every rank 0..size-1 is on exactly one node."""
    nodes: list[Optional[int]] = [None] * size
    for node, text in enumerate(peers):
        ranks = parse_ranks(text)
        if ranks is None:
            return None
        for r in ranks:
            if not 0 <= r < size or nodes[r] is not None:
                return None
            nodes[r] = node
    if any(n is None for n in nodes):
        return None
    return [n for n in nodes if n is not None]


def mapping_for(nodes: Optional[Sequence[int]]) -> Optional[str]:
    """`PMI_process_mapping` for a rank → node list, or None (absent)."""
    return process_mapping(nodes) if nodes else None


# -- pure: the epoch KVS of one rank ----------------------------------------------------------
def epoch_key(epoch: int) -> str:
    return f"{EPOCH_PREFIX}{epoch}"


def encode_blob(kvs: Mapping[str, str], node: Mapping[str, str]) -> str:
    """One rank's puts of one epoch as the string published through PMIx."""
    doc: dict[str, Mapping[str, str]] = {"kvs": kvs}
    if node:
        doc["node"] = node
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)


def decode_blob(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """(kvs, node attributes) of a blob; ValueError when it is not one of ours."""
    doc = json.loads(text)
    if not isinstance(doc, dict):
        raise ValueError("not a rankwire PMI bridge blob")
    parts = []
    for name in ("kvs", "node"):
        part = doc.get(name, {})
        if not isinstance(part, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in part.items()
        ):
            raise ValueError(f"malformed {name!r} in a rankwire PMI bridge blob")
        parts.append(dict(part))
    return parts[0], parts[1]


class EpochKvs:
    """The KVS as one rank sees it through the bridge (no I/O).

    Epoch e is the interval between fence e-1 and fence e. `put`/`put_node` stage keys;
    `enter_fence()` closes the epoch and returns the blob to publish (None: nothing new);
    `fence_done()` makes it pending until `merge()` receives the other ranks' blobs of it
    (`pending()` says which epochs to fetch). Merging goes epoch by epoch, ranks in rank
    order within an epoch: later writers win, as in `pmi.job.Job`. Node attributes are
    merged only from ranks on this rank's node (`nodes`: rank → node; None: unknown,
    then only this rank's own).
    """

    def __init__(self, rank: int, nodes: Optional[Sequence[int]] = None) -> None:
        self.rank = rank
        self.nodes = tuple(nodes) if nodes is not None else None
        self.epoch = 0  # the epoch puts go to now
        self._staged: dict[str, str] = {}
        self._staged_node: dict[str, str] = {}
        self._own: dict[int, str] = {}  # epoch → this rank's blob (fenced or in flight)
        self._pending: list[int] = []  # fenced epochs not merged yet
        self._kvs: dict[str, str] = {}
        self._node: dict[str, str] = {}

    def put(self, key: str, value: str) -> None:
        self._staged[key] = value

    def put_node(self, key: str, value: str) -> None:
        self._staged_node[key] = value
        self._node[key] = value  # visible to this rank at once

    def enter_fence(self) -> tuple[int, Optional[str]]:
        """(epoch, blob to publish under `epoch_key(epoch)` or None) for the fence entered."""
        epoch = self.epoch
        blob = None
        if self._staged or self._staged_node:
            blob = encode_blob(self._staged, self._staged_node)
            self._own[epoch] = blob
        self._staged, self._staged_node = {}, {}
        return epoch, blob

    def fence_done(self) -> None:
        self._pending.append(self.epoch)
        self.epoch += 1

    def fence_failed(self) -> None:
        """The fence failed: its epoch is dropped (its key is never read), the next one
        starts."""
        self._own.pop(self.epoch, None)
        self.epoch += 1

    def pending(self) -> tuple[int, ...]:
        return tuple(self._pending)

    def merge(self, epoch: int, blobs: Mapping[int, str]) -> None:
        """Merge the blobs other ranks published in `epoch` (ranks that put nothing are
        absent) with this rank's own; ValueError for a blob that is not ours."""
        if epoch not in self._pending:
            raise ValueError(f"epoch {epoch} is not pending")
        every = dict(blobs)
        if epoch in self._own:
            every[self.rank] = self._own.pop(epoch)
        for rank in sorted(every):
            kvs, node = decode_blob(every[rank])
            self._kvs.update(kvs)
            if rank == self.rank or self._same_node(rank):
                self._node.update(node)
        self._pending.remove(epoch)

    def _same_node(self, rank: int) -> bool:
        if self.nodes is None or not 0 <= rank < len(self.nodes):
            return False
        return self.nodes[rank] == self.nodes[self.rank]

    def get(self, key: str) -> Optional[str]:
        """A key of a merged epoch (call after merging what `pending()` lists)."""
        return self._kvs.get(key)

    def node_attr(self, key: str) -> Optional[str]:
        return self._node.get(key)


@record
class JobInfo:
    """What the bridge learned from PMIx at start (read once) and tells its parent."""

    nspace: str
    rank: int
    size: int
    jobid: str  # PMI-1 kvsname, PMI-2 jobid / PMI_JOBID
    appnum: int = 0
    universe_size: int = 0
    spawned: bool = False
    nodes: Optional[tuple[int, ...]] = None  # rank → node, None: unknown

    @property
    def mapping(self) -> Optional[str]:
        return mapping_for(self.nodes)

    def attr(self, key: str) -> Optional[str]:
        """PMI-2 job attributes (and PMI-1's pre-put PMI_process_mapping)."""
        if key == MAPPING_ATTR:
            return self.mapping
        if key == "universeSize":
            return str(self.universe_size or self.size)
        return None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> JobInfo:
        doc = json.loads(text)
        nodes = doc.pop("nodes", None)
        return cls(**doc, nodes=tuple(nodes) if nodes is not None else None)


def jobid_for(environ: Mapping[str, str], nspace: str) -> str:
    """Slurm's `<jobid>.<stepid>` (what its mpi/pmi2 puts in PMI_JOBID), else the nspace."""
    job = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
    step = environ.get("SLURM_STEP_ID") or environ.get("SLURM_STEPID")
    if job and step:
        return f"{job}.{step}"
    return nspace


# -- the parent's side ------------------------------------------------------------------------
@record
class Bridge:
    """A running bridge: `fd` is the task's end of the socket (inheritable; `env` names
    it as PMI_FD), `pid` the bridge process, `info` what it learned from PMIx."""

    pid: int
    fd: int
    env: Mapping[str, str]
    info: JobInfo

    def task_env(self, environ: Mapping[str, str]) -> dict[str, str]:
        return task_env(environ, self.env)

    def handed_over(self) -> None:
        """The task exists (it inherited `fd`): close our copy, so its exit is the
        bridge's EOF."""
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def wait(self, timeout: float) -> Optional[int]:
        """Reap the bridge; its exit code, None if it still runs after `timeout`, -1 if
        somebody else (a child watcher) reaped it."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return -1
            if pid:
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    def end(self) -> None:
        """Kill and reap the bridge (after the task: normally it has ended by itself)."""
        if self.wait(0) is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)


def slurm_job_info(environ: Mapping[str, str]) -> Optional[JobInfo]:
    """What the task's PMI variables need, from a Slurm step's environment alone (rank,
    step size, `<job>.<step>`), or None outside one."""
    try:
        rank = int(environ["PMIX_RANK"])
        size = int(environ.get("SLURM_STEP_NUM_TASKS") or environ["SLURM_NTASKS"])
    except (KeyError, ValueError):
        return None
    nspace = environ.get("PMIX_NAMESPACE", "")
    if not environ.get("SLURM_STEP_ID") or not 0 <= rank < size:
        return None
    return JobInfo(nspace, rank, size, jobid_for(environ, nspace))


def spawn(environ: Mapping[str, str], pmi: str = "pmi2", timeout: float = START_TIMEOUT) -> Bridge:
    """Fork a bridge for the task whose PMIx identity `environ` holds; returns once it is
    the PMIx client of that rank and knows the job (UserError otherwise, nothing left).
    The task must inherit `bridge.fd` (keep its number) and get `bridge.task_env(...)`;
    then call `bridge.handed_over()`. Outside a Slurm step (in one, `task_pmi_env` has the
    node's server fork it)."""
    if pmi not in PMI_CHOICES:
        raise UserError(f"--pmi {pmi}: use pmi1 or pmi2")
    if step_offer(environ) != "pmix":
        raise UserError(_NO_PMIX)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    rpipe, wpipe = os.pipe()
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's code path, exercised under srun
        theirs.close()
        os.close(rpipe)
        _child(ours, wpipe, parent, environ)
    ours.close()
    os.close(wpipe)
    try:
        text = read_report(
            rpipe,
            timeout,
            f"the PMI bridge did not connect to the step's PMIx server within {timeout:g} s: "
            "check that slurmstepd's PMIx server is reachable (srun --mpi=pmix)",
        )
        doc = json.loads(text) if text else {"error": _EXITED}
        if "error" in doc:
            raise UserError(str(doc["error"]))
        info = JobInfo.from_json(text)
    except BaseException:
        theirs.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        raise
    finally:
        os.close(rpipe)
    fd = theirs.detach()
    os.set_inheritable(fd, True)
    env = pmi_env(fd, info.rank, info.size, info.jobid, info.spawned, pmi)
    return Bridge(pid, fd, env, info)


NODE_WAIT = 60.0  # the node's other tasks reach the node's bridge server within this


# Where a task finds its slurmstepd's PID: Slurm's PMIx server is slurmstepd, whose
# namespace libpmix names `pmix-server.PID`, in the first of these a task has.
SERVER_URI_VARS = ("PMIX_SERVER_URI41", "PMIX_SERVER_URI4", "PMIX_SERVER_URI3",
                   "PMIX_SERVER_URI21", "PMIX_SERVER_URI2")  # fmt: skip


def stepd_of(environ: Mapping[str, str]) -> Optional[str]:
    """The PID of the task's slurmstepd (its PMIx server's, `pmix-server.PID;URI`), or
    None when the task has no such variable."""
    uri = next((environ[k] for k in SERVER_URI_VARS if k in environ), "")
    head, sep, _ = uri.partition(";")
    pid = head[len("pmix-server.") :] if head.startswith("pmix-server.") and sep else ""
    return pid if pid.isascii() and pid.isdigit() else None


def node_socket(environ: Mapping[str, str], base: str) -> Optional[str]:
    """Where the node's other tasks find its bridge server: in the user's private runtime
    dir `base`, after the step, the node and the step's slurmstepd (`stepd_of`: job ids
    are one cluster's, so two clusters on one host, or one whose controller lost its
    state, can run steps of one name at once); the SPANK shim's `pmi_node_socket` and the
    front end's `join_node_bridge` name it the same way. None outside a Slurm task."""
    job, step, node = (
        environ.get(k, "") for k in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_NODEID")
    )
    if not (job.isdigit() and step.isdigit() and node.isdigit()):
        return None
    stepd = stepd_of(environ)
    return os.path.join(base, f"pmibridge.{job}.{step}.{node}" + (f".{stepd}" if stepd else ""))


def node_tasks(environ: Mapping[str, str]) -> int:
    """How many of the step's tasks run on this node (SLURM_GTIDS)."""
    return len([t for t in environ.get("SLURM_GTIDS", "").split(",") if t])


def task_pmi_env(environ: Mapping[str, str], pmi: str = "pmi2") -> dict[str, str]:
    """The task's PMI variables (`PMI_FD` inheritable), its bridge started: in a Slurm
    step, by the node's bridge server (`bridgeserve.serve_node`, as under the SPANK plugin:
    one process whose imports and libpmix are loaded once forks every bridge of the node);
    elsewhere, a bridge of the task's own (`spawn`). The node's server is started by the
    first of its tasks to get here, the one that takes the node's socket (its name, here,
    before the server forks: the tasks that find it taken hand over, from Python or from
    the front end's step plan, `runtime/front.c`); not a task picked in advance, which a
    task that joins in C or comes late would leave without one. UserError when it cannot
    be outside a step; in one, `abort_step` (the step's other ranks would wait for ours);
    nothing is left then."""
    known = slurm_job_info(environ)
    path = node_socket(environ, "")
    if known is None or not environ.get("SLURM_LOCALID", "").isdigit() or path is None:
        return dict(spawn(environ, pmi).env)  # not a task of a step
    from rankwire.runtime.instance import listen_at, runtime_dir

    base = str(runtime_dir())
    path = os.path.join(base, path)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener: Optional[socket.socket] = None
        first = True
        if node_tasks(environ) > 1:
            try:
                listener = listen_at(path)
            except OSError as err:
                if err.errno != errno.EADDRINUSE:
                    raise UserError(
                        f"cannot serve the node's PMI bridges at {path} ({err.strerror}); "
                        "retry the step"
                    ) from None
                first = False
        if first:
            _fork_node_server(ours.fileno(), environ, base, listener)
        else:
            _hand_over(ours.fileno(), environ, base)
    except UserError as err:
        theirs.close()
        ours.close()
        abort_step(str(err), err.exit_code)
    except BaseException:
        theirs.close()
        raise
    finally:
        ours.close()
    fd = theirs.detach()
    os.set_inheritable(fd, True)
    return pmi_env(fd, known.rank, known.size, known.jobid, False, pmi)


def abort_step(why: str, code: int = 2, said: bool = False) -> NoReturn:
    """A task of a PMIx step that cannot have its bridge: say `why`, then end the whole
    step with PMIx_Abort as this task's rank (our PMIX_* variables), as a bridged rank's
    MPI_Abort does; without it the step's other ranks would wait for this one in their
    MPI's first fence as long as the step lasts. Slurm kills the step's tasks, us
    included (we wait ABORT_GRACE for that); exits with `code` (at once when PMIx cannot
    be reached: then only this task ends). `said`: `why` was said already. The node's
    bridge server, if it still waits for tasks, is told first (`abort=1`): it would hold
    the first task's stderr, and so the step, until NODE_WAIT."""
    if not said:
        _say(why)
    with contextlib.suppress(Exception):
        from rankwire.runtime import frame
        from rankwire.runtime.instance import runtime_dir

        path = node_socket(os.environ, str(runtime_dir()))
        if path is not None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.setblocking(False)  # a server that does not listen: nothing to tell
                sock.connect(path)
                sock.send(frame.encode([("abort", "1"), ("end", "1")]), socket.MSG_NOSIGNAL)
    try:
        from rankwire.pmi.pmix.client_lib import Client

        client = Client()
        client.init()
        client.abort(code, f"rankwire: {why}")
        time.sleep(ABORT_GRACE)
    except Exception:  # no PMIx here: this task ends alone, said above
        pass
    raise SystemExit(code)


def _fork_node_server(
    fd: int, environ: Mapping[str, str], base: str, listener: Optional[socket.socket]
) -> None:
    """The node's first task: fork the node's bridge server, detached, serving this task
    on `fd` and the node's other tasks at `listener` (None: the only task of its node);
    its messages go to our stderr; it ends with our parent (slurmstepd) if they do not
    all come. Our copy of `listener` is closed, its name removed if the server could not
    be forked."""
    try:
        life = os.pidfd_open(os.getppid())
    except OSError as err:
        path = node_socket(environ, base)
        if listener is not None and path is not None:
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise UserError(
            f"cannot start the node's PMI bridge server ({err.strerror}); retry the step"
        ) from None

    def server() -> int:  # pragma: no cover - the server, exercised under srun
        _quiet({fd, life} if listener is None else {fd, life, listener.fileno()})
        from rankwire.pmi.bridgeserve import serve_node

        try:
            return serve_node(fd, environ, base, listener, life)
        except UserError as err:
            _say(str(err))
            return err.exit_code

    try:
        fork_detached(server)
    except OSError as err:
        path = node_socket(environ, base)
        if listener is not None and path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise UserError(
            f"cannot start the node's PMI bridge server ({err.strerror}); retry the step"
        ) from None
    finally:
        os.close(life)
        if listener is not None:
            listener.close()


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
    user, knows the image needs the bridge): fork the node's bridge server, listening at
    once, so that its imports and libpmix load while the container and the tasks start;
    every task of the node then joins it, the first included (the shim's
    `join_pmi_bridge`). It ends once the node's `local_tasks` tasks have their bridges,
    or with slurmstepd (`stepd_pid`) or at SIGTERM if they do not come. Returns (its pid,
    its socket); OSError if it cannot listen or fork (the shim's first task then starts
    one as today)."""
    path = os.path.join(base, f"pmibridge.{job_id}.{step_id}.{node_id}.{stepd_pid}")

    def serve(listener: socket.socket, life: int) -> int:  # pragma: no cover - under srun
        from rankwire.pmi.bridgeserve import serve_started

        return serve_started(listener, path, life, local_tasks)

    return fork_started_server(path, stepd_pid, environ, serve), path


def fork_started_server(
    path: str,
    stepd_pid: int,
    environ: Mapping[str, str],
    serve: Callable[[socket.socket, int], int],
) -> int:
    """Listen at `path` and fork a node's bridge server started before its tasks (both
    bridges' `start_node_server`): named `rankwire-bridge`, stdin, stdout and stderr on
    /dev/null (the helper's are not its; a task's stderr comes with the first task), no
    other descriptor but the listener and slurmstepd's pidfd, the step's `environ`, and
    SIGTERM, SIGINT, SIGHUP as SystemExit; it exits with what `serve(listener, pidfd)`
    returns, its socket removed. Returns its pid; OSError if it cannot listen or fork."""
    from rankwire.runtime.instance import listen_at

    life = os.pidfd_open(stepd_pid)  # our ancestor, waiting for our reply: it is that one
    try:
        listener = listen_at(path)
    except OSError:
        os.close(life)
        raise
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError:
        listener.close()
        os.close(life)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    if pid == 0:  # pragma: no cover - the server, exercised under srun
        code = 1
        try:
            _quiet({listener.fileno(), life})
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # the `finally` runs
                signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 2)
            os.close(null)
            from rankwire.runtime import syscalls as sc

            sc.set_comm("rankwire-bridge")  # in ps, not the start phase's name
            os.environ.clear()
            os.environ.update(environ)  # the step's: RANKWIRE_LIBPMIX, before libpmix loads
            code = serve(listener, life)
        except SystemExit as end:  # a signal's 128 + N
            code = end.code if isinstance(end.code, int) else 1
        except BaseException as err:  # never unwind into the start phase's code
            with contextlib.suppress(BaseException):
                _say(f"the node's PMI bridge server failed: {err!r}")
        finally:
            with contextlib.suppress(BaseException):
                os.unlink(path)  # a no-op once the tasks came
            os._exit(code)
    listener.close()
    os.close(life)
    return pid


def fork_detached(body: Callable[[], int]) -> None:
    """Run `body` in a grandchild (nobody's child to reap). It exits with what `body`
    returns, with a SystemExit's code (a signal handler's 128 + N), or 1 on anything else,
    said on stderr. OSError when it could not be forked."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - exercised under srun
        code = 1
        try:
            child = os.fork()
        except OSError as failure:
            code = failure.errno or 1  # said by the caller
        else:
            if child:
                code = 0
            else:
                try:
                    code = body()
                except SystemExit as end:
                    code = end.code if isinstance(end.code, int) else 1
                except BaseException:  # never unwind into the caller's code
                    with contextlib.suppress(BaseException):
                        import traceback

                        traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:  # the errno of the inner fork; killed: EINTR
        why = code if code > 0 else errno.EINTR
        raise OSError(why, os.strerror(why))


def _hand_over(fd: int, environ: Mapping[str, str], base: str) -> None:
    """Not the node's first task: hand `fd` (the bridge's end of our PMI_FD socketpair),
    our stderr and our environment (`env=K=V` records, `cpus=` our CPUs, `end=1`) to the
    node's bridge server, which forks our bridge (the SPANK shim's join_pmi_bridge, the
    same way). Nothing comes back: our task's PMI client waits on PMI_FD."""
    from rankwire.runtime import frame
    from rankwire.runtime.peercred import connect_own

    path = node_socket(environ, base)
    assert path is not None
    deadline = time.monotonic() + NODE_WAIT
    late = (
        "the node's PMI bridge server (its first task's) did not listen within "
        f"{NODE_WAIT:.0f} s (it did not start, or ended); see that task's message (srun -l)"
    )
    records = [("env", f"{k}={v}") for k, v in environ.items() if k and "=" not in k]
    with contextlib.suppress(OSError):
        records.append(("cpus", ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))))
    data = frame.encode([*records, ("end", "1")])
    with connect_own(path, deadline, late, "PMI bridge server") as sock:
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sent = socket.send_fds(sock, [data], [fd, 2], socket.MSG_NOSIGNAL)
            if sent < len(data):  # sendall(b"") still sends: EPIPE once the server took
                sock.sendall(data[sent:])  # it all and closed (a server that is quick)
        except OSError as err:
            why = "it took no data in time" if isinstance(err, TimeoutError) else err.strerror
            raise UserError(
                f"cannot hand the task to the node's PMI bridge server ({why}); retry the step"
            ) from None


def read_report(fd: int, timeout: float, late: str) -> str:
    """What a bridge process writes on `fd` before it closes it, within `timeout` seconds
    (both bridges' start-up reports); UserError `late` when it takes longer."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise UserError(late)
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        data = os.read(fd, 65536)
        if not data:
            return b"".join(chunks).decode(errors="replace")
        chunks.append(data)


# -- the bridge process -----------------------------------------------------------------------
def _child(sock: socket.socket, wpipe: int, parent: int, environ: Mapping[str, str]) -> NoReturn:
    """The forked bridge: never returns, never runs the parent's cleanup."""
    code = 1
    try:
        _detach(sock.fileno(), wpipe, parent)
        for key, value in environ.items():  # PMIx_Init reads its identity from here
            if key.startswith("PMIX_"):
                os.environ[key] = value
        from rankwire.pmi.bridgeserve import run  # the codec and libpmix: here only

        code = run(sock, wpipe, environ)
    except BaseException as err:
        with contextlib.suppress(BaseException):
            _say(f"PMI bridge failed: {err}")
    finally:
        os._exit(code)


def _detach(keep_sock: int, wpipe: int, parent: int) -> None:
    from rankwire.runtime import syscalls as sc

    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)
    _quiet({keep_sock, wpipe})


def _quiet(keep: set[int]) -> None:
    """Default signal actions, stdin and stdout on /dev/null (stderr stays: the task's),
    every other descriptor but `keep` closed (no lease, pipe or socket of the parent)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])  # Slurm's SIGTERM must end us too
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    close_fds_except(keep)


def _say(text: str) -> None:
    os.write(2, f"rankwire: {text}\n".encode(errors="replace"))
