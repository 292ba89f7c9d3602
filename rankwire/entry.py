"""The `rankwire` console entry point. The SPANK shim runs `rankwire spank-helper PHASE`
for every container step, and `rankwire spank-helper pmi-bridge DIR` (PMIx to PMI-1/PMI-2)
or `rankwire spank-helper pmi2-bridge DIR` (PMI-2 to PMIx) in the first task of a node
whose step it bridges; `rankwire exec IMAGE COMMAND…` without options is what `srun
rankwire exec` tasks and scripts run; `rankwire run` and `apptainer-mpirun` (its own
entry point here) are mostly led by plain launcher options only (`-n N`, `--pmi X`):
those go straight to their code, without click and the CLI (about 10 ms of each start,
25-45 with the CLI's other imports); every other command goes to `rankwire.cli`."""

from __future__ import annotations

import atexit
import os
import sys
from typing import Callable, NoReturn

# runtime/front.c's: the step plan's locked descriptor, for the first task's Python
# (runtime/joinplan.py `take_step_lock`).
STEP_LOCK_VAR = "RANKWIRE_STEP_LOCK"
# `rankwire spank-helper PHASE`'s phases (spank/helper.py `main`).
PHASES = ("check", "start", "pull", "save", "epilog", "teardown")


def main(argv: list[str] | None = None) -> NoReturn:
    args = sys.argv[1:] if argv is None else argv
    if STEP_LOCK_VAR in os.environ:
        from rankwire.runtime.joinplan import take_step_lock

        take_step_lock()
    if len(args) == 2 and args[0] == "spank-helper" and args[1] in PHASES:
        from rankwire.spank.helper import main as serve

        exit_now(serve(args[1]))
    if len(args) == 3 and args[:2] == ["spank-helper", "pmi-bridge"]:
        # The shim's task_init (start_bridge), in the node's first task: the bridges of the
        # node's tasks (pmi/bridgeserve.serve_node), this one's on fd 3, the socket in DIR.
        from rankwire.errors import UserError
        from rankwire.pmi.bridgeserve import serve_node

        try:
            exit_now(serve_node(3, os.environ, args[2]))
        except UserError as err:
            print(f"rankwire: {err}", file=sys.stderr)
            exit_now(err.exit_code)
    if len(args) == 3 and args[:2] == ["spank-helper", "pmi2-bridge"]:
        # The shim's task_init (spank/rankwire_spank.c start_pmi2_bridge): the report on
        # fd 3, the task's end as EOF on fd 4, the node's socket in DIR.
        from rankwire.pmi.pmix.pmi2bridge import for_task

        exit_now(for_task(3, 4, os.environ, args[2]))
    if len(args) == 2 and args[0] == "front-end-pmi-abort" and args[1].isdigit():
        # runtime/front.c: a step plan's task whose hand-over to the node's PMI bridge
        # server failed midway (said): end the step, as pmi/bridge.task_pmi_env does.
        from rankwire.pmi.bridge import abort_step

        abort_step(
            "the task's hand-over to the node's PMI bridge server failed", int(args[1]), True
        )
    if len(args) == 3 and args[0] == "front-end-holder-gone" and args[2].isdigit():
        # runtime/front.c: the holder its command ran in (args[1]: its report) ended without
        # answering `leave` (SIGKILL): remove what it left, as `Lease.close` does, and exit
        # with the command's code.
        from rankwire.runtime.instance import prune_reported

        prune_reported(args[1])
        exit_now(min(int(args[2]), 255))
    if args[:1] == ["__launch"]:
        # runtime/front.c `launch_plan`: it started a kept launch plan's container and
        # ranks; we serve and see them to their end.
        from rankwire.launcher.execute import adopt
        from rankwire.runtime.syscalls import set_comm

        set_comm(args[1])  # the name it was started by (ps, pkill), not rankwire-py
        without_click(args[1], lambda: sys.exit(adopt(args[2:])))
    if args[:1] == ["__apptainer-mpirun"]:  # the front end installed as apptainer-mpirun
        from rankwire.runtime.syscalls import set_comm

        set_comm("apptainer-mpirun")
        apptainer_mpirun(args[1:])
    if len(args) >= 3 and args[0] == "exec" and not args[1].startswith("-"):
        without_click("rankwire", lambda: exec_without_options(args[1], tuple(args[2:])))
    if args[:1] == ["run"]:
        launch_without_click("rankwire", "run", args[1:])
    from rankwire.cli import main as cli_main

    cli_main(argv)


def apptainer_mpirun(argv: list[str] | None = None) -> NoReturn:
    """`apptainer-mpirun`: the C front end, installed under that name too, runs it as
    `rankwire-py __apptainer-mpirun ARGS…` when it does not start a kept plan itself."""
    args = sys.argv[1:] if argv is None else argv
    launch_without_click("apptainer-mpirun", "apptainer-mpirun", args)
    from rankwire.launcher.cli import apptainer_mpirun as with_click

    with_click(argv)


def exec_without_options(image: str, command: tuple[str, ...]) -> bool:
    """`rankwire exec IMAGE COMMAND…` without an option (the image's word is no dash
    word): every option has its default, so click has nothing to read."""
    from rankwire.runtime.execcmd import defaults, execute

    execute(image, lambda _facts: command, defaults(), command)
    return True


def launch_without_click(prog: str, command: str, args: list[str]) -> None:
    """Run the launcher `command` here if its options are plain (`launchcmd.plain`);
    return if click must parse them."""

    def call() -> bool:
        from rankwire.launcher.plancache import cached

        kept = cached((command, *args))  # the plan an earlier launch of these words kept
        if kept is not None:
            from rankwire.launcher.execute import execute

            sys.exit(execute(kept))
        from rankwire.launcher.launchcmd import plain

        launch = plain(command, args)
        if launch is None:
            return False
        launch()
        return True

    without_click(prog, call)


def without_click(prog: str, call: Callable[[], bool]) -> None:
    """Run a command whose options are read without click (`call` returns False, and so
    do we, when click must read them after all), and do with the outcome what
    `rankwire.cli.run_command` does (a user error: one line, its exit code; ^C or EOF on
    the terminal: exit 130; stdout closed under us: exit 1)."""
    from rankwire.errors import UserError

    try:
        if not call():
            return
    except UserError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        exit_now(err.exit_code)
    except (KeyboardInterrupt, EOFError):
        print(f"\n{prog}: aborted", file=sys.stderr)
        exit_now(130)
    except BrokenPipeError:
        exit_now(1)
    except SystemExit as done:
        exit_now(done.code)
    exit_now(0)


def exit_now(code: str | int | None) -> NoReturn:
    """Exit as `sys.exit(code)` does, without the interpreter's teardown: freeing every
    module and object costs 10-15 ms of each `rankwire exec`, join or plugin helper start
    (bench/fastpath.py). What the teardown owes us is done first: atexit handlers run
    (weakref finalizers too) and stdout/stderr are flushed (failing that: status 120, as
    Python's own exit). With another thread alive, the normal exit, which joins it."""
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        sys.exit(code)
    if isinstance(code, str):
        print(code, file=sys.stderr)
    status = 1 if isinstance(code, str) else code or 0
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            status = 120
    os._exit(status)
