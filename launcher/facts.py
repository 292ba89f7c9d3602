"""Facts the launcher needs beyond the runtime's: which PMI the ranks' MPI speaks, how
many files the launcher may open, on how many CPUs its ranks may run, and whether the
node has anything but shared memory and TCP for them to talk through. The files limit
and the CPUs are also part of a kept launch plan's key (`plancache`, which imports this
module before any planner: what only the other answers read is imported where they
read it), the node's devices by the paths their drivers make (`execcmd.device_signs`)."""

from __future__ import annotations

import os
import posixpath
import resource
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Optional

from rankwire.errors import UserError

if TYPE_CHECKING:
    from rankwire.fabric.hostfacts import FabricHostFacts
    from rankwire.fabric.imagefacts import Listing
    from rankwire.runtime.plan import ImageFacts


def image_mpi_kinds(
    image: ImageFacts, program: str, environ: Mapping[str, str], cache_dir: str
) -> tuple[Optional[str], Optional[str]]:
    """`image_mpi_kind` and `image_program_mpi_kind`, from one listing of the image (at
    most: each answer is kept in `cache_dir`)."""
    from rankwire.fabric.imagefacts import list_image

    listing: Optional[Listing] = None

    def listed() -> Listing:
        nonlocal listing
        if listing is None:
            listing = list_image(image)
        return listing

    return (
        image_mpi_kind(image, cache_dir, listed),
        image_program_mpi_kind(image, program, environ, cache_dir, listed),
    )


def image_mpi_kind(
    image: ImageFacts, cache_dir: str, listed: Optional[Callable[[], Listing]] = None
) -> Optional[str]:
    """ "pmix", "pmi1/2", "both" or None, from the image's file list (no mount needed).

    Listing a large image takes ~6 µs per file, so the answer is kept in `cache_dir`
    under the image's identity digest and the listing is done once per image.
    """
    from rankwire.fabric.imagefacts import list_image
    from rankwire.pmi.pmix.detect import pmi_kind
    from rankwire.runtime.imagefacts import keep

    cached = os.path.join(cache_dir, "mpi-kind", image.digest)
    try:
        with open(cached) as f:
            return f.read().strip() or None
    except OSError:
        pass
    try:
        kind = pmi_kind((listed or (lambda: list_image(image)))().entries)
    except UserError:
        return None
    keep(cached, kind or "")
    return kind


def program_mpi_kind(program: str, environ: Mapping[str, str]) -> Optional[str]:
    """The same for a host program, from the libraries it loads: its DT_NEEDED closure as
    the host's loader finds it (`fabric.hostfacts.library_graph`: ≈ 3 ms where running
    `ldd`, which runs the loader three times, took ≈ 6)."""
    return host_program_facts(program, environ)[0]


def host_program_facts(
    program: str, environ: Mapping[str, str]
) -> tuple[Optional[str], tuple[str, ...], tuple[str, ...]]:
    """`program_mpi_kind`, the files it read to say so (the program as found on PATH and
    each library of its closure; none: not found) and the dirs the loader's search looked
    in up to each library (a library put in one would be found instead)."""
    import shutil

    from rankwire.fabric.hostfacts import Resolver, library_graph
    from rankwire.pmi.pmix.detect import pmi_kind

    path = shutil.which(program, path=environ.get("PATH"))
    if path is None:
        return None, (), ()
    resolver = Resolver(environ.get("LD_LIBRARY_PATH", ""))
    try:
        objects = library_graph([path], resolver)
    except (OSError, ValueError):  # a script, or unreadable
        return None, (path,), ()
    libraries = tuple(sorted({o.path for o in objects.values() if o.path != path}))
    return pmi_kind(libraries), (path, *libraries), tuple(resolver.searched)


def image_program_mpi_kind(
    image: ImageFacts,
    program: str,
    environ: Mapping[str, str],
    cache_dir: str,
    listed: Optional[Callable[[], Listing]] = None,
) -> Optional[str]:
    """The same for a program inside the image, from its DT_NEEDED (None: not found in the
    image, not ELF, or no MPI library among what it links directly).

    `program` is resolved like the container's exec does: as given when it holds a `/`,
    else along the rank's PATH. Kept in `cache_dir` per image digest and program.
    """
    import hashlib

    from rankwire.fabric.imagefacts import MAX_ELF_BYTES, extract_elves, list_image
    from rankwire.pmi.pmix.detect import pmi_kind
    from rankwire.runtime.imagefacts import keep

    if "/" in program and not program.startswith("/"):
        return None  # relative to the rank's directory, which is the host's, bound in
    key = hashlib.sha256(f"{program}\0{environ.get('PATH', '')}".encode()).hexdigest()[:16]
    cached = os.path.join(cache_dir, "mpi-kind", f"{image.digest}-{key}")
    try:
        with open(cached) as f:
            return f.read().strip() or None
    except OSError:
        pass
    try:
        listing = (listed or (lambda: list_image(image)))()
    except UserError:
        return None
    dirs = [""] if "/" in program else environ.get("PATH", "").split(":")
    found = ""
    for d in dirs:
        if d.startswith("/") or not d:
            found = listing.regular(posixpath.join("/", d, program))
            if found:
                break
    kind = None
    if found and listing.entries[found][1] <= MAX_ELF_BYTES:
        try:
            elf = extract_elves(image, [found]).get(found)
        except UserError:
            return None
        kind = pmi_kind(elf.needed) if elf is not None else None
    keep(cached, kind or "")
    return kind


def fabric_free(scanned: Optional[FabricHostFacts] = None) -> bool:
    """This node has no fabric adapter (a kernel device, or a known PCI function without
    its driver), no fabric device node and no GPU device node (`GPU_SIGNS`): its ranks
    can only talk through shared memory and TCP. `scanned`: the adapters and device
    nodes as read already (the fabric facts of `--fabric auto` or a provider)."""
    from rankwire.fabric import hostfacts

    if scanned is None:
        scanned = hostfacts.collect_fabric_host_facts(with_library=False)
    gpus = any(os.path.exists(path) for path in hostfacts.GPU_SIGNS)
    return not (scanned.adapters or scanned.devices or gpus)


def usable_cpus() -> int:
    """The CPUs this process (and so each rank it starts) may run on: its affinity mask,
    which a cpuset, `taskset` or Slurm's binding narrows."""
    return len(os.sched_getaffinity(0))


def open_files_limit() -> tuple[int, int]:
    """RLIMIT_NOFILE (soft, hard); RLIM_INFINITY as a large number."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    big = 1 << 30
    return (big if soft == resource.RLIM_INFINITY else soft), (
        big if hard == resource.RLIM_INFINITY else hard
    )
