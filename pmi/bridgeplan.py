"""Whether a task needs rankwire's PMI bridge, and why (pure; no I/O).

The step offers one PMI (from its environment: what srun's `--mpi` plugin set up) and
the image's MPI speaks one or more (`pmi.pmix.detect.pmi_kind`). When they differ, the
MPI's `MPI_Init` finds no PMI it can speak and every task starts as a singleton ("rank 0
of 1" N times) or hangs. Two bridges close the two gaps: under `srun --mpi=pmix`, a task
whose MPI speaks PMI-1/PMI-2 gets a `PMI_FD` served by a process that is that task's PMIx
client (`pmi/bridge.py`); under `srun --mpi=pmi2`, a task whose MPI speaks PMIx gets a
PMIx server of its own whose fences cross tasks through the task's Slurm PMI-2 connection
(`pmi/pmix/pmi2bridge.py`). A PMI-1 process manager (Hydra) and a PMIx image are not
bridged: the plan says so and what to do.

`exec`, the doctor and the launcher's srun delegation all decide here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Optional

from rankwire.record import record

if TYPE_CHECKING:
    from rankwire.runtime.plan import ProcessPlan, UserFacts

CHOICES = ("auto", "off")
PMIX_TO_PMI = "pmix-to-pmi"  # PMI_FD served through the step's PMIx (pmi/bridge.py)
PMI2_TO_PMIX = "pmi2-to-pmix"  # a PMIx server per node over the step's PMI-2 (pmi2bridge)

# What each offer or need is called in messages.
NAMES = {
    "pmix": "PMIx",
    "pmi2": "PMI-2",
    "pmi1": "PMI-1",
    "pmi1/2": "PMI-1/PMI-2",
    "both": "PMI-1/PMI-2 or PMIx",
}


# The `srun --mpi` plugins (base names: pmix_v4 is pmix) that serve each need directly
# (Slurm's pmi2 plugin also serves PMI-1 clients), and the one a bridge serves it through.
SERVED_BY = {"pmi1/2": ("pmi2",), "pmix": ("pmix",), "both": ("pmi2", "pmix")}
BRIDGED_FROM = {"pmi1/2": "pmix", "pmix": "pmi2"}


@record
class SlurmWireup:
    """How a Slurm with given `srun --mpi` plugins wires up an MPI that speaks `need`: the
    one answer `rankwire doctor IMAGE` and `rankwire recipe def` both give."""

    direct: tuple[str, ...]  # plugins serving it directly, best first ("pmi2", "pmix")
    bridged: str  # the plugin rankwire's PMI bridge serves it through; "" none
    by_default: str  # what srun's MpiDefault does for it: "direct", "bridged" or ""


def slurm_wireup(plugins: Sequence[str], mpi_default: str, need: str) -> SlurmWireup:
    """`plugins` as `srun --mpi=list` prints them, MpiDefault, an `image_mpi_kind` answer."""
    bases = {p.split("_")[0] for p in plugins}
    direct = tuple(p for p in SERVED_BY[need] if p in bases)
    via = BRIDGED_FROM.get(need, "")
    default = mpi_default.split("_")[0]
    by_default = "direct" if default in SERVED_BY[need] else ""
    if via and default == via:
        by_default = "bridged"
    return SlurmWireup(direct, via if via in bases else "", by_default)


@record
class BridgePlan:
    offer: Optional[str]  # what the step serves: "pmix" | "pmi2" | "pmi1" | None
    need: Optional[str]  # what the task's MPI speaks: "pmix" | "pmi1/2" | "both" | None
    bridge: Optional[str]  # PMIX_TO_PMI, or None: the task talks to the step's PMI itself
    reason: str  # one line for `-v` and `--dry-run`
    warning: str = ""  # a mismatch the bridge does not close: one line naming the fix

    def to_dict(self) -> dict[str, Optional[str]]:
        return dataclasses.asdict(self)


def step_offer(
    environ: Mapping[str, str], step_pmix: bool = False, in_step: bool = False
) -> Optional[str]:
    """The PMI the process manager that started us serves, from the environment: Slurm's
    mpi/pmix sets PMIX_NAMESPACE + PMIX_RANK (and the server URIs); mpi/pmi2 sets PMI_FD
    with PMI_JOBID; a PMI-1 manager (Hydra, our launcher) PMI_FD or PMI_PORT alone.
    Before the tasks have those (the plugin plans in user_init): `step_pmix`, the step
    has a PMIx server (slurmstepd's PMIX_SERVER_TMPDIR), else, `in_step`, what srun's
    `--mpi` put in SLURM_MPI_TYPE."""
    identity = environ.get("PMIX_NAMESPACE") and environ.get("PMIX_RANK")
    if (identity and any(k.startswith("PMIX_SERVER_URI") for k in environ)) or step_pmix:
        return "pmix"
    if environ.get("PMI_FD") or environ.get("PMI_PORT"):
        return "pmi2" if environ.get("PMI_JOBID") else "pmi1"
    mpi = environ.get("SLURM_MPI_TYPE", "").split("_")[0] if in_step else ""
    return mpi if mpi in ("pmix", "pmi2") else None


def user_offer(user: UserFacts) -> Optional[str]:
    """`step_offer` for the user the planners plan for (exec's caller or the job user)."""
    slurm = user.slurm
    return step_offer(user.environ, bool(slurm and slurm.pmix_server_dir), slurm is not None)


def bridge_choice(option: Optional[str], environ: Mapping[str, str]) -> str:
    """--pmi-bridge, else RANKWIRE_PMI_BRIDGE, else auto (the option table reads both; the
    plugin and joined instances pass the value on)."""
    return (option or environ.get("RANKWIRE_PMI_BRIDGE") or "auto").strip() or "auto"


def needs_image_facts(choice: str, offer: Optional[str]) -> bool:
    """Whether the image's MPI must be read at all: only under a PMIx or PMI-2 step is
    there something to bridge (or, with --pmi-bridge off, to warn of); other tasks read
    nothing more. The answer is kept per image (`launcher.facts.image_mpi_kind`)."""
    return choice in CHOICES and offer in ("pmix", "pmi2")


def plan_bridge(
    choice: str, offer: Optional[str], need: Optional[str], program_need: Optional[str] = None
) -> BridgePlan:
    """`need`: the image's MPI kind; `program_need`: the command's own libmpi's, asked only
    when the image holds both families ("both")."""
    if choice not in CHOICES:
        from rankwire.errors import UserError

        raise UserError(f"--pmi-bridge {choice}: use auto or off")
    if offer is None:
        return BridgePlan(offer, need, None, "no PMI from the process manager: none to bridge")
    if need == "both":
        if program_need is None:
            why = "the image holds MPICH and Open MPI and the command's MPI is unknown"
            return BridgePlan(offer, need, None, f"{why}: not bridged")
        need = program_need
    if need is None:
        why = "--pmi-bridge off" if choice == "off" else "no MPI in the image: nothing to bridge"
        return BridgePlan(offer, need, None, why)
    if offer == "pmix" and need == "pmi1/2":
        kind, reason = (
            PMIX_TO_PMI,
            (
                "the step serves PMIx (srun --mpi=pmix) and the image's MPI speaks PMI-1/PMI-2: "
                "bridged (PMI_FD served through the step's PMIx server)"
            ),
        )
        other = "pmi2"
    elif offer == "pmi2" and need == "pmix":
        kind, reason = (
            PMI2_TO_PMIX,
            (
                "the step serves PMI-2 (srun --mpi=pmi2) and the image's MPI speaks PMIx: "
                "bridged (a PMIx server per node, its fences through the step's PMI-2)"
            ),
        )
        other = "pmix"
    elif offer == "pmi1" and need == "pmix":
        return BridgePlan(
            offer,
            need,
            None,
            f"the step serves {NAMES[offer]} and the image's MPI speaks PMIx: no bridge "
            "for this direction",
            warning=f"the image's MPI speaks PMIx and this step serves only {NAMES[offer]}: "
            "each task will start as a singleton; run `srun --mpi=pmix …` "
            "(`srun --mpi=list` shows what the site offers)",
        )
    else:
        return BridgePlan(
            offer, need, None, f"the step serves {NAMES[offer]}, which the image's MPI speaks"
        )
    if choice == "off":
        return BridgePlan(
            offer,
            need,
            None,
            "--pmi-bridge off",
            warning=f"the image's MPI speaks {NAMES[need]} and this step serves "
            f"{NAMES[offer]}, not bridged (--pmi-bridge off): each task will start as a "
            f"singleton or fail in MPI_Init; drop --pmi-bridge off, or run `srun "
            f"--mpi={other} …`",
        )
    return BridgePlan(offer, need, kind, reason)


def plan_for(
    user: UserFacts, option: Optional[str], need: Optional[str], program_need: Optional[str]
) -> BridgePlan:
    """`plan_bridge` for the user the planners plan for, with --pmi-bridge `option`."""
    return plan_bridge(bridge_choice(option, user.environ), user_offer(user), need, program_need)


def bridged_process(bridge: BridgePlan, proc: ProcessPlan) -> ProcessPlan:
    """A bridged task's process. PMIx to PMI: without the step's PMIx variables (its MPI
    is to take the PMI_FD the bridge serves); the executor adds PMI_FD, PMI_RANK and
    PMI_SIZE. PMI-2 to PMIx: without Slurm's PMI_* (Open MPI would take the step for a PMI-2
    one it cannot join); the executor adds the node's server's PMIX_* variables."""
    if bridge.bridge is None:
        return proc
    if bridge.bridge == PMIX_TO_PMI:
        env = {k: v for k, v in proc.env.items() if not k.startswith("PMIX_")}
    else:
        env = {k: v for k, v in proc.env.items() if not k.startswith(("PMI_", "PMIX_"))}
    return dataclasses.replace(proc, env=env)
