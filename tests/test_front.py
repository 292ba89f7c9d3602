"""The C front end (`runtime/front.c`): `rankwire exec instance://NAME CMD` joins without
Python when the Python planner left a plan for exactly that request, and does what the
Python CLI does, to the byte; anything else runs the Python CLI.

Each test runs a copy of the installed front end whose `rankwire-py` (the Python CLI it
runs) is a wrapper that logs each start: the log says which of the two ran."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.mpi import assert_hello
from harness.users import User, rw
from rankwire.pmi.bridgeplan import PMIX_TO_PMI, BridgePlan
from rankwire.runtime import frame, joinplan
from rankwire.runtime.plan import ProcessPlan

pytestmark = pytest.mark.usefixtures("nothing_left_behind")


@dataclasses.dataclass
class Front:
    runner: User
    exe: Path  # the front end's copy
    python: Path  # the installed Python CLI
    log: Path  # a line per Python CLI start
    name: str  # the instance
    image: Path

    def run(self, *args: str, cwd: str = "/tmp", env: tuple[str, ...] = ()) -> tuple[int, str, str]:
        argv = ["env", *env, str(self.exe), *args] if env else [str(self.exe), *args]
        proc = self.runner.run(argv, cwd=cwd)
        return proc.returncode, proc.stdout, proc.stderr

    def join(
        self, *command: str, cwd: str = "/tmp", env: tuple[str, ...] = ()
    ) -> tuple[int, str, str]:
        return self.run("exec", f"instance://{self.name}", *command, cwd=cwd, env=env)

    def pythons(self) -> int:
        return len(self.log.read_text().splitlines())


def front_copy(runner: User, shared_dir: Path) -> tuple[Path, Path, Path]:
    """A copy of the installed front end whose `rankwire-py` logs each start: (the copy,
    the log, the installed dir)."""
    installed = Path(runner.bindir or Path(sys.executable).parent)
    assert (installed / "rankwire").read_bytes()[:4] == b"\x7fELF", "not the C front end"
    where = Path(tempfile.mkdtemp(prefix="front-", dir=shared_dir))
    where.chmod(0o755)
    log = where / "pythons.log"
    log.touch(mode=0o666)
    log.chmod(0o666)
    shutil.copy2(installed / "rankwire", where / "rankwire")
    wrapper = where / "rankwire-py"
    # Not sh, which sets PWD: the environment is part of the plan's key. Python passes on
    # the environment it was started with (not os.environ: PEP 538 may have changed it).
    wrapper.write_text(
        "#!/usr/bin/python3 -I\nimport os, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n    print(*sys.argv[1:], file=f)\n"
        "with open('/proc/self/environ', 'rb') as f:\n"
        "    env = dict(e.split(b'=', 1) for e in f.read().split(b'\\0') if b'=' in e)\n"
        f"os.execve({str(installed / 'rankwire-py')!r}, sys.argv, env)\n"
    )
    wrapper.chmod(0o755)
    return where / "rankwire", log, installed


@pytest.fixture
def front(runner: User, base_image: Path, shared_dir: Path) -> Iterator[Front]:
    exe, log, installed = front_copy(runner, shared_dir)
    name = f"front-{runner.name}"
    start = rw(runner, "instance", "start", str(base_image), name)
    assert start.returncode == 0, start.stderr
    try:
        yield Front(runner, exe, installed / "rankwire-py", log, name, base_image)
    finally:
        stop = rw(runner, "instance", "stop", name)
        assert stop.returncode == 0, stop.stderr


def test_a_repeated_join_runs_no_python_and_does_the_same(front: Front) -> None:
    show = ("sh", "-c", 'pwd; env; echo "args: $0 $*"; exit 3', "a b", "c")
    first = front.join(*show)
    assert first[0] == 3 and "args: a b c" in first[1], first
    assert front.pythons() == 1  # planned in Python, which left its plan
    again = front.join(*show)
    assert front.pythons() == 1  # joined in C
    assert again == first
    # Another command with the same request: the plan holds for any command.
    assert front.join("sh", "-c", "kill -TERM $$") == (143, "", "")
    assert front.join("true") == (0, "", "")
    assert front.pythons() == 1


def test_another_request_plans_in_python_again(front: Front) -> None:
    assert front.join("true")[0] == 0
    assert front.pythons() == 1
    # Another environment: Python plans it (and the task sees the variable), then C.
    for _ in range(2):
        assert front.join("sh", "-c", 'echo "$EXTRA"', env=("EXTRA=x",)) == (0, "x\n", "")
    assert front.pythons() == 2
    # Another working directory; then an option (always Python: the C side takes none).
    assert front.join("sh", "-c", "pwd", cwd="/")[1] == "/\n"
    assert front.pythons() == 3
    for _ in range(2):
        assert front.run("exec", "--env", "A=1", f"instance://{front.name}", "true")[0] == 0
    assert front.pythons() == 5
    # A plan that is not the user's private file: not used (Python plans, writes anew).
    plan = front_plan(front)
    os.chmod(plan, 0o644)
    assert front.join("sh", "-c", "pwd", cwd="/")[0] == 0
    assert front.pythons() == 6
    assert (os.stat(plan).st_mode & 0o777) == 0o600
    # A truncated plan (no `end=1`): not used.
    plan.write_bytes(plan.read_bytes()[:-6])
    assert front.join("sh", "-c", "pwd", cwd="/")[0] == 0
    assert front.pythons() == 7
    # Another instance under the same name: its socket and holder are new.
    assert rw(front.runner, "instance", "stop", front.name).returncode == 0
    assert not plan.exists()  # the holder's teardown took it
    start = rw(front.runner, "instance", "start", str(front.image), front.name)
    assert start.returncode == 0, start.stderr
    assert front.join("sh", "-c", "pwd", cwd="/")[0] == 0
    assert front.pythons() == 8


def front_plan(front: Front) -> Path:
    listed = json.loads(rw(front.runner, "instance", "list", "--json").stdout)
    return Path(joinplan.plan_path(next(i["socket"] for i in listed if i["name"] == front.name)))


@pytest.mark.parametrize(
    "command",
    [("nosuchcmd",), ("/nonexistent/cmd",), ("/",), ("/proc/version",)],
    ids=["not-found", "no-such-file", "directory", "not-executable"],
)
def test_start_failures_are_said_as_python_says_them(
    front: Front, command: tuple[str, ...]
) -> None:
    by_python = front.runner.run(
        [str(front.python), "exec", f"instance://{front.name}", *command], cwd="/tmp"
    )
    pythons = front.pythons()
    by_c = front.join(*command)
    assert front.pythons() == pythons  # the plan was the Python run's
    assert by_c == (by_python.returncode, "", by_python.stderr)
    assert by_c[0] in (126, 127)


def test_a_working_directory_missing_in_the_container_is_said_alike(
    front: Front,
) -> None:
    here = tempfile.mkdtemp(prefix="rankwire-front-", dir="/var/lib")  # not in the image
    try:
        os.chmod(here, 0o755)
        by_python = front.runner.run(
            [str(front.python), "exec", f"instance://{front.name}", "true"], cwd=here
        )
        by_c = front.join("true", cwd=here)
    finally:
        os.rmdir(here)
    assert front.pythons() == 0
    assert by_c == (by_python.returncode, "", by_python.stderr)
    assert by_c[0] == 125 and "does not exist in the container" in by_c[2]


def plan_of(argv: tuple[str, ...], env: dict[str, str]) -> ProcessPlan:
    return ProcessPlan(argv=argv, env=env, workdir="/w")


def test_a_plan_that_depends_on_the_command_is_not_written() -> None:
    command = ("hello",)
    probe = plan_of(joinplan.PROBE, {"A": "1"})
    assert joinplan.command_free(plan_of(command, {"A": "1"}), probe, command)
    assert not joinplan.command_free(plan_of(command, {"A": "2"}), probe, command)
    assert not joinplan.command_free(plan_of(("/bin/hello",), {"A": "1"}), probe, command)


def test_the_front_end_runs_the_python_cli_for_everything_else() -> None:
    installed = Path(sys.executable).parent
    proc = subprocess.run(
        [str(installed / "rankwire"), "--version"], capture_output=True, text=True
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.startswith("rankwire, version ")


def test_a_holder_killed_under_a_c_join_leaves_nothing(front: Front) -> None:
    """The holder dies (SIGKILL) while a command the front end started runs in it: the
    command goes with the container, the front end finds no answer to `leave` and has the
    Python CLI remove what the holder left (as `Lease.close` does), with the command's
    exit code."""
    assert front.join("true")[0] == 0
    listed = json.loads(rw(front.runner, "instance", "list", "--json").stdout)
    holder = next(i["pid"] for i in listed if i["name"] == front.name)
    argv = front.runner.argv([str(front.exe), "exec", f"instance://{front.name}", "sleep", "60"])
    with subprocess.Popen(argv, cwd="/tmp", stderr=subprocess.PIPE, text=True) as proc:
        time.sleep(1.0)
        os.kill(holder, signal.SIGKILL)
        assert proc.wait(30) == 128 + signal.SIGKILL
        assert proc.stderr is not None and proc.stderr.read() == ""
    assert front.pythons() == 2  # the first join, then the clean-up
    assert front.log.read_text().splitlines()[1].startswith("front-end-holder-gone ")
    sock = Path(listed[0]["socket"])
    assert not sock.exists() and not Path(joinplan.plan_path(str(sock))).exists()
    assert json.loads(rw(front.runner, "instance", "list", "--json").stdout) == []
    start = rw(front.runner, "instance", "start", str(front.image), front.name)  # for the fixture
    assert start.returncode == 0, start.stderr


def test_under_the_c_locale_the_plan_is_used_too(front: Front) -> None:
    """Python sets LC_CTYPE for itself under the C locale (PEP 538): the plan is keyed on
    the environment the front end had, not on Python's."""
    bare = ("-i", "PATH=/usr/bin:/bin")
    for _ in range(2):
        assert front.join("sh", "-c", "echo $LC_CTYPE", env=bare) == (0, "C.UTF-8\n", "")
    assert front.pythons() == 1


# -- `rankwire exec IMAGE CMD`: the exec plan -------------------------------------------


@pytest.fixture
def image_front(runner: User, base_image: Path, shared_dir: Path) -> Iterator[Front]:
    """A front end copy, and an image of this test's own (its own exec plan)."""
    exe, log, installed = front_copy(runner, shared_dir)
    image = Path(tempfile.mkdtemp(prefix="image-", dir=shared_dir)) / "app.sif"
    image.parent.chmod(0o755)
    shutil.copy(base_image, image)
    image.chmod(0o644)
    front = Front(runner, exe, installed / "rankwire-py", log, "", image)
    # Its exec plans, with any options. An earlier test's image, gone now, may have had
    # its inode number and left some.
    st = image.stat()
    plans = f"exec-{st.st_dev}-{st.st_ino}-*.plan"
    for stale in exec_plan_of(front).parent.glob(plans):
        stale.unlink(missing_ok=True)
    yield front
    for kept in exec_plan_of(front).parent.glob(plans):
        kept.unlink(missing_ok=True)


SETTLE_S = 2.1  # a key's file changed less than 2 s ago keeps no plan (factcache.SETTLE_NS)


def exec_plan_of(front: Front) -> Path:
    """The image's exec plan in the runner's runtime dir (no XDG_RUNTIME_DIR here)."""
    return Path(f"/tmp/rankwire-{front.runner.uid}") / joinplan.exec_plan_name(str(front.image))


def exec_in(front: Front, *command: str, **kw: Any) -> tuple[int, str, str]:
    return front.run("exec", str(front.image), *command, **kw)


# What a command sees of its container: its mounts (where, how, what), ids, the PID
# namespace's init, directory, environment and arguments (the base image has no sort or
# cut: `seen` puts it in order).
SHOW = (
    "sh",
    "-c",
    "cat /proc/self/mountinfo; id; cat /proc/self/uid_map; cat /proc/1/comm; "
    'grep NoNewPrivs /proc/self/status; pwd; env; echo "args: $0 $*"; exit 3',
    "a b",
    "c",
)


def seen(out: tuple[int, str, str]) -> tuple[int, list[str], str]:
    """`out` of SHOW without what differs between any two containers: mount ids, device
    numbers and each container's session dir name."""
    lines = []
    for line in out[1].splitlines():
        if " - " in line:  # mountinfo: from the mount point on
            line = " ".join(line.split()[4:])
        lines.append(re.sub(r"/s-[0-9a-f]{12}", "/s-SESSION", line))
    return out[0], sorted(lines), out[2]


def test_a_repeated_exec_starts_its_container_without_python_and_does_the_same(
    image_front: Front,
) -> None:
    front = image_front
    first = exec_in(front, *SHOW)
    assert first[0] == 3 and "args: a b c" in first[1] and "rankwire-init" in first[1], first
    assert " / " in first[1] and "overlay" in first[1] and "NoNewPrivs:\t1" in first[1]
    assert front.pythons() == 1  # planned in Python, which left the exec plan
    plan = exec_plan_of(front)
    assert (plan.stat().st_uid, plan.stat().st_mode & 0o777) == (front.runner.uid, 0o600)
    again = exec_in(front, *SHOW)
    assert front.pythons() == 1  # started in C
    assert seen(again) == seen(first)
    # Any command: the plan holds for all of them.
    assert exec_in(front, "sh", "-c", "kill -TERM $$") == (143, "", "")
    assert exec_in(front, "true") == (0, "", "")
    by_python = front.runner.run(
        [str(front.python), "exec", str(front.image), "nosuchcmd"], cwd="/tmp"
    )
    assert exec_in(front, "nosuchcmd") == (127, "", by_python.stderr)
    assert front.pythons() == 1


def test_another_exec_request_plans_in_python_again(image_front: Front, shared_dir: Path) -> None:
    front = image_front
    assert exec_in(front, "true")[0] == 0
    assert front.pythons() == 1
    # Another environment: Python plans it (the command sees the variable), then C.
    for _ in range(2):
        assert exec_in(front, "sh", "-c", 'echo "$EXTRA"', env=("EXTRA=x",)) == (0, "x\n", "")
    assert front.pythons() == 2
    # Another working directory.
    assert exec_in(front, "sh", "-c", "pwd", cwd="/var/tmp")[1] == "/var/tmp\n"
    assert front.pythons() == 3
    # Options: Python plans them and leaves a plan for exactly those words, then C; other
    # words are another plan; the plain exec's plan stays.
    echo_a = (str(front.image), "sh", "-c", "echo $A")
    for _ in range(2):
        assert front.run("exec", "--env", "A=1", *echo_a) == (0, "1\n", "")
    assert front.pythons() == 4
    assert front.run("exec", "--env", "A=2", *echo_a) == (0, "2\n", "")
    assert front.run("exec", "--env=A=1", *echo_a) == (0, "1\n", "")
    assert front.pythons() == 6
    bound = ("-B", "/etc:/opt/e", "--", str(front.image), "sh", "-c", "[ -f /opt/e/hostname ]")
    for _ in range(2):
        assert front.run("exec", *bound) == (0, "", "")
    assert front.pythons() == 7
    assert front.run("exec", "--env", "A=1", *echo_a) == (0, "1\n", "")  # still C's
    assert front.pythons() == 7
    # A plan under another request's name (as if their words' hashes met): its words are
    # compared, and it is not used.
    runtime = exec_plan_of(front).parent
    ours = runtime / joinplan.exec_plan_name(str(front.image), ("--env", "A=1"))
    other = runtime / joinplan.exec_plan_name(str(front.image), ("--env", "A=4"))
    shutil.copy2(ours, other)
    assert front.run("exec", "--env", "A=4", *echo_a) == (0, "4\n", "")
    assert front.pythons() == 8
    # An empty command after options: Python says it.
    by_python = front.runner.run(
        [str(front.python), "exec", "--env", "A=1", str(front.image), ""], cwd="/tmp"
    )
    assert front.run("exec", "--env", "A=1", str(front.image), "") == (
        by_python.returncode,
        "",
        by_python.stderr,
    )
    assert by_python.returncode == 125 and front.pythons() == 9
    assert by_python.stderr == (
        "rankwire: the command is empty in the container: give the program to run\n"
    )
    assert exec_in(front, "sh", "-c", "pwd", cwd="/var/tmp") == (0, "/var/tmp\n", "")
    assert front.pythons() == 9
    # An option whose effect no key shows (a file's content): Python each time.
    env_file = Path(tempfile.mkdtemp(prefix="env-", dir=shared_dir)) / "vars"
    env_file.parent.chmod(0o755)
    env_file.write_text("A=3\n")
    env_file.chmod(0o644)
    for _ in range(2):
        assert front.run("exec", "--env-file", str(env_file), *echo_a) == (0, "3\n", "")
    assert front.pythons() == 11
    # A plan that is not the user's private file: not used (Python plans, writes anew).
    plan = exec_plan_of(front)
    os.chmod(plan, 0o644)
    assert exec_in(front, "true", cwd="/var/tmp")[0] == 0
    assert front.pythons() == 12
    assert (os.stat(plan).st_mode & 0o777) == 0o600
    # Another image under the same path (its identity changes): Python.
    os.utime(front.image)
    assert exec_in(front, "true", cwd="/var/tmp")[0] == 0
    assert front.pythons() == 13
    assert exec_in(front, "true", cwd="/var/tmp")[0] == 0
    assert front.pythons() == 13
    # A path the planner probed appears (a home made since): Python, which binds it.
    parent = Path(tempfile.mkdtemp(prefix="rankwire-front-", dir="/var/lib"))  # no bind's
    try:
        parent.chmod(0o755)
        home = parent / "h"
        env = (f"HOME={home}",)
        probe = ("sh", "-c", f"[ -d {home} ] && echo bound || echo none")
        assert exec_in(front, *probe, env=env) == (0, "none\n", "")
        assert front.pythons() == 14
        home.mkdir()
        os.chown(home, front.runner.uid, front.runner.gid)
        for _ in range(2):
            assert exec_in(front, *probe, env=env) == (0, "bound\n", "")
        assert front.pythons() == 15
    finally:
        shutil.rmtree(parent)


def fail_late(records: bytes) -> bytes:
    """The recipe's last bind from a source that is not there."""
    last = records.rindex(b"r_source=/")
    end = records.index(b"\0", last)
    return records[:last] + b"r_source=/nonexistent/source" + records[end:]


def fail_driver(log: Path) -> Callable[[bytes], bytes]:
    """The recipe's FUSE driver: a program that logs its start and fails."""
    driver = log.with_suffix(".sh")
    driver.write_text(f"#!/bin/sh\necho started >> {log}\nexit 1\n")
    driver.chmod(0o755)
    log.touch()
    log.chmod(0o666)

    def change(records: bytes) -> bytes:
        start = records.index(b"r_fuse=")
        end = records.index(b"\0", start)
        return records[:start] + f"r_fuse={driver}".encode() + records[end:]

    return change


@pytest.mark.parametrize("where", ["driver", "last-bind"])
def test_a_container_the_plan_cannot_start_is_started_by_python_and_leaves_nothing(
    image_front: Front, shared_dir: Path, where: str
) -> None:
    """The exec plan's recipe fails (its FUSE driver fails; or its last bind, with the
    image, overlay, init and the other mounts up): rankwire-holder tears down what it made,
    the front end drops the plan and runs the Python CLI, which starts the container and
    writes the plan anew."""
    front = image_front
    assert exec_in(front, "true")[0] == 0
    plan = exec_plan_of(front)
    data = plan.read_bytes()
    log = Path(tempfile.mkdtemp(prefix="driver-", dir=shared_dir)) / "started.log"
    log.parent.chmod(0o755)
    change = fail_driver(log) if where == "driver" else fail_late
    with open(plan, "wb") as f:  # the same file: still the user's private one
        f.write(change(data))
    assert exec_in(front, "sh", "-c", "echo in") == (0, "in\n", "")
    assert front.pythons() == 2
    if where == "driver":
        assert log.read_text() == "started\n"  # the C replay ran it
    assert plan.read_bytes() == data
    assert exec_in(front, "sh", "-c", "echo in") == (0, "in\n", "")
    assert front.pythons() == 2


def test_killing_the_front_end_ends_the_container_it_started(image_front: Front) -> None:
    """SIGKILL of a front end whose container it started (no Python anywhere): its holder
    sees its owner gone and tears down, and what the command left running goes with the
    PID namespace (the command itself has the front end's parent-death signal)."""
    front = image_front
    assert exec_in(front, "true")[0] == 0
    left, command = (str(2000 + os.getpid() % 1000 + k) for k in (0, 1000))
    script = f"sleep {left} & exec sleep {command}"
    argv = front.runner.argv([str(front.exe), "exec", str(front.image), "sh", "-c", script])
    with subprocess.Popen(argv, cwd="/tmp", start_new_session=True) as proc:
        deadline = time.monotonic() + 10
        while not (running(["sleep", left]) and running(["sleep", command])):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        fronts = running([str(front.exe), "exec"])
        assert len(fronts) == 1
        os.kill(fronts[0], signal.SIGKILL)
        proc.wait(30)
    deadline = time.monotonic() + 10
    while running(["sleep", left]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(["sleep", left]) and not running(["sleep", command])
    assert front.pythons() == 1  # the first exec's


def running(argv_start: list[str]) -> list[int]:
    """Processes whose argv starts with `argv_start`."""
    want = b"".join(a.encode() + b"\0" for a in argv_start)
    found = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(want):
                found.append(int(proc.name))
    return found


def test_an_exec_binding_the_host_fabric_starts_without_python_while_its_facts_hold(
    image_front: Front, shared_dir: Path
) -> None:
    """`--fabric tcp` binds the host libfabric and every library it loads: the exec plan is
    kept, keyed on those files and the loader's dirs (one that changes: Python plans
    again), and the front end starts the same container. What it checks besides: an
    adapter port's state (a kernel file whose content, not identity, changes) and the
    user's groups (which device nodes a provider may open)."""
    front = image_front
    fabric = ("exec", "--fabric", "tcp", str(front.image))
    first = front.run(*fabric, *SHOW)
    assert first[0] == 3 and "FI_PROVIDER=tcp" in first[1], first
    assert front.pythons() == 1
    again = front.run(*fabric, *SHOW)
    assert front.pythons() == 1  # started in C
    assert seen(again) == seen(first)
    libs = Path(tempfile.mkdtemp(prefix="libs-", dir=shared_dir))
    libs.chmod(0o755)
    env = (f"LD_LIBRARY_PATH={libs}",)  # another environment: planned, then C
    time.sleep(SETTLE_S)  # a dir changed just now keeps no plan (is tested below)
    for _ in range(2):
        assert front.run(*fabric, "true", env=env) == (0, "", "")
    assert front.pythons() == 2
    (libs / "libfabric.so.1").symlink_to("/nonexistent")  # a dir the loader searches changed
    assert front.run(*fabric, "true", env=env) == (0, "", "")
    assert front.run(*fabric, "true", env=env) == (0, "", "")
    assert front.pythons() == 4  # planned again, and no plan kept: it changed just now
    (libs / "libfabric.so.1").unlink()
    time.sleep(SETTLE_S)
    for _ in range(2):
        assert front.run(*fabric, "true", env=env) == (0, "", "")
    assert front.pythons() == 5
    # The plan as Python keyed it, with a port's state and other groups in its key.
    uid = front.runner.uid
    plan = Path(f"/tmp/rankwire-{uid}") / joinplan.exec_plan_name(str(front.image), fabric[1:3])
    ports = Path(tempfile.mkdtemp(prefix="ports-", dir=shared_dir))
    ports.chmod(0o755)
    state = ports / "port-state"
    state.write_text("4: ACTIVE\n")
    state.chmod(0o644)

    def keyed(*extra: tuple[str, str], groups: str = "") -> None:
        recs = frame.decode(plan.read_bytes())
        if groups:
            recs = [("groups", groups) if k == "groups" else (k, v) for k, v in recs]
        plan.write_bytes(frame.encode([*recs[:-1], *extra, recs[-1]]))
        os.chown(plan, uid, front.runner.gid)

    def runs_in(way: str) -> None:
        before = front.pythons()
        assert front.run(*fabric, "true", env=env) == (0, "", "")
        assert front.pythons() == before + (way == "python"), way

    keyed(("content", f"{state}\t4: ACTIVE"), ("listing", f"{ports}/port-*\t{state}"))
    runs_in("C")  # the key holds
    state.write_text("1: DOWN\n")
    runs_in("python")  # the link went down (and a plan without it is kept)
    keyed(("listing", f"{ports}/port-*\t{state}"))
    runs_in("C")
    (ports / "port-state-2").touch()
    runs_in("python")  # a second adapter under a class that was there
    keyed(groups="4242")
    runs_in("python")  # other groups


def test_the_front_end_words_many_groups_as_python_does(image_front: Front) -> None:
    """Supplementary groups out of order and twice: the front end's list matches the one
    Python keyed (sorted, once), so the second exec starts in C."""
    front = image_front
    if front.runner.uid != 0:
        pytest.skip("setting groups needs root")
    argv = ["setpriv", "--groups", "30,10,20,10", "--", str(front.exe), "exec", str(front.image)]
    for _ in range(2):
        assert front.runner.run([*argv, "true"], cwd="/tmp").returncode == 0
    assert front.pythons() == 1
    assert b"groups=10,20,30\0" in exec_plan_of(front).read_bytes()


def test_a_container_the_holder_cannot_repeat_leaves_no_exec_plan(image_front: Front) -> None:
    """A bind below another bind (its target is resolved when it is mounted, in what the
    first one brought in): the holder notes it cannot repeat that, and no plan is left;
    one that is not below another leaves one."""
    front = image_front
    inner = Path(tempfile.mkdtemp(prefix="rankwire-front-", dir="/tmp"))
    try:
        inner.chmod(0o755)
        env = (f"RANKWIRE_BIND=/etc:{inner}",)
        for _ in range(2):
            assert exec_in(front, "sh", "-c", f"[ -f {inner}/hostname ]", env=env)[0] == 0
    finally:
        inner.rmdir()
    assert front.pythons() == 2
    assert not exec_plan_of(front).exists()
    env = ("RANKWIRE_BIND=/etc:/opt/host-etc",)
    for _ in range(2):
        assert exec_in(front, "sh", "-c", "[ -f /opt/host-etc/hostname ]", env=env)[0] == 0
    assert front.pythons() == 3
    assert exec_plan_of(front).exists()


# -- a step's tasks: the step plan ----------------------------------------------------


# The front end shares a step plan only where the node's tasks outnumber its CPUs.
CPUS = len(os.sched_getaffinity(0))


def step_files(runner: User) -> list[Path]:
    instances = Path(f"/tmp/rankwire-{runner.uid}/instances")
    assert instances.is_dir()  # the runtime dir the tasks used (no XDG_RUNTIME_DIR here)
    return sorted(instances.glob("step-*"))


def srun_front(
    runner: User, cluster: Any, exe: Path, image: Path, script: str, *, n: int = CPUS + 2
) -> subprocess.CompletedProcess:
    # The sleep keeps the first task's container until the others have joined it.
    argv = ["srun", f"-n{n}", "--mpi=pmi2", str(exe), "exec", str(image), "sh", "-c", script]
    return runner.run(argv, env=cluster.env, cwd="/tmp", timeout=90)


def test_a_steps_tasks_plan_once_and_keep_their_own_variables(
    runner: User, slurm_cluster: Any, base_image: Path, shared_dir: Path
) -> None:
    """`srun rankwire exec IMG CMD`: the first task plans in Python and leaves the step
    plan; the others wait for it and join the node's container in C, each with its own
    Slurm task variables; the plan goes with the container."""
    exe, log, _ = front_copy(runner, shared_dir)
    # Each task: its own variables; neither the lock's variable nor its descriptor.
    script = (
        'echo "$SLURM_PROCID $PMI_RANK $SLURM_LOCALID $0 ${RANKWIRE_STEP_LOCK-none}'
        ' $(ls -l /proc/$$/fd | grep -c step-)"; sleep 1'
    )
    got = srun_front(runner, slurm_cluster, exe, base_image, script)
    assert got.returncode == 0, got.stderr
    want = sorted(f"{i} {i} {i} sh none 0" for i in range(CPUS + 2))
    assert sorted(got.stdout.splitlines()) == want
    assert len(log.read_text().splitlines()) == 1
    assert step_files(runner) == []


def test_with_a_cpu_per_task_each_task_plans_for_itself(
    runner: User, slurm_cluster: Any, base_image: Path, shared_dir: Path
) -> None:
    """Where the node's tasks do not outnumber its CPUs, their Pythons run side by side:
    none waits for another's plan (that would only cost), and no step plan is made."""
    if CPUS > 8:
        pytest.skip("more CPUs than a test step should start Pythons")
    exe, log, _ = front_copy(runner, shared_dir)
    got = srun_front(runner, slurm_cluster, exe, base_image, "echo $SLURM_PROCID", n=CPUS)
    assert got.returncode == 0, got.stderr
    assert sorted(got.stdout.splitlines()) == sorted(str(i) for i in range(CPUS))
    assert len(log.read_text().splitlines()) == CPUS
    assert step_files(runner) == []


def test_a_task_whose_environment_differs_plans_in_python(
    runner: User, slurm_cluster: Any, base_image: Path, shared_dir: Path
) -> None:
    exe, log, _ = front_copy(runner, shared_dir)
    argv = [
        "srun", f"-n{CPUS + 2}", "--mpi=pmi2", "sh", "-c",
        # task 1 comes last: the first to come plans for the step (were it task 1, its
        # plan would fit no other task, and each would plan in Python)
        f'[ "$SLURM_PROCID" = 1 ] && export EXTRA=x && sleep 0.5; exec {exe} exec {base_image} '
        'sh -c \'echo "$SLURM_PROCID ${EXTRA-none}"; sleep 1\'',
    ]  # fmt: skip
    got = runner.run(argv, env=slurm_cluster.env, cwd="/tmp", timeout=90)
    assert got.returncode == 0, got.stderr
    assert sorted(got.stdout.splitlines()) == sorted(
        f"{i} {'x' if i == 1 else 'none'}" for i in range(CPUS + 2)
    )
    assert len(log.read_text().splitlines()) == 2  # the first task's, and task 1's
    assert step_files(runner) == []


NO_BRIDGE = BridgePlan("pmi2", None, None, "no MPI in the image: nothing to bridge")
BRIDGED = BridgePlan("pmix", "pmi1/2", PMIX_TO_PMI, "bridged")


@pytest.mark.mpi
@pytest.mark.parametrize("mpi", ["pmix", "pmi2"])
def test_a_bridged_steps_tasks_plan_once_and_join_the_nodes_bridge_server(
    mpi: str, request: Any, runner: User, slurm_cluster: Any, shared_dir: Path
) -> None:
    """A bridged step: `srun --mpi=pmix rankwire exec MPICH_IMAGE` (PMIx to PMI) and
    `srun --mpi=pmi2 rankwire exec OMPI_IMAGE` (PMI-2 to PMIx). The bridge is in the step
    plan; the first task plans in Python and starts the node's bridge server, the others
    join the container in C and hand over to that server: one MPI job, one Python, and
    neither the step plan nor the server's socket is left."""
    image, hello = (
        (request.getfixturevalue("mpich_image"), "/opt/hello_mpich")
        if mpi == "pmix"
        else (request.getfixturevalue("ompi_image"), "/opt/hello_ompi")
    )
    exe, log, _ = front_copy(runner, shared_dir)
    n = CPUS + 2
    argv = ["srun", f"-n{n}", f"--mpi={mpi}", str(exe), "exec", str(image), hello]
    got = runner.run(argv, env=slurm_cluster.env, cwd="/tmp", timeout=90)
    assert got.returncode == 0, got.stderr
    assert_hello(got.stdout, n)
    assert len(log.read_text().splitlines()) == 1
    assert step_files(runner) == []
    assert not list(Path(f"/tmp/rankwire-{runner.uid}").glob("pmi*bridge.*"))


def test_a_plan_that_depends_on_a_task_variable_is_not_the_steps() -> None:
    env = {"SLURM_PROCID": "3", "TMPDIR": "/tmp", "HOME": "/h"}

    def plan(derive: bool) -> Any:
        def plan_for(e: dict[str, str]) -> tuple[Any, ProcessPlan, BridgePlan]:
            out = dict(e)
            if derive:
                out["RANK"] = e.get("SLURM_PROCID", "")
            return "container", plan_of(("x",), out), NO_BRIDGE

        return plan_for

    assert joinplan.task_free(plan(False), env)
    assert not joinplan.task_free(plan(True), env)
    # the container or the bridge by task: not the step's either
    assert not joinplan.task_free(
        lambda e: (e.get("SLURM_PROCID"), plan_of(("x",), e), NO_BRIDGE), env
    )
    by_task = [NO_BRIDGE, BRIDGED]
    assert not joinplan.task_free(
        lambda e: ("c", plan_of(("x",), e), by_task[e.get("SLURM_PROCID") == "3"]), env
    )


def test_a_pmix_to_pmi_bridge_takes_the_pmix_task_variables_out() -> None:
    """Bridged, a task's process has none of its PMIx variables (the front end passes
    PMI_RANK and PMI_FD instead); one that kept PMIX_RANK would not be the bridge's."""
    env = {"SLURM_PROCID": "3", "PMIX_RANK": "3", "PMIX_NAMESPACE": "slurm.pmix.1.0"}

    def plan_for(keep: tuple[str, ...]) -> Any:
        def planned(e: dict[str, str]) -> tuple[Any, ProcessPlan, BridgePlan]:
            out = {k: v for k, v in e.items() if not k.startswith("PMIX_") or k in keep}
            return "c", plan_of(("x",), out), BRIDGED

        return planned

    assert joinplan.task_free(plan_for(()), env)
    assert not joinplan.task_free(plan_for(("PMIX_RANK",)), env)


def test_a_step_plan_of_a_dead_holder_is_pruned(tmp_path: Path) -> None:
    from rankwire.runtime import frame
    from rankwire.runtime.instance import prune_stale

    (tmp_path / "instances").mkdir()
    dead = tmp_path / "instances" / "step-1.0.plan"
    dead.write_bytes(frame.encode([("magic", joinplan.STEP_MAGIC), ("socket", "/nonexistent")]))
    live = tmp_path / "instances" / "step-2.0.plan"
    live.write_bytes(b"")
    serving = tmp_path / "instances" / "step-3.0.plan"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(tmp_path / "holder.sock"))
        listener.listen()
        serving.write_bytes(
            frame.encode(
                [("magic", joinplan.STEP_MAGIC), ("socket", str(tmp_path / "holder.sock"))]
            )
        )
        with open(live) as held:
            fcntl.flock(held, fcntl.LOCK_SH)  # a task reads it
            prune_stale(tmp_path)
        assert not dead.exists() and live.exists() and serving.exists()
        prune_stale(tmp_path)
        assert not live.exists()  # no plan in it, and nobody's
        assert serving.exists()  # its container runs


def test_a_step_without_a_step_plan_leaves_no_file(
    runner: User, slurm_cluster: Any, base_image: Path, shared_dir: Path
) -> None:
    """The first task's front end makes the step plan's file; when its Python writes no
    plan (here: the image is not there), the file goes, and each task says why."""
    exe, log, _ = front_copy(runner, shared_dir)
    missing = "/nonexistent/app.sif"
    got = srun_front(runner, slurm_cluster, exe, Path(missing), "true")
    said = f"rankwire: image {missing} not found: check the path"
    assert got.returncode != 0
    told = [line for line in got.stderr.splitlines() if line.startswith("rankwire")]
    assert told == [said] * (CPUS + 2)
    assert len(log.read_text().splitlines()) == CPUS + 2
    assert step_files(runner) == []
