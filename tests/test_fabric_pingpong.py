"""`rankwire fabric info|pingpong`, on the host and inside a container (root and user).

The container image (conftest's `base_image`) has no libfabric at all: the self-test can
only run there because the fabric plan binds the host's in.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from harness.host import LIBFABRIC
from harness.users import User
from rankwire.fabric.pingpong import parse_output, parse_size, show_size
from rankwire.fabric.plan import LIB_DIR

QUICK = ["-n", "200", "-w", "20", "-s", "64", "-s", "1M", "--json"]


def fabric_argv(user: User | None = None) -> list[str]:
    return ["rankwire", "fabric"]


def run_as(user: User, *args: str) -> subprocess.CompletedProcess:
    return user.run([*fabric_argv(user), *args], cwd="/tmp", timeout=120)


def host_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*fabric_argv(), *args], capture_output=True, text=True, timeout=120, cwd="/tmp"
    )


def devino(path: str) -> str:
    st = os.stat(path)
    return f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"


def test_sizes() -> None:
    assert [parse_size(s) for s in ("64", "4k", "1M", "1MiB", "2 MB", "1G")] == [
        64,
        4096,
        1 << 20,
        1 << 20,
        2 << 20,
        1 << 30,
    ]
    assert show_size(64) == "64 B" and show_size(1 << 20) == "1 MiB"


def test_parse_output_needs_results() -> None:
    from rankwire.errors import UserError

    with pytest.raises(UserError, match="no results"):
        parse_output('{"event": "info", "provider": "shm"}\n')


def test_info_lists_this_hosts_providers_and_the_auto_choice() -> None:
    proc = host_run("info")
    assert proc.returncode == 0, proc.stderr
    providers = re.search(r"^providers\s+(.*)$", proc.stdout, re.M)
    assert providers
    assert {"tcp", "udp", "shm", "sockets"} <= set(providers.group(1).split(", "))
    assert re.search(r"^rdm\s+tcp;ofi_rxm\s+.*\blo\b", proc.stdout, re.M)
    assert re.search(r"^auto\s+-: no fabric adapter found", proc.stdout, re.M)
    data = json.loads(host_run("info", "--json").stdout)
    assert data["library"] == {"path": LIBFABRIC, "version": "1.17"}
    assert data["auto"]["provider"] == "" and data["adapters"] == []


@pytest.mark.parametrize(("provider", "reported"), [("shm", "shm"), ("tcp", "tcp;ofi_rxm")])
def test_pingpong_on_the_host(provider: str, reported: str) -> None:
    proc = host_run("pingpong", "-p", provider, *QUICK)
    assert proc.returncode == 0, proc.stderr
    run = json.loads(proc.stdout)
    assert run["provider"] == reported and run["library"] == LIBFABRIC
    if provider == "tcp":
        assert run["domain"] == "lo"  # loopback only
    assert [r["size"] for r in run["results"]] == [64, 1 << 20]
    for r in run["results"]:
        assert r["iterations"] == 200 and r["warmup"] == 20
        assert r["latency_us"] > 0 and r["bandwidth_MBps"] > 0
        assert r["latency_us"] == pytest.approx(r["rtt_us"] / 2, rel=1e-3)


def test_pingpong_table_and_tagged_mode() -> None:
    proc = host_run("pingpong", "-p", "shm", "--mode", "tagged", "-n", "50", "-w", "5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("provider   shm (tagged) on shm, on the host")
    assert re.search(r"^\s+64 B\s+50\s+[\d.]+\s+[\d.]+$", proc.stdout, re.M)
    assert re.search(r"^\s+1 MiB\s+50\s+", proc.stdout, re.M)


def test_pingpong_with_an_unknown_provider_is_one_line() -> None:
    proc = host_run("pingpong", "-p", "nosuch")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "no such core provider" in proc.stderr


@pytest.mark.slow
@pytest.mark.usefixtures("nothing_left_behind")
@pytest.mark.parametrize("provider", ["shm", "tcp"])
def test_pingpong_in_a_container_loads_the_bound_host_libfabric(
    runner: User, base_image: Path, provider: str
) -> None:
    proc = run_as(runner, "pingpong", "--image", str(base_image), "-p", provider, *QUICK)
    assert proc.returncode == 0, proc.stderr
    run = json.loads(proc.stdout)
    assert run["provider"].split(";")[0] == provider
    # The image has no libfabric: the one mapped is the plan's bind of the host file.
    assert run["library"] == f"{LIB_DIR}/libfabric.so.1"
    assert run["library_dev_inode"] == devino(LIBFABRIC)
    assert [r["size"] for r in run["results"]] == [64, 1 << 20]
    assert all(r["latency_us"] > 0 and r["bandwidth_MBps"] > 0 for r in run["results"])
