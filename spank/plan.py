"""Pure decisions of the SPANK helper: job facts in, what the user asked for and the
task environment out. No I/O here; `rankwire.spank.helper` gathers and applies."""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Mapping, Sequence
from typing import Optional

from rankwire.errors import UserError
from rankwire.runtime import frame
from rankwire.runtime.options import option, spank_options
from rankwire.runtime.plan import (
    PMIX_TRANSLATIONS,
    WIREUP_PREFIXES,
    ContainerPlan,
    ExecOptions,
    Mount,
    UserFacts,
    cache_dir,
    parse_binds,
    resolve_bind,
)
from rankwire.runtime.reference import Reference, is_remote
from rankwire.runtime.slurmfacts import SlurmStep

# Slurm's special step ids (slurm.h): the batch script, the extern and interactive steps
# run no user program of an srun; a container is only for real steps.
SPECIAL_STEPS = frozenset({0xFFFFFFFA, 0xFFFFFFFB, 0xFFFFFFFC, 0xFFFFFFFD})
# Never taken from the job's environment when planning: under the plugin, binds come
# from --container-mounts only, where site policy sees them.
PLAN_ENV_DROP = option("binds").env


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
    def from_request(cls, req: frame.Records) -> JobFacts:
        """The shim's request frame (see spank/rankwire_spank.c `put_facts`)."""

        def num(key: str) -> int:
            value = frame.one(req, key)
            if value is None:
                raise frame.FrameError(f"the request has no {key}")
            return int(value)

        env = frame.pairs(frame.every(req, "env"))
        return cls(
            uid=num("uid"),
            gid=num("gid"),
            gids=tuple(int(g) for g in frame.every(req, "gids")),
            job_id=num("job_id"),
            step_id=num("step_id"),
            local_tasks=num("local_tasks"),
            total_tasks=num("total_tasks"),
            node_id=num("node_id"),
            nnodes=num("nnodes"),
            stepd_pid=num("stepd_pid"),
            cwd=frame.one(req, "cwd") or env.get("PWD") or "/",
            args=tuple(frame.every(req, "arg")),
            options=frame.pairs(frame.every(req, "opt")),
            env=env,
            stepd_env=frame.pairs(frame.every(req, "stepd_env")),
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
    mounts: tuple[Mount, ...]  # sources absolute (the job's cwd's), targets set
    workdir: Optional[str]
    keep_env: tuple[str, ...]
    writable: bool
    fabric: str
    remap_root: bool
    host_mpi: str = "none"  # --container-host-mpi, else the site's plugstack host_mpi=
    no_home: bool = False  # --no-container-mount-home
    pmi_bridge: str = "auto"  # --container-pmi-bridge


def _flag(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("", "0", "false", "no", "off"):
        return False
    raise UserError(f"--{name}: '{value}' is not a yes/no value")


def parse_mounts(spec: str, cwd: str) -> tuple[Mount, ...]:
    """`SRC[:DST[:ro|rw]][,...]` (Pyxis's form, the grammar of -B); a relative SRC is
    the job's cwd's."""
    named = "--container-mounts"
    return tuple(resolve_bind(m, cwd, named) for m in parse_binds([spec], named))


def option_values(facts: JobFacts) -> dict[str, tuple[Optional[str], str]]:
    """Each plugin option: (value or None, where it came from); option > its variable."""
    out: dict[str, tuple[Optional[str], str]] = {}
    for opt in spank_options():
        if opt.spank in facts.options:
            out[opt.dest] = facts.options[opt.spank], f"--{opt.spank}"
        else:
            out[opt.dest] = facts.env.get(opt.spank_env), opt.spank_env
    return out


def asked(facts: JobFacts, oci_conf: bool) -> Optional[Asked]:
    """The container this step asked for, or None (the plugin stays out of the way).

    The image comes from --container-image, else RANKWIRE_CONTAINER_IMAGE, else srun's own
    --container (SLURM_CONTAINER) -- unless the node has an oci.conf, which makes that
    Slurm's own OCI feature.
    """
    if facts.step_id in SPECIAL_STEPS:
        return None
    got = option_values(facts)
    image, image_from = got["image"]
    if not image and not oci_conf and facts.env.get("SLURM_CONTAINER"):
        image, image_from = facts.env["SLURM_CONTAINER"], "--container"
    if not image:
        return None
    flags = {
        o.dest: _flag(o.spank, got[o.dest][0] or "") for o in spank_options() if o.kind == "flag"
    }
    if flags["no_home"] and flags["mount_home"]:
        raise UserError(
            "--container-mount-home and --no-container-mount-home contradict each other: give one"
        )
    workdir = got["workdir"][0]
    if workdir is not None and not workdir.startswith("/"):
        raise UserError(f"--container-workdir {workdir}: give an absolute path")
    keep = got["keep_env"][0] or ""
    if not is_remote(image):  # docker:// and oras:// are pulled (`helper.check`)
        image = posixpath.normpath(posixpath.join(facts.cwd, image))
    return Asked(
        image=image,
        image_from=image_from,
        mounts=parse_mounts(got["binds"][0] or "", facts.cwd),
        workdir=workdir or None,
        keep_env=tuple(n.strip() for n in keep.split(",") if n.strip()),
        writable=flags["writable_tmpfs"],
        fabric=(got["fabric"][0] or "auto").strip() or "auto",
        remap_root=flags["fakeroot"],
        host_mpi=(got["host_mpi"][0] or facts.arg("host_mpi") or "none").strip() or "none",
        no_home=flags["no_home"],
        pmi_bridge=(got["pmi_bridge"][0] or "auto").strip() or "auto",
    )


# What a pull as the job user takes from the job's environment: registry credentials and
# the pull's timeout (see runtime/registry.py). Nothing else: the child's environment is
# ours, not the job's.
PULL_ENV_KEEP = (
    "RANKWIRE_DOCKER_USERNAME",
    "RANKWIRE_DOCKER_PASSWORD",
    "DOCKER_CONFIG",
    "RANKWIRE_PULL_TIMEOUT",
)


@dataclasses.dataclass(frozen=True)
class Pull:
    """How the check phase pulls a remote image: as the job user, into `root`."""

    source: str  # the reference as asked
    root: str  # the image cache (`pull(root=)`): the user's, or theirs below image_cache=
    site_cache: bool  # root is `image_cache=DIR/UID`, which root makes
    insecure: bool  # plain HTTP: the registry is listed in registry_insecure=
    env: dict[str, str]  # the pulling process's whole environment


def plan_pull(facts: JobFacts, image: str, ref: Reference, home: str, user_name: str) -> Pull:
    """The pull of `ref` for this job. Its cache is `image_cache=DIR` (plugstack.conf)
    /UID if the site set one, else the job user's (RANKWIRE_CACHEDIR of the job, else
    ~/.cache/rankwire of their passwd home, + /images). Plain HTTP only to registries the
    site lists in `registry_insecure=HOST[:PORT][,...]`: a user cannot ask for it."""
    site = facts.arg("image_cache")
    if site is not None and not posixpath.isabs(site):
        raise UserError(f"plugstack.conf image_cache={site}: give an absolute directory")
    if site is not None:
        root = posixpath.join(posixpath.normpath(site), str(facts.uid))
    else:
        env = {**facts.env, "HOME": home}
        if env.get("RANKWIRE_CACHEDIR"):
            env["RANKWIRE_CACHEDIR"] = posixpath.join(facts.cwd, env["RANKWIRE_CACHEDIR"])
        root = posixpath.join(cache_dir(env, home), "images")
    insecure = {h.strip().lower() for h in (facts.arg("registry_insecure") or "").split(",")}
    env = {k: facts.env[k] for k in PULL_ENV_KEEP if k in facts.env}
    env.update(
        PATH="/usr/sbin:/usr/bin:/sbin:/bin",
        LC_ALL="C.UTF-8",
        HOME=home,
        USER=user_name,
        LOGNAME=user_name,
    )
    return Pull(image, root, site is not None, ref.registry.lower() in insecure, env)


def exec_options(want: Asked, mounts: Sequence[Mount]) -> ExecOptions:
    """What the checked request means for the planners (`mounts`: the checked ones)."""
    return ExecOptions(
        binds=tuple(mounts),
        writable_tmpfs=want.writable,
        fakeroot=want.remap_root,
        fabric=want.fabric,
        host_mpi=want.host_mpi,
        no_home=want.no_home,
        pmi_bridge=want.pmi_bridge,
        share="none",
        workdir=want.workdir,
        bind_cwd=want.workdir is None,
    )


def user_facts(facts: JobFacts, home: str, slurm: Optional[SlurmStep]) -> UserFacts:
    """The job user as the planners see them. `home` is the passwd database's: the job's
    HOME is the user's to set, and the home directory is bound."""
    env = facts.env
    return UserFacts(
        uid=facts.uid,
        gid=facts.gid,
        home=home,
        cwd=facts.cwd,
        environ={k: v for k, v in env.items() if k not in PLAN_ENV_DROP},
        cache_dir=cache_dir(env, home),
        slurm=slurm,
    )


def step_env(facts: JobFacts) -> dict[str, str]:
    """The environment Slurm's step facts are read from (the tasks get these later).
    PMIX_SERVER_TMPDIR is slurmstepd's own or none: the job's could name any dir."""
    return {
        **{k: v for k, v in facts.env.items() if k != "PMIX_SERVER_TMPDIR"},
        **facts.stepd_env,
        "SLURM_JOB_ID": str(facts.job_id),
        "SLURM_STEP_ID": str(facts.step_id),
        "SLURM_STEP_NUM_TASKS": str(facts.total_tasks),
    }


@dataclasses.dataclass(frozen=True)
class TaskEnv:
    """Changes to each task's environment, applied by the shim in task_init."""

    set: tuple[str, ...]  # NAME=VALUE
    unset: tuple[str, ...]
    copy: tuple[str, ...]  # TARGET=SOURCE: copy when SOURCE is set and TARGET is not


def task_env(
    job_env: Mapping[str, str], container_env: Mapping[str, str], keep: Sequence[str]
) -> TaskEnv:
    """What turns the step's environment into the container's (`plan_env`'s result).

    Slurm's wire-up variables (SLURM_*, PMI_*, PMIX_*: some are per task and set after we
    planned) are Slurm's alone: neither the image nor the plan sets or unsets them. Names
    in `keep` (--container-env) keep the host value. PMIx's PMIX_*_MODULE become
    PMIX_MCA_* per task, as `plan_env` does for exec. Values must reach a task whole.
    """
    keep_set = set(keep)
    mine = [k for k in container_env if not k.startswith(WIREUP_PREFIXES) and k not in keep_set]
    for k in mine:
        if "\0" in container_env[k] or _unencodable(container_env[k]):
            raise UserError(
                f"the container's variable {k} holds a NUL or invalid text: fix the image's "
                "environment"
            )
    changes = tuple(f"{k}={container_env[k]}" for k in mine if job_env.get(k) != container_env[k])
    gone = tuple(
        k
        for k in job_env
        if k not in container_env and k not in keep_set and not k.startswith(WIREUP_PREFIXES)
    )
    copy = tuple(f"{target}={source}" for source, target in PMIX_TRANSLATIONS)
    return TaskEnv(changes, gone, copy)


def _unencodable(value: str) -> bool:
    try:
        value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return True
    return False


def with_descriptors(container: ContainerPlan, fds: Mapping[str, int]) -> ContainerPlan:
    """Binds of the host paths the check phase opened come from those descriptors
    (`/proc/self/fd/N`): nothing is looked up by path again."""
    mounts = tuple(
        dataclasses.replace(m, source=f"/proc/self/fd/{fds[m.source]}")
        if m.kind == "bind" and m.source in fds
        else m
        for m in container.mounts
    )
    return dataclasses.replace(container, mounts=mounts)


def for_tasks(container: ContainerPlan) -> ContainerPlan:
    """No PID namespace: slurmstepd execs each task itself and the shim only `setns`es
    it in `task_init` (a PID namespace takes in only the children of who enters it), so
    the tasks stay in the host's, see its /proc, and Slurm's proctrack owns them."""
    namespaces = tuple(ns for ns in container.namespaces if ns != "pid")
    return dataclasses.replace(container, namespaces=namespaces)


def without_home(container: ContainerPlan, home: str) -> ContainerPlan:
    """Site policy does not let the home directory in: an empty private one instead."""
    mounts = tuple(
        Mount("tmpfs", home, options="mode=0700") if m.kind == "bind" and m.target == home else m
        for m in container.mounts
    )
    return dataclasses.replace(container, mounts=mounts)


def enforced(container: ContainerPlan) -> ContainerPlan:
    """The container root builds under `enforce`: no user namespace (the user cannot
    change its mounts), the image through a read-only loop device."""
    return dataclasses.replace(
        container,
        namespaces=("mount",),
        image_drivers=("loop",),
        overlay_drivers=("kernel",),
        uid_map=(container.uid_map[1], container.uid_map[1], 1),
        gid_map=(container.gid_map[1], container.gid_map[1], 1),
    )
