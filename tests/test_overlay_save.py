"""--writable-overlay DIR (changes kept in a host dir) and --save OUT.sif (the container
packed into a new SIF), with real images, holders and mksquashfs, as root and as the
unprivileged user."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.images import make_rootfs, make_world_readable
from harness.procs import child_of
from harness.users import User, rw

pytestmark = pytest.mark.usefixtures("nothing_left_behind")


@pytest.fixture(scope="module")
def tools_image(shared_dir: Path) -> Path:
    """An image that can delete and write big files, with /opt/d/{a,b} to delete."""
    from rankwire.runtime.build import build_image

    out = shared_dir / "overlay-tools.sif"
    if not out.exists():
        rootfs = make_rootfs(
            shared_dir / "overlay-tools-rootfs",
            binaries=["/usr/bin/rm", "/usr/bin/dd"],
            files={"/opt/d/a": "a\n", "/opt/d/b": "b\n"},
        )
        build_image(out, rootfs, env={"TOOLS_VAR": "tools"}, labels={"purpose": "tools"})
        make_world_readable(shared_dir)
    return out


@pytest.fixture
def home(shared_dir: Path, runner: User) -> Iterator[Path]:
    """A fresh dir the runner owns (for DIR and OUT), removed after the test."""
    d = shared_dir / f"ovl-{runner.name}-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    if runner.uid:
        os.chown(d, runner.uid, runner.gid)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_plan_shows_the_overlay_dir_and_the_save_target(base_image: Path) -> None:
    from click.testing import CliRunner

    from rankwire.runtime.cli_run import exec_

    args = ["--writable-overlay", "ov", "--save", "out.sif", "--dry-run", "--json"]
    result = CliRunner().invoke(exec_, [*args, str(base_image), "true"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    container = json.loads(result.output)["container"]
    cwd = os.getcwd()
    assert (container["overlay_dir"], container["save"]) == (f"{cwd}/ov", f"{cwd}/out.sif")
    assert container["writable"] is True
    assert container["image_identity"]


def test_the_planner_resolves_and_checks_dir_and_target() -> None:
    """Pure: (facts, options) -> plan, as in tests/test_plan.py."""
    from test_plan import ALL, HOST, IMAGE, user

    from rankwire.errors import UserError
    from rankwire.runtime.plan import ExecOptions, plan_container
    from rankwire.runtime.slurmfacts import SlurmStep

    u = user()
    plain = plan_container(IMAGE, HOST, u, ExecOptions(), ALL)
    assert (plain.overlay_dir, plain.save, plain.writable) == ("", "", False)
    opts = ExecOptions(writable_overlay="ov/", save="../out.sif")
    plan = plan_container(IMAGE, HOST, u, opts, ALL)
    assert (plan.overlay_dir, plan.save, plan.writable) == ("/work/job/ov", "/work/out.sif", True)
    assert plan.image_identity == IMAGE.digest
    saved_only = plan_container(IMAGE, HOST, u, ExecOptions(save="o.sif"), ALL)
    assert (saved_only.overlay_dir, saved_only.image_identity) == ("", "")
    shared = (
        "--save packs the container of one command, and this one is shared by several tasks "
        "(--share, or srun with several tasks): give --share none"
    )
    refusals = {
        ExecOptions(writable_overlay="a,b"): "--writable-overlay /work/job/a,b: the overlay "
        "cannot use a path holding ',', ':' or '\\'; choose another directory",
        ExecOptions(save="out/"): "--save 'out/': give the path of the .sif file to write",
        ExecOptions(writable_overlay="ov", save="ov/x.sif"): "--save /work/job/ov/x.sif lies "
        "inside --writable-overlay /work/job/ov: write the image elsewhere",
        ExecOptions(save="o.sif", share="k"): shared,
    }
    for bad, message in refusals.items():
        with pytest.raises(UserError) as err:
            plan_container(IMAGE, HOST, u, bad, ALL)
        assert str(err.value) == message
    # Under srun with several tasks, the step's container is shared by default.
    step = user(slurm=SlurmStep("7", "0", 2, "", ""))
    with pytest.raises(UserError) as err:
        plan_container(IMAGE, HOST, step, ExecOptions(save="o.sif"), ALL)
    assert str(err.value) == shared
    assert plan_container(IMAGE, HOST, step, ExecOptions(save="o.sif", share="none"), ALL).save


def test_exec_keeps_changes_in_the_dir_for_the_next_exec(
    runner: User, home: Path, base_image: Path
) -> None:
    image = base_image
    ov = home / "ov"
    ok(rw(runner, "exec", "--writable-overlay", str(ov), str(image), "sh", "-c", "echo kept >/k"))
    assert (
        ok(rw(runner, "exec", "--writable-overlay", str(ov), str(image), "cat", "/k")) == "kept\n"
    )
    # Without the dir, the image is as it was.
    proc = rw(runner, "exec", str(image), "cat", "/k")
    assert (proc.returncode, proc.stderr) == (1, "cat: /k: No such file or directory\n")


def test_a_dir_of_another_image_is_refused(
    runner: User, home: Path, tools_image: Path, base_image: Path
) -> None:
    base = base_image
    ov = home / "ov"
    ok(rw(runner, "exec", "--writable-overlay", str(ov), str(tools_image), "true"))
    before = sorted(p.name for p in ov.iterdir())
    proc = rw(runner, "exec", "--writable-overlay", str(ov), str(base), "true")
    assert (proc.returncode, proc.stderr) == (
        2,
        f"rankwire: --writable-overlay {ov} holds changes to another image ({tools_image}), "
        f"not to {base}: give another DIR, or that image\n",
    )
    assert (
        sorted(p.name for p in ov.iterdir())
        == before
        == [
            "rankwire-overlay.json",
            "upper",
            "work",
        ]
    )


def test_a_dir_that_cannot_hold_changes_and_an_unwritable_target_are_refused(
    runner: User, base_image: Path, home: Path
) -> None:
    stuff = home / "stuff"
    stuff.mkdir()
    (stuff / "notes.txt").write_text("mine\n")
    proc = rw(runner, "exec", "--writable-overlay", str(stuff), str(base_image), "true")
    assert (proc.returncode, proc.stderr) == (
        2,
        f"rankwire: --writable-overlay {stuff} is not empty and holds no rankwire overlay: "
        "give a new or empty directory\n",
    )
    assert [p.name for p in stuff.iterdir()] == ["notes.txt"]
    proc = rw(runner, "exec", "--writable-overlay", "/proc/rw-ov", str(base_image), "true")
    assert (proc.returncode, proc.stderr) == (
        2,
        "rankwire: --writable-overlay /proc/rw-ov is on proc, where the kernel's overlay cannot "
        "keep changes: give a directory on a local disk (ext4, xfs, btrfs) or tmpfs\n",
    )
    proc = rw(runner, "exec", "--save", "/nonexistent/x.sif", str(base_image), "true")
    assert (proc.returncode, proc.stderr) == (
        2,
        "rankwire: --save /nonexistent/x.sif: directory /nonexistent does not exist; create it\n",
    )


def test_an_instance_keeps_its_changes_across_a_restart_and_locks_the_dir(
    runner: User, home: Path, base_image: Path
) -> None:
    image = base_image
    ov, name = home / "ov", f"ovl-{runner.name}"
    ok(rw(runner, "instance", "start", "--writable-overlay", str(ov), str(image), name))
    try:
        ok(rw(runner, "exec", f"instance://{name}", "sh", "-c", "echo from-instance > /i"))
        busy = rw(runner, "exec", "--writable-overlay", str(ov), str(image), "true")
        assert (busy.returncode, busy.stderr) == (
            2,
            f"rankwire: --writable-overlay {ov} is in use by another running container: stop "
            "that one first, or give another DIR\n",
        )
    finally:
        ok(rw(runner, "instance", "stop", name))
    ok(rw(runner, "instance", "start", "--writable-overlay", str(ov), str(image), name))
    try:
        assert ok(rw(runner, "exec", f"instance://{name}", "cat", "/i")) == "from-instance\n"
        refused = rw(runner, "instance", "start", "--save", "x.sif", str(image), "other")
        assert (refused.returncode, refused.stderr) == (
            2,
            "rankwire: --save applies to exec; save an instance when it stops: "
            "`rankwire instance stop other --save x.sif`\n",
        )
        ok(rw(runner, "instance", "stop", name, "--save", str(home / "inst.sif")))
    except BaseException:
        rw(runner, "instance", "stop", name)
        raise
    assert ok(rw(runner, "exec", str(home / "inst.sif"), "cat", "/i")) == "from-instance\n"


def test_an_instance_without_a_dir_cannot_be_saved(runner: User, base_image: Path) -> None:
    name = f"nodir-{runner.name}"
    ok(rw(runner, "instance", "start", str(base_image), name))
    try:
        proc = rw(runner, "instance", "stop", name, "--save", "/tmp/never.sif")
        assert (proc.returncode, proc.stderr) == (
            2,
            f"rankwire: instance {name} keeps no changes apart: start it with "
            "--writable-overlay DIR to save it\n",
        )
    finally:
        ok(rw(runner, "instance", "stop", name))
    assert not Path("/tmp/never.sif").exists()


def _inspect(runner: User, image: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(ok(rw(runner, "inspect", "--json", str(image))))
    return doc


def test_save_packs_the_image_and_its_changes(runner: User, home: Path, tools_image: Path) -> None:
    """Whiteouts (a deleted file, a directory removed and made again) are honoured; the
    command's exit status is exec's, and a failed command still saves (as Pyxis does)."""
    out = home / "saved.sif"
    script = "echo new >/opt/new && rm /etc/os-release && rm -r /opt/d && mkdir /opt/d && "
    script += "echo c >/opt/d/c && exit 3"
    proc = rw(
        runner, "exec", "--fakeroot", "--save", str(out), str(tools_image), "sh", "-c", script
    )
    assert (proc.returncode, proc.stderr) == (3, "")
    assert sorted(p.name for p in home.iterdir()) == ["saved.sif"]  # no scratch left
    seen = rw(
        runner,
        "exec",
        str(out),
        "sh",
        "-c",
        "cat /opt/new; ls /opt/d; ls /etc/os-release; echo $TOOLS_VAR",
    )
    assert seen.stdout == "new\nc\ntools\n"
    assert seen.stderr == "ls: cannot access '/etc/os-release': No such file or directory\n"
    source = _inspect(runner, tools_image)
    labels = _inspect(runner, out)["labels"]
    assert labels["org.rankwire.saved-from"] == str(tools_image)
    assert labels["org.rankwire.saved-from.identity"] == source["identity"]
    assert labels["org.rankwire.saved-at"].endswith("Z")
    assert labels["purpose"] == "tools"
    assert labels["org.label-schema.usage.singularity.deffile.bootstrap"] == "localimage"
    # Exactly the changes: nothing of the host (mount points of the binds of the cwd and
    # $HOME, /proc, ...) went into the image.
    before, after = _paths(tools_image), _paths(out)
    assert after - before == {"/opt/new", "/opt/d/c"}
    assert before - after == {"/etc/os-release", "/opt/d/a", "/opt/d/b"}


def _using(path: Path) -> list[str]:
    """Processes whose command line names `path` (mksquashfs, unsquashfs)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(str(path).encode() in arg for arg in argv):
            found.append(f"{proc.name} {argv[0].decode(errors='replace')}")
    return found


def _paths(image: Path) -> set[str]:
    """Every path in the image's squashfs partition."""
    from rankwire.runtime.sif_read import SifImage

    with SifImage.open(image) as img:
        offset = img.primary_partition().offset
    listing = subprocess.run(
        ["unsquashfs", "-l", "-o", str(offset), "-d", "", str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line for line in listing.splitlines() if line.startswith("/")}


def test_a_killed_save_leaves_the_old_image_and_no_scratch(
    runner: User, home: Path, tools_image: Path
) -> None:
    ov, out = home / "ov", home / "out.sif"
    out.write_bytes(b"the old image\n")
    if runner.uid:
        os.chown(out, runner.uid, runner.gid)
    big = "dd if=/dev/urandom of=/big bs=1M count=64 status=none"
    ok(rw(runner, "exec", "--writable-overlay", str(ov), str(tools_image), "sh", "-c", big))
    argv = ["rankwire", "exec", "--writable-overlay", str(ov), "--save", str(out)]
    proc = subprocess.Popen(runner.argv([*argv, str(tools_image), "true"]), cwd="/tmp")
    try:
        packing: list[Path] = []
        deadline = time.monotonic() + 60
        while not packing and time.monotonic() < deadline and proc.poll() is None:
            # mksquashfs writes into the new SIF's temp file (create_sif's, at its offset)
            packing = [
                p for p in home.glob(".rankwire-save-*/.image.sif.*.tmp") if p.stat().st_size
            ]
            time.sleep(0.02)
        assert packing, "mksquashfs never started"
        rankwire = proc.pid if runner.uid == os.getuid() else child_of(proc.pid)
        os.kill(rankwire, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The guard removes the scratch dir once rankwire and its unsquashfs/mksquashfs (they
    # die with it) are gone.
    deadline = time.monotonic() + 10
    while (len(list(home.iterdir())) > 2 or _using(home)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _using(home) == []
    assert sorted(p.name for p in home.iterdir()) == ["out.sif", "ov"]
    assert out.read_bytes() == b"the old image\n"


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_an_image_of_each_compression_runs_and_saves_as_it_was(
    runner: User, home: Path, shared_dir: Path, compression: str
) -> None:
    """Images not in the default lz4: squashfuse reads them, and --save packs the result
    with the source's compressor (a gzip image stays readable where it had to be)."""
    from rankwire.runtime.build import build_image
    from rankwire.runtime.sif_read import SifImage

    source = shared_dir / f"comp-{compression}.sif"
    if not source.exists():
        rootfs = make_rootfs(shared_dir / f"comp-{compression}-rootfs", files={"/opt/x": "x\n"})
        build_image(source, rootfs, compression=compression)
        make_world_readable(shared_dir)
    out = home / "saved.sif"
    script = "cat /opt/x > /opt/y"
    proc = rw(runner, "exec", "--fakeroot", "--save", str(out), str(source), "sh", "-c", script)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert ok(rw(runner, "exec", str(out), "cat", "/opt/y")) == "x\n"
    with SifImage.open(out) as img:
        offset = img.primary_partition().offset
    said = subprocess.run(
        ["unsquashfs", "-s", "-o", str(offset), str(out)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"Compression {compression}\n" in said
