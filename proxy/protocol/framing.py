"""Message framing: where each message in a byte buffer starts and ends, looking at headers only.

PostgreSQL protocol chapter 55.7 ("Message Formats"): after start-up every message is a type byte
and an Int32 length that counts itself but not the type byte. Start-up packets (StartupMessage,
SSLRequest, GSSENCRequest, CancelRequest) have no type byte.

This is the hot path's only look inside the stream: it never copies a body. A length field is never
trusted: below 4 or above the configured maximum is a ProtocolError (the caller answers 08P01).
"""

from __future__ import annotations

from collections.abc import Iterator

from proxy.protocol.errors import ProtocolError

# PostgreSQL itself caps most messages at PQ_LARGE_MESSAGE_LIMIT (1 GB - 1) and start-up packets at
# MAX_STARTUP_PACKET_LENGTH (10000). A proxy holds messages in memory, so the default is smaller;
# COPY data and huge bind parameters are the only legitimate large messages.
DEFAULT_MAX_MESSAGE_LENGTH = 64 * 1024 * 1024
MAX_STARTUP_PACKET_LENGTH = 10000

_from_bytes = int.from_bytes


def int32_at(buf: bytes, pos: int) -> int:
    """The Int32 at `pos` (a message's length field), unsigned, as int.from_bytes(..., "big") reads it.

    Four byte reads instead of a slice and a call: in the compiled relay (proxy/native.py) this is
    plain C arithmetic, and it runs for every message header the relay looks at.
    """
    return (buf[pos] << 24) | (buf[pos + 1] << 16) | (buf[pos + 2] << 8) | buf[pos + 3]


def message_length(buf: bytes | bytearray | memoryview, pos: int, max_length: int) -> int:
    """The total size (type byte included) of the message at `pos`, or 0 if its header is incomplete."""
    if len(buf) - pos < 5:
        return 0
    length = _from_bytes(buf[pos + 1 : pos + 5], "big")
    if length < 4 or length > max_length:
        raise ProtocolError(f"invalid message length {length} for message type {chr(buf[pos])!r}")
    return length + 1


def iter_messages(
    buf: bytes | bytearray | memoryview, pos: int = 0, max_length: int = DEFAULT_MAX_MESSAGE_LENGTH
) -> Iterator[tuple[int, int, int]]:
    """Yield (type, start, end) of each complete message from `pos`; stops at the first incomplete one.

    The caller learns how far it got from the last `end` it saw.
    """
    n = len(buf)
    while n - pos >= 5:
        length = _from_bytes(buf[pos + 1 : pos + 5], "big")
        if length < 4 or length > max_length:
            raise ProtocolError(f"invalid message length {length} for message type {chr(buf[pos])!r}")
        end = pos + 1 + length
        if end > n:
            return
        yield buf[pos], pos, end
        pos = end


def startup_packet_length(buf: bytes | bytearray, max_length: int = MAX_STARTUP_PACKET_LENGTH) -> int:
    """The size of the start-up packet at the head of `buf`, or 0 if its length is not all here yet."""
    if len(buf) < 4:
        return 0
    length = _from_bytes(buf[0:4], "big")
    if length < 8 or length > max_length:
        raise ProtocolError(f"invalid startup packet length {length}")
    return length
