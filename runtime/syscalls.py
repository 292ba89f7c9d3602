"""Thin ctypes wrappers for the Linux calls Python 3.9 lacks (unshare, setns, mount, ...)."""

from __future__ import annotations

import ctypes
import errno
import os
import re
from typing import Optional

# The C library Python itself is linked against (ctypes.util.find_library forks ldconfig).
_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MNT_DETACH = 2

PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_SET_NO_NEW_PRIVS = 38
PR_SET_PDEATHSIG = 1

# statvfs f_flag bits that a bind remount must keep (they may be locked in a userns).
_KEEP_FLAGS = (
    os.ST_RDONLY
    | os.ST_NOSUID
    | os.ST_NODEV
    | os.ST_NOEXEC
    | os.ST_NOATIME
    | os.ST_NODIRATIME
    | os.ST_RELATIME
)

_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "riscv64": 41, "s390x": 217}


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def mount(
    source: Optional[str],
    target: str,
    fstype: Optional[str],
    flags: int = 0,
    data: Optional[str] = None,
) -> None:
    def enc(s: Optional[str]) -> Optional[bytes]:
        return None if s is None else os.fsencode(s)

    ret = _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))
    _check(ret, f"mount {source or fstype} on {target}")


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(os.fsencode(target), ctypes.c_int(flags)), f"umount {target}")


# This machine, read once.
MACHINE = os.uname().machine


def pivot_root(new_root: str, put_old: str) -> None:
    nr = _SYS_PIVOT_ROOT.get(MACHINE)
    if nr is None:
        raise OSError(0, f"pivot_root: unsupported architecture {MACHINE}")
    ret = _libc.syscall(ctypes.c_long(nr), os.fsencode(new_root), os.fsencode(put_old))
    _check(ret, "pivot_root")


def prctl(option: int, arg2: int) -> None:
    _check(
        _libc.prctl(
            ctypes.c_int(option),
            ctypes.c_ulong(arg2),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
        ),
        "prctl",
    )


def set_comm(name: str) -> None:
    """The process name `ps` and /proc/PID/comm show (15 bytes at most)."""
    _check(_libc.prctl(ctypes.c_int(PR_SET_NAME), name.encode()[:15], 0, 0, 0), "prctl")


def bind_remount(target: str, *, readonly: bool, nodev: bool = False) -> None:
    """Remount a bind mount nosuid (and ro, nodev if asked), keeping the flags it already
    has."""
    kept = os.statvfs(target).f_flag & _KEEP_FLAGS
    flags = MS_REMOUNT | MS_BIND | MS_NOSUID | kept  # ST_* and MS_* bits coincide
    if readonly:
        flags |= MS_RDONLY
    if nodev:
        flags |= MS_NODEV
    mount(None, target, None, flags)


AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
_SYS_MOUNT_SETATTR = 442  # the same number on every architecture (Linux 5.12)


class _MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


def mount_setattr(target: str, attr_set: int, *, recursive: bool) -> None:
    """Set MOUNT_ATTR_* bits on the mount at `target` (and every mount below it if
    `recursive`), leaving the other bits as they are."""
    attr = _MountAttr(attr_set, 0, 0, 0)
    ret = _libc.syscall(
        ctypes.c_long(_SYS_MOUNT_SETATTR),
        ctypes.c_int(AT_FDCWD),
        os.fsencode(target),
        ctypes.c_uint(AT_RECURSIVE if recursive else 0),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(ret, f"mount_setattr {target}")


OPEN_TREE_CLONE = 0x1
AT_EMPTY_PATH = 0x1000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
# The same numbers on every architecture (Linux 5.2).
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429


def open_tree_clone(fd: int, *, recursive: bool) -> int:
    """A detached copy of the mount (and, if `recursive`, the mounts below it) at the
    open descriptor `fd`, as a close-on-exec descriptor. It can be attached with
    `move_mount` in another mount namespace, where a bind from `fd` itself is refused."""
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    ret = _libc.syscall(ctypes.c_long(_SYS_OPEN_TREE), ctypes.c_int(fd), b"", ctypes.c_uint(flags))
    return _check(ret, "open_tree")


def move_mount(tree_fd: int, target: str) -> None:
    """Attach the detached mount tree `tree_fd` (from `open_tree_clone`) at `target`."""
    ret = _libc.syscall(
        ctypes.c_long(_SYS_MOVE_MOUNT),
        ctypes.c_int(tree_fd),
        b"",
        ctypes.c_int(AT_FDCWD),
        os.fsencode(target),
        ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
    )
    _check(ret, f"move_mount on {target}")


def mount_field(field: str) -> str:
    """A /proc/self/mountinfo path field (space, tab, newline, backslash are \\ooo)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_below(target: str) -> list[str]:
    """Mount points at or below `target` (from /proc/self/mountinfo), parents first."""
    prefix = target.rstrip("/") + "/"
    with open("/proc/self/mountinfo", errors="surrogateescape") as f:
        points = {mount_field(line.split()[4]) for line in f}
    return sorted((p for p in points if p == target or p.startswith(prefix)), key=len)


def restrict_mounts(target: str, *, nodev: bool, readonly: bool, recursive: bool) -> None:
    """Make the mount at `target` nosuid (nodev, ro if asked) and, if `recursive`, every
    mount below it; flags already set are kept. Before Linux 5.12 (no mount_setattr),
    each mount point is remounted in turn."""
    attrs = (
        MOUNT_ATTR_NOSUID
        | (MOUNT_ATTR_NODEV if nodev else 0)
        | (MOUNT_ATTR_RDONLY if readonly else 0)
    )
    try:
        mount_setattr(target, attrs, recursive=recursive)
        return
    except OSError as err:
        if err.errno != errno.ENOSYS:
            raise
    for point in mounts_below(target) if recursive else [target]:
        bind_remount(point, readonly=readonly, nodev=nodev)


CAP_DAC_OVERRIDE = 1
CAP_SYS_ADMIN = 21
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
_CAP_V3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def raise_ambient(caps: tuple[int, ...]) -> None:
    """Make `caps` (held in our user namespace) survive exec into the helpers we start.

    A uid-mapped (not root-mapped) namespace member loses all capabilities on execve;
    FUSE helpers need CAP_SYS_ADMIN there to mount without fusermount. Only the holder
    does this; processes that join the container get no capabilities.
    """
    header = _CapHeader(_CAP_V3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(header), data), "capget")
    for cap in caps:
        data[cap // 32].inheritable |= 1 << (cap % 32)
    _check(_libc.capset(ctypes.byref(header), data), "capset")
    for cap in caps:
        prctl_ambient = _libc.prctl(
            ctypes.c_int(PR_CAP_AMBIENT),
            ctypes.c_ulong(PR_CAP_AMBIENT_RAISE),
            ctypes.c_ulong(cap),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
        )
        _check(prctl_ambient, "prctl(PR_CAP_AMBIENT_RAISE)")
