"""`rankwire doctor`'s verdicts: facts in, checks out (pure: no I/O).

`runtime/doctorhost.collect_doctor_host_facts` and `runtime/doctorfacts.gather_doctor`
read and try things once; `diagnose` turns what they found into one `Check` per question
(ok / warn / fail, the reason and the fix), which the CLI prints or dumps as JSON. A
failed probe is explained from the facts read beside it (the sysctls, the seccomp mode).
"""

from __future__ import annotations

import dataclasses
import errno
from typing import Any, Optional

from rankwire.errors import UserError
from rankwire.fabric.mpiplan import plan_host_mpi
from rankwire.fabric.plan import SONAME, check_abi, plan_fabric
from rankwire.pmi.bridgeplan import BRIDGED_FROM, slurm_wireup
from rankwire.record import record
from rankwire.runtime.doctorfacts import DoctorFacts, DoctorImageFacts
from rankwire.runtime.doctorhost import DirFacts, DoctorHostFacts

OK, WARN, FAIL = "ok", "warn", "fail"
MIN_CACHE_FREE = 1 << 30  # images, their extractions and pulls go there
MIN_RUNTIME_FREE = 16 << 20  # sockets and session mount points only
PMI_NAMES = {"pmi1/2": "PMI-1/PMI-2", "pmix": "PMIx", "both": "PMI-1/PMI-2 or PMIx"}
BRIDGE = "rankwire's PMI bridge, --pmi-bridge auto"
NO_BRIDGE = "rankwire's PMI bridge needs Slurm's pmi2 or pmix plugin"
PMI_NAMES_BY_PLUGIN = {"pmix": "PMIx", "pmi2": "PMI-2"}


@record
class Check:
    name: str
    verdict: str  # ok | warn | fail
    reason: str
    fix: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def diagnose(facts: DoctorFacts) -> list[Check]:
    """Every check, the host's first, then the image's (when there is one)."""
    checks = host_checks(facts.host)
    if facts.image is not None:
        checks += image_checks(facts.host, facts.image)
    return checks


def failed(checks: list[Check]) -> bool:
    return any(c.verdict == FAIL for c in checks)


def report_lines(facts: DoctorFacts, checks: list[Check]) -> list[str]:
    """The text report: a header, one line per check (a fix line under it), a summary."""
    h = facts.host.host
    lines = [f"kernel {h.kernel} ({h.machine}), uid {h.uid}"]
    if facts.image is not None:
        lines.append(f"image {facts.image.path} ({facts.image.arch})")
    for c in checks:
        lines.append(
            f"{c.verdict.upper() if c.verdict == FAIL else c.verdict:<5} {c.name:<13} {c.reason}"
        )
        if c.fix:
            lines.append(f"{'':<19} fix: {c.fix}")
    counts = {v: sum(c.verdict == v for c in checks) for v in (OK, WARN, FAIL)}
    lines.append(", ".join(f"{n} {v}" for v, n in counts.items()))
    return lines


# -- host ---------------------------------------------------------------------------------
def host_checks(h: DoctorHostFacts) -> list[Check]:
    checks = [userns_check(h), overlay_check(h), fuse_check(h), libpmix_check(h)]
    checks.append(slurm_check(h))
    if h.slurm.version or h.slurm.spank_plugin:
        checks.append(spank_check(h))
    checks.append(dir_check("cache-dir", h.cache_dir, MIN_CACHE_FREE, CACHE_FIX))
    checks.append(dir_check("runtime-dir", h.runtime_dir, MIN_RUNTIME_FREE, RUNTIME_FIX))
    return checks


_STEPS = {
    "unshare": "unshare(CLONE_NEWUSER) failed",
    "uid_map": "mapping uid {uid} in a new user namespace failed",
    "tmpfs": "mounting a tmpfs in a new user namespace failed",
}
_USERNS_FIX = "ask the admin to allow unprivileged user namespaces"


def userns_check(h: DoctorHostFacts) -> Check:
    probe = h.namespaces
    if probe.failed not in _STEPS:
        return Check(
            "userns", OK, f"unshare(CLONE_NEWUSER) works: uid {h.host.uid} mapped, mounts allowed"
        )
    what = _STEPS[probe.failed].format(uid=h.host.uid)
    code = errno.errorcode.get(probe.errno, "")
    denied = probe.errno in (errno.EPERM, errno.EACCES)
    limit = h.host.max_user_namespaces
    if probe.errno == errno.ENOSPC:
        if limit == 0:
            return Check(
                "userns",
                FAIL,
                f"{what} (ENOSPC): user.max_user_namespaces is 0",
                "ask the admin for `sysctl user.max_user_namespaces=15000`",
            )
        return Check(
            "userns",
            FAIL,
            f"{what} (ENOSPC): the user.max_user_namespaces limit ({limit}) is reached",
            "end the processes holding user namespaces, or ask the admin to raise "
            "`user.max_user_namespaces`",
        )
    if (
        denied
        and probe.failed == "unshare"
        and h.host.unprivileged_userns_clone == 0
        and h.host.uid != 0
    ):
        return Check(
            "userns",
            FAIL,
            f"{what} ({code}): kernel.unprivileged_userns_clone is 0",
            "ask the admin for `sysctl kernel.unprivileged_userns_clone=1`",
        )
    if denied and h.apparmor_restrict_userns == 1:
        return Check(
            "userns",
            FAIL,
            f"{what} ({code}): AppArmor restricts unprivileged user "
            "namespaces (kernel.apparmor_restrict_unprivileged_userns is 1)",
            "ask the admin for `sysctl kernel.apparmor_restrict_unprivileged_userns=0` "
            "or an AppArmor profile with `userns,` for rankwire's python",
        )
    if denied and h.seccomp == 2:
        return Check(
            "userns",
            FAIL,
            f"{what} ({code}): a seccomp filter denies it (this "
            "process runs under one: inside a container?)",
            "run rankwire on the host, or allow unshare and mount in the container's "
            "seccomp profile",
        )
    if probe.errno in (errno.EINVAL, errno.ENOSYS) and probe.failed == "unshare":
        return Check(
            "userns",
            FAIL,
            f"{what} ({code}): this kernel has no user namespaces",
            "use a kernel built with CONFIG_USER_NS",
        )
    return Check("userns", FAIL, f"{what}: {probe.detail or code or 'no answer'}", _USERNS_FIX)


def overlay_check(h: DoctorHostFacts) -> Check:
    probe = h.namespaces
    if probe.failed in _STEPS:
        return Check("overlay", FAIL, "not tried: no user namespace (see userns)")
    if not probe.failed:
        return Check(
            "overlay", OK, "a kernel overlay of two tmpfs mounts works in a user namespace"
        )
    why = f"a kernel overlay in a user namespace failed: {probe.detail or 'no answer'}"
    if h.fuse.open_errno == 0 and h.host.tool("fuse-overlayfs"):
        return Check(
            "overlay",
            WARN,
            f"{why}; fuse-overlayfs is used instead (slower)",
            "a kernel >= 5.11 mounts overlays in user namespaces",
        )
    return Check(
        "overlay",
        FAIL,
        f"{why}, and fuse-overlayfs cannot stand in (not installed, or /dev/fuse unusable)",
        "use a kernel >= 5.11, or install fuse-overlayfs with a usable /dev/fuse",
    )


def fuse_check(h: DoctorHostFacts) -> Check:
    fuse, uid = h.fuse, h.host.uid
    if fuse.mode is None:
        problem = "there is no /dev/fuse (the fuse module is not loaded?)"
        fix = "ask the admin for `modprobe fuse`, or run with --unsquash"
    elif fuse.open_errno in (errno.EACCES, errno.EPERM):
        problem = f"/dev/fuse is mode {fuse.mode:04o}: uid {uid} cannot open it"
        fix = "ask the admin for `chmod 0666 /dev/fuse`, or run with --unsquash"
    elif fuse.open_errno:
        problem = f"/dev/fuse cannot be opened ({errno.errorcode.get(fuse.open_errno, '?')})"
        fix = "ask the admin to check the fuse module, or run with --unsquash"
    elif fuse.squashfuse is None:
        problem = "squashfuse is not installed"
        fix = "install it (`apt-get install squashfuse`), or run with --unsquash"
    else:
        return Check(
            "fuse", OK, f"/dev/fuse opens read-write and {fuse.squashfuse} mounts images in place"
        )
    if h.host.tool("unsquashfs"):
        return Check(
            "fuse",
            WARN,
            f"{problem}: images are extracted with unsquashfs before "
            "they start (slower first start, disk in the cache)",
            fix,
        )
    return Check(
        "fuse",
        FAIL,
        f"{problem}, and there is no unsquashfs: no way to open images",
        "apt-get install squashfuse squashfs-tools",
    )


def libpmix_check(h: DoctorHostFacts) -> Check:
    lib = h.libpmix
    if lib.version:
        return Check("libpmix", OK, f"{lib.version} ({lib.library})")
    cause, fix = cause_and_fix(lib.error)
    return Check(
        "libpmix", WARN, f"{cause}: `rankwire run` cannot serve PMIx (Open MPI images)", fix
    )


def slurm_check(h: DoctorHostFacts) -> Check:
    s = h.slurm
    if not s.srun:
        return Check("slurm", OK, "no srun on this host: `rankwire run` launches on this node")
    if not s.version:
        return Check(
            "slurm",
            WARN,
            f"srun does not work here: {s.error}",
            "set SLURM_CONF to the cluster's slurm.conf, or run where Slurm is configured",
        )
    offered = ", ".join(s.mpi_plugins) or "nothing"
    return Check(
        "slurm",
        OK,
        f"{s.version}; srun --mpi offers {offered}; MpiDefault={s.mpi_default or 'unknown'}",
    )


def spank_check(h: DoctorHostFacts) -> Check:
    s = h.slurm
    if not s.spank_plugin:
        return Check(
            "spank-plugin",
            OK,
            f"the plugstack ({s.plugstack or 'none'}) does not load "
            "rankwire's plugin: `srun … rankwire exec IMAGE` works, --container-image "
            "needs the plugin (`make -C spank install`)",
        )
    if s.spank_plugin_exists is False:
        return Check(
            "spank-plugin",
            FAIL,
            f"{s.spank_listed_in} loads {s.spank_plugin}, which does not exist",
            "reinstall it (`make -C spank install`) or remove the line",
        )
    if s.spank_error:
        return Check(
            "spank-plugin",
            FAIL,
            f"{s.spank_listed_in} loads {s.spank_plugin}, which srun cannot load ({s.spank_error})",
            "rebuild and reinstall it against this Slurm (`make -C spank install`)",
        )
    return Check(
        "spank-plugin", OK, f"{s.spank_listed_in} loads {s.spank_plugin}: --container-image works"
    )


CACHE_FIX = "set RANKWIRE_CACHEDIR to a writable directory with room (e.g. node-local /tmp)"
RUNTIME_FIX = "set XDG_RUNTIME_DIR or TMPDIR to a writable directory"


def dir_check(name: str, d: DirFacts, minimum: int, fix: str) -> Check:
    if d.error:
        where = f"{d.path} is not writable: " if d.path else ""
        return Check(name, FAIL, f"{where}{d.error}", fix)
    free = "unknown" if d.free_bytes is None else human_bytes(d.free_bytes)
    if d.free_bytes is not None and d.free_bytes < minimum:
        return Check(name, WARN, f"{d.path}: writable, only {free} free", fix)
    return Check(name, OK, f"{d.path}: writable, {free} free")


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


# -- image --------------------------------------------------------------------------------
def image_checks(h: DoctorHostFacts, i: DoctorImageFacts) -> list[Check]:
    checks = [arch_check(h, i), mpi_check(i), pmi_check(h, i)]
    checks += fabric_checks(h, i)
    checks.append(host_mpi_check(h, i))
    checks.append(accounts_check(h, i))
    return checks


def host_mpi_check(h: DoctorHostFacts, i: DoctorImageFacts) -> Check:
    """What `--host-mpi` (RANKWIRE_HOST_MPI, else auto) would bind for this image."""
    named = f"--host-mpi {i.host_mpi_choice}"
    if i.arch != h.goarch:
        return Check("host-mpi", WARN, f"not checked: the image is for {i.arch}")
    if i.host_mpi_error:
        cause, fix = cause_and_fix(i.host_mpi_error)
        return Check("host-mpi", WARN, cause, fix)
    try:
        fabric = plan_fabric(i.fabric_host, i.fabric_image, "auto")
    except UserError:
        fabric = plan_fabric(i.fabric_host, i.fabric_image, "none")
    try:
        plan = plan_host_mpi(
            i.host_mpi, i.fabric_image, fabric, i.fabric_host.libfabric, i.host_mpi_choice
        )
    except UserError as err:
        cause, fix = cause_and_fix(str(err))
        return Check("host-mpi", WARN, f"{named}: {cause}", fix)
    if not plan.replaced:
        return Check("host-mpi", OK, f"{named} binds nothing: {plan.reason}")
    return Check("host-mpi", OK, f"{named} would run the image's MPI program on the {plan.reason}")


def arch_check(h: DoctorHostFacts, i: DoctorImageFacts) -> Check:
    if i.arch == h.goarch:
        return Check("image-arch", OK, f"the image is {i.arch}, as this host")
    if i.arch == "unknown":
        return Check(
            "image-arch",
            WARN,
            "the image records no architecture we know",
            f"check that it was built for {h.goarch}",
        )
    return Check(
        "image-arch",
        FAIL,
        f"the image is for {i.arch} and this host is {h.goarch}",
        f"use an {h.goarch} image (`rankwire pull --arch {h.goarch} …`, or build it on "
        f"an {h.goarch} host)",
    )


def mpi_name(i: DoctorImageFacts) -> str:
    """ "MPICH 4.0.2", "MPICH 4.0.2 and Open MPI 4.1.4", "" when the image has none."""
    return " and ".join(f"{m.family} {m.version}".strip() for m in i.mpi)


def mpi_check(i: DoctorImageFacts) -> Check:
    if i.pmi is None:
        return Check(
            "image-mpi",
            OK,
            "no MPI library in the image (libmpi.so.40, "
            "libmpich.so.12, libmpi.so.12): nothing to wire up",
        )
    where = ", ".join(m.path for m in i.mpi)
    name = mpi_name(i) or "an MPI"
    if i.pmi == "both":
        return Check(
            "image-mpi",
            OK,
            f"{name} ({where}): MPICH speaks PMI-1/PMI-2, Open MPI "
            "PMIx; each program's own libmpi decides",
        )
    return Check("image-mpi", OK, f"{name} ({where}) speaks {PMI_NAMES[i.pmi]}")


def pmi_check(h: DoctorHostFacts, i: DoctorImageFacts) -> Check:
    """Whether srun can wire up the image's MPI (plain `srun … rankwire exec`), directly or
    through rankwire's PMI bridge (`pmi/bridgeplan.py`: PMI-1/PMI-2 over a PMIx step)."""
    s = h.slurm
    if i.pmi is None:
        return Check("pmi", OK, "no MPI in the image: nothing for Slurm to wire up")
    pmi = PMI_NAMES[i.pmi]
    if not s.version:
        return Check("pmi", OK, f"no usable Slurm here: `rankwire run` serves {pmi} itself")
    w = slurm_wireup(s.mpi_plugins, s.mpi_default, i.pmi)
    name = mpi_name(i) or "MPI"
    if w.by_default == "direct":
        return Check("pmi", OK, f"srun's default --mpi={s.mpi_default} serves the image's {pmi}")
    if w.by_default == "bridged":
        step = PMI_NAMES_BY_PLUGIN[BRIDGED_FROM[i.pmi]]
        return Check(
            "pmi",
            OK,
            f"srun's default --mpi={s.mpi_default} serves {step} and the "
            f"image's {name} speaks {pmi}: `srun … rankwire exec` bridges them ({BRIDGE})",
        )
    if w.direct or w.bridged:
        fix = (
            f"run `srun --mpi={w.direct[0]} …`"
            if w.direct
            else f"run `srun --mpi={w.bridged} … rankwire exec …` ({BRIDGE})"
        )
        return Check(
            "pmi",
            WARN,
            f"srun's default --mpi={s.mpi_default or '(unknown)'} does not "
            f"serve the image's {pmi}: plain `srun` starts N singletons",
            fix,
        )
    pmis = [p for p in s.mpi_plugins if p.startswith("pmi") and "_v" not in p]
    only = " and ".join(pmis) if pmis else "no PMI plugin"
    if i.pmi == "pmix":
        rebuild = "ask the admin for Slurm's mpi/pmix plugin"
    else:
        rebuild = "rebuild the image's MPI with PMIx (e.g. MPICH `--with-pmi=pmix`)"
    return Check(
        "pmi",
        WARN,
        f"Slurm offers only {only} and the image's {name} speaks {pmi}",
        f"run with `rankwire run` / `apptainer-mpirun` (they serve {pmi}), or "
        f"{rebuild}; {NO_BRIDGE}",
    )


def fabric_checks(h: DoctorHostFacts, i: DoctorImageFacts) -> list[Check]:
    """The plan `--fabric auto` makes for this image; and, when it binds nothing, whether
    the host libfabric would fit the image where it is bound (the glibc / FABRIC_1.x ABI)."""
    if i.arch != h.goarch:
        return [Check("fabric", WARN, f"not checked: the image is for {i.arch}")]
    if i.fabric_error:
        cause, fix = cause_and_fix(i.fabric_error)
        return [Check("fabric", WARN, f"the image's fabric facts cannot be read: {cause}", fix)]
    try:
        plan = plan_fabric(i.fabric_host, i.fabric_image, "auto")
    except UserError as err:
        cause, fix = cause_and_fix(str(err))
        return [Check("fabric", FAIL, f"--fabric auto: {cause}", fix)]
    if plan.provider:
        return [
            Check(
                "fabric",
                OK,
                f"--fabric auto binds the host's {plan.provider} provider: "
                f"{plan.reason}; the image's glibc and libfabric users fit it",
            )
        ]
    return [Check("fabric", OK, f"--fabric auto binds nothing: {plan.reason}"), abi_check(i)]


def abi_check(i: DoctorImageFacts) -> Check:
    lib = i.fabric_host.libfabric
    if lib is None:
        return Check("fabric-abi", OK, "the host has no libfabric: nothing would be bound")
    bound = [(name, o.elf) for name, o in lib.closure([(SONAME, lib.path)])]
    try:
        check_abi(bound, i.fabric_image, lib)
    except UserError as err:
        cause, fix = cause_and_fix(str(err))
        return Check(
            "fabric-abi",
            WARN,
            f"{cause} (this matters where it is bound: a node "
            "with a fabric adapter, or --fabric PROVIDER)",
            fix,
        )
    glibc = i.fabric_image.glibc_version or "unknown"
    return Check(
        "fabric-abi",
        OK,
        f"the host libfabric {lib.version} fits the image (glibc "
        f"{glibc}, {len(i.fabric_image.consumers)} libfabric users)",
    )


def accounts_check(h: DoctorHostFacts, i: DoctorImageFacts) -> Check:
    uid, gid = h.host.uid, h.host.gid
    problems = [
        _missing("/etc/passwd", "uid", uid, i.passwd_ids),
        _missing("/etc/group", "gid", gid, i.group_ids),
    ]
    found = [p for p in problems if p]
    if not found:
        return Check(
            "image-users",
            OK,
            f"the image's /etc/passwd and /etc/group name uid {uid} and gid {gid}",
        )
    return Check(
        "image-users",
        WARN,
        "; ".join(found) + f": uid {uid} has no name inside "
        "(ssh, `whoami` and MPI launchers that look the user up fail)",
        f"add /etc/passwd and /etc/group entries for uid {uid} and gid {gid} to the "
        "image, or bind the host's (`-B /etc/passwd -B /etc/group`)",
    )


def _missing(path: str, what: str, n: int, ids: Optional[tuple[int, ...]]) -> str:
    if ids is None:
        return f"the image has no {path}"
    return "" if n in ids else f"the image's {path} has no {what} {n}"


def cause_and_fix(message: str) -> tuple[str, str]:
    """A one-line `cause: fix` (or `cause; fix`) error split at its last separator outside
    parentheses; (message, "") when it has none."""
    depth, cut = 0, -1
    for k, ch in enumerate(message):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0 and ch in ":;" and message[k + 1 : k + 2] == " ":
            cut = k
    if cut < 0:
        return message, ""
    return message[:cut], message[cut + 2 :]
