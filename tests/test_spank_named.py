"""The plugin's named containers (`--container-name`, Pyxis's) and `--container-save`,
under a real slurmd: a job's steps share the container NAME on the node, its changes last
until the job ends, the job's epilog (or the reaper) takes everything away.

Each job is an allocation (`salloc --no-shell`) whose steps the test runs with
`srun --jobid`, then ends with scancel (`harness.spank.end_job` waits for the epilog).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.slurm import SlurmCluster, running_cluster
from harness.spank import (
    SESSION_ROOTS,
    SpankInstall,
    allocate,
    end_job,
    named_leftovers,
    restart_slurmd,
    slurmd_dir,
    srun,
)
from harness.users import User

pytestmark = [pytest.mark.slurm]

HOST_ID = next(x for x in Path("/etc/os-release").read_text().splitlines() if x.startswith("ID="))


@pytest.fixture(scope="module")
def spank_cluster(spank_install: SpankInstall) -> Iterator[SlurmCluster]:
    """This module's own Slurm, whose slurmd reads the plugstack at its start, as a site's
    does: it runs SPANK job epilogs only then (the session's spank_cluster writes its
    plugstack after slurmd started, and other modules' tests expect no epilog between
    jobs: with one, the node stays COMPLETING a moment and srun says "queued")."""
    with running_cluster(
        "the Slurm fixture needs root", plugstack=spank_install.plugstack_line(), base="/run"
    ) as cluster:
        SESSION_ROOTS.append(cluster.root)
        yield cluster


@pytest.fixture
def no_named_left(spank_cluster: SlurmCluster, nothing_left: None) -> Iterator[None]:
    """`nothing_left` (no holder, FUSE daemon, runtime file), and no job dir."""
    yield
    assert named_leftovers(spank_cluster) == []


def errors(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """srun's stderr lines from the plugin."""
    return [line for line in proc.stderr.splitlines() if "rankwire:" in line]


def step(
    cluster: SlurmCluster, runner: User, job: int, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return srun(cluster, runner, f"--jobid={job}", "-n", "1", *args, env=env)


@pytest.mark.slow
def test_steps_of_a_job_share_the_named_container(
    spank_cluster: SlurmCluster, base_image: Path, runner: User, no_named_left: None
) -> None:
    """Step 1 writes into the container `box`, step 2 (no image given) reads it, a
    second job's `box` is its own; after the jobs nothing is left on the node."""
    image = f"--container-image={base_image}"
    first, other = allocate(spank_cluster, runner, "-n", "2"), allocate(spank_cluster, runner)
    try:
        write = "echo from-step-1 > /made-by-step-1; grep ^ID= /etc/os-release"
        wrote = step(spank_cluster, runner, first, image, "--container-name=box", "sh", "-c", write)
        assert (wrote.returncode, wrote.stdout) == (0, "ID=rankwire-test\n"), wrote.stderr
        read = step(spank_cluster, runner, first, "-n", "2", "--container-name=box",
                    "--container-mounts=/tmp:/host-tmp", "cat", "/made-by-step-1")  # fmt: skip
        assert (read.returncode, read.stdout) == (0, "from-step-1\n" * 2), read.stderr
        assert errors(read) == [
            "rankwire: warning: --container-mounts is ignored: the job's container box runs "
            "already, with the mounts of the step that started it"
        ]
        fresh = step(spank_cluster, runner, other, image, "--container-name=box",
                     "sh", "-c", "cat /made-by-step-1 2>/dev/null || echo fresh")  # fmt: skip
        assert (fresh.returncode, fresh.stdout) == (0, "fresh\n"), fresh.stderr
    finally:
        end_job(spank_cluster, first)
        end_job(spank_cluster, other)


# Values Slurm makes anew for each step (the ticket's key has their names only).
STEP_VALUES = re.compile(
    r"(SLURM_STEP_?ID|SLURM_SRUN_COMM_PORT|SLURM_STEP_LAUNCHER_PORT|SLURM_TASK_PID"
    r"|SLURM_PMIXP_ABORT_AGENT_PORT|PMI_JOBID|PMIX_\w+)="
)


def task_view(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """A task's `pwd; env`, the variables sorted, less the values Slurm makes per step."""
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    cwd, *env = proc.stdout.splitlines()
    return [cwd, *sorted(line for line in env if not STEP_VALUES.match(line))]


@pytest.mark.slow
def test_a_repeated_join_skips_the_helper(
    spank_cluster: SlurmCluster,
    base_image: Path,
    policy: Path,
    runner: User,
    no_named_left: None,
) -> None:
    """A step whose request repeats the last one the helper ran for the job's container
    joins its holder from the shim's ticket: the helper's check phase, which rewrites
    root's record of the image, does not run; the tasks get what the helper gave them, to
    the byte. Another request (one more variable), a file the check read that changed
    (the image; the site's policy, which may now refuse the step), or a holder that is
    gone, runs the helper again, which writes the ticket anew."""
    from rankwire.runtime.instance import _ping

    job = allocate(spank_cluster, runner)
    jobdir = slurmd_dir(spank_cluster) / str(job)
    ticket, record = jobdir / f".{runner.uid}.join", jobdir / f".{runner.uid}.box.image"
    args = (f"--container-image={base_image}", "--container-name=box")
    show = ("sh", "-c", "pwd; env")

    def version(path: Path) -> tuple[int, int]:
        """A rewrite (a new file renamed over it) changes it: the inode number alone may
        be the old one's again where /run is no tmpfs (ext4 reuses a freed one)."""
        st = path.stat()
        return st.st_ino, st.st_ctime_ns

    try:
        first = step(spank_cluster, runner, job, *args, *show)
        made = ticket.stat()
        assert (made.st_uid, made.st_mode & 0o777, task_view(first)[0]) == (0, 0o600, "/tmp")
        kept = (version(ticket), version(record))
        joined = step(spank_cluster, runner, job, *args, *show)
        assert (version(ticket), version(record)) == kept, "the helper ran"
        ticket.unlink()
        helped = step(spank_cluster, runner, job, *args, *show)
        assert version(record) != kept[1] and ticket.exists(), "the helper did not run"
        assert task_view(joined) == task_view(helped) == task_view(first)
        assert "SLURM_STEP_ID=1" in joined.stdout.splitlines()  # the step's own values

        kept = (version(ticket), version(record))
        env = {**spank_cluster.env, "RANKWIRE_TEST_ONE_MORE": "1"}
        other = step(spank_cluster, runner, job, *args, *show, env=env)
        assert "RANKWIRE_TEST_ONE_MORE=1" in task_view(other)
        assert version(ticket) != kept[0] and version(record) != kept[1], "the ticket was replayed"

        kept = (version(ticket), version(record))
        same = step(spank_cluster, runner, job, *args, *show, env=env)
        assert (version(ticket), version(record)) == kept, "the helper ran"
        os.utime(base_image)  # a file the check read changed: the check runs again
        touched = step(spank_cluster, runner, job, *args, *show, env=env)
        assert task_view(touched) == task_view(same) == task_view(other)
        assert version(ticket) != kept[0] and version(record) != kept[1], "no check of the image"

        policy.write_text(policy.read_text() + "allow_writable = false\n")
        refused = step(spank_cluster, runner, job, *args, *show, env=env)
        assert (refused.returncode != 0, errors(refused)) == (True, [
            f"slurmstepd-{spank_cluster.nodename}: error: rankwire: policy: --container-name "
            "keeps the container's changes, and this site allows no writable containers; "
            "drop it"
        ]), refused.stderr  # fmt: skip
        assert not ticket.exists()
        policy.write_text(policy.read_text().replace("allow_writable = false\n", ""))
        restored = step(spank_cluster, runner, job, *args, *show, env=env)
        assert task_view(restored) == task_view(other) and ticket.exists()

        sock = Path(f"/run/rankwire/{runner.uid}/instances/job{job}-box.sock")
        info = _ping(str(sock))
        assert info is not None
        os.kill(int(info["pid"]), signal.SIGKILL)
        kept = (version(ticket), version(record))
        again = step(spank_cluster, runner, job, *args, *show, env=env)
        assert task_view(again) == task_view(other)
        assert version(ticket) != kept[0] and version(record) != kept[1], "no new holder's ticket"
        assert (_ping(str(sock)) or {}).get("pid") not in (None, info["pid"])
    finally:
        end_job(spank_cluster, job)
    assert not jobdir.exists()


@pytest.mark.slow
def test_modes_refusals_and_another_image(
    spank_cluster: SlurmCluster,
    base_image: Path,
    shared_dir: Path,
    runner: User,
    no_named_left: None,
) -> None:
    """Pyxis's modes: `exec` needs the container, `create` must make it, `no_exec` makes
    it but runs the tasks on the host; another image under an existing name is ignored
    with a warning. Each refusal is one line on srun's stderr."""
    other = shared_dir / "named-other.sif"
    if not other.exists():
        other.write_bytes(base_image.read_bytes())
        other.chmod(0o644)
    image = f"--container-image={base_image}"
    said = f"slurmstepd-{spank_cluster.nodename}: error: rankwire: --container-name"
    os_id = ["grep", "^ID=", "/etc/os-release"]
    job = allocate(spank_cluster, runner)
    try:
        for args, line in (
            (("--container-name=box:exec",), f"{said} box:exec: this job has no container box on "
             "this node: create it first (without :exec, with --container-image)"),
            (("--container-name=box",), f"{said} box: this job has no container box on this "
             "node yet: give --container-image IMG to create it"),
            ((image, "--container-name=box:sometimes"), f"{said} box:sometimes: the mode after "
             "':' is one of auto, create, exec, no_exec"),
            ((image, "--container-name=../box"), f"{said} ../box: use letters, digits, '.', "
             "'_', '-' (at most 64)"),
        ):  # fmt: skip
            refused = step(spank_cluster, runner, job, *args, "true")
            assert (refused.returncode != 0, errors(refused)) == (True, [line]), refused.stderr
        made = step(spank_cluster, runner, job, image, "--container-name=box:no_exec", *os_id)
        assert (made.returncode, made.stdout, made.stderr) == (0, f"{HOST_ID}\n", "")
        again = step(spank_cluster, runner, job, image, "--container-name=box:create", "true")
        assert (again.returncode != 0, errors(again)) == (True, [
            f"{said} box:create: this job's container box exists already on this node: drop "
            ":create to use it, or choose another name"
        ]), again.stderr  # fmt: skip
        joined = step(spank_cluster, runner, job, "--container-name=box:exec", *os_id)
        assert (joined.returncode, joined.stdout, joined.stderr) == (0, "ID=rankwire-test\n", "")
        still = step(spank_cluster, runner, job, "--container-name=box:no_exec", *os_id)
        assert (still.returncode, still.stdout, still.stderr) == (0, f"{HOST_ID}\n", "")
        ignored = step(spank_cluster, runner, job, f"--container-image={other}",
                       "--container-name=box", *os_id)  # fmt: skip
        assert (ignored.returncode, ignored.stdout) == (0, "ID=rankwire-test\n"), ignored.stderr
        assert errors(ignored) == [
            f"rankwire: warning: container box runs {base_image}; --container-image {other} "
            "is ignored (another name makes a new container)"
        ]
    finally:
        end_job(spank_cluster, job)


@pytest.mark.slow
def test_a_named_container_outlives_slurmd_and_its_holder(
    spank_cluster: SlurmCluster, base_image: Path, runner: User, no_named_left: None
) -> None:
    """slurmd restarted meanwhile: the next step joins the container; its holder killed
    (as a step's cgroup or a node's OOM killer would): the next step starts it again on
    its kept changes."""
    from rankwire.runtime.instance import _ping

    job = allocate(spank_cluster, runner)
    try:
        wrote = step(spank_cluster, runner, job, f"--container-image={base_image}",
                     "--container-name=box", "sh", "-c", "echo kept > /kept")  # fmt: skip
        assert wrote.returncode == 0, wrote.stderr
        restart_slurmd(spank_cluster)
        read = step(spank_cluster, runner, job, "--container-name=box", "cat", "/kept")
        assert (read.returncode, read.stdout, read.stderr) == (0, "kept\n", "")
        sock = Path(f"/run/rankwire/{runner.uid}/instances/job{job}-box.sock")
        info = _ping(str(sock))
        assert info is not None
        os.kill(int(info["pid"]), signal.SIGKILL)
        again = step(spank_cluster, runner, job, "--container-name=box:exec", "cat", "/kept")
        assert (again.returncode, again.stdout, again.stderr) == (0, "kept\n", "")
        assert (_ping(str(sock)) or {}).get("pid") not in (None, info["pid"])
    finally:
        end_job(spank_cluster, job)


def test_the_reaper_ends_containers_of_jobs_that_are_gone(
    spank_cluster: SlurmCluster, base_image: Path, unprivileged_user: User, no_named_left: None
) -> None:
    """A job's named container whose epilog never came (slurmd was down, the plugin was
    loaded later): the next container step on the node ends it and removes its dir. Made
    here as such a container is: a persistent holder of the user's keeping its changes in
    JOBS/SLURMD/JOB/UID/NAME, for a job slurmctld does not know."""
    from harness.spank import slurmd_dir
    from harness.users import rw

    user, stale = unprivileged_user, 999999
    mine = slurmd_dir(spank_cluster) / str(stale) / str(user.uid)
    mine.parent.mkdir(parents=True, mode=0o755)
    mine.mkdir(mode=0o700)
    os.chown(mine, user.uid, user.gid)
    env = {**os.environ, "RANKWIRE_RUNTIME_DIR": f"/run/rankwire/{user.uid}"}
    started = rw(user, "instance", "start", "--writable-overlay", str(mine / "box"),
                 str(base_image), f"job{stale}-box", env=env)  # fmt: skip
    assert started.returncode == 0, started.stderr
    assert Path(f"/run/rankwire/{user.uid}/instances/job{stale}-box.sock").exists()
    ran = srun(spank_cluster, user, "-n", "1", f"--container-image={base_image}", "true")
    assert ran.returncode == 0, ran.stderr
    assert not mine.parent.exists()
    assert not Path(f"/run/rankwire/{user.uid}/instances/job{stale}-box.sock").exists()


@pytest.mark.slow
def test_container_save_packs_the_container(
    spank_cluster: SlurmCluster,
    base_image: Path,
    shared_dir: Path,
    runner: User,
    no_named_left: None,
) -> None:
    """--container-save: after the step, the container (image + changes) as a new SIF,
    written as the job user, with its origin in the labels; a named container runs on,
    an unnamed one goes."""
    from harness.users import rw
    from rankwire.runtime.imagemeta import read_image_metadata
    from rankwire.runtime.save import LABEL_FROM
    from rankwire.runtime.sif_read import SifImage

    saves = shared_dir / "named-saves"
    saves.mkdir(mode=0o1777, exist_ok=True)
    saves.chmod(0o1777)
    named, unnamed = saves / f"named-{runner.name}.sif", saves / f"unnamed-{runner.name}.sif"
    image = f"--container-image={base_image}"
    job = allocate(spank_cluster, runner)
    try:
        wrote = step(spank_cluster, runner, job, image, "--container-name=box",
                     "sh", "-c", "echo from-step-1 > /made-by-step-1")  # fmt: skip
        assert wrote.returncode == 0, wrote.stderr
        saved = step(spank_cluster, runner, job, "--container-name=box",
                     f"--container-save={named}", "true")  # fmt: skip
        assert (saved.returncode, saved.stderr) == (0, "")
        kept = step(
            spank_cluster, runner, job, "--container-name=box:exec", "cat", "/made-by-step-1"
        )
        assert (kept.returncode, kept.stdout) == (0, "from-step-1\n"), kept.stderr
    finally:
        end_job(spank_cluster, job)
    once = srun(spank_cluster, runner, "-n", "1", image, f"--container-save={unnamed}",
                "sh", "-c", "echo unnamed > /unnamed-file")  # fmt: skip
    assert (once.returncode, once.stderr) == (0, "")
    for out, path, text in ((named, "/made-by-step-1", "from-step-1"),
                            (unnamed, "/unnamed-file", "unnamed")):  # fmt: skip
        assert out.stat().st_uid == runner.uid
        ran = rw(runner, "exec", str(out), "cat", path)
        assert (ran.returncode, ran.stdout) == (0, f"{text}\n"), ran.stderr
        with SifImage.open(str(out)) as sif:
            assert read_image_metadata(sif).labels[LABEL_FROM] == str(base_image)
        out.unlink()


@pytest.mark.slow
def test_a_save_killed_midway_leaves_the_old_file(
    spank_cluster: SlurmCluster,
    base_image: Path,
    shared_dir: Path,
    runner: User,
    no_named_left: None,
) -> None:
    """Saving over an existing file replaces it only once complete: the save killed
    while it packs leaves the old file and, soon after, no scratch dir."""
    saves = shared_dir / "named-saves"
    saves.mkdir(mode=0o1777, exist_ok=True)
    saves.chmod(0o1777)
    out = saves / f"atomic-{runner.name}.sif"
    out.write_text("the old one\n")
    os.chown(out, runner.uid, runner.gid)
    job = allocate(spank_cluster, runner)
    try:
        big = step(spank_cluster, runner, job, f"--container-image={base_image}",
                   "--container-name=box", "sh", "-c",
                   "head -c 200000000 /dev/urandom > /big")  # fmt: skip
        assert big.returncode == 0, big.stderr
        saving = subprocess.Popen(
            runner.argv(["srun", f"--jobid={job}", "-n", "1", "--container-name=box",
                         f"--container-save={out}", "true"]),
            env=spank_cluster.env, cwd="/tmp", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True,
        )  # fmt: skip
        killed = _kill_save_when_packing(saves, out.name)
        _, err = saving.communicate(timeout=120)
        assert killed, err
        assert out.read_text() == "the old one\n"
        deadline = time.monotonic() + 10
        while list(saves.glob(f".rankwire-save-{out.name}-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(saves.glob(f".rankwire-save-{out.name}-*")) == []
    finally:
        end_job(spank_cluster, job)
        out.unlink(missing_ok=True)


def _kill_save_when_packing(saves: Path, name: str, timeout: float = 60) -> bool:
    """SIGKILL `spank-helper save` once its scratch dir holds an unpacked image."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(saves.glob(f".rankwire-save-{name}-*/rootfs/big")):
            for proc in Path("/proc").iterdir():
                try:
                    argv = (proc / "cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if argv[-3:-1] == [b"spank-helper", b"save"] or argv[-2:] == [
                    b"spank-helper",
                    b"save",
                ]:
                    os.kill(int(proc.name), signal.SIGKILL)
                    return True
        time.sleep(0.01)
    return False


@pytest.mark.slow
def test_sbatch_and_salloc_options_reach_the_steps(
    spank_cluster: SlurmCluster,
    base_image: Path,
    shared_dir: Path,
    runner: User,
    no_named_left: None,
) -> None:
    """The options given to sbatch or salloc (registered there too, as Pyxis does), or
    their RANKWIRE_CONTAINER_* variables, reach every step of the allocation: step 1
    writes into the named container, step 2 reads it."""
    steps = (
        "srun -n 1 sh -c 'echo from-step-1 > /made-by-step-1'\n"
        "srun -n 1 sh -c 'cat /made-by-step-1; grep ^ID= /etc/os-release'\n"
    )
    want = "from-step-1\nID=rankwire-test\n"
    jobs = shared_dir / "named-jobs"
    jobs.mkdir(mode=0o1777, exist_ok=True)
    jobs.chmod(0o1777)
    script = jobs / "two-steps.sh"
    script.write_text(f"#!/bin/sh\n{steps}")
    script.chmod(0o755)
    out = jobs / f"two-steps-{runner.name}.out"
    options = [f"--container-image={base_image}", "--container-name=box"]
    env = {**spank_cluster.env, "RANKWIRE_CONTAINER_IMAGE": str(base_image),
           "RANKWIRE_CONTAINER_NAME": "box"}  # fmt: skip
    for argv, env_, output in (
        (["sbatch", "--wait", "-n", "1", "-o", str(out), *options, str(script)], None, out),
        (["salloc", "-n", "1", *options, str(script)], None, None),
        (["salloc", "-n", "1", str(script)], env, None),
    ):
        proc = runner.run(argv, env=env_ or spank_cluster.env, cwd="/tmp", timeout=120)
        assert proc.returncode == 0, (argv, proc.stderr)
        assert (output.read_text() if output else proc.stdout) == want, (argv, proc.stderr)
        job = re.search(r"(?:Submitted batch job|Granted job allocation) (\d+)",
                        proc.stdout + proc.stderr)  # fmt: skip
        assert job, proc.stdout + proc.stderr
        end_job(spank_cluster, int(job.group(1)))


def test_enforced_sites_refuse_kept_containers(
    spank_cluster: SlurmCluster, base_image: Path, policy: Path, runner: User, nothing_left: None
) -> None:
    """Under `enforce` root builds each step's container (read-only, no user namespace):
    nothing of it can be kept or packed by the user, so both options are refused; a site
    that allows no writable containers refuses them too."""
    said = f"slurmstepd-{spank_cluster.nodename}: error: rankwire: policy:"
    for conf, option, line in (
        ("enforce = true\n", "--container-name=box", f"{said} --container-name is not available "
         "here: this site enforces its containers (root builds them for one step, read-only); "
         "drop it"),
        ("enforce = true\n", "--container-save=/tmp/x.sif", f"{said} --container-save is not "
         "available here: this site enforces its containers (root builds them for one step, "
         "read-only); drop it"),
        ("allow_writable = false\n", "--container-name=box", f"{said} --container-name keeps "
         "the container's changes, and this site allows no writable containers; drop it"),
    ):  # fmt: skip
        policy.write_text(conf)
        refused = srun(spank_cluster, runner, "-n", "1", f"--container-image={base_image}",
                       option, "true")  # fmt: skip
        assert (refused.returncode != 0, errors(refused)) == (True, [line]), refused.stderr


def test_names_modes_and_dirs_are_planned() -> None:
    """The pure part (spank/plan.py): NAME[:MODE], the modes against what exists, where
    the changes live."""
    from rankwire.errors import UserError
    from rankwire.runtime.plan import Mount
    from rankwire.spank.plan import (
        Asked,
        joins_without_helper,
        named_base,
        parse_name,
        plan_named,
        slurmd_key,
    )

    assert parse_name(None, "--container-name") == (None, "auto")
    assert parse_name("box", "--container-name") == ("box", "auto")
    assert parse_name("a.b-c_1:no_exec", "--container-name") == ("a.b-c_1", "no_exec")
    modes = "the mode after ':' is one of"
    for bad, why in (("box:", modes), (":exec", "use letters"), ("a/b", "use letters"),
                     ("box:exec:x", modes)):  # fmt: skip
        with pytest.raises(UserError) as err:
            parse_name(bad, "--container-name")
        assert str(err.value).startswith(f"--container-name {bad}: {why}")

    def want(mode: str, image: str = "/i.sif") -> Asked:
        return Asked(image, "--container-image", (), None, (), False, "auto", False,
                     name="box", name_mode=mode)  # fmt: skip

    # Which requests a later step may repeat by joining without the helper (the ticket).
    mount = Mount("bind", "/data", "/data")
    for asked, fast in (
        (want("auto"), True),
        (want("exec"), True),
        (want("create"), False),
        (want("no_exec"), False),
        (dataclasses.replace(want("auto"), scope="global"), False),
        (dataclasses.replace(want("auto"), save="/x.sif"), False),
        (dataclasses.replace(want("auto"), mounts=(mount,)), False),
        (dataclasses.replace(want("auto"), name=None), False),
    ):
        assert (asked, joins_without_helper(asked)) == (asked, fast)

    assert plan_named(want("auto"), None, None).image == "/i.sif"
    assert plan_named(want("no_exec"), "/old.sif", None).image == "/old.sif"
    kept = plan_named(want("auto"), "/old.sif", "/i.sif")
    assert (kept.image, kept.warning) == ("/old.sif", "container box runs /old.sif; "
                                          "--container-image /i.sif is ignored (another name "
                                          "makes a new container)")  # fmt: skip
    assert plan_named(want("exec", ""), "/old.sif", None).warning is None
    for mode, recorded, image in (("exec", None, "/i.sif"), ("create", "/old.sif", "/i.sif"),
                                  ("auto", None, "")):  # fmt: skip
        with pytest.raises(UserError):
            plan_named(want(mode, image), recorded, None)
    assert slurmd_key(None) == "default"
    assert slurmd_key("/etc/slurm/slurm.conf") == "_etc_slurm_slurm.conf"
    assert slurmd_key("/x/\xe9.conf") == "_x___.conf"  # bytes, as the shim counts them
    assert named_base(()) == "/run/rankwire/jobs"
    assert named_base(("named_dir=/scratch/rw/",)) == "/scratch/rw"
    with pytest.raises(UserError):
        named_base(("named_dir=relative",))


@pytest.mark.slow
def test_global_scope_keeps_a_name_across_jobs(
    spank_cluster: SlurmCluster,
    spank_install: SpankInstall,
    base_image: Path,
    runner: User,
    no_named_left: None,
) -> None:
    """plugstack `container_scope=global` (Pyxis's default): a name is the user's across
    their jobs on the node; the job's epilog leaves it; `rankwire instance list|stop`
    (in the plugin's runtime dir) manage it, and its dir is the user's to remove."""
    from harness.spank import slurmd_dir
    from harness.users import rw

    conf = spank_install.conf.read_text().strip().splitlines()[-1]
    spank_cluster.plugstack.write_text(f"{conf} container_scope=global\n")
    kept = slurmd_dir(spank_cluster) / "global" / str(runner.uid) / "gbox"
    env = {**os.environ, "RANKWIRE_RUNTIME_DIR": f"/run/rankwire/{runner.uid}"}
    try:
        first = allocate(spank_cluster, runner)
        try:
            wrote = step(spank_cluster, runner, first, f"--container-image={base_image}",
                         "--container-name=gbox", "sh", "-c", "echo global > /kept")  # fmt: skip
            assert wrote.returncode == 0, wrote.stderr
        finally:
            end_job(spank_cluster, first)
        assert (kept / "rankwire-overlay.json").exists()
        second = allocate(spank_cluster, runner)
        try:
            read = step(spank_cluster, runner, second, "--container-name=gbox:exec", "cat", "/kept")
            assert (read.returncode, read.stdout, read.stderr) == (0, "global\n", "")
        finally:
            end_job(spank_cluster, second)
        listed = rw(runner, "instance", "list", env=env)
        assert listed.returncode == 0 and "gbox" in listed.stdout, listed.stdout + listed.stderr
        stopped = rw(runner, "instance", "stop", "gbox", env=env)
        assert stopped.returncode == 0, stopped.stderr
        removed = runner.run(["rm", "-rf", str(kept)])
        assert removed.returncode == 0, removed.stderr
    finally:
        spank_cluster.plugstack.write_text(spank_install.plugstack_line())
        for record in kept.parent.parent.glob(".*.image"):  # root's (helper._Allowed)
            record.unlink()
        for d in (kept.parent, kept.parent.parent, slurmd_dir(spank_cluster)):
            with contextlib.suppress(OSError):
                d.rmdir()


@pytest.mark.slow
def test_named_container_under_cgroup_proctrack(
    spank_cgroup_cluster: SlurmCluster, base_image: Path, runner: User, nothing_left: None
) -> None:
    """Under proctrack/cgroup (as most sites run) a step's end kills every process of
    its cgroup, the holder it started too: the next step starts the container again on
    its kept changes. The job's end still leaves nothing."""
    cluster = spank_cgroup_cluster
    restart_slurmd(cluster)  # for the job epilog (see `epilog_loaded`)
    job = allocate(cluster, runner)
    try:
        wrote = step(cluster, runner, job, f"--container-image={base_image}",
                     "--container-name=box", "sh", "-c", "echo kept > /kept")  # fmt: skip
        assert wrote.returncode == 0, wrote.stderr
        read = step(cluster, runner, job, "--container-name=box:exec", "cat", "/kept")
        assert (read.returncode, read.stdout, read.stderr) == (0, "kept\n", "")
    finally:
        end_job(cluster, job)
    assert named_leftovers(cluster) == []


def test_a_named_container_keeps_the_image_policy_allowed(
    spank_cluster: SlurmCluster,
    base_image: Path,
    shared_dir: Path,
    policy: Path,
    runner: User,
    no_named_left: None,
) -> None:
    """Later steps run the image that policy allowed when the container started (root's
    record: an image pulled from an allowed registry lies outside image_dirs), while a
    new container still meets the policy of the day."""
    allowed = shared_dir / "named-allowed"
    allowed.mkdir(mode=0o755, exist_ok=True)
    image = allowed / "ok.sif"
    if not image.exists():
        image.write_bytes(base_image.read_bytes())
        image.chmod(0o644)
    policy.write_text(f'image_dirs = ["{allowed}"]\n')
    job = allocate(spank_cluster, runner)
    try:
        made = step(spank_cluster, runner, job, f"--container-image={image}",
                    "--container-name=box", "true")  # fmt: skip
        assert made.returncode == 0, made.stderr
        policy.write_text('image_dirs = ["/nonexistent"]\n')
        joined = step(spank_cluster, runner, job, "--container-name=box", "true")
        assert (joined.returncode, joined.stderr) == (0, "")
        new = step(spank_cluster, runner, job, f"--container-image={image}",
                   "--container-name=other", "true")  # fmt: skip
        assert (new.returncode != 0, errors(new)) == (True, [
            f"slurmstepd-{spank_cluster.nodename}: error: rankwire: policy: image {image} is "
            "outside the allowed image directories (/nonexistent); copy it there or ask your "
            "admin"
        ]), new.stderr  # fmt: skip
    finally:
        end_job(spank_cluster, job)


@pytest.mark.mpi
@pytest.mark.slow
def test_open_mpi_pmix_in_a_named_container_step_after_step(
    spank_cluster: SlurmCluster, ompi_image: Path, runner: User, no_named_left: None
) -> None:
    """Slurm's PMIx server dir is the step's: a later step that joins the job's
    container must see its own step's dir, not the first step's."""
    from harness.mpi import assert_hello

    job = allocate(spank_cluster, runner, "-n", "2")
    args = ("-n", "2", "--mpi=pmix", f"--container-image={ompi_image}", "--container-name=mpi")
    try:
        for _ in range(3):
            ran = step(spank_cluster, runner, job, *args, "/opt/hello_ompi")
            assert ran.returncode == 0, ran.stderr
            assert_hello(ran.stdout, 2)
    finally:
        end_job(spank_cluster, job)


def test_open_mpi_under_pmi2_is_bridged_with_or_without_the_helper(
    spank_cluster: SlurmCluster, ompi_image: Path, runner: User, no_named_left: None
) -> None:
    """The PMI-2 → PMIx bridge both ways the plugin starts it: a step whose helper runs
    has the node's server started by the start phase (every task joins it); a step that
    joins the named container from the shim's ticket has no start phase, and its first
    task starts the server (the others join it)."""
    from harness.mpi import assert_hello

    job = allocate(spank_cluster, runner, "-n", "2")
    ticket = slurmd_dir(spank_cluster) / str(job) / f".{runner.uid}.join"
    args = ("-n", "2", "--mpi=pmi2", f"--container-image={ompi_image}", "--container-name=mpi")
    try:
        helped = step(spank_cluster, runner, job, *args, "/opt/hello_ompi")
        assert helped.returncode == 0, helped.stderr
        assert_hello(helped.stdout, 2)
        kept = (ticket.stat().st_ino, ticket.stat().st_ctime_ns)  # ext4 reuses inodes
        joined = step(spank_cluster, runner, job, *args, "/opt/hello_ompi")
        assert joined.returncode == 0, joined.stderr
        assert_hello(joined.stdout, 2)
        assert (ticket.stat().st_ino, ticket.stat().st_ctime_ns) == kept, "the helper ran"
    finally:
        end_job(spank_cluster, job)
