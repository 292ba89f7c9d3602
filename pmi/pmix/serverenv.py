"""What every PMIx server of ours starts with, the launcher's per-node helpers
(`pmi.pmix.server`) and the PMI-2 bridge (`pmi.pmix.pmi2serve`) alike: libpmix's settings
and a private directory for its files. A module of its own so that the bridge, on the
path of each bridged task's start, does not import the launcher's server (about 12 ms)."""

from __future__ import annotations

import shutil
import tempfile

from rankwire import lockdirs

# read by PMIx_server_init. `hwloc_hole_kind=none`: a topology the server shares
# (`helper.init_server`) goes to the clients as XML in the job's data, not as a
# shared-memory file in our tmpdir, which a container's private /tmp (--contain) hides:
# Open MPI's ranks then print "OPAL ERROR: File open failure" (the XML costs them no more:
# 466 / 470 ms for 4 ranks in a container, 925 / 922 for 32).
HELPER_ENV = {
    "PMIX_MCA_gds": "hash",
    "PMIX_MCA_psec": "none",
    "PMIX_MCA_pmix_server_fence_localonly_opt": "0",
    "PMIX_MCA_pmix_hwloc_hole_kind": "none",
}
TMPDIR_PREFIX = "rankwire-pmix-"


def claim_tmpdir() -> tuple[str, int]:
    """A new private dir for the helpers' PMIx files, and the descriptor whose lock says
    its launcher lives; first, those of killed launchers go (`rankwire.lockdirs`)."""
    base = tempfile.gettempdir()
    lockdirs.prune(base, TMPDIR_PREFIX, lambda path: shutil.rmtree(path, ignore_errors=True))
    return lockdirs.claim(base, TMPDIR_PREFIX)
