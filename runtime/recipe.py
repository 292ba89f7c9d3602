"""`rankwire recipe`: host facts + options -> a recipe for an MPI image, and why (pure).

`plan_spack` writes a `spack.yaml` (with a `container:` section for `spack containerize`),
`plan_def` an Apptainer definition file installing a distribution's MPI. Both match the
image to the host facts (`runtime/doctorhost.RecipeHostFacts`): the PMI Slurm's `srun
--mpi` offers, the fabric adapters and the host libfabric (its version bounds the image's,
its glibc needs bound the base image's), the CPU. Every choice is a `Choice` whose reason
is also written into the recipe as a comment; a host that cannot be matched is a one-line
`UserError` naming the mismatch and the ways out.

Limits, said once: Spack's variant names are those of Spack `SPACK_VERSION`'s mpich and
openmpi packages; the distribution MPI facts in `DISTROS` come from the distributions'
packages (only Debian 12's were verified here, see /work/shared/research/pmi.md); CPU
target names come from a small table (`cpu_target`: AMD by family/model, Intel by its
newest AVX-512 features, a few Arm parts): an unknown CPU gets the generic x86-64 level or
its machine name, and flags a hypervisor hides lower the answer. Nothing here has been
run through `spack containerize`/`spack concretize` (no Spack on the test machines).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Optional

from rankwire.errors import UserError, shown
from rankwire.pmi.bridgeplan import slurm_wireup
from rankwire.record import record
from rankwire.runtime.doctorhost import CpuFacts, RecipeHostFacts

MPIS = ("mpich", "openmpi")
SPACK_VERSION = "0.23.1"
# `container: images: os:` values of Spack's images.json, with their glibc.
SPACK_OS = {
    "ubuntu:20.04": "2.31",
    "ubuntu:22.04": "2.35",
    "ubuntu:24.04": "2.39",
    "rockylinux:8": "2.28",
    "rockylinux:9": "2.34",
    "almalinux:8": "2.28",
    "almalinux:9": "2.34",
    "centos:stream9": "2.34",
    "fedora:39": "2.38",
    "fedora:40": "2.39",
    "opensuse/leap:15": "2.31",
    "amazonlinux:2": "2.26",
}
DEFAULT_SPACK_OS = "ubuntu:22.04"
# os-release ID -> the image name of the same distribution.
_DISTRO_IMAGE = {
    "rocky": "rockylinux",
    "almalinux": "almalinux",
    "ubuntu": "ubuntu",
    "debian": "debian",
    "fedora": "fedora",
    "centos": "centos",
    "amzn": "amazonlinux",
    "opensuse-leap": "opensuse/leap",
}
# Adapter kinds (fabric/hostfacts.Adapter.kind) that make a fabric fast, with the
# libfabric providers that drive them, best first (as fabric/plan.FAST_FABRICS).
FAST_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cxi", ("cxi",)),
    ("efa", ("efa",)),
    ("hfi1", ("opx", "psm2")),
    ("mlx5", ("verbs",)),
    ("rdma", ("verbs",)),
)
# The image's own libfabric: providers that work everywhere, plus the adapter's when
# Spack's libfabric can build it without vendor libraries.
PORTABLE_PROVIDERS = ("tcp", "rxm", "shm")
SPACK_PROVIDER = {"efa": "efa", "verbs": "verbs", "psm2": "psm2", "opx": "opx"}


@record
class Choice:
    what: str
    value: str
    why: str


@record
class Recipe:
    kind: str  # spack | def
    text: str
    choices: tuple[Choice, ...]

    def explain_lines(self) -> list[str]:
        width = max((len(c.what) for c in self.choices), default=0)
        return [f"{c.what:<{width}}  {c.value}: {c.why}" for c in self.choices]


@record
class Distro:
    """What a distribution's packages give an MPI image. `verified`: checked on that
    distribution (/work/shared/research/pmi.md, libfabric.md); the others are from the
    distribution's package metadata and MPI's own defaults, not checked here."""

    base: str
    glibc: str
    update: str
    install: str
    clean: str
    mpich: tuple[str, ...]  # packages
    mpich_version: str
    mpich_pmi: str  # what its MPICH client speaks: "PMI-1" (simple) only, for all of these
    mpich_netmod: str  # ch4:ucx | ch3:nemesis: neither loads libfabric; ch4:ofi does
    mpich_env: tuple[tuple[str, str], ...]
    openmpi: tuple[str, ...]
    openmpi_version: str
    openmpi_pmix: str  # the libpmix it uses
    openmpi_libfabric: str  # the libfabric it was built against
    openmpi_env: tuple[tuple[str, str], ...]
    verified: bool = False


_APT = (
    "apt-get update",
    "apt-get install -y --no-install-recommends",
    "rm -rf /var/lib/apt/lists/*",
)
_DNF = ("dnf install -y dnf-plugins-core", "dnf install -y", "dnf clean all")
_RH_OMPI = (("PATH", "/usr/lib64/openmpi/bin:$PATH"), ("LD_LIBRARY_PATH", "/usr/lib64/openmpi/lib"))
_RH_MPICH = (("PATH", "/usr/lib64/mpich/bin:$PATH"), ("LD_LIBRARY_PATH", "/usr/lib64/mpich/lib"))
DISTROS = {
    d.base: d
    for d in (
        Distro(
            "debian:12", "2.36", *_APT,
            ("mpich", "libmpich-dev", "gcc", "libc6-dev"), "4.0.2", "PMI-1", "ch4:ucx", (),
            ("openmpi-bin", "libopenmpi-dev", "gcc", "libc6-dev"), "4.1.4", "4.2.2", "1.17", (),
            verified=True,
        ),
        Distro(
            "ubuntu:22.04", "2.35", *_APT,
            ("mpich", "libmpich-dev", "gcc", "libc6-dev"), "4.0", "PMI-1", "ch4:ucx", (),
            ("openmpi-bin", "libopenmpi-dev", "gcc", "libc6-dev"), "4.1.2", "4.1.2", "1.11", (),
        ),
        Distro(
            "ubuntu:24.04", "2.39", *_APT,
            ("mpich", "libmpich-dev", "gcc", "libc6-dev"), "4.2.0", "PMI-1", "ch4:ucx", (),
            ("openmpi-bin", "libopenmpi-dev", "gcc", "libc6-dev"), "4.1.6", "5.0.1", "1.17", (),
        ),
        Distro(
            "rockylinux:9", "2.34", *_DNF,
            ("mpich", "mpich-devel", "gcc"), "4.1.1", "PMI-1", "ch3:nemesis", _RH_MPICH,
            ("openmpi", "openmpi-devel", "gcc"), "4.1.1", "3.2.3", "1.18", _RH_OMPI,
        ),
    )
}  # fmt: skip


# -- facts, as the recipes see them -----------------------------------------------------
@record
class SlurmPmi:
    present: bool  # a working srun
    pmi2: bool
    pmix: tuple[str, ...]  # pmix plugins offered: "pmix", "pmix_v4"
    default: str  # MpiDefault
    offered: str  # for messages: "pmi2, pmix, pmix_v4" or "nothing"

    @property
    def pmix_major(self) -> str:
        """ "4" from pmix_v4 (the newest versioned plugin); "" when none is versioned."""
        majors = [p[len("pmix_v") :] for p in self.pmix if p.startswith("pmix_v")]
        majors = [m for m in majors if m.isdigit()]
        return max(majors, key=int) if majors else ""


def slurm_pmi(f: RecipeHostFacts) -> SlurmPmi:
    plugins = f.mpi_plugins
    pmix = tuple(p for p in plugins if p == "pmix" or p.startswith("pmix_v"))
    useful = [p for p in plugins if p != "none"]
    return SlurmPmi(
        present=bool(f.slurm_version),
        pmi2="pmi2" in plugins,
        pmix=pmix,
        default=f.mpi_default,
        offered=", ".join(useful) or "nothing",
    )


@record
class Fabric:
    kind: str  # adapter kind; "" when no fast adapter was found
    adapters: str  # how they are described
    provider: str  # the host libfabric provider that drives them; "" when it has none
    why: str


def host_fabric(f: RecipeHostFacts) -> Fabric:
    """The best fast fabric the host has, and whether its libfabric drives it."""
    for kind, providers in FAST_KINDS:
        found = [a for a in f.adapters if a.kind == kind]
        if not found:
            continue
        seen = ", ".join(a.describe() for a in found)
        if not f.libfabric_version:
            return Fabric(kind, seen, "", f"{seen} found, but the host has no libfabric")
        for provider in providers:
            if provider in f.libfabric_providers:
                why = f"{seen}; host libfabric {f.libfabric_version} has the {provider} provider"
                return Fabric(kind, seen, provider, why)
        return Fabric(
            kind,
            seen,
            "",
            f"{seen} found, but host libfabric {f.libfabric_version} has no "
            f"{'/'.join(providers)} provider",
        )
    return Fabric("", "", "", "no fast fabric adapter (cxi, efa, hfi1, mlx5) found")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def _major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


# -- CPU target ---------------------------------------------------------------------------
_X86_LEVELS = (
    ("x86_64_v4", ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")),
    ("x86_64_v3", ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave")),
    ("x86_64_v2", ("cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3")),
)
# Intel by the newest feature it has (Spack/archspec names); AMD by family and model.
_INTEL = (
    ("sapphirerapids", ("avx512_fp16",)),
    ("icelake", ("avx512_vbmi2", "avx512ifma", "avx512_vnni")),
    ("cascadelake", ("avx512_vnni",)),
    ("skylake_avx512", ("avx512f", "avx512bw")),
    ("broadwell", ("avx2", "adx", "rdseed")),
    ("haswell", ("avx2", "bmi2", "fma")),
)
_ARM = {
    ("0x41", "0xd0c"): "neoverse_n1",
    ("0x41", "0xd40"): "neoverse_v1",
    ("0x41", "0xd49"): "neoverse_n2",
    ("0x41", "0xd4f"): "neoverse_v2",
    ("0x46", "0x001"): "a64fx",
}


def x86_level(flags: Sequence[str]) -> str:
    have = set(flags)
    levels = [name for name, need in _X86_LEVELS if have.issuperset(need)]
    # a level needs every lower one
    for name in ("x86_64_v2", "x86_64_v3", "x86_64_v4"):
        if name not in levels:
            return {"x86_64_v2": "x86_64", "x86_64_v3": "x86_64_v2", "x86_64_v4": "x86_64_v3"}[name]
    return "x86_64_v4"


def cpu_target(cpu: CpuFacts) -> tuple[str, str]:
    """(Spack target name, how it was found) from the CPU facts; the generic level or the
    machine name when the table does not know the CPU."""
    if cpu.machine == "x86_64":
        level = x86_level(cpu.flags)
        if cpu.vendor == "AuthenticAMD" and cpu.family is not None and cpu.model is not None:
            zen = {
                0x17: "zen" if cpu.model < 0x30 else "zen2",
                0x19: "zen4" if cpu.model >> 4 in (0x1, 0x6, 0x7, 0xA) else "zen3",
                0x1A: "zen5",
            }.get(cpu.family, "")
            if zen:
                return zen, f"AMD family {cpu.family:#x} model {cpu.model:#x}"
        if cpu.vendor == "GenuineIntel":
            have = set(cpu.flags)
            for name, need in _INTEL:
                if have.issuperset(need):
                    return name, f"Intel with {', '.join(need)}"
        return level, f"the x86-64 level of the CPU flags ({cpu.vendor or 'unknown vendor'})"
    if cpu.machine == "aarch64":
        name = _ARM.get((cpu.implementer.lower(), cpu.part.lower()), "")
        if name:
            return name, f"CPU implementer {cpu.implementer} part {cpu.part}"
        return "aarch64", "an Arm CPU the table does not name"
    return cpu.machine or "unknown", "the machine name"


# -- checks both recipes make -------------------------------------------------------------
def _glibc_check(f: RecipeHostFacts, fabric: Fabric, image: str, glibc: str, flag: str) -> Choice:
    """The base image's glibc against what the host libfabric needs to be bound into it."""
    need = f.libfabric_glibc
    if not fabric.provider:
        return Choice("glibc", glibc, f"{image} ships glibc {glibc}; no host provider to bind")
    if need and _version(glibc) < _version(need):
        known = {d.base: d.glibc for d in DISTROS.values()} if flag == "--base" else SPACK_OS
        better = [name for name, g in known.items() if _version(g) >= _version(need)]
        raise UserError(
            f"{flag} {image}: its glibc {glibc} is older than the {need} the host libfabric "
            f"needs, so the host's {fabric.provider} provider cannot be bound into the image; "
            f"use a base with glibc >= {need} ({', '.join(better) or 'none known'})"
        )
    return Choice(
        "glibc",
        glibc,
        f"{image} ships glibc {glibc} >= {need or 'the glibc'} the host libfabric needs: "
        f"`rankwire exec --fabric auto` can bind it (and its {fabric.provider} provider) in",
    )


def _no_wireup(s: SlurmPmi) -> UserError:
    return UserError(
        f"this Slurm offers no pmi2 or pmix plugin (srun --mpi=list: {s.offered}), so srun "
        "cannot wire up MPI ranks in the image; ask the admin for Slurm's pmi2 or pmix "
        "plugin, or launch with `rankwire run` inside the allocation"
    )


def _srun_note(s: SlurmPmi, plugin: str) -> str:
    if s.default == plugin or (plugin == "pmix" and s.default.startswith("pmix")):
        return f"plain srun works (MpiDefault={s.default})"
    return f"run with `srun --mpi={plugin}` (MpiDefault={s.default or 'unknown'})"


# -- spack --------------------------------------------------------------------------------
def _spec_words(spec: str) -> str:
    spec = spec.strip()
    if not spec or "\n" in spec or spec.startswith("-"):
        raise UserError(
            f"--spec {shown(spec)!s}: not a Spack spec; give e.g. --spec osu-micro-benchmarks"
        )
    return spec


def default_spack_os(f: RecipeHostFacts) -> tuple[str, str]:
    """(os, why): the host's own distribution when Spack has an image of it, else
    DEFAULT_SPACK_OS (or the oldest with a glibc new enough for the host libfabric)."""
    ident, _, version = f.distro.partition(":")
    name = _DISTRO_IMAGE.get(ident, "")
    for candidate in (f"{name}:{version}", f"{name}:{version.split('.')[0]}"):
        if name and candidate in SPACK_OS:
            return candidate, f"the host's own distribution ({f.distro_name or f.distro})"
    need = f.libfabric_glibc
    if need and _version(SPACK_OS[DEFAULT_SPACK_OS]) < _version(need):
        newer = sorted(
            (
                o
                for o, g in SPACK_OS.items()
                if o.startswith("ubuntu:") and _version(g) >= _version(need)
            )
        )
        if newer:
            return newer[0], f"the first Ubuntu whose glibc covers the host libfabric's {need}"
    return DEFAULT_SPACK_OS, (
        f"Spack has no image of the host's {f.distro or 'distribution'}; "
        f"{DEFAULT_SPACK_OS} is the default (use --os to pick another)"
    )


def plan_spack(
    f: RecipeHostFacts,
    mpi: str,
    specs: Sequence[str] = (),
    os_image: Optional[str] = None,
    target: Optional[str] = None,
) -> Recipe:
    """A spack.yaml for an MPI image that wires up and uses the fabric on this host."""
    if mpi not in MPIS:
        raise UserError(f"--mpi {shown(mpi)}: use mpich or openmpi")
    app_specs = [_spec_words(s) for s in specs]
    choices: list[Choice] = []
    fabric = host_fabric(f)

    # -- base image
    if os_image is None:
        os_image, why = default_spack_os(f)
    elif os_image not in SPACK_OS:
        raise UserError(
            f"--os {shown(os_image)}: Spack has no container image for it; use one of "
            f"{', '.join(SPACK_OS)}"
        )
    else:
        why = "asked for with --os"
    choices.append(Choice("os", os_image, why))
    choices.append(
        Choice(
            "spack",
            SPACK_VERSION,
            "the Spack release whose mpich/openmpi variant names this recipe uses",
        )
    )
    choices.append(_glibc_check(f, fabric, os_image, SPACK_OS[os_image], "--os"))

    # -- target
    if target is None:
        target, how = cpu_target(f.cpu)
        why = (
            f"this host's CPU ({how}); every node running the image needs it: "
            f"use --target {x86_level(f.cpu.flags) if f.cpu.machine == 'x86_64' else 'NAME'} "
            "for a portable image"
        )
    elif not re.fullmatch(r"[a-z0-9_]+", target):
        raise UserError(f"--target {shown(target)}: not a Spack target name (e.g. x86_64_v3, zen3)")
    else:
        why = "asked for with --target"
    choices.append(Choice("target", target, why))

    # -- MPI, its PMI and fabric variants
    pick = _mpich_variants if mpi == "mpich" else _openmpi_variants
    variants, mpi_choices, packages, uses_libfabric = pick(f, slurm_pmi(f), fabric)
    choices += mpi_choices
    mpi_spec = " ".join([mpi, *variants]).replace(" @", "@")
    choices.append(Choice("mpi", mpi_spec, "the MPI spec, with the variants chosen above"))

    # -- libfabric
    if uses_libfabric:
        providers = list(PORTABLE_PROVIDERS)
        extra = SPACK_PROVIDER.get(fabric.provider, "")
        if extra:
            providers.insert(0, extra)
        lib_req = f"fabrics={','.join(providers)}"
        if f.libfabric_version:
            series = _major_minor(f.libfabric_version)
            lib_req = f"@{series} {lib_req}"
            why = (
                f"the host's libfabric is {f.libfabric_version}: built against the same series, "
                "the MPI needs no FABRIC_1.x symbol version the host's library lacks, so "
                + (
                    f"`--fabric auto` can bind the host's (with its {fabric.provider} provider) "
                    "over it"
                    if fabric.provider
                    else "a host libfabric can be bound over it"
                )
            )
            if fabric.kind and not extra:
                why += f"; the image's own has only {', '.join(PORTABLE_PROVIDERS)}"
        else:
            why = (
                f"the host has no libfabric to match: {', '.join(providers)} providers; "
                "rankwire checks FABRIC_1.x symbol versions when a host libfabric is bound"
            )
        packages.append(("libfabric", lib_req, why))
        choices.append(Choice("libfabric", lib_req, why))
    for name, req, why in packages:
        if name != "libfabric":
            choices.append(Choice(name, req, why))

    text = _spack_yaml(f, mpi, mpi_spec, app_specs, os_image, target, packages, choices)
    return Recipe("spack", text, tuple(choices))


Variants = tuple[list[str], list[Choice], list[tuple[str, str, str]], bool]


def _pmix_pin(s: SlurmPmi) -> list[tuple[str, str, str]]:
    major = s.pmix_major
    if not major:
        return []
    return [("pmix", f"@{major}", f"the same major version as Slurm's pmix_v{major}")]


def _mpich_variants(f: RecipeHostFacts, s: SlurmPmi, fabric: Fabric) -> Variants:
    """MPICH's variants: (variants, choices, package requirements, uses libfabric)."""
    if not s.present:
        pmi = "pmi2"
        why = (
            "no working srun here, so no Slurm to match: PMI-2, which `rankwire run` and "
            "Hydra serve"
        )
    elif s.pmi2 and not (s.pmix and s.default.startswith("pmix")):
        pmi = "pmi2"
        why = f"Slurm offers pmi2 (srun --mpi=list: {s.offered}); {_srun_note(s, 'pmi2')}"
    elif s.pmix:
        pmi = "pmix"
        why = (
            f"Slurm offers {', '.join(s.pmix)} (srun --mpi=list: {s.offered}); "
            f"{_srun_note(s, 'pmix')}"
        )
    else:
        raise _no_wireup(s)
    variants = [f"pmi={pmi}"]
    choices = [Choice("pmi", pmi, why)]
    packages: list[tuple[str, str, str]] = []
    if pmi == "pmix":
        variants.append("~hydra")
        choices.append(
            Choice(
                "hydra",
                "~hydra",
                "Spack's mpich cannot build Hydra with pmi=pmix; srun or `rankwire run` starts "
                "the ranks",
            )
        )
        packages += _pmix_pin(s)
    variants += ["device=ch4", "netmod=ofi"]
    if not fabric.kind:
        why = (
            f"{fabric.why}: ch4:ofi still, over libfabric's tcp and shm providers (the image "
            "takes a host libfabric on a cluster that has a fast fabric)"
        )
    else:
        why = (
            f"{fabric.why}: ch4:ofi over libfabric, built against an external libfabric so "
            "that the host's can replace it at run time"
        )
        if fabric.kind in ("mlx5", "rdma"):
            why += (
                " (netmod=ucx may be faster on InfiniBand, but loads no libfabric: nothing "
                "of the host's could be bound)"
            )
    choices.append(Choice("netmod", "device=ch4 netmod=ofi", why))
    return variants, choices, packages, True


def _openmpi_variants(f: RecipeHostFacts, s: SlurmPmi, fabric: Fabric) -> Variants:
    """Open MPI's variants: (variants, choices, package requirements, uses libfabric)."""
    variants: list[str] = []
    choices: list[Choice] = []
    packages: list[tuple[str, str, str]] = []
    if s.present and s.pmix:
        why = (
            f"Slurm offers {', '.join(s.pmix)} (srun --mpi=list: {s.offered}); "
            f"{_srun_note(s, 'pmix')}"
        )
        choices.append(Choice("pmi", "pmix", why))
        variants += ["schedulers=slurm", "~internal-pmix"]
        packages += _pmix_pin(s)
        if s.pmix_major and int(s.pmix_major) < 4:
            variants.insert(0, "@4.1")  # Open MPI 5 needs PMIx >= 4.2.4
    elif s.present and s.pmi2:
        variants += ["@4.1", "+pmi", "schedulers=slurm"]
        why = (
            f"Slurm offers pmi2 but no pmix (srun --mpi=list: {s.offered}): Open MPI 4.1 built "
            "with Slurm's PMI-2 library (+pmi; Open MPI 5 speaks only PMIx); "
            f"{_srun_note(s, 'pmi2')}"
        )
        choices.append(Choice("pmi", "+pmi", why))
    elif s.present:
        raise _no_wireup(s)
    else:
        variants.append("~internal-pmix")
        why = (
            "no working srun here, so no Slurm to match: PMIx, which `rankwire run` serves "
            "through libpmix"
        )
        choices.append(Choice("pmi", "pmix", why))
    slurm = _slurm_spack_version(f.slurm_version) if s.present else ""
    if slurm:
        why = (
            f"the host's Slurm ({f.slurm_version}): its PMI libraries and srun speak to this "
            "cluster's slurmd"
        )
        packages.append(("slurm", f"@{slurm}", why))
    if fabric.kind:
        variants.append("fabrics=ofi")
        why = (
            f"{fabric.why}: Open MPI's ofi MTL, over an external libfabric the host's can "
            "replace at run time"
        )
        choices.append(Choice("fabrics", "fabrics=ofi", why))
    else:
        why = f"{fabric.why}: Open MPI's own tcp and shared-memory transports"
        choices.append(Choice("fabrics", "(default)", why))
    return variants, choices, packages, bool(fabric.kind)


def _slurm_spack_version(version: str) -> str:
    """ "slurm-wlm 22.05.8" -> "22-05" (Spack's slurm versions are 22-05-8-1)."""
    m = re.search(r"(\d+)\.(\d+)", version)
    return f"{m.group(1)}-{m.group(2)}" if m else ""


def _q(text: str) -> str:
    """A YAML scalar that stays what it is (JSON strings are YAML)."""
    return json.dumps(text)


def _comment(text: str, indent: str) -> list[str]:
    """`text` as YAML/shell comment lines of at most ~90 characters."""
    out: list[str] = []
    line = ""
    for word in text.split():
        if line and len(indent) + 2 + len(line) + 1 + len(word) > 90:
            out.append(f"{indent}# {line}")
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        out.append(f"{indent}# {line}")
    return out


def _facts_summary(f: RecipeHostFacts) -> list[str]:
    s = slurm_pmi(f)
    slurm = (
        f"{f.slurm_version}: srun --mpi offers {s.offered}; MpiDefault={f.mpi_default or 'unknown'}"
        if s.present
        else f"no working srun{f' ({f.slurm_error})' if f.slurm_error else ''}"
    )
    lib = (
        f"libfabric {f.libfabric_version} ({', '.join(f.libfabric_providers)})"
        if f.libfabric_version
        else "no libfabric"
    )
    adapters = ", ".join(a.describe() for a in f.adapters) or "none"
    target, _ = cpu_target(f.cpu)
    lines = [
        slurm,
        f"{lib}; fabric adapters: {adapters}",
        f"glibc {f.glibc or 'unknown'}; {f.distro_name or f.distro or 'unknown distribution'}; "
        f"{f.cpu.machine} ({target})",
    ]
    out: list[str] = []
    for line in lines:
        first, *rest = _comment(line, "")
        out += [f"#   {first[2:]}", *(f"#     {more[2:]}" for more in rest)]
    return out


def _spack_yaml(
    f: RecipeHostFacts,
    mpi: str,
    mpi_spec: str,
    app_specs: Sequence[str],
    os_image: str,
    target: str,
    packages: Sequence[tuple[str, str, str]],
    choices: Sequence[Choice],
) -> str:
    why = {c.what: c for c in choices}
    lines = [
        f"# spack.yaml for an {mpi} image matched to this host by `rankwire recipe spack`.",
        "# Host facts:",
        *_facts_summary(f),
        "# Build: spack containerize > image.def && rankwire build image.sif image.def",
        "spack:",
        "  specs:",
    ]
    for key in ("pmi", "hydra", "netmod", "fabrics"):
        if key in why:
            lines += _comment(f"{why[key].value}: {why[key].why}", "  ")
    lines.append(f"  - {_q(mpi_spec)}")
    for spec in app_specs:
        lines.append(f"  - {_q(spec)}")
    lines += ["  concretizer:", "    unify: true", "    targets:"]
    lines += _comment(
        "the image is built on a build machine, not on this cluster: allow a target that "
        "machine may not run (the compiler in Spack's build image must know it)",
        "      ",
    )
    lines += ["      host_compatible: false", "  packages:", "    all:"]
    lines += _comment(f"target={target}: {why['target'].why}", "      ")
    lines.append(f"      require: {_q('target=' + target)}")
    for name, req, reason in packages:
        lines.append(f"    {name}:")
        lines += _comment(
            f"{reason} (a package's own require replaces all's: target again)", "      "
        )
        lines.append(f"      require: {_q(f'{req} target={target}')}")
    lines += [
        "  container:",
        "    format: singularity",
        "    images:",
    ]
    lines += _comment(f"{os_image}: {why['os'].why}; {why['glibc'].why}", "      ")
    lines += [
        f"      os: {_q(os_image)}",
        f"      spack: {_q(SPACK_VERSION)}",
        "    strip: true",
        "    labels:",
        f"      org.rankwire.recipe.mpi: {_q(mpi_spec)}",
        f"      org.rankwire.recipe.target: {_q(target)}",
    ]
    return "\n".join(lines) + "\n"


# -- definition file ----------------------------------------------------------------------
def default_base(f: RecipeHostFacts) -> tuple[str, str]:
    ident, _, version = f.distro.partition(":")
    name = _DISTRO_IMAGE.get(ident, "")
    for candidate in (f"{name}:{version}", f"{name}:{version.split('.')[0]}"):
        if name and candidate in DISTROS:
            return candidate, f"the host's own distribution ({f.distro_name or f.distro})"
    return "debian:12", (
        f"no table entry for the host's {f.distro or 'distribution'}; debian:12 is the "
        "default (use --base to pick another)"
    )


def plan_def(f: RecipeHostFacts, mpi: str, base: Optional[str] = None) -> Recipe:
    """An Apptainer definition file installing `base`'s own MPI packages, matched to this
    host (or a UserError saying why that MPI cannot work here and what to do)."""
    if mpi not in MPIS:
        raise UserError(f"--mpi {shown(mpi)}: use mpich or openmpi")
    if base is None:
        base, why = default_base(f)
    elif base not in DISTROS:
        raise UserError(
            f"--base {shown(base)}: no facts about its MPI packages; use one of "
            f"{', '.join(DISTROS)}, or `rankwire recipe spack`"
        )
    else:
        why = "asked for with --base"
    d = DISTROS[base]
    source = "verified on it" if d.verified else "from its package metadata, not verified on it"
    choices = [Choice("base", base, f"{why}; what its MPI packages speak: {source}")]
    s = slurm_pmi(f)
    fabric = host_fabric(f)
    choices.append(_glibc_check(f, fabric, base, d.glibc, "--base"))
    name = "MPICH" if mpi == "mpich" else "Open MPI"
    version = d.mpich_version if mpi == "mpich" else d.openmpi_version
    # The same answer `rankwire doctor IMAGE` gives for an image whose MPI speaks this.
    w = slurm_wireup(f.mpi_plugins, f.mpi_default, "pmi1/2" if mpi == "mpich" else "pmix")
    if mpi == "mpich":
        if not s.present:
            pmi = "pmi2"
            choices.append(
                Choice(
                    "pmi",
                    "PMI-1",
                    f"{base}'s MPICH {version} speaks only PMI-1; no working "
                    "srun here: `rankwire run` or Hydra's mpiexec serve it",
                )
            )
        elif w.direct:
            pmi = w.direct[0]
            note = _srun_note(s, pmi)
            if w.by_default == "bridged":
                note += (
                    ": plain srun (--mpi=pmix) works too, through rankwire's PMI bridge, "
                    "which costs start-up time"
                )
            choices.append(
                Choice(
                    "pmi",
                    "PMI-1",
                    f"{base}'s MPICH {version} speaks only PMI-1, which "
                    f"Slurm's pmi2 plugin also serves; {note}",
                )
            )
        elif w.bridged:
            pmi = w.bridged
            choices.append(
                Choice(
                    "pmi",
                    "PMI-1 over PMIx",
                    f"{base}'s MPICH {version} speaks only PMI-1 and this Slurm offers only "
                    f"{s.offered}: `srun --mpi=pmix … rankwire exec` (or --container-image) "
                    "gives each task a PMI_FD served through Slurm's PMIx by rankwire's PMI "
                    "bridge (--pmi-bridge auto); for MPICH speaking PMIx itself, use "
                    "`rankwire recipe spack`",
                )
            )
        else:
            raise _no_wireup(s)
        if d.mpich_netmod != "ch4:ofi":
            ucx = d.mpich_netmod == "ch4:ucx"
            fab = f"{base}'s MPICH is built {d.mpich_netmod} and loads no libfabric: " + (
                f"{fabric.adapters} cannot be driven by it (ranks fall back to TCP); use "
                "--mpi openmpi or `rankwire recipe spack` for the fast fabric"
                if fabric.kind in ("cxi", "efa", "hfi1") or (fabric.kind and not ucx)
                else "UCX drives InfiniBand through the image's own rdma-core"
                if fabric.kind
                else "TCP and shared memory"
            )
        else:
            fab = _ofi_fabric_note(f, fabric, d.openmpi_libfabric)
        choices.append(Choice("fabric", d.mpich_netmod, fab))
        packages, env = d.mpich, d.mpich_env
    else:
        if s.present and w.direct:
            pmi = w.direct[0]
            choices.append(
                Choice(
                    "pmi",
                    f"PMIx {d.openmpi_pmix}",
                    f"{base}'s Open MPI {version} speaks only "
                    f"PMIx (libpmix {d.openmpi_pmix}), served by Slurm's {', '.join(s.pmix)} "
                    f"(PMIx clients and servers of different versions interoperate since "
                    f"v2.1); {_srun_note(s, 'pmix')}",
                )
            )
        elif s.present and w.bridged:
            pmi = w.bridged
            choices.append(
                Choice(
                    "pmi",
                    "PMIx over PMI-2",
                    f"{base}'s Open MPI {version} speaks only PMIx and this Slurm offers only "
                    f"{s.offered}: `srun --mpi=pmi2 … rankwire exec` gives each task a PMIx "
                    "server of its own whose fences go through Slurm's PMI-2 (rankwire's PMI "
                    "bridge, --pmi-bridge auto; the node's ranks then talk TCP, not shared "
                    "memory); --container-image is bridged the same way",
                )
            )
        elif s.present:
            raise _no_wireup(s)
        else:
            pmi = "pmix"
            choices.append(
                Choice(
                    "pmi",
                    f"PMIx {d.openmpi_pmix}",
                    f"{base}'s Open MPI speaks only PMIx; no "
                    "working srun here: `rankwire run` serves it through libpmix",
                )
            )
        choices.append(Choice("fabric", "ofi", _ofi_fabric_note(f, fabric, d.openmpi_libfabric)))
        packages, env = d.openmpi, d.openmpi_env
    srun = (
        f"srun --mpi={pmi} rankwire exec IMAGE APP"
        if s.present
        else "rankwire run -n N --image IMAGE APP"
    )
    choices.append(Choice("launch", srun, "how the ranks of this image get wired up here"))
    text = _def_text(f, mpi, name, version, d, packages, env, srun, choices)
    return Recipe("def", text, tuple(choices))


def _ofi_fabric_note(f: RecipeHostFacts, fabric: Fabric, built: str) -> str:
    if not fabric.kind:
        return f"{fabric.why}; the image's own libfabric {built} carries it"
    if not fabric.provider:
        return f"{fabric.why}: the image's own libfabric {built} is used"
    host = f.libfabric_version
    if _version(host) >= _version(built):
        return (
            f"{fabric.why}; the image's MPI was built against libfabric {built} <= the host's "
            f"{host}, so `rankwire exec --fabric auto` can bind the host's in"
        )
    return (
        f"{fabric.why}; the image's MPI was built against libfabric {built}, newer than the "
        f"host's {host}: rankwire refuses the bind if it needs a FABRIC_1.x version the host "
        "lacks (then run with --fabric none)"
    )


def _def_text(
    f: RecipeHostFacts,
    mpi: str,
    name: str,
    version: str,
    d: Distro,
    packages: Sequence[str],
    env: Sequence[tuple[str, str]],
    srun: str,
    choices: Sequence[Choice],
) -> str:
    lines = [
        f"# Apptainer definition file: {d.base} with its {name} {version}, matched to this host",
        f"# by `rankwire recipe def --mpi {mpi} --base {d.base}`. Host facts:",
        *_facts_summary(f),
        "# Every choice and why:",
    ]
    for c in choices:
        lines += _comment(f"{c.what} = {c.value}: {c.why}", "")
    lines += [
        "Bootstrap: docker",
        f"From: {d.base}",
        "",
        "%post",
        "    set -e",
    ]
    if d.update.startswith("apt-get"):
        lines.append("    export DEBIAN_FRONTEND=noninteractive")
    lines += [
        f"    {d.update}",
        f"    {d.install} {' '.join(packages)}",
        f"    {d.clean}",
        "    # build the application here, e.g.: mpicc -O2 -o /opt/app /opt/src/app.c",
        "",
    ]
    if env:
        lines.append("%environment")
        lines += [f"    export {k}={v}" for k, v in env]
        lines.append("")
    lines += [
        "%labels",
        f"    org.rankwire.recipe.mpi {mpi} {version}",
        f"    org.rankwire.recipe.launch {srun}",
        "",
        "%help",
        f"    {name} {version} from {d.base}'s packages. Run it with: {srun}",
    ]
    return "\n".join(lines) + "\n"
