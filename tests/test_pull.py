"""`rankwire pull` / `push` / `cache` and remote images in exec and the launcher, against a
real CNCF registry on 127.0.0.1 holding images made by umoci + skopeo and oras-py."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.oci import (
    LAYERED_LABELS,
    SIF_CONFIG,
    SIF_LAYER,
    OciLayout,
    corrupt_blob,
    digest_of,
    gzip_bomb,
    image_manifest,
    index_image,
    push_layout,
    push_raw,
    read_layout,
    tar_entry,
    tar_layer,
    umoci_image,
)
from harness.registry import Registry
from harness.users import User

CONFIG = json.dumps(
    {"architecture": "amd64", "os": "linux", "config": {}, "rootfs": {"type": "layers"}}
).encode()
REF_FIX = (
    "write docker://[REGISTRY/]REPO[:TAG|@sha256:HEX] or oras://REGISTRY/REPO[:TAG|@sha256:HEX]"
)
UNSAFE = "; refusing an unsafe layer: rebuild the image without it"
AUTH_FIX = (
    "give credentials with --username and --password-stdin, "
    "RANKWIRE_DOCKER_USERNAME/_PASSWORD or ~/.docker/config.json"
)


@pytest.fixture
def cache(shared_dir: Path, runner: User) -> Iterator[Path]:
    """An empty image cache of the runner's (RANKWIRE_CACHEDIR)."""
    path = Path(shared_dir) / f"cache-{os.urandom(4).hex()}"
    path.mkdir()
    os.chown(path, runner.uid, runner.gid)
    yield path
    shutil.rmtree(path)


def rw(runner: User, cache: Path, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    env = kw.pop("env", ())
    assert isinstance(env, tuple)
    argv = ["env", f"RANKWIRE_CACHEDIR={cache}", *env, "rankwire", *args]
    return runner.run(argv, cwd=kw.pop("cwd", "/tmp"), **kw)


def cached_sifs(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "images" / "sif").glob("*.sif"))


def debris(cache: Path) -> list[str]:
    """What a failed pull must not leave: SIFs, scratch dirs, partial files."""
    images = cache / "images"
    if not images.exists():
        return []
    left = [f"sif/{n}" for n in cached_sifs(cache)]
    left += [f"tmp/{p.name}" for p in (images / "tmp").iterdir()]
    return left


@pytest.fixture(scope="session")
def layered_ref(registry: Registry, layered_layout: OciLayout) -> str:
    return push_layout(
        layered_layout.path, layered_layout.tag, "tests/layered:1", registry=registry
    )


# -- docker:// -> SIF -------------------------------------------------------------------
def test_pull_converts_a_layered_umoci_image(
    runner: User, cache: Path, layered_ref: str, layered_layout: OciLayout, shared_dir: Path
) -> None:
    out = cache / "layered.sif"
    proc = rw(runner, cache, "pull", "--insecure", "--json", str(out), layered_ref)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["cache_hit"] is False
    assert result["output"] == str(out)
    assert result["size"] == out.stat().st_size
    # siftool (Apptainer's reference tool) reads what we wrote.
    listing = subprocess.run(["siftool", "list", str(out)], capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    kinds = [line.rsplit("|", 1)[-1] for line in listing.stdout.splitlines()[3:]]
    assert kinds == ["Def.FILE", "JSON.Generic", "JSON.Generic", "FS (Squashfs/*System/amd64)"]
    inspect = json.loads(rw(runner, cache, "inspect", "--json", str(out)).stdout)
    assert {k: inspect["labels"][k] for k in LAYERED_LABELS} == LAYERED_LABELS
    assert inspect["env"]["GREETING"] == "hello \"quoted\" 'single' $HOME and spaces"
    assert inspect["env"]["EMPTY"] == ""
    script = (
        "cd /data; ls -A /data | tr '\\n' ' '; echo; ls -A /opq; "
        "stat -c '%i' target.txt hard.txt | uniq | wc -l; readlink link; "
        "stat -c '%a %n' secret suid; echo \"$GREETING\"; "
        '(. /.singularity.d/env/90-environment.sh; echo "$GREETING")'
    )
    proc = rw(runner, cache, "exec", str(out), "/bin/sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "hard.txt link secret suid target.txt ",
        "upper.txt",
        "1",
        "target.txt",
        "400 secret",
        "4755 suid",
        "hello \"quoted\" 'single' $HOME and spaces",
        "hello \"quoted\" 'single' $HOME and spaces",  # as Apptainer sources it
    ]
    # `run`: ENTRYPOINT, then CMD or the arguments (Docker's rule), words kept literal.
    proc = rw(runner, cache, "run", str(out))
    assert (proc.returncode, proc.stdout) == (0, "entry: ep0 cmd one two\n"), proc.stderr
    proc = rw(runner, cache, "run", str(out), "a b", "$HOME")
    assert (proc.returncode, proc.stdout) == (0, "entry: ep0 a b $HOME\n"), proc.stderr


def test_a_second_pull_is_a_cache_hit_without_a_download(
    runner: User, cache: Path, registry: Registry, layered_ref: str
) -> None:
    first = rw(runner, cache, "pull", "--insecure", "--json", str(cache / "a.sif"), layered_ref)
    assert first.returncode == 0, first.stderr
    gets = registry.blob_gets()
    again = rw(runner, cache, "pull", "--insecure", "--json", str(cache / "b.sif"), layered_ref)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["cache_hit"] is True
    assert registry.blob_gets() == gets
    assert (cache / "a.sif").read_bytes() == (cache / "b.sif").read_bytes()
    # Pinned to the digest, the cache answers alone: this registry does not exist.
    digest = json.loads(first.stdout)["digest"]
    pinned = f"docker://127.0.0.1:9/gone@{digest}"
    proc = rw(runner, cache, "pull", "--json", str(cache / "c.sif"), pinned)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["cache_hit"] is True


def test_concurrent_pulls_of_one_image_download_each_blob_once(
    runner: User, cache: Path, registry: Registry, layered_layout: OciLayout
) -> None:
    ref = push_layout(
        layered_layout.path, layered_layout.tag, f"tests/conc-{runner.name}:1", registry=registry
    )
    manifest, _ = read_layout(layered_layout)
    blobs = [manifest["config"]["digest"], *(d["digest"] for d in manifest["layers"])]
    before = {d: registry.blob_gets(d) for d in blobs}

    def one(i: int) -> subprocess.CompletedProcess[str]:
        return rw(runner, cache, "pull", "--insecure", "-q", str(cache / f"{i}.sif"), ref)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert [r.returncode for r in results] == [0] * 8, [r.stderr for r in results]
    assert {d: registry.blob_gets(d) - before[d] for d in blobs} == {d: 1 for d in blobs}
    assert len(cached_sifs(cache)) == 1 and debris(cache) == [f"sif/{cached_sifs(cache)[0]}"]
    # Pinned to its digest (what the launcher hands srun's tasks), a fresh cache: one
    # process asks the registry, the others wait for its SIF.
    first = rw(runner, cache, "pull", "--insecure", "--json", "-F", str(cache / "0.sif"), ref)
    digest = json.loads(first.stdout)
    shutil.rmtree(cache / "images")
    repo = f"tests/conc-{runner.name}"
    manifests = registry.manifest_gets(repo)
    pinned = f"{ref}@{digest['digest']}"

    def pinned_pull(i: int) -> subprocess.CompletedProcess[str]:
        return rw(runner, cache, "pull", "--insecure", "-q", "-F", str(cache / f"{i}.sif"), pinned)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(pinned_pull, range(8)))
    assert [r.returncode for r in results] == [0] * 8, [r.stderr for r in results]
    assert registry.manifest_gets(repo) - manifests == 1


def test_exec_and_the_launcher_take_docker_images(
    runner: User, cache: Path, registry: Registry, shared_dir: Path, mpich_image: Path
) -> None:
    """The MPICH hello image, made by umoci from the same tree as mpich.sif, pushed by
    skopeo: `apptainer-mpirun -n 4 docker://…` pulls it once and runs 4 ranks."""
    layout = shared_dir / f"mpich-oci-{runner.name}"
    image = umoci_image(
        layout,
        "mpich",
        [
            lambda root: shutil.copytree(
                shared_dir / "mpich-rootfs", root, dirs_exist_ok=True, symlinks=True
            )
        ],
    )
    ref = push_layout(image.path, image.tag, f"tests/mpich-{runner.name}:1", registry=registry)
    proc = rw(runner, cache, "exec", "--insecure", ref, "cat", "/etc/os-release")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith('NAME="rankwire-test-image"')
    proc = runner.run(
        [
            "env",
            f"RANKWIRE_CACHEDIR={cache}",
            "apptainer-mpirun",
            "-n",
            "4",
            "--insecure",
            ref,
            "/opt/hello_mpich",
        ],
        cwd="/tmp",
    )
    assert proc.returncode == 0, proc.stderr
    host = socket.gethostname()
    assert sorted(proc.stdout.splitlines()) == [
        f"hello rank={r} size=4 host={host} sum=10 ok" for r in range(4)
    ]
    assert len(cached_sifs(cache)) == 1


def test_an_index_gives_the_hosts_platform_or_the_one_asked_for(
    runner: User, cache: Path, registry: Registry, layered_layout: OciLayout
) -> None:
    found = index_image(registry, f"tests/multi-{runner.name}", "1", layered_layout)
    ref = f"docker://{registry.netloc}/tests/multi-{runner.name}:1"
    host = rw(runner, cache, "pull", "--insecure", "--json", str(cache / "h.sif"), ref)
    assert host.returncode == 0, host.stderr
    assert json.loads(host.stdout)["digest"] == found["amd64"]
    arm = rw(
        runner, cache, "pull", "--insecure", "--json", "--arch", "arm64", str(cache / "a.sif"), ref
    )
    assert arm.returncode == 0, arm.stderr
    assert json.loads(arm.stdout)["digest"] == found["arm64"]
    listing = subprocess.run(
        ["siftool", "list", str(cache / "a.sif")], capture_output=True, text=True
    )
    assert "FS (Squashfs/*System/arm64)" in listing.stdout
    bad = rw(runner, cache, "pull", "--insecure", "--arch", "s390x", str(cache / "s.sif"), ref)
    assert (bad.returncode, bad.stderr) == (
        2,
        f"rankwire: docker://{registry.netloc}/tests/multi-{runner.name}:1 has no image for "
        "linux/s390x (it has: linux/amd64, linux/arm64); choose one with --arch\n",
    )


# -- oras:// ------------------------------------------------------------------------------
def test_oras_artifacts_go_both_ways_with_oras_py(
    runner: User, cache: Path, registry: Registry, base_image: Path, tmp_path: Path
) -> None:
    import oras.client

    client = oras.client.OrasClient(hostname=registry.netloc, insecure=True)
    empty = tmp_path / "config.json"
    empty.write_text("{}")
    client.push(
        target=f"{registry.netloc}/tests/by-oras:1",
        files=[f"{base_image}:{SIF_LAYER}"],
        manifest_config=f"{empty}:{SIF_CONFIG}",
        disable_path_validation=True,
    )
    out = cache / "from-oras.sif"
    proc = rw(
        runner, cache, "pull", "--insecure", str(out), f"oras://{registry.netloc}/tests/by-oras:1"
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == base_image.read_bytes()
    dest = f"oras://{registry.netloc}/tests/by-rankwire-{runner.name}:1"
    proc = rw(runner, cache, "push", "--insecure", str(base_image), dest)
    assert proc.returncode == 0, proc.stderr
    got = client.pull(target=dest[len("oras://") :], outdir=str(tmp_path / "pulled"))
    assert [Path(p).name for p in got] == ["base.sif"]
    assert Path(got[0]).read_bytes() == base_image.read_bytes()
    manifest = client.get_manifest(dest[len("oras://") :])
    assert manifest["config"]["mediaType"] == SIF_CONFIG
    assert [layer["mediaType"] for layer in manifest["layers"]] == [SIF_LAYER]
    proc = rw(runner, cache, "exec", "--insecure", dest, "cat", "/etc/os-release")
    assert proc.returncode == 0 and proc.stdout.startswith('NAME="rankwire-test-image"'), (
        proc.stderr
    )


# -- TLS and auth -------------------------------------------------------------------------
def test_tls_registry_needs_its_ca(
    runner: User, cache: Path, tls_registry: Registry, layered_layout: OciLayout
) -> None:
    ref = push_layout(layered_layout.path, layered_layout.tag, "tests/tls:1", registry=tls_registry)
    out = str(cache / "t.sif")
    proc = rw(runner, cache, "pull", "-q", out, ref)
    assert (proc.returncode, proc.stderr) == (
        2,
        f"rankwire: registry {tls_registry.netloc}: TLS certificate not trusted "
        "(unable to get local issuer certificate); give its CA with --ca-cert, or --insecure "
        "for a plain-HTTP registry\n",
    )
    assert debris(cache) == []
    proc = rw(runner, cache, "pull", "-q", "--ca-cert", str(tls_registry.ca_cert), out, ref)
    assert proc.returncode == 0, proc.stderr


def test_auth_registry_takes_credentials_three_ways(
    runner: User, cache: Path, auth_registry: Registry, layered_layout: OciLayout
) -> None:
    ref = push_layout(
        layered_layout.path, layered_layout.tag, "tests/auth:1", registry=auth_registry
    )
    assert auth_registry.credentials is not None
    user, password = auth_registry.credentials
    out = str(cache / "a.sif")
    proc = rw(runner, cache, "pull", "--insecure", "-q", out, ref)
    assert (proc.returncode, proc.stderr) == (
        2,
        f"rankwire: registry {auth_registry.netloc} refused access to tests/auth:1: "
        f"401 Unauthorized; {AUTH_FIX}\n",
    )
    assert debris(cache) == []
    proc = rw(
        runner,
        cache,
        "pull",
        "--insecure",
        "-q",
        "--force",
        "--username",
        user,
        "--password-stdin",
        out,
        ref,
        input=password + "\n",
    )
    assert proc.returncode == 0, proc.stderr
    shutil.rmtree(cache / "images")
    env = (f"RANKWIRE_DOCKER_USERNAME={user}", f"RANKWIRE_DOCKER_PASSWORD={password}")
    proc = rw(runner, cache, "pull", "--insecure", "-q", "--force", out, ref, env=env)
    assert proc.returncode == 0, proc.stderr
    shutil.rmtree(cache / "images")
    docker = cache / "docker"
    docker.mkdir()
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    (docker / "config.json").write_text(
        json.dumps({"auths": {auth_registry.netloc: {"auth": token}}})
    )
    os.chown(docker, runner.uid, runner.gid)
    os.chown(docker / "config.json", runner.uid, runner.gid)
    proc = rw(
        runner,
        cache,
        "pull",
        "--insecure",
        "-q",
        "--force",
        out,
        ref,
        env=(f"DOCKER_CONFIG={docker}",),
    )
    assert proc.returncode == 0, proc.stderr


# -- bad input: one line naming cause and fix, nothing left in the cache -----------------
def _push_layer(registry: Registry, repo: str, layer: bytes) -> str:
    manifest, blobs = image_manifest(CONFIG, [layer])
    push_raw(registry, repo, "1", manifest, blobs)
    return f"docker://{registry.netloc}/{repo}:1"


def _short(layer: bytes) -> str:
    return digest_of(layer)[:19]


def test_bad_input_is_one_line_and_leaves_nothing(
    runner: User, cache: Path, registry: Registry, base_image: Path
) -> None:
    ref_base = f"docker://{registry.netloc}/tests"
    out = str(cache / "x.sif")
    cases: list[tuple[str, list[str], str]] = []
    # A reference that does not parse, a repository that does not exist.
    cases.append(
        (
            "docker://Bad/Name",
            [],
            "image reference docker://Bad/Name: repository part Bad is not lowercase a-z, "
            f"0-9, . _ -; {REF_FIX}",
        )
    )
    cases.append(
        (
            f"{ref_base}/missing:1",
            ["--insecure"],
            f"tests/missing:1 not found in registry {registry.netloc} (404 Not Found); check "
            "the repository, tag or digest",
        )
    )
    # A SIF artifact at a docker:// reference (its config is not an image config).
    sif = base_image.read_bytes()
    manifest, blobs = image_manifest(b"{}", [sif], config_type=SIF_CONFIG, layer_type=SIF_LAYER)
    push_raw(registry, "tests/artifact", "1", manifest, blobs)
    cases.append(
        (
            f"{ref_base}/artifact:1",
            ["--insecure"],
            f"{ref_base}/artifact:1 is not a container image (its config is "
            f"{SIF_CONFIG}); pull it with oras://",
        )
    )
    # ORAS: two layers; a layer of the wrong type.
    manifest, blobs = image_manifest(
        b"{}", [sif, sif + b"x"], config_type=SIF_CONFIG, layer_type=SIF_LAYER
    )
    push_raw(registry, "tests/two-layers", "1", manifest, blobs)
    cases.append(
        (
            f"oras://{registry.netloc}/tests/two-layers:1",
            ["--insecure"],
            f"oras://{registry.netloc}/tests/two-layers:1 has 2 layers; a SIF artifact has "
            f"exactly one (of type {SIF_LAYER}): push it with `rankwire push` or `apptainer push`",
        )
    )
    layer = tar_layer([tar_entry("hello", b"hi")])
    _push_layer(registry, "tests/not-sif", layer)
    cases.append(
        (
            f"oras://{registry.netloc}/tests/not-sif:1",
            ["--insecure"],
            f"the layer of oras://{registry.netloc}/tests/not-sif:1 has type "
            "application/vnd.oci.image.layer.v1.tar+gzip, not "
            f"{SIF_LAYER}; for a container image use docker://",
        )
    )
    # A blob whose content does not match its digest; a truncated one.
    for name, mangle, why in (
        (
            "mismatch",
            lambda b: bytes([b[0] ^ 1]) + b[1:],
            "does not match its digest (got sha256:{got})",
        ),
        (
            "truncated",
            lambda b: b[: len(b) // 2],
            "is truncated: {half} of {size} bytes; try again",
        ),
    ):
        layer = tar_layer([tar_entry(f"{name}.txt", os.urandom(4096))])
        ref = _push_layer(registry, f"tests/{name}", layer)
        bad = mangle(layer)
        corrupt_blob(registry, digest_of(layer), bad)
        text = why.format(got=digest_of(bad)[7:19], half=len(layer) // 2, size=len(layer))
        if name == "mismatch":
            text += "; the registry's content is corrupt"
        cases.append((ref, ["--insecure"], f"blob {_short(layer)} of {ref} {text}"))
    # Hostile layers.
    for name, entries, why in (
        (
            "dotdot",
            [tar_entry("../evil", b"x")],
            "entry ../evil has a '..' component" + UNSAFE,
        ),
        (
            "absolute",
            [tar_entry("/etc/evil", b"x")],
            "entry /etc/evil is an absolute path" + UNSAFE,
        ),
        (
            "through-symlink",
            [tar_entry("evil", kind=tarfile.SYMTYPE, link="/tmp"), tar_entry("evil/x", b"x")],
            "entry evil/x goes through the symlink evil; refusing to follow symlinks while "
            "unpacking: rebuild the image without it",
        ),
        (
            "hardlink-out",
            [tar_entry("h", kind=tarfile.LNKTYPE, link="../../etc/passwd")],
            "hard link h points outside the image (../../etc/passwd)" + UNSAFE,
        ),
        (
            "whiteout-dotdot",
            [tar_entry(".wh...", b"")],
            "whiteout .wh... names '..'" + UNSAFE,
        ),
    ):
        layer = tar_layer(entries)
        ref = _push_layer(registry, f"tests/{name}", layer)
        cases.append((ref, ["--insecure"], f"layer {_short(layer)}: {why}"))
    # A config over the 8 MiB cap (refused before it is fetched).
    big = json.dumps({"architecture": "amd64", "os": "linux", "pad": "x" * (9 << 20)}).encode()
    manifest, blobs = image_manifest(big, [tar_layer([tar_entry("f", b"x")])])
    push_raw(registry, "tests/big-config", "1", manifest, blobs)
    cases.append(
        (
            f"{ref_base}/big-config:1",
            ["--insecure"],
            f"the config of {ref_base}/big-config:1 is {len(big)} bytes, over the 8 MiB cap; "
            "that is not an image config",
        )
    )
    # A gzip bomb under a 1 MiB cap.
    bomb = gzip_bomb(64 << 20)
    ref = _push_layer(registry, "tests/bomb", bomb)
    cases.append(
        (
            ref,
            ["--insecure", "--max-expanded-size", "1M"],
            f"layer {_short(bomb)} expands beyond the 1 MiB cap (a gzip bomb?); raise it with "
            "--max-expanded-size if the image is really that big",
        )
    )
    # Nothing listens / a listener that never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        cases.append(
            (
                f"docker://127.0.0.1:{port}/x:1",
                ["--insecure"],
                f"cannot reach registry 127.0.0.1:{port} (Connection refused); check the "
                "address and that it is up",
            )
        )
        results = [(s, w, rw(runner, cache, "pull", *f, out, s)) for s, f, w in cases]
        silent.listen(1)
        slow = rw(
            runner,
            cache,
            "pull",
            "--insecure",
            out,
            f"docker://127.0.0.1:{port}/x:1",
            env=("RANKWIRE_PULL_TIMEOUT=1",),
        )
    got = [(s, p.returncode, p.stderr.splitlines()[-1:]) for s, _, p in results]
    assert got == [(s, 2, [f"rankwire: {w}"]) for s, w, _ in results]
    assert debris(cache) == []
    assert (slow.returncode, slow.stderr) == (
        2,
        f"rankwire: registry 127.0.0.1:{port} did not answer within 1 s; check it is up, or "
        "raise RANKWIRE_PULL_TIMEOUT\n",
    )
    assert not Path(out).exists()


# -- the cache ----------------------------------------------------------------------------
def test_cache_list_and_clean(runner: User, cache: Path, layered_ref: str) -> None:
    proc = rw(runner, cache, "pull", "--insecure", "-q", str(cache / "x.sif"), layered_ref)
    assert proc.returncode == 0, proc.stderr
    listing = json.loads(rw(runner, cache, "cache", "list", "--json").stdout)
    assert sorted(r["kind"] for r in listing) == ["blob", "blob", "blob", "sif"]
    assert next(r["reference"] for r in listing if r["kind"] == "sif").startswith(
        layered_ref + "@sha256:"
    )
    kept = rw(runner, cache, "cache", "clean", "--older-than", "1")
    assert kept.stdout == f"removed 0 entries (0.0 MiB) from {cache}/images\n"
    gone = rw(runner, cache, "cache", "clean")
    total = sum(r["size"] for r in listing) / (1 << 20)
    assert gone.stdout == f"removed 4 entries ({total:.1f} MiB) from {cache}/images\n"
    assert json.loads(rw(runner, cache, "cache", "list", "--json").stdout) == []


def test_a_killed_pull_leaves_nothing_the_next_takes_for_complete(
    runner: User, cache: Path, registry: Registry
) -> None:
    """SIGKILL while the layers unpack: no SIF in the cache; the next pull redoes the work,
    and removes the dead pull's scratch dir (its lock is free)."""
    import signal
    import time

    layer = tar_layer([tar_entry(f"f{i}", os.urandom(1 << 20)) for i in range(48)], compress=False)
    ref = _push_layer(registry, f"tests/killed-{runner.name}", layer)
    out = str(cache / "k.sif")
    argv = runner.argv(
        ["env", f"RANKWIRE_CACHEDIR={cache}", "rankwire", "pull", "--insecure", "-q", out, ref]
    )
    proc = subprocess.Popen(argv, cwd="/tmp", start_new_session=True)
    scratch = cache / "images" / "tmp"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(scratch.glob("pull-*/rootfs/f*")):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    dead = [p.name for p in scratch.iterdir()]
    assert len(dead) == 1 and cached_sifs(cache) == [] and not Path(out).exists()
    again = rw(runner, cache, "pull", "--insecure", "--json", out, ref)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["cache_hit"] is False
    assert list(scratch.iterdir()) == []
