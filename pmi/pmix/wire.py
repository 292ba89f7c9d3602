"""Messages between the launcher (`PmixServer`) and a PMIx helper process (`helper`).

One JSON object per line over a Unix socketpair; binary payloads (fence and modex blobs)
travel base64-encoded in the `data` field. Only the two processes of one job speak it.

launcher → helper
  {"op": "init", ...}                                 see `helper.serve`
  {"op": "fence_done", "id", "status", "data"}        complete the helper's fence `id`
  {"op": "dmodex_req", "id", "rank"}                  fetch a local rank's modex blob
  {"op": "dmodex_done", "id", "status", "data"}       answer the helper's direct modex `id`
  {"op": "sync", "rank"}                              a rank exited: answer after what
                                                      libpmix already told us about it
  {"op": "shutdown"}
helper → launcher
  {"op": "ready", "version", "envs": {rank: env}} | {"op": "error", "message"}
  {"op": "connected"|"finalized", "rank"}
  {"op": "abort", "rank", "code", "message"}
  {"op": "fence", "id", "procs": [[nspace, rank], ...], "collect", "data"}
  {"op": "dmodex", "id", "rank"}                      a local client wants a remote rank's data
  {"op": "dmodex_data", "id", "status", "data"}       answer to dmodex_req
  {"op": "synced", "rank"}
  {"op": "bye"}                                       after shutdown, before exit
"""

from __future__ import annotations

import base64
import json
from typing import Any

LINE_LIMIT = 1 << 28  # asyncio StreamReader limit: fence blobs grow with the job


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    msg = json.loads(line)
    if not isinstance(msg, dict) or "op" not in msg:
        raise ValueError(f"not a PMIx helper message: {line[:80]!r}")
    return msg


def pack(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unpack(text: str) -> bytes:
    return base64.b64decode(text) if text else b""
