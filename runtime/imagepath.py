"""Paths inside an image, resolved as the image sees them."""

from __future__ import annotations

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
