"""What is kept per image: the partition's content digest and the extract cache it keys
(issue 13, defects 4 and 9a), and what a corrupt partition says (defect 8)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.images import make_world_readable
from harness.users import User
from rankwire.errors import UserError
from rankwire.runtime import sif_digest
from rankwire.runtime.imagefacts import image_facts, partition_digest

SUPERBLOCK = struct.Struct("<4sIIIIHHHHHHQQQQQQQQ")  # squashfs 4.0


@pytest.fixture
def cache(runner: User) -> Iterator[Path]:
    """An XDG_CACHE_HOME of the runner's own, so the test sees exactly what was kept."""
    d = Path(tempfile.mkdtemp(prefix="rankwire-cache-test-"))
    d.chmod(0o755)
    os.chown(d, runner.uid, runner.gid)
    yield d
    shutil.rmtree(d)  # as root: the image's read-only dirs are no obstacle


BLOCK = 128 << 10  # mksquashfs's block size, as rankwire build packs


def rw(runner: User, cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return runner.run(["env", f"XDG_CACHE_HOME={cache}", "rankwire", *args], cwd="/tmp")


def sandbox(cache: Path) -> list[str]:
    d = cache / "rankwire" / "sandbox"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def build(out: Path, rootfs: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from rankwire.runtime.build import build_image

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    build_image(out, rootfs)
    out.chmod(0o644)
    return out


@pytest.fixture
def twins(
    shared_dir: Path, base_image: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Path, Path]]:
    """Two images alike in every name, size, mode and time: only a file's bytes differ
    (copies of `base_image`'s rootfs). The file is one whole block of random bytes after
    its line: incompressible, so mksquashfs stores it as it is in both, and no compressor
    makes the two differ in a recorded size (a short file shares a fragment block with
    others, whose compressed size may depend on its letters). Both are built from the
    same path, which the image's definition file and labels record (in a fragment)."""
    work = Path(tempfile.mkdtemp(prefix="twins-", dir=shared_dir))
    work.chmod(0o755)
    images = []
    pad = os.urandom(BLOCK - 5)
    rootfs = work / "rootfs"
    for name, text in (("a", "AAAA\n"), ("b", "BBBB\n")):
        shutil.rmtree(rootfs, ignore_errors=True)
        shutil.copytree(shared_dir / "base-rootfs", rootfs, symlinks=True)
        (rootfs / "opt").mkdir(exist_ok=True)
        (rootfs / "opt" / "msg").write_bytes(text.encode() + pad)
        for path in (rootfs / "opt" / "msg", rootfs / "opt", rootfs):  # the root's too:
            os.utime(path, (1700000000, 1700000000))  # making opt changed it, to the second
        images.append(build(work / f"{name}.sif", rootfs, monkeypatch))
    yield images[0], images[1]
    shutil.rmtree(work)


@pytest.mark.usefixtures("nothing_left_behind")
def test_extract_cache_keys_on_content(runner: User, cache: Path, twins: tuple[Path, Path]) -> None:
    a, b = twins
    assert image_facts(str(a)).digest == image_facts(str(b)).digest  # metadata alike
    first_line = 'read -r line < /opt/msg; echo "$line"'
    for image, text in ((a, "AAAA\n"), (b, "BBBB\n"), (a, "AAAA\n")):
        proc = rw(runner, cache, "exec", "--unsquash", str(image), "sh", "-c", first_line)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, text, "")
    keys = {digest_of(i, cache / "rankwire").split(":")[1][:32] for i in twins}
    assert sandbox(cache) == sorted(keys) and len(keys) == 2


def test_partition_digest_is_read_once_per_version_of_the_file(
    tmp_path: Path, base_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "img.sif"
    shutil.copy2(base_image, image)
    facts = image_facts(str(image))
    data = image.read_bytes()[facts.partition_offset :][: facts.partition_size]
    want = f"sha256:{hashlib.sha256(data).hexdigest()}"
    assert digest_of(image, tmp_path / "c") == want
    (kept,) = (tmp_path / "c" / "digests").iterdir()
    assert kept.read_text() == want + "\n"
    st = image.stat()
    stat_key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    place = (facts.partition_offset, facts.partition_size)
    assert kept.name == "-".join(str(v) for v in (*stat_key, *place))

    def unread(*args: object) -> str:
        raise AssertionError("read again")

    monkeypatch.setattr(sif_digest, "partition_digest", unread)
    assert digest_of(image, tmp_path / "c") == want
    monkeypatch.undo()
    # Rewritten in place, same size, same mtime: the ctime tells.
    with open(image, "r+b") as f:
        f.seek(facts.partition_offset + 200)
        f.write(b"\xa5")
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = digest_of(image, tmp_path / "c")
    assert changed != want and len(list((tmp_path / "c" / "digests").iterdir())) == 2


def digest_of(image: Path, cache_dir: Path) -> str:
    facts = image_facts(str(image))
    return partition_digest(
        facts.path, facts.partition_offset, facts.partition_size, str(cache_dir)
    )


def corrupt(image: Path, out: Path, where: str) -> Path:
    """A copy of `image` with 64 bytes of its partition overwritten: in the middle of the
    file data ("data"), the inode table ("inodes") or the directory table ("dirs")."""
    facts = image_facts(str(image))
    data = bytearray(image.read_bytes())
    off = facts.partition_offset
    sb = SUPERBLOCK.unpack_from(data, off)
    inode_table, dir_table = sb[15], sb[16]
    at = {
        "data": 96 + (inode_table - 96) // 2,
        "inodes": (inode_table + dir_table) // 2,
        "dirs": dir_table + 2,
    }[where]
    data[off + at : off + at + 64] = b"\xa5" * 64
    out.write_bytes(bytes(data))
    out.chmod(0o644)
    return out


@pytest.fixture(scope="module")
def gzip_image(shared_dir: Path, base_image: Path) -> Path:
    """`base_image`'s rootfs packed with gzip, whose blocks carry a checksum (zlib's
    adler32): 64 bytes overwritten anywhere are found when read. lz4's and zstd's blocks,
    as mksquashfs writes them, have none (a flipped byte in file data may unpack to other
    bytes: images are checked by their digests and signatures, not by squashfs)."""
    from rankwire.runtime.build import build_image

    out = shared_dir / "base-gzip.sif"
    if not out.exists():
        build_image(out, shared_dir / "base-rootfs", compression="gzip")
        make_world_readable(shared_dir)
    return out


@pytest.fixture
def scratch(shared_dir: Path) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="corrupt-", dir=shared_dir))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


@pytest.mark.usefixtures("nothing_left_behind")
@pytest.mark.parametrize(
    ("where", "cause"),
    [
        ("dirs", r"dir_scan: failed to read directory squashfs-root"),
        ("inodes", r"read_inode: failed to read inode [0-9]+:[0-9]+"),
    ],
)
@pytest.mark.parametrize("how", [[], ["--unsquash"]])
def test_a_corrupt_partition_says_so(
    runner: User,
    cache: Path,
    gzip_image: Path,
    scratch: Path,
    where: str,
    cause: str,
    how: list[str],
) -> None:
    bad = corrupt(gzip_image, scratch / "bad.sif", where)
    proc = rw(runner, cache, "exec", *how, str(bad), "ls", "/")
    assert (proc.returncode, proc.stdout) == (2, "")
    message = re.escape(f"rankwire: {bad}: the image's squashfs partition is corrupt (")
    message += cause + re.escape("): rebuild or re-pull it\n")
    assert re.fullmatch(message, proc.stderr), proc.stderr
    assert sandbox(cache) == []
    with pytest.raises(UserError):  # nothing kept: said again next time
        digest_of(bad, cache / "rankwire")


@pytest.mark.usefixtures("nothing_left_behind")
def test_a_failed_extraction_leaves_nothing_in_the_cache(
    runner: User, cache: Path, gzip_image: Path, scratch: Path
) -> None:
    bad = corrupt(gzip_image, scratch / "bad-data.sif", "data")
    proc = rw(runner, cache, "exec", "--unsquash", str(bad), "true")
    assert proc.returncode == 2
    # Its tables are sound (the facts' check passes): found only when a file is unpacked.
    assert re.fullmatch(
        re.escape(
            f"rankwire: {bad}: the image's squashfs partition is corrupt (writer: failed to "
            "read/uncompress file "
        )
        + r"/[^ ]+"
        + re.escape("): rebuild or re-pull it\n"),
        proc.stderr,
    ), proc.stderr
    assert sandbox(cache) == []


@pytest.mark.usefixtures("nothing_left_behind")
def test_the_next_extraction_prunes_temporary_dirs_whose_owner_is_gone(
    runner: User, cache: Path, base_image: Path
) -> None:
    box = cache / "rankwire" / "sandbox"
    box.mkdir(parents=True)
    orphan, busy = box / ".extracting-x-orphan", box / ".extracting-y-busy"
    for d in (orphan / "rootfs" / "ro", busy):
        d.mkdir(parents=True)
    (orphan / "rootfs" / "ro" / "f").write_text("x")
    (orphan / "rootfs" / "ro").chmod(0o555)  # as the image's own dirs may be
    for p in (box.parent, box, *orphan.rglob("*"), orphan, busy):
        os.chown(p, runner.uid, runner.gid, follow_symlinks=False)
    lock = os.open(busy, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # its extraction is under way
    try:
        proc = rw(runner, cache, "exec", "--unsquash", str(base_image), "true")
    finally:
        os.close(lock)
    assert (proc.returncode, proc.stderr) == (0, "")
    (key,) = [n for n in sandbox(cache) if not n.startswith(".")]
    assert sandbox(cache) == [".extracting-y-busy", key]


@pytest.fixture
def broken_fuse() -> Iterator[Path]:
    """A PATH dir whose squashfuse_ll and squashfuse fail as they do without a FUSE
    device: FUSE is tried and fails at container start (the host facts cannot tell)."""
    d = Path(tempfile.mkdtemp(prefix="broken-fuse-"))
    d.chmod(0o755)
    for name in ("squashfuse_ll", "squashfuse"):
        tool = d / name
        tool.write_text(
            "#!/bin/sh\necho \"fuse: device not found, try 'modprobe fuse' first\" >&2\nexit 1\n"
        )
        tool.chmod(0o755)
    yield d
    shutil.rmtree(d)


@pytest.mark.usefixtures("nothing_left_behind")
def test_fuse_failing_says_its_cause_and_an_asked_extraction_says_nothing(
    runner: User, cache: Path, base_image: Path, broken_fuse: Path
) -> None:
    # The user's own rankwire first if it has one (a checkout under /root is out of its
    # reach), then the broken FUSE drivers.
    path = os.pathsep.join([str(broken_fuse), *filter(None, [runner.bindir]), os.environ["PATH"]])
    env = ["env", f"PATH={path}", f"XDG_CACHE_HOME={cache}"]
    proc = runner.run([*env, "rankwire", "exec", str(base_image), "true"], cwd="/tmp")
    key = digest_of(base_image, cache / "rankwire")[7:39]
    why = "fuse: device not found, try 'modprobe fuse' first"
    assert (proc.returncode, proc.stderr) == (
        0,
        f"rankwire: FUSE is unusable here (squashfuse_ll: squashfuse_ll exited: {why}; "
        f"squashfuse: squashfuse exited: {why}); using the image extracted under "
        f"{cache}/rankwire/sandbox/{key}\n",
    )
    asked = [*env, "rankwire", "exec", "--unsquash", str(base_image), "true"]
    proc = runner.run(asked, cwd="/tmp")
    assert (proc.returncode, proc.stderr) == (0, "")
