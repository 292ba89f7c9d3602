"""`rankwire run` and `apptainer-mpirun`: one launcher, two spellings.

rankwire run [-n N] [--image IMG] [options] TARGET [ARGS...]
    TARGET a SIF file: N ranks of its runscript (ARGS passed on)
    --image IMG:       N ranks of the command TARGET inside IMG
    otherwise:         N ranks of the command TARGET on this host
apptainer-mpirun [-n N] [options] IMAGE COMMAND [ARGS...]
"""

from __future__ import annotations

from typing import Any, NoReturn, Optional

import click

from rankwire.launcher.launchcmd import launch
from rankwire.launcher.launchcmd import run as run_target
from rankwire.runtime.cli_options import click_options
from rankwire.runtime.cli_run import (
    PASSTHROUGH,
    container_options,
    dry_run_options,
    process_options,
)

launcher_options = click_options("launcher")


@click.command("run", context_settings=PASSTHROUGH)
@launcher_options
@click.option("--image", metavar="IMG", help="Run TARGET inside this SIF image.")
@container_options
@process_options
@dry_run_options
@click.argument("target")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run(target: str, args: tuple[str, ...], image: Optional[str], **kw: Any) -> None:
    """Launch N ranks of TARGET with rankwire's PMI server (or srun inside an allocation).

    TARGET a SIF image: its runscript; with --image IMG: a command inside IMG; otherwise:
    a command on this host. All ranks of a node share one container.
    """
    run_target(target, args, image, kw)


@click.command("apptainer-mpirun", context_settings=PASSTHROUGH)
@launcher_options
@container_options
@process_options
@dry_run_options
@click.argument("image")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def _apptainer_mpirun(image: str, command: tuple[str, ...], **kw: Any) -> None:
    """Launch N ranks of COMMAND inside IMAGE, all in one shared container per node,
    wired up by rankwire's PMI server (or by srun inside a Slurm allocation)."""
    launch(image, command, False, kw)


def apptainer_mpirun(argv: Optional[list[str]] = None) -> NoReturn:
    """Console entry point of `apptainer-mpirun`; it exits as `rankwire` does (without
    the interpreter's teardown; asyncio.run has closed the job's loop by then)."""
    from rankwire.cli import run_and_exit

    run_and_exit(_apptainer_mpirun, argv, prog_name="apptainer-mpirun")
