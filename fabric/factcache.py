"""Host facts kept in the user's cache dir while the files they came from stay the same.

Reading some host facts is dear (the host MPI's library closure; the host libfabric, whose
loading alone takes 0.2-0.3 s on Debian: its PSM library's constructor sleeps), and every
task of an srun step would pay it. A `FactCache` keeps one JSON file per key (what the
facts depend on besides files: the environment, the boot) holding the facts and the
identity (device, inode, size, mtime, ctime) of every file and directory they were read
from; any difference, or an unreadable file, and the caller reads the facts again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any, Callable, Optional, TypeVar

T = TypeVar("T")


def _stat(path: str) -> Optional[list[int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class FactCache:
    """`cache_dir/kind/DIGEST.json`, DIGEST naming `key`; `watched`: the paths every
    entry depends on, to which `load` and `store` add the facts' own (`paths_of`)."""

    def __init__(self, cache_dir: str, kind: str, key: Any, watched: Iterable[str]) -> None:
        digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]
        self.path = os.path.join(cache_dir, kind, f"{digest}.json")
        self.watched = list(watched)

    def _identity(self, paths: Iterable[str]) -> dict[str, Any]:
        return {p: _stat(p) for p in dict.fromkeys([*self.watched, *paths])}

    def load(
        self, decode: Callable[[dict[str, Any]], T], paths_of: Callable[[T], Iterable[str]]
    ) -> Optional[T]:
        try:
            with open(self.path) as f:
                doc = json.load(f)
            found = decode(doc["facts"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return found if doc["identity"] == self._identity(paths_of(found)) else None

    def store(self, facts: Any, paths: Iterable[str]) -> None:
        doc = {"facts": dataclasses.asdict(facts), "identity": self._identity(paths)}
        tmp = f"{self.path}.{os.getpid()}"
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            with open(tmp, "w") as f:
                json.dump(doc, f)
            os.rename(tmp, self.path)
        except OSError:  # no cache: the next run reads the facts again
            with contextlib.suppress(OSError):
                os.unlink(tmp)
