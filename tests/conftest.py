"""Session fixtures shared by every test: real Slurm, a real non-root user, real MPI."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.host import OMPI_TREES
from harness.images import make_python_mpi_rootfs, make_rootfs, make_world_readable
from harness.leftovers import SESSION_VAR, user_leftovers
from harness.mpi import CompiledPrograms, MpiPrograms, compile_hello
from harness.oci import OciLayout, layered_image
from harness.registry import Registry, running_registry
from harness.slurm import SlurmCluster, running_cluster
from harness.spank import SESSION_ROOTS, SpankInstall, install_plugin, spank_leftovers
from harness.users import User, ensure_unprivileged_user, install_for

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"

# Console scripts (`rankwire`, `apptainer-mpirun`) of the interpreter running the tests
# come first on PATH, also for commands run as the unprivileged user.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
os.environ[SESSION_VAR] = os.urandom(8).hex()


# Signals that end the session. They raise KeyboardInterrupt (pytest then runs every
# fixture's teardown: clusters, netns, registries), but never inside a teardown: one cut
# short there (a cluster half stopped) leaves daemons, cgroups and sockets behind, and
# pytest drops the finalizers queued after it. A signal during teardown waits until it ends;
# the third signal ends the session at once (a hung teardown), saying so.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_interrupt_state: dict[str, Any] = {"tearing_down": 0, "pending": 0, "raised": False, "count": 0}


def _interrupt(signum: int, frame: object) -> None:
    _interrupt_state["count"] += 1
    if _interrupt_state["count"] >= 3:
        say = _interrupt_state["say"]  # the terminal: fd 2 may be a capture file now
        say(f"signal {signum} a third time: ending without the teardown")
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if _interrupt_state["raised"]:
        return  # the session is already ending: let its teardown finish
    if _interrupt_state["tearing_down"]:
        _interrupt_state["pending"] = signum
        return
    _interrupt_state["raised"] = True
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_sessionstart(session: pytest.Session) -> None:
    capture = session.config.pluginmanager.get_plugin("capturemanager")

    def say(line: str) -> None:  # on the terminal, not into a test's capture
        if capture is not None:
            capture.suspend_global_capture(in_=True)
        print(f"\n{line}", file=sys.stderr, flush=True)

    _interrupt_state["say"] = say
    for sig in _STOP_SIGNALS:
        signal.signal(sig, _interrupt)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: object) -> Iterator[None]:
    _interrupt_state["tearing_down"] += 1
    try:
        return (yield)
    finally:
        _interrupt_state["tearing_down"] -= 1
        for sig in _STOP_SIGNALS:  # code run in this process must give its handlers back
            if signal.getsignal(sig) is not _interrupt:
                signal.signal(sig, _interrupt)
                item.warn(pytest.PytestWarning(f"{item.nodeid} left signal {int(sig)} unhandled"))
        signum = _interrupt_state["pending"]
        if signum and not _interrupt_state["raised"]:
            _interrupt_state["raised"] = True
            raise KeyboardInterrupt(f"signal {signum}")


@pytest.hookimpl(wrapper=True)
def pytest_sessionfinish(session: pytest.Session) -> Iterator[None]:
    """The teardown left after an interrupt runs here; nothing interrupts it, and a signal
    that came meanwhile makes the session's end an interrupted one."""
    _interrupt_state["tearing_down"] += 1
    try:
        return (yield)
    finally:
        if _interrupt_state["pending"] and not _interrupt_state["raised"]:
            session.exitstatus = pytest.ExitCode.INTERRUPTED


@pytest.fixture(scope="session")
def shared_dir() -> Iterator[Path]:
    """A session temp dir every test user can read (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="rankwire-tests-"))
    d.chmod(0o755)
    SESSION_ROOTS.append(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A throwaway single-node Slurm 22.05; use `.env` for srun/sbatch."""
    with running_cluster("the Slurm fixture needs root (slurmd runs steps as the job user)") as c:
        yield c


@pytest.fixture(scope="session")
def unprivileged_user(shared_dir: Path) -> User:
    user = ensure_unprivileged_user()
    if os.getuid() == 0:
        user = install_for(user, REPO, shared_dir)
    return user


@pytest.fixture(scope="session")
def spank_install(shared_dir: Path, unprivileged_user: User) -> SpankInstall:
    """The SPANK plugin as `make -C spank install` puts it, with a helper every job user
    can run (root-owned, as the shim demands)."""
    bindir = unprivileged_user.bindir or str(Path(sys.executable).parent)
    return install_plugin(REPO, shared_dir / "spank-prefix", f"{bindir}/rankwire")


@pytest.fixture(scope="session")
def mpi_programs(shared_dir: Path) -> MpiPrograms:
    """The C MPI hello compiled with Debian's MPICH (PMI-1) and Open MPI (PMIx)."""
    bindir = shared_dir / "mpi"
    bindir.mkdir(mode=0o755)
    return compile_hello(EXAMPLES, bindir)


@pytest.fixture(scope="session")
def data_programs(shared_dir: Path) -> CompiledPrograms:
    """The test programs of tests/data (harness.mpi.PROGRAMS), compiled on first use."""
    bindir = shared_dir / "programs"
    bindir.mkdir(mode=0o755)
    return CompiledPrograms(bindir)


@pytest.fixture(scope="session")
def base_image(shared_dir: Path) -> Path:
    """A minimal image (host coreutils + their libraries) with env, labels, runscript."""
    from rankwire.runtime.build import build_image

    rootfs = make_rootfs(shared_dir / "base-rootfs")
    out = shared_dir / "base.sif"
    build_image(
        out,
        rootfs,
        env={"IMAGE_VAR": "from-image", "OVERRIDE_ME": "image"},
        labels={"purpose": "tests"},
        runscript='#!/bin/sh\necho "runscript: $*"\n',
    )
    make_world_readable(shared_dir)
    return out


@pytest.fixture(scope="session")
def mpich_image(shared_dir: Path, mpi_programs: MpiPrograms) -> Path:
    """Debian MPICH (+ its UCX plugins) with /opt/hello_mpich and /opt/fail_mpich; the
    runscript runs the hello."""
    from rankwire.runtime.build import build_image

    rootfs = make_rootfs(
        shared_dir / "mpich-rootfs",
        binaries=[str(mpi_programs.hello_mpich), str(mpi_programs.fail_mpich)],
        trees=["/usr/lib/x86_64-linux-gnu/ucx"],
    )
    (rootfs / "opt").mkdir()
    for prog in (mpi_programs.hello_mpich, mpi_programs.fail_mpich):
        shutil.copy2(prog, rootfs / "opt" / prog.name)
    out = shared_dir / "mpich.sif"
    build_image(out, rootfs, runscript='#!/bin/sh\nexec /opt/hello_mpich "$@"\n')
    make_world_readable(shared_dir)
    return out


@pytest.fixture(scope="session")
def ompi_image(shared_dir: Path, mpi_programs: MpiPrograms) -> Path:
    """Debian Open MPI 4.1 (+ its MCA and PMIx plugins) with /opt/hello_ompi and
    /opt/fail_ompi."""
    from rankwire.runtime.build import build_image

    rootfs = make_rootfs(
        shared_dir / "ompi-rootfs",
        binaries=[str(mpi_programs.hello_ompi), str(mpi_programs.fail_ompi)],
        trees=[t for t in OMPI_TREES if os.path.exists(t)],
    )
    (rootfs / "opt").mkdir()
    for prog in (mpi_programs.hello_ompi, mpi_programs.fail_ompi):
        shutil.copy2(prog, rootfs / "opt" / prog.name)
    out = shared_dir / "ompi.sif"
    build_image(out, rootfs)
    make_world_readable(shared_dir)
    return out


@pytest.fixture(scope="session")
def python_mpi_image(shared_dir: Path) -> Path:
    """Debian's python3 with mpi4py (built against Debian's MPICH: PMI-1 only), pytest and
    pytest-mpi from our venv in /usr/lib/python3/dist-packages, examples/pytest_mpi at
    /opt/tests; the runscript runs those tests (`rankwire run -n 4 python-mpi.sif`)."""
    import sysconfig

    from rankwire.runtime.build import build_image

    rootfs = make_python_mpi_rootfs(
        shared_dir / "python-mpi-rootfs",
        Path(sysconfig.get_paths()["purelib"]),
        EXAMPLES / "pytest_mpi",
    )
    out = shared_dir / "python-mpi.sif"
    build_image(
        out,
        rootfs,
        env={"PYTHONDONTWRITEBYTECODE": "1"},
        runscript='#!/bin/sh\nexec python3 -m pytest --with-mpi -q /opt/tests "$@"\n',
    )
    shutil.rmtree(rootfs)
    make_world_readable(shared_dir)
    return out


@pytest.fixture(params=["root", "user"])
def runner(request, unprivileged_user: User) -> User:
    """Run the test as root (when we are root) and as the unprivileged test user."""
    if request.param == "root":
        if os.getuid() != 0:
            pytest.skip("not running as root")
        return User("root", 0, 0, "/root")
    return unprivileged_user


@pytest.fixture
def nothing_left_behind(unprivileged_user: User) -> Iterator[None]:
    """After the test: no process, mount or runtime file of root or the test user."""
    yield
    users = [unprivileged_user] + ([User("root", 0, 0, "/root")] if os.getuid() == 0 else [])
    for user in users:
        deadline = time.monotonic() + 5
        while user_leftovers(user) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert user_leftovers(user) == []


# -- the SPANK plugin under a Slurm of its own (tests/test_spank*.py) ------------------
@pytest.fixture(scope="session")
def spank_cluster(spank_install: SpankInstall) -> Iterator[SlurmCluster]:
    """A Slurm of its own whose plugstack loads the installed plugin. Its spool and TmpFS
    live under /run, which containers do not see by default: Slurm's PMIx dirs reach the
    tasks only if the plugin binds them."""
    with running_cluster("the Slurm fixture needs root", base="/run") as cluster:
        SESSION_ROOTS.append(cluster.root)
        cluster.plugstack.write_text(spank_install.plugstack_line())
        yield cluster


@pytest.fixture
def policy(spank_install: SpankInstall) -> Iterator[Path]:
    """The installed policy file; a test may rewrite it, the sample comes back after."""
    sample = spank_install.policy.read_text()
    yield spank_install.policy
    spank_install.policy.write_text(sample)


@pytest.fixture
def nothing_left(unprivileged_user: User) -> Iterator[None]:
    """After the test: no helper, holder or FUSE daemon of the plugin, no runtime file."""
    yield
    users = [unprivileged_user, User("root", 0, 0, "/root")]

    def left() -> list[str]:
        return spank_leftovers() + [x for u in users for x in user_leftovers(u)]

    deadline = time.monotonic() + 5
    while left() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left() == []


# -- registries on 127.0.0.1 and OCI images made by umoci (tests/test_pull.py) ----------
REGISTRY_CREDS = ("rankwire", "s3cret pa:ss")


@pytest.fixture(scope="session")
def registry(shared_dir: Path) -> Iterator[Registry]:
    """Plain-HTTP docker-registry on 127.0.0.1 (rankwire needs --insecure)."""
    with running_registry(shared_dir) as reg:
        yield reg


@pytest.fixture(scope="session")
def tls_registry(shared_dir: Path) -> Iterator[Registry]:
    """HTTPS with a throwaway CA (`.ca_cert`, readable by the test user)."""
    with running_registry(shared_dir, tls=True) as reg:
        yield reg


@pytest.fixture(scope="session")
def auth_registry(shared_dir: Path) -> Iterator[Registry]:
    """Plain HTTP with htpasswd basic auth (`.credentials`)."""
    with running_registry(shared_dir, htpasswd=REGISTRY_CREDS) as reg:
        yield reg


@pytest.fixture(scope="session")
def layered_layout(shared_dir: Path) -> OciLayout:
    """A two-layer OCI image made by umoci (whiteout, hardlink, symlink, mode 000, setuid)."""
    return layered_image(shared_dir / "layered")


# -- the same clusters under Slurm's cgroup plugins (tests/test_slurm_cgroup.py) --------
@pytest.fixture(scope="session")
def slurm_cgroup_cluster() -> Iterator[SlurmCluster]:
    """`slurm_cluster` with proctrack/cgroup and task/cgroup (cgroup v2 on a unified host,
    v1 on a hybrid one: see harness.slurm.cgroup_conf)."""
    with running_cluster("the Slurm fixture needs root", cgroup=True) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def spank_cgroup_cluster(spank_install: SpankInstall) -> Iterator[SlurmCluster]:
    """`spank_cluster` with proctrack/cgroup and task/cgroup."""
    with running_cluster("the Slurm fixture needs root", base="/run", cgroup=True) as cluster:
        cluster.plugstack.write_text(spank_install.plugstack_line())
        yield cluster
