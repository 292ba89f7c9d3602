"""What a finished rankwire command must not leave behind, per user."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

from harness.procs import ancestors
from harness.users import User

# comm names (15 chars max) of everything rankwire starts: the CLI and launcher, the
# holder (it names itself), FUSE daemons, and the test programs run as ranks (the names
# harness.mpi, the PMI and fabric tests, harness.multinode and test_faults compile to).
WATCHED = (
    "rankwire",
    "rankwire-py",
    "apptainer-mpiru",
    "rankwire-holder",
    "rankwire-bridge",
    "rankwire-init",
    "rankwire-watch",
    "squashfuse",
    "squashfuse_ll",
    "fuse-overlayfs",
    "hello_mpich",
    "hello_ompi",
    "hello_ompi5",
    "hello_wheel",
    "fail_mpich",
    "fail_ompi",
    "fault_rank",
    "mpi_maps",
    "mpi_lib",
    "mpi_lib_abi",
    "nodeinfo",
    "pmi2test",
    "xnode_mpich",
    "xnode_ompi",
)


# Set by conftest for the whole test session; every process the tests start inherits it
# (holders and FUSE daemons included), so processes of other sessions on a shared
# machine are never mistaken for ours.
SESSION_VAR = "RANKWIRE_TEST_SESSION"
# Files are not marked: those made before the session are another session's business.
SESSION_START = time.time()


def _ours(proc: Path) -> bool:
    marker = f"{SESSION_VAR}={os.environ.get(SESSION_VAR, '')}".encode()
    try:
        return marker in (proc / "environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _kept_plan(path: Path) -> bool:
    """An exec plan or a plugin holder's recipe (runtime/joinplan.py), or a launch plan
    (launcher/plancache.py): kept on purpose, for the next start of the same request."""
    return (
        path.name.startswith(("exec-", "launch-", "holder-", "plugin-"))
        and path.name.endswith(".plan")
        and path.is_file()
    )


def user_leftovers(user: User) -> list[str]:
    """Processes, mounts and runtime files of `user` that a finished run must not leave."""
    found, mine = [], ancestors()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in mine:
            continue
        try:
            if proc.stat().st_uid != user.uid:
                continue
            comm = (proc / "comm").read_text().strip()
        except OSError:
            continue
        if comm in WATCHED and _ours(proc):
            found.append(f"process {proc.name} {comm}")
    found += [
        f"mount {line}"
        for line in Path("/proc/mounts").read_text().splitlines()
        if "rankwire" in line
    ]
    # The CLI's runtime dir, its fallback when another user made that one, the plugin's.
    files: list[Path] = []
    for rdir in (
        Path(f"/tmp/rankwire-{user.uid}"),
        Path(user.home or "/nonexistent") / ".cache/rankwire/run",
        Path(f"/run/rankwire/{user.uid}"),
    ):
        if rdir.is_dir():
            # exec and launch plans and holders' recipes are kept on purpose: a plan per
            # image and words (or launch words, or container plan), a few dozen of each at
            # most
            files += [p for p in rdir.iterdir() if p.name != "instances" and not _kept_plan(p)]
            if (rdir / "instances").is_dir():
                files += list((rdir / "instances").iterdir())
    files += _partials(user)
    if files:
        busy = paths_in_use()
        found += [f"file {p}" for p in files if not is_used(p, busy)]
    return found


def paths_in_use() -> set[str]:
    """Paths live processes use: bound Unix sockets, open files, working dirs. A runtime
    file one of them uses belongs to a live holder or server: ours is reported as a
    process, another session's (on a shared machine) is none of our business."""
    paths = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 8:
                paths.add(fields[7])
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            paths.add(os.readlink(proc / "cwd"))
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    paths.add(os.readlink(fd))
    return paths


def is_used(path: Path, busy: set[str]) -> bool:
    """Whether `path`, or anything in it, is in use; an instance's .json and .plan go with its
    socket, a session dir s-<id> with its e-<id>.sock."""
    names = [str(path)]
    if path.suffix in (".json", ".plan"):
        names.append(str(path.with_suffix(".sock")))
    if path.name.startswith("s-"):
        names.append(str(path.with_name(f"e-{path.name[2:]}.sock")))
    return any(p == n or p.startswith(n + "/") for p in busy for n in names)


def _partials(user: User) -> list[Path]:
    """Half-done files of `user` made in this session: an extraction cut short (its
    `rootfs.tmp<pid>`, or an empty `sandbox/<key>`), a PMIx server's temp dir."""
    candidates: list[Path] = []
    sandbox = Path(user.home or "/nonexistent") / ".cache/rankwire/sandbox"
    try:
        for key in sandbox.iterdir() if sandbox.is_dir() else []:
            inside = list(key.iterdir()) if key.is_dir() else [key]
            candidates += [p for p in inside if p.name.startswith("rootfs.tmp")]
            candidates += [] if inside else [key]
    except OSError:  # not ours to read
        pass
    candidates += list(Path(tempfile.gettempdir()).glob("rankwire-pmix-*"))
    found = []
    for path in candidates:
        try:
            st = path.lstat()
        except OSError:
            continue
        if st.st_uid == user.uid and st.st_mtime >= SESSION_START:
            found.append(path)
    return found
