"""The holder: one process that owns a container's namespaces and image mount.

Forked by `instance.start_holder` with a request (the ContainerPlan, socket path,
session dir, mode, owner pid); applies the plan, then execs its serving half in its
place, `rankwire-holder` (runtime/holdserve.c: a small static C program, so that a
long-lived holder is not a Python interpreter forked from the CLI; its init and watcher
are that program too), which reports one JSON line on a status pipe (`{"ok": true, ...}`
or `{"ok": false, "error": "<one line>"}`), serves a Unix socket and tears down (after a
failed setup too: one teardown). A client that sends `join` gets the user and mount
namespace fds (SCM_RIGHTS) and holds a lease for as long as it keeps the connection
open. It tears everything down on `stop`, when the owner process dies, when the image
driver dies, or (ephemeral mode) when the last lease closes. It decides nothing: every
choice is in the plan.

With "pid" in `plan.namespaces` the container owns its processes: the holder makes a PID
namespace whose init is a child of its own (holdserve.c `run_init`), mounts that
namespace's /proc, and `join` hands over its descriptor too. Whatever joins and forks
inside is in it; when the holder ends, init ends, and the kernel kills every process
left in the namespace (backgrounded, double-forked, or not). A fresh /proc that cannot
be mounted (a /proc partly hidden by a container runtime) leaves the container without a
PID namespace (the report's "pid_namespace_fallback" says why).

Root mode (a holder running as root, `"user"` not in `plan.namespaces`): a container the
job user who joins it cannot change. Only a mount namespace (owned by the initial user
namespace, so nobody who enters it without CAP_SYS_ADMIN can mount or unmount), the
"loop" image driver (a kernel squashfs mount of an auto-clearing loop device), every
mount nosuid and nodev (binds of host device nodes, under /dev, keep their devices), and
a socket only root can connect to. `join` still hands over two descriptors, the user
namespace one being the holder's own (the host's): joiners `setns` the mount namespace
only; the report's "namespaces" says which.

Asked for its recipe (`req["recipe"]`: `rankwire exec [OPTIONS] IMAGE CMD`, the
launcher, the plugin's start phase), an ephemeral or shared user-namespace holder notes
each step of its setup as it makes it (`_note`: the maps, the session tmpfs, the FUSE
driver, the mount points it made, each mount with its target resolved in the image and
its source as given, a descriptor's too; without a PID namespace, the watcher's command)
and reports them first on the status pipe; `runtime/joinplan.py` keeps them (in the
image's exec plan, the launch plan, or the plugin's kept recipe), and `rankwire-holder
setup` (holdserve.c `set_up_container`) makes the same steps, without Python, for the next
same request. A step it could not make the same way (another image or overlay driver, a
descriptor's tree, a mount point made below another mount, changes kept, a PID namespace
that fell back) leaves no recipe (`_unrepeatable`). A new step of the setup is noted here
and made there too, or marks the recipe unrepeatable.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, Optional, cast

from rankwire.errors import UserError
from rankwire.fds import close_fds_except
from rankwire.runtime import loopdev
from rankwire.runtime import syscalls as sc
from rankwire.runtime.imagepath import host_path
from rankwire.runtime.joinplan import SERVER, plan_path, started_environ
from rankwire.runtime.plan import ContainerPlan, Mount, hidden_by, sandbox_dir, within

MOUNT_WAIT_S = 10.0
# The watcher's command after the holder's death (`prune_after`; argv: holder, sock, session)
PRUNE = (
    "import sys; from rankwire.runtime.holder import prune_after; "
    "prune_after(int(sys.argv[1]), sys.argv[2], sys.argv[3])"
)
# A bind's source given as a descriptor the holder was handed (`req["keep_fds"]`).
FD_SOURCE = re.compile(r"/proc/self/fd/([0-9]+)")


class SetupError(Exception):
    """A one-line reason the container could not be set up; `taken`: another holder
    already serves this socket name (a shared container's race loser)."""

    def __init__(self, message: str, taken: bool = False) -> None:
        super().__init__(message)
        self.taken = taken


class ImageError(SetupError):
    """The image itself is broken (no other driver can help): its message, which names
    the image, is the whole line the user sees."""


class OverlayError(SetupError):
    """--writable-overlay DIR cannot be used (busy, another image's, wrong filesystem):
    its message, which names DIR, is the whole line the user sees."""


# What --writable-overlay DIR holds besides the overlay's upper and work dirs: the image
# whose changes they are (`Holder._claim_overlay_dir`).
OVERLAY_RECORD = "rankwire-overlay.json"
# Filesystems the kernel's overlay keeps an upper dir on, inside a user namespace too
# (user.* xattrs, whiteouts, O_TMPFILE); NFS, FUSE and the like cannot.
KEEPING_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs", "zfs"})


def fs_type(path: str) -> str:
    """The type of the filesystem `path` lies on (the deepest mount above it)."""
    real = os.path.realpath(path)
    best, kind = "", "unknown"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        point = sc.mount_field(fields[4])
        if within(real, point) and len(point) >= len(best):
            best, kind = point, right.split()[0]
    return kind


def secure_path(root: str, path: str) -> str:
    """`path` resolved inside the image mounted at `root` (symlinks never lead out)."""
    found = host_path(root, path)
    if found is None:
        raise SetupError(f"too many symlinks resolving {path} in the image")
    return found


def fd_source(m: Mount) -> Optional[int]:
    """N if `m` binds from the descriptor N (source /proc/self/fd/N)."""
    match = FD_SOURCE.fullmatch(m.source) if m.kind == "bind" else None
    return int(match.group(1)) if match else None


def _wait_mounted(
    path: str, parent_dev: int, proc: Optional[subprocess.Popen[bytes]], log: str
) -> None:
    deadline = time.monotonic() + MOUNT_WAIT_S
    while time.monotonic() < deadline:
        if os.stat(path).st_dev != parent_dev:
            return
        if proc is not None and proc.poll() is not None:
            msg = Path(log).read_text(errors="replace").strip().splitlines()
            argv0 = cast("list[str]", proc.args)[0]
            raise SetupError(f"{argv0} exited: {msg[-1] if msg else proc.returncode}")
        time.sleep(0.002)
    raise SetupError(f"timed out mounting {path}")


EXTRACTING = ".extracting-"  # partial unpackings of `_extract`, beside the cache's


def _remove_tree(path: str) -> None:
    """rm -rf, through the image's read-only directories too (0555 and the like); never
    follows a symlink (one in the image may point at any host path)."""
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)
    for top, dirs, _ in os.walk(path):
        for d in dirs:
            sub = os.path.join(top, d)
            if not os.path.islink(sub):
                with contextlib.suppress(OSError):
                    os.chmod(sub, 0o700)
    import shutil

    shutil.rmtree(path, ignore_errors=True)


class Holder:
    def __init__(self, req: dict[str, Any], server: int) -> None:
        self.server = server  # rankwire-holder (runtime/holdserve.c), opened to exec
        # and the environment to exec it with: the one we started with (read while the
        # host's /proc is in view), as `ps e` showed for a holder before it exec'd
        self.environ = started_environ()
        self.plan = ContainerPlan.from_dict(req["plan"])
        self.sock_path: str = req["socket"]
        self.session: str = req["session"]
        # "ephemeral": ends with its last lease or its owner; "shared": ends with its last
        # lease; "persistent": ends on `stop`.
        self.mode: str = req["mode"]
        # The step plan of the step whose tasks share us (runtime/joinplan.py), a name
        # beside our socket: it goes with us.
        self.step_file: Optional[str] = req.get("step_file")
        self.owner: Optional[int] = req.get("owner")
        # An image the caller opened (the SPANK check phase): mounted through this
        # descriptor, never looked up again by path.
        self.image_fd: Optional[int] = req.get("image_fd")
        self.image_source = (
            f"/proc/self/fd/{self.image_fd}" if self.image_fd is not None else self.plan.image
        )
        # Descriptors the caller handed down for binds (a Mount's source /proc/self/fd/N);
        # closed once the mounts are made.
        self.keep_fds: tuple[int, ...] = tuple(req.get("keep_fds", ()))
        # Per mount index: the detached tree cloned from a descriptor (root mode), or the
        # source to bind from instead of the descriptor (a user namespace's copy of it).
        self.trees: dict[int, int] = {}
        self.sources: dict[int, str] = {}
        self.root_mode = "user" not in self.plan.namespaces
        self.daemons: list[subprocess.Popen[bytes]] = []
        self.report: dict[str, Any] = {
            "ok": True,
            "pid": os.getpid(),
            "namespaces": list(self.plan.namespaces),
            # For a joiner that sees us die unannounced: what to prune (`Lease.close`).
            "socket": self.sock_path,
            "session": self.session,
        }
        self.sock_dir_fd = -1
        self.session_parent_fd = -1
        self.session_lock = -1  # the session dir's, held until we exit
        self.listener: Optional[socket.socket] = None
        self.bound = False
        self.ns_fds: list[int] = []
        self.init: Optional[int] = None  # PID 1 of the container's PID namespace
        self.init_life = -1  # init ends when this closes
        self.proc_staging: Optional[str] = None  # that namespace's /proc, until bound
        self.watcher: Optional[int] = None  # see `_start_watcher`
        self.watcher_conn: Optional[socket.socket] = None
        self.overlay_lock = -1  # --writable-overlay DIR, locked while we live
        self.upper_fd = -1  # the overlay's upper dir, handed to `upper` (for --save)
        # What we did, as `rankwire-holder setup` (holdserve.c) can do it again for the C
        # front end's exec plan (runtime/joinplan.py `remember_exec`): asked for by
        # `req["recipe"]`; None once a step is one it cannot do (`_unrepeatable`).
        self.recipe: Optional[list[tuple[str, str]]] = None
        self._mounted: list[str] = []  # the targets `_apply` mounted on, inside the root
        ours = self.mode in ("ephemeral", "shared") and not self.root_mode
        if req.get("recipe") and ours and not (self.plan.overlay_dir or self.plan.save):
            self.recipe = []

    def _note(self, key: str, value: str) -> None:
        if self.recipe is not None:
            self.recipe.append((f"r_{key}", value))

    def _unrepeatable(self) -> None:
        self.recipe = None

    # -- setup -----------------------------------------------------------------------
    def setup(self) -> None:
        plan = self.plan
        if self.root_mode and (os.getuid(), os.geteuid()) != (0, 0):
            raise SetupError("a container without a user namespace needs a holder run by root")
        if plan.overlay_dir:  # first: a refusal leaves nothing to undo
            self._claim_overlay_dir()
        if "pid" not in plan.namespaces:
            self._start_watcher()
        # The session dir appears under its name already locked (held until we exit,
        # even by SIGKILL): `prune_stale` of another process removes only unlocked ones.
        parent, name = os.path.split(self.session)
        self.session_parent_fd = os.open(parent, os.O_RDONLY)
        making = f"t-{name}"
        os.mkdir(making, 0o700, dir_fd=self.session_parent_fd)
        self.session_lock = os.open(
            making, os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.session_parent_fd
        )
        fcntl.flock(self.session_lock, fcntl.LOCK_EX)
        os.rename(
            making, name, src_dir_fd=self.session_parent_fd, dst_dir_fd=self.session_parent_fd
        )
        self.sock_dir_fd = os.open(os.path.dirname(self.sock_path), os.O_RDONLY)
        if self.root_mode:
            st = os.fstat(self.sock_dir_fd)
            if st.st_uid != 0 or st.st_mode & 0o077:
                raise SetupError(
                    f"{os.path.dirname(self.sock_path)} must be a directory only root can "
                    "enter (owner root, mode 0700) for a container without a user namespace"
                )
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        umask = os.umask(0o177) if self.root_mode else None
        # The socket appears under its name only once it listens (bound under a
        # temporary name, then hard-linked): a refused connect always means a dead holder,
        # so `prune_stale` and stale-socket removal never take a starting holder's. The
        # link is the atomic claim on the name; early joiners wait in the backlog until
        # setup is done and `serve` accepts them.
        sock_name = os.path.basename(self.sock_path)
        temporary = f"t-{os.getpid()}-{sock_name}"
        try:
            self.listener.bind(os.path.join(os.path.dirname(self.sock_path), temporary))
        finally:
            if umask is not None:
                os.umask(umask)
        try:
            if self.root_mode:
                os.chmod(temporary, 0o600, dir_fd=self.sock_dir_fd)
            self.listener.listen(128)
            # Under the directory's lock: `instance.unlink_if_dead` probes and unlinks
            # under it, so it never takes a socket linked after its probe.
            fcntl.flock(self.sock_dir_fd, fcntl.LOCK_EX)
            os.link(temporary, sock_name, src_dir_fd=self.sock_dir_fd, dst_dir_fd=self.sock_dir_fd)
        except FileExistsError:
            raise SetupError(f"{self.sock_path} is served by another holder", taken=True) from None
        finally:
            fcntl.flock(self.sock_dir_fd, fcntl.LOCK_UN)
            os.unlink(temporary, dir_fd=self.sock_dir_fd)
        self.bound = True

        # The mount a descriptor refers to stays in this mount namespace: binding from
        # it after `unshare` fails (EINVAL). Root clones it now; a user namespace finds
        # its own copy afterwards.
        paths = self._pin_descriptors()
        if self.root_mode:
            sc.unshare(sc.CLONE_NEWNS)
            sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
        else:
            uid, gid = os.getuid(), os.getgid()
            sc.unshare(sc.CLONE_NEWUSER | sc.CLONE_NEWNS)
            Path("/proc/self/setgroups").write_text("deny")
            Path("/proc/self/uid_map").write_text("{} {} {}\n".format(*plan.uid_map))
            Path("/proc/self/gid_map").write_text("{} {} {}\n".format(*plan.gid_map))
            if (plan.uid_map[1], plan.gid_map[1]) != (uid, gid):
                raise SetupError(f"plan maps uid {plan.uid_map[1]} but the holder runs as {uid}")
            sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
            sc.raise_ambient((sc.CAP_SYS_ADMIN, sc.CAP_DAC_OVERRIDE))
            self._reopen_descriptors(paths)
            self._note("uid_map", "{} {} {}".format(*plan.uid_map))
            self._note("gid_map", "{} {} {}".format(*plan.gid_map))

        s = self.session
        tmpfs = f"mode=0755,size={plan.tmpfs_size_mib}m"
        sc.mount("tmpfs", s, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, tmpfs)
        self._note("tmpfs", tmpfs)
        for sub in ("lower", "upper", "work", "root"):
            os.mkdir(os.path.join(s, sub))
        lower, upper, work, root = (
            os.path.join(s, sub) for sub in ("lower", "upper", "work", "root")
        )
        # Changes that are kept (--writable-overlay) or saved (--save) are the user's
        # only: the mount points go to a layer of their own, below the upper dir.
        kept = bool(plan.overlay_dir or plan.save)
        points = os.path.join(s, "mnt") if kept else upper
        if kept:
            os.mkdir(points)
        if plan.overlay_dir:
            upper, work = (os.path.join(plan.overlay_dir, sub) for sub in ("upper", "work"))
        self._open_image(lower)
        fuse = self.report["image_driver"].startswith("squashfuse")
        if fuse:
            self.report["fuse_image"] = True  # its warm list pays (`runtime/warm.py`)
        targets = self._prepare_mountpoints(lower, points)
        lowers = f"{points}:{lower}" if kept else lower
        self._overlay(root, lowers, upper, work, userxattr=kept and not self.root_mode)
        if kept:  # for --save, and `instance stop --save` (`runtime/save.py`)
            self.upper_fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if "pid" in plan.namespaces:  # after the FUSE daemons: they stay out of it
            self._start_init()
        if fuse and plan.prefetch and self.init is not None and not self.root_mode:
            self._prefetch(lower)
        for i, (m, target) in enumerate(zip(plan.mounts, targets)):
            self._apply(root, target, m, self.sources.get(i, m.source), self.trees.pop(i, None))
        flags = sc.MS_REMOUNT | sc.MS_BIND | sc.MS_NOSUID | sc.MS_NODEV
        sc.mount(None, root, None, flags | (0 if plan.writable else sc.MS_RDONLY))
        self._note("writable", "1" if plan.writable else "0")
        reopened = [int(src.rsplit("/", 1)[1]) for src in self.sources.values()]
        for fd in (*self.keep_fds, *reopened):
            if fd != self.image_fd:
                with contextlib.suppress(OSError):
                    os.close(fd)

        self.ns_fds = [
            os.open("/proc/self/ns/user", os.O_RDONLY),
            os.open("/proc/self/ns/mnt", os.O_RDONLY),
        ]
        if self.init is not None:
            self.ns_fds.append(os.open("/proc/self/ns/pid_for_children", os.O_RDONLY))
        if self.watcher_conn is not None:
            socket.send_fds(self.watcher_conn, [b"mnt"], [self.ns_fds[1]])
        devnull = os.open(os.devnull, os.O_RDWR)
        os.chdir(root)
        sc.pivot_root(".", ".")
        sc.umount2(".", sc.MNT_DETACH)
        os.chdir("/")
        sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
        os.dup2(devnull, 0)
        os.close(devnull)

    def _claim_overlay_dir(self) -> None:
        """--writable-overlay DIR: made if missing (its parent must exist), on a filesystem
        that can hold an upper dir, locked while we live (one container at a time), and
        recording the image whose changes it keeps (another image is refused: its files
        would show through changes made to a different tree)."""
        plan, d = self.plan, self.plan.overlay_dir
        named = f"--writable-overlay {d}"
        parent = os.path.dirname(d)
        if not os.path.isdir(d if os.path.lexists(d) else parent):
            what = (
                "is not a directory" if os.path.lexists(d) else f"needs {parent}, which is missing"
            )
            raise OverlayError(f"{named} {what}: give a directory (its parent must exist)")
        kind = fs_type(d if os.path.lexists(d) else parent)
        if kind not in KEEPING_FILESYSTEMS:
            raise OverlayError(
                f"{named} is on {kind}, where the kernel's overlay cannot keep changes: give "
                "a directory on a local disk (ext4, xfs, btrfs) or tmpfs"
            )
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(d, 0o700)
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise OverlayError(
                f"{named}: cannot use it ({err.strerror}); give a directory of yours"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OverlayError(
                f"{named} is in use by another running container: stop that one first, or "
                "give another DIR"
            ) from None
        self.overlay_lock = fd
        record = os.path.join(d, OVERLAY_RECORD)
        try:
            have = json.loads(Path(record).read_text())
        except FileNotFoundError:
            have = None
        except (OSError, ValueError):
            have = {}
        if have is None:
            if os.listdir(d):
                raise OverlayError(
                    f"{named} is not empty and holds no rankwire overlay: give a new or "
                    "empty directory"
                )
            tmp = f"{record}.{os.getpid()}.tmp"
            Path(tmp).write_text(
                json.dumps({"image": plan.image, "identity": plan.image_identity}) + "\n"
            )
            os.rename(tmp, record)
        elif not isinstance(have, dict) or have.get("identity") != plan.image_identity:
            was = have.get("image", "?") if isinstance(have, dict) else "?"
            raise OverlayError(
                f"{named} holds changes to another image ({was}), not to {plan.image}: give "
                "another DIR, or that image"
            )
        for sub, mode in (("upper", 0o755), ("work", 0o700)):  # upper: the root's mode
            with contextlib.suppress(FileExistsError):
                os.mkdir(os.path.join(d, sub), mode)

    def _start_init(self) -> None:
        """A PID namespace (for the children we fork from now on) and its init, which
        mounts the namespace's /proc (only a member can) at session/proc."""
        sc.unshare(sc.CLONE_NEWPID)
        staging = os.path.join(self.session, "proc")
        os.mkdir(staging)
        life_r, life_w = os.pipe()
        status_r, status_w = os.pipe()
        args = ["init", f"life={life_r}", f"status={status_w}", f"staging={staging}"]
        pid = self._fork_server(args, (life_r, status_w))
        os.close(life_r)
        os.close(status_w)
        self.init, self.init_life = pid, life_w
        with os.fdopen(status_r, "rb") as status:
            ready = select.select([status], [], [], MOUNT_WAIT_S)[0]
            said = status.readline().decode(errors="replace").strip() if ready else ""
        if said == "ok":
            self.proc_staging = staging
            self.report["init_pid"] = pid  # its /proc/PID/root: the container's, while it is
            return
        self._unrepeatable()
        life, self.init_life = self.init_life, -1
        os.close(life)  # nothing has joined: its exit waits for no member
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        self.init = None
        self.report["namespaces"].remove("pid")
        self.report["pid_namespace_fallback"] = said or "its init did not start"

    def _fork_server(self, args: list[str], fds: tuple[int, ...]) -> int:
        """A child running rankwire-holder `args` (its init and watch modes), with `fds`
        handed down (no other of ours)."""
        pid = os.fork()
        if pid == 0:
            try:
                for fd in fds:
                    os.set_inheritable(fd, True)
                os.execve(self.server, ["rankwire-holder", *args], self.environ)
            finally:
                os._exit(127)
        return pid

    def _start_watcher(self) -> None:
        """Without a PID namespace (the plugin's containers: Slurm execs the tasks, which
        join our namespaces), nothing else ends what runs in the container when we die:
        a process forked now, outside our namespaces, that kills it then (holdserve.c
        `run_watch`).
        """
        ours, theirs = socket.socketpair()
        # After our death (no "end" said), the watcher removes our files through Python.
        then = [sys.executable, "-I", "-c", PRUNE]
        for word in then:
            self._note("then", word)  # rankwire-holder setup adds pid, socket and session
        then += [str(os.getpid()), self.sock_path, self.session]
        args = ["watch", f"conn={theirs.fileno()}", f"holder={os.getpid()}"]
        pid = self._fork_server(args + [f"then={a}" for a in then], (theirs.fileno(),))
        theirs.close()
        self.watcher, self.watcher_conn = pid, ours

    def _pin_descriptors(self) -> dict[int, str]:
        """Before `unshare`: root mode clones each descriptor's mount (`trees`); a user
        namespace cannot, and gets the descriptors' paths to look up again."""
        paths: dict[int, str] = {}
        for i, m in enumerate(self.plan.mounts):
            fd = fd_source(m)
            if fd is None:
                continue
            try:
                if self.root_mode:
                    self.trees[i] = sc.open_tree_clone(fd, recursive=m.recursive)
                else:
                    paths[i] = os.readlink(m.source)
            except OSError as err:
                raise SetupError(
                    f"cannot mount {m.source} on {m.target}: {err.strerror or err}"
                ) from None
        return paths

    def _reopen_descriptors(self, paths: dict[int, str]) -> None:
        """In the new mount namespace: open each descriptor's path again, in our copy of
        the mounts, and bind from that only if it is the same file."""
        for i, path in paths.items():
            m = self.plan.mounts[i]
            fd = fd_source(m)
            assert fd is not None
            try:
                new = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as err:
                raise SetupError(
                    f"cannot mount {m.source} on {m.target}: {path}: {err.strerror or err}"
                ) from None
            was, now = os.fstat(fd), os.fstat(new)
            if (was.st_dev, was.st_ino) != (now.st_dev, now.st_ino):
                os.close(new)
                raise SetupError(
                    f"cannot mount {m.source} on {m.target}: {path} is no longer the file "
                    "that was opened"
                )
            self.sources[i] = f"/proc/self/fd/{new}"

    @property
    def _pass_fds(self) -> tuple[int, ...]:
        return () if self.image_fd is None else (self.image_fd,)

    def _spawn_fuse(self, argv: list[str], target: str) -> None:
        log = os.path.join(self.session, f"{os.path.basename(argv[0])}.log")
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds=self._pass_fds,
                preexec_fn=_die_with_holder,
            )
        self.daemons.append(proc)
        try:
            _wait_mounted(target, os.stat(self.session).st_dev, proc, log)
        except SetupError:
            self.daemons.remove(proc)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise

    def _open_image(self, lower: str) -> None:
        plan, errors = self.plan, list[str]()
        for driver in plan.image_drivers:
            try:
                if driver == "loop":
                    self._loop_mount(lower)
                elif driver == "extract":
                    self._unrepeatable()
                    rootfs = self._extract()
                    sc.mount(rootfs, lower, None, sc.MS_BIND | sc.MS_REC)
                    if self.root_mode:
                        sc.restrict_mounts(lower, nodev=True, readonly=True, recursive=True)
                    else:
                        sc.bind_remount(lower, readonly=True)
                else:
                    opts = f"ro,offset={plan.partition_offset}"
                    opts = f"{opts},nosuid,nodev" if self.root_mode else opts
                    self._spawn_fuse([driver, "-f", "-o", opts, self.image_source, lower], lower)
                    _readable_root(lower)
                    import shutil

                    program = shutil.which(driver)  # as the spawn found it
                    if errors or program is None:
                        self._unrepeatable()
                    for key, value in (
                        ("driver", driver),
                        ("fuse", os.path.abspath(program or driver)),
                        ("fuse_opts", opts),
                        ("image", os.path.abspath(self.image_source)),
                    ):
                        self._note(key, value)
                self.report["image_driver"] = driver
                if errors:
                    self.report["image_driver_fallback"] = "; ".join(errors)
                return
            except ImageError:
                raise
            except (SetupError, OSError) as err:
                errors.append(f"{driver}: {err}")
        raise SetupError("cannot open the image: " + "; ".join(errors))

    def _prefetch(self, lower: str) -> None:
        """Read the plan's warm list ahead from the FUSE mount at `lower` (`runtime/
        warm.py`), in a process of the container's PID namespace that holds none of our
        descriptors (its stdio is /dev/null), chrooted into the image (so the list names
        nothing outside it, and our pivot_root leaves it there): the child of a child
        that ends at once, so the namespace's init reaps it, and it ends with the
        container at the latest. A hint: nothing here fails the setup."""
        try:
            image = os.open(lower, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            pid = os.fork()
        except OSError:
            os.close(image)
            return
        if pid:
            os.close(image)
            os.waitpid(pid, 0)
            return
        try:
            close_fds_except((image,))
            devnull = os.open(os.devnull, os.O_RDWR)  # not the launcher's output pipes
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.close(devnull)
            if os.fork() == 0:
                from rankwire.runtime.warm import prefetch

                os.fchdir(image)
                os.chroot(".")
                os.close(image)
                prefetch("", self.plan.prefetch)
        finally:
            os._exit(0)

    def _loop_mount(self, lower: str) -> None:
        """The partition on an auto-clearing read-only loop device, mounted squashfs."""
        plan = self.plan
        if not self.root_mode:
            raise SetupError("needs a holder run by root without a user namespace")
        fd = self.image_fd
        if fd is None:
            fd = os.open(plan.image, os.O_RDONLY | os.O_CLOEXEC)
        try:
            device, loop_fd = loopdev.attach(
                fd,
                offset=plan.partition_offset,
                sizelimit=plan.partition_size,
                name=plan.image,
            )
        finally:
            if fd != self.image_fd:
                os.close(fd)
        try:
            sc.mount(device, lower, "squashfs", sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV)
        finally:
            # From now on the mount holds the device; when it goes, AUTOCLEAR detaches it.
            os.close(loop_fd)
        self.report["loop_device"] = device

    def _sandbox_dir(self) -> str:
        """The extract cache's dir for this image when the facts did not read its content
        digest (FUSE came first and failed): read it now, as the facts would have."""
        from rankwire.runtime.imagefacts import partition_digest

        plan = self.plan
        try:
            digest = partition_digest(
                plan.image,
                plan.partition_offset,
                plan.partition_size,
                plan.cache_dir,
                read_at=self.image_source,
            )
        except UserError as err:  # its tables are corrupt
            raise ImageError(str(err)) from None
        return sandbox_dir(plan.cache_dir, digest)

    def _extract(self) -> str:
        """Unpack the partition once into the cache (its dir is named by the partition's
        content digest) and reuse it. Unpacked into a temporary dir beside it, locked
        while we live, and renamed into place only when complete: a failed or killed
        extraction never leaves anything under the final name, and the next extraction
        removes the temporary dirs whose owner is gone."""
        from rankwire import lockdirs

        done = self.plan.extract_dir or self._sandbox_dir()
        self.report["extract_dir"] = done
        if os.path.isdir(done):
            return done
        parent, name = os.path.split(done)
        os.makedirs(parent, exist_ok=True)
        lockdirs.prune(parent, EXTRACTING, _remove_tree)
        tmp, lock = lockdirs.claim(parent, f"{EXTRACTING}{name}-")
        try:
            rootfs = os.path.join(tmp, "rootfs")
            proc = subprocess.run(
                [
                    "unsquashfs",
                    "-q",
                    "-n",
                    "-o",
                    str(self.plan.partition_offset),
                    "-d",
                    rootfs,
                    self.image_source,
                ],
                capture_output=True,
                text=True,
                pass_fds=self._pass_fds,
            )
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["unsquashfs failed"])[-1]
                last = last.removeprefix("FATAL ERROR: ").replace(rootfs, "")
                if "uncompress" in proc.stderr:  # the tables were read: file data is bad
                    raise ImageError(
                        f"{self.plan.image}: the image's squashfs partition is corrupt "
                        f"({last}): rebuild or re-pull it"
                    )
                raise SetupError(f"unsquashfs: {last}")
            with contextlib.suppress(OSError):  # another process won the race: use its copy
                os.rename(rootfs, done)
            return done
        finally:
            _remove_tree(tmp)
            os.close(lock)

    def _overlay(self, root: str, lowers: str, upper: str, work: str, userxattr: bool) -> None:
        """`userxattr`: the overlay's own xattrs in user.overlay.* (the kernel's
        trusted.* need privilege a user namespace lacks; without them a directory
        removed and made again would show the image's files): for changes that are kept
        or saved (`runtime/save.py` reads them)."""
        errors: list[str] = []
        opts = f"lowerdir={lowers},upperdir={upper},workdir={work}"
        if userxattr:
            self._unrepeatable()
        for driver in self.plan.overlay_drivers:
            if driver != "kernel" or errors:
                self._unrepeatable()
            try:
                if driver == "kernel":
                    kernel_opts = opts + (",userxattr" if userxattr else "")
                    sc.mount("overlay", root, "overlay", sc.MS_NOSUID | sc.MS_NODEV, kernel_opts)
                else:
                    self._spawn_fuse(["fuse-overlayfs", "-f", "-o", opts, root], root)
                self.report["overlay_driver"] = driver
                return
            except (SetupError, OSError) as err:
                errors.append(f"{driver}: {err}")
        raise SetupError("cannot set up the container root: " + "; ".join(errors))

    def _prepare_mountpoints(self, lower: str, upper: str) -> list[str]:
        """Resolve each target inside the image; create the missing ones in the upper layer.

        Creating them in the overlay's upper dir (our tmpfs) before the overlay exists
        needs no write access to the image's directories, whose owner (root) is not
        mapped in a uid-mapped namespace. A target below an earlier mount (a bind of the
        host home, say) is resolved at mount time and must already exist there.
        """
        targets: list[str] = []
        earlier: list[str] = []
        for m in self.plan.mounts:
            if any(m.target.startswith(t.rstrip("/") + "/") for t in earlier):
                self._unrepeatable()  # resolved when it is mounted: maybe in a host dir
                targets.append(m.target)
                earlier.append(m.target)
                continue
            rel = os.path.relpath(secure_path(lower, m.target), lower)
            if rel == "." or rel.startswith("../"):
                raise SetupError(f"cannot mount on {m.target}: it is the image root")
            want_dir = m.kind != "bind" or os.path.isdir(m.source)
            image_path = os.path.join(lower, rel)
            if os.path.lexists(image_path):
                if os.path.isdir(image_path) != want_dir:
                    kind = "directory" if want_dir else "file"
                    raise SetupError(
                        f"cannot mount a {kind} on {m.target}: the image has "
                        "another kind of file there"
                    )
            else:
                path = os.path.join(upper, rel)
                if want_dir:
                    os.makedirs(path, exist_ok=True)
                else:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    open(path, "a").close()
                self._note("mkdir" if want_dir else "touch", rel)
            targets.append("/" + rel)
            earlier.append(m.target)
        return targets

    def _apply(self, root: str, resolved: str, m: Mount, source: str, tree: Optional[int]) -> None:
        """Make mount `m` on `resolved` (its target inside the image); a bind is made from
        `source` (m.source, or what stands for its descriptor), or attaches `tree`."""
        target = secure_path(root, resolved)
        inside = target[len(root) :] or "/"
        # Resolved through (or below) a mount made before, not as in the image alone (an
        # image symlink led it there): in what that one brought in, a host dir maybe,
        # which may differ next time.
        below = inside != resolved or any(within(inside, t) and inside != t for t in self._mounted)
        self._mounted.append(inside)
        if (
            m.kind in ("bind", "tmpfs", "proc")
            and tree is None
            and not below
            and os.path.lexists(target)
        ):
            self._note("mount", m.kind)
            # a descriptor's: as given (rankwire-holder setup opens it again, as we did)
            noted = m.source if fd_source(m) is not None else source
            for key, value in (("source", noted), ("target", inside), ("options", m.options)):
                self._note(key, value)
            self._note("rec", "1" if m.recursive else "0")
            self._note("ro", "1" if m.readonly else "0")
        else:  # a mount point made below one of ours, a descriptor's tree, a /dev
            self._unrepeatable()
        if m.kind == "proc":  # a bind of our PID namespace's /proc, or of the host's
            source = self.proc_staging or "/proc"
            m = Mount("bind", m.target, source, recursive=self.proc_staging is None)
        hidden = hidden_by(m.source, inside) if inside != m.target else None
        if hidden is not None:  # a symlink in the image (or a bound tree) led it there
            raise SetupError(
                f"cannot mount {m.source or m.kind} on {m.target}: it leads to {inside}, "
                f"which would hide {hidden}: choose a DST that is not a symlink"
            )
        try:
            if m.kind == "bind" and not os.path.lexists(target):
                # Below one of our tmpfs mounts (--contain's /tmp, say) we may create it;
                # below a bind of a host directory we would write to the host: refuse.
                parents = [
                    p
                    for p in self.plan.mounts
                    if within(m.target, p.target) and m.target != p.target
                ]
                deepest = max(parents, key=lambda p: len(p.target), default=None)
                if deepest is None or deepest.kind not in ("tmpfs", "devtmpfs"):
                    raise SetupError(
                        f"cannot mount {m.source} on {m.target}: create "
                        f"{m.target} first (it lies inside another mount)"
                    )
                if os.path.isdir(m.source):
                    os.makedirs(target)
                else:
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    open(target, "a").close()
            if m.kind == "bind" and tree is not None:
                sc.move_mount(tree, target)
            elif m.kind == "bind":
                flags = sc.MS_BIND | (sc.MS_REC if m.recursive else 0)
                sc.mount(source, target, None, flags)
            if m.kind == "bind":
                if self.root_mode:
                    # Every mount below a recursive bind too; host device nodes stay
                    # usable where they are bound from /dev.
                    sc.restrict_mounts(
                        target,
                        nodev=not within(m.source, "/dev"),
                        readonly=m.readonly,
                        recursive=m.recursive,
                    )
                else:
                    sc.bind_remount(target, readonly=m.readonly)
            elif m.kind == "tmpfs":
                sc.mount("tmpfs", target, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, m.options or None)
            elif m.kind == "devtmpfs":
                self._minimal_dev(target, m.options.split(","), self.root_mode)
            else:
                raise SetupError(f"unknown mount kind {m.kind!r}")
        except OSError as err:
            raise SetupError(
                f"cannot mount {m.source or m.kind} on {m.target}: {err.strerror or err}"
            ) from None
        finally:
            if tree is not None:
                os.close(tree)

    @staticmethod
    def _minimal_dev(target: str, nodes: list[str], root_mode: bool) -> None:
        sc.mount("tmpfs", target, "tmpfs", sc.MS_NOSUID, "mode=0755")
        for name in nodes:
            path = os.path.join(target, name)
            open(path, "a").close()
            sc.mount(f"/dev/{name}", path, None, sc.MS_BIND)
            if root_mode:
                sc.restrict_mounts(path, nodev=False, readonly=False, recursive=False)
        for sub, kind in (("shm", "tmpfs"), ("pts", "bind"), ("mqueue", None)):
            os.mkdir(os.path.join(target, sub))
            if kind == "tmpfs":
                sc.mount(
                    "tmpfs",
                    os.path.join(target, sub),
                    "tmpfs",
                    sc.MS_NOSUID | sc.MS_NODEV,
                    "mode=1777",
                )
            elif kind == "bind":
                sc.mount("/dev/pts", os.path.join(target, sub), None, sc.MS_BIND | sc.MS_REC)
                if root_mode:
                    sc.restrict_mounts(
                        os.path.join(target, sub), nodev=False, readonly=False, recursive=True
                    )
        for link, dest in (
            ("ptmx", "pts/ptmx"),
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ):
            os.symlink(dest, os.path.join(target, link))

    # -- hand-over -----------------------------------------------------------------
    def server_args(self, status_fd: int, said: str, serve: bool) -> list[str]:
        """`rankwire-holder`'s arguments (runtime/holdserve.c, which serves and tears down
        in our place): what we hold, by descriptor and pid. The descriptors it names, and
        the locks it keeps without naming them, become inheritable; the rest close."""
        args = [f"mode={self.mode}", f"said={said}"] + (["serve=1"] if serve else [])
        fds: dict[str, int] = {"status": status_fd}
        if self.listener is not None:
            fds["listener"] = self.listener.fileno()
        if self.bound:  # the socket first (see holdserve.c `teardown`), then its plans
            fds["dir"] = self.sock_dir_fd
            names = (self.sock_path, plan_path(self.sock_path), self.step_file)
            args += [f"unlink={os.path.basename(path)}" for path in names if path]
        if self.session_parent_fd >= 0:
            fds["session_dir"] = self.session_parent_fd
            args.append(f"session={self.session}")
        fds.update(upper=self.upper_fd, init_life=self.init_life)
        if self.watcher_conn is not None:
            fds["watcher_conn"] = self.watcher_conn.fileno()
        for key, fd in fds.items():
            if fd >= 0:
                args.append(f"{key}={fd}")
        args += [f"ns={fd}" for fd in self.ns_fds]
        pids = {"owner": self.owner, "init": self.init, "watcher": self.watcher}
        args += [f"{key}={pid}" for key, pid in pids.items() if pid is not None]
        args += [f"daemon={proc.pid}" for proc in self.daemons]
        kept = [*fds.values(), *self.ns_fds, self.session_lock, self.overlay_lock]
        for fd in kept:
            if fd >= 0:
                os.set_inheritable(fd, True)
        return args


def _readable_root(lower: str) -> None:
    """A FUSE driver mounts a partition whose root directory it cannot read (a corrupt
    table): fail it here, so the next driver (extraction) checks the tables and says."""
    try:
        os.listdir(lower)
    except OSError as err:
        raise SetupError(f"cannot read the image's root directory: {err.strerror}") from None


def _die_with_holder() -> None:
    """In a FUSE daemon before exec: end (and unmount) when the holder ends, even by
    SIGKILL, instead of staying behind holding the image open; live through the signals
    Slurm sends every process of a step (scancel's SIGTERM, `--signal=USR1@60`): those are
    for the commands, and the container must stand while they act on them. libfuse ends on
    SIGHUP, SIGINT and SIGTERM, unless ignored: SIGHUP is the one left (the parent-death
    signal, and rankwire-holder's in its teardown)."""
    theirs = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
    for sig in (*theirs, signal.SIGALRM):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # a starter's mask: not here
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGHUP)


def prune_after(holder: int, sock: str, session: str) -> None:
    """Once the dead holder has fully exited (its descriptors closed, its session lock
    released: we are reparented then), remove its files (`instance.prune_holder`)."""
    from rankwire.runtime.instance import prune_holder

    deadline = time.monotonic() + 2.0
    while os.getppid() == holder and time.monotonic() < deadline:
        time.sleep(0.01)
    prune_holder(sock, session)


def _stop_setup(signum: int, _frame: object) -> None:
    """SIGTERM during setup: stop it; the teardown follows, not to be cut short by
    another SIGTERM (rankwire-holder takes any that comes later)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    raise SystemExit(0)


def run_holder(req: dict[str, Any], status_fd: int, *, new_session: bool) -> NoReturn:
    """Body of a freshly forked holder; never returns.

    Keeps no descriptor of its parent's but `status_fd`, the image's (`req["image_fd"]`)
    and those for binds (`req["keep_fds"]`): a caller's stdout pipe or PMI socket must not
    be held open by a long-lived holder. Sets the container up, then execs
    `rankwire-holder` (runtime/holdserve.c) in its place, which reports the outcome on
    `status_fd` as one JSON line and serves until it tears down; after a failed setup,
    it only tears down, then reports.
    """
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's ^C is for the ranks
        signal.signal(signal.SIGTERM, _stop_setup)
        for sig in (signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        sc.set_comm("rankwire-holder")
        if new_session:
            os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        close_fds_except(
            {status_fd, devnull, req.get("image_fd", devnull), *req.get("keep_fds", ())}
        )
        os.close(devnull)
        # Forked by the plugin's non-dumpable start phase, we would not own our /proc files
        # (uid_map, setgroups); a holder's user owns its container in any case. Only now:
        # our user may then read and trace us, and nothing of our parent's is open.
        sc.prctl(sc.PR_SET_DUMPABLE, 1)
        # Opened while the host's files are in view: we exec it from inside the container.
        try:
            server = os.open(SERVER, os.O_RDONLY | os.O_CLOEXEC)
            if not os.access(SERVER, os.X_OK):
                raise PermissionError(errno.EACCES, "not executable")
        except OSError as err:
            raise SetupError(
                f"{SERVER}: {err.strerror}: reinstall rankwire (its install builds this "
                "program; in a checkout: make)"
            ) from None
        holder = Holder(req, server)
    except BaseException as err:  # nothing to undo yet
        _fail(
            status_fd,
            f"cannot start the holder: {'stopped' if isinstance(err, SystemExit) else err}",
        )
    said, serve = _set_up(holder)  # SIGTERM is blocked from here on
    try:
        if holder.recipe is not None and serve:  # first, when asked: `start_holder` reads it
            os.write(status_fd, json.dumps({"recipe": holder.recipe}).encode() + b"\n")
        args = holder.server_args(status_fd, said, serve)
        os.execve(server, ["rankwire-holder", *args], holder.environ)
    except BaseException as err:
        _fail(status_fd, f"cannot run {SERVER}: {err}")


def _fail(status_fd: int, error: str) -> NoReturn:
    """Report `error` to the starter and exit, never returning into the caller's code."""
    with contextlib.suppress(BaseException):
        os.write(status_fd, json.dumps({"ok": False, "error": error}).encode() + b"\n")
    os._exit(1)


def _set_up(holder: Holder) -> tuple[str, bool]:
    """Set the container up: (the line to report, whether to serve). Returns with SIGTERM
    blocked: one that comes later waits for rankwire-holder, which tears down then; one
    that came during the setup (`_stop_setup`), or anything unforeseen, ends in the
    teardown of what was set up."""
    try:
        try:
            holder.setup()
            said, serve = json.dumps(holder.report), True
        except (SetupError, OSError) as err:
            failure = {
                "ok": False,
                "error": str(err),
                "taken": getattr(err, "taken", False),
                "whole": isinstance(err, (ImageError, OverlayError)),
            }
            said, serve = json.dumps(failure), False
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        return said, serve
    except BaseException as err:  # SystemExit: `_stop_setup`
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        why = "stopped during setup" if isinstance(err, SystemExit) else f"setup failed: {err!r}"
        return json.dumps({"ok": False, "error": why, "taken": False, "whole": False}), False
