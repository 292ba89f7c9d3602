"""Python values ↔ libpmix values: `Typed`, `InfoArray`, and the conversions both ways.

Python objects in, Python objects out: callers see `Proc`, `Typed`, `dict`, `bytes` and
`str`. A Python value gets a default PMIx type (`bool` → BOOL, `int` → UINT32, ...; wrap it
in `Typed` to choose) and is loaded through libpmix's own PMIx_Info_load / PMIx_Value_load;
values read back from C memory are copied out before the library frees them. The helpers
for malloc'ed strings and argv arrays libpmix hands over live here too.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional, Union

from rankwire.pmi.pmix.abi import (
    BOOL,
    BYTE,
    BYTE_OBJECT,
    DATA_ARRAY,
    DOUBLE,
    FLOAT,
    INFO,
    INT,
    INT8,
    INT16,
    INT32,
    INT64,
    KEY_MAX,
    NSPACE_MAX,
    PID,
    PROC,
    PROC_RANK,
    SIZE,
    STATUS,
    STRING,
    UINT,
    UINT8,
    UINT16,
    UINT32,
    UINT64,
    ByteObject,
    DataArray,
    InfoT,
    Proc,
    ProcT,
    ValueT,
    check,
    free,
    lib,
)
from rankwire.record import record


@record
class Typed:
    """A value with an explicit PMIx data type, e.g. `Typed(UINT16, 3)`."""

    type: int
    value: Any


@record
class Opaque:
    """A value of a type these bindings do not decode."""

    type: int


_CTYPE_OF: dict[int, type[ctypes._SimpleCData[Any]]] = {
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


def make_proc(proc: Proc) -> ProcT:
    ns = proc.nspace.encode()
    if len(ns) > NSPACE_MAX:
        raise ValueError(f"namespace longer than {NSPACE_MAX} bytes: {proc.nspace!r}")
    return ProcT(ns, proc.rank)


def _pairs(info: Optional[InfoLike]) -> list[tuple[str, Any]]:
    if info is None:
        return []
    return list(info.items()) if isinstance(info, Mapping) else list(info)


def load_value(loader: Callable[[ctypes.c_void_p, int], int], value: Any, keep: list[Any]) -> None:
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
        ptr = ctypes.pointer(ByteObject(ctypes.addressof(buf), len(t.value)))
    elif t.type == PROC:
        ptr = ctypes.pointer(make_proc(t.value))
    elif t.type == DATA_ARRAY:
        items = InfoArray(t.value)  # a DATA_ARRAY of INFO; the library deep-copies it
        keep.append(items)
        ptr = ctypes.pointer(DataArray(INFO, len(items), items.address))
    else:
        raise TypeError(f"cannot load PMIx type {t.type}")
    keep.append(ptr)
    rc = loader(ctypes.cast(ptr, ctypes.c_void_p), t.type)
    check("loading a PMIx value", rc)


def _info_loader(entry: InfoT, key: bytes) -> Callable[[ctypes.c_void_p, int], int]:
    """PMIx_Info_load into `entry` under `key`, called the way load_value calls a loader."""
    return lambda p, t: lib().PMIx_Info_load(ctypes.byref(entry), key, p, t)


class InfoArray:
    """A C `pmix_info_t[]` built from Python pairs; `close()` frees what libpmix copied in."""

    def __init__(self, info: Optional[InfoLike]) -> None:
        pairs = _pairs(info)
        self._array = (InfoT * max(len(pairs), 1))()
        self._n = 0
        keep: list[Any] = []
        try:
            for i, (key, value) in enumerate(pairs):
                k = key.encode()
                if len(k) > KEY_MAX:
                    raise ValueError(f"PMIx key longer than {KEY_MAX} bytes: {key!r}")
                entry = self._array[i]
                load_value(_info_loader(entry, k), value, keep)
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
        return ctypes.cast(self._array, ctypes.POINTER(InfoT)) if self._n else None

    def close(self) -> None:
        for i in range(self._n):
            lib().PMIx_Value_destruct(ctypes.byref(self._array[i].value))
        self._n = 0

    def __enter__(self) -> InfoArray:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def decode_value(v: ValueT, depth: int = 0) -> Any:
    t = v.type
    d = v.data
    if t in _FIELD_OF:
        return getattr(d, _FIELD_OF[t])
    if t == STRING:
        return ctypes.string_at(d.string).decode(errors="replace") if d.string else ""
    if t == BYTE_OBJECT:
        return ctypes.string_at(d.bo.bytes, d.bo.size) if d.bo.bytes else b""
    if t == PROC:
        return proc_from(d.proc.contents) if d.proc else None
    if t == DATA_ARRAY and d.darray and depth < 8:
        return _decode_array(d.darray.contents, depth + 1)
    return Opaque(t)


def _decode_array(arr: DataArray, depth: int) -> Any:
    if not arr.array or not arr.size:
        return []
    if arr.type == INFO:
        infos = ctypes.cast(arr.array, ctypes.POINTER(InfoT))
        return {
            infos[i].key.decode(errors="replace"): decode_value(infos[i].value, depth)
            for i in range(arr.size)
        }
    if arr.type == PROC:
        procs = ctypes.cast(arr.array, ctypes.POINTER(ProcT))
        return [proc_from(procs[i]) for i in range(arr.size)]
    if arr.type == STRING:
        strs = ctypes.cast(arr.array, ctypes.POINTER(ctypes.c_char_p))
        return [(strs[i] or b"").decode(errors="replace") for i in range(arr.size)]
    if arr.type in _CTYPE_OF:
        items = ctypes.cast(arr.array, ctypes.POINTER(_CTYPE_OF[arr.type]))
        return [items[i] for i in range(arr.size)]
    return Opaque(DATA_ARRAY)


def proc_from(p: ProcT) -> Proc:
    return Proc(p.nspace.decode(errors="replace"), p.rank)


def procs_from(ptr: Any, n: int) -> list[Proc]:
    return [proc_from(ptr[i]) for i in range(n)] if ptr else []


def info_from(ptr: Any, n: int) -> dict[str, Any]:
    return (
        {ptr[i].key.decode(errors="replace"): decode_value(ptr[i].value) for i in range(n)}
        if ptr
        else {}
    )


def free_argv(argv: Any) -> dict[str, str]:
    """Turn a malloc'ed NULL-terminated `char**` of K=V into a dict and free it."""
    env: dict[str, str] = {}
    if not argv:
        return env
    i = 0
    while argv[i]:
        text = ctypes.string_at(argv[i]).decode(errors="replace")
        key, _, val = text.partition("=")
        env[key] = val
        free(argv[i])
        i += 1
    free(ctypes.cast(argv, ctypes.c_void_p))
    return env


def take_string(ptr: ctypes.c_void_p) -> str:
    if not ptr.value:
        return ""
    text = ctypes.string_at(ptr.value).decode(errors="replace")
    free(ptr)
    return text
