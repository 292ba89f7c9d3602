"""Our PMI-1 and PMI-2 clients against Slurm's mpi/pmi2 plugin (it serves both versions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.slurm import SlurmCluster

pytestmark = pytest.mark.slurm


@pytest.mark.parametrize("version", [1, 2])
def test_our_clients_under_srun_pmi2(slurm_cluster: SlurmCluster, version: int) -> None:
    proc = subprocess.run(
        [
            "srun",
            "--mpi=pmi2",
            "-n",
            "2",
            str(Path(sys.executable).parent / "rankwire"),
            "pmi",
            "probe",
            str(version),
        ],
        env=slurm_cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    results = sorted(
        (json.loads(line) for line in proc.stdout.splitlines()), key=lambda r: r["rank"]
    )
    assert [r["rank"] for r in results] == [0, 1], proc.stdout
    for r in results:
        assert r["ok"] is True, r
        assert (r["size"], r["version"]) == (2, version)
        assert r["process_mapping"] == "(vector,(0,1,2))"  # one node, two tasks
        assert r["appnum"] == -1  # what Slurm says
        assert r["kvsname"] == results[0]["kvsname"]
