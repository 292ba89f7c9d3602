"""`@record`: a frozen dataclass without `dataclasses`' per-class code generation.

The PMI codec declares about 40 small immutable types (`pmi.messages`, `pmi.fields`,
`pmi.commands`). `@dataclasses.dataclass(frozen=True)` compiles six methods for each
(`exec`, Python 3.11): about 1 ms per class, 30-40 ms of the start of every process that
speaks PMI (the bridges, their node servers, the launcher's server), which is on the path
of each bridged task. Here the methods are written once and shared (each call costs
about 1.5 µs more than a generated one: nothing next to a PMI round trip). Kept from a
frozen dataclass: the constructor (positional or keyword, class-level defaults), `==`
between instances of the same class only, `hash`, `repr`, `__match_args__` and
`dataclasses.FrozenInstanceError` on assignment or deletion. Type checkers see a frozen
dataclass (PEP 681).

Not kept: `dataclasses.fields/asdict/replace/is_dataclass` (a record is no dataclass to
them; a type checker does not see that), a constructor signature for introspection
(`inspect.signature`, hypothesis's `st.builds`). Refused at declaration: `ClassVar` and
`dataclasses.field(...)` annotations or defaults, mutable defaults (list, dict, set),
`__post_init__` and the class's own `__init__`, `__eq__`, `__hash__`, `__repr__`,
`__setattr__` or `__delattr__`, and a base class that is no record but has annotations.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

if TYPE_CHECKING:
    from typing_extensions import dataclass_transform
else:

    def dataclass_transform(**_kw: object) -> Any:
        return lambda fn: fn


T = TypeVar("T", bound=type)


_METHODS = ("__init__", "__setattr__", "__delattr__", "__eq__", "__hash__", "__repr__")


@dataclass_transform(frozen_default=True, eq_default=True)
def record(cls: T) -> T:
    def refuse(why: str) -> NoReturn:
        raise TypeError(f"{cls.__name__}: {why}")

    c: Any = cls  # gets attributes a type checker does not know of
    # the class's own annotations (3.9: only through its __dict__)
    own = dict(cls.__dict__.get("__annotations__", {}))  # noqa: RUF063
    inherited: tuple[str, ...] = ()
    for base in cls.__mro__[1:-1]:  # not object
        if "__record_fields__" in base.__dict__:
            inherited = inherited or base.__dict__["__record_fields__"]
        elif base.__dict__.get("__annotations__"):  # noqa: RUF063
            refuse(f"base {base.__name__} has annotations but is no record")
    for name, annotation in own.items():
        if str(annotation).startswith(("ClassVar", "typing.ClassVar")):
            refuse(f"{name} is a ClassVar, which a record does not support")
    for method in (*_METHODS, "__post_init__"):
        if method in cls.__dict__:
            refuse(f"defines {method}, which a record does not keep")
    names = inherited + tuple(n for n in own if n not in inherited)
    defaults = {}
    for base in reversed(cls.__mro__):
        for name in names:
            if name in base.__dict__:
                defaults[name] = base.__dict__[name]
    for name, value in defaults.items():
        if isinstance(value, dataclasses.Field):
            refuse(f"{name}: dataclasses.field() is not supported")
        if isinstance(value, (list, dict, set)):
            refuse(f"{name}: a mutable default ({type(value).__name__}) is not allowed")
    seen_default = False
    for name in names:
        if name in defaults:
            seen_default = True
        elif seen_default:
            refuse(f"non-default field {name} follows a default one")
    c.__record_fields__ = names
    c.__record_defaults__ = defaults
    setattr(c, "__match_args__", names)  # noqa: B010 (a type checker refuses it plainly)
    c.__init__ = _init
    c.__setattr__ = _setattr
    c.__delattr__ = _delattr
    c.__eq__ = _eq
    c.__hash__ = _hash
    c.__repr__ = _repr
    return cls


def _init(self: Any, *args: Any, **kwargs: Any) -> None:
    cls = type(self)
    names = cls.__record_fields__
    if len(args) > len(names):
        raise TypeError(
            f"{cls.__name__}() takes at most {len(names)} positional arguments but "
            f"{len(args)} were given"
        )
    set_field = object.__setattr__
    for name, value in zip(names, args):
        if name in kwargs:
            raise TypeError(f"{cls.__name__}() got multiple values for argument {name!r}")
        set_field(self, name, value)
    defaults = cls.__record_defaults__
    for name in names[len(args) :]:
        if name in kwargs:
            set_field(self, name, kwargs.pop(name))
        elif name in defaults:
            set_field(self, name, defaults[name])
        else:
            raise TypeError(f"{cls.__name__}() missing required argument: {name!r}")
    if kwargs:  # a positional one given again raised above: these are unknown
        unknown = next(iter(kwargs))
        raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {unknown!r}")


def _values(self: Any) -> tuple[Any, ...]:
    return tuple(getattr(self, name) for name in type(self).__record_fields__)


def _setattr(self: Any, name: str, value: Any) -> None:
    raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")


def _delattr(self: Any, name: str) -> None:
    raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")


def _eq(self: Any, other: object) -> Any:  # bool, or NotImplemented
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _values(self) == _values(other)


def _hash(self: Any) -> int:
    return hash(_values(self))


def _repr(self: Any) -> str:
    cls = type(self)
    inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in cls.__record_fields__)
    return f"{cls.__qualname__}({inner})"
