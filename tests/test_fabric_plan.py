"""The fabric planner: provider choice, binds and env, and the symbol-version refusals.

Hosts are the reconstructed sysfs trees of tests/data/fabric/ plus either this host's real
libfabric 1.17 or small real ELF stubs built here with the host compiler (an HPE-style
libfabric linking libcxi, a Cornelis-style one with a DL provider). Images are real SIFs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from harness.host import LIBFABRIC
from harness.images import make_rootfs
from rankwire.errors import UserError
from rankwire.fabric import discovery
from rankwire.fabric.elf import ElfFacts
from rankwire.fabric.facts import fabric_facts
from rankwire.fabric.hostfacts import (
    Adapter,
    FabricHostFacts,
    HostLibfabric,
    detect_adapters,
    fabric_devices,
    libfabric_facts,
)
from rankwire.fabric.imagefacts import host_as_image_facts, read_fabric_image_facts
from rankwire.fabric.plan import EMPTY_IMAGE, LIB_DIR, FabricPlan, plan_fabric
from rankwire.runtime.build import build_image
from rankwire.runtime.imagefacts import image_facts
from rankwire.runtime.plan import ImageFacts, Mount


def plan_for(facts: ImageFacts, choice: str) -> FabricPlan:
    """What the runtime plans: the facts `choice` needs for this image, then the plan."""
    return plan_fabric(*fabric_facts(facts, choice), choice)


DATA = Path(__file__).resolve().parent / "data" / "fabric"
MULTIARCH = "/usr/lib/x86_64-linux-gnu"

needs_cc = pytest.mark.skipif(not shutil.which("cc"), reason="needs a C compiler")


# -- real ELF stubs -----------------------------------------------------------------------
def cc_shared(
    out: Path,
    soname: str,
    source: str,
    version_map: Optional[str] = None,
    link: tuple[str, ...] = (),
    runpath: Optional[str] = None,
    nostdlib: bool = False,
) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    src = out.with_name(out.name + ".c")
    src.write_text(source)
    argv = ["cc", "-shared", "-fPIC", "-o", str(out), f"-Wl,-soname,{soname}", str(src)]
    if version_map is not None:
        vmap = out.with_name(out.name + ".map")
        vmap.write_text(version_map)
        argv.append(f"-Wl,--version-script={vmap}")
    if runpath:
        argv += [f"-Wl,-rpath,{runpath}", "-Wl,--enable-new-dtags"]
    if nostdlib:
        argv.append("-nostdlib")
    subprocess.run([*argv, "-Wl,--no-as-needed", *link], check=True, capture_output=True)
    src.unlink()
    return out


def fabric_map(newest: int) -> str:
    """A libfabric-like version script: FABRIC_1.0 .. FABRIC_1.<newest>, fi_getinfo last."""
    nodes = []
    for minor in range(newest + 1):
        sym = "fi_getinfo" if minor == newest else f"fi_sym_{minor}"
        parent = f" FABRIC_1.{minor - 1}" if minor else ""
        local = " local: *;" if minor == 0 else ""
        nodes.append(f"FABRIC_1.{minor} {{ global: {sym};{local} }}{parent};")
    return "\n".join(nodes) + "\n"


def fabric_source(newest: int) -> str:
    syms = "".join(f"int fi_sym_{m}(void) {{ return {m}; }}\n" for m in range(newest))
    return syms + "int fi_getinfo(void) { return 0; }\n"


def providers_of(tree: str) -> list[str]:
    return (DATA / tree / "providers").read_text().split()


def host(tree: str, lib: Optional[HostLibfabric]) -> FabricHostFacts:
    root = str(DATA / tree)
    return FabricHostFacts(detect_adapters(root), fabric_devices(root), lib)


@pytest.fixture(scope="module")
def debian_lib() -> HostLibfabric:
    """This host's real libfabric 1.17 with its real provider list."""
    return libfabric_facts(LIBFABRIC, "1.17", discovery.providers(), environ={})


@pytest.fixture(scope="module")
def host_image():
    return host_as_image_facts()


def binds(plan) -> dict[str, Mount]:
    return {m.target: m for m in plan.mounts}


# -- provider choice on recorded hosts ------------------------------------------------------
@needs_cc
def test_slingshot_host_binds_hpe_libfabric_libcxi_and_cxi_devices(tmp_path, host_image):
    cxi = cc_shared(
        tmp_path / "opt/cray/libcxi/lib64/libcxi.so.1", "libcxi.so.1", "int cxil_x(void){return 1;}"
    )
    lib_path = cc_shared(
        tmp_path / "opt/cray/libfabric/1.15.2.0/lib64/libfabric.so.1",
        "libfabric.so.1",
        fabric_source(6),
        fabric_map(6),
        link=(str(cxi),),
        runpath="$ORIGIN/../../../libcxi/lib64",
    )
    lib = libfabric_facts(str(lib_path), "1.15", providers_of("cxi"), environ={})
    plan = plan_fabric(host("cxi", lib), host_image, "auto")
    assert plan.provider == "cxi"
    assert "cxi0" in plan.reason and "cxi1" in plan.reason and "cxi provider" in plan.reason
    b = binds(plan)
    assert b[f"{LIB_DIR}/libfabric.so.1"].source == str(lib_path)
    assert b[f"{LIB_DIR}/libcxi.so.1"].source == str(cxi)
    assert b[f"{LIB_DIR}/libfabric.so.1"].readonly
    assert plan.device_nodes == ("/dev/cxi0", "/dev/cxi1", "/dev/shm")
    assert not b["/dev/cxi0"].readonly
    assert "/etc/libibverbs.d" not in b  # cxi is not verbs-based
    assert plan.env["FI_PROVIDER"] == "cxi"
    assert plan.env["OMPI_MCA_mtl_ofi_provider_include"] == "cxi"
    assert plan.env["FI_PROVIDER_PATH"] == LIB_DIR
    assert plan.env["LD_LIBRARY_PATH"] == LIB_DIR


def test_efa_host_binds_uverbs_and_the_efa_verbs_plugin(debian_lib, host_image):
    lib = libfabric_facts(LIBFABRIC, "1.17", providers_of("efa"), environ={})
    plan = plan_fabric(host("efa", lib), host_image, "auto")
    assert plan.provider == "efa" and "rdmap0s6" in plan.reason
    b = binds(plan)
    assert [t for t in b if t.startswith("/dev/")] == ["/dev/infiniband/uverbs0", "/dev/shm"]
    plugin = b[f"{MULTIARCH}/libibverbs/libefa-rdmav34.so"]  # where libibverbs looks
    assert plugin.source == os.path.realpath(f"{MULTIARCH}/libibverbs/libefa-rdmav34.so")
    assert b["/etc/libibverbs.d"].source == "/etc/libibverbs.d"
    for name in ("libfabric.so.1", "libefa.so.1", "libibverbs.so.1", "libnl-3.so.200"):
        assert f"{LIB_DIR}/{name}" in b, name
    assert not any(t.endswith(("libc.so.6", "libm.so.6")) for t in b)  # glibc stays the image's
    assert plan.env["FI_PROVIDER"] == "efa"


def test_infiniband_host_gets_verbs_with_rdma_cm_but_not_umad(host_image):
    lib = libfabric_facts(LIBFABRIC, "1.17", providers_of("mlx5"), environ={})
    plan = plan_fabric(host("mlx5", lib), host_image, "auto")
    assert plan.provider == "verbs"
    assert "ConnectX-6 mlx5_0 (0000:3b:00.0, InfiniBand, 4: ACTIVE)" in plan.reason
    b = binds(plan)
    assert [t for t in b if t.startswith("/dev/")] == [
        "/dev/infiniband/rdma_cm",
        "/dev/infiniband/uverbs0",
        "/dev/shm",
    ]
    assert f"{MULTIARCH}/libibverbs/libmlx5-rdmav34.so" in b
    assert f"{LIB_DIR}/librdmacm.so.1" in b


@needs_cc
def test_omnipath_host_with_cornelis_libfabric_binds_the_opx_dl_provider(tmp_path, host_image):
    libdir = tmp_path / "opt/cornelis/lib64"
    lib_path = cc_shared(
        libdir / "libfabric.so.1",
        "libfabric.so.1",
        fabric_source(7),
        fabric_map(7),
        link=(f"{MULTIARCH}/libnuma.so.1", f"{MULTIARCH}/libuuid.so.1"),
    )
    opx = cc_shared(
        libdir / "libfabric/libopx-fi.so", "libopx-fi.so", "int fi_prov_ini(void){return 0;}"
    )
    lib = libfabric_facts(str(lib_path), "1.20", providers_of("opx"), environ={})
    assert lib.dl_providers == (str(opx),)
    plan = plan_fabric(host("opx", lib), host_image, "auto")
    assert plan.provider == "opx"
    b = binds(plan)
    assert b[f"{LIB_DIR}/libopx-fi.so"].source == str(opx)
    assert b[f"{LIB_DIR}/libnuma.so.1"].source == os.path.realpath(f"{MULTIARCH}/libnuma.so.1")
    assert [t for t in b if t.startswith("/dev/")] == ["/dev/hfi1_0", "/dev/shm"]


def test_omnipath_host_with_debians_libfabric_falls_back_to_psm2(debian_lib, host_image):
    plan = plan_fabric(host("opx", debian_lib), host_image, "auto")
    assert plan.provider == "psm2"
    assert "has the psm2 provider" in plan.reason
    assert "/dev/hfi1_0" in binds(plan)


def test_adapter_without_its_provider_binds_nothing_and_says_why(debian_lib, host_image):
    plan = plan_fabric(host("efa", debian_lib), host_image, "auto")  # no efa device here
    assert (plan.provider, plan.mounts, plan.env) == ("", (), {})
    assert "has no efa provider" in plan.reason and "\n" not in plan.reason


def test_adapter_without_driver_binds_nothing(debian_lib, host_image):
    plan = plan_fabric(host("mlx5-nodriver", debian_lib), host_image, "auto")
    assert plan.provider == "" and "ConnectX-6 (0000:3b:00.0): no device node" in plan.reason


def test_auto_on_this_host_binds_nothing(debian_lib, host_image, tmp_path):
    plan = plan_fabric(FabricHostFacts((), (), debian_lib), host_image, "auto")
    assert plan.provider == "" and plan.reason.startswith("no fabric adapter found")


# -- explicit choices -------------------------------------------------------------------------
def test_explicit_tcp_binds_the_host_libfabric_and_sets_the_mpi_knobs(debian_lib, host_image):
    plan = plan_fabric(FabricHostFacts((), (), debian_lib), host_image, "tcp;ofi_rxm")
    assert plan.provider == "tcp"
    assert plan.env == {
        "FI_PROVIDER": "tcp",
        "FI_PROVIDER_PATH": LIB_DIR,
        "LD_LIBRARY_PATH": LIB_DIR,
        "OMPI_MCA_pml": "cm",
        "OMPI_MCA_mtl": "ofi",
        "OMPI_MCA_mtl_ofi_provider_include": "tcp",
    }
    b = binds(plan)
    assert [t for t in b if t.startswith("/dev/")] == ["/dev/shm"]
    assert "/etc/libibverbs.d" not in b
    assert (LIBFABRIC, f"{LIB_DIR}/libfabric.so.1", True) in [
        (m.source, m.target, m.readonly) for m in plan.mounts
    ]


@pytest.mark.parametrize("choice", ["verbs", "ofi_rxm", "nosuch", ""])
def test_unusable_choice_is_a_one_line_user_error(debian_lib, host_image, choice):
    with pytest.raises(UserError) as err:
        plan_fabric(FabricHostFacts((), (), debian_lib), host_image, choice)
    assert "\n" not in str(err.value)
    if choice:
        assert "tcp" in str(err.value) and "auto or none" in str(err.value)


def test_no_host_libfabric_refuses_an_explicit_provider(host_image):
    with pytest.raises(UserError, match="the host has no libfabric"):
        plan_fabric(FabricHostFacts((), (), None), host_image, "tcp")


def test_none_is_empty_and_reads_nothing():
    ghost = ImageFacts("/nonexistent.sif", 0, 0, "0", {}, False)
    plan = plan_for(ghost, "none")
    assert (plan.provider, plan.env, plan.mounts) == ("", {}, ())


@needs_cc
def test_missing_host_dependency_refuses(tmp_path, host_image):
    lib_path = cc_shared(
        tmp_path / "libfabric.so.1",
        "libfabric.so.1",
        fabric_source(3),
        fabric_map(3),
        link=(
            str(
                cc_shared(tmp_path / "gone/libgone.so.1", "libgone.so.1", "int g(void){return 0;}")
            ),
        ),
    )
    shutil.rmtree(tmp_path / "gone")
    lib = libfabric_facts(str(lib_path), "1.17", ["tcp"], environ={})
    with pytest.raises(UserError, match=r"needs libgone\.so\.1, which is not installed"):
        plan_fabric(FabricHostFacts((), (), lib), host_image, "tcp")


# -- images: real SIFs read with unsquashfs -------------------------------------------------------
def sif(tmp_path: Path, name: str, rootfs: Path, env: Optional[dict] = None) -> ImageFacts:
    out = tmp_path / f"{name}.sif"
    build_image(out, rootfs, env=env)
    return image_facts(str(out))


def test_image_facts_are_kept_under_the_images_identity(tmp_path, monkeypatch):
    """Listing the image and extracting its libraries costs tens of ms (seconds for a
    large image): with a cache dir, once per image identity and consumer choice."""
    from rankwire.fabric import factcache, imagefacts

    monkeypatch.setattr(factcache, "SETTLE_NS", 0)  # its image is new
    rootfs = make_rootfs(tmp_path / "rootfs", binaries=["/usr/bin/fi_info"])
    facts = sif(tmp_path, "img", rootfs, env={"LD_LIBRARY_PATH": "/opt/app/lib"})
    listed: list[str] = []
    real_list = imagefacts.list_image

    def list_image(image: ImageFacts) -> imagefacts.Listing:
        listed.append(image.digest)
        return real_list(image)

    monkeypatch.setattr(imagefacts, "list_image", list_image)
    cache = str(tmp_path / "cache")
    first = read_fabric_image_facts(facts, True, cache)
    assert first == read_fabric_image_facts(facts)  # what reading it says
    assert read_fabric_image_facts(facts, True, cache) == first
    assert len(listed) == 2  # the third came from the cache
    read_fabric_image_facts(facts, False, cache)  # without the consumers: another entry
    other = sif(tmp_path, "other", rootfs, env={"LD_LIBRARY_PATH": "/other"})
    assert read_fabric_image_facts(other, True, cache).ld_library_path == "/other"
    assert listed == [facts.digest] * 3 + [other.digest]


def test_image_facts_find_glibc_and_libfabric_copies(tmp_path):
    rootfs = make_rootfs(tmp_path / "rootfs", binaries=["/usr/bin/fi_info"])
    facts = sif(tmp_path, "img", rootfs, env={"LD_LIBRARY_PATH": "/opt/app/lib"})
    image = read_fabric_image_facts(facts)
    libc = subprocess.run(["ldd", "--version"], capture_output=True, text=True).stdout
    assert image.glibc_version and image.glibc_version in libc.splitlines()[0]
    assert [o.path for o in image.libfabric] == ["/lib/x86_64-linux-gnu/libfabric.so.1"]
    plan = plan_for(facts, "tcp")
    b = binds(plan)
    # The image's own copy is covered by the host's too (for consumers with an RPATH).
    assert b["/lib/x86_64-linux-gnu/libfabric.so.1"].source == LIBFABRIC
    assert plan.env["LD_LIBRARY_PATH"] == f"{LIB_DIR}:/opt/app/lib"


@needs_cc
def test_image_with_an_old_glibc_is_refused(tmp_path):
    """A stub libc.so.6 offering only GLIBC_2.2.5: the host libfabric needs GLIBC_2.34."""
    rootfs = tmp_path / "old"
    cc_shared(
        rootfs / "usr/lib/x86_64-linux-gnu/libc.so.6",
        "libc.so.6",
        "int __libc_stub(void) { return 0; }\n",
        "GLIBC_2.2.5 { global: __libc_stub; local: *; };\n",
        nostdlib=True,
    )
    cc_shared(
        rootfs / "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        "ld-linux-x86-64.so.2",
        "int __ld_stub(void) { return 0; }\n",
        "GLIBC_2.2.5 { global: __ld_stub; local: *; };\nGLIBC_2.3 { } GLIBC_2.2.5;\n",
        nostdlib=True,
    )
    os.symlink("usr/lib", rootfs / "lib")
    (rootfs / "etc").mkdir()
    facts = sif(tmp_path, "old", rootfs)
    assert read_fabric_image_facts(facts).glibc_version == "2.2.5"
    with pytest.raises(UserError) as err:
        plan_for(facts, "tcp")
    msg = str(err.value)
    assert "needs GLIBC_2.34" in msg and "image's glibc is 2.2.5" in msg
    assert "glibc >= 2.34" in msg and "--fabric none" in msg and "\n" not in msg
    assert plan_for(facts, "none").mounts == ()  # the way out works


def test_image_without_glibc_is_refused(tmp_path):
    rootfs = tmp_path / "static"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy2("/bin/true", rootfs / "bin/true")  # no libc.so.6 next to it
    with pytest.raises(UserError, match=r"needs libc.so.6, which the image does not have"):
        plan_for(sif(tmp_path, "static", rootfs), "shm")


@needs_cc
def test_image_mpi_built_against_a_newer_libfabric_is_refused(tmp_path):
    """The image's libmpi needs fi_getinfo@FABRIC_1.7 (libfabric >= 1.20); the host has 1.17."""
    newer = cc_shared(
        tmp_path / "build/libfabric.so.1", "libfabric.so.1", fabric_source(7), fabric_map(7)
    )
    rootfs = make_rootfs(tmp_path / "rootfs")
    cc_shared(
        rootfs / "usr/lib/x86_64-linux-gnu/libmpi.so.40",
        "libmpi.so.40",
        "extern int fi_getinfo(void); int MPI_Init(void) { return fi_getinfo(); }\n",
        link=(str(newer),),
    )
    facts = sif(tmp_path, "mpi", rootfs)
    image = read_fabric_image_facts(facts)
    assert [o.path for o in image.consumers] == ["/usr/lib/x86_64-linux-gnu/libmpi.so.40"]
    with pytest.raises(UserError) as err:
        plan_for(facts, "tcp")
    msg = str(err.value)
    assert "libmpi.so.40 needs FABRIC_1.7" in msg and "up to FABRIC_1.6" in msg
    assert "libfabric <= 1.17" in msg and "--fabric none" in msg


def fabric_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "rankwire"), "fabric", *args],
        capture_output=True,
        text=True,
    )


def test_cli_plan_json_for_an_image(tmp_path):
    facts = sif(tmp_path, "img", make_rootfs(tmp_path / "rootfs"))
    proc = fabric_cli("plan", facts.path, "--fabric", "shm", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["provider"] == "shm" and plan["env"]["FI_PROVIDER"] == "shm"
    assert {
        "kind": "bind",
        "target": f"{LIB_DIR}/libfabric.so.1",
        "source": LIBFABRIC,
        "readonly": True,
        "recursive": False,
        "options": "",
    } in plan["mounts"]
    proc = fabric_cli("plan", facts.path, "--fabric", "verbs")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("rankwire: --fabric verbs:")


def test_link_down_and_soft_rdma_are_not_fast_fabrics(host_image):
    lib = libfabric_facts(LIBFABRIC, "1.17", providers_of("mlx5"), environ={})
    down = host("mlx5", lib)
    down = dataclasses.replace(
        down, adapters=tuple(dataclasses.replace(a, state="1: DOWN") for a in down.adapters)
    )
    plan = plan_fabric(down, host_image, "auto")
    assert plan.provider == "" and "mlx5_0" in plan.reason and "link is not active" in plan.reason
    rxe = Adapter(
        "soft-rdma",
        "rxe0",
        "",
        "",
        "",
        "",
        "",
        "Ethernet",
        "4: ACTIVE",
        ("/dev/infiniband/uverbs0",),
    )
    plan = plan_fabric(FabricHostFacts((rxe,), rxe.devices, lib), host_image, "auto")
    assert plan.provider == "" and plan.reason.startswith("no fabric adapter found")


# -- adapter-kind preference on a host with two kinds (mutation-testing kills) ---------------
@pytest.mark.parametrize(
    ("trees", "provider"),
    [(("efa", "mlx5"), "efa"), (("mlx5", "efa"), "efa"), (("opx", "mlx5"), "opx"),
     (("cxi", "efa"), "cxi")],
)  # fmt: skip
def test_the_best_adapter_kind_wins_whatever_the_order(
    trees: tuple[str, str], provider: str
) -> None:
    from rankwire.fabric.plan import _auto

    hosts = [host(t, None) for t in trees]
    every = sorted({p for t in trees for p in providers_of(t)})
    lib = libfabric_facts(LIBFABRIC, "1.17", every, environ={})
    both = FabricHostFacts(
        hosts[0].adapters + hosts[1].adapters, hosts[0].devices + hosts[1].devices, lib
    )
    best = host(provider, lib)  # the recorded tree of that kind
    seen = ", ".join(a.describe() for a in best.adapters)
    assert _auto(both) == (
        provider, f"{seen}; host libfabric 1.17 has the {provider} provider"
    )  # fmt: skip


def _elf(defines: tuple[str, ...] = (), requires=()) -> ElfFacts:
    return ElfFacts("x.so", (), (), (), "x86_64", 64, defines, requires)


def test_abi_refusals_exactly(debian_lib) -> None:
    from rankwire.fabric.imagefacts import FabricImageFacts, ImageObject
    from rankwire.fabric.plan import check_abi

    needs = _elf(requires=(("libnl-3.so.200", ("X",)), ("libc.so.6", ("GLIBC_2.34", "GLIBC_2.38"))))
    libc = ImageObject("/lib/x86_64-linux-gnu/libc.so.6", _elf(("GLIBC_2.2.5", "GLIBC_2.17")))
    old = FabricImageFacts((libc,), (), (), "")
    with pytest.raises(UserError) as err:
        check_abi([("libfabric.so.1", needs)], old, debian_lib)
    assert str(err.value) == (
        "cannot bind the host libfabric: host libfabric.so.1 needs GLIBC_2.38 (and 1 more) "
        "but the image's glibc is 2.17; rebuild the image on glibc >= 2.38 or use --fabric none"
    )
    one = _elf(requires=(("libc.so.6", ("GLIBC_2.34",)),))
    with pytest.raises(UserError) as err:
        check_abi([("libefa.so.1", one)], old, debian_lib)
    assert str(err.value) == (
        "cannot bind the host libfabric: host libefa.so.1 needs GLIBC_2.34 but the image's "
        "glibc is 2.17; rebuild the image on glibc >= 2.34 or use --fabric none"
    )
    for image, suffix in ((old, ""), (EMPTY_IMAGE, " (not a glibc image?)")):
        lacking = _elf(requires=(("libpthread.so.0", ("GLIBC_2.2.5",)),))
        with pytest.raises(UserError) as err:
            check_abi([("libfabric.so.1", lacking)], image, debian_lib)
        assert str(err.value) == (
            "cannot bind the host libfabric: libfabric.so.1 needs libpthread.so.0, which the "
            f"image does not have{suffix}; use --fabric none"
        )


def test_dl_provider_names_and_the_next_adapter_kind() -> None:
    from rankwire.fabric.plan import _auto, _dl_name

    assert _dl_name("/usr/lib/libfabric/libpsm3-fi.so") == "psm3"
    assert _dl_name("/usr/lib/libfabric/psm3-fi.so") == ""
    assert _dl_name("/usr/lib/libfabric/libpsm3.so") == ""
    assert _dl_name("libopx-fi.so") == "opx"
    # An EFA adapter whose link is down does not stop the search: the next kind is used.
    lib = libfabric_facts(LIBFABRIC, "1.17", ["efa", "verbs"], environ={})
    efa, mlx5 = host("efa", lib), host("mlx5", lib)
    down = tuple(dataclasses.replace(a, state="1: DOWN") for a in efa.adapters)
    both = FabricHostFacts(down + mlx5.adapters, efa.devices + mlx5.devices, lib)
    provider, reason = _auto(both)
    assert provider == "verbs" and reason.startswith("ConnectX-6 mlx5_0")


def test_device_binds_are_writable_and_the_plan_frozen(host_image) -> None:
    lib = libfabric_facts(LIBFABRIC, "1.17", providers_of("mlx5"), environ={})
    plan = plan_fabric(host("mlx5", lib), host_image, "auto")
    b = binds(plan)
    assert b["/dev/shm"] == Mount("bind", "/dev/shm", "/dev/shm")
    assert b["/dev/infiniband/uverbs0"] == Mount(
        "bind", "/dev/infiniband/uverbs0", "/dev/infiniband/uverbs0"
    )
    assert b[f"{LIB_DIR}/libfabric.so.1"].readonly is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.provider = "tcp"  # type: ignore[misc]


def test_without_a_host_libfabric_every_adapter_kind_is_named() -> None:
    from rankwire.fabric.plan import _auto

    efa, mlx5 = host("efa", None), host("mlx5", None)
    both = FabricHostFacts(efa.adapters + mlx5.adapters, efa.devices + mlx5.devices, None)
    seen = [", ".join(a.describe() for a in h.adapters) for h in (efa, mlx5)]
    assert _auto(both) == (
        "",
        f"{seen[0]} found but the host has no libfabric; {seen[1]} found but the host has no "
        "libfabric; nothing bound",
    )
