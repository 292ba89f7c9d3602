"""A Slurm "cluster in a box": slurmctld and N slurmd, each in its own network namespace.

Layout (X is a free index, picked at start so several boxes can coexist):

    host (submit host)   bridge rwmnX       10.253.X.1/24   srun/sbatch/salloc run here
    ctl                  netns rwmnX-ctl    10.253.X.10     slurmctld
    node1..nodeN         netns rwmnX-nodeK  10.253.X.(10+K) slurmd

Every daemon runs as
    nsenter --net=/run/netns/<ns> unshare --uts --ipc --mount --propagation private -- sh -c INIT
where INIT sets the hostname, mounts a sysfs of the netns (carrying the host cgroup tree
over: slurmd wants it), binds a private /etc/hosts, mounts a private /run (the host's
/run/munge bound back in: the host munged serves every node), /dev/shm and /tmp, and binds
the directories the jobs need that live under the host's /tmp back into the private /tmp
(they act as the shared file system), then execs the daemon. A private IPC namespace and
/dev/shm per node keep UCX and Open MPI from taking the fake nodes for one host. The
namespaces have no default route and IPv6 is off: traffic stays on the private bridge.

Teardown never goes by name: the recorded daemon PIDs (after checking that they still live
in our netns), then anything else living in one of our netns, then host processes carrying
our SLURM_CONF (srun/salloc of a test that timed out), then veths, netns, bridge, directory.

A box whose owner was killed (SIGKILL, or a SIGTERM the test session could not turn into a
teardown) is found by the next start: every box writes its state, with its owner's PID and
start time, to STATE_FILE in its directory as soon as it claims anything, and `start` first
stops every box whose owner is gone (`reap_orphans`). A box started by the command line
below has no owner (it lives until `down`).

Command line (for humans; `make cluster-up` / `make cluster-down`):
    python tests/harness/multinode.py up [-n NODES] [--state FILE] [--shared DIR]...
    python tests/harness/multinode.py down [--state FILE]
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # run as a script: make `harness` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.slurm import (
    COMMON_CONF,
    HarnessError,
    munge_works,
    owner_alive,
    owner_stamp,
    pids_with_env,
)

PREFIX = "rwmn"  # bridge rwmnX, veths rwmnXvK, netns rwmnX-<name>: all ours carry it
SUBNET = "10.253"
CTLD_PORT = 7817
SLURMD_PORT = 7818
NETNS_DIR = Path("/run/netns")
DEFAULT_STATE = Path("/tmp/rankwire-cluster.json")
# Where the box's directory (conf, state, spools, logs) goes: like a real SlurmdSpoolDir it
# lies outside /tmp (private per node) and outside what containers bind by default.
DEFAULT_BASE = "/var/spool"
STATE_FILE = "state.json"  # in the box's directory: what `reap_orphans` needs to stop it


@dataclasses.dataclass
class Member:
    """One daemon of the box: its host name, netns, address and host-side veth."""

    name: str
    netns: str
    ip: str
    veth: str
    pid: int = 0
    ns_inode: int = 0


def _run(argv: Sequence[str], what: str, **kw: Any) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise HarnessError(f"{what} failed ({shlex.join(argv)}): {proc.stderr.strip()}")
    return proc


def _ip_batch(commands: Iterable[str], what: str, netns: Optional[str] = None) -> None:
    argv = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    _run(argv, what, input="\n".join(commands) + "\n")


def _sysctl_off_ipv6(ifname: str) -> None:
    with contextlib.suppress(OSError):
        Path(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6").write_text("1")


def _ns_inode(pid: int) -> int:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return 0


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _under_tmp_roots(paths: Iterable[Path]) -> list[Path]:
    """The directories under /tmp among `paths`, without those inside another one."""
    tmp = Path("/tmp").resolve()
    found = sorted({Path(p).resolve() for p in paths if Path(p).resolve().is_relative_to(tmp)})
    found = [p for p in found if p != tmp]
    return [p for p in found if not any(q != p and p.is_relative_to(q) for q in found)]


# The init of every member: $1 = hostname, $2 = stage dir, $3 = hosts file, $4 = the
# dirs under the host's /tmp (colon-separated) the jobs need; then the daemon. Those dirs
# are bound at /run/shared/<path> and reached through symlinks at <path> in the private
# /tmp: a /tmp with submounts could not be bound into an unprivileged container (the
# kernel refuses a non-recursive bind of a mount with locked submounts: EINVAL).
INIT = r"""
set -eu
name=$1 stage=$2 hosts=$3 keep=$4
shift 4
hostname "$name"
mount -n --rbind /sys/fs/cgroup "$stage/cgroup"
mount -n -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -n --move "$stage/cgroup" /sys/fs/cgroup
mount -n --bind "$hosts" /etc/hosts
mount -n -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$stage/run"
mkdir "$stage/run/munge"
mount -n --bind /run/munge "$stage/run/munge"
mount -n -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$stage/tmp"
IFS=:
for dir in $keep; do
    mkdir -p "$stage/run/shared$dir" "$(dirname "$stage/tmp${dir#/tmp}")"
    mount -n --bind "$dir" "$stage/run/shared$dir"
    ln -s "/run/shared$dir" "$stage/tmp${dir#/tmp}"
done
unset IFS
mount -n --move "$stage/run" /run
mount -n -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
mount -n --move "$stage/tmp" /tmp
exec "$@"
"""


class MultiNodeCluster:
    """slurmctld + `nodes` slurmd, each in its own netns on a private bridge."""

    def __init__(
        self,
        nodes: int = 2,
        shared: Iterable[Path] = (),
        cpus: Optional[int] = None,
        base: Optional[str] = None,
        plugin: bool = False,
    ) -> None:
        if not 1 <= nodes <= 32:
            raise ValueError("nodes must be 1..32")
        self.nodes = nodes
        self.cpus = cpus or len(os.sched_getaffinity(0))
        self.shared = [Path(p) for p in shared]
        self.base = base
        self.plugin = plugin  # rankwire's SPANK plugin in the plugstack from the start
        self.plugin_note = ""
        self.index = -1
        self.root = Path()
        self.members: list[Member] = []
        self.started_munged = False
        self.timings: dict[str, float] = {}
        self.owner: Optional[dict[str, int]] = owner_stamp()

    # -- names -------------------------------------------------------------------------
    @property
    def bridge(self) -> str:
        return f"{PREFIX}{self.index}"

    @property
    def host_ip(self) -> str:
        return f"{SUBNET}.{self.index}.1"

    @property
    def ctl(self) -> Member:
        return self.members[0]

    @property
    def node_members(self) -> list[Member]:
        return self.members[1:]

    @property
    def node_names(self) -> list[str]:
        return [m.name for m in self.node_members]

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """Environment for srun/sbatch/salloc/sinfo against this box (no inherited SLURM_*)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_"))}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def log(self, name: str) -> Path:
        return self.root / "log" / f"{name}.log"

    # -- network -----------------------------------------------------------------------
    def _claim_index(self) -> None:
        """Create our bridge under the first free index: creating it is the lock."""
        addrs = _run(["ip", "-4", "-o", "addr", "show"], "listing addresses").stdout
        for index in range(256):
            name = f"{PREFIX}{index}"
            if (
                Path(f"/sys/class/net/{name}").exists()
                or f" {SUBNET}.{index}." in addrs
                or any(NETNS_DIR.glob(f"{name}-*"))
            ):
                continue
            proc = subprocess.run(
                ["ip", "link", "add", "name", name, "type", "bridge"],
                capture_output=True,
                text=True,
            )
            if proc.returncode == 0:
                self.index = index
                return
            if "exists" not in proc.stderr:
                raise HarnessError(f"cannot create bridge {name}: {proc.stderr.strip()}")
        raise HarnessError("no free rwmnX bridge index")

    def _plan_members(self) -> None:
        x = self.index
        self.members = [Member("ctl", f"{PREFIX}{x}-ctl", f"{SUBNET}.{x}.10", f"{PREFIX}{x}v0")]
        for k in range(1, self.nodes + 1):
            self.members.append(
                Member(
                    f"node{k}", f"{PREFIX}{x}-node{k}", f"{SUBNET}.{x}.{10 + k}", f"{PREFIX}{x}v{k}"
                )
            )

    def _setup_network(self) -> None:
        self._claim_index()
        self._plan_members()
        self._record()  # before the netns exist: a reaper must know their names
        _sysctl_off_ipv6(self.bridge)
        host = [f"netns add {m.netns}" for m in self.members]
        host += [
            f"link add {m.veth} type veth peer name eth0 netns {m.netns}" for m in self.members
        ]
        _ip_batch(host, "creating netns and veths")
        for m in self.members:
            _sysctl_off_ipv6(m.veth)
            m.ns_inode = os.stat(NETNS_DIR / m.netns).st_ino
        self._record()
        up = [f"addr add {self.host_ip}/24 dev {self.bridge}", f"link set {self.bridge} up"]
        up += [f"link set {m.veth} master {self.bridge} up" for m in self.members]
        _ip_batch(up, "bringing the bridge up")
        for m in self.members:
            # IPv6 off inside (lo included), then lo + eth0 up; no default route.
            script = (
                "echo 1 >/proc/sys/net/ipv6/conf/all/disable_ipv6; "
                "echo 1 >/proc/sys/net/ipv6/conf/default/disable_ipv6; "
                "echo 1 >/proc/sys/net/ipv6/conf/eth0/disable_ipv6; "
                f"ip addr add {m.ip}/24 dev eth0 && ip link set eth0 up && ip link set lo up"
            )
            _run(
                ["nsenter", f"--net={NETNS_DIR / m.netns}", "sh", "-c", script], f"netns {m.netns}"
            )

    # -- configuration -----------------------------------------------------------------
    def _write_files(self) -> None:
        r = self.root
        for sub in ("state", "log"):
            (r / sub).mkdir(mode=0o755)
        for m in self.members:
            for sub in ("spool", "stage/cgroup", "stage/run", "stage/tmp"):
                (r / m.name / sub).mkdir(mode=0o755, parents=True)
        # Before any slurmd starts: slurmd runs the SPANK job epilogs (which end named
        # containers) only of the plugins it loaded at its start.
        (r / "plugstack.conf").write_text(_install_plugin(self) if self.plugin else "")
        hosts = ["127.0.0.1 localhost", f"{self.host_ip} {socket.gethostname()} submit"]
        hosts += [f"{m.ip} {m.name}" for m in self.members]
        (r / "hosts").write_text("\n".join(hosts) + "\n")
        node_list = f"node[1-{self.nodes}]" if self.nodes > 1 else "node1"
        lines = [
            f"ClusterName={self.bridge}",
            f"SlurmctldHost=ctl({self.ctl.ip})",
            f"SlurmctldPort={CTLD_PORT}",
            f"SlurmdPort={SLURMD_PORT}",
            *COMMON_CONF,
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/%n/spool",
            "SlurmctldPidFile=/run/slurmctld.pid",  # /run is private per member
            "SlurmdPidFile=/run/slurmd.pid",
            f"SlurmctldLogFile={r}/log/ctl.log",
            f"SlurmdLogFile={r}/log/%n.log",
            "TmpFS=/tmp",
            f"PlugStackConfig={r}/plugstack.conf",
            "MessageTimeout=10",
        ]
        lines += [
            f"NodeName={m.name} NodeAddr={m.ip} CPUs={self.cpus} State=UNKNOWN"
            for m in self.node_members
        ]
        lines.append(f"PartitionName=debug Nodes={node_list} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        for p in (self.conf, r / "hosts", r / "plugstack.conf"):
            p.chmod(0o644)

    # -- lifecycle ---------------------------------------------------------------------
    def _spawn(self, m: Member, daemon: list[str]) -> None:
        keep = _under_tmp_roots([self.root, *self.shared])
        argv = [
            "nsenter",
            f"--net={NETNS_DIR / m.netns}",
            "unshare",
            "--uts",
            "--ipc",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            INIT,
            "init",
            m.name,
            str(self.root / m.name / "stage"),
            str(self.root / "hosts"),
            ":".join(map(str, keep)),
            *daemon,
        ]
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
        env["SLURM_CONF"] = str(self.conf)
        with open(self.root / "log" / f"{m.name}.out", "wb") as out:
            proc = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        m.pid = proc.pid  # nsenter, unshare and sh all exec: this is the daemon
        self._record()

    def node_states(self) -> dict[str, str]:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %T"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode != 0:
            return {}
        return dict(line.split() for line in out.stdout.splitlines() if line.strip())

    def _ensure_munge(self) -> None:
        if munge_works():
            return
        run = Path("/run/munge")
        run.mkdir(parents=True, exist_ok=True)
        shutil.chown(run, "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
        deadline = time.monotonic() + 10
        while not munge_works():
            if time.monotonic() > deadline:
                raise HarnessError("munged did not answer")
            time.sleep(0.1)
        self.started_munged = True

    def start(self, timeout: float = 30) -> MultiNodeCluster:
        if os.getuid() != 0:
            raise HarnessError("the multi-node box needs root (netns, bridge, slurmd)")
        for tool in ("ip", "nsenter", "unshare", "slurmctld", "slurmd", "sinfo"):
            if not shutil.which(tool):
                raise HarnessError(f"{tool} not found: run `make test`, which installs it")
        t0 = time.monotonic()
        try:
            base = self.base or (DEFAULT_BASE if os.access(DEFAULT_BASE, os.W_OK) else None)
            reap_orphans(base)
            self._ensure_munge()
            self.root = Path(tempfile.mkdtemp(prefix="rankwire-mn-", dir=base))
            self.root.chmod(0o755)  # job users read slurm.conf, write their spool dirs
            self._record()
            self._setup_network()
            self._write_files()
            self._spawn(self.ctl, ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            for m in self.node_members:
                self._spawn(m, ["slurmd", "-D", "-f", str(self.conf), "-N", m.name])
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        self.timings["start"] = time.monotonic() - t0
        return self

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for m in self.members:
                if not _alive(m.pid):
                    tail = ""
                    for f in (self.root / "log" / f"{m.name}.out", self.log(m.name)):
                        if f.exists():
                            tail += f"\n--- {f}\n" + "\n".join(
                                f.read_text(errors="replace").splitlines()[-15:]
                            )
                    raise HarnessError(f"{m.name} exited during start{tail}")
            # sinfo sleeps a whole second when slurmctld is not listening yet: probe first
            states = self.node_states() if self._ctld_listens() else {}
            if len(states) == self.nodes and all(s == "idle" for s in states.values()):
                return
            if time.monotonic() > deadline:
                raise HarnessError(f"nodes not idle after {timeout:.0f}s: {states}")
            time.sleep(0.02)

    def _ctld_listens(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            return s.connect_ex((self.ctl.ip, CTLD_PORT)) == 0

    # -- processes ---------------------------------------------------------------------
    def inodes(self) -> set[int]:
        return {m.ns_inode for m in self.members if m.ns_inode}

    def processes(self, members: Optional[Iterable[Member]] = None) -> list[int]:
        """Every PID living in the network namespace of `members` (all: daemons included)."""
        inodes = {m.ns_inode for m in (self.members if members is None else members)}
        inodes.discard(0)
        found = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and _ns_inode(int(proc.name)) in inodes:
                found.append(int(proc.name))
        return found

    def strays(self) -> list[str]:
        """Processes on the nodes other than slurmd: a finished job leaves none."""
        daemons = {m.pid for m in self.members}
        out = []
        for pid in self.processes(self.node_members):
            if pid in daemons or not _alive(pid):
                continue
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            out.append(f"{pid} {comm}")
        return out

    def reap(self, grace: float = 5.0) -> list[str]:
        """Cancel every job and wait for job processes to go; SIGKILL what stays.

        Returns what had to be killed (empty when the jobs cleaned up after themselves).
        """
        for pid in pids_with_env(f"SLURM_CONF={self.conf}"):
            if _ns_inode(pid) not in self.inodes():  # srun/salloc left on the host
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        jobs = subprocess.run(
            ["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True
        ).stdout.split()
        if jobs:
            subprocess.run(["scancel", *jobs], env=self.env, capture_output=True)
        deadline = time.monotonic() + grace
        while self.strays() and time.monotonic() < deadline:
            time.sleep(0.05)
        killed = self.strays()
        daemons = {m.pid for m in self.members}
        for pid in self.processes(self.node_members):
            if pid not in daemons:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return killed

    def net_bytes(self) -> dict[str, tuple[int, int]]:
        """Per node: (bytes the node sent, bytes it received), read on the host-side veth."""
        out = {}
        for m in self.node_members:
            stats = Path(f"/sys/class/net/{m.veth}/statistics")
            # host side rx = what the node transmitted, and the other way round
            out[m.name] = (
                int((stats / "rx_bytes").read_text()),
                int((stats / "tx_bytes").read_text()),
            )
        return out

    # -- teardown ----------------------------------------------------------------------
    def stop(self) -> None:
        """Tear everything down; safe to call twice and after a failed start."""
        t0 = time.monotonic()
        inodes = self.inodes()
        if self.root != Path() and self.conf.exists():
            for pid in pids_with_env(f"SLURM_CONF={self.conf}"):
                if _ns_inode(pid) not in inodes:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        # 1. the daemons we recorded, only if they still are ours
        mine = [m.pid for m in self.members if m.pid and _ns_inode(m.pid) in inodes]
        for pid in mine:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 3
        while any(_alive(p) for p in mine) and time.monotonic() < deadline:
            time.sleep(0.02)
        # 2. anything still in our namespaces: daemons that hung, slurmstepd, tasks,
        #    container holders, FUSE daemons (their mount namespaces go with them)
        deadline, survivors = time.monotonic() + 10, []
        while inodes:
            left = [p for p in self.processes() if _alive(p)]
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                survivors = left  # reported below, after the rest is torn down
                break
            time.sleep(0.02)
        for m in self.members:
            m.pid = 0
        # 3. links, namespaces, bridge (by their exact names)
        if self.index >= 0:
            for m in self.members:
                if Path(f"/sys/class/net/{m.veth}").exists():
                    subprocess.run(["ip", "link", "del", m.veth], capture_output=True)
                if (NETNS_DIR / m.netns).exists():
                    subprocess.run(["ip", "netns", "del", m.netns], capture_output=True)
            if Path(f"/sys/class/net/{self.bridge}").exists():
                subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        if self.started_munged:
            pidfile = Path("/run/munge/munged.pid")
            with contextlib.suppress(OSError, ValueError, ProcessLookupError):
                os.kill(int(pidfile.read_text()), signal.SIGTERM)
            self.started_munged = False
        if self.root != Path():
            shutil.rmtree(self.root, ignore_errors=True)
        self.timings["stop"] = time.monotonic() - t0
        if survivors:
            raise HarnessError(f"processes in our netns survive SIGKILL: {survivors}")

    def leftovers(self) -> list[str]:
        """Anything of this box still on the machine (after stop: must be empty)."""
        found = []
        if self.index >= 0:
            names = [self.bridge, *(m.veth for m in self.members)]
            found += [f"link {n}" for n in names if Path(f"/sys/class/net/{n}").exists()]
            found += [f"netns {m.netns}" for m in self.members if (NETNS_DIR / m.netns).exists()]
            found += [
                f"mount {line}"
                for line in Path("/proc/self/mountinfo").read_text().splitlines()
                if f"/{PREFIX}{self.index}-" in line
                or (self.root != Path() and str(self.root) in line)
            ]
        found += [f"process {p}" for p in self.processes()]
        if self.root != Path() and self.root.exists():
            found.append(f"directory {self.root}")
        return found

    # -- persistence: the reaper, `make cluster-up` / `make cluster-down` ----------------
    def save(self, path: Path) -> None:
        state = {
            "nodes": self.nodes,
            "cpus": self.cpus,
            "index": self.index,
            "root": str(self.root),
            "members": [dataclasses.asdict(m) for m in self.members],
            "owner": self.owner,
        }
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(state, indent=1) + "\n")
        tmp.replace(path)  # a reaper never reads half a state

    def _record(self) -> None:
        self.save(self.root / STATE_FILE)

    def disown(self) -> None:
        """Keep the box when this process ends (the command line's `up`)."""
        self.owner = None
        self._record()

    @classmethod
    def load(cls, path: Path) -> MultiNodeCluster:
        state = json.loads(path.read_text())
        c = cls(state["nodes"], cpus=state["cpus"])
        c.index, c.root = state["index"], Path(state["root"])
        c.members = [Member(**m) for m in state["members"]]
        c.owner = state.get("owner")
        return c


def reap_orphans(base: Optional[str] = None) -> list[str]:
    """Stop every box under `base` whose owner is gone; returns their directories.

    A directory without a state file is left alone: its owner may be between mkdtemp and
    its first write, or predate state files.
    """
    reaped = []
    for root in Path(base or tempfile.gettempdir()).glob("rankwire-mn-*"):
        try:
            cluster = MultiNodeCluster.load(root / STATE_FILE)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if owner_alive(cluster.owner) or cluster.root != root:
            continue
        with contextlib.suppress(HarnessError):
            cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        reaped.append(str(root))
    return reaped


# -- an MPI program whose traffic must cross the network ----------------------------------

# Prints the same line as examples/hello_mpi.c (so harness.mpi.assert_hello checks it), but
# first swaps BYTES bytes with the rank size/2 away (on another node with the block
# distribution of `-N2 -n4` / `-N4 -n4`) and checks every byte: the veth counters then
# have to grow by at least BYTES per node and direction.
XNODE_C = r"""
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    int rank, size, value, sum, good = 1, all_good;
    char host[256];
    long i, n = argc > 1 ? atol(argv[1]) : 1L << 22;
    unsigned char *out, *in;

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    gethostname(host, sizeof host);
    host[sizeof host - 1] = '\0';
    out = malloc(n);
    in = malloc(n);
    for (i = 0; i < n; i++)
        out[i] = (unsigned char)(rank * 31 + i * 7);
    int peer = (rank + size / 2) % size;
    MPI_Sendrecv(out, (int)n, MPI_BYTE, peer, 0, in, (int)n, MPI_BYTE, peer, 0,
                 MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    for (i = 0; i < n; i++)
        if (in[i] != (unsigned char)(peer * 31 + i * 7)) {
            good = 0;
            break;
        }
    value = rank + 1;
    MPI_Allreduce(&value, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    MPI_Allreduce(&good, &all_good, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    printf("hello rank=%d size=%d host=%s sum=%d %s\n", rank, size, host, sum,
           sum == size * (size + 1) / 2 && all_good ? "ok" : "WRONG");
    fflush(stdout);
    MPI_Finalize();
    return all_good ? 0 : 1;
}
"""
XNODE_BYTES = 4 << 20


@dataclasses.dataclass(frozen=True)
class XnodePrograms:
    mpich: Path
    ompi: Path


def compile_xnode(bindir: Path) -> XnodePrograms:
    """The cross-node program, built with Debian's MPICH (PMI-1) and Open MPI (PMIx)."""
    bindir.mkdir(mode=0o755, parents=True, exist_ok=True)
    src = bindir / "xnode.c"
    src.write_text(XNODE_C)
    progs = XnodePrograms(bindir / "xnode_mpich", bindir / "xnode_ompi")
    for mpicc, out in (("mpicc.mpich", progs.mpich), ("mpicc.openmpi", progs.ompi)):
        if not shutil.which(mpicc):
            raise HarnessError(f"{mpicc} not found: run `make test`, which installs it")
        _run([mpicc, "-O1", str(src), "-o", str(out)], f"compiling {out.name}")
        out.chmod(0o755)
    return progs


# Plugin trees both MPIs dlopen (UCX for MPICH; Open MPI's MCA components, PMIx's own).
GLIBC_EXTRA = ("libdl.so.2", "librt.so.1", "libpthread.so.0", "libm.so.6")
MPI_TREES = (
    "/usr/lib/x86_64-linux-gnu/ucx",
    "/usr/lib/x86_64-linux-gnu/openmpi",
    "/usr/lib/x86_64-linux-gnu/pmix2",
    "/usr/share/openmpi",
    "/etc/openmpi",
)


def build_xnode_image(where: Path, progs: XnodePrograms) -> Path:
    """A SIF with /opt/xnode_mpich and /opt/xnode_ompi and what both MPIs load."""
    from harness.images import make_rootfs, make_world_readable
    from rankwire.runtime.build import build_image

    rootfs = make_rootfs(
        where / "xnode-rootfs",
        binaries=[str(progs.mpich), str(progs.ompi)],
        trees=[t for t in MPI_TREES if Path(t).exists()],
    )
    (rootfs / "opt").mkdir(exist_ok=True)
    for prog in (progs.mpich, progs.ompi):
        shutil.copy2(prog, rootfs / "opt" / prog.name)
    for name in GLIBC_EXTRA:  # what a host MPI injected with --host-mpi may need
        shutil.copy2(f"/lib/x86_64-linux-gnu/{name}", rootfs / "lib/x86_64-linux-gnu" / name)
    out = where / "xnode.sif"
    build_image(out, rootfs, runscript='#!/bin/sh\nexec /opt/xnode_mpich "$@"\n')
    shutil.rmtree(rootfs)
    make_world_readable(where)
    return out


def _install_plugin(cluster: MultiNodeCluster) -> str:
    """rankwire's SPANK plugin as `make -C spank install` puts it (below the box's root,
    which every node sees; removed with it), the helper from this checkout's venv, the
    sample (permissive) policy. Returns the plugstack's text; `cluster.plugin_note` says
    how to try it."""
    from harness.spank import install_plugin

    repo = Path(__file__).resolve().parents[2]
    helper = str(Path(sys.executable).with_name("rankwire"))
    spank = install_plugin(repo, cluster.root / "spank-prefix", helper)
    cluster.plugin_note = (
        f"  plugin: {spank.plugin} (policy {spank.policy}); try\n"
        f"    srun -N2 -n4 --mpi=pmi2 --container-image=IMG.sif CMD\n"
    )
    return spank.plugstack_line()


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Slurm cluster in network namespaces.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a box and print how to use it")
    up.add_argument("-n", "--nodes", type=int, default=2)
    up.add_argument("--shared", action="append", default=[], type=Path, metavar="DIR")
    up.add_argument(
        "--no-plugin",
        action="store_true",
        help="leave rankwire's SPANK plugin out of the plugstack (it is loaded by default)",
    )
    down = sub.add_parser("down", help="stop the box recorded in the state file")
    for p in (up, down):
        p.add_argument("--state", type=Path, default=DEFAULT_STATE)
    args = ap.parse_args(argv)
    if args.cmd == "up":
        if args.state.exists():
            print(f"{args.state} exists: run `make cluster-down` first", file=sys.stderr)
            return 1
        cluster = MultiNodeCluster(args.nodes, shared=args.shared, plugin=not args.no_plugin)
        cluster.start()
        cluster.disown()
        cluster.save(args.state)
        print(
            f"cluster {cluster.bridge} up in {cluster.timings['start']:.2f}s: "
            f"{', '.join(cluster.node_names)} (ctl {cluster.ctl.ip})\n"
            f"  export SLURM_CONF={cluster.conf}\n"
            f"  shared dir for jobs (node /tmp is private): {cluster.root}\n"
            f"  a shell on node1: nsenter -t {cluster.node_members[0].pid} -n -m -u -i bash\n"
            f"{cluster.plugin_note}"
            f"  stop: make cluster-down"
        )
        return 0
    if not args.state.exists():
        print(f"no {args.state}: nothing to stop", file=sys.stderr)
        return 0
    cluster = MultiNodeCluster.load(args.state)
    cluster.stop()
    left = cluster.leftovers()
    args.state.unlink()
    print(f"cluster {cluster.bridge} down in {cluster.timings['stop']:.2f}s")
    if left:
        print("left behind: " + "; ".join(left), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
