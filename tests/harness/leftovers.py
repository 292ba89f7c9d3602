"""What a finished rankwire command must not leave behind, per user."""

from __future__ import annotations

import os
from pathlib import Path

from harness.procs import ancestors
from harness.users import User

# comm names (15 chars max) of everything rankwire starts: the CLI and launcher, the
# holder (it names itself), FUSE daemons, and the test programs run as ranks.
WATCHED = (
    "rankwire",
    "apptainer-mpir",
    "rankwire-holder",
    "squashfuse",
    "squashfuse_ll",
    "fuse-overlayfs",
    "hello_mpich",
    "hello_ompi",
    "fail_mpich",
)


# Set by conftest for the whole test session; every process the tests start inherits it
# (holders and FUSE daemons included), so processes of other sessions on a shared
# machine are never mistaken for ours.
SESSION_VAR = "RANKWIRE_TEST_SESSION"


def _ours(proc: Path) -> bool:
    marker = f"{SESSION_VAR}={os.environ.get(SESSION_VAR, '')}".encode()
    try:
        return marker in (proc / "environ").read_bytes().split(b"\0")
    except OSError:
        return False


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
    for rdir in (
        Path(f"/tmp/rankwire-{user.uid}"),
        Path(user.home or "/nonexistent") / ".cache/rankwire/run",
        Path(f"/run/rankwire/{user.uid}"),
    ):
        if rdir.is_dir():
            found += [f"file {p}" for p in rdir.iterdir() if p.name != "instances"]
            if (rdir / "instances").is_dir():
                found += [f"file {p}" for p in (rdir / "instances").iterdir()]
    return found
