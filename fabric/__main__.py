"""`python -m rankwire.fabric ...`: the `rankwire fabric` group on its own."""

from __future__ import annotations

from rankwire.cli import run_command
from rankwire.fabric.cli import fabric

if __name__ == "__main__":
    run_command(fabric, None, prog_name="rankwire fabric")
