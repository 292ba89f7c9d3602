"""A holder, or the parent of `rankwire exec`, killed with SIGKILL: what is left of it
goes without waiting for a later start's prune (issue 13, fault matrix rows
holder-sigkill and srun-slurmstepd-sigkill)."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.procs import asleep, child_of
from harness.users import User
from rankwire.runtime.instance import listen_at, prune_stale

pytestmark = pytest.mark.usefixtures("nothing_left_behind")


def _gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not Path(f"/proc/{pid}").exists()


def test_prune_stale_removes_dead_named_sockets(tmp_path: Path) -> None:
    """A SIGKILLed shared holder's instances/<key>.sock is pruned like an e-*.sock; a
    live one and a starting holder's temporary name (t-<pid>-...) are not."""
    (tmp_path / "instances").mkdir()
    dead, live = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    starting = socket.socket(socket.AF_UNIX)
    with dead, live, starting:
        dead.bind(str(tmp_path / "instances" / "slurm-7.0-0123abcd.sock"))
        live.bind(str(tmp_path / "instances" / "slurm-7.1-0123abcd.sock"))
        live.listen(1)
        starting.bind(str(tmp_path / "instances" / "t-1-slurm-7.2-0123abcd.sock"))
        dead.close()
        prune_stale(tmp_path)
        assert sorted(p.name for p in (tmp_path / "instances").iterdir()) == [
            "slurm-7.1-0123abcd.sock",
            "t-1-slurm-7.2-0123abcd.sock",
        ]


def test_a_bridge_server_takes_a_dead_sockets_name_never_a_live_ones(tmp_path: Path) -> None:
    """`listen_at` (the PMI bridge servers' sockets): over a SIGKILLed server's socket it
    listens; over a live one it fails with EADDRINUSE and leaves that one in place."""
    path = str(tmp_path / "pmibridge.7.0.0")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()
    with listen_at(path) as first:
        with pytest.raises(OSError) as refused:
            listen_at(path)
        assert refused.value.errno == errno.EADDRINUSE
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(path)  # still the first server's
            conn, _ = first.accept()
            conn.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pmibridge.7.0.0"]


def test_a_killed_shared_holders_files_go_with_its_job(runner: User, base_image: Path) -> None:
    """The `rankwire exec` holding a lease on a shared container sees its holder die and
    removes the holder's instances/<key>.sock and s-<id> itself (nothing_left_behind)."""
    key = f"killed-shared-{runner.name}"
    rankwire = 0
    proc = subprocess.Popen(
        runner.argv(["rankwire", "exec", "--share", key, str(base_image), "sleep", "60"]),
        cwd="/tmp",
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                rankwire = proc.pid if runner.uid == os.getuid() else child_of(proc.pid)
                holder = child_of(rankwire, "rankwire-holder")
                if asleep(child_of(rankwire, "sleep")):
                    break
            except AssertionError:
                pass
            time.sleep(0.05)
        os.kill(holder, signal.SIGKILL)
        assert proc.wait(10) == 137, proc.stderr.read() if proc.stderr else ""
    finally:
        if rankwire and proc.poll() is None:
            os.kill(rankwire, signal.SIGTERM)
        proc.wait(10)


# A parent named slurmstepd (as Slurm's is) that starts `rankwire exec` and sleeps.
FAKE_STEPD = """
import ctypes, subprocess, sys, time
ctypes.CDLL(None).prctl(15, b"slurmstepd", 0, 0, 0)
child = subprocess.Popen(sys.argv[1:])
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("parent", ["slurmstepd", "sh"])
def test_exec_ends_with_a_killed_slurmstepd(runner: User, base_image: Path, parent: str) -> None:
    """`rankwire exec` whose parent is slurmstepd ends (its command, container and holder
    too) when that parent is SIGKILLed; under any other parent it lives on (nohup)."""
    script = FAKE_STEPD if parent == "slurmstepd" else FAKE_STEPD.replace("slurmstepd", "sh")
    python = f"{runner.bindir}/python" if runner.bindir else sys.executable
    stepd = subprocess.Popen(
        runner.argv([python, "-c", script, "rankwire", "exec", str(base_image), "sleep", "60"]),
        cwd="/tmp",
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert stepd.stdout is not None
        rankwire = int(stepd.stdout.readline())
        fake = proc_parent(rankwire)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                command = child_of(rankwire, "sleep")
                break
            except AssertionError:
                time.sleep(0.05)
        os.kill(fake, signal.SIGKILL)
        if parent == "slurmstepd":
            assert _gone(rankwire) and _gone(command)
        else:
            time.sleep(1)
            assert Path(f"/proc/{command}").exists()
            os.kill(rankwire, signal.SIGTERM)
            assert _gone(rankwire) and _gone(command)
    finally:
        if stepd.poll() is None:
            stepd.kill()
        stepd.wait()


def proc_parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
