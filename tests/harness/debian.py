"""Debian 12 for image-build tests, from the cache `tools/debian-cache` made (`make test`
runs it first): the tests never leave 127.0.0.0/8.

- `cached()`: the cache (a minbase rootfs tarball from mmdebstrap, a flat apt repository
  of libmpich-dev, gcc, libc6-dev and their closure over it), or None when it is not made.
- `debian_layout`: that rootfs as a one-layer OCI image, made by umoci (as the other OCI
  images of the tests are; `push_layout` then copies it into a registry with skopeo).
- `serving`: the flat repository over HTTP on 127.0.0.1 (a server thread of the test
  process: it cannot outlive the tests), with the paths it was asked for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.server
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional
from urllib.parse import unquote

from harness.oci import OciLayout, umoci_image

CACHE_DIR = Path(os.environ.get("RANKWIRE_DEBIAN_CACHE") or "/var/cache/rankwire-tests/debian12")
CACHE_VERSION = 1  # tools/debian-cache VERSION
TAG = "12"


@dataclasses.dataclass(frozen=True)
class DebianCache:
    root: Path
    rootfs_tar: Path  # mmdebstrap --variant=minbase bookworm
    repo: Path  # flat apt repository: *.deb, Packages, Release
    packages: tuple[str, ...]  # what the repo was made for (their closure is in it)
    debs: tuple[str, ...]  # the .deb file names in it


def cached(root: Path = CACHE_DIR) -> Optional[DebianCache]:
    """The cache under `root` if tools/debian-cache finished making it (its stamp)."""
    try:
        stamp: dict[str, Any] = json.loads((root / "stamp").read_text())
    except (OSError, ValueError):
        return None
    if stamp.get("version") != CACHE_VERSION:
        return None
    return DebianCache(
        root=root,
        rootfs_tar=root / "rootfs.tar",
        repo=root / "repo",
        packages=tuple(stamp["packages"]),
        debs=tuple(stamp["debs"]),
    )


def _unpack_rootfs(tar: Path, rootfs: Path) -> None:
    """The tarball's files into umoci's bundle rootfs; not its /dev nodes (an image
    has an empty /dev, as Docker's debian:12 has)."""
    subprocess.run(
        ["tar", "-x", "-f", str(tar), "-C", str(rootfs), "--numeric-owner", "--exclude=./dev/*"],
        check=True,
        capture_output=True,
    )


def debian_layout(workdir: Path, cache: DebianCache) -> OciLayout:
    """The cached minbase rootfs as OCI image `TAG` (one layer) in `workdir/oci`."""
    return umoci_image(
        workdir,
        TAG,
        [functools.partial(_unpack_rootfs, cache.rootfs_tar)],
        ["--config.env=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
    )


@dataclasses.dataclass
class AptRepo:
    url: str  # http://127.0.0.1:PORT/
    requests: list[str]  # paths of the GETs answered, in order

    @property
    def sources_line(self) -> str:
        """The sources.list line of the flat repository (unsigned: trusted=yes)."""
        return f"deb [trusted=yes] {self.url} ./"

    def debs_fetched(self) -> list[str]:
        return [unquote(p.rsplit("/", 1)[-1]) for p in self.requests if p.endswith(".deb")]


class _Handler(http.server.SimpleHTTPRequestHandler):
    seen: list[str]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.seen.append(self.path)
        super().do_GET()


@contextlib.contextmanager
def serving(directory: Path, host: str = "127.0.0.1") -> Iterator[AptRepo]:
    """`directory` over HTTP on a free port of `host` until the block ends."""
    seen: list[str] = []
    handler = type("Handler", (_Handler,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(
        (host, 0), functools.partial(handler, directory=str(directory))
    )
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="apt-repo", daemon=True)
    thread.start()
    try:
        yield AptRepo(f"http://{host}:{server.server_address[1]}/", seen)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
