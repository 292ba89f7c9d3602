"""Which signers an image must have, and the check that holds a launch to it.

One requirement, two sources: `--verify FPR,…` / `RANKWIRE_VERIFY` with `--keyring` /
`RANKWIRE_KEYRING` on exec, shell, instance start and the launcher (`requirement`, pure),
and the plugin's site policy (`require_signed_by`, `keyring`; `spank/policy.py`). Both
are checked by `check`, on an open descriptor of the image: the plugin verifies the very
descriptor it then mounts.

Verifying reads the whole image, so a success is remembered in a verification cache (the
user's `<cache dir>/verified`; the plugin's is root's `/run/rankwire/verified`): one
file per (image identity, keys, fingerprints). The identity is the file's (device,
inode, size, mtime, ctime) as `fstat` gives them. What the cache trusts: that a file
whose identity is unchanged holds the same bytes. Any write through the kernel changes
ctime, which no user can set back; a verification is not recorded when the file changed
while it was read, nor when its ctime is less than `_SETTLE_NS` old (a write in the same
clock tick could keep it). Network file systems report the server's times, but a client
may cache them for a while (NFS `acregmax`), so a write from another node can go
unnoticed for that long.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import stat
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from rankwire.errors import UserError, shown
from rankwire.record import record

VERIFY_VAR = "RANKWIRE_VERIFY"
KEYRING_VAR = "RANKWIRE_KEYRING"  # colon-separated keyring files
SITE_KEYRING = "/etc/rankwire/keys.asc"
_SETTLE_NS = 2_000_000_000
_FUSE_TYPES = ("fuse", "fuseblk")


@record
class Requirement:
    """Every object group must be signed, and only by keys with these fingerprints
    (lowercase hex), checked with the keys in these files (OpenPGP or PEM public keys).
    `keyrings_given`: False when they are the defaults, of which only those that exist
    count."""

    fingerprints: tuple[str, ...]
    keyrings: tuple[str, ...]
    keyrings_given: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_fingerprints(text: str, named: str) -> tuple[str, ...]:
    """`FPR,FPR…` (spaces inside a fingerprint allowed, as gpg prints them) → lowercase
    hex: 40 digits (OpenPGP v4) or 64 (OpenPGP v6, and PEM keys: SHA-256 of the key)."""
    out = []
    for item in text.split(","):
        fpr = re.sub(r"\s+", "", item).lower()
        if not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", fpr):
            raise UserError(
                f"{named} {item.strip() or repr(item)}: not a key fingerprint (40 or 64 hex "
                "digits); `rankwire verify --keyring KEYS.asc IMG` shows an image's signers"
            )
        out.append(fpr)
    return tuple(dict.fromkeys(out))


def requirement(
    verify: Optional[str],
    keyrings: Sequence[str],
    environ: Mapping[str, str],
    config_home: str,
) -> Optional[Requirement]:
    """The launch's requirement from --verify/--keyring and the environment (pure).
    Default keyrings: `$XDG_CONFIG_HOME/rankwire/keys.asc` and the site's
    `/etc/rankwire/keys.asc`."""
    named = "--verify"
    if not verify and environ.get(VERIFY_VAR):
        verify, named = environ[VERIFY_VAR], VERIFY_VAR
    given = tuple(keyrings) or tuple(p for p in environ.get(KEYRING_VAR, "").split(":") if p)
    if not verify:
        if keyrings:
            raise UserError("--keyring applies with --verify FPR,…: add --verify or drop it")
        return None
    if given:
        return Requirement(parse_fingerprints(verify, named), given)
    default = (f"{config_home}/rankwire/keys.asc", SITE_KEYRING)
    return Requirement(parse_fingerprints(verify, named), default, keyrings_given=False)


@record
class Verified:
    signers: tuple[str, ...]  # uppercase fingerprints, in group order
    cached: bool


def _key_files(req: Requirement) -> list[tuple[str, bytes]]:
    files = []
    for path in req.keyrings:
        try:
            files.append((path, Path(path).read_bytes()))
        except FileNotFoundError:
            if req.keyrings_given:
                raise UserError(
                    f"keyring {shown(path)} does not exist: check the path, or export the "
                    "signers' keys there (`gpg --armor --export FPR > keys.asc`)"
                ) from None
        except OSError as err:
            raise UserError(f"cannot read keyring {shown(path)}: {err.strerror}") from None
    if not files:
        raise UserError(
            f"no keyring to verify the image with ({' and '.join(req.keyrings)} do not "
            "exist): give --keyring KEYS.asc, or export the signers' keys to the first"
        )
    return files


def _is_pem(data: bytes) -> bool:
    return data.lstrip().startswith(b"-----BEGIN ") and b"PGP" not in data[:64]


def _trusted_keys(files: Sequence[tuple[str, bytes]]) -> Any:
    from rankwire.runtime import sif_sign

    pgp = [(p, d) for p, d in files if not _is_pem(d)]
    return sif_sign.TrustedKeys(
        sif_sign.keyring_of(pgp) if pgp else None,
        tuple(sif_sign.pem_public_of(p, d) for p, d in files if _is_pem(d)),
    )


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def served_by_user(fd: int) -> Optional[str]:
    """The file system type when the file on `fd` lies on a FUSE mount that a user (not
    root) serves: its server can return other bytes at each read, so a check of them
    says nothing of what is later mounted. None otherwise."""
    mnt_id = ""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                mnt_id = line.split()[1]
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[0] != mnt_id:
                continue
            rest = fields[fields.index("-") + 1 :]
            fstype, options = rest[0].split(".")[0], rest[2] if len(rest) > 2 else ""
            if fstype in _FUSE_TYPES and "user_id=0," not in options + ",":
                return rest[0]
    return None


def check(fd: int, name: str, req: Requirement, cache: Optional[Path]) -> Verified:
    """Verify the image open on `fd` (`name` in messages) against `req`, or find that it
    was (in `cache`, a directory only its owner writes). VerifyError (a UserError) names
    the reason."""
    files = _key_files(req)
    keys_digest = hashlib.sha256()
    for path, data in files:
        keys_digest.update(f"{len(path)}:{path}:{len(data)}:".encode() + data)
    before = os.fstat(fd)
    entry_key = hashlib.sha256(
        json.dumps([_identity(before), keys_digest.hexdigest(), sorted(req.fingerprints)]).encode()
    ).hexdigest()
    entry = cache / entry_key if cache is not None and _private_dir(cache) else None
    found = _cached(entry)
    if found is not None:
        return Verified(found, cached=True)
    with _locked(entry):
        found = _cached(entry)  # another task of the node verified it meanwhile
        if found is not None:
            return Verified(found, cached=True)
        started = time.time_ns()
        signers = _verify(fd, name, req, files)
        after = os.fstat(fd)
        settled = after.st_ctime_ns < started - _SETTLE_NS
        if entry is not None and _identity(after) == _identity(before) and settled:
            _record(entry, name, signers)
    return Verified(signers, cached=False)


def _verify(
    fd: int, name: str, req: Requirement, files: Sequence[tuple[str, bytes]]
) -> tuple[str, ...]:
    from rankwire.runtime import sif_sign
    from rankwire.runtime.sif_read import SifImage

    keys = _trusted_keys(files)
    with SifImage.open_fd(fd, name) as img:
        results = sif_sign.verify_sif(img, keys, fingerprints=req.fingerprints)
    return tuple(dict.fromkeys(s.fingerprint.upper() for r in results for s in r.signers))


def _cached(entry: Optional[Path]) -> Optional[tuple[str, ...]]:
    if entry is None:
        return None
    try:
        with open(entry, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                return None
            doc = json.loads(f.read())
        return tuple(str(s) for s in doc["signers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def _locked(entry: Optional[Path]) -> Any:
    """The tasks of one node that start together verify once: the others wait here."""
    fd = -1
    if entry is not None:
        with contextlib.suppress(OSError):  # a full or read-only disk: verify unlocked
            fd = os.open(
                f"{entry}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
            )
    if fd < 0:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{entry}.lock")
        os.close(fd)


def _private_dir(path: Path) -> bool:
    """The cache dir, made if need be, is usable only when it is ours alone (0700, no
    symlink); otherwise (another user's, unwritable, on a read-only file system) the
    image is verified without a cache."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


def _record(entry: Path, name: str, signers: tuple[str, ...]) -> None:
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}")
    doc = {"image": name, "signers": list(signers), "verified_at": int(time.time())}
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.rename(tmp, entry)
    except OSError:  # a full disk costs the next launch a verification, nothing else
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def verify_path(
    path: str, verify: Optional[str], keyrings: Sequence[str], what: str = "image"
) -> None:
    """--verify (or RANKWIRE_VERIFY) for the SIF at `path`: refuse it unless signed as
    required, using the user's verification cache (`cache_dir/verified`). Nothing is
    required (no fingerprints anywhere): nothing is read. `what` names it in messages."""
    from rankwire.runtime.plan import cache_dir

    home = os.environ.get("HOME") or os.path.expanduser("~")
    config_home = os.environ.get("XDG_CONFIG_HOME") or f"{home}/.config"
    req = requirement(verify, keyrings, os.environ, config_home)
    if req is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise UserError(
            f"cannot open {what} {shown(path)}: {err.strerror}; check the path"
        ) from None
    try:
        check(fd, path, req, Path(cache_dir(os.environ, home)) / "verified")
    finally:
        os.close(fd)
