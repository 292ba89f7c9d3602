"""Host paths the tests rely on (Debian's packages, as `make test` installs them)."""

from __future__ import annotations

import os

# The host libfabric (libfabric1), resolved: what a fabric plan binds over an image's copy.
LIBFABRIC = os.path.realpath("/usr/lib/x86_64-linux-gnu/libfabric.so.1")

# What an image needs besides the ldd closure of Debian's Open MPI 4.1 programs.
OMPI_TREES = (
    "/usr/lib/x86_64-linux-gnu/openmpi",  # MCA plugins
    "/usr/lib/x86_64-linux-gnu/pmix2",  # PMIx plugins
    "/etc/openmpi",
    "/usr/share/openmpi",  # help texts
)
