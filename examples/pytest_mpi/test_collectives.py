"""A small pytest-mpi module: run it as N >= 2 ranks of one MPI job.

    mpirun -n 4 python3 -m pytest --with-mpi -q /opt/tests
    apptainer-mpirun -n 4 app.sif python3 -m pytest --with-mpi -q /opt/tests
    srun --mpi=pmi2 -n 4 rankwire exec app.sif python3 -m pytest --with-mpi -q /opt/tests

Every rank runs every test; each test is collective (all ranks call the same MPI
operations in the same order), so a rank that fails an assertion fails on its own and the
others still finish. Without `--with-mpi` pytest-mpi skips these tests; as a singleton
(`min_size=2`) they are skipped too.
"""

from __future__ import annotations

from array import array

import pytest
from mpi4py import MPI

try:  # the 4 MiB exchange uses numpy when the image has it, else plain bytes
    import numpy as np
except ImportError:
    np = None

EXCHANGE_BYTES = 4 * 1024 * 1024


def _pattern(rank: int, nbytes: int) -> bytes:
    """`nbytes` bytes that differ between ranks and between offsets (catches a shifted or
    truncated transfer, not only a wrong sender)."""
    block = bytes((i + 7 * rank) % 256 for i in range(256))
    return block * (nbytes // 256)


@pytest.mark.mpi(min_size=2)
def test_world_size_and_ranks() -> None:
    comm = MPI.COMM_WORLD
    assert comm.Get_size() >= 2
    assert comm.allgather(comm.Get_rank()) == list(range(comm.Get_size()))
    assert MPI.Is_initialized() and not MPI.Is_finalized()


@pytest.mark.mpi(min_size=2)
def test_allreduce() -> None:
    comm = MPI.COMM_WORLD
    size, rank = comm.Get_size(), comm.Get_rank()
    assert comm.allreduce(rank, op=MPI.SUM) == size * (size - 1) // 2
    assert comm.allreduce(rank, op=MPI.MAX) == size - 1
    sendbuf = array("l", [rank + i for i in range(16)])
    recvbuf = array("l", [0] * 16)
    comm.Allreduce(sendbuf, recvbuf, op=MPI.SUM)
    assert list(recvbuf) == [size * (size - 1) // 2 + size * i for i in range(16)]


@pytest.mark.mpi(min_size=2)
def test_bcast() -> None:
    comm = MPI.COMM_WORLD
    data = {"from": 0, "items": list(range(10))} if comm.Get_rank() == 0 else None
    assert comm.bcast(data, root=0) == {"from": 0, "items": list(range(10))}
    buf = bytearray(_pattern(0, 1 << 20)) if comm.Get_rank() == 0 else bytearray(1 << 20)
    comm.Bcast(buf, root=0)
    assert bytes(buf) == _pattern(0, 1 << 20)


@pytest.mark.mpi(min_size=2)
def test_gather() -> None:
    comm = MPI.COMM_WORLD
    size, rank = comm.Get_size(), comm.Get_rank()
    gathered = comm.gather(rank * rank, root=0)
    if rank == 0:
        assert gathered == [r * r for r in range(size)]
    else:
        assert gathered is None
    assert comm.allgather(f"rank-{rank}") == [f"rank-{r}" for r in range(size)]


@pytest.mark.mpi(min_size=2)
def test_4mib_ring_exchange() -> None:
    """Each rank sends 4 MiB to the next rank and receives 4 MiB from the previous one."""
    comm = MPI.COMM_WORLD
    size, rank = comm.Get_size(), comm.Get_rank()
    dest, source = (rank + 1) % size, (rank - 1) % size
    if np is not None:
        send = np.arange(EXCHANGE_BYTES // 8, dtype=np.int64) * size + rank
        recv = np.empty_like(send)
        comm.Sendrecv(send, dest=dest, sendtag=18, recvbuf=recv, source=source, recvtag=18)
        expected = np.arange(EXCHANGE_BYTES // 8, dtype=np.int64) * size + source
        assert recv.nbytes == EXCHANGE_BYTES and bool((recv == expected).all())
    else:
        sendbuf = _pattern(rank, EXCHANGE_BYTES)
        recvbuf = bytearray(EXCHANGE_BYTES)
        status = MPI.Status()
        comm.Sendrecv(
            sendbuf,
            dest=dest,
            sendtag=18,
            recvbuf=recvbuf,
            source=source,
            recvtag=18,
            status=status,
        )
        assert status.Get_source() == source
        assert status.Get_count(MPI.BYTE) == EXCHANGE_BYTES
        assert bytes(recvbuf) == _pattern(source, EXCHANGE_BYTES)


@pytest.mark.mpi(min_size=2)
def test_4mib_send_recv_between_pairs() -> None:
    """Blocking Send/Recv of 4 MiB between rank pairs (0<->1, 2<->3, ...), both ways."""
    comm = MPI.COMM_WORLD
    size, rank = comm.Get_size(), comm.Get_rank()
    peer = rank ^ 1
    if peer >= size:  # the last rank of an odd-sized job has no partner
        comm.Barrier()
        return
    recvbuf = bytearray(EXCHANGE_BYTES)
    if rank % 2 == 0:
        comm.Send(_pattern(rank, EXCHANGE_BYTES), dest=peer, tag=4)
        comm.Recv(recvbuf, source=peer, tag=4)
    else:
        comm.Recv(recvbuf, source=peer, tag=4)
        comm.Send(_pattern(rank, EXCHANGE_BYTES), dest=peer, tag=4)
    assert bytes(recvbuf) == _pattern(peer, EXCHANGE_BYTES)
    comm.Barrier()
