"""Facts the launcher needs beyond the runtime's: which PMI the ranks' MPI speaks."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Mapping
from typing import Optional

from rankwire.pmi.pmix.detect import pmi_kind
from rankwire.runtime.plan import ImageFacts


def image_mpi_kind(image: ImageFacts, cache_dir: str) -> Optional[str]:
    """ "pmix", "pmi1/2", "both" or None, from the image's file list (no mount needed).

    Listing a large image takes ~6 µs per file, so the answer is kept in `cache_dir`
    under the image's identity digest and the listing is done once per image.
    """
    cached = os.path.join(cache_dir, "mpi-kind", image.digest)
    try:
        with open(cached) as f:
            return f.read().strip() or None
    except OSError:
        pass
    proc = subprocess.run(
        ["unsquashfs", "-o", str(image.partition_offset), "-l", "-n", image.path],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return None
    kind = pmi_kind(proc.stdout.splitlines())
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        with open(cached, "w") as f:
            f.write(kind or "")
    return kind


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
