"""The plugin's named containers (`--container-name`) on two nodes of the cluster-in-a-box
(tests/harness/multinode.py): each node's container of a job is its own, lasts across the
job's steps, and goes with the job; a second job with the same name starts fresh.

The box's slurmd load the plugin at their start (a subclass writes the plugstack before
slurmd starts, as a site's does): slurmd runs SPANK job epilogs only for plugins it
loaded then, and the epilog is what ends a job's named containers.

Two boxes (`box` is parametrized):
- `node-local`: named_dir= left at its default, /run/rankwire/jobs, which is private per
  node on the box as on real nodes.
- `shared-dir`: named_dir=DIR on a file system every node sees (the box's directory), so
  only the slurmd key (spank/plan.slurmd_key: slurm.conf *and* node) keeps the two nodes'
  containers apart: all nodes of the box share one slurm.conf.

As root and as the unprivileged user (`runner`). Each job is an allocation
(`salloc --no-shell -N2`) whose steps the test runs with `srun --jobid`, then scancels.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_multinode import _shared_for

from harness.multinode import Member, MultiNodeCluster
from harness.slurm import HarnessError, without_queue_lines
from harness.spank import SpankInstall, allocate
from harness.spank import end_job as harness_end_job
from harness.users import User

pytestmark = [pytest.mark.multinode, pytest.mark.slurm, pytest.mark.slow]

NAME = "c"
MADE = "/made-by-step-1"
END_TIMEOUT = 60.0  # seconds for a job's end: scancel, epilog, dirs gone


class PluginBox(MultiNodeCluster):
    """The box, its plugstack loading the plugin before any slurmd starts; with
    `shared_named`, plugstack named_dir= is `named_base` (in the box's directory, which
    every node sees)."""

    def __init__(self, spank: SpankInstall, shared_named: bool, **kw: Any) -> None:
        super().__init__(**kw)
        self.spank = spank
        self.shared_named = shared_named
        self.mounts_at_start: dict[str, set[str]] = {}

    @property
    def named_base(self) -> Path:
        return self.root / "named"

    def _write_files(self) -> None:
        super()._write_files()
        text = self.spank.plugstack_line()
        if self.shared_named:  # the installed entry, and named_dir=
            entry = self.spank.conf.read_text().splitlines()
            required = [x for x in entry if x.startswith("required ")]
            assert len(required) == 1, entry
            text = f"{required[0]} named_dir={self.named_base}\n"
        (self.root / "plugstack.conf").write_text(text)

    def start(self, timeout: float = 30) -> PluginBox:
        super().start(timeout)
        self.mounts_at_start = {n: set(node_mounts(self, n)) for n in self.node_names}
        return self


@pytest.fixture(scope="module", params=["node-local", "shared-dir"])
def box(
    request: pytest.FixtureRequest,
    shared_dir: Path,
    unprivileged_user: User,
    spank_install: SpankInstall,
) -> Iterator[PluginBox]:
    if os.getuid() != 0:
        pytest.skip("the multi-node cluster needs root (netns, bridge, slurmd)")
    cluster = PluginBox(
        spank_install,
        request.param == "shared-dir",
        nodes=2,
        shared=[shared_dir, *_shared_for(unprivileged_user)],
    )
    try:
        cluster.start()
    except HarnessError as err:
        pytest.fail(f"multi-node cluster did not start: {err}")
    try:
        yield cluster
    finally:
        cluster.reap()
        cluster.stop()
    assert cluster.leftovers() == []


# -- what a node holds ---------------------------------------------------------------------
def _member(cluster: MultiNodeCluster, node: str) -> Member:
    return next(m for m in cluster.node_members if m.name == node)


def node_path(cluster: MultiNodeCluster, node: str, path: str) -> Path:
    """`path` as `node` sees it (its private /run and /tmp): through its slurmd's root."""
    return Path(f"/proc/{_member(cluster, node).pid}/root") / path.lstrip("/")


def node_mounts(cluster: MultiNodeCluster, node: str) -> list[str]:
    """The mounts of `node`'s mount namespace (its slurmd's), without their ids."""
    text = Path(f"/proc/{_member(cluster, node).pid}/mountinfo").read_text()
    return [line.split(" ", 2)[2] for line in text.splitlines()]


def slurmd_dir(cluster: PluginBox, node: str) -> Path:
    """BASE/SLURMD of `node`'s slurmd, as the host sees it."""
    from rankwire.spank.plan import JOBS_DIR, slurmd_key

    key = slurmd_key(str(cluster.conf), node)
    if cluster.shared_named:
        return cluster.named_base / key
    return node_path(cluster, node, JOBS_DIR) / key


def node_leftovers(cluster: PluginBox, users: list[User]) -> list[str]:
    """On each node: processes besides slurmd (holders, watchers, FUSE daemons, helpers,
    slurmstepd), its named-container dirs, the users' runtime files there (holder sockets,
    session dirs), mounts its mount namespace did not have at the start."""
    found = [f"process {p}" for p in cluster.strays()]
    for node in cluster.node_names:
        d = slurmd_dir(cluster, node)
        if d.exists():
            found += [f"{node}: dir {d}"] + [f"{node}: dir {e}" for e in d.iterdir()]
        for user in users:
            run = node_path(cluster, node, f"/run/rankwire/{user.uid}")
            if run.is_dir():
                found += [f"{node}: file {p}" for p in run.iterdir() if p.name != "instances"]
                if (run / "instances").is_dir():
                    found += [f"{node}: file {p}" for p in (run / "instances").iterdir()]
        new = set(node_mounts(cluster, node)) - cluster.mounts_at_start[node]
        found += [f"{node}: mount {m}" for m in sorted(new)]
    if cluster.shared_named and cluster.named_base.exists():
        found += [f"dir {e}" for e in cluster.named_base.iterdir()]
    return found


def wait_nothing_left(cluster: PluginBox, users: list[User], timeout: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout
    while node_leftovers(cluster, users) and time.monotonic() < deadline:
        time.sleep(0.1)
    return node_leftovers(cluster, users)


# -- jobs ------------------------------------------------------------------------------------
def step(
    cluster: MultiNodeCluster, runner: User, job: int, *args: str
) -> subprocess.CompletedProcess[str]:
    """`srun --jobid=JOB -N2 -n2 ARGS` as `runner`: a task on each node."""
    argv = ["srun", f"--jobid={job}", "-N2", "-n2", *args]
    return without_queue_lines(runner.run(argv, env=cluster.env, cwd="/tmp", timeout=120))


def end_job(cluster: PluginBox, job: int) -> None:
    """scancel `job`; wait until slurmctld forgot it and every node's epilog removed its
    named containers' dir."""
    dirs = [slurmd_dir(cluster, n) / str(job) for n in cluster.node_names]
    logs = [cluster.log(n) for n in cluster.node_names]
    harness_end_job(cluster, job, END_TIMEOUT, dirs, logs)


def lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return sorted(proc.stdout.splitlines())


# -- the tests -------------------------------------------------------------------------------
def test_named_container_per_node_across_steps(
    box: PluginBox, base_image: Path, runner: User, unprivileged_user: User
) -> None:
    """Step 1 writes the node's name into the container `c` on both nodes; step 2 (no
    image given) reads, on each node, what that node's step 1 wrote; a second job's `c`
    is fresh on both; while the job runs each node keeps its own dir (BASE/SLURMD/JOB/UID
    /c, SLURMD naming the node); after the jobs end nothing is left on either node."""
    users = [unprivileged_user, User("root", 0, 0, "/root")]
    image = f"--container-image={base_image}"
    assert node_leftovers(box, users) == []
    first = allocate(box, runner, nodes=2)
    try:
        other = allocate(box, runner, nodes=2)
        try:
            write = f'echo "$SLURMD_NODENAME" > {MADE}'
            wrote = step(box, runner, first, image, f"--container-name={NAME}", "sh", "-c", write)
            assert (wrote.returncode, wrote.stdout, wrote.stderr) == (0, "", "")
            for node in box.node_names:
                mine = slurmd_dir(box, node) / str(first) / str(runner.uid) / NAME
                assert mine.is_dir(), f"{node}: no {mine}"
            read = f'echo "$(cat {MADE}) read in $SLURMD_NODENAME"'
            got = step(box, runner, first, f"--container-name={NAME}", "sh", "-c", read)
            assert (got.returncode, lines(got), got.stderr) == (
                0,
                [f"{n} read in {n}" for n in box.node_names],
                "",
            )
            fresh = f'cat {MADE} 2>/dev/null || echo "fresh in $SLURMD_NODENAME"'
            new = step(box, runner, other, image, f"--container-name={NAME}", "sh", "-c", fresh)
            assert (new.returncode, lines(new), new.stderr) == (
                0,
                [f"fresh in {n}" for n in box.node_names],
                "",
            )
        finally:
            end_job(box, other)
    finally:
        end_job(box, first)
    assert wait_nothing_left(box, users) == []


@pytest.mark.skipif(not os.environ.get("RANKWIRE_BENCH"), reason="a measurement: RANKWIRE_BENCH=1")
def test_measure_joining_against_a_fresh_container_on_two_nodes(
    box: PluginBox, base_image: Path, runner: User, unprivileged_user: User
) -> None:
    """Not a check: `srun -N2 -n2 true` joining a named container that runs already on
    both nodes, in a fresh container, and without any (median of 7 each, ms), printed
    (run with -s)."""
    job = allocate(box, runner, nodes=2)
    image = f"--container-image={base_image}"
    kinds = {"bare": (), "fresh": (image,), "join": (f"--container-name={NAME}",)}
    try:
        made = step(box, runner, job, image, f"--container-name={NAME}", "true")
        assert made.returncode == 0, made.stderr
        times: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(7):
            for kind, args in kinds.items():
                t0 = time.monotonic()
                ran = step(box, runner, job, *args, "true")
                times[kind].append((time.monotonic() - t0) * 1000)
                assert ran.returncode == 0, ran.stderr
        medians = {k: statistics.median(v) for k, v in times.items()}
        where = "shared-dir" if box.shared_named else "node-local"
        print(
            f"\n{where} {runner.name}: "
            + ", ".join(f"{k} {m:.0f} ms" for k, m in medians.items())
            + f"; join - bare {medians['join'] - medians['bare']:.0f} ms"
        )
    finally:
        end_job(box, job)
