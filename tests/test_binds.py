"""Binds may not hide what the container needs: the image root, /proc, /sys, /dev (issue
13, defect 10); not by their DST, nor through a symlink in the image or a bound tree."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.images import make_world_readable
from harness.users import User, rw
from rankwire.errors import UserError
from rankwire.runtime.plan import parse_bind, resolve_bind
from rankwire.spank.plan import parse_mounts

FIX = "bind it elsewhere (a DST outside /proc, /sys and /dev, and not /)"


@pytest.mark.parametrize(
    ("spec", "cwd", "message"),
    [
        ("/etc:/proc", "/w", f"bad -B '/etc:/proc': it would hide the container's /proc; {FIX}"),
        ("/etc:/sys/x/", "/w", f"bad -B '/etc:/sys/x': it would hide the container's /sys; {FIX}"),
        ("/tmp:/dev", "/w", f"bad -B '/tmp:/dev': it would hide the container's /dev; {FIX}"),
        (
            "/tmp:/dev/null",
            "/w",
            f"bad -B '/tmp:/dev/null': it would hide the container's /dev; {FIX}",
        ),
        ("/:/", "/w", f"bad -B '/:/': it would hide the whole image; {FIX}"),
        ("/data:/x/..", "/w", f"bad -B '/data:/': it would hide the whole image; {FIX}"),
        (".", "/", f"bad -B '/:/': it would hide the whole image; {FIX}"),  # SRC resolved
        ("etc:/proc/x", "/", f"bad -B '/etc:/proc/x': it would hide the container's /proc; {FIX}"),
    ],
)
def test_binds_that_hide_the_kernel_trees_or_the_root_are_refused(
    spec: str, cwd: str, message: str
) -> None:
    with pytest.raises(UserError) as err:
        resolve_bind(parse_bind(spec), cwd)
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("spec", "target"),
    [
        ("/dev/infiniband", "/dev/infiniband"),  # a host path at its own place (Apptainer's rule)
        ("/proc", "/proc"),
        ("/sys/fs/cgroup", "/sys/fs/cgroup"),
        ("infiniband", "/dev/infiniband"),  # relative SRC, resolved from /dev
        ("/scratch/shm:/dev/shm", "/dev/shm"),  # a private or bigger shared-memory dir
        ("/etc:/procs", "/procs"),
        ("/etc:/opt/dev", "/opt/dev"),
    ],
)
def test_harmless_binds_are_kept(spec: str, target: str) -> None:
    assert resolve_bind(parse_bind(spec), "/dev").target == target


def test_the_plugin_gets_the_same_rule_under_its_option_name() -> None:
    with pytest.raises(UserError) as err:
        parse_mounts("/etc:/proc", "/w")
    assert str(err.value) == (
        f"bad --container-mounts '/etc:/proc': it would hide the container's /proc; {FIX}"
    )


# -- for real ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def links_image(shared_dir: Path, base_image: Path) -> Iterator[Path]:
    """The base image with symlinks that lead to /proc, /sys and the root."""
    from rankwire.runtime.build import build_image

    rootfs = shared_dir / "links-rootfs"
    shutil.copytree(shared_dir / "base-rootfs", rootfs, symlinks=True)
    (rootfs / "opt").mkdir(exist_ok=True)
    (rootfs / "procs").symlink_to("/proc")
    (rootfs / "opt" / "sysl").symlink_to("../sys")
    out = shared_dir / "links.sif"
    build_image(out, rootfs)
    make_world_readable(shared_dir)
    yield out
    out.unlink()
    shutil.rmtree(rootfs)


@pytest.mark.usefixtures("nothing_left_behind")
def test_exec_refuses_a_bind_on_proc(runner: User, base_image: Path) -> None:
    proc = rw(runner, "exec", "-B", "/etc:/proc", str(base_image), "ls", "/proc")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert (
        proc.stderr
        == f"rankwire: bad -B '/etc:/proc': it would hide the container's /proc; {FIX}\n"
    )


@pytest.mark.usefixtures("nothing_left_behind")
@pytest.mark.parametrize(
    ("dst", "leads_to", "hides"),
    [("/procs", "/proc", "/proc"), ("/opt/sysl", "/sys", "/sys"), ("/procs/x", "/proc/x", "/proc")],
)
def test_a_symlink_in_the_image_does_not_get_around_it(
    runner: User, links_image: Path, dst: str, leads_to: str, hides: str
) -> None:
    proc = rw(runner, "exec", "-B", f"/etc:{dst}", str(links_image), "true")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (
        f"rankwire: cannot start container from {links_image}: cannot mount /etc on {dst}: "
        f"it leads to {leads_to}, which would hide the container's {hides}: "
        "choose a DST that is not a symlink\n"
    )


@pytest.mark.usefixtures("nothing_left_behind")
def test_a_symlink_in_a_bound_host_tree_does_not_get_around_it(
    runner: User, base_image: Path, shared_dir: Path
) -> None:
    tree = shared_dir / f"tree-{runner.name}"
    tree.mkdir()
    (tree / "link").symlink_to("/proc")
    try:
        proc = rw(
            runner, "exec", "-B", f"{tree}:/data", "-B", "/etc:/data/link", str(base_image), "true"
        )
    finally:
        shutil.rmtree(tree)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (
        f"rankwire: cannot start container from {base_image}: cannot mount /etc on /data/link: "
        "it leads to /proc, which would hide the container's /proc: "
        "choose a DST that is not a symlink\n"
    )


@pytest.mark.usefixtures("nothing_left_behind")
def test_device_and_shm_binds_still_work(runner: User, base_image: Path) -> None:
    proc = rw(
        runner,
        "exec",
        "-B",
        "/dev/null",
        "-B",
        "/tmp:/dev/shm",
        str(base_image),
        "sh",
        "-c",
        "echo x > /dev/null && stat -c %t:%T /dev/null && test -d /dev/shm",
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "1:3\n", "")
