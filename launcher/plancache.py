"""Launch plans kept for the next launch of the same words.

`rankwire run` and `apptainer-mpirun` (`rankwire/entry.py`) look here before anything
else: a plan that an earlier launch of exactly these words, led by plain options, kept,
and whose key still holds, is executed as it is. The launcher then gathers no fact, reads
no image and imports neither the image and fabric planners nor the launch command's code
(about 30 ms of its start; the launch plan's types and the executor it imports anyway),
and its holder starts that much sooner. Any difference in the key, and the launcher plans
again (the same planners: the plan is theirs either way) and keeps the new plan. A
lookup never fails a launch: what goes wrong is a miss.

The key (`joinplan.key_records`, as an exec plan's, checked by `joinplan.key_holds`): the
user, the working directory, the boot, the whole environment, the image as given and its
identity, every rankwire module's file that was loaded when the plan was made (the
planners' code), which of the host paths the planner probed exist and where each host
tool is on PATH; for a launch on the host, the files the program's MPI was read from
(the program as found on PATH, its libraries), the loader's cache (/etc/ld.so.cache),
where the program's name is found on PATH and whether a file of that name is in the
directory (`run` takes a SIF there as its image); and here also the CPUs the ranks may
run on and the open files limit, which the launch planner reads. The image's and the
program's identities are taken before the planner reads them (`identities`): a file
replaced meanwhile keeps no plan. The warm list is not in it: it is read
at every launch (`launcher.plan.with_warm`, as `plan_launch` applies it).

Kept (`remember`, from `launchcmd.launch`) only for a local launch whose plan may be
keyed (`execcmd.keyable`: no remote image, no signature check, no host MPI bound in, not
a task of a Slurm step; the host fabric bound in is keyed by `execcmd.host_key`; on the
host: not a task of a Slurm step), not for
--dry-run or -v. File: the runtime dir's launch-HASH.plan (HASH: FNV-1a of the directory
and the words), frame records (`runtime/frame.py`): magic
first, then `word` (the command, then each word as given), `package` (the rankwire
package's directory: the install that planned), the key, `cpus`, `nofile`,
`warm` (the warm list's path), `plan` (the LaunchPlan as JSON, without its warm list), and
`end=1` last. A plan the C front end can start itself (`startable`: ranks in an ephemeral
container, our PMI-1/PMI-2 server on socketpairs, output as it is) is kept once its holder
serves, with what the front end needs (`front_start`): the install's programs' dir, the
holder's program (keyed, with the FUSE driver), the ranks' process (`workdir`,
`no_new_privs`, `env`, `arg`), `ntasks`, `stdin_rank`, the holder's recipe (`r_*`, as an
exec plan's) and `r_warm`, the warm list its holder reads ahead. The next launch of these
words is then started by the front end (`runtime/front.c` `launch`: the container from the
recipe, the ranks, each our child with its PMI_FD) and served by Python
(`execute.adopt`), which no longer stands between the command and its ranks. Made whole
before it gets its name; the 32 used last are kept (a used plan is touched); `rankwire
cache clean` leaves them (the runtime dir is not the cache).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import stat
from collections.abc import Mapping, Sequence
from typing import Optional

from rankwire.launcher.facts import open_files_limit, usable_cpus
from rankwire.launcher.plan import LaunchPlan, with_warm
from rankwire.runtime import frame, joinplan
from rankwire.runtime.instance import existing_runtime_dir, runtime_dir
from rankwire.runtime.plan import UserFacts

MAGIC = "rankwire-launch-plan 1"
MAX_STARTED = 4096  # ranks the C front end starts itself (runtime/front.c MAX_RANKS)
# The install that keeps a plan: another one, run by its path in the same environment,
# directory and words, finds the same file, and its files (the key's) hold as well.
PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def plan_name(words: Sequence[str], cwd: str) -> str:
    return f"launch-{joinplan.fnv1a([cwd, *words]):016x}.plan"


def _limits() -> tuple[str, str]:
    soft, hard = open_files_limit()
    return str(usable_cpus()), f"{soft}:{hard}"


def cached(words: Sequence[str]) -> Optional[LaunchPlan]:
    """The kept plan of the launch `words` (the command, then its words as given), with
    its warm list, if its key holds; else None (plan it). Never fails a launch: whatever
    goes wrong here is a miss."""
    try:
        return _cached(words)
    except Exception:  # a hint: a corrupt or odd file, a broken dir, a bug
        return None


def _cached(words: Sequence[str]) -> Optional[LaunchPlan]:
    run = existing_runtime_dir()
    if run is None:
        return None
    path = os.path.join(run, plan_name(words, os.getcwd()))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, frame.MAX_FRAME + 1)
    finally:
        os.close(fd)
    recs = frame.decode(data)
    if (
        not recs
        or recs[0] != ("magic", MAGIC)
        or recs[-1] != ("end", "1")
        or frame.every(recs, "word") != list(words)
        or frame.one(recs, "package") != PACKAGE
        or (frame.one(recs, "cpus"), frame.one(recs, "nofile")) != _limits()
        or not joinplan.key_holds(recs)
    ):
        return None
    plan = LaunchPlan.from_dict(json.loads(frame.one(recs, "plan") or ""))
    kept = frame.one(recs, "warm")
    if kept:
        from rankwire.runtime import warm

        plan = with_warm(plan, (kept, warm.load(kept)))
    with contextlib.suppress(OSError):
        os.utime(path)  # used: kept longest
    return plan


def front_end_plan(fd: int) -> LaunchPlan:
    """The plan the C front end started (`execute.adopt`), from its file open on `fd`
    (the front end checked its key), with its warm list. ValueError: another install
    planned it (the front end keys the Python CLI it runs, not the package it imports)."""
    with os.fdopen(fd, "rb") as f:
        recs = frame.decode(f.read(frame.MAX_FRAME + 1))
    if frame.one(recs, "package") != PACKAGE:
        raise ValueError(f"it was planned by the rankwire in {frame.one(recs, 'package')}")
    plan = LaunchPlan.from_dict(json.loads(frame.one(recs, "plan") or ""))
    kept = frame.one(recs, "warm")
    if kept:
        from rankwire.runtime import warm

        plan = with_warm(plan, (kept, warm.load(kept)))
    return plan


def startable(plan: LaunchPlan) -> bool:
    """The C front end can start this plan's container and ranks itself, for Python to
    serve (`front_start`): ranks in an ephemeral container of ours, our PMI-1/PMI-2 server
    on inherited socketpairs, their output as it is, no open files limit to raise."""
    container = plan.container
    return (
        container is not None
        and not container.share
        and plan.delegate is None
        and plan.pmi != "pmix"
        and plan.pmi_transport == "fd"
        and not plan.tag_output
        and plan.open_files is None
        and 0 < plan.ntasks <= MAX_STARTED
        and joinplan.writable(plan.process)
    )


def front_start(
    plan: LaunchPlan, recipe: Sequence[tuple[str, str]], warm: str
) -> list[tuple[str, str]]:
    """What the C front end needs to start `plan` (`startable`) itself: the install (its
    programs' dir), the holder's program, the ranks' process, how many, which reads our
    stdin, the holder's `recipe` and the warm list to read ahead (`r_warm`, read by the
    holder at each start, as `with_warm` reads it here). ValueError: too many mounts."""
    from rankwire.runtime.instance import front_end

    if not joinplan.recipe_fits(recipe):
        raise ValueError("more mounts than rankwire-holder takes")
    proc = plan.process
    return [
        ("front_dir", os.path.dirname(os.path.realpath(front_end()))),
        ("holder_program", joinplan.SERVER),
        ("workdir", proc.workdir),
        ("no_new_privs", "1" if proc.no_new_privs else "0"),
        *(("env", f"{k}={v}") for k, v in proc.env.items()),
        *(("arg", word) for word in proc.argv),
        ("ntasks", str(plan.ntasks)),
        ("stdin_rank", str(plan.stdin_rank)),
        *recipe,
        *([("r_warm", warm)] if warm else []),
    ]


def identities(paths: Sequence[str]) -> list[str]:
    """What the key will hold of `paths` (`joinplan.identity`), taken before the planner
    reads them: `remember` keeps no plan of a file that changed meanwhile."""
    return [joinplan.identity(p) for p in paths]


def remember(
    words: Sequence[str],
    plan: LaunchPlan,
    user: UserFacts,
    image: Optional[str],
    files: Sequence[str],
    probed: Mapping[str, bool],
    tools: Mapping[str, Optional[str]],
    contents: Mapping[str, str],
    warm: str,
    before: Sequence[str],
    recipe: Optional[Sequence[tuple[str, str]]] = None,
) -> None:
    """Keep `plan` (made without its warm list, which is kept at `warm`) for the launch
    `words`, keyed on `image` (as given; None: on the host), `files` (besides the loaded
    rankwire modules'), `probed`, `tools` and `contents`; `before`: `identities` of the image and
    files as they were before the planner read them; `recipe`: what its holder did, for
    the C front end to start it (`front_start`; then the holder's program and the FUSE
    driver are keyed too). On any failure, a file changed while it was planned, or a plan
    whose JSON would not give it back as it is, nothing."""
    try:
        text = json.dumps(dataclasses.asdict(plan), sort_keys=True)
        if LaunchPlan.from_dict(json.loads(text)) != plan:
            return
        try:
            start = [] if recipe is None else front_start(plan, recipe, warm)
        except ValueError:  # more than the front end takes: kept for Python only
            start = []
        code = [*joinplan.loaded_module_files()]
        # the front end's programs: the holder's, the FUSE driver, and the Python CLI it
        # hands over to (another install's, put in its place, imports another package)
        code += [v for k, v in start if k in ("holder_program", "r_fuse")]
        code += [os.path.join(v, "rankwire-py") for k, v in start if k == "front_dir"]
        key = joinplan.key_records((), image, user, [*code, *files], probed, tools, contents)
        if any(joinplan.identity(i.split(":", 5)[5]) != i for i in before):
            return
        cpus, nofile = _limits()
        data = frame.encode(
            [
                ("magic", MAGIC),
                *(("word", w) for w in words),
                ("package", PACKAGE),
                *key,
                ("cpus", cpus),
                ("nofile", nofile),
                ("warm", warm),
                ("plan", text),
                *start,
                ("end", "1"),
            ]
        )
        joinplan.keep_plan(str(runtime_dir(say=False)), plan_name(words, user.cwd), data)
    except Exception:  # a hint for the next launch: this one goes on without it
        return
