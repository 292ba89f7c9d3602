"""Pure decisions of the SPANK helper: job facts in, what the user asked for and the
task environment out. No I/O here; `rankwire.spank.helper` gathers and applies."""

from __future__ import annotations

import dataclasses
import posixpath
import re
from collections.abc import Mapping, Sequence
from typing import Optional

from rankwire.errors import UserError
from rankwire.record import record
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
    check_name,
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


@record
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
    argv: tuple[str, ...] = ()  # the tasks' command (S_JOB_ARGV)
    # What the shim's tickets key by name only (spank/ticket.c `step_values`): "NAME=" a
    # variable, else a prefix of names. Slurm makes their values anew per step or job.
    step_values: tuple[str, ...] = ()

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
            argv=tuple(frame.every(req, "argv")),
            step_values=tuple(frame.every(req, "step_value")),
        )

    def arg(self, key: str) -> Optional[str]:
        """A plugstack.conf argument KEY=VALUE."""
        for a in self.args:
            k, sep, v = a.partition("=")
            if sep and k == key:
                return v
        return None


@record
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
    name: Optional[str] = None  # --container-name NAME (the job's container on the node)
    name_mode: str = "auto"  # its :auto|:create|:exec|:no_exec
    save: Optional[str] = None  # --container-save PATH (absolute: the job's cwd's)
    scope: str = "job"  # plugstack container_scope=: names per job, or per user ("global")
    # The image's ENTRYPOINT runs the tasks' command: "on" (--container-entrypoint),
    # "site" (plugstack execute_entrypoint=1: not for an image that has none), or "off".
    entrypoint: str = "off"


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
    name, mode = parse_name(got["container_name"][0], got["container_name"][1])
    if not image and name is None:
        return None
    scope = container_scope(facts.args)
    if name is not None and scope == "global" and JOB_KEY.match(name):
        raise UserError(
            f"--container-name {name}: names like job<N>-... are the job-scoped containers' "
            "here; choose another"
        )
    flags = {
        o.dest: _flag(o.spank, got[o.dest][0] or "") for o in spank_options() if o.kind == "flag"
    }
    if flags["no_home"] and flags["mount_home"]:
        raise UserError(
            "--container-mount-home and --no-container-mount-home contradict each other: give one"
        )
    entrypoint = entrypoint_choice(flags, facts.arg("execute_entrypoint"))
    workdir = got["workdir"][0]
    if workdir is not None and not workdir.startswith("/"):
        raise UserError(f"--container-workdir {workdir}: give an absolute path")
    keep = got["keep_env"][0] or ""
    if image and not is_remote(image):  # docker:// and oras:// are pulled (`helper.check`)
        image = posixpath.normpath(posixpath.join(facts.cwd, image))
    save = got["container_save"][0]
    if save is not None:
        if not save.strip() or save.endswith("/"):
            raise UserError(f"--container-save '{save}': give the path of the .sif file to write")
        save = posixpath.normpath(posixpath.join(facts.cwd, save))
    return Asked(
        image=image or "",
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
        name=name,
        name_mode=mode,
        save=save,
        scope=scope,
        entrypoint=entrypoint,
    )


def entrypoint_choice(flags: Mapping[str, bool], site: Optional[str]) -> str:
    """--container-entrypoint ("on"), --no-container-entrypoint ("off"), else the site's
    plugstack.conf `execute_entrypoint=` ("site" when true; off by default, as Pyxis)."""
    if flags["entrypoint"] and flags["no_entrypoint"]:
        raise UserError(
            "--container-entrypoint and --no-container-entrypoint contradict each other: give one"
        )
    if flags["entrypoint"]:
        return "on"
    if flags["no_entrypoint"] or site is None:
        return "off"
    value = site.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return "site"
    if value in ("", "0", "false", "no", "off"):
        return "off"
    raise UserError(f"plugstack.conf execute_entrypoint={site}: give 1 or 0")


NAME_MODES = ("auto", "create", "exec", "no_exec")


def parse_name(value: Optional[str], named: str) -> tuple[Optional[str], str]:
    """`NAME[:auto|create|exec|no_exec]` (Pyxis's form; `auto` when absent)."""
    if value is None:
        return None, "auto"
    name, sep, mode = value.partition(":")
    if sep and mode not in NAME_MODES:
        raise UserError(f"{named} {value}: the mode after ':' is one of {', '.join(NAME_MODES)}")
    check_name(name, f"{named} {value}")
    return name, mode or "auto"


# Where a job's named containers keep their changes on a node: BASE/SLURMD/JOB/UID/NAME,
# BASE the plugstack's named_dir= or JOBS_DIR (root's down to JOB, made by the check
# phase; JOB/UID the job user's). SLURMD tells the slurmd (`slurmd_key`): its slurm.conf
# and its node, as a host may run several slurmd (`slurmd -N`, the test clusters) and a
# named_dir= on a shared file system is seen by every node.
JOBS_DIR = "/run/rankwire/jobs"
_KEY_BYTES = frozenset(b"._-abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
CONF_KEY_MAX = 200  # bytes of SLURM_CONF kept in the key
NODE_KEY_MAX = 50  # bytes of the node name kept: the key stays one file name (<= 255)


def _key_part(text: str, limit: int) -> str:
    """`text`'s first `limit` bytes, each but [A-Za-z0-9._-] as "_" (bytes, as the shim
    counts them)."""
    raw = text.encode("utf-8", "surrogateescape")[:limit]
    return "".join(chr(b) if b in _KEY_BYTES else "_" for b in raw)


def slurmd_key(slurm_conf: Optional[str], node: Optional[str] = None) -> str:
    """The slurmd, as one file name: the SLURM_CONF it (and slurmstepd, and its epilog)
    runs with ("default": none), then "@" and the node it serves (SLURMD_NODENAME, which
    slurmstepd and the job epilog get from slurmd) when there is one. Each part's bytes
    but [A-Za-z0-9._-] as "_" (so "@" is only the separator), CONF_KEY_MAX and
    NODE_KEY_MAX at most (spank/rankwire_spank.c `slurmd_key` makes the same)."""
    key = _key_part(slurm_conf, CONF_KEY_MAX) if slurm_conf else "default"
    return f"{key}@{_key_part(node, NODE_KEY_MAX)}" if node else key


def named_base(args: Sequence[str]) -> str:
    """BASE: plugstack.conf `named_dir=DIR` (a local disk: /run is memory), else JOBS_DIR."""
    given = [a.partition("=")[2] for a in args if a.startswith("named_dir=")]
    base = given[-1] if given else JOBS_DIR
    if not posixpath.isabs(base) or posixpath.normpath(base) == "/":
        raise UserError(f"plugstack.conf named_dir={base}: give an absolute directory")
    return posixpath.normpath(base)


def jobs_dir(args: Sequence[str], slurm_conf: Optional[str], node: Optional[str]) -> str:
    """BASE/SLURMD: the jobs' dirs of the slurmd of `slurm_conf` serving `node`."""
    return posixpath.join(named_base(args), slurmd_key(slurm_conf, node))


def stepd_jobs_dir(facts: JobFacts) -> str:
    """BASE/SLURMD of the slurmd whose slurmstepd sent `facts` (its own SLURM_CONF and
    SLURMD_NODENAME, never the job's: a job started on another node carries that node's)."""
    env = facts.stepd_env
    return jobs_dir(facts.args, env.get("SLURM_CONF"), env.get("SLURMD_NODENAME"))


SCOPES = ("job", "global")
JOB_KEY = re.compile(r"job[0-9]+-")  # `job_key`'s names


def container_scope(args: Sequence[str]) -> str:
    """plugstack.conf `container_scope=job|global` (default job): a name is the job's
    (its containers go with it), or the user's across their jobs on the node (Pyxis's
    default; `rankwire instance list|stop` with RANKWIRE_RUNTIME_DIR=/run/rankwire/UID)."""
    given = [a.partition("=")[2] for a in args if a.startswith("container_scope=")]
    scope = given[-1] if given else "job"
    if scope not in SCOPES:
        raise UserError(f"plugstack.conf container_scope={scope}: give job or global")
    return scope


def job_key(job_id: int) -> str:
    """The start of the socket names of job `job_id`'s containers (job scope)."""
    return f"job{job_id}-"


def named_key(facts: JobFacts, want: Asked) -> str:
    """The holder's socket name (instances/KEY.sock in the user's runtime dir, so per
    user on this node): per job, or (global scope) the name itself."""
    assert want.name is not None
    return want.name if want.scope == "global" else f"{job_key(facts.job_id)}{want.name}"


def named_socket(runtime_dir: str, facts: JobFacts, want: Asked) -> str:
    """The named container's holder socket, in the user's runtime dir."""
    return posixpath.join(runtime_dir, "instances", f"{named_key(facts, want)}.sock")


def joins_without_helper(want: Asked) -> bool:
    """May a later step that repeats this one's request join its named container with no
    helper at all (the shim's ticket, `rankwire_spank.c` `join_fast`)? Only when a join
    is all such a step does: a job-scoped name in mode auto or exec (create refuses an
    existing name, no_exec keeps the tasks out), no --container-save (a phase of its own
    after the tasks) and no --container-mounts (a join ignores them, with a warning that
    only the helper's join gives). Enforcing sites never get here (root's container)."""
    return (
        want.name is not None
        and want.name_mode in ("auto", "exec")
        and want.scope == "job"
        and want.save is None
        and not want.mounts
    )


def starts_fresh(want: Asked) -> bool:
    """May a later step that repeats this one's request (in any job of the user) start its
    container with no helper at all (the shim's fresh ticket, `spank/ticket.c`
    `rw_fresh_start`: the C front end starts it from the start phase's plugin plan)? Only
    a container of its own for the step: no name (a named one has its own ticket), no
    --container-save (a phase after the tasks), an image file (a pull asks a registry), no
    host MPI (its facts come from a PATH search and a library closure no key holds).
    Enforcing sites never get here (root's container). The start phase decides the rest
    (`per_step`, `runtime.execcmd.host_key`)."""
    return (
        want.name is None
        and want.save is None
        and not is_remote(want.image)
        and want.host_mpi == "none"
    )


def _per_step(name: str, values: Sequence[str]) -> bool:
    return any(name == v[:-1] if v.endswith("=") else name.startswith(v) for v in values)


def per_step(facts: JobFacts) -> JobFacts:
    """`facts` with every value the shim's tickets key by name only changed: the job's and
    a real step's ids, slurmstepd's pid, and the variables `step_values` names. A step
    whose plan and replies are the same for both read none of them, so a ticket keyed
    without them gives a later step what the helper would."""

    def changed(env: Mapping[str, str]) -> dict[str, str]:
        return {k: f"{v}1" if _per_step(k, facts.step_values) else v for k, v in env.items()}

    step = facts.step_id if facts.step_id in SPECIAL_STEPS else facts.step_id ^ 1
    return dataclasses.replace(
        facts,
        job_id=facts.job_id + 1,
        step_id=step,
        stepd_pid=facts.stepd_pid + 1,
        env=changed(facts.env),
        stepd_env=changed(facts.stepd_env),
    )


def named_dir(facts: JobFacts, want: Asked) -> str:
    """The named container's --writable-overlay dir: BASE/SLURMD/JOB/UID/NAME, or
    BASE/SLURMD/global/UID/NAME."""
    assert want.name is not None
    base = stepd_jobs_dir(facts)
    where = "global" if want.scope == "global" else str(facts.job_id)
    return posixpath.join(base, where, str(facts.uid), want.name)


@record
class Named:
    """What the check phase decides for a named container, from what it found."""

    image: str  # the image to open: the one it runs (its record), else the asked one
    image_from: str
    warning: Optional[str]  # said once on srun's stderr


def plan_named(want: Asked, recorded: Optional[str], asked_real: Optional[str]) -> Named:
    """The modes (Pyxis's): `recorded` is the image the job's container NAME keeps
    changes to on this node (its overlay record), None when there is none yet;
    `asked_real` the real path of --container-image (None: none, or a remote one, which
    is not pulled again to be compared).

    auto: create it from --container-image, else use it; create: it must not exist;
    exec: it must exist; no_exec: create it or use it, and run the tasks on the host.
    An existing one keeps its image: another --container-image is ignored, with a warning.
    """
    assert want.name is not None
    named = f"--container-name {want.name}"
    who, whose = ("you have", "your") if want.scope == "global" else ("this job has", "this job's")
    if recorded is None:
        if want.name_mode == "exec":
            raise UserError(
                f"{named}:exec: {who} no container {want.name} on this node: "
                "create it first (without :exec, with --container-image)"
            )
        if not want.image:
            raise UserError(
                f"{named}: {who} no container {want.name} on this node yet: give "
                "--container-image IMG to create it"
            )
        return Named(want.image, want.image_from, None)
    if want.name_mode == "create":
        raise UserError(
            f"{named}:create: {whose} container {want.name} exists already on this node: "
            "drop :create to use it, or choose another name"
        )
    warning = None
    if asked_real is not None and asked_real != recorded:
        warning = (
            f"container {want.name} runs {recorded}; {want.image_from} {want.image} is "
            "ignored (another name makes a new container)"
        )
    return Named(recorded, "the container's record", warning)


# What a pull as the job user takes from the job's environment: registry credentials and
# the pull's timeout (see runtime/registry.py). Nothing else: the child's environment is
# ours, not the job's.
PULL_ENV_KEEP = (
    "RANKWIRE_DOCKER_USERNAME",
    "RANKWIRE_DOCKER_PASSWORD",
    "DOCKER_CONFIG",
    "RANKWIRE_PULL_TIMEOUT",
)


@record
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


def exec_options(
    want: Asked, mounts: Sequence[Mount], facts: Optional[JobFacts] = None
) -> ExecOptions:
    """What the checked request means for the planners (`mounts`: the checked ones). A
    named container keeps its changes in its per-job dir (`named_dir`). --container-save
    is the first node's (node 0): every node saving to one PATH would each unpack and
    pack the image and the last rename would win."""
    return ExecOptions(
        binds=tuple(mounts),
        writable_tmpfs=want.writable,
        fakeroot=want.remap_root,
        fabric=want.fabric,
        host_mpi=want.host_mpi,
        no_home=want.no_home,
        pmi_bridge=want.pmi_bridge,
        writable_overlay=named_dir(facts, want) if want.name and facts else None,
        save=want.save if facts is None or facts.node_id == 0 else None,
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


@record
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
