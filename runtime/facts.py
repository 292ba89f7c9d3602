"""Gather the facts for one image, once per caller (all the I/O before planning)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Optional

from rankwire.runtime.assemble import Facts
from rankwire.runtime.plan import (
    ExecOptions,
    ImageFacts,
    UserFacts,
    extracts_first,
    host_mpi_choice,
    paths_to_probe,
)


def gather(
    image: str | ImageFacts,
    opts: ExecOptions,
    user: Optional[UserFacts] = None,
    fabric_image_path: Optional[str] = None,
    argv_of: Optional[Callable[[ImageFacts], Sequence[str]]] = None,
) -> Facts:
    """`image`: a SIF path, or facts already read (the SPANK check's). `user`: the
    caller's own by default. `fabric_image_path`: where other processes read the image
    for the fabric ABI check (the plugin's descriptor), if not at its path. `argv_of`:
    the command for the image, whose own MPI decides the PMI bridge when the image holds
    two MPIs."""
    import dataclasses

    from rankwire.fabric.facts import fabric_facts
    from rankwire.runtime.hostfacts import collect_host_facts
    from rankwire.runtime.imagefacts import image_facts, partition_digest
    from rankwire.runtime.userfacts import existing_paths, user_facts

    facts = image_facts(image) if isinstance(image, str) else image
    user = user or user_facts()
    host = collect_host_facts()
    # The user's cache, by the user only: root planning a job user's container (the
    # plugin's enforce) neither believes nor writes what is in it, and extracts nothing.
    mine = user.cache_dir if os.geteuid() == user.uid else None
    # The content digest names the extract cache: read (and kept) only when extraction
    # comes first.
    if facts.content_digest is None and mine is not None and extracts_first(host, opts):
        digest = partition_digest(
            facts.path,
            facts.partition_offset,
            facts.partition_size,
            mine,
            read_at=fabric_image_path,
        )
        facts = dataclasses.replace(facts, content_digest=digest)
    via = dataclasses.replace(facts, path=fabric_image_path) if fabric_image_path else facts
    mpi_choice = host_mpi_choice(opts, user.environ)
    host_mpi = None
    if mpi_choice != "none":  # `auto` finding none costs a PATH lookup, no image read
        from rankwire.fabric.hostmpi import host_mpi as read_host_mpi

        host_mpi = read_host_mpi(mpi_choice, user.environ, mine)
    fabric_host, fabric_image = fabric_facts(
        via, opts.fabric, image_libs=host_mpi is not None, cache_dir=mine
    )
    pmi_need, program_need = pmi_needs(facts, opts, user, argv_of)
    return Facts(
        image=facts,
        host=host,
        user=user,
        existing=existing_paths(paths_to_probe(user, opts)),
        fabric_host=fabric_host,
        fabric_image=fabric_image,
        host_mpi=host_mpi,
        pmi_need=pmi_need,
        program_need=program_need,
    )


def pmi_needs(
    image: ImageFacts,
    opts: ExecOptions,
    user: UserFacts,
    argv_of: Optional[Callable[[ImageFacts], Sequence[str]]],
) -> tuple[Optional[str], Optional[str]]:
    """Which PMI the image's MPI speaks (and, when it holds two, the command's), read only
    when a bridge could be planned: under a PMIx step with --pmi-bridge auto. Kept in
    the user's cache per image, so the tasks of a step list the image once."""
    from rankwire.pmi.bridgeplan import bridge_choice, needs_image_facts, user_offer

    choice = bridge_choice(opts.pmi_bridge, user.environ)
    if not needs_image_facts(choice, user_offer(user)):
        return None, None
    from rankwire.launcher.facts import image_mpi_kind, image_program_mpi_kind

    need = image_mpi_kind(image, user.cache_dir)
    argv = argv_of(image) if argv_of else ()
    if need != "both" or not argv:
        return need, None
    return need, image_program_mpi_kind(image, argv[0], user.environ, user.cache_dir)
