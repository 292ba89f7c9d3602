"""End to end: `rankwire build` of a Debian 12 MPI image whose %post installs MPICH with
apt and compiles the MPI hello, as root and as the unprivileged user; then
`apptainer-mpirun -n 4` and `srun --mpi=pmi2 --container-image=` (the plugin, on the
single-node Slurm) run what it built.

Everything stays on 127.0.0.0/8: the base is `tools/debian-cache`'s mmdebstrap rootfs made
an OCI image by umoci and pushed by skopeo into the loopback registry, and apt in %post
reads the cache's flat repository served by a thread of this process (`harness.debian`).
`make test` makes that cache first (once; it persists between runs).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_defbuild import mode_line, owners

from harness.debian import AptRepo, DebianCache, cached, debian_layout, serving
from harness.mpi import assert_hello
from harness.oci import push_layout
from harness.registry import Registry
from harness.slurm import SlurmCluster
from harness.spank import srun
from harness.users import User

pytestmark = [pytest.mark.slow, pytest.mark.mpi]

REPO = Path(__file__).resolve().parent.parent
ROOT = User("root", 0, 0, "/root")
BUILD_TIMEOUT = 900.0

# Two stages, as images with a compiler should be made: the build stage installs MPICH's
# development packages (gcc, g++, gfortran, autotools: 416 MiB) and compiles the hello;
# the image gets the program and only MPICH's runtime library (a third of the size, so a
# third of the packing time).
RECIPE = """\
Bootstrap: docker
From: {base}
Stage: build

%files
    hello_mpi.c /opt/hello_mpi.c

%post
    export DEBIAN_FRONTEND=noninteractive
    rm -f /etc/apt/sources.list.d/*
    echo "{sources_line}" > /etc/apt/sources.list
    apt-get update
    apt-get install -y --no-install-recommends libmpich-dev gcc libc6-dev
    mpicc -O1 -o /opt/hello_mpich /opt/hello_mpi.c

Bootstrap: docker
From: {base}
Stage: final

%files from build
    /opt/hello_mpich /opt/hello_mpich

%post
    export DEBIAN_FRONTEND=noninteractive
    rm -f /etc/apt/sources.list.d/*
    echo "{sources_line}" > /etc/apt/sources.list
    apt-get update
    apt-get install -y --no-install-recommends libmpich12
    rm -rf /var/lib/apt/lists/*
    echo "built" > /opt/built

%runscript
    exec /opt/hello_mpich "$@"
"""


@pytest.fixture(scope="module")
def debian_cache() -> DebianCache:
    found = cached()
    if found is None:
        pytest.skip("no Debian cache: run `make debian-cache` (as root) first")
    return found


@pytest.fixture(scope="module")
def debian_base(debian_cache: DebianCache, registry: Registry, shared_dir: Path) -> str:
    """`127.0.0.1:PORT/debian:12` in the loopback registry: the cached minbase, pushed once."""
    layout = debian_layout(shared_dir / "debian-oci", debian_cache)
    ref = push_layout(layout.path, layout.tag, "debian:12", registry=registry)
    shutil.rmtree(shared_dir / "debian-oci", ignore_errors=True)
    return ref[len("docker://") :]


@pytest.fixture(scope="module")
def apt_repo(debian_cache: DebianCache) -> Iterator[AptRepo]:
    with serving(debian_cache.repo) as repo:
        yield repo


@dataclasses.dataclass(frozen=True)
class Built:
    runner: User
    work: Path
    sif: Path
    proc: subprocess.CompletedProcess[str]
    fetched: tuple[str, ...]  # the .debs apt fetched from the loopback repo for this build


def _workdir(shared_dir: Path, user: User, name: str) -> Path:
    """`user`'s dir for one build: the recipe, the hello's source, RANKWIRE_TMPDIR `tmp`."""
    path = shared_dir / f"defbuild-debian-{name}"
    (path / "tmp").mkdir(parents=True)
    shutil.copy(REPO / "examples" / "hello_mpi.c", path / "hello_mpi.c")
    for p in (path, path / "tmp", path / "hello_mpi.c"):
        os.chown(p, user.uid, user.gid)
    return path


@pytest.fixture(scope="module")
def pull_caches(shared_dir: Path) -> Iterator[Path]:
    """Where each user's builds cache the pulled base (RANKWIRE_CACHEDIR, one per user for
    the module: the base is converted once per user); removed after the module."""
    path = shared_dir / "defbuild-debian-caches"
    path.mkdir(mode=0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _build(runner: User, caches: Path, work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`rankwire build -v --insecure ARGS` as `runner` in `work`."""
    cache = caches / runner.name
    if not cache.exists():
        cache.mkdir()
        os.chown(cache, runner.uid, runner.gid)
    argv = ["env", f"RANKWIRE_TMPDIR={work / 'tmp'}", f"RANKWIRE_CACHEDIR={cache}"]
    argv += ["rankwire", "build", "-v", "--insecure", *args]
    return runner.run(argv, cwd=str(work), timeout=BUILD_TIMEOUT)


@pytest.fixture(scope="module", params=["root", "user"])
def built(
    request: pytest.FixtureRequest,
    unprivileged_user: User,
    shared_dir: Path,
    debian_base: str,
    apt_repo: AptRepo,
    pull_caches: Path,
) -> Iterator[Built]:
    """mpich.sif built from RECIPE by root or the unprivileged user (once per runner)."""
    if request.param == "root" and os.getuid() != 0:
        pytest.skip("not running as root")
    runner = ROOT if request.param == "root" else unprivileged_user
    work = _workdir(shared_dir, runner, runner.name)
    recipe = work / "mpich.def"
    recipe.write_text(RECIPE.format(base=debian_base, sources_line=apt_repo.sources_line))
    os.chown(recipe, runner.uid, runner.gid)
    before = len(apt_repo.requests)
    proc = _build(runner, pull_caches, work, "mpich.sif", "mpich.def")
    fetched = AptRepo(apt_repo.url, apt_repo.requests[before:]).debs_fetched()
    assert proc.returncode == 0, proc.stderr[-4000:]
    yield Built(runner, work, work / "mpich.sif", proc, tuple(fetched))
    shutil.rmtree(work, ignore_errors=True)


def _packages_version(repo: Path, package: str) -> str:
    """The Version of `package` in the flat repository's Packages index."""
    for stanza in (repo / "Packages").read_text().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line)
        if fields.get("Package") == package:
            return fields["Version"]
    raise AssertionError(f"{package} is not in {repo / 'Packages'}")


@pytest.mark.usefixtures("nothing_left_behind")
def test_apt_in_post_installs_mpich_from_the_loopback_repo(
    built: Built, debian_cache: DebianCache
) -> None:
    """%post ran as root the way -v says, apt fetched every package of the closure from
    the flat repo, the image holds that MPICH library and the hello, nothing is left."""
    lines = built.proc.stderr.splitlines()
    assert lines[0] == mode_line(built.runner), built.proc.stderr[-2000:]
    assert f"rankwire: packing {built.sif}" in lines
    assert [line for line in lines if line.startswith(("E: ", "W: "))] == []  # apt's
    assert set(built.fetched) == set(debian_cache.debs)  # the build stage's closure
    assert list((built.work / "tmp").iterdir()) == []
    query = "dpkg-query -W -f '${Version}\\n' libmpich12; cat /opt/built; id -u; "
    query += "command -v mpicc || echo no mpicc"  # the build stage's compilers stayed there
    proc = built.runner.run(
        ["rankwire", "exec", str(built.sif), "sh", "-c", query], cwd=str(built.work)
    )
    assert proc.returncode == 0, proc.stderr
    version = _packages_version(debian_cache.repo, "libmpich12")
    assert proc.stdout == f"{version}\nbuilt\n{built.runner.uid}\nno mpicc\n"


@pytest.mark.usefixtures("nothing_left_behind")
def test_apptainer_mpirun_runs_the_built_hello(built: Built) -> None:
    proc = built.runner.run(
        ["apptainer-mpirun", "-n", "4", str(built.sif), "/opt/hello_mpich"],
        cwd="/tmp",
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 4)
    assert proc.stderr == ""


@pytest.mark.slurm
def test_srun_container_image_runs_the_built_hello(
    built: Built, spank_cluster: SlurmCluster, nothing_left: None
) -> None:
    proc = srun(
        spank_cluster,
        built.runner,
        "-n",
        "4",
        "--mpi=pmi2",
        f"--container-image={built.sif}",
        "/opt/hello_mpich",
    )
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 4)
    assert proc.stderr == ""


FAKEROOT_RECIPE = """\
Bootstrap: docker
From: {base}

%post
    export DEBIAN_FRONTEND=noninteractive
    rm -f /etc/apt/sources.list.d/*
    echo "{sources_line}" > /etc/apt/sources.list
    rm -rf /var/cache/apt/archives/partial
    apt-get update
    apt-get install -y --no-install-recommends m4 libnuma1
    rm -rf /var/lib/apt/lists/*
"""


@pytest.mark.usefixtures("nothing_left_behind")
def test_apt_works_with_one_mapped_id_and_fakeroot(
    unprivileged_user: User,
    shared_dir: Path,
    debian_base: str,
    apt_repo: AptRepo,
    debian_cache: DebianCache,
    pull_caches: Path,
) -> None:
    """Without subordinate ids (--ignore-subuid): apt drops to its `_apt` user (faked by
    fakeroot), dpkg installs, and the owners they set are the image's (apt makes partial/
    again, owned by _apt)."""
    user = unprivileged_user
    work = _workdir(shared_dir, user, f"{user.name}-fakeroot")
    recipe = work / "small.def"
    recipe.write_text(FAKEROOT_RECIPE.format(base=debian_base, sources_line=apt_repo.sources_line))
    os.chown(recipe, user.uid, user.gid)
    proc = _build(user, pull_caches, work, "--ignore-subuid", "small.sif", "small.def")
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stderr.splitlines()
    assert lines[0] == mode_line(user, ignore_subuid=True)
    assert [line for line in lines if line.startswith(("E: ", "W: "))] == []  # apt's
    assert list((work / "tmp").iterdir()) == []
    assert owners(work / "small.sif", "/usr/bin/m4", "/var/cache/apt/archives/partial") == [
        "0/0 /usr/bin/m4",
        "42/0 /var/cache/apt/archives/partial",
    ]
    query = "dpkg-query -W -f '${Version}\\n' m4 libnuma1"
    proc = user.run(["rankwire", "exec", "small.sif", "sh", "-c", query], cwd=str(work))
    assert proc.returncode == 0, proc.stderr
    versions = [_packages_version(debian_cache.repo, p) for p in ("libnuma1", "m4")]
    assert proc.stdout.splitlines() == versions
    shutil.rmtree(work)
