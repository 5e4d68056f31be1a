"""The codec's one exception type: what went wrong, and the SQLSTATE the peer should be told.

In the manner of h11's ProtocolError: the codec raises, the session decides how to answer
(an ErrorResponse with `sqlstate`, then close that one client).
"""

from __future__ import annotations

PROTOCOL_VIOLATION = "08P01"


class ProtocolError(Exception):
    """A message that breaks protocol 3.0: truncated, garbled, oversized or out of place."""

    def __init__(self, message: str, sqlstate: str = PROTOCOL_VIOLATION) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
