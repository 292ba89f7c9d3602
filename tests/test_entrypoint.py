"""`--entrypoint` (exec, the launcher) and `--container-entrypoint` /
`--no-container-entrypoint` (the plugin): a pulled image's OCI ENTRYPOINT runs the
command, as `docker run IMAGE COMMAND` does.

The ENTRYPOINT is read from the SIF's `oci-config.json` object, which a pull keeps (as
Apptainer's does); an image without one (built, not pulled) has none. The layered test
image's ENTRYPOINT is `/bin/sh -c 'echo "entry: $0 $*"' ep0` (tests/harness/oci.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_pull import cache, layered_ref, rw  # noqa: F401  (fixtures)

from harness.oci import LAYERED_ENTRYPOINT
from harness.registry import Registry
from harness.slurm import SlurmCluster
from harness.spank import SpankInstall, srun
from harness.users import User
from rankwire.errors import UserError
from rankwire.runtime.options import delegation_argv, option
from rankwire.runtime.plan import (
    ExecOptions,
    ImageFacts,
    UserFacts,
    entrypoint_words,
    plan_process,
    runscript_argv,
)
from rankwire.spank import plan as spank_plan

EP = ("/docker-entrypoint.sh", "--init")
PULLED = ImageFacts("/c/app.sif", 4096, 8192, "d" * 32, {}, True, entrypoint=EP)
NO_EP = ImageFacts("/c/ubuntu.sif", 4096, 8192, "d" * 32, {}, True, entrypoint=())
BUILT = ImageFacts("/c/built.sif", 4096, 8192, "d" * 32, {}, True)
USER = UserFacts(1000, 1000, "/home/u", "/work", {"PATH": "/host/bin"}, "/home/u/.cache/rankwire")
NO_EP_FIX = "/c/built.sif has no entrypoint (not pulled from an OCI registry); drop --entrypoint"


# -- pure: the planner --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("image", "on", "argv"),
    [
        (PULLED, False, ("echo", "hi")),
        (PULLED, True, ("/docker-entrypoint.sh", "--init", "echo", "hi")),
        (NO_EP, True, ("echo", "hi")),  # a config without ENTRYPOINT: the command itself
        (NO_EP, False, ("echo", "hi")),
        (BUILT, False, ("echo", "hi")),
    ],
)
def test_plan_process_puts_the_entrypoint_first(
    image: ImageFacts, on: bool, argv: tuple[str, ...]
) -> None:
    proc = plan_process(image, USER, ExecOptions(entrypoint=on), ["echo", "hi"])
    assert proc.argv == argv


def test_entrypoint_of_an_image_that_was_not_pulled_is_an_error() -> None:
    with pytest.raises(UserError) as err:
        plan_process(BUILT, USER, ExecOptions(entrypoint=True), ["echo", "hi"])
    assert str(err.value) == NO_EP_FIX


def test_entrypoint_words_for_a_site_default_never_fail() -> None:
    """The plugin's `execute_entrypoint=1` turns it on for every image: a built one runs
    the command itself; only the user's own --container-entrypoint is refused."""
    assert entrypoint_words(BUILT, True, "--container-entrypoint", required=False) == ()
    assert entrypoint_words(PULLED, True, "--container-entrypoint", required=False) == EP
    assert entrypoint_words(PULLED, False, "--container-entrypoint") == ()
    with pytest.raises(UserError) as err:
        entrypoint_words(BUILT, True, "--container-entrypoint")
    assert str(err.value) == (
        "/c/built.sif has no entrypoint (not pulled from an OCI registry); "
        "drop --container-entrypoint"
    )


def test_entrypoint_with_the_runscript_is_refused() -> None:
    """`run`'s runscript of a pulled image already runs ENTRYPOINT (Docker's rule)."""
    with pytest.raises(UserError) as err:
        plan_process(PULLED, USER, ExecOptions(entrypoint=True), runscript_argv(PULLED, ["a"]))
    assert str(err.value) == (
        "--entrypoint: /c/app.sif's runscript already runs its ENTRYPOINT; drop --entrypoint"
    )


def test_the_option_table_entries() -> None:
    """One flag for exec and the launcher; the plugin's pair (Pyxis's spelling); an
    ordinary flag for srun delegation (the launcher, whose delegated command already
    starts with the entrypoint, leaves it out: see the launcher's test below)."""
    on, off = option("entrypoint"), option("no_entrypoint")
    assert (on.flags, on.scope, on.spank, on.spank_env) == (
        ("--entrypoint",),
        "process",
        "container-entrypoint",
        "RANKWIRE_CONTAINER_ENTRYPOINT",
    )
    assert (off.flags, off.scope, off.spank) == ((), "plugin", "no-container-entrypoint")
    assert delegation_argv({"entrypoint": True}) == ["--entrypoint"]


# -- real: a pulled image -------------------------------------------------------------------
def _pulled(runner: User, cache: Path, ref: str) -> Path:  # noqa: F811
    out = cache / "layered.sif"
    proc = rw(runner, cache, "pull", "--insecure", "-q", str(out), ref)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.usefixtures("nothing_left_behind")
def test_exec_entrypoint_runs_the_pulled_images_entrypoint(
    runner: User,
    cache: Path,  # noqa: F811
    layered_ref: str,  # noqa: F811
) -> None:
    sif = _pulled(runner, cache, layered_ref)
    inspect = json.loads(rw(runner, cache, "inspect", "--json", str(sif)).stdout)
    assert inspect["entrypoint"] == LAYERED_ENTRYPOINT
    text = rw(runner, cache, "inspect", str(sif)).stdout.splitlines()
    assert f"Entrypoint: {json.dumps(LAYERED_ENTRYPOINT)}" in text
    proc = rw(runner, cache, "exec", "--entrypoint", str(sif), "echo", "a b", "$HOME")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "entry: ep0 echo a b $HOME\n", "")
    proc = rw(runner, cache, "exec", str(sif), "echo", "a b", "$HOME")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "a b $HOME\n", "")
    proc = rw(runner, cache, "exec", "--entrypoint", "--dry-run", "--json", str(sif), "true")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["process"]["argv"] == [*LAYERED_ENTRYPOINT, "true"]
    # docker:// straight to exec: the cached SIF, the same entrypoint
    proc = rw(runner, cache, "exec", "--insecure", "--entrypoint", layered_ref, "id", "-u")
    assert (proc.returncode, proc.stdout) == (0, "entry: ep0 id -u\n"), proc.stderr


@pytest.mark.usefixtures("nothing_left_behind")
def test_exec_entrypoint_of_a_built_image_is_one_line(
    runner: User,
    cache: Path,  # noqa: F811
    base_image: Path,
) -> None:
    proc = rw(runner, cache, "exec", "--entrypoint", str(base_image), "true")
    assert proc.returncode != 0
    assert proc.stderr.splitlines() == [
        f"rankwire: {base_image} has no entrypoint (not pulled from an OCI registry); "
        "drop --entrypoint"
    ]
    inspect = json.loads(rw(runner, cache, "inspect", "--json", str(base_image)).stdout)
    assert inspect["entrypoint"] is None


@pytest.mark.usefixtures("nothing_left_behind")
def test_the_launcher_runs_ranks_through_the_entrypoint(
    runner: User,
    cache: Path,  # noqa: F811
    layered_ref: str,  # noqa: F811
) -> None:
    """Local ranks start as ENTRYPOINT + command; delegated to srun, the command already
    holds the entrypoint and `rankwire exec` gets no --entrypoint (it would run twice)."""
    sif = _pulled(runner, cache, layered_ref)
    proc = rw(runner, cache, "run", "-n", "2", "--entrypoint", "--image", str(sif), "echo", "r")
    assert (proc.returncode, proc.stdout) == (0, "entry: ep0 echo r\n" * 2), proc.stderr
    args = ["-n", "2", "--entrypoint", "--dry-run", "--json", "--fabric", "none"]
    proc = rw(runner, cache, "run", *args, "--image", str(sif), "echo", "r",
              env=("SLURM_JOB_ID=4242",))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    delegate = json.loads(proc.stdout)["delegate"]
    at = delegate.index("exec")
    assert delegate[at + 1 :] == ["--fabric", "none", str(sif), *LAYERED_ENTRYPOINT, "echo", "r"]


# -- the plugin: pure ---------------------------------------------------------------------
def _asked(
    options: dict[str, str], args: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> str:
    facts = spank_plan.JobFacts(
        uid=1001, gid=1001, gids=(1001,), job_id=7, step_id=0, local_tasks=1, total_tasks=1,
        node_id=0, nnodes=1, stepd_pid=1, cwd="/work", args=args,
        options={"container-image": "docker://reg:5000/a:1", **options}, env=env or {},
        stepd_env={},
    )  # fmt: skip
    want = spank_plan.asked(facts, oci_conf=False)
    assert want is not None
    return want.entrypoint


@pytest.mark.parametrize(
    ("options", "args", "env", "choice"),
    [
        ({}, (), {}, "off"),  # Pyxis's default
        ({"container-entrypoint": "1"}, (), {}, "on"),
        ({}, (), {"RANKWIRE_CONTAINER_ENTRYPOINT": "1"}, "on"),
        ({}, ("execute_entrypoint=1",), {}, "site"),
        ({}, ("execute_entrypoint=0",), {}, "off"),
        ({"no-container-entrypoint": "1"}, ("execute_entrypoint=true",), {}, "off"),
        ({"container-entrypoint": "1"}, ("execute_entrypoint=0",), {}, "on"),
    ],
)  # fmt: skip
def test_plugin_entrypoint_choice(
    options: dict[str, str], args: tuple[str, ...], env: dict[str, str], choice: str
) -> None:
    assert _asked(options, args, env) == choice


@pytest.mark.parametrize(
    ("options", "args", "message"),
    [
        ({"container-entrypoint": "1", "no-container-entrypoint": "1"}, (),
         "--container-entrypoint and --no-container-entrypoint contradict each other: give one"),
        ({}, ("execute_entrypoint=maybe",), "plugstack.conf execute_entrypoint=maybe: give 1 or 0"),
    ],
)  # fmt: skip
def test_plugin_entrypoint_refusals(
    options: dict[str, str], args: tuple[str, ...], message: str
) -> None:
    with pytest.raises(UserError) as err:
        _asked(options, args)
    assert str(err.value) == message


# -- the plugin: real srun on the single-node Slurm ----------------------------------------
@pytest.fixture
def site(
    spank_cluster: SlurmCluster, spank_install: SpankInstall, registry: Registry, policy: Path
) -> Iterator[list[str]]:
    """The plugin allowed the loopback registry (plain HTTP); a test may append plugstack
    arguments, then `_write`; the installed plugstack line comes back after."""
    policy.write_text(f'allowed_registries = ["{registry.netloc}"]\n')
    yield [
        f"helper={spank_install.helper}",
        f"policy={spank_install.policy}",
        f"registry_insecure={registry.netloc}",
    ]
    spank_cluster.plugstack.write_text(spank_install.plugstack_line())


def _write(cluster: SlurmCluster, install: SpankInstall, args: list[str]) -> None:
    cluster.plugstack.write_text(f"required {install.plugin} {' '.join(args)}\n")


@pytest.fixture
def job_cache(shared_dir: Path) -> Iterator[Path]:
    """A fresh RANKWIRE_CACHEDIR for the job user (made by their pull), removed after."""
    base = shared_dir / "entrypoint-caches"
    base.mkdir(exist_ok=True)
    base.chmod(0o1777)
    path = base / os.urandom(4).hex()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _error_lines(stderr: str) -> set[str]:
    """The plugin's lines as srun shows them (after slurmstepd's `error: ` prefix)."""
    return {ln.split("error: ", 1)[-1] for ln in stderr.splitlines() if "rankwire:" in ln}


@pytest.mark.slurm
@pytest.mark.slow
def test_plugin_container_entrypoint_runs_the_command_through_it(
    spank_cluster: SlurmCluster,
    spank_install: SpankInstall,
    site: list[str],
    layered_ref: str,  # noqa: F811
    job_cache: Path,
    base_image: Path,
    runner: User,
    nothing_left: None,
) -> None:
    _write(spank_cluster, spank_install, site)
    env = dict(spank_cluster.env, RANKWIRE_CACHEDIR=str(job_cache))
    image = f"--container-image={layered_ref}"
    proc = srun(spank_cluster, runner, "-n", "2", image, "--container-entrypoint",
                "/bin/echo", "a b", "$HOME", env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["entry: ep0 /bin/echo a b $HOME"] * 2
    proc = srun(spank_cluster, runner, "-n", "1", image, "/bin/echo", "a b", env=env)
    assert (proc.returncode, proc.stdout) == (0, "a b\n"), proc.stderr
    # the env form; the task's environment does not keep our variable
    proc = srun(spank_cluster, runner, "-n", "1", image, "/bin/sh", "-c",
                'echo "${RANKWIRE_ENTRYPOINT_ARGV-unset}"',
                env={**env, "RANKWIRE_CONTAINER_ENTRYPOINT": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == 'entry: ep0 /bin/sh -c echo "${RANKWIRE_ENTRYPOINT_ARGV-unset}"\n'
    # srun --multi-prog builds each task's argv where no plugin reaches: refused
    conf = job_cache.parent / f"multi-{os.urandom(4).hex()}.conf"
    conf.write_text("0 /bin/echo zero\n")
    conf.chmod(0o644)
    try:
        proc = srun(spank_cluster, runner, "-n", "1", image, "--container-entrypoint",
                    "--multi-prog", str(conf), env=env)  # fmt: skip
    finally:
        conf.unlink()
    assert proc.returncode != 0
    assert _error_lines(proc.stderr) == {
        "rankwire: --container-entrypoint does not work with srun --multi-prog; put the "
        "entrypoint in the configuration's commands"
    }
    # a built image has no entrypoint: one line, the step fails
    proc = srun(spank_cluster, runner, "-n", "1", f"--container-image={base_image}",
                "--container-entrypoint", "true", env=env)  # fmt: skip
    assert proc.returncode != 0
    assert _error_lines(proc.stderr) == {
        f"rankwire: {base_image} has no entrypoint (not pulled from an OCI registry); "
        "drop --container-entrypoint"
    }


@pytest.mark.slurm
@pytest.mark.slow
def test_plugin_site_default_execute_entrypoint(
    spank_cluster: SlurmCluster,
    spank_install: SpankInstall,
    site: list[str],
    layered_ref: str,  # noqa: F811
    job_cache: Path,
    base_image: Path,
    unprivileged_user: User,
    nothing_left: None,
) -> None:
    """plugstack `execute_entrypoint=1`: on for a pulled image, --no-container-entrypoint
    turns it off (also given to salloc), an image without one runs the command."""
    _write(spank_cluster, spank_install, [*site, "execute_entrypoint=1"])
    env = dict(spank_cluster.env, RANKWIRE_CACHEDIR=str(job_cache))
    user = unprivileged_user
    image = f"--container-image={layered_ref}"
    proc = srun(spank_cluster, user, "-n", "1", image, "/bin/echo", "x", env=env)
    assert (proc.returncode, proc.stdout) == (0, "entry: ep0 /bin/echo x\n"), proc.stderr
    proc = srun(spank_cluster, user, "-n", "1", image, "--no-container-entrypoint",
                "/bin/echo", "x", env=env)  # fmt: skip
    assert (proc.returncode, proc.stdout) == (0, "x\n"), proc.stderr
    proc = srun(spank_cluster, user, "-n", "1", f"--container-image={base_image}",
                "/bin/echo", "x", env=env)  # fmt: skip
    assert (proc.returncode, proc.stdout) == (0, "x\n"), proc.stderr
    # given to salloc, the option reaches the allocation's steps
    script = job_cache.parent / f"step-{os.urandom(4).hex()}.sh"
    script.write_text("#!/bin/sh\nsrun -n 1 /bin/echo s\n")
    script.chmod(0o755)
    try:
        for option, out in (("--no-container-entrypoint", "s\n"), ("", "entry: ep0 /bin/echo s\n")):
            argv = ["salloc", "-n", "1", image, *([option] if option else []), str(script)]
            proc = user.run(argv, env=env, cwd="/tmp", timeout=120)
            assert (proc.returncode, proc.stdout) == (0, out), proc.stderr
    finally:
        script.unlink()
    proc = srun(spank_cluster, user, "-n", "1", image, "--container-entrypoint",
                "--no-container-entrypoint", "true", env=env)  # fmt: skip
    assert proc.returncode != 0
    assert _error_lines(proc.stderr) == {
        "rankwire: --container-entrypoint and --no-container-entrypoint contradict each "
        "other: give one"
    }


@pytest.mark.slurm
@pytest.mark.slow
def test_plugin_entrypoint_in_an_enforced_container(
    spank_cluster: SlurmCluster,
    spank_install: SpankInstall,
    layered_ref: str,  # noqa: F811
    shared_dir: Path,
    policy: Path,
    unprivileged_user: User,
    nothing_left: None,
) -> None:
    """`enforce`: root builds the container and the task enters it before Slurm drops
    privileges; the entrypoint runs the same (an admin placed the pulled image)."""
    images = shared_dir / "entrypoint-images"
    images.mkdir(mode=0o755, exist_ok=True)
    sif = images / "layered.sif"
    if not sif.exists():
        proc = subprocess.run(
            ["rankwire", "pull", "--insecure", "-q", str(sif), layered_ref],
            capture_output=True,
            text=True,
            env={**os.environ, "RANKWIRE_CACHEDIR": str(images / "cache")},
        )
        assert proc.returncode == 0, proc.stderr
        sif.chmod(0o644)
    policy.write_text(f'image_dirs = ["{images}"]\nenforce = true\n')
    proc = srun(spank_cluster, unprivileged_user, "-n", "2", f"--container-image={sif}",
                "--container-entrypoint", "/bin/echo", "e")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["entry: ep0 /bin/echo e"] * 2
