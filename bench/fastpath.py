"""The fast-path table (issue 17): rankwire against the C runtimes, in the same run, on
the same squashfs content (the SIF's own partition, copied out for Charliecloud).

1. Container start, as root and as the unprivileged test user:
     /bin/true                                   (the floor)
     ch-run app.sqfs -- /bin/true                (the peer: Charliecloud, squashfuse too)
     rankwire exec app.sif /bin/true              (the warm-up round leaves its exec plan:
                                                 the measured runs start in C)
     rankwire exec -B /etc:/opt/e --env A=1 app.sif /bin/true (the same, with options)
     rankwire exec --fabric tcp app.sif /bin/true (the host libfabric bound in, as on a
                                                 node with a fabric adapter: `auto` there;
                                                 its exec plan keyed on the fabric's files)
2. Joining a running instance: `rankwire exec instance://x /bin/true` vs bare `/bin/true`
   (the warm-up join plans in Python and leaves its plan: the measured ones join in C),
   and the Python CLI's own join, `rankwire-py exec instance://x /bin/true`.
3. MPICH hello (init + allreduce + finalize) at N ranks, one shared container:
     mpiexec.hydra -n N hello                    (bare, on the host)
     mpiexec.hydra -n N ch-run --join-ct=N --join-tag=T app.sqfs -- /opt/hello_mpich
     apptainer-mpirun -n N app.sif /opt/hello_mpich
4. Open MPI hello (PMIx): mpirun.openmpi vs `rankwire run --pmi pmix` vs
   `apptainer-mpirun -n N ompi.sif`; and mpirun.openmpi given `--mca pml ob1`, which our
   launches set on a node without a fabric adapter or GPU (`launcher/plan.py` PML): the
   peer on the same footing.
5. RSS: the launcher's own peak and its holder's at N = 16 (and 32) (while it sets up, in
   Python, and while it serves, as rankwire-holder), its init's, an idle instance's holder.
6. With --cpu (root), last: the CPU of each kind of process in the MPICH launches at the
   smallest N (perf record -a): the ranks, our launcher, holder and FUSE, hydra, ch-run.
Each group's rows take turns (interleaved) so that noise hits them alike; medians of
--repeat runs after one warm-up round (launches: --mpi-repeat at N >= 16, 16 / N times
as many below). `--png FILE` draws launch time vs N per launcher
and container start per runtime (matplotlib, installed into this venv when missing).

    .venv/bin/python bench/fastpath.py [--repeat 9] [--big] [--png fastpath.png] [--cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from harness.images import make_rootfs, make_world_readable  # noqa: E402
from harness.mpi import assert_hello, compile_hello, ompi_env  # noqa: E402
from harness.procs import kill_tree  # noqa: E402
from harness.users import User, ensure_unprivileged_user  # noqa: E402

BIN = Path(sys.executable).parent
RW, AMR = str(BIN / "rankwire"), str(BIN / "apptainer-mpirun")
OMPI_TREES = [
    "/usr/lib/x86_64-linux-gnu/openmpi",
    "/usr/lib/x86_64-linux-gnu/pmix2",
    "/etc/openmpi",
    "/usr/share/openmpi",
]
# ch-run wants the user and group databases inside the image.
ETC = {"/etc/passwd": "root:x:0:0:root:/root:/bin/sh\n", "/etc/group": "root:x:0:\n"}
Case = tuple[str, list[str]]
HANG_S = 60


def setup(png: bool, cpu: bool) -> None:
    """Charliecloud (a Debian package), for --cpu perf (linux-perf), and, for --png,
    matplotlib into this venv."""
    packages = ["charliecloud", *(["linux-perf"] if cpu else [])]
    subprocess.run([str(REPO / "tools/ensure-packages"), *packages], check=True)
    if cpu:  # perf may not work here (in a container, say): say so now, not minutes on
        with tempfile.TemporaryDirectory(prefix="fastpath-perf-") as tmp:
            tried = subprocess.run(
                [*PERF, "-o", f"{tmp}/perf.data", "--", "true"], capture_output=True, text=True
            )
        if tried.returncode != 0:
            raise SystemExit(f"--cpu: perf record -a fails here: {tried.stderr.strip()}")
    if png:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            subprocess.run(
                [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                 "matplotlib"],
                check=True,
            )  # fmt: skip


class Runner:
    """Runs argvs as one identity (root, or the test user without runuser's own cost)."""

    def __init__(self, user: Optional[User]) -> None:
        self.user = user
        env = ompi_env(dict(os.environ))
        # An installed package runs from compiled bytecode: let the warm-up round write it.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        if user is not None:
            env.update(USER=user.name, LOGNAME=user.name, HOME=user.home)
        else:
            env.setdefault("USER", "root")
        self.env = env

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen[str]:
        ids: dict[str, Any] = {}
        if self.user is not None:
            ids = {"user": self.user.uid, "group": self.user.gid, "extra_groups": []}
        return subprocess.Popen(argv, env=self.env, cwd="/tmp", text=True, **ids, **kw)

    def run(self, argv: list[str]) -> tuple[float, str]:
        """(wall ms, stdout) of one run; a run that hangs (mpirun.openmpi does, now and
        then, on 2 oversubscribed cores) is killed whole and run again."""
        for _ in range(3):
            t0 = time.perf_counter()
            proc = self.popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
            )
            try:
                out, err = proc.communicate(timeout=HANG_S)
                break
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid)
                proc.communicate()
                print(f"(hung {HANG_S} s, killed and run again: {' '.join(argv)})", flush=True)
        else:
            raise SystemExit(f"{' '.join(argv)} hung 3 times")
        elapsed = (time.perf_counter() - t0) * 1000
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{err}")
        return elapsed, out


def interleaved(
    runner: Runner, cases: list[Case], repeat: int, check: Callable[[str], object]
) -> dict[str, float]:
    """Median ms per case; the cases take turns, the first round only warms caches."""
    times: dict[str, list[float]] = {label: [] for label, _ in cases}
    for i in range(repeat + 1):
        for label, argv in cases:
            ms, out = runner.run(argv)
            check(out)
            if i:
                times[label].append(ms)
    return {label: statistics.median(t) for label, t in times.items()}


def memory_of(pid: int) -> Optional[tuple[int, int]]:
    """(peak RSS, PSS now) of a live process in KiB, None once it is gone or a zombie.
    RSS counts the pages a forked holder shares with its parent in full; PSS divides
    shared pages among their users."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    fields = {
        line.split(":")[0]: int(line.split()[1])
        for line in (*status.splitlines(), *rollup.splitlines())
        if line.startswith(("VmHWM:", "Pss:"))
    }
    if len(fields) < 2:
        return None
    return fields["VmHWM"], fields["Pss"]


def container_processes() -> dict[int, str]:
    """{pid: "holder" | "holder setup" | "init"}: holders while they set up (the Python
    process forked from the CLI) and once they serve (rankwire-holder, runtime/holdserve.c,
    exec'd in its place), and their PID namespaces' inits."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            comm = (proc / "comm").read_text().strip() if proc.name.isdigit() else ""
            if comm == "rankwire-holder":
                serving = os.readlink(proc / "exe").endswith("/rankwire-holder")
                found[int(proc.name)] = "holder" if serving else "holder setup"
            elif comm == "rankwire-init":
                found[int(proc.name)] = "init"
        except OSError:
            pass
    return found


def peak_memory(runner: Runner, argv: list[str]) -> dict[str, tuple[int, int]]:
    """{"launcher"|"holder setup"|"holder"|"init": (peak RSS, peak PSS) in KiB} over one
    run, polled."""
    before = set(container_processes())
    proc = runner.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peaks: dict[str, tuple[int, int]] = {}
    while proc.poll() is None:
        ours = {pid: who for pid, who in container_processes().items() if pid not in before}
        for pid, who in {proc.pid: "launcher", **ours}.items():
            got = memory_of(pid)
            if got is not None:
                old = peaks.get(who, (0, 0))
                peaks[who] = (max(old[0], got[0]), max(old[1], got[1]))
        time.sleep(0.002)
    return peaks


def build_images(work: Path) -> dict[str, Path]:
    """The harness's MPICH and Open MPI images (as tests/conftest.py builds them), the
    MPICH one with /etc/passwd and /etc/group, and its squashfs partition as app.sqfs."""
    from rankwire.runtime.build import build_image
    from rankwire.runtime.sif_read import SifImage

    (work / "bin").mkdir()
    progs = compile_hello(REPO / "examples", work / "bin")
    root = make_rootfs(
        work / "rootfs",
        binaries=[str(progs.hello_mpich)],
        trees=["/usr/lib/x86_64-linux-gnu/ucx"],
        files=ETC,
    )
    (root / "opt").mkdir()
    shutil.copy2(progs.hello_mpich, root / "opt/hello_mpich")
    build_image(work / "app.sif", root)
    with SifImage.open(work / "app.sif") as sif, open(work / "app.sqfs", "wb") as out:
        for chunk in sif.iter_object(sif.primary_partition()):
            out.write(chunk)
    oroot = make_rootfs(
        work / "ompi-rootfs",
        binaries=[str(progs.hello_ompi)],
        trees=[t for t in OMPI_TREES if os.path.exists(t)],
    )
    (oroot / "opt").mkdir()
    shutil.copy2(progs.hello_ompi, oroot / "opt/hello_ompi")
    build_image(work / "ompi.sif", oroot)
    shutil.rmtree(root)
    shutil.rmtree(oroot)
    make_world_readable(work)
    return {
        "sif": work / "app.sif",
        "sqfs": work / "app.sqfs",
        "osif": work / "ompi.sif",
        "hello": progs.hello_mpich,
        "ohello": progs.hello_ompi,
    }


def row(label: str, ms: float, base: float, note: str = "") -> None:
    print(f"| {label} | {ms:.0f} | {ms / base:.2f} | {note} |", flush=True)


def container_start(
    runners: dict[str, Runner], img: dict[str, Path], repeat: int, res: dict[str, Any]
) -> None:
    print(f"\n## Container start, `/bin/true`, medians of {repeat}\n")
    print("| who: command | ms | ratio to ch-run | |\n|---|---|---|---|")
    for who, runner in runners.items():
        cases: list[Case] = [
            ("/bin/true", ["/bin/true"]),
            ("ch-run app.sqfs -- /bin/true", ["ch-run", str(img["sqfs"]), "--", "/bin/true"]),
            ("rankwire exec app.sif /bin/true", [RW, "exec", str(img["sif"]), "/bin/true"]),
            # options: the exec plan of exactly these words
            ("rankwire exec -B /etc:/opt/e --env A=1 app.sif /bin/true",
             [RW, "exec", "-B", "/etc:/opt/e", "--env", "A=1", str(img["sif"]), "/bin/true"]),
            # what a node with a fabric adapter runs (`--fabric auto` binds its provider)
            ("rankwire exec --fabric tcp app.sif /bin/true",
             [RW, "exec", "--fabric", "tcp", str(img["sif"]), "/bin/true"]),
        ]  # fmt: skip
        got = interleaved(runner, cases, repeat, lambda out: None)
        peer = got["ch-run app.sqfs -- /bin/true"]
        for label, ms in got.items():
            row(f"{who}: {label}", ms, peer)
        res["start"][who] = got


def joining(
    runners: dict[str, Runner], img: dict[str, Path], repeat: int, res: dict[str, Any]
) -> None:
    print(f"\n## Joining a running instance, medians of {repeat}\n")
    print("| who: command | ms | ratio to bare | over bare |\n|---|---|---|---|")
    for who, runner in runners.items():
        name = f"fastpath{os.getpid()}"
        _, said = runner.run([RW, "instance", "start", str(img["sif"]), name])
        holder = int(said.split("holder pid ")[1].split(",")[0])
        try:
            cases: list[Case] = [
                ("/bin/true", ["/bin/true"]),
                (f"rankwire exec instance://{name} /bin/true",
                 [RW, "exec", f"instance://{name}", "/bin/true"]),
                (f"rankwire-py exec instance://{name} /bin/true",
                 [RW + "-py", "exec", f"instance://{name}", "/bin/true"]),
            ]  # fmt: skip
            got = interleaved(runner, cases, repeat, lambda out: None)
            held = memory_of(holder)
        finally:
            runner.run([RW, "instance", "stop", name])
        bare = got["/bin/true"]
        for label, ms in got.items():
            row(f"{who}: {label}", ms, bare, f"+{ms - bare:.0f} ms")
        res["join"][who] = got
        res["instance_holder_kib"] = held or (0, 0)


def runs_for(n: int, repeat: int) -> int:
    """Launch runs per row at N ranks: `repeat` at N >= 16, more below, where a run is
    short and a 20 ms change is within one run's noise (28 at N = 4 for 7)."""
    return max(repeat, repeat * 16 // n)


def medians_of(sizes: list[int], repeat: int) -> str:
    runs = " / ".join(str(runs_for(n, repeat)) for n in sizes)
    return f"medians of {runs} runs (N = {' / '.join(map(str, sizes))})"


def mpich(runner: Runner, img: dict[str, Path], sizes: list[int], repeat: int,
          res: dict[str, Any]) -> None:  # fmt: skip
    print(f"\n## MPICH hello, one container per node, {medians_of(sizes, repeat)}\n")
    print("| N | launcher | ms | ratio to ch hybrid | ratio to bare |\n|---|---|---|---|---|")
    for n in sizes:
        tag = f"--join-tag=fp{os.getpid()}"
        hybrid = ["mpiexec.hydra", "-n", str(n), "ch-run", f"--join-ct={n}", tag,
                  str(img["sqfs"]), "--", "/opt/hello_mpich"]  # fmt: skip
        cases: list[Case] = [
            ("bare mpiexec.hydra", ["mpiexec.hydra", "-n", str(n), str(img["hello"])]),
            ("mpiexec.hydra + ch-run --join", hybrid),
            ("apptainer-mpirun app.sif", [AMR, "-n", str(n), str(img["sif"]), "/opt/hello_mpich"]),
        ]
        got = interleaved(runner, cases, runs_for(n, repeat), lambda out, n=n: assert_hello(out, n))
        bare, peer = got["bare mpiexec.hydra"], got["mpiexec.hydra + ch-run --join"]
        for label, ms in got.items():
            print(f"| {n} | {label} | {ms:.0f} | {ms / peer:.2f} | {ms / bare:.2f} |", flush=True)
        res["mpich"][n] = got


def ompi(runner: Runner, img: dict[str, Path], sizes: list[int], repeat: int,
         res: dict[str, Any]) -> None:  # fmt: skip
    print(f"\n## Open MPI hello (PMIx), {medians_of(sizes, repeat)}\n")
    print("| N | launcher | ms | ratio to mpirun.openmpi | to mpirun.openmpi --mca pml ob1 |")
    print("|---|---|---|---|---|")
    for n in sizes:
        cases: list[Case] = [
            ("mpirun.openmpi",
             ["mpirun.openmpi", "-n", str(n), "--oversubscribe", str(img["ohello"])]),
            ("mpirun.openmpi --mca pml ob1",
             ["mpirun.openmpi", "-n", str(n), "--oversubscribe", "--mca", "pml", "ob1",
              str(img["ohello"])]),
            ("rankwire run --pmi pmix", [RW, "run", "--pmi", "pmix", "-n", str(n),
                                         str(img["ohello"])]),
            ("apptainer-mpirun ompi.sif", [AMR, "-n", str(n), str(img["osif"]),
                                           "/opt/hello_ompi"]),
        ]  # fmt: skip
        got = interleaved(runner, cases, runs_for(n, repeat), lambda out, n=n: assert_hello(out, n))
        peer, same = got["mpirun.openmpi"], got["mpirun.openmpi --mca pml ob1"]
        for label, ms in got.items():
            print(f"| {n} | {label} | {ms:.0f} | {ms / peer:.2f} | {ms / same:.2f} |", flush=True)
        res["ompi"][n] = got


def memory(runner: Runner, img: dict[str, Path], sizes: list[int], res: dict[str, Any]) -> None:
    print("\n## Memory, one run each: peak RSS (VmHWM) and peak PSS\n")
    print("| N | process | RSS MiB | PSS MiB |\n|---|---|---|---|")
    for n in sizes:
        peaks = peak_memory(runner, [AMR, "-n", str(n), str(img["sif"]), "/opt/hello_mpich"])
        for who, label in (("launcher", "apptainer-mpirun (the launcher itself)"),
                           ("holder setup", "its holder, setting up (Python, forked)"),
                           ("holder", "its holder (rankwire-holder)"),
                           ("init", "its PID namespace's init")):  # fmt: skip
            if who not in peaks:  # a kept launch's holder is rankwire-holder from its start
                continue
            rss, pss = peaks[who]
            print(f"| {n} | {label} | {rss / 1024:.1f} | {pss / 1024:.1f} |", flush=True)
    rss, pss = res["instance_holder_kib"]
    print(f"| - | an idle instance's holder | {rss / 1024:.1f} | {pss / 1024:.1f} |")


# What each process of a launch is, for `cpu_of` (perf names a process by its comm: the
# first 15 bytes of its program's name, or what it set).
KINDS = {
    "hello_mpich": "ranks",
    "apptainer-mpiru": "launcher (front end, Python)",
    "rankwire-py": "launcher (front end, Python)",
    "rankwire-holder": "holder, FUSE",
    "rankwire-init": "holder, FUSE",
    "rankwire-watch": "holder, FUSE",
    "squashfuse_ll": "holder, FUSE",
    "mpiexec.hydra": "mpiexec.hydra, its proxy",
    "hydra_pmi_proxy": "mpiexec.hydra, its proxy",
    "ch-run": "ch-run (its FUSE too)",
}
CPU_HZ = 4000
PERF = ["perf", "record", "-q", "-B", "-N", "-e", "cpu-clock", "-F", str(CPU_HZ), "-a"]


def cpu_of(runner: Runner, argv: list[str], data: Path) -> dict[str, float]:
    """One run under `perf record -a` (cpu-clock at CPU_HZ): the CPU ms of each kind of
    process (KINDS; "other": anything else of the machine meanwhile, perf's own too)."""
    runner.run([*PERF, "-o", str(data), "--", *argv])
    out = subprocess.run(
        ["perf", "report", "-i", str(data), "--stdio", "--sort", "comm", "-F", "sample,comm"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    kinds: dict[str, float] = {}
    for line in out.splitlines():
        samples, _, comm = line.strip().partition(" ")
        if line.startswith("#") or not samples.isdigit() or comm.strip() in ("swapper", ""):
            continue  # (swapper: the idle CPUs)
        kind = KINDS.get(comm.strip(), "other")
        kinds[kind] = kinds.get(kind, 0.0) + int(samples) * 1000 / CPU_HZ
    return kinds


def cpu(runner: Runner, img: dict[str, Path], n: int, repeat: int) -> None:
    """Where the CPU of a launch at N ranks goes (goal 3's profile): what each kind of
    process adds to the work of the node's cores, which the ranks keep busy."""
    runs = max(1, runs_for(n, repeat) // 2)
    print(f"\n## CPU of a launch, MPICH hello N = {n} (perf record -a), medians of {runs} runs\n")
    tag = f"--join-tag=fp{os.getpid()}"
    cases: list[Case] = [
        ("bare mpiexec.hydra", ["mpiexec.hydra", "-n", str(n), str(img["hello"])]),
        ("mpiexec.hydra + ch-run --join", ["mpiexec.hydra", "-n", str(n), "ch-run",
         f"--join-ct={n}", tag, str(img["sqfs"]), "--", "/opt/hello_mpich"]),
        ("apptainer-mpirun app.sif", [AMR, "-n", str(n), str(img["sif"]), "/opt/hello_mpich"]),
    ]  # fmt: skip
    got: dict[str, list[dict[str, float]]] = {label: [] for label, _ in cases}
    with tempfile.TemporaryDirectory(prefix="fastpath-perf-") as tmp:
        for i in range(runs + 1):  # the first round warms caches
            for label, argv in cases:
                kinds = cpu_of(runner, argv, Path(tmp) / "perf.data")
                if i:
                    kinds["the launch"] = sum(v for k, v in kinds.items() if k != "other")
                    got[label].append(kinds)
    columns = ["the launch", *dict.fromkeys(KINDS.values()), "other"]
    print("| launch | " + " | ".join(f"{c} ms" for c in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for label, rows in got.items():
        cells = [statistics.median(r.get(c, 0.0) for r in rows) for c in columns]
        print(f"| {label} | " + " | ".join(f"{c:.0f}" for c in cells) + " |", flush=True)


def draw(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (launch, start) = plt.subplots(1, 2, figsize=(11, 4.2))
    for group, style, mpi in (("mpich", "-o", "MPICH"), ("ompi", "--s", "Open MPI")):
        sizes = sorted(res[group])
        for label in res[group][sizes[0]]:
            times = [res[group][n][label] for n in sizes]
            launch.plot(sizes, times, style, label=f"{mpi}: {label}")
    launch.set(xlabel="ranks (N)", ylabel="launch + hello, ms (median)", title="Job launch")
    launch.set_xticks(sorted({*res["mpich"], *res["ompi"]}))
    launch.legend(fontsize=7)
    labels, values = [], []
    for who, got in res["start"].items():
        for label, ms in got.items():
            extra = " + fabric" if "--fabric" in label else " + options" if " -B " in label else ""
            labels.append(f"{who}: {label.split(' ')[0]}{extra}")
            values.append(ms)
    for who, got in res["join"].items():
        labels.append(f"{who}: join instance")
        values.append(got[next(k for k in got if k.startswith("rankwire"))])
    start.barh(labels, values)
    start.invert_yaxis()
    start.set(xlabel="ms (median)", title="Container start, /bin/true")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nwrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=9, help="container start runs per row")
    ap.add_argument("--mpi-repeat", type=int, default=7,
                    help="launch runs per row at N >= 16 (more below: runs_for)")  # fmt: skip
    ap.add_argument("--big", action="store_true", help="also N = 32 (launch and RSS)")
    ap.add_argument("--png", type=Path, help="draw the scaling picture into this file")
    ap.add_argument(
        "--cpu", action="store_true", help="also each process's CPU in a launch (root; perf)"
    )
    args = ap.parse_args()
    if args.cpu and os.getuid() != 0:
        ap.error("--cpu needs root (perf record -a)")
    setup(bool(args.png), args.cpu)
    sizes = [4, 16, 32] if args.big else [4, 16]
    work = Path(tempfile.mkdtemp(prefix="fastpath-bench-"))
    work.chmod(0o755)
    res: dict[str, Any] = {"start": {}, "join": {}, "mpich": {}, "ompi": {}}
    made: list[Path] = []  # ch-run's mount point dirs, /var/tmp/$USER.ch/mnt, if it makes them
    try:
        img = build_images(work)
        # Facts read from a file changed in the last 2 s are not kept (fabric/factcache.py
        # SETTLE_NS): measure images as a user runs them, not in the second they were built.
        time.sleep(2.5)
        me = Runner(None)
        runners = {"root" if os.getuid() == 0 else "user": me}
        if os.getuid() == 0:
            runners["user"] = Runner(ensure_unprivileged_user())
        made = [Path(f"/var/tmp/{r.env['USER']}.ch") for r in runners.values()]
        made = [d for d in made if not d.exists()]
        t0 = time.monotonic()
        container_start(runners, img, args.repeat, res)
        joining(runners, img, args.repeat, res)
        mpich(me, img, sizes, args.mpi_repeat, res)
        ompi(me, img, sizes, args.mpi_repeat, res)
        memory(me, img, sizes[1:], res)
        if args.cpu:  # last: perf adds to the environment a kept plan is keyed on (PATH,
            # PERF_BUILDID_DIR…): the launches of these words after it would plan anew once
            cpu(me, img, sizes[0], args.mpi_repeat)
        print(f"\n(cpus: {os.cpu_count()}, {time.monotonic() - t0:.0f} s)")
        if args.png:
            draw(res, args.png)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for d in made:
            with contextlib.suppress(OSError):
                os.rmdir(d / "mnt")
                os.rmdir(d)


if __name__ == "__main__":
    main()
