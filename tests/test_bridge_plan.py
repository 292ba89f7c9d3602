"""The PMI bridge decision (pmi/bridgeplan.py): pure, facts in, plan out."""

from __future__ import annotations

import pytest

from rankwire.errors import UserError
from rankwire.launcher.plan import LaunchOptions, SlurmMpi, plan_launch, srun_mpi
from rankwire.pmi.bridgeplan import (
    PMI2_TO_PMIX,
    PMIX_TO_PMI,
    bridge_choice,
    bridged_process,
    needs_image_facts,
    plan_bridge,
    slurm_wireup,
    step_offer,
)
from rankwire.runtime.plan import ProcessPlan

SLURM_PMIX = {"PMIX_NAMESPACE": "slurm.pmix.7.0", "PMIX_RANK": "3", "PMIX_SERVER_URI2": "x"}
SLURM_PMI2 = {"PMI_FD": "11", "PMI_JOBID": "7.0", "PMI_RANK": "3", "PMI_SIZE": "4"}
HYDRA = {"PMI_FD": "6", "PMI_RANK": "0", "PMI_SIZE": "2"}


@pytest.mark.parametrize(
    ("environ", "offer"),
    [
        (SLURM_PMIX, "pmix"),
        (SLURM_PMI2, "pmi2"),
        (HYDRA, "pmi1"),
        ({"PMI_PORT": "h:1"}, "pmi1"),
        ({"SLURM_JOB_ID": "7"}, None),
        ({"PMIX_NAMESPACE": "n"}, None),
        ({"PMIX_NAMESPACE": "n", "PMIX_RANK": "0"}, None),  # no server to reach
    ],
)
def test_the_offer_is_read_from_the_environment(environ: dict[str, str], offer: str) -> None:
    assert step_offer(environ) == offer


def test_the_plugin_knows_the_step_serves_pmix_before_the_tasks_do() -> None:
    assert step_offer({"SLURM_JOB_ID": "7"}, step_pmix=True) == "pmix"


def test_pmix_step_and_pmi1_image_are_bridged() -> None:
    plan = plan_bridge("auto", "pmix", "pmi1/2")
    assert plan.bridge == PMIX_TO_PMI
    assert plan.reason == (
        "the step serves PMIx (srun --mpi=pmix) and the image's MPI speaks PMI-1/PMI-2: "
        "bridged (PMI_FD served through the step's PMIx server)"
    )
    assert plan.warning == ""


@pytest.mark.parametrize(
    ("offer", "need"), [("pmix", "pmix"), ("pmi2", "pmi1/2"), ("pmi1", "pmi1/2")]
)
def test_matched_pairs_are_not_bridged(offer: str, need: str) -> None:
    plan = plan_bridge("auto", offer, need)
    assert (plan.bridge, plan.warning) == (None, "")


def test_off_is_never_bridged_and_says_what_follows() -> None:
    plan = plan_bridge("off", "pmix", "pmi1/2")
    assert (plan.bridge, plan.reason) == (None, "--pmi-bridge off")
    assert plan.warning == (
        "the image's MPI speaks PMI-1/PMI-2 and this step serves PMIx, not bridged "
        "(--pmi-bridge off): each task will start as a singleton or fail in MPI_Init; drop "
        "--pmi-bridge off, or run `srun --mpi=pmi2 …`"
    )
    other = plan_bridge("off", "pmi2", "pmix")
    assert other.warning.endswith("drop --pmi-bridge off, or run `srun --mpi=pmix …`")
    assert plan_bridge("off", "pmix", "pmix").warning == ""


def test_no_step_no_mpi() -> None:
    assert plan_bridge("auto", None, "pmi1/2").reason == (
        "no PMI from the process manager: none to bridge"
    )
    assert plan_bridge("auto", "pmix", None).reason == "no MPI in the image: nothing to bridge"


def test_an_image_with_both_mpis_asks_the_command() -> None:
    assert plan_bridge("auto", "pmix", "both", "pmi1/2").bridge == PMIX_TO_PMI
    assert plan_bridge("auto", "pmix", "both", "pmix").bridge is None
    unknown = plan_bridge("auto", "pmix", "both", None)
    assert unknown.bridge is None
    assert unknown.reason == (
        "the image holds MPICH and Open MPI and the command's MPI is unknown: not bridged"
    )


def test_a_pmi2_step_and_a_pmix_image_are_bridged_the_other_way() -> None:
    plan = plan_bridge("auto", "pmi2", "pmix")
    assert (plan.bridge, plan.warning) == (PMI2_TO_PMIX, "")
    assert plan.reason == (
        "the step serves PMI-2 (srun --mpi=pmi2) and the image's MPI speaks PMIx: bridged "
        "(a PMIx server per node, its fences through the step's PMI-2)"
    )
    env = {**SLURM_PMI2, "PMIX_RANK": "9", "PATH": "/usr/bin"}
    bridged = bridged_process(plan, ProcessPlan(("/opt/hello",), env, "/"))
    assert bridged.env == {"PATH": "/usr/bin"}  # shared memory stays on: one server per node


def test_a_pmi1_manager_and_a_pmix_image_warn_with_the_fix() -> None:
    plan = plan_bridge("auto", "pmi1", "pmix")
    assert plan.bridge is None
    assert plan.warning == (
        "the image's MPI speaks PMIx and this step serves only PMI-1: each task will start "
        "as a singleton; run `srun --mpi=pmix …` (`srun --mpi=list` shows what the site offers)"
    )


def test_a_bad_choice_is_one_line() -> None:
    with pytest.raises(UserError) as err:
        plan_bridge("sometimes", "pmix", "pmi1/2")
    assert str(err.value) == "--pmi-bridge sometimes: use auto or off"


def test_choice_and_when_the_image_is_read() -> None:
    assert bridge_choice(None, {}) == "auto"
    assert bridge_choice(None, {"RANKWIRE_PMI_BRIDGE": "off"}) == "off"
    assert bridge_choice("auto", {"RANKWIRE_PMI_BRIDGE": "off"}) == "auto"
    assert needs_image_facts("auto", "pmix")
    assert needs_image_facts("off", "pmix")  # to warn of the mismatch it leaves
    assert needs_image_facts("auto", "pmi2")
    assert not needs_image_facts("auto", "pmi1")  # nothing to bridge: no image read
    assert not needs_image_facts("auto", None)


def test_a_bridged_task_loses_the_pmix_variables_only() -> None:
    env = {**SLURM_PMIX, "SLURM_PROCID": "3", "PATH": "/usr/bin"}
    proc = ProcessPlan(("/opt/hello",), env, "/")
    bridged = bridged_process(plan_bridge("auto", "pmix", "pmi1/2"), proc)
    assert bridged.env == {"SLURM_PROCID": "3", "PATH": "/usr/bin"}
    assert bridged_process(plan_bridge("off", "pmix", "pmi1/2"), proc) is proc


PMIX_ONLY = SlurmMpi(("pmix", "pmix_v4"), "pmix")
BOTH_PMIX_DEFAULT = SlurmMpi(("pmi2", "pmix", "pmix_v4"), "pmix_v4")
BOTH_NO_DEFAULT = SlurmMpi(("none", "pmi2", "pmix", "pmix_v4"), "none")
PMI2_ONLY = SlurmMpi(("none", "pmi2"), "none")


@pytest.mark.parametrize(
    ("pmi", "offered", "bridge_ok", "mpi"),
    [
        ("pmi2", None, True, "pmi2"),  # unknown: ask for what the ranks need
        ("pmi2", BOTH_NO_DEFAULT, True, "pmi2"),
        ("pmi2", BOTH_PMIX_DEFAULT, True, "pmix"),  # the site's default, bridged
        ("pmi2", BOTH_PMIX_DEFAULT, False, "pmi2"),  # no image or --pmi-bridge off
        ("pmi2", PMIX_ONLY, True, "pmix"),
        ("pmix", BOTH_PMIX_DEFAULT, True, "pmix"),
        ("pmix", BOTH_NO_DEFAULT, False, "pmix"),
        ("pmix", PMI2_ONLY, True, "pmi2"),  # Open MPI through the other bridge
        ("pmix", SlurmMpi(("pmi2", "pmix"), "pmi2"), True, "pmi2"),  # the default, bridged
    ],
)
def test_a_delegated_job_takes_the_site_mpi_the_bridge_allows(
    pmi: str, offered: SlurmMpi, bridge_ok: bool, mpi: str
) -> None:
    assert srun_mpi(pmi, offered, bridge_ok) == mpi


@pytest.mark.parametrize(
    ("pmi", "offered", "bridge_ok", "message"),
    [
        ("pmi2", PMIX_ONLY, False, "the ranks' MPI speaks PMI-1/PMI-2 and this site's srun "
         "offers --mpi=pmix, pmix_v4: run it in an image (the tasks' PMI bridge connects it "
         "to the site's PMI)"),
        ("pmix", PMI2_ONLY, False, "the ranks' MPI speaks PMIx and this site's srun offers "
         "--mpi=none, pmi2: run it in an image (the tasks' PMI bridge connects it to the "
         "site's PMI)"),
        ("pmix", SlurmMpi(("none", "cray_shasta"), "none"), True, "the ranks' MPI speaks "
         "PMIx and this site's srun offers --mpi=none, cray_shasta: launch here with "
         "--no-slurm (rankwire serves PMIx itself)"),
    ],
)  # fmt: skip
def test_a_site_that_cannot_serve_the_ranks_is_one_line(
    pmi: str, offered: SlurmMpi, bridge_ok: bool, message: str
) -> None:
    with pytest.raises(UserError) as err:
        srun_mpi(pmi, offered, bridge_ok)
    assert str(err.value) == message


def test_the_launch_plan_delegates_with_the_bridged_mpi() -> None:
    proc = ProcessPlan(("/opt/hello",), {}, "/")
    plan = plan_launch(
        LaunchOptions(ntasks=4),
        proc,
        None,
        {"SLURM_JOB_ID": "9"},
        ["rankwire", "exec", "i.sif"],
        "pmi1/2",
        slurm_mpi=PMIX_ONLY,
    )
    assert plan.delegate == (
        "srun", "--mpi=pmix", "-n", "4", "rankwire", "exec", "i.sif", "/opt/hello",
    )  # fmt: skip
    with pytest.raises(UserError):
        plan_launch(
            LaunchOptions(ntasks=4),
            proc,
            None,
            {"SLURM_JOB_ID": "9"},
            ["rankwire", "exec", "i.sif"],
            "pmi1/2",
            slurm_mpi=PMIX_ONLY,
            bridge="off",
        )


@pytest.mark.parametrize(
    "plugins, default, need, wireup",
    [
        (("pmi2", "pmix", "pmix_v4"), "pmi2", "pmi1/2", (("pmi2",), "pmix", "direct")),
        (("pmi2", "pmix", "pmix_v4"), "pmix_v4", "pmi1/2", (("pmi2",), "pmix", "bridged")),
        (("none", "pmix", "pmix_v3"), "pmix_v3", "pmi1/2", ((), "pmix", "bridged")),
        (("none", "cray_shasta", "pmi2"), "pmi2", "pmix", ((), "pmi2", "bridged")),
        (("none", "cray_shasta", "pmi2"), "cray_shasta", "pmix", ((), "pmi2", "")),
        (("none", "cray_shasta"), "none", "pmi1/2", ((), "", "")),
        (("pmi2", "pmix"), "none", "both", (("pmi2", "pmix"), "", "")),
        (("pmix_v5",), "pmix_v5", "both", (("pmix",), "", "direct")),
    ],
)
def test_slurm_wireup_for_doctor_and_recipe(
    plugins: tuple[str, ...], default: str, need: str, wireup: tuple[object, ...]
) -> None:
    w = slurm_wireup(plugins, default, need)
    assert (w.direct, w.bridged, w.by_default) == wireup
