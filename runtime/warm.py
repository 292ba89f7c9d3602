"""The image's pages a job's ranks read last time ("warm list"), read again ahead of them.

A squashfuse mount starts with an empty page cache, and its daemon is one thread: the
ranks' page faults on their libraries (the MPI's, its components, UCX's transports) come
as small reads, each unpacking a whole squashfs block (128 KiB), often twice (a read-around
window straddles two blocks), while the ranks wait on one core. Measured on 2 cores,
`apptainer-mpirun -n 4` of the harness's images: squashfuse_ll used 64-71 ms of CPU in an
MPICH hello and about 100 in an Open MPI one, after the ranks started.

So the launcher keeps, per image and program, which parts of which files its ranks had
mapped (`record`: the first rank to finalize, its /proc/PID/maps and `mincore`, block
aligned: what any rank of the job read of those files), and the next launch of that
program in that image has the holder read those ranges right after the mount
(`prefetch`, in a child of the holder), on the CPU the launcher's own start leaves idle:
in large sequential reads, so each block is unpacked once. It is a hint only: a file
gone or changed costs a wasted read, never a failure.

`load` and `cache_path` are facts (the user's cache); `coalesce` is pure."""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import re
import stat
import struct
from collections.abc import Iterable, Sequence

# (offset, length, path in the container): a range of a file to read ahead.
WarmRange = tuple[int, int, str]

BLOCK = 128 * 1024  # squashfs's default block: ranges are whole blocks, unpacked once
MAX_BYTES = 64 * 1024 * 1024  # read ahead at most this much per launch
MAX_FILES = 1024
KEPT = 64  # warm lists kept, the newest
OVERFLOW_UID = 65534  # what a file's owner reads as where it is not mapped
CHUNK = 1024 * 1024
MAGIC = "rankwire-warm 1"


def cache_path(cache_dir: str, image_digest: str, program: str, path_env: str) -> str:
    """Where the warm list of `program` (as the rank's exec resolves it: along PATH) in
    the image of metadata digest `image_digest` is kept."""
    key = hashlib.sha256(f"{program}\0{path_env}".encode()).hexdigest()[:16]
    return os.path.join(cache_dir, "warm", f"{image_digest}-{key}")


def load(path: str) -> tuple[WarmRange, ...]:
    """The warm list at `path`; () when there is none or it is not ours."""
    try:
        with open(path, encoding="utf-8", errors="strict") as f:
            lines = f.read(1 << 20).splitlines()
    except (OSError, UnicodeDecodeError):
        return ()
    if not lines or lines[0] != MAGIC:
        return ()
    ranges: list[WarmRange] = []
    for line in lines[1:]:
        offset, _, rest = line.partition(" ")
        length, _, name = rest.partition(" ")
        if offset.isdigit() and length.isdigit() and name.startswith("/"):
            ranges.append((int(offset), int(length), name))
    return tuple(ranges)


def coalesce(resident: bytes, page: int, block: int = BLOCK) -> list[tuple[int, int]]:
    """The (offset, length) runs of whole `block`s holding a page whose `mincore` byte in
    `resident` has bit 0 set (`page` bytes a page)."""
    blocks = sorted({i * page // block for i, b in enumerate(resident) if b & 1})
    runs: list[tuple[int, int]] = []
    for b in blocks:
        if runs and runs[-1][0] + runs[-1][1] == b * block:
            runs[-1] = (runs[-1][0], runs[-1][1] + block)
        else:
            runs.append((b * block, block))
    return runs


def _mapped(pid: int) -> list[tuple[int, int, int, str]]:
    """The file mappings of process `pid` (its program, libraries, plug-ins): (start, end,
    file offset, path), in the order /proc lists them."""
    spans = []
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.rstrip("\n").split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/") and fields[4] != "0":
                start, _, end = fields[0].partition("-")
                spans.append((int(start, 16), int(end, 16), int(fields[2], 16), fields[5]))
    return spans


def _present(pid: int, spans: Sequence[tuple[int, int, int, str]]) -> dict[str, set[int]]:
    """Per file, the pages (file offset / page size) that process `pid` has mapped in:
    what it touched (and what the kernel mapped around it), from /proc/PID/pagemap (bit
    63: present; the owner may read it)."""
    page = mmap.PAGESIZE
    pages: dict[str, set[int]] = {}
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for start, end, offset, name in spans:
            raw = os.pread(fd, (end - start) // page * 8, start // page * 8)
            got = pages.setdefault(name, set())
            for i, (entry,) in enumerate(struct.iter_unpack("<Q", raw)):
                if entry >> 63:
                    got.add(offset // page + i)
    finally:
        os.close(fd)
    return pages


def _mount_points(pid: int) -> list[str]:
    """The mount points of process `pid`'s mount namespace, as its root shows them."""
    points = []
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4:  # octal escapes (\\040 for a space) as the kernel writes
                points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4]))
    return points


def _in_image(name: str, points: Sequence[str]) -> bool:
    """`name`'s innermost mount point is the container's root (the image's overlay): not
    a bound host file or directory, /dev/shm, /tmp."""
    if "\n" in name or name.endswith(" (deleted)"):
        return False
    return not any(p != "/" and (name == p or name.startswith(p + "/")) for p in points)


def _mincore_tells(st: os.stat_result) -> bool:
    """The kernel answers `mincore` on a mapping of this file truly only to its owner or
    to whoever could open it for writing (root, if its owner is mapped); to anyone else
    it says every page is in (a side channel closed in Linux 5.0). A user's container
    maps the user to itself, so the image's files are nobody's there."""
    euid = os.geteuid()
    return st.st_uid == euid or (euid == 0 and st.st_uid != OVERFLOW_UID)


def _neighbours(root: str, names: Sequence[str], points: Sequence[str]) -> list[str]:
    """The image's other files in the directories of `names` (not below): plug-ins the
    ranks loaded and closed again (Open MPI's components, UCX's transports) are no longer
    mapped at the end, but what they read is still cached."""
    seen, found = set(names), []
    for parent in dict.fromkeys(os.path.dirname(n) for n in names):
        try:
            with os.scandir(root + parent) as entries:
                for entry in entries:
                    name = f"{parent.rstrip('/')}/{entry.name}"
                    fresh = name not in seen and _in_image(name, points)
                    if fresh and entry.is_file(follow_symlinks=False):
                        seen.add(name)
                        found.append(name)
        except OSError:
            continue
    return found


def _resident(fd: int, size: int) -> bytes:
    """`mincore` of the whole file open at `fd`: which of its pages are in the page cache
    (for a FUSE file: which any process read since the mount; see `_mincore_tells`)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = ctypes.create_string_buffer(pages)
    # MAP_PRIVATE with write access only to take the address (ctypes wants a writable
    # buffer); nothing is written, so every page stays the page cache's.
    m = mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        view = ctypes.c_char.from_buffer(m)
        try:
            if libc.mincore(ctypes.addressof(view), size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del view
    finally:
        m.close()
    return vec.raw


def record(pid: int, root_pid: int, dest: str) -> bool:
    """Write to `dest` the warm list of rank `pid`, still alive: the block runs of the
    image's files it mapped, with the pages it touched (its pagemap) or, where the kernel
    tells us (`_mincore_tells`), every page any rank read of them and of the image's other
    files beside them (their page cache). Files are opened in the root of process
    `root_pid` (the container's init, which outlives the rank, else the rank). False
    (nothing written) when the rank cannot be read."""
    try:
        points = _mount_points(root_pid)
        present = _present(pid, [s for s in _mapped(pid) if _in_image(s[3], points)])
    except (OSError, ValueError):
        return False
    root = f"/proc/{root_pid}/root"
    names = list(present)
    ranges: list[WarmRange] = []
    total, told = 0, False
    for i, name in enumerate(names):
        if i >= MAX_FILES or total >= MAX_BYTES:
            break
        try:
            fd = os.open(root + name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
                continue
            if _mincore_tells(st):
                resident = _resident(fd, st.st_size)
                if not told:  # once: the image's other files beside these are worth a look
                    told = True
                    names += _neighbours(root, list(present), points)
            else:
                resident = _bitmap(present.get(name, set()), st.st_size)
            runs = coalesce(resident, mmap.PAGESIZE)
        except (OSError, ValueError):
            continue
        finally:
            os.close(fd)
        for offset, length in runs:
            length = min(length, st.st_size - offset, MAX_BYTES - total)
            if length > 0:
                ranges.append((offset, length, name))
                total += length
    if not ranges:
        return False
    _write(dest, ranges)
    return True


def _bitmap(pages: set[int], size: int) -> bytes:
    """`pages` as `mincore` would say them for a file of `size` bytes."""
    vec = bytearray((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
    for i in pages:
        if i < len(vec):
            vec[i] = 1
    return bytes(vec)


def _write(dest: str, ranges: Iterable[WarmRange]) -> None:
    """Whole or not at all: a temporary file beside it, renamed into place."""
    text = "".join([f"{MAGIC}\n", *(f"{o} {n} {name}\n" for o, n, name in ranges)])
    parent = os.path.dirname(dest)
    tmp = f"{dest}.{os.getpid()}.tmp"
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.rename(tmp, dest)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return
    with contextlib.suppress(OSError):  # an image or program used once: no list for ever
        kept = sorted(os.scandir(parent), key=lambda e: e.stat().st_mtime_ns, reverse=True)
        for old in kept[KEPT:]:
            os.unlink(old.path)


def prefetch(root: str, ranges: Sequence[WarmRange]) -> None:
    """Read `ranges` of the files under `root` (the image's mount), in order, into the
    page cache; a file that is not there, or not a regular file, is passed over."""
    budget = MAX_BYTES
    fd, current = -1, ""
    try:
        for offset, length, name in ranges:
            if name != current:
                if fd >= 0:
                    os.close(fd)
                fd, current = -1, name
                try:  # O_NONBLOCK: a FIFO in its place must not hold us at the open
                    fd = os.open(root + name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        os.close(fd)
                        fd = -1
                except OSError:
                    fd = -1
            if fd < 0:
                continue
            end = offset + min(length, budget)
            while offset < end:
                got = os.pread(fd, min(CHUNK, end - offset), offset)
                if not got:
                    break
                offset += len(got)
                budget -= len(got)
            if budget <= 0:
                break
    except OSError:
        pass  # the mount went (the job ended first): nothing more to warm
    finally:
        if fd >= 0:
            os.close(fd)
