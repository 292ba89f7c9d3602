"""`rankwire sign` / `verify` against independent implementations: GnuPG, OpenSSL keys,
and digests recomputed here with hashlib over the byte ranges Apptainer signs."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import struct
import subprocess
import uuid
from pathlib import Path
from typing import Iterator, NamedTuple

import pytest

from harness.images import make_world_readable
from harness.users import User
from rankwire.runtime.sif_write import ObjectInput, add_object

HEADER = struct.Struct("<32s10s3s3s16s8q")
DESCRIPTOR = struct.Struct("<iBIIIqqqqqqq128s384s")
MASK = 0xF0000000
SIGNATURE = 0x4005
MEDIA_TYPE = "application/vnd.sylabs.sif-metadata+json"
FIX_CHANGED = "the image was changed after signing; get it again from its signer"


# -- an independent SIF reader: only struct and hashlib ---------------------------------


class Desc(NamedTuple):
    slot: int
    raw: bytes
    dtype: int
    id: int
    group: int
    link: int
    offset: int
    size: int
    name: bytes
    extra: bytes


def descriptors(path: Path) -> list[Desc]:
    data = path.read_bytes()
    fields = HEADER.unpack_from(data)
    total, table = fields[8], fields[9]
    out = []
    for slot in range(total):
        raw = data[table + slot * DESCRIPTOR.size : table + (slot + 1) * DESCRIPTOR.size]
        d = DESCRIPTOR.unpack(raw)
        if d[1]:
            out.append(Desc(slot, raw, d[0], d[2], d[3], d[4], d[5], d[6], d[12], d[13]))
    return out


def signatures(path: Path) -> list[Desc]:
    return [d for d in descriptors(path) if d.dtype == SIGNATURE]


def object_data(path: Path, d: Desc) -> bytes:
    with open(path, "rb") as f:
        f.seek(d.offset)
        return f.read(d.size)


def expected_metadata(path: Path, group: int) -> dict[str, object]:
    """The metadata Apptainer signs for `group`, from the published recipe."""
    data = path.read_bytes()
    header = hashlib.sha256(data[0:45] + data[48:64]).hexdigest()
    members = sorted((d for d in descriptors(path) if d.group == group | MASK), key=lambda d: d.id)
    lowest = members[0].id
    objects = []
    for d in members:
        u = DESCRIPTOR.unpack(d.raw)
        packed = struct.pack("<iBIIqqqq", u[0], u[1], d.id - lowest, u[4], u[6], u[8], u[10], u[11])
        objects.append(
            {
                "relativeId": d.id - lowest,
                "descriptorDigest": "sha256:"
                + hashlib.sha256(packed + d.name + d.extra).hexdigest(),
                "objectDigest": "sha256:"
                + hashlib.sha256(data[d.offset : d.offset + d.size]).hexdigest(),
            }
        )
    return {"version": 1, "header": {"digest": f"sha256:{header}"}, "objects": objects}


def clear_text(signed: bytes) -> bytes:
    return signed.split(b"\n\n", 1)[1].split(b"\n-----BEGIN PGP SIGNATURE-----")[0]


def patch(path: Path, offset: int, new: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(new)


def flip(path: Path, offset: int) -> None:
    with open(path, "rb") as f:
        f.seek(offset)
        old = f.read(1)
    patch(path, offset, bytes([old[0] ^ 0x01]))


def descriptor_offset(path: Path, d: Desc) -> int:
    return HEADER.unpack_from(path.read_bytes())[9] + d.slot * DESCRIPTOR.size


# -- keys made by gpg and openssl --------------------------------------------------------


class GpgKey(NamedTuple):
    home: Path
    fingerprint: str  # upper-case hex, as gpg prints it
    secret: Path
    public: Path


class Keys(NamedTuple):
    dir: Path
    alice: GpgKey
    mallory: GpgKey
    pem: dict[str, tuple[Path, Path]]  # kind -> (private, public)


def gpg(key_home: Path, *args: str, **kw: object) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "GNUPGHOME": str(key_home)}
    return subprocess.run(["gpg", "--batch", *args], env=env, check=True, capture_output=True, **kw)  # type: ignore[call-overload, no-any-return]


def make_gpg_key(d: Path, name: str) -> GpgKey:
    home = d / f"gnupg-{name}"
    home.mkdir(mode=0o700)
    gpg(
        home,
        "--passphrase",
        "",
        "--quick-gen-key",
        f"{name} <{name}@example.org>",
        "default",
        "default",
        "never",
    )
    listing = gpg(home, "--with-colons", "--list-keys").stdout.decode()
    fpr = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
    secret, public = d / f"{name}-secret.asc", d / f"{name}.asc"
    secret.write_bytes(gpg(home, "--armor", "--export-secret-keys", fpr).stdout)
    public.write_bytes(gpg(home, "--armor", "--export", fpr).stdout)
    return GpgKey(home, fpr, secret, public)


def clearsign(key: GpgKey, text: Path) -> bytes:
    """`gpg --clearsign` of `text` (SHA-256, as Apptainer signs)."""
    return gpg(key.home, "--digest-algo", "SHA256", "--clearsign", "-o", "-", str(text)).stdout


def signature_object(data: bytes, extra: bytes, group: int = 1) -> ObjectInput:
    """A signature object as Apptainer lays it out: no group, linked to `group`."""
    return ObjectInput(
        SIGNATURE, data=data, group_id=0, linked_id=group, linked_group=True, extra=extra
    )


OPENSSL_ALGS = {
    "ed25519": ["-algorithm", "ed25519"],
    "rsa": ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    "ecdsa": ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
}


def ssh_keyid(public: Path) -> str:
    """What Apptainer's DSSE envelopes record as keyid: the key's SSH SHA-256 fingerprint,
    from `ssh-keygen -l` (RSA, ECDSA) or, as ssh-keygen cannot import a PKCS#8 ed25519
    key, from the SSH blob built by hand."""
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-in", str(public), "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    if len(der) == 44:  # ed25519: 12-byte SPKI prefix + 32-byte key
        blob = struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 32) + der[12:]
        return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    ssh = subprocess.run(
        ["ssh-keygen", "-i", "-m", "PKCS8", "-f", str(public)], check=True, capture_output=True
    ).stdout
    listed = subprocess.run(
        ["ssh-keygen", "-l", "-f", "-"], input=ssh, check=True, capture_output=True
    ).stdout.decode()
    return listed.split()[1]


@pytest.fixture(scope="module")
def keys(shared_dir: Path) -> Iterator[Keys]:
    d = shared_dir / f"sign-keys-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    pem = {}
    for kind, args in OPENSSL_ALGS.items():
        private, public = d / f"{kind}.pem", d / f"{kind}.pub.pem"
        subprocess.run(
            ["openssl", "genpkey", *args, "-out", str(private)], check=True, capture_output=True
        )
        subprocess.run(
            ["openssl", "pkey", "-in", str(private), "-pubout", "-out", str(public)],
            check=True,
            capture_output=True,
        )
        pem[kind] = (private, public)
    alice, mallory = make_gpg_key(d, "alice"), make_gpg_key(d, "mallory")
    make_world_readable(d)
    yield Keys(d, alice, mallory, pem)
    subprocess.run(["gpgconf", "--homedir", str(alice.home), "--kill", "all"], check=False)
    subprocess.run(["gpgconf", "--homedir", str(mallory.home), "--kill", "all"], check=False)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def image(shared_dir: Path, base_image: Path, runner: User) -> Iterator[Path]:
    """A copy of the base image in a directory of the runner's own."""
    d = shared_dir / f"sign-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    img = d / "img.sif"
    shutil.copyfile(base_image, img)
    for p in (d, img):
        os.chown(p, runner.uid, runner.gid)
    yield img
    shutil.rmtree(d, ignore_errors=True)


def rw(runner: User, *args: str) -> subprocess.CompletedProcess[str]:
    return runner.run(["rankwire", *args], cwd="/tmp")


def ok(runner: User, *args: str) -> str:
    proc = rw(runner, *args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def refused(runner: User, *args: str, code: int = 1) -> str:
    proc = rw(runner, *args)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr.rstrip("\n")


def what(sig_id: int, group: int = 1) -> str:
    return f"signature object {sig_id} (object group {group})"


# -- digests and layout, recomputed independently ----------------------------------------


def test_signed_metadata_matches_independent_digests(runner: User, image: Path, keys: Keys) -> None:
    ok(runner, "sign", "--pem-key", str(keys.pem["ed25519"][0]), str(image))
    [sig] = signatures(image)
    assert (sig.group, sig.link) == (MASK, MASK | 1)  # no group; linked to group 1
    assert sig.extra == struct.pack("<i", 1) + bytes(380)  # SHA-256, no fingerprint (DSSE)
    envelope = json.loads(object_data(image, sig))
    assert envelope["payloadType"] == MEDIA_TYPE
    assert [s["keyid"] for s in envelope["signatures"]] == [ssh_keyid(keys.pem["ed25519"][1])]
    payload = base64.b64decode(envelope["payload"])
    assert json.loads(payload) == expected_metadata(image, 1)
    # byte for byte as Go's json.Marshal writes it
    assert payload == json.dumps(expected_metadata(image, 1), separators=(",", ":")).encode()

    ok(runner, "sign", "--key", str(keys.alice.secret), str(image))
    pgp = next(s for s in signatures(image) if s.id != sig.id)
    hash_type = {b"SHA256": 1, b"SHA384": 2, b"SHA512": 3}[
        object_data(image, pgp).split(b"Hash: ", 1)[1].split(b"\n", 1)[0]
    ]
    fpr = bytes.fromhex(keys.alice.fingerprint)
    assert pgp.extra == struct.pack("<i", hash_type) + fpr + bytes(384 - 4 - len(fpr))
    assert json.loads(clear_text(object_data(image, pgp))) == expected_metadata(image, 1)


# -- GnuPG -------------------------------------------------------------------------------


def test_gpg_key_signs_with_rankwire_and_gpg_verifies(
    runner: User, image: Path, keys: Keys, tmp_path: Path
) -> None:
    out = ok(runner, "sign", "--key", str(keys.alice.secret), str(image))
    assert out == (
        f"rankwire: signed object group 1 (objects 1, 2, 3) of {image} as "
        f"{keys.alice.fingerprint}: signature object 4\n"
    )
    [sig] = signatures(image)
    message = tmp_path / "message.asc"
    message.write_bytes(object_data(image, sig))
    checked = gpg(keys.alice.home, "--status-fd", "1", "--verify", str(message))
    assert f"VALIDSIG {keys.alice.fingerprint}" in checked.stdout.decode("utf-8", "replace")
    assert json.loads(clear_text(message.read_bytes())) == expected_metadata(image, 1)
    out = ok(runner, "verify", "--keyring", str(keys.alice.public), str(image))
    assert out == (
        f"rankwire: {image}: verified\n  object group 1 (objects 1, 2, 3): signed by "
        f"{keys.alice.fingerprint} (alice <alice@example.org>), openpgp, signature object 4\n"
    )


def test_gpg_clearsigned_metadata_verifies_with_rankwire(
    runner: User, image: Path, keys: Keys, tmp_path: Path
) -> None:
    from rankwire.runtime.sif_read import SifImage
    from rankwire.runtime.sif_sign import group_objects, image_metadata

    with SifImage.open(image) as img:
        metadata = image_metadata(img, 1, group_objects(img, 1))
    assert json.loads(metadata) == expected_metadata(image, 1)
    (tmp_path / "md.json").write_bytes(metadata)
    extra = struct.pack("<i", 1) + bytes.fromhex(keys.alice.fingerprint)
    add_object(image, signature_object(clearsign(keys.alice, tmp_path / "md.json"), extra))
    out = ok(
        runner,
        "verify",
        "--keyring",
        str(keys.alice.public),
        "--fingerprint",
        keys.alice.fingerprint.lower(),
        str(image),
    )
    assert f"signed by {keys.alice.fingerprint} (alice <alice@example.org>), openpgp" in out
    # A pre-3.6 SIFHASH signature over the objects' data: refused unless asked for.
    data = image.read_bytes()
    members = sorted((d for d in descriptors(image) if d.group == 1 | MASK), key=lambda d: d.id)
    digest = hashlib.sha256(b"".join(data[d.offset : d.offset + d.size] for d in members))
    (tmp_path / "legacy.txt").write_text(f"SIFHASH:\n{digest.hexdigest()}\n")
    legacy = signature_object(clearsign(keys.alice, tmp_path / "legacy.txt"), extra)
    legacy_id = add_object(image, legacy)
    assert refused(runner, "verify", "--keyring", str(keys.alice.public), str(image)) == (
        f"rankwire: {image}: {what(legacy_id)} is a legacy (pre-Apptainer 3.6) SIFHASH "
        "signature, which does not protect the header or descriptors; sign the image again, "
        "or pass --legacy-insecure to accept it"
    )
    out = ok(runner, "verify", "--legacy-insecure", "--keyring", str(keys.alice.public), str(image))
    assert f"legacy-openpgp, signature object {legacy_id}" in out


# -- DSSE --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(OPENSSL_ALGS))
def test_dsse_sign_verify_and_tampered_envelope(
    runner: User, image: Path, keys: Keys, kind: str
) -> None:
    private, public = keys.pem[kind]
    ok(runner, "sign", "--pem-key", str(private), str(image))
    out = json.loads(ok(runner, "verify", "--pem-key", str(public), "--json", str(image)))
    [group] = out["groups"]
    assert (out["verified"], group["group_id"], group["object_ids"]) == (True, 1, [1, 2, 3])
    assert group["signers"][0]["format"] == "dsse"
    keyid = ssh_keyid(public)
    [sig] = signatures(image)
    assert [s["keyid"] for s in json.loads(object_data(image, sig))["signatures"]] == [keyid]
    fpr = base64.b64decode(keyid.split(":")[1] + "=").hex()
    assert group["signers"][0]["fingerprint"] == fpr
    other = "rsa" if kind != "rsa" else "ed25519"
    bad_key = (
        f"rankwire: {image}: {what(4)} does not verify with any --pem-key given (another key "
        "made it, or the envelope was altered); pass the signer's public key, or get the "
        "image again from its signer"
    )
    assert refused(runner, "verify", "--pem-key", str(keys.pem[other][1]), str(image)) == bad_key
    # One character of the signature changed, the envelope still well-formed JSON/base64.
    envelope = object_data(image, sig)
    at = envelope.index(b'"sig":"') + len(b'"sig":"') + 2
    swapped = b"A" if envelope[at : at + 1] != b"A" else b"B"
    patch(image, sig.offset + at, swapped)
    assert refused(runner, "verify", "--pem-key", str(public), str(image)) == bad_key


def test_resigning_replaces_only_this_signers_signature(
    runner: User, image: Path, keys: Keys
) -> None:
    ok(runner, "sign", "--key", str(keys.alice.secret), str(image))
    ok(runner, "sign", "--pem-key", str(keys.pem["ed25519"][0]), str(image))
    out = ok(runner, "sign", "--key", str(keys.alice.secret), str(image))
    assert out.endswith(": signature object 4, replacing signature object 4\n"), out
    out = ok(runner, "sign", "--pem-key", str(keys.pem["ed25519"][0]), str(image))
    assert out.endswith(": signature object 5, replacing signature object 5\n"), out
    assert len(signatures(image)) == 2
    ok(
        runner,
        "verify",
        "--keyring",
        str(keys.alice.public),
        "--pem-key",
        str(keys.pem["ed25519"][1]),
        str(image),
    )


# -- refusals, each with its one line --------------------------------------------------


def test_tampering_is_refused_naming_what_changed(runner: User, image: Path, keys: Keys) -> None:
    ok(runner, "sign", "--key", str(keys.alice.secret), str(image))
    pristine = image.read_bytes()
    verify = ("verify", "--keyring", str(keys.alice.public), str(image))
    by_object = {d.id: d for d in descriptors(image)}

    def changed(detail: str) -> str:
        return f"rankwire: {image}: {detail} from what {what(4)} signed; {FIX_CHANGED}"

    flip(image, by_object[3].offset + by_object[3].size // 2)  # the partition
    assert refused(runner, *verify) == changed("the data of object 3 differs")
    image.write_bytes(pristine)
    flip(image, descriptor_offset(image, by_object[1]) + 73)  # object 1's name
    assert refused(runner, *verify) == changed("the descriptor of object 1 differs")
    image.write_bytes(pristine)
    flip(image, 5)  # the launch script
    assert refused(runner, *verify) == changed(
        "the header (launch script, magic, version or image ID) differs"
    )
    image.write_bytes(pristine)
    assert refused(runner, "verify", "--keyring", str(keys.mallory.public), str(image)) == (
        f"rankwire: {image}: {what(4)} was made by OpenPGP key {keys.alice.fingerprint}, which "
        "is not in the --keyring given; pass the signer's public key with --keyring KEYS.asc "
        "if you trust it"
    )
    assert refused(runner, *verify[:-1], "--fingerprint", keys.mallory.fingerprint, str(image)) == (
        f"rankwire: {image}: object group 1 is signed by {keys.alice.fingerprint} (signature "
        "object 4), which is not one of the fingerprints required; add that fingerprint if you "
        "trust its key"
    )
    ok(runner, *verify[:-1], "--fingerprint", keys.alice.fingerprint, str(image))


def test_signature_moved_to_another_group_is_refused(runner: User, image: Path, keys: Keys) -> None:
    add_object(image, ObjectInput(0x4007, data=b"second group", group_id=2))  # object 4
    ok(runner, "sign", "--key", str(keys.alice.secret), str(image))  # objects 5 and 6
    out = ok(runner, "verify", "--keyring", str(keys.alice.public), "--group-id", "2", str(image))
    assert out.splitlines()[1].startswith("  object group 2 (objects 4): signed by "), out
    out = ok(runner, "verify", "--keyring", str(keys.alice.public), "--sif-id", "3", str(image))
    assert out.splitlines()[1].startswith("  object group 1 (objects 3): signed by "), out
    sig = next(s for s in signatures(image) if s.link == MASK | 1)
    patch(image, descriptor_offset(image, sig) + 13, struct.pack("<I", MASK | 2))
    assert refused(runner, "verify", "--keyring", str(keys.alice.public), str(image)) == (
        f"rankwire: {image}: {what(sig.id, 2)} covers objects 4, 5, 6 but the group holds 4; "
        "the signature was moved or objects were added or removed; get the image again from "
        "its signer"
    )


def test_malformed_signature_is_refused(runner: User, image: Path, keys: Keys) -> None:
    add_object(image, signature_object(b"not a signature", struct.pack("<i", 1)))
    assert refused(runner, "verify", "--keyring", str(keys.alice.public), str(image)) == (
        f"rankwire: {image}: {what(4)} is malformed (neither an OpenPGP clear-signed message "
        "nor a DSSE envelope); delete it (`siftool del 4 IMG`) and sign the image again"
    )
    proc = rw(runner, "verify", "--json", "--keyring", str(keys.alice.public), str(image))
    assert json.loads(proc.stdout)["reason"] == "malformed-signature"


def test_unsigned_image_and_usage_errors(
    runner: User, image: Path, keys: Keys, base_image: Path
) -> None:
    if runner.uid:  # the session's image is root's: the user may verify it, not sign it
        assert refused(
            runner, "sign", "--key", str(keys.alice.secret), str(base_image), code=2
        ) == (f"rankwire: {base_image}: cannot open for writing: Permission denied; check the path")
    assert refused(runner, "verify", "--keyring", str(keys.alice.public), str(image)) == (
        f"rankwire: {image}: object group 1 is not signed; sign it with `rankwire sign`, or "
        "use an image its builder signed"
    )
    proc = rw(runner, "verify", "--json", "--keyring", str(keys.alice.public), str(image))
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["reason"] == "unsigned"
    assert refused(runner, "verify", str(image), code=2) == (
        "rankwire: verify needs the keys to trust: --keyring KEYS.asc (OpenPGP) and/or "
        "--pem-key PUB.pem (DSSE)"
    )
    assert refused(runner, "sign", str(image), code=2) == (
        "rankwire: sign needs exactly one key: --key SECRET.asc (OpenPGP) or --pem-key "
        "KEY.pem (DSSE)"
    )
    assert refused(runner, "sign", "--key", str(keys.alice.public), str(image), code=2).startswith(
        f"rankwire: {keys.alice.public}: not a usable OpenPGP secret key ("
    )
