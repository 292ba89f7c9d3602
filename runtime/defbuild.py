"""`rankwire build OUT.sif RECIPE.def`: build an image from an Apptainer definition file.

Facts → plan → execute, as everywhere:

- `gather_facts` reads, once, what the planner needs: the caller's ids, its subordinate id
  ranges (`/etc/subuid`, `/etc/subgid`) and whether `newuidmap`/`newgidmap` and Debian's
  `fakeroot` are there, and which host paths named by `%files` and `From:` exist.
- `plan_defbuild` (pure) turns the parsed `DefFile` and those facts into a `DefBuildPlan`:
  stages in order, each one's bootstrap, its copies (from the host or an earlier stage),
  its scripts, and how `%post` runs as root:
  `root` (the caller is root: no user namespace), `subid` (a user namespace mapping root
  to the caller and 1…N to its subordinate range, through newuidmap/newgidmap), or
  `fakeroot` (one mapped id, root = the caller, and Debian's fakeroot so that `chown`
  and the ownership package managers set survive until the image is packed).
- `execute` pulls the bases (`docker://`, `oras://` through `runtime/pull.py`, so layers
  are applied once, by `oci_layers`, and cached), then builds every stage in a sandbox
  directory inside that user namespace: `unsquashfs` of the base SIF's partition, `%setup`
  (only with `--allow-setup`), `%files`, `%post` (`SHELL -e -x`, in a PID and mount
  namespace of its own, chrooted, with /proc, host /dev nodes and /etc/resolv.conf),
  the environment `$APPTAINER_ENVIRONMENT` collected, and for the last stage `%test`,
  then packs the last stage with `runtime/build.py` (the definition file as object 1)
  or moves it to `--sandbox DIR`. Sandboxes go whatever happens, unless `--keep-sandbox`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import glob
import json
import os
import posixpath
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from rankwire.errors import UserError, shown
from rankwire.record import record
from rankwire.runtime.deffile import DefFile, FileCopy, parse
from rankwire.runtime.reference import Access

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
POST_ENV_FILE = "/.singularity.d/env/91-environment.sh"
PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
# Labels `rankwire build` writes for every build: a base image's are replaced, not kept.
_BUILD_LABELS = re.compile(
    r"org\.label-schema\.|org\.opencontainers\.image\.(created|architecture)\Z"
)
WORK_PREFIX = "rankwire-defbuild-"
_STAGE_LINE = re.compile(r"bootstrap:", re.IGNORECASE)


# -- facts ------------------------------------------------------------------------------
# Bases a Fingerprints: header can check: SIFs that carry their signatures.
SIGNED_BOOTSTRAPS = ("localimage", "oras")


@record
class BuildFacts:
    """What the planner needs to know about the caller and the host, read once."""

    uid: int
    gid: int
    user: str
    subuid: Optional[tuple[int, int]]  # (first, count) of the caller's range, if any
    subgid: Optional[tuple[int, int]]
    newuidmap: Optional[str]
    newgidmap: Optional[str]
    faked: Optional[str]  # Debian's faked-sysv
    fakeroot_lib: Optional[str]  # its libfakeroot-sysv.so
    cwd: str
    # Every host path %files and `Bootstrap: localimage` name, as written: what it
    # matches on the host (glob), empty when nothing does.
    host_paths: tuple[tuple[str, tuple[str, ...]], ...]
    tmpdir: str
    ignored_subuid: bool = False  # --ignore-subuid


def _subid(path: str, user: str, uid: int) -> Optional[tuple[int, int]]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in (user, str(uid)):
            try:
                first, count = int(parts[1]), int(parts[2])
            except ValueError:
                continue
            if count > 0:
                return first, count
    return None


def _fakeroot_lib() -> Optional[str]:
    for pattern in (
        "/usr/lib/*/libfakeroot/libfakeroot-sysv.so",
        "/usr/lib*/libfakeroot/libfakeroot-sysv.so",
    ):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def _host_path(cwd: str, path: str) -> str:
    return os.path.normpath(os.path.join(cwd, path))


def gather_facts(defn: DefFile, ignore_subuid: bool = False) -> BuildFacts:
    import pwd

    uid, gid = os.getuid(), os.getgid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    cwd = os.getcwd()
    wanted: list[str] = []
    for stage in defn.stages:
        if stage.bootstrap == "localimage":
            wanted.append(stage.from_)
        wanted += [c.src for c in stage.files if c.from_stage is None]
    host_paths = tuple(
        (p, tuple(sorted(glob.glob(_host_path(cwd, p))))) for p in dict.fromkeys(wanted)
    )
    return BuildFacts(
        uid=uid,
        gid=gid,
        user=user,
        subuid=None if ignore_subuid else _subid("/etc/subuid", user, uid),
        subgid=None if ignore_subuid else _subid("/etc/subgid", user, uid),
        newuidmap=shutil.which("newuidmap"),
        newgidmap=shutil.which("newgidmap"),
        faked=shutil.which("faked-sysv"),
        fakeroot_lib=_fakeroot_lib(),
        cwd=cwd,
        host_paths=host_paths,
        tmpdir=os.environ.get("RANKWIRE_TMPDIR") or tempfile.gettempdir(),
        ignored_subuid=ignore_subuid,
    )


# -- plan -------------------------------------------------------------------------------


@record
class Copy:
    """One %files line: `sources` (host paths, or paths in stage `from_stage`) to `dst`."""

    line: int
    sources: tuple[str, ...]
    dst: str  # a path in the image
    from_stage: Optional[int]  # index of the stage copied from, None: the host


@record
class StagePlan:
    index: int
    label: str  # "stage build" or "stage 2"
    first_line: int
    bootstrap: str
    source: str  # a host SIF path, a docker:// or oras:// reference, "" for scratch
    source_line: int
    copies: tuple[Copy, ...]
    setup: str
    post: str
    post_line: int  # of the %post header (0: none)
    post_argv: tuple[str, ...]  # the shell, before `-c SCRIPT`
    environment: str
    runscript: Optional[str]
    startscript: str
    help: str
    test: str
    test_line: int
    labels: tuple[tuple[str, str], ...]
    header: tuple[tuple[str, str], ...]  # lower-case keys, as Apptainer records them
    fingerprints: tuple[str, ...] = ()  # Fingerprints: the base SIF must be signed by these


@record
class DefBuildPlan:
    recipe: str
    text: str
    stages: tuple[StagePlan, ...]
    out: str  # the SIF, or the sandbox directory with `sandbox`
    sandbox: bool
    mode: str  # "root", "subid" or "fakeroot"
    mode_note: str  # one line for -v: how %post runs as root
    uid_map: tuple[int, ...]  # newuidmap arguments after the pid (subid mode)
    gid_map: tuple[int, ...]
    faked: Optional[str]
    fakeroot_lib: Optional[str]
    run_test: bool
    keep_sandbox: bool
    verbose: bool
    tmpdir: str
    cwd: str
    compression: Optional[str] = None  # the SIF's squashfs compressor (None: build's default)

    @property
    def image(self) -> StagePlan:
        return self.stages[-1]


def _stage_lines(text: str) -> list[int]:
    """The line number of each stage's `Bootstrap:` line."""
    lines = text.replace("\r\n", "\n").split("\n")
    return [n for n, line in enumerate(lines, 1) if _STAGE_LINE.match(line)]


def _find_line(
    text: str, start: int, end: int, test: Callable[[str], bool], default: int = 0
) -> int:
    """The first line in [start, end) that passes `test`, else `default`."""
    lines = text.replace("\r\n", "\n").split("\n")
    for number in range(start, min(end, len(lines) + 1)):
        if test(lines[number - 1]):
            return number
    return default


def _section_line(text: str, start: int, end: int, name: str) -> int:
    """The line of the stage's `%name` header (0: none)."""
    pat = re.compile(rf"\s*%{name}\b", re.IGNORECASE)
    return _find_line(text, start, end, lambda s: bool(pat.match(s)))


def _copy_line(text: str, start: int, end: int, copy: FileCopy) -> int:
    def is_it(line: str) -> bool:
        words = line.strip().split()
        return bool(words) and words[0].strip('"') == copy.src

    return _find_line(text, start, end, is_it, start)


def _mode(facts: BuildFacts) -> tuple[str, str, tuple[int, ...], tuple[int, ...]]:
    if facts.uid == 0:
        return "root", "%post runs as root (the caller is root: no user namespace)", (), ()
    if facts.subuid and facts.subgid and facts.newuidmap and facts.newgidmap:
        (u0, un), (g0, gn) = facts.subuid, facts.subgid
        note = (
            f"%post runs as root in a user namespace with subordinate ids "
            f"(uids {u0}-{u0 + un - 1}, gids {g0}-{g0 + gn - 1} of /etc/subuid, /etc/subgid, "
            "mapped by newuidmap/newgidmap)"
        )
        return "subid", note, (0, facts.uid, 1, 1, u0, un), (0, facts.gid, 1, 1, g0, gn)
    why = (
        "--ignore-subuid"
        if facts.ignored_subuid
        else f"no /etc/subuid and /etc/subgid range for {facts.user}"
        if not (facts.subuid and facts.subgid)
        else "newuidmap/newgidmap not installed"
    )
    if facts.faked and facts.fakeroot_lib:
        note = (
            f"%post runs as root in a user namespace with one mapped id and fakeroot "
            f"({why}; chown and ownership are recorded by fakeroot)"
        )
    else:
        note = (
            f"%post runs as root in a user namespace with one mapped id, without fakeroot "
            f"({why}, fakeroot not installed: chown to other ids fails; apt install fakeroot)"
        )
    return "fakeroot", note, (), ()


def _image_path(path: str) -> str:
    return "/" + posixpath.normpath("/" + path).lstrip("/") if path else ""


def plan_defbuild(
    defn: DefFile,
    text: str,
    facts: BuildFacts,
    *,
    recipe: str,
    out: str,
    sandbox: bool = False,
    notest: bool = False,
    allow_setup: bool = False,
    keep_sandbox: bool = False,
    verbose: bool = False,
    compression: Optional[str] = None,
) -> DefBuildPlan:
    """The build of `defn` (parsed from `text`), decided: pure, no I/O."""
    if compression is not None:
        from rankwire.runtime.build import check_compression

        check_compression(compression)  # before any %post runs
    paths = dict(facts.host_paths)
    starts = _stage_lines(text)
    ends = [*starts[1:], 1 << 30]
    names = {s.name: i for i, s in enumerate(defn.stages) if s.name}
    stages = []
    for index, (stage, start, end) in enumerate(zip(defn.stages, starts, ends)):
        label = f"stage {stage.name}" if stage.name else f"stage {index + 1}"
        from_line = _find_line(
            text, start, end, lambda s: s.strip().lower().startswith("from:"), start
        )
        source = stage.from_
        if stage.bootstrap == "localimage":
            found = paths.get(source, ())
            if len(found) != 1:
                raise UserError(
                    f"{recipe} line {from_line}: From: {shown(source)}: no such SIF image "
                    f"(relative to {shown(facts.cwd)}); give the path of an existing .sif file"
                )
            source = found[0]
        elif stage.bootstrap in ("docker", "oras"):
            source = source if "://" in source else f"{stage.bootstrap}://{source}"
        if stage.setup and not allow_setup:
            line = _section_line(text, start, end, "setup")
            raise UserError(
                f"{recipe} line {line}: %setup runs on the host, outside the container, and "
                "is refused by default; remove it, or build with --allow-setup"
            )
        copies = []
        for copy in stage.files:
            line = _copy_line(text, start, end, copy)
            dst = copy.dst or copy.src
            if copy.from_stage is None:
                found = paths.get(copy.src, ())
                if not found:
                    raise UserError(
                        f"{recipe} line {line}: %files source {shown(copy.src)} does not exist "
                        f"(relative to {shown(facts.cwd)}); fix the path or create it"
                    )
                copies.append(Copy(line, found, _image_path(dst), None))
            else:
                copies.append(
                    Copy(line, (_image_path(copy.src),), _image_path(dst), names[copy.from_stage])
                )
        shell = shlex.split(stage.post_shell) if stage.post_shell else ["/bin/sh"]
        stages.append(
            StagePlan(
                index=index,
                label=label,
                first_line=start,
                bootstrap=stage.bootstrap,
                source=source,
                source_line=from_line,
                copies=tuple(copies),
                setup=stage.setup,
                post=stage.post,
                post_line=_section_line(text, start, end, "post") if stage.post else 0,
                post_argv=tuple(shell),
                environment=stage.environment,
                runscript=stage.runscript or None,
                startscript=stage.startscript,
                help=stage.help,
                test=stage.test,
                test_line=_section_line(text, start, end, "test") if stage.test else 0,
                labels=stage.labels,
                header=tuple((k.lower(), v) for k, v in stage.headers),
                fingerprints=stage.fingerprints,
            )
        )
        if stage.fingerprints and stage.bootstrap not in SIGNED_BOOTSTRAPS:
            line = _find_line(
                text, start, end, lambda s: s.strip().lower().startswith("fingerprints:"), start
            )
            raise UserError(
                f"{recipe} line {line}: Fingerprints: checks the signatures of a SIF base "
                f"(Bootstrap: localimage or oras), not of a {stage.bootstrap} one; drop it, "
                "or build from a signed SIF"
            )
    mode, note, uid_map, gid_map = _mode(facts)
    return DefBuildPlan(
        recipe=recipe,
        text=text,
        stages=tuple(stages),
        out=out,
        sandbox=sandbox,
        mode=mode,
        mode_note=note,
        uid_map=uid_map,
        gid_map=gid_map,
        faked=facts.faked,
        fakeroot_lib=facts.fakeroot_lib,
        run_test=bool(stages[-1].test) and not notest,
        keep_sandbox=keep_sandbox,
        verbose=verbose,
        tmpdir=facts.tmpdir,
        cwd=facts.cwd,
        compression=compression,
    )


def expand(value: str, env: Mapping[str, str]) -> str:
    """`$NAME` and `${NAME}` in `value` replaced from `env` (unset: empty), as a shell
    would when it sources `export K="V"`; `\\$` keeps a dollar."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "\\$":
            return "$"
        return env.get(m.group(1) or m.group(2), "")

    return re.sub(r"\\\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", sub, value)


def final_labels(base: Mapping[str, str], stage: StagePlan) -> dict[str, str]:
    """The base image's labels (not those every build writes anew), then %labels."""
    labels = {k: v for k, v in base.items() if not _BUILD_LABELS.match(k)}
    labels.update(stage.labels)
    return labels


def post_env(base_env: Mapping[str, str]) -> dict[str, str]:
    """The environment %post and %test start from: a root login's, then the image's."""
    env = {"PATH": DEFAULT_PATH, "HOME": "/root", "LANG": "C", "TERM": "dumb", "USER": "root"}
    env.update(base_env)
    env["APPTAINER_ENVIRONMENT"] = env["SINGULARITY_ENVIRONMENT"] = POST_ENV_FILE
    env["APPTAINER_CONTAINER"] = env["SINGULARITY_CONTAINER"] = "rankwire-build"
    return env


# -- execute ----------------------------------------------------------------------------


class _Failed(Exception):
    """A user-caused failure inside the build child: its one-line message."""


@dataclasses.dataclass
class _Base:
    sif: str
    offset: int
    env: dict[str, str]
    labels: dict[str, str]
    runscript: Optional[str]


def _say(plan: DefBuildPlan, text: str) -> None:
    if plan.verbose:
        print(f"rankwire: {text}", file=sys.stderr, flush=True)


def _resolve_bases(
    plan: DefBuildPlan, access: Optional[Access], arch: Optional[str]
) -> list[Optional[_Base]]:
    """Every stage's base SIF (pulled into the cache if remote) and its metadata."""
    from rankwire.runtime.imagemeta import read_image_metadata
    from rankwire.runtime.pull import Progress, access_from_env, pull
    from rankwire.runtime.sif_read import SifImage

    bases: list[Optional[_Base]] = []
    for stage in plan.stages:
        if stage.bootstrap == "scratch":
            bases.append(None)
            continue
        where = f"{plan.recipe} line {stage.source_line}: From: {shown(stage.source)}"
        path = stage.source
        try:
            if stage.bootstrap in ("docker", "oras"):
                path = pull(
                    stage.source,
                    access or access_from_env(),
                    progress=Progress(not plan.verbose),
                    arch=arch,
                ).path
            with SifImage.open(path) as img:
                meta = read_image_metadata(img)
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
        except OSError as err:
            raise UserError(f"{where}: {err.strerror}; give a readable SIF image") from None
        if stage.fingerprints:  # before anything reads the base's files
            from rankwire.runtime.trust import verify_path

            try:
                verify_path(path, ",".join(stage.fingerprints), (), what="base image")
            except UserError as err:  # it names the image
                raise UserError(f"{plan.recipe} line {stage.source_line}: base {err}") from None
        bases.append(_Base(path, meta.partition_offset, meta.env, meta.labels, meta.runscript))
    return bases


def execute(
    plan: DefBuildPlan, access: Optional[Access] = None, arch: Optional[str] = None
) -> None:
    """Build the plan's image; on any failure nothing is left (but a kept sandbox).
    `access`, `arch`: how to pull docker:// and oras:// bases."""
    _say(plan, plan.mode_note)
    bases = _resolve_bases(plan, access, arch)
    os.makedirs(plan.tmpdir, exist_ok=True)
    work = tempfile.mkdtemp(prefix=WORK_PREFIX, dir=plan.tmpdir)
    lock = _lock(work)
    try:
        if plan.mode == "root":
            _run_build(plan, bases, work)
        else:
            _in_user_namespace(plan, lambda: _run_build(plan, bases, work))
    except _Failed as err:
        raise UserError(str(err)) from None
    finally:
        os.close(lock)
        if os.path.isdir(work) and not plan.keep_sandbox:
            shutil.rmtree(work, ignore_errors=True)


def _lock(work: str) -> int:
    """Hold `work/lock` while the build runs: a build killed before it could clean up
    leaves its work dir unlocked, and the next build of the user removes it."""
    fd = os.open(os.path.join(work, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _prune_stale(tmpdir: str, current: str) -> None:
    """Remove the work dirs of this user's killed builds (a kept sandbox has no lock)."""
    for path in glob.glob(os.path.join(glob.escape(tmpdir), WORK_PREFIX + "*")):
        lock = os.path.join(path, "lock")
        try:
            if path == current or os.lstat(path).st_uid != os.getuid():
                continue
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue
        finally:
            os.close(fd)
        shutil.rmtree(path, ignore_errors=True)


def _in_user_namespace(plan: DefBuildPlan, body: Callable[[], None]) -> None:
    """Run `body` in a forked child that is root of a new user namespace."""
    from rankwire.runtime import syscalls

    uid, gid = os.getuid(), os.getgid()
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 2
        try:
            os.close(ready_r)
            os.close(go_w)
            os.close(err_r)
            _die_with_parent(signal.SIGKILL)
            syscalls.unshare(syscalls.CLONE_NEWUSER)
            os.write(ready_w, b"u")
            os.read(go_r, 1)
            if plan.mode != "subid":
                _write("/proc/self/setgroups", "deny")
                _write("/proc/self/uid_map", f"0 {uid} 1")
                _write("/proc/self/gid_map", f"0 {gid} 1")
            else:
                os.setgroups([])
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
            _die_with_parent(signal.SIGKILL)  # a change of credentials cleared it
            body()
            code = 0
        except (_Failed, UserError) as err:
            os.write(err_w, str(err).encode("utf-8", "replace"))
            code = 1
        except BaseException:
            os.write(err_w, traceback.format_exc().encode("utf-8", "replace"))
            code = 3
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(ready_w)
    os.close(go_r)
    os.close(err_w)
    try:
        if os.read(ready_r, 1) == b"u" and plan.mode == "subid":
            for tool, ids in (("newuidmap", plan.uid_map), ("newgidmap", plan.gid_map)):
                proc = subprocess.run(
                    [tool, str(pid), *map(str, ids)], capture_output=True, text=True
                )
                if proc.returncode != 0:
                    os.kill(pid, signal.SIGKILL)
                    raise UserError(
                        f"{tool} failed: {shown(proc.stderr.strip())}; check the range of "
                        f"this user in /etc/sub{tool[3:6]}"
                    )
        os.write(go_w, b"g")
    finally:
        os.close(go_w)
        os.close(ready_r)
        chunks = []
        while True:
            chunk = os.read(err_r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(err_r)
        _, status = os.waitpid(pid, 0)
    message = b"".join(chunks).decode("utf-8", "replace")
    code = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else status
    if code == 1:
        raise _Failed(message)
    if code != 0:
        raise RuntimeError(f"the build process failed ({code}): {message}")


def _child_setup(fake: bool) -> None:
    """preexec_fn of a %post or %test run: dies with us; in fakeroot mode, chown EPERM."""
    _die_with_parent(signal.SIGKILL)
    if fake:
        _chown_fails_eperm()


def _die_with_parent(sig: int) -> None:
    """In a child: get `sig` when the process that forked it dies (a killed build leaves
    no process: the build child, then every %post's PID namespace go with it)."""
    from rankwire.runtime import syscalls

    parent = os.getppid()
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:  # it died before the call
        os.kill(os.getpid(), sig)


# chown(2) and friends per architecture (AUDIT_ARCH_*, syscall numbers), for fakeroot mode.
_CHOWN_CALLS = {
    "x86_64": (0xC000003E, (92, 93, 94, 260)),  # chown, fchown, lchown, fchownat
    "aarch64": (0xC00000B7, (55, 54)),  # fchown, fchownat
}


def _chown_fails_eperm() -> None:
    """In a child about to exec: chown calls fail with EPERM, not the EINVAL a user
    namespace with one mapped id gives for other ids. fakeroot's library takes EPERM as
    "not root on the host": it records the owner and reports success, as under a real
    `fakeroot`. (Statically linked programs, which it cannot wrap, see EPERM.)"""
    import ctypes
    import platform

    from rankwire.runtime import syscalls

    arch = _CHOWN_CALLS.get(platform.machine())
    if arch is None:
        return
    audit_arch, calls = arch
    ld_w_abs, jeq_k, ret_k = 0x20, 0x15, 0x06
    allow, eperm = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    n = len(calls)
    prog = [
        (ld_w_abs, 0, 0, 4),
        (jeq_k, 1, 0, audit_arch),
        (ret_k, 0, 0, allow),
        (ld_w_abs, 0, 0, 0),
    ]
    prog += [(jeq_k, n - i, 0, nr) for i, nr in enumerate(calls)]
    prog += [(ret_k, 0, 0, allow), (ret_k, 0, 0, eperm)]

    class Filter(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_ushort),
            ("jt", ctypes.c_ubyte),
            ("jf", ctypes.c_ubyte),
            ("k", ctypes.c_uint),
        ]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(prog))(*(Filter(*f) for f in prog))
    syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_seccomp, seccomp_mode_filter = 22, 2
    if libc.prctl(
        pr_set_seccomp, seccomp_mode_filter, ctypes.byref(Prog(len(prog), filters)), 0, 0
    ):
        raise OSError(ctypes.get_errno(), "seccomp filter for chown")


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(text)


# -- inside: the build itself -----------------------------------------------------------


@dataclasses.dataclass
class _Faked:
    key: str
    proc: subprocess.Popen[str]


def _start_faked(plan: DefBuildPlan) -> Optional[_Faked]:
    if plan.mode != "fakeroot" or not plan.faked or not plan.fakeroot_lib:
        return None
    proc = subprocess.Popen(
        [plan.faked, "--foreground"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        preexec_fn=lambda: _die_with_parent(signal.SIGTERM),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    return _Faked(line.split(":")[0], proc)


def _fake_env(plan: DefBuildPlan, faked: Optional[_Faked]) -> dict[str, str]:
    if faked is None or not plan.fakeroot_lib:
        return {}
    return {"FAKEROOTKEY": faked.key, "LD_PRELOAD": plan.fakeroot_lib}


def _run_build(plan: DefBuildPlan, bases: list[Optional[_Base]], work: str) -> None:
    _prune_stale(plan.tmpdir, work)
    faked = _start_faked(plan)
    roots: list[str] = []
    try:
        env: dict[str, str] = {}
        for stage, base in zip(plan.stages, bases):
            root = os.path.join(work, f"stage{stage.index + 1}")
            roots.append(root)
            env = _build_stage(plan, stage, base, root, roots, faked)
        _finish(plan, plan.image, bases[-1], roots[-1], env, faked)
        if plan.keep_sandbox:
            print(f"rankwire: kept the build sandboxes in {shown(work)}", file=sys.stderr)
    except BaseException:
        if plan.keep_sandbox and roots:
            print(
                f"rankwire: kept the sandbox of {plan.stages[len(roots) - 1].label} in "
                f"{shown(roots[-1])}",
                file=sys.stderr,
                flush=True,
            )
        raise
    finally:
        if faked is not None:
            faked.proc.terminate()
            faked.proc.wait()
        if plan.keep_sandbox:
            Path(work, "lock").unlink(missing_ok=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _run(argv: Sequence[str], what: str, env: Optional[Mapping[str, str]] = None) -> None:
    proc = subprocess.run(
        list(argv),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=None if env is None else dict(env),
    )
    if proc.returncode not in (0, 2):  # unsquashfs: 2 is "non-fatal errors"
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        raise _Failed(f"{what} failed: {shown('; '.join(lines[-2:]) or proc.returncode)}")


def _build_stage(
    plan: DefBuildPlan,
    stage: StagePlan,
    base: Optional[_Base],
    root: str,
    roots: list[str],
    faked: Optional[_Faked],
) -> dict[str, str]:
    """Make the stage's sandbox `root`; return its environment (base, %post's)."""
    fake = _fake_env(plan, faked)
    if base is None:
        os.mkdir(root, 0o755)
    else:
        _say(plan, f"{stage.label}: extracting {shown(stage.source)}")
        argv = ["unsquashfs", "-no-progress", "-quiet", "-offset", str(base.offset)]
        argv += ["-no-xattrs"] if plan.mode != "root" else []
        argv += ["-dest", root, base.sif]
        _run(argv, f"unsquashfs of {shown(stage.source)}", {**os.environ, **fake})
        os.chmod(root, 0o755)
    env = dict(base.env) if base else {}
    if stage.setup:
        _say(plan, f"{stage.label}: %setup on the host")
        setup_env = {**os.environ, "APPTAINER_ROOTFS": root, "SINGULARITY_ROOTFS": root}
        proc = subprocess.run(["/bin/sh", "-e", "-c", stage.setup], env=setup_env)
        if proc.returncode != 0:
            raise _Failed(
                f"{plan.recipe} line {_section_header(plan, stage, 'setup')}: %setup failed "
                f"(exit status {proc.returncode}); fix it"
            )
    for copy in stage.copies:
        _copy(plan, stage, copy, root, roots)
    if stage.post:
        _say(plan, f"{stage.label}: %post")
        env = _run_post(plan, stage, root, env, fake)
    return env


def _section_header(plan: DefBuildPlan, stage: StagePlan, name: str) -> int:
    ends = [*(s.first_line for s in plan.stages[1:]), 1 << 30]
    return _section_line(plan.text, stage.first_line, ends[stage.index], name)


def _in_root(root: str, path: str) -> str:
    """The host path of image path `path` under `root`, its symlinks followed inside."""
    from rankwire.runtime.imagepath import host_path

    found = host_path(root, path)
    if found is None:
        raise _Failed(f"{shown(path)}: too many symbolic links in the image; fix the links")
    return found


def _copy(plan: DefBuildPlan, stage: StagePlan, copy: Copy, root: str, roots: list[str]) -> None:
    if copy.from_stage is None:
        sources = list(copy.sources)
    else:
        src_root = roots[copy.from_stage]
        sources = sorted(glob.glob(_in_root(src_root, copy.sources[0])))
        if not sources:
            raise _Failed(
                f"{plan.recipe} line {copy.line}: %files from "
                f"{plan.stages[copy.from_stage].label[6:]}: {shown(copy.sources[0])} does not "
                "exist in that stage; fix the path or make it in that stage's %post"
            )
    dst = _in_root(root, copy.dst)
    parent = os.path.dirname(dst.rstrip("/")) or root
    os.makedirs(parent, exist_ok=True)
    proc = subprocess.run(
        ["cp", "-fHr", "--preserve=mode,timestamps,links", "--", *sources, dst],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise _Failed(
            f"{plan.recipe} line {copy.line}: %files copy to {shown(copy.dst)} failed: "
            f"{shown(_last_line(proc.stderr) or proc.returncode)}; fix the destination"
        )


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


# The host side of a %post or %test run, inside its own mount and PID namespaces: /dev
# nodes of the host on a tmpfs, a new devpts, resolv.conf, fakeroot's library, then chroot.
_RUNNER = r"""
set -e
root=$1; shift
mount -t tmpfs -o mode=755,size=1m rankwire-dev "$root/dev"
for n in null zero full random urandom tty; do
    : > "$root/dev/$n"; mount --bind "/dev/$n" "$root/dev/$n"
done
mkdir "$root/dev/shm" "$root/dev/pts"; chmod 1777 "$root/dev/shm"
ln -s /proc/self/fd "$root/dev/fd"
# A devpts of its own: apt runs dpkg on a pty to log its output ("E: Can not write log
# (Is /dev/pts mounted?)" without one). Best effort: the build goes on without it.
if mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 rankwire-pts "$root/dev/pts" \
        2>/dev/null; then
    ln -s pts/ptmx "$root/dev/ptmx"
fi
r="$root/etc/resolv.conf"
if [ -f "$r" ] && [ ! -L "$r" ] && [ -f /etc/resolv.conf ]; then
    mount --bind /etc/resolv.conf "$r"
fi
if [ -n "$RANKWIRE_FAKEROOT_DIR" ]; then
    mount --bind -o ro "$RANKWIRE_FAKEROOT_DIR" "$root$RANKWIRE_FAKEROOT_DIR"
fi
unset RANKWIRE_FAKEROOT_DIR
exec chroot "$root" "$@"
"""


def _made_dirs(root: str, path: str) -> list[str]:
    """Create image dir `path` under `root`; the host paths created, deepest last."""
    made = []
    current = root
    for part in path.strip("/").split("/"):
        current = os.path.join(current, part)
        if not os.path.lexists(current):
            os.mkdir(current, 0o755)
            made.append(current)
    return made


def _chrooted(
    plan: DefBuildPlan,
    root: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    fake: Mapping[str, str],
    stderr_lines: list[str],
) -> int:
    """Run `argv` chrooted in `root`, output passed through (stderr also kept); its status."""
    made: list[str] = []
    created: list[str] = []
    for d in ("proc", "dev", "etc"):
        made += _made_dirs(root, d)
    resolv = os.path.join(root, "etc/resolv.conf")
    if not os.path.lexists(resolv):
        open(resolv, "w").close()
        created.append(resolv)
    run_env = dict(env)
    if fake:
        libdir = os.path.dirname(fake["LD_PRELOAD"])
        made += _made_dirs(root, libdir)
        run_env.update(fake)
        run_env["RANKWIRE_FAKEROOT_DIR"] = libdir
    full = [
        "unshare", "--mount", "--pid", "--fork", "--kill-child", f"--mount-proc={root}/proc",
        "--", "/bin/sh", "-c", _RUNNER, "rankwire-build", root, *argv,
    ]  # fmt: skip
    try:
        proc = subprocess.Popen(
            full, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=run_env, text=True,
            errors="replace", preexec_fn=lambda: _child_setup(bool(fake)),
        )  # fmt: skip
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line)
            stderr_lines.append(line.rstrip("\n"))
        sys.stderr.flush()
        return proc.wait()
    finally:
        for path in created:
            os.unlink(path)
        for path in reversed(made):
            os.rmdir(path)


def _failed_command(lines: Sequence[str]) -> str:
    traced = [
        ln[2:] if ln.startswith("+ ") else ln.lstrip("+ ") for ln in lines if ln.startswith("+")
    ]
    return traced[-1].strip() if traced else ""


def _script_line(body: str, header_line: int, command: str) -> int:
    """The recipe line holding `command` in a script starting after `header_line`."""
    if command:
        numbered = list(enumerate(body.split("\n"), header_line + 1))
        for number, text in reversed(numbered):
            if text.strip() == command:
                return number
        first = command.split()[0]
        for number, text in reversed(numbered):
            if text.strip().startswith(first):
                return number
    return header_line


def _run_post(
    plan: DefBuildPlan,
    stage: StagePlan,
    root: str,
    env: Mapping[str, str],
    fake: Mapping[str, str],
) -> dict[str, str]:
    env_dir = root + "/.singularity.d/env"
    os.makedirs(env_dir, exist_ok=True)
    env_file = root + POST_ENV_FILE
    if not os.path.lexists(env_file):
        open(env_file, "w").close()
    start = post_env(env)
    run_env = {**start, **{k: os.environ[k] for k in PROXY_VARS if k in os.environ}}
    lines: list[str] = []
    argv = [*stage.post_argv, "-e", "-x", "-c", stage.post]
    code = _chrooted(plan, root, argv, run_env, fake, lines)
    if code != 0:
        command = _failed_command(lines)
        line = _script_line(stage.post, stage.post_line, command)
        what = f" at '{shown(command)}'" if command else ""
        raise _Failed(
            f"{plan.recipe} line {line}: %post of {stage.label} failed{what} (exit status "
            f"{code}); fix that line, or add --keep-sandbox to look at the sandbox"
        )
    added = _sourced_env(plan, root, env_file, start)
    os.unlink(env_file)
    merged = dict(env)
    merged.update(added)
    return merged


def _sourced_env(
    plan: DefBuildPlan, root: str, script_file: str, start: Mapping[str, str]
) -> dict[str, str]:
    """What sourcing `script_file` (the host path of a file in the image) changes in the
    environment, evaluated by the image's own shell: shell code works as it will at run
    time, and the values recorded are final (`$PATH` references expanded)."""
    with open(script_file, encoding="utf-8", errors="replace") as f:
        if not f.read().strip():
            return {}
    image_path = script_file[len(root) :]
    dumps = []
    for script in ("env -0", f'. "{image_path}" >/dev/null 2>&1 </dev/null; env -0'):
        proc = subprocess.run(
            ["chroot", root, "/bin/sh", "-c", script],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=dict(start),
        )
        if proc.returncode != 0:
            raise _Failed(
                f"{plan.recipe}: cannot evaluate {image_path} with the image's /bin/sh and "
                f"env (exit status {proc.returncode}); install a shell and env in the image"
            )
        dumps.append(_env0(proc.stdout))
    old, new = dumps
    skip = {"PWD", "SHLVL", "OLDPWD", "_"}
    return {k: v for k, v in new.items() if k not in skip and old.get(k) != v}


def _env0(data: bytes) -> dict[str, str]:
    env = {}
    for item in data.split(b"\0"):
        key, sep, value = item.decode("utf-8", "replace").partition("=")
        if sep and re.match(r"[A-Za-z_][A-Za-z0-9_]*\Z", key):
            env[key] = value
    return env


def _environment(
    plan: DefBuildPlan, stage: StagePlan, root: str, env: Mapping[str, str], fake: Mapping[str, str]
) -> dict[str, str]:
    """The image environment: the stage's so far, then %environment, values final."""
    merged = dict(env)
    if not stage.environment.strip():
        return merged
    if os.path.exists(root + "/bin/sh"):
        tmp = root + "/.rankwire-environment.sh"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(stage.environment)
        try:
            merged.update(_sourced_env(plan, root, tmp, post_env(env)))
        finally:
            os.unlink(tmp)
        for key in (
            "APPTAINER_ENVIRONMENT",
            "SINGULARITY_ENVIRONMENT",
            "APPTAINER_CONTAINER",
            "SINGULARITY_CONTAINER",
        ):
            merged.pop(key, None)
        return merged
    from rankwire.runtime.imagemeta import parse_environment

    scope = {"PATH": DEFAULT_PATH, **merged}
    for key, value in parse_environment(stage.environment, f"{plan.recipe} %environment").items():
        merged[key] = scope[key] = expand(value, scope)
    return merged


def _write_meta_file(root: str, name: str, content: str, mode: int) -> None:
    path = root + "/.singularity.d/" + name
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.lexists(path):
        os.unlink(path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(content)
    os.chmod(path, mode)


def _finish(
    plan: DefBuildPlan,
    stage: StagePlan,
    base: Optional[_Base],
    root: str,
    env: Mapping[str, str],
    faked: Optional[_Faked],
) -> None:
    fake = _fake_env(plan, faked)
    image_env = _environment(plan, stage, root, env, fake)
    runscript = (
        stage.runscript if stage.runscript is not None else (base.runscript if base else None)
    )
    labels = final_labels(base.labels if base else {}, stage)
    if stage.startscript:
        _write_meta_file(root, "startscript", "#!/bin/sh\n\n" + stage.startscript, 0o755)
    if stage.help:
        _write_meta_file(root, "runscript.help", stage.help, 0o644)
    if stage.test:
        _write_meta_file(root, "test", "#!/bin/sh\n\n" + stage.test, 0o755)
    if plan.run_test:
        _say(plan, f"{stage.label}: %test")
        lines: list[str] = []
        test_env = {
            **post_env(image_env),
            **{k: os.environ[k] for k in PROXY_VARS if k in os.environ},
        }
        code = _chrooted(
            plan, root, ["/bin/sh", "-e", "-x", "-c", stage.test], test_env, fake, lines
        )
        if code != 0:
            command = _failed_command(lines)
            line = _script_line(stage.test, stage.test_line, command)
            what = f" at '{shown(command)}'" if command else ""
            raise _Failed(
                f"{plan.recipe} line {line}: %test failed{what} (exit status {code}), so no "
                "image was written; fix the image or the test, or build with --notest"
            )
    if plan.sandbox:
        _to_sandbox(plan, root, image_env, labels, runscript)
        return
    _pack(plan, stage, root, image_env, labels, runscript, fake)


def _to_sandbox(
    plan: DefBuildPlan,
    root: str,
    env: Mapping[str, str],
    labels: Mapping[str, str],
    runscript: Optional[str],
) -> None:
    from rankwire.runtime.imagemeta import environment_file, runscript_file

    _write_meta_file(root, "Singularity", plan.text, 0o644)
    _write_meta_file(
        root, "labels.json", json.dumps(dict(labels), indent="\t", sort_keys=True) + "\n", 0o644
    )
    _write_meta_file(root, "runscript", runscript_file(runscript), 0o755)
    _write_meta_file(root, "env/90-environment.sh", environment_file(env, True), 0o755)
    try:
        os.rename(root, plan.out)
    except OSError as err:
        if os.path.lexists(plan.out):
            raise _Failed(
                f"--sandbox {shown(plan.out)} exists; remove it or choose another directory"
            ) from None
        shutil.copytree(root, plan.out, symlinks=True)
        del err


def _pack(
    plan: DefBuildPlan,
    stage: StagePlan,
    root: str,
    env: Mapping[str, str],
    labels: Mapping[str, str],
    runscript: Optional[str],
    fake: Mapping[str, str],
) -> None:
    from rankwire.runtime.build import apply_build, plan_build

    _say(plan, f"packing {shown(plan.out)}")
    build_plan = plan_build(
        plan.out,
        root,
        labels=labels,
        env=env,
        runscript=runscript,
        literal_env=True,
        recorded_deffile=(plan.text, dict(stage.header)),
        keep_owners=True,
        compression=plan.compression,
    )
    saved = {k: os.environ.get(k) for k in fake}
    os.environ.update(fake)
    try:
        apply_build(build_plan, scratch=Path(os.path.dirname(root)))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# -- entry point ------------------------------------------------------------------------


def read_recipe(path: str) -> tuple[str, DefFile]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise UserError(
            f"definition file {shown(path)}: {err.strerror}; give a readable file"
        ) from None
    defn = parse(data, path)
    return data.decode("utf-8"), defn


def build_from_deffile(
    out: str,
    recipe: str,
    *,
    sandbox: bool = False,
    notest: bool = False,
    allow_setup: bool = False,
    keep_sandbox: bool = False,
    ignore_subuid: bool = False,
    verbose: bool = False,
    access: Optional[Access] = None,
    arch: Optional[str] = None,
    compression: Optional[str] = None,
    warn: Callable[[str], None] = lambda line: print(f"rankwire: {line}", file=sys.stderr),
) -> None:
    text, defn = read_recipe(recipe)
    for line in defn.warnings:
        warn(line)
    facts = gather_facts(defn, ignore_subuid)
    out_path = os.path.abspath(out)
    if sandbox and os.path.lexists(out_path):
        raise UserError(f"--sandbox {shown(out)} exists; remove it or choose another directory")
    plan = plan_defbuild(
        defn,
        text,
        facts,
        recipe=recipe,
        out=out_path,
        sandbox=sandbox,
        notest=notest,
        allow_setup=allow_setup,
        keep_sandbox=keep_sandbox,
        verbose=verbose,
        compression=compression,
    )
    execute(plan, access, arch)
