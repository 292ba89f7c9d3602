"""--save OUT.sif: pack a running container's current state into a new SIF.

How: the image's partition is unpacked (unsquashfs, as the user: it reads the SIF itself,
so files the user could not read through the container are packed too), the overlay's
upper dir (DIR/upper of --writable-overlay, else the holder's tmpfs one, handed over as a
descriptor: `upper` on its socket) is laid over it by the
overlay's rules (a 0:0 character device or `.wh.NAME` removes NAME; a directory marked
opaque, `user.overlay.opaque` and the like, or holding `.wh..wh..opq`, hides what the
image had there; anything else replaces the image's), and the result is packed by
`runtime/build` (its plan; the image's env, runscript and labels carried over, the origin
added as labels). The kernel's own merge (the container's root) is not read: files of the
image owned by root and closed to others are unreadable there, and the root holds the
binds (host home, /proc, ...).

Atomic and leaving nothing: everything is made in one scratch dir beside OUT (same
filesystem: the finished SIF is renamed over OUT), locked by us and by the unpacking and
packing programs (they inherit the lock, and die with us). A guard process of its own
session waits for that lock and removes the scratch dir once we are all gone: a killed
save leaves the old OUT as it was and, a moment later, no scratch dir.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import shutil
import signal
import socket
import stat
import subprocess
from pathlib import Path
from typing import NoReturn

from rankwire import lockdirs
from rankwire.errors import UserError, shown
from rankwire.fds import close_fds_except
from rankwire.runtime import syscalls as sc
from rankwire.runtime.plan import ContainerPlan

SCRATCH = ".rankwire-save-"  # OUT's dir: .rankwire-save-<OUT name>-XXXX
OPAQUE_XATTRS = ("user.overlay.opaque", "trusted.overlay.opaque", "user.fuseoverlayfs.opaque")
WHITEOUT = ".wh."
OPAQUE_FILE = ".wh..wh..opq"
# Labels of the origin (beside the build labels: org.label-schema.build-date, ...).
LABEL_FROM = "org.rankwire.saved-from"
LABEL_IDENTITY = "org.rankwire.saved-from.identity"
LABEL_DATE = "org.rankwire.saved-at"
BUILD_LABELS = ("org.label-schema.", "org.opencontainers.image.")


def check_target(out: str) -> None:
    """Before the command runs: OUT can be written (its dir exists and is ours to write)."""
    parent = os.path.dirname(out)
    if os.path.isdir(out):
        raise UserError(f"--save {out} is a directory: give the path of the .sif file to write")
    if not os.path.isdir(parent):
        raise UserError(f"--save {out}: directory {parent} does not exist; create it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--save {out}: cannot write to {parent}; choose a writable directory")


def upper_fd(sock_path: str, overlay_dir: str = "") -> int:
    """The container's upper dir: in --writable-overlay DIR, opened here (on the host's
    mount of it, so that its files can be linked, not copied, beside OUT); else (a tmpfs
    of the holder's) as a descriptor from its holder."""
    if overlay_dir:
        try:
            return os.open(os.path.join(overlay_dir, "upper"), os.O_RDONLY | os.O_DIRECTORY)
        except OSError as err:
            raise UserError(f"--save: cannot read {overlay_dir}: {err.strerror}") from None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(10)
        conn.connect(sock_path)
        conn.sendall(b"upper\n")
        _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
    except OSError as err:
        raise UserError(
            f"--save: cannot reach the container's holder ({err.strerror or err})"
        ) from None
    finally:
        conn.close()
    if not fds:
        raise UserError("--save: the container keeps no changes to save (started without --save)")
    return fds[0]


def _die_with_parent() -> None:
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)


def _tool(argv: list[str], lock: int) -> subprocess.CompletedProcess[str]:
    """Run a packing tool that holds our lock and dies with us."""
    return subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        pass_fds=(lock,),
        preexec_fn=_die_with_parent,
    )


def _run(argv: list[str], lock: int, what: str) -> str:
    """`_tool`, its failure said: its output."""
    proc = _tool(argv, lock)
    lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    if proc.returncode != 0:
        detail = "; ".join(lines[-2:]) or f"exit status {proc.returncode}"
        raise UserError(f"--save: {what} failed: {shown(detail)}")
    return "\n".join(lines)


def _guard(scratch: str) -> int:
    """Fork the guard: in a session of its own (a signal to our process group spares
    it), it waits for the scratch dir's lock, free once we and our tools are gone, and
    removes the dir (already gone after a save that ended normally)."""
    pid = os.fork()
    if pid:
        return pid
    try:
        os.setsid()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_IGN)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        close_fds_except(())  # our copy of the lock included: ours is a new one
        fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        _remove_tree(scratch)
    except BaseException:
        pass
    _exit_now()


def _exit_now() -> NoReturn:
    os._exit(0)


def _remove_tree(path: str) -> None:
    from rankwire.runtime.holder import _remove_tree as remove

    remove(path)


def _opaque(path: str, names: list[str]) -> bool:
    if OPAQUE_FILE in names:
        return True
    for attr in OPAQUE_XATTRS:
        with contextlib.suppress(OSError):
            if os.getxattr(path, attr, follow_symlinks=False) in (b"y", b"x"):
                return True
    return False


def _whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _clear(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        _remove_tree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _copy_file(src: str, dst: str, st: os.stat_result) -> None:
    try:
        os.link(src, dst)  # same filesystem (DIR beside OUT): no copy
    except OSError:
        shutil.copyfile(src, dst, follow_symlinks=False)
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def merge_upper(upper: str, rootfs: str) -> None:
    """Lay the overlay's upper dir over the unpacked image, by the overlay's rules. The
    image's read-only dirs (RHEL's 0555 /usr/bin) are made writable while they are filled;
    each gets the container's mode back at the end."""
    dirs: list[tuple[str, os.stat_result]] = [(rootfs, os.lstat(rootfs))]
    for top, subdirs, files in os.walk(upper):
        rel = os.path.relpath(top, upper)
        dest_dir = rootfs if rel == "." else os.path.join(rootfs, rel)
        if not os.access(dest_dir, os.W_OK | os.X_OK):
            os.chmod(dest_dir, stat.S_IMODE(os.lstat(dest_dir).st_mode) | 0o700)
        names = subdirs + files
        if rel != "." and _opaque(top, names):
            for entry in os.listdir(dest_dir):
                _clear(os.path.join(dest_dir, entry))
        for name in names:
            src, dst = os.path.join(top, name), os.path.join(dest_dir, name)
            st = os.lstat(src)
            if name == OPAQUE_FILE:
                continue
            if name.startswith(WHITEOUT):
                _clear(os.path.join(dest_dir, name[len(WHITEOUT) :]))
                continue
            if _whiteout(st):
                _clear(dst)
                continue
            if stat.S_ISDIR(st.st_mode):
                if not os.path.isdir(dst) or os.path.islink(dst):
                    _clear(dst)
                    os.mkdir(dst, 0o700)
                dirs.append((dst, st))
                continue
            _clear(dst)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(src), dst)
            elif stat.S_ISREG(st.st_mode):
                _copy_file(src, dst, st)
            elif stat.S_ISFIFO(st.st_mode):
                os.mkfifo(dst, stat.S_IMODE(st.st_mode))
            # sockets and device nodes made inside cannot be packed as the user: skipped
    for dst, st in reversed(dirs):  # modes last: a read-only dir was still filled
        os.chmod(dst, stat.S_IMODE(st.st_mode))
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def _origin_labels(image: str, identity: str) -> dict[str, str]:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {LABEL_FROM: image, LABEL_IDENTITY: identity, LABEL_DATE: now}


def save_container(plan: ContainerPlan, sock_path: str) -> None:
    """--save: pack the container served at `sock_path` (still running) into `plan.save`."""
    upper = upper_fd(sock_path, plan.overlay_dir)
    try:
        save(plan.image, plan.partition_offset, upper, plan.save)
    finally:
        os.close(upper)


def save(image_path: str, offset: int, upper: int, out: str) -> None:
    """Pack the image at `image_path` (its partition at `offset`) with the changes in the
    upper dir open on `upper` into a new SIF at `out`."""
    from rankwire.runtime import build
    from rankwire.runtime.imagemeta import (
        COMPRESSIONS,
        OCI_CONFIG_NAME,
        read_image_metadata,
        squashfs_compression,
    )
    from rankwire.runtime.sif_format import DataType, SifError
    from rankwire.runtime.sif_read import SifImage
    from rankwire.runtime.sif_write import create_sif

    check_target(out)
    try:
        with SifImage.open(image_path) as image:
            meta = read_image_metadata(image)
            compression = squashfs_compression(image)  # kept, when build can write it
            oci = image.find(DataType.GENERIC_JSON, OCI_CONFIG_NAME)
            oci_config = image.read(oci) if oci is not None else None  # its WorkingDir
    except (OSError, SifError) as err:
        raise UserError(f"--save: cannot read {image_path}: {shown(err)}") from None
    parent, name = os.path.split(out)
    prefix = f"{SCRATCH}{name}-"
    lockdirs.prune(parent, prefix, _remove_tree)
    scratch, lock = lockdirs.claim(parent, prefix)
    guard = _guard(scratch)
    try:
        rootfs = os.path.join(scratch, "rootfs")
        _run(
            [
                "unsquashfs",
                "-q",
                "-n",
                "-no-xattrs",
                "-o",
                str(offset),
                "-d",
                rootfs,
                image_path,
            ],
            lock,
            f"unpacking {image_path}",
        )
        merge_upper(f"/proc/self/fd/{upper}", rootfs)
        deffile = Path(scratch, "origin.def")
        deffile.write_text(f"Bootstrap: localimage\nFrom: {image_path}\n")
        # The source's own labels; its build labels are the new build's to write.
        kept = {k: v for k, v in meta.labels.items() if not k.startswith(BUILD_LABELS)}
        labels = {**kept, **_origin_labels(image_path, meta.identity)}
        bplan = build.plan_build(
            Path(scratch, "image.sif"),
            rootfs,
            deffile=deffile,
            labels=labels,
            env=meta.env,
            runscript=meta.runscript,
            oci_config=oci_config,
            prefer=compression if compression in COMPRESSIONS else None,
        )
        work = Path(scratch, "work")
        work.mkdir()
        build.stage(bplan, work)

        def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
            return _tool(argv, lock)

        def pack(sif: Path, offset: int) -> int:  # straight into the SIF, as build does
            said = build.pack(bplan, work, sif, offset, "--save: mksquashfs failed", run)
            unread = [ln for ln in said if build.UNREADABLE.search(ln)]
            if unread:
                raise UserError(f"--save: mksquashfs could not read {shown(unread[0])}")
            return sif.stat().st_size - offset

        create_sif(bplan.out, bplan.sif_objects(pack), deterministic=bplan.deterministic)
        os.replace(bplan.out, out)
    except OSError as err:
        raise UserError(f"--save {out}: {shown(err)}") from None
    finally:
        _remove_tree(scratch)
        os.close(lock)  # the guard finds nothing left and exits
        os.waitpid(guard, 0)
