"""Facts about the invoking user and the filesystem the planner asks about (I/O here)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from rankwire.runtime.plan import UserFacts, cache_dir
from rankwire.runtime.slurmfacts import slurm_step


def user_facts() -> UserFacts:
    """Who runs us, where, with what environment, and in which Slurm step."""
    home = os.environ.get("HOME") or os.path.expanduser("~")
    return UserFacts(
        uid=os.getuid(),
        gid=os.getgid(),
        home=home,
        cwd=os.getcwd(),
        environ=dict(os.environ),
        cache_dir=cache_dir(os.environ, home),
        slurm=slurm_step(os.environ, os.getuid()),
    )


def existing_paths(paths: Iterable[str]) -> frozenset[str]:
    """Those of `paths` that exist (`plan.paths_to_probe` says which to ask about)."""
    return frozenset(p for p in paths if os.path.exists(p))
