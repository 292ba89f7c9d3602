"""`rankwire fabric info|plan|pingpong`: what the host offers, what a container gets."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

import click


@click.group("fabric")
def fabric() -> None:
    """libfabric on this host: providers, adapters, bind plans, a ping-pong self-test."""


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


@fabric.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(as_json: bool) -> None:
    """Host libfabric, its providers and endpoints, adapters, and the auto choice."""
    from rankwire.fabric import discovery
    from rankwire.fabric.hostfacts import collect_fabric_host_facts
    from rankwire.fabric.plan import choose_provider

    host = collect_fabric_host_facts()
    assert host.libfabric is not None
    endpoints: dict[str, list[str]] = {}
    for entry in discovery.getinfo(endpoint="rdm", caps=("msg",)):
        domains = endpoints.setdefault(entry.provider, [])
        if entry.domain not in domains:
            domains.append(entry.domain)
    provider, reason = choose_provider(host, "auto")
    if as_json:
        _echo_json(
            {
                "library": {"path": host.libfabric.path, "version": host.libfabric.version},
                "providers": list(host.libfabric.providers),
                "rdm_endpoints": endpoints,
                "adapters": [dataclasses.asdict(a) for a in host.adapters],
                "devices": list(host.devices),
                "auto": {"provider": provider, "reason": reason},
            }
        )
        return
    click.echo(f"libfabric  {host.libfabric.version} {host.libfabric.path}")
    click.echo(f"providers  {', '.join(host.libfabric.providers)}")
    for name, domains in endpoints.items():
        click.echo(f"rdm        {name:16} {', '.join(domains)}")
    for a in host.adapters:
        devices = ", ".join(a.devices) or "no device node"
        click.echo(f"adapter    {a.kind:5} {a.describe()}: {devices}")
    if not host.adapters:
        click.echo("adapters   none (no cxi, efa, Omni-Path or RDMA device)")
    click.echo(f"auto       {provider or '-'}: {reason}")


@fabric.command("plan")
@click.argument("image", required=False)
@click.option("--fabric", "choice", default="auto", show_default=True, metavar="auto|none|PROVIDER")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plan(image: Optional[str], choice: str, as_json: bool) -> None:
    """The fabric binds and env for IMAGE (without IMAGE: for an image like this host)."""
    from rankwire.fabric.facts import fabric_facts, host_facts_for
    from rankwire.fabric.imagefacts import host_as_image_facts
    from rankwire.fabric.plan import plan_fabric

    if image:
        from rankwire.runtime.imagefacts import image_facts

        result = plan_fabric(*fabric_facts(image_facts(image), choice), choice)
    else:
        result = plan_fabric(host_facts_for(choice), host_as_image_facts(), choice)
    if as_json:
        _echo_json(result.to_dict())
        return
    click.echo(f"provider   {result.provider or 'none (nothing bound)'}")
    click.echo(f"why        {result.reason}")
    for key, value in result.env.items():
        click.echo(f"env        {key}={value}")
    for m in result.mounts:
        click.echo(f"bind       {m.source} -> {m.target}{' (ro)' if m.readonly else ''}")


@fabric.command("pingpong")
@click.option(
    "--provider",
    "-p",
    default="auto",
    show_default=True,
    metavar="auto|PROVIDER",
    help="auto: the auto fabric choice, tcp when that binds nothing.",
)
@click.option("--iterations", "-n", default=1000, show_default=True, type=int)
@click.option("--warmup", "-w", default=100, show_default=True, type=int)
@click.option(
    "--size",
    "-s",
    "sizes",
    multiple=True,
    metavar="SIZE",
    help="Message size, e.g. 64 or 1M (repeatable; default 64 and 1M).",
)
@click.option(
    "--mode",
    type=click.Choice(["msg", "tagged"]),
    default="msg",
    show_default=True,
    help="fi_send/fi_recv or fi_tsend/fi_trecv.",
)
@click.option(
    "--image",
    metavar="IMAGE",
    help="Run inside IMAGE with the host libfabric bound in by the fabric plan.",
)
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for a peer.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def pingpong(
    provider: str,
    iterations: int,
    warmup: int,
    sizes: tuple[str, ...],
    mode: str,
    image: Optional[str],
    timeout: float,
    as_json: bool,
) -> None:
    """Two endpoints, two processes, one provider: latency and bandwidth."""
    from rankwire.fabric import pingpong as pp
    from rankwire.fabric.facts import host_facts_for
    from rankwire.fabric.plan import choose_provider

    byte_sizes = [pp.parse_size(s) for s in sizes] or [64, 1 << 20]
    host = host_facts_for(provider)
    if provider != "auto":
        choose_provider(host, provider)  # an unknown provider is a UserError here
    else:
        provider = choose_provider(host, "auto")[0] or "tcp"
        if host.libfabric is None:
            host = host_facts_for(provider)
    args = pp.pingpong_args(provider, byte_sizes, iterations, warmup, mode, timeout)
    binary = pp.build_pingpong()
    argv = _container_argv(image, provider, binary, host) if image else [str(binary)]
    run = pp.run_pingpong([*argv, *args])
    if as_json:
        _echo_json(run.to_dict())
        return
    where = f"in {image}" if image else "on the host"
    click.echo(f"provider   {run.provider} ({run.mode}) on {run.domain or run.fabric}, {where}")
    click.echo(f"libfabric  {run.version} {run.library}")
    click.echo(f"{'size':>10} {'iterations':>11} {'latency us':>12} {'bandwidth MB/s':>15}")
    for r in run.results:
        click.echo(
            f"{pp.show_size(r.size):>10} {r.iterations:>11} {r.latency_us:>12.2f} "
            f"{r.bandwidth_MBps:>15.1f}"
        )


def _container_argv(image: str, provider: str, binary: Any, host: Any) -> list[str]:
    from rankwire.fabric import pingpong as pp
    from rankwire.fabric.elf import read_elf
    from rankwire.fabric.imagefacts import read_fabric_image_facts
    from rankwire.fabric.plan import check_abi, plan_fabric
    from rankwire.runtime.imagefacts import image_facts

    facts = read_fabric_image_facts(image_facts(image))
    result = plan_fabric(host, facts, provider)
    elf = read_elf(str(binary))
    check_abi([(pp.NAME, elf)], facts, host.libfabric, consumers=[(pp.NAME, elf)])
    return pp.container_argv(image, result, binary)
