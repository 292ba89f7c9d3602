"""`rankwire spank-helper PHASE`: run by the SPANK shim, not by people. `rankwire.entry`
serves it without click; this command is for `--help` and its errors."""

from __future__ import annotations

import sys

import click

from rankwire.entry import PHASES


@click.command("spank-helper", hidden=True)
@click.argument("phase", type=click.Choice(list(PHASES)))
def spank_helper(phase: str) -> None:
    """Serve one request of the SPANK shim (JSON on stdin, reply on stdout)."""
    from rankwire.spank.helper import main

    sys.exit(main(phase))
