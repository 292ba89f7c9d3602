"""The launcher's up-front checks and after-the-job report (issue 13: defects 3 and 5b).

A PMI forced that the image's MPI cannot speak is refused before anything starts; a job of
N > 1 MPI ranks of which none ever spoke to our PMI server fails with one line; a job that
needs more open files than RLIMIT_NOFILE allows is refused with how many ranks fit.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Optional

import pytest

from harness.users import User
from rankwire.errors import UserError
from rankwire.launcher import plan as launch_plan
from rankwire.launcher.execute import ABORT_GRACE_S, _Job, execute, pmi_server
from rankwire.launcher.plan import LaunchOptions, host_process, plan_launch
from rankwire.pmi.job import FenceFailed
from rankwire.pmi.server import Aborted, ProtocolViolation, RankLost

clean = pytest.mark.usefixtures("nothing_left_behind")


def rw(runner: User, *args: str, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("cwd", "/tmp")
    kw.setdefault("timeout", 60)
    return runner.run(list(args), **kw)


MPICH_REFUSED = (
    "apptainer-mpirun: --pmi pmix: the image's MPI (MPICH, without libpmix) speaks "
    "PMI-1/PMI-2 only: use --pmi auto or --pmi pmi2\n"
)


@clean
@pytest.mark.mpi
def test_mpich_image_forced_to_pmix_is_refused(mpich_image: Path, runner: User) -> None:
    proc = rw(
        runner, "apptainer-mpirun", "-n", "2", "--pmi", "pmix", str(mpich_image), "/opt/hello_mpich"
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", MPICH_REFUSED)


@clean
@pytest.mark.mpi
@pytest.mark.parametrize("pmi", ["pmi1", "pmi2"])
def test_ompi_image_forced_to_pmi1_is_refused(ompi_image: Path, runner: User, pmi: str) -> None:
    proc = rw(
        runner, "apptainer-mpirun", "-n", "2", "--pmi", pmi, str(ompi_image), "/opt/hello_ompi"
    )
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (
        f"apptainer-mpirun: --pmi {pmi}: the image's MPI (Open MPI, or one linked with "
        "libpmix) speaks PMIx only: use --pmi auto or --pmi pmix\n"
    )


@clean
@pytest.mark.mpi
def test_a_non_mpi_command_in_an_mpi_image_runs_unchecked(mpich_image: Path) -> None:
    """`/bin/true` links no MPI: it never connects, and that is fine."""
    proc = rw(
        User("self", os.getuid(), os.getgid(), ""),
        "apptainer-mpirun",
        "-n",
        "2",
        str(mpich_image),
        "/bin/true",
    )
    assert (proc.returncode, proc.stderr) == (0, "")


def test_planner_refuses_a_pmi_the_program_cannot_speak() -> None:
    """The program's own MPI decides over the image's (an image may hold both)."""
    proc = host_process(["/opt/a.out"], {}, "/")
    with pytest.raises(UserError, match=r"^--pmi pmi2: the program's MPI \(Open MPI"):
        plan_launch(LaunchOptions(ntasks=2, pmi="pmi2"), proc, None, {}, [], "both", "pmix")
    plan = plan_launch(LaunchOptions(ntasks=2), proc, None, {}, [], "both", "pmix")
    assert (plan.pmi, plan.expect_pmi) == ("pmix", True)
    plan = plan_launch(LaunchOptions(ntasks=2, pmi="pmix"), proc, None, {}, [], "both", None)
    assert (plan.pmi, plan.expect_pmi) == ("pmix", False)


def _singleton_job(argv: list[str], program_kind: str | None, transport: str = "fd") -> int:
    proc = host_process(argv, dict(os.environ), "/tmp")
    opts = LaunchOptions(ntasks=3, pmi_transport=transport)
    return execute(plan_launch(opts, proc, None, {}, [], program_kind, program_kind))


@clean
def test_mpi_ranks_that_never_connect_fail_the_job(capfd: pytest.CaptureFixture[str]) -> None:
    """The facts say the program links MPICH, yet no rank speaks PMI: 3 singletons."""
    assert _singleton_job(["/bin/true"], "pmi1/2") == 1
    assert capfd.readouterr().err == (
        "rankwire: none of the 3 ranks connected to the PMI-1/PMI-2 server: each ran alone "
        "as an MPI job of size 1: use the PMI their MPI speaks (--pmi auto) and keep the "
        "PMI_*/PMIX_* variables in their environment\n"
    )


@clean
def test_non_mpi_ranks_that_never_connect_are_fine(capfd: pytest.CaptureFixture[str]) -> None:
    assert _singleton_job(["/bin/true"], None) == 0
    assert capfd.readouterr().err == ""


@clean
def test_a_job_gives_the_caller_its_signal_handlers_back() -> None:
    """The executor forwards signals to the ranks while they run; after, the caller's own
    handlers are back (asyncio alone would leave SIG_DFL: a test session's SIGTERM
    handler, gone, let the next SIGTERM kill it without its teardown)."""
    from rankwire.launcher.execute import FORWARDED_SIGNALS

    def mine(signum: int, frame: object) -> None:
        pass

    before = {sig: signal.signal(sig, mine) for sig in FORWARDED_SIGNALS}
    try:
        assert _singleton_job(["/bin/true"], None) == 0
        assert {sig: signal.getsignal(sig) for sig in FORWARDED_SIGNALS} == {
            sig: mine for sig in FORWARDED_SIGNALS
        }
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


@clean
@pytest.mark.mpi
@pytest.mark.parametrize("transport", ["fd", "port"])
def test_mpi_ranks_that_connect_are_not_singletons(
    mpi_programs, capfd: pytest.CaptureFixture[str], transport: str
) -> None:
    assert _singleton_job([str(mpi_programs.hello_mpich)], "pmi1/2", transport) == 0
    assert capfd.readouterr().err == ""


def _nofile(soft: int, hard: int) -> Callable[[], None]:
    """A preexec_fn: the launcher starts under this RLIMIT_NOFILE."""
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@clean
def test_too_many_ranks_for_the_open_files_limit(base_image: Path, runner: User) -> None:
    proc = rw(
        runner,
        "apptainer-mpirun",
        "-n",
        "300",
        str(base_image),
        "/bin/true",
        preexec_fn=_nofile(256, 256),
    )
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (
        "apptainer-mpirun: -n 300 needs about 620 open files but the limit is 256: raise it "
        "with ulimit -n or use at most 118 ranks\n"
    )
    proc = rw(
        runner,
        "apptainer-mpirun",
        "-n",
        "118",
        str(base_image),
        "/bin/true",
        preexec_fn=_nofile(256, 256),
    )
    assert (proc.returncode, proc.stderr) == (0, "")


@clean
def test_soft_open_files_limit_is_raised_to_the_hard_one(base_image: Path, runner: User) -> None:
    """Like mpirun: a low soft limit under a high hard one is no reason to refuse."""
    proc = rw(
        runner,
        "apptainer-mpirun",
        "-n",
        "300",
        "--tag-output",
        str(base_image),
        "/bin/sh",
        "-c",
        "ulimit -n",
        preexec_fn=_nofile(256, 4096),
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    assert set(proc.stdout.splitlines()) == {f"[{r}] 4096" for r in range(300)}


def test_planner_open_files() -> None:
    assert launch_plan.plan_open_files(100, False, (1024, 4096)) is None
    assert launch_plan.plan_open_files(600, False, (1024, 4096)) == 4096
    with pytest.raises(
        UserError,
        match=r"^-n 300 needs about 1220 open files but the limit "
        r"is 1024: raise it with ulimit -n or use at most 251 ranks$",
    ):
        launch_plan.plan_open_files(300, True, (1024, 1024))
    with pytest.raises(UserError, match=r"limit is 10: raise it with ulimit -n$"):
        launch_plan.plan_open_files(2, False, (10, 10))


# -- the launcher's exit decisions, unit by unit (no rank runs; `make mutants` runs these) ---
def _decisions(pmi: str, script: Callable[[_Job], Awaitable[None]]) -> tuple[Optional[int], str]:
    """Run `script` against a _Job of 3 ranks that never starts; (failure, its stderr)."""
    import io
    import sys

    kind = "pmix" if pmi == "pmix" else "pmi1/2"
    proc = host_process(["/bin/true"], {}, "/tmp")
    plan = plan_launch(LaunchOptions(ntasks=3, pmi=pmi), proc, None, {}, [], kind, kind)
    err = io.StringIO()

    async def main() -> Optional[int]:
        job = _Job(plan, None, pmi_server(plan))
        try:
            await script(job)
            return job.failure
        finally:
            os.close(job.errors_r)
            os.close(job.errors_w)

    real, sys.stderr = sys.stderr, err
    try:
        failure = asyncio.run(main())
    finally:
        sys.stderr = real
    return failure, err.getvalue()


async def _events(job: _Job, *events: object) -> None:
    """Feed `events` to the job's event loop as if its PMI server had sent them."""
    queue: asyncio.Queue[object] = asyncio.Queue()
    for e in events:
        queue.put_nowait(e)
    job.server.wait_event = queue.get  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(job.watch_events())
    while not queue.empty():
        await asyncio.sleep(0)
    await asyncio.sleep(ABORT_GRACE_S + 0.1)  # held failures settle
    task.cancel()


@pytest.mark.parametrize("pmi", ["pmi2", "pmix"])
def test_exit_decision_an_abort_fails_the_job_with_its_code(pmi: str) -> None:
    aborted = _decisions(pmi, lambda job: _events(job, Aborted(1, 7, "boom")))
    assert aborted == (7, "rankwire: rank 1 aborted the job (code 7): boom\n")
    zero = _decisions(pmi, lambda job: _events(job, Aborted(2, 0, "")))
    assert zero == (1, "rankwire: rank 2 aborted the job (code 0)\n")


def test_exit_decision_first_failure_wins() -> None:
    async def two(job: _Job) -> None:
        job.fail(3, "first")
        job.fail(5, "second")
        assert job.tearing_down

    assert _decisions("pmi2", two) == (3, "rankwire: first\n")
    both = _decisions("pmi2", lambda job: _events(job, Aborted(0, 4, ""), Aborted(1, 9, "")))
    assert both == (4, "rankwire: rank 0 aborted the job (code 4)\n")


def test_exit_decision_held_failures_in_order() -> None:
    lost = "closed its PMI connection before finalize and runs on: the other ranks cannot "
    why = (
        "complete the job without it (a rank must keep its PMI_FD/PMI_PORT connection open "
        "until MPI_Finalize)\n"
    )

    async def rank_lost_and_running(job: _Job) -> None:
        job.pids[1] = 2**22 + 1  # "still running": above pid_max, so signals find no one
        await _events(job, RankLost(1))

    async def exit_then_fence(job: _Job) -> None:
        job.exit_pending = (2, 3)
        await _events(job, FenceFailed((2,), "fence cannot complete: rank 2 exited", False, (0,)))

    async def fence_only(job: _Job) -> None:
        await _events(job, FenceFailed((2,), "no fence from rank 2", False, (0, 1)))
        assert not job.told_fence_failed(0)

    async def fence_timeout(job: _Job) -> None:
        await _events(job, FenceFailed((2,), "fence timed out", True, (0, 1)))

    async def abort_after_fence_failure(job: _Job) -> None:
        fence = FenceFailed((2,), "no fence from rank 2", False, (0, 1))
        job.fence_pending = fence
        assert job.told_fence_failed(0) and not job.told_fence_failed(2)
        await _events(job, Aborted(0, 1, "MPI error"))

    async def not_started(job: _Job) -> None:
        job.not_started["no such program"] = [1]
        job.exit_pending = (1, 127)
        job.settle()

    assert _decisions("pmi2", rank_lost_and_running) == (1, f"rankwire: rank 1 {lost}{why}")
    assert _decisions("pmi2", exit_then_fence) == (3, "rankwire: rank 2 exited with 3\n")
    assert _decisions("pmi2", fence_only) == (
        1, "rankwire: PMI fence failed: no fence from rank 2\n"
    )  # fmt: skip
    assert _decisions("pmi2", fence_timeout) == (1, "rankwire: PMI fence failed: fence timed out\n")
    assert _decisions("pmi2", abort_after_fence_failure) == (
        1, "rankwire: PMI fence failed: no fence from rank 2\n"
    )  # fmt: skip
    assert _decisions("pmi2", not_started) == (127, "")
    assert _decisions("pmi2", lambda job: _events(job, RankLost(1))) == (None, "")  # exited


def test_exit_decision_a_failed_exit_is_held_for_an_abort() -> None:
    async def exits(job: _Job) -> None:
        child = subprocess.Popen(["/bin/sh", "-c", "exit 3"])
        job.pids[0] = child.pid
        job.reaped(0, child.pid, os.pidfd_open(child.pid))
        child.returncode = 3  # reaped by the job
        assert job.exit_pending == (0, 3) and job.failure is None
        await _events(job, Aborted(0, 5, ""))

    assert _decisions("pmi2", exits) == (5, "rankwire: rank 0 aborted the job (code 5)\n")


def test_planner_open_files_boundaries() -> None:
    """20 + 2 per rank (4 with --tag-output): exactly the soft limit needs no change,
    exactly the hard one raises the soft limit to it, one more is refused."""
    assert launch_plan.plan_open_files(502, False, (1024, 2048)) is None  # 1024 needed
    assert launch_plan.plan_open_files(503, False, (1024, 2048)) == 2048  # 1026
    assert launch_plan.plan_open_files(251, True, (1000, 1024)) == 1024  # 1024
    with pytest.raises(UserError) as err:
        launch_plan.plan_open_files(252, True, (1000, 1024))  # 1028
    assert str(err.value) == (
        "-n 252 needs about 1028 open files but the limit is 1024: raise it with ulimit -n "
        "or use at most 251 ranks"
    )
    with pytest.raises(UserError) as err:
        launch_plan.plan_open_files(1, True, (23, 23))  # 24: not even one rank fits
    assert str(err.value) == (
        "-n 1 needs about 24 open files but the limit is 23: raise it with ulimit -n"
    )
    with pytest.raises(UserError) as err:
        launch_plan.plan_open_files(2, True, (24, 24))  # 28: one rank fits
    assert str(err.value) == (
        "-n 2 needs about 28 open files but the limit is 24: raise it with ulimit -n or use "
        "at most 1 ranks"
    )


def test_planner_defaults_limits_and_previews() -> None:
    import dataclasses

    assert LaunchOptions() == LaunchOptions(1, "auto", "fd", False, None, None, 3.0, False, False)
    assert (launch_plan.MAX_RANKS, launch_plan.MAX_LOCAL_RANKS) == (2147483647, 4194304)
    with pytest.raises(dataclasses.FrozenInstanceError):
        LaunchOptions().ntasks = 2  # type: ignore[misc]
    proc = host_process(["/bin/true"], {"PMI_RANK": "3", "X": "1"}, "/tmp")
    assert proc.no_new_privs is False
    one = plan_launch(LaunchOptions(), proc, None, {}, [])
    assert (one.stdin_rank, one.expect_pmi, one.open_files) == (0, False, None)
    assert one.process.env == {"X": "1"}  # the caller's wire-up is not the ranks'
    assert one.slurm_job is None and one.delegate is None
    for opts, message in (
        (LaunchOptions(ntasks=0), "-n 0: the number of ranks must be at least 1"),
        (LaunchOptions(ntasks=2**31), "-n 2147483648: at most 2147483647 ranks (an MPI rank is "
         "a C int); give a smaller -n"),
        (LaunchOptions(ntasks=2**22 + 1), "-n 4194305: one host runs at most 4194304 "
         "processes (the kernel's PID_MAX_LIMIT): run it across nodes in a Slurm allocation"),
        (LaunchOptions(pmi="pmi3"), "--pmi pmi3: choose one of auto, pmi1, pmi2, pmix"),
        (LaunchOptions(timeout=0), "--timeout 0: give a positive, finite number of seconds "
         "(or leave --timeout out: no limit)"),
        (LaunchOptions(fence_timeout=float("inf")), "--fence-timeout inf: give a positive, "
         "finite number of seconds (or leave --fence-timeout out: no limit)"),
    ):  # fmt: skip
        with pytest.raises(UserError) as err:
            plan_launch(opts, proc, None, {}, [])
        assert str(err.value) == message
    plan_launch(LaunchOptions(ntasks=2**22, timeout=0.1, fence_timeout=0.1), proc, None, {}, [])
    big = plan_launch(LaunchOptions(ntasks=2**31 - 1), proc, None, {"SLURM_JOB_ID": "9"}, [])
    assert big.delegate == ("srun", "--mpi=pmi2", "-n", "2147483647", "/bin/true")
    timed = LaunchOptions(ntasks=2, pmi="pmix", tag_output=True, timeout=61, no_slurm=False)
    srun = plan_launch(timed, proc, None, {"SLURM_JOB_ID": "9"}, ["rankwire", "exec", "i.sif"])
    assert srun.delegate == (
        "srun", "--mpi=pmix", "-n", "2", "--label", "--time=2", "rankwire", "exec", "i.sif",
        "/bin/true",
    )  # fmt: skip
    assert launch_plan.describe(srun) == (
        "inside Slurm job 9: delegating to srun --mpi=pmix -n 2 --label --time=2 rankwire "
        "exec i.sif /bin/true"
    )
    assert srun.to_dict()["ranks"] == []
    local = plan_launch(dataclasses.replace(timed, no_slurm=True), proc, None, {}, [], "pmix")
    assert local.expect_pmi is False  # the program's own kind is unknown
    assert launch_plan.describe(local) == (
        "launching 2 rank(s) on the host, PMIx server (libpmix, in a helper process) over "
        "127.0.0.1 TCP"
    )
    assert local.to_dict()["ranks"][1] == {"rank": 1, "env": {
        "PMIX_RANK": "1", "PMIX_NAMESPACE": "<job namespace>",
        "PMIX_SERVER_URI*": "tcp4://127.0.0.1:<port>", "FLUX_JOB_ID": "<job id>",
    }}  # fmt: skip
    fd = plan_launch(LaunchOptions(ntasks=2), proc, None, {}, [], None, "pmi1/2")
    assert (fd.pmi, fd.expect_pmi) == ("pmi2", True)
    assert launch_plan.describe(fd) == (
        "launching 2 rank(s) on the host, PMI-1/PMI-2 server over inherited socketpairs"
    )
    assert fd.to_dict()["ranks"][0]["env"] == {
        "PMI_RANK": "0", "PMI_SIZE": "2", "PMI_FD": "<socketpair, inherited>"
    }  # fmt: skip
    port = plan_launch(LaunchOptions(ntasks=2, pmi_transport="port"), proc, None, {}, [])
    assert launch_plan.describe(port) == (
        "launching 2 rank(s) on the host, PMI-1/PMI-2 server over 127.0.0.1 TCP"
    )
    assert port.to_dict()["ranks"][1]["env"] == {
        "PMI_RANK": "1", "PMI_SIZE": "2", "PMI_PORT": "127.0.0.1:<port>",
        "PMI_ID": "<per-rank id>",
    }  # fmt: skip


def test_exit_decision_first_failed_exit_wins_and_signals_reach_the_pmi_core() -> None:
    told: list[tuple[int, int]] = []

    async def exits(job: _Job) -> None:
        job.server.rank_exited = lambda rank, code: told.append((rank, code))  # type: ignore[method-assign]
        for rank, script in ((0, "exit 3"), (1, "kill -9 $$"), (2, "exit 4")):
            child = subprocess.Popen(["/bin/sh", "-c", script])
            os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
            job.pids[rank] = child.pid
            job.reaped(rank, child.pid, os.pidfd_open(child.pid))
            child.returncode = 0  # reaped by the job
        await asyncio.sleep(ABORT_GRACE_S + 0.1)

    assert _decisions("pmi2", exits) == (3, "rankwire: rank 0 exited with 3\n")
    assert told == [(0, 3), (1, -9), (2, 4)]


def test_exit_decision_a_fence_failed_by_an_exit_is_judged_at_once() -> None:
    async def fence_after_exit(job: _Job) -> None:
        job.exit_pending = (2, 3)
        queue: asyncio.Queue[object] = asyncio.Queue()
        queue.put_nowait(FenceFailed((2,), "fence cannot complete: rank 2 exited", False, (0,)))
        job.server.wait_event = queue.get  # type: ignore[method-assign,assignment]
        task = asyncio.create_task(job.watch_events())
        for _ in range(5):
            await asyncio.sleep(0)
        assert job.failure == 3  # not held for ABORT_GRACE_S
        task.cancel()

    assert _decisions("pmi2", fence_after_exit) == (3, "rankwire: rank 2 exited with 3\n")


def test_planner_checks_open_files_only_for_a_local_launch() -> None:
    import dataclasses

    proc = host_process(["/bin/true"], {}, "/tmp")
    local = plan_launch(LaunchOptions(ntasks=600), proc, None, {}, [], None, None, (1024, 4096))
    assert local.open_files == 4096
    srun = plan_launch(LaunchOptions(ntasks=600), proc, None, {"SLURM_JOB_ID": "9"}, [],
                       None, None, (1024, 4096))  # fmt: skip
    assert srun.open_files is None  # srun's tasks are not our children
    one = plan_launch(LaunchOptions(ntasks=1), proc, None, {}, [], None, "pmi1/2")
    assert one.expect_pmi is False  # a job of one is a singleton anyway
    fields = {f.name: f.default for f in dataclasses.fields(one)}
    assert (fields["stdin_rank"], fields["expect_pmi"], fields["open_files"]) == (0, False, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        one.ntasks = 2  # type: ignore[misc]


def test_exit_decision_while_tearing_down_and_on_malformed_requests() -> None:
    async def exits_during_teardown(job: _Job) -> None:
        job.on_signal(signal.SIGTERM)  # no rank yet: only the teardown starts
        child = subprocess.Popen(["/bin/sh", "-c", "exit 143"])
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        job.pids[0] = child.pid
        job.reaped(0, child.pid, os.pidfd_open(child.pid))
        child.returncode = 0  # reaped by the job
        assert job.exit_pending is None  # nothing held: the failure is this exit's

    assert _decisions("pmi2", exits_during_teardown) == (143, "")
    malformed = (ProtocolViolation(None, "no cmd"), ProtocolViolation(1, "bad key"))
    assert _decisions("pmi2", lambda job: _events(job, *malformed)) == (
        None,
        "rankwire: a rank sent a malformed PMI request: no cmd\n"
        "rankwire: rank 1 sent a malformed PMI request: bad key\n",
    )


def test_planner_oversubscribed_ranks_yield_when_idle() -> None:
    """More ranks than CPUs on a local launch: the plan says so, and Open MPI's ranks (the
    PMIx ones) get OMPI_MCA_mpi_yield_when_idle=1, as mpirun's do; a value already in
    their environment is kept; srun's tasks and an unknown CPU count are left alone."""
    proc = host_process(["/bin/true"], {"X": "1"}, "/tmp")
    yields = {"X": "1", "OMPI_MCA_mpi_yield_when_idle": "1"}

    def planned(n: int, pmi: str, cpus: Optional[int], environ: Optional[dict] = None,
                p=proc) -> tuple[bool, dict]:  # fmt: skip
        got = plan_launch(LaunchOptions(ntasks=n, pmi=pmi), p, None, environ or {}, [],
                          cpus=cpus)  # fmt: skip
        return got.oversubscribed, got.process.env

    assert planned(3, "pmix", 2) == (True, yields)
    assert planned(2, "pmix", 2) == (False, {"X": "1"})
    one = plan_launch(LaunchOptions(ntasks=2, pmi="pmix"), proc, None, {}, [], cpus=2)
    assert planned(3, "pmix", None) == (False, {"X": "1"})
    assert planned(3, "pmi2", 2) == (True, {"X": "1"})  # MPICH: nothing to tell it
    assert planned(3, "pmix", 2, {"SLURM_JOB_ID": "9"}) == (False, {"X": "1"})
    theirs = host_process(["/bin/true"], {"OMPI_MCA_mpi_yield_when_idle": "0"}, "/tmp")
    assert planned(3, "pmix", 2, p=theirs) == (True, {"OMPI_MCA_mpi_yield_when_idle": "0"})
    told = plan_launch(LaunchOptions(ntasks=3, pmi="pmix"), proc, None, {}, [], cpus=1)
    assert launch_plan.describe_oversubscription(told) == (
        "3 ranks on fewer CPUs (OMPI_MCA_mpi_yield_when_idle=1: Open MPI's ranks yield when idle)"
    )
    assert told.to_dict()["oversubscribed"] is True
    kept = plan_launch(LaunchOptions(ntasks=3, pmi="pmix"), theirs, None, {}, [], cpus=1)
    assert launch_plan.describe_oversubscription(kept) == (
        "3 ranks on fewer CPUs (OMPI_MCA_mpi_yield_when_idle=0 kept, as the ranks' "
        "environment sets it)"
    )
    mpich = plan_launch(LaunchOptions(ntasks=3, pmi="pmi1"), proc, None, {}, [], cpus=1)
    assert launch_plan.describe_oversubscription(mpich) == (
        "3 ranks on fewer CPUs (their MPI is not told: only Open MPI has a setting for it)"
    )
    assert launch_plan.describe_oversubscription(one) is None


@clean
@pytest.mark.mpi
def test_ranks_on_fewer_cpus_are_told_to_yield(runner: User) -> None:
    """A real launch on one CPU (taskset): each of 2 PMIx ranks sees the variable; one
    rank on it does not."""
    show = ["sh", "-c", 'echo "$PMIX_RANK=${OMPI_MCA_mpi_yield_when_idle-unset}"']
    two = rw(runner, "taskset", "-c", "0", "rankwire", "run", "--pmi", "pmix", "-n", "2", *show)
    assert (two.returncode, sorted(two.stdout.split()), two.stderr) == (0, ["0=1", "1=1"], "")
    one = rw(runner, "taskset", "-c", "0", "rankwire", "run", "--pmi", "pmix", "-n", "1", *show)
    assert (one.returncode, one.stdout, one.stderr) == (0, "0=unset\n", "")


def test_planner_tells_open_mpi_ob1_on_a_node_without_fabric_or_gpu() -> None:
    """A local launch of PMIx (Open MPI) ranks on a node with no fabric adapter and no GPU:
    OMPI_MCA_pml=ob1 (what Open MPI's own search would end with, without opening the cm
    components' hardware libraries); not when the ranks' environment picks a pml or an
    mtl, not for MPICH, not when delegated to srun, not when the node was not looked at
    or has an adapter or a GPU."""
    proc = host_process(["/bin/true"], {"X": "1"}, "/tmp")

    def planned(pmi: str = "pmix", free: Optional[bool] = True, environ: Optional[dict] = None,
                p=proc) -> tuple[bool, Optional[str]]:  # fmt: skip
        got = plan_launch(LaunchOptions(ntasks=2, pmi=pmi), p, None, environ or {}, [],
                          cpus=2, fabric_free=free)  # fmt: skip
        return got.pml_ob1, got.process.env.get("OMPI_MCA_pml")

    assert planned() == (True, "ob1")
    assert planned(free=None) == (False, None)
    assert planned(free=False) == (False, None)
    assert planned("pmi2") == (False, None)
    assert planned(environ={"SLURM_JOB_ID": "9"}) == (False, None)
    ucx = host_process(["/bin/true"], {"OMPI_MCA_pml": "ucx"}, "/tmp")
    assert planned(p=ucx) == (False, "ucx")
    psm2 = host_process(["/bin/true"], {"OMPI_MCA_mtl": "psm2"}, "/tmp")
    assert planned(p=psm2) == (False, None)
    files = host_process(["/bin/true"], {"OMPI_MCA_mca_base_param_files": "/p.conf"}, "/tmp")
    assert planned(p=files) == (False, None)
    told = plan_launch(LaunchOptions(ntasks=2, pmi="pmix"), proc, None, {}, [], fabric_free=True)
    assert launch_plan.describe_pml(told) == (
        "OMPI_MCA_pml=ob1: no fabric adapter or GPU on this node, so Open MPI's ranks skip "
        "probing for them (set OMPI_MCA_pml or OMPI_MCA_mtl to choose otherwise)"
    )
    assert told.to_dict()["pml_ob1"] is True
    assert launch_plan.LaunchPlan.from_dict(told.to_dict()) == told
    mpich = plan_launch(LaunchOptions(ntasks=2, pmi="pmi1"), proc, None, {}, [], fabric_free=True)
    assert launch_plan.describe_pml(mpich) is None


def test_a_node_with_an_adapter_or_a_gpu_is_not_fabric_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rankwire.fabric import hostfacts
    from rankwire.fabric.hostfacts import Adapter, FabricHostFacts
    from rankwire.launcher.facts import fabric_free

    monkeypatch.setattr(hostfacts, "GPU_SIGNS", (str(tmp_path / "nvidiactl"),))
    nothing = FabricHostFacts((), (), None)
    assert fabric_free(nothing) is True
    no_driver = Adapter("mlx5", "", "ConnectX-6", "0000:3b:00.0", "", "", "", "", "", ())
    assert fabric_free(FabricHostFacts((no_driver,), (), None)) is False  # a known PCI function
    assert fabric_free(FabricHostFacts((), ("/dev/infiniband/uverbs0",), None)) is False
    (tmp_path / "nvidiactl").touch()
    assert fabric_free(nothing) is False  # a GPU


@clean
@pytest.mark.mpi
def test_open_mpi_ranks_are_told_ob1_where_the_node_has_no_fabric(runner: User) -> None:
    """A real launch: where this node has no fabric adapter and no GPU, each PMIx rank sees
    OMPI_MCA_pml=ob1 and -v says why; a pml or mtl in the ranks' environment is theirs."""
    from rankwire.launcher.facts import fabric_free

    if not fabric_free():
        pytest.skip("this node has a fabric adapter or a GPU: Open MPI chooses for itself")
    show = ["sh", "-c", 'echo "$PMIX_RANK=${OMPI_MCA_pml-unset}"']
    told = rw(runner, "rankwire", "run", "-v", "--pmi", "pmix", "-n", "2", *show)
    assert (told.returncode, sorted(told.stdout.split())) == (0, ["0=ob1", "1=ob1"])
    said = [line for line in told.stderr.splitlines() if "OMPI_MCA_pml" in line]
    assert said == [
        "rankwire: OMPI_MCA_pml=ob1: no fabric adapter or GPU on this node, so Open MPI's "
        "ranks skip probing for them (set OMPI_MCA_pml or OMPI_MCA_mtl to choose otherwise)"
    ]
    for _ in range(2):  # planned and kept, then from the kept plan
        plain = rw(runner, "rankwire", "run", "--pmi", "pmix", "-n", "2", *show)
        assert (plain.returncode, sorted(plain.stdout.split()), plain.stderr) == (
            0,
            ["0=ob1", "1=ob1"],
            "",
        )
    theirs = rw(runner, "env", "OMPI_MCA_mtl=ofi", "rankwire", "run", "--pmi", "pmix", "-n",
                "2", *show)  # fmt: skip
    assert (theirs.returncode, sorted(theirs.stdout.split()), theirs.stderr) == (
        0,
        ["0=unset", "1=unset"],
        "",
    )
