"""Small synthetic ELF objects for the ELF reader's tests and fuzz seeds: either class
(32/64-bit), either byte order, with the tables `rankwire.fabric.elf` reads (a dynamic
section, GNU version definitions and needs, dynamic symbols over a PT_LOAD segment).
Nothing runs them: they only have to be what a loader's tables look like."""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence

SHT_PROGBITS, SHT_STRTAB, SHT_DYNAMIC, SHT_DYNSYM = 1, 3, 6, 11
SHT_GNU_VERDEF, SHT_GNU_VERNEED = 0x6FFFFFFD, 0x6FFFFFFE
BASE = 0x400000  # where the one PT_LOAD segment maps the file


class _Strings:
    def __init__(self) -> None:
        self.data = bytearray(b"\0")
        self.at: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        if text not in self.at:
            self.at[text] = len(self.data)
            self.data += text.encode() + b"\0"
        return self.at[text]


def make_elf(
    *,
    wide: bool = True,
    order: str = "<",
    machine: int = 62,
    soname: str = "",
    needed: Sequence[str] = (),
    runpath: str = "",
    rpath: str = "",
    defines: Sequence[str] = (),
    requires: Mapping[str, Sequence[str]] | None = None,
    symbols: Mapping[str, bytes] | None = None,
) -> bytes:
    """The bytes of an ELF object with these tables (`defines`: version definitions
    besides the base one, which names `soname`; `requires`: file → versions needed;
    `symbols`: dynamic symbols and the data each names)."""
    requires = requires or {}
    symbols = symbols or {}
    dynstr = _Strings()
    dyn_fmt = order + ("qQ" if wide else "iI")
    dynamic = b""
    for tag, text in (
        *((1, n) for n in needed),
        *((14, soname),) * bool(soname),
        *((15, rpath),) * bool(rpath),
        *((29, runpath),) * bool(runpath),
    ):
        dynamic += struct.pack(dyn_fmt, tag, dynstr(text))
    dynamic += struct.pack(dyn_fmt, 0, 0)

    verdef = b""
    entries = [(1, soname or "base"), *((0, name) for name in defines)]
    for i, (flags, name) in enumerate(entries):
        last = i == len(entries) - 1
        verdef += struct.pack(order + "HHHHIII", 1, flags, i + 1, 1, 0, 20, 0 if last else 28)
        verdef += struct.pack(order + "II", dynstr(name), 0)

    verneed = b""
    files = list(requires.items())
    for i, (file, versions) in enumerate(files):
        last = i == len(files) - 1
        size = 16 + 16 * len(versions)
        verneed += struct.pack(
            order + "HHIII", 1, len(versions), dynstr(file), 16, 0 if last else size
        )
        for j, version in enumerate(versions):
            nxt = 0 if j == len(versions) - 1 else 16
            verneed += struct.pack(order + "IHHII", 0, 0, j + 2, dynstr(version), nxt)

    data = b"".join(symbols.values())
    sym_fmt = order + ("IBBHQQ" if wide else "IIIBBH")
    names = [dynstr(n) for n in symbols]  # all strings exist before the table is laid out
    shstr = _Strings()
    head_size, ph_size, sh_size = (64, 56, 64) if wide else (52, 32, 40)
    body = bytearray()
    layout: list[tuple[str, int, bytes, int, int]] = []  # name, type, content, link, info

    def add(name: str, kind: int, content: bytes, link: int = 0, info: int = 0) -> None:
        layout.append((name, kind, content, link, info))

    add(".dynstr", SHT_STRTAB, bytes(dynstr.data))
    add(".dynamic", SHT_DYNAMIC, dynamic, link=1)
    add(".gnu.version_d", SHT_GNU_VERDEF, verdef, link=1, info=len(entries))
    if files:
        add(".gnu.version_r", SHT_GNU_VERNEED, verneed, link=1, info=len(files))
    add(".data", SHT_PROGBITS, data)
    offsets = []
    at = head_size + ph_size
    for _, _, content, _, _ in layout:
        offsets.append(at)
        body += content
        at += len(content)
    data_at = offsets[-1]
    dynsym = struct.pack(sym_fmt, *((0,) * 6))
    cursor = data_at
    for name_at, value in zip(names, symbols.values()):
        addr = BASE + cursor
        fields = (
            (name_at, 0x11, 0, 5, addr, len(value))
            if wide
            else (name_at, addr, len(value), 0x11, 0, 5)
        )
        dynsym += struct.pack(sym_fmt, *fields)
        cursor += len(value)
    layout.append((".dynsym", SHT_DYNSYM, dynsym, 1, 1))
    offsets.append(at)
    body += dynsym
    at += len(dynsym)
    for name, *_ in layout:
        shstr(name)
    shstr(".shstrtab")
    layout.append((".shstrtab", SHT_STRTAB, bytes(shstr.data), 0, 0))
    offsets.append(at)
    body += shstr.data
    at += len(shstr.data)
    shoff = at
    total = shoff + sh_size * (len(layout) + 1)

    ident = b"\x7fELF" + bytes([2 if wide else 1, 1 if order == "<" else 2, 1, 0]) + bytes(8)
    head_fmt = order + ("HHIQQQIHHHHHH" if wide else "HHIIIIIHHHHHH")
    head = ident + struct.pack(
        head_fmt, 3, machine, 1, 0, head_size, shoff, 0, head_size, ph_size, 1, sh_size,
        len(layout) + 1, len(layout),
    )  # fmt: skip
    ph_fmt = order + ("IIQQQQQQ" if wide else "IIIIIIII")
    if wide:
        ph = struct.pack(ph_fmt, 1, 5, 0, BASE, BASE, total, total, 0x1000)
    else:
        ph = struct.pack(ph_fmt, 1, 0, BASE, BASE, total, total, 5, 0x1000)
    sh_fmt = order + ("IIQQQQIIQQ" if wide else "IIIIIIIIII")
    sections = struct.pack(sh_fmt, *((0,) * 10))
    entsize = {SHT_DYNAMIC: struct.calcsize(dyn_fmt), SHT_DYNSYM: struct.calcsize(sym_fmt)}
    for (name, kind, content, link, info), offset in zip(layout, offsets):
        sections += struct.pack(
            sh_fmt, shstr(name), kind, 0, BASE + offset, offset, len(content), link, info, 8,
            entsize.get(kind, 0),
        )  # fmt: skip
    out = head + ph + bytes(body) + sections
    assert len(out) == total
    return out
