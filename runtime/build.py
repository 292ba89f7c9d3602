"""`rankwire build`: pack a root filesystem directory into a SIF laid out like `apptainer build`.

Objects: 1 Def.FILE, 2 JSON.Generic `inspect-metadata.json`, 3 the primary squashfs
partition, all in group 1. The squashfs also gets Apptainer's `/.singularity.d` metadata
files through mksquashfs pseudo files, so the source directory is never modified.
Those formats, and `read_image_metadata` which reads them back, are in `imagemeta`.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

from rankwire import __version__
from rankwire.errors import UserError
from rankwire.errors import shown as _shown
from rankwire.record import record
from rankwire.runtime.imagemeta import (
    COMPRESSIONS,
    ENV_NAME,
    ENV_SCRIPT,
    METADATA_NAME,
    OCI_CONFIG_NAME,
    Deffile,
    _export,
    environment_file,
    parse_deffile,
    parse_environment,
    parse_labels,
    runscript_file,
)
from rankwire.runtime.sif_format import DataType, FsType, PartType, goarch_from_machine
from rankwire.runtime.sif_write import ObjectInput, create_sif

BOOTSTRAP = "rankwire-dir"
# What an image not asked for a compressor is packed with: the default, then gzip when
# this mksquashfs cannot write it (one built without lz4), with a warning.
DEFAULT_COMPRESSIONS = (COMPRESSIONS[0], "gzip")
# mksquashfs's words for a file it could not read (it packs it empty or not at all)
UNREADABLE = re.compile(r"Could not open|Failed to read|skipping")

PathLike = Union[str, "os.PathLike[str]"]


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
            f"SOURCE_DATE_EPOCH='{raw}' is not a non-negative integer; "
            "set it to Unix seconds or unset it"
        )
    return value


def _build_labels(
    when: datetime.datetime, goarch: str, header: Mapping[str, str]
) -> dict[str, str]:
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


def _check_utf8(
    labels: Optional[Mapping[str, str]],
    env: Optional[Mapping[str, str]],
    runscript: Optional[str],
) -> None:
    """The image metadata is UTF-8 text (JSON, the definition file): refuse arguments
    holding other bytes (a Latin-1 é from the shell) with what to fix."""

    def utf8(text: str) -> bool:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True

    for option, what, pairs in (("--label", "labels", labels), ("--env", "variables", env)):
        for key, value in (pairs or {}).items():
            if not (utf8(key) and utf8(value)):
                raise UserError(
                    f"{option} {_shown(key)}={_shown(value)} is not UTF-8: {what} must be "
                    "UTF-8 text; convert it (e.g. with iconv -f latin1 -t utf-8)"
                )
    if runscript is not None and not utf8(runscript):
        raise UserError(
            f"--runscript {_shown(runscript)} is not UTF-8: the runscript must be UTF-8 "
            "text; convert it (e.g. with iconv -f latin1 -t utf-8)"
        )


def _generated_deffile(
    rootfs: Path, env: Mapping[str, str], labels: Mapping[str, str], runscript: Optional[str]
) -> str:
    # The path is only a note: shown escaped when it is not UTF-8.
    lines = [f"Bootstrap: {BOOTSTRAP}", f"From: {_shown(rootfs)}"]
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


@record
class MetaFile:
    """A file added to the squashfs through a mksquashfs pseudo definition."""

    path: str  # relative to the image root
    mode: str  # octal, as mksquashfs takes it
    content: str

    def source(self, work: Path) -> Path:
        """Where the content is staged for mksquashfs to `cat` it."""
        return work / self.path.replace("/", "_")


@record
class BuildPlan:
    """Everything `rankwire build` will pack, decided before anything is written.

    The scratch locations (a work directory and the squashfs file next to `out`) are made
    when the plan is applied, so the argv and the objects that name them are methods.
    """

    out: Path
    rootfs: Path
    mksquashfs: str
    deffile: str  # object 1, also /.singularity.d/Singularity
    metadata: bytes  # object 2, inspect-metadata.json
    goarch: str  # the primary partition's architecture
    deterministic: bool  # SOURCE_DATE_EPOCH is set: nil UUID and zero times
    files: tuple[MetaFile, ...]
    create_dirs: tuple[str, ...]  # /.singularity.d directories the rootfs lacks
    exclude: tuple[str, ...]  # rootfs paths the metadata files replace
    oci_config: Optional[bytes] = None  # a pulled image's OCI config, as Apptainer keeps it
    all_root: bool = True  # every file owned by root (False: owners as they are)
    # mksquashfs -comp, tried in order while this mksquashfs cannot write one (warned);
    # an asked-for compressor alone
    compressions: tuple[str, ...] = DEFAULT_COMPRESSIONS

    def pseudo_definitions(self, work: Path) -> list[str]:
        """The mksquashfs pseudo file lines: missing directories, then metadata files."""
        pseudo = [f"{rel} d 755 0 0" for rel in self.create_dirs]
        for f in self.files:
            pseudo.append(f"{f.path} f {f.mode} 0 0 cat {shlex.quote(str(f.source(work)))}")
        return pseudo

    def mksquashfs_argv(self, work: Path, dest: Path, offset: int, compression: str) -> list[str]:
        """mksquashfs packing the rootfs into `dest`, `offset` bytes in (into the SIF)."""
        argv = [self.mksquashfs, str(self.rootfs), str(dest), "-noappend"]
        argv += ["-comp", compression]
        argv += ["-Xhc"] if compression == "lz4" else []  # high compression: unpacks as fast
        argv += ["-offset", str(offset)] if offset else []
        argv += ["-all-root"] if self.all_root else []
        argv += ["-no-progress", "-quiet", "-pf", str(work / "pseudo")]
        if self.exclude:
            argv += ["-ef", str(work / "exclude")]
        return argv

    def sif_objects(self, squashfs: Path | Callable[[Path, int], int]) -> list[ObjectInput]:
        """Objects 1 Def.FILE, 2 JSON.Generic metadata, (3 JSON.Generic oci-config.json of
        a pulled image,) then the primary squashfs partition, as Apptainer orders them. The
        partition is a squashfs file, or a writer putting it into the SIF in place."""
        objects = [
            ObjectInput(DataType.DEFFILE, data=self.deffile.encode("utf-8")),
            ObjectInput(DataType.GENERIC_JSON, data=self.metadata, name=METADATA_NAME),
        ]
        if self.oci_config is not None:
            objects.append(
                ObjectInput(DataType.GENERIC_JSON, data=self.oci_config, name=OCI_CONFIG_NAME)
            )
        return [
            *objects,
            ObjectInput(
                DataType.PARTITION,
                path=squashfs if isinstance(squashfs, Path) else None,
                writer=None if isinstance(squashfs, Path) else squashfs,
                fs_type=FsType.SQUASHFS,
                part_type=PartType.PRIMSYS,
                arch=self.goarch,
            ),
        ]


@record
class _Definition:
    """The definition file text and what it says once the caller's overrides apply."""

    text: str
    parsed: Deffile
    env: dict[str, str]
    labels: dict[str, str]
    runscript: Optional[str]


def _read_deffile(deffile: PathLike) -> str:
    try:
        return Path(deffile).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise UserError(f"definition file {_shown(deffile)}: {reason}") from None


def _definition(
    rootfs: Path,
    deffile: Optional[PathLike],
    labels: Optional[Mapping[str, str]],
    env: Optional[Mapping[str, str]],
    runscript: Optional[str],
    recorded: Optional[tuple[str, Mapping[str, str]]] = None,
) -> _Definition:
    """Read `deffile` (or generate one from the overrides) and apply the overrides.
    `recorded`: (definition file text, its image stage's header) to store as they are,
    the env, labels and runscript coming from the overrides alone."""
    final_env: dict[str, str] = {}
    user_labels: dict[str, str] = {}
    final_runscript: Optional[str] = None
    if recorded is not None:
        return _Definition(
            recorded[0],
            Deffile(dict(recorded[1]), {}),
            dict(env or {}),
            dict(labels or {}),
            runscript,
        )
    if deffile is not None:
        def_text = _read_deffile(deffile)
        parsed = parse_deffile(def_text, str(deffile))
        final_env = parse_environment(
            parsed.sections.get("environment", ""), f"{deffile} %environment"
        )
        user_labels = parse_labels(parsed.sections.get("labels", ""))
        final_runscript = parsed.sections.get("runscript") or None
    for key in env or {}:
        if not ENV_NAME.match(key):
            raise UserError(f"--env '{key}': not a variable name; use --env NAME=VALUE")
    final_env.update(env or {})
    user_labels.update(labels or {})
    if runscript is not None:
        final_runscript = runscript
    if deffile is None:
        def_text = _generated_deffile(rootfs, final_env, user_labels, final_runscript)
        parsed = parse_deffile(def_text)
    return _Definition(def_text, parsed, final_env, user_labels, final_runscript)


def _metadata_json(
    d: _Definition, labels: Mapping[str, str], env_script: str, run_file: str
) -> bytes:
    """inspect-metadata.json: Apptainer's attributes plus rankwire's exact env/runscript."""
    metadata = {
        "data": {
            "attributes": {
                "deffile": d.text,
                "labels": labels,
                "environment": {ENV_SCRIPT: env_script},
                "runscript": run_file,
            }
        },
        "type": "container",
        "rankwire": {
            "version": 1,
            "env": [[k, v] for k, v in d.env.items()],
            "runscript": d.runscript,
            "deffile_header": d.parsed.header,
            "deffile_sections": sorted(d.parsed.sections),
        },
    }
    text = json.dumps(metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8")


def _checked_rootfs(rootfs_dir: PathLike) -> Path:
    rootfs = Path(rootfs_dir).absolute()
    if not rootfs.is_dir():
        what = "does not exist" if not os.path.lexists(rootfs) else "is not a directory"
        raise UserError(f"root filesystem {_shown(rootfs_dir)} {what}; pass the directory to pack")
    return rootfs


def _find_mksquashfs() -> str:
    mksquashfs = shutil.which("mksquashfs")
    if mksquashfs is None:
        raise UserError(
            "mksquashfs not found on PATH; install squashfs-tools (apt install squashfs-tools)"
        )
    return mksquashfs


def plan_build(
    out: PathLike,
    rootfs_dir: PathLike,
    *,
    deffile: Optional[PathLike] = None,
    labels: Optional[Mapping[str, str]] = None,
    env: Optional[Mapping[str, str]] = None,
    runscript: Optional[str] = None,
    oci_config: Optional[bytes] = None,
    goarch: Optional[str] = None,
    literal_env: bool = False,
    recorded_deffile: Optional[tuple[str, Mapping[str, str]]] = None,
    keep_owners: bool = False,
    compression: Optional[str] = None,
    prefer: Optional[str] = None,
) -> BuildPlan:
    """What `build_image` will pack (same arguments); checks the inputs, writes nothing.
    `oci_config`: the OCI image config of a pulled image, kept as `oci-config.json`;
    `goarch`: its architecture (default: this machine's); `literal_env`: its env values are
    final (`$` kept, not expanded by Apptainer when it sources the env script);
    `recorded_deffile`: (text, header) of a definition file built by `runtime/defbuild`,
    stored as object 1 while env, labels and runscript come from the arguments;
    `keep_owners`: pack files with their owners (a definition-file build), not all root;
    `compression`: one of COMPRESSIONS, the only one tried (None: DEFAULT_COMPRESSIONS);
    `prefer`: one tried first, then those (what `--save` keeps of its source)."""
    if compression is not None:
        check_compression(compression)
        compressions: tuple[str, ...] = (compression,)
    elif prefer is not None:
        check_compression(prefer)
        compressions = tuple(dict.fromkeys((prefer, *DEFAULT_COMPRESSIONS)))
    else:
        compressions = DEFAULT_COMPRESSIONS
    out_path = Path(out).absolute()
    rootfs = _checked_rootfs(rootfs_dir)
    _check_output(out_path, rootfs)
    mksquashfs = _find_mksquashfs()
    epoch = _source_date_epoch()
    goarch = goarch or goarch_from_machine()
    _check_utf8(labels, env, runscript)
    d = _definition(rootfs, deffile, labels, env, runscript, recorded_deffile)
    when = (
        datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
        if epoch is not None
        else datetime.datetime.now().astimezone()
    )
    all_labels = _build_labels(when, goarch, d.parsed.header)
    all_labels.update(d.labels)
    env_script = environment_file(d.env, literal_env)
    run_file = runscript_file(d.runscript)
    labels_json = json.dumps(all_labels, sort_keys=True, indent="\t", ensure_ascii=False)
    files = (
        MetaFile(".singularity.d/Singularity", "644", d.text),
        MetaFile(".singularity.d/labels.json", "644", labels_json + "\n"),
        MetaFile(".singularity.d/runscript", "755", run_file),
        MetaFile(".singularity.d/env/90-environment.sh", "755", env_script),
    )
    create, exclude = _meta_dir_state(rootfs)
    return BuildPlan(
        out=out_path,
        rootfs=rootfs,
        mksquashfs=mksquashfs,
        deffile=d.text,
        metadata=_metadata_json(d, all_labels, env_script, run_file),
        goarch=goarch,
        deterministic=epoch is not None,
        files=files,
        create_dirs=tuple(create),
        exclude=tuple(exclude),
        oci_config=oci_config,
        all_root=not keep_owners,
        compressions=compressions,
    )


def check_compression(compression: str) -> None:
    if compression not in COMPRESSIONS:
        raise UserError(
            f"--compression {_shown(compression)}: choose one of {', '.join(COMPRESSIONS)}"
        )


def stage(plan: BuildPlan, work: Path) -> None:
    """Write the metadata files' contents and the pseudo and exclude files into `work`."""
    for f in plan.files:
        f.source(work).write_text(f.content, encoding="utf-8")
    pseudo = plan.pseudo_definitions(work)
    (work / "pseudo").write_text("\n".join(pseudo) + "\n", encoding="utf-8")
    if plan.exclude:
        (work / "exclude").write_text("\n".join(plan.exclude) + "\n", encoding="utf-8")


def _run_tool(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace"
    )


def pack(
    plan: BuildPlan,
    work: Path,
    dest: Path,
    offset: int,
    failed: str,
    run: Callable[[list[str]], subprocess.CompletedProcess[str]] = _run_tool,
) -> list[str]:
    """Pack the plan's rootfs (staged in `work`) into `dest` at `offset` with the first of
    its compressions this mksquashfs can write; mksquashfs's output lines. `failed` begins
    the error; `run` runs mksquashfs (`--save`'s dies with it)."""
    for i, compression in enumerate(plan.compressions):
        proc = run(plan.mksquashfs_argv(work, dest, offset, compression))
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        if proc.returncode == 0:
            return lines
        cannot = any("not supported" in ln and compression in ln for ln in lines)
        if cannot and i + 1 < len(plan.compressions):
            print(
                f"rankwire: warning: this mksquashfs cannot write {compression}: "
                f"packing with {plan.compressions[i + 1]}",
                file=sys.stderr,
            )
            continue
        detail = "; ".join(lines[-3:]) or f"exit status {proc.returncode}"
        fix = ""
        if cannot and plan.compressions == (compression,) and compression != "gzip":
            fix = f"; this mksquashfs cannot write {compression}: give --compression gzip"
        raise UserError(f"{failed}: {_shown(detail)}{fix}")
    raise AssertionError("a plan has at least one compression")


def _pack_checked(plan: BuildPlan, work: Path, dest: Path, offset: int) -> int:
    """`pack` for `apply_build`, which also refuses files mksquashfs could not read: the
    squashfs's size."""
    stage(plan, work)
    lines = pack(plan, work, dest, offset, f"mksquashfs failed on {_shown(plan.rootfs)}")
    unread = [ln for ln in lines if UNREADABLE.search(ln)]
    if unread:
        raise UserError(
            f"mksquashfs could not read {len(unread)} path(s) under {_shown(plan.rootfs)} "
            f"(first: {_shown(unread[0])}); make them readable by this user"
        )
    return dest.stat().st_size - offset


def apply_build(plan: BuildPlan, scratch: Optional[Path] = None) -> None:
    """Run mksquashfs straight into the SIF `plan.out` (replaced atomically; no copy of the
    squashfs). `scratch`: where its work dir goes (a pull's own, which the next pull removes
    if this one is killed)."""
    work = Path(tempfile.mkdtemp(prefix="rankwire-build-", dir=scratch))

    def pack_into(sif: Path, offset: int) -> int:
        return _pack_checked(plan, work, sif, offset)

    try:
        create_sif(plan.out, plan.sif_objects(pack_into), deterministic=plan.deterministic)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_image(
    out: PathLike,
    rootfs_dir: PathLike,
    *,
    deffile: Optional[PathLike] = None,
    labels: Optional[Mapping[str, str]] = None,
    env: Optional[Mapping[str, str]] = None,
    runscript: Optional[str] = None,
    compression: Optional[str] = None,
) -> None:
    """Pack `rootfs_dir` into the SIF `out` (replaced atomically); the source is untouched.

    `deffile` is the path of an Apptainer definition file: its text becomes object 1 and
    its %environment, %labels and %runscript sections feed the metadata; `labels`, `env`
    and `runscript` override them. With SOURCE_DATE_EPOCH set the output is reproducible.
    """
    plan = plan_build(
        out,
        rootfs_dir,
        deffile=deffile,
        labels=labels,
        env=env,
        runscript=runscript,
        compression=compression,
    )
    apply_build(plan)
