"""Facts about the Slurm step a process runs in, read from its environment and slurm.conf.

No `scontrol` call: every task of a step reads these, and asking slurmctld from each
would load it for nothing; TmpFS is read from the slurm.conf the step uses.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Optional

from rankwire.record import record


@record
class SlurmStep:
    job_id: str
    step_id: str
    ntasks: int
    pmix_server_dir: Optional[str]  # SlurmdSpoolDir/pmix.J.S (srun --mpi=pmix only)
    pmix_app_dir: Optional[str]  # TmpFS/spmix_appdir_UID_J.S (srun --mpi=pmix only)


def _tmpfs(conf: str) -> str:
    try:
        with open(conf) as f:
            for line in f:
                key, sep, value = line.split("#", 1)[0].strip().partition("=")
                if sep and key.strip().lower() == "tmpfs":
                    return value.strip() or "/tmp"
    except OSError:
        pass
    return "/tmp"


def slurm_step(environ: Mapping[str, str], uid: int) -> Optional[SlurmStep]:
    """The step we run in (under srun), or None."""
    job, step = environ.get("SLURM_JOB_ID"), environ.get("SLURM_STEP_ID")
    if not job or not step:
        return None
    server_dir = app_dir = None
    if environ.get("PMIX_SERVER_TMPDIR"):
        server_dir = os.path.normpath(environ["PMIX_SERVER_TMPDIR"])
        tmpfs = _tmpfs(environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
        app_dir = os.path.join(tmpfs, f"spmix_appdir_{uid}_{job}.{step}")
    try:
        ntasks = int(environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or 1)
    except ValueError:
        ntasks = 1
    return SlurmStep(job, step, ntasks, server_dir, app_dir)
