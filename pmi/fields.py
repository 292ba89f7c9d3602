"""How one field of a PMI message is written and read: the building blocks of `pmi.commands`.

A `Field` ties a wire name to a message attribute and a `Kind`. Writing turns the attribute
into (name, text) pairs: usually one, none to leave the field out, several for a value spelled
over more than one pair (a lookup result). It raises LocalProtocolError for what the protocol
cannot carry. Reading takes the parsed fields of one message and raises RemoteProtocolError
for what is missing or malformed; every message names the command (`put: missing key=`).
"""

from __future__ import annotations

import re
from typing import Callable, Optional

from rankwire.pmi.errors import LocalProtocolError, RemoteProtocolError
from rankwire.pmi.framing import Fields, as_raw
from rankwire.pmi.messages import KEY_MAX, VALUE_MAX
from rankwire.record import record

ERROR_MSG_MAX = 256

Pair = tuple[str, str]

_INT = re.compile(rb"-?[0-9]{1,10}")


# -- reading (the peer's fields) -------------------------------------------------------------
def read_text(fields: Fields, name: str, cmd: str) -> str:
    if name not in fields:
        raise RemoteProtocolError(f"{cmd}: missing {name}=")
    return fields[name]


def read_int(fields: Fields, name: str, cmd: str, default: Optional[int] = None) -> int:
    if name not in fields and default is not None:
        return default
    text = read_text(fields, name, cmd)
    if not _INT.fullmatch(as_raw(text)):
        raise RemoteProtocolError(f"{cmd}: {name}={text!r} is not an integer")
    return int(text)


def read_flag(fields: Fields, name: str, cmd: str) -> bool:
    text = fields.get(name, "FALSE")
    if text not in ("TRUE", "FALSE"):
        raise RemoteProtocolError(f"{cmd}: {name}={text!r} is not TRUE or FALSE")
    return text == "TRUE"


# -- writing (what we were asked to send) ----------------------------------------------------
def check_key(key: str) -> None:
    size = len(as_raw(key))
    if not 0 < size <= KEY_MAX or any(c in key for c in "=; \n"):
        raise LocalProtocolError(f"invalid PMI key {key!r}: 1..{KEY_MAX} bytes, no '=;' or spaces")


def check_value(value: str) -> None:
    if len(as_raw(value)) > VALUE_MAX:
        raise LocalProtocolError(f"PMI value of {len(as_raw(value))} bytes (max {VALUE_MAX})")


def one_line(message: str) -> str:
    """An error message as one line of at most ERROR_MSG_MAX characters (PMI-2 `errmsg`)."""
    return " ".join(message.split())[:ERROR_MSG_MAX] or "error"


def pmi1_words(message: str) -> str:
    """An error message as one PMI-1 token: `no such key` → `no_such_key`."""
    return "_".join(one_line(message).split())


# -- kinds ------------------------------------------------------------------------------------
class Kind:
    """How a value is spelled on the wire (`write`) and read back (`read`)."""

    def read(self, fields: Fields, name: str, cmd: str) -> object:
        raise NotImplementedError

    def write(self, name: str, value: object) -> list[Pair]:
        return [(name, str(value))]


@record
class Const(Kind):
    """Always `text` on the wire; never read back (the field has no attribute)."""

    text: str

    def read(self, fields: Fields, name: str, cmd: str) -> object:
        return self.text

    def write(self, name: str, value: object) -> list[Pair]:
        return [(name, self.text)]


@record
class Int(Kind):
    """A decimal integer; `default` when absent (None: required)."""

    default: Optional[int] = None

    def read(self, fields: Fields, name: str, cmd: str) -> int:
        return read_int(fields, name, cmd, self.default)


class OptionalInt(Kind):
    """An integer that may be absent: None ↔ no such field."""

    def read(self, fields: Fields, name: str, cmd: str) -> Optional[int]:
        return read_int(fields, name, cmd) if name in fields else None

    def write(self, name: str, value: object) -> list[Pair]:
        return [] if value is None else [(name, str(value))]


@record
class Text(Kind):
    """A string; `default` when absent (None: required). `spell` rewrites it for the wire,
    `omit_empty` leaves an empty one out."""

    default: Optional[str] = None
    spell: Optional[Callable[[str], str]] = None
    omit_empty: bool = False

    def read(self, fields: Fields, name: str, cmd: str) -> str:
        if self.default is not None:
            return fields.get(name, self.default)
        return read_text(fields, name, cmd)

    def write(self, name: str, value: object) -> list[Pair]:
        text = str(value)
        if self.omit_empty and not text:
            return []
        return [(name, self.spell(text) if self.spell else text)]


class Key(Kind):
    """A KVS or attribute key: 1..KEY_MAX bytes; we never send '=', ';' or spaces in one."""

    def read(self, fields: Fields, name: str, cmd: str) -> str:
        key = read_text(fields, name, cmd)
        size = len(as_raw(key))
        if not 0 < size <= KEY_MAX:
            raise RemoteProtocolError(f"{cmd}: key of {size} bytes (1..{KEY_MAX} allowed)")
        return key

    def write(self, name: str, value: object) -> list[Pair]:
        check_key(str(value))
        return [(name, str(value))]


@record
class Value(Kind):
    """A KVS or attribute value of at most VALUE_MAX bytes. `checked`: check the size when
    writing (PMI-2 frames check the size of every value themselves)."""

    checked: bool = True

    def read(self, fields: Fields, name: str, cmd: str) -> str:
        value = read_text(fields, name, cmd)
        if len(as_raw(value)) > VALUE_MAX:
            raise RemoteProtocolError(
                f"{cmd}: value of {len(as_raw(value))} bytes (max {VALUE_MAX})"
            )
        return value

    def write(self, name: str, value: object) -> list[Pair]:
        if self.checked:
            check_value(str(value))
        return [(name, str(value))]


class Flag(Kind):
    """TRUE or FALSE; absent reads as FALSE."""

    def read(self, fields: Fields, name: str, cmd: str) -> bool:
        return read_flag(fields, name, cmd)

    def write(self, name: str, value: object) -> list[Pair]:
        return [(name, "TRUE" if value else "FALSE")]


class FoundByRc(Kind):
    """PMI-1 `get_result`: `rc=0 msg=success value=v` or `rc=-1 msg=key_not_found` ↔ v or
    None. Any rc other than 0 reads as not found (Slurm answers rc=1, Hydra rc=-1)."""

    def read(self, fields: Fields, name: str, cmd: str) -> Optional[str]:
        return read_text(fields, name, cmd) if read_int(fields, "rc", cmd, 0) == 0 else None

    def write(self, name: str, value: object) -> list[Pair]:
        if value is None:
            return [("rc", "-1"), ("msg", "key_not_found")]
        # value last: some clients stop parsing after it (flux-core#6081).
        return [("rc", "0"), ("msg", "success"), (name, str(value))]


@record
class FoundByFlag(Kind):
    """PMI-2 lookup result: `found=TRUE;value=v;` or `found=FALSE;` ↔ v or None."""

    flag: str = "found"

    def read(self, fields: Fields, name: str, cmd: str) -> Optional[str]:
        return read_text(fields, name, cmd) if read_flag(fields, self.flag, cmd) else None

    def write(self, name: str, value: object) -> list[Pair]:
        if value is None:
            return [(self.flag, "FALSE")]
        return [(self.flag, "TRUE"), (name, str(value))]


@record
class Field:
    """One `name=value` of a message: the message attribute `attr` (None: a constant, written
    and never read) spelled as `kind`. `aliases`: more names accepted when reading, the first
    one present wins."""

    name: str
    attr: Optional[str]
    kind: Kind
    aliases: tuple[str, ...] = ()

    def read(self, fields: Fields, cmd: str) -> object:
        name = next((n for n in (self.name, *self.aliases) if n in fields), self.name)
        return self.kind.read(fields, name, cmd)

    def write(self, message: object) -> list[Pair]:
        return self.kind.write(self.name, getattr(message, self.attr) if self.attr else None)


def const(name: str, text: str) -> Field:
    """A pair always written as `name=text` and ignored when read."""
    return Field(name, None, Const(text))
