"""Fabric host facts: adapters (sysfs + /dev), the host libfabric and what it loads.

Read once into plain data for `plan.plan_fabric`; nothing here decides anything.
`root` points adapter detection at a recorded sysfs/devfs tree (tests/data/fabric/);
libraries are always read from the real host, from the paths given.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any, Optional

from rankwire.fabric.elf import ElfFacts, elf_from_dict, is_glibc, read_elf
from rankwire.record import record

# PCI ids of fabric adapters: (vendor, device) -> (kind, model).
# Sources: rdma-core providers/{mlx5,efa,hfi1verbs}, HPE shs-cxi-driver cass_core.h.
PCI_IDS: dict[tuple[int, int], tuple[str, str]] = {
    (0x15B3, 0x1013): ("mlx5", "ConnectX-4"),
    (0x15B3, 0x1014): ("mlx5", "ConnectX-4 VF"),
    (0x15B3, 0x1015): ("mlx5", "ConnectX-4 Lx"),
    (0x15B3, 0x1016): ("mlx5", "ConnectX-4 Lx VF"),
    (0x15B3, 0x1017): ("mlx5", "ConnectX-5"),
    (0x15B3, 0x1018): ("mlx5", "ConnectX-5 VF"),
    (0x15B3, 0x1019): ("mlx5", "ConnectX-5 Ex"),
    (0x15B3, 0x101A): ("mlx5", "ConnectX-5 Ex VF"),
    (0x15B3, 0x101B): ("mlx5", "ConnectX-6"),
    (0x15B3, 0x101C): ("mlx5", "ConnectX-6 VF"),
    (0x15B3, 0x101D): ("mlx5", "ConnectX-6 Dx"),
    (0x15B3, 0x101E): ("mlx5", "ConnectX-6 Dx/Lx VF"),
    (0x15B3, 0x101F): ("mlx5", "ConnectX-6 Lx"),
    (0x15B3, 0x1021): ("mlx5", "ConnectX-7"),
    (0x15B3, 0x1023): ("mlx5", "ConnectX-8"),
    (0x15B3, 0xA2D6): ("mlx5", "BlueField-2"),
    (0x15B3, 0xA2DC): ("mlx5", "BlueField-3"),
    (0x1D0F, 0xEFA0): ("efa", "EFA"),
    (0x1D0F, 0xEFA1): ("efa", "EFA"),
    (0x1D0F, 0xEFA2): ("efa", "EFA"),
    (0x1D0F, 0xEFA3): ("efa", "EFA"),
    (0x1D0F, 0xEFA4): ("efa", "EFA"),
    (0x17DB, 0x0501): ("cxi", "Cassini-1 (Slingshot-11)"),
    (0x1590, 0x0371): ("cxi", "Cassini-2 (Slingshot)"),
    (0x8086, 0x24F0): ("hfi1", "Omni-Path HFI 100"),
    (0x8086, 0x24F1): ("hfi1", "Omni-Path HFI 100"),
}
MULTIARCH = {
    "x86_64": "x86_64-linux-gnu",
    "aarch64": "aarch64-linux-gnu",
    "ppc64le": "powerpc64le-linux-gnu",
}
VERBS_CONFIG_DIR = "/etc/libibverbs.d"
LD_CACHE = "/etc/ld.so.cache"  # what `ld_cache`'s `ldconfig -p` reads
_CACHE_LINE = re.compile(r"^\s*(\S+)\s+\(([^)]*)\)\s+=>\s+(\S+)\s*$")


@record
class Adapter:
    """One fabric adapter: a known PCI function and/or a kernel fabric device."""

    kind: str  # cxi | efa | hfi1 | mlx5 | rdma (another RDMA HCA) | soft-rdma (rxe, siw)
    name: str  # kernel device name (cxi0, mlx5_0, rdmap0s6, hfi1_0); "" when no driver
    model: str
    pci: str  # "0000:3b:00.0" or ""
    vendor_id: str  # "0x15b3" or ""
    device_id: str
    driver: str  # kernel driver bound to the PCI function
    link_layer: str  # InfiniBand | Ethernet | ""
    state: str  # "4: ACTIVE" as the kernel words it, or ""
    devices: tuple[str, ...]  # its /dev nodes

    @property
    def link_up(self) -> bool:
        """Port 1 ACTIVE (adapters without InfiniBand-style ports count as up)."""
        return not self.state or self.state.endswith("ACTIVE")

    def describe(self) -> str:
        where = ", ".join(x for x in (self.pci, self.link_layer, self.state) if x)
        label = f"{self.model} {self.name}".strip() if self.model else self.name
        return f"{label} ({where})" if where else label


@record
class HostObject:
    """One host ELF that a bind plan may bring into a container."""

    path: str  # where the host finds it (may be a symlink)
    real: str  # the file behind it: the bind source
    elf: ElfFacts
    deps: tuple[tuple[str, str], ...]  # (DT_NEEDED name, host path) of non-glibc deps
    missing: tuple[str, ...]  # non-glibc DT_NEEDED names not found on the host


def objects_from_dicts(objects: Iterable[dict[str, Any]]) -> tuple[HostObject, ...]:
    """`HostObject`s back from their `dataclasses.asdict` (a fact cache's JSON)."""
    return tuple(
        HostObject(
            path=o["path"],
            real=o["real"],
            elf=elf_from_dict(o["elf"]),
            deps=tuple((n, p) for n, p in o["deps"]),
            missing=tuple(o["missing"]),
        )
        for o in objects
    )


@record
class HostLibfabric:
    path: str  # the libfabric.so.1 the host loader picks
    version: str  # "1.17"
    providers: tuple[str, ...]  # registered providers (`fi_info -l`)
    objects: tuple[HostObject, ...]  # every object reachable from the roots below
    dl_providers: tuple[str, ...]  # lib<name>-fi.so files libfabric would dlopen
    verbs_plugins: tuple[str, ...]  # libibverbs driver plugins, as installed
    verbs_config: str  # /etc/libibverbs.d, or "" when absent
    # Every dir the loader's search looked in for these objects (`Resolver.searched`): a
    # library put in one would be loaded instead.
    searched: tuple[str, ...] = ()

    def object(self, path: str) -> HostObject:
        for obj in self.objects:
            if obj.path == path:
                return obj
        raise KeyError(path)

    def closure(self, roots: Iterable[tuple[str, str]]) -> list[tuple[str, HostObject]]:
        return closure(self.objects, roots)


def closure(
    objects: Iterable[HostObject], roots: Iterable[tuple[str, str]]
) -> list[tuple[str, HostObject]]:
    """(name, object) for the (name, path) `roots` and their non-glibc deps, each once.

    `name` is the file name the loader looks for: the DT_NEEDED entry for a dep.
    """
    by_path = {o.path: o for o in objects}
    seen: set[str] = set()
    out: list[tuple[str, HostObject]] = []
    todo = list(roots)
    while todo:
        name, path = todo.pop(0)
        if path in seen:
            continue
        seen.add(path)
        obj = by_path[path]
        out.append((name, obj))
        todo += list(obj.deps)
    return out


@record
class FabricHostFacts:
    adapters: tuple[Adapter, ...]
    devices: tuple[str, ...]  # fabric device nodes present: /dev/infiniband/*, /dev/cxi*, ...
    libfabric: Optional[HostLibfabric]  # None: not found, or not looked at

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- adapters ---------------------------------------------------------------------------
def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _hex(text: str) -> Optional[int]:
    try:
        return int(text, 16)
    except ValueError:
        return None


def _pci_of(root: str, class_dev: str) -> str:
    """PCI address behind a /sys/class/*/<dev>: the basename of its `device` link."""
    link = os.path.join(class_dev, "device")
    if not os.path.exists(link):
        return ""
    name = os.path.basename(os.path.realpath(link))
    return name if re.match(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$", name) else ""


def _driver(root: str, pci: str) -> str:
    link = os.path.join(root, "sys/bus/pci/devices", pci, "driver")
    return os.path.basename(os.path.realpath(link)) if os.path.exists(link) else ""


def _dev(root: str, *parts: str) -> list[str]:
    """Existing /dev nodes matching a glob under `root`, as paths inside /dev."""
    base = os.path.join(root, "dev")
    return sorted("/dev/" + os.path.relpath(p, base) for p in glob.glob(os.path.join(base, *parts)))


def detect_adapters(root: str = "/") -> tuple[Adapter, ...]:
    """Fabric adapters from sysfs and devfs under `root` (what it lists: `ADAPTER_GLOBS`)."""
    sysfs = os.path.join(root, "sys")
    pci_ids: dict[str, tuple[int, int]] = {}
    for dev in sorted(glob.glob(os.path.join(sysfs, "bus/pci/devices/*"))):
        vendor, device = _hex(_read(f"{dev}/vendor")), _hex(_read(f"{dev}/device"))
        if vendor is not None and device is not None:
            pci_ids[os.path.basename(dev)] = (vendor, device)

    uverbs: dict[str, str] = {}  # ibdev -> /dev/infiniband/uverbsN
    for ud in sorted(glob.glob(os.path.join(sysfs, "class/infiniband_verbs/uverbs*"))):
        ibdev = _read(f"{ud}/ibdev")
        node = f"/dev/infiniband/{os.path.basename(ud)}"
        if ibdev and os.path.exists(os.path.join(root, node.lstrip("/"))):
            uverbs[ibdev] = node

    found: list[Adapter] = []
    for class_dev in sorted(glob.glob(os.path.join(sysfs, "class/cxi/cxi*"))):
        name = os.path.basename(class_dev)
        found.append(_adapter(root, pci_ids, "cxi", name, class_dev, _dev(root, name), "", ""))
    for class_dev in sorted(glob.glob(os.path.join(sysfs, "class/infiniband/*"))):
        name = os.path.basename(class_dev)
        ports = sorted(glob.glob(f"{class_dev}/ports/*"))
        link = _read(f"{ports[0]}/link_layer") if ports else ""
        state = _read(f"{ports[0]}/state") if ports else ""
        nodes = [uverbs[name]] if name in uverbs else []
        if name.startswith("hfi1"):
            nodes += _dev(root, name)
        guess = "hfi1" if name.startswith("hfi1") else "efa" if name.startswith("efa") else ""
        guess = guess or ("mlx5" if name.startswith("mlx5") else "rdma")
        found.append(_adapter(root, pci_ids, guess, name, class_dev, nodes, link, state))

    # Known PCI functions without a kernel device: the driver is not loaded.
    claimed = {a.pci for a in found}
    for pci, ids in pci_ids.items():
        if ids in PCI_IDS and pci not in claimed:
            kind, model = PCI_IDS[ids]
            found.append(
                Adapter(
                    kind,
                    "",
                    model,
                    pci,
                    f"0x{ids[0]:04x}",
                    f"0x{ids[1]:04x}",
                    _driver(root, pci),
                    "",
                    "",
                    (),
                )
            )
    return tuple(found)


def _adapter(
    root: str,
    pci_ids: Mapping[str, tuple[int, int]],
    guess: str,
    name: str,
    class_dev: str,
    nodes: list[str],
    link: str,
    state: str,
) -> Adapter:
    pci = _pci_of(root, class_dev)
    ids = pci_ids.get(pci)
    kind, model = PCI_IDS.get(ids, (guess, "")) if ids else (guess, "")
    if kind == "rdma" and not pci:
        kind = "soft-rdma"  # rxe/siw: RDMA emulated over Ethernet, no faster than tcp
    return Adapter(
        kind=kind,
        name=name,
        model=model,
        pci=pci,
        vendor_id=f"0x{ids[0]:04x}" if ids else "",
        device_id=f"0x{ids[1]:04x}" if ids else "",
        driver=_driver(root, pci) if pci else "",
        link_layer=link,
        state=state,
        devices=tuple(nodes),
    )


# Paths that appear when a fabric adapter's driver comes up (the classes and device nodes
# `detect_adapters` and `fabric_devices` read): a plan made without one must not outlive
# its coming (runtime/joinplan.py `remember_exec` keys on their existence).
ADAPTER_SIGNS = (
    "/sys/class/infiniband",
    "/sys/class/cxi",
    "/dev/infiniband",
    "/dev/cxi0",
    "/dev/hfi1_0",
)


# What appears with a GPU's driver (NVIDIA's, whose device nodes may only be made at the
# first CUDA call; AMD's ROCm; a DRM render node: Intel's and others'): an MPI may pick
# its transport for them (`launcher/facts.fabric_free`); keyed as the signs above are.
GPU_SIGNS = (
    "/proc/driver/nvidia/gpus",
    "/dev/nvidiactl",
    "/sys/class/kfd",
    "/dev/kfd",
    "/dev/dri/renderD128",
)
# The globs whose matches `detect_adapters` and `fabric_devices` read (keep them in step):
# a kept plan's key lists them (`joinplan.key_records`), so that a second adapter, a new
# device node or PCI function under a class that was there already is seen too.
ADAPTER_GLOBS = (
    "/sys/bus/pci/devices/*",
    "/sys/class/infiniband_verbs/uverbs*",
    "/sys/class/cxi/cxi*",
    "/sys/class/infiniband/*",
    "/dev/infiniband/*",
    "/dev/cxi[0-9]*",
    "/dev/hfi1_*",
)


def fabric_devices(root: str = "/") -> tuple[str, ...]:
    """Every fabric device node present under `root`/dev."""
    return tuple(_dev(root, "infiniband", "*") + _dev(root, "cxi[0-9]*") + _dev(root, "hfi1_*"))


# -- libraries --------------------------------------------------------------------------
class Resolver:
    """Finds DT_NEEDED names the way the host's dynamic loader does (ld.so(8) order)."""

    def __init__(self, ld_library_path: str = "", cache: Optional[Mapping[str, list[str]]] = None):
        self.ld_library_path = [p for p in ld_library_path.split(":") if p]
        self.cache = cache if cache is not None else ld_cache()
        self.defaults = self.default_dirs()
        # Every dir looked in, in order, up to where each name was found: a library put in
        # one of them would be found instead (a kept plan keys them).
        self.searched: dict[str, None] = {}

    @staticmethod
    def default_dirs() -> list[str]:
        """Where the loader looks last (ld.so(8)'s trusted dirs, multiarch first)."""
        triplet = MULTIARCH.get(os.uname().machine, "")
        dirs = [f"/lib/{triplet}", f"/usr/lib/{triplet}"] if triplet else []
        return [*dirs, "/lib64", "/usr/lib64", "/lib", "/usr/lib"]

    def find(self, name: str, requester: str, elf: ElfFacts) -> str:
        if "/" in name:
            return name if os.path.isfile(name) else ""
        origin = os.path.dirname(os.path.realpath(requester))

        def expand(dirs: Iterable[str]) -> list[str]:
            return [re.sub(r"\$(ORIGIN|\{ORIGIN\})", origin, d) for d in dirs]

        dirs = [] if elf.runpath else expand(elf.rpath)
        dirs += self.ld_library_path + expand(elf.runpath)
        candidates = [os.path.join(d, name) for d in dirs]
        candidates += self.cache.get(name, [])
        candidates += [os.path.join(d, name) for d in self.defaults]
        for path in candidates:
            self.searched[os.path.dirname(path)] = None
            if os.path.isfile(path) and _same_arch(path, elf):
                return path
        return ""


def _same_arch(path: str, elf: ElfFacts) -> bool:
    machines = {"EM_X86_64": 62, "EM_AARCH64": 183, "EM_PPC64": 21, "EM_386": 3}
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return False
    if head[:4] != b"\x7fELF" or head[4] != (2 if elf.elfclass == 64 else 1):
        return False
    want = machines.get(elf.machine)
    return want is None or int.from_bytes(head[18:20], "little") == want


def ld_cache() -> dict[str, list[str]]:
    """name -> paths from the host's ld.so.cache (`ldconfig -p`)."""
    import shutil  # not at import: the facts are cached, and read thus only now and then
    import subprocess

    exe = shutil.which("ldconfig") or next(
        (p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig") if os.path.exists(p)), None
    )
    if not exe:
        return {}
    try:
        out = subprocess.run([exe, "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    cache: dict[str, list[str]] = {}
    for line in out.splitlines():
        m = _CACHE_LINE.match(line)
        if m:
            cache.setdefault(m.group(1), []).append(m.group(3))
    return cache


def library_graph(roots: Iterable[str], resolver: Resolver) -> dict[str, HostObject]:
    """Every object reachable from `roots` by non-glibc DT_NEEDED, as the host loader finds them."""
    objects: dict[str, HostObject] = {}
    todo = list(roots)
    while todo:
        path = todo.pop(0)
        if path in objects:
            continue
        elf = read_elf(path)
        deps: list[tuple[str, str]] = []
        missing: list[str] = []
        for name in elf.needed:
            if is_glibc(name):
                continue
            found = resolver.find(name, path, elf)
            if found:
                deps.append((name, found))
                todo.append(found)
            else:
                missing.append(name)
        objects[path] = HostObject(path, os.path.realpath(path), elf, tuple(deps), tuple(missing))
    return objects


def dl_provider_dirs(libfabric: str, environ: Mapping[str, str]) -> list[str]:
    """Where libfabric looks for lib<name>-fi.so: FI_PROVIDER_PATH, else <libdir>/libfabric."""
    configured = environ.get("FI_PROVIDER_PATH", "").lstrip("@")
    if configured:
        return [d for d in configured.split(":") if d]
    return [os.path.join(os.path.dirname(os.path.realpath(libfabric)), "libfabric")]


def libfabric_facts(
    path: str,
    version: str,
    providers: Iterable[str],
    environ: Optional[Mapping[str, str]] = None,
    resolver: Optional[Resolver] = None,
) -> HostLibfabric:
    """The host libfabric at `path`, its DL providers, verbs plugins and all their deps."""
    environ = os.environ if environ is None else environ
    resolver = resolver or Resolver(environ.get("LD_LIBRARY_PATH", ""))
    dl = sorted(
        p for d in dl_provider_dirs(path, environ) for p in glob.glob(os.path.join(d, "lib*-fi.so"))
    )
    objects = library_graph([path, *dl], resolver)
    plugins: list[str] = []
    verbs = [o for o in objects.values() if o.elf.soname == "libibverbs.so.1"]
    if verbs:
        plugin_dir = os.path.join(os.path.dirname(verbs[0].real), "libibverbs")
        plugins = sorted(glob.glob(os.path.join(plugin_dir, "lib*-rdmav*.so")))
        objects.update(library_graph(plugins, resolver))
    return HostLibfabric(
        path=path,
        version=version,
        providers=tuple(providers),
        objects=tuple(objects.values()),
        dl_providers=tuple(dl),
        verbs_plugins=tuple(plugins),
        verbs_config=VERBS_CONFIG_DIR if plugins and os.path.isdir(VERBS_CONFIG_DIR) else "",
        searched=tuple(resolver.searched),
    )


# What the loader, libfabric and its providers' libraries read from the environment:
# a cached libfabric's facts hold for the same values only.
LIBFABRIC_ENV = ("LD_", "FI_", "RDMAV_", "IBV_", "PSM_", "PSM2_", "PSM3_", "HFI_")
BOOT_ID = "/proc/sys/kernel/random/boot_id"
LD_PRELOAD_FILE = "/etc/ld.so.preload"


def host_libfabric(
    cache_dir: Optional[str] = None, hardware: Optional[FabricHostFacts] = None
) -> HostLibfabric:
    """The libfabric.so.1 this host loads (UserError when there is none) and its objects.

    With `cache_dir`, the facts are kept there (`fabric/factcache.py`) and taken back
    while this boot, the environment it reads (`LIBFABRIC_ENV`), `hardware` (the
    adapters and device nodes found, as read already) and every file and directory they
    came from (the device nodes too: their modes decide which providers may open them) are
    the same: loading libfabric to ask it for its providers costs 0.2-0.3 s (Debian's
    pulls in libinfinipath, whose constructor sleeps 200 ms), which every `rankwire exec`
    on a node with a fabric adapter would pay."""
    from rankwire.fabric.factcache import FactCache

    cache = None
    try:
        with open(BOOT_ID) as f:
            boot = f.read().strip()
    except OSError:
        boot = ""  # no boot to tie them to: not kept
    if cache_dir and boot:
        env = sorted((k, v) for k, v in os.environ.items() if k.startswith(LIBFABRIC_ENV))
        # a provider opens its device nodes: who we are decides which register
        access = [os.geteuid(), os.getegid(), sorted(os.getgroups())]
        adapters, devices = (hardware.adapters, hardware.devices) if hardware else ((), ())
        key = [boot, env, repr((adapters, devices)), access]
        cache = FactCache(cache_dir, "host-libfabric", key, [*_loader_paths(), *devices])
        kept = cache.load(_libfabric_from_dict, _libfabric_paths)
        if kept is not None:
            return kept
    from rankwire.fabric import discovery

    loaded = discovery.library()
    facts = libfabric_facts(loaded.path, loaded.version, discovery.providers())
    if cache is not None:
        cache.store(facts, _libfabric_paths(facts))
    return facts


def _loader_paths() -> list[str]:
    """Where the loader looked for libfabric and what it loads: its cache, the preload
    file, the LD_LIBRARY_PATH and default dirs."""
    lib_path = os.environ.get("LD_LIBRARY_PATH", "")
    dirs = [*(d for d in lib_path.split(":") if d), *Resolver.default_dirs()]
    return [LD_CACHE, LD_PRELOAD_FILE, *dirs]


def fabric_key(
    host: FabricHostFacts, root: str = "/"
) -> Optional[tuple[list[str], dict[str, bool], dict[str, str]]]:
    """What the fabric facts `host` came from, for a kept plan's key (`joinplan.
    key_records`, which also lists the adapters' classes and device nodes, `ADAPTER_GLOBS`):
    (files and dirs to key by identity, paths to key by their absence, files to key by
    their content). Those `host_libfabric` reads or keeps its facts on, wherever it looked
    for the library (found or not: one installed later must be seen), the device nodes
    found (their modes decide which providers may open them), and each adapter's port
    state as the planner saw it: a link going down changes what `--fabric auto` binds, not
    the state file's identity. None: a file changed too lately to tell whether the facts
    saw it (`factcache.SETTLE_NS`, the fact cache's own rule): keep no plan."""
    from rankwire.fabric.factcache import SETTLE_NS

    paths = list(host.devices)
    if host.libfabric is not None:
        paths += [*_loader_paths(), *_libfabric_paths(host.libfabric)]
    elif any(a.devices for a in host.adapters):  # looked for, not found (`facts.host_facts_for`)
        paths += _loader_paths()
    paths = list(dict.fromkeys(paths))
    there = [p for p in paths if os.path.exists(p)]
    gone = {p: False for p in paths if p not in there}
    lately = time.time_ns() - SETTLE_NS
    for path in there:
        try:
            if os.stat(path).st_ctime_ns >= lately:
                return None
        except OSError:
            return None
    states: dict[str, str] = {}
    for a in host.adapters:
        where = os.path.join(root, "sys/class/infiniband", glob.escape(a.name), "ports/*")
        ports = sorted(glob.glob(where))
        if a.name and a.state and ports:
            states[os.path.join("/", os.path.relpath(ports[0], root), "state")] = a.state
    return there, gone, states


def _libfabric_paths(lib: HostLibfabric) -> list[str]:
    """What the facts came from: each object (link and file) and the dirs they are in
    (a library added there, or one missing before, would change them), the dirs
    libfabric and libibverbs list their plugins from, the verbs config dir."""
    dirs = dl_provider_dirs(lib.path, os.environ)
    verbs = [o for o in lib.objects if o.elf.soname == "libibverbs.so.1"]
    if verbs:
        dirs.append(os.path.join(os.path.dirname(verbs[0].real), "libibverbs"))
    objects = [p for o in lib.objects for p in (o.path, o.real)]
    dirs += sorted({os.path.dirname(p) for p in objects})
    return [lib.path, *objects, *dirs, *lib.searched, VERBS_CONFIG_DIR]


def _libfabric_from_dict(d: dict[str, Any]) -> HostLibfabric:
    return HostLibfabric(
        path=d["path"],
        version=d["version"],
        providers=tuple(d["providers"]),
        objects=objects_from_dicts(d["objects"]),
        dl_providers=tuple(d["dl_providers"]),
        verbs_plugins=tuple(d["verbs_plugins"]),
        verbs_config=d["verbs_config"],
        searched=tuple(d["searched"]),
    )


def collect_fabric_host_facts(root: str = "/", with_library: bool = True) -> FabricHostFacts:
    """Adapters and device nodes under `root`; the host libfabric if `with_library`."""
    lib = host_libfabric() if with_library else None
    return FabricHostFacts(detect_adapters(root), fabric_devices(root), lib)
