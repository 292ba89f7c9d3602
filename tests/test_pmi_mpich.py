"""Real PMI clients under our server, and our clients under real servers (Hydra).

Clients: Debian MPICH 4.0.2 (PMI-1 only), Slurm's libpmi2 C library (PMI-2), our own Python
clients (`rankwire pmi probe`), and PyPI's MPICH 5 wheel when installed under
`.venv/opt/mpich` (see PYPI_MPICH below).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

import pytest

from harness.mpi import CompiledPrograms, MpiPrograms, assert_hello
from harness.pmi import JobRun, assert_clean, clean_env, probes_by_rank, serve
from rankwire.pmi.job import Job
from rankwire.pmi.server import PmiServer

pytestmark = pytest.mark.mpi

HYDRA = "/usr/bin/mpiexec.hydra"
# `pip install --prefix .venv/opt/mpich mpich==5.0.2`: kept off PATH on purpose, the wheel
# ships its own mpicc/mpiexec/mpirun that would shadow the system ones.
PYPI_MPICH = Path(sys.prefix) / "opt" / "mpich"


def run_ranks(
    size: int,
    argv: Sequence[str],
    mode: str = "fd",
    nodes: Optional[Sequence[int]] = None,
    env: Optional[Mapping[str, str]] = None,
) -> JobRun:
    job = Job(size=size, nodes=nodes, fence_timeout=60)
    return serve(lambda: PmiServer(job, mode=mode), argv, extra_env=env, timeout=90)


def nodeinfo(stdout: str) -> dict[int, tuple[int, int]]:
    """rank → (local_size, leader) from the nodeinfo program."""
    out = {}
    for line in stdout.splitlines():
        f = dict(kv.split("=") for kv in line.split()[1:])
        out[int(f["rank"])] = (int(f["local_size"]), int(f["leader"]))
        assert int(f["sum"]) == int(f["size"])
    return out


# -- MPICH 4.0.2 (PMI-1) under our server ---------------------------------------------------------
@pytest.mark.parametrize("mode", ["fd", "port"])
def test_mpich_hello_four_ranks(mpi_programs: MpiPrograms, mode: str) -> None:
    run = run_ranks(4, [str(mpi_programs.hello_mpich)], mode=mode)
    assert_clean(run, 4)
    assert_hello(run.stdout, 4)


def test_mpich_hello_three_ranks(mpi_programs: MpiPrograms) -> None:
    run = run_ranks(3, [str(mpi_programs.hello_mpich)])
    assert_clean(run, 3)
    assert_hello(run.stdout, 3)


@pytest.mark.parametrize(
    ("mode", "nodes"),
    [("fd", [0, 0, 1, 1]), ("port", [0, 0, 1, 1]), ("fd", [0, 1, 0, 1, 0]), ("fd", [4, 4, 4, 9])],
)
def test_mpich_follows_the_process_mapping(
    data_programs: CompiledPrograms, mode: str, nodes: list[int]
) -> None:
    run = run_ranks(len(nodes), [str(data_programs["nodeinfo"])], mode=mode, nodes=nodes)
    assert_clean(run, len(nodes))
    expected = {
        r: (nodes.count(n), nodes.index(n)) for r, n in enumerate(nodes)
    }  # (ranks on my node, lowest rank on my node)
    assert nodeinfo(run.stdout) == expected, run.describe()


def test_mpich_nolocal_with_two_nodes(
    mpi_programs: MpiPrograms, data_programs: CompiledPrograms
) -> None:
    env = {"MPIR_CVAR_NOLOCAL": "1"}
    run = run_ranks(4, [str(mpi_programs.hello_mpich)], nodes=[0, 0, 1, 1], env=env)
    assert_clean(run, 4)
    assert_hello(run.stdout, 4)
    run = run_ranks(4, [str(data_programs["nodeinfo"])], nodes=[0, 0, 1, 1], env=env)
    assert nodeinfo(run.stdout) == {r: (1, r) for r in range(4)}


# -- Slurm's libpmi2 (PMI-2) under our server -----------------------------------------------------
@pytest.mark.parametrize("mode", ["fd", "port"])
def test_slurm_libpmi2_client(data_programs: CompiledPrograms, mode: str) -> None:
    run = run_ranks(3, [str(data_programs["pmi2test"])], mode=mode, nodes=[0, 0, 1])
    assert_clean(run, 3)
    jobid = run.stdout.split("jobid=")[1].split()[0]
    assert sorted(run.stdout.splitlines()) == [
        f"pmi2 rank={r} size=3 appnum=0 jobid={jobid} neighbour=v={(r + 1) % 3};semi "
        "mapping=(vector,(0,1,2),(1,1,1))"
        for r in range(3)
    ], run.describe()


# -- our Python clients, under our server and under Hydra -----------------------------------------
def probes(stdout: str, size: int, version: int) -> list[dict[str, object]]:
    results = probes_by_rank(stdout)
    assert [r["rank"] for r in results] == list(range(size)), stdout
    for r in results:
        assert r["ok"] is True and r["size"] == size and r["version"] == version, r
    return results


PROBE = [str(Path(sys.executable).parent / "rankwire"), "pmi", "probe"]


@pytest.mark.parametrize("mode", ["fd", "port"])
@pytest.mark.parametrize("version", [1, 2])
def test_our_clients_under_our_server(version: int, mode: str) -> None:
    run = run_ranks(3, [*PROBE, str(version)], mode=mode, nodes=[0, 1, 1])
    assert_clean(run, 3)
    for r in probes(run.stdout, 3, version):
        assert r["process_mapping"] == "(vector,(0,1,1),(1,1,2))"
        assert r["appnum"] == 0


@pytest.mark.parametrize("version", [1, 2])
def test_our_clients_under_hydra(version: int) -> None:
    if not Path(HYDRA).exists():
        pytest.skip(f"{HYDRA} missing: apt-get install mpich")
    proc = subprocess.run(
        [HYDRA, "-n", "3", *PROBE, str(version)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    for r in probes(proc.stdout, 3, version):
        # Hydra's default host list is localhost:1, so it describes one 1-slot node and
        # leaves the rest to MPICH's wrap-around rule: every rank on node 0.
        assert r["process_mapping"] == "(vector,(0,1,1))"
        assert str(r["kvsname"]).startswith("kvs_")


# -- PyPI's MPICH 5 wheel -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hello_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    mpicc = PYPI_MPICH / "bin" / "mpicc"
    if not mpicc.exists() or not shutil.which("cc"):
        pytest.skip(f"no MPICH wheel at {PYPI_MPICH}: pip install --prefix {PYPI_MPICH} mpich")
    out = tmp_path_factory.mktemp("wheel") / "hello_wheel"
    src = Path(__file__).resolve().parent.parent / "examples" / "hello_mpi.c"
    subprocess.run([str(mpicc), "-O1", str(src), "-o", str(out)], check=True)
    return out


@pytest.mark.slow
def test_mpich5_wheel_pmi1(hello_wheel: Path) -> None:
    run = run_ranks(4, [str(hello_wheel)], nodes=[0, 0, 1, 1])
    assert_clean(run, 4)
    assert_hello(run.stdout, 4)


class NoPmi2InTheWheel(Exception):
    """The MPICH wheel failed in MPIR_pmi_init before sending one PMI-2 byte."""


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    raises=NoPmi2InTheWheel,
    reason="the mpich 5.0.2 wheel is built without ENABLE_PMI2 (Internal MPI error)",
)
def test_mpich5_wheel_pmi2(hello_wheel: Path) -> None:
    run = run_ranks(2, [str(hello_wheel)], env={"MPIR_CVAR_PMI_VERSION": "2"})
    if "MPIR_pmi_init" in run.stderr and not run.events:
        # Verified: the same failure under the wheel's own mpiexec.hydra, and not one byte
        # reaches the PMI fd. Any other failure fails the test; a wheel with PMI-2 makes
        # it XPASS, which (strict) fails too: then drop the mark.
        raise NoPmi2InTheWheel(run.describe())
    assert_clean(run, 2)
    assert_hello(run.stdout, 2)
