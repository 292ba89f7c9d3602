"""Our PMI clients (`rankwire pmi probe`) under Slurm's own servers: its mpi/pmi2 plugin
(it serves PMI-1 and PMI-2) and its mpi/pmix plugin."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.pmi import probes_by_rank
from harness.slurm import SlurmCluster

pytestmark = pytest.mark.slurm

RANKWIRE = str(Path(sys.executable).parent / "rankwire")


def srun_probe(cluster: SlurmCluster, mpi: str, version: str) -> list[dict[str, Any]]:
    """`srun --mpi=MPI -n 2 rankwire pmi probe VERSION`: both ranks' results, by rank."""
    proc = subprocess.run(
        ["srun", f"--mpi={mpi}", "-n", "2", RANKWIRE, "pmi", "probe", version],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = probes_by_rank(proc.stdout)
    assert [r["rank"] for r in results] == [0, 1], proc.stdout
    for r in results:
        assert r["ok"] is True and r["size"] == 2, r
    return results


@pytest.mark.parametrize("version", [1, 2])
def test_our_clients_under_srun_pmi2(slurm_cluster: SlurmCluster, version: int) -> None:
    results = srun_probe(slurm_cluster, "pmi2", str(version))
    for r in results:
        assert r["version"] == version
        assert r["process_mapping"] == "(vector,(0,1,2))"  # one node, two tasks
        assert r["appnum"] == -1  # what Slurm says
        assert r["kvsname"] == results[0]["kvsname"]


def test_probe_pmix_under_srun(slurm_cluster: SlurmCluster) -> None:
    for r in srun_probe(slurm_cluster, "pmix", "x"):
        assert r["local_size"] == 2 and r["local_rank"] == r["rank"]
        assert r["nspace"].startswith("slurm.pmix."), r  # Slurm's namespace, not ours
