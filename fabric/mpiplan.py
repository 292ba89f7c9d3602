"""The host MPI plan (`--host-mpi`): run the image's MPI program with the site's MPI.

Pure: (host MPI facts, image facts, the fabric plan, choice) -> `MpiPlan`, or a one-line
`UserError`. Two ABIs make the swap safe: the MPICH ABI (`libmpi.so.12` and its aliases
`libmpich.so.12`, `libmpi_cray.so.12`: MPICH, Intel MPI, MVAPICH, Cray MPICH) and the
MPI-5 standard ABI (`libmpi_abi.so.1`); Open MPI's `libmpi.so.40` only replaces itself.

What a bound plan does, as the fabric plan does for libfabric: the host MPI library is
bound over every file of the image's MPI library of the same family (whatever names the
image gives it), and the host library's non-glibc dependency closure goes, one file at a
time, into `/.rankwire/mpi/lib`, which LD_LIBRARY_PATH puts right after the fabric's
directory. glibc stays the image's: the host objects' symbol versions are checked
against it (`fabric.plan.check_glibc`). When the fabric plan binds the host libfabric,
the host MPI uses that one (its FABRIC_1.x needs are checked) instead of its own copy.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Optional

from rankwire.errors import UserError
from rankwire.fabric.elf import version_key
from rankwire.fabric.hostfacts import HostLibfabric, HostObject, closure
from rankwire.fabric.imagefacts import MPI_FAMILIES, FabricImageFacts
from rankwire.fabric.plan import LIB_DIR as FABRIC_LIB_DIR
from rankwire.fabric.plan import SONAME as LIBFABRIC
from rankwire.fabric.plan import FabricPlan, check_glibc, check_installed
from rankwire.record import record
from rankwire.runtime.plan import Mount

if TYPE_CHECKING:  # the facts' type only: exec without --host-mpi does not import them
    from rankwire.fabric.hostmpi import HostMpi

LIB_DIR = "/.rankwire/mpi/lib"
_FAMILY_NAMES = {
    "mpich": "MPICH ABI (libmpi.so.12)",
    "abi": "MPI standard ABI (libmpi_abi.so.1)",
    "openmpi": "Open MPI (libmpi.so.40)",
}


@record
class MpiPlan:
    choice: str  # as asked: none | auto | PREFIX
    reason: str  # one line: what was replaced by what, or why nothing
    replaced: tuple[tuple[str, str], ...]  # (image library, host library bound over it)
    family: str  # "mpich" | "abi" | "openmpi" of what was bound; "" when nothing
    env: dict[str, str]
    mounts: tuple[Mount, ...]

    @property
    def pmi_kind(self) -> Optional[str]:
        """The PMI the injected MPI speaks (launcher.facts' kinds), None when none is."""
        if not self.family:
            return None
        return "pmix" if self.family == "openmpi" else "pmi1/2"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def nothing(choice: str, reason: str) -> MpiPlan:
    return MpiPlan(choice, reason, (), "", {}, ())


def plan_host_mpi(
    host: Optional[HostMpi],
    image: FabricImageFacts,
    fabric: FabricPlan,
    fabric_lib: Optional[HostLibfabric],
    choice: str,
) -> MpiPlan:
    """`fabric`: the fabric plan of the same container; `fabric_lib`: the host libfabric
    it binds (when it binds one)."""
    choice = choice.strip() or "none"
    if choice == "none":
        return nothing(choice, "host MPI off (--host-mpi none)")
    if host is None:
        return nothing(choice, "no host MPI found (no mpichversion or ompi_info on PATH)")
    host_family = {MPI_FAMILIES[_soname(host, p)]: p for p in host.libs}
    image_libs = [(o, MPI_FAMILIES[o.soname]) for o in image.mpi]
    if not image_libs:
        if choice == "auto":
            return nothing(choice, "the image has no shared MPI library to replace")
        raise UserError(
            f"--host-mpi {choice}: the image has no shared MPI library "
            f"({', '.join(sorted(MPI_FAMILIES))}) to replace: its program may link MPI "
            "statically; rebuild it against a shared MPI or drop --host-mpi"
        )
    pairs = [(o.path, host_family[fam]) for o, fam in image_libs if fam in host_family]
    if not pairs:
        theirs = sorted({_FAMILY_NAMES[f] for _, f in image_libs})
        ours = sorted(_FAMILY_NAMES[f] for f in host_family)
        raise UserError(
            f"cannot use the host MPI ({host.found_by}): the image's MPI is "
            f"{' and '.join(theirs)} and the host's is {' and '.join(ours)}, whose ABIs "
            "differ; use --host-mpi none, or an image built with an MPI of the host's ABI"
        )
    roots = sorted({(path.rsplit("/", 1)[-1], path) for _, path in pairs})
    objects = closure(host.objects, roots)
    check_installed(objects, "the host MPI", "--host-mpi none")
    host_fabric = fabric.provider != ""
    if host_fabric:  # the fabric plan's libfabric serves the host MPI too
        objects = [(n, o) for n, o in objects if n != LIBFABRIC]
    check_glibc([(n, o.elf) for n, o in objects], image, "the host MPI", "--host-mpi none")
    if host_fabric and fabric_lib is not None:
        _check_fabric(fabric_lib, objects)

    mounts = [Mount("bind", f"{LIB_DIR}/{name}", obj.real, readonly=True) for name, obj in objects]
    bound = {name for name, _ in objects}
    for sub, where in host.plugin_dirs:  # UCX transports, libfabric providers
        owner = {"ucx": "libucs.so.0", "libfabric": LIBFABRIC}[sub]
        if owner in bound:
            mounts.append(Mount("bind", f"{LIB_DIR}/{sub}", where, readonly=True))
    replaced = tuple((img, host.object(lib).real) for img, lib in pairs)
    mounts += [Mount("bind", img, real, readonly=True) for img, real in replaced]
    lead = f"{FABRIC_LIB_DIR}:{LIB_DIR}" if host_fabric else LIB_DIR
    rest = fabric.env.get("LD_LIBRARY_PATH", "").removeprefix(FABRIC_LIB_DIR).lstrip(":")
    rest = rest if host_fabric else image.ld_library_path
    family = MPI_FAMILIES[_soname(host, pairs[0][1])]
    what = ", ".join(f"{img} by {real}" for img, real in replaced)
    version = f" ({host.version})" if host.version else ""
    return MpiPlan(
        choice=choice,
        reason=f"host MPI{version} from {host.found_by}: replaced {what}",
        replaced=replaced,
        family=family,
        env={"LD_LIBRARY_PATH": lead + (f":{rest}" if rest else "")},
        mounts=tuple(mounts),
    )


def _soname(host: HostMpi, path: str) -> str:
    return host.object(path).elf.soname


def _check_fabric(lib: HostLibfabric, objects: list[tuple[str, HostObject]]) -> None:
    """The host MPI's FABRIC_1.x needs against the host libfabric the fabric plan binds."""
    defined = frozenset(lib.object(lib.path).elf.defines)
    for name, obj in objects:
        missing = [v for v in obj.elf.required_from(LIBFABRIC) if v not in defined]
        if missing:
            raise UserError(
                f"cannot use the host MPI with the host libfabric {lib.version}: {name} needs "
                f"{max(missing, key=version_key)}, which it lacks; use --fabric none (the "
                "host MPI then brings its own libfabric) or --host-mpi none"
            )
