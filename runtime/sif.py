"""SIF (Singularity Image Format, spec "01") reader and writer.

Byte layout and object placement follow github.com/apptainer/sif (v2.20+): a 128-byte
header, a table of 585-byte descriptors at offset 4096, then the data objects, partitions
aligned to 4096. Everything is packed little-endian.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import os
import platform
import secrets
import struct
import sys
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional, Sequence, Union

from rankwire.errors import UserError

HEADER = struct.Struct("<32s10s3s3s16s8q")
DESCRIPTOR = struct.Struct("<iBIIIqqqqqqq128s384s")
_PARTITION_EXTRA = struct.Struct("<ii3s")
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
_CHUNK = 1 << 20

PathLike = Union[str, "os.PathLike[str]"]


class SifError(UserError):
    """A SIF file is unreadable or malformed; the message names the file and the fix."""


def _shown(value: object) -> str:
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
    """The Go/SIF architecture name for `platform.machine()` (or `machine`)."""
    m = platform.machine() if machine is None else machine
    name = _MACHINES.get(m.lower())
    if name is None:
        raise SifError(
            f"machine type {_shown(m)!r} has no SIF architecture code; "
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
            f"architecture {_shown(goarch)!r} has no SIF code; use one of: {', '.join(ARCH_CODES)}"
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


@dataclasses.dataclass(frozen=True)
class Header:
    """The global header; times are Unix seconds (ZERO_TIME in deterministic images)."""

    launch_script: str
    magic: str
    version: str
    arch: str  # Go architecture name of the primary partition, "unknown" if none
    id: uuid.UUID
    created_at: int
    modified_at: int
    descriptors_free: int
    descriptors_total: int
    descriptors_offset: int
    descriptors_size: int
    data_offset: int
    data_size: int

    @property
    def deterministic(self) -> bool:
        return (
            self.id == uuid.UUID(int=0)
            and self.created_at == ZERO_TIME
            and self.modified_at == ZERO_TIME
        )


@dataclasses.dataclass(frozen=True)
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
        return _INT32.unpack_from(self.extra, at)[0]

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


def _descriptor_from_raw(raw: bytes) -> Descriptor:
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


class SifImage:
    """A validated, open SIF file. Use `SifImage.open(path)`, then `close()` (or `with`)."""

    def __init__(
        self,
        path: Path,
        file: BinaryIO,
        file_size: int,
        raw_header: bytes,
        header: Header,
        raw_table: bytes,
    ) -> None:
        self.path = path
        self.file_size = file_size
        self.header = header
        self._file = file
        self._raw_header = raw_header
        self._raw_table = raw_table
        # object ID -> (descriptor slot, raw 585 bytes); used by digests and edits
        self._raw: dict[int, tuple[int, bytes]] = {}
        self.descriptors: tuple[Descriptor, ...] = _parse_descriptors(
            path, header, raw_table, file_size, self._raw
        )

    @classmethod
    def open(cls, path: PathLike, *, writable: bool = False) -> SifImage:
        p = Path(path)
        try:
            f = open(p, "r+b" if writable else "rb")  # noqa: SIM115 (owned by the result)
        except OSError as err:
            what = "open for writing" if writable else "open"
            raise SifError(f"{_shown(p)}: cannot {what}: {err.strerror}; check the path") from None
        try:
            return cls._from_file(p, f)
        except BaseException:
            f.close()
            raise

    @classmethod
    def open_fd(cls, fd: int, name: PathLike) -> SifImage:
        """Read the SIF open on `fd` (a duplicate is kept); messages call it `name`."""
        f = os.fdopen(os.dup(fd), "rb")
        try:
            return cls._from_file(Path(name), f)
        except BaseException:
            f.close()
            raise

    @classmethod
    def _from_file(cls, path: Path, f: BinaryIO) -> SifImage:
        try:
            size = os.fstat(f.fileno()).st_size
            if size < HEADER.size:
                _check_short(path, os.pread(f.fileno(), size, 0), size)
            raw_header = os.pread(f.fileno(), HEADER.size, 0)
        except OSError as err:
            raise SifError(f"{_shown(path)}: cannot read: {err.strerror}") from None
        header = _parse_header(path, raw_header, size)
        try:
            raw_table = _pread_exact(f, header.descriptors_offset, header.descriptors_size)
        except OSError as err:
            raise SifError(f"{_shown(path)}: cannot read descriptors: {err.strerror}") from None
        if raw_table is None:
            raise SifError(f"{_shown(path)}: descriptor table shrank while reading; retry")
        return cls(path, f, size, raw_header, header, raw_table)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SifImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def raw_metadata(self) -> bytes:
        """The header and the used descriptors exactly as stored (for identity hashes)."""
        return self._raw_header + b"".join(raw for _, raw in self._raw.values())

    def find(self, datatype: int, name: Optional[str] = None) -> Optional[Descriptor]:
        """The first object of `datatype` (and `name`, if given), or None."""
        for d in self.descriptors:
            if d.datatype == datatype and (name is None or d.name == name):
                return d
        return None

    def get(self, object_id: int) -> Descriptor:
        for d in self.descriptors:
            if d.id == object_id:
                return d
        ids = ", ".join(str(d.id) for d in self.descriptors) or "none"
        raise SifError(
            f"{_shown(self.path)}: no object with ID {object_id} (IDs present: {ids}); "
            "see `rankwire sif list`"
        )

    def primary_partition(self) -> Descriptor:
        """The primary system partition; SifError unless there is exactly one, in squashfs."""
        prims = [
            d
            for d in self.descriptors
            if d.datatype == DataType.PARTITION and d.part_type == PartType.PRIMSYS
        ]
        where = _shown(self.path)
        if not prims:
            raise SifError(
                f"{where}: no primary system partition (FS */System), so there is no "
                "container to run; build one with `rankwire build`"
            )
        if len(prims) > 1:
            ids = ", ".join(str(d.id) for d in prims)
            raise SifError(
                f"{where}: {len(prims)} primary partitions (IDs {ids}); keep one "
                "(`siftool setprim` / `siftool del`)"
            )
        part = prims[0]
        fs = FSTYPE_LABELS.get(part.fs_type or 0, f"unknown type {part.fs_type}")
        if part.fs_type in (FsType.ENCRYPTED_SQUASHFS, FsType.GOCRYPTFS_SQUASHFS):
            raise SifError(
                f"{where}: the primary partition is {fs} (an encrypted image), which rankwire "
                "does not support; rebuild the image without encryption"
            )
        if part.fs_type != FsType.SQUASHFS:
            raise SifError(
                f"{where}: the primary partition is {fs}, not Squashfs, which rankwire does "
                "not support; rebuild the image as squashfs (`rankwire build`)"
            )
        return part

    def _check_bounds(self, desc: Descriptor) -> None:
        end = desc.offset + desc.size
        if desc.offset < 0 or desc.size < 0 or (desc.size and end > self.file_size):
            raise SifError(
                f"{_shown(self.path)}: object {desc.id} lies outside the file; "
                "the image is corrupt, rebuild it"
            )

    def read(self, desc: Descriptor) -> bytes:
        """The `desc.size` bytes of an object (never more; SifError if the file shrank)."""
        return b"".join(self.iter_object(desc))

    def iter_object(self, desc: Descriptor) -> Iterator[bytes]:
        """An object's bytes in chunks of at most 1 MiB (for partitions)."""
        self._check_bounds(desc)
        pos, left = desc.offset, desc.size
        while left:
            try:
                chunk = os.pread(self._file.fileno(), min(left, _CHUNK), pos)
            except OSError as err:
                raise SifError(
                    f"{_shown(self.path)}: cannot read object {desc.id}: {err.strerror}"
                ) from None
            if not chunk:
                raise SifError(
                    f"{_shown(self.path)}: object {desc.id} was cut short (file shrank); "
                    "the image is being rewritten or truncated"
                )
            yield chunk
            pos += len(chunk)
            left -= len(chunk)


def _pread_exact(f: BinaryIO, offset: int, size: int) -> Optional[bytes]:
    parts = []
    got = 0
    while got < size:
        chunk = os.pread(f.fileno(), min(size - got, 1 << 30), offset + got)
        if not chunk:
            return None
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _check_short(path: Path, raw: bytes, size: int) -> None:
    """Raise for a file shorter than a header: truncated SIF, or not a SIF at all."""
    where = _shown(path)
    if size >= 42 and raw[32:42] == MAGIC:
        raise SifError(
            f"{where}: truncated SIF header ({size} of {HEADER.size} bytes); "
            "the file is incomplete, copy or rebuild it"
        )
    raise SifError(
        f"{where}: not a SIF image (only {size} bytes); "
        "build one with `rankwire build` or `apptainer build`"
    )


def _parse_header(path: Path, raw: bytes, file_size: int) -> Header:
    where = _shown(path)
    if len(raw) < HEADER.size:
        _check_short(path, raw, len(raw))
    (launch, magic, version, arch, ident, ctime, mtime, free, total, doff, dsize, daoff, dasize) = (
        HEADER.unpack(raw)
    )
    if magic != MAGIC:
        raise SifError(
            f"{where}: not a SIF image (no SIF_MAGIC at byte 32); "
            "build one with `rankwire build` or `apptainer build`"
        )
    if version != VERSION:
        shown = version.rstrip(b"\0").decode("ascii", "backslashreplace")
        raise SifError(
            f"{where}: unsupported SIF version {shown!r} (rankwire reads '01'); "
            "rebuild the image with a current Apptainer or `rankwire build`"
        )
    corrupt = "the image is corrupt or truncated, rebuild or re-download it"
    if not 0 <= total <= MAX_DESCRIPTORS:
        raise SifError(
            f"{where}: absurd descriptor count {total} (limit {MAX_DESCRIPTORS}); {corrupt}"
        )
    if not 0 <= free <= total:
        raise SifError(f"{where}: {free} free descriptors of {total}; {corrupt}")
    if dsize != total * DESCRIPTOR.size:
        raise SifError(
            f"{where}: descriptor table size {dsize} is not {total} x {DESCRIPTOR.size}; {corrupt}"
        )
    if doff < HEADER.size or doff + dsize > file_size:
        raise SifError(
            f"{where}: descriptor table (offset {doff}, {dsize} bytes) lies outside the "
            f"file ({file_size} bytes); {corrupt}"
        )
    # The data section may end past EOF: an empty last object's alignment gap is counted
    # in DataSize but never written. Each object is checked against the file instead.
    if daoff < 0 or dasize < 0:
        raise SifError(
            f"{where}: negative data section (offset {daoff}, {dasize} bytes); {corrupt}"
        )
    return Header(
        launch_script=launch.rstrip(b"\0").decode("utf-8", "replace"),
        magic=magic.rstrip(b"\0").decode("ascii"),
        version=version.rstrip(b"\0").decode("ascii"),
        arch=arch_name(arch),
        id=uuid.UUID(bytes=ident),
        created_at=ctime,
        modified_at=mtime,
        descriptors_free=free,
        descriptors_total=total,
        descriptors_offset=doff,
        descriptors_size=dsize,
        data_offset=daoff,
        data_size=dasize,
    )


def _parse_descriptors(
    path: Path, header: Header, table: bytes, file_size: int, raws: dict[int, tuple[int, bytes]]
) -> tuple[Descriptor, ...]:
    where = _shown(path)
    corrupt = "the image is corrupt or truncated, rebuild or re-download it"
    table_start = header.descriptors_offset
    table_end = table_start + header.descriptors_size
    out = []
    for slot in range(header.descriptors_total):
        raw = table[slot * DESCRIPTOR.size : (slot + 1) * DESCRIPTOR.size]
        if raw[4] == 0:
            continue
        d = _descriptor_from_raw(raw)
        what = f"{where}: object {d.id} (descriptor slot {slot})"
        if d.id == 0:
            raise SifError(f"{what} has ID 0, which SIF never assigns; {corrupt}")
        if d.id in raws:
            raise SifError(f"{what} reuses the ID of another object; {corrupt}")
        if d.offset < 0 or d.size < 0 or d.size_with_padding < 0:
            raise SifError(
                f"{what} has a negative offset or size "
                f"(offset {d.offset}, size {d.size}, padded {d.size_with_padding}); {corrupt}"
            )
        end = d.offset + d.size
        # An empty object may sit in the unwritten alignment gap at the end of the file.
        limit = file_size if d.size else max(file_size, header.data_offset + header.data_size)
        if end > limit:
            raise SifError(
                f"{what} (offset {d.offset}, {d.size} bytes) runs past the end of the file "
                f"({file_size} bytes); {corrupt}"
            )
        if d.size and (d.offset < HEADER.size or (d.offset < table_end and end > table_start)):
            raise SifError(
                f"{what} (offset {d.offset}, {d.size} bytes) overlaps the header or the "
                f"descriptor table; {corrupt}"
            )
        raws[d.id] = (slot, raw)
        out.append(d)
    spans = sorted((d.offset, d.offset + d.size, d.id) for d in out if d.size)
    for (_, end_a, id_a), (start_b, _, id_b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise SifError(f"{where}: objects {id_a} and {id_b} overlap; {corrupt}")
    return tuple(out)


# ---------------------------------------------------------------------------------------
# Writing


@dataclasses.dataclass(frozen=True)
class ObjectInput:
    """A data object to write: exactly one of `data` (bytes) or `path` (streamed).

    `group_id` 0 means no group. `linked_id` is an object ID, or a group number when
    `linked_group`. `alignment` defaults to 4096 for partitions and 1 otherwise.
    Partitions need `fs_type`, `part_type` and `arch` (a Go name such as "amd64");
    other types may carry raw descriptor metadata in `extra` (at most 384 bytes).
    OCI root index / blob objects get their "sha256:<hex>" digest as `extra`
    automatically.
    """

    datatype: int
    data: Optional[bytes] = None
    path: Optional[PathLike] = None
    name: str = ""
    group_id: int = 1
    linked_id: int = 0
    linked_group: bool = False
    alignment: Optional[int] = None
    fs_type: Optional[int] = None
    part_type: Optional[int] = None
    arch: Optional[str] = None
    extra: bytes = b""

    def __post_init__(self) -> None:
        if (self.data is None) == (self.path is None):
            raise ValueError("ObjectInput needs exactly one of data= or path=")
        is_part = self.datatype == DataType.PARTITION
        part_fields = (self.fs_type, self.part_type, self.arch)
        if is_part and None in part_fields:
            raise ValueError("a partition needs fs_type, part_type and arch")
        if not is_part and part_fields != (None, None, None):
            raise ValueError("fs_type, part_type and arch are only for partitions")
        if is_part and self.extra:
            raise ValueError("a partition's extra is built from fs_type, part_type and arch")


def _name_bytes(obj: ObjectInput) -> bytes:
    name = obj.name.encode("utf-8")
    if len(name) > 128:
        raise SifError(
            f"object name {_shown(obj.name)!r} is {len(name)} bytes; SIF allows 128, shorten it"
        )
    return name


def _extra_bytes(obj: ObjectInput, digest: Optional[str]) -> bytes:
    if obj.datatype == DataType.PARTITION:
        return _PARTITION_EXTRA.pack(obj.fs_type, obj.part_type, arch_code(obj.arch or ""))
    if digest is not None and not obj.extra:
        return digest.encode("ascii")
    if len(obj.extra) > 384:
        raise SifError(f"object extra metadata is {len(obj.extra)} bytes; SIF allows 384")
    return obj.extra


def _stored_group(obj: ObjectInput) -> tuple[int, int]:
    if not 0 <= obj.group_id < GROUP_MASK:
        raise SifError(f"group ID {obj.group_id} out of range (0 to {GROUP_MASK - 1})")
    if not 0 <= obj.linked_id < GROUP_MASK:
        raise SifError(f"linked ID {obj.linked_id} out of range (0 to {GROUP_MASK - 1})")
    if obj.linked_group and obj.linked_id == 0:
        raise SifError("a group link needs a group number other than 0")
    link = obj.linked_id | GROUP_MASK if obj.linked_group else obj.linked_id
    return obj.group_id | GROUP_MASK, link


def _aligned(offset: int, alignment: int) -> int:
    if alignment <= 1 or offset % alignment == 0:
        return offset
    return offset + alignment - offset % alignment


def _write_object(f: BinaryIO, start: int, obj: ObjectInput) -> tuple[int, int, Optional[str]]:
    """Write `obj` at the first aligned offset >= start: (offset, size, OCI digest)."""
    align = obj.alignment
    if align is None:
        align = PARTITION_ALIGNMENT if obj.datatype == DataType.PARTITION else 1
    offset = _aligned(start, align)
    hasher = (
        hashlib.sha256() if obj.datatype in (DataType.OCI_ROOT_INDEX, DataType.OCI_BLOB) else None
    )
    f.seek(offset)
    if obj.data is not None:
        f.write(obj.data)
        size = len(obj.data)
        if hasher:
            hasher.update(obj.data)
    else:
        size = 0
        try:
            src = open(obj.path or "", "rb")  # noqa: SIM115 (closed just below)
        except OSError as err:
            raise SifError(
                f"{_shown(obj.path)}: cannot read object data: {err.strerror}; check the path"
            ) from None
        with src:
            while True:
                chunk = src.read(_CHUNK)
                if not chunk:
                    break
                f.write(chunk)
                size += len(chunk)
                if hasher:
                    hasher.update(chunk)
    return offset, size, (f"sha256:{hasher.hexdigest()}" if hasher else None)


def _pack_descriptor(
    obj: ObjectInput,
    object_id: int,
    offset: int,
    size: int,
    swp: int,
    t: int,
    digest: Optional[str],
) -> bytes:
    group, link = _stored_group(obj)
    return DESCRIPTOR.pack(
        int(obj.datatype),
        1,
        object_id,
        group,
        link,
        offset,
        size,
        swp,
        t,
        t,
        0,
        0,
        _name_bytes(obj),
        _extra_bytes(obj, digest),
    )


def _check_inputs(objects: Sequence[ObjectInput]) -> None:
    """Validate what can be checked before writing anything."""
    for obj in objects:
        _name_bytes(obj)
        _stored_group(obj)
        _extra_bytes(obj, None)
    prims = [o for o in objects if _is_primsys(o)]
    if len(prims) > 1:
        raise SifError("more than one primary system partition; mark the others System")


def _is_primsys(obj: ObjectInput) -> bool:
    return obj.datatype == DataType.PARTITION and obj.part_type == PartType.PRIMSYS


def create_sif(
    path: PathLike,
    objects: Sequence[ObjectInput],
    *,
    deterministic: bool = False,
    launch_script: str = DEFAULT_LAUNCH_SCRIPT,
    capacity: int = DEFAULT_CAPACITY,
) -> None:
    """Write a new SIF at `path` atomically (temp file in the same directory, then rename).

    Objects get IDs 1..n in order and are laid out as apptainer/sif's CreateContainer does.
    Deterministic images have a nil UUID and Go's zero time; others a random UUID and now.
    """
    out = Path(path)
    launch = launch_script.encode("utf-8")
    if len(launch) >= 32:
        raise SifError(f"launch script is {len(launch)} bytes; SIF allows at most 31")
    if not 0 < capacity <= MAX_DESCRIPTORS:
        raise SifError(f"descriptor capacity {capacity} out of range (1 to {MAX_DESCRIPTORS})")
    if len(objects) > capacity:
        raise SifError(f"{len(objects)} objects do not fit in {capacity} descriptors")
    _check_inputs(objects)
    t = ZERO_TIME if deterministic else int(time.time())
    ident = uuid.UUID(int=0) if deterministic else uuid.uuid4()

    tmp = out.with_name(f".{out.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o755)
    except OSError as err:
        raise SifError(
            f"{_shown(out)}: cannot write: {err.strerror}; choose a writable directory"
        ) from None
    try:
        with os.fdopen(fd, "wb") as f:
            table = bytearray(capacity * DESCRIPTOR.size)
            data_offset = DESCRIPTORS_OFFSET + len(table)
            data_size = 0
            arch = b"00\0"
            for i, obj in enumerate(objects):
                start = data_offset + data_size
                offset, size, digest = _write_object(f, start, obj)
                swp = offset - start + size
                table[i * DESCRIPTOR.size : (i + 1) * DESCRIPTOR.size] = _pack_descriptor(
                    obj, i + 1, offset, size, swp, t, digest
                )
                data_size += swp
                if _is_primsys(obj):
                    arch = arch_code(obj.arch or "")
            f.seek(DESCRIPTORS_OFFSET)
            f.write(table)
            f.seek(0)
            f.write(
                HEADER.pack(
                    launch,
                    MAGIC,
                    VERSION,
                    arch,
                    ident.bytes,
                    t,
                    t,
                    capacity - len(objects),
                    capacity,
                    DESCRIPTORS_OFFSET,
                    len(table),
                    data_offset,
                    data_size,
                )
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as err:
        _unlink_quietly(tmp)
        raise SifError(f"{_shown(out)}: cannot write: {err.strerror}") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _rewrite_metadata(
    img: SifImage,
    table: bytearray,
    *,
    free: int,
    data_size: int,
    modified_at: int,
    arch: Optional[bytes] = None,
) -> None:
    """Write back the descriptor table and the header with the changed fields."""
    header = bytearray(img._raw_header)
    struct.pack_into("<q", header, 72, modified_at)
    struct.pack_into("<q", header, 80, free)
    struct.pack_into("<q", header, 120, data_size)
    if arch is not None:
        header[45:48] = arch
    fd = img._file.fileno()
    os.pwrite(fd, bytes(table), img.header.descriptors_offset)
    os.pwrite(fd, bytes(header), 0)
    os.fsync(fd)


def add_object(path: PathLike, obj: ObjectInput) -> int:
    """Append an object to an existing SIF in place, as `siftool add` does; returns its ID.

    The object takes the first free descriptor slot (ID = slot + 1) and goes after the
    last used object. Deterministic images stay deterministic (times stay zero time).
    """
    _check_inputs([obj])
    with SifImage.open(path, writable=True) as img:
        where = _shown(img.path)
        h = img.header
        table = bytearray(img._raw_table)
        used = {slot for slot, _ in img._raw.values()}
        slot = next((i for i in range(h.descriptors_total) if i not in used), None)
        if slot is None:
            raise SifError(
                f"{where}: all {h.descriptors_total} descriptor slots are used; "
                "delete an object or create a new image"
            )
        if _is_primsys(obj) and any(d.part_type == PartType.PRIMSYS for d in img.descriptors):
            raise SifError(
                f"{where}: already has a primary system partition; add this one as System"
            )
        t = ZERO_TIME if h.deterministic else int(time.time())
        start = max([h.data_offset] + [d.offset + d.size for d in img.descriptors])
        try:
            offset, size, digest = _write_object(img._file, start, obj)
            img._file.flush()
            at = slot * DESCRIPTOR.size
            table[at : at + DESCRIPTOR.size] = _pack_descriptor(
                obj, slot + 1, offset, size, offset - start + size, t, digest
            )
            _rewrite_metadata(
                img,
                table,
                free=h.descriptors_free - 1,
                data_size=offset + size - h.data_offset,
                modified_at=t,
                arch=arch_code(obj.arch or "") if _is_primsys(obj) else None,
            )
        except OSError as err:
            raise SifError(f"{where}: cannot write: {err.strerror}") from None
        return slot + 1


def delete_object(path: PathLike, object_id: int) -> None:
    """Remove an object's descriptor in place, as `siftool del` does (data stays in place)."""
    with SifImage.open(path, writable=True) as img:
        desc = img.get(object_id)
        h = img.header
        table = bytearray(img._raw_table)
        at = img._raw[desc.id][0] * DESCRIPTOR.size
        table[at : at + DESCRIPTOR.size] = bytes(DESCRIPTOR.size)
        try:
            _rewrite_metadata(
                img,
                table,
                free=h.descriptors_free + 1,
                data_size=h.data_size,
                modified_at=ZERO_TIME if h.deterministic else int(time.time()),
                arch=b"00\0" if desc.part_type == PartType.PRIMSYS else None,
            )
        except OSError as err:
            raise SifError(f"{_shown(img.path)}: cannot write: {err.strerror}") from None


# ---------------------------------------------------------------------------------------
# Integrity digests (what `apptainer sign` signs, see apptainer/sif pkg/integrity)


def _hasher(algorithm: str) -> Any:
    try:
        return hashlib.new(algorithm)
    except ValueError:
        raise SifError(f"unknown digest algorithm {_shown(algorithm)!r}; use sha256") from None


def header_digest(image: SifImage, algorithm: str = "sha256") -> str:
    """Digest of launch script, magic, version and image ID (not arch, times or counts)."""
    h = _hasher(algorithm)
    raw = image._raw_header
    h.update(raw[0:45])
    h.update(raw[48:64])
    return f"{algorithm}:{h.hexdigest()}"


def descriptor_digest(image: SifImage, desc: Descriptor, algorithm: str = "sha256") -> str:
    """Digest of a descriptor's signed fields; the ID is relative to its group's lowest ID."""
    raw = image._raw[desc.id][1]
    group = raw[9:13]
    lowest = min(i for i, (_, r) in image._raw.items() if r[9:13] == group)
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
