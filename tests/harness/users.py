"""A real non-root account for tests that must prove "no root needed"."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

from harness.procs import kill_tree

TEST_USER = "rankwire-test"


@dataclasses.dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str
    bindir: str = ""  # where this user finds `rankwire` when it is not our own venv

    def argv(self, argv: list[str]) -> list[str]:
        """`argv` as this user: wrapped in runuser when we are root, unchanged otherwise."""
        if os.getuid() == self.uid:
            return list(argv)
        env = ["env", f"PATH={self.bindir}{os.pathsep}{os.environ['PATH']}"] if self.bindir else []
        return ["runuser", "-u", self.name, "--", *env, *argv]

    def run(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        """subprocess.run as this user, in a session of its own: on timeout, every process
        it started (runuser, the user's command, its ranks, holder and FUSE daemons, those
        that made sessions of their own too) is killed, then TimeoutExpired is raised."""
        timeout = kwargs.pop("timeout", 120)
        check = kwargs.pop("check", False)
        given = kwargs.pop("input", None)
        if kwargs.pop("capture_output", True):
            kwargs.setdefault("stdout", subprocess.PIPE)
            kwargs.setdefault("stderr", subprocess.PIPE)
        if given is not None:
            kwargs["stdin"] = subprocess.PIPE
        kwargs.setdefault("text", True)
        args = self.argv(argv)
        with subprocess.Popen(args, start_new_session=True, **kwargs) as proc:
            try:
                out, err = proc.communicate(given, timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.communicate(timeout=10)  # a process that escaped holds a pipe
                raise
        if check and proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, args, out, err)
        return subprocess.CompletedProcess(args, proc.returncode, out, err)


def rw(runner: User, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
    """`rankwire ARGS` as `runner`, from /tmp (every user may enter it) unless `cwd` says."""
    kwargs.setdefault("cwd", "/tmp")
    return runner.run(["rankwire", *args], **kwargs)


def install_for(user: User, repo: Path, where: Path) -> User:
    """Give `user` a rankwire it can run, if our venv is out of its reach.

    A checkout under /root (mode 0700) is invisible to other accounts; then install the
    package (non-editable) into a venv under `where`, which every user can read.
    """
    probe = subprocess.run(
        ["runuser", "-u", user.name, "--", sys.executable, "-c", "import rankwire.cli"],
        capture_output=True,
    )
    if probe.returncode == 0:
        return user
    venv = where / "user-venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [
            str(venv / "bin/python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            str(repo),
        ],
        check=True,
        capture_output=True,
    )
    return dataclasses.replace(user, bindir=str(venv / "bin"))


def ensure_unprivileged_user() -> User:
    """As root: create (once) the test account and make /dev/fuse usable by it.

    As a normal user: that user is already the unprivileged one.
    """
    if os.getuid() != 0:
        pw = pwd.getpwuid(os.getuid())
        return User(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir)
    try:
        pw = pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--create-home", "--shell", "/bin/bash", TEST_USER],
            check=True,
            capture_output=True,
        )
        pw = pwd.getpwnam(TEST_USER)
    fuse = Path("/dev/fuse")
    if fuse.exists() and (fuse.stat().st_mode & 0o666) != 0o666:
        # Debian ships /dev/fuse 0666; some images have 0600, which forbids every
        # unprivileged FUSE mount (squashfuse). This is the documented host setup.
        fuse.chmod(stat.S_IMODE(fuse.stat().st_mode) | 0o666)
    return User(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir)
