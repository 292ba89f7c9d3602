"""`@record`: a frozen dataclass without `dataclasses`' per-class code generation.

The PMI codec declares about 40 small immutable types (`pmi.messages`, `pmi.fields`,
`pmi.commands`). `@dataclasses.dataclass(frozen=True)` compiles six methods for each
(`exec`, Python 3.11): about 1 ms per class, 30-40 ms of the start of every process that
speaks PMI (the bridges, their node servers, the launcher's server), which is on the path
of each bridged task. Here the methods are written once and shared; what a frozen
dataclass gives is kept: the constructor (positional or keyword, class-level defaults),
`==` between instances of the same class only, `hash`, `repr` and
`dataclasses.FrozenInstanceError` on assignment. Type checkers see a frozen dataclass
(PEP 681). Not supported, and refused at declaration: `dataclasses.field(...)` defaults
and a record's base class that declares fields of its own without being a record.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from typing_extensions import dataclass_transform
else:

    def dataclass_transform(**_kw: object) -> Any:
        return lambda fn: fn


T = TypeVar("T", bound=type)


@dataclass_transform(frozen_default=True, eq_default=True)
def record(cls: T) -> T:
    c: Any = cls  # gets attributes a type checker does not know of
    # the class's own annotations (names only: `from __future__ import annotations`)
    own = tuple(cls.__dict__.get("__annotations__", {}))  # noqa: RUF063 (3.9 has no other)
    inherited: tuple[str, ...] = ()
    for base in cls.__mro__[1:]:
        if "__record_fields__" in base.__dict__:
            inherited = base.__dict__["__record_fields__"]
            break
        if base.__dict__.get("__annotations__"):  # noqa: RUF063
            raise TypeError(f"{cls.__name__}: base {base.__name__} has fields but is no record")
    names = inherited + tuple(n for n in own if n not in inherited)
    defaults = {}
    for base in reversed(cls.__mro__):
        for name in names:
            if name in base.__dict__:
                defaults[name] = base.__dict__[name]
    for name, value in defaults.items():
        if isinstance(value, dataclasses.Field):
            raise TypeError(f"{cls.__name__}.{name}: dataclasses.field() is not supported")
    seen_default = False
    for name in names:
        if name in defaults:
            seen_default = True
        elif seen_default:
            raise TypeError(f"{cls.__name__}: non-default field {name} follows a default one")
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
        raise TypeError(f"{cls.__name__}() takes {len(names)} arguments but {len(args)} were given")
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
