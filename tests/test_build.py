"""`rankwire build` / `rankwire inspect`: real mksquashfs, siftool and unsquashfs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.users import User
from rankwire.errors import UserError
from rankwire.runtime.build import apply_build, build_image, plan_build
from rankwire.runtime.imagemeta import read_image_metadata
from rankwire.runtime.sif_format import DataType, SifError, goarch_from_machine
from rankwire.runtime.sif_read import SifImage
from rankwire.runtime.sif_write import ObjectInput, create_sif

pytestmark = pytest.mark.skipif(
    not (shutil.which("mksquashfs") and shutil.which("unsquashfs") and shutil.which("siftool")),
    reason="needs squashfs-tools and siftool",
)

META_FILES = (
    ".singularity.d/Singularity",
    ".singularity.d/labels.json",
    ".singularity.d/runscript",
    ".singularity.d/env/90-environment.sh",
)

DEFFILE = """\
Bootstrap: docker
From: debian:12   # the base

%labels
    Author someone@example.org
    Version 1.2

%environment
    export PATH=/opt/app/bin:$PATH
    LANG=C.UTF-8
    export GREETING="hello world" MODE='fast'
    # a comment

%post
    apt-get install -y nothing

%runscript
    exec /opt/app/bin/app "$@"
"""


@pytest.fixture()
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "data" / "deep").mkdir(parents=True)
    (root / "bin" / "hello").write_text("#!/bin/sh\necho hello\n")
    (root / "bin" / "hello").chmod(0o755)
    (root / "etc" / "os-release").write_text('ID="rankwire-test"\n')
    (root / "data" / "deep" / "blob").write_bytes(os.urandom(10000))
    (root / "data" / "secret").write_text("private\n")
    (root / "data" / "secret").chmod(0o600)
    (root / "bin" / "hi").symlink_to("hello")
    return root


def snapshot(root: Path) -> list[tuple]:
    """Everything observable about a tree: names, types, modes, owners, times, contents."""
    out = []
    for p in [root, *sorted(root.rglob("*"))]:
        st = p.lstat()
        content = ""
        if p.is_symlink():
            content = os.readlink(p)
        elif p.is_file():
            content = hashlib.sha256(p.read_bytes()).hexdigest()
        stat = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        out.append((str(p.relative_to(root)), *stat, content))
    return out


def rankwire(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["rankwire", *argv], capture_output=True, text=True, **kwargs)


def partition_offset(image: Path) -> int:
    with SifImage.open(image) as img:
        return img.primary_partition().offset


def unsquash_list(image: Path) -> set[str]:
    out = subprocess.run(
        ["unsquashfs", "-o", str(partition_offset(image)), "-lls", str(image)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {
        line.split("squashfs-root", 1)[1].split(" -> ")[0]
        for line in out.splitlines()
        if "squashfs-root" in line
    }


def unsquash_cat(image: Path, rel: str) -> str:
    return subprocess.run(
        ["unsquashfs", "-o", str(partition_offset(image)), "-cat", str(image), rel],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def test_build_layout_and_contents(tmp_path: Path, rootfs: Path) -> None:
    before = snapshot(rootfs)
    out = tmp_path / "out" / "app.sif"
    out.parent.mkdir()
    build_image(
        out,
        rootfs,
        labels={"purpose": "tests"},
        env={"A": "1", "B": 'x "y" $HOME'},
        runscript='echo hello "$@"',
    )
    assert snapshot(rootfs) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["app.sif"]

    rows = [
        r.split("|")
        for r in subprocess.check_output(["siftool", "list", str(out)], text=True).splitlines()[3:]
    ]
    assert [(r[0].strip(), r[1].strip(), r[4]) for r in rows] == [
        ("1", "1", "Def.FILE"),
        ("2", "1", "JSON.Generic"),
        ("3", "1", f"FS (Squashfs/*System/{goarch_from_machine()})"),
    ]
    assert "Launch Script:        #!/usr/bin/env run-singularity" in subprocess.check_output(
        ["siftool", "header", str(out)], text=True
    )
    with SifImage.open(out) as img:
        assert img.get(2).name == "inspect-metadata.json"
        assert img.header.data_offset == 32176
        assert img.primary_partition().offset % 4096 == 0
        assert not img.header.deterministic

    files = unsquash_list(out)
    for rel in ("/bin/hello", "/bin/hi", "/etc/os-release", "/data/deep/blob", "/data/secret"):
        assert rel in files
    for rel in META_FILES:
        assert "/" + rel in files
    assert unsquash_cat(out, "bin/hello") == "#!/bin/sh\necho hello\n"
    env_script = unsquash_cat(out, ".singularity.d/env/90-environment.sh")
    assert 'export A="1"\n' in env_script and 'export B="x \\"y\\" $HOME"\n' in env_script
    shell = subprocess.run(
        ["sh", "-c", '. /dev/stdin; printf "%s|%s" "$A" "$B"'],
        input=env_script,
        capture_output=True,
        text=True,
        env={"HOME": "/home/u"},
    )
    assert shell.stdout == '1|x "y" /home/u'
    assert unsquash_cat(out, ".singularity.d/runscript") == '#!/bin/sh\n\necho hello "$@"\n'
    labels = json.loads(unsquash_cat(out, ".singularity.d/labels.json"))
    assert labels["purpose"] == "tests"
    assert labels["org.label-schema.schema-version"] == "1.0"
    assert labels["org.label-schema.usage.singularity.deffile.bootstrap"] == "rankwire-dir"
    assert labels["org.label-schema.usage.singularity.deffile.from"] == str(rootfs)
    deffile = unsquash_cat(out, ".singularity.d/Singularity")
    assert deffile.startswith(f"Bootstrap: rankwire-dir\nFrom: {rootfs}\n")
    assert 'export B="x \\"y\\" $HOME"' in deffile

    with SifImage.open(out) as img:
        meta = read_image_metadata(img)
        part = img.primary_partition()
    assert meta.deffile == deffile
    assert meta.env == {"A": "1", "B": 'x "y" $HOME'}
    assert meta.runscript == 'echo hello "$@"'
    assert meta.labels == labels
    assert (meta.partition_offset, meta.partition_size) == (part.offset, part.size)
    assert meta.arch == goarch_from_machine()
    assert meta.identity.startswith("sha256:")


def test_default_runscript_and_empty_env(tmp_path: Path, rootfs: Path) -> None:
    out = tmp_path / "plain.sif"
    build_image(out, rootfs)
    run = unsquash_cat(out, ".singularity.d/runscript")
    assert run.startswith("#!/bin/sh\n") and "no runscript defined" in run
    with SifImage.open(out) as img:
        meta = read_image_metadata(img)
    assert meta.runscript is None and meta.env == {}
    assert "export" not in unsquash_cat(out, ".singularity.d/env/90-environment.sh")


def test_deterministic_build_is_byte_identical(
    tmp_path: Path, rootfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    a, b = tmp_path / "a.sif", tmp_path / "b.sif"
    build_image(a, rootfs, env={"X": "1"}, labels={"l": "v"})
    os.utime(rootfs / "bin" / "hello")  # a newer mtime is clamped to SOURCE_DATE_EPOCH
    build_image(b, rootfs, env={"X": "1"}, labels={"l": "v"})
    assert a.read_bytes() == b.read_bytes()
    with SifImage.open(a) as img:
        assert img.header.deterministic
        meta = read_image_metadata(img)
    assert meta.labels["org.opencontainers.image.created"] == "2023-11-14T22:13:20Z"
    assert meta.labels["org.label-schema.build-date"] == "Tuesday_14_November_2023_22:13:20_UTC"
    with SifImage.open(b) as img:
        assert read_image_metadata(img).identity == meta.identity
    # Different content gives a different image and identity.
    (rootfs / "etc" / "os-release").write_text('ID="changed"\n')
    c = tmp_path / "c.sif"
    build_image(c, rootfs, env={"X": "1"}, labels={"l": "v"})
    with SifImage.open(c) as img:
        assert read_image_metadata(img).identity != meta.identity
    assert c.read_bytes() != a.read_bytes()


def test_deffile_sections_and_overrides(tmp_path: Path, rootfs: Path) -> None:
    deffile = tmp_path / "app.def"
    deffile.write_text(DEFFILE)
    out = tmp_path / "app.sif"
    build_image(
        out, rootfs, deffile=deffile, env={"MODE": "slow", "EXTRA": "1"}, labels={"Version": "2.0"}
    )
    with SifImage.open(out) as img:
        meta = read_image_metadata(img)
        assert img.read(img.get(1)).decode() == DEFFILE
    assert meta.deffile == DEFFILE
    assert list(meta.env.items()) == [
        ("PATH", "/opt/app/bin:$PATH"),
        ("LANG", "C.UTF-8"),
        ("GREETING", "hello world"),
        ("MODE", "slow"),
        ("EXTRA", "1"),
    ]
    assert meta.runscript == 'exec /opt/app/bin/app "$@"'
    assert meta.labels["Author"] == "someone@example.org"
    assert meta.labels["Version"] == "2.0"
    assert meta.labels["org.label-schema.usage.singularity.deffile.bootstrap"] == "docker"
    assert meta.labels["org.label-schema.usage.singularity.deffile.from"] == "debian:12"
    assert unsquash_cat(out, ".singularity.d/Singularity") == DEFFILE
    assert (
        unsquash_cat(out, ".singularity.d/runscript") == '#!/bin/sh\n\nexec /opt/app/bin/app "$@"\n'
    )
    with SifImage.open(out) as img:
        doc = json.loads(img.read(img.get(2)))
    assert doc["type"] == "container"
    assert doc["rankwire"]["deffile_sections"] == ["environment", "labels", "post", "runscript"]


def test_inspect_json_and_text(tmp_path: Path, rootfs: Path) -> None:
    out = tmp_path / "app.sif"
    built = rankwire(
        "build", str(out), str(rootfs), "--label", "k=v", "--env", "A=1", "--env", "B=two words",
        "--runscript", "echo hi",
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    proc = rankwire("inspect", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["labels"]["k"] == "v"
    assert doc["env"] == {"A": "1", "B": "two words"}
    assert doc["runscript"] == "echo hi"
    assert doc["deffile"].startswith("Bootstrap: rankwire-dir\n")
    assert [o["type"] for o in doc["objects"]][:2] == ["Def.FILE", "JSON.Generic"]
    assert doc["partition"]["offset"] == partition_offset(out)
    text = rankwire("inspect", str(out)).stdout
    for needle in (
        "Labels:",
        "    k: v",
        "Environment:",
        "    B=two words",
        "Runscript:",
        "    echo hi",
        "|Def.FILE",
    ):
        assert needle in text


def superblock(image: Path) -> str:
    """What unsquashfs (squashfs-tools, not ours) reads in the image's superblock."""
    return subprocess.run(
        ["unsquashfs", "-s", "-o", str(partition_offset(image)), str(image)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def squashfs_compression(image: Path) -> str:
    """The image's compressor, as unsquashfs reads it."""
    out = superblock(image)
    return next(ln.split()[1] for ln in out.splitlines() if ln.startswith("Compression "))


@pytest.mark.parametrize("asked", [None, "lz4", "zstd", "gzip"])
def test_compression(tmp_path: Path, rootfs: Path, asked: str | None) -> None:
    """lz4 (high compression) by default; zstd and gzip when asked; `inspect` says which."""
    out = tmp_path / "app.sif"
    given = ["--compression", asked] if asked else []
    built = rankwire("build", *given, str(out), str(rootfs))
    assert built.returncode == 0, built.stderr
    want = asked or "lz4"
    assert squashfs_compression(out) == want
    hc = "\tHigh Compression option specified (-Xhc)\n"
    assert (hc in superblock(out)) == (want == "lz4")
    assert unsquash_cat(out, "etc/os-release") == 'ID="rankwire-test"\n'
    doc = json.loads(rankwire("inspect", "--json", str(out)).stdout)
    assert doc["partition"]["compression"] == want
    text = rankwire("inspect", str(out)).stdout
    size = doc["partition"]["size"]
    assert f"Partition: offset {partition_offset(out)}, {size} bytes, {want} squashfs" in text


def test_compression_errors(tmp_path: Path, rootfs: Path) -> None:
    out = tmp_path / "x.sif"
    bogus = rankwire("build", "--compression", "xz", str(out), str(rootfs))
    assert bogus.returncode == 2
    assert bogus.stderr.startswith(
        "rankwire: invalid value for '--compression': 'xz' is not one of "
    )
    recipe = tmp_path / "r.def"
    recipe.write_text("Bootstrap: localimage\nFrom: nowhere.sif\n")
    assert_one_line_error(
        rankwire("build", "--sandbox", "--compression", "lz4", str(tmp_path / "d"), str(recipe)),
        "--compression is for a SIF and --sandbox writes a directory: drop one of them",
    )
    with pytest.raises(UserError) as err:
        build_image(out, rootfs, compression="lzo")
    assert str(err.value) == "--compression lzo: choose one of lz4, zstd, gzip"
    no_lz4 = tmp_path / "bin"
    no_lz4.mkdir()
    fake = no_lz4 / "mksquashfs"  # a squashfs-tools built without lz4
    real = shutil.which("mksquashfs")
    fake.write_text(
        '#!/bin/sh\ncase "$*" in *"-comp lz4"*)\n'
        "  echo 'mksquashfs: Compressor \"lz4\" is not supported!' >&2; exit 1;;\nesac\n"
        f'exec {real} "$@"\n'
    )
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{no_lz4}:{os.environ['PATH']}"}
    assert_one_line_error(
        rankwire("build", "--compression", "lz4", str(out), str(rootfs), env=env),
        f'mksquashfs failed on {rootfs}: mksquashfs: Compressor "lz4" is not supported!; '
        "this mksquashfs cannot write lz4: give --compression gzip",
    )
    defaulted = rankwire("build", str(out), str(rootfs), env=env)  # as pull and save build
    assert (defaulted.returncode, defaulted.stderr) == (
        0,
        "rankwire: warning: this mksquashfs cannot write lz4: packing with gzip\n",
    )
    assert squashfs_compression(out) == "gzip"
    out.unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "r.def", "rootfs"]


def test_the_plan_holds_the_compressors_tried_in_order(
    tmp_path: Path, rootfs: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Asked: that alone; not asked: lz4, then gzip; preferred (what `--save` keeps of its
    source): that first, then those. A mksquashfs that cannot write one goes to the next."""
    out = tmp_path / "x.sif"
    assert plan_build(out, rootfs).compressions == ("lz4", "gzip")
    assert plan_build(out, rootfs, compression="zstd").compressions == ("zstd",)
    assert plan_build(out, rootfs, prefer="zstd").compressions == ("zstd", "lz4", "gzip")
    assert plan_build(out, rootfs, prefer="gzip").compressions == ("gzip", "lz4")
    no_zstd = tmp_path / "bin"
    no_zstd.mkdir()
    fake = no_zstd / "mksquashfs"  # squashfs-tools before 4.4: no zstd
    fake.write_text(
        '#!/bin/sh\ncase "$*" in *"-comp zstd"*)\n'
        "  echo 'mksquashfs: Compressor \"zstd\" is not supported!' >&2; exit 1;;\nesac\n"
        f'exec {shutil.which("mksquashfs")} "$@"\n'
    )
    fake.chmod(0o755)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{no_zstd}:{os.environ['PATH']}")
        apply_build(plan_build(out, rootfs, prefer="zstd"))
    assert capfd.readouterr().err == (
        "rankwire: warning: this mksquashfs cannot write zstd: packing with lz4\n"
    )
    assert squashfs_compression(out) == "lz4"


def test_existing_metadata_in_rootfs_is_replaced_not_modified(tmp_path: Path, rootfs: Path) -> None:
    meta_dir = rootfs / ".singularity.d"
    (meta_dir / "env").mkdir(parents=True)
    (meta_dir / "runscript").write_text("#!/bin/sh\necho old\n")
    (meta_dir / "env" / "90-environment.sh").write_text("export OLD=1\n")
    (meta_dir / "env" / "01-base.sh").write_text("# kept\n")
    before = snapshot(rootfs)
    out = tmp_path / "img.sif"
    build_image(out, rootfs, env={"NEW": "1"}, runscript="echo new")
    assert snapshot(rootfs) == before
    assert "echo new" in unsquash_cat(out, ".singularity.d/runscript")
    env_script = unsquash_cat(out, ".singularity.d/env/90-environment.sh")
    assert "NEW" in env_script and "OLD" not in env_script
    assert unsquash_cat(out, ".singularity.d/env/01-base.sh") == "# kept\n"


ENV_SCRIPT = "/.singularity.d/env/90-environment.sh"
APPTAINER_DEFAULT_RUNSCRIPT = (
    "#!/bin/sh\n\necho 'There is no runscript defined for this container\\n';\n"
)


def test_apptainer_style_metadata_is_read(tmp_path: Path) -> None:
    """Images built by Apptainer carry no rankwire section: env comes from its scripts."""
    doc = {
        "data": {
            "attributes": {
                "labels": {"a": "b"},
                "environment": {ENV_SCRIPT: "#!/bin/sh\nexport X=1\nif true; then :; fi\n"},
                "runscript": APPTAINER_DEFAULT_RUNSCRIPT,
            }
        },
        "type": "container",
    }
    path = tmp_path / "apptainer.sif"
    create_sif(
        path,
        [
            ObjectInput(DataType.DEFFILE, data=b"Bootstrap: docker\n"),
            ObjectInput(
                DataType.GENERIC_JSON,
                data=json.dumps(doc).encode(),
                name="inspect-metadata.json",
            ),
            ObjectInput(DataType.PARTITION, data=b"x" * 100, fs_type=1, part_type=2, arch="arm64"),
        ],
    )
    with SifImage.open(path) as img:
        meta = read_image_metadata(img)
    assert (meta.labels, meta.env, meta.runscript, meta.arch) == (
        {"a": "b"},
        {"X": "1"},
        None,
        "arm64",
    )
    assert meta.deffile == "Bootstrap: docker\n"


def test_broken_metadata_json_is_a_sif_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.sif"
    create_sif(
        path,
        [
            ObjectInput(DataType.GENERIC_JSON, data=b"{not json", name="inspect-metadata.json"),
            ObjectInput(DataType.PARTITION, data=b"x", fs_type=1, part_type=2, arch="amd64"),
        ],
    )
    with SifImage.open(path) as img, pytest.raises(SifError, match="not valid JSON") as err:
        read_image_metadata(img)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------
# User errors: one line, non-zero exit, nothing left behind


def assert_one_line_error(proc: subprocess.CompletedProcess, message: str) -> None:
    """Exit 2 and the whole of stderr is `rankwire: MESSAGE`."""
    assert (proc.returncode, proc.stderr) == (2, f"rankwire: {message}\n")


def test_cli_errors(tmp_path: Path, rootfs: Path) -> None:
    out = tmp_path / "x.sif"
    assert_one_line_error(
        rankwire("build", str(out), str(tmp_path / "nope")),
        f"root filesystem {tmp_path / 'nope'} does not exist; pass the directory to pack",
    )
    assert_one_line_error(  # a file is a definition file (as for Apptainer)
        rankwire("build", str(out), str(rootfs / "etc" / "os-release")),
        f'{rootfs / "etc" / "os-release"} line 1: ID="rankwire-test" stands before the first '
        "Bootstrap: line, so its stage has no Bootstrap; start each stage with Bootstrap: AGENT",
    )
    assert_one_line_error(
        rankwire("build", str(tmp_path / "no" / "x.sif"), str(rootfs)),
        f"{tmp_path / 'no' / 'x.sif'}: directory {tmp_path / 'no'} does not exist; create it",
    )
    assert_one_line_error(
        rankwire("build", str(rootfs / "x.sif"), str(rootfs)),
        f"{rootfs / 'x.sif'} is inside the root filesystem {rootfs}, so it would be packed "
        "into itself; write the image elsewhere",
    )
    assert_one_line_error(
        rankwire("build", str(out), str(rootfs), "--env", "1BAD=x"),
        "--env '1BAD': not a variable name; use --env NAME=VALUE",
    )
    assert_one_line_error(
        rankwire("build", str(out), str(rootfs), "--label", "novalue"),
        "--label 'novalue': expected KEY=VALUE; e.g. --label NAME=value",
    )
    env = {**os.environ, "SOURCE_DATE_EPOCH": "yesterday"}
    assert_one_line_error(
        rankwire("build", str(out), str(rootfs), env=env),
        "SOURCE_DATE_EPOCH='yesterday' is not a non-negative integer; "
        "set it to Unix seconds or unset it",
    )
    no_tools = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    assert_one_line_error(
        rankwire("build", str(out), str(rootfs), env=no_tools),
        "mksquashfs not found on PATH; install squashfs-tools (apt install squashfs-tools)",
    )
    bad = tmp_path / "bad.def"
    bad.write_text("Bootstrap: docker\n%environment\n    source /etc/profile\n")
    assert_one_line_error(
        rankwire("build", str(out), str(rootfs), "--deffile", str(bad)),
        f"{bad} %environment line 1: 'source /etc/profile' is not a simple `export K=V`: "
        "only those are read (quote a value holding spaces), or pass --env K=V",
    )
    bad.write_text("Bootstrap docker\n")
    assert_one_line_error(
        rankwire("build", str(out), str(rootfs), "--deffile", str(bad)),
        f"{bad} line 1: 'Bootstrap docker' is not a 'Key: value' header line; "
        "fix the header or start a %section",
    )
    assert_one_line_error(
        rankwire("build", str(out), str(rootfs), "--deffile", str(tmp_path / "nodef")),
        f"definition file {tmp_path / 'nodef'}: No such file or directory",
    )
    (rootfs / ".singularity.d").write_text("not a dir")
    assert_one_line_error(
        rankwire("build", str(out), str(rootfs)),
        f"{rootfs / '.singularity.d'} exists but is not a directory; rankwire build writes "
        "Apptainer metadata there, so move it away",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.def", "rootfs"]


def test_parse_errors_are_user_errors() -> None:
    from rankwire.runtime.imagemeta import parse_environment

    with pytest.raises(UserError, match="No closing quotation"):
        parse_environment('export A="unterminated')
    with pytest.raises(UserError, match="'export' without K=V"):
        parse_environment("export")
    assert parse_environment("export A=1 B='2 3'\nC=\n# x\n") == {"A": "1", "B": "2 3", "C": ""}


@pytest.fixture()
def user_dirs(shared_dir: Path, unprivileged_user: User, rootfs: Path) -> tuple[Path, Path]:
    """A rootfs the test user can read, and an output dir it cannot write to."""
    base = shared_dir / f"build-{os.getpid()}-{rootfs.parent.name}"
    shutil.copytree(rootfs, base / "rootfs", symlinks=True)
    for p in [base, *base.rglob("*")]:
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else 0o644)
    locked = base / "locked"
    locked.mkdir(mode=0o755)
    if os.getuid() != 0:
        locked.chmod(0o555)
    return base, locked


def test_unwritable_output_dir_as_unprivileged_user(
    unprivileged_user: User, user_dirs: tuple[Path, Path]
) -> None:
    base, locked = user_dirs
    proc = unprivileged_user.run(["rankwire", "build", str(locked / "x.sif"), str(base / "rootfs")])
    assert_one_line_error(
        proc,
        f"{locked / 'x.sif'}: cannot write to {locked} (permission denied); "
        "choose a writable output directory",
    )
    assert list(locked.iterdir()) == []


def test_unreadable_rootfs_file_is_an_error(
    tmp_path: Path, unprivileged_user: User, user_dirs: tuple[Path, Path]
) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to make a file the test user cannot read")
    base, _ = user_dirs
    (base / "rootfs" / "data" / "secret").chmod(0o600)
    outdir = base / "out"
    outdir.mkdir()
    os.chown(outdir, unprivileged_user.uid, unprivileged_user.gid)
    proc = unprivileged_user.run(["rankwire", "build", str(outdir / "x.sif"), str(base / "rootfs")])
    rootfs = base / "rootfs"
    assert_one_line_error(
        proc,
        f"mksquashfs could not read 1 path(s) under {rootfs} (first: Failed to read file "
        f"{rootfs / 'data' / 'secret'}, creating empty file); make them readable by this user",
    )
    assert list(outdir.iterdir()) == []
