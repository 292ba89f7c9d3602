"""Job launch time of rankwire vs mpiexec.hydra, same program, same run.

For N ranks of the hello (MPI_Init + Allreduce + Finalize), Debian MPICH (PMI-1):
  mpiexec.hydra -n N hello                      (the peer: Hydra's own PMI-1 server)
  rankwire run -n N hello                       (our PMI server, ranks on the host)
  apptainer-mpirun -n N img.sif /opt/hello      (our PMI server, one shared container)
and Debian Open MPI 4.1 (PMIx):
  mpirun.openmpi -n N --oversubscribe hello     (the peer: ORTE and its PMIx server)
  rankwire run --pmi pmix -n N hello            (our PMIx server, ranks on the host)
  apptainer-mpirun -n N img.sif /opt/hello      (our PMIx server, one shared container)
Medians of wall time over --repeat runs, and ratios against each MPI's own launcher.

    .venv/bin/python bench/launch.py [--repeat 7] [--sizes 4,16,32]
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

from harness.images import make_rootfs  # noqa: E402
from harness.mpi import assert_hello, compile_hello, ompi_env  # noqa: E402

BIN = Path(sys.executable).parent


OMPI_TREES = [
    "/usr/lib/x86_64-linux-gnu/openmpi",
    "/usr/lib/x86_64-linux-gnu/pmix2",
    "/etc/openmpi",
    "/usr/share/openmpi",
]


def median_ms(argv: list[str], n: int, repeat: int) -> float:
    times = []
    env = ompi_env(dict(os.environ))
    for i in range(repeat + 1):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
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
        root = make_rootfs(
            work / "rootfs",
            binaries=[str(progs.hello_mpich)],
            trees=["/usr/lib/x86_64-linux-gnu/ucx"],
        )
        (root / "opt").mkdir()
        shutil.copy2(progs.hello_mpich, root / "opt/hello_mpich")
        img = work / "mpich.sif"
        build_image(img, root)
        oroot = make_rootfs(
            work / "ompi-rootfs",
            binaries=[str(progs.hello_ompi)],
            trees=[t for t in OMPI_TREES if os.path.exists(t)],
        )
        (oroot / "opt").mkdir()
        shutil.copy2(progs.hello_ompi, oroot / "opt/hello_ompi")
        oimg = work / "ompi.sif"
        build_image(oimg, oroot)
        rw, amr = str(BIN / "rankwire"), str(BIN / "apptainer-mpirun")
        print(f"{'N':>3} {'launcher':50} {'median ms':>10} {'ratio':>7}")
        for n in (int(s) for s in args.sizes.split(",")):
            hello, ohello = str(progs.hello_mpich), str(progs.hello_ompi)
            groups = [
                [
                    ("mpiexec.hydra -n N hello", ["mpiexec.hydra", "-n", str(n), hello]),
                    ("rankwire run -n N hello", [rw, "run", "-n", str(n), hello]),
                    (
                        "apptainer-mpirun -n N img /opt/hello_mpich",
                        [amr, "-n", str(n), str(img), "/opt/hello_mpich"],
                    ),
                ],
                [
                    (
                        "mpirun.openmpi -n N hello_ompi",
                        ["mpirun.openmpi", "-n", str(n), "--oversubscribe", ohello],
                    ),
                    (
                        "rankwire run --pmi pmix -n N hello_ompi",
                        [rw, "run", "--pmi", "pmix", "-n", str(n), ohello],
                    ),
                    (
                        "apptainer-mpirun -n N img /opt/hello_ompi",
                        [amr, "-n", str(n), str(oimg), "/opt/hello_ompi"],
                    ),
                ],
            ]
            for rows in groups:
                base = None
                for label, argv in rows:
                    ms = median_ms(argv, n, args.repeat)
                    base = base or ms
                    print(f"{n:>3} {label:50} {ms:10.1f} {ms / base:7.2f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
