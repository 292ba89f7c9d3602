"""The SPANK plugin under a real slurmd: `srun --container-image=IMG` / `srun --container=IMG`.

The plugin is built and installed with `make -C spank install` (as an admin would) and
loaded through the test cluster's plugstack.conf; every job runs as root and as the
unprivileged test user.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from harness.mpi import assert_hello, ompi_env
from harness.slurm import SlurmCluster
from harness.spank import SpankInstall, plugin_processes, srun
from harness.users import User

pytestmark = [pytest.mark.slurm]


PROBE = (
    "grep ^ID= /etc/os-release; stat -L -c ns=%i /proc/self/ns/mnt; "
    'readlink /proc/self/fd/"$PMI_FD"; id -u; pwd'
)


@pytest.mark.mpi
@pytest.mark.parametrize("how", ["--container-image", "--container"])
def test_mpich_pmi2_in_one_container_per_node(
    spank_cluster: SlurmCluster, mpich_image: Path, runner: User, how: str, nothing_left: None
) -> None:
    proc = srun(
        spank_cluster,
        runner,
        "-n",
        "2",
        "--mpi=pmi2",
        f"{how}={mpich_image}",
        "sh",
        "-c",
        f"/opt/hello_mpich && {PROBE}",
    )
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 2)
    lines = proc.stdout.splitlines()
    assert lines.count("ID=rankwire-test") == 2, proc.stdout  # the image's os-release
    namespaces = {line for line in lines if line.startswith("ns=")}
    assert len(namespaces) == 1, proc.stdout  # both ranks share one mount namespace
    assert namespaces != {f"ns={os.stat('/proc/self/ns/mnt').st_ino}"}
    assert sum(line.startswith("socket:[") for line in lines) == 2  # PMI_FD made it in
    assert lines.count(str(runner.uid)) == 2 and lines.count("/tmp") == 2


@pytest.mark.mpi
def test_open_mpi_pmix(
    spank_cluster: SlurmCluster, ompi_image: Path, runner: User, nothing_left: None
) -> None:
    proc = srun(
        spank_cluster,
        runner,
        "-n",
        "2",
        "--mpi=pmix",
        f"--container-image={ompi_image}",
        "sh",
        "-c",
        '/opt/hello_ompi && echo "gds=$PMIX_MCA_gds/$PMIX_GDS_MODULE" && '
        'grep -c " ${PMIX_SERVER_TMPDIR%/} " /proc/self/mountinfo',
    )
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 2)
    assert proc.stdout.splitlines().count("1") == 2, proc.stdout  # Slurm's PMIx dir is bound
    gds = [line for line in proc.stdout.splitlines() if line.startswith("gds=")]
    assert len(gds) == 2 and all(g.split("=", 1)[1].split("/")[0] for g in gds), gds
    assert all(len(set(g[4:].split("/"))) == 1 for g in gds), gds  # MCA copied per task
    assert "single-copy" not in proc.stderr


@pytest.mark.mpi
def test_mpich_under_pmix_is_bridged(
    spank_cluster: SlurmCluster, mpich_image: Path, runner: User, nothing_left: None
) -> None:
    """The site's --mpi=pmix and the image's PMI-1-only MPICH: each task gets a PMI_FD
    served by its bridge (a PMIx client of its rank, on the host: the node's first task's
    shim starts the node's bridge server, the others' shims hand it their socket ends);
    --container-pmi-bridge=off shows what happens without it."""
    image = f"--container-image={mpich_image}"
    probe = '/opt/hello_mpich && echo "pmix=$(env | grep -c ^PMIX_) rank=$PMI_RANK/$PMI_SIZE"'
    proc = srun(spank_cluster, runner, "-n", "4", "--mpi=pmix", image, "sh", "-c", probe)
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 4)
    assert sorted(ln for ln in proc.stdout.splitlines() if ln.startswith("pmix=")) == [
        f"pmix=0 rank={r}/4" for r in range(4)
    ]
    off = srun(spank_cluster, runner, "-n", "2", "--mpi=pmix", image,
               "--container-pmi-bridge=off", "/opt/hello_mpich")  # fmt: skip
    assert off.returncode == 0, off.stderr
    assert [ln.split(" host=")[0] for ln in off.stdout.splitlines()] == ["hello rank=0 size=1"] * 2


NO_LIBPMIX_AT = "/nonexistent/libpmix.so.2"
NO_LIBPMIX = (
    f"rankwire: cannot load the PMIx library '{NO_LIBPMIX_AT}' ({NO_LIBPMIX_AT}: cannot open "
    "shared object file: No such file or directory): install libpmix2 or set RANKWIRE_LIBPMIX "
    "to its path"
)


def _three_tasks_without_libpmix(
    cluster: SlurmCluster, runner: User, mpi: str, image: Path, prog: str
) -> subprocess.CompletedProcess[str]:
    """A bridged step of 3 tasks whose bridges find no libpmix."""
    env = {**cluster.env, "RANKWIRE_LIBPMIX": NO_LIBPMIX_AT}
    return srun(cluster, runner, "-n", "3", f"--mpi={mpi}", f"--container-image={image}", prog,
                env=env)  # fmt: skip


@pytest.mark.mpi
def test_each_task_hears_why_its_pmi_bridge_failed(
    spank_cluster: SlurmCluster, mpich_image: Path, runner: User, nothing_left: None
) -> None:
    """The bridges of a node are forked by its first task's server, yet each one's message
    goes to its own task's stderr: three tasks, three lines."""
    proc = _three_tasks_without_libpmix(
        spank_cluster, runner, "pmix", mpich_image, "/opt/hello_mpich"
    )
    assert proc.returncode != 0
    assert proc.stderr.splitlines().count(NO_LIBPMIX) == 3, proc.stderr


@pytest.mark.mpi
def test_open_mpi_under_pmi2_is_bridged(
    spank_cluster: SlurmCluster, ompi_image: Path, runner: User, nothing_left: None
) -> None:
    """The site's --mpi=pmi2 and the image's PMIx-only Open MPI: the node's PMIx server
    (started by the shim of the node's first task, on the host, over the node's Slurm PMI-2
    connections, which the other tasks' shims hand it) wires it up. Shared memory alone
    (no TCP) carries the ranks' traffic: they are one node's."""
    image = f"--container-image={ompi_image}"
    probe = '/opt/hello_ompi && echo "pmi=$(env | grep -c ^PMI_) pmix=${PMIX_NAMESPACE%%.*}"'
    env = {**spank_cluster.env, "OMPI_MCA_pml": "ob1", "OMPI_MCA_btl": "self,vader"}
    proc = srun(spank_cluster, runner, "-n", "4", "--mpi=pmi2", image, "sh", "-c", probe, env=env)
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 4)
    assert [ln for ln in proc.stdout.splitlines() if ln.startswith("pmi=")] == [
        "pmi=0 pmix=rankwire"
    ] * 4


@pytest.mark.mpi
def test_a_pmi2_bridge_that_cannot_start_fails_every_task_in_one_line(
    spank_cluster: SlurmCluster, ompi_image: Path, runner: User, nothing_left: None
) -> None:
    """The node's first task cannot start the server: every task of the node (the others
    joined it from the shim) reports the first task's line."""
    proc = _three_tasks_without_libpmix(
        spank_cluster, runner, "pmi2", ompi_image, "/opt/hello_ompi"
    )
    assert proc.returncode != 0
    ours = [x.split("error: ", 1)[-1] for x in proc.stderr.splitlines() if "rankwire: " in x]
    assert ours == [NO_LIBPMIX] * 3, proc.stderr


@pytest.mark.mpi
def test_a_cancelled_bridged_step_leaves_nothing(
    spank_cluster: SlurmCluster, ompi_image: Path, runner: User, nothing_left: None
) -> None:
    """scancel of a step whose tasks joined the node's PMI-2 bridge server, which the start
    phase started (no task's child, out of Slurm's reach): it ends with the tasks; no
    process (`rankwire-bridge`), socket or PMIx dir stays (`nothing_left`)."""
    env = ompi_env({**spank_cluster.env, "OMPI_MCA_pml": "ob1", "OMPI_MCA_btl": "self,vader"})
    argv = ["srun", "--mpi=pmi2", "-J", "plugin-bridge-cancel", "-n", "2",
            f"--container-image={ompi_image}", "/opt/fail_ompi", "sleep", "60"]  # fmt: skip
    with subprocess.Popen(
        runner.argv(argv), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, cwd="/tmp",
    ) as proc:  # fmt: skip
        assert proc.stdout is not None
        ready = [proc.stdout.readline(), proc.stdout.readline()]
        assert all(line.startswith("ready rank=") for line in ready), ready
        assert [c for _, c in plugin_processes(["rankwire-bridge"])] == ["rankwire-bridge"]
        subprocess.run(["scancel", "-n", "plugin-bridge-cancel"], env=env, check=True, timeout=30)
        proc.communicate(timeout=60)
    assert proc.returncode != 0


def test_job_without_container_is_untouched(
    spank_cluster: SlurmCluster, spank_install: SpankInstall, base_image: Path
) -> None:
    """No container option: the plugin runs nothing. Proven by a plugstack whose helper
    does not exist -- plain jobs still run, a container job names the broken helper."""
    spank_cluster.plugstack.write_text(
        f"required {spank_install.plugin} helper=/nonexistent/rankwire\n"
    )
    try:
        plain = srun(spank_cluster, User("root", 0, 0, "/root"), "-n", "2", "sh", "-c",
                     "stat -L -c ns=%i /proc/self/ns/mnt; echo $PATH")  # fmt: skip
        assert plain.returncode == 0, plain.stderr
        assert plain.stdout.count(f"ns={os.stat('/proc/self/ns/mnt').st_ino}") == 2
        assert plain.stderr == ""
        boxed = srun(spank_cluster, User("root", 0, 0, "/root"), "-n", "1",
                     f"--container-image={base_image}", "true")  # fmt: skip
        assert boxed.returncode != 0
        assert "rankwire: the helper /nonexistent/rankwire must exist" in boxed.stderr
    finally:
        spank_cluster.plugstack.write_text(spank_install.plugstack_line())


def test_home_is_bound_unless_asked_not_to(
    spank_cluster: SlurmCluster, base_image: Path, runner: User, nothing_left: None
) -> None:
    """The home directory is bound by default (as `rankwire exec` does; Pyxis does not):
    `--no-container-mount-home` (or its variable) leaves it out, `--container-mount-home`
    is accepted for Pyxis scripts, both at once is one line."""
    probe = ["sh", "-c", 'test -d "$HOME" && echo "home $(stat -c %i "$HOME")" || echo no-home']
    inode = os.stat(runner.home).st_ino
    image = f"--container-image={base_image}"
    for flags, env, want in (
        ((), {}, f"home {inode}"),
        (("--container-mount-home",), {}, f"home {inode}"),
        (("--no-container-mount-home",), {}, "no-home"),
        ((), {"RANKWIRE_NO_CONTAINER_MOUNT_HOME": "1"}, "no-home"),
    ):
        proc = srun(
            spank_cluster, runner, "-n", "1", image, *flags, *probe,
            env={**spank_cluster.env, **env},
        )  # fmt: skip
        assert (proc.returncode, proc.stdout) == (0, f"{want}\n"), (flags, env, proc.stderr)
    both = srun(
        spank_cluster, runner, "-n", "1", image, "--container-mount-home",
        "--no-container-mount-home", "true",
    )  # fmt: skip
    assert both.returncode != 0
    assert {line for line in both.stderr.splitlines() if "rankwire:" in line} == {
        "slurmstepd-vm: error: rankwire: --container-mount-home and --no-container-mount-home "
        "contradict each other: give one"
    }, both.stderr


def test_env_workdir_mounts(
    spank_cluster: SlurmCluster, base_image: Path, shared_dir: Path, runner: User, nothing_left
) -> None:
    data = shared_dir / "spank-data"
    data.mkdir(exist_ok=True)
    (data / "hello.txt").write_text("from the host\n")
    data.chmod(0o755)
    # Bytes the JSON both ways must carry: quotes, backslash, newline, tab, UTF-8, and
    # one that is not UTF-8 at all.
    odd = os.fsdecode(b'q"b\\s\nn\tt \xc3\xa9 \xff end')
    env = dict(spank_cluster.env, RANKWIRE_ENV_ODD=odd, KEEP_ME="host", OVERRIDE_ME="host")
    proc = srun(
        spank_cluster,
        runner,
        "-n",
        "1",
        f"--container-image={base_image}",
        f"--container-mounts={data}:/data:ro",
        "--container-workdir=/data",
        "--container-env=OVERRIDE_ME",
        "sh",
        "-c",
        'pwd; cat hello.txt; echo "$IMAGE_VAR/$OVERRIDE_ME/$KEEP_ME"; '
        'touch x 2>/dev/null || echo read-only; printf "%s" "$ODD" > /tmp/spank-odd.$$; '
        "echo /tmp/spank-odd.$$",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:4] == ["/data", "from the host", "from-image/host/host", "read-only"]
    out = Path(lines[4])
    try:
        assert out.read_bytes() == os.fsencode(odd)
    finally:
        out.unlink()


def _kept_recipe(runner: User, data: Path, kind: str = "holder") -> Path:
    """The plugin holder's recipe kept last for a container that binds `data` (runtime/
    joinplan.py `remember_holder`, keyed on the descriptor it is bound from), in `runner`'s
    runtime dir (an earlier session's may name a dir that had its inode number); `kind`
    "plugin": the plugin plan (`remember_plugin`) instead."""
    st = data.stat()
    bound = re.compile(rb"\0fd=[0-9]+:%d:%d:" % (st.st_dev, st.st_ino))
    found = [
        p
        for p in Path(f"/run/rankwire/{runner.uid}").glob(f"{kind}-*.plan")
        if bound.search(p.read_bytes())
    ]
    assert found
    return max(found, key=lambda p: p.stat().st_mtime_ns)


def _fresh_tickets(runner: User, data: Path) -> list[Path]:
    """Root's fresh tickets (spank/ticket.c `rw_fresh_write`) of `runner`'s steps that
    bind `data`."""
    return [
        p
        for p in Path("/run/rankwire").glob(f".{runner.uid}.*.start")
        if b"fresh_bind=" in p.read_bytes() and str(data).encode() in p.read_bytes()
    ]


def _fresh_ticket(runner: User, data: Path) -> Path:
    found = _fresh_tickets(runner, data)
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize(
    "then", ["replayed", "other-directory", "bind-changed", "request-changed", "not-root's"]
)
def test_a_repeated_step_starts_its_container_without_the_helper(
    spank_cluster: SlurmCluster,
    base_image: Path,
    shared_dir: Path,
    runner: User,
    then: str,
    nothing_left: None,
) -> None:
    """A step that repeats an earlier one's request (another job, the same options, task
    counts, directory and environment but Slurm's per-job values) has the C front end start
    its container from root's fresh ticket and the user's plugin plan, with no helper:
    the ticket is not written again, the holder's recipe is not looked up (its time stays),
    and the plugin plan's is touched. A step from another directory keeps a ticket of its
    own beside the first's (both then hold). A bind source that is another directory now,
    another environment (a ticket of its own), or a ticket that is not root's alone: the
    helper runs (it writes the ticket anew), and the tasks see what they should (their
    directory too: a ticket of the other directory's would say another)."""
    data = Path(tempfile.mkdtemp(prefix="spank-fresh-", dir=shared_dir))
    data.chmod(0o755)
    (data / "hello.txt").write_text("from the host\n")
    image, bind = f"--container-image={base_image}", f"--container-mounts={data}:/data:ro"
    args = ["-n", "2", "--mpi=pmi2", image, bind]  # pmi2: a per-step port at init_post_opt
    shown = "cat /data/hello.txt; test -r /proc/self/status && echo proc; pwd"
    first = srun(spank_cluster, runner, *args, "sh", "-c", shown)
    lines = sorted(["from the host", "proc", "/tmp"] * 2)
    assert (first.returncode, sorted(first.stdout.splitlines())) == (0, lines), first.stderr
    ticket = _fresh_ticket(runner, data)
    st = ticket.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
    recipe, plugin = _kept_recipe(runner, data), _kept_recipe(runner, data, "plugin")
    was = (ticket.stat().st_ino, recipe.stat().st_mtime_ns, plugin.stat().st_mtime_ns)
    env = spank_cluster.env
    if then == "bind-changed":
        data.rename(data.with_name(data.name + ".old"))
        data.mkdir(mode=0o755)
        (data / "hello.txt").write_text("changed\n")
        lines = sorted(["changed", "proc", "/tmp"] * 2)
    elif then == "request-changed":
        env = {**env, "RANKWIRE_TEST_OTHER": "1"}
    elif then == "not-root's":
        ticket.chmod(0o640)
    elif then == "other-directory":  # then the first's request again: its ticket holds
        other = srun(spank_cluster, runner, f"--chdir={data}", *args, "sh", "-c", shown)
        there = sorted(["from the host", "proc", str(data)] * 2)
        assert (other.returncode, sorted(other.stdout.splitlines())) == (0, there), other.stderr
        # srun's environment is the same: one kind of request, two tickets of it
        assert len({p.name.rsplit(".", 3)[0] for p in _fresh_tickets(runner, data)}) == 1
    second = srun(spank_cluster, runner, *args, "sh", "-c", shown, env=env)
    assert (second.returncode, sorted(second.stdout.splitlines())) == (0, lines), second.stderr
    if then in ("request-changed", "other-directory"):  # a ticket of its own, kept too
        assert len(_fresh_tickets(runner, data)) == 2
    if then == "request-changed":
        assert ticket.stat().st_ino == was[0]
        return
    now = ticket if then == "other-directory" else _fresh_ticket(runner, data)
    if then in ("replayed", "other-directory"):
        assert now.stat().st_ino == was[0]  # the helper did not run
        assert recipe.stat().st_mtime_ns == was[1]
        assert plugin.stat().st_mtime_ns > was[2]  # the front end used it
    else:  # the helper ran, and kept a ticket for this request
        assert now.stat().st_ino != was[0]
        assert now.stat().st_mode & 0o777 == 0o600


def _holder_of(runner: User, data: Path) -> int:
    """The holder of `runner`'s container that binds `data` (its mounts show it)."""
    for proc in Path("/proc").iterdir():
        try:
            if (
                proc.name.isdigit()
                and proc.stat().st_uid == runner.uid
                and (proc / "comm").read_text().strip() == "rankwire-holder"
                and " /data " in (proc / "mounts").read_text()
            ):
                return int(proc.name)
        except OSError:
            continue
    raise AssertionError("no holder")


@pytest.mark.parametrize("then", ["replayed", "failing", "holder-killed"])
def test_a_repeated_step_starts_its_container_from_the_kept_recipe(
    spank_cluster: SlurmCluster,
    base_image: Path,
    shared_dir: Path,
    runner: User,
    then: str,
    nothing_left: None,
) -> None:
    """The first step's holder leaves its recipe; the next step with the same container
    plan (the same image, the binds' sources the same files) has `rankwire-holder setup`
    make it (its command line says so): the bind from a descriptor, the host's /proc, the
    watcher (no PID namespace) and all. A recipe that fails there (its FUSE driver fails)
    is dropped, the Python holder starts the container and keeps its recipe anew; the C
    holder killed, its watcher ends the tasks and its files go."""
    data = Path(tempfile.mkdtemp(prefix="spank-kept-", dir=shared_dir))
    data.chmod(0o755)
    (data / "hello.txt").write_text("from the host\n")
    way = data / "w"  # written by the test and the tasks (through the container's /tmp)
    way.mkdir()
    way.chmod(0o777)
    args = ["-n", "2", f"--container-image={base_image}", f"--container-mounts={data}:/data:ro"]
    shown = "cat /data/hello.txt; test -r /proc/self/status && echo proc"
    first = srun(spank_cluster, runner, *args, "sh", "-c", shown)
    lines = sorted(["from the host", "proc"] * 2)
    assert (first.returncode, sorted(first.stdout.splitlines())) == (0, lines), first.stderr
    recipe = _kept_recipe(runner, data)
    _fresh_ticket(runner, data).unlink()  # else the C front end starts it (and the next)
    if then == "failing":
        log, driver = way / "started.log", way / "driver.sh"
        driver.write_text(f"#!/bin/sh\necho started >> {log}\nexit 1\n")
        driver.chmod(0o755)
        log.touch()
        log.chmod(0o666)
        text = recipe.read_bytes()
        start = text.index(b"r_fuse=")
        end = text.index(b"\0", start)
        recipe.write_bytes(text[:start] + f"r_fuse={driver}".encode() + text[end:])
        second = srun(spank_cluster, runner, *args, "sh", "-c", shown)
        assert (second.returncode, sorted(second.stdout.splitlines())) == (0, lines), second.stderr
        assert log.read_text() == "started\n"  # the C holder ran it
        assert f"r_fuse={driver}".encode() not in _kept_recipe(runner, data).read_bytes()
        return
    ready, go = way / "ready", way / "go"
    wait = f"touch {ready}; while [ ! -e {go} ]; do sleep 0.05; done; {shown}"
    command = f"touch {ready}; exec sleep 60" if then == "holder-killed" else wait
    argv = runner.argv(["srun", *args, "sh", "-c", command])
    with subprocess.Popen(
        argv, env=spank_cluster.env, cwd="/tmp", stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    ) as proc:  # fmt: skip
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        holder = _holder_of(runner, data)
        words = Path(f"/proc/{holder}/cmdline").read_bytes().split(b"\0")
        assert words[1] == b"setup", words  # the kept recipe's, not holder.py's exec
        if then == "holder-killed":
            os.kill(holder, signal.SIGKILL)
        go.touch()
        out, err = proc.communicate(timeout=30)
    if then == "holder-killed":
        assert proc.returncode != 0, err
    else:
        assert (proc.returncode, sorted(out.splitlines())) == (0, lines), err


@pytest.mark.parametrize(
    ("make", "option", "reason"),
    [
        ("missing", "", "rankwire: image {image} (from --container-image) not found"),
        ("not-sif", "", "rankwire: {image}: not a SIF image"),
        ("directory", "", "rankwire: image {image} (from --container-image) is a directory"),
        ("forbidden", "", "rankwire: policy: image {image} is outside the allowed image"),
        ("ok", "--container-mounts=/etc:/x", "rankwire: policy: mount source /etc is outside"),
        ("ok", "--container-writable", "rankwire: policy: --container-writable is not allowed"),
        ("ok", "--container-mounts=/nope", "rankwire: --container-mounts source /nope does not"),
        # Found by the start phase (the holder), as the job user:
        ("ok", "--container-mounts={image}:/etc", "cannot mount a file on /etc: the image has"),
    ],
)
def test_failures_reach_srun_and_leave_nothing(
    spank_cluster: SlurmCluster,
    base_image: Path,
    shared_dir: Path,
    policy: Path,
    runner: User,
    make: str,
    option: str,
    reason: str,
    nothing_left: None,
) -> None:
    allowed = shared_dir / "spank-allowed"
    allowed.mkdir(exist_ok=True)
    allowed.chmod(0o755)
    policy.write_text(
        f'image_dirs = ["{allowed}"]\nmount_sources = ["{shared_dir}", "/tmp"]\n'
        "allow_writable = false\n"
    )
    image = {
        "missing": allowed / "missing.sif",
        "not-sif": allowed / "not.sif",
        "directory": allowed,
        "forbidden": base_image,
        "ok": allowed / "ok.sif",
    }[make]
    if make == "not-sif":
        image.write_text("just text\n")
    if make == "ok" and not image.exists():
        image.write_bytes(base_image.read_bytes())
    for p in allowed.iterdir():
        p.chmod(0o644)
    option = option.format(image=image)
    args = ["-n", "2", f"--container-image={image}", *([option] if option else []), "true"]
    proc = srun(spank_cluster, runner, *args)
    assert proc.returncode != 0
    assert reason.format(image=image) in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_policy_allows_what_it_lists(
    spank_cluster: SlurmCluster, base_image: Path, policy: Path, runner: User, nothing_left
) -> None:
    policy.write_text(f'image_dirs = ["{base_image.parent}"]\nallow_fabric_choice = false\n')
    ok = srun(spank_cluster, runner, "-n", "1", f"--container-image={base_image}", "true")
    assert ok.returncode == 0, ok.stderr
    refused = srun(spank_cluster, runner, "-n", "1", f"--container-image={base_image}",
                   "--container-fabric=tcp", "true")  # fmt: skip
    assert refused.returncode != 0
    assert "rankwire: policy: --container-fabric=tcp is not allowed here" in refused.stderr


def test_user_cannot_read_image_they_cannot_read(
    spank_cluster: SlurmCluster, base_image: Path, shared_dir: Path, unprivileged_user: User
) -> None:
    """The check runs as root but opens the image with the job user's credentials."""
    private = shared_dir / "spank-private"
    private.mkdir(mode=0o700, exist_ok=True)
    image = private / "root-only.sif"
    image.write_bytes(base_image.read_bytes())
    proc = srun(spank_cluster, unprivileged_user, "-n", "1", f"--container-image={image}", "true")
    assert proc.returncode != 0
    assert f"rankwire: cannot open image {image} (from --container-image)" in proc.stderr


def test_sbatch_container_puts_every_step_inside(
    spank_cluster: SlurmCluster, base_image: Path, shared_dir: Path, runner: User, nothing_left
) -> None:
    """`sbatch --container=IMG`: the batch script stays on the host (Slurm's batch step is
    not ours to wrap), every srun step in it runs in the image."""
    jobs = shared_dir / "spank-jobs"
    jobs.mkdir(exist_ok=True)
    jobs.chmod(0o1777)
    script = jobs / "steps.sh"
    script.write_text(
        "#!/bin/sh\n"
        'echo "batch $(grep ^ID= /etc/os-release)"\n'
        "srun -n 2 sh -c 'echo \"step $(grep ^ID= /etc/os-release)\"'\n"
    )
    script.chmod(0o755)
    out = jobs / f"steps-{runner.name}.out"
    proc = runner.run(
        ["sbatch", "--wait", "-n", "2", "-o", str(out), f"--container={base_image}", str(script)],
        env=spank_cluster.env,
        cwd="/tmp",
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    host_id = next(
        x for x in Path("/etc/os-release").read_text().splitlines() if x.startswith("ID=")
    )
    lines = sorted(out.read_text().splitlines())
    assert lines == [f"batch {host_id}", "step ID=rankwire-test", "step ID=rankwire-test"]


FAILING_PLUGIN = """#include <slurm/spank.h>
SPANK_PLUGIN(failing, 1);
int slurm_spank_%s(spank_t sp, int ac, char **av)
{
	return spank_remote(sp) == 1 ? -1 : 0;
}
"""


def _plugin(where: Path, name: str, source: str) -> Path:
    """A SPANK plugin of the test's own, built from `source` into `where`/NAME.so."""
    src = where / f"{name}.c"
    src.write_text(source)
    built = where / f"{name}.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(built), str(src)], check=True)
    return built


def _counting_helper(spank_install: SpankInstall, where: Path) -> tuple[Path, str]:
    """A helper that appends its pid to `where`/started, then is the real one; and the
    plugstack line of the rankwire plugin run with it."""
    started = where / "started"
    wrapper = where / "helper"
    wrapper.write_text(f'#!/bin/sh\necho $$ >> {started}\nexec {spank_install.helper} "$@"\n')
    wrapper.chmod(0o755)
    line = spank_install.conf.read_text().replace(
        f"helper={spank_install.helper}", f"helper={wrapper}"
    )
    assert f"helper={wrapper}" in line
    return started, line


def test_a_step_uses_the_check_helper_started_early(
    spank_cluster: SlurmCluster,
    spank_install: SpankInstall,
    base_image: Path,
    runner: User,
    tmp_path: Path,
) -> None:
    """One helper per step: the one started in init_post_opt gets the request in user_init
    (this cluster's task plugin does not move slurmstepd between cgroups, and no PAM)."""
    tmp_path.chmod(0o755)
    started, line = _counting_helper(spank_install, tmp_path)
    spank_cluster.plugstack.write_text(line)
    try:
        proc = srun(spank_cluster, runner, "-n", "2", f"--container-image={base_image}", "true")
        assert proc.returncode == 0, proc.stderr
        assert len(started.read_text().split()) == 1
    finally:
        spank_cluster.plugstack.write_text(spank_install.plugstack_line())


LIMITING_PLUGIN = """#include <sys/resource.h>
#include <slurm/spank.h>
SPANK_PLUGIN(limiting, 1);
int slurm_spank_user_init(spank_t sp, int ac, char **av)
{
\tstruct rlimit r;
\tif (getrlimit(RLIMIT_NOFILE, &r) || r.rlim_cur < 64)
\t\treturn -1;
\tr.rlim_cur -= 1;
\treturn setrlimit(RLIMIT_NOFILE, &r);
}
"""


def test_a_check_started_early_is_given_up_when_slurmstepd_changed_since(
    spank_cluster: SlurmCluster, spank_install: SpankInstall, base_image: Path, tmp_path: Path
) -> None:
    """The helper started in init_post_opt is used only if it runs where one started in
    user_init would (slurmstepd's cgroups, limits, login uid: task/cgroup on cgroup v1 and
    a PAM session change them in between). A plugin before ours lowers slurmstepd's open
    files limit in its user_init: the shim gives up the early helper and runs another,
    which serves the step; the first is gone."""
    limiting = _plugin(tmp_path, "limiting", LIMITING_PLUGIN)
    started, line = _counting_helper(spank_install, tmp_path)
    spank_cluster.plugstack.write_text(f"required {limiting}\n{line.strip()}\n")
    try:
        root = User("root", 0, 0, "/root")
        proc = srun(spank_cluster, root, "-n", "1", f"--container-image={base_image}", "true")
        assert proc.returncode == 0, proc.stderr
        pids = [int(x) for x in started.read_text().split()]
        assert len(pids) == 2
        assert not Path(f"/proc/{pids[0]}").exists()
    finally:
        spank_cluster.plugstack.write_text(spank_install.plugstack_line())


@pytest.mark.parametrize(
    ("fails", "error"),
    [
        # after ours: Slurm's spank_init fails, and it skips slurm_spank_exit (EOF ends it)
        ("init_post_opt", "srun: error: task 0 launch failed: Plugin initialization failed"),
        # before ours: our user_init never runs, our slurm_spank_exit kills it
        ("user_init", "error: spank: required plugin failing.so: user_init() failed with rc=-1"),
    ],
)
def test_a_check_started_early_ends_with_a_step_that_ends_before_it_asks(
    spank_cluster: SlurmCluster,
    spank_install: SpankInstall,
    base_image: Path,
    tmp_path: Path,
    fails: str,
    error: str,
) -> None:
    """The shim starts the check phase's helper in init_post_opt, before slurmstepd sets
    up the MPI plugin, and sends it the request in user_init. A required plugin that fails
    its init_post_opt (after ours) or its user_init (before ours) ends the step before our
    user_init: the helper, which did start (the wrapper says so), must be gone with it."""
    failing = _plugin(tmp_path, "failing", FAILING_PLUGIN % fails)
    started, line = _counting_helper(spank_install, tmp_path)
    ours, theirs = line.strip(), f"required {failing}"
    stack = [ours, theirs] if fails == "init_post_opt" else [theirs, ours]
    spank_cluster.plugstack.write_text("\n".join(stack) + "\n")
    try:
        root = User("root", 0, 0, "/root")
        proc = srun(spank_cluster, root, "-n", "1", f"--container-image={base_image}", "true")
        # (srun's own exit code can stay 0 here: a Slurm 22.05 quirk)
        assert error in proc.stderr, proc.stderr
        pids = [int(x) for x in started.read_text().split()]
        assert len(pids) == 1  # started before the step failed, and only once
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pids[0]}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{pids[0]}").exists()
    finally:
        spank_cluster.plugstack.write_text(spank_install.plugstack_line())


@pytest.mark.parametrize(
    ("helper", "reason"),
    [
        ("/bin/false", "rankwire: the helper's check phase failed: no reply"),
        ("/bin/sh", "rankwire: the helper's check phase failed: /bin/sh: 0: cannot open spank"),
    ],
)
def test_helper_that_gives_no_answer_is_reported(
    spank_cluster: SlurmCluster,
    spank_install: SpankInstall,
    base_image: Path,
    helper: str,
    reason: str,
    nothing_left: None,
) -> None:
    spank_cluster.plugstack.write_text(f"required {spank_install.plugin} helper={helper}\n")
    try:
        root = User("root", 0, 0, "/root")
        proc = srun(spank_cluster, root, "-n", "1", f"--container-image={base_image}", "true")
        assert proc.returncode != 0
        assert reason in proc.stderr, proc.stderr
    finally:
        spank_cluster.plugstack.write_text(spank_install.plugstack_line())


def test_plugin_exports_only_what_slurm_looks_up(spank_install: SpankInstall) -> None:
    out = subprocess.run(
        ["nm", "-D", "--defined-only", str(spank_install.plugin)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names = {line.split()[-1] for line in out.splitlines()}
    plugin_symbols = {"plugin_name", "plugin_type", "plugin_version", "spank_plugin_version"}
    assert names - plugin_symbols == {
        "slurm_spank_init",
        "slurm_spank_init_post_opt",
        "slurm_spank_user_init",
        "slurm_spank_task_init_privileged",
        "slurm_spank_task_init",
        "slurm_spank_task_exit",
        "slurm_spank_job_epilog",
        "slurm_spank_exit",
    }
    assert plugin_symbols <= names
    assert "rankwire" in spank_install.conf.read_text()
    assert f"helper={spank_install.helper}" in spank_install.conf.read_text()


def test_plugin_options_are_the_tables(spank_cluster: SlurmCluster) -> None:
    """What srun offers is what runtime/options.py declares (the shim's option table is
    generated from it at `make -C spank`): names, argument or flag, help."""
    from rankwire.runtime.options import spank_options

    out = subprocess.run(
        ["srun", "--help"], env=spank_cluster.env, capture_output=True, text=True, check=True
    ).stdout
    offered = [
        line.split()[0]
        for line in out.splitlines()
        if line.split()[:1] and line.split()[0].startswith(("--container-", "--no-container-"))
    ]
    expected = [
        f"--{o.spank}" + ("" if o.kind == "flag" else f"={o.spank_metavar}")
        for o in spank_options()
    ]
    assert offered == expected
    for o in spank_options():
        assert f"{o.spank_help} (also {o.spank_env})" in " ".join(out.split()), o.spank
