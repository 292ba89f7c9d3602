"""Integrity digests: what `apptainer sign` signs (see apptainer/sif pkg/integrity)."""

from __future__ import annotations

import os
import struct
from typing import Protocol

from rankwire.runtime.sif_format import Descriptor, SifError, shown
from rankwire.runtime.sif_read import SifImage

_CHUNK = 1 << 20


class _Hash(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


def _hasher(algorithm: str) -> _Hash:
    import hashlib  # not at import: OpenSSL's loading, for importers that hash nothing

    try:
        return hashlib.new(algorithm)
    except ValueError:
        raise SifError(f"unknown digest algorithm {shown(algorithm)!r}; use sha256") from None


def header_digest(image: SifImage, algorithm: str = "sha256") -> str:
    """Digest of launch script, magic, version and image ID (not arch, times or counts)."""
    h = _hasher(algorithm)
    raw = image.raw_header
    h.update(raw[0:45])
    h.update(raw[48:64])
    return f"{algorithm}:{h.hexdigest()}"


def descriptor_digest(image: SifImage, desc: Descriptor, algorithm: str = "sha256") -> str:
    """Digest of a descriptor's signed fields; the ID is relative to its group's lowest ID."""
    raw = image.raw_descriptors[desc.id][1]
    group = raw[9:13]
    lowest = min(i for i, (_, r) in image.raw_descriptors.items() if r[9:13] == group)
    h = _hasher(algorithm)
    h.update(raw[0:5])  # data type, used
    h.update(struct.pack("<I", desc.id - lowest))
    h.update(raw[13:17])  # linked ID
    h.update(raw[25:33])  # size
    h.update(raw[41:49])  # created at
    h.update(raw[57:73])  # uid, gid
    h.update(raw[73:585])  # name, extra
    return f"{algorithm}:{h.hexdigest()}"


def object_digest(image: SifImage, desc: Descriptor, algorithm: str = "sha256") -> str:
    """Digest of an object's data."""
    h = _hasher(algorithm)
    for chunk in image.iter_object(desc):
        h.update(chunk)
    return f"{algorithm}:{h.hexdigest()}"


def partition_digest(fd: int, offset: int, size: int, algorithm: str = "sha256") -> str:
    """Digest of the `size` bytes at `offset` of the open file `fd` (a partition's data,
    read in place: no copy of the SIF's other objects, one reused buffer)."""
    h = _hasher(algorithm)
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    done = 0
    while done < size:
        want = min(_CHUNK, size - done)
        got = os.preadv(fd, [view[:want]], offset + done)
        if got == 0:
            raise SifError(f"the partition ends {size - done} bytes early: the file is truncated")
        h.update(view[:got])
        done += got
    return f"{algorithm}:{h.hexdigest()}"
