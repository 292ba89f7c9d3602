"""Session fixtures shared by every test: real Slurm, a real non-root user, real MPI."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.mpi import MpiPrograms, compile_hello
from harness.slurm import HarnessError, SlurmCluster
from harness.users import User, ensure_unprivileged_user, install_for

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"

# Console scripts (`rankwire`, `apptainer-mpirun`) of the interpreter running the tests
# come first on PATH, also for commands run as the unprivileged user.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"


@pytest.fixture(scope="session")
def shared_dir() -> Iterator[Path]:
    """A session temp dir every test user can read (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="rankwire-tests-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A throwaway single-node Slurm 22.05; use `.env` for srun/sbatch."""
    if os.getuid() != 0:
        pytest.skip("the Slurm fixture needs root (slurmd runs job steps as the job user)")
    cluster = SlurmCluster()
    try:
        cluster.start()
    except HarnessError as err:
        pytest.fail(f"Slurm test cluster did not start: {err}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def unprivileged_user(shared_dir: Path) -> User:
    user = ensure_unprivileged_user()
    if os.getuid() == 0:
        user = install_for(user, REPO, shared_dir)
    return user


@pytest.fixture(scope="session")
def mpi_programs(shared_dir: Path) -> MpiPrograms:
    """The C MPI hello compiled with Debian's MPICH (PMI-1) and Open MPI (PMIx)."""
    bindir = shared_dir / "mpi"
    bindir.mkdir(mode=0o755)
    return compile_hello(EXAMPLES / "hello_mpi.c", bindir)
