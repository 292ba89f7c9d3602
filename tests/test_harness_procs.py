"""The harness's process bookkeeping: `User.run` timeouts leave nothing of what they
started; the plugin's leftovers are told from another session's."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.spank import HELPER_ENV, SESSION_ROOTS, spank_leftovers
from harness.users import User


def running(cmdline: str) -> list[int]:
    """Live (not zombie) processes whose command line is `cmdline`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if (
                proc.name.isdigit()
                and (proc / "cmdline").read_bytes().replace(b"\0", b" ").strip() == cmdline.encode()
                and (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            ):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_a_timeout_kills_every_process_the_command_started(runner: User) -> None:
    # A duration no other process uses: the command line names this test's sleeps.
    sleep = f"sleep 300.{int.from_bytes(os.urandom(3), 'big')}"
    # In the foreground, in the background, and in a session of its own (as a detached
    # holder makes): a timeout that kills only runuser (or sh) leaves all three.
    script = f"{sleep} & setsid {sleep} & {sleep}; wait"
    with pytest.raises(subprocess.TimeoutExpired):
        runner.run(["sh", "-c", script], timeout=2)
    assert running(sleep) == []


def daemon_like_the_plugins(name: Path, cwd: Path, seconds: int) -> int:
    """A process named like a FUSE daemon, with the helper's fixed environment, reparented
    to init (as the plugin's holders are): the pid of `name SECONDS` sleeping in `cwd`."""
    env = dict(e.decode().split("=", 1) for e in HELPER_ENV)
    subprocess.run(["setsid", "-f", str(name), str(seconds)], env=env, cwd=cwd, check=True)
    deadline = time.monotonic() + 5
    while not (found := running(f"{name} {seconds}")) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found[0]


@pytest.fixture
def fake_daemons(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    bindir = tmp_path_factory.mktemp("bin")
    shutil.copy("/bin/sleep", bindir / "squashfuse_ll")
    yield bindir / "squashfuse_ll"
    for seconds in (61, 62):
        for pid in running(f"{bindir / 'squashfuse_ll'} {seconds}"):
            os.kill(pid, 9)


def test_spank_leftovers_are_this_sessions_only(fake_daemons: Path, shared_dir: Path) -> None:
    assert shared_dir in SESSION_ROOTS
    # Another session's: a file open in its shared dir, none in ours.
    other_dir = Path(tempfile.mkdtemp(prefix="rankwire-tests-"))
    try:
        other = daemon_like_the_plugins(fake_daemons, other_dir, 61)
        assert f"process {other} squashfuse_ll" not in spank_leftovers()
    finally:
        os.rmdir(other_dir)
    ours = daemon_like_the_plugins(fake_daemons, shared_dir, 62)  # has a file of ours open
    assert f"process {ours} squashfuse_ll" in spank_leftovers()
