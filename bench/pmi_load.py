"""PMI server under load: one job of --clients (4096) simulated ranks, in a process of its own.

The server (`PmiServer` + `Job`, as the launcher runs them) lives in a child process so its
memory and file descriptors are its own; this process plays every rank in one event loop,
speaking the PMI wire protocol through `ClientCodec`: even ranks PMI-1, odd ranks PMI-2.
Each rank: init, put one key, fence, --gets gets of other ranks' keys (each value checked),
finalize, close. Transports (--modes): "fd" (one socketpair per rank, the client ends sent
to us over SCM_RIGHTS, as a launcher hands them to its ranks) and "port" (TCP on 127.0.0.1,
each rank identified by its PMI_ID).

Reported per mode: fence wait per rank (median, max: from its fence request to the reply,
so it includes waiting for the slowest rank), the fence round (first rank in to last rank
out) and its release (last rank in to last rank out: the server's fan-out), total time
(first connection to the last finalize), the server's peak RSS (and its RSS before the
job), the server's open fds before the job and after `close()` (must be equal: no leak),
and how many gets returned the wrong value (must be 0).

    .venv/bin/python bench/pmi_load.py [--clients 4096] [--gets 4] [--modes fd,port]

Both processes raise their soft RLIMIT_NOFILE to the hard limit; if the hard limit cannot
hold the job, it says so and exits 1. Exit 1 also on any wrong value, leak or failed rank.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

from rankwire.pmi.codec import ClientCodec
from rankwire.pmi.job import FenceFailed, Job
from rankwire.pmi.messages import (
    Fence,
    FenceReply,
    Finalize,
    FinalizeReply,
    FullInit,
    FullInitReply,
    Get,
    GetReply,
    Init,
    InitAck,
    InitAckReply,
    InitReply,
    Put,
    PutReply,
    Reply,
    Request,
)
from rankwire.pmi.server import Finalized, PmiServer, ProtocolViolation, RankLost

BATCH = 200  # fds per SCM_RIGHTS message (the kernel takes at most 253)
FDS_BASE = 64  # interpreter, event loop, control socket, and a batch in flight: measured < 40


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def raise_nofile(needed: int) -> None:
    """Soft limit to hard (as mpirun does); exit 1 when even the hard one is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        sys.exit(
            f"pmi_load: {needed - FDS_BASE} clients need about {needed} open files per process but "
            f"the hard limit is {hard}: "
            "raise it (ulimit -Hn, as root) or use fewer --clients"
        )
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def value_of(rank: int) -> str:
    return f"v{rank}-{rank * 2654435761 % 2**32:08x}"


# -- the server process ------------------------------------------------------------------------
def serve(size: int, mode: str, ctl_fd: int) -> None:
    raise_nofile(size + FDS_BASE)
    ctl = socket.socket(fileno=ctl_fd)
    fds_before, rss_before = open_fds(), rss_kib()
    violations: list[str] = []

    async def job() -> None:
        server = PmiServer(Job(size=size), mode=mode)
        await server.start()
        if mode == "fd":
            for start in range(0, size, BATCH):
                ranks = range(start, min(size, start + BATCH))
                fds = [int(server.rank_env(r)[0]["PMI_FD"]) for r in ranks]
                socket.send_fds(ctl, [json.dumps(list(ranks)).encode()], fds)
                for r in ranks:
                    server.spawned(r)
        else:
            ids = [server.rank_env(r)[0]["PMI_ID"] for r in range(size)]
            ctl.sendall(json.dumps({"port": server.port, "ids": ids}).encode() + b"\n")
        finalized = 0
        while finalized < size:
            event = await server.wait_event()
            if isinstance(event, Finalized):
                finalized += 1
            elif isinstance(event, (ProtocolViolation, RankLost, FenceFailed)):
                violations.append(repr(event))
                break
        await server.close()

    asyncio.run(job())
    report = {
        "fds_before": fds_before,
        "fds_after": open_fds(),
        "rss_before_kib": rss_before,
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "violations": violations,
    }
    ctl.sendall(json.dumps(report).encode() + b"\n")


# -- the simulated ranks (this process) -------------------------------------------------------
class Rank:
    def __init__(self, rank: int, size: int, reader: Any, writer: Any) -> None:
        self.rank, self.size = rank, size
        self.reader: asyncio.StreamReader = reader
        self.writer: asyncio.StreamWriter = writer
        self.codec = ClientCodec(1 if rank % 2 == 0 else 2)

    async def call(self, req: Request, expect: type[Reply]) -> Reply:
        self.writer.write(self.codec.send(req))
        while True:
            reply = self.codec.next_event()
            if reply is not None:
                if not isinstance(reply, expect):
                    raise RuntimeError(f"rank {self.rank}: {req} answered with {reply}")
                return reply
            data = await self.reader.read(65536)
            if not data:
                raise RuntimeError(f"rank {self.rank}: the server closed the connection")
            self.codec.receive_data(data)

    async def run(self, pmiid: int | None, gets: int) -> tuple[float, float, float, int]:
        """(fence entered, fence left, finalized, wrong values)."""
        if self.codec.version == 1:
            if pmiid is not None:
                await self.call(InitAck(pmiid), InitAckReply)
            await self.call(Init(1, 1), InitReply)
        else:
            await self.call(Init(2, 0), InitReply)
            await self.call(FullInit(pmiid=pmiid), FullInitReply)
        await self.call(Put(f"k{self.rank}", value_of(self.rank)), PutReply)
        entered = time.perf_counter()
        await self.call(Fence(), FenceReply)
        left = time.perf_counter()
        wrong = 0
        for i in range(gets):
            other = (self.rank + 1 + i * (self.size // max(gets, 1) or 1)) % self.size
            reply = await self.call(Get(f"k{other}"), GetReply)
            assert isinstance(reply, GetReply)
            wrong += reply.value != value_of(other)
        await self.call(Finalize(), FinalizeReply)
        self.writer.close()
        return entered, left, time.perf_counter(), wrong


async def drive(size: int, mode: str, ctl: socket.socket, gets: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    connects = asyncio.Semaphore(256)  # within the listen backlog

    async def one(rank: int, fd: int | None, pmiid: int | None) -> tuple[float, float, float, int]:
        if fd is not None:
            reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
        else:
            async with connects:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return await Rank(rank, size, reader, writer).run(pmiid, gets)

    tasks = []
    port = 0
    if mode == "fd":
        got = 0
        while got < size:
            msg, fds, _, _ = await loop.run_in_executor(None, socket.recv_fds, ctl, 4096, BATCH)
            for rank, fd in zip(json.loads(msg), fds):
                tasks.append(asyncio.ensure_future(one(rank, fd, None)))
            got += len(fds)
    else:
        line = await loop.run_in_executor(None, ctl.makefile().readline)
        info = json.loads(line)
        port = info["port"]
        tasks = [asyncio.ensure_future(one(r, None, int(i))) for r, i in enumerate(info["ids"])]
    results = await asyncio.gather(*tasks)
    waits = [left - entered for entered, left, _, _ in results]
    return {
        "fence_median_s": statistics.median(waits),
        "fence_max_s": max(waits),
        "fence_round_s": max(r[1] for r in results) - min(r[0] for r in results),
        "fence_release_s": max(r[1] for r in results) - max(r[0] for r in results),
        "total_s": max(r[2] for r in results) - start,
        "wrong_values": sum(r[3] for r in results),
        "gets": gets * size,
    }


def run_mode(size: int, mode: str, gets: int) -> dict[str, Any]:
    fds_before = open_fds()
    ours, theirs = socket.socketpair()
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(size), mode, str(theirs.fileno())],
        pass_fds=[theirs.fileno()],
    )
    theirs.close()
    try:
        figures = asyncio.run(drive(size, mode, ours, gets))
        report = json.loads(ours.makefile().readline() or "{}")
    finally:
        ours.close()
        server.wait()
    figures.update(report, client_fds_before=fds_before, client_fds_after=open_fds())
    figures["server_rc"] = server.returncode
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4096)
    parser.add_argument("--gets", type=int, default=4)
    parser.add_argument("--modes", default="fd,port")
    parser.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(int(args.serve[0]), args.serve[1], int(args.serve[2]))
        return
    raise_nofile(args.clients + FDS_BASE)
    ok = True
    print(
        f"PMI server load: {args.clients} clients (even ranks PMI-1, odd PMI-2), "
        f"init + put + fence + {args.gets} gets + finalize"
    )
    for mode in args.modes.split(","):
        f = run_mode(args.clients, mode, args.gets)
        leak = (f["fds_after"], f["client_fds_after"]) != (f["fds_before"], f["client_fds_before"])
        problems = [
            *f["violations"],
            *(["fds leaked"] if leak else []),
            *([f"{f['wrong_values']} wrong values"] if f["wrong_values"] else []),
            *([f"server exited {f['server_rc']}"] if f["server_rc"] else []),
        ]
        ok = ok and not problems
        print(
            f"  {mode:4}  fence wait median {f['fence_median_s'] * 1e3:.0f} ms, max "
            f"{f['fence_max_s'] * 1e3:.0f} ms (round {f['fence_round_s'] * 1e3:.0f} ms, "
            f"last in to last out {f['fence_release_s'] * 1e3:.0f} ms); "
            f"total {f['total_s']:.2f} s; server peak RSS {f['peak_rss_kib'] / 1024:.1f} MiB "
            f"(before the job {f['rss_before_kib'] / 1024:.1f} MiB); server fds "
            f"{f['fds_before']} before, {f['fds_after']} after; wrong values "
            f"{f['wrong_values']}/{f['gets']} gets; this process's fds {f['client_fds_before']} "
            f"before, {f['client_fds_after']} after"
            + (f"; FAILED: {', '.join(problems)}" if problems else "")
        )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
