"""Multi-node MPI through Slurm: a slurmctld and 2..4 slurmd in network namespaces.

Every job runs 4 ranks on 2 nodes (`-N2 -n4`, block distribution) of a program that swaps
XNODE_BYTES with the rank on the other node, checks every byte, then prints the hello line
(harness.mpi.assert_hello). Each test checks that the ranks reported different node host
names (from inside the container for container paths) and that at least the payload went
over each node's veth (the host-side byte counters).

Known upstream flakiness, handled in the open:
- Debian MPICH 4.0.2 + UCX 1.13.1 over TCP sometimes hangs in MPI_Finalize (one rank
  spins in ucp_worker_progress closing its endpoints while the others already block in the
  PMI barrier; openucx/ucx#8738); no UCX_TLS/UCX_NET_DEVICES/rendezvous setting avoided it
  here. A job whose every rank reported correct results and that then does not end within
  MPICH_FINALIZE_GRACE is killed and the test is xfailed with that reason (after all its other
  checks passed); any other failure fails the test.
- Open MPI 4.1.4's default ob1/tcp path rarely segfaults in MPI_Init: we use
  pml=cm, mtl=ofi with libfabric's tcp provider (OMPI_TCP below).

Paths: srun of host binaries; `srun ... rankwire exec --share rankwire-%j.%s IMG`; and
`apptainer-mpirun` inside `salloc` and `sbatch` (it delegates to srun). Open MPI through
apptainer-mpirun needs its `--pmi pmix` (skipped where the launcher lacks it). The SPANK
plugin does not exist yet: no `srun --container...` rows.

The `slurm_multinode` fixture is module-scoped here; parametrize it indirectly for another
node count (see test_four_nodes). Another test module can reuse it with
`from test_multinode import slurm_multinode` or by moving it to conftest.py.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import pytest

from harness.images import make_world_readable
from harness.mpi import HELLO_RE, assert_hello, ompi_env
from harness.multinode import (
    MPI_TREES,
    XNODE_BYTES,
    MultiNodeCluster,
    XnodePrograms,
    build_xnode_image,
    compile_xnode,
)
from harness.oci import push_layout, umoci_image
from harness.registry import Registry, running_registry
from harness.slurm import HarnessError
from harness.spank import SpankInstall
from harness.users import User

pytestmark = [pytest.mark.multinode, pytest.mark.slurm, pytest.mark.mpi]

SHARE = "rankwire-%j.%s"
JOB_TIMEOUT = 90.0  # seconds for a whole job (a normal one takes 1-3 s)
# Every rank reported, the job still runs after this: a hang. Open MPI's is a failure, so
# it gets time to spare; MPICH's is the known UCX one (xfail), and a healthy MPICH job ends
# within a second of its last line, so waiting longer only makes each hang cost more.
FINALIZE_GRACE = 8.0
MPICH_FINALIZE_GRACE = 3.0
MPICH_HANG = (
    "MPICH 4.0.2/UCX 1.13.1 hung in MPI_Finalize over TCP after every rank reported "
    "correct results (openucx/ucx#8738); job killed"
)
OMPI_TCP = {
    "OMPI_MCA_pml": "cm",
    "OMPI_MCA_mtl": "ofi",
    "OMPI_MCA_mtl_ofi_provider_include": "tcp",
    "FI_PROVIDER": "tcp",
}


# -- fixtures ------------------------------------------------------------------------------
def _shared_for(user: User) -> list[Path]:
    """What jobs need that may live under the host's /tmp (private on every node)."""
    dirs = [Path(sys.prefix)]
    if user.bindir:
        dirs.append(Path(user.bindir).parent)
    return dirs


@pytest.fixture(scope="module")
def slurm_multinode(
    request: pytest.FixtureRequest, shared_dir: Path, unprivileged_user: User
) -> Iterator[MultiNodeCluster]:
    """A Slurm cluster of N nodes in network namespaces (N = 2, or indirect param 1..4)."""
    if os.getuid() != 0:
        pytest.skip("the multi-node cluster needs root (netns, bridge, slurmd)")
    nodes = getattr(request, "param", 2)
    cluster = MultiNodeCluster(nodes, shared=[shared_dir, *_shared_for(unprivileged_user)])
    try:
        cluster.start()
    except HarnessError as err:
        pytest.fail(f"multi-node cluster did not start: {err}")
    try:
        yield cluster
    finally:
        cluster.stop()
    assert cluster.leftovers() == []


@pytest.fixture(scope="module")
def xnode(shared_dir: Path) -> XnodePrograms:
    return compile_xnode(shared_dir / "multinode")


@pytest.fixture(scope="module")
def xnode_image(shared_dir: Path, xnode: XnodePrograms) -> Path:
    return build_xnode_image(shared_dir / "multinode", xnode)


@pytest.fixture(scope="module")
def xnode_registry(
    slurm_multinode: MultiNodeCluster, shared_dir: Path, xnode: XnodePrograms
) -> Iterator[tuple[Registry, str]]:
    """A registry on the bridge (where the nodes reach it) holding the xnode image as an
    OCI image made by umoci: (registry, docker:// reference)."""
    from harness.images import make_rootfs

    def layer(root: Path) -> None:
        made = make_rootfs(root.parent / "made", binaries=[str(xnode.mpich), str(xnode.ompi)],
                           trees=[t for t in MPI_TREES if Path(t).exists()])  # fmt: skip
        shutil.copytree(made, root, symlinks=True, dirs_exist_ok=True)
        shutil.rmtree(made)
        (root / "opt").mkdir(exist_ok=True)
        for prog in (xnode.mpich, xnode.ompi):
            shutil.copy2(prog, root / "opt" / prog.name)

    work = shared_dir / "multinode" / "oci"
    with running_registry(work.parent, host=slurm_multinode.host_ip) as reg:
        image = umoci_image(work, "xnode", [layer])
        yield reg, push_layout(image.path, image.tag, "tests/xnode:1", registry=reg)


@pytest.fixture
def node_cache() -> Iterator[str]:
    """RANKWIRE_CACHEDIR under /tmp: private to each node (and to the submit host)."""
    path = f"/tmp/rankwire-test-cache-{os.urandom(4).hex()}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def jobdir(shared_dir: Path, request: pytest.FixtureRequest) -> Path:
    """A directory every node sees and the job user may write (sbatch output)."""
    d = shared_dir / "multinode" / "jobs" / request.node.name.replace("/", "_")
    d.mkdir(parents=True)
    d.chmod(0o777)
    return d


@pytest.fixture(autouse=True)
def _reap(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test, no job or job process of the box may remain (hangs are killed)."""
    yield
    if "slurm_multinode" in request.fixturenames:
        request.getfixturevalue("slurm_multinode").reap()


# -- running a job -------------------------------------------------------------------------
@dataclasses.dataclass
class Job:
    returncode: Optional[int]  # None: we killed it
    stdout: str  # the ranks' output (srun/salloc stdout, or the sbatch output file)
    stderr: str
    hung_after_output: bool  # every rank reported, then it did not end
    seconds: float


def _job_state(cluster: MultiNodeCluster, jobid: str) -> tuple[str, int]:
    """(JobState, exit code) of a batch job, from `scontrol -o show job`."""
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", jobid],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return fields.get("JobState", "GONE"), int(fields.get("ExitCode", "0:0").split(":")[0])


ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED"}


def run_job(
    cluster: MultiNodeCluster,
    user: User,
    argv: list[str],
    size: int,
    tmp: Path,
    env: Optional[dict[str, str]] = None,
    output: Optional[Path] = None,
    mpich: bool = False,
) -> Job:
    """Run `argv` as `user` and wait for the job; kill it after JOB_TIMEOUT, or a grace
    (MPICH_FINALIZE_GRACE for an MPICH job, else FINALIZE_GRACE) after all `size` hello
    lines appeared.

    With `output`, argv is an `sbatch --parsable ...` whose job writes there: then we
    follow the job's state (sbatch --wait polls with seconds-long sleeps).
    """
    env = dict(env or cluster.env)
    grace = MPICH_FINALIZE_GRACE if mpich else FINALIZE_GRACE
    out, err = tmp / "stdout", tmp / "stderr"
    t0 = time.monotonic()
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(
            user.argv(argv),
            stdout=fo,
            stderr=fe,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd="/tmp",
            start_new_session=True,
        )
    source = output or out
    ranks_done: Optional[float] = None
    jobid: Optional[str] = None
    returncode: Optional[int] = None
    hung = False
    while True:
        if jobid is None:
            rc = proc.poll()
            if rc is not None and (output is None or rc != 0):
                returncode = rc if rc >= 0 else None
                break
            if rc is not None:
                jobid = out.read_text().strip().split(";")[0]
        else:
            state, code = _job_state(cluster, jobid)
            if state not in ACTIVE:
                returncode = code if state == "COMPLETED" or code else 1
                break
        now = time.monotonic()
        text = source.read_text(errors="replace") if source.exists() else ""
        if ranks_done is None and len(HELLO_RE.findall(text)) >= size:
            ranks_done = now
        if (ranks_done is not None and now - ranks_done > grace) or (now - t0 > JOB_TIMEOUT):
            hung = ranks_done is not None
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            cluster.reap(grace=1.0)  # a hung rank ends by SIGKILL anyway: no waiting on it
            break
        time.sleep(0.1)
    stdout = source.read_text(errors="replace") if source.exists() else ""
    return Job(returncode, stdout, err.read_text(errors="replace"), hung, time.monotonic() - t0)


def check_job(
    cluster: MultiNodeCluster,
    job: Job,
    before: dict[str, tuple[int, int]],
    nodes: int,
    size: int,
    mpich: bool,
) -> None:
    """All ranks right, on `nodes` different nodes, payload over every veth; then either
    a clean exit with nothing left in the nodes, or (MPICH only) xfail on the known hang."""
    if job.returncode is None and not job.hung_after_output:
        pytest.fail(f"job timed out after {job.seconds:.0f}s\n{job.stdout}\n{job.stderr}")
    if not job.hung_after_output:
        assert job.returncode == 0, f"{job.stdout}\n{job.stderr}"
    hosts = assert_hello(job.stdout, size)
    # e.g. "PMIX ERROR ... gds_ds12_lock": the container cannot see Slurm's PMIx dirs
    assert "PMIX ERROR" not in job.stdout + job.stderr, job.stdout + job.stderr
    per_node = size // nodes
    assert sorted(set(hosts)) == sorted(cluster.node_names[:nodes]), hosts
    assert all(hosts.count(h) == per_node for h in set(hosts)), hosts
    for rank, host in enumerate(hosts):
        assert hosts[(rank + size // 2) % size] != host, f"rank {rank}'s peer is local: {hosts}"
    after = cluster.net_bytes()
    for node in set(hosts):
        sent = after[node][0] - before[node][0]
        received = after[node][1] - before[node][1]
        need = per_node * XNODE_BYTES
        assert sent >= need and received >= need, (
            f"{node}: sent {sent} / received {received} bytes over its veth, "
            f"the MPI payload alone is {need}"
        )
    if job.hung_after_output:
        if not mpich:
            pytest.fail(f"Open MPI job hung after all ranks reported\n{job.stderr}")
        pytest.xfail(MPICH_HANG)
    deadline = time.monotonic() + 10
    while cluster.strays() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cluster.strays() == [], "job processes left on the nodes"


def _env(cluster: MultiNodeCluster, ompi: bool) -> dict[str, str]:
    env = cluster.env
    return ompi_env({**env, **OMPI_TCP}) if ompi else env


# -- the tests -----------------------------------------------------------------------------
@pytest.mark.parametrize("mpi", ["mpich", "ompi"])
def test_host_ranks_on_two_nodes(
    slurm_multinode: MultiNodeCluster,
    xnode: XnodePrograms,
    runner: User,
    mpi: str,
    tmp_path: Path,
) -> None:
    """srun -N2 -n4 of host binaries: MPICH over --mpi=pmi2, Open MPI over --mpi=pmix."""
    prog = xnode.mpich if mpi == "mpich" else xnode.ompi
    pmi = "pmi2" if mpi == "mpich" else "pmix"
    before = slurm_multinode.net_bytes()
    job = run_job(
        slurm_multinode,
        runner,
        ["srun", f"--mpi={pmi}", "-N2", "-n4", str(prog)],
        4,
        tmp_path,
        env=_env(slurm_multinode, mpi == "ompi"),
        mpich=mpi == "mpich",
    )
    check_job(slurm_multinode, job, before, 2, 4, mpi == "mpich")


@pytest.mark.parametrize("mpi", ["mpich", "ompi", "mpich-bridged", "ompi-bridged"])
def test_srun_rankwire_exec_on_two_nodes(
    slurm_multinode: MultiNodeCluster,
    xnode_image: Path,
    runner: User,
    mpi: str,
    tmp_path: Path,
) -> None:
    """srun -N2 -n4 rankwire exec --share rankwire-%j.%s IMG: one container per node.
    mpich-bridged: MPICH (PMI-1 only) under --mpi=pmix, ompi-bridged: Open MPI (PMIx only)
    under --mpi=pmi2, each through the tasks' PMI bridges."""
    pmi = "pmi2" if mpi in ("mpich", "ompi-bridged") else "pmix"
    mpi = mpi.split("-")[0]
    before = slurm_multinode.net_bytes()
    job = run_job(
        slurm_multinode,
        runner,
        [
            "srun",
            f"--mpi={pmi}",
            "-N2",
            "-n4",
            "rankwire",
            "exec",
            "--share",
            SHARE,
            str(xnode_image),
            f"/opt/xnode_{mpi}",
        ],
        4,
        tmp_path,
        env=_env(slurm_multinode, mpi == "ompi"),
        mpich=mpi == "mpich",
    )
    check_job(slurm_multinode, job, before, 2, 4, mpi == "mpich")


def test_host_mpi_injected_on_two_nodes(
    slurm_multinode: MultiNodeCluster,
    xnode_image: Path,
    runner: User,
    tmp_path: Path,
    shared_dir: Path,
) -> None:
    """`--host-mpi`: the image's program (built with Debian's MPICH 4.0.2, UCX only) runs
    on PyPI's MPICH 5 wheel over libfabric's tcp provider; the 4 MiB exchange crosses the
    veths, and no MPICH 4/UCX hang in MPI_Finalize."""
    installed = Path(sys.prefix) / "opt" / "mpich"
    if not (installed / "lib" / "libmpi.so.12").exists():
        pytest.skip(f"no MPICH wheel at {installed}")
    wheel = shared_dir / "mpich-wheel"  # where every user and node can read it
    if not wheel.exists():
        shutil.copytree(installed, wheel, symlinks=True)
        make_world_readable(wheel)
    before = slurm_multinode.net_bytes()
    job = run_job(
        slurm_multinode,
        runner,
        ["srun", "--mpi=pmi2", "-N2", "-n4", "rankwire", "exec", "--share", SHARE,
         "--host-mpi", str(wheel), "--env", "MPICH_CH4_NETMOD=ofi", "--env", "FI_PROVIDER=tcp",
         str(xnode_image), "/opt/xnode_mpich"],
        4,
        tmp_path,
    )  # fmt: skip
    check_job(slurm_multinode, job, before, 2, 4, False)


@pytest.mark.parametrize("mpi", ["mpich", "ompi", "mpich-bridged", "ompi-bridged"])
def test_spank_plugin_on_two_nodes(
    slurm_multinode: MultiNodeCluster,
    spank_install: SpankInstall,
    xnode_image: Path,
    runner: User,
    mpi: str,
    tmp_path: Path,
) -> None:
    """srun -N2 -n4 --container-image=IMG: the SPANK plugin starts one container per node,
    the tasks join it, and nothing stays on the nodes afterwards. mpich-bridged: under
    --mpi=pmix, ompi-bridged: under --mpi=pmi2, each task's PMI bridge started by the shim."""
    pmi = "pmi2" if mpi in ("mpich", "ompi-bridged") else "pmix"
    mpi = mpi.split("-")[0]
    plugstack = slurm_multinode.conf.parent / "plugstack.conf"
    plugstack.write_text(spank_install.plugstack_line())
    try:
        before = slurm_multinode.net_bytes()
        argv = ["srun", f"--mpi={pmi}", "-N2", "-n4", f"--container-image={xnode_image}"]
        job = run_job(
            slurm_multinode,
            runner,
            [*argv, f"/opt/xnode_{mpi}"],
            4,
            tmp_path,
            env=_env(slurm_multinode, mpi == "ompi"),
            mpich=mpi == "mpich",
        )
        check_job(slurm_multinode, job, before, 2, 4, mpi == "mpich")
    finally:
        plugstack.write_text("")


def _launcher_pmi(mpi: str) -> str:
    """`apptainer-mpirun --pmi` for the MPI of the ranks (pmix only where it exists)."""
    from rankwire.launcher.plan import PMI_CHOICES

    pmi = "pmi2" if mpi == "mpich" else "pmix"
    if pmi not in PMI_CHOICES:
        pytest.skip("apptainer-mpirun has no --pmi pmix (Open MPI speaks only PMIx)")
    return pmi


@pytest.mark.parametrize("mpi", ["mpich", "ompi"])
def test_apptainer_mpirun_in_salloc(
    slurm_multinode: MultiNodeCluster,
    xnode_image: Path,
    runner: User,
    mpi: str,
    tmp_path: Path,
) -> None:
    """salloc -N2 -n4 apptainer-mpirun: delegates to srun --mpi=... rankwire exec."""
    pmi = _launcher_pmi(mpi)
    before = slurm_multinode.net_bytes()
    job = run_job(
        slurm_multinode,
        runner,
        ["salloc", "-N2", "-n4", "apptainer-mpirun", "-v", "--pmi", pmi, "-n", "4",
         str(xnode_image), f"/opt/xnode_{mpi}"],
        4,
        tmp_path,
        env=_env(slurm_multinode, mpi == "ompi"),
        mpich=mpi == "mpich",
    )  # fmt: skip
    assert f"delegating to srun --mpi={pmi} -n 4" in job.stderr, job.stderr
    assert "rankwire exec" in job.stderr, job.stderr
    check_job(slurm_multinode, job, before, 2, 4, mpi == "mpich")


@pytest.mark.parametrize("mpi", ["mpich", "ompi"])
def test_apptainer_mpirun_in_sbatch(
    slurm_multinode: MultiNodeCluster,
    xnode_image: Path,
    runner: User,
    mpi: str,
    tmp_path: Path,
    jobdir: Path,
) -> None:
    """sbatch -N2 -n4 whose batch script (on node1) runs apptainer-mpirun."""
    pmi = _launcher_pmi(mpi)
    out = jobdir / "job.out"
    before = slurm_multinode.net_bytes()
    script = f"hostname >&2; apptainer-mpirun -v --pmi {pmi} -n 4 {xnode_image} /opt/xnode_{mpi}"
    job = run_job(
        slurm_multinode,
        runner,
        ["sbatch", "--parsable", "-N2", "-n4", f"--output={out}", "--chdir=/tmp", "--wrap", script],
        4,
        tmp_path,
        env=_env(slurm_multinode, mpi == "ompi"),
        mpich=mpi == "mpich",
        output=out,
    )
    assert f"delegating to srun --mpi={pmi} -n 4" in job.stdout, job.stdout
    assert job.stdout.splitlines()[0] == "node1", job.stdout  # the batch host
    check_job(slurm_multinode, job, before, 2, 4, mpi == "mpich")


@pytest.mark.parametrize("slurm_multinode", [4], indirect=True)
def test_four_nodes(
    slurm_multinode: MultiNodeCluster,
    xnode_image: Path,
    tmp_path: Path,
) -> None:
    """A 4-node box: one rank per node, in containers, Open MPI over ofi/tcp."""
    assert slurm_multinode.node_states() == {f"node{k}": "idle" for k in range(1, 5)}
    assert slurm_multinode.timings["start"] < 10
    before = slurm_multinode.net_bytes()
    root = User("root", 0, 0, "/root")
    job = run_job(
        slurm_multinode,
        root,
        ["srun", "--mpi=pmix", "-N4", "-n4", "rankwire", "exec", "--share", SHARE,
         str(xnode_image), "/opt/xnode_ompi"],
        4,
        tmp_path,
        env=_env(slurm_multinode, True),
    )  # fmt: skip
    check_job(slurm_multinode, job, before, 4, 4, False)


def test_coexists_with_the_single_node_cluster(
    slurm_multinode: MultiNodeCluster, slurm_cluster
) -> None:
    """Both fixtures at once: each srun reaches its own cluster."""
    procs = [
        subprocess.Popen(
            ["srun", "-N", str(n), "hostname"],
            env=c.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for c, n in ((slurm_multinode, 2), (slurm_cluster, 1))
    ]
    (multi, merr), (single, serr) = (p.communicate(timeout=60) for p in procs)
    assert sorted(multi.split()) == ["node1", "node2"], merr
    assert single.split() == [slurm_cluster.nodename], serr


def test_stop_leaves_nothing_behind(shared_dir: Path, xnode_image: Path) -> None:
    """Stop while a job runs in containers on both nodes: no netns, link, process, mount
    or directory of the box may remain, and it is quick."""
    if os.getuid() != 0:
        pytest.skip("needs root")
    cluster = MultiNodeCluster(2, shared=[shared_dir, Path(sys.prefix)]).start()
    try:
        srun = subprocess.Popen(
            ["srun", "-N2", "-n2", "rankwire", "exec", "--share", SHARE, str(xnode_image),
             "sleep", "300"],
            env=cluster.env,
            cwd="/tmp",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            comms = [s.split()[1] for s in cluster.strays()]
            if comms.count("sleep") == 2 and "rankwire-holder" in comms:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"the job did not start: {cluster.strays()}")
        assert cluster.leftovers() != []
    finally:
        cluster.stop()
    srun.wait(10)  # killed by stop(): it carries our SLURM_CONF
    assert cluster.leftovers() == []
    assert cluster.timings["stop"] < 10
    assert not cluster.root.exists()


def test_cluster_up_loads_the_plugin(shared_dir: Path, xnode_image: Path, tmp_path: Path) -> None:
    """`make cluster-up` (harness/multinode.py up): the box's plugstack loads rankwire's
    plugin, so `srun --container-image=` works across its nodes by hand; `down` removes it
    all, the plugin's install included. PLUGIN=0 (--no-plugin) leaves it out."""
    if os.getuid() != 0:
        pytest.skip("needs root")
    tool = Path(__file__).resolve().parent / "harness" / "multinode.py"
    for plugin in (True, False):
        state = tmp_path / f"cluster-{plugin}.json"
        up = [sys.executable, str(tool), "up", "--state", str(state), "--shared", str(shared_dir)]
        started = subprocess.run(
            up + ([] if plugin else ["--no-plugin"]), capture_output=True, text=True, timeout=120
        )
        assert started.returncode == 0, started.stderr
        conf = Path(started.stdout.split("SLURM_CONF=")[1].split()[0])
        try:
            env = {**os.environ, "SLURM_CONF": str(conf)}
            proc = subprocess.run(
                ["srun", "-N2", "-n2", f"--container-image={xnode_image}", "sh", "-c",
                 "grep ^ID= /etc/os-release || echo host"],
                env=env, cwd="/tmp", capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            if plugin:
                assert proc.returncode == 0, proc.stderr
                assert proc.stdout.splitlines() == ["ID=rankwire-test"] * 2
            else:  # srun does not know the option without the plugin
                assert proc.returncode != 0
                assert "unrecognized option '--container-image" in proc.stderr, proc.stderr
        finally:
            down = subprocess.run(
                [sys.executable, str(tool), "down", "--state", str(state)],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
        assert down.returncode == 0, down.stderr
        assert not conf.parent.exists()


def test_apptainer_mpirun_with_a_docker_image_on_two_nodes(
    slurm_multinode: MultiNodeCluster,
    xnode_registry: tuple[Registry, str],
    node_cache: str,
    runner: User,
    tmp_path: Path,
) -> None:
    """salloc -N2 apptainer-mpirun docker://…: the launcher pulls (to read the image) and
    delegates the pinned digest; each node pulls it once into its own cache."""
    reg, ref = xnode_registry
    gets = reg.blob_gets()
    env = {**_env(slurm_multinode, True), "RANKWIRE_CACHEDIR": node_cache}
    before = slurm_multinode.net_bytes()
    job = run_job(
        slurm_multinode,
        runner,
        ["env", f"RANKWIRE_CACHEDIR={node_cache}", "salloc", "-N2", "-n4", "apptainer-mpirun",
         "-v", "--pmi", "pmix", "-n", "4", "--insecure", ref, "/opt/xnode_ompi"],
        4,
        tmp_path,
        env=env,
    )  # fmt: skip
    assert f"rankwire exec --insecure {ref}@sha256:" in job.stderr, job.stderr
    check_job(slurm_multinode, job, before, 2, 4, False)
    # config + 1 layer, fetched by the submit host and by each of the 2 nodes
    assert reg.blob_gets() - gets == 2 * 3


def test_spank_plugin_with_a_docker_image_on_two_nodes(
    slurm_multinode: MultiNodeCluster,
    spank_install: SpankInstall,
    xnode_registry: tuple[Registry, str],
    node_cache: str,
    runner: User,
    tmp_path: Path,
) -> None:
    """srun -N2 --container-image=docker://…: each node's check phase has the job user pull
    the image once into that node's cache; the job runs."""
    reg, ref = xnode_registry
    plugstack = slurm_multinode.conf.parent / "plugstack.conf"
    args = [f"helper={spank_install.helper}", f"registry_insecure={reg.netloc}"]
    plugstack.write_text(f"required {spank_install.plugin} {' '.join(args)}\n")
    gets = reg.blob_gets()
    try:
        before = slurm_multinode.net_bytes()
        env = {**_env(slurm_multinode, True), "RANKWIRE_CACHEDIR": node_cache}
        job = run_job(
            slurm_multinode,
            runner,
            ["srun", "--mpi=pmix", "-N2", "-n4", f"--container-image={ref}", "/opt/xnode_ompi"],
            4,
            tmp_path,
            env=env,
        )
        check_job(slurm_multinode, job, before, 2, 4, False)
    finally:
        plugstack.write_text("")
    assert reg.blob_gets() - gets == 2 * 2  # config + 1 layer, once on each node
