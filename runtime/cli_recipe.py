"""`rankwire recipe spack|def|facts`: a recipe for an MPI image matched to this cluster.

The facts are this host's (`doctorhost.collect_recipe_host_facts`) or, with
`--host-facts FILE.json`, facts recorded on the cluster with `rankwire recipe facts`; the
recipe and its reasons come from `runtime/recipe.py` (pure).
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional

import click

from rankwire.errors import UserError, shown
from rankwire.runtime.doctorhost import RecipeHostFacts
from rankwire.runtime.recipe import MPIS, Recipe, plan_def, plan_spack


def _facts(path: Optional[str]) -> RecipeHostFacts:
    if path is None:
        from rankwire.runtime.doctorhost import collect_recipe_host_facts

        return collect_recipe_host_facts()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as err:
        raise UserError(
            f"--host-facts {shown(path)}: cannot read it ({err.strerror}); give the file "
            "`rankwire recipe facts` wrote"
        ) from None
    return RecipeHostFacts.from_json(text, shown(path))


def _write(recipe: Recipe, out: Optional[str], explain: bool) -> None:
    """The recipe to --out (whole or not at all) or stdout; --explain: the choices (to
    stdout; without --out, instead of the recipe)."""
    if out is not None:
        target = os.path.abspath(out)
        try:
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".rankwire-recipe-")
        except OSError as err:
            raise UserError(
                f"--out {shown(out)}: cannot write there ({err.strerror}); "
                "pick a writable directory"
            ) from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(recipe.text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except OSError as err:
            os.unlink(tmp)
            raise UserError(
                f"--out {shown(out)}: cannot write it ({err.strerror}); pick a writable path"
            ) from None
    if explain:
        for line in recipe.explain_lines():
            click.echo(line)
    elif out is None:
        click.echo(recipe.text, nl=False)


_common = [
    click.option("--mpi", metavar="|".join(MPIS), required=True, help="The MPI the image gets."),
    click.option("--out", "-o", metavar="FILE", help="Write the recipe to FILE (default: stdout)."),
    click.option(
        "--explain",
        is_flag=True,
        help="Print every choice and its reason (the recipe: with --out).",
    ),
    click.option(
        "--host-facts",
        metavar="FILE.json",
        help="Use facts recorded with `rankwire recipe facts` instead of this host's.",
    ),
]


def common(f: click.decorators.FC) -> click.decorators.FC:
    for option in reversed(_common):
        f = option(f)
    return f


@click.group("recipe")
def recipe() -> None:
    """Write a recipe for an MPI image that wires up and uses the fabric on this cluster.

    The MPI's PMI follows what Slurm's srun --mpi offers, its libfabric the host's, its
    target this CPU; the recipe says why in comments, --explain lists every choice.
    """


@recipe.command("spack")
@common
@click.option(
    "--spec", "specs", multiple=True, metavar="SPEC", help="Also install SPEC (repeatable)."
)
@click.option("--os", "os_image", metavar="IMAGE", help="Spack's base image (e.g. ubuntu:22.04).")
@click.option("--target", metavar="NAME", help="Spack target (default: this CPU's, e.g. zen3).")
def spack_cmd(
    mpi: str,
    out: Optional[str],
    explain: bool,
    host_facts: Optional[str],
    specs: tuple[str, ...],
    os_image: Optional[str],
    target: Optional[str],
) -> None:
    """A spack.yaml (with a container: section) for `spack containerize`."""
    _write(plan_spack(_facts(host_facts), mpi, specs, os_image, target), out, explain)


@recipe.command("def")
@common
@click.option("--base", metavar="IMAGE", help="The distribution (e.g. debian:12, rockylinux:9).")
def def_cmd(
    mpi: str, out: Optional[str], explain: bool, host_facts: Optional[str], base: Optional[str]
) -> None:
    """An Apptainer definition file installing the distribution's MPI packages."""
    _write(plan_def(_facts(host_facts), mpi, base), out, explain)


@recipe.command("facts")
def facts_cmd() -> None:
    """Print this host's facts as JSON, for --host-facts where the recipe is written."""
    from rankwire.runtime.doctorhost import collect_recipe_host_facts

    click.echo(collect_recipe_host_facts().to_json(), nl=False)
