"""Multi-node fabric numbers on the netns Slurm box (root): libfabric tcp provider ping-pong
between two nodes, and how fast the box starts and stops.

    .venv/bin/python bench/multinode.py [--sizes 64,4096,65536,1048576] [-I 1000]
                                        [--ep msg,rdm] [--boxes 3] [--nodes 2]

`fi_pingpong` (libfabric-bin) runs as server in node1's network namespace and as client in
node2's, over the veth/bridge path every multi-node test uses. Latency is fi_pingpong's
usec/xfer (half a round trip). Traffic stays inside the box's private subnet.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness.multinode import NETNS_DIR, MultiNodeCluster

ROW = re.compile(r"^\s*(\d+[kmg]?)\s+\S+\s+\S+\s+\S+\s+\S+\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")


def pingpong(box: MultiNodeCluster, ep: str, size: int, iterations: int) -> tuple[float, float]:
    """(usec/xfer, MB/s) of fi_pingpong -p tcp between node1 (server) and node2."""
    server_node, client_node = box.node_members[0], box.node_members[1]
    base = ["fi_pingpong", "-p", "tcp", "-e", ep, "-I", str(iterations), "-S", str(size)]
    server = subprocess.Popen(
        ["nsenter", f"--net={NETNS_DIR / server_node.netns}", "timeout", "60", *base],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for _ in range(50):  # the server listens within a few ms
            client = subprocess.run(
                ["nsenter", f"--net={NETNS_DIR / client_node.netns}", "timeout", "60", *base,
                 server_node.ip],
                capture_output=True,
                text=True,
            )  # fmt: skip
            if client.returncode == 0:
                break
            time.sleep(0.1)
        else:
            raise SystemExit(f"fi_pingpong client failed: {client.stdout}{client.stderr}")
        server.wait(60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    for line in client.stdout.splitlines():
        m = ROW.match(line)
        if m:
            return float(m.group(3)), float(m.group(2))
    raise SystemExit(f"no result line in fi_pingpong output:\n{client.stdout}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,4096,65536,1048576")
    ap.add_argument("-I", "--iterations", type=int, default=1000)
    ap.add_argument("--ep", default="msg,rdm", help="fi_pingpong endpoint types")
    ap.add_argument("--boxes", type=int, default=3, help="start/stop cycles to time")
    ap.add_argument("--nodes", type=int, default=2)
    args = ap.parse_args()
    if not shutil.which("fi_pingpong"):
        raise SystemExit("fi_pingpong not found: apt-get install libfabric-bin")

    starts, stops = [], []
    for _ in range(args.boxes):
        box = MultiNodeCluster(max(2, args.nodes)).start()
        box.stop()
        starts.append(box.timings["start"])
        stops.append(box.timings["stop"])
    print(
        f"box of {max(2, args.nodes)} nodes: start to all idle median "
        f"{statistics.median(starts):.2f}s, stop median {statistics.median(stops):.2f}s "
        f"({args.boxes} cycles)"
    )

    box = MultiNodeCluster(2).start()
    try:
        print(f"fi_pingpong -p tcp, node1 <-> node2 over veth+bridge, {args.iterations} iters")
        print(f"{'ep':>5} {'bytes':>9} {'usec/xfer':>10} {'MB/s':>9}")
        for ep in args.ep.split(","):
            for size in (int(s) for s in args.sizes.split(",")):
                usec, mbs = pingpong(box, ep, size, args.iterations)
                print(f"{ep:>5} {size:>9} {usec:>10.2f} {mbs:>9.1f}")
    finally:
        box.stop()
    left = box.leftovers()
    if left:
        raise SystemExit("left behind: " + "; ".join(left))


if __name__ == "__main__":
    main()
