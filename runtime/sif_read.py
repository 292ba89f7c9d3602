"""Reading a SIF file: `SifImage` validates the header and descriptor table on open.

Every object is checked to lie inside the file and clear of the header, the table and
the other objects before any of its bytes are handed out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Iterator, Optional

from rankwire.runtime.sif_format import (
    CHUNK_SIZE,
    DESCRIPTOR,
    FSTYPE_LABELS,
    HEADER,
    MAGIC,
    MAX_DESCRIPTORS,
    VERSION,
    DataType,
    Descriptor,
    FsType,
    Header,
    PartType,
    PathLike,
    SifError,
    arch_name,
    shown,
    unpack_descriptor,
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
        # The stored bytes, for the digests (sif_digest) and in-place edits (sif_write).
        self.file = file
        self.raw_header = raw_header
        self.raw_table = raw_table
        # object ID -> (descriptor slot, raw 585 bytes)
        self.raw_descriptors: dict[int, tuple[int, bytes]] = {}
        self.descriptors: tuple[Descriptor, ...] = _parse_descriptors(
            path, header, raw_table, file_size, self.raw_descriptors
        )

    @classmethod
    def open(cls, path: PathLike, *, writable: bool = False) -> SifImage:
        p = Path(path)
        try:
            f = open(p, "r+b" if writable else "rb")  # noqa: SIM115 (owned by the result)
        except OSError as err:
            what = "open for writing" if writable else "open"
            raise SifError(f"{shown(p)}: cannot {what}: {err.strerror}; check the path") from None
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
            raise SifError(f"{shown(path)}: cannot read: {err.strerror}") from None
        header = _parse_header(path, raw_header, size)
        try:
            raw_table = _pread_exact(f, header.descriptors_offset, header.descriptors_size)
        except OSError as err:
            raise SifError(f"{shown(path)}: cannot read descriptors: {err.strerror}") from None
        if raw_table is None:
            raise SifError(f"{shown(path)}: descriptor table shrank while reading; retry")
        return cls(path, f, size, raw_header, header, raw_table)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> SifImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def raw_metadata(self) -> bytes:
        """The header and the used descriptors exactly as stored (for identity hashes)."""
        return self.raw_header + b"".join(raw for _, raw in self.raw_descriptors.values())

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
            f"{shown(self.path)}: no object with ID {object_id} (IDs present: {ids}); "
            "see `rankwire sif list`"
        )

    def primary_partition(self) -> Descriptor:
        """The primary system partition; SifError unless there is exactly one, in squashfs."""
        prims = [
            d
            for d in self.descriptors
            if d.datatype == DataType.PARTITION and d.part_type == PartType.PRIMSYS
        ]
        where = shown(self.path)
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
                f"{shown(self.path)}: object {desc.id} lies outside the file; "
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
                chunk = os.pread(self.file.fileno(), min(left, CHUNK_SIZE), pos)
            except OSError as err:
                raise SifError(
                    f"{shown(self.path)}: cannot read object {desc.id}: {err.strerror}"
                ) from None
            if not chunk:
                raise SifError(
                    f"{shown(self.path)}: object {desc.id} was cut short (file shrank); "
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
    where = shown(path)
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
    where = shown(path)
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
        found = version.rstrip(b"\0").decode("ascii", "backslashreplace")
        raise SifError(
            f"{where}: unsupported SIF version {found!r} (rankwire reads '01'); "
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
        id_bytes=ident,
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
    where = shown(path)
    corrupt = "the image is corrupt or truncated, rebuild or re-download it"
    table_start = header.descriptors_offset
    table_end = table_start + header.descriptors_size
    out = []
    for slot in range(header.descriptors_total):
        raw = table[slot * DESCRIPTOR.size : (slot + 1) * DESCRIPTOR.size]
        if raw[4] == 0:
            continue
        d = unpack_descriptor(raw)
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
