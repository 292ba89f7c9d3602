"""PMI bridge fence latency: PMI through the bridge vs a plain PMIx fence, in the same srun.

One `srun --mpi=pmix -n N` step on a throwaway Slurm (root: it runs slurmd). Every task
runs this file with `--task` and, --rounds times, alternating:

* direct:  a forked PMIx client of the task's rank: PMIx_Init, --fences PMIx_Fence
           (collect data, nothing put), then --gathers allgathers (put + commit + fence +
           a PMIx_Get of every other rank's key), PMIx_Finalize;
* bridge:  `pmi.bridge.spawn` and a PMI-2 client (pmi/client.py) on its PMI_FD: init,
           --fences kvs-fence, then --gathers allgathers (put, fence, get every rank's
           key), finalize.

Each rank times every operation; the table shows the median over rounds and ranks of each
rank's median.

Then the launch of Debian's MPICH hello (init + allreduce + finalize) in an image, the
way users run it, bridged vs matched: `srun --mpi=pmix -n N rankwire exec mpich.sif hello`
(the tasks' bridges serve PMI-1 through Slurm's PMIx) against `srun --mpi=pmi2 -n N
rankwire exec mpich.sif hello` (Slurm's own PMI-2 server), and the same on the host
without a container (`rankwire pmi bridge -- hello`, which starts one more interpreter per
task, against plain `hello`), alternating, median of --repeat. And the other bridge: Open
MPI's hello in an image, `srun --mpi=pmi2 rankwire exec ompi.sif` (each task's PMIx server
over Slurm's PMI-2) against `srun --mpi=pmix rankwire exec ompi.sif` (Slurm's PMIx), and the
same through the plugin (`--container-image=ompi.sif`: the shims of a node's other tasks
join its server without a process of their own).

Everything runs on one host (2 cores here), so only the ratios mean something.

    .venv/bin/python bench/bridge.py [--ntasks 4] [--fences 200] [--gathers 20] [--rounds 2]
                                     [--sizes 2,8] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def _direct(fences: int, gathers: int, out_fd: int) -> None:
    """Child process: the plain PMIx numbers, one JSON object written to `out_fd`."""
    from rankwire.pmi.pmix.abi import Proc
    from rankwire.pmi.pmix.client_lib import Client

    client = Client()
    me = client.init()
    size = int(client.get("pmix.job.size", Proc(me.nspace, 0xFFFFFFFE)))
    client.fence()  # everybody is in
    fence_ms = []
    for _ in range(fences):
        t = time.perf_counter()
        client.fence(collect=True)
        fence_ms.append((time.perf_counter() - t) * 1e3)
    gather_ms = []
    for g in range(gathers):
        t = time.perf_counter()
        client.put(f"bench-{g}", f"value-{me.rank}-{g}")
        client.commit()
        client.fence(collect=True)
        for r in range(size):
            if r != me.rank:
                client.get(f"bench-{g}", Proc(me.nspace, r))
        gather_ms.append((time.perf_counter() - t) * 1e3)
    client.finalize()
    doc = {"fence": statistics.median(fence_ms), "gather": statistics.median(gather_ms)}
    os.write(out_fd, json.dumps(doc).encode())


def _bridged(fences: int, gathers: int) -> dict[str, float]:
    from rankwire.pmi.bridge import spawn
    from rankwire.pmi.client import Pmi2Client

    bridge = spawn(os.environ)
    pmi = Pmi2Client.from_env(bridge.task_env(os.environ))
    pmi.init()
    pmi.fence()
    fence_ms = []
    for _ in range(fences):
        t = time.perf_counter()
        pmi.fence()
        fence_ms.append((time.perf_counter() - t) * 1e3)
    gather_ms = []
    for g in range(gathers):
        t = time.perf_counter()
        pmi.put(f"bench-{g}-{pmi.rank}", f"value-{pmi.rank}-{g}")
        pmi.fence()
        for r in range(pmi.size):
            if pmi.get(f"bench-{g}-{r}") != f"value-{r}-{g}":
                raise SystemExit(f"rank {pmi.rank}: wrong value for rank {r} in gather {g}")
        gather_ms.append((time.perf_counter() - t) * 1e3)
    pmi.finalize()
    bridge.wait(10)
    return {"fence": statistics.median(fence_ms), "gather": statistics.median(gather_ms)}


def task(fences: int, gathers: int, rounds: int) -> None:
    """One task of the step: print one JSON line per round and kind."""
    rank = int(os.environ["PMIX_RANK"])
    for rnd in range(rounds):
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            try:
                _direct(fences, gathers, wfd)
            finally:
                os._exit(0)
        os.close(wfd)
        with os.fdopen(rfd) as pipe:
            direct = json.loads(pipe.read())
        os.waitpid(pid, 0)
        print(json.dumps({"round": rnd, "rank": rank, "kind": "direct", **direct}), flush=True)
        bridged = _bridged(fences, gathers)
        print(json.dumps({"round": rnd, "rank": rank, "kind": "bridge", **bridged}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ntasks", type=int, default=4)
    ap.add_argument("--fences", type=int, default=200)
    ap.add_argument("--gathers", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sizes", default="2,8", help="task counts of the launch table")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--task", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.task:
        task(args.fences, args.gathers, args.rounds)
        return
    if os.getuid() != 0:
        raise SystemExit("bench/bridge.py needs root (it runs a throwaway slurmd)")
    import tempfile

    from harness.host import OMPI_TREES
    from harness.images import make_rootfs
    from harness.mpi import compile_hello, ompi_env
    from harness.slurm import SlurmCluster
    from harness.spank import install_plugin
    from rankwire.runtime.build import build_image

    work = Path(tempfile.mkdtemp(prefix="rankwire-bench-bridge-"))
    work.chmod(0o755)
    rankwire = str(Path(sys.executable).parent / "rankwire")
    cluster = SlurmCluster(
        plugstack=install_plugin(REPO, work / "prefix", rankwire).plugstack_line()
    )
    launches: dict[tuple[int, str], float] = {}
    try:
        progs = compile_hello(REPO / "examples", work)
        hello = str(progs.hello_mpich)
        root = make_rootfs(
            work / "rootfs", binaries=[hello], trees=["/usr/lib/x86_64-linux-gnu/ucx"]
        )
        (root / "opt").mkdir()
        shutil.copy2(hello, root / "opt" / "hello")
        image = str(work / "mpich.sif")
        build_image(Path(image), root)
        trees = [t for t in OMPI_TREES if os.path.exists(t)]
        oroot = make_rootfs(work / "orootfs", binaries=[str(progs.hello_ompi)], trees=trees)
        (oroot / "opt").mkdir()
        shutil.copy2(progs.hello_ompi, oroot / "opt" / "hello")
        oimage = str(work / "ompi.sif")
        build_image(Path(oimage), oroot)
        cluster.start()
        argv = [
            "srun", "--mpi=pmix", f"--ntasks={args.ntasks}", "--overcommit", sys.executable,
            __file__, "--task", f"--fences={args.fences}", f"--gathers={args.gathers}",
            f"--rounds={args.rounds}",
        ]  # fmt: skip
        proc = subprocess.run(argv, env=cluster.env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"the step failed ({proc.returncode}):\n{proc.stderr}")
        for n in (int(x) for x in args.sizes.split(",")):
            srun = ["srun", f"-n{n}", "--overcommit"]
            kinds = {
                "matched": [*srun, "--mpi=pmi2", rankwire, "exec", image, "/opt/hello"],
                "bridged": [*srun, "--mpi=pmix", rankwire, "exec", image, "/opt/hello"],
                "host matched": [*srun, "--mpi=pmi2", hello],
                "host bridged": [*srun, "--mpi=pmix", rankwire, "pmi", "bridge", "--", hello],
                "ompi matched": [*srun, "--mpi=pmix", rankwire, "exec", oimage, "/opt/hello"],
                "ompi bridged": [*srun, "--mpi=pmi2", rankwire, "exec", oimage, "/opt/hello"],
                "mpich plugin matched": [
                    *srun,
                    "--mpi=pmi2",
                    f"--container-image={image}",
                    "/opt/hello",
                ],
                "mpich plugin bridged": [
                    *srun,
                    "--mpi=pmix",
                    f"--container-image={image}",
                    "/opt/hello",
                ],
                "plugin matched": [
                    *srun,
                    "--mpi=pmix",
                    f"--container-image={oimage}",
                    "/opt/hello",
                ],
                "plugin bridged": [
                    *srun,
                    "--mpi=pmi2",
                    f"--container-image={oimage}",
                    "/opt/hello",
                ],
            }
            # Open MPI as root needs telling; its ranks of one node over loopback, both ways.
            env = ompi_env({**cluster.env, "OMPI_MCA_btl_tcp_if_include": "lo"})
            times: dict[str, list[float]] = {k: [] for k in kinds}
            for i in range(args.repeat + 1):
                for kind, cmd in kinds.items():
                    t = time.perf_counter()
                    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
                    if run.returncode != 0 or run.stdout.count(f"size={n} ") != n:
                        raise SystemExit(f"{kind} launch of {n} failed:\n{run.stderr}")
                    if i:  # the first round warms caches
                        times[kind].append((time.perf_counter() - t) * 1e3)
            for kind, ms in times.items():
                launches[(n, kind)] = statistics.median(ms)
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    med = {
        (kind, what): statistics.median(r[what] for r in rows if r["kind"] == kind)
        for kind in ("direct", "bridge")
        for what in ("fence", "gather")
    }
    print(
        f"## {args.ntasks} tasks on one node, `srun --mpi=pmix`; median over {args.rounds} "
        "rounds x ranks of each rank's median\n"
    )
    print("| operation | plain PMIx ms | through the bridge ms | bridge / plain |")
    print("|---|---|---|---|")
    names = {
        "fence": f"fence (x{args.fences})",
        "gather": f"allgather: put + fence + {args.ntasks - 1} gets (x{args.gathers})",
    }
    for what, name in names.items():
        d, b = med[("direct", what)], med[("bridge", what)]
        print(f"| {name} | {d:.3f} | {b:.3f} | {b / d:.2f} |")

    print(f"\n## hello launch, median of {args.repeat}\n")
    print("| N | where | srun --mpi=pmi2 ms | srun --mpi=pmix + bridge ms | bridged / matched |")
    print("|---|---|---|---|---|")
    for n in (int(x) for x in args.sizes.split(",")):
        for where, prefix in (
            ("MPICH, rankwire exec mpich.sif", ""),
            ("MPICH, host, `rankwire pmi bridge`", "host "),
            ("MPICH, --container-image=mpich.sif", "mpich plugin "),
        ):
            m, b = launches[(n, prefix + "matched")], launches[(n, prefix + "bridged")]
            print(f"| {n} | {where} | {m:.0f} | {b:.0f} | {b / m:.2f} |")
    print("\n| N | where | srun --mpi=pmix ms | srun --mpi=pmi2 + bridge ms | bridged / matched |")
    print("|---|---|---|---|---|")
    for n in (int(x) for x in args.sizes.split(",")):
        for where, prefix in (
            ("Open MPI, rankwire exec ompi.sif", "ompi "),
            ("Open MPI, --container-image=ompi.sif", "plugin "),
        ):
            m, b = launches[(n, prefix + "matched")], launches[(n, prefix + "bridged")]
            print(f"| {n} | {where} | {m:.0f} | {b:.0f} | {b / m:.2f} |")


if __name__ == "__main__":
    main()
