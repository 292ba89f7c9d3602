"""`rankwire spank-helper PHASE`: run by the SPANK shim, not by people."""

from __future__ import annotations

import sys

import click

PHASES = ["check", "start", "pull", "save", "epilog", "teardown"]


@click.command("spank-helper", hidden=True)
@click.argument("phase", type=click.Choice(PHASES))
def spank_helper(phase: str) -> None:
    """Serve one request of the SPANK shim (JSON on stdin, reply on stdout)."""
    from rankwire.spank.helper import main

    sys.exit(main(phase))
