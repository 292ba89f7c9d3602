"""Host MPI facts for `--host-mpi`: the site's MPI C libraries and all they load.

`--host-mpi PREFIX` looks in PREFIX's lib dirs; `auto` takes the MPI whose `mpichversion`
(MPICH ABI: MPICH, Intel MPI, MVAPICH, Cray MPICH) or `ompi_info` (Open MPI) is first on
PATH, and its prefix. The planner (`fabric/mpiplan.py`) decides what to bind.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import subprocess
from collections.abc import Mapping
from typing import Any, Optional

from rankwire.errors import UserError
from rankwire.fabric.elf import read_elf
from rankwire.fabric.factcache import FactCache
from rankwire.fabric.hostfacts import (
    LD_CACHE,
    MULTIARCH,
    HostObject,
    Resolver,
    library_graph,
    objects_from_dicts,
)
from rankwire.fabric.imagefacts import MPI_FAMILIES, MPI_SONAMES
from rankwire.record import record


@record
class HostMpi:
    prefix: str
    found_by: str  # "--host-mpi PREFIX" | "mpichversion on PATH (/usr/bin/mpichversion)" …
    version: str  # the MPI's own first version line, "" when it has no such tool
    libs: tuple[str, ...]  # the MPI C libraries (paths), one per soname
    objects: tuple[HostObject, ...]  # those and every non-glibc object they load
    # (name, host dir) of plugin dirs that objects of the closure dlopen from beside
    # themselves: UCX's `ucx/` next to libucs, libfabric's `libfabric/` providers.
    plugin_dirs: tuple[tuple[str, str], ...] = ()

    def object(self, path: str) -> HostObject:
        return next(o for o in self.objects if o.path == path)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "objects"}


def _lib_dirs(prefix: str) -> list[str]:
    triplet = MULTIARCH.get(platform.machine(), "")
    dirs = [f"{prefix}/lib/{triplet}"] if triplet else []
    return [*dirs, f"{prefix}/lib64", f"{prefix}/lib"]


def _version(prefix: str) -> str:
    for tool, args in (("mpichversion", []), ("ompi_info", ["--version"])):
        exe = os.path.join(prefix, "bin", tool)
        if not os.access(exe, os.X_OK):
            continue
        try:
            out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return ""
        for line in out.splitlines():
            if "version" in line.lower() or line.startswith("Open MPI"):
                return " ".join(line.split())
    return ""


# Libraries that dlopen plugins from a directory beside their own file.
_PLUGIN_DIRS = {"libucs.so.0": "ucx", "libfabric.so.1": "libfabric"}
_TOOLS = {"mpichversion": ("mpich", "abi"), "ompi_info": ("openmpi",)}


def _on_path(environ: Mapping[str, str]) -> Optional[tuple[str, str, tuple[str, ...]]]:
    """(prefix, how, ABI families) of the MPI whose version tool is first on PATH."""
    for tool, families in _TOOLS.items():
        exe = shutil.which(tool, path=environ.get("PATH", os.defpath))
        if exe:
            prefix = os.path.dirname(os.path.dirname(os.path.realpath(exe)))
            return prefix, f"{tool} on PATH ({exe})", families
    return None


def host_mpi(
    choice: str, environ: Mapping[str, str], cache_dir: Optional[str] = None
) -> Optional[HostMpi]:
    """The host MPI `choice` names (None: `none`, or `auto` finding none). UserError when
    PREFIX holds no MPI C library. With `cache_dir`, the facts are kept there and taken
    back while every file they were read from is unchanged (reading them costs ≈ 130 ms,
    which every task of an srun step would pay)."""
    choice = choice.strip()
    if choice in ("", "none"):
        return None
    if choice == "auto":
        found = _on_path(environ)
        if found is None:
            return None
        prefix, how, families = found
    else:
        if not os.path.isabs(choice):
            choice = os.path.abspath(choice)
        prefix, how = choice.rstrip("/") or "/", f"--host-mpi {choice}"
        families = tuple(sorted(set(MPI_FAMILIES.values())))
    key = [prefix, how, list(families), environ.get("LD_LIBRARY_PATH", "")]
    # the candidate names and the loader's cache, besides each object of the closure
    cache = (
        FactCache(cache_dir, "host-mpi", key, [*_candidates(prefix, families), LD_CACHE])
        if cache_dir
        else None
    )
    kept = cache.load(_from_dict, _paths) if cache else None
    if kept is not None:
        return kept
    facts = _read(prefix, how, families, environ)
    if cache:
        cache.store(facts, _paths(facts))
    return facts


def _paths(found: HostMpi) -> list[str]:
    return [p for o in found.objects for p in (o.path, o.real)]


def _candidates(prefix: str, families: tuple[str, ...]) -> list[str]:
    """Where an MPI C library of these families may be, in search order."""
    sonames = sorted(s for s in MPI_SONAMES if MPI_FAMILIES[s] in families)
    return [os.path.join(d, soname) for d in _lib_dirs(prefix) for soname in sonames]


def _read(prefix: str, how: str, families: tuple[str, ...], environ: Mapping[str, str]) -> HostMpi:
    libs: dict[str, str] = {}
    for path in _candidates(prefix, families):
        soname = os.path.basename(path)
        if soname not in libs and os.path.isfile(path):
            try:
                if read_elf(path).soname in MPI_SONAMES:
                    libs[soname] = path
            except (OSError, ValueError):
                continue
    if not libs:
        raise UserError(
            f"{how}: no MPI library ({', '.join(sorted(MPI_SONAMES))}) in "
            f"{', '.join(_lib_dirs(prefix))}; give the prefix of the site's MPI (the "
            "directory holding its lib/ and bin/) or --host-mpi none"
        )
    resolver = Resolver(environ.get("LD_LIBRARY_PATH", ""))
    objects = library_graph(sorted(libs.values()), resolver)
    plugins = []
    for obj in objects.values():
        sub = _PLUGIN_DIRS.get(obj.elf.soname)
        where = os.path.join(os.path.dirname(obj.real), sub or "")
        if sub and os.path.isdir(where) and (sub, where) not in plugins:
            plugins.append((sub, where))
    return HostMpi(
        prefix=prefix,
        found_by=how,
        version=_version(prefix),
        libs=tuple(libs[s] for s in sorted(libs)),
        objects=tuple(objects.values()),
        plugin_dirs=tuple(plugins),
    )


def _from_dict(d: dict[str, Any]) -> HostMpi:
    return HostMpi(
        prefix=d["prefix"],
        found_by=d["found_by"],
        version=d["version"],
        libs=tuple(d["libs"]),
        objects=objects_from_dicts(d["objects"]),
        plugin_dirs=tuple((a, b) for a, b in d["plugin_dirs"]),
    )
