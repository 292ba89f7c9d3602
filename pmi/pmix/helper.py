"""The PMIx helper process: hosts libpmix's server for the ranks of one node.

Forked by `PmixServer` (no interpreter of its own to start: the launcher's imports are
made), which calls `main(FD)` with one end of a Unix socketpair as FD (protocol in `wire`).
It runs one asyncio loop on its main thread. libpmix calls our upcalls on its progress
thread; they copy what they got out of C memory and hand it to the loop with
`loop.call_soon_threadsafe`, which forwards it to the launcher. Answers
from the launcher are given back to libpmix from the loop thread (libpmix thread-shifts
every completion callback). The helper exits on `shutdown` or when the launcher's end of
the socket closes (the launcher died), finalizing the PMIx server first.

Environment (set by PmixServer, read by libpmix at server init):
  PMIX_MCA_gds=hash                               no shared-memory dstore: clients need no
                                                  access to the server's tmpdir (containers)
  PMIX_MCA_psec=none                              see PmixServer: TCP peers cannot be
                                                  authenticated by uid inside user namespaces
  PMIX_MCA_pmix_server_fence_localonly_opt=0      every fence reaches the host, so the
                                                  launcher sees wire-up complete and can
                                                  time it out
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import threading
from typing import Any, Optional

from rankwire.pmi.pmix import wire
from rankwire.pmi.pmix.abi import (
    COLLECT_DATA,
    ERR_LOST_CONNECTION,
    PROC_RANK,
    UINT16,
    PmixError,
    Proc,
    version,
)
from rankwire.pmi.pmix.server_lib import (
    ModexReply,
    Server,
    ServerHandlers,
    generate_ppn,
    generate_regex,
)
from rankwire.pmi.pmix.values import Typed

log = logging.getLogger("rankwire.pmi.pmix.helper")


def job_info(init: dict[str, Any], local: list[int]) -> list[tuple[str, Any]]:
    """The job-level and per-rank info registered with the nspace (PMIx 4.2 standard keys).

    `init["node_ranks"]` lists the ranks of every node, `init["node_names"]` their names.
    """
    size: int = init["size"]
    node_ranks: list[list[int]] = init["node_ranks"]
    names: list[str] = init["node_names"]
    node_of = {r: n for n, ranks in enumerate(node_ranks) for r in ranks}
    local_rank = {r: i for ranks in node_ranks for i, r in enumerate(ranks)}
    info: list[tuple[str, Any]] = [
        ("pmix.univ.size", size),
        ("pmix.job.size", size),
        ("pmix.max.size", size),
        ("pmix.num.nodes", len(node_ranks)),
        ("pmix.jobid", init["jobid"]),
        ("pmix.appnum", init.get("appnum", 0)),
        ("pmix.local.size", len(local)),
        ("pmix.lpeers", ",".join(str(r) for r in local)),
        ("pmix.lldr", Typed(PROC_RANK, min(local))),
        ("pmix.nmap", generate_regex(names)),
        ("pmix.pmap", generate_ppn(node_ranks)),
    ]
    for r in range(size):
        info.append(
            (
                "pmix.pdata",
                [
                    ("pmix.rank", Typed(PROC_RANK, r)),
                    ("pmix.lrank", Typed(UINT16, local_rank[r])),
                    ("pmix.nrank", Typed(UINT16, local_rank[r])),
                    ("pmix.nodeid", node_of[r]),
                    ("pmix.hname", names[node_of[r]]),
                    ("pmix.appnum", init.get("appnum", 0)),
                ],
            )
        )
    return info


class Helper(ServerHandlers):
    """Upcalls: forward to the launcher; keep the replies of open fences and modex requests."""

    def __init__(self, loop: asyncio.AbstractEventLoop, writer: asyncio.StreamWriter) -> None:
        self.loop = loop
        self.writer = writer
        self.nspace = ""
        self.server: Optional[Server] = None
        self._ids = itertools.count(1)
        self._replies: dict[int, ModexReply] = {}
        self._lock = threading.Lock()

    # -- loop thread ----------------------------------------------------------------------
    def send(self, msg: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(wire.encode(msg))

    def answer(self, msg: dict[str, Any]) -> None:
        with self._lock:
            reply = self._replies.pop(int(msg["id"]), None)
        if reply is None:
            log.warning("no open PMIx request %s for %s", msg["id"], msg["op"])
            return
        reply(int(msg["status"]), wire.unpack(msg.get("data", "")))

    def dmodex_req(self, msg: dict[str, Any]) -> None:
        assert self.server is not None
        ident = msg["id"]

        def done(status: int, data: bytes) -> None:  # progress thread
            self.post({"op": "dmodex_data", "id": ident, "status": status, "data": wire.pack(data)})

        try:
            self.server.dmodex_request(Proc(self.nspace, int(msg["rank"])), done)
        except PmixError as err:
            self.send({"op": "dmodex_data", "id": ident, "status": err.status, "data": ""})

    def fail_all(self, status: int) -> None:
        with self._lock:
            replies = list(self._replies.values())
            self._replies.clear()
        for reply in replies:
            reply(status, b"")

    # -- progress thread ------------------------------------------------------------------
    def post(self, msg: dict[str, Any]) -> None:
        self.loop.call_soon_threadsafe(self.send, msg)

    def _open(self, reply: ModexReply) -> int:
        ident = next(self._ids)
        with self._lock:
            self._replies[ident] = reply
        return ident

    def client_connected(self, proc: Proc) -> None:
        self.post({"op": "connected", "rank": proc.rank})

    def client_finalized(self, proc: Proc) -> None:
        self.post({"op": "finalized", "rank": proc.rank})

    def abort(self, proc: Proc, status: int, message: str, procs: list[Proc]) -> None:
        self.post({"op": "abort", "rank": proc.rank, "code": status, "message": message})

    def fence(
        self, procs: list[Proc], info: dict[str, Any], data: bytes, reply: ModexReply
    ) -> None:
        ident = self._open(reply)
        self.post(
            {
                "op": "fence",
                "id": ident,
                "procs": [[p.nspace, p.rank] for p in procs],
                "collect": bool(info.get(COLLECT_DATA, False)),
                "data": wire.pack(data),
            }
        )

    def direct_modex(self, proc: Proc, info: dict[str, Any], reply: ModexReply) -> None:
        ident = self._open(reply)
        self.post({"op": "dmodex", "id": ident, "rank": proc.rank})


def start_server(helper: Helper, init: dict[str, Any]) -> dict[str, Any]:
    """PMIx_server_init, register the nspace and every local client; returns `ready`."""
    init_server(helper, init["tmpdir"], init["hostname"])
    return register_job(helper, init)


def init_server(helper: Helper, tmpdir: str, hostname: str) -> None:
    """PMIx_server_init (≈ 35 ms, most of it hwloc reading the node's topology; the GIL is
    released meanwhile, so a caller may run it in a thread while it waits for the job).

    The server shares that topology with its clients (PMIX_SERVER_SHARE_TOPOLOGY, as
    PRRTE's daemons do), as XML in the job's data (see
    `serverenv.HELPER_ENV`: no shared-memory file), so each rank's hwloc loads it instead
    of reading /sys and probing PCI, X displays and OpenCL itself (≈ 12 ms of CPU per Open
    MPI rank: 32 ranks on 2 cores, 1.1 → 0.9 s)."""
    server_info: list[tuple[str, Any]] = [
        ("pmix.srvr.tmpdir", tmpdir),
        ("pmix.srvr.sys", False),
        ("pmix.hname", hostname),
        ("pmix.srvr.share", True),
    ]
    helper.server = Server(helper, server_info)


def register_job(helper: Helper, init: dict[str, Any]) -> dict[str, Any]:
    """Register the nspace and every local client with the server `init_server` started;
    returns `ready`."""
    assert helper.server is not None
    server = helper.server
    local: list[int] = init["local_ranks"]
    server.register_nspace(init["nspace"], len(local), job_info(init, local))
    helper.nspace = init["nspace"]  # registered: what a stop deregisters
    envs: dict[str, dict[str, str]] = {}
    for rank in local:
        proc = Proc(helper.nspace, rank)
        # register before the client can exist, so it is known when it connects
        server.register_client(proc, int(init["uid"]), int(init["gid"]))
        envs[str(rank)] = server.setup_fork(proc)
    return {"op": "ready", "version": version(), "pid": os.getpid(), "envs": envs}


async def serve(fd: int) -> int:
    loop = asyncio.get_running_loop()
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_connection(sock=sock, limit=wire.LINE_LIMIT)
    helper = Helper(loop, writer)
    line = await reader.readline()
    if not line:
        return 0
    try:
        helper.send(start_server(helper, wire.decode(line)))
    except Exception as err:  # a UserError or PmixError the launcher shows to the user
        log.debug("PMIx helper start failed", exc_info=True)
        helper.send({"op": "error", "message": str(err).splitlines()[0]})
        with contextlib.suppress(OSError):  # the launcher may be gone
            await writer.drain()
        return 1
    try:
        while True:
            try:
                line = await reader.readline()
            except OSError:  # a write to the launcher failed: it closed its end
                line = b""
            if not line:
                break  # the launcher is gone (or stopped a helper it never waited for)
            msg = wire.decode(line)
            op = msg["op"]
            if op in ("fence_done", "dmodex_done"):
                helper.answer(msg)
            elif op == "dmodex_req":
                helper.dmodex_req(msg)
            elif op == "sync":  # after every upcall already queued on this loop
                helper.send({"op": "synced", "rank": msg["rank"]})
            elif op == "shutdown":
                break
            else:
                log.warning("PMIx helper: unknown message %r", op)
    finally:
        helper.fail_all(ERR_LOST_CONNECTION)
        if helper.server is not None:
            try:
                helper.server.deregister_nspace(helper.nspace)  # clients' cleanup files
            except PmixError as err:
                log.warning("%s", err)
            try:
                helper.server.finalize()
            except PmixError as err:
                log.warning("%s", err)
        helper.send({"op": "bye"})
        try:
            await writer.drain()
            writer.close()
        except OSError:
            pass
    return 0


def main(fd: int) -> int:
    """The helper's life on the socket `fd`; its exit code. Run in the child
    `PmixServer` forks (server `_run_helper`)."""
    logging.basicConfig(format="rankwire pmix helper: %(message)s", level=logging.WARNING)
    # ^C at the terminal reaches the whole process group; the launcher decides when we stop
    # (shutdown, or EOF on the socket when it is gone).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return asyncio.run(serve(fd))
