"""ELF facts for bind plans: sonames, DT_NEEDED, search paths and symbol versions.

Read from a host path or from bytes (a file extracted from an image), into plain frozen
data, by our own reader of the ELF tables (32/64-bit, either byte order): only the
dynamic section and the GNU version sections are looked at (and, for `read_symbol`, the
dynamic symbols and the program headers). Every offset and count comes from the file, so
each is checked against it: a malformed file is a ValueError, never a crash or a read
past its end.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Optional, Union

from rankwire.record import record

# glibc's own objects: they always come from the image, never from the host.
GLIBC_SONAMES = frozenset(
    {
        "libc.so.6",
        "libm.so.6",
        "libmvec.so.1",
        "libpthread.so.0",
        "libdl.so.2",
        "librt.so.1",
        "libresolv.so.2",
        "libutil.so.1",
        "libanl.so.1",
        "libnsl.so.1",
        "libBrokenLocale.so.1",
        "libthread_db.so.1",
        "libc_malloc_debug.so.0",
        "ld-linux-x86-64.so.2",
        "ld-linux-aarch64.so.1",
        "ld64.so.2",
        "ld-linux.so.2",
    }
)
_VERSION_RE = re.compile(r"^([A-Z_]+?)_(\d+(?:\.\d+)*)$")


def is_glibc(soname: str) -> bool:
    return soname in GLIBC_SONAMES


def version_key(name: str) -> tuple[str, tuple[int, ...]]:
    """`GLIBC_2.3.4` -> ("GLIBC", (2, 3, 4)); names without a number sort as ()."""
    m = _VERSION_RE.match(name)
    if not m:
        return (name, ())
    return (m.group(1), tuple(int(x) for x in m.group(2).split(".")))


def newest(names: set[str] | frozenset[str] | tuple[str, ...], prefix: str) -> str:
    """The highest `PREFIX_x.y` among `names` ("" when none)."""
    found = [n for n in names if version_key(n)[0] == prefix and version_key(n)[1]]
    return max(found, key=lambda n: version_key(n)[1]) if found else ""


@record
class ElfFacts:
    """What the loader needs of one ELF object.

    `defines`: version definitions it exports (GLIBC_2.34, FABRIC_1.3; not the base name).
    `requires`: (file, versions) pairs from its version needs (libc.so.6, (GLIBC_2.34, ...)).
    """

    soname: str
    needed: tuple[str, ...]
    runpath: tuple[str, ...]
    rpath: tuple[str, ...]
    machine: str
    elfclass: int
    defines: tuple[str, ...]
    requires: tuple[tuple[str, tuple[str, ...]], ...]

    def required_from(self, soname: str) -> tuple[str, ...]:
        for file, versions in self.requires:
            if file == soname:
                return versions
        return ()


def elf_from_dict(d: dict[str, Any]) -> ElfFacts:
    """`ElfFacts` back from its `dataclasses.asdict` (a fact cache's JSON)."""
    return ElfFacts(
        soname=d["soname"],
        needed=tuple(d["needed"]),
        runpath=tuple(d["runpath"]),
        rpath=tuple(d["rpath"]),
        machine=d["machine"],
        elfclass=d["elfclass"],
        defines=tuple(d["defines"]),
        requires=tuple((f, tuple(v)) for f, v in d["requires"]),
    )


def read_elf(source: Union[str, bytes], name: str = "") -> ElfFacts:
    """ELF facts of a file path or of its bytes; `ValueError` when it is not ELF or its
    tables do not hold together (each offset and count is checked against the file).
    A file is read by `pread` where its tables are: header, section headers, the dynamic
    and version sections and their string tables, never the whole of it."""
    with _opened(source, name) as elf:
        return _facts(elf)


def read_symbol(source: Union[str, bytes], symbol: str, limit: int, name: str = "") -> bytes:
    """Up to `limit` bytes of the data the dynamic symbol `symbol` (defined, not only
    imported) of an ELF file (path or bytes) names (its size, else `limit`), as a loaded
    object holds them in a PT_LOAD segment's file part; b"" when it has no such symbol.
    `ValueError` as `read_elf`."""
    with _opened(source, name) as elf:
        found = elf.dynamic_symbol(symbol)
        if found is None:
            return b""
        addr, size = found
        for p_type, offset, vaddr, filesz in elf.segments():
            if p_type == PT_LOAD and vaddr <= addr < vaddr + filesz:
                want = min(size or limit, limit, vaddr + filesz - addr)
                return elf.read(offset + addr - vaddr, want)
    return b""


@contextlib.contextmanager
def _opened(source: Union[str, bytes], name: str) -> Iterator[_Image]:
    if isinstance(source, bytes):
        yield _Image(lambda at, n: source[at : at + n], len(source), name or "<bytes>")
        return
    with open(source, "rb") as f:
        fd = f.fileno()
        yield _Image(lambda at, n: os.pread(fd, n, at), os.fstat(fd).st_size, name or source)


SHT_DYNAMIC, SHT_DYNSYM = 6, 11
SHT_GNU_VERDEF, SHT_GNU_VERNEED = 0x6FFFFFFD, 0x6FFFFFFE
DT_NULL, DT_NEEDED, DT_SONAME, DT_RPATH, DT_RUNPATH = 0, 1, 14, 15, 29
VER_FLG_BASE = 0x1
PT_LOAD = 1
SHN_UNDEF = 0
# e_machine as pyelftools named it (ElfFacts.machine keeps those names).
MACHINES = {
    3: "EM_386",
    8: "EM_MIPS",
    20: "EM_PPC",
    21: "EM_PPC64",
    22: "EM_S390",
    40: "EM_ARM",
    62: "EM_X86_64",
    183: "EM_AARCH64",
    243: "EM_RISCV",
    258: "EM_LOONGARCH",
}
# A table larger than this is no table of a library's: refused, not read.
MAX_TABLE = 64 << 20
MAX_DYNAMIC = 1 << 16  # a dynamic section has tens of entries (16 bytes each)
MAX_STRING = 4096  # a soname, a version name, a RUNPATH: no longer than a path


class _Section(NamedTuple):
    type: int
    offset: int
    size: int
    link: int
    info: int


class _Image:
    """The tables of one ELF object, read where they are (`read_at(offset, size)`)."""

    def __init__(self, read_at: Callable[[int, int], bytes], size: int, name: str) -> None:
        self.read_at, self.size, self.name = read_at, size, name
        ident = self.read(0, 16) if size >= 16 else b""
        if ident[:4] != b"\x7fELF":
            raise ValueError(f"{name} is not an ELF file")
        if ident[4] not in (1, 2) or ident[5] not in (1, 2):
            raise self.bad(f"class {ident[4]}, data encoding {ident[5]}")
        self.elfclass = 64 if ident[4] == 2 else 32
        self.order = "<" if ident[5] == 1 else ">"
        wide = self.elfclass == 64
        head = self.unpack("HHIQQQIHHHHHH" if wide else "HHIIIIIHHHHHH", 16)
        self.machine_number = head[1]
        self.phoff, self.shoff = head[4], head[5]
        self.phentsize, self.phnum, self.shentsize, shnum = head[8], head[9], head[10], head[11]
        self.sections: list[_Section] = []
        if self.shoff == 0:
            return
        shdr = "IIQQQQIIQQ" if wide else "IIIIIIIIII"
        if self.shentsize < struct.calcsize(self.order + shdr):
            raise self.bad(f"section header size {self.shentsize}")
        if shnum == 0:  # extended numbering: the count is section 0's size
            shnum = self.unpack(shdr, self.shoff)[5]
        if shnum > (size - self.shoff) // self.shentsize:
            raise self.bad(f"{shnum} section headers past the end")
        table = self.read(self.shoff, shnum * self.shentsize)
        for i in range(shnum):
            f = struct.unpack_from(self.order + shdr, table, i * self.shentsize)
            self.sections.append(_Section(f[1], f[4], f[5], f[6], f[7]))

    def bad(self, why: str) -> ValueError:
        return ValueError(f"{self.name}: unreadable ELF ({why})")

    def read(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > self.size or size > MAX_TABLE:
            raise self.bad(f"{size} bytes at {offset} past the end")
        data = self.read_at(offset, size)
        if len(data) != size:
            raise self.bad(f"short read at {offset}")
        return data

    def unpack(self, fmt: str, offset: int) -> tuple[int, ...]:
        fmt = self.order + fmt
        return struct.unpack(fmt, self.read(offset, struct.calcsize(fmt)))

    def of_type(self, kind: int) -> list[_Section]:
        return [s for s in self.sections if s.type == kind]

    def string_table(self, section: _Section) -> bytes:
        """The string table that `section` links to."""
        if section.link >= len(self.sections):
            raise self.bad(f"string table {section.link} of {len(self.sections)} sections")
        table = self.sections[section.link]
        return self.read(table.offset, table.size)

    def strings(self, section: _Section) -> Callable[[int], str]:
        """The string table that `section` links to, as offset → string (each at most
        MAX_STRING bytes, each decoded once)."""
        data = self.string_table(section)
        seen: dict[int, str] = {}

        def at(offset: int) -> str:
            if offset in seen:
                return seen[offset]
            end = data.find(b"\0", offset, offset + MAX_STRING + 1)
            if offset >= len(data) or end < 0:
                raise self.bad(f"string {offset} outside its table or past {MAX_STRING} bytes")
            seen[offset] = data[offset:end].decode("utf-8", "replace")
            return seen[offset]

        return at

    def versions(
        self, section: _Section, head: str, aux: str
    ) -> list[tuple[tuple[int, ...], list[tuple[int, ...]]]]:
        """A GNU version section's entries (`head`) with their auxiliaries (`aux`): at most
        its count of each, each chain followed by its `next` offsets (the last field)
        until one is 0, as the loader does; no more entries in all than its bytes hold."""
        data = self.read(section.offset, section.size)
        head, aux = self.order + head, self.order + aux
        budget = len(data) // min(struct.calcsize(head), struct.calcsize(aux))
        if section.info > budget:
            raise self.bad(f"{section.info} version entries in {len(data)} bytes")
        out = []
        at = 0
        for _ in range(section.info):
            entry = _unpack_in(self, head, data, at)
            count, first = (entry[3], entry[5]) if len(entry) == 7 else (entry[1], entry[3])
            budget -= 1 + count
            if count == 0 or budget < 0:
                raise self.bad(f"a version entry with {count} auxiliary entries")
            auxes, where = [], at + first
            for _ in range(count):
                one = _unpack_in(self, aux, data, where)
                auxes.append(one)
                if one[-1] == 0:
                    break
                where += one[-1]
            out.append((entry, auxes))
            if entry[-1] == 0:
                break
            at += entry[-1]
        return out

    def dynamic_symbol(self, symbol: str) -> Optional[tuple[int, int]]:
        """(address, size) of the defined dynamic symbol `symbol`."""
        wide = self.elfclass == 64
        fmt = self.order + ("IBBHQQ" if wide else "IIIBBH")
        step = struct.calcsize(fmt)
        want = symbol.encode() + b"\0"
        for section in self.of_type(SHT_DYNSYM)[:1]:
            names = self.string_table(section)
            data = self.read(section.offset, section.size)
            for at in range(0, len(data) - step + 1, step):
                f = struct.unpack_from(fmt, data, at)
                value, size, shndx = (f[4], f[5], f[3]) if wide else (f[1], f[2], f[5])
                if f[0] and shndx != SHN_UNDEF and names.startswith(want, f[0]):
                    return value, size
        return None

    def segments(self) -> list[tuple[int, int, int, int]]:
        """(p_type, p_offset, p_vaddr, p_filesz) of each program header."""
        wide = self.elfclass == 64
        fmt = "IIQQQQQQ" if wide else "IIIIIIII"
        if self.phoff == 0:
            return []
        if self.phentsize < struct.calcsize(self.order + fmt):
            raise self.bad(f"program header size {self.phentsize}")
        out = []
        for i in range(self.phnum):
            f = self.unpack(fmt, self.phoff + i * self.phentsize)
            out.append((f[0], f[2], f[3], f[5]) if wide else (f[0], f[1], f[2], f[4]))
        return out


def _unpack_in(elf: _Image, fmt: str, data: bytes, at: int) -> tuple[int, ...]:
    if at < 0 or at + struct.calcsize(fmt) > len(data):
        raise elf.bad(f"an entry at {at} outside its section")
    return struct.unpack_from(fmt, data, at)


def _facts(elf: _Image) -> ElfFacts:
    soname = ""
    needed: list[str] = []
    runpath: list[str] = []
    rpath: list[str] = []
    defines: list[str] = []
    requires: list[tuple[str, tuple[str, ...]]] = []
    entry = elf.order + ("qQ" if elf.elfclass == 64 else "iI")
    step = struct.calcsize(entry)
    # the first of each kind only, as the loader has one of each
    for section in elf.of_type(SHT_DYNAMIC)[:1]:
        text = elf.strings(section)
        if section.size > MAX_DYNAMIC:
            raise elf.bad(f"a dynamic section of {section.size} bytes")
        data = elf.read(section.offset, section.size)
        for at in range(0, len(data) - step + 1, step):
            tag, value = struct.unpack_from(entry, data, at)
            if tag == DT_NULL:
                break
            if tag == DT_NEEDED:
                needed.append(text(value))
            elif tag == DT_SONAME:
                soname = text(value)
            elif tag == DT_RUNPATH:
                runpath += [p for p in text(value).split(":") if p]
            elif tag == DT_RPATH:
                rpath += [p for p in text(value).split(":") if p]
    for section in elf.of_type(SHT_GNU_VERDEF)[:1]:
        name = elf.strings(section)
        # Elf_Verdef: version, flags, ndx, cnt, hash, aux, next; Elf_Verdaux: name, next
        for verdef, auxes in elf.versions(section, "HHHHIII", "II"):
            if not verdef[1] & VER_FLG_BASE:  # the base entry names the object itself
                defines.append(name(auxes[0][0]))
    for section in elf.of_type(SHT_GNU_VERNEED)[:1]:
        name = elf.strings(section)
        # Elf_Verneed: version, cnt, file, aux, next; Elf_Vernaux: hash, flags, other, name, next
        for verneed, auxes in elf.versions(section, "HHIII", "IHHII"):
            versions = tuple(sorted({name(a[3]) for a in auxes}, key=version_key))
            requires.append((name(verneed[2]), versions))
    return ElfFacts(
        soname=soname,
        needed=tuple(needed),
        runpath=tuple(runpath),
        rpath=tuple(rpath),
        machine=MACHINES.get(elf.machine_number, str(elf.machine_number)),
        elfclass=elf.elfclass,
        defines=tuple(sorted(set(defines), key=version_key)),
        requires=tuple(sorted(requires)),
    )
