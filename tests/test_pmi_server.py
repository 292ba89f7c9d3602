"""PmiServer at the transport level: in-loop clients on real sockets, and real processes."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
from collections.abc import Awaitable
from typing import TypeVar

import pytest

from harness.pmi import AsyncClient, run_job
from rankwire.pmi.job import FenceFailed, Job
from rankwire.pmi.messages import (
    Abort,
    ErrorReply,
    Fence,
    FenceReply,
    Finalize,
    FinalizeReply,
    FullInit,
    FullInitReply,
    Get,
    GetJobAttr,
    GetKvsName,
    GetNodeAttr,
    GetReply,
    Init,
    InitAck,
    InitAckReply,
    InitReply,
    KvsNameReply,
    Put,
    PutNodeAttr,
    PutReply,
)
from rankwire.pmi.server import (
    MAX_VIOLATIONS,
    Aborted,
    Finalized,
    PmiServer,
    ProtocolViolation,
    RankLost,
)

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


async def started(job: Job, mode: str = "fd") -> PmiServer:
    server = PmiServer(job, mode=mode)
    await server.start()
    return server


async def pmi1(server: PmiServer, rank: int) -> AsyncClient:
    c = await AsyncClient.connect(server, rank, version=1)
    if "PMI_ID" in c.env:
        assert (await c.call(InitAck(int(c.env["PMI_ID"])), InitAckReply)).rank == rank
    await c.call(Init(1, 1), InitReply)
    return c


async def pmi2(server: PmiServer, rank: int) -> AsyncClient:
    c = await AsyncClient.connect(server, rank, version=2)
    await c.call(Init(2, 0), InitReply)
    pmiid = int(c.env.get("PMI_ID", c.env["PMI_RANK"]))
    reply = await c.call(FullInit(pmiid, c.env["PMI_JOBID"]), FullInitReply)
    assert (reply.rank, reply.size) == (rank, server.job.size)
    return c


def events_now(server: PmiServer) -> list[object]:
    queue = server._events
    assert queue is not None
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


def test_garbage_line_gets_an_error_and_others_are_served() -> None:
    async def main() -> None:
        server = await started(Job(size=2))
        try:
            a, b = await pmi1(server, 0), await pmi2(server, 1)
            await a.send_raw(b"this is not PMI\n")
            assert isinstance(await a.next_reply(), ErrorReply)
            msg = await a.call_error(Put("PMI_x", "v"))  # reserved prefix
            assert "reserved" in msg
            await b.call(Put("kb", "vb;1"), PutReply)
            await a.call(Put("ka", "va=1"), PutReply)
            fence_a = asyncio.ensure_future(a.call(Fence(), FenceReply))
            await b.call(Fence(), FenceReply)
            await fence_a
            assert await a.call(Get("kb"), GetReply) == GetReply("vb;1")
            assert await b.call(Get("ka"), GetReply) == GetReply("va=1")
            assert await a.call(Get("nope"), GetReply) == GetReply(None)
            assert await b.call(GetJobAttr("nope"), GetReply) == GetReply(None)
            events = events_now(server)
            assert [type(e) for e in events] == [ProtocolViolation, ProtocolViolation]
            assert events[0].rank == 0  # type: ignore[attr-defined]
        finally:
            await server.close()

    run(main())


def test_a_client_that_keeps_erring_is_dropped() -> None:
    async def main() -> None:
        server = await started(Job(size=2), mode="port")
        try:
            good = await pmi1(server, 1)
            noisy = await AsyncClient.connect(server, 0)
            await noisy.send_raw(b"junk\n" * (MAX_VIOLATIONS + 5))
            replies = (await noisy.reader.read()).splitlines()  # until the server hangs up
            assert len(replies) == MAX_VIOLATIONS
            assert all(r.startswith(b"cmd=error rc=-1 msg=PMI-1_token") for r in replies)
            await good.call(GetKvsName(), KvsNameReply)
        finally:
            await server.close()

    run(main())


def test_broken_pmi2_framing_closes_only_that_connection() -> None:
    async def main() -> None:
        server = await started(Job(size=2))
        try:
            a, b = await pmi2(server, 0), await pmi1(server, 1)
            await a.send_raw(b"xyzzy!cmd=kvs-fence;")
            assert isinstance(await a.next_reply(), ErrorReply)
            assert await a.reader.read() == b""  # closed by the server
            await asyncio.sleep(0.05)
            assert await b.call(GetKvsName(), KvsNameReply) == KvsNameReply(server.job.jobid)
            # rank 0 is gone for good: a fence fails at once, naming it
            msg = await b.call_error(Fence())
            assert "rank 0 closed its PMI connection before finalize" in msg
            kinds = [type(e) for e in events_now(server)]
            assert kinds == [ProtocolViolation, RankLost, FenceFailed]
        finally:
            await server.close()

    run(main())


def test_rank_exit_fails_the_fence_naming_it() -> None:
    async def main() -> None:
        server = await started(Job(size=3))
        try:
            c0, c1 = await pmi1(server, 0), await pmi2(server, 1)
            f0 = asyncio.ensure_future(c0.call(Fence(), ErrorReply))
            f1 = asyncio.ensure_future(c1.call(Fence(), ErrorReply))
            await asyncio.sleep(0.05)
            assert not f0.done()
            server.rank_exited(2, 3)
            for reply in (await f0, await f1):
                assert "rank 2 exited with code 3" in reply.message.replace("_", " ")
            event = await server.wait_event()
            assert isinstance(event, FenceFailed)
            assert (event.missing, event.waiting, event.timed_out) == ((2,), (0, 1), False)
        finally:
            await server.close()

    run(main())


def test_rank_dropping_its_socket_inside_the_fence_fails_it_at_once() -> None:
    """Rank 0 sends its fence request and hangs up (its process lives on): rank 1, in the
    fence, gets the error now, though rank 2 has not fenced yet (issue 13, PMI_DROP)."""

    async def main() -> None:
        server = await started(Job(size=3))
        try:
            c0, c1 = await pmi1(server, 0), await pmi2(server, 1)
            f1 = asyncio.ensure_future(c1.call(Fence(), ErrorReply))
            await c0.send_raw(c0.codec.send(Fence()))
            await asyncio.sleep(0.05)
            assert not f1.done()
            await c0.close()
            reply = await asyncio.wait_for(f1, 2)
            assert reply.message.replace("_", " ") == (
                "fence cannot complete: rank 0 closed its PMI connection during a fence"
            )
            events = events_now(server)
            assert events == [
                RankLost(0, during_fence=True),
                FenceFailed(
                    (0,),
                    "fence cannot complete: rank 0 closed its PMI connection during a fence",
                    False,
                    (1,),
                ),
            ]
        finally:
            await server.close()

    run(main())


def test_silent_rank_fence_times_out() -> None:
    async def main() -> None:
        server = await started(Job(size=3, fence_timeout=0.3))
        try:
            c0, c2 = await pmi1(server, 0), await pmi1(server, 2)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            f0 = asyncio.ensure_future(c0.call(Fence(), ErrorReply))
            await c2.call(Fence(), ErrorReply)
            assert loop.time() - t0 >= 0.29
            assert "no fence from rank 1" in (await f0).message.replace("_", " ")
            event = await server.wait_event()
            assert isinstance(event, FenceFailed) and event.timed_out and event.missing == (1,)
        finally:
            await server.close()

    run(main())


def test_abort_reports_code_and_message() -> None:
    async def main() -> None:
        server = await started(Job(size=2))
        try:
            c0, c1 = await pmi1(server, 0), await pmi2(server, 1)
            await c0.send_raw(c0.codec.send(Abort(7, "")))
            assert await server.wait_event() == Aborted(0, 7, "")
            await c1.send_raw(c1.codec.send(Abort(5, "out of memory; giving up")))
            assert await server.wait_event() == Aborted(1, 5, "out of memory; giving up")
        finally:
            await server.close()

    run(main())


def test_port_mode_binds_ranks_by_pmi_id() -> None:
    async def main() -> None:
        server = await started(Job(size=2), mode="port")
        try:
            intruder = await AsyncClient.connect(server, 0)
            assert "unknown PMI" in await intruder.call_error(InitAck(12345))
            assert await intruder.reader.read() == b""
            c0, c1 = await pmi1(server, 0), await pmi2(server, 1)
            twin = await AsyncClient.connect(server, 0)
            assert "already connected" in await twin.call_error(InitAck(int(c0.env["PMI_ID"])))
            stray = await AsyncClient.connect(server, 1)
            await stray.call(Init(1, 1), InitReply)
            assert "send initack" in await stray.call_error(Put("k", "v"))
            await c1.call(Put("k", "v"), PutReply)
            fence0 = asyncio.ensure_future(c0.call(Fence(), FenceReply))
            await c1.call(Fence(), FenceReply)
            await fence0
            assert await c0.call(Get("k"), GetReply) == GetReply("v")
            await c0.call(Finalize(), FinalizeReply)
            await c1.call(Finalize(), FinalizeReply)
            kinds = [type(e) for e in events_now(server)]
            assert kinds.count(Finalized) == 2
        finally:
            await server.close()

    run(main())


def test_node_attributes_wait_and_values_too_long_for_pmi1() -> None:
    async def main() -> None:
        server = await started(Job(size=3, nodes=[0, 0, 1]))
        try:
            a, b, c = await pmi2(server, 0), await pmi2(server, 1), await pmi1(server, 2)
            waiting = asyncio.ensure_future(b.call(GetNodeAttr("shm", wait=True), GetReply))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            await a.call(PutNodeAttr("shm", "/dev/shm/x"), PutReply)
            assert await waiting == GetReply("/dev/shm/x")
            await a.call(Put("big", "v" * 1024), PutReply)
            fences = [asyncio.ensure_future(x.call(Fence(), FenceReply)) for x in (a, b, c)]
            await asyncio.gather(*fences)
            assert await b.call(Get("big"), GetReply) == GetReply("v" * 1024)
            await c.send_raw(c.codec.send(Get("big")))  # PMI-1 cannot carry it: rc != 0
            assert (await c.reader.readline()).startswith(b"cmd=get_result rc=-1 msg=PMI-1_line")
            assert await a.call(GetJobAttr("PMI_process_mapping"), GetReply) == GetReply(
                "(vector,(0,1,2),(1,1,1))"
            )
        finally:
            await server.close()

    run(main())


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("mode", ["fd", "port"])
def test_no_threads_and_close_releases_every_socket(mode: str) -> None:
    async def main() -> None:
        threads = threading.active_count()
        fds = _open_fds()
        server = await started(Job(size=4), mode=mode)
        clients = [await pmi1(server, r) for r in range(2)]
        server.rank_env(3) if mode == "fd" else None  # handed out, never spawned
        await asyncio.sleep(0.05)
        assert threading.active_count() == threads
        port = server.port
        await server.close()
        for c in clients:
            assert await c.reader.read() == b""
            await c.close()
        await asyncio.sleep(0.05)
        assert _open_fds() <= fds, "server left sockets open"
        if port is not None:
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", port)) != 0

    run(main())


# -- real processes --------------------------------------------------------------------------
RANK_SCRIPT = """
import os, sys
from rankwire.pmi.client import Pmi1Client, Pmi2Client
cls = Pmi1Client if sys.argv[1] == "1" else Pmi2Client
with cls.from_env() as pmi:
    pmi.init()
    if pmi.rank == int(sys.argv[2]):
        if sys.argv[3] == "exit":
            os._exit(3)
        pmi.abort(42, "rank gives up")
        sys.exit(1)
    pmi.put(f"k{pmi.rank}", "v")
    pmi.fence()
    pmi.finalize()
"""


@pytest.mark.parametrize("version", ["1", "2"])
def test_real_rank_dying_before_the_fence_is_named(version: str) -> None:
    async def main() -> None:
        server = await started(Job(size=3))
        try:
            argv = [sys.executable, "-c", RANK_SCRIPT, version, "1", "exit"]
            result = await run_job(server, argv, timeout=30)
        finally:
            await server.close()
        failed = [e for e in result.events if isinstance(e, FenceFailed)]
        assert failed, result.describe()
        assert failed[0].missing == (1,)
        # Whichever the server sees first: the closed socket, or the exit (pidfd).
        assert failed[0].reason in {
            "fence cannot complete: rank 1 closed its PMI connection before finalize",
            "fence cannot complete: rank 1 exited with code 3",
        }, failed
        assert result.ranks[1].returncode == 3
        # the waiting ranks got an error and exited non-zero (or were killed)
        assert all(r.returncode != 0 for r in result.ranks), result.describe()

    run(main())


def test_real_rank_abort_is_reported() -> None:
    async def main() -> None:
        server = await started(Job(size=2), mode="port")
        try:
            argv = [sys.executable, "-c", RANK_SCRIPT, "2", "0", "abort"]
            result = await run_job(server, argv, timeout=30)
        finally:
            await server.close()
        assert Aborted(0, 42, "rank gives up") in result.events, result.describe()

    run(main())
