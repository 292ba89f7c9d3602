"""The PMIx client library (one rank): `Client` over PMIx_Init/Put/Commit/Fence/Get/Finalize."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any, Optional

from rankwire.pmi.pmix.abi import (
    COLLECT_DATA,
    GLOBAL,
    INT,
    RANK_UNDEF,
    RANK_WILDCARD,
    TIMEOUT,
    Proc,
    ProcT,
    ValueT,
    check,
    free,
    lib,
)
from rankwire.pmi.pmix.values import (
    InfoArray,
    InfoLike,
    Typed,
    decode_value,
    load_value,
    make_proc,
    proc_from,
)


class Client:
    """The PMIx client library in this process (one rank): init, put, commit, fence, get."""

    def __init__(self) -> None:
        self.proc: Optional[Proc] = None

    def init(self, info: Optional[InfoLike] = None) -> Proc:
        p = ProcT()
        with InfoArray(info) as arr:
            check("PMIx_Init", lib().PMIx_Init(ctypes.byref(p), arr.pointer, len(arr)))
        self.proc = proc_from(p)
        return self.proc

    def _me(self) -> Proc:
        if self.proc is None:
            raise RuntimeError("PMIx client used before init()")
        return self.proc

    def put(self, key: str, value: Any, scope: int = GLOBAL) -> None:
        v = ValueT()
        keep: list[Any] = []
        load_value(lambda p, t: lib().PMIx_Value_load(ctypes.byref(v), p, t), value, keep)
        try:
            check("PMIx_Put", lib().PMIx_Put(scope, key.encode(), ctypes.byref(v)))
        finally:
            lib().PMIx_Value_destruct(ctypes.byref(v))

    def commit(self) -> None:
        check("PMIx_Commit", lib().PMIx_Commit())

    def fence(
        self, procs: Optional[Sequence[Proc]] = None, collect: bool = True,
        timeout: Optional[int] = None,
    ) -> None:  # fmt: skip
        """Fence over `procs` (default: every rank of our namespace)."""
        plist = list(procs) if procs else [Proc(self._me().nspace, RANK_WILDCARD)]
        arr = (ProcT * len(plist))(*(make_proc(p) for p in plist))
        info: list[tuple[str, Any]] = [(COLLECT_DATA, collect)]
        if timeout is not None:
            info.append((TIMEOUT, Typed(INT, timeout)))
        with InfoArray(info) as inf:
            check("PMIx_Fence", lib().PMIx_Fence(arr, len(plist), inf.pointer, len(inf)))

    def get(self, key: str, proc: Optional[Proc] = None, info: Optional[InfoLike] = None) -> Any:
        """A value as a Python object; PmixError(status ERR_NOT_FOUND) when absent."""
        p = make_proc(proc or Proc(self._me().nspace, RANK_UNDEF))
        out = ctypes.POINTER(ValueT)()
        with InfoArray(info) as arr:
            rc = lib().PMIx_Get(
                ctypes.byref(p), key.encode(), arr.pointer, len(arr), ctypes.byref(out)
            )
        check(f"PMIx_Get({key})", rc)
        try:
            return decode_value(out.contents)
        finally:
            lib().PMIx_Value_destruct(out)
            free(ctypes.cast(out, ctypes.c_void_p))

    def abort(self, status: int, message: str) -> None:
        check("PMIx_Abort", lib().PMIx_Abort(status, message.encode(), None, 0))

    def finalize(self) -> None:
        if self.proc is not None:
            self.proc = None
            check("PMIx_Finalize", lib().PMIx_Finalize(None, 0))
