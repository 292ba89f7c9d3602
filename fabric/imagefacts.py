"""Fabric image facts: the image's glibc, its libfabric copies and their consumers.

Read from the SIF without mounting it: `unsquashfs -lls` lists the partition (metadata
only), then the few ELF files of interest are extracted into a temporary directory in
one `unsquashfs` call and read as `ElfFacts`. A few tens of milliseconds, so no cache.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any, Optional

from rankwire.errors import UserError
from rankwire.fabric.elf import GLIBC_SONAMES, ElfFacts, elf_from_dict, newest, read_elf
from rankwire.fabric.hostfacts import MULTIARCH
from rankwire.record import record
from rankwire.runtime.imagepath import resolve_in_image
from rankwire.runtime.plan import ImageFacts

# Objects that link libfabric, found by name: MPI libraries, Open MPI's OFI components,
# NCCL/RCCL OFI plugins, SHMEMs, DL providers. A program linking libfabric directly
# under another name is not looked at.
CONSUMER_PATTERNS = (
    "libmpi*.so*",
    "libmpich*.so*",
    "libopen-pal.so*",
    "libmca_common_ofi.so*",
    "mca_*ofi*.so",
    "libnccl-net*.so*",
    "librccl-net*.so*",
    "libsma*.so*",
    "libshmem*.so*",
    "lib*-fi.so",
)
MAX_ELF_BYTES = 256 << 20
# MPI C libraries whose ABI is a contract, by soname: the MPICH ABI (MPICH, Intel MPI,
# MVAPICH, Cray MPICH), the MPI-5 standard ABI, Open MPI's.
MPI_FAMILIES = {
    "libmpi.so.12": "mpich",
    "libmpich.so.12": "mpich",
    "libmpi_cray.so.12": "mpich",
    "libmpi_abi.so.1": "abi",
    "libmpi.so.40": "openmpi",
}
MPI_SONAMES = frozenset(MPI_FAMILIES)
_LLS = re.compile(r"^(\S)\S{9}\s+\S+\s+(\d+|\d+,\s*\d+)\s+\S+\s+\S+\s+R(/.*)?$")


@record
class ImageObject:
    path: str  # as the loader names it in the image (may be a symlink)
    elf: ElfFacts


@record
class ImageLib:
    path: str  # a name the loader finds it by in the image (may be a symlink)
    soname: str


@record
class FabricImageFacts:
    glibc: tuple[ImageObject, ...]  # glibc's objects found in the standard lib dirs
    libfabric: tuple[ImageObject, ...]  # every libfabric.so.1 in the image
    consumers: tuple[ImageObject, ...]  # objects that need libfabric.so.1
    ld_library_path: str  # the image's %environment LD_LIBRARY_PATH
    mpi: tuple[ImageLib, ...] = ()  # MPI C libraries (`MPI_FAMILIES`)

    def glibc_defines(self, soname: str) -> Optional[frozenset[str]]:
        for obj in self.glibc:
            if os.path.basename(obj.path) == soname:
                return frozenset(obj.elf.defines)
        return None

    @property
    def glibc_version(self) -> str:
        """ "2.36" from the newest GLIBC_x.y libc.so.6 defines; "" without glibc."""
        defines = self.glibc_defines("libc.so.6") or frozenset()
        return newest(defines, "GLIBC").partition("_")[2]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Listing:
    """An image's file tree from `unsquashfs -lls`: path -> (kind, size, link target)."""

    def __init__(self, entries: Mapping[str, tuple[str, int, str]]) -> None:
        self.entries = dict(entries)

    @classmethod
    def parse(cls, text: str) -> Listing:
        entries: dict[str, tuple[str, int, str]] = {}
        for line in text.splitlines():
            m = _LLS.match(line)
            if not m:
                continue
            kind, size, rest = m.group(1), m.group(2), m.group(3) or "/"
            target = ""
            if kind == "l" and " -> " in rest:
                rest, target = rest.split(" -> ", 1)
            entries[rest] = (kind, int(size) if size.isdigit() else 0, target)
        return cls(entries)

    def resolve(self, path: str) -> str:
        """`path` with every symlink followed inside the image ("" if it leads nowhere)."""

        def readlink(p: str) -> Optional[str]:
            entry = self.entries.get(p)
            return entry[2] if entry is not None and entry[0] == "l" else None

        real = resolve_in_image(path, readlink)
        return real if real is not None and real in self.entries else ""

    def regular(self, path: str) -> str:
        real = self.resolve(path)
        return real if real and self.entries[real][0] == "-" else ""

    def named(self, patterns: Iterable[str]) -> list[str]:
        pats = tuple(patterns)
        return sorted(
            p
            for p, (kind, _, _) in self.entries.items()
            if kind in "-l" and any(fnmatch.fnmatchcase(os.path.basename(p), x) for x in pats)
        )


def lib_dirs() -> list[str]:
    triplet = MULTIARCH.get(os.uname().machine, "")
    dirs = [f"/lib/{triplet}", f"/usr/lib/{triplet}"] if triplet else []
    return [*dirs, "/lib64", "/usr/lib64", "/lib", "/usr/lib"]


def _unsquashfs() -> str:
    # shutil here, subprocess (`_run`) and tempfile (`extract_elves`): imported only when
    # an image is listed or read, which its cached facts make seldom
    import shutil

    exe = shutil.which("unsquashfs")
    if not exe:
        raise UserError(
            "unsquashfs not found: install squashfs-tools (apt-get install squashfs-tools)"
        )
    return exe


def _run(argv: list[str], image: str) -> str:
    # /proc/self/fd/N (the plugin's checked descriptor, in a process that cannot be
    # ptraced, so no other process may open its /proc/PID/fd): the child gets fd N.
    fd = re.fullmatch(r"/proc/self/fd/(\d+)", image)
    passed = (int(fd.group(1)),) if fd else ()
    import subprocess

    proc = subprocess.run(argv, capture_output=True, text=True, pass_fds=passed)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        raise UserError(f"cannot read {image} with unsquashfs: {last}; check the image")
    return proc.stdout


def list_image(image: ImageFacts) -> Listing:
    argv = [_unsquashfs(), "-o", str(image.partition_offset), "-lls", "-d", "R", image.path]
    return Listing.parse(_run(argv, image.path))


def read_fabric_image_facts(
    image: ImageFacts, consumers_too: bool = True, cache_dir: Optional[str] = None
) -> FabricImageFacts:
    """The image's glibc, libfabric copies, their consumers (read as ELF) and MPI C
    libraries (by the soname the loader looks them up by). Without `consumers_too` (a host
    MPI but no host libfabric to check them against), the consumers are not extracted:
    an MPI library is tens of MiB. With `cache_dir`, kept there under the image's
    identity (as its MPI kind is): listing an image and extracting its libraries costs
    tens of ms, and seconds for an image of a hundred thousand files."""
    cache = None
    if cache_dir:
        from rankwire.fabric.factcache import FactCache

        # The identity digest covers the image's names, sizes and times, not file data:
        # the image file itself is watched too. The lib dirs are this machine's.
        key = [image.digest, consumers_too, os.uname().machine]
        cache = FactCache(cache_dir, "fabric-image", key, [image.path])
        kept = cache.load(_image_facts_from_dict, lambda _: ())
        if kept is not None:
            return kept
    facts = _read_fabric_image_facts(image, consumers_too)
    if cache is not None:
        cache.store(facts, ())
    return facts


def _image_facts_from_dict(d: dict[str, Any]) -> FabricImageFacts:
    def objects(key: str) -> tuple[ImageObject, ...]:
        return tuple(ImageObject(o["path"], elf_from_dict(o["elf"])) for o in d[key])

    return FabricImageFacts(
        glibc=objects("glibc"),
        libfabric=objects("libfabric"),
        consumers=objects("consumers"),
        ld_library_path=d["ld_library_path"],
        mpi=tuple(ImageLib(m["path"], m["soname"]) for m in d["mpi"]),
    )


def _read_fabric_image_facts(image: ImageFacts, consumers_too: bool) -> FabricImageFacts:
    listing = list_image(image)
    glibc: dict[str, str] = {}  # path as named -> regular file behind it
    for soname in sorted(GLIBC_SONAMES):
        for d in lib_dirs():
            real = listing.regular(f"{d}/{soname}")
            if real:
                glibc[f"{d}/{soname}"] = real
                break
    fabric = {p: listing.regular(p) for p in listing.named(["libfabric.so.1"])}
    patterns = CONSUMER_PATTERNS if consumers_too else ()
    consumers = {p: listing.regular(p) for p in listing.named(patterns)}
    wanted = {**glibc, **fabric, **consumers}
    wanted = {p: r for p, r in wanted.items() if r and listing.entries[r][1] <= MAX_ELF_BYTES}
    elves = extract_elves(image, sorted(set(wanted.values())))

    def objects(paths: Mapping[str, str]) -> list[ImageObject]:
        seen: set[str] = set()
        out = []
        for path, real in paths.items():
            if real in elves and real not in seen:
                seen.add(real)
                out.append(ImageObject(path, elves[real]))
        return out

    users = [
        o
        for o in objects(consumers)
        if "libfabric.so.1" in o.elf.needed or o.elf.required_from("libfabric.so.1")
    ]
    # MPI C libraries: the files the loader finds by their sonames (an image links them
    # by that name), one per file (a bind over any name of it covers every name).
    mpi: dict[str, ImageLib] = {}
    for path in listing.named(sorted(MPI_SONAMES)):
        real = listing.regular(path)
        if real and real not in mpi:
            mpi[real] = ImageLib(path, os.path.basename(path))
    return FabricImageFacts(
        glibc=tuple(objects(glibc)),
        libfabric=tuple(objects(fabric)),
        consumers=tuple(users),
        ld_library_path=image.env.get("LD_LIBRARY_PATH", ""),
        mpi=tuple(mpi.values()),
    )


def extract_elves(image: ImageFacts, paths: list[str]) -> dict[str, ElfFacts]:
    if not paths:
        return {}
    import tempfile

    with tempfile.TemporaryDirectory(prefix="rankwire-fabric-") as tmp:
        listfile = os.path.join(tmp, "files")
        with open(listfile, "w") as f:
            f.write("".join(p.lstrip("/") + "\n" for p in paths))
        out = os.path.join(tmp, "x")
        argv = [_unsquashfs(), "-o", str(image.partition_offset), "-d", out, "-no-xattrs"]
        _run([*argv, "-q", "-n", "-no-wildcards", "-ef", listfile, image.path], image.path)
        elves: dict[str, ElfFacts] = {}
        for path in paths:
            local = os.path.join(out, path.lstrip("/"))
            try:
                elves[path] = read_elf(local, name=f"{image.path}:{path}")
            except (OSError, ValueError):
                continue  # not ELF (a linker script, say): nothing to check
        return elves


def host_as_image_facts() -> FabricImageFacts:
    """This host's own glibc as if it were an image's: for plans made without an image."""
    glibc = []
    for soname in sorted(GLIBC_SONAMES):
        for d in lib_dirs():
            path = f"{d}/{soname}"
            if os.path.isfile(path):
                glibc.append(ImageObject(path, read_elf(path)))
                break
    return FabricImageFacts(glibc=tuple(glibc), libfabric=(), consumers=(), ld_library_path="")
