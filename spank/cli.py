"""`rankwire spank-helper PHASE`: run by the SPANK shim, not by people."""

from __future__ import annotations

import sys

import click


@click.command("spank-helper", hidden=True)
@click.argument("phase", type=click.Choice(["check", "start", "pull"]))
def spank_helper(phase: str) -> None:
    """Serve one request of the SPANK shim (JSON on stdin, reply on stdout)."""
    from rankwire.spank.helper import main

    sys.exit(main(phase))
