"""The job and its key-value space, shared by the PMI-1 and PMI-2 front-ends (sans-I/O).

`Job` holds everything a PMI server knows about one job: size, the rank → node mapping,
appnum, the KVS, node attributes, and the state of the current fence. It never touches a
socket or a clock: the transport calls it with what a rank asked for and acts on what it
returns.

* `put()` stages a key for the calling rank; it becomes visible to every rank when the next
  fence completes (a fence is an allgather of the staged puts; PMI-1 `barrier_in` and PMI-2
  `kvs-fence` both map to `fence()`). Later writers win, ranks are merged in rank order.
* `fence()` returns `FenceDone` (reply to every rank in it), `FenceFailed` (reply an error to
  `waiting`, tell the owner), or None (keep waiting). A fence fails as soon as it cannot
  complete: a rank that exited, lost its connection or finalized cannot join it.
  `expire_fence()` is called by the transport when its fence timer fires (the core only
  holds `fence_timeout`); `rank_exited()` fails a fence a dead rank was blocking, or was
  inside (its process or its PMI connection ended before the fence completed: the others
  would get a KVS without its puts, and its own reply has nowhere to go).
* `attr()` answers job attributes (`PMI_process_mapping`, `universeSize`); everything else is
  absent. `PMI_process_mapping` is also pre-put in the KVS for PMI-1 clients, which `get` it.

Mapping rule (MPICH 4.0.2 crashes on an empty or malformed mapping): the mapping is either a
correct `(vector,(start,count,ppn),...)` description of `nodes`, or absent.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Sequence
from typing import Optional, Union

from rankwire.record import record

# MPICH's PMI-1 client clamps its value buffer to 1024 - kvsname_max(256) - keylen_max(64) - 30
# = 674 bytes (NUL included) and would truncate a longer mapping into a malformed one.
MAPPING_MAX = 673
RESERVED_PREFIX = "PMI_"

_job_ids = itertools.count()


class RequestRejected(Exception):
    """A rank asked for something the job cannot do (the transport replies with an error)."""


@record
class FenceDone:
    """The fence completed: reply to every rank in `ranks`."""

    ranks: tuple[int, ...]


@record
class FenceFailed:
    """A fence cannot complete. `missing` are the ranks it waited for, `waiting` the ranks
    that were in it (they get an error reply), `reason` one line naming the missing ranks."""

    missing: tuple[int, ...]
    reason: str
    timed_out: bool
    waiting: tuple[int, ...]


FenceResult = Union[FenceDone, FenceFailed]


def format_ranks(ranks: Iterable[int]) -> str:
    """`[0, 1, 2, 5]` → `"ranks 0-2,5"`; one rank → `"rank 5"`."""
    ordered = sorted(set(ranks))
    parts: list[str] = []
    for _, run in itertools.groupby(enumerate(ordered), key=lambda p: p[1] - p[0]):
        block = [r for _, r in run]
        parts.append(str(block[0]) if len(block) == 1 else f"{block[0]}-{block[-1]}")
    return ("rank " if len(ordered) == 1 else "ranks ") + ",".join(parts)


def process_mapping(nodes: Sequence[int]) -> Optional[str]:
    """The PMI `(vector,(start_node,node_count,ppn),...)` string for a rank → node list.

    Node ids are renumbered by first appearance, so any labels work. Consecutive ranks on
    one node form a run; runs on consecutive nodes with the same length merge into one
    block, e.g. [0,0,1,1] → `(vector,(0,2,2))`, [0,1,0,1] → `(vector,(0,2,1),(0,2,1))`.
    Every rank is covered explicitly, so MPICH's wrap-around rule never kicks in. Returns
    None (absent) when the string would exceed MAPPING_MAX.
    """
    if not nodes:
        return None
    ids: dict[int, int] = {}
    dense = [ids.setdefault(n, len(ids)) for n in nodes]
    runs = [(node, len(list(group))) for node, group in itertools.groupby(dense)]
    blocks: list[list[int]] = []  # [start, count, ppn]
    for node, length in runs:
        last = blocks[-1] if blocks else None
        if last and last[2] == length and last[0] + last[1] == node:
            last[1] += 1
        else:
            blocks.append([node, 1, length])
    text = "(vector," + ",".join(f"({s},{c},{p})" for s, c, p in blocks) + ")"
    return text if len(text) <= MAPPING_MAX else None


def nodes_of(mapping: str, size: int) -> list[int]:
    """The node of each of `size` ranks from a `(vector,(start,count,ppn),...)` mapping,
    read as MPICH reads it: the blocks repeat until every rank has a node (Slurm writes
    `(vector,(0,2,1))` for 4 ranks cyclic over 2 nodes). ValueError when it is not one."""
    text = mapping.replace(" ", "")
    if not (text.startswith("(vector,(") and text.endswith("))")):
        raise ValueError(f"not a PMI process mapping: {mapping[:80]!r}")
    blocks: list[tuple[int, int, int]] = []
    for part in text[len("(vector,(") : -2].split("),("):
        fields = part.split(",")
        if len(fields) != 3 or not all(f.isdigit() for f in fields):
            raise ValueError(f"not a PMI process mapping: {mapping[:80]!r}")
        start, count, ppn = map(int, fields)
        blocks.append((start, count, ppn))
    if size > 0 and not any(count and ppn for _, count, ppn in blocks):
        raise ValueError(f"a PMI process mapping that places no rank: {mapping[:80]!r}")
    out: list[int] = []
    while len(out) < size:
        for start, count, ppn in blocks:
            for node in range(start, start + count):
                out += [node] * ppn
    return out[:size]


class Job:
    """One job's PMI state. All methods take the calling rank; none block or do I/O."""

    def __init__(
        self,
        size: int,
        nodes: Optional[Sequence[int]] = None,
        appnum: int = 0,
        fence_timeout: Optional[float] = None,
        jobid: Optional[str] = None,
        universe_size: Optional[int] = None,
    ) -> None:
        """`nodes[r]` is the node (any int label) rank r runs on; default: all on one node.

        `fence_timeout` (seconds, None = never) is how long the transport lets a fence wait
        after the first rank entered it. Beware: MPI_Finalize fences too, so a timeout
        shorter than the spread of the ranks' run times kills healthy jobs.
        """
        if size < 1:
            raise ValueError(f"job size must be at least 1, got {size}")
        nodes = [0] * size if nodes is None else list(nodes)
        if len(nodes) != size or any(not isinstance(n, int) or n < 0 for n in nodes):
            raise ValueError(f"nodes must list one node id >= 0 per rank (size {size}): {nodes}")
        if fence_timeout is not None and fence_timeout <= 0:
            raise ValueError(f"fence_timeout must be positive or None, got {fence_timeout}")
        self.size = size
        self.nodes = tuple(nodes)
        self.appnum = appnum
        self.fence_timeout = fence_timeout
        self.jobid = jobid or f"rankwire-{os.getpid()}-{next(_job_ids)}"
        self.universe_size = universe_size or size
        self.process_mapping = process_mapping(self.nodes)
        self.aborted: Optional[tuple[int, int, str]] = None  # (rank, code, message)
        self._kvs: dict[str, str] = {}
        if self.process_mapping is not None:
            self._kvs["PMI_process_mapping"] = self.process_mapping
        self._staged: dict[int, dict[str, str]] = {}
        self._fence_in: dict[int, None] = {}  # ordered set of ranks in the current fence
        self._initialized: set[int] = set()
        self._finalized: set[int] = set()
        self._gone: dict[int, str] = {}  # rank → why it can no longer take part
        self._node_attrs: dict[int, dict[str, str]] = {}
        self._node_waiters: dict[tuple[int, str], list[int]] = {}

    # -- lifecycle -------------------------------------------------------------------
    def check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.size:
            raise RequestRejected(f"rank {rank} is outside this job of size {self.size}")

    def initialize(self, rank: int) -> None:
        self.check_rank(rank)
        self._initialized.add(rank)

    def is_initialized(self, rank: int) -> bool:
        return rank in self._initialized

    def is_finalized(self, rank: int) -> bool:
        return rank in self._finalized

    def is_gone(self, rank: int) -> bool:
        """The rank exited or lost its connection without finalizing."""
        return rank in self._gone

    def finalize(self, rank: int) -> Optional[FenceFailed]:
        """Record PMI finalize; fails a fence the rank did not join."""
        self.check_rank(rank)
        if rank in self._fence_in:
            raise RequestRejected(f"rank {rank} finalized while inside a fence")
        if rank in self._finalized:
            raise RequestRejected(f"rank {rank} finalized twice")
        self._finalized.add(rank)
        return self._fail_if_blocked()

    def abort(self, rank: int, code: int, message: str) -> None:
        self.check_rank(rank)
        if self.aborted is None:
            self.aborted = (rank, code, message)

    def rank_exited(self, rank: int, reason: str) -> Optional[FenceFailed]:
        """The rank is gone (`reason`, e.g. "exited with code 1"). The current fence fails
        now, whether the rank joined it or not; later fences fail at once. No-op after
        finalize."""
        self.check_rank(rank)
        if rank in self._finalized or rank in self._gone:
            return None
        self._gone[rank] = reason
        for waiters in self._node_waiters.values():
            if rank in waiters:
                waiters.remove(rank)
        return self._fail_if_blocked()

    # -- KVS ---------------------------------------------------------------------------
    def put(self, rank: int, key: str, value: str) -> None:
        self.check_rank(rank)
        if key.startswith(RESERVED_PREFIX):
            raise RequestRejected(f"key {key!r} is reserved (prefix {RESERVED_PREFIX!r})")
        self._staged.setdefault(rank, {})[key] = value

    def get(self, key: str) -> Optional[str]:
        """A key published by a completed fence (or pre-put by the server)."""
        return self._kvs.get(key)

    def attr(self, key: str) -> Optional[str]:
        """A job attribute, or None when absent (clients get "not found")."""
        if key == "PMI_process_mapping":
            return self.process_mapping
        if key == "universeSize":
            return str(self.universe_size)
        return None

    # -- node attributes (PMI-2) ----------------------------------------------------------
    def put_node_attr(self, rank: int, key: str, value: str) -> list[int]:
        """Store a node-local attribute; returns the ranks waiting for it (reply `value`)."""
        self.check_rank(rank)
        node = self.nodes[rank]
        self._node_attrs.setdefault(node, {})[key] = value
        return self._node_waiters.pop((node, key), [])

    def node_attr(self, rank: int, key: str) -> Optional[str]:
        self.check_rank(rank)
        return self._node_attrs.get(self.nodes[rank], {}).get(key)

    def wait_node_attr(self, rank: int, key: str) -> None:
        """Park the rank until a rank on its node puts `key`."""
        self.check_rank(rank)
        self._node_waiters.setdefault((self.nodes[rank], key), []).append(rank)

    # -- fence ---------------------------------------------------------------------------
    @property
    def fence_waiting(self) -> tuple[int, ...]:
        """Ranks inside the current fence (empty: no fence in progress)."""
        return tuple(self._fence_in)

    def fence(self, rank: int) -> Optional[FenceResult]:
        self.check_rank(rank)
        if rank in self._finalized:
            raise RequestRejected(f"rank {rank} entered a fence after finalize")
        if rank in self._fence_in:
            raise RequestRejected(f"rank {rank} entered the same fence twice")
        self._fence_in[rank] = None
        failed = self._fail_if_blocked()
        if failed is not None:
            return failed
        if len(self._fence_in) < self.size:
            return None
        for r in sorted(self._staged):
            self._kvs.update(self._staged[r])
        self._staged.clear()
        ranks = tuple(sorted(self._fence_in))
        self._fence_in.clear()
        return FenceDone(ranks)

    def expire_fence(self) -> Optional[FenceFailed]:
        """The transport's fence timer fired: fail the current fence, naming who is missing."""
        if not self._fence_in:
            return None
        missing = [r for r in range(self.size) if r not in self._fence_in]
        reason = (
            f"fence timed out after {self.fence_timeout:g} s: no fence from {format_ranks(missing)}"
        )
        return self._fail(missing, reason, timed_out=True)

    def _fail_if_blocked(self) -> Optional[FenceFailed]:
        if not self._fence_in:
            return None
        why = dict(self._gone)
        for r in self._finalized:
            why.setdefault(r, "finalized without joining the fence")
        if not why:
            return None
        by_reason: dict[str, list[int]] = {}
        for r, text in why.items():
            by_reason.setdefault(text, []).append(r)
        reason = "fence cannot complete: " + "; ".join(
            f"{format_ranks(rs)} {text}" for text, rs in by_reason.items()
        )
        return self._fail(list(why), reason, timed_out=False)

    def _fail(self, missing: list[int], reason: str, timed_out: bool) -> FenceFailed:
        waiting = tuple(sorted(r for r in self._fence_in if r not in self._gone))
        self._fence_in.clear()
        self._staged.clear()
        return FenceFailed(tuple(sorted(missing)), reason, timed_out, waiting)
