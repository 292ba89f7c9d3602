"""Facts the launcher needs beyond the runtime's: which PMI the ranks' MPI speaks."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from typing import Optional

from rankwire.pmi.pmix.detect import pmi_kind
from rankwire.runtime.plan import ImageFacts


def image_mpi_kind(image: ImageFacts) -> Optional[str]:
    """ "pmix", "pmi1/2", "both" or None, from the image's file list (no mount needed)."""
    proc = subprocess.run(
        ["unsquashfs", "-o", str(image.partition_offset), "-l", "-n", image.path],
        capture_output=True,
        text=True,
    )
    return pmi_kind(proc.stdout.splitlines()) if proc.returncode == 0 else None


def program_mpi_kind(program: str, environ: Mapping[str, str]) -> Optional[str]:
    """The same for a host program, from the libraries `ldd` says it loads."""
    path = shutil.which(program, path=environ.get("PATH"))
    if path is None:
        return None
    proc = subprocess.run(["ldd", path], capture_output=True, text=True)
    if proc.returncode != 0:  # a script, or not dynamic
        return None
    libs = [w for line in proc.stdout.splitlines() for w in line.split() if w.startswith("/")]
    return pmi_kind(libs)
