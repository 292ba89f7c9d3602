"""Site policy for containers started by the SPANK plugin.

The admin's file (plugstack.conf `policy=PATH`, TOML) says which images and bind sources
users may use through the plugin and which options they may pick. It is read by the
helper's `check` phase, which runs as root in slurmstepd: the file must be root-owned and
not writable by anyone else, or nothing runs (a policy that a user could edit is none).

    image_dirs = ["/apps/images"]         # images must lie below one of these (real path)
    mount_sources = ["/home", "/scratch"]  # --container-mounts sources likewise
    allow_fabric_choice = true             # --container-fabric other than auto
    allow_remap_root = true                # --container-remap-root
    allow_writable = true                  # --container-writable
    enforce = false                        # root builds the container (see README)
    allowed_registries = ["registry.example.org", "10.0.0.5:5000"]  # docker://, oras://
    require_signed_by = ["0123…CDEF"]       # only images signed by these keys run
    keyring = "/etc/rankwire/keys.asc"      # their public keys (OpenPGP, or a PEM key)

A missing list means "anywhere the job user can read"; a missing flag means allowed.
`allowed_registries` fails closed: a policy without it lets no remote image run (no
policy file at all: any registry). Entries are host[:port] exactly as the image
reference names it (Docker Hub is docker.io), compared without regard to case; they are
checked before anything is fetched. A remote image is pulled by the job user into their
cache, and that pulled file, not one of `image_dirs`, is what runs.
`mount_sources` governs every host path the plugin binds on the user's behalf: the
--container-mounts sources, the home directory (from the passwd database) and the working
directory; Slurm's own PMIx directories (named by slurmstepd, not by the job) are not
user choices and are always bound. Without `enforce`, the container is built by the job
user's own process: the policy governs what the plugin does, and is advisory (a user can
still change a container they own). With `enforce`, root builds it.
`require_signed_by` (key fingerprints, 40 or 64 hex digits) runs only images whose every
object group is signed, and only by those keys, checked as Apptainer's verify does with
the keys in `keyring` (default /etc/rankwire/keys.asc; root-owned like this file). The
check phase verifies, as root, the descriptor that is then mounted (a pulled image after
its pull), or finds it in root's verification cache (`runtime/trust.py` says what that
trusts); images on a FUSE mount a user serves are refused, as their bytes may change.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import sys
from collections.abc import Sequence
from typing import Any, Optional

from rankwire.errors import UserError
from rankwire.record import record

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9/3.10
    import tomli as tomllib


class PolicyError(UserError):
    """A refusal by site policy (or a broken policy file): `rankwire: policy: <reason>`."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"policy: {reason}")


@record
class Policy:
    source: Optional[str] = None  # the file it came from; None: no policy configured
    image_dirs: Optional[tuple[str, ...]] = None
    mount_sources: Optional[tuple[str, ...]] = None
    allow_fabric_choice: bool = True
    allow_remap_root: bool = True
    allow_writable: bool = True
    enforce: bool = False
    allowed_registries: Optional[tuple[str, ...]] = None  # host[:port], lowercase
    require_signed_by: Optional[tuple[str, ...]] = None  # key fingerprints, lowercase hex
    keyring: Optional[str] = None  # their keys; set whenever require_signed_by is

    def check_remote(self, registry: str, image: str) -> None:
        """May the step pull `image` (docker:// or oras://) from `registry`? Before any
        network access; fail closed once there is a policy file."""
        if self.source is None:
            return
        if self.enforce:
            raise PolicyError(
                f"remote image {image} cannot run under this site's enforced policy (a "
                "pulled image is its user's file, which users could change): ask your admin "
                "to place it in an image directory"
            )
        if self.allowed_registries is None:
            raise PolicyError(
                f"registry {registry} of {image} is not allowed: {self.source} has no "
                "allowed_registries, so no remote image runs here; use a local SIF or ask "
                "your admin"
            )
        if registry.lower() not in self.allowed_registries:
            raise PolicyError(
                f"registry {registry} of {image} is not in allowed_registries "
                f"({', '.join(self.allowed_registries) or 'none'}) of {self.source}; use an "
                "image from one of them or ask your admin"
            )

    def check_image(self, real_path: str) -> None:
        if self.image_dirs is not None and not _below_any(real_path, self.image_dirs):
            raise PolicyError(
                f"image {real_path} is outside the allowed image directories "
                f"({', '.join(self.image_dirs)}); copy it there or ask your admin"
            )

    def check_mount(self, real_source: str) -> None:
        if self.mount_sources is not None and not _below_any(real_source, self.mount_sources):
            raise PolicyError(
                f"mount source {real_source} is outside the allowed mount sources "
                f"({', '.join(self.mount_sources)})"
            )

    def check_kept(self, *, name: Optional[str], save: Optional[str]) -> None:
        """--container-name and --container-save keep a container's changes: a writable
        root of the job user's own (a user namespace), which `enforce` does not give."""
        for given, option in ((name, "--container-name"), (save, "--container-save")):
            if given is None:
                continue
            if self.enforce:
                raise PolicyError(
                    f"{option} is not available here: this site enforces its containers "
                    "(root builds them for one step, read-only); drop it"
                )
            if not self.allow_writable:
                raise PolicyError(
                    f"{option} keeps the container's changes, and this site allows no "
                    "writable containers; drop it"
                )

    def check_options(
        self,
        *,
        fabric: str,
        remap_root: bool,
        writable: bool,
        host_mpi: str = "none",
        site_host_mpi: str = "none",
    ) -> None:
        if fabric != "auto" and not self.allow_fabric_choice:
            raise PolicyError(
                f"--container-fabric={fabric} is not allowed here; drop it (auto is used)"
            )
        if remap_root and not self.allow_remap_root:
            raise PolicyError("--container-remap-root is not allowed here; drop it")
        if writable and not self.allow_writable:
            raise PolicyError("--container-writable is not allowed here; drop it")
        if self.enforce and host_mpi not in ("none", site_host_mpi):
            raise PolicyError(
                f"--container-host-mpi={host_mpi}: under this site's enforced policy root "
                "binds only the host MPI the site configured (plugstack host_mpi="
                f"{site_host_mpi}); drop it"
            )
        if remap_root and self.enforce:
            raise PolicyError(
                "--container-remap-root needs a user namespace, which this site's enforced "
                "policy does not give containers; drop it"
            )


def _below_any(path: str, dirs: Sequence[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


def _trusted(path: str) -> None:
    """The file and its directory: root-owned, not group/world-writable, no symlink."""
    for p in (path, os.path.dirname(path)):
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            raise PolicyError(
                f"{p} must be owned by root and not writable by group or others "
                "(and not a symlink); fix its mode, or no container runs"
            )


def _dirs(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise PolicyError(f"'{key}' must be a list of absolute paths")
    out = []
    for d in value:
        if not os.path.isabs(d):
            raise PolicyError(f"'{key}': {d} is not an absolute path")
        if "\0" in d:
            raise PolicyError(f"'{key}': {d!r} holds a NUL character")
        out.append(os.path.realpath(d))
    return tuple(out)


def _registries(value: Any) -> tuple[str, ...]:
    from rankwire.runtime.reference import parse_reference

    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError("'allowed_registries' must be a list of host[:port] names")
    for name in value:
        try:
            ok = parse_reference(f"oras://{name}/x").registry == name
        except UserError:
            ok = False
        if not ok:
            raise PolicyError(
                f"'allowed_registries': {name!r} is not a host[:port] (no scheme, no path)"
            )
    return tuple(name.lower() for name in value)


def _signers(value: Any) -> tuple[str, ...]:
    from rankwire.runtime.trust import parse_fingerprints

    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise PolicyError("'require_signed_by' must be a non-empty list of key fingerprints")
    try:
        fprs = [f for v in value for f in parse_fingerprints(v, "'require_signed_by'")]
    except UserError as err:
        raise PolicyError(str(err)) from None
    return tuple(dict.fromkeys(fprs))


def _keyring(value: Any) -> str:
    """An absolute path to a root-owned file (OpenPGP keyring or PEM public key)."""
    if not isinstance(value, str) or not os.path.isabs(value) or "\0" in value:
        raise PolicyError(
            "'keyring' must be the absolute path of an OpenPGP keyring or a PEM public key"
        )
    try:
        _trusted(value)
    except FileNotFoundError:
        raise PolicyError(
            f"keyring {value} does not exist: export the keys of require_signed_by there "
            f"(`gpg --armor --export FPR > {value}`), or no container runs"
        ) from None
    return value


def load_policy(path: Optional[str]) -> Policy:
    """The policy in `path` (None: no policy configured, everything the user may do)."""
    if path is None:
        return Policy()
    try:
        _trusted(path)
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise PolicyError(
            f"cannot read {path}: no such file; create it or fix policy= in plugstack.conf"
        ) from None
    except OSError as err:
        raise PolicyError(f"cannot read {path}: {err.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise PolicyError(f"{path} is not valid TOML: {err}") from None
    known = {f.name for f in dataclasses.fields(Policy)} - {"source"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PolicyError(f"{path}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")
    kw: dict[str, Any] = {"source": path}
    for key in ("image_dirs", "mount_sources"):
        if key in data:
            kw[key] = _dirs(key, data[key])
    if "allowed_registries" in data:
        kw["allowed_registries"] = _registries(data["allowed_registries"])
    if "require_signed_by" in data:
        from rankwire.runtime.trust import SITE_KEYRING

        kw["require_signed_by"] = _signers(data["require_signed_by"])
        kw["keyring"] = _keyring(data.get("keyring", SITE_KEYRING))
    elif "keyring" in data:
        raise PolicyError(
            f"{path}: 'keyring' applies with require_signed_by: add that or drop keyring"
        )
    for key in ("allow_fabric_choice", "allow_remap_root", "allow_writable", "enforce"):
        if key in data:
            if not isinstance(data[key], bool):
                raise PolicyError(f"{path}: '{key}' must be true or false")
            kw[key] = data[key]
    return Policy(**kw)
