"""`@record`: a frozen dataclass without `dataclasses`' per-class code generation.

Every immutable type of the project is a record: facts, options, plans, the PMI codec's
messages, SIF descriptors (about 130 types; 30-80 on the path of each `rankwire exec`,
launch or plugin helper). `@dataclasses.dataclass(frozen=True)` compiles six methods for
each (one `exec` apiece, Python 3.11): 0.3-0.6 ms a class, 15-20 ms of every start of
those commands. A record is still a dataclass — `dataclasses.dataclass(init=False,
repr=False, eq=False)` collects its fields and generates nothing — so `dataclasses.fields`,
`asdict`, `replace`, `is_dataclass`, `field(default_factory=...)`, `ClassVar` and
`__match_args__` work as they do for any dataclass; the six methods are written once, here,
and shared (each call costs about 1.5 µs more than a generated one). Kept from a frozen
dataclass: the constructor (positional or keyword, defaults and default factories, then
`__post_init__`), `==` between instances of the same class only, `hash`, `repr` and
`dataclasses.FrozenInstanceError` on assignment or deletion. Type checkers see a frozen
dataclass (PEP 681).

Not kept: a constructor signature for introspection (`inspect.signature`, hypothesis's
`st.builds`). Refused at declaration: per-field `init`/`repr`/`compare`/`hash` flags,
keyword-only fields, `InitVar`, the class's own `__init__`, `__eq__`, `__hash__`,
`__repr__`, `__setattr__` or `__delattr__`, a field without a default after one with, and
a base class that is no record but has annotations.
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
_FLAGS = ("init", "repr", "compare")  # a field's flags that must stay True (hash: None)


@dataclass_transform(frozen_default=True, eq_default=True, field_specifiers=(dataclasses.field,))
def record(cls: T) -> T:
    def refuse(why: str) -> NoReturn:
        raise TypeError(f"{cls.__name__}: {why}")

    c: Any = cls  # gets attributes a type checker does not know of
    for base in cls.__mro__[1:-1]:  # not object
        if "__record_fields__" not in base.__dict__ and base.__dict__.get("__annotations__"):  # noqa: RUF063
            refuse(f"base {base.__name__} has annotations but is no record")
    for method in _METHODS:
        if method in cls.__dict__:
            refuse(f"defines {method}, which a record does not keep")
    undocumented = not cls.__doc__
    if undocumented:  # else `dataclass` makes one with `inspect.signature`: slow, and ours
        c.__doc__ = "-"  # would say (*args, **kwargs)
    dataclasses.dataclass(cls, init=False, repr=False, eq=False)
    fields = dataclasses.fields(cls)
    if undocumented:
        c.__doc__ = f"{cls.__name__}({', '.join(f.name for f in fields)})"
    defaults: dict[str, Any] = {}
    factories: dict[str, Any] = {}
    for name, f in cls.__dataclass_fields__.items():  # type: ignore[attr-defined]
        if f not in fields and "InitVar" in str(f.type):  # ClassVars are fine
            refuse(f"{name} is an InitVar, which a record does not support")
    for f in fields:
        if not all(getattr(f, flag) for flag in _FLAGS) or f.hash is not None:
            refuse(f"{f.name}: a field's init, repr, compare or hash flag is not supported")
        if getattr(f, "kw_only", False) is True:  # Python 3.10+: KW_ONLY, kw_only=True
            refuse(f"{f.name}: keyword-only fields are not supported")
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            factories[f.name] = f.default_factory
        elif defaults or factories:
            refuse(f"non-default field {f.name} follows a default one")
    c.__record_fields__ = tuple(f.name for f in fields)
    c.__record_defaults__ = defaults
    c.__record_factories__ = factories
    c.__record_post_init__ = getattr(cls, "__post_init__", None)
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
        elif name in cls.__record_factories__:
            set_field(self, name, cls.__record_factories__[name]())
        else:
            raise TypeError(f"{cls.__name__}() missing required argument: {name!r}")
    if kwargs:  # a positional one given again raised above: these are unknown
        unknown = next(iter(kwargs))
        raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {unknown!r}")
    post_init = cls.__record_post_init__
    if post_init is not None:
        post_init(self)


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
