"""Host facts: read once into plain data, then handed to the planners.

Nothing here decides anything. What `rankwire doctor` tries on top of these is in
`runtime/doctorhost.py`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from rankwire.record import record

# Tools the runtime can use, in order of preference within each role.
TOOLS = (
    "squashfuse_ll",
    "squashfuse",
    "mksquashfs",
    "unsquashfs",
    "fusermount3",
    "fuse-overlayfs",
    "mpiexec.hydra",
    "mpirun.openmpi",
    "srun",
)


def read_int(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


@record
class HostFacts:
    """What this host offers; `root` lets tests point it at a recorded tree."""

    kernel: str
    machine: str
    uid: int
    gid: int
    max_user_namespaces: Optional[int]
    unprivileged_userns_clone: Optional[int]  # Debian knob; None where absent
    dev_fuse_usable: bool
    tools: dict[str, Optional[str]]

    @property
    def userns_allowed(self) -> bool:
        if self.max_user_namespaces == 0:
            return False
        return self.unprivileged_userns_clone != 0 or self.uid == 0

    def tool(self, name: str) -> Optional[str]:
        return self.tools.get(name)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["userns_allowed"] = self.userns_allowed
        return d


def collect_host_facts(root: str = "/") -> HostFacts:
    """Read the facts of the running host (`root` prefixes /proc and /dev paths)."""
    r = Path(root)
    fuse = r / "dev/fuse"
    return HostFacts(
        kernel=os.uname().release,
        machine=os.uname().machine,
        uid=os.getuid(),
        gid=os.getgid(),
        max_user_namespaces=read_int(r / "proc/sys/user/max_user_namespaces"),
        unprivileged_userns_clone=read_int(r / "proc/sys/kernel/unprivileged_userns_clone"),
        dev_fuse_usable=fuse.exists() and os.access(fuse, os.R_OK | os.W_OK),
        tools={name: shutil.which(name) for name in TOOLS},
    )
