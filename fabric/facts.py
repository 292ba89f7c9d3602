"""The facts the fabric planner needs, gathered as a choice needs them (I/O lives here)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from rankwire.errors import UserError
from rankwire.fabric.hostfacts import FabricHostFacts
from rankwire.fabric.imagefacts import FabricImageFacts
from rankwire.fabric.plan import EMPTY_IMAGE
from rankwire.runtime.plan import ImageFacts


def host_facts_for(choice: str, cache_dir: Optional[str] = None) -> FabricHostFacts:
    """Host facts as `choice` needs them: the library is loaded only when it matters
    (and, with the user's `cache_dir`, once while nothing it came from changes)."""
    from rankwire.fabric import hostfacts

    if choice.strip() == "none":
        return FabricHostFacts((), (), None)
    host = hostfacts.collect_fabric_host_facts(with_library=False)
    if choice.strip() == "auto" and not any(a.devices for a in host.adapters):
        return host  # nothing fast to bind: spare loading libfabric (~0.3 s on Debian)
    try:
        lib = hostfacts.host_libfabric(cache_dir, host)
    except UserError:
        if choice.strip() != "auto":
            raise
        lib = None
    return dataclasses.replace(host, libfabric=lib)


def fabric_facts(
    image: ImageFacts, choice: str, image_libs: bool = False, cache_dir: Optional[str] = None
) -> tuple[FabricHostFacts, FabricImageFacts]:
    """(host, image) facts for `plan_fabric(host, image, choice)`; the image's libraries
    are read when a host libfabric is found or `image_libs` (a host MPI goes in).
    Raises UserError."""
    host = host_facts_for(choice, cache_dir)
    if host.libfabric is None and not image_libs:
        return host, EMPTY_IMAGE
    from rankwire.fabric.imagefacts import read_fabric_image_facts

    consumers = host.libfabric is not None
    return host, read_fabric_image_facts(image, consumers, cache_dir)
