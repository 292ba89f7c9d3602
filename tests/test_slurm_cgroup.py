"""`srun … rankwire exec` and the SPANK plugin under Slurm's cgroup plugins
(proctrack/cgroup, task/cgroup), as most sites run them: the MPI job works, Slurm
accounts every process of an `exec` container to the step (the plugin's holder: to the
job, see test_plugin_holder_is_the_steps), and cancelling the job or step ends them all.
`RANKWIRE_TEST_SLURM_CGROUP=1` runs every other Slurm test under these plugins too. The
cluster uses cgroup v2 on a unified host and v1 on a hybrid one (Slurm 22.05's
cgroup/v2 refuses hybrid hosts): see harness.slurm.cgroup_conf."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from test_process_ownership import END_S, marker, ranks_forking, sleeps, wait_until

from harness.mpi import assert_hello
from harness.slurm import SlurmCluster, cgroup_roots, cgroup_v2_only, step_cgroup_pids
from harness.spank import srun
from harness.users import User

pytestmark = pytest.mark.slurm

# What a container of `rankwire exec` run by 2 tasks of a step is, process by process
# (`ranks_forking`: each rank sleeps and has forked a sleep).
EXEC_CONTAINER = {
    "rankwire-py": 2,  # `rankwire exec` of each task (the front end runs the Python CLI)
    "rankwire-holder": 1,  # the node's shared container, started by one of them
    "rankwire-init": 1,  # its PID namespace's init
    "squashfuse_ll": 1,  # the image
    "sleep": 4,
}
# The same for the plugin: Slurm execs the tasks itself, the shim's helper starts the
# holder (no PID namespace: no init) and its watcher.
PLUGIN_CONTAINER = {"rankwire-holder": 1, "rankwire-watch": 1, "squashfuse_ll": 1, "sleep": 4}


@pytest.fixture
def out() -> Iterator[IO[str]]:
    """A file for srun's output (a pipe would keep us waiting for what it leaves)."""
    with tempfile.TemporaryFile("w+") as f:
        yield f


def job_of(cluster: SlurmCluster, name: str) -> int:
    """The id of the job named `name`, once it runs."""
    squeue = ["squeue", "-h", "-t", "R", "-n", name, "-o", "%i"]
    ids: list[str] = []

    def running() -> bool:
        ids[:] = subprocess.run(
            squeue, env=cluster.env, capture_output=True, text=True, timeout=30
        ).stdout.split()
        return len(ids) == 1

    wait_until(running, 30, f"job {name} runs")
    return int(ids[0])


def listpids(cluster: SlurmCluster, job: int) -> set[int]:
    """What slurmd says the job's step 0 holds (`scontrol listpids JOB.0`)."""
    proc = subprocess.run(
        ["scontrol", "listpids", f"{job}.0"],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return {int(line.split()[0]) for line in proc.stdout.splitlines()[1:] if line.strip()}


def in_job(job: int) -> dict[int, str]:
    """pid → comm of every process in a cgroup of job `job`, slurmstepd aside."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            cgroups = (proc / "cgroup").read_text().splitlines()
            comm = (proc / "comm").read_text().strip()
        except OSError:
            continue
        job_dir = f"/job_{job}"
        if comm != "slurmstepd" and any(
            line.endswith(job_dir) or f"{job_dir}/" in line for line in cgroups
        ):
            found[int(proc.name)] = comm
    return found


def stepds() -> set[int]:
    """The slurmstepd processes (in their step's cgroup under v1; not tasks of it)."""
    found = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "comm").read_text() == "slurmstepd\n":
                found.add(int(proc.name))
        except OSError:
            continue
    return found


def by_comm(procs: dict[int, str]) -> dict[str, int]:
    return dict(collections.Counter(procs.values()))


def container_step(
    cluster: SlurmCluster, runner: User, argv: list[str], mark: str, out: IO[str]
) -> tuple[int, subprocess.Popen[str]]:
    """Start `srun -J NAME -n 2 ARGV` as `runner`; (job id, srun) once its 4 sleeps run."""
    name = f"cg-{mark}"
    srun_argv = ["srun", "-J", name, "-n", "2", *argv]
    proc = subprocess.Popen(
        runner.argv(srun_argv), cwd="/tmp", env=cluster.env, stdout=out, stderr=out, text=True
    )
    try:
        wait_until(lambda: len(sleeps(mark)) == 4, 60, "every task started its sleeps")
        return job_of(cluster, name), proc
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def cancelled(
    cluster: SlurmCluster, what: str, proc: subprocess.Popen[str], procs: dict[int, str], mark: str
) -> None:
    """`scancel WHAT` ends srun and, in time, every one of `procs`. A job is sent SIGTERM,
    then SIGKILL KillWait (2 s) later; a step (JOB.0), SIGKILL at once."""

    def alive() -> list[int]:
        return [pid for pid in procs if Path(f"/proc/{pid}").exists()]

    try:
        subprocess.run(["scancel", what], env=cluster.env, check=True, timeout=30)
        proc.wait(30)
        wait_until(lambda: not alive(), END_S, f"the step's processes outlived it: {procs}")
    finally:  # what a broken version leaves is not for the next test
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in sleeps(mark):
            os.kill(pid, signal.SIGKILL)


def test_tasks_are_in_the_steps_cgroup(slurm_cgroup_cluster: SlurmCluster) -> None:
    """The fixture does what it says: the task is in step 0's cgroup, v1 or v2."""
    proc = subprocess.run(
        ["srun", "-n", "1", "cat", "/proc/self/cgroup"],
        env=slurm_cgroup_cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    if cgroup_v2_only():
        assert len(lines) == 1 and lines[0].endswith("/step_0/user/task_0"), lines
    else:
        (freezer,) = [line for line in lines if ":freezer:" in line]
        assert freezer.split(":", 2)[2].startswith("/slurm"), freezer
        assert freezer.endswith("/step_0") and "/uid_0/job_" in freezer, freezer


def test_cgroup_cluster_teardown_leaves_no_cgroup() -> None:
    """A cgroup cluster's stop removes the job cgroups, and the slurm_NODE ones if it made
    them (another cgroup cluster may be using those)."""
    if os.getuid() != 0:
        pytest.skip("the Slurm fixture needs root")
    cluster = SlurmCluster(cgroup=True).start()
    try:
        proc = subprocess.run(
            ["srun", "-n", "1", "sh", "-c", "echo $SLURM_JOB_ID"],
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        job = proc.stdout.strip()
    finally:
        cluster.stop()
    roots = cgroup_roots(cluster.nodename)
    assert [p for root in roots for p in root.glob(f"**/job_{job}")] == []
    assert [root for root in cluster.new_cgroups if root.exists()] == []


@pytest.mark.mpi
def test_exec_runs_mpi(
    slurm_cgroup_cluster: SlurmCluster, mpich_image: Path, runner: User, nothing_left_behind: None
) -> None:
    argv = ["srun", "--mpi=pmi2", "-n", "2", "rankwire", "exec", str(mpich_image)]
    proc = runner.run([*argv, "/opt/hello_mpich"], cwd="/tmp", env=slurm_cgroup_cluster.env)
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 2)


def test_exec_container_is_the_steps_and_ends_with_it(
    slurm_cgroup_cluster: SlurmCluster,
    base_image: Path,
    runner: User,
    out: IO[str],
    nothing_left_behind: None,
) -> None:
    """Every process of the container (the ranks, what they forked, the holder, its init
    and FUSE daemon) is in the step's cgroup, which is what slurmd lists; `scancel` of the
    job ends them all, and the holder's teardown leaves nothing."""
    mark = marker()
    argv = ["rankwire", "exec", str(base_image), *ranks_forking(mark)]
    job, proc = container_step(slurm_cgroup_cluster, runner, argv, mark, out)
    procs = in_job(job)
    try:
        assert by_comm(procs) == EXEC_CONTAINER, procs
        step = step_cgroup_pids(slurm_cgroup_cluster.nodename, job, 0) - stepds()
        assert step == set(procs), (step, procs)
        assert listpids(slurm_cgroup_cluster, job) == set(procs)
    finally:
        cancelled(slurm_cgroup_cluster, str(job), proc, procs, mark)


def test_exec_container_killed_with_its_step(
    slurm_cgroup_cluster: SlurmCluster,
    base_image: Path,
    runner: User,
    out: IO[str],
    nothing_left_behind: None,
) -> None:
    """`scancel JOB.STEP` SIGKILLs the whole cgroup at once: no process of the container
    runs on. The holder had no teardown, and nothing of the step is left to do it: its
    socket and session dir stay until the next start on the node prunes them."""
    mark = marker()
    argv = ["rankwire", "exec", str(base_image), *ranks_forking(mark)]
    job, proc = container_step(slurm_cgroup_cluster, runner, argv, mark, out)
    procs = in_job(job)
    assert by_comm(procs) == EXEC_CONTAINER, procs
    cancelled(slurm_cgroup_cluster, f"{job}.0", proc, procs, mark)
    after = runner.run(["rankwire", "exec", str(base_image), "true"], cwd="/tmp")
    assert (after.returncode, after.stderr) == (0, "")


# -- the SPANK plugin --------------------------------------------------------------------
@pytest.mark.mpi
def test_plugin_runs_mpi(
    spank_cgroup_cluster: SlurmCluster, mpich_image: Path, runner: User, nothing_left: None
) -> None:
    image = f"--container-image={mpich_image}"
    proc = srun(spank_cgroup_cluster, runner, "-n", "2", "--mpi=pmi2", image, "/opt/hello_mpich")
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 2)


@pytest.mark.parametrize("what", ["job", "step"])
def test_plugin_container_ends_with_the_step(
    spank_cgroup_cluster: SlurmCluster,
    base_image: Path,
    runner: User,
    what: str,
    out: IO[str],
    nothing_left: None,
) -> None:
    """The tasks and what they forked are the step's; the holder, its watcher and FUSE
    daemon are the job's (the shim's helper starts them from slurmstepd, which is in the
    job's cgroup: see test_plugin_holder_is_the_steps). `scancel` of the job or of the
    step (SIGKILL at once) ends the tasks, and the shim's lease then ends the rest."""
    mark = marker()
    argv = [f"--container-image={base_image}", *ranks_forking(mark)]
    job, proc = container_step(spank_cgroup_cluster, runner, argv, mark, out)
    procs = in_job(job)
    try:
        assert by_comm(procs) == PLUGIN_CONTAINER, procs
        tasks = {pid for pid, comm in procs.items() if comm == "sleep"}
        assert listpids(spank_cgroup_cluster, job) == tasks
    finally:
        target = str(job) if what == "job" else f"{job}.0"
        cancelled(spank_cgroup_cluster, target, proc, procs, mark)


@pytest.mark.xfail(
    strict=True,
    reason="the shim starts the holder in slurm_spank_user_init, from slurmstepd, whose "
    "cgroup (v1) is the job's: proctrack/cgroup neither lists nor signals it",
)
def test_plugin_holder_is_the_steps(
    spank_cgroup_cluster: SlurmCluster,
    base_image: Path,
    out: IO[str],
    nothing_left: None,
) -> None:
    """What Slurm accounts to the step (listpids, the step's cgroup) is the whole container,
    as for `rankwire exec`."""
    mark = marker()
    argv = [f"--container-image={base_image}", *ranks_forking(mark)]
    root = User("root", 0, 0, "/root")
    job, proc = container_step(spank_cgroup_cluster, root, argv, mark, out)
    procs = in_job(job)
    try:
        assert listpids(spank_cgroup_cluster, job) == set(procs)
    finally:
        cancelled(spank_cgroup_cluster, str(job), proc, procs, mark)
