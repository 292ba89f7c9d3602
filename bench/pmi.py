"""PMI server latency: rankwire's PmiServer against mpiexec.hydra, measured in the same run.

1. N real client processes (N = 8, 32, 64 by default), the same small C program under both
   servers, speaking the PMI-1 wire protocol itself over PMI_FD (no PMI library involved).
   Rank 0 times:
   * barrier:   one `barrier_in` → `barrier_out` round (median over --barriers);
   * allgather: every rank puts one 64-byte value, barrier, gets all N values, barrier
     (median over --gathers; the closing barrier makes rank 0 see the slowest rank).
   Each server runs --rounds times per N, alternating; the table shows the median run.
2. Our server alone, in this process, with --sim (1024) simulated PMI-1 clients on real
   socketpairs in the same event loop: barrier, and put + fence + --sim-gets gets + fence
   (`--sim-gets 0` = all N gets: N² round trips, minutes at 1024).

    .venv/bin/python bench/pmi.py [--sizes 8,32,64] [--barriers 200] [--gathers 10]
                                  [--rounds 3] [--sim 1024] [--sim-gets 16]

Ratios are hydra / ours: above 1 means our server is faster. Everything runs on one host,
so only the ratios mean something.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness.pmi import AsyncClient, clean_env, run_job
from rankwire.pmi.job import Job
from rankwire.pmi.messages import Fence, FenceReply, Get, GetReply, Init, InitReply, Put, PutReply
from rankwire.pmi.server import PmiServer

HYDRA = "/usr/bin/mpiexec.hydra"

CLIENT_C = r"""
/* PMI-1 wire-protocol benchmark client: argv[1] barriers, argv[2] allgathers. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int fd;
static char buf[8192];
static size_t have;
static char kvs[300];

static void die(const char *what, const char *detail) {
    fprintf(stderr, "pmibench: %s %s\n", what, detail);
    exit(2);
}
static void send_line(const char *line) {
    size_t n = strlen(line), off = 0;
    while (off < n) {
        ssize_t w = write(fd, line + off, n - off);
        if (w <= 0) die("write failed", "");
        off += (size_t)w;
    }
}
static void read_line(char *out, size_t cap) {
    for (;;) {
        char *nl = memchr(buf, '\n', have);
        if (nl) {
            size_t len = (size_t)(nl - buf);
            if (len >= cap) die("reply too long", "");
            memcpy(out, buf, len);
            out[len] = 0;
            memmove(buf, nl + 1, have - len - 1);
            have -= len + 1;
            return;
        }
        if (have == sizeof buf) die("buffer overflow", "");
        ssize_t r = read(fd, buf + have, sizeof buf - have);
        if (r <= 0) die("read failed", "");
        have += (size_t)r;
    }
}
static void call(const char *req, const char *expect, char *reply, size_t cap) {
    send_line(req);
    read_line(reply, cap);
    if (strncmp(reply, expect, strlen(expect)) != 0) die(req, reply);
}
static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}
static void barrier(void) {
    char reply[1100];
    call("cmd=barrier_in\n", "cmd=barrier_out", reply, sizeof reply);
}
int main(int argc, char **argv) {
    int barriers = argc > 1 ? atoi(argv[1]) : 50, gathers = argc > 2 ? atoi(argv[2]) : 5;
    int rank = getenv("PMI_RANK") ? atoi(getenv("PMI_RANK")) : 0;
    int size = getenv("PMI_SIZE") ? atoi(getenv("PMI_SIZE")) : 1;
    char line[1100], reply[1100];
    if (!getenv("PMI_FD")) die("PMI_FD is not set", "");
    fd = atoi(getenv("PMI_FD"));
    call("cmd=init pmi_version=1 pmi_subversion=1\n", "cmd=response_to_init", reply, sizeof reply);
    call("cmd=get_maxes\n", "cmd=maxes", reply, sizeof reply);
    call("cmd=get_my_kvsname\n", "cmd=my_kvsname", reply, sizeof reply);
    char *k = strstr(reply, "kvsname=");
    if (!k) die("no kvsname in", reply);
    sscanf(k + 8, "%299s", kvs);
    barrier();
    double *t = malloc(sizeof(double) * (size_t)(barriers > gathers ? barriers : gathers));
    for (int i = 0; i < barriers; i++) {
        double t0 = now_us();
        barrier();
        t[i] = now_us() - t0;
    }
    if (rank == 0) {
        printf("barrier_us");
        for (int i = 0; i < barriers; i++) printf(" %.1f", t[i]);
        printf("\n");
    }
    for (int j = 0; j < gathers; j++) {
        barrier();
        double t0 = now_us();
        snprintf(line, sizeof line,
                 "cmd=put kvsname=%s key=bench-%d-%d value=%064d\n", kvs, j, rank, rank);
        call(line, "cmd=put_result", reply, sizeof reply);
        barrier();
        for (int r = 0; r < size; r++) {
            snprintf(line, sizeof line, "cmd=get kvsname=%s key=bench-%d-%d\n", kvs, j, r);
            call(line, "cmd=get_result", reply, sizeof reply);
            if (!strstr(reply, "rc=0")) die("get failed:", reply);
        }
        barrier();
        t[j] = now_us() - t0;
    }
    if (rank == 0) {
        printf("allgather_us");
        for (int j = 0; j < gathers; j++) printf(" %.1f", t[j]);
        printf("\n");
    }
    call("cmd=finalize\n", "cmd=finalize_ack", reply, sizeof reply);
    return 0;
}
"""


def parse(stdout: str) -> tuple[float, float]:
    """Medians (µs) of rank 0's `barrier_us ...` and `allgather_us ...` lines."""
    found = {}
    for line in stdout.splitlines():
        name, *values = line.split()
        found[name] = statistics.median(float(v) for v in values)
    return found["barrier_us"], found["allgather_us"]


def run_ours(client: Path, n: int, barriers: int, gathers: int) -> tuple[float, float]:
    async def main() -> tuple[float, float]:
        server = PmiServer(Job(size=n, fence_timeout=120), mode="fd")
        await server.start()
        try:
            run = await run_job(server, [str(client), str(barriers), str(gathers)], timeout=300)
        finally:
            await server.close()
        if any(r.returncode for r in run.ranks):
            raise SystemExit(f"bench client failed under rankwire:\n{run.describe()}")
        return parse(run.stdout)

    return asyncio.run(main())


def run_hydra(client: Path, n: int, barriers: int, gathers: int) -> tuple[float, float]:
    proc = subprocess.run(
        [HYDRA, "-n", str(n), str(client), str(barriers), str(gathers)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        raise SystemExit(f"bench client failed under hydra:\n{proc.stdout}\n{proc.stderr}")
    return parse(proc.stdout)


def run_simulated(n: int, gets: int, repeat: int) -> tuple[float, float]:
    """Barrier and allgather medians (µs) with n in-process clients on socketpairs."""

    async def main() -> tuple[float, float]:
        server = PmiServer(Job(size=n), mode="fd")
        await server.start()
        try:
            clients = [await AsyncClient.connect(server, r, version=1) for r in range(n)]
            await asyncio.gather(*(c.call(Init(1, 1), InitReply) for c in clients))

            async def fence_all() -> None:
                await asyncio.gather(*(c.call(Fence(), FenceReply) for c in clients))

            async def gather_one(rank: int, c: AsyncClient, j: int) -> None:
                await c.call(Put(f"sim-{j}-{rank}", f"{rank:064d}"), PutReply)
                await c.call(Fence(), FenceReply)
                for i in range(gets or n):
                    key = f"sim-{j}-{(rank + i) % n}"
                    assert (await c.call(Get(key), GetReply)).value is not None

            loop = asyncio.get_running_loop()
            await fence_all()
            barrier = []
            for _ in range(repeat):
                t0 = loop.time()
                await fence_all()
                barrier.append(loop.time() - t0)
            gather = []
            for j in range(max(3, repeat // 4)):
                t0 = loop.time()
                await asyncio.gather(*(gather_one(r, c, j) for r, c in enumerate(clients)))
                await fence_all()
                gather.append(loop.time() - t0)
            for c in clients:
                await c.close()
        finally:
            await server.close()
        return statistics.median(barrier) * 1e6, statistics.median(gather) * 1e6

    return asyncio.run(main())


def fmt(us: float) -> str:
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} µs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="8,32,64", help="real client counts (comma separated)")
    ap.add_argument("--barriers", type=int, default=200)
    ap.add_argument("--gathers", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="runs per server and N (median)")
    ap.add_argument("--sim", type=int, default=1024, help="simulated clients (0 = skip)")
    ap.add_argument("--sim-gets", type=int, default=16, help="gets per simulated client, 0 = N")
    args = ap.parse_args()
    if not Path(HYDRA).exists() or not shutil.which("cc"):
        raise SystemExit(f"needs {HYDRA} and a C compiler: apt-get install mpich gcc")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rankwire-pmibench-") as tmp:
        client = Path(tmp) / "pmibench"
        (Path(tmp) / "pmibench.c").write_text(CLIENT_C)
        subprocess.run(["cc", "-O2", "-o", str(client), str(client) + ".c"], check=True)
        print(f"PMI-1 over PMI_FD, same C client; {os.cpu_count()} CPUs; medians of rank 0")
        print(f"{'N':>4} | {'barrier ours':>12} {'hydra':>10} {'ratio':>6} | "
              f"{'allgather ours':>14} {'hydra':>10} {'ratio':>6}")  # fmt: skip
        for n in (int(s) for s in args.sizes.split(",")):
            runs: dict[str, list[tuple[float, float]]] = {"ours": [], "hydra": []}
            for _ in range(args.rounds):  # interleaved, so drift hits both alike
                runs["ours"].append(run_ours(client, n, args.barriers, args.gathers))
                runs["hydra"].append(run_hydra(client, n, args.barriers, args.gathers))
            ours, hydra = (tuple(map(statistics.median, zip(*runs[k]))) for k in ("ours", "hydra"))
            print(
                f"{n:>4} | {fmt(ours[0]):>12} {fmt(hydra[0]):>10} {hydra[0] / ours[0]:>5.1f}x | "
                f"{fmt(ours[1]):>14} {fmt(hydra[1]):>10} {hydra[1] / ours[1]:>5.1f}x",
                flush=True,
            )
    if args.sim:
        gets = args.sim_gets or args.sim
        barrier, gather = run_simulated(args.sim, args.sim_gets, repeat=20)
        print(
            f"\nours alone, {args.sim} simulated clients in-process: barrier {fmt(barrier)}, "
            f"put + fence + {gets} gets + fence {fmt(gather)} "
            f"({gather / (args.sim * (gets + 3)):.1f} µs per request)"
        )
    print(f"(total {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
