"""The cost of keying the extract cache on content: the partition's digest, first time
(read + hash + the tables' check) and kept (one stat and a small read), against
`sha256sum` of the same file in the same run (page cache warm for all).

    .venv/bin/python bench/digest.py [--mib 100] [--repeat 7]
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
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness.images import make_rootfs


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up (page cache, pyc)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    from rankwire.runtime import sif_digest
    from rankwire.runtime.build import build_image
    from rankwire.runtime.imagefacts import image_facts, partition_digest

    work = Path(tempfile.mkdtemp(prefix="rankwire-bench-"))
    try:
        rootfs = make_rootfs(work / "rootfs")
        with open(rootfs / "data", "wb") as f:  # incompressible: the partition is ~MiB
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        img = work / "img.sif"
        build_image(img, rootfs)
        facts = image_facts(str(img))
        cache = work / "cache"

        def first() -> None:
            shutil.rmtree(cache, ignore_errors=True)
            partition_digest(facts.path, facts.partition_offset, facts.partition_size, str(cache))

        def bytes_only() -> None:
            fd = os.open(img, os.O_RDONLY)
            try:
                sif_digest.partition_digest(fd, facts.partition_offset, facts.partition_size)
            finally:
                os.close(fd)

        peer = median_ms(
            lambda: subprocess.run(["sha256sum", str(img)], check=True, stdout=subprocess.DEVNULL),
            args.repeat,
        )
        rows = [
            ("sha256sum IMG (peer)", peer),
            ("partition digest, first time (with check)", median_ms(first, args.repeat)),
            ("  of which hashing the partition", median_ms(bytes_only, args.repeat)),
            (
                "partition digest, kept (second time on)",
                median_ms(
                    lambda: partition_digest(
                        facts.path, facts.partition_offset, facts.partition_size, str(cache)
                    ),
                    args.repeat,
                ),
            ),
        ]
        size = img.stat().st_size / (1 << 20)
        print(f"image {size:.0f} MiB, partition {facts.partition_size / (1 << 20):.0f} MiB")
        print(f"{'case':44} {'median ms':>10} {'ratio':>8}")
        for name, ms in rows:
            print(f"{name:44} {ms:10.2f} {ms / peer:8.3f}")
        print(f"(cpus: {os.cpu_count()}, repeats: {args.repeat})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
