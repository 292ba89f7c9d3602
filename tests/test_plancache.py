"""Launch plans kept for the next launch of the same words (`launcher/plancache.py`): the
key holds it only while nothing the planner read has changed; a kept plan runs as the
planned one does (real MPICH ranks in a real SIF, as root and as the user)."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

import pytest

from harness.mpi import assert_hello
from harness.users import User
from rankwire.launcher import plancache
from rankwire.launcher.plan import LaunchOptions, LaunchPlan, plan_launch
from rankwire.runtime import warm
from rankwire.runtime.plan import ContainerPlan, Mount, ProcessPlan
from rankwire.runtime.userfacts import user_facts

WORDS = ("apptainer-mpirun", "-n", "2", "app.sif", "/opt/hello")


def _plan(**kw: object) -> LaunchPlan:
    container = ContainerPlan(
        image="/i/app.sif",
        partition_offset=4096,
        partition_size=1 << 20,
        image_drivers=("squashfuse_ll", "extract"),
        overlay_drivers=("kernel",),
        writable=False,
        uid_map=(0, 1000, 1),
        gid_map=(0, 1000, 1),
        namespaces=("user", "mount", "pid"),
        mounts=(Mount(kind="bind", target="/tmp", source="/tmp", recursive=True),),
        tmpfs_size_mib=64,
        extract_dir="",
        cache_dir="/c",
    )
    proc = ProcessPlan(argv=("/opt/hello",), env={"PATH": "/usr/bin", "A": "1"}, workdir="/w")
    base = plan_launch(LaunchOptions(ntasks=2, timeout=30.0), proc, container, {}, [], "pmi1/2")
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


@pytest.fixture
def kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private runtime dir, and the image and a planner "file" of the key in the cwd."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    monkeypatch.setenv("RANKWIRE_RUNTIME_DIR", str(run))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "app.sif").write_bytes(b"image")
    (tmp_path / "code.py").write_text("# planner\n")
    (tmp_path / "port-state").write_text("4: ACTIVE\n")
    yield run


def _remember(
    plan: LaunchPlan, tmp_path: Path, warm_at: str = "", before: Optional[list[str]] = None
) -> None:
    files = [str(tmp_path / "code.py")]
    plancache.remember(
        WORDS,
        plan,
        user_facts(),
        "app.sif",
        files,
        {str(tmp_path / "adapter"): False},
        {"true": shutil.which("true")},
        {str(tmp_path / "port-state"): "4: ACTIVE"},
        warm_at,
        plancache.identities(["app.sif", *files]) if before is None else before,
    )


def _name(tmp_path: Path) -> str:
    return plancache.plan_name(WORDS, str(tmp_path))


def test_a_kept_plan_comes_back_while_its_key_holds(
    kept: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = _plan()
    _remember(plan, tmp_path)
    assert [p.name for p in kept.glob("launch-*")] == [_name(tmp_path)]
    assert plancache.cached(WORDS) == plan
    assert plancache.cached((*WORDS[:-1], "/opt/other")) is None  # other words

    def misses(change: Callable[[], object]) -> None:
        _remember(plan, tmp_path)
        assert plancache.cached(WORDS) == plan
        change()
        assert plancache.cached(WORDS) is None

    misses(lambda: (tmp_path / "code.py").write_text("# planner, edited\n"))
    misses(lambda: (tmp_path / "app.sif").write_bytes(b"image, rebuilt"))
    misses(lambda: (tmp_path / "adapter").mkdir())  # a probed path came
    (tmp_path / "adapter").rmdir()
    misses(lambda: (tmp_path / "port-state").write_text("1: DOWN\n"))  # a link went down
    (tmp_path / "port-state").write_text("4: ACTIVE\n")
    if os.getuid() == 0:  # other groups (which device nodes a provider may open)
        mine = os.getgroups()
        try:
            misses(lambda: os.setgroups([*mine, 4242]))
        finally:
            os.setgroups(mine)
    (tmp_path / "true").symlink_to(shutil.which("true") or "/bin/true")
    path = os.environ["PATH"]
    misses(lambda: monkeypatch.setenv("PATH", f"{tmp_path}:{path}"))  # another `true` first
    misses(lambda: monkeypatch.setenv("PATH", path))
    sub = tmp_path / "sub"
    sub.mkdir()
    misses(lambda: monkeypatch.chdir(sub))  # (another file name too)
    monkeypatch.chdir(tmp_path)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        misses(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft - 1, hard)))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    # Another install of rankwire, run by its path (same environment, words, directory):
    # every file of the key holds, but the plan is not its planners'.
    misses(lambda: monkeypatch.setattr(plancache, "PACKAGE", "/opt/other/rankwire"))


def test_the_warm_list_is_read_at_each_launch(kept: Path, tmp_path: Path) -> None:
    at = tmp_path / "warm-list"
    _remember(_plan(), tmp_path, str(at))
    first = plancache.cached(WORDS)
    assert first is not None and first.warm_record == str(at)
    assert first.container is not None and first.container.prefetch == ()
    ranges = ((0, warm.BLOCK, "/opt/hello"),)
    at.write_text(f"{warm.MAGIC}\n0 {warm.BLOCK} /opt/hello\n")
    again = plancache.cached(WORDS)
    assert again is not None and again.warm_record == ""
    assert again.container is not None and again.container.prefetch == ranges


def test_what_is_not_a_kept_plan_is_passed_over(kept: Path, tmp_path: Path) -> None:
    _remember(_plan(), tmp_path)
    path = kept / _name(tmp_path)
    whole = path.read_bytes()
    for broken in (
        b"",
        b"garbage",
        whole[: whole.rindex(b"end=1")],  # cut short
        whole.replace(b"rankwire-launch-plan 1", b"rankwire-launch-plan 2"),
        whole.replace(b'"ntasks": 2', b'"ntasks": 2, "nope": 1'),  # no such field
        whole.replace(b'"process": {', b'"process": [{'),  # no JSON
        whole[: whole.index(b"\0plan=") + 1] + b"plan=5\0end=1\0",  # JSON, not a plan
    ):
        path.write_bytes(broken)
        assert plancache.cached(WORDS) is None
    path.unlink()
    (tmp_path / "elsewhere").write_bytes(whole)
    path.symlink_to(tmp_path / "elsewhere")
    assert plancache.cached(WORDS) is None
    path.unlink()
    os.mkfifo(path)  # would block a reader
    assert plancache.cached(WORDS) is None


def test_a_lookup_never_fails_a_launch(
    kept: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    _remember(_plan(), tmp_path)
    kept.chmod(0o755)  # not private any more: not ours to trust
    assert plancache.cached(WORDS) is None
    monkeypatch.setenv("RANKWIRE_RUNTIME_DIR", str(tmp_path / "none"))  # not made yet
    assert plancache.cached(WORDS) is None
    assert not (tmp_path / "none").exists()
    assert capfd.readouterr() == ("", "")


def test_a_file_changed_while_planned_keeps_no_plan(kept: Path, tmp_path: Path) -> None:
    before = plancache.identities(["app.sif", str(tmp_path / "code.py")])
    (tmp_path / "app.sif").write_bytes(b"image, replaced while it was read")
    _remember(_plan(), tmp_path, before=before)
    assert list(kept.glob("launch-*")) == []


def test_a_plan_is_kept_only_as_its_json_gives_it_back(kept: Path, tmp_path: Path) -> None:
    for plan in (
        _plan(),
        _plan(container=None),
        _plan(delegate=("srun", "-n", "2", "/opt/hello"), slurm_job="7"),
    ):
        again = LaunchPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
        assert again == plan
    odd = _plan(grace=float("nan"))  # never equal to itself: not kept
    _remember(odd, tmp_path)
    assert list(kept.glob("launch-*")) == []


# -- real launches ---------------------------------------------------------------------


def _kept_file(runner: User, words: tuple[str, ...]) -> Path:
    return Path(f"/tmp/rankwire-{runner.uid}") / plancache.plan_name(words, "/tmp")


@pytest.mark.mpi
@pytest.mark.usefixtures("nothing_left_behind")
def test_a_launch_runs_the_plan_the_last_one_kept(mpich_image: Path, runner: User) -> None:
    words = ("apptainer-mpirun", "-n", "2", str(mpich_image), "/opt/hello_mpich")

    def launch(*env: str) -> subprocess.CompletedProcess[str]:
        return runner.run(["env", *env, *words], cwd="/tmp", timeout=60)

    path = _kept_file(runner, words)
    path.unlink(missing_ok=True)
    first = launch()
    assert first.returncode == 0, first.stderr
    assert_hello(first.stdout, 2)
    planned = path.stat()
    os.utime(path, ns=(10**9, 10**9))
    second = launch()  # the kept plan: the file is used (touched), not written again
    assert second.returncode == 0, second.stderr
    assert_hello(second.stdout, 2)
    used = path.stat()
    assert used.st_ino == planned.st_ino and used.st_mtime_ns > 10**9
    third = launch("RANKWIRE_PLAN_TEST=1")  # another environment: planned, kept anew
    assert third.returncode == 0, third.stderr
    assert path.stat().st_ino != planned.st_ino
    assert b"RANKWIRE_PLAN_TEST=1" in path.read_bytes()


@pytest.mark.usefixtures("nothing_left_behind")
def test_a_kept_plan_fails_as_the_planned_one(runner: User) -> None:
    words = ("rankwire", "run", "-n", "2", "sh", "-c", 'exit "$((3 * PMI_RANK))"')
    path = _kept_file(runner, ("run", *words[2:]))
    path.unlink(missing_ok=True)
    first = runner.run(list(words), cwd="/tmp", timeout=60)
    assert path.exists()
    planned = path.stat()
    second = runner.run(list(words), cwd="/tmp", timeout=60)
    assert path.stat().st_ino == planned.st_ino  # not planned again
    assert (first.returncode, first.stderr) == (3, "rankwire: rank 1 exited with 3\n")
    assert (second.returncode, second.stderr) == (3, "rankwire: rank 1 exited with 3\n")


def _planned_again_after(
    runner: User, words: tuple[str, ...], env: list[str], change: Callable[[], object]
) -> Path:
    """`rankwire WORDS` twice (the second runs the kept plan), then `change()`: the next
    launch plans again. Returns the kept plan's file."""
    argv = ["env", *env, "rankwire", *words]
    path = _kept_file(runner, words)
    path.unlink(missing_ok=True)
    assert runner.run(argv, cwd="/tmp", timeout=60).returncode == 0
    planned = path.stat()
    assert runner.run(argv, cwd="/tmp", timeout=60).returncode == 0
    assert path.stat().st_ino == planned.st_ino  # the kept plan
    change()
    assert runner.run(argv, cwd="/tmp", timeout=60).returncode == 0
    assert path.stat().st_ino != planned.st_ino  # planned again
    return path


@pytest.mark.usefixtures("nothing_left_behind")
def test_a_program_put_earlier_on_path_is_planned_again(runner: User, shared_dir: Path) -> None:
    first_on_path = shared_dir / f"bin-{runner.name}-{os.urandom(4).hex()}"
    first_on_path.mkdir(mode=0o755)
    dirs = (str(first_on_path), runner.bindir, os.environ["PATH"])
    path_env = os.pathsep.join(d for d in dirs if d)

    def put() -> None:
        shutil.copy2(shutil.which("true") or "/bin/true", first_on_path / "true")

    words = ("run", "-n", "2", "true")
    path = _planned_again_after(runner, words, [f"PATH={path_env}"], put)
    assert f"tool=true:{first_on_path}/true".encode() in path.read_bytes()


@pytest.mark.usefixtures("nothing_left_behind")
def test_a_library_dir_that_changes_is_planned_again(runner: User, shared_dir: Path) -> None:
    """On the host, the dirs the loader's search looked in are in the key: a library put
    in one (here any file: the dir's identity changes) would be loaded instead (ls: its
    libselinux is looked for in LD_LIBRARY_PATH first)."""
    searched = shared_dir / f"lib-{runner.name}-{os.urandom(4).hex()}"
    searched.mkdir(mode=0o755)
    words = ("run", "-n", "2", "ls", "/")
    env = [f"LD_LIBRARY_PATH={searched}"]
    _planned_again_after(runner, words, env, (searched / "libnew.so.1").touch)
