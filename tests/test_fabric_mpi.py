"""Real MPI through libfabric in a container: Debian Open MPI 4.1 with pml cm / mtl ofi
over the tcp provider, launched by the host's mpirun.openmpi, with the host libfabric bound
in by the fabric plan over the image's own copy.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.host import LIBFABRIC, OMPI_TREES
from harness.images import make_rootfs, make_world_readable
from harness.mpi import CompiledPrograms, MpiPrograms, assert_hello, ompi_env
from harness.users import User
from rankwire.fabric.facts import fabric_facts
from rankwire.fabric.plan import LIB_DIR, FabricPlan, plan_fabric
from rankwire.runtime.imagefacts import image_facts
from rankwire.runtime.plan import ImageFacts


def plan_for(facts: ImageFacts, choice: str) -> FabricPlan:
    """What the runtime plans: the facts `choice` needs for this image, then the plan."""
    return plan_fabric(*fabric_facts(facts, choice), choice)


pytestmark = [pytest.mark.mpi, pytest.mark.slow, pytest.mark.usefixtures("nothing_left_behind")]

# Loopback only: the ORTE wire-up, and the tcp provider (FI_TCP_IFACE) inside.
MPIRUN = [
    "mpirun.openmpi",
    "-n",
    "2",
    "--oversubscribe",
    "--mca",
    "oob_tcp_if_include",
    "lo",
    "--mca",
    "mtl_ofi_verbose",
    "1",
]


@pytest.fixture(scope="module")
def fabric_image(
    shared_dir: Path, mpi_programs: MpiPrograms, data_programs: CompiledPrograms
) -> Path:
    """hello_ompi + mpi_maps + Open MPI's and PMIx's plugin trees; libfabric comes along in
    the ldd closure of mca_mtl_ofi.so, so the image has its own copy."""
    from rankwire.runtime.build import build_image

    where = shared_dir / "fabric-ompi"
    where.mkdir()
    maps = data_programs["mpi_maps"]
    rootfs = make_rootfs(
        where / "rootfs",
        binaries=[str(mpi_programs.hello_ompi), str(maps)],
        trees=[t for t in OMPI_TREES if Path(t).exists()],
    )
    (rootfs / "opt").mkdir(exist_ok=True)
    for prog in (mpi_programs.hello_ompi, maps):
        shutil.copy2(prog, rootfs / "opt" / prog.name)
    assert list(rootfs.glob("**/libfabric.so.1")), "the image should carry its own libfabric"
    out = where / "ompi.sif"
    build_image(out, rootfs)
    shutil.rmtree(rootfs)
    make_world_readable(where)
    return out


def mpirun_in_container(runner: User, image: Path, program: str) -> subprocess.CompletedProcess:
    argv = [*MPIRUN, "rankwire", "exec", "--fabric", "tcp", "--env", "FI_TCP_IFACE=lo"]
    return runner.run([*argv, str(image), program], cwd="/tmp", env=ompi_env(dict(os.environ)))


def test_plan_covers_the_images_libfabric_and_its_consumers_pass(fabric_image: Path) -> None:
    from rankwire.fabric.imagefacts import read_fabric_image_facts

    facts = image_facts(str(fabric_image))
    image = read_fabric_image_facts(facts)
    consumers = {os.path.basename(o.path) for o in image.consumers}
    assert {"mca_mtl_ofi.so", "mca_btl_ofi.so"} <= consumers  # they need FABRIC_1.3 at most
    plan = plan_for(facts, "tcp")
    over = [m for m in plan.mounts if m.target in {o.path for o in image.libfabric}]
    assert over and all(m.source == LIBFABRIC for m in over)


def test_open_mpi_hello_over_mtl_ofi_tcp(runner: User, fabric_image: Path) -> None:
    proc = mpirun_in_container(runner, fabric_image, "/opt/hello_ompi")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_hello(proc.stdout, 2)
    # pml cm (forced by the plan) initialised the OFI MTL on the tcp provider.
    assert len(re.findall(r"mtl:ofi:prov: tcp;ofi_rxm", proc.stdout + proc.stderr)) == 2


def test_ranks_load_the_host_libfabric_not_the_images(runner: User, fabric_image: Path) -> None:
    proc = mpirun_in_container(runner, fabric_image, "/opt/mpi_maps")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    st = os.stat(LIBFABRIC)
    host = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    lines = re.findall(r"maps rank=(\d) size=2 sum=3 library=(\S+) devino=(\S+)", proc.stdout)
    assert sorted(r for r, _, _ in lines) == ["0", "1"], proc.stdout
    for _rank, library, devino in lines:
        assert library == f"{LIB_DIR}/libfabric.so.1"
        assert devino == host  # the very host file, through the bind
