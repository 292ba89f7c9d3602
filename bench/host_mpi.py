"""`--host-mpi`: an MPI ping-pong and the launch time, three ways, in one run.

1. in the container with the image's own MPI (Debian MPICH 4.0.2, UCX),
2. in the same container with the host MPI injected (`--host-mpi PREFIX`: PyPI's MPICH
   5.0.2 wheel, by default the one `make test` installs under .venv/opt/mpich),
3. the same host MPI on the host (the program's `libmpich.so.12` resolved to the host
   library through LD_LIBRARY_PATH, as the container's loader does).

All three launched by `rankwire run -n 2` (our PMI server), interleaved, medians. Goal:
the injected MPI within 2 % of the host on latency (8 B) and bandwidth (1 MiB).

    .venv/bin/python bench/host_mpi.py [--repeat 5] [--prefix DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
RANKWIRE = str(Path(sys.executable).with_name("rankwire"))

PINGPONG = r"""
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
/* rank 0 <-> 1: one-way latency (us) at 8 B and bandwidth (MB/s) at 1 MiB. */
static double run(int bytes, int iters, char *buf, int rank)
{
    MPI_Barrier(MPI_COMM_WORLD);
    double t0 = MPI_Wtime();
    for (int i = 0; i < iters; i++) {
        if (rank == 0) {
            MPI_Send(buf, bytes, MPI_CHAR, 1, 0, MPI_COMM_WORLD);
            MPI_Recv(buf, bytes, MPI_CHAR, 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        } else {
            MPI_Recv(buf, bytes, MPI_CHAR, 0, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            MPI_Send(buf, bytes, MPI_CHAR, 0, 0, MPI_COMM_WORLD);
        }
    }
    return (MPI_Wtime() - t0) / (2.0 * iters);
}
int main(int argc, char **argv)
{
    int rank;
    char *buf = calloc(1, 1 << 20), version[MPI_MAX_LIBRARY_VERSION_STRING];
    int len;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Get_library_version(version, &len);
    run(8, 1000, buf, rank);
    double lat = run(8, 20000, buf, rank);
    run(1 << 20, 20, buf, rank);
    double bw = run(1 << 20, 200, buf, rank);
    if (rank == 0) {
        for (char *c = version; *c; c++) if (*c == '\n' || *c == '\t') *c = ' ';
        printf("lat_us=%.3f bw_mbs=%.1f lib=%.40s\n", lat * 1e6, (1 << 20) / bw / 1e6, version);
    }
    MPI_Finalize();
    return 0;
}
"""


def parse(out: str) -> tuple[float, float, str]:
    line = next(x for x in out.splitlines() if x.startswith("lat_us="))
    fields = dict(f.split("=", 1) for f in line.split(" ", 2))
    return float(fields["lat_us"]), float(fields["bw_mbs"]), line.split("lib=", 1)[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--prefix", default=str(REPO / ".venv/opt/mpich"), help="the host MPI")
    args = ap.parse_args()
    from harness.images import make_rootfs, make_world_readable
    from rankwire.runtime.build import build_image

    prefix = Path(args.prefix)
    work = Path(tempfile.mkdtemp(prefix="rankwire-bench-"))
    try:
        src, prog = work / "pingpong.c", work / "pingpong"
        src.write_text(PINGPONG)
        subprocess.run(["mpicc.mpich", "-O2", str(src), "-o", str(prog)], check=True)
        rootfs = make_rootfs(
            work / "rootfs", binaries=[str(prog)], trees=["/usr/lib/x86_64-linux-gnu/ucx"]
        )
        for name in ("libdl.so.2", "librt.so.1", "libpthread.so.0"):
            shutil.copy2(f"/lib/x86_64-linux-gnu/{name}", rootfs / "lib/x86_64-linux-gnu")
        (rootfs / "opt").mkdir()
        shutil.copy2(prog, rootfs / "opt/pingpong")
        image = work / "pp.sif"
        build_image(image, rootfs)
        # On the host: libmpich.so.12 -> the host MPI's libmpi.so.12, its deps after it.
        shim = work / "hostlib"
        shim.mkdir()
        os.symlink(prefix / "lib/libmpi.so.12", shim / "libmpich.so.12")
        host_env = {
            **os.environ,
            "LD_LIBRARY_PATH": f"{shim}:{prefix / 'lib'}:{prefix / 'lib/mpich'}",
        }
        make_world_readable(work)
        runs = {
            "image's MPI in the container": (
                [RANKWIRE, "run", "-n", "2", "--image", str(image), "/opt/pingpong"],
                None,
            ),
            "host MPI injected (--host-mpi)": (
                [
                    RANKWIRE,
                    "run",
                    "-n",
                    "2",
                    "--host-mpi",
                    str(prefix),
                    "--image",
                    str(image),
                    "/opt/pingpong",
                ],
                None,
            ),
            "host MPI on the host": ([RANKWIRE, "run", "-n", "2", str(prog)], host_env),
        }
        results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in runs}
        libs: dict[str, str] = {}
        for round_ in range(args.repeat + 1):
            for name, (argv, env) in runs.items():
                t0 = time.perf_counter()
                proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd="/tmp")
                wall = time.perf_counter() - t0
                if proc.returncode:
                    sys.exit(f"{name}: exit {proc.returncode}: {proc.stderr.strip()}")
                lat, bw, lib = parse(proc.stdout)
                libs[name] = lib
                if round_:  # the first round warms caches
                    results[name].append((lat, bw, wall))
        host = results["host MPI on the host"]
        h_lat = statistics.median(r[0] for r in host)
        h_bw = statistics.median(r[1] for r in host)
        print(f"2 ranks, one node, {args.repeat} interleaved runs each, medians:")
        print("| run | library | latency 8 B (us) | vs host | bandwidth 1 MiB (MB/s) | vs host "
              "| launch+run (ms) |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for name, rows in results.items():
            lat = statistics.median(r[0] for r in rows)
            bw = statistics.median(r[1] for r in rows)
            wall = statistics.median(r[2] for r in rows) * 1000
            print(
                f"| {name} | {libs[name].strip()} | {lat:.2f} | {lat / h_lat:.3f} | {bw:.0f} | "
                f"{bw / h_bw:.3f} | {wall:.0f} |"
            )
        print(f"(cpus: {os.cpu_count()}; goal: injected within 2 % of the host)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
