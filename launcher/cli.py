"""Console entry point of `apptainer-mpirun`."""

from __future__ import annotations

import sys


def apptainer_mpirun() -> None:
    """Placeholder until the launcher lands: says so and exits 2, never pretends to run."""
    print(
        "apptainer-mpirun: not implemented yet (the local launcher is issue #4); "
        "until then launch ranks with srun or mpiexec",
        file=sys.stderr,
    )
    sys.exit(2)
