"""Loop devices: attach a range of an open file to a free one (root only).

The holder's "loop" image driver (root mode): the SIF's squashfs partition becomes
/dev/loopN, read-only and auto-clearing (the kernel detaches it when its last user, the
squashfs mount, goes), so nothing is left to clean up when the mount namespace dies.
`LOOP_CONFIGURE` (Linux 5.8) does it in one call; older kernels get `LOOP_SET_FD` +
`LOOP_SET_STATUS64`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

LOOP_CONTROL = "/dev/loop-control"

LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82

LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_NAME_SIZE = 64

# struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit (u64);
# lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags (u32); lo_file_name,
# lo_crypt_name (64 bytes), lo_encrypt_key (32 bytes); lo_init[2] (u64).
LOOP_INFO64 = struct.Struct("=5Q4I64s64s32s2Q")
# struct loop_config: fd, block_size (u32); info; __reserved[8] (u64).
LOOP_CONFIG = struct.Struct(f"=2I{LOOP_INFO64.size}s64x")
assert LOOP_INFO64.size == 232 and LOOP_CONFIG.size == 304

# Another process may take the device LOOP_CTL_GET_FREE named before we bind it.
ATTEMPTS = 16


def loop_info64(offset: int, sizelimit: int, flags: int, name: str = "") -> bytes:
    """A packed `struct loop_info64` (`name`: lo_file_name, cut to 63 bytes)."""
    file_name = os.fsencode(name)[: LO_NAME_SIZE - 1]
    return LOOP_INFO64.pack(0, 0, 0, offset, sizelimit, 0, 0, 0, flags, file_name, b"", b"", 0, 0)


def loop_config(fd: int, info: bytes) -> bytes:
    """A packed `struct loop_config` for `LOOP_CONFIGURE` (block size: the default)."""
    return LOOP_CONFIG.pack(fd, 0, info)


def free_device(control: str = LOOP_CONTROL) -> int:
    """The number N of a free /dev/loopN (the kernel creates one if none is free)."""
    ctl = os.open(control, os.O_RDWR | os.O_CLOEXEC)
    try:
        return int(fcntl.ioctl(ctl, LOOP_CTL_GET_FREE))
    finally:
        os.close(ctl)


def _bind(loop_fd: int, backing_fd: int, info: bytes) -> None:
    """Bind `backing_fd` to the open loop device with `info` (offset, size, flags)."""
    try:
        fcntl.ioctl(loop_fd, LOOP_CONFIGURE, loop_config(backing_fd, info))
        return
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTTY):
            raise
    # Before Linux 5.8. A read-only `backing_fd` makes the device read-only (the flag
    # cannot be set by LOOP_SET_STATUS64); AUTOCLEAR can.
    fcntl.ioctl(loop_fd, LOOP_SET_FD, backing_fd)
    try:
        fcntl.ioctl(loop_fd, LOOP_SET_STATUS64, info)
    except OSError:
        fcntl.ioctl(loop_fd, LOOP_CLR_FD, 0)
        raise


def attach(
    backing_fd: int,
    *,
    offset: int,
    sizelimit: int,
    readonly: bool = True,
    autoclear: bool = True,
    name: str = "",
) -> tuple[str, int]:
    """Attach bytes [offset, offset + sizelimit) of `backing_fd` (sizelimit 0: to the
    end) to a free loop device; return its path and an open descriptor of it.

    With `autoclear`, the device detaches itself when its last opener goes: keep the
    descriptor open until something else (a mount) holds the device, then close it.
    """
    flags = (LO_FLAGS_READ_ONLY if readonly else 0) | (LO_FLAGS_AUTOCLEAR if autoclear else 0)
    info = loop_info64(offset, sizelimit, flags, name)
    mode = os.O_RDONLY if readonly else os.O_RDWR
    for _ in range(ATTEMPTS):
        path = f"/dev/loop{free_device()}"
        loop_fd = os.open(path, mode | os.O_CLOEXEC)
        try:
            _bind(loop_fd, backing_fd, info)
        except OSError as err:
            os.close(loop_fd)
            if err.errno == errno.EBUSY:
                continue  # taken between LOOP_CTL_GET_FREE and our bind: ask again
            code = err.errno or errno.EIO
            raise OSError(code, f"attaching {path}: {os.strerror(code)}") from None
        return path, loop_fd
    raise OSError(errno.EBUSY, f"no free loop device after {ATTEMPTS} attempts")
