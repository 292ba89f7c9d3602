"""A Python MPI application's own test suite, run in a container as one MPI job.

The image (`python_mpi_image`) holds Debian's python3, mpi4py built against Debian's MPICH
4.0 (PMI-1 only), pytest and pytest-mpi; /opt/tests is examples/pytest_mpi (collectives,
a 4 MiB ring exchange and pairwise 4 MiB send/recv, all `@pytest.mark.mpi(min_size=2)`).
Every rank runs pytest and prints its own report; the test reads each rank's lines (the
launcher's `--tag-output`, srun's `--label`) and asserts on rank 0's summary, plus each
rank's `rank: R` / `size: 4` from pytest-mpi's "MPI Information" section: singletons
would show `size: 1` and skip every test (min_size=2), as the `--pmi-bridge off` row shows.
Rows: `apptainer-mpirun -n 4`; `srun --mpi=pmi2` (matched PMI); `srun --mpi=pmix` with
`rankwire exec --pmi-bridge auto` (bridged) and with `--pmi-bridge off` (singletons).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from harness.slurm import SlurmCluster, without_queue_lines
from harness.users import User

pytestmark = [pytest.mark.mpi, pytest.mark.usefixtures("nothing_left_behind")]

N = 4
TESTS = 6  # the tests of examples/pytest_mpi/test_collectives.py
PYTEST = ["python3", "-m", "pytest", "--with-mpi", "-q", "-p", "no:cacheprovider", "/opt/tests"]
SUMMARY = re.compile(rf"{TESTS} passed in \d+\.\d+s")
PROGRESS = re.compile(rf"\.{{{TESTS}}} +\[100%\]")  # one dot per passed test
TAGGED = re.compile(r"\[(\d+)\] ?(.*)")  # apptainer-mpirun --tag-output
LABELED = re.compile(r" *(\d+): ?(.*)")  # srun --label


def by_rank(stdout: str, tag: re.Pattern[str]) -> dict[int, list[str]]:
    """Each rank's output lines (whole lines, tag removed); an untagged line fails."""
    ranks: dict[int, list[str]] = {}
    for line in stdout.splitlines():
        m = tag.fullmatch(line)
        assert m, f"untagged output line: {line!r}"
        ranks.setdefault(int(m.group(1)), []).append(m.group(2).rstrip())
    return ranks


def assert_one_job_passed(stdout: str, tag: re.Pattern[str]) -> None:
    """Rank 0's pytest summary says every test passed, and all N ranks saw one job of N."""
    ranks = by_rank(stdout, tag)
    assert sorted(ranks) == list(range(N))
    rank0 = [line for line in ranks[0] if line]
    assert SUMMARY.fullmatch(rank0[-1]), rank0[-3:]
    assert PROGRESS.fullmatch(rank0[0]), rank0[:1]
    for rank, lines in ranks.items():
        assert f"rank: {rank}" in lines and f"size: {N}" in lines, (rank, lines[-12:])
        assert SUMMARY.fullmatch([x for x in lines if x][-1]), (rank, lines[-3:])


def run(runner: User, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    kw.setdefault("cwd", "/tmp")
    kw.setdefault("timeout", 120)
    return without_queue_lines(runner.run(argv, **kw))


@pytest.mark.slow
def test_pytest_mpi_under_apptainer_mpirun(python_mpi_image: Path, runner: User) -> None:
    proc = run(
        runner,
        ["apptainer-mpirun", "-n", str(N), "--tag-output", str(python_mpi_image), *PYTEST],
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert_one_job_passed(proc.stdout, TAGGED)
    assert proc.stderr == ""


@pytest.mark.slow
@pytest.mark.slurm
def test_pytest_mpi_under_srun_pmi2(
    slurm_cluster: SlurmCluster, python_mpi_image: Path, runner: User
) -> None:
    """Matched PMI: Slurm's PMI-2 plugin serves the image's MPICH (PMI-1 wire) directly."""
    proc = run(
        runner,
        ["srun", "--mpi=pmi2", "-n", str(N), "--label", "rankwire", "exec",
         str(python_mpi_image), *PYTEST],
        env=slurm_cluster.env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert_one_job_passed(proc.stdout, LABELED)
    assert proc.stderr == ""


@pytest.mark.slow
@pytest.mark.slurm
def test_pytest_mpi_under_srun_pmix_through_the_bridge(
    slurm_cluster: SlurmCluster, python_mpi_image: Path, runner: User
) -> None:
    """Mismatched PMI: the site offers PMIx, the image's MPICH speaks PMI-1 only;
    `rankwire exec --pmi-bridge auto` serves each task's PMI_FD through Slurm's PMIx."""
    proc = run(
        runner,
        ["srun", "--mpi=pmix", "-n", str(N), "--label", "rankwire", "exec",
         "--pmi-bridge", "auto", str(python_mpi_image), *PYTEST],
        env=slurm_cluster.env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert_one_job_passed(proc.stdout, LABELED)
    assert proc.stderr == ""


@pytest.mark.slow  # the image takes ~15 s to build
@pytest.mark.slurm
def test_without_the_bridge_each_rank_is_a_singleton_that_skips_everything(
    slurm_cluster: SlurmCluster, python_mpi_image: Path, unprivileged_user: User
) -> None:
    """What the bridge fixes, as a pytest-mpi suite sees it: with `--pmi-bridge off` under
    `srun --mpi=pmix` each task is rank 0 of 1, `min_size=2` skips every test, and the step
    still exits 0: a suite that silently tests nothing."""
    proc = run(
        unprivileged_user,
        ["srun", "--mpi=pmix", "-n", str(N), "--label", "rankwire", "exec",
         "--pmi-bridge", "off", str(python_mpi_image), *PYTEST],
        env=slurm_cluster.env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    ranks = by_rank(proc.stdout, LABELED)
    assert sorted(ranks) == list(range(N))
    for task, lines in ranks.items():
        assert "rank: 0" in lines and "size: 1" in lines, (task, lines[-12:])
        assert re.fullmatch(rf"{TESTS} skipped in \d+\.\d+s", [x for x in lines if x][-1])
