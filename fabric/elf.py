"""ELF facts for bind plans: sonames, DT_NEEDED, search paths and symbol versions.

Read with pyelftools from a host path or from bytes (a file extracted from an image), into
plain frozen data. Only the dynamic section and the GNU version sections are looked at.
"""

from __future__ import annotations

import io
import re
from typing import BinaryIO, Union

from rankwire.errors import UserError
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


def read_elf(source: Union[str, bytes], name: str = "") -> ElfFacts:
    """ELF facts of a file path or of its bytes; `ValueError` when it is not ELF."""
    try:
        from elftools.common.exceptions import ELFError
        from elftools.elf.elffile import ELFFile
    except ImportError as err:  # pragma: no cover - a packaging problem
        raise UserError(
            "pyelftools is missing: reinstall rankwire (pip install pyelftools)"
        ) from err
    if isinstance(source, bytes):
        return _read(io.BytesIO(source), name or "<bytes>", ELFFile, ELFError)
    with open(source, "rb") as f:
        return _read(f, name or source, ELFFile, ELFError)


def _read(stream: BinaryIO, name: str, elffile: type, elferror: type[Exception]) -> ElfFacts:
    if stream.read(4) != b"\x7fELF":
        raise ValueError(f"{name} is not an ELF file")
    stream.seek(0)
    try:
        elf = elffile(stream)
        soname = ""
        needed: list[str] = []
        runpath: list[str] = []
        rpath: list[str] = []
        defines: list[str] = []
        requires: list[tuple[str, tuple[str, ...]]] = []
        for section in elf.iter_sections():
            kind = section["sh_type"]
            if kind == "SHT_DYNAMIC":
                for tag in section.iter_tags():
                    if tag.entry.d_tag == "DT_NEEDED":
                        needed.append(tag.needed)
                    elif tag.entry.d_tag == "DT_SONAME":
                        soname = tag.soname
                    elif tag.entry.d_tag == "DT_RUNPATH":
                        runpath += [p for p in tag.runpath.split(":") if p]
                    elif tag.entry.d_tag == "DT_RPATH":
                        rpath += [p for p in tag.rpath.split(":") if p]
            elif kind == "SHT_GNU_verdef":
                for verdef, auxiliaries in section.iter_versions():
                    names = [aux.name for aux in auxiliaries]
                    if not verdef["vd_flags"] & 0x1 and names:  # VER_FLG_BASE: the soname
                        defines.append(names[0])
            elif kind == "SHT_GNU_verneed":
                for verneed, auxiliaries in section.iter_versions():
                    versions = tuple(sorted({aux.name for aux in auxiliaries}, key=version_key))
                    requires.append((verneed.name, versions))
    except (elferror, KeyError, ValueError, OSError) as err:
        raise ValueError(f"{name}: unreadable ELF ({err})") from None
    return ElfFacts(
        soname=soname,
        needed=tuple(needed),
        runpath=tuple(runpath),
        rpath=tuple(rpath),
        machine=str(elf["e_machine"]),
        elfclass=elf.elfclass,
        defines=tuple(sorted(set(defines), key=version_key)),
        requires=tuple(sorted(requires)),
    )
