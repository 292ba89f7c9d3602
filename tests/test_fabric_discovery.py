"""libfabric discovery through the cffi ABI-mode binding, checked against libfabric-bin."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from rankwire.errors import UserError
from rankwire.fabric import _ffi, discovery


def fi_info(*args: str) -> str:
    return subprocess.run(["fi_info", *args], capture_output=True, text=True, check=True).stdout


def test_providers_are_what_fi_info_lists() -> None:
    listed = re.findall(r"^(\S+):$", fi_info("-l"), re.M)
    assert discovery.providers() == tuple(listed)
    assert {"tcp", "udp", "shm", "sockets"} <= set(listed)


def test_library_is_the_file_the_loader_maps_and_its_version() -> None:
    lib = discovery.library()
    assert os.path.isabs(lib.path) and "libfabric.so" in lib.path
    # fi_info (linked against libfabric.so.1) loads the same file and version.
    version = re.search(r"^libfabric: (\d+\.\d+)", fi_info("--version"), re.M)
    assert version and lib.version == version.group(1)
    ldd = subprocess.run(["ldd", shutil.which("fi_info")], capture_output=True, text=True)
    found = re.search(r"libfabric\.so\.1 => (\S+)", ldd.stdout)
    assert found and os.path.realpath(found.group(1)) == os.path.realpath(lib.path)


def test_getinfo_shm_and_tcp_endpoints() -> None:
    shm = discovery.getinfo("shm")
    assert shm and {i.provider for i in shm} == {"shm"}
    assert all(i.endpoint_type == "rdm" and "FI_TAGGED" in i.caps for i in shm)
    tcp = discovery.getinfo("tcp", caps=("msg",))
    assert {i.core_provider for i in tcp} == {"tcp"}
    assert "lo" in {i.domain for i in tcp}
    assert all(i.nic is None for i in (*shm, *tcp))  # IP/shm providers fill no NIC attrs
    # Agrees with fi_info's own view of the same query.
    text = fi_info("-p", "tcp", "-t", "FI_EP_RDM")
    assert {i.provider for i in tcp} <= set(re.findall(r"provider: (\S+)", text))


def test_getinfo_of_a_provider_without_endpoints_is_empty() -> None:
    # psm2 (Omni-Path) is compiled into this libfabric, but there is no hfi1 device here;
    # a provider that is not compiled in would give () as well, so check it is there.
    assert "psm2" in discovery.providers()
    assert not list(Path("/dev").glob("hfi1*"))
    assert discovery.getinfo("psm2") == ()


def test_bad_endpoint_type_is_a_user_error() -> None:
    with pytest.raises(UserError, match="endpoint type"):
        discovery.getinfo("tcp", endpoint="stream")


def test_missing_libfabric_is_a_user_error(monkeypatch) -> None:
    monkeypatch.setattr(_ffi, "_loaded", None)
    monkeypatch.setattr(_ffi, "SONAME", "libfabric.so.999")
    with pytest.raises(UserError, match=r"libfabric.so.999 cannot be loaded.*install") as err:
        discovery.providers()
    assert "\n" not in str(err.value)


STRUCT_PROBE = r"""
#include <stdio.h>
#include <stddef.h>
#include <rdma/fabric.h>
#define S(t) printf("struct %s %zu\n", #t, sizeof(struct t));
#define O(t, f) printf("offset %s.%s %zu\n", #t, #f, offsetof(struct t, f));
int main(void) {
    S(fi_info) S(fi_tx_attr) S(fi_rx_attr) S(fi_ep_attr) S(fi_domain_attr)
    S(fi_fabric_attr) S(fid_nic) S(fi_bus_attr) S(fi_link_attr) S(fi_device_attr)
    O(fi_info, fabric_attr) O(fi_info, nic) O(fi_domain_attr, mr_mode)
    O(fi_domain_attr, tclass) O(fi_ep_attr, max_msg_size) O(fi_tx_attr, inject_size)
    O(fi_link_attr, network_type) O(fi_fabric_attr, prov_version)
    return 0;
}
"""


def test_cdef_layout_matches_the_c_headers(tmp_path: Path) -> None:
    if not shutil.which("cc") or not Path("/usr/include/rdma/fabric.h").exists():
        pytest.skip("needs a C compiler and libfabric-dev")
    src = tmp_path / "probe.c"
    src.write_text(STRUCT_PROBE)
    subprocess.run(["cc", "-o", str(tmp_path / "probe"), str(src)], check=True)
    out = subprocess.run([str(tmp_path / "probe")], capture_output=True, text=True).stdout
    ffi, _lib = _ffi.load()
    for line in out.splitlines():
        kind, name, value = line.split()
        if kind == "struct":
            assert ffi.sizeof(f"struct {name}") == int(value), name
            if f"struct {name}" in _ffi.STRUCT_SIZES:
                assert _ffi.STRUCT_SIZES[f"struct {name}"] == int(value)
        else:
            struct, field = name.split(".")
            assert ffi.offsetof(f"struct {struct}", field) == int(value), name
