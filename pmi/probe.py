"""`probe(version)`: run as one rank of a job and report what its PMI server says.

Connects from the environment, inits, reads rank/size/appnum/kvsname and the process
mapping, then does one put → fence → get round trip: every rank puts its own key, fences,
and reads its neighbour's (rank + 1 mod size). The result is a plain dict, one per rank:

    {"version": 2, "rank": 0, "size": 2, "appnum": 0, "kvsname": "...",
     "process_mapping": "(vector,(0,1,2))", "neighbour": 1,
     "neighbour_value": "from-rank-1=ok", "ok": true}

`rankwire pmi probe [1|2]` (see `pmi/cli.py`) prints it as one JSON line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

from rankwire.errors import UserError
from rankwire.pmi.client import Pmi1Client, Pmi2Client

KEY_PREFIX = "rankwire-probe-"


def expected_value(rank: int) -> str:
    return f"from-rank-{rank}=ok"  # '=' inside a value is legal in both protocols


def probe(version: int, environ: Optional[Mapping[str, str]] = None) -> dict[str, object]:
    if version not in (1, 2):
        raise UserError(f"PMI version {version} is not supported; use 1 or 2")
    cls = Pmi1Client if version == 1 else Pmi2Client
    with cls.from_env(environ) as pmi:
        pmi.init()
        mapping = pmi.get_job_attr("PMI_process_mapping")
        pmi.put(f"{KEY_PREFIX}{pmi.rank}", expected_value(pmi.rank))
        pmi.fence()
        neighbour = (pmi.rank + 1) % pmi.size
        got = pmi.get(f"{KEY_PREFIX}{neighbour}")
        pmi.finalize()
    return {
        "version": version,
        "rank": pmi.rank,
        "size": pmi.size,
        "appnum": pmi.appnum,
        "kvsname": pmi.kvsname,
        "process_mapping": mapping,
        "neighbour": neighbour,
        "neighbour_value": got,
        "ok": got == expected_value(neighbour),
    }
