"""The SPANK plugin as an admin installs it, loaded by a throwaway Slurm's plugstack."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

from harness.leftovers import WATCHED
from harness.mpi import ompi_env
from harness.slurm import SlurmCluster
from harness.users import User

# The environment the shim gives its helper (spank/helper_run.c `helper_child`); the
# holders it starts inherit it, which is how their leftovers are told from others'.
HELPER_ENV = {b"PATH=/usr/sbin:/usr/bin:/sbin:/bin", b"LC_ALL=C.UTF-8"}


@dataclasses.dataclass(frozen=True)
class SpankInstall:
    prefix: Path
    plugin: Path
    conf: Path  # the plugstack.conf.d entry `make install` wrote
    policy: Path
    helper: str

    def plugstack_line(self) -> str:
        return f"include {self.conf.parent}/*.conf\n"


def install_plugin(repo: Path, prefix: Path, helper: str) -> SpankInstall:
    """`make -C spank install` into `prefix` (root-owned, like a real install)."""
    policy = prefix / "etc" / "rankwire" / "policy.toml"
    subprocess.run(
        [
            "make",
            "-s",
            "-C",
            str(repo / "spank"),
            "install",
            f"PREFIX={prefix}",
            f"SYSCONFDIR={prefix}/etc/slurm",
            f"HELPER={helper}",
            f"POLICY={policy}",
        ],
        check=True,
        capture_output=True,
    )
    return SpankInstall(
        prefix=prefix,
        plugin=prefix / "lib" / "slurm" / "rankwire_spank.so",
        conf=prefix / "etc" / "slurm" / "plugstack.conf.d" / "rankwire.conf",
        policy=policy,
        helper=helper,
    )


def spank_leftovers() -> list[str]:
    """Helpers, holders and FUSE daemons the plugin started that are still running."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            comm = (proc / "comm").read_text().strip()
            env = set((proc / "environ").read_bytes().split(b"\0")) - {b""}
        except OSError:
            continue
        if comm in WATCHED and env == HELPER_ENV:
            found.append(f"process {proc.name} {comm}")
    return found


def srun(
    cluster: SlurmCluster,
    runner: User,
    *args: str,
    env: dict[str, str] | None = None,
    cwd: str = "/tmp",
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """`srun ARGS` as `runner` on `cluster` (Open MPI's env fixed up), from `cwd`."""
    return runner.run(["srun", *args], env=ompi_env(env or cluster.env), cwd=cwd, timeout=timeout)
