"""PMIx for Open MPI ranks: ctypes over libpmix 4.x, a launcher-facing server, a probe.

bindings  ctypes over libpmix.so.2: Proc/Typed values, Server (PMIx_server_*) with Python
          upcalls, Client (PMIx_Init/Get/Put/Commit/Fence/Finalize); layout checked at load
server    PmixServer(job): the launcher's object (asyncio), same shape as pmi.server.PmiServer;
          libpmix runs in helper processes, one per node, never in the launcher
helper    the helper process (`python -m rankwire.pmi.pmix.helper FD`)
wire      launcher ↔ helper messages (JSON lines)
probe     probe_pmix(): one rank's view of its PMIx server (`python -m rankwire.pmi.pmix.probe`)
detect    pmi_kind(paths, libmpi_needed): does an image's MPI need PMIx or PMI-1/2 (pure)

Nothing here loads libpmix at import; `bindings.lib()` does on first use.
"""
