"""Signature policy at launch: `--verify FPR,…` / `RANKWIRE_VERIFY` with `--keyring` on
exec, instance start and the launcher (refused before anything starts), and the
verification cache (`runtime/trust.py`). Keys are made by gpg and openssl."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from test_sign import GpgKey, descriptors, flip, make_gpg_key, signatures

from harness.images import make_world_readable
from harness.users import User
from rankwire.errors import UserError
from rankwire.runtime import trust
from rankwire.runtime.options import delegation_argv

CHANGED = "the image was changed after signing; get it again from its signer"


@pytest.fixture(scope="module")
def keys(shared_dir: Path) -> Iterator[tuple[GpgKey, GpgKey]]:
    d = shared_dir / f"trust-keys-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    alice, mallory = make_gpg_key(d, "alice"), make_gpg_key(d, "mallory")
    make_world_readable(d)
    yield alice, mallory
    for key in (alice, mallory):
        subprocess.run(["gpgconf", "--homedir", str(key.home), "--kill", "all"], check=False)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def signed(shared_dir: Path, base_image: Path, keys: tuple[GpgKey, GpgKey]) -> Path:
    """The base image signed by alice (read-only to every test)."""
    out = shared_dir / f"trust-signed-{uuid.uuid4().hex[:8]}.sif"
    shutil.copyfile(base_image, out)
    subprocess.run(
        ["rankwire", "sign", "--key", str(keys[0].secret), str(out)],
        check=True,
        capture_output=True,
    )
    out.chmod(0o444)
    return out


@pytest.fixture
def cache(shared_dir: Path, runner: User) -> Iterator[Path]:
    """A RANKWIRE_CACHEDIR of the runner's own."""
    d = shared_dir / f"trust-cache-{uuid.uuid4().hex[:8]}"
    d.mkdir(mode=0o700)
    os.chown(d, runner.uid, runner.gid)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def rw(runner: User, cache: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    extra = [f"{k}={v}" for k, v in {"RANKWIRE_CACHEDIR": str(cache), **env}.items()]
    return runner.run(["env", *extra, "rankwire", *args], cwd="/tmp")


def refused(proc: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr.rstrip("\n")


# -- the requirement: pure ---------------------------------------------------------------

FPR = "A" * 40


def test_requirement_from_options_and_environment() -> None:
    assert trust.requirement(None, (), {}, "/c") is None
    spaced = "AAAA AAAA AAAA AAAA AAAA  AAAA AAAA AAAA AAAA AAAA"  # as gpg prints it
    assert trust.requirement(f"{spaced},{'b' * 64}", ("/k.asc",), {}, "/c") == trust.Requirement(
        ("a" * 40, "b" * 64), ("/k.asc",)
    )
    env = {"RANKWIRE_VERIFY": FPR, "RANKWIRE_KEYRING": "/a.asc:/b.pem"}
    assert trust.requirement(None, (), env, "/c") == trust.Requirement(
        ("a" * 40,), ("/a.asc", "/b.pem")
    )
    assert trust.requirement(None, (), {"RANKWIRE_VERIFY": FPR}, "/c") == trust.Requirement(
        ("a" * 40,), ("/c/rankwire/keys.asc", "/etc/rankwire/keys.asc"), keyrings_given=False
    )
    # The option wins over the variable.
    got = trust.requirement("b" * 40, (), {"RANKWIRE_VERIFY": FPR}, "/c")
    assert got is not None and got.fingerprints == ("b" * 40,)


@pytest.mark.parametrize(
    ("verify", "keyrings", "env", "message"),
    [
        (
            "ABCD",
            (),
            {},
            "--verify ABCD: not a key fingerprint (40 or 64 hex digits); `rankwire verify "
            "--keyring KEYS.asc IMG` shows an image's signers",
        ),
        (
            None,
            (),
            {"RANKWIRE_VERIFY": f"{FPR},"},
            "RANKWIRE_VERIFY '': not a key fingerprint (40 or 64 hex digits); `rankwire "
            "verify --keyring KEYS.asc IMG` shows an image's signers",
        ),
        (
            None,
            ("/k.asc",),
            {},
            "--keyring applies with --verify FPR,…: add --verify or drop it",
        ),
    ],
)
def test_requirement_refusals(
    verify: str | None, keyrings: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    with pytest.raises(UserError) as err:
        trust.requirement(verify, keyrings, env, "/c")
    assert str(err.value) == message


def test_the_launcher_passes_the_requirement_to_its_tasks() -> None:
    argv = delegation_argv({"verify": "a" * 40, "keyring": ("/k1.asc", "/k2.pem")})
    assert argv == ["--verify", "a" * 40, "--keyring", "/k1.asc", "--keyring", "/k2.pem"]


# -- the check and its cache: in this process ---------------------------------------------


def _check(image: Path, key: GpgKey, fpr: str, cache: Path | None) -> trust.Verified:
    req = trust.Requirement((fpr.lower(),), (str(key.public),))
    fd = os.open(image, os.O_RDONLY)
    try:
        return trust.check(fd, str(image), req, cache)
    finally:
        os.close(fd)


def test_a_verification_is_cached_by_file_identity(
    signed: Path, keys: tuple[GpgKey, GpgKey], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, mallory = keys
    cache = tmp_path / "verified"
    fresh = _check(signed, alice, alice.fingerprint, cache)
    if not list(cache.iterdir()):  # the image is younger than _SETTLE_NS: not recorded
        monkeypatch.setattr(trust, "_SETTLE_NS", 0)
        fresh = _check(signed, alice, alice.fingerprint, cache)
    assert fresh == trust.Verified((alice.fingerprint,), cached=False)
    [entry] = cache.iterdir()  # no lock file left
    assert entry.stat().st_mode & 0o777 == 0o600 and cache.stat().st_mode & 0o777 == 0o700
    assert _check(signed, alice, alice.fingerprint, cache) == trust.Verified(
        (alice.fingerprint,), cached=True
    )
    # Other keys or fingerprints are another entry: verified again, and refused here.
    with pytest.raises(UserError) as err:
        _check(signed, mallory, alice.fingerprint, cache)
    assert "which is not in the --keyring given" in str(err.value)
    with pytest.raises(UserError) as err:
        _check(signed, alice, mallory.fingerprint, cache)
    assert str(err.value) == (
        f"{signed}: object group 1 is signed by {alice.fingerprint} (signature object "
        f"{signatures(signed)[0].id}), which is not one of the fingerprints required; add "
        "that fingerprint if you trust its key"
    )
    assert len(list(cache.iterdir())) == 1


def test_a_changed_image_is_verified_again(
    signed: Path, keys: tuple[GpgKey, GpgKey], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = keys[0]
    monkeypatch.setattr(trust, "_SETTLE_NS", 0)
    image, cache = tmp_path / "img.sif", tmp_path / "verified"
    shutil.copyfile(signed, image)
    assert not _check(image, alice, alice.fingerprint, cache).cached
    assert _check(image, alice, alice.fingerprint, cache).cached
    part = max(descriptors(image), key=lambda d: d.size)  # the partition
    flip(image, part.offset + part.size // 2)  # same size, same inode: ctime moves
    with pytest.raises(UserError) as err:
        _check(image, alice, alice.fingerprint, cache)
    sig = signatures(image)[0].id
    assert str(err.value) == (
        f"{image}: the data of object {part.id} differs from what signature object {sig} "
        f"(object group 1) signed; {CHANGED}"
    )


def test_a_fresh_file_is_not_recorded(
    signed: Path, keys: tuple[GpgKey, GpgKey], tmp_path: Path
) -> None:
    """A write in the same clock tick as the check could keep ctime: not cached."""
    alice = keys[0]
    image, cache = tmp_path / "img.sif", tmp_path / "verified"
    shutil.copyfile(signed, image)  # ctime: now
    assert not _check(image, alice, alice.fingerprint, cache).cached
    assert list(cache.iterdir()) == []
    assert not _check(image, alice, alice.fingerprint, None).cached  # no cache at all


# -- at launch: exec, instance start, the launcher ------------------------------------------


@pytest.mark.usefixtures("nothing_left_behind")
def test_exec_runs_a_signed_image_and_refuses_others(
    runner: User,
    cache: Path,
    signed: Path,
    base_image: Path,
    keys: tuple[GpgKey, GpgKey],
) -> None:
    alice, mallory = keys
    verify = ("--verify", alice.fingerprint, "--keyring", str(alice.public))
    proc = rw(runner, cache, "exec", *verify, str(signed), "/bin/echo", "ran")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "ran\n", "")
    # The variables do the same; a second start finds the verification cached.
    env = {"RANKWIRE_VERIFY": alice.fingerprint, "RANKWIRE_KEYRING": str(alice.public)}
    proc = rw(runner, cache, "exec", str(signed), "/bin/echo", "ran", **env)
    assert (proc.returncode, proc.stdout) == (0, "ran\n")
    assert refused(rw(runner, cache, "exec", *verify, str(base_image), "/bin/echo", "ran")) == (
        f"rankwire: {base_image}: object group 1 is not signed; sign it with `rankwire sign`, "
        "or use an image its builder signed"
    )
    other = ("--verify", mallory.fingerprint, "--keyring", str(mallory.public))
    assert refused(rw(runner, cache, "exec", *other, str(signed), "/bin/true")) == (
        f"rankwire: {signed}: signature object {signatures(signed)[0].id} (object group 1) "
        f"was made by OpenPGP key {alice.fingerprint}, which is not in the --keyring given; "
        "pass the signer's public key with --keyring KEYS.asc if you trust it"
    )
    assert not any(p.name.endswith(".lock") for p in (cache / "verified").iterdir())


def test_cache_clean_removes_verification_records(runner: User, cache: Path) -> None:
    records = cache / "verified"
    records.mkdir(mode=0o700)
    old, new = records / ("a" * 64), records / ("b" * 64)
    for entry in (old, new):
        entry.write_text('{"signers": []}')
    os.utime(old, (0, 0))
    for p in (records, old, new):
        os.chown(p, runner.uid, runner.gid)
    kept = rw(runner, cache, "cache", "clean", "--older-than", "1")
    assert kept.stdout == (
        f"removed 1 verification records\nremoved 0 entries (0.0 MiB) from {cache}/images\n"
    )
    assert [p.name for p in records.iterdir()] == [new.name]
    gone = rw(runner, cache, "cache", "clean")
    assert gone.stdout.splitlines()[0] == "removed 1 verification records"
    assert list(records.iterdir()) == []


@pytest.mark.usefixtures("nothing_left_behind")
def test_instance_start_and_the_launcher_refuse_before_starting(
    runner: User, cache: Path, base_image: Path, keys: tuple[GpgKey, GpgKey]
) -> None:
    alice = keys[0]
    verify = ("--verify", alice.fingerprint, "--keyring", str(alice.public))
    unsigned = (
        f"rankwire: {base_image}: object group 1 is not signed; sign it with `rankwire sign`, "
        "or use an image its builder signed"
    )
    name = f"t{uuid.uuid4().hex[:8]}"
    assert refused(rw(runner, cache, "instance", "start", *verify, str(base_image), name)) == (
        unsigned
    )
    assert (
        refused(
            rw(runner, cache, "run", "-n", "2", *verify, "--image", str(base_image), "/bin/true")
        )
        == unsigned
    )
    assert refused(
        runner.run(
            [
                "env",
                f"RANKWIRE_CACHEDIR={cache}",
                "apptainer-mpirun",
                "-n",
                "2",
                *verify,
                str(base_image),
                "/bin/true",
            ],
            cwd="/tmp",
        )
    ) == unsigned.replace("rankwire: ", "apptainer-mpirun: ", 1)
    assert refused(
        rw(runner, cache, "exec", *verify, f"instance://{name}", "/bin/true"), code=2
    ) == (
        "rankwire: --verify, --keyring shape a container; an instance already has its own: "
        "give them to `instance start`"
    )


def test_no_keyring_to_verify_with(runner: User, cache: Path, signed: Path) -> None:
    proc = rw(
        runner,
        cache,
        "exec",
        str(signed),
        "/bin/true",
        RANKWIRE_VERIFY=FPR,
        XDG_CONFIG_HOME=str(cache / "nowhere"),
    )
    if Path(trust.SITE_KEYRING).exists():
        pytest.skip(f"{trust.SITE_KEYRING} exists here")
    assert refused(proc, code=2) == (
        f"rankwire: no keyring to verify the image with ({cache}/nowhere/rankwire/keys.asc and "
        "/etc/rankwire/keys.asc do not exist): give --keyring KEYS.asc, or export the signers' "
        "keys to the first"
    )
    missing = rw(
        runner,
        cache,
        "exec",
        "--verify",
        FPR,
        "--keyring",
        "/nonexistent.asc",
        str(signed),
        "/bin/true",
    )
    assert refused(missing, code=2) == (
        "rankwire: keyring /nonexistent.asc does not exist: check the path, or export the "
        "signers' keys there (`gpg --armor --export FPR > keys.asc`)"
    )


def test_an_unusable_cache_dir_verifies_without_a_cache(
    signed: Path, keys: tuple[GpgKey, GpgKey], tmp_path: Path
) -> None:
    """A cache dir that cannot be made (here under /proc) or is not private: the image is
    still verified (and refused or run), nothing is recorded, no traceback."""
    alice = keys[0]
    assert _check(signed, alice, alice.fingerprint, Path("/proc/nope/verified")) == (
        trust.Verified((alice.fingerprint,), cached=False)
    )
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)  # others could plant entries: not used
    assert not _check(signed, alice, alice.fingerprint, shared).cached
    assert list(shared.iterdir()) == []
