"""Small /proc readers the harness shares."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def _stat(pid: int | str) -> Optional[tuple[str, int]]:
    """(comm, ppid) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm, rest = text.split(" (", 1)[1].rsplit(")", 1)
    return comm, int(rest.split()[1])


def ancestors() -> set[int]:
    """This process and every process above it."""
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        info = _stat(pid)
        if info is None:
            break
        pid = info[1]
    return pids


def child_of(pid: int, comm: str = "") -> int:
    """A child of `pid` (named `comm`, if given)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            info = _stat(proc.name)
            if info and info[1] == pid and (not comm or info[0] == comm):
                return int(proc.name)
    raise AssertionError(f"process {pid} has no child {comm}")


def asleep(pid: int) -> bool:
    """`pid` sleeps in nanosleep: past exec and the dynamic loader, so the pages it needs
    from the image are in (a loader cut off from a dead FUSE mount gets SIGBUS)."""
    try:
        return "nanosleep" in Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return False
