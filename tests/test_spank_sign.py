"""Site policy `require_signed_by` + `keyring` in the SPANK plugin.

The check phase verifies, as root, the image descriptor it then hands to `start`
(advisory) or mounts itself (`enforce`), or finds it in root's verification cache
/run/rankwire/verified. The key is made by gpg, the image signed by `rankwire sign`
(tests/test_sign.py checks those against GnuPG); jobs run as root and as the test user.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from test_sign import GpgKey, descriptors, flip, make_gpg_key, signatures

from harness.mpi import assert_hello
from harness.registry import Registry
from harness.slurm import SlurmCluster
from harness.spank import SpankInstall, srun
from harness.users import User
from rankwire.runtime.trust import SITE_KEYRING
from rankwire.spank.policy import Policy, PolicyError, load_policy

VERIFIED = Path("/run/rankwire/verified")
PARTITION = 0x4004
CHANGED = "the image was changed after signing; get it again from its signer"


def _root_owned_dir(path: Path) -> Path:
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    return path


# -- the policy keys -----------------------------------------------------------------------


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A root-owned dir for a policy file and a keyring (`keys.asc`, empty)."""
    if os.getuid() != 0:
        pytest.skip("a policy file must be root-owned")
    tmp_path.chmod(0o755)
    (tmp_path / "keys.asc").write_text("")
    (tmp_path / "keys.asc").chmod(0o644)
    return tmp_path


def _load(site: Path, text: str) -> Policy:
    path = site / "policy.toml"
    path.write_text(text.format(site=site))
    return load_policy(str(path))


def test_policy_require_signed_by_and_keyring(site: Path) -> None:
    spaced = "AAAA AAAA AAAA AAAA AAAA  AAAA AAAA AAAA AAAA AAAA"  # as gpg prints it
    got = _load(
        site,
        f'require_signed_by = ["{spaced}", "{"B" * 64}", "{"a" * 40}"]\n'
        'keyring = "{site}/keys.asc"\n',
    )
    assert got == load_policy(str(site / "policy.toml"))
    assert (got.require_signed_by, got.keyring) == (("a" * 40, "b" * 64), f"{site}/keys.asc")
    # No keyring given: the site's, /etc/rankwire/keys.asc.
    if os.path.exists(SITE_KEYRING):
        pytest.skip(f"{SITE_KEYRING} exists here")
    with pytest.raises(PolicyError) as err:
        _load(site, f'require_signed_by = ["{"a" * 40}"]\n')
    assert str(err.value) == (
        f"policy: keyring {SITE_KEYRING} does not exist: export the keys of require_signed_by "
        f"there (`gpg --armor --export FPR > {SITE_KEYRING}`), or no container runs"
    )


FPR_LINE = f'require_signed_by = ["{"a" * 40}"]\n'
NOT_ABSOLUTE = "'keyring' must be the absolute path of an OpenPGP keyring or a PEM public key"
NOT_ROOTS = (
    "{path} must be owned by root and not writable by group or others (and not a symlink); "
    "fix its mode, or no container runs"
)


@pytest.mark.parametrize(
    ("text", "make", "message"),
    [
        (
            'require_signed_by = "{fpr}"\n',
            None,
            "'require_signed_by' must be a non-empty list of key fingerprints",
        ),
        (
            "require_signed_by = []\n",
            None,
            "'require_signed_by' must be a non-empty list of key fingerprints",
        ),
        (
            'require_signed_by = ["{fpr}", "ABCD"]\n',
            None,
            "'require_signed_by' ABCD: not a key fingerprint (40 or 64 hex digits); "
            "`rankwire verify --keyring KEYS.asc IMG` shows an image's signers",
        ),
        (FPR_LINE + 'keyring = "keys.asc"\n', None, NOT_ABSOLUTE),
        (FPR_LINE + "keyring = 5\n", None, NOT_ABSOLUTE),
        (FPR_LINE + 'keyring = "{site}/k.asc"\n', "group-writable", NOT_ROOTS),
        (FPR_LINE + 'keyring = "{site}/k.asc"\n', "user's", NOT_ROOTS),
        (FPR_LINE + 'keyring = "{site}/k.asc"\n', "symlink", NOT_ROOTS),
        (
            FPR_LINE + 'keyring = "{site}/k.asc"\n',
            None,
            "keyring {path} does not exist: export the keys of require_signed_by there "
            "(`gpg --armor --export FPR > {path}`), or no container runs",
        ),
        (
            'keyring = "{site}/keys.asc"\n',
            None,
            "{policy}: 'keyring' applies with require_signed_by: add that or drop keyring",
        ),
    ],
)
def test_policy_signature_key_refusals(
    site: Path, unprivileged_user: User, text: str, make: str | None, message: str
) -> None:
    keyring = site / "k.asc"
    if make == "group-writable":
        keyring.write_text("")
        keyring.chmod(0o664)
    elif make == "user's":
        keyring.write_text("")
        os.chown(keyring, unprivileged_user.uid, unprivileged_user.gid)
    elif make == "symlink":
        keyring.symlink_to(site / "keys.asc")
    with pytest.raises(PolicyError) as err:
        _load(site, text.replace("{fpr}", "a" * 40))
    values = {"path": keyring, "policy": site / "policy.toml"}
    assert str(err.value) == f"policy: {message.format(**values)}"


def test_image_on_a_users_fuse_mount_is_refused(shared_dir: Path, unprivileged_user: User) -> None:
    """Its server could give the check and the mount different bytes: refused before any
    verification (a real squashfuse mount the test user serves)."""
    if os.getuid() != 0:
        pytest.skip("needs root to act as the test user")
    user = unprivileged_user
    d = shared_dir / f"spank-sign-fuse-{uuid.uuid4().hex[:8]}"
    (d / "content").mkdir(parents=True)
    (d / "content" / "img.sif").write_text("not even a SIF: never read\n")
    (d / "mnt").mkdir()
    subprocess.run(["mksquashfs", str(d / "content"), str(d / "fs.sqsh"), "-quiet", "-no-progress"],
                   check=True, capture_output=True)  # fmt: skip
    for p in (d, d / "fs.sqsh", d / "mnt"):
        os.chown(p, user.uid, user.gid)
    image = d / "mnt" / "img.sif"
    python = f"{user.bindir}/python" if user.bindir else sys.executable
    code = (
        "import os, sys\n"
        "from rankwire.spank import helper\n"
        "from rankwire.spank.policy import Policy, PolicyError\n"
        "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
        "try:\n"
        "    helper._check_signed(Policy(source='/p', require_signed_by=('a' * 40,),"
        " keyring='/k.asc'), fd, sys.argv[1])\n"
        "except PolicyError as err:\n"
        "    print(err)\n"
    )
    user.run(["squashfuse", str(d / "fs.sqsh"), str(d / "mnt")], check=True)
    try:
        proc = user.run([python, "-c", code, str(image)], cwd="/tmp")
    finally:
        user.run(["fusermount3", "-u", str(d / "mnt")], check=True)
        shutil.rmtree(d)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        f"policy: image {image} is on a fuse.squashfuse mount that a user serves, which can "
        "show the signature check other bytes than it later reads; this site runs only images "
        f"signed by {'A' * 40}: copy it to a local or shared file system\n"
    )


# -- the plugin under a real slurmd --------------------------------------------------------


class Signed(NamedTuple):
    key: GpgKey
    keyring: Path  # root-owned, as the policy demands
    image: Path  # the MPICH image signed by key
    tampered: Path  # that, one byte of its partition changed after signing
    unsigned: Path


@pytest.fixture(scope="module")
def signed(shared_dir: Path, mpich_image: Path) -> Iterator[Signed]:
    d = _root_owned_dir(shared_dir / f"spank-sign-{uuid.uuid4().hex[:8]}")
    key = make_gpg_key(d, "builder")
    keyring = _root_owned_dir(d / "site") / "keys.asc"
    shutil.copyfile(key.public, keyring)
    image, tampered = d / "signed.sif", d / "tampered.sif"
    shutil.copyfile(mpich_image, image)
    subprocess.run(["rankwire", "sign", "--key", str(key.secret), str(image)], check=True,
                   capture_output=True)  # fmt: skip
    shutil.copyfile(image, tampered)
    [part] = [x for x in descriptors(tampered) if x.dtype == PARTITION]
    flip(tampered, part.offset + part.size // 2)
    for p in (d, keyring, image, tampered):  # the last chmod: their ctimes settle from here
        p.chmod(0o755 if p.is_dir() else 0o644)
    yield Signed(key, keyring, image, tampered, mpich_image)
    subprocess.run(["gpgconf", "--homedir", str(key.home), "--kill", "all"], check=False)
    shutil.rmtree(d, ignore_errors=True)
    _forget(image, tampered)
    with contextlib.suppress(OSError):  # the plugin makes it again when needed
        VERIFIED.rmdir()


def _entries() -> dict[Path, dict[str, object]]:
    """The verification cache's entries: path -> the JSON it holds."""
    out = {}
    for p in VERIFIED.iterdir() if VERIFIED.is_dir() else []:
        try:
            out[p] = json.loads(p.read_text())
        except (OSError, ValueError):
            out[p] = {}
    return out


def _forget(*images: Path) -> None:
    for path, doc in _entries().items():
        if doc.get("image") in {str(i) for i in images}:
            path.unlink()


def _assert_cache_dir_clean() -> None:
    """Root's alone; entries only (no lock or temporary file left)."""
    st = VERIFIED.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o700)
    left = [p.name for p in VERIFIED.iterdir() if p.name.startswith(".") or "." in p.name]
    assert left == []


@pytest.fixture
def signed_only(policy: Path, signed: Signed) -> Path:
    policy.write_text(
        f'require_signed_by = ["{signed.key.fingerprint}"]\nkeyring = "{signed.keyring}"\n'
    )
    return policy


def _refusal(signed: Signed, image: Path) -> str:
    """The plugin's line for `image`, unsigned or tampered."""
    if image == signed.unsigned:
        reason = (
            "object group 1 is not signed; sign it with `rankwire sign`, or use an image its "
            "builder signed"
        )
    else:
        [part] = [x for x in descriptors(image) if x.dtype == PARTITION]
        [sig] = signatures(image)
        reason = (
            f"the data of object {part.id} differs from what signature object {sig.id} "
            f"(object group 1) signed; {CHANGED}"
        )
    return (
        f"rankwire: policy: this site runs only images signed by {signed.key.fingerprint}: "
        f"{image}: {reason}"
    )


def _error_lines(stderr: str) -> list[str]:
    """The plugin's lines as srun shows them (after slurmstepd's `error: ` prefix), each
    once: the shim repeats the check phase's line at each task's failed `task_init`, and
    Slurm adds its own (`task_init() failed`, the tasks' exit code)."""
    lines = [ln.split("error: ", 1)[-1] for ln in stderr.splitlines() if "rankwire:" in ln]
    return list(dict.fromkeys(lines))


@pytest.mark.slurm
@pytest.mark.parametrize("which", ["unsigned", "tampered"])
def test_unsigned_or_tampered_image_is_refused_with_one_line(
    spank_cluster: SlurmCluster,
    signed: Signed,
    signed_only: Path,
    runner: User,
    which: str,
    nothing_left: None,
) -> None:
    image = signed.unsigned if which == "unsigned" else signed.tampered
    before = _entries()
    proc = srun(spank_cluster, runner, "-n", "2", "--mpi=pmi2", f"--container-image={image}",
                "/opt/hello_mpich")  # fmt: skip
    assert proc.returncode != 0
    assert _error_lines(proc.stderr) == [_refusal(signed, image)], proc.stderr
    assert proc.stdout == ""
    assert _entries() == before  # a refusal is not remembered
    _assert_cache_dir_clean()


def _settled(path: Path) -> None:
    """Wait until a verification of `path` may be remembered (its ctime > 2 s old)."""
    wait = path.stat().st_ctime + 2.2 - time.time()
    if wait > 0:
        time.sleep(wait)


def _hello(cluster: SlurmCluster, runner: User, image: Path) -> None:
    proc = srun(cluster, runner, "-n", "2", "--mpi=pmi2", f"--container-image={image}",
                "/opt/hello_mpich")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert_hello(proc.stdout, 2)
    assert proc.stderr == "", proc.stderr


@pytest.mark.slurm
@pytest.mark.mpi
def test_signed_image_runs_and_is_verified_once(
    spank_cluster: SlurmCluster, signed: Signed, signed_only: Path, runner: User, nothing_left: None
) -> None:
    _forget(signed.image)
    _settled(signed.image)
    _hello(spank_cluster, runner, signed.image)
    [(entry, doc)] = [(p, d) for p, d in _entries().items() if d.get("image") == str(signed.image)]
    assert doc["signers"] == [signed.key.fingerprint]
    first = entry.stat()
    # The same unchanged image: found in the cache, not verified (and written) again.
    _hello(spank_cluster, runner, signed.image)
    again = entry.stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    _assert_cache_dir_clean()


@pytest.mark.slurm
@pytest.mark.mpi
def test_signed_image_runs_enforced(
    spank_cluster: SlurmCluster, signed: Signed, signed_only: Path, runner: User, nothing_left: None
) -> None:
    signed_only.write_text(signed_only.read_text() + "enforce = true\n")
    _hello(spank_cluster, runner, signed.image)
    refused = srun(spank_cluster, runner, "-n", "1", f"--container-image={signed.tampered}",
                   "true")  # fmt: skip
    assert refused.returncode != 0
    assert _error_lines(refused.stderr) == [_refusal(signed, signed.tampered)], refused.stderr
    _assert_cache_dir_clean()


@pytest.fixture(scope="module")
def pushed(registry: Registry, signed: Signed) -> dict[str, str]:
    """oras:// references of the signed and the tampered image, pushed by rankwire."""
    refs = {}
    for which, image in (("signed", signed.image), ("tampered", signed.tampered)):
        refs[which] = f"oras://{registry.netloc}/spank/sign-{which}:v1"
        subprocess.run(["rankwire", "push", "--insecure", "-q", str(image), refs[which]],
                       check=True, capture_output=True)  # fmt: skip
    return refs


@pytest.fixture
def pull_cache(shared_dir: Path, runner: User) -> Iterator[Path]:
    """A fresh RANKWIRE_CACHEDIR for the job user's pulls."""
    base = shared_dir / "spank-sign-caches"
    base.mkdir(exist_ok=True)
    base.chmod(0o1777)
    path = base / f"{runner.name}-{uuid.uuid4().hex[:8]}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slurm
def test_pulled_image_is_verified_after_its_pull(
    spank_cluster: SlurmCluster,
    spank_install: SpankInstall,
    registry: Registry,
    signed: Signed,
    pushed: dict[str, str],
    signed_only: Path,
    pull_cache: Path,
    runner: User,
    nothing_left: None,
) -> None:
    """A remote image: its registry allowed, pulled by the user, then the pulled file is
    verified like a local one, on the descriptor that is mounted."""
    signed_only.write_text(
        signed_only.read_text() + f'allowed_registries = ["{registry.netloc}"]\n'
    )
    spank_cluster.plugstack.write_text(
        f"required {spank_install.plugin} helper={spank_install.helper} "
        f"policy={spank_install.policy} registry_insecure={registry.netloc}\n"
    )
    env = dict(spank_cluster.env, RANKWIRE_CACHEDIR=str(pull_cache))
    try:
        ok = srun(spank_cluster, runner, "-n", "2", f"--container-image={pushed['signed']}",
                  "id", "-u", env=env)  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.split() == [str(runner.uid)] * 2
        bad = srun(spank_cluster, runner, "-n", "2", f"--container-image={pushed['tampered']}",
                   "true", env=env)  # fmt: skip
    finally:
        spank_cluster.plugstack.write_text(spank_install.plugstack_line())
    assert bad.returncode != 0
    digest = hashlib.sha256(signed.tampered.read_bytes()).digest()
    sifs = list((pull_cache / "images" / "sif").glob("*.sif"))
    [pulled] = [p for p in sifs if hashlib.sha256(p.read_bytes()).digest() == digest]
    assert pulled.stat().st_uid == runner.uid  # pulled by the job user
    assert _error_lines(bad.stderr) == [
        _refusal(signed, signed.tampered).replace(str(signed.tampered), str(pulled))
    ], bad.stderr
    _forget(*(pull_cache / "images" / "sif").iterdir())
    _assert_cache_dir_clean()
