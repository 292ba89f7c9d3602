"""`rankwire run` / `apptainer-mpirun`: real MPICH ranks wired by rankwire's PMI server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from harness.mpi import MpiPrograms, assert_hello
from harness.pmi import probes_by_rank
from harness.procs import child_of
from harness.users import User

pytestmark = [pytest.mark.mpi, pytest.mark.usefixtures("nothing_left_behind")]


def rw(runner: User, *args: str, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("cwd", "/tmp")
    kw.setdefault("timeout", 60)
    return runner.run(list(args), **kw)


@pytest.mark.parametrize("transport", ["fd", "port"])
def test_host_mpich_hello(transport: str, mpi_programs: MpiPrograms, runner: User) -> None:
    proc = rw(
        runner,
        "rankwire",
        "run",
        "-n",
        "4",
        "--pmi-transport",
        transport,
        str(mpi_programs.hello_mpich),
    )
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 4)


@pytest.mark.parametrize("transport", ["fd", "port"])
def test_container_mpich_hello(transport: str, mpich_image: Path, runner: User) -> None:
    proc = rw(
        runner,
        "apptainer-mpirun",
        "-n",
        "4",
        "--pmi-transport",
        transport,
        str(mpich_image),
        "/opt/hello_mpich",
    )
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 4)


def test_ranks_share_one_container(mpich_image: Path, runner: User) -> None:
    proc = rw(
        runner,
        "apptainer-mpirun",
        "-n",
        "4",
        str(mpich_image),
        "stat",
        "-L",
        "-c",
        "%i",
        "/proc/self/ns/mnt",
    )
    assert proc.returncode == 0, proc.stderr
    inodes = proc.stdout.split()
    assert len(inodes) == 4 and len(set(inodes)) == 1
    assert inodes[0] != str(os.stat("/proc/self/ns/mnt").st_ino)


def test_runscript_as_ranks_and_tag_output(mpich_image: Path, runner: User) -> None:
    proc = rw(runner, "rankwire", "run", "-n", "3", "--tag-output", str(mpich_image))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3
    for line in lines:
        rank = line[1 : line.index("]")]
        assert line.startswith(f"[{rank}] hello rank={rank} size=3")
    assert_hello(proc.stdout, 3)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["exit-before-init", "1", "3"], 3, "rank 1 exited with 3"),
        (["abort", "2", "7"], 7, "rank 2 aborted the job (code 7)"),
    ],
)
def test_failing_rank_sets_the_exit_code(
    mpich_image: Path, runner: User, args, code, message
) -> None:
    t0 = time.monotonic()
    proc = rw(runner, "apptainer-mpirun", "-n", "4", str(mpich_image), "/opt/fail_mpich", *args)
    elapsed = time.monotonic() - t0
    assert proc.returncode == code, proc.stderr
    # MPICH may print its own abort line; ours is one whole line, once.
    ours = [line for line in proc.stderr.splitlines() if line.startswith("rankwire: ")]
    assert ours == [f"rankwire: {message}"], proc.stderr
    assert elapsed < 5, f"took {elapsed:.1f}s"


def _ready_ranks(proc: subprocess.Popen, n: int) -> list[int]:
    pids = []
    assert proc.stdout is not None
    while len(pids) < n:
        line = proc.stdout.readline()
        assert line, "the job ended before every rank was ready"
        if line.startswith("ready"):
            pids.append(int(line.split("pid=")[1]))
    return pids


def test_killed_rank_gives_128_plus_signal(mpi_programs: MpiPrograms, runner: User) -> None:
    proc = subprocess.Popen(
        runner.argv(["rankwire", "run", "-n", "3", str(mpi_programs.fail_mpich), "sleep", "60"]),
        cwd="/tmp",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pids = _ready_ranks(proc, 3)
    os.kill(pids[1], signal.SIGKILL)
    assert proc.wait(5) == 128 + signal.SIGKILL
    assert "exited with 137" in proc.stderr.read()


def test_sigterm_to_the_launcher_ends_every_rank(mpich_image: Path, runner: User) -> None:
    proc = subprocess.Popen(
        runner.argv(
            ["apptainer-mpirun", "-n", "3", str(mpich_image), "/opt/fail_mpich", "sleep", "60"]
        ),
        cwd="/tmp",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _ready_ranks(proc, 3)
    launcher = proc.pid if runner.uid == os.getuid() else child_of(proc.pid)
    os.kill(launcher, signal.SIGTERM)
    assert proc.wait(5) == 128 + signal.SIGTERM


def test_timeout_kills_the_job(mpi_programs: MpiPrograms, runner: User) -> None:
    proc = rw(
        runner,
        "rankwire",
        "run",
        "-n",
        "2",
        "--timeout",
        "1",
        str(mpi_programs.fail_mpich),
        "sleep",
        "60",
    )
    assert (proc.returncode, proc.stderr) == (
        124,
        "rankwire: the job ran longer than --timeout 1s: killed it\n",
    )


def test_fence_timeout_names_the_silent_rank(mpi_programs: MpiPrograms) -> None:
    proc = rw(
        User("self", os.getuid(), os.getgid(), ""),
        "rankwire",
        "run",
        "-n",
        "3",
        "--fence-timeout",
        "1",
        str(mpi_programs.fail_mpich),
        "silent",
        "2",
        "30",
    )
    assert proc.returncode == 1, proc.stderr
    assert (
        "rankwire: PMI fence failed: fence timed out after 1 s: no fence from rank 2"
        in proc.stderr.splitlines()
    ), proc.stderr


def test_dry_run_prints_the_launch_plan(mpich_image: Path) -> None:
    proc = rw(
        User("self", os.getuid(), os.getgid(), ""),
        "apptainer-mpirun",
        "-n",
        "2",
        "--dry-run",
        "--json",
        "-B",
        "/tmp:/scratch",
        str(mpich_image),
        "/opt/hello_mpich",
    )
    plan = json.loads(proc.stdout)
    assert plan["ntasks"] == 2 and plan["delegate"] is None
    assert [r["env"]["PMI_RANK"] for r in plan["ranks"]] == ["0", "1"]
    assert plan["process"]["argv"] == ["/opt/hello_mpich"]
    assert any(m["target"] == "/scratch" for m in plan["container"]["mounts"])


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["-n", "0", "/bin/true"], 2, "-n 0: the number of ranks must be at least 1"),
        (
            ["-n", "2", "/no/such/program"],
            127,
            "ranks 0-1: /no/such/program: no such file on this host: check the path",
        ),
        (
            ["-n", "2", "-B", "/tmp", "/bin/true"],
            2,
            "--bind shape a container: give an image (--image IMG) or drop them to run on the host",
        ),
        (
            ["-n", "2", "--image", "/nonexistent.sif", "/bin/true"],
            2,
            "image /nonexistent.sif not found: check the path",
        ),
    ],
)
def test_launcher_user_errors(args: list[str], code: int, message: str) -> None:
    proc = rw(User("self", os.getuid(), os.getgid(), ""), "rankwire", "run", *args)
    assert (proc.returncode, proc.stderr) == (code, f"rankwire: {message}\n")


@pytest.mark.slurm
def test_inside_an_allocation_it_delegates_to_srun(slurm_cluster, mpich_image: Path) -> None:
    proc = subprocess.run(
        [
            "salloc",
            "-n",
            "2",
            "rankwire",
            "run",
            "-v",
            "-n",
            "2",
            "--image",
            str(mpich_image),
            "/opt/hello_mpich",
        ],
        env=slurm_cluster.env,
        cwd="/tmp",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "delegating to srun --mpi=pmi2 -n 2" in proc.stderr
    assert_hello(proc.stdout, 2)


@pytest.mark.parametrize("version", ["1", "2"])
def test_pmi_probe_under_our_launcher(version: str) -> None:
    me = User("self", os.getuid(), os.getgid(), "")
    proc = rw(me, "rankwire", "run", "-n", "3", "rankwire", "pmi", "probe", version)
    assert proc.returncode == 0, proc.stderr
    results = probes_by_rank(proc.stdout)
    assert [r["rank"] for r in results] == [0, 1, 2]
    assert all(r["ok"] and r["size"] == 3 and r["version"] == int(version) for r in results)
    assert results[0]["process_mapping"] == "(vector,(0,1,3))"


MPI4PY_HELLO = """
from mpi4py import MPI
comm = MPI.COMM_WORLD
total = comm.allreduce(comm.rank + 1)
ok = "ok" if total == comm.size * (comm.size + 1) // 2 else "WRONG"
print(f"hello rank={comm.rank} size={comm.size} host={MPI.Get_processor_name()} sum={total} {ok}")
"""


def test_mpi4py_hello_on_the_host() -> None:
    import sys

    proc = rw(
        User("self", os.getuid(), os.getgid(), ""),
        "rankwire",
        "run",
        "-n",
        "4",
        sys.executable,
        "-c",
        MPI4PY_HELLO,
    )
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 4)


def test_run_in_signal_after_the_process_ended_does_not_fail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """scancel signals the task and `rankwire exec` at once (issue 13, FORWARD_RACE): a
    signal forwarded once the process is reaped must not raise ProcessLookupError."""
    from rankwire.runtime import instance
    from rankwire.runtime.plan import ProcessPlan

    real_waitpid = os.waitpid

    def waitpid_then_signalled(pid: int, options: int) -> tuple[int, int]:
        reaped = real_waitpid(pid, options)
        os.kill(os.getpid(), signal.SIGTERM)  # handled here, by run_in's forwarder
        return reaped

    monkeypatch.setattr(instance.os, "waitpid", waitpid_then_signalled)
    proc = ProcessPlan(argv=("/bin/true",), env=dict(os.environ), workdir="/")
    assert instance.run_in(None, proc) == 0  # type: ignore[arg-type]


def test_a_rank_error_is_said_once_for_all_ranks(base_image: Path, runner: User) -> None:
    """Issue 13, defect 8: N ranks that cannot start give one line naming them, not N."""
    proc = rw(runner, "apptainer-mpirun", "-n", "4", str(base_image), "/nope")
    assert proc.returncode == 127, proc.stderr
    assert proc.stderr == (
        "rankwire: ranks 0-3: /nope: no such file in the container: check the path, or bind "
        "it in with -B\n"
    )
    proc = rw(runner, "rankwire", "run", "-n", "3", "--tag-output", "/nope")
    assert proc.returncode == 127, proc.stderr
    assert proc.stderr == "rankwire: ranks 0-2: /nope: no such file on this host: check the path\n"


def test_a_rank_holds_its_stdio_and_pmi_socket_only(base_image: Path, runner: User) -> None:
    """Ranks enter the container through the front end's `__enter`, which the launcher
    hands its namespace descriptors, the pid pipe and its errors pipe: the rank keeps none
    of them, only fds 0-2 and its PMI_FD (what `ls` of its shell's fds shows)."""
    script = 'ls /proc/$$/fd; echo "pmi=$PMI_FD"'
    proc = rw(runner, "apptainer-mpirun", "-n", "1", str(base_image), "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    *fds, pmi = proc.stdout.split()
    assert sorted(fds, key=int) == ["0", "1", "2", pmi.removeprefix("pmi=")], proc.stdout


def test_the_containers_preload_is_not_the_host_loaders(base_image: Path, runner: User) -> None:
    """The front end that takes a rank in (`__enter`) runs on the host with the launcher's
    environment; the rank's, `LD_PRELOAD` of a library only the container has, say, reaches
    only the rank: the one loader that cannot find this one says so once, not twice."""
    missing = "/nonexistent/libpreload.so"
    proc = rw(
        runner,
        "apptainer-mpirun",
        "-n",
        "1",
        "--env",
        f"LD_PRELOAD={missing}",
        str(base_image),
        "sh",
        "-c",
        "exit 0",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count(f"object '{missing}' from LD_PRELOAD cannot be preloaded") == 1, (
        proc.stderr
    )
