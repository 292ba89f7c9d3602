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
from collections.abc import Iterator
from pathlib import Path

import pytest

from rankwire.runtime.holder import SERVER

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

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.status is not None:
            self.status.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[list[Served]]:
    made: list[Served] = []
    yield made
    for one in made:
        one.close()


def test_it_reports_serves_joins_and_ends_with_the_last_lease(
    tmp_path: Path, served: list[Served]
) -> None:
    holder = Served(tmp_path, "ephemeral", "serve=1")
    served.append(holder)
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
    assert holder.proc.wait(5) == 0
    assert not holder.sock.exists()


def test_a_persistent_one_outlives_its_leases_until_stop(
    tmp_path: Path, served: list[Served]
) -> None:
    holder = Served(tmp_path, "persistent", "serve=1")
    served.append(holder)
    holder.said()
    with holder.connect(b"join\n") as lease:
        socket.recv_fds(lease, 4096, 4)
        lease.sendall(b"leave\n")
        assert lease.recv(64) == b"last=0\0"
    assert json.loads(holder.ask(b"info\n"))["leases"] == 0
    assert holder.proc.poll() is None
    assert json.loads(holder.ask(b"stop\n")) == {**REPORT, "leases": 0}
    assert holder.proc.wait(5) == 0
    assert not holder.sock.exists()


@pytest.mark.parametrize("end", ["SIGTERM", "owner"])
def test_sigterm_or_its_owners_death_tears_down(
    tmp_path: Path, served: list[Served], end: str
) -> None:
    owner = subprocess.Popen(["sleep", "60"])
    holder = Served(tmp_path, "persistent", "serve=1", f"owner={owner.pid}")
    served.append(holder)
    holder.said()
    if end == "SIGTERM":
        holder.proc.send_signal(signal.SIGTERM)
    owner.kill()
    owner.wait()
    assert holder.proc.wait(5) == 0
    assert not holder.sock.exists()


def test_a_starter_gone_before_the_report_leaves_no_container(
    tmp_path: Path, served: list[Served]
) -> None:
    """Its starter killed during the setup (^C): nobody would know of the container (no
    `instance list` entry), so it does not serve; it tears down."""
    holder = Served(tmp_path, "persistent", "serve=1", starter_gone=True)
    served.append(holder)
    assert holder.proc.wait(5) == 0
    assert not holder.sock.exists()


def test_after_a_failed_setup_it_tears_down_then_reports(
    tmp_path: Path, served: list[Served]
) -> None:
    holder = Served(tmp_path, "ephemeral")  # no serve=1: the setup failed
    served.append(holder)
    assert holder.said() == json.dumps(REPORT).encode() + b"\n"
    assert holder.proc.wait(5) == 1
    assert not holder.sock.exists()  # gone before the report


def test_commands_it_does_not_know_are_closed_without_an_answer(
    tmp_path: Path, served: list[Served]
) -> None:
    holder = Served(tmp_path, "persistent", "serve=1")
    served.append(holder)
    holder.said()
    for cmd in (b"join\0x\n", b"bogus\n", b""):
        assert holder.ask(cmd) == b""
    assert json.loads(holder.ask(b" \tinfo\r\n"))["leases"] == 0
    assert holder.proc.poll() is None
