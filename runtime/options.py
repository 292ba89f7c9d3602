"""Every container, process and launcher option, declared once.

From this table come: the click options of `exec`/`shell`/`instance start`/`run`/
`apptainer-mpirun` (`rankwire.runtime.cli_options`), their parse without click when only
plainly spelled options lead (`parse_plain`), the `rankwire exec …` argv of a job
delegated to srun (`delegation_argv`), the SPANK plugin's options and their
`RANKWIRE_CONTAINER_*` fallbacks (`spank_header`, compiled into the C shim by
`make -C spank`; `rankwire.spank.plan.asked`), and which options site policy governs.
Adding an option is one entry here plus its planner logic.

This file imports nothing of rankwire: `make -C spank` runs it as a script
(`python3 runtime/options.py spank-header`) before anything is installed.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Optional, Union

from rankwire.record import record

Value = Union[bool, int, float, str, None, tuple[str, ...]]


@record
class Option:
    dest: str  # the ExecOptions field (scope container/process), the LaunchOptions field
    # (scope launcher), or the plugin's name for it
    kind: str  # "flag" | "value" | "list" (repeatable; the planner may split commas)
    help: str
    scope: str  # "container" (shapes it), "process", "source" (where a remote image comes
    # from: docker:// and oras://), "trust" (who must have signed the image), "launcher"
    # (`run`/`apptainer-mpirun`: the job), or "plugin" (plugin only)
    flags: tuple[str, ...] = ()  # exec/launcher spellings, the one to show first; () = none
    metavar: str = ""
    default: Value = None
    env: tuple[str, ...] = ()  # variables `exec` also reads this option from
    spank: str = ""  # the plugin's (Pyxis's) spelling; "" = not a plugin option
    spank_metavar: str = ""
    spank_help: str = ""
    policy: bool = False  # site policy governs it under the plugin
    type: str = "str"  # a value's type: "str", "int" or "float"
    choices: tuple[str, ...] = ()  # the values it takes, if only these

    @property
    def join_ok(self) -> bool:
        """May be given when joining a running container (instance://NAME)."""
        return self.scope == "process"

    @property
    def spank_env(self) -> str:
        """The job environment variable the plugin reads when the option is absent."""
        return "RANKWIRE_" + self.spank.upper().replace("-", "_") if self.spank else ""

    @property
    def long(self) -> str:
        """The spelling shown in messages and passed on to srun (`--x`, else the first)."""
        return next((f for f in self.flags if f.startswith("--")), self.flags[0])


OPTIONS: tuple[Option, ...] = (
    Option(
        "image",
        "value",
        "",
        "plugin",
        spank="container-image",
        spank_metavar="IMG",
        spank_help="Run the tasks in SIF image IMG (srun --container=IMG works too)",
        policy=True,
    ),
    Option(
        "binds",
        "list",
        "Bind a host path (repeatable, comma lists too; also RANKWIRE_BIND).",
        "container",
        flags=("--bind", "-B"),
        metavar="SRC[:DST[:ro|rw]]",
        default=(),
        env=("RANKWIRE_BIND", "APPTAINER_BINDPATH"),
        spank="container-mounts",
        spank_metavar="SRC[:DST[:ro]][,...]",
        spank_help="Bind host paths into the container",
        policy=True,
    ),
    Option(
        "contain",
        "flag",
        "Minimal /dev, private /tmp and $HOME; no cwd bind.",
        "container",
        flags=("--contain", "-c"),
        default=False,
    ),
    Option(
        "containall",
        "flag",
        "--contain and --cleanenv (Apptainer's -C, less its private IPC namespace).",
        "container",
        flags=("--containall", "-C"),
        default=False,
    ),
    Option(
        "no_home",
        "flag",
        "Do not bind $HOME (the working directory is still bound).",
        "container",
        flags=("--no-home",),
        default=False,
        spank="no-container-mount-home",
        spank_help="Do not bind the home directory (bound by default, as by rankwire exec; "
        "Pyxis' default is not to)",
    ),
    Option(
        "mount_home",
        "flag",
        "",
        "plugin",
        default=False,
        spank="container-mount-home",
        spank_help="Bind the home directory (the default; for Pyxis scripts)",
    ),
    Option(
        "fakeroot",
        "flag",
        "Map your uid to root inside.",
        "container",
        flags=("--fakeroot",),
        default=False,
        spank="container-remap-root",
        spank_help="Be root (uid 0) inside the container",
        policy=True,
    ),
    Option(
        "writable_tmpfs",
        "flag",
        "Let the image be written; changes vanish at exit.",
        "container",
        flags=("--writable-tmpfs",),
        default=False,
        spank="container-writable",
        spank_help="Let tasks write to the image (changes end with the step)",
        policy=True,
    ),
    Option(
        "writable_overlay",
        "value",
        "Keep the container's changes in DIR (made if missing; a local disk or tmpfs): a "
        "later exec or instance of the same image with this DIR sees them.",
        "container",
        flags=("--writable-overlay",),
        metavar="DIR",
    ),
    Option(
        "save",
        "value",
        "When the command ends (whatever its exit status), pack the container (the image "
        "and its changes) into a new SIF at OUT, replaced only once complete.",
        "container",
        flags=("--save",),
        metavar="OUT.sif",
    ),
    Option(
        "fabric",
        "value",
        "Bind the host's libfabric provider for its fabric adapter (see "
        "`rankwire fabric plan IMAGE`).",
        "container",
        flags=("--fabric",),
        metavar="auto|none|PROVIDER",
        default="auto",
        spank="container-fabric",
        spank_metavar="auto|none|PROV",
        spank_help="Host libfabric provider to bind (default auto)",
        policy=True,
    ),
    Option(
        "host_mpi",
        "value",
        "Run the image's MPI program with the host's MPI library of the same ABI (MPICH "
        "ABI, MPI standard ABI, Open MPI): auto (the MPI on PATH), its PREFIX, or none "
        "(default; also RANKWIRE_HOST_MPI).",
        "container",
        flags=("--host-mpi",),
        metavar="auto|PREFIX|none",
        env=("RANKWIRE_HOST_MPI",),
        spank="container-host-mpi",
        spank_metavar="auto|PREFIX|none",
        spank_help="Run with the host's MPI library of the image's ABI (default none, or "
        "the site's host_mpi=)",
        policy=True,
    ),
    Option(
        "share",
        "value",
        "Join the node's container named KEY, starting it if needed (%j/%s: "
        "SLURM_JOB_ID/SLURM_STEP_ID). Default under srun: one per node for the step; "
        "none: a container of its own.",
        "container",
        flags=("--share",),
        metavar="KEY",
    ),
    Option(
        "unsquash",
        "flag",
        "Do not use FUSE: extract the image once into the cache.",
        "container",
        flags=("--unsquash",),
        default=False,
    ),
    Option(
        "env",
        "list",
        "Set variables inside (repeatable; A=1,B=2 sets two, as Apptainer's --env: "
        'quote a value holding commas and "=": \'"K=a=1,b"\').',
        "process",
        flags=("--env",),
        metavar="K=V[,K=V]",
        default=(),
    ),
    Option(
        "env_file",
        "value",
        "Set the variables of FILE's K=V / export K=V lines (before --env).",
        "process",
        flags=("--env-file",),
        metavar="FILE",
    ),
    Option(
        "export",
        "list",
        "Pass VAR's value here into the ranks (as mpirun -x; repeatable), or set VAR=VALUE.",
        "process",
        flags=("-x",),
        metavar="VAR[=VALUE]",
        default=(),
    ),
    Option(
        "cleanenv",
        "flag",
        "Pass no host variables except PMI_*, PMIX_*, SLURM_*, TERM, LANG.",
        "process",
        flags=("--cleanenv", "-e"),
        default=False,
    ),
    Option(
        "workdir",
        "value",
        "Working directory inside.",
        "process",
        flags=("--pwd",),
        metavar="DIR",
        spank="container-workdir",
        spank_metavar="DIR",
        spank_help="Working directory inside the container",
    ),
    Option(
        "pmi_bridge",
        "value",
        "When the step's PMI (srun --mpi=…) is not one the image's MPI speaks, serve the "
        "task's PMI through it: auto (default: only on a mismatch) or off.",
        "process",
        flags=("--pmi-bridge",),
        metavar="auto|off",
        env=("RANKWIRE_PMI_BRIDGE",),
        spank="container-pmi-bridge",
        spank_metavar="auto|off",
        spank_help="Serve PMI-1/PMI-2 tasks through the step's PMIx (default auto: only "
        "when the image's MPI does not speak the step's PMI)",
    ),
    Option(
        "entrypoint",
        "flag",
        "Run the image's OCI ENTRYPOINT (a docker:// image's) with COMMAND as its "
        "arguments, as `docker run` does; an entrypoint-less docker:// image runs COMMAND.",
        "process",
        flags=("--entrypoint",),
        default=False,
        spank="container-entrypoint",
        spank_help="Run the image's ENTRYPOINT (a docker:// image's) with the command as its "
        "arguments (default off, or the site's execute_entrypoint=)",
    ),
    Option(
        "no_entrypoint",
        "flag",
        "",
        "plugin",
        default=False,
        spank="no-container-entrypoint",
        spank_help="Run the command itself, not the image's ENTRYPOINT (the default)",
    ),
    Option(
        "insecure",
        "flag",
        "Reach the registry of a docker:// or oras:// image over plain HTTP.",
        "source",
        flags=("--insecure",),
        default=False,
    ),
    Option(
        "ca_cert",
        "value",
        "Trust this CA (PEM) for the registry of a docker:// or oras:// image.",
        "source",
        flags=("--ca-cert",),
        metavar="FILE",
    ),
    Option(
        "arch",
        "value",
        "The platform to pick from a multi-platform docker:// image (default: this host's).",
        "source",
        flags=("--arch",),
        metavar="ARCH[/VARIANT]",
    ),
    Option(
        "verify",
        "value",
        "Run IMAGE only if every object group is signed, by keys with these fingerprints "
        "(also RANKWIRE_VERIFY).",
        "trust",
        flags=("--verify",),
        metavar="FPR[,FPR...]",
        env=("RANKWIRE_VERIFY",),
    ),
    Option(
        "keyring",
        "list",
        "Public keys (OpenPGP or PEM) to check --verify with (repeatable; default "
        "~/.config/rankwire/keys.asc and /etc/rankwire/keys.asc; also RANKWIRE_KEYRING).",
        "trust",
        flags=("--keyring",),
        metavar="KEYS.asc",
        default=(),
        env=("RANKWIRE_KEYRING",),
    ),
    Option(
        "container_name",
        "value",
        "",
        "plugin",
        spank="container-name",
        spank_metavar="NAME[:auto|create|exec|no_exec]",
        spank_help="Keep the container under NAME for the job's later steps on each node, "
        "which join it (they need not name the image again); its changes last until the "
        "job ends",
    ),
    Option(
        "container_save",
        "value",
        "",
        "plugin",
        spank="container-save",
        spank_metavar="PATH.sif",
        spank_help="When the step's last task on the node has exited, pack the container "
        "(image + changes) into a new SIF at PATH, replaced only once complete",
    ),
    Option(
        "keep_env",
        "list",
        "",
        "plugin",
        default=(),
        spank="container-env",
        spank_metavar="NAME[,...]",
        spank_help="Keep the host value of these variables over the image's",
    ),
    Option(
        "ntasks",
        "value",
        "Number of ranks.",
        "launcher",
        flags=("-n", "--ntasks", "-np", "--np"),
        default=1,
        type="int",
    ),
    Option(
        "pmi",
        "value",
        "PMI the ranks speak (our server serves both).",
        "launcher",
        flags=("--pmi",),
        default="auto",
        choices=("auto", "pmi1", "pmi2", "pmix"),
    ),
    Option(
        "pmi_transport",
        "value",
        "PMI_FD (inherited socketpair) or PMI_PORT (TCP on 127.0.0.1).",
        "launcher",
        flags=("--pmi-transport",),
        default="fd",
        choices=("fd", "port"),
    ),
    Option(
        "tag_output",
        "flag",
        "Prefix every output line with [rank].",
        "launcher",
        flags=("--tag-output",),
        default=False,
    ),
    Option(
        "timeout",
        "value",
        "Kill the job after S seconds.",
        "launcher",
        flags=("--timeout",),
        metavar="S",
        type="float",
    ),
    Option(
        "fence_timeout",
        "value",
        "Fail a PMI fence that waits longer than S seconds for a rank.",
        "launcher",
        flags=("--fence-timeout",),
        metavar="S",
        type="float",
    ),
    Option(
        "no_slurm",
        "flag",
        "Launch here even inside a Slurm allocation (default: use srun).",
        "launcher",
        flags=("--no-slurm",),
        default=False,
    ),
    Option(
        "verbose",
        "flag",
        "Say how the job is launched.",
        "launcher",
        flags=("-v", "--verbose"),
        default=False,
    ),
)


def option(dest: str) -> Option:
    return next(o for o in OPTIONS if o.dest == dest)


def in_scope(*scopes: str) -> tuple[Option, ...]:
    return tuple(o for o in OPTIONS if o.scope in scopes)


def take_options(kw: dict[str, Any], *scopes: str) -> dict[str, Any]:
    """Pop the table's options of these scopes out of a command's keyword arguments."""
    return {o.dest: kw.pop(o.dest) for o in in_scope(*scopes) if o.dest in kw}


def parse_plain(
    argv: Sequence[str], scopes: tuple[str, ...]
) -> Optional[tuple[dict[str, Value], list[str]]]:
    """The values of the options of these scopes that lead `argv` (the others' defaults)
    and the words after them, as click reads them, when each is plainly spelled (`-x
    VALUE`, `--name VALUE`, `--name=VALUE`, a flag) with a value click takes. None for
    anything else (another option, a short option's value glued on, `--`, a value click
    refuses): click then parses, and says what is wrong."""
    given = in_scope(*scopes)
    by_flag = {flag: o for o in given for flag in o.flags}
    values: dict[str, Value] = {o.dest: o.default for o in given}
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-":
        name, eq, text = argv[i].partition("=") if argv[i].startswith("--") else (argv[i], "", "")
        opt = by_flag.get(name)
        if opt is None or opt.kind == "list" or (eq and opt.kind == "flag"):
            return None
        i += 1
        if opt.kind == "flag":
            values[opt.dest] = True
            continue
        if not eq:
            if i == len(argv):
                return None
            text, i = argv[i], i + 1
        value = _typed(opt, text)
        if value is None:
            return None
        values[opt.dest] = value
    return values, list(argv[i:])


def _typed(opt: Option, text: str) -> Value:
    """`text` as click's type for the option converts it (int(), float(), an exact
    choice); None where click would refuse it."""
    if opt.choices:
        return text if text in opt.choices else None
    try:
        return int(text) if opt.type == "int" else float(text) if opt.type == "float" else text
    except ValueError:
        return None


def spank_options() -> tuple[Option, ...]:
    return tuple(o for o in OPTIONS if o.spank)


def delegation_argv(values: dict[str, Value]) -> list[str]:
    """Flags that give `rankwire exec` the same options (`values`: dest -> value, list
    items already in their command-line form); defaults are left out."""
    argv: list[str] = []
    for opt in in_scope("container", "process", "source", "trust"):
        value = values.get(opt.dest, opt.default)
        if value == opt.default or value is None or value == ():
            continue
        if opt.kind == "flag":
            argv.append(opt.long)
        elif opt.kind == "list":
            assert isinstance(value, tuple)
            for item in value:
                argv += [opt.long, item]
        else:
            argv += [opt.long, str(value)]
    return argv


def _c_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def spank_header(options: Optional[tuple[Option, ...]] = None) -> str:
    """The C header the shim's option table is compiled from."""
    opts = spank_options() if options is None else options
    lines = [
        "/* Generated from runtime/options.py by `python3 runtime/options.py spank-header`;",
        " * do not edit. X(index, name, metavar or NULL, help, has_arg, env) */",
        "#define RW_OPTIONS(X) \\",
    ]
    for i, o in enumerate(opts):
        help_ = o.spank_help + (f" (also {o.spank_env})" if o.spank_env else "")
        metavar = _c_string(o.spank_metavar) if o.kind != "flag" else "NULL"
        has_arg = 0 if o.kind == "flag" else 1
        lines.append(
            f"\tX({i}, {_c_string(o.spank)}, {metavar}, {_c_string(help_)}, {has_arg}, "
            f"{_c_string(o.spank_env)}) \\"
        )
    lines.append("")
    lines.append(f"#define RW_N_OPTS {len(opts)}")
    image = [i for i, o in enumerate(opts) if o.dest == "image"]
    lines.append(f"#define RW_OPT_IMAGE {image[0] if image else -1}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["spank-header"]:
        sys.exit("usage: python3 runtime/options.py spank-header")
    sys.stdout.write(spank_header())
