"""`rankwire spank-helper check|start`: the SPANK shim's Python half (not for humans).

The shim runs it with a request (a frame of job facts, `runtime/frame.py`) on stdin and
a socket as stdout; the reply is one frame, a failure the record `error=rankwire: <line>`.

- `check`, as root: site policy decides. With the job user's credentials, the image and
  every host path the plugin binds for the user (--container-mounts sources, the home
  directory, the working directory) are opened, and policy judges the paths those
  descriptors hold: nothing is looked up by path again after this. Under
  `require_signed_by`, root verifies the image descriptor (or finds it in
  /run/rankwire/verified) before anything else reads it (`_check_signed`).
  - Advisory (no `enforce` in the policy): the reply is `checked` and the descriptors
    [image, bind...] (SCM_RIGHTS); the shim runs `start` with them as fds 3, 4, ...
  - `enforce = true`: root builds the container itself (no user namespace, the image on
    a read-only loop device, binds from the descriptors), joins it and replies
    `enforced=1`, the task environment, and [lease, mount namespace].
- A remote image (docker://, oras://): after policy allowed its registry and before
  anything is opened, `check` runs `pull` as the job user (setgroups/setgid/setuid in the
  child, nothing of it as root), into that user's cache or theirs below the site's
  `image_cache=`; then the pulled SIF is opened as the user, like a path.
- `start`, as the job user (advisory): plans and starts the node's holder from those
  descriptors, joins it, and replies the task environment and [lease, user namespace,
  mount namespace]. The shim never connects to a path a user could swap.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import json
import os
import pwd
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rankwire.errors import UserError
from rankwire.pmi.bridgeplan import BridgePlan
from rankwire.runtime import frame
from rankwire.runtime.plan import ContainerPlan, ImageFacts, Mount
from rankwire.runtime.reference import is_remote, parse_reference
from rankwire.spank import plan
from rankwire.spank.plan import Asked, JobFacts, Pull, asked
from rankwire.spank.policy import Policy, PolicyError, load_policy

if TYPE_CHECKING:
    from rankwire.runtime.instance import Lease

IMAGE_FD = 3  # where the shim puts the checked image for `start`; binds follow it
RUN_DIR = "/run/rankwire"  # root's; per-user runtime dirs below it, made by root
MAX_BINDS = 60  # descriptors the shim takes from one reply: 64 in all
JOIN_TIMEOUT_S = 10.0
SETUP_TIMEOUT_S = 120.0  # a holder's setup (mounts; an unsquash fallback takes longest)
Reply = list[tuple[str, str]]


def _reply(records: Reply, fds: Sequence[int] = ()) -> None:
    payload = frame.encode(records)
    out = socket.socket(fileno=os.dup(1))
    try:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        sent = out.sendmsg([payload], anc)
        out.sendall(payload[sent:])
    finally:
        out.close()


@contextlib.contextmanager
def as_user(facts: JobFacts) -> Iterator[None]:
    """Root acting with the job user's credentials (file access checks are the user's)."""
    if facts.uid == 0:
        yield
        return
    os.setgroups(list(facts.gids))
    os.setegid(facts.gid)
    os.seteuid(facts.uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups([])


def _oci_conf(env: dict[str, str]) -> bool:
    conf = env.get("SLURM_CONF") or "/etc/slurm/slurm.conf"
    return os.path.exists(os.path.join(os.path.dirname(conf), "oci.conf"))


def _open(
    path: str, flags: int, named: str, missing: str = "not found: check the path"
) -> tuple[int, str]:
    """(descriptor, the real path it holds); a one-line UserError naming `named`."""
    try:
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise UserError(f"{named} {missing}") from None
    except OSError as err:
        raise UserError(f"cannot open {named}: {err.strerror}") from None
    return fd, os.readlink(f"/proc/self/fd/{fd}")


def _open_image(path: str, named_by: str) -> tuple[int, str]:
    fd, real = _open(path, os.O_RDONLY | os.O_NONBLOCK, f"image {path} (from {named_by})")
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise UserError(f"image {path} (from {named_by}) is {kind}: give a SIF file")
    return fd, real


@dataclasses.dataclass
class Opened:
    """What the check phase opened as the job user (descriptors closed by `close`)."""

    image_fd: int
    image_real: str
    binds: dict[str, int] = dataclasses.field(default_factory=dict)  # planned source -> fd
    real: dict[str, str] = dataclasses.field(default_factory=dict)  # asked source -> real
    home_allowed: bool = True

    def close(self) -> None:
        for fd in (self.image_fd, *self.binds.values()):
            with contextlib.suppress(OSError):
                os.close(fd)


def _open_binds(want: Asked, facts: JobFacts, home: str, policy: Policy, out: Opened) -> None:
    """As the job user: each host path the plugin binds for them, judged by policy on
    the path its descriptor holds (no later lookup, so no rename race)."""
    for m in want.mounts:
        named = f"--container-mounts source {m.source}"
        fd, real = _open(m.source, os.O_PATH, named, "does not exist: create it")
        if real in out.binds:  # the same source twice
            os.close(fd)
        else:
            out.binds[real] = fd
        out.real[m.source] = real
        policy.check_mount(real)
    if not want.no_home and os.path.isdir(home):
        fd, real = _open(home, os.O_PATH | os.O_DIRECTORY, f"home directory {home}")
        out.binds[home] = fd
        try:
            policy.check_mount(real)
        except PolicyError:  # an empty private home instead (see plan.without_home)
            out.home_allowed = False
            os.close(out.binds.pop(home))
    if want.workdir is None and facts.cwd not in out.binds:
        fd, real = _open(facts.cwd, os.O_PATH | os.O_DIRECTORY, f"working directory {facts.cwd}")
        out.binds[facts.cwd] = fd
        try:
            policy.check_mount(real)
        except PolicyError:
            raise PolicyError(
                f"the working directory {real} is outside the allowed mount sources "
                f"({', '.join(policy.mount_sources or ())}): run srun from one of them or "
                "pass --container-workdir"
            ) from None
    if len(out.binds) > MAX_BINDS:
        raise UserError(f"{len(out.binds)} binds are more than {MAX_BINDS}: bind a parent dir")


def _root_dir(base: str) -> str:
    """`base`, made if need be: root's, writable by no one else."""
    os.makedirs(base, mode=0o755, exist_ok=True)
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise UserError(f"{base} must be a root-owned directory not writable by others")
    return base


def _private_dir(base: str, uid: int, gid: int) -> str:
    """BASE/UID, made by root (no other user can make it first), the user's alone."""
    path = os.path.join(_root_dir(base), str(uid))
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
        os.chown(path, uid, gid)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        raise UserError(f"{path} is not a private directory of uid {uid}: remove it")
    return path


def _runtime_dir(uid: int, gid: int) -> str:
    """/run/rankwire/UID: the user's runtime dir (holder sockets, session dirs)."""
    return _private_dir(RUN_DIR, uid, gid)


def _refuse_writable_image(facts: JobFacts, fd: int, real: str, opened: Opened) -> None:
    """Under `enforce` the kernel parses the image (a loop device, read live): a user who
    could rewrite it could feed the kernel a crafted file system."""
    if facts.uid == 0:  # root may change anything anyway
        return
    with as_user(facts):
        writable = os.access(f"/proc/self/fd/{fd}", os.W_OK, effective_ids=True)
    if writable:
        opened.close()
        raise PolicyError(
            f"image {real} is writable by you, and this site's enforced policy runs only "
            "images their users cannot change: ask your admin to place it"
        )


def _pull(facts: JobFacts, want: Asked, policy: Policy, home: str) -> str:
    """A remote image: policy judges its registry before anything is fetched, then the
    job user pulls it; the path of the pulled SIF, which `check` opens as the user."""
    ref = parse_reference(want.image)
    policy.check_remote(ref.registry, want.image)
    how = plan.plan_pull(facts, want.image, ref, home, pwd.getpwuid(facts.uid).pw_name)
    if how.site_cache:
        _private_dir(os.path.dirname(how.root), facts.uid, facts.gid)
    return _pull_as_user(facts, how)


def _pull_as_user(facts: JobFacts, how: Pull) -> str:
    """Run `spank-helper pull` exactly as the job user (groups, gid, uid: real, effective
    and saved; the child checks) with an environment of our making; the shim's deadline
    kills it with us (same process group). Returns the SIF's path in `how.root`."""
    request = frame.encode(
        [
            ("uid", str(facts.uid)),
            ("gid", str(facts.gid)),
            ("source", how.source),
            ("root", how.root),
            ("insecure", "1" if how.insecure else "0"),
        ]
    )
    ours, theirs = socket.socketpair()
    with ours:
        with theirs:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-m", "rankwire", "spank-helper", "pull"],
                stdin=subprocess.PIPE,
                stdout=theirs.fileno(),
                stderr=subprocess.PIPE,
                cwd="/",
                env=how.env,
                user=facts.uid,
                group=facts.gid,
                extra_groups=list(facts.gids),
            )
        _, err = proc.communicate(request)
        data = b"".join(iter(lambda: ours.recv(65536), b""))
    text = err.decode(errors="replace").strip()
    if text:  # to slurmd's log (a traceback), with the shim's prefix
        print(text, file=sys.stderr)
    try:
        reply = frame.decode(data)
    except frame.FrameError:
        reply = []
    failed, digest = frame.one(reply, "error"), frame.one(reply, "pulled") or ""
    if failed:
        raise UserError(failed.removeprefix("rankwire: "))
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        last = text.splitlines()[-1] if text else f"exit status {proc.returncode}"
        raise UserError(f"pulling {how.source} failed: {last}")
    return os.path.join(how.root, "sif", f"{digest[7:]}.sif")


def pull_as_user(req: frame.Records) -> Reply:
    """`spank-helper pull`: run by `check` as the job user, never as root for another."""
    from rankwire.runtime import pull as pulling

    uid, gid = int(frame.one(req, "uid") or "0"), int(frame.one(req, "gid") or "0")
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise UserError(f"the pull runs as uid {uid} gid {gid} only; got {os.getresuid()}")
    root, source = Path(frame.one(req, "root") or ""), frame.one(req, "source") or ""
    access = pulling.access_from_env(insecure=frame.one(req, "insecure") == "1")
    result = pulling.pull(source, access, progress=pulling.Progress(quiet=True), root=root)
    if result.path != str(root / "sif" / f"{result.digest[7:]}.sif"):  # pull.py's layout
        raise UserError(f"the pull of {source} gave {result.path}, not a SIF in {root}/sif")
    return [("pulled", result.digest)]


def _open_pulled(path: str, image: str) -> tuple[int, str]:
    """The SIF the pull just wrote (no symlink), as the job user."""
    named = f"image {path} (pulled from {image})"
    fd, real = _open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW, named)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{named} is not a regular file: remove it and run the step again")
    return fd, real


def check(facts: JobFacts) -> tuple[Reply, list[int]]:
    """Root: does site policy allow what the step asked for? Returns (reply, fds)."""
    from rankwire.runtime.imagefacts import image_facts

    want = asked(facts, _oci_conf(facts.env))
    if want is None:
        return [("skip", "no container asked for")], []
    policy = load_policy(facts.arg("policy"))
    policy.check_options(
        fabric=want.fabric,
        remap_root=want.remap_root,
        writable=want.writable,
        host_mpi=want.host_mpi,
        site_host_mpi=facts.arg("host_mpi") or "none",
    )
    home = pwd.getpwuid(facts.uid).pw_dir
    pulled = _pull(facts, want, policy, home) if is_remote(want.image) else None
    with as_user(facts):
        # Every open of the image is the user's (on a root-squashed NFS, root reads less;
        # NFS reads through a descriptor with the credentials it was opened with).
        if pulled is None:
            image_fd, image_real = _open_image(want.image, want.image_from)
        else:
            image_fd, image_real = _open_pulled(pulled, want.image)
    opened = Opened(image_fd, image_real)
    try:
        if pulled is None:  # a pulled image was allowed by its registry, and is this file
            policy.check_image(image_real)
        _check_signed(policy, image_fd, image_real)
        with as_user(facts):
            of_image = image_facts(image_real, fd=image_fd)
            _open_binds(want, facts, home, policy, opened)
    except BaseException:
        opened.close()
        raise
    want = dataclasses.replace(
        want,
        mounts=tuple(dataclasses.replace(m, source=opened.real[m.source]) for m in want.mounts),
    )
    if policy.enforce:
        _refuse_writable_image(facts, image_fd, image_real, opened)
        return _build_as_root(facts, want, of_image, opened, home)
    checked = {
        "image_facts": dataclasses.asdict(of_image),
        "asked": dataclasses.asdict(want),
        "binds": list(opened.binds),  # planned source of fd IMAGE_FD + 1 + i
        "home_allowed": opened.home_allowed,
        "runtime_dir": _runtime_dir(facts.uid, facts.gid),
    }
    return [("checked", json.dumps(checked))], [opened.image_fd, *opened.binds.values()]


def _check_signed(policy: Policy, fd: int, real: str) -> None:
    """`require_signed_by`: as root, verify the image open on `fd` -- the descriptor
    that is then mounted, so no rename or rewrite after the check changes what runs --
    or find it in root's verification cache (`runtime/trust.py`)."""
    if policy.require_signed_by is None or policy.keyring is None:
        return
    from rankwire.runtime import trust

    signers = ", ".join(f.upper() for f in policy.require_signed_by)
    fstype = trust.served_by_user(fd)
    if fstype is not None:
        raise PolicyError(
            f"image {real} is on a {fstype} mount that a user serves, which can show the "
            f"signature check other bytes than it later reads; this site runs only images "
            f"signed by {signers}: copy it to a local or shared file system"
        )
    cache = Path(_root_dir(RUN_DIR)) / "verified"
    req = trust.Requirement(policy.require_signed_by, (policy.keyring,))
    try:
        trust.check(fd, real, req, cache)
    except UserError as err:
        from rankwire.runtime.sif_sign import VerifyError

        if not isinstance(err, VerifyError):
            raise
        raise PolicyError(f"this site runs only images signed by {signers}: {err}") from None


def _asked(d: dict[str, Any]) -> Asked:
    return Asked(
        **{
            **d,
            "mounts": tuple(Mount(**m) for m in d["mounts"]),
            "keep_env": tuple(d["keep_env"]),
        }
    )


def _plan(
    facts: JobFacts,
    want: Asked,
    image: ImageFacts,
    image_fd: int,
    home: str,
    binds: dict[str, int],
    home_allowed: bool,
) -> tuple[ContainerPlan, dict[str, str], str, BridgePlan]:
    """The container (binds from `binds`' descriptors) and its env, the workdir, and
    whether the tasks' PMI is bridged (`pmi/bridgeplan.py`; the shim starts the bridges)."""
    from rankwire.runtime.assemble import plan_image
    from rankwire.runtime.facts import gather
    from rankwire.runtime.slurmfacts import slurm_step

    user = plan.user_facts(facts, home, slurm_step(plan.step_env(facts), facts.uid))
    opts = plan.exec_options(want, want.mounts)
    # Readers in other processes (unsquashfs for the fabric and host MPI checks) see the
    # checked file through our descriptor (passed to them), never through its path.
    found = gather(image, opts, user=user, fabric_image_path=f"/proc/self/fd/{image_fd}")
    planned = plan_image(found, opts, None)
    container = plan.for_tasks(plan.with_descriptors(planned.container, binds))
    if not home_allowed:
        container = plan.without_home(container, home)
    return container, planned.env, opts.workdir or user.cwd, planned.pmi_bridge


def _task_records(
    facts: JobFacts, want: Asked, env: dict[str, str], workdir: str, bridge: BridgePlan
) -> Reply:
    changes = plan.task_env(facts.env, env, want.keep_env)
    return [
        ("workdir", workdir),
        ("bridge", "1" if bridge.bridge else "0"),
        *((("warning", bridge.warning),) if bridge.warning else ()),
        *(("setenv", v) for v in changes.set),
        *(("unsetenv", v) for v in changes.unset),
        *(("copyenv", v) for v in changes.copy),
    ]


def _build_as_root(
    facts: JobFacts, want: Asked, image: ImageFacts, opened: Opened, home: str
) -> tuple[Reply, list[int]]:
    """`enforce`: root builds, holds and joins the container; the shim gets the lease."""
    from rankwire.runtime.instance import RUNTIME_DIR_VAR

    try:
        container, env, workdir, bridge = _plan(
            facts, want, image, opened.image_fd, home, opened.binds, opened.home_allowed
        )
        if bridge.bridge:  # the bridge would run in the container's mount namespace
            raise UserError(
                "the image's MPI speaks PMI-1/PMI-2 and this step serves PMIx; this site "
                "enforces its containers, where rankwire's PMI bridge does not run: use "
                "srun --mpi=pmi2"
            )
        os.environ[RUNTIME_DIR_VAR] = _runtime_dir(0, 0)
        lease = _start_and_join(
            plan.enforced(container), facts, opened.image_fd, tuple(opened.binds.values())
        )
    finally:
        opened.close()
    records = [("enforced", "1"), *_task_records(facts, want, env, workdir, bridge)]
    return records, _handed_over(lease.conn, lease.mntns_fd)


def _start_and_join(
    container: ContainerPlan, facts: JobFacts, image_fd: int, keep_fds: tuple[int, ...]
) -> Lease:
    """Start the step's holder and join it, both bounded; whoever answers its socket
    must be that holder (a user's dir can be raced: `start`)."""
    from rankwire.runtime.instance import join, start_holder

    holder = start_holder(
        container,
        mode="shared",
        owner=facts.stepd_pid,
        register=False,
        image_fd=image_fd,
        keep_fds=keep_fds,
        setup_timeout=SETUP_TIMEOUT_S,
    )
    lease = join(holder.socket, timeout=JOIN_TIMEOUT_S)
    peer = struct.unpack("3i", lease.conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    if peer[0] != holder.pid:
        os.kill(holder.pid, signal.SIGTERM)
        raise UserError(
            f"cannot join the container: {holder.socket} was answered by pid {peer[0]}, not "
            f"by its holder {holder.pid}; was it replaced?"
        )
    return lease


def _handed_over(conn: socket.socket, *ns_fds: int) -> list[int]:
    """The lease connection and namespace fds, for the shim: its own descriptors, which
    stay open however our `Lease` object goes (the connection is the step's lease)."""
    return [conn.detach(), *ns_fds]


def start(facts: JobFacts, checked: dict[str, Any]) -> tuple[Reply, list[int]]:
    """The job user: plan the container from the checked descriptors and start it."""
    from rankwire.runtime.instance import RUNTIME_DIR_VAR

    want = _asked(checked["asked"])
    binds = {src: IMAGE_FD + 1 + i for i, src in enumerate(checked["binds"])}
    home = pwd.getpwuid(facts.uid).pw_dir
    container, env, workdir, bridge = _plan(
        facts,
        want,
        ImageFacts(**checked["image_facts"]),
        IMAGE_FD,
        home,
        binds,
        checked["home_allowed"],
    )
    os.environ[RUNTIME_DIR_VAR] = checked["runtime_dir"]
    lease = _start_and_join(container, facts, IMAGE_FD, tuple(binds.values()))
    fds = _handed_over(lease.conn, lease.userns_fd, lease.mntns_fd)
    return _task_records(facts, want, env, workdir, bridge), fds


def main(phase: str) -> int:
    """Serve one request; the exit code is 0 whenever a reply was sent."""
    fds: list[int] = []
    try:
        if phase == "start":  # from here on our own user cannot ptrace or read us
            from rankwire.runtime import syscalls as sc

            sc.prctl(sc.PR_SET_DUMPABLE, 0)
        req = frame.decode(sys.stdin.buffer.read())
        if phase == "pull":
            reply = pull_as_user(req)
        elif phase == "check":
            reply, fds = check(JobFacts.from_request(req))
        elif phase == "start":
            checked = json.loads(frame.one(req, "checked") or "{}")
            reply, fds = start(JobFacts.from_request(req), checked)
        else:
            raise UserError(f"unknown spank-helper phase '{phase}'")
    except UserError as err:
        reply = [("error", f"rankwire: {err}")]
    except frame.FrameError as err:
        reply = [("error", f"rankwire: bad request from the plugin: {err}")]
    except Exception as err:  # the shim shows one line; the traceback goes to slurmd's log
        traceback.print_exc()
        reply = [("error", f"rankwire: internal error in the {phase} phase: {err!r}"[:900])]
    _reply(reply, fds)
    return 0


__all__ = ["Asked", "check", "main", "pull_as_user", "start"]
