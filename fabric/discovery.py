"""libfabric discovery as plain data: which library, which providers, which endpoints.

Backed by the cffi ABI-mode binding in `_ffi.py`; callers see frozen dataclasses only.
A missing libfabric is a `UserError`.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from rankwire.errors import UserError
from rankwire.fabric import _ffi
from rankwire.record import record

FI_ENODATA = 61
FI_PROV_ATTR_ONLY = 1 << 54
FI_TYPE_CAPS = 2
FI_TYPE_MR_MODE = 21
ENDPOINT_TYPES = {"unspec": 0, "msg": 1, "dgram": 2, "rdm": 3}
CAPS = {"msg": 1 << 1, "rma": 1 << 2, "tagged": 1 << 3, "atomic": 1 << 4}
_LINK_STATES = {0: "unknown", 1: "down", 2: "up"}
# The struct layout we read is 1.17's: never ask for a newer API than that.
API_VERSION = (1 << 16) | 17


def fi_version(major: int, minor: int) -> int:
    return (major << 16) | minor


def version_text(version: int) -> str:
    return f"{version >> 16}.{version & 0xFFFF}"


@record
class NicInfo:
    """`fi_info->nic`; filled by hardware providers (verbs, efa, cxi), NULL for tcp/shm."""

    name: str
    device_id: str
    vendor_id: str
    driver: str
    firmware: str
    pci: str  # "0000:3b:00.0", "" when the bus is not PCI
    link_state: str  # up | down | unknown
    network_type: str
    mtu: int
    speed: int


@record
class FabricInfo:
    """One `fi_info` entry: a provider on a fabric/domain with an endpoint type."""

    provider: str  # as reported, e.g. "tcp;ofi_rxm"
    provider_version: str
    fabric: str
    domain: str
    endpoint_type: str  # rdm | msg | dgram | ...
    caps: tuple[str, ...]  # FI_MSG, FI_TAGGED, ... as libfabric names them
    mr_mode: tuple[str, ...]
    max_msg_size: int
    inject_size: int
    nic: Optional[NicInfo]

    @property
    def core_provider(self) -> str:
        """ "tcp;ofi_rxm" -> "tcp": the name FI_PROVIDER filters on."""
        return self.provider.split(";", 1)[0]


@record
class Library:
    path: str  # the file the dynamic loader picked, as mapped in this process
    version: str  # "1.17"


def _strerror(ret: int) -> str:
    ffi, lib = _ffi.load()
    return str(ffi.string(lib.fi_strerror(-ret)).decode())


def _text(ffi: Any, ptr: Any) -> str:
    return ffi.string(ptr).decode(errors="replace") if ptr != ffi.NULL else ""


def _flags(ffi: Any, lib: Any, value: int, kind: int) -> tuple[str, ...]:
    box = ffi.new("uint64_t *", value) if kind == FI_TYPE_CAPS else ffi.new("int *", value)
    text = _text(ffi, lib.fi_tostr(box, kind))
    return tuple(part.strip() for part in re.split(r"[|,]", text) if part.strip())


def library() -> Library:
    """The loaded libfabric: its path (from /proc/self/maps) and runtime version."""
    ffi, lib = _ffi.load()
    addr = int(ffi.cast("uintptr_t", ffi.addressof(lib, "fi_getinfo")))
    path = _mapped_path(addr) or _ffi.SONAME
    return Library(path=path, version=version_text(lib.fi_version()))


def _mapped_path(addr: int) -> str:
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) < 6:
                    continue
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo <= addr < hi:
                    return fields[5].strip()
    except OSError:
        pass
    return ""


def _request_version() -> int:
    lib = _ffi.load()[1]
    return min(int(lib.fi_version()), API_VERSION)


def providers() -> tuple[str, ...]:
    """Registered provider names, like `fi_info -l` (registered is not always usable)."""
    ffi, lib = _ffi.load()
    out = ffi.new("struct fi_info **")
    ret = lib.fi_getinfo(_request_version(), ffi.NULL, ffi.NULL, FI_PROV_ATTR_ONLY, ffi.NULL, out)
    if ret == -FI_ENODATA:
        return ()
    if ret != 0:
        raise UserError(f"fi_getinfo failed: {_strerror(ret)}; run `fi_info -l` to see why")
    names: list[str] = []
    try:
        cur = out[0]
        while cur != ffi.NULL:
            name = _text(ffi, cur.fabric_attr.prov_name)
            if name and name not in names:
                names.append(name)
            cur = cur.next
    finally:
        lib.fi_freeinfo(out[0])
    return tuple(names)


def getinfo(
    provider: Optional[str] = None,
    endpoint: str = "rdm",
    caps: tuple[str, ...] = ("msg", "tagged"),
) -> tuple[FabricInfo, ...]:
    """Usable endpoints (a real fi_getinfo with hints), most preferred first."""
    if endpoint not in ENDPOINT_TYPES:
        raise UserError(f"unknown endpoint type '{endpoint}': use one of rdm, msg, dgram")
    ffi, lib = _ffi.load()
    hints = lib.fi_dupinfo(ffi.NULL)  # fi_allocinfo() is an inline wrapper of this
    if hints == ffi.NULL:
        raise MemoryError("fi_dupinfo(NULL) failed")
    name = ffi.new("char[]", provider.encode()) if provider else ffi.NULL
    out = ffi.new("struct fi_info **")
    try:
        hints.ep_attr.type = ENDPOINT_TYPES[endpoint]
        hints.caps = sum(CAPS[c] for c in caps)
        hints.fabric_attr.prov_name = name
        ret = lib.fi_getinfo(_request_version(), ffi.NULL, ffi.NULL, 0, hints, out)
    finally:
        hints.fabric_attr.prov_name = ffi.NULL  # ours, not libfabric's to free
        lib.fi_freeinfo(hints)
    if ret == -FI_ENODATA:
        return ()
    if ret != 0:
        raise UserError(f"fi_getinfo failed: {_strerror(ret)}; run `fi_info` to see why")
    found: list[FabricInfo] = []
    try:
        cur = out[0]
        while cur != ffi.NULL:
            found.append(_info(ffi, lib, cur))
            cur = cur.next
    finally:
        lib.fi_freeinfo(out[0])
    return tuple(found)


def _info(ffi: Any, lib: Any, info: Any) -> FabricInfo:
    ep_type = info.ep_attr.type if info.ep_attr != ffi.NULL else 0
    names = {v: k for k, v in ENDPOINT_TYPES.items()}
    domain = info.domain_attr
    return FabricInfo(
        provider=_text(ffi, info.fabric_attr.prov_name),
        provider_version=version_text(info.fabric_attr.prov_version),
        fabric=_text(ffi, info.fabric_attr.name),
        domain=_text(ffi, domain.name) if domain != ffi.NULL else "",
        endpoint_type=names.get(ep_type, str(ep_type)),
        caps=_flags(ffi, lib, info.caps, FI_TYPE_CAPS),
        mr_mode=_flags(ffi, lib, domain.mr_mode, FI_TYPE_MR_MODE) if domain != ffi.NULL else (),
        max_msg_size=int(info.ep_attr.max_msg_size) if info.ep_attr != ffi.NULL else 0,
        inject_size=int(info.tx_attr.inject_size) if info.tx_attr != ffi.NULL else 0,
        nic=_nic(ffi, info.nic) if info.nic != ffi.NULL else None,
    )


def _nic(ffi: Any, nic: Any) -> NicInfo:
    dev, bus, link = nic.device_attr, nic.bus_attr, nic.link_attr
    pci = ""
    if bus != ffi.NULL and bus.bus_type == 1:  # FI_BUS_PCI
        p = bus.attr.pci
        pci = f"{p.domain_id:04x}:{p.bus_id:02x}:{p.device_id:02x}.{p.function_id:x}"
    has_dev, has_link = dev != ffi.NULL, link != ffi.NULL
    return NicInfo(
        name=_text(ffi, dev.name) if has_dev else "",
        device_id=_text(ffi, dev.device_id) if has_dev else "",
        vendor_id=_text(ffi, dev.vendor_id) if has_dev else "",
        driver=_text(ffi, dev.driver) if has_dev else "",
        firmware=_text(ffi, dev.firmware) if has_dev else "",
        pci=pci,
        link_state=_LINK_STATES.get(link.state, "unknown") if has_link else "unknown",
        network_type=_text(ffi, link.network_type) if has_link else "",
        mtu=int(link.mtu) if has_link else 0,
        speed=int(link.speed) if has_link else 0,
    )
