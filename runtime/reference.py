"""Image references: `docker://[REGISTRY/]REPO[:TAG|@sha256:…]` and `oras://REGISTRY/REPO…`.

Pure: a string in, a frozen `Reference` or a `UserError` out. Docker's conventions
apply: a first component with a dot or a colon, or `localhost`, is a registry; otherwise
the image is on Docker Hub, and a one-component repository there is under `library/`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

from rankwire.errors import UserError, shown
from rankwire.record import record

TRANSPORTS = ("docker://", "oras://")
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*\Z")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
_HOST = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?\Z")


def is_remote(image: str) -> bool:
    return image.startswith(TRANSPORTS)


@record
class Reference:
    transport: str  # "docker" | "oras"
    registry: str  # host[:port] as written (docker.io for Docker Hub)
    repository: str
    tag: Optional[str]  # None when only a digest was given
    digest: Optional[str]  # "sha256:<hex>" when pinned

    @property
    def api_host(self) -> str:
        """Where the registry API answers (Docker Hub's differs from its name)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def reference(self) -> str:
        """What the manifest URL names: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def pinned(self, digest: str) -> Reference:
        return dataclasses.replace(self, digest=digest)

    def __str__(self) -> str:
        text = f"{self.transport}://{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def _bad(text: str, why: str) -> UserError:
    return UserError(
        f"image reference {shown(text)}: {why}; write docker://[REGISTRY/]REPO[:TAG|@sha256:HEX]"
        " or oras://REGISTRY/REPO[:TAG|@sha256:HEX]"
    )


def parse_reference(text: str) -> Reference:
    transport = next((t for t in TRANSPORTS if text.startswith(t)), None)
    if transport is None:
        raise _bad(text, "not a docker:// or oras:// reference")
    rest = text[len(transport) :]
    digest = None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST.match(digest):
            raise _bad(text, f"digest {shown(digest)} is not sha256: and 64 lowercase hex digits")
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.match(tag):
            raise _bad(text, f"tag {shown(tag)} is not a valid tag")
    parts = rest.split("/")
    first = parts[0]
    if len(parts) > 1 and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, parts[1:]
        if not _HOST.match(registry):
            raise _bad(text, f"registry {shown(registry)} is not a host[:port]")
    elif transport == "oras://":
        raise _bad(text, "an oras:// reference names its registry")
    else:
        registry, path = DOCKER_HUB, parts
        if len(path) == 1:
            path = ["library", *path]
    for component in path:
        if not _COMPONENT.match(component):
            raise _bad(text, f"repository part {shown(component)} is not lowercase a-z, 0-9, . _ -")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(transport[:-3], registry, "/".join(path), tag, digest)


@record
class Access:
    """How to reach a registry: the choices a user makes on the command line."""

    insecure: bool = False  # plain HTTP (loopback tests, a registry on the cluster's network)
    ca_cert: Optional[str] = None  # a CA bundle instead of the system's
    username: Optional[str] = None
    password: Optional[str] = None
    timeout: float = 60.0  # seconds without progress before a request fails
