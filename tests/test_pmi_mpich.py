"""Real PMI clients under our server, and our clients under real servers (Hydra).

Clients: Debian MPICH 4.0.2 (PMI-1 only), Slurm's libpmi2 C library (PMI-2), our own Python
clients (`rankwire pmi probe`), and PyPI's MPICH 5 wheel when installed under
`.venv/opt/mpich` (see PYPI_MPICH below).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

import pytest

from harness.mpi import MpiPrograms, assert_hello
from harness.pmi import JobRun, clean_env, run_job
from rankwire.pmi.job import FenceFailed, Job
from rankwire.pmi.server import Finalized, PmiServer

pytestmark = pytest.mark.mpi

HYDRA = "/usr/bin/mpiexec.hydra"
# `pip install --prefix .venv/opt/mpich mpich==5.0.2`: kept off PATH on purpose, the wheel
# ships its own mpicc/mpiexec/mpirun that would shadow the system ones.
PYPI_MPICH = Path(sys.prefix) / "opt" / "mpich"

NODEINFO_C = r"""
#include <mpi.h>
#include <stdio.h>
/* Which ranks MPICH believes share a node: the PMI process mapping at work. */
int main(int argc, char **argv) {
    int rank, size, lrank, lsize, leader, sum, one = 1;
    MPI_Comm node;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
    MPI_Comm_rank(node, &lrank);
    MPI_Comm_size(node, &lsize);
    leader = rank;
    MPI_Allreduce(MPI_IN_PLACE, &leader, 1, MPI_INT, MPI_MIN, node);
    MPI_Allreduce(&one, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    printf("node rank=%d size=%d local_size=%d leader=%d sum=%d\n", rank, size, lsize, leader, sum);
    fflush(stdout);
    MPI_Comm_free(&node);
    MPI_Finalize();
    return 0;
}
"""

PMI2TEST_C = r"""
#include <slurm/pmi2.h>
#include <stdio.h>
/* Slurm's libpmi2 client: init, put, fence, get the neighbour's key, job attribute. */
#define CHECK(call) do { int rc_ = (call); if (rc_ != PMI2_SUCCESS) { \
    printf("FAILED %s rc=%d\n", #call, rc_); return 1; } } while (0)
int main(void) {
    int spawned, size, rank, appnum, found, vallen;
    char jobid[256], key[64], value[PMI2_MAX_VALLEN], mapping[PMI2_MAX_VALLEN];
    CHECK(PMI2_Init(&spawned, &size, &rank, &appnum));
    CHECK(PMI2_Job_GetId(jobid, sizeof jobid));
    snprintf(key, sizeof key, "pmi2test-%d", rank);
    snprintf(value, sizeof value, "v=%d;semi", rank);
    CHECK(PMI2_KVS_Put(key, value));
    CHECK(PMI2_KVS_Fence());
    snprintf(key, sizeof key, "pmi2test-%d", (rank + 1) % size);
    CHECK(PMI2_KVS_Get(jobid, PMI2_ID_NULL, key, value, sizeof value, &vallen));
    CHECK(PMI2_Info_GetJobAttr("PMI_process_mapping", mapping, sizeof mapping, &found));
    printf("pmi2 rank=%d size=%d appnum=%d jobid=%s neighbour=%s mapping=%s\n",
           rank, size, appnum, jobid, value, found ? mapping : "ABSENT");
    fflush(stdout);
    CHECK(PMI2_Finalize());
    return 0;
}
"""


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pmi-programs")
    (d / "nodeinfo.c").write_text(NODEINFO_C)
    (d / "pmi2test.c").write_text(PMI2TEST_C)
    subprocess.run(["mpicc.mpich", "-O1", "nodeinfo.c", "-o", "nodeinfo"], cwd=d, check=True)
    subprocess.run(["cc", "-O1", "pmi2test.c", "-o", "pmi2test", "-lpmi2"], cwd=d, check=True)
    return {"nodeinfo": d / "nodeinfo", "pmi2test": d / "pmi2test"}


def run_ranks(
    size: int,
    argv: Sequence[str],
    mode: str = "fd",
    nodes: Optional[Sequence[int]] = None,
    env: Optional[Mapping[str, str]] = None,
) -> JobRun:
    async def main() -> JobRun:
        server = PmiServer(Job(size=size, nodes=nodes, fence_timeout=60), mode=mode)
        await server.start()
        try:
            return await run_job(server, argv, extra_env=env, timeout=90)
        finally:
            await server.close()

    return asyncio.run(main())


def assert_clean(run: JobRun, size: int) -> None:
    assert all(r.returncode == 0 for r in run.ranks), run.describe()
    assert not [e for e in run.events if isinstance(e, FenceFailed)], run.describe()
    assert sorted(e.rank for e in run.events if isinstance(e, Finalized)) == list(range(size))


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
    programs: dict[str, Path], mode: str, nodes: list[int]
) -> None:
    run = run_ranks(len(nodes), [str(programs["nodeinfo"])], mode=mode, nodes=nodes)
    assert_clean(run, len(nodes))
    expected = {
        r: (nodes.count(n), nodes.index(n)) for r, n in enumerate(nodes)
    }  # (ranks on my node, lowest rank on my node)
    assert nodeinfo(run.stdout) == expected, run.describe()


def test_mpich_nolocal_with_two_nodes(mpi_programs: MpiPrograms, programs: dict[str, Path]) -> None:
    env = {"MPIR_CVAR_NOLOCAL": "1"}
    run = run_ranks(4, [str(mpi_programs.hello_mpich)], nodes=[0, 0, 1, 1], env=env)
    assert_clean(run, 4)
    assert_hello(run.stdout, 4)
    run = run_ranks(4, [str(programs["nodeinfo"])], nodes=[0, 0, 1, 1], env=env)
    assert nodeinfo(run.stdout) == {r: (1, r) for r in range(4)}


# -- Slurm's libpmi2 (PMI-2) under our server -----------------------------------------------------
@pytest.mark.parametrize("mode", ["fd", "port"])
def test_slurm_libpmi2_client(programs: dict[str, Path], mode: str) -> None:
    run = run_ranks(3, [str(programs["pmi2test"])], mode=mode, nodes=[0, 0, 1])
    assert_clean(run, 3)
    jobid = run.stdout.split("jobid=")[1].split()[0]
    assert sorted(run.stdout.splitlines()) == [
        f"pmi2 rank={r} size=3 appnum=0 jobid={jobid} neighbour=v={(r + 1) % 3};semi "
        "mapping=(vector,(0,1,2),(1,1,1))"
        for r in range(3)
    ], run.describe()


# -- our Python clients, under our server and under Hydra -----------------------------------------
def probes(stdout: str, size: int, version: int) -> list[dict[str, object]]:
    results = sorted((json.loads(line) for line in stdout.splitlines()), key=lambda r: r["rank"])
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


@pytest.mark.slow
def test_mpich5_wheel_pmi2(hello_wheel: Path) -> None:
    run = run_ranks(2, [str(hello_wheel)], env={"MPIR_CVAR_PMI_VERSION": "2"})
    if "MPIR_pmi_init" in run.stderr and not run.events:
        # Verified: the same failure under the wheel's own mpiexec.hydra, and not one byte
        # reaches the PMI fd; mpich 5.0.2's wheel is built without ENABLE_PMI2.
        pytest.skip("the mpich wheel has no PMI-2 support compiled in (Internal MPI error)")
    assert_clean(run, 2)
    assert_hello(run.stdout, 2)
