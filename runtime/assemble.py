"""Facts -> plans for one image: the one assembly every caller uses (exec, shell,
instance start, the launcher, the SPANK helper). Pure; `runtime/facts.py` gathers."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

from rankwire.fabric.hostfacts import FabricHostFacts
from rankwire.fabric.imagefacts import FabricImageFacts
from rankwire.fabric.mpiplan import MpiPlan, plan_host_mpi
from rankwire.fabric.plan import FabricPlan, plan_fabric
from rankwire.pmi.bridgeplan import BridgePlan, bridged_process, plan_for
from rankwire.record import record
from rankwire.runtime.hostfacts import HostFacts

if TYPE_CHECKING:
    from rankwire.fabric.hostmpi import HostMpi
from rankwire.runtime.plan import (
    ContainerPlan,
    ExecOptions,
    ImageFacts,
    ProcessPlan,
    UserFacts,
    host_mpi_choice,
    plan_container,
    plan_env,
    plan_process,
)


@record
class Facts:
    """Everything the planners know of the world for one image."""

    image: ImageFacts
    host: HostFacts
    user: UserFacts
    existing: frozenset[str]  # those of `plan.paths_to_probe` that exist
    fabric_host: FabricHostFacts
    fabric_image: FabricImageFacts
    host_mpi: Optional[HostMpi] = None  # read only when --host-mpi is not none
    # The PMI the image's MPI speaks (pmi.pmix.detect.pmi_kind) and, when it holds both
    # families, the command's: read only when a PMI bridge could be planned.
    pmi_need: Optional[str] = None
    program_need: Optional[str] = None


@record
class ImagePlan:
    container: ContainerPlan
    env: dict[str, str]  # the container's environment (`plan_env`)
    fabric: FabricPlan
    host_mpi: MpiPlan
    process: Optional[ProcessPlan]  # None when no command was given (instance, plugin)
    pmi_bridge: BridgePlan

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def plan_image(facts: Facts, opts: ExecOptions, argv: Optional[Sequence[str]]) -> ImagePlan:
    """The fabric plan and the host MPI plan, then the container (their mounts last),
    the process and whether its PMI is bridged."""
    fabric = plan_fabric(facts.fabric_host, facts.fabric_image, opts.fabric)
    mpi = plan_host_mpi(
        facts.host_mpi,
        facts.fabric_image,
        fabric,
        facts.fabric_host.libfabric,
        host_mpi_choice(opts, facts.user.environ),
    )
    container = plan_container(
        facts.image,
        facts.host,
        facts.user,
        opts,
        facts.existing,
        fabric_mounts=(*fabric.mounts, *mpi.mounts),
    )
    bound_env = {**fabric.env, **mpi.env}
    env = plan_env(facts.image, facts.user, opts, bound_env)
    process = (
        plan_process(facts.image, facts.user, opts, argv, fabric_env=bound_env)
        if argv is not None
        else None
    )
    bridge = plan_for(facts.user, opts.pmi_bridge, facts.pmi_need, facts.program_need)
    if process is not None:
        process = bridged_process(bridge, process)
    return ImagePlan(container, env, fabric, mpi, process, bridge)
