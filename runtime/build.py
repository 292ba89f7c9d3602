"""`rankwire build`: pack a root filesystem directory into a SIF laid out like `apptainer build`.

Objects: 1 Def.FILE, 2 JSON.Generic `inspect-metadata.json`, 3 the primary squashfs
partition, all in group 1. The squashfs also gets Apptainer's `/.singularity.d` metadata
files through mksquashfs pseudo files, so the source directory is never modified.
`read_image_metadata` reads that metadata back without touching the partition data.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from rankwire import __version__
from rankwire.errors import UserError
from rankwire.runtime import sif

METADATA_NAME = "inspect-metadata.json"
BOOTSTRAP = "rankwire-dir"
ENV_SCRIPT = "/.singularity.d/env/90-environment.sh"
DEFAULT_RUNSCRIPT = '#!/bin/sh\necho "There is no runscript defined for this container"\n'
_MAX_METADATA = 16 << 20  # bytes; deffile and JSON objects are read whole
_SUPERBLOCK = struct.Struct("<4sI32xQ16xQ")  # magic, inodes, bytes_used, inode table start
_TABLES_CAP = 16 << 20  # at most this much of the squashfs metadata tables is hashed
_UNREADABLE = re.compile(r"Could not open|Failed to read|skipping")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Section names Apptainer's definition file parser knows; other `%word` lines are content.
_SECTIONS = frozenset(
    {
        "help", "setup", "files", "labels", "environment", "pre", "post", "runscript",
        "test", "startscript", "arguments", "appinstall", "appenv", "apphelp", "applabels",
        "appfiles", "apprun", "appstart", "apptest", "appsetup",
    }
)  # fmt: skip

PathLike = Union[str, "os.PathLike[str]"]


def _shown(value: object) -> str:
    return str(value).replace("\r", "\\r").replace("\n", "\\n")


@dataclasses.dataclass(frozen=True)
class Deffile:
    """A parsed definition file: header keys (lower-case) and section bodies."""

    header: dict[str, str]
    sections: dict[str, str]


def parse_deffile(text: str, source: str = "deffile") -> Deffile:
    """Split a definition file into its `Key: value` header and `%section` bodies."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current: Optional[list[str]] = None
    for number, line in enumerate(text.splitlines(), 1):
        m = re.match(r"%([A-Za-z]+)\b", line)
        if m and m.group(1).lower() in _SECTIONS:
            current = sections.setdefault(m.group(1).lower(), [])
            continue
        if current is not None:
            current.append(line)
            continue
        stripped = line.split("#", 1)[0].strip()
        if not stripped:
            continue
        key, sep, value = stripped.partition(":")
        if not sep or not key.strip():
            raise UserError(
                f"{_shown(source)} line {number}: {_shown(stripped)!r} is not a "
                "'Key: value' header line; fix the header or start a %section"
            )
        header[key.strip().lower()] = value.strip()
    return Deffile(header, {name: "\n".join(body).strip() for name, body in sections.items()})


def parse_environment(text: str, source: str = "%environment") -> dict[str, str]:
    """`export K=V` / `K=V` lines (shell-quoted values) as an ordered dict.

    Anything else is a UserError: rankwire regenerates the environment script from this
    dict, so it refuses to drop shell code silently.
    """
    env: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError as err:
            raise UserError(f"{_shown(source)} line {number}: {err}; fix the quoting") from None
        if tokens and tokens[0] == "export":
            tokens = tokens[1:]
            if not tokens:
                raise UserError(
                    f"{_shown(source)} line {number}: 'export' without K=V; write export K=V"
                )
        for token in tokens:
            key, sep, value = token.partition("=")
            if not sep or not _NAME.match(key):
                raise UserError(
                    f"{_shown(source)} line {number}: {_shown(line.strip())!r} is not a simple "
                    "`export K=V`; rankwire build supports only those (or pass --env K=V)"
                )
            env[key] = value
    return env


def parse_labels(text: str) -> dict[str, str]:
    """`%labels` lines: the key up to the first space, the rest is the value."""
    labels: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, *rest = line.split(None, 1)
        labels[key] = rest[0].strip() if rest else ""
    return labels


def runscript_file(script: Optional[str]) -> str:
    """The `/.singularity.d/runscript` Apptainer writes for a %runscript body."""
    if script is None:
        return DEFAULT_RUNSCRIPT
    shebang, body = "#!/bin/sh", script
    if script.lstrip().startswith("#!"):
        first, _, body = script.lstrip().partition("\n")
        shebang = first.strip()
    return f"{shebang}\n\n{body}\n"


def _export(key: str, value: str) -> str:
    """`export K="V"`: quotes, backslashes and backticks escaped, `$NAME` left to expand."""
    quoted = re.sub(r'([\\"`])', r"\\\1", value)
    return f'export {key}="{quoted}"'


def environment_file(env: Mapping[str, str]) -> str:
    """`90-environment.sh`, sourced at container start: one `export K="V"` per variable.

    Values are kept as written, so `$NAME` references in them expand when it is sourced
    (the way `%environment` lines do in Apptainer); single quotes do not survive parsing.
    """
    lines = ["#!/bin/sh", "# Written by rankwire build from the image's environment.", ""]
    lines += [_export(key, value) for key, value in env.items()]
    return "\n".join(lines) + "\n"


def _source_date_epoch() -> Optional[int]:
    raw = os.environ.get("SOURCE_DATE_EPOCH")
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise UserError(
            f"SOURCE_DATE_EPOCH={_shown(raw)!r} is not a non-negative integer; "
            "set it to Unix seconds or unset it"
        )
    return value


def _build_labels(when: datetime.datetime, goarch: str, header: Mapping[str, str]) -> dict:
    """The labels Apptainer's build adds (org.label-schema.*, org.opencontainers.*)."""
    zone = when.tzname() or "UTC"
    offset = when.utcoffset()
    created = when.strftime("%Y-%m-%dT%H:%M:%S")
    if not offset:
        created += "Z"
    else:
        created += when.strftime("%z")[:3] + ":" + when.strftime("%z")[3:]
    date = (
        f"{when.strftime('%A')}_{when.day}_{when.strftime('%B')}_{when.year}_"
        f"{when.hour}:{when.minute}:{when.second}_{zone}"
    )
    labels = {
        "org.label-schema.schema-version": "1.0",
        "org.label-schema.build-date": date,
        "org.opencontainers.image.created": created,
        "org.label-schema.usage.rankwire.version": __version__,
        "org.label-schema.build-arch": goarch,
        "org.opencontainers.image.architecture": goarch,
    }
    for key, value in header.items():
        labels[f"org.label-schema.usage.singularity.deffile.{key}"] = value
    return labels


def _generated_deffile(
    rootfs: Path, env: Mapping[str, str], labels: Mapping[str, str], runscript: Optional[str]
) -> str:
    lines = [f"Bootstrap: {BOOTSTRAP}", f"From: {rootfs}"]
    if labels:
        lines += ["", "%labels"] + [f"    {k} {v}" for k, v in labels.items()]
    if env:
        lines += ["", "%environment"]
        lines += [f"    {_export(k, v)}" for k, v in env.items()]
    if runscript is not None:
        lines += ["", "%runscript"] + [f"    {line}" for line in runscript.splitlines()]
    return "\n".join(lines) + "\n"


def _check_output(out: Path, rootfs: Path) -> None:
    parent = out.parent
    if not parent.is_dir():
        raise UserError(f"{_shown(out)}: directory {_shown(parent)} does not exist; create it")
    if out.is_dir():
        raise UserError(f"{_shown(out)} is a directory; give the path of the .sif file to write")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(
            f"{_shown(out)}: cannot write to {_shown(parent)} (permission denied); "
            "choose a writable output directory"
        )
    if parent.resolve().is_relative_to(rootfs.resolve()):
        raise UserError(
            f"{_shown(out)} is inside the root filesystem {_shown(rootfs)}, so it would be "
            "packed into itself; write the image elsewhere"
        )


def _meta_dir_state(rootfs: Path) -> tuple[list[str], list[str]]:
    """(directories to create, paths to exclude) for the /.singularity.d files we write."""
    create, exclude = [], []
    for rel in (".singularity.d", ".singularity.d/env"):
        p = rootfs / rel
        if not os.path.lexists(p):
            create.append(rel)
        elif p.is_symlink() or not p.is_dir():
            raise UserError(
                f"{_shown(p)} exists but is not a directory; rankwire build writes Apptainer "
                "metadata there, so move it away"
            )
    for rel in (
        ".singularity.d/Singularity",
        ".singularity.d/labels.json",
        ".singularity.d/runscript",
        ".singularity.d/env/90-environment.sh",
    ):
        if os.path.lexists(rootfs / rel):
            exclude.append(rel)
    return create, exclude


def _run_mksquashfs(
    mksquashfs: str, rootfs: Path, dest: Path, work: Path, files: Mapping[str, tuple[str, str]]
) -> None:
    """Pack `rootfs` into `dest`, adding `files` (path -> (mode, text)) as pseudo files."""
    create, exclude = _meta_dir_state(rootfs)
    pseudo = [f"{rel} d 755 0 0" for rel in create]
    for rel, (mode, content) in files.items():
        src = work / rel.replace("/", "_")
        src.write_text(content, encoding="utf-8")
        pseudo.append(f"{rel} f {mode} 0 0 cat {shlex.quote(str(src))}")
    (work / "pseudo").write_text("\n".join(pseudo) + "\n", encoding="utf-8")
    argv = [mksquashfs, str(rootfs), str(dest), "-noappend", "-comp", "gzip", "-all-root"]
    argv += ["-no-progress", "-quiet", "-pf", str(work / "pseudo")]
    if exclude:
        (work / "exclude").write_text("\n".join(exclude) + "\n", encoding="utf-8")
        argv += ["-ef", str(work / "exclude")]
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    if proc.returncode != 0:
        detail = "; ".join(lines[-3:]) or f"exit status {proc.returncode}"
        raise UserError(f"mksquashfs failed on {_shown(rootfs)}: {_shown(detail)}")
    # mksquashfs only warns about files it cannot read, and packs them empty or not at all.
    unread = [ln for ln in lines if _UNREADABLE.search(ln)]
    if unread:
        raise UserError(
            f"mksquashfs could not read {len(unread)} path(s) under {_shown(rootfs)} "
            f"(first: {_shown(unread[0])}); make them readable by this user"
        )


def build_image(
    out: PathLike,
    rootfs_dir: PathLike,
    *,
    deffile: Optional[PathLike] = None,
    labels: Optional[Mapping[str, str]] = None,
    env: Optional[Mapping[str, str]] = None,
    runscript: Optional[str] = None,
) -> None:
    """Pack `rootfs_dir` into the SIF `out` (replaced atomically); the source is untouched.

    `deffile` is the path of an Apptainer definition file: its text becomes object 1 and
    its %environment, %labels and %runscript sections feed the metadata; `labels`, `env`
    and `runscript` override them. With SOURCE_DATE_EPOCH set the output is reproducible.
    """
    out_path = Path(out).absolute()
    rootfs = Path(rootfs_dir).absolute()
    if not rootfs.is_dir():
        what = "does not exist" if not os.path.lexists(rootfs) else "is not a directory"
        raise UserError(f"root filesystem {_shown(rootfs_dir)} {what}; pass the directory to pack")
    _check_output(out_path, rootfs)
    mksquashfs = shutil.which("mksquashfs")
    if mksquashfs is None:
        raise UserError(
            "mksquashfs not found on PATH; install squashfs-tools (apt install squashfs-tools)"
        )
    epoch = _source_date_epoch()
    goarch = sif.goarch_from_machine()

    if deffile is not None:
        try:
            def_text = Path(deffile).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
            raise UserError(f"definition file {_shown(deffile)}: {reason}") from None
        parsed = parse_deffile(def_text, str(deffile))
        final_env = parse_environment(
            parsed.sections.get("environment", ""), f"{deffile} %environment"
        )
        user_labels = parse_labels(parsed.sections.get("labels", ""))
        final_runscript = parsed.sections.get("runscript") or None
    else:
        final_env, user_labels, final_runscript = {}, {}, None
    for key in env or {}:
        if not _NAME.match(key):
            raise UserError(f"--env {_shown(key)!r}: not a variable name; use --env NAME=VALUE")
    final_env.update(env or {})
    user_labels.update(labels or {})
    if runscript is not None:
        final_runscript = runscript
    if deffile is None:
        def_text = _generated_deffile(rootfs, final_env, user_labels, final_runscript)
        parsed = parse_deffile(def_text)

    when = (
        datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
        if epoch is not None
        else datetime.datetime.now().astimezone()
    )
    all_labels = _build_labels(when, goarch, parsed.header)
    all_labels.update(user_labels)
    env_script = environment_file(final_env)
    run_file = runscript_file(final_runscript)
    metadata = {
        "data": {
            "attributes": {
                "deffile": def_text,
                "labels": all_labels,
                "environment": {ENV_SCRIPT: env_script},
                "runscript": run_file,
            }
        },
        "type": "container",
        "rankwire": {
            "version": 1,
            "env": [[k, v] for k, v in final_env.items()],
            "runscript": final_runscript,
            "deffile_header": parsed.header,
            "deffile_sections": sorted(parsed.sections),
        },
    }
    files = {
        ".singularity.d/Singularity": ("644", def_text),
        ".singularity.d/labels.json": (
            "644",
            json.dumps(all_labels, sort_keys=True, indent="\t", ensure_ascii=False) + "\n",
        ),
        ".singularity.d/runscript": ("755", run_file),
        ".singularity.d/env/90-environment.sh": ("755", env_script),
    }

    work = Path(tempfile.mkdtemp(prefix="rankwire-build-"))
    squash: Optional[Path] = None
    try:
        try:
            fd, name = tempfile.mkstemp(
                prefix=f".{out_path.name}.", suffix=".squashfs", dir=out_path.parent
            )
            os.close(fd)
        except OSError as err:
            raise UserError(
                f"{_shown(out_path)}: cannot write to {_shown(out_path.parent)} "
                f"({err.strerror}); choose a writable output directory"
            ) from None
        squash = Path(name)
        _run_mksquashfs(mksquashfs, rootfs, squash, work, files)
        sif.create_sif(
            out_path,
            [
                sif.ObjectInput(sif.DataType.DEFFILE, data=def_text.encode("utf-8")),
                sif.ObjectInput(
                    sif.DataType.GENERIC_JSON,
                    data=json.dumps(
                        metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False
                    ).encode("utf-8"),
                    name=METADATA_NAME,
                ),
                sif.ObjectInput(
                    sif.DataType.PARTITION,
                    path=squash,
                    fs_type=sif.FsType.SQUASHFS,
                    part_type=sif.PartType.PRIMSYS,
                    arch=goarch,
                ),
            ],
            deterministic=epoch is not None,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if squash is not None:
            squash.unlink(missing_ok=True)


@dataclasses.dataclass(frozen=True)
class ImageMetadata:
    """What the planner needs from an image, read without touching the file data.

    `env` keeps the image's order and the values as written: `$NAME` references in them
    are meant to expand at container start, as `90-environment.sh` does when sourced.
    `runscript` is None when the image defines none. `identity` (see `_identity`) changes
    with every rebuild that is not byte-identical in its metadata: a file edited in place
    to the same size and compressed size would keep it, so it is not a content digest.
    """

    deffile: str
    labels: dict[str, str]
    env: dict[str, str]
    runscript: Optional[str]
    partition_offset: int
    partition_size: int
    arch: str
    identity: str


def _small_object(image: sif.SifImage, desc: sif.Descriptor) -> bytes:
    if desc.size > _MAX_METADATA:
        raise sif.SifError(
            f"{_shown(image.path)}: metadata object {desc.id} is {desc.size} bytes "
            f"(limit {_MAX_METADATA}); the image is corrupt, rebuild it"
        )
    return image.read(desc)


def _str_dict(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def _lenient_environment(scripts: Any) -> dict[str, str]:
    """Simple `export K=V` lines from Apptainer's environment scripts; other lines skipped."""
    env: dict[str, str] = {}
    if not isinstance(scripts, dict):
        return env
    for name in sorted(scripts):
        for line in str(scripts[name]).splitlines():
            try:
                env.update(parse_environment(line))
            except UserError:
                continue
    return env


def read_image_metadata(image: sif.SifImage) -> ImageMetadata:
    """Deffile, labels, environment and runscript of a rankwire- or Apptainer-built image."""
    part = image.primary_partition()
    d = image.find(sif.DataType.DEFFILE)
    deffile = _small_object(image, d).decode("utf-8", "replace") if d else ""
    labels: dict[str, str] = {}
    env: dict[str, str] = {}
    runscript: Optional[str] = None
    j = image.find(sif.DataType.GENERIC_JSON, METADATA_NAME)
    if j is not None:
        try:
            doc = json.loads(_small_object(image, j))
        except ValueError:
            raise sif.SifError(
                f"{_shown(image.path)}: {METADATA_NAME} (object {j.id}) is not valid JSON; "
                "rebuild the image"
            ) from None
        attrs = doc.get("data", {}).get("attributes", {}) if isinstance(doc, dict) else {}
        attrs = attrs if isinstance(attrs, dict) else {}
        labels = _str_dict(attrs.get("labels"))
        ours = doc.get("rankwire") if isinstance(doc, dict) else None
        if isinstance(ours, dict):
            pairs = ours.get("env") or []
            env = {str(p[0]): str(p[1]) for p in pairs if isinstance(p, list) and len(p) == 2}
            rs = ours.get("runscript")
            runscript = rs if isinstance(rs, str) else None
        else:  # built by Apptainer: its runscript attribute is the file, default included
            env = _lenient_environment(attrs.get("environment"))
            rs = attrs.get("runscript")
            if isinstance(rs, str) and rs and "There is no runscript defined" not in rs:
                runscript = rs
    return ImageMetadata(
        deffile=deffile,
        labels=labels,
        env=env,
        runscript=runscript,
        partition_offset=part.offset,
        partition_size=part.size,
        arch=part.arch or "unknown",
        identity=_identity(image, part),
    )


def _identity(image: sif.SifImage, part: sif.Descriptor) -> str:
    """sha256 of the SIF header, the descriptors and the squashfs superblock and tables.

    The tables (inodes, directories, fragment/id/export lookups) sit at the end of a
    squashfs and record every name, mode, owner, time, size and block size, so any
    rebuild or change in the tree changes them; file data itself is not read.
    """

    def part_bytes(start: int, size: int) -> bytes:
        return image.read(dataclasses.replace(part, offset=part.offset + start, size=size))

    h = hashlib.sha256(image.raw_metadata())
    head = part_bytes(0, min(96, part.size))
    h.update(head)
    if len(head) == 96:
        magic, _, used, tables = _SUPERBLOCK.unpack_from(head)
        if magic == b"hsqs" and 96 <= tables <= used <= part.size:
            start = max(tables, used - _TABLES_CAP)
            h.update(part_bytes(start, used - start))
    return f"sha256:{h.hexdigest()}"
