"""`rankwire verify` of a signed image against `sha256sum` of the same file: verifying
reads each signed object once (one pass over the data), so it should cost about one hash
of the file. Runs interleaved (peer, ours, peer, ours, ...), page cache warm for both.
Then the cost of a cached verification (`runtime/trust.py`).

    .venv/bin/python bench/verify.py [--mib 1024] [--repeat 3]
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

RANKWIRE = str(Path(sys.executable).with_name("rankwire"))


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def cached_check(img: Path, pub: Path, cache: Path, repeat: int = 50) -> float:
    """Median ms of `trust.check` when the verification cache has the image (what
    `--verify` and the plugin's `require_signed_by` pay per start once it is verified)."""
    from rankwire.runtime import sif_sign, trust

    fpr = sif_sign.load_pem_public(pub).fingerprint
    req = trust.Requirement((fpr,), (str(pub),))
    age = time.time() - img.stat().st_ctime
    if age < 2.5:  # a younger file is not recorded (trust._SETTLE_NS)
        time.sleep(2.5 - age)
    fd = os.open(img, os.O_RDONLY)
    try:
        assert not trust.check(fd, str(img), req, cache).cached
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            assert trust.check(fd, str(img), req, cache).cached
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024, help="partition size (default 1 GiB)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from rankwire.runtime.sif_format import DataType, FsType, PartType
    from rankwire.runtime.sif_write import ObjectInput, create_sif

    work = Path(tempfile.mkdtemp(prefix="rankwire-bench-"))
    try:
        data = work / "partition"
        with open(data, "wb") as f:  # the partition's content does not matter to verify
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        img = work / "img.sif"
        create_sif(
            img,
            [
                ObjectInput(DataType.DEFFILE, data=b"Bootstrap: scratch\n"),
                ObjectInput(
                    DataType.PARTITION,
                    path=data,
                    fs_type=FsType.SQUASHFS,
                    part_type=PartType.PRIMSYS,
                    arch="amd64",
                ),
            ],
        )
        data.unlink()
        key, pub = work / "key.pem", work / "pub.pem"
        subprocess.run(
            ["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(key)], check=True
        )
        subprocess.run(
            ["openssl", "pkey", "-in", str(key), "-pubout", "-out", str(pub)], check=True
        )
        subprocess.run(
            [RANKWIRE, "sign", "--pem-key", str(key), str(img)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        runs = {
            "sha256sum IMG (peer)": ["sha256sum", str(img)],
            "openssl dgst -sha256 IMG": ["openssl", "dgst", "-sha256", str(img)],
            "rankwire verify --pem-key": [RANKWIRE, "verify", "--pem-key", str(pub), str(img)],
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for argv in runs.values():
            timed(argv)  # warm the page cache and the .pyc files
        for _ in range(args.repeat):
            for name, argv in runs.items():
                times[name].append(timed(argv))
        peer = statistics.median(times["sha256sum IMG (peer)"])
        size = img.stat().st_size / (1 << 20)
        print(f"image {size:.0f} MiB, {args.repeat} interleaved runs each, medians:")
        for name, values in times.items():
            ms = statistics.median(values) * 1000
            print(f"  {name:28} {ms:9.1f} ms   ratio to sha256sum {ms / 1000 / peer:.3f}")
        print(f"(cpus: {os.cpu_count()}; goal: ratio <= 1.2)")
        cached = cached_check(img, pub, work / "verified")
        print(f"  cached verification (trust.check, hit) {cached:6.2f} ms   (goal: <= 5 ms)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
