"""Fabric host facts: adapters from (reconstructed) sysfs trees, ELF facts, the resolver."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from harness.host import LIBFABRIC
from rankwire.fabric.elf import read_elf, version_key
from rankwire.fabric.hostfacts import (
    FabricHostFacts,
    Resolver,
    detect_adapters,
    fabric_devices,
    fabric_key,
    host_libfabric,
    libfabric_facts,
)
from rankwire.fabric.imagefacts import Listing

DATA = Path(__file__).resolve().parent / "data" / "fabric"


@pytest.mark.parametrize(
    ("tree", "expected", "devices"),
    [
        (
            "mlx5",
            [
                (
                    "mlx5",
                    "mlx5_0",
                    "ConnectX-6",
                    "0000:3b:00.0",
                    "mlx5_core",
                    "InfiniBand",
                    ("/dev/infiniband/uverbs0",),
                )
            ],
            ("/dev/infiniband/rdma_cm", "/dev/infiniband/umad0", "/dev/infiniband/uverbs0"),
        ),
        (
            "efa",
            [
                (
                    "efa",
                    "rdmap0s6",
                    "EFA",
                    "0000:00:06.0",
                    "efa",
                    "Unknown",
                    ("/dev/infiniband/uverbs0",),
                )
            ],
            ("/dev/infiniband/uverbs0",),
        ),
        (
            "cxi",
            [
                (
                    "cxi",
                    "cxi0",
                    "Cassini-1 (Slingshot-11)",
                    "0000:41:00.0",
                    "cxi_ss1",
                    "",
                    ("/dev/cxi0",),
                ),
                (
                    "cxi",
                    "cxi1",
                    "Cassini-1 (Slingshot-11)",
                    "0000:c1:00.0",
                    "cxi_ss1",
                    "",
                    ("/dev/cxi1",),
                ),
            ],
            ("/dev/cxi0", "/dev/cxi1"),
        ),
        (
            "opx",
            [
                (
                    "hfi1",
                    "hfi1_0",
                    "Omni-Path HFI 100",
                    "0000:5e:00.0",
                    "hfi1",
                    "InfiniBand",
                    ("/dev/infiniband/uverbs0", "/dev/hfi1_0"),
                )
            ],
            ("/dev/infiniband/uverbs0", "/dev/hfi1_0"),
        ),
        ("mlx5-nodriver", [("mlx5", "", "ConnectX-6", "0000:3b:00.0", "", "", ())], ()),
    ],
)
def test_adapters_from_recorded_trees(tree: str, expected: list, devices: tuple) -> None:
    root = str(DATA / tree)
    found = [
        (a.kind, a.name, a.model, a.pci, a.driver, a.link_layer, a.devices)
        for a in detect_adapters(root)
    ]
    assert found == expected  # the Ethernet decoys (i350, ENA) are not fabric adapters
    assert fabric_devices(root) == devices


def test_no_sysfs_means_no_adapters(tmp_path: Path) -> None:
    assert detect_adapters(str(tmp_path)) == ()
    assert fabric_devices(str(tmp_path)) == ()


def readelf_versions(path: str) -> tuple[set[str], dict[str, set[str]]]:
    out = subprocess.run(
        ["readelf", "-V", "--wide", path], capture_output=True, text=True, check=True
    ).stdout
    defs = set(re.findall(r"Flags: none\s+Index: \d+\s+Cnt: \d+\s+Name: (\S+)", out))
    needs: dict[str, set[str]] = {}
    current = ""
    for line in out.split("Version needs section", 1)[-1].splitlines():
        m = re.search(r"File: (\S+)", line)
        if m:
            current = m.group(1)
        m = re.search(r"Name: (\S+)\s+Flags", line)
        if m and current:
            needs.setdefault(current, set()).add(m.group(1))
    return defs, needs


def test_elf_versions_agree_with_readelf() -> None:
    elf = read_elf(LIBFABRIC)
    defs, needs = readelf_versions(LIBFABRIC)
    assert elf.soname == "libfabric.so.1"
    assert set(elf.defines) == defs
    assert "FABRIC_1.3" in elf.defines and "FABRIC_1.7" not in elf.defines  # libfabric 1.17
    assert {f: set(v) for f, v in elf.requires} == needs
    assert max(elf.required_from("libc.so.6"), key=version_key) == "GLIBC_2.34"


def test_read_elf_from_bytes_and_rejects_non_elf(tmp_path: Path) -> None:
    data = Path(LIBFABRIC).read_bytes()
    assert read_elf(data) == read_elf(LIBFABRIC)
    text = tmp_path / "libc.so"
    text.write_text("/* GNU ld script */\nGROUP ( libc.so.6 )\n")
    with pytest.raises(ValueError, match="not an ELF"):
        read_elf(str(text))


def test_resolver_finds_what_ldd_finds() -> None:
    ldd = subprocess.run(["ldd", LIBFABRIC], capture_output=True, text=True, check=True).stdout
    expected = dict(re.findall(r"^\s*(\S+) => (\S+)", ldd, re.M))
    lib = libfabric_facts(LIBFABRIC, "1.17", ["tcp"], environ={})
    closure = dict(lib.closure([("libfabric.so.1", LIBFABRIC)]))
    assert "libc.so.6" not in closure  # glibc is never the host's to bind
    for name, obj in closure.items():
        if name != "libfabric.so.1":
            assert os.path.realpath(expected[name]) == obj.real, name
    assert set(closure) - {"libfabric.so.1"} == {n for n in expected if n != "libc.so.6"}


def test_resolver_expands_origin_and_honours_ld_library_path(tmp_path: Path) -> None:
    elf = read_elf(LIBFABRIC)
    (tmp_path / "sub").mkdir()
    copy = tmp_path / "sub" / "libnuma.so.1"
    copy.write_bytes(Path("/usr/lib/x86_64-linux-gnu/libnuma.so.1").read_bytes())
    requester = tmp_path / "libx.so"
    requester.write_bytes(b"")
    with_runpath = type(elf)(**{**elf.__dict__, "runpath": ("$ORIGIN/sub",)})
    assert Resolver("", cache={}).find("libnuma.so.1", str(requester), with_runpath) == str(copy)
    via_env = Resolver(f"{tmp_path}/empty:{tmp_path}/sub", cache={})
    assert via_env.find("libnuma.so.1", "/usr/lib/libx.so", elf) == str(copy)
    # Where it looked, up to where it found it: a library put there would win.
    assert list(via_env.searched) == [f"{tmp_path}/empty", f"{tmp_path}/sub"]
    assert Resolver("", cache={}).find("libnope.so.7", "/usr/lib/libx.so", elf) == ""


def test_host_libfabric_facts_include_verbs_plugins() -> None:
    lib = libfabric_facts(LIBFABRIC, "1.17", ["tcp"], environ={})
    plugins = {os.path.basename(p) for p in lib.verbs_plugins}
    assert {"libmlx5-rdmav34.so", "libefa-rdmav34.so"} <= plugins
    assert lib.verbs_config == "/etc/libibverbs.d"
    assert lib.dl_providers == ()  # Debian's libfabric has every provider built in
    assert "/usr/lib/x86_64-linux-gnu" in lib.searched or "/lib/x86_64-linux-gnu" in lib.searched


def test_image_listing_resolves_symlinks_inside_the_image() -> None:
    listing = Listing.parse(
        "\n".join(
            [
                "drwxr-xr-x root/root 3 2024-01-01 00:00 R",
                "lrwxrwxrwx root/root 7 2024-01-01 00:00 R/lib -> usr/lib",
                "drwxr-xr-x root/root 3 2024-01-01 00:00 R/usr",
                "drwxr-xr-x root/root 3 2024-01-01 00:00 R/usr/lib",
                "lrwxrwxrwx root/root 9 2024-01-01 00:00 R/usr/lib/libc.so.6 -> libc-2.so",
                "-rwxr-xr-x root/root 1234 2024-01-01 00:00 R/usr/lib/libc-2.so",
                "lrwxrwxrwx root/root 9 2024-01-01 00:00 R/usr/lib/loop -> /usr/lib/loop",
                "lrwxrwxrwx root/root 9 2024-01-01 00:00 R/usr/lib/out -> ../../../etc",
                "crw-rw-rw- root/root 1,  3 2024-01-01 00:00 R/dev/null",
            ]
        )
    )
    assert listing.regular("/lib/libc.so.6") == "/usr/lib/libc-2.so"
    assert listing.resolve("/usr/lib/loop") == ""  # a loop leads nowhere
    assert listing.resolve("/usr/lib/out") == ""  # "../.." stops at the image root: no /etc
    assert listing.entries["/dev/null"][0] == "c"
    assert listing.named(["libc.so*"]) == ["/usr/lib/libc.so.6"]


def test_host_libfabric_is_kept_in_the_users_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading libfabric costs 0.2-0.3 s: with a cache dir its facts are read once and
    taken back while the boot, the environment libfabric reads, the hardware and every
    file they came from are the same; any of those differing, it is loaded again."""
    from rankwire.fabric import discovery, factcache

    monkeypatch.setattr(factcache, "SETTLE_NS", 0)  # its LD_LIBRARY_PATH dir is new
    loads: list[str] = []
    real_library = discovery.library

    def library() -> discovery.Library:
        loads.append(os.environ.get("FI_PROVIDER", ""))
        return real_library()

    monkeypatch.setattr(discovery, "library", library)
    libdir = tmp_path / "lib"
    libdir.mkdir()
    monkeypatch.setenv("LD_LIBRARY_PATH", str(libdir))
    monkeypatch.delenv("FI_PROVIDER", raising=False)
    cache = str(tmp_path / "cache")
    one = FabricHostFacts((), ("/dev/infiniband/uverbs0",), None)
    first = host_libfabric(cache, hardware=one)
    assert host_libfabric(cache, hardware=one) == first
    assert len(loads) == 1  # the second came from the cache
    assert len(os.listdir(tmp_path / "cache" / "host-libfabric")) == 1
    assert first == host_libfabric()  # and is what loading it says

    two = FabricHostFacts((), ("/dev/infiniband/uverbs0", "/dev/infiniband/uverbs1"), None)
    host_libfabric(cache, hardware=two)  # another device
    monkeypatch.setenv("FI_PROVIDER", "tcp")  # another provider filter
    host_libfabric(cache, hardware=one)
    monkeypatch.delenv("FI_PROVIDER")
    (libdir / "libfabric.so.1").write_bytes(b"")  # a file where the loader looks first
    host_libfabric(cache, hardware=one)
    assert loads == ["", "", "", "tcp", ""]


def test_fabric_key_holds_what_the_fabric_facts_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kept plan's fabric key (recorded mlx5 tree): each adapter port's state as the
    planner saw it, by content; the device nodes; where the library was looked for even
    when none was found (one installed later must be seen); and no key at all while a
    keyed file changed too lately to tell whether the facts saw it."""
    from rankwire.fabric import hostfacts

    root = str(DATA / "mlx5")
    host = FabricHostFacts(detect_adapters(root), fabric_devices(root), None)
    key = fabric_key(host, root)
    assert key is not None
    files, gone, states = key
    assert states == {"/sys/class/infiniband/mlx5_0/ports/1/state": "4: ACTIVE"}
    assert "/dev/infiniband/uverbs0" in gone  # not on this host: keyed by its absence
    loader = hostfacts._loader_paths()
    assert [p for p in loader if p in files or p in gone] == loader  # looked for, not found
    assert fabric_key(FabricHostFacts((), (), None)) == ([], {}, {})  # nothing looked at
    fresh = tmp_path / "lib"
    fresh.mkdir()
    monkeypatch.setenv("LD_LIBRARY_PATH", str(fresh))
    assert fabric_key(host, root) is None  # changed just now
