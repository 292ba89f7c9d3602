"""The plan a join leaves for the C front end (`runtime/front.c`, the `rankwire` command).

`rankwire exec instance://NAME CMD…` (no option) plans the command's process here, in
Python, as every join does; then `remember` writes that plan to NAME.plan next to the
instance's socket (the user's private runtime dir), with what it was made from: the user,
the working directory, the whole environment, the instance (its socket's identity and
holder pid) and the files of the code that decided it (their identities). The next
`rankwire exec instance://NAME …` whose request is the same in all of these, whatever its
command, joins in C without starting Python (about 2 ms instead of 65); any difference,
and the front end runs this planner again, which writes the plan anew.

Only a plan that does not depend on the command is written (`command_free`), and only
where the front end may use it: no PMI bridge, no warning to say, not a Slurm task.

Format: `runtime/frame.py` records (KEY=VALUE, each ending in a NUL), first
`magic=rankwire-join-plan 1`, last `end=1`. The file is made whole before it gets its
name (O_TMPFILE, then linked), so a reader sees all of it or nothing, and a writer killed
midway leaves nothing. The holder's teardown and `instance stop` remove it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import sys
from typing import Any

from rankwire.runtime import frame
from rankwire.runtime.plan import ProcessPlan, UserFacts

MAGIC = "rankwire-join-plan 1"
# The modules whose code decides a join's process plan: an edit or an upgrade of any of
# them (their identity changes) makes the front end plan in Python again.
DECIDING = (
    "rankwire.cli",
    "rankwire.entry",
    "rankwire.pmi.bridgeplan",
    "rankwire.runtime.cli_options",
    "rankwire.runtime.cli_run",
    "rankwire.runtime.frame",
    "rankwire.runtime.instance",
    "rankwire.runtime.joinplan",
    "rankwire.runtime.options",
    "rankwire.runtime.plan",
    "rankwire.runtime.slurmfacts",
    "rankwire.runtime.userfacts",
)
PROBE = ("rankwire-join-plan-probe",)


def plan_path(sock: str) -> str:
    """NAME.plan for the instance socket NAME.sock."""
    return sock[: -len(".sock")] + ".plan" if sock.endswith(".sock") else sock + ".plan"


def command_free(proc: ProcessPlan, probe: ProcessPlan, command: tuple[str, ...]) -> bool:
    """`proc` (planned for `command`) and `probe` (the same request planned for `PROBE`)
    differ in their argv alone, which is the command as given: the front end may then
    run any command with this plan."""
    return (
        proc.argv == command
        and probe.argv == PROBE
        and dataclasses.replace(probe, argv=proc.argv) == proc
    )


def _identity(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{path}"


def started_environment() -> list[str]:
    """The environment this process was started with, sorted as bytes, which is what the
    front end compares: not `os.environ`, which Python itself may have changed since
    (PEP 538 sets LC_CTYPE under the C locale)."""
    with open("/proc/self/environ", "rb") as f:
        entries = [e for e in f.read().split(b"\0") if e]
    return [os.fsdecode(e) for e in sorted(entries)]


def socket_id(sock: str) -> str:
    st = os.lstat(sock)
    return f"{st.st_dev}:{st.st_ino}"


def records(
    sock: str, sock_id: str, holder: dict[str, Any], user: UserFacts, proc: ProcessPlan
) -> list[tuple[str, str]]:
    """KeyError: a deciding module is not loaded (then no plan)."""
    out = [
        ("magic", MAGIC),
        ("uid", str(user.uid)),
        ("gid", str(user.gid)),
        ("cwd", user.cwd),
        ("socket", sock),
        ("socket_id", sock_id),
        ("holder", str(holder["pid"])),
        # as the join's reply has it (json.dumps): a random name, unlike inode numbers
        ("session", json.dumps(holder["session"])),
    ]
    out += [("file", _identity(str(sys.modules[name].__file__))) for name in DECIDING]
    out += [("key_env", entry) for entry in started_environment()]
    out += [("workdir", proc.workdir), ("no_new_privs", "1" if proc.no_new_privs else "0")]
    out += [("env", f"{k}={v}") for k, v in proc.env.items()]
    out.append(("end", "1"))
    return out


def remember(sock: str, holder: dict[str, Any], user: UserFacts, proc: ProcessPlan) -> None:
    """Write NAME.plan for the instance at `sock` (`holder`: its report); on any failure,
    or where the front end would not do as Python does, nothing (the next join plans in
    Python again): under a file system encoding other than UTF-8 (the plan's), or with an
    environment name Python's execve refuses. Under the instances dir's lock (the one a
    holder takes to link its socket), and checked after: if the socket is gone or another,
    the plan goes (the holder's teardown removes its socket, then the plan)."""
    name = os.path.basename(plan_path(sock))
    if sys.getfilesystemencoding() != "utf-8" or any(not k or "=" in k for k in proc.env):
        return
    try:
        sock_id = socket_id(sock)
        data = frame.encode(records(sock, sock_id, holder, user, proc))
        dir_fd = os.open(os.path.dirname(sock), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (OSError, ValueError, KeyError, TypeError):  # ValueError: a NUL in a value, say
        return
    fd, linked = -1, False
    try:
        fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
        # a dir fd makes it linkat(…, AT_SYMLINK_FOLLOW): plain link() would not follow
        # /proc's link to the unnamed file
        os.link(f"/proc/self/fd/{fd}", name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        linked = True
        if socket_id(sock) != sock_id:
            raise FileNotFoundError(sock)
    except OSError:
        if linked:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dir_fd)
    finally:
        if fd >= 0:
            os.close(fd)
        os.close(dir_fd)  # and with it the lock
