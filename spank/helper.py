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
    Asked for `phases=check+start` (the shim does), a child forked before root reads
    anything becomes exactly the job user, gets root's reply and descriptors, runs
    `start` on them and replies for both (`started=1`): one helper process per step
    (`_check_then_start`).
  - `enforce = true`: root builds the container itself (no user namespace, the image on
    a read-only loop device, binds from the descriptors), joins it and replies
    `enforced=1`, the task environment, and [lease, mount namespace].
- A remote image (docker://, oras://): after policy allowed its registry and before
  anything is opened, `check` runs `pull` as the job user (setgroups/setgid/setuid in the
  child, nothing of it as root), into that user's cache or theirs below the site's
  `image_cache=`; then the pulled SIF is opened as the user, like a path.
- `start`, as the job user (advisory): plans and starts the node's holder from those
  descriptors, joins it, and replies the task environment and [lease, user namespace,
  mount namespace]. The shim connects to a path a user could swap only to join a named
  container (below), as the job user, to a peer of theirs.
- `--container-name NAME`: `check` also decides the mode (`plan.plan_named`) from the
  job's container NAME on the node (its overlay record, read as the user: the image it
  runs), makes the job's dir (BASE/SLURMD/JOB root's, JOB/UID the user's); `start` joins
  its holder or starts a persistent one keeping its changes in JOB/UID/NAME. The job's
  end: the shim's job epilog runs `epilog` (root), which runs `teardown` as each user
  with containers there (stop their holders, empty their dir) and removes the dirs;
  `check` reaps the dirs of jobs slurmctld says have ended (`reap`). When a join is all
  a later step would do (`plan.joins_without_helper`), `check` says `fast_join` and the
  holder's socket, `start` whether the plan read the command (`argv_used`), and the shim
  keeps both phases' replies in a ticket (root's, JOB/.UID.join): a later step with the
  same request joins the holder itself, without running the helper.
- `--container-save PATH`: `start` replies how; after the step's last task the shim
  runs `save` as the job user (`runtime/save.py`: a temp file renamed over PATH).
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
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Optional

from rankwire.errors import UserError
from rankwire.pmi.bridgeplan import NAMES, PMI2_TO_PMIX, PMIX_TO_PMI, BridgePlan
from rankwire.record import record
from rankwire.runtime import frame
from rankwire.runtime.plan import ContainerPlan, ExecOptions, ImageFacts, Mount, entrypoint_words
from rankwire.runtime.reference import is_remote, parse_reference
from rankwire.spank import plan
from rankwire.spank.plan import Asked, JobFacts, Pull, asked
from rankwire.spank.policy import Policy, PolicyError, load_policy

if TYPE_CHECKING:
    from rankwire.runtime.assemble import Facts
    from rankwire.runtime.instance import Lease

IMAGE_FD = 3  # where the shim puts the checked image for `start`; binds follow it
RUN_DIR = "/run/rankwire"  # root's; per-user runtime dirs below it, made by root
# What the shim's task_init starts for each bridge (spank/rankwire_spank.c start_bridge,
# start_pmi2_bridge).
SHIM_BRIDGE = {PMIX_TO_PMI: "1", PMI2_TO_PMIX: "2"}
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
        if sent < len(payload):  # sendall(b"") still sends: EPIPE once the shim has it all
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


def _slurm_conf_dir(facts: JobFacts) -> str:
    """Where this node's Slurm configuration is: slurmstepd's SLURM_CONF (slurmd's), else
    the job's, else Slurm's default."""
    conf = facts.stepd_env.get("SLURM_CONF") or facts.env.get("SLURM_CONF")
    return os.path.dirname(conf or "/etc/slurm/slurm.conf")


def _oci_conf(facts: JobFacts) -> bool:
    return os.path.exists(os.path.join(_slurm_conf_dir(facts), "oci.conf"))


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
    # planned source -> (the path opened for it, whether as a directory): for the ticket
    opened_as: dict[str, tuple[str, bool]] = dataclasses.field(default_factory=dict)
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
            out.opened_as[real] = (m.source, False)
        out.real[m.source] = real
        policy.check_mount(real)
    if not want.no_home and os.path.isdir(home):
        fd, real = _open(home, os.O_PATH | os.O_DIRECTORY, f"home directory {home}")
        out.binds[home] = fd
        out.opened_as[home] = (home, True)
        try:
            policy.check_mount(real)
        except PolicyError:  # an empty private home instead (see plan.without_home)
            out.home_allowed = False
            os.close(out.binds.pop(home))
    if want.workdir is None and facts.cwd not in out.binds:
        fd, real = _open(facts.cwd, os.O_PATH | os.O_DIRECTORY, f"working directory {facts.cwd}")
        out.binds[facts.cwd] = fd
        out.opened_as[facts.cwd] = (facts.cwd, True)
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
    import subprocess

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

    want = asked(facts, _oci_conf(facts))
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
    policy.check_kept(name=want.name, save=want.save)
    reap(facts)
    named, allowed, asked_image = None, None, ""
    if want.name is not None:
        mine = _named_parent(facts, want)
        recorded = _recorded_image(facts, want)
        allowed = _Allowed(os.path.dirname(mine), facts.uid, want.name)
        asked_real = None
        if recorded is not None and want.image and not is_remote(want.image):
            with as_user(facts):
                asked_real = os.path.realpath(want.image)
        named = plan.plan_named(want, recorded, asked_real)
        asked_image = want.image
        want = dataclasses.replace(want, image=named.image, image_from=named.image_from)
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
        # A pulled image was allowed by its registry, and is this file; the image a named
        # container runs was allowed when it started (pulled, maybe), said root's record.
        if pulled is None and not (allowed and allowed.read() == image_real):
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
    try:
        _entrypoint(want, of_image)  # refused before anything starts
    except BaseException:
        opened.close()
        raise
    if policy.enforce:
        _refuse_writable_image(facts, image_fd, image_real, opened)
        return _build_as_root(facts, want, of_image, opened, home)
    runtime = _runtime_dir(facts.uid, facts.gid)
    checked = {
        "image_facts": dataclasses.asdict(of_image),
        "asked": dataclasses.asdict(want),
        "binds": list(opened.binds),  # planned source of fd IMAGE_FD + 1 + i
        "home_allowed": opened.home_allowed,
        "runtime_dir": runtime,
    }
    if allowed is not None:
        allowed.write(image_real)
    extra = [("warning", named.warning)] if named and named.warning else []
    if plan.joins_without_helper(want):  # the shim's ticket, for steps that repeat this
        depends = _depends(facts, policy, image_fd, image_real, asked_image)
        if depends is not None:
            extra += [("fast_join", "1"), ("join_socket", plan.named_socket(runtime, facts, want))]
            extra += [("depends", d) for d in depends]
    elif plan.starts_fresh(want):  # the shim's fresh ticket, for steps that repeat this
        extra += _fresh_records(facts, policy, want, opened)
    return [("checked", json.dumps(checked)), *extra], [
        opened.image_fd,
        *opened.binds.values(),
    ]


def _fresh_records(facts: JobFacts, policy: Policy, want: Asked, opened: Opened) -> Reply:
    """What the shim's fresh ticket keeps of this check (`spank/ticket.c`
    `rw_fresh_start`): the files it read (`depends`), and the image and each bind source
    as the C front end opens them again, as the job user, in a later step: the path this
    check opened, what it found there (the image's identity; a source's kind, device and
    inode) and the real path it held, "ID<TAB>PATH<TAB>REAL" (a bind's ID "MODE:DEV:INO:DIR",
    DIR 1 where it was opened as a directory). Nothing (no ticket) where a file cannot be
    read or looked at, or a path holds a tab."""
    depends = _depends(facts, policy, opened.image_fd, opened.image_real, "")
    if depends is None or any("\t" in p for p in (want.image, opened.image_real)):
        return []
    try:
        image = f"{_identity(os.fstat(opened.image_fd))}\t{want.image}\t{opened.image_real}"
        out = [("fresh", "1"), *(("depends", d) for d in depends), ("fresh_image", image)]
        for source, fd in opened.binds.items():
            st = os.fstat(fd)
            path, directory = opened.opened_as[source]
            real = os.readlink(f"/proc/self/fd/{fd}")
            if "\t" in path or "\t" in real:
                return []
            ident = f"{stat.S_IFMT(st.st_mode):o}:{st.st_dev}:{st.st_ino}:{int(directory)}"
            out.append(("fresh_bind", f"{ident}\t{path}\t{real}"))
    except OSError:
        return []
    return out


def _identity(st: os.stat_result) -> str:
    """A file as the shim's ticket compares it (spank/ticket.c `on_depends`)."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _depends(
    facts: JobFacts, policy: Policy, image_fd: int, image_real: str, asked_image: str
) -> Optional[list[str]]:
    """The files this check's decision read, "root|user IDENTITY PATH" (who can see them):
    the code that decides (every rankwire module loaded: an upgrade), the policy file and
    its keyring, the Slurm configuration's dir (an oci.conf there makes `srun --container`
    Slurm's), the image (through the descriptor read, at its real path) and a
    --container-image asked for a container that runs another (its warning). A later step
    repeating this request joins without the helper only while each is the same file,
    unchanged (spank/ticket.c). None when one cannot be read: no ticket."""
    from rankwire.runtime.joinplan import loaded_module_files

    try:
        root = (*loaded_module_files(), policy.source, _slurm_conf_dir(facts))
        out = [f"root {_identity(os.stat(p))} {p}" for p in root if p]
        if policy.require_signed_by and policy.keyring:
            out.append(f"root {_identity(os.stat(policy.keyring))} {policy.keyring}")
        out.append(f"user {_identity(os.fstat(image_fd))} {image_real}")
        if asked_image and not is_remote(asked_image) and asked_image != image_real:
            with as_user(facts):
                out.append(f"user {_identity(os.stat(asked_image))} {asked_image}")
    except OSError:
        return None
    return out


@record
class _Allowed:
    """Root's record, in root's JOB (or global) dir, of the image policy allowed for the
    container NAME of user UID: a later step of it runs that image (from its overlay
    record, the user's) without the image_dirs check, which a pulled image would fail."""

    parent: str
    uid: int
    name: str

    @property
    def path(self) -> str:
        return os.path.join(self.parent, f".{self.uid}.{self.name}.image")

    def read(self) -> Optional[str]:
        try:
            with open(self.path, encoding="utf-8") as f:
                return f.read()
        except OSError:
            return None

    def write(self, image: str) -> None:
        tmp = f"{self.path}.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(image)
        os.replace(tmp, self.path)


def _named_parent(facts: JobFacts, want: Asked) -> str:
    """BASE/SLURMD/JOB (root's) and JOB/UID (the job user's alone), where the job's
    named containers keep their changes on this node (the epilog removes them); or
    BASE/SLURMD/global and global/UID (global scope: kept until the user removes them)."""
    _root_dir(plan.named_base(facts.args))
    job = os.path.dirname(os.path.dirname(plan.named_dir(facts, want)))
    _root_dir(os.path.dirname(job))
    _root_dir(job)
    return _private_dir(job, facts.uid, facts.gid)


def _recorded_image(facts: JobFacts, want: Asked) -> Optional[str]:
    """The image the job's container `name` keeps changes to on this node (its overlay
    record, `runtime/holder.OVERLAY_RECORD`), read as the job user; None if there is
    none. Whatever the user wrote there is only a path the check then opens as them."""
    from rankwire.runtime.holder import OVERLAY_RECORD

    name = want.name
    path = os.path.join(plan.named_dir(facts, want), OVERLAY_RECORD)
    with as_user(facts):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise UserError(f"cannot read {path}: {err.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(65536)
    try:
        image = json.loads(data).get("image")
    except (ValueError, AttributeError):
        image = None
    if not isinstance(image, str) or not image.startswith("/"):
        raise UserError(f"{path} is damaged: the job's container {name} cannot be used again")
    return image


# -- the end of a job's named containers ---------------------------------------------
TEARDOWN_TIMEOUT_S = 30.0  # one user's containers of one job, as that user
GONE_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)


def _job_gone(job_id: int, slurm_conf: Optional[str]) -> bool:
    """Whether slurmctld says job `job_id` has ended (or no longer knows it). Unsure (no
    answer): False, nothing is removed."""
    import subprocess

    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}
    if slurm_conf:
        env["SLURM_CONF"] = slurm_conf
    try:
        proc = subprocess.run(
            ["scontrol", "-o", "show", "job", str(job_id)],
            env=env,
            capture_output=True,
            text=True,
            timeout=10,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    if proc.returncode != 0:
        return "Invalid job id" in proc.stderr
    state = re.search(r"\bJobState=(\S+)", proc.stdout)
    return state is not None and state.group(1) in GONE_STATES


def reap(facts: JobFacts) -> None:
    """The reaper, at each container step's check (root): the named containers of jobs
    that have ended on this node without their epilog (slurmd down when they ended, the
    plugin loaded later, an epilog killed) go now. Costs one `scontrol show job` per other
    job that has named containers here; nothing when there are none."""
    conf, jobs = facts.stepd_env.get("SLURM_CONF"), plan.stepd_jobs_dir(facts)
    try:
        entries = os.listdir(jobs)
    except OSError:
        return
    for entry in entries:
        try:  # another step's reaper or the job's epilog may be at it too: theirs, then
            if entry.isdigit() and int(entry) != facts.job_id and _job_gone(int(entry), conf):
                teardown_job(jobs, int(entry))
        except OSError as err:  # never this step's failure
            print(f"rankwire: reaping job {entry}'s containers: {err}", file=sys.stderr)


def teardown_job(jobs: str, job_id: int) -> None:
    """Root (the job epilog, the reaper): end job `job_id`'s named containers on this
    node and remove their dirs. The containers are ended, and their dirs emptied, by
    `spank-helper teardown` run as their user (whose files those are: nothing there is
    followed as root); root then removes the dirs it made."""
    import shutil

    job = os.path.join(jobs, str(job_id))
    try:
        fd = os.open(job, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        st = os.fstat(fd)
        if st.st_uid != 0 or st.st_mode & 0o022:
            print(f"rankwire: {job} is not root's; left as it is", file=sys.stderr)
            return
        for entry in os.listdir(fd):
            try:
                ust = os.stat(entry, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue
            if entry.startswith(".") and stat.S_ISREG(ust.st_mode) and ust.st_uid == 0:
                with contextlib.suppress(FileNotFoundError):  # a concurrent teardown's
                    os.unlink(entry, dir_fd=fd)  # root's records (`_Allowed`)
                continue
            if entry.isdigit() and stat.S_ISDIR(ust.st_mode) and ust.st_uid == int(entry):
                _teardown_as_user(job, job_id, ust.st_uid, ust.st_gid)
            with contextlib.suppress(OSError):  # emptied by its user, else root's rmtree
                os.rmdir(entry, dir_fd=fd)
            if os.path.lexists(os.path.join(job, entry)):
                # (in root's dir: the name cannot be swapped; rmtree follows no link)
                shutil.rmtree(os.path.join(job, entry), ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(job)
        with contextlib.suppress(OSError):  # the slurmd's dir too, when it was the last
            os.rmdir(os.path.dirname(job))
    finally:
        os.close(fd)


def _teardown_as_user(job: str, job_id: int, uid: int, gid: int) -> None:
    import subprocess

    request = frame.encode(
        [("uid", str(uid)), ("gid", str(gid)), ("job_id", str(job_id)), ("dir", job)]
    )
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "USER": name}
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-m", "rankwire", "spank-helper", "teardown"],
            input=request,
            capture_output=True,
            cwd="/",
            env=env,
            user=uid,
            group=gid,
            extra_groups=[],
            timeout=TEARDOWN_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        print(f"rankwire: the teardown of job {job_id} (uid {uid}) timed out", file=sys.stderr)
        return
    text = (proc.stderr + proc.stdout).decode(errors="replace").strip()
    if text:  # to slurmd's log
        print(text, file=sys.stderr)


def teardown_as_user(req: frame.Records) -> Reply:
    """`spank-helper teardown`, as the job user: stop the job's named holders on this
    node (their sockets in the user's runtime dir), wait for their exit, empty the job's
    dir of the user's (JOBS_DIR/JOB/UID)."""
    from rankwire.runtime.holder import _remove_tree
    from rankwire.runtime.instance import prune_stale, stop_holder

    uid, gid = int(frame.one(req, "uid") or "0"), int(frame.one(req, "gid") or "0")
    job_id = int(frame.one(req, "job_id") or "0")
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise UserError(f"the teardown runs as uid {uid} gid {gid} only; got {os.getresuid()}")
    base = Path(RUN_DIR) / str(uid)
    for sock in sorted((base / "instances").glob(f"{plan.job_key(job_id)}*.sock")):
        stop_holder(str(sock))
        sock.with_suffix(".json").unlink(missing_ok=True)  # one `instance start` made
    if base.is_dir():
        prune_stale(base)
    mine = Path(frame.one(req, "dir") or "/nonexistent") / str(uid)
    if mine.is_dir() and not mine.is_symlink():
        for entry in mine.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                _remove_tree(str(entry))
            else:
                entry.unlink()
    return [("done", "1")]


def epilog(req: frame.Records) -> Reply:
    """`spank-helper epilog`, root, from the shim's slurm_spank_job_epilog."""
    args, node = frame.every(req, "arg"), frame.one(req, "slurmd_nodename")
    jobs = plan.jobs_dir(args, frame.one(req, "slurm_conf"), node)
    teardown_job(jobs, int(frame.one(req, "job_id") or "0"))
    return [("done", "1")]


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


@dataclasses.dataclass
class _Planned:
    """A step's plan (`_plan`): the container (binds from descriptors) and its env, the
    workdir, whether the tasks' PMI is bridged (`pmi/bridgeplan.py`; the shim starts the
    bridges), whether the plan read the tasks' command (the MPI of a two-MPI image's
    program: then the shim's tickets hold the command too); and the facts and options it
    was made from (a fresh ticket's key)."""

    container: ContainerPlan
    env: dict[str, str]
    workdir: str
    bridge: BridgePlan
    read_argv: bool
    found: Facts
    opts: ExecOptions

    def same(self, other: _Planned) -> bool:
        """The same plan (from other facts, maybe), but for the env, which reaches the
        tasks only as `_task_records` word it (Slurm's variables are Slurm's)."""
        mine = (self.container, self.workdir, self.bridge, self.read_argv)
        return mine == (other.container, other.workdir, other.bridge, other.read_argv)


def _plan(
    facts: JobFacts,
    want: Asked,
    image: ImageFacts,
    image_fd: int,
    home: str,
    binds: dict[str, int],
    home_allowed: bool,
) -> _Planned:
    """The step's plan, its binds' sources from `binds`' descriptors."""
    from rankwire.runtime.assemble import plan_image
    from rankwire.runtime.facts import gather
    from rankwire.runtime.slurmfacts import slurm_step

    user = plan.user_facts(facts, home, slurm_step(plan.step_env(facts), facts.uid))
    opts = plan.exec_options(want, want.mounts, facts)
    read_argv: list[bool] = []

    def read_argv_of(_image: ImageFacts) -> tuple[str, ...]:
        read_argv.append(True)
        return facts.argv

    # Readers in other processes (unsquashfs for the fabric and host MPI checks) see the
    # checked file through our descriptor (passed to them), never through its path.
    found = gather(
        image,
        opts,
        user=user,
        fabric_image_path=f"/proc/self/fd/{image_fd}",
        argv_of=read_argv_of,
    )
    planned = plan_image(found, opts, None)
    container = plan.for_tasks(plan.with_descriptors(planned.container, binds))
    if not home_allowed:
        container = plan.without_home(container, home)
    workdir = opts.workdir or user.cwd
    return _Planned(
        container, planned.env, workdir, planned.pmi_bridge, bool(read_argv), found, opts
    )


def _entrypoint(want: Asked, image: ImageFacts) -> tuple[str, ...]:
    """The words the shim puts before the tasks' command (`plan.entrypoint_words`)."""
    on, asked_for = want.entrypoint != "off", want.entrypoint == "on"
    return entrypoint_words(image, on, "--container-entrypoint", asked_for)


def _task_records(
    facts: JobFacts,
    want: Asked,
    env: dict[str, str],
    workdir: str,
    bridge: BridgePlan,
    image: ImageFacts,
) -> Reply:
    changes = plan.task_env(facts.env, env, want.keep_env)
    return [
        ("workdir", workdir),
        *(("entrypoint", w) for w in _entrypoint(want, image)),  # the shim: before argv
        ("bridge", SHIM_BRIDGE.get(bridge.bridge or "", "0")),
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
        planned = _plan(
            facts, want, image, opened.image_fd, home, opened.binds, opened.home_allowed
        )
        container, env, workdir, bridge = (
            planned.container,
            planned.env,
            planned.workdir,
            planned.bridge,
        )
        if bridge.bridge:  # it would start in the container's mount namespace
            other = "pmi2" if bridge.bridge == PMIX_TO_PMI else "pmix"
            raise UserError(
                f"the image's MPI speaks {NAMES[bridge.need or '']} and this step serves "
                f"{NAMES[bridge.offer or '']}; this site enforces its containers, where "
                f"rankwire's PMI bridge does not run: use srun --mpi={other}"
            )
        os.environ[RUNTIME_DIR_VAR] = _runtime_dir(0, 0)
        lease, _ = _start_and_join(
            plan.enforced(container), facts, opened.image_fd, tuple(opened.binds.values())
        )
    finally:
        opened.close()
    records = [("enforced", "1"), *_task_records(facts, want, env, workdir, bridge, image)]
    return records, _handed_over(lease.conn, lease.mntns_fd)


def _start_and_join(
    container: ContainerPlan, facts: JobFacts, image_fd: int, keep_fds: tuple[int, ...]
) -> tuple[Lease, Optional[frame.Records]]:
    """Start the step's holder and join it, both bounded; whoever answers its socket
    must be that holder (a user's dir can be raced: `start`). The holder's recipe is kept
    in the user's runtime dir (`joinplan.remember_holder`): the next step with the same
    container plan, image and binds has `rankwire-holder setup` make it, without the
    Python holder (a setup about 15 ms shorter); a recipe that fails there is dropped,
    and the Python holder starts the container. Returns the lease and the recipe the
    container was made by (None: none that `rankwire-holder setup` can make again)."""
    from rankwire.runtime import joinplan
    from rankwire.runtime.instance import (
        HolderHandle,
        NotTheHolder,
        join,
        runtime_dir,
        start_holder,
    )

    def started(kept: Optional[int] = None) -> HolderHandle:
        return start_holder(
            container,
            mode="shared",
            owner=facts.stepd_pid,
            register=False,
            image_fd=image_fd,
            keep_fds=keep_fds,
            setup_timeout=SETUP_TIMEOUT_S,
            recipe=kept is None,
            kept=kept,
        )

    base, holder, kept, recipe = str(runtime_dir()), None, None, None
    if "user" in container.namespaces:  # not a root holder's (enforced): it keeps none
        kept = joinplan.kept_holder(base, container, image_fd, keep_fds)
    if kept is not None:
        try:
            recipe = joinplan.recipe_of(kept)
            holder = started(kept)
        except UserError:  # said by holder.py if it fails too (stderr would reach srun)
            recipe = None
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(base, joinplan.holder_recipe_name(container)))
        finally:
            os.close(kept)
    if holder is None:
        holder = started()
        recipe = holder.recipe
        if recipe is not None:
            joinplan.remember_holder(base, container, image_fd, keep_fds, recipe)
    try:
        return join(holder.socket, timeout=JOIN_TIMEOUT_S, holder=holder.pid), recipe
    except NotTheHolder as err:
        os.kill(holder.pid, signal.SIGTERM)
        raise UserError(
            f"cannot join the container: {holder.socket} was answered by pid "
            f"{err.answered_by}, not by its holder {holder.pid}; was it replaced?"
        ) from None


def _plugin_plan(
    facts: JobFacts,
    want: Asked,
    image: ImageFacts,
    home: str,
    planned: _Planned,
    binds: dict[str, int],
    checked: dict[str, Any],
    recipe: frame.Records,
) -> Optional[str]:
    """The plugin plan's name (`joinplan.remember_plugin`, in the user's runtime dir), from
    which the C front end starts this container again for a later step whose request is
    this one's but for Slurm's per-step values (the shim's fresh ticket), or None where it
    must not: a bridge or its warning (started per step), a plan or reply that reads a
    per-step value (planned again from `plan.per_step`'s facts: another plan), or a host
    the kept plans cannot key (`execcmd.host_key`). The second plan catches a per-step
    value copied into the plan or the replies (the planners' only use of them: Slurm's
    PMIx dirs, the share key), not one a planner would branch on: a new use of one that
    branches must come with its name out of `rw_step_values` (spank/ticket.c)."""
    from rankwire.runtime import joinplan
    from rankwire.runtime.execcmd import host_key

    if planned.bridge.bridge or planned.bridge.warning:
        return None
    other = plan.per_step(facts)
    again = _plan(other, want, image, IMAGE_FD, home, binds, checked["home_allowed"])
    if not again.same(planned) or _task_records(
        other, want, again.env, again.workdir, again.bridge, image
    ) != _task_records(facts, want, planned.env, planned.workdir, planned.bridge, image):
        return None
    key = host_key(planned.found, planned.opts)
    if key is None:
        return None
    files, probed, contents = key
    return joinplan.remember_plugin(
        checked["runtime_dir"],
        planned.container,
        image.path,
        dataclasses.replace(planned.found.user, cwd=os.getcwd()),
        files,
        probed,
        planned.found.host.tools,
        contents,
        IMAGE_FD,
        tuple(binds.values()),
        recipe,
    )


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
    image = ImageFacts(**checked["image_facts"])
    planned = _plan(facts, want, image, IMAGE_FD, home, binds, checked["home_allowed"])
    container, env, workdir, bridge = (
        planned.container,
        planned.env,
        planned.workdir,
        planned.bridge,
    )
    os.environ[RUNTIME_DIR_VAR] = checked["runtime_dir"]
    if container.save:  # before any task runs: a path it could never write
        from rankwire.runtime.save import check_target

        try:
            check_target(container.save)
        except UserError as err:
            raise UserError(str(err).replace("--save", "--container-save", 1)) from None
    server = None
    if bridge.bridge and want.name_mode != "no_exec":
        server = _start_bridge_server(bridge.bridge, facts, checked["runtime_dir"])
    try:
        joined, recipe = False, None
        if want.name is None:
            lease, recipe = _start_and_join(container, facts, IMAGE_FD, tuple(binds.values()))
        else:
            lease, joined = _join_or_start_named(container, facts, want, tuple(binds.values()))
    except BaseException:
        if server is not None:
            _stop_bridge_server(server[0])
        raise
    records = _task_records(facts, want, env, workdir, bridge, image)
    if server is not None:  # the shim's tasks all follow it (else the first task starts one)
        records.append(("bridge_server", server[1]))
    records.append(("argv_used", "1" if planned.read_argv else "0"))  # for the shim's tickets
    if recipe is not None and server is None and not container.save and want.name is None:
        try:
            fresh = _plugin_plan(facts, want, image, home, planned, binds, checked, recipe)
        except Exception:  # the step runs; a later one runs the helper again
            fresh = None
        if fresh is not None:  # the shim keeps a fresh ticket for steps that repeat this
            records.append(("fresh_plan", fresh))
    if joined and want.mounts:  # as Pyxis: a running container's mounts are its own
        records.append(
            (
                "warning",
                f"--container-mounts is ignored: the job's container {want.name} runs "
                "already, with the mounts of the step that started it",
            )
        )
    if container.save:  # the shim runs `save` as the job user once the tasks are gone
        how = {
            "image": container.image,
            "offset": container.partition_offset,
            "overlay_dir": container.overlay_dir,
            "socket": str(lease.report.get("socket", "")),
            "out": container.save,
        }
        records.append(("save", json.dumps(how)))
    if want.name_mode == "no_exec":  # the container is there for later steps; not for these
        lease.close()
        return [("skip", "no_exec"), *(r for r in records if r[0] == "save")], []
    fds = _handed_over(lease.conn, lease.userns_fd, lease.mntns_fd)
    return records, fds


def _start_bridge_server(way: str, facts: JobFacts, base: str) -> Optional[tuple[int, str]]:
    """The node's PMI bridge server (`way`: PMIX_TO_PMI or PMI2_TO_PMIX), started now,
    while the container and the tasks start (`bridge.start_node_server`,
    `pmi2bridge.start_node_server`); None if it cannot (the shim's first task starts one
    then, the way `rankwire exec` does)."""
    if way == PMI2_TO_PMIX:
        from rankwire.pmi.pmix.pmi2bridge import start_node_server
    else:
        from rankwire.pmi.bridge import start_node_server
    try:
        return start_node_server(
            facts.job_id,
            facts.step_id,
            facts.node_id,
            facts.local_tasks,
            facts.stepd_pid,
            facts.env,
            base,
        )
    except OSError as err:
        print(f"rankwire: the node's first task starts its PMI bridge: {err}", file=sys.stderr)
        return None


def _stop_bridge_server(pid: int) -> None:
    """The step fails before its tasks: the bridge started for them goes (it is ours),
    within 6 s (its libpmix start-up may take STOP_TIMEOUT to give up), else by SIGKILL."""
    import time

    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 6.0
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.01)


NAMED_LOCK_S = 60.0  # a step waits that long for another starting the same container


def _join_or_start_named(
    container: ContainerPlan, facts: JobFacts, want: Asked, keep_fds: tuple[int, ...]
) -> tuple[Lease, bool]:
    """The job's container `name` on this node: join its holder, or (none running: the
    first step, or its holder was ended with a step's cgroup or by a slurmd restart)
    start one on its kept changes. One step of the job at a time (a lock on the job's
    dir of the user's); the holder is persistent: it stays when the step ends, until the
    job's epilog (or the reaper) stops it; in global scope it is listed as an instance
    (`rankwire instance list|stop`). (lease, whether it ran already)."""
    from rankwire.runtime.instance import (
        NotTheHolder,
        _join,
        runtime_dir,
        start_holder,
        unlink_if_dead,
    )

    name, key = str(want.name), plan.named_key(facts, want)
    sock = Path(plan.named_socket(str(runtime_dir()), facts, want))
    mine = os.path.dirname(container.overlay_dir)
    lock = os.open(mine, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _lock_within(lock, NAMED_LOCK_S, name)
        try:
            lease = _join(str(sock), timeout=JOIN_TIMEOUT_S)
        except ConnectionRefusedError:
            lease = None
            unlink_if_dead(sock)
        except (FileNotFoundError, ConnectionResetError):
            lease = None
        except OSError as err:
            raise UserError(f"cannot join the job's container {name}: {err}") from None
        if lease is not None:
            return lease, True
        holder = start_holder(
            container,
            mode="persistent",
            owner=None,
            name=key,
            register=want.scope == "global",
            meta={  # for `rankwire instance stop NAME --save OUT.sif`
                "overlay_dir": container.overlay_dir,
                "image_facts": {"partition_offset": container.partition_offset},
            },
            image_fd=IMAGE_FD,
            keep_fds=keep_fds,
            setup_timeout=SETUP_TIMEOUT_S,
        )
        try:  # its socket is in the user's dir: whoever answers must be that holder
            return _join(holder.socket, timeout=JOIN_TIMEOUT_S, holder=holder.pid), False
        except NotTheHolder:
            os.kill(holder.pid, signal.SIGTERM)
            raise UserError(
                f"cannot join the job's container {name}: its socket was replaced"
            ) from None
    finally:
        os.close(lock)


def _lock_within(fd: int, timeout: float, name: str) -> None:
    import fcntl
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise UserError(
                    f"the job's container {name} is being started by another step for over "
                    f"{timeout:g} s: try again"
                ) from None
            time.sleep(0.02)


def save_as_user(req: frame.Records) -> Reply:
    """`spank-helper save`, run by the shim as the job user after the step's last task
    on the node: pack the container (`runtime/save.py`) into --container-save's PATH."""
    from rankwire.runtime.save import save, upper_fd

    uid, gid = int(frame.one(req, "uid") or "-1"), int(frame.one(req, "gid") or "-1")
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise UserError(f"the save runs as uid {uid} gid {gid} only; got {os.getresuid()}")
    how = json.loads(frame.one(req, "save") or "{}")
    try:
        upper = upper_fd(how["socket"], how["overlay_dir"])
        try:
            save(how["image"], int(how["offset"]), upper, how["out"])
        finally:
            os.close(upper)
    except UserError as err:
        raise UserError(str(err).replace("--save", "--container-save", 1)) from None
    return [("saved", how["out"])]


def _become_job_user(facts: JobFacts) -> None:
    """Root to exactly the job user, as the shim's helper_run.c does for `start`: the
    job's groups, every uid and gid, checked, and no way back; not dumpable (our own user
    cannot ptrace or read us). Any failure ends the process (the shim says so)."""
    from rankwire.runtime import syscalls as sc

    uid, gid = facts.uid, facts.gid
    try:
        os.setgroups(list(facts.gids))
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
            raise OSError("ids not changed")
        if uid != 0:
            with contextlib.suppress(PermissionError):
                os.setuid(0)
                raise OSError("root regained")
        sc.prctl(sc.PR_SET_DUMPABLE, 0)
    except OSError as err:
        print(f"rankwire: cannot become uid {uid} gid {gid}: {err}", file=sys.stderr)
        os._exit(126)


def _to_start_fds(fds: Sequence[int]) -> None:
    """`fds` at IMAGE_FD, IMAGE_FD + 1, ... (where the shim puts them for `start`), every
    other descriptor but stdin, stdout and stderr closed."""
    import fcntl

    floor = IMAGE_FD + len(fds)  # above every target: no dup lands on one of them
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor) for fd in fds]
    for i, fd in enumerate(high):
        os.dup2(fd, IMAGE_FD + i, inheritable=False)
    os.closerange(floor, os.sysconf("SC_OPEN_MAX"))


def _read_all(conn: socket.socket) -> tuple[bytes, list[int]]:
    """Everything until EOF, and the descriptors that came with it."""
    chunks: list[bytes] = []
    fds: list[int] = []
    while True:
        msg, got, _, _ = socket.recv_fds(conn, 1 << 16, MAX_BINDS + 1)
        fds += got
        if not msg:
            return b"".join(chunks), fds
        chunks.append(msg)


def _start_as_user(facts: JobFacts, from_root: socket.socket) -> NoReturn:
    """The forked child of `_check_then_start`: the job user from the start, with nothing
    of root's check in its memory (the holder it forks is its user's to read). It waits
    for root's check records and descriptors; with them it runs `start` and replies for
    both phases (`started=1`); EOF (root replied itself) ends it."""
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        from rankwire.runtime import joinplan

        joinplan.started_environment()  # read while we can: a plugin plan's key
        _become_job_user(facts)
        # The start phase's own modules meanwhile (root's check runs on the other core).
        import rankwire.runtime.assemble
        import rankwire.runtime.facts
        import rankwire.runtime.instance  # noqa: F401

        msg, fds = _read_all(from_root)
        from_root.close()
        if msg:
            records = [(k, v) for k, v in frame.decode(msg)]
            _to_start_fds(fds)
            try:
                started, out = start(facts, json.loads(dict(records)["checked"]))
                reply, fds = [*records, ("started", "1"), *started], out
            except UserError as err:
                reply, fds = [("error", f"rankwire: {err}")], []
            _reply(reply, fds)
    except BaseException as err:  # one line for the shim, the traceback to slurmd's log
        import traceback

        traceback.print_exc()
        code = 1
        with contextlib.suppress(BaseException):
            _reply([("error", f"rankwire: internal error in the start phase: {err!r}")])
    finally:
        for stream in (sys.stdout, sys.stderr):  # nothing of the interpreter's exit runs
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(code)


def _check_then_start(facts: JobFacts) -> int:
    """The shim's `check+start` (one helper start per step instead of two). Before root
    reads anything, a child is forked that becomes the job user (`_start_as_user`); root
    checks, and hands the child its records and the checked descriptors, or, when there
    is no start phase to run (skipped, refused, enforced), replies itself and lets the
    child go. The exit code is the replying process's."""
    import threading

    if threading.active_count() > 1:  # no fork: the shim runs `start`
        reply, fds = check(facts)
        _reply(reply, fds)
        return 0
    to_child, from_root = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        to_child.close()
        _start_as_user(facts, from_root)
    from_root.close()
    try:
        try:
            reply, fds = check(facts)
        except UserError as err:
            reply, fds = [("error", f"rankwire: {err}")], []
        if "checked" in dict(reply):  # the fds ride with the first byte; EOF ends it
            payload = frame.encode(reply)
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            to_child.sendall(payload[to_child.sendmsg([payload], anc) :])
        else:
            _reply(reply, fds)
        for fd in fds:
            os.close(fd)
    finally:
        to_child.close()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def main(phase: str) -> int:
    """Serve one request; the exit code is 0 whenever a reply was sent, or none was asked for."""
    fds: list[int] = []
    try:
        if phase == "start":  # from here on our own user cannot ptrace or read us
            from rankwire.runtime import joinplan
            from rankwire.runtime import syscalls as sc

            joinplan.started_environment()  # read while we can: a plugin plan's key
            sc.prctl(sc.PR_SET_DUMPABLE, 0)
        data = sys.stdin.buffer.read()
        if not data and phase == "check":  # started early; the step ended before it asked
            return 0
        req = frame.decode(data)
        if phase == "pull":
            reply = pull_as_user(req)
        elif phase == "check" and frame.one(req, "phases") == "check+start":
            return _check_then_start(JobFacts.from_request(req))
        elif phase == "check":
            reply, fds = check(JobFacts.from_request(req))
        elif phase == "start":
            checked = json.loads(frame.one(req, "checked") or "{}")
            reply, fds = start(JobFacts.from_request(req), checked)
        elif phase == "save":
            reply = save_as_user(req)
        elif phase == "epilog":
            reply = epilog(req)
        elif phase == "teardown":
            reply = teardown_as_user(req)
        else:
            raise UserError(f"unknown spank-helper phase '{phase}'")
    except UserError as err:
        reply = [("error", f"rankwire: {err}")]
    except frame.FrameError as err:
        reply = [("error", f"rankwire: bad request from the plugin: {err}")]
    except Exception as err:  # the shim shows one line; the traceback goes to slurmd's log
        import traceback

        traceback.print_exc()
        reply = [("error", f"rankwire: internal error in the {phase} phase: {err!r}"[:900])]
    _reply(reply, fds)
    return 0


__all__ = ["Asked", "check", "main", "pull_as_user", "start"]
