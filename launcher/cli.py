"""`rankwire run` and `apptainer-mpirun`: one launcher, two spellings.

rankwire run [-n N] [--image IMG] [options] TARGET [ARGS...]
    TARGET a SIF file: N ranks of its runscript (ARGS passed on)
    --image IMG:       N ranks of the command TARGET inside IMG
    otherwise:         N ranks of the command TARGET on this host
apptainer-mpirun [-n N] [options] IMAGE COMMAND [ARGS...]
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn, Optional

import click

from rankwire.errors import UserError
from rankwire.launcher.plan import (
    PMI_CHOICES,
    LaunchOptions,
    LaunchPlan,
    SlurmMpi,
    describe,
    describe_oversubscription,
    plan_launch,
    validate,
)
from rankwire.launcher.plan import host_process as plan_host_process
from rankwire.pmi.bridgeplan import bridge_choice
from rankwire.runtime.cli_run import (
    PASSTHROUGH,
    container_options,
    dry_run_options,
    process_options,
)
from rankwire.runtime.execcmd import cli_values, exec_options, local_image
from rankwire.runtime.options import delegation_argv, in_scope, take_options
from rankwire.runtime.plan import runscript_argv
from rankwire.runtime.reference import is_remote
from rankwire.runtime.sif_format import MAGIC


def launcher_options(f: Any) -> Any:
    opts = [
        click.option(
            "-n",
            "--ntasks",
            "-np",
            "--np",
            type=int,
            default=1,
            show_default=True,
            help="Number of ranks.",
        ),
        click.option(
            "--pmi",
            type=click.Choice(PMI_CHOICES),
            default="auto",
            show_default=True,
            help="PMI the ranks speak (our server serves both).",
        ),
        click.option(
            "--pmi-transport",
            type=click.Choice(("fd", "port")),
            default="fd",
            show_default=True,
            help="PMI_FD (inherited socketpair) or PMI_PORT (TCP on 127.0.0.1).",
        ),
        click.option("--tag-output", is_flag=True, help="Prefix every output line with [rank]."),
        click.option("--timeout", type=float, metavar="S", help="Kill the job after S seconds."),
        click.option(
            "--fence-timeout",
            type=float,
            metavar="S",
            help="Fail a PMI fence that waits longer than S seconds for a rank.",
        ),
        click.option(
            "--no-slurm",
            is_flag=True,
            help="Launch here even inside a Slurm allocation (default: use srun).",
        ),
        click.option("-v", "--verbose", is_flag=True, help="Say how the job is launched."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def is_sif(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(42)[32:42] == MAGIC
    except OSError:
        return False


def launch(image: Optional[str], argv: Sequence[str], runscript: bool, kw: dict[str, Any]) -> None:
    from rankwire.launcher.execute import execute
    from rankwire.launcher.facts import (
        image_mpi_kinds,
        open_files_limit,
        program_mpi_kind,
        usable_cpus,
    )
    from rankwire.runtime.assemble import plan_image
    from rankwire.runtime.facts import gather
    from rankwire.runtime.userfacts import user_facts

    values = take_options(kw, "container", "process")
    source = take_options(kw, "source", "trust")
    dry_run, as_json = kw.pop("dry_run"), kw.pop("as_json")
    lopts = LaunchOptions(**kw)
    validate(lopts)  # bad numbers fail before anything is read or started
    user = user_facts()
    container = None
    if image is None:
        shaping = {**values, **source}
        given = [
            o.long
            for o in in_scope("container", "process", "source", "trust")
            if shaping[o.dest] != o.default
        ]
        if given:
            raise UserError(
                f"{', '.join(given)} shape a container: give an image "
                "(--image IMG) or drop them to run on the host"
            )
        process = plan_host_process(argv, user.environ, user.cwd)
        prefix: list[str] = []
        kind = program_kind = program_mpi_kind(argv[0], user.environ)
        host_mpi: dict[str, Any] = {}
    else:
        opts = exec_options(values)
        sif, named = local_image(image, source)
        facts = gather(sif, opts, user=user)
        planned = plan_image(facts, opts, runscript_argv(facts.image, argv) if runscript else argv)
        assert planned.process is not None
        container, process = planned.container, planned.process
        rankwire = os.path.join(os.path.dirname(sys.executable), "rankwire")
        # Without --share, the tasks of the step on a node join one container by default.
        # The delegated command is the planned argv, an --entrypoint's words already in
        # front: the tasks' `rankwire exec` must not put them there again.
        argv_opts = delegation_argv({**cli_values(opts), **source, "entrypoint": False})
        prefix = [rankwire, "exec", *argv_opts, named]
        # The command's own libmpi decides (not an --entrypoint's shell or tini).
        program = argv[0] if opts.entrypoint and argv else process.argv[0]
        kind, program_kind = image_mpi_kinds(facts.image, program, process.env, user.cache_dir)
        if planned.host_mpi.pmi_kind:  # the host MPI's PMI, not the replaced library's
            kind = planned.host_mpi.pmi_kind
            program_kind = program_kind and kind
        host_mpi = planned.host_mpi.to_dict()
    slurm_mpi = None
    if user.environ.get("SLURM_JOB_ID") and not lopts.no_slurm:  # delegating: what srun offers
        from rankwire.runtime.doctorhost import slurm_install

        site = slurm_install()
        slurm_mpi = SlurmMpi(site.mpi_plugins, site.mpi_default)
    plan: LaunchPlan = plan_launch(
        lopts,
        process,
        container,
        user.environ,
        prefix,
        kind,
        program_kind,
        open_files_limit(),
        slurm_mpi,
        bridge_choice(values.get("pmi_bridge"), user.environ),
        usable_cpus(),
    )
    if dry_run:
        if as_json:
            doc = {**plan.to_dict(), **({"host_mpi": host_mpi} if host_mpi else {})}
            click.echo(json.dumps(doc, indent=2, sort_keys=True))
        else:
            click.echo(describe(plan))
        return
    if lopts.verbose:
        click.echo(f"rankwire: {describe(plan)}", err=True)
        if host_mpi and host_mpi["choice"] != "none":
            click.echo(f"rankwire: {host_mpi['reason']}", err=True)
        crowded = describe_oversubscription(plan)
        if crowded:
            click.echo(f"rankwire: {crowded}", err=True)
    if plan.delegate:
        try:
            os.execvp(plan.delegate[0], list(plan.delegate))
        except OSError as err:
            raise UserError(
                f"cannot run srun inside Slurm job {plan.slurm_job}: "
                f"{err.strerror}; pass --no-slurm to launch here"
            ) from None
    from rankwire.runtime.instance import end_with_slurmstepd

    end_with_slurmstepd()  # a task of a step (srun ... apptainer-mpirun) ends with it
    sys.exit(execute(plan))


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
    if image is None and (is_sif(target) or is_remote(target)):
        launch(target, args, True, kw)
    else:
        launch(image, (target, *args), False, kw)


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
