"""The test harness itself: real Slurm, real MPI, real non-root user; and it cleans up."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from harness.mpi import assert_hello, ompi_env
from harness.slurm import SlurmCluster, pids_with_env

pytestmark = [pytest.mark.slurm, pytest.mark.mpi]


def test_srun_pmi2_runs_mpich_hello(slurm_cluster, mpi_programs) -> None:
    proc = subprocess.run(
        ["srun", "--mpi=pmi2", "-n", "2", str(mpi_programs.hello_mpich)],
        env=slurm_cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 2)


def test_srun_pmix_runs_openmpi_hello(slurm_cluster, mpi_programs) -> None:
    proc = subprocess.run(
        ["srun", "--mpi=pmix", "-n", "2", str(mpi_programs.hello_ompi)],
        env=ompi_env(slurm_cluster.env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 2)


def test_unprivileged_user_runs_jobs(slurm_cluster, mpi_programs, unprivileged_user) -> None:
    assert unprivileged_user.uid != 0
    proc = unprivileged_user.run(
        ["srun", "--mpi=pmi2", "-n", "2", "sh", "-c", f"id -u; {mpi_programs.hello_mpich}"],
        env=slurm_cluster.env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split().count(str(unprivileged_user.uid)) == 2
    assert_hello(proc.stdout, 2)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_cluster_start_and_teardown_leave_nothing(slurm_cluster) -> None:
    # A second cluster beside the session one: coexistence, then a full teardown while a
    # job is still running in it.
    t0 = time.monotonic()
    cluster = SlurmCluster().start()
    started = time.monotonic() - t0
    print(f"second Slurm cluster idle after {started:.2f}s")
    assert cluster.ctld_port != slurm_cluster.ctld_port
    sbatch = subprocess.run(
        ["sbatch", "--parsable", "--wrap", "sleep 300"],
        env=cluster.env,
        capture_output=True,
        text=True,
        check=True,
    )
    jobid = sbatch.stdout.strip()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not pids_with_env(f"SLURM_CONF={cluster.conf}"):
        time.sleep(0.1)
    pids = dict(cluster.pids)
    job_pids = pids_with_env(f"SLURM_CONF={cluster.conf}")
    assert job_pids, f"job {jobid} never started"
    root, ports = cluster.root, (cluster.ctld_port, cluster.slurmd_port)
    cluster.stop()

    for name, pid in [*pids.items(), *(("job", p) for p in job_pids)]:
        assert not Path(f"/proc/{pid}").exists(), f"{name} (pid {pid}) survived teardown"
    assert not root.exists()
    assert not any(_listening(p) for p in ports)
    # The session cluster is untouched.
    assert slurm_cluster.node_state().startswith(("idle", "mixed", "allocated"))
    assert all(Path(f"/proc/{p}").exists() for p in slurm_cluster.pids.values())
    assert os.environ.get("SLURM_CONF") is None
