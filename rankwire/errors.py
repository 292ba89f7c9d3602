"""The one error type a user can cause.

Every failure a user can provoke (bad image, bad option, missing tool) is raised as a
`UserError` carrying a one-line message that names the cause and the fix. The CLI turns
it into `rankwire: <message>` on stderr and a non-zero exit code; nothing else prints
tracebacks at users.
"""

from __future__ import annotations


class UserError(Exception):
    """A failure the user can fix; `str(err)` is one line: cause, then fix."""

    exit_code = 2

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        # One line even when a user's path or argument holds a line break.
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))
        if exit_code is not None:
            self.exit_code = exit_code
