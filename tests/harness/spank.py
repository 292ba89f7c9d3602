"""The SPANK plugin as an admin installs it, loaded by a throwaway Slurm's plugstack."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import subprocess
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Union

from harness.leftovers import WATCHED
from harness.mpi import ompi_env
from harness.procs import parents
from harness.slurm import SlurmCluster, without_queue_lines
from harness.users import User

if TYPE_CHECKING:
    from harness.multinode import MultiNodeCluster

    Cluster = Union[SlurmCluster, MultiNodeCluster]

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


# This session's directories: its shared dir (the images) and its Slurm clusters (their
# logs). conftest adds them. The helper's environment is the same for every session, so a
# plugin process is told another session's by what it, its children, ancestors or the
# processes it watches (pidfds: the job's slurmstepd) have open under another session's
# directories (mkdtemp'd with these prefixes).
SESSION_ROOTS: list[Path] = []
SESSION_DIR = re.compile(r"(.*?/rankwire-(?:tests|slurm)-[^/]+)(?:/|$)")


def _pidfd_targets(pid: int) -> list[int]:
    targets = []
    with contextlib.suppress(OSError):
        for info in Path(f"/proc/{pid}/fdinfo").iterdir():
            with contextlib.suppress(OSError):
                targets += [
                    int(x.split()[1])
                    for x in info.read_text().splitlines()
                    if x.startswith("Pid:") and int(x.split()[1]) > 0
                ]
    return targets


def _paths_open(pid: int) -> list[str]:
    """The cwd and open files of `pid`."""
    found = []
    with contextlib.suppress(OSError):
        found.append(os.readlink(f"/proc/{pid}/cwd"))
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                found.append(os.readlink(fd))
    return found


def of_this_session(pid: int, ppids: dict[int, int]) -> bool:
    """Whether `pid` is ours: it, its children, its ancestors or the processes it watches
    have a file open under one of this session's dirs, or under no session's dirs at all
    (e.g. a holder of a pulled image whose job is gone: counted, to miss nothing)."""
    related = {pid, *(c for c, p in ppids.items() if p == pid), *_pidfd_targets(pid)}
    for start in list(related):
        up = ppids.get(start, 0)
        while up > 1 and up not in related:
            related.add(up)
            up = ppids.get(up, 0)
    seen = {
        m.group(1) for p in related for path in _paths_open(p) if (m := SESSION_DIR.match(path))
    }
    return not seen or bool(seen & {str(root) for root in SESSION_ROOTS})


def plugin_processes(comms: Collection[str] = WATCHED) -> list[tuple[int, str]]:
    """(pid, comm) of this session's processes named in `comms` that carry the helper's
    fixed environment: the plugin's helpers and holders (and their FUSE daemons)."""
    found, ppids = [], parents()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            comm = (proc / "comm").read_text().strip()
            env = set((proc / "environ").read_bytes().split(b"\0")) - {b""}
        except OSError:
            continue
        if comm in comms and env == HELPER_ENV and of_this_session(int(proc.name), ppids):
            found.append((int(proc.name), comm))
    return found


def spank_leftovers() -> list[str]:
    """Helpers, holders and FUSE daemons the plugin started that are still running."""
    return [f"process {pid} {comm}" for pid, comm in plugin_processes()]


def srun(
    cluster: SlurmCluster,
    runner: User,
    *args: str,
    env: dict[str, str] | None = None,
    cwd: str = "/tmp",
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """`srun ARGS` as `runner` on `cluster` (Open MPI's env fixed up), from `cwd`."""
    proc = runner.run(["srun", *args], env=ompi_env(env or cluster.env), cwd=cwd, timeout=timeout)
    return without_queue_lines(proc)


# -- named containers (--container-name): a job of their own, ended by the test ---------
JOBS_DIR = Path("/run/rankwire/jobs")  # spank/plan.JOBS_DIR


def allocate(cluster: Cluster, runner: User, *args: str, nodes: int = 1) -> int:
    """`salloc --no-shell ARGS` as `runner`, one task per node: the job id of a new
    allocation."""
    argv = ["salloc", "--no-shell", "-N", str(nodes), "-n", str(nodes), *args]
    proc = runner.run(argv, env=cluster.env, cwd="/tmp")
    found = re.search(r"Granted job allocation (\d+)", proc.stderr)
    assert proc.returncode == 0 and found, proc.stderr
    return int(found.group(1))


def slurmd_dir(cluster: SlurmCluster) -> Path:
    """JOBS_DIR/SLURMD of `cluster`'s slurmd (spank/plan.slurmd_key: conf and node)."""
    from rankwire.spank.plan import slurmd_key

    return JOBS_DIR / slurmd_key(str(cluster.conf), cluster.nodename)


def job_dirs(cluster: SlurmCluster) -> list[Path]:
    """The job dirs of `cluster`'s named containers on this node."""
    base = slurmd_dir(cluster)
    return sorted(base.iterdir()) if base.is_dir() else []


def end_job(
    cluster: Cluster,
    job: int,
    timeout: float = 60,
    dirs: Sequence[Path] = (),
    logs: Sequence[Path] = (),
) -> None:
    """scancel `job` and wait until Slurm has forgotten it and its epilogs have run: its
    named containers' `dirs` are gone (default: the single-node cluster's). `logs`: the
    slurmd logs quoted when they are not (default: the single-node cluster's)."""
    # (a job that has ended already: scancel says so, or that it does not know it)
    subprocess.run(["scancel", str(job)], env=cluster.env, capture_output=True)
    deadline = time.monotonic() + timeout
    if not dirs:
        assert isinstance(cluster, SlurmCluster)
        dirs = [slurmd_dir(cluster) / str(job)]
        logs = [cluster.root / "log" / "slurmd.log"]
    while time.monotonic() < deadline:
        queued = subprocess.run(
            ["squeue", "-h", "-j", str(job), "-o", "%T"],
            env=cluster.env,
            capture_output=True,
            text=True,
        ).stdout.strip()
        if not queued and not any(d.exists() for d in dirs):
            return
        time.sleep(0.1)
    said = "\n".join(
        line
        for log in logs
        for line in log.read_text(errors="replace").splitlines()
        if "rankwire" in line or "pilog" in line
    )
    left = [str(d) for d in dirs if d.exists()]
    raise AssertionError(f"job {job} or its dirs {left} still there after {timeout} s:\n{said}")


def named_leftovers(cluster: SlurmCluster) -> list[str]:
    """Job dirs of named containers `cluster` left (each job's epilog removes its own)."""
    return [f"dir {d}" for d in [*job_dirs(cluster), slurmd_dir(cluster)] if d.exists()]


def restart_slurmd(cluster: SlurmCluster, timeout: float = 30) -> None:
    """Stop `cluster`'s slurmd (SIGTERM: its steps run on) and start it again, as a site
    restarts it; it then reads plugstack.conf again (SPANK job epilogs run only if a
    plugin it loaded at start has one). Waits until the node answers."""
    proc = cluster._procs["slurmd"]
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout)
    cluster._spawn("slurmd", ["slurmd", "-D", "-f", str(cluster.conf), "-N", cluster.nodename])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = cluster.node_state()
        if state and not state.endswith("*") and not state.startswith(("down", "unk")):
            return
        time.sleep(0.1)
    raise AssertionError(f"slurmd did not come back within {timeout} s: {cluster.node_state()}")
