"""rankwire's own ELF reader (fabric/elf.py) against pyelftools, the reader it replaced
(a test dependency now): synthetic objects of either class and byte order, this host's
libraries and programs, and malformed bytes (a ValueError, never another exception)."""

from __future__ import annotations

import dataclasses
import glob
import os
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.elfgen import make_elf
from rankwire.fabric.elf import ElfFacts, read_elf, read_symbol, version_key

TABLES: dict[str, Any] = dict(
    soname="libx.so.1",
    needed=["libc.so.6", "liby.so.2"],
    runpath="/opt/x/lib:/opt/y/lib",
    rpath="/old",
    defines=["X_1.0", "X_1.2"],
    requires={"libc.so.6": ["GLIBC_2.34", "GLIBC_2.2.5"], "liby.so.2": ["Y_2"]},
    symbols={"version_string": b"4.0.2\0", "other": b"zz\0"},
)
KINDS = [(True, "<"), (True, ">"), (False, "<"), (False, ">")]


def oracle(source: str | bytes) -> tuple[Any, ...]:
    """What pyelftools reads of the same tables (the reader this one replaced)."""
    import io

    from elftools.elf.elffile import ELFFile

    stream = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    with stream:
        elf = ELFFile(stream)
        soname, needed, runpath, rpath, defines, requires = "", [], [], [], [], []
        for section in elf.iter_sections():
            kind = section["sh_type"]
            if kind == "SHT_DYNAMIC":
                for tag in section.iter_tags():
                    d = tag.entry.d_tag
                    if d == "DT_NEEDED":
                        needed.append(tag.needed)
                    elif d == "DT_SONAME":
                        soname = tag.soname
                    elif d == "DT_RUNPATH":
                        runpath += [p for p in tag.runpath.split(":") if p]
                    elif d == "DT_RPATH":
                        rpath += [p for p in tag.rpath.split(":") if p]
            elif kind == "SHT_GNU_verdef":
                for verdef, auxes in section.iter_versions():
                    names = [a.name for a in auxes]
                    if not verdef["vd_flags"] & 1 and names:
                        defines.append(names[0])
            elif kind == "SHT_GNU_verneed":
                for verneed, auxes in section.iter_versions():
                    versions = tuple(sorted({a.name for a in auxes}, key=version_key))
                    requires.append((verneed.name, versions))
        return (
            soname,
            tuple(needed),
            tuple(runpath),
            tuple(rpath),
            str(elf["e_machine"]),
            elf.elfclass,
            tuple(sorted(set(defines), key=version_key)),
            tuple(sorted(requires)),
        )


@pytest.mark.parametrize(("wide", "order"), KINDS, ids=["64le", "64be", "32le", "32be"])
def test_each_class_and_byte_order(wide: bool, order: str, tmp_path: Path) -> None:
    data = make_elf(wide=wide, order=order, **TABLES)
    want = ElfFacts(
        soname="libx.so.1",
        needed=("libc.so.6", "liby.so.2"),
        runpath=("/opt/x/lib", "/opt/y/lib"),
        rpath=("/old",),
        machine="EM_X86_64",
        elfclass=64 if wide else 32,
        defines=("X_1.0", "X_1.2"),
        requires=(("libc.so.6", ("GLIBC_2.2.5", "GLIBC_2.34")), ("liby.so.2", ("Y_2",))),
    )
    assert read_elf(data) == want
    assert dataclasses.astuple(want) == oracle(data)
    path = tmp_path / "libx.so.1"
    path.write_bytes(data)
    assert read_elf(str(path)) == want
    assert read_symbol(str(path), "version_string", 64) == b"4.0.2\0"
    assert read_symbol(str(path), "version_string", 3) == b"4.0"
    assert read_symbol(str(path), "other", 64) == b"zz\0"
    assert read_symbol(str(path), "absent", 64) == b""


def _host_elf_files() -> list[str]:
    found = []
    for pattern in ("/usr/lib/x86_64-linux-gnu/*.so*", "/usr/lib/x86_64-linux-gnu/*/*.so*",
                    "/usr/bin/*", "/usr/sbin/*"):  # fmt: skip
        for path in sorted(glob.glob(pattern)):
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    if f.read(4) == b"\x7fELF":
                        found.append(path)
    return found


def test_this_hosts_libraries_and_programs_read_as_pyelftools_reads_them() -> None:
    files = _host_elf_files()
    assert len(files) > 300  # libfabric's providers, MPI, Python, coreutils...
    differ = [f for f in files if dataclasses.astuple(read_elf(f)) != oracle(f)]
    assert differ == []


def test_not_elf_and_cut_short(tmp_path: Path) -> None:
    text = tmp_path / "script"
    text.write_text("#!/bin/sh\n")
    with pytest.raises(ValueError) as err:
        read_elf(str(text))
    assert str(err.value) == f"{text} is not an ELF file"
    data = make_elf(**TABLES)
    shoff = struct.unpack_from("<Q", data, 40)[0]
    with pytest.raises(ValueError) as err:
        read_elf(data[: shoff + 10], name="cut")
    assert str(err.value) == "cut: unreadable ELF (8 section headers past the end)"
    for end in range(0, len(data), 7):  # cut anywhere: said, never another exception
        with pytest.raises(ValueError, match=r"^cut(: unreadable ELF \(.*\)| is not an ELF file)$"):
            read_elf(data[:end], name="cut")


def test_a_version_chain_that_loops_is_refused() -> None:
    """Counts come from the file: a version section claiming more entries than its
    bytes hold is refused before any is read."""
    data = bytearray(make_elf(**TABLES))
    shoff = struct.unpack_from("<Q", data, 40)[0]
    verdef = shoff + 64 * 3  # section 3: .gnu.version_d
    assert struct.unpack_from("<I", data, verdef + 4)[0] == 0x6FFFFFFD
    struct.pack_into("<I", data, verdef + 44, 0xFFFFFFFF)  # sh_info: the entry count
    with pytest.raises(ValueError) as err:
        read_elf(bytes(data), name="loop")
    assert str(err.value) == "loop: unreadable ELF (4294967295 version entries in 84 bytes)"


def test_a_chain_ends_at_a_zero_next_and_strings_are_bounded() -> None:
    """A version entry whose `next` is 0 ends its chain, whatever its section's count
    says (as the loader reads it; so a chain can never be walked more than once), and a
    string runs at most 4096 bytes: a small hostile file cannot cost more than linear
    work."""
    data = bytearray(make_elf(**TABLES))
    shoff = struct.unpack_from("<Q", data, 40)[0]
    verdef_at = struct.unpack_from("<Q", data, shoff + 64 * 3 + 24)[0]
    struct.pack_into("<I", data, verdef_at + 16, 0)  # the base entry's vd_next
    assert read_elf(bytes(data)).defines == ()  # the two after it are not reached
    long = make_elf(soname="libx.so.1", needed=["l" * 5000])
    with pytest.raises(ValueError) as err:
        read_elf(long, name="long")
    assert str(err.value) == "long: unreadable ELF (string 1 outside its table or past 4096 bytes)"
    assert read_elf(make_elf(needed=["l" * 4096])).needed == ("l" * 4096,)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(KINDS),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=12),
)
def test_mutated_objects_are_read_or_refused(
    kind: tuple[bool, str], edits: list[tuple[int, int]]
) -> None:
    data = bytearray(make_elf(wide=kind[0], order=kind[1], **TABLES))
    for at, value in edits:
        data[at % len(data)] = value
    try:
        read_elf(bytes(data), name="m")
        read_symbol(bytes(data), "version_string", 64, name="m")
    except ValueError as err:
        assert str(err).startswith("m: unreadable ELF (") or str(err) == "m is not an ELF file"
