"""(Re)make the sysfs/devfs trees under tests/data/fabric/ (see README.md there).

    python tests/data/fabric/make_trees.py

Each tree is the small part of /sys and /dev that rankwire.fabric.hostfacts reads on one
kind of fabric node, laid out as the kernel documents it (real relative symlinks, one
value per attribute file). Device nodes are empty regular files: the code only checks
that they exist. `providers` holds what `fi_info -l` lists on such a node.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent


def write(root: Path, rel: str, text: str = "") -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text + ("\n" if text else ""))


def link(root: Path, rel: str, target: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, p)


def pci(root: Path, bridge: str, addr: str, vendor: int, device: int, cls: str, driver: str):
    """A PCI function under /sys/devices/pci<dom>/<bridge>/<addr>, its bus link and driver."""
    dom = addr.rsplit(":", 2)[0]
    rel = f"sys/devices/pci{dom}:{bridge.split(':')[1]}/{bridge}/{addr}"
    write(root, f"{rel}/vendor", f"0x{vendor:04x}")
    write(root, f"{rel}/device", f"0x{device:04x}")
    write(root, f"{rel}/class", cls)
    link(root, f"sys/bus/pci/devices/{addr}", f"../../../devices/{rel[len('sys/devices/') :]}")
    if driver:
        drv = root / f"sys/bus/pci/drivers/{driver}"
        drv.mkdir(parents=True, exist_ok=True)
        (drv / "bind").write_text("")  # a file, so git keeps the directory (as sysfs has)
        link(root, f"{rel}/driver", f"../../../../bus/pci/drivers/{driver}")
    return rel


def ib_device(root: Path, pci_rel: str, name: str, uverbs: str, link_layer: str, fw: str):
    """/sys/class/infiniband/<name>, its port 1, and /sys/class/infiniband_verbs/<uverbs>."""
    rel = f"{pci_rel}/infiniband/{name}"
    write(root, f"{rel}/node_type", "1: CA")
    write(root, f"{rel}/fw_ver", fw)
    write(root, f"{rel}/ports/1/state", "4: ACTIVE")
    write(root, f"{rel}/ports/1/link_layer", link_layer)
    link(root, f"{rel}/device", "../../../" + pci_rel.rsplit("/", 1)[1])
    link(root, f"sys/class/infiniband/{name}", "../../" + rel[len("sys/") :])
    urel = f"{pci_rel}/infiniband_verbs/{uverbs}"
    write(root, f"{urel}/ibdev", name)
    link(root, f"{urel}/device", "../../../" + pci_rel.rsplit("/", 1)[1])
    link(root, f"sys/class/infiniband_verbs/{uverbs}", "../../" + urel[len("sys/") :])
    write(root, f"dev/infiniband/{uverbs}")


def providers(root: Path, names: list[str]) -> None:
    write(root, "providers", "\n".join(names))


def make_mlx5(root: Path) -> None:
    # A ConnectX-6 HDR InfiniBand HCA (mlx5_core) next to an Intel i350 Ethernet port.
    pci(root, "0000:00:1c.0", "0000:01:00.0", 0x8086, 0x1521, "0x020000", "igb")
    hca = pci(root, "0000:3a:00.0", "0000:3b:00.0", 0x15B3, 0x101B, "0x020700", "mlx5_core")
    ib_device(root, hca, "mlx5_0", "uverbs0", "InfiniBand", "20.35.2000")
    write(root, "dev/infiniband/rdma_cm")
    write(root, "dev/infiniband/umad0")
    providers(root, ["verbs", "ofi_rxm", "ofi_rxd", "shm", "udp", "tcp", "sockets", "net"])


def make_efa(root: Path) -> None:
    # An AWS instance: ENA Ethernet plus one EFA device with predictable naming.
    pci(root, "0000:00:00.0", "0000:00:05.0", 0x1D0F, 0xEC20, "0x020000", "ena")
    efa = pci(root, "0000:00:00.0", "0000:00:06.0", 0x1D0F, 0xEFA1, "0x020000", "efa")
    ib_device(root, efa, "rdmap0s6", "uverbs0", "Unknown", "0.0.0.0")
    providers(root, ["efa", "ofi_rxm", "ofi_rxd", "shm", "udp", "tcp", "sockets", "net"])


def make_cxi(root: Path) -> None:
    # An HPE Cray EX node with two Cassini-1 NICs (cxi_ss1) and HPE's libfabric.
    for n, (bridge, addr) in enumerate(
        [("0000:40:01.1", "0000:41:00.0"), ("0000:c0:01.1", "0000:c1:00.0")]
    ):
        nic = pci(root, bridge, addr, 0x17DB, 0x0501, "0x020000", "cxi_ss1")
        for cls in ("cxi", "cxi_user"):
            rel = f"{nic}/{cls}/cxi{n}"
            write(root, f"{rel}/dev", f"{236 + (cls == 'cxi_user')}:{n}")
            link(root, f"{rel}/device", "../../../" + addr)
            link(root, f"sys/class/{cls}/cxi{n}", "../../" + rel[len("sys/") :])
        write(root, f"{nic}/cxi/cxi{n}/device/properties/nic_addr", f"0x{0x1200 + n:x}")
        write(root, f"dev/cxi{n}")
    providers(root, ["cxi", "ofi_rxm", "ofi_rxd", "shm", "udp", "tcp", "sockets", "net"])


def make_opx(root: Path) -> None:
    # An Omni-Path 100 HFI (hfi1) with Cornelis' libfabric (opx and psm2 providers).
    hfi = pci(root, "0000:5d:00.0", "0000:5e:00.0", 0x8086, 0x24F0, "0x020800", "hfi1")
    ib_device(root, hfi, "hfi1_0", "uverbs0", "InfiniBand", "1.27.0")
    write(root, "dev/hfi1_0")
    providers(root, ["opx", "psm2", "ofi_rxm", "ofi_rxd", "shm", "udp", "tcp", "sockets", "net"])


def make_mlx5_nodriver(root: Path) -> None:
    # A ConnectX-6 whose driver is not loaded: a PCI function and nothing else.
    pci(root, "0000:3a:00.0", "0000:3b:00.0", 0x15B3, 0x101B, "0x020700", "")
    providers(root, ["ofi_rxm", "ofi_rxd", "shm", "udp", "tcp", "sockets", "net"])


TREES = {
    "mlx5": make_mlx5,
    "efa": make_efa,
    "cxi": make_cxi,
    "opx": make_opx,
    "mlx5-nodriver": make_mlx5_nodriver,
}


def main() -> None:
    for name, make in TREES.items():
        root = HERE / name
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        make(root)


if __name__ == "__main__":
    main()
