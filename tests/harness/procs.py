"""Small /proc readers the harness shares."""

from __future__ import annotations

import contextlib
import os
import signal
import time
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


def parents() -> dict[int, int]:
    """pid → ppid of every process."""
    found = {}
    for proc in Path("/proc").iterdir():
        info = _stat(proc.name) if proc.name.isdigit() else None
        if info is not None:
            found[int(proc.name)] = info[1]
    return found


def _alive(pid: int) -> bool:
    """`pid` runs (is not gone, nor a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _session(pid: int) -> Optional[int]:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return None


def tree(pid: int) -> set[int]:
    """`pid`, its descendants (those that started sessions of their own too), and every
    process of the session `pid` leads (those reparented to init too)."""
    ppid = parents()
    found = {pid} | {p for p in ppid if _session(p) == pid}
    grew = True
    while grew:
        more = {child for child, parent in ppid.items() if parent in found} - found
        found |= more
        grew = bool(more)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL `tree(pid)` until nothing of it is left: stopped first, so that none of
    them forks a process the snapshot misses."""
    for _ in range(20):
        pids = {p for p in tree(pid) if p != os.getpid() and _alive(p)}
        if not pids:
            return
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for p in pids:
                with contextlib.suppress(OSError):
                    os.kill(p, sig)
        time.sleep(0.05)


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
