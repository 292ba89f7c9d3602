"""Container start overhead, measured against peers in the same run.

1. `rankwire exec IMG /bin/true` vs `/bin/true` on the host (median wall time, ratio).
2. N processes joining one instance (`exec instance://NAME`) vs N separate `exec`s,
   all N started at once (wall time until all have exited, median over repeats).

    .venv/bin/python bench/container_start.py [--repeat 15] [-n 32]
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness.images import make_rootfs

BIN = Path(sys.executable).parent


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def timed_parallel(argvs: list[list[str]]) -> float:
    t0 = time.perf_counter()
    procs = [subprocess.Popen(a, stdout=subprocess.DEVNULL) for a in argvs]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit("a process failed")
    return time.perf_counter() - t0


def median_ms(fn, repeat: int) -> float:
    fn()  # warm-up (page cache, pyc)
    return statistics.median(fn() for _ in range(repeat)) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("-n", type=int, default=32)
    args = ap.parse_args()
    from rankwire.runtime.build import build_image

    work = Path(tempfile.mkdtemp(prefix="rankwire-bench-"))
    try:
        img = work / "img.sif"
        build_image(img, make_rootfs(work / "rootfs"))
        rw = str(BIN / "rankwire")
        host = median_ms(lambda: timed(["/bin/true"]), args.repeat)
        cont = median_ms(lambda: timed([rw, "exec", str(img), "/bin/true"]), args.repeat)
        print(f"{'case':44} {'median ms':>10} {'ratio':>8}")
        print(f"{'/bin/true on the host':44} {host:10.1f} {1:8.1f}")
        print(f"{'rankwire exec img /bin/true':44} {cont:10.1f} {cont / host:8.1f}")
        n = args.n
        sep = median_ms(
            lambda: timed_parallel([[rw, "exec", str(img), "/bin/true"]] * n),
            max(3, args.repeat // 3),
        )
        subprocess.run(
            [rw, "instance", "start", str(img), "bench"], check=True, stdout=subprocess.DEVNULL
        )
        try:
            joined = median_ms(
                lambda: timed_parallel([[rw, "exec", "instance://bench", "/bin/true"]] * n),
                max(3, args.repeat // 3),
            )
        finally:
            subprocess.run([rw, "instance", "stop", "bench"], check=True, stdout=subprocess.DEVNULL)
        print(f"{f'{n} separate execs, all at once':44} {sep:10.1f} {1:8.2f}")
        print(f"{f'{n} joins of one instance, all at once':44} {joined:10.1f} {joined / sep:8.2f}")
        print(f"(cpus: {os.cpu_count()}, repeats: {args.repeat})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
