"""Image commands that talk to registries: pull, push, and the image cache."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import click

from rankwire.errors import UserError, shown
from rankwire.runtime import pull as pulling
from rankwire.runtime.cli_options import click_options
from rankwire.runtime.options import take_options
from rankwire.runtime.reference import Access, parse_reference

F = TypeVar("F", bound=Callable[..., Any])
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)i?B?\Z", re.IGNORECASE)


def _size(text: str) -> int:
    m = _SIZE.match(text.strip())
    if not m:
        raise UserError(f"--max-expanded-size {shown(text)}: write a size such as 20G or 512M")
    return int(float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))


def registry_options(f: F) -> F:
    f = click.option("--quiet", "-q", is_flag=True, help="No progress output.")(f)
    f = click.option(
        "--password-stdin", is_flag=True, help="Read the registry password from stdin."
    )(f)
    f = click.option("--username", metavar="USER", help="Registry user name.")(f)
    return click_options("source")(f)


def _access(kw: dict[str, Any]) -> Access:
    source = take_options(kw, "source")
    username, from_stdin = kw.pop("username"), kw.pop("password_stdin")
    password = None
    if from_stdin:
        if username is None:
            raise UserError("--password-stdin needs --username USER")
        password = sys.stdin.readline().rstrip("\r\n")
    kw["arch"] = source.get("arch")
    return pulling.access_from_env(
        insecure=source.get("insecure"),
        ca_cert=source.get("ca_cert"),
        username=username,
        password=password,
    )


def _default_name(source: str) -> str:
    """Apptainer's name for `pull SOURCE`: the repository's last part and the tag."""
    ref = parse_reference(source)
    tag = ref.tag or (ref.digest or "latest")[7:19]
    return f"{ref.repository.rsplit('/', 1)[-1]}_{tag}.sif"


FICLONE = 0x40049409  # linux/fs.h: share the extents (btrfs, XFS): no data copied


def _clone_or_copy(src: str, dest: Path) -> None:
    """`dest` a copy of `src`: a reflink where the filesystem has them, else a copy. Never
    a hardlink: `rankwire sign` rewrites its image in place, which must not reach the cache."""
    import fcntl

    with open(src, "rb") as s, open(dest, "wb") as d:
        try:
            fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
            return
        except OSError:
            pass
    shutil.copyfile(src, dest)


def _copy_out(cached: str, out: Path, force: bool) -> None:
    if out.is_dir():
        raise UserError(f"{shown(out)} is a directory; give the path of the .sif file to write")
    if out.exists() and not force:
        raise UserError(f"{shown(out)} exists; remove it or pass --force to overwrite it")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        _clone_or_copy(cached, tmp)
        os.replace(tmp, out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"cannot write {shown(out)} ({err.strerror}); choose a writable path"
        ) from None


@click.command("pull")
@registry_options
@click.option("--force", "-F", is_flag=True, help="Overwrite OUT.sif if it exists.")
@click.option(
    "--max-expanded-size",
    default="64G",
    show_default=True,
    metavar="SIZE",
    help="Refuse images whose layers unpack to more than this (gzip bombs).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.argument("args", nargs=-1, required=True)
def pull_cmd(
    args: tuple[str, ...], force: bool, max_expanded_size: str, as_json: bool, **kw: Any
) -> None:
    """Pull [OUT.sif] SOURCE: a docker:// image (converted to a SIF) or an oras:// SIF.

    The image goes to the cache (RANKWIRE_CACHEDIR, default ~/.cache/rankwire) and is
    copied to OUT.sif (default: NAME_TAG.sif here, as Apptainer names it).
    """
    if len(args) > 2:
        raise UserError("pull takes [OUT.sif] SOURCE; give at most two arguments")
    source = args[-1]
    parse_reference(source)  # a bad reference fails before anything is read
    out = Path(args[0] if len(args) == 2 else _default_name(source))
    if out.exists() and not force:
        raise UserError(f"{shown(out)} exists; remove it or pass --force to overwrite it")
    access = _access(kw)
    progress = pulling.Progress(quiet=kw.pop("quiet") or as_json)
    result = pulling.pull(
        source,
        access,
        progress=progress,
        arch=kw.pop("arch"),
        max_expanded=_size(max_expanded_size),
    )
    _copy_out(result.path, out, force)
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "output": str(out.absolute())}, sort_keys=True))
    else:
        progress.say(
            f"{'cached' if result.cache_hit else 'pulled'} {result.reference} -> {shown(out)}"
        )


@click.command("push")
@registry_options
@click.argument("image")
@click.argument("dest")
def push_cmd(image: str, dest: str, **kw: Any) -> None:
    """Push the SIF IMAGE to oras://REGISTRY/REPO:TAG (what `apptainer pull oras://` takes)."""
    access = _access(kw)
    kw.pop("arch")
    progress = pulling.Progress(quiet=kw.pop("quiet"))
    digest = pulling.push(image, dest, access, progress)
    progress.say(f"pushed {shown(image)} to {shown(dest)} ({digest})")


@click.group("cache")
def cache_group() -> None:
    """The image cache: SIFs by manifest digest and their blobs."""


def _entries(root: Path) -> list[dict[str, Any]]:
    rows = []
    for sif in sorted((root / "sif").glob("*.sif")):
        meta_path = sif.with_suffix(".json")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = {}
        st = sif.stat()
        rows.append(
            {
                "kind": "sif",
                "path": str(sif),
                "size": st.st_size,
                "reference": meta.get("reference", ""),
                "used": st.st_atime,
                "pulled": meta.get("pulled", st.st_mtime),
            }
        )
    for blob in sorted((root / "blobs" / "sha256").glob("*")):
        st = blob.stat()
        rows.append(
            {
                "kind": "blob",
                "path": str(blob),
                "size": st.st_size,
                "reference": f"sha256:{blob.name}",
                "used": st.st_atime,
                "pulled": st.st_mtime,
            }
        )
    return rows


@cache_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
def cache_list(as_json: bool) -> None:
    """List cached SIFs and blobs with their sizes."""
    root = pulling.cache_root()
    rows = _entries(root) if root.is_dir() else []
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    for row in rows:
        mib = row["size"] / (1 << 20)
        click.echo(f"{row['kind']}\t{mib:9.1f} MiB\t{row['reference']}")
    total = sum(r["size"] for r in rows) / (1 << 20)
    click.echo(f"total\t{total:9.1f} MiB\t{len(rows)} entries in {shown(root)}")


@cache_group.command("clean")
@click.option(
    "--older-than",
    type=click.FloatRange(min=0),
    metavar="DAYS",
    help="Only entries pulled or last used more than DAYS days ago.",
)
def cache_clean(older_than: Optional[float]) -> None:
    """Remove cached SIFs and blobs, records of verified images, host MPI, host
    libfabric and image fabric facts, launch warm lists (all, or those older than
    --older-than DAYS)."""
    root = pulling.cache_root()
    cutoff = time.time() - (older_than or 0) * 86400
    kinds = (
        ("verified", "verification"),
        ("host-mpi", "host MPI"),
        ("host-libfabric", "host libfabric"),
        ("fabric-image", "image fabric"),
        ("warm", "warm list"),
    )
    for sub, what in kinds:
        records = 0
        for entry in [*(root.parent / sub).glob("[0-9a-f]*"), *(root.parent / sub).glob(".tmp-*")]:
            with contextlib.suppress(OSError):
                if older_than is None or entry.stat().st_mtime < cutoff:
                    entry.unlink()
                    records += 1
        if records:
            click.echo(f"removed {records} {what} records")
    if not root.is_dir():
        click.echo(f"removed 0 entries (0.0 MiB) from {shown(root)}")
        return
    removed, freed = 0, 0
    for row in _entries(root):
        if older_than is not None and max(row["used"], row["pulled"]) > cutoff:
            continue
        path = Path(row["path"])
        if not pulling.remove_entry(root, path):
            continue
        removed, freed = removed + 1, freed + row["size"]
    click.echo(f"removed {removed} entries ({freed / (1 << 20):.1f} MiB) from {shown(root)}")
