"""What `rankwire run` and `apptainer-mpirun` do, without click: `launcher/cli.py` holds
their options' help and parse, and `rankwire/entry.py` comes straight here when only
plainly spelled launcher options lead the command (`plain`)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any, Callable, Optional

from rankwire.errors import UserError
from rankwire.launcher.plan import (
    LaunchOptions,
    LaunchPlan,
    SlurmMpi,
    describe,
    describe_oversubscription,
    describe_pml,
    plan_launch,
    validate,
    with_warm,
)
from rankwire.launcher.plan import host_process as plan_host_process
from rankwire.pmi.bridgeplan import bridge_choice
from rankwire.runtime.execcmd import (
    cli_values,
    defaults,
    device_signs,
    echo,
    exec_options,
    host_key,
    keyable,
    local_image,
)
from rankwire.runtime.instance import front_end, parent_is_slurmstepd
from rankwire.runtime.options import delegation_argv, in_scope, parse_plain, take_options
from rankwire.runtime.plan import runscript_argv
from rankwire.runtime.reference import is_remote
from rankwire.runtime.sif_format import MAGIC

# What a kept launch plan is keyed on besides the request: the image as given (None: on
# the host), files, probed paths (there or not), host tools (where on PATH), kernel files'
# contents (an adapter port's state).
Keyed = tuple[Optional[str], list[str], dict[str, bool], dict[str, Optional[str]], dict[str, str]]
LD_CACHE = "/etc/ld.so.cache"  # where the host's loader finds libraries: a host launch's key


def plain(command: str, args: Sequence[str]) -> Optional[Callable[[], None]]:
    """`command` ("run" or "apptainer-mpirun") with `args`, ready to run, when only
    plainly spelled launcher options lead its words (`options.parse_plain`) and the words
    it needs follow; None: click parses (the help, every other option, each error)."""
    parsed = parse_plain(args, ("launcher",))
    if parsed is None:
        return None
    values, words = parsed
    kw = {**defaults(), **values}
    keep = (command, *args)
    if command == "run" and words:
        return lambda: run(words[0], tuple(words[1:]), None, kw, keep)
    if command == "apptainer-mpirun" and len(words) >= 2:
        return lambda: launch(words[0], tuple(words[1:]), False, kw, keep)
    return None


def run(
    target: str,
    args: tuple[str, ...],
    image: Optional[str],
    kw: dict[str, Any],
    keep: Optional[tuple[str, ...]] = None,
) -> None:
    """`rankwire run`: TARGET a SIF image (or a remote one) runs its runscript; with
    --image IMG, a command inside IMG; otherwise, a command on this host. `keep`: the
    command and its words as given, under which the plan is kept (`launch`)."""
    if image is None and (is_sif(target) or is_remote(target)):
        launch(target, args, True, kw, keep)
    else:
        launch(image, (target, *args), False, kw, keep)


def is_sif(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(42)[32:42] == MAGIC
    except OSError:
        return False


def launch(
    image: Optional[str],
    argv: Sequence[str],
    runscript: bool,
    kw: dict[str, Any],
    keep: Optional[tuple[str, ...]] = None,
) -> None:
    """Plan the launch and run it. `keep`: the command and its words as given (the plain
    options' path, `rankwire/entry.py`), under which a local launch's plan is kept for
    the next launch of the same words (`plancache`), where its key can hold it."""
    from rankwire.launcher.execute import execute
    from rankwire.launcher.facts import (
        fabric_free,
        host_program_facts,
        image_mpi_kinds,
        open_files_limit,
        usable_cpus,
    )
    from rankwire.runtime.assemble import plan_image
    from rankwire.runtime.facts import gather
    from rankwire.runtime.userfacts import user_facts

    values = take_options(kw, "container", "process")
    source = take_options(kw, "source", "trust")
    dry_run, as_json = kw.pop("dry_run"), kw.pop("as_json")
    lopts = LaunchOptions(**kw)
    validate(lopts)  # bad numbers fail before anything is read or started
    user = user_facts()
    container = None
    if image is None:
        shaping = {**values, **source}
        given = [
            o.long
            for o in in_scope("container", "process", "source", "trust")
            if shaping[o.dest] != o.default
        ]
        if given:
            raise UserError(
                f"{', '.join(given)} shape a container: give an image "
                "(--image IMG) or drop them to run on the host"
            )
        process = plan_host_process(argv, user.environ, user.cwd)
        prefix: list[str] = []
        found = shutil.which(argv[0], path=user.environ.get("PATH"))
        ld_cache = [LD_CACHE] if os.path.exists(LD_CACHE) else []
        before = _before(keep, [found, *ld_cache] if found else None)
        kind, read, searched = host_program_facts(argv[0], user.environ)
        program_kind = kind
        free = fabric_free()
        host_mpi: dict[str, Any] = {}
        warm = None
        # The key: what host_program_facts read (the program as found on PATH, its
        # libraries), the dirs its search looked in (by identity: a library put in one;
        # those missing, by their absence) and the loader's cache; where the program's
        # name is found on PATH (one of that name put on it earlier); whether a file of
        # that name is here (`run` would take a SIF there as its image); the node's
        # devices (`free`).
        keyed: Optional[Keyed] = None
        if before is not None and read[:1] == (found,) and not parent_is_slurmstepd(os.getppid()):
            here = os.path.exists(argv[0])
            dirs = [d for d in searched if os.path.isdir(d)]
            gone = {d: False for d in searched if d not in dirs}
            keyed = (
                None,
                [*read, *dirs, *ld_cache, *([argv[0]] if here else [])],
                {**device_signs(), **gone, **({} if here else {argv[0]: False})},
                {} if "/" in argv[0] else {argv[0]: found},
                {},
            )
    else:
        opts = exec_options(values)
        sif, named = local_image(image, source)
        before = _before(keep, [sif])
        facts = gather(sif, opts, user=user)
        planned = plan_image(facts, opts, runscript_argv(facts.image, argv) if runscript else argv)
        assert planned.process is not None
        container, process = planned.container, planned.process
        # Without --share, the tasks of the step on a node join one container by default.
        # The delegated command is the planned argv, an --entrypoint's words already in
        # front: the tasks' `rankwire exec` must not put them there again.
        argv_opts = delegation_argv({**cli_values(opts), **source, "entrypoint": False})
        prefix = [front_end(), "exec", *argv_opts, named]
        # The command's own libmpi decides (not an --entrypoint's shell or tini).
        program = argv[0] if opts.entrypoint and argv else process.argv[0]
        kind, program_kind = image_mpi_kinds(facts.image, program, process.env, user.cache_dir)
        if planned.host_mpi.pmi_kind:  # the host MPI's PMI, not the replaced library's
            kind = planned.host_mpi.pmi_kind
            program_kind = program_kind and kind
        host_mpi = planned.host_mpi.to_dict()
        free = fabric_free(None if opts.fabric.strip() == "none" else facts.fabric_host)
        from rankwire.runtime import warm as warm_list

        path_env = process.env.get("PATH", "")
        kept = warm_list.cache_path(
            user.cache_dir, facts.image.digest, program, path_env, process.workdir
        )
        warm = (kept, warm_list.load(kept))
        key = (
            host_key(facts, opts)
            if before is not None and keyable(image, facts, opts, planned)
            else None
        )
        keyed = None if key is None else (sif, key[0], key[1], dict(facts.host.tools), key[2])
    slurm_mpi = None
    if user.environ.get("SLURM_JOB_ID") and not lopts.no_slurm:  # delegating: what srun offers
        from rankwire.runtime.doctorhost import slurm_install

        site = slurm_install()
        slurm_mpi = SlurmMpi(site.mpi_plugins, site.mpi_default)
    unwarmed: LaunchPlan = plan_launch(
        lopts,
        process,
        container,
        user.environ,
        prefix,
        kind,
        program_kind,
        open_files_limit(),
        slurm_mpi,
        bridge_choice(values.get("pmi_bridge"), user.environ),
        usable_cpus(),
        fabric_free=free,
    )
    plan = with_warm(unwarmed, warm)
    if dry_run:
        if as_json:
            doc = {**plan.to_dict(), **({"host_mpi": host_mpi} if host_mpi else {})}
            echo(json.dumps(doc, indent=2, sort_keys=True))
        else:
            echo(describe(plan))
        return
    if lopts.verbose:
        echo(f"rankwire: {describe(plan)}", err=True)
        if host_mpi and host_mpi["choice"] != "none":
            echo(f"rankwire: {host_mpi['reason']}", err=True)
        for line in (describe_oversubscription(plan), describe_pml(plan)):
            if line:
                echo(f"rankwire: {line}", err=True)
    if plan.delegate:
        try:
            os.execvp(plan.delegate[0], list(plan.delegate))
        except OSError as err:
            raise UserError(
                f"cannot run srun inside Slurm job {plan.slurm_job}: "
                f"{err.strerror}; pass --no-slurm to launch here"
            ) from None
    keep_started: Optional[Callable[[Optional[list[tuple[str, str]]]], None]] = None
    if keep is not None and keyed is not None and before is not None and not lopts.verbose:
        from rankwire.launcher.plancache import remember, startable

        key_image, files, probed, tools, contents = keyed
        kept_warm = warm[0] if warm is not None else ""

        def keep_plan(recipe: Optional[list[tuple[str, str]]] = None) -> None:
            remember(
                keep, unwarmed, user, key_image, files, probed, tools, contents, kept_warm,
                before, recipe,
            )  # fmt: skip

        if startable(unwarmed):  # kept once its holder said what it did: the C front end's
            keep_started = keep_plan
        else:
            keep_plan()
    sys.exit(execute(plan, keep_started))


def _before(keep: Optional[tuple[str, ...]], paths: Optional[list[str]]) -> Optional[list[str]]:
    """The identities of `paths` before the planner reads them, for a plan to be kept
    (`keep`); None: none is (no words to keep it under, no paths, one is gone)."""
    if keep is None or paths is None:
        return None
    from rankwire.launcher.plancache import identities

    try:
        return identities(paths)
    except OSError:
        return None
