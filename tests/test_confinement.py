"""Confinement (issue 13): what a container must not let its user do, tried for real.

The image (built once by `rankwire build`'s code path) carries the attempts: setuid-root
copies of `id` and `cat`, a symlink /opt/x -> /etc, a character device node (1,3, as
/dev/null), and /etc/image-marker (the host's /etc has none: it tells the two apart).
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.images import make_rootfs, make_world_readable
from harness.leftovers import user_leftovers
from harness.users import User, rw


@pytest.fixture(autouse=True)
def nothing_running_after(unprivileged_user: User) -> Iterator[None]:
    """No process or mount of ours after a test. (Runtime files are left to
    test_faults.py, which tells its own from those of other sessions on a shared host.)"""
    yield
    users = [unprivileged_user, *([User("root", 0, 0, "/root")] if os.getuid() == 0 else [])]

    def left() -> list[str]:
        return [x for u in users for x in user_leftovers(u) if not x.startswith("file ")]

    deadline = time.monotonic() + 5
    while left() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left() == []


PY = "/usr/bin/python3"  # Debian's, for the other user (our venv may be out of its reach)


@pytest.fixture(scope="module")
def rootfs(shared_dir: Path) -> Path:
    root = make_rootfs(
        shared_dir / "confine-rootfs", files={"/etc/image-marker": "the image's /etc\n"}
    )
    (root / "opt").mkdir(exist_ok=True)
    for name, src in (("suid-id", "/usr/bin/id"), ("suid-cat", "/bin/cat")):
        shutil.copy2(src, root / "opt" / name)
        (root / "opt" / name).chmod(0o4755)
    (root / "opt" / "x").symlink_to("/etc")
    if os.getuid() == 0:
        os.mknod(root / "opt" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return root


@pytest.fixture(scope="module")
def image(shared_dir: Path, rootfs: Path) -> Path:
    from rankwire.runtime.build import build_image

    out = shared_dir / "confine.sif"
    build_image(out, rootfs)
    make_world_readable(shared_dir)
    return out


def listing(image: Path) -> dict[str, str]:
    """{path in the image: `ls -l` mode string}, read from the squashfs partition itself."""
    offset = image.read_bytes().find(b"hsqs")  # the squashfs superblock's magic
    out = subprocess.run(
        ["unsquashfs", "-lls", "-o", str(offset), "-d", "", str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    modes = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[-1].startswith("/"):
            path = fields[-1] if "->" not in fields else fields[-3]
            modes[path] = fields[0]
    return modes


# -- setuid ----------------------------------------------------------------------------
def test_build_keeps_setuid_bits_and_device_nodes(image: Path) -> None:
    """The attempts below are real only if the image really holds them."""
    modes = listing(image)
    assert modes["/opt/suid-id"] == "-rwsr-xr-x", modes.get("/opt/suid-id")
    assert modes["/opt/suid-cat"] == "-rwsr-xr-x"
    assert modes["/opt/x"].startswith("l")
    if os.getuid() == 0:
        assert modes["/opt/null"].startswith("c"), modes.get("/opt/null")


def test_setuid_root_binary_gains_nothing(image: Path, runner: User) -> None:
    script = "/opt/suid-id; /opt/suid-cat /proc/self/status"
    proc = rw(runner, "exec", str(image), "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]  # no passwd in the image: ids only
    assert first.split()[0] == f"uid={runner.uid}" and "euid=" not in first, first
    uids = next(line for line in proc.stdout.splitlines() if line.startswith("Uid:"))
    assert uids.split()[1:] == [str(runner.uid)] * 4, uids


# -- host paths that are not bound -----------------------------------------------------
@pytest.fixture
def host_dir() -> Iterator[Path]:
    """A host dir outside every default bind, which the user may write on the host."""
    d = Path("/srv") / f"rankwire-confine-{os.urandom(4).hex()}"
    d.mkdir(parents=True)
    d.chmod(0o777)
    (d / "secret").write_text("host secret\n")
    (d / "secret").chmod(0o666)
    yield d
    shutil.rmtree(d)


def test_host_path_not_bound_is_neither_visible_nor_writable(
    image: Path, runner: User, host_dir: Path
) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root (a dir under /srv)")
    proc = rw(
        runner,
        "exec",
        str(image),
        "sh",
        "-c",
        f"cat {host_dir}/secret; echo planted > {host_dir}/secret; "
        f"mkdir -p {host_dir} && echo planted > {host_dir}/new; echo done",
    )
    assert proc.returncode == 0, proc.stderr
    assert "host secret" not in proc.stdout
    assert f"cat: {host_dir}/secret: No such file or directory" in proc.stderr, proc.stderr
    assert proc.stdout.splitlines()[-1] == "done"
    # what the container wrote went to its own (throwaway) upper layer
    assert (host_dir / "secret").read_text() == "host secret\n"
    assert sorted(p.name for p in host_dir.iterdir()) == ["secret"]


def test_image_etc_is_read_only_and_not_the_hosts(image: Path, runner: User) -> None:
    name = f"rankwire-confine-{os.urandom(4).hex()}"
    proc = rw(runner, "exec", str(image), "sh", "-c", f"echo x > /etc/{name}")
    assert proc.returncode == 2
    assert proc.stderr == f"sh: 1: cannot create /etc/{name}: Read-only file system\n"
    assert not Path("/etc", name).exists()


# -- symlinks in the image -------------------------------------------------------------
def test_bind_through_an_image_symlink_lands_inside(
    image: Path, runner: User, shared_dir: Path
) -> None:
    """/opt/x -> /etc in the image: `-B SRC:/opt/x/evil` binds onto the image's /etc/evil
    (made in the container's upper layer), never the host's /etc/evil."""
    src = shared_dir / f"confine-src-{os.urandom(4).hex()}"
    src.mkdir(mode=0o777)
    src.chmod(0o777)
    evil = Path("/etc/evil")
    assert not evil.exists()
    try:
        proc = rw(
            runner,
            "exec",
            "-B",
            f"{src}:/opt/x/evil",
            str(image),
            "sh",
            "-c",
            "echo through > /opt/x/evil/file; cat /etc/evil/file; cat /opt/x/image-marker",
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "through\nthe image's /etc\n"
        assert not evil.exists(), "the bind landed on the host's /etc"
        assert (src / "file").read_text() == "through\n"  # and the bind itself works
    finally:
        shutil.rmtree(src)


def test_pwd_through_an_image_symlink_lands_inside(image: Path, runner: User) -> None:
    proc = rw(runner, "exec", "--pwd", "/opt/x", str(image), "sh", "-c", "pwd -P; cat image-marker")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "/etc\nthe image's /etc\n"


# -- device nodes ------------------------------------------------------------------------
def test_device_node_in_the_image_is_unusable(image: Path, runner: User) -> None:
    if os.getuid() != 0:
        pytest.skip("making the device node needs root")
    proc = rw(
        runner,
        "exec",
        str(image),
        "sh",
        "-c",
        "stat -c %F /opt/null; cat /opt/null && echo read; echo x > /opt/null && echo wrote",
    )
    assert proc.stdout.splitlines() == ["character special file"], proc.stdout
    assert "cat: /opt/null: Permission denied" in proc.stderr, proc.stderr
    assert "sh: 1: cannot create /opt/null: Permission denied" in proc.stderr, proc.stderr


# -- another user's container -----------------------------------------------------------
@pytest.fixture
def root_holder(base_image: Path) -> Iterator[tuple[int, Path]]:
    """A container of root's, running: (its holder's pid, its socket)."""
    if os.getuid() != 0:
        pytest.skip("needs root")
    proc = subprocess.Popen(
        ["rankwire", "exec", str(base_image), "sleep", "60"],
        cwd="/tmp",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        holder, sock = 0, None
        deadline = time.monotonic() + 20
        while (sock is None or not sock.exists()) and time.monotonic() < deadline:
            holder, sock = _holder_of(proc.pid)
            time.sleep(0.05)
        assert sock is not None, "root's container did not start"
        yield holder, sock
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def _holder_of(pid: int) -> tuple[int, Path | None]:
    """The holder `rankwire exec` (pid) forked, and the socket it listens on."""
    bound = {}
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8:
            bound[fields[6]] = fields[7]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() != "rankwire-holder":
                continue
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != pid:
                continue
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in bound:
                    path = Path(bound[target[8:-1]])  # bound as t-<pid>-NAME, then renamed
                    name = path.name.split("-", 2)[2] if path.name.startswith("t-") else ""
                    return int(proc.name), path.with_name(name) if name else path
        except (OSError, ValueError):
            continue
    return 0, None


ATTACK = r"""
import os, signal, socket, sys
holder, sock = int(sys.argv[1]), sys.argv[2]
s = socket.socket(socket.AF_UNIX)
for what, act in (
    ("connect", lambda: s.connect(sock)),
    ("list", lambda: os.listdir(os.path.dirname(sock))),
    ("signal", lambda: os.kill(holder, signal.SIGKILL)),
    ("stop", lambda: os.kill(holder, signal.SIGSTOP)),
):
    try:
        act()
        print(what, "ALLOWED")
    except OSError as err:
        print(what, type(err).__name__)
"""


def test_user_cannot_join_list_or_signal_roots_holder(
    root_holder: tuple[int, Path], unprivileged_user: User
) -> None:
    holder, sock = root_holder
    proc = unprivileged_user.run([PY, "-c", ATTACK, str(holder), str(sock)])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "connect PermissionError",
        "list PermissionError",
        "signal PermissionError",
        "stop PermissionError",
    ]
    assert Path(f"/proc/{holder}").exists()  # and it still serves
    s = __import__("socket").socket(__import__("socket").AF_UNIX)
    try:
        s.connect(str(sock))
    finally:
        s.close()
