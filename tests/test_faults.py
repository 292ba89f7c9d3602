"""The fault matrix: one row per thing killed or broken mid-job (issue 13).

Every row starts a job, breaks one part of it at a given moment, and checks that the job
ends within END_WITHIN seconds of the fault with the expected exit code (and, where there
is one, the exact `rankwire: ...` line), and that nothing of it is left: no process of
the job (any process carrying the row's marker variable), no holder, FUSE daemon, mount,
socket, session dir, cache partial (harness.leftovers), no plugin helper (SPANK rows), no
job process on the Slurm nodes (srun rows).

The ranks are tests/data/fault_rank.c (MPICH, bound into the MPICH image at /mnt/fault)
or, for a PMI client misbehaving on the wire, tests/data/pmi_drop.py (our PMI-1 client,
run on the host by `rankwire run`). Paths:
  local      apptainer-mpirun -n 3 MPICH.SIF ...              (our PMI server)
  host       rankwire run -n 3 --pmi pmi1 python pmi_drop.py   (our PMI server)
  srun       srun -n 2 --mpi=pmi2 rankwire exec MPICH.SIF ...  (Slurm's PMI, one container)
  spank      srun -n 2 --mpi=pmi2 --container-image=MPICH.SIF ...
  multinode  srun -N2 -n2 rankwire exec ... in the cluster in a box (root only)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import pytest
from test_multinode import slurm_multinode  # noqa: F401  (the multinode rows use it)

from harness.leftovers import is_used, paths_in_use, user_leftovers
from harness.mpi import CompiledPrograms
from harness.multinode import MultiNodeCluster
from harness.procs import ancestors
from harness.slurm import SlurmCluster
from harness.spank import spank_leftovers
from harness.users import User

DATA = Path(__file__).parent / "data"
END_WITHIN = 5.0  # seconds from the fault to the end of the job, and to nothing left
START_WITHIN = 60.0  # seconds for a job to reach the moment of the fault
MARK = "RANKWIRE_FAULT_ROW"  # in the environment of every process of a row's job


@dataclasses.dataclass(frozen=True)
class Fault:
    """One row: on `path`, run `args`; once `ready` lines "ready"/"start" appeared, do
    `fault` (None: the rank breaks itself); expect `code` and, if given, `message`."""

    path: str  # local | host | srun | spank | multinode
    args: tuple[str, ...]  # fault_rank's or pmi_drop.py's arguments
    fault: Optional[str]  # rank | holder | squashfuse_ll | launcher | slurmstepd | scancel | link
    sig: int
    code: Optional[int]  # None: Slurm's srun does not end on this fault; we scancel it after
    message: Optional[str] = None
    or_code: Optional[int] = None  # also right (a race the row does not decide)
    ready: int = 0  # "ready" lines to wait for before the fault
    child: bool = False  # every rank first forks a `sleep 60` into the background


def row(id: str, fault: Fault, *marks: pytest.MarkDecorator) -> object:
    return pytest.param(fault, id=id, marks=marks)


KILL, TERM, INT, SEGV = signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGSEGV
SLEEP = ("x", "sleep", "0")  # every rank initializes, says "ready", sleeps 60 s
FAULTS = [
    # -- a rank breaks itself, under our launcher (exit code = the rank's) ------------------
    row("exit-before-init", Fault("local", ("before", "exit", "1", "3"), None, 0, 3,
        "rankwire: rank 1 exited with 3")),
    row("segv-before-init", Fault("local", ("before", "segv", "1"), None, 0, 139,
        "rankwire: rank 1 exited with 139")),
    row("exit-mid-fence", Fault("local", ("fence", "exit", "0", "5"), None, 0, 5,
        "rankwire: rank 0 exited with 5")),
    row("segv-mid-fence", Fault("local", ("fence", "segv", "0"), None, 0, 139,
        "rankwire: rank 0 exited with 139")),
    row("exit-after-init", Fault("local", ("after", "exit", "1", "7"), None, 0, 7,
        "rankwire: rank 1 exited with 7")),
    row("segv-after-init", Fault("local", ("after", "segv", "1"), None, 0, 139,
        "rankwire: rank 1 exited with 139")),
    row("pmi-socket-dropped-mid-fence", Fault("host", ("0",), None, 0, 1,
        "rankwire: rank 0 closed its PMI connection during a fence and runs on: the other "
        "ranks cannot complete the job without it (a rank must keep its PMI_FD/PMI_PORT "
        "connection open until MPI_Finalize)")),
    # -- something else is killed while every rank sleeps after MPI_Init --------------------
    row("rank-sigkill", Fault("local", SLEEP, "rank", KILL, 137,
        "rankwire: rank 1 exited with 137", ready=3)),
    row("holder-sigkill", Fault("local", SLEEP, "holder", KILL, 137, ready=3)),
    row("squashfuse-sigkill", Fault("local", SLEEP, "squashfuse_ll", KILL, 137, ready=3)),
    row("launcher-sigkill", Fault("local", SLEEP, "launcher", KILL, 137, ready=3)),
    row("launcher-sigterm", Fault("local", SLEEP, "launcher", TERM, 143, ready=3)),
    row("launcher-sigint", Fault("local", SLEEP, "launcher", INT, 130, ready=3)),
    row("forked-child-launcher-sigterm", Fault("local", SLEEP, "launcher", TERM, 143, ready=3,
        child=True)),
    row("forked-child-launcher-sigkill", Fault("local", SLEEP, "launcher", KILL, 137, ready=3,
        child=True)),
    # -- under srun: Slurm's PMI, the step's container from `rankwire exec` -----------------
    row("srun-slurmstepd-sigkill", Fault("srun", SLEEP, "slurmstepd", KILL, None, ready=2),
        pytest.mark.slurm),
    row("srun-scancel", Fault("srun", SLEEP, "scancel", TERM, 143, ready=2), pytest.mark.slurm),
    # -- the SPANK plugin's container -------------------------------------------------------
    row("spank-scancel", Fault("spank", SLEEP, "scancel", TERM, 143, ready=2),
        pytest.mark.slurm),
    row("spank-holder-sigkill", Fault("spank", SLEEP, "holder", KILL, 137, ready=2),
        pytest.mark.slurm),
    # -- the cluster in a box: node2's link goes down mid-job, then the job is cancelled ----
    # (node1's task ends on Slurm's SIGTERM, or on its SIGKILL KillWait=2 s later)
    row("multinode-link-down", Fault("multinode", SLEEP, "link", 0, 143, or_code=137, ready=2),
        pytest.mark.slurm, pytest.mark.multinode, pytest.mark.slow),
]  # fmt: skip


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fault_dir(shared_dir: Path, data_programs: CompiledPrograms) -> Path:
    """fault_rank (MPICH) and pmi_drop.py in a dir of their own (bound into containers),
    where every user and every node can read them."""
    d = shared_dir / "faults"
    d.mkdir(mode=0o755)
    shutil.copy(data_programs["fault_rank"], d / "fault_rank")
    shutil.copy(DATA / "pmi_drop.py", d / "pmi_drop.py")
    for p in d.iterdir():
        p.chmod(0o755)
    return d


@dataclasses.dataclass
class Job:
    proc: subprocess.Popen
    out: Path
    err: Path
    marker: str
    slurm: Optional[SlurmCluster | MultiNodeCluster] = None
    job_id: str = ""
    files: set[str] = dataclasses.field(default_factory=set)  # runtime files it uses

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")


def _environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def marked(marker: str, comm: str = "") -> list[int]:
    """Live processes carrying MARK=marker (named `comm`, if given), not us."""
    needle, skip, found = f"{MARK}={marker}".encode(), ancestors(), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in skip:
            continue
        pid = int(proc.name)
        if needle in _environ(pid) and (not comm or _comm(pid) == comm):
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state != "Z":
                found.append(pid)
    return sorted(found)


def _env_value(pid: int, name: str) -> str:
    prefix = f"{name}=".encode()
    for entry in _environ(pid):
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode()
    return ""


def start_job(
    fault: Fault, runner: User, fault_dir: Path, image: Path, tmp: Path, slurm: object
) -> Job:
    marker = os.urandom(6).hex()
    prog = ["/mnt/fault/fault_rank", *fault.args]
    if fault.child:
        prog = ["/bin/sh", "-c", 'sleep 60 & exec "$0" "$@"', *prog]
    bind = ["-B", f"{fault_dir}:/mnt/fault"]
    if fault.path == "local":
        argv = ["apptainer-mpirun", "-n", "3", *bind, str(image), *prog]
    elif fault.path == "host":
        python = f"{runner.bindir}/python" if runner.bindir else sys.executable
        argv = ["rankwire", "run", "-n", "3", "--pmi", "pmi1", python,
                str(fault_dir / "pmi_drop.py"), *fault.args]  # fmt: skip
    elif fault.path == "srun":
        argv = ["srun", "-n", "2", "--mpi=pmi2", "rankwire", "exec", *bind, str(image), *prog]
    elif fault.path == "spank":
        argv = ["srun", "-n", "2", "--mpi=pmi2", f"--container-image={image}",
                f"--container-mounts={fault_dir}:/mnt/fault", *prog]  # fmt: skip
    else:  # multinode: one rank (and one container) on each of two nodes
        argv = ["srun", "-N2", "-n2", "--mpi=pmi2", "rankwire", "exec", "--share",
                "rankwire-%j.%s", *bind, str(image), *prog]  # fmt: skip
    env = dict(os.environ if slurm is None else slurm.env)  # type: ignore[attr-defined]
    env[MARK] = marker
    out, err = tmp / "stdout", tmp / "stderr"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(
            runner.argv(argv),
            stdout=fo,
            stderr=fe,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd="/tmp",
            start_new_session=True,
        )
    return Job(proc, out, err, marker, slurm)  # type: ignore[arg-type]


def wait_ready(job: Job, count: int) -> None:
    """Until `count` ranks said "ready" (0: until the job ended, which must then take no
    more than END_WITHIN); meanwhile note the runtime files the job uses."""
    deadline = time.monotonic() + (START_WITHIN if count else END_WITHIN)
    while count == 0 or job.stdout().count("ready rank=") < count:
        job.files |= runtime_files(marked(job.marker))
        if count == 0 and job.proc.poll() is not None:
            return
        if job.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the job did not get ready\n{job.stdout()}\n{job.stderr()}")
        time.sleep(0.02)
    job.files |= runtime_files(marked(job.marker) + _holders(job))


def _one(pids: list[int], what: str) -> int:
    assert pids, f"no {what} found"
    return pids[0]


def _job_id(job: Job) -> str:
    job.job_id = _env_value(_one(marked(job.marker, "fault_rank"), "rank"), "SLURM_JOB_ID")
    return job.job_id


def _job_id_of(job: Job) -> str:
    """The job id found when the fault was inflicted (the ranks may be gone now)."""
    return job.job_id


def _slurmstepd(job: Job) -> int:
    """The slurmstepd of the job's step 0 (`slurmstepd: [JOB.0]`)."""
    want = f"[{_job_id(job)}.0]"
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and _comm(int(proc.name)) == "slurmstepd":
            try:
                cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if want in cmd:
                return int(proc.name)
    raise AssertionError(f"no slurmstepd {want}")


def _holders(job: Job) -> list[int]:
    """The job's holder, when it has one by now (SPANK's lacks our marker)."""
    try:
        return [_holder(job)]
    except AssertionError:
        return []


def _holder(job: Job) -> int:
    """The holder of the job's container: the one whose mount namespace the ranks joined
    (found that way because the plugin starts it with its helper's environment)."""
    rank = _one(marked(job.marker, "fault_rank"), "rank")
    mnt = os.stat(f"/proc/{rank}/ns/mnt").st_ino
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and _comm(int(proc.name)) == "rankwire-holder":
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{proc.name}/ns/mnt").st_ino == mnt:
                    return int(proc.name)
    raise AssertionError("no holder in the ranks' mount namespace")


def inflict(fault: Fault, job: Job, runner: User) -> None:
    if fault.fault == "rank":
        pids = marked(job.marker, "fault_rank")
        victim = next(p for p in pids if _env_value(p, "PMI_RANK") == "1")
        os.kill(victim, fault.sig)
    elif fault.fault == "holder":
        os.kill(_holder(job), fault.sig)
    elif fault.fault == "squashfuse_ll":
        os.kill(_one(marked(job.marker, "squashfuse_ll"), "squashfuse_ll"), fault.sig)
    elif fault.fault == "launcher":
        os.kill(_one(marked(job.marker, "apptainer-mpiru"), "launcher"), fault.sig)
    elif fault.fault == "slurmstepd":
        os.kill(_slurmstepd(job), fault.sig)
    elif fault.fault == "scancel":
        assert job.slurm is not None
        subprocess.run(["scancel", _job_id(job)], env=job.slurm.env, check=True)
    elif fault.fault == "link":
        assert isinstance(job.slurm, MultiNodeCluster)
        node2 = job.slurm.node_members[1]
        subprocess.run(["ip", "-n", node2.netns, "link", "set", "eth0", "down"], check=True)
        time.sleep(0.5)
        subprocess.run(["scancel", _job_id(job)], env=job.slurm.env, check=True)
        time.sleep(1)
        _links_up(job.slurm)


def _links_up(box: MultiNodeCluster) -> None:
    for m in box.node_members:
        subprocess.run(["ip", "-n", m.netns, "link", "set", "eth0", "up"], check=False)


# One holder's entry in a runtime dir (the CLI's, its fallback, the plugin's): its socket,
# its session dir or a named instance's files; groups 1 + 2 are the entry itself. A socket
# is bound under a temporary t-<pid>- name, then renamed (/proc/net/unix keeps the first).
RUNTIME_ENTRY = re.compile(
    r"^((?:/tmp/rankwire-\d+|/run/rankwire/\d+|/.+/\.cache/rankwire/run)/(?:instances/)?)"
    r"(?:t-\d+-)?(e-[0-9a-f]+\.sock|s-[0-9a-f]+|(?<=instances/)[^/]+)(?:/|$)"
)


def runtime_files(pids: list[int]) -> set[str]:
    """The runtime files (sockets, session dirs) these processes use: open descriptors
    and bound Unix sockets under the runtime dirs, with their s-<id>/e-<id>.sock twins.
    On a shared machine the runtime dirs also hold other sessions' containers: a row
    checks the files its own job used."""
    bound = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 8:
                bound[fields[6]] = fields[7]
    found: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        target = bound.get(target[8:-1], "")
                    entry = RUNTIME_ENTRY.match(target)
                    if entry:
                        found.add(entry.group(1) + entry.group(2))
    for path in list(found):
        p = Path(path)
        if p.name.startswith("s-"):
            found.add(str(p.with_name(f"e-{p.name[2:]}.sock")))
        elif p.name.startswith("e-") and p.name.endswith(".sock"):
            found.add(str(p.with_name(f"s-{p.name[2:-5]}")))
    return found


def leftovers(job: Job, runner: User, fault: Fault, but: tuple[str, ...] = ()) -> list[str]:
    """What of the job is still there (processes named in `but` aside)."""
    users = {runner, User("root", 0, 0, "/root")}
    found = [f"process {p} {_comm(p)}" for p in marked(job.marker) if _comm(p) not in but]
    found += [x for u in users for x in user_leftovers(u) if not x.startswith("file ")]
    found += [f"file {f}" for f in sorted(job.files) if os.path.lexists(f)]
    if fault.path == "spank":
        found += spank_leftovers()
    if isinstance(job.slurm, MultiNodeCluster):
        found += [f"on a node: {s}" for s in job.slurm.strays()]
    return found


@pytest.fixture
def slurm_for(request: pytest.FixtureRequest) -> Callable[[str], object]:
    """The cluster a path needs (started on first use), None for the local paths."""

    def get(path: str) -> object:
        if path == "srun":
            return request.getfixturevalue("slurm_cluster")
        if path == "spank":
            request.getfixturevalue("policy")  # the sample policy, restored after
            return request.getfixturevalue("spank_cluster")
        if path == "multinode":
            return request.getfixturevalue("slurm_multinode")
        return None

    return get


# -- the one test --------------------------------------------------------------------------
@pytest.mark.mpi
@pytest.mark.parametrize("fault", FAULTS)
def test_fault(
    fault: Fault,
    runner: User,
    fault_dir: Path,
    mpich_image: Path,
    slurm_for: Callable[[str], object],
    tmp_path: Path,
) -> None:
    if fault.path == "multinode" and runner.uid != 0:
        pytest.skip("the multinode row runs as root only (the box costs time)")
    slurm = slurm_for(fault.path)
    job = start_job(fault, runner, fault_dir, mpich_image, tmp_path, slurm)
    try:
        wait_ready(job, fault.ready)
        t0 = time.monotonic()
        if fault.fault is not None:
            inflict(fault, job, runner)
        deadline = t0 + END_WITHIN
        if fault.code is None:  # srun waits on: our part must be gone all the same
            but = ("srun", "runuser")
            while leftovers(job, runner, fault, but) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert leftovers(job, runner, fault, but) == []
            assert job.slurm is not None
            subprocess.run(["scancel", _job_id_of(job)], env=job.slurm.env, check=False)
            deadline = time.monotonic() + END_WITHIN
        try:
            code = job.proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"still running {END_WITHIN:g}s after the fault\n{job.stdout()}\n{job.stderr()}"
            )
        if isinstance(job.slurm, MultiNodeCluster):
            _links_up(job.slurm)
        while leftovers(job, runner, fault) and time.monotonic() < deadline:
            time.sleep(0.05)
        ended = time.monotonic() - t0
        print(f"{fault}: exit {code}, nothing left after {ended:.2f}s\n{job.stderr()}")
        code = 128 - code if code < 0 else code  # root's launcher is our child, not runuser's
        if fault.code is not None:
            assert code in (fault.code, fault.or_code), job.stderr()
        if fault.message is not None:
            assert fault.message in job.stderr().splitlines(), job.stderr()
        assert "Traceback" not in job.stderr(), job.stderr()
        assert leftovers(job, runner, fault) == []
    finally:
        if isinstance(job.slurm, MultiNodeCluster):
            _links_up(job.slurm)
        if job.proc.poll() is None:
            os.killpg(job.proc.pid, signal.SIGKILL)
            job.proc.wait()
        for pid in marked(job.marker):
            os.kill(pid, signal.SIGKILL)
        _remove_files_left(job, runner, fault)


def _remove_files_left(job: Job, runner: User, fault: Fault) -> None:
    """After an expected failure: what a dead holder left must not fail the next rows."""
    busy = paths_in_use()
    for entry in leftovers(job, runner, fault):
        kind, _, path = entry.partition(" ")
        if kind != "file" or path not in job.files or not RUNTIME_ENTRY.match(path):
            continue
        if not is_used(Path(path), busy):
            if Path(path).is_dir() and not Path(path).is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                Path(path).unlink(missing_ok=True)
