"""Getting images, against peers in the same run, on a throwaway loopback `docker-registry`.

1. Pull + convert of a 5-layer image (~200 MiB: a busybox-static rootfs, then host
   libraries and random data; built with umoci and pushed with skopeo, not by rankwire):
   `rankwire pull OUT.sif docker://…` with a fresh cache each run, vs `skopeo copy
   docker://… oci:DIR:TAG` + `umoci unpack --rootless` + `mksquashfs -comp zstd` (the
   compressor rankwire's conversion uses, `runtime/imagemeta.py` COMPRESSIONS[0]).
2. Cache hit: `rankwire pull` of the cached image by digest and by tag vs `cp` of the
   cached SIF to the same OUT.sif (what any pull to OUT.sif must do), and `rankwire exec
   docker://…@sha256:… /bin/true` vs `rankwire exec CACHED.sif /bin/true`: extra ms.
3. ORAS: `rankwire pull oras://…` of a ~500 MiB SIF (made by `rankwire build`, pushed by
   `rankwire push`), fresh cache each run, vs `curl` of the same blob: throughput.
4. N concurrent `rankwire pull`s of one image into one fresh cache: blob GETs in the
   registry's access log, which must be one per blob.

Runs of a comparison alternate (rankwire, peer, rankwire, …) after one warm-up round, so
both see the same noise; medians are printed as one markdown table. Everything (registry,
images, caches) lives in one temporary directory removed at the end, Ctrl-C included.

    .venv/bin/python bench/pull.py [--quick] [--repeat 5] [--image-mib 200] [--sif-mib 500]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from harness.oci import busybox_rootfs, read_layout, umoci_image  # noqa: E402
from harness.registry import Registry, running_registry  # noqa: E402
from rankwire.runtime.imagemeta import COMPRESSIONS  # noqa: E402

BIN = Path(sys.executable).parent
RW = str(BIN / "rankwire")
HOST_LIBS = Path("/usr/lib/x86_64-linux-gnu")
MIB = 1 << 20
_live: dict[int, subprocess.Popen[bytes]] = {}  # children running now, by pid


# -- processes --------------------------------------------------------------------------


def _start(argv: Sequence[str], env: Optional[dict[str, str]] = None) -> subprocess.Popen[bytes]:
    """A child in its own session (Ctrl-C reaches only us; cleanup kills its group)."""
    proc = subprocess.Popen(
        list(argv),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    _live[proc.pid] = proc
    return proc


def _finish(proc: subprocess.Popen[bytes], argv: Sequence[str]) -> str:
    out, err = proc.communicate()
    del _live[proc.pid]
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{err.decode()}")
    return out.decode()


def run(argv: Sequence[str], env: Optional[dict[str, str]] = None) -> str:
    return _finish(_start(argv, env), argv)


def timed(argv: Sequence[str], env: Optional[dict[str, str]] = None) -> float:
    """Wall seconds of one run."""
    t0 = time.perf_counter()
    run(argv, env)
    return time.perf_counter() - t0


def _kill_children() -> None:
    """SIGINT to each child's group, as Ctrl-C on a terminal would (rankwire cleans up
    its scratch then), SIGKILL after 10 s."""
    for pid in _live:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGINT)
    for pid, proc in list(_live.items()):
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            proc.wait()
        del _live[pid]


def _on_term(signum: int, _frame: Optional[FrameType]) -> None:
    raise KeyboardInterrupt


def alternate(rows: dict[str, Callable[[], float]], repeat: int) -> dict[str, list[float]]:
    """Each row's measures (it returns a number) over `repeat` rounds after a warm-up
    round; rows take turns, so a round's rows see about the same machine load."""
    got: dict[str, list[float]] = {name: [] for name in rows}
    for i in range(repeat + 1):
        for name, measure in rows.items():
            value = measure()
            if i:
                got[name].append(value)
    return got


def medians(got: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(v) for name, v in got.items()}


def round_ratios(a: list[float], b: list[float]) -> str:
    """a/b within each round (robust to load that changes between rounds), sorted."""
    return " ".join(f"{x / y:.2f}" for x, y in sorted(zip(a, b), key=lambda p: p[0] / p[1]))


def rmtree(path: Path) -> None:
    """rm -rf through the 0555 directories of unpacked images."""
    from rankwire.runtime.pull import force_rmtree

    force_rmtree(str(path))


# -- images -----------------------------------------------------------------------------


def _host_files(total: int) -> Iterator[Path]:
    """Regular files of the host's libraries, in a fixed order, about `total` bytes."""
    got = 0
    for path in sorted(HOST_LIBS.rglob("*")):
        if got >= total:
            return
        if path.is_file() and not path.is_symlink() and os.access(path, os.R_OK):
            got += path.stat().st_size
            yield path


def _layer_changes(total: int, layers: int) -> list[Callable[[Path], object]]:
    """`layers` rootfs changes of ~total/layers bytes each: half host libraries
    (compressible ELF), half random data; the first one also lays down busybox."""
    per = total // layers
    libs = iter(_host_files(total // 2 + per))

    def change(n: int) -> Callable[[Path], object]:
        def apply(root: Path) -> None:
            if n == 0:
                busybox_rootfs(root)
            libdir = root / f"usr/lib/bench{n}"
            libdir.mkdir(parents=True)
            size = 0
            for src in libs:
                shutil.copyfile(src, libdir / f"{size:012d}-{src.name}")
                size += src.stat().st_size
                if size >= per // 2:
                    break
            data = root / f"data/layer{n}"
            data.mkdir(parents=True)
            for i in range(0, per - per // 2, MIB):
                (data / f"random{i // MIB:04d}").write_bytes(os.urandom(MIB))

        return apply

    return [change(n) for n in range(layers)]


def docker_image(work: Path, reg: Registry, mib: int) -> tuple[str, str, list[str]]:
    """The 5-layer image pushed as bench/image:v1; (tag ref, digest ref, blob digests)."""
    layout = umoci_image(work / "umoci", "v1", _layer_changes(mib * MIB, 5))
    flags = reg.skopeo_flags("dest-")
    ref = f"docker://{reg.netloc}/bench/image:v1"
    run(["skopeo", "copy", "--quiet", "--preserve-digests", *flags, f"oci:{layout.path}:v1", ref])
    manifest, _ = read_layout(layout)
    blobs = [manifest["config"]["digest"], *(d["digest"] for d in manifest["layers"])]
    index = json.loads((layout.path / "index.json").read_text())
    digest = next(
        d["digest"]
        for d in index["manifests"]
        if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == "v1"
    )
    rmtree(work / "umoci")
    return ref, f"docker://{reg.netloc}/bench/image@{digest}", blobs


def oras_image(work: Path, reg: Registry, mib: int) -> tuple[str, str, int]:
    """A SIF with `mib` MiB of random data, pushed with `rankwire push`; (ref, its layer's
    digest, size)."""
    rootfs = busybox_rootfs(work / "sif-rootfs")
    with open(rootfs / "data", "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MIB))
    sif = work / "big.sif"
    run([RW, "build", str(sif), str(rootfs)])
    rmtree(rootfs)
    ref = f"oras://{reg.netloc}/bench/sif:v1"
    run([RW, "push", "--insecure", "-q", str(sif), ref])
    blob = "sha256:" + run(["sha256sum", str(sif)]).split()[0]
    size = sif.stat().st_size
    sif.unlink()
    return ref, blob, size


# -- the measurements -------------------------------------------------------------------


class Bench:
    def __init__(self, work: Path, reg: Registry) -> None:
        self.work, self.reg = work, reg
        self.steps: dict[str, list[float]] = {
            "skopeo copy": [],
            "umoci unpack": [],
            "mksquashfs": [],
        }

    def env(self, cache: Path) -> dict[str, str]:
        return {**os.environ, "RANKWIRE_CACHEDIR": str(cache)}

    def fresh_pull(self, ref: str, extra: Sequence[str] = ()) -> float:
        """`rankwire pull OUT.sif REF` into an empty cache; seconds."""
        cache, out = self.work / "cache-fresh", self.work / "out.sif"
        rmtree(cache)
        out.unlink(missing_ok=True)
        try:
            return timed([RW, "pull", "-q", "--insecure", *extra, str(out), ref], self.env(cache))
        finally:
            rmtree(cache)
            out.unlink(missing_ok=True)

    def peer_convert(self, ref: str) -> float:
        """skopeo copy + umoci unpack + mksquashfs; seconds (each step kept too)."""
        layout, bundle, sqfs = (
            self.work / "peer-oci",
            self.work / "peer-bundle",
            self.work / "p.sqfs",
        )
        flags = self.reg.skopeo_flags("src-")
        argvs = {
            "skopeo copy": ["skopeo", "copy", "--quiet", *flags, ref, f"oci:{layout}:v1"],
            "umoci unpack": [
                "umoci", "unpack", "--rootless", "--image", f"{layout}:v1", str(bundle),
            ],
            "mksquashfs": [
                "mksquashfs", str(bundle / "rootfs"), str(sqfs), "-comp", COMPRESSIONS[0],
                "-noappend", "-quiet", "-no-progress",
            ],
        }  # fmt: skip
        try:
            took = {step: timed(argv) for step, argv in argvs.items()}
        finally:
            for path in (layout, bundle, sqfs):
                rmtree(path)
        for step, secs in took.items():
            self.steps[step].append(secs)
        return sum(took.values())

    def cache_only(self, ref: str) -> float:
        """The pull `exec`/`srun --container-image` do (`pull.local_image`: into an empty
        cache, no OUT.sif), through the API in a new interpreter; seconds."""
        cache = self.work / "cache-fresh"
        rmtree(cache)
        code = (
            "import sys; from rankwire.runtime import pull as p; "
            "p.local_image(sys.argv[1], p.Access(insecure=True))"
        )
        try:
            return timed([sys.executable, "-c", code, ref], self.env(cache))
        finally:
            rmtree(cache)

    def curl(self, blob: str) -> float:
        out = self.work / "curl.out"
        try:
            url = f"{self.reg.url}/v2/bench/sif/blobs/{blob}"
            return timed(["curl", "-sf", "-o", str(out), url])
        finally:
            out.unlink(missing_ok=True)

    def concurrent(self, ref: str, blobs: list[str], n: int) -> tuple[int, float]:
        """n pulls of `ref` at once into one fresh cache: (blob GETs, wall seconds)."""
        cache = self.work / "cache-concurrent"
        rmtree(cache)
        before = sum(self.reg.blob_gets(d) for d in blobs)
        argvs = [
            [RW, "pull", "-q", "--insecure", str(self.work / f"c{i}.sif"), ref] for i in range(n)
        ]
        t0 = time.perf_counter()
        procs = [_start(argv, self.env(cache)) for argv in argvs]
        for proc, argv in zip(procs, argvs):
            _finish(proc, argv)
        took = time.perf_counter() - t0
        rmtree(cache)
        for i in range(n):
            (self.work / f"c{i}.sif").unlink()
        return sum(self.reg.blob_gets(d) for d in blobs) - before, took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="40 MiB image, 100 MiB SIF, 2 runs")
    ap.add_argument("--repeat", type=int, help="runs per comparison (default 5, --quick 2)")
    ap.add_argument("--image-mib", type=int, help="docker image size (default 200)")
    ap.add_argument("--sif-mib", type=int, help="random data in the SIF (default 500)")
    ap.add_argument("-n", type=int, default=8, help="concurrent pulls (default 8)")
    args = ap.parse_args()
    repeat = args.repeat or (2 if args.quick else 5)
    image_mib = args.image_mib or (40 if args.quick else 200)
    sif_mib = args.sif_mib or (100 if args.quick else 500)
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it

    work = Path(tempfile.mkdtemp(prefix="rankwire-bench-pull-"))
    try:
        with running_registry(work) as reg:
            measure(Bench(work, reg), repeat, image_mib, sif_mib, args.n)
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        _kill_children()
        rmtree(work)


def measure(b: Bench, repeat: int, image_mib: int, sif_mib: int, n: int) -> None:
    t0 = time.perf_counter()
    tag_ref, digest_ref, blobs = docker_image(b.work, b.reg, image_mib)
    oras_ref, sif_blob, sif_size = oras_image(b.work, b.reg, sif_mib)
    print(f"(images made and pushed in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    conv_runs = alternate(
        {"rankwire": lambda: b.fresh_pull(tag_ref), "peer": lambda: b.peer_convert(tag_ref)},
        repeat,
    )
    conv = medians(conv_runs)
    steps = {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in b.steps.items()}

    # A warm cache, and the SIF in it as the local image for `exec`.
    hit_cache, out = b.work / "cache-hit", b.work / "hit.sif"
    env = b.env(hit_cache)
    res = json.loads(run([RW, "pull", "-q", "--insecure", "--json", str(out), tag_ref], env))
    cached, sif_size_docker = res["path"], res["size"]
    ms = 1000.0
    hit_repeat = max(repeat * 3, 7)
    hit_runs = alternate(
        {
            "start+cp": lambda: ms * (timed([RW, "--version"]) + timed(["cp", cached, str(out)])),
            "digest": lambda: ms * timed([RW, "pull", "-q", "--force", str(out), digest_ref], env),
            "tag": lambda: (
                ms * timed([RW, "pull", "-q", "--insecure", "--force", str(out), tag_ref], env)
            ),
            "exec sif": lambda: ms * timed([RW, "exec", cached, "/bin/true"], env),
            "exec docker": lambda: ms * timed([RW, "exec", digest_ref, "/bin/true"], env),
        },
        hit_repeat,
    )
    hit = medians(hit_runs)

    oras_runs = alternate(
        {
            "rankwire": lambda: b.fresh_pull(oras_ref),
            "cache only": lambda: b.cache_only(oras_ref),
            "curl": lambda: b.curl(sif_blob),
        },
        repeat,
    )
    rate = {k: sif_size / MIB / secs for k, secs in medians(oras_runs).items()}

    gets, conc_s = b.concurrent(tag_ref, blobs, n)

    print(
        f"## `rankwire pull`, loopback registry, medians of {repeat} "
        f"({hit_repeat} for cache hits)\n"
    )
    print("| what | rankwire | peer | ratio | goal |\n|---|---|---|---|---|")
    print(
        f"| pull + convert, {image_mib} MiB 5-layer image (s; peer: skopeo copy + umoci "
        f"unpack + mksquashfs) | {conv['rankwire']:.2f} | {conv['peer']:.2f} "
        f"| {conv['rankwire'] / conv['peer']:.2f}x | ≤ 1.0x |"
    )
    for key, what in (("digest", "`@sha256:`"), ("tag", "`:tag`")):
        print(
            f"| cache hit, pull {what} to OUT.sif (ms; peer: `rankwire --version`, then cp of "
            f"the cached SIF) | {hit[key]:.0f} | {hit['start+cp']:.0f} "
            f"| {hit[key] - hit['start+cp']:+.0f} ms | ≤ +50 ms |"
        )
    print(
        "| cache hit, `exec docker://…@sha256:… /bin/true` (ms; peer: exec CACHED.sif) "
        f"| {hit['exec docker']:.0f} | {hit['exec sif']:.0f} "
        f"| {hit['exec docker'] - hit['exec sif']:+.0f} ms | ≤ +50 ms |"
    )
    print(
        f"| ORAS pull OUT.sif, {sif_size / MIB:.0f} MiB SIF (MiB/s; peer: curl of the blob) "
        f"| {rate['rankwire']:.0f} | {rate['curl']:.0f} "
        f"| {rate['rankwire'] / rate['curl']:.2f}x | ≥ 0.8x |"
    )
    print(
        "| ORAS pull into the cache only, as `exec oras://…` does (MiB/s; peer: curl) "
        f"| {rate['cache only']:.0f} | {rate['curl']:.0f} "
        f"| {rate['cache only'] / rate['curl']:.2f}x | ≥ 0.8x |"
    )
    print(
        f"| {n} concurrent pulls, one fresh cache (blob GETs; peer: blobs in the image) "
        f"| {gets} | {len(blobs)} | {gets / len(blobs):.2f}x | 1.0x |"
    )
    print(
        "\npeer steps (medians): "
        + ", ".join(f"{k} {v:.2f} s" for k, v in steps.items())
        + f"; docker image SIF {sif_size_docker / MIB:.0f} MiB; "
        f"{n} concurrent pulls took {conc_s:.1f} s"
    )
    print(
        "per-round ratios: pull + convert "
        + round_ratios(conv_runs["rankwire"], conv_runs["peer"])
        + "; ORAS OUT.sif (curl time / ours) "
        + round_ratios(oras_runs["curl"], oras_runs["rankwire"])
        + "; ORAS cache only "
        + round_ratios(oras_runs["curl"], oras_runs["cache only"])
    )
    print(f"(cpus: {os.cpu_count()}, repeats: {repeat})")


if __name__ == "__main__":
    main()
