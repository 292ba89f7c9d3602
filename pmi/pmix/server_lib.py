"""The PMIx server library (PMIx_server_*) with Python upcalls: `Server`, `ServerHandlers`.

Threading: libpmix calls the server callbacks on its own progress thread. Every callback is
wrapped so that a Python exception never crosses into C: it is logged (logger
`rankwire.pmi.pmix`) and the upcall returns an error status to the library. Completion
functions (`reply` objects) may be called from any thread; libpmix thread-shifts them.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Sequence
from typing import Any, Callable, Optional

from rankwire.pmi.pmix.abi import (
    ERR_NOT_FOUND,
    ERR_NOT_SUPPORTED,
    ERR_TIMEOUT,
    ERROR,
    OPERATION_SUCCEEDED,
    RANK_UNDEF,
    SUCCESS,
    InfoT,
    PmixError,
    Proc,
    ProcT,
    ServerModule,
    check,
    lib,
)
from rankwire.pmi.pmix.values import (
    InfoArray,
    InfoLike,
    free_argv,
    info_from,
    make_proc,
    proc_from,
    procs_from,
    take_string,
)

log = logging.getLogger("rankwire.pmi.pmix")

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
    ctypes.c_int, ctypes.POINTER(ProcT), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p
)
_AbortFn = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ProcT), ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p,
    ctypes.POINTER(ProcT), ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p,
)  # fmt: skip
_FenceFn = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ProcT), ctypes.c_size_t, ctypes.POINTER(InfoT),
    ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p,
)  # fmt: skip
_DmodexFn = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ProcT), ctypes.POINTER(InfoT), ctypes.c_size_t,
    ctypes.c_void_p, ctypes.c_void_p,
)  # fmt: skip
_JobControlFn = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ProcT), ctypes.POINTER(ProcT), ctypes.c_size_t,
    ctypes.POINTER(InfoT), ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p,
)  # fmt: skip

_MODULE_ORDER = ("client_connected", "client_finalized", "abort", "fence_nb", "direct_modex")
_JOB_CONTROL_SLOT = 19


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
    check(call, rc)
    if not done.wait(timeout):
        raise PmixError(call, ERR_TIMEOUT)
    check(call, result[0])


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
        self._module = ServerModule()
        for i, name in enumerate(_MODULE_ORDER):
            setattr(self._module, f"slot{i}", ctypes.cast(self._callbacks[name], ctypes.c_void_p))
        setattr(
            self._module,
            f"slot{_JOB_CONTROL_SLOT}",
            ctypes.cast(self._job_control_cb, ctypes.c_void_p),
        )
        self.active = False
        with InfoArray(info) as arr:
            check(
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
            self.handlers.client_connected(proc_from(proc.contents))
            return self._op_done(cbfunc, cbdata)

        return self._guard("client_connected", run)

    def _client_finalized(self, proc: Any, _obj: Any, cbfunc: Any, cbdata: Any) -> int:
        def run() -> int:
            self.handlers.client_finalized(proc_from(proc.contents))
            return self._op_done(cbfunc, cbdata)

        return self._guard("client_finalized", run)

    def _abort(
        self, proc: Any, _obj: Any, status: int, msg: Any, procs: Any, nprocs: int,
        cbfunc: Any, cbdata: Any,
    ) -> int:  # fmt: skip
        def run() -> int:
            text = msg.decode(errors="replace") if msg else ""
            self.handlers.abort(proc_from(proc.contents), status, text, procs_from(procs, nprocs))
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
                self.handlers.fence(procs_from(procs, nprocs), info_from(info, ninfo), blob, reply)
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
                self.handlers.direct_modex(proc_from(proc.contents), info_from(info, ninfo), reply)
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
                proc_from(requestor.contents) if requestor else Proc("", RANK_UNDEF),
                procs_from(targets, ntargets),
                info_from(dirs, ndirs),
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
        p = make_proc(proc)
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

    def deregister_client(self, proc: Proc, timeout: float = 10.0) -> None:
        """PMIx_server_deregister_client, waiting for it: runs the client's own epilog, i.e.
        removes the files it registered for cleanup (Open MPI 4.1's shared-memory segment),
        as libpmix does itself when a client's connection is lost while the server lives."""
        p = make_proc(proc)

        def start(cb: Any, cbd: Any) -> int:
            lib().PMIx_server_deregister_client(ctypes.byref(p), cb, cbd)
            return SUCCESS

        _blocking_op("PMIx_server_deregister_client", start, timeout)

    def setup_fork(self, proc: Proc) -> dict[str, str]:
        """The PMIX_* variables a client process `proc` needs in its environment."""
        p = make_proc(proc)
        argv = ctypes.POINTER(ctypes.c_void_p)()
        rc = lib().PMIx_server_setup_fork(ctypes.byref(p), ctypes.byref(argv))
        env = free_argv(argv)
        check("PMIx_server_setup_fork", rc)
        return env

    def dmodex_request(self, proc: Proc, done: Callable[[int, bytes], None]) -> None:
        """Ask the library for the modex data of local `proc`; `done(status, data)` is
        called on the progress thread (data copied)."""
        p = make_proc(proc)
        token = self._hold(done)
        rc = lib().PMIx_server_dmodex_request(
            ctypes.byref(p), ctypes.cast(self._dmodex_cb, ctypes.c_void_p), token
        )
        if rc != SUCCESS:
            self._release(token)
            check("PMIx_server_dmodex_request", rc)

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
            check("PMIx_server_finalize", lib().PMIx_server_finalize())


def generate_regex(hosts: Sequence[str]) -> str:
    """PMIx_generate_regex over the node names (comma-joined), e.g. `pmix[node[1:0-1]]`."""
    out = ctypes.c_void_p()
    check(
        "PMIx_generate_regex",
        lib().PMIx_generate_regex(",".join(hosts).encode(), ctypes.byref(out)),
    )
    return take_string(out)


def generate_ppn(ranks_per_node: Sequence[Sequence[int]]) -> str:
    """PMIx_generate_ppn over `[[0, 2], [1, 3]]` (one list per node), e.g. `raw:0,2;1,3`."""
    text = ";".join(",".join(str(r) for r in node) for node in ranks_per_node)
    out = ctypes.c_void_p()
    check("PMIx_generate_ppn", lib().PMIx_generate_ppn(text.encode(), ctypes.byref(out)))
    return take_string(out)
