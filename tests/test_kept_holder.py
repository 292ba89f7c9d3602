"""The plugin holder's kept recipe (runtime/joinplan.py `remember_holder`, `kept_holder`):
given to the next start only while its key holds. Without Slurm: a container plan as the
planner makes one, the image and a bind's source open as the start phase has them."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from rankwire.runtime import frame, joinplan
from rankwire.runtime.plan import ContainerPlan, Mount


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
