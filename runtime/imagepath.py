"""Paths inside an image, resolved as the image sees them."""

from __future__ import annotations

import os
from typing import Callable, Optional

MAX_SYMLINKS = 40


def resolve_in_image(path: str, readlink: Callable[[str], Optional[str]]) -> Optional[str]:
    """`path` with every symlink followed inside the image: absolute link targets restart
    at the image root and `..` never climbs above it, so nothing leads out. `readlink(p)`
    gives the target of image path `p`, or None when `p` is not a symlink. Components that
    do not exist are kept. None after too many links."""
    parts = [p for p in path.split("/") if p and p != "."]
    done: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        target = readlink("/" + "/".join([*done, part]))
        if target is None:
            done.append(part)
            continue
        hops += 1
        if hops > MAX_SYMLINKS:
            return None
        if target.startswith("/"):
            done = []
        parts = [p for p in target.split("/") if p and p != "."] + parts
    return "/" + "/".join(done)


def host_path(root: str, path: str) -> Optional[str]:
    """The host path of image path `path` in the image tree at `root` (a mount or a
    sandbox), its symlinks followed inside the image; None after too many links."""

    def readlink(p: str) -> Optional[str]:
        full = root + p
        return os.readlink(full) if os.path.islink(full) else None

    resolved = resolve_in_image(path, readlink)
    if resolved is None:
        return None
    return root + resolved if resolved != "/" else root
