"""The fabric self-test: build `pingpong.c` once, run it on the host or in a container.

The program is C (libfabric's endpoint calls are static inlines) and needs no Python in
the image: in a container the host-built binary is bound in next to the host libfabric
of the fabric plan, after the same symbol-version check as the libraries.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from rankwire.errors import UserError
from rankwire.fabric.plan import PRIVATE_DIR, FabricPlan
from rankwire.record import record

SOURCE = Path(__file__).with_name("pingpong.c")
NAME = "rankwire-fi-pingpong"
IN_CONTAINER = f"{PRIVATE_DIR}/bin/{NAME}"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)(i?[bB])?\s*$")


@record
class PingPongResult:
    size: int
    iterations: int
    warmup: int
    rtt_us: float
    latency_us: float  # one way: half the round trip
    bandwidth_MBps: float  # size / one-way time, 10^6 bytes per second


@record
class PingPongRun:
    provider: str  # as libfabric reports it, e.g. "tcp;ofi_rxm"
    fabric: str
    domain: str
    mode: str  # msg | tagged
    library: str  # the libfabric.so the client mapped (its path inside a container)
    library_dev_inode: str  # "fe:00:5595192" from /proc/self/maps
    version: str
    results: tuple[PingPongResult, ...]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_size(text: str) -> int:
    """ "64", "4k", "1M", "1MiB" -> bytes (binary units)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise UserError(f"bad message size '{text}': use bytes or a k/M/G suffix, e.g. 64 or 1M")
    unit = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
    return int(float(m.group(1)) * unit)


def show_size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rankwire" / "fabric"


def build_pingpong(out_dir: Optional[Path] = None) -> Path:
    """The compiled self-test (built once per source and compiler; atomic)."""
    cc = os.environ.get("CC", "cc")
    cc_path = shutil.which(cc)
    if not cc_path:
        raise UserError(f"no C compiler ({cc}) for the fabric self-test: install gcc")
    if not SOURCE.exists():
        raise UserError(f"{SOURCE} is missing: reinstall rankwire")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + cc_path.encode()).hexdigest()[:12]
    out_dir = out_dir or cache_dir()
    binary = out_dir / f"{NAME}-{key}"
    if binary.exists():
        return binary
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{NAME}.", dir=out_dir)
    except OSError as err:
        raise UserError(
            f"cannot write the fabric self-test to {out_dir} ({err.strerror}): "
            "set XDG_CACHE_HOME to a writable directory"
        ) from None
    os.close(fd)
    try:
        proc = subprocess.run(
            [cc_path, "-O2", "-o", tmp, str(SOURCE), "-lfabric"], capture_output=True, text=True
        )
        if proc.returncode != 0:
            if "rdma/fabric.h" in proc.stderr:
                raise UserError(
                    "libfabric headers not found for the self-test: install libfabric-dev "
                    "(or put its include dir on CPATH)"
                )
            last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            raise UserError(f"cannot build the fabric self-test: {last}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, binary)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return binary


def pingpong_args(
    provider: str,
    sizes: Sequence[int] = (64, 1 << 20),
    iterations: int = 1000,
    warmup: int = 100,
    mode: str = "msg",
    timeout: float = 30.0,
) -> list[str]:
    if iterations < 1 or warmup < 0:
        raise UserError("--iterations must be >= 1 and --warmup >= 0")
    if mode not in ("msg", "tagged"):
        raise UserError(f"bad --mode '{mode}': use msg or tagged")
    args = ["-p", provider, "-m", mode, "-I", str(iterations), "-W", str(warmup)]
    return [*args, "-S", ",".join(str(s) for s in sizes), "-t", str(timeout)]


def container_argv(image: str, plan: FabricPlan, binary: Path) -> list[str]:
    """`rankwire exec` of the bound self-test in `image` under the fabric `plan`."""
    return [
        sys.executable,
        "-m",
        "rankwire",
        "exec",
        "--fabric",
        plan.choice,
        "-B",
        f"{binary}:{IN_CONTAINER}:ro",
        image,
        IN_CONTAINER,
    ]


def parse_output(stdout: str) -> PingPongRun:
    info: dict[str, str] = {}
    results: list[PingPongResult] = []
    for line in stdout.splitlines():
        if not line.startswith("{"):
            continue
        event = json.loads(line)
        kind = event.pop("event", "")
        if kind == "info":
            info = event
        elif kind == "result":
            results.append(PingPongResult(**event))
    if not info or not results:
        raise UserError("the fabric self-test printed no results; run it with --json to see why")
    return PingPongRun(results=tuple(results), **info)


def run_pingpong(argv: Sequence[str], env: Optional[dict[str, str]] = None) -> PingPongRun:
    """Run a self-test command line (host binary or `container_argv`) and parse it."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        own = [ln for ln in lines if ln.startswith(NAME)]  # the first is the cause
        why = (own or lines[-1:] or [f"exit status {proc.returncode}"])[0]
        raise UserError(f"fabric self-test failed: {why} (command: {shlex.join(argv[:4])} ...)")
    return parse_output(proc.stdout)
