"""Remote images in the SPANK plugin: `srun --container-image=oras://…|docker://…`.

A real registry (Debian's docker-registry on 127.0.0.1, `harness/registry.py`) holds a
SIF pushed by `rankwire push`; the plugin pulls it as the job user, once per node, after
site policy allowed its registry (`allowed_registries`, fail closed), into the user's
cache or theirs below the site's `image_cache=`. Jobs run as root and as the test user.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.registry import Registry, free_port, running_registry
from harness.slurm import SlurmCluster
from harness.spank import SpankInstall, srun
from harness.users import User
from rankwire.errors import UserError
from rankwire.runtime.reference import parse_reference
from rankwire.spank import helper, plan
from rankwire.spank.policy import Policy, PolicyError, load_policy

REPO = "spank/base"


# -- pure: what the check phase decides before anything is fetched --------------------


def _facts(args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> plan.JobFacts:
    return plan.JobFacts(
        uid=1001,
        gid=1001,
        gids=(1001, 27),
        job_id=7,
        step_id=0,
        local_tasks=1,
        total_tasks=1,
        node_id=0,
        nnodes=1,
        stepd_pid=1,
        cwd="/work/dir",
        args=args,
        options={"container-image": "oras://reg.example.org:5000/a/b:v1"},
        env=env or {},
        stepd_env={},
    )


def test_asked_keeps_a_remote_reference_as_written() -> None:
    want = plan.asked(_facts(), oci_conf=False)
    assert want is not None and want.image == "oras://reg.example.org:5000/a/b:v1"


@pytest.mark.parametrize(
    ("args", "env", "root", "site", "insecure"),
    [
        ((), {}, "/home/u/.cache/rankwire/images", False, False),
        ((), {"XDG_CACHE_HOME": "/x"}, "/x/rankwire/images", False, False),
        ((), {"RANKWIRE_CACHEDIR": "rel"}, "/work/dir/rel/images", False, False),
        (("image_cache=/var/lib/rw/",), {"RANKWIRE_CACHEDIR": "/c"}, "/var/lib/rw/1001", True,
         False),
        (("registry_insecure=other:1, REG.example.org:5000",), {}, "/home/u/.cache/rankwire/images",
         False, True),
        (("registry_insecure=reg.example.org",), {}, "/home/u/.cache/rankwire/images", False,
         False),
    ],
)  # fmt: skip
def test_plan_pull(
    args: tuple[str, ...], env: dict[str, str], root: str, site: bool, insecure: bool
) -> None:
    image = "oras://reg.example.org:5000/a/b:v1"
    job_env = {**env, "RANKWIRE_DOCKER_USERNAME": "me", "LD_PRELOAD": "/evil.so", "HOME": "/h"}
    how = plan.plan_pull(_facts(args, job_env), image, parse_reference(image), "/home/u", "u")
    assert (how.source, how.root, how.site_cache, how.insecure) == (image, root, site, insecure)
    assert how.env == {
        "RANKWIRE_DOCKER_USERNAME": "me",
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LC_ALL": "C.UTF-8",
        "HOME": "/home/u",
        "USER": "u",
        "LOGNAME": "u",
    }


def test_plan_pull_refuses_a_relative_site_cache() -> None:
    image = "oras://reg.example.org:5000/a/b:v1"
    with pytest.raises(UserError) as err:
        plan.plan_pull(_facts(("image_cache=cache",)), image, parse_reference(image), "/h", "u")
    assert str(err.value) == "plugstack.conf image_cache=cache: give an absolute directory"


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (Policy(), None),
        (Policy(source="/p.toml", allowed_registries=("reg.example.org:5000",)), None),
        (
            Policy(source="/p.toml", allowed_registries=("reg.example.org",)),
            "policy: registry REG.example.org:5000 of IMG is not in allowed_registries "
            "(reg.example.org) of /p.toml; use an image from one of them or ask your admin",
        ),
        (
            Policy(source="/p.toml", allowed_registries=()),
            "policy: registry REG.example.org:5000 of IMG is not in allowed_registries (none) "
            "of /p.toml; use an image from one of them or ask your admin",
        ),
        (
            Policy(source="/p.toml"),
            "policy: registry REG.example.org:5000 of IMG is not allowed: /p.toml has no "
            "allowed_registries, so no remote image runs here; use a local SIF or ask your "
            "admin",
        ),
        (
            Policy(source="/p.toml", allowed_registries=("reg.example.org:5000",), enforce=True),
            "policy: remote image IMG cannot run under this site's enforced policy (a pulled "
            "image is its user's file, which users could change): ask your admin to place "
            "it in an image directory",
        ),
    ],
)
def test_policy_check_remote(policy: Policy, message: str | None) -> None:
    if message is None:
        policy.check_remote("REG.example.org:5000", "IMG")
        return
    with pytest.raises(PolicyError) as err:
        policy.check_remote("REG.example.org:5000", "IMG")
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('["Reg.Example.org", "10.0.0.5:5000"]', None),
        ('"reg.example.org"', "'allowed_registries' must be a list of host[:port] names"),
        (
            '["https://reg.example.org"]',
            "'allowed_registries': 'https://reg.example.org' is not a host[:port] (no scheme, "
            "no path)",
        ),
        (
            '["reg.example.org/team"]',
            "'allowed_registries': 'reg.example.org/team' is not a host[:port] (no scheme, no "
            "path)",
        ),
    ],
)
def test_policy_file_allowed_registries(tmp_path: Path, value: str, message: str | None) -> None:
    if os.getuid() != 0:
        pytest.skip("a policy file must be root-owned")
    path = tmp_path / "policy.toml"
    path.write_text(f"allowed_registries = {value}\n")
    tmp_path.chmod(0o755)
    if message is None:
        assert load_policy(str(path)).allowed_registries == ("reg.example.org", "10.0.0.5:5000")
        return
    with pytest.raises(PolicyError) as err:
        load_policy(str(path))
    assert str(err.value) == f"policy: {message}"


def test_pull_phase_runs_only_as_the_requested_user() -> None:
    """A pull child that did not become exactly the job user pulls nothing."""
    me = os.getuid()
    other = me + 1
    req = [("uid", str(other)), ("gid", str(os.getgid())), ("source", "oras://r:1/a:b")]
    with pytest.raises(UserError) as err:
        helper.pull_as_user(req)
    assert str(err.value) == (
        f"the pull runs as uid {other} gid {os.getgid()} only; got {os.getresuid()}"
    )


# -- real Slurm, a real registry -------------------------------------------------------


@pytest.fixture(scope="module")
def registry(shared_dir: Path) -> Iterator[Registry]:
    with running_registry(shared_dir) as reg:
        yield reg


@pytest.fixture(scope="module")
def pushed(registry: Registry, base_image: Path) -> tuple[str, str]:
    """(oras:// reference, the SIF blob's digest) of the base image, pushed by rankwire."""
    ref = f"oras://{registry.netloc}/{REPO}:v1"
    proc = subprocess.run(
        ["rankwire", "push", "--insecure", "-q", str(base_image), ref],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return ref, "sha256:" + hashlib.sha256(base_image.read_bytes()).hexdigest()


@pytest.fixture
def plugstack(
    spank_cluster: SlurmCluster, spank_install: SpankInstall, registry: Registry
) -> Iterator[list[str]]:
    """The plugin with the site's registry arguments; a test may append more before
    calling `write()` (the list's first use); the installed line comes back after."""
    args = [
        f"helper={spank_install.helper}",
        f"policy={spank_install.policy}",
        f"registry_insecure={registry.netloc},127.0.0.1:{DEAD_PORT}",
    ]
    yield args
    spank_cluster.plugstack.write_text(spank_install.plugstack_line())


DEAD_PORT = free_port("127.0.0.1")  # nothing listens there


def _write_plugstack(cluster: SlurmCluster, install: SpankInstall, args: list[str]) -> None:
    cluster.plugstack.write_text(f"required {install.plugin} {' '.join(args)}\n")


@pytest.fixture
def cache(shared_dir: Path, runner: User) -> Iterator[Path]:
    """A fresh RANKWIRE_CACHEDIR for the job user (made by their pull), removed after."""
    base = shared_dir / "spank-pull-caches"
    base.mkdir(exist_ok=True)
    base.chmod(0o1777)
    path = base / f"{runner.name}-{os.urandom(4).hex()}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _error_line(stderr: str) -> str:
    """The plugin's one line as srun shows it (after slurmstepd's `error: ` prefix)."""
    lines = [ln.split("error: ", 1)[-1] for ln in stderr.splitlines() if "rankwire:" in ln]
    assert len(set(lines)) == 1, stderr
    return lines[0]


def _scratch_left(root: Path) -> list[str]:
    return sorted(str(p) for p in (root / "tmp").glob("*")) if (root / "tmp").exists() else []


@pytest.mark.slurm
@pytest.mark.parametrize("how", ["--container-image", "--container"])
def test_remote_image_is_pulled_once_per_node_as_the_user(
    spank_cluster: SlurmCluster,
    spank_install: SpankInstall,
    registry: Registry,
    pushed: tuple[str, str],
    plugstack: list[str],
    policy: Path,
    cache: Path,
    runner: User,
    how: str,
    nothing_left: None,
) -> None:
    ref, blob = pushed
    # image_dirs does not hold the cache: the pulled file runs because its registry is allowed.
    policy.write_text(
        f'allowed_registries = ["{registry.netloc}"]\nimage_dirs = ["/nonexistent"]\n'
    )
    _write_plugstack(spank_cluster, spank_install, plugstack)
    env = dict(spank_cluster.env, RANKWIRE_CACHEDIR=str(cache))
    before = registry.blob_gets(blob)
    for _ in range(2):  # the second step finds it in the cache
        proc = srun(spank_cluster, runner, "-n", "2", f"{how}={ref}", "sh", "-c",
                    "grep ^ID= /etc/os-release; id -u", env=env)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert sorted(proc.stdout.split()) == sorted(["ID=rankwire-test", str(runner.uid)] * 2)
        assert registry.blob_gets(blob) == before + 1  # one node, 2 tasks, 2 steps: one GET
    sifs = list((cache / "images" / "sif").glob("*.sif"))
    assert len(sifs) == 1
    assert sifs[0].stat().st_uid == runner.uid  # pulled by the job user, not by root
    assert (cache / "images").stat().st_uid == runner.uid
    assert _scratch_left(cache / "images") == []
    # Only the pulled file is exempt from image_dirs: named as a path, the same file is not.
    local = srun(spank_cluster, runner, "-n", "1", f"--container-image={sifs[0]}", "true", env=env)
    assert local.returncode != 0
    assert _error_line(local.stderr) == (
        f"rankwire: policy: image {sifs[0]} is outside the allowed image directories "
        "(/nonexistent); copy it there or ask your admin"
    )


@pytest.mark.slurm
@pytest.mark.parametrize(
    ("case", "policy_text", "image", "message"),
    [
        (
            "not listed",
            'allowed_registries = ["registry.example.org"]\n',
            "oras://{netloc}/spank/base:v1",
            "rankwire: policy: registry {netloc} of {image} is not in allowed_registries "
            "(registry.example.org) of {policy}; use an image from one of them or ask your admin",
        ),
        (
            "no key",
            'image_dirs = ["/tmp"]\n',
            "oras://{netloc}/spank/base:v1",
            "rankwire: policy: registry {netloc} of {image} is not allowed: {policy} has no "
            "allowed_registries, so no remote image runs here; use a local SIF or ask your admin",
        ),
        (
            "bad reference",
            'allowed_registries = ["{netloc}"]\n',
            "oras://{netloc}/Spank/base:v1",
            "rankwire: image reference {image}: repository part Spank is not lowercase "
            "a-z, 0-9, . _ -; write docker://[REGISTRY/]REPO[:TAG|@sha256:HEX] or "
            "oras://REGISTRY/REPO[:TAG|@sha256:HEX]",
        ),
        (
            "registry down",
            'allowed_registries = ["127.0.0.1:{dead}"]\n',
            "oras://127.0.0.1:{dead}/spank/base:v1",
            "rankwire: cannot reach registry 127.0.0.1:{dead} (Connection refused); check the "
            "address and that it is up",
        ),
    ],
)
def test_remote_image_failures_are_one_line_and_leave_nothing(
    spank_cluster: SlurmCluster,
    spank_install: SpankInstall,
    registry: Registry,
    pushed: tuple[str, str],
    plugstack: list[str],
    policy: Path,
    cache: Path,
    runner: User,
    case: str,
    policy_text: str,
    image: str,
    message: str,
    nothing_left: None,
) -> None:
    values = {"netloc": registry.netloc, "dead": DEAD_PORT, "policy": policy}
    image = image.format(**values)
    policy.write_text(policy_text.format(**values))
    _write_plugstack(spank_cluster, spank_install, plugstack)
    env = dict(spank_cluster.env, RANKWIRE_CACHEDIR=str(cache))
    requests = len(registry.log.read_text(errors="replace").splitlines())
    proc = srun(spank_cluster, runner, "-n", "2", f"--container-image={image}", "true", env=env)
    assert proc.returncode != 0
    assert _error_line(proc.stderr) == message.format(image=image, **values)
    assert "Traceback" not in proc.stderr
    # Refused before any network access: the registry saw nothing.
    assert len(registry.log.read_text(errors="replace").splitlines()) == requests
    sif_dir = cache / "images" / "sif"
    assert not sif_dir.exists() or list(sif_dir.iterdir()) == []
    assert _scratch_left(cache / "images") == []


@pytest.mark.slurm
def test_site_image_cache_holds_a_private_dir_per_user(
    spank_cluster: SlurmCluster,
    spank_install: SpankInstall,
    registry: Registry,
    pushed: tuple[str, str],
    plugstack: list[str],
    policy: Path,
    shared_dir: Path,
    cache: Path,
    runner: User,
    nothing_left: None,
) -> None:
    ref, blob = pushed
    site = shared_dir / f"site-cache-{os.urandom(4).hex()}"  # root makes it
    policy.write_text(f'allowed_registries = ["{registry.netloc}"]\n')
    _write_plugstack(spank_cluster, spank_install, [*plugstack, f"image_cache={site}"])
    env = dict(spank_cluster.env, RANKWIRE_CACHEDIR=str(cache))  # the site's wins
    try:
        before = registry.blob_gets(blob)
        proc = srun(spank_cluster, runner, "-n", "2", f"--container-image={ref}", "id", "-u",
                    env=env)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == [str(runner.uid)] * 2
        assert registry.blob_gets(blob) == before + 1
        mine = site / str(runner.uid)
        st, top = mine.stat(), site.stat()
        assert (top.st_uid, top.st_mode & 0o777) == (0, 0o755)
        assert (st.st_uid, st.st_mode & 0o777) == (runner.uid, 0o700)
        sifs = list((mine / "sif").glob("*.sif"))
        assert len(sifs) == 1 and sifs[0].stat().st_uid == runner.uid
        assert not cache.exists()
        assert _scratch_left(mine) == []
        # A site dir others can write to is no cache root trusts.
        site.chmod(0o777)
        bad = srun(spank_cluster, runner, "-n", "1", f"--container-image={ref}", "true", env=env)
        assert bad.returncode != 0
        assert _error_line(bad.stderr) == (
            f"rankwire: {site} must be a root-owned directory not writable by others"
        )
    finally:
        shutil.rmtree(site, ignore_errors=True)


@pytest.fixture(scope="module")
def docker_pushed(registry: Registry, shared_dir: Path) -> str:
    """docker://…/spank/busybox:1: a one-layer busybox image made by umoci, pushed by skopeo."""
    from harness.oci import busybox_rootfs, push_layout, umoci_image

    work = shared_dir / "spank-pull-oci"
    layout = umoci_image(work, "bb", [busybox_rootfs], ["--config.env=FROM_OCI=yes"])
    return push_layout(layout.path, layout.tag, "spank/busybox:1", registry=registry)


@pytest.mark.slurm
def test_docker_image_is_converted_by_the_user(
    spank_cluster: SlurmCluster,
    spank_install: SpankInstall,
    registry: Registry,
    docker_pushed: str,
    plugstack: list[str],
    policy: Path,
    cache: Path,
    runner: User,
    nothing_left: None,
) -> None:
    """docker://: layers unpacked and mksquashfs'd by the job user's pull (the SIF is
    theirs), config (env) applied; blobs fetched once (config + one layer)."""
    policy.write_text(f'allowed_registries = ["{registry.netloc}"]\n')
    _write_plugstack(spank_cluster, spank_install, plugstack)
    env = dict(spank_cluster.env, RANKWIRE_CACHEDIR=str(cache))
    before = registry.blob_gets()
    for _ in range(2):
        proc = srun(spank_cluster, runner, "-n", "2", f"--container-image={docker_pushed}",
                    "sh", "-c", 'echo "$FROM_OCI $(id -u)"', env=env)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == [f"yes {runner.uid}"] * 2
        assert registry.blob_gets() == before + 2
    sifs = list((cache / "images" / "sif").glob("*.sif"))
    assert len(sifs) == 1 and sifs[0].stat().st_uid == runner.uid
    assert _scratch_left(cache / "images") == []


def _pull_children() -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc.name.isdigit() and b"spank-helper" in argv and b"pull" in argv:
            found.append(f"{proc.name} {b' '.join(argv).decode(errors='replace')}")
    return found


@pytest.mark.slurm
def test_a_stalled_pull_ends_with_the_helper_deadline(
    spank_cluster: SlurmCluster,
    spank_install: SpankInstall,
    plugstack: list[str],
    policy: Path,
    cache: Path,
    runner: User,
    nothing_left: None,
) -> None:
    """A registry that never answers: the shim's deadline (timeout=) kills the helper
    and the user's pull with it (one process group); the step fails with one line."""
    with socket.socket() as stalled:
        stalled.bind(("127.0.0.1", 0))
        stalled.listen(8)  # connections complete, nothing is ever read or answered
        netloc = f"127.0.0.1:{stalled.getsockname()[1]}"
        policy.write_text(f'allowed_registries = ["{netloc}"]\n')
        _write_plugstack(spank_cluster, spank_install, [*plugstack, "timeout=3"])
        env = dict(spank_cluster.env, RANKWIRE_CACHEDIR=str(cache))
        image = f"oras://{netloc}/spank/base:v1"
        proc = srun(spank_cluster, runner, "-n", "1", f"--container-image={image}", "true", env=env)
    assert proc.returncode != 0
    assert _error_line(proc.stderr) == (
        "rankwire: the helper's check phase failed: no reply within 3 s"
    )
    deadline = time.monotonic() + 5
    while _pull_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _pull_children() == []
    assert _scratch_left(cache / "images") == []
