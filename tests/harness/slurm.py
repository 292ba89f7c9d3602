"""A throwaway single-node Slurm 22.05 for tests: private config, state, spool and logs.

It owns only what it starts: the daemons are recorded by PID and stopped by PID; munged
is started only when none answers on the default socket (and then stopped again). Ports
are picked free, so it coexists with a Slurm already running on the default ports.

A cluster whose owner died without stopping it (SIGKILL) is stopped by the next start:
its directory holds OWNER_FILE (the owner's PID and start time), and every process of
it carries its SLURM_CONF (`reap_orphans`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from harness.procs import ancestors

MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
OWNER_FILE = "owner.json"
CGROUP_VAR = "RANKWIRE_TEST_SLURM_CGROUP"


# The slurm.conf settings every test cluster shares (single node and multi-node): root
# daemons, munge, no cgroups, no accounting, no default MPI plugin, quick turnover.
COMMON_CONF = (
    "SlurmUser=root",
    "SlurmdUser=root",
    "AuthType=auth/munge",
    "CredType=cred/munge",
    "SlurmctldDebug=info",
    "SlurmdDebug=info",
    "ProctrackType=proctrack/linuxproc",
    "TaskPlugin=task/none",
    "JobAcctGatherType=jobacct_gather/none",
    "AccountingStorageType=accounting_storage/none",
    "MpiDefault=none",
    "SchedulerType=sched/builtin",
    "SelectType=select/cons_tres",
    "SelectTypeParameters=CR_Core",
    "SlurmdParameters=config_overrides",
    "ReturnToService=2",
    "KillWait=2",
    "InactiveLimit=0",
    "MinJobAge=2",
)


def _with_cgroups(conf: tuple[str, ...]) -> tuple[str, ...]:
    """COMMON_CONF with Slurm's cgroup process tracking and task plugins."""
    swap = {
        "ProctrackType=proctrack/linuxproc": "ProctrackType=proctrack/cgroup",
        "TaskPlugin=task/none": "TaskPlugin=task/cgroup",
    }
    return tuple(swap.get(line, line) for line in conf)


def cgroup_v2_only() -> bool:
    """Whether every cgroup hierarchy is the unified one (/proc/self/cgroup has only its
    `0::` line): Slurm 22.05's cgroup/v2 refuses anything else ("Hybrid mode is not
    supported"), so on a hybrid host the cgroup cluster uses cgroup/v1."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    return all(line.startswith("0::") for line in lines)


def cgroup_conf() -> list[str]:
    """cgroup.conf for the cgroup cluster: cgroup/v2 without systemd (a test machine has
    no dbus for slurmd to ask for its scope) where the host is unified, else cgroup/v1.
    No core or memory constraint: the node's CPUs are made up, and on a hybrid host the
    memory hierarchy is the machine's own."""
    plugin = (
        ["CgroupPlugin=cgroup/v2", "IgnoreSystemd=yes"]
        if cgroup_v2_only()
        else ["CgroupPlugin=cgroup/v1"]
    )
    return [
        *plugin,
        "ConstrainCores=no",
        "ConstrainRAMSpace=no",
        "ConstrainSwapSpace=no",
        "ConstrainDevices=yes",
    ]


def cgroup_roots(nodename: str) -> list[Path]:
    """The cgroup directories slurmd makes for its steps: `slurm_NODE` (Debian's Slurm is
    built for several slurmd per host) in each v1 hierarchy, or, under cgroup/v2 without
    systemd, the slurmstepd scope."""
    if cgroup_v2_only():
        scopes = Path("/sys/fs/cgroup/system.slice")
        return [scopes / f"{nodename}_slurmstepd.scope", scopes / "slurmstepd.scope"]
    roots = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[fields.index("-") + 1] == "cgroup":
            roots += [Path(fields[4]) / f"slurm_{nodename}", Path(fields[4]) / "slurm"]
    return roots


def step_cgroup_pids(nodename: str, job: int, step: int) -> set[int]:
    """Every pid in the cgroups of step `job`.`step` (v1: uid_U/job_J/step_S and below;
    v2: job_J/step_S/user and below, slurmstepd being in step_S/slurm): what
    proctrack/cgroup lists and signals."""
    pattern = f"job_{job}/step_{step}/user/**/cgroup.procs"
    if not cgroup_v2_only():
        pattern = f"uid_*/job_{job}/step_{step}/**/cgroup.procs"
    pids: set[int] = set()
    for root in cgroup_roots(nodename):
        for procs in root.glob(pattern):
            with contextlib.suppress(OSError):
                pids |= {int(pid) for pid in procs.read_text().split()}
    return pids


def _prune(root: Path) -> None:
    """Remove the empty cgroups under and at `root`, deepest first (a busy one stays)."""
    if not root.is_dir():
        return
    for path in sorted((walked[0] for walked in os.walk(root)), key=len, reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(path)


class HarnessError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def munge_works() -> bool:
    if not MUNGE_SOCKET.exists():
        return False
    enc = subprocess.run(["munge", "-n"], capture_output=True)
    if enc.returncode != 0:
        return False
    dec = subprocess.run(["unmunge"], input=enc.stdout, capture_output=True)
    return dec.returncode == 0


SRUN_QUEUED = re.compile(
    r"^srun: job \d+ (queued and waiting for resources|has been allocated resources)\n", re.M
)


def without_queue_lines(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """`proc` without srun's two lines for a job that waited for the node (the previous
    test's job still completing): timing, never what a test asserts on."""
    proc.stderr = SRUN_QUEUED.sub("", proc.stderr)
    return proc


def _wait(pred, timeout: float, what: str, log: Optional[Path] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    tail = ""
    if log is not None and log.exists():
        tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    raise HarnessError(f"timed out after {timeout:.0f}s waiting for {what}{tail}")


class SlurmCluster:
    """One slurmctld + one slurmd on this host, all state under one temp dir."""

    def __init__(
        self,
        cpus: int = 32,
        base: Optional[str] = None,
        cgroup: bool = False,
        plugstack: str = "",
    ) -> None:
        self.cpus = cpus
        self.cgroup = cgroup
        self.base = base
        self.root = Path(tempfile.mkdtemp(prefix="rankwire-slurm-", dir=base))
        self.root.chmod(0o755)  # job users must read slurm.conf
        (self.root / OWNER_FILE).write_text(json.dumps(owner_stamp()))
        self.conf = self.root / "slurm.conf"
        self.plugstack = self.root / "plugstack.conf"
        # What plugstack.conf holds when slurmd starts (as a site's: slurmd then also runs
        # the plugins' job epilogs); tests may rewrite it later for srun and slurmstepd.
        self.plugstack_at_start = plugstack
        self.nodename = socket.gethostname().split(".")[0]
        self.cluster_name = f"rw{os.getpid()}"
        self.ctld_port = free_port()
        self.slurmd_port = free_port()
        self.pids: dict[str, int] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self.started_munged = False
        # The cgroup directories slurmd will make that are not there yet: ours to remove.
        self.new_cgroups = (
            [d for d in cgroup_roots(self.nodename) if not d.exists()] if cgroup else []
        )

    # -- configuration ---------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """Environment for srun/sbatch/sinfo against this cluster (no inherited SLURM_*)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_"))}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def write_config(self) -> None:
        r = self.root
        for sub in ("state", "spool", "log", "tmpfs"):
            (r / sub).mkdir(mode=0o755, exist_ok=True)
        (r / "tmpfs").chmod(0o1777)
        self.plugstack.write_text(self.plugstack_at_start)
        self.plugstack.chmod(0o644)
        lines = [
            f"ClusterName={self.cluster_name}",
            f"SlurmctldHost={self.nodename}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            *(_with_cgroups(COMMON_CONF) if self.cgroup else COMMON_CONF),
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd.log",
            f"TmpFS={r}/tmpfs",
            f"PlugStackConfig={self.plugstack}",
            "MaxJobCount=10000",
            f"NodeName={self.nodename} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.nodename} Default=YES MaxTime=INFINITE "
            "State=UP OverSubscribe=FORCE:8",
        ]
        if self.cgroup:  # job ids name the cgroups, which every cgroup cluster here shares:
            # each counts from its own port's thousand (ports < 65536, job ids < 67043328)
            lines.insert(-2, f"FirstJobId={self.ctld_port * 1000}")
        self.conf.write_text("\n".join(lines) + "\n")
        self.conf.chmod(0o644)
        if self.cgroup:
            conf = r / "cgroup.conf"  # slurmd reads it beside slurm.conf
            conf.write_text("\n".join(cgroup_conf()) + "\n")
            conf.chmod(0o644)

    # -- lifecycle -------------------------------------------------------------------
    def _ensure_munge(self) -> None:
        if munge_works():
            return
        if os.getuid() != 0:
            raise HarnessError("munged is not running and only root can start it: `munged`")
        run = MUNGE_SOCKET.parent
        run.mkdir(parents=True, exist_ok=True)
        shutil.chown(run, "munge", "munge")
        run.chmod(0o755)
        pidfile = run / "munged.pid"
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
        _wait(munge_works, 10, "munged to answer")
        self.started_munged = True
        self.pids["munged"] = int(pidfile.read_text())

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.root / "log" / f"{name}.out", "wb") as log:
            proc = subprocess.Popen(
                argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._procs[name] = proc
        self.pids[name] = proc.pid

    def node_state(self) -> str:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True
        )
        return out.stdout.strip() if out.returncode == 0 else ""

    def start(self, timeout: float = 30) -> SlurmCluster:
        if os.getuid() != 0:
            raise HarnessError("the Slurm test cluster needs root (slurmd starts job steps)")
        try:
            reap_orphans(self.base)
            self._ensure_munge()
            self.write_config()
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.nodename])
            log = self.root / "log" / "slurmd.log"

            def idle() -> bool:
                for name, proc in self._procs.items():
                    if proc.poll() is not None:
                        raise HarnessError(f"{name} exited with {proc.returncode}: see {log}")
                return self.node_state() in ("idle", "idle*") and not self.node_state().endswith(
                    "*"
                )

            _wait(idle, timeout, "the node to become idle", log)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop what we started, by PID only, then remove our directory."""
        if self._procs.get("slurmctld") and self._procs["slurmctld"].poll() is None:
            jobs = subprocess.run(
                ["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True
            ).stdout.split()
            if jobs:
                subprocess.run(["scancel", "--full", *jobs], env=self.env, capture_output=True)
        for name in ("slurmd", "slurmctld"):
            proc = self._procs.pop(name, None)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self.pids.pop(name, None)
        # slurmstepd and the tasks it forked are not our children; they all carry our
        # SLURM_CONF in their environment, which is how we find exactly ours.
        for pid in pids_with_env(f"SLURM_CONF={self.conf}"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.started_munged:
            pid = self.pids.pop("munged")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            _wait(lambda: not Path(f"/proc/{pid}").exists(), 10, "munged to exit")
            self.started_munged = False
        for cgroup in self.new_cgroups:
            _prune(cgroup)
        shutil.rmtree(self.root, ignore_errors=True)


def _start_time(pid: int) -> int:
    """The start time of a process (0 when it is gone): a PID plus it names one process."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def owner_stamp() -> dict[str, int]:
    """This process as the owner of what it starts."""
    return {"pid": os.getpid(), "start": _start_time(os.getpid())}


def owner_alive(owner: Optional[dict[str, int]]) -> bool:
    """Whether the process `owner_stamp` recorded still runs (no owner: it always does)."""
    if owner is None:
        return True
    return _start_time(owner["pid"]) == owner["start"]


def reap_orphans(base: Optional[str] = None) -> list[str]:
    """Stop every cluster under `base` whose owner is gone; returns their directories.

    One without an owner file is left alone (it predates owner files)."""
    reaped = []
    for root in Path(base or tempfile.gettempdir()).glob("rankwire-slurm-*"):
        try:
            owner = json.loads((root / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if owner_alive(owner):
            continue
        entry = f"SLURM_CONF={root / 'slurm.conf'}"
        for pid in pids_with_env(entry):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while pids_with_env(entry) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in pids_with_env(entry):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
        reaped.append(str(root))
    return reaped


def pids_with_env(entry: str) -> list[int]:
    """PIDs (not us, not our ancestors) whose environment holds exactly `entry`."""
    needle = entry.encode()
    skip = ancestors()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in skip:
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in env:
            found.append(int(proc.name))
    return found


@contextlib.contextmanager
def running_cluster(reason: str, **kw: Any) -> Iterator[SlurmCluster]:
    """A started SlurmCluster(**kw) for a fixture, stopped after; skips the tests when not
    root (`reason`), fails them when it cannot start. CGROUP_VAR=1 in the environment
    makes every such cluster a cgroup one (the whole suite under Slurm's cgroup plugins)."""
    import pytest

    kw.setdefault("cgroup", os.environ.get(CGROUP_VAR) == "1")
    if os.getuid() != 0:
        pytest.skip(reason)
    cluster = SlurmCluster(**kw)
    try:
        cluster.start()
    except HarnessError as err:
        pytest.fail(f"Slurm test cluster did not start: {err}")
    try:
        yield cluster
    finally:
        cluster.stop()
