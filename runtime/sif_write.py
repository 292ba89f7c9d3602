"""Writing SIF files: `create_sif` writes a new image, `add_object` / `delete_object`
edit one in place as `siftool add` / `siftool del` do.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import struct
import time
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Sequence

from rankwire.record import record
from rankwire.runtime.sif_format import (
    CHUNK_SIZE,
    DEFAULT_CAPACITY,
    DEFAULT_LAUNCH_SCRIPT,
    DESCRIPTOR,
    DESCRIPTORS_OFFSET,
    GROUP_MASK,
    HEADER,
    MAGIC,
    MAX_DESCRIPTORS,
    PARTITION_ALIGNMENT,
    VERSION,
    ZERO_TIME,
    DataType,
    PartType,
    PathLike,
    SifError,
    arch_code,
    shown,
)
from rankwire.runtime.sif_read import SifImage

_PARTITION_EXTRA = struct.Struct("<ii3s")


@record
class ObjectInput:
    """A data object to write: exactly one of `data` (bytes), `path` (streamed) or
    `writer`: a function that writes the object itself into the new SIF (its temp file's
    path) at the offset given and returns the object's size; the last object only (it runs
    first, so it may clobber what precedes its offset: mksquashfs -offset does).

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
    writer: Optional[Callable[[Path, int], int]] = None

    def __post_init__(self) -> None:
        if [self.data, self.path, self.writer].count(None) != 2:
            raise ValueError("ObjectInput needs exactly one of data=, path= or writer=")
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
            f"object name {shown(obj.name)!r} is {len(name)} bytes; SIF allows 128, shorten it"
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


def _offset(start: int, obj: ObjectInput) -> int:
    """Where `obj` goes: the first offset >= start aligned as it asks."""
    align = obj.alignment
    if align is None:
        align = PARTITION_ALIGNMENT if obj.datatype == DataType.PARTITION else 1
    return _aligned(start, align)


def _size(obj: ObjectInput) -> int:
    """The size of a `data=` or `path=` object, before it is written."""
    if obj.data is not None:
        return len(obj.data)
    try:
        return os.stat(obj.path or "").st_size
    except OSError as err:
        raise SifError(
            f"{shown(obj.path)}: cannot read object data: {err.strerror}; check the path"
        ) from None


def _write_object(f: BinaryIO, start: int, obj: ObjectInput) -> tuple[int, int, Optional[str]]:
    """Write `obj` at the first aligned offset >= start: (offset, size, OCI digest)."""
    offset = _offset(start, obj)
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
                f"{shown(obj.path)}: cannot read object data: {err.strerror}; check the path"
            ) from None
        with src:
            while True:
                chunk = src.read(CHUNK_SIZE)
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
    packed: bytes = DESCRIPTOR.pack(
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
    return packed


def _check_inputs(objects: Sequence[ObjectInput]) -> None:
    """Validate what can be checked before writing anything."""
    for obj in objects:
        _name_bytes(obj)
        _stored_group(obj)
        _extra_bytes(obj, None)
    if any(o.writer is not None for o in objects[:-1]):
        raise SifError("only the last object may be written by a writer=")
    prims = [o for o in objects if _is_primsys(o)]
    if len(prims) > 1:
        raise SifError("more than one primary system partition; mark the others System")


def _is_primsys(obj: ObjectInput) -> bool:
    return bool(obj.datatype == DataType.PARTITION and obj.part_type == PartType.PRIMSYS)


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
            f"{shown(out)}: cannot write: {err.strerror}; choose a writable directory"
        ) from None
    try:
        with os.fdopen(fd, "wb") as f:
            _write_image(f, tmp, objects, launch, capacity, t, ident)
        os.replace(tmp, out)
    except OSError as err:
        _unlink_quietly(tmp)
        raise SifError(f"{shown(out)}: cannot write: {err.strerror}") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _write_image(
    f: BinaryIO,
    where: Path,
    objects: Sequence[ObjectInput],
    launch: bytes,
    capacity: int,
    t: int,
    ident: uuid.UUID,
) -> None:
    """Lay out `objects` after a table of `capacity` descriptors, then write table and header.
    A last object with a writer is written first, where the others' sizes put it."""
    table = bytearray(capacity * DESCRIPTOR.size)
    data_offset = DESCRIPTORS_OFFSET + len(table)
    written: Optional[tuple[int, int]] = None
    if objects and objects[-1].writer is not None:
        end = data_offset
        for obj in objects[:-1]:
            end = _offset(end, obj) + _size(obj)
        offset = _offset(end, objects[-1])
        written = offset, objects[-1].writer(where, offset)
    data_size = 0
    arch = b"00\0"
    for i, obj in enumerate(objects):
        start = data_offset + data_size
        if obj.writer is not None and written is not None:
            if _offset(start, obj) != written[0]:  # an object before it changed size
                raise SifError(f"{shown(where)}: an object changed while the image was written")
            offset, size, digest = *written, None
        else:
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
    header = bytearray(img.raw_header)
    struct.pack_into("<q", header, 72, modified_at)
    struct.pack_into("<q", header, 80, free)
    struct.pack_into("<q", header, 120, data_size)
    if arch is not None:
        header[45:48] = arch
    fd = img.file.fileno()
    os.pwrite(fd, bytes(table), img.header.descriptors_offset)
    os.pwrite(fd, bytes(header), 0)
    os.fsync(fd)


def add_object(path: PathLike, obj: ObjectInput, *, replace: Sequence[int] = ()) -> int:
    """Append an object to an existing SIF in place, as `siftool add` does; returns its ID.

    The object takes the first free descriptor slot (ID = slot + 1) and goes after the
    last used object. Deterministic images stay deterministic (times stay zero time).
    The objects `replace` names are deleted in the same table write (their data stays,
    as with `delete_object`), so a reader sees either the old objects or the new one.
    """
    _check_inputs([obj])
    with SifImage.open(path, writable=True) as img:
        where = shown(img.path)
        h = img.header
        table = bytearray(img.raw_table)
        for old in {img.get(i).id for i in replace}:
            at = img.raw_descriptors[old][0] * DESCRIPTOR.size
            table[at : at + DESCRIPTOR.size] = bytes(DESCRIPTOR.size)
        used = {slot for i, (slot, _) in img.raw_descriptors.items() if i not in replace}
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
            offset, size, digest = _write_object(img.file, start, obj)
            img.file.flush()
            os.fsync(img.file.fileno())  # the data is on disk before a descriptor points at it
            at = slot * DESCRIPTOR.size
            table[at : at + DESCRIPTOR.size] = _pack_descriptor(
                obj, slot + 1, offset, size, offset - start + size, t, digest
            )
            _rewrite_metadata(
                img,
                table,
                free=h.descriptors_free - 1 + len(set(replace)),
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
        table = bytearray(img.raw_table)
        at = img.raw_descriptors[desc.id][0] * DESCRIPTOR.size
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
            raise SifError(f"{shown(img.path)}: cannot write: {err.strerror}") from None
