"""What the SPANK plugin costs, against plain srun in the same run (root; a throwaway Slurm).

1. No-op overhead: `srun -n 2 true` with the plugin loaded (no container asked for) vs
   a plugstack without it. Runs alternate, so both see the same machine noise.
2. For N ranks of the MPICH hello (MPI_Init + Allreduce + Finalize, --mpi=pmi2):
     srun -n N hello                                      (bare, on the host: the peer)
     srun -n N --container-image=img.sif /opt/hello       (the plugin: one container/node)
     srun -n N rankwire exec img.sif /opt/hello           (no plugin: a rankwire per rank)
3. Named containers (`--container-name`), in one job: `srun -n 2 true` joining the job's
   container that runs already, as the shim does from its ticket and as the helper does
   (the ticket removed before each run), against a fresh container per step and bare.
Medians of wall time over --repeat runs (after one warm-up), and ratios against bare.
`--shim-baseline REV` adds to section 2 the plugin step with the C shim of git revision
REV (the Python helper stays this checkout's), in the same alternation: an A/B of a shim
change in one run. `--front-baseline REV` adds `srun rankwire exec` with the C front end
(`runtime/front.c`) of revision REV (the Python CLI stays this checkout's, whose step plans
only a front end that hands it the step's lock uses). `--mpi pmix` runs section 2's
container rows under Slurm's PMIx plugin (through the PMI bridge; bare srun stays at
`--mpi=pmi2`: Debian's MPICH speaks PMI only).

    .venv/bin/python bench/spank.py [--repeat 7] [--sizes 2,8] [--mpi pmi2|pmix]
                                    [--shim-baseline REV] [--front-baseline REV]
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
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from harness.images import make_rootfs  # noqa: E402
from harness.mpi import assert_hello, compile_hello  # noqa: E402
from harness.slurm import SlurmCluster  # noqa: E402
from harness.spank import SpankInstall, install_plugin  # noqa: E402

BIN = Path(sys.executable).parent


def timed(argv: list[str], env: dict[str, str], check: Callable[[str], object]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd="/tmp")
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr}")
    check(proc.stdout)
    return elapsed * 1000


def alternate(
    rows: dict[str, tuple[list[str], Callable[[], None]]],
    env: dict[str, str],
    repeat: int,
    check: Callable[[str], object],
) -> dict[str, float]:
    """Median ms per row; rows take turns so that noise hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in rows}
    for i in range(repeat + 1):
        for name, (argv, prepare) in rows.items():
            prepare()
            ms = timed(argv, env, check)
            if i:  # the first round warms caches
                times[name].append(ms)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--sizes", default="2,8")
    ap.add_argument("--mpi", choices=("pmi2", "pmix"), default="pmi2")
    ap.add_argument("--shim-baseline", metavar="REV")
    ap.add_argument("--front-baseline", metavar="REV")
    args = ap.parse_args()
    if os.getuid() != 0:
        raise SystemExit("bench/spank.py needs root (it runs a throwaway slurmd)")

    work = Path(tempfile.mkdtemp(prefix="rankwire-bench-spank-"))
    work.chmod(0o755)
    cluster: SlurmCluster | None = None
    try:
        bindir = work / "mpi"
        bindir.mkdir()
        progs = compile_hello(REPO / "examples", bindir)
        rootfs = make_rootfs(
            work / "rootfs",
            binaries=[str(progs.hello_mpich)],
            trees=["/usr/lib/x86_64-linux-gnu/ucx"],
        )
        (rootfs / "opt").mkdir()
        shutil.copy2(progs.hello_mpich, rootfs / "opt" / "hello_mpich")
        image = work / "mpich.sif"
        subprocess.run([str(BIN / "rankwire"), "build", str(image), str(rootfs)], check=True,
                       capture_output=True)  # fmt: skip
        install = install_plugin(REPO, work / "prefix", str(BIN / "rankwire"))
        baseline = shim_of(args.shim_baseline, work) if args.shim_baseline else None
        old_front = front_of(args.front_baseline, work) if args.front_baseline else None
        # Loaded at slurmd's start, as at a site: slurmd runs SPANK job epilogs (which end
        # the named containers of section 3) only for the plugins it loaded then.
        cluster = SlurmCluster(plugstack=install.plugstack_line())
        cluster.start()
        env = cluster.env

        def plugstack(text: str) -> Callable[[], None]:
            return lambda: cluster.plugstack.write_text(text)

        loaded, empty = plugstack(install.plugstack_line()), plugstack("")
        noop = alternate(
            {
                "without plugin": (["srun", "-n", "2", "true"], empty),
                "with plugin": (["srun", "-n", "2", "true"], loaded),
            },
            env,
            args.repeat,
            lambda out: None,
        )
        print(f"## `srun -n 2 true`, medians of {args.repeat} (plugin loaded, no container)\n")
        print("| plugstack | ms | ratio |\n|---|---|---|")
        base = noop["without plugin"]
        for name, ms in noop.items():
            print(f"| {name} | {ms:.0f} | {ms / base:.2f} |")

        print(f"\n## MPICH hello, `--mpi={args.mpi}`, medians of {args.repeat}\n")
        head = "| N | bare srun ms | --container-image ms | ratio | srun rankwire exec ms | ratio |"
        if baseline is not None:
            head += f" with {args.shim_baseline}'s shim ms | ratio | now / {args.shim_baseline} |"
        if old_front is not None:
            rev = args.front_baseline
            head += f" exec with {rev}'s front end ms | ratio | exec now / {rev} |"
        print(head)
        print("|---" * (head.count("|") - 1) + "|")
        loaded()
        for n in (int(s) for s in args.sizes.split(",")):
            common = ["srun", "-n", str(n), f"--mpi={args.mpi}"]
            in_image = [*common, f"--container-image={image}", "/opt/hello_mpich"]
            rows = {
                # Debian's MPICH speaks PMI only: bare srun stays at --mpi=pmi2
                "bare": (["srun", "-n", str(n), "--mpi=pmi2", str(progs.hello_mpich)], loaded),
                "plugin": (in_image, loaded),
                "exec": (
                    [*common, str(BIN / "rankwire"), "exec", str(image), "/opt/hello_mpich"],
                    loaded,
                ),
            }
            if baseline is not None:
                rows["baseline"] = (in_image, plugstack(baseline.plugstack_line()))
            if old_front is not None:
                old_exec = [*common, str(old_front), "exec", str(image), "/opt/hello_mpich"]
                rows["old front"] = (old_exec, loaded)
            res = alternate(rows, env, args.repeat, lambda out, n=n: assert_hello(out, n))
            loaded()
            bare = res["bare"]
            line = (
                f"| {n} | {bare:.0f} | {res['plugin']:.0f} | {res['plugin'] / bare:.2f} "
                f"| {res['exec']:.0f} | {res['exec'] / bare:.2f} |"
            )
            if baseline is not None:
                old = res["baseline"]
                line += f" {old:.0f} | {old / bare:.2f} | {res['plugin'] / old:.3f} |"
            if old_front is not None:
                old = res["old front"]
                line += f" {old:.0f} | {old / bare:.2f} | {res['exec'] / old:.3f} |"
            print(line)
        named(cluster, image, args.repeat)
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


def front_of(rev: str, work: Path) -> Path:
    """The C front end built from git revision `rev`, beside a link to this checkout's
    Python CLI (the front end runs the `rankwire-py` next to it)."""
    where = work / "front-baseline"
    where.mkdir()
    for path in ("runtime/front.c", "spank/frame.c", "spank/frame.h"):
        text = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"], check=True,
                              capture_output=True).stdout  # fmt: skip
        (where / Path(path).name).write_bytes(text)
    subprocess.run(["cc", "-O2", "-I", str(where), "-o", str(where / "rankwire"),
                    str(where / "front.c"), str(where / "frame.c")], check=True)  # fmt: skip
    (where / "rankwire-py").symlink_to(BIN / "rankwire-py")
    return where / "rankwire"


def shim_of(rev: str, work: Path) -> SpankInstall:
    """The plugin built from git revision `rev`'s spank/ (a throwaway worktree), run with
    this checkout's helper."""
    tree = work / "baseline"
    git = ["git", "-C", str(REPO)]
    subprocess.run([*git, "worktree", "add", "--detach", str(tree), rev], check=True,
                   capture_output=True)  # fmt: skip
    try:
        return install_plugin(tree, work / "prefix-baseline", str(BIN / "rankwire"))
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(tree)], check=True,
                       capture_output=True)  # fmt: skip


def named(cluster: SlurmCluster, image: Path, repeat: int) -> None:
    """Section 3: steps of one allocation (its epilog ends the container)."""
    import re

    from harness.spank import end_job, slurmd_dir

    env = cluster.env
    got = subprocess.run(["salloc", "--no-shell", "-n", "2"], env=env, capture_output=True,
                         text=True, cwd="/tmp")  # fmt: skip
    found = re.search(r"Granted job allocation (\d+)", got.stderr)
    if not found:
        raise SystemExit(f"salloc failed:\n{got.stderr}")
    job = found.group(1)
    ticket = slurmd_dir(cluster) / job / f".{os.getuid()}.join"
    step = ["srun", f"--jobid={job}", "-n", "2"]
    try:
        made = [*step, f"--container-image={image}", "--container-name=box", "true"]
        subprocess.run(made, env=env, check=True, capture_output=True, cwd="/tmp")
        res = alternate(
            {
                "bare": ([*step, "true"], lambda: None),
                "fresh": ([*step, f"--container-image={image}", "true"], lambda: None),
                "join": ([*step, "--container-name=box", "true"], lambda: None),
                "join, helper": (
                    [*step, "--container-name=box", "true"],
                    lambda: ticket.unlink(missing_ok=True),
                ),
            },
            env,
            repeat,
            lambda out: None,
        )
    finally:
        end_job(cluster, int(job))
    bare = res["bare"]
    print(f"\n## Named containers: `srun -n 2 true` in one job, medians of {repeat}\n")
    print("| step | ms | over bare ms | ratio |\n|---|---|---|---|")
    for name, ms in res.items():
        print(f"| {name} | {ms:.0f} | {ms - bare:+.0f} | {ms / bare:.2f} |")


if __name__ == "__main__":
    main()
