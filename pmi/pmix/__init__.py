"""PMIx for Open MPI ranks: ctypes over libpmix 4.x, a launcher-facing server, a probe.

abi         libpmix.so.2's ABI: constants, Proc, PmixError, struct layouts; `lib()` loads the
            library and checks its version and layout
values      Python values <-> pmix values: Typed, InfoArray, conversions both ways
server_lib  Server (PMIx_server_*) with Python upcalls (ServerHandlers), generate_regex/ppn
client_lib  Client (PMIx_Init/Get/Put/Commit/Fence/Finalize)
server      PmixServer(job): the launcher's object (asyncio), same shape as pmi.server.PmiServer;
            libpmix runs in helper processes, one per node, never in the launcher
helper      the helper process (forked by `server`: `main(FD)`)
wire        launcher ↔ helper messages (JSON lines)
probe       probe_pmix(): one rank's view of its PMIx server (`python -m rankwire.pmi.pmix.probe`)
detect      pmi_kind(paths, libmpi_needed): does an image's MPI need PMIx or PMI-1/2 (pure)

Nothing here loads libpmix at import; `abi.lib()` does on first use.
"""
