"""Click options from the option table (`runtime/options.py`): one light module, so the
commands that need only a few of them (`pull`, `push`) do not import the runtime."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import click

from rankwire.runtime.options import in_scope

F = TypeVar("F", bound=Callable[..., Any])
TYPES = {"str": click.STRING, "int": click.INT, "float": click.FLOAT}


def click_options(*scopes: str) -> Callable[[F], F]:
    """The click options of these scopes ("container", "process", "launcher", ...), from
    the table."""

    def decorate(f: F) -> F:
        for opt in reversed(in_scope(*scopes)):
            names = [*opt.flags, opt.dest]
            if opt.kind == "flag":
                f = click.option(*names, is_flag=True, help=opt.help)(f)
            else:
                f = click.option(
                    *names,
                    type=click.Choice(opt.choices) if opt.choices else TYPES[opt.type],
                    multiple=opt.kind == "list",
                    default=opt.default,
                    show_default=isinstance(opt.default, (str, int)),
                    metavar=opt.metavar or None,
                    help=opt.help,
                )(f)
        return f

    return decorate
