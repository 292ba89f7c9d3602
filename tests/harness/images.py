"""Test images built by the harness: a rootfs from host binaries and their ldd closure.

Fast (a few MB, well under a second to pack) and real: the binaries are the host's own.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterable
from pathlib import Path

BASE_BINARIES = (
    "/bin/sh",
    "/bin/cat",
    "/bin/ls",
    "/bin/echo",
    "/bin/true",
    "/bin/false",
    "/bin/sleep",
    "/usr/bin/id",
    "/usr/bin/env",
    "/usr/bin/stat",
    "/bin/mkdir",
    "/bin/touch",
    "/usr/bin/readlink",
    "/bin/hostname",
    "/bin/grep",
    "/usr/bin/head",
)
OS_RELEASE = 'NAME="rankwire-test-image"\nID=rankwire-test\nVERSION_ID="1"\n'
_LDD_RE = re.compile(r"(/\S+)")


def ldd_closure(binaries: Iterable[str]) -> set[str]:
    """The binaries plus every shared object `ldd` says they load (incl. the loader)."""
    files: set[str] = set()
    for binary in binaries:
        files.add(binary)
        out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
        for line in out.splitlines():
            m = _LDD_RE.search(line.split("=>")[-1])
            if m and os.path.exists(m.group(1)):
                files.add(m.group(1))
    return files


def _copy(src: str, root: Path, dest: str | None = None) -> None:
    target = root / (dest or src).lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if os.path.isdir(src) and not os.path.islink(src):
        shutil.copytree(src, target, symlinks=True, dirs_exist_ok=True)
    else:
        shutil.copy2(os.path.realpath(src), target)


def make_rootfs(
    root: Path,
    binaries: Iterable[str] = (),
    trees: Iterable[str] = (),
    files: dict[str, str] | None = None,
) -> Path:
    """A minimal rootfs: BASE_BINARIES + `binaries` with their libraries, `trees` copied
    whole (e.g. dlopen'ed plugin dirs), and literal `files` {path: text}."""
    root.mkdir(parents=True)
    for d in ("etc", "tmp", "home", "proc", "sys", "dev", "usr/bin"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for f in ldd_closure([*BASE_BINARIES, *binaries]):
        _copy(f, root)
    for tree in trees:
        _copy(tree, root)
        for so in ldd_closure(str(p) for p in Path(tree).rglob("*.so*")):
            _copy(so, root)
    (root / "etc/os-release").write_text(OS_RELEASE)
    # A setuid-root copy of `id`: it must gain nothing inside the container.
    suid = root / "usr/bin/id-suid"
    shutil.copy2("/usr/bin/id", suid)
    suid.chmod(0o4755)
    for path, text in (files or {}).items():
        p = root / path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def make_world_readable(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        if not p.is_symlink():
            mode = stat.S_IMODE(p.stat().st_mode)
            p.chmod(mode | (0o555 if p.is_dir() else 0o444))


# -- an image holding Debian's Python, mpi4py (built against Debian's MPICH) and pytest-mpi
PYTHON = "/usr/bin/python3"
# What the image's stdlib leaves out: tests, IDLE, Tk, pip's bootstrap, 2to3, the static
# libpython for embedding, optimized bytecode, and Debian's sitecustomize (a link into
# /etc/python3.x). The host's plain .pyc files stay (~4 MB in the SIF): copied with their
# sources' times they are valid, and 4 ranks do not each compile pytest's imports.
PYTHON_STDLIB_SKIP = (
    "test",
    "tests",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "config-3.*",
    "*.opt-?.pyc",
    "sitecustomize.py",
)
# The distributions (as pip names them) copied from a site-packages, with every file their
# RECORD lists (pip's .pyc files too): pytest and what it imports (pytest 9 imports
# pygments at startup), pytest-mpi (its dist-info carries the pytest11 entry point), mpi4py.
PYTHON_MPI_DISTRIBUTIONS = (
    "mpi4py",
    "pytest",
    "pluggy",
    "iniconfig",
    "packaging",
    "pygments",
    "pytest-mpi",
)
# Debian's python3 has this directory on sys.path without any PYTHONPATH.
DIST_PACKAGES = "/usr/lib/python3/dist-packages"
UCX_PLUGINS = "/usr/lib/x86_64-linux-gnu/ucx"  # dlopen'ed by Debian's MPICH (ch4:ucx)


def _distribution_files(site_packages: Path, names: Iterable[str]) -> list[str]:
    """The files (relative to `site_packages`) of the distributions `names`."""
    import importlib.metadata

    wanted = {n.lower().replace("_", "-") for n in names}
    found: dict[str, list[str]] = {}
    for dist in importlib.metadata.distributions(path=[str(site_packages)]):
        name = dist.metadata["Name"].lower().replace("_", "-")
        if name in wanted and name not in found:
            found[name] = [str(f) for f in dist.files or () if not str(f).startswith("..")]
    missing = sorted(wanted - set(found))
    if missing:
        raise FileNotFoundError(f"not installed in {site_packages}: {', '.join(missing)}")
    return sorted({f for files in found.values() for f in files})


def make_python_mpi_rootfs(root: Path, site_packages: Path, tests: Path) -> Path:
    """A rootfs with Debian's python3 (the stdlib minus PYTHON_STDLIB_SKIP, lib-dynload
    with its libraries), the PYTHON_MPI_DISTRIBUTIONS of `site_packages` in DIST_PACKAGES
    (mpi4py's extension with its ldd closure: Debian's libmpich and UCX) and `tests` at
    /opt/tests."""
    python = os.path.realpath(PYTHON)  # /usr/bin/python3.X
    version = os.path.basename(python)
    stdlib = f"/usr/lib/{version}"
    files = _distribution_files(site_packages, PYTHON_MPI_DISTRIBUTIONS)
    extensions = [str(site_packages / f) for f in files if f.endswith(".so")]
    dynload = [str(p) for p in Path(stdlib, "lib-dynload").glob("*.so")]
    libs = ldd_closure([*extensions, *dynload]) - {*extensions, *dynload}
    make_rootfs(root, binaries=[python, *sorted(libs)], trees=[UCX_PLUGINS])
    for link in ("python3", "python"):
        (root / "usr/bin" / link).symlink_to(version)
    shutil.copytree(
        stdlib,
        root / stdlib.lstrip("/"),
        symlinks=True,
        ignore=shutil.ignore_patterns(*PYTHON_STDLIB_SKIP),
    )
    dist = root / DIST_PACKAGES.lstrip("/")
    for f in files:
        _copy(str(site_packages / f), dist, f)
    for so in dist.rglob("*.so"):  # mpi4py's MPI module is built with debug info (~12 MB)
        subprocess.run(["strip", "--strip-debug", str(so)], check=True)
    shutil.copytree(tests, root / "opt/tests", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def main() -> None:
    """`python tests/harness/images.py ROOTFS [--binary B]... [--tree T]... [--copy SRC:DST]...`"""
    import argparse

    ap = argparse.ArgumentParser(description="Make a minimal rootfs from host binaries.")
    ap.add_argument("rootfs", type=Path)
    ap.add_argument("--binary", action="append", default=[])
    ap.add_argument("--tree", action="append", default=[])
    ap.add_argument("--copy", action="append", default=[], metavar="SRC:DST")
    args = ap.parse_args()
    root = make_rootfs(args.rootfs, args.binary, args.tree)
    for spec in args.copy:
        src, dst = spec.split(":", 1)
        _copy(src, root, dst)


if __name__ == "__main__":
    main()
