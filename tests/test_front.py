"""The C front end (`runtime/front.c`): `rankwire exec instance://NAME CMD` joins without
Python when the Python planner left a plan for exactly that request, and does what the
Python CLI does, to the byte; anything else runs the Python CLI.

Each test runs a copy of the installed front end whose `rankwire-py` (the Python CLI it
runs) is a wrapper that logs each start: the log says which of the two ran."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.users import User, rw
from rankwire.runtime import joinplan
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


@pytest.fixture
def front(runner: User, base_image: Path, shared_dir: Path) -> Iterator[Front]:
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
    name = f"front-{runner.name}"
    start = rw(runner, "instance", "start", str(base_image), name)
    assert start.returncode == 0, start.stderr
    try:
        yield Front(runner, where / "rankwire", installed / "rankwire-py", log, name, base_image)
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
