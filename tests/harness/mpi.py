"""Real MPI programs for tests, and the checks every hello run needs."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

HELLO_RE = re.compile(r"hello rank=(\d+) size=(\d+) host=(\S+) sum=(\d+) (ok|WRONG)")


@dataclasses.dataclass(frozen=True)
class MpiPrograms:
    hello_mpich: Path
    hello_ompi: Path
    fail_mpich: Path  # examples/mpi_fail.c: controlled exits, aborts, silent ranks
    fail_ompi: Path


def compile_hello(examples: Path, bindir: Path) -> MpiPrograms:
    """Compile the examples with Debian's MPICH (PMI-1) and Open MPI (PMIx) wrappers."""
    progs = MpiPrograms(
        bindir / "hello_mpich", bindir / "hello_ompi", bindir / "fail_mpich", bindir / "fail_ompi"
    )
    for mpicc, src, out in (
        ("mpicc.mpich", "hello_mpi.c", progs.hello_mpich),
        ("mpicc.openmpi", "hello_mpi.c", progs.hello_ompi),
        ("mpicc.mpich", "mpi_fail.c", progs.fail_mpich),
        ("mpicc.openmpi", "mpi_fail.c", progs.fail_ompi),
    ):
        if not shutil.which(mpicc):
            raise RuntimeError(f"{mpicc} not found: run `make test`, which installs it")
        subprocess.run([mpicc, "-O1", str(examples / src), "-o", str(out)], check=True)
        out.chmod(0o755)
    return progs


DATA = Path(__file__).resolve().parent.parent / "data"

# The test programs of tests/data: name → (compiler, source, libraries).
PROGRAMS = {
    "nodeinfo": ("mpicc.mpich", DATA / "nodeinfo.c", ()),  # which ranks share a node
    "pmi2test": ("cc", DATA / "pmi2test.c", ("-lpmi2",)),  # Slurm's libpmi2 client
    "fault_rank": ("mpicc.mpich", DATA / "fault_rank.c", ()),  # test_faults' rank
    "mpi_maps": ("mpicc.openmpi", DATA / "fabric" / "mpi_maps.c", ()),  # libfabric mapped
    "mpi_lib": ("mpicc.mpich", DATA / "mpi_lib.c", ()),  # which MPI library is mapped
}


class CompiledPrograms:
    """The PROGRAMS, each compiled on first use (once per session) into `bindir`."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir

    def __getitem__(self, name: str) -> Path:
        out = self.bindir / name
        if not out.exists():
            compiler, src, libs = PROGRAMS[name]
            if not shutil.which(compiler):
                raise RuntimeError(f"{compiler} not found: run `make test`, which installs it")
            tmp = out.with_name(f"{name}.tmp")
            subprocess.run([compiler, "-O1", str(src), "-o", str(tmp), *libs], check=True)
            tmp.chmod(0o755)
            tmp.rename(out)
        return out


def ompi_env(env: dict[str, str]) -> dict[str, str]:
    """Open MPI refuses to run as root unless told twice."""
    if os.getuid() == 0:
        env = dict(env, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def assert_hello(stdout: str, size: int) -> list[str]:
    """Every rank 0..size-1 reported exactly once, with size and the right Allreduce sum.

    Returns the host names the ranks reported, by rank.
    """
    seen: dict[int, str] = {}
    for m in HELLO_RE.finditer(stdout):
        rank, rsize, host, total, verdict = m.groups()
        assert int(rsize) == size, f"rank {rank} saw size {rsize}, expected {size}:\n{stdout}"
        assert int(total) == size * (size + 1) // 2 and verdict == "ok", stdout
        assert int(rank) not in seen, f"rank {rank} reported twice (singletons?):\n{stdout}"
        seen[int(rank)] = host
    assert sorted(seen) == list(range(size)), f"ranks reported: {sorted(seen)}\n{stdout}"
    return [seen[r] for r in range(size)]
