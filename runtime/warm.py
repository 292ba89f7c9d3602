"""The image's pages a job's ranks read last time ("warm list"), read again ahead of them.

A squashfuse mount starts with an empty page cache, and its daemon is one thread: the
ranks' page faults on their libraries (the MPI's, its components, UCX's transports) come
as small reads, each unpacking a whole squashfs block (128 KiB), often twice (a read-around
window straddles two blocks), while the ranks wait on one core. Measured on 2 cores,
`apptainer-mpirun -n 4` of the harness's images: squashfuse_ll used 64-71 ms of CPU in an
MPICH hello and about 100 in an Open MPI one, after the ranks started.

So the launcher keeps, per image and program, which blocks of which image files its
ranks read (`record`, from the first rank to finalize: the files it maps and the pages
it touched, or, where the kernel tells the truth about it, everything of those files and
of their neighbours in the page cache), and the next launch of that program in that
image has the holder read those blocks as soon as its container has a PID namespace
(`prefetch`, in a process of it chrooted into the image's mount: `Holder._prefetch`),
on the CPU the launcher's own start leaves idle: in large sequential reads, so each
block is unpacked once. It is a hint only: a file gone or changed costs a
wasted read, never a failure.

`load` and `cache_path` are facts (the user's cache); `coalesce` is pure."""

from __future__ import annotations

import contextlib
import mmap
import os
import posixpath
import re
import stat
import struct
from collections.abc import Iterable, Sequence

from rankwire.runtime.plan import within

# (offset, length, path in the container): a range of a file to read ahead.
WarmRange = tuple[int, int, str]

BLOCK = 128 * 1024  # squashfs's default block: ranges are whole blocks, unpacked once
MAX_BYTES = 64 * 1024 * 1024  # read ahead at most this much per launch
MAX_FILES = 1024
KEPT = 64  # warm lists kept, the newest
OVERFLOW_UID = 65534  # what a file's owner reads as where it is not mapped
CHUNK = 1024 * 1024
MAGIC = "rankwire-warm 1"


def cache_path(cache_dir: str, image_digest: str, program: str, path_env: str, cwd: str) -> str:
    """Where the warm list of `program` (as the rank's exec resolves it: along PATH, or
    from `cwd` when relative) in the image of metadata digest `image_digest` is kept."""
    import hashlib

    where = "" if program.startswith("/") else cwd
    key = hashlib.sha256(f"{program}\0{path_env}\0{where}".encode()).hexdigest()[:16]
    return os.path.join(cache_dir, "warm", f"{image_digest}-{key}")


def load(path: str) -> tuple[WarmRange, ...]:
    """The warm list at `path`; () when there is none or it is not ours. A list that is
    used is touched: `_write` keeps the lists used last, `cache clean --older-than` too."""
    try:
        with open(path, "rb") as f:
            lines = f.read(1 << 20).decode("utf-8", "surrogateescape").split("\n")
    except OSError:
        return ()
    if lines[0] != MAGIC:
        return ()
    ranges: list[WarmRange] = []
    for line in lines[1:]:
        m = _LINE.fullmatch(line)
        # a path in the image as a rank's maps name it: absolute, normal, no NUL
        if m and posixpath.normpath(m[3]) == m[3] and "\0" not in m[3]:
            offset, length = int(m[1]), int(m[2])
            if offset < 1 << 62 and 0 < length <= MAX_BYTES:
                ranges.append((offset, length, m[3]))
    if ranges:
        with contextlib.suppress(OSError):
            os.utime(path)
    return tuple(ranges)


_LINE = re.compile(r"([0-9]{1,19}) ([0-9]{1,19}) (/.*)", re.ASCII | re.DOTALL)
_NAME = re.compile(r"[0-9a-f]{1,64}-[0-9a-f]{16}", re.ASCII)


def coalesce(
    pages: Iterable[tuple[int, int]], page: int, block: int = BLOCK
) -> list[tuple[int, int]]:
    """The (offset, length) runs of whole `block`s that hold the page runs `pages`
    ([first, end) page numbers, `page` bytes a page), in order."""
    runs: list[tuple[int, int]] = []
    for first, end in sorted(pages):
        start, stop = first * page // block * block, -(-end * page // block) * block
        if runs and runs[-1][0] + runs[-1][1] >= start:
            start = runs[-1][0]
            runs[-1] = (start, max(runs[-1][0] + runs[-1][1], stop) - start)
        else:
            runs.append((start, stop - start))
    return runs


def _runs(flags: bytes) -> list[tuple[int, int]]:
    """The [first, end) runs of pages whose byte in `flags` (as `mincore` fills them)
    has bit 0 set."""
    return [m.span() for m in re.finditer(b"\x01+", flags.translate(_BIT0))]


_BIT0 = bytes(i & 1 for i in range(256))


def _mapped(pid: int) -> list[tuple[int, int, int, str]]:
    """The file mappings of process `pid` (its program, libraries, plug-ins): (start, end,
    file offset, path), in the order /proc lists them."""
    spans = []
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="surrogateescape") as f:
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
    budget = 4 * MAX_BYTES // page  # pagemap entries looked at, at most
    pages: dict[str, set[int]] = {}
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for start, end, offset, name in spans:
            count = min((end - start) // page, MAX_BYTES // page, budget)
            budget -= count
            raw = os.pread(fd, count * 8, start // page * 8)
            got = pages.setdefault(name, set())
            for i, (entry,) in enumerate(struct.iter_unpack("<Q", raw[: len(raw) // 8 * 8])):
                if entry >> 63:
                    got.add(offset // page + i)
            if budget <= 0:
                break
    finally:
        os.close(fd)
    return pages


def _mount_points(pid: int) -> list[str]:
    """The mount points of process `pid`'s mount namespace, as its root shows them."""
    from rankwire.runtime.syscalls import mount_field

    with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return [mount_field(fields[4]) for fields in map(str.split, f) if len(fields) > 4]


def _in_image(name: str, points: Sequence[str]) -> bool:
    """`name`'s innermost mount point is the container's root (the image's overlay): not
    a bound host file or directory, /dev/shm, /tmp."""
    if "\n" in name or name.endswith(" (deleted)"):
        return False
    return not any(p != "/" and within(name, p) for p in points)


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
    (for a FUSE file: which any process read since the mount; see `_mincore_tells`). A
    shared read-only mapping: no commit charge, nothing faulted in."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    libc.mmap.argtypes += [ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    vec = ctypes.create_string_buffer((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    try:
        if libc.mincore(addr, size, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
    finally:
        libc.munmap(addr, size)
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
                pages = _runs(_resident(fd, st.st_size))
                if not told:  # once: the image's other files beside these are worth a look
                    told = True
                    names += _neighbours(root, list(present), points)
            else:
                pages = [(i, i + 1) for i in present.get(name, ())]
            runs = coalesce(pages, mmap.PAGESIZE)
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


def _write(dest: str, ranges: Iterable[WarmRange]) -> None:
    """Whole or not at all (`imagefacts.keep`; what a writer killed midway leaves is a
    `.tmp-*` that `rankwire cache clean` removes), in a directory of our own (not a link,
    not another user's); then only the `KEPT` lists used last stay there (an image or
    program used once leaves no list for ever)."""
    from rankwire.runtime.imagefacts import keep

    parent = os.path.dirname(dest)
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
        st = os.lstat(parent)
    except OSError:
        return
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        return
    keep(dest, "".join([f"{MAGIC}\n", *(f"{o} {n} {name}\n" for o, n, name in ranges)]))
    with contextlib.suppress(OSError):
        lists = []
        for entry in os.scandir(parent):
            if _NAME.fullmatch(entry.name):
                with contextlib.suppress(OSError):
                    lists.append((entry.stat(follow_symlinks=False).st_mtime, entry.path))
        for _, path in sorted(lists, reverse=True)[KEPT:]:
            with contextlib.suppress(OSError):
                os.unlink(path)


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
