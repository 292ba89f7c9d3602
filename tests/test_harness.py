"""The test harness itself: real Slurm, real MPI, real non-root user; and it cleans up."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_multinode import slurm_multinode  # noqa: F401  (test_hold_clusters uses it)

from harness.mpi import assert_hello, ompi_env
from harness.multinode import MultiNodeCluster
from harness.slurm import SlurmCluster, pids_with_env

pytestmark = [pytest.mark.slurm, pytest.mark.mpi]


def test_srun_pmi2_runs_mpich_hello(slurm_cluster, mpi_programs) -> None:
    proc = subprocess.run(
        ["srun", "--mpi=pmi2", "-n", "2", str(mpi_programs.hello_mpich)],
        env=slurm_cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 2)


def test_srun_pmix_runs_openmpi_hello(slurm_cluster, mpi_programs) -> None:
    proc = subprocess.run(
        ["srun", "--mpi=pmix", "-n", "2", str(mpi_programs.hello_ompi)],
        env=ompi_env(slurm_cluster.env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 2)


def test_unprivileged_user_runs_jobs(slurm_cluster, mpi_programs, unprivileged_user) -> None:
    assert unprivileged_user.uid != 0
    proc = unprivileged_user.run(
        ["srun", "--mpi=pmi2", "-n", "2", "sh", "-c", f"id -u; {mpi_programs.hello_mpich}"],
        env=slurm_cluster.env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split().count(str(unprivileged_user.uid)) == 2
    assert_hello(proc.stdout, 2)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_cluster_start_and_teardown_leave_nothing(slurm_cluster) -> None:
    # A second cluster beside the session one: coexistence, then a full teardown while a
    # job is still running in it.
    t0 = time.monotonic()
    cluster = SlurmCluster().start()
    started = time.monotonic() - t0
    print(f"second Slurm cluster idle after {started:.2f}s")
    assert cluster.ctld_port != slurm_cluster.ctld_port
    sbatch = subprocess.run(
        ["sbatch", "--parsable", "--wrap", "sleep 300"],
        env=cluster.env,
        capture_output=True,
        text=True,
        check=True,
    )
    jobid = sbatch.stdout.strip()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not pids_with_env(f"SLURM_CONF={cluster.conf}"):
        time.sleep(0.1)
    pids = dict(cluster.pids)
    job_pids = pids_with_env(f"SLURM_CONF={cluster.conf}")
    assert job_pids, f"job {jobid} never started"
    root, ports = cluster.root, (cluster.ctld_port, cluster.slurmd_port)
    cluster.stop()

    for name, pid in [*pids.items(), *(("job", p) for p in job_pids)]:
        assert not Path(f"/proc/{pid}").exists(), f"{name} (pid {pid}) survived teardown"
    assert not root.exists()
    assert not any(_listening(p) for p in ports)
    # The session cluster is untouched.
    assert slurm_cluster.node_state().startswith(("idle", "mixed", "allocated"))
    assert all(Path(f"/proc/{p}").exists() for p in slurm_cluster.pids.values())
    assert os.environ.get("SLURM_CONF") is None


# -- a killed test session leaves no cluster (issue 13, defect 11) ------------------------
HOLD_VAR = "RANKWIRE_TEST_HOLD"  # the file where the held session says what it started


@pytest.mark.multinode
@pytest.mark.skipif(HOLD_VAR not in os.environ, reason="run by test_killed_session_*")
@pytest.mark.parametrize("slurm_multinode", [1], indirect=True)
def test_hold_clusters(
    slurm_multinode: MultiNodeCluster,  # noqa: F811
    slurm_cluster: SlurmCluster,
    shared_dir: Path,
) -> None:
    """Both kinds of cluster, through their real fixtures, until the session is killed."""
    info = {
        "shared_dir": str(shared_dir),
        "box_root": str(slurm_multinode.root),
        "links": [slurm_multinode.bridge, *(m.veth for m in slurm_multinode.members)],
        "netns": [m.netns for m in slurm_multinode.members],
        "slurm_root": str(slurm_cluster.root),
        "pids": [m.pid for m in slurm_multinode.members]
        + [pid for name, pid in slurm_cluster.pids.items() if name != "munged"],
        "confs": [str(slurm_multinode.conf), str(slurm_cluster.conf)],
    }
    hold = Path(os.environ[HOLD_VAR])
    hold.with_suffix(".tmp").write_text(json.dumps(info))
    hold.with_suffix(".tmp").replace(hold)
    time.sleep(300)


def _held(
    tmp_path: Path, test: str, env: dict[str, str], ready: Path, within: float, *options: str
) -> subprocess.Popen:
    """A child pytest session (a session of its own) of `test` in this file, its output in
    tmp_path/session.out, once `ready` exists; fails the test if it ends or takes longer
    than `within` seconds first."""
    with open(tmp_path / "session.out", "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *options,
             f"{__file__}::{test}"],
            env={**os.environ, **env},
            cwd=Path(__file__).parent.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + within
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail((tmp_path / "session.out").read_text())
        time.sleep(0.05)
    return proc


def _held_session(tmp_path: Path) -> tuple[subprocess.Popen, dict]:
    """A pytest session running test_hold_clusters, once both clusters are up."""
    hold = tmp_path / "hold.json"
    proc = _held(tmp_path, "test_hold_clusters", {HOLD_VAR: str(hold)}, hold, 90,
                 "-m", "multinode")  # fmt: skip
    return proc, json.loads(hold.read_text())


def _left(info: dict) -> list[str]:
    """What of the held clusters is still on the machine."""
    found = [f"link {n}" for n in info["links"] if Path(f"/sys/class/net/{n}").exists()]
    found += [f"netns {n}" for n in info["netns"] if Path(f"/run/netns/{n}").exists()]
    found += [f"dir {d}" for d in (info["box_root"], info["slurm_root"]) if Path(d).exists()]
    found += [f"pid {p}" for p in info["pids"] if Path(f"/proc/{p}").exists()]
    for conf in info["confs"]:
        found += [f"pid {p} (SLURM_CONF={conf})" for p in pids_with_env(f"SLURM_CONF={conf}")]
    return found


def _gone_within(info: dict, seconds: float) -> list[str]:
    deadline = time.monotonic() + seconds
    while _left(info) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _left(info)


@pytest.mark.multinode
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_killed_session_tears_its_clusters_down(tmp_path: Path, sig: signal.Signals) -> None:
    """A session ended by SIGTERM (CI or shell timeout) or SIGINT runs its fixtures'
    teardown: no daemon, netns, link or directory of either cluster remains."""
    if os.getuid() != 0:
        pytest.skip("needs root")
    proc, info = _held_session(tmp_path)
    assert _left(info) != []
    os.kill(proc.pid, sig)
    proc.wait(30)
    assert _gone_within(info, 5) == [], (tmp_path / "session.out").read_text()
    assert not Path(info["shared_dir"]).exists()


@pytest.mark.multinode
@pytest.mark.slow
def test_next_start_reaps_clusters_of_a_killed_session(tmp_path: Path, shared_dir: Path) -> None:
    """SIGKILL leaves both clusters behind; the next start of each kind stops them (a
    munged the killed session started stays: it is the host's, the next start uses it)."""
    if os.getuid() != 0:
        pytest.skip("needs root")
    proc, info = _held_session(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    time.sleep(1)
    assert _left(info) != []
    box = MultiNodeCluster(1, shared=[shared_dir])
    single = SlurmCluster()
    try:
        box.start()
        single.start()
    finally:
        box.stop()
        single.stop()
    assert _gone_within(info, 5) == []
    assert box.leftovers() == []
    # Not a cluster: the killed session's temp dir, which only its teardown removes.
    shutil.rmtree(info["shared_dir"])


# -- a signal during teardown waits for it ---------------------------------------------
TEARDOWN_VAR = "RANKWIRE_TEST_TEARDOWN"  # the dir where the held teardown leaves its marks


@pytest.fixture
def slow_teardown() -> Iterator[Path]:
    marks = Path(os.environ[TEARDOWN_VAR])
    yield marks
    (marks / "started").touch()
    time.sleep(3)
    (marks / "finished").touch()


@pytest.mark.skipif(TEARDOWN_VAR not in os.environ, reason="run by test_a_signal_during_*")
def test_hold_teardown(slow_teardown: Path) -> None:
    """A test whose fixture takes 3 s to tear down (a cluster stopping, say)."""


def _signal_held_teardown(
    tmp_path: Path, signals: list[signal.Signals], within: float
) -> tuple[int, str]:
    """A pytest session of test_hold_teardown, sent `signals` (0.2 s apart) once its
    fixture's teardown has begun: its exit status (killed if still running after
    `within` s) and what it printed."""
    proc = _held(tmp_path, "test_hold_teardown", {TEARDOWN_VAR: str(tmp_path)},
                 tmp_path / "started", 60)  # fmt: skip
    try:
        for i, sig in enumerate(signals):
            if i:
                time.sleep(0.2)
            os.kill(proc.pid, sig)
        rc = proc.wait(within)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, (tmp_path / "session.out").read_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_teardown_waits_for_it(tmp_path: Path, sig: signal.Signals) -> None:
    """The signal that ends a session does not cut short a teardown under way (a cluster
    half stopped leaves daemons behind): the teardown finishes, then the session ends as
    interrupted."""
    rc, output = _signal_held_teardown(tmp_path, [sig], 30)
    assert (tmp_path / "finished").exists(), output
    assert rc == pytest.ExitCode.INTERRUPTED, output
    assert f"KeyboardInterrupt: signal {int(sig)}" in output, output


def test_a_third_signal_ends_a_hung_teardown(tmp_path: Path) -> None:
    """A teardown that does not end (hung) must not make the session unkillable but by
    SIGKILL: the third signal ends it at once, saying so."""
    rc, output = _signal_held_teardown(tmp_path, [signal.SIGTERM] * 3, 10)
    assert rc == -signal.SIGTERM, output
    assert "signal 15 a third time: ending without the teardown" in output, output
    assert not (tmp_path / "finished").exists(), output
