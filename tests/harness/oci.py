"""OCI images for tests, made by independent tools (never rankwire's own code).

- `busybox_rootfs`: a tiny rootfs from Debian's busybox-static.
- `umoci_image` / `layered_image`: OCI image layouts built layer by layer with `umoci`
  (`--rootless`, so root and a plain user both can); `push_layout` copies one to a
  registry with `skopeo`.
- `push_raw`, `tar_layer`, `gzip_bomb`, `corrupt_blob`, `index_image`: what skopeo refuses
  to make (bad media types, ORAS artifacts, hostile tar entries, corrupt stored blobs,
  multi-platform indexes), pushed with plain urllib.

What umoci emits (0.4.7), which tests of whiteouts should know: a deleted file becomes
`DIR/.wh.NAME`; a directory deleted and re-created becomes one `.wh.NAME` per old entry
(never the opaque `.wh..wh..opq`: craft that with `tar_layer`); a hardlink added to a
file of a lower layer re-emits that file too, as a hardlink entry in the same layer.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import tarfile
import urllib.parse
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Union

from harness.registry import Registry, RegistryError

BUSYBOX = "/bin/busybox"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
# Apptainer's ORAS media types (see shared/research/apptainer-mpi.md §3).
SIF_CONFIG = "application/vnd.sylabs.sif.config.v1+json"
SIF_LAYER = "application/vnd.sylabs.sif.layer.v1.sif"

PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"

# The config `layered_image` sets; tests compare against these.
LAYERED_TAG = "layered"
LAYERED_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
    "GREETING": "hello \"quoted\" 'single' $HOME and spaces",
    "EMPTY": "",
}
LAYERED_ENTRYPOINT = ["/bin/sh", "-c", 'echo "entry: $0 $*"', "ep0"]
LAYERED_CMD = ["cmd one", "two"]
LAYERED_WORKDIR = "/data"
LAYERED_LABELS = {"org.example.purpose": "rankwire tests", "org.example.layers": "2"}


class OciLayout(NamedTuple):
    path: Path  # the OCI image layout directory (oci:PATH:TAG)
    tag: str


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _run(argv: Sequence[str]) -> str:
    out = subprocess.run(list(argv), capture_output=True, text=True)
    if out.returncode != 0:
        raise RegistryError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout


# -- rootfs and umoci layouts -----------------------------------------------------------
def busybox_rootfs(dest: Path) -> Path:
    """A rootfs of static busybox: /bin/busybox, every applet a relative symlink to it
    (bin/sh -> busybox, usr/bin/env -> ../../bin/busybox), /etc/passwd and /etc/group.
    `dest` may exist (an unpacked umoci bundle's rootfs)."""
    dest.mkdir(parents=True, exist_ok=True)
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "home", "proc", "sys", "dev"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    (dest / "tmp").mkdir(exist_ok=True)
    (dest / "tmp").chmod(0o1777)
    shutil.copy2(BUSYBOX, dest / "bin/busybox")
    for applet in _run([BUSYBOX, "--list-full"]).split():
        link = dest / applet
        if applet != "bin/busybox" and not link.is_symlink():
            link.symlink_to(os.path.relpath(dest / "bin/busybox", link.parent))
    (dest / "etc/passwd").write_text(PASSWD)
    (dest / "etc/group").write_text(GROUP)
    return dest


def umoci_image(
    workdir: Path,
    tag: str,
    layers: Sequence[Callable[[Path], object]],
    config: Sequence[str] = (),
) -> OciLayout:
    """An OCI layout `workdir/oci` (made if missing) with image `tag`: one layer per
    callable (each changes the rootfs it gets, umoci repacks the difference), then
    `umoci config` with the flags `config` (e.g. "--config.env=K=V")."""
    layout, bundle = workdir / "oci", workdir / f"bundle-{tag}"
    workdir.mkdir(parents=True, exist_ok=True)
    if not layout.exists():
        _run(["umoci", "init", "--layout", str(layout)])
    image = f"{layout}:{tag}"
    _run(["umoci", "new", "--image", image])
    _run(["umoci", "unpack", "--rootless", "--image", image, str(bundle)])
    try:
        for change in layers:
            change(bundle / "rootfs")
            _run(["umoci", "repack", "--refresh-bundle", "--image", image, str(bundle)])
    finally:
        _rmtree(bundle)
    if config:
        _run(["umoci", "config", "--image", image, *config])
    return OciLayout(layout, tag)


def _rmtree(path: Path) -> None:
    """rm -rf that also gets through directories without write or search permission."""
    if path.is_dir() and not path.is_symlink():
        path.chmod(0o700)
    for top, dirs, _ in os.walk(path):  # top-down: a directory opens before its walk
        for d in dirs:
            if not os.path.islink(os.path.join(top, d)):
                os.chmod(os.path.join(top, d), 0o700)
    shutil.rmtree(path, ignore_errors=True)


def _layer1(root: Path) -> None:
    busybox_rootfs(root)
    (root / "data").mkdir()
    (root / "data/gone.txt").write_text("deleted in layer 2\n")
    (root / "data/target.txt").write_text("hardlink and symlink target\n")
    (root / "opq").mkdir()
    (root / "opq/lower.txt").write_text("hidden by layer 2\n")


def _layer2(root: Path) -> None:
    (root / "data/gone.txt").unlink()
    shutil.rmtree(root / "opq")
    (root / "opq").mkdir()
    (root / "opq/upper.txt").write_text("from layer 2\n")
    os.link(root / "data/target.txt", root / "data/hard.txt")
    (root / "data/link").symlink_to("target.txt")
    (root / "data/secret").write_text("mode 000\n")
    (root / "data/secret").chmod(0o000)
    (root / "data/suid").write_text("#!/bin/sh\necho setuid\n")
    (root / "data/suid").chmod(0o4755)


def layered_image(workdir: Path) -> OciLayout:
    """Image LAYERED_TAG in the layout `workdir/oci`, two layers:
    1. busybox rootfs, /data/gone.txt, /data/target.txt, /opq/lower.txt;
    2. /data/gone.txt whited out, /opq deleted and re-made with only upper.txt (per-file
       whiteouts, see the module doc), /data/hard.txt hardlink of target.txt,
       /data/link -> target.txt, /data/secret mode 000, /data/suid mode 4755;
    config: LAYERED_ENV, LAYERED_ENTRYPOINT, LAYERED_CMD, LAYERED_WORKDIR, LAYERED_LABELS."""
    config = [f"--config.env={k}={v}" for k, v in LAYERED_ENV.items()]
    config += [f"--config.entrypoint={arg}" for arg in LAYERED_ENTRYPOINT]
    config += [f"--config.cmd={arg}" for arg in LAYERED_CMD]
    config += [f"--config.workingdir={LAYERED_WORKDIR}"]
    config += [f"--config.label={k}={v}" for k, v in LAYERED_LABELS.items()]
    return umoci_image(workdir, LAYERED_TAG, [_layer1, _layer2], config)


def read_layout(layout: OciLayout) -> tuple[dict[str, Any], dict[str, Any]]:
    """(manifest, config) of `layout.tag` in the layout, as JSON."""

    def blob(digest: str) -> Any:
        return json.loads((layout.path / "blobs/sha256" / digest.split(":", 1)[1]).read_bytes())

    for desc in json.loads((layout.path / "index.json").read_text())["manifests"]:
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == layout.tag:
            manifest = blob(desc["digest"])
            return manifest, blob(manifest["config"]["digest"])
    raise RegistryError(f"no tag {layout.tag} in {layout.path}")


def push_layout(layout: Path, tag: str, dest: str, *, registry: Registry) -> str:
    """`skopeo copy oci:LAYOUT:TAG docker://NETLOC/DEST` (DEST = REPO[:TAG]), digests kept
    as in the layout; returns the docker:// reference."""
    ref = f"docker://{registry.netloc}/{dest}"
    flags = registry.skopeo_flags("dest-")
    _run(["skopeo", "copy", "--quiet", "--preserve-digests", *flags, f"oci:{layout}:{tag}", ref])
    return ref


# -- raw pushes -------------------------------------------------------------------------
def upload_blob(registry: Registry, repo: str, data: bytes, digest: Optional[str] = None) -> str:
    """Monolithic upload (POST, then PUT ?digest=) of `data` as `digest` (its own by
    default). The registry checks the digest: a wrong one raises RegistryError."""
    digest = digest or digest_of(data)
    status, headers, body = registry.request("POST", f"/v2/{repo}/blobs/uploads/")
    if status != 202:
        raise RegistryError(f"upload of {digest} to {repo}: POST {status} {body[:200]!r}")
    location = urllib.parse.urljoin(registry.url + "/", headers["Location"])
    sep = "&" if "?" in location else "?"
    put = location.replace(registry.url, "", 1) + f"{sep}digest={digest}"
    status, _, body = registry.request(
        "PUT", put, data, {"Content-Type": "application/octet-stream"}
    )
    if status != 201:
        raise RegistryError(f"upload of {digest} to {repo}: PUT {status} {body[:200]!r}")
    return digest


def push_raw(
    registry: Registry,
    repo: str,
    tag: str,
    manifest: Union[Mapping[str, Any], bytes],
    blobs: Mapping[str, bytes],
    media_type: str = OCI_MANIFEST,
) -> str:
    """Upload `blobs` {digest: data}, then PUT `manifest` (JSON, or bytes sent as they are)
    as `repo:tag` (`tag` may be a digest) with Content-Type `media_type`; returns the
    manifest's digest. The registry still checks what it checks: blob digests, that
    referenced blobs and manifests exist, and that Content-Type and the `mediaType` field
    agree and name an OCI manifest/index or a Docker v2 manifest/list (anything else, even
    an OCI artifact manifest or schema 1, is 400 MANIFEST_INVALID). So a "wrong media
    type" image is a valid manifest with foreign config/layer types (e.g. SIF_CONFIG at a
    docker:// reference). GET of an OCI manifest needs its type in Accept (else 404)."""
    for digest, data in blobs.items():
        upload_blob(registry, repo, data, digest)
    body = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    status, _, answer = registry.request(
        "PUT", f"/v2/{repo}/manifests/{tag}", body, {"Content-Type": media_type}
    )
    if status != 201:
        raise RegistryError(f"manifest {repo}:{tag}: PUT {status} {answer[:300]!r}")
    return digest_of(body)


def descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest_of(data), "size": len(data), **extra}


def image_manifest(
    config: bytes,
    layers: Sequence[bytes],
    *,
    config_type: str = OCI_CONFIG,
    layer_type: str = OCI_LAYER_GZIP,
    media_type: Optional[str] = OCI_MANIFEST,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(manifest, blobs) for push_raw: `config` and `layers` with the given media types
    (e.g. SIF_CONFIG + [sif_bytes, sif_bytes] + SIF_LAYER: a two-layer ORAS artifact)."""
    manifest: dict[str, Any] = {"schemaVersion": 2}
    if media_type:
        manifest["mediaType"] = media_type
    manifest["config"] = descriptor(config_type, config)
    manifest["layers"] = [descriptor(layer_type, layer) for layer in layers]
    blobs = {digest_of(b): b for b in [config, *layers]}
    return manifest, blobs


def tar_layer(entries: Iterable[tuple[tarfile.TarInfo, bytes]], *, compress: bool = True) -> bytes:
    """A layer blob with exactly these entries (names, types, links and modes as given,
    nothing normalised): for `../x`, `/abs`, symlink-then-file, hardlink-out, `.wh...`,
    `.wh..wh..opq` cases. A regular entry's size is set from its data."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            if info.isreg():
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0) if compress else raw


def tar_entry(
    name: str,
    data: bytes = b"",
    *,
    kind: bytes = tarfile.REGTYPE,
    link: str = "",
    mode: int = 0o644,
) -> tuple[tarfile.TarInfo, bytes]:
    """One entry for tar_layer: `kind` tarfile.SYMTYPE/LNKTYPE/DIRTYPE/... to `link`."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = kind, link, mode, 0
    return info, data


def gzip_bomb(expanded: int, name: str = "bomb", chunk: int = 1 << 20) -> bytes:
    """A gzip'd tar holding one file of `expanded` zero bytes (a multiple of `chunk`),
    made in well under a second: the deflate stream of one zero chunk after a full flush
    is repeated (≈1 KiB per MiB). Valid gzip: one member, CRC and size right."""
    if expanded % chunk:
        raise ValueError("expanded must be a multiple of chunk")
    head = tarfile.TarInfo(name)
    head.size, head.mode, head.mtime = expanded, 0o644, 0
    header = head.tobuf(tarfile.PAX_FORMAT)
    tail = b"\0" * 1024  # the two end-of-archive blocks (expanded is block-aligned)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = b"\0" * chunk
    first = deflate.compress(header) + deflate.flush(zlib.Z_FULL_FLUSH)
    repeat = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    last = deflate.compress(tail) + deflate.flush(zlib.Z_FINISH)
    crc = zlib.crc32(header)
    for _ in range(expanded // chunk):
        crc = zlib.crc32(zeros, crc)
    crc = zlib.crc32(tail, crc)
    size = len(header) + expanded + len(tail)
    gz_header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    trailer = struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF)
    return gz_header + first + repeat * (expanded // chunk) + last + trailer


def corrupt_blob(registry: Registry, digest: str, data: bytes) -> None:
    """Overwrite a stored blob with `data` (shorter: a truncated blob; same size: a digest
    mismatch). The registry checks digests on upload only; it serves what is on disk,
    still under the old digest and with the new length."""
    algo, hex_ = digest.split(":", 1)
    path = registry.storage / "docker/registry/v2/blobs" / algo / hex_[:2] / hex_ / "data"
    if not path.is_file():
        raise RegistryError(f"blob {digest} is not stored in {registry.storage}")
    path.write_bytes(data)


def index_image(
    registry: Registry, repo: str, tag: str, layout: OciLayout, *, docker: bool = False
) -> dict[str, str]:
    """An index (OCI, or a Docker manifest list with `docker`) under `repo:tag` with two
    images of `layout`'s layers, one per platform linux/amd64 and linux/arm64, each with
    an extra layer `/etc/arch` holding its architecture and its config's `architecture`
    set. Returns {"amd64": digest, "arm64": digest, "index": digest}."""
    manifest, config = read_layout(layout)
    layers = [
        (layout.path / "blobs/sha256" / d["digest"].split(":", 1)[1]).read_bytes()
        for d in manifest["layers"]
    ]
    found: dict[str, str] = {}
    entries = []
    for arch in ("amd64", "arm64"):
        extra = tar_layer([tar_entry("etc/arch", f"{arch}\n".encode())])
        cfg = dict(config, architecture=arch, os="linux")
        cfg["rootfs"] = dict(cfg["rootfs"], diff_ids=[*cfg["rootfs"]["diff_ids"], _diff_id(extra)])
        cfg_bytes = json.dumps(cfg).encode()
        mtype = DOCKER_MANIFEST if docker else OCI_MANIFEST
        ltype = "application/vnd.docker.image.rootfs.diff.tar.gzip" if docker else OCI_LAYER_GZIP
        ctype = "application/vnd.docker.container.image.v1+json" if docker else OCI_CONFIG
        man, blobs = image_manifest(
            cfg_bytes, [*layers, extra], config_type=ctype, layer_type=ltype, media_type=mtype
        )
        body = json.dumps(man).encode()
        found[arch] = push_raw(registry, repo, digest_of(body), body, blobs, mtype)
        entries.append(descriptor(mtype, body, platform={"architecture": arch, "os": "linux"}))
    itype = DOCKER_LIST if docker else OCI_INDEX
    index = {"schemaVersion": 2, "mediaType": itype, "manifests": entries}
    found["index"] = push_raw(registry, repo, tag, index, {}, itype)
    return found


def _diff_id(layer_gz: bytes) -> str:
    return digest_of(gzip.decompress(layer_gz))
