"""Closing a process's inherited descriptors, for every child we fork that must hold
none of its parent's (the holder, the PMI bridges, the PMIx helper, `--save`'s remover)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable


def close_fds_except(keep: Iterable[int]) -> None:
    """Close every descriptor from 3 up but `keep`: those /proc/self/fd lists (without
    /proc, each gap up to the open-files limit, at least 2^20). Not `closerange` alone:
    without the close_range system call (kernels before 5.9) it closes every number up
    to its bound, a million calls where a launcher raised its limit."""
    kept = set(keep)
    try:
        opened = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        low = 3
        for fd in sorted(n for n in kept if n >= 3):
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, max(os.sysconf("SC_OPEN_MAX"), 1 << 20))
        return
    for fd in opened:
        if fd >= 3 and fd not in kept:
            with contextlib.suppress(OSError):  # the listing's own, closed already
                os.close(fd)
