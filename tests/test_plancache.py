"""Launch plans kept for the next launch of the same words (`launcher/plancache.py`): the
key holds it only while nothing the planner read has changed; a kept plan runs as the
planned one does (real MPICH ranks in a real SIF, as root and as the user)."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import time
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


def _launched(runner: User, words: tuple[str, ...], seen: Path) -> tuple[int, str, str, str]:
    """Launch `words` (their ranks: `sh -c SCRIPT`, whose rank 0 writes its PMI_JOBID,
    rankwire-PID-N, to `seen`/jobid, then waits for `seen`/go); returns the exit code,
    stdout, stderr and how the launcher ran meanwhile (its /proc/PID/cmdline: the Python
    CLI's `__apptainer-mpirun …` when it planned, `__launch …` when the front end started
    the ranks of the kept plan)."""
    for name in ("jobid", "go"):
        (seen / name).unlink(missing_ok=True)
    argv = runner.argv(list(words))
    with subprocess.Popen(
        argv, cwd="/tmp", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
        # a caller's blocked signal is not the ranks' (a batch wrapper's SIGALRM, say)
        preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM}),
    ) as proc:  # fmt: skip
        assert proc.stdin is not None
        proc.stdin.write("a line\n")  # rank 0's, the others read /dev/null
        proc.stdin.close()
        deadline = time.monotonic() + 30
        while not (seen / "jobid").exists() or not (seen / "jobid").read_text().endswith("\n"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        launcher = (seen / "jobid").read_text().split("-")[1]
        how = Path(f"/proc/{launcher}/cmdline").read_bytes().split(b"\0")
        (seen / "go").touch()
        out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
        proc.wait(60)
    return proc.returncode, out, err, "launch" if b"__launch" in how else "planned"


WAIT_GO = "i=0; while [ ! -e {d}/go ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done"


@pytest.mark.usefixtures("nothing_left_behind")
def test_a_kept_launch_in_an_image_is_started_by_the_front_end_and_runs_alike(
    base_image: Path, runner: User, shared_dir: Path
) -> None:
    """The second launch of the same words: the C front end starts the container and the
    ranks (`front.c` `launch`), Python serves them (`execute.adopt`). The ranks see the
    same environment (but the job's id and their PMI_FD's number), the same stdin rule
    and output, and a failure ends the job as it does when Python starts them."""
    seen = Path(tempfile.mkdtemp(prefix="launch-", dir=shared_dir))
    seen.chmod(0o777)
    script = (
        f'env > {seen}/env-$PMI_RANK; grep SigBlk /proc/self/status >> {seen}/env-$PMI_RANK; '
        f'[ -n "$PMI_FD" ] && [ -e /proc/self/fd/$PMI_FD ] && echo "fd of $PMI_RANK"; '
        f'read line && echo "$PMI_RANK read $line"; '
        f'if [ $PMI_RANK = 0 ]; then echo $PMI_JOBID > {seen}/jobid; {WAIT_GO.format(d=seen)}; fi; '
        'exit $((PMI_RANK == 2 ? 5 : 0))'
    )  # fmt: skip
    words = ("apptainer-mpirun", "-n", "3", str(base_image), "sh", "-c", script)
    path = _kept_file(runner, words)
    path.unlink(missing_ok=True)
    runs = []
    for _ in range(2):
        code, out, err, how = _launched(runner, words, seen)
        envs = [
            sorted(v for v in (seen / f"env-{r}").read_text().splitlines()
                   if not v.startswith(("PMI_JOBID=", "PMI_FD=")))
            for r in range(3)
        ]  # fmt: skip
        runs.append((code, sorted(out.splitlines()), err, envs, how))
    (code, out, err, envs, how), again = runs
    assert how == "planned" and again[4] == "launch"
    assert b"front_dir=" in path.read_bytes() and b"r_driver=" in path.read_bytes()
    assert again[:4] == (code, out, err, envs)
    assert (code, err) == (5, "rankwire: rank 2 exited with 5\n")
    assert out == ["0 read a line", "fd of 0", "fd of 1", "fd of 2"]
    assert {"PMI_RANK=1", "PMI_SIZE=3", "SigBlk:\t0000000000000000"} <= set(envs[1])


@pytest.mark.usefixtures("nothing_left_behind")
def test_a_signal_while_the_front_end_hands_over_reaches_the_ranks(
    base_image: Path, runner: User, shared_dir: Path
) -> None:
    """SIGTERM to a launcher whose ranks the front end started, as soon as they run
    (Python may not have started yet): held until Python forwards it, as it forwards
    one later; the ranks' exit code is the job's."""
    seen = Path(tempfile.mkdtemp(prefix="launch-", dir=shared_dir))
    seen.chmod(0o777)
    # each rank says it runs once its trap is set (a rank without it would end by the
    # signal itself, 143, and that could be the job's first failure)
    script = f"trap 'exit 7' TERM; echo $PMI_JOBID > {seen}/ready-$PMI_RANK; sleep 30 & wait"
    words = ("apptainer-mpirun", "-n", "2", str(base_image), "sh", "-c", script)
    _kept_file(runner, words).unlink(missing_ok=True)
    ready = [seen / "ready-0", seen / "ready-1"]
    for expect in ("planned", "launch"):
        for path in ready:
            path.unlink(missing_ok=True)
        with subprocess.Popen(
            runner.argv(list(words)), cwd="/tmp", stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True,
        ) as proc:  # fmt: skip
            deadline = time.monotonic() + 30
            while not all(p.exists() and p.read_text().endswith("\n") for p in ready):
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.005)
            launcher = int(ready[0].read_text().split("-")[1])
            how = Path(f"/proc/{launcher}/cmdline").read_bytes()
            os.kill(launcher, signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
        assert ("launch" if b"__launch" in how else "planned") == expect
        assert (proc.returncode, out, err) == (7, "", "")


def _kept_and_edited(
    runner: User, words: tuple[str, ...], record: bytes, value: bytes
) -> tuple[Path, bytes]:
    """Launch `words` (which keeps their plan), then give the last record that starts with
    `record` the value `value` (the part of `record` after its `=` replaced) in the same
    file (still the user's private one). Returns the plan's path and what it held."""
    path = _kept_file(runner, words)
    path.unlink(missing_ok=True)
    assert runner.run(list(words), cwd="/tmp", timeout=60).returncode == 0
    data = path.read_bytes()
    start = data.rindex(b"\0" + record) + 1 + record.index(b"=") + 1
    end = data.index(b"\0", start)
    with open(path, "wb") as f:
        f.write(data[:start] + value + data[end:])
    return path, data


@pytest.mark.usefixtures("nothing_left_behind")
def test_a_kept_launch_whose_container_the_front_end_cannot_start_is_planned_again(
    base_image: Path, runner: User
) -> None:
    """The recipe's last bind fails (its source is gone): rankwire-holder tears down what
    it made, the front end drops the plan, and the Python CLI plans, launches and keeps a
    new plan: the launch itself does not fail, and nothing is left."""
    words = ("apptainer-mpirun", "-n", "2", str(base_image), "sh", "-c", "echo $PMI_RANK")
    path, data = _kept_and_edited(runner, words, b"r_source=/", b"/nonexistent/source")
    again = runner.run(list(words), cwd="/tmp", timeout=60)
    assert (again.returncode, sorted(again.stdout.split()), again.stderr) == (0, ["0", "1"], "")
    assert path.read_bytes() == data  # planned again, the same plan


@pytest.mark.usefixtures("nothing_left_behind")
def test_a_kept_launch_another_install_planned_is_refused_and_dropped(
    base_image: Path, runner: User
) -> None:
    """The front end started a plan whose `package` is another install's (its key holds
    the Python CLI's file, so this takes a plan edited by hand): the Python side serves
    no job it did not plan, says so, leaves nothing, and drops the plan."""
    words = ("apptainer-mpirun", "-n", "2", str(base_image), "sh", "-c", "echo $PMI_RANK")
    path, _ = _kept_and_edited(runner, words, b"package=", b"/another/rankwire")
    refused = runner.run(list(words), cwd="/tmp", timeout=60)
    assert (refused.returncode, refused.stderr) == (
        125,
        "rankwire: cannot serve the launch its kept plan started (it was planned by the "
        "rankwire in /another/rankwire): launch it again\n",
    )
    assert not path.exists()
    again = runner.run(list(words), cwd="/tmp", timeout=60)
    assert (again.returncode, sorted(again.stdout.split())) == (0, ["0", "1"])


@pytest.mark.mpi
@pytest.mark.usefixtures("nothing_left_behind")
def test_the_front_end_s_holder_reads_the_warm_list_ahead(mpich_image: Path, runner: User) -> None:
    """A kept launch the front end starts: its holder (`rankwire-holder setup`) reads the
    warm list the first launch recorded, as the Python holder does (and touches it)."""
    words = ("apptainer-mpirun", "-n", "2", str(mpich_image), "/opt/hello_mpich")
    path = _kept_file(runner, words)
    path.unlink(missing_ok=True)
    first = runner.run(list(words), cwd="/tmp", timeout=60)
    assert first.returncode == 0, first.stderr
    kept = [v for k, _, v in (r.partition(b"=") for r in path.read_bytes().split(b"\0"))
            if k == b"r_warm"]  # fmt: skip
    assert len(kept) == 1
    listed = Path(kept[0].decode())
    assert listed.read_text().startswith(warm.MAGIC + "\n")
    os.utime(listed, ns=(10**9, 10**9))
    second = runner.run(list(words), cwd="/tmp", timeout=60)
    assert second.returncode == 0, second.stderr
    assert_hello(second.stdout, 2)
    assert listed.stat().st_mtime_ns > 10**9


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
