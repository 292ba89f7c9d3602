"""`rankwire sign` and `rankwire verify`: Apptainer-compatible SIF signatures (`sif_sign`)."""

from __future__ import annotations

import json
from typing import Optional

import click

from rankwire.errors import UserError, shown


def _one_selection(group_id: Optional[int], sif_id: Optional[int]) -> None:
    if group_id is not None and sif_id is not None:
        raise UserError("--group-id and --sif-id select differently; give one of them")
    for name, value in (("--group-id", group_id), ("--sif-id", sif_id)):
        if value is not None and value <= 0:
            raise UserError(f"{name} {value}: IDs start at 1; see `rankwire sif list IMG`")


_GROUP_HELP = "Only this object group (default: every group)."
_SIF_HELP = "Only this object (its group's signature covers just it)."


@click.command(name="sign")
@click.argument("image")
@click.option("--key", "pgp_key", metavar="SECRET.asc", help="OpenPGP secret key (default kind).")
@click.option("--pem-key", metavar="KEY.pem", help="PEM private key: DSSE signature.")
@click.option("--group-id", type=int, metavar="N", help=_GROUP_HELP)
@click.option("--sif-id", type=int, metavar="N", help=_SIF_HELP)
def sign_cmd(
    image: str,
    pgp_key: Optional[str],
    pem_key: Optional[str],
    group_id: Optional[int],
    sif_id: Optional[int],
) -> None:
    """Sign IMAGE as `apptainer sign` does, replacing this key's older signatures.

    With --key, an OpenPGP clear-signed message (ed25519, RSA, ... secret key without a
    passphrase, e.g. `gpg --armor --export-secret-keys`); with --pem-key, a DSSE
    envelope (ed25519, RSA or ECDSA PEM private key).
    """
    from rankwire.runtime import sif_sign

    if (pgp_key is None) == (pem_key is None):
        raise UserError(
            "sign needs exactly one key: --key SECRET.asc (OpenPGP) or --pem-key KEY.pem (DSSE)"
        )
    _one_selection(group_id, sif_id)
    key: sif_sign.Key = (
        sif_sign.load_pgp_signer(pgp_key) if pgp_key else sif_sign.load_pem_private(pem_key or "")
    )
    for done in sif_sign.sign_image(image, key, group_id=group_id, object_id=sif_id):
        objects = ", ".join(map(str, done.object_ids))
        replaced = (
            f", replacing signature object {', '.join(map(str, done.replaced))}"
            if done.replaced
            else ""
        )
        click.echo(
            f"rankwire: signed object group {done.group_id} (objects {objects}) of "
            f"{shown(image)} as {key.fingerprint.upper()}: signature object "
            f"{done.signature_id}{replaced}"
        )


@click.command(name="verify")
@click.argument("image")
@click.option(
    "--keyring",
    "keyrings",
    multiple=True,
    metavar="KEYS.asc",
    help="OpenPGP public keys to trust (repeatable).",
)
@click.option(
    "--pem-key",
    "pem_keys",
    multiple=True,
    metavar="PUB.pem",
    help="PEM public key to trust for DSSE signatures (repeatable).",
)
@click.option(
    "--fingerprint",
    "fingerprints",
    multiple=True,
    metavar="HEX",
    help="Accept only signers with these fingerprints (repeatable).",
)
@click.option(
    "--legacy-insecure",
    is_flag=True,
    help="Accept pre-3.6 SIFHASH signatures (they leave metadata unprotected).",
)
@click.option("--group-id", type=int, metavar="N", help=_GROUP_HELP)
@click.option("--sif-id", type=int, metavar="N", help="Only this object.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify_cmd(
    image: str,
    keyrings: tuple[str, ...],
    pem_keys: tuple[str, ...],
    fingerprints: tuple[str, ...],
    legacy_insecure: bool,
    group_id: Optional[int],
    sif_id: Optional[int],
    as_json: bool,
) -> None:
    """Check every signature of IMAGE as `apptainer verify` does.

    Every object group must be signed; every signature must verify with a given key and
    match the header, descriptors and data. With --fingerprint, every signer must be one
    listed. A PEM key's fingerprint is the SHA-256 of its SSH public key blob, in
    hex (`ssh-keygen -l` shows it in base64). Exit 1 when the
    image is not verified (one line: the reason), 2 on a usage error.
    """
    from rankwire.runtime import sif_sign

    if not keyrings and not pem_keys:
        raise UserError(
            "verify needs the keys to trust: --keyring KEYS.asc (OpenPGP) and/or "
            "--pem-key PUB.pem (DSSE)"
        )
    _one_selection(group_id, sif_id)
    keys = sif_sign.TrustedKeys(
        sif_sign.load_keyrings(keyrings) if keyrings else None,
        tuple(sif_sign.load_pem_public(p) for p in pem_keys),
    )
    try:
        results = sif_sign.verify_image(
            image,
            keys,
            fingerprints=fingerprints,
            legacy_ok=legacy_insecure,
            group_id=group_id,
            object_id=sif_id,
        )
    except sif_sign.VerifyError as err:
        if as_json:
            doc = {"image": image, "verified": False, "reason": err.reason, "error": str(err)}
            click.echo(json.dumps(doc, indent=2))
        raise
    if as_json:
        doc = {"image": image, "verified": True, "groups": [r.to_dict() for r in results]}
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"rankwire: {shown(image)}: verified")
    for r in results:
        for s in r.signers:
            name = s.user_id or s.key_file
            who = f" ({shown(name)})" if name else ""
            click.echo(
                f"  object group {r.group_id} (objects {', '.join(map(str, r.object_ids))}): "
                f"signed by {s.fingerprint.upper()}{who}, {s.format}, "
                f"signature object {s.signature_id}"
            )
