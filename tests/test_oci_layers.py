"""`oci_layers.apply_layers`: OCI/Docker layer tars applied to a rootfs, safely.

Layers are made here with tarfile (and, when umoci is installed, by umoci itself); modes
are checked with os.stat, never by trying to read (root ignores permission bits)."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Optional, Union

import pytest

from rankwire.errors import UserError
from rankwire.runtime import oci_layers
from rankwire.runtime.oci_layers import Layer, apply_layers

OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MTIME = 1_600_000_000

Member = tuple[tarfile.TarInfo, Optional[bytes]]


def info(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, **extra: object) -> Member:
    member = tarfile.TarInfo(name)
    member.type = kind
    member.mode = mode
    member.mtime = MTIME
    for key, value in extra.items():
        setattr(member, key, value)
    return member, None


def file(name: str, data: bytes = b"", mode: int = 0o644) -> Member:
    member, _ = info(name, mode=mode, size=len(data))
    return member, data


def dir_(name: str, mode: int = 0o755) -> Member:
    return info(name, tarfile.DIRTYPE, mode)


def symlink(name: str, target: str) -> Member:
    return info(name, tarfile.SYMTYPE, 0o777, linkname=target)


def hardlink(name: str, target: str) -> Member:
    return info(name, tarfile.LNKTYPE, linkname=target)


def tar_bytes(members: list[Member], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as archive:
        for member, data in members:
            archive.addfile(member, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


class Layers:
    """Layer blobs in a temp dir, and the rootfs they are applied to."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.rootfs = base / "rootfs"
        self.rootfs.mkdir()
        self.notes: list[str] = []
        self.count = 0

    def blob(
        self,
        content: Union[list[Member], bytes],
        media_type: str = OCI_GZIP,
        *,
        compress: Optional[bool] = None,
    ) -> Layer:
        data = content if isinstance(content, bytes) else tar_bytes(content)
        if compress if compress is not None else media_type != OCI_TAR:
            data = gzip.compress(data, mtime=0)
        self.count += 1
        digest = f"sha256:{self.count:02d}abcdef0123456789"
        path = self.base / f"layer{self.count}"
        path.write_bytes(data)
        return Layer(path=path, media_type=media_type, digest=digest)

    def apply(self, *layers: Layer, max_expanded: int = 1 << 30) -> None:
        apply_layers(self.rootfs, layers, max_expanded=max_expanded, note=self.notes.append)

    def error(self, *layers: Layer, max_expanded: int = 1 << 30) -> str:
        with pytest.raises(UserError) as err:
            self.apply(*layers, max_expanded=max_expanded)
        return str(err.value)

    def mode(self, rel: str) -> int:
        return stat.S_IMODE(os.lstat(self.rootfs / rel).st_mode)

    def tree(self) -> list[str]:
        found = []
        for top, dirs, files in os.walk(self.rootfs):
            for name in dirs + files:
                found.append(os.path.relpath(os.path.join(top, name), self.rootfs))
        return sorted(found)


@pytest.fixture
def layers(tmp_path: Path) -> Layers:
    return Layers(tmp_path)


# -- formats ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("media_type", "compress"),
    [
        (OCI_TAR, False),
        (OCI_GZIP, True),
        (DOCKER_GZIP, True),
        (OCI_TAR, True),  # mislabelled: gzip sent as plain tar
        (OCI_GZIP, False),  # and plain tar sent as gzip
    ],
)
def test_formats(layers: Layers, media_type: str, compress: bool) -> None:
    members = [dir_("./"), dir_("./etc"), file("./etc/hostname", b"box\n"), file("a/b/c", b"x")]
    layers.apply(layers.blob(members, media_type, compress=compress))
    assert (layers.rootfs / "etc/hostname").read_bytes() == b"box\n"
    assert (layers.rootfs / "a/b/c").read_bytes() == b"x"
    assert layers.mode("a/b") == 0o755  # a missing parent is made 0755
    assert layers.tree() == ["a", "a/b", "a/b/c", "etc", "etc/hostname"]
    assert layers.notes == []


def test_gnu_format_and_long_names(layers: Layers) -> None:
    long = "d/" + "n" * 200
    members = [dir_("d"), file(long, b"long")]
    layers.apply(layers.blob(tar_bytes(members, tarfile.GNU_FORMAT)))
    assert (layers.rootfs / long).read_bytes() == b"long"


def test_empty_layers(layers: Layers) -> None:
    layers.apply(
        layers.blob(b"", OCI_TAR), layers.blob([]), layers.blob(gzip.compress(b""), compress=False)
    )
    assert layers.tree() == []


def test_zstd_without_the_module(layers: Layers) -> None:
    zstd = "application/vnd.oci.image.layer.v1.tar+zstd"
    layer = layers.blob(b"\x28\xb5\x2f\xfd" + b"\0" * 64, zstd, compress=False)
    try:
        import zstandard  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("zstandard is installed")
    assert layers.error(layer) == (
        "layer sha256:01abcdef0123 has media type application/vnd.oci.image.layer.v1.tar+zstd "
        "(zstd), which needs the Python module zstandard; install it (pip install zstandard) "
        "or pull a gzip variant of the image"
    )


def test_not_an_image_layer(layers: Layers) -> None:
    layer = layers.blob(b"SIF_MAGIC", "application/vnd.sylabs.sif.layer.v1.sif")
    assert layers.error(layer) == (
        "layer sha256:01abcdef0123 has media type application/vnd.sylabs.sif.layer.v1.sif, "
        "which is not an image layer; pull artifacts such as a SIF with oras:// instead of "
        "docker://"
    )


# -- whiteouts -------------------------------------------------------------------------


def test_whiteout_deletes_from_lower_layers(layers: Layers) -> None:
    lower = layers.blob(
        [
            dir_("etc"),
            file("etc/gone", b"1"),
            file("etc/kept", b"2"),
            dir_("var"),
            dir_("var/cache"),
            file("var/cache/x", b"3"),
        ]
    )
    upper = layers.blob(
        [
            file("etc/.wh.gone"),
            file("var/.wh.cache"),
            file(".wh.never-was"),
            file("new/.wh.missing-parent"),
        ]
    )
    layers.apply(lower, upper)
    assert layers.tree() == ["etc", "etc/kept", "var"]


def test_whiteout_keeps_what_its_own_layer_wrote(layers: Layers) -> None:
    lower = layers.blob([file("f", b"lower"), dir_("d"), file("d/lower", b"1")])
    upper = layers.blob(
        [file("f", b"upper"), file(".wh.f"), dir_("d"), file("d/upper"), file(".wh.d")]
    )
    layers.apply(lower, upper)
    assert (layers.rootfs / "f").read_bytes() == b"upper"
    assert layers.tree() == ["d", "d/lower", "d/upper", "f"]


def test_whiteout_then_rewrite_in_the_same_layer(layers: Layers) -> None:
    lower = layers.blob([dir_("d"), file("d/old")])
    upper = layers.blob([file(".wh.d"), dir_("d"), file("d/new")])
    layers.apply(lower, upper)
    assert layers.tree() == ["d", "d/new"]


def test_opaque_directory(layers: Layers) -> None:
    lower = layers.blob(
        [
            dir_("opt"),
            file("opt/lower1"),
            dir_("opt/sub"),
            file("opt/sub/lower2"),
            dir_("opt/keep"),
            file("opt/keep/lower3"),
            symlink("opt/link", "/etc"),
            file("outside-opt"),
        ]
    )
    # This layer's own entries stay, before and after the marker; its implicit parent
    # (opt/keep, not an entry of this layer) stays too, emptied of lower entries.
    upper = layers.blob(
        [
            dir_("opt"),
            file("opt/mine", b"m"),
            file("opt/keep/mine2"),
            file("opt/.wh..wh..opq"),
            file("opt/after"),
        ]
    )
    layers.apply(lower, upper)
    assert layers.tree() == [
        "opt",
        "opt/after",
        "opt/keep",
        "opt/keep/mine2",
        "opt/mine",
        "outside-opt",
    ]


def test_opaque_root_and_missing_dir(layers: Layers) -> None:
    lower = layers.blob([file("a"), dir_("b"), file("b/c")])
    upper = layers.blob([file("z"), file(".wh..wh..opq"), file("nothere/.wh..wh..opq")])
    layers.apply(lower, upper)
    assert layers.tree() == ["z"]


@pytest.mark.parametrize(
    ("name", "target"),
    [(".wh...", "'..'"), ("etc/.wh...", "'..'"), ("etc/.wh..", "'.'"), (".wh.", "nothing")],
)
def test_whiteout_of_dot_or_dot_dot(layers: Layers, name: str, target: str) -> None:
    victim = layers.base / "victim"
    victim.write_text("keep")
    assert layers.error(layers.blob([dir_("etc"), file("etc/x"), file(name)])) == (
        f"layer sha256:01abcdef0123: whiteout {name} names {target}; refusing an unsafe "
        "layer: rebuild the image without it"
    )
    assert victim.read_text() == "keep"


# -- clobber, links, special files -----------------------------------------------------


def test_clobber(layers: Layers) -> None:
    lower = layers.blob(
        [
            file("f2d", b"file"),
            dir_("d2f"),
            file("d2f/child"),
            symlink("l2f", "/etc/passwd"),
            dir_("merge", 0o700),
            file("merge/lower"),
            file("parent-is-file"),
        ]
    )
    upper = layers.blob(
        [
            dir_("f2d"),
            file("f2d/in"),
            file("d2f", b"now a file"),
            file("l2f", b"not followed"),
            dir_("merge", 0o751),
            file("merge/upper"),
            file("parent-is-file/child", b"c"),
        ]
    )
    layers.apply(lower, upper)
    assert layers.tree() == [
        "d2f",
        "f2d",
        "f2d/in",
        "l2f",
        "merge",
        "merge/lower",
        "merge/upper",
        "parent-is-file",
        "parent-is-file/child",
    ]
    assert (layers.rootfs / "d2f").read_bytes() == b"now a file"
    assert not (layers.rootfs / "l2f").is_symlink()
    assert (layers.rootfs / "l2f").read_bytes() == b"not followed"
    assert layers.mode("merge") == 0o751  # the new directory's mode applies


def test_hardlinks(layers: Layers) -> None:
    lower = layers.blob([dir_("bin"), file("bin/busybox", b"elf", 0o755)])
    upper = layers.blob(
        [
            hardlink("bin/sh", "bin/busybox"),
            hardlink("ls", "/bin/busybox"),
            hardlink("./cat", "./bin/../bin/busybox"),
            file("bin/busybox2", b"two"),
            hardlink("bin/two", "bin/busybox2"),
            file("ls2"),
            hardlink("ls2", "bin/busybox"),
        ]
    )
    layers.apply(lower, upper)
    inode = os.lstat(layers.rootfs / "bin/busybox").st_ino
    for name in ("bin/sh", "ls", "cat", "ls2"):
        assert os.lstat(layers.rootfs / name).st_ino == inode
    assert os.lstat(layers.rootfs / "bin/busybox").st_nlink == 5
    assert (layers.rootfs / "bin/two").read_bytes() == b"two"


def test_hardlink_to_a_symlink_links_the_symlink(layers: Layers) -> None:
    layers.apply(layers.blob([symlink("l", "/etc/passwd"), hardlink("l2", "l")]))
    assert os.readlink(layers.rootfs / "l2") == "/etc/passwd"


def test_symlinks_kept_verbatim(layers: Layers) -> None:
    layers.apply(
        layers.blob(
            [
                symlink("abs", "/etc/passwd"),
                symlink("rel", "../../../x"),
                dir_("lib"),
                symlink("lib/dangling", "nowhere"),
                symlink("lib/self", "self"),
            ]
        )
    )
    assert os.readlink(layers.rootfs / "abs") == "/etc/passwd"
    assert os.readlink(layers.rootfs / "rel") == "../../../x"
    assert os.readlink(layers.rootfs / "lib/dangling") == "nowhere"
    assert os.readlink(layers.rootfs / "lib/self") == "self"
    assert os.lstat(layers.rootfs / "abs").st_mtime == MTIME


def test_modes(layers: Layers) -> None:
    layers.apply(
        layers.blob(
            [
                file("secret", b"s", 0o000),
                file("suid", b"x", 0o4755),
                file("sgid", b"x", 0o2711),
                dir_("sticky", 0o1777),
                dir_("locked", 0o000),
                file("wx", b"x", 0o311),
            ]
        )
    )
    assert layers.mode("secret") == 0o400
    assert layers.mode("suid") == 0o4755
    assert layers.mode("sgid") == 0o2711
    assert layers.mode("sticky") == 0o1777
    assert layers.mode("locked") == 0o700
    assert layers.mode("wx") == 0o711
    assert os.lstat(layers.rootfs / "secret").st_mtime == MTIME


def test_read_only_directory_with_children(layers: Layers) -> None:
    lower = layers.blob(
        [dir_("ro", 0o555), file("ro/a", b"a"), dir_("ro/sub", 0o500), file("ro/sub/b", b"b")]
    )
    upper = layers.blob([file("ro/c", b"c"), file("ro/sub/d", b"d"), file("ro/.wh.a")])
    layers.apply(lower, upper)
    assert layers.tree() == ["ro", "ro/c", "ro/sub", "ro/sub/b", "ro/sub/d"]
    assert layers.mode("ro") == 0o755
    assert layers.mode("ro/sub") == 0o700


def test_root_entry(layers: Layers) -> None:
    layers.apply(layers.blob([dir_("./", 0o555), file("a")]))
    assert layers.mode("") == 0o755
    assert os.stat(layers.rootfs).st_mtime == MTIME


def test_directory_times_restored_last(layers: Layers) -> None:
    lower = layers.blob([dir_("d"), dir_("d/e")])
    upper = layers.blob([file("d/e/new"), file("d/.wh.gone")])
    layers.apply(lower, upper)
    assert os.stat(layers.rootfs / "d").st_mtime == MTIME
    assert os.stat(layers.rootfs / "d/e").st_mtime == MTIME


def test_odd_pax_mtime(layers: Layers) -> None:
    member, data = file("f", b"x")
    member.pax_headers = {"mtime": "1e30"}
    inf, _ = dir_("d")
    inf.pax_headers = {"mtime": "inf"}
    layers.apply(layers.blob([(member, data), (inf, None)]))
    assert os.lstat(layers.rootfs / "f").st_mtime == 0
    assert os.lstat(layers.rootfs / "d").st_mtime == 0


def test_device_nodes_skipped_with_one_note(layers: Layers) -> None:
    lower = layers.blob(
        [
            dir_("dev"),
            info("dev/null", tarfile.CHRTYPE, 0o666, devmajor=1, devminor=3),
            info("dev/sda", tarfile.BLKTYPE, 0o660, devmajor=8, devminor=0),
        ]
    )
    upper = layers.blob([info("dev/zero", tarfile.CHRTYPE, 0o666, devmajor=1, devminor=5)])
    layers.apply(lower, upper)
    assert layers.tree() == ["dev"]
    assert layers.notes == [
        "skipped 3 device node(s) (first: dev/null); containers get the host's /dev"
    ]


def test_fifo(layers: Layers) -> None:
    layers.apply(layers.blob([info("run/fifo", tarfile.FIFOTYPE, 0o620)]))
    found = os.lstat(layers.rootfs / "run/fifo")
    assert stat.S_ISFIFO(found.st_mode)
    assert stat.S_IMODE(found.st_mode) == 0o620
    assert found.st_mtime == MTIME


# -- unsafe and broken layers ----------------------------------------------------------


def unsafe(name: str, why: str) -> str:
    return (
        f"layer sha256:01abcdef0123: entry {name} {why}; refusing an unsafe layer: rebuild "
        "the image without it"
    )


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../evil", unsafe("../evil", "has a '..' component")),
        ("./a/../../evil", unsafe("./a/../../evil", "has a '..' component")),
        ("a/..", unsafe("a/..", "has a '..' component")),
        ("/etc/evil", unsafe("/etc/evil", "is an absolute path")),
        ("bad\nname/..", unsafe("bad\\nname/..", "has a '..' component")),
        ("x/" * 300 + "f", unsafe("x/" * 300 + "f", "is nested more than 256 directories deep")),
    ],
)
def test_unsafe_names(layers: Layers, name: str, message: str) -> None:
    assert layers.error(layers.blob([file(name, b"pwned")])) == message
    assert not (layers.base / "evil").exists()
    assert not (layers.base.parent / "evil").exists()


def test_entry_replacing_the_root(layers: Layers) -> None:
    assert layers.error(layers.blob([symlink("./", "/etc")])) == (
        "layer sha256:01abcdef0123: entry ./ would make the image's root a non-directory; "
        "refusing an unsafe layer: rebuild the image without it"
    )


@pytest.mark.parametrize("split", [False, True])
def test_symlink_then_file_through_it(layers: Layers, split: bool) -> None:
    outside = layers.base / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("root:x:0:0\n")
    first = [dir_("etc"), symlink("etc/evil", str(outside))]
    second = [file("etc/evil/passwd", b"pwned"), file("etc/evil/new", b"pwned")]
    blobs = [layers.blob(first), layers.blob(second)] if split else [layers.blob(first + second)]
    digest = "02abcdef0123" if split else "01abcdef0123"
    assert layers.error(*blobs) == (
        f"layer sha256:{digest}: entry etc/evil/passwd goes through the symlink etc/evil; "
        "refusing to follow symlinks while unpacking: rebuild the image without it"
    )
    assert sorted(os.listdir(outside)) == ["passwd"]
    assert (outside / "passwd").read_text() == "root:x:0:0\n"


def test_whiteout_through_a_symlink(layers: Layers) -> None:
    outside = layers.base / "outside"
    outside.mkdir()
    (outside / "victim").write_text("keep")
    lower = layers.blob([symlink("evil", str(outside))])
    upper = layers.blob([file("evil/.wh.victim"), file("evil/.wh..wh..opq")])
    assert layers.error(lower, upper) == (
        "layer sha256:02abcdef0123: entry evil/.wh.victim goes through the symlink evil; "
        "refusing to follow symlinks while unpacking: rebuild the image without it"
    )
    assert (outside / "victim").read_text() == "keep"


@pytest.mark.parametrize("target", ["../victim", "/../victim", "a/../../victim", "/"])
def test_hardlink_to_outside(layers: Layers, target: str) -> None:
    victim = layers.base / "victim"
    victim.write_text("keep")
    assert layers.error(layers.blob([dir_("a"), hardlink("a/link", target)])) == (
        f"layer sha256:01abcdef0123: hard link a/link points outside the image ({target}); "
        "refusing an unsafe layer: rebuild the image without it"
    )
    assert os.lstat(victim).st_nlink == 1


def test_hardlink_through_a_symlink(layers: Layers) -> None:
    outside = layers.base / "outside"
    outside.mkdir()
    (outside / "shadow").write_text("secret")
    layer = layers.blob([symlink("etc", str(outside)), hardlink("stolen", "etc/shadow")])
    assert layers.error(layer) == (
        "layer sha256:01abcdef0123: hard link stolen points through the symlink etc; "
        "refusing to follow symlinks while unpacking: rebuild the image without it"
    )
    assert os.lstat(outside / "shadow").st_nlink == 1


@pytest.mark.parametrize("target", ["missing", "dir", "dir/missing", "file/below"])
def test_hardlink_to_nothing(layers: Layers, target: str) -> None:
    layer = layers.blob([dir_("dir"), file("file"), hardlink("link", target)])
    assert layers.error(layer) == (
        f"layer sha256:01abcdef0123: hard link link points to {target}, which is not a file "
        "in the image (a link must come after its target); rebuild the image"
    )


def test_gzip_bomb(layers: Layers) -> None:
    bomb = file("zeros", b"\0" * (8 << 20))
    layer = layers.blob([file("small", b"ok"), bomb])
    assert layer.path.stat().st_size < 16 << 10
    assert layers.error(layer, max_expanded=1 << 20) == (
        "layer sha256:01abcdef0123 expands beyond the 1 MiB cap (a gzip bomb?); raise it with "
        "--max-expanded-size if the image is really that big"
    )
    assert layers.tree() == ["small"]  # refused from its header: nothing of it written


def test_cap_counts_all_layers_and_headers(layers: Layers) -> None:
    half = [file("a", b"\1" * (600 << 10))]
    first, second = layers.blob(half), layers.blob([file("b", b"\2" * (600 << 10))])
    assert layers.error(first, second, max_expanded=1 << 20).startswith(
        "layer sha256:02abcdef0123 expands beyond the 1 MiB cap"
    )
    # A pax header is read into memory by tarfile: it counts as it is read.
    member, data = file("c", b"c")
    member.pax_headers = {"comment": "x" * (2 << 20)}
    assert layers.error(layers.blob([(member, data)]), max_expanded=1 << 20).startswith(
        "layer sha256:03abcdef0123 expands beyond the 1 MiB cap"
    )


def test_huge_tar_headers(layers: Layers, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oci_layers, "HEADER_SLACK", 1 << 20)
    member, data = file("c", b"c")
    member.pax_headers = {"comment": "x" * (2 << 20)}
    big = file("big", b"\0" * (4 << 20))  # content does not count as headers
    assert layers.error(layers.blob([big, (member, data)])) == (
        "layer sha256:01abcdef0123 has tar headers over 1 MiB (a tar bomb?); refusing it: "
        "rebuild the image"
    )


def test_entry_count_cap(layers: Layers, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oci_layers, "MAX_ENTRIES", 3)
    first, second = layers.blob([file("a"), file("b")]), layers.blob([file("c"), file("d")])
    assert layers.error(first, second) == (
        "layer sha256:02abcdef0123: the image has more than 3 files (a tar bomb?); rankwire "
        "unpacks no more: make the image smaller"
    )


@pytest.mark.parametrize(
    ("cut", "compress", "why"),
    [
        (0.5, True, "Compressed file ended before the end-of-stream marker was reached"),
        (0.5, False, "unexpected end of data"),
        (256, False, "truncated header"),
    ],
)
def test_truncated(layers: Layers, cut: float, compress: bool, why: str) -> None:
    data = tar_bytes([file("a", os.urandom(64 << 10)), file("b", b"b")])
    if compress:
        data = gzip.compress(data)
    data = data[: int(len(data) * cut) if cut < 1 else int(cut)]
    assert layers.error(layers.blob(data, compress=False)) == (
        f"layer sha256:01abcdef0123: truncated or corrupt ({why}); the image is broken: "
        "rebuild or re-push it"
    )


def test_corrupt(layers: Layers) -> None:
    garbage = layers.blob(b"this is not a tar archive at all" * 40, compress=False)
    bad_gzip = layers.blob(b"\x1f\x8b\x08\x00" + b"\xff" * 100, compress=False)
    assert layers.error(garbage) == (
        "layer sha256:01abcdef0123: truncated or corrupt (invalid header); the image is "
        "broken: rebuild or re-push it"
    )
    assert layers.error(bad_gzip).startswith("layer sha256:02abcdef0123: truncated or corrupt (")


# -- layers made by umoci ----------------------------------------------------------------


def umoci(*args: str) -> None:
    subprocess.run(["umoci", *args], check=True, capture_output=True)


def oci_layers_of(layout: Path, tag: str) -> list[Layer]:
    def blob(digest: str) -> Path:
        return layout / "blobs" / digest.replace(":", "/")

    index = json.loads((layout / "index.json").read_text())
    (entry,) = [
        m
        for m in index["manifests"]
        if m["annotations"]["org.opencontainers.image.ref.name"] == tag
    ]
    manifest = json.loads(blob(entry["digest"]).read_text())
    return [
        Layer(path=blob(d["digest"]), media_type=d["mediaType"], digest=d["digest"])
        for d in manifest["layers"]
    ]


def snapshot(root: Path) -> dict[str, tuple[str, object, int]]:
    """path → (kind, content or link target, mode) of every entry below `root`."""
    found: dict[str, tuple[str, object, int]] = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(top, name)
            st = os.lstat(path)
            mode = stat.S_IMODE(st.st_mode)
            rel = os.path.relpath(path, root)
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("link", os.readlink(path), 0)
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("dir", None, mode | 0o700)
            else:
                os.chmod(path, mode | 0o400)  # umoci keeps 000: readable for a non-root test
                found[rel] = ("file", Path(path).read_bytes(), mode | 0o400)
    return found


@pytest.mark.skipif(not shutil.which("umoci"), reason="needs umoci")
def test_layers_made_by_umoci(layers: Layers) -> None:
    layout, bundle = layers.base / "layout", layers.base / "bundle"
    umoci("init", "--layout", str(layout))
    umoci("new", "--image", f"{layout}:t")
    umoci("unpack", "--rootless", "--image", f"{layout}:t", str(bundle))
    rootfs = bundle / "rootfs"
    (rootfs / "bin").mkdir()
    shutil.copy2("/bin/busybox", rootfs / "bin/busybox")
    os.link(rootfs / "bin/busybox", rootfs / "bin/sh")
    for rel, text in [("etc/gone", "1"), ("etc/kept", "2"), ("opt/d/old", "3"), ("opt/d/x/y", "")]:
        (rootfs / rel).parent.mkdir(parents=True, exist_ok=True)
        (rootfs / rel).write_text(text)
    umoci("repack", "--image", f"{layout}:t", str(bundle))
    # The second layer: a deletion, a replaced directory, links and special modes.
    shutil.rmtree(bundle)
    umoci("unpack", "--rootless", "--image", f"{layout}:t", str(bundle))
    (rootfs / "etc/gone").unlink()
    shutil.rmtree(rootfs / "opt/d")
    (rootfs / "opt/d").mkdir()
    (rootfs / "opt/d/new").write_text("4")
    os.link(rootfs / "etc/kept", rootfs / "etc/kept-link")
    os.symlink("/bin/busybox", rootfs / "bin/ls")
    (rootfs / "secret").write_text("s")
    (rootfs / "secret").chmod(0o000)
    (rootfs / "bin/su").write_text("su")
    (rootfs / "bin/su").chmod(0o4755)
    umoci("repack", "--image", f"{layout}:t", str(bundle))
    expected = layers.base / "expected"
    umoci("unpack", "--rootless", "--image", f"{layout}:t", str(expected))

    image_layers = oci_layers_of(layout, "t")
    assert len(image_layers) == 2
    layers.apply(*image_layers)
    ours = snapshot(layers.rootfs)
    assert ours == snapshot(expected / "rootfs")
    assert "etc/gone" not in ours and "opt/d/old" not in ours
    assert ours["secret"][2] == 0o400 and ours["bin/su"][2] == 0o4755
    assert (
        os.lstat(layers.rootfs / "bin/sh").st_ino == os.lstat(layers.rootfs / "bin/busybox").st_ino
    )
    assert os.lstat(layers.rootfs / "etc/kept-link").st_nlink == 2
