"""What an image's metadata is: the definition file, environment and runscript formats
`rankwire build` writes, and `read_image_metadata`, which reads them back from a SIF.

A built image carries the definition file as object 1 and `inspect-metadata.json` as a
JSON.Generic object; reading them, and hashing the squashfs superblock and tables for
the image's identity, never touches the partition's file data.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import struct
from typing import Any, Mapping, Optional

from rankwire.errors import UserError
from rankwire.errors import shown as _shown
from rankwire.record import record
from rankwire.runtime.sif_format import DataType, Descriptor, SifError
from rankwire.runtime.sif_read import SifImage

METADATA_NAME = "inspect-metadata.json"
OCI_CONFIG_NAME = "oci-config.json"  # a pulled image's OCI config, as Apptainer keeps it
ENV_SCRIPT = "/.singularity.d/env/90-environment.sh"
DEFAULT_RUNSCRIPT = '#!/bin/sh\necho "There is no runscript defined for this container"\n'
_MAX_METADATA = 16 << 20  # bytes; deffile and JSON objects are read whole
_SUPERBLOCK = struct.Struct("<4sI32xQ16xQ")  # magic, inodes, bytes_used, inode table start
_TABLES_CAP = 16 << 20  # at most this much of the squashfs metadata tables is hashed
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")  # a shell variable name
# Section names Apptainer's definition file parser knows; other `%word` lines are content.
_SECTIONS = frozenset(
    {
        "help", "setup", "files", "labels", "environment", "pre", "post", "runscript",
        "test", "startscript", "arguments", "appinstall", "appenv", "apphelp", "applabels",
        "appfiles", "apprun", "appstart", "apptest", "appsetup",
    }
)  # fmt: skip


@record
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
            if not sep or not ENV_NAME.match(key):
                raise UserError(
                    f"{_shown(source)} line {number}: {_shown(line.strip())!r} is not a simple "
                    "`export K=V`: only those are read (quote a value holding spaces), or "
                    "pass --env K=V"
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


def _export(key: str, value: str, literal: bool = False) -> str:
    """`export K="V"`: quotes, backslashes and backticks escaped, `$NAME` left to expand
    (escaped too when `literal`: a Docker image's ENV values are final)."""
    quoted = re.sub(r'([\\"`$])' if literal else r'([\\"`])', r"\\\1", value)
    return f'export {key}="{quoted}"'


def environment_file(env: Mapping[str, str], literal: bool = False) -> str:
    """`90-environment.sh`, sourced at container start: one `export K="V"` per variable.

    Values are kept as written, so `$NAME` references in them expand when it is sourced
    (the way `%environment` lines do in Apptainer); single quotes do not survive parsing.
    With `literal` (a pulled image's ENV) `$` is escaped too, so values stay as they are.
    """
    lines = ["#!/bin/sh", "# Written by rankwire build from the image's environment.", ""]
    lines += [_export(key, value, literal) for key, value in env.items()]
    return "\n".join(lines) + "\n"


@record
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
    # A pulled image's OCI Entrypoint (None: no OCI config, the image was not pulled).
    entrypoint: Optional[tuple[str, ...]] = None


def _small_object(image: SifImage, desc: Descriptor) -> bytes:
    if desc.size > _MAX_METADATA:
        raise SifError(
            f"{_shown(image.path)}: metadata object {desc.id} is {desc.size} bytes "
            f"(limit {_MAX_METADATA}); the image is corrupt, rebuild it"
        )
    data: bytes = image.read(desc)
    return data


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


def read_image_metadata(image: SifImage) -> ImageMetadata:
    """Deffile, labels, environment and runscript of a rankwire- or Apptainer-built image."""
    part = image.primary_partition()
    d = image.find(DataType.DEFFILE)
    deffile = _small_object(image, d).decode("utf-8", "replace") if d else ""
    labels: dict[str, str] = {}
    env: dict[str, str] = {}
    runscript: Optional[str] = None
    j = image.find(DataType.GENERIC_JSON, METADATA_NAME)
    if j is not None:
        try:
            doc = json.loads(_small_object(image, j))
        except ValueError:
            raise SifError(
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
        entrypoint=_oci_entrypoint(image),
    )


def _oci_entrypoint(image: SifImage) -> Optional[tuple[str, ...]]:
    """The Entrypoint of the OCI config a pull kept (ours: the whole config blob;
    Apptainer's: its `config` object); () if it has none, None without an OCI config."""
    d = image.find(DataType.GENERIC_JSON, OCI_CONFIG_NAME)
    if d is None:
        return None
    try:
        doc = json.loads(_small_object(image, d))
    except ValueError:
        return ()
    if isinstance(doc, dict) and isinstance(doc.get("config"), dict):
        doc = doc["config"]
    words = doc.get("Entrypoint") if isinstance(doc, dict) else None
    return tuple(str(w) for w in words) if isinstance(words, list) else ()


# The squashfs superblock's compression id (a little-endian u16 at byte 20) by name.
_COMPRESSORS = {1: "gzip", 2: "lzma", 3: "lzo", 4: "xz", 5: "lz4", 6: "zstd"}
# Those `rankwire build` packs with (mksquashfs -comp), the default first. Every page a
# container reads is unpacked by squashfuse, on one core, while the ranks wait for it.
# lz4 (packed with -Xhc, LZ4's high compression, which unpacks as fast): the fastest to
# unpack, ~1.3x zstd's size; a Slurm step of 2 MPICH ranks in the plugin's container
# ends ~40 ms sooner than from zstd. zstd: the smallest, ~3x faster than gzip. gzip:
# what `apptainer build` writes, for readers of neither (a kernel before 3.19 or 4.14 in
# Apptainer's setuid mode, squashfuse before 0.1.101).
COMPRESSIONS = ("lz4", "zstd", "gzip")


def squashfs_compression(image: SifImage) -> Optional[str]:
    """The compressor of the image's primary squashfs (None: not a squashfs, or an id
    this table does not know)."""
    part = image.primary_partition()
    head: bytes = image.read(dataclasses.replace(part, size=min(22, part.size)))
    if len(head) < 22 or head[:4] != b"hsqs":
        return None
    return _COMPRESSORS.get(int.from_bytes(head[20:22], "little"))


def _identity(image: SifImage, part: Descriptor) -> str:
    """sha256 of the SIF header, the descriptors and the squashfs superblock and tables.

    The tables (inodes, directories, fragment/id/export lookups) sit at the end of a
    squashfs and record every name, mode, owner, time, size and block size, so any
    rebuild or change in the tree changes them; file data itself is not read.
    """

    def part_bytes(start: int, size: int) -> bytes:
        data: bytes = image.read(dataclasses.replace(part, offset=part.offset + start, size=size))
        return data

    import hashlib

    h = hashlib.sha256(image.raw_metadata())
    head = part_bytes(0, min(96, part.size))
    h.update(head)
    if len(head) == 96:
        magic, _, used, tables = _SUPERBLOCK.unpack_from(head)
        if magic == b"hsqs" and 96 <= tables <= used <= part.size:
            start = max(tables, used - _TABLES_CAP)
            h.update(part_bytes(start, used - start))
    return f"sha256:{h.hexdigest()}"
