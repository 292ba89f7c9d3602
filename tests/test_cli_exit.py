"""`rankwire.entry.exit_now`: the CLI's exit skips the interpreter's teardown but keeps what
that teardown owes: atexit handlers, flushed output, the status, other threads joined."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Each case: the Python run after `from rankwire.entry import exit_now`, and what it gives.
CASES = {
    "status and buffered output": (
        "import atexit, sys\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "sys.stdout.write('buffered ')\n"
        "exit_now(3)",
        3,
        "buffered atexit ran\n",
        "",
    ),
    "None is 0": ("print('out')\nexit_now(None)", 0, "out\n", ""),
    "a message is 1": ("exit_now('rankwire: bye')", 1, "", "rankwire: bye\n"),
    "another thread is joined": (
        "import threading, time\n"
        "threading.Thread(target=lambda: (time.sleep(0.2), print('thread done'))).start()\n"
        "exit_now(4)",
        4,
        "thread done\n",
        "",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_exit_now(case: str) -> None:
    code, status, out, err = CASES[case]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # block-buffered
    proc = subprocess.run(
        [sys.executable, "-c", f"from rankwire.entry import exit_now\n{code}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (status, out, err)


def test_command_output_through_a_pipe_is_complete() -> None:
    """Block-buffered stdout (a pipe, no PYTHONUNBUFFERED) is flushed before the exit:
    the same help as click's own exit prints."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    rankwire = os.path.join(os.path.dirname(sys.executable), "rankwire")
    ours, clicks = (
        subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
        for argv in (
            [rankwire, "--help"],
            [sys.executable, "-c", "from rankwire.cli import cli; cli(prog_name='rankwire')",
             "--help"],
        )
    )  # fmt: skip
    assert (ours.returncode, ours.stdout) == (0, clicks.stdout)
    assert "Commands:" in ours.stdout
