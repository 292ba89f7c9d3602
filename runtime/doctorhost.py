"""What `rankwire doctor` tries on this host for real (a user namespace with an overlay
in it, opening /dev/fuse, libpmix, Slurm, the cache and runtime dirs), on top of the
`runtime/hostfacts.py` facts every run reads; `runtime/doctor.py` turns them into
verdicts. Kept apart from `hostfacts` so that `exec` does not import it.

`collect_recipe_host_facts` reads what `rankwire recipe` matches an image to (Slurm's MPI
plugins, the fabric, glibc, the CPU, the distribution) with the same probes, into
`RecipeHostFacts`, which `to_json`/`from_json` record and load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import json
import os
import platform
import select
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Optional

from rankwire.errors import UserError
from rankwire.fabric.elf import is_glibc, newest
from rankwire.fabric.hostfacts import Adapter, HostLibfabric, detect_adapters, host_libfabric
from rankwire.record import record
from rankwire.runtime.hostfacts import HostFacts, collect_host_facts, read_int

# -- what `rankwire doctor` tries for real ------------------------------------------------
PROBE_TIMEOUT = 10.0  # seconds the namespace probe may take
SLURM_TIMEOUT = 5.0  # seconds each Slurm command may take (scontrol waits for slurmctld)
SPANK_PLUGIN = "rankwire_spank.so"


@record
class NamespaceProbe:
    """What a forked child managed: `unshare(CLONE_NEWUSER | CLONE_NEWNS)` ("unshare"),
    map its own uid and gid ("uid_map"), mount two tmpfs ("tmpfs"), a kernel overlay of
    them written through ("overlay"). `failed`: the first step that failed, "" when all
    worked; `errno` its error (0 when it was no OSError: a timeout, a crash)."""

    failed: str
    errno: int = 0
    detail: str = ""


@record
class FuseFacts:
    mode: Optional[int]  # permission bits of /dev/fuse; None when there is none
    open_errno: int  # opening it read-write: 0, or the error
    squashfuse: Optional[str]  # squashfuse_ll or squashfuse


@record
class PmixLibFacts:
    library: str  # what was loaded: $RANKWIRE_LIBPMIX, ldconfig's answer or libpmix.so.2
    version: str  # PMIx_Get_version(); "" when it could not be loaded and checked
    error: str  # why not, one line


@record
class SlurmInstall:
    """The Slurm this host's users reach (not the step we run in: see slurmfacts)."""

    srun: str  # its path; "" when not installed
    version: str  # `srun --version`, e.g. "slurm-wlm 22.05.8"
    error: str  # why srun does not work (its last error line), "" when it does
    mpi_plugins: tuple[str, ...]  # `srun --mpi=list`, versioned ones (pmix_v4) included
    conf: str  # the slurm.conf read; "" when none was (configless: scontrol was asked)
    mpi_default: str  # MpiDefault ("none" when unset); "" when unknown
    plugstack: str  # PlugStackConfig
    spank_plugin: str  # the rankwire_spank.so the plugstack loads; "" when it loads none
    spank_listed_in: str  # the plugstack file that lists it
    spank_plugin_exists: Optional[bool]  # None: a relative path and no PluginDir known
    spank_error: str  # what srun said when it could not load that plugin ("" when it did)


@record
class DirFacts:
    path: str  # "" when it could not even be named (see error)
    error: str  # "" when a file could be made in it
    free_bytes: Optional[int]


@record
class DoctorHostFacts:
    host: HostFacts
    goarch: str  # this machine as SIF/Go names it ("amd64"), or its machine name
    namespaces: NamespaceProbe
    apparmor_restrict_userns: Optional[int]  # kernel.apparmor_restrict_unprivileged_userns
    seccomp: Optional[int]  # our Seccomp mode (/proc/self/status): 2 = a filter
    fuse: FuseFacts
    libpmix: PmixLibFacts
    slurm: SlurmInstall
    cache_dir: DirFacts
    runtime_dir: DirFacts

    def to_dict(self) -> dict[str, Any]:
        """The probes: everything but `host` (whose dict stays what it always was)."""
        return {
            f.name: dataclasses.asdict(getattr(self, f.name))
            if dataclasses.is_dataclass(getattr(self, f.name))
            else getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "host"
        }


def _namespace_steps(scratch: str) -> tuple[str, int, str]:
    """The child's part of `probe_namespaces`: (failed step, errno, detail)."""
    from rankwire.runtime import syscalls as sc

    step = "unshare"
    try:
        uid, gid = os.getuid(), os.getgid()
        sc.unshare(sc.CLONE_NEWUSER | sc.CLONE_NEWNS)
        step = "uid_map"
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1\n")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1\n")
        step = "tmpfs"
        sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
        flags = sc.MS_NOSUID | sc.MS_NODEV
        sc.mount("tmpfs", scratch, "tmpfs", flags, "size=1m")
        rw = os.path.join(scratch, "rw")
        for sub in ("lower", "rw", "merged"):
            os.mkdir(os.path.join(scratch, sub))
        sc.mount("tmpfs", rw, "tmpfs", flags, "size=1m")
        os.mkdir(os.path.join(rw, "upper"))
        os.mkdir(os.path.join(rw, "work"))
        step = "overlay"
        opts = f"lowerdir={scratch}/lower,upperdir={rw}/upper,workdir={rw}/work"
        sc.mount("overlay", os.path.join(scratch, "merged"), "overlay", flags, opts)
        Path(scratch, "merged", "written").write_text("ok")
    except OSError as err:
        return step, err.errno or 0, err.strerror or str(err)
    except Exception as err:  # reported: nothing may escape the child
        return step, 0, str(err)
    return "", 0, ""


def probe_namespaces(timeout: float = PROBE_TIMEOUT) -> NamespaceProbe:
    """Try in a forked child what a holder does first (its mounts go with it: they are in
    its own mount namespace, over the temp dir)."""
    scratch = tempfile.gettempdir()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: reports through the pipe and never returns
        code = 0
        try:
            os.close(r)
            os.write(w, "\0".join(map(str, _namespace_steps(scratch))).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    try:
        ready, _, _ = select.select([r], [], [], timeout)
        if ready:
            data = os.read(r, 65536)
    finally:
        os.close(r)
        if not data:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    if not data:
        return NamespaceProbe("unshare", 0, f"the probe gave no answer within {timeout:.0f} s")
    step, num, detail = data.decode(errors="replace").split("\0", 2)
    return NamespaceProbe(step, int(num), detail)


def probe_fuse(root: str = "/") -> FuseFacts:
    """/dev/fuse opened read-write for real (what squashfuse does first)."""
    squashfuse = shutil.which("squashfuse_ll") or shutil.which("squashfuse")
    path = os.path.join(root, "dev/fuse")
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        return FuseFacts(None, errno.ENOENT, squashfuse)
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
    except OSError as err:
        return FuseFacts(mode, err.errno or 0, squashfuse)
    return FuseFacts(mode, 0, squashfuse)


def probe_libpmix() -> PmixLibFacts:
    """libpmix found and loaded as the PMIx bindings do (`pmi/pmix/abi.lib`)."""
    from rankwire.errors import UserError
    from rankwire.pmi.pmix import abi

    name = abi.library_name()
    try:
        return PmixLibFacts(name, abi.version(), "")
    except UserError as err:
        return PmixLibFacts(name, "", str(err))


def _bounded(argv: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a command given SLURM_TIMEOUT; -1 when it could
    not run or did not finish (then stderr says why)."""
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=SLURM_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        return -1, "", f"`{' '.join(argv)}` gave no answer within {SLURM_TIMEOUT:.0f} s"
    except OSError as err:
        return -1, "", f"{argv[0]}: {err.strerror}"
    return proc.returncode, proc.stdout, proc.stderr


def _last_line(text: str, fallback: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else fallback


def _conf_values(text: str) -> dict[str, str]:
    """`Key=Value` words of a slurm.conf, by lower-case key (the last one wins)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        for word in line.split("#", 1)[0].split():
            key, sep, value = word.partition("=")
            if sep:
                values[key.lower()] = value
    return values


def _shown_config(text: str) -> dict[str, str]:
    """`scontrol show config` lines (`Key = Value`), by lower-case key."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and " " not in key.strip():
            values[key.strip().lower()] = value.strip()
    return values


def _mpi_plugins(text: str) -> tuple[str, ...]:
    """`srun --mpi=list`: the indented plugin names, then the versioned pmix ones."""
    found: list[str] = []
    for line in text.splitlines():
        if line[:1] in ("\t", " ") and line.strip():
            found.append(line.strip())
        elif "plugin versions available:" in line:
            found += [v.strip() for v in line.split(":", 1)[1].split(",") if v.strip()]
    return tuple(found)


def _spank_entry(plugstack: str, depth: int = 0) -> tuple[str, str]:
    """(plugin path as written, file) of the plugstack line loading rankwire_spank.so,
    following `include` globs; ("", "") when none does."""
    try:
        text = Path(plugstack).read_text(errors="replace")
    except OSError:
        return "", ""
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) < 2:
            continue
        if words[0].lower() == "include" and depth < 4:
            pattern = os.path.join(os.path.dirname(plugstack), words[1])
            for path in sorted(glob.glob(pattern)):
                found = _spank_entry(path, depth + 1)
                if found[0]:
                    return found
        elif words[0] in ("required", "optional") and os.path.basename(words[1]) == SPANK_PLUGIN:
            return words[1], plugstack
    return "", ""


def slurm_install() -> SlurmInstall:
    """srun's version and MPI plugins, MpiDefault and the plugstack (every command
    bounded by SLURM_TIMEOUT; slurm.conf is read, scontrol asked only without one and
    with a working srun). srun loads the plugstack first: what it says about our plugin
    is kept, and a required plugin it cannot load is why srun does not work."""
    srun = shutil.which("srun") or ""
    if not srun:
        return SlurmInstall("", "", "", (), "", "", "", "", "", None, "")
    rc, out, err = _bounded([srun, "--version"])
    version = out.strip() if rc == 0 else ""
    spank_said = [ln.strip() for ln in err.splitlines() if "spank:" in ln]
    why = "" if rc == 0 else (spank_said or [_last_line(err, f"srun exited with status {rc}")])[-1]
    plugins: tuple[str, ...] = ()
    if version:
        rc, out, err = _bounded([srun, "--mpi=list"])
        plugins = _mpi_plugins(out + "\n" + err) if rc == 0 else ()
    conf = os.environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf"
    values: dict[str, str] = {}
    try:
        values = _conf_values(Path(conf).read_text(errors="replace"))
        default_plugstack = os.path.join(os.path.dirname(conf), "plugstack.conf")
    except OSError:  # configless: slurmctld has the configuration
        conf, default_plugstack = "", ""
        rc, out, _ = _bounded(["scontrol", "show", "config"]) if version else (1, "", "")
        values = _shown_config(out) if rc == 0 else {}
    mpi_default = values.get("mpidefault", "none" if conf else "")
    plugstack = values.get("plugstackconfig", default_plugstack)
    plugin, listed_in = _spank_entry(plugstack) if plugstack else ("", "")
    exists: Optional[bool] = None
    if plugin and os.path.isabs(plugin):
        exists = os.path.isfile(plugin)
    elif plugin and values.get("plugindir"):
        dirs = values["plugindir"].split(":")
        exists = any(os.path.isfile(os.path.join(d, plugin)) for d in dirs)
    spank_error = next((ln for ln in spank_said if plugin and plugin in ln), "")
    return SlurmInstall(
        srun,
        version,
        why,
        plugins,
        conf,
        mpi_default,
        plugstack,
        plugin,
        listed_in,
        exists,
        spank_error,
    )


def _writable_dir(path: str) -> DirFacts:
    """Make `path` if missing (as the runtime would), then a file in it, for real."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        return DirFacts(path, err.strerror or str(err), _free_bytes(path))
    return DirFacts(path, "", _free_bytes(path))


def _free_bytes(path: str) -> Optional[int]:
    while path and not os.path.isdir(path):
        path = os.path.dirname(path)
    try:
        st = os.statvfs(path or "/")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def probe_dirs() -> tuple[DirFacts, DirFacts]:
    """The user's cache dir and runtime dir, as the runtime names and makes them."""
    from rankwire.errors import UserError
    from rankwire.runtime.instance import runtime_dir
    from rankwire.runtime.plan import cache_dir

    home = os.environ.get("HOME") or os.path.expanduser("~")
    cache = _writable_dir(cache_dir(os.environ, home))
    try:
        run = _writable_dir(str(runtime_dir()))
    except UserError as err:
        run = DirFacts("", str(err), None)
    return cache, run


def _status_field(name: str) -> Optional[int]:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == name:
                return int(value.strip())
    return None


def collect_doctor_host_facts() -> DoctorHostFacts:
    """Everything `rankwire doctor` says about this host, tried for real where it can be.
    The sysctls and the seccomp mode are read only to explain a failed probe."""
    from rankwire.errors import UserError
    from rankwire.runtime.sif_format import goarch_from_machine

    namespaces = probe_namespaces()  # first: fork before anything starts a thread
    try:
        goarch = goarch_from_machine()
    except UserError:
        goarch = platform.machine()
    cache, run = probe_dirs()
    return DoctorHostFacts(
        host=collect_host_facts(),
        goarch=goarch,
        namespaces=namespaces,
        apparmor_restrict_userns=read_int(
            Path("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")
        ),
        seccomp=_status_field("Seccomp"),
        fuse=probe_fuse(),
        libpmix=probe_libpmix(),
        slurm=slurm_install(),
        cache_dir=cache,
        runtime_dir=run,
    )


# -- what `rankwire recipe` matches an image to ------------------------------------------
@record
class CpuFacts:
    """/proc/cpuinfo's first processor, as far as a target name needs it."""

    machine: str  # x86_64, aarch64, ...
    vendor: str  # GenuineIntel, AuthenticAMD; "" elsewhere
    family: Optional[int]  # x86 "cpu family"
    model: Optional[int]  # x86 "model"
    implementer: str  # aarch64 "CPU implementer" ("0x41"); "" elsewhere
    part: str  # aarch64 "CPU part" ("0xd0c")
    flags: tuple[str, ...]  # x86 "flags" / aarch64 "Features"


@record
class RecipeHostFacts:
    """What `rankwire recipe` matches an MPI image to, read once (`collect_recipe_host_facts`)
    or loaded from a recorded file (`from_json`): Slurm's MPI plugins, the fabric, glibc,
    the CPU and the distribution."""

    slurm_version: str  # `srun --version`; "" when there is no working srun
    slurm_error: str  # why srun does not work ("" when it does or is not installed)
    mpi_plugins: tuple[str, ...]  # `srun --mpi=list`
    mpi_default: str  # MpiDefault; "" unknown
    libfabric_version: str  # "1.20"; "" when the host has none
    libfabric_providers: tuple[str, ...]
    libfabric_glibc: str  # newest GLIBC_x the host libfabric and its closure need ("2.34")
    adapters: tuple[Adapter, ...]
    glibc: str  # "2.36"
    distro: str  # "debian:12" (os-release ID:VERSION_ID)
    distro_name: str  # PRETTY_NAME
    cpu: CpuFacts

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "host facts") -> RecipeHostFacts:
        """Recorded facts (`rankwire recipe facts` output); UserError when `text` is not."""
        fix = "record them on the cluster with `rankwire recipe facts > FILE.json`"
        try:
            doc = json.loads(text)
            cpu = doc["cpu"]
            adapters = tuple(
                Adapter(**{**a, "devices": tuple(a["devices"])}) for a in doc["adapters"]
            )
            facts = cls(
                **{
                    **{f.name: doc[f.name] for f in dataclasses.fields(cls)},
                    "mpi_plugins": tuple(doc["mpi_plugins"]),
                    "libfabric_providers": tuple(doc["libfabric_providers"]),
                    "adapters": adapters,
                    "cpu": CpuFacts(**{**cpu, "flags": tuple(cpu["flags"])}),
                }
            )
        except ValueError as err:
            raise UserError(f"{source}: not JSON ({err}); {fix}") from None
        except KeyError as err:
            raise UserError(f"{source}: not recorded host facts ({err} missing); {fix}") from None
        except TypeError as err:
            raise UserError(f"{source}: not recorded host facts ({err}); {fix}") from None
        return facts


def os_release(root: str = "/") -> tuple[str, str]:
    """("debian:12", "Debian GNU/Linux 12 (bookworm)") from os-release; ("", "") without."""
    values: dict[str, str] = {}
    for path in ("etc/os-release", "usr/lib/os-release"):
        with contextlib.suppress(OSError):
            for line in Path(root, path).read_text(errors="replace").splitlines():
                key, sep, value = line.partition("=")
                if sep:
                    values[key.strip()] = value.strip().strip("\"'")
            break
    ident, version = values.get("ID", ""), values.get("VERSION_ID", "")
    return (f"{ident}:{version}" if ident and version else ident), values.get("PRETTY_NAME", "")


def glibc_version() -> str:
    """This process's glibc ("2.36"); "" when it is not glibc."""
    with contextlib.suppress(ValueError, OSError):
        found = os.confstr("CS_GNU_LIBC_VERSION") or ""
        if found.startswith("glibc "):
            return found.split()[1]
    return ""


def cpu_facts(root: str = "/") -> CpuFacts:
    """The first processor of /proc/cpuinfo (all processors of a node are alike)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path(root, "proc/cpuinfo").read_text(errors="replace").splitlines():
            if not line.strip():
                if fields:
                    break
                continue
            key, _, value = line.partition(":")
            fields.setdefault(key.strip().lower(), value.strip())

    def number(key: str) -> Optional[int]:
        try:
            return int(fields[key], 0)
        except (KeyError, ValueError):
            return None

    return CpuFacts(
        machine=platform.machine(),
        vendor=fields.get("vendor_id", ""),
        family=number("cpu family"),
        model=number("model"),
        implementer=fields.get("cpu implementer", ""),
        part=fields.get("cpu part", ""),
        flags=tuple(sorted((fields.get("flags") or fields.get("features") or "").split())),
    )


def _libfabric_glibc(lib: HostLibfabric) -> str:
    """The newest GLIBC_x version the host libfabric, its providers and deps need."""
    wanted: set[str] = set()
    for obj in lib.objects:
        for soname, versions in obj.elf.requires:
            if is_glibc(soname):
                wanted.update(versions)
    return newest(frozenset(wanted), "GLIBC").partition("_")[2]


def collect_recipe_host_facts() -> RecipeHostFacts:
    """This host's facts for `rankwire recipe`, from the probes `rankwire doctor` and the
    fabric planner use (Slurm's plugins, adapters, the host libfabric)."""
    slurm = slurm_install()
    try:
        lib: Optional[HostLibfabric] = host_libfabric()
    except UserError:  # no libfabric.so.1 on this host
        lib = None
    distro, name = os_release()
    return RecipeHostFacts(
        slurm_version=slurm.version,
        slurm_error=slurm.error,
        mpi_plugins=slurm.mpi_plugins,
        mpi_default=slurm.mpi_default,
        libfabric_version=lib.version if lib else "",
        libfabric_providers=lib.providers if lib else (),
        libfabric_glibc=_libfabric_glibc(lib) if lib else "",
        adapters=detect_adapters(),
        glibc=glibc_version(),
        distro=distro,
        distro_name=name,
        cpu=cpu_facts(),
    )
