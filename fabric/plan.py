"""The fabric plan: which provider, why, and what to bind and set in the container.

`plan_fabric` is pure: (host facts, image facts, choice) -> `FabricPlan`, or a one-line
`UserError`. `rankwire.fabric.facts.fabric_facts` gathers its facts (sysfs, the host
libfabric, the image's glibc and libfabric consumers).

What a bound plan does: the host libfabric and every non-glibc library it loads (ELF
DT_NEEDED closure) are bound one by one into a private directory, `/.rankwire/fabric/lib`,
which leads LD_LIBRARY_PATH and is the only FI_PROVIDER_PATH; every libfabric.so.1 the
image has is also covered by the host's (for RPATH'd consumers); verbs-based providers
get the host's libibverbs plugins and /etc/libibverbs.d together; the provider's device
nodes and /dev/shm are bound. glibc always stays the image's, so the host objects' symbol
versions are checked against it first, and the image's libfabric consumers against the
host libfabric's FABRIC_1.x versions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from rankwire.errors import UserError
from rankwire.fabric.elf import ElfFacts, is_glibc, newest, version_key
from rankwire.fabric.hostfacts import FabricHostFacts, HostLibfabric, HostObject
from rankwire.fabric.imagefacts import FabricImageFacts
from rankwire.record import record
from rankwire.runtime.plan import Mount

SONAME = "libfabric.so.1"
PRIVATE_DIR = "/.rankwire/fabric"
LIB_DIR = f"{PRIVATE_DIR}/lib"
# Adapter kinds, best first, with the providers that drive them (preferred first).
FAST_FABRICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cxi", ("cxi",)),
    ("efa", ("efa",)),
    ("hfi1", ("opx", "psm2")),
    ("mlx5", ("verbs",)),
    ("rdma", ("verbs",)),
)
VERBS_BASED = frozenset({"verbs", "efa", "psm3"})
# Device nodes each provider opens (prefixes of paths under /dev).
PROVIDER_DEVICES = {
    "cxi": ("/dev/cxi",),
    "efa": ("/dev/infiniband/uverbs",),
    "psm3": ("/dev/infiniband/uverbs",),
    "verbs": ("/dev/infiniband/uverbs", "/dev/infiniband/rdma_cm"),
    "opx": ("/dev/hfi1_",),
    "psm2": ("/dev/hfi1_",),
}
EMPTY_IMAGE = FabricImageFacts(glibc=(), libfabric=(), consumers=(), ld_library_path="")


@record
class FabricPlan:
    """What `--fabric CHOICE` adds to a container: mounts (after the others) and env."""

    choice: str  # as asked: auto | none | a provider
    provider: str  # core provider name (FI_PROVIDER); "" when nothing is bound
    reason: str  # one line: why this provider, or why nothing
    env: dict[str, str]
    mounts: tuple[Mount, ...]

    @property
    def device_nodes(self) -> tuple[str, ...]:
        """Targets of the binds under /dev (for a minimal /dev, e.g. under --contain)."""
        return tuple(m.target for m in self.mounts if m.target.startswith("/dev/"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _nothing(choice: str, reason: str) -> FabricPlan:
    return FabricPlan(choice=choice, provider="", reason=reason, env={}, mounts=())


def _auto(host: FabricHostFacts) -> tuple[str, str]:
    """(provider, reason) for --fabric auto; provider "" means bind nothing."""
    notes: list[str] = []
    lib = host.libfabric
    for kind, providers in FAST_FABRICS:
        adapters = [a for a in host.adapters if a.kind == kind]
        usable = [a for a in adapters if a.devices and a.link_up]
        if not usable:
            for a in adapters:
                why = (
                    "its link is not active" if a.devices else "no device node (driver not loaded?)"
                )
                notes.append(f"{a.describe()}: {why}")
            continue
        seen = ", ".join(a.describe() for a in usable)
        if lib is None:
            notes.append(f"{seen} found but the host has no libfabric")
            continue
        for provider in providers:
            if provider in lib.providers:
                return provider, f"{seen}; host libfabric {lib.version} has the {provider} provider"
        notes.append(
            f"{seen} found but host libfabric {lib.version} has no {'/'.join(providers)} provider"
        )
    if notes:
        return "", "; ".join(notes) + "; nothing bound"
    return "", "no fabric adapter found; nothing bound (the image's own libfabric is used)"


def _check_provider(lib: HostLibfabric | None, choice: str) -> str:
    core = choice.split(";", 1)[0]
    if lib is None:
        raise UserError(
            f"--fabric {choice}: the host has no libfabric.so.1; install it or use --fabric none"
        )
    if core.startswith("ofi_") or core not in lib.providers:
        cores = [p for p in lib.providers if not p.startswith("ofi_")]
        raise UserError(
            f"--fabric {choice}: the host libfabric {lib.version} has no such core provider "
            f"(it has {', '.join(cores) or 'none'}); pick one of them, auto or none"
        )
    return core


def check_abi(
    bound: Iterable[tuple[str, ElfFacts]],
    image: FabricImageFacts,
    lib: HostLibfabric,
    consumers: Sequence[tuple[str, ElfFacts]] = (),
) -> None:
    """Refuse (UserError) when a host object needs symbol versions the image lacks.

    `bound`: (label, ELF) of host objects going in; their glibc needs must be met by the
    image's glibc. The image's libfabric consumers, plus `consumers`, must find their
    FABRIC_1.x versions in the host libfabric.
    """
    check_glibc(bound, image, "the host libfabric", "--fabric none")
    host_lib = lib.object(lib.path).elf
    defined = frozenset(host_lib.defines)
    users = [(f"the image's {o.path}", o.elf) for o in image.consumers]
    for label, elf in [*users, *consumers]:
        missing = [v for v in elf.required_from(SONAME) if v not in defined]
        if missing:
            worst = max(missing, key=version_key)
            raise UserError(
                f"cannot bind the host libfabric {lib.version}: {label} needs {worst} but the "
                f"host's provides up to {newest(defined, 'FABRIC') or 'none'}; rebuild the "
                f"image against libfabric <= {lib.version} or use --fabric none"
            )


def check_installed(objects: Iterable[tuple[str, HostObject]], what: str, way_out: str) -> None:
    """Refuse (UserError) when a host object going in needs a library this host lacks."""
    missing = [(o.path, m) for _, o in objects for m in o.missing]
    if missing:
        path, name = missing[0]
        raise UserError(
            f"cannot bind {what}: {path} needs {name}, which is not installed on this host; "
            f"install it or use {way_out}"
        )


def check_glibc(
    bound: Iterable[tuple[str, ElfFacts]], image: FabricImageFacts, what: str, way_out: str
) -> None:
    """Refuse (UserError) when a host object going in (label, ELF) needs a glibc library
    or symbol version the image lacks: glibc always stays the image's."""
    glibc_short: dict[str, str] = {}  # missing version -> who needs it
    lacking: list[str] = []
    for label, elf in bound:
        for soname, versions in elf.requires:
            if not is_glibc(soname):
                continue
            have = image.glibc_defines(soname)
            if have is None:
                lacking.append(f"{label} needs {soname}")
                continue
            for v in versions:
                if v not in have:
                    glibc_short.setdefault(v, label)
    if lacking:
        no_libc = image.glibc_defines("libc.so.6") is None
        raise UserError(
            f"cannot bind {what}: {lacking[0]}, which the image does not have"
            f"{' (not a glibc image?)' if no_libc else ''}; use {way_out}"
        )
    if glibc_short:
        worst = max(glibc_short, key=version_key)
        numbered = version_key(worst)[1]
        more = f" (and {len(glibc_short) - 1} more)" if len(glibc_short) > 1 else ""
        want = ".".join(map(str, numbered)) if numbered else worst
        raise UserError(
            f"cannot bind {what}: host {glibc_short[worst]} needs {worst}{more} "
            f"but the image's glibc is {image.glibc_version or 'unknown'}; rebuild the image "
            f"on glibc >= {want} or use {way_out}"
        )


def choose_provider(host: FabricHostFacts, choice: str) -> tuple[str, str]:
    """(core provider, one-line reason) for a --fabric choice; provider "" = bind nothing."""
    choice = choice.strip()
    if choice == "none":
        return "", "fabric binding off (--fabric none)"
    if choice == "auto":
        return _auto(host)
    if not choice:
        raise UserError("--fabric needs a value: auto, none or a provider name")
    return _check_provider(host.libfabric, choice), f"asked for with --fabric {choice}"


def plan_fabric(host: FabricHostFacts, image: FabricImageFacts, choice: str) -> FabricPlan:
    """The fabric part of a container plan. Pure: facts in, plan (or UserError) out."""
    choice = choice.strip()
    provider, reason = choose_provider(host, choice)
    if not provider:
        return _nothing(choice, reason)
    lib = host.libfabric
    assert lib is not None

    # Libraries: libfabric + the DL provider asked for + all they need, into LIB_DIR.
    roots = [(SONAME, lib.path)]
    roots += [(p.rsplit("/", 1)[-1], p) for p in lib.dl_providers if _dl_name(p) == provider]
    verbs = provider in VERBS_BASED and lib.verbs_plugins
    plugins = list(lib.verbs_plugins) if verbs else []
    objects = lib.closure([*roots, *((p.rsplit("/", 1)[-1], p) for p in plugins)])
    check_installed(objects, "the host libfabric", "--fabric none")
    check_abi([(name, o.elf) for name, o in objects], image, lib)

    mounts: list[Mount] = []
    targets: set[str] = set()

    def bind(target: str, source: str, readonly: bool = True) -> None:
        if target not in targets:
            targets.add(target)
            mounts.append(Mount("bind", target, source, readonly=readonly))

    for name, obj in objects:
        if obj.path in plugins:
            bind(obj.path, obj.real)  # libibverbs looks for its plugins at a built-in path
        else:
            bind(f"{LIB_DIR}/{name}", obj.real)
    for copy in image.libfabric:
        bind(copy.path, lib.object(lib.path).real)  # consumers with an RPATH find it too
    if verbs and lib.verbs_config:
        bind(lib.verbs_config, lib.verbs_config)
    prefixes = PROVIDER_DEVICES.get(provider, ())
    for dev in host.devices:
        if dev.startswith(prefixes):
            bind(dev, dev, readonly=False)
    bind("/dev/shm", "/dev/shm", readonly=False)

    search = LIB_DIR + (f":{image.ld_library_path}" if image.ld_library_path else "")
    env = {
        "FI_PROVIDER": provider,
        "FI_PROVIDER_PATH": LIB_DIR,
        "LD_LIBRARY_PATH": search,
        "OMPI_MCA_pml": "cm",
        "OMPI_MCA_mtl": "ofi",
        "OMPI_MCA_mtl_ofi_provider_include": provider,
    }
    return FabricPlan(
        choice=choice, provider=provider, reason=reason, env=env, mounts=tuple(mounts)
    )


def _dl_name(path: str) -> str:
    """/x/libpsm3-fi.so -> psm3"""
    base = path.rsplit("/", 1)[-1]
    return base[3 : -len("-fi.so")] if base.startswith("lib") and base.endswith("-fi.so") else ""
