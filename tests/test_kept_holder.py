"""The plugin holder's kept recipe (runtime/joinplan.py `remember_holder`, `kept_holder`):
given to the next start only while its key holds. Without Slurm: a container plan as the
planner makes one, the image and a bind's source open as the start phase has them."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rankwire.runtime import frame, joinplan
from rankwire.runtime.plan import ContainerPlan, Mount, UserFacts


@dataclasses.dataclass
class Kept:
    runtime: Path
    plan: ContainerPlan
    image_fd: int
    bind_fd: int
    fuse: Path  # the recipe's FUSE driver, a file of the key
    source: Path  # the bind's source dir


@pytest.fixture
def kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Kept]:
    image = tmp_path / "app.sif"
    image.write_bytes(b"not read here")
    source = tmp_path / "data"
    source.mkdir()
    fuse = tmp_path / "squashfuse_ll"
    shutil.copy("/bin/true", fuse)
    monkeypatch.setenv("PATH", f"{tmp_path / 'early'}:{tmp_path}")  # where holder.py looks
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    image_fd = os.open(image, os.O_RDONLY)
    bind_fd = os.open(source, os.O_PATH)
    plan = ContainerPlan(
        image=str(image),
        partition_offset=4096,
        partition_size=8192,
        image_drivers=("squashfuse_ll",),
        overlay_drivers=("kernel",),
        writable=False,
        uid_map=(os.getuid(), os.getuid(), 1),
        gid_map=(os.getgid(), os.getgid(), 1),
        namespaces=("user", "mount"),
        mounts=(Mount("bind", "/data", f"/proc/self/fd/{bind_fd}", readonly=True),),
        tmpfs_size_mib=64,
        extract_dir="",
        cache_dir=str(tmp_path / "cache"),
    )
    recipe = [("r_driver", fuse.name), ("r_fuse", str(fuse)), ("r_mount", "bind")]
    recipe.append(("r_source", plan.mounts[0].source))
    joinplan.remember_holder(str(runtime), plan, image_fd, (bind_fd,), recipe)
    yield Kept(runtime, plan, image_fd, bind_fd, fuse, source)
    os.close(image_fd)
    os.close(bind_fd)


def recipe_of(k: Kept, plan: ContainerPlan | None = None) -> list[tuple[str, str]] | None:
    fd = joinplan.kept_holder(str(k.runtime), plan or k.plan, k.image_fd, (k.bind_fd,))
    if fd is None:
        return None
    try:
        return [r for r in frame.decode(os.pread(fd, 1 << 20, 0)) if r[0].startswith("r_")]
    finally:
        os.close(fd)


def test_the_next_start_of_the_same_plan_gets_the_recipe(kept: Kept) -> None:
    assert recipe_of(kept) == [
        ("r_driver", kept.fuse.name),
        ("r_fuse", str(kept.fuse)),
        ("r_mount", "bind"),
        ("r_source", kept.plan.mounts[0].source),
    ]
    # what a bound directory holds is not the recipe's: it stays
    (kept.source / "new").write_text("x")
    assert recipe_of(kept) is not None


def test_another_plan_gets_none(kept: Kept) -> None:
    other = dataclasses.replace(kept.plan, tmpfs_size_mib=kept.plan.tmpfs_size_mib + 1)
    assert recipe_of(kept, other) is None
    assert recipe_of(kept) is not None


def test_a_changed_image_gets_none(kept: Kept) -> None:
    with open(kept.plan.image, "ab") as f:
        f.write(b"\0")
    assert recipe_of(kept) is None


def test_another_bind_source_under_the_same_descriptor_gets_none(kept: Kept) -> None:
    os.rename(kept.source, kept.source.with_name("was"))
    kept.source.mkdir()
    again = os.open(kept.source, os.O_PATH)
    try:
        os.dup2(again, kept.bind_fd)
    finally:
        os.close(again)
    assert recipe_of(kept) is None


def test_a_changed_fuse_driver_gets_none(kept: Kept) -> None:
    os.utime(kept.fuse, ns=(0, 0))
    assert recipe_of(kept) is None


def test_another_fuse_driver_first_on_path_gets_none(kept: Kept) -> None:
    early = kept.fuse.parent / "early"
    early.mkdir()
    shutil.copy(kept.fuse, early / kept.fuse.name)
    assert recipe_of(kept) is None


def test_more_descriptors_than_the_c_holder_keeps_are_not_kept(kept: Kept) -> None:
    (path,) = kept.runtime.glob("holder-*.plan")
    path.unlink()
    binds = [os.open(kept.source, os.O_PATH) for _ in range(joinplan.KEEP_MAX)]
    try:
        joinplan.remember_holder(str(kept.runtime), kept.plan, kept.image_fd, binds, [])
        assert list(kept.runtime.glob("holder-*.plan")) == []
        joinplan.remember_holder(str(kept.runtime), kept.plan, kept.image_fd, binds[1:], [])
        assert len(list(kept.runtime.glob("holder-*.plan"))) == 1
    finally:
        for fd in binds:
            os.close(fd)


def test_a_recipe_cut_short_or_not_the_users_gets_none(kept: Kept) -> None:
    (path,) = kept.runtime.glob("holder-*.plan")
    data = path.read_bytes()
    path.write_bytes(data[: data.rindex(b"end=1")])
    assert recipe_of(kept) is None
    path.write_bytes(data)
    assert recipe_of(kept) is not None
    if os.getuid() == 0:
        os.chown(path, 1, 1)
        assert recipe_of(kept) is None


FRONT = Path(sys.executable).parent / "rankwire"  # the C front end (runtime/front.c)


def _identity(path: Path) -> str:
    st = path.stat()
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _plugin_plan(kept: Kept, program: Path, cwd: str = "/", binds: int = 1) -> str:
    """A plugin plan (joinplan.py `remember_plugin`) of `kept`'s container, as the start
    phase keeps it with the image on descriptor 3 and the bind's source on 4 (and on
    5, 6, ... for `binds` binds of it), whose holder program is `program`; its name."""
    user = UserFacts(os.getuid(), os.getgid(), "/", cwd, {}, str(kept.runtime / "cache"))
    st = kept.source.stat()
    out = [("magic", joinplan.PLUGIN_MAGIC), ("holder_program", str(program))]
    out += joinplan.key_records((), kept.plan.image, user, [], {}, {}, {})
    out += [
        ("workdir", "/"),
        ("no_new_privs", "1"),
        ("fd", f"3:{_identity(Path(kept.plan.image))}"),
    ]
    for fd in range(4, 4 + binds):
        out.append(("fd", f"{fd}:{st.st_dev}:{st.st_ino}:{stat.S_IFMT(st.st_mode):o}"))
    out.append(("end", "1"))
    name = "plugin-0123456789abcdef.plan"
    (kept.runtime / name).write_bytes(frame.encode(out))
    (kept.runtime / name).chmod(0o600)
    return name


def _start_kept(request: frame.Records) -> frame.Records:
    """`rankwire spank-helper start-kept` as the shim runs it: in /, the environment this
    process started with (the plan's key holds it), the request on stdin, the reply on a
    socket (stdout)."""
    env = dict(e.split("=", 1) for e in joinplan.started_environment())
    ours, theirs = socket.socketpair()
    with ours:
        with theirs:
            done = subprocess.run(
                [str(FRONT), "spank-helper", "start-kept"], input=frame.encode(request),
                stdout=theirs, stderr=subprocess.PIPE, timeout=30, cwd="/", env=env,
            )  # fmt: skip
        assert (done.returncode, done.stderr) == (0, b"")
        ours.settimeout(10)
        return frame.decode(ours.recv(4096))


@pytest.mark.parametrize(
    "wrong",
    ["none", "fifteen-binds", "no-plan", "not-private", "image-changed", "bind-moved", "other-key"],
)
def test_the_front_end_starts_a_plugin_plan_only_for_a_request_that_holds(
    kept: Kept, tmp_path: Path, wrong: str
) -> None:
    """The shim's fresh ticket asks the front end to open the image and binds as root's
    check did and to start the plugin plan's container. With all as the ticket and the
    plan say, it runs the holder program (here one that logs its words and fails: a miss);
    anything else is a miss before it: the shim then runs the helper."""
    log, program = tmp_path / "holder.log", tmp_path / "holder.sh"
    program.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit 1\n')
    program.chmod(0o755)
    image, source = Path(kept.plan.image), kept.source
    st = source.stat()
    bind = f"{st.st_mode & 0o170000:o}:{st.st_dev}:{st.st_ino}:1\t{source}\t{source}"
    binds = 15 if wrong == "fifteen-binds" else 1  # with the image: all the holder keeps
    request = [
        ("plan", _plugin_plan(kept, program, "/tmp" if wrong == "other-key" else "/", binds)),
        ("runtime_dir", str(kept.runtime)),
        ("owner", str(os.getpid())),
        ("fresh_image", f"{_identity(image)}\t{image}\t{image}"),
        *[("fresh_bind", bind)] * binds,
    ]
    if wrong == "no-plan":
        request = request[1:]
    elif wrong == "not-private":
        kept.runtime.chmod(0o755)
    elif wrong == "image-changed":
        image.write_bytes(b"another image")
    elif wrong == "bind-moved":  # the path the check opened holds another directory now
        source.rename(tmp_path / "was")
        source.mkdir()
    assert _start_kept(request) == [("miss", "1")]
    if wrong in ("none", "fifteen-binds"):
        words = log.read_text().split()
        keep = [f"keep={fd}" for fd in range(3, 4 + binds)]
        assert words[0] == "setup" and words[-2 - binds :] == ["mode=shared", *keep]
    else:
        assert not log.exists()
