"""Thin ctypes wrappers for the Linux calls Python 3.9 lacks (unshare, setns, mount, ...)."""

from __future__ import annotations

import ctypes
import os
from typing import Optional

# The C library Python itself is linked against (ctypes.util.find_library forks ldconfig).
_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000

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


def pivot_root(new_root: str, put_old: str) -> None:
    import platform

    nr = _SYS_PIVOT_ROOT.get(platform.machine())
    if nr is None:
        raise OSError(0, f"pivot_root: unsupported architecture {platform.machine()}")
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


def bind_remount(target: str, *, readonly: bool) -> None:
    """Remount a bind mount nosuid (and ro if asked), keeping the flags it already has."""
    kept = os.statvfs(target).f_flag & _KEEP_FLAGS
    flags = MS_REMOUNT | MS_BIND | MS_NOSUID | kept  # ST_* and MS_* bits coincide
    if readonly:
        flags |= MS_RDONLY
    mount(None, target, None, flags)


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
