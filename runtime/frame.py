"""Framed records: what the SPANK shim, its helper and the holder say to each other.

A frame is a sequence of records `KEY=VALUE\\0`; a key repeats for a list. Keys are
non-empty and hold no `=`; no record holds a NUL. That is all the C side parses (no JSON
in slurmstepd). Sans-I/O: bytes in, records out. Values that are not UTF-8 (a job's
environment may hold any bytes) travel as they are and come back through surrogateescape.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

MAX_FRAME = 4 << 20  # the shim reads at most this much


class FrameError(ValueError):
    """The peer sent something that is not a frame."""


Records = Sequence[tuple[str, str]]


def encode(records: Iterable[tuple[str, str]]) -> bytes:
    out = bytearray()
    for key, value in records:
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise ValueError(f"cannot frame record {key!r}")
        out += f"{key}={value}".encode("utf-8", "surrogateescape") + b"\0"
    return bytes(out)


def decode(data: bytes) -> list[tuple[str, str]]:
    if len(data) > MAX_FRAME:
        raise FrameError(f"frame of {len(data)} bytes is over {MAX_FRAME}")
    if data and not data.endswith(b"\0"):
        raise FrameError("frame does not end with a NUL")
    records = []
    for raw in data.split(b"\0")[:-1]:
        key, sep, value = raw.partition(b"=")
        if not sep or not key:
            raise FrameError(f"record {raw[:40]!r} is not KEY=VALUE")
        records.append(
            (key.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )
    return records


def one(records: Records, key: str) -> str | None:
    """The last value of `key`, or None."""
    found = None
    for k, v in records:
        if k == key:
            found = v
    return found


def every(records: Records, key: str) -> list[str]:
    return [v for k, v in records if k == key]


def pairs(values: Iterable[str]) -> dict[str, str]:
    """["K=V", ...] -> {K: V} (items without `=` are dropped)."""
    return dict(v.split("=", 1) for v in values if "=" in v)


def unpairs(mapping: Mapping[str, str]) -> list[str]:
    return [f"{k}={v}" for k, v in mapping.items()]
