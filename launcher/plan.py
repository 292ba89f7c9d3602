"""The launch plan: a pure function from (facts, options) to what `rankwire run` will do.

Either ranks are launched here (our PMI server, optionally all inside one shared
container), or, inside a Slurm allocation, the whole job is delegated to `srun`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn, Optional

from rankwire.errors import UserError
from rankwire.record import record
from rankwire.runtime.options import option
from rankwire.runtime.plan import ContainerPlan, ProcessPlan

PMI_CHOICES = option("pmi").choices  # ("auto", "pmi1", "pmi2", "pmix")
# -n bounds: MPI_Comm_size is a C int, and one host never holds more processes than the
# kernel's PID_MAX_LIMIT (2**22 on 64-bit) whatever its pid_max; the open files limit
# (`plan_open_files`) is usually the tighter one.
MAX_RANKS = 2**31 - 1
MAX_LOCAL_RANKS = 2**22
# What srun's --mpi takes for each of our choices (Slurm's pmi2 plugin speaks PMI-1 too).
SRUN_MPI = {"pmi1": "pmi2", "pmi2": "pmi2", "pmix": "pmix"}
# Open MPI's ranks busy-poll while they wait (in MPI_Init's exchange, a barrier, a
# fence); more ranks than CPUs then steal each other's time. mpirun marks such a node
# oversubscribed and the ranks yield when idle: a launch of ours does the same (Open MPI
# 4 and 5 read this; a value the ranks' environment already has is kept).
YIELD_WHEN_IDLE = "OMPI_MCA_mpi_yield_when_idle"
# Open MPI picks its messaging layer (pml) by opening every candidate: cm opens each
# of its mtl components (psm, psm2, ofi), whose libraries look for their hardware, and
# Debian's libpsm_infinipath's constructor alone sleeps 200-300 ms in every rank. On a
# node with no fabric adapter and no GPU (`facts.fabric_free`), ob1 (shared memory,
# TCP) is what that search ends with (Open MPI 4.1 and 5; 4.0's UCX pml may take such a
# node too, to the same end): a local launch's Open MPI ranks are told so, unless their
# environment chooses a pml or an mtl itself, or names its own parameter files. (A pml
# or mtl set in an MCA parameter file, the image's or ~/.openmpi's, yields to it.)
PML, MTL, PARAM_FILES = "OMPI_MCA_pml", "OMPI_MCA_mtl", "OMPI_MCA_mca_base_param_files"
# A warm list (`runtime/warm.py`): where it is kept, and its (offset, length, path) ranges.
Warm = tuple[str, tuple[tuple[int, int, str], ...]]


@record
class LaunchOptions:
    ntasks: int = 1
    pmi: str = "auto"
    pmi_transport: str = "fd"  # "fd" (inherited socketpair) or "port" (TCP on 127.0.0.1)
    tag_output: bool = False
    timeout: Optional[float] = None  # whole job, seconds
    fence_timeout: Optional[float] = None
    grace: float = 3.0  # SIGTERM -> SIGKILL when a job is torn down
    verbose: bool = False
    no_slurm: bool = False


@record
class LaunchPlan:
    """Local launch: `ranks` copies of `process` (PMI env added per rank at spawn time)."""

    ntasks: int
    pmi: str
    pmi_transport: str
    tag_output: bool
    timeout: Optional[float]
    fence_timeout: Optional[float]
    grace: float
    container: Optional[ContainerPlan]  # None: ranks run on the host
    process: ProcessPlan
    stdin_rank: int = 0  # the rank that reads our stdin (like mpiexec); the others /dev/null
    # The ranks' program links an MPI: a job of N > 1 where no rank connects to our PMI
    # server ran as N singletons (the executor says so and fails).
    expect_pmi: bool = False
    # RLIMIT_NOFILE soft limit to set before the ranks start (None: leave it).
    open_files: Optional[int] = None
    # More ranks than the CPUs they may run on (a local launch): the ranks are told to
    # yield when idle (YIELD_WHEN_IDLE), as mpirun's are.
    oversubscribed: bool = False
    # Open MPI's ranks were told `OMPI_MCA_pml=ob1` (PML): the node has no fabric adapter
    # and no GPU.
    pml_ob1: bool = False
    # Set instead when the job is delegated: the srun command line to exec.
    delegate: Optional[tuple[str, ...]] = None
    slurm_job: Optional[str] = None  # the allocation we run in (SLURM_JOB_ID)
    # Where to keep the ranks' warm list (`runtime/warm.py`) when there is none yet; a
    # launch that has one reads it ahead instead (`container.prefetch`).
    warm_record: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ranks"] = (
            [
                {"rank": r, "env": rank_env_preview(r, self.ntasks, self.pmi_transport, self.pmi)}
                for r in range(self.ntasks)
            ]
            if self.delegate is None
            else []
        )
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LaunchPlan:
        """The plan `dataclasses.asdict` made of one (a kept launch plan's JSON)."""
        fields = dict(d)
        fields.pop("ranks", None)  # `to_dict`'s preview
        container = d.get("container")
        fields["container"] = None if container is None else ContainerPlan.from_dict(container)
        process = d["process"]
        fields["process"] = ProcessPlan(
            argv=tuple(process["argv"]),
            env=dict(process["env"]),
            workdir=process["workdir"],
            no_new_privs=process["no_new_privs"],
        )
        if d.get("delegate") is not None:
            fields["delegate"] = tuple(d["delegate"])
        return cls(**fields)


def rank_env_preview(rank: int, size: int, transport: str, pmi: str) -> dict[str, str]:
    """The PMI variables a rank gets; fd numbers and ports exist only at launch time."""
    if pmi == "pmix":
        return {
            "PMIX_RANK": str(rank),
            "PMIX_NAMESPACE": "<job namespace>",
            "PMIX_SERVER_URI*": "tcp4://127.0.0.1:<port>",
            "FLUX_JOB_ID": "<job id>",
        }
    env = {"PMI_RANK": str(rank), "PMI_SIZE": str(size)}
    if transport == "fd":
        env["PMI_FD"] = "<socketpair, inherited>"
    else:
        env.update({"PMI_PORT": "127.0.0.1:<port>", "PMI_ID": "<per-rank id>"})
    return env


def validate(opts: LaunchOptions) -> None:
    if opts.ntasks < 1:
        raise UserError(f"-n {opts.ntasks}: the number of ranks must be at least 1")
    if opts.ntasks > MAX_RANKS:
        raise UserError(
            f"-n {opts.ntasks}: at most {MAX_RANKS} ranks (an MPI rank is a C int); "
            "give a smaller -n"
        )
    if opts.pmi not in PMI_CHOICES:
        raise UserError(f"--pmi {opts.pmi}: choose one of {', '.join(PMI_CHOICES)}")
    for name, seconds in (("--timeout", opts.timeout), ("--fence-timeout", opts.fence_timeout)):
        if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
            raise UserError(
                f"{name} {seconds:g}: give a positive, finite number of seconds "
                f"(or leave {name} out: no limit)"
            )


def host_process(argv: Sequence[str], environ: Mapping[str, str], cwd: str) -> ProcessPlan:
    """A rank on the host: the caller's environment and directory, unchanged."""
    if not argv:
        raise UserError("no command given: rankwire run -n N COMMAND [ARGS...]")
    return ProcessPlan(argv=tuple(argv), env=dict(environ), workdir=cwd, no_new_privs=False)


def resolve_pmi(choice: str, mpi_kind: Optional[str]) -> str:
    """`auto` -> "pmix" when the ranks' MPI is Open MPI (or another PMIx-only MPI), else
    "pmi2" (our PMI server speaks PMI-1 and PMI-2, whichever each rank's init asks for)."""
    if choice != "auto":
        return choice
    return "pmix" if mpi_kind == "pmix" else "pmi2"


# What the launcher holds open: its own (stdio, the lease, the event loop, /dev/null, the
# PMI listener...: 13 measured) plus the ends a spawn holds for a moment.
FD_BASE = 20
# Per rank, for the life of the job: its PMI connection (socketpair end or accepted TCP
# connection; for PMIx the helper's, which inherits our limit) and its pidfd; with
# --tag-output also its stdout and stderr pipes.
FD_PER_RANK = 2
FD_PER_TAGGED_RANK = 4


def check_pmi(choice: str, kind: Optional[str], whose: str) -> None:
    """Refuse a forced PMI the ranks' MPI cannot speak: it would init as N singletons."""
    if choice == "pmix" and kind == "pmi1/2":
        raise UserError(
            f"--pmi pmix: {whose} MPI (MPICH, without libpmix) speaks PMI-1/PMI-2 only: "
            "use --pmi auto or --pmi pmi2"
        )
    if choice in ("pmi1", "pmi2") and kind == "pmix":
        raise UserError(
            f"--pmi {choice}: {whose} MPI (Open MPI, or one linked with libpmix) speaks PMIx "
            "only: use --pmi auto or --pmi pmix"
        )


@record
class SlurmMpi:
    """What the site's srun offers: `srun --mpi=list` (pmix_v4 and the like included) and
    MpiDefault ("none" when unset, "" when unknown)."""

    plugins: tuple[str, ...]
    default: str


def srun_mpi(pmi: str, offered: Optional[SlurmMpi], bridge_ok: bool) -> str:
    """The `--mpi` of a delegated job: the site's default when it serves the ranks' PMI,
    directly or through the tasks' PMI bridge (`rankwire exec` bridges by itself, both
    ways: `pmi/bridgeplan.py`); else the plugin that serves it, directly, else bridged;
    else one line saying what the site lacks."""
    wanted = SRUN_MPI[pmi]
    if offered is None or not offered.plugins:
        return wanted  # srun will say what it lacks
    have = {p.split("_")[0] for p in offered.plugins}
    bridgeable = {"pmix", "pmi2"} if bridge_ok else set()
    default = offered.default.split("_")[0]
    if default == wanted or default in bridgeable:
        return default
    if wanted in have:
        return wanted
    for other in sorted(have & bridgeable):
        return other
    need = "PMI-1/PMI-2" if wanted == "pmi2" else "PMIx"
    if have & {"pmix", "pmi2"}:
        fix = "run it in an image (the tasks' PMI bridge connects it to the site's PMI)"
    else:
        fix = f"launch here with --no-slurm (rankwire serves {need} itself)"
    return _refuse(need, offered, fix)


def _refuse(need: str, offered: SlurmMpi, fix: str) -> NoReturn:
    plugins = ", ".join(offered.plugins)
    raise UserError(
        f"the ranks' MPI speaks {need} and this site's srun offers --mpi={plugins}: {fix}"
    )


def plan_open_files(ntasks: int, tag_output: bool, limit: tuple[int, int]) -> Optional[int]:
    """The soft RLIMIT_NOFILE to set (None: the current one will do), given (soft, hard).

    Like mpirun, the soft limit is raised to the hard one when the job needs more."""
    soft, hard = limit
    per_rank = FD_PER_TAGGED_RANK if tag_output else FD_PER_RANK
    needed = FD_BASE + ntasks * per_rank
    if needed <= soft:
        return None
    if needed <= hard:
        return hard
    fit = (hard - FD_BASE) // per_rank
    fix = "raise it with ulimit -n" + (f" or use at most {fit} ranks" if fit >= 1 else "")
    raise UserError(f"-n {ntasks} needs about {needed} open files but the limit is {hard}: {fix}")


def plan_launch(
    opts: LaunchOptions,
    process: ProcessPlan,
    container: Optional[ContainerPlan],
    environ: Mapping[str, str],
    rankwire_exec: Sequence[str],
    mpi_kind: Optional[str] = None,
    program_kind: Optional[str] = None,
    open_files: Optional[tuple[int, int]] = None,
    slurm_mpi: Optional[SlurmMpi] = None,
    bridge: str = "auto",
    cpus: Optional[int] = None,
    warm: Optional[Warm] = None,
    fabric_free: Optional[bool] = None,
) -> LaunchPlan:
    """Decide the PMI and local launch vs delegation to srun.

    `rankwire_exec` is the `rankwire exec [container options] IMAGE` prefix each srun task
    runs when there is an image (empty: no image). `mpi_kind` is what the image or the
    program was found to link ("pmix", "pmi1/2", "both", None), `program_kind` the same
    for the ranks' program alone (known only when it links an MPI itself).
    `open_files` is RLIMIT_NOFILE (soft, hard) of a local launch (None: not checked).
    `slurm_mpi`: what the site's srun offers (read only inside an allocation; None:
    unknown), `bridge` the tasks' --pmi-bridge choice. `cpus`: how many CPUs the ranks of
    a local launch may run on (None: not known, never oversubscribed). `warm`: where the
    warm list of the ranks' program in the image is kept and what it holds (`runtime/
    warm.py`): a local launch in a container reads it ahead, or records it.
    `fabric_free`: the node has no fabric adapter and no GPU (None: not looked at).
    """
    validate(opts)
    kind = program_kind or mpi_kind
    check_pmi(opts.pmi, kind, "the image's" if container is not None else "the program's")
    pmi = resolve_pmi(opts.pmi, kind)
    # Wire-up variables of whatever launched us must not reach the ranks: each rank gets
    # its own from our server (or from srun).
    env = {k: v for k, v in process.env.items() if not k.startswith(("PMI_", "PMIX_"))}
    process = dataclasses.replace(process, env=env)
    delegate = None
    if environ.get("SLURM_JOB_ID") and not opts.no_slurm:
        mpi = srun_mpi(pmi, slurm_mpi, bridge_ok=bool(rankwire_exec) and bridge != "off")
        srun = ["srun", f"--mpi={mpi}", "-n", str(opts.ntasks)]
        if opts.tag_output:
            srun.append("--label")
        if opts.timeout:
            srun.append(f"--time={max(1, int(opts.timeout + 59) // 60)}")
        delegate = (*srun, *rankwire_exec, *process.argv)
    elif opts.ntasks > MAX_LOCAL_RANKS:
        raise UserError(
            f"-n {opts.ntasks}: one host runs at most {MAX_LOCAL_RANKS} processes (the "
            "kernel's PID_MAX_LIMIT): run it across nodes in a Slurm allocation"
        )
    nofile = None
    if delegate is None and open_files is not None:
        nofile = plan_open_files(opts.ntasks, opts.tag_output, open_files)
    oversubscribed = delegate is None and cpus is not None and opts.ntasks > cpus
    if oversubscribed and pmi == "pmix" and YIELD_WHEN_IDLE not in process.env:
        process = dataclasses.replace(process, env={**process.env, YIELD_WHEN_IDLE: "1"})
    chosen = any(k in process.env for k in (PML, MTL, PARAM_FILES))
    pml_ob1 = delegate is None and pmi == "pmix" and fabric_free is True and not chosen
    if pml_ob1:
        process = dataclasses.replace(process, env={**process.env, PML: "ob1"})
    plan = LaunchPlan(
        ntasks=opts.ntasks,
        pmi=pmi,
        pmi_transport=opts.pmi_transport,
        tag_output=opts.tag_output,
        timeout=opts.timeout,
        fence_timeout=opts.fence_timeout,
        grace=opts.grace,
        container=container,
        process=process,
        expect_pmi=opts.ntasks > 1 and program_kind is not None,
        open_files=nofile,
        oversubscribed=oversubscribed,
        pml_ob1=pml_ob1,
        delegate=delegate,
        slurm_job=environ.get("SLURM_JOB_ID") or None,
    )
    return with_warm(plan, warm)


def with_warm(plan: LaunchPlan, warm: Optional[Warm]) -> LaunchPlan:
    """`plan` with the warm list of its ranks' program (`warm`: where it is kept, what it
    holds; `runtime/warm.py`): a local launch in a container reads it ahead
    (`container.prefetch`), or, with none yet, records it (`warm_record`)."""
    if plan.delegate is not None or plan.container is None or warm is None:
        return plan
    if warm[1]:
        return dataclasses.replace(
            plan, container=dataclasses.replace(plan.container, prefetch=warm[1])
        )
    return dataclasses.replace(plan, warm_record=warm[0])


def describe(plan: LaunchPlan) -> str:
    """One line for -v."""
    if plan.delegate:
        return f"inside Slurm job {plan.slurm_job}: delegating to " + " ".join(plan.delegate)
    where = f"one shared container of {plan.container.image}" if plan.container else "the host"
    if plan.pmi == "pmix":
        server = "PMIx server (libpmix, in a helper process) over 127.0.0.1 TCP"
    else:
        wire = "inherited socketpairs" if plan.pmi_transport == "fd" else "127.0.0.1 TCP"
        server = f"PMI-1/PMI-2 server over {wire}"
    return f"launching {plan.ntasks} rank(s) on {where}, {server}"


def describe_oversubscription(plan: LaunchPlan) -> Optional[str]:
    """A second line for -v when the ranks outnumber their CPUs."""
    if not plan.oversubscribed:
        return None
    told = plan.process.env.get(YIELD_WHEN_IDLE)
    if plan.pmi != "pmix":
        how = "their MPI is not told: only Open MPI has a setting for it"
    elif told == "1":
        how = f"{YIELD_WHEN_IDLE}=1: Open MPI's ranks yield when idle"
    else:
        how = f"{YIELD_WHEN_IDLE}={told} kept, as the ranks' environment sets it"
    return f"{plan.ntasks} ranks on fewer CPUs ({how})"


def describe_pml(plan: LaunchPlan) -> Optional[str]:
    """A line for -v when Open MPI's ranks are told their pml."""
    if not plan.pml_ob1:
        return None
    return (
        f"{PML}=ob1: no fabric adapter or GPU on this node, so Open MPI's ranks skip "
        f"probing for them (set {PML} or {MTL} to choose otherwise)"
    )
