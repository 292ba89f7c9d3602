"""The launcher's up-front checks and after-the-job report (issue 13: defects 3 and 5b).

A PMI forced that the image's MPI cannot speak is refused before anything starts; a job of
N > 1 MPI ranks of which none ever spoke to our PMI server fails with one line; a job that
needs more open files than RLIMIT_NOFILE allows is refused with how many ranks fit.
"""

from __future__ import annotations

import os
import resource
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.users import User
from rankwire.errors import UserError
from rankwire.launcher import plan as launch_plan
from rankwire.launcher.execute import execute
from rankwire.launcher.plan import LaunchOptions, host_process, plan_launch

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
