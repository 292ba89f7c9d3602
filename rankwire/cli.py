"""`rankwire` command line: a click group; each subsystem's commands load on demand."""

from __future__ import annotations

import importlib
import sys
from typing import NoReturn

import click

from rankwire import __version__
from rankwire.entry import exit_now
from rankwire.errors import UserError, shown

# Subcommands by name: a module is imported only when its command runs (or for --help),
# so `rankwire exec` and the SPANK helper do not pay for the launcher or fabric CLIs.
SUBCOMMANDS = {
    "build": "rankwire.runtime.cli_image:build_cmd",
    "inspect": "rankwire.runtime.cli_image:inspect_cmd",
    "sif": "rankwire.runtime.cli_image:sif_group",
    "pull": "rankwire.runtime.cli_pull:pull_cmd",
    "push": "rankwire.runtime.cli_pull:push_cmd",
    "sign": "rankwire.runtime.cli_sign:sign_cmd",
    "verify": "rankwire.runtime.cli_sign:verify_cmd",
    "cache": "rankwire.runtime.cli_pull:cache_group",
    "exec": "rankwire.runtime.cli_run:exec_",
    "shell": "rankwire.runtime.cli_run:shell",
    "instance": "rankwire.runtime.cli_run:instance",
    "run": "rankwire.launcher.cli:run",
    "pmi": "rankwire.pmi.cli:pmi",
    "fabric": "rankwire.fabric.cli:fabric",
    "recipe": "rankwire.runtime.cli_recipe:recipe",
    "spank-helper": "rankwire.spank.cli:spank_helper",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *SUBCOMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in SUBCOMMANDS:
            module, attr = SUBCOMMANDS[name].split(":")
            command: click.Command = getattr(importlib.import_module(module), attr)
            return command
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="rankwire")
def cli() -> None:
    """rankwire: MPI inside unprivileged containers, wired right.

    Runs MPI ranks inside SIF images without setuid or admin help: one shared
    container per node, PMI wire-up by rankwire or by Slurm, and the host's
    fabric provider bound in.
    """


@cli.command()
@click.argument("image", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the checks and facts as JSON.")
def doctor(image: str | None, as_json: bool) -> None:
    """Check this host, and IMAGE (a SIF) if given, for what rankwire needs.

    Each check is ok, warn or fail, with the reason and the fix; the exit status is 1
    when one fails.
    """
    from rankwire.runtime.doctor import diagnose, failed, report_lines
    from rankwire.runtime.doctorfacts import gather_doctor

    facts = gather_doctor(image)
    checks = diagnose(facts)
    if as_json:
        import json

        doc = {
            "ok": not failed(checks),
            "checks": [c.to_dict() for c in checks],
            "facts": facts.to_dict(),
        }
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        for line in report_lines(facts, checks):
            click.echo(line)
    if failed(checks):
        sys.exit(1)


# A bare command shows its help: click >= 8.2 raises this for it (older click prints the
# help and exits by itself; pyproject allows click 8.0 for Python 3.9).
_NO_ARGS_IS_HELP: tuple[type[click.ClickException], ...] = (
    (click.exceptions.NoArgsIsHelpError,) if hasattr(click.exceptions, "NoArgsIsHelpError") else ()
)


def run_command(command: click.Command, argv: list[str] | None, prog_name: str) -> None:
    """Run a click command; user errors become one line on stderr and an exit code."""
    try:
        command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except UserError as err:
        click.echo(f"{prog_name}: {err}", err=True)
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        click.echo(f"{prog_name}: aborted", err=True)
        sys.exit(130)
    except _NO_ARGS_IS_HELP as err:
        err.show()
        sys.exit(err.exit_code)
    except click.ClickException as err:
        click.echo(f"{prog_name}: {click_error(err, prog_name)}", err=True)
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)


def click_error(err: click.ClickException, prog_name: str) -> str:
    """Click's own errors (unknown option, bad value) as one line, like a UserError."""
    if isinstance(err, click.NoSuchOption):
        message = f"unknown option {err.option_name}"
        if err.possibilities and len(err.possibilities) == 1:  # a typo, likely
            message += f" (did you mean {err.possibilities[0]}?)"
    else:
        message = err.format_message().rstrip(".")
        message = message[:1].lower() + message[1:]
    if isinstance(err, click.UsageError):
        command = err.ctx.command_path if err.ctx else prog_name
        message += f": see {command} --help"
    return shown(message)


def main(argv: list[str] | None = None) -> NoReturn:
    """Console entry point of `rankwire`."""
    run_and_exit(cli, argv, prog_name="rankwire")


def run_and_exit(command: click.Command, argv: list[str] | None, prog_name: str) -> NoReturn:
    """A console entry point's whole life: `run_command`, then `exit_now`."""
    try:
        run_command(command, argv, prog_name)
    except SystemExit as done:
        exit_now(done.code)
    exit_now(0)
