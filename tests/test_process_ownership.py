"""The container owns its processes: whatever a rank forks ends with the job (the
container's PID namespace), however the job ends, and the launcher ends in bounded time
even when such processes hold its output pipes. Under Slurm they stay tracked by
Slurm's proctrack."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Optional

import pytest

from harness.procs import child_of
from harness.slurm import SlurmCluster
from harness.users import User

pytestmark = pytest.mark.usefixtures("nothing_left_behind")

END_S = 5.0  # how long the launcher and every process a rank forked may take to go


def marker() -> str:
    """A `sleep` duration no other process uses: what finds this test's sleeps."""
    return f"3{secrets.randbelow(1000):03d}.{secrets.randbelow(10**6):06d}"


def sleeps(mark: str) -> list[int]:
    """Host pids of the `sleep MARK` processes."""
    want = f"sleep\0{mark}\0".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes() == want:
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.05)


@pytest.fixture
def out() -> Iterator[IO[str]]:
    """A file for a command's output: a pipe would keep us waiting for whatever the
    command leaves behind holding it."""
    with tempfile.TemporaryFile("w+") as f:
        yield f


def start(runner: User, argv: list[str], out: IO[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(runner.argv(argv), cwd="/tmp", stdout=out, stderr=out, text=True)


def the_command(proc: subprocess.Popen[str], runner: User) -> int:
    """The rankwire process itself (runuser's child when run as the user)."""
    return proc.pid if runner.uid == os.getuid() else child_of(proc.pid)


def ended(proc: subprocess.Popen[str], command: int, mark: str, out: IO[str]) -> int:
    """The exit code of `proc` (whose rankwire process is `command`), once it and every
    `sleep MARK` have ended in time."""
    try:
        try:
            code = proc.wait(END_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {END_S:g} s after it was told to end") from None
        wait_until(lambda: not sleeps(mark), END_S, f"sleep {mark} outlived the job")
    finally:  # what a broken version leaves is not for the next test
        for pid in [command, *sleeps(mark)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    out.seek(0)
    return code


def ranks_forking(mark: str) -> list[str]:
    """A rank that leaves a process in the background (which ignores SIGINT, as a
    non-interactive shell's background jobs do) and then becomes `sleep` itself."""
    return ["/bin/sh", "-c", f"sleep {mark} & exec sleep {mark}"]


@pytest.mark.parametrize("how", ["timeout", "SIGTERM", "SIGINT", "SIGKILL"])
def test_launcher_leaves_no_process_a_rank_forked(
    how: str, base_image: Path, runner: User, out: IO[str]
) -> None:
    mark = marker()
    timeout = ["--timeout", "2"] if how == "timeout" else []
    argv = ["apptainer-mpirun", "-n", "2", *timeout, str(base_image), *ranks_forking(mark)]
    proc = start(runner, argv, out)
    wait_until(lambda: len(sleeps(mark)) == 4, 30, "every rank started its sleeps")
    command = the_command(proc, runner)
    if how != "timeout":
        os.kill(command, getattr(signal, how))
    code = ended(proc, command, mark, out)
    if how == "timeout":
        assert code == 124
        assert out.read() == "rankwire: the job ran longer than --timeout 2s: killed it\n"
    elif how != "SIGKILL":  # the ranks' own ends: killed by the signal we forwarded
        assert code == 128 + getattr(signal, how), out.read()


@pytest.mark.parametrize("tag", [[], ["--tag-output"]], ids=["direct", "tagged"])
def test_launcher_ends_when_leftovers_hold_its_pipes(
    tag: list[str], base_image: Path, runner: User, out: IO[str]
) -> None:
    """The ranks exit at once; what they left in the background holds the output pipes
    (the launcher's own, with --tag-output): the job is over all the same."""
    mark = marker()
    script = f"sleep {mark} & sleep 0.3; echo started"  # (time for it to exec sleep)
    argv = ["apptainer-mpirun", "-n", "2", *tag, str(base_image), "/bin/sh", "-c", script]
    proc = start(runner, argv, out)
    assert ended(proc, proc.pid, mark, out) == 0
    prefixes = ["[0] ", "[1] "] if tag else ["", ""]
    assert sorted(out.read().splitlines()) == [f"{p}started" for p in prefixes]


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_exec_leaves_no_process_its_command_forked(
    how: str, base_image: Path, runner: User, out: IO[str]
) -> None:
    mark = marker()
    proc = start(runner, ["rankwire", "exec", str(base_image), *ranks_forking(mark)], out)
    wait_until(lambda: len(sleeps(mark)) == 2, 30, "the command started its sleeps")
    command = the_command(proc, runner)
    os.kill(command, getattr(signal, how))
    code = ended(proc, command, mark, out)
    if how != "SIGKILL":
        assert code == 128 + getattr(signal, how), out.read()


def test_ranks_share_a_pid_namespace_and_its_proc(base_image: Path, runner: User) -> None:
    """One PID namespace per container (CMA between ranks needs it), not the host's, and
    a /proc that is its own: /proc/$$ is the shell itself."""
    script = (
        'while read -r k v; do [ "$k" = Pid: ] && p=$v; done </proc/$$/status; '
        'echo "$(readlink /proc/self/ns/pid) $p $$"'
    )
    argv = ["apptainer-mpirun", "-n", "2", str(base_image), "/bin/sh", "-c", script]
    proc = runner.run(argv, cwd="/tmp", timeout=60)
    assert proc.returncode == 0, proc.stderr
    ranks = [line.split() for line in proc.stdout.splitlines()]
    assert len(ranks) == 2 and len({ns for ns, _, _ in ranks}) == 1, proc.stdout
    assert ranks[0][0] != os.readlink("/proc/self/ns/pid")
    assert all(status_pid == shell_pid for _, status_pid, shell_pid in ranks), proc.stdout


def test_instance_keeps_its_processes_until_stopped(base_image: Path, runner: User) -> None:
    mark, name = marker(), f"own-{secrets.token_hex(3)}"
    started = runner.run(["rankwire", "instance", "start", str(base_image), name], cwd="/tmp")
    assert started.returncode == 0, started.stderr
    try:
        script = f"sleep {mark} >/dev/null 2>&1 &"
        argv = ["rankwire", "exec", f"instance://{name}", "/bin/sh", "-c", script]
        joined = runner.run(argv, cwd="/tmp", timeout=30)
        assert joined.returncode == 0, joined.stderr
        time.sleep(0.5)
        assert len(sleeps(mark)) == 1  # the exec has ended; the instance still runs it
    finally:
        stopped = runner.run(["rankwire", "instance", "stop", name], cwd="/tmp")
    assert stopped.returncode == 0, stopped.stderr
    wait_until(lambda: not sleeps(mark), END_S, "the instance's process outlived it")


def _listpids(cluster: SlurmCluster, job_name: str) -> set[int]:
    """The pids slurmd tracks for the job named `job_name` (asked by job id: the steps
    of jobs that other tests ended by killing their slurmstepd leave sockets that make a
    bare `scontrol listpids` fail)."""
    job = subprocess.run(
        ["squeue", "-h", "-n", job_name, "-o", "%i"],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    proc = subprocess.run(
        ["scontrol", "listpids", job],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert job and proc.returncode == 0, (job, proc.stderr)
    return {int(line.split()[0]) for line in proc.stdout.splitlines()[1:] if line.strip()}


@pytest.mark.slurm
def test_slurm_proctrack_still_tracks_what_ranks_fork(
    slurm_cluster: SlurmCluster, base_image: Path, runner: User, out: IO[str]
) -> None:
    """Two tasks of a step share the node's container (and its PID namespace): Slurm's
    proctrack lists every process they forked, and the step's end ends them."""
    mark = marker()
    name = f"own-{mark}"
    argv = ["srun", "-J", name, "-n", "2", "rankwire", "exec", str(base_image)]
    argv += ranks_forking(mark)
    proc = subprocess.Popen(
        runner.argv(argv), cwd="/tmp", env=slurm_cluster.env, stdout=out, stderr=out, text=True
    )
    try:
        wait_until(lambda: len(sleeps(mark)) == 4, 60, "every task started its sleeps")
        listed: Optional[set[int]] = None
        deadline = time.monotonic() + 10  # the step's pids reach slurmd's view in a moment
        while time.monotonic() < deadline:
            listed = _listpids(slurm_cluster, name)
            if set(sleeps(mark)) <= listed:
                break
            time.sleep(0.2)
        assert listed is not None and set(sleeps(mark)) <= listed, (sleeps(mark), listed)
        cancel = ["scancel", "-n", name]
        subprocess.run(cancel, env=slurm_cluster.env, check=True, timeout=30)
        proc.wait(30)
        wait_until(lambda: not sleeps(mark), END_S, "a task's sleep outlived the step")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in sleeps(mark):
            os.kill(pid, signal.SIGKILL)


def test_plugin_tasks_get_no_pid_namespace() -> None:
    """Slurm execs the plugin's tasks itself (the shim `setns`es them): they cannot enter
    a PID namespace, so the plugin's containers have none, and /proc is the host's."""
    from rankwire.runtime.plan import ContainerPlan, Mount
    from rankwire.spank import plan

    container = ContainerPlan(
        image="/i.sif",
        partition_offset=0,
        partition_size=1,
        image_drivers=("squashfuse_ll",),
        overlay_drivers=("kernel",),
        writable=False,
        uid_map=(1, 1, 1),
        gid_map=(1, 1, 1),
        namespaces=("user", "mount", "pid"),
        mounts=(Mount("proc", "/proc"),),
        tmpfs_size_mib=16,
        extract_dir="/x",
        cache_dir="/c",
    )
    assert plan.for_tasks(container).namespaces == ("user", "mount")
    assert plan.enforced(plan.for_tasks(container)).namespaces == ("mount",)


def test_pmix_dir_of_a_killed_launcher_is_pruned_at_the_next_start(
    base_image: Path, runner: User, out: IO[str]
) -> None:
    """SIGKILL leaves the launcher no chance to remove $TMPDIR/rankwire-pmix-*: the next
    PMIx launch of the same user removes it (its lock went with the launcher)."""
    tmp = Path(tempfile.mkdtemp(prefix="own-tmp-"))
    tmp.chmod(0o1777)
    try:
        mark = marker()
        launch = ["env", f"TMPDIR={tmp}", "apptainer-mpirun", "-n", "1", "--pmi", "pmix"]
        proc = start(runner, [*launch, str(base_image), "/bin/sh", "-c", f"exec sleep {mark}"], out)
        wait_until(lambda: len(sleeps(mark)) == 1, 30, "the rank started")
        left = list(tmp.glob("rankwire-pmix-*"))
        command = the_command(proc, runner)
        os.kill(command, signal.SIGKILL)
        ended(proc, command, mark, out)
        assert [p for p in left if p.exists()] == left and len(left) == 1
        again = runner.run([*launch, str(base_image), "/bin/true"], cwd="/tmp", timeout=60)
        assert again.returncode == 0, again.stderr
        assert list(tmp.glob("rankwire-pmix-*")) == []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
