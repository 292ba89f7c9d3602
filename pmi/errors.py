"""The two ways a PMI codec fails, split the way h11 splits them.

* `LocalProtocolError`: we misused the codec: asked it to send something the protocol
  cannot carry or that is invalid at this point (a key with a space, a reply that has no
  PMI-2 form, a PMI-1 request after the switch to PMI-2). A bug on our side; nothing was
  produced for the wire.
* `RemoteProtocolError`: the peer sent something malformed or impossible. With `fatal=True`
  the byte stream cannot be trusted any more (close the connection); otherwise the bad
  message was skipped and decoding goes on.

Both derive from `ProtocolError`, which is never raised itself.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of LocalProtocolError and RemoteProtocolError."""


class LocalProtocolError(ProtocolError):
    """We asked a codec for something the protocol cannot carry or does not allow now."""


class RemoteProtocolError(ProtocolError):
    """The peer sent malformed PMI; `fatal` = the stream is lost (close the connection)."""

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal
