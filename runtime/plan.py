"""The container plan: a pure function from (image facts, host facts, options) to what to do.

`plan_container` decides the container (image driver, uid maps, mounts in order, overlay);
`plan_process` decides one process inside it (argv, env, workdir). The executor
(`runtime/holder.py`, `runtime/instance.py`) applies these and decides nothing; later layers
(PMI, fabric, SPANK) only add mounts and env to plans.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional

from rankwire.errors import UserError
from rankwire.record import record
from rankwire.runtime.options import option
from rankwire.runtime.slurmfacts import SlurmStep

if TYPE_CHECKING:  # annotations only: joining an instance reads no host facts
    from rankwire.runtime.hostfacts import HostFacts

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Host variables that never cross into the container: their values are host paths.
OMIT_ENV = frozenset({"PATH", "LD_LIBRARY_PATH", "PYTHONHOME", "PYTHONPATH", "VIRTUAL_ENV"})
# Kept under --cleanenv: without them a launcher's PMI wire-up or Slurm step breaks.
WIREUP_PREFIXES = ("PMI_", "PMIX_", "SLURM_")
ENV_PREFIXES = ("APPTAINERENV_", "RANKWIRE_ENV_")
PMIX_TRANSLATIONS = (
    ("PMIX_PTL_MODULE", "PMIX_MCA_ptl"),
    ("PMIX_SECURITY_MODE", "PMIX_MCA_psec"),
    ("PMIX_GDS_MODULE", "PMIX_MCA_gds"),
)
# Host files bound by default when they exist (like Apptainer's defaults).
DEFAULT_FILE_BINDS = ("/etc/hosts", "/etc/localtime")
MINIMAL_DEV = ("null", "zero", "full", "random", "urandom", "tty")
# The kernel's trees every container gets; a bind may not hide them (`hidden_by`).
KERNEL_DIRS = ("/proc", "/sys", "/dev")
# Names of shared containers and instances (socket file names).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@record
class Mount:
    """One mount inside the container, applied in plan order.

    kind: "bind" (src -> dst; `recursive` for rbind), "tmpfs", "devtmpfs" (a minimal
    /dev made of binds of the host device nodes listed in `options`), "proc" (the /proc
    of the container's PID namespace; the host's /proc when it has none).
    """

    kind: str
    target: str
    source: str = ""
    readonly: bool = False
    recursive: bool = False
    options: str = ""

    def spec(self) -> str:
        """A bind as -B takes it."""
        return f"{self.source}:{self.target}:{'ro' if self.readonly else 'rw'}"


@record
class ContainerPlan:
    image: str
    partition_offset: int
    partition_size: int
    # Ways to open the image, in order of preference; the executor takes the first that
    # works and reports which. "extract" unpacks with unsquashfs into `extract_dir`
    # ("" when the facts did not read the content digest: FUSE came first, so the
    # holder reads it only if it falls back; `cache_dir` says where).
    image_drivers: tuple[str, ...]
    overlay_drivers: tuple[str, ...]
    writable: bool
    uid_map: tuple[int, int, int]  # inside, outside, count
    gid_map: tuple[int, int, int]
    namespaces: tuple[str, ...]
    mounts: tuple[Mount, ...]
    tmpfs_size_mib: int
    extract_dir: str
    cache_dir: str
    share: Optional[str] = None  # join/start the node's container of this name
    # --writable-overlay: the overlay's upper and work dirs live in this host dir (its
    # lock and the image identity it records are checked by the holder), not in a tmpfs.
    overlay_dir: str = ""
    image_identity: str = ""  # the image's `digest`, recorded in / checked against it
    save: str = ""  # --save: the SIF to pack the container into after the command
    # (offset, length, path): what the holder reads ahead from a FUSE-mounted image for
    # the command (the launcher's warm list of it: `runtime/warm.py`).
    prefetch: tuple[tuple[int, int, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ContainerPlan:
        fields = dict(d)
        fields["mounts"] = tuple(Mount(**m) for m in d["mounts"])
        fields["prefetch"] = tuple((int(o), int(n), str(p)) for o, n, p in d.get("prefetch", ()))
        for key in ("image_drivers", "overlay_drivers", "uid_map", "gid_map", "namespaces"):
            fields[key] = tuple(d[key])
        return cls(**fields)


@record
class ProcessPlan:
    argv: tuple[str, ...]
    env: dict[str, str]
    workdir: str
    no_new_privs: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@record
class ImageFacts:
    """What the planner needs to know of an image (read once by `image_facts`)."""

    path: str
    partition_offset: int
    partition_size: int
    # The metadata identity (header, descriptors, squashfs superblock and tables): keys
    # what depends on names and modes only (the MPI kind); not file data.
    digest: str
    env: dict[str, str]
    has_runscript: bool
    # sha256 of the partition's bytes (`imagefacts.partition_digest`): keys what holds
    # file data (the extract cache). None when not read (root planning for a job user).
    content_digest: Optional[str] = None
    # The OCI config's Entrypoint of an image pulled from a registry (its `oci-config.json`
    # object, where Apptainer keeps it too): () when the config has none, None when the
    # image has no OCI config (built, not pulled).
    entrypoint: Optional[tuple[str, ...]] = None


@record
class ExecOptions:
    """The container and process options (declared in `runtime/options.py`)."""

    binds: tuple[Mount, ...] = ()
    env: tuple[str, ...] = ()  # K=V
    env_file: Optional[str] = None  # its path (passed on to srun)
    env_file_vars: tuple[str, ...] = ()  # its K=V lines, read by the command line
    export: tuple[str, ...] = ()  # -x: VAR (its host value, when set) or VAR=VALUE
    cleanenv: bool = False
    contain: bool = False
    containall: bool = False  # contain + cleanenv
    no_home: bool = False
    fakeroot: bool = False
    writable_tmpfs: bool = False
    writable_overlay: Optional[str] = None  # DIR (as given; relative to the cwd)
    save: Optional[str] = None  # OUT.sif (as given; relative to the cwd)
    unsquash: bool = False
    share: Optional[str] = None  # KEY: %j/%s stand for SLURM_JOB_ID/SLURM_STEP_ID
    fabric: str = "auto"  # auto | none | a libfabric provider
    host_mpi: Optional[str] = None  # auto | PREFIX | none; None: RANKWIRE_HOST_MPI or none
    pmi_bridge: Optional[str] = None  # auto | off; None: RANKWIRE_PMI_BRIDGE or auto
    workdir: Optional[str] = None
    entrypoint: bool = False  # --entrypoint: the image's OCI ENTRYPOINT runs the command
    tmpfs_size_mib: int = 64
    bind_cwd: bool = True  # the plugin binds the cwd only when the tasks start there


def host_mpi_choice(opts: ExecOptions, environ: Mapping[str, str]) -> str:
    """--host-mpi, else RANKWIRE_HOST_MPI (a site's module file may set it), else none."""
    return (opts.host_mpi or environ.get("RANKWIRE_HOST_MPI") or "none").strip() or "none"


def cache_dir(environ: Mapping[str, str], home: str) -> str:
    """The user's rankwire cache (images, extracted images, digests): RANKWIRE_CACHEDIR
    (e.g. a node-local /tmp), else $XDG_CACHE_HOME/rankwire, else ~/.cache/rankwire."""
    if environ.get("RANKWIRE_CACHEDIR"):
        return environ["RANKWIRE_CACHEDIR"]
    return posixpath.join(environ.get("XDG_CACHE_HOME") or f"{home}/.cache", "rankwire")


@record
class UserFacts:
    """The invoking user and where they stand (read once by `runtime/userfacts.py`)."""

    uid: int
    gid: int
    home: str
    cwd: str
    environ: dict[str, str]
    cache_dir: str
    slurm: Optional[SlurmStep] = None


def within(path: str, parent: str) -> bool:
    """`path` is `parent` or below it (both normalized, absolute)."""
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def check_name(name: str, what: str) -> str:
    """The one rule for names of shared containers and instances."""
    if not NAME_RE.match(name):
        raise UserError(f"{what}: use letters, digits, '.', '_', '-' (at most 64)")
    return name


def parse_bind(spec: str, named: str = "-B") -> Mount:
    """`SRC[:DST[:FLAGS]]`, FLAGS `ro` or `rw` (Pyxis also joins flags with `+`), for -B
    and --container-mounts alike. A relative SRC is the working directory's (resolved by
    the planner); DST defaults to SRC."""
    parts = spec.split(":")
    if not spec or len(parts) > 3 or not parts[0]:
        raise UserError(f"bad {named} '{spec}': use SRC[:DST[:ro|rw]]")
    src = parts[0]
    dst = parts[1] if len(parts) > 1 and parts[1] else ""
    flags = parts[2].split("+") if len(parts) > 2 else []
    bad = [f for f in flags if f not in ("ro", "rw")]
    if bad:
        raise UserError(f"bad {named} '{spec}': unknown flag '{bad[0]}' (ro or rw)")
    if dst and not dst.startswith("/"):
        raise UserError(f"bad {named} '{spec}': DST must be absolute")
    return Mount(
        "bind",
        target=posixpath.normpath(dst) if dst else "",
        source=src,
        readonly="ro" in flags,
        recursive=True,
    )


def parse_binds(specs: Sequence[str], named: str = "-B") -> tuple[Mount, ...]:
    """Each value may hold a comma-separated list."""
    return tuple(
        parse_bind(s.strip(), named) for spec in specs for s in spec.split(",") if s.strip()
    )


def hidden_by(source: str, target: str) -> Optional[str]:
    """What a bind of `source` on `target` would hide that the container needs: the
    image root, or the kernel's /proc, /sys, /dev (or something inside them). A host path
    bound at its own place there hides nothing (`-B /dev/infiniband`, as Apptainer
    allows), nor does a bind on /dev/shm (a bigger or private shared-memory dir)."""
    if target == "/":
        return "the whole image"
    top = next((t for t in KERNEL_DIRS if within(target, t)), None)
    if top is None or source == target or within(target, "/dev/shm"):
        return None
    return f"the container's {top}"


def resolve_bind(m: Mount, cwd: str, named: str = "-B") -> Mount:
    """A relative source is the working directory's; no DST: the same path inside.
    Refuses a bind that would hide what the container needs (see `hidden_by`)."""
    source = posixpath.normpath(posixpath.join(cwd, m.source))
    target = m.target or source
    hidden = hidden_by(source, target)
    if hidden is not None:
        raise UserError(
            f"bad {named} '{source}:{target}': it would hide {hidden}; "
            "bind it elsewhere (a DST outside /proc, /sys and /dev, and not /)"
        )
    return dataclasses.replace(m, source=source, target=target)


def user_binds(user: UserFacts, opts: ExecOptions) -> tuple[Mount, ...]:
    """RANKWIRE_BIND / APPTAINER_BINDPATH, then -B, resolved against the cwd."""
    from_env = [user.environ[v] for v in option("binds").env if user.environ.get(v)]
    return tuple(resolve_bind(m, user.cwd) for m in (*parse_binds(from_env), *opts.binds))


def paths_to_probe(user: UserFacts, opts: ExecOptions) -> tuple[str, ...]:
    """The host paths whose existence `plan_container` asks about (facts gather them)."""
    step = user.slurm
    pmix = (step.pmix_server_dir, step.pmix_app_dir) if step else ()
    return (
        *DEFAULT_FILE_BINDS,
        user.home,
        *(m.source for m in user_binds(user, opts)),
        *(d for d in pmix if d),
    )


def _drivers(host: HostFacts, opts: ExecOptions) -> tuple[list[str], list[str]]:
    fuse = host.dev_fuse_usable and not opts.unsquash
    drivers = [d for d in ("squashfuse_ll", "squashfuse") if fuse and host.tool(d)]
    if host.tool("unsquashfs"):
        drivers.append("extract")
    if not drivers:
        raise UserError(
            "cannot open SIF images: no usable squashfuse or unsquashfs; "
            "install them with `apt-get install squashfuse squashfs-tools`"
        )
    if not host.userns_allowed:
        raise UserError(
            "unprivileged user namespaces are disabled on this host; ask the admin to set "
            "`sysctl user.max_user_namespaces=15000`"
        )
    overlays = ["kernel"]
    if host.dev_fuse_usable and host.tool("fuse-overlayfs"):
        overlays.append("fuse-overlayfs")
    return drivers, overlays


def _base_mounts(user: UserFacts, opts: ExecOptions, existing: frozenset[str]) -> list[Mount]:
    mounts: list[Mount] = [
        Mount("proc", "/proc"),
        Mount("bind", "/sys", "/sys", recursive=True),
    ]
    if opts.contain or opts.containall:
        return [
            *mounts,
            Mount("devtmpfs", "/dev", options=",".join(MINIMAL_DEV)),
            Mount("tmpfs", "/tmp", options="mode=1777"),
            Mount("tmpfs", "/var/tmp", options="mode=1777"),
            Mount("tmpfs", user.home, options="mode=0700"),
        ]
    mounts += [Mount("bind", "/dev", "/dev", recursive=True)]
    mounts += [Mount("bind", p, p) for p in DEFAULT_FILE_BINDS if p in existing]
    # Recursive: a non-recursive bind of a tree with (locked) submounts fails in a
    # user namespace.
    mounts += [
        Mount("bind", "/tmp", "/tmp", recursive=True),
        Mount("bind", "/var/tmp", "/var/tmp", recursive=True),
    ]
    if user.home in existing and not opts.no_home:
        mounts.append(Mount("bind", user.home, user.home, recursive=True))
    covered = [m.target for m in mounts if m.kind == "bind" and m.target != "/"]
    outside = not any(within(user.cwd, t) for t in covered if t not in KERNEL_DIRS)
    if opts.bind_cwd and outside:
        mounts.append(Mount("bind", user.cwd, user.cwd, recursive=True))
    return mounts


def plan_container(
    image: ImageFacts,
    host: HostFacts,
    user: UserFacts,
    opts: ExecOptions,
    existing: frozenset[str],
    fabric_mounts: Sequence[Mount] = (),
) -> ContainerPlan:
    """The container to build. `existing` holds those of `paths_to_probe` that exist
    (the planner's only view of the filesystem); `fabric_mounts` (the fabric plan's host
    libraries and devices) come last."""
    drivers, overlays = _drivers(host, opts)
    mounts = _base_mounts(user, opts, existing)
    for m in user_binds(user, opts):
        if m.source not in existing:
            raise UserError(f"bind source '{m.source}' does not exist: create it or fix -B")
        mounts.append(m)
    # srun --mpi=pmix: Slurm's PMIx server dirs at the same path (its shared-memory
    # dstore and rendezvous files), as enroot's hook does.
    step = user.slurm
    for d in (step.pmix_server_dir, step.pmix_app_dir) if step else ():
        bound = [m.target for m in mounts if m.kind == "bind" and m.target != "/"]
        if d and d in existing and not any(within(d, t) for t in bound):
            mounts.append(Mount("bind", d, d))
    # The fabric's device nodes and /dev/shm are in the host's /dev where the last mount on
    # /dev binds it whole (not under --contain, nor under a user's plain `-B /dev`, which
    # leaves /dev/shm out): binding them again below it is only a mount the holder's
    # recipe cannot repeat (its target resolved through another mount).
    on_dev = [m for m in mounts if m.target == "/dev"]
    host_dev = on_dev[-1:] == [Mount("bind", "/dev", "/dev", recursive=True)]
    mounts += [m for m in fabric_mounts if not (host_dev and within(m.target, "/dev"))]
    inside = 0 if opts.fakeroot else user.uid
    inside_gid = 0 if opts.fakeroot else user.gid
    plan = ContainerPlan(
        image=posixpath.normpath(posixpath.join(user.cwd, image.path)),
        partition_offset=image.partition_offset,
        partition_size=image.partition_size,
        image_drivers=tuple(drivers),
        overlay_drivers=tuple(overlays),
        writable=opts.writable_tmpfs,
        uid_map=(inside, user.uid, 1),
        gid_map=(inside_gid, user.gid, 1),
        # "pid": the container owns its processes (they all end with it).
        namespaces=("user", "mount", "pid"),
        mounts=tuple(mounts),
        tmpfs_size_mib=opts.tmpfs_size_mib,
        extract_dir=sandbox_dir(user.cache_dir, image.content_digest),
        cache_dir=user.cache_dir,
    )
    plan = _kept_changes(plan, image, user, opts)
    plan = dataclasses.replace(plan, share=_share(opts.share, plan, user))
    if plan.save and plan.share:
        raise UserError(
            "--save packs the container of one command, and this one is shared by "
            "several tasks (--share, or srun with several tasks): give --share none"
        )
    return plan


def _kept_changes(
    plan: ContainerPlan, image: ImageFacts, user: UserFacts, opts: ExecOptions
) -> ContainerPlan:
    """--writable-overlay DIR and --save OUT.sif: where the changes live, where they go.
    Either makes the root writable."""
    overlay_dir = save = ""
    if opts.writable_overlay is not None:
        if not opts.writable_overlay.strip():
            raise UserError("--writable-overlay needs a directory: --writable-overlay DIR")
        overlay_dir = posixpath.normpath(posixpath.join(user.cwd, opts.writable_overlay))
        if overlay_dir == "/":
            raise UserError("--writable-overlay /: give a directory of its own")
        if any(c in overlay_dir for c in ",:\\"):  # the overlay's option syntax
            raise UserError(
                f"--writable-overlay {overlay_dir}: the overlay cannot use a path holding "
                "',', ':' or '\\'; choose another directory"
            )
    if opts.save is not None:
        if not opts.save.strip() or opts.save.endswith("/"):
            raise UserError(f"--save '{opts.save}': give the path of the .sif file to write")
        save = posixpath.normpath(posixpath.join(user.cwd, opts.save))
        if overlay_dir and within(save, overlay_dir):
            raise UserError(
                f"--save {save} lies inside --writable-overlay {overlay_dir}: "
                "write the image elsewhere"
            )
    if not overlay_dir and not save:
        return plan
    return dataclasses.replace(
        plan,
        writable=True,
        overlay_dir=overlay_dir,
        image_identity=image.digest if overlay_dir else "",
        save=save,
    )


def extracts_first(host: HostFacts, opts: ExecOptions) -> bool:
    """Whether "extract" is the first way to open the image (then the facts read its
    content digest, which names the extract cache; otherwise nobody pays for it)."""
    return (
        opts.unsquash
        or not host.dev_fuse_usable
        or not any(host.tool(d) for d in ("squashfuse_ll", "squashfuse"))
    )


def sandbox_dir(cache_dir: str, content_digest: Optional[str]) -> str:
    """Where "extract" unpacks the image: keyed on the partition's content, so two images
    whose metadata agree (same sizes and times) never share it. "" without a digest."""
    if content_digest is None:
        return ""
    key = content_digest.split(":", 1)[-1][:32]
    return posixpath.join(cache_dir, "sandbox", key)


def _share(option: Optional[str], plan: ContainerPlan, user: UserFacts) -> Optional[str]:
    """Which node-wide container to join. Under srun every task of a step joins one by
    default; the key holds the plan's hash, so tasks with another image or other binds
    never end up in the wrong container. `--share none` opts out."""
    if option == "none":
        return None
    if option:
        return share_key(option, user.environ)
    step = user.slurm
    if step is None or step.ntasks < 2:
        return None
    import hashlib

    digest = hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest()
    return f"slurm-{step.job_id}.{step.step_id}-{digest[:12]}"


def share_key(pattern: str, environ: Mapping[str, str]) -> str:
    """Expand `%j`/`%s` (SLURM_JOB_ID / SLURM_STEP_ID) in a --share KEY."""
    key = pattern
    for token, var in (("%j", "SLURM_JOB_ID"), ("%s", "SLURM_STEP_ID")):
        if token in key:
            if not environ.get(var):
                raise UserError(
                    f"--share {pattern} uses {token} but {var} is not set: "
                    "run it under srun, or give a literal key"
                )
            key = key.replace(token, environ[var])
    return check_name(key, f"--share {pattern}")


def plan_env(
    image: ImageFacts,
    user: UserFacts,
    opts: ExecOptions,
    fabric_env: Mapping[str, str] = {},
) -> dict[str, str]:
    """Host env (minus host paths) < image %environment < fabric plan <
    APPTAINERENV_/RANKWIRE_ENV_ < --env-file < -x < --env."""
    host = user.environ
    if opts.cleanenv or opts.containall:
        keep = {k: v for k, v in host.items() if k.startswith(WIREUP_PREFIXES)}
        keep.update({k: host[k] for k in ("TERM", "LANG") if k in host})
    else:
        keep = {k: v for k, v in host.items() if k not in OMIT_ENV}
    env = {k: v for k, v in keep.items() if not k.startswith(ENV_PREFIXES)}
    env["PATH"] = DEFAULT_PATH
    env["HOME"] = user.home
    # Slurm's PMIx server announces its choices as PMIX_*_MODULE/MODE; a PMIx client in
    # the container reads them as PMIX_MCA_* (what enroot's hook translates too).
    for source, target in PMIX_TRANSLATIONS:
        if source in env and target not in env:
            env[target] = env[source]
    env.update(image.env)
    env.update(fabric_env)
    for prefix in ENV_PREFIXES:
        for k, v in host.items():
            if k.startswith(prefix) and len(k) > len(prefix):
                env[k[len(prefix) :]] = v
    env.update(dict(i.partition("=")[::2] for i in opts.env_file_vars))
    for item in opts.export:
        from rankwire.runtime.imagemeta import ENV_NAME

        key, sep, value = item.partition("=")
        if not ENV_NAME.match(key):
            raise UserError(f"bad -x '{item}': give a variable name, -x VAR or -x VAR=VALUE")
        if sep or key in host:
            env[key] = value if sep else host[key]
    for item in opts.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"bad --env '{item}': use --env KEY=VALUE")
        env[key] = value
    env["RANKWIRE_CONTAINER"] = image.path
    return env


def plan_process(
    image: ImageFacts,
    user: UserFacts,
    opts: ExecOptions,
    argv: Sequence[str],
    fabric_env: Mapping[str, str] = {},
) -> ProcessPlan:
    if not argv:
        raise UserError("no command given: rankwire exec IMAGE COMMAND [ARGS...]")
    if opts.entrypoint and argv[0] == RUNSCRIPT:
        raise UserError(
            f"--entrypoint: {image.path}'s runscript already runs its ENTRYPOINT; drop --entrypoint"
        )
    workdir = opts.workdir or (user.home if opts.contain or opts.containall else user.cwd)
    env = plan_env(image, user, opts, fabric_env)
    words = entrypoint_words(image, opts.entrypoint, "--entrypoint")
    return ProcessPlan(argv=(*words, *argv), env=env, workdir=workdir)


def entrypoint_words(
    image: ImageFacts, on: bool, named: str, required: bool = True
) -> tuple[str, ...]:
    """The words that go before the command: the image's OCI ENTRYPOINT when `on` (as
    `docker run IMAGE COMMAND`: the command is its arguments, the image's CMD is not
    used). A config without one runs the command itself, as Docker and Pyxis do. An
    image without an OCI config (built, not pulled) has none to run: an error when the
    user asked (`named`), nothing when only a site default turned it on (`required`)."""
    if not on:
        return ()
    if image.entrypoint is None:
        if not required:
            return ()
        raise UserError(
            f"{image.path} has no entrypoint (not pulled from an OCI registry); drop {named}"
        )
    return tuple(image.entrypoint)


RUNSCRIPT = "/.singularity.d/runscript"


def runscript_argv(image: ImageFacts, args: Sequence[str]) -> list[str]:
    if not image.has_runscript:
        raise UserError(f"{image.path} has no runscript: use `rankwire exec IMAGE COMMAND`")
    return [RUNSCRIPT, *args]
