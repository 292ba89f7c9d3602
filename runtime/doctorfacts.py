"""What `rankwire doctor IMAGE` reads about an image, once (all the I/O; the verdicts are
`runtime/doctor.py`'s): its architecture, its MPI (family, version, the PMI it speaks),
its /etc/passwd and /etc/group, and the fabric facts the planner would use for it.

The image is listed once (`unsquashfs -lls`); its libmpi and account files are extracted
in one `unsquashfs` call into a temporary directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

from rankwire.errors import UserError
from rankwire.fabric.hostfacts import FabricHostFacts
from rankwire.fabric.hostmpi import HostMpi, host_mpi
from rankwire.fabric.imagefacts import FabricImageFacts, Listing, list_image
from rankwire.fabric.plan import EMPTY_IMAGE
from rankwire.record import record
from rankwire.runtime.doctorhost import DoctorHostFacts, collect_doctor_host_facts
from rankwire.runtime.plan import ImageFacts

# MPI libraries by soname (first match wins within a family), and the exported string
# each keeps its own version in.
_FAMILIES = (
    ("Open MPI", re.compile(r"^libmpi\.so\.40(\.\d+)*$"), "ompi_version_string"),
    ("MPICH", re.compile(r"^lib(mpich|mpi)\.so\.12(\.\d+)*$"), "MPII_Version_string"),
)
ACCOUNT_FILES = ("/etc/passwd", "/etc/group")
MAX_ACCOUNT_BYTES = 16 << 20


@record
class MpiLibrary:
    family: str  # "Open MPI", "MPICH", "Intel MPI", "MVAPICH"
    version: str  # the library's own version string; "" when it has none we know
    path: str  # the file in the image


@record
class DoctorImageFacts:
    path: str
    arch: str  # the primary partition's (Go name, "unknown" when unrecognised)
    mpi: tuple[MpiLibrary, ...]
    pmi: Optional[str]  # what `launcher.facts.image_mpi_kind` says: pmix, pmi1/2, both, None
    passwd_ids: Optional[tuple[int, ...]]  # uids /etc/passwd names; None: the image has none
    group_ids: Optional[tuple[int, ...]]  # gids /etc/group names; None: the image has none
    fabric_host: FabricHostFacts  # the host libfabric loaded whatever the adapters
    fabric_image: FabricImageFacts  # EMPTY_IMAGE when the host has no libfabric
    fabric_error: str  # why the image's fabric facts could not be read ("" when they were)
    host_mpi_choice: str = "auto"  # RANKWIRE_HOST_MPI, else auto (the MPI on PATH)
    host_mpi: Optional[HostMpi] = None  # what that choice finds (None: nothing)
    host_mpi_error: str = ""  # why it found nothing usable (a PREFIX without an MPI)

    def to_dict(self) -> dict[str, Any]:
        """A summary: ELF facts (every symbol version) are left out."""
        lib = self.fabric_host.libfabric
        return {
            "path": self.path,
            "arch": self.arch,
            "mpi": [dataclasses.asdict(m) for m in self.mpi],
            "pmi": self.pmi,
            "passwd_ids": self.passwd_ids,
            "group_ids": self.group_ids,
            "fabric": {
                "adapters": [a.describe() for a in self.fabric_host.adapters],
                "host_libfabric": f"{lib.path} ({lib.version})" if lib else None,
                "image_glibc": self.fabric_image.glibc_version,
                "image_libfabric": [o.path for o in self.fabric_image.libfabric],
                "image_consumers": [o.path for o in self.fabric_image.consumers],
                "error": self.fabric_error,
            },
        }


@record
class DoctorFacts:
    host: DoctorHostFacts
    image: Optional[DoctorImageFacts]

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host.host.to_dict(),
            "probes": self.host.to_dict(),
            "image": self.image.to_dict() if self.image else None,
        }


def gather_doctor(image: Optional[str]) -> DoctorFacts:
    """The host's facts, then the image's if one is given (UserError: no such image)."""
    from rankwire.runtime.imagefacts import check_image_path

    if image:
        check_image_path(image)  # before the probes: a typo costs nothing
    host = collect_doctor_host_facts()
    return DoctorFacts(host, image_doctor_facts(image, host) if image else None)


def image_doctor_facts(path: str, host: DoctorHostFacts) -> DoctorImageFacts:
    from rankwire.launcher.facts import image_mpi_kind
    from rankwire.runtime.imagefacts import image_facts
    from rankwire.runtime.imagemeta import read_image_metadata
    from rankwire.runtime.sif_read import SifImage

    facts = image_facts(path)
    sif = SifImage.open(path)
    try:
        arch = read_image_metadata(sif).arch
    finally:
        sif.close()
    listing = list_image(facts)
    libraries = _mpi_libraries(listing)
    wanted = [real for _, real in libraries] + [
        real for real in map(listing.regular, ACCOUNT_FILES) if real
    ]
    cache = host.cache_dir.path or tempfile.gettempdir()
    with _extracted(facts.path, facts.partition_offset, wanted) as local:
        mpi = tuple(
            MpiLibrary(_family(family, real), _version_string(local.get(real), family), real)
            for family, real in libraries
        )
        passwd, group = (_ids(local.get(listing.regular(f))) for f in ACCOUNT_FILES)
    fabric_host, fabric_image, fabric_error = _fabric(facts)
    choice = os.environ.get("RANKWIRE_HOST_MPI") or "auto"
    found, found_error = None, ""
    try:
        found = host_mpi(choice, os.environ)
    except UserError as err:
        found_error = str(err)
    return DoctorImageFacts(
        path=facts.path,
        arch=arch,
        mpi=mpi,
        pmi=image_mpi_kind(facts, cache, lambda: listing),
        passwd_ids=passwd,
        group_ids=group,
        fabric_host=fabric_host,
        fabric_image=fabric_image,
        fabric_error=fabric_error,
        host_mpi_choice=choice,
        host_mpi=found,
        host_mpi_error=found_error,
    )


def _mpi_libraries(listing: Listing) -> list[tuple[str, str]]:
    """(family, regular file) of the first libmpi of each family the image holds."""
    found: list[tuple[str, str]] = []
    for family, pattern, _ in _FAMILIES:
        for path in sorted(listing.entries):
            real = listing.regular(path) if pattern.match(os.path.basename(path)) else ""
            if real:
                found.append((family, real))
                break
    return found


def _family(family: str, path: str) -> str:
    """MPICH's ABI family by where it is installed (Intel MPI, MVAPICH keep its soname)."""
    lowered = path.lower()
    if family == "MPICH" and ("intel" in lowered or "oneapi" in lowered):
        return "Intel MPI"
    if family == "MPICH" and "mvapich" in lowered:
        return "MVAPICH"
    return family


def _version_string(local: Optional[str], family: str) -> str:
    """The string a libmpi exports its version in (`MPII_Version_string` = "4.0.2")."""
    symbol = next(s for f, _, s in _FAMILIES if f == family)
    if local is None:
        return ""
    from rankwire.fabric.elf import read_symbol

    try:
        raw = read_symbol(local, symbol, 64)
    except (OSError, ValueError):
        return ""
    text = raw.split(b"\0", 1)[0].decode("ascii", "replace").strip()
    return text if re.fullmatch(r"[0-9][0-9A-Za-z.+~-]*", text) else ""


def _ids(local: Optional[str]) -> Optional[tuple[int, ...]]:
    """The numeric ids (third field) of a passwd or group file; None when there is none."""
    if local is None:
        return None
    try:
        if os.path.getsize(local) > MAX_ACCOUNT_BYTES:
            return ()
        with open(local, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    ids = [ln.split(":")[2] for ln in lines if ln.count(":") >= 3]
    return tuple(sorted({int(i) for i in ids if i.isdigit()}))


@contextmanager
def _extracted(image: str, offset: int, paths: list[str]) -> Iterator[dict[str, str]]:
    """{path in the image: local copy} of those of `paths` unsquashfs could extract."""
    with tempfile.TemporaryDirectory(prefix="rankwire-doctor-") as tmp:
        exe = shutil.which("unsquashfs")
        if not paths or exe is None:
            yield {}
            return
        listfile = os.path.join(tmp, "files")
        with open(listfile, "w") as f:
            f.write("".join(p.lstrip("/") + "\n" for p in sorted(set(paths))))
        out = os.path.join(tmp, "x")
        argv = [exe, "-o", str(offset), "-d", out, "-no-xattrs", "-q", "-n", "-no-wildcards"]
        subprocess.run(
            [*argv, "-ef", listfile, image],
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
        local = {p: os.path.join(out, p.lstrip("/")) for p in paths}
        yield {p: f for p, f in local.items() if os.path.isfile(f)}


def _fabric(image: ImageFacts) -> tuple[FabricHostFacts, FabricImageFacts, str]:
    """Adapters, devices and the host libfabric (loaded even when no adapter would make
    a run look at it: the ABI check is worth knowing before a node with one)."""
    from rankwire.fabric.hostfacts import collect_fabric_host_facts, host_libfabric
    from rankwire.fabric.imagefacts import read_fabric_image_facts

    host = collect_fabric_host_facts(with_library=False)
    with contextlib.suppress(UserError):  # no host libfabric: the image's libraries still
        host = dataclasses.replace(host, libfabric=host_libfabric())  # matter (host MPI)
    try:
        return host, read_fabric_image_facts(image), ""
    except UserError as err:
        return host, EMPTY_IMAGE, str(err)
