"""The launcher's warm list (`runtime/warm.py`): what a job's ranks read of the image is
kept, and the next launch of that program in that image reads it ahead from the FUSE
mount. Real MPICH ranks in a real SIF, as root and as the user."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.mpi import assert_hello
from harness.procs import child_of, kill_tree
from harness.users import User
from rankwire.launcher.plan import LaunchOptions, plan_launch
from rankwire.runtime import warm
from rankwire.runtime.plan import ContainerPlan, ProcessPlan


def test_coalesce_makes_runs_of_whole_blocks() -> None:
    page, block = 4096, 4 * 4096
    # pages 1-2 (block 0), 9 (block 2), 12 and 15 (block 3), 17-20 (blocks 4, 5)
    pages = [(12, 13), (1, 3), (9, 10), (15, 16), (17, 21)]
    assert warm.coalesce(pages, page, block) == [(0, block), (2 * block, 4 * block)]
    assert warm.coalesce([], page, block) == []
    # mincore's bytes: bit 0 says the page is in (page 5's 2 does not)
    assert warm._runs(bytes([0, 1, 1, 0, 0, 2, 0, 0, 0, 1, 0, 0, 1])) == [(1, 3), (9, 10), (12, 13)]


def test_load_takes_only_a_warm_list(tmp_path: Path) -> None:
    kept = tmp_path / "list"
    odd = [
        "x 1 /y",
        "5 6 relative",
        "7 8 /a/../b",
        "9 10 /a//b",
        "\u00b2 1 /z",
        f"0 {1 << 40} /big",
    ]
    kept.write_text("\n".join([warm.MAGIC, "0 131072 /lib/a b.so", *odd, "1 2 /c\u2028d"]))
    assert warm.load(str(kept)) == ((0, 131072, "/lib/a b.so"), (1, 2, "/c\u2028d"))
    kept.write_text("0 131072 /lib/a.so\n")  # no magic line: not ours
    assert warm.load(str(kept)) == ()
    kept.write_bytes(warm.MAGIC.encode() + b"\n0 1 /\xff\n")  # not UTF-8: kept as the bytes
    assert warm.load(str(kept)) == ((0, 1, "/\udcff"),)
    assert warm.load(str(tmp_path / "none")) == ()


def test_write_keeps_the_lists_used_last_and_only_its_own(tmp_path: Path) -> None:
    lists = tmp_path / "warm"
    lists.mkdir()
    names = [f"{i:032x}-{i:016x}" for i in range(warm.KEPT + 2)]
    for i, name in enumerate(names[1:]):  # names[0] is written last, below
        (lists / name).write_text(warm.MAGIC)
        os.utime(lists / name, (1000 + i, 1000 + i))
    (lists / ".tmp-killed").write_text("")  # a killed writer's: `cache clean` removes it
    os.utime(lists / ".tmp-killed", (1000, 1000))
    (lists / "notes.txt").write_text("not ours")
    warm._write(str(lists / names[0]), [(0, 4096, "/lib/\udcff.so")])
    left = sorted(p.name for p in lists.iterdir())
    # the newest KEPT lists (names[0] and the KEPT - 1 written last), and what is not a
    # list: not pruned
    assert left == sorted([names[0], *names[3:], ".tmp-killed", "notes.txt"])
    assert warm.load(str(lists / names[0])) == ((0, 4096, "/lib/\udcff.so"),)
    assert (lists / names[0]).read_bytes().endswith(b"/lib/\xff.so\n")
    # a link in place of the directory: nothing written through it
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "linked").symlink_to(elsewhere)
    warm._write(str(tmp_path / "linked" / names[0]), [(0, 4096, "/a")])
    assert list(elsewhere.iterdir()) == []


def test_prefetch_passes_over_what_is_not_a_regular_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib/a.so").write_bytes(b"x" * 300_000)
    os.mkfifo(tmp_path / "lib/fifo")
    os.symlink("a.so", tmp_path / "lib/link")
    ranges = [
        (0, 131072, "/lib/missing.so"),
        (0, 131072, "/lib/fifo"),  # opening it blocks, unless told not to
        (0, 131072, "/lib/link"),  # a link is not followed (inside a chroot it could be)
        (131072, 1 << 30, "/lib/a.so"),  # past its end: read to the end
    ]
    reads: list[tuple[int, int]] = []
    pread = os.pread

    def counted(fd: int, n: int, offset: int) -> bytes:
        got = pread(fd, n, offset)
        reads.append((offset, len(got)))
        return got

    monkeypatch.setattr(os, "pread", counted)
    thread = threading.Thread(target=warm.prefetch, args=(str(tmp_path), ranges), daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    assert reads == [(131072, 300_000 - 131072), (300_000, 0)]


def _container(**kw: object) -> ContainerPlan:
    base: dict[str, object] = dict(
        image="/i.sif",
        partition_offset=4096,
        partition_size=8192,
        image_drivers=("squashfuse_ll",),
        overlay_drivers=("kernel",),
        writable=False,
        uid_map=(0, 1000, 1),
        gid_map=(0, 1000, 1),
        namespaces=("user", "mount", "pid"),
        mounts=(),
        tmpfs_size_mib=64,
        extract_dir="",
        cache_dir="/c",
    )
    return ContainerPlan(**{**base, **kw})  # type: ignore[arg-type]


def test_the_planner_reads_ahead_or_records() -> None:
    opts = LaunchOptions(ntasks=2)
    proc = ProcessPlan(argv=("/opt/hello",), env={}, workdir="/")
    ranges = ((0, 131072, "/opt/hello"),)
    ahead = plan_launch(opts, proc, _container(), {}, [], warm=("/c/warm/k", ranges))
    assert ahead.container is not None and ahead.container.prefetch == ranges
    assert ahead.warm_record == ""
    first = plan_launch(opts, proc, _container(), {}, [], warm=("/c/warm/k", ()))
    assert first.container is not None and first.container.prefetch == ()
    assert first.warm_record == "/c/warm/k"
    # Delegated to srun: the tasks' own containers; nothing read ahead, nothing recorded.
    srun = plan_launch(
        opts, proc, _container(), {"SLURM_JOB_ID": "7"}, ["rankwire", "exec", "i.sif"],
        warm=("/c/warm/k", ranges),
    )  # fmt: skip
    assert srun.delegate and srun.warm_record == "" and srun.container is not None
    assert srun.container.prefetch == ()
    again = ContainerPlan.from_dict(json.loads(json.dumps(ahead.container.to_dict())))
    assert again == ahead.container


@pytest.fixture
def cache(shared_dir: Path, runner: User) -> Iterator[Path]:
    path = shared_dir / f"warm-{runner.name}-{os.urandom(4).hex()}"
    path.mkdir()
    os.chown(path, runner.uid, runner.gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.mpi
@pytest.mark.usefixtures("nothing_left_behind")
def test_a_launch_reads_ahead_what_the_last_one_read(
    mpich_image: Path, runner: User, cache: Path
) -> None:
    def launch(*args: str) -> subprocess.CompletedProcess[str]:
        argv = ["env", f"RANKWIRE_CACHEDIR={cache}", "apptainer-mpirun", "-n", "2", *args]
        return runner.run([*argv, str(mpich_image), "/opt/hello_mpich"], cwd="/tmp", timeout=60)

    first = launch()
    assert first.returncode == 0, first.stderr
    assert_hello(first.stdout, 2)
    lists = list((cache / "warm").iterdir())
    assert len(lists) == 1
    kept = warm.load(str(lists[0]))
    names = {name for _, _, name in kept}
    assert "/opt/hello_mpich" in names
    assert any(os.path.basename(n).startswith("libmpich.so") for n in names), names
    assert not any(n.startswith(("/proc/", "/dev/", "/tmp/")) for n in names), names
    assert all(o % warm.BLOCK == 0 and 0 < n <= warm.MAX_BYTES for o, n, _ in kept)

    planned = json.loads(launch("--dry-run", "--json").stdout)
    assert [tuple(r) for r in planned["container"]["prefetch"]] == list(kept)
    assert planned["warm_record"] == ""

    second = launch()
    assert second.returncode == 0, second.stderr
    assert_hello(second.stdout, 2)
    assert second.stderr == ""


def _fuse_reads(image: Path, uid: int) -> int:
    """Bytes read so far by `uid`'s FUSE daemon of `image` (0: none runs)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and proc.stat().st_uid == uid:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if argv[0].endswith(b"squashfuse_ll") and os.fsencode(image) in argv:
                    io = dict(line.split(": ") for line in (proc / "io").read_text().splitlines())
                    return int(io["rchar"])
        except OSError:
            continue
    return 0


@pytest.mark.mpi
@pytest.mark.usefixtures("nothing_left_behind")
def test_the_holder_reads_the_list_ahead(mpich_image: Path, runner: User, cache: Path) -> None:
    """The holder's child reads what the list names: the FUSE daemon unpacks most of the
    41 MB libmpich though the rank (sleep) never opens it; after the holder's pivot_root
    too (the second file), with the session dir where the container does not see it."""
    runtime = Path(f"/run/rankwire-test-warm-{os.urandom(4).hex()}")
    runtime.mkdir(mode=0o700)
    os.chown(runtime, runner.uid, runner.gid)
    argv = ["env", f"RANKWIRE_CACHEDIR={cache}", f"XDG_RUNTIME_DIR={runtime}"]
    argv += ["apptainer-mpirun", "-n", "1"]
    argv += [str(mpich_image), "/bin/sleep", "30"]
    planned = runner.run([*argv[:6], "--dry-run", "--json", *argv[6:]], cwd="/tmp")
    kept = json.loads(planned.stdout)["warm_record"]
    assert kept.startswith(f"{cache}/warm/")
    lib = "/lib/x86_64-linux-gnu/libmpich.so.12"
    size = os.stat(lib).st_size  # as copied into the image
    assert size > 16 << 20
    os.makedirs(os.path.dirname(kept))
    Path(kept).write_text(f"{warm.MAGIC}\n0 131072 /opt/hello_mpich\n0 {size} {lib}\n")
    for p in (os.path.dirname(kept), kept):
        os.chown(p, runner.uid, runner.gid)
    proc = subprocess.Popen(runner.argv(argv), cwd="/tmp", stderr=subprocess.PIPE, text=True)
    launcher = rank = read = 0
    try:
        deadline = time.monotonic() + 20
        while not rank and time.monotonic() < deadline:
            with contextlib.suppress(AssertionError):  # runuser's child, once it is there
                launcher = launcher or (
                    proc.pid if runner.uid == os.getuid() else child_of(proc.pid)
                )
                rank = child_of(launcher, "sleep")
            time.sleep(0.05)
        assert rank, "the rank did not start"
        while read < size // 8 and time.monotonic() < deadline:
            read = _fuse_reads(mpich_image, runner.uid)
            time.sleep(0.05)
        assert read >= size // 8, read  # sleep and libc alone: well under 1 MB
    finally:
        if launcher:
            os.kill(launcher, signal.SIGTERM)
        else:
            kill_tree(proc.pid)
        _, err = proc.communicate(timeout=10)
        shutil.rmtree(runtime, ignore_errors=True)
    assert proc.returncode == 128 + signal.SIGTERM, err
