"""ctypes bindings over OpenPMIx `libpmix.so.2`: types, the server API and the client API.

Python objects in, Python objects out: callers see `Proc`, `Typed`, `dict`, `bytes`, `str`
and `PmixError`; no ctypes object leaves this module.

Loading: `$RANKWIRE_LIBPMIX` (a path or soname) if set, else whatever
`ctypes.util.find_library("pmix")` (ldconfig) names, else `libpmix.so.2`. It is loaded with
RTLD_GLOBAL because libpmix dlopens its own plugins. The library is loaded, and its layout
checked, on first use (`lib()`), or at import of modules that call it at import.

Layout check: the struct layouts below were measured on x86-64 against the libpmix 4.2.2
headers (pmix_proc_t 260 bytes, pmix_value_t 32 with the union at 8, pmix_info_t 552 with
the value at 520, pmix_data_array_t 24, the 28-slot pmix_server_module_t of PMIx v4). At
load we (1) require `PMIx_Get_version()` to report major version 4 and (2) let the library
itself fill a `pmix_info_t` (`PMIx_Info_load`) with a string and a uint32 and read them back
through our layout. Anything else raises a one-line `UserError`.

Threading: libpmix calls the server callbacks on its own progress thread. Every callback is
wrapped so that a Python exception never crosses into C: it is logged (logger
`rankwire.pmi.pmix`) and the upcall returns an error status to the library. Completion
functions (`reply` objects) may be called from any thread; libpmix thread-shifts them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable, NamedTuple, Optional, Union

from rankwire.errors import UserError

log = logging.getLogger("rankwire.pmi.pmix")

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


@dataclasses.dataclass(frozen=True)
class Typed:
    """A value with an explicit PMIx data type, e.g. `Typed(UINT16, 3)`."""

    type: int
    value: Any


@dataclasses.dataclass(frozen=True)
class Opaque:
    """A value of a type these bindings do not decode."""

    type: int


class PmixError(Exception):
    """A PMIx call failed; `status` is the PMIx status code."""

    def __init__(self, call: str, status: int) -> None:
        self.call = call
        self.status = status
        super().__init__(f"{call} failed: {error_string(status)} ({status})")


# -- structs --------------------------------------------------------------------------------
class _ProcT(ctypes.Structure):
    _fields_ = (("nspace", ctypes.c_char * (NSPACE_MAX + 1)), ("rank", ctypes.c_uint32))


class _ByteObject(ctypes.Structure):
    _fields_ = (("bytes", ctypes.c_void_p), ("size", ctypes.c_size_t))


class _DataArray(ctypes.Structure):
    _fields_ = (("type", ctypes.c_uint16), ("size", ctypes.c_size_t), ("array", ctypes.c_void_p))


class _ValueData(ctypes.Union):
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
        ("proc", ctypes.POINTER(_ProcT)),
        ("bo", _ByteObject),
        ("darray", ctypes.POINTER(_DataArray)),
        ("ptr", ctypes.c_void_p),
        ("_largest", ctypes.c_uint8 * 24),  # pmix_envar_t
    )


class _ValueT(ctypes.Structure):
    _fields_ = (("type", ctypes.c_uint16), ("data", _ValueData))


class _InfoT(ctypes.Structure):
    _fields_ = (
        ("key", ctypes.c_char * (KEY_MAX + 1)),
        ("flags", ctypes.c_uint32),
        ("value", _ValueT),
    )


_EXPECTED_LAYOUT = {
    "pmix_proc_t": (ctypes.sizeof(_ProcT), 260),
    "pmix_value_t": (ctypes.sizeof(_ValueT), 32),
    "pmix_value_t.data": (_ValueT.data.offset, 8),
    "pmix_info_t": (ctypes.sizeof(_InfoT), 552),
    "pmix_info_t.value": (_InfoT.value.offset, 520),
    "pmix_data_array_t": (ctypes.sizeof(_DataArray), 24),
}

# callback types (pmix_common.h / pmix_server.h)
_OpCb = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p)
_ReleaseCb = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_ModexCb = ctypes.CFUNCTYPE(
    None, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p,
    ctypes.c_void_p,
)  # fmt: skip
_DmodexResponseCb = ctypes.CFUNCTYPE(
    None, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p
)
_ClientConnectedFn = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(_ProcT), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p
)
_AbortFn = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(_ProcT), ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p,
    ctypes.POINTER(_ProcT), ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p,
)  # fmt: skip
_FenceFn = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(_ProcT), ctypes.c_size_t, ctypes.POINTER(_InfoT),
    ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p,
)  # fmt: skip
_DmodexFn = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(_ProcT), ctypes.POINTER(_InfoT), ctypes.c_size_t,
    ctypes.c_void_p, ctypes.c_void_p,
)  # fmt: skip


_JobControlFn = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(_ProcT), ctypes.POINTER(_ProcT), ctypes.c_size_t,
    ctypes.POINTER(_InfoT), ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p,
)  # fmt: skip


class _ServerModule(ctypes.Structure):
    _fields_ = tuple((f"slot{i}", ctypes.c_void_p) for i in range(MODULE_SLOTS))


_MODULE_ORDER = ("client_connected", "client_finalized", "abort", "fence_nb", "direct_modex")
_JOB_CONTROL_SLOT = 19

# -- loading --------------------------------------------------------------------------------
_lib: Optional[ctypes.CDLL] = None
_libc = ctypes.CDLL(None)
_libc.free.argtypes = (ctypes.c_void_p,)
_libc.free.restype = None
_load_lock = threading.Lock()


def library_name() -> str:
    """What `lib()` loads: $RANKWIRE_LIBPMIX, else ldconfig's answer, else libpmix.so.2."""
    override = os.environ.get("RANKWIRE_LIBPMIX")
    if override:
        return override
    return ctypes.util.find_library("pmix") or "libpmix.so.2"


def _declare(lib: ctypes.CDLL) -> None:
    c_int, c_void_p, c_size_t, c_char_p = (
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_char_p,
    )
    pproc, pinfo, pval = ctypes.POINTER(_ProcT), ctypes.POINTER(_InfoT), ctypes.POINTER(_ValueT)
    sigs: dict[str, tuple[Any, tuple[Any, ...]]] = {
        "PMIx_Get_version": (c_char_p, ()),
        "PMIx_Error_string": (c_char_p, (c_int,)),
        "PMIx_Info_load": (c_int, (pinfo, c_char_p, c_void_p, ctypes.c_uint16)),
        "PMIx_Value_load": (c_int, (pval, c_void_p, ctypes.c_uint16)),
        "PMIx_Value_destruct": (None, (pval,)),
        "PMIx_server_init": (c_int, (ctypes.POINTER(_ServerModule), pinfo, c_size_t)),
        "PMIx_server_finalize": (c_int, ()),
        "PMIx_server_register_nspace": (
            c_int, (c_char_p, c_int, pinfo, c_size_t, c_void_p, c_void_p),
        ),
        "PMIx_server_register_client": (
            c_int, (pproc, ctypes.c_uint32, ctypes.c_uint32, c_void_p, c_void_p, c_void_p),
        ),
        "PMIx_server_deregister_nspace": (None, (c_char_p, c_void_p, c_void_p)),
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
    info = _InfoT()
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


def _check(call: str, rc: int) -> None:
    if rc != SUCCESS and rc != OPERATION_SUCCEEDED:
        raise PmixError(call, rc)


# -- Python <-> pmix values ------------------------------------------------------------------
_CTYPE_OF = {
    BOOL: ctypes.c_bool, BYTE: ctypes.c_uint8, SIZE: ctypes.c_size_t, PID: ctypes.c_int32,
    INT: ctypes.c_int, INT8: ctypes.c_int8, INT16: ctypes.c_int16, INT32: ctypes.c_int32,
    INT64: ctypes.c_int64, UINT: ctypes.c_uint, UINT8: ctypes.c_uint8, UINT16: ctypes.c_uint16,
    UINT32: ctypes.c_uint32, UINT64: ctypes.c_uint64, FLOAT: ctypes.c_float,
    DOUBLE: ctypes.c_double, STATUS: ctypes.c_int, PROC_RANK: ctypes.c_uint32,
}  # fmt: skip
_FIELD_OF = {
    BOOL: "flag", BYTE: "byte", SIZE: "size", PID: "pid", INT: "integer", INT8: "int8",
    INT16: "int16", INT32: "int32", INT64: "int64", UINT: "uint", UINT8: "uint8",
    UINT16: "uint16", UINT32: "uint32", UINT64: "uint64", FLOAT: "fval", DOUBLE: "dval",
    STATUS: "status", PROC_RANK: "rank",
}  # fmt: skip

InfoLike = Union[Mapping[str, Any], Iterable[tuple[str, Any]]]


def _typed(value: Any) -> Typed:
    """Default types: bool → BOOL, int → UINT32, float → DOUBLE, str → STRING,
    bytes → BYTE_OBJECT, Proc → PROC, a Mapping/list of pairs → DATA_ARRAY of INFO."""
    if isinstance(value, Typed):
        return value
    if isinstance(value, bool):
        return Typed(BOOL, value)
    if isinstance(value, int):
        return Typed(UINT32, value)
    if isinstance(value, float):
        return Typed(DOUBLE, value)
    if isinstance(value, str):
        return Typed(STRING, value)
    if isinstance(value, (bytes, bytearray)):
        return Typed(BYTE_OBJECT, bytes(value))
    if isinstance(value, Proc):
        return Typed(PROC, value)
    if isinstance(value, (Mapping, list, tuple)):
        return Typed(DATA_ARRAY, value)
    raise TypeError(f"no PMIx type for {type(value).__name__} {value!r}")


def _make_proc(proc: Proc) -> _ProcT:
    ns = proc.nspace.encode()
    if len(ns) > NSPACE_MAX:
        raise ValueError(f"namespace longer than {NSPACE_MAX} bytes: {proc.nspace!r}")
    return _ProcT(ns, proc.rank)


def _pairs(info: Optional[InfoLike]) -> list[tuple[str, Any]]:
    if info is None:
        return []
    return list(info.items()) if isinstance(info, Mapping) else list(info)


def _load_value(loader: Callable[[ctypes.c_void_p, int], int], value: Any, keep: list[Any]) -> None:
    """Call `loader(pointer-to-data, type)` the way PMIx_Info_load / PMIx_Value_load want it:
    a STRING as the char* itself, every other type as a pointer to the data."""
    t = _typed(value)
    if t.type == STRING:
        ptr: Any = ctypes.c_char_p(str(t.value).encode())
    elif t.type in _CTYPE_OF:
        ptr = ctypes.pointer(_CTYPE_OF[t.type](t.value))
    elif t.type == BYTE_OBJECT:
        buf = ctypes.create_string_buffer(bytes(t.value), len(t.value))
        keep.append(buf)
        ptr = ctypes.pointer(_ByteObject(ctypes.addressof(buf), len(t.value)))
    elif t.type == PROC:
        ptr = ctypes.pointer(_make_proc(t.value))
    elif t.type == DATA_ARRAY:
        items = InfoArray(t.value)  # a DATA_ARRAY of INFO; the library deep-copies it
        keep.append(items)
        ptr = ctypes.pointer(_DataArray(INFO, len(items), items.address))
    else:
        raise TypeError(f"cannot load PMIx type {t.type}")
    keep.append(ptr)
    rc = loader(ctypes.cast(ptr, ctypes.c_void_p), t.type)
    _check("loading a PMIx value", rc)


class InfoArray:
    """A C `pmix_info_t[]` built from Python pairs; `close()` frees what libpmix copied in."""

    def __init__(self, info: Optional[InfoLike]) -> None:
        pairs = _pairs(info)
        self._array = (_InfoT * max(len(pairs), 1))()
        self._n = 0
        keep: list[Any] = []
        try:
            for i, (key, value) in enumerate(pairs):
                k = key.encode()
                if len(k) > KEY_MAX:
                    raise ValueError(f"PMIx key longer than {KEY_MAX} bytes: {key!r}")
                entry = self._array[i]
                _load_value(
                    lambda p, t, e=entry, k=k: lib().PMIx_Info_load(ctypes.byref(e), k, p, t),
                    value,
                    keep,
                )
                self._n = i + 1
        except BaseException:
            self.close()
            raise
        finally:
            for item in keep:
                if isinstance(item, InfoArray):
                    item.close()

    def __len__(self) -> int:
        return self._n

    @property
    def address(self) -> Optional[int]:
        return ctypes.addressof(self._array) if self._n else None

    @property
    def pointer(self) -> Any:
        return ctypes.cast(self._array, ctypes.POINTER(_InfoT)) if self._n else None

    def close(self) -> None:
        for i in range(self._n):
            lib().PMIx_Value_destruct(ctypes.byref(self._array[i].value))
        self._n = 0

    def __enter__(self) -> InfoArray:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _decode_value(v: _ValueT, depth: int = 0) -> Any:
    t = v.type
    d = v.data
    if t in _FIELD_OF:
        return getattr(d, _FIELD_OF[t])
    if t == STRING:
        return ctypes.string_at(d.string).decode(errors="replace") if d.string else ""
    if t == BYTE_OBJECT:
        return ctypes.string_at(d.bo.bytes, d.bo.size) if d.bo.bytes else b""
    if t == PROC:
        return _proc_from(d.proc.contents) if d.proc else None
    if t == DATA_ARRAY and d.darray and depth < 8:
        return _decode_array(d.darray.contents, depth + 1)
    return Opaque(t)


def _decode_array(arr: _DataArray, depth: int) -> Any:
    if not arr.array or not arr.size:
        return []
    if arr.type == INFO:
        infos = ctypes.cast(arr.array, ctypes.POINTER(_InfoT))
        return {
            infos[i].key.decode(errors="replace"): _decode_value(infos[i].value, depth)
            for i in range(arr.size)
        }
    if arr.type == PROC:
        procs = ctypes.cast(arr.array, ctypes.POINTER(_ProcT))
        return [_proc_from(procs[i]) for i in range(arr.size)]
    if arr.type == STRING:
        strs = ctypes.cast(arr.array, ctypes.POINTER(ctypes.c_char_p))
        return [(strs[i] or b"").decode(errors="replace") for i in range(arr.size)]
    if arr.type in _CTYPE_OF:
        items = ctypes.cast(arr.array, ctypes.POINTER(_CTYPE_OF[arr.type]))
        return [items[i] for i in range(arr.size)]
    return Opaque(DATA_ARRAY)


def _proc_from(p: _ProcT) -> Proc:
    return Proc(p.nspace.decode(errors="replace"), p.rank)


def _procs_from(ptr: Any, n: int) -> list[Proc]:
    return [_proc_from(ptr[i]) for i in range(n)] if ptr else []


def _info_from(ptr: Any, n: int) -> dict[str, Any]:
    return (
        {ptr[i].key.decode(errors="replace"): _decode_value(ptr[i].value) for i in range(n)}
        if ptr
        else {}
    )


def _free_argv(argv: Any) -> dict[str, str]:
    """Turn a malloc'ed NULL-terminated `char**` of K=V into a dict and free it."""
    env: dict[str, str] = {}
    if not argv:
        return env
    i = 0
    while argv[i]:
        text = ctypes.string_at(argv[i]).decode(errors="replace")
        key, _, val = text.partition("=")
        env[key] = val
        _libc.free(argv[i])
        i += 1
    _libc.free(ctypes.cast(argv, ctypes.c_void_p))
    return env


def _take_string(ptr: ctypes.c_void_p) -> str:
    if not ptr.value:
        return ""
    text = ctypes.string_at(ptr.value).decode(errors="replace")
    _libc.free(ptr)
    return text


# -- server ----------------------------------------------------------------------------------
ModexReply = Callable[[int, bytes], None]


class ServerHandlers:
    """Override what you need; every method runs on libpmix's progress thread.

    `client_connected`, `client_finalized`, `abort` complete when they return (raise to
    answer an error). `fence` and `direct_modex` must call `reply(status, data)` exactly
    once, now or later, from any thread. An exception in any of them is logged and answered
    with PMIX_ERROR; it never reaches C.
    """

    def client_connected(self, proc: Proc) -> None:
        pass

    def client_finalized(self, proc: Proc) -> None:
        pass

    def abort(self, proc: Proc, status: int, message: str, procs: list[Proc]) -> None:
        pass

    def fence(
        self, procs: list[Proc], info: dict[str, Any], data: bytes, reply: ModexReply
    ) -> None:
        reply(SUCCESS, data)  # one node: the local blob is everything

    def direct_modex(self, proc: Proc, info: dict[str, Any], reply: ModexReply) -> None:
        reply(ERR_NOT_FOUND, b"")

    def job_control(self, requestor: Proc, targets: list[Proc], directives: dict[str, Any]) -> int:
        """A job-control request libpmix could not handle itself; return a status.

        The upcall must exist even if it refuses everything: only then does libpmix 4.2
        accept clients' PMIX_REGISTER_CLEANUP requests and remove those files when the
        client goes away (without it Open MPI 5 leaves its sm_segment.* in /dev/shm)."""
        return ERR_NOT_SUPPORTED


class _ModexReplier:
    """A once-only `reply(status, data)` for a modex_cbfunc: the data buffer stays alive
    until libpmix calls our release function."""

    def __init__(self, owner: Server, cbfunc: int, cbdata: int, what: str) -> None:
        self.owner = owner
        self.cbfunc = _ModexCb(cbfunc)
        self.cbdata = cbdata
        self.what = what
        self.called = False
        self._lock = threading.Lock()

    def __call__(self, status: int, data: bytes = b"") -> None:
        with self._lock:
            if self.called:
                log.warning("PMIx %s answered twice; ignoring the second answer", self.what)
                return
            self.called = True
        if not data:
            self.cbfunc(status, None, 0, self.cbdata, None, None)
            return
        buf = ctypes.create_string_buffer(data, len(data))
        token = self.owner._hold(buf)  # alive until libpmix calls release_fn(token)
        release = ctypes.cast(self.owner._release_cb, ctypes.c_void_p)
        self.cbfunc(status, ctypes.addressof(buf), len(data), self.cbdata, release, token)


def _blocking_op(call: str, start: Callable[[Any, Any], int], timeout: float = 30.0) -> None:
    """Run a libpmix call that completes through a pmix_op_cbfunc_t, and wait for it."""
    done = threading.Event()
    result: list[int] = []

    def cb(status: int, _cbdata: Any) -> None:
        result.append(status)
        done.set()

    cbfn = _OpCb(cb)
    rc = start(ctypes.cast(cbfn, ctypes.c_void_p), None)
    if rc == OPERATION_SUCCEEDED:
        return
    _check(call, rc)
    if not done.wait(timeout):
        raise PmixError(call, ERR_TIMEOUT)
    _check(call, result[0])


class Server:
    """The PMIx server library in this process (one per process, libpmix is a singleton).

    `Server(handlers, info)` calls PMIx_server_init with a module holding the five upcalls
    client_connected, client_finalized, abort, fence_nb, direct_modex and job_control (the
    other 22 slots are NULL = unsupported). `info` is e.g. `{"pmix.srvr.tmpdir": "/tmp/x",
    "pmix.srvr.sys": False}`.
    """

    def __init__(self, handlers: ServerHandlers, info: Optional[InfoLike] = None) -> None:
        self.handlers = handlers
        self._held: dict[int, Any] = {}
        self._held_lock = threading.Lock()
        self._next_token = 1
        self._callbacks = {
            "client_connected": _ClientConnectedFn(self._client_connected),
            "client_finalized": _ClientConnectedFn(self._client_finalized),
            "abort": _AbortFn(self._abort),
            "fence_nb": _FenceFn(self._fence_nb),
            "direct_modex": _DmodexFn(self._direct_modex),
        }
        self._job_control_cb = _JobControlFn(self._job_control)
        self._release_cb = _ReleaseCb(self._release)
        self._dmodex_cb = _DmodexResponseCb(self._dmodex_response)
        self._module = _ServerModule()
        for i, name in enumerate(_MODULE_ORDER):
            setattr(self._module, f"slot{i}", ctypes.cast(self._callbacks[name], ctypes.c_void_p))
        setattr(
            self._module,
            f"slot{_JOB_CONTROL_SLOT}",
            ctypes.cast(self._job_control_cb, ctypes.c_void_p),
        )
        self.active = False
        with InfoArray(info) as arr:
            _check(
                "PMIx_server_init",
                lib().PMIx_server_init(ctypes.byref(self._module), arr.pointer, len(arr)),
            )
        self.active = True

    # data handed to libpmix stays referenced until its release callback
    def _hold(self, obj: Any) -> int:
        with self._held_lock:
            token = self._next_token
            self._next_token += 1
            self._held[token] = obj
            return token

    def _release(self, cbdata: Any) -> None:
        with self._held_lock:
            self._held.pop(cbdata or 0, None)

    # -- upcalls (progress thread) --------------------------------------------------------
    def _guard(self, what: str, fn: Callable[[], int]) -> int:
        try:
            return fn()
        except BaseException:  # never let anything unwind into C
            log.exception("PMIx %s callback failed", what)
            return ERROR

    def _op_done(self, cbfunc: Any, cbdata: Any) -> int:
        if cbfunc:
            _OpCb(cbfunc)(SUCCESS, cbdata)
            return SUCCESS
        return OPERATION_SUCCEEDED

    def _client_connected(self, proc: Any, _obj: Any, cbfunc: Any, cbdata: Any) -> int:
        def run() -> int:
            self.handlers.client_connected(_proc_from(proc.contents))
            return self._op_done(cbfunc, cbdata)

        return self._guard("client_connected", run)

    def _client_finalized(self, proc: Any, _obj: Any, cbfunc: Any, cbdata: Any) -> int:
        def run() -> int:
            self.handlers.client_finalized(_proc_from(proc.contents))
            return self._op_done(cbfunc, cbdata)

        return self._guard("client_finalized", run)

    def _abort(
        self, proc: Any, _obj: Any, status: int, msg: Any, procs: Any, nprocs: int,
        cbfunc: Any, cbdata: Any,
    ) -> int:  # fmt: skip
        def run() -> int:
            text = msg.decode(errors="replace") if msg else ""
            self.handlers.abort(_proc_from(proc.contents), status, text, _procs_from(procs, nprocs))
            return self._op_done(cbfunc, cbdata)

        return self._guard("abort", run)

    def _fence_nb(
        self, procs: Any, nprocs: int, info: Any, ninfo: int, data: Any, ndata: int,
        cbfunc: Any, cbdata: Any,
    ) -> int:  # fmt: skip
        def run() -> int:
            blob = ctypes.string_at(data, ndata) if data and ndata else b""  # copy: theirs
            reply = _ModexReplier(self, cbfunc, cbdata, "fence")
            try:
                self.handlers.fence(
                    _procs_from(procs, nprocs), _info_from(info, ninfo), blob, reply
                )
            except BaseException:
                if reply.called:  # answered already: the library expects nothing more
                    log.exception("PMIx fence callback failed after answering")
                    return SUCCESS
                raise
            return SUCCESS

        return self._guard("fence_nb", run)

    def _direct_modex(self, proc: Any, info: Any, ninfo: int, cbfunc: Any, cbdata: Any) -> int:
        def run() -> int:
            reply = _ModexReplier(self, cbfunc, cbdata, "direct modex")
            try:
                self.handlers.direct_modex(
                    _proc_from(proc.contents), _info_from(info, ninfo), reply
                )
            except BaseException:
                if reply.called:
                    log.exception("PMIx direct_modex callback failed after answering")
                    return SUCCESS
                raise
            return SUCCESS

        return self._guard("direct_modex", run)

    def _job_control(
        self, requestor: Any, targets: Any, ntargets: int, dirs: Any, ndirs: int,
        _cbfunc: Any, _cbdata: Any,
    ) -> int:  # fmt: skip
        def run() -> int:
            status = self.handlers.job_control(
                _proc_from(requestor.contents) if requestor else Proc("", RANK_UNDEF),
                _procs_from(targets, ntargets),
                _info_from(dirs, ndirs),
            )
            # we never call the cbfunc: success means "done"
            return OPERATION_SUCCEEDED if status == SUCCESS else status

        return self._guard("job_control", run)

    # -- host calls ------------------------------------------------------------------------
    def register_nspace(self, nspace: str, nlocalprocs: int, info: Optional[InfoLike]) -> None:
        """PMIx_server_register_nspace, waiting for its completion."""
        with InfoArray(info) as arr:
            _blocking_op(
                "PMIx_server_register_nspace",
                lambda cb, cbd: lib().PMIx_server_register_nspace(
                    nspace.encode(), nlocalprocs, arr.pointer, len(arr), cb, cbd
                ),
            )

    def register_client(self, proc: Proc, uid: int, gid: int) -> None:
        p = _make_proc(proc)
        _blocking_op(
            "PMIx_server_register_client",
            lambda cb, cbd: lib().PMIx_server_register_client(
                ctypes.byref(p), uid, gid, None, cb, cbd
            ),
        )

    def deregister_nspace(self, nspace: str, timeout: float = 10.0) -> None:
        """PMIx_server_deregister_nspace, waiting for it: runs the namespace's epilog, i.e.
        removes the files and directories its clients registered for cleanup (Open MPI 5's
        shared-memory segments)."""

        def start(cb: Any, cbd: Any) -> int:
            lib().PMIx_server_deregister_nspace(nspace.encode(), cb, cbd)
            return SUCCESS

        _blocking_op("PMIx_server_deregister_nspace", start, timeout)

    def setup_fork(self, proc: Proc) -> dict[str, str]:
        """The PMIX_* variables a client process `proc` needs in its environment."""
        p = _make_proc(proc)
        argv = ctypes.POINTER(ctypes.c_void_p)()
        rc = lib().PMIx_server_setup_fork(ctypes.byref(p), ctypes.byref(argv))
        env = _free_argv(argv)
        _check("PMIx_server_setup_fork", rc)
        return env

    def dmodex_request(self, proc: Proc, done: Callable[[int, bytes], None]) -> None:
        """Ask the library for the modex data of local `proc`; `done(status, data)` is
        called on the progress thread (data copied)."""
        p = _make_proc(proc)
        token = self._hold(done)
        rc = lib().PMIx_server_dmodex_request(
            ctypes.byref(p), ctypes.cast(self._dmodex_cb, ctypes.c_void_p), token
        )
        if rc != SUCCESS:
            self._release(token)
            _check("PMIx_server_dmodex_request", rc)

    def _dmodex_response(self, status: int, data: Any, ndata: int, cbdata: Any) -> None:
        with self._held_lock:
            done = self._held.pop(cbdata or 0, None)
        if done is None:
            return
        try:
            done(status, ctypes.string_at(data, ndata) if data and ndata else b"")
        except BaseException:
            log.exception("PMIx dmodex response handler failed")

    def finalize(self) -> None:
        if self.active:
            self.active = False
            _check("PMIx_server_finalize", lib().PMIx_server_finalize())


def generate_regex(hosts: Sequence[str]) -> str:
    """PMIx_generate_regex over the node names (comma-joined), e.g. `pmix[node[1:0-1]]`."""
    out = ctypes.c_void_p()
    _check(
        "PMIx_generate_regex",
        lib().PMIx_generate_regex(",".join(hosts).encode(), ctypes.byref(out)),
    )
    return _take_string(out)


def generate_ppn(ranks_per_node: Sequence[Sequence[int]]) -> str:
    """PMIx_generate_ppn over `[[0, 2], [1, 3]]` (one list per node), e.g. `raw:0,2;1,3`."""
    text = ";".join(",".join(str(r) for r in node) for node in ranks_per_node)
    out = ctypes.c_void_p()
    _check("PMIx_generate_ppn", lib().PMIx_generate_ppn(text.encode(), ctypes.byref(out)))
    return _take_string(out)


# -- client -----------------------------------------------------------------------------------
class Client:
    """The PMIx client library in this process (one rank): init, put, commit, fence, get."""

    def __init__(self) -> None:
        self.proc: Optional[Proc] = None

    def init(self, info: Optional[InfoLike] = None) -> Proc:
        p = _ProcT()
        with InfoArray(info) as arr:
            _check("PMIx_Init", lib().PMIx_Init(ctypes.byref(p), arr.pointer, len(arr)))
        self.proc = _proc_from(p)
        return self.proc

    def _me(self) -> Proc:
        if self.proc is None:
            raise RuntimeError("PMIx client used before init()")
        return self.proc

    def put(self, key: str, value: Any, scope: int = GLOBAL) -> None:
        v = _ValueT()
        keep: list[Any] = []
        _load_value(lambda p, t: lib().PMIx_Value_load(ctypes.byref(v), p, t), value, keep)
        try:
            _check("PMIx_Put", lib().PMIx_Put(scope, key.encode(), ctypes.byref(v)))
        finally:
            lib().PMIx_Value_destruct(ctypes.byref(v))

    def commit(self) -> None:
        _check("PMIx_Commit", lib().PMIx_Commit())

    def fence(
        self, procs: Optional[Sequence[Proc]] = None, collect: bool = True,
        timeout: Optional[int] = None,
    ) -> None:  # fmt: skip
        """Fence over `procs` (default: every rank of our namespace)."""
        plist = list(procs) if procs else [Proc(self._me().nspace, RANK_WILDCARD)]
        arr = (_ProcT * len(plist))(*(_make_proc(p) for p in plist))
        info: list[tuple[str, Any]] = [(COLLECT_DATA, collect)]
        if timeout is not None:
            info.append((TIMEOUT, Typed(INT, timeout)))
        with InfoArray(info) as inf:
            _check("PMIx_Fence", lib().PMIx_Fence(arr, len(plist), inf.pointer, len(inf)))

    def get(self, key: str, proc: Optional[Proc] = None, info: Optional[InfoLike] = None) -> Any:
        """A value as a Python object; PmixError(status ERR_NOT_FOUND) when absent."""
        p = _make_proc(proc or Proc(self._me().nspace, RANK_UNDEF))
        out = ctypes.POINTER(_ValueT)()
        with InfoArray(info) as arr:
            rc = lib().PMIx_Get(
                ctypes.byref(p), key.encode(), arr.pointer, len(arr), ctypes.byref(out)
            )
        _check(f"PMIx_Get({key})", rc)
        try:
            return _decode_value(out.contents)
        finally:
            lib().PMIx_Value_destruct(out)
            _libc.free(ctypes.cast(out, ctypes.c_void_p))

    def abort(self, status: int, message: str) -> None:
        _check("PMIx_Abort", lib().PMIx_Abort(status, message.encode(), None, 0))

    def finalize(self) -> None:
        if self.proc is not None:
            self.proc = None
            _check("PMIx_Finalize", lib().PMIx_Finalize(None, 0))
