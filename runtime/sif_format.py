"""SIF (Singularity Image Format, spec "01"): byte layout, codes and the parsed records.

Byte layout and object placement follow github.com/apptainer/sif (v2.20+): a 128-byte
header, a table of 585-byte descriptors at offset 4096, then the data objects, partitions
aligned to 4096. Everything is packed little-endian. Reading is in `sif_read`, writing in
`sif_write`, the signing digests in `sif_digest`.
"""

from __future__ import annotations

import enum
import os
import struct
import sys
from typing import TYPE_CHECKING, Optional, Union

from rankwire.errors import UserError
from rankwire.record import record

if TYPE_CHECKING:
    import uuid

HEADER = struct.Struct("<32s10s3s3s16s8q")
DESCRIPTOR = struct.Struct("<iBIIIqqqqqqq128s384s")
_INT32 = struct.Struct("<i")

MAGIC = b"SIF_MAGIC\0"
VERSION = b"01\0"
GROUP_MASK = 0xF0000000
ZERO_TIME = -62135596800  # Go's time.Time{}.Unix(): what deterministic images store
DEFAULT_LAUNCH_SCRIPT = "#!/usr/bin/env run-singularity\n"
DEFAULT_CAPACITY = 48
DESCRIPTORS_OFFSET = 4096
PARTITION_ALIGNMENT = 4096
MAX_DESCRIPTORS = 1 << 16  # Apptainer writes 48; anything near this is a corrupt header
CHUNK_SIZE = 1 << 20  # largest piece of object data read or copied at once

PathLike = Union[str, "os.PathLike[str]"]


class SifError(UserError):
    """A SIF file is unreadable or malformed; the message names the file and the fix."""


def shown(value: object) -> str:
    """`value` as text that cannot break the one-line message rule."""
    return str(value).replace("\r", "\\r").replace("\n", "\\n")


class DataType(enum.IntEnum):
    DEFFILE = 0x4001
    ENV_VARS = 0x4002
    LABELS = 0x4003
    PARTITION = 0x4004
    SIGNATURE = 0x4005
    GENERIC_JSON = 0x4006
    GENERIC = 0x4007
    CRYPTO_MESSAGE = 0x4008
    SBOM = 0x4009
    OCI_ROOT_INDEX = 0x400A
    OCI_BLOB = 0x400B


class FsType(enum.IntEnum):
    SQUASHFS = 1
    EXT3 = 2
    IMMUTABLE_OBJECTS = 3
    RAW = 4
    ENCRYPTED_SQUASHFS = 5
    GOCRYPTFS_SQUASHFS = 6


class PartType(enum.IntEnum):
    SYSTEM = 1
    PRIMSYS = 2
    DATA = 3
    OVERLAY = 4


# The words `siftool list` / `siftool info` print for each code.
DATATYPE_LABELS: dict[int, str] = {
    DataType.DEFFILE: "Def.FILE",
    DataType.ENV_VARS: "Env.Vars",
    DataType.LABELS: "JSON.Labels",
    DataType.PARTITION: "FS",
    DataType.SIGNATURE: "Signature",
    DataType.GENERIC_JSON: "JSON.Generic",
    DataType.GENERIC: "Generic/Raw",
    DataType.CRYPTO_MESSAGE: "Cryptographic Message",
    DataType.SBOM: "SBOM",
    DataType.OCI_ROOT_INDEX: "OCI.RootIndex",
    DataType.OCI_BLOB: "OCI.Blob",
}
FSTYPE_LABELS: dict[int, str] = {
    FsType.SQUASHFS: "Squashfs",
    FsType.EXT3: "Ext3",
    FsType.IMMUTABLE_OBJECTS: "Archive",
    FsType.RAW: "Raw",
    FsType.ENCRYPTED_SQUASHFS: "Encrypted squashfs",
    FsType.GOCRYPTFS_SQUASHFS: "Gocryptfs squashfs",
}
PARTTYPE_LABELS: dict[int, str] = {
    PartType.SYSTEM: "System",
    PartType.PRIMSYS: "*System",
    PartType.DATA: "Data",
    PartType.OVERLAY: "Overlay",
}
_HASH_LABELS = {1: "SHA-256", 2: "SHA-384", 3: "SHA-512", 4: "BLAKE2s-256", 5: "BLAKE2b-256"}
_CRYPTO_FORMAT_LABELS = {1: "OpenPGP", 2: "PEM"}
_CRYPTO_MESSAGE_LABELS = {0x100: "Clear Signature", 0x200: "RSA-OAEP"}
_SBOM_LABELS = {
    1: "cyclonedx-json",
    2: "cyclonedx-xml",
    3: "github-json",
    4: "spdx-json",
    5: "spdx-rdf",
    6: "spdx-tag-value",
    7: "spdx-yaml",
    8: "syft-json",
}

# Go architecture name -> the two-digit code SIF stores (header Arch, partition Extra).
ARCH_CODES = {
    "386": "01",
    "amd64": "02",
    "arm": "03",
    "arm64": "04",
    "ppc64": "05",
    "ppc64le": "06",
    "mips": "07",
    "mipsle": "08",
    "mips64": "09",
    "mips64le": "10",
    "s390x": "11",
    "riscv64": "12",
    "loong64": "13",
}
_ARCH_NAMES = {code: name for name, code in ARCH_CODES.items()}
_MACHINES = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "i386": "386",
    "i486": "386",
    "i586": "386",
    "i686": "386",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv6l": "arm",
    "armv7l": "arm",
    "armv8l": "arm",
    "ppc64": "ppc64",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "loongarch64": "loong64",
    "mips": "mips",
    "mips64": "mips64",
}


def goarch_from_machine(machine: Optional[str] = None) -> str:
    """The Go/SIF architecture name for this machine's (`uname -m`), or `machine`'s."""
    m = os.uname().machine if machine is None else machine
    name = _MACHINES.get(m.lower())
    if name is None:
        raise SifError(
            f"machine type {shown(m)!r} has no SIF architecture code; "
            f"known: {', '.join(sorted(_MACHINES))}"
        )
    if name in ("mips", "mips64") and sys.byteorder == "little":
        name += "le"
    return name


def arch_code(goarch: str) -> bytes:
    """The 3-byte field (two digits and a NUL) for a Go architecture name."""
    code = ARCH_CODES.get(goarch)
    if code is None:
        raise SifError(
            f"architecture {shown(goarch)!r} has no SIF code; use one of: {', '.join(ARCH_CODES)}"
        )
    return code.encode() + b"\0"


def arch_name(field: bytes) -> str:
    """The Go architecture name for a 3-byte arch field; "unknown" when unrecognised."""
    return _ARCH_NAMES.get(field.rstrip(b"\0").decode("ascii", "replace"), "unknown")


def _enum_or_int(cls: type[enum.IntEnum], value: int) -> int:
    try:
        return cls(value)
    except ValueError:
        return value


@record
class Header:
    """The global header; times are Unix seconds (ZERO_TIME in deterministic images)."""

    launch_script: str
    magic: str
    version: str
    arch: str  # Go architecture name of the primary partition, "unknown" if none
    id_bytes: bytes  # the image's UUID: `id`
    created_at: int
    modified_at: int
    descriptors_free: int
    descriptors_total: int
    descriptors_offset: int
    descriptors_size: int
    data_offset: int
    data_size: int

    @property
    def id(self) -> uuid.UUID:
        import uuid  # not at import: it imports `platform`, for every reader of an image

        return uuid.UUID(bytes=self.id_bytes)

    @property
    def deterministic(self) -> bool:
        return (
            self.id_bytes == bytes(16)
            and self.created_at == ZERO_TIME
            and self.modified_at == ZERO_TIME
        )


@record
class Descriptor:
    """One used descriptor. `group_id` is the plain group number (0: no group).

    `linked_id` is the plain linked object ID, or a group number when `linked_group`.
    `datatype` is a DataType unless the image uses a code this module does not know.
    """

    datatype: int
    id: int
    group_id: int
    linked_id: int
    offset: int
    size: int
    size_with_padding: int
    created_at: int
    modified_at: int
    name: str
    extra: bytes
    linked_group: bool = False

    def _int32(self, at: int) -> int:
        value: int = _INT32.unpack_from(self.extra, at)[0]
        return value

    @property
    def fs_type(self) -> Optional[int]:
        """FsType of a partition (a plain int when unknown), None for other objects."""
        if self.datatype != DataType.PARTITION:
            return None
        return _enum_or_int(FsType, self._int32(0))

    @property
    def part_type(self) -> Optional[int]:
        """PartType of a partition (a plain int when unknown), None for other objects."""
        if self.datatype != DataType.PARTITION:
            return None
        return _enum_or_int(PartType, self._int32(4))

    @property
    def arch(self) -> Optional[str]:
        """Go architecture name of a partition ("unknown" if unrecognised), else None."""
        if self.datatype != DataType.PARTITION:
            return None
        return arch_name(self.extra[8:11])

    @property
    def type_label(self) -> str:
        """The TYPE column of `siftool list`, e.g. "FS (Squashfs/*System/amd64)"."""
        label = DATATYPE_LABELS.get(self.datatype, "Unknown")
        if self.datatype == DataType.PARTITION:
            fs = FSTYPE_LABELS.get(self.fs_type or 0, "Unknown")
            part = PARTTYPE_LABELS.get(self.part_type or 0, "Unknown")
            return f"{label} ({fs}/{part}/{self.arch})"
        if self.datatype == DataType.SIGNATURE:
            return f"{label} ({_HASH_LABELS.get(self._int32(0), 'unknown hash')})"
        if self.datatype == DataType.CRYPTO_MESSAGE:
            fmt = _CRYPTO_FORMAT_LABELS.get(self._int32(0), "Unknown")
            msg = _CRYPTO_MESSAGE_LABELS.get(self._int32(4), "Unknown")
            return f"{label} ({fmt}/{msg})"
        if self.datatype == DataType.SBOM:
            return f"{label} ({_SBOM_LABELS.get(self._int32(0), 'unknown')})"
        return label


def unpack_descriptor(raw: bytes) -> Descriptor:
    """The record for one 585-byte descriptor (used or not; the caller checks `raw[4]`)."""
    (dtype, _used, oid, group, link, offset, size, swp, ctime, mtime, _uid, _gid, name, extra) = (
        DESCRIPTOR.unpack(raw)
    )
    return Descriptor(
        datatype=_enum_or_int(DataType, dtype),
        id=oid,
        group_id=group & ~GROUP_MASK,
        linked_id=link & ~GROUP_MASK,
        offset=offset,
        size=size,
        size_with_padding=swp,
        created_at=ctime,
        modified_at=mtime,
        name=name.rstrip(b"\0").decode("utf-8", "replace"),
        extra=extra,
        linked_group=(link & GROUP_MASK) == GROUP_MASK,
    )
