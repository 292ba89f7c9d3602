"""Client side of the holder: start one, join it, run a process inside, list/stop instances.

One container per node, shared: a holder owns the namespaces and the image mount; every
process that joins (`setns` into its user, PID and mount namespaces) sees the same mounts
and the same PIDs, so shared memory and CMA between ranks work, and ends with the
container. Joining is a connection to the holder's socket:
the namespace fds come over SCM_RIGHTS (no PID reuse race) and the open connection is the
lease that keeps an ephemeral holder alive.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import json
import os
import select
import signal
import socket
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, Optional

from rankwire.errors import UserError, exec_failure, shown, workdir_failure
from rankwire.fds import close_fds_except
from rankwire.runtime import frame
from rankwire.runtime import syscalls as sc
from rankwire.runtime.joinplan import (
    SERVER,
    plan_path,
    prune_step_plan,
    started_environ,
    step_file,
)
from rankwire.runtime.peercred import peer_creds
from rankwire.runtime.plan import ContainerPlan, ProcessPlan, check_name

FORWARDED_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)

# Sent to us when our parent, slurmstepd, dies (PR_SET_PDEATHSIG): see `end_with_slurmstepd`.
STEPD_GONE = signal.SIGRTMIN + 2


def parent_is_slurmstepd(parent: int) -> bool:
    try:
        return Path(f"/proc/{parent}/comm").read_text().strip() == "slurmstepd"
    except OSError:
        return False


def end_with_slurmstepd() -> None:
    """When our parent is slurmstepd (a task of a step): end, through our normal
    teardown, if it dies (SIGKILL leaves Slurm no chance to kill the step), as if
    signalled with SIGTERM (forwarded to what runs in the container; the lease ends, and
    with it the container). Not for other parents: a shell's `rankwire exec ... &` may
    outlive it (nohup), and a dying terminal sends SIGHUP anyway.

    The parent-death signal comes when the *thread* that forked us ends: the handler
    acts only once we have really been orphaned (our parent pid changed)."""
    parent = os.getppid()
    if not parent_is_slurmstepd(parent):
        return

    def gone(_sig: int, _frame: object) -> None:
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(STEPD_GONE, gone)
    sc.prctl(sc.PR_SET_PDEATHSIG, STEPD_GONE)
    gone(STEPD_GONE, None)  # it died before the prctl


RUNTIME_DIR_VAR = "RANKWIRE_RUNTIME_DIR"  # set by the SPANK helper: a dir root made


def _private_dir(base: Path, uid: int, make: bool = True) -> bool:
    """Make `base` (0700) if it is missing (and `make`); True if it is ours and private."""
    try:
        if make:
            base.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(base)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == uid and not st.st_mode & 0o077


def runtime_dir(say: bool = True) -> Path:
    """A private per-user directory for sockets and session mount points.

    $RANKWIRE_RUNTIME_DIR (the plugin's, made by root), else $XDG_RUNTIME_DIR/rankwire,
    else /tmp/rankwire-UID. Another user can make that last one first (sticky /tmp keeps
    us from removing it): then ~/.cache/rankwire/run, said once on stderr (if `say`).
    """
    uid = os.getuid()
    base = _runtime_base(uid, make=True, say=say)
    if not _private_dir(base, uid):
        raise UserError(f"{base} is not a private directory owned by you: remove it")
    try:
        (base / "instances").mkdir(mode=0o700, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create runtime dir {base}: {err.strerror}") from None
    return base


def existing_runtime_dir() -> Optional[Path]:
    """The runtime dir `runtime_dir` gives, if an earlier start made it (None: none is
    there yet, or it is not private): nothing is made, nothing said."""
    uid = os.getuid()
    base = _runtime_base(uid, make=False, say=False)
    return base if _private_dir(base, uid, make=False) else None


def _runtime_base(uid: int, make: bool, say: bool) -> Path:
    forced = os.environ.get(RUNTIME_DIR_VAR)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if forced:
        return Path(forced)
    if xdg and os.access(xdg, os.W_OK):
        return Path(xdg) / "rankwire"
    base = Path(os.environ.get("TMPDIR", "/tmp")) / f"rankwire-{uid}"
    if _private_dir(base, uid, make):
        return base
    home = os.environ.get("HOME") or os.path.expanduser("~")
    fallback = Path(home) / ".cache" / "rankwire" / "run"
    if say and not _fallback_said.get(str(base)):
        print(
            f"rankwire: {base} is not a private directory of yours (another user "
            f"made it?); using {fallback}",
            file=sys.stderr,
        )
        _fallback_said[str(base)] = True
    return fallback


_fallback_said: dict[str, bool] = {}


class NameTaken(UserError):
    """Another holder already serves that name (the holder's `SetupError(taken=True)`)."""


@dataclasses.dataclass
class HolderHandle:
    """A running holder (`runtime/holder.py`) as its starter sees it."""

    socket: str
    pid: int
    report: dict[str, Any]
    is_child: bool  # ephemeral holders are our children and must be reaped by us
    session: str = ""
    # What the holder did, for the C front end's exec plan (`start_holder(recipe=True)`)
    recipe: Optional[list[tuple[str, str]]] = None

    def wait(self, timeout: float = 10.0) -> None:
        """Reap the holder (ephemeral mode: it exits when our last lease closes) and
        remove what it left if it was killed."""
        if not self.is_child:
            return
        fd = os.pidfd_open(self.pid)
        try:
            if not select.select([fd], [], [], timeout)[0]:
                os.kill(self.pid, signal.SIGKILL)
        finally:
            os.close(fd)
        os.waitpid(self.pid, 0)
        prune_holder(self.socket, self.session)


def _holder_child(req: dict[str, Any], status_fd: int, detached: bool) -> NoReturn:
    """The forked holder: its module is imported here, not before the fork (≈ 12 ms of
    the launcher's start that the caller's own work now overlaps)."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's ^C is for the ranks
        from rankwire.runtime.holder import run_holder
    except BaseException as err:  # never unwind into the caller's code: we are a fork
        with contextlib.suppress(BaseException):
            os.write(2, f"rankwire: cannot start the container's holder: {err!r}\n".encode())
        os._exit(1)
    run_holder(req, status_fd, new_session=detached)


def _setup_child(req: dict[str, Any], kept: int, status_fd: int, detached: bool) -> NoReturn:
    """The forked holder of a kept recipe (open on `kept`): `rankwire-holder setup`
    (runtime/holdserve.c) makes its steps, with the descriptors the holder keeps."""
    try:
        if detached:
            os.setsid()
        keep = [*([req["image_fd"]] if "image_fd" in req else []), *req.get("keep_fds", ())]
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # the plugin's start phase replies to the shim on its stdout
            os.dup2(devnull, fd)
        close_fds_except({kept, status_fd, *keep})
        for fd in (kept, status_fd, *keep):
            os.set_inheritable(fd, True)
        # As holder.py's `run_holder`: the plugin's start phase is not dumpable (its user
        # could take its reply socket else), its /proc files (environ) not ours; we are
        # its user's from now on, with nothing of its open but these.
        sc.prctl(sc.PR_SET_DUMPABLE, 1)
        args = [f"plan={kept}", f"status={status_fd}", f"owner={req['owner']}"]
        args += [f"socket={req['socket']}", f"session={req['session']}", f"mode={req['mode']}"]
        argv = [SERVER, "setup", *args, *(f"keep={fd}" for fd in keep)]
        os.execve(SERVER, argv, started_environ())
    except BaseException as err:  # never unwind into the caller's code: we are a fork
        with contextlib.suppress(BaseException):  # as holder.py's `_fail`
            error = f"cannot run {SERVER}: {err}"
            os.write(status_fd, json.dumps({"ok": False, "error": error}).encode() + b"\n")
    os._exit(1)


def start_holder(
    plan: ContainerPlan,
    *,
    mode: str,
    owner: Optional[int],
    name: Optional[str] = None,
    meta: Optional[dict[str, Any]] = None,
    register: bool = True,
    image_fd: Optional[int] = None,
    keep_fds: Sequence[int] = (),
    setup_timeout: Optional[float] = None,
    step: Optional[str] = None,
    recipe: bool = False,
    kept: Optional[int] = None,
    meanwhile: Optional[Callable[[], None]] = None,
) -> HolderHandle:
    """Fork a holder for `plan` and wait until it is ready (or say why it is not).

    `name`: serve at instances/NAME.sock; `register`: also list it in `instance list`;
    `image_fd`: mount the image open on this descriptor instead of `plan.image`;
    `keep_fds`: descriptors the holder keeps (under the same numbers) until its mounts are
    made, for binds whose source is /proc/self/fd/N; `step`: the step plan's file
    (instances/STEP) that goes with the holder; `recipe`: ask the holder what it did, as
    `rankwire-holder setup` can do it again (`HolderHandle.recipe`, None if it cannot);
    `kept`: such a recipe, open (`joinplan.kept_holder`): `rankwire-holder setup` makes
    its steps instead of the Python holder (an owner's, ephemeral or shared, unnamed);
    `meanwhile`: called once the holder is forked, before waiting for it (it must not
    raise: see `open_container`).
    """
    base = runtime_dir()
    prune_stale(base)
    token = os.urandom(6).hex()
    if name is not None:
        check_name(name, f"bad instance name '{name}'")
        sock = base / "instances" / f"{name}.sock"
        if register and sock.exists():
            if _ping(str(sock)) is not None:
                raise UserError(
                    f"instance '{name}' is already running: `rankwire instance stop {name}` first"
                )
            sock.unlink()
    else:
        sock = base / f"e-{token}.sock"
    req: dict[str, Any] = {
        "plan": plan.to_dict(),
        "socket": str(sock),
        "session": str(base / f"s-{token}"),
        "mode": mode,
        "owner": owner,
    }
    if step is not None:
        req["step_file"] = str(base / "instances" / step)
    if image_fd is not None:
        req["image_fd"] = image_fd
    if keep_fds:
        if min(keep_fds) < 3:
            raise ValueError(f"keep_fds {list(keep_fds)}: 0, 1, 2 are /dev/null in the holder")
        req["keep_fds"] = list(keep_fds)
    if recipe:
        req["recipe"] = True
    detached = mode != "ephemeral"  # outlives us: own session, reaped by init
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        if kept is not None:
            _setup_child(req, kept, write_end, detached)
        _holder_child(req, write_end, detached)
    os.close(write_end)
    if meanwhile is not None:
        meanwhile()
    with os.fdopen(read_end, "rb") as status:
        if setup_timeout is not None and not select.select([status], [], [], setup_timeout)[0]:
            os.kill(pid, signal.SIGKILL)  # stopped or stuck: ours to end
            os.waitpid(pid, 0)
            raise UserError(
                f"cannot start container from {plan.image}: the holder did not finish its "
                f"setup within {setup_timeout:g} s"
            )
        line = status.readline()
        steps = None
        if recipe and line.startswith(b'{"recipe": '):
            with contextlib.suppress(ValueError, TypeError):
                steps = [(str(k), str(v)) for k, v in json.loads(line)["recipe"]]
            line = status.readline()
    try:
        report = json.loads(line) if line else {"ok": False, "error": "the holder died"}
    except ValueError:
        report = {"ok": False, "error": f"the holder said {line[:200]!r}"}
    if not report.get("ok"):
        os.waitpid(pid, 0)
        if report.get("taken"):
            raise NameTaken(str(report["error"]))
        if report.get("whole"):  # the image is broken: the message names it
            raise UserError(str(report["error"]))
        raise UserError(f"cannot start container from {plan.image}: {report['error']}")
    if name is not None and register:
        info = {
            "name": name,
            "pid": pid,
            "image": plan.image,
            "socket": str(sock),
            "report": report,
            "meta": meta or {},
        }
        (base / "instances" / f"{name}.json").write_text(json.dumps(info))
    # A detached holder has its own session; init reaps it once we have exited.
    return HolderHandle(
        str(sock), pid, report, is_child=not detached, session=req["session"], recipe=steps
    )


def prune_stale(base: Path) -> None:
    """Remove what holders and PMI bridge servers killed by SIGKILL left: unlocked session
    dirs, dead sockets (ephemeral `e-*.sock`, named `instances/*.sock`, the bridges'
    `pmibridge.*` and `pmi2bridge.*`)."""
    for session in base.glob("s-*"):
        prune_session(session)
    bridges = [*base.glob("pmibridge.*"), *base.glob("pmi2bridge.*")]
    for sock in [*base.glob("e-*.sock"), *(base / "instances").glob("*.sock"), *bridges]:
        if not sock.name.startswith("t-"):  # a holder's name before it listens
            unlink_if_dead(sock)
    for plan in (base / "instances").glob("*.plan"):  # the C front end's, of a gone socket
        if plan.name.startswith("step-"):
            prune_step_plan(plan)
        elif not os.path.lexists(plan.with_suffix(".sock")):
            plan.unlink(missing_ok=True)


def prune_session(session: Path) -> None:
    """Remove `session` if no holder holds its lock (a holder locks it before it takes
    the name and keeps the lock until it exits, even by SIGKILL)."""
    try:
        fd = os.open(session, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return  # a live holder holds it
    else:
        with contextlib.suppress(OSError):
            session.rmdir()
    finally:
        os.close(fd)


def unlink_if_dead(sock: Path) -> None:
    """Unlink the socket `sock` if nobody listens on it. A holder's socket takes its name
    only once it listens (`Holder.setup`), so a refused connect means a dead holder; the
    directory's lock, which a holder also takes to link its socket into place, keeps a
    new holder's socket from taking the name between our connect and our unlink."""
    try:
        dir_fd = os.open(sock.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        probe.setblocking(False)  # a live holder's full backlog: EAGAIN, not a wait
        probe.connect(str(sock))
    except ConnectionRefusedError:
        for name in (os.path.basename(plan_path(str(sock))), sock.name):  # and its join plan
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass
    finally:
        probe.close()
        os.close(dir_fd)  # and with it the lock


def listen_at(path: str) -> socket.socket:
    """A Unix socket listening at `path`, which takes the name only once it listens (so a
    prune never takes it for dead), over a dead socket of that name: linked into place
    under the directory's lock, as a holder's is (`unlink_if_dead`). OSError (EADDRINUSE
    when a live socket has the name) if it cannot."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    tmp = os.path.join(os.path.dirname(path), f"t-{os.getpid()}-{os.path.basename(path)}")
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        sock.bind(tmp)
        sock.listen(socket.SOMAXCONN)
        unlink_if_dead(Path(path))
        dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)
            os.link(tmp, path)
        except FileExistsError:
            raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE)) from None
        finally:
            os.close(dir_fd)  # and with it the lock
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return sock
    except OSError:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def prune_reported(report: str) -> None:
    """`prune_holder` for the holder whose join reply (JSON) was `report`: the C front
    end's lease found it gone."""
    with contextlib.suppress(ValueError, KeyError, TypeError):
        said = json.loads(report)
        prune_holder(str(said["socket"]), str(said["session"]))


def prune_holder(sock: str, session: str) -> None:
    """After a holder of ours ended (SIGKILL leaves it no teardown): its socket and
    session dir, if it left them."""
    unlink_if_dead(Path(sock))
    prune_session(Path(session))


@dataclasses.dataclass
class Lease:
    conn: socket.socket
    userns_fd: int
    mntns_fd: int
    report: dict[str, Any]
    pidns_fd: Optional[int] = None  # the container's PID namespace, if it has one

    def close(self, timeout: float = 10.0) -> None:
        """Leave; if we were the last lease, wait until the holder has cleaned up (and so
        every process of its PID namespace has ended). Once; then a no-op."""
        if self.conn.fileno() < 0:
            return
        for fd in self.ns_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        said = b""
        try:
            self.conn.settimeout(timeout)
            self.conn.sendall(b"leave\n")
            said = self.conn.recv(64)
        except OSError:
            pass
        self.conn.close()
        try:
            last = frame.one(frame.decode(said), "last") == "1"
        except frame.FrameError:
            last = False
        pid = self.report.get("pid")
        if (last or not said) and pid and _wait_exit(int(pid), timeout) and not said:
            # No answer: the holder died (SIGKILL) without its teardown; its files are
            # ours to remove (each only if no holder uses it, see `prune_holder`).
            sock, session = self.report.get("socket"), self.report.get("session")
            if sock and session:
                prune_holder(str(sock), str(session))

    @property
    def ns_fds(self) -> list[int]:
        pidns = [] if self.pidns_fd is None else [self.pidns_fd]
        return [self.userns_fd, self.mntns_fd, *pidns]


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait (without reaping) until `pid` has exited; False on timeout."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


class NotTheHolder(OSError):
    """`_join(..., holder=PID)`: another process listens at the socket (`answered_by`)."""

    def __init__(self, answered_by: int) -> None:
        super().__init__(errno.EPERM, f"answered by pid {answered_by}")
        self.answered_by = answered_by


def _join(sock_path: str, timeout: Optional[float] = None, holder: Optional[int] = None) -> Lease:
    """Connect and take a lease; OSError when nobody serves `sock_path` (any more), or
    nobody answers within `timeout` seconds. With `holder`, the process listening must be
    that pid, checked before `join` is sent (NotTheHolder): a socket swapped for another
    listener is refused at once, not after `timeout` of its silence."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(timeout)
        conn.connect(sock_path)
        if holder is not None and (peer := peer_creds(conn)[0]) != holder:
            raise NotTheHolder(peer)
        conn.sendall(b"join\n")
        msg, fds, _, _ = socket.recv_fds(conn, 4096, 3)
        conn.settimeout(None)
    except socket.timeout:
        conn.close()
        raise TimeoutError(errno.ETIMEDOUT, f"no answer within {timeout:g} s") from None
    except OSError:
        conn.close()
        raise
    if len(fds) not in (2, 3):
        for fd in fds:
            os.close(fd)
        conn.close()
        raise ConnectionResetError(errno.ECONNRESET, "the container is shutting down")
    pidns = fds[2] if len(fds) == 3 else None
    return Lease(conn, fds[0], fds[1], json.loads(msg.decode().strip() or "{}"), pidns)


def join(sock_path: str, timeout: Optional[float] = None, holder: Optional[int] = None) -> Lease:
    """`_join`, its failures as one UserError line (NotTheHolder as it is: the caller says
    what a replaced socket means)."""
    try:
        return _join(sock_path, timeout, holder)
    except NotTheHolder:
        raise
    except OSError as err:
        raise UserError(
            f"cannot join the container at {sock_path}: {err.strerror or err}; "
            "is the instance still running?"
        ) from None


def join_or_start(container: ContainerPlan, key: str) -> Lease:
    """The node's shared container named `key`: join it, or start it if nobody has.

    Every rank of a node calls this at about the same time; binding the socket is the
    atomic claim, so exactly one starts the holder and the others join it (those that
    come during its setup wait in the listen backlog).
    """
    sock = runtime_dir() / "instances" / f"{key}.sock"
    for _ in range(20):
        try:
            return _join(str(sock))
        except ConnectionRefusedError:  # a stale socket of a holder that was killed
            unlink_if_dead(sock)
        except (FileNotFoundError, ConnectionResetError):
            pass
        try:
            start_holder(
                container,
                mode="shared",
                owner=None,
                name=key,
                register=False,
                step=step_file(os.environ),
            )
        except NameTaken:
            continue  # another rank won the race: join its holder
    raise UserError(
        f"could not start or join the shared container '{key}': remove {sock} if no job uses it"
    )


@contextlib.contextmanager
def leased(sock_path: str) -> Iterator[Lease]:
    lease = join(sock_path)
    try:
        yield lease
    finally:
        lease.close()


def _say(errors: Optional[tuple[int, str]], message: str) -> None:
    """Why the process could not start: `rankwire: <message>` on stderr, or
    `<tag>\t<message>\n` on `errors` (fd, tag) for the caller to aggregate (one write of
    at most PIPE_BUF bytes: never interleaved with another child's)."""
    with contextlib.suppress(OSError):  # nowhere to say it: the exit code still does
        if errors is None:
            os.write(2, f"rankwire: {message}\n".encode())
        else:
            line = f"{errors[1]}\t{message}".encode()[: select.PIPE_BUF - 1]
            os.write(errors[0], line + b"\n")


def _child(
    proc: ProcessPlan,
    inherit: Sequence[int],
    stdio: Optional[Sequence[int]],
    parent: int,
    errors: Optional[tuple[int, str]] = None,
) -> NoReturn:
    """After fork, on this host: wire fds, exec. Errors exit 125/126/127, saying why
    (`_say`)."""
    where = "on this host"
    try:
        # If rankwire itself is killed (SIGKILL leaves it no chance to forward signals),
        # the command goes too: no rank outlives its launcher.
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(125)
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        # Python ignores these for itself; the command gets them as a shell would give
        # them (`yes | head` ends quietly, by SIGPIPE)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        if stdio is not None:
            for target, fd in enumerate(stdio):
                if fd != target:
                    os.dup2(fd, target)
        for fd in inherit:
            os.set_inheritable(fd, True)
        try:
            os.chdir(proc.workdir)
        except OSError as err:
            _say(errors, workdir_failure(proc.workdir, err, where))
            os._exit(125)
        if proc.no_new_privs:
            sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
        try:
            os.execvpe(proc.argv[0], list(proc.argv), proc.env)
        except OSError as err:
            code, message = exec_failure(proc.argv[0], err, where)
            _say(errors, message)
            os._exit(code)
    except BaseException as err:  # never return into the parent's code
        _say(errors, f"cannot start {shown(proc.argv[0])} {where}: {shown(err)}")
    os._exit(125)


def start_in(
    lease: Optional[Lease],
    proc: ProcessPlan,
    *,
    inherit: Sequence[int] = (),
    stdio: Optional[Sequence[int]] = None,
    errors: Optional[tuple[int, str]] = None,
) -> Callable[[], int]:
    """Start a process that enters the container (`lease`; None: stay on the host) and
    execs `proc`; returns the call that gives its pid (call it once). A launcher starts all
    its ranks, then asks for their pids, so that their ways into the container overlap
    instead of taking turns.

    Inherited file descriptors (a launcher's PMI_FD, the terminal) stay open; `inherit`
    names close-on-exec ones to hand over under the same number; `stdio` replaces
    fds 0, 1, 2. `errors` (fd, tag): why the process could not start goes there as
    `<tag>\t<message>\n` (the launcher prints one line for all its ranks) instead of
    `rankwire: <message>` to its stderr.

    Into a container, the front end's `__enter` (`runtime/front.c`), posix_spawned (no
    copy of this process, whose pages a fork would have each rank's start copy and
    fault): it enters the lease's namespaces and, with a PID namespace, forks the process
    that execs as our child (`CLONE_PARENT`), whose pid it reports; if it fails before, it
    reports nothing and its own exit code (125) is the process's. On this host, a fork."""
    parent = os.getpid()
    if lease is None:
        child = os.fork()
        if child == 0:
            _child(proc, inherit, stdio, parent, errors)
        return lambda: child
    report_r, report_w = os.pipe() if lease.pidns_fd is not None else (-1, -1)
    given = (lease.userns_fd, lease.mntns_fd, *inherit, lease.pidns_fd, report_w)
    passed = [fd for fd in (*given, errors[0] if errors else None) if fd is not None and fd >= 0]
    actions = [
        (os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(stdio or ()) if fd != target
    ]
    env = [f"{k}={v}" for k, v in proc.env.items()]
    front = front_end()
    argv = [
        front,
        "__enter",
        str(parent),
        str(lease.userns_fd),
        str(lease.mntns_fd),
        str(-1 if lease.pidns_fd is None else lease.pidns_fd),
        str(report_w),
        str(errors[0] if errors else -1),
        errors[1] if errors else "",
        proc.workdir,
        "1" if proc.no_new_privs else "0",
        str(len(env)),
        *env,
        "--",
        *proc.argv,
    ]
    try:
        # Kept across the front end's exec (this process has no other thread to race), as
        # posix_spawn's dup2 of an fd onto itself would only from glibc 2.29 on.
        for fd in passed:
            os.set_inheritable(fd, True)
        # Our environment, not the command's: the host's loader must not read the
        # container's LD_PRELOAD or LD_LIBRARY_PATH (the front end passes it on).
        child = os.posix_spawn(front, argv, os.environ, file_actions=actions, setsigmask=())
    except (OSError, ValueError) as err:
        if report_r >= 0:
            os.close(report_r)
        if isinstance(err, OSError) and err.errno in (errno.ENOENT, errno.EACCES, errno.ENOEXEC):
            why = f"cannot run rankwire's front end {front} ({err.strerror}); reinstall rankwire"
        else:
            why = shown(err.strerror if isinstance(err, OSError) else err)
        raise UserError(f"cannot start {shown(proc.argv[0])} in the container: {why}") from None
    finally:
        for fd in passed:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)
        if report_w >= 0:
            os.close(report_w)
    if report_r < 0:
        return lambda: child

    def pid() -> int:
        try:
            said = os.read(report_r, 32)
        finally:
            os.close(report_r)
        if not said:
            return child
        os.waitpid(child, 0)
        return int(said)

    return pid


@functools.cache  # once per process, not once per rank
def front_end() -> str:
    """The C front end (`runtime/front.c`, the `rankwire` command), through which every
    process `start_in` puts into a container enters it, and the command of a launch
    delegated to srun: installed beside the interpreter (a venv, pipx, uv tool), else in
    the scripts dir of its default scheme or its user's (`pip install .` as root:
    /usr/local/bin; `--user`: ~/.local/bin). Found nowhere: the path beside the
    interpreter, whose start then fails and says so."""
    beside = os.path.join(os.path.dirname(sys.executable), "rankwire")
    if os.access(beside, os.X_OK):
        return beside
    import sysconfig

    for scripts in (
        sysconfig.get_path("scripts"),
        sysconfig.get_path("scripts", f"{os.name}_user"),
    ):
        path = os.path.join(scripts, "rankwire")
        if os.access(path, os.X_OK):
            return path
    return beside


def exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def run_in(lease: Lease, proc: ProcessPlan) -> int:
    """Run `proc` inside, forwarding signals; return its exit code (128+N for signal N)."""
    pid = start_in(lease, proc)()
    pidfd = os.pidfd_open(pid)  # names this process, even once its pid is reused

    def forward(sig: int, _frame: object) -> None:
        # Under srun, scancel signals the process and us at once: it may be gone already.
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, sig)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(pidfd)
    return exit_code(status)


def _ping(sock_path: str, cmd: bytes = b"info\n") -> Optional[dict[str, Any]]:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(5)
    try:
        conn.connect(sock_path)
        conn.sendall(cmd)
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        return json.loads(data) if data else None
    except (OSError, ValueError):
        return None
    finally:
        conn.close()


def instance_socket(name: str) -> str:
    sock = runtime_dir() / "instances" / f"{name}.sock"
    if not sock.exists():
        raise UserError(f"no instance named '{name}': see `rankwire instance list`")
    return str(sock)


def instance_info(name: str) -> dict[str, Any]:
    path = runtime_dir() / "instances" / f"{name}.json"
    try:
        info: dict[str, Any] = json.loads(path.read_text())
        return info
    except (OSError, ValueError):
        raise UserError(f"no instance named '{name}': see `rankwire instance list`") from None


def list_instances() -> list[dict[str, Any]]:
    """Running instances; entries whose holder is gone are removed."""
    out = []
    for info_path in sorted((runtime_dir() / "instances").glob("*.json")):
        try:
            info = json.loads(info_path.read_text())
        except (OSError, ValueError):
            continue
        live = _ping(info["socket"])
        if live is None:
            info_path.unlink(missing_ok=True)
            Path(plan_path(info["socket"])).unlink(missing_ok=True)
            Path(info["socket"]).unlink(missing_ok=True)
            continue
        info["leases"] = live.get("leases", 0)
        out.append(info)
    return out


def save_instance(name: str, out: str) -> None:
    """`instance stop NAME --save OUT.sif`: pack the running instance (started with
    --writable-overlay: its changes are kept apart from its mount points)."""
    from rankwire.runtime.save import check_target, save, upper_fd

    info = instance_info(name)
    facts = info.get("meta", {}).get("image_facts", {})
    check_target(out)
    try:
        upper = upper_fd(info["socket"], info.get("meta", {}).get("overlay_dir", ""))
    except UserError:
        raise UserError(
            f"instance {name} keeps no changes apart: start it with --writable-overlay DIR "
            "to save it"
        ) from None
    try:
        save(info["image"], int(facts.get("partition_offset", 0)), upper, out)
    finally:
        os.close(upper)


def stop_holder(sock_path: str, timeout: float = 10.0) -> None:
    """Stop the holder serving `sock_path` (of any mode: the plugin's named containers
    are persistent) and wait for its exit, SIGKILL after `timeout`; what a killed one
    left is pruned."""
    info = _ping(sock_path, b"stop\n")
    if info is None:
        unlink_if_dead(Path(sock_path))
        return
    pid = int(info.get("pid") or 0)
    if pid > 0 and not _wait_exit(pid, timeout):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_exit(pid, 2.0)
    prune_holder(sock_path, str(info.get("session") or ""))


def stop_instance(name: str, timeout: float = 10.0) -> None:
    info = instance_info(name)
    _ping(info["socket"], b"stop\n")
    pid = info["pid"]
    with contextlib.suppress(ProcessLookupError):
        fd = os.pidfd_open(pid)
        try:
            if not select.select([fd], [], [], timeout)[0]:
                os.kill(pid, signal.SIGKILL)
        finally:
            os.close(fd)
    (runtime_dir() / "instances" / f"{name}.json").unlink(missing_ok=True)


@contextlib.contextmanager
def open_container(
    container: ContainerPlan,
    started: Optional[Callable[[HolderHandle], None]] = None,
    meanwhile: Optional[Callable[[], None]] = None,
) -> Iterator[Lease]:
    """A lease on the container of `container`: the node's shared one (joined or started)
    or an ephemeral holder of our own. On exit the lease ends and, if the holder is ours,
    it is reaped: no holder, mount or socket is left. Every runner (exec, the launcher)
    goes through here. `started`: called with an ephemeral holder of ours once it serves,
    its recipe asked for (`exec`'s plan for the C front end). `meanwhile`: called while
    our holder sets the container up (the launcher's imports and PMI server); what it
    raises is raised once the holder is ready, from within the lease, which then ends."""
    if container.share:
        if meanwhile is not None:
            meanwhile()
        lease = join_or_start(container, container.share)
        try:
            yield lease
        finally:
            lease.close()
        return
    if container.save:  # before the command runs: a path it could never write
        from rankwire.runtime.save import check_target

        check_target(container.save)
    failed: list[BaseException] = []

    def overlapped() -> None:
        assert meanwhile is not None
        try:
            meanwhile()
        except BaseException as err:  # the holder is forked: it must be let go first
            failed.append(err)

    try:
        holder = start_holder(
            container,
            mode="ephemeral",
            owner=os.getpid(),
            recipe=started is not None,
            meanwhile=overlapped if meanwhile is not None else None,
        )
    except BaseException:
        if failed:  # it came first (a ^C during the imports, say); the holder's in its context
            raise failed[0]  # noqa: B904
        raise
    try:
        # Said only when FUSE was tried and failed (an asked-for --unsquash is no news).
        if holder.report.get("image_driver") == "extract" and holder.report.get(
            "image_driver_fallback"
        ):
            print(
                f"rankwire: FUSE is unusable here ({holder.report.get('image_driver_fallback')});"
                f" using the image extracted under {holder.report.get('extract_dir')}",
                file=sys.stderr,
            )
        if holder.report.get("pid_namespace_fallback"):
            print(
                "rankwire: no PID namespace for the container here "
                f"({holder.report['pid_namespace_fallback']}): processes the command leaves "
                "in the background may outlive it",
                file=sys.stderr,
            )
        if started is not None:
            started(holder)
        with leased(holder.socket) as lease:
            if failed:
                raise failed[0]
            yield lease
            if container.save:  # the command ended (whatever its status): pack it
                from rankwire.runtime.save import save_container

                save_container(container, holder.socket)
    finally:
        holder.wait()


def run_container(
    container: ContainerPlan,
    proc: ProcessPlan,
    started: Optional[Callable[[HolderHandle], None]] = None,
) -> int:
    """The whole `rankwire exec`: a container, one process inside, teardown. Returns the
    process's exit code. `started`: see `open_container`."""
    with open_container(container, started) as lease:
        return run_in(lease, proc)
