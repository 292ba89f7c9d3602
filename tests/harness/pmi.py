"""Run real rank processes under `PmiServer` inside one asyncio loop, like the launcher will.

`run_job()` spawns one process per rank with the env and fds from `server.rank_env()`,
reports exits with `server.rank_exited()`, drains the server's events (killing every rank
on an abort or a failed fence, as a launcher must) and returns what each rank printed.
Exits are watched with pidfds, so no helper threads are involved.

`AsyncClient` is an in-process PMI client over asyncio streams built on `ClientCodec`,
for server-level tests and the 1024-client benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, TypeVar, Union

from rankwire.pmi.codec import ClientCodec
from rankwire.pmi.messages import ErrorReply, Reply, Request
from rankwire.pmi.server import Aborted, Event, FenceFailed, Finalized, PmiServer

R = TypeVar("R")


@dataclasses.dataclass
class RankRun:
    rank: int
    returncode: int
    stdout: str
    stderr: str


@dataclasses.dataclass
class JobRun:
    ranks: list[RankRun]
    events: list[Event]

    @property
    def stdout(self) -> str:
        return "".join(r.stdout for r in self.ranks)

    @property
    def stderr(self) -> str:
        return "".join(f"[rank {r.rank}] {r.stderr}" for r in self.ranks if r.stderr)

    def describe(self) -> str:
        codes = {r.rank: r.returncode for r in self.ranks}
        return f"exit codes {codes}\nevents {self.events}\nstdout:\n{self.stdout}\n{self.stderr}"


def clean_env(extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """os.environ without any inherited PMI/Slurm wiring, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PMI_", "PMIX_", "SLURM_", "MPIR_", "HYDRA_", "MPI_LOCAL"))
    }
    env.update(extra or {})
    return env


async def wait_process(proc: subprocess.Popen[bytes]) -> int:
    """Wait for a child without blocking the loop or starting a thread (pidfd)."""
    loop = asyncio.get_running_loop()
    fd = os.pidfd_open(proc.pid)
    done = loop.create_future()
    loop.add_reader(fd, lambda: done.done() or done.set_result(None))
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return proc.wait()


SETTLE_S = 2.0  # at most, for the events of ranks that exited 0 (never a timing goal)


def _settled(procs: Mapping[int, subprocess.Popen[bytes]], events: Sequence[Event]) -> bool:
    """Every rank that exited 0 has its Finalized event."""
    done = {e.rank for e in events if isinstance(e, Finalized)}
    return all(p.poll() != 0 or r in done for r, p in procs.items())


async def run_job(
    server: PmiServer,
    argv: Union[Sequence[str], Callable[[int], Sequence[str]]],
    extra_env: Optional[Mapping[str, str]] = None,
    timeout: float = 60.0,
) -> JobRun:
    """Spawn every rank of `server.job`, wait for all of them, return their output."""
    size = server.job.size
    base = clean_env(extra_env)
    procs: dict[int, subprocess.Popen[bytes]] = {}
    events: list[Event] = []

    def kill_all() -> None:
        for p in procs.values():
            if p.poll() is None:
                p.kill()

    async def drain() -> None:
        while True:
            event = await server.wait_event()
            events.append(event)
            if isinstance(event, (Aborted, FenceFailed)):
                kill_all()

    async def watch(rank: int, proc: subprocess.Popen[bytes]) -> None:
        server.rank_exited(rank, await wait_process(proc))

    with contextlib.ExitStack() as stack:
        stack.callback(kill_all)
        outputs = []
        for rank in range(size):
            env, pass_fds = server.rank_env(rank)
            out = stack.enter_context(tempfile.TemporaryFile())
            err = stack.enter_context(tempfile.TemporaryFile())
            outputs.append((out, err))
            args = argv(rank) if callable(argv) else argv
            procs[rank] = subprocess.Popen(
                list(args),
                env={**base, **env},
                pass_fds=pass_fds,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
            server.spawned(rank)
        drainer = asyncio.ensure_future(drain())
        try:
            await asyncio.wait_for(
                asyncio.gather(*(watch(r, p) for r, p in procs.items())), timeout
            )
        finally:
            kill_all()
            # The last events may still be on their way: a PMIx rank's Finalized comes from
            # the node's server process, which can tell us after the rank has exited.
            settle = asyncio.get_running_loop().time() + SETTLE_S
            while not _settled(procs, events) and asyncio.get_running_loop().time() < settle:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0)
            drainer.cancel()
            await asyncio.gather(drainer, return_exceptions=True)
        ranks = []
        for (rank, proc), (out, err) in zip(procs.items(), outputs):
            out.seek(0)
            err.seek(0)
            text = out.read().decode(errors="replace"), err.read().decode(errors="replace")
            ranks.append(RankRun(rank, proc.wait(), *text))
        return JobRun(ranks, events)


def serve(
    make_server: Callable[[], PmiServer],
    argv: Union[Sequence[str], Callable[[int], Sequence[str]]],
    extra_env: Optional[Mapping[str, str]] = None,
    timeout: float = 60.0,
) -> JobRun:
    """`run_job` under a server `make_server` makes in a fresh event loop (a PmiServer or
    a PmixServer), started before and closed after."""

    async def main() -> JobRun:
        server = make_server()
        await server.start()
        try:
            return await run_job(server, argv, extra_env=extra_env, timeout=timeout)
        finally:
            await server.close()

    return asyncio.run(main())


def assert_clean(run: JobRun, size: int) -> None:
    """Every rank exited 0, no fence failed, and ranks 0..size-1 finalized."""
    assert all(r.returncode == 0 for r in run.ranks), run.describe()
    assert not [e for e in run.events if isinstance(e, FenceFailed)], run.describe()
    assert sorted(e.rank for e in run.events if isinstance(e, Finalized)) == list(range(size))


def probes_by_rank(stdout: str) -> list[dict[str, Any]]:
    """The JSON lines `rankwire pmi probe` printed (one per rank), sorted by rank."""
    return sorted((json.loads(line) for line in stdout.splitlines()), key=lambda r: r["rank"])


class AsyncClient:
    """One rank's PMI client inside the test's own event loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, version: int):
        self.reader = reader
        self.writer = writer
        self.codec = ClientCodec(version)

    @classmethod
    async def connect(cls, server: PmiServer, rank: int, version: int = 1) -> AsyncClient:
        """Take rank `rank`'s end (fd mode) or dial the port; nothing is sent yet."""
        env, _ = server.rank_env(rank)
        if "PMI_FD" in env:
            sock = socket.fromfd(int(env["PMI_FD"]), socket.AF_UNIX, socket.SOCK_STREAM)
            server.spawned(rank)
            reader, writer = await asyncio.open_connection(sock=sock)
        else:
            host, _, port = env["PMI_PORT"].partition(":")
            reader, writer = await asyncio.open_connection(host, int(port))
        client = cls(reader, writer, version)
        client.env = env
        return client

    env: dict[str, str]

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def next_reply(self) -> Reply:
        while True:
            reply = self.codec.next_event()
            if reply is not None:
                return reply
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("PMI server closed the connection")
            self.codec.receive_data(data)

    async def call(self, req: Request, expect: type[R]) -> R:
        await self.send_raw(self.codec.send(req))
        reply = await self.next_reply()
        if not isinstance(reply, expect):
            raise AssertionError(f"{req} answered with {reply}, expected {expect.__name__}")
        return reply

    async def call_error(self, req: Request) -> str:
        """Send `req`, expect an error reply, return its message (PMI-1's `_` back to spaces)."""
        return (await self.call(req, ErrorReply)).message.replace("_", " ")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()
