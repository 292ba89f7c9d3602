"""Pure decisions of the SPANK helper: job facts in, what the user asked for and the
task environment out. No I/O here; `rankwire.spank.helper` gathers and applies."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from rankwire.errors import UserError
from rankwire.runtime.plan import PMIX_TRANSLATIONS

# Slurm's special step ids (slurm.h): the batch script, the extern and interactive steps
# run no user program of an srun; a container is only for real steps.
SPECIAL_STEPS = frozenset({0xFFFFFFFA, 0xFFFFFFFB, 0xFFFFFFFC, 0xFFFFFFFD})
# Each option can also come from the job's environment (option wins).
OPTION_ENV = {
    "container-image": "RANKWIRE_CONTAINER_IMAGE",
    "container-mounts": "RANKWIRE_CONTAINER_MOUNTS",
    "container-workdir": "RANKWIRE_CONTAINER_WORKDIR",
    "container-env": "RANKWIRE_CONTAINER_ENV",
    "container-writable": "RANKWIRE_CONTAINER_WRITABLE",
    "container-fabric": "RANKWIRE_CONTAINER_FABRIC",
    "container-remap-root": "RANKWIRE_CONTAINER_REMAP_ROOT",
}
FLAG_OPTIONS = ("container-writable", "container-remap-root")
# Never taken from the job's environment when planning: under the plugin, binds come
# from --container-mounts only, where site policy sees them.
PLAN_ENV_DROP = ("RANKWIRE_BIND", "APPTAINER_BINDPATH")


@dataclasses.dataclass(frozen=True)
class JobFacts:
    """What slurmstepd told the helper (see spank/rankwire_spank.c `put_facts`)."""

    uid: int
    gid: int
    gids: tuple[int, ...]
    job_id: int
    step_id: int
    local_tasks: int
    total_tasks: int
    node_id: int
    nnodes: int
    stepd_pid: int
    cwd: str
    args: tuple[str, ...]
    options: dict[str, str]
    env: dict[str, str]
    stepd_env: dict[str, str]

    @classmethod
    def from_request(cls, req: Mapping[str, Any]) -> JobFacts:
        def pairs(key: str) -> dict[str, str]:  # ["K=V", ...] -> {K: V}
            return dict(e.split("=", 1) for e in req.get(key, ()) if "=" in e)

        env = pairs("env")
        return cls(
            uid=int(req["uid"]),
            gid=int(req["gid"]),
            gids=tuple(int(g) for g in req.get("gids", ())),
            job_id=int(req["job_id"]),
            step_id=int(req["step_id"]),
            local_tasks=int(req["local_tasks"]),
            total_tasks=int(req["total_tasks"]),
            node_id=int(req["node_id"]),
            nnodes=int(req["nnodes"]),
            stepd_pid=int(req["stepd_pid"]),
            cwd=req.get("cwd") or env.get("PWD") or "/",
            args=tuple(req.get("args", ())),
            options=pairs("options"),
            env=env,
            stepd_env=pairs("stepd_env"),
        )

    def arg(self, key: str) -> Optional[str]:
        """A plugstack.conf argument KEY=VALUE."""
        for a in self.args:
            k, sep, v = a.partition("=")
            if sep and k == key:
                return v
        return None


@dataclasses.dataclass(frozen=True)
class Asked:
    """The container a step asked for, before any check."""

    image: str
    image_from: str  # which option or variable named it, for messages
    mounts: tuple[tuple[str, str, bool], ...]  # (source, target, readonly)
    workdir: Optional[str]
    keep_env: tuple[str, ...]
    writable: bool
    fabric: str
    remap_root: bool


def _flag(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("", "0", "false", "no", "off"):
        return False
    raise UserError(f"--{name}: '{value}' is not a yes/no value")


def parse_mounts(spec: str, cwd: str) -> tuple[tuple[str, str, bool], ...]:
    """`SRC[:DST[:ro|rw]][,...]` (Pyxis's form); a relative SRC is the job's cwd's."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        parts = item.split(":")
        if len(parts) > 3 or not parts[0]:
            raise UserError(f"bad --container-mounts entry '{item}': use SRC[:DST[:ro|rw]]")
        src = os.path.normpath(os.path.join(cwd, parts[0]))
        dst = parts[1] if len(parts) > 1 and parts[1] else src
        flags = parts[2].split("+") if len(parts) > 2 else []
        bad = [f for f in flags if f not in ("ro", "rw")]
        if bad:
            raise UserError(f"bad --container-mounts entry '{item}': unknown flag '{bad[0]}'")
        if not os.path.isabs(dst):
            raise UserError(f"bad --container-mounts entry '{item}': DST must be absolute")
        out.append((src, os.path.normpath(dst), "ro" in flags))
    return tuple(out)


def asked(facts: JobFacts, oci_conf: bool) -> Optional[Asked]:
    """The container this step asked for, or None (the plugin stays out of the way).

    The image comes from --container-image, else RANKWIRE_CONTAINER_IMAGE, else srun's own
    --container (SLURM_CONTAINER) -- unless the node has an oci.conf, which makes that
    Slurm's own OCI feature.
    """
    if facts.step_id in SPECIAL_STEPS:
        return None

    def get(name: str) -> tuple[Optional[str], str]:
        if name in facts.options:
            return facts.options[name], f"--{name}"
        var = OPTION_ENV[name]
        return facts.env.get(var), var

    image, image_from = get("container-image")
    if not image and not oci_conf and facts.env.get("SLURM_CONTAINER"):
        image, image_from = facts.env["SLURM_CONTAINER"], "--container"
    if not image:
        return None
    mounts, _ = get("container-mounts")
    workdir, _ = get("container-workdir")
    keep, _ = get("container-env")
    fabric, _ = get("container-fabric")
    flags = {}
    for name in FLAG_OPTIONS:
        value, _ = get(name)
        flags[name] = _flag(name, value) if value is not None else False
    if workdir is not None and not os.path.isabs(workdir):
        raise UserError(f"--container-workdir {workdir}: give an absolute path")
    return Asked(
        image=os.path.normpath(os.path.join(facts.cwd, image)),
        image_from=image_from,
        mounts=parse_mounts(mounts or "", facts.cwd),
        workdir=workdir or None,
        keep_env=tuple(n.strip() for n in (keep or "").split(",") if n.strip()),
        writable=flags["container-writable"],
        fabric=(fabric or "auto").strip() or "auto",
        remap_root=flags["container-remap-root"],
    )


@dataclasses.dataclass(frozen=True)
class TaskEnv:
    """Changes to each task's environment, applied by the shim in task_init."""

    set: tuple[str, ...]  # NAME=VALUE
    unset: tuple[str, ...]
    copy: tuple[str, ...]  # TARGET=SOURCE: copy when SOURCE is set and TARGET is not


def task_env(job_env: Mapping[str, str], container_env: Mapping[str, str], keep: Sequence[str]):
    """What turns the step's environment into the container's (`plan_env`'s result).

    Slurm adds the per-task variables (PMI_FD, PMIX_RANK, SLURM_PROCID, ...) after we
    planned; they are never touched. Names in `keep` (--container-env) keep the host value.
    PMIx's PMIX_*_MODULE become PMIX_MCA_* per task, as `plan_env` does for exec.
    """
    keep_set = set(keep)
    changes = tuple(
        f"{k}={v}" for k, v in container_env.items() if job_env.get(k) != v and k not in keep_set
    )
    gone = tuple(k for k in job_env if k not in container_env and k not in keep_set)
    copy = tuple(f"{target}={source}" for source, target in PMIX_TRANSLATIONS)
    return TaskEnv(changes, gone, copy)
