"""Who is at the other end of a Unix socket: the one reading of SO_PEERCRED, and the one
connect-and-check of a same-user server (the bridges' node servers)."""

from __future__ import annotations

import os
import socket
import struct
import time

_UCRED = struct.Struct("iII")  # pid, uid, gid: ids unsigned, so 2**31 and up read right


def peer_creds(sock: socket.socket) -> tuple[int, int, int]:
    """The pid, uid and gid of the process that connected (or listens at) `sock`'s peer."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return pid, uid, gid


def connect_own(path: str, deadline: float, late: str, what: str) -> socket.socket:
    """Connect to a node server of ours (a bridge's) at `path`: it may not listen yet
    (retried until `deadline`, then UserError `late`); our own user must serve it."""
    from rankwire.errors import UserError

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        while True:
            # a full backlog blocks connect: never past the deadline
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                sock.connect(path)
                break
            except (ConnectionRefusedError, FileNotFoundError, TimeoutError, BlockingIOError):
                if time.monotonic() >= deadline:
                    raise UserError(late) from None
                time.sleep(0.005)
            except OSError as err:
                why = err.strerror or str(err)
                raise UserError(f"cannot join the {what} at {path}: {why}") from None
        sock.settimeout(None)
        _pid, uid, _gid = peer_creds(sock)
        if uid != os.getuid():
            raise UserError(
                f"the {what}'s socket {path} is held by uid {uid}, not by you; ask the "
                "node's admin to find that process"
            )
    except BaseException:
        sock.close()
        raise
    return sock
