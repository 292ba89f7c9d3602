"""The plan a join leaves for the C front end (`runtime/front.c`, the `rankwire` command).

`rankwire exec instance://NAME CMD…` (no option) plans the command's process here, in
Python, as every join does; then `remember` writes that plan to NAME.plan next to the
instance's socket (the user's private runtime dir), with what it was made from: the user,
the working directory, the whole environment, the instance (its socket's identity and
holder pid) and the files of the code that decided it (their identities). The next
`rankwire exec instance://NAME …` whose request is the same in all of these, whatever its
command, joins in C without starting Python (about 2 ms instead of 65); any difference,
and the front end runs this planner again, which writes the plan anew.

Only a plan that does not depend on the command is written (`command_free`), and only
where the front end may use it: no PMI bridge, no warning to say, not a Slurm task.

A task of a step (`srun rankwire exec IMG CMD…`, no option) leaves a step plan instead:
instances/step-JOB.STEP.plan (`remember_step`), for the node's shared container the step's
tasks join. The step's tasks differ only in Slurm's per-task variables (`TASK_VARS`): the
plan's key leaves them out, and the planned environment passes each task's own through,
which `task_free` checks by planning again with other values. The file is also the step's
lock: the front end of the first task to come takes it (exclusive) and runs this planner
holding it (`RANKWIRE_STEP_LOCK`), which alone writes the plan there, if the plan fits
every task, then lets go; the others wait for it (shared), then join in C or, with no plan
for them, plan in Python (at once: they do not write). A step plan serves only its
step's tasks on its node, and lives as long as the shared container: its holder removes
the file when it ends (`prune_stale` when it was killed).

`rankwire exec [OPTIONS…] IMAGE CMD…` leaves an exec plan (`remember_exec`):
exec-DEV-INO-HASH.plan in the runtime dir, for that image file and exactly those option
words, keyed as a step plan is and on the host paths and tools the planner looked at,
holding the process plan and the holder's recipe, which the front end has
`rankwire-holder setup` make again without Python.

Format: `runtime/frame.py` records (KEY=VALUE, each ending in a NUL), first
`magic=rankwire-join-plan 1` (`rankwire-step-plan 1`), last `end=1`. A join plan is made
whole before it gets its name (O_TMPFILE, then linked), so a reader sees all of it or
nothing, and a writer killed midway leaves nothing; a step plan is written under its lock,
and one cut short has no `end=1`. The holder's teardown and `instance stop` remove it.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import fcntl
import json
import os
import stat
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

from rankwire.entry import STEP_LOCK_VAR
from rankwire.pmi.bridgeplan import PMI2_TO_PMIX, PMIX_TO_PMI, BridgePlan
from rankwire.runtime import frame
from rankwire.runtime.plan import ContainerPlan, ProcessPlan, UserFacts

MAGIC = "rankwire-join-plan 1"
STEP_MAGIC = "rankwire-step-plan 1"
# What Slurm sets per task of a step (Slurm 22.05 also sets TMPDIR=/tmp in a node's first
# task alone, when the step has none); GPU binding sets the device lists per task.
TASK_VARS = (
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_TASK_PID",
    "PMI_RANK",
    "PMI_FD",
    "PMIX_RANK",
    "TMPDIR",
    "CUDA_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
    "ZE_AFFINITY_MASK",
    "GPU_DEVICE_ORDINAL",
)
# The modules whose code decides a join's process plan (`exec instance://NAME CMD…`
# without options, which `rankwire/entry.py` runs without the CLI): an edit or an upgrade
# of any of them (their identity changes) makes the front end plan in Python again.
DECIDING = (
    "rankwire.entry",
    "rankwire.pmi.bridgeplan",
    "rankwire.runtime.execcmd",
    "rankwire.runtime.frame",
    "rankwire.runtime.instance",
    "rankwire.runtime.joinplan",
    "rankwire.runtime.options",
    "rankwire.runtime.plan",
    "rankwire.runtime.slurmfacts",
    "rankwire.runtime.userfacts",
)
PROBE = ("rankwire-join-plan-probe",)
# The holder's serving half (runtime/holdserve.c), built next to this file; also what sets
# a container up from a recipe (`rankwire-holder setup`).
SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rankwire-holder")


def plan_path(sock: str) -> str:
    """NAME.plan for the instance socket NAME.sock."""
    return sock[: -len(".sock")] + ".plan" if sock.endswith(".sock") else sock + ".plan"


def command_free(proc: ProcessPlan, probe: ProcessPlan, command: tuple[str, ...]) -> bool:
    """`proc` (planned for `command`) and `probe` (the same request planned for `PROBE`)
    differ in their argv alone, which is the command as given: the front end may then
    run any command with this plan."""
    return (
        proc.argv == command
        and probe.argv == PROBE
        and dataclasses.replace(probe, argv=proc.argv) == proc
    )


def stat_id(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def identity(path: str) -> str:
    return f"{stat_id(path)}:{path}"


_started: list[str] = []  # `started_environment`, once read


def started_environment() -> list[str]:
    """The environment this process was started with, sorted as bytes, which is what the
    front end compares: not `os.environ`, which Python itself may have changed since
    (PEP 538 sets LC_CTYPE under the C locale). Read once: a process that is not dumpable
    (the plugin's start phase) cannot read its /proc files, so it reads this before."""
    if not _started:
        lock = STEP_LOCK_VAR.encode() + b"="
        with open("/proc/self/environ", "rb") as f:
            entries = [e for e in f.read().split(b"\0") if e and not e.startswith(lock)]
        _started.extend(os.fsdecode(e) for e in sorted(entries))
    return list(_started)


def started_environ() -> dict[bytes, bytes]:
    """The environment this process was started with, as a dict: what the holder's
    programs (rankwire-holder) are exec'd with, so that `ps e` shows it, as it showed the
    starter's before (a starter may have changed `os.environ` since)."""
    with open("/proc/self/environ", "rb") as f:
        return dict(entry.partition(b"=")[::2] for entry in f.read().split(b"\0") if entry)


def socket_id(sock: str) -> str:
    st = os.lstat(sock)
    return f"{st.st_dev}:{st.st_ino}"


def records(
    sock: str,
    sock_id: str,
    holder: dict[str, Any],
    user: UserFacts,
    proc: ProcessPlan,
    step: Optional[tuple[str, str]] = None,
    bridge: Optional[str] = None,
) -> list[tuple[str, str]]:
    """`step`: the image as given and its identity, for a step plan (the key then leaves
    out `TASK_VARS` and every rankwire module's file counts; `bridge`, its PMI bridge:
    PMIX_TO_PMI or None). KeyError: a deciding module is not loaded (then no plan)."""
    env = started_environment()
    modules: tuple[str, ...] = DECIDING
    head = [("magic", MAGIC)]
    if step is not None:
        names = [f"{v}=".encode() for v in TASK_VARS]
        env = [e for e in env if not os.fsencode(e).startswith(tuple(names))]
        modules = tuple(sorted(n for n in list(sys.modules) if n.startswith("rankwire.")))
        head = [("magic", STEP_MAGIC), ("image", step[0]), ("image_id", step[1])]
        head += [("task_var", v) for v in TASK_VARS]
        head += [("bridge", bridge)] if bridge else []
    out = [
        *head,
        ("uid", str(user.uid)),
        ("gid", str(user.gid)),
        ("cwd", user.cwd),
        ("socket", sock),
        ("socket_id", sock_id),
        ("holder", str(holder["pid"])),
        # as the join's reply has it (json.dumps): a random name, unlike inode numbers
        ("session", json.dumps(holder["session"])),
    ]
    files = [getattr(sys.modules[name], "__file__", None) for name in modules]
    out += [("file", identity(f)) for f in files if f]
    out += [("key_env", entry) for entry in env]
    out += [("workdir", proc.workdir), ("no_new_privs", "1" if proc.no_new_privs else "0")]
    out += [("env", f"{k}={v}") for k, v in proc.env.items()]
    out.append(("end", "1"))
    return out


def writable(proc: ProcessPlan) -> bool:
    """The front end would do with `proc` as Python does: the file system encoding is
    the plan's (UTF-8), and Python's execve would take every environment name."""
    return sys.getfilesystemencoding() == "utf-8" and all(k and "=" not in k for k in proc.env)


def remember(sock: str, holder: dict[str, Any], user: UserFacts, proc: ProcessPlan) -> None:
    """Write NAME.plan for the instance at `sock` (`holder`: its report); on any failure,
    or where the front end would not do as Python does, nothing (the next join plans in
    Python again): under a file system encoding other than UTF-8 (the plan's), or with an
    environment name Python's execve refuses. Under the instances dir's lock (the one a
    holder takes to link its socket), and checked after: if the socket is gone or another,
    the plan goes (the holder's teardown removes its socket, then the plan)."""
    name = os.path.basename(plan_path(sock))
    if not writable(proc):
        return
    try:
        sock_id = socket_id(sock)
        data = frame.encode(records(sock, sock_id, holder, user, proc))
        dir_fd = os.open(os.path.dirname(sock), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (OSError, ValueError, KeyError, TypeError):  # ValueError: a NUL in a value, say
        return
    fd, linked = -1, False
    try:
        fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
        # a dir fd makes it linkat(…, AT_SYMLINK_FOLLOW): plain link() would not follow
        # /proc's link to the unnamed file
        os.link(f"/proc/self/fd/{fd}", name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        linked = True
        if socket_id(sock) != sock_id:
            raise FileNotFoundError(sock)
    except OSError:
        if linked:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dir_fd)
    finally:
        if fd >= 0:
            os.close(fd)
        os.close(dir_fd)  # and with it the lock


# ---- the step plan -------------------------------------------------------------------

_step_lock: Optional[tuple[int, int]] = None  # (descriptor, our pid)


def take_step_lock() -> None:
    """At start: take the locked step plan's descriptor the front end handed us (and the
    variable out of our environment, so that nothing we start inherits either), if it is
    that: a file of ours named step-*.plan. It is let go at the latest when we exit."""
    global _step_lock
    value = os.environ.pop(STEP_LOCK_VAR, None)
    if value is None or not (value.isascii() and value.isdigit()):
        return
    fd = int(value)
    with contextlib.suppress(OSError):
        st = os.fstat(fd)
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if (
            stat.S_ISREG(st.st_mode)
            and st.st_uid == os.getuid()
            and (name.startswith("step-") and name.endswith(".plan"))
        ):
            os.set_inheritable(fd, False)
            _step_lock = (fd, os.getpid())
            atexit.register(release_step_lock)


def release_step_lock() -> None:
    """Let the step's other tasks read the plan (written or not); a file the front end
    made for a plan that was not written goes. Once, and only in the process that took
    the lock (not in a child forked since); then a no-op."""
    global _step_lock
    held, _step_lock = _step_lock, None
    if held is None or held[1] != os.getpid():
        return
    fd = held[0]
    with contextlib.suppress(OSError):
        st = os.fstat(fd)
        path = os.readlink(f"/proc/self/fd/{fd}")
        now = os.lstat(path)
        if st.st_size == 0 and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            os.unlink(path)
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)  # copies in forked children hold it too
    with contextlib.suppress(OSError):
        os.close(fd)


def step_file(environ: Mapping[str, str]) -> Optional[str]:
    """step-JOB.STEP.plan (in the instances dir) for a task of a step, else None."""
    job, step = environ.get("SLURM_JOB_ID", ""), environ.get("SLURM_STEP_ID", "")
    if not all(x.isascii() and x.isdigit() for x in (job, step)):
        return None
    return f"step-{job}.{step}.plan"


def task_free(
    plan_for: Callable[[dict[str, str]], tuple[ContainerPlan, ProcessPlan, BridgePlan]],
    environ: Mapping[str, str],
) -> bool:
    """What `plan_for(env)` plans (container, process, PMI bridge) is every task's: planned
    again with other values of `TASK_VARS` and with none of them, the container and the
    bridge are the same and the process differs only in those variables, passed through
    from the task's own environment (but those a PMI bridge takes out: PMIx to PMI, the
    PMIx ones, for which the front end passes PMI_RANK and PMI_FD, as
    `bridge.task_pmi_env`; PMI-2 to PMIx, Slurm's PMI ones and the PMIx ones, for which it
    passes what the node's bridge answers)."""

    def others(env: Mapping[str, str]) -> dict[str, str]:
        return {k: v for k, v in env.items() if k not in TASK_VARS}

    container, proc, bridge = plan_for(dict(environ))
    taken = {PMIX_TO_PMI: ("PMIX_",), PMI2_TO_PMIX: ("PMI_", "PMIX_")}.get(bridge.bridge or "", ())

    def passed(env: Mapping[str, str], name: str) -> Optional[str]:
        return None if name.startswith(taken) else env.get(name)

    if any(proc.env.get(v) != passed(environ, v) for v in TASK_VARS):
        return False
    own = others(environ)
    probes = [{**own, **{v: value for v in TASK_VARS}} for value in ("0", "rankwire-task-probe")]
    for env in (*probes, own):
        c, p, b = plan_for(env)
        if (
            (c, b) != (container, bridge)
            or dataclasses.replace(p, env={}) != dataclasses.replace(proc, env={})
            or others(p.env) != others(proc.env)
            or any(p.env.get(v) != passed(env, v) for v in TASK_VARS)
        ):
            return False
    return True


def holds_step_lock() -> bool:
    """The front end handed us the step plan's lock: we are the step's first task here,
    whose plan the others wait for (only that task writes it)."""
    return _step_lock is not None


def remember_step(
    image: str,
    image_path: str,
    lease: Any,
    user: UserFacts,
    proc: ProcessPlan,
    bridge: Optional[str] = None,
) -> None:
    """Write the step plan, into the file whose lock the front end handed us, for the
    shared container of `lease` (its join reply names the holder) and the PMI bridge
    `bridge` (PMIX_TO_PMI: each task's front end hands its PMI_FD socketpair end to the
    node's bridge server, `pmi/bridge.task_pmi_env`, and passes PMI_RANK=PMIX_RANK and
    PMI_FD instead of the PMIx task variables; PMI2_TO_PMIX: it follows the node's PMI-2
    bridge, `pmi2bridge.follow`, and passes the PMIx variables it answers); on any failure
    none (the other tasks then plan in Python)."""
    fd = _step_lock[0] if _step_lock is not None else None
    if fd is None or not writable(proc):
        return
    sock = str(lease.report.get("socket", ""))
    try:
        step = (image, stat_id(image_path))
        data = frame.encode(records(sock, socket_id(sock), lease.report, user, proc, step, bridge))
        os.ftruncate(fd, 0)
        view = memoryview(data)
        while view:
            view = view[os.pwrite(fd, view, len(data) - len(view)) :]
    except (OSError, ValueError, KeyError, TypeError):
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)


# ---- the exec plan -------------------------------------------------------------------

EXEC_MAGIC = "rankwire-exec-plan 1"
KEPT_EXEC_PLANS = 32
RECIPE_MAX = 64  # mounts, and mount points, that rankwire-holder takes (MAX_RECIPE)
BOOT_ID = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str:
    """This boot's id: a kept plan or recipe is for one kernel's run."""
    with open(BOOT_ID) as f:
        return f.read().strip()


def recipe_fits(recipe: frame.Records) -> bool:
    """`rankwire-holder setup` takes this many mounts and mount points (`RECIPE_MAX`)."""
    counts = [sum(k == f"r_{kind}" for k, _ in recipe) for kind in ("mount", "mkdir", "touch")]
    return counts[0] <= RECIPE_MAX and counts[1] + counts[2] <= RECIPE_MAX


def _code_holds(recs: frame.Records) -> bool:
    """Every `file` record's file is as it was, and every `tool` is where it was on PATH."""
    for entry in frame.every(recs, "file"):
        if identity(entry.split(":", 5)[5]) != entry:
            return False
    path_env = os.environ.get("PATH", os.defpath)
    for entry in frame.every(recs, "tool"):
        name, _, where = entry.partition(":")
        if _which(name, path_env) != where:
            return False
    return True


def exec_plan_name(image: str, options: Sequence[str] = ()) -> str:
    """exec-DEV-INO-HASH.plan, in the user's runtime dir: the exec plan of the image at
    `image` given with the command-line words `options` (one per image file and words:
    the front end finds it by a stat and the words' FNV-1a hash, then compares them)."""
    st = os.stat(image)
    return f"exec-{st.st_dev}-{st.st_ino}-{fnv1a(options):016x}.plan"


def fnv1a(words: Sequence[str]) -> int:
    """64-bit FNV-1a of the words, each with its NUL (front.c `fnv1a`)."""
    h = 0xCBF29CE484222325
    for byte in b"".join(os.fsencode(w) + b"\0" for w in words):
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def loaded_module_files() -> list[str]:
    """The files of every rankwire module loaded: the code that made a plan."""
    modules = sorted(n for n in list(sys.modules) if n.startswith("rankwire."))
    files = (getattr(sys.modules[name], "__file__", None) for name in modules)
    return [f for f in files if f]


def key_records(
    options: Sequence[str],
    image: Optional[str],
    user: UserFacts,
    files: Sequence[str],
    probed: Mapping[str, bool],
    tools: Mapping[str, Optional[str]],
    contents: Mapping[str, str] = {},
) -> list[tuple[str, str]]:
    """The key of a plan kept for a later start of the same request (an exec plan, which
    the front end checks, `host_matches` and `plan_matches`; a launch plan, which
    `key_holds` checks): the command-line words, the image as given and its identity,
    the user, its groups, directory, boot, the identity of each of `files` (the code that
    decided, the programs it names, the host libraries it binds), which of the paths the
    planner probed exist, where each host tool is on PATH, what each of `contents` (a
    kernel's file, whose identity does not change with it: a port's state) holds, what
    the fabric adapters' classes and device nodes list (`ADAPTER_GLOBS`: a second adapter
    under a class there already), and the whole environment. OSError: a file is gone;
    ValueError: a path holds a tab."""
    from rankwire.fabric.hostfacts import ADAPTER_GLOBS

    boot = boot_id()
    out = [("option", word) for word in options]
    if image is not None:
        out += [("image", image), ("image_id", stat_id(image))]
    out += [("uid", str(user.uid)), ("gid", str(user.gid)), ("groups", groups())]
    out += [("cwd", user.cwd), ("boot", boot)]
    out += [("file", identity(f)) for f in files]
    out += [("exists", f"{int(there)}:{path}") for path, there in sorted(probed.items())]
    out += [("tool", f"{name}:{path or ''}") for name, path in sorted(tools.items())]
    if any("\t" in path for path in contents):
        raise ValueError("a content path with a tab")
    out += [("content", f"{path}\t{value}") for path, value in sorted(contents.items())]
    out += [("listing", f"{pattern}\t{listing(pattern)}") for pattern in ADAPTER_GLOBS]
    out += [("key_env", entry) for entry in started_environment()]
    return out


def listing(pattern: str) -> str:
    """What a `listing` key record holds: the paths matching `pattern`, sorted, with
    commas (as the front end's glob(3) in the C locale lists them)."""
    import glob

    return ",".join(sorted(glob.glob(pattern)))


def groups() -> str:
    """This process's supplementary groups, as the front end words them (sorted, once)."""
    return ",".join(str(g) for g in sorted(set(os.getgroups())))


def file_content(path: str) -> str:
    """A kernel file's content as a `content` key record holds it: its first 4 KiB, ASCII
    whitespace stripped at both ends (as `fabric.hostfacts` reads it, and the front end
    checks it); "" when it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        data = os.read(fd, 4096)
    except OSError:
        data = b""
    finally:
        os.close(fd)
    return data.strip().decode("utf-8", "surrogateescape")


def key_holds(recs: frame.Records) -> bool:
    """This process's request is the one `key_records` keyed, as the front end checks an
    exec plan's (`plan_matches`, `host_matches`): the same user, groups, directory, boot,
    environment, image and files (by identity), probed paths (there or not), tools
    (found where they were on PATH), kernel files' contents and the adapters' listings.
    The words are the caller's to compare."""
    try:
        if (
            frame.one(recs, "uid") != str(os.getuid())
            or frame.one(recs, "gid") != str(os.getgid())
            or frame.one(recs, "groups") != groups()
            or frame.one(recs, "cwd") != os.getcwd()
            or frame.one(recs, "boot") != boot_id()
            or frame.every(recs, "key_env") != started_environment()
        ):
            return False
        image = frame.one(recs, "image")
        if image is not None and frame.one(recs, "image_id") != stat_id(image):
            return False
        if not _code_holds(recs):
            return False
        for entry in frame.every(recs, "exists"):
            if os.path.exists(entry[2:]) != (entry[:2] == "1:"):
                return False
        for entry in frame.every(recs, "content"):
            path, _, value = entry.partition("\t")
            if file_content(path) != value:
                return False
        for entry in frame.every(recs, "listing"):
            pattern, _, paths = entry.partition("\t")
            if listing(pattern) != paths:
                return False
    except (OSError, IndexError, ValueError):
        return False
    return True


def _which(name: str, path_env: str) -> str:
    """shutil.which(name) (the tools were found with it), without importing shutil: ""
    for none."""
    for d in path_env.split(":") if path_env else ():
        full = os.path.join(d, name)
        if os.path.exists(full) and not os.path.isdir(full) and os.access(full, os.X_OK):
            return full
    return ""


def remember_exec(
    runtime: str,
    image: str,
    options: Sequence[str],
    recipe: list[tuple[str, str]],
    user: UserFacts,
    proc: ProcessPlan,
    probed: Mapping[str, bool],
    tools: Mapping[str, Optional[str]],
    files: Sequence[str] = (),
    contents: Mapping[str, str] = {},
) -> None:
    """Write the exec plan of `rankwire exec OPTIONS… IMAGE CMD…` (`image` and `options`,
    the words before it, as given) for the C front end, which then starts this container
    without Python (`rankwire-holder setup` makes again what the holder did, `recipe`)
    while its key holds: the option words, the user, directory, environment, every loaded
    rankwire module's file, the holder's program, the FUSE driver's, the image's identity,
    the boot (a new kernel), which of the paths the planner probed exist (`probed`: a
    fabric adapter's coming too), where each host tool is on PATH (`tools`), and the host
    fabric's facts (`files`, `contents`: `execcmd.host_key`). Made whole before it gets
    its name, as `remember`; on any failure, nothing."""
    if not writable(proc) or not recipe_fits(recipe):
        return
    try:
        code = [*loaded_module_files(), SERVER, *(v for k, v in recipe if k == "r_fuse")]
        out = [
            ("magic", EXEC_MAGIC),
            ("holder_program", SERVER),
            *key_records(options, image, user, [*code, *files], probed, tools, contents),
        ]
        out += [("workdir", proc.workdir), ("no_new_privs", "1" if proc.no_new_privs else "0")]
        out += [("env", f"{k}={v}") for k, v in proc.env.items()]
        out += [*recipe, ("end", "1")]
        data = frame.encode(out)
        name = exec_plan_name(image, options)
    except (OSError, ValueError, KeyError, TypeError):
        return
    keep_plan(runtime, name, data)


def keep_plan(runtime: str, name: str, data: bytes) -> bool:
    """Put `data` in `runtime` as `name` (an exec-…, launch-…, holder-… or plugin-…
    plan), made whole before it gets its name, which it takes over at once (a reader finds
    the old plan or this one, never none); then only the `KEPT_EXEC_PLANS` plans of that
    kind used last are kept. Whether it is there now; on any failure, nothing."""
    try:
        dir_fd = os.open(runtime, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    fd = -1
    kept = False
    whole = f".{name}.{os.getpid()}"  # its name until it is whole (no plan's name)
    try:
        fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        with contextlib.suppress(FileNotFoundError):  # a process of this pid killed here
            os.unlink(whole, dir_fd=dir_fd)
        os.link(f"/proc/self/fd/{fd}", whole, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.rename(whole, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        kept = True
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(whole, dir_fd=dir_fd)
    finally:
        if fd >= 0:
            os.close(fd)
        os.close(dir_fd)
    _prune_plans(runtime, name.split("-", 1)[0] + "-")
    return kept


def _prune_plans(runtime: str, prefix: str) -> None:
    """Keep the `KEPT_EXEC_PLANS` plans named `prefix`… used last (written, or used and
    touched: the front end's exec plans, the launcher's launch plans): an image, or
    words, used once leave no file for ever."""
    with contextlib.suppress(OSError):
        found = []
        for entry in os.scandir(runtime):
            if entry.name.startswith(prefix) and entry.name.endswith(".plan"):
                with contextlib.suppress(OSError):
                    found.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.path))
        for _, path in sorted(found, reverse=True)[KEPT_EXEC_PLANS:]:
            with contextlib.suppress(OSError):
                os.unlink(path)


def prune_step_plan(path: Any) -> None:
    """Remove the step plan at `path` if no task uses it (locked) and its holder's socket
    is gone (a holder killed by SIGKILL), or it holds no plan."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        data = os.read(fd, frame.MAX_FRAME)
        try:
            sock = frame.one(frame.decode(data), "socket")
        except frame.FrameError:
            sock = ""
        if not sock or not os.path.lexists(sock):
            os.unlink(path)
    except OSError:
        pass  # locked: in use
    finally:
        os.close(fd)


# ---- the plugin's holder recipe -------------------------------------------------------

HOLDER_MAGIC = "rankwire-holder-recipe 1"
KEEP_MAX = 16  # the descriptors `rankwire-holder setup` keeps (holdserve.c MAX_LIST)


def holder_recipe_name(container: ContainerPlan) -> str:
    """holder-HASH.plan in the user's runtime dir: the kept recipe of a holder for this
    container plan (the file holds the plan, which says whether it is this one)."""
    return _recipe_name(_plan_text(container))


def _recipe_name(plan_text: str) -> str:
    return f"holder-{fnv1a([plan_text]):016x}.plan"


def _plan_text(container: ContainerPlan) -> str:
    return json.dumps(container.to_dict(), sort_keys=True)


def _fd_ids(image_fd: int, keep_fds: Sequence[int]) -> list[str]:
    """Each descriptor's number and what it is open on: the image's identity (its content
    decides the mount points), the file of a bind's source (its kind decides them; what a
    directory holds, or its times, do not)."""
    st = os.fstat(image_fd)
    out = [f"{image_fd}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"]
    for fd in keep_fds:
        st = os.fstat(fd)
        out.append(f"{fd}:{st.st_dev}:{st.st_ino}:{stat.S_IFMT(st.st_mode):o}")
    return out


def remember_holder(
    runtime: str,
    container: ContainerPlan,
    image_fd: int,
    keep_fds: Sequence[int],
    recipe: frame.Records,
) -> None:
    """Keep what a holder did for `container` (`recipe`), its image open on `image_fd` and
    its binds' sources on `keep_fds` (the plugin's start phase: `spank/helper.py`
    `_start_and_join`), for the next start of the same plan, which `kept_holder` gives it
    to, keyed on the plan (whole), the boot, the descriptors' files (`_fd_ids`), the code
    that noted and makes the steps (their identities: holder.py and its imports too) and
    where the FUSE driver is on PATH. On any failure, or with more descriptors than
    `rankwire-holder setup` keeps, nothing."""
    if not recipe_fits(recipe) or 1 + len(keep_fds) > KEEP_MAX:
        return
    # holder.py and what it imports decided the steps (the start phase forks it unloaded)
    import rankwire.runtime.holder  # noqa: F401

    try:
        code = [*loaded_module_files(), SERVER, *(v for k, v in recipe if k == "r_fuse")]
        path_env = os.environ.get("PATH", os.defpath)
        drivers = [v for k, v in recipe if k == "r_driver"]
        out = [("magic", HOLDER_MAGIC), ("plan", _plan_text(container)), ("boot", boot_id())]
        out += [("file", identity(f)) for f in code]
        out += [("tool", f"{name}:{_which(name, path_env)}") for name in drivers]
        out += [("fd", entry) for entry in _fd_ids(image_fd, keep_fds)]
        data = frame.encode([*out, *recipe, ("end", "1")])
    except (OSError, ValueError):
        return
    keep_plan(runtime, holder_recipe_name(container), data)


def kept_holder(
    runtime: str, container: ContainerPlan, image_fd: int, keep_fds: Sequence[int]
) -> Optional[int]:
    """The kept recipe (`remember_holder`) for `container` with these descriptors, open (for
    `rankwire-holder setup plan=FD`, which reads its `r_*` records), if its key holds;
    else None."""
    text = _plan_text(container)
    try:
        fd = os.open(
            os.path.join(runtime, _recipe_name(text)),
            os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
        )
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise ValueError("not the user's file")
        recs = frame.decode(os.pread(fd, frame.MAX_FRAME + 1, 0))
        if (
            frame.one(recs, "magic") != HOLDER_MAGIC
            or recs[-1] != ("end", "1")
            or frame.one(recs, "plan") != text
            or frame.one(recs, "boot") != boot_id()
            or frame.every(recs, "fd") != _fd_ids(image_fd, keep_fds)
            or not _code_holds(recs)  # and the FUSE driver holder.py would find
        ):
            raise ValueError("another plan")
        os.utime(fd)  # used: kept longest (`_prune_plans`)
    except (OSError, IndexError, ValueError):
        os.close(fd)
        return None
    return fd


def recipe_of(fd: int) -> frame.Records:
    """The recipe records (`r_*`) of the kept recipe or plan open on `fd`."""
    return [(k, v) for k, v in frame.decode(os.pread(fd, frame.MAX_FRAME + 1, 0)) if k[:2] == "r_"]


PLUGIN_MAGIC = "rankwire-plugin-plan 1"


def remember_plugin(
    runtime: str,
    container: ContainerPlan,
    image: str,
    user: UserFacts,
    files: Sequence[str],
    probed: Mapping[str, bool],
    tools: Mapping[str, Optional[str]],
    contents: Mapping[str, str],
    image_fd: int,
    keep_fds: Sequence[int],
    recipe: frame.Records,
) -> Optional[str]:
    """Keep a plugin step's container for the C front end (`rankwire spank-helper
    start-kept`, runtime/front.c `plugin_start`), which starts it again with `recipe` for a
    later step that the shim's fresh ticket gives it (spank/ticket.c), while its key holds:
    the user (as the front end runs: `user`'s directory is the start phase's), the image
    (at its real path `image`, open on `image_fd`) and every other file as an exec plan's
    (`key_records`: the code, the holder's and FUSE driver's programs, the host's fabric
    files, probed paths, tools, kernel files, the environment), and the descriptors' files
    (`_fd_ids`: what the front end opened). The plan's name (plugin-HASH.plan, as
    `holder_recipe_name`), or None: nothing kept."""
    if not recipe_fits(recipe) or 1 + len(keep_fds) > KEEP_MAX:
        return None
    import rankwire.runtime.holder  # noqa: F401  (as `remember_holder`)

    try:
        code = [*loaded_module_files(), SERVER, *(v for k, v in recipe if k == "r_fuse")]
        out = [("magic", PLUGIN_MAGIC), ("holder_program", SERVER)]
        out += key_records((), image, user, [*code, *files], probed, tools, contents)
        out += [("workdir", user.cwd), ("no_new_privs", "1")]  # the tasks': the shim's
        out += [("fd", entry) for entry in _fd_ids(image_fd, keep_fds)]
        data = frame.encode([*out, *recipe, ("end", "1")])
        name = f"plugin-{fnv1a([_plan_text(container)]):016x}.plan"
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if keep_plan(runtime, name, data) else None
