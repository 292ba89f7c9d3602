"""The libpmix ABI: constants, struct layouts, loading `libpmix.so.2` and checking its layout.

Everything the other modules of this package build on: the pmix_common.h constants, `Proc`
and `PmixError` (what callers see), the ctypes structs (internal to the package: no ctypes
object leaves it), and `lib()`, the loaded and checked library.

Loading: `$RANKWIRE_LIBPMIX` (a path or soname) if set, else `libpmix.so.2` (PMIx 4's
soname, found by the dynamic loader), else whatever `ctypes.util.find_library("pmix")`
names (it runs `ldconfig -p`: ~15 ms, so only as a fallback). It is loaded with
RTLD_GLOBAL because libpmix dlopens its own plugins. The library is loaded, and its layout
checked, on first use (`lib()`), or at import of modules that call it at import.

Layout check: the struct layouts below were measured on x86-64 against the libpmix 4.2.2
headers (pmix_proc_t 260 bytes, pmix_value_t 32 with the union at 8, pmix_info_t 552 with
the value at 520, pmix_data_array_t 24, the 28-slot pmix_server_module_t of PMIx v4). At
load we (1) require `PMIx_Get_version()` to report major version 4 and (2) let the library
itself fill a `pmix_info_t` (`PMIx_Info_load`) with a string and a uint32 and read them back
through our layout. Anything else raises a one-line `UserError`.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from typing import Any, Callable, NamedTuple, Optional

from rankwire.errors import UserError

# -- constants (pmix_common.h, 4.2.2) -------------------------------------------------------
SUCCESS = 0
ERROR = -1
ERR_PROC_ENTRY_NOT_FOUND = -17
ERR_TIMEOUT = -24
ERR_UNREACH = -25
ERR_BAD_PARAM = -27
ERR_INIT = -31
ERR_NOT_FOUND = -46
ERR_NOT_SUPPORTED = -47
ERR_LOST_CONNECTION = -61
OPERATION_SUCCEEDED = -157

RANK_UNDEF = 0xFFFFFFFF
RANK_WILDCARD = 0xFFFFFFFE
RANK_LOCAL_NODE = 0xFFFFFFFD

# data types
UNDEF = 0
BOOL = 1
BYTE = 2
STRING = 3
SIZE = 4
PID = 5
INT = 6
INT8 = 7
INT16 = 8
INT32 = 9
INT64 = 10
UINT = 11
UINT8 = 12
UINT16 = 13
UINT32 = 14
UINT64 = 15
FLOAT = 16
DOUBLE = 17
STATUS = 20
PROC = 22
INFO = 24
BYTE_OBJECT = 27
DATA_ARRAY = 39
PROC_RANK = 40

# scopes for put()
LOCAL = 1
REMOTE = 2
GLOBAL = 3

NSPACE_MAX = 255  # PMIX_MAX_NSLEN
KEY_MAX = 511  # PMIX_MAX_KEYLEN
SUPPORTED_MAJOR = 4
MODULE_SLOTS = 28  # pmix_server_module_t of PMIx v4

# keys used by rankwire (pmix_common.h)
COLLECT_DATA = "pmix.collect"
TIMEOUT = "pmix.timeout"


class Proc(NamedTuple):
    """A process: namespace and rank (RANK_WILDCARD = every rank of the namespace)."""

    nspace: str
    rank: int


class PmixError(Exception):
    """A PMIx call failed; `status` is the PMIx status code."""

    def __init__(self, call: str, status: int) -> None:
        self.call = call
        self.status = status
        super().__init__(f"{call} failed: {error_string(status)} ({status})")


# -- structs --------------------------------------------------------------------------------
class ProcT(ctypes.Structure):
    _fields_ = (("nspace", ctypes.c_char * (NSPACE_MAX + 1)), ("rank", ctypes.c_uint32))


class ByteObject(ctypes.Structure):
    _fields_ = (("bytes", ctypes.c_void_p), ("size", ctypes.c_size_t))


class DataArray(ctypes.Structure):
    _fields_ = (("type", ctypes.c_uint16), ("size", ctypes.c_size_t), ("array", ctypes.c_void_p))


class ValueData(ctypes.Union):
    _fields_ = (
        ("flag", ctypes.c_bool),
        ("byte", ctypes.c_uint8),
        ("string", ctypes.c_void_p),
        ("size", ctypes.c_size_t),
        ("pid", ctypes.c_int32),
        ("integer", ctypes.c_int),
        ("int8", ctypes.c_int8),
        ("int16", ctypes.c_int16),
        ("int32", ctypes.c_int32),
        ("int64", ctypes.c_int64),
        ("uint", ctypes.c_uint),
        ("uint8", ctypes.c_uint8),
        ("uint16", ctypes.c_uint16),
        ("uint32", ctypes.c_uint32),
        ("uint64", ctypes.c_uint64),
        ("fval", ctypes.c_float),
        ("dval", ctypes.c_double),
        ("status", ctypes.c_int),
        ("rank", ctypes.c_uint32),
        ("proc", ctypes.POINTER(ProcT)),
        ("bo", ByteObject),
        ("darray", ctypes.POINTER(DataArray)),
        ("ptr", ctypes.c_void_p),
        ("_largest", ctypes.c_uint8 * 24),  # pmix_envar_t
    )


class ValueT(ctypes.Structure):
    _fields_ = (("type", ctypes.c_uint16), ("data", ValueData))


class InfoT(ctypes.Structure):
    _fields_ = (
        ("key", ctypes.c_char * (KEY_MAX + 1)),
        ("flags", ctypes.c_uint32),
        ("value", ValueT),
    )


_EXPECTED_LAYOUT = {
    "pmix_proc_t": (ctypes.sizeof(ProcT), 260),
    "pmix_value_t": (ctypes.sizeof(ValueT), 32),
    "pmix_value_t.data": (ValueT.data.offset, 8),
    "pmix_info_t": (ctypes.sizeof(InfoT), 552),
    "pmix_info_t.value": (InfoT.value.offset, 520),
    "pmix_data_array_t": (ctypes.sizeof(DataArray), 24),
}


class ServerModule(ctypes.Structure):
    _fields_ = tuple((f"slot{i}", ctypes.c_void_p) for i in range(MODULE_SLOTS))


# -- loading --------------------------------------------------------------------------------
_lib: Optional[ctypes.CDLL] = None
_libc = ctypes.CDLL(None)
_libc.free.argtypes = (ctypes.c_void_p,)
_libc.free.restype = None
_load_lock = threading.Lock()


def free(ptr: Any) -> None:
    """libc free() for what libpmix malloc'ed and handed over to us."""
    _libc.free(ptr)


SONAME = "libpmix.so.2"


def library_name() -> str:
    """What `lib()` loads: $RANKWIRE_LIBPMIX, else libpmix.so.2 when the loader finds it,
    else ldconfig's answer."""
    override = os.environ.get("RANKWIRE_LIBPMIX")
    if override:
        return override
    try:
        ctypes.CDLL(SONAME, mode=ctypes.RTLD_GLOBAL)  # loaded once: `lib()` reuses it
        return SONAME
    except OSError:
        from ctypes.util import find_library  # subprocess, tempfile, … (≈ 5 ms): a fallback

        return find_library("pmix") or SONAME


def _declare(lib: ctypes.CDLL) -> None:
    c_int, c_void_p, c_size_t, c_char_p = (
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_char_p,
    )
    pproc, pinfo, pval = ctypes.POINTER(ProcT), ctypes.POINTER(InfoT), ctypes.POINTER(ValueT)
    sigs: dict[str, tuple[Any, tuple[Any, ...]]] = {
        "PMIx_Get_version": (c_char_p, ()),
        "PMIx_Error_string": (c_char_p, (c_int,)),
        "PMIx_Info_load": (c_int, (pinfo, c_char_p, c_void_p, ctypes.c_uint16)),
        "PMIx_Value_load": (c_int, (pval, c_void_p, ctypes.c_uint16)),
        "PMIx_Value_destruct": (None, (pval,)),
        "PMIx_server_init": (c_int, (ctypes.POINTER(ServerModule), pinfo, c_size_t)),
        "PMIx_server_finalize": (c_int, ()),
        "PMIx_server_register_nspace": (
            c_int, (c_char_p, c_int, pinfo, c_size_t, c_void_p, c_void_p),
        ),
        "PMIx_server_register_client": (
            c_int, (pproc, ctypes.c_uint32, ctypes.c_uint32, c_void_p, c_void_p, c_void_p),
        ),
        "PMIx_server_deregister_nspace": (None, (c_char_p, c_void_p, c_void_p)),
        "PMIx_server_deregister_client": (None, (pproc, c_void_p, c_void_p)),
        "PMIx_server_setup_fork": (c_int, (pproc, ctypes.POINTER(ctypes.POINTER(c_void_p)))),
        "PMIx_server_dmodex_request": (c_int, (pproc, c_void_p, c_void_p)),
        "PMIx_generate_regex": (c_int, (c_char_p, ctypes.POINTER(c_void_p))),
        "PMIx_generate_ppn": (c_int, (c_char_p, ctypes.POINTER(c_void_p))),
        "PMIx_Init": (c_int, (pproc, pinfo, c_size_t)),
        "PMIx_Finalize": (c_int, (pinfo, c_size_t)),
        "PMIx_Initialized": (c_int, ()),
        "PMIx_Put": (c_int, (ctypes.c_uint8, c_char_p, pval)),
        "PMIx_Commit": (c_int, ()),
        "PMIx_Fence": (c_int, (pproc, c_size_t, pinfo, c_size_t)),
        "PMIx_Get": (c_int, (pproc, c_char_p, pinfo, c_size_t, ctypes.POINTER(pval))),
        "PMIx_Abort": (c_int, (c_int, c_char_p, pproc, c_size_t)),
    }  # fmt: skip
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes


def parse_version(text: str) -> tuple[int, int, int]:
    """`"OpenPMIx 4.2.2rc2 (...)"` → (4, 2, 2); raises ValueError when there is none."""
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        raise ValueError(f"no version number in {text!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def check_layout(version_text: str, probe: Optional[Callable[[], None]] = None) -> None:
    """Raise UserError unless the library version and our struct layout are the known ones."""
    for what, (got, want) in _EXPECTED_LAYOUT.items():
        if got != want:  # only possible on an ABI other than x86-64/aarch64 LP64
            raise UserError(
                f"{what} is {got} bytes here, rankwire's PMIx bindings assume {want}: "
                "this platform is not supported"
            )
    try:
        major = parse_version(version_text)[0]
    except ValueError:
        major = None
    if major != SUPPORTED_MAJOR:
        raise UserError(
            f"libpmix reports version {version_text!r}; rankwire's PMIx bindings know the "
            f"layouts of PMIx {SUPPORTED_MAJOR}.x only: install libpmix2 4.x or set "
            "RANKWIRE_LIBPMIX to a PMIx 4 library"
        )
    if probe is not None:
        probe()


def _probe_layout(lib: ctypes.CDLL) -> None:
    """Let libpmix fill pmix_info_t values and read them back through our layout."""
    info = InfoT()
    text = b"rankwire-layout-probe"
    number = ctypes.c_uint32(0xA5C3_1234)
    ok = True
    for data, typ in ((ctypes.c_char_p(text), STRING), (ctypes.pointer(number), UINT32)):
        rc = lib.PMIx_Info_load(
            ctypes.byref(info), b"rankwire.probe", ctypes.cast(data, ctypes.c_void_p), typ
        )
        if rc != SUCCESS or info.key != b"rankwire.probe" or info.value.type != typ:
            ok = False
        elif typ == STRING:
            ok = ok and ctypes.string_at(info.value.data.string) == text
        else:
            ok = ok and info.value.data.uint32 == number.value
        lib.PMIx_Value_destruct(ctypes.byref(info.value))
    if not ok:
        raise UserError(
            f"libpmix ({library_name()}) does not store pmix_info_t the way rankwire's "
            "bindings expect: use the distribution's libpmix2 4.x (set RANKWIRE_LIBPMIX)"
        )


def lib() -> ctypes.CDLL:
    """The loaded, layout-checked libpmix (loaded once per process)."""
    global _lib
    with _load_lock:
        if _lib is None:
            name = library_name()
            try:
                loaded = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            except OSError as err:
                raise UserError(
                    f"cannot load the PMIx library {name!r} ({err}): install libpmix2 or set "
                    "RANKWIRE_LIBPMIX to its path"
                ) from err
            try:
                _declare(loaded)
            except AttributeError as err:
                raise UserError(
                    f"{name} lacks a PMIx 4 symbol ({err}): it is not libpmix 4.x"
                ) from err
            text = (loaded.PMIx_Get_version() or b"").decode(errors="replace")
            check_layout(text, lambda: _probe_layout(loaded))
            _lib = loaded
        return _lib


def version() -> str:
    """The library's version string, e.g. `OpenPMIx 4.2.2rc2 (PMIx Standard: 4.2, ...)`."""
    return (lib().PMIx_Get_version() or b"").decode(errors="replace")


def error_string(status: int) -> str:
    if _lib is None:
        return f"PMIx status {status}"
    text = _lib.PMIx_Error_string(status)
    return text.decode(errors="replace") if text else f"PMIx status {status}"


def check(call: str, rc: int) -> None:
    if rc != SUCCESS and rc != OPERATION_SUCCEEDED:
        raise PmixError(call, rc)
