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
