"""Job launch time of rankwire vs mpiexec.hydra, same program, same run.

For N ranks of the MPICH hello (MPI_Init + Allreduce + Finalize):
  mpiexec.hydra -n N hello                      (the peer: Hydra's own PMI-1 server)
  rankwire run -n N hello                       (our PMI server, ranks on the host)
  apptainer-mpirun -n N img.sif /opt/hello      (our PMI server, one shared container)
Medians of wall time over --repeat runs, and ratios against hydra.

    .venv/bin/python bench/launch.py [--repeat 7] [--sizes 4,16,32]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from harness.images import make_rootfs  # noqa: E402
from harness.mpi import assert_hello, compile_hello  # noqa: E402

BIN = Path(sys.executable).parent


def median_ms(argv: list[str], n: int, repeat: int) -> float:
    times = []
    for i in range(repeat + 1):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr}")
        assert_hello(proc.stdout, n)
        if i:  # the first run warms caches
            times.append(elapsed)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--sizes", default="4,16,32")
    args = ap.parse_args()
    from rankwire.runtime.build import build_image

    work = Path(tempfile.mkdtemp(prefix="rankwire-bench-"))
    try:
        (work / "bin").mkdir()
        progs = compile_hello(REPO / "examples", work / "bin")
        root = make_rootfs(work / "rootfs", binaries=[str(progs.hello_mpich)],
                           trees=["/usr/lib/x86_64-linux-gnu/ucx"])
        (root / "opt").mkdir()
        shutil.copy2(progs.hello_mpich, root / "opt/hello_mpich")
        img = work / "mpich.sif"
        build_image(img, root)
        hello = str(progs.hello_mpich)
        print(f"{'N':>3} {'launcher':44} {'median ms':>10} {'vs hydra':>9}")
        for n in (int(s) for s in args.sizes.split(",")):
            rows = [
                ("mpiexec.hydra -n N hello", ["mpiexec.hydra", "-n", str(n), hello]),
                ("rankwire run -n N hello", [str(BIN / "rankwire"), "run", "-n", str(n), hello]),
                ("apptainer-mpirun -n N img /opt/hello_mpich",
                 [str(BIN / "apptainer-mpirun"), "-n", str(n), str(img), "/opt/hello_mpich"]),
            ]
            base = None
            for label, argv in rows:
                ms = median_ms(argv, n, args.repeat)
                base = base or ms
                print(f"{n:>3} {label:44} {ms:10.1f} {ms / base:9.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
