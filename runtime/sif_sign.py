"""Signing and verifying SIF images the way Apptainer does (apptainer/sif `pkg/integrity`).

A signature is a `Signature` object in no group whose LinkedID is the signed group (with
the group mask) and whose Extra is `int32 hash type` + `[256]byte` signer fingerprint (the
OpenPGP primary key's; zero for DSSE). Its data signs the JSON image metadata: the header
digest and, per signed object, the descriptor and data digests (`sif_digest`). Envelopes:
an OpenPGP clear-signed message (pysequoia) or a DSSE envelope (`cryptography`, PEM keys).
Pre-3.6 "legacy" signatures clear-sign `SIFHASH:\\n<hex>` over the objects' data only and
protect no metadata; they are accepted only when asked for.

Everything here reads the image through one `SifImage`; the only write is `sign_image`,
through `sif_write.add_object` (new signature appended, old one dropped in the same
descriptor-table write).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import re
import struct
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from rankwire.errors import UserError, shown
from rankwire.record import record
from rankwire.runtime.sif_digest import descriptor_digest, header_digest, partition_digest
from rankwire.runtime.sif_format import DataType, Descriptor, PathLike
from rankwire.runtime.sif_read import SifImage

METADATA_MEDIA_TYPE = "application/vnd.sylabs.sif-metadata+json"
SIGNATURE_EXTRA = struct.Struct("<i256s")  # pkg/sif/descriptor.go `signature`
SIF_HASHES = {1: "sha256", 2: "sha384", 3: "sha512"}  # pkg/sif/sif.go hashType (no BLAKE2)
_PGP_HASHES = {"SHA256": 1, "SHA384": 2, "SHA512": 3}
# Digest algorithms Apptainer writes in metadata (pkg/integrity/digest.go).
_METADATA_ALGS = {"sha224", "sha256", "sha384", "sha512", "sha512_224", "sha512_256"}
_CLEARSIGN_HEAD = b"-----BEGIN PGP SIGNED MESSAGE-----"
_LEGACY_PREFIX = b"SIFHASH:\n"
_MAX_SIGNATURE = 1 << 20  # an envelope is a few KiB; never read a forged huge one whole

# Verification failure reasons (the `reason` of VerifyError and of `verify --json`).
UNSIGNED = "unsigned"
UNKNOWN_KEY = "unknown-key"
BAD_SIGNATURE = "bad-signature"
FINGERPRINT_NOT_LISTED = "fingerprint-not-listed"
DIGEST_MISMATCH = "digest-mismatch"
MALFORMED = "malformed-signature"
LEGACY = "legacy-signature"


class VerifyError(UserError):
    """The image is not verified; `reason` is one of the constants above."""

    exit_code = 1

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# --- keys -------------------------------------------------------------------------------


def _read_key_file(path: PathLike, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise UserError(
            f"{shown(path)}: cannot read {what}: {err.strerror}; check the path"
        ) from None


@record
class PemKey:
    """A DSSE key: private for signing, public for verifying. `fingerprint` is the SHA-256
    of its SSH public key blob, hex (the signature's descriptor records no fingerprint)."""

    path: str
    public: Any  # Ed25519PublicKey | RSAPublicKey | EllipticCurvePublicKey
    private: Any = None
    fingerprint: str = ""

    def sign(self, message: bytes) -> bytes:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

        key = self.private
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key.sign(message)
        if isinstance(key, rsa.RSAPrivateKey):
            return key.sign(message, padding.PKCS1v15(), hashes.SHA256())
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key.sign(message, ec.ECDSA(hashes.SHA256()))

    def verifies(self, signature: bytes, message: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

        key = self.public
        try:
            if isinstance(key, ed25519.Ed25519PublicKey):
                key.verify(signature, message)
            elif isinstance(key, rsa.RSAPublicKey):
                key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
            else:
                key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return False
        return True


def _supported_pem(path: PathLike, key: Any) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    kinds = (
        ed25519.Ed25519PrivateKey,
        ed25519.Ed25519PublicKey,
        rsa.RSAPrivateKey,
        rsa.RSAPublicKey,
        ec.EllipticCurvePrivateKey,
        ec.EllipticCurvePublicKey,
    )
    if not isinstance(key, kinds):
        raise UserError(
            f"{shown(path)}: {type(key).__name__} keys cannot sign SIF images; "
            "use an ed25519, RSA or ECDSA key (openssl genpkey -algorithm ed25519)"
        )


def _pem_fingerprint(public: Any) -> str:
    """SHA-256 of the key's SSH wire-format blob, in hex: the digest `ssh-keygen -l` shows
    and Apptainer's DSSE envelopes record as keyid `SHA256:<base64>`."""
    from cryptography.hazmat.primitives import serialization

    line = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return hashlib.sha256(base64.b64decode(line.split()[1])).hexdigest()


def dsse_keyid(key: PemKey) -> str:
    """The keyid sigstore's DSSE wrapper writes (as in Apptainer's signed test images)."""
    digest = base64.b64encode(bytes.fromhex(key.fingerprint)).decode().rstrip("=")
    return f"SHA256:{digest}"


def load_pem_private(path: PathLike) -> PemKey:
    """A PEM private key (unencrypted) for `sign --pem-key`."""
    from cryptography.hazmat.primitives import serialization

    data = _read_key_file(path, "the PEM key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise UserError(
            f"{shown(path)}: not an unencrypted PEM private key ({str(err).splitlines()[0]}); "
            "give the private key file (openssl genpkey … -out key.pem)"
        ) from None
    _supported_pem(path, key)
    public = key.public_key()
    return PemKey(str(path), public, key, _pem_fingerprint(public))


def load_pem_public(path: PathLike) -> PemKey:
    """A PEM public key for `verify --pem-key` (a private key file is accepted too)."""
    return pem_public_of(path, _read_key_file(path, "the PEM key"))


def pem_public_of(path: PathLike, data: bytes) -> PemKey:
    """The PEM public key `data` read from `path`."""
    from cryptography.hazmat.primitives import serialization

    try:
        public: Any = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        try:
            public = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError):
            raise UserError(
                f"{shown(path)}: not a PEM public key; export it with "
                "`openssl pkey -in key.pem -pubout -out pub.pem`"
            ) from None
    _supported_pem(path, public)
    return PemKey(str(path), public, None, _pem_fingerprint(public))


@record
class PgpSigner:
    """An OpenPGP secret key for `sign --key`."""

    path: str
    tsk: Any  # pysequoia.Tsk
    fingerprint: str
    user_id: str

    def clearsign(self, message: bytes) -> tuple[bytes, int]:
        """(clear-signed message, SIF hash type of its signature)."""
        import pysequoia

        try:
            signed: bytes = pysequoia.sign(
                self.tsk.signer(), message, mode=pysequoia.SignatureMode.CLEAR
            )
        except Exception as err:  # pysequoia raises plain exceptions
            raise UserError(
                f"{shown(self.path)}: cannot sign with this key ({_first_line(err)}); "
                "use an unprotected secret key with a signing-capable key"
            ) from None
        match = re.search(rb"^Hash: ([A-Z0-9-]+)", signed, re.MULTILINE)
        hash_type = _PGP_HASHES.get(match.group(1).decode() if match else "SHA512", 0)
        if not hash_type:
            raise UserError(
                f"{shown(self.path)}: the key signs with a hash SIF cannot record; "
                "use a key that signs with SHA-256, SHA-384 or SHA-512"
            )
        return signed, hash_type


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def load_pgp_signer(path: PathLike) -> PgpSigner:
    """An armored or binary OpenPGP secret key (transferable secret key), unprotected."""
    import pysequoia

    data = _read_key_file(path, "the OpenPGP key")
    try:
        tsk = pysequoia.Tsk.from_bytes(data)
        tsk.signer()
    except Exception as err:
        raise UserError(
            f"{shown(path)}: not a usable OpenPGP secret key ({_first_line(err)}); export one "
            "with `gpg --armor --export-secret-keys FPR` (without a passphrase)"
        ) from None
    cert = tsk.extract_certificate()
    uids = [str(u) for u in cert.user_ids]
    return PgpSigner(str(path), tsk, cert.fingerprint.lower(), uids[0] if uids else "")


@record
class Keyring:
    """OpenPGP certificates, indexed by every (sub)key fingerprint and key ID they hold."""

    certs: tuple[Any, ...]  # pysequoia.Cert
    by_key: dict[str, Any]

    def cert_for(self, issuer: str) -> Any:
        return self.by_key.get(issuer.lower())


def load_keyrings(paths: Sequence[PathLike]) -> Keyring:
    return keyring_of([(path, _read_key_file(path, "the keyring")) for path in paths])


def keyring_of(files: Sequence[tuple[PathLike, bytes]]) -> Keyring:
    """The certificates of these keyring files' contents (path, bytes)."""
    import pysequoia
    from pysequoia.packet import PacketPile

    certs: list[Any] = []
    by_key: dict[str, Any] = {}
    for path, data in files:
        try:
            found = pysequoia.Cert.split_bytes(data)
        except Exception as err:
            raise UserError(
                f"{shown(path)}: not an OpenPGP keyring ({_first_line(err)}); export one "
                "with `gpg --armor --export FPR > keys.asc`"
            ) from None
        for cert in found:
            certs.append(cert)
            for packet in PacketPile.from_bytes(bytes(cert)):
                for ident in (packet.fingerprint, packet.key_id):
                    if ident:
                        by_key[ident.lower()] = cert
    return Keyring(tuple(certs), by_key)


# --- metadata ---------------------------------------------------------------------------


class _Digests:
    """Object data digests of one image, each computed once (one pass over the data)."""

    def __init__(self, img: SifImage) -> None:
        self.img = img
        self.cache: dict[tuple[int, str], str] = {}

    def data(self, desc: Descriptor, algorithm: str) -> str:
        key = (desc.id, algorithm)
        if key not in self.cache:
            img = self.img
            img._check_bounds(desc)
            self.cache[key] = partition_digest(img.file.fileno(), desc.offset, desc.size, algorithm)
        return self.cache[key]


def group_objects(img: SifImage, group_id: int) -> list[Descriptor]:
    """The objects of a group, by ID (what Apptainer signs for the group)."""
    return sorted((d for d in img.descriptors if d.group_id == group_id), key=lambda d: d.id)


def image_metadata(
    img: SifImage, group_id: int, objects: Sequence[Descriptor], algorithm: str = "sha256"
) -> bytes:
    """The JSON Apptainer signs for `objects` of group `group_id`, byte for byte as Go's
    json.Marshal writes it (`pkg/integrity/metadata.go` imageMetadata)."""
    return _metadata_json(img, group_id, objects, _Digests(img), algorithm)


def _metadata_json(
    img: SifImage,
    group_id: int,
    objects: Sequence[Descriptor],
    digests: _Digests,
    algorithm: str,
) -> bytes:
    lowest = min(d.id for d in img.descriptors if d.group_id == group_id)
    doc = {
        "version": 1,
        "header": {"digest": header_digest(img, algorithm)},
        "objects": [
            {
                "relativeId": d.id - lowest,
                "descriptorDigest": descriptor_digest(img, d, algorithm),
                "objectDigest": digests.data(d, algorithm),
            }
            for d in sorted(objects, key=lambda d: d.id)
        ],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


# --- envelopes --------------------------------------------------------------------------


def dsse_pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what the envelope's signatures sign."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def dsse_envelope(key: PemKey, payload: bytes) -> bytes:
    """The envelope sigstore's DSSE wrapper writes for Apptainer, newline included."""
    sig = key.sign(dsse_pae(METADATA_MEDIA_TYPE, payload))
    doc = {
        "payloadType": METADATA_MEDIA_TYPE,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [{"keyid": dsse_keyid(key), "sig": base64.b64encode(sig).decode()}],
    }
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


def _b64(text: object) -> bytes:
    if not isinstance(text, str):
        raise ValueError("not a string")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _parse_dsse(data: bytes) -> Optional[tuple[bytes, list[bytes]]]:
    """(payload, signatures) of a DSSE envelope for SIF metadata, None if `data` is not one;
    ValueError if it is one but broken."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("payloadType") != METADATA_MEDIA_TYPE:
        return None
    sigs = doc.get("signatures")
    if not isinstance(sigs, list) or not sigs:
        raise ValueError("the DSSE envelope holds no signatures")
    try:
        payload = _b64(doc.get("payload"))
        return payload, [_b64(s.get("sig") if isinstance(s, dict) else None) for s in sigs]
    except (ValueError, binascii.Error):
        raise ValueError("the DSSE envelope's payload or signature is not base64") from None


def _clear_text(data: bytes) -> bytes:
    """The signed text of a clear-signed message (after the armor headers), unverified."""
    _head, sep, rest = data.partition(b"\n\n")
    return rest if sep else b""


def _pgp_issuer(data: bytes) -> str:
    """The issuer fingerprint (or key ID) a clear-signed message's signature names, or ""."""
    import pysequoia

    start = data.find(b"-----BEGIN PGP SIGNATURE-----")
    if start < 0:
        return ""
    try:
        sig = pysequoia.Sig.from_bytes(data[start:])
    except Exception:
        return ""  # pysequoia cannot read some old signatures alone; verify still can
    return str(sig.issuer_fingerprint or sig.issuer_key_id or "").lower()


# --- signing ----------------------------------------------------------------------------

Key = Union[PgpSigner, PemKey]


@record
class Signed:
    group_id: int
    object_ids: tuple[int, ...]
    signature_id: int
    replaced: tuple[int, ...]


def _selection(
    img: SifImage, group_id: Optional[int], object_id: Optional[int]
) -> list[tuple[int, list[Descriptor]]]:
    """(group, objects) to sign or verify: all groups, one group, or one object."""
    where = shown(img.path)
    groups = sorted({d.group_id for d in img.descriptors if d.group_id})
    if object_id is not None:
        desc = img.get(object_id)
        if not desc.group_id:
            raise UserError(
                f"{where}: object {object_id} is in no object group, so it cannot be signed; "
                "pick a grouped object (see `rankwire sif list`)"
            )
        return [(desc.group_id, [desc])]
    if group_id is not None:
        if group_id not in groups:
            raise UserError(
                f"{where}: no object group {group_id} (groups: "
                f"{', '.join(map(str, groups)) or 'none'}); pick one from `rankwire sif list`"
            )
        groups = [group_id]
    if not groups:
        raise UserError(f"{where}: the image has no object groups to sign; build it first")
    return [(g, group_objects(img, g)) for g in groups]


def _signatures_of(img: SifImage, group_id: int) -> list[Descriptor]:
    return [
        d
        for d in img.descriptors
        if d.datatype == DataType.SIGNATURE and d.linked_group and d.linked_id == group_id
    ]


def _fingerprint_of(desc: Descriptor) -> str:
    """The signer fingerprint a signature's Extra records ("" when absent, as for DSSE)."""
    entity = desc.extra[4:24]
    return "" if entity == bytes(20) else entity.hex()


def _is_own(img: SifImage, sig: Descriptor, key: Key) -> bool:
    """Whether signature object `sig` was made by `key` (and so is replaced on re-signing)."""
    if isinstance(key, PgpSigner):
        return _fingerprint_of(sig) == key.fingerprint
    if sig.size > _MAX_SIGNATURE:
        return False
    try:
        parsed = _parse_dsse(img.read(sig))
    except ValueError:
        return False
    if parsed is None:
        return False
    payload, sigs = parsed
    return any(key.verifies(s, dsse_pae(METADATA_MEDIA_TYPE, payload)) for s in sigs)


def sign_image(
    path: PathLike, key: Key, *, group_id: Optional[int] = None, object_id: Optional[int] = None
) -> list[Signed]:
    """Sign each selected group (default: every group), replacing `key`'s old signatures."""
    from rankwire.runtime.sif_write import ObjectInput, add_object

    pending: list[tuple[int, list[int], bytes, int, str, list[int]]] = []
    with SifImage.open(path) as img:
        digests = _Digests(img)
        for group, objects in _selection(img, group_id, object_id):
            metadata = _metadata_json(img, group, objects, digests, "sha256")
            if isinstance(key, PgpSigner):
                data, hash_type = key.clearsign(metadata)
                fingerprint = key.fingerprint
            else:
                data, hash_type, fingerprint = dsse_envelope(key, metadata), 1, ""
            old = [s.id for s in _signatures_of(img, group) if _is_own(img, s, key)]
            pending.append((group, [d.id for d in objects], data, hash_type, fingerprint, old))
    done = []
    for group, ids, data, hash_type, fingerprint, old in pending:
        extra = SIGNATURE_EXTRA.pack(hash_type, bytes.fromhex(fingerprint))
        obj = ObjectInput(
            DataType.SIGNATURE,
            data=data,
            group_id=0,
            linked_id=group,
            linked_group=True,
            extra=extra,
        )
        new_id = add_object(path, obj, replace=old)
        done.append(Signed(group, tuple(ids), new_id, tuple(old)))
    return done


# --- verifying --------------------------------------------------------------------------


@record
class Signer:
    """Who made one verified signature."""

    signature_id: int
    format: str  # "openpgp", "dsse", "legacy-openpgp"
    fingerprint: str  # OpenPGP: the primary key's; DSSE: see `_pem_fingerprint`
    user_id: str = ""  # OpenPGP: the certificate's first user ID
    key_file: str = ""  # DSSE: the --pem-key that verified it

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@record
class GroupResult:
    group_id: int
    object_ids: tuple[int, ...]
    signers: tuple[Signer, ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "group_id": self.group_id,
            "object_ids": list(self.object_ids),
            "signers": [s.to_dict() for s in self.signers],
        }


@record
class TrustedKeys:
    keyring: Optional[Keyring] = None
    pem_keys: tuple[PemKey, ...] = ()


class _Check:
    """Verification of one signature object against the group it is linked to."""

    def __init__(self, img: SifImage, digests: _Digests, sig: Descriptor, keys: TrustedKeys):
        self.img = img
        self.digests = digests
        self.sig = sig
        self.keys = keys
        self.where = shown(img.path)
        self.what = f"signature object {sig.id} (object group {sig.linked_id})"

    def fail(self, reason: str, cause: str, fix: str) -> VerifyError:
        return VerifyError(reason, f"{self.where}: {cause}; {fix}")

    def malformed(self, detail: str) -> VerifyError:
        return self.fail(
            MALFORMED,
            f"{self.what} is malformed ({detail})",
            f"delete it (`siftool del {self.sig.id} IMG`) and sign the image again",
        )

    def read(self) -> bytes:
        if self.sig.size > _MAX_SIGNATURE:
            raise self.malformed(f"{self.sig.size} bytes, more than any signature")
        return self.img.read(self.sig)

    def hash_type(self) -> str:
        code = SIGNATURE_EXTRA.unpack_from(self.sig.extra)[0]
        if code not in SIF_HASHES:
            raise self.malformed(f"unknown hash type {code} in its descriptor")
        return SIF_HASHES[code]

    def open_envelope(self, data: bytes, legacy_ok: bool) -> tuple[bytes, Signer]:
        """(signed payload, signer), or VerifyError."""
        if data.startswith(_CLEARSIGN_HEAD):
            return self._open_pgp(data, legacy_ok)
        try:
            parsed = _parse_dsse(data)
        except ValueError as err:
            raise self.malformed(str(err)) from None
        if parsed is None:
            raise self.malformed("neither an OpenPGP clear-signed message nor a DSSE envelope")
        return self._open_dsse(*parsed)

    def _open_dsse(self, payload: bytes, sigs: list[bytes]) -> tuple[bytes, Signer]:
        if not self.keys.pem_keys:
            raise self.fail(
                UNKNOWN_KEY,
                f"{self.what} is a DSSE signature and no --pem-key was given",
                "pass the signer's public key with --pem-key PUB.pem",
            )
        message = dsse_pae(METADATA_MEDIA_TYPE, payload)
        for key in self.keys.pem_keys:
            if any(key.verifies(s, message) for s in sigs):
                return payload, Signer(self.sig.id, "dsse", key.fingerprint, key_file=key.path)
        raise self.fail(
            BAD_SIGNATURE,
            f"{self.what} does not verify with any --pem-key given "
            "(another key made it, or the envelope was altered)",
            "pass the signer's public key, or get the image again from its signer",
        )

    def _open_pgp(self, data: bytes, legacy_ok: bool) -> tuple[bytes, Signer]:
        import pysequoia

        legacy = _clear_text(data).startswith(_LEGACY_PREFIX)
        if legacy and not legacy_ok:
            raise self.fail(
                LEGACY,
                f"{self.what} is a legacy (pre-Apptainer 3.6) SIFHASH signature, which "
                "does not protect the header or descriptors",
                "sign the image again, or pass --legacy-insecure to accept it",
            )
        keyring = self.keys.keyring
        issuer = _pgp_issuer(data)
        cert = keyring.cert_for(issuer) if keyring and issuer else None
        asked: list[str] = []

        def store(ids: list[str]) -> list[Any]:
            asked.extend(i.lower() for i in ids)
            return [cert] if cert is not None else list(keyring.certs if keyring else ())

        try:
            result = pysequoia.verify(bytes=data, store=store)
        except Exception:
            known = cert is not None or (
                keyring is not None and any(keyring.cert_for(i) is not None for i in asked)
            )
            if not known:
                who = (issuer or (asked[0] if asked else "")).upper() or "(no issuer)"
                given = "not in the --keyring given" if keyring else "unknown (no --keyring given)"
                raise self.fail(
                    UNKNOWN_KEY,
                    f"{self.what} was made by OpenPGP key {who}, which is {given}",
                    "pass the signer's public key with --keyring KEYS.asc if you trust it",
                ) from None
            raise self.fail(
                BAD_SIGNATURE,
                f"{self.what} by OpenPGP key {(issuer or asked[0]).upper()} does not verify "
                "(the signed metadata or the signature was altered)",
                "get the image again from its signer, or sign it again",
            ) from None
        fingerprint = str(result.valid_sigs[0].certificate).lower()
        recorded = _fingerprint_of(self.sig)
        if recorded != fingerprint:
            raise self.malformed(
                f"its descriptor names signer {recorded.upper() or '(none)'} but "
                f"{fingerprint.upper()} made it"
            )
        signer = keyring.cert_for(fingerprint) if keyring else None
        uids = [str(u) for u in signer.user_ids] if signer is not None else []
        payload: bytes = result.bytes or b""
        fmt = "legacy-openpgp" if legacy else "openpgp"
        return payload, Signer(self.sig.id, fmt, fingerprint, uids[0] if uids else "")

    def check_metadata(self, payload: bytes, objects: Sequence[Descriptor], subset: bool) -> None:
        """Header, descriptor and data digests of the signed `objects` (Apptainer's
        imageMetadata.matches); the signed set must equal the group unless `subset`."""
        try:
            doc = json.loads(payload)
            if doc.get("version") != 1:
                raise ValueError(f"metadata version {doc.get('version')!r}, not 1")
            signed_header = _parse_digest(doc["header"]["digest"])
            entries = doc["objects"]
            if not isinstance(entries, list):
                raise ValueError("objects is not a list")
            lowest = min(d.id for d in self.img.descriptors if d.group_id == self.sig.linked_id)
            signed = {
                lowest + int(e["relativeId"]): (
                    _parse_digest(e["descriptorDigest"]),
                    _parse_digest(e["objectDigest"]),
                )
                for e in entries
            }
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise self.malformed(f"its signed metadata is not Apptainer's: {err}") from None
        group = {d.id for d in group_objects(self.img, self.sig.linked_id)}
        if set(signed) - group or (not subset and group - set(signed)):
            raise self.fail(
                DIGEST_MISMATCH,
                f"{self.what} covers objects {_ids(signed)} but the group holds {_ids(group)}",
                "the signature was moved or objects were added or removed; "
                "get the image again from its signer",
            )
        alg, value = signed_header
        if header_digest(self.img, alg) != f"{alg}:{value}":
            raise self._mismatch("the header (launch script, magic, version or image ID) differs")
        for desc in objects:
            if desc.id not in signed:
                raise self._mismatch(f"object {desc.id} is not covered by it")
            (dalg, dvalue), (oalg, ovalue) = signed[desc.id]
            if descriptor_digest(self.img, desc, dalg) != f"{dalg}:{dvalue}":
                raise self._mismatch(f"the descriptor of object {desc.id} differs")
            if self.digests.data(desc, oalg) != f"{oalg}:{ovalue}":
                raise self._mismatch(f"the data of object {desc.id} differs")

    def check_legacy(self, payload: bytes, objects: Sequence[Descriptor]) -> None:
        """Digest of the objects' data, concatenated (`newLegacyDigest`)."""
        text = payload[len(_LEGACY_PREFIX) :].rstrip(b"\n")
        try:
            want = bytes.fromhex(text.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            raise self.malformed("its SIFHASH is not hex") from None
        h = hashlib.new(self.hash_type())
        for desc in objects:
            for chunk in self.img.iter_object(desc):
                h.update(chunk)
        if h.digest() != want:
            ids = ", ".join(str(d.id) for d in objects)
            raise self._mismatch(f"the data of objects {ids} differs")

    def _mismatch(self, detail: str) -> VerifyError:
        return self.fail(
            DIGEST_MISMATCH,
            f"{detail} from what {self.what} signed",
            "the image was changed after signing; get it again from its signer",
        )


def _ids(ids: Iterable[int]) -> str:
    return ", ".join(str(i) for i in sorted(ids)) or "none"


def _parse_digest(text: object) -> tuple[str, str]:
    if not isinstance(text, str) or ":" not in text:
        raise ValueError(f"digest {text!r} is not ALG:HEX")
    alg, value = text.split(":", 1)
    if alg not in _METADATA_ALGS or not re.fullmatch(r"[0-9a-f]+", value):
        raise ValueError(f"digest {text[:80]!r} is not ALG:HEX")
    return alg, value


def verify_image(
    path: PathLike,
    keys: TrustedKeys,
    *,
    fingerprints: Sequence[str] = (),
    legacy_ok: bool = False,
    group_id: Optional[int] = None,
    object_id: Optional[int] = None,
) -> list[GroupResult]:
    """`verify_sif` of the image at `path`."""
    with SifImage.open(path) as img:
        return verify_sif(
            img,
            keys,
            fingerprints=fingerprints,
            legacy_ok=legacy_ok,
            group_id=group_id,
            object_id=object_id,
        )


def verify_sif(
    img: SifImage,
    keys: TrustedKeys,
    *,
    fingerprints: Sequence[str] = (),
    legacy_ok: bool = False,
    group_id: Optional[int] = None,
    object_id: Optional[int] = None,
) -> list[GroupResult]:
    """Verify every signature of the selected groups (default: all) as Apptainer does, and
    that each group has one; with `fingerprints`, every signer must be among them.
    VerifyError (one line, a reason) on the first failure. Every byte checked is read
    through `img` (the launch check can verify the very descriptor it then mounts)."""
    listed = {f.lower().replace(" ", "") for f in fingerprints}
    where = shown(img.path)
    digests = _Digests(img)
    selected = _selection(img, group_id, object_id)
    # Every signature first, then unsigned groups: a signature moved to another group
    # is reported as such, not as the group it left being unsigned.
    signed: dict[int, list[Signer]] = {}
    for group, objects in selected:
        for sig in _signatures_of(img, group):
            check = _Check(img, digests, sig, keys)
            payload, signer = check.open_envelope(check.read(), legacy_ok)
            if signer.format == "legacy-openpgp":
                check.check_legacy(payload, objects)
            else:
                check.check_metadata(payload, objects, subset=object_id is not None)
            if listed and signer.fingerprint not in listed:
                raise VerifyError(
                    FINGERPRINT_NOT_LISTED,
                    f"{where}: object group {group} is signed by {signer.fingerprint.upper()}"
                    f" (signature object {sig.id}), which is not one of the fingerprints required; "
                    "add that fingerprint if you trust its key",
                )
            signed.setdefault(group, []).append(signer)
    results = []
    for group, objects in selected:
        if group not in signed:
            raise VerifyError(
                UNSIGNED,
                f"{where}: object group {group} is not signed; "
                "sign it with `rankwire sign`, or use an image its builder signed",
            )
        results.append(GroupResult(group, tuple(d.id for d in objects), tuple(signed[group])))
    return results
