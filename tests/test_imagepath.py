"""Symlinks inside an image never resolve to a path outside it."""

from __future__ import annotations

from rankwire.runtime.imagepath import resolve_in_image

LINKS = {
    "/etc/alt": "/opt/etc",  # absolute: restarts at the image root
    "/bin": "usr/bin",  # relative
    "/escape": "../../../../host",  # `..` cannot climb above the root
    "/loop": "/loop",
    "/a": "b",
    "/b": "a",
}


def readlink(path: str) -> str | None:
    return LINKS.get(path)


def test_links_resolve_inside_the_image() -> None:
    assert resolve_in_image("/etc/alt/x", readlink) == "/opt/etc/x"
    assert resolve_in_image("/bin/sh", readlink) == "/usr/bin/sh"
    assert resolve_in_image("/escape/etc/passwd", readlink) == "/host/etc/passwd"
    assert resolve_in_image("/../../etc", readlink) == "/etc"
    assert resolve_in_image("/", readlink) == "/"
    assert resolve_in_image("/new/dir", readlink) == "/new/dir"  # missing parts are kept


def test_link_loops_end() -> None:
    assert resolve_in_image("/loop/x", readlink) is None
    assert resolve_in_image("/a", readlink) is None
