"""The registry and OCI image harness itself works (tests/harness/registry.py, oci.py)."""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.oci import (
    LAYERED_CMD,
    LAYERED_ENTRYPOINT,
    LAYERED_ENV,
    LAYERED_LABELS,
    LAYERED_WORKDIR,
    SIF_CONFIG,
    SIF_LAYER,
    OciLayout,
    corrupt_blob,
    digest_of,
    gzip_bomb,
    image_manifest,
    index_image,
    layered_image,
    push_layout,
    push_raw,
    read_layout,
    tar_entry,
    tar_layer,
    upload_blob,
)
from harness.registry import Registry, RegistryError, running_registry
from harness.users import User

CREDS = ("alice", "pa ss:$word")


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> OciLayout:
    return layered_image(tmp_path_factory.mktemp("oci"))


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("plain")) as reg:
        yield reg


def skopeo(*args: str, user: User | None = None) -> subprocess.CompletedProcess[str]:
    argv = ["skopeo", *args]
    return subprocess.run(
        user.argv(argv) if user else argv, capture_output=True, text=True, timeout=60
    )


def inspect(reg: Registry, ref: str, *extra: str, flags: bool = True) -> Any:
    out = skopeo("inspect", *extra, *(reg.skopeo_flags() if flags else []), ref)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_layered_image_pushed_with_skopeo(plain: Registry, layout: OciLayout) -> None:
    ref = push_layout(layout.path, layout.tag, "tests/layered:v1", registry=plain)
    assert ref == f"docker://{plain.netloc}/tests/layered:v1"
    manifest, _ = read_layout(layout)
    seen = inspect(plain, ref)
    assert seen["Layers"] == [layer["digest"] for layer in manifest["layers"]]
    assert len(seen["Layers"]) == 2
    assert seen["Labels"] == LAYERED_LABELS
    config = inspect(plain, ref, "--config")["config"]
    assert config["Env"] == [f"{k}={v}" for k, v in LAYERED_ENV.items()]
    assert config["Entrypoint"] == LAYERED_ENTRYPOINT
    assert config["Cmd"] == LAYERED_CMD
    assert config["WorkingDir"] == LAYERED_WORKDIR


def test_layered_image_layers(layout: OciLayout) -> None:
    """What umoci put in the layers (the module doc of harness/oci.py says why)."""
    manifest, _ = read_layout(layout)
    layers = []
    for desc in manifest["layers"]:
        path = layout.path / "blobs/sha256" / desc["digest"].split(":", 1)[1]
        with tarfile.open(path) as tar:
            # Whether umoci re-emits a changed directory depends on the clock: skip them.
            layers.append({m.name: m for m in tar if m.name.startswith(("data/", "opq/"))})
    assert " ".join(sorted(layers[0])) == "data/gone.txt data/target.txt opq/lower.txt"
    upper = layers[1]
    assert " ".join(sorted(upper)) == (
        "data/.wh.gone.txt data/hard.txt data/link data/secret data/suid data/target.txt"
        " opq/.wh.lower.txt opq/upper.txt"
    )
    assert upper["data/target.txt"].islnk() and upper["data/target.txt"].linkname == "data/hard.txt"
    assert upper["data/link"].issym() and upper["data/link"].linkname == "target.txt"
    assert upper["data/secret"].mode == 0o000
    assert upper["data/suid"].mode == 0o4755
    assert {m.uid for m in upper.values()} == {0}


def test_blob_gets_counts_the_access_log(plain: Registry, layout: OciLayout) -> None:
    ref = push_layout(layout.path, layout.tag, "tests/count:v1", registry=plain)
    manifest, _ = read_layout(layout)
    config_digest = manifest["config"]["digest"]
    before, before_config = plain.blob_gets(), plain.blob_gets(config_digest)
    inspect(plain, ref, "--config")
    inspect(plain, ref, "--config")
    assert plain.blob_gets(config_digest) == before_config + 2
    assert plain.blob_gets() == before + 2
    layer = manifest["layers"][1]["digest"]
    status, headers, body = plain.request("GET", f"/v2/tests/count/blobs/{layer}")
    assert (status, headers["Docker-Content-Digest"]) == (200, layer)
    assert digest_of(body) == layer
    assert plain.blob_gets(layer) >= 1


def test_tls_registry(tmp_path: Path, layout: OciLayout) -> None:
    with running_registry(tmp_path, tls=True) as reg:
        assert reg.url == f"https://127.0.0.1:{reg.port}"
        assert reg.ca_cert is not None and reg.cert_dir is not None
        assert sorted(p.name for p in reg.cert_dir.iterdir()) == ["ca.crt"]
        ref = push_layout(layout.path, layout.tag, "tests/tls:v1", registry=reg)
        assert inspect(reg, ref)["Labels"] == LAYERED_LABELS
        refused = skopeo("inspect", "--tls-verify=true", ref)
        assert refused.returncode != 0
        assert "x509: certificate signed by unknown authority" in refused.stderr


def test_htpasswd_registry(tmp_path: Path, layout: OciLayout) -> None:
    with running_registry(tmp_path, htpasswd=CREDS) as reg:
        assert reg.credentials == CREDS
        status, headers, _ = reg.request("GET", "/v2/", auth=False)
        assert (status, headers["Www-Authenticate"]) == (401, 'Basic realm="rankwire-test"')
        assert reg.request("GET", "/v2/")[0] == 200
        ref = push_layout(layout.path, layout.tag, "tests/auth:v1", registry=reg)
        assert inspect(reg, ref)["Labels"] == LAYERED_LABELS
        anonymous = skopeo("inspect", "--tls-verify=false", ref)
        assert anonymous.returncode != 0
        assert "authentication required" in anonymous.stderr


def test_tls_and_auth_registry_as_runner(runner: User, shared_dir: Path) -> None:
    """A registry root starts in shared_dir serves the test user: it reads the CA."""
    with running_registry(shared_dir, tls=True, htpasswd=CREDS) as reg:
        config, layer = b"{}", b"sif bytes"
        manifest, blobs = image_manifest(
            config, [layer], config_type=SIF_CONFIG, layer_type=SIF_LAYER
        )
        push_raw(reg, "tests/sif", "v1", manifest, blobs)
        ref = f"docker://{reg.netloc}/tests/sif:v1"
        out = skopeo("inspect", "--raw", *reg.skopeo_flags(), ref, user=runner)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == manifest


def test_push_raw_oras_artifact_and_corrupt_blob(plain: Registry) -> None:
    sif = b"SIF image bytes\n" * 64
    manifest, blobs = image_manifest(
        b"{}", [sif, sif + b"2"], config_type=SIF_CONFIG, layer_type=SIF_LAYER
    )
    digest = push_raw(plain, "tests/oras", "two-layers", manifest, blobs)
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    status, headers, body = plain.request(
        "GET", "/v2/tests/oras/manifests/two-layers", headers=accept
    )
    assert (status, headers["Docker-Content-Digest"]) == (200, digest)
    assert json.loads(body)["layers"][1]["mediaType"] == SIF_LAYER
    layer = digest_of(sif)
    corrupt_blob(plain, layer, sif[:100])
    status, headers, body = plain.request("GET", f"/v2/tests/oras/blobs/{layer}")
    assert (status, headers["Docker-Content-Digest"], body) == (200, layer, sif[:100])


def test_registry_checks_upload_digests(plain: Registry) -> None:
    wrong = digest_of(b"other")
    with pytest.raises(RegistryError, match=r"PUT 400 .*DIGEST_INVALID"):
        upload_blob(plain, "tests/bad", b"data", wrong)


def test_index_image(plain: Registry, layout: OciLayout) -> None:
    found = index_image(plain, "tests/multi", "v1", layout)
    raw = inspect(plain, f"docker://{plain.netloc}/tests/multi:v1", "--raw")
    platforms = {m["platform"]["architecture"]: m["digest"] for m in raw["manifests"]}
    assert platforms == {"amd64": found["amd64"], "arm64": found["arm64"]}
    for arch in ("amd64", "arm64"):
        ref = f"docker://{plain.netloc}/tests/multi@{found[arch]}"
        manifest = inspect(plain, ref, "--raw")
        last = manifest["layers"][-1]["digest"]
        status, _, blob = plain.request("GET", f"/v2/tests/multi/blobs/{last}")
        assert status == 200
        with tarfile.open(fileobj=gzip.GzipFile(fileobj=io.BytesIO(blob))) as tar:
            arch_file = tar.extractfile("etc/arch")
            assert arch_file is not None and arch_file.read() == f"{arch}\n".encode()
        assert inspect(plain, ref, "--config")["architecture"] == arch


def test_tar_layer_keeps_hostile_entries() -> None:
    entries = [
        tar_entry("../escape", b"x"),
        tar_entry("/abs", b"y"),
        tar_entry("lnk", kind=tarfile.SYMTYPE, link="/etc"),
        tar_entry("lnk/passwd", b"z"),
        tar_entry("out", kind=tarfile.LNKTYPE, link="../../etc/shadow"),
        tar_entry("opq/.wh..wh..opq"),
    ]
    with tarfile.open(fileobj=gzip.GzipFile(fileobj=io.BytesIO(tar_layer(entries)))) as tar:
        names = [(m.name, m.linkname) for m in tar]
    assert names == [(i.name, i.linkname) for i, _ in entries]
    assert names[0] == ("../escape", "")


def test_gzip_bomb_expands_to_its_size() -> None:
    size = 64 << 20
    blob = gzip_bomb(size)
    assert len(blob) < size // 500
    with tarfile.open(fileobj=gzip.GzipFile(fileobj=io.BytesIO(blob)), mode="r|") as tar:
        member = next(iter(tar))
        assert (member.name, member.size) == ("bomb", size)
        data = tar.extractfile(member)
        assert data is not None
        total = 0
        while chunk := data.read(1 << 20):
            total += len(chunk)
    assert total == size


def alive(pid: int) -> bool:
    """Runs (a zombie the owner's reaper has yet to collect is dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _ours(root: Path) -> list[str]:
    out = subprocess.run(["pgrep", "-af", str(root)], capture_output=True, text=True)
    return out.stdout.splitlines()


def test_teardown_stops_the_registry_and_removes_its_files(tmp_path: Path) -> None:
    (tmp_path / "mine").write_text("the caller's")
    with running_registry(tmp_path) as reg:
        root = reg.log.parent
        assert _ours(root)
    assert not alive(reg.pid)
    assert _ours(root) == []
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]


KILLED_OWNER = """
import sys, time
from pathlib import Path
from harness.registry import running_registry
with running_registry(Path(sys.argv[1])) as reg:
    print(reg.pid, flush=True)
    time.sleep(60)
"""


def test_registry_dies_with_a_killed_owner(tmp_path: Path) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", KILLED_OWNER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent,
    )
    assert owner.stdout is not None
    pid = int(owner.stdout.readline())
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait()
    deadline = time.monotonic() + 5
    # Dead at once; gone once init reaps it (no pgrep line left for a later check).
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)
    owner.stdout.close()
