"""Which PMI an image's MPI needs, from its file list (pure; no I/O).

`pmi_kind(paths, libmpi_needed=None)` looks at the paths of an image (e.g. the lines of
`unsquashfs -o OFFSET -l image.sif`; a leading `squashfs-root/` is ignored) and optionally
the DT_NEEDED entries of its libmpi, and answers

  "pmix"    Open MPI (libmpi.so.40, libopen-pal / libopen-rte, an `openmpi` directory,
            Open MPI's MCA plugins), or an MPICH whose libmpi needs libpmix (DT_NEEDED, or,
            without DT_NEEDED facts, a libpmix next to it);
  "pmi1/2"  MPICH and its ABI family (libmpich.so.12, libmpi.so.12: MPICH, Intel MPI,
            MVAPICH) without libpmix: serve PMI-1/PMI-2;
  "both"    both families are installed (e.g. Debian with MPICH and Open MPI): the ranks'
            binary decides; serve both or ask the user;
  None      no MPI library found.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable
from typing import Optional

_OMPI_LIB = re.compile(r"^lib(mpi\.so\.40|open-pal\.so|open-rte\.so|mpi_mpifh\.so\.40)")
_OMPI_DIR = re.compile(r"^open-?mpi(-\d.*)?$", re.IGNORECASE)
_MPICH_LIB = re.compile(r"^lib(mpich\.so\.12|mpi\.so\.12|mpichcxx\.so\.12|mpifort\.so\.12)")
_PMIX_LIB = re.compile(r"^libpmix\.so")


def _components(path: str) -> list[str]:
    path = path.strip()
    # `unsquashfs -l` lines: "squashfs-root/usr/lib/..."
    parts = [p for p in posixpath.normpath("/" + path).split("/") if p]
    if parts and parts[0] == "squashfs-root":
        parts = parts[1:]
    return parts


def pmi_kind(paths: Iterable[str], libmpi_needed: Optional[Iterable[str]] = None) -> Optional[str]:
    """ "pmix", "pmi1/2", "both" or None (see the module docstring)."""
    ompi = mpich = pmix = False
    for path in paths:
        parts = _components(path)
        if not parts:
            continue
        name = parts[-1]
        if _PMIX_LIB.match(name):
            pmix = True
        in_ompi_dir = any(_OMPI_DIR.match(p) for p in parts[:-1])
        if _OMPI_LIB.match(name) or (in_ompi_dir and name.startswith(("lib", "mca_"))):
            ompi = True
        if _MPICH_LIB.match(name):
            mpich = True
    needed = None if libmpi_needed is None else [posixpath.basename(n) for n in libmpi_needed]
    if needed is not None and any(_PMIX_LIB.match(n) for n in needed):
        return "pmix"  # whatever MPI it is, its libmpi speaks PMIx
    if mpich and not ompi:
        mpich_pmix = pmix if needed is None else False
        return "pmix" if mpich_pmix else "pmi1/2"
    if ompi and mpich:
        return "both"
    if ompi:
        return "pmix"
    return None
