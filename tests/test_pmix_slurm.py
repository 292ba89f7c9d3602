"""Our PMIx client (`probe_pmix`) under Slurm's own PMIx server (`srun --mpi=pmix`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.slurm import SlurmCluster

pytestmark = pytest.mark.slurm

RANKWIRE = str(Path(sys.executable).parent / "rankwire")


def test_probe_pmix_under_srun(slurm_cluster: SlurmCluster) -> None:
    proc = subprocess.run(
        [
            "srun",
            "--mpi=pmix",
            "-n",
            "2",
            str(Path(sys.executable).parent / "rankwire"),
            "pmi",
            "probe",
            "x",
        ],
        env=slurm_cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = sorted(
        (json.loads(line) for line in proc.stdout.splitlines()), key=lambda r: r["rank"]
    )
    assert [r["rank"] for r in results] == [0, 1], proc.stdout
    for r in results:
        assert r["ok"] is True and r["size"] == 2, r
        assert r["local_size"] == 2 and r["local_rank"] == r["rank"]
        assert r["nspace"].startswith("slurm.pmix."), r  # Slurm's namespace, not ours
