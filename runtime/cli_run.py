"""Container commands: exec, run, shell, instance start/stop/list."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, Callable, Optional

import click

from rankwire.errors import UserError
from rankwire.runtime import instance as inst
from rankwire.runtime.plan import (
    ContainerPlan,
    ExecOptions,
    ImageFacts,
    ProcessPlan,
    plan_container,
    plan_process,
    user_facts,
)

INSTANCE_PREFIX = "instance://"
PASSTHROUGH = {"ignore_unknown_options": True, "allow_interspersed_args": False}


def container_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options that shape the container (not allowed when joining an instance)."""
    opts = [
        click.option(
            "-B",
            "--bind",
            "binds",
            multiple=True,
            metavar="SRC[:DST[:ro|rw]]",
            help="Bind a host path (repeatable, comma lists too; also RANKWIRE_BIND).",
        ),
        click.option(
            "--contain", is_flag=True, help="Minimal /dev, private /tmp and $HOME; no cwd bind."
        ),
        click.option("--fakeroot", is_flag=True, help="Map your uid to root inside."),
        click.option(
            "--writable-tmpfs",
            is_flag=True,
            help="Let the image be written; changes vanish at exit.",
        ),
        click.option(
            "--fabric",
            default="auto",
            show_default=True,
            metavar="auto|none|PROVIDER",
            help="Bind the host's libfabric provider for its fabric adapter (see "
            "`rankwire fabric plan IMAGE`).",
        ),
        click.option(
            "--share",
            metavar="KEY",
            help="Join the node's container named KEY, starting it if needed (%j/%s: "
            "SLURM_JOB_ID/SLURM_STEP_ID). Default under srun: one per node for the step; "
            "none: a container of its own.",
        ),
        click.option(
            "--unsquash",
            is_flag=True,
            help="Do not use FUSE: extract the image once into the cache.",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def process_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option(
            "--env", "env", multiple=True, metavar="K=V", help="Set a variable inside (repeatable)."
        ),
        click.option(
            "--cleanenv",
            is_flag=True,
            help="Pass no host variables except PMI_*, PMIX_*, SLURM_*, TERM, LANG.",
        ),
        click.option("--pwd", "workdir", metavar="DIR", help="Working directory inside."),
        click.option("--dry-run", is_flag=True, help="Print the plan instead of running it."),
        click.option("--json", "as_json", is_flag=True, help="With --dry-run: print JSON."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def image_facts(path: str) -> ImageFacts:
    from rankwire.runtime.imagefacts import image_facts as read

    return read(path)


def _show_plan(container: Optional[ContainerPlan], proc: ProcessPlan, as_json: bool) -> None:
    plan: dict[str, Any] = {
        "container": container.to_dict() if container else None,
        "process": proc.to_dict(),
    }
    if as_json:
        click.echo(json.dumps(plan, indent=2, sort_keys=True))
        return
    if container is not None:
        click.echo(f"image      {container.image} (partition at {container.partition_offset})")
        click.echo(
            f"drivers    image {'/'.join(container.image_drivers)}, "
            f"overlay {'/'.join(container.overlay_drivers)}"
        )
        click.echo(f"uid map    {container.uid_map}, gid map {container.gid_map}")
        for m in container.mounts:
            src = m.source or m.kind
            click.echo(f"mount      {src} -> {m.target}{' (ro)' if m.readonly else ''}")
    click.echo(f"workdir    {proc.workdir}")
    click.echo(f"argv       {list(proc.argv)}")


CONTAINER_KEYS = ("binds", "contain", "fakeroot", "writable_tmpfs", "unsquash", "share", "fabric")


def plan_image(
    image: str, opts: ExecOptions, argv_of: Callable[[ImageFacts], Sequence[str]]
) -> tuple[ImageFacts, ContainerPlan, ProcessPlan, dict[str, str]]:
    """Facts -> plans for a command in an image (every caller: exec, instance, launcher).

    Returns the image facts, the container and process plans, and the fabric env (which
    joiners of an instance need too).
    """
    from rankwire.fabric.plan import fabric_for
    from rankwire.runtime.hostfacts import collect_host_facts

    facts = image_facts(image)
    user = user_facts()
    fabric = fabric_for(facts, opts.fabric)
    container = plan_container(facts, collect_host_facts(), user, opts, fabric_mounts=fabric.mounts)
    proc = plan_process(facts, user, opts, argv_of(facts), fabric_env=fabric.env)
    return facts, container, proc, fabric.env


def _execute(image: str, argv_of: Callable[[ImageFacts], Sequence[str]], **kw: Any) -> None:
    container_kw = {k: kw.pop(k) for k in CONTAINER_KEYS}
    dry_run, as_json = kw.pop("dry_run"), kw.pop("as_json")
    if image.startswith(INSTANCE_PREFIX):
        if any(v for k, v in container_kw.items() if k != "fabric") or (
            container_kw["fabric"] != "auto"
        ):
            raise UserError(
                "-B/--contain/--fakeroot/--writable-tmpfs/--fabric shape a container; "
                "an instance already has its own: give them to `instance start`"
            )
        name = image[len(INSTANCE_PREFIX) :]
        meta = inst.instance_info(name)["meta"]
        facts = ImageFacts(**meta["image_facts"])
        proc = plan_process(
            facts,
            user_facts(),
            ExecOptions(**kw),
            argv_of(facts),
            fabric_env=meta.get("fabric_env", {}),
        )
        if dry_run:
            _show_plan(None, proc, as_json)
            return
        with inst.leased(inst.instance_socket(name)) as lease:
            sys.exit(inst.run_in(lease, proc))
    _facts, container, proc, _fabric_env = plan_image(
        image, ExecOptions(**kw, **container_kw), argv_of
    )
    if dry_run:
        _show_plan(container, proc, as_json)
        return
    sys.exit(inst.run_container(container, proc))


@click.command("exec", context_settings=PASSTHROUGH)
@container_options
@process_options
@click.argument("image")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(image: str, command: tuple[str, ...], **kw: Any) -> None:
    """Run COMMAND inside IMAGE (a SIF file, or instance://NAME to join one)."""
    _execute(image, lambda _facts: command, **kw)


@click.command("shell")
@container_options
@process_options
@click.argument("image")
def shell(image: str, **kw: Any) -> None:
    """Start an interactive shell inside IMAGE."""
    _execute(image, lambda _facts: ["/bin/sh"], **kw)


@click.group("instance")
def instance() -> None:
    """One shared container per node: start it once, join it from any number of processes."""


@instance.command("start")
@container_options
@click.argument("image")
@click.argument("name")
def instance_start(image: str, name: str, **kw: Any) -> None:
    """Start a persistent instance NAME of IMAGE; join with `exec instance://NAME`."""
    import dataclasses

    facts, container, _proc, fabric_env = plan_image(image, ExecOptions(**kw), lambda _f: ["true"])
    holder = inst.start_holder(
        container,
        mode="persistent",
        owner=None,
        name=name,
        meta={"image_facts": dataclasses.asdict(facts), "fabric_env": fabric_env},
    )
    click.echo(
        f"instance {name} started (holder pid {holder.pid}, {holder.report.get('image_driver')})"
    )


@instance.command("stop")
@click.argument("name")
def instance_stop(name: str) -> None:
    """Stop instance NAME: its mount and holder go away."""
    inst.stop_instance(name)
    click.echo(f"instance {name} stopped")


@instance.command("list")
@click.option("--json", "as_json", is_flag=True)
def instance_list(as_json: bool) -> None:
    """List running instances."""
    rows = inst.list_instances()
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    for row in rows:
        click.echo(f"{row['name']}\tpid {row['pid']}\tleases {row['leases']}\t{row['image']}")
