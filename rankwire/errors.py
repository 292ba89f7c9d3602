"""The one error type a user can cause, and how a user's text is shown in it.

Every failure a user can provoke (bad image, bad option, missing tool) is raised as a
`UserError` carrying a one-line message that names the cause and the fix. The CLI turns
it into `rankwire: <message>` on stderr and a non-zero exit code; nothing else prints
tracebacks at users. `shown` is the one way a user's path or argument is put into a
message: it keeps the message one printable line whatever the text holds.
"""

from __future__ import annotations

import errno
import os

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def shown(value: object) -> str:
    """`value` as printable text on one line: line breaks and other control characters
    escaped (\\n, \\x1b), bytes that were not UTF-8 (Python's surrogate escapes of
    command-line arguments and paths) as \\xNN, as `repr` would show them."""
    out = []
    for ch in str(value):
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


class UserError(Exception):
    """A failure the user can fix; `str(err)` is one line: cause, then fix."""

    exit_code = 2

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        # One printable line even when a user's path or argument holds a line break or
        # bytes that are not UTF-8 (the SPANK shim and terminals get it as is).
        super().__init__(shown(message))
        if exit_code is not None:
            self.exit_code = exit_code


def exec_failure(program: str, err: OSError, where: str) -> tuple[int, str]:
    """(exit code, message) when exec of `program` failed with `err` `where` ("in the
    container", "on this host"; called there), as a shell would say it: 127 not found,
    126 found but not runnable."""
    name = shown(program)
    found = "/" in program and os.path.exists(program)
    if err.errno == errno.ENOENT and "/" not in program:
        return 127, f"{name}: command not found {where}"
    if err.errno == errno.ENOENT and not found:
        bind = ", or bind it in with -B" if where == "in the container" else ""
        return 127, f"{name}: no such file {where}: check the path{bind}"
    if err.errno == errno.ENOENT:
        return 126, f"{name}: cannot run it {where}: its #! interpreter or loader is missing"
    if err.errno == errno.EACCES and os.path.isdir(program):
        return 126, f"{name}: is a directory {where}, not a program: give the program's path"
    if err.errno == errno.EACCES:
        return 126, (
            f"{name}: permission denied {where}: it is not an executable file "
            "(chmod +x it, or run it through its interpreter)"
        )
    if err.errno == errno.ENOEXEC:
        return 126, (
            f"{name}: exec format error {where}: not a program for this machine, "
            "or a script without a #! line"
        )
    return 125, f"cannot start {name} {where}: {err.strerror}"


def workdir_failure(workdir: str, err: OSError, where: str) -> str:
    """The message when the working directory cannot be entered `where`."""
    reason = {
        errno.ENOENT: "does not exist",
        errno.ENOTDIR: "is not a directory",
        errno.EACCES: "cannot be entered (permission denied)",
    }.get(err.errno or 0, f"cannot be entered ({err.strerror})")
    return f"working directory {shown(workdir)} {reason} {where}: pass --pwd DIR or bind it with -B"
