"""Root mode of the holder: a container (mount namespace only, image on a loop device) the
unprivileged user who enters it cannot change. Root only."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.users import User
from rankwire.errors import UserError
from rankwire.runtime import instance, loopdev
from rankwire.runtime import syscalls as sc
from rankwire.runtime.plan import ContainerPlan, Mount, within

pytestmark = [
    pytest.mark.skipif(os.getuid() != 0, reason="root mode needs root"),
    pytest.mark.usefixtures("nothing_left_behind"),
]

PATH = "/usr/local/bin:/usr/bin:/bin"


def planned(image: Path, extra: tuple[Mount, ...] = (), enforcing: bool = True) -> ContainerPlan:
    """The real planner's container for `image` with `extra` mounts; `enforcing`: what
    the plugin makes of it for a root holder."""
    from rankwire.runtime.assemble import plan_image
    from rankwire.runtime.facts import gather
    from rankwire.runtime.plan import ExecOptions

    opts = ExecOptions(fabric="none")
    container = plan_image(gather(str(image), opts), opts, None).container
    container = dataclasses.replace(container, mounts=(*container.mounts, *extra))
    if not enforcing:
        return container
    return dataclasses.replace(container, namespaces=("mount",), image_drivers=("loop",))


def as_user(
    user: User | None,
    fn: Callable[[], str],
    mntns: int | None = None,
    userns: int | None = None,
) -> str:
    """`fn()` in a forked child that `setns`es into `userns` and `mntns` (if given) and
    becomes `user` (None: stays root; no no_new_privs: nosuid alone must defuse setuid
    files); what it returns, or the exception it raised."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            if userns is not None:
                sc.setns(userns, sc.CLONE_NEWUSER)
            if mntns is not None:
                sc.setns(mntns, sc.CLONE_NEWNS)
                os.chdir("/")
            if user is not None:
                os.setgroups([])
                os.setresgid(user.gid, user.gid, user.gid)
                os.setresuid(user.uid, user.uid, user.uid)
            out = fn()
        except BaseException as err:
            out = f"raised {err}"
        os.write(write_end, out.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


def run(*argv: str) -> Callable[[], str]:
    def call() -> str:
        proc = subprocess.run(argv, capture_output=True, text=True, env={"PATH": PATH})
        return f"{proc.returncode}\n{proc.stdout}{proc.stderr}"

    return call


def mount_table() -> str:
    """Mount point and per-mount options of every mount, as the container sees them."""
    with open("/proc/self/mountinfo") as f:
        return "".join(f"{fields[4]} {fields[5]}\n" for fields in map(str.split, f))


def attached(image: Path) -> str:
    return subprocess.run(
        ["losetup", "-j", str(image)], capture_output=True, text=True, check=True
    ).stdout


@pytest.fixture
def host_dir(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A host dir with a marker and a setuid-root `id`, and an O_PATH descriptor of it."""
    d = tmp_path / "hostdir"
    d.mkdir()
    d.chmod(0o755)
    (d / "marker").write_text("from the descriptor\n")
    shutil.copy2("/usr/bin/id", d / "id-suid")
    (d / "id-suid").chmod(0o4755)
    fd = os.open(d, os.O_PATH | os.O_DIRECTORY)
    try:
        yield d, fd
    finally:
        os.close(fd)


@pytest.mark.parametrize("setattr", ["mount_setattr", "remount"])
def test_root_mode_container_cannot_be_changed_by_its_user(
    base_image: Path,
    unprivileged_user: User,
    host_dir: tuple[Path, int],
    setattr: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`remount`: mount flags as on a kernel before 5.12 (no mount_setattr)."""
    if setattr == "remount":

        def enosys(target: str, attr_set: int, *, recursive: bool) -> None:
            raise OSError(errno.ENOSYS, "mount_setattr")

        monkeypatch.setattr(sc, "mount_setattr", enosys)
    user = unprivileged_user
    _, fd = host_dir
    plan = planned(base_image, (Mount("bind", "/hostdir", f"/proc/self/fd/{fd}", recursive=True),))
    holder = instance.start_holder(plan, mode="ephemeral", owner=os.getpid(), keep_fds=(fd,))
    sock = Path(holder.socket)
    session = sock.parent / f"s-{sock.name[len('e-') : -len('.sock')]}"
    try:
        assert holder.report["image_driver"] == "loop"
        assert holder.report["namespaces"] == ["mount"]
        device = holder.report["loop_device"]
        assert attached(base_image).startswith(f"{device}: ")
        # Only root can reach the socket.
        st = sock.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
        st = sock.parent.stat()
        assert (st.st_uid, st.st_mode & 0o077) == (0, 0)

        def connect() -> str:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(sock))
            return "connected"

        assert as_user(user, connect) == "raised [Errno 13] Permission denied"

        lease = instance.join(str(sock))
        try:
            ns = lease.mntns_fd
            # The image, and the bind from the descriptor where the plan put it.
            out = as_user(user, run("cat", "/etc/os-release", "/hostdir/marker"), ns)
            assert out.startswith("0\n") and 'NAME="rankwire-test-image"' in out, out
            assert out.endswith("from the descriptor\n")
            assert as_user(user, run("id", "-u"), ns) == f"0\n{user.uid}\n"

            # No mount, unmount or remount for the user.
            def tamper() -> str:
                results = []
                for attempt in (
                    lambda: sc.mount("none", "/tmp", "tmpfs"),
                    lambda: sc.umount2("/", sc.MNT_DETACH),
                    lambda: sc.mount(None, "/", None, sc.MS_REMOUNT | sc.MS_BIND),
                ):
                    try:
                        attempt()
                        results.append("done")
                    except OSError as err:
                        results.append(str(err))
                return "\n".join(results)

            assert as_user(user, tamper, ns).splitlines() == [
                "[Errno 1] mount none on /tmp: Operation not permitted",
                "[Errno 1] umount /: Operation not permitted",
                "[Errno 1] mount None on /: Operation not permitted",
            ]
            assert as_user(user, run("touch", "/new-file"), ns) == (
                "1\ntouch: cannot touch '/new-file': Read-only file system\n"
            )
            # Setuid-root files gain nothing, in the image or in a bound host dir.
            assert as_user(user, run("/usr/bin/id-suid", "-u"), ns) == f"0\n{user.uid}\n"
            assert as_user(user, run("/hostdir/id-suid", "-u"), ns) == f"0\n{user.uid}\n"
            assert "NoNewPrivs:\t0\n" in as_user(user, run("cat", "/proc/self/status"), ns)
            # Every mount (those below recursive binds too) is nosuid; nodev but under
            # /dev, where device nodes stay usable.
            table = dict(line.split() for line in as_user(user, mount_table, ns).splitlines())
            assert {"/", "/hostdir", "/proc", "/sys", "/dev", "/dev/pts", "/tmp"} <= set(table)
            assert "ro" in table["/"].split(",")
            for point, options in table.items():
                flags = set(options.split(","))
                want = {"nosuid"} if within(point, "/dev") else {"nosuid", "nodev"}
                assert want <= flags, (point, options)
            assert "nodev" not in table["/dev"].split(",")
            assert as_user(user, run("cat", "/dev/null"), ns) == "0\n"
        finally:
            lease.close()
    finally:
        holder.wait()
    # The autocleared loop device, the session dir and the socket are gone.
    deadline = time.monotonic() + 2
    while attached(base_image) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert attached(base_image) == ""
    assert not sock.exists() and not session.exists()
    with open("/proc/self/mountinfo") as f:
        assert [line for line in f if str(session) in line or device in line] == []


def read(path: str) -> Callable[[], str]:
    def call() -> str:
        with open(path) as f:
            return f.read()

    return call


@pytest.mark.parametrize(
    "namespaces", [("mount",), ("user", "mount", "pid")], ids=["root", "userns"]
)
def test_descriptor_bind_is_the_opened_dir_wherever_it_went(
    base_image: Path, host_dir: tuple[Path, int], namespaces: tuple[str, ...]
) -> None:
    """A dir renamed after it was opened, a symlink in its place: the bind is still the
    opened dir (root mode clones the descriptor's mount before `unshare`; a user
    namespace looks its path up again in its copy of the mounts)."""
    path, fd = host_dir
    path.rename(path.with_name("moved"))
    path.symlink_to("/etc")
    bind = Mount("bind", "/hostdir", f"/proc/self/fd/{fd}", recursive=True)
    plan = planned(base_image, (bind,), enforcing=namespaces == ("mount",))
    assert plan.namespaces == namespaces
    holder = instance.start_holder(plan, mode="ephemeral", owner=os.getpid(), keep_fds=(fd,))
    try:
        with instance.leased(holder.socket) as lease:
            userns = lease.userns_fd if "user" in namespaces else None
            got = as_user(None, read("/hostdir/marker"), lease.mntns_fd, userns)
            assert got == "from the descriptor\n"
    finally:
        holder.wait()


def test_descriptor_bind_refused_when_its_path_is_another_dir_in_a_userns(
    base_image: Path, host_dir: tuple[Path, int]
) -> None:
    """A user namespace cannot bind the descriptor's own mount: when its path now leads
    elsewhere (mounted over, here), the holder refuses."""
    path, fd = host_dir
    plan = planned(
        base_image,
        (Mount("bind", "/hostdir", f"/proc/self/fd/{fd}", recursive=True),),
        enforcing=False,
    )
    sc.mount("tmpfs", str(path), "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "size=1m")
    try:
        with pytest.raises(UserError) as err:
            instance.start_holder(plan, mode="ephemeral", owner=os.getpid(), keep_fds=(fd,))
    finally:
        sc.umount2(str(path))
    assert str(err.value) == (
        f"cannot start container from {plan.image}: cannot mount /proc/self/fd/{fd} "
        f"on /hostdir: {path} is no longer the file that was opened"
    )


def test_loop_driver_needs_root_mode(base_image: Path) -> None:
    plan = dataclasses.replace(planned(base_image), namespaces=("user", "mount"))
    with pytest.raises(UserError) as err:
        instance.start_holder(plan, mode="ephemeral", owner=os.getpid())
    assert str(err.value) == (
        f"cannot start container from {plan.image}: cannot open the image: "
        "loop: needs a holder run by root without a user namespace"
    )


def _sysfs(device: str, name: str) -> str:
    return Path(f"/sys/block/{os.path.basename(device)}/{name}").read_text().strip()


@pytest.mark.parametrize("configure", [True, False], ids=["LOOP_CONFIGURE", "LOOP_SET_FD"])
def test_loop_attach_read_only_range_autoclears(
    base_image: Path, configure: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rankwire.runtime.imagefacts import image_facts

    if not configure:  # an ioctl the kernel does not know: what a pre-5.8 kernel says
        monkeypatch.setattr(loopdev, "LOOP_CONFIGURE", 0x4CFF)
    facts = image_facts(str(base_image))
    image_fd = os.open(base_image, os.O_RDONLY)
    try:
        device, loop_fd = loopdev.attach(
            image_fd, offset=facts.partition_offset, sizelimit=facts.partition_size
        )
    finally:
        os.close(image_fd)
    try:
        assert _sysfs(device, "loop/backing_file") == str(base_image)
        assert _sysfs(device, "loop/offset") == str(facts.partition_offset)
        assert _sysfs(device, "loop/sizelimit") == str(facts.partition_size)
        assert _sysfs(device, "loop/autoclear") == "1"
        assert _sysfs(device, "ro") == "1"
        assert int(_sysfs(device, "size")) * 512 == facts.partition_size
    finally:
        os.close(loop_fd)
    deadline = time.monotonic() + 2
    while attached(base_image) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert attached(base_image) == ""


def test_attach_reports_which_device_failed(tmp_path: Path) -> None:
    empty = tmp_path / "dir"
    empty.mkdir()
    fd = os.open(empty, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as err:
            loopdev.attach(fd, offset=0, sizelimit=0)
    finally:
        os.close(fd)
    assert err.value.errno == errno.EINVAL
    assert str(err.value).startswith("[Errno 22] attaching /dev/loop")
    assert str(err.value).endswith(": Invalid argument")
