"""Fabric self-test ping-pong: host vs container, with libfabric's fi_pingpong as the peer.

For shm and tcp (loopback), one-way latency at 64 B and bandwidth at 1 MiB, measured with

  - fi_pingpong (libfabric-bin; server + client on 127.0.0.1, msg mode, domain lo for tcp),
  - rankwire's self-test on the host,
  - the same self-test binary inside a container whose only libfabric is the host's, bound
    in by the fabric plan (`rankwire fabric pingpong --image`),

each the median of --repeat runs, all in this run. Ratios: container/host and
self-test/fi_pingpong (for latency, > 1 is slower; for bandwidth, < 1 is slower).

    .venv/bin/python bench/fabric.py [--repeat 3] [--lat-iters 2000] [--bw-iters 200]
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness.images import make_rootfs

LAT, BW = 64, 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fi_pingpong(provider: str, size: int, iters: int) -> tuple[float, float]:
    """(one-way usec, MB/s) from fi_pingpong's client line."""
    port = free_port()
    common = ["fi_pingpong", "-p", provider, "-e", "rdm", "-I", str(iters), "-S", str(size)]
    if provider == "tcp":
        common += ["-d", "lo"]
    server = subprocess.Popen(
        [*common, "-B", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(100):  # until the server listens on its control port
            client = subprocess.run(
                [*common, "-P", str(port), "127.0.0.1"], capture_output=True, text=True, timeout=120
            )
            if client.returncode != 111 or server.poll() is not None:  # 111: ECONNREFUSED
                break
            time.sleep(0.05)
        if client.returncode != 0:
            raise SystemExit(f"fi_pingpong -p {provider} failed: {client.stderr.strip()}")
        out = client.stdout
    finally:
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    row = [ln.split() for ln in out.splitlines() if re.match(r"^\d+[kmg]?\s", ln)][-1]
    return float(row[6]), float(row[5])  # usec/xfer, MB/sec


def selftest(argv: list[str], provider: str, size: int, iters: int) -> tuple[float, float]:
    from rankwire.fabric.pingpong import pingpong_args, run_pingpong

    warmup = max(iters // 10, 10)
    run = run_pingpong([*argv, *pingpong_args(provider, [size], iters, warmup)])
    r = run.results[0]
    return r.latency_us, r.bandwidth_MBps


def medians(fns: list[Callable[[], tuple[float, float]]], repeat: int) -> list[tuple[float, float]]:
    """Median (latency, bandwidth) of each fn, the fns interleaved so drift hits all alike."""
    runs: list[list[tuple[float, float]]] = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            runs[i].append(fn())
    return [
        (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)) for rs in runs
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--lat-iters", type=int, default=2000, help="iterations at 64 B")
    ap.add_argument("--bw-iters", type=int, default=200, help="iterations at 1 MiB")
    ap.add_argument("--providers", default="shm,tcp")
    args = ap.parse_args()
    if not shutil.which("fi_pingpong"):
        raise SystemExit("fi_pingpong not found: apt-get install libfabric-bin")
    from rankwire.fabric.facts import host_facts_for
    from rankwire.fabric.imagefacts import read_fabric_image_facts
    from rankwire.fabric.pingpong import build_pingpong, container_argv
    from rankwire.fabric.plan import plan_fabric
    from rankwire.runtime.build import build_image
    from rankwire.runtime.imagefacts import image_facts

    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="rankwire-bench-fabric-"))
    try:
        img = work / "img.sif"
        build_image(img, make_rootfs(work / "rootfs"))
        facts = read_fabric_image_facts(image_facts(str(img)))
        binary = build_pingpong()
        rows = []
        for provider in args.providers.split(","):
            plan = plan_fabric(host_facts_for(provider), facts, provider)
            inside = container_argv(str(img), plan, binary)
            for size, iters, metric in ((LAT, args.lat_iters, 0), (BW, args.bw_iters, 1)):
                peer, host, cont = medians(
                    [
                        lambda: fi_pingpong(provider, size, iters),  # noqa: B023
                        lambda: selftest([str(binary)], provider, size, iters),  # noqa: B023
                        lambda: selftest(inside, provider, size, iters),  # noqa: B023
                    ],
                    args.repeat,
                )
                rows.append(
                    (provider, size, iters, metric, peer[metric], host[metric], cont[metric])
                )
        print(
            f"one-way latency and ping-pong bandwidth, median of {args.repeat} runs each; "
            f"container: the host libfabric bound in by the fabric plan"
        )
        head = (
            "provider",
            "metric",
            "iters",
            "fi_pingpong",
            "host",
            "container",
            "cont/host",
            "host/fi_pp",
        )
        print(
            f"{head[0]:8} {head[1]:22} {head[2]:>6} {head[3]:>12} {head[4]:>10} "
            f"{head[5]:>10} {head[6]:>10} {head[7]:>10}"
        )
        for provider, _size, iters, metric, peer, host, cont in rows:
            what = "latency us @ 64 B" if metric == 0 else "bandwidth MB/s @ 1 MiB"
            print(
                f"{provider:8} {what:22} {iters:>6} {peer:>12.2f} {host:>10.2f} "
                f"{cont:>10.2f} {cont / host:>10.2f} {host / peer:>10.2f}"
            )
        print(f"total {time.perf_counter() - t0:.1f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
