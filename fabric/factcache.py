"""Host facts kept in the user's cache dir while the files they came from stay the same.

Reading some host facts is dear (the host MPI's library closure; the host libfabric, whose
loading alone takes 0.2-0.3 s on Debian: its PSM library's constructor sleeps), and every
task of an srun step would pay it. A `FactCache` keeps one JSON file per key (what the
facts depend on besides files: the environment, the boot; and `FORMAT`) holding the facts
and the identity (device, inode, size, mtime, ctime) of every file and directory they
were read from; any difference, and the caller reads the facts again. Written as
every cache file is (`runtime/imagefacts.keep`: whole or not at all).

The facts decide what is bound into containers, so only our own files are believed: the
entry and its dir must belong to us and be writable by us alone (a cache dir shared
with other users, or one root finds in a user's home, is neither read nor written). An
entry that cannot be read or decoded is a miss; facts whose files changed while they
were read are not kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import time
from collections.abc import Iterable
from typing import Any, Callable, Optional, TypeVar

from rankwire.runtime.imagefacts import keep

T = TypeVar("T")

# Part of every key: raise it when what a kind's facts hold, or how they are read, changes
# (entries of an older rankwire then miss instead of being believed).
FORMAT = 2  # 2: the host libfabric's facts hold the dirs its search looked in
# A file changed less than this before the facts were read may have changed while they
# were (coarse file system clocks): facts read then are not kept.
SETTLE_NS = 2_000_000_000


def _stat(path: str) -> Optional[list[int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _ours(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


class FactCache:
    """`cache_dir/kind/DIGEST.json`, DIGEST naming `key`; `watched`: the paths every
    entry depends on, to which `load` and `store` add the facts' own (`paths_of`).
    Create it before reading the facts: `store` keeps nothing read from a file that
    changed since (or just before)."""

    def __init__(self, cache_dir: str, kind: str, key: Any, watched: Iterable[str]) -> None:
        digest = hashlib.sha256(json.dumps([FORMAT, kind, key]).encode()).hexdigest()[:32]
        self.dir = os.path.join(cache_dir, kind)
        self.name = f"{digest}.json"
        self.watched = list(watched)
        self.started = time.time_ns()

    def _identity(self, paths: Iterable[str]) -> dict[str, Any]:
        return {p: _stat(p) for p in dict.fromkeys([*self.watched, *paths])}

    def load(
        self, decode: Callable[[dict[str, Any]], T], paths_of: Callable[[T], Iterable[str]]
    ) -> Optional[T]:
        try:
            fd = os.open(
                os.path.join(self.dir, self.name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
            )
        except OSError:
            return None
        try:
            if not (_ours(os.fstat(fd)) and _ours(os.stat(self.dir))):
                return None
            with os.fdopen(fd, closefd=False) as f:
                doc = json.load(f)
            found = decode(doc["facts"])
            return found if doc["identity"] == self._identity(paths_of(found)) else None
        except Exception:  # any entry that does not decode is a miss
            return None
        finally:
            os.close(fd)

    def store(self, facts: Any, paths: Iterable[str]) -> None:
        identity = self._identity(paths)
        if any(s is not None and s[4] >= self.started - SETTLE_NS for s in identity.values()):
            return  # changed while (or just before) they were read
        doc = {"facts": dataclasses.asdict(facts), "identity": identity}
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            st = os.lstat(self.dir)
        except OSError:  # no cache: the next run reads the facts again
            return
        if stat.S_ISDIR(st.st_mode) and _ours(st):
            keep(os.path.join(self.dir, self.name), json.dumps(doc))
