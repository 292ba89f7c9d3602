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
