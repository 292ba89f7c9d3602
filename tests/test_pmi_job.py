"""The job/KVS core: process mapping, fence = allgather, failures that name the ranks."""

from __future__ import annotations

import os

import pytest

from rankwire.pmi.job import (
    MAPPING_MAX,
    FenceDone,
    FenceFailed,
    Job,
    RequestRejected,
    format_ranks,
    nodes_of,
    process_mapping,
)


@pytest.mark.parametrize(
    ("nodes", "mapping"),
    [
        ([0], "(vector,(0,1,1))"),
        ([0, 0, 0], "(vector,(0,1,3))"),
        ([0, 0, 1, 1], "(vector,(0,2,2))"),
        ([5, 5, 2, 2], "(vector,(0,2,2))"),  # labels are renumbered
        ([0, 1, 0, 1], "(vector,(0,2,1),(0,2,1))"),
        ([0, 1, 0, 1, 0], "(vector,(0,2,1),(0,2,1),(0,1,1))"),
        ([0, 0, 1, 1, 2, 2, 2, 2], "(vector,(0,2,2),(2,1,4))"),
        ([0, 0, 0, 1, 1], "(vector,(0,1,3),(1,1,2))"),
        ([0, 1, 2, 3], "(vector,(0,4,1))"),
    ],
)
def test_process_mapping(nodes: list[int], mapping: str) -> None:
    assert process_mapping(nodes) == mapping


@pytest.mark.parametrize("seed", range(20))
def test_process_mapping_round_trips(seed: int) -> None:
    import random

    rng = random.Random(seed)
    nodes = [rng.randrange(4) for _ in range(rng.randrange(1, 40))]
    mapping = process_mapping(nodes)
    assert mapping is not None
    first: dict[int, int] = {}
    dense = [first.setdefault(n, len(first)) for n in nodes]
    assert nodes_of(mapping, len(nodes)) == dense


def test_nodes_of_reads_slurms_cyclic_mapping_and_refuses_garbage() -> None:
    assert nodes_of("(vector,(0,2,1))", 5) == [0, 1, 0, 1, 0]  # the blocks repeat
    assert nodes_of("(vector, (0,2,2))", 4) == [0, 0, 1, 1]
    for bad in ("", "(vector,(0,2))", "(vector,(a,1,1))", "(vector,(0,0,1))", "(list,(0,1,1))"):
        with pytest.raises(ValueError, match="PMI process mapping"):
            nodes_of(bad, 2)


def test_mapping_too_long_is_absent_not_truncated() -> None:
    nodes = [i % 2 for i in range(200)] + [2, 2, 3]  # cyclic: one block per rank pair
    assert process_mapping(nodes) is None
    job = Job(size=len(nodes), nodes=nodes)
    assert job.process_mapping is None
    assert job.attr("PMI_process_mapping") is None
    assert job.get("PMI_process_mapping") is None
    assert len(process_mapping([0] * 10_000) or "") <= MAPPING_MAX


def test_job_attributes_and_preput_mapping() -> None:
    job = Job(size=4, nodes=[0, 0, 1, 1], appnum=3)
    assert job.attr("PMI_process_mapping") == "(vector,(0,2,2))"
    assert job.get("PMI_process_mapping") == "(vector,(0,2,2))"  # PMI-1 clients get it
    assert job.attr("universeSize") == "4"
    assert job.attr("PMI_hwloc_xmlfile") is None
    assert job.appnum == 3


def test_bad_job_arguments() -> None:
    with pytest.raises(ValueError):
        Job(size=0)
    with pytest.raises(ValueError):
        Job(size=2, nodes=[0])
    with pytest.raises(ValueError):
        Job(size=1, fence_timeout=0)


def test_fence_is_an_allgather_of_staged_puts() -> None:
    job = Job(size=3)
    job.put(0, "a", "0")
    job.put(2, "b", "2")
    assert job.get("a") is None  # not before the fence
    assert job.fence(0) is None
    assert job.fence(2) is None
    assert job.fence_waiting == (0, 2)
    job.put(1, "a", "1")  # later rank wins
    assert job.fence(1) == FenceDone((0, 1, 2))
    assert (job.get("a"), job.get("b")) == ("1", "2")
    assert job.fence_waiting == ()
    with pytest.raises(RequestRejected, match="reserved"):
        job.put(0, "PMI_process_mapping", "(vector,(0,1,9))")


def test_fence_twice_and_bad_rank() -> None:
    job = Job(size=2)
    job.fence(0)
    with pytest.raises(RequestRejected, match="twice"):
        job.fence(0)
    with pytest.raises(RequestRejected, match="outside"):
        job.put(2, "k", "v")


def test_exited_rank_fails_the_fence_naming_it() -> None:
    job = Job(size=4)
    assert job.rank_exited(2, "exited with code 9") is None  # no fence yet
    failed = job.fence(0)
    assert isinstance(failed, FenceFailed)
    assert failed.missing == (2,)
    assert failed.waiting == (0,)
    assert "rank 2 exited with code 9" in failed.reason
    assert not failed.timed_out


def test_rank_dying_while_others_wait() -> None:
    job = Job(size=3)
    job.fence(0)
    job.fence(1)
    failed = job.rank_exited(2, "was killed by signal 9")
    assert failed == FenceFailed(
        (2,), "fence cannot complete: rank 2 was killed by signal 9", False, (0, 1)
    )
    assert job.fence_waiting == ()


def test_rank_lost_inside_the_fence_fails_it_at_once() -> None:
    """A rank that sent its fence request and then lost its connection (or exited) can
    never get the reply: the fence fails now for the others, not when they all arrive."""
    job = Job(size=3)
    assert job.fence(0) is None
    assert job.fence(1) is None
    failed = job.rank_exited(0, "closed its PMI connection during a fence")
    assert failed == FenceFailed(
        (0,), "fence cannot complete: rank 0 closed its PMI connection during a fence", False,
        (1,),
    )  # fmt: skip
    assert job.fence_waiting == ()
    failed = job.fence(2)  # rank 2 arrives late: the next fence fails at once too
    assert isinstance(failed, FenceFailed) and failed.missing == (0,) and failed.waiting == (2,)


def test_rank_that_finalized_cannot_be_waited_for() -> None:
    job = Job(size=2)
    assert job.finalize(1) is None
    failed = job.fence(0)
    assert isinstance(failed, FenceFailed) and failed.missing == (1,)
    assert "finalized" in failed.reason
    assert job.rank_exited(1, "exited with code 0") is None  # normal exit after finalize


def test_fence_timeout_names_the_silent_ranks() -> None:
    job = Job(size=6, fence_timeout=2.5)
    assert job.expire_fence() is None  # nothing in progress
    for r in (0, 1, 3):
        job.fence(r)
    failed = job.expire_fence()
    assert failed is not None and failed.timed_out
    assert failed.missing == (2, 4, 5)
    assert failed.reason == "fence timed out after 2.5 s: no fence from ranks 2,4-5"


def test_node_attributes_are_node_local_and_can_be_waited_for() -> None:
    job = Job(size=4, nodes=[0, 0, 1, 1])
    assert job.node_attr(1, "shm") is None
    job.wait_node_attr(1, "shm")
    job.wait_node_attr(3, "shm")
    assert job.put_node_attr(0, "shm", "seg0") == [1]  # rank 3 is on the other node
    assert job.node_attr(1, "shm") == "seg0"
    assert job.node_attr(2, "shm") is None
    assert job.put_node_attr(2, "shm", "seg1") == [3]


def test_format_ranks() -> None:
    assert format_ranks([5]) == "rank 5"
    assert format_ranks([3, 0, 1, 2, 7, 9, 10]) == "ranks 0-3,7,9-10"


# -- mutation-testing kills (tools/mutants.py, `make mutants`) ------------------------------
def test_mapping_limit_is_exactly_mpich_s_buffer() -> None:
    """673 bytes is the longest mapping MPICH's PMI-1 client reads whole; 674 is absent."""
    assert MAPPING_MAX == 673
    longest = [0, 1] * 82 + [0] * 12  # 82 blocks (0,2,1) and one (0,1,12): 673 bytes
    assert process_mapping(longest) == "(vector," + "(0,2,1)," * 82 + "(0,1,12))"
    assert len(process_mapping(longest) or "") == 673
    assert process_mapping([0, 1] * 82 + [0] * 100) is None  # (0,1,100): 674 bytes


def test_fence_results_are_frozen() -> None:
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        FenceDone((0,)).ranks = (1,)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        FenceFailed((0,), "r", False, ()).reason = "x"  # type: ignore[misc]


def test_job_defaults_and_argument_checks() -> None:
    job = Job(size=1)
    assert (job.size, job.nodes, job.appnum, job.universe_size) == (1, (0,), 0, 1)
    assert job.jobid.startswith(f"rankwire-{os.getpid()}-")
    assert Job(size=2, jobid="step.7", universe_size=8).jobid == "step.7"
    assert Job(size=2, nodes=None).nodes == (0, 0)
    assert Job(size=1, fence_timeout=0.5).fence_timeout == 0.5
    with pytest.raises(ValueError) as e:
        Job(size=0)
    assert str(e.value) == "job size must be at least 1, got 0"
    with pytest.raises(ValueError) as e:
        Job(size=2, nodes=[0, -1])
    assert str(e.value) == "nodes must list one node id >= 0 per rank (size 2): [0, -1]"
    with pytest.raises(ValueError) as e:
        Job(size=1, fence_timeout=0)
    assert str(e.value) == "fence_timeout must be positive or None, got 0"


def test_rank_state_queries() -> None:
    job = Job(size=3)
    assert [job.is_initialized(r) for r in range(3)] == [False, False, False]
    job.initialize(1)
    assert [job.is_initialized(r) for r in range(3)] == [False, True, False]
    assert job.finalize(2) is None
    assert [job.is_finalized(r) for r in range(3)] == [False, False, True]
    assert job.rank_exited(0, "exited with code 3") is None
    assert [job.is_gone(r) for r in range(3)] == [True, False, False]
    assert job.rank_exited(0, "exited with code 4") is None  # once gone, no-op
    assert job.fence(1) == FenceFailed(
        (0, 2),
        "fence cannot complete: rank 0 exited with code 3; rank 2 finalized without "
        "joining the fence",
        False,
        (1,),
    )


def test_first_abort_is_kept() -> None:
    job = Job(size=2)
    assert job.aborted is None
    job.abort(1, 7, "first")
    job.abort(0, 9, "second")
    assert job.aborted == (1, 7, "first")


def test_a_rank_that_exits_stops_waiting_for_a_node_attribute() -> None:
    job = Job(size=3)
    job.wait_node_attr(0, "shm")
    job.wait_node_attr(1, "shm")
    assert job.rank_exited(0, "exited with code 1") is None
    assert job.put_node_attr(2, "shm", "seg") == [1]
