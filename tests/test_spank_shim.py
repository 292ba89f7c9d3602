"""The SPANK shim (spank/*.c) under a real slurmd, against fake helpers.

Each fake is a root-owned script named by the plugstack line (`helper=FAKE timeout=3`)
that plays one part of `rankwire spank-helper check|start` -- or misplays it: stalls,
trickles, replies junk, hands over the wrong descriptors. Whatever it does, the step fails
within the timeout with one line naming the cause, no helper process is left, slurmd
carries on and the next plain job runs. The happy paths (advisory and enforced) prove the
descriptor handover, the task join and the release without the real helper.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.slurm import SlurmCluster, running_cluster, without_queue_lines
from harness.spank import SpankInstall
from harness.users import User

pytestmark = [pytest.mark.slurm]

TIMEOUT = 3  # plugstack timeout= for every fake

# One script for every fake; SCENARIO picks the part it plays. A fake holder is a detached
# process that unshares namespaces and then makes the lease (a socketpair: its peer
# credentials are the fake holder's own), and answers `leave` with last=1.
FAKE = r'''#!/usr/bin/python3
import array, ctypes, os, socket, sys, time

SCENARIO = @SCENARIO@
PHASE = sys.argv[2]
REQ = sys.stdin.buffer.read()
HERE = os.path.dirname(os.path.abspath(__file__))
NEWNS, NEWUSER = 0x00020000, 0x10000000


def reply(payload, fds=()):
    out = socket.socket(fileno=os.dup(1))
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sent = out.sendmsg([payload], anc)
    out.sendall(payload[sent:])
    out.close()


def own_ns():
    return [os.open(f"/proc/self/ns/{n}", os.O_RDONLY) for n in ("user", "mnt")]


def holder(flags, uid=None):
    """[lease, its user ns (if unshared), its mount ns] of a new fake holder."""
    parent, child = socket.socketpair()
    if os.fork() == 0:
        try:
            os.setsid()
            if os.fork():
                os._exit(0)
            null = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            me, gid = os.getuid(), os.getgid()
            if ctypes.CDLL(None, use_errno=True).unshare(flags):
                os._exit(1)
            if flags & NEWUSER:
                for name, text in (("setgroups", "deny"), ("uid_map", f"{me} {me} 1"),
                                   ("gid_map", f"{gid} {gid} 1")):
                    with open(f"/proc/self/{name}", "w") as f:
                        f.write(text)
            if uid is not None:
                os.setresuid(uid, uid, uid)
            lease, mine = socket.socketpair()
            ns = [os.open(f"/proc/self/ns/{n}", os.O_RDONLY)
                  for n in (["user"] if flags & NEWUSER else []) + ["mnt"]]
            socket.send_fds(child, [b"x"], [lease.fileno(), *ns])
            lease.close()
            if mine.recv(64).startswith(b"leave"):
                mine.sendall(b"last=1\0")
        finally:
            os._exit(0)
    os.wait()
    child.close()
    return socket.recv_fds(parent, 1, 8)[1]


if SCENARIO == "stall":
    time.sleep(3600)
elif SCENARIO == "trickle":  # two of them, in the helper's process group
    os.fork()
    while True:
        os.write(1, b"k")
        time.sleep(0.5)
elif SCENARIO == "junk":
    reply(b"this is not a frame")
elif SCENARIO == "linger":
    reply(b"skip=replied, but does not exit\0")
    time.sleep(3600)
elif SCENARIO == "no-fd":
    reply(b"checked=x\0")
elif SCENARIO == "enforced":
    reply(b"enforced=1\0workdir=/tmp\0setenv=RW_FAKE=enforced\0", holder(NEWNS))
elif SCENARIO == "enforced-not-root":
    reply(b"enforced=1\0workdir=/tmp\0", holder(NEWNS, uid=65534))
elif PHASE == "check" and SCENARIO == "lease-of-root":
    a, b = socket.socketpair()  # its peer: this process, root
    reply(b"checked=x\0", [a.fileno()])
elif PHASE == "check":
    reply(b"checked=x\0", [os.open(f"{HERE}/fd{i}", os.O_RDONLY) for i in range(3)])
elif b"checked=x\0" not in REQ:
    reply(b"error=rankwire: fake: the start request has no checked record\0")
elif SCENARIO == "start-stall":
    time.sleep(3600)
elif SCENARIO == "lease-of-root":
    reply(b"workdir=/tmp\0", [3, *own_ns()])
elif SCENARIO == "ns-mismatch":  # a real lease, but our own namespaces
    reply(b"workdir=/tmp\0", [holder(NEWUSER | NEWNS)[0], *own_ns()])
elif SCENARIO == "ns-wrong-type":  # the mount namespace in the user namespace's place
    lease, user, mnt = holder(NEWUSER | NEWNS)
    reply(b"workdir=/tmp\0", [lease, mnt, mnt])
elif SCENARIO == "own-stdout":  # the reply socket itself as the lease: no wait for EOF
    reply(b"workdir=/tmp\0", [os.dup(1), *holder(NEWUSER | NEWNS)[1:]])
elif SCENARIO == "five":
    reply(b"workdir=/tmp\0", [*holder(NEWUSER | NEWNS), *own_ns()])
elif SCENARIO == "advisory":
    seen = [os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
            for fd in range(3, 16) if os.path.exists(f"/proc/self/fd/{fd}")]
    fds = ",".join(seen).encode()
    records = [b"workdir=/tmp", b"setenv=RW_FAKE=advisory", b"setenv=RW_FDS=" + fds]
    reply(b"\0".join(records) + b"\0", holder(NEWUSER | NEWNS))
'''


@pytest.fixture(scope="module")
def shim_cluster(spank_install: SpankInstall) -> Iterator[SlurmCluster]:
    """A Slurm of its own whose plugstack each test points at its fake helper."""
    with running_cluster("the Slurm fixture needs root", base="/run") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def fakes(shared_dir: Path) -> Path:
    """A root-owned 0755 dir for the fake helpers, with the files the fake check phase
    hands over (fd0, fd1, fd2)."""
    d = shared_dir / "shim-fakes"
    d.mkdir(mode=0o755, exist_ok=True)
    for i in range(3):
        (d / f"fd{i}").write_text(f"{i}\n")
    return d


def use_fake(
    cluster: SlurmCluster, spank_install: SpankInstall, fakes: Path, scenario: str
) -> Path:
    script = fakes / f"fake-{scenario}"
    script.write_text(FAKE.replace("@SCENARIO@", repr(scenario)))
    script.chmod(0o755)
    cluster.plugstack.write_text(
        f"required {spank_install.plugin} helper={script} timeout={TIMEOUT}\n"
    )
    return script


def srun(cluster: SlurmCluster, user: User, *args: str) -> subprocess.CompletedProcess[str]:
    return without_queue_lines(user.run(["srun", *args], env=cluster.env, cwd="/tmp", timeout=120))


def running(script: Path) -> list[str]:
    out = subprocess.run(["pgrep", "-a", "-f", str(script)], capture_output=True, text=True)
    return out.stdout.splitlines()


def settled(cluster: SlurmCluster, script: Path) -> None:
    """No process of the fake left, the node idle again (slurmd answers), a plain job runs."""
    deadline = time.monotonic() + 15
    while (running(script) or cluster.node_state() != "idle") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running(script) == []
    state = cluster.node_state()
    assert state == "idle", state
    ping = subprocess.run(["scontrol", "ping"], env=cluster.env, capture_output=True, text=True)
    assert ping.returncode == 0 and "DOWN" not in ping.stdout, ping.stdout
    plain = srun(cluster, User("root", 0, 0, "/root"), "-n", "1", "true")
    assert plain.returncode == 0, plain.stderr


CHECK_TIMEOUT = f"rankwire: the helper's check phase failed: no reply within {TIMEOUT} s"
LEASE_NOT = "rankwire: the lease handed over is no Unix stream socket to a holder run by uid {uid}"


@pytest.mark.parametrize(
    ("scenario", "message"),
    [
        ("stall", CHECK_TIMEOUT),
        ("trickle", CHECK_TIMEOUT),
        ("linger", CHECK_TIMEOUT),
        ("junk", "rankwire: bad reply from the helper's check phase"),
        (
            "no-fd",
            "rankwire: the helper's check phase allowed nothing (`checked` and 1 to 64 "
            "descriptors, not 0)",
        ),
        ("start-stall", f"rankwire: the helper's start phase failed: no reply within {TIMEOUT} s"),
        ("five", "rankwire: the helper's start phase handed over 5 descriptors, not 3"),
        ("lease-of-root", LEASE_NOT),
        ("ns-mismatch", "rankwire: the user namespace fd is not the holder's"),
        ("ns-wrong-type", "rankwire: the user namespace fd is not the holder's"),
        ("own-stdout", "rankwire: the user namespace fd is not the holder's"),
        ("enforced-not-root", LEASE_NOT.format(uid=0)),
    ],
)
def test_misbehaving_helper_fails_the_step_and_nothing_else(
    shim_cluster: SlurmCluster,
    spank_install: SpankInstall,
    fakes: Path,
    base_image: Path,
    unprivileged_user: User,
    scenario: str,
    message: str,
) -> None:
    script = use_fake(shim_cluster, spank_install, fakes, scenario)
    try:
        started = time.monotonic()
        proc = srun(shim_cluster, unprivileged_user, "-n", "2", f"--container-image={base_image}",
                    "true")  # fmt: skip
        took = time.monotonic() - started
        assert proc.returncode != 0
        assert took < TIMEOUT + 10, took
        # slurmstepd prefixes each task's line with "slurmstepd-NODE: error: ".
        ours = {x.split("error: ", 1)[-1] for x in proc.stderr.splitlines() if "rankwire: " in x}
        assert ours == {message.format(uid=unprivileged_user.uid)}, proc.stderr
        settled(shim_cluster, script)
    finally:
        shim_cluster.plugstack.write_text("")


def test_bad_timeout_is_refused(
    shim_cluster: SlurmCluster, spank_install: SpankInstall, fakes: Path, base_image: Path
) -> None:
    script = use_fake(shim_cluster, spank_install, fakes, "advisory")
    shim_cluster.plugstack.write_text(
        f"required {spank_install.plugin} helper={script} timeout=0\n"
    )
    try:
        proc = srun(shim_cluster, User("root", 0, 0, "/root"), "-n", "1",
                    f"--container-image={base_image}", "true")  # fmt: skip
        assert proc.returncode != 0
        assert "rankwire: plugstack.conf timeout=0: give 1 to 86400 seconds" in proc.stderr
        settled(shim_cluster, script)
    finally:
        shim_cluster.plugstack.write_text("")


NS_PROBE = (
    'echo "$RW_FAKE $RW_FDS $(pwd) $(id -u) $(stat -L -c %i /proc/self/ns/user) '
    '$(stat -L -c %i /proc/self/ns/mnt) $(grep NoNewPrivs /proc/self/status | cut -f2)"'
)


def slurmd_log(cluster: SlurmCluster, since: int = 0) -> str:
    """What slurmd and its slurmstepds logged from offset `since` on."""
    return (cluster.root / "log" / "slurmd.log").read_bytes()[since:].decode(errors="replace")


def host_ns(kind: str) -> str:
    return str(os.stat(f"/proc/self/ns/{kind}").st_ino)


def test_advisory_handover_join_and_release(
    shim_cluster: SlurmCluster,
    spank_install: SpankInstall,
    fakes: Path,
    base_image: Path,
    unprivileged_user: User,
) -> None:
    """check hands over fds 3, 4, 5 (in order, nothing else); start's fake holder is
    joined by both tasks (user + mount namespace), left, and gone when srun returns."""
    script = use_fake(shim_cluster, spank_install, fakes, "advisory")
    try:
        user, mark = unprivileged_user, len(slurmd_log(shim_cluster))
        proc = srun(shim_cluster, user, "-n", "2", f"--container-image={base_image}",
                    "sh", "-c", NS_PROBE)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert len(lines) == 2 and len(set(lines)) == 1, proc.stdout  # one container
        fake, fds, cwd, uid, userns, mntns, nnp = lines[0].split()
        assert (fake, fds, cwd, uid, nnp) == ("advisory", "fd0,fd1,fd2", "/tmp", str(user.uid), "1")
        assert userns != host_ns("user") and mntns != host_ns("mnt")
        settled(shim_cluster, script)
        assert "rankwire" not in slurmd_log(shim_cluster, mark), "the release went wrong"
    finally:
        shim_cluster.plugstack.write_text("")


def test_enforced_join_is_mount_namespace_only(
    shim_cluster: SlurmCluster,
    spank_install: SpankInstall,
    fakes: Path,
    base_image: Path,
    unprivileged_user: User,
) -> None:
    """enforced=1: no start phase; task_init_privileged enters the mount namespace as
    root, the task runs as the user in the host's user namespace, no_new_privs set."""
    script = use_fake(shim_cluster, spank_install, fakes, "enforced")
    try:
        user, mark = unprivileged_user, len(slurmd_log(shim_cluster))
        proc = srun(shim_cluster, user, "-n", "2", f"--container-image={base_image}",
                    "sh", "-c", NS_PROBE)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert len(lines) == 2 and len(set(lines)) == 1, proc.stdout
        fake, cwd, uid, userns, mntns, nnp = lines[0].split()
        assert (fake, cwd, uid, nnp) == ("enforced", "/tmp", str(user.uid), "1")
        assert userns == host_ns("user") and mntns != host_ns("mnt")
        settled(shim_cluster, script)
        assert "rankwire" not in slurmd_log(shim_cluster, mark), "the release went wrong"
    finally:
        shim_cluster.plugstack.write_text("")
