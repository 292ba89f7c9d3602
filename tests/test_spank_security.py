"""The plugin attacked by an unprivileged job user, under a restrictive site policy.

Each test names what it guarantees in which mode: "advisory" (no `enforce`: the user's
own process builds the container) and "enforce" (root builds it). In both, an attack is
refused or bounded: one line on srun's stderr, no traceback, nothing left behind,
slurmd responsive, another user's job unharmed.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness.slurm import SlurmCluster
from harness.spank import plugin_processes, srun
from harness.users import User
from rankwire.runtime.instance import prune_stale

pytestmark = [pytest.mark.slurm]
MODES = ["advisory", "enforce"]
# The attackers run as the test user: Debian's python3 (our venv may be out of their reach).
PY = "/usr/bin/python3"


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def images(shared_dir: Path, base_image: Path) -> Path:
    """The only directory images may come from; it holds a copy of the base image."""
    allowed = shared_dir / "secure-images"
    allowed.mkdir(mode=0o755, exist_ok=True)
    copy = allowed / "app.sif"
    if not copy.exists():
        copy.write_bytes(base_image.read_bytes())
        copy.chmod(0o644)
    return allowed


@pytest.fixture
def restrictive(policy: Path, images: Path, mode: str) -> Path:
    policy.write_text(
        f'image_dirs = ["{images}"]\n'
        'mount_sources = ["/home"]\n'
        "allow_fabric_choice = false\n"
        "allow_remap_root = false\n"
        "allow_writable = false\n"
        f"enforce = {'true' if mode == 'enforce' else 'false'}\n"
    )
    return policy


def as_user(
    cluster: SlurmCluster, user: User, *args: str, env: dict[str, str] | None = None, **kw: object
) -> subprocess.CompletedProcess[str]:
    """srun as the unprivileged user, from their home (an allowed mount source)."""
    return srun(cluster, user, *args, env={**cluster.env, **(env or {})}, cwd=user.home, **kw)  # type: ignore[arg-type]


def stderr_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """What rankwire told srun's stderr (slurmstepd prefixes `HOST: error: `), and that
    nothing else of ours got there (no traceback)."""
    assert "Traceback" not in proc.stderr, proc.stderr
    return [
        line.split(": error: ", 1)[1]
        for line in proc.stderr.splitlines()
        if ": error: rankwire: " in line
    ]


def node_is_healthy(cluster: SlurmCluster) -> None:
    """The node is back to idle within 20 s (a step's end may keep it `completing` for the
    shim's bounded waits), never unresponsive, and takes the next job."""
    deadline, states = time.monotonic() + 20, []
    while time.monotonic() < deadline:
        state = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], env=cluster.env, capture_output=True, text=True, timeout=30
        ).stdout.split()
        states.append(" ".join(state))
        assert not any("not_responding" in s or s.endswith("*") for s in state), states
        if state and all(s in ("idle", "mixed", "allocated") for s in state):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"the node did not come back: {states}")
    plain = subprocess.run(
        ["srun", "-n", "1", "true"], env=cluster.env, capture_output=True, text=True, timeout=60
    )
    assert plain.returncode == 0, plain.stderr


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """The attacker and what runuser started for it (killing runuser alone leaves it)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


INSIDE = 'echo "home=$HOME"; grep ^ID= /etc/os-release; grep -c " /etc " /proc/self/mountinfo'


@pytest.mark.usefixtures("restrictive", "nothing_left")
def test_home_comes_from_passwd_not_the_job(
    spank_cluster: SlurmCluster, unprivileged_user: User, images: Path
) -> None:
    """Both modes: HOME=/etc in the job does not bind host /etc."""
    proc = as_user(
        spank_cluster,
        unprivileged_user,
        f"--container-image={images / 'app.sif'}",
        "sh",
        "-c",
        INSIDE,
        env={"HOME": "/etc"},
    )
    assert proc.returncode == 1, proc.stderr  # grep -c found no /etc mount
    assert proc.stdout.splitlines() == [f"home={unprivileged_user.home}", "ID=rankwire-test", "0"]


@pytest.mark.usefixtures("restrictive", "nothing_left")
def test_pmix_dir_comes_from_slurmstepd_not_the_job(
    spank_cluster: SlurmCluster, unprivileged_user: User, images: Path
) -> None:
    """Both modes: PMIX_SERVER_TMPDIR=/etc without --mpi=pmix binds nothing."""
    proc = as_user(
        spank_cluster,
        unprivileged_user,
        "--mpi=none",
        f"--container-image={images / 'app.sif'}",
        "sh",
        "-c",
        'grep -c " /etc " /proc/self/mountinfo',
        env={"PMIX_SERVER_TMPDIR": "/etc"},
    )
    assert (proc.returncode, proc.stdout) == (1, "0\n"), proc.stderr


@pytest.mark.usefixtures("restrictive", "nothing_left")
def test_working_directory_is_a_bind_policy_judges(
    spank_cluster: SlurmCluster, unprivileged_user: User, images: Path
) -> None:
    """Both modes: srun --chdir=/etc is refused; with --container-workdir it is not bound."""
    image = f"--container-image={images / 'app.sif'}"
    refused = as_user(spank_cluster, unprivileged_user, "--chdir=/etc", image, "true")
    assert refused.returncode != 0
    assert stderr_lines(refused) == [
        "rankwire: policy: the working directory /etc is outside the allowed mount sources "
        "(/home): run srun from one of them or pass --container-workdir"
    ]
    ran = as_user(
        spank_cluster,
        unprivileged_user,
        "--chdir=/etc",
        "--container-workdir=/",
        image,
        "sh",
        "-c",
        'pwd; grep -c " /etc " /proc/self/mountinfo',
    )
    assert (ran.returncode, ran.stdout) == (1, "/\n0\n"), ran.stderr


RACER = textwrap.dedent(
    """
    import ctypes, os, sys, time
    libc = ctypes.CDLL(None, use_errno=True)
    a, b, stop = sys.argv[1], sys.argv[2], time.monotonic() + float(sys.argv[3])
    while time.monotonic() < stop:  # swap a real dir and a symlink to /etc, again and again
        libc.renameat2(-100, a.encode(), -100, b.encode(), 2)  # RENAME_EXCHANGE
    """
)


@pytest.mark.slow
@pytest.mark.usefixtures("restrictive", "nothing_left")
def test_mount_source_swapped_while_checked_never_binds_host_etc(
    spank_cluster: SlurmCluster, unprivileged_user: User, images: Path
) -> None:
    """Both modes: the bind is made from the descriptor policy judged, so a rename race
    (a dir and a symlink to /etc exchanged in a loop) never lands host /etc; each run
    either binds the real dir or is refused in one line."""
    user = unprivileged_user
    race = Path(user.home) / "race"
    user.run(["sh", "-c", f"rm -rf {race} && mkdir -p {race}/a && touch {race}/a/MARKER"])
    user.run(["ln", "-s", "/etc", str(race / "b")])
    racer = subprocess.Popen(
        user.argv([PY, "-c", RACER, str(race / "a"), str(race / "b"), "120"]),
        start_new_session=True,
    )
    outcomes = {"marker": 0, "refused": 0}
    try:
        for _ in range(50):
            proc = as_user(
                spank_cluster,
                user,
                f"--container-image={images / 'app.sif'}",
                f"--container-mounts={race / 'a'}:/mnt",
                "ls",
                "/mnt",
            )
            assert "passwd" not in proc.stdout, "host /etc was bound"
            if proc.returncode == 0:
                assert proc.stdout == "MARKER\n"
                outcomes["marker"] += 1
            else:
                # Refused at the check (the symlink was there), or, advisory only, by the
                # holder, which re-finds the opened dir in its own namespace and checks it.
                (line,) = stderr_lines(proc)
                assert line.startswith("rankwire: policy: mount source /etc is outside") or (
                    line.endswith("is no longer the file that was opened") and f"{race}/" in line
                ), line
                outcomes["refused"] += 1
        assert racer.poll() is None, "the racer was not running throughout"
    finally:
        stop_group(racer)
        user.run(["rm", "-rf", str(race)])
    assert sum(outcomes.values()) == 50, outcomes


@pytest.mark.usefixtures("restrictive", "nothing_left")
def test_another_user_cannot_block_the_runtime_dir(
    spank_cluster: SlurmCluster, unprivileged_user: User, images: Path
) -> None:
    """Both modes (plugin), and the CLI: a /tmp/rankwire-UID made first by someone else."""
    user = unprivileged_user
    hostile = Path(f"/tmp/rankwire-{user.uid}")
    if hostile.exists():
        subprocess.run(["rm", "-rf", str(hostile)], check=True)
    hostile.mkdir(mode=0o777)
    hostile.chmod(0o777)  # root's, world-writable, in sticky /tmp: the user can't remove it
    try:
        proc = as_user(spank_cluster, user, f"--container-image={images / 'app.sif'}", "true")
        assert proc.returncode == 0, proc.stderr
        cli = user.run(["rankwire", "exec", str(images / "app.sif"), "true"], cwd=user.home)
        assert cli.returncode == 0, cli.stderr
        assert cli.stderr.splitlines() == [
            f"rankwire: {hostile} is not a private directory of yours (another user made "
            f"it?); using {user.home}/.cache/rankwire/run"
        ]
    finally:
        subprocess.run(["rm", "-rf", str(hostile)], check=True)


@pytest.mark.usefixtures("restrictive", "nothing_left")
def test_newline_in_the_image_path_is_one_line(
    spank_cluster: SlurmCluster, unprivileged_user: User, images: Path
) -> None:
    proc = as_user(spank_cluster, unprivileged_user, f"--container-image={images}/a\nb.sif", "true")
    assert proc.returncode != 0
    assert stderr_lines(proc) == [
        f"rankwire: image {images}/a\\nb.sif (from --container-image) not found: check the path"
    ]


@pytest.fixture
def odd_images(images: Path, shared_dir: Path) -> dict[str, Path]:
    """Images whose %environment tries to set Slurm's variables, or holds a NUL or a
    lone surrogate."""
    from harness.images import make_rootfs
    from rankwire.runtime.build import build_image

    rootfs = shared_dir / "base-rootfs"
    if not rootfs.exists():
        make_rootfs(rootfs)
    envs = {
        "wireup": {"SLURM_PROCID": "99", "PMI_FD": "99", "PMIX_RANK": "99", "MINE": "ok"},
        "nul": {"BAD": "XPLACEHOLDX"},
        "surrogate": {"BAD": "XPLACEHOLDX"},
    }
    # What no builder of ours writes, but a crafted image's JSON metadata can hold: the
    # placeholder becomes an escape of the same length in place.
    escapes = {"nul": b"\\u0000XXXXX", "surrogate": b"\\ud800XXXXX"}
    out = {}
    for name, env in envs.items():
        path = images / f"{name}.sif"
        if not path.exists():
            build = path.with_suffix(".tmp")
            build_image(build, rootfs, env=env)
            if name in escapes:
                data = build.read_bytes()
                assert b'"XPLACEHOLDX"' in data
                build.write_bytes(data.replace(b'"XPLACEHOLDX"', b'"' + escapes[name] + b'"'))
            build.chmod(0o644)
            build.rename(path)
        out[name] = path
    return out


@pytest.mark.usefixtures("restrictive", "nothing_left")
def test_image_env_never_overrides_slurms_task_variables(
    spank_cluster: SlurmCluster, unprivileged_user: User, odd_images: dict[str, Path]
) -> None:
    proc = as_user(
        spank_cluster,
        unprivileged_user,
        "-n",
        "2",
        "--mpi=pmi2",
        f"--container-image={odd_images['wireup']}",
        "sh",
        "-c",
        'echo "$SLURM_PROCID $PMI_FD ${PMIX_RANK-unset} $MINE"',
    )
    assert proc.returncode == 0, proc.stderr
    lines = sorted(proc.stdout.splitlines())
    assert [line.split()[0] for line in lines] == ["0", "1"]
    assert all(line.split()[1] != "99" and line.split()[2:] == ["unset", "ok"] for line in lines)


@pytest.mark.parametrize("name", ["nul", "surrogate"])
@pytest.mark.usefixtures("restrictive", "nothing_left")
def test_image_env_that_cannot_reach_a_task_is_one_line(
    spank_cluster: SlurmCluster, unprivileged_user: User, odd_images: dict[str, Path], name: str
) -> None:
    proc = as_user(
        spank_cluster, unprivileged_user, f"--container-image={odd_images[name]}", "true"
    )
    assert proc.returncode != 0
    assert stderr_lines(proc) == [
        "rankwire: the container's variable BAD holds a NUL or invalid text: fix the image's "
        "environment"
    ]


def holders_of(uid: int) -> list[int]:
    """This session's plugin holders of `uid`."""
    pids = []
    for pid, _ in plugin_processes({"rankwire-holder"}):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}").stat().st_uid == uid:
                pids.append(pid)
    return pids


@pytest.mark.usefixtures("restrictive", "nothing_left")
def test_stopping_the_holder_stalls_nothing(
    spank_cluster: SlurmCluster, unprivileged_user: User, images: Path, mode: str
) -> None:
    """advisory: the user SIGSTOPs their own holder mid-job; the step still ends in
    bounded time and another user's job runs meanwhile. enforce: the holder is root's,
    the user cannot signal it."""
    user = unprivileged_user
    job = subprocess.Popen(
        user.argv(
            ["srun", f"--container-image={images / 'app.sif'}", "sh", "-c", "echo up; sleep 3"]
        ),
        env=spank_cluster.env,
        cwd=user.home,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    t0 = time.monotonic()
    try:
        assert job.stdout is not None
        assert job.stdout.readline() == "up\n"  # mid-job: the task runs in the container
        deadline = t0 + 20
        owner = user.uid if mode == "advisory" else 0
        while not holders_of(owner) and time.monotonic() < deadline:
            time.sleep(0.1)
        (holder,) = holders_of(owner)
        stop = user.run(["kill", "-STOP", str(holder)])
        if mode == "enforce":
            assert stop.returncode != 0, "the user signalled root's holder"
        other = subprocess.run(
            ["srun", "--container-workdir=/", f"--container-image={images / 'app.sif'}", "true"],
            env=spank_cluster.env,
            cwd="/",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert other.returncode == 0, other.stderr  # root's job, meanwhile
        job.communicate(timeout=40)
        assert time.monotonic() - t0 < 35, "the step was not bounded"
        node_is_healthy(spank_cluster)
    finally:
        for pid in holders_of(user.uid):
            os.kill(pid, signal.SIGCONT)
        if job.poll() is None:
            job.kill()
            job.wait()


SWAPPER = textwrap.dedent(
    """
    import os, socket, sys, time
    run_dir, stop, instance = sys.argv[1], time.monotonic() + float(sys.argv[2]), sys.argv[3]
    seen, n = set(os.listdir(run_dir)), 0
    evil = []
    while time.monotonic() < stop:  # put something else under each new holder socket
        for name in set(os.listdir(run_dir)) - seen:
            seen.add(name)
            if name.startswith("e-") and name.endswith(".sock"):
                n += 1
                tmp = os.path.join(run_dir, f"evil-{n}.sock")
                if instance == "silent":  # a listener that never answers
                    s = socket.socket(socket.AF_UNIX)
                    s.bind(tmp)
                    s.listen(8)
                    evil.append(s)
                else:  # the user's own instance (another image, host /etc bound, root)
                    os.link(instance, tmp)
                try:
                    os.rename(tmp, os.path.join(run_dir, name))
                except OSError:
                    os.unlink(tmp)
        time.sleep(0.0005)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("listener", ["silent", "own-instance"])
@pytest.mark.usefixtures("restrictive", "nothing_left")
def test_swapped_holder_socket_is_never_joined(
    spank_cluster: SlurmCluster,
    unprivileged_user: User,
    images: Path,
    base_image: Path,
    listener: str,
) -> None:
    """advisory: what is swapped in for the holder's socket (a listener that never
    answers, or the user's own instance with host /etc bound and root inside) is refused
    (its peer is not the holder the start phase forked) or loses the race; the shim itself
    never connects to a path. enforce: root's socket dir is out of the user's reach."""
    user = unprivileged_user
    run_dir = f"/run/rankwire/{user.uid}"
    first = as_user(spank_cluster, user, f"--container-image={images / 'app.sif'}", "true")
    assert first.returncode == 0, first.stderr  # makes the runtime dir
    instance = "silent"
    if listener == "own-instance":
        started = user.run(
            [
                "env",
                f"RANKWIRE_RUNTIME_DIR={run_dir}",
                "rankwire",
                "instance",
                "start",
                "--fakeroot",
                "-B",
                "/etc:/hostetc",
                str(base_image),
                "evil",
            ],
            cwd=user.home,
        )
        assert started.returncode == 0, started.stderr
        instance = f"{run_dir}/instances/evil.sock"
    swapper = subprocess.Popen(
        user.argv([PY, "-c", SWAPPER, run_dir, "120", instance]),
        start_new_session=True,
    )
    try:
        for _ in range(10):
            t0 = time.monotonic()
            proc = as_user(
                spank_cluster,
                user,
                f"--container-image={images / 'app.sif'}",
                "sh",
                "-c",
                "grep ^ID= /etc/os-release; test -e /hostetc && echo HOSTETC; id -u",
                timeout=60,
            )
            assert time.monotonic() - t0 < 30
            assert "HOSTETC" not in proc.stdout, "the job ran in the user's own instance"
            if proc.returncode == 0:
                assert proc.stdout == f"ID=rankwire-test\n{user.uid}\n"
            else:  # refused before `join` is sent: not after a silent peer's timeout
                (line,) = stderr_lines(proc)
                assert re.fullmatch(
                    rf"rankwire: cannot join the container: {run_dir}/e-[0-9a-f]+\.sock was "
                    r"answered by pid \d+, not by its holder \d+; was it replaced\?",
                    line,
                ), line
        assert swapper.poll() is None, "the swapper was not running throughout"
    finally:
        stop_group(swapper)
        subprocess.run(["sh", "-c", f"rm -f {run_dir}/evil-*.sock"], check=False)
        if listener == "own-instance":
            user.run(
                ["env", f"RANKWIRE_RUNTIME_DIR={run_dir}", "rankwire", "instance", "stop", "evil"]
            )
        # The attacker's links that it renamed into place after a holder had gone: dead
        # sockets, which the next start's prune removes; do it now.
        prune_stale(Path(run_dir))
    node_is_healthy(spank_cluster)


def test_start_phase_cannot_be_traced_by_its_user(unprivileged_user: User) -> None:
    """advisory: the start phase makes itself non-dumpable before it reads its request,
    so its own user cannot ptrace it (and so cannot rewrite its decisions)."""
    user = unprivileged_user
    runner = subprocess.Popen(
        user.argv(["rankwire", "spank-helper", "start"]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline, helper = time.monotonic() + 20, None
        while helper is None and time.monotonic() < deadline:
            for proc in Path("/proc").iterdir():
                try:
                    argv = (proc / "cmdline").read_bytes().split(b"\0")
                    if (
                        proc.name.isdigit()
                        and os.getsid(int(proc.name)) == runner.pid
                        and b"spank-helper" in argv
                        and proc.stat().st_uid == user.uid
                    ):
                        helper = int(proc.name)
                except OSError:
                    continue
            time.sleep(0.05)
        assert helper is not None, "the helper did not start"
        # Blocked reading its request by now (a non-dumpable process's /proc is root's).
        while Path(f"/proc/{helper}/environ").stat().st_uid != 0:
            assert time.monotonic() < deadline, "the start phase stayed dumpable"
            time.sleep(0.05)
        trace = user.run(
            [
                PY,
                "-c",
                "import ctypes,sys; libc=ctypes.CDLL(None, use_errno=True); "
                f"r=libc.ptrace(16, {helper}, 0, 0); "
                "sys.exit(0 if r == -1 and ctypes.get_errno() == 1 else 1)",
            ]
        )
        assert trace.returncode == 0, "the user could ptrace the start phase"
    finally:
        stop_group(runner)  # type: ignore[arg-type]


@pytest.mark.usefixtures("nothing_left")
def test_enforced_container_cannot_be_changed_by_the_user(
    spank_cluster: SlurmCluster, unprivileged_user: User, images: Path, policy: Path
) -> None:
    """enforce: no user namespace (the init one's map), mounts the task cannot change,
    a read-only root, nosuid."""
    policy.write_text(f'image_dirs = ["{images}"]\nenforce = true\n')
    script = (
        "cat /proc/self/uid_map; readlink /proc/self/ns/user; "
        "mount -t tmpfs none /mnt 2>/dev/null && echo MOUNTED; "
        "touch /new 2>/dev/null && echo WROTE; "
        "grep -c nosuid /proc/self/mountinfo >/dev/null && echo NOSUID; "
        "grep ^ID= /etc/os-release"
    )
    proc = as_user(
        spank_cluster,
        unprivileged_user,
        f"--container-image={images / 'app.sif'}",
        "sh",
        "-c",
        script,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["0", "0", "4294967295"]
    assert lines[1] == os.readlink("/proc/self/ns/user")
    assert lines[2:] == ["NOSUID", "ID=rankwire-test"]


def test_check_then_start_becomes_exactly_the_job_user(unprivileged_user: User) -> None:
    """The check phase's child that runs `start` (one helper start per step) drops root
    as the shim does for a start phase of its own: the job's uid, gid and groups only,
    every one of them, no capability left, no way back, not dumpable."""
    if os.getuid() != 0:
        pytest.skip("needs root")
    user = unprivileged_user
    script = (
        "import ctypes, os\n"
        "from rankwire.spank.helper import _become_job_user\n"
        "from rankwire.spank.plan import JobFacts\n"
        f"facts = JobFacts(uid={user.uid}, gid={user.gid}, gids=({user.gid}, 100), job_id=1, "
        "step_id=0, local_tasks=1, total_tasks=1, node_id=0, nnodes=1, stepd_pid=1, cwd='/', "
        "args=(), options={}, env={}, stepd_env={})\n"
        "_become_job_user(facts)\n"
        "caps = [l.split()[1] for l in open('/proc/self/status')\n"
        "        if l.split(':')[0] in ('CapInh', 'CapPrm', 'CapEff', 'CapAmb')]\n"
        "dumpable = ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)\n"
        "print(os.getresuid(), os.getresgid(), sorted(os.getgroups()), caps, dumpable)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    uid, gid, zero = user.uid, user.gid, "0000000000000000"
    assert proc.stdout == (
        f"({uid}, {uid}, {uid}) ({gid}, {gid}, {gid}) {sorted({gid, 100})} {[zero] * 4} 0\n"
    )
