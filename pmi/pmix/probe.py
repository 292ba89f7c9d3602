"""`probe_pmix()`: run as one rank and report what its PMIx server says.

Init, read the job size and this rank's local rank / local size / host, then one
put → commit → fence → get round trip: every rank puts its own key, fences (collecting
data), and reads its neighbour's (rank + 1 mod size). One dict per rank::

    {"pmi": "pmix", "library": "OpenPMIx 4.2.2rc2 ...", "server_version": "4.2.2rc2",
     "nspace": "...", "rank": 0, "size": 2, "local_rank": 0, "local_size": 2,
     "hostname": "vm", "neighbour": 1, "neighbour_value": "from-rank-1=ok", "ok": true}

`rankwire pmi probe x` prints it as one JSON line (exit 1 unless ok).
"""

from __future__ import annotations

import os
from typing import Any

from rankwire.errors import UserError
from rankwire.pmi.pmix.abi import RANK_WILDCARD, PmixError, Proc, version
from rankwire.pmi.pmix.client_lib import Client

KEY_PREFIX = "rankwire-probe-"


def expected_value(rank: int) -> str:
    return f"from-rank-{rank}=ok"


def _optional(client: Client, key: str, proc: Proc) -> Any:
    try:
        return client.get(key, proc)
    except PmixError:
        return None


def probe_pmix() -> dict[str, Any]:
    """One rank's view of its PMIx server (raises UserError when there is none)."""
    if not os.environ.get("PMIX_NAMESPACE") or not any(
        k.startswith("PMIX_SERVER_URI") for k in os.environ
    ):
        raise UserError(
            "no PMIx server in this environment (PMIX_NAMESPACE / PMIX_SERVER_URI* unset): "
            "run under `srun --mpi=pmix` or rankwire's PMIx launcher"
        )
    client = Client()
    try:
        me = client.init()
    except PmixError as err:
        raise UserError(f"cannot connect to the PMIx server: {err}") from err
    try:
        job = Proc(me.nspace, RANK_WILDCARD)
        size = int(client.get("pmix.job.size", job))
        local_rank = _optional(client, "pmix.lrank", me)
        local_size = _optional(client, "pmix.local.size", job)
        hostname = _optional(client, "pmix.hname", me)
        client.put(f"{KEY_PREFIX}{me.rank}", expected_value(me.rank))
        client.commit()
        client.fence(collect=True)
        neighbour = (me.rank + 1) % size
        got = client.get(f"{KEY_PREFIX}{neighbour}", Proc(me.nspace, neighbour))
    except PmixError as err:
        raise UserError(f"PMIx probe failed on rank {me.rank}: {err}") from err
    finally:
        client.finalize()
    return {
        "pmi": "pmix",
        "library": version(),
        "server_version": os.environ.get("PMIX_VERSION"),
        "nspace": me.nspace,
        "rank": me.rank,
        "size": size,
        "local_rank": local_rank,
        "local_size": local_size,
        "hostname": hostname,
        "neighbour": neighbour,
        "neighbour_value": got,
        "ok": got == expected_value(neighbour),
    }
