"""`--host-mpi`: the image's MPI program runs with the host's MPI library of the same ABI.

Real MPIs: a program built with Debian's MPICH 4.0.2 (`libmpich.so.12`) in an image, and
PyPI's MPICH 5.0.2 wheel (`libmpi.so.12`, `libmpi_abi.so.1`, its own libfabric and UCX)
as the host MPI; `MPI_Get_library_version` and the library each rank mapped
(`/proc/self/maps`: device and inode) say which one ran."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_fabric_plan import cc_shared

from harness.images import make_rootfs, make_world_readable
from harness.mpi import CompiledPrograms
from harness.slurm import SlurmCluster
from harness.users import User, rw
from rankwire.fabric.elf import read_elf
from rankwire.fabric.imagefacts import MPI_SONAMES

INSTALLED = Path(sys.prefix) / "opt" / "mpich"  # `make test` puts the wheel there
GLIBC_EXTRA = ("libdl.so.2", "librt.so.1", "libpthread.so.0")  # the wheel needs them
LINE = re.compile(
    r"^mpilib rank=(\d+) size=(\d+) sum=(\d+) library=(\S+) devino=(\S+) version=(.*)$"
)

pytestmark = pytest.mark.skipif(
    not (INSTALLED / "lib" / "libmpi.so.12").exists(), reason=f"no MPICH wheel at {INSTALLED}"
)


@pytest.fixture(scope="module")
def wheel(shared_dir: Path) -> Path:
    """The wheel's prefix where every test user can read it (a checkout under /root is
    not): the host MPI of these tests."""
    dst = shared_dir / "mpich-wheel"
    if not dst.exists():
        shutil.copytree(INSTALLED, dst, symlinks=True)
        make_world_readable(dst)
    return dst


def devino(path: Path) -> str:
    """/proc/PID/maps' dev:inode of the file behind `path`."""
    st = os.stat(path)
    return f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"


def ranks(stdout: str) -> list[dict[str, Any]]:
    out = []
    for line in stdout.splitlines():
        m = LINE.match(line)
        if m:
            rank, size, total, library, where, version = m.groups()
            out.append(
                {
                    "rank": int(rank),
                    "size": int(size),
                    "sum": int(total),
                    "library": library,
                    "devino": where,
                    "version": version,
                }
            )
    return sorted(out, key=lambda r: r["rank"])


@pytest.fixture(scope="module")
def image(shared_dir: Path, data_programs: CompiledPrograms) -> Path:
    """Debian MPICH's runtime (+ UCX plugins and the glibc pieces a newer MPI needs) with
    /opt/mpi_lib built against it."""
    from rankwire.runtime.build import build_image

    program = data_programs["mpi_lib"]
    rootfs = make_rootfs(
        shared_dir / "host-mpi-rootfs",
        binaries=[str(program)],
        trees=["/usr/lib/x86_64-linux-gnu/ucx"],
    )
    for name in GLIBC_EXTRA:
        shutil.copy2(f"/lib/x86_64-linux-gnu/{name}", rootfs / "lib/x86_64-linux-gnu" / name)
    (rootfs / "opt").mkdir()
    shutil.copy2(program, rootfs / "opt" / "mpi_lib")
    out = shared_dir / "host-mpi.sif"
    build_image(out, rootfs)
    make_world_readable(shared_dir)
    return out


def refused(proc: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr.rstrip("\n")


# -- the plan ------------------------------------------------------------------------------


def test_dry_run_says_what_is_replaced_by_what(wheel: Path, image: Path) -> None:
    me = User("self", os.getuid(), os.getgid(), "")
    proc = rw(me, "exec", "--dry-run", "--json", "--host-mpi", str(wheel), str(image), "/opt/x")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    mpi = plan["host_mpi"]
    assert mpi["family"] == "mpich"
    assert mpi["replaced"] == [
        ["/lib/x86_64-linux-gnu/libmpich.so.12", str(wheel / "lib" / "libmpi.so.12")]
    ]
    assert mpi["reason"] == (
        f"host MPI (MPICH Version: 5.0.2) from --host-mpi {wheel}: replaced "
        f"/lib/x86_64-linux-gnu/libmpich.so.12 by {(wheel / 'lib' / 'libmpi.so.12')}"
    )
    binds = {m["target"]: m["source"] for m in plan["container"]["mounts"]}
    assert binds["/lib/x86_64-linux-gnu/libmpich.so.12"] == str(wheel / "lib" / "libmpi.so.12")
    # The closure, one file at a time: its own libfabric (the host's 1.17 lacks FABRIC_1.9).
    assert binds["/.rankwire/mpi/lib/libfabric.so.1"] == str(wheel / "lib/mpich/libfabric.so.1")
    assert binds["/.rankwire/mpi/lib/libucp.so.0"] == str(wheel / "lib/mpich/libucp.so.0")
    assert plan["process"]["env"]["LD_LIBRARY_PATH"] == "/.rankwire/mpi/lib"
    # Off by default, and RANKWIRE_HOST_MPI is the option's variable.
    plain = rw(me, "exec", "--dry-run", "--json", str(image), "/opt/x")
    assert json.loads(plain.stdout)["host_mpi"]["replaced"] == []
    proc = me.run(
        ["env", f"RANKWIRE_HOST_MPI={wheel}", "rankwire", "exec", "--dry-run", "--json",
         str(image), "/opt/x"],
    )  # fmt: skip
    assert json.loads(proc.stdout)["host_mpi"]["family"] == "mpich"


# -- runs ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("nothing_left_behind")
def test_the_launcher_runs_the_image_program_on_the_host_mpi(
    wheel: Path, runner: User, image: Path
) -> None:
    proc = runner.run(
        ["apptainer-mpirun", "-v", "-n", "4", "--host-mpi", str(wheel), str(image),
         "/opt/mpi_lib"],
        cwd="/tmp",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = ranks(proc.stdout)
    assert [r["rank"] for r in got] == [0, 1, 2, 3]
    for r in got:
        assert (r["size"], r["sum"]) == (4, 10)
        assert r["version"] == "MPICH Version:      5.0.2"
        assert r["library"] == "/lib/x86_64-linux-gnu/libmpich.so.12"  # the image's path
        assert r["devino"] == devino(wheel / "lib" / "libmpi.so.12")  # ... holding the host's file
    assert proc.stderr.splitlines()[1] == (
        f"rankwire: host MPI (MPICH Version: 5.0.2) from --host-mpi {wheel}: replaced "
        f"/lib/x86_64-linux-gnu/libmpich.so.12 by {(wheel / 'lib' / 'libmpi.so.12')}"
    )
    # Without it, the image's own MPICH 4.0.2.
    own = runner.run(["apptainer-mpirun", "-n", "2", str(image), "/opt/mpi_lib"], cwd="/tmp")
    assert {r["version"] for r in ranks(own.stdout)} == {"MPICH Version:\t4.0.2"}


@pytest.fixture(scope="module")
def abi_image(wheel: Path, shared_dir: Path) -> Path:
    """A program built with the wheel's mpicc_abi, in an image holding its own copy of the
    MPICH 5 libraries under /opt/mpich/lib (the program's RUNPATH)."""
    from rankwire.runtime.build import build_image

    work = shared_dir / "abi"
    work.mkdir()
    program = work / "mpi_lib_abi"
    src = Path(__file__).resolve().parent / "data" / "mpi_lib.c"
    subprocess.run(
        [str(wheel / "bin/mpicc_abi"), "-O1", str(src), "-o", str(program),
         "-Wl,-rpath,/opt/mpich/lib"],
        check=True, capture_output=True,
    )  # fmt: skip
    rootfs = make_rootfs(work / "rootfs", binaries=["/bin/true"])
    for name in (*GLIBC_EXTRA, "libm.so.6"):
        shutil.copy2(f"/lib/x86_64-linux-gnu/{name}", rootfs / "lib/x86_64-linux-gnu" / name)
    shutil.copytree(wheel / "lib", rootfs / "opt/mpich/lib", symlinks=True)
    shutil.copy2(program, rootfs / "opt/mpi_lib_abi")
    image = work / "abi.sif"
    build_image(image, rootfs)
    make_world_readable(work)
    return image


@pytest.mark.usefixtures("nothing_left_behind")
def test_a_standard_abi_program_takes_the_hosts_libmpi_abi(
    wheel: Path, runner: User, abi_image: Path
) -> None:
    """The host's libmpi_abi.so.1 is mapped instead of the image's copy."""
    image = abi_image
    proc = runner.run(
        ["apptainer-mpirun", "-n", "2", "--host-mpi", str(wheel), str(image),
         "/opt/mpi_lib_abi"],
        cwd="/tmp",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = ranks(proc.stdout)
    assert [(r["size"], r["sum"]) for r in got] == [(2, 3), (2, 3)]
    # LD_LIBRARY_PATH (the host closure) is searched before the program's RUNPATH; the
    # image's /opt/mpich/lib/libmpi_abi.so.1 is the host's file too (bound over).
    assert {r["library"] for r in got} == {"/.rankwire/mpi/lib/libmpi_abi.so.1"}
    assert {r["devino"] for r in got} == {devino(wheel / "lib/libmpi_abi.so.1")}


@pytest.mark.slurm
def test_srun_exec_with_the_host_mpi(slurm_cluster: SlurmCluster, image: Path) -> None:
    """Under srun --mpi=pmi2 with Debian's MPICH as the host MPI (the wheel has no PMI-2):
    the ranks map the host's file, not the image's copy."""
    proc = subprocess.run(
        ["srun", "--mpi=pmi2", "-n", "2", "rankwire", "exec", "--host-mpi", "/usr",
         str(image), "/opt/mpi_lib"],
        env=slurm_cluster.env, cwd="/tmp", capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = ranks(proc.stdout)
    assert [(r["rank"], r["size"], r["sum"]) for r in got] == [(0, 2, 3), (1, 2, 3)]
    host_lib = Path("/usr/lib/x86_64-linux-gnu/libmpich.so.12")
    assert {r["devino"] for r in got} == {devino(host_lib)}


@pytest.mark.slurm
def test_the_plugin_with_the_host_mpi(
    spank_cluster: SlurmCluster, image: Path, runner: User, nothing_left: None
) -> None:
    """`--container-host-mpi=/usr` (Debian's MPICH: it speaks PMI-2, the wheel does not):
    both tasks map the host's file through the plugin's container."""
    from harness.spank import srun

    proc = srun(
        spank_cluster, runner, "-n", "2", "--mpi=pmi2", f"--container-image={image}",
        "--container-host-mpi=/usr", "/opt/mpi_lib",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = ranks(proc.stdout)
    assert [(r["rank"], r["size"], r["sum"]) for r in got] == [(0, 2, 3), (1, 2, 3)]
    host_lib = Path("/usr/lib/x86_64-linux-gnu/libmpich.so.12")
    assert {r["devino"] for r in got} == {devino(host_lib)}


@pytest.fixture(scope="module")
def mpi4py_image(shared_dir: Path) -> Path:
    """Debian's Python 3.11 with mpi4py built against Debian's MPICH (the venv's)."""
    import mpi4py

    from rankwire.runtime.build import build_image

    package = Path(mpi4py.__file__).parent
    rootfs = make_rootfs(
        shared_dir / "mpi4py-rootfs",
        binaries=[str(Path(sys.executable).resolve()), *map(str, package.glob("*.so"))],
        trees=["/usr/lib/x86_64-linux-gnu/ucx"],
    )
    stdlib = Path("/usr/lib") / f"python{sys.version_info.major}.{sys.version_info.minor}"
    skip = shutil.ignore_patterns("test", "idlelib", "tkinter", "config-*", "ensurepip")
    shutil.copytree(stdlib, rootfs / stdlib.relative_to("/"), symlinks=True, ignore=skip)
    for name in GLIBC_EXTRA:
        shutil.copy2(f"/lib/x86_64-linux-gnu/{name}", rootfs / "lib/x86_64-linux-gnu" / name)
    shutil.copytree(package, rootfs / "usr/lib/python3/dist-packages/mpi4py")
    out = shared_dir / "mpi4py.sif"
    build_image(out, rootfs)
    shutil.rmtree(shared_dir / "mpi4py-rootfs")
    make_world_readable(shared_dir)
    return out


MPI4PY_HELLO = (  # one write(2) per line: the ranks share the launcher's pipe
    "import os; from mpi4py import MPI; c = MPI.COMM_WORLD; s = c.allreduce(c.rank + 1); "
    "v = MPI.Get_library_version().splitlines()[0].split()[-1]; "
    "os.write(1, f'mpi4py {c.rank} {c.size} {s} {v}\\n'.encode())"
)


@pytest.mark.usefixtures("nothing_left_behind")
def test_mpi4py_in_the_image_runs_on_the_host_mpi(
    wheel: Path, runner: User, mpi4py_image: Path
) -> None:
    python = f"/usr/bin/{Path(sys.executable).resolve().name}"
    proc = runner.run(
        ["apptainer-mpirun", "-n", "2", "--host-mpi", str(wheel), str(mpi4py_image),
         python, "-c", MPI4PY_HELLO],
        cwd="/tmp",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == ["mpi4py 0 2 3 5.0.2", "mpi4py 1 2 3 5.0.2"]


# -- refusals: one line, nothing started -----------------------------------------------------


@pytest.mark.usefixtures("nothing_left_behind")
def test_refusals(
    wheel: Path, runner: User, image: Path, ompi_image: Path, base_image: Path, shared_dir: Path
) -> None:
    libs = ", ".join(sorted(MPI_SONAMES))
    assert refused(rw(runner, "exec", "--host-mpi", str(wheel), str(ompi_image), "true")) == (
        f"rankwire: cannot use the host MPI (--host-mpi {wheel}): the image's MPI is Open MPI "
        "(libmpi.so.40) and the host's is MPI standard ABI (libmpi_abi.so.1) and MPICH ABI "
        "(libmpi.so.12), whose ABIs differ; use --host-mpi none, or an image built with an "
        "MPI of the host's ABI"
    )
    assert refused(rw(runner, "exec", "--host-mpi", "/var/empty", str(image), "true")) == (
        f"rankwire: --host-mpi /var/empty: no MPI library ({libs}) in "
        "/var/empty/lib/x86_64-linux-gnu, /var/empty/lib64, /var/empty/lib; give the prefix "
        "of the site's MPI (the directory holding its lib/ and bin/) or --host-mpi none"
    )
    assert refused(rw(runner, "exec", "--host-mpi", str(wheel), str(base_image), "true")) == (
        f"rankwire: --host-mpi {wheel}: the image has no shared MPI library ({libs}) to "
        "replace: its program may link MPI statically; rebuild it against a shared MPI or "
        "drop --host-mpi"
    )
    # A host MPI built on a newer glibc than the image's (a stub: needs GLIBC_2.99).
    stub = shared_dir / "stub-mpi"
    if not stub.exists():
        libc = cc_shared(
            stub / "glibc/libc.so.6", "libc.so.6", "int new_call(void) { return 0; }\n",
            "GLIBC_2.99 { global: new_call; local: *; };\n", nostdlib=True,
        )  # fmt: skip
        cc_shared(
            stub / "lib/libmpi.so.12", "libmpi.so.12",
            "int new_call(void);\nint MPI_Init(void *a, void *b) { return new_call(); }\n",
            link=(str(libc),),
        )  # fmt: skip
        make_world_readable(shared_dir)
    assert read_elf(str(stub / "lib/libmpi.so.12")).required_from("libc.so.6") == ("GLIBC_2.99",)
    assert refused(rw(runner, "exec", "--host-mpi", str(stub), str(image), "true")) == (
        "rankwire: cannot bind the host MPI: host libmpi.so.12 needs GLIBC_2.99 but the "
        "image's glibc is 2.36; rebuild the image on glibc >= 2.99 or use --host-mpi none"
    )


def test_auto_without_a_host_mpi_binds_nothing() -> None:
    from rankwire.fabric.hostmpi import host_mpi

    assert host_mpi("auto", {"PATH": "/nonexistent"}) is None
    assert host_mpi("none", {}) is None
    found = host_mpi("auto", {"PATH": "/usr/bin"})  # Debian's MPICH: mpichversion
    assert found is not None and found.found_by == "mpichversion on PATH (/usr/bin/mpichversion)"
    assert found.libs == ("/usr/lib/x86_64-linux-gnu/libmpich.so.12",)  # not Open MPI's


def test_the_pmi_of_the_injected_mpi() -> None:
    from rankwire.fabric.mpiplan import MpiPlan

    assert MpiPlan("x", "", (), "openmpi", {}, ()).pmi_kind == "pmix"
    assert MpiPlan("x", "", (), "mpich", {}, ()).pmi_kind == "pmi1/2"
    assert MpiPlan("none", "", (), "", {}, ()).pmi_kind is None


def test_enforced_policy_binds_only_the_sites_host_mpi() -> None:
    from rankwire.spank.policy import Policy, PolicyError

    enforced = Policy(source="/p.toml", enforce=True)
    kw: dict[str, Any] = {"fabric": "auto", "remap_root": False, "writable": False}
    enforced.check_options(**kw, host_mpi="none", site_host_mpi="none")
    enforced.check_options(**kw, host_mpi="/opt/cray", site_host_mpi="/opt/cray")
    with pytest.raises(PolicyError) as err:
        enforced.check_options(**kw, host_mpi="/home/me/mpi", site_host_mpi="/opt/cray")
    assert str(err.value) == (
        "policy: --container-host-mpi=/home/me/mpi: under this site's enforced policy root "
        "binds only the host MPI the site configured (plugstack host_mpi=/opt/cray); drop it"
    )
    Policy(source="/p.toml").check_options(**kw, host_mpi="/home/me/mpi")  # advisory: yours


def test_doctor_says_what_host_mpi_would_bind(wheel: Path, image: Path, ompi_image: Path) -> None:
    me = User("self", os.getuid(), os.getgid(), "")

    def check(img: Path) -> dict[str, str]:
        env = ["env", f"RANKWIRE_HOST_MPI={wheel}", "rankwire", "doctor", "--json", str(img)]
        proc = me.run(env, cwd="/tmp")
        assert proc.returncode in (0, 1), proc.stderr
        [found] = [c for c in json.loads(proc.stdout)["checks"] if c["name"] == "host-mpi"]
        return dict(found)

    assert check(image) == {
        "name": "host-mpi",
        "verdict": "ok",
        "reason": f"--host-mpi {wheel} would run the image's MPI program on the host MPI (MPICH "
        f"Version: 5.0.2) from --host-mpi {wheel}: replaced /lib/x86_64-linux-gnu/libmpich.so.12 "
        f"by {(wheel / 'lib' / 'libmpi.so.12')}",
        "fix": "",
    }
    refused = check(ompi_image)
    assert (refused["verdict"], refused["fix"]) == (
        "warn",
        "use --host-mpi none, or an image built with an MPI of the host's ABI",
    )
    assert refused["reason"].startswith(f"--host-mpi {wheel}: cannot use the host MPI")


def test_with_the_host_libfabric_bound_the_host_mpi_uses_it(wheel: Path) -> None:
    """A recorded Omni-Path host (tests/data/fabric/opx) with Debian's libfabric 1.17: the
    fabric plan binds it, so the host MPI's own libfabric stays out and its FABRIC_1.x
    needs are checked against 1.17 (the wheel's MPICH 5 needs FABRIC_1.9: refused, naming
    both ways out); Debian's MPICH (UCX, no libfabric) goes in after the fabric's dir."""
    from test_fabric_plan import LIBFABRIC, host

    from rankwire.errors import UserError
    from rankwire.fabric import discovery
    from rankwire.fabric.hostfacts import libfabric_facts
    from rankwire.fabric.hostmpi import host_mpi
    from rankwire.fabric.imagefacts import ImageLib, host_as_image_facts
    from rankwire.fabric.mpiplan import LIB_DIR, plan_host_mpi
    from rankwire.fabric.plan import LIB_DIR as FABRIC_DIR
    from rankwire.fabric.plan import plan_fabric

    lib = libfabric_facts(LIBFABRIC, "1.17", discovery.providers(), environ={})
    mpich = ImageLib("/lib/x86_64-linux-gnu/libmpich.so.12", "libmpich.so.12")
    image = dataclasses.replace(host_as_image_facts(), mpi=(mpich,))
    fabric = plan_fabric(host("opx", lib), image, "auto")
    assert fabric.provider == "psm2"
    wheel = host_mpi(str(wheel), {})
    with pytest.raises(UserError) as err:
        plan_host_mpi(wheel, image, fabric, lib, str(wheel))
    assert str(err.value) == (
        "cannot use the host MPI with the host libfabric 1.17: libmpi.so.12 needs FABRIC_1.9, "
        "which it lacks; use --fabric none (the host MPI then brings its own libfabric) or "
        "--host-mpi none"
    )
    debian = host_mpi("/usr", {})
    plan = plan_host_mpi(debian, image, fabric, lib, "/usr")
    targets = [m.target for m in plan.mounts]
    assert f"{LIB_DIR}/libfabric.so.1" not in targets
    assert plan.env["LD_LIBRARY_PATH"] == f"{FABRIC_DIR}:{LIB_DIR}"
    assert plan.replaced == (
        ("/lib/x86_64-linux-gnu/libmpich.so.12", os.path.realpath(debian.libs[-1])),
    )


def test_host_mpi_facts_are_kept_while_their_files_are_unchanged(
    wheel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading them costs ≈ 130 ms (every srun task would pay it): kept in the user's
    cache dir, read again when any file they came from changes."""
    from rankwire.fabric import factcache

    monkeypatch.setattr(factcache, "SETTLE_NS", 0)  # its files are new
    from rankwire.fabric import hostmpi

    prefix = tmp_path / "mpich"
    shutil.copytree(wheel, prefix, symlinks=True)
    reads: list[str] = []
    real_read = hostmpi._read
    monkeypatch.setattr(
        hostmpi,
        "_read",
        lambda *a: reads.append(a[0]) or real_read(*a),
    )
    cache = str(tmp_path / "cache")
    first = hostmpi.host_mpi(str(prefix), {}, cache)
    assert hostmpi.host_mpi(str(prefix), {}, cache) == first
    assert reads == [str(prefix)]
    dep = prefix / "lib" / "mpich" / "libucp.so.0"  # one object of the closure
    os.utime(dep, ns=(0, 0))
    assert hostmpi.host_mpi(str(prefix), {}, cache) == first
    assert reads == [str(prefix)] * 2
    (prefix / "lib" / "libmpi_abi.so.1").unlink()  # one candidate gone
    fewer = hostmpi.host_mpi(str(prefix), {}, cache)
    assert fewer is not None and fewer.libs == (str(prefix / "lib" / "libmpi.so.12"),)
    assert reads == [str(prefix)] * 3
    me = User("self", os.getuid(), os.getgid(), "")
    cleaned = me.run(["env", f"RANKWIRE_CACHEDIR={cache}", "rankwire", "cache", "clean"])
    assert cleaned.stdout.splitlines()[0] == "removed 1 host MPI records"
    assert list(Path(cache, "host-mpi").iterdir()) == []
