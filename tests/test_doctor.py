"""`rankwire doctor [IMAGE]`: the pure verdicts (facts in, checks out) and real runs.

Real runs try the host for real (a user namespace with an overlay in it, /dev/fuse,
libpmix, the cache and runtime dirs), as root and as the test user; a user namespace
whose `user.max_user_namespaces` is 0 makes the probe fail for real. Slurm configurations
need no daemons: srun reads `--mpi=list` from the PluginDir of a slurm.conf, so a
PluginDir of links without mpi_pmi2.so (or mpi_pmix*.so) is a pmix-only (pmi2-only) site.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Optional

import pytest

from harness.images import ldd_closure, make_rootfs, make_world_readable
from harness.users import User, rw
from rankwire.errors import UserError
from rankwire.fabric.hostfacts import FabricHostFacts
from rankwire.fabric.plan import EMPTY_IMAGE
from rankwire.runtime.doctor import (
    Check,
    cause_and_fix,
    diagnose,
    failed,
    report_lines,
)
from rankwire.runtime.doctorfacts import DoctorFacts, DoctorImageFacts, MpiLibrary
from rankwire.runtime.doctorhost import (
    DirFacts,
    DoctorHostFacts,
    FuseFacts,
    NamespaceProbe,
    PmixLibFacts,
    SlurmInstall,
    _mpi_plugins,
    _spank_entry,
)
from rankwire.runtime.hostfacts import HostFacts

clean = pytest.mark.usefixtures("nothing_left_behind")

NO_NAME = "(ssh, `whoami` and MPI launchers that look the user up fail)"
ABI_WHERE = "(this matters where it is bound: a node with a fabric adapter, or --fabric PROVIDER)"
BRIDGE_FIX = (
    "run with `rankwire run` / `apptainer-mpirun` (they serve {pmi}), or {rebuild}; "
    "rankwire's PMI bridge needs Slurm's pmi2 or pmix plugin"
)
BRIDGED = "`srun … rankwire exec` bridges them (rankwire's PMI bridge, --pmi-bridge auto)"
MPICH_REBUILD = "rebuild the image's MPI with PMIx (e.g. MPICH `--with-pmi=pmix`)"
OMPI_REBUILD = "ask the admin for Slurm's mpi/pmix plugin"

# -- pure: facts made here, verdicts asserted whole ------------------------------------------
HOST = HostFacts(
    kernel="6.1.0",
    machine="x86_64",
    uid=1001,
    gid=1001,
    max_user_namespaces=15000,
    unprivileged_userns_clone=None,
    dev_fuse_usable=True,
    tools={"unsquashfs": "/usr/bin/unsquashfs", "fuse-overlayfs": "/usr/bin/fuse-overlayfs"},
)
SLURM = SlurmInstall(
    srun="/usr/bin/srun",
    version="slurm-wlm 22.05.8",
    error="",
    mpi_plugins=("pmix", "none", "pmi2", "pmix_v4"),
    conf="/etc/slurm/slurm.conf",
    mpi_default="pmi2",
    plugstack="/etc/slurm/plugstack.conf",
    spank_plugin="",
    spank_listed_in="",
    spank_plugin_exists=None,
    spank_error="",
)
GOOD = DoctorHostFacts(
    host=HOST,
    goarch="amd64",
    namespaces=NamespaceProbe(""),
    apparmor_restrict_userns=None,
    seccomp=0,
    fuse=FuseFacts(0o666, 0, "/usr/bin/squashfuse_ll"),
    libpmix=PmixLibFacts("libpmix.so.2", "OpenPMIx 4.2.2", ""),
    slurm=SLURM,
    cache_dir=DirFacts("/home/u/.cache/rankwire", "", 10 << 30),
    runtime_dir=DirFacts("/tmp/rankwire-1001", "", 1 << 30),
)
MPICH = DoctorImageFacts(
    path="/x/mpich.sif",
    arch="amd64",
    mpi=(MpiLibrary("MPICH", "4.0.2", "/usr/lib/x86_64-linux-gnu/libmpich.so.12"),),
    pmi="pmi1/2",
    passwd_ids=(0, 1001),
    group_ids=(0, 1001),
    fabric_host=FabricHostFacts((), (), None),
    fabric_image=EMPTY_IMAGE,
    fabric_error="",
)
OMPI = dataclasses.replace(
    MPICH,
    mpi=(MpiLibrary("Open MPI", "4.1.4", "/usr/lib/x86_64-linux-gnu/libmpi.so.40"),),
    pmi="pmix",
)


def host(**changes: Any) -> DoctorHostFacts:
    return dataclasses.replace(GOOD, **changes)


def checked(name: str, h: DoctorHostFacts = GOOD, image: Optional[DoctorImageFacts] = None):
    found = [c for c in diagnose(DoctorFacts(h, image)) if c.name == name]
    assert len(found) == 1, name
    return found[0]


def test_a_good_host_and_image_pass_every_check():
    checks = diagnose(DoctorFacts(GOOD, MPICH))
    assert [c.name for c in checks] == [
        "userns",
        "overlay",
        "fuse",
        "libpmix",
        "slurm",
        "spank-plugin",
        "cache-dir",
        "runtime-dir",
        "image-arch",
        "image-mpi",
        "pmi",
        "fabric",
        "fabric-abi",
        "host-mpi",
        "image-users",
    ]
    assert {c.verdict for c in checks} == {"ok"} and not failed(checks)
    assert checked("userns") == Check(
        "userns", "ok", "unshare(CLONE_NEWUSER) works: uid 1001 mapped, mounts allowed"
    )
    assert checked("image-mpi", image=MPICH) == Check(
        "image-mpi",
        "ok",
        "MPICH 4.0.2 (/usr/lib/x86_64-linux-gnu/libmpich.so.12) speaks PMI-1/PMI-2",
    )
    assert checked("fabric-abi", image=MPICH) == Check(
        "fabric-abi", "ok", "the host has no libfabric: nothing would be bound"
    )
    assert checked("host-mpi", image=MPICH) == Check(
        "host-mpi",
        "ok",
        "--host-mpi auto binds nothing: no host MPI found (no mpichversion or ompi_info on PATH)",
    )
    bad_prefix = dataclasses.replace(
        MPICH,
        host_mpi_choice="/opt/x",
        host_mpi_error="--host-mpi /opt/x: no MPI library (…) in /opt/x/lib; give the prefix",
    )
    assert checked("host-mpi", image=bad_prefix) == Check(
        "host-mpi", "warn", "--host-mpi /opt/x: no MPI library (…) in /opt/x/lib", "give the prefix"
    )


@pytest.mark.parametrize(
    "probe, changes, reason, fix",
    [
        (
            NamespaceProbe("unshare", 28, "unshare: No space left on device"),
            {"max_user_namespaces": 0},
            "unshare(CLONE_NEWUSER) failed (ENOSPC): user.max_user_namespaces is 0",
            "ask the admin for `sysctl user.max_user_namespaces=15000`",
        ),
        (
            NamespaceProbe("unshare", 28, "unshare: No space left on device"),
            {},
            "unshare(CLONE_NEWUSER) failed (ENOSPC): the user.max_user_namespaces limit (15000) "
            "is reached",
            "end the processes holding user namespaces, or ask the admin to raise "
            "`user.max_user_namespaces`",
        ),
        (
            NamespaceProbe("unshare", 1, "unshare: Operation not permitted"),
            {"unprivileged_userns_clone": 0},
            "unshare(CLONE_NEWUSER) failed (EPERM): kernel.unprivileged_userns_clone is 0",
            "ask the admin for `sysctl kernel.unprivileged_userns_clone=1`",
        ),
        (
            NamespaceProbe("unshare", 38, "unshare: Function not implemented"),
            {},
            "unshare(CLONE_NEWUSER) failed (ENOSYS): this kernel has no user namespaces",
            "use a kernel built with CONFIG_USER_NS",
        ),
        (
            NamespaceProbe("unshare", 0, "the probe gave no answer within 10 s"),
            {},
            "unshare(CLONE_NEWUSER) failed: the probe gave no answer within 10 s",
            "ask the admin to allow unprivileged user namespaces",
        ),
    ],
)
def test_a_failed_user_namespace_is_explained_by_the_sysctls(probe, changes, reason, fix):
    h = host(namespaces=probe, host=dataclasses.replace(HOST, **changes))
    assert checked("userns", h) == Check("userns", "fail", reason, fix)
    assert checked("overlay", h) == Check(
        "overlay", "fail", "not tried: no user namespace (see userns)"
    )


def test_apparmor_and_seccomp_explain_a_denied_namespace():
    """Ubuntu's AppArmor lets unshare through and denies what follows; a seccomp filter
    (a container's) denies unshare itself. Read only when the probe failed."""
    mount = NamespaceProbe("tmpfs", 13, "mount tmpfs on /tmp: Permission denied")
    assert checked("userns", host(namespaces=mount, apparmor_restrict_userns=1)) == Check(
        "userns",
        "fail",
        "mounting a tmpfs in a new user namespace failed (EACCES): AppArmor restricts "
        "unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns is 1)",
        "ask the admin for `sysctl kernel.apparmor_restrict_unprivileged_userns=0` or an "
        "AppArmor profile with `userns,` for rankwire's python",
    )
    unshare = NamespaceProbe("unshare", 1, "unshare: Operation not permitted")
    assert checked("userns", host(namespaces=unshare, seccomp=2)) == Check(
        "userns",
        "fail",
        "unshare(CLONE_NEWUSER) failed (EPERM): a seccomp filter denies it (this process runs "
        "under one: inside a container?)",
        "run rankwire on the host, or allow unshare and mount in the container's seccomp profile",
    )
    # The sysctls alone say nothing: a namespace that works is ok whatever they read.
    assert checked("userns", host(apparmor_restrict_userns=1, seccomp=2)).verdict == "ok"


def test_an_overlay_that_fails_falls_back_on_fuse_overlayfs_or_fails():
    probe = NamespaceProbe("overlay", 1, "mount overlay on /tmp/merged: Operation not permitted")
    why = (
        "a kernel overlay in a user namespace failed: mount overlay on /tmp/merged: Operation "
        "not permitted"
    )
    assert checked("overlay", host(namespaces=probe)) == Check(
        "overlay",
        "warn",
        f"{why}; fuse-overlayfs is used instead (slower)",
        "a kernel >= 5.11 mounts overlays in user namespaces",
    )
    assert checked("userns", host(namespaces=probe)).verdict == "ok"
    bare = dataclasses.replace(HOST, tools={})
    assert checked("overlay", host(namespaces=probe, host=bare)) == Check(
        "overlay",
        "fail",
        f"{why}, and fuse-overlayfs cannot stand in (not installed, or /dev/fuse unusable)",
        "use a kernel >= 5.11, or install fuse-overlayfs with a usable /dev/fuse",
    )


def test_dev_fuse_mode_0600_says_chmod_or_unsquash():
    h = host(fuse=FuseFacts(0o600, 13, "/usr/bin/squashfuse_ll"))
    assert checked("fuse", h) == Check(
        "fuse",
        "warn",
        "/dev/fuse is mode 0600: uid 1001 cannot open it: images are extracted with unsquashfs "
        "before they start (slower first start, disk in the cache)",
        "ask the admin for `chmod 0666 /dev/fuse`, or run with --unsquash",
    )
    assert checked("fuse", host(fuse=FuseFacts(None, 2, None))).reason.startswith(
        "there is no /dev/fuse (the fuse module is not loaded?): images are extracted"
    )
    nothing = host(fuse=FuseFacts(0o666, 0, None), host=dataclasses.replace(HOST, tools={}))
    assert checked("fuse", nothing) == Check(
        "fuse",
        "fail",
        "squashfuse is not installed, and there is no unsquashfs: no way to open images",
        "apt-get install squashfuse squashfs-tools",
    )


def test_libpmix_missing_is_a_warning_with_its_fix():
    error = (
        "cannot load the PMIx library 'libpmix.so.2' (libpmix.so.2: cannot open shared object "
        "file: No such file or directory): install libpmix2 or set RANKWIRE_LIBPMIX to its path"
    )
    assert checked("libpmix", host(libpmix=PmixLibFacts("libpmix.so.2", "", error))) == Check(
        "libpmix",
        "warn",
        "cannot load the PMIx library 'libpmix.so.2' (libpmix.so.2: cannot open shared object "
        "file: No such file or directory): `rankwire run` cannot serve PMIx (Open MPI images)",
        "install libpmix2 or set RANKWIRE_LIBPMIX to its path",
    )


def test_dirs_not_writable_or_short_of_space():
    h = host(
        cache_dir=DirFacts("/home/u/.cache/rankwire", "Read-only file system", 5 << 30),
        runtime_dir=DirFacts("/tmp/rankwire-1001", "", 3 << 20),
    )
    assert checked("cache-dir", h) == Check(
        "cache-dir",
        "fail",
        "/home/u/.cache/rankwire is not writable: Read-only file system",
        "set RANKWIRE_CACHEDIR to a writable directory with room (e.g. node-local /tmp)",
    )
    assert checked("runtime-dir", h) == Check(
        "runtime-dir",
        "warn",
        "/tmp/rankwire-1001: writable, only 3.0 MiB free",
        "set XDG_RUNTIME_DIR or TMPDIR to a writable directory",
    )
    assert checked("cache-dir") == Check(
        "cache-dir", "ok", "/home/u/.cache/rankwire: writable, 10.0 GiB free"
    )


def _slurm(plugins: tuple[str, ...], default: str, **changes: Any) -> DoctorHostFacts:
    return host(
        slurm=dataclasses.replace(SLURM, mpi_plugins=plugins, mpi_default=default, **changes)
    )


@pytest.mark.parametrize(
    "image, plugins, default, verdict, reason, fix",
    [
        (
            MPICH,
            ("pmix", "none", "pmix_v4"),
            "pmix",
            "ok",
            "srun's default --mpi=pmix serves PMIx and the image's MPICH 4.0.2 speaks "
            f"PMI-1/PMI-2: {BRIDGED}",
            "",
        ),
        (
            MPICH,
            ("pmix", "none", "pmix_v4"),
            "none",
            "warn",
            "srun's default --mpi=none does not serve the image's PMI-1/PMI-2: plain `srun` "
            "starts N singletons",
            "run `srun --mpi=pmix … rankwire exec …` (rankwire's PMI bridge, --pmi-bridge auto)",
        ),
        (
            MPICH,
            ("none", "cray_shasta"),
            "none",
            "warn",
            "Slurm offers only no PMI plugin and the image's MPICH 4.0.2 speaks PMI-1/PMI-2",
            BRIDGE_FIX.format(pmi="PMI-1/PMI-2", rebuild=MPICH_REBUILD),
        ),
        (
            OMPI,
            ("none", "pmi2"),
            "pmi2",
            "ok",
            "srun's default --mpi=pmi2 serves PMI-2 and the image's Open MPI 4.1.4 speaks "
            f"PMIx: {BRIDGED}",
            "",
        ),
        (
            OMPI,
            ("none", "pmi2"),
            "none",
            "warn",
            "srun's default --mpi=none does not serve the image's PMIx: plain `srun` starts N "
            "singletons",
            "run `srun --mpi=pmi2 … rankwire exec …` (rankwire's PMI bridge, --pmi-bridge auto)",
        ),
        (
            OMPI,
            ("none", "cray_shasta"),
            "none",
            "warn",
            "Slurm offers only no PMI plugin and the image's Open MPI 4.1.4 speaks PMIx",
            BRIDGE_FIX.format(pmi="PMIx", rebuild=OMPI_REBUILD),
        ),
        (
            MPICH,
            ("pmix", "none", "pmi2", "pmix_v4"),
            "pmi2",
            "ok",
            "srun's default --mpi=pmi2 serves the image's PMI-1/PMI-2",
            "",
        ),
        (
            OMPI,
            ("pmix", "none", "pmi2", "pmix_v4"),
            "pmix_v4",
            "ok",
            "srun's default --mpi=pmix_v4 serves the image's PMIx",
            "",
        ),
        (
            OMPI,
            ("pmix", "none", "pmi2", "pmix_v4"),
            "none",
            "warn",
            "srun's default --mpi=none does not serve the image's PMIx: plain `srun` starts N "
            "singletons",
            "run `srun --mpi=pmix …`",
        ),
        (
            dataclasses.replace(MPICH, mpi=(), pmi=None),
            ("pmix", "none"),
            "pmix",
            "ok",
            "no MPI in the image: nothing for Slurm to wire up",
            "",
        ),
    ],
)
def test_what_slurm_offers_against_what_the_image_speaks(
    image, plugins, default, verdict, reason, fix
):
    assert checked("pmi", _slurm(plugins, default), image) == Check("pmi", verdict, reason, fix)


def test_without_a_usable_slurm_the_launcher_serves_the_pmi():
    broken = host(
        slurm=dataclasses.replace(
            SLURM, version="", error="srun: fatal: Could not establish a configuration source"
        )
    )
    assert checked("slurm", broken) == Check(
        "slurm",
        "warn",
        "srun does not work here: srun: fatal: Could not establish a configuration source",
        "set SLURM_CONF to the cluster's slurm.conf, or run where Slurm is configured",
    )
    assert checked("pmi", broken, OMPI) == Check(
        "pmi", "ok", "no usable Slurm here: `rankwire run` serves PMIx itself"
    )
    assert not [c for c in diagnose(DoctorFacts(broken, None)) if c.name == "spank-plugin"]
    none = host(slurm=SlurmInstall("", "", "", (), "", "", "", "", "", None, ""))
    assert checked("slurm", none) == Check(
        "slurm", "ok", "no srun on this host: `rankwire run` launches on this node"
    )


def test_the_spank_plugin_listed_missing_or_absent():
    listed = dict(
        spank_plugin="/usr/lib/slurm/rankwire_spank.so",
        spank_listed_in="/etc/slurm/plugstack.conf.d/rankwire.conf",
    )
    assert checked(
        "spank-plugin", _slurm(SLURM.mpi_plugins, "pmi2", **listed, spank_plugin_exists=True)
    ) == Check(
        "spank-plugin",
        "ok",
        "/etc/slurm/plugstack.conf.d/rankwire.conf loads /usr/lib/slurm/rankwire_spank.so: "
        "--container-image works",
    )
    gone = checked(
        "spank-plugin", _slurm(SLURM.mpi_plugins, "pmi2", **listed, spank_plugin_exists=False)
    )
    assert gone == Check(
        "spank-plugin",
        "fail",
        "/etc/slurm/plugstack.conf.d/rankwire.conf loads /usr/lib/slurm/rankwire_spank.so, "
        "which does not exist",
        "reinstall it (`make -C spank install`) or remove the line",
    )
    assert checked("spank-plugin") == Check(
        "spank-plugin",
        "ok",
        "the plugstack (/etc/slurm/plugstack.conf) does not load rankwire's plugin: "
        "`srun … rankwire exec IMAGE` works, --container-image needs the plugin "
        "(`make -C spank install`)",
    )


def test_a_plugin_srun_cannot_load_fails_and_explains_a_broken_srun():
    said = (
        "srun: error: spank: /etc/slurm/plugstack.conf:1: Failed to load plugin "
        "/p/rankwire_spank.so. Aborting."
    )
    broken = dataclasses.replace(
        SLURM,
        version="",
        error=said,
        mpi_plugins=(),
        spank_plugin="/p/rankwire_spank.so",
        spank_listed_in="/etc/slurm/plugstack.conf",
        spank_plugin_exists=True,
        spank_error=said,
    )
    checks = diagnose(DoctorFacts(host(slurm=broken), None))
    assert [c for c in checks if c.name in ("slurm", "spank-plugin")] == [
        Check(
            "slurm",
            "warn",
            f"srun does not work here: {said}",
            "set SLURM_CONF to the cluster's slurm.conf, or run where Slurm is configured",
        ),
        Check(
            "spank-plugin",
            "fail",
            "/etc/slurm/plugstack.conf loads /p/rankwire_spank.so, which srun cannot load "
            f"({said})",
            "rebuild and reinstall it against this Slurm (`make -C spank install`)",
        ),
    ]
    assert failed(checks)


def test_image_arch_passwd_and_fabric_verdicts():
    arm = dataclasses.replace(MPICH, arch="arm64", passwd_ids=None, group_ids=(0,))
    assert checked("image-arch", image=arm) == Check(
        "image-arch",
        "fail",
        "the image is for arm64 and this host is amd64",
        "use an amd64 image (`rankwire pull --arch amd64 …`, or build it on an amd64 host)",
    )
    assert checked("fabric", image=arm) == Check(
        "fabric", "warn", "not checked: the image is for arm64"
    )
    assert checked("image-users", image=arm) == Check(
        "image-users",
        "warn",
        f"the image has no /etc/passwd; the image's /etc/group has no gid 1001: uid 1001 has "
        f"no name inside {NO_NAME}",
        "add /etc/passwd and /etc/group entries for uid 1001 and gid 1001 to the image, or "
        "bind the host's (`-B /etc/passwd -B /etc/group`)",
    )
    assert checked("image-users", image=MPICH) == Check(
        "image-users", "ok", "the image's /etc/passwd and /etc/group name uid 1001 and gid 1001"
    )
    both = dataclasses.replace(MPICH, mpi=MPICH.mpi + OMPI.mpi, pmi="both")
    assert checked("image-mpi", image=both) == Check(
        "image-mpi",
        "ok",
        "MPICH 4.0.2 and Open MPI 4.1.4 (/usr/lib/x86_64-linux-gnu/libmpich.so.12, "
        "/usr/lib/x86_64-linux-gnu/libmpi.so.40): MPICH speaks PMI-1/PMI-2, Open MPI PMIx; "
        "each program's own libmpi decides",
    )
    unreadable = dataclasses.replace(
        MPICH,
        fabric_error="cannot read /x/mpich.sif with unsquashfs: bad superblock; check the image",
    )
    assert checked("fabric", image=unreadable) == Check(
        "fabric",
        "warn",
        "the image's fabric facts cannot be read: cannot read /x/mpich.sif with unsquashfs: "
        "bad superblock",
        "check the image",
    )


def test_cause_and_fix_split_at_the_last_separator_outside_parentheses():
    assert cause_and_fix("a (b: c) d: fix it") == ("a (b: c) d", "fix it")
    assert cause_and_fix("x: y; rebuild or use --fabric none") == (
        "x: y",
        "rebuild or use --fabric none",
    )
    assert cause_and_fix("no separator") == ("no separator", "")


def test_report_lines():
    h = host(
        fuse=FuseFacts(0o600, 13, "/usr/bin/squashfuse_ll"),
        namespaces=NamespaceProbe("unshare", 28),
    )
    facts = DoctorFacts(h, MPICH)
    lines = report_lines(facts, diagnose(facts))
    assert lines[:4] == [
        "kernel 6.1.0 (x86_64), uid 1001",
        "image /x/mpich.sif (amd64)",
        "FAIL  userns        unshare(CLONE_NEWUSER) failed (ENOSPC): the user.max_user_namespaces "
        "limit (15000) is reached",
        "                    fix: end the processes holding user namespaces, or ask the admin to "
        "raise `user.max_user_namespaces`",
    ]
    assert lines[-1] == "12 ok, 1 warn, 2 fail"


def test_srun_mpi_list_and_plugstack_parsing(tmp_path):
    listing = (
        "MPI plugin types are...\n\tpmix\n\tnone\n\tcray_shasta\n\tpmi2\n"
        "specific pmix plugin versions available: pmix_v4\n"
    )
    assert _mpi_plugins(listing) == ("pmix", "none", "cray_shasta", "pmi2", "pmix_v4")
    (tmp_path / "plugstack.conf.d").mkdir()
    (tmp_path / "plugstack.conf").write_text("# site plugins\ninclude plugstack.conf.d/*.conf\n")
    (tmp_path / "plugstack.conf.d/other.conf").write_text("optional /x/other.so\n")
    entry = tmp_path / "plugstack.conf.d/rankwire.conf"
    entry.write_text("required /usr/lib/slurm/rankwire_spank.so helper=/x policy=/y\n")
    assert _spank_entry(str(tmp_path / "plugstack.conf")) == (
        "/usr/lib/slurm/rankwire_spank.so",
        str(entry),
    )
    entry.write_text("# required /usr/lib/slurm/rankwire_spank.so\n")
    assert _spank_entry(str(tmp_path / "plugstack.conf")) == ("", "")


# -- real runs --------------------------------------------------------------------------------
def _squashfuse() -> Optional[str]:
    return shutil.which("squashfuse_ll") or shutil.which("squashfuse")


def _libpmix_line() -> str:
    from rankwire.pmi.pmix import abi

    return f"ok    libpmix       {abi.version()} ({abi.library_name()})"


def _checks(stdout: str) -> dict[str, dict[str, str]]:
    return {c["name"]: c for c in json.loads(stdout)["checks"]}


def _as_check(d: dict[str, str]) -> Check:
    return Check(**d)


@clean
def test_doctor_on_this_host(runner: User):
    proc = rw(runner, "doctor")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    uname = os.uname()
    assert lines[0] == f"kernel {uname.release} ({uname.machine}), uid {runner.uid}"
    ok = "ok    {:<13} {}".format
    assert lines[1:4] == [
        ok("userns", f"unshare(CLONE_NEWUSER) works: uid {runner.uid} mapped, mounts allowed"),
        ok("overlay", "a kernel overlay of two tmpfs mounts works in a user namespace"),
        ok("fuse", f"/dev/fuse opens read-write and {_squashfuse()} mounts images in place"),
    ]
    assert lines[4] == _libpmix_line()
    free = r"writable, [0-9.]+ (B|KiB|MiB|GiB|TiB) free"
    assert any(re.fullmatch(rf"ok    cache-dir     /\S+: {free}", ln) for ln in lines), lines
    assert any(re.fullmatch(rf"ok    runtime-dir   /\S+: {free}", ln) for ln in lines), lines
    assert re.fullmatch(r"\d+ ok, \d+ warn, 0 fail", lines[-1])


@clean
def test_a_user_namespace_limit_of_0_fails_for_real(runner: User, shared_dir: Path):
    """In a user namespace of our own, user.max_user_namespaces is ours to set to 0: the
    probe's unshare then fails with ENOSPC, the report says why, the exit status is 1."""
    scratch = Path(tempfile.mkdtemp(dir=shared_dir, prefix="doctor-"))
    scratch.chmod(0o1777)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(scratch), "RANKWIRE_CACHEDIR": f"{scratch}/cache"}
    script = "echo 0 > /proc/sys/user/max_user_namespaces && exec rankwire doctor --json"
    try:
        proc = runner.run(["unshare", "-Ur", "sh", "-c", script], env=env, cwd="/tmp", timeout=60)
    finally:
        shutil.rmtree(scratch)
    assert proc.returncode == 1, proc.stderr
    checks = _checks(proc.stdout)
    assert _as_check(checks["userns"]) == Check(
        "userns",
        "fail",
        "unshare(CLONE_NEWUSER) failed (ENOSPC): user.max_user_namespaces is 0",
        "ask the admin for `sysctl user.max_user_namespaces=15000`",
    )
    assert _as_check(checks["overlay"]) == Check(
        "overlay", "fail", "not tried: no user namespace (see userns)"
    )
    assert json.loads(proc.stdout)["ok"] is False


def test_a_missing_image_is_one_line():
    proc = subprocess.run(
        ["rankwire", "doctor", "/nonexistent/x.sif"], capture_output=True, text=True
    )
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == "rankwire: image /nonexistent/x.sif not found: check the path\n"


# -- real images against Slurm configurations (no daemons) ------------------------------------
def _scratch(shared_dir: Path) -> Path:
    """A directory under the session's, which the test user can enter."""
    where = Path(tempfile.mkdtemp(dir=shared_dir, prefix="doctor-"))
    where.chmod(0o755)
    return where


def _slurm_plugin_dir() -> str:
    for d in sorted(glob.glob("/usr/lib/*/slurm-wlm") + glob.glob("/usr/lib*/slurm")):
        if os.path.exists(f"{d}/mpi_none.so"):
            return d
    pytest.skip("no Slurm plugin directory")


def _site(where: Path, without: str, default: str, plugstack: str = "") -> dict[str, str]:
    """A slurm.conf whose PluginDir lacks mpi_<without>*.so, MpiDefault=`default`, with
    `plugstack` as its plugstack.conf; the environment that uses it."""
    where.mkdir(mode=0o755)
    plugins = where / "plugins"
    plugins.mkdir()
    for so in glob.glob(f"{_slurm_plugin_dir()}/*.so"):
        if not os.path.basename(so).startswith(f"mpi_{without}"):
            (plugins / os.path.basename(so)).symlink_to(so)
    (where / "plugstack.conf").write_text(plugstack)
    (where / "slurm.conf").write_text(
        "ClusterName=doctor\nSlurmctldHost=localhost\n"
        f"MpiDefault={default}\nPluginDir={plugins}\nPlugStackConfig={where}/plugstack.conf\n"
    )
    make_world_readable(where)
    return {**os.environ, "SLURM_CONF": str(where / "slurm.conf")}


def _mpich_version() -> str:
    out = subprocess.run(["mpichversion"], capture_output=True, text=True, check=True).stdout
    return re.search(r"MPICH Version:\s*(\S+)", out).group(1)


def _ompi_version() -> str:
    out = subprocess.run(["ompi_info", "--version"], capture_output=True, text=True).stdout
    return re.search(r"Open MPI v(\S+)", out).group(1)


def _lib_in_image(binary: Path, soname: str) -> str:
    return next(p for p in ldd_closure([str(binary)]) if os.path.basename(p) == soname)


def _srun_version(env: dict[str, str]) -> str:
    return subprocess.run(
        ["srun", "--version"], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


@clean
def test_mpich_image_on_a_pmix_only_site(
    runner, mpich_image, mpi_programs, shared_dir, spank_install
):
    """The plugstack loads the installed plugin, which srun loads too."""
    where = _scratch(shared_dir) / "site"
    env = _site(where, "pmi2", "pmix", spank_install.plugstack_line())
    proc = rw(runner, "doctor", str(mpich_image), "--json", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = _checks(proc.stdout)
    version = _mpich_version()
    assert _as_check(checks["pmi"]) == Check(
        "pmi",
        "ok",
        f"srun's default --mpi=pmix serves PMIx and the image's MPICH {version} speaks "
        f"PMI-1/PMI-2: {BRIDGED}",
    )
    libmpich = _lib_in_image(mpi_programs.hello_mpich, "libmpich.so.12")
    assert _as_check(checks["image-mpi"]) == Check(
        "image-mpi", "ok", f"MPICH {version} ({libmpich}) speaks PMI-1/PMI-2"
    )
    assert _as_check(checks["image-arch"]) == Check(
        "image-arch", "ok", "the image is amd64, as this host"
    )
    slurm = checks["slurm"]
    assert slurm["verdict"] == "ok" and slurm["reason"].startswith(
        f"{_srun_version(env)}; srun --mpi offers "
    )
    assert slurm["reason"].endswith("; MpiDefault=pmix") and "pmi2" not in slurm["reason"]
    assert _as_check(checks["spank-plugin"]) == Check(
        "spank-plugin",
        "ok",
        f"{spank_install.conf} loads {spank_install.plugin}: --container-image works",
    )
    assert _as_check(checks["image-users"]) == Check(
        "image-users",
        "warn",
        f"the image has no /etc/passwd; the image has no /etc/group: uid {runner.uid} has no "
        f"name inside {NO_NAME}",
        f"add /etc/passwd and /etc/group entries for uid {runner.uid} and gid {runner.gid} to "
        "the image, or bind the host's (`-B /etc/passwd -B /etc/group`)",
    )
    assert checks["fabric"]["verdict"] == "ok" and checks["fabric-abi"]["verdict"] == "ok"
    assert json.loads(proc.stdout)["ok"] is True
    shutil.rmtree(where.parent)


@clean
def test_ompi_image_on_a_pmi2_only_site(runner, ompi_image, shared_dir):
    where = _scratch(shared_dir) / "site"
    env = _site(where, "pmix", "pmi2")
    proc = rw(runner, "doctor", str(ompi_image), "--json", env=env)
    shutil.rmtree(where.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = _checks(proc.stdout)
    version = _ompi_version()
    assert _as_check(checks["pmi"]) == Check(
        "pmi",
        "ok",
        f"srun's default --mpi=pmi2 serves PMI-2 and the image's Open MPI {version} speaks "
        f"PMIx: {BRIDGED}",
    )
    assert checks["image-mpi"]["reason"].startswith(f"Open MPI {version} (/")
    assert checks["image-mpi"]["reason"].endswith("libmpi.so.40) speaks PMIx")
    assert _as_check(checks["spank-plugin"]) == Check(
        "spank-plugin",
        "ok",
        f"the plugstack ({where}/plugstack.conf) does not load rankwire's plugin: "
        "`srun … rankwire exec IMAGE` works, --container-image needs the plugin "
        "(`make -C spank install`)",
    )
    # The image's Open MPI links libfabric: its FABRIC_1.x needs are checked too.
    assert re.fullmatch(
        r"the host libfabric \S+ fits the image \(glibc [0-9.]+, [1-9]\d* libfabric users\)",
        checks["fabric-abi"]["reason"],
    )


@clean
@pytest.mark.parametrize(
    "fixture, without, default, reason, plugin",
    [
        (
            "mpich_image",
            "pmix",
            "pmi2",
            "srun's default --mpi=pmi2 serves the image's PMI-1/PMI-2",
            "missing",
        ),
        (
            "ompi_image",
            "pmi2",
            "pmix",
            "srun's default --mpi=pmix serves the image's PMIx",
            "empty",
        ),
    ],
)
def test_images_on_a_site_whose_default_fits(
    request, shared_dir, fixture, without, default, reason, plugin
):
    """The plugstack loads (optional) a plugin that is not there, or not a library: srun
    works, the plugin check fails, and so does doctor."""
    image = request.getfixturevalue(fixture)
    where = _scratch(shared_dir) / "site"
    so = where.parent / "lib/rankwire_spank.so"
    if plugin == "empty":
        so.parent.mkdir()
        so.write_bytes(b"")
    env = _site(where, without, default, f"optional {so}\n")
    proc = subprocess.run(
        ["rankwire", "doctor", str(image), "--json"],
        env=env,
        capture_output=True,
        text=True,
        cwd="/tmp",
    )
    shutil.rmtree(where.parent)
    assert _as_check(_checks(proc.stdout)["pmi"]) == Check("pmi", "ok", reason)
    if plugin == "missing":
        expected = Check(
            "spank-plugin",
            "fail",
            f"{where}/plugstack.conf loads {so}, which does not exist",
            "reinstall it (`make -C spank install`) or remove the line",
        )
    else:
        expected = Check(
            "spank-plugin",
            "fail",
            f"{where}/plugstack.conf loads {so}, which srun cannot load (srun: error: spank: "
            f"{so}: Dlopen of plugin file failed)",
            "rebuild and reinstall it against this Slurm (`make -C spank install`)",
        )
    assert _as_check(_checks(proc.stdout)["spank-plugin"]) == expected
    assert proc.returncode == 1


# -- an arm64 image and one whose glibc is too old for the host libfabric ---------------------
@clean
def test_an_arm64_image_fails_the_arch_check(shared_dir):
    from rankwire.runtime.build import apply_build, plan_build

    where = _scratch(shared_dir)
    uid, gid = os.getuid(), os.getgid()
    rootfs = make_rootfs(
        where / "rootfs",
        files={"/etc/passwd": f"u:x:{uid}:{gid}::/:/bin/sh\n", "/etc/group": f"g:x:{gid}:\n"},
    )
    apply_build(plan_build(where / "arm.sif", rootfs, goarch="arm64"))
    proc = subprocess.run(
        ["rankwire", "doctor", str(where / "arm.sif"), "--json"],
        capture_output=True,
        text=True,
        cwd="/tmp",
    )
    shutil.rmtree(where)
    assert proc.returncode == 1, proc.stderr
    checks = _checks(proc.stdout)
    assert _as_check(checks["image-arch"]) == Check(
        "image-arch",
        "fail",
        "the image is for arm64 and this host is amd64",
        "use an amd64 image (`rankwire pull --arch amd64 …`, or build it on an amd64 host)",
    )
    assert _as_check(checks["fabric"]) == Check(
        "fabric", "warn", "not checked: the image is for arm64"
    )
    assert "fabric-abi" not in checks
    assert _as_check(checks["image-mpi"]) == Check(
        "image-mpi",
        "ok",
        "no MPI library in the image (libmpi.so.40, libmpich.so.12, libmpi.so.12): nothing to "
        "wire up",
    )
    assert _as_check(checks["image-users"]) == Check(
        "image-users", "ok", f"the image's /etc/passwd and /etc/group name uid {uid} and gid {gid}"
    )
    assert json.loads(proc.stdout)["facts"]["image"]["arch"] == "arm64"


@clean
@pytest.mark.skipif(not shutil.which("cc"), reason="needs a C compiler")
def test_an_image_with_a_too_old_glibc_for_the_host_libfabric(tmp_path):
    """test_fabric_plan's stub libc (GLIBC_2.2.5 only): no adapter here, so nothing is
    bound and the run would work, but binding the host libfabric would not: a warning."""
    from test_fabric_plan import cc_shared, plan_for

    from rankwire.runtime.build import build_image
    from rankwire.runtime.imagefacts import image_facts

    rootfs = tmp_path / "old"
    for soname, extra in (
        ("libc.so.6", ""),
        ("ld-linux-x86-64.so.2", "GLIBC_2.3 { } GLIBC_2.2.5;\n"),
    ):
        cc_shared(
            rootfs / "usr/lib/x86_64-linux-gnu" / soname,
            soname,
            "int __stub(void) { return 0; }\n",
            "GLIBC_2.2.5 { global: __stub; local: *; };\n" + extra,
            nostdlib=True,
        )
    os.symlink("usr/lib", rootfs / "lib")
    (rootfs / "etc").mkdir()
    build_image(tmp_path / "old.sif", rootfs)
    with pytest.raises(UserError) as err:  # what `--fabric tcp` says for this image
        plan_for(image_facts(str(tmp_path / "old.sif")), "tcp")
    cause, fix = str(err.value).rsplit("; ", 1)
    proc = subprocess.run(
        ["rankwire", "doctor", str(tmp_path / "old.sif"), "--json"],
        capture_output=True,
        text=True,
        cwd="/tmp",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = _checks(proc.stdout)
    assert _as_check(checks["fabric-abi"]) == Check(
        "fabric-abi", "warn", f"{cause} {ABI_WHERE}", fix
    )
    assert "needs GLIBC_2.34" in cause and cause.endswith("but the image's glibc is 2.2.5")
    assert fix == "rebuild the image on glibc >= 2.34 or use --fabric none"
    assert checks["fabric"]["verdict"] == "ok"


RECIPE_HOSTS = sorted(p.stem for p in (Path(__file__).parent / "data" / "recipe").glob("*.json"))


@pytest.mark.parametrize("recorded", RECIPE_HOSTS)
@pytest.mark.parametrize("mpi", ["mpich", "openmpi"])
def test_doctor_and_recipe_def_wire_an_mpi_up_alike(recorded: str, mpi: str) -> None:
    """`rankwire recipe def` and `rankwire doctor IMAGE` answer "how does srun wire up this
    MPI here" from one function (pmi/bridgeplan.slurm_wireup): the `srun --mpi=` of the
    recipe's launch line is the plugin the doctor finds serving the image by default, or
    the one its fix names; where the default only bridges it and a plugin serves it
    directly, the recipe names that one (no bridge, quicker start)."""
    from rankwire.pmi.bridgeplan import slurm_wireup
    from rankwire.runtime.doctorhost import RecipeHostFacts
    from rankwire.runtime.recipe import plan_def

    path = Path(__file__).parent / "data" / "recipe" / f"{recorded}.json"
    f = RecipeHostFacts.from_json(path.read_text(), recorded)
    launch = next(c.value for c in plan_def(f, mpi, "debian:12").choices if c.what == "launch")
    found = re.fullmatch(r"srun --mpi=(\S+) rankwire exec IMAGE APP", launch)
    assert found, launch
    slurm = dataclasses.replace(SLURM, mpi_plugins=f.mpi_plugins, mpi_default=f.mpi_default)
    check = checked("pmi", host(slurm=slurm), MPICH if mpi == "mpich" else OMPI)
    wireup = slurm_wireup(f.mpi_plugins, f.mpi_default, MPICH.pmi if mpi == "mpich" else "pmix")
    if check.verdict == "ok":  # served by srun's default, directly or through the bridge
        direct = wireup.direct or (f.mpi_default.split("_")[0],)
        assert direct[0] == found.group(1), (check, launch)
    else:
        assert (check.verdict, f"--mpi={found.group(1)} " in check.fix) == ("warn", True), check
