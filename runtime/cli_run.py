"""Container commands: exec, shell, instance start/stop/list (click: their options and
help). What exec and shell do is `runtime/execcmd.py`."""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, TypeVar

import click

from rankwire.errors import UserError
from rankwire.runtime import instance as inst
from rankwire.runtime.cli_options import click_options
from rankwire.runtime.execcmd import exec_options, execute, local_image
from rankwire.runtime.options import take_options

F = TypeVar("F", bound=Callable[..., Any])
# Options end at the image (or target): the command's own options pass through; a dash
# word before it is an unknown option, not an image path.
PASSTHROUGH = {"allow_interspersed_args": False, "help_option_names": ["-h", "--help"]}


container_options = click_options("container", "source", "trust")
process_options = click_options("process")
plan_options = [
    click.option("--dry-run", is_flag=True, help="Print the plan instead of running it."),
    click.option("--json", "as_json", is_flag=True, help="With --dry-run: print JSON."),
]


def dry_run_options(f: F) -> F:
    for opt in reversed(plan_options):
        f = opt(f)
    return f


@click.command("exec", context_settings=PASSTHROUGH)
@container_options
@process_options
@dry_run_options
@click.argument("image")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(image: str, command: tuple[str, ...], **kw: Any) -> None:
    """Run COMMAND inside IMAGE (a SIF file, docker://…, oras://…, or instance://NAME to
    join one)."""
    execute(image, lambda _facts: command, kw, command)


@click.command("shell")
@container_options
@process_options
@dry_run_options
@click.argument("image")
def shell(image: str, **kw: Any) -> None:
    """Start an interactive shell inside IMAGE."""
    execute(image, lambda _facts: ["/bin/sh"], kw)


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

    from rankwire.runtime.assemble import plan_image
    from rankwire.runtime.facts import gather

    source_kw = take_options(kw, "source", "trust")
    opts = exec_options(kw)
    if opts.save is not None:
        raise UserError(
            f"--save applies to exec; save an instance when it stops: "
            f"`rankwire instance stop {name} --save {opts.save}`"
        )
    image, _ = local_image(image, source_kw)
    facts = gather(image, opts)
    plan = plan_image(facts, opts, None)
    holder = inst.start_holder(
        plan.container,
        mode="persistent",
        owner=None,
        name=name,
        meta={
            "image_facts": dataclasses.asdict(facts.image),
            "fabric_env": {**plan.fabric.env, **plan.host_mpi.env},  # the binds' variables
            "overlay_dir": plan.container.overlay_dir,  # `instance stop --save` reads it
        },
    )
    click.echo(
        f"instance {name} started (holder pid {holder.pid}, {holder.report.get('image_driver')})"
    )


@instance.command("stop")
@click.option(
    "--save",
    metavar="OUT.sif",
    help="First pack the instance (image and its changes; started with --writable-overlay) "
    "into a new SIF at OUT.",
)
@click.argument("name")
def instance_stop(name: str, save: Optional[str]) -> None:
    """Stop instance NAME: its mount and holder go away."""
    if save is not None:
        inst.save_instance(name, os.path.abspath(save))
    inst.stop_instance(name)
    click.echo(f"instance {name} stopped")


@instance.command("list")
@click.option("--json", "as_json", is_flag=True)
def instance_list(as_json: bool) -> None:
    """List running instances."""
    rows = inst.list_instances()
    if as_json:
        import json

        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    for row in rows:
        click.echo(f"{row['name']}\tpid {row['pid']}\tleases {row['leases']}\t{row['image']}")
