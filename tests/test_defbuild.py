"""`rankwire build OUT.sif RECIPE.def`: real builds from definition files, as root and as
the unprivileged user, from a static-busybox SIF (`localimage`), from a loopback registry
(`docker`), multi-stage, with the exact messages of what fails."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.oci import busybox_rootfs, push_layout, umoci_image
from harness.registry import Registry
from harness.users import User
from rankwire.runtime.defbuild import BuildFacts, Copy, plan_defbuild
from rankwire.runtime.deffile import parse

FIX_POST = "fix that line, or add --keep-sandbox to look at the sandbox"


@pytest.fixture(scope="session")
def busybox_sif(shared_dir: Path) -> Path:
    """A SIF of static busybox (every applet, /etc/passwd, /opt), a label and a variable."""
    from rankwire.runtime.build import build_image

    rootfs = busybox_rootfs(shared_dir / "defbuild-busybox-rootfs")
    (rootfs / "opt").mkdir()  # as in a distribution: %files DST /opt copies into it
    out = shared_dir / "defbuild-busybox.sif"
    build_image(out, rootfs, env={"BASE_VAR": "from-base"}, labels={"base.label": "kept"})
    out.chmod(0o644)
    return out


ROOT = User("root", 0, 0, "/root")


def workdir(shared_dir: Path, user: User) -> Path:
    """A directory of `user`'s: recipes, inputs, outputs and RANKWIRE_TMPDIR (`tmp`,
    which must be empty after every build, failed or not, but a kept sandbox)."""
    path = shared_dir / f"defbuild-{user.name}-{os.urandom(4).hex()}"
    (path / "tmp").mkdir(parents=True)
    for p in (path, path / "tmp"):
        os.chown(p, user.uid, user.gid)
    return path


@pytest.fixture
def work(shared_dir: Path, runner: User) -> Iterator[Path]:
    path = workdir(shared_dir, runner)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def root_work(shared_dir: Path) -> Iterator[Path]:
    """`work` for the rows where root alone is enough (the same for every user)."""
    if os.getuid() != 0:
        pytest.skip("not running as root")
    path = workdir(shared_dir, ROOT)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def build(
    runner: User, work: Path, *args: str, env: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    argv = ["env", f"RANKWIRE_TMPDIR={work / 'tmp'}", f"RANKWIRE_CACHEDIR={work / 'cache'}"]
    return runner.run([*argv, *env, "rankwire", "build", *args], cwd=str(work))


def rw(runner: User, work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return runner.run(["rankwire", *args], cwd=str(work))


def write(runner: User, path: Path, text: str) -> Path:
    path.write_text(text)
    os.chown(path, runner.uid, runner.gid)
    return path


def mode_line(runner: User, ignore_subuid: bool = False) -> str:
    """What `-v` says about how %post runs as root, for this runner on this host."""
    if runner.uid == 0:
        return "rankwire: %post runs as root (the caller is root: no user namespace)"

    def subid(path: str) -> tuple[int, int] | None:
        for line in Path(path).read_text().splitlines():
            parts = line.split(":")
            if len(parts) == 3 and parts[0] in (runner.name, str(runner.uid)):
                return int(parts[1]), int(parts[2])
        return None

    u, g = subid("/etc/subuid"), subid("/etc/subgid")
    tools = shutil.which("newuidmap") and shutil.which("newgidmap")
    if u and g and tools and not ignore_subuid:
        return (
            "rankwire: %post runs as root in a user namespace with subordinate ids "
            f"(uids {u[0]}-{u[0] + u[1] - 1}, gids {g[0]}-{g[0] + g[1] - 1} of /etc/subuid, "
            "/etc/subgid, mapped by newuidmap/newgidmap)"
        )
    why = (
        "--ignore-subuid"
        if ignore_subuid
        else f"no /etc/subuid and /etc/subgid range for {runner.name}"
    )
    return (
        "rankwire: %post runs as root in a user namespace with one mapped id and fakeroot "
        f"({why}; chown and ownership are recorded by fakeroot)"
    )


def owners(sif: Path, *paths: str) -> list[str]:
    """`UID/GID PATH` of image paths, as the SIF's squashfs records them."""
    from rankwire.runtime.imagemeta import read_image_metadata
    from rankwire.runtime.sif_read import SifImage

    with SifImage.open(sif) as img:
        offset = read_image_metadata(img).partition_offset
    argv = ["unsquashfs", "-lln", "-o", str(offset), str(sif), *paths]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    found = {}
    for row in (ln.split() for ln in out.splitlines() if "squashfs-root/" in ln):
        found[row[-1].split("squashfs-root", 1)[1]] = row[1]
    return sorted(f"{found[p]} {p}" for p in paths if p in found)


def no_debris(work: Path, *outputs: str) -> None:
    assert list((work / "tmp").iterdir()) == []
    for name in outputs:
        assert not (work / name).exists()
    assert [p.name for p in work.iterdir() if p.name.startswith(".")] == []


def faked_of(runner: User) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            mine = proc.name.isdigit() and proc.stat().st_uid == runner.uid
            if mine and (proc / "comm").read_text().strip().startswith("faked"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


RECIPE = """\
Bootstrap: localimage
From: {base}

%files
    input.txt /opt/input.txt
    "with space.txt" /opt/

%post
    echo "post runs as $(id -u)"
    chown 1000:1000 /opt/input.txt
    mkdir -p /opt/app/bin
    printf '#!/bin/sh\\necho tool ran\\n' > /opt/app/bin/tool
    chmod 755 /opt/app/bin/tool
    echo 'export FROM_POST="post value"' >> $APPTAINER_ENVIRONMENT
    echo 'export PATH=/opt/app/bin:$PATH' >> "$SINGULARITY_ENVIRONMENT"
    test -c /dev/null && test -d /proc/self && echo "dev and proc: ok"

%environment
    export GREETING=hello
    export BOTH="$FROM_POST and %environment"

%runscript
    echo "runscript: $GREETING $*"

%startscript
    echo started

%labels
    Author rankwire tests
    Version 1.0

%help
    Builds a test image.

%test
    test -f /opt/input.txt
"""


@pytest.mark.usefixtures("nothing_left_behind")
def test_a_localimage_recipe_gives_an_image_exec_sees(
    runner: User, work: Path, busybox_sif: Path
) -> None:
    """%files, %post (as root, /dev, /proc, $APPTAINER_ENVIRONMENT), %environment,
    %runscript, %startscript, %labels, %help, %test; then exec, run and inspect see them."""
    write(runner, work / "input.txt", "from the host\n")
    write(runner, work / "with space.txt", "spaced\n")
    text = RECIPE.format(base=busybox_sif)
    write(runner, work / "app.def", text)
    proc = build(runner, work, "-v", "--compression", "zstd", "app.sif", "app.def")
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.splitlines()
    assert err[0] == mode_line(runner)
    assert "+ mkdir -p /opt/app/bin" in err
    assert proc.stdout.splitlines() == [
        "post runs as 0",
        "dev and proc: ok",
        "rankwire: built app.sif",
    ]
    no_debris(work)
    script = (
        'echo "$GREETING|$FROM_POST|$BOTH|$BASE_VAR|$PATH"; tool; cat /opt/input.txt '
        '"/opt/with space.txt" /.singularity.d/startscript /.singularity.d/runscript.help'
    )
    proc = rw(runner, work, "exec", "app.sif", "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "hello|post value|post value and %environment|from-base|"
        "/opt/app/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "tool ran",
        "from the host",
        "spaced",
        "#!/bin/sh",
        "",
        "    echo started",
        "",
        "    Builds a test image.",
        "",
    ]
    proc = rw(runner, work, "run", "app.sif", "a", "b")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "runscript: hello a b\n"
    proc = rw(runner, work, "inspect", "--deffile", "app.sif")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == text
    assert owners(work / "app.sif", "/opt/input.txt") == ["1000/1000 /opt/input.txt"]
    doc = json.loads(rw(runner, work, "inspect", "--json", "app.sif").stdout)
    assert doc["partition"]["compression"] == "zstd"  # as asked (the default: lz4)
    labels = doc["labels"]
    assert {k: labels[k] for k in ("Author", "Version", "base.label")} == {
        "Author": "rankwire tests",
        "Version": "1.0",
        "base.label": "kept",
    }
    assert labels["org.label-schema.usage.singularity.deffile.bootstrap"] == "localimage"


@pytest.mark.usefixtures("nothing_left_behind")
def test_without_subordinate_ids_fakeroot_keeps_owners(
    unprivileged_user: User, shared_dir: Path, base_image: Path
) -> None:
    """One mapped id: the host's fakeroot records what the image's (dynamically linked)
    chown sets, and the image has it; faked ends with the build."""
    runner = unprivileged_user
    work = workdir(shared_dir, runner)
    recipe = (
        f"Bootstrap: localimage\nFrom: {base_image}\n\n%files\n    /usr/bin/chown /usr/bin/\n\n"
        "%post\n    touch /made\n    chown 1000:1000 /made\n    stat -c %u:%g /made\n"
    )
    write(runner, work / "fr.def", recipe)
    proc = build(runner, work, "-v", "--ignore-subuid", "fr.sif", "fr.def")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[0] == mode_line(runner, ignore_subuid=True)
    assert proc.stdout == "1000:1000\nrankwire: built fr.sif\n"
    assert faked_of(runner) == []
    no_debris(work)
    assert owners(work / "fr.sif", "/made", "/usr/bin/id-suid") == [
        "0/0 /usr/bin/id-suid",
        "1000/1000 /made",
    ]
    shutil.rmtree(work)


@pytest.mark.usefixtures("nothing_left_behind")
def test_a_docker_base_comes_from_the_registry_once(
    runner: User, work: Path, registry: Registry, shared_dir: Path
) -> None:
    layout = umoci_image(
        shared_dir / f"defbuild-oci-{runner.name}",
        "bb",
        [busybox_rootfs],
        ["--config.env=DOCKER_VAR=from docker $HOME"],
    )
    ref = push_layout(layout.path, layout.tag, f"tests/defbuild-{runner.name}:1", registry=registry)
    netloc_ref = ref[len("docker://") :]
    write(
        runner,
        work / "d.def",
        f"Bootstrap: docker\nFrom: {netloc_ref}\n\n%post\n    echo built > /built\n",
    )
    proc = build(runner, work, "--insecure", "d.sif", "d.def")
    assert proc.returncode == 0, proc.stderr
    proc = rw(runner, work, "exec", "d.sif", "sh", "-c", 'cat /built; echo "$DOCKER_VAR"')
    assert proc.stdout == "built\nfrom docker $HOME\n", proc.stderr
    gets = registry.blob_gets()
    proc = build(runner, work, "--insecure", "d2.sif", "d.def")
    assert proc.returncode == 0, proc.stderr
    assert registry.blob_gets() == gets
    no_debris(work)


SPACK_SHAPED = """\
Bootstrap: localimage
From: {base}
Stage: build

%post
  mkdir -p /opt/spack-environment /opt/software/linux-x86_64/hello-1.0/bin /opt/view
  printf '#!/bin/sh\\necho hello from spack\\n' > /opt/software/linux-x86_64/hello-1.0/bin/hello
  chmod 755 /opt/software/linux-x86_64/hello-1.0/bin/hello
  ln -s /opt/software/linux-x86_64/hello-1.0/bin /opt/view/bin
  cd /opt/spack-environment
  cat > environment_modifications.sh <<'EOF'
export PATH=/opt/view/bin:$PATH;
export SPACK_ENV=/opt/spack-environment;
alias despacktivate="spack env deactivate";
export MANPATH=/opt/view/share/man:;
EOF
  echo "build stage only" > /opt/build-only

Bootstrap: localimage
From: {base}
Stage: final

%files from build
  /opt/spack-environment /opt
  /opt/software /opt
  /opt/view /opt
  /opt/spack-environment/environment_modifications.sh /opt/spack-environment/environment_modifications.sh

%post
  cat /opt/spack-environment/environment_modifications.sh >> $SINGULARITY_ENVIRONMENT

%runscript
  exec hello "$@"
"""  # noqa: E501


@pytest.mark.usefixtures("nothing_left_behind")
def test_a_spack_shaped_two_stage_recipe(runner: User, work: Path, busybox_sif: Path) -> None:
    """The final stage has the build stage's /opt/view, /opt/software and environment
    (the sourced script's semicolons and alias handled by the image's shell), not the rest."""
    write(runner, work / "spack.def", SPACK_SHAPED.format(base=busybox_sif))
    proc = build(runner, work, "spack.sif", "spack.def")
    assert proc.returncode == 0, proc.stderr
    no_debris(work)
    script = 'hello; echo "$SPACK_ENV|$MANPATH|$PATH"; ls /opt; test ! -e /opt/build-only'
    proc = rw(runner, work, "exec", "spack.sif", "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "hello from spack",
        "/opt/spack-environment|/opt/view/share/man:|"
        "/opt/view/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "software",
        "spack-environment",
        "view",
    ]
    assert rw(runner, work, "run", "spack.sif").stdout == "hello from spack\n"


FAILING = """\
Bootstrap: localimage
From: {base}

%post
    echo step one > /step
    test -f /step
    grep -q nothing /step
    echo never
"""


@pytest.mark.usefixtures("nothing_left_behind")
def test_a_failing_post_line_is_named_and_leaves_nothing(
    runner: User, work: Path, busybox_sif: Path
) -> None:
    write(runner, work / "bad.def", FAILING.format(base=busybox_sif))
    proc = build(runner, work, "bad.sif", "bad.def")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == (
        "rankwire: bad.def line 7: %post of stage 1 failed at 'grep -q nothing /step' "
        f"(exit status 1); {FIX_POST}"
    )
    assert "never" not in proc.stdout
    no_debris(work, "bad.sif")


@pytest.mark.usefixtures("nothing_left_behind")
def test_keep_sandbox_keeps_the_failed_stage(root_work: Path, busybox_sif: Path) -> None:
    work, runner = root_work, ROOT
    write(runner, work / "bad.def", FAILING.format(base=busybox_sif))
    proc = build(runner, work, "--keep-sandbox", "bad.sif", "bad.def")
    assert proc.returncode == 2
    kept = [p for p in (work / "tmp").iterdir()]
    assert len(kept) == 1
    sandbox = kept[0] / "stage1"
    assert proc.stderr.splitlines()[-2:] == [
        f"rankwire: kept the sandbox of stage 1 in {sandbox}",
        "rankwire: bad.def line 7: %post of stage 1 failed at 'grep -q nothing /step' "
        f"(exit status 1); {FIX_POST}",
    ]
    assert (sandbox / "step").read_text() == "step one\n"
    assert not (work / "bad.sif").exists()


@pytest.mark.usefixtures("nothing_left_behind")
def test_setup_needs_allow_setup_and_test_fails_unless_notest(
    root_work: Path, busybox_sif: Path
) -> None:
    work, runner = root_work, ROOT
    recipe = (
        f"Bootstrap: localimage\nFrom: {busybox_sif}\n\n"
        '%setup\n    echo from setup > "$APPTAINER_ROOTFS/setup.txt"\n\n'
        "%test\n    test -f /setup.txt\n    test -f /absent\n"
    )
    write(runner, work / "s.def", recipe)
    proc = build(runner, work, "s.sif", "s.def")
    assert proc.returncode == 2
    assert proc.stderr == (
        "rankwire: s.def line 4: %setup runs on the host, outside the container, and is "
        "refused by default; remove it, or build with --allow-setup\n"
    )
    proc = build(runner, work, "--allow-setup", "s.sif", "s.def")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == (
        "rankwire: s.def line 9: %test failed at 'test -f /absent' (exit status 1), so no "
        "image was written; fix the image or the test, or build with --notest"
    )
    no_debris(work, "s.sif")
    proc = build(runner, work, "--allow-setup", "--notest", "s.sif", "s.def")
    assert proc.returncode == 0, proc.stderr
    proc = rw(runner, work, "exec", "s.sif", "cat", "/setup.txt", "/.singularity.d/test")
    assert proc.stdout == "from setup\n#!/bin/sh\n\n    test -f /setup.txt\n    test -f /absent\n"


@pytest.mark.usefixtures("nothing_left_behind")
def test_source_date_epoch_gives_identical_images(
    unprivileged_user: User, shared_dir: Path, busybox_sif: Path
) -> None:
    runner = unprivileged_user
    work = workdir(shared_dir, runner)
    write(runner, work / "r.def", SPACK_SHAPED.format(base=busybox_sif))
    digests = []
    for name in ("one.sif", "two.sif"):
        time.sleep(1.1 if digests else 0)  # the second build's files are a second younger
        proc = build(runner, work, name, "r.def", env=("SOURCE_DATE_EPOCH=1700000000",))
        assert proc.returncode == 0, proc.stderr
        digests.append(hashlib.sha256((work / name).read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    shutil.rmtree(work)


@pytest.mark.usefixtures("nothing_left_behind")
def test_errors_of_the_builder_name_the_line(root_work: Path, busybox_sif: Path) -> None:
    work, runner = root_work, ROOT
    not_sif = work / "a.txt"
    cases = [
        (
            "Bootstrap: localimage\nFrom: missing.sif\n",
            f"rankwire: e.def line 2: From: missing.sif: no such SIF image (relative to {work}); "
            "give the path of an existing .sif file",
        ),
        (
            f"Bootstrap: localimage\nFrom: {busybox_sif}\n\n%files\n    a.txt /a\n    nope.txt\n",
            f"rankwire: e.def line 6: %files source nope.txt does not exist (relative to {work}); "
            "fix the path or create it",
        ),
        (
            f"Bootstrap: localimage\nFrom: {busybox_sif}\n\n%files from later\n    /x\n\n"
            "Bootstrap: scratch\nStage: later\n",
            "rankwire: e.def line 4: %files from later: that stage is defined later (line 8); "
            "copy only from a stage above this one, named with Stage: NAME",
        ),
        (
            f"Bootstrap: localimage\nFrom: {busybox_sif}\nStage: one\n\n"
            "Bootstrap: scratch\n%files from one\n    /nonexistent\n",
            "rankwire: e.def line 7: %files from one: /nonexistent does not exist in that stage; "
            "fix the path or make it in that stage's %post",
        ),
        (
            f"Bootstrap: localimage\nFrom: {not_sif}\n",
            f"rankwire: e.def line 2: From: {not_sif}: {not_sif}: not a SIF image (only 2 bytes); "
            "build one with `rankwire build` or `apptainer build`",
        ),
    ]
    write(runner, work / "a.txt", "a\n")
    for recipe, message in cases:
        write(runner, work / "e.def", recipe)
        proc = build(runner, work, "e.sif", "e.def")
        assert proc.returncode == 2
        lines = proc.stderr.splitlines()
        assert len(lines) == 1, proc.stderr
        assert lines == [message]
        no_debris(work, "e.sif")


@pytest.mark.usefixtures("nothing_left_behind")
def test_sandbox_output_and_an_oras_base(
    root_work: Path, registry: Registry, busybox_sif: Path
) -> None:
    """`Bootstrap: oras` takes a SIF pushed by `rankwire push`; `--sandbox` writes the
    image as a directory, with the metadata files Apptainer reads."""
    work, runner = root_work, ROOT
    dest = f"oras://{registry.netloc}/tests/defbuild-oras:1"
    proc = runner.run(["rankwire", "push", "--insecure", str(busybox_sif), dest])
    assert proc.returncode == 0, proc.stderr
    text = (
        f"Bootstrap: oras\nFrom: {dest[len('oras://') :]}\n\n"
        "%post\n    echo sandboxed > /made\n\n%environment\n    export A=1\n"
    )
    write(runner, work / "o.def", text)
    proc = build(runner, work, "--insecure", "--sandbox", "out", "o.def")
    assert proc.returncode == 0, proc.stderr
    out = work / "out"
    assert (out / "made").read_text() == "sandboxed\n"
    assert (out / ".singularity.d/Singularity").read_text() == text
    assert (out / ".singularity.d/env/90-environment.sh").read_text().splitlines()[-2:] == [
        'export BASE_VAR="from-base"',
        'export A="1"',
    ]
    no_debris(work)
    proc = build(runner, work, "--insecure", "--sandbox", "out", "o.def")
    assert proc.returncode == 2
    assert proc.stderr == "rankwire: --sandbox out exists; remove it or choose another directory\n"


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


SLEEP = b"sleep\x004711\x00"


def _sleepers(user: User) -> list[int]:
    """The %post's `sleep 4711` of `user` (its real uid: /proc/PID of a process in a user
    namespace may be owned by root)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            uid = (proc / "status").read_text().split("\nUid:")[1].split()[0]
            if int(uid) == user.uid and (proc / "cmdline").read_bytes() == SLEEP:
                pids.append(int(proc.name))
        except (OSError, IndexError):
            continue
    return pids


@pytest.mark.slow
@pytest.mark.usefixtures("nothing_left_behind")
def test_a_killed_build_leaves_no_process_and_the_next_build_cleans_up(
    unprivileged_user: User, shared_dir: Path, busybox_sif: Path
) -> None:
    """SIGKILL of `rankwire build` in the middle of %post: the build child and the
    %post's PID namespace die with it; its work dir goes at the user's next build."""
    runner = unprivileged_user
    work = workdir(shared_dir, runner)
    post = "%post\n    sleep 4711\n"
    write(runner, work / "k.def", f"Bootstrap: localimage\nFrom: {busybox_sif}\n\n{post}")
    argv = ["env", f"RANKWIRE_TMPDIR={work / 'tmp'}", "rankwire", "build", "k.sif", "k.def"]
    proc = subprocess.Popen(
        runner.argv(argv), cwd=work, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("+ sleep 4711"):
                break
        deadline = time.monotonic() + 10
        while not _sleepers(runner) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _sleepers(runner), seen
    finally:
        cli = _children(proc.pid)[0] if runner.uid != os.getuid() else proc.pid
        os.kill(cli, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    deadline = time.monotonic() + 10
    while _sleepers(runner) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sleepers(runner) == []
    assert len(list((work / "tmp").iterdir())) == 1
    write(runner, work / "ok.def", f"Bootstrap: localimage\nFrom: {busybox_sif}\n")
    proc2 = build(runner, work, "ok.sif", "ok.def")
    assert proc2.returncode == 0, proc2.stderr
    assert [str(p) for p in (work / "tmp").rglob("*")] == []
    no_debris(work, "k.sif")
    shutil.rmtree(work)


# -- the planner alone (pure: facts in, plan out) -----------------------------------------
def _facts(**kw: object) -> BuildFacts:
    base: dict[str, object] = dict(
        uid=1000,
        gid=1000,
        user="alice",
        subuid=(100000, 65536),
        subgid=(200000, 65536),
        newuidmap="/usr/bin/newuidmap",
        newgidmap="/usr/bin/newgidmap",
        faked="/usr/bin/faked-sysv",
        fakeroot_lib="/usr/lib/x86_64-linux-gnu/libfakeroot/libfakeroot-sysv.so",
        cwd="/home/alice",
        host_paths=(
            ("base.sif", ("/home/alice/base.sif",)),
            ("in/*.txt", ("/home/alice/in/a.txt", "/home/alice/in/b.txt")),
        ),
        tmpdir="/tmp",
    )
    base.update(kw)
    return BuildFacts(**base)  # type: ignore[arg-type]


PLANNED = """\
Bootstrap: localimage
From: base.sif
Stage: build

%files
    in/*.txt /data/

%post -c /bin/bash
    make

Bootstrap: docker
From: debian:12

%files from build
    /data /opt/./data

%test
    true
"""


def test_the_plan_of_a_two_stage_recipe() -> None:
    plan = plan_defbuild(parse(PLANNED, "p.def"), PLANNED, _facts(), recipe="p.def", out="/o.sif")
    build, final = plan.stages
    assert (build.label, build.source, build.source_line) == (
        "stage build",
        "/home/alice/base.sif",
        2,
    )
    assert build.copies == (
        Copy(6, ("/home/alice/in/a.txt", "/home/alice/in/b.txt"), "/data", None),
    )
    assert (build.post_argv, build.post_line) == (("/bin/bash",), 8)
    assert (final.label, final.source, final.first_line) == ("stage 2", "docker://debian:12", 11)
    assert final.copies == (Copy(15, ("/data",), "/opt/data", 0),)
    assert (plan.run_test, final.test_line) == (True, 17)
    assert plan.mode == "subid"
    assert (plan.uid_map, plan.gid_map) == (
        (0, 1000, 1, 1, 100000, 65536),
        (0, 1000, 1, 1, 200000, 65536),
    )
    notest = plan_defbuild(parse(PLANNED), PLANNED, _facts(), recipe="p.def", out="/o", notest=True)
    assert notest.run_test is False


def test_how_post_runs_as_root_is_planned_from_the_facts() -> None:
    text = "Bootstrap: scratch\n"
    defn = parse(text)

    def note(**kw: object) -> tuple[str, str]:
        plan = plan_defbuild(defn, text, _facts(**kw), recipe="r.def", out="/o.sif")
        return plan.mode, plan.mode_note

    assert note(uid=0) == ("root", "%post runs as root (the caller is root: no user namespace)")
    assert note(subgid=None) == (
        "fakeroot",
        "%post runs as root in a user namespace with one mapped id and fakeroot (no "
        "/etc/subuid and /etc/subgid range for alice; chown and ownership are recorded by "
        "fakeroot)",
    )
    assert note(newuidmap=None, faked=None) == (
        "fakeroot",
        "%post runs as root in a user namespace with one mapped id, without fakeroot "
        "(newuidmap/newgidmap not installed, fakeroot not installed: chown to other ids "
        "fails; apt install fakeroot)",
    )


def test_fingerprints_require_a_signed_base(root_work: Path, busybox_sif: Path) -> None:
    """Fingerprints: the localimage base must verify (keys: RANKWIRE_KEYRING or the
    default keyrings) before the build reads it; a docker base cannot carry signatures."""
    from test_sign import make_gpg_key

    work, runner = root_work, ROOT
    keys = work / "keys"
    keys.mkdir()
    alice, mallory = make_gpg_key(keys, "alice"), make_gpg_key(keys, "mallory")
    try:
        signed = work / "signed.sif"
        shutil.copyfile(busybox_sif, signed)
        subprocess.run(["rankwire", "sign", "--key", str(alice.secret), str(signed)], check=True,
                       capture_output=True)  # fmt: skip
        keyring = f"RANKWIRE_KEYRING={alice.public}:{mallory.public}"
        recipe = "Bootstrap: localimage\nFrom: signed.sif\nFingerprints: {}\n\n%post\n    true\n"
        write(runner, work / "ok.def", recipe.format(alice.fingerprint))
        ok = build(runner, work, "ok.sif", "ok.def", env=(keyring,))
        assert ok.returncode == 0, ok.stderr
        write(runner, work / "bad.def", recipe.format(mallory.fingerprint))
        bad = build(runner, work, "bad.sif", "bad.def", env=(keyring,))
        assert bad.returncode == 2
        assert bad.stderr.splitlines() == [
            f"rankwire: bad.def line 2: base {signed}: object group 1 is signed by "
            f"{alice.fingerprint} (signature object 4), which is not one of the fingerprints "
            "required; add that fingerprint if you trust its key"
        ]
        no_debris(work, "bad.sif")
        docker_recipe = f"Bootstrap: docker\nFrom: x/y\nFingerprints: {alice.fingerprint}\n"
        write(runner, work / "d.def", docker_recipe)
        docker = build(runner, work, "d.sif", "d.def")
        assert (docker.returncode, docker.stderr.splitlines()) == (2, [
            "rankwire: d.def line 3: Fingerprints: checks the signatures of a SIF base "
            "(Bootstrap: localimage or oras), not of a docker one; drop it, or build from a "
            "signed SIF"
        ])  # fmt: skip
    finally:
        for key in (alice, mallory):
            subprocess.run(["gpgconf", "--homedir", str(key.home), "--kill", "all"], check=False)
