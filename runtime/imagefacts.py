"""Image facts for the planner: read once from the SIF's header and metadata objects."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterator
from typing import Optional

from rankwire.errors import UserError
from rankwire.runtime import sif_digest
from rankwire.runtime.imagemeta import read_image_metadata
from rankwire.runtime.plan import ImageFacts
from rankwire.runtime.sif_read import SifImage

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def check_image_path(path: str) -> None:
    """The first check of an image path a user gave (exec, run, inspect, sif)."""
    if not os.path.exists(path):
        raise UserError(f"image {path} not found: check the path")
    if os.path.isdir(path):
        raise UserError(
            f"{path} is a directory, not a SIF image: rankwire runs SIF files (see rankwire build)"
        )


def image_facts(path: str, fd: Optional[int] = None) -> ImageFacts:
    """Partition location, %environment, runscript presence and identity of a SIF.

    `fd`: read the image already open there (the SPANK check); `path` only names it.
    """
    if fd is None:
        check_image_path(path)
    image = SifImage.open(path) if fd is None else SifImage.open_fd(fd, path)
    try:
        meta = read_image_metadata(image)
    finally:
        image.close()
    return ImageFacts(
        path=os.path.abspath(path),
        partition_offset=meta.partition_offset,
        partition_size=meta.partition_size,
        digest=meta.identity.split(":", 1)[-1][:32],
        env=dict(meta.env),
        has_runscript=meta.runscript is not None,
        entrypoint=meta.entrypoint,
    )


def partition_digest(
    path: str, offset: int, size: int, cache_dir: str, read_at: Optional[str] = None
) -> str:
    """sha256 of the image's squashfs partition (`size` bytes at `offset`), read once per
    version of the file.

    Kept in `cache_dir/digests` under the file's (device, inode, size, mtime, ctime) and
    the partition's place: a file written or replaced gets a new ctime (or inode), so a
    kept digest never outlives the bytes it was read from. The partition's tables are
    checked (`unsquashfs -l`) before a digest is kept, so a corrupt image says so here.
    Only what extracts the image needs it (the facts, when extraction comes first; the
    holder, when FUSE failed). `read_at`: where to read the image if not at `path`.
    """
    fd = os.open(read_at or path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        key = "-".join(
            str(v)
            for v in (
                st.st_dev,
                st.st_ino,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
                offset,
                size,
            )
        )
        kept = os.path.join(cache_dir, "digests", key)
        text = _kept_digest(kept)
        if text:
            return text
        # The tasks of a node start together: one reads, the others wait for its digest.
        with _digests_locked(os.path.dirname(kept)):
            text = _kept_digest(kept)
            if text:
                return text
            return _read_digest(path, offset, size, fd, st, kept)
    finally:
        os.close(fd)


def _kept_digest(kept: str) -> str:
    with contextlib.suppress(OSError):
        with open(kept) as f:
            text = f.read().strip()
        if _DIGEST.fullmatch(text):
            return text
    return ""


@contextlib.contextmanager
def _digests_locked(digests: str) -> Iterator[None]:
    """The digests dir's lock, held while one process reads an image (unlocked when the
    cache can't be written: then each reads its own)."""
    try:
        os.makedirs(digests, mode=0o700, exist_ok=True)
        lock = os.open(digests, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        yield
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)


def _read_digest(path: str, offset: int, size: int, fd: int, st: os.stat_result, kept: str) -> str:
    """Check the partition's tables, hash it, keep the digest if the file held still."""
    _check_squashfs(path, offset, fd)
    digest = sif_digest.partition_digest(fd, offset, size)
    again = os.fstat(fd)
    if (again.st_size, again.st_mtime_ns, again.st_ctime_ns) == (
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
    ):
        keep(kept, digest + "\n")
    return digest


def keep(path: str, text: str) -> None:
    """Write `text` to the cache file `path` atomically (a temporary file renamed over
    it): a concurrent reader sees all of it or none. A cache we cannot write only costs
    a later re-read."""
    import tempfile

    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
                f.write(text)  # a path's undecodable bytes as they were
            os.replace(tmp, path)
        except OSError:
            os.unlink(tmp)
            raise


def _check_squashfs(path: str, offset: int, fd: int) -> None:
    """Every inode and directory of the partition readable (what a mount would walk).
    Without unsquashfs, or with a compressor it does not support, nothing is said."""
    import subprocess

    try:
        proc = subprocess.run(
            ["unsquashfs", "-l", "-n", "-o", str(offset), f"/proc/self/fd/{fd}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=(fd,),
            text=True,
            errors="replace",
        )
    except FileNotFoundError:
        return
    if proc.returncode == 0 or "unsupported" in proc.stderr:
        return
    last = (proc.stderr.strip().splitlines() or [f"unsquashfs exited {proc.returncode}"])[-1]
    raise UserError(
        f"{path}: the image's squashfs partition is corrupt "
        f"({last.removeprefix('FATAL ERROR: ')}): rebuild or re-pull it"
    )
