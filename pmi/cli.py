"""`rankwire pmi probe`: ask whatever PMI server launched this process what it offers."""

from __future__ import annotations

import json
import sys

import click

from rankwire.pmi.client import PmiRequestError
from rankwire.pmi.errors import LocalProtocolError, RemoteProtocolError


@click.group("pmi")
def pmi() -> None:
    """PMI tools for debugging any launcher (ours, mpiexec.hydra, srun --mpi=pmi2)."""


@pmi.command("probe")
@click.argument("version", type=click.Choice(["1", "2", "x"]), default="1")
def probe_cmd(version: str) -> None:
    """Run as a rank: print what the PMI server offers (PMI-1, PMI-2 or PMIx: rank, size,
    process mapping or namespace) and a put/fence/get round trip with the neighbour rank,
    as one JSON line."""
    from rankwire.pmi.pmix.abi import PmixError

    try:
        if version == "x":
            from rankwire.pmi.pmix.probe import probe_pmix

            result = probe_pmix()
        else:
            from rankwire.pmi.probe import probe

            result = probe(int(version))
    except (PmiRequestError, LocalProtocolError, RemoteProtocolError, PmixError, OSError) as err:
        click.echo(f"rankwire: PMI probe failed: {err}", err=True)
        sys.exit(1)
    click.echo(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)


@pmi.command("bridge", hidden=True, context_settings={"ignore_unknown_options": True})
@click.option(
    "--pmi",
    "version",
    type=click.Choice(["pmi1", "pmi2"]),
    default="pmi2",
    show_default=True,
    help="The PMI environment the command gets (pmi2 adds PMI_JOBID; both are served).",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def bridge_cmd(version: str, command: tuple[str, ...]) -> None:
    """Under `srun --mpi=pmix`: run COMMAND with a PMI_FD whose PMI-1/PMI-2 is carried out
    through the step's PMIx server as this task's rank (and without the PMIX_* variables,
    so its MPI does not try PMIx). In a Slurm step the node's bridge server forks the
    bridge while COMMAND starts: a bridge that cannot reach PMIx says why on stderr and
    closes PMI_FD, which COMMAND's PMI_Init reports."""
    import os

    from rankwire.errors import UserError, exec_failure
    from rankwire.pmi import bridge as pmi_bridge

    if not command:
        raise UserError("pmi bridge: no command: give -- COMMAND [ARGS...]")
    env = pmi_bridge.task_env(os.environ, pmi_bridge.task_pmi_env(os.environ, version))
    try:
        os.execvpe(command[0], list(command), env)
    except OSError as err:  # our end of PMI_FD closes as we exit: the bridge ends quietly
        code, message = exec_failure(command[0], err, "on this host")
        raise UserError(message, exit_code=code) from err
