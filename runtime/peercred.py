"""Who is at the other end of a Unix socket: the one reading of SO_PEERCRED."""

from __future__ import annotations

import socket
import struct

_UCRED = struct.Struct("iII")  # pid, uid, gid: ids unsigned, so 2**31 and up read right


def peer_creds(sock: socket.socket) -> tuple[int, int, int]:
    """The pid, uid and gid of the process that connected (or listens at) `sock`'s peer."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return pid, uid, gid
