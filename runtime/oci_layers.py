"""Apply OCI/Docker image layers (tar streams) to a root filesystem directory, safely.

Every write is made relative to a directory fd reached from the rootfs fd one component
at a time with O_NOFOLLOW: a symlink of the image, or one a layer has just made, is never
followed, and an entry whose parent path goes through a symlink is refused. Whiteouts
follow the OCI image spec with umoci's reading: a whiteout removes only what lower layers
wrote, never what its own layer wrote. Nothing is chowned (the SIF is packed -all-root);
modes are the image's, setuid bits included, plus owner read on files and owner rwx on
directories, so an unprivileged mksquashfs reads everything and later layers can write
into a 0555 directory (Apptainer's unprivileged builds make the same fix). Device nodes
are skipped: containers get the host's /dev.

The expanded size is the decompressed tar stream, counted as it is read: a member whose
content would pass the cap is refused from its header, before any of it is written.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib
import io
import os
import shutil
import stat
import tarfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence, Tuple

from rankwire.errors import UserError, shown
from rankwire.record import record

MIB = 1 << 20
MAX_ENTRIES = 2_000_000
MAX_DEPTH = 256  # components of an entry name; bounds the recursion of removals
HEADER_SLACK = 16 * MIB  # tar headers beyond 1.5 KiB an entry (pax, GNU long names)

LAYER_MEDIA_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_CHUNK = 1 << 20
_DIR = os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_PATH = getattr(os, "O_PATH", os.O_RDONLY)

ImagePath = Tuple[str, ...]  # components below the root; () is the root
_Errors = Tuple[type[BaseException], ...]


class _Source(Protocol):
    def read(self, size: int, /) -> bytes: ...


@record
class Layer:
    """One layer blob to apply (its digest already checked by the caller)."""

    path: Path
    media_type: str
    digest: str  # "sha256:<hex>", only for messages


def apply_layers(
    rootfs: Path,
    layers: Sequence[Layer],
    *,
    max_expanded: int,
    note: Callable[[str], None],
) -> None:
    """Apply the layers in order into the existing empty directory `rootfs`.

    Raises `UserError` (one line naming the layer) on an unsafe, corrupt or oversized
    layer; the caller removes the half-written rootfs. `note` gets at most one line per
    call: how many device nodes were skipped."""
    root_fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    applier = _Applier(root_fd, max_expanded)
    try:
        for layer in layers:
            applier.apply(layer)
        applier.restore_dir_times()
    finally:
        applier.forget()
        os.close(root_fd)
    if applier.devices:
        note(
            f"skipped {applier.devices} device node(s) (first: {shown(applier.first_device)}); "
            "containers get the host's /dev"
        )


def short_digest(digest: str) -> str:
    """`sha256:` and the first 12 hex digits, as messages show a layer."""
    algo, _, hexpart = digest.partition(":")
    return f"{algo}:{hexpart[:12]}" if hexpart else digest[:19]


class _Corrupt(Exception):
    """The layer's stream cannot be decompressed or parsed."""


class _TooBig(Exception):
    """The layers expand beyond the cap."""


class _HugeHeaders(Exception):
    """Tar headers (which tarfile reads into memory) far bigger than any real ones."""


class _ThroughSymlink(Exception):
    """A path's parent goes through a symlink (args: the symlink's image path)."""


class _Reader(io.BufferedIOBase):
    """A layer's decompressed tar stream for tarfile: counts what is read against the
    cap (so pax headers and skipped data count too) and turns decompression errors into
    `_Corrupt`."""

    def __init__(self, source: _Source, applier: _Applier, errors: _Errors) -> None:
        super().__init__()
        self._source = source
        self._applier = applier
        self._errors: _Errors = (OSError, EOFError, zlib.error, *errors)

    def readable(self) -> bool:
        return True

    def read(self, size: Optional[int] = -1, /) -> bytes:
        """At most _CHUNK bytes (tarfile reads until it has what it asked for): never
        more of a bomb in memory than that before it is counted."""
        want = _CHUNK if size is None or size < 0 else min(size, _CHUNK)
        try:
            data = self._source.read(want)
        except self._errors as err:
            raise _Corrupt(str(err) or type(err).__name__) from err
        applier = self._applier
        applier.consumed += len(data)
        if applier.consumed > applier.max_expanded:
            raise _TooBig
        if applier.consumed > applier.content + 3 * 512 * applier.entries + HEADER_SLACK:
            raise _HugeHeaders
        return data


class _Applier:
    """The state of one `apply_layers` call: the rootfs fd, the counters, the directory
    times to restore, and the paths written by the layer being applied."""

    def __init__(self, root_fd: int, max_expanded: int) -> None:
        self.root_fd = root_fd
        self.max_expanded = max_expanded
        self.consumed = 0  # bytes of decompressed tar streams read
        self.content = 0  # of those, member contents (in 512-byte blocks)
        self.entries = 0
        self.devices = 0
        self.first_device = ""
        self.dir_times: dict[ImagePath, float] = {}
        self.layer = ""
        self.upper: set[ImagePath] = set()  # written by this layer
        self.upper_parents: set[ImagePath] = set()  # parents of those
        self._cached: Optional[tuple[ImagePath, int]] = None  # the last parent walked to

    # -- one layer -------------------------------------------------------------------

    def apply(self, layer: Layer) -> None:
        self.layer = short_digest(layer.digest)
        if layer.media_type not in LAYER_MEDIA_TYPES:
            raise UserError(
                f"layer {self.layer} has media type {layer.media_type}, which is not an image "
                "layer; pull artifacts such as a SIF with oras:// instead of docker://"
            )
        self.upper = set()
        self.upper_parents = set()
        start = self.consumed
        try:
            with self._decompressed(layer) as (source, errors):
                self._extract(_Reader(source, self, errors))
        except _HugeHeaders:
            raise UserError(
                f"layer {self.layer} has tar headers over {HEADER_SLACK // MIB} MiB (a tar "
                "bomb?); refusing it: rebuild the image"
            ) from None
        except _TooBig:
            raise UserError(
                f"layer {self.layer} expands beyond the {self.max_expanded / MIB:g} MiB cap "
                "(a gzip bomb?); raise it with --max-expanded-size if the image is really "
                "that big"
            ) from None
        except (_Corrupt, tarfile.TarError) as err:
            if isinstance(err, tarfile.ReadError) and self.consumed == start:
                return  # an empty stream: an empty layer, as Go's archive/tar reads it
            raise UserError(
                f"layer {self.layer}: truncated or corrupt ({err}); the image is broken: "
                "rebuild or re-push it"
            ) from None

    def _extract(self, reader: _Reader) -> None:
        with tarfile.open(fileobj=reader, mode="r|") as archive:
            for member in archive:
                self._entry(archive, member)

    @contextlib.contextmanager
    def _decompressed(self, layer: Layer) -> Iterator[tuple[_Source, _Errors]]:
        """The decompressed stream of the layer, chosen by its magic bytes (registries
        mislabel gzip as tar and the other way), and its decompressor's error types."""
        with open(layer.path, "rb") as raw:
            magic = raw.read(len(_ZSTD_MAGIC))
            raw.seek(0)
            if magic.startswith(_GZIP_MAGIC):
                with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
                    yield unzipped, ()
            elif magic == _ZSTD_MAGIC:
                zstandard = self._zstandard(layer)
                reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
                with reader:
                    yield reader, (zstandard.ZstdError,)
            else:
                yield raw, ()

    def _zstandard(self, layer: Layer) -> Any:
        try:
            return importlib.import_module("zstandard")
        except ImportError:
            raise UserError(
                f"layer {self.layer} has media type {layer.media_type} (zstd), which needs "
                "the Python module zstandard; install it (pip install zstandard) or pull a "
                "gzip variant of the image"
            ) from None

    # -- one entry -------------------------------------------------------------------

    def _entry(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        self.entries += 1
        if self.entries > MAX_ENTRIES:
            raise UserError(
                f"layer {self.layer}: the image has more than {MAX_ENTRIES} files "
                "(a tar bomb?); rankwire unpacks no more: make the image smaller"
            )
        has_data = member.isreg() or member.type not in tarfile.SUPPORTED_TYPES
        if has_data:
            if self.consumed + member.size > self.max_expanded:
                raise _TooBig
            self.content += -(-member.size // 512) * 512
        parts = self._parts(member.name)
        if parts and parts[-1].startswith(_WHITEOUT):
            self._whiteout(member.name, parts)
            return
        if member.type not in tarfile.SUPPORTED_TYPES:
            return  # a tar extension we have no use for (e.g. a volume label)
        if parts and (member.ischr() or member.isblk()):
            self.devices += 1
            self.first_device = self.first_device or "/".join(parts)
            return
        self.upper.add(parts)
        self.upper_parents.update(parts[:i] for i in range(len(parts)))
        member.mtime = _sane_time(member.mtime)
        try:
            if parts:
                self._write(archive, member, parts)
            else:
                self._root(member)
        except _ThroughSymlink as link:
            raise self._through_symlink(member.name, link) from None
        except OSError as err:
            raise UserError(
                f"layer {self.layer}: cannot unpack {shown(member.name)} ({err.strerror}); "
                "check the free space and permissions where images are unpacked"
            ) from None

    def _parts(self, name: str) -> ImagePath:
        """The entry's path below the root; unsafe names refused."""
        unsafe = ""
        if name.startswith("/"):
            unsafe = "is an absolute path"
        elif "\x00" in name:
            unsafe = "holds a NUL byte"
        parts = tuple(p for p in name.split("/") if p not in ("", "."))
        if not unsafe and ".." in parts:
            unsafe = "has a '..' component"
        if not unsafe and len(parts) > MAX_DEPTH:
            unsafe = f"is nested more than {MAX_DEPTH} directories deep"
        if unsafe:
            raise UserError(
                f"layer {self.layer}: entry {shown(name)} {unsafe}; refusing an unsafe layer: "
                "rebuild the image without it"
            )
        return parts

    def _through_symlink(self, name: str, link: _ThroughSymlink) -> UserError:
        return UserError(
            f"layer {self.layer}: entry {shown(name)} goes through the symlink "
            f"{shown(link.args[0])}; refusing to follow symlinks while unpacking: rebuild the "
            "image without it"
        )

    def _root(self, member: tarfile.TarInfo) -> None:
        if not member.isdir():
            raise UserError(
                f"layer {self.layer}: entry {shown(member.name)} would make the image's root "
                "a non-directory; refusing an unsafe layer: rebuild the image without it"
            )
        os.fchmod(self.root_fd, _dir_mode(member.mode))
        self.dir_times[()] = member.mtime

    def _write(self, archive: tarfile.TarFile, member: tarfile.TarInfo, parts: ImagePath) -> None:
        if member.islnk():
            self._hardlink(member, parts)
            return
        parent = self._parent(parts, create=True)
        assert parent is not None
        name = parts[-1]
        times = (member.mtime, member.mtime)
        kept = self._clear(parent, parts, new_is_dir=member.isdir())
        if member.isdir():
            if not kept:
                os.mkdir(name, 0o700, dir_fd=parent)
            with _opened(name, os.O_RDONLY | _DIR, parent) as fd:
                os.fchmod(fd, _dir_mode(member.mode))
            self.dir_times[parts] = member.mtime
        elif member.issym():
            if "\x00" in member.linkname:
                raise UserError(
                    f"layer {self.layer}: symlink {shown(member.name)} has a target with a NUL "
                    "byte; refusing a corrupt layer: rebuild the image"
                )
            os.symlink(member.linkname, name, dir_fd=parent)
            os.utime(name, times, dir_fd=parent, follow_symlinks=False)
        elif member.isfifo():
            os.mkfifo(name, 0o600, dir_fd=parent)
            flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
            with _opened(name, flags, parent) as fd:
                os.fchmod(fd, member.mode & 0o7777)
                os.utime(fd, times)
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            content = archive.extractfile(member)
            assert content is not None  # a regular file
            with os.fdopen(os.open(name, flags, 0o600, dir_fd=parent), "wb") as out:
                shutil.copyfileobj(content, out, _CHUNK)
                out.flush()
                # After the content: a write by a non-root owner clears setuid bits.
                os.fchmod(out.fileno(), _file_mode(member.mode))
                os.utime(out.fileno(), times)

    def _hardlink(self, member: tarfile.TarInfo, parts: ImagePath) -> None:
        target = self._link_target(member)
        if target == parts:
            return
        missing = UserError(
            f"layer {self.layer}: hard link {shown(member.name)} points to "
            f"{shown(member.linkname)}, which is not a file in the image (a link must come "
            "after its target); rebuild the image"
        )
        try:
            source = self._walk(target[:-1], create=False)
        except _ThroughSymlink as link:
            raise UserError(
                f"layer {self.layer}: hard link {shown(member.name)} points through the "
                f"symlink {shown(link.args[0])}; refusing to follow symlinks while unpacking: "
                "rebuild the image without it"
            ) from None
        if source is None:
            raise missing
        try:
            found = _lstat(target[-1], source)
            if found is None or stat.S_ISDIR(found.st_mode):
                raise missing
            parent = self._parent(parts, create=True)
            assert parent is not None
            self._clear(parent, parts, new_is_dir=False)
            os.link(
                target[-1],
                parts[-1],
                src_dir_fd=source,
                dst_dir_fd=parent,
                follow_symlinks=False,
            )
        finally:
            self._close(source)

    def _link_target(self, member: tarfile.TarInfo) -> ImagePath:
        """A hard link's target below the root: absolute targets are rooted at the image
        root, '..' is resolved by name, never through a symlink; outside is refused."""
        parts: list[str] = []
        outside = "\x00" in member.linkname
        for part in member.linkname.split("/"):
            if part == "..":
                outside = outside or not parts
                parts = parts[:-1]
            elif part not in ("", "."):
                parts.append(part)
        if outside or not parts:
            raise UserError(
                f"layer {self.layer}: hard link {shown(member.name)} points outside the image "
                f"({shown(member.linkname)}); refusing an unsafe layer: rebuild the image "
                "without it"
            )
        return tuple(parts)

    # -- whiteouts -------------------------------------------------------------------

    def _whiteout(self, name: str, parts: ImagePath) -> None:
        base = parts[-1]
        try:
            if base == _OPAQUE:
                self._opaque(parts[:-1])
                return
            if base.startswith(_WHITEOUT + _WHITEOUT):
                return  # aufs metadata (.wh..wh.plnk, ...), not a whiteout
            target = base[len(_WHITEOUT) :]
            if target in ("", ".", ".."):
                named = repr(target) if target else "nothing"
                raise UserError(
                    f"layer {self.layer}: whiteout {shown(name)} names {named}; "
                    "refusing an unsafe layer: rebuild the image without it"
                )
            path = (*parts[:-1], target)
            if path in self.upper or path in self.upper_parents:
                return  # this layer's own entry: a whiteout hides lower layers only
            parent = self._parent(path, create=False)
            found = None if parent is None else _lstat(target, parent)
            if parent is not None and found is not None:
                self._remove(parent, path, stat.S_ISDIR(found.st_mode))
        except _ThroughSymlink as link:
            raise self._through_symlink(name, link) from None
        except OSError as err:
            raise UserError(
                f"layer {self.layer}: cannot apply whiteout {shown(name)} ({err.strerror}); "
                "check the permissions where images are unpacked"
            ) from None

    def _opaque(self, path: ImagePath) -> None:
        """Empty directory `path` of what lower layers put in it (kept: what this layer
        wrote, and the directories leading to it)."""
        parent = self._walk(path[:-1], create=False) if path else self.root_fd
        if parent is None:
            return
        try:
            fd = self._open_dir(parent, path[-1]) if path else self.root_fd
            if fd is not None:
                try:
                    self._clear_lower(fd, path)
                finally:
                    self._close(fd)
        finally:
            self._close(parent)

    def _clear_lower(self, fd: int, path: ImagePath) -> None:
        for name, is_dir in _listing(fd):
            child = (*path, name)
            if child not in self.upper and child not in self.upper_parents:
                self._remove(fd, child, is_dir)
            elif is_dir:
                with _opened(name, os.O_RDONLY | _DIR, fd) as sub:
                    self._clear_lower(sub, child)

    # -- paths -----------------------------------------------------------------------

    def _parent(self, path: ImagePath, *, create: bool) -> Optional[int]:
        """A borrowed fd (valid until the next call) of the directory holding `path`'s
        last component; with `create`, missing directories are made (0755) and a
        non-directory in the way replaced. None when missing and not `create`."""
        dirs = path[:-1]
        if not dirs:
            return self.root_fd
        if self._cached is not None and self._cached[0] == dirs:
            return self._cached[1]
        fd = self._walk(dirs, create=create)
        if fd is not None:
            self.forget()
            self._cached = (dirs, fd)
        return fd

    def _walk(self, dirs: ImagePath, *, create: bool) -> Optional[int]:
        """An fd of directory `dirs` (the caller closes it with `_close`), reached one
        component at a time without following a symlink."""
        fd = self.root_fd
        try:
            for depth, name in enumerate(dirs, 1):
                found = _lstat(name, fd)
                if found is not None and stat.S_ISLNK(found.st_mode):
                    raise _ThroughSymlink("/".join(dirs[:depth]))
                if found is None or not stat.S_ISDIR(found.st_mode):
                    if not create:
                        self._close(fd)
                        return None
                    if found is not None:
                        self._remove(fd, dirs[:depth], is_dir=False)
                    os.mkdir(name, 0o700, dir_fd=fd)
                    with _opened(name, os.O_RDONLY | _DIR, fd) as made:
                        os.fchmod(made, 0o755)
                sub = os.open(name, _O_PATH | _DIR, dir_fd=fd)
                self._close(fd)
                fd = sub
        except BaseException:
            self._close(fd)
            raise
        return fd

    def _open_dir(self, parent: int, name: str) -> Optional[int]:
        """A readable fd of directory `name` in `parent`; None when it is not one."""
        found = _lstat(name, parent)
        if found is None or not stat.S_ISDIR(found.st_mode):
            return None
        return os.open(name, os.O_RDONLY | _DIR, dir_fd=parent)

    def _clear(self, parent: int, path: ImagePath, *, new_is_dir: bool) -> bool:
        """Make room for a new entry at `path`: True when an existing directory stays
        (directories merge), False when the place is now empty."""
        found = _lstat(path[-1], parent)
        if found is None:
            return False
        is_dir = stat.S_ISDIR(found.st_mode)
        if is_dir and new_is_dir:
            return True
        self._remove(parent, path, is_dir)
        return False

    def _remove(self, parent: int, path: ImagePath, is_dir: bool) -> None:
        """Remove `path` (its last component, in `parent`), a directory with its tree."""
        name = path[-1]
        if not is_dir:
            os.unlink(name, dir_fd=parent)
            return
        if self._cached is not None and self._cached[0][: len(path)] == path:
            self.forget()
        with _opened(name, os.O_RDONLY | _DIR, parent) as fd:
            _empty(fd)
        os.rmdir(name, dir_fd=parent)

    def _close(self, fd: int) -> None:
        if fd != self.root_fd:
            os.close(fd)

    def forget(self) -> None:
        """Drop the cached parent fd (its directory may be gone)."""
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    def restore_dir_times(self) -> None:
        """Set directory mtimes last: writing their entries changed them."""
        self.forget()
        for path, mtime in sorted(self.dir_times.items()):
            try:
                parent = self._walk(path[:-1], create=False) if path else self.root_fd
            except _ThroughSymlink:
                continue  # a later layer put a symlink where this directory's parent was
            if parent is None:
                continue
            try:
                fd = self._open_dir(parent, path[-1]) if path else self.root_fd
                if fd is not None:
                    os.utime(fd, (mtime, mtime))
                    self._close(fd)
            finally:
                self._close(parent)


def _sane_time(mtime: float) -> float:
    """A tar mtime os.utime takes (pax headers can hold anything); 0 when it is not."""
    return mtime if abs(mtime) < 2**40 else 0  # nan and inf fail the test too


def _file_mode(mode: int) -> int:
    """The tar mode, setuid/setgid/sticky included, readable by its owner."""
    return (mode & 0o7777) | stat.S_IRUSR


def _dir_mode(mode: int) -> int:
    """The tar mode, with owner rwx so later entries and layers can be written into it."""
    return (mode & 0o7777) | stat.S_IRWXU


def _lstat(name: str, dir_fd: int) -> Optional[os.stat_result]:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _opened(name: str, flags: int, dir_fd: int) -> Iterator[int]:
    fd = os.open(name, flags, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def _listing(fd: int) -> list[tuple[str, bool]]:
    """(name, is a directory) of each entry of directory `fd`, never following symlinks."""
    with os.scandir(fd) as entries:
        return [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]


def _empty(fd: int) -> None:
    """Remove everything in directory `fd` (depth is bounded by MAX_DEPTH)."""
    for name, is_dir in _listing(fd):
        if is_dir:
            with _opened(name, os.O_RDONLY | _DIR, fd) as sub:
                _empty(sub)
            os.rmdir(name, dir_fd=fd)
        else:
            os.unlink(name, dir_fd=fd)
