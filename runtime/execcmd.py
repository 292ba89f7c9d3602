"""What `rankwire exec` and `shell` do once their command line is read: plan the image's
container (or join an instance) and run the command in it. No click here: `rankwire
exec IMAGE CMD…` without options, the commonest form (`srun rankwire exec` tasks, scripts),
comes straight from `rankwire/entry.py` without the CLI's machinery (≈ 10 ms of each
start); `runtime/cli_run.py` declares the commands and their options."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable, Optional

from rankwire.errors import UserError, shown
from rankwire.pmi.bridgeplan import (
    PMI2_TO_PMIX,
    PMIX_TO_PMI,
    BridgePlan,
    bridge_choice,
    bridged_process,
    needs_image_facts,
    plan_for,
    user_offer,
)
from rankwire.runtime import instance as inst
from rankwire.runtime.options import in_scope, take_options
from rankwire.runtime.plan import (
    ContainerPlan,
    ExecOptions,
    ImageFacts,
    ProcessPlan,
    parse_binds,
    plan_process,
)

if TYPE_CHECKING:
    from rankwire.runtime.assemble import Facts, ImagePlan

# Joining an instance (`exec instance://NAME`) needs none of an image's facts or
# planners: those (rankwire.runtime.assemble, .facts, the fabric) and csv/json are
# imported where they are used, not here, to keep a join's start short.

INSTANCE_PREFIX = "instance://"


def echo(line: str, err: bool = False) -> None:
    """One line to stdout (or stderr), flushed (as click.echo does; it also strips ANSI
    escapes off a terminal: the plans and warnings we print hold none)."""
    stream = sys.stderr if err else sys.stdout
    stream.write(line + "\n")
    stream.flush()


def defaults() -> dict[str, Any]:
    """`exec`'s keyword arguments when no option is given: every option's default, as
    click gives them (`runtime/options.py`), and neither --dry-run nor --json (a launch
    read without click starts from these too, `launcher/launchcmd.plain`)."""
    scopes = ("container", "process", "source", "trust")
    return {**{o.dest: o.default for o in in_scope(*scopes)}, "dry_run": False, "as_json": False}


def split_env(arg: str) -> list[str]:
    """One --env argument as Apptainer reads it (pflag's string-to-string): with one "="
    it is one K=V (commas stay in the value); with more, comma-separated K=V pairs, read
    as a CSV record ("..." quotes a pair holding commas)."""
    if arg.count("=") < 2:
        return [arg]
    import csv

    from rankwire.runtime.imagemeta import ENV_NAME

    try:
        pairs = next(csv.reader([arg], strict=True))
    except (csv.Error, StopIteration) as err:
        raise UserError(f"bad --env '{arg}': {err}; fix the quoting") from None
    for pair in pairs:
        key = pair.partition("=")[0]
        if not ENV_NAME.match(key):
            raise UserError(
                f"bad --env '{arg}': '{key}' is not a variable name; "
                f"quote a value holding commas: --env '\"{arg}\"'"
            )
    return pairs


def env_arg(pair: str) -> str:
    """The --env argument `split_env` reads back as exactly `pair`."""
    if pair.count("=") < 2 or not any(c in pair for c in ',"\r\n'):
        return pair
    return '"' + pair.replace('"', '""') + '"'


def read_env_file(path: str) -> tuple[str, ...]:
    """--env-file FILE: its K=V / export K=V lines (bytes that are not UTF-8 kept)."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "surrogateescape")
    except OSError as err:
        raise UserError(f"--env-file {shown(path)}: {err.strerror}; check the path") from None
    from rankwire.runtime.imagemeta import parse_environment

    env = parse_environment(text, f"--env-file {path}")
    return tuple(f"{k}={v}" for k, v in env.items())


def local_image(image: str, source: dict[str, Any]) -> tuple[str, str]:
    """(the SIF to read, the image to name to other nodes): a path stays as it is; a
    docker:// or oras:// image is pulled into the cache (once per node and digest) and
    named pinned to its digest. `source`: the "source" and "trust" options; with
    --verify, the SIF is verified (or found in the verification cache) before anything
    else reads it."""
    from rankwire.runtime.reference import is_remote

    if not is_remote(image):
        given = [o.long for o in in_scope("source") if source.get(o.dest) not in (None, False)]
        if given:
            raise UserError(
                f"{', '.join(given)} apply to docker:// and oras:// images; {shown(image)} is "
                "a file: drop them"
            )
        path, named = image, image
    else:
        from rankwire.runtime import pull

        access = pull.access_from_env(
            insecure=source.get("insecure"), ca_cert=source.get("ca_cert")
        )
        result = pull.pull(image, access, arch=source.get("arch"), progress=pull.Progress())
        path, named = result.path, result.reference
    verify, keyrings = source.get("verify"), source.get("keyring") or ()
    if verify or keyrings or os.environ.get("RANKWIRE_VERIFY"):  # else: trust not imported
        from rankwire.runtime.trust import verify_path

        verify_path(path, verify, keyrings)
    return path, named


def exec_options(values: dict[str, Any]) -> ExecOptions:
    """Command-line values -> ExecOptions (binds parsed; relative sources stay relative;
    --env split as Apptainer does; the --env-file read)."""
    values = dict(values)
    if "binds" in values:
        values["binds"] = parse_binds(values["binds"])
    if "env" in values:
        values["env"] = tuple(pair for arg in values["env"] for pair in split_env(arg))
    if values.get("env_file"):
        values["env_file_vars"] = read_env_file(values["env_file"])
    return ExecOptions(**values)


def cli_values(opts: ExecOptions) -> dict[str, Any]:
    """ExecOptions -> the command-line form of each option (for srun delegation)."""
    values = {o.dest: getattr(opts, o.dest) for o in in_scope("container", "process")}
    values["binds"] = tuple(m.spec() for m in opts.binds)
    values["env"] = tuple(env_arg(pair) for pair in opts.env)
    return values


def _show_plan(
    container: Optional[ContainerPlan],
    proc: ProcessPlan,
    as_json: bool,
    host_mpi: Optional[dict[str, Any]] = None,
    bridge: Optional[BridgePlan] = None,
) -> None:
    plan: dict[str, Any] = {
        "container": container.to_dict() if container else None,
        "process": proc.to_dict(),
        **({"host_mpi": host_mpi} if host_mpi else {}),
        **({"pmi_bridge": bridge.to_dict()} if bridge else {}),
    }
    if as_json:
        import json

        echo(json.dumps(plan, indent=2, sort_keys=True))
        return
    if host_mpi and host_mpi["choice"] != "none":
        echo(f"host mpi   {host_mpi['reason']}")
    if bridge and bridge.offer:
        echo(f"pmi        {bridge.reason}")
    if container is not None:
        echo(f"image      {container.image} (partition at {container.partition_offset})")
        echo(
            f"drivers    image {'/'.join(container.image_drivers)}, "
            f"overlay {'/'.join(container.overlay_drivers)}"
        )
        echo(f"uid map    {container.uid_map}, gid map {container.gid_map}")
        if container.overlay_dir:
            echo(f"overlay    changes kept in {container.overlay_dir}")
        if container.save:
            echo(f"save       {container.save}, after the command")
        for m in container.mounts:
            src = m.source or m.kind
            echo(f"mount      {src} -> {m.target}{' (ro)' if m.readonly else ''}")
    echo(f"workdir    {proc.workdir}")
    echo(f"argv       {list(proc.argv)}")


def execute(
    image: str,
    argv_of: Callable[[ImageFacts], Sequence[str]],
    kw: dict[str, Any],
    command: Optional[tuple[str, ...]] = None,
) -> None:
    """Run `argv_of(image facts)` in IMAGE (or join instance://NAME) with the command's
    keyword arguments `kw` (its options, `defaults()` when none is given); `command`:
    exec's own (the front end's join plan is for exec only)."""
    container_kw = take_options(kw, "container")
    process_kw = take_options(kw, "process")
    source_kw = take_options(kw, "source", "trust")
    dry_run, as_json = kw.pop("dry_run"), kw.pop("as_json")
    if image.startswith(INSTANCE_PREFIX):
        shaping = {**container_kw, **source_kw}
        given = [
            o.long for o in in_scope("container", "source", "trust") if shaping[o.dest] != o.default
        ]
        if given:
            raise UserError(
                f"{', '.join(given)} shape a container; an instance already has its own: "
                "give them to `instance start`"
            )
        from rankwire.runtime.userfacts import user_facts

        name = image[len(INSTANCE_PREFIX) :]
        info = inst.instance_info(name)
        meta = info["meta"]
        image_of = ImageFacts(**meta["image_facts"])
        user, opts = user_facts(), exec_options(process_kw)
        argv = argv_of(image_of)
        proc = plan_process(image_of, user, opts, argv, fabric_env=meta.get("fabric_env", {}))
        needs: tuple[Optional[str], Optional[str]] = (None, None)
        by_command = needs_image_facts(
            bridge_choice(opts.pmi_bridge, user.environ), user_offer(user)
        )
        if by_command:
            from rankwire.runtime.facts import pmi_needs  # a join outside PMIx: not imported

            needs = pmi_needs(image_of, opts, user, lambda _image: argv)
        bridge = plan_for(user, opts.pmi_bridge, *needs)
        proc = bridged_process(bridge, proc)
        if dry_run:
            _show_plan(None, proc, as_json, bridge=bridge)
            return
        sock = inst.instance_socket(name)
        if (
            command is not None
            and all(process_kw[o.dest] == o.default for o in in_scope("process"))
            and not by_command  # the bridge's choice may depend on the command's own MPI
            and bridge.bridge is None
            and not bridge.warning
            and not inst.parent_is_slurmstepd(os.getppid())
        ):
            from rankwire.runtime import joinplan

            probe = plan_process(
                image_of, user, opts, joinplan.PROBE, fabric_env=meta.get("fabric_env", {})
            )
            if joinplan.command_free(proc, bridged_process(bridge, probe), command):
                joinplan.remember(sock, info["report"], user, proc)
        inst.end_with_slurmstepd()
        with inst.leased(sock) as lease:
            sys.exit(_run_bridged(bridge, proc, lambda p: inst.run_in(lease, p)))
    from rankwire.runtime.assemble import plan_image
    from rankwire.runtime.facts import gather

    # Options that read what an exec plan's key does not hold (a file's content, keys):
    # no plan with them.
    shaping = {**process_kw, **source_kw}
    plain = not process_kw.get("env_file") and all(
        shaping[o.dest] == o.default for o in in_scope("source", "trust")
    )
    opts = exec_options({**container_kw, **process_kw})
    image_arg = image  # as given: what the front end compares with a step plan's
    image, _ = local_image(image, source_kw)
    facts = gather(image, opts, argv_of=argv_of)
    plan = plan_image(facts, opts, argv_of(facts.image))
    assert plan.process is not None
    if dry_run:
        _show_plan(plan.container, plan.process, as_json, plan.host_mpi.to_dict(), plan.pmi_bridge)
        return
    inst.end_with_slurmstepd()
    container = plan.container
    from rankwire.runtime import joinplan

    step = command is not None and _step_plan(facts, opts, plan, command)
    if not step:
        joinplan.release_step_lock()  # the step's other tasks plan in Python

    if step and plan.pmi_bridge.bridge == PMI2_TO_PMIX:
        # The node's PMI-2 bridge answers its tasks once all of them follow it: the others
        # must read the plan (and find the bridge's socket) before this task follows.
        from rankwire.pmi.pmix import pmi2bridge

        pmi2bridge.start_node(os.environ)
        with inst.open_container(container) as lease:
            joinplan.remember_step(
                image_arg, facts.image.path, lease, facts.user, plan.process, PMI2_TO_PMIX
            )
            joinplan.release_step_lock()
            sys.exit(
                _run_bridged(
                    plan.pmi_bridge, plan.process, lambda p: inst.run_in(lease, p), started=True
                )
            )

    started = None
    words = _option_words(image_arg, command)
    if not step and plain and words is not None:
        started = _exec_plan(image_arg, words, facts, opts, plan, command or ())

    def run(p: ProcessPlan) -> int:
        if not step:
            return inst.run_container(container, p, started)
        with inst.open_container(container) as lease:
            joinplan.remember_step(
                image_arg, facts.image.path, lease, facts.user, p, plan.pmi_bridge.bridge
            )
            joinplan.release_step_lock()
            return inst.run_in(lease, p)

    sys.exit(_run_bridged(plan.pmi_bridge, plan.process, run))


def _step_plan(facts: Facts, opts: ExecOptions, plan: ImagePlan, command: tuple[str, ...]) -> bool:
    """This task's plan may be every task's of its step (`runtime/joinplan.py`): the
    step's first task here (the front end handed it the plan's lock, which it does only
    for `exec IMAGE CMD…` without option, IMAGE a path, in a task of a step), a task of
    slurmstepd joining the node's shared container, no warning, the same plan for any
    command and any task (a PMI bridge too: each task's front end joins its node's
    server)."""
    import dataclasses

    from rankwire.runtime import joinplan
    from rankwire.runtime.assemble import plan_image

    if (
        not joinplan.holds_step_lock()
        or not plan.container.share
        or plan.pmi_bridge.warning
        or facts.pmi_need == "both"  # the bridge then depends on the command's own MPI
        or not inst.parent_is_slurmstepd(os.getppid())
    ):
        return False

    def plan_for(env: dict[str, str]) -> tuple[ContainerPlan, ProcessPlan, BridgePlan]:
        user = dataclasses.replace(facts.user, environ=env)
        got = plan_image(dataclasses.replace(facts, user=user), opts, command)
        assert got.process is not None
        return got.container, got.process, got.pmi_bridge

    try:
        probe = plan_image(facts, opts, joinplan.PROBE).process
        assert plan.process is not None and probe is not None
        return joinplan.command_free(plan.process, probe, command) and joinplan.task_free(
            plan_for, facts.user.environ
        )
    except UserError:  # a probe's plan: then no step plan, and this task runs
        return False


def _option_words(image: str, command: Optional[tuple[str, ...]]) -> Optional[tuple[str, ...]]:
    """The words between `exec` and IMAGE on our command line (`rankwire exec OPTIONS…
    IMAGE CMD…`, as the front end sees it), or None for any other command line."""
    argv, n = sys.argv, len(sys.argv) - len(command or ()) - 1
    if not command or n < 2 or argv[1] != "exec" or argv[n] != image:
        return None
    return tuple(argv[2:n]) if tuple(argv[n + 1 :]) == command else None


def keyable(image: str, facts: Facts, opts: ExecOptions, plan: ImagePlan) -> bool:
    """A plan of `image` may be kept for a later start of the same request, keyed on what
    decided it (`joinplan.key_records`, with the host's part from `host_key`):
    outside a Slurm task, without a PMI bridge or its warning, without signature checks,
    no host MPI asked for (its facts come from a PATH search and the site MPI's library
    closure, which no key of the plan holds), the image a file and not the node's shared
    container."""
    from rankwire.runtime.plan import host_mpi_choice
    from rankwire.runtime.reference import is_remote

    return not (
        is_remote(image)
        or plan.pmi_bridge.bridge is not None
        or plan.pmi_bridge.warning
        or plan.container.share
        or host_mpi_choice(opts, facts.user.environ) != "none"  # its facts: a PATH search
        or os.environ.get("RANKWIRE_VERIFY")
        or "HOME" not in os.environ  # else the home is the password database's
        or inst.parent_is_slurmstepd(os.getppid())
    )


def host_key(
    facts: Facts, opts: ExecOptions
) -> Optional[tuple[list[str], dict[str, bool], dict[str, str]]]:
    """What a kept plan of `facts` is keyed on of the host, besides the request: (files by
    identity, paths there or not, kernel files' contents). The host paths the planner
    looked at (and a fabric adapter's or a GPU's coming) and the host fabric's facts
    (`fabric.hostfacts.fabric_key`). None: keep no plan."""
    from rankwire.fabric.hostfacts import fabric_key
    from rankwire.runtime.plan import paths_to_probe

    fabric = fabric_key(facts.fabric_host)
    if fabric is None:
        return None
    files, gone, contents = fabric
    probed = {path: path in facts.existing for path in paths_to_probe(facts.user, opts)}
    probed["/dev/fuse"] = facts.host.dev_fuse_usable
    return files, {**probed, **device_signs(), **gone}, contents


def device_signs() -> dict[str, bool]:
    """Whether each path that appears with a fabric adapter's or a GPU's driver exists."""
    from rankwire.fabric.hostfacts import ADAPTER_SIGNS, GPU_SIGNS

    return {path: os.path.exists(path) for path in (*ADAPTER_SIGNS, *GPU_SIGNS)}


def _exec_plan(
    image: str,
    words: tuple[str, ...],
    facts: Facts,
    opts: ExecOptions,
    plan: ImagePlan,
    command: tuple[str, ...],
) -> Optional[Callable[[inst.HolderHandle], None]]:
    """What writes this exec's plan for the C front end (`joinplan.remember_exec`) once
    its holder has said what it did, if the front end may start the container of
    `rankwire exec OPTIONS… IMAGE CMD…` (IMAGE a file; OPTIONS, `words`, exactly as given)
    itself: where the plan is `keyable`, and the same container and process plan for any
    command."""
    from rankwire.runtime import joinplan
    from rankwire.runtime.assemble import plan_image

    if not keyable(image, facts, opts, plan):
        return None
    try:
        probe = plan_image(facts, opts, joinplan.PROBE)
    except UserError:
        return None
    assert plan.process is not None and probe.process is not None
    if probe.container != plan.container or not joinplan.command_free(
        plan.process, probe.process, command
    ):
        return None
    key = host_key(facts, opts)
    if key is None:
        return None
    files, probed, contents = key
    proc = plan.process

    def write(holder: inst.HolderHandle) -> None:
        if holder.recipe is not None:
            runtime = str(inst.runtime_dir())
            joinplan.remember_exec(
                runtime,
                image,
                words,
                holder.recipe,
                facts.user,
                proc,
                probed,
                facts.host.tools,
                files,
                contents,
            )

    return write


def _run_bridged(
    bridge: BridgePlan, proc: ProcessPlan, run: Callable[[ProcessPlan], int], started: bool = False
) -> int:
    """`run(proc)` with the PMI bridge the plan asks for, started on the host before the
    task: PMIx to PMI, the task's PMIx client, whose socket the task inherits as PMI_FD
    (it ends when the task closes it or finalizes, or with us); PMI-2 to PMIx, the task's
    PMIx server, which takes over Slurm's PMI_FD and is told how the task ended (a task
    gone without finalize ends the step: its peers would wait for it)."""
    if bridge.warning and os.environ.get("SLURM_PROCID", "0") == "0":  # once per step
        echo(f"rankwire: warning: {bridge.warning}", err=True)
    if bridge.bridge is None:
        return run(proc)
    import dataclasses

    if bridge.bridge == PMIX_TO_PMI:
        from rankwire.pmi import bridge as pmi_bridge

        env = pmi_bridge.task_pmi_env(os.environ)  # the bridge's PMIx_Init overlaps our start
        return run(dataclasses.replace(proc, env={**proc.env, **env}))
    from rankwire.pmi.pmix import pmi2bridge

    if not started:  # `started`: the caller did, before it let the others read its plan
        pmi2bridge.start_node(os.environ)  # the first of the node's tasks; all follow it
    server = pmi2bridge.follow(os.environ)
    code: Optional[int] = None
    try:
        code = run(dataclasses.replace(proc, env={**proc.env, **server.env}))
        return code
    finally:
        server.finish(code)
