"""Directories whose lock says their owner lives (the lock goes with the process, even
by SIGKILL): made by `claim`, removed by `prune` once their owner is gone.

Used for the PMIx helpers' temp dirs (`pmi/pmix/server.py`) and the extract cache's
partial unpackings (`runtime/holder.py`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from typing import Callable

_UNNAMED = ".new-"


def claim(parent: str, prefix: str) -> tuple[str, int]:
    """A new dir `parent/prefix…` and the descriptor that holds its lock. Made under
    another name and locked before it takes one `prune` looks at, so a concurrent prune
    never takes it. Where locks are unsupported (some NFS) it is never pruned."""
    made = tempfile.mkdtemp(prefix=_UNNAMED + prefix, dir=parent)
    lock = os.open(made, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        fcntl.flock(lock, fcntl.LOCK_EX)
    named = os.path.join(parent, os.path.basename(made)[len(_UNNAMED) :])
    os.rename(made, named)
    return named, lock


def prune(parent: str, prefix: str, remove: Callable[[str], None]) -> None:
    """`remove` each of our dirs `parent/prefix…` whose lock is free (its owner is gone)."""
    for entry in os.listdir(parent):
        if not entry.startswith(prefix):
            continue
        path = os.path.join(parent, entry)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if os.fstat(fd).st_uid != os.getuid():
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its owner lives (or locks are unsupported)
        finally:
            os.close(fd)
        remove(path)
