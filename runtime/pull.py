"""Images in and out: `docker://` and `oras://` pulls into the node's cache, `oras://` push.

The cache (`<cache dir>/images`, the cache dir being `RANKWIRE_CACHEDIR` or
`~/.cache/rankwire`):

- `blobs/sha256/<hex>`: layers and configs, content-addressed, each checked against its
  digest and size before it is renamed into place (shared by every image);
- `sif/<hex>.sif` (+ `.json`: what was pulled, when): one SIF per image manifest digest,
  written elsewhere and renamed in whole, so a file there is always complete;
- `alias/<key>`: the image manifest digest a pinned index digest + platform resolved to,
  so a pull `@sha256:` of a cached image needs no network;
- `locks/<hex>.lock`: one pull of an image at a time; the others wait, then take its SIF;
- `tmp/pull-*`: a pull's scratch (blobs coming in, the unpacked rootfs), locked by its
  pull and removed by the next pull once that lock is free (a killed pull).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import stat
import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterator, Optional

from rankwire import lockdirs
from rankwire.errors import UserError, shown
from rankwire.record import record
from rankwire.runtime.reference import Access, Reference, is_remote, parse_reference

if TYPE_CHECKING:
    from rankwire.runtime.registry import Client

MANIFEST_CAP = 4 << 20
CONFIG_CAP = 8 << 20
DEFAULT_MAX_EXPANDED = 64 << 30

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEXES = (OCI_INDEX, DOCKER_LIST)
MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
IMAGE_CONFIGS = (
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
)

SIF_CONFIG = "application/vnd.sylabs.sif.config.v1+json"
SIF_LAYER = "application/vnd.sylabs.sif.layer.v1.sif"
SIF_LAYER_LEGACY = "appliciation/vnd.sylabs.sif.layer.tar"  # sic: older Apptainer pushes
EMPTY_CONFIG = b"{}"


@record
class PullResult:
    reference: str  # as given, pinned to the digest it resolved to
    digest: str  # the image manifest's (docker) or the artifact manifest's (oras)
    path: str  # the SIF in the cache
    size: int
    cache_hit: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- where things are ---------------------------------------------------------------------


def cache_root(environ: Optional[dict[str, str]] = None) -> Path:
    """`<cache dir>/images` (see `userfacts.cache_dir`)."""
    from rankwire.runtime.plan import cache_dir

    env = os.environ if environ is None else environ
    home = env.get("HOME") or os.path.expanduser("~")
    return Path(cache_dir(env, home)) / "images"


def _dirs(root: Path) -> None:
    for sub in ("blobs/sha256", "sif", "alias", "locks", "tmp"):
        try:
            (root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(
                f"cannot use the image cache {shown(root)} ({err.strerror}); set "
                "RANKWIRE_CACHEDIR to a writable directory"
            ) from None


@contextlib.contextmanager
def _locked(path: Path, waiting: Callable[[], None]) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def force_rmtree(path: str) -> None:
    """Remove a tree whose modes may forbid it (an unpacked image's 0555 dirs)."""

    def fix(func: Callable[..., Any], name: str, _exc: Any) -> None:
        parent = os.path.dirname(name)
        with contextlib.suppress(OSError):
            os.chmod(parent, stat.S_IRWXU)
        with contextlib.suppress(OSError):
            if os.path.isdir(name) and not os.path.islink(name):
                os.chmod(name, stat.S_IRWXU)
                shutil.rmtree(name, onerror=fix)
            else:
                func(name)

    if os.path.lexists(path):
        shutil.rmtree(path, onerror=fix)


@contextlib.contextmanager
def _scratch(root: Path) -> Iterator[Path]:
    """A work dir of this pull, locked while it runs; those of killed pulls go first."""
    lockdirs.prune(str(root / "tmp"), "pull-", force_rmtree)
    path, fd = lockdirs.claim(str(root / "tmp"), "pull-")
    try:
        yield Path(path)
    finally:
        force_rmtree(path)
        os.close(fd)


# -- progress -----------------------------------------------------------------------------


class Progress:
    """Per-blob progress on stderr: a bar on a terminal (tqdm), one line per blob
    otherwise, nothing with --quiet."""

    def __init__(self, quiet: bool = False, stream: IO[str] = sys.stderr) -> None:
        self.quiet = quiet
        self.stream = stream
        self.tty = stream.isatty()

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"rankwire: {text}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def blob(self, label: str, size: int) -> Iterator[Callable[[int], None]]:
        if self.quiet:
            yield lambda _n: None
            return
        start = time.monotonic()
        if self.tty:
            from tqdm import tqdm  # type: ignore[import-untyped]

            with tqdm(
                total=size,
                desc=label,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=self.stream,
                leave=False,
            ) as bar:
                yield bar.update
        else:
            yield lambda _n: None
        took = max(time.monotonic() - start, 1e-6)
        mib = size / (1 << 20)
        self.say(f"{label}: {mib:.1f} MiB in {took:.1f} s ({mib / took:.1f} MiB/s)")


# -- the cache ----------------------------------------------------------------------------


def _fetch_blob(
    reg: Client, root: Path, work: Path, digest: str, size: int, label: str, progress: Progress
) -> Path:
    """The cached blob `digest`, downloaded (and checked) if the cache lacks it."""
    final = root / "blobs" / "sha256" / digest.split(":", 1)[1]
    if final.exists() and final.stat().st_size == size:
        return final
    part = work / f"blob-{digest.split(':', 1)[1]}"
    with part.open("wb") as f, progress.blob(label, size) as tick:
        reg.fetch_blob(digest, size, f, tick)
    os.replace(part, final)
    return final


def _descriptor(value: Any, what: str, ref: Reference) -> tuple[str, int, str]:
    """(digest, size, media type) of a manifest's descriptor, checked."""
    if not isinstance(value, dict):
        raise UserError(f"the manifest of {shown(ref)} has a malformed {what}; not an image")
    digest, size, media = value.get("digest"), value.get("size"), value.get("mediaType", "")
    if not (isinstance(digest, str) and digest.startswith("sha256:") and len(digest) == 71):
        raise UserError(
            f"the manifest of {shown(ref)} names {what} {shown(digest)}, not a sha256 digest"
        )
    if not isinstance(size, int) or size < 0:
        raise UserError(f"the manifest of {shown(ref)} gives {what} no valid size")
    return digest, size, str(media)


def _json(body: bytes, what: str, ref: Reference) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise UserError(f"the {what} of {shown(ref)} is not a JSON object; not an image")
    return doc


def _write_meta(path: Path, result: PullResult, extra: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**result.to_dict(), **extra, "pulled": time.time()}))
    os.replace(tmp, path)


def _cached(root: Path, key: str) -> Optional[Path]:
    sif = root / "sif" / f"{key}.sif"
    return sif if sif.exists() else None


def _alias_key(digest: str, platform: str) -> str:
    return hashlib.sha256(f"{digest} {platform}".encode()).hexdigest()


# -- docker:// ---------------------------------------------------------------------------


def host_platform(arch: Optional[str]) -> tuple[str, str]:
    """(architecture, variant) to pick from an index: `--arch ARCH[/VARIANT]` or ours."""
    from rankwire.runtime.sif_format import goarch_from_machine

    if arch:
        name, _, variant = arch.partition("/")
        return name, variant
    return goarch_from_machine(), ""


def _pick_platform(index: dict[str, Any], ref: Reference, want: tuple[str, str]) -> str:
    manifests = index.get("manifests")
    if not isinstance(manifests, list):
        raise UserError(f"the index of {shown(ref)} lists no manifests; not an image")
    seen = []
    for entry in manifests:
        plat = entry.get("platform") if isinstance(entry, dict) else None
        if not isinstance(plat, dict):
            continue
        arch, os_, variant = plat.get("architecture"), plat.get("os"), plat.get("variant", "")
        seen.append(f"{os_}/{arch}" + (f"/{variant}" if variant else ""))
        if os_ == "linux" and arch == want[0] and (not want[1] or variant == want[1]):
            return _descriptor(entry, "a manifest", ref)[0]
    wanted = "linux/" + "/".join(p for p in want if p)
    raise UserError(
        f"{shown(ref)} has no image for {wanted} (it has: {', '.join(seen) or 'none'}); "
        "choose one with --arch"
    )


def runscript_for(config: dict[str, Any]) -> Optional[str]:
    """What `rankwire run` does for a Docker image: ENTRYPOINT, then the arguments or, if
    none, CMD (Docker's rule), words kept literal."""

    def words(key: str) -> list[str]:
        value = config.get(key)
        return [str(w) for w in value] if isinstance(value, list) else []

    entrypoint, cmd = words("Entrypoint"), words("Cmd")
    if not entrypoint and not cmd:
        return None
    lines = []
    if cmd:
        lines.append(f'if [ "$#" -eq 0 ]; then set -- {shlex.join(cmd)}; fi')
    lines.append(f'exec {shlex.join(entrypoint)} "$@"' if entrypoint else 'exec "$@"')
    return "\n".join(lines)


def image_env(config: dict[str, Any]) -> dict[str, str]:
    """The config's Env, literal values; names a shell cannot export are skipped (as
    Apptainer does)."""
    from rankwire.runtime.imagemeta import ENV_NAME

    env: dict[str, str] = {}
    for item in config.get("Env") or []:
        if isinstance(item, str):
            key, _, value = item.partition("=")
            if ENV_NAME.match(key):
                env[key] = value
    return env


def _convert(
    ref: Reference,
    manifest: dict[str, Any],
    reg: Client,
    root: Path,
    work: Path,
    progress: Progress,
    max_expanded: int,
    goarch: str,
) -> Path:
    """Fetch the config and layers, unpack, pack: the SIF in `work`."""
    from rankwire.runtime.build import apply_build, plan_build
    from rankwire.runtime.oci_layers import Layer, apply_layers

    cdigest, csize, cmedia = _descriptor(manifest.get("config"), "config", ref)
    if cmedia not in IMAGE_CONFIGS:
        hint = "; pull it with oras://" if cmedia == SIF_CONFIG else ""
        raise UserError(
            f"{shown(ref)} is not a container image (its config is {shown(cmedia)}){hint}"
        )
    if csize > CONFIG_CAP:
        raise UserError(
            f"the config of {shown(ref)} is {csize} bytes, over the {CONFIG_CAP >> 20} MiB "
            "cap; that is not an image config"
        )
    raw_layers = manifest.get("layers")
    if not isinstance(raw_layers, list) or not raw_layers:
        raise UserError(f"{shown(ref)} has no layers; nothing to unpack")
    config_path = _fetch_blob(reg, root, work, cdigest, csize, "config", progress)
    oci_config = config_path.read_bytes()
    doc = _json(oci_config, "config", ref)
    raw_config = doc.get("config")
    config: dict[str, Any] = raw_config if isinstance(raw_config, dict) else {}
    layers = []
    for n, raw in enumerate(raw_layers, 1):
        digest, size, media = _descriptor(raw, f"layer {n}", ref)
        label = f"layer {n}/{len(raw_layers)} {digest[7:19]}"
        path = _fetch_blob(reg, root, work, digest, size, label, progress)
        layers.append(Layer(path=path, media_type=media, digest=digest))
    rootfs = work / "rootfs"
    rootfs.mkdir()
    apply_layers(rootfs, layers, max_expanded=max_expanded, note=progress.say)
    deffile = work / "Singularity"
    deffile.write_text(f"bootstrap: docker\nfrom: {ref}\n\n", encoding="utf-8")
    labels = {str(k): str(v) for k, v in (config.get("Labels") or {}).items()}
    out = work / "image.sif"
    plan = plan_build(
        out,
        rootfs,
        deffile=deffile,
        labels=labels,
        env=image_env(config),
        runscript=runscript_for(config),
        oci_config=oci_config,  # as Apptainer keeps it; its Entrypoint: exec --entrypoint
        goarch=goarch,
        literal_env=True,
    )
    progress.say(f"packing {shown(ref)} with mksquashfs")
    apply_build(plan, scratch=work)
    return out


def _pull_docker(
    ref: Reference,
    access: Access,
    root: Path,
    progress: Progress,
    arch: Optional[str],
    max_expanded: int,
) -> PullResult:
    want = host_platform(arch)
    platform = "/".join(p for p in want if p)
    if ref.digest:  # pinned: maybe no network at all

        def hit() -> Optional[PullResult]:
            assert ref.digest is not None
            alias = root / "alias" / _alias_key(ref.digest, platform)
            key = alias.read_text().strip() if alias.exists() else ref.digest[7:]
            sif = _cached(root, key)
            if sif is None:
                return None
            return PullResult(str(ref), f"sha256:{key}", str(sif), sif.stat().st_size, True)

        return _pinned(
            ref,
            root,
            progress,
            hit,
            lambda: _fetch_docker(ref, access, root, progress, want, platform, max_expanded),
        )
    return _fetch_docker(ref, access, root, progress, want, platform, max_expanded)


def _pinned(
    ref: Reference,
    root: Path,
    progress: Progress,
    hit: Callable[[], Optional[PullResult]],
    fetch: Callable[[], PullResult],
) -> PullResult:
    """A pinned reference: from the cache, or fetched by one of the processes that ask at
    once (the tasks of a node under srun), the others waiting: no registry sees N manifest
    requests from one node for what one fetch answers."""
    found = hit()
    if found is not None:
        return found
    assert ref.digest is not None
    with _locked(root / "locks" / f"ref-{ref.digest[7:]}.lock", _waiting(progress, ref)):
        return hit() or fetch()


def _fetch_docker(
    ref: Reference,
    access: Access,
    root: Path,
    progress: Progress,
    want: tuple[str, str],
    platform: str,
    max_expanded: int,
) -> PullResult:
    from rankwire.runtime.registry import client

    reg = client(ref, access)
    accept = (*MANIFESTS, *INDEXES)
    body, media, top = reg.manifest(ref.reference, accept, MANIFEST_CAP)
    doc = _json(body, "manifest", ref)
    media = str(doc.get("mediaType") or media)
    digest = top
    if media in INDEXES:
        digest = _pick_platform(doc, ref, want)
        body, media, _ = reg.manifest(digest, accept, MANIFEST_CAP)
        doc = _json(body, "manifest", ref)
        media = str(doc.get("mediaType") or media)
    if media not in MANIFESTS:
        raise UserError(
            f"{shown(ref)} has a manifest of type {shown(media or 'unknown')}, not an OCI or "
            "Docker v2 image manifest; rebuild or re-push it with a current tool"
        )
    if top != digest:
        alias = root / "alias" / _alias_key(top, platform)
        tmp = alias.with_name(alias.name + f".{os.getpid()}")
        tmp.write_text(digest[7:])
        os.replace(tmp, alias)
    return _once(
        ref,
        top,
        digest,
        root,
        progress,
        lambda work: _convert(ref, doc, reg, root, work, progress, max_expanded, want[0]),
    )


def _once(
    ref: Reference,
    top: str,
    digest: str,
    root: Path,
    progress: Progress,
    make: Callable[[Path], Path],
) -> PullResult:
    """The cached SIF of image manifest `digest`, or the one `make(work dir)` writes, made
    under the image's lock (concurrent pulls of it wait, then take it) and renamed into
    the cache whole. `top`: the digest `ref` resolved to (an index's, for a multi-platform
    image)."""
    pinned = ref.pinned(top)
    key = digest[7:]
    hit = _cached(root, key)
    if hit is None:
        with _locked(root / "locks" / f"{key}.lock", _waiting(progress, pinned)):
            hit = _cached(root, key)
            if hit is None:
                progress.say(f"pulling {shown(pinned)}")
                with _scratch(root) as work:
                    sif = make(work)
                    final = root / "sif" / f"{key}.sif"
                    result = PullResult(str(pinned), digest, str(final), sif.stat().st_size, False)
                    _write_meta(final.with_suffix(".json"), result, {"source": str(ref)})
                    os.replace(sif, final)
                    return result
    return PullResult(str(pinned), digest, str(hit), hit.stat().st_size, True)


def _waiting(progress: Progress, ref: Reference) -> Callable[[], None]:
    return lambda: progress.say(f"waiting for another pull of {shown(ref)}")


# -- oras:// -----------------------------------------------------------------------------


def _pull_oras(ref: Reference, access: Access, root: Path, progress: Progress) -> PullResult:
    if ref.digest:

        def hit() -> Optional[PullResult]:
            assert ref.digest is not None
            sif = _cached(root, ref.digest[7:])
            if sif is None:
                return None
            return PullResult(str(ref), ref.digest, str(sif), sif.stat().st_size, True)

        return _pinned(ref, root, progress, hit, lambda: _fetch_oras(ref, access, root, progress))
    return _fetch_oras(ref, access, root, progress)


def _fetch_oras(ref: Reference, access: Access, root: Path, progress: Progress) -> PullResult:
    from rankwire.runtime.registry import client

    reg = client(ref, access)
    body, _, digest = reg.manifest(ref.reference, (OCI_MANIFEST,), MANIFEST_CAP)
    doc = _json(body, "manifest", ref)
    layers = doc.get("layers")
    if not isinstance(layers, list) or len(layers) != 1:
        count = len(layers) if isinstance(layers, list) else 0
        raise UserError(
            f"{shown(ref)} has {count} layers; a SIF artifact has exactly one (of type "
            f"{SIF_LAYER}): push it with `rankwire push` or `apptainer push`"
        )
    ldigest, size, lmedia = _descriptor(layers[0], "its layer", ref)
    if lmedia not in (SIF_LAYER, SIF_LAYER_LEGACY):
        raise UserError(
            f"the layer of {shown(ref)} has type {shown(lmedia)}, not {SIF_LAYER}; "
            "for a container image use docker://"
        )

    def fetch(work: Path) -> Path:
        part = work / "image.sif"
        with part.open("wb") as f, progress.blob("sif", size) as tick:
            reg.fetch_blob(ldigest, size, f, tick)
        _check_sif(part, ref)
        return part

    return _once(ref, digest, digest, root, progress, fetch)


def _check_sif(path: Path, ref: object) -> None:
    from rankwire.runtime.sif_read import SifImage

    try:
        SifImage.open(path).close()
    except UserError as err:
        raise UserError(f"{shown(ref)} is not a usable SIF: {err}") from None


def remove_entry(root: Path, path: Path) -> bool:
    """Remove a cached SIF (with its record) or blob, unless a pull of it holds its lock
    (False then). Containers running from a removed SIF keep it open and run on."""
    if path.suffix != ".sif":  # a blob: a pull that needs it again fetches it again
        path.unlink(missing_ok=True)
        return True
    lock = root / "locks" / f"{path.stem}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


# -- entry points -------------------------------------------------------------------------


def pull(
    source: str,
    access: Access,
    *,
    progress: Optional[Progress] = None,
    arch: Optional[str] = None,
    max_expanded: int = DEFAULT_MAX_EXPANDED,
    root: Optional[Path] = None,
) -> PullResult:
    """The SIF of `source` (docker:// or oras://) in the cache, pulled if missing."""
    ref = parse_reference(source)
    progress = progress or Progress()
    root = root or cache_root()
    _dirs(root)
    if ref.transport == "oras":
        return _pull_oras(ref, access, root, progress)
    return _pull_docker(ref, access, root, progress, arch, max_expanded)


def local_image(image: str, access: Optional[Access] = None, quiet: bool = True) -> str:
    """`image` itself if it is a file path, else the cached SIF it is pulled into (the
    one step every caller that takes an image runs before `facts.gather`)."""
    if not is_remote(image):
        return image
    return pull(image, access or access_from_env(), progress=Progress(quiet)).path


def access_from_env(**given: Any) -> Access:
    """The registry access options, completed from RANKWIRE_PULL_TIMEOUT."""
    raw = os.environ.get("RANKWIRE_PULL_TIMEOUT")
    if raw:
        try:
            given.setdefault("timeout", float(raw))
        except ValueError:
            raise UserError(
                f"RANKWIRE_PULL_TIMEOUT={shown(raw)} is not a number of seconds; fix or unset it"
            ) from None
    return Access(**{k: v for k, v in given.items() if v is not None})


def push(image: str, dest: str, access: Access, progress: Optional[Progress] = None) -> str:
    """Push the SIF `image` as an ORAS artifact Apptainer pulls; return the manifest digest."""
    ref = parse_reference(dest)
    if ref.transport != "oras":
        raise UserError(
            f"cannot push to {shown(dest)}: a SIF goes to a registry as oras://REGISTRY/REPO:TAG"
        )
    if ref.digest:
        raise UserError(f"push to a tag, not a digest: {shown(dest)}")
    progress = progress or Progress()
    path = Path(image)
    if not path.is_file():
        raise UserError(f"{shown(image)} is not a file; give the SIF image to push")
    _check_sif(path, image)
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            hasher.update(chunk)
    digest, size = "sha256:" + hasher.hexdigest(), path.stat().st_size
    from rankwire.runtime.registry import client

    reg = client(ref, access)
    with progress.blob("sif", size):
        reg.push_blob(path, digest)
    config_digest = "sha256:" + hashlib.sha256(EMPTY_CONFIG).hexdigest()
    reg.push_blob(EMPTY_CONFIG, config_digest)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": SIF_CONFIG, "digest": config_digest, "size": len(EMPTY_CONFIG)},
        "layers": [
            {
                "mediaType": SIF_LAYER,
                "digest": digest,
                "size": size,
                "annotations": {"org.opencontainers.image.title": path.name},
            }
        ],
        "annotations": {
            "org.opencontainers.image.created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        },
    }
    body = json.dumps(manifest, separators=(",", ":")).encode()
    reg.push_manifest(body, OCI_MANIFEST, ref.tag or "latest")
    return "sha256:" + hashlib.sha256(body).hexdigest()
