"""Concurrent container starts: `rankwire exec` bursts, and srun steps through the plugin.

1. --rounds (8) rounds of --burst (8) concurrent `rankwire exec IMG /bin/true` (the race of
   issue 13 defect 1: holders starting and pruning each other's sockets and dirs). Counts
   the runs that exit 0 and the `squashfuse_ll` of the image still running afterwards.
2. As root, --steps (16) concurrent `srun -n 1 --container-image=IMG /bin/true` on a
   throwaway single-node Slurm with the plugin installed (`make -C spank install`): how many
   succeed, the wall time of the burst, and leftover `squashfuse_ll` of the image.

    .venv/bin/python bench/exec_load.py [--rounds 8] [--burst 8] [--steps 16] [--no-srun]

The image is built here (host coreutils, like the tests' base image), so leftovers are told
from other processes' by its path. Exits 1 unless every run succeeds and nothing is left.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from harness.images import make_rootfs  # noqa: E402

BIN = Path(sys.executable).parent
SETTLE_S = 5.0  # how long holders may take to go after their last lease


def leftovers(image: Path) -> list[str]:
    """`squashfuse_ll` processes serving `image`, once the holders had time to end."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        proc = subprocess.run(["pgrep", "-af", "squashfuse_ll"], capture_output=True, text=True)
        found = [line for line in proc.stdout.splitlines() if str(image) in line]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def burst(argvs: list[list[str]], env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Start every argv at once; (how many exited 0, the stderr of the others)."""
    procs = [
        subprocess.Popen(
            a, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd="/tmp"
        )
        for a in argvs
    ]
    ok, errors = 0, []
    for p in procs:
        _, err = p.communicate(timeout=300)
        if p.returncode == 0:
            ok += 1
        else:
            errors.append(f"exit {p.returncode}: {err.strip()}")
    return ok, errors


def exec_bursts(image: Path, rounds: int, size: int) -> bool:
    argv = [str(BIN / "rankwire"), "exec", str(image), "/bin/true"]
    ok, errors = 0, []
    t0 = time.perf_counter()
    for _ in range(rounds):
        n, errs = burst([argv] * size)
        ok += n
        errors += errs
    wall = time.perf_counter() - t0
    left = leftovers(image)
    print(
        f"rankwire exec: {ok}/{rounds * size} succeeded ({rounds} rounds of {size} at once, "
        f"{wall:.1f} s); squashfuse_ll left: {len(left)}"
    )
    for line in [*errors[:5], *left]:
        print(f"  {line}")
    return ok == rounds * size and not left


def srun_steps(image: Path, work: Path, steps: int) -> bool:
    from harness.slurm import SlurmCluster
    from harness.spank import install_plugin

    install = install_plugin(REPO, work / "prefix", str(BIN / "rankwire"))
    cluster = SlurmCluster()
    try:
        cluster.start()
        cluster.plugstack.write_text(install.plugstack_line())
        argv = ["srun", "-n", "1", f"--container-image={image}", "/bin/true"]
        burst([argv], cluster.env)  # warm-up: slurmd, the helper's imports
        t0 = time.perf_counter()
        ok, errors = burst([argv] * steps, cluster.env)
        wall = time.perf_counter() - t0
    finally:
        cluster.stop()
    left = leftovers(image)
    print(
        f"srun --container-image (plugin): {ok}/{steps} steps succeeded, all started at once, "
        f"{wall:.1f} s wall; squashfuse_ll left: {len(left)}"
    )
    for line in [*errors[:5], *left]:
        print(f"  {line}")
    return ok == steps and not left


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--burst", type=int, default=8)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--no-srun", action="store_true", help="Skip the Slurm part.")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rankwire-bench-load-"))
    work.chmod(0o755)
    try:
        image = work / "base.sif"
        rootfs = make_rootfs(work / "rootfs")
        subprocess.run(
            [str(BIN / "rankwire"), "build", str(image), str(rootfs)],
            check=True,
            capture_output=True,
        )
        ok = exec_bursts(image, args.rounds, args.burst)
        if args.no_srun:
            pass
        elif os.getuid() != 0:
            print("srun steps: skipped (needs root: it runs a throwaway slurmd)")
        else:
            ok = srun_steps(image, work, args.steps) and ok
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
