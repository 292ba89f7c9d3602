"""The PMI bridge (pmi/bridge.py): PMI-1/PMI-2 tasks under `srun --mpi=pmix`.

The Slurm rows run real steps on the private Slurm: Debian's MPICH 4.0 (PMI-1 only) as
singletons without the bridge and as one job through it; a PMI-2 client (pmi/client.py)
exchanging keys across 4 ranks; an abort; a task killed while the others are in a fence.
The pure pieces (epoch KVS, process mapping, environment) are tested without Slurm.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import test_multinode

from harness.mpi import MpiPrograms, assert_hello
from harness.slurm import without_queue_lines
from harness.users import User
from rankwire.errors import UserError
from rankwire.pmi.bridge import (
    EpochKvs,
    JobInfo,
    decode_blob,
    encode_blob,
    epoch_key,
    nodes_from_peers,
    parse_ranks,
    pmi_env,
    task_env,
)
from rankwire.runtime.peercred import connect_own

ME = User("self", os.getuid(), os.getgid(), "")
slurm_multinode = test_multinode.slurm_multinode  # the two-node cluster fixture
PMIX_ENV = {
    "PMIX_NAMESPACE": "slurm.pmix.7.0",
    "PMIX_RANK": "2",
    "PMIX_SERVER_URI41": "pmix-server.1;tcp4://127.0.0.1:1",
}

# One rank's PMI-2 session through PMI_FD, printed as one JSON line (mode "exchange"), or
# (mode "killed") rank 1 dies by SIGKILL once the others are about to fence.
RANK_SCRIPT = r"""
import json, os, signal, sys, time
from rankwire.pmi.client import Pmi2Client
from rankwire.pmi.messages import GetNodeAttr, GetReply, PutNodeAttr, PutReply

mode = sys.argv[1]
pmi = Pmi2Client.from_env()
pmi.init()
r, n = pmi.rank, pmi.size
if mode == "killed":
    marks = sys.argv[2]
    if r == 1:
        while len(os.listdir(marks)) < n - 1:
            time.sleep(0.05)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    open(os.path.join(marks, str(r)), "w").close()
    pmi.fence()
    print(f"rank {r} left the fence", flush=True)
    sys.exit(0)
out = {"rank": r, "size": n, "jobid": pmi.kvsname, "env_jobid": os.environ.get("PMI_JOBID"),
       "pmix_vars": sorted(k for k in os.environ if k.startswith("PMIX_"))}
for i in range(4):  # values of the maximum size: a blob of 4+ KiB per rank and epoch
    pmi.put(f"big-{r}-{i}", (f"{r}{i}" * 600)[:1024])
pmi.put(f"key-{r}", f"value-of-{r}=x")
pmi._call(PutNodeAttr(f"node-{r}", f"nv{r}"), PutReply)
body = b"cmd=kvs-put;key=too-big;value=" + b"x" * 2048 + b";"  # past the client's check
pmi._sock.sendall(b"%-6d" % len(body) + body)
reply = None
while reply is None:
    pmi._codec.receive_data(pmi._sock.recv(65536))
    reply = pmi._codec.next_event()
out["too_big"] = repr(reply)
pmi.fence()
out["got"] = [pmi.get(f"key-{k}") for k in range(n)]
out["big_ok"] = all(
    pmi.get(f"big-{k}-{i}") == (f"{k}{i}" * 600)[:1024] for k in range(n) for i in range(4)
)
out["missing"] = pmi.get("no-such-key")
out["node"] = [pmi._call(GetNodeAttr(f"node-{k}", True), GetReply).value for k in range(n)]
out["mapping"] = pmi.get_job_attr("PMI_process_mapping")
out["universe"] = pmi.get_job_attr("universeSize")
pmi.put("again", f"first-{r}")
pmi.fence()
first = pmi.get("again")
pmi.put("again", f"second-{r}")
pmi.fence()
out["again"] = [first, pmi.get("again")]
pmi.finalize()
print(json.dumps(out, sort_keys=True), flush=True)
"""


# What the SPANK shim does in task_init (spank/rankwire_spank.c start_bridge): a socketpair,
# a detached `rankwire spank-helper pmi-bridge DIR` on one end (fd 3), the task on the other as
# PMI_FD (here every task runs its own: the node's other tasks joining the first task's are
# tests/test_spank.py's)
# without the PMIX_* variables.
SHIM_SCRIPT = r"""
import os, socket, sys
task_end, bridge_end = socket.socketpair()
pid = os.fork()
if pid == 0:
    if os.fork() == 0:
        os.dup2(bridge_end.fileno(), 3)
        os.set_inheritable(3, True)
        os.environ.pop("SLURM_GTIDS", None)  # each task its own server here
        os.execvp("rankwire", ["rankwire", "spank-helper", "pmi-bridge", "/nonexistent"])
    os._exit(0)
os.waitpid(pid, 0)
bridge_end.close()
os.set_inheritable(task_end.fileno(), True)
env = {k: v for k, v in os.environ.items() if not k.startswith("PMIX_")}
env.update(PMI_FD=str(task_end.fileno()), PMI_RANK=os.environ["PMIX_RANK"],
           PMI_SIZE=os.environ["SLURM_NTASKS"])
os.execvpe(sys.argv[1], sys.argv[1:], env)
"""


# How an executor uses `spawn` (what `rankwire exec` will do before it joins the container):
# the task inherits the fd, the parent closes its copy, reaps the bridge after the task.
EXECUTOR_SCRIPT = r"""
import os, subprocess, sys
from rankwire.pmi.bridge import spawn
bridge = spawn(os.environ)
task = subprocess.Popen(sys.argv[1:], env=bridge.task_env(os.environ), pass_fds=(bridge.fd,))
bridge.handed_over()
code = task.wait()
print(f"task={code} bridge={bridge.wait(30)}", flush=True)
"""


# -- pure pieces -------------------------------------------------------------------------------
def test_task_env_drops_pmix_and_adds_pmi() -> None:
    env = {**PMIX_ENV, "PATH": "/bin", "PMI_FD": "99", "SLURM_JOB_ID": "7"}
    add = pmi_env(5, 2, 4, "7.0", spawned=False, pmi="pmi2")
    assert task_env(env, add) == {
        "PATH": "/bin",
        "SLURM_JOB_ID": "7",
        "PMI_FD": "5",
        "PMI_RANK": "2",
        "PMI_SIZE": "4",
        "PMI_JOBID": "7.0",
    }
    assert pmi_env(5, 0, 1, "x", spawned=True, pmi="pmi1") == {
        "PMI_FD": "5",
        "PMI_RANK": "0",
        "PMI_SIZE": "1",
        "PMI_SPAWNED": "1",
    }


def test_epoch_kvs_merges_by_epoch_then_rank() -> None:
    kvs = EpochKvs(rank=1, nodes=[0, 0, 1])
    kvs.put("a", "mine-0")
    kvs.put("b", "mine")
    assert kvs.enter_fence() == (0, encode_blob({"a": "mine-0", "b": "mine"}, {}))
    assert kvs.get("a") is None  # nothing is visible before the fence completes
    kvs.fence_done()
    assert kvs.enter_fence() == (1, None)  # nothing new: nothing to publish
    kvs.fence_done()
    assert kvs.pending() == (0, 1)
    kvs.merge(0, {0: encode_blob({"a": "r0"}, {}), 2: encode_blob({"a": "r2", "c": "r2"}, {})})
    kvs.merge(1, {2: encode_blob({"c": "r2-later"}, {})})
    assert kvs.pending() == ()
    # Within an epoch the highest rank wins (rank order), a later epoch beats an earlier one.
    assert (kvs.get("a"), kvs.get("b"), kvs.get("c")) == ("r2", "mine", "r2-later")
    with pytest.raises(ValueError):
        kvs.merge(1, {})  # merged already


def test_epoch_kvs_failed_fence_drops_its_epoch() -> None:
    kvs = EpochKvs(rank=0)
    kvs.put("lost", "x")
    assert kvs.enter_fence()[0] == 0
    kvs.fence_failed()
    kvs.put("kept", "y")
    epoch, blob = kvs.enter_fence()
    assert epoch == 1 and blob == encode_blob({"kept": "y"}, {})
    kvs.fence_done()
    assert epoch_key(epoch) == "rankwire.kvs.1"
    kvs.merge(1, {})
    assert (kvs.get("lost"), kvs.get("kept")) == (None, "y")


def test_epoch_kvs_node_attrs_come_from_my_node_only() -> None:
    kvs = EpochKvs(rank=0, nodes=[0, 1, 0])
    kvs.put_node("own", "at-once")
    assert kvs.node_attr("own") == "at-once"  # the putter sees its own without a fence
    kvs.enter_fence()
    kvs.fence_done()
    kvs.merge(
        0,
        {1: encode_blob({}, {"n": "other-node"}), 2: encode_blob({"k": "v"}, {"n": "same-node"})},
    )
    assert (kvs.node_attr("n"), kvs.get("k")) == ("same-node", "v")
    unknown = EpochKvs(rank=0, nodes=None)  # no locality: only its own node attributes
    unknown.enter_fence()
    unknown.fence_done()
    unknown.merge(0, {1: encode_blob({}, {"n": "x"})})
    assert unknown.node_attr("n") is None


def test_blobs_round_trip_and_foreign_ones_are_refused() -> None:
    assert decode_blob(encode_blob({"k": "v=1"}, {"n": "m"})) == ({"k": "v=1"}, {"n": "m"})
    for bad in ("[]", '{"kvs": {"k": 1}}', '{"node": []}', "not json"):
        with pytest.raises(ValueError):
            decode_blob(bad)


def test_process_mapping_from_local_peers() -> None:
    assert parse_ranks("0,2,5-7") == [0, 2, 5, 6, 7]
    assert parse_ranks("1-") is None and parse_ranks("3-1") is None
    assert nodes_from_peers(4, ["0,1", "2,3"]) == [0, 0, 1, 1]
    assert nodes_from_peers(4, ["0,2", "1,3"]) == [0, 1, 0, 1]
    assert nodes_from_peers(4, ["0,1", "2"]) is None  # rank 3 nowhere
    assert nodes_from_peers(2, ["0,1", "1"]) is None  # rank 1 twice
    assert nodes_from_peers(2, ["0,1,2"]) is None  # a rank outside the job

    def info(nodes: list[int] | None) -> JobInfo:
        return JobInfo("ns", 0, 4, "7.0", nodes=tuple(nodes) if nodes else None)

    assert info([0, 0, 1, 1]).attr("PMI_process_mapping") == "(vector,(0,2,2))"
    assert info([0, 1, 0, 1]).attr("PMI_process_mapping") == "(vector,(0,2,1),(0,2,1))"
    assert info(None).attr("PMI_process_mapping") is None  # unknown: absent, never wrong
    assert info(None).attr("universeSize") == "4"
    assert JobInfo.from_json(info([0, 0, 1, 1]).to_json()) == info([0, 0, 1, 1])


@pytest.mark.parametrize(
    ("uris", "name"),
    [
        ({"PMIX_SERVER_URI41": "pmix-server.4242;tcp4://127.0.0.1:1",
          "PMIX_SERVER_URI2": "pmix-server.1;tcp4://127.0.0.1:1"}, "pmibridge.7.0.3.4242"),
        ({"PMIX_SERVER_URI2": "pmix-server.77;tcp4://127.0.0.1:1"}, "pmibridge.7.0.3.77"),
        ({"PMIX_SERVER_URI41": "pmix-server.x1;tcp4://127.0.0.1:1"}, "pmibridge.7.0.3"),
        ({"PMIX_SERVER_URI41": "pmix-server.12"}, "pmibridge.7.0.3"),
        ({"PMIX_SERVER_URI41": "slurm.pmix.7.0;tcp4://127.0.0.1:1"}, "pmibridge.7.0.3"),
        ({}, "pmibridge.7.0.3"),
    ],
    ids=["first-of-the-uris", "an-older-uri", "not-a-pid", "no-address", "other-nspace", "none"],
)  # fmt: skip
def test_the_node_socket_is_named_after_the_step_node_and_slurmstepd(
    uris: dict[str, str], name: str
) -> None:
    """Job ids are one cluster's: two clusters on one host (or one whose controller lost
    its state) can run steps of one job, step and node id at once, whose tasks would hand
    over to each other's server. The step's slurmstepd, the PMIx server whose namespace
    libpmix names `pmix-server.PID`, tells them apart; without it, the name is the step's
    and the node's alone (the front end and the shim name it the same way)."""
    from rankwire.pmi.bridge import node_socket

    step = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_NODEID": "3"}
    assert node_socket({**step, **uris}, "/run/x") == f"/run/x/{name}"


def test_tasks_queued_when_the_node_server_ends_hear_why(tmp_path: Path) -> None:
    """A task whose hand-over is queued when the node's bridge server ends (its wait is
    over, SIGTERM) gets the reason on the stderr it handed over, not a silent EOF."""
    from rankwire.pmi.bridgeserve import _refuse_waiting
    from rankwire.runtime.instance import listen_at

    path = str(tmp_path / "pmibridge.7.0.0")
    listener = listen_at(path)
    ours, bridge_end = socket.socketpair()
    err_r, err_w = os.pipe()
    with listener, ours, bridge_end, socket.socket(socket.AF_UNIX) as task:
        task.connect(path)
        socket.send_fds(task, [b"env=A=1\0end=1\0"], [bridge_end.fileno(), err_w])
        os.close(err_w)
        task.close()  # as the shim does: it sends and goes on
        _refuse_waiting(listener, "the node's PMI bridge server ended")
    with os.fdopen(err_r, "rb") as said:
        assert said.read().decode().splitlines() == [
            "rankwire: this task has no PMI bridge: the node's PMI bridge server ended"
        ]


def test_a_hand_over_the_server_took_and_closed_at_once_is_no_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node's bridge server reads a task's whole hand-over, forks its bridge and closes
    the connection, all before the task's next call: the hand-over is done. (It used to
    send the empty rest with sendall, which still calls send: EPIPE, and the task ended
    the step, its bridge forked: the CI's 'Broken pipe' now and then under load.)"""
    from rankwire.pmi import bridge

    path = tmp_path / "pmibridge.7.0.0"
    took: list[bytes] = []
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen()
        send_fds = socket.send_fds

        def sent_and_taken(sock: socket.socket, *args: Any) -> int:
            sent = send_fds(sock, *args)
            conn, _ = listener.accept()  # the server, quicker than the task
            with conn:
                data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 2)
                while not data.endswith(b"\0end=1\0"):
                    data += conn.recv(1 << 16)
                for got in fds:
                    os.close(got)
            took.append(data)
            return sent

        monkeypatch.setattr(socket, "send_fds", sent_and_taken)
        step = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_NODEID": "0"}
        ours, theirs = socket.socketpair()
        with ours, theirs:
            bridge._hand_over(theirs.fileno(), step, str(tmp_path))
    from rankwire.runtime import frame

    [records] = [frame.decode(data) for data in took]
    assert records[:3] == [("env", f"{k}={v}") for k, v in step.items()]
    assert records[-1] == ("end", "1")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=["SIGTERM", "SIGINT", "SIGHUP"])  # fmt: skip
def test_a_node_server_ended_by_a_signal_removes_its_socket(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """The node's bridge server, waiting for its node's other task, ended by the step's
    SIGTERM, a Ctrl-C's SIGINT or a SIGHUP: its socket goes with it (a forked server has
    no other handler), and it exits 128 + the signal."""
    step = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_NODEID": "0",
            "SLURM_GTIDS": "0,1", "RANKWIRE_LIBPMIX": "/nonexistent"}  # fmt: skip
    server = (  # as the shim starts it: its task's end on fd 3
        "import os, sys; os.dup2(int(sys.argv[1]), 3)\n"
        "from rankwire.entry import main; main(sys.argv[2:])"
    )
    ours, theirs = socket.socketpair()
    with ours:
        proc = subprocess.Popen(
            [sys.executable, "-c", server, str(theirs.fileno()),
             "spank-helper", "pmi-bridge", str(tmp_path)],
            env={**os.environ, **PMIX_ENV, **step}, pass_fds=(theirs.fileno(),),
            stderr=subprocess.PIPE,
        )  # fmt: skip
        theirs.close()
        path = tmp_path / "pmibridge.7.0.0.1"  # PMIX_ENV's slurmstepd: pid 1
        deadline = time.monotonic() + 30
        try:
            while not path.exists():
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
                time.sleep(0.02)
            proc.send_signal(sig)
            assert proc.wait(10) == 128 + sig
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            assert proc.stderr is not None
            proc.stderr.close()
    assert not path.exists()


def test_bridge_outside_a_pmix_step_is_a_user_error(unprivileged_user: User) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMIX_", "PMI_"))}
    proc = ME.run(["rankwire", "pmi", "bridge", "--", "true"], env=env, cwd="/tmp", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "rankwire: no PMIx server to bridge (PMIX_NAMESPACE / PMIX_RANK / PMIX_SERVER_URI* "
        "unset): run the PMI bridge under `srun --mpi=pmix`"
    ]


@pytest.mark.usefixtures("nothing_left_behind")
def test_an_unreachable_pmix_server_is_a_user_error() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMIX_", "PMI_"))}
    env.update(PMIX_ENV)  # a server URI nobody listens on
    proc = ME.run(["rankwire", "pmi", "bridge", "--", "true"], env=env, cwd="/tmp", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "rankwire: the PMI bridge cannot connect to the step's PMIx server (PMIx_Init failed: "
        "UNREACHABLE (-25)): run it under `srun --mpi=pmix` as the task's user, outside any "
        "container"
    ]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["pmi", "bridge"], "pmi bridge: no command: give -- COMMAND [ARGS...]"),
        (  # the shim's way without the shim: no fd 3
            ["spank-helper", "pmi-bridge", "/tmp"],
            "fd 3: not an open socket (Bad file descriptor); pass the bridge's end of the "
            "task's PMI_FD socketpair",
        ),
    ],
)
def test_bridge_usage_errors(args: list[str], line: str) -> None:
    proc = ME.run(["rankwire", *args], env=dict(os.environ), timeout=60)
    assert (proc.returncode, proc.stderr.splitlines()) == (2, [f"rankwire: {line}"])


# -- under srun --mpi=pmix -------------------------------------------------------------------
def srun(runner: User, cluster, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return without_queue_lines(
        runner.run(["srun", "--mpi=pmix", *args], env=cluster.env, cwd="/tmp", timeout=timeout)
    )


def python_for(runner: User) -> str:
    """An interpreter with rankwire installed that `runner` can run."""
    return os.path.join(runner.bindir, "python") if runner.bindir else sys.executable


@pytest.fixture(scope="module")
def rank_script(shared_dir: Path) -> Path:
    path = shared_dir / "bridge_rank.py"
    path.write_text(RANK_SCRIPT)
    path.chmod(0o644)
    return path


@pytest.mark.slurm
@pytest.mark.mpi
@pytest.mark.usefixtures("nothing_left_behind")
def test_mpich_under_pmix_starts_singletons_without_the_bridge(
    slurm_cluster, mpi_programs: MpiPrograms, runner: User
) -> None:
    """What fails today: Debian's MPICH finds no PMI_FD under --mpi=pmix."""
    proc = srun(runner, slurm_cluster, "-n", "4", str(mpi_programs.hello_mpich))
    assert proc.returncode == 0, proc.stderr
    assert (
        proc.stdout.splitlines()
        == [f"hello rank=0 size=1 host={socket.gethostname()} sum=1 ok"] * 4
    )


@pytest.mark.slurm
@pytest.mark.mpi
@pytest.mark.usefixtures("nothing_left_behind")
def test_mpich_through_the_bridge_is_one_job(
    slurm_cluster, mpi_programs: MpiPrograms, runner: User
) -> None:
    proc = srun(
        runner, slurm_cluster, "-n", "4", "rankwire", "pmi", "bridge", "--",
        str(mpi_programs.hello_mpich),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 4)
    assert proc.stderr == ""


@pytest.mark.slurm
@pytest.mark.mpi
@pytest.mark.usefixtures("nothing_left_behind")
def test_mpich_through_a_detached_bridge_on_a_given_fd(
    slurm_cluster, mpi_programs: MpiPrograms, shared_dir: Path, runner: User
) -> None:
    """`rankwire spank-helper pmi-bridge`, started the way the SPANK shim starts it."""
    shim = shared_dir / "bridge_shim.py"
    shim.write_text(SHIM_SCRIPT)
    shim.chmod(0o644)
    proc = srun(
        runner, slurm_cluster, "-n", "4", python_for(runner), str(shim),
        str(mpi_programs.hello_mpich),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 4)
    assert proc.stderr == ""


@pytest.mark.slurm
@pytest.mark.mpi
@pytest.mark.usefixtures("nothing_left_behind")
def test_spawn_as_an_executor_calls_it(
    slurm_cluster, mpi_programs: MpiPrograms, shared_dir: Path
) -> None:
    script = shared_dir / "bridge_executor.py"
    script.write_text(EXECUTOR_SCRIPT)
    proc = srun(
        ME, slurm_cluster, "-n", "4", sys.executable, str(script), str(mpi_programs.hello_mpich)
    )
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 4)
    assert [x for x in proc.stdout.splitlines() if x.startswith("task=")] == ["task=0 bridge=0"] * 4


@pytest.mark.slurm
@pytest.mark.usefixtures("nothing_left_behind")
def test_pmi2_exchange_through_the_bridge(slurm_cluster, rank_script: Path, runner: User) -> None:
    proc = srun(
        runner, slurm_cluster, "-n", "4", "rankwire", "pmi", "bridge", "--",
        python_for(runner), str(rank_script), "exchange",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    outs = sorted((json.loads(line) for line in proc.stdout.splitlines()), key=lambda o: o["rank"])
    assert [o["rank"] for o in outs] == [0, 1, 2, 3]
    for out in outs:
        assert out["size"] == 4
        assert out["jobid"] == out["env_jobid"] and out["jobid"].endswith(".0")
        assert out["pmix_vars"] == []  # the task does not see the step's PMIx
        assert out["got"] == [f"value-of-{k}=x" for k in range(4)]
        assert out["big_ok"] is True
        assert out["missing"] is None
        assert out["node"] == ["nv0", "nv1", "nv2", "nv3"]  # one node: all share them
        assert out["mapping"] == "(vector,(0,1,4))"
        assert out["universe"] == "4"
        assert out["again"] == ["first-3", "second-3"]  # rank order, then the later epoch
        assert out["too_big"] == (
            "ErrorReply(message='PMI bridge: PMI-2 value of 2048 bytes (max 1024)')"
        )


@pytest.mark.slurm
@pytest.mark.usefixtures("nothing_left_behind")
def test_a_command_that_never_speaks_pmi(slurm_cluster, runner: User) -> None:
    proc = srun(
        runner, slurm_cluster, "-n", "2", "rankwire", "pmi", "bridge", "--pmi", "pmi1", "--",
        "sh", "-c", 'echo "rank=$PMI_RANK size=$PMI_SIZE jobid=${PMI_JOBID-unset} '
        'pmix=${PMIX_RANK-unset}"',
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == [
        "rank=0 size=2 jobid=unset pmix=unset",
        "rank=1 size=2 jobid=unset pmix=unset",
    ]
    assert proc.stderr == ""


@pytest.mark.slurm
@pytest.mark.mpi
@pytest.mark.usefixtures("nothing_left_behind")
def test_abort_through_the_bridge_ends_the_step(
    slurm_cluster, mpi_programs: MpiPrograms, runner: User
) -> None:
    proc = srun(
        runner, slurm_cluster, "-n", "4", "rankwire", "pmi", "bridge", "--",
        str(mpi_programs.fail_mpich), "abort", "1", "7",
    )  # fmt: skip
    assert proc.returncode == 7, proc.stderr
    lines = proc.stderr.splitlines()
    assert (
        "Abort(7) on node 1 (rank 1 in comm 0): application called MPI_Abort(MPI_COMM_WORLD, 7)"
        " - process 1" in lines
    ), proc.stderr
    assert "srun: Job step aborted: Waiting up to 4 seconds for job step to finish." in lines


@pytest.mark.slurm
@pytest.mark.mpi
@pytest.mark.usefixtures("nothing_left_behind")
def test_a_task_without_its_bridge_ends_the_step(
    slurm_cluster, mpi_programs: MpiPrograms, runner: User
) -> None:
    """A task whose hand-over to the node's bridge server failed ends the whole step
    (`bridge.abort_step`, PMIx_Abort as its rank; here as the front end runs it): the
    other ranks, waiting for it in MPI_Init's fence, would wait as long as the step lasts."""
    rankwire_py = os.path.join(os.path.dirname(python_for(runner)), "rankwire-py")
    # after the others' hand-over: their node's bridge server hears of it and goes
    script = (
        f'[ "$SLURM_PROCID" = 1 ] && sleep 2 && exec {rankwire_py} front-end-pmi-abort 2; '
        f"exec rankwire pmi bridge -- {mpi_programs.hello_mpich}"
    )
    started = time.monotonic()
    proc = srun(runner, slurm_cluster, "-n", "3", "sh", "-c", script, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert time.monotonic() - started < 30, proc.stderr  # not the hang it replaces
    assert "srun: Job step aborted: Waiting up to 4 seconds for job step to finish." in (
        proc.stderr.splitlines()
    ), proc.stderr
    assert "hello" not in proc.stdout


@pytest.mark.slurm
@pytest.mark.usefixtures("nothing_left_behind")
def test_a_task_killed_in_a_fence_ends_the_step(
    slurm_cluster, rank_script: Path, shared_dir: Path, runner: User
) -> None:
    marks = shared_dir / f"bridge-marks-{runner.name}"
    marks.mkdir()
    os.chown(marks, runner.uid, runner.gid)
    # A hang would end in TimeoutExpired; Slurm ends it first: PMIx fails the others' fence
    # (PMIX_ERR_PARTIAL_SUCCESS) and --kill-on-bad-exit ends the step.
    proc = srun(
        runner, slurm_cluster, "--kill-on-bad-exit=1", "-n", "4", "rankwire", "pmi", "bridge",
        "--", python_for(runner), str(rank_script), "killed", str(marks), timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert f"srun: error: {slurm_cluster.nodename}: task 1: Killed" in proc.stderr.splitlines()
    assert "left the fence" not in proc.stdout
    deadline = time.monotonic() + 5  # the step's processes may still be going
    while bridges_of(slurm_cluster) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert bridges_of(slurm_cluster) == []


def bridges_of(cluster) -> list[int]:
    """Live processes of this cluster's steps that are PMI bridges (a zombie has no
    environment and runs nothing)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SLURM_CONF={cluster.conf}".encode() in env and b"bridge" in cmdline:
            found.append(int(proc.name))
    return found


# -- two nodes: the process mapping and node attributes from PMIx's locality ------------------
@pytest.mark.slow
@pytest.mark.multinode
@pytest.mark.slurm
def test_mapping_and_node_attrs_on_two_nodes(slurm_multinode, rank_script: Path) -> None:
    """Block and cyclic layouts of `-N2 -n4`: PMI_process_mapping from each node's local
    peers, node attributes seen only on the putter's node, the KVS across nodes. (The
    PMI-2 client, not MPICH: Debian MPICH + UCX over TCP may hang in MPI_Finalize across
    nodes, see test_multinode.)"""
    env = {**slurm_multinode.env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for layout, mapping, nodes in (
        ("block", "(vector,(0,2,2))", [[0, 1], [0, 1], [2, 3], [2, 3]]),
        ("cyclic", "(vector,(0,2,1),(0,2,1))", [[0, 2], [1, 3], [0, 2], [1, 3]]),
    ):
        proc = ME.run(
            [
                "srun", "-N2", "-n4", "--mpi=pmix", f"--distribution={layout}", "rankwire",
                "pmi", "bridge", "--", sys.executable, str(rank_script), "exchange",
            ],
            env=env, cwd="/tmp", timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        outs = sorted((json.loads(x) for x in proc.stdout.splitlines()), key=lambda o: o["rank"])
        for out in outs:
            assert out["mapping"] == mapping, layout
            assert out["got"] == [f"value-of-{k}=x" for k in range(4)] and out["big_ok"] is True
            mine = nodes[out["rank"]]
            assert out["node"] == [f"nv{k}" if k in mine else None for k in range(4)], layout


# -- wired in: `srun --mpi=pmix rankwire exec IMAGE` bridges by itself --------------------------
@pytest.mark.slurm
@pytest.mark.mpi
@pytest.mark.usefixtures("nothing_left_behind")
def test_exec_bridges_an_mpich_image_under_pmix(slurm_cluster, mpich_image: Path, runner: User):
    proc = srun(runner, slurm_cluster, "-n", "4", "rankwire", "exec", str(mpich_image),
                "/opt/hello_mpich")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 4)
    assert proc.stderr == ""


@pytest.mark.slurm
@pytest.mark.mpi
@pytest.mark.usefixtures("nothing_left_behind")
def test_exec_tasks_each_hear_why_their_bridge_failed(slurm_cluster, mpich_image: Path):
    """The node's bridges are forked by one server (its first task's), as under the plugin,
    yet each bridge's message reaches its own task's stderr: three tasks, three lines."""
    missing = "/nonexistent/libpmix.so.2"
    env = {**slurm_cluster.env, "RANKWIRE_LIBPMIX": missing}
    proc = without_queue_lines(
        ME.run(["srun", "--mpi=pmix", "-n", "3", "rankwire", "exec", str(mpich_image),
                "/opt/hello_mpich"], env=env, cwd="/tmp", timeout=90)
    )  # fmt: skip
    assert proc.returncode != 0
    line = (
        f"rankwire: cannot load the PMIx library '{missing}' ({missing}: cannot open shared "
        "object file: No such file or directory): install libpmix2 or set RANKWIRE_LIBPMIX "
        "to its path"
    )
    assert proc.stderr.splitlines().count(line) == 3, proc.stderr


def test_a_node_server_that_never_listens_is_named(tmp_path: Path) -> None:
    late = "the server did not listen"
    t = time.monotonic()
    with pytest.raises(UserError) as err:
        connect_own(str(tmp_path / "absent"), time.monotonic() + 0.2, late, "server")
    assert str(err.value) == late
    assert time.monotonic() - t >= 0.2


def test_a_node_server_of_another_user_is_refused(shared_dir: Path, unprivileged_user) -> None:
    """A socket at the node server's path that another user (root) listens on: refused,
    by uid, before anything is handed over."""
    if os.getuid() != 0:
        pytest.skip("needs root (the socket is another user's)")
    path = shared_dir / "pmibridge.other-user"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    path.chmod(0o777)
    code = (
        "import sys\n"
        "from rankwire.runtime.peercred import connect_own\n"
        "try:\n"
        "    connect_own(sys.argv[1], 0, 'late', 'PMI bridge server')\n"
        "except Exception as err:\n"
        "    print(err)\n"
    )
    try:
        proc = unprivileged_user.run([python_for(unprivileged_user), "-c", code, str(path)])
    finally:
        listener.close()
        path.unlink()
    assert proc.stdout == (
        f"the PMI bridge server's socket {path} is held by uid 0, not by you; ask the node's "
        "admin to find that process\n"
    ), proc.stderr


@pytest.mark.slurm
@pytest.mark.mpi
@pytest.mark.usefixtures("nothing_left_behind")
def test_exec_without_the_bridge_starts_singletons(slurm_cluster, mpich_image: Path):
    proc = srun(ME, slurm_cluster, "-n", "2", "rankwire", "exec", "--pmi-bridge", "off",
                str(mpich_image), "/opt/hello_mpich")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert [line.split(" host=")[0] for line in proc.stdout.splitlines()] == [
        "hello rank=0 size=1"
    ] * 2
    assert proc.stderr.splitlines() == [  # once for the step: task 0 says it
        "rankwire: warning: the image's MPI speaks PMI-1/PMI-2 and this step serves PMIx, "
        "not bridged (--pmi-bridge off): each task will start as a singleton or fail in "
        "MPI_Init; drop --pmi-bridge off, or run `srun --mpi=pmi2 …`"
    ]


@pytest.mark.slurm
def test_the_dry_run_says_whether_and_why(slurm_cluster, mpich_image: Path):
    proc = srun(ME, slurm_cluster, "-n", "1", "rankwire", "exec", "--dry-run", "--json",
                str(mpich_image), "/opt/hello_mpich")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["pmi_bridge"] == {
        "offer": "pmix",
        "need": "pmi1/2",
        "bridge": "pmix-to-pmi",
        "reason": "the step serves PMIx (srun --mpi=pmix) and the image's MPI speaks "
        "PMI-1/PMI-2: bridged (PMI_FD served through the step's PMIx server)",
        "warning": "",
    }
    assert not [k for k in plan["process"]["env"] if k.startswith("PMIX_")]
    text = srun(ME, slurm_cluster, "-n", "1", "rankwire", "exec", "--dry-run",
                str(mpich_image), "/bin/true")  # fmt: skip
    line = (
        "pmi        the step serves PMIx (srun --mpi=pmix) and the image's MPI speaks "
        "PMI-1/PMI-2: bridged (PMI_FD served through the step's PMIx server)"
    )
    assert line in text.stdout.splitlines()


@pytest.mark.slurm
@pytest.mark.mpi
@pytest.mark.usefixtures("nothing_left_behind")
def test_joining_an_instance_is_bridged_too(slurm_cluster, mpich_image: Path):
    start = ME.run(["rankwire", "instance", "start", str(mpich_image), "bridged"], timeout=60)
    assert start.returncode == 0, start.stderr
    try:
        proc = srun(ME, slurm_cluster, "-n", "2", "rankwire", "exec", "instance://bridged",
                    "/opt/hello_mpich")  # fmt: skip
    finally:
        stop = ME.run(["rankwire", "instance", "stop", "bridged"], timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 2)
    assert stop.returncode == 0, stop.stderr
