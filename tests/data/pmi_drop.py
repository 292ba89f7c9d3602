"""A PMI-1 rank that drops its connection mid-fence (tests/test_faults.py).

    pmi_drop.py RANK    every rank: init, put, fence; RANK sends its fence request, then
                        closes its socket and sleeps (the process lives on, the wire is gone)
The last rank (when it is not RANK) never fences: the fence cannot complete on its own.
"""

import os
import sys
import time

from rankwire.pmi.client import Pmi1Client, PmiRequestError
from rankwire.pmi.messages import Fence

pmi = Pmi1Client.from_env()
pmi.init()
print(f"start rank={pmi.rank} pid={os.getpid()}", flush=True)
pmi.put(f"k{pmi.rank}", "v")
target = int(sys.argv[1])
if pmi.rank == target:
    pmi._sock.sendall(pmi._codec.send(Fence()))
    pmi.close()
    time.sleep(60)
elif pmi.rank == pmi.size - 1:
    time.sleep(60)
else:
    try:
        pmi.fence()
    except PmiRequestError as err:  # as an MPI library would: one line, exit 1
        sys.exit(f"rank {pmi.rank}: {err}")
