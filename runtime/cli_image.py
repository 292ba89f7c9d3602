"""Image commands: `rankwire build`, `rankwire inspect`, `rankwire sif list|dump`."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any, Optional

import click

from rankwire.errors import UserError, shown
from rankwire.runtime.cli_options import click_options
from rankwire.runtime.imagemeta import COMPRESSIONS
from rankwire.runtime.options import take_options

if TYPE_CHECKING:
    from rankwire.runtime.sif_read import SifImage


def _pairs(option: str, values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key or any(c.isspace() for c in key):
            raise UserError(
                f"{option} '{shown(item)}': expected KEY=VALUE; e.g. {option} NAME=value"
            )
        out[key] = value
    return out


@click.command(name="build")
@click.argument("out", type=click.Path())
@click.argument("source", metavar="RECIPE.def|ROOTFS_DIR", type=click.Path())
@click.option("--deffile", type=click.Path(), help="Apptainer definition file to record.")
@click.option("--label", "labels", multiple=True, metavar="K=V", help="Image label.")
@click.option("--env", "env", multiple=True, metavar="K=V", help="Container environment.")
@click.option("--runscript", metavar="TEXT", help="Runscript body (default: none).")
@click.option("--sandbox", is_flag=True, help="RECIPE.def: write OUT as a directory, not a SIF.")
@click.option("--notest", is_flag=True, help="RECIPE.def: do not run %test after the build.")
@click.option("--allow-setup", is_flag=True, help="RECIPE.def: run %setup on the host.")
@click.option(
    "--keep-sandbox", is_flag=True, help="RECIPE.def: keep the build sandboxes (to debug)."
)
@click.option(
    "--ignore-subuid",
    is_flag=True,
    help="RECIPE.def: one mapped id and fakeroot, even with a /etc/subuid range.",
)
@click.option("-v", "--verbose", is_flag=True, help="RECIPE.def: say what each step does.")
@click.option(
    "--compression",
    type=click.Choice(COMPRESSIONS),
    help="The squashfs compressor: lz4 (default: fastest to start), zstd (smallest, "
    "~0.75x lz4's size), gzip (what apptainer build writes: for readers without zstd or lz4).",
)
@click_options("source")
def build_cmd(
    out: str,
    source: str,
    deffile: Optional[str],
    labels: tuple[str, ...],
    env: tuple[str, ...],
    runscript: Optional[str],
    sandbox: bool,
    notest: bool,
    allow_setup: bool,
    keep_sandbox: bool,
    ignore_subuid: bool,
    verbose: bool,
    compression: Optional[str],
    **kw: Any,
) -> None:
    """Build the SIF image OUT from RECIPE.def (an Apptainer definition file), or pack
    ROOTFS_DIR into OUT, laid out like `apptainer build`.

    A recipe's %post runs as root in a user namespace (-v says how). The directory is not
    modified. With SOURCE_DATE_EPOCH set, the image is reproducible byte for byte.
    """
    import os

    from rankwire.runtime.pull import access_from_env

    given_source = take_options(kw, "source")
    if os.path.isdir(source) or not (os.path.exists(source) or source.endswith(".def")):
        recipe_only = [
            name
            for name, given in (
                ("--sandbox", sandbox),
                ("--notest", notest),
                ("--allow-setup", allow_setup),
                ("--keep-sandbox", keep_sandbox),
                ("--ignore-subuid", ignore_subuid),
            )
            if given
        ]
        if recipe_only:
            raise UserError(
                f"{recipe_only[0]} is for building from a definition file, and "
                f"{shown(source)} is a directory; drop it, or give RECIPE.def"
            )
        from rankwire.runtime.build import build_image

        build_image(
            out,
            source,
            deffile=deffile,
            labels=_pairs("--label", labels),
            env=_pairs("--env", env),
            runscript=runscript,
            compression=compression,
        )
        click.echo(f"rankwire: built {shown(out)}")
        return
    given = [n for n, v in (("--deffile", deffile), ("--runscript", runscript)) if v]
    given += [n for n, v in (("--label", labels), ("--env", env)) if v]
    if given:
        raise UserError(
            f"{given[0]} is for packing a directory; with a definition file put it in the "
            "recipe (%labels, %environment, %runscript)"
        )
    if sandbox and compression:
        raise UserError(
            "--compression is for a SIF and --sandbox writes a directory: drop one of them"
        )
    from rankwire.runtime.defbuild import build_from_deffile

    build_from_deffile(
        out,
        source,
        sandbox=sandbox,
        notest=notest,
        allow_setup=allow_setup,
        keep_sandbox=keep_sandbox,
        ignore_subuid=ignore_subuid,
        verbose=verbose,
        access=access_from_env(
            insecure=given_source.get("insecure"), ca_cert=given_source.get("ca_cert")
        ),
        arch=given_source.get("arch"),
        compression=compression,
    )
    click.echo(f"rankwire: built {shown(out)}")


def _list_lines(image: SifImage) -> list[str]:
    """The rows of `siftool list`, same columns and spacing."""
    rule = "-" * 78
    lines = [rule, f"{'ID':<4} {'|GROUP':<8} {'|LINK':<8} {'|SIF POSITION (start-end)':<26} |TYPE"]
    lines.append(rule)
    for d in image.descriptors:
        group = "NONE" if d.group_id == 0 else str(d.group_id)
        if d.linked_id == 0:
            link = f"{'NONE':<7}"
        elif d.linked_group:
            link = f"{d.linked_id:<3} (G)"
        else:
            link = f"{d.linked_id:<7}"
        position = f"|{d.offset}-{d.offset + d.size} "
        lines.append(f"{d.id:<4} |{group:<7} |{link} {position:<26} |{d.type_label}")
    return lines


@click.command(name="inspect")
@click.argument("image")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--deffile", "only_deffile", is_flag=True, help="Print the definition file only.")
def inspect_cmd(image: str, as_json: bool, only_deffile: bool) -> None:
    """Show an image's definition file, labels, environment, runscript and objects."""
    from rankwire.runtime.imagefacts import check_image_path
    from rankwire.runtime.imagemeta import read_image_metadata, squashfs_compression
    from rankwire.runtime.sif_read import SifImage

    check_image_path(image)
    with SifImage.open(image) as img:
        meta = read_image_metadata(img)
        compression = squashfs_compression(img)
        objects = [
            {
                "id": d.id,
                "type": d.type_label,
                "name": d.name,
                "group_id": d.group_id,
                "linked_id": d.linked_id,
                "linked_group": d.linked_group,
                "offset": d.offset,
                "size": d.size,
            }
            for d in img.descriptors
        ]
        listing = _list_lines(img)
    if only_deffile:
        click.echo(meta.deffile, nl=False)
        return
    if as_json:
        doc = {
            "path": image,
            "arch": meta.arch,
            "identity": meta.identity,
            "deffile": meta.deffile,
            "labels": meta.labels,
            "env": meta.env,
            "runscript": meta.runscript,
            "entrypoint": None if meta.entrypoint is None else list(meta.entrypoint),
            "partition": {
                "offset": meta.partition_offset,
                "size": meta.partition_size,
                "compression": compression,
            },
            "objects": objects,
        }
        click.echo(json.dumps(doc, indent=2))
        return

    def block(title: str, text: str) -> None:
        click.echo(f"{title}:")
        for line in text.splitlines() or ["(none)"]:
            click.echo(f"    {line}")

    click.echo(f"Image:     {image}")
    click.echo(f"Arch:      {meta.arch}")
    click.echo(f"Identity:  {meta.identity}")
    click.echo(
        f"Partition: offset {meta.partition_offset}, {meta.partition_size} bytes, "
        + (f"{compression} squashfs" if compression else "compression unknown")
    )
    block("Labels", "\n".join(f"{k}: {v}" for k, v in sorted(meta.labels.items())))
    block("Environment", "\n".join(f"{k}={v}" for k, v in meta.env.items()))
    block("Runscript", meta.runscript or "")
    if meta.entrypoint is not None:  # a pulled image's (exec --entrypoint runs it)
        click.echo(f"Entrypoint: {json.dumps(list(meta.entrypoint))}")
    block("Definition file", meta.deffile)
    click.echo("Objects:")
    for line in listing:
        click.echo(f"    {line}")


@click.group(name="sif")
def sif_group() -> None:
    """Low-level SIF views (like siftool)."""


@sif_group.command(name="list")
@click.argument("image")
def sif_list(image: str) -> None:
    """List the data objects, in the format of `siftool list`."""
    from rankwire.runtime.imagefacts import check_image_path
    from rankwire.runtime.sif_read import SifImage

    check_image_path(image)
    with SifImage.open(image) as img:
        for line in _list_lines(img):
            click.echo(line)


@sif_group.command(name="dump")
@click.argument("image")
@click.argument("object_id", type=int)
def sif_dump(image: str, object_id: int) -> None:
    """Write the raw bytes of object OBJECT_ID to stdout."""
    from rankwire.runtime.imagefacts import check_image_path
    from rankwire.runtime.sif_read import SifImage

    out = sys.stdout.buffer
    check_image_path(image)
    with SifImage.open(image) as img:
        for chunk in img.iter_object(img.get(object_id)):
            out.write(chunk)
    out.flush()
