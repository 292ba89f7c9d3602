"""SIF reader/writer against the reference tool (Debian's siftool), plus malformed input."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
import tracemalloc
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rankwire.runtime.sif_digest import descriptor_digest, header_digest, object_digest
from rankwire.runtime.sif_format import (
    ARCH_CODES,
    DESCRIPTOR,
    HEADER,
    ZERO_TIME,
    DataType,
    FsType,
    PartType,
    SifError,
    arch_code,
    arch_name,
    goarch_from_machine,
)
from rankwire.runtime.sif_read import SifImage
from rankwire.runtime.sif_write import ObjectInput, add_object, create_sif, delete_object

pytestmark = pytest.mark.skipif(shutil.which("siftool") is None, reason="needs siftool")

FINGERPRINT = "433FE984155206BD962725E20E8713472A879943"
PRIMSYS_AMD64 = ("--partfs", "1", "--parttype", "2", "--partarch", "2")
DATA_ARM64 = ("--partfs", "4", "--parttype", "3", "--partarch", "4")
SIGNATURE_FLAGS = ("--signhash", "1", "--signentity", FINGERPRINT)


def siftool(*args: str) -> str:
    return siftool_bytes(*args).decode()


def siftool_bytes(*args: str) -> bytes:
    return subprocess.run(["siftool", *args], check=True, capture_output=True).stdout


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def masked(data: bytes) -> bytes:
    """Image bytes with the UUID and every timestamp zeroed (siftool always uses 'now')."""
    b = bytearray(data)
    b[48:80] = bytes(32)
    total, doff = struct.unpack_from("<q", b, 88)[0], struct.unpack_from("<q", b, 96)[0]
    for slot in range(total):
        at = doff + slot * DESCRIPTOR.size
        if b[at + 4]:
            b[at + 41 : at + 57] = bytes(16)
    return bytes(b)


def masked_text(out: str) -> str:
    drop = ("ID:", "Created At:", "Modified At:")
    return "\n".join(ln for ln in out.splitlines() if not ln.strip().startswith(drop))


@pytest.fixture()
def blobs(tmp_path: Path) -> dict[str, Path]:
    rnd = os.urandom
    return {
        "def": write(tmp_path / "recipe.def", b"Bootstrap: scratch\n"),
        "json": write(tmp_path / "meta.json", b'{"a": 1}'),
        "squash": write(tmp_path / "root.squashfs", rnd(5000)),
        "raw": write(tmp_path / "data.img", rnd(777)),
        "sig": write(tmp_path / "sig.bin", rnd(300)),
        "sbom": write(tmp_path / "sbom.json", b"{}"),
        "empty": write(tmp_path / "empty", b""),
    }


# (siftool add flags, the equivalent ObjectInput)
def object_table(b: dict[str, Path]) -> list[tuple[list[str], ObjectInput]]:
    sig_extra = struct.pack("<i", 1) + bytes.fromhex(FINGERPRINT)
    return [
        (
            [str(b["def"]), "--datatype", "1", "--groupid", "1"],
            ObjectInput(DataType.DEFFILE, path=b["def"]),
        ),
        (
            [str(b["json"]), "--datatype", "6", "--groupid", "1", "--filename", "meta.json"],
            ObjectInput(DataType.GENERIC_JSON, path=b["json"], name="meta.json"),
        ),
        (
            [str(b["squash"]), "--datatype", "4", "--groupid", "1", *PRIMSYS_AMD64],
            ObjectInput(
                DataType.PARTITION,
                path=b["squash"],
                fs_type=FsType.SQUASHFS,
                part_type=PartType.PRIMSYS,
                arch="amd64",
            ),
        ),
        (
            [str(b["raw"]), "--datatype", "4", "--groupid", "2", "--alignment", "512", *DATA_ARM64],
            ObjectInput(
                DataType.PARTITION,
                path=b["raw"],
                group_id=2,
                alignment=512,
                fs_type=FsType.RAW,
                part_type=PartType.DATA,
                arch="arm64",
            ),
        ),
        (
            [str(b["sig"]), "--datatype", "5", "--link", "3", *SIGNATURE_FLAGS],
            ObjectInput(
                DataType.SIGNATURE, path=b["sig"], group_id=0, linked_id=3, extra=sig_extra
            ),
        ),
        (
            [str(b["sbom"]), "--datatype", "9", "--groupid", "3", "--sbomformat", "spdx-json"],
            ObjectInput(DataType.SBOM, path=b["sbom"], group_id=3, extra=struct.pack("<i", 4)),
        ),
        (
            [str(b["empty"]), "--datatype", "7", "--alignment", "64"],
            ObjectInput(DataType.GENERIC, data=b"", group_id=0, alignment=64),
        ),
        (
            [str(b["json"]), "--datatype", "7", "--groupid", "2", "--filename", "ünïcode"],
            ObjectInput(DataType.GENERIC, path=b["json"], group_id=2, name="ünïcode"),
        ),
    ]


def siftool_image(path: Path, adds: list[list[str]]) -> Path:
    siftool("new", str(path))
    for flags in adds:
        siftool("add", str(path), *flags)
    return path


def assert_same_as_siftool(ours: Path, theirs: Path) -> None:
    assert masked(ours.read_bytes()) == masked(theirs.read_bytes())
    assert siftool("list", str(ours)) == siftool("list", str(theirs))
    assert masked_text(siftool("header", str(ours))) == masked_text(siftool("header", str(theirs)))
    with SifImage.open(theirs) as img:
        ids = [d.id for d in img.descriptors]
    for i in ids:
        a, b = siftool("info", str(i), str(ours)), siftool("info", str(i), str(theirs))
        assert masked_text(a) == masked_text(b)
        assert siftool_bytes("dump", str(i), str(ours)) == siftool_bytes(
            "dump", str(i), str(theirs)
        )


def test_reads_siftool_image(tmp_path: Path, blobs: dict[str, Path]) -> None:
    table = object_table(blobs)
    path = siftool_image(tmp_path / "t.sif", [flags for flags, _ in table])
    listing = siftool("list", str(path)).splitlines()[3:]
    with SifImage.open(path) as img:
        h = img.header
        assert (h.version, h.arch, h.descriptors_total) == ("01", "amd64", 48)
        assert h.descriptors_free == 48 - len(table)
        assert (h.descriptors_offset, h.data_offset) == (4096, 32176)
        assert h.launch_script == ""
        assert len(img.descriptors) == len(table) == len(listing)
        for d, (_, obj), row in zip(img.descriptors, table, listing):
            cols = [c.strip() for c in row.split("|")]
            assert cols[0] == str(d.id)
            assert cols[1] == (str(d.group_id) if d.group_id else "NONE")
            assert cols[2] == (str(d.linked_id) if d.linked_id else "NONE")
            assert cols[3] == f"{d.offset}-{d.offset + d.size}"
            assert cols[4] == d.type_label
            expected = obj.data if obj.data is not None else Path(obj.path).read_bytes()
            assert img.read(d) == expected
            assert b"".join(img.iter_object(d)) == expected
            assert (d.datatype, d.group_id, d.linked_id, d.name) == (
                obj.datatype,
                obj.group_id,
                obj.linked_id,
                obj.name,
            )
            info = siftool("info", str(d.id), str(path))
            assert any(ln.split() == ["Offset:", str(d.offset)] for ln in info.splitlines())
            if d.datatype == DataType.PARTITION:
                assert (d.fs_type, d.part_type, d.arch) == (obj.fs_type, obj.part_type, obj.arch)
            else:
                assert (d.fs_type, d.part_type, d.arch) == (None, None, None)
        prim = img.primary_partition()
        assert prim.id == 3 and prim.offset % 4096 == 0
        assert img.descriptors[3].offset % 512 == 0
        assert img.find(DataType.GENERIC, "ünïcode") == img.descriptors[7]
        assert img.find(DataType.OCI_BLOB) is None
        assert img.get(5).linked_id == 3


def test_create_sif_lists_like_siftool(tmp_path: Path, blobs: dict[str, Path]) -> None:
    table = object_table(blobs)
    theirs = siftool_image(tmp_path / "theirs.sif", [flags for flags, _ in table])
    ours = tmp_path / "ours.sif"
    create_sif(ours, [obj for _, obj in table], launch_script="")
    assert_same_as_siftool(ours, theirs)
    assert oct(ours.stat().st_mode & 0o777) == oct(theirs.stat().st_mode & 0o777)


def test_rankwire_sif_list_and_dump_match_siftool(tmp_path: Path, blobs: dict[str, Path]) -> None:
    from rankwire.cli import cli

    table = object_table(blobs)
    path = siftool_image(tmp_path / "t.sif", [flags for flags, _ in table])
    runner = CliRunner()
    listed = runner.invoke(cli, ["sif", "list", str(path)])
    assert listed.exit_code == 0, listed.output
    assert listed.output == siftool("list", str(path))
    dumped = runner.invoke(cli, ["sif", "dump", str(path), "3"])
    assert dumped.stdout_bytes == blobs["squash"].read_bytes()


def test_empty_image_equals_siftool_new(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs.sif"
    siftool("new", str(theirs))
    ours = tmp_path / "ours.sif"
    create_sif(ours, [], launch_script="")
    assert ours.stat().st_size == theirs.stat().st_size == 32176
    assert_same_as_siftool(ours, theirs)


def test_add_object_matches_siftool_add(tmp_path: Path, blobs: dict[str, Path]) -> None:
    table = object_table(blobs)
    base = siftool_image(tmp_path / "base.sif", [flags for flags, _ in table[:3]])
    for flags, obj in table[3:]:
        theirs, ours = tmp_path / "theirs.sif", tmp_path / "ours.sif"
        shutil.copyfile(base, theirs)
        shutil.copyfile(base, ours)
        siftool("add", str(theirs), *flags)
        new_id = add_object(ours, obj)
        assert new_id == 4
        assert_same_as_siftool(ours, theirs)


def test_delete_then_add_matches_siftool(tmp_path: Path, blobs: dict[str, Path]) -> None:
    table = object_table(blobs)
    theirs = siftool_image(tmp_path / "theirs.sif", [flags for flags, _ in table[:4]])
    ours = tmp_path / "ours.sif"
    shutil.copyfile(theirs, ours)
    # Deleting the primary partition resets the header arch; the data stays in place.
    siftool("del", "3", str(theirs))
    delete_object(ours, 3)
    assert_same_as_siftool(ours, theirs)
    with SifImage.open(ours) as img:
        assert img.header.arch == "unknown"
        assert img.header.descriptors_free == 45
        with pytest.raises(SifError, match="no primary system partition"):
            img.primary_partition()
    # The freed slot is reused: the new object gets ID 3, after the last object.
    siftool("add", str(theirs), *table[4][0])
    assert add_object(ours, table[4][1]) == 3
    assert_same_as_siftool(ours, theirs)


def test_add_after_deleting_the_last_object_reuses_its_space(
    tmp_path: Path, blobs: dict[str, Path]
) -> None:
    """apptainer/sif >= 2.20 places new data after the last *used* object.

    (siftool 2.8.3 in Debian 12 still appends after the deleted data; documented gap.)
    """
    table = object_table(blobs)
    path = tmp_path / "ours.sif"
    create_sif(path, [obj for _, obj in table[:4]])
    with SifImage.open(path) as img:
        third = img.get(3)
    delete_object(path, 4)
    add_object(path, table[4][1])
    with SifImage.open(path) as img:
        added = img.get(4)
        assert added.offset == third.offset + third.size
        assert img.header.data_size == added.offset + added.size - img.header.data_offset


def test_add_object_errors(tmp_path: Path, blobs: dict[str, Path]) -> None:
    table = object_table(blobs)
    path = tmp_path / "full.sif"
    create_sif(path, [table[2][1]], capacity=2)
    with pytest.raises(SifError, match="already has a primary system partition"):
        add_object(path, table[2][1])
    add_object(path, table[0][1])
    with pytest.raises(SifError, match="all 2 descriptor slots are used") as err:
        add_object(path, table[0][1])
    assert "\n" not in str(err.value)
    with pytest.raises(SifError, match="no object with ID 9"):
        delete_object(path, 9)


def test_empty_last_object_in_the_alignment_gap(tmp_path: Path, blobs: dict[str, Path]) -> None:
    """siftool seeks over the gap without writing: the file ends before DataOffset+DataSize."""
    path = siftool_image(
        tmp_path / "t.sif", [[str(blobs["empty"]), "--datatype", "7", "--alignment", "4096"]]
    )
    ours = tmp_path / "ours.sif"
    create_sif(
        ours,
        [ObjectInput(DataType.GENERIC, data=b"", group_id=0, alignment=4096)],
        launch_script="",
    )
    assert_same_as_siftool(ours, path)
    with SifImage.open(path) as img:
        d = img.descriptors[0]
        assert d.offset == 32768 > img.file_size == 32176
        assert img.read(d) == b""


def test_deterministic_images(tmp_path: Path, blobs: dict[str, Path]) -> None:
    objs = [obj for _, obj in object_table(blobs)]
    a, b = tmp_path / "a.sif", tmp_path / "b.sif"
    create_sif(a, objs, deterministic=True)
    create_sif(b, objs, deterministic=True)
    assert a.read_bytes() == b.read_bytes()
    with SifImage.open(a) as img:
        assert img.header.deterministic
        assert img.header.id == uuid.UUID(int=0)
        assert img.header.created_at == img.header.modified_at == ZERO_TIME
        assert {d.created_at for d in img.descriptors} == {ZERO_TIME}
        assert img.header.launch_script == "#!/usr/bin/env run-singularity\n"
    header = siftool("header", str(a))
    assert "ID:" not in header and "Created At:" not in header
    assert header.startswith("Launch Script:        #!/usr/bin/env run-singularity\n")
    # Editing keeps a deterministic image deterministic.
    add_object(a, ObjectInput(DataType.GENERIC, data=b"x"))
    delete_object(a, 1)
    with SifImage.open(a) as img:
        assert img.header.deterministic and img.get(9).created_at == ZERO_TIME
    # Without it: a random UUID and the current time.
    c = tmp_path / "c.sif"
    create_sif(c, objs)
    with SifImage.open(c) as img:
        assert img.header.id.version == 4 and img.header.created_at > 1_600_000_000


def test_oci_blob_gets_its_digest(tmp_path: Path) -> None:
    data = b'{"schemaVersion": 2}'
    path = tmp_path / "oci.sif"
    create_sif(path, [ObjectInput(DataType.OCI_BLOB, data=data)])
    with SifImage.open(path) as img:
        extra = img.descriptors[0].extra.rstrip(b"\0").decode()
    assert extra == "sha256:" + hashlib.sha256(data).hexdigest()


def test_partition_is_streamed_not_loaded(tmp_path: Path) -> None:
    big = tmp_path / "big.squashfs"
    with open(big, "wb") as f:
        for _ in range(32):
            f.write(os.urandom(1 << 20))
    obj = ObjectInput(
        DataType.PARTITION,
        path=big,
        fs_type=FsType.SQUASHFS,
        part_type=PartType.PRIMSYS,
        arch="amd64",
    )
    tracemalloc.start()
    try:
        create_sif(tmp_path / "big.sif", [obj])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak {peak} bytes while writing a 32 MiB partition"
    with SifImage.open(tmp_path / "big.sif") as img:
        part = img.primary_partition()
        h = hashlib.sha256()
        for chunk in img.iter_object(part):
            h.update(chunk)
    assert h.digest() == hashlib.sha256(big.read_bytes()).digest()


def test_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    out = tmp_path / "img.sif"
    write(out, b"previous content")
    objs = [
        ObjectInput(DataType.DEFFILE, data=b"x"),
        ObjectInput(DataType.GENERIC, path=tmp_path / "missing.bin"),
    ]
    with pytest.raises(SifError, match=r"missing\.bin: cannot read object data") as err:
        create_sif(out, objs)
    assert "\n" not in str(err.value)
    assert out.read_bytes() == b"previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.sif"]
    with pytest.raises(SifError, match="cannot write"):
        create_sif(tmp_path / "no-such-dir" / "x.sif", [])


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    out = tmp_path / "x.sif"
    with pytest.raises(SifError, match="SIF allows 128"):
        create_sif(out, [ObjectInput(DataType.GENERIC, data=b"", name="n" * 129)])
    with pytest.raises(SifError, match="at most 31"):
        create_sif(out, [], launch_script="#" * 32)
    with pytest.raises(SifError, match="no SIF code"):
        create_sif(
            out,
            [ObjectInput(DataType.PARTITION, data=b"", fs_type=1, part_type=1, arch="vax")],
        )
    prim = ObjectInput(DataType.PARTITION, data=b"", fs_type=1, part_type=2, arch="amd64")
    with pytest.raises(SifError, match="more than one primary"):
        create_sif(out, [prim, prim])
    with pytest.raises(ValueError):
        ObjectInput(DataType.GENERIC, data=b"", path=out)
    with pytest.raises(ValueError):
        ObjectInput(DataType.PARTITION, data=b"")
    assert not out.exists()


def test_group_links(tmp_path: Path) -> None:
    path = tmp_path / "g.sif"
    create_sif(
        path,
        [
            ObjectInput(DataType.GENERIC, data=b"a", group_id=7),
            ObjectInput(DataType.SIGNATURE, data=b"s", group_id=0, linked_id=7, linked_group=True),
        ],
    )
    rows = siftool("list", str(path)).splitlines()[3:]
    assert rows[1].split("|")[1:3] == ["NONE    ", "7   (G) "]
    with SifImage.open(path) as img:
        sig = img.get(2)
        assert (sig.group_id, sig.linked_id, sig.linked_group) == (0, 7, True)
        assert img.get(1).group_id == 7


# ---------------------------------------------------------------------------------------
# Primary partition checks


def one_partition(tmp_path: Path, fs: int, part: int = PartType.PRIMSYS) -> Path:
    path = tmp_path / f"fs{fs}.sif"
    obj = ObjectInput(DataType.PARTITION, data=b"x" * 10, fs_type=fs, part_type=part, arch="amd64")
    create_sif(path, [obj])
    return path


@pytest.mark.parametrize(
    ("fs", "message"),
    [
        (FsType.ENCRYPTED_SQUASHFS, "Encrypted squashfs .*does not support"),
        (FsType.GOCRYPTFS_SQUASHFS, "Gocryptfs squashfs .*does not support"),
        (FsType.EXT3, "is Ext3, not Squashfs"),
        (99, "unknown type 99, not Squashfs"),
    ],
)
def test_primary_partition_must_be_squashfs(tmp_path: Path, fs: int, message: str) -> None:
    with SifImage.open(one_partition(tmp_path, fs)) as img, pytest.raises(SifError) as err:
        img.primary_partition()
    assert err.match(message)
    assert "\n" not in str(err.value) and str(img.path) in str(err.value)


def test_primary_partition_missing_or_doubled(tmp_path: Path) -> None:
    path = one_partition(tmp_path, FsType.SQUASHFS, PartType.SYSTEM)
    with SifImage.open(path) as img, pytest.raises(SifError, match="no primary system"):
        img.primary_partition()
    add_object(
        path,
        ObjectInput(DataType.PARTITION, data=b"y", fs_type=1, part_type=1, arch="amd64"),
    )
    # Two PrimSys partitions can only come from a foreign writer: patch both descriptors.
    b = bytearray(path.read_bytes())
    for slot in range(2):
        struct.pack_into("<i", b, 4096 + slot * DESCRIPTOR.size + 201 + 4, PartType.PRIMSYS)
    write(path, bytes(b))
    with SifImage.open(path) as img, pytest.raises(SifError, match="2 primary partitions"):
        img.primary_partition()


# ---------------------------------------------------------------------------------------
# Malformed input: each a one-line SifError naming the file


@pytest.fixture()
def good(tmp_path: Path) -> bytes:
    path = tmp_path / "good.sif"
    create_sif(
        path,
        [
            ObjectInput(DataType.DEFFILE, data=b"Bootstrap: scratch\n"),
            ObjectInput(
                DataType.PARTITION,
                data=b"s" * 5000,
                fs_type=FsType.SQUASHFS,
                part_type=PartType.PRIMSYS,
                arch="amd64",
            ),
            ObjectInput(DataType.GENERIC, data=b"tail"),
        ],
    )
    return path.read_bytes()


def patched(data: bytes, fmt: str, at: int, value: object) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, at, value)
    return bytes(b)


def slot(n: int, field: int) -> int:
    return 4096 + n * DESCRIPTOR.size + field


MALFORMED = {
    "not a SIF": (lambda d: b"#!/bin/sh\necho this is a shell script\n" * 10, "not a SIF image"),
    "tiny file": (lambda d: b"hello", "not a SIF image"),
    "empty file": (lambda d: b"", "not a SIF image"),
    "bad magic": (lambda d: d[:32] + b"SIF_MAGIX\0" + d[42:], "not a SIF image"),
    "wrong version": (lambda d: d[:42] + b"02\0" + d[45:], "unsupported SIF version '02'"),
    "truncated header": (lambda d: d[:100], r"truncated SIF header \(100 of 128"),
    "table past EOF": (lambda d: d[:20000], "descriptor table .* lies outside the file"),
    "table offset past EOF": (
        lambda d: patched(d, "<q", 96, 1 << 40),
        "descriptor table .* lies outside",
    ),
    "table over header": (lambda d: patched(d, "<q", 96, 64), "descriptor table .* lies outside"),
    "absurd count": (lambda d: patched(d, "<q", 88, 1 << 40), "absurd descriptor count"),
    "negative count": (lambda d: patched(d, "<q", 88, -1), "absurd descriptor count"),
    "size != total x 585": (lambda d: patched(d, "<q", 104, 48 * 585 + 1), "is not 48 x 585"),
    "free > total": (lambda d: patched(d, "<q", 80, 49), "49 free descriptors of 48"),
    "negative data size": (lambda d: patched(d, "<q", 120, -1), "negative data section"),
    "negative data offset": (lambda d: patched(d, "<q", 112, -5), "negative data section"),
    "object past EOF": (lambda d: d[:-2], "object 3 .* runs past the end of the file"),
    "object offset past EOF": (
        lambda d: patched(d, "<q", slot(1, 17), 1 << 50),
        "object 2 .* runs past the end",
    ),
    "negative offset": (lambda d: patched(d, "<q", slot(0, 17), -1), "negative offset or size"),
    "negative size": (lambda d: patched(d, "<q", slot(0, 25), -8), "negative offset or size"),
    "negative padded size": (
        lambda d: patched(d, "<q", slot(2, 33), -1),
        "negative offset or size",
    ),
    "overlapping objects": (
        lambda d: patched(d, "<q", slot(2, 17), 32176 + 3),
        "objects 1 and 3 overlap",
    ),
    "object over table": (
        lambda d: patched(d, "<q", slot(0, 17), 4096),
        "overlaps the header or the descriptor table",
    ),
    "duplicate IDs": (lambda d: patched(d, "<I", slot(2, 5), 1), "reuses the ID"),
    "ID zero": (lambda d: patched(d, "<I", slot(1, 5), 0), "has ID 0"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_input_is_one_line_sif_error(tmp_path: Path, good: bytes, case: str) -> None:
    mutate, message = MALFORMED[case]
    path = write(tmp_path / "bad.sif", mutate(good))
    with pytest.raises(SifError) as err:
        SifImage.open(path).close()
    text = str(err.value)
    assert err.match(message), text
    assert "\n" not in text and text.startswith(str(path))
    assert err.value.exit_code != 0


def test_bad_utf8_name_is_replaced_not_raised(tmp_path: Path, good: bytes) -> None:
    b = bytearray(good)
    b[slot(0, 73) : slot(0, 73) + 4] = b"a\xff\xfeb"
    with SifImage.open(write(tmp_path / "n.sif", bytes(b))) as img:
        assert img.descriptors[0].name == "a\ufffd\ufffdb"


def test_unknown_codes_are_kept_as_ints(tmp_path: Path, good: bytes) -> None:
    data = patched(good, "<i", slot(2, 0), 0x4FFF)
    with SifImage.open(write(tmp_path / "u.sif", data)) as img:
        d = img.get(3)
        assert d.datatype == 0x4FFF and d.type_label == "Unknown"
    rows = siftool("list", str(tmp_path / "u.sif")).splitlines()
    assert rows[-1].endswith("|Unknown")


@pytest.mark.parametrize(
    ("kind", "reason"), [("missing", "No such file or directory"), ("directory", "Is a directory")]
)
def test_unopenable_path(tmp_path: Path, kind: str, reason: str) -> None:
    path = tmp_path / "nothing.sif"
    if kind == "directory":
        path.mkdir()
    with pytest.raises(SifError) as err:
        SifImage.open(path)
    assert str(err.value) == f"{path}: cannot open: {reason}; check the path"


def test_cli_prints_one_line_for_a_bad_image(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.sif", b"not an image at all")
    for argv in (["inspect", str(path)], ["sif", "list", str(path)]):
        proc = subprocess.run(["rankwire", *argv], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr == (
            f"rankwire: {path}: not a SIF image (only 19 bytes); "
            "build one with `rankwire build` or `apptainer build`\n"
        )


# ---------------------------------------------------------------------------------------
# Fuzz: whatever the bytes, opening and reading raise SifError or nothing


FIELDS_Q = [64, 72, 80, 88, 96, 104, 112, 120] + [
    slot(n, f) for n in range(4) for f in (17, 25, 33, 41)
]
FIELDS_I = [slot(n, f) for n in range(4) for f in (5, 9, 13)]
FIELDS_i = [slot(n, f) for n in range(4) for f in (0, 201, 205)]
INTERESTING = [-1, 0, 1, 128, 4095, 4096, 32176, 32177, 40960, 45000, 1 << 31, 1 << 62]


def fuzz_base() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "base.sif"
        create_sif(
            path,
            [
                ObjectInput(DataType.DEFFILE, data=b"Bootstrap: scratch\n"),
                ObjectInput(
                    DataType.PARTITION,
                    data=b"\x01" * 5000,
                    fs_type=FsType.SQUASHFS,
                    part_type=PartType.PRIMSYS,
                    arch="amd64",
                ),
                ObjectInput(DataType.SIGNATURE, data=b"sig", group_id=0, linked_id=1),
                ObjectInput(DataType.GENERIC, data=b"", alignment=4096),
            ],
            capacity=5,
        )
        return path.read_bytes()


BASE = fuzz_base()
positions = st.one_of(
    st.integers(0, HEADER.size - 1),
    st.integers(4096, 4096 + 5 * DESCRIPTOR.size - 1),
    st.integers(0, len(BASE) - 1),
)
field_writes = st.one_of(
    st.tuples(st.just("<q"), st.sampled_from(FIELDS_Q), st.sampled_from(INTERESTING)),
    st.tuples(st.just("<q"), st.sampled_from(FIELDS_Q), st.integers(-(2**63), 2**63 - 1)),
    st.tuples(st.just("<I"), st.sampled_from(FIELDS_I), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("<i"), st.sampled_from(FIELDS_i), st.integers(-(2**31), 2**31 - 1)),
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    flips=st.lists(st.tuples(positions, st.integers(0, 255)), max_size=6),
    writes=st.lists(field_writes, max_size=4),
    cut=st.one_of(st.none(), st.integers(0, len(BASE))),
)
def test_fuzz_parser_raises_only_sif_error(
    tmp_path: Path, flips: list[tuple[int, int]], writes: list, cut: int | None
) -> None:
    b = bytearray(BASE)
    for at, value in flips:
        b[at] = value
    for fmt, at, value in writes:
        struct.pack_into(fmt, b, at, value)
    data = bytes(b[:cut] if cut is not None else b)
    path = write(tmp_path / "fuzz.sif", data)
    try:
        with SifImage.open(path) as img:
            for d in img.descriptors:
                assert len(img.read(d)) == d.size
                _ = (d.type_label, d.fs_type, d.part_type, d.arch)
                descriptor_digest(img, d)
            header_digest(img)
            img.primary_partition()
    except SifError as err:
        assert "\n" not in str(err)


# ---------------------------------------------------------------------------------------
# Integrity digests (what `apptainer sign` signs)


def test_digests_recomputed_independently(tmp_path: Path, good: bytes) -> None:
    path = write(tmp_path / "d.sif", good)
    raw = path.read_bytes()
    with SifImage.open(path) as img:
        assert header_digest(img) == "sha256:" + hashlib.sha256(raw[:45] + raw[48:64]).hexdigest()
        for n, d in enumerate(img.descriptors):
            at = 4096 + n * DESCRIPTOR.size
            fields = struct.unpack_from("<iBIIIqqqqqqq", raw, at)
            dtype, used, oid, _group, link, _off, size, _swp, ctime, _mtime, uid, gid = fields
            relative = oid - 1  # all three are in group 1, whose lowest ID is 1
            signed = struct.pack("<iBIIqqqq", dtype, used, relative, link, size, ctime, uid, gid)
            signed += raw[at + 73 : at + DESCRIPTOR.size]
            assert descriptor_digest(img, d) == "sha256:" + hashlib.sha256(signed).hexdigest()
            data = raw[d.offset : d.offset + d.size]
            assert object_digest(img, d) == "sha256:" + hashlib.sha256(data).hexdigest()
            assert object_digest(img, d, "sha512").startswith("sha512:")


def test_digests_ignore_what_signing_ignores(tmp_path: Path, good: bytes) -> None:
    """Arch, times, counts, offsets, padding and group are outside the signed fields."""
    a = write(tmp_path / "a.sif", good)
    b = bytearray(good)
    b[45:48] = b"04\0"
    struct.pack_into("<q", b, 72, 12345)  # modified at
    struct.pack_into("<q", b, slot(0, 49), 999)  # descriptor modified at
    struct.pack_into("<q", b, slot(0, 33), 0)  # size with padding
    bb = write(tmp_path / "b.sif", bytes(b))
    with SifImage.open(a) as ia, SifImage.open(bb) as ib:
        assert header_digest(ia) == header_digest(ib)
        for da, db in zip(ia.descriptors, ib.descriptors):
            assert descriptor_digest(ia, da) == descriptor_digest(ib, db)
    c = write(tmp_path / "c.sif", patched(good, "<q", slot(0, 41), 7))  # created at is signed
    with SifImage.open(a) as ia, SifImage.open(c) as ic:
        assert descriptor_digest(ia, ia.get(1)) != descriptor_digest(ic, ic.get(1))
        with pytest.raises(SifError, match="unknown digest algorithm"):
            header_digest(ia, "md42")


# ---------------------------------------------------------------------------------------
# Architecture names


def test_arch_helpers() -> None:
    assert goarch_from_machine("x86_64") == "amd64"
    assert goarch_from_machine("aarch64") == "arm64"
    assert goarch_from_machine("i686") == "386"
    assert goarch_from_machine("ppc64le") == "ppc64le"
    assert goarch_from_machine("loongarch64") == "loong64"
    assert goarch_from_machine() in ARCH_CODES
    assert arch_code("amd64") == b"02\0" and arch_code("riscv64") == b"12\0"
    assert arch_name(b"04\0") == "arm64" and arch_name(b"99\0") == "unknown"
    with pytest.raises(SifError, match="no SIF architecture code"):
        goarch_from_machine("pdp11")


# -- exact bounds (mutation-testing kills, `make mutants`) -----------------------------------
CORRUPT = "the image is corrupt or truncated, rebuild or re-download it"


@pytest.mark.parametrize(
    ("case", "mutate", "message"),
    [
        ("one byte short", lambda d: d[:-1],
         "object 3 (descriptor slot 2) (offset 37768, 4 bytes) runs past the end of the file "
         "(37771 bytes)"),
        ("object at 0", lambda d: patched(d, "<q", slot(0, 17), 0),
         "object 1 (descriptor slot 0) (offset 0, 19 bytes) overlaps the header or the "
         "descriptor table"),
        ("last header byte", lambda d: patched(d, "<q", slot(0, 17), 127),
         "object 1 (descriptor slot 0) (offset 127, 19 bytes) overlaps the header or the "
         "descriptor table"),
        ("first table byte", lambda d: patched(d, "<q", slot(0, 17), 4096 - 18),
         "object 1 (descriptor slot 0) (offset 4078, 19 bytes) overlaps the header or the "
         "descriptor table"),
        ("last table byte", lambda d: patched(d, "<q", slot(0, 17), 32175),
         "object 1 (descriptor slot 0) (offset 32175, 19 bytes) overlaps the header or the "
         "descriptor table"),
    ],
)  # fmt: skip
def test_object_bounds_are_exact(tmp_path: Path, good: bytes, case: str, mutate, message) -> None:
    path = write(tmp_path / "bad.sif", mutate(good))
    with pytest.raises(SifError) as err:
        SifImage.open(path).close()
    assert str(err.value) == f"{path}: {message}; {CORRUPT}"


@pytest.mark.parametrize("offset", [128, 4096 - 19])
def test_objects_may_touch_the_header_and_the_table(
    tmp_path: Path, good: bytes, offset: int
) -> None:
    path = write(tmp_path / "ok.sif", patched(good, "<q", slot(0, 17), offset))
    with SifImage.open(path) as img:
        assert img.get(1).offset == offset
    exact = write(tmp_path / "exact.sif", good)
    with SifImage.open(exact) as img:
        assert img.get(3).offset + img.get(3).size == len(good)


@pytest.mark.parametrize(
    ("case", "data", "message"),
    [
        ("42 bytes", lambda d: d[:42],
         "truncated SIF header (42 of 128 bytes); the file is incomplete, copy or rebuild it"),
        ("50 bytes, no magic", lambda d: b"x" * 50,
         "not a SIF image (only 50 bytes); build one with `rankwire build` or `apptainer build`"),
        ("header only", lambda d: d[:128],
         "descriptor table (offset 4096, 28080 bytes) lies outside the file (128 bytes); "
         f"{CORRUPT}"),
    ],
)  # fmt: skip
def test_short_files_exactly(tmp_path: Path, good: bytes, case: str, data, message) -> None:
    path = write(tmp_path / "short.sif", data(good))
    with pytest.raises(SifError) as err:
        SifImage.open(path).close()
    assert str(err.value) == f"{path}: {message}"


def test_reader_accessors_exactly(tmp_path: Path, good: bytes) -> None:
    path = write(tmp_path / "ok.sif", good)
    with SifImage.open(path) as img:
        assert img.raw_metadata() == good[:128] + good[4096 : 4096 + 3 * DESCRIPTOR.size]
        with pytest.raises(SifError) as err:
            img.get(9)
        assert str(err.value) == (
            f"{path}: no object with ID 9 (IDs present: 1, 2, 3); see `rankwire sif list`"
        )
        for bad in ({"size": 10}, {"offset": -1}, {"size": -1}):
            with pytest.raises(SifError) as err:
                img.read(dataclasses.replace(img.get(3), **bad))
            assert str(err.value) == (
                f"{path}: object 3 lies outside the file; the image is corrupt, rebuild it"
            )
        assert img.read(dataclasses.replace(img.get(3), size=0)) == b""
        assert img.read(img.get(3)) == b"tail"
    empty = tmp_path / "empty.sif"
    create_sif(empty, [])
    with SifImage.open(empty) as img, pytest.raises(SifError) as err:
        img.get(1)
    none = "no object with ID 1 (IDs present: none); see `rankwire sif list`"
    assert str(err.value) == f"{empty}: {none}"
    zero = write(tmp_path / "zero.sif", patched(good, "<q", 112, 0))  # data section at 0
    with SifImage.open(zero) as img:
        assert img.read(img.get(3)) == b"tail"


def test_partition_without_a_type_is_named_exactly(tmp_path: Path) -> None:
    with SifImage.open(one_partition(tmp_path, 0)) as img, pytest.raises(SifError) as err:
        img.primary_partition()
    assert str(err.value) == (
        f"{img.path}: the primary partition is unknown type 0, not Squashfs, which rankwire "
        "does not support; rebuild the image as squashfs (`rankwire build`)"
    )


def test_header_bounds_are_inclusive(tmp_path: Path, good: bytes) -> None:
    """No descriptors, a table right after the header, the most descriptors allowed: valid;
    one more descriptor is absurd; an empty object anywhere is no object."""
    empty = tmp_path / "empty.sif"
    create_sif(empty, [])
    none = patched(patched(patched(empty.read_bytes(), "<q", 88, 0), "<q", 80, 0), "<q", 104, 0)
    with SifImage.open(write(tmp_path / "none.sif", none)) as img:
        assert img.descriptors == ()
    with SifImage.open(write(tmp_path / "t128.sif", patched(good, "<q", 96, 128))) as img:
        assert img.descriptors == ()  # the header's padding reads as unused slots
    for total, ok in ((1 << 16, True), ((1 << 16) + 1, False)):
        data = bytearray(empty.read_bytes()[:4096])
        for at, value in ((80, total), (88, total), (96, 4096), (104, total * DESCRIPTOR.size)):
            struct.pack_into("<q", data, at, value)
        path = write(tmp_path / "max.sif", bytes(data))
        os.truncate(path, 4096 + total * DESCRIPTOR.size)  # sparse: unused slots are zeros
        if ok:
            with SifImage.open(path) as img:
                assert img.descriptors == ()
        else:
            with pytest.raises(SifError) as err:
                SifImage.open(path)
            assert str(err.value) == (
                f"{path}: absurd descriptor count 65537 (limit 65536); {CORRUPT}"
            )
    with SifImage.open(write(tmp_path / "ok.sif", good)) as img:
        far = dataclasses.replace(img.get(3), offset=len(good) + 5, size=0)
        assert img.read(far) == b""
