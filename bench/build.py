"""Building images, measured against the tools underneath in the same run.

1. pack: `rankwire build OUT.sif ROOTFS` vs plain `mksquashfs ROOTFS OUT.sqfs` with the
   same options (`-noappend -comp zstd -all-root -no-progress -quiet`: the compressor
   `rankwire build` uses, `runtime/imagemeta.py` COMPRESSIONS[0]): the issue's goal is
   a ratio <= 1.05 (we add metadata, not time).
2. recipe: `rankwire build OUT.sif RECIPE.def` (`Bootstrap: localimage` of the image of
   step 1, a one-line %post) vs `unsquashfs` of it then `mksquashfs` (what any builder
   from a base image must do at least).

Median wall time of --repeat runs each, after one warm-up; the rootfs is --size MiB of
files: a quarter incompressible, the rest text, 1/16 of it in 4 KiB files.

    .venv/bin/python bench/build.py [--size 1024] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from rankwire.runtime.imagemeta import COMPRESSIONS

BIN = Path(sys.executable).parent
# The peer writes what `rankwire build` writes: its compressor (the default), all root.
MKSQUASHFS_OPTS = ["-noappend", "-comp", COMPRESSIONS[0], "-all-root", "-no-progress", "-quiet"]


def make_rootfs(root: Path, size_mib: int) -> None:
    """`size_mib` MiB of files under root: big files of random or text data, small ones."""
    text = b"".join(b"line %08d of a text file in the benchmark rootfs\n" % i for i in range(20000))
    total, n = size_mib << 20, 0
    small_budget = total // 16
    done = 0
    while done < total:
        d = root / "usr" / "share" / f"d{n // 256:04d}"
        d.mkdir(parents=True, exist_ok=True)
        if done < small_budget:
            data = text[(n * 4096) % (len(text) - 4096) :][:4096]
        elif n % 4 == 0:
            data = os.urandom(1 << 20)
        else:
            data = text[: 1 << 20]
        (d / f"f{n:06d}").write_bytes(data)
        done += len(data)
        n += 1
    for sub in ("etc", "tmp", "proc", "dev", "bin"):
        (root / sub).mkdir(exist_ok=True)
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    (root / "bin/sh").symlink_to("busybox")


def timed(argv: list[str], env: dict[str, str] | None = None, quiet: bool = False) -> float:
    t0 = time.perf_counter()
    err = subprocess.DEVNULL if quiet else None
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=err, env=env)
    return time.perf_counter() - t0


def medians(
    ours: Callable[[], float], peer: Callable[[], float], repeat: int
) -> tuple[float, float]:
    """Median wall times of both, runs interleaved (load on the machine hits both alike)."""
    ours(), peer()  # warm-up: page cache, pyc
    a, b = [], []
    for _ in range(repeat):
        a.append(ours())
        b.append(peer())
    return statistics.median(a), statistics.median(b)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024, help="rootfs size in MiB")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rankwire = str(BIN / "rankwire")
    work = Path(tempfile.mkdtemp(prefix="rankwire-bench-build-"))
    try:
        rootfs = work / "rootfs"
        make_rootfs(rootfs, args.size)
        sif, sqfs = work / "out.sif", work / "out.sqfs"

        def pack_ours() -> float:
            return timed([rankwire, "build", str(sif), str(rootfs)])

        def pack_plain() -> float:
            return timed(["mksquashfs", str(rootfs), str(sqfs), *MKSQUASHFS_OPTS])

        ours, plain = medians(pack_ours, pack_plain, args.repeat)
        print(f"pack {args.size} MiB: rankwire build {ours:.2f} s, mksquashfs {plain:.2f} s, "
              f"ratio {ours / plain:.3f} (goal <= 1.05); sizes {sif.stat().st_size} vs "
              f"{sqfs.stat().st_size} bytes")  # fmt: skip

        base = work / "base.sif"
        shutil.copy2(sif, base)
        recipe = work / "r.def"
        recipe.write_text(f"Bootstrap: localimage\nFrom: {base}\n\n%post\n    touch /built\n")
        out2 = work / "out2.sif"
        env = {**os.environ, "RANKWIRE_TMPDIR": str(work)}

        def recipe_ours() -> float:
            return timed([rankwire, "build", str(out2), str(recipe)], env, quiet=True)

        from rankwire.runtime.imagemeta import read_image_metadata
        from rankwire.runtime.sif_read import SifImage

        with SifImage.open(base) as img:
            offset = read_image_metadata(img).partition_offset

        def recipe_plain() -> float:
            dest = work / "unpacked"
            shutil.rmtree(dest, ignore_errors=True)
            t = timed(
                [
                    "unsquashfs",
                    "-no-progress",
                    "-quiet",
                    "-o",
                    str(offset),
                    "-d",
                    str(dest),
                    str(base),
                ]
            )
            t += timed(["mksquashfs", str(dest), str(sqfs), *MKSQUASHFS_OPTS])
            shutil.rmtree(dest)
            return t

        ours, plain = medians(recipe_ours, recipe_plain, args.repeat)
        print(f"recipe from a {args.size} MiB localimage: rankwire build {ours:.2f} s, "
              f"unsquashfs + mksquashfs {plain:.2f} s, ratio {ours / plain:.3f}")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
