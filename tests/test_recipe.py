"""`rankwire recipe`: recipes matched to host facts (recorded fixtures and this host)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import yaml

from harness.users import User, rw
from rankwire.errors import UserError
from rankwire.runtime import deffile
from rankwire.runtime.doctorhost import CpuFacts, RecipeHostFacts
from rankwire.runtime.recipe import Choice, cpu_target, plan_def, plan_spack

DATA = Path(__file__).parent / "data" / "recipe"
REGEN = os.environ.get("RANKWIRE_REGEN_GOLDEN") == "1"


def facts(name: str) -> RecipeHostFacts:
    return RecipeHostFacts.from_json((DATA / f"{name}.json").read_text(), name)


def golden(name: str, text: str) -> None:
    path = DATA / f"{name}.golden"
    if REGEN:
        path.write_text(text)
    assert text == path.read_text()


def mpi_spec(text: str) -> tuple[str, dict]:
    doc = yaml.safe_load(text)["spack"]
    return doc["specs"][0], doc


# fixture -> (mpi, the MPI spec, package requirements)
SPACK = {
    "pmi2-only": (
        "mpich",
        "mpich pmi=pmi2 device=ch4 netmod=ofi",
        {"libfabric": "@1.17 fabrics=tcp,rxm,shm"},
    ),
    "pmix": (
        "openmpi",
        "openmpi schedulers=slurm ~internal-pmix fabrics=ofi",
        {"libfabric": "@1.18 fabrics=verbs,tcp,rxm,shm", "pmix": "@4", "slurm": "@23-02"},
    ),
    "slingshot": (
        "mpich",
        "mpich pmi=pmi2 device=ch4 netmod=ofi",
        {"libfabric": "@1.20 fabrics=tcp,rxm,shm"},
    ),
    "efa": (
        "openmpi",
        "openmpi schedulers=slurm ~internal-pmix fabrics=ofi",
        {"libfabric": "@1.22 fabrics=efa,tcp,rxm,shm", "pmix": "@4", "slurm": "@23-02"},
    ),
    "tcp": (
        "mpich",
        "mpich pmi=pmix ~hydra device=ch4 netmod=ofi",
        {"libfabric": "fabrics=tcp,rxm,shm", "pmix": "@3"},
    ),
}
TARGETS = {"pmi2-only": "zen3", "pmix": "icelake", "slingshot": "zen3", "efa": "skylake_avx512"}


@pytest.mark.parametrize("name", sorted(SPACK))
def test_spack_recipe_per_fixture(name: str):
    mpi, spec, packages = SPACK[name]
    recipe = plan_spack(facts(name), mpi)
    golden(f"{name}.spack-{mpi}", recipe.text)
    first, doc = mpi_spec(recipe.text)
    assert first == spec
    assert doc["container"]["format"] == "singularity"
    assert doc["container"]["images"]["spack"] == "0.23.1"
    target = TARGETS.get(name, "zen3")
    assert doc["packages"]["all"] == {"require": f"target={target}"}
    assert {k: v["require"] for k, v in doc["packages"].items() if k != "all"} == {
        k: f"{v} target={target}" for k, v in packages.items()
    }
    assert doc["concretizer"] == {"unify": True, "targets": {"host_compatible": False}}
    # every choice is explained, and its reason is in the recipe as a comment
    assert [c.what for c in recipe.choices][:4] == ["os", "spack", "glibc", "target"]
    comments = " ".join(
        line.strip().lstrip("#").strip() for line in recipe.text.splitlines() if "#" in line
    )
    pmi = next(c for c in recipe.choices if c.what == "pmi")
    assert " ".join(pmi.why.split()) in " ".join(comments.split())


def test_openmpi_on_pmi2_only_slurm_is_open_mpi_4_with_slurm_pmi():
    spec, _ = mpi_spec(plan_spack(facts("pmi2-only"), "openmpi").text)
    assert spec == "openmpi@4.1 +pmi schedulers=slurm"


def test_mpich_on_slingshot_follows_pmix_when_it_is_the_default():
    f = dataclasses.replace(facts("slingshot"), mpi_default="pmix_v5")
    spec, doc = mpi_spec(plan_spack(f, "mpich", specs=["osu-micro-benchmarks"]).text)
    assert spec == "mpich pmi=pmix ~hydra device=ch4 netmod=ofi"
    assert doc["specs"][1] == "osu-micro-benchmarks"
    assert doc["packages"]["pmix"] == {"require": "@5 target=zen3"}


@pytest.mark.parametrize(
    "name,mpi,base,srun_mpi",
    [
        ("pmi2-only", "mpich", "debian:12", "pmi2"),
        ("pmix", "openmpi", "rockylinux:9", "pmix"),
        ("tcp", "mpich", "debian:12", "pmix"),  # pmix-only Slurm: the tasks' PMI bridge
    ],
)
def test_def_recipe_per_fixture_parses(name: str, mpi: str, base: str, srun_mpi: str):
    recipe = plan_def(facts(name), mpi, base)
    golden(f"{name}.def-{mpi}", recipe.text)
    image = deffile.parse(recipe.text, f"{name}.def").image
    assert (image.bootstrap, image.from_) == ("docker", base)
    assert dict(image.labels)["org.rankwire.recipe.launch"].startswith(
        f"srun --mpi={srun_mpi} rankwire exec "
    )


NO_WIREUP = (
    "this Slurm offers no pmi2 or pmix plugin (srun --mpi=list: cray_shasta), so srun "
    "cannot wire up MPI ranks in the image; ask the admin for Slurm's pmi2 or pmix plugin, "
    "or launch with `rankwire run` inside the allocation"
)


@pytest.mark.parametrize("mpi,base", [("openmpi", "ubuntu:22.04"), ("mpich", "debian:12")])
def test_host_that_cannot_be_matched(mpi: str, base: str):
    f = dataclasses.replace(facts("pmi2-only"), mpi_plugins=("cray_shasta", "none"))
    with pytest.raises(UserError) as err:
        plan_def(f, mpi, base)
    assert str(err.value) == NO_WIREUP


def test_open_mpi_on_a_pmi2_only_slurm_goes_through_the_bridge():
    recipe = plan_def(facts("pmi2-only"), "openmpi", "ubuntu:22.04")
    pmi = next(c for c in recipe.choices if c.what == "pmi")
    assert pmi.value == "PMIx over PMI-2"
    labels = dict(deffile.parse(recipe.text, "r.def").image.labels)
    assert labels["org.rankwire.recipe.launch"] == "srun --mpi=pmi2 rankwire exec IMAGE APP"


def test_base_glibc_older_than_the_host_libfabric_needs():
    f = dataclasses.replace(facts("slingshot"), libfabric_glibc="2.35")
    with pytest.raises(UserError) as err:
        plan_def(f, "openmpi", "rockylinux:9")
    assert str(err.value) == (
        "--base rockylinux:9: its glibc 2.34 is older than the 2.35 the host libfabric needs, "
        "so the host's cxi provider cannot be bound into the image; use a base with glibc "
        ">= 2.35 (debian:12, ubuntu:22.04, ubuntu:24.04)"
    )


def test_slurm_without_pmi2_or_pmix():
    f = dataclasses.replace(facts("pmi2-only"), mpi_plugins=("none", "cray_shasta"))
    with pytest.raises(UserError) as err:
        plan_spack(f, "mpich")
    assert str(err.value) == (
        "this Slurm offers no pmi2 or pmix plugin (srun --mpi=list: cray_shasta), so srun "
        "cannot wire up MPI ranks in the image; ask the admin for Slurm's pmi2 or pmix "
        "plugin, or launch with `rankwire run` inside the allocation"
    )


def test_spack_os_must_be_one_spack_has():
    with pytest.raises(UserError) as err:
        plan_spack(facts("efa"), "mpich", os_image="debian:12")
    assert str(err.value) == (
        "--os debian:12: Spack has no container image for it; use one of ubuntu:20.04, "
        "ubuntu:22.04, ubuntu:24.04, rockylinux:8, rockylinux:9, almalinux:8, almalinux:9, "
        "centos:stream9, fedora:39, fedora:40, opensuse/leap:15, amazonlinux:2"
    )


@pytest.mark.parametrize(
    "cpu,target",
    [
        (CpuFacts("x86_64", "AuthenticAMD", 0x19, 0x11, "", "", ()), "zen4"),
        (CpuFacts("x86_64", "AuthenticAMD", 0x17, 0x31, "", "", ()), "zen2"),
        (CpuFacts("x86_64", "GenuineIntel", 6, 143, "", "", ("avx512_fp16",)), "sapphirerapids"),
        (
            CpuFacts(
                "x86_64",
                "HygonGenuine",
                0x18,
                0,
                "",
                "",
                ("cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"),
            ),
            "x86_64_v2",
        ),
        (CpuFacts("aarch64", "", None, None, "0x41", "0xd4f", ()), "neoverse_v2"),
        (CpuFacts("aarch64", "", None, None, "0x48", "0xd01", ()), "aarch64"),
    ],
)
def test_cpu_targets(cpu: CpuFacts, target: str):
    assert cpu_target(cpu)[0] == target


def test_cli_errors_are_one_line_and_exit_2(tmp_path: Path):
    user = User("root", 0, 0, "/root") if os.getuid() == 0 else None
    if user is None:
        pytest.skip("not running as root")
    recorded = json.loads((DATA / "pmi2-only.json").read_text())
    no_pmi = tmp_path / "no-pmi.json"
    no_pmi.write_text(json.dumps({**recorded, "mpi_plugins": ["cray_shasta", "none"]}))
    proc = rw(
        user,
        "recipe",
        "def",
        "--mpi",
        "openmpi",
        "--base",
        "ubuntu:22.04",
        "--host-facts",
        str(no_pmi),
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"rankwire: {NO_WIREUP}"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"cpu": {}}))
    proc = rw(user, "recipe", "spack", "--mpi", "mpich", "--host-facts", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"rankwire: {bad}: not recorded host facts ('adapters' missing); record them on "
        "the cluster with `rankwire recipe facts > FILE.json`"
    ]
    out = tmp_path / "spack.yaml"
    proc = rw(
        user,
        "recipe",
        "spack",
        "--mpi",
        "openmpi",
        "--explain",
        "--out",
        str(out),
        "--host-facts",
        str(DATA / "efa.json"),
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == (DATA / "efa.spack-openmpi.golden").read_text()
    lines = proc.stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == [
        "os",
        "spack",
        "glibc",
        "target",
        "pmi",
        "fabrics",
        "mpi",
        "libfabric",
        "pmix",
        "slurm",
    ]
    assert lines[4] == (
        "pmi        pmix: Slurm offers pmix, pmix_v4 (srun --mpi=list: pmi2, pmix, pmix_v4); "
        "run with `srun --mpi=pmix` (MpiDefault=none)"
    )


@pytest.mark.slurm
@pytest.mark.usefixtures("nothing_left_behind")
def test_recipe_from_this_hosts_real_facts(runner: User, slurm_cluster, shared_dir: Path):
    env = slurm_cluster.env
    proc = rw(runner, "recipe", "facts", env=env)
    assert proc.returncode == 0, proc.stderr
    f = RecipeHostFacts.from_json(proc.stdout)
    assert "pmi2" in f.mpi_plugins and f.slurm_version.startswith("slurm")
    assert f.mpi_default == "none"
    proc = rw(runner, "recipe", "spack", "--mpi", "mpich", env=env)
    assert proc.returncode == 0, proc.stderr
    spec, doc = mpi_spec(proc.stdout)
    assert spec.startswith("mpich pmi=pmi2 ")
    assert doc["container"]["format"] == "singularity"
    proc = rw(runner, "recipe", "def", "--mpi", "mpich", "--base", "debian:12", env=env)
    assert proc.returncode == 0, proc.stderr
    assert deffile.parse(proc.stdout).image.from_ == "debian:12"


def test_distribution_mpich_cannot_drive_slingshot():
    recipe = plan_def(facts("slingshot"), "mpich", "debian:12")
    fabric = next(c for c in recipe.choices if c.what == "fabric")
    assert fabric == Choice(
        "fabric",
        "ch4:ucx",
        "debian:12's MPICH is built ch4:ucx and loads no libfabric: Cassini-2 (Slingshot) "
        "cxi0 (0000:41:00.0) cannot be driven by it (ranks fall back to TCP); use --mpi "
        "openmpi or `rankwire recipe spack` for the fast fabric",
    )
    pmi = next(c for c in recipe.choices if c.what == "pmi")
    assert pmi.why == (
        "debian:12's MPICH 4.0.2 speaks only PMI-1, which Slurm's pmi2 plugin also serves; "
        "run with `srun --mpi=pmi2` (MpiDefault=cray_shasta)"
    )


def test_host_without_slurm_is_matched_to_rankwire_run():
    f = dataclasses.replace(
        facts("tcp"), slurm_version="", mpi_plugins=(), mpi_default="", slurm_error=""
    )
    spec, _ = mpi_spec(plan_spack(f, "mpich").text)
    assert spec == "mpich pmi=pmi2 device=ch4 netmod=ofi"
    recipe = plan_def(f, "openmpi", "ubuntu:24.04")
    assert recipe.choices[-1] == Choice(
        "launch",
        "rankwire run -n N --image IMAGE APP",
        "how the ranks of this image get wired up here",
    )
    assert recipe.choices[0].why == (
        "asked for with --base; what its MPI packages speak: from its package metadata, "
        "not verified on it"
    )
    assert deffile.parse(recipe.text).image.from_ == "ubuntu:24.04"


def test_spack_os_default_follows_the_host_libfabric_glibc():
    f = dataclasses.replace(facts("slingshot"), libfabric_glibc="2.38")
    recipe = plan_spack(f, "openmpi")
    assert recipe.choices[0] == Choice(
        "os", "ubuntu:24.04", "the first Ubuntu whose glibc covers the host libfabric's 2.38"
    )


def test_spack_target_and_spec_options():
    text = plan_spack(facts("efa"), "mpich", ["hpl +openmp"], target="x86_64_v3").text
    doc = yaml.safe_load(text)["spack"]
    assert doc["specs"] == ["mpich pmi=pmi2 device=ch4 netmod=ofi", "hpl +openmp"]
    assert doc["packages"]["all"] == {"require": "target=x86_64_v3"}
    with pytest.raises(UserError) as err:
        plan_spack(facts("efa"), "mpich", target="zen3; rm")
    assert str(err.value) == "--target zen3; rm: not a Spack target name (e.g. x86_64_v3, zen3)"
    with pytest.raises(UserError) as err:
        plan_spack(facts("efa"), "mpich", ["--fresh"])
    assert str(err.value) == (
        "--spec --fresh: not a Spack spec; give e.g. --spec osu-micro-benchmarks"
    )


def test_cli_explain_alone_and_bad_paths(tmp_path: Path):
    if os.getuid() != 0:
        pytest.skip("not running as root")
    root = User("root", 0, 0, "/root")
    proc = rw(
        root,
        "recipe",
        "def",
        "--mpi",
        "mpich",
        "--base",
        "debian:12",
        "--explain",
        "--host-facts",
        str(DATA / "pmi2-only.json"),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == (
        "launch  srun --mpi=pmi2 rankwire exec IMAGE APP: how the ranks of this image get "
        "wired up here"
    )
    assert "Bootstrap" not in proc.stdout
    missing = tmp_path / "nope.json"
    proc = rw(root, "recipe", "spack", "--mpi", "mpich", "--host-facts", str(missing))
    assert (proc.returncode, proc.stderr.splitlines()) == (
        2,
        [
            f"rankwire: --host-facts {missing}: cannot read it (No such file or directory); give "
            "the file `rankwire recipe facts` wrote"
        ],
    )
    out = tmp_path / "no-such-dir" / "spack.yaml"
    proc = rw(
        root,
        "recipe",
        "spack",
        "--mpi",
        "mpich",
        "--out",
        str(out),
        "--host-facts",
        str(DATA / "tcp.json"),
    )
    assert (proc.returncode, proc.stderr.splitlines()) == (
        2,
        [
            f"rankwire: --out {out}: cannot write there (No such file or directory); pick a "
            "writable directory"
        ],
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_cli_mpi_is_required_and_checked():
    if os.getuid() != 0:
        pytest.skip("not running as root")
    root = User("root", 0, 0, "/root")
    proc = rw(root, "recipe", "spack", "--host-facts", str(DATA / "tcp.json"))
    assert (proc.returncode, proc.stderr.splitlines()) == (
        2,
        ["rankwire: missing option '--mpi': see rankwire recipe spack --help"],
    )
    proc = rw(root, "recipe", "def", "--mpi", "intel", "--host-facts", str(DATA / "tcp.json"))
    assert (proc.returncode, proc.stderr.splitlines()) == (
        2,
        ["rankwire: --mpi intel: use mpich or openmpi"],
    )
