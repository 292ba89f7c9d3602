"""rankwire-holder (runtime/holdserve.c), the holder's serving half, driven directly: the
arguments runtime/holder.py hands it, a listening socket of our own, /dev/null for the
namespace descriptors. The whole holder (setup, then this) runs in test_exec.py and the
plugin's tests; here each way it can end, and what it says, one by one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rankwire.runtime.joinplan import SERVER

REPORT = {"ok": True, "pid": 1, "namespaces": ["user", "mount"], "socket": "s"}


class Served:
    """A rankwire-holder serving `dir/h.sock`, which it unlinks in its teardown."""

    def __init__(self, tmp: Path, mode: str, *extra: str, starter_gone: bool = False) -> None:
        self.sock = tmp / "h.sock"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.sock))
        self.listener.listen(8)
        status_r, status_w = os.pipe()
        if starter_gone:
            os.close(status_r)
        dir_fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        ns = [os.open(os.devnull, os.O_RDONLY) for _ in range(2)]
        fds = [status_w, self.listener.fileno(), dir_fd, *ns]
        args = [
            f"mode={mode}",
            f"said={json.dumps(REPORT)}",
            f"status={status_w}",
            f"listener={self.listener.fileno()}",
            f"dir={dir_fd}",
            "unlink=h.sock",
            *(f"ns={fd}" for fd in ns),
            *extra,
        ]
        self.proc = subprocess.Popen([SERVER, *args], pass_fds=fds)
        for fd in (status_w, dir_fd, *ns):
            os.close(fd)
        self.listener.close()
        self.status = None if starter_gone else os.fdopen(status_r, "rb")

    def said(self) -> bytes:
        assert self.status is not None
        return self.status.readline()

    def connect(self, cmd: bytes) -> socket.socket:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(5)
        conn.connect(str(self.sock))
        conn.sendall(cmd)
        return conn

    def ask(self, cmd: bytes) -> bytes:
        with self.connect(cmd) as conn:
            conn.shutdown(socket.SHUT_WR)  # all said: EOF, for one that says nothing
            return conn.makefile("rb").readline()

    def tore_down(self, code: int) -> bool:
        """It exited with `code` within 5 s and its socket is gone."""
        return self.proc.wait(5) == code and not self.sock.exists()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.status is not None:
            self.status.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """serve(mode, *args, starter_gone=False): a rankwire-holder, killed after the test."""
    made: list[Served] = []

    def start(mode: str, *extra: str, starter_gone: bool = False) -> Served:
        made.append(Served(tmp_path, mode, *extra, starter_gone=starter_gone))
        return made[-1]

    yield start
    for one in made:
        one.close()


def test_it_reports_serves_joins_and_ends_with_the_last_lease(serve: Callable[..., Served]) -> None:
    holder = serve("ephemeral", "serve=1")
    assert holder.said() == json.dumps(REPORT).encode() + b"\n"
    lease = holder.connect(b"join\n")
    msg, fds, _, _ = socket.recv_fds(lease, 4096, 4)
    for fd in fds:
        assert os.path.samestat(os.fstat(fd), os.stat(os.devnull))
        os.close(fd)
    assert (msg, len(fds)) == (json.dumps(REPORT).encode() + b"\n", 2)
    assert json.loads(holder.ask(b"info\n")) == {**REPORT, "leases": 1}
    lease.sendall(b"leave\n")
    assert lease.recv(64) == b"last=1\0"
    lease.close()
    assert holder.tore_down(0)


def test_a_persistent_one_outlives_its_leases_until_stop(serve: Callable[..., Served]) -> None:
    holder = serve("persistent", "serve=1")
    holder.said()
    with holder.connect(b"join\n") as lease:
        socket.recv_fds(lease, 4096, 4)
        lease.sendall(b"leave\n")
        assert lease.recv(64) == b"last=0\0"
    assert json.loads(holder.ask(b"info\n"))["leases"] == 0
    assert holder.proc.poll() is None
    assert json.loads(holder.ask(b"stop\n")) == {**REPORT, "leases": 0}
    assert holder.tore_down(0)


@pytest.mark.parametrize("end", ["SIGTERM", "owner"])
def test_sigterm_or_its_owners_death_tears_down(serve: Callable[..., Served], end: str) -> None:
    owner = subprocess.Popen(["sleep", "60"])
    try:
        holder = serve("persistent", "serve=1", f"owner={owner.pid}")
        holder.said()
        if end == "SIGTERM":
            holder.proc.send_signal(signal.SIGTERM)
        else:
            owner.kill()
        assert holder.tore_down(0)
    finally:
        owner.kill()
        owner.wait()


@pytest.mark.parametrize("then", ["leave", "second SIGTERM", "grace"])
def test_sigterm_with_a_lease_lets_its_command_end_first(
    serve: Callable[..., Served], then: str
) -> None:
    """scancel signals a step's tasks and its container's holder at once: the holder waits
    for its leases (the tasks' commands ending by their own SIGTERM), refusing joins, and
    tears down when they have left, at a second SIGTERM, or after TERM_GRACE_MS (1 s)."""
    holder = serve("shared", "serve=1")
    holder.said()
    lease = holder.connect(b"join\n")
    socket.recv_fds(lease, 4096, 4)
    early = holder.connect(b"")  # accepted before the SIGTERM, asks to join after it
    holder.ask(b"info\n")  # answered: the connection before it is accepted too
    holder.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        holder.proc.wait(0.2)  # still there for the lease
    early.sendall(b"join\n")
    assert early.recv(4096) == b""  # no join while it drains: EOF, no report
    early.close()
    if then == "leave":
        lease.sendall(b"leave\n")
        assert lease.recv(64) == b"last=1\0"
    elif then == "second SIGTERM":
        holder.proc.send_signal(signal.SIGTERM)
    assert holder.tore_down(0)
    took = time.monotonic() - t0
    # by what `then` did, well before the grace; or by the grace, not before
    assert took < 0.8 if then != "grace" else took >= 0.95, f"{then}: {took:.2f} s"
    lease.close()


def test_a_starter_gone_before_the_report_leaves_no_container(serve: Callable[..., Served]) -> None:
    """Its starter killed during the setup (^C): nobody would know of the container (no
    `instance list` entry), so it does not serve; it tears down."""
    holder = serve("persistent", "serve=1", starter_gone=True)
    assert holder.tore_down(0)


def test_after_a_failed_setup_it_tears_down_then_reports(serve: Callable[..., Served]) -> None:
    holder = serve("ephemeral")  # no serve=1: the setup failed
    assert holder.said() == json.dumps(REPORT).encode() + b"\n"
    assert holder.tore_down(1)  # the socket went before the report


def test_commands_it_does_not_know_are_closed_without_an_answer(
    serve: Callable[..., Served],
) -> None:
    holder = serve("persistent", "serve=1")
    holder.said()
    for cmd in (b"join\0x\n", b"bogus\n", b""):
        assert holder.ask(cmd) == b""
    assert json.loads(holder.ask(b" \tinfo\r\n"))["leases"] == 0
    assert holder.proc.poll() is None
